#include "filters/json_scratch.h"

#include <pthread.h>
#include <stdalign.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <jansson.h>

#define SCRATCH_BYTES (64 * 1024)

struct scratch {
    alignas(16) unsigned char buf[SCRATCH_BYTES];
    size_t used;
    bool active;
};

static _Thread_local struct scratch tl;

static void *scratch_malloc(size_t n)
{
    if (tl.active) {
        size_t need = (n + 15) & ~(size_t)15;
        if (need >= n && need <= SCRATCH_BYTES - tl.used) {
            void *p = tl.buf + tl.used;
            tl.used += need;
            return p;
        }
    }
    return malloc(n);
}

static void scratch_free(void *p)
{
    /* Scratch memory is released as a whole at the end of the scope. The address test is on
     * this thread's buffer only: jansson frees values on the thread that parsed them. */
    uintptr_t a = (uintptr_t)p, lo = (uintptr_t)tl.buf;
    if (p && a >= lo && a < lo + SCRATCH_BYTES)
        return;
    free(p);
}

static pthread_once_t once = PTHREAD_ONCE_INIT;

static void install(void)
{
    json_set_alloc_funcs(scratch_malloc, scratch_free);
}

void sl_json_scratch_install(void)
{
    pthread_once(&once, install);
}

void sl_json_scratch_begin(void)
{
    sl_json_scratch_install();
    tl.used = 0;
    tl.active = true;
}

void sl_json_scratch_end(void)
{
    tl.active = false;
    tl.used = 0;
}
