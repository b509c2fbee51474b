/* Unit tests for the configuration loader: values and defaults of a full example, the global ->
 * listener limits merge, the unit parsers, and the exact text (file:line:col: path: message) of
 * every class of load error. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <errno.h>
#include <unistd.h>
#include <netinet/in.h>

#include <cmocka.h>

#include "config/config.h"
#include "config/filter_conf.h"
#include "filters/filter_set.h"

/* Loads `yaml` as "t.yaml"; returns the printed errors (caller frees) or NULL on success. */
static char *load(const char *yaml, struct sl_config **cfg)
{
    struct sl_config_errors errs;
    int rc = sl_config_load_string("t.yaml", yaml, strlen(yaml), cfg, &errs);
    char *text = NULL;
    size_t len = 0;
    if (rc != 0) {
        assert_null(*cfg);
        FILE *f = open_memstream(&text, &len);
        assert_non_null(f);
        sl_config_errors_print(&errs, f);
        fclose(f);
        assert_true(errs.count > 0);
    } else {
        assert_non_null(*cfg);
        assert_int_equal(errs.count, 0);
    }
    sl_config_errors_dispose(&errs);
    return text;
}

static struct sl_config *load_ok(const char *yaml)
{
    struct sl_config *cfg = NULL;
    char *err = load(yaml, &cfg);
    if (err) {
        print_error("unexpected errors:\n%s", err);
        free(err);
        fail();
    }
    return cfg;
}

static void expect_errors(const char *yaml, const char *expected)
{
    struct sl_config *cfg = NULL;
    char *err = load(yaml, &cfg);
    if (!err) {
        sl_config_free(cfg);
        fail_msg("loaded, expected:\n%s", expected);
    }
    assert_string_equal(err, expected);
    free(err);
}

static const char example[] =
    "workers: auto\n"
    "drain_timeout: 10s\n"
    "listeners:\n"
    "  - name: public\n"
    "    address: 127.0.0.1:8080\n"
    "    limits: {max_header_bytes: 16KiB, max_body_bytes: 10MiB, header_timeout: 10s, "
    "idle_timeout: 60s}\n"
    "upstreams:\n"
    "  - name: users\n"
    "    balance: least_request        # round_robin | least_request | hash\n"
    "    hash_on: header:X-User-Id     # with balance: hash \xe2\x80\x94 ip | header:NAME | "
    "cookie:NAME\n"
    "    endpoints:\n"
    "      - {address: 127.0.0.1:9001, weight: 1, zone: az-a}\n"
    "    keepalive: {max_idle: 64, idle_timeout: 30s}\n"
    "    timeouts: {connect: 1s, response: 15s}\n"
    "routes:\n"
    "  - name: users\n"
    "    match: {host: api.example.com, path_prefix: /users, methods: [GET, POST], headers: "
    "{X-Version: \"2\"}}\n"
    "    upstream: users\n"
    "    strip_prefix: true\n"
    "    request_headers: {set: {X-Gateway: sluice}, remove: [X-Internal]}\n"
    "    response_headers: {set: {X-Frame-Options: DENY}}\n"
    "  - name: health\n"
    "    match: {path: /healthz}\n"
    "    direct_response: {status: 200, body: \"ok\\n\", content_type: text/plain}\n";

static void test_example(void **state)
{
    (void)state;
    struct sl_config *cfg = load_ok(example);
    assert_string_equal(cfg->path, "t.yaml");
    assert_int_equal(cfg->workers, 0);
    assert_int_equal(cfg->drain_timeout_ms, 10000);
    assert_int_equal(cfg->log_level, SL_LOG_INFO);

    assert_int_equal(cfg->listener_count, 1);
    const struct sl_listener_conf *l = &cfg->listeners[0];
    assert_string_equal(l->name, "public");
    assert_string_equal(l->address, "127.0.0.1:8080");
    const struct sockaddr_in *a4 = (const struct sockaddr_in *)&l->addr;
    assert_int_equal(a4->sin_family, AF_INET);
    assert_int_equal(ntohs(a4->sin_port), 8080);
    assert_int_equal(ntohl(a4->sin_addr.s_addr), 0x7f000001);
    assert_int_equal(l->addr_len, sizeof(struct sockaddr_in));
    assert_int_equal(l->backlog, 4096);
    assert_int_equal(l->limits.max_header_bytes, 16384);
    assert_int_equal(l->limits.max_header_count, 100);
    assert_int_equal(l->limits.max_uri_bytes, 8192);
    assert_int_equal(l->limits.max_body_bytes, 10 * 1024 * 1024);
    assert_int_equal(l->limits.header_timeout_ms, 10000);
    assert_int_equal(l->limits.body_timeout_ms, 60000);
    assert_int_equal(l->limits.idle_timeout_ms, 60000);
    assert_int_equal(l->limits.send_timeout_ms, 60000);
    assert_int_equal(l->limits.max_requests_per_conn, 0);
    assert_int_equal(l->line, 4);
    assert_int_equal(l->col, 5);

    assert_int_equal(cfg->upstream_count, 1);
    const struct sl_upstream_conf *u = &cfg->upstreams[0];
    assert_string_equal(u->name, "users");
    assert_int_equal(u->balance, SL_BALANCE_LEAST_REQUEST);
    /* Parsed and kept even though it only matters with balance: hash. */
    assert_int_equal(u->hash_on, SL_HASH_HEADER);
    assert_string_equal(u->hash_key, "X-User-Id");
    assert_int_equal(u->endpoint_count, 1);
    assert_string_equal(u->endpoints[0].address, "127.0.0.1:9001");
    assert_int_equal(u->endpoints[0].weight, 1);
    assert_string_equal(u->endpoints[0].zone, "az-a");
    assert_int_equal(u->endpoints[0].addr_len, sizeof(struct sockaddr_in));
    assert_int_equal(u->keepalive_max_idle, 64);
    assert_int_equal(u->keepalive_idle_timeout_ms, 30000);
    assert_int_equal(u->connect_timeout_ms, 1000);
    assert_int_equal(u->response_timeout_ms, 15000);
    assert_int_equal(u->idle_timeout_ms, 60000);
    assert_int_equal(u->retries.attempts, 2);
    assert_int_equal(u->retries.budget_percent, 20);
    assert_true(u->passive.enabled);
    assert_int_equal(u->passive.consecutive_failures, 5);
    assert_int_equal(u->passive.max_ejection_percent, 50);
    assert_true(sl_status_set_has(&u->passive.statuses, 503));
    assert_false(sl_status_set_has(&u->passive.statuses, 500));
    assert_false(u->active.enabled);

    assert_int_equal(cfg->route_count, 2);
    const struct sl_route_conf *r = &cfg->routes[0];
    assert_string_equal(r->name, "users");
    assert_int_equal(r->index, 0);
    assert_string_equal(r->match.host, "api.example.com");
    assert_null(r->match.path);
    assert_string_equal(r->match.path_prefix, "/users");
    assert_int_equal(r->match.methods, SL_METHOD_GET | SL_METHOD_POST);
    assert_int_equal(r->match.method_name_count, 0);
    assert_int_equal(r->match.header_count, 1);
    assert_string_equal(r->match.headers[0].name, "X-Version");
    assert_string_equal(r->match.headers[0].value, "2");
    assert_int_equal(r->listener_count, 0);
    assert_string_equal(r->upstream, "users");
    assert_int_equal(r->upstream_index, 0);
    assert_true(r->strip_prefix);
    assert_null(r->rewrite_prefix);
    assert_int_equal(r->request_headers.set_count, 1);
    assert_string_equal(r->request_headers.set[0].name, "X-Gateway");
    assert_string_equal(r->request_headers.set[0].value, "sluice");
    assert_int_equal(r->request_headers.add_count, 0);
    assert_int_equal(r->request_headers.remove_count, 1);
    assert_string_equal(r->request_headers.remove[0], "X-Internal");
    assert_int_equal(r->response_headers.set_count, 1);
    assert_string_equal(r->response_headers.set[0].name, "X-Frame-Options");
    assert_string_equal(r->response_headers.set[0].value, "DENY");
    assert_false(r->has_direct_response);
    assert_int_equal(r->line, 16);

    r = &cfg->routes[1];
    assert_string_equal(r->name, "health");
    assert_int_equal(r->index, 1);
    assert_null(r->match.host);
    assert_string_equal(r->match.path, "/healthz");
    assert_null(r->upstream);
    assert_true(r->has_direct_response);
    assert_int_equal(r->direct_response.status, 200);
    assert_int_equal(r->direct_response.body_len, 3);
    assert_memory_equal(r->direct_response.body, "ok\n", 4);
    assert_string_equal(r->direct_response.content_type, "text/plain");
    sl_config_free(cfg);
}

