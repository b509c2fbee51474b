#ifndef SL_CORE_ARENA_H
#define SL_CORE_ARENA_H

#include <stddef.h>

#include "core/bpool.h"

/*
 * Per-request bump allocator over pool blocks; everything is released in one call when the
 * request ends. Allocations larger than a block get their own malloc'ed chunk (rare: a head
 * near max_header_bytes). Not thread-safe; lives on its worker.
 */
struct sl_arena_chunk;

struct sl_arena {
    struct sl_bpool *pool;
    struct sl_arena_chunk *chunks; /* newest first */
    char *cur;
    size_t left;
};

void sl_arena_init(struct sl_arena *a, struct sl_bpool *pool);

/* Returns `n` bytes aligned to 16, or NULL on OOM. Valid until sl_arena_reset(). */
void *sl_arena_alloc(struct sl_arena *a, size_t n);

/* Copies `n` bytes into the arena (for slices kept past the current callback). */
void *sl_arena_dup(struct sl_arena *a, const void *p, size_t n);

/* Releases every allocation and returns the blocks to the pool. */
void sl_arena_reset(struct sl_arena *a);

#endif
