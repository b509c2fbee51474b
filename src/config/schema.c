#include "config/schema.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/errors.h"
#include "config/units.h"
#include "config/yaml_tree.h"

static bool path_reserve(struct sl__config_ctx *c, size_t extra)
{
    if (c->path_len + extra + 1 <= c->path_cap)
        return true;
    size_t cap = c->path_cap ? c->path_cap : 64;
    while (cap < c->path_len + extra + 1)
        cap *= 2;
    char *p = realloc(c->path, cap);
    if (!p) {
        c->failed = true;
        return false;
    }
    c->path = p;
    c->path_cap = cap;
    return true;
}

size_t sl__config_path_push_key(struct sl__config_ctx *c, const char *key, size_t len)
{
    size_t saved = c->path_len;
    if (!path_reserve(c, len + 1))
        return saved;
    if (c->path_len)
        c->path[c->path_len++] = '.';
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)key[i];
        /* Keys come from the file; keep error lines single-line and printable. */
        c->path[c->path_len++] = (ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
    }
    c->path[c->path_len] = '\0';
    return saved;
}

size_t sl__config_path_push_index(struct sl__config_ctx *c, size_t index)
{
    size_t saved = c->path_len;
    char tmp[32];
    int n = snprintf(tmp, sizeof(tmp), "[%zu]", index);
    if (n < 0 || !path_reserve(c, (size_t)n))
        return saved;
    memcpy(c->path + c->path_len, tmp, (size_t)n + 1);
    c->path_len += (size_t)n;
    return saved;
}

void sl__config_path_pop(struct sl__config_ctx *c, size_t saved)
{
    c->path_len = saved;
    if (c->path)
        c->path[saved] = '\0';
}

void sl__config_error(struct sl__config_ctx *c, const struct sl_yaml_node *n, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    sl__config_errors_vadd(c->errs, n ? n->line : 1, n ? n->col : 1, c->path ? c->path : "", fmt,
                           ap);
    va_end(ap);
    c->failed = true;
}

char *sl__config_strndup(struct sl__config_ctx *c, const char *s, size_t len)
{
    char *p = malloc(len + 1);
    if (!p) {
        c->failed = true;
        sl__config_error(c, NULL, "out of memory");
        return NULL;
    }
    if (len)
        memcpy(p, s, len);
    p[len] = '\0';
    return p;
}

const char *sl__config_q(char *buf, size_t cap, const struct sl_yaml_node *n)
{
    if (n->kind != SL_YAML_SCALAR)
        return sl__config_quote(buf, cap, "", 0);
    return sl__config_quote(buf, cap, n->str, n->len);
}

const char *sl__config_scalar(struct sl__config_ctx *c, const struct sl_yaml_node *n,
                              const char *what)
{
    if (n->kind != SL_YAML_SCALAR || n->is_null) {
        sl__config_error(c, n, "expected %s, got %s", what, sl__config_yaml_kind_name(n));
        return NULL;
    }
    if (memchr(n->str, '\0', n->len)) {
        sl__config_error(c, n, "must not contain NUL bytes");
        return NULL;
    }
    return n->str;
}

static void store_uint(void *p, size_t size, uint64_t v)
{
    switch (size) {
    case 1: {
        uint8_t x = (uint8_t)v;
        memcpy(p, &x, 1);
        break;
    }
    case 2: {
        uint16_t x = (uint16_t)v;
        memcpy(p, &x, 2);
        break;
    }
    case 4: {
        uint32_t x = (uint32_t)v;
        memcpy(p, &x, 4);
        break;
    }
    default:
        memcpy(p, &v, sizeof(v));
        break;
    }
}

static void store_int(void *p, size_t size, int v)
{
    if (size == sizeof(int))
        memcpy(p, &v, sizeof(v));
    else
        store_uint(p, size, (uint64_t)v);
}

