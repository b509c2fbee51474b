#include "proxy/router.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"
#include "core/hash.h"
#include "core/slice.h"
#include "http/h1_parse.h"

/*
 * Layout (all built in sl_router_new, read-only afterwards):
 *
 *   hosts: exact host (normalised, lowercase) -> path index
 *   wild:  wildcard suffix ".example.com"     -> path index   (from "*.example.com")
 *   any:   path index of routes without a host condition
 *
 *   path index: exact: path -> candidate list
 *               prefix: radix trie over path_prefix bytes; each node holding routes carries
 *                       a candidate list and a link to the nearest ancestor holding routes
 *               none: candidate list of routes without a path condition
 *
 * Every candidate list is sorted once (more conditions first, then file order), so lookup
 * only walks lists in order and checks methods and headers; nothing on the lookup path
 * allocates or looks at routes that cannot match by host and path.
 */

#define MAP_SEED 0x5c0ffee5ull

struct cand {
    const struct sl_route_conf *route;
    uint32_t methods;
    unsigned cond_count;
    size_t ordinal; /* tie-break after route->index so qsort is deterministic */
    struct sl_slice *method_names;
    size_t method_name_count;
    struct sl_slice *hdr_names;
    struct sl_slice *hdr_values;
    size_t hdr_count;
};

struct cand_list {
    struct cand **items;
    size_t count, cap;
};

struct map_slot {
    uint64_t hash;
    char *key; /* owned; NULL = empty slot */
    size_t len;
    void *value;
};

/* Open addressing, linear probing, power-of-two capacity, load <= 1/2. */
struct map {
    struct map_slot *slots;
    size_t cap, count;
};

struct trie_node {
    char *label; /* owned bytes of the edge into this node */
    size_t label_len;
    size_t depth;                /* length of the full key ending at this node */
    bool byte_prefix;            /* key ends with '/' (or is empty): plain byte-prefix semantics */
    struct trie_node **children; /* sorted by label[0] (distinct first bytes) */
    size_t child_count, child_cap;
    struct cand_list cands;
    const struct trie_node *fallback; /* nearest proper ancestor with candidates */
};

struct path_index {
    struct map exact;         /* value: struct cand_list * */
    struct trie_node *prefix; /* root (label "") or NULL */
    struct cand_list none;
};

struct sl_router {
    struct map hosts; /* value: struct path_index * */
    struct map wild;  /* value: struct path_index *; key includes the leading '.' */
    size_t wild_min_len, wild_max_len;
    struct path_index *any;
    struct cand *cands;
    size_t cand_count;
};

/* ---- helpers ---------------------------------------------------------------------------- */

static char *dup_bytes(const char *p, size_t n, bool lower)
{
    char *s = malloc(n + 1);
    if (!s)
        return NULL;
    for (size_t i = 0; i < n; i++)
        s[i] = lower ? sl_ascii_lower(p[i]) : p[i];
    s[n] = '\0';
    return s;
}

static bool list_push(struct cand_list *l, struct cand *c)
{
    if (l->count == l->cap) {
        size_t ncap = l->cap ? l->cap * 2 : 2;
        struct cand **n = realloc(l->items, ncap * sizeof *n);
        if (!n)
            return false;
        l->items = n;
        l->cap = ncap;
    }
    l->items[l->count++] = c;
    return true;
}

static int cand_cmp(const void *a, const void *b)
{
    const struct cand *x = *(struct cand *const *)a;
    const struct cand *y = *(struct cand *const *)b;
    if (x->cond_count != y->cond_count)
        return x->cond_count > y->cond_count ? -1 : 1;
    if (x->route->index != y->route->index)
        return x->route->index < y->route->index ? -1 : 1;
    return x->ordinal < y->ordinal ? -1 : (x->ordinal > y->ordinal);
}

static void list_sort(struct cand_list *l)
{
    if (l->count > 1)
        qsort(l->items, l->count, sizeof l->items[0], cand_cmp);
}

/* ---- map -------------------------------------------------------------------------------- */

