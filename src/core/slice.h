#ifndef SL_CORE_SLICE_H
#define SL_CORE_SLICE_H

#include <stdbool.h>
#include <stddef.h>
#include <string.h>

/* A borrowed byte range. Never owns memory; valid as long as whatever it points into. */
struct sl_slice {
    const char *ptr;
    size_t len;
};

#define SL_SLICE_LIT(s) ((struct sl_slice){(s), sizeof(s) - 1})

static inline struct sl_slice sl_slice_make(const char *p, size_t n)
{
    return (struct sl_slice){p, n};
}

static inline struct sl_slice sl_slice_cstr(const char *s)
{
    return (struct sl_slice){s, s ? strlen(s) : 0};
}

static inline bool sl_slice_eq(struct sl_slice a, struct sl_slice b)
{
    return a.len == b.len && (a.len == 0 || memcmp(a.ptr, b.ptr, a.len) == 0);
}

static inline char sl_ascii_lower(char c)
{
    return (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
}

/* HTTP optional white space (OWS, RFC 9110): a space or a horizontal tab. */
static inline bool sl_ascii_is_ows(char c)
{
    return c == ' ' || c == '\t';
}

/* ASCII case-insensitive equality (header names, tokens). */
static inline bool sl_slice_ieq(struct sl_slice a, struct sl_slice b)
{
    if (a.len != b.len)
        return false;
    for (size_t i = 0; i < a.len; i++)
        if (sl_ascii_lower(a.ptr[i]) != sl_ascii_lower(b.ptr[i]))
            return false;
    return true;
}

static inline bool sl_slice_ieq_cstr(struct sl_slice a, const char *s)
{
    return sl_slice_ieq(a, sl_slice_cstr(s));
}

static inline bool sl_slice_has_prefix(struct sl_slice s, struct sl_slice prefix)
{
    return s.len >= prefix.len && memcmp(s.ptr, prefix.ptr, prefix.len) == 0;
}

#endif