bool sl__config_schema_defaults(struct sl__config_ctx *c, const struct sl__schema_section *s,
                                void *base)
{
    bool ok = true;
    for (size_t i = 0; i < s->key_count; i++) {
        const struct sl__schema_key *k = &s->keys[i];
        char *field = (char *)base + k->offset;
        switch (k->type) {
        case SL__T_BOOL: {
            bool b = k->def != 0;
            memcpy(field, &b, sizeof(b));
            break;
        }
        case SL__T_UINT:
        case SL__T_DURATION:
        case SL__T_SIZE:
            store_uint(field, k->size, k->def);
            break;
        case SL__T_ENUM:
            store_int(field, k->size, (int)k->def);
            break;
        case SL__T_STRING:
            if (k->def_str) {
                size_t len = strlen(k->def_str);
                char *p = malloc(len + 1);
                if (!p) {
                    c->failed = true;
                    ok = false;
                    break;
                }
                memcpy(p, k->def_str, len + 1);
                memcpy(field, &p, sizeof(p));
                if (k->flags & SL__KEY_ALLOW_NUL)
                    memcpy((char *)base + k->count_offset, &len, sizeof(len));
            }
            break;
        case SL__T_SECTION:
            if (!(k->flags & SL__KEY_LAZY) && !sl__config_schema_defaults(c, k->section, field))
                ok = false;
            break;
        case SL__T_LIST:
        case SL__T_CUSTOM:
        case SL__T_STRLIST:
        case SL__T_STRMAP:
            break;
        }
    }
    return ok;
}

void sl__config_schema_free(const struct sl__schema_section *s, void *base)
{
    if (s->free)
        s->free(base);
    for (size_t i = 0; i < s->key_count; i++) {
        const struct sl__schema_key *k = &s->keys[i];
        char *field = (char *)base + k->offset;
        switch (k->type) {
        case SL__T_STRING: {
            char *p;
            memcpy(&p, field, sizeof(p));
            free(p);
            p = NULL;
            memcpy(field, &p, sizeof(p));
            break;
        }
        case SL__T_SECTION:
            sl__config_schema_free(k->section, field);
            break;
        case SL__T_LIST: {
            char *arr;
            size_t count;
            memcpy(&arr, field, sizeof(arr));
            memcpy(&count, (char *)base + k->count_offset, sizeof(count));
            for (size_t j = 0; arr && j < count; j++)
                sl__config_schema_free(k->section, arr + j * k->section->elem_size);
            free(arr);
            arr = NULL;
            count = 0;
            memcpy(field, &arr, sizeof(arr));
            memcpy((char *)base + k->count_offset, &count, sizeof(count));
            break;
        }
        case SL__T_STRLIST: {
            char **arr;
            size_t count;
            memcpy(&arr, field, sizeof(arr));
            memcpy(&count, (char *)base + k->count_offset, sizeof(count));
            for (size_t j = 0; arr && j < count; j++)
                free(arr[j]);
            free(arr);
            arr = NULL;
            count = 0;
            memcpy(field, &arr, sizeof(arr));
            memcpy((char *)base + k->count_offset, &count, sizeof(count));
            break;
        }
        case SL__T_STRMAP: {
            struct sl_header_pair *arr;
            size_t count;
            memcpy(&arr, field, sizeof(arr));
            memcpy(&count, (char *)base + k->count_offset, sizeof(count));
            for (size_t j = 0; arr && j < count; j++) {
                free(arr[j].name);
                free(arr[j].value);
            }
            free(arr);
            arr = NULL;
            count = 0;
            memcpy(field, &arr, sizeof(arr));
            memcpy((char *)base + k->count_offset, &count, sizeof(count));
            break;
        }
        default:
            break;
        }
    }
}

static void set_strlist(struct sl__config_ctx *c, const struct sl__schema_key *k,
                        const struct sl_yaml_node *n, char *field, void *base)
{
    char buf[256];
    const struct sl_yaml_node *one[1] = {n};
    const struct sl_yaml_node *const *items = one;
    size_t count = 1;
    if (n->kind == SL_YAML_SEQ) {
        items = (const struct sl_yaml_node *const *)n->items;
        count = n->count;
    } else if (n->kind != SL_YAML_SCALAR || n->is_null) {
        sl__config_error(c, n, "expected a list of strings, got %s", sl__config_yaml_kind_name(n));
        return;
    }
    if (count < k->min) {
        sl__config_error(c, n, "must contain at least %llu %s", (unsigned long long)k->min,
                         k->min == 1 ? "entry" : "entries");
        return;
    }
    char **arr = count ? calloc(count, sizeof(*arr)) : NULL;
    if (count && !arr) {
        sl__config_error(c, n, "out of memory");
        return;
    }
    size_t stored = 0;
    memcpy(field, &arr, sizeof(arr));
    memcpy((char *)base + k->count_offset, &stored, sizeof(stored));
    for (size_t i = 0; i < count; i++) {
        const struct sl_yaml_node *item = items[i];
        size_t saved = n->kind == SL_YAML_SEQ ? sl__config_path_push_index(c, i) : c->path_len;
        const char *s = sl__config_scalar(c, item, "a string");
        const char *msg = NULL;
        if (s && memchr(s, '\0', item->len))
            msg = "must not contain NUL bytes";
        else if (s && (k->flags & SL__KEY_NONEMPTY) && item->len == 0)
            msg = "must not be empty";
        else if (s && k->check)
            msg = k->check(s, item->len, buf, sizeof(buf));
        if (msg)
            sl__config_error(c, item, "%s", msg);
        else if (s && (arr[stored] = sl__config_strndup(c, s, item->len)))
            stored++;
        sl__config_path_pop(c, saved);
    }
    memcpy((char *)base + k->count_offset, &stored, sizeof(stored));
}

