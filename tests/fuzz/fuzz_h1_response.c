#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/h1_parse.h"

/*
 * Response heads from upstreams: split-independence, slices inside the head, body rules
 * (bodiless statuses, HEAD), then the chunked decoder on whatever follows.
 * data[0] bit 0 is request_was_head; bit 7 shrinks the header array.
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
    struct sl_h1_response resp;
    struct sl_h1_header hdrs[CAP];
};

static void check(int cond, const char *what)
{
    if (!cond) {
        fprintf(stderr, "invariant failed: %s\n", what);
        abort();
    }
}

static void run(struct sl_h1_head_state *st, const char *buf, size_t len, bool head, size_t cap,
                struct result *r)
{
    r->err = SL_H1_ERR_COUNT;
    r->st = sl_h1_parse_response(st, buf, len, &lim, head, &r->resp, r->hdrs, cap, &r->err);
    check(r->st == SL_DONE || r->st == SL_AGAIN || r->st == SL_ERROR, "status");
    check(r->st == SL_ERROR ? r->err > SL_H1_ERR_NONE && r->err < SL_H1_ERR_COUNT
                            : r->err == SL_H1_ERR_NONE,
          "err set iff error");
}

static void same(const struct result *a, const struct result *b)
{
    check(a->st == b->st && a->err == b->err, "same verdict");
    if (a->st != SL_DONE)
        return;
    const struct sl_h1_response *x = &a->resp, *y = &b->resp;
    check(x->head_len == y->head_len && x->header_count == y->header_count && x->body == y->body &&
              x->content_length == y->content_length && x->flags == y->flags &&
              x->version_minor == y->version_minor && x->status == y->status &&
              x->keepalive_timeout_ms == y->keepalive_timeout_ms && x->reason.len == y->reason.len,
          "same fields");
}

static void invariants(const struct result *r, const char *base, size_t size, bool head, size_t cap)
{
    if (r->st != SL_DONE)
        return;
    const struct sl_h1_response *p = &r->resp;
    check(p->head_len >= 14 && p->head_len <= size && p->head_len <= lim.max_head_bytes,
          "head_len");
    check(p->status >= 100 && p->status <= 599, "status range");
    check(p->header_count <= cap, "header count");
    if (head || p->status < 200 || p->status == 204 || p->status == 304)
        check(p->body == SL_H1_BODY_NONE, "bodiless");
    else
        check(p->body != SL_H1_BODY_NONE, "body framing chosen");
    check(p->keepalive_timeout_ms <= UINT64_C(86400000), "keep-alive bound");
    check(p->reason.len == 0 ||
              (p->reason.ptr >= base && p->reason.ptr + p->reason.len <= base + p->head_len),
          "reason inside");
    for (size_t i = 0; i < p->header_count; i++) {
        struct sl_slice n = p->headers[i].name, v = p->headers[i].value;
        check(n.len > 0 && n.ptr >= base && n.ptr + n.len <= base + p->head_len, "name inside");
        check(v.len == 0 || (v.ptr >= base && v.ptr + v.len <= base + p->head_len), "value inside");
    }
}

static void decode_body(const char *p, size_t n)
{
    struct sl_h1_chunked ch = {0};
    size_t pos = 0, total = 0;
    for (int guard = 0; guard < 1000000; guard++) {
        size_t used = 0;
        struct sl_slice d;
        enum sl_h1_err err = SL_H1_ERR_NONE;
        enum sl_status s = sl_h1_chunked_parse(&ch, p + pos, n - pos, &used, &d, &err);
        check(used <= n - pos && d.len <= used, "consumed bound");
        total += d.len;
        pos += used;
        check(total <= pos, "decoded never exceeds input");
        if (s != SL_OK)
            return;
        check(used > 0, "progress");
    }
    check(0, "decoder loops");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    bool head = data[0] & 1;
    size_t cap = (data[0] & 0x80) ? 4 : CAP;
    size_t off = data[1];
    const char *in = (const char *)data + 2;
    size -= 2;
    off %= size + 1;

    struct result *whole = malloc(sizeof(*whole));
    struct result *r = malloc(sizeof(*r));
    check(whole && r, "oom");
    struct sl_h1_head_state st = {0};
    run(&st, in, size, head, cap, whole);
    invariants(whole, in, size, head, cap);

    struct sl_h1_head_state ss = {0};
    char *b1 = malloc(off ? off : 1);
    check(b1 != NULL, "oom");
    memcpy(b1, in, off);
    run(&ss, b1, off, head, cap, r);
    if (r->st != SL_AGAIN) {
        same(whole, r);
    } else {
        run(&ss, in, size, head, cap, r);
        same(whole, r);
    }
    free(b1);

    if (size <= 600) {
        struct sl_h1_head_state gs = {0};
        for (size_t k = 0; k <= size; k++) {
            run(&gs, in, k, head, cap, r);
            if (r->st != SL_AGAIN) {
                same(whole, r);
                break;
            }
        }
    }

    if (whole->st == SL_DONE && whole->resp.body == SL_H1_BODY_CHUNKED)
        decode_body(in + whole->resp.head_len, size - whole->resp.head_len);
    free(whole);
    free(r);
    return 0;
}
