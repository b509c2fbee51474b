/* Unit tests for CIDR parsing and sets: the accepted syntax of both families, every error
 * message exactly as the config loader will print it, prefix boundaries on both sides of each
 * 32- and 64-bit word, IPv4-mapped IPv6 both as entries and as addresses, range merging, and a
 * randomized comparison of the set against a plain linear scan. */
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

#include "cidr_model.h"
#include "core/cidr.h"

/* ---- helpers ---- */

static struct sl_cidr parse_ok(const char *s)
{
    struct sl_cidr c;
    char err[256] = "";
    memset(&c, 0xAA, sizeof(c));
    if (sl_cidr_parse(s, &c, err, sizeof(err)) != 0)
        fail_msg("'%s' refused: %s", s, err);
    return c;
}

static void parse_err(const char *s, const char *want)
{
    struct sl_cidr c, before;
    memset(&c, 0x5A, sizeof(c));
    before = c;
    char err[256];
    memset(err, 'Z', sizeof(err));
    if (sl_cidr_parse(s, &c, err, sizeof(err)) != -1)
        fail_msg("'%s' accepted", s ? s : "(null)");
    if (strcmp(err, want) != 0)
        fail_msg("'%s': message\n  got  '%s'\n  want '%s'", s ? s : "(null)", err, want);
    assert_memory_equal(&c, &before, sizeof(c)); /* out untouched on failure */
}

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

static bool has(const struct sl_cidr_set *s, const char *text)
{
    struct sockaddr_storage ss = sa_of(text, 443);
    return sl_cidr_set_contains(s, (const struct sockaddr *)&ss);
}

/* A set from a NULL-terminated list of entries written as text. */
static struct sl_cidr_set *set_of(const char *const *texts)
{
    struct sl_cidr e[64];
    size_t n = 0;
    for (; texts[n]; n++) {
        assert_true(n < 64);
        e[n] = parse_ok(texts[n]);
    }
    struct sl_cidr_set *s = sl_cidr_set_new(e, n);
    assert_non_null(s);
    return s;
}

#define SET(...) set_of((const char *const[]){__VA_ARGS__, NULL})

/* ---- parsing ---- */

static void expect(const char *s, int family, const char *addr_text, unsigned prefix)
{
    struct sl_cidr c = parse_ok(s);
    uint8_t want[16] = {0};
    assert_int_equal(inet_pton(family, addr_text, want), 1);
    if (c.family != family || c.prefix_len != prefix || memcmp(c.addr, want, 16) != 0)
        fail_msg("'%s': family %d prefix %u", s, c.family, c.prefix_len);
}

static void test_parse_ipv4(void **state)
{
    (void)state;
    expect("10.0.0.0/8", AF_INET, "10.0.0.0", 8);
    expect("192.168.1.7", AF_INET, "192.168.1.7", 32);
    expect("192.168.1.7/32", AF_INET, "192.168.1.7", 32);
    expect("0.0.0.0/0", AF_INET, "0.0.0.0", 0);
    expect("0.0.0.0", AF_INET, "0.0.0.0", 32);
    expect("255.255.255.255", AF_INET, "255.255.255.255", 32);
    expect("255.255.255.254/31", AF_INET, "255.255.255.254", 31);
    expect("128.0.0.0/1", AF_INET, "128.0.0.0", 1);
    expect("172.16.0.0/12", AF_INET, "172.16.0.0", 12);
    expect("100.64.0.0/10", AF_INET, "100.64.0.0", 10);
    expect("1.2.3.0/24", AF_INET, "1.2.3.0", 24);
}

