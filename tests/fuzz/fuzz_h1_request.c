#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/h1_parse.h"

/*
 * Request heads: the verdict must not depend on how the bytes were split (whole, two pieces
 * at an offset taken from the first byte, and byte by byte for small inputs), every slice must
 * lie inside the head, and a chunked body that follows is decoded without overrun.
 */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CAP 32

static const struct sl_h1_limits lim = {
    .max_head_bytes = 4096,
    .max_headers = 24,
    .max_uri_bytes = 512,
};

struct result {
    enum sl_status st;
    enum sl_h1_err err;
    struct sl_h1_request req;
    struct sl_h1_header hdrs[CAP];
};

static void check(int cond, const char *what)
{
    if (!cond) {
        fprintf(stderr, "invariant failed: %s\n", what);
        abort();
    }
}

static void run(struct sl_h1_head_state *st, const char *buf, size_t len, size_t cap,
                struct result *r)
{
    r->err = SL_H1_ERR_COUNT;
    r->st = sl_h1_parse_request(st, buf, len, &lim, &r->req, r->hdrs, cap, &r->err);
    check(r->st == SL_DONE || r->st == SL_AGAIN || r->st == SL_ERROR, "status");
    check(r->st == SL_ERROR ? r->err > SL_H1_ERR_NONE && r->err < SL_H1_ERR_COUNT
                            : r->err == SL_H1_ERR_NONE,
          "err set iff error");
}

static size_t rel(struct sl_slice s, const char *base)
{
    return (size_t)(s.ptr - base);
}

static int in_head(struct sl_slice s, const char *base, size_t head_len)
{
    if (s.len == 0)
        return 1;
    if (s.len == 1 && s.ptr[0] == '/' && (s.ptr < base || s.ptr >= base + head_len))
        return 1; /* the static "/" of an absolute-form target without path */
    return s.ptr >= base && rel(s, base) + s.len <= head_len;
}

static void same(const struct result *a, const char *abase, const struct result *b,
                 const char *bbase)
{
    check(a->st == b->st, "same status");
    check(a->err == b->err, "same error");
    if (a->st != SL_DONE)
        return;
    const struct sl_h1_request *x = &a->req, *y = &b->req;
    check(x->head_len == y->head_len && x->header_count == y->header_count && x->body == y->body &&
              x->content_length == y->content_length && x->flags == y->flags &&
              x->version_minor == y->version_minor,
          "same fields");
    check(x->method.len == y->method.len && rel(x->method, abase) == rel(y->method, bbase),
          "same method");
    check(x->target.len == y->target.len && rel(x->target, abase) == rel(y->target, bbase),
          "same target");
    check(x->host.len == y->host.len && x->path.len == y->path.len && x->query.len == y->query.len,
          "same host/path/query");
    for (size_t i = 0; i < x->header_count; i++)
        check(rel(x->headers[i].name, abase) == rel(y->headers[i].name, bbase) &&
                  x->headers[i].value.len == y->headers[i].value.len,
              "same headers");
}

static void invariants(const struct result *r, const char *base, size_t size, size_t cap)
{
    if (r->st != SL_DONE)
        return;
    const struct sl_h1_request *q = &r->req;
    check(q->head_len >= 4 && q->head_len <= size && q->head_len <= lim.max_head_bytes, "head_len");
    check(base[q->head_len - 1] == '\n' && base[q->head_len - 2] == '\r', "ends with CRLF");
    check(q->header_count <= cap && q->header_count <= lim.max_headers, "header count");
    check(q->version_minor == 0 || q->version_minor == 1, "version");
    check(q->method.len > 0 && q->target.len > 0 && q->target.len <= lim.max_uri_bytes,
          "method/target");
    check(in_head(q->method, base, q->head_len) && in_head(q->target, base, q->head_len) &&
              in_head(q->path, base, q->head_len) && in_head(q->query, base, q->head_len) &&
              in_head(q->host, base, q->head_len),
          "slices inside head");
    for (size_t j = 0; j < q->target.len; j++)
        check(q->target.ptr[j] > 0x20 && q->target.ptr[j] < 0x7f && q->target.ptr[j] != '#',
              "target octets");
    if (q->body == SL_H1_BODY_LENGTH)
        check(q->content_length <= (UINT64_C(1) << 62), "content length bound");
    check(q->body != SL_H1_BODY_UNTIL_CLOSE, "requests never read until close");
    for (size_t i = 0; i < q->header_count; i++) {
        struct sl_slice n = q->headers[i].name, v = q->headers[i].value;
        check(n.len > 0 && in_head(n, base, q->head_len) && in_head(v, base, q->head_len),
              "header slices");
        for (size_t j = 0; j < v.len; j++)
            check(v.ptr[j] == '\t' || ((unsigned char)v.ptr[j] >= 0x20 && v.ptr[j] != 0x7f),
                  "value octets");
        if (v.len)
            check(v.ptr[0] != ' ' && v.ptr[v.len - 1] != ' ', "trimmed value");
    }
}

static void decode_body(const char *p, size_t n)
{
    struct sl_h1_chunked ch;
    sl_h1_chunked_init(&ch);
    size_t pos = 0, total = 0;
    for (int guard = 0; guard < 1000000; guard++) {
        size_t used = 0;
        struct sl_slice d;
        enum sl_h1_err err = SL_H1_ERR_NONE;
        enum sl_status s = sl_h1_chunked_parse(&ch, p + pos, n - pos, &used, &d, &err);
        check(used <= n - pos, "consumed bound");
        check(d.len <= used, "data within consumed");
        total += d.len;
        pos += used;
        check(total <= pos, "decoded never exceeds input");
        if (s == SL_ERROR)
            check(err == SL_H1_ERR_BAD_CHUNK || err == SL_H1_ERR_CHUNK_TOO_LARGE, "chunk err");
        if (s != SL_OK)
            return;
        check(used > 0, "progress");
    }
    check(0, "decoder loops");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    const char *in = (const char *)data;
    size_t cap = (data[0] & 0x80) ? 8 : CAP;
    struct result *whole = malloc(sizeof(*whole));
    struct result *r = malloc(sizeof(*r));
    check(whole && r, "oom");

    struct sl_h1_head_state st = {0};
    run(&st, in, size, cap, whole);
    invariants(whole, in, size, cap);
    /* repeated call with the same state: same answer */
    run(&st, in, size, cap, r);
    same(whole, in, r, in);

    /* two pieces; each prefix in an exact-size copy so overreads are caught */
    size_t off = (((size_t)data[0] << 8) | (size > 1 ? data[1] : 0)) % (size + 1);
    struct sl_h1_head_state ss = {0};
    char *b1 = malloc(off ? off : 1);
    check(b1 != NULL, "oom");
    memcpy(b1, in, off);
    run(&ss, b1, off, cap, r);
    if (r->st != SL_AGAIN) {
        same(whole, in, r, b1);
    } else {
        check(ss.scanned <= off, "scanned bound");
        run(&ss, in, size, cap, r);
        same(whole, in, r, in);
    }
    free(b1);

    /* byte by byte for small inputs */
    if (size <= 600) {
        struct sl_h1_head_state gs = {0};
        for (size_t k = 0; k <= size; k++) {
            run(&gs, in, k, cap, r);
            if (r->st != SL_AGAIN) {
                same(whole, in, r, in);
                break;
            }
        }
    }

    if (whole->st == SL_DONE && whole->req.body == SL_H1_BODY_CHUNKED)
        decode_body(in + whole->req.head_len, size - whole->req.head_len);
    free(whole);
    free(r);
    return 0;
}
