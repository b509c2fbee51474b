#ifndef SL_CORE_SLAB_H
#define SL_CORE_SLAB_H

#include <stddef.h>

/*
 * Per-worker allocator of same-sized objects (connections), carved from 64 KiB chunks (8-byte
 * aligned objects). It has no per-object header, which is what keeps an idle keep-alive connection
 * at its struct size, and reuses freed objects LIFO (warm in cache). Chunks are kept until the
 * worker exits. Single-threaded.
 */
struct sl_slab {
    size_t obj_bytes;
    void *free_list;
    void *chunks; /* singly linked through the first word of each chunk */
    size_t live;
};

void sl_slab_init(struct sl_slab *s, size_t obj_bytes);

/* Frees every chunk; objects still live are invalid afterwards. */
void sl_slab_dispose(struct sl_slab *s);

/* Returns a zeroed object, or NULL when out of memory. */
void *sl_slab_get(struct sl_slab *s);

void sl_slab_put(struct sl_slab *s, void *obj);

#endif
