#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "http/h1_parse.h"

/*
 * Every input is fed whole, as a growing prefix with one state (byte by byte), and split in
 * two at every offset; all three must agree. Each prefix is copied into a buffer of exactly
 * its length so that ASan catches any read past what the caller handed over.
 */

#define MAXH 64
#define IN(s) (s), sizeof(s) - 1

static const struct sl_h1_limits lim = {
    .max_head_bytes = 8192,
    .max_headers = MAXH,
    .max_uri_bytes = 2048,
};

static size_t cases_run;
static size_t cur_len; /* length of the input being compared, for slice_at_eq */

static char *dup_exact(const char *s, size_t n)
{
    char *p = malloc(n ? n : 1);
    assert_non_null(p);
    if (n)
        memcpy(p, s, n);
    return p;
}

/* ---- requests ------------------------------------------------------------------------- */

struct req_result {
    enum sl_status st;
    enum sl_h1_err err;
    struct sl_h1_request req;
    struct sl_h1_header hdrs[MAXH];
};

static enum sl_status req_call(struct sl_h1_head_state *st, const char *buf, size_t len,
                               const struct sl_h1_limits *l, size_t cap, struct req_result *r)
{
    r->err = SL_H1_ERR_COUNT;
    r->st = sl_h1_parse_request(st, buf, len, l, &r->req, r->hdrs, cap, &r->err);
    return r->st;
}

static size_t off(const struct sl_slice s, const char *base)
{
    return s.ptr ? (size_t)(s.ptr - base) : (size_t)-1;
}

static bool slice_at_eq(struct sl_slice a, const char *abase, struct sl_slice b, const char *bbase)
{
    if (a.len != b.len)
        return false;
    if (a.len == 0)
        return true;
    /* "/" for an absolute-form target without path lives outside the buffer */
    bool ain = a.ptr >= abase && a.ptr <= abase + cur_len;
    if (!ain)
        return a.ptr == b.ptr;
    return off(a, abase) == off(b, bbase);
}

static void req_same(const char *name, const struct req_result *a, const char *abase,
                     const struct req_result *b, const char *bbase)
{
    if (a->st != b->st || a->err != b->err)
        fail_msg("%s: status %d/%d err %s/%s", name, a->st, b->st, sl_h1_err_name(a->err),
                 sl_h1_err_name(b->err));
    if (a->st != SL_DONE)
        return;
    const struct sl_h1_request *x = &a->req, *y = &b->req;
    if (x->head_len != y->head_len || x->header_count != y->header_count || x->body != y->body ||
        x->content_length != y->content_length || x->flags != y->flags ||
        x->version_minor != y->version_minor || !slice_at_eq(x->method, abase, y->method, bbase) ||
        !slice_at_eq(x->target, abase, y->target, bbase) ||
        !slice_at_eq(x->path, abase, y->path, bbase) ||
        !slice_at_eq(x->query, abase, y->query, bbase) ||
        !slice_at_eq(x->host, abase, y->host, bbase))
        fail_msg("%s: results differ between feeding modes", name);
    for (size_t i = 0; i < x->header_count; i++)
        if (!slice_at_eq(x->headers[i].name, abase, y->headers[i].name, bbase) ||
            !slice_at_eq(x->headers[i].value, abase, y->headers[i].value, bbase))
            fail_msg("%s: header %zu differs", name, i);
}

/*
 * Runs the input every way and returns the whole-buffer result in *out (its slices point
 * into `in`). The result must be SL_DONE or SL_ERROR; a prefix never completes early unless
 * the whole did at that length.
 */
static void req_all_ways(const char *name, const char *in, size_t len, const struct sl_h1_limits *l,
                         size_t cap, struct req_result *out)
{
    struct sl_h1_head_state st = {0};
    cur_len = len;
    req_call(&st, in, len, l, cap, out);
    if (out->st == SL_AGAIN)
        fail_msg("%s: incomplete input", name);
    if (out->st == SL_DONE && out->err != SL_H1_ERR_NONE)
        fail_msg("%s: err not cleared on success", name);
    /* The decisive byte: for a success, the end of the head; for an error, unknown. */
    size_t decisive = out->st == SL_DONE ? out->req.head_len : 0;

    struct req_result *r = malloc(sizeof(*r));
    assert_non_null(r);

    /* growing prefix, one state */
    struct sl_h1_head_state gs = {0};
    bool finished = false;
    for (size_t k = 0; k <= len && !finished; k++) {
        char *b = dup_exact(in, k);
        req_call(&gs, b, k, l, cap, r);
        if (r->st != SL_AGAIN) {
            if (out->st == SL_DONE && k != decisive)
                fail_msg("%s: prefix %zu finished (%s), head_len %zu", name, k,
                         sl_h1_err_name(r->err), decisive);
            req_same(name, out, in, r, b);
            finished = true;
        }
        free(b);
    }
    if (!finished)
        fail_msg("%s: byte-by-byte never finished", name);

    /* split at every offset */
    for (size_t k = 0; k <= len; k++) {
        struct sl_h1_head_state ss = {0};
        char *b1 = dup_exact(in, k);
        req_call(&ss, b1, k, l, cap, r);
        if (r->st != SL_AGAIN) {
            req_same(name, out, in, r, b1);
            free(b1);
            continue;
        }
        free(b1);
        char *b2 = dup_exact(in, len);
        req_call(&ss, b2, len, l, cap, r);
        req_same(name, out, in, r, b2);
        /* a repeated call after completion is idempotent */
        req_call(&ss, b2, len, l, cap, r);
        req_same(name, out, in, r, b2);
        free(b2);
    }
    free(r);
    cases_run++;
}

static void req_ok(const char *name, const char *in, size_t len, struct req_result *out)
{
    req_all_ways(name, in, len, &lim, MAXH, out);
    if (out->st != SL_DONE)
        fail_msg("%s: expected success, got %s", name, sl_h1_err_name(out->err));
}

static void req_err_l(const char *name, const char *in, size_t len, const struct sl_h1_limits *l,
                      size_t cap, enum sl_h1_err want)
{
    struct req_result *r = malloc(sizeof(*r));
    assert_non_null(r);
    req_all_ways(name, in, len, l, cap, r);
    if (r->st != SL_ERROR || r->err != want)
        fail_msg("%s: expected %s, got status %d err %s", name, sl_h1_err_name(want), r->st,
                 sl_h1_err_name(r->err));
    free(r);
}

static void req_err(const char *name, const char *in, size_t len, enum sl_h1_err want)
{
    req_err_l(name, in, len, &lim, MAXH, want);
}

static void assert_slice(struct sl_slice s, const char *want)
{
    if (s.len != strlen(want) || (s.len && memcmp(s.ptr, want, s.len) != 0))
        fail_msg("slice \"%.*s\" != \"%s\"", (int)s.len, s.ptr ? s.ptr : "", want);
}

static void test_req_simple_get(void **state)
{
    (void)state;
    static const char in[] = "GET /index.html?a=1&b=2 HTTP/1.1\r\n"
                             "Host: example.com\r\n"
                             "User-Agent: curl/8.0\r\n"
                             "Accept: */*\r\n"
                             "\r\n";
    struct req_result r;
    req_ok("simple get", IN(in), &r);
    assert_slice(r.req.method, "GET");
    assert_slice(r.req.target, "/index.html?a=1&b=2");
    assert_slice(r.req.path, "/index.html");
    assert_slice(r.req.query, "a=1&b=2");
    assert_slice(r.req.host, "example.com");
    assert_int_equal(r.req.version_minor, 1);
    assert_int_equal(r.req.body, SL_H1_BODY_NONE);
    assert_int_equal(r.req.flags, 0);
    assert_int_equal(r.req.header_count, 3);
    assert_int_equal(r.req.head_len, sizeof(in) - 1);
    assert_ptr_equal(r.req.headers, r.hdrs);
    assert_slice(r.hdrs[1].name, "User-Agent");
    assert_slice(r.hdrs[1].value, "curl/8.0");
    assert_int_equal(sl_h1_find_header(r.hdrs, r.req.header_count, SL_SLICE_LIT("accept")), 2);
    assert_int_equal(sl_h1_find_header(r.hdrs, r.req.header_count, SL_SLICE_LIT("HOST")), 0);
    assert_int_equal(sl_h1_find_header(r.hdrs, r.req.header_count, SL_SLICE_LIT("Cookie")), -1);
    assert_int_equal(sl_h1_find_header(r.hdrs, 0, SL_SLICE_LIT("Host")), -1);

    static const char q[] = "GET /? HTTP/1.1\r\nHost: h\r\n\r\n";
    req_ok("empty query", IN(q), &r);
    assert_slice(r.req.path, "/");
    assert_slice(r.req.query, "");
    static const char nq[] = "GET /a/b HTTP/1.1\r\nHost: h\r\n\r\n";
    req_ok("no query", IN(nq), &r);
    assert_slice(r.req.path, "/a/b");
    assert_int_equal(r.req.query.len, 0);
    assert_non_null(r.req.query.ptr);
}

