/* Unit tests for the endpoints file of file-based discovery: the accepted forms (YAML, JSON,
 * bare list, scalars, IPv6), the exact "line:col: message" of every error, the limits, reading
 * from disk, and the inotify watcher on a real loop in a temporary directory. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/loop.h"
#include "proxy/epfile.h"

/* ---- parsing helpers ---------------------------------------------------------------------- */

/* Parses `text` from an exact-size heap copy (so an overread is caught under ASan). */
static int parse(const char *text, size_t len, struct sl_endpoint_spec **out, size_t *n, char *err,
                 size_t err_len)
{
    char *copy = malloc(len ? len : 1);
    assert_non_null(copy);
    memcpy(copy, text, len);
    int rc = sl_epfile_parse(copy, len, out, n, err, err_len);
    free(copy);
    return rc;
}

static struct sl_endpoint_spec *parse_ok(const char *text, size_t *n)
{
    struct sl_endpoint_spec *specs = (void *)1;
    char err[512] = "";
    if (parse(text, strlen(text), &specs, n, err, sizeof err) != 0) {
        print_error("unexpected error: %s\n", err);
        fail();
    }
    if (*n == 0)
        assert_null(specs);
    return specs;
}

static void expect_err(const char *text, const char *expected)
{
    struct sl_endpoint_spec *specs = (void *)1;
    size_t n = 7;
    char err[512] = "";
    assert_int_equal(parse(text, strlen(text), &specs, &n, err, sizeof err), -1);
    assert_null(specs);
    assert_int_equal(n, 0);
    assert_string_equal(err, expected);
}

static void expect_v4(const struct sl_endpoint_spec *s, const char *address, const char *ip,
                      uint16_t port, uint32_t weight, const char *zone)
{
    assert_string_equal(s->address, address);
    assert_int_equal(s->addr_len, sizeof(struct sockaddr_in));
    const struct sockaddr_in *a = (const struct sockaddr_in *)&s->addr;
    assert_int_equal(a->sin_family, AF_INET);
    assert_int_equal(ntohs(a->sin_port), port);
    char buf[INET_ADDRSTRLEN];
    assert_non_null(inet_ntop(AF_INET, &a->sin_addr, buf, sizeof buf));
    assert_string_equal(buf, ip);
    assert_int_equal(s->weight, weight);
    if (zone)
        assert_string_equal(s->zone, zone);
    else
        assert_null(s->zone);
}

static void expect_v6(const struct sl_endpoint_spec *s, const char *address, const char *ip,
                      uint16_t port)
{
    assert_string_equal(s->address, address);
    assert_int_equal(s->addr_len, sizeof(struct sockaddr_in6));
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&s->addr;
    assert_int_equal(a->sin6_family, AF_INET6);
    assert_int_equal(ntohs(a->sin6_port), port);
    char buf[INET6_ADDRSTRLEN];
    assert_non_null(inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof buf));
    assert_string_equal(buf, ip);
}

/* ---- accepted forms ----------------------------------------------------------------------- */

static void test_yaml_mapping(void **state)
{
    (void)state;
    size_t n;
    struct sl_endpoint_spec *s =
        parse_ok("# users service\n"
                 "endpoints:\n"
                 "  - 10.0.0.1:8080\n"
                 "  - address: 10.0.0.2:8081\n"
                 "    weight: 5\n"
                 "    zone: eu-west-1a\n"
                 "  - {address: \"10.0.0.3:1\", weight: 1000, zone: Z_9.x}\n"
                 "  - address: 10.0.0.4:65535\n",
                 &n);
    assert_int_equal(n, 4);
    expect_v4(&s[0], "10.0.0.1:8080", "10.0.0.1", 8080, 1, NULL);
    expect_v4(&s[1], "10.0.0.2:8081", "10.0.0.2", 8081, 5, "eu-west-1a");
    expect_v4(&s[2], "10.0.0.3:1", "10.0.0.3", 1, 1000, "Z_9.x");
    expect_v4(&s[3], "10.0.0.4:65535", "10.0.0.4", 65535, 1, NULL);
    sl_epfile_specs_free(s, n);
}

static void test_bare_list(void **state)
{
    (void)state;
    size_t n;
    struct sl_endpoint_spec *s = parse_ok("- 127.0.0.1:9001\n"
                                          "- 127.0.0.1:9002\n"
                                          "- {address: 127.0.0.1:9003, weight: 3}\n",
                                          &n);
    assert_int_equal(n, 3);
    expect_v4(&s[0], "127.0.0.1:9001", "127.0.0.1", 9001, 1, NULL);
    expect_v4(&s[1], "127.0.0.1:9002", "127.0.0.1", 9002, 1, NULL);
    expect_v4(&s[2], "127.0.0.1:9003", "127.0.0.1", 9003, 3, NULL);
    sl_epfile_specs_free(s, n);

    s = parse_ok("[1.2.3.4:80, \"5.6.7.8:443\"]", &n);
    assert_int_equal(n, 2);
    expect_v4(&s[0], "1.2.3.4:80", "1.2.3.4", 80, 1, NULL);
    expect_v4(&s[1], "5.6.7.8:443", "5.6.7.8", 443, 1, NULL);
    sl_epfile_specs_free(s, n);
}

