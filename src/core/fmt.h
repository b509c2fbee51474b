#ifndef SL_CORE_FMT_H
#define SL_CORE_FMT_H

#include <stddef.h>
#include <stdint.h>

/* Writes a message into a caller's error buffer (`err` may be NULL or `err_len` 0: then
 * nothing is written). For the "char *err, size_t err_len" convention of set-up functions. */
void sl_fmt_err(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/*
 * Number formatting for the hot path (Content-Length, chunk sizes): snprintf costs a locale-
 * aware format parse per call, which showed up in profiles at one call per response.
 * Each writes the digits without a NUL into `out` (at least 20 bytes for decimal, 16 for hex)
 * and returns how many were written.
 */
static inline size_t sl_fmt_u64(char *out, uint64_t v)
{
    char tmp[20];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

static inline size_t sl_fmt_hex(char *out, uint64_t v)
{
    static const char digits[] = "0123456789abcdef";
    char tmp[16];
    size_t n = 0;
    do {
        tmp[n++] = digits[v & 15];
        v >>= 4;
    } while (v);
    for (size_t i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

/* The value of one hex digit (either case), or -1. */
static inline int sl_hex_digit(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c |= 0x20; /* ASCII lower case; leaves digits' neighbours outside a-f */
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/*
 * Length of the UTF-8 sequence at s[0..n) when it is valid (RFC 3629: no overlong forms, no
 * surrogates, nothing above U+10FFFF; an ASCII byte, NUL included, is 1), or 0 when it is
 * invalid or cut short.
 */
size_t sl_utf8_seq_len(const unsigned char *s, size_t n);

#endif
