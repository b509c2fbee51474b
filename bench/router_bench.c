/*
 * Router lookup cost with 10 routes versus 10,000 routes, to show that lookup does not grow
 * with the number of routes (it depends on host/path length and on the few routes sharing a
 * host and prefix).
 *
 * Build and run (from the repository root):
 *   make MODE=release build/release/libsluice.a
 *   cc -O2 -Isrc bench/router_bench.c build/release/libsluice.a -lyaml -lpthread \
 *      -o build/router_bench
 *   ./build/router_bench
 *
 * Each configuration is timed over the same kind of request mix (exact-path hits, prefix hits
 * with deeper paths, wildcard hosts, unknown hosts and misses), repeated until about half a
 * second has passed; the best of 5 runs is reported as ns per lookup.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config/config.h"
#include "http/h1_parse.h"
#include "proxy/router.h"

#define QUERIES 4096

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint32_t rnd(uint32_t n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng % n);
}

__attribute__((format(printf, 1, 2))) static char *fmt(const char *f, ...)
{
    char buf[160];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    char *s = strdup(buf);
    if (!s)
        abort();
    return s;
}

struct setup {
    struct sl_config cfg;
    struct sl_route_conf *routes;
    struct sl_route_input in[QUERIES];
    char *strings[QUERIES * 2];
};

/* Routes spread over hosts the way a large multi-tenant config would be. */
static void build_routes(struct setup *s, size_t n)
{
    size_t hosts = n / 30 + 1, zones = n / 500 + 1;
    s->routes = calloc(n, sizeof *s->routes);
    if (!s->routes)
        abort();
    for (size_t i = 0; i < n; i++) {
        struct sl_route_conf *rc = &s->routes[i];
        rc->index = i;
        rc->name = fmt("r%zu", i);
        unsigned hk = rnd(100);
        if (hk < 75)
            rc->match.host = fmt("tenant%u.example.com", rnd((uint32_t)hosts));
        else if (hk < 90)
            rc->match.host = fmt("*.zone%u.example.net", rnd((uint32_t)zones));
        unsigned pk = rnd(100);
        if (pk < 50)
            rc->match.path = fmt("/api/v%u/resource%u", rnd(3), rnd(200));
        else if (pk < 90)
            rc->match.path_prefix = fmt("/svc%u/v%u", rnd(100), rnd(3));
        else if (pk < 97)
            rc->match.path_prefix = fmt("/static%u/", rnd(20));
        if (rnd(10) == 0)
            rc->match.methods = SL_METHOD_GET | SL_METHOD_HEAD;
    }
    s->cfg.routes = s->routes;
    s->cfg.route_count = n;
}

static void build_queries(struct setup *s)
{
    size_t n = s->cfg.route_count;
    for (size_t q = 0; q < QUERIES; q++) {
        const struct sl_route_conf *rc = &s->routes[rnd((uint32_t)n)];
        char *host, *path;
        if (rnd(10) == 0)
            host = fmt("unknown%u.example.org:443", rnd(1000));
        else if (!rc->match.host)
            host = fmt("tenant%u.example.com", rnd(100));
        else if (rc->match.host[0] == '*')
            host = fmt("app%u%s", rnd(50), rc->match.host + 1);
        else
            host = fmt("%s", rc->match.host);
        if (rc->match.path)
            path = fmt("%s", rc->match.path);
        else if (rc->match.path_prefix)
            path = fmt("%s/items/%u", rc->match.path_prefix, rnd(100000));
        else
            path = fmt("/misc/%u", rnd(1000));
        s->strings[2 * q] = host;
        s->strings[2 * q + 1] = path;
        s->in[q] = (struct sl_route_input){
            .host = sl_slice_cstr(host),
            .path = sl_slice_cstr(path),
            .method = SL_SLICE_LIT("GET"),
            .method_bit = SL_METHOD_GET,
        };
    }
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void run(size_t nroutes)
{
    struct setup *s = calloc(1, sizeof *s);
    if (!s)
        abort();
    build_routes(s, nroutes);
    build_queries(s);

    double t0 = now_ns();
    struct sl_router *r = sl_router_new(&s->cfg, NULL);
    double build_ms = (now_ns() - t0) / 1e6;
    if (!r)
        abort();

    size_t hits = 0;
    for (size_t q = 0; q < QUERIES; q++)
        hits += sl_router_match(r, &s->in[q]) != NULL;

    double best = 1e30;
    uintptr_t sink = 0;
    for (int rep = 0; rep < 5; rep++) {
        size_t lookups = 0;
        double start = now_ns(), elapsed;
        do {
            for (size_t q = 0; q < QUERIES; q++)
                sink ^= (uintptr_t)sl_router_match(r, &s->in[q]);
            lookups += QUERIES;
            elapsed = now_ns() - start;
        } while (elapsed < 1e8);
        double per = elapsed / (double)lookups;
        if (per < best)
            best = per;
    }
    printf("%6zu routes: %7.1f ns/lookup  (build %.1f ms, %zu/%d queries match, sink %lx)\n",
           nroutes, best, build_ms, hits, QUERIES, (unsigned long)(sink & 0xf));

    sl_router_free(r);
    for (size_t i = 0; i < QUERIES * 2; i++)
        free(s->strings[i]);
    for (size_t i = 0; i < nroutes; i++) {
        free(s->routes[i].name);
        free(s->routes[i].match.host);
        free(s->routes[i].match.path);
        free(s->routes[i].match.path_prefix);
    }
    free(s->routes);
    free(s);
}

int main(void)
{
    run(10);
    run(100);
    run(1000);
    run(10000);
    return 0;
}