static bool key_eq(const struct map_slot *s, uint64_t h, const char *k, size_t len, bool icase)
{
    if (s->hash != h || s->len != len)
        return false;
    if (len == 0) /* `k` may be NULL for an empty slice; memcmp(NULL, ..., 0) is UB */
        return true;
    if (!icase)
        return memcmp(s->key, k, len) == 0;
    /* stored keys are already lowercase */
    for (size_t i = 0; i < len; i++)
        if (s->key[i] != sl_ascii_lower(k[i]))
            return false;
    return true;
}

static void *map_get(const struct map *m, const char *k, size_t len, bool icase)
{
    if (m->count == 0)
        return NULL;
    uint64_t h = icase ? sl_hash_bytes_lower(k, len, MAP_SEED) : sl_hash_bytes(k, len, MAP_SEED);
    size_t mask = m->cap - 1;
    for (size_t i = (size_t)h & mask;; i = (i + 1) & mask) {
        const struct map_slot *s = &m->slots[i];
        if (!s->key)
            return NULL;
        if (key_eq(s, h, k, len, icase))
            return s->value;
    }
}

static bool map_grow(struct map *m)
{
    size_t ncap = m->cap ? m->cap * 2 : 16;
    struct map_slot *ns = calloc(ncap, sizeof *ns);
    if (!ns)
        return false;
    for (size_t i = 0; i < m->cap; i++) {
        struct map_slot *s = &m->slots[i];
        if (!s->key)
            continue;
        size_t j = (size_t)s->hash & (ncap - 1);
        while (ns[j].key)
            j = (j + 1) & (ncap - 1);
        ns[j] = *s;
    }
    free(m->slots);
    m->slots = ns;
    m->cap = ncap;
    return true;
}

/*
 * Finds the slot for key `k` (already lowercased for host maps, which also hash with the
 * lowercase variant so lookups of mixed-case input agree), creating it with value NULL.
 */
static struct map_slot *map_upsert(struct map *m, const char *k, size_t len, bool icase)
{
    if ((m->count + 1) * 2 > m->cap && !map_grow(m))
        return NULL;
    uint64_t h = icase ? sl_hash_bytes_lower(k, len, MAP_SEED) : sl_hash_bytes(k, len, MAP_SEED);
    size_t mask = m->cap - 1;
    size_t i = (size_t)h & mask;
    for (; m->slots[i].key; i = (i + 1) & mask)
        if (key_eq(&m->slots[i], h, k, len, icase))
            return &m->slots[i];
    char *copy = dup_bytes(k, len, icase);
    if (!copy)
        return NULL;
    m->slots[i] = (struct map_slot){.hash = h, .key = copy, .len = len, .value = NULL};
    m->count++;
    return &m->slots[i];
}

/* ---- prefix trie ------------------------------------------------------------------------ */

static struct trie_node *node_new(const char *label, size_t len, size_t depth)
{
    struct trie_node *n = calloc(1, sizeof *n);
    if (!n)
        return NULL;
    n->label = dup_bytes(label, len, false);
    if (!n->label) {
        free(n);
        return NULL;
    }
    n->label_len = len;
    n->depth = depth;
    return n;
}

static void node_free(struct trie_node *n)
{
    if (!n)
        return;
    for (size_t i = 0; i < n->child_count; i++)
        node_free(n->children[i]);
    free(n->children);
    free(n->cands.items);
    free(n->label);
    free(n);
}

/* Index of the child whose label starts with byte `c`, or where it would be inserted. */
static size_t child_search(const struct trie_node *n, unsigned char c, bool *found)
{
    size_t lo = 0, hi = n->child_count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        unsigned char m = (unsigned char)n->children[mid]->label[0];
        if (m == c) {
            *found = true;
            return mid;
        }
        if (m < c)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = false;
    return lo;
}

static bool child_insert(struct trie_node *n, size_t at, struct trie_node *child)
{
    if (n->child_count == n->child_cap) {
        size_t ncap = n->child_cap ? n->child_cap * 2 : 2;
        struct trie_node **c = realloc(n->children, ncap * sizeof *c);
        if (!c)
            return false;
        n->children = c;
        n->child_cap = ncap;
    }
    memmove(&n->children[at + 1], &n->children[at], (n->child_count - at) * sizeof *n->children);
    n->children[at] = child;
    n->child_count++;
    return true;
}