static void test_json(void **state)
{
    (void)state;
    size_t n;
    struct sl_endpoint_spec *s =
        parse_ok("{\"endpoints\": [{\"address\": \"127.0.0.1:9001\", \"zone\": \"az-a\"}]}", &n);
    assert_int_equal(n, 1);
    expect_v4(&s[0], "127.0.0.1:9001", "127.0.0.1", 9001, 1, "az-a");
    sl_epfile_specs_free(s, n);

    /* compact, as a JSON encoder writes it: no space after ':' */
    s = parse_ok("{\"endpoints\":[{\"address\":\"127.0.0.1:9001\",\"weight\":7},\"[::1]:9002\"]}",
                 &n);
    assert_int_equal(n, 2);
    expect_v4(&s[0], "127.0.0.1:9001", "127.0.0.1", 9001, 7, NULL);
    expect_v6(&s[1], "[::1]:9002", "::1", 9002);
    sl_epfile_specs_free(s, n);

    /* pretty-printed with tabs, a bare JSON array, and trailing newline */
    s = parse_ok("{\n\t\"endpoints\": [\n\t\t{\"address\": \"10.1.1.1:80\", \"weight\": 2},\n"
                 "\t\t\"10.1.1.2:80\"\n\t]\n}\n",
                 &n);
    assert_int_equal(n, 2);
    expect_v4(&s[0], "10.1.1.1:80", "10.1.1.1", 80, 2, NULL);
    expect_v4(&s[1], "10.1.1.2:80", "10.1.1.2", 80, 1, NULL);
    sl_epfile_specs_free(s, n);

    s = parse_ok("[\"10.9.9.9:7\", {\"address\": \"10.9.9.8:7\", \"zone\": \"b\"}]", &n);
    assert_int_equal(n, 2);
    expect_v4(&s[1], "10.9.9.8:7", "10.9.9.8", 7, 1, "b");
    sl_epfile_specs_free(s, n);

    /* JSON errors carry positions too */
    expect_err("{\"endpoints\": [{\"address\": \"127.0.0.1:9001\", \"zone\": \"a b\"}]}",
               "1:54: invalid zone \"a b\": use 1 to 64 letters, digits, '_', '-' or '.'");
    expect_err("{\"endpoints\": [{\"address\": \"127.0.0.1:9001\", \"weight\": 1.5}]}",
               "1:56: weight must be an integer in 1..1000, got \"1.5\"");
    expect_err("{\"endpoints\": [{\"address\": \"127.0.0.1:9001\"}}",
               "1:45: YAML syntax error: did not find expected ',' or ']' (while parsing a flow "
               "sequence at 1:15)");
    /* YAML is laxer than JSON here: a trailing comma is accepted */
    s = parse_ok("{\"endpoints\": [{\"address\": \"127.0.0.1:9001\",},]}", &n);
    assert_int_equal(n, 1);
    sl_epfile_specs_free(s, n);
}

static void test_ipv6(void **state)
{
    (void)state;
    size_t n;
    struct sl_endpoint_spec *s = parse_ok("endpoints:\n"
                                          "  - \"[::1]:80\"\n"
                                          "  - address: \"[2001:db8::10]:8443\"\n"
                                          "    zone: a\n"
                                          "  - '[::ffff:10.0.0.1]:1'\n"
                                          "  - \"[fe80:0:0:0:0:0:0:1]:65535\"\n",
                                          &n);
    assert_int_equal(n, 4);
    expect_v6(&s[0], "[::1]:80", "::1", 80);
    expect_v6(&s[1], "[2001:db8::10]:8443", "2001:db8::10", 8443);
    assert_string_equal(s[1].zone, "a");
    expect_v6(&s[2], "[::ffff:10.0.0.1]:1", "::ffff:10.0.0.1", 1);
    expect_v6(&s[3], "[fe80:0:0:0:0:0:0:1]:65535", "fe80::1", 65535);
    sl_epfile_specs_free(s, n);
}

static void test_empty_lists(void **state)
{
    (void)state;
    size_t n = 9;
    assert_null(parse_ok("endpoints: []\n", &n));
    assert_int_equal(n, 0);
    n = 9;
    assert_null(parse_ok("[]", &n));
    assert_int_equal(n, 0);
    n = 9;
    assert_null(parse_ok("{\"endpoints\": []}", &n));
    assert_int_equal(n, 0);
    sl_epfile_specs_free(NULL, 0);
}

static void test_not_nul_terminated(void **state)
{
    (void)state;
    /* Only `len` bytes count: the rest of the buffer would be a duplicate. */
    const char text[] = "- 1.2.3.4:80\n- 1.2.3.4:80\n";
    struct sl_endpoint_spec *s;
    size_t n;
    char err[256];
    assert_int_equal(parse(text, 13, &s, &n, err, sizeof err), 0);
    assert_int_equal(n, 1);
    expect_v4(&s[0], "1.2.3.4:80", "1.2.3.4", 80, 1, NULL);
    sl_epfile_specs_free(s, n);
    assert_int_equal(parse(text, sizeof text - 1, &s, &n, err, sizeof err), -1);
    assert_string_equal(err, "2:3: duplicate address \"1.2.3.4:80\" (first at 1:3)");
}

/* ---- errors ------------------------------------------------------------------------------- */