static void test_defaults(void **state)
{
    (void)state;
    struct sl_config *cfg =
        load_ok("listeners: [{name: l, address: '[::1]:8080'}]\n"
                "upstreams: [{name: u, endpoints: ['127.0.0.1:9001']}]\n"
                "routes:\n"
                "  - {upstream: u}\n"
                "  - {direct_response: {}}\n"
                "  - {match: {host: '*.Example.COM', path_prefix: /v1, methods: [PURGE, GET]},"
                " rewrite_prefix: /v2, upstream: u, listeners: [l]}\n");
    assert_int_equal(cfg->workers, 0);
    assert_int_equal(cfg->drain_timeout_ms, 10000);
    assert_int_equal(cfg->log_level, SL_LOG_INFO);
    const struct sl_listener_conf *l = &cfg->listeners[0];
    assert_int_equal(l->addr.ss_family, AF_INET6);
    assert_int_equal(ntohs(((const struct sockaddr_in6 *)&l->addr)->sin6_port), 8080);
    assert_int_equal(l->limits.max_header_bytes, 16 * 1024);
    assert_int_equal(l->limits.max_body_bytes, 10 * 1024 * 1024);
    const struct sl_upstream_conf *u = &cfg->upstreams[0];
    assert_int_equal(u->balance, SL_BALANCE_ROUND_ROBIN);
    assert_int_equal(u->hash_on, SL_HASH_IP);
    assert_null(u->hash_key);
    assert_int_equal(u->endpoints[0].weight, 1);
    assert_null(u->endpoints[0].zone);
    assert_int_equal(u->keepalive_max_idle, 64);
    assert_int_equal(u->keepalive_idle_timeout_ms, 30000);
    assert_int_equal(u->connect_timeout_ms, 1000);
    assert_int_equal(u->response_timeout_ms, 15000);
    assert_int_equal(u->idle_timeout_ms, 60000);
    assert_int_equal(u->retries.attempts, 2);
    assert_int_equal(u->retries.budget_percent, 20);
    assert_true(u->passive.enabled);
    assert_int_equal(u->passive.consecutive_failures, 5);
    assert_int_equal(u->passive.max_ejection_percent, 50);
    assert_true(sl_status_set_has(&u->passive.statuses, 503));
    assert_false(sl_status_set_has(&u->passive.statuses, 500));
    assert_false(u->active.enabled);
    assert_string_equal(cfg->routes[0].name, "route0");
    assert_false(cfg->routes[0].strip_prefix);
    assert_false(cfg->routes[0].has_direct_response);
    assert_null(cfg->routes[0].direct_response.body);
    const struct sl_route_conf *d = &cfg->routes[1];
    assert_string_equal(d->name, "route1");
    assert_true(d->has_direct_response);
    assert_int_equal(d->direct_response.status, 200);
    assert_string_equal(d->direct_response.body, "");
    assert_int_equal(d->direct_response.body_len, 0);
    assert_string_equal(d->direct_response.content_type, "text/plain");
    const struct sl_route_conf *w = &cfg->routes[2];
    assert_string_equal(w->match.host, "*.example.com");
    assert_int_equal(w->match.methods, SL_METHOD_GET);
    assert_int_equal(w->match.method_name_count, 1);
    assert_string_equal(w->match.method_names[0], "PURGE");
    assert_string_equal(w->rewrite_prefix, "/v2");
    assert_true(w->strip_prefix); /* implied by rewrite_prefix */
    assert_int_equal(w->listener_count, 1);
    assert_string_equal(w->listeners[0], "l");
    sl_config_free(cfg);
}

static void test_limits_merge(void **state)
{
    (void)state;
    /* `limits:` after `listeners:` still applies: the merge does not depend on file order. */
    struct sl_config *cfg = load_ok("listeners:\n"
                                    "  - name: a\n"
                                    "    address: 127.0.0.1:1\n"
                                    "    limits: {max_header_count: 7, idle_timeout: 5s}\n"
                                    "  - name: b\n"
                                    "    address: 127.0.0.1:2\n"
                                    "limits:\n"
                                    "  max_header_count: 50\n"
                                    "  max_body_bytes: 1MB\n"
                                    "  header_timeout: 2s\n");
    const struct sl_limits_conf *a = &cfg->listeners[0].limits, *b = &cfg->listeners[1].limits;
    assert_int_equal(a->max_header_count, 7);     /* listener wins */
    assert_int_equal(a->idle_timeout_ms, 5000);   /* listener only */
    assert_int_equal(a->max_body_bytes, 1000000); /* global */
    assert_int_equal(a->header_timeout_ms, 2000); /* global */
    assert_int_equal(a->max_uri_bytes, 8192);     /* built-in default */
    assert_int_equal(b->max_header_count, 50);
    assert_int_equal(b->idle_timeout_ms, 60000);
    assert_int_equal(b->max_body_bytes, 1000000);
    assert_int_equal(b->header_timeout_ms, 2000);
    sl_config_free(cfg);
}

static void test_hash_on_ignored_without_hash(void **state)
{
    (void)state;
    struct sl_config *cfg = load_ok("listeners: [{name: l, address: 127.0.0.1:1}]\n"
                                    "upstreams:\n"
                                    "  - {name: a, balance: round_robin, hash_on: cookie:sid,"
                                    " endpoints: [127.0.0.1:2]}\n"
                                    "  - {name: b, balance: hash, hash_on: ip,"
                                    " endpoints: [127.0.0.1:3]}\n");
    assert_int_equal(cfg->upstreams[0].balance, SL_BALANCE_ROUND_ROBIN);
    assert_int_equal(cfg->upstreams[0].hash_on, SL_HASH_COOKIE);
    assert_string_equal(cfg->upstreams[0].hash_key, "sid");
    assert_int_equal(cfg->upstreams[1].balance, SL_BALANCE_HASH);
    assert_int_equal(cfg->upstreams[1].hash_on, SL_HASH_IP);
    sl_config_free(cfg);
}

