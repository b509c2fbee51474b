#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/h1_parse.h"

/*
 * Chunked bodies fed whole and in pseudo-random pieces (sizes from a PRNG seeded by the first
 * byte): same verdict, same error, same decoded bytes, same end; decoded bytes never exceed
 * the input and each slice lies inside what was consumed.
 */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct out {
    enum sl_status st;
    enum sl_h1_err err;
    size_t used;
    size_t data_len;
    char *data;
};

static void check(int cond, const char *what)
{
    if (!cond) {
        fprintf(stderr, "invariant failed: %s\n", what);
        abort();
    }
}

/* Feeds one piece through an exact-size copy, looping while the decoder says SL_OK. */
static void feed(struct sl_h1_chunked *ch, const char *piece, size_t n, struct out *o)
{
    char *b = malloc(n ? n : 1);
    check(b != NULL, "oom");
    memcpy(b, piece, n);
    size_t pos = 0;
    for (;;) {
        size_t used = (size_t)-1;
        struct sl_slice d = {NULL, (size_t)-1};
        enum sl_h1_err err = SL_H1_ERR_NONE;
        enum sl_status s = sl_h1_chunked_parse(ch, b + pos, n - pos, &used, &d, &err);
        check(used <= n - pos, "consumed bound");
        check(d.len <= used, "data within consumed");
        check(d.len == 0 || (d.ptr >= b + pos && d.ptr + d.len <= b + pos + used),
              "data slice inside input");
        memcpy(o->data + o->data_len, d.ptr, d.len);
        o->data_len += d.len;
        pos += used;
        o->used += used;
        check(o->data_len <= o->used, "decoded never exceeds input");
        o->st = s;
        if (s == SL_ERROR) {
            check(err == SL_H1_ERR_BAD_CHUNK || err == SL_H1_ERR_CHUNK_TOO_LARGE, "chunk err");
            o->err = err;
        }
        if (s == SL_AGAIN)
            check(pos == n, "AGAIN consumes everything");
        if (s != SL_OK)
            break;
        check(used > 0, "progress");
    }
    free(b);
}

static uint32_t next(uint32_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 17;
    *x ^= *x << 5;
    return *x;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint32_t seed = data[0] * 2654435761u + 1;
    const char *in = (const char *)data + 1;
    size--;

    struct out w = {.data = malloc(size + 1)};
    struct out p = {.data = malloc(size + 1)};
    check(w.data && p.data, "oom");

    struct sl_h1_chunked ch;
    sl_h1_chunked_init(&ch);
    feed(&ch, in, size, &w);
    /* finished decoders stay finished and consume nothing */
    if (w.st == SL_DONE || w.st == SL_ERROR) {
        size_t used = 1;
        struct sl_slice d;
        enum sl_h1_err err = SL_H1_ERR_NONE;
        check(sl_h1_chunked_parse(&ch, "0\r\n\r\n", 5, &used, &d, &err) == w.st, "sticky");
        check(used == 0 && d.len == 0, "sticky consumes nothing");
    }

    struct sl_h1_chunked pc = {0};
    size_t pos = 0;
    do {
        size_t n = next(&seed) % 17;
        if (next(&seed) % 8 == 0)
            n = next(&seed) % 300;
        if (n > size - pos)
            n = size - pos;
        feed(&pc, in + pos, n, &p);
        pos += n;
    } while (pos < size && p.st != SL_DONE && p.st != SL_ERROR);

    check(w.st == p.st, "same status");
    check(w.st != SL_ERROR || w.err == p.err, "same error");
    check(w.data_len == p.data_len && memcmp(w.data, p.data, w.data_len) == 0, "same data");
    check(w.st != SL_DONE || w.used == p.used, "same end");
    free(w.data);
    free(p.data);
    return 0;
}