static void test_req_bodies(void **state)
{
    (void)state;
    static const char cl[] = "POST /submit HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello";
    struct req_result r;
    req_ok("post cl", IN(cl), &r);
    assert_int_equal(r.req.body, SL_H1_BODY_LENGTH);
    assert_int_equal(r.req.content_length, 5);
    assert_int_equal(r.req.head_len, sizeof(cl) - 1 - 5);

    static const char cl0[] = "POST / HTTP/1.1\r\nHost: h\r\ncontent-length: 0\r\n\r\n";
    req_ok("cl zero", IN(cl0), &r);
    assert_int_equal(r.req.body, SL_H1_BODY_LENGTH);
    assert_int_equal(r.req.content_length, 0);

    static const char clz[] = "POST / HTTP/1.1\r\nHost: h\r\nContent-Length:  007 \t\r\n\r\n";
    req_ok("cl leading zeros and ows", IN(clz), &r);
    assert_int_equal(r.req.content_length, 7);

    static const char clmax[] =
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4611686018427387904\r\n\r\n";
    req_ok("cl 2^62", IN(clmax), &r);
    assert_int_equal(r.req.content_length, UINT64_C(1) << 62);

    static const char te[] =
        "POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    req_ok("post chunked", IN(te), &r);
    assert_int_equal(r.req.body, SL_H1_BODY_CHUNKED);
    assert_int_equal(r.req.head_len, strstr(te, "5\r\nhello") - te);

    static const char teu[] = "POST / HTTP/1.1\r\nHost: h\r\ntransfer-encoding:\tChunKed \r\n\r\n";
    req_ok("te case-insensitive", IN(teu), &r);
    assert_int_equal(r.req.body, SL_H1_BODY_CHUNKED);
}

