#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "config/config.h"
#include "http/h1_parse.h"
#include "proxy/router.h"

/* Routes are built by hand so these tests do not depend on the YAML loader. */

#define MAX_ROUTES 64

struct table {
    struct sl_config cfg;
    struct sl_route_conf routes[MAX_ROUTES];
};

static struct table *table_new(void)
{
    struct table *t = calloc(1, sizeof *t);
    assert_non_null(t);
    t->cfg.routes = t->routes;
    return t;
}

static struct sl_route_conf *add(struct table *t, const char *name, const char *host,
                                 const char *path, const char *prefix)
{
    assert_true(t->cfg.route_count < MAX_ROUTES);
    struct sl_route_conf *r = &t->routes[t->cfg.route_count];
    r->name = (char *)name;
    r->index = t->cfg.route_count++;
    r->match.host = (char *)host;
    r->match.path = (char *)path;
    r->match.path_prefix = (char *)prefix;
    return r;
}

static unsigned method_bit(const char *m)
{
    static const struct {
        const char *name;
        unsigned bit;
    } tab[] = {{"GET", SL_METHOD_GET},        {"HEAD", SL_METHOD_HEAD},
               {"POST", SL_METHOD_POST},      {"PUT", SL_METHOD_PUT},
               {"DELETE", SL_METHOD_DELETE},  {"PATCH", SL_METHOD_PATCH},
               {"OPTIONS", SL_METHOD_OPTIONS}};
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++)
        if (strcmp(tab[i].name, m) == 0)
            return tab[i].bit;
    return SL_METHOD_OTHER;
}

static const char *match_h(const struct sl_router *r, const char *method, const char *host,
                           const char *path, const struct sl_h1_header *hdrs, size_t nhdrs)
{
    struct sl_route_input in = {
        .host = sl_slice_cstr(host),
        .path = sl_slice_cstr(path),
        .method = sl_slice_cstr(method),
        .method_bit = method_bit(method),
        .headers = hdrs,
        .header_count = nhdrs,
    };
    const struct sl_route_conf *rc = sl_router_match(r, &in);
    return rc ? rc->name : NULL;
}

static const char *match(const struct sl_router *r, const char *method, const char *host,
                         const char *path)
{
    return match_h(r, method, host, path, NULL, 0);
}

#define assert_route(expect, got)                                                                  \
    do {                                                                                           \
        const char *g_ = (got);                                                                    \
        if ((expect) == NULL)                                                                      \
            assert_null(g_);                                                                       \
        else {                                                                                     \
            assert_non_null(g_);                                                                   \
            assert_string_equal((expect), g_);                                                     \
        }                                                                                          \
    } while (0)

static void test_host_classes(void **state)
{
    (void)state;
    struct table *t = table_new();
    add(t, "any", NULL, NULL, "/");
    add(t, "wild", "*.example.com", NULL, "/");
    add(t, "wild-api", "*.api.example.com", NULL, "/");
    add(t, "exact-api", "api.example.com", NULL, "/");
    add(t, "star", "*", NULL, "/star");
    struct sl_router *r = sl_router_new(&t->cfg, NULL);
    assert_non_null(r);

    assert_route("exact-api", match(r, "GET", "api.example.com", "/x"));
    assert_route("wild-api", match(r, "GET", "v1.api.example.com", "/x"));
    assert_route("wild-api", match(r, "GET", "a.b.api.example.com", "/x"));
    assert_route("wild", match(r, "GET", "www.example.com", "/x"));
    assert_route("wild", match(r, "GET", "a.b.c.example.com", "/x"));
    /* a wildcard needs something before its suffix */
    assert_route("any", match(r, "GET", "example.com", "/x"));
    assert_route("any", match(r, "GET", ".example.com", "/x"));
    assert_route("any", match(r, "GET", "other.org", "/x"));
    assert_route("any", match(r, "GET", "", "/x"));
    assert_route("any", match(r, "GET", "notexample.com", "/x"));
    /* "*" is "any host", so it competes on path there */
    assert_route("star", match(r, "GET", "other.org", "/star"));
    assert_route("exact-api", match(r, "GET", "api.example.com", "/star"));

    sl_router_free(r);
    free(t);
}