static void test_durations(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        int rc;
        uint64_t ms;
    } cases[] = {
        {"250ms", 0, 250},
        {"10s", 0, 10000},
        {"1m", 0, 60000},
        {"2h", 0, 7200000},
        {"0s", 0, 0},
        {"1500", 0, 1500},
        {"", -EINVAL, 0},
        {"s", -EINVAL, 0},
        {"1.5s", -EINVAL, 0},
        {"10 s", -EINVAL, 0},
        {"-1s", -EINVAL, 0},
        {"3d", -EINVAL, 0},
        {"10S", -EINVAL, 0},
        {"1sm", -EINVAL, 0},
        {"99999999999999999999ms", -EINVAL, 0},
        {"9999999999999999h", -EINVAL, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint64_t v = 12345;
        int rc = sl_config_parse_duration(cases[i].in, &v);
        if (rc != cases[i].rc || (rc == 0 && v != cases[i].ms))
            fail_msg("duration \"%s\": rc %d value %llu", cases[i].in, rc, (unsigned long long)v);
    }
}

static void test_sizes(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        int rc;
        uint64_t bytes;
    } cases[] = {
        {"512", 0, 512},        {"512B", 0, 512},        {"16KiB", 0, 16384},
        {"10MiB", 0, 10485760}, {"1GiB", 0, 1073741824}, {"4KB", 0, 4000},
        {"2MB", 0, 2000000},    {"1GB", 0, 1000000000},  {"0", 0, 0},
        {"16kib", -EINVAL, 0},  {"16 KiB", -EINVAL, 0},  {"KiB", -EINVAL, 0},
        {"1.5MiB", -EINVAL, 0}, {"-1", -EINVAL, 0},      {"20000000000GiB", -EINVAL, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint64_t v = 12345;
        int rc = sl_config_parse_size(cases[i].in, &v);
        if (rc != cases[i].rc || (rc == 0 && v != cases[i].bytes))
            fail_msg("size \"%s\": rc %d value %llu", cases[i].in, rc, (unsigned long long)v);
    }
}

static void test_addresses(void **state)
{
    (void)state;
    struct sockaddr_storage ss;
    socklen_t len;
    assert_int_equal(sl_config_parse_address("10.1.2.3:443", &ss, &len), 0);
    assert_int_equal(ss.ss_family, AF_INET);
    assert_int_equal(len, sizeof(struct sockaddr_in));
    assert_int_equal(ntohs(((struct sockaddr_in *)&ss)->sin_port), 443);
    assert_int_equal(sl_config_parse_address("[::1]:80", &ss, &len), 0);
    assert_int_equal(ss.ss_family, AF_INET6);
    assert_int_equal(len, sizeof(struct sockaddr_in6));
    assert_int_equal(sl_config_parse_address("localhost:80", &ss, &len), 0);
    assert_true(len > 0);
    assert_int_equal(sl_config_parse_address("127.0.0.1", &ss, &len), -EINVAL);
    assert_int_equal(sl_config_parse_address("127.0.0.1:0", &ss, &len), -EINVAL);
    assert_int_equal(sl_config_parse_address("127.0.0.1:65536", &ss, &len), -EINVAL);
    assert_int_equal(sl_config_parse_address("127.0.0.1:80x", &ss, &len), -EINVAL);
    assert_int_equal(sl_config_parse_address("::1:80", &ss, &len), -EINVAL);
    assert_int_equal(sl_config_parse_address("[::1]80", &ss, &len), -EINVAL);
    assert_int_equal(sl_config_parse_address(":80", &ss, &len), -EINVAL);
    assert_int_equal(sl_config_parse_address("no such.host:80", &ss, &len), -EINVAL);
    assert_int_equal(sl_config_parse_address("name.invalid:80", &ss, &len), -ENOENT);

    /* With resolution off a hostname is only syntax-checked. */
    sl_config_set_resolve(false);
    assert_int_equal(sl_config_parse_address("name.invalid:80", &ss, &len), 0);
    assert_int_equal(len, 0);
    struct sl_config *cfg = load_ok("listeners: [{name: l, address: 'gw.invalid:8080'}]\n");
    assert_int_equal(cfg->listeners[0].addr_len, 0);
    sl_config_free(cfg);
    sl_config_set_resolve(true);
}

static void test_methods(void **state)
{
    (void)state;
    assert_int_equal(sl_method_from_token("GET", 3), SL_METHOD_GET);
    assert_int_equal(sl_method_from_token("HEAD", 4), SL_METHOD_HEAD);
    assert_int_equal(sl_method_from_token("CONNECT", 7), SL_METHOD_CONNECT);
    assert_int_equal(sl_method_from_token("GETX", 3), SL_METHOD_GET); /* length-bounded */
    assert_int_equal(sl_method_from_token("get", 3), SL_METHOD_OTHER);
    assert_int_equal(sl_method_from_token("PURGE", 5), SL_METHOD_OTHER);
    assert_int_equal(sl_method_from_token("", 0), SL_METHOD_OTHER);
}

static void test_unresolvable_host(void **state)
{
    (void)state;
    struct sl_config *cfg = NULL;
    char *err = load("listeners: [{name: l, address: 'gw.invalid:8080'}]\n", &cfg);
    assert_non_null(err);
    assert_non_null(strstr(err, "t.yaml:1:32: listeners[0].address: invalid address "
                                "\"gw.invalid:8080\": cannot resolve host: "));
    free(err);
}

static void test_too_deep(void **state)
{
    (void)state;
    char yaml[256] = "a: ";
    for (int i = 0; i < 80; i++)
        yaml[3 + i] = '[';
    struct sl_config *cfg = NULL;
    char *err = load(yaml, &cfg);
    assert_non_null(err);
    assert_true(strncmp(err, "t.yaml:1:67: a[0][0]", 20) == 0);
    assert_non_null(strstr(err, "[0]: nesting deeper than 64 levels\n"));
    free(err);
}

static void test_file(void **state)
{
    (void)state;
    struct sl_config *cfg = NULL;
    struct sl_config_errors errs;
    assert_int_equal(sl_config_load("/nonexistent/sluice.yaml", &cfg, &errs), -1);
    assert_null(cfg);
    assert_int_equal(errs.count, 1);
    assert_string_equal(errs.file, "/nonexistent/sluice.yaml");
    assert_string_equal(errs.items[0].path, "(root)");
    assert_string_equal(errs.items[0].message, "cannot read the file: No such file or directory");
    sl_config_errors_dispose(&errs);

    char path[] = "/tmp/sluice-test-config-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fputs(example, f);
    fclose(f);
    assert_int_equal(sl_config_load(path, &cfg, &errs), 0);
    assert_string_equal(cfg->path, path);
    assert_int_equal(cfg->route_count, 2);
    sl_config_free(cfg);
    sl_config_errors_dispose(&errs);
    unlink(path);
}

static void test_quickstart(void **state)
{
    (void)state;
    /* Run from the repository root (as `make` does); elsewhere there is nothing to check. */
    FILE *f = fopen("examples/quickstart.yaml", "r");
    if (!f)
        skip();
    fclose(f);
    struct sl_config *cfg = NULL;
    struct sl_config_errors errs;
    int rc = sl_config_load("examples/quickstart.yaml", &cfg, &errs);
    if (rc != 0)
        sl_config_errors_print(&errs, stderr);
    assert_int_equal(rc, 0);
    assert_int_equal(cfg->listener_count, 2);
    assert_string_equal(cfg->listeners[0].name, "public");
    assert_string_equal(cfg->listeners[1].name, "demo");
    assert_int_equal(cfg->upstream_count, 1);
    sl_config_free(cfg);
    sl_config_errors_dispose(&errs);
}

