/* Unit tests for the PROXY protocol parser and builders: the spec's v1 examples and limits,
 * v2 headers of every command and family with and without TLVs, each rule of the strict
 * syntax, and builder -> parser round trips. Every input is fed whole, as a growing prefix
 * (byte by byte) and split in two at every offset; each piece is copied into a buffer of
 * exactly its length so that ASan catches a read past what the caller handed over. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cmocka.h>

#include "proxy/proxy_proto.h"

#define IN(s) (s), sizeof(s) - 1

static const uint8_t sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

static const char payload[] = "GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n";

/* ---- feeding ---- */

struct outcome {
    enum sl_status st;
    enum sl_pp_err err;
    struct sl_pp_result r;
    size_t auth_off; /* authority.ptr - buffer, or SIZE_MAX when absent */
};

static uint8_t *dup_exact(const void *p, size_t n)
{
    uint8_t *b = malloc(n ? n : 1);
    assert_non_null(b);
    if (n)
        memcpy(b, p, n);
    return b;
}

static struct outcome run(const void *in, size_t len)
{
    struct outcome o;
    memset(&o, 0, sizeof(o));
    uint8_t *b = dup_exact(in, len);
    memset(&o.r, 0xA5, sizeof(o.r));
    struct sl_pp_result untouched = o.r;
    o.err = SL_PP_ERR_COUNT;
    o.st = sl_proxy_proto_parse(b, len, &o.r, &o.err);
    o.auth_off = SIZE_MAX;
    if (o.st == SL_OK) {
        assert_int_equal(o.err, SL_PP_ERR_NONE);
        assert_true(o.r.header_bytes > 0 && o.r.header_bytes <= len);
        if (o.r.authority.ptr) {
            const uint8_t *a = (const uint8_t *)o.r.authority.ptr;
            assert_true(a >= b && a + o.r.authority.len <= b + o.r.header_bytes);
            o.auth_off = (size_t)(a - b);
        }
    } else {
        /* nothing written unless complete */
        assert_memory_equal(&o.r, &untouched, sizeof(o.r));
        if (o.st == SL_AGAIN)
            assert_int_equal(o.err, SL_PP_ERR_NONE);
        else
            assert_int_equal(o.st, SL_ERROR);
    }
    free(b);
    return o;
}

static void same(const char *name, size_t at, const struct outcome *a, const struct outcome *b)
{
    if (a->st != b->st || a->err != b->err)
        fail_msg("%s @%zu: status %d/%d err %s/%s", name, at, a->st, b->st, sl_pp_err_name(a->err),
                 sl_pp_err_name(b->err));
    if (a->st != SL_OK)
        return;
    const struct sl_pp_result *x = &a->r, *y = &b->r;
    if (x->version != y->version || x->is_local != y->is_local || x->v2_family != y->v2_family ||
        x->header_bytes != y->header_bytes || memcmp(&x->src, &y->src, sizeof(x->src)) != 0 ||
        memcmp(&x->dst, &y->dst, sizeof(x->dst)) != 0 || a->auth_off != b->auth_off ||
        x->authority.len != y->authority.len)
        fail_msg("%s @%zu: results differ between feeding modes", name, at);
}

/*
 * Feeds `in` every way and returns the whole-input outcome, which must be complete (SL_OK
 * or SL_ERROR). Every shorter prefix must give SL_AGAIN or exactly that outcome, and SL_OK
 * must appear first at the prefix that ends the header. Also fed with a payload behind it.
 */
static struct outcome all_ways(const char *name, const void *in, size_t len)
{
    struct outcome whole = run(in, len);
    if (whole.st == SL_AGAIN)
        fail_msg("%s: incomplete", name);

    /* byte by byte: the buffer grows one byte per call */
    bool decided = false;
    for (size_t k = 0; k <= len; k++) {
        struct outcome o = run(in, k);
        if (o.st == SL_AGAIN) {
            if (decided)
                fail_msg("%s @%zu: SL_AGAIN after a decision", name, k);
            continue;
        }
        if (!decided && o.st == SL_OK && o.r.header_bytes != k)
            fail_msg("%s @%zu: complete before its last byte arrived", name, k);
        same(name, k, &o, &whole);
        decided = true;
    }

    /* split in two at every offset: first part alone, then the whole, in a new buffer */
    for (size_t k = 0; k < len; k++) {
        struct outcome first = run(in, k);
        if (first.st != SL_AGAIN) {
            same(name, k, &first, &whole);
            continue;
        }
        struct outcome second = run(in, len);
        same(name, k, &second, &whole);
    }

    /* with the connection's payload behind the header: same header, nothing more taken */
    uint8_t *more = malloc(len + sizeof(payload));
    assert_non_null(more);
    memcpy(more, in, len);
    memcpy(more + len, payload, sizeof(payload) - 1);
    struct outcome with = run(more, len + sizeof(payload) - 1);
    free(more);
    if (whole.st == SL_OK)
        same(name, len, &with, &whole);
    else
        assert_int_equal(with.st, SL_ERROR);
    return whole;
}

static struct outcome ok(const char *name, const void *in, size_t len)
{
    struct outcome o = all_ways(name, in, len);
    if (o.st != SL_OK)
        fail_msg("%s: refused: %s", name, sl_pp_err_name(o.err));
    if (o.r.header_bytes != len)
        fail_msg("%s: header_bytes %zu, want %zu", name, o.r.header_bytes, len);
    return o;
}

static void bad(const char *name, const void *in, size_t len, enum sl_pp_err want)
{
    struct outcome o = all_ways(name, in, len);
    if (o.st != SL_ERROR || o.err != want)
        fail_msg("%s: got %s, want %s", name, o.st == SL_OK ? "ok" : sl_pp_err_name(o.err),
                 sl_pp_err_name(want));
}