static void test_parse_ipv6(void **state)
{
    (void)state;
    expect("2001:db8::/32", AF_INET6, "2001:db8::", 32);
    expect("::1", AF_INET6, "::1", 128);
    expect("::", AF_INET6, "::", 128);
    expect("::/0", AF_INET6, "::", 0);
    expect("fe80::/10", AF_INET6, "fe80::", 10);
    expect("FE80::/10", AF_INET6, "fe80::", 10);
    expect("1:2:3:4:5:6:7:8", AF_INET6, "1:2:3:4:5:6:7:8", 128);
    expect("0001:0002:0003:0004:0005:0006:0007:0008", AF_INET6, "1:2:3:4:5:6:7:8", 128);
    expect("1::", AF_INET6, "1::", 128);
    expect("1:2:3:4:5:6:7::", AF_INET6, "1:2:3:4:5:6:7:0", 128);
    expect("::2:3:4:5:6:7:8", AF_INET6, "0:2:3:4:5:6:7:8", 128);
    expect("1::8", AF_INET6, "1::8", 128);
    expect("1:2::7:8", AF_INET6, "1:2::7:8", 128);
    expect("::ffff:10.0.0.0/104", AF_INET6, "::ffff:10.0.0.0", 104);
    expect("::ffff:1.2.3.4", AF_INET6, "::ffff:1.2.3.4", 128);
    expect("::1.2.3.4", AF_INET6, "::1.2.3.4", 128);
    expect("1:2:3:4:5:6:1.2.3.4", AF_INET6, "1:2:3:4:5:6:102:304", 128);
    expect("64:ff9b::/96", AF_INET6, "64:ff9b::", 96);
    expect("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", AF_INET6,
           "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 128);
    expect("2001:db8:0:1::/64", AF_INET6, "2001:db8:0:1::", 64);
    expect("2001:db8:0:1:8000::/65", AF_INET6, "2001:db8:0:1:8000::", 65);
}

static void test_address_text_functions(void **state)
{
    (void)state;
    uint8_t a[16];
    /* exact length, no NUL needed: the text continues past len */
    assert_int_equal(sl_cidr_parse_ipv4("1.2.3.4 rest", 7, a), 0);
    assert_memory_equal(a, "\x01\x02\x03\x04", 4);
    assert_int_equal(sl_cidr_parse_ipv4("1.2.3.45", 7, a), 0);
    assert_int_equal(a[3], 4);
    assert_int_equal(sl_cidr_parse_ipv6("::1 rest", 3, a), 0);
    assert_int_equal(a[15], 1);
    assert_int_equal(sl_cidr_parse_ipv4("", 0, a), -1);
    assert_int_equal(sl_cidr_parse_ipv6("", 0, a), -1);
    assert_int_equal(sl_cidr_parse_ipv6(":", 1, a), -1);

    static const char *const bad4[] = {
        "1.2.3",    "1.2.3.4.5",  "256.0.0.0",  "1.2.3.256", "01.2.3.4",  "1.2.3.00",
        "1..2.3",   "1.2.3.4.",   ".1.2.3.4",   "1.2.3.-4",  "0x1.2.3.4", "1.2.3.1000",
        " 1.2.3.4", "1.2.3.4 ",   "1.2.3.4\n",  "1,2,3,4",   "a.b.c.d",   "1.2.3.4/",
        "1.2.3.+4", "4294967295", "1.2.3.0004", "::1",       "1.2.3.4%0",
    };
    for (size_t i = 0; i < sizeof bad4 / sizeof bad4[0]; i++)
        if (sl_cidr_parse_ipv4(bad4[i], strlen(bad4[i]), a) == 0)
            fail_msg("IPv4 '%s' accepted", bad4[i]);

    static const char *const bad6[] = {
        ":",
        ":::",
        "1:::2",
        "1::2::3",
        "::1::",
        ":1",
        ":1::",
        "1:",
        "1:2",
        "12345::",
        "g::",
        "1:2:3:4:5:6:7:8:9",
        "1:2:3:4:5:6:7:8::",
        "::1:2:3:4:5:6:7:8",
        "1::2:3:4:5:6:7:8",
        "1.2.3.4::",
        "::1.2.3",
        "::1.2.3.4.5",
        "::01.2.3.4",
        "1:2:3:4:5:6:7:1.2.3.4",
        "::1.2.3.4:5",
        "fe80::1%eth0",
        "[::1]",
        " ::1",
        "::1 ",
        "::ffff:256.1.1.1",
        "1.2.3.4",
        "::-1",
        "1:2:3:4:5:6:7",
        "::ffff:1.2.3.4/",
        "-::",
        "::g",
    };
    for (size_t i = 0; i < sizeof bad6 / sizeof bad6[0]; i++)
        if (sl_cidr_parse_ipv6(bad6[i], strlen(bad6[i]), a) == 0)
            fail_msg("IPv6 '%s' accepted", bad6[i]);
}

/* Every address inet_ntop can write parses back to the same bytes. */
static void test_ipv6_text_round_trip(void **state)
{
    (void)state;
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (int iter = 0; iter < 20000; iter++) {
        uint8_t in[16], out[16];
        for (int i = 0; i < 16; i += 2) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            /* mostly zero groups, so "::" and the dotted forms come up often */
            uint16_t w = (x & 3) ? 0 : (uint16_t)(x >> 16);
            if (((x >> 40) & 7) == 0)
                w = 0xffff;
            in[i] = (uint8_t)(w >> 8);
            in[i + 1] = (uint8_t)w;
        }
        char text[INET6_ADDRSTRLEN];
        assert_non_null(inet_ntop(AF_INET6, in, text, sizeof(text)));
        if (sl_cidr_parse_ipv6(text, strlen(text), out) != 0)
            fail_msg("'%s' refused", text);
        assert_memory_equal(in, out, 16);
    }
}