static void test_err_document(void **state)
{
    (void)state;
    expect_err("", "1:1: missing key \"endpoints\" (an empty file is refused; write `endpoints: "
                   "[]` for no endpoints)");
    expect_err("# nothing here\n\n", "1:1: missing key \"endpoints\" (an empty file is refused; "
                                     "write `endpoints: []` for no endpoints)");
    expect_err("{}", "1:1: missing key \"endpoints\" (an empty file is refused; write "
                     "`endpoints: []` for no endpoints)");
    expect_err("hello\n", "1:1: expected a list of endpoints or a mapping with key "
                          "\"endpoints\", got a string");
    expect_err("endpoints: []\nupstream: users\n",
               "2:1: unknown key \"upstream\" (the only key is \"endpoints\")");
    expect_err("endpoints:\n", "1:11: expected a list of endpoints, got null");
    expect_err("endpoints: 1.2.3.4:80\n", "1:12: expected a list of endpoints, got a string");
    expect_err("endpoints: {a: 1}\n", "1:12: expected a list of endpoints, got a mapping");
    expect_err("endpoints: [1.2.3.4:80\n",
               "2:1: YAML syntax error: did not find expected ',' or ']' (while parsing a flow "
               "sequence at 1:12)");
    /* a file cut short: libyaml places the end of the stream at the start of the next line,
     * whether or not the file ends with a line break */
    expect_err("[", "2:1: YAML syntax error: did not find expected node content (while parsing a "
                    "flow node at 2:1)");
    expect_err("- 1.2.3.4:80\n---\n- 1.2.3.5:80\n", "2:1: only one YAML document is allowed");
    expect_err("endpoints: []\nendpoints: []\n", "2:1: duplicate key \"endpoints\" (first at 1:1)");
    expect_err("- &a 1.2.3.4:80\n- *a\n",
               "1:3: anchors and aliases are not supported; repeat the value instead");
    expect_err("- \"1.2.3.4:80\"\n- [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
               "[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n",
               "2:66: nesting deeper than 64 levels");
    expect_err("\t- 1.2.3.4:80\n", "1:1: YAML syntax error: found character that cannot "
                                   "start any token (while scanning for the next token at 1:1)");
}

static void test_err_elements(void **state)
{
    (void)state;
    expect_err("- 1.2.3.4:80\n-\n- 1.2.3.5:80\n",
               "2:2: expected an address (ip:port) or a mapping with \"address\", got null");
    expect_err("- [1.2.3.4:80]\n",
               "1:3: expected an address (ip:port) or a mapping with \"address\", got a list");
    expect_err("- weight: 2\n", "1:3: missing required key \"address\"");
    expect_err("- {}\n", "1:3: missing required key \"address\"");
    expect_err("- address: 1.2.3.4:80\n  port: 80\n",
               "2:3: unknown key \"port\" (expected \"address\", \"weight\" or \"zone\")");
    expect_err("- address: 1.2.3.4:80\n  address: 1.2.3.5:80\n",
               "2:3: duplicate key \"address\" (first at 1:3)");
    expect_err("- address: [1.2.3.4:80]\n", "1:12: expected an address (ip:port), got a list");
    expect_err("- address:\n", "1:11: expected an address (ip:port), got null");
}

static void test_err_addresses(void **state)
{
    (void)state;
    const char *host = "not an IP address (host names are not allowed: resolving them would "
                       "block the control loop)";
    char want[512];
    snprintf(want, sizeof want, "1:3: invalid address \"localhost:80\": %s", host);
    expect_err("- localhost:80\n", want);
    snprintf(want, sizeof want, "1:12: invalid address \"users.internal:8080\": %s", host);
    expect_err("- address: users.internal:8080\n", want);
    snprintf(want, sizeof want, "1:3: invalid address \"1.2.3.256:80\": %s", host);
    expect_err("- 1.2.3.256:80\n", want);
    snprintf(want, sizeof want, "1:3: invalid address \"1.2.3:80\": %s", host);
    expect_err("- 1.2.3:80\n", want);
    /* long values are shortened in messages */
    snprintf(want, sizeof want, "1:3: invalid address \"%s...\": %s",
             "a234567890123456789012345678901234567890123456789012345678901234", host);
    expect_err("- a234567890123456789012345678901234567890123456789012345678901234567890:80\n",
               want);
    expect_err("- 1.2.3.4\n",
               "1:3: invalid address \"1.2.3.4\": expected ip:port (the port is missing)");
    expect_err("- \":80\"\n",
               "1:3: invalid address \":80\": expected ip:port (the IP address is missing)");
    expect_err("- 1.2.3.4:0\n",
               "1:3: invalid address \"1.2.3.4:0\": the port must be a number in 1..65535");
    expect_err("- 1.2.3.4:65536\n",
               "1:3: invalid address \"1.2.3.4:65536\": the port must be a number in 1..65535");
    expect_err("- 1.2.3.4:080000\n",
               "1:3: invalid address \"1.2.3.4:080000\": the port must be a number in 1..65535");
    expect_err("- \"1.2.3.4:\"\n",
               "1:3: invalid address \"1.2.3.4:\": the port must be a number in 1..65535");
    /* unquoted, a colon at the end (or before a space) makes YAML read a mapping */
    expect_err("- 1.2.3.4:\n",
               "1:3: unknown key \"1.2.3.4\" (expected \"address\", \"weight\" or \"zone\")");
    expect_err("- 1.2.3.4:http\n",
               "1:3: invalid address \"1.2.3.4:http\": the port must be a number in 1..65535");
    expect_err("- 1.2.3.4:+80\n",
               "1:3: invalid address \"1.2.3.4:+80\": the port must be a number in 1..65535");
    expect_err("- \"::1:80\"\n", "1:3: invalid address \"::1:80\": IPv6 addresses need brackets, "
                                 "e.g. [::1]:80");
    expect_err("- \"[::1]80\"\n", "1:3: invalid address \"[::1]80\": expected [ipv6]:port");
    expect_err("- \"[::1]\"\n", "1:3: invalid address \"[::1]\": expected [ipv6]:port");
    expect_err("- \"[::1\"\n", "1:3: invalid address \"[::1\": expected [ipv6]:port");
    expect_err("- \"[::g]:80\"\n", "1:3: invalid address \"[::g]:80\": invalid IPv6 address");
    expect_err("- \"[1.2.3.4]:80\"\n",
               "1:3: invalid address \"[1.2.3.4]:80\": invalid IPv6 address");
    expect_err("- \"[fe80::1%eth0]:80\"\n",
               "1:3: invalid address \"[fe80::1%eth0]:80\": invalid IPv6 address");
    expect_err("- \"[0000:0000:0000:0000:0000:0000:0000:0000:0000:0000]:80\"\n",
               "1:3: invalid address \"[0000:0000:0000:0000:0000:0000:0000:0000:0000:0000]:80\": "
               "invalid IPv6 address");
    expect_err("- \" 1.2.3.4:80\"\n", "1:3: invalid address \" 1.2.3.4:80\": not an IP address "
                                      "(host names are not allowed: resolving them would block "
                                      "the control loop)");
    expect_err("- \"1.2.3.4:80\\0\"\n",
               "1:3: invalid address \"1.2.3.4:80\\x00\": must not contain NUL bytes");
    expect_err("- \"\"\n", "1:3: invalid address \"\": expected ip:port (the port is missing)");
}

