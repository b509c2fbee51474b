#include "config/yaml_tree.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "config/errors.h"

struct frame {
    struct sl_yaml_node *node;
    struct sl_yaml_node *key;  /* MAP: key read, value pending (owned until paired) */
    struct sl_yaml_node *last; /* MAP: key of the latest pair, for error paths */
};

struct builder {
    struct sl_config_errors *errs;
    struct sl_yaml_node *root;
    struct frame stack[SL_YAML_MAX_DEPTH];
    size_t depth;
    bool failed; /* errors recorded; keep parsing to find more */
    bool fatal;  /* cannot continue; no tree is returned */
};

void sl__config_yaml_free(struct sl_yaml_node *n)
{
    if (!n)
        return;
    for (size_t i = 0; i < n->count; i++) {
        if (n->keys)
            sl__config_yaml_free(n->keys[i]);
        sl__config_yaml_free(n->items[i]);
    }
    free(n->keys);
    free(n->items);
    free(n->str);
    free(n);
}

const struct sl_yaml_node *sl__config_yaml_get(const struct sl_yaml_node *map, const char *key)
{
    if (!map || map->kind != SL_YAML_MAP)
        return NULL;
    size_t klen = strlen(key);
    for (size_t i = 0; i < map->count; i++) {
        const struct sl_yaml_node *k = map->keys[i];
        if (k->kind == SL_YAML_SCALAR && k->len == klen && memcmp(k->str, key, klen) == 0)
            return map->items[i];
    }
    return NULL;
}

const char *sl__config_yaml_kind_name(const struct sl_yaml_node *n)
{
    switch (n->kind) {
    case SL_YAML_MAP:
        return "a mapping";
    case SL_YAML_SEQ:
        return "a list";
    case SL_YAML_SCALAR:
        break;
    }
    return n->is_null ? "null" : "a string";
}

/* The key path of the position being parsed, from the open containers. */
static void stack_path(const struct builder *b, char *buf, size_t cap)
{
    size_t o = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < b->depth && o < cap; i++) {
        const struct frame *f = &b->stack[i];
        bool inner = i + 1 < b->depth; /* a child container is open below this frame */
        int n = 0;
        if (f->node->kind == SL_YAML_SEQ) {
            size_t idx = inner && f->node->count ? f->node->count - 1 : f->node->count;
            n = snprintf(buf + o, cap - o, "[%zu]", idx);
        } else {
            const struct sl_yaml_node *k = inner ? f->last : f->key;
            if (k && k->kind == SL_YAML_SCALAR)
                n = snprintf(buf + o, cap - o, "%s%.*s", o ? "." : "", (int)k->len, k->str);
        }
        if (n < 0)
            break;
        o += (size_t)n;
    }
    if (o >= cap)
        buf[cap - 1] = '\0';
    /* Keys may hold control bytes; never let them break an error line. */
    for (char *p = buf; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
}

static void error_at(struct builder *b, const yaml_mark_t *m, const char *msg)
{
    char path[256];
    stack_path(b, path, sizeof(path));
    int line = (int)(m->line < 0x7ffffffe ? m->line + 1 : 0x7fffffff);
    int col = (int)(m->column < 0x7ffffffe ? m->column + 1 : 0x7fffffff);
    if (sl__config_errors_add(b->errs, line, col, path, "%s", msg) != 0)
        b->fatal = true;
    b->failed = true;
}

static struct sl_yaml_node *node_new(struct builder *b, enum sl_yaml_kind kind,
                                     const yaml_mark_t *m)
{
    struct sl_yaml_node *n = calloc(1, sizeof(*n));
    if (!n) {
        error_at(b, m, "out of memory");
        b->fatal = true;
        return NULL;
    }
    n->kind = kind;
    n->line = (int)(m->line < 0x7ffffffe ? m->line + 1 : 0x7fffffff);
    n->col = (int)(m->column < 0x7ffffffe ? m->column + 1 : 0x7fffffff);
    return n;
}

static bool push_child(struct sl_yaml_node *parent, struct sl_yaml_node *key,
                       struct sl_yaml_node *val)
{
    if (parent->count == parent->cap) {
        size_t cap = parent->cap ? parent->cap * 2 : 4;
        struct sl_yaml_node **items = realloc(parent->items, cap * sizeof(*items));
        if (!items)
            return false;
        parent->items = items;
        if (parent->kind == SL_YAML_MAP) {
            struct sl_yaml_node **keys = realloc(parent->keys, cap * sizeof(*keys));
            if (!keys)
                return false;
            parent->keys = keys;
        }
        parent->cap = cap;
    }
    if (parent->kind == SL_YAML_MAP)
        parent->keys[parent->count] = key;
    parent->items[parent->count++] = val;
    return true;
}

