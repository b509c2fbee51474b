#include "config/errors.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int sl__config_errors_vadd(struct sl_config_errors *errs, int line, int col, const char *path,
                           const char *fmt, va_list ap)
{
    /* Capacity is implied by the count (8, then powers of two), so the public struct needs no
     * capacity field: grow exactly when the count reaches it. */
    size_t n = errs->count;
    if (n == 0 || (n >= 8 && (n & (n - 1)) == 0)) {
        size_t cap = n ? n * 2 : 8;
        struct sl_config_error *items = realloc(errs->items, cap * sizeof(*items));
        if (!items)
            return -ENOMEM;
        errs->items = items;
    }
    char msg[512];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    char *p = strdup(path && *path ? path : "(root)");
    char *m = strdup(msg);
    if (!p || !m) {
        free(p);
        free(m);
        return -ENOMEM;
    }
    struct sl_config_error *e = &errs->items[errs->count++];
    e->line = line > 0 ? line : 1;
    e->col = col > 0 ? col : 1;
    e->path = p;
    e->message = m;
    return 0;
}

int sl__config_errors_add(struct sl_config_errors *errs, int line, int col, const char *path,
                          const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = sl__config_errors_vadd(errs, line, col, path, fmt, ap);
    va_end(ap);
    return rc;
}

static int pos_cmp(const struct sl_config_error *a, const struct sl_config_error *b)
{
    if (a->line != b->line)
        return a->line < b->line ? -1 : 1;
    if (a->col != b->col)
        return a->col < b->col ? -1 : 1;
    return 0;
}

void sl__config_errors_sort(struct sl_config_errors *errs)
{
    /* Insertion sort: stable, and the list is nearly sorted already because sections are
     * walked in file order; only cross-reference errors found later move back. */
    for (size_t i = 1; i < errs->count; i++) {
        struct sl_config_error e = errs->items[i];
        size_t j = i;
        while (j > 0 && pos_cmp(&errs->items[j - 1], &e) > 0) {
            errs->items[j] = errs->items[j - 1];
            j--;
        }
        errs->items[j] = e;
    }
}

const char *sl__config_quote(char *buf, size_t cap, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    const size_t limit = 64;
    if (cap < 16) {
        if (cap)
            buf[0] = '\0';
        return buf;
    }
    buf[o++] = '"';
    for (size_t i = 0; i < len; i++) {
        if (i == limit || o + 8 >= cap) {
            buf[o++] = '.';
            buf[o++] = '.';
            buf[o++] = '.';
            break;
        }
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            buf[o++] = '\\';
            buf[o++] = (char)c;
        } else if (c < 0x20 || c == 0x7f) {
            buf[o++] = '\\';
            if (c == '\n') {
                buf[o++] = 'n';
            } else if (c == '\r') {
                buf[o++] = 'r';
            } else if (c == '\t') {
                buf[o++] = 't';
            } else {
                buf[o++] = 'x';
                buf[o++] = hex[c >> 4];
                buf[o++] = hex[c & 15];
            }
        } else {
            buf[o++] = (char)c;
        }
    }
    buf[o++] = '"';
    buf[o] = '\0';
    return buf;
}

void sl_config_errors_print(const struct sl_config_errors *errs, void *fp)
{
    FILE *f = fp;
    for (size_t i = 0; i < errs->count; i++) {
        const struct sl_config_error *e = &errs->items[i];
        fprintf(f, "%s:%d:%d: %s: %s\n", errs->file ? errs->file : "<config>", e->line, e->col,
                e->path, e->message);
    }
}

void sl_config_errors_dispose(struct sl_config_errors *errs)
{
    if (!errs)
        return;
    for (size_t i = 0; i < errs->count; i++) {
        free(errs->items[i].path);
        free(errs->items[i].message);
    }
    free(errs->items);
    free(errs->file);
    errs->items = NULL;
    errs->file = NULL;
    errs->count = 0;
}