static void test_print_format(void **state)
{
    (void)state;
    struct sl_config_errors errs;
    struct sl_config *cfg = NULL;
    const char *yaml = "listeners: [{name: p, address: 127.0.0.1:1}]\n"
                       "routes: [{upstream: user}]\n";
    assert_int_equal(sl_config_load_string("sluice.yaml", yaml, strlen(yaml), &cfg, &errs), -1);
    assert_int_equal(errs.count, 1);
    assert_int_equal(errs.items[0].line, 2);
    assert_int_equal(errs.items[0].col, 21);
    assert_string_equal(errs.items[0].path, "routes[0].upstream");
    assert_string_equal(errs.items[0].message, "unknown upstream \"user\"");
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    sl_config_errors_print(&errs, f);
    fclose(f);
    assert_string_equal(text, "sluice.yaml:2:21: routes[0].upstream: unknown upstream \"user\"\n");
    free(text);
    sl_config_errors_dispose(&errs);
}

static void test_err_unknown_key(void **state)
{
    (void)state;
    expect_errors(
        "listeners:\n"
        "  - name: public\n"
        "    address: 127.0.0.1:8080\n"
        "    limts: {}\n",
        "t.yaml:4:5: listeners[0].limts: unknown key \"limts\" (did you mean \"limits\"?)\n");
}

static void test_err_wrong_type(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - name: public\n"
                  "    address: 127.0.0.1:8080\n"
                  "    backlog: [1]\n"
                  "upstreams: {}\n",
                  "t.yaml:4:14: listeners[0].backlog: expected an integer, got a list\n"
                  "t.yaml:5:12: upstreams: expected a list, got a mapping\n");
}

static void test_err_range(void **state)
{
    (void)state;
    expect_errors(
        "workers: 0\n"
        "listeners:\n"
        "  - name: public\n"
        "    address: 127.0.0.1:8080\n"
        "    backlog: 70000\n"
        "    limits: {max_header_bytes: 100, header_timeout: 2h}\n",
        "t.yaml:1:10: workers: expected \"auto\" or an integer in 1..256, got \"0\"\n"
        "t.yaml:5:14: listeners[0].backlog: 70000 is out of range 1..65535\n"
        "t.yaml:6:32: listeners[0].limits.max_header_bytes: 100 is out of range 1KiB..16MiB\n"
        "t.yaml:6:53: listeners[0].limits.header_timeout: 2h is out of range 1ms..1h\n");
}

static void test_err_bad_duration(void **state)
{
    (void)state;
    expect_errors("drain_timeout: 10\n"
                  "listeners:\n"
                  "  - name: public\n"
                  "    address: 127.0.0.1:8080\n"
                  "    limits: {idle_timeout: 1.5s, body_timeout: 10 s, send_timeout: 3d}\n",
                  "t.yaml:1:16: drain_timeout: invalid duration \"10\": add a unit (ms, s, m or "
                  "h), e.g. 10s\n"
                  "t.yaml:5:28: listeners[0].limits.idle_timeout: invalid duration \"1.5s\": use a "
                  "number with ms, s, m or h, e.g. 10s\n"
                  "t.yaml:5:48: listeners[0].limits.body_timeout: invalid duration \"10 s\": use a "
                  "number with ms, s, m or h, e.g. 10s\n"
                  "t.yaml:5:68: listeners[0].limits.send_timeout: invalid duration \"3d\": use a "
                  "number with ms, s, m or h, e.g. 10s\n");
}

static void test_err_bad_size(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - name: public\n"
                  "    address: 127.0.0.1:8080\n"
                  "    limits: {max_header_bytes: 16kib, max_body_bytes: -1}\n",
                  "t.yaml:4:32: listeners[0].limits.max_header_bytes: invalid size \"16kib\": use "
                  "bytes or a number with KiB, MiB, GiB (1024-based) or KB, MB, GB (1000-based)\n"
                  "t.yaml:4:55: listeners[0].limits.max_body_bytes: invalid size \"-1\": use bytes "
                  "or a number with KiB, MiB, GiB (1024-based) or KB, MB, GB (1000-based)\n");
}

static void test_err_syntax(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - name: public\n"
                  "    address: 127.0.0.1:8080\n"
                  "    limits: {max_header_bytes: 1KiB\n"
                  "routes: [\n",
                  "t.yaml:5:7: listeners[0].limits: YAML syntax error: did not find expected ',' "
                  "or '}' (while parsing a flow mapping at 4:13)\n");
}

static void test_err_syntax2(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - name: public\n"
                  "     address: x\n",
                  "t.yaml:3:13: listeners[0]: YAML syntax error: mapping values are not allowed in "
                  "this context\n");
}

static void test_err_dupkey(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - name: public\n"
                  "    address: 127.0.0.1:8080\n"
                  "    name: again\n",
                  "t.yaml:4:5: listeners[0].name: duplicate key \"name\" (first at 2:5)\n");
}

static void test_err_dupnames(void **state)
{
    (void)state;
    expect_errors(
        "listeners:\n"
        "  - name: public\n"
        "    address: 127.0.0.1:8080\n"
        "  - name: public\n"
        "    address: 127.0.0.1:8081\n"
        "  - name: other\n"
        "    address: 127.0.0.1:8080\n"
        "  - name: any\n"
        "    address: 0.0.0.0:8081\n"
        "upstreams:\n"
        "  - {name: u, endpoints: [127.0.0.1:1]}\n"
        "  - {name: u, endpoints: [127.0.0.1:2]}\n"
        "routes:\n"
        "  - {name: r, upstream: u}\n"
        "  - {name: r, upstream: u}\n",
        "t.yaml:4:11: listeners[1].name: duplicate listener name \"public\" (first defined at "
        "2:11)\n"
        "t.yaml:7:14: listeners[2].address: duplicate listener address \"127.0.0.1:8080\" (already "
        "used by listener \"public\")\n"
        "t.yaml:9:14: listeners[3].address: address \"0.0.0.0:8081\" overlaps listener \"public\" "
        "(127.0.0.1:8081)\n"
        "t.yaml:12:12: upstreams[1].name: duplicate upstream name \"u\" (first defined at 11:12)\n"
        "t.yaml:15:12: routes[1].name: duplicate route name \"r\" (first defined at 14:12)\n");
}

static void test_err_route_rules(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - name: public\n"
                  "    address: 127.0.0.1:8080\n"
                  "upstreams:\n"
                  "  - {name: u, endpoints: [127.0.0.1:1]}\n"
                  "routes:\n"
                  "  - {upstream: u, direct_response: {status: 204}}\n"
                  "  - match: {path: /a}\n"
                  "  - {match: {path: /a, path_prefix: /b}, upstream: u}\n"
                  "  - {match: {path: /a}, strip_prefix: true, upstream: u}\n"
                  "  - {match: {path: /a}, rewrite_prefix: /x, upstream: u}\n"
                  "  - {upstream: user}\n"
                  "  - {upstream: u, listeners: [public, privat]}\n",
                  "t.yaml:7:36: routes[0].direct_response: cannot be combined with \"upstream\"\n"
                  "t.yaml:8:5: routes[1]: route needs \"upstream\" or \"direct_response\"\n"
                  "t.yaml:9:37: routes[2].match.path_prefix: cannot be combined with \"path\"\n"
                  "t.yaml:10:39: routes[3].strip_prefix: requires match.path_prefix\n"
                  "t.yaml:11:41: routes[4].rewrite_prefix: requires match.path_prefix\n"
                  "t.yaml:12:16: routes[5].upstream: unknown upstream \"user\"\n"
                  "t.yaml:13:39: routes[6].listeners[1]: unknown listener \"privat\"\n");
}

