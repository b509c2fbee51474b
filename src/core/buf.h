#ifndef SL_CORE_BUF_H
#define SL_CORE_BUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/bpool.h"

/*
 * A bounded byte buffer whose storage is a pool block, held only while it has work: an idle
 * connection owns no block (sl_buf_release_if_empty), which is what keeps idle keep-alive
 * connections at a few hundred bytes each. Readable bytes are data[start, end).
 * One owner at a time; slices into it stay valid until the owner consumes or compacts.
 */
struct sl_buf {
    char *data; /* NULL when no block is held */
    uint32_t start, end, cap;
};

static inline size_t sl_buf_len(const struct sl_buf *b)
{
    return b->end - b->start;
}

static inline char *sl_buf_head(const struct sl_buf *b)
{
    return b->data + b->start;
}

static inline size_t sl_buf_space(const struct sl_buf *b)
{
    return b->cap - b->end;
}

/* Makes sure a block is held. Returns 0 or -ENOMEM. */
int sl_buf_acquire(struct sl_buf *b, struct sl_bpool *pool);

/* Moves readable bytes to the front so that all free space is at the tail. Invalidates
 * slices into the buffer. */
void sl_buf_compact(struct sl_buf *b);

/* Drops `n` readable bytes from the front; resets to empty positions when nothing is left. */
void sl_buf_consume(struct sl_buf *b, size_t n);

/* Returns the block to the pool when no readable bytes remain. */
void sl_buf_release_if_empty(struct sl_buf *b, struct sl_bpool *pool);

/* Returns the block to the pool, discarding any bytes. */
void sl_buf_release(struct sl_buf *b, struct sl_bpool *pool);

/* Appends bytes; returns false (and appends nothing) when they do not fit. */
bool sl_buf_append(struct sl_buf *b, const void *p, size_t n);

#endif