static void test_err_weight_zone(void **state)
{
    (void)state;
    expect_err("- {address: 1.2.3.4:80, weight: 0}\n",
               "1:33: weight must be an integer in 1..1000, got \"0\"");
    expect_err("- {address: 1.2.3.4:80, weight: 1001}\n",
               "1:33: weight must be an integer in 1..1000, got \"1001\"");
    expect_err("- {address: 1.2.3.4:80, weight: 99999999999999999999999}\n",
               "1:33: weight must be an integer in 1..1000, got \"99999999999999999999999\"");
    expect_err("- {address: 1.2.3.4:80, weight: -1}\n",
               "1:33: weight must be an integer in 1..1000, got \"-1\"");
    expect_err("- {address: 1.2.3.4:80, weight: heavy}\n",
               "1:33: weight must be an integer in 1..1000, got \"heavy\"");
    expect_err("- {address: 1.2.3.4:80, weight: \"\"}\n",
               "1:33: weight must be an integer in 1..1000, got \"\"");
    expect_err("- {address: 1.2.3.4:80, weight: }\n",
               "1:33: weight must be an integer in 1..1000, got null");
    expect_err("- {address: 1.2.3.4:80, weight: [1]}\n",
               "1:33: weight must be an integer in 1..1000, got a list");
    expect_err("- {address: 1.2.3.4:80, zone: ~}\n", "1:31: zone must be a name, got null");
    expect_err("- {address: 1.2.3.4:80, zone: {a: b}}\n",
               "1:31: zone must be a name, got a mapping");
    expect_err("- {address: 1.2.3.4:80, zone: \"\"}\n",
               "1:31: invalid zone \"\": use 1 to 64 letters, digits, '_', '-' or '.'");
    expect_err("- {address: 1.2.3.4:80, zone: \"a/b\"}\n",
               "1:31: invalid zone \"a/b\": use 1 to 64 letters, digits, '_', '-' or '.'");
    expect_err("- {address: 1.2.3.4:80, zone: \"a\\0b\"}\n",
               "1:31: invalid zone \"a\\x00b\": use 1 to 64 letters, digits, '_', '-' or '.'");
    /* 64 characters is the longest zone */
    char z[65], text[200], want[300];
    memset(z, 'z', 64);
    z[64] = '\0';
    snprintf(text, sizeof text, "- {address: 1.2.3.4:80, zone: %s}\n", z);
    size_t n;
    struct sl_endpoint_spec *s = parse_ok(text, &n);
    assert_int_equal(n, 1);
    assert_string_equal(s[0].zone, z);
    sl_epfile_specs_free(s, n);
    snprintf(text, sizeof text, "- {address: 1.2.3.4:80, zone: %sz}\n", z);
    snprintf(want, sizeof want,
             "1:31: invalid zone \"%s...\": use 1 to 64 letters, digits, '_', '-' or '.'", z);
    expect_err(text, want);
}

static void test_err_duplicates(void **state)
{
    (void)state;
    expect_err("- 1.2.3.4:80\n- 1.2.3.5:80\n- {address: 1.2.3.4:80, weight: 2}\n",
               "3:13: duplicate address \"1.2.3.4:80\" (first at 1:3)");
    /* the same socket address written two ways */
    expect_err("- \"[::1]:80\"\n- \"[0:0::1]:80\"\n",
               "2:3: duplicate address \"[0:0::1]:80\" (first at 1:3)");
    /* the same IP on other ports, or v4 next to v4-mapped v6, are different endpoints */
    size_t n;
    struct sl_endpoint_spec *s =
        parse_ok("- 1.2.3.4:80\n- 1.2.3.4:81\n- \"[::ffff:1.2.3.4]:80\"\n", &n);
    assert_int_equal(n, 3);
    sl_epfile_specs_free(s, n);
    /* three copies: the second is reported, against the first */
    expect_err("- 9.9.9.9:9\n- 1.1.1.1:1\n- 9.9.9.9:9\n- 9.9.9.9:9\n",
               "3:3: duplicate address \"9.9.9.9:9\" (first at 1:3)");
}

