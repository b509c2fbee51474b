#include "core/buf.h"

#include <errno.h>
#include <string.h>

int sl_buf_acquire(struct sl_buf *b, struct sl_bpool *pool)
{
    if (b->data)
        return 0;
    b->data = sl_bpool_get(pool);
    if (!b->data)
        return -ENOMEM;
    b->start = b->end = 0;
    b->cap = (uint32_t)pool->block_bytes;
    return 0;
}

void sl_buf_compact(struct sl_buf *b)
{
    if (b->start == 0)
        return;
    size_t n = sl_buf_len(b);
    if (n)
        memmove(b->data, b->data + b->start, n);
    b->start = 0;
    b->end = (uint32_t)n;
}

void sl_buf_consume(struct sl_buf *b, size_t n)
{
    b->start += (uint32_t)n;
    if (b->start >= b->end)
        b->start = b->end = 0;
}

void sl_buf_release_if_empty(struct sl_buf *b, struct sl_bpool *pool)
{
    if (b->data && b->start == b->end)
        sl_buf_release(b, pool);
}

void sl_buf_release(struct sl_buf *b, struct sl_bpool *pool)
{
    if (!b->data)
        return;
    sl_bpool_put(pool, b->data);
    b->data = NULL;
    b->start = b->end = b->cap = 0;
}

bool sl_buf_append(struct sl_buf *b, const void *p, size_t n)
{
    if (sl_buf_space(b) < n) {
        sl_buf_compact(b);
        if (sl_buf_space(b) < n)
            return false;
    }
    memcpy(b->data + b->end, p, n);
    b->end += (uint32_t)n;
    return true;
}