/* Returns the node for key[0..len), creating and splitting edges as needed. */
static struct trie_node *trie_insert(struct trie_node *root, const char *key, size_t len)
{
    struct trie_node *n = root;
    size_t pos = 0;
    while (pos < len) {
        bool found;
        size_t at = child_search(n, (unsigned char)key[pos], &found);
        if (!found) {
            struct trie_node *leaf = node_new(key + pos, len - pos, len);
            if (!leaf)
                return NULL;
            if (!child_insert(n, at, leaf)) {
                node_free(leaf);
                return NULL;
            }
            return leaf;
        }
        if (!n->children)
            return NULL; /* unreachable: found implies children; tells the analyzer */
        struct trie_node *c = n->children[at];
        size_t common = 0;
        while (common < c->label_len && pos + common < len && c->label[common] == key[pos + common])
            common++;
        if (common == c->label_len) {
            n = c;
            pos += common;
            continue;
        }
        /* split c's edge at `common`: n -> mid -> c */
        struct trie_node *mid = node_new(c->label, common, c->depth - c->label_len + common);
        if (!mid)
            return NULL;
        char *rest = dup_bytes(c->label + common, c->label_len - common, false);
        if (!rest || !child_insert(mid, 0, c)) {
            free(rest);
            node_free(mid);
            return NULL;
        }
        free(c->label);
        c->label = rest;
        c->label_len -= common;
        n->children[at] = mid;
        n = mid;
        pos += common;
    }
    return n;
}

static void trie_finish(struct trie_node *n, const struct trie_node *fallback)
{
    list_sort(&n->cands);
    n->fallback = fallback;
    /* byte_prefix depends on the key's last byte, which is the last byte of this label */
    n->byte_prefix = n->depth == 0 || (n->label_len > 0 && n->label[n->label_len - 1] == '/');
    const struct trie_node *below = n->cands.count ? n : fallback;
    for (size_t i = 0; i < n->child_count; i++)
        trie_finish(n->children[i], below);
}

/* ---- path index ------------------------------------------------------------------------- */

static void path_index_free(struct path_index *pi)
{
    if (!pi)
        return;
    for (size_t i = 0; i < pi->exact.cap; i++) {
        struct map_slot *s = &pi->exact.slots[i];
        if (!s->key)
            continue;
        struct cand_list *l = s->value;
        if (l)
            free(l->items);
        free(l);
        free(s->key);
    }
    free(pi->exact.slots);
    node_free(pi->prefix);
    free(pi->none.items);
    free(pi);
}

static bool path_index_add(struct path_index *pi, struct cand *c)
{
    const struct sl_route_match_conf *m = &c->route->match;
    if (m->path) {
        struct map_slot *s = map_upsert(&pi->exact, m->path, strlen(m->path), false);
        if (!s)
            return false;
        if (!s->value && !(s->value = calloc(1, sizeof(struct cand_list))))
            return false;
        return list_push(s->value, c);
    }
    if (m->path_prefix) {
        if (!pi->prefix && !(pi->prefix = node_new("", 0, 0)))
            return false;
        struct trie_node *n = trie_insert(pi->prefix, m->path_prefix, strlen(m->path_prefix));
        return n && list_push(&n->cands, c);
    }
    return list_push(&pi->none, c);
}

static void path_index_finish(struct path_index *pi)
{
    for (size_t i = 0; i < pi->exact.cap; i++)
        if (pi->exact.slots[i].key)
            list_sort(pi->exact.slots[i].value);
    if (pi->prefix)
        trie_finish(pi->prefix, NULL);
    list_sort(&pi->none);
}

/* ---- host normalisation ----------------------------------------------------------------- */

/*
 * "Host:8080" -> "Host", "[::1]:8080" -> "[::1]", "example.com." -> "example.com".
 * Case is left alone (callers compare/hash case-insensitively).
 */
static struct sl_slice host_normalize(struct sl_slice h)
{
    if (h.len > 0 && h.ptr[0] == '[') {
        const char *end = memchr(h.ptr, ']', h.len);
        if (end)
            h.len = (size_t)(end - h.ptr) + 1;
        return h;
    }
    const char *colon = h.len ? memchr(h.ptr, ':', h.len) : NULL;
    if (colon)
        h.len = (size_t)(colon - h.ptr);
    if (h.len > 0 && h.ptr[h.len - 1] == '.')
        h.len--;
    return h;
}

/* ---- build ------------------------------------------------------------------------------ */