static void set_strmap(struct sl__config_ctx *c, const struct sl__schema_key *k,
                       const struct sl_yaml_node *n, char *field, void *base)
{
    char buf[256];
    if (n->kind != SL_YAML_MAP) {
        sl__config_error(c, n, "expected a mapping, got %s", sl__config_yaml_kind_name(n));
        return;
    }
    struct sl_header_pair *arr = n->count ? calloc(n->count, sizeof(*arr)) : NULL;
    if (n->count && !arr) {
        sl__config_error(c, n, "out of memory");
        return;
    }
    size_t stored = 0;
    memcpy(field, &arr, sizeof(arr));
    memcpy((char *)base + k->count_offset, &stored, sizeof(stored));
    for (size_t i = 0; i < n->count; i++) {
        const struct sl_yaml_node *key = n->keys[i], *val = n->items[i];
        /* A mapping or list used as a key has no text. */
        bool text_key = key->kind == SL_YAML_SCALAR && key->str && !key->is_null;
        const char *kstr = text_key ? key->str : "";
        size_t klen = text_key ? key->len : 0;
        size_t saved = sl__config_path_push_key(c, kstr, klen);
        const char *s = sl__config_scalar(c, val, "a string");
        const char *msg = NULL;
        if (klen == 0 || memchr(kstr, '\0', klen))
            msg = "keys must be non-empty strings";
        else if (s && memchr(s, '\0', val->len))
            msg = "must not contain NUL bytes";
        else if (s && k->check)
            msg = k->check(s, val->len, buf, sizeof(buf));
        if (msg) {
            sl__config_error(c, msg[0] == 'k' ? key : val, "%s", msg);
        } else if (s) {
            arr[stored].name = sl__config_strndup(c, kstr, klen);
            arr[stored].value = sl__config_strndup(c, s, val->len);
            if (arr[stored].name && arr[stored].value)
                stored++;
            else {
                free(arr[stored].name);
                free(arr[stored].value);
                arr[stored].name = arr[stored].value = NULL;
            }
        }
        sl__config_path_pop(c, saved);
    }
    memcpy((char *)base + k->count_offset, &stored, sizeof(stored));
}