/* The error reported is the one nearest the start of the file, whichever pass found it. */
static void test_err_first_in_file(void **state)
{
    (void)state;
    /* a later duplicate (found last) vs an earlier bad weight */
    expect_err("- 1.2.3.4:80\n- {address: 1.2.3.5:80, weight: 0}\n- 1.2.3.4:80\n",
               "2:33: weight must be an integer in 1..1000, got \"0\"");
    /* a duplicate address before another error of the same element */
    expect_err("- 1.2.3.4:80\n- {address: 1.2.3.4:80, weight: 0}\n",
               "2:13: duplicate address \"1.2.3.4:80\" (first at 1:3)");
    expect_err("- {address: 1.2.3.4:80, zone: \"?\"}\n- {address: 1.2.3.4:80, weight: 0}\n",
               "1:31: invalid zone \"?\": use 1 to 64 letters, digits, '_', '-' or '.'");
    /* a duplicate key (found by the tree) after a bad address (found by the walk) */
    expect_err("- bad\n- {address: 1.2.3.4:80, zone: a, zone: b}\n",
               "1:3: invalid address \"bad\": expected ip:port (the port is missing)");
    /* and the other way round */
    expect_err("- {address: 1.2.3.4:80, zone: a, zone: b}\n- bad\n",
               "1:34: duplicate key \"zone\" (first at 1:25)");
    /* within one mapping: the unknown key before the bad address */
    expect_err("- {colour: red, address: nope}\n",
               "1:4: unknown key \"colour\" (expected \"address\", \"weight\" or \"zone\")");
    expect_err("- {address: nope, colour: red}\n",
               "1:13: invalid address \"nope\": expected ip:port (the port is missing)");
    /* a syntax error stops the tree; nothing after it is looked at */
    expect_err("- 1.2.3.4:80\n- [\n", "3:1: YAML syntax error: did not find expected node "
                                      "content (while parsing a flow node at 3:1)");
}

static char *make_list(size_t count, bool json)
{
    size_t cap = count * 32 + 64, o = 0;
    char *t = malloc(cap);
    assert_non_null(t);
    o += (size_t)snprintf(t + o, cap - o, "%s", json ? "{\"endpoints\": [" : "endpoints:\n");
    for (size_t i = 0; i < count; i++) {
        char addr[32];
        snprintf(addr, sizeof addr, "10.%zu.%zu.%zu:80", i >> 16, (i >> 8) & 255, i & 255);
        if (json)
            o += (size_t)snprintf(t + o, cap - o, "%s\"%s\"", i ? ", " : "", addr);
        else
            o += (size_t)snprintf(t + o, cap - o, "  - %s\n", addr);
    }
    snprintf(t + o, cap - o, "%s", json ? "]}" : "");
    return t;
}

static void test_limits(void **state)
{
    (void)state;
    size_t n;
    char *t = make_list(SL_EPFILE_MAX_ENDPOINTS, false);
    struct sl_endpoint_spec *s = parse_ok(t, &n);
    assert_int_equal(n, SL_EPFILE_MAX_ENDPOINTS);
    expect_v4(&s[9999], "10.0.39.15:80", "10.0.39.15", 80, 1, NULL);
    sl_epfile_specs_free(s, n);
    free(t);

    t = make_list(SL_EPFILE_MAX_ENDPOINTS + 1, false);
    expect_err(t, "10002:5: too many endpoints (at most 10000)");
    free(t);

    t = make_list(SL_EPFILE_MAX_ENDPOINTS, true);
    s = parse_ok(t, &n);
    assert_int_equal(n, SL_EPFILE_MAX_ENDPOINTS);
    sl_epfile_specs_free(s, n);
    free(t);

    /* size: checked before any parsing */
    size_t big = SL_EPFILE_MAX_BYTES + 1;
    char *b = malloc(big);
    assert_non_null(b);
    memset(b, '#', big);
    char err[128];
    assert_int_equal(sl_epfile_parse(b, big, &s, &n, err, sizeof err), -1);
    assert_string_equal(err, "1:1: the file is larger than 4 MiB");
    /* exactly at the limit is parsed (a comment-only file: the empty-file error) */
    assert_int_equal(sl_epfile_parse(b, big - 1, &s, &n, err, sizeof err), -1);
    assert_string_equal(err, "1:1: missing key \"endpoints\" (an empty file is refused; write "
                             "`endpoints: []` for no endpoints)");
    free(b);
}

static void test_err_buffer(void **state)
{
    (void)state;
    struct sl_endpoint_spec *s;
    size_t n;
    char err[8];
    memset(err, 'x', sizeof err);
    assert_int_equal(sl_epfile_parse("- x", 3, &s, &n, err, sizeof err), -1);
    assert_string_equal(err, "1:3: in");
    assert_int_equal(sl_epfile_parse("- x", 3, &s, &n, NULL, 0), -1);
    err[0] = 'q';
    assert_int_equal(sl_epfile_parse("- x", 3, &s, &n, err, 0), -1);
    assert_int_equal(err[0], 'q');
}

/* ---- reading files ------------------------------------------------------------------------ */

static char tmpdir[64];

static void path_in(char *buf, size_t cap, const char *name)
{
    snprintf(buf, cap, "%s/%s", tmpdir, name);
}