/* Host first, strictly: a more specific host with a weak path beats a less specific host
   with an exact path. */
static void test_host_beats_path(void **state)
{
    (void)state;
    struct table *t = table_new();
    add(t, "any-exact", NULL, "/a/b", NULL);
    add(t, "wild-exact", "*.example.com", "/a/b", NULL);
    add(t, "exact-prefix", "api.example.com", NULL, "/");
    add(t, "exact-nopath", "www.example.com", NULL, NULL);
    struct sl_router *r = sl_router_new(&t->cfg, NULL);
    assert_non_null(r);

    assert_route("exact-prefix", match(r, "GET", "api.example.com", "/a/b"));
    assert_route("exact-nopath", match(r, "GET", "www.example.com", "/a/b"));
    assert_route("wild-exact", match(r, "GET", "x.example.com", "/a/b"));
    assert_route("any-exact", match(r, "GET", "x.other.com", "/a/b"));
    /* nothing for x.example.com on /zzz in its class nor in any-host: 404 */
    assert_route(NULL, match(r, "GET", "x.example.com", "/zzz"));

    sl_router_free(r);
    free(t);
}

static void test_path_precedence(void **state)
{
    (void)state;
    struct table *t = table_new();
    add(t, "none", "h", NULL, NULL);
    add(t, "root", "h", NULL, "/");
    add(t, "a", "h", NULL, "/a");
    add(t, "abc", "h", NULL, "/a/b/c");
    add(t, "ab", "h", NULL, "/a/b");
    add(t, "exact-ab", "h", "/a/b", NULL);
    add(t, "exact-root", "h", "/", NULL);
    struct sl_router *r = sl_router_new(&t->cfg, NULL);
    assert_non_null(r);

    assert_route("exact-ab", match(r, "GET", "h", "/a/b"));
    assert_route("exact-root", match(r, "GET", "h", "/"));
    assert_route("ab", match(r, "GET", "h", "/a/b/"));
    assert_route("abc", match(r, "GET", "h", "/a/b/c"));
    assert_route("abc", match(r, "GET", "h", "/a/b/c/d"));
    assert_route("ab", match(r, "GET", "h", "/a/b/cd"));
    assert_route("a", match(r, "GET", "h", "/a"));
    assert_route("a", match(r, "GET", "h", "/a/x"));
    assert_route("root", match(r, "GET", "h", "/ab"));
    assert_route("root", match(r, "GET", "h", "/zzz"));
    /* only "no path condition" matches a path not starting with '/' */
    assert_route("none", match(r, "GET", "h", "*"));
    assert_route("none", match(r, "GET", "h", ""));
    /* exact path is case-sensitive */
    assert_route("root", match(r, "GET", "h", "/A/B"));

    sl_router_free(r);
    free(t);
}

static void test_segment_boundary(void **state)
{
    (void)state;
    struct table *t = table_new();
    add(t, "users", NULL, NULL, "/users");
    add(t, "slash", NULL, NULL, "/api/");
    add(t, "v1", NULL, NULL, "/api/v1");
    struct sl_router *r = sl_router_new(&t->cfg, NULL);
    assert_non_null(r);

    assert_route("users", match(r, "GET", "h", "/users"));
    assert_route("users", match(r, "GET", "h", "/users/"));
    assert_route("users", match(r, "GET", "h", "/users/42"));
    assert_route(NULL, match(r, "GET", "h", "/usersX"));
    assert_route(NULL, match(r, "GET", "h", "/user"));
    /* a prefix ending in '/' is a byte prefix and does not match without the slash */
    assert_route("slash", match(r, "GET", "h", "/api/x"));
    assert_route("slash", match(r, "GET", "h", "/api/"));
    assert_route(NULL, match(r, "GET", "h", "/api"));
    assert_route("v1", match(r, "GET", "h", "/api/v1/x"));
    /* "/api/v1" rejects "/api/v1x" on the boundary, then falls back to "/api/" */
    assert_route("slash", match(r, "GET", "h", "/api/v1x"));

    sl_router_free(r);
    free(t);
}