static void test_req_forms(void **state)
{
    (void)state;
    struct req_result r;
    static const char abs[] =
        "GET http://Example.com:8080/a/b?x=1 HTTP/1.1\r\nHost: other.example\r\n\r\n";
    req_ok("absolute-form", IN(abs), &r);
    assert_slice(r.req.host, "Example.com:8080");
    assert_slice(r.req.path, "/a/b");
    assert_slice(r.req.query, "x=1");
    assert_slice(r.req.target, "http://Example.com:8080/a/b?x=1");

    static const char abs2[] = "GET HTTPS://example.com HTTP/1.1\r\nHost: example.com\r\n\r\n";
    req_ok("absolute-form without path", IN(abs2), &r);
    assert_slice(r.req.host, "example.com");
    assert_slice(r.req.path, "/");
    assert_slice(r.req.query, "");

    static const char abs3[] = "GET http://[::1]:80?q HTTP/1.1\r\nHost: x\r\n\r\n";
    req_ok("absolute-form ipv6 query only", IN(abs3), &r);
    assert_slice(r.req.host, "[::1]:80");
    assert_slice(r.req.path, "/");
    assert_slice(r.req.query, "q");

    static const char opt[] = "OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n";
    req_ok("options *", IN(opt), &r);
    assert_slice(r.req.target, "*");
    assert_slice(r.req.path, "*");

    static const char con[] = "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
    req_ok("connect", IN(con), &r);
    assert_slice(r.req.host, "example.com:443");
    assert_slice(r.req.path, "");

    static const char v10[] = "GET / HTTP/1.0\r\n\r\n";
    req_ok("http/1.0 without host", IN(v10), &r);
    assert_int_equal(r.req.version_minor, 0);
    assert_slice(r.req.host, "");
    assert_int_equal(r.req.header_count, 0);

    static const char v10e[] = "GET / HTTP/1.0\r\nHost:\r\n\r\n";
    req_ok("http/1.0 empty host", IN(v10e), &r);

    static const char lead[] = "\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n";
    req_ok("leading crlf", IN(lead), &r);
    assert_int_equal(r.req.head_len, sizeof(lead) - 1);
    assert_slice(r.req.method, "GET");

    static const char lead8[] = "\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n";
    req_ok("eight leading crlf", IN(lead8), &r);

    static const char hosts[][64] = {
        "h",
        "example.com",
        "example.com:80",
        "127.0.0.1:8080",
        "[::1]",
        "[2001:db8::1]:443",
        "xn--bcher-kva.example",
        "a_b.example",
        "%41bc.example",
        "sub.delims!$&'()*+,;=",
    };
    for (size_t i = 0; i < sizeof hosts / sizeof hosts[0]; i++) {
        char buf[256];
        int n = snprintf(buf, sizeof buf, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", hosts[i]);
        req_ok(hosts[i], buf, (size_t)n, &r);
        assert_slice(r.req.host, hosts[i]);
    }

    static const char meth[] = "M-SEARCH* /x HTTP/1.1\r\nHost: h\r\n\r\n";
    req_ok("token method", IN(meth), &r);
    assert_slice(r.req.method, "M-SEARCH*");
}

static void test_req_pipelined(void **state)
{
    (void)state;
    static const char in[] = "GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
                             "GET /2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";
    struct req_result r;
    req_ok("pipelined first", IN(in), &r);
    size_t first = r.req.head_len;
    assert_int_equal(first, strlen("GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"));
    assert_slice(r.req.path, "/1");
    req_ok("pipelined second", in + first, sizeof(in) - 1 - first, &r);
    assert_slice(r.req.path, "/2");
    assert_int_equal(r.req.flags, SL_H1_F_CONN_CLOSE | SL_H1_F_HAS_CONN_HEADER);
}

static void test_req_flags_and_values(void **state)
{
    (void)state;
    static const char in[] = "GET /chat HTTP/1.1\r\n"
                             "Host: h\r\n"
                             "Connection: keep-alive, Upgrade\r\n"
                             "connection: ,, CLOSE ,\r\n"
                             "Upgrade: websocket\r\n"
                             "Expect: 100-Continue\r\n"
                             "X-Empty:\r\n"
                             "X-Ows: \t  padded value \t \r\n"
                             "X-Obs: caf\xc3\xa9\r\n"
                             "X-Tab: a\tb\r\n"
                             "X-Long: 0123456789abcdef0123456789abcdef0123456789abcdef\r\n"
                             "\r\n";
    struct req_result r;
    req_ok("flags", IN(in), &r);
    assert_int_equal(r.req.flags, SL_H1_F_CONN_CLOSE | SL_H1_F_CONN_KEEPALIVE |
                                      SL_H1_F_CONN_UPGRADE | SL_H1_F_EXPECT_CONTINUE |
                                      SL_H1_F_HAS_CONN_HEADER);
    assert_slice(r.hdrs[5].value, "");
    assert_slice(r.hdrs[6].value, "padded value");
    assert_slice(r.hdrs[7].value, "caf\xc3\xa9");
    assert_slice(r.hdrs[8].value, "a\tb");

    static const char ex[] = "PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue-ish\r\n\r\n";
    req_ok("expect other", IN(ex), &r);
    assert_int_equal(r.req.flags, 0);
    static const char ex10[] = "PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n";
    req_ok("expect in http/1.0", IN(ex10), &r);
    assert_int_equal(r.req.flags, 0);
}

static void test_req_limits(void **state)
{
    (void)state;
    struct req_result r;
    char big[9000];
    struct sl_h1_limits l = {.max_head_bytes = 64, .max_headers = 3, .max_uri_bytes = 16};

    /* head exactly at the limit is fine, one byte more is not */
    static const char h64[] =
        "GET /0123456789abcde HTTP/1.1\r\nHost: h\r\nX-Fill: 012345678901\r\n\r\n";
    assert_int_equal(sizeof(h64) - 1, 64);
    req_all_ways("head at limit", IN(h64), &l, MAXH, &r);
    assert_int_equal(r.st, SL_DONE);
    static const char h65[] =
        "GET /0123456789abcde HTTP/1.1\r\nHost: h\r\nX-Fill: 0123456789012\r\n\r\n";
    req_err_l("head over limit", IN(h65), &l, MAXH, SL_H1_ERR_HEADERS_TOO_LARGE);
    /* incomplete head at the limit: no need to wait for the rest */
    req_err_l("incomplete head over limit", h65, 64, &l, MAXH, SL_H1_ERR_HEADERS_TOO_LARGE);

    /* target at 16 ok, 17 is 414 */
    static const char u17[] = "GET /0123456789abcdef HTTP/1.1\r\nHost: h\r\n\r\n";
    req_err_l("uri over limit", IN(u17), &l, MAXH, SL_H1_ERR_URI_TOO_LONG);

    /* incomplete request line longer than max_uri + 64 */
    struct sl_h1_limits lu = {.max_head_bytes = 8192, .max_headers = 8, .max_uri_bytes = 100};
    memcpy(big, "GET /", 5);
    memset(big + 5, 'a', sizeof big - 5);
    req_err_l("incomplete long request line", big, 5 + 200, &lu, MAXH, SL_H1_ERR_URI_TOO_LONG);
    struct sl_h1_head_state st = {0};
    assert_int_equal(req_call(&st, big, 100 + 64, &lu, MAXH, &r), SL_AGAIN);
    assert_int_equal(req_call(&st, big, 100 + 65, &lu, MAXH, &r), SL_ERROR);
    assert_int_equal(r.err, SL_H1_ERR_URI_TOO_LONG);

    /* header count: limit 3, and the caller's smaller array */
    static const char h3[] = "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\n\r\n";
    static const char h4[] = "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
    struct sl_h1_limits lh = {.max_head_bytes = 8192, .max_headers = 3, .max_uri_bytes = 100};
    req_all_ways("three headers", IN(h3), &lh, MAXH, &r);
    assert_int_equal(r.st, SL_DONE);
    req_err_l("four headers", IN(h4), &lh, MAXH, SL_H1_ERR_TOO_MANY_HEADERS);
    req_err_l("array smaller than limit", IN(h3), &lim, 2, SL_H1_ERR_TOO_MANY_HEADERS);
    req_err_l("no array", IN(h3), &lim, 0, SL_H1_ERR_TOO_MANY_HEADERS);

    /* nine leading empty lines */
    static const char lead9[] =
        "\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n";
    req_err("nine leading crlf", IN(lead9), SL_H1_ERR_BAD_REQUEST_LINE);

    /* zero limits mean unlimited */
    struct sl_h1_limits l0 = {0};
    req_all_ways("zero limits", IN(h4), &l0, MAXH, &r);
    assert_int_equal(r.st, SL_DONE);
    struct sl_h1_head_state s0 = {0};
    assert_int_equal(sl_h1_parse_request(&s0, h4, sizeof(h4) - 1, NULL, &r.req, r.hdrs, MAXH, NULL),
                     SL_DONE);
}

struct err_case {
    const char *name;
    const char *in;
    size_t len;
    enum sl_h1_err err;
};

#define E(name, s, e)                                                                              \
    {                                                                                              \
        name, s, sizeof(s) - 1, SL_H1_ERR_##e                                                      \
    }
#define RL(line) line "\r\nHost: h\r\n\r\n"
#define HD(hdrs) "GET / HTTP/1.1\r\nHost: h\r\n" hdrs "\r\n"
#define PH(hdrs) "POST / HTTP/1.1\r\nHost: h\r\n" hdrs "\r\n"

static const struct err_case req_errors[] = {
    /* request line */
    E("double space", RL("GET  / HTTP/1.1"), BAD_REQUEST_LINE),
    E("space before version", RL("GET /  HTTP/1.1"), BAD_REQUEST_LINE),
    E("trailing space", RL("GET / HTTP/1.1 "), BAD_REQUEST_LINE),
    E("leading space", RL(" GET / HTTP/1.1"), BAD_REQUEST_LINE),
    E("tab separator", RL("GET\t/ HTTP/1.1"), BAD_REQUEST_LINE),
    E("no method", RL("/ HTTP/1.1"), BAD_REQUEST_LINE),
    E("bad method char", RL("G(T / HTTP/1.1"), BAD_REQUEST_LINE),
    E("no target", RL("GET HTTP/1.1"), BAD_REQUEST_LINE),
    E("http/0.9", "GET /\r\n\r\n", BAD_REQUEST_LINE),
    E("del in target", RL("GET /\x7f HTTP/1.1"), BAD_REQUEST_LINE),
    E("high byte in target", RL("GET /caf\xc3\xa9 HTTP/1.1"), BAD_REQUEST_LINE),
    E("ctl in target", RL("GET /\x01 HTTP/1.1"), BAD_REQUEST_LINE),
    E("nul in target", RL("GET /a\0b HTTP/1.1"), BAD_REQUEST_LINE),
    E("tab in target", RL("GET /a\tb HTTP/1.1"), BAD_REQUEST_LINE),
    E("fragment", RL("GET /a#b HTTP/1.1"), BAD_REQUEST_LINE),
    E("star not options", RL("GET * HTTP/1.1"), BAD_REQUEST_LINE),
    E("star with more", RL("OPTIONS *x HTTP/1.1"), BAD_REQUEST_LINE),
    E("authority not connect", RL("GET example.com:80 HTTP/1.1"), BAD_REQUEST_LINE),
    E("connect origin", RL("CONNECT /x HTTP/1.1"), BAD_REQUEST_LINE),
    E("connect no port", RL("CONNECT example.com HTTP/1.1"), BAD_REQUEST_LINE),
    E("connect bad port", RL("CONNECT example.com:99999 HTTP/1.1"), BAD_REQUEST_LINE),
    E("absolute userinfo", RL("GET http://user@host/ HTTP/1.1"), BAD_REQUEST_LINE),
    E("absolute other scheme", RL("GET ftp://host/ HTTP/1.1"), BAD_REQUEST_LINE),
    E("absolute empty host", RL("GET http:///x HTTP/1.1"), BAD_REQUEST_LINE),
    E("absolute scheme only", RL("GET http:// HTTP/1.1"), BAD_REQUEST_LINE),
    E("relative", RL("GET a/b HTTP/1.1"), BAD_REQUEST_LINE),
    E("http/2.0", RL("GET / HTTP/2.0"), BAD_VERSION),
    E("http/1.2", RL("GET / HTTP/1.2"), BAD_VERSION),
    E("http/0.9 version", RL("GET / HTTP/0.9"), BAD_VERSION),
    E("http/1.10", RL("GET / HTTP/1.10"), BAD_REQUEST_LINE),
    E("http/1", RL("GET / HTTP/1"), BAD_REQUEST_LINE),
    E("lowercase http", RL("GET / http/1.1"), BAD_REQUEST_LINE),
    E("garbage version", RL("GET / XTTP/1.1"), BAD_REQUEST_LINE),
    E("http/2", RL("GET / HTTP/2"), BAD_REQUEST_LINE),
    /* line endings */
    E("bare lf request line", "GET / HTTP/1.1\nHost: h\r\n\r\n", BAD_LINE_ENDING),
    E("bare lf header", "GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n", BAD_LINE_ENDING),
    E("bare lf end", "GET / HTTP/1.1\r\nHost: h\r\n\n", BAD_LINE_ENDING),
    E("bare lf before end", "GET / HTTP/1.1\r\nHost: h\n\r\n", BAD_LINE_ENDING),
    E("all lf", "GET / HTTP/1.1\nHost: h\n\n", BAD_LINE_ENDING),
    E("bare cr request line", RL("GET /\r HTTP/1.1"), BAD_LINE_ENDING),
    E("bare cr end of request line", "GET / HTTP/1.1\r\rHost: h\r\n\r\n", BAD_LINE_ENDING),
    E("bare cr in value", HD("X: a\rb\r\n"), BAD_LINE_ENDING),
    E("cr cr lf", HD("X: a\r\r\n"), BAD_LINE_ENDING),
    E("bare cr in name", HD("X\rY: a\r\n"), BAD_LINE_ENDING),
    E("bare cr final", "GET / HTTP/1.1\r\nHost: h\r\n\r\r\n\r\n", BAD_LINE_ENDING),
    E("leading bare lf", "\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", BAD_LINE_ENDING),
    E("leading crlf then lf", "\r\n\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", BAD_LINE_ENDING),
    /* header names */
    E("space before colon", HD("X-A : b\r\n"), BAD_HEADER_NAME),
    E("tab before colon", HD("X-A\t: b\r\n"), BAD_HEADER_NAME),
    E("te space before colon", PH("Transfer-Encoding : chunked\r\n"), BAD_HEADER_NAME),
    E("empty name", HD(": b\r\n"), BAD_HEADER_NAME),
    E("bad name char", HD("X(A: b\r\n"), BAD_HEADER_NAME),
    E("high byte name", HD("X\xc3\xa9: b\r\n"), BAD_HEADER_NAME),
    E("no colon", HD("X-A b\r\n"), BAD_HEADER_NAME),
    E("no colon eol", HD("X-A\r\n"), BAD_HEADER_NAME),
    E("nul in name", HD("X\0A: b\r\n"), BAD_HEADER_NAME),
    /* obs-fold */
    E("obs-fold sp", HD("X: a\r\n b\r\n"), OBS_FOLD),
    E("obs-fold tab", HD("X: a\r\n\tb\r\n"), OBS_FOLD),
    E("ws before first header", "GET / HTTP/1.1\r\n Host: h\r\n\r\n", OBS_FOLD),
    E("folded te", PH("Transfer-Encoding: chunked\r\n , gzip\r\n"), OBS_FOLD),
    /* the empty TE line is judged before the fold is seen; rejected either way */
    E("folded te empty", PH("Transfer-Encoding:\r\n chunked\r\n"), BAD_TRANSFER_ENCODING),
    /* header values */
    E("nul in value", HD("X: a\0b\r\n"), BAD_HEADER_VALUE),
    E("ctl in value", HD("X: a\x01\r\n"), BAD_HEADER_VALUE),
    E("del in value", HD("X: a\x7f\r\n"), BAD_HEADER_VALUE),
    E("vt in te",
      PH("Transfer-Encoding: \x0b"
         "chunked\r\n"),
      BAD_HEADER_VALUE),
    E("ff in value", HD("X: \x0c\r\n"), BAD_HEADER_VALUE),
    E("esc in long value",
      HD("X: 0123456789abcdef0123456789\x1b"
         "abcdef\r\n"),
      BAD_HEADER_VALUE),
    /* content-length */
    E("cl letters", PH("Content-Length: abc\r\n"), BAD_CONTENT_LENGTH),
    E("cl plus", PH("Content-Length: +5\r\n"), BAD_CONTENT_LENGTH),
    E("cl minus", PH("Content-Length: -5\r\n"), BAD_CONTENT_LENGTH),
    E("cl inner space", PH("Content-Length: 5 5\r\n"), BAD_CONTENT_LENGTH),
    E("cl list", PH("Content-Length: 5, 5\r\n"), BAD_CONTENT_LENGTH),
    E("cl list nospace", PH("Content-Length: 5,5\r\n"), BAD_CONTENT_LENGTH),
    E("cl empty", PH("Content-Length:\r\n"), BAD_CONTENT_LENGTH),
    E("cl hex", PH("Content-Length: 0x5\r\n"), BAD_CONTENT_LENGTH),
    E("cl decimal", PH("Content-Length: 5.0\r\n"), BAD_CONTENT_LENGTH),
    E("cl 2^62+1", PH("Content-Length: 4611686018427387905\r\n"), BAD_CONTENT_LENGTH),
    E("cl 2^64", PH("Content-Length: 18446744073709551616\r\n"), BAD_CONTENT_LENGTH),
    E("cl 20 digits", PH("Content-Length: 00000000000000000001\r\n"), BAD_CONTENT_LENGTH),
    E("cl duplicate equal", PH("Content-Length: 5\r\nContent-Length: 5\r\n"), BAD_CONTENT_LENGTH),
    E("cl duplicate differ", PH("Content-Length: 5\r\ncontent-length: 6\r\n"), BAD_CONTENT_LENGTH),
    E("cl high byte", PH("Content-Length: 5\xc2\xa0\r\n"), BAD_CONTENT_LENGTH),
    /* transfer-encoding */
    E("te gzip", PH("Transfer-Encoding: gzip\r\n"), BAD_TRANSFER_ENCODING),
    E("te identity", PH("Transfer-Encoding: identity\r\n"), BAD_TRANSFER_ENCODING),
    E("te gzip chunked", PH("Transfer-Encoding: gzip, chunked\r\n"), BAD_TRANSFER_ENCODING),
    E("te chunked twice list", PH("Transfer-Encoding: chunked, chunked\r\n"),
      BAD_TRANSFER_ENCODING),
    E("te chunked twice", PH("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
      BAD_TRANSFER_ENCODING),
    E("te split", PH("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"),
      BAD_TRANSFER_ENCODING),
    E("te params", PH("Transfer-Encoding: chunked;q=1\r\n"), BAD_TRANSFER_ENCODING),
    E("te xchunked", PH("Transfer-Encoding: xchunked\r\n"), BAD_TRANSFER_ENCODING),
    E("te chunkedx", PH("Transfer-Encoding: chunked-x\r\n"), BAD_TRANSFER_ENCODING),
    E("te empty", PH("Transfer-Encoding:\r\n"), BAD_TRANSFER_ENCODING),
    E("te quoted", PH("Transfer-Encoding: \"chunked\"\r\n"), BAD_TRANSFER_ENCODING),
    E("te nbsp",
      PH("Transfer-Encoding: \xa0"
         "chunked\r\n"),
      BAD_TRANSFER_ENCODING),
    E("te comma", PH("Transfer-Encoding: chunked,\r\n"), BAD_TRANSFER_ENCODING),
    E("te http/1.0", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
      BAD_TRANSFER_ENCODING),
    E("cl then te", PH("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"), CL_AND_TE),
    E("te then cl", PH("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"), CL_AND_TE),
    E("te then cl 0", PH("Transfer-Encoding: chunked\r\nContent-Length: 0\r\n"), CL_AND_TE),
    /* host */
    E("missing host", "GET / HTTP/1.1\r\nX: y\r\n\r\n", MISSING_HOST),
    E("missing host absolute", "GET http://h/ HTTP/1.1\r\n\r\n", MISSING_HOST),
    E("duplicate host", HD("Host: h\r\n"), DUPLICATE_HOST),
    E("duplicate host other", HD("host: evil\r\n"), DUPLICATE_HOST),
    E("empty host", "GET / HTTP/1.1\r\nHost: \r\n\r\n", BAD_HOST),
    E("host space", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", BAD_HOST),
    E("host slash", "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", BAD_HOST),
    E("host userinfo", "GET / HTTP/1.1\r\nHost: u@h\r\n\r\n", BAD_HOST),
    E("host bad bracket", "GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", BAD_HOST),
    E("host empty bracket", "GET / HTTP/1.1\r\nHost: []\r\n\r\n", BAD_HOST),
    E("host after bracket", "GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", BAD_HOST),
    E("host empty port", "GET / HTTP/1.1\r\nHost: h:\r\n\r\n", BAD_HOST),
    E("host big port", "GET / HTTP/1.1\r\nHost: h:65536\r\n\r\n", BAD_HOST),
    E("host alpha port", "GET / HTTP/1.1\r\nHost: h:8o\r\n\r\n", BAD_HOST),
    E("host two ports", "GET / HTTP/1.1\r\nHost: h:80:80\r\n\r\n", BAD_HOST),
    E("host bad pct", "GET / HTTP/1.1\r\nHost: %zz\r\n\r\n", BAD_HOST),
    E("host short pct", "GET / HTTP/1.1\r\nHost: a%4\r\n\r\n", BAD_HOST),
    E("host high byte", "GET / HTTP/1.1\r\nHost: caf\xc3\xa9\r\n\r\n", BAD_HOST),
    E("host only port", "GET / HTTP/1.1\r\nHost: :80\r\n\r\n", BAD_HOST),
    E("host http/1.0 bad", "GET / HTTP/1.0\r\nHost: a b\r\n\r\n", BAD_HOST),
};

static void test_req_errors(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof req_errors / sizeof req_errors[0]; i++) {
        const struct err_case *c = &req_errors[i];
        req_err(c->name, c->in, c->len, c->err);
    }
}

/* Every byte value in the target and in a value: exactly the allowed classes pass. */
static void test_req_byte_classes(void **state)
{
    (void)state;
    struct req_result *r = malloc(sizeof(*r));
    assert_non_null(r);
    for (int c = 0; c < 256; c++) {
        char buf[128];
        int n = snprintf(buf, sizeof buf, "GET /a%cb HTTP/1.1\r\nHost: h\r\n\r\n", 'X');
        buf[6] = (char)c;
        struct sl_h1_head_state st = {0};
        req_call(&st, buf, (size_t)n, &lim, MAXH, r);
        bool ok = c >= 0x21 && c <= 0x7e && c != '#';
        if (ok != (r->st == SL_DONE))
            fail_msg("target byte 0x%02x: %s", c, sl_h1_err_name(r->err));

        n = snprintf(buf, sizeof buf,
                     "GET / HTTP/1.1\r\nHost: h\r\nX: 0123456789%c0123456789\r\n\r\n", 'X');
        buf[n - 15] = (char)c;
        st.scanned = 0;
        req_call(&st, buf, (size_t)n, &lim, MAXH, r);
        ok = c == '\t' || c >= 0x20;
        ok = ok && c != 0x7f;
        if (c == '\r' || c == '\n') {
            if (r->st != SL_ERROR || r->err != SL_H1_ERR_BAD_LINE_ENDING)
                fail_msg("value byte 0x%02x: %s", c, sl_h1_err_name(r->err));
        } else if (ok != (r->st == SL_DONE)) {
            fail_msg("value byte 0x%02x: %s", c, sl_h1_err_name(r->err));
        } else if (!ok && r->err != SL_H1_ERR_BAD_HEADER_VALUE) {
            fail_msg("value byte 0x%02x: %s", c, sl_h1_err_name(r->err));
        }
        cases_run += 2;
    }
    free(r);
}

static void test_err_table(void **state)
{
    (void)state;
    assert_int_equal(sl_h1_err_status(SL_H1_ERR_NONE), 0);
    assert_int_equal(sl_h1_err_status(SL_H1_ERR_BAD_REQUEST_LINE), 400);
    assert_int_equal(sl_h1_err_status(SL_H1_ERR_BAD_VERSION), 505);
    assert_int_equal(sl_h1_err_status(SL_H1_ERR_URI_TOO_LONG), 414);
    assert_int_equal(sl_h1_err_status(SL_H1_ERR_HEADERS_TOO_LARGE), 431);
    assert_int_equal(sl_h1_err_status(SL_H1_ERR_TOO_MANY_HEADERS), 431);
    assert_int_equal(sl_h1_err_status(SL_H1_ERR_CL_AND_TE), 400);
    assert_int_equal(sl_h1_err_status(SL_H1_ERR_BAD_CHUNK), 400);
    assert_int_equal(sl_h1_err_status(SL_H1_ERR_CHUNK_TOO_LARGE), 400);
    assert_int_equal(sl_h1_err_status(SL_H1_ERR_BAD_STATUS_LINE), 502);
    assert_int_equal(sl_h1_err_status(SL_H1_ERR_COUNT), 400);
    assert_string_equal(sl_h1_err_name(SL_H1_ERR_CL_AND_TE), "cl_and_te");
    assert_string_equal(sl_h1_err_name(SL_H1_ERR_COUNT), "unknown");
    for (int i = 1; i < SL_H1_ERR_COUNT; i++) {
        int s = sl_h1_err_status((enum sl_h1_err)i);
        assert_true(s == 400 || s == 414 || s == 431 || s == 505 || s == 502);
        const char *n = sl_h1_err_name((enum sl_h1_err)i);
        assert_non_null(n);
        assert_true(strlen(n) > 0);
        for (int j = 0; j < i; j++)
            assert_string_not_equal(n, sl_h1_err_name((enum sl_h1_err)j));
    }
}

/* ---- responses ------------------------------------------------------------------------ */

struct resp_result {
    enum sl_status st;
    enum sl_h1_err err;
    struct sl_h1_response resp;
    struct sl_h1_header hdrs[MAXH];
};

static void resp_call(struct sl_h1_head_state *st, const char *buf, size_t len, bool head,
                      struct resp_result *r)
{
    r->err = SL_H1_ERR_COUNT;
    r->st = sl_h1_parse_response(st, buf, len, &lim, head, &r->resp, r->hdrs, MAXH, &r->err);
}

static void resp_same(const char *name, const struct resp_result *a, const char *abase,
                      const struct resp_result *b, const char *bbase)
{
    if (a->st != b->st || a->err != b->err)
        fail_msg("%s: status %d/%d err %s/%s", name, a->st, b->st, sl_h1_err_name(a->err),
                 sl_h1_err_name(b->err));
    if (a->st != SL_DONE)
        return;
    const struct sl_h1_response *x = &a->resp, *y = &b->resp;
    if (x->head_len != y->head_len || x->header_count != y->header_count || x->body != y->body ||
        x->content_length != y->content_length || x->flags != y->flags ||
        x->version_minor != y->version_minor || x->status != y->status ||
        x->keepalive_timeout_ms != y->keepalive_timeout_ms ||
        !slice_at_eq(x->reason, abase, y->reason, bbase))
        fail_msg("%s: results differ between feeding modes", name);
}

static void resp_all_ways(const char *name, const char *in, size_t len, bool head,
                          struct resp_result *out)
{
    struct sl_h1_head_state st = {0};
    cur_len = len;
    resp_call(&st, in, len, head, out);
    if (out->st == SL_AGAIN)
        fail_msg("%s: incomplete input", name);
    struct resp_result *r = malloc(sizeof(*r));
    assert_non_null(r);
    struct sl_h1_head_state gs = {0};
    bool finished = false;
    for (size_t k = 0; k <= len && !finished; k++) {
        char *b = dup_exact(in, k);
        resp_call(&gs, b, k, head, r);
        if (r->st != SL_AGAIN) {
            if (out->st == SL_DONE && k != out->resp.head_len)
                fail_msg("%s: prefix %zu finished early", name, k);
            resp_same(name, out, in, r, b);
            finished = true;
        }
        free(b);
    }
    if (!finished)
        fail_msg("%s: byte-by-byte never finished", name);
    for (size_t k = 0; k <= len; k++) {
        struct sl_h1_head_state ss = {0};
        char *b1 = dup_exact(in, k);
        resp_call(&ss, b1, k, head, r);
        if (r->st == SL_AGAIN) {
            char *b2 = dup_exact(in, len);
            resp_call(&ss, b2, len, head, r);
            resp_same(name, out, in, r, b2);
            free(b2);
        } else {
            resp_same(name, out, in, r, b1);
        }
        free(b1);
    }
    free(r);
    cases_run++;
}

struct resp_case {
    const char *name;
    const char *in;
    size_t len;
    bool head;
    int status;
    enum sl_h1_body body;
    uint64_t cl;
    uint64_t ka_ms;
    unsigned flags;
    const char *reason;
};

#define R(name, s, head, status, body, cl, ka, flags, reason)                                      \
    {                                                                                              \
        name, s, sizeof(s) - 1, head, status, SL_H1_BODY_##body, cl, ka, flags, reason             \
    }

static const struct resp_case resp_ok_cases[] = {
    R("200 cl", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false, 200, LENGTH, 5, 0, 0,
      "OK"),
    R("200 chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false, 200, CHUNKED,
      0, 0, 0, "OK"),
    R("200 until close", "HTTP/1.1 200 OK\r\nServer: x\r\n\r\n", false, 200, UNTIL_CLOSE, 0, 0, 0,
      "OK"),
    R("http/1.0 until close", "HTTP/1.0 200 OK\r\n\r\n", false, 200, UNTIL_CLOSE, 0, 0, 0, "OK"),
    R("http/1.0 cl", "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n", false, 200, LENGTH, 3, 0, 0,
      "OK"),
    R("204 with cl", "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n", false, 204, NONE, 10,
      0, 0, "No Content"),
    R("204 with te", "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", false, 204,
      NONE, 0, 0, 0, "No Content"),
    R("204 with cl and te",
      "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n", false,
      204, NONE, 1, 0, 0, "No Content"),
    R("304", "HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", false, 304, NONE, 99, 0, 0,
      "Not Modified"),
    R("100 continue", "HTTP/1.1 100 Continue\r\n\r\n", false, 100, NONE, 0, 0, 0, "Continue"),
    R("101 upgrade",
      "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
      false, 101, NONE, 0, 0, SL_H1_F_CONN_UPGRADE | SL_H1_F_HAS_CONN_HEADER,
      "Switching Protocols"),
    R("103 with te", "HTTP/1.1 103 Early Hints\r\nTransfer-Encoding: chunked\r\n\r\n", false, 103,
      NONE, 0, 0, 0, "Early Hints"),
    R("head response", "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", true, 200, NONE, 1234, 0,
      0, "OK"),
    R("head chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", true, 200, NONE, 0,
      0, 0, "OK"),
    R("no reason no space", "HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", false, 200, LENGTH, 0, 0,
      0, ""),
    R("empty reason", "HTTP/1.1 404 \r\n\r\n", false, 404, UNTIL_CLOSE, 0, 0, 0, ""),
    R("reason with spaces", "HTTP/1.1 500 Internal  Server\tError \r\n\r\n", false, 500,
      UNTIL_CLOSE, 0, 0, 0, "Internal  Server\tError "),
    R("reason obs-text", "HTTP/1.1 200 D\xc3\xa9j\xc3\xa0\r\n\r\n", false, 200, UNTIL_CLOSE, 0, 0,
      0, "D\xc3\xa9j\xc3\xa0"),
    R("599", "HTTP/1.1 599 X\r\n\r\n", false, 599, UNTIL_CLOSE, 0, 0, 0, "X"),
    R("keep-alive timeout",
      "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5, max=100\r\n"
      "Content-Length: 0\r\n\r\n",
      false, 200, LENGTH, 0, 5000, SL_H1_F_CONN_KEEPALIVE | SL_H1_F_HAS_CONN_HEADER, "OK"),
    R("keep-alive timeout second", "HTTP/1.1 200 OK\r\nkeep-alive: max=5,Timeout=30\r\n\r\n", false,
      200, UNTIL_CLOSE, 0, 30000, 0, "OK"),
    R("keep-alive garbage", "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=abc\r\n\r\n", false, 200,
      UNTIL_CLOSE, 0, 0, 0, "OK"),
    R("keep-alive huge", "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=99999999999999999999999\r\n\r\n",
      false, 200, UNTIL_CLOSE, 0, 86400000, 0, "OK"),
    R("connection close", "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false, 200, UNTIL_CLOSE,
      0, 0, SL_H1_F_CONN_CLOSE | SL_H1_F_HAS_CONN_HEADER, "OK"),
};

static void test_resp_ok(void **state)
{
    (void)state;
    struct resp_result r;
    for (size_t i = 0; i < sizeof resp_ok_cases / sizeof resp_ok_cases[0]; i++) {
        const struct resp_case *c = &resp_ok_cases[i];
        resp_all_ways(c->name, c->in, c->len, c->head, &r);
        if (r.st != SL_DONE)
            fail_msg("%s: %s", c->name, sl_h1_err_name(r.err));
        if (r.resp.status != c->status || r.resp.body != c->body ||
            r.resp.content_length != c->cl || r.resp.keepalive_timeout_ms != c->ka_ms ||
            r.resp.flags != c->flags)
            fail_msg("%s: status %d body %d cl %llu ka %llu flags %u", c->name, r.resp.status,
                     r.resp.body, (unsigned long long)r.resp.content_length,
                     (unsigned long long)r.resp.keepalive_timeout_ms, r.resp.flags);
        assert_slice(r.resp.reason, c->reason);
        const char *body = strstr(c->in, "\r\n\r\n");
        assert_int_equal(r.resp.head_len, (size_t)(body - c->in) + 4);
    }
}

static const struct err_case resp_errors[] = {
    E("status 99", "HTTP/1.1 099 X\r\n\r\n", BAD_STATUS_LINE),
    E("status 600", "HTTP/1.1 600 X\r\n\r\n", BAD_STATUS_LINE),
    E("status 4 digits", "HTTP/1.1 2000 OK\r\n\r\n", BAD_STATUS_LINE),
    E("status 2 digits", "HTTP/1.1 20 OK\r\n\r\n", BAD_STATUS_LINE),
    E("status alpha", "HTTP/1.1 20a OK\r\n\r\n", BAD_STATUS_LINE),
    E("http/2", "HTTP/2 200 OK\r\n\r\n", BAD_STATUS_LINE),
    E("http/1.2", "HTTP/1.2 200 OK\r\n\r\n", BAD_STATUS_LINE),
    E("http/2.0", "HTTP/2.0 200 OK\r\n\r\n", BAD_STATUS_LINE),
    E("lowercase", "http/1.1 200 OK\r\n\r\n", BAD_STATUS_LINE),
    E("double space", "HTTP/1.1  200 OK\r\n\r\n", BAD_STATUS_LINE),
    E("tab", "HTTP/1.1\t200 OK\r\n\r\n", BAD_STATUS_LINE),
    E("ctl in reason", "HTTP/1.1 200 O\x01K\r\n\r\n", BAD_STATUS_LINE),
    E("nul in reason", "HTTP/1.1 200 O\0K\r\n\r\n", BAD_STATUS_LINE),
    E("leading crlf", "\r\nHTTP/1.1 200 OK\r\n\r\n", BAD_STATUS_LINE),
    E("garbage", "FOO\r\n\r\n", BAD_STATUS_LINE),
    E("short", "HTTP/1.1\r\n\r\n", BAD_STATUS_LINE),
    E("bare lf status", "HTTP/1.1 200 OK\nServer: x\r\n\r\n", BAD_LINE_ENDING),
    E("bare lf end", "HTTP/1.1 200 OK\r\n\n", BAD_LINE_ENDING),
    E("bare cr reason", "HTTP/1.1 200 O\rK\r\n\r\n", BAD_LINE_ENDING),
    E("cl and te", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
      CL_AND_TE),
    E("cl dup", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
      BAD_CONTENT_LENGTH),
    E("cl dup on 204", "HTTP/1.1 204 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
      BAD_CONTENT_LENGTH),
    E("cl bad", "HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\n", BAD_CONTENT_LENGTH),
    E("te gzip", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", BAD_TRANSFER_ENCODING),
    E("te list", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
      BAD_TRANSFER_ENCODING),
    E("te twice",
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
      BAD_TRANSFER_ENCODING),
    E("te http/1.0", "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
      BAD_TRANSFER_ENCODING),
    E("obs-fold", "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", OBS_FOLD),
    E("space before colon", "HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\n", BAD_HEADER_NAME),
    E("value ctl", "HTTP/1.1 200 OK\r\nX: \x7f\r\n\r\n", BAD_HEADER_VALUE),
};

static void test_resp_errors(void **state)
{
    (void)state;
    struct resp_result r;
    for (size_t i = 0; i < sizeof resp_errors / sizeof resp_errors[0]; i++) {
        const struct err_case *c = &resp_errors[i];
        resp_all_ways(c->name, c->in, c->len, false, &r);
        if (r.st != SL_ERROR || r.err != c->err)
            fail_msg("%s: expected %s, got %d %s", c->name, sl_h1_err_name(c->err), r.st,
                     sl_h1_err_name(r.err));
    }
    /* response limits */
    struct sl_h1_limits l = {.max_head_bytes = 32, .max_headers = 1};
    struct sl_h1_head_state st = {0};
    static const char big[] = "HTTP/1.1 200 OK\r\nServer: 0123456789abcdef\r\n\r\n";
    assert_int_equal(
        sl_h1_parse_response(&st, big, sizeof big - 1, &l, false, &r.resp, r.hdrs, MAXH, &r.err),
        SL_ERROR);
    assert_int_equal(r.err, SL_H1_ERR_HEADERS_TOO_LARGE);
    static const char two[] = "HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\n\r\n";
    st.scanned = 0;
    assert_int_equal(
        sl_h1_parse_response(&st, two, sizeof two - 1, &l, false, &r.resp, r.hdrs, MAXH, &r.err),
        SL_ERROR);
    assert_int_equal(r.err, SL_H1_ERR_TOO_MANY_HEADERS);
}

/* ---- chunked -------------------------------------------------------------------------- */

struct chunk_out {
    enum sl_status st;
    enum sl_h1_err err;
    char data[8192];
    size_t data_len;
    size_t used; /* input bytes consumed in total */
};

/* Feeds one piece, looping while the decoder says SL_OK. */
static void chunk_feed(struct sl_h1_chunked *ch, const char *piece, size_t n, struct chunk_out *o)
{
    char *b = dup_exact(piece, n);
    size_t pos = 0;
    for (;;) {
        size_t used = 12345;
        struct sl_slice d = {NULL, 99};
        enum sl_h1_err err = SL_H1_ERR_COUNT;
        enum sl_status s = sl_h1_chunked_parse(ch, b + pos, n - pos, &used, &d, &err);
        assert_true(used <= n - pos);
        assert_true(d.len <= used);
        if (d.len) {
            assert_true(d.ptr >= b + pos && d.ptr + d.len <= b + pos + used);
            assert_true(o->data_len + d.len <= sizeof o->data);
            memcpy(o->data + o->data_len, d.ptr, d.len);
            o->data_len += d.len;
        }
        pos += used;
        o->used += used;
        o->st = s;
        if (s == SL_ERROR)
            o->err = err;
        if (s == SL_AGAIN)
            assert_int_equal(pos, n);
        if (s == SL_OK) {
            assert_true(used > 0);
            continue;
        }
        break;
    }
    free(b);
}

static void chunk_same(const char *name, const struct chunk_out *a, const struct chunk_out *b,
                       const char *how)
{
    if (a->st != b->st || (a->st == SL_ERROR && a->err != b->err) || a->data_len != b->data_len ||
        memcmp(a->data, b->data, a->data_len) != 0 || (a->st == SL_DONE && a->used != b->used))
        fail_msg("%s: %s differs (st %d/%d err %s/%s data %zu/%zu used %zu/%zu)", name, how, a->st,
                 b->st, sl_h1_err_name(a->err), sl_h1_err_name(b->err), a->data_len, b->data_len,
                 a->used, b->used);
}

static void chunk_all_ways(const char *name, const char *in, size_t len, struct chunk_out *out)
{
    struct sl_h1_chunked ch;
    sl_h1_chunked_init(&ch);
    memset(out, 0, sizeof(*out));
    chunk_feed(&ch, in, len, out);

    struct chunk_out *o = malloc(sizeof(*o));
    assert_non_null(o);

    /* byte by byte, stopping when the decoder finishes */
    struct sl_h1_chunked bc = {0};
    memset(o, 0, sizeof(*o));
    for (size_t k = 0; k < len; k++) {
        chunk_feed(&bc, in + k, 1, o);
        if (o->st == SL_DONE || o->st == SL_ERROR)
            break;
    }
    if (len == 0)
        chunk_feed(&bc, in, 0, o);
    chunk_same(name, out, o, "byte by byte");

    for (size_t k = 0; k <= len; k++) {
        struct sl_h1_chunked sc = {0};
        memset(o, 0, sizeof(*o));
        chunk_feed(&sc, in, k, o);
        if (o->st == SL_AGAIN)
            chunk_feed(&sc, in + k, len - k, o);
        chunk_same(name, out, o, "split");
    }
    /* after the end, the decoder stays finished */
    if (out->st == SL_DONE || out->st == SL_ERROR) {
        size_t used;
        struct sl_slice d;
        enum sl_h1_err err = SL_H1_ERR_NONE;
        assert_int_equal(sl_h1_chunked_parse(&ch, "5\r\n", 3, &used, &d, &err), out->st);
        assert_int_equal(used, 0);
        assert_int_equal(d.len, 0);
        if (out->st == SL_ERROR)
            assert_int_equal(err, out->err);
    }
    free(o);
    cases_run++;
}

struct chunk_case {
    const char *name;
    const char *in;
    size_t len;
    const char *data;
    size_t rest; /* bytes left after SL_DONE */
};

#define CK(name, s, data, rest)                                                                    \
    {                                                                                              \
        name, s, sizeof(s) - 1, data, rest                                                         \
    }

static const struct chunk_case chunk_ok_cases[] = {
    CK("single", "5\r\nhello\r\n0\r\n\r\n", "hello", 0),
    CK("empty body", "0\r\n\r\n", "", 0),
    CK("multiple", "3\r\nabc\r\nA\r\n0123456789\r\n1\r\nz\r\n0\r\n\r\n", "abc0123456789z", 0),
    CK("hex case", "a\r\n0123456789\r\nB\r\n0123456789x\r\n0\r\n\r\n", "01234567890123456789x", 0),
    CK("leading zeros", "0005\r\nhello\r\n0000\r\n\r\n", "hello", 0),
    CK("16 digits", "0000000000000003\r\nabc\r\n0\r\n\r\n", "abc", 0),
    CK("extensions", "5;name=value\r\nhello\r\n3;a;b=\"q s\"\r\nxyz\r\n0;last\r\n\r\n", "helloxyz",
       0),
    CK("trailers", "2\r\nhi\r\n0\r\nX-Checksum: abc\r\nEmpty:\r\nObs: caf\xc3\xa9\t\r\n\r\n", "hi",
       0),
    CK("next message follows", "1\r\na\r\n0\r\n\r\nGET / HTTP/1.1\r\n", "a", 16),
    CK("crlf in data", "4\r\n\r\n\r\n\r\n0\r\n\r\n", "\r\n\r\n", 0),
    CK("binary data", "3\r\n\0\xff\n\r\n0\r\n\r\n", "\0\xff\n", 0),
};

static void test_chunked_ok(void **state)
{
    (void)state;
    struct chunk_out *o = malloc(sizeof(*o));
    assert_non_null(o);
    for (size_t i = 0; i < sizeof chunk_ok_cases / sizeof chunk_ok_cases[0]; i++) {
        const struct chunk_case *c = &chunk_ok_cases[i];
        chunk_all_ways(c->name, c->in, c->len, o);
        size_t dlen = strlen(c->data);
        if (!strcmp(c->name, "binary data"))
            dlen = 3;
        if (o->st != SL_DONE)
            fail_msg("%s: status %d err %s", c->name, o->st, sl_h1_err_name(o->err));
        if (o->data_len != dlen || memcmp(o->data, c->data, dlen) != 0)
            fail_msg("%s: data mismatch", c->name);
        if (o->used != c->len - c->rest)
            fail_msg("%s: consumed %zu want %zu", c->name, o->used, c->len - c->rest);
    }

    /* a 2^62 chunk is accepted: data flows until input runs out */
    struct sl_h1_chunked ch = {0};
    size_t used;
    struct sl_slice d;
    enum sl_h1_err err;
    static const char huge[] = "4000000000000000\r\nabc";
    assert_int_equal(sl_h1_chunked_parse(&ch, huge, sizeof huge - 1, &used, &d, &err), SL_AGAIN);
    assert_int_equal(used, sizeof huge - 1);
    assert_int_equal(d.len, 3);
    assert_int_equal(ch.remaining, (UINT64_C(1) << 62) - 3);

    /* SL_OK in the middle: data then more framing in the same buffer */
    sl_h1_chunked_init(&ch);
    static const char two[] = "2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n";
    assert_int_equal(sl_h1_chunked_parse(&ch, two, sizeof two - 1, &used, &d, &err), SL_OK);
    assert_int_equal(used, 5);
    assert_int_equal(d.len, 2);
    assert_ptr_equal(d.ptr, two + 3);

    /* size line of exactly 4096 bytes passes, 4097 does not */
    static char line[4200];
    for (int over = 0; over <= 1; over++) {
        size_t n = 0;
        line[n++] = '1';
        line[n++] = ';';
        while (n < 4096 + (size_t)over)
            line[n++] = 'e';
        memcpy(line + n, "\r\nx\r\n0\r\n\r\n", 10);
        n += 10;
        chunk_all_ways(over ? "line 4097" : "line 4096", line, n, o);
        if (over ? (o->st != SL_ERROR || o->err != SL_H1_ERR_BAD_CHUNK) : o->st != SL_DONE)
            fail_msg("size line limit (over=%d): st %d", over, o->st);
    }

    /* trailers: 16 KiB total passes, beyond fails */
    static char tr[17000];
    for (int over = 0; over <= 1; over++) {
        size_t n = 0;
        memcpy(tr, "0\r\n", 3);
        n = 3;
        size_t budget = 16384 + (size_t)over - 2; /* final CRLF counts */
        while (budget > 0) {
            size_t line_len = budget > 1000 ? 1000 : budget;
            if (budget - line_len > 0 && budget - line_len < 6)
                line_len = budget - 6;
            memcpy(tr + n, "X:", 2);
            memset(tr + n + 2, 'v', line_len - 4);
            memcpy(tr + n + line_len - 2, "\r\n", 2);
            n += line_len;
            budget -= line_len;
        }
        memcpy(tr + n, "\r\n", 2);
        n += 2;
        chunk_all_ways(over ? "trailers over" : "trailers at limit", tr, n, o);
        if (over ? (o->st != SL_ERROR || o->err != SL_H1_ERR_BAD_CHUNK) : o->st != SL_DONE)
            fail_msg("trailer limit (over=%d): st %d", over, o->st);
    }
    free(o);
}

static const struct err_case chunk_errors[] = {
    E("leading space", " 5\r\nhello\r\n0\r\n\r\n", BAD_CHUNK),
    E("trailing space", "5 \r\nhello\r\n0\r\n\r\n", BAD_CHUNK),
    E("trailing tab", "5\t\r\nhello\r\n0\r\n\r\n", BAD_CHUNK),
    E("space before ext", "5 ;a\r\nhello\r\n0\r\n\r\n", BAD_CHUNK),
    E("ext only", ";a\r\nhello\r\n0\r\n\r\n", BAD_CHUNK),
    E("empty size line", "\r\nhello\r\n0\r\n\r\n", BAD_CHUNK),
    E("not hex", "g\r\n", BAD_CHUNK),
    E("0x prefix", "0x5\r\nhello\r\n0\r\n\r\n", BAD_CHUNK),
    E("negative", "-1\r\n", BAD_CHUNK),
    E("plus", "+1\r\nx\r\n0\r\n\r\n", BAD_CHUNK),
    E("bare lf size", "5\nhello\r\n0\r\n\r\n", BAD_CHUNK),
    E("bare cr size", "5\rhello\r\n0\r\n\r\n", BAD_CHUNK),
    E("bare lf ext", "5;a\nb\r\nhello\r\n0\r\n\r\n", BAD_CHUNK),
    E("nul ext", "5;a\0b\r\nhello\r\n0\r\n\r\n", BAD_CHUNK),
    E("cr in ext", "5;a\rb\r\nhello\r\n0\r\n\r\n", BAD_CHUNK),
    E("data too long", "5\r\nhelloX\r\n0\r\n\r\n", BAD_CHUNK),
    E("data too short", "5\r\nhell\r\n0\r\n\r\n", BAD_CHUNK),
    E("data then lf", "5\r\nhello\n0\r\n\r\n", BAD_CHUNK),
    E("data then cr", "5\r\nhello\r0\r\n\r\n", BAD_CHUNK),
    E("last chunk bare lf", "0\n\r\n", BAD_CHUNK),
    E("final bare lf", "0\r\n\n", BAD_CHUNK),
    E("final cr cr", "0\r\n\r\r", BAD_CHUNK),
    E("trailer obs-fold", "0\r\nA: b\r\n c\r\n\r\n", BAD_CHUNK),
    E("trailer leading space", "0\r\n A: b\r\n\r\n", BAD_CHUNK),
    E("trailer no colon", "0\r\nAb\r\n\r\n", BAD_CHUNK),
    E("trailer empty name", "0\r\n: b\r\n\r\n", BAD_CHUNK),
    E("trailer space before colon", "0\r\nA : b\r\n\r\n", BAD_CHUNK),
    E("trailer bare lf", "0\r\nA: b\n\r\n", BAD_CHUNK),
    E("trailer bare cr", "0\r\nA: b\rc\r\n\r\n", BAD_CHUNK),
    E("trailer ctl", "0\r\nA: \x01\r\n\r\n", BAD_CHUNK),
    E("17 digits", "00000000000000001\r\nx\r\n0\r\n\r\n", CHUNK_TOO_LARGE),
    E("2^62+1", "4000000000000001\r\n", CHUNK_TOO_LARGE),
    E("2^64-1", "ffffffffffffffff\r\n", CHUNK_TOO_LARGE),
    E("2^64", "10000000000000000\r\n", CHUNK_TOO_LARGE),
};

static void test_chunked_errors(void **state)
{
    (void)state;
    struct chunk_out *o = malloc(sizeof(*o));
    assert_non_null(o);
    for (size_t i = 0; i < sizeof chunk_errors / sizeof chunk_errors[0]; i++) {
        const struct err_case *c = &chunk_errors[i];
        chunk_all_ways(c->name, c->in, c->len, o);
        if (o->st != SL_ERROR || o->err != c->err)
            fail_msg("%s: expected %s, got %d %s", c->name, sl_h1_err_name(c->err), o->st,
                     sl_h1_err_name(o->err));
    }
    free(o);
}

/* A request with a chunked body, head and body decoded back to back from one buffer. */
static void test_request_then_body(void **state)
{
    (void)state;
    static const char in[] = "POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                             "4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\nT: v\r\n\r\n"
                             "GET /next HTTP/1.1\r\nHost: h\r\n\r\n";
    struct req_result r;
    req_ok("req+body", IN(in), &r);
    assert_int_equal(r.req.body, SL_H1_BODY_CHUNKED);
    struct chunk_out *o = malloc(sizeof(*o));
    assert_non_null(o);
    size_t blen = sizeof(in) - 1 - r.req.head_len;
    chunk_all_ways("req body", in + r.req.head_len, blen, o);
    assert_int_equal(o->st, SL_DONE);
    assert_int_equal(o->data_len, 9);
    assert_memory_equal(o->data, "Wikipedia", 9);
    size_t next = r.req.head_len + o->used;
    req_ok("next", in + next, sizeof(in) - 1 - next, &r);
    assert_slice(r.req.path, "/next");
    free(o);
}

static int report(void **state)
{
    (void)state;
    print_message("[ info     ] %zu inputs checked whole, byte by byte and at every split\n",
                  cases_run);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_req_simple_get),
        cmocka_unit_test(test_req_bodies),
        cmocka_unit_test(test_req_forms),
        cmocka_unit_test(test_req_pipelined),
        cmocka_unit_test(test_req_flags_and_values),
        cmocka_unit_test(test_req_limits),
        cmocka_unit_test(test_req_errors),
        cmocka_unit_test(test_req_byte_classes),
        cmocka_unit_test(test_err_table),
        cmocka_unit_test(test_resp_ok),
        cmocka_unit_test(test_resp_errors),
        cmocka_unit_test(test_chunked_ok),
        cmocka_unit_test(test_chunked_errors),
        cmocka_unit_test(test_request_then_body),
    };
    return cmocka_run_group_tests(tests, NULL, report);
}
