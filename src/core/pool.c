#include "core/pool.h"

#include <stdlib.h>
#include <sys/mman.h>

static int use_mmap(const struct sl_pool *p)
{
    return p->block_bytes >= 4096;
}

static void *block_alloc(const struct sl_pool *p)
{
    if (!use_mmap(p))
        return malloc(p->block_bytes);
    void *b =
        mmap(NULL, p->block_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return b == MAP_FAILED ? NULL : b;
}

static void block_free(const struct sl_pool *p, void *b)
{
    if (use_mmap(p))
        munmap(b, p->block_bytes);
    else
        free(b);
}

void sl_pool_init(struct sl_pool *p, size_t block_bytes, size_t max_free)
{
    if (block_bytes >= 4096)
        block_bytes = (block_bytes + 4095) & ~(size_t)4095;
    p->block_bytes = block_bytes < sizeof(void *) ? sizeof(void *) : block_bytes;
    p->free_list = NULL;
    p->free_count = 0;
    p->max_free = max_free;
    p->outstanding = 0;
    p->low_water = 0;
}

void sl_pool_dispose(struct sl_pool *p)
{
    sl_pool_trim(p, 0);
}

size_t sl_pool_trim(struct sl_pool *p, size_t keep)
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

size_t sl_pool_trim_idle(struct sl_pool *p, size_t keep)
{
    size_t idle = p->low_water;
    size_t target = p->free_count - (idle > keep ? idle - keep : 0);
    size_t freed = sl_pool_trim(p, target);
    p->low_water = p->free_count;
    return freed;
}

void *sl_pool_get(struct sl_pool *p)
{
    void *b = p->free_list;
    if (b) {
        p->free_list = *(void **)b;
        p->free_count--;
        if (p->free_count < p->low_water)
            p->low_water = p->free_count;
    } else {
        b = block_alloc(p);
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
        block_free(p, block);
        return;
    }
    *(void **)block = p->free_list;
    p->free_list = block;
    p->free_count++;
}