static void test_err_upstream_errs(void **state)
{
    (void)state;
    expect_errors(
        "listeners:\n"
        "  - name: public\n"
        "    address: 127.0.0.1:8080\n"
        "upstreams:\n"
        "  - name: a\n"
        "  - name: b\n"
        "    endpoints: []\n"
        "  - name: c\n"
        "    balance: random\n"
        "    hash_on: 'header:'\n"
        "    endpoints: [{address: 127.0.0.1:1, weight: 0}]\n"
        "    keepalive: {max_idle: -1}\n"
        "    timeouts: {connect: 0ms}\n"
        "    retries: {attempts: 11, budget: 120%, on: [reset, 6xx]}\n",
        "t.yaml:5:5: upstreams[0]: needs endpoints or discovery\n"
        "t.yaml:7:16: upstreams[1].endpoints: needs at least one endpoint (or a discovery source)\n"
        "t.yaml:9:14: upstreams[2].balance: expected one of round_robin, least_request, hash, got "
        "\"random\"\n"
        "t.yaml:10:14: upstreams[2].hash_on: invalid header name \"\" (must be an HTTP token)\n"
        "t.yaml:11:48: upstreams[2].endpoints[0].weight: 0 is out of range 1..1000\n"
        "t.yaml:12:27: upstreams[2].keepalive.max_idle: expected an integer, got \"-1\"\n"
        "t.yaml:13:25: upstreams[2].timeouts.connect: 0ms is out of range 1ms..10m\n"
        "t.yaml:14:25: upstreams[2].retries.attempts: 11 is out of range 0..10\n"
        "t.yaml:14:37: upstreams[2].retries.budget: expected a percentage from 0% to 100% (like "
        "\"20%\"), got \"120%\"\n"
        "t.yaml:14:55: upstreams[2].retries.on[1]: expected connect_failure, reset, timeout, a "
        "status (503) or a class (\"5xx\"), got \"6xx\"\n");
}

static void test_err_discovery(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - name: public\n"
                  "    address: 127.0.0.1:8080\n"
                  "upstreams:\n"
                  "  - name: a\n"
                  "    discovery: {file: /nonexistent-dir/eps.yaml}\n"
                  "  - name: b\n"
                  "    discovery: {dns: users.internal}\n"
                  "  - name: c\n"
                  "    discovery: {srv: _u._tcp.x, port: 80}\n"
                  "  - name: d\n"
                  "    discovery: {dns: 'bad name', port: 80}\n"
                  "  - name: e\n"
                  "    discovery: {port: 80}\n",
                  "t.yaml:6:23: upstreams[0].discovery.file: directory /nonexistent-dir does not "
                  "exist\n"
                  "t.yaml:8:16: upstreams[1].discovery: dns needs a port\n"
                  "t.yaml:10:39: upstreams[2].discovery.port: only applies to dns (srv records "
                  "carry their ports)\n"
                  "t.yaml:12:22: upstreams[3].discovery.dns: invalid DNS name \"bad name\"\n"
                  "t.yaml:14:16: upstreams[4].discovery: needs one of dns, srv or file\n");
}

static void test_err_addresses(void **state)
{
    (void)state;
    expect_errors(
        "listeners:\n"
        "  - {name: a, address: 127.0.0.1}\n"
        "  - {name: b, address: '::1:80'}\n"
        "  - {name: c, address: '[::1]:0'}\n"
        "  - {name: d, address: '[::x]:80'}\n"
        "  - {name: e, address: 'bad host:80'}\n"
        "  - {name: f, address: '1.2.3.4:65536'}\n"
        "  - {name: g, address: '[::1]:8080'}\n",
        "t.yaml:2:24: listeners[0].address: invalid address \"127.0.0.1\": expected host:port or "
        "[v6]:port\n"
        "t.yaml:3:24: listeners[1].address: invalid address \"::1:80\": IPv6 addresses need "
        "brackets, e.g. [::1]:8080\n"
        "t.yaml:4:24: listeners[2].address: invalid address \"[::1]:0\": port must be a number in "
        "1..65535\n"
        "t.yaml:5:24: listeners[3].address: invalid address \"[::x]:80\": invalid IPv6 address\n"
        "t.yaml:6:24: listeners[4].address: invalid address \"bad host:80\": invalid host name\n"
        "t.yaml:7:24: listeners[5].address: invalid address \"1.2.3.4:65536\": port must be a "
        "number in 1..65535\n");
}

static void test_err_status_methods(void **state)
{
    (void)state;
    expect_errors(
        "listeners:\n"
        "  - name: public\n"
        "    address: 127.0.0.1:8080\n"
        "routes:\n"
        "  - {direct_response: {status: 103}}\n"
        "  - {direct_response: {status: 600}}\n"
        "  - {direct_response: {status: abc}}\n"
        "  - {match: {methods: [GET, 'BAD METHOD', PURGE, get]}, direct_response: {}}\n"
        "  - {match: {methods: GET}, direct_response: {}}\n",
        "t.yaml:5:32: routes[0].direct_response.status: 103 is out of range 200..599\n"
        "t.yaml:6:32: routes[1].direct_response.status: 600 is out of range 200..599\n"
        "t.yaml:7:32: routes[2].direct_response.status: expected an integer, got \"abc\"\n"
        "t.yaml:8:29: routes[3].match.methods[1]: invalid method \"BAD METHOD\" (must be an HTTP "
        "token)\n"
        "t.yaml:8:50: routes[3].match.methods[3]: unknown method \"get\" (methods are "
        "case-sensitive; did you mean \"GET\"?)\n"
        "t.yaml:9:23: routes[4].match.methods: expected a list of methods, got a string\n");
}

static void test_err_headers(void **state)
{
    (void)state;
    expect_errors(
        "listeners:\n"
        "  - name: public\n"
        "    address: 127.0.0.1:8080\n"
        "routes:\n"
        "  - match: {headers: {'X Bad': a, X-Ok: \"a\\nb\"}}\n"
        "    request_headers: {set: {X-A: 1, x-a: 2}, add: {'Bad:': x}, remove: [X-Ok, 'no "
        "good']}\n"
        "    response_headers: {set: {X-Z: \"a\\rb\"}, remove: X}\n"
        "    direct_response: {content_type: \"text/plain\\r\\nX-Evil: 1\"}\n",
        "t.yaml:5:23: routes[0].match.headers.X Bad: invalid header name \"X Bad\" (must be an "
        "HTTP token)\n"
        "t.yaml:5:41: routes[0].match.headers.X-Ok: header value must not contain CR, LF or NUL\n"
        "t.yaml:6:37: routes[0].request_headers.set.x-a: duplicate header \"x-a\" (header names "
        "are case-insensitive)\n"
        "t.yaml:6:52: routes[0].request_headers.add.Bad:: invalid header name \"Bad:\" (must be an "
        "HTTP token)\n"
        "t.yaml:6:79: routes[0].request_headers.remove[1]: invalid header name \"no good\" (must "
        "be an HTTP token)\n"
        "t.yaml:7:35: routes[0].response_headers.set.X-Z: header value must not contain CR, LF or "
        "NUL\n"
        "t.yaml:7:52: routes[0].response_headers.remove: expected a list, got a string\n"
        "t.yaml:8:37: routes[0].direct_response.content_type: header value must not contain CR, LF "
        "or NUL\n");
}

