#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/buf.h"
#include "core/bpool.h"
#include "core/transport.h"
#include "http/h1_body.h"
#include "http/h1_parse.h"

#define BLOCK 4096

/* Deterministic PRNG so a failure reproduces. */
static uint64_t rng_state = 0x2545f4914f6cdd1dull;

static uint64_t rng_next(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    rng_state = x;
    return x;
}

/* Uniform in [lo, hi]. */
static size_t rng_range(size_t lo, size_t hi)
{
    return lo + (size_t)(rng_next() % (uint64_t)(hi - lo + 1));
}

static void append(struct sl_buf *b, const char *s, size_t n)
{
    assert_true(sl_buf_append(b, s, n));
}

static void append_str(struct sl_buf *b, const char *s)
{
    append(b, s, strlen(s));
}

/* ---- reader: Content-Length -------------------------------------------------------------- */

static void test_reader_length_split_and_leftover(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    struct sl_buf in = {0};
    assert_int_equal(sl_buf_acquire(&in, &pool), 0);
    struct sl_h1_body_reader r;
    sl_h1_body_reader_init(&r, SL_H1_BODY_LENGTH, 11);
    assert_false(r.done);
    struct sl_slice d;
    enum sl_h1_err err = SL_H1_ERR_NONE;

    /* Nothing yet. */
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_AGAIN);
    assert_int_equal(d.len, 0);

    append_str(&in, "hello");
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_OK);
    assert_int_equal(d.len, 5);
    assert_ptr_equal(d.ptr, sl_buf_head(&in));
    assert_memory_equal(d.ptr, "hello", 5);
    /* Peeking again without consuming returns the same bytes. */
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_OK);
    assert_int_equal(d.len, 5);
    sl_h1_body_reader_consume(&r, &in, 5);
    assert_false(r.done);
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_AGAIN);

    /* The rest of the body plus the next message in one read. */
    append_str(&in, " worldGET / HTTP/1.1\r\n");
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_OK);
    assert_int_equal(d.len, 6);
    assert_memory_equal(d.ptr, " world", 6);
    sl_h1_body_reader_consume(&r, &in, 6);
    assert_true(r.done);
    assert_int_equal(r.total, 11);
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_DONE);
    assert_int_equal(d.len, 0);
    /* The next message's bytes were left alone. */
    assert_int_equal(sl_buf_len(&in), strlen("GET / HTTP/1.1\r\n"));
    assert_memory_equal(sl_buf_head(&in), "GET / HTTP/1.1\r\n", sl_buf_len(&in));
    /* eof after the end is not an error. */
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, true, &d, &err), SL_DONE);
    sl_buf_release(&in, &pool);
    sl_bpool_dispose(&pool);
}

static void test_reader_length_partial_consume(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    struct sl_buf in = {0};
    assert_int_equal(sl_buf_acquire(&in, &pool), 0);
    struct sl_h1_body_reader r;
    sl_h1_body_reader_init(&r, SL_H1_BODY_LENGTH, 8);
    struct sl_slice d;
    enum sl_h1_err err = SL_H1_ERR_NONE;
    append_str(&in, "abcdefghNEXT");
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_OK);
    assert_int_equal(d.len, 8); /* never more than the body */
    sl_h1_body_reader_consume(&r, &in, 3);
    assert_false(r.done);
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_OK);
    assert_int_equal(d.len, 5);
    assert_ptr_equal(d.ptr, sl_buf_head(&in));
    assert_memory_equal(d.ptr, "defgh", 5);
    /* Consuming more than pending is clamped to pending. */
    sl_h1_body_reader_consume(&r, &in, 100);
    assert_true(r.done);
    assert_int_equal(r.total, 8);
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_DONE);
    assert_int_equal(sl_buf_len(&in), 4);
    assert_memory_equal(sl_buf_head(&in), "NEXT", 4);
    sl_buf_release(&in, &pool);
    sl_bpool_dispose(&pool);
}

/* Every split of body + next message into two reads. */
static void test_reader_length_every_split(void **state)
{
    (void)state;
    static const char body[] = "The quick brown fox jumps over the lazy dog";
    static const char next[] = "POST /x HTTP/1.1\r\n";
    char wire[128];
    size_t blen = sizeof body - 1, nlen = sizeof next - 1, wlen = blen + nlen;
    memcpy(wire, body, blen);
    memcpy(wire + blen, next, nlen);
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    for (size_t k = 0; k <= wlen; k++) {
        struct sl_buf in = {0};
        assert_int_equal(sl_buf_acquire(&in, &pool), 0);
        struct sl_h1_body_reader r;
        sl_h1_body_reader_init(&r, SL_H1_BODY_LENGTH, blen);
        char got[128];
        size_t got_len = 0;
        enum sl_status st = SL_AGAIN;
        for (int round = 0; round < 2; round++) {
            if (round == 0)
                append(&in, wire, k);
            else
                append(&in, wire + k, wlen - k);
            for (;;) {
                struct sl_slice d;
                enum sl_h1_err err = SL_H1_ERR_NONE;
                st = sl_h1_body_reader_peek(&r, &in, false, &d, &err);
                if (st != SL_OK)
                    break;
                assert_ptr_equal(d.ptr, sl_buf_head(&in));
                assert_true(got_len + d.len <= blen);
                memcpy(got + got_len, d.ptr, d.len);
                got_len += d.len;
                sl_h1_body_reader_consume(&r, &in, d.len);
            }
            assert_true(st == SL_AGAIN || st == SL_DONE);
        }
        assert_int_equal(st, SL_DONE);
        assert_int_equal(got_len, blen);
        assert_memory_equal(got, body, blen);
        assert_int_equal(sl_buf_len(&in), nlen);
        assert_memory_equal(sl_buf_head(&in), next, nlen);
        sl_buf_release(&in, &pool);
    }
    sl_bpool_dispose(&pool);
}