static void test_parse_errors(void **state)
{
    (void)state;
    parse_err("", "empty address");
    parse_err(NULL, "empty address");
    parse_err("/8", "missing address before '/'");
    parse_err("10.0.0.1/8", "host bits set beyond the /8 prefix: did you mean 10.0.0.0/8?");
    parse_err("192.168.1.7/24",
              "host bits set beyond the /24 prefix: did you mean 192.168.1.0/24?");
    parse_err("128.0.0.0/0", "host bits set beyond the /0 prefix: did you mean 0.0.0.0/0?");
    parse_err("10.0.0.1/31", "host bits set beyond the /31 prefix: did you mean 10.0.0.0/31?");
    parse_err("2001:db8::1/32", "host bits set beyond the /32 prefix: did you mean 2001:db8::/32?");
    parse_err("2001:db8:0:1:8000::/64",
              "host bits set beyond the /64 prefix: did you mean 2001:db8:0:1::/64?");
    parse_err("::1/127", "host bits set beyond the /127 prefix: did you mean ::/127?");
    parse_err("::ffff:10.0.0.1/104",
              "host bits set beyond the /104 prefix: did you mean ::ffff:10.0.0.0/104?");
    parse_err("10.0.0.0/33", "prefix length 33 is out of range for IPv4 (0-32)");
    parse_err("10.0.0.0/1000", "prefix length 1000 is out of range for IPv4 (0-32)");
    parse_err("10.0.0.0/99999999999999999999999",
              "prefix length 99999999999999999999999 is out of range for IPv4 (0-32)");
    parse_err("::/129", "prefix length 129 is out of range for IPv6 (0-128)");
    parse_err("::/256", "prefix length 256 is out of range for IPv6 (0-128)");
    parse_err("10.0.0.0/", "missing prefix length after '/'");
    parse_err("::/", "missing prefix length after '/'");
    parse_err("10.0.0.0/a", "prefix length 'a' is not a decimal number");
    parse_err("10.0.0.0/-1", "prefix length '-1' is not a decimal number");
    parse_err("10.0.0.0/+8", "prefix length '+8' is not a decimal number");
    parse_err("10.0.0.0/ 8", "prefix length ' 8' is not a decimal number");
    parse_err("10.0.0.0/8 ", "prefix length '8 ' is not a decimal number");
    parse_err("10.0.0.0/8/8", "prefix length '8/8' is not a decimal number");
    parse_err("10.0.0.0/0x8", "prefix length '0x8' is not a decimal number");
    parse_err("10.0.0.0/08", "prefix length '08' has a leading zero");
    parse_err("::/00", "prefix length '00' has a leading zero");
    parse_err("foo", "'foo' is not an IPv4 or IPv6 address");
    parse_err("foo/8", "'foo' is not an IPv4 or IPv6 address");
    parse_err("10.0.0.256/8", "'10.0.0.256' is not an IPv4 or IPv6 address");
    parse_err("010.0.0.0/8", "'010.0.0.0' is not an IPv4 or IPv6 address");
    parse_err("10.0.0/8", "'10.0.0' is not an IPv4 or IPv6 address");
    parse_err(" 10.0.0.0/8", "' 10.0.0.0' is not an IPv4 or IPv6 address");
    parse_err("1::2::3/64", "'1::2::3' is not an IPv4 or IPv6 address");
    parse_err("fe80::1%eth0", "'fe80::1%eth0' is not an IPv4 or IPv6 address");
    parse_err("[::1]/128", "'[::1]' is not an IPv4 or IPv6 address");
    parse_err("localhost", "'localhost' is not an IPv4 or IPv6 address");
    /* a long value is cut in the message */
    char longv[200];
    memset(longv, 'x', sizeof(longv) - 1);
    longv[sizeof(longv) - 1] = '\0';
    char want[256];
    snprintf(want, sizeof(want), "'%.64s' is not an IPv4 or IPv6 address", longv);
    parse_err(longv, want);
}

