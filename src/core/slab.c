#include "core/slab.h"

#include <stdlib.h>
#include <string.h>

#define CHUNK_BYTES (64 * 1024)
#define CHUNK_HEADER 16

void sl_slab_init(struct sl_slab *s, size_t obj_bytes)
{
    obj_bytes = (obj_bytes + 7u) & ~(size_t)7u;
    s->obj_bytes = obj_bytes < sizeof(void *) ? sizeof(void *) : obj_bytes;
    s->free_list = NULL;
    s->chunks = NULL;
    s->live = 0;
}

void sl_slab_dispose(struct sl_slab *s)
{
    while (s->chunks) {
        void *c = s->chunks;
        s->chunks = *(void **)c;
        free(c);
    }
    s->free_list = NULL;
    s->live = 0;
}

static int grow(struct sl_slab *s)
{
    size_t n = (CHUNK_BYTES - CHUNK_HEADER) / s->obj_bytes;
    if (n == 0)
        n = 1;
    char *c = malloc(CHUNK_HEADER + n * s->obj_bytes);
    if (!c)
        return -1;
    *(void **)c = s->chunks;
    s->chunks = c;
    for (size_t i = n; i-- > 0;) {
        void *o = c + CHUNK_HEADER + i * s->obj_bytes;
        *(void **)o = s->free_list;
        s->free_list = o;
    }
    return 0;
}

void *sl_slab_get(struct sl_slab *s)
{
    if (!s->free_list && grow(s) < 0)
        return NULL;
    void *o = s->free_list;
    s->free_list = *(void **)o;
    memset(o, 0, s->obj_bytes);
    s->live++;
    return o;
}

void sl_slab_put(struct sl_slab *s, void *obj)
{
    if (!obj)
        return;
    *(void **)obj = s->free_list;
    s->free_list = obj;
    s->live--;
}