static void test_reader_length_eof_and_zero(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    struct sl_buf in = {0};
    struct sl_h1_body_reader r;
    struct sl_slice d;
    enum sl_h1_err err = SL_H1_ERR_NONE;

    /* Truncated: the peer closed before Content-Length bytes arrived. */
    sl_h1_body_reader_init(&r, SL_H1_BODY_LENGTH, 10);
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, true, &d, &err), SL_ERROR);
    assert_int_not_equal(err, SL_H1_ERR_NONE);
    assert_int_equal(sl_buf_acquire(&in, &pool), 0);
    sl_h1_body_reader_init(&r, SL_H1_BODY_LENGTH, 10);
    append_str(&in, "abc");
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, true, &d, &err), SL_OK);
    assert_int_equal(d.len, 3);
    sl_h1_body_reader_consume(&r, &in, 3);
    err = SL_H1_ERR_NONE;
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, true, &d, &err), SL_ERROR);
    assert_int_not_equal(err, SL_H1_ERR_NONE);

    /* Content-Length: 0 is complete at once and consumes nothing. */
    append_str(&in, "NEXT");
    sl_h1_body_reader_init(&r, SL_H1_BODY_LENGTH, 0);
    assert_true(r.done);
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_DONE);
    assert_int_equal(sl_buf_len(&in), 4);

    /* No body at all. */
    sl_h1_body_reader_init(&r, SL_H1_BODY_NONE, 0);
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_DONE);
    assert_int_equal(sl_buf_len(&in), 4);
    sl_buf_release(&in, &pool);
    sl_bpool_dispose(&pool);
}

/* ---- reader: until close ----------------------------------------------------------------- */

static void test_reader_until_close(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    struct sl_buf in = {0};
    struct sl_h1_body_reader r;
    struct sl_slice d;
    enum sl_h1_err err = SL_H1_ERR_NONE;
    sl_h1_body_reader_init(&r, SL_H1_BODY_UNTIL_CLOSE, 0);
    /* No buffer held yet. */
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_AGAIN);
    assert_int_equal(sl_buf_acquire(&in, &pool), 0);
    append_str(&in, "abc");
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_OK);
    assert_int_equal(d.len, 3);
    assert_memory_equal(d.ptr, "abc", 3);
    sl_h1_body_reader_consume(&r, &in, 3);
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_AGAIN);
    /* Data that arrives together with the close is still delivered first. */
    append_str(&in, "de");
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, true, &d, &err), SL_OK);
    assert_int_equal(d.len, 2);
    sl_h1_body_reader_consume(&r, &in, 2);
    assert_false(r.done);
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, true, &d, &err), SL_DONE);
    assert_true(r.done);
    assert_int_equal(r.total, 5);
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, true, &d, &err), SL_DONE);
    sl_buf_release(&in, &pool);
    sl_bpool_dispose(&pool);
}

/* ---- reader: chunked --------------------------------------------------------------------- */

struct drive_result {
    enum sl_status st;
    enum sl_h1_err err;
    char *data; /* decoded */
    size_t data_len;
    char left[BLOCK]; /* bytes left in the buffer at the end */
    size_t left_len;
};

/*
 * Feeds `wire` into a bounded buffer in pieces (the first `first` bytes if nonzero, then
 * pieces of `piece` bytes, 0 = random 1..max_piece),
 * consuming each data slice in random portions (or whole, with `consume_all`), and checks
 * that every data slice starts at the buffer head. Ends when the reader is DONE or fails, or
 * all input is in and the reader wants more (then peeks once with `eof_at_end`).
 */
static void drive_reader(const char *wire, size_t wlen, size_t first, size_t piece,
                         size_t max_piece, bool consume_all, bool eof_at_end,
                         struct drive_result *res)
{
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    struct sl_buf in = {0};
    assert_int_equal(sl_buf_acquire(&in, &pool), 0);
    struct sl_h1_body_reader r;
    sl_h1_body_reader_init(&r, SL_H1_BODY_CHUNKED, 0);
    res->data = malloc(wlen + 1);
    assert_non_null(res->data);
    res->data_len = 0;
    res->err = SL_H1_ERR_NONE;
    size_t off = 0;
    size_t guard = 0;
    for (;;) {
        assert_true(++guard < 10 * wlen + 100);
        bool eof = eof_at_end && off == wlen;
        struct sl_slice d;
        enum sl_status st = sl_h1_body_reader_peek(&r, &in, eof, &d, &res->err);
        res->st = st;
        if (st == SL_OK) {
            assert_true(d.len > 0);
            assert_ptr_equal(d.ptr, sl_buf_head(&in));
            assert_true(d.len <= sl_buf_len(&in));
            size_t take = consume_all ? d.len : rng_range(1, d.len);
            assert_true(res->data_len + take <= wlen);
            memcpy(res->data + res->data_len, d.ptr, take);
            res->data_len += take;
            sl_h1_body_reader_consume(&r, &in, take);
            continue;
        }
        if (st == SL_DONE || st == SL_ERROR)
            break;
        assert_int_equal(st, SL_AGAIN);
        if (off == wlen) {
            if (eof_at_end)
                fail_msg("AGAIN with eof");
            break;
        }
        size_t n = piece ? piece : rng_range(1, max_piece);
        if (off == 0 && first)
            n = first;
        if (n > wlen - off)
            n = wlen - off;
        sl_buf_compact(&in);
        if (n > sl_buf_space(&in))
            n = sl_buf_space(&in);
        assert_true(n > 0); /* the reader must never leave the buffer full of framing */
        append(&in, wire + off, n);
        off += n;
    }
    /* Whatever was not fed is part of the leftover too. */
    res->left_len = 0;
    size_t bl = sl_buf_len(&in);
    assert_true(bl + (wlen - off) <= sizeof res->left);
    if (bl)
        memcpy(res->left, sl_buf_head(&in), bl);
    memcpy(res->left + bl, wire + off, wlen - off);
    res->left_len = bl + (wlen - off);
    sl_buf_release(&in, &pool);
    sl_bpool_dispose(&pool);
}