static bool serves_listener(const struct sl_route_conf *rc, const char *listener)
{
    if (!listener || !rc->listeners || rc->listener_count == 0)
        return true;
    for (size_t i = 0; i < rc->listener_count; i++)
        if (rc->listeners[i] && strcmp(rc->listeners[i], listener) == 0)
            return true;
    return false;
}

static bool cand_init(struct cand *c, const struct sl_route_conf *rc, size_t ordinal)
{
    const struct sl_route_match_conf *m = &rc->match;
    c->route = rc;
    c->ordinal = ordinal;
    c->methods = m->methods;
    c->method_name_count = m->method_name_count;
    c->hdr_count = m->header_count;
    /* a method set counts as one condition; each header is one */
    c->cond_count =
        (unsigned)((m->methods || m->method_name_count) ? 1 : 0) + (unsigned)m->header_count;
    if (m->method_name_count) {
        c->method_names = calloc(m->method_name_count, sizeof *c->method_names);
        if (!c->method_names)
            return false;
        for (size_t i = 0; i < m->method_name_count; i++)
            c->method_names[i] = sl_slice_cstr(m->method_names[i]);
    }
    if (m->header_count) {
        c->hdr_names = calloc(m->header_count, sizeof *c->hdr_names);
        c->hdr_values = calloc(m->header_count, sizeof *c->hdr_values);
        if (!c->hdr_names || !c->hdr_values)
            return false;
        for (size_t i = 0; i < m->header_count; i++) {
            c->hdr_names[i] = sl_slice_cstr(m->headers[i].name);
            c->hdr_values[i] = sl_slice_cstr(m->headers[i].value);
        }
    }
    return true;
}

static struct path_index *index_for(struct map *m, struct sl_slice key)
{
    struct map_slot *s = map_upsert(m, key.ptr, key.len, true);
    if (!s)
        return NULL;
    if (!s->value)
        s->value = calloc(1, sizeof(struct path_index));
    return s->value;
}

static bool router_add(struct sl_router *r, struct cand *c)
{
    const char *host = c->route->match.host;
    struct sl_slice h = host_normalize(sl_slice_cstr(host));
    struct path_index *pi;

    if (h.len == 0 || (h.len == 1 && h.ptr[0] == '*')) {
        if (!r->any && !(r->any = calloc(1, sizeof *r->any)))
            return false;
        pi = r->any;
    } else if (h.len >= 2 && h.ptr[0] == '*' && h.ptr[1] == '.') {
        struct sl_slice suffix = sl_slice_make(h.ptr + 1, h.len - 1); /* keep the '.' */
        if (!(pi = index_for(&r->wild, suffix)))
            return false;
        if (r->wild_min_len == 0 || suffix.len < r->wild_min_len)
            r->wild_min_len = suffix.len;
        if (suffix.len > r->wild_max_len)
            r->wild_max_len = suffix.len;
    } else {
        if (!(pi = index_for(&r->hosts, h)))
            return false;
    }
    return path_index_add(pi, c);
}

static void host_map_free(struct map *m)
{
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->slots[i].key)
            continue;
        path_index_free(m->slots[i].value);
        free(m->slots[i].key);
    }
    free(m->slots);
}

void sl_router_free(struct sl_router *r)
{
    if (!r)
        return;
    host_map_free(&r->hosts);
    host_map_free(&r->wild);
    path_index_free(r->any);
    for (size_t i = 0; i < r->cand_count; i++) {
        free(r->cands[i].method_names);
        free(r->cands[i].hdr_names);
        free(r->cands[i].hdr_values);
    }
    free(r->cands);
    free(r);
}

struct sl_router *sl_router_new(const struct sl_config *cfg, const char *listener_name)
{
    struct sl_router *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    size_t n = cfg ? cfg->route_count : 0;
    if (n && !(r->cands = calloc(n, sizeof *r->cands)))
        goto fail;
    for (size_t i = 0; i < n; i++) {
        const struct sl_route_conf *rc = &cfg->routes[i];
        if (!serves_listener(rc, listener_name))
            continue;
        struct cand *c = &r->cands[r->cand_count++];
        if (!cand_init(c, rc, i) || !router_add(r, c))
            goto fail;
    }
    for (size_t i = 0; i < r->hosts.cap; i++)
        if (r->hosts.slots[i].key)
            path_index_finish(r->hosts.slots[i].value);
    for (size_t i = 0; i < r->wild.cap; i++)
        if (r->wild.slots[i].key)
            path_index_finish(r->wild.slots[i].value);
    if (r->any)
        path_index_finish(r->any);
    return r;
fail:
    sl_router_free(r);
    return NULL;
}

