#include "core/pool.h"

#include <stdlib.h>

void sl_pool_init(struct sl_pool *p, size_t block_bytes, size_t max_free)
{
    p->block_bytes = block_bytes < sizeof(void *) ? sizeof(void *) : block_bytes;
    p->free_list = NULL;
    p->free_count = 0;
    p->max_free = max_free;
    p->outstanding = 0;
}

void sl_pool_dispose(struct sl_pool *p)
{
    while (p->free_list) {
        void *b = p->free_list;
        p->free_list = *(void **)b;
        free(b);
    }
    p->free_count = 0;
}

size_t sl_pool_trim(struct sl_pool *p, size_t keep)
{
    size_t freed = 0;
    while (p->free_count > keep) {
        void *b = p->free_list;
        p->free_list = *(void **)b;
        p->free_count--;
        free(b);
        freed++;
    }
    return freed;
}

void *sl_pool_get(struct sl_pool *p)
{
    void *b = p->free_list;
    if (b) {
        p->free_list = *(void **)b;
        p->free_count--;
    } else {
        b = malloc(p->block_bytes);
        if (!b)
            return NULL;
    }
    p->outstanding++;
    return b;
}

void sl_pool_put(struct sl_pool *p, void *block)
{
    if (!block)
        return;
    p->outstanding--;
    if (p->free_count >= p->max_free) {
        free(block);
        return;
    }
    *(void **)block = p->free_list;
    p->free_list = block;
    p->free_count++;
}