static void test_reader_chunked_basic(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    struct sl_buf in = {0};
    assert_int_equal(sl_buf_acquire(&in, &pool), 0);
    struct sl_h1_body_reader r;
    sl_h1_body_reader_init(&r, SL_H1_BODY_CHUNKED, 0);
    struct sl_slice d;
    enum sl_h1_err err = SL_H1_ERR_NONE;
    append_str(&in, "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT");
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_OK);
    /* The framing in front of the data is gone: the data is at the buffer head. */
    assert_ptr_equal(d.ptr, sl_buf_head(&in));
    assert_int_equal(d.len, 5);
    assert_memory_equal(d.ptr, "hello", 5);
    assert_int_equal(r.pending, 5);
    /* Partial consume: the rest is still pending at the head; no parsing in between. */
    sl_h1_body_reader_consume(&r, &in, 2);
    assert_int_equal(r.pending, 3);
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_OK);
    assert_int_equal(d.len, 3);
    assert_ptr_equal(d.ptr, sl_buf_head(&in));
    assert_memory_equal(d.ptr, "llo", 3);
    sl_h1_body_reader_consume(&r, &in, 3);
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_OK);
    assert_int_equal(d.len, 6);
    assert_ptr_equal(d.ptr, sl_buf_head(&in));
    assert_memory_equal(d.ptr, " world", 6);
    sl_h1_body_reader_consume(&r, &in, 6);
    assert_false(r.done);
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_DONE);
    assert_true(r.done);
    assert_int_equal(r.total, 11);
    /* Last chunk and trailers consumed; the next message stays. */
    assert_int_equal(sl_buf_len(&in), 4);
    assert_memory_equal(sl_buf_head(&in), "NEXT", 4);
    assert_int_equal(sl_h1_body_reader_peek(&r, &in, false, &d, &err), SL_DONE);
    assert_int_equal(sl_buf_len(&in), 4);
    sl_buf_release(&in, &pool);
    sl_bpool_dispose(&pool);
}

static void test_reader_chunked_every_split(void **state)
{
    (void)state;
    static const char wire[] = "5\r\nhello\r\n1;a=b\r\n,\r\nA\r\n 012345678\r\n0\r\nT: v\r\n\r\n"
                               "GET / HTTP/1.1\r\n";
    static const char body[] = "hello, 012345678";
    static const char next[] = "GET / HTTP/1.1\r\n";
    size_t wlen = sizeof wire - 1;
    struct drive_result res;
    /* Whole, byte by byte, and every piece size (which covers every first split). */
    for (size_t piece = 1; piece <= wlen; piece++) {
        for (int ca = 0; ca < 2; ca++) {
            drive_reader(wire, wlen, 0, piece, 0, ca == 1, false, &res);
            assert_int_equal(res.st, SL_DONE);
            assert_int_equal(res.data_len, sizeof body - 1);
            assert_memory_equal(res.data, body, sizeof body - 1);
            assert_int_equal(res.left_len, sizeof next - 1);
            assert_memory_equal(res.left, next, sizeof next - 1);
            free(res.data);
        }
    }
    /* Every split into two reads. */
    for (size_t k = 1; k < wlen; k++) {
        drive_reader(wire, wlen, k, wlen, 0, true, false, &res);
        assert_int_equal(res.st, SL_DONE);
        assert_int_equal(res.data_len, sizeof body - 1);
        assert_memory_equal(res.data, body, sizeof body - 1);
        assert_int_equal(res.left_len, sizeof next - 1);
        assert_memory_equal(res.left, next, sizeof next - 1);
        free(res.data);
    }
}

/* A random chunked message: random chunk sizes, some extensions, some trailers. */
static size_t make_chunked(const char *body, size_t blen, char *out, size_t cap, size_t max_chunk)
{
    size_t o = 0, i = 0;
    while (i < blen) {
        size_t n = rng_range(1, max_chunk);
        if (n > blen - i)
            n = blen - i;
        int m =
            snprintf(out + o, cap - o, (rng_next() & 3) == 0 ? "%zX;x=\"y\"\r\n" : "%zx\r\n", n);
        assert_true(m > 0 && (size_t)m < cap - o);
        o += (size_t)m;
        assert_true(o + n + 2 < cap);
        memcpy(out + o, body + i, n);
        o += n;
        memcpy(out + o, "\r\n", 2);
        o += 2;
        i += n;
    }
    const char *tail = (rng_next() & 1) ? "0\r\n\r\n" : "0\r\nA: b\r\nC-D: e f\r\n\r\n";
    size_t tl = strlen(tail);
    assert_true(o + tl < cap);
    memcpy(out + o, tail, tl);
    return o + tl;
}