/* Writes in place (open, truncate, write, close): one IN_CLOSE_WRITE. */
static void write_in_place(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

/* Writes beside and renames over: IN_MOVED_TO, as editors and config tools do. */
static void write_atomic(const char *path, const char *text)
{
    char tmp[300];
    snprintf(tmp, sizeof tmp, "%s.tmp~", path);
    write_in_place(tmp, text);
    assert_int_equal(rename(tmp, path), 0);
}

static int setup_dir(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/sluice_epfile_XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown_dir(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static void test_read(void **state)
{
    (void)state;
    char path[256], err[512];
    struct sl_endpoint_spec *s = (void *)1;
    size_t n = 3;
    path_in(path, sizeof path, "read.yaml");

    assert_int_equal(sl_epfile_read(path, &s, &n, err, sizeof err), -ENOENT);
    assert_null(s);
    assert_int_equal(n, 0);
    char want[600];
    snprintf(want, sizeof want, "%s: no such file", path);
    assert_string_equal(err, want);

    write_in_place(path, "endpoints:\n  - 10.0.0.1:80\n  - {address: 10.0.0.2:80, zone: b}\n");
    assert_int_equal(sl_epfile_read(path, &s, &n, err, sizeof err), 0);
    assert_int_equal(n, 2);
    expect_v4(&s[1], "10.0.0.2:80", "10.0.0.2", 80, 1, "b");
    sl_epfile_specs_free(s, n);

    write_in_place(path, "endpoints:\n  - 10.0.0.1:80\n  - example.com:80\n");
    assert_int_equal(sl_epfile_read(path, &s, &n, err, sizeof err), -EINVAL);
    assert_null(s);
    snprintf(want, sizeof want,
             "%s:3:5: invalid address \"example.com:80\": not an IP address (host names are "
             "not allowed: resolving them would block the control loop)",
             path);
    assert_string_equal(err, want);

    /* an empty file is refused, with the file's name */
    write_in_place(path, "");
    assert_int_equal(sl_epfile_read(path, &s, &n, err, sizeof err), -EINVAL);
    snprintf(want, sizeof want,
             "%s:1:1: missing key \"endpoints\" (an empty file is refused; write `endpoints: "
             "[]` for no endpoints)",
             path);
    assert_string_equal(err, want);

    /* too large: refused on the size seen, without parsing */
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(ftruncate(fileno(f), SL_EPFILE_MAX_BYTES + 1), 0);
    fclose(f);
    assert_int_equal(sl_epfile_read(path, &s, &n, err, sizeof err), -EFBIG);
    snprintf(want, sizeof want, "%s: larger than 4 MiB", path);
    assert_string_equal(err, want);
    /* at the limit: read and parsed (a valid list padded with a comment) */
    f = fopen(path, "w");
    assert_non_null(f);
    fputs("- 10.0.0.1:80\n#", f);
    for (long i = ftell(f); i < (long)SL_EPFILE_MAX_BYTES; i++)
        fputc('x', f);
    fclose(f);
    assert_int_equal(sl_epfile_read(path, &s, &n, err, sizeof err), 0);
    assert_int_equal(n, 1);
    sl_epfile_specs_free(s, n);
    unlink(path);

    /* a directory, and a FIFO (which must not block the open) */
    assert_int_equal(sl_epfile_read(tmpdir, &s, &n, err, sizeof err), -EINVAL);
    snprintf(want, sizeof want, "%s: not a regular file", tmpdir);
    assert_string_equal(err, want);
    path_in(path, sizeof path, "fifo");
    assert_int_equal(mkfifo(path, 0600), 0);
    assert_int_equal(sl_epfile_read(path, &s, &n, err, sizeof err), -EINVAL);
    snprintf(want, sizeof want, "%s: not a regular file", path);
    assert_string_equal(err, want);
    unlink(path);
}

/* ---- watching ----------------------------------------------------------------------------- */

struct watch_ctx {
    struct sl_loop *loop;
    struct sl_epfile_watch *w;
    int calls;
    uint64_t last_call_ms;
    bool free_in_cb;
    int stop_at; /* stop the loop when calls reaches this */
};

static void on_change(void *data)
{
    struct watch_ctx *c = data;
    c->calls++;
    c->last_call_ms = sl_clock_now_ms();
    if (c->free_in_cb) {
        sl_epfile_watch_free(c->w);
        c->w = NULL;
    }
    if (c->calls >= c->stop_at)
        sl_loop_stop(c->loop);
}

static void on_give_up(struct sl_timer *t)
{
    sl_loop_stop(t->data);
}

/* Runs the loop until the callback count reaches `calls` or `ms` pass. */
static void run_until(struct watch_ctx *c, int calls, uint64_t ms)
{
    struct sl_timer give_up;
    sl_timer_init(&give_up, on_give_up, c->loop);
    c->loop->now_ms = sl_clock_now_ms();
    sl_timer_arm(c->loop, &give_up, ms);
    c->stop_at = calls;
    if (c->calls < calls)
        sl_loop_run(c->loop);
    sl_timer_cancel(c->loop, &give_up);
}

/* Generous bound for a condition expected much sooner; a failure, not a sleep. */
#define WAIT_MS 5000
/* Quiet period after which no further callback is expected (the debounce is 50 ms). */
#define QUIET_MS 300

static void expect_one_call(struct watch_ctx *c)
{
    int before = c->calls;
    run_until(c, before + 1, WAIT_MS);
    assert_int_equal(c->calls, before + 1);
    run_until(c, before + 2, QUIET_MS);
    assert_int_equal(c->calls, before + 1);
}

static void test_watch_events(void **state)
{
    (void)state;
    struct sl_loop loop;
    assert_int_equal(sl_loop_init(&loop), 0);
    char path[256], other[256], err[256] = "";
    path_in(path, sizeof path, "users.yaml");
    path_in(other, sizeof other, "orders.yaml");
    struct watch_ctx c = {.loop = &loop};

    /* the file does not exist yet */
    c.w = sl_epfile_watch_new(&loop, path, on_change, &c, err, sizeof err);
    assert_non_null(c.w);

    /* created */
    write_in_place(path, "- 10.0.0.1:80\n");
    expect_one_call(&c);
    /* written in place */
    write_in_place(path, "- 10.0.0.2:80\n");
    expect_one_call(&c);
    /* replaced by a rename */
    write_atomic(path, "- 10.0.0.3:80\n");
    expect_one_call(&c);
    /* renamed away */
    char moved[300];
    snprintf(moved, sizeof moved, "%s.old", path);
    assert_int_equal(rename(path, moved), 0);
    expect_one_call(&c);
    assert_int_equal(rename(moved, path), 0);
    expect_one_call(&c);
    /* deleted */
    assert_int_equal(unlink(path), 0);
    expect_one_call(&c);

    /* other files of the directory, and names that only share a prefix, do not count */
    write_in_place(other, "- 10.0.0.9:80\n");
    char longer[300];
    snprintf(longer, sizeof longer, "%s.bak", path);
    write_in_place(longer, "x");
    unlink(longer);
    run_until(&c, c.calls + 1, QUIET_MS);
    assert_int_equal(c.calls, 6);

    /* and the file is seen again after all that */
    write_atomic(path, "- 10.0.0.4:80\n");
    expect_one_call(&c);

    sl_epfile_watch_free(c.w);
    /* nothing after free, even for events already queued in the kernel */
    write_in_place(path, "- 10.0.0.5:80\n");
    run_until(&c, c.calls + 1, QUIET_MS);
    assert_int_equal(c.calls, 7);
    sl_loop_run_deferred(&loop);
    unlink(path);
    unlink(other);
    sl_loop_dispose(&loop);
}

struct writer {
    struct sl_timer t;
    struct sl_loop *loop;
    const char *path;
    int left;
    uint64_t every_ms;
    uint64_t last_write_ms;
};

static void on_write_tick(struct sl_timer *t)
{
    struct writer *wr = t->data;
    char text[64];
    snprintf(text, sizeof text, "- 10.0.0.1:%d\n", 1000 + wr->left);
    write_in_place(wr->path, text);
    wr->last_write_ms = sl_clock_now_ms();
    if (--wr->left > 0)
        sl_timer_arm(wr->loop, &wr->t, wr->every_ms);
}

static void test_watch_debounce(void **state)
{
    (void)state;
    struct sl_loop loop;
    assert_int_equal(sl_loop_init(&loop), 0);
    char path[256], err[256] = "";
    path_in(path, sizeof path, "burst.yaml");
    write_in_place(path, "[]");
    struct watch_ctx c = {.loop = &loop};
    c.w = sl_epfile_watch_new(&loop, path, on_change, &c, err, sizeof err);
    assert_non_null(c.w);

    /* An editor's save: five writes 10 ms apart while the loop runs, so the watcher sees them
     * one by one. One call, no sooner than the debounce after the last write. */
    struct writer wr = {.loop = &loop, .path = path, .left = 5, .every_ms = 10};
    sl_timer_init(&wr.t, on_write_tick, &wr);
    loop.now_ms = sl_clock_now_ms();
    sl_timer_arm(&loop, &wr.t, 0);
    run_until(&c, 1, WAIT_MS);
    assert_int_equal(c.calls, 1);
    assert_int_equal(wr.left, 0);
    assert_true(c.last_call_ms >= wr.last_write_ms + SL_EPFILE_DEBOUNCE_MS - 2);
    run_until(&c, 2, QUIET_MS);
    assert_int_equal(c.calls, 1);

    /* A file rewritten non-stop (every 10 ms for 1.5 s) is still reported while it goes on:
     * the debounce is capped. */
    c.calls = 0;
    wr.left = 150;
    loop.now_ms = sl_clock_now_ms();
    sl_timer_arm(&loop, &wr.t, 0);
    run_until(&c, 1, WAIT_MS);
    assert_int_equal(c.calls, 1);
    assert_true(wr.left > 0); /* the writer was still going */
    /* Let it finish. Every write is followed by a call: the last call comes after the last
     * write (so the final content is read), and the end of the burst gives at most two more
     * (the capped deadline, then the debounce of the last events). */
    while (wr.left > 0)
        run_until(&c, INT_MAX, 100);
    int after = c.calls;
    if (c.last_call_ms < wr.last_write_ms)
        run_until(&c, after + 1, WAIT_MS);
    run_until(&c, INT_MAX, QUIET_MS);
    assert_true(c.calls >= after && c.calls <= after + 2);
    assert_true(c.calls >= 2); /* the capped one during the writes, and one after */
    assert_true(c.last_call_ms >= wr.last_write_ms);

    sl_epfile_watch_free(c.w);
    sl_loop_run_deferred(&loop);
    unlink(path);
    sl_loop_dispose(&loop);
}

static void test_watch_free_in_callback(void **state)
{
    (void)state;
    struct sl_loop loop;
    assert_int_equal(sl_loop_init(&loop), 0);
    char path[256], err[256] = "";
    path_in(path, sizeof path, "once.yaml");
    struct watch_ctx c = {.loop = &loop, .free_in_cb = true};
    c.w = sl_epfile_watch_new(&loop, path, on_change, &c, err, sizeof err);
    assert_non_null(c.w);
    write_in_place(path, "[]");
    run_until(&c, 1, WAIT_MS);
    assert_int_equal(c.calls, 1);
    assert_null(c.w);
    write_in_place(path, "- 10.0.0.1:80\n");
    run_until(&c, 2, QUIET_MS);
    assert_int_equal(c.calls, 1);
    unlink(path);
    sl_loop_dispose(&loop);
}

/* Kubernetes ConfigMap volumes: the file is a symlink through `..data`, and an update renames
 * a new `..data` symlink over the old one. */
static void test_watch_configmap(void **state)
{
    (void)state;
    struct sl_loop loop;
    assert_int_equal(sl_loop_init(&loop), 0);
    char v1[256], v2[256], data[256], tmp[256], path[256], file[300], err[256] = "";
    path_in(v1, sizeof v1, "..v1");
    path_in(v2, sizeof v2, "..v2");
    path_in(data, sizeof data, "..data");
    path_in(tmp, sizeof tmp, "..data_tmp");
    path_in(path, sizeof path, "cm.yaml");
    assert_int_equal(mkdir(v1, 0700), 0);
    assert_int_equal(mkdir(v2, 0700), 0);
    snprintf(file, sizeof file, "%s/cm.yaml", v1);
    write_in_place(file, "- 10.0.0.1:80\n");
    snprintf(file, sizeof file, "%s/cm.yaml", v2);
    write_in_place(file, "- 10.0.0.2:80\n");
    assert_int_equal(symlink("..v1", data), 0);
    assert_int_equal(symlink("..data/cm.yaml", path), 0);

    struct watch_ctx c = {.loop = &loop};
    c.w = sl_epfile_watch_new(&loop, path, on_change, &c, err, sizeof err);
    assert_non_null(c.w);
    assert_int_equal(symlink("..v2", tmp), 0);
    assert_int_equal(rename(tmp, data), 0);
    expect_one_call(&c);
    struct sl_endpoint_spec *s;
    size_t n;
    assert_int_equal(sl_epfile_read(path, &s, &n, err, sizeof err), 0);
    expect_v4(&s[0], "10.0.0.2:80", "10.0.0.2", 80, 1, NULL);
    sl_epfile_specs_free(s, n);

    sl_epfile_watch_free(c.w);
    sl_loop_run_deferred(&loop);
    sl_loop_dispose(&loop);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'/..v1 '%s'/..v2 '%s'/..data '%s'", tmpdir, tmpdir, tmpdir,
             path);
    assert_int_equal(system(cmd), 0);
}

static void test_watch_errors(void **state)
{
    (void)state;
    struct sl_loop loop;
    assert_int_equal(sl_loop_init(&loop), 0);
    struct watch_ctx c = {.loop = &loop};
    char path[256], err[512], want[600];

    path_in(path, sizeof path, "missing/users.yaml");
    assert_null(sl_epfile_watch_new(&loop, path, on_change, &c, err, sizeof err));
    snprintf(want, sizeof want, "%s: cannot watch directory %s/missing: No such file or directory",
             path, tmpdir);
    assert_string_equal(err, want);

    char file[256];
    path_in(file, sizeof file, "plain");
    write_in_place(file, "");
    path_in(path, sizeof path, "plain/users.yaml");
    assert_null(sl_epfile_watch_new(&loop, path, on_change, &c, err, sizeof err));
    snprintf(want, sizeof want, "%s: cannot watch directory %s: Not a directory", path, file);
    assert_string_equal(err, want);
    unlink(file);

    path_in(path, sizeof path, "");
    assert_null(sl_epfile_watch_new(&loop, path, on_change, &c, err, sizeof err));
    snprintf(want, sizeof want, "%s: not a file path", path);
    assert_string_equal(err, want);
    assert_null(sl_epfile_watch_new(&loop, "", on_change, &c, err, sizeof err));
    assert_string_equal(err, ": not a file path");
    assert_null(sl_epfile_watch_new(&loop, "a/..", on_change, &c, err, sizeof err));
    assert_string_equal(err, "a/..: not a file path");

    /* a relative name with no directory watches the current one */
    struct sl_epfile_watch *w =
        sl_epfile_watch_new(&loop, "sluice-epfile-test.yaml", on_change, &c, err, sizeof err);
    assert_non_null(w);
    sl_epfile_watch_free(w);
    sl_epfile_watch_free(NULL);
    sl_loop_run_deferred(&loop);
    sl_loop_dispose(&loop);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_yaml_mapping),
        cmocka_unit_test(test_bare_list),
        cmocka_unit_test(test_json),
        cmocka_unit_test(test_ipv6),
        cmocka_unit_test(test_empty_lists),
        cmocka_unit_test(test_not_nul_terminated),
        cmocka_unit_test(test_err_document),
        cmocka_unit_test(test_err_elements),
        cmocka_unit_test(test_err_addresses),
        cmocka_unit_test(test_err_weight_zone),
        cmocka_unit_test(test_err_duplicates),
        cmocka_unit_test(test_err_first_in_file),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_err_buffer),
        cmocka_unit_test(test_read),
        cmocka_unit_test(test_watch_events),
        cmocka_unit_test(test_watch_debounce),
        cmocka_unit_test(test_watch_free_in_callback),
        cmocka_unit_test(test_watch_configmap),
        cmocka_unit_test(test_watch_errors),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
