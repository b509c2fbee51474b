#ifndef SL_CORE_BPOOL_H
#define SL_CORE_BPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * Per-worker pool of fixed-size blocks (I/O buffers, arena chunks). A worker reuses blocks
 * from its free list, so a warm worker does not allocate on the request path; the free list
 * keeps at most `max_free` blocks, and sl_bpool_trim_idle() gives back blocks that sat unused
 * for a whole interval, so a burst does not pin memory forever. Blocks of a page or more are
 * mapped directly (mmap), so giving one back really lowers the resident size; a heap
 * allocator would keep fragments of them. Single-threaded: owned by one worker.
 */
struct sl_bpool {
    size_t block_bytes;
    void *free_list;
    size_t free_count;
    size_t max_free;
    size_t outstanding; /* blocks handed out and not yet returned */
    size_t low_water;   /* fewest free blocks since the last sl_bpool_trim_idle() */
    /* Memory budget: at most this many blocks out at once (0 = no limit). Past it, get
     * returns NULL, so new work is refused early (a closed connection, a 503) instead of the
     * process growing. */
    size_t max_outstanding;
    uint64_t refused; /* gets refused by the budget */
    bool over_budget; /* refusing since the last time usage fell back below 90% */
};

void sl_bpool_init(struct sl_bpool *p, size_t block_bytes, size_t max_free);

/* Frees every cached block. Blocks still outstanding are the holders' to return first. */
void sl_bpool_dispose(struct sl_bpool *p);

/* Frees cached blocks beyond `keep`. Returns how many were freed. */
size_t sl_bpool_trim(struct sl_bpool *p, size_t keep);

/* Frees the blocks that stayed in the free list during the whole interval since the last
 * call (beyond `keep`): under steady load nothing, after a burst the burst's blocks.
 * Returns how many were freed. */
size_t sl_bpool_trim_idle(struct sl_bpool *p, size_t keep);

/* Returns a block of p->block_bytes, or NULL when out of memory. */
void *sl_bpool_get(struct sl_bpool *p);

/* Returns a block obtained from sl_bpool_get() of the same pool. NULL is ignored. */
void sl_bpool_put(struct sl_bpool *p, void *block);

#endif