static void test_reader_chunked_random(void **state)
{
    (void)state;
    enum { BODY_MAX = 20000 };
    char *body = malloc(BODY_MAX);
    char *wire = malloc(BODY_MAX * 8 + 256);
    assert_non_null(body);
    assert_non_null(wire);
    for (int iter = 0; iter < 300; iter++) {
        size_t blen = rng_range(0, iter < 200 ? 600 : BODY_MAX);
        for (size_t i = 0; i < blen; i++)
            body[i] = (char)rng_next();
        size_t max_chunk = rng_range(1, iter % 3 == 0 ? 8 : 5000);
        size_t wlen = make_chunked(body, blen, wire, BODY_MAX * 8, max_chunk);
        static const char next[] = "HTTP/1.1 200 OK\r\n";
        memcpy(wire + wlen, next, sizeof next - 1);
        wlen += sizeof next - 1;
        struct drive_result res;
        drive_reader(wire, wlen, 0, 0, rng_range(1, 3000), (rng_next() & 1) != 0, false, &res);
        assert_int_equal(res.st, SL_DONE);
        assert_int_equal(res.data_len, blen);
        if (blen)
            assert_memory_equal(res.data, body, blen);
        assert_int_equal(res.left_len, sizeof next - 1);
        assert_memory_equal(res.left, next, sizeof next - 1);
        free(res.data);
    }
    free(wire);
    free(body);
}

static void test_reader_chunked_malformed(void **state)
{
    (void)state;
    static const struct {
        const char *wire;
        enum sl_h1_err err;
    } bad[] = {
        {"5\r\nhelloX\r\n0\r\n\r\n", SL_H1_ERR_BAD_CHUNK},         /* data longer than size */
        {"5\r\nhell\r\n0\r\n\r\n", SL_H1_ERR_BAD_CHUNK},           /* data shorter than size */
        {"zz\r\nhello\r\n0\r\n\r\n", SL_H1_ERR_BAD_CHUNK},         /* not hex */
        {"\r\nhello\r\n0\r\n\r\n", SL_H1_ERR_BAD_CHUNK},           /* empty size */
        {"5 \r\nhello\r\n0\r\n\r\n", SL_H1_ERR_BAD_CHUNK},         /* whitespace */
        {"-5\r\nhello\r\n0\r\n\r\n", SL_H1_ERR_BAD_CHUNK},         /* sign */
        {"5\nhello\r\n0\r\n\r\n", SL_H1_ERR_BAD_CHUNK},            /* bare LF */
        {"5\r\nhello\n0\r\n\r\n", SL_H1_ERR_BAD_CHUNK},            /* bare LF after data */
        {"5;a\nb\r\nhello\r\n0\r\n\r\n", SL_H1_ERR_BAD_CHUNK},     /* LF in an extension */
        {"0\r\n\r\r", SL_H1_ERR_BAD_CHUNK},                        /* bad final CRLF */
        {"0\r\n folded\r\n\r\n", SL_H1_ERR_BAD_CHUNK},             /* obs-fold trailer */
        {"11111111111111111\r\nx\r\n", SL_H1_ERR_CHUNK_TOO_LARGE}, /* 17 hex digits */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        size_t wlen = strlen(bad[i].wire);
        for (size_t piece = 1; piece <= wlen; piece++) {
            struct drive_result res;
            drive_reader(bad[i].wire, wlen, 0, piece, 0, true, false, &res);
            if (res.st != SL_ERROR)
                fail_msg("case %zu piece %zu: status %d, want SL_ERROR", i, piece, res.st);
            assert_int_equal(res.err, bad[i].err);
            free(res.data);
        }
    }
}

static void test_reader_chunked_truncated_eof(void **state)
{
    (void)state;
    static const char *truncated[] = {
        "",         "5",          "5\r",           "5\r\n",
        "5\r\nhel", "5\r\nhello", "5\r\nhello\r",  "5\r\nhello\r\n",
        "0\r\n",    "0\r\n\r",    "0\r\nA: b\r\n",
    };
    for (size_t i = 0; i < sizeof truncated / sizeof truncated[0]; i++) {
        size_t wlen = strlen(truncated[i]);
        for (size_t piece = 1; piece <= (wlen ? wlen : 1); piece++) {
            struct drive_result res;
            drive_reader(truncated[i], wlen, 0, piece, 0, true, true, &res);
            if (res.st != SL_ERROR)
                fail_msg("case %zu (\"%s\"): status %d, want SL_ERROR", i, truncated[i], res.st);
            assert_int_equal(res.err, SL_H1_ERR_BAD_CHUNK);
            free(res.data);
        }
    }
    /* A complete body followed by eof is fine. */
    static const char full[] = "3\r\nabc\r\n0\r\n\r\n";
    struct drive_result res;
    drive_reader(full, sizeof full - 1, 0, 1, 0, true, true, &res);
    assert_int_equal(res.st, SL_DONE);
    assert_int_equal(res.data_len, 3);
    assert_int_equal(res.left_len, 0);
    free(res.data);
}