/* Links a new node into the tree; takes ownership of `n` in every case. */
static void attach(struct builder *b, struct sl_yaml_node *n, const yaml_mark_t *m)
{
    if (b->depth == 0) {
        if (b->root)
            sl__config_yaml_free(b->root);
        b->root = n;
        return;
    }
    struct frame *f = &b->stack[b->depth - 1];
    if (f->node->kind == SL_YAML_SEQ) {
        if (!push_child(f->node, NULL, n)) {
            sl__config_yaml_free(n);
            error_at(b, m, "out of memory");
            b->fatal = true;
        }
        return;
    }
    if (!f->key) {
        if (n->kind != SL_YAML_SCALAR || n->is_null) {
            error_at(b, m, "mapping keys must be plain strings");
            /* Keep it as the key so the value that follows stays paired; dropped at the end. */
            n->is_dup = true;
        }
        f->key = n;
        return;
    }
    struct sl_yaml_node *key = f->key;
    if (!key->is_dup) {
        for (size_t i = 0; i < f->node->count; i++) {
            const struct sl_yaml_node *k = f->node->keys[i];
            if (!k->is_dup && k->len == key->len && memcmp(k->str, key->str, key->len) == 0) {
                char first[64];
                snprintf(first, sizeof(first), "%d:%d", k->line, k->col);
                yaml_mark_t km = {0, (size_t)key->line - 1, (size_t)key->col - 1};
                char q[160];
                sl__config_quote(q, sizeof(q), key->str, key->len);
                char msg[256];
                snprintf(msg, sizeof(msg), "duplicate key %s (first at %s)", q, first);
                error_at(b, &km, msg);
                key->is_dup = true;
                break;
            }
        }
    }
    f->key = NULL;
    f->last = key;
    if (!push_child(f->node, key, n)) {
        sl__config_yaml_free(key);
        sl__config_yaml_free(n);
        error_at(b, m, "out of memory");
        b->fatal = true;
    }
}

/* Drops pairs whose key was rejected, once the mapping (and so their values) is complete. */
static void compact_map(struct sl_yaml_node *map)
{
    size_t o = 0;
    for (size_t i = 0; i < map->count; i++) {
        if (map->keys[i]->is_dup) {
            sl__config_yaml_free(map->keys[i]);
            sl__config_yaml_free(map->items[i]);
            continue;
        }
        map->keys[o] = map->keys[i];
        map->items[o++] = map->items[i];
    }
    map->count = o;
}

static bool has_anchor(const yaml_event_t *ev)
{
    switch (ev->type) {
    case YAML_SCALAR_EVENT:
        return ev->data.scalar.anchor != NULL;
    case YAML_SEQUENCE_START_EVENT:
        return ev->data.sequence_start.anchor != NULL;
    case YAML_MAPPING_START_EVENT:
        return ev->data.mapping_start.anchor != NULL;
    default:
        return false;
    }
}