static void test_methods(void **state)
{
    (void)state;
    struct table *t = table_new();
    add(t, "any-method", NULL, NULL, "/m");
    add(t, "get", NULL, NULL, "/m")->match.methods = SL_METHOD_GET | SL_METHOD_HEAD;
    char *purge[] = {"PURGE"};
    struct sl_route_conf *p = add(t, "purge-or-delete", NULL, NULL, "/m");
    p->match.methods = SL_METHOD_DELETE;
    p->match.method_names = purge;
    p->match.method_name_count = 1;
    add(t, "wild-post", "*.example.com", NULL, "/")->match.methods = SL_METHOD_POST;
    add(t, "exact-get", "api.example.com", NULL, "/")->match.methods = SL_METHOD_GET;
    struct sl_router *r = sl_router_new(&t->cfg, NULL);
    assert_non_null(r);

    assert_route("get", match(r, "GET", "h", "/m"));
    assert_route("get", match(r, "HEAD", "h", "/m"));
    assert_route("any-method", match(r, "POST", "h", "/m"));
    assert_route("purge-or-delete", match(r, "PURGE", "h", "/m"));
    assert_route("purge-or-delete", match(r, "DELETE", "h", "/m"));
    /* method tokens are case-sensitive */
    assert_route("any-method", match(r, "purge", "h", "/m"));
    /* a method miss in the exact host class falls back to wildcard, then any host */
    assert_route("exact-get", match(r, "GET", "api.example.com", "/x"));
    assert_route("wild-post", match(r, "POST", "api.example.com", "/x"));
    assert_route("any-method", match(r, "PUT", "api.example.com", "/m"));
    assert_route(NULL, match(r, "PUT", "api.example.com", "/x"));

    sl_router_free(r);
    free(t);
}

static void test_headers_and_file_order(void **state)
{
    (void)state;
    struct table *t = table_new();
    struct sl_header_pair canary[] = {{"X-Env", "canary"}};
    struct sl_header_pair canary_eu[] = {{"x-env", "canary"}, {"X-Region", "eu"}};
    add(t, "first", NULL, NULL, "/h");
    add(t, "second", NULL, NULL, "/h");
    struct sl_route_conf *c = add(t, "canary", NULL, NULL, "/h");
    c->match.headers = canary;
    c->match.header_count = 1;
    struct sl_route_conf *ce = add(t, "canary-eu", NULL, NULL, "/h");
    ce->match.headers = canary_eu;
    ce->match.header_count = 2;
    struct sl_route_conf *cg = add(t, "canary-get", NULL, NULL, "/h");
    cg->match.headers = canary;
    cg->match.header_count = 1;
    cg->match.methods = SL_METHOD_GET;
    struct sl_router *r = sl_router_new(&t->cfg, NULL);
    assert_non_null(r);

    struct sl_h1_header h_canary[] = {{SL_SLICE_LIT("x-ENV"), SL_SLICE_LIT("canary")}};
    struct sl_h1_header h_wrong_case[] = {{SL_SLICE_LIT("X-Env"), SL_SLICE_LIT("Canary")}};
    struct sl_h1_header h_both[] = {{SL_SLICE_LIT("X-Region"), SL_SLICE_LIT("eu")},
                                    {SL_SLICE_LIT("X-Env"), SL_SLICE_LIT("prod")},
                                    {SL_SLICE_LIT("X-Env"), SL_SLICE_LIT("canary")}};

    /* identical conditions: file order */
    assert_route("first", match(r, "GET", "h", "/h"));
    /* more conditions first, regardless of file order */
    assert_route("canary-get", match_h(r, "GET", "h", "/h", h_canary, 1));
    assert_route("canary", match_h(r, "POST", "h", "/h", h_canary, 1));
    assert_route("canary-eu", match_h(r, "POST", "h", "/h", h_both, 3));
    /* header values are exact */
    assert_route("first", match_h(r, "POST", "h", "/h", h_wrong_case, 1));

    sl_router_free(r);
    free(t);
}