/* ---- writer ------------------------------------------------------------------------------ */

struct pair {
    int peer;
    struct sl_transport tr;
};

static void pair_open(struct pair *p, int sndbuf)
{
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    if (sndbuf > 0)
        assert_int_equal(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf), 0);
    sl_tcp_transport_init(&p->tr, sv[0]);
    p->peer = sv[1];
}

static void pair_close(struct pair *p)
{
    sl_transport_close(&p->tr);
    close(p->peer);
}

/* Reads at most `max` bytes that are available now from the peer. */
static size_t peer_read(struct pair *p, char *out, size_t max)
{
    size_t got = 0;
    while (got < max) {
        ssize_t r = read(p->peer, out + got, max - got);
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        assert_true(r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
        break;
    }
    return got;
}

static void assert_peer_bytes(struct pair *p, const char *want, size_t n)
{
    char got[8192];
    assert_true(n < sizeof got);
    size_t g = peer_read(p, got, sizeof got);
    if (g != n || memcmp(got, want, n) != 0)
        fail_msg("peer got %zu bytes \"%.*s\", want %zu \"%.*s\"", g, (int)g, got, n, (int)n, want);
}

static void set_head(struct sl_buf *head, struct sl_bpool *pool, const char *s)
{
    assert_int_equal(sl_buf_acquire(head, pool), 0);
    append_str(head, s);
}

static void test_writer_length(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    struct pair p;
    pair_open(&p, 0);
    struct sl_buf head = {0};
    static const char h[] = "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n";
    set_head(&head, &pool, h);
    struct sl_h1_body_writer w;
    sl_h1_body_writer_init(&w, SL_H1_W_LENGTH);
    size_t wrote = 99;
    bool flushed = false;
    assert_int_equal(sl_h1_body_writer_write(&w, &p.tr, &head, "hello", 5, false, &wrote, &flushed),
                     0);
    assert_int_equal(wrote, 5);
    assert_true(flushed);
    assert_int_equal(sl_buf_len(&head), 0); /* the head went first and was consumed */
    assert_int_equal(sl_h1_body_writer_write(&w, &p.tr, &head, " world", 6, true, &wrote, &flushed),
                     0);
    assert_int_equal(wrote, 6);
    assert_true(flushed);
    assert_int_equal(w.written, 11);
    char want[128];
    int m = snprintf(want, sizeof want, "%shello world", h);
    assert_peer_bytes(&p, want, (size_t)m);

    /* Nothing to write: flushed, nothing sent. NULL head is allowed. */
    assert_int_equal(sl_h1_body_writer_write(&w, &p.tr, NULL, NULL, 0, true, &wrote, &flushed), 0);
    assert_true(flushed);
    assert_int_equal(wrote, 0);
    assert_peer_bytes(&p, "", 0);

    /* Until-close mode frames nothing either. */
    sl_h1_body_writer_init(&w, SL_H1_W_CLOSE);
    assert_int_equal(sl_h1_body_writer_write(&w, &p.tr, NULL, "raw\r\n", 5, true, &wrote, &flushed),
                     0);
    assert_int_equal(wrote, 5);
    assert_peer_bytes(&p, "raw\r\n", 5);
    sl_buf_release(&head, &pool);
    pair_close(&p);
    sl_bpool_dispose(&pool);
}

static void test_writer_chunked_exact(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    struct pair p;
    pair_open(&p, 0);
    struct sl_buf head = {0};
    static const char h[] = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    set_head(&head, &pool, h);
    struct sl_h1_body_writer w;
    sl_h1_body_writer_init(&w, SL_H1_W_CHUNKED);
    size_t wrote = 0;
    bool flushed = false;
    char want[1024];

    assert_int_equal(sl_h1_body_writer_write(&w, &p.tr, &head, "hello", 5, false, &wrote, &flushed),
                     0);
    assert_int_equal(wrote, 5);
    assert_true(flushed);
    assert_int_equal(sl_buf_len(&head), 0);
    int m = snprintf(want, sizeof want, "%s5\r\nhello\r\n", h);
    assert_peer_bytes(&p, want, (size_t)m);

    char x[300];
    memset(x, 'x', sizeof x);
    assert_int_equal(sl_h1_body_writer_write(&w, &p.tr, &head, x, 300, false, &wrote, &flushed), 0);
    assert_int_equal(wrote, 300);
    assert_true(flushed);
    m = snprintf(want, sizeof want, "12c\r\n%.300s\r\n", x);
    assert_peer_bytes(&p, want, (size_t)m);

    /* No data, no fin: nothing to send. */
    assert_int_equal(sl_h1_body_writer_write(&w, &p.tr, &head, NULL, 0, false, &wrote, &flushed),
                     0);
    assert_true(flushed);
    assert_peer_bytes(&p, "", 0);

    /* fin: the last chunk. */
    assert_int_equal(sl_h1_body_writer_write(&w, &p.tr, &head, NULL, 0, true, &wrote, &flushed), 0);
    assert_true(flushed);
    assert_int_equal(wrote, 0);
    assert_true(w.finished);
    assert_peer_bytes(&p, "0\r\n\r\n", 5);
    assert_int_equal(w.written, 305);
    /* fin again: the last chunk is not repeated. */
    assert_int_equal(sl_h1_body_writer_write(&w, &p.tr, &head, NULL, 0, true, &wrote, &flushed), 0);
    assert_true(flushed);
    assert_peer_bytes(&p, "", 0);

    /* Data and fin in one call. */
    sl_h1_body_writer_init(&w, SL_H1_W_CHUNKED);
    assert_int_equal(sl_h1_body_writer_write(&w, &p.tr, NULL, "hello", 5, true, &wrote, &flushed),
                     0);
    assert_int_equal(wrote, 5);
    assert_true(flushed);
    assert_peer_bytes(&p, "5\r\nhello\r\n0\r\n\r\n", 15);

    /* Empty body: head then the last chunk only. */
    sl_h1_body_writer_init(&w, SL_H1_W_CHUNKED);
    append_str(&head, h);
    assert_int_equal(sl_h1_body_writer_write(&w, &p.tr, &head, NULL, 0, true, &wrote, &flushed), 0);
    assert_true(flushed);
    m = snprintf(want, sizeof want, "%s0\r\n\r\n", h);
    assert_peer_bytes(&p, want, (size_t)m);

    /* Head alone (no data, no fin): written, flushed, no framing. */
    sl_h1_body_writer_init(&w, SL_H1_W_CHUNKED);
    append_str(&head, h);
    assert_int_equal(sl_h1_body_writer_write(&w, &p.tr, &head, NULL, 0, false, &wrote, &flushed),
                     0);
    assert_true(flushed);
    assert_int_equal(sl_buf_len(&head), 0);
    assert_peer_bytes(&p, h, sizeof h - 1);

    sl_buf_release(&head, &pool);
    pair_close(&p);
    sl_bpool_dispose(&pool);
}

/* Writes `total` bytes as one call sequence (whole rest each time, fin), with a tiny send
 * buffer: every -EAGAIN is followed by draining the peer. The wire is fully determined:
 * head, one chunk of the whole size, last chunk. */
static void test_writer_chunked_partial_socket(void **state)
{
    (void)state;
    enum { TOTAL = 300000, HEAD = 3000 };
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    struct pair p;
    pair_open(&p, 1); /* the kernel's minimum */
    char *data = malloc(TOTAL);
    char *got = malloc(TOTAL + HEAD + 64);
    char *want = malloc(TOTAL + HEAD + 64);
    assert_non_null(data);
    assert_non_null(got);
    assert_non_null(want);
    for (size_t i = 0; i < TOTAL; i++)
        data[i] = (char)('a' + i % 26);
    struct sl_buf head = {0};
    assert_int_equal(sl_buf_acquire(&head, &pool), 0);
    char hb[HEAD];
    memset(hb, 'H', sizeof hb);
    append(&head, hb, sizeof hb);

    struct sl_h1_body_writer w;
    sl_h1_body_writer_init(&w, SL_H1_W_CHUNKED);
    size_t off = 0, got_len = 0;
    int eagain = 0, mid_chunk = 0;
    bool flushed = false;
    for (int iter = 0; !flushed; iter++) {
        assert_true(iter < 100000);
        size_t wrote = 0;
        int rc = sl_h1_body_writer_write(&w, &p.tr, &head, data + off, TOTAL - off, true, &wrote,
                                         &flushed);
        off += wrote;
        assert_true(off <= TOTAL);
        if (rc == -EAGAIN) {
            assert_false(flushed);
            eagain++;
            if (w.chunk_left > 0 && w.chunk_left < TOTAL)
                mid_chunk++;
            got_len += peer_read(&p, got + got_len, TOTAL + HEAD + 64 - got_len);
            continue;
        }
        assert_int_equal(rc, 0);
    }
    got_len += peer_read(&p, got + got_len, TOTAL + HEAD + 64 - got_len);
    assert_int_equal(off, TOTAL);
    assert_true(eagain > 2);
    assert_true(mid_chunk > 0); /* the send buffer really filled mid-chunk */
    memcpy(want, hb, HEAD);
    int m = snprintf(want + HEAD, 32, "%x\r\n", (unsigned)TOTAL);
    size_t wl = HEAD + (size_t)m;
    memcpy(want + wl, data, TOTAL);
    wl += TOTAL;
    memcpy(want + wl, "\r\n0\r\n\r\n", 7);
    wl += 7;
    assert_int_equal(got_len, wl);
    assert_memory_equal(got, want, wl);
    free(data);
    free(got);
    free(want);
    sl_buf_release(&head, &pool);
    pair_close(&p);
    sl_bpool_dispose(&pool);
}

/* Incremental chunked decoder on the peer side. */
struct peer_decoder {
    struct sl_h1_chunked ch;
    char *out;
    size_t out_len, out_cap;
    bool done;
    size_t after_done; /* bytes received after the end of the body (must stay 0) */
};

static void decoder_feed(struct peer_decoder *dc, const char *in, size_t n)
{
    size_t pos = 0;
    while (pos < n) {
        if (dc->done) {
            dc->after_done += n - pos;
            return;
        }
        size_t used = 0;
        struct sl_slice d;
        enum sl_h1_err err = SL_H1_ERR_NONE;
        enum sl_status st = sl_h1_chunked_parse(&dc->ch, in + pos, n - pos, &used, &d, &err);
        if (st == SL_ERROR)
            fail_msg("peer stream is not valid chunked coding (err %d) at byte %zu", err, pos);
        assert_true(dc->out_len + d.len <= dc->out_cap);
        memcpy(dc->out + dc->out_len, d.ptr, d.len);
        dc->out_len += d.len;
        pos += used;
        if (st == SL_DONE)
            dc->done = true;
        else if (st == SL_AGAIN)
            assert_int_equal(pos, n);
    }
}

static void test_writer_chunked_random(void **state)
{
    (void)state;
    enum { MAXB = 400000 };
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    char *data = malloc(MAXB);
    char *rbuf = malloc(1 << 17);
    struct peer_decoder dc = {.out = malloc(MAXB), .out_cap = MAXB};
    assert_non_null(data);
    assert_non_null(rbuf);
    assert_non_null(dc.out);
    for (int iter = 0; iter < 40; iter++) {
        struct pair p;
        pair_open(&p, (rng_next() & 1) ? 1 : 0);
        size_t total = rng_range(0, iter < 20 ? 5000 : MAXB);
        for (size_t i = 0; i < total; i++)
            data[i] = (char)rng_next();
        sl_h1_chunked_init(&dc.ch);
        dc.out_len = 0;
        dc.done = false;
        dc.after_done = 0;

        struct sl_h1_body_writer w;
        sl_h1_body_writer_init(&w, SL_H1_W_CHUNKED);
        size_t produced = 0, written = 0;
        bool flushed = false;
        int spins = 0;
        for (int step = 0;; step++) {
            assert_true(step < 2000000);
            /* The source grows by random amounts, as reads from the other side would. */
            if (produced < total && (rng_next() & 1)) {
                produced += rng_range(1, iter % 2 ? 100 : 70000);
                if (produced > total)
                    produced = total;
            }
            bool fin = produced == total;
            size_t wr = 0;
            int rc = sl_h1_body_writer_write(&w, &p.tr, NULL, data + written, produced - written,
                                             fin, &wr, &flushed);
            written += wr;
            assert_true(written <= produced);
            if (rc == 0) {
                assert_true(flushed || produced > written);
                if (fin && flushed && written == total)
                    break;
            } else {
                assert_int_equal(rc, -EAGAIN);
                assert_false(flushed);
            }
            /* Drain a random amount (sometimes nothing) from the peer. */
            size_t want = (rng_next() % 3 == 0) ? 0 : rng_range(1, 1 << 17);
            size_t g = peer_read(&p, rbuf, want);
            decoder_feed(&dc, rbuf, g);
            /* Progress guard: with nothing written and nothing drained many times in a row
             * while the peer is empty, the writer is stuck. */
            spins = (wr == 0 && g == 0 && rc == -EAGAIN) ? spins + 1 : 0;
            assert_true(spins < 1000);
        }
        size_t g;
        while ((g = peer_read(&p, rbuf, 1 << 17)) > 0)
            decoder_feed(&dc, rbuf, g);
        assert_true(dc.done);
        assert_int_equal(dc.after_done, 0);
        assert_int_equal(dc.out_len, total);
        if (total)
            assert_memory_equal(dc.out, data, total);
        assert_int_equal(w.written, total);
        pair_close(&p);
    }
    free(dc.out);
    free(rbuf);
    free(data);
    sl_bpool_dispose(&pool);
}

/* ---- writer against a scripted transport: short writes at every byte offset ------------- */

struct mock_tr {
    struct sl_transport tr; /* first: the ops get a pointer to it */
    char out[4096];
    size_t out_len;
    size_t budget; /* bytes accepted before -EAGAIN */
    int calls;
};

static int mock_writev(struct sl_transport *t, const struct iovec *iov, int cnt, size_t *n)
{
    struct mock_tr *m = (struct mock_tr *)t;
    m->calls++;
    *n = 0;
    if (m->budget == 0)
        return -EAGAIN;
    for (int i = 0; i < cnt && m->budget; i++) {
        size_t k = iov[i].iov_len < m->budget ? iov[i].iov_len : m->budget;
        assert_true(m->out_len + k <= sizeof m->out);
        memcpy(m->out + m->out_len, iov[i].iov_base, k);
        m->out_len += k;
        m->budget -= k;
        *n += k;
    }
    return 0;
}

static const struct sl_transport_ops mock_ops = {.name = "mock", .writev = mock_writev};

static void mock_init(struct mock_tr *m)
{
    memset(m, 0, sizeof *m);
    m->tr.ops = &mock_ops;
    m->tr.fd = -1;
}

/* A short write at every offset of the wire, then byte-at-a-time, then the rest. */
static void check_every_short_write(enum sl_h1_wmode mode, const char *h, const char *body,
                                    const char *want)
{
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    size_t hl = strlen(h), bl = strlen(body), wl = strlen(want);
    for (size_t first = 0; first <= wl; first++) {
        for (int style = 0; style < 2; style++) {
            struct mock_tr m;
            mock_init(&m);
            struct sl_buf head = {0};
            assert_int_equal(sl_buf_acquire(&head, &pool), 0);
            append(&head, h, hl);
            struct sl_h1_body_writer w;
            sl_h1_body_writer_init(&w, mode);
            size_t off = 0;
            bool flushed = false;
            m.budget = first;
            for (int call = 0; call < 1000 && !flushed; call++) {
                size_t wr = 0;
                int rc = sl_h1_body_writer_write(&w, &m.tr, &head, body + off, bl - off, true, &wr,
                                                 &flushed);
                off += wr;
                if (rc == -EAGAIN) {
                    assert_false(flushed);
                    /* -EAGAIN only when the transport refused: the budget is spent. */
                    assert_int_equal(m.budget, 0);
                    m.budget = style == 0 ? 1 : SIZE_MAX / 2;
                } else {
                    assert_int_equal(rc, 0);
                    assert_true(flushed);
                }
            }
            assert_true(flushed);
            assert_int_equal(off, bl);
            assert_int_equal(sl_buf_len(&head), 0);
            if (m.out_len != wl || memcmp(m.out, want, wl) != 0)
                fail_msg("first=%zu style=%d: got \"%.*s\"", first, style, (int)m.out_len, m.out);
            sl_buf_release(&head, &pool);
        }
    }
    sl_bpool_dispose(&pool);
}

static void test_writer_every_short_write(void **state)
{
    (void)state;
    check_every_short_write(SL_H1_W_CHUNKED, "HEAD\r\n\r\n", "hello world",
                            "HEAD\r\n\r\nb\r\nhello world\r\n0\r\n\r\n");
    check_every_short_write(SL_H1_W_CHUNKED, "", "", "0\r\n\r\n");
    check_every_short_write(SL_H1_W_LENGTH, "HEAD\r\n\r\n", "hello world",
                            "HEAD\r\n\r\nhello world");
}

/*
 * Chunk boundaries chosen by the caller across calls, with a short write at every offset of
 * the first call: "hello" (no fin) then " world" (fin). Checked by decoding.
 */
static void test_writer_two_calls_every_short_write(void **state)
{
    (void)state;
    static const char wire_first[] = "5\r\nhello\r\n";
    for (size_t first = 0; first <= sizeof wire_first - 1; first++) {
        struct mock_tr m;
        mock_init(&m);
        struct sl_h1_body_writer w;
        sl_h1_body_writer_init(&w, SL_H1_W_CHUNKED);
        static const char all[] = "hello world";
        size_t produced = 5, off = 0;
        bool flushed = false;
        m.budget = first;
        for (int call = 0; call < 100; call++) {
            size_t wr = 0;
            bool fin = produced == 11;
            int rc = sl_h1_body_writer_write(&w, &m.tr, NULL, all + off, produced - off, fin, &wr,
                                             &flushed);
            off += wr;
            if (rc == 0 && fin && flushed)
                break;
            if (rc == -EAGAIN)
                assert_false(flushed);
            produced = 11; /* the rest of the body arrives */
            m.budget = SIZE_MAX / 2;
        }
        assert_true(flushed);
        assert_int_equal(off, 11);
        struct peer_decoder dc = {.out = malloc(64), .out_cap = 64};
        assert_non_null(dc.out);
        decoder_feed(&dc, m.out, m.out_len);
        assert_true(dc.done);
        assert_int_equal(dc.after_done, 0);
        assert_int_equal(dc.out_len, 11);
        assert_memory_equal(dc.out, all, 11);
        free(dc.out);
    }
}

/*
 * After a short write that ended inside the CRLF closing a chunk, the next call with more data
 * and a socket with room must write the leftover framing and the new chunk, not report
 * -EAGAIN (a regression test: it once did, costing a loop turn per short write).
 */
static void test_writer_no_spurious_eagain(void **state)
{
    (void)state;
    struct mock_tr m;
    mock_init(&m);
    struct sl_h1_body_writer w;
    sl_h1_body_writer_init(&w, SL_H1_W_CHUNKED);
    size_t wr = 0;
    bool flushed = false;
    m.budget = 9; /* "5\r\nhello\r": the chunk's final LF stays pending */
    assert_int_equal(sl_h1_body_writer_write(&w, &m.tr, NULL, "hello", 5, false, &wr, &flushed),
                     -EAGAIN);
    assert_int_equal(wr, 5);
    m.budget = SIZE_MAX / 2;
    /* More data arrives (no fin yet) and the socket has room: it must all go out. */
    assert_int_equal(sl_h1_body_writer_write(&w, &m.tr, NULL, "world", 5, false, &wr, &flushed), 0);
    assert_int_equal(wr, 5);
    assert_true(flushed);
    assert_int_equal(m.out_len, 20);
    assert_memory_equal(m.out, "5\r\nhello\r\n5\r\nworld\r\n", 20);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reader_length_split_and_leftover),
        cmocka_unit_test(test_reader_length_partial_consume),
        cmocka_unit_test(test_reader_length_every_split),
        cmocka_unit_test(test_reader_length_eof_and_zero),
        cmocka_unit_test(test_reader_until_close),
        cmocka_unit_test(test_reader_chunked_basic),
        cmocka_unit_test(test_reader_chunked_every_split),
        cmocka_unit_test(test_reader_chunked_random),
        cmocka_unit_test(test_reader_chunked_malformed),
        cmocka_unit_test(test_reader_chunked_truncated_eof),
        cmocka_unit_test(test_writer_length),
        cmocka_unit_test(test_writer_chunked_exact),
        cmocka_unit_test(test_writer_chunked_partial_socket),
        cmocka_unit_test(test_writer_chunked_random),
        cmocka_unit_test(test_writer_every_short_write),
        cmocka_unit_test(test_writer_two_calls_every_short_write),
        cmocka_unit_test(test_writer_no_spurious_eagain),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