static bool is_null_scalar(const yaml_event_t *ev)
{
    if (ev->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
        return false;
    const char *v = (const char *)ev->data.scalar.value;
    size_t len = ev->data.scalar.length;
    return len == 0 || (len == 1 && v[0] == '~') ||
           (len == 4 && (!memcmp(v, "null", 4) || !memcmp(v, "Null", 4) || !memcmp(v, "NULL", 4)));
}

static void on_event(struct builder *b, const yaml_event_t *ev, int *documents)
{
    const yaml_mark_t *m = &ev->start_mark;
    if (has_anchor(ev))
        error_at(b, m, "anchors and aliases are not supported; repeat the value instead");
    switch (ev->type) {
    case YAML_DOCUMENT_START_EVENT:
        if (++*documents > 1) {
            error_at(b, m, "only one YAML document is allowed");
            b->fatal = true;
        }
        break;
    case YAML_ALIAS_EVENT: {
        error_at(b, m, "anchors and aliases are not supported; repeat the value instead");
        /* A null placeholder keeps the surrounding mapping's keys and values paired. */
        struct sl_yaml_node *n = node_new(b, SL_YAML_SCALAR, m);
        if (n) {
            /* An empty string, not NULL: readers may compare str before checking is_null. */
            n->str = calloc(1, 1);
            if (!n->str) {
                free(n);
                error_at(b, m, "out of memory");
                b->fatal = true;
                break;
            }
            n->is_null = true;
            attach(b, n, m);
        }
        break;
    }
    case YAML_SCALAR_EVENT: {
        struct sl_yaml_node *n = node_new(b, SL_YAML_SCALAR, m);
        if (!n)
            break;
        n->len = ev->data.scalar.length;
        n->str = malloc(n->len + 1);
        if (!n->str) {
            free(n);
            error_at(b, m, "out of memory");
            b->fatal = true;
            break;
        }
        if (n->len)
            memcpy(n->str, ev->data.scalar.value, n->len);
        n->str[n->len] = '\0';
        n->is_null = is_null_scalar(ev);
        attach(b, n, m);
        break;
    }
    case YAML_SEQUENCE_START_EVENT:
    case YAML_MAPPING_START_EVENT: {
        if (b->depth == SL_YAML_MAX_DEPTH) {
            char msg[64];
            snprintf(msg, sizeof(msg), "nesting deeper than %d levels", SL_YAML_MAX_DEPTH);
            error_at(b, m, msg);
            b->fatal = true;
            break;
        }
        struct sl_yaml_node *n =
            node_new(b, ev->type == YAML_MAPPING_START_EVENT ? SL_YAML_MAP : SL_YAML_SEQ, m);
        if (!n)
            break;
        attach(b, n, m);
        if (b->fatal)
            break;
        b->stack[b->depth].node = n;
        b->stack[b->depth].key = NULL;
        b->stack[b->depth].last = NULL;
        b->depth++;
        break;
    }
    case YAML_SEQUENCE_END_EVENT:
    case YAML_MAPPING_END_EVENT:
        if (b->depth > 0) {
            struct frame *f = &b->stack[--b->depth];
            if (f->node->kind == SL_YAML_MAP)
                compact_map(f->node);
            /* libyaml always pairs keys and values; a stray key would only come from a bug. */
            sl__config_yaml_free(f->key);
            f->key = NULL;
        }
        break;
    default:
        break;
    }
}

int sl__config_yaml_parse(const char *buf, size_t len, struct sl_config_errors *errs,
                          struct sl_yaml_node **root)
{
    struct builder b = {.errs = errs};
    yaml_parser_t parser;
    int documents = 0;
    *root = NULL;
    if (!yaml_parser_initialize(&parser)) {
        sl__config_errors_add(errs, 1, 1, "", "out of memory");
        return -1;
    }
    yaml_parser_set_input_string(&parser, (const unsigned char *)buf, len);
    for (;;) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&parser, &ev)) {
            const char *problem = parser.problem ? parser.problem : "out of memory";
            char msg[320];
            if (parser.context)
                snprintf(msg, sizeof(msg), "YAML syntax error: %s (%s at %zu:%zu)", problem,
                         parser.context, parser.context_mark.line + 1,
                         parser.context_mark.column + 1);
            else
                snprintf(msg, sizeof(msg), "YAML syntax error: %s", problem);
            error_at(&b, &parser.problem_mark, msg);
            b.fatal = true;
            break;
        }
        yaml_event_type_t type = ev.type;
        on_event(&b, &ev, &documents);
        yaml_event_delete(&ev);
        if (b.fatal || type == YAML_STREAM_END_EVENT)
            break;
    }
    yaml_parser_delete(&parser);
    /* On an early stop the open containers are already linked under the root. */
    for (size_t i = 0; i < b.depth; i++) {
        sl__config_yaml_free(b.stack[i].key);
        b.stack[i].key = NULL;
    }
    if (b.fatal) {
        sl__config_yaml_free(b.root);
        return -1;
    }
    if (!b.root || (b.root->kind == SL_YAML_SCALAR && b.root->is_null)) {
        /* An empty file is an empty mapping; the schema then reports what is missing. */
        int line = b.root ? b.root->line : 1, col = b.root ? b.root->col : 1;
        sl__config_yaml_free(b.root);
        b.root = calloc(1, sizeof(*b.root));
        if (!b.root) {
            sl__config_errors_add(errs, 1, 1, "", "out of memory");
            return -1;
        }
        b.root->kind = SL_YAML_MAP;
        b.root->line = line;
        b.root->col = col;
    }
    *root = b.root;
    return 0;
}
