#include "core/bpool.h"

#include <stdlib.h>
#include <sys/mman.h>

#include "core/log.h"

/*
 * Under AddressSanitizer a block on the free list is poisoned (all but the link word), so a
 * use after free of pooled memory (a request arena, a buffer) is reported like one of malloc'ed
 * memory instead of silently reading a recycled block.
 */
#if defined(__SANITIZE_ADDRESS__)
#define SL_POOL_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SL_POOL_ASAN 1
#endif
#endif
#ifdef SL_POOL_ASAN
#include <sanitizer/asan_interface.h>

#define POISON(b, n) ASAN_POISON_MEMORY_REGION((char *)(b) + sizeof(void *), (n) - sizeof(void *))
#define UNPOISON(b, n) ASAN_UNPOISON_MEMORY_REGION((b), (n))
#else
#define POISON(b, n) ((void)(b), (void)(n))
#define UNPOISON(b, n) ((void)(b), (void)(n))
#endif

static int use_mmap(const struct sl_bpool *p)
{
    return p->block_bytes >= 4096;
}

static void *block_alloc(const struct sl_bpool *p)
{
    if (!use_mmap(p))
        return malloc(p->block_bytes);
    void *b =
        mmap(NULL, p->block_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return b == MAP_FAILED ? NULL : b;
}

static void block_free(const struct sl_bpool *p, void *b)
{
    UNPOISON(b, p->block_bytes);
    if (use_mmap(p))
        munmap(b, p->block_bytes);
    else
        free(b);
}

void sl_bpool_init(struct sl_bpool *p, size_t block_bytes, size_t max_free)
{
    if (block_bytes >= 4096)
        block_bytes = (block_bytes + 4095) & ~(size_t)4095;
    p->block_bytes = block_bytes < sizeof(void *) ? sizeof(void *) : block_bytes;
    p->free_list = NULL;
    p->free_count = 0;
    p->max_free = max_free;
    p->outstanding = 0;
    p->low_water = 0;
    p->max_outstanding = 0;
    p->refused = 0;
    p->over_budget = false;
}

void sl_bpool_dispose(struct sl_bpool *p)
{
    sl_bpool_trim(p, 0);
}

size_t sl_bpool_trim(struct sl_bpool *p, size_t keep)
{
    size_t freed = 0;
    while (p->free_count > keep) {
        void *b = p->free_list;
        p->free_list = *(void **)b;
        p->free_count--;
        block_free(p, b);
        freed++;
    }
    if (p->low_water > p->free_count)
        p->low_water = p->free_count;
    return freed;
}

size_t sl_bpool_trim_idle(struct sl_bpool *p, size_t keep)
{
    size_t idle = p->low_water;
    size_t target = p->free_count - (idle > keep ? idle - keep : 0);
    size_t freed = sl_bpool_trim(p, target);
    p->low_water = p->free_count;
    return freed;
}

void *sl_bpool_get(struct sl_bpool *p)
{
    if (p->max_outstanding && p->outstanding >= p->max_outstanding) {
        if (!p->over_budget)
            SL_WARN("buffer memory budget reached (%zu blocks of %zu bytes in use): refusing "
                    "new work until some completes",
                    p->outstanding, p->block_bytes);
        p->over_budget = true;
        p->refused++;
        return NULL;
    }
    void *b = p->free_list;
    if (b) {
        p->free_list = *(void **)b;
        p->free_count--;
        if (p->free_count < p->low_water)
            p->low_water = p->free_count;
        UNPOISON(b, p->block_bytes);
    } else {
        b = block_alloc(p);
        if (!b)
            return NULL;
    }
    p->outstanding++;
    return b;
}

void sl_bpool_put(struct sl_bpool *p, void *block)
{
    if (!block)
        return;
    p->outstanding--;
    if (p->over_budget && p->outstanding * 10 < p->max_outstanding * 9) {
        p->over_budget = false;
        SL_INFO("buffer memory back under budget (%zu blocks refused so far)", (size_t)p->refused);
    }
    if (p->free_count >= p->max_free) {
        block_free(p, block);
        return;
    }
    *(void **)block = p->free_list;
    p->free_list = block;
    p->free_count++;
    POISON(block, p->block_bytes);
}