static void test_err_hosts(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - name: public\n"
                  "    address: 127.0.0.1:8080\n"
                  "routes:\n"
                  "  - {match: {host: '*.Example.COM'}, direct_response: {}}\n"
                  "  - {match: {host: '*'}, direct_response: {}}\n"
                  "  - {match: {host: 'a*.example.com'}, direct_response: {}}\n"
                  "  - {match: {host: 'example.com:8080'}, direct_response: {}}\n"
                  "  - {match: {host: 'a..b'}, direct_response: {}}\n"
                  "  - {match: {path: 'nope'}, direct_response: {}}\n"
                  "  - {match: {path_prefix: '/a b'}, direct_response: {}}\n",
                  "t.yaml:6:20: routes[1].match.host: a wildcard must be the whole first label, "
                  "e.g. *.example.com\n"
                  "t.yaml:7:20: routes[2].match.host: a wildcard must be the whole first label, "
                  "e.g. *.example.com\n"
                  "t.yaml:8:20: routes[3].match.host: must not include a port (the port is ignored "
                  "when matching)\n"
                  "t.yaml:9:20: routes[4].match.host: invalid host \"a..b\"\n"
                  "t.yaml:10:20: routes[5].match.path: must start with \"/\"\n"
                  "t.yaml:11:27: routes[6].match.path_prefix: must not contain spaces, control "
                  "characters, '?' or '#'\n");
}

static void test_err_anchors(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - name: public\n"
                  "    address: 127.0.0.1:8080\n"
                  "    limits: &l {max_header_count: 5}\n"
                  "  - name: b\n"
                  "    address: 127.0.0.1:9\n"
                  "    limits: *l\n",
                  "t.yaml:4:13: listeners[0].limits: anchors and aliases are not supported; repeat "
                  "the value instead\n"
                  "t.yaml:7:13: listeners[1].limits: anchors and aliases are not supported; repeat "
                  "the value instead\n"
                  "t.yaml:7:13: listeners[1].limits: expected a mapping, got null\n");
}

/* Found by the config fuzzer: an alias inside a route's listener list next to an unknown name. */
static void test_err_alias_in_route_listeners(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - name: &p public\n"
                  "    address: 127.0.0.1:8080\n"
                  "routes:\n"
                  "  - listeners: [*p, nope]\n"
                  "    direct_response: {status: 200}\n",
                  "t.yaml:2:11: listeners[0].name: anchors and aliases are not supported; repeat "
                  "the value instead\n"
                  "t.yaml:5:17: routes[0].listeners[0]: anchors and aliases are not supported; "
                  "repeat the value instead\n"
                  "t.yaml:5:17: routes[0].listeners[0]: expected a string, got null\n"
                  "t.yaml:5:21: routes[0].listeners[1]: unknown listener \"nope\"\n");
}

static void test_err_twodocs(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - name: public\n"
                  "    address: 127.0.0.1:8080\n"
                  "---\n"
                  "workers: 2\n",
                  "t.yaml:4:1: (root): only one YAML document is allowed\n");
}

static void test_err_empty(void **state)
{
    (void)state;
    expect_errors("", "t.yaml:1:1: (root): missing required key \"listeners\"\n");
}

static void test_err_toplist(void **state)
{
    (void)state;
    expect_errors("- a\n"
                  "- b\n",
                  "t.yaml:1:1: (root): expected a mapping at the top level, got a list\n");
}

static void test_err_nul(void **state)
{
    (void)state;
    expect_errors(
        "listeners:\n"
        "  - name: public\n"
        "    address: 127.0.0.1:8080\n"
        "routes:\n"
        "  - direct_response: {body: \"a\\0b\", content_type: \"x\\0y\"}\n",
        "t.yaml:5:51: routes[0].direct_response.content_type: must not contain NUL bytes\n");
}

static void test_err_nolisteners(void **state)
{
    (void)state;
    expect_errors("listeners: []\n", "t.yaml:1:12: listeners: must contain at least 1 entry\n");
}

/* ---- filters: entries are checked against each filter's registered schema ---- */

static void test_filters_parsed(void **state)
{
    (void)state;
    struct sl_config *cfg =
        load_ok("listeners:\n"
                "  - {name: public, address: 127.0.0.1:8080}\n"
                "consumers:\n"
                "  - {name: app, api_key: \"0123456789abcdef\"}\n"
                "  - {name: b, api_key_sha256: "
                "\"9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08\"}\n"
                "default_filters:\n"
                "  - api_key: {header: X-Key}\n"
                "routes:\n"
                "  - skip_default_filters: true\n"
                "    filters:\n"
                "      - api_key:\n"
                "      - jwt: {secret: \"0123456789abcdef0123456789abcdef\", issuers: [a, b]}\n"
                "    direct_response: {status: 200}\n");
    assert_int_equal(cfg->default_filter_count, 1);
    assert_string_equal(cfg->default_filters[0].type->name, "api_key");
    assert_string_equal(cfg->default_filters[0].where, "default_filters[0].api_key");
    assert_int_equal(cfg->route_count, 1);
    assert_true(cfg->routes[0].skip_default_filters);
    assert_int_equal(cfg->routes[0].filter_count, 2);
    assert_string_equal(cfg->routes[0].filters[1].type->name, "jwt");
    assert_int_equal(cfg->routes[0].filters[1].line, 12);
    assert_int_equal(cfg->routes[0].filters[1].col, 9);
    assert_int_equal(cfg->consumer_count, 2);
    assert_true(cfg->consumers[0].has_sha256);
    assert_int_equal(cfg->consumers[1].key_sha256[0], 0x9f);
    assert_int_equal(cfg->consumers[1].key_sha256[31], 0x08);
    sl_config_free(cfg);
}

static void test_err_filters(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - {name: public, address: 127.0.0.1:8080}\n"
                  "routes:\n"
                  "  - filters:\n"
                  "      - jwtt: {}\n"
                  "      - jwt: {secret: \"0123456789abcdef0123456789abcdef\", leeway: 5}\n"
                  "      - jwt: {secret: \"short\", jwks_url: \"ftp://x\"}\n"
                  "      - {jwt: {}, api_key: {}}\n"
                  "      - api_key: {hedaer: X}\n"
                  "      - jwt: {public_key_file: /k.pem, jwks_file: /j.json}\n"
                  "    direct_response: {status: 200}\n",
                  "t.yaml:5:9: routes[0].filters[0]: unknown filter \"jwtt\" (known: api_key, "
                  "jwt, rate_limit)\n"
                  "t.yaml:6:67: routes[0].filters[1].jwt.leeway: invalid duration \"5\": add a "
                  "unit (ms, s, m or h), e.g. 10s\n"
                  "t.yaml:7:14: routes[0].filters[2].jwt: secret must be at least 32 bytes (RFC "
                  "7518 3.2: a key as long as the hash)\n"
                  "t.yaml:7:42: routes[0].filters[2].jwt.jwks_url: must be an http:// or "
                  "https:// URL\n"
                  "t.yaml:8:9: routes[0].filters[3]: expected a filter as a one-key mapping, "
                  "e.g. \"- jwt: {...}\"\n"
                  "t.yaml:9:19: routes[0].filters[4].api_key.hedaer: unknown key \"hedaer\" "
                  "(did you mean \"header\"?)\n"
                  "t.yaml:10:14: routes[0].filters[5].jwt: needs exactly one of secret, "
                  "public_key_file, jwks_file or jwks_url\n");
}