static void test_parse_err_buffers(void **state)
{
    (void)state;
    struct sl_cidr c;
    assert_int_equal(sl_cidr_parse("10.0.0.1/8", &c, NULL, 0), -1);
    char small[8];
    assert_int_equal(sl_cidr_parse("10.0.0.1/8", &c, small, sizeof(small)), -1);
    assert_string_equal(small, "host bi");
    char one[1] = {'Q'};
    assert_int_equal(sl_cidr_parse("junk", &c, one, sizeof(one)), -1);
    assert_int_equal(one[0], '\0');
    char untouched[4] = "abc";
    assert_int_equal(sl_cidr_parse("junk", &c, untouched, 0), -1);
    assert_string_equal(untouched, "abc");
}

/* ---- sets ---- */

static void test_empty_set(void **state)
{
    (void)state;
    struct sl_cidr_set *s = sl_cidr_set_new(NULL, 0);
    assert_non_null(s);
    assert_int_equal(sl_cidr_set_range_count(s), 0);
    assert_false(has(s, "0.0.0.0"));
    assert_false(has(s, "::"));
    assert_false(has(s, "::ffff:1.2.3.4"));
    sl_cidr_set_free(s);
    sl_cidr_set_free(NULL);
    assert_int_equal(sl_cidr_set_range_count(NULL), 0);
    struct sockaddr_storage ss = sa_of("1.2.3.4", 1);
    assert_false(sl_cidr_set_contains(NULL, (struct sockaddr *)&ss));
}

static void test_ipv4_boundaries(void **state)
{
    (void)state;
    struct sl_cidr_set *s = SET("10.0.0.0/8", "192.168.1.7", "172.16.0.0/12", "1.2.3.4/31");
    assert_true(has(s, "10.0.0.0"));
    assert_true(has(s, "10.255.255.255"));
    assert_true(has(s, "10.1.2.3"));
    assert_false(has(s, "9.255.255.255"));
    assert_false(has(s, "11.0.0.0"));
    assert_true(has(s, "192.168.1.7"));
    assert_false(has(s, "192.168.1.6"));
    assert_false(has(s, "192.168.1.8"));
    assert_true(has(s, "172.16.0.0"));
    assert_true(has(s, "172.31.255.255"));
    assert_false(has(s, "172.15.255.255"));
    assert_false(has(s, "172.32.0.0"));
    assert_true(has(s, "1.2.3.4"));
    assert_true(has(s, "1.2.3.5"));
    assert_false(has(s, "1.2.3.3"));
    assert_false(has(s, "1.2.3.6"));
    assert_false(has(s, "0.0.0.0"));
    assert_false(has(s, "255.255.255.255"));
    /* the same addresses over IPv6 never match IPv4 entries unless mapped */
    assert_false(has(s, "::10.1.2.3"));
    assert_false(has(s, "::"));
    assert_true(has(s, "::ffff:10.1.2.3"));
    assert_false(has(s, "::ffff:11.0.0.0"));
    assert_int_equal(sl_cidr_set_range_count(s), 4);
    sl_cidr_set_free(s);
}

