#include "core/arena.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct sl_arena_chunk {
    struct sl_arena_chunk *next;
    int from_pool;
    int pad_;
    /* data follows, 16-byte aligned because the header is 16 bytes */
};

_Static_assert(sizeof(struct sl_arena_chunk) == 16, "chunk header keeps data 16-aligned");

void sl_arena_init(struct sl_arena *a, struct sl_bpool *pool)
{
    a->pool = pool;
    a->chunks = NULL;
    a->cur = NULL;
    a->left = 0;
}

void *sl_arena_alloc(struct sl_arena *a, size_t n)
{
    if (n > SIZE_MAX / 2)
        return NULL; /* no arena serves that, and the rounding below would wrap */
    n = (n + 15u) & ~(size_t)15u;
    if (n == 0)
        n = 16;
    if (n <= a->left) {
        void *p = a->cur;
        a->cur += n;
        a->left -= n;
        return p;
    }
    size_t usable = a->pool->block_bytes - sizeof(struct sl_arena_chunk);
    struct sl_arena_chunk *c;
    if (n > usable / 2) {
        /* Big allocations get a chunk of their own so the current block's tail is kept. */
        c = malloc(sizeof *c + n);
        if (!c)
            return NULL;
        c->from_pool = 0;
        c->next = a->chunks ? a->chunks->next : NULL;
        if (a->chunks)
            a->chunks->next = c;
        else
            a->chunks = c;
        return (char *)(c + 1);
    }
    c = sl_bpool_get(a->pool);
    if (!c)
        return NULL;
    c->from_pool = 1;
    c->next = a->chunks;
    a->chunks = c;
    a->cur = (char *)(c + 1) + n;
    a->left = usable - n;
    return (char *)(c + 1);
}

void *sl_arena_dup(struct sl_arena *a, const void *p, size_t n)
{
    void *d = sl_arena_alloc(a, n);
    if (d && n)
        memcpy(d, p, n);
    return d;
}

void sl_arena_reset(struct sl_arena *a)
{
    struct sl_arena_chunk *c = a->chunks;
    while (c) {
        struct sl_arena_chunk *next = c->next;
        if (c->from_pool)
            sl_bpool_put(a->pool, c);
        else
            free(c);
        c = next;
    }
    a->chunks = NULL;
    a->cur = NULL;
    a->left = 0;
}