static void test_err_consumers_redis(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - {name: public, address: 127.0.0.1:8080}\n"
                  "redis: {timeout: 0ms}\n"
                  "consumers:\n"
                  "  - {name: a, api_key: \"0123456789\", api_key_sha256: \"00\"}\n"
                  "  - {name: b, api_key_sha256: \"xyz\"}\n"
                  "  - {name: c, api_key: \"short\"}\n",
                  "t.yaml:3:8: redis: missing required key \"address\"\n"
                  "t.yaml:3:18: redis.timeout: 0ms is out of range 1ms..10s\n"
                  "t.yaml:5:54: consumers[0].api_key_sha256: expected a SHA-256 as 64 hex "
                  "digits, got \"00\"\n"
                  "t.yaml:5:54: consumers[0].api_key_sha256: cannot be combined with "
                  "\"api_key\"\n"
                  "t.yaml:6:31: consumers[1].api_key_sha256: expected a SHA-256 as 64 hex "
                  "digits, got \"xyz\"\n"
                  "t.yaml:7:24: consumers[2].api_key: must be at least 8 characters (use a "
                  "random key of 32 or more)\n");
}

static void test_edge_keys(void **state)
{
    (void)state;
    struct sl_config *cfg = load_ok("listeners:\n"
                                    "  - name: web\n"
                                    "    address: 127.0.0.1:8080\n"
                                    "  - name: edge\n"
                                    "    address: 127.0.0.1:8443\n"
                                    "    protocol: tcp\n"
                                    "    upstream: gw\n"
                                    "    tls:\n"
                                    "      certificates: [{cert: /etc/passwd, key: /etc/passwd}]\n"
                                    "      min_version: \"1.3\"\n"
                                    "      client_ca: /etc/passwd\n"
                                    "      client_auth: optional\n"
                                    "    protection: {max_connections_per_ip: 256, "
                                    "new_connections_per_ip: 50/s}\n"
                                    "    proxy_protocol: {accept: true, trusted: [10.0.0.0/8]}\n"
                                    "upstreams:\n"
                                    "  - name: other\n"
                                    "    tls: {sni: gw.internal}\n"
                                    "    endpoints: [127.0.0.1:9000]\n"
                                    "  - name: gw\n"
                                    "    proxy_protocol: v2\n"
                                    "    endpoints: [127.0.0.1:9001]\n");
    const struct sl_listener_conf *web = &cfg->listeners[0], *edge = &cfg->listeners[1];
    assert_int_equal(web->protocol, SL_LISTENER_HTTP);
    assert_false(web->tls.enabled);
    assert_false(web->proxy_protocol.accept);
    assert_int_equal(web->protection.max_connections_per_ip, 0);
    assert_int_equal(edge->protocol, SL_LISTENER_TCP);
    assert_int_equal(edge->upstream_index, 1);
    assert_true(edge->tls.enabled);
    assert_int_equal(edge->tls.certificate_count, 1);
    assert_int_equal(edge->tls.min_version, SL_TLS_V1_3);
    assert_int_equal(edge->tls.client_auth, SL_TLS_CLIENT_AUTH_CONF_OPTIONAL);
    assert_true(edge->tls.session_tickets);
    assert_int_equal(edge->tls.handshake_timeout_ms, 10000);
    assert_int_equal(edge->protection.max_connections_per_ip, 256);
    assert_int_equal(edge->protection.new_connection_period_us, 20000);
    assert_int_equal(edge->protection.new_connections_burst, 50);
    assert_true(edge->proxy_protocol.accept);
    assert_int_equal(edge->proxy_protocol.trusted_count, 1);
    assert_int_equal(edge->proxy_protocol.timeout_ms, 5000);
    assert_int_equal(cfg->upstreams[1].proxy_protocol, SL_PP_SEND_V2);
    assert_true(cfg->upstreams[0].tls.enabled);
    assert_true(cfg->upstreams[0].tls.verify);
    assert_string_equal(cfg->upstreams[0].tls.sni, "gw.internal");
    assert_false(cfg->upstreams[1].tls.enabled);
    sl_config_free(cfg);
}

static void test_err_edge(void **state)
{
    (void)state;
    expect_errors(
        "listeners:\n"
        "  - name: edge\n"
        "    address: 127.0.0.1:8443\n"
        "    protocol: tcp\n"
        "    tls: {min_version: \"1.1\"}\n"
        "    protection: {new_connections_per_ip: 5/d}\n"
        "    proxy_protocol: {accept: true}\n"
        "  - name: web\n"
        "    address: 127.0.0.1:8080\n"
        "    upstream: nope\n"
        "    tls: {certificates: [{cert: /nonexistent.pem, key: /etc/passwd}]}\n"
        "routes:\n"
        "  - {listeners: [edge], match: {path: /}, direct_response: {status: 200}}\n"
        "upstreams:\n"
        "  - name: u\n"
        "    proxy_protocol: v3\n"
        "    tls: {client_key: /etc/passwd}\n"
        "    endpoints: [127.0.0.1:9000]\n",
        "t.yaml:2:5: listeners[0]: protocol: tcp needs upstream: <name>\n"
        "t.yaml:5:10: listeners[0].tls: needs certificates: [{cert: ..., key: ...}]\n"
        "t.yaml:5:24: listeners[0].tls.min_version: expected one of 1.2, 1.3, got \"1.1\"\n"
        "t.yaml:6:42: listeners[0].protection.new_connections_per_ip: invalid rate \"5/d\": use "
        "N/s, N/m or N/h with N >= 1, e.g. 50/s\n"
        "t.yaml:7:21: listeners[0].proxy_protocol: accept: true needs trusted: [addresses or "
        "prefixes] (a PROXY header from anyone would let any client choose its own address)\n"
        "t.yaml:10:15: listeners[1].upstream: only applies to protocol: tcp (HTTP listeners pick "
        "upstreams by route)\n"
        "t.yaml:10:15: listeners[1].upstream: unknown upstream \"nope\"\n"
        "t.yaml:11:33: listeners[1].tls.certificates[0].cert: cannot read /nonexistent.pem: No "
        "such file or directory\n"
        "t.yaml:13:17: routes[0].listeners: listener \"edge\" is protocol: tcp (it forwards to "
        "its upstream without routes)\n"
        "t.yaml:16:21: upstreams[0].proxy_protocol: expected one of off, v1, v2, got \"v3\"\n"
        "t.yaml:17:10: upstreams[0].tls: client_cert and client_key go together\n");
}

static void test_err_tcp_listener_tls_upstream(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - {name: edge, address: 127.0.0.1:8443, protocol: tcp, upstream: u}\n"
                  "upstreams:\n"
                  "  - {name: u, tls: {verify: false}, endpoints: [127.0.0.1:9000]}\n",
                  "t.yaml:2:68: listeners[0].upstream: upstream \"u\" has tls:, which protocol: "
                  "tcp listeners do not support yet (they forward to plain TCP endpoints; TLS in "
                  "front is the listener's tls:)\n");
}