static void test_ipv4_extremes(void **state)
{
    (void)state;
    struct sl_cidr_set *all = SET("0.0.0.0/0");
    assert_true(has(all, "0.0.0.0"));
    assert_true(has(all, "255.255.255.255"));
    assert_true(has(all, "127.0.0.1"));
    assert_true(has(all, "::ffff:8.8.8.8"));
    assert_false(has(all, "::1"));
    assert_false(has(all, "2001:db8::1"));
    sl_cidr_set_free(all);

    struct sl_cidr_set *ends = SET("0.0.0.0", "255.255.255.255");
    assert_true(has(ends, "0.0.0.0"));
    assert_true(has(ends, "255.255.255.255"));
    assert_false(has(ends, "0.0.0.1"));
    assert_false(has(ends, "255.255.255.254"));
    assert_int_equal(sl_cidr_set_range_count(ends), 2);
    sl_cidr_set_free(ends);
}

static void test_ipv6_boundaries(void **state)
{
    (void)state;
    struct sl_cidr_set *s =
        SET("2001:db8::/32", "::1", "2001:db9:0:1::/64", "2001:dba::8000:0/97", "fe80::/10");
    assert_true(has(s, "2001:db8::"));
    assert_true(has(s, "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"));
    assert_false(has(s, "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff"));
    assert_true(has(s, "::1"));
    assert_false(has(s, "::"));
    assert_false(has(s, "::2"));
    /* /64: the boundary between the two 64-bit halves */
    assert_true(has(s, "2001:db9:0:1::"));
    assert_true(has(s, "2001:db9:0:1:ffff:ffff:ffff:ffff"));
    assert_false(has(s, "2001:db9:0:0:ffff:ffff:ffff:ffff"));
    assert_false(has(s, "2001:db9:0:2::"));
    /* /97 inside the low half */
    assert_true(has(s, "2001:dba::8000:0"));
    assert_true(has(s, "2001:dba::ffff:ffff"));
    assert_false(has(s, "2001:dba::7fff:ffff"));
    assert_false(has(s, "2001:dba::1:0:0:0"));
    assert_true(has(s, "fe80::1"));
    assert_true(has(s, "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
    assert_false(has(s, "fec0::"));
    assert_false(has(s, "fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
    /* IPv4 addresses never match IPv6 entries */
    assert_false(has(s, "0.0.0.1"));
    assert_int_equal(sl_cidr_set_range_count(s), 5);
    sl_cidr_set_free(s);

    struct sl_cidr_set *one = SET("2001:db8::1/128", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
    assert_true(has(one, "2001:db8::1"));
    assert_false(has(one, "2001:db8::"));
    assert_false(has(one, "2001:db8::2"));
    assert_true(has(one, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
    assert_false(has(one, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"));
    sl_cidr_set_free(one);

    struct sl_cidr_set *all = SET("::/0");
    assert_true(has(all, "::"));
    assert_true(has(all, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
    assert_true(has(all, "::ffff:0:0:1"));
    /* mapped addresses are IPv4 (see cidr.h), so ::/0 does not cover them */
    assert_false(has(all, "::ffff:1.2.3.4"));
    assert_false(has(all, "1.2.3.4"));
    sl_cidr_set_free(all);
}

static void test_mapped_entries(void **state)
{
    (void)state;
    struct sl_cidr_set *s = SET("::ffff:10.0.0.0/104", "::ffff:192.168.1.7");
    assert_true(has(s, "10.0.0.0"));
    assert_true(has(s, "10.255.255.255"));
    assert_true(has(s, "::ffff:10.9.9.9"));
    assert_false(has(s, "11.0.0.0"));
    assert_true(has(s, "192.168.1.7"));
    assert_true(has(s, "::ffff:192.168.1.7"));
    assert_false(has(s, "192.168.1.8"));
    assert_false(has(s, "::10.0.0.1"));
    sl_cidr_set_free(s);

    struct sl_cidr_set *all4 = SET("::ffff:0.0.0.0/96");
    assert_true(has(all4, "0.0.0.0"));
    assert_true(has(all4, "255.255.255.255"));
    assert_true(has(all4, "::ffff:1.1.1.1"));
    assert_false(has(all4, "::1"));
    sl_cidr_set_free(all4);

    /* just outside the mapped block: ordinary IPv6 entries */
    struct sl_cidr_set *near = SET("::fffe:0:0/96", "::/95");
    assert_false(has(near, "10.0.0.1"));
    assert_false(has(near, "::ffff:10.0.0.1"));
    assert_true(has(near, "::fffe:a00:1"));
    sl_cidr_set_free(near);
}

static void test_merging(void **state)
{
    (void)state;
    struct sl_cidr_set *s;
    s = SET("10.0.0.0/8", "10.1.0.0/16", "10.1.2.3", "10.0.0.0/8");
    assert_int_equal(sl_cidr_set_range_count(s), 1);
    assert_true(has(s, "10.1.2.4"));
    sl_cidr_set_free(s);
    s = SET("10.128.0.0/9", "10.0.0.0/9"); /* adjacent */
    assert_int_equal(sl_cidr_set_range_count(s), 1);
    assert_true(has(s, "10.127.255.255"));
    assert_true(has(s, "10.128.0.0"));
    sl_cidr_set_free(s);
    s = SET("10.0.0.0/8", "12.0.0.0/8"); /* a gap between */
    assert_int_equal(sl_cidr_set_range_count(s), 2);
    assert_false(has(s, "11.0.0.0"));
    sl_cidr_set_free(s);
    s = SET("255.255.255.255", "0.0.0.0/0", "1.2.3.4");
    assert_int_equal(sl_cidr_set_range_count(s), 1);
    sl_cidr_set_free(s);
    s = SET("255.255.255.255", "255.255.255.254");
    assert_int_equal(sl_cidr_set_range_count(s), 1);
    sl_cidr_set_free(s);
    s = SET("8000::/1", "::/1");
    assert_int_equal(sl_cidr_set_range_count(s), 1);
    assert_true(has(s, "7fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
    assert_true(has(s, "8000::"));
    sl_cidr_set_free(s);
    s = SET("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::/0", "::1");
    assert_int_equal(sl_cidr_set_range_count(s), 1);
    sl_cidr_set_free(s);
    /* adjacent across the 64-bit halves: ...:0:ffff:ffff:ffff:ffff and ...:1:: */
    s = SET("2001:db8:0:0::/64", "2001:db8:0:1::/64");
    assert_int_equal(sl_cidr_set_range_count(s), 1);
    sl_cidr_set_free(s);
    s = SET("10.0.0.0/8", "::ffff:10.0.0.0/104", "2001:db8::/32"); /* mapped = IPv4 */
    assert_int_equal(sl_cidr_set_range_count(s), 2);
    sl_cidr_set_free(s);
}

static void test_set_new_rejects_and_masks(void **state)
{
    (void)state;
    struct sl_cidr e = {.family = AF_UNIX, .prefix_len = 0};
    assert_null(sl_cidr_set_new(&e, 1));
    e = (struct sl_cidr){.family = AF_INET, .prefix_len = 33};
    assert_null(sl_cidr_set_new(&e, 1));
    e = (struct sl_cidr){.family = AF_INET6, .prefix_len = 129};
    assert_null(sl_cidr_set_new(&e, 1));
    assert_null(sl_cidr_set_new(NULL, 1));

    /* built by hand with host bits: they are ignored */
    e = (struct sl_cidr){.family = AF_INET, .addr = {10, 1, 2, 3}, .prefix_len = 8};
    struct sl_cidr_set *s = sl_cidr_set_new(&e, 1);
    assert_non_null(s);
    assert_true(has(s, "10.0.0.0"));
    assert_true(has(s, "10.255.255.255"));
    sl_cidr_set_free(s);
}

static void test_other_families(void **state)
{
    (void)state;
    struct sl_cidr_set *s = SET("0.0.0.0/0", "::/0");
    struct sockaddr_un un;
    memset(&un, 0, sizeof(un));
    un.sun_family = AF_UNIX;
    assert_false(sl_cidr_set_contains(s, (struct sockaddr *)&un));
    struct sockaddr_storage none;
    memset(&none, 0, sizeof(none)); /* AF_UNSPEC */
    assert_false(sl_cidr_set_contains(s, (struct sockaddr *)&none));
    assert_false(sl_cidr_set_contains(s, NULL));
    sl_cidr_set_free(s);
}

/* ---- randomized against a linear scan ---- */

static uint64_t rng = 0x2545F4914F6CDD1Dull;

static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void test_random_against_linear_scan(void **state)
{
    (void)state;
    for (int round = 0; round < 200; round++) {
        struct sl_cidr e[40];
        size_t n = (size_t)(next_rand() % 40);
        /* addresses from a small pool of high bits, so prefixes overlap and nest */
        for (size_t i = 0; i < n; i++) {
            bool v4 = next_rand() & 1;
            memset(&e[i], 0, sizeof(e[i]));
            e[i].family = v4 ? AF_INET : AF_INET6;
            unsigned bits = v4 ? 32 : 128;
            for (int b = 0; b < 16; b++)
                e[i].addr[b] = (uint8_t)next_rand();
            e[i].addr[0] &= 0x83;
            if (!v4)
                e[i].addr[8] &= 0x81;
            e[i].prefix_len = (uint8_t)(next_rand() % (bits + 1));
            if (!v4 && next_rand() % 4 == 0) {
                /* an IPv4-mapped entry */
                memcpy(e[i].addr, cidr_model_mapped_prefix, 12);
                e[i].addr[12] &= 0x83;
                e[i].prefix_len = (uint8_t)(96 + next_rand() % 33);
            }
            for (unsigned k = e[i].prefix_len; k < 128; k++)
                e[i].addr[k / 8] &= (uint8_t) ~(0x80u >> (k % 8));
        }
        struct sl_cidr_set *s = sl_cidr_set_new(e, n);
        assert_non_null(s);
        for (int q = 0; q < 500; q++) {
            uint8_t a[16];
            size_t pick = n ? (size_t)(next_rand() % n) : 0;
            for (int b = 0; b < 16; b++)
                a[b] = (uint8_t)next_rand();
            /* half the queries start from an entry so matches happen */
            if (n && (next_rand() & 1)) {
                unsigned keep = (unsigned)(next_rand() % 129);
                for (unsigned k = 0; k < keep; k++) {
                    uint8_t m = (uint8_t)(0x80u >> (k % 8));
                    a[k / 8] = (uint8_t)((a[k / 8] & ~m) | (e[pick].addr[k / 8] & m));
                }
            } else {
                a[0] &= 0x83;
                a[8] &= 0x81;
            }
            if (next_rand() % 4 == 0) {
                /* an IPv4 client seen through a dual-stack socket */
                memmove(a + 12, a, 4);
                memcpy(a, cidr_model_mapped_prefix, 12);
            }
            struct sockaddr_storage ss;
            memset(&ss, 0, sizeof(ss));
            bool v4 = next_rand() & 1;
            if (v4) {
                struct sockaddr_in *in = (struct sockaddr_in *)&ss;
                in->sin_family = AF_INET;
                memcpy(&in->sin_addr, a, 4);
            } else {
                struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
                in6->sin6_family = AF_INET6;
                memcpy(&in6->sin6_addr, a, 16);
            }
            bool want = cidr_model_match(e, n, v4 ? AF_INET : AF_INET6, a);
            if (sl_cidr_set_contains(s, (struct sockaddr *)&ss) != want)
                fail_msg("round %d query %d: want %d", round, q, want);
        }
        sl_cidr_set_free(s);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_ipv4),
        cmocka_unit_test(test_parse_ipv6),
        cmocka_unit_test(test_address_text_functions),
        cmocka_unit_test(test_ipv6_text_round_trip),
        cmocka_unit_test(test_parse_errors),
        cmocka_unit_test(test_parse_err_buffers),
        cmocka_unit_test(test_empty_set),
        cmocka_unit_test(test_ipv4_boundaries),
        cmocka_unit_test(test_ipv4_extremes),
        cmocka_unit_test(test_ipv6_boundaries),
        cmocka_unit_test(test_mapped_entries),
        cmocka_unit_test(test_merging),
        cmocka_unit_test(test_set_new_rejects_and_masks),
        cmocka_unit_test(test_other_families),
        cmocka_unit_test(test_random_against_linear_scan),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