/* ---- match ------------------------------------------------------------------------------ */

static bool methods_ok(const struct cand *c, const struct sl_route_input *in)
{
    if (c->methods == 0 && c->method_name_count == 0)
        return true;
    if (in->method_bit != SL_METHOD_OTHER && (c->methods & in->method_bit))
        return true;
    /* method tokens are case-sensitive (RFC 9110 9.1) */
    for (size_t i = 0; i < c->method_name_count; i++)
        if (sl_slice_eq(c->method_names[i], in->method))
            return true;
    return false;
}

static bool headers_ok(const struct cand *c, const struct sl_route_input *in)
{
    for (size_t i = 0; i < c->hdr_count; i++) {
        bool found = false;
        /* any one field of that name with the exact value satisfies the condition */
        for (size_t j = 0; j < in->header_count && !found; j++)
            found = sl_slice_ieq(in->headers[j].name, c->hdr_names[i]) &&
                    sl_slice_eq(in->headers[j].value, c->hdr_values[i]);
        if (!found)
            return false;
    }
    return true;
}

static const struct sl_route_conf *try_list(const struct cand_list *l,
                                            const struct sl_route_input *in)
{
    for (size_t i = 0; i < l->count; i++) {
        const struct cand *c = l->items[i];
        if (methods_ok(c, in) && headers_ok(c, in))
            return c->route;
    }
    return NULL;
}

static const struct trie_node *trie_deepest(const struct trie_node *n, struct sl_slice path)
{
    const struct trie_node *best = n->cands.count ? n : NULL;
    size_t pos = 0;
    while (pos < path.len) {
        bool found;
        size_t at = child_search(n, (unsigned char)path.ptr[pos], &found);
        if (!found)
            break;
        const struct trie_node *c = n->children[at];
        if (c->label_len > path.len - pos || memcmp(c->label, path.ptr + pos, c->label_len) != 0)
            break;
        pos += c->label_len;
        n = c;
        if (n->cands.count)
            best = n;
    }
    return best;
}

static const struct sl_route_conf *match_index(const struct path_index *pi,
                                               const struct sl_route_input *in)
{
    const struct sl_route_conf *rc;
    struct sl_slice path = in->path;

    if (pi->exact.count) {
        const struct cand_list *l = map_get(&pi->exact, path.ptr, path.len, false);
        if (l && (rc = try_list(l, in)))
            return rc;
    }
    if (pi->prefix) {
        for (const struct trie_node *n = trie_deepest(pi->prefix, path); n; n = n->fallback) {
            /* "/users" is a segment prefix: "/users" and "/users/..." but not "/usersX" */
            if (!n->byte_prefix && path.len > n->depth && path.ptr[n->depth] != '/')
                continue;
            if ((rc = try_list(&n->cands, in)))
                return rc;
        }
    }
    return try_list(&pi->none, in);
}

const struct sl_route_conf *sl_router_match(const struct sl_router *r,
                                            const struct sl_route_input *in)
{
    const struct sl_route_conf *rc;
    const struct path_index *pi;
    struct sl_slice host = host_normalize(in->host);

    if (host.len > 0) {
        if ((pi = map_get(&r->hosts, host.ptr, host.len, true)) && (rc = match_index(pi, in)))
            return rc;
        /* wildcard suffixes start at a '.', longest first; "*.example.com" needs at least
           one byte before ".example.com", so it never matches "example.com" itself */
        if (r->wild.count) {
            for (size_t i = 1; i < host.len; i++) {
                size_t slen = host.len - i;
                if (slen < r->wild_min_len)
                    break;
                if (host.ptr[i] != '.' || slen > r->wild_max_len)
                    continue;
                pi = map_get(&r->wild, host.ptr + i, slen, true);
                if (pi && (rc = match_index(pi, in)))
                    return rc;
            }
        }
    }
    if (r->any)
        return match_index(r->any, in);
    return NULL;
}