static void test_host_normalisation(void **state)
{
    (void)state;
    struct table *t = table_new();
    add(t, "api", "API.Example.com", NULL, NULL);
    add(t, "wild", "*.Example.ORG.", NULL, NULL);
    add(t, "v6", "[::1]", NULL, NULL);
    add(t, "v4", "127.0.0.1", NULL, NULL);
    struct sl_router *r = sl_router_new(&t->cfg, NULL);
    assert_non_null(r);

    assert_route("api", match(r, "GET", "api.example.com", "/"));
    assert_route("api", match(r, "GET", "API.EXAMPLE.COM", "/"));
    assert_route("api", match(r, "GET", "api.example.com:8443", "/"));
    assert_route("api", match(r, "GET", "api.example.com.", "/"));
    assert_route("api", match(r, "GET", "Api.Example.Com.:80", "/"));
    assert_route(NULL, match(r, "GET", "api.example.com..", "/"));
    assert_route(NULL, match(r, "GET", "api.example.co", "/"));
    assert_route("wild", match(r, "GET", "X.example.org", "/"));
    assert_route("wild", match(r, "GET", "x.EXAMPLE.org.:1", "/"));
    assert_route("v6", match(r, "GET", "[::1]:8080", "/"));
    assert_route("v6", match(r, "GET", "[::1]", "/"));
    assert_route("v4", match(r, "GET", "127.0.0.1:80", "/"));
    assert_route(NULL, match(r, "GET", "[::2]:80", "/"));

    sl_router_free(r);
    free(t);
}

static void test_listener_filter(void **state)
{
    (void)state;
    struct table *t = table_new();
    char *pub[] = {"public"};
    char *both[] = {"admin", "public"};
    add(t, "all", NULL, NULL, "/");
    struct sl_route_conf *a = add(t, "public-only", NULL, NULL, "/p");
    a->listeners = pub;
    a->listener_count = 1;
    struct sl_route_conf *b = add(t, "both", NULL, NULL, "/b");
    b->listeners = both;
    b->listener_count = 2;

    struct sl_router *rp = sl_router_new(&t->cfg, "public");
    struct sl_router *ra = sl_router_new(&t->cfg, "admin");
    struct sl_router *ro = sl_router_new(&t->cfg, "other");
    assert_non_null(rp);
    assert_non_null(ra);
    assert_non_null(ro);

    assert_route("public-only", match(rp, "GET", "h", "/p"));
    assert_route("all", match(ra, "GET", "h", "/p"));
    assert_route("both", match(ra, "GET", "h", "/b"));
    assert_route("both", match(rp, "GET", "h", "/b"));
    assert_route("all", match(ro, "GET", "h", "/b"));

    sl_router_free(rp);
    sl_router_free(ra);
    sl_router_free(ro);
    free(t);
}

static void test_no_match(void **state)
{
    (void)state;
    struct sl_config empty = {0};
    struct sl_router *r = sl_router_new(&empty, NULL);
    assert_non_null(r);
    assert_route(NULL, match(r, "GET", "h", "/"));
    sl_router_free(r);

    struct table *t = table_new();
    add(t, "x", "x.com", "/x", NULL);
    r = sl_router_new(&t->cfg, NULL);
    assert_non_null(r);
    assert_route(NULL, match(r, "GET", "x.com", "/y"));
    assert_route(NULL, match(r, "GET", "y.com", "/x"));
    assert_route("x", match(r, "GET", "x.com", "/x"));
    sl_router_free(r);
    free(t);

    /* empty slices with NULL pointers, and an empty exact path in the table */
    t = table_new();
    add(t, "empty-path", NULL, "", NULL);
    add(t, "empty-prefix", "h", NULL, "");
    r = sl_router_new(&t->cfg, NULL);
    assert_non_null(r);
    struct sl_route_input in = {0};
    const struct sl_route_conf *rc = sl_router_match(r, &in);
    assert_non_null(rc);
    assert_string_equal(rc->name, "empty-path");
    assert_route("empty-prefix", match(r, "GET", "h", "/anything"));
    assert_route(NULL, match(r, "GET", "other", "/anything"));
    sl_router_free(r);
    free(t);
}