/* ---- addresses ---- */

static void check_in4(const struct sockaddr_storage *ss, const char *addr, uint16_t port)
{
    const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
    char text[INET_ADDRSTRLEN];
    assert_int_equal(in->sin_family, AF_INET);
    assert_non_null(inet_ntop(AF_INET, &in->sin_addr, text, sizeof(text)));
    assert_string_equal(text, addr);
    assert_int_equal(ntohs(in->sin_port), port);
}

static void check_in6(const struct sockaddr_storage *ss, const char *addr, uint16_t port)
{
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
    uint8_t want[16];
    assert_int_equal(in6->sin6_family, AF_INET6);
    assert_int_equal(inet_pton(AF_INET6, addr, want), 1);
    assert_memory_equal(&in6->sin6_addr, want, 16);
    assert_int_equal(ntohs(in6->sin6_port), port);
    assert_int_equal(in6->sin6_flowinfo, 0);
    assert_int_equal(in6->sin6_scope_id, 0);
}

static void check_unspec(const struct sockaddr_storage *ss)
{
    struct sockaddr_storage zero;
    memset(&zero, 0, sizeof(zero));
    assert_memory_equal(ss, &zero, sizeof(zero));
}

/* ---- v1 ---- */

static void test_v1_spec_examples(void **state)
{
    (void)state;
    struct outcome o = ok("spec example", IN("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"));
    assert_int_equal(o.r.version, 1);
    assert_false(o.r.is_local);
    assert_int_equal(o.r.v2_family, 0);
    assert_null(o.r.authority.ptr);
    check_in4(&o.r.src, "192.168.0.1", 56324);
    check_in4(&o.r.dst, "192.168.0.11", 443);

    o = ok("tcp4 longest", IN("PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"));
    assert_int_equal(o.r.header_bytes, 56);
    check_in4(&o.r.src, "255.255.255.255", 65535);

    o = ok("tcp6 longest", IN("PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                              "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"));
    assert_int_equal(o.r.header_bytes, 104);
    check_in6(&o.r.dst, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535);

    o = ok("unknown short", IN("PROXY UNKNOWN\r\n"));
    assert_int_equal(o.r.header_bytes, 15);
    assert_true(o.r.is_local);
    check_unspec(&o.r.src);
    check_unspec(&o.r.dst);

    o = ok("unknown worst case", IN("PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                                    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"));
    assert_int_equal(o.r.header_bytes, SL_PP_V1_MAX_BYTES);
    assert_true(o.r.is_local);
}

static void test_v1_valid(void **state)
{
    (void)state;
    struct outcome o;
    o = ok("zeros", IN("PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n"));
    check_in4(&o.r.src, "0.0.0.0", 0);
    check_in4(&o.r.dst, "0.0.0.0", 0);

    o = ok("tcp6", IN("PROXY TCP6 2001:db8::1 ::1 1234 443\r\n"));
    check_in6(&o.r.src, "2001:db8::1", 1234);
    check_in6(&o.r.dst, "::1", 443);

    o = ok("tcp6 upper case", IN("PROXY TCP6 2001:DB8::A FE80::1 1 2\r\n"));
    check_in6(&o.r.src, "2001:db8::a", 1);
    check_in6(&o.r.dst, "fe80::1", 2);

    o = ok("tcp6 mapped", IN("PROXY TCP6 ::ffff:1.2.3.4 ::ffff:5.6.7.8 10 20\r\n"));
    check_in6(&o.r.src, "::ffff:1.2.3.4", 10);
    check_in6(&o.r.dst, "::ffff:5.6.7.8", 20);

    o = ok("tcp6 full groups", IN("PROXY TCP6 0001:0002:0003:0004:0005:0006:0007:0008 :: 9 8\r\n"));
    check_in6(&o.r.src, "1:2:3:4:5:6:7:8", 9);
    check_in6(&o.r.dst, "::", 8);

    o = ok("unknown with text", IN("PROXY UNKNOWN anything\x01\xff at all\r\n"));
    assert_true(o.r.is_local);
    o = ok("unknown trailing space", IN("PROXY UNKNOWN \r\n"));
    assert_true(o.r.is_local);
}

static void test_v1_malformed(void **state)
{
    (void)state;
    bad("double space 1", IN("PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_SYNTAX);
    bad("double space 2", IN("PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_SYNTAX);
    bad("double space 3", IN("PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_SYNTAX);
    bad("double space 4", IN("PROXY TCP4 1.2.3.4 5.6.7.8  1 2\r\n"), SL_PP_ERR_BAD_SYNTAX);
    bad("double space 5", IN("PROXY TCP4 1.2.3.4 5.6.7.8 1  2\r\n"), SL_PP_ERR_BAD_SYNTAX);
    bad("trailing space", IN("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"), SL_PP_ERR_BAD_SYNTAX);
    /* an empty field where the count is right */
    bad("empty dport", IN("PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n"), SL_PP_ERR_BAD_SYNTAX);
    bad("empty src", IN("PROXY TCP4  5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_SYNTAX);
    bad("double space short", IN("PROXY TCP4 1.2.3.4  5.6.7.8 1\r\n"), SL_PP_ERR_BAD_SYNTAX);
    bad("missing port", IN("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"), SL_PP_ERR_BAD_SYNTAX);
    bad("missing ports", IN("PROXY TCP4 1.2.3.4 5.6.7.8\r\n"), SL_PP_ERR_BAD_SYNTAX);
    bad("extra field", IN("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"), SL_PP_ERR_BAD_SYNTAX);
    bad("no fields", IN("PROXY TCP4\r\n"), SL_PP_ERR_BAD_SYNTAX);
    bad("no fields space", IN("PROXY TCP4 \r\n"), SL_PP_ERR_BAD_SYNTAX);
    bad("empty protocol", IN("PROXY \r\n"), SL_PP_ERR_BAD_SYNTAX);
    bad("no space after PROXY", IN("PROXY\r\n"), SL_PP_ERR_BAD_SIGNATURE);
    bad("lower case", IN("proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_SIGNATURE);
    bad("tab", IN("PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_SIGNATURE);

    bad("udp4", IN("PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_FAMILY);
    bad("tcp lower", IN("PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_FAMILY);
    bad("tcp5", IN("PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_FAMILY);
    bad("unknown glued", IN("PROXY UNKNOWNX\r\n"), SL_PP_ERR_BAD_FAMILY);
    bad("tab after family", IN("PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_FAMILY);

    bad("leading zero addr", IN("PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_ADDRESS);
    bad("octet 256", IN("PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n"), SL_PP_ERR_BAD_ADDRESS);
    bad("three octets", IN("PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_ADDRESS);
    bad("v6 in tcp4", IN("PROXY TCP4 ::1 ::1 1 2\r\n"), SL_PP_ERR_BAD_ADDRESS);
    bad("v6 dst in tcp4", IN("PROXY TCP4 1.2.3.4 ::1 1 2\r\n"), SL_PP_ERR_BAD_ADDRESS);
    bad("v4 in tcp6", IN("PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_ADDRESS);
    bad("v6 two gaps", IN("PROXY TCP6 1::2::3 ::1 1 2\r\n"), SL_PP_ERR_BAD_ADDRESS);
    bad("v6 zone", IN("PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n"), SL_PP_ERR_BAD_ADDRESS);
    bad("v6 brackets", IN("PROXY TCP6 [::1] ::1 1 2\r\n"), SL_PP_ERR_BAD_ADDRESS);
    bad("hostname", IN("PROXY TCP4 localhost 5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_ADDRESS);
    bad("nul in addr", IN("PROXY TCP4 1.2.3.4\0 5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_ADDRESS);

    bad("leading zero sport", IN("PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"), SL_PP_ERR_BAD_PORT);
    bad("leading zero dport", IN("PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n"), SL_PP_ERR_BAD_PORT);
    bad("port 65536", IN("PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"), SL_PP_ERR_BAD_PORT);
    bad("port 99999", IN("PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"), SL_PP_ERR_BAD_PORT);
    bad("port 6 digits", IN("PROXY TCP4 1.2.3.4 5.6.7.8 100000 2\r\n"), SL_PP_ERR_BAD_PORT);
    bad("port negative", IN("PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n"), SL_PP_ERR_BAD_PORT);
    bad("port plus", IN("PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n"), SL_PP_ERR_BAD_PORT);
    bad("port hex", IN("PROXY TCP4 1.2.3.4 5.6.7.8 0x10 2\r\n"), SL_PP_ERR_BAD_PORT);
    bad("port letters", IN("PROXY TCP6 ::1 ::1 1 http\r\n"), SL_PP_ERR_BAD_PORT);

    bad("bare LF", IN("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"), SL_PP_ERR_BAD_LINE_ENDING);
    bad("CR then X", IN("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX"), SL_PP_ERR_BAD_LINE_ENDING);
    bad("CR inside", IN("PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_LINE_ENDING);
    bad("LF inside", IN("PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n"), SL_PP_ERR_BAD_LINE_ENDING);
    bad("CR CR LF", IN("PROXY UNKNOWN\r\r\n"), SL_PP_ERR_BAD_LINE_ENDING);
    bad("LF CR", IN("PROXY UNKNOWN\n\r"), SL_PP_ERR_BAD_LINE_ENDING);
    bad("unknown bare LF", IN("PROXY UNKNOWN garbage\n"), SL_PP_ERR_BAD_LINE_ENDING);

    bad("http", IN("GET / HTTP/1.1\r\n"), SL_PP_ERR_BAD_SIGNATURE);
    bad("tls", IN("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), SL_PP_ERR_BAD_SIGNATURE);
    bad("PROX", IN("PROXX"), SL_PP_ERR_BAD_SIGNATURE);
    bad("nul first", IN("\0PROXY"), SL_PP_ERR_BAD_SIGNATURE);
}

static void test_v1_length_limit(void **state)
{
    (void)state;
    /* exactly 107 bytes with CRLF: the longest allowed */
    char line[300];
    memset(line, 'x', sizeof(line));
    memcpy(line, "PROXY UNKNOWN ", 14);
    line[105] = '\r';
    line[106] = '\n';
    ok("107 bytes", line, 107);

    /* 108: the CR is the 107th byte, so the LF cannot fit */
    memset(line, 'x', sizeof(line));
    memcpy(line, "PROXY UNKNOWN ", 14);
    line[106] = '\r';
    line[107] = '\n';
    bad("108 bytes", line, 108, SL_PP_ERR_TOO_LARGE);

    /* no line end at all: decided at byte 107, whatever follows */
    memset(line, 'x', sizeof(line));
    memcpy(line, "PROXY TCP4 1.2.3.4 5.6.7.8 1 2", 30);
    bad("no CRLF", line, sizeof(line), SL_PP_ERR_TOO_LARGE);
    bad("no CRLF 107", line, 107, SL_PP_ERR_TOO_LARGE);
    struct outcome o = run(line, 106);
    assert_int_equal(o.st, SL_AGAIN);

    /* a long TCP4 line that still ends in time is judged by its fields */
    memset(line, ' ', sizeof(line));
    memcpy(line, "PROXY TCP4 1.2.3.4 5.6.7.8 1 2", 30);
    line[100] = '\r';
    line[101] = '\n';
    bad("spaces before CRLF", line, 102, SL_PP_ERR_BAD_SYNTAX);
}

/* ---- v2 ---- */

/* Builds a v2 header: signature, ver_cmd, fam, then len and body as given. */
static size_t v2(uint8_t *out, uint8_t ver_cmd, uint8_t fam, const void *body, size_t body_len)
{
    memcpy(out, sig, 12);
    out[12] = ver_cmd;
    out[13] = fam;
    out[14] = (uint8_t)(body_len >> 8);
    out[15] = (uint8_t)body_len;
    if (body_len)
        memcpy(out + 16, body, body_len);
    return 16 + body_len;
}

static const uint8_t addr4[12] = {1, 2, 3, 4, 5, 6, 7, 8, 0x03, 0xE8, 0x01, 0xBB};

static size_t addr6(uint8_t *out)
{
    uint8_t a[16], b[16];
    assert_int_equal(inet_pton(AF_INET6, "2001:db8::1", a), 1);
    assert_int_equal(inet_pton(AF_INET6, "2001:db8:ffff::2", b), 1);
    memcpy(out, a, 16);
    memcpy(out + 16, b, 16);
    out[32] = 0xFF;
    out[33] = 0xFF;
    out[34] = 0x00;
    out[35] = 0x50;
    return 36;
}

static size_t tlv(uint8_t *out, uint8_t type, const void *v, size_t n)
{
    out[0] = type;
    out[1] = (uint8_t)(n >> 8);
    out[2] = (uint8_t)n;
    if (n)
        memcpy(out + 3, v, n);
    return 3 + n;
}

static void test_v2_valid(void **state)
{
    (void)state;
    uint8_t h[4096], body[4096];
    size_t n;
    struct outcome o;

    n = v2(h, 0x21, 0x11, addr4, sizeof(addr4));
    o = ok("proxy tcp4", h, n);
    assert_int_equal(o.r.version, 2);
    assert_int_equal(o.r.v2_family, 0x11);
    assert_false(o.r.is_local);
    check_in4(&o.r.src, "1.2.3.4", 1000);
    check_in4(&o.r.dst, "5.6.7.8", 443);
    assert_null(o.r.authority.ptr);

    size_t bl = addr6(body);
    n = v2(h, 0x21, 0x21, body, bl);
    o = ok("proxy tcp6", h, n);
    assert_int_equal(o.r.v2_family, 0x21);
    check_in6(&o.r.src, "2001:db8::1", 65535);
    check_in6(&o.r.dst, "2001:db8:ffff::2", 80);

    n = v2(h, 0x20, 0x00, NULL, 0);
    o = ok("local unspec", h, n);
    assert_true(o.r.is_local);
    assert_int_equal(o.r.header_bytes, 16);
    check_unspec(&o.r.src);
    check_unspec(&o.r.dst);

    n = v2(h, 0x20, 0x11, addr4, sizeof(addr4));
    o = ok("local with addresses", h, n);
    assert_true(o.r.is_local);
    check_unspec(&o.r.src);

    n = v2(h, 0x20, 0x11, NULL, 0);
    o = ok("local tcp4 without addresses", h, n);
    assert_true(o.r.is_local);

    n = v2(h, 0x20, 0x21, "\x01\x02\x03\x04\x05", 5);
    o = ok("local block not parsed", h, n);
    assert_true(o.r.is_local);
    assert_null(o.r.authority.ptr);

    n = v2(h, 0x21, 0x00, NULL, 0);
    o = ok("proxy unspec", h, n);
    assert_true(o.r.is_local);

    n = v2(h, 0x21, 0x00, "\xAA\xBB\xCC\xDD\xEE", 5);
    o = ok("proxy unspec with bytes", h, n);
    assert_true(o.r.is_local);
    assert_int_equal(o.r.header_bytes, 21);

    n = v2(h, 0x21, 0x12, addr4, sizeof(addr4));
    o = ok("proxy udp4 falls back", h, n);
    assert_true(o.r.is_local);
    assert_int_equal(o.r.v2_family, 0x12);
    check_unspec(&o.r.src);

    n = v2(h, 0x21, 0x22, body, bl);
    o = ok("proxy udp6 falls back", h, n);
    assert_true(o.r.is_local);

    memset(body, 0, 216);
    memcpy(body, "/run/a.sock", 11);
    memcpy(body + 108, "/run/b.sock", 11);
    n = v2(h, 0x21, 0x31, body, 216);
    o = ok("proxy unix stream falls back", h, n);
    assert_true(o.r.is_local);
    n = v2(h, 0x21, 0x32, body, 216);
    ok("proxy unix dgram falls back", h, n);
}

static void test_v2_tlvs(void **state)
{
    (void)state;
    uint8_t h[4096], body[4096];
    size_t bl, n;
    struct outcome o;

    /* the TLVs a TLS-terminating haproxy sends: ALPN, authority, SSL with sub-TLVs, ID */
    memcpy(body, addr4, 12);
    bl = 12;
    bl += tlv(body + bl, 0x01, "h2", 2);
    bl += tlv(body + bl, SL_PP2_TYPE_AUTHORITY, "example.com", 11);
    uint8_t ssl[64];
    size_t sl = 0;
    ssl[sl++] = 0x07;       /* client: SSL, cert conn, cert sess */
    memset(ssl + sl, 0, 4); /* verify: 0 = verified */
    sl += 4;
    sl += tlv(ssl + sl, 0x21, "TLSv1.3", 7);
    sl += tlv(ssl + sl, 0x22, "client", 6);
    bl += tlv(body + bl, 0x20, ssl, sl);
    bl += tlv(body + bl, 0x04, NULL, 0); /* NOOP, empty */
    uint8_t id[128];
    memset(id, 0x5C, sizeof(id));
    bl += tlv(body + bl, 0x05, id, sizeof(id));
    bl += tlv(body + bl, 0xE0, "custom", 6);
    n = v2(h, 0x21, 0x11, body, bl);
    o = ok("tlvs", h, n);
    check_in4(&o.r.src, "1.2.3.4", 1000);
    assert_int_equal(o.r.authority.len, 11);
    assert_int_equal(o.auth_off, 16 + 12 + 5 + 3);
    assert_memory_equal(h + o.auth_off, "example.com", 11);

    /* authority as the only and last TLV, on IPv6, empty */
    bl = addr6(body);
    bl += tlv(body + bl, SL_PP2_TYPE_AUTHORITY, NULL, 0);
    n = v2(h, 0x21, 0x21, body, bl);
    o = ok("empty authority", h, n);
    assert_non_null(o.r.authority.ptr);
    assert_int_equal(o.r.authority.len, 0);
    assert_int_equal(o.auth_off, 16 + 36 + 3);

    /* TLVs after an unsupported family are still checked */
    memcpy(body, addr4, 12);
    bl = 12 + tlv(body + 12, SL_PP2_TYPE_AUTHORITY, "udp.example", 11);
    n = v2(h, 0x21, 0x12, body, bl);
    o = ok("udp with authority", h, n);
    assert_true(o.r.is_local);
    assert_int_equal(o.r.authority.len, 11);

    /* exactly SL_PP_V2_MAX_TLV_BYTES of TLVs, then one more byte */
    memcpy(body, addr4, 12);
    memset(body + 12, 0, SL_PP_V2_MAX_TLV_BYTES);
    body[12] = 0x04;
    body[13] = (uint8_t)((SL_PP_V2_MAX_TLV_BYTES - 3) >> 8);
    body[14] = (uint8_t)(SL_PP_V2_MAX_TLV_BYTES - 3);
    n = v2(h, 0x21, 0x11, body, 12 + SL_PP_V2_MAX_TLV_BYTES);
    ok("max tlvs", h, n);
    body[13] = (uint8_t)((SL_PP_V2_MAX_TLV_BYTES - 2) >> 8);
    body[14] = (uint8_t)(SL_PP_V2_MAX_TLV_BYTES - 2);
    n = v2(h, 0x21, 0x11, body, 12 + SL_PP_V2_MAX_TLV_BYTES + 1);
    bad("tlvs one too many", h, n, SL_PP_ERR_TOO_LARGE);

    /* the biggest header accepted: AF_UNIX and full TLVs */
    memset(body, 0, 216 + SL_PP_V2_MAX_TLV_BYTES);
    body[216] = 0x04;
    body[217] = (uint8_t)((SL_PP_V2_MAX_TLV_BYTES - 3) >> 8);
    body[218] = (uint8_t)(SL_PP_V2_MAX_TLV_BYTES - 3);
    n = v2(h, 0x21, 0x31, body, 216 + SL_PP_V2_MAX_TLV_BYTES);
    assert_int_equal(n, SL_PP_MAX_HEADER_BYTES);
    ok("largest header", h, n);
}

static void test_v2_malformed(void **state)
{
    (void)state;
    uint8_t h[4096], body[4096];
    size_t n, bl;
    char name[64];

    /* each signature byte wrong in turn: refused as soon as that byte arrives */
    for (size_t i = 0; i < 12; i++) {
        n = v2(h, 0x21, 0x11, addr4, sizeof(addr4));
        h[i] ^= 0x40;
        snprintf(name, sizeof(name), "signature byte %zu", i);
        bad(name, h, n, SL_PP_ERR_BAD_SIGNATURE);
        struct outcome o = run(h, i + 1);
        assert_int_equal(o.st, SL_ERROR);
        if (i > 0) {
            o = run(h, i);
            assert_int_equal(o.st, SL_AGAIN);
        }
    }

    static const uint8_t bad_versions[] = {0x01, 0x11, 0x31, 0xF1, 0x00, 0x10};
    for (size_t i = 0; i < sizeof(bad_versions); i++) {
        n = v2(h, bad_versions[i], 0x11, addr4, sizeof(addr4));
        snprintf(name, sizeof(name), "version byte %#x", bad_versions[i]);
        bad(name, h, n, SL_PP_ERR_BAD_VERSION);
    }
    for (unsigned cmd = 2; cmd < 16; cmd++) {
        n = v2(h, (uint8_t)(0x20 | cmd), 0x11, addr4, sizeof(addr4));
        snprintf(name, sizeof(name), "command %u", cmd);
        bad(name, h, n, SL_PP_ERR_BAD_COMMAND);
    }
    for (unsigned fam = 0; fam < 256; fam++) {
        if (fam == 0x00 || fam == 0x11 || fam == 0x12 || fam == 0x21 || fam == 0x22 ||
            fam == 0x31 || fam == 0x32)
            continue;
        n = v2(h, 0x21, (uint8_t)fam, addr4, sizeof(addr4));
        snprintf(name, sizeof(name), "family %#x", fam);
        bad(name, h, n, SL_PP_ERR_BAD_FAMILY);
        n = v2(h, 0x20, (uint8_t)fam, NULL, 0);
        snprintf(name, sizeof(name), "local family %#x", fam);
        bad(name, h, n, SL_PP_ERR_BAD_FAMILY);
    }

    n = v2(h, 0x21, 0x11, addr4, 11);
    bad("tcp4 len 11", h, n, SL_PP_ERR_BAD_LENGTH);
    n = v2(h, 0x21, 0x11, NULL, 0);
    bad("tcp4 len 0", h, n, SL_PP_ERR_BAD_LENGTH);
    bl = addr6(body);
    n = v2(h, 0x21, 0x21, body, 35);
    bad("tcp6 len 35", h, n, SL_PP_ERR_BAD_LENGTH);
    n = v2(h, 0x21, 0x21, addr4, 12);
    bad("tcp6 with tcp4 length", h, n, SL_PP_ERR_BAD_LENGTH);
    n = v2(h, 0x21, 0x12, addr4, 8);
    bad("udp4 short", h, n, SL_PP_ERR_BAD_LENGTH);
    memset(body, 0, 216);
    n = v2(h, 0x21, 0x31, body, 215);
    bad("unix short", h, n, SL_PP_ERR_BAD_LENGTH);

    /* a huge length is refused at byte 16, before any of it arrives */
    n = v2(h, 0x21, 0x11, NULL, 0);
    h[14] = 0xFF;
    h[15] = 0xFF;
    bad("length 65535", h, 16, SL_PP_ERR_TOO_LARGE);
    n = v2(h, 0x20, 0x00, NULL, 0);
    h[14] = (uint8_t)((SL_PP_V2_MAX_TLV_BYTES + 1) >> 8);
    h[15] = (uint8_t)(SL_PP_V2_MAX_TLV_BYTES + 1);
    bad("local too long", h, 16, SL_PP_ERR_TOO_LARGE);
    n = v2(h, 0x21, 0x00, NULL, 0);
    h[14] = (uint8_t)((SL_PP_V2_MAX_TLV_BYTES + 1) >> 8);
    h[15] = (uint8_t)(SL_PP_V2_MAX_TLV_BYTES + 1);
    bad("unspec too long", h, 16, SL_PP_ERR_TOO_LARGE);
    (void)n;

    /* TLVs that do not fit the header */
    memcpy(body, addr4, 12);
    body[12] = 0x04;
    n = v2(h, 0x21, 0x11, body, 13);
    bad("tlv 1 byte", h, n, SL_PP_ERR_BAD_TLV);
    body[13] = 0x00;
    n = v2(h, 0x21, 0x11, body, 14);
    bad("tlv 2 bytes", h, n, SL_PP_ERR_BAD_TLV);
    bl = 12 + tlv(body + 12, 0x02, "example.com", 11);
    n = v2(h, 0x21, 0x11, body, bl - 1);
    bad("tlv value cut", h, n, SL_PP_ERR_BAD_TLV);
    body[14] = 0xFF; /* length 0x00FF with 11 bytes present */
    n = v2(h, 0x21, 0x11, body, bl);
    bad("tlv length too big", h, n, SL_PP_ERR_BAD_TLV);
    bl = 12 + tlv(body + 12, 0x02, "a.example", 9);
    bl += tlv(body + bl, 0x02, "b.example", 9);
    n = v2(h, 0x21, 0x11, body, bl);
    bad("two authorities", h, n, SL_PP_ERR_BAD_TLV);
    bl = 12 + tlv(body + 12, 0x04, NULL, 0);
    body[bl++] = 0x04;
    n = v2(h, 0x21, 0x11, body, bl);
    bad("trailing byte after tlv", h, n, SL_PP_ERR_BAD_TLV);
    bl = addr6(body);
    body[bl++] = 0x01;
    body[bl++] = 0x00;
    n = v2(h, 0x21, 0x21, body, bl);
    bad("tcp6 tlv 2 bytes", h, n, SL_PP_ERR_BAD_TLV);

    /* v1 and v2 do not mix */
    bad("v2 sig then text", IN("\r\n\r\n\0\r\nQUIT\nPROXY TCP4"), SL_PP_ERR_BAD_VERSION);
    bad("cr only", IN("\r\r"), SL_PP_ERR_BAD_SIGNATURE);
}

/* Truncations of valid headers at every length return SL_AGAIN and write nothing. */
static void test_truncated(void **state)
{
    (void)state;
    uint8_t h[4096], body[4096];
    size_t bl = 12 + tlv(body + 12, SL_PP2_TYPE_AUTHORITY, "example.com", 11);
    memcpy(body, addr4, 12);
    size_t n = v2(h, 0x21, 0x11, body, bl);
    for (size_t k = 0; k < n; k++)
        assert_int_equal(run(h, k).st, SL_AGAIN);
    assert_int_equal(run(h, n).st, SL_OK);

    static const char line[] = "PROXY TCP6 2001:db8::1 ::1 1234 443\r\n";
    for (size_t k = 0; k < sizeof(line) - 1; k++)
        assert_int_equal(run(line, k).st, SL_AGAIN);

    /* a NULL buffer with no bytes is fine, and err may be NULL */
    struct sl_pp_result r;
    assert_int_equal(sl_proxy_proto_parse(NULL, 0, &r, NULL), SL_AGAIN);
    assert_int_equal(sl_proxy_proto_parse("PROXY UNKNOWN\r\n", 15, &r, NULL), SL_OK);
    assert_int_equal(sl_proxy_proto_parse("X", 1, &r, NULL), SL_ERROR);
}

static void test_err_names(void **state)
{
    (void)state;
    assert_string_equal(sl_pp_err_name(SL_PP_ERR_NONE), "none");
    assert_string_equal(sl_pp_err_name(SL_PP_ERR_BAD_SIGNATURE), "bad_signature");
    assert_string_equal(sl_pp_err_name(SL_PP_ERR_TOO_LARGE), "too_large");
    assert_string_equal(sl_pp_err_name(SL_PP_ERR_BAD_LINE_ENDING), "bad_line_ending");
    assert_string_equal(sl_pp_err_name(SL_PP_ERR_COUNT), "unknown");
    assert_string_equal(sl_pp_err_name((enum sl_pp_err) - 1), "unknown");
    for (int i = 0; i < SL_PP_ERR_COUNT; i++) {
        const char *a = sl_pp_err_name((enum sl_pp_err)i);
        assert_non_null(a);
        assert_string_not_equal(a, "unknown");
        for (int j = 0; j < i; j++)
            assert_string_not_equal(a, sl_pp_err_name((enum sl_pp_err)j));
    }
}

/* ---- builders ---- */

static struct sockaddr_storage sa_of(const char *text, uint16_t port)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    if (strchr(text, ':')) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        assert_int_equal(inet_pton(AF_INET6, text, &a->sin6_addr), 1);
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        assert_int_equal(inet_pton(AF_INET, text, &a->sin_addr), 1);
    }
    return ss;
}

#define SA(ss) ((const struct sockaddr *)&(ss))

static void test_write_v1_exact(void **state)
{
    (void)state;
    char out[SL_PP_V1_MAX_BYTES];
    struct sockaddr_storage s = sa_of("192.168.0.1", 56324), d = sa_of("192.168.0.11", 443);
    size_t n = sl_proxy_proto_write_v1(out, sizeof(out), SA(s), SA(d));
    static const char want[] = "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
    assert_int_equal(n, sizeof(want) - 1);
    assert_memory_equal(out, want, n);

    s = sa_of("2001:db8::1", 0);
    d = sa_of("::1", 65535);
    n = sl_proxy_proto_write_v1(out, sizeof(out), SA(s), SA(d));
    static const char want6[] = "PROXY TCP6 2001:db8::1 ::1 0 65535\r\n";
    assert_int_equal(n, sizeof(want6) - 1);
    assert_memory_equal(out, want6, n);

    /* mixed families: the IPv4 one is mapped */
    s = sa_of("1.2.3.4", 1);
    d = sa_of("2001:db8::2", 2);
    n = sl_proxy_proto_write_v1(out, sizeof(out), SA(s), SA(d));
    static const char mixed[] = "PROXY TCP6 ::ffff:1.2.3.4 2001:db8::2 1 2\r\n";
    assert_int_equal(n, sizeof(mixed) - 1);
    assert_memory_equal(out, mixed, n);

    /* mapped on both sides is IPv4 */
    s = sa_of("::ffff:10.0.0.1", 5);
    d = sa_of("10.0.0.2", 6);
    n = sl_proxy_proto_write_v1(out, sizeof(out), SA(s), SA(d));
    static const char unmapped[] = "PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n";
    assert_int_equal(n, sizeof(unmapped) - 1);
    assert_memory_equal(out, unmapped, n);

    /* longest line */
    s = sa_of("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535);
    n = sl_proxy_proto_write_v1(out, sizeof(out), SA(s), SA(s));
    assert_int_equal(n, 104);

    /* not an IP connection */
    struct sockaddr_un un;
    memset(&un, 0, sizeof(un));
    un.sun_family = AF_UNIX;
    n = sl_proxy_proto_write_v1(out, sizeof(out), (struct sockaddr *)&un, SA(d));
    assert_int_equal(n, 15);
    assert_memory_equal(out, "PROXY UNKNOWN\r\n", 15);
    n = sl_proxy_proto_write_v1(out, sizeof(out), SA(d), NULL);
    assert_int_equal(n, 15);
}

static void test_write_v2_exact(void **state)
{
    (void)state;
    uint8_t out[SL_PP_V1_MAX_BYTES], want[64];
    struct sockaddr_storage s = sa_of("1.2.3.4", 1000), d = sa_of("5.6.7.8", 443);
    size_t n = sl_proxy_proto_write_v2((char *)out, sizeof(out), SA(s), SA(d));
    size_t wn = v2(want, 0x21, 0x11, addr4, sizeof(addr4));
    assert_int_equal(n, wn);
    assert_memory_equal(out, want, n);

    uint8_t body[36];
    addr6(body);
    s = sa_of("2001:db8::1", 65535);
    d = sa_of("2001:db8:ffff::2", 80);
    n = sl_proxy_proto_write_v2((char *)out, sizeof(out), SA(s), SA(d));
    wn = v2(want, 0x21, 0x21, body, 36);
    assert_int_equal(n, wn);
    assert_memory_equal(out, want, n);

    n = sl_proxy_proto_write_v2((char *)out, sizeof(out), NULL, NULL);
    wn = v2(want, 0x21, 0x00, NULL, 0);
    assert_int_equal(n, 16);
    assert_memory_equal(out, want, n);
}

static void test_write_cap(void **state)
{
    (void)state;
    struct sockaddr_storage s = sa_of("2001:db8::1", 1), d = sa_of("2001:db8::2", 2);
    for (int ver = 1; ver <= 2; ver++) {
        char out[SL_PP_V1_MAX_BYTES];
        size_t full = ver == 1 ? sl_proxy_proto_write_v1(out, sizeof(out), SA(s), SA(d))
                               : sl_proxy_proto_write_v2(out, sizeof(out), SA(s), SA(d));
        assert_true(full > 0);
        for (size_t cap = 0; cap < full; cap++) {
            char *b = malloc(cap ? cap : 1);
            assert_non_null(b);
            memset(b, 'Q', cap);
            size_t n = ver == 1 ? sl_proxy_proto_write_v1(b, cap, SA(s), SA(d))
                                : sl_proxy_proto_write_v2(b, cap, SA(s), SA(d));
            assert_int_equal(n, 0);
            for (size_t i = 0; i < cap; i++)
                assert_int_equal(b[i], 'Q');
            free(b);
        }
        char *b = malloc(full);
        assert_non_null(b);
        size_t n = ver == 1 ? sl_proxy_proto_write_v1(b, full, SA(s), SA(d))
                            : sl_proxy_proto_write_v2(b, full, SA(s), SA(d));
        assert_int_equal(n, full);
        free(b);
    }
}

/* What the parser should report for a built header: IPv4 when both ends are IPv4 or
 * mapped, else IPv6 with IPv4 ends mapped. */
static void expected(const struct sockaddr_storage *in, bool as_v4, struct sockaddr_storage *out)
{
    uint8_t a[16];
    uint16_t port;
    if (in->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)in;
        memset(a, 0, 10);
        a[10] = a[11] = 0xFF;
        memcpy(a + 12, &x->sin_addr, 4);
        port = ntohs(x->sin_port);
    } else {
        const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)in;
        memcpy(a, &x->sin6_addr, 16);
        port = ntohs(x->sin6_port);
    }
    memset(out, 0, sizeof(*out));
    if (as_v4) {
        struct sockaddr_in *o = (struct sockaddr_in *)out;
        o->sin_family = AF_INET;
        memcpy(&o->sin_addr, a + 12, 4);
        o->sin_port = htons(port);
    } else {
        struct sockaddr_in6 *o = (struct sockaddr_in6 *)out;
        o->sin6_family = AF_INET6;
        memcpy(&o->sin6_addr, a, 16);
        o->sin6_port = htons(port);
    }
}

static bool is_v4ish(const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET)
        return true;
    const uint8_t *a = ((const struct sockaddr_in6 *)ss)->sin6_addr.s6_addr;
    static const uint8_t m[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return memcmp(a, m, 12) == 0;
}

static void round_trip(const struct sockaddr_storage *s, const struct sockaddr_storage *d)
{
    bool v4 = is_v4ish(s) && is_v4ish(d);
    struct sockaddr_storage ws, wd;
    expected(s, v4, &ws);
    expected(d, v4, &wd);
    for (int ver = 1; ver <= 2; ver++) {
        char out[SL_PP_V1_MAX_BYTES];
        size_t n = ver == 1 ? sl_proxy_proto_write_v1(out, sizeof(out), SA(*s), SA(*d))
                            : sl_proxy_proto_write_v2(out, sizeof(out), SA(*s), SA(*d));
        assert_true(n > 0 && n <= SL_PP_V1_MAX_BYTES);
        struct outcome o = run(out, n);
        if (o.st != SL_OK)
            fail_msg("v%d %.*s: %s", ver, (int)n, out, sl_pp_err_name(o.err));
        assert_int_equal(o.r.version, ver);
        assert_int_equal(o.r.header_bytes, n);
        assert_false(o.r.is_local);
        assert_memory_equal(&o.r.src, &ws, sizeof(ws));
        assert_memory_equal(&o.r.dst, &wd, sizeof(wd));
    }
}

static void test_round_trips(void **state)
{
    (void)state;
    static const char *const addrs[] = {
        "0.0.0.0",
        "255.255.255.255",
        "10.1.2.3",
        "::",
        "::1",
        "::ffff:1.2.3.4",
        "::1.2.3.4",
        "::ffff:0:1",
        "2001:db8::1",
        "fe80::1:2",
        "1:0:0:1:0:0:0:1",
        "1:2:3:4:5:6:7:8",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "64:ff9b::1.2.3.4",
    };
    size_t na = sizeof(addrs) / sizeof(addrs[0]);
    for (size_t i = 0; i < na; i++)
        for (size_t j = 0; j < na; j++) {
            struct sockaddr_storage s = sa_of(addrs[i], (uint16_t)(i * 4099));
            struct sockaddr_storage d = sa_of(addrs[j], (uint16_t)(65535 - j));
            round_trip(&s, &d);
        }

    uint64_t x = 0x853C49E6748FEA9Bull;
    for (int iter = 0; iter < 5000; iter++) {
        struct sockaddr_storage ends[2];
        for (int e = 0; e < 2; e++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            memset(&ends[e], 0, sizeof(ends[e]));
            if (x & 1) {
                struct sockaddr_in *a = (struct sockaddr_in *)&ends[e];
                a->sin_family = AF_INET;
                memcpy(&a->sin_addr, &x, 4);
                a->sin_port = (uint16_t)(x >> 32);
            } else {
                struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ends[e];
                a->sin6_family = AF_INET6;
                for (int b = 0; b < 16; b++)
                    a->sin6_addr.s6_addr[b] = ((x >> (b * 3)) & 3) ? 0 : (uint8_t)(x >> b);
                a->sin6_port = (uint16_t)(x >> 40);
            }
        }
        round_trip(&ends[0], &ends[1]);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_v1_spec_examples), cmocka_unit_test(test_v1_valid),
        cmocka_unit_test(test_v1_malformed),     cmocka_unit_test(test_v1_length_limit),
        cmocka_unit_test(test_v2_valid),         cmocka_unit_test(test_v2_tlvs),
        cmocka_unit_test(test_v2_malformed),     cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_err_names),        cmocka_unit_test(test_write_v1_exact),
        cmocka_unit_test(test_write_v2_exact),   cmocka_unit_test(test_write_cap),
        cmocka_unit_test(test_round_trips),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