static void test_err_alpn_not_spoken(void **state)
{
    (void)state;
    expect_errors("listeners:\n"
                  "  - {name: a, address: 127.0.0.1:8443, tls: {certificates: [{cert: /etc/passwd, "
                  "key: /etc/passwd}], alpn: [h2]}}\n"
                  "upstreams:\n"
                  "  - {name: v, tls: {alpn: [http/1.1, h2]}, endpoints: [127.0.0.1:9000]}\n",
                  "t.yaml:2:107: listeners[0].tls.alpn: \"h2\" is not spoken here: HTTP goes as "
                  "http/1.1 only (h2 comes with HTTP/2)\n"
                  "t.yaml:4:27: upstreams[0].tls.alpn: \"h2\" is not spoken here: HTTP goes as "
                  "http/1.1 only (h2 comes with HTTP/2)\n");
}

/* The operations sections: every key lands where the process reads it. */
static void test_operations_sections(void **state)
{
    (void)state;
    struct sl_config *cfg =
        load_ok("listeners: [{name: l, address: 127.0.0.1:1}]\n"
                "admin: {address: 127.0.0.1:9901}\n"
                "access_log:\n"
                "  directory: /var/lib/sluice/logs\n"
                "  buffer: 1MiB\n"
                "  segment: {max_bytes: 1MiB, max_age: 5s}\n"
                "  ship: {url: 'https://collector.example/ingest', method: POST, timeout: 2s}\n"
                "  headers: [User-Agent]\n"
                "  redact_headers: [X-Secret]\n"
                "drain: {grace: 5s, notice_url: 'http://169.254.169.254/latest/meta-data/spot/"
                "instance-action', notice_interval: 2s}\n"
                "reload: {rollback_on_5xx_ratio: 0.05, window: 10s, min_requests: 50}\n"
                "cost: {vcpu_hour_usd: 0.0181}\n");
    assert_string_equal(cfg->admin.address, "127.0.0.1:9901");
    assert_true(cfg->admin.loopback);
    assert_null(cfg->admin.token_file);
    assert_string_equal(cfg->access_log.directory, "/var/lib/sluice/logs");
    assert_int_equal(cfg->access_log.buffer_bytes, 1 << 20);
    assert_int_equal(cfg->access_log.segment_max_bytes, 1 << 20);
    assert_int_equal(cfg->access_log.segment_max_age_ms, 5000);
    assert_int_equal(cfg->access_log.flush_interval_ms, 200);
    assert_string_equal(cfg->access_log.ship_url, "https://collector.example/ingest");
    assert_int_equal(cfg->access_log.ship_method, SL_SHIP_POST);
    assert_int_equal(cfg->access_log.ship_timeout_ms, 2000);
    assert_int_equal(cfg->access_log.ship_backoff_max_ms, 60000);
    assert_int_equal(cfg->access_log.header_count, 1);
    assert_int_equal(cfg->access_log.redact_header_count, 1);
    assert_int_equal(cfg->drain.grace_ms, 5000);
    assert_int_equal(cfg->drain.notice_interval_ms, 2000);
    assert_non_null(cfg->drain.notice_url);
    assert_int_equal(cfg->reload.rollback_permille, 50);
    assert_int_equal(cfg->reload.window_ms, 10000);
    assert_int_equal(cfg->reload.min_requests, 50);
    assert_true(cfg->vcpu_hour_usd > 0.0180 && cfg->vcpu_hour_usd < 0.0182);
    sl_config_free(cfg);
    /* absent sections: everything off */
    cfg = load_ok("listeners: [{name: l, address: 127.0.0.1:1}]\n");
    assert_null(cfg->admin.address);
    assert_null(cfg->access_log.directory);
    assert_int_equal(cfg->drain.grace_ms, 0);
    assert_null(cfg->drain.notice_url);
    assert_int_equal(cfg->reload.rollback_permille, 0);
    assert_true(cfg->vcpu_hour_usd == 0);
    sl_config_free(cfg);
}

static void test_err_operations(void **state)
{
    (void)state;
    expect_errors("listeners: [{name: l, address: 127.0.0.1:1}]\n"
                  "admin: {address: 0.0.0.0:9901}\n",
                  "t.yaml:2:18: admin.address: an admin listener off loopback needs token_file "
                  "(a bearer token)\n");
    expect_errors("listeners: [{name: l, address: 127.0.0.1:1}]\n"
                  "access_log: {directory: /tmp/x, ship: {url: 'ftp://h/x'}}\n"
                  "drain: {notice_url: 'http://user@h/x'}\n"
                  "cost: {vcpu_hour_usd: cheap}\n"
                  "reload: {rollback_on_5xx_ratio: 2}\n",
                  "t.yaml:2:45: access_log.ship.url: must be an http:// or https:// URL\n"
                  "t.yaml:3:21: drain.notice_url: must not carry credentials (user@host)\n"
                  "t.yaml:4:23: cost.vcpu_hour_usd: expected a price per vCPU-hour in USD from 0 "
                  "to 1000, got \"cheap\"\n"
                  "t.yaml:5:33: reload.rollback_on_5xx_ratio: expected a ratio from 0 to 1 (like "
                  "0.5 or \"50%\"), got \"2\"\n");
    expect_errors("listeners: [{name: l, address: 127.0.0.1:1}]\n"
                  "access_log: {buffer: 1MiB}\n",
                  "t.yaml:2:13: access_log: missing required key \"directory\"\n");
}

int main(void)
{
    sl_filters_register_config();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_example),
        cmocka_unit_test(test_filters_parsed),
        cmocka_unit_test(test_err_filters),
        cmocka_unit_test(test_err_consumers_redis),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_limits_merge),
        cmocka_unit_test(test_hash_on_ignored_without_hash),
        cmocka_unit_test(test_durations),
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_addresses),
        cmocka_unit_test(test_methods),
        cmocka_unit_test(test_unresolvable_host),
        cmocka_unit_test(test_too_deep),
        cmocka_unit_test(test_file),
        cmocka_unit_test(test_quickstart),
        cmocka_unit_test(test_print_format),
        cmocka_unit_test(test_err_unknown_key),
        cmocka_unit_test(test_err_wrong_type),
        cmocka_unit_test(test_err_range),
        cmocka_unit_test(test_err_bad_duration),
        cmocka_unit_test(test_err_bad_size),
        cmocka_unit_test(test_err_syntax),
        cmocka_unit_test(test_err_syntax2),
        cmocka_unit_test(test_err_dupkey),
        cmocka_unit_test(test_err_dupnames),
        cmocka_unit_test(test_err_route_rules),
        cmocka_unit_test(test_err_upstream_errs),
        cmocka_unit_test(test_err_discovery),
        cmocka_unit_test(test_err_addresses),
        cmocka_unit_test(test_err_status_methods),
        cmocka_unit_test(test_err_headers),
        cmocka_unit_test(test_err_hosts),
        cmocka_unit_test(test_err_anchors),
        cmocka_unit_test(test_err_alias_in_route_listeners),
        cmocka_unit_test(test_err_twodocs),
        cmocka_unit_test(test_err_empty),
        cmocka_unit_test(test_err_toplist),
        cmocka_unit_test(test_err_nul),
        cmocka_unit_test(test_err_nolisteners),
        cmocka_unit_test(test_edge_keys),
        cmocka_unit_test(test_err_edge),
        cmocka_unit_test(test_err_tcp_listener_tls_upstream),
        cmocka_unit_test(test_err_alpn_not_spoken),
        cmocka_unit_test(test_operations_sections),
        cmocka_unit_test(test_err_operations),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