/* ---- 10,000 generated routes against a brute-force reference -------------------------- */

static uint64_t rng_state = 0x123456789abcdefull;

static uint32_t rnd(uint32_t n)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state % n);
}

__attribute__((format(printf, 1, 2))) static char *fmt(const char *f, ...)
{
    char buf[128];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    char *s = strdup(buf);
    assert_non_null(s);
    return s;
}

/* Score of route `rc` for a request, higher is better, or -1 when it does not match.
   Written independently of the router: a linear scan ranking by the documented rules. */
struct score {
    long host, path, conds, order;
};

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && memcmp(s + n - m, suffix, m) == 0;
}

static bool ref_score(const struct sl_route_conf *rc, const char *host, const char *path,
                      unsigned mbit, const struct sl_h1_header *hdrs, size_t nh, struct score *out)
{
    const struct sl_route_match_conf *m = &rc->match;
    if (!m->host)
        out->host = 0;
    else if (m->host[0] == '*') {
        /* "*.z.example.com" -> suffix ".z.example.com" */
        if (!ends_with(host, m->host + 1) || strlen(host) <= strlen(m->host + 1))
            return false;
        out->host = 1 + (long)strlen(m->host);
    } else if (strcmp(m->host, host) == 0)
        out->host = 1000000;
    else
        return false;

    if (m->path) {
        if (strcmp(m->path, path) != 0)
            return false;
        out->path = 1000000;
    } else if (m->path_prefix) {
        size_t n = strlen(m->path_prefix);
        if (strncmp(path, m->path_prefix, n) != 0)
            return false;
        if (m->path_prefix[n - 1] != '/' && path[n] != '\0' && path[n] != '/')
            return false;
        out->path = 1 + (long)n;
    } else
        out->path = 0;

    if (m->methods && !(m->methods & mbit))
        return false;
    for (size_t i = 0; i < m->header_count; i++) {
        bool found = false;
        for (size_t j = 0; j < nh; j++)
            if (strlen(m->headers[i].name) == hdrs[j].name.len &&
                strncasecmp(m->headers[i].name, hdrs[j].name.ptr, hdrs[j].name.len) == 0 &&
                strlen(m->headers[i].value) == hdrs[j].value.len &&
                memcmp(m->headers[i].value, hdrs[j].value.ptr, hdrs[j].value.len) == 0)
                found = true;
        if (!found)
            return false;
    }
    out->conds = (m->methods ? 1 : 0) + (long)m->header_count;
    out->order = -(long)rc->index;
    return true;
}

static bool better(const struct score *a, const struct score *b)
{
    if (a->host != b->host)
        return a->host > b->host;
    if (a->path != b->path)
        return a->path > b->path;
    if (a->conds != b->conds)
        return a->conds > b->conds;
    return a->order > b->order;
}