/* Edit distance, for "did you mean" hints on misspelt keys. */
static size_t edit_distance(const char *a, size_t alen, const char *b, size_t blen)
{
    size_t row[65];
    if (alen > 64 || blen > 64)
        return (size_t)-1;
    for (size_t j = 0; j <= blen; j++)
        row[j] = j;
    for (size_t i = 1; i <= alen; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= blen; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[blen];
}

static void unknown_key(struct sl__config_ctx *c, const struct sl__schema_section *s,
                        const struct sl_yaml_node *key)
{
    char q[160];
    const char *best = NULL;
    size_t best_d = 3; /* farther than two edits is a different word, not a typo */
    for (size_t i = 0; i < s->key_count; i++) {
        size_t d = edit_distance(key->str, key->len, s->keys[i].name, strlen(s->keys[i].name));
        if (d < best_d && d < strlen(s->keys[i].name)) {
            best_d = d;
            best = s->keys[i].name;
        }
    }
    size_t saved = sl__config_path_push_key(c, key->str, key->len);
    if (best)
        sl__config_error(c, key, "unknown key %s (did you mean \"%s\"?)",
                         sl__config_q(q, sizeof(q), key), best);
    else
        sl__config_error(c, key, "unknown key %s", sl__config_q(q, sizeof(q), key));
    sl__config_path_pop(c, saved);
}

static void range_text(char *buf, size_t cap, enum sl__schema_type t, uint64_t v)
{
    if (t == SL__T_DURATION)
        sl__config_format_duration(v, buf, cap);
    else if (t == SL__T_SIZE)
        sl__config_format_size(v, buf, cap);
    else
        snprintf(buf, cap, "%llu", (unsigned long long)v);
}

static bool check_range(struct sl__config_ctx *c, const struct sl__schema_key *k,
                        const struct sl_yaml_node *n, uint64_t v)
{
    if (v >= k->min && v <= k->max)
        return true;
    /* The value already parsed as a number, so it is printed as written, unquoted. */
    char lo[32], hi[32];
    range_text(lo, sizeof(lo), k->type, k->min);
    range_text(hi, sizeof(hi), k->type, k->max);
    if (k->max == UINT64_MAX)
        sl__config_error(c, n, "%s is out of range (at least %s)", n->str, lo);
    else
        sl__config_error(c, n, "%s is out of range %s..%s", n->str, lo, hi);
    return false;
}

static void set_string(struct sl__config_ctx *c, const struct sl__schema_key *k,
                       const struct sl_yaml_node *n, char *field, void *base)
{
    if (n->kind != SL_YAML_SCALAR || n->is_null) {
        sl__config_error(c, n, "expected a string, got %s", sl__config_yaml_kind_name(n));
        return;
    }
    if (!(k->flags & SL__KEY_ALLOW_NUL) && memchr(n->str, '\0', n->len)) {
        sl__config_error(c, n, "must not contain NUL bytes");
        return;
    }
    if ((k->flags & SL__KEY_NONEMPTY) && n->len == 0) {
        sl__config_error(c, n, "must not be empty");
        return;
    }
    if (k->check) {
        char buf[256];
        const char *msg = k->check(n->str, n->len, buf, sizeof(buf));
        if (msg) {
            sl__config_error(c, n, "%s", msg);
            return;
        }
    }
    char *old;
    memcpy(&old, field, sizeof(old));
    free(old);
    char *p = sl__config_strndup(c, n->str, n->len);
    memcpy(field, &p, sizeof(p));
    if (k->flags & SL__KEY_ALLOW_NUL) {
        size_t len = p ? n->len : 0;
        memcpy((char *)base + k->count_offset, &len, sizeof(len));
    }
}

static void set_enum(struct sl__config_ctx *c, const struct sl__schema_key *k,
                     const struct sl_yaml_node *n, char *field)
{
    const char *s = sl__config_scalar(c, n, "a string");
    if (!s)
        return;
    char list[256] = "";
    size_t o = 0;
    for (int i = 0; k->enum_names[i]; i++) {
        if (strcmp(s, k->enum_names[i]) == 0) {
            store_int(field, k->size, i);
            return;
        }
        int w = snprintf(list + o, sizeof(list) - o, "%s%s", i ? ", " : "", k->enum_names[i]);
        if (w > 0 && (size_t)w < sizeof(list) - o)
            o += (size_t)w;
    }
    char q[160];
    sl__config_error(c, n, "expected one of %s, got %s", list, sl__config_q(q, sizeof(q), n));
}

static void set_list(struct sl__config_ctx *c, const struct sl__schema_key *k,
                     const struct sl_yaml_node *n, char *field, void *base)
{
    if (n->kind != SL_YAML_SEQ) {
        sl__config_error(c, n, "expected a list, got %s", sl__config_yaml_kind_name(n));
        return;
    }
    if (n->count < k->min) {
        sl__config_error(c, n, "must contain at least %llu %s", (unsigned long long)k->min,
                         k->min == 1 ? "entry" : "entries");
        return;
    }
    if (n->count == 0)
        return;
    const struct sl__schema_section *s = k->section;
    char *arr = calloc(n->count, s->elem_size);
    if (!arr) {
        sl__config_error(c, n, "out of memory");
        return;
    }
    size_t count = n->count;
    /* Published before parsing so a failure part-way still frees through the schema. */
    memcpy(field, &arr, sizeof(arr));
    memcpy((char *)base + k->count_offset, &count, sizeof(count));
    for (size_t i = 0; i < count; i++) {
        void *elem = arr + i * s->elem_size;
        const struct sl_yaml_node *item = n->items[i];
        size_t saved = sl__config_path_push_index(c, i);
        sl__config_schema_defaults(c, s, elem);
        if (s->init)
            s->init(c, elem, i);
        if (item->kind == SL_YAML_SCALAR && !item->is_null && s->from_scalar)
            s->from_scalar(c, item, elem);
        else
            sl__config_schema_apply(c, s, item, elem);
        sl__config_path_pop(c, saved);
    }
}

static void apply_key(struct sl__config_ctx *c, const struct sl__schema_key *k,
                      const struct sl_yaml_node *n, void *base)
{
    char *field = (char *)base + k->offset;
    char q[160];
    const char *s;
    uint64_t v;
    switch (k->type) {
    case SL__T_BOOL:
        if (!(s = sl__config_scalar(c, n, "true or false")))
            return;
        if (strcmp(s, "true") == 0 || strcmp(s, "false") == 0) {
            bool b = s[0] == 't';
            memcpy(field, &b, sizeof(b));
        } else {
            sl__config_error(c, n, "expected true or false, got %s", sl__config_q(q, sizeof(q), n));
        }
        return;
    case SL__T_UINT: {
        if (!(s = sl__config_scalar(c, n, "an integer")))
            return;
        size_t i = 0;
        v = 0;
        for (; s[i] >= '0' && s[i] <= '9' && i < 20; i++) {
            uint64_t d = (uint64_t)(s[i] - '0');
            if (v > (UINT64_MAX - d) / 10)
                break;
            v = v * 10 + d;
        }
        if (i == 0 || s[i] != '\0') {
            sl__config_error(c, n, "expected an integer, got %s", sl__config_q(q, sizeof(q), n));
            return;
        }
        if (check_range(c, k, n, v))
            store_uint(field, k->size, v);
        return;
    }
    case SL__T_DURATION:
        if (!(s = sl__config_scalar(c, n, "a duration")))
            return;
        if (n->len > 0 && s[n->len - 1] >= '0' && s[n->len - 1] <= '9') {
            /* A bare number is ambiguous (seconds? milliseconds?); demand the unit. */
            sl__config_error(c, n, "invalid duration %s: add a unit (ms, s, m or h), e.g. 10s",
                             sl__config_q(q, sizeof(q), n));
            return;
        }
        if (sl_config_parse_duration(s, &v) != 0) {
            sl__config_error(c, n, "invalid duration %s: use a number with ms, s, m or h, e.g. 10s",
                             sl__config_q(q, sizeof(q), n));
            return;
        }
        if (check_range(c, k, n, v))
            store_uint(field, k->size, v);
        return;
    case SL__T_SIZE:
        if (!(s = sl__config_scalar(c, n, "a size")))
            return;
        if (sl_config_parse_size(s, &v) != 0) {
            sl__config_error(c, n,
                             "invalid size %s: use bytes or a number with KiB, MiB, GiB "
                             "(1024-based) or KB, MB, GB (1000-based)",
                             sl__config_q(q, sizeof(q), n));
            return;
        }
        if (check_range(c, k, n, v))
            store_uint(field, k->size, v);
        return;
    case SL__T_STRING:
        set_string(c, k, n, field, base);
        return;
    case SL__T_ENUM:
        set_enum(c, k, n, field);
        return;
    case SL__T_SECTION:
        if (k->flags & SL__KEY_LAZY)
            sl__config_schema_defaults(c, k->section, field);
        sl__config_schema_apply(c, k->section, n, field);
        return;
    case SL__T_LIST:
        set_list(c, k, n, field, base);
        return;
    case SL__T_CUSTOM:
        k->set(c, k, n, base);
        return;
    case SL__T_STRLIST:
        set_strlist(c, k, n, field, base);
        return;
    case SL__T_STRMAP:
        set_strmap(c, k, n, field, base);
        return;
    }
}

void sl__config_schema_apply(struct sl__config_ctx *c, const struct sl__schema_section *s,
                             const struct sl_yaml_node *n, void *base)
{
    const struct sl_yaml_node *found[SL__SCHEMA_MAX_KEYS] = {0};
    if (n->kind != SL_YAML_MAP) {
        sl__config_error(c, n, "expected a mapping, got %s", sl__config_yaml_kind_name(n));
        return;
    }
    for (size_t i = 0; i < n->count; i++) {
        const struct sl_yaml_node *key = n->keys[i];
        size_t j = 0;
        for (; j < s->key_count && j < SL__SCHEMA_MAX_KEYS; j++)
            if (strlen(s->keys[j].name) == key->len &&
                memcmp(s->keys[j].name, key->str, key->len) == 0)
                break;
        if (j == s->key_count || j == SL__SCHEMA_MAX_KEYS)
            unknown_key(c, s, key);
        else
            found[j] = n->items[i];
    }
    /* Table order, not file order: a section may depend on one read before it (listeners
     * inherit the top-level limits wherever `limits:` appears). Errors are sorted later. */
    for (size_t j = 0; j < s->key_count && j < SL__SCHEMA_MAX_KEYS; j++) {
        const struct sl__schema_key *k = &s->keys[j];
        if (found[j]) {
            size_t saved = sl__config_path_push_key(c, k->name, strlen(k->name));
            apply_key(c, k, found[j], base);
            sl__config_path_pop(c, saved);
        } else if (k->flags & SL__KEY_REQUIRED) {
            sl__config_error(c, n, "missing required key \"%s\"", k->name);
        }
    }
    if (s->check)
        s->check(c, n, base);
}