static void test_generated_10k(void **state)
{
    (void)state;
    enum { N = 10000, HOSTS = 300, ZONES = 20, QUERIES = 4000 };
    struct sl_route_conf *routes = calloc(N, sizeof *routes);
    assert_non_null(routes);
    static struct sl_header_pair tenant_hdr[8];
    for (unsigned i = 0; i < 8; i++)
        tenant_hdr[i] = (struct sl_header_pair){"X-Tenant", fmt("t%u", i)};

    for (unsigned i = 0; i < N; i++) {
        struct sl_route_conf *rc = &routes[i];
        rc->index = i;
        rc->name = fmt("r%u", i);
        unsigned hk = rnd(100);
        if (hk < 70)
            rc->match.host = fmt("h%u.example.com", rnd(HOSTS));
        else if (hk < 85)
            rc->match.host = fmt("*.z%u.example.com", rnd(ZONES));
        else if (hk < 88)
            rc->match.host = fmt("*.example.com");
        unsigned pk = rnd(100);
        if (pk < 40)
            rc->match.path = fmt("/p/%u/%u", rnd(50), rnd(20));
        else if (pk < 60)
            rc->match.path_prefix = fmt("/svc%u", rnd(40));
        else if (pk < 80)
            rc->match.path_prefix = fmt("/svc%u/v%u", rnd(40), rnd(4));
        else if (pk < 90)
            rc->match.path_prefix = fmt("/p/%u/", rnd(50));
        else if (pk < 95)
            rc->match.path_prefix = fmt("/");
        if (rnd(10) == 0)
            rc->match.methods = rnd(2) ? SL_METHOD_GET : SL_METHOD_POST | SL_METHOD_PUT;
        if (rnd(20) == 0) {
            rc->match.headers = &tenant_hdr[rnd(8)];
            rc->match.header_count = 1;
        }
    }
    struct sl_config cfg = {.routes = routes, .route_count = N};
    struct sl_router *r = sl_router_new(&cfg, NULL);
    assert_non_null(r);

    static const char *methods[] = {"GET", "POST", "PUT", "DELETE"};
    char host[128], path[128], tval[16];
    size_t matched = 0;
    for (unsigned q = 0; q < QUERIES; q++) {
        /* half the queries are built from a route so most of them hit something */
        const struct sl_route_conf *seed = &routes[rnd(N)];
        const char *sh = seed->match.host;
        if (rnd(2) == 0 || !sh)
            snprintf(host, sizeof host, "h%u.example.com", rnd(HOSTS + 10));
        else if (sh[0] == '*')
            snprintf(host, sizeof host, "%s%s", rnd(2) ? "a" : "b.c", sh + 1);
        else
            snprintf(host, sizeof host, "%s", sh);
        if (seed->match.path && rnd(2))
            snprintf(path, sizeof path, "%s", seed->match.path);
        else if (seed->match.path_prefix && rnd(2))
            snprintf(path, sizeof path, "%s%s", seed->match.path_prefix,
                     (const char *[]){"", "/", "x", "/deep/er"}[rnd(4)]);
        else
            snprintf(path, sizeof path, "/p/%u/%u", rnd(55), rnd(22));
        const char *method = methods[rnd(4)];
        snprintf(tval, sizeof tval, "t%u", rnd(10));
        struct sl_h1_header hdr = {SL_SLICE_LIT("x-tenant"), sl_slice_cstr(tval)};
        size_t nh = rnd(2);

        const struct sl_route_conf *best = NULL;
        struct score bs = {0}, s;
        for (unsigned i = 0; i < N; i++) {
            if (ref_score(&routes[i], host, path, method_bit(method), &hdr, nh, &s) &&
                (!best || better(&s, &bs))) {
                best = &routes[i];
                bs = s;
            }
        }
        const char *got = match_h(r, method, host, path, &hdr, nh);
        if (best)
            matched++;
        if ((best == NULL) != (got == NULL) || (best && strcmp(best->name, got) != 0))
            fail_msg("%s %s%s: expected %s, got %s", method, host, path, best ? best->name : "none",
                     got ? got : "none");
    }
    /* the generator must exercise matches, not just 404s */
    assert_true(matched > QUERIES / 2);

    sl_router_free(r);
    for (unsigned i = 0; i < N; i++) {
        free(routes[i].name);
        free(routes[i].match.host);
        free(routes[i].match.path);
        free(routes[i].match.path_prefix);
    }
    for (unsigned i = 0; i < 8; i++)
        free(tenant_hdr[i].value);
    free(routes);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_host_classes),
        cmocka_unit_test(test_host_beats_path),
        cmocka_unit_test(test_path_precedence),
        cmocka_unit_test(test_segment_boundary),
        cmocka_unit_test(test_methods),
        cmocka_unit_test(test_headers_and_file_order),
        cmocka_unit_test(test_host_normalisation),
        cmocka_unit_test(test_listener_filter),
        cmocka_unit_test(test_no_match),
        cmocka_unit_test(test_generated_10k),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
