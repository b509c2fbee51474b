#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <math.h>
#include <pthread.h>

#include "config/config.h"
#include "http/request.h"
#include "obs/log_ship.h"
#include "obs/metrics.h"
#include "obs/obs.h"

/*
 * The metrics module without a gateway: synthetic finished requests recorded on two workers
 * (a hand-built route table stands in for the config), rendered with obs->gw == NULL, and
 * the text checked series by series: counts per route and status class, histogram buckets
 * cumulative with _count equal to +Inf, rejections and gateway errors merged across workers,
 * label escaping, route slots kept across binds, the overflow slot, and the cost gauges.
 */

/* ---- fixtures ------------------------------------------------------------------------------ */

#define MAX_ROUTES 4200

struct fixture {
    struct sl_metrics *m;
    struct sl_obs obs;
    struct sl_config cfg;
    struct sl_route_conf routes[MAX_ROUTES];
    char names[MAX_ROUTES][24];
    char *text;
};

/* Points cfg at routes named by `names` (NULL entry: unnamed). */
static void set_routes(struct fixture *f, const char *const *names, size_t n)
{
    assert_true(n <= MAX_ROUTES);
    memset(f->routes, 0, sizeof f->routes);
    for (size_t i = 0; i < n; i++) {
        f->routes[i].index = i;
        f->routes[i].name = (char *)names[i];
    }
    f->cfg.routes = f->routes;
    f->cfg.route_count = n;
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->m = sl_metrics_new(2);
    assert_non_null(f->m);
    pthread_mutex_init(&f->obs.lock, NULL);
    f->obs.metrics = f->m;
    f->obs.generation = 1;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    free(f->text);
    sl_metrics_free(f->m);
    pthread_mutex_destroy(&f->obs.lock);
    free(f);
    return 0;
}

struct req_spec {
    int status;
    uint64_t total_us;    /* end - start */
    uint64_t upstream_us; /* 0 = never reached an upstream */
    uint64_t cpu_ns;
    uint64_t bytes_in, bytes_out;
    uint32_t retries;
    const char *filter, *error;
};

static void record(struct fixture *f, unsigned worker, const struct sl_route_conf *route,
                   struct req_spec s)
{
    struct sl_request req;
    memset(&req, 0, sizeof req);
    req.route = route;
    req.log.route = route ? route->name : NULL;
    req.log.status = s.status;
    req.log.start_us = 5000000;
    req.log.end_us = req.log.start_us + s.total_us;
    if (s.upstream_us) {
        req.log.upstream_start_us = req.log.start_us + 1;
        req.log.upstream_end_us = req.log.upstream_start_us + s.upstream_us;
    }
    req.log.cpu_ns = s.cpu_ns;
    req.log.bytes_in = s.bytes_in;
    req.log.bytes_out = s.bytes_out;
    req.log.retries = s.retries;
    req.log.filter = s.filter;
    req.log.error = s.error;
    sl_metrics_record(f->m, worker, &req);
}

static const char *render(struct fixture *f)
{
    free(f->text);
    size_t len = 0;
    f->text = sl_metrics_render(&f->obs, &len);
    assert_non_null(f->text);
    assert_int_equal(strlen(f->text), len);
    return f->text;
}

/* The value of the sample whose series is exactly `series` (name and labels as rendered);
 * fails when absent or present twice. */
static double value(const char *text, const char *series)
{
    size_t n = strlen(series);
    const char *found = NULL;
    for (const char *p = text; *p;) {
        const char *eol = strchr(p, '\n');
        assert_non_null(eol);
        if ((size_t)(eol - p) > n && strncmp(p, series, n) == 0 && p[n] == ' ') {
            if (found)
                fail_msg("series %s appears twice", series);
            found = p + n + 1;
        }
        p = eol + 1;
    }
    if (!found)
        fail_msg("series %s not found in:\n%s", series, text);
    char *end;
    double v = strtod(found, &end);
    assert_true(*end == '\n');
    return v;
}

static bool has_line(const char *text, const char *line)
{
    size_t n = strlen(line);
    for (const char *p = text; *p;) {
        const char *eol = strchr(p, '\n');
        if (!eol)
            return false;
        if ((size_t)(eol - p) == n && strncmp(p, line, n) == 0)
            return true;
        p = eol + 1;
    }
    return false;
}

static bool has_prefix_line(const char *text, const char *prefix)
{
    size_t n = strlen(prefix);
    for (const char *p = text; *p;) {
        if (strncmp(p, prefix, n) == 0)
            return true;
        const char *eol = strchr(p, '\n');
        if (!eol)
            return false;
        p = eol + 1;
    }
    return false;
}

/* ---- tests --------------------------------------------------------------------------------- */

static void test_counts_per_route_and_class(void **state)
{
    struct fixture *f = *state;
    static const char *const names[] = {"api", "static"};
    set_routes(f, names, 2);
    assert_int_equal(sl_metrics_bind_routes(f->m, &f->cfg), 0);
    const struct sl_route_conf *api = &f->routes[0], *st = &f->routes[1];
    for (int i = 0; i < 5; i++)
        record(f, 0, api, (struct req_spec){.status = 200, .total_us = 800});
    for (int i = 0; i < 3; i++)
        record(f, 1, api, (struct req_spec){.status = 201, .total_us = 800});
    record(f, 1, api, (struct req_spec){.status = 503, .error = "upstream_connect_failed"});
    record(f, 0, api, (struct req_spec){.status = 0}); /* ended without a response */
    record(f, 0, st, (struct req_spec){.status = 304});
    record(f, 1, st, (struct req_spec){.status = 404});
    record(f, 0, NULL, (struct req_spec){.status = 404, .error = "no_route"});
    const char *t = render(f);

    assert_true(value(t, "sluice_requests_total{route=\"api\",code=\"2xx\"}") == 8);
    assert_true(value(t, "sluice_requests_total{route=\"api\",code=\"5xx\"}") == 1);
    assert_true(value(t, "sluice_requests_total{route=\"api\",code=\"none\"}") == 1);
    assert_true(value(t, "sluice_requests_total{route=\"api\",code=\"4xx\"}") == 0);
    assert_true(value(t, "sluice_requests_total{route=\"static\",code=\"3xx\"}") == 1);
    assert_true(value(t, "sluice_requests_total{route=\"static\",code=\"4xx\"}") == 1);
    assert_true(value(t, "sluice_requests_total{route=\"(none)\",code=\"4xx\"}") == 1);
    assert_true(value(t, "sluice_gateway_errors_total{route=\"(none)\",reason=\"no_route\"}") == 1);
    assert_true(value(t, "sluice_gateway_errors_total{route=\"api\",reason=\""
                         "upstream_connect_failed\"}") == 1);
    /* every family announced once, before its samples */
    assert_true(has_line(t, "# TYPE sluice_requests_total counter"));
    assert_true(has_line(t, "# TYPE sluice_request_duration_seconds histogram"));
    assert_true(has_prefix_line(t, "# HELP sluice_requests_total "));
    assert_true(strstr(t, "# TYPE sluice_requests_total") < strstr(t, "sluice_requests_total{"));
    /* the gateway sections are skipped without a gateway; process ones are there */
    assert_false(has_prefix_line(t, "sluice_connections_open"));
    assert_true(value(t, "sluice_build_info{version=\"unknown\"}") == 1);
    assert_true(value(t, "sluice_config_generation") == 1);
    assert_true(value(t, "sluice_process_cpu_seconds_total") >= 0);
    assert_true(value(t, "sluice_process_resident_memory_bytes") > 0);

    struct sl_metrics_totals tot;
    assert_int_equal(sl_metrics_totals(f->m, &tot, true), 0);
    assert_int_equal(tot.requests, 13);
    assert_int_equal(tot.codes[SL_METRICS_2XX], 8);
    assert_int_equal(tot.codes[SL_METRICS_5XX], 1);
    assert_int_equal(tot.codes[SL_METRICS_NONE], 1);
    assert_int_equal(tot.route_count, 3); /* api, static, (none) */
    assert_string_equal(tot.routes[0].name, "api");
    assert_int_equal(tot.routes[0].requests, 10);
    assert_true(fabs(tot.routes[0].duration_seconds_sum - 8 * 0.0008) < 1e-9);
    assert_string_equal(tot.routes[1].name, "static");
    assert_string_equal(tot.routes[2].name, SL_METRICS_ROUTE_NONE);
    sl_metrics_totals_dispose(&tot);
}

static void test_histograms_are_cumulative(void **state)
{
    struct fixture *f = *state;
    static const char *const names[] = {"r"};
    set_routes(f, names, 1);
    assert_int_equal(sl_metrics_bind_routes(f->m, &f->cfg), 0);
    const struct sl_route_conf *r = &f->routes[0];
    /* 0.1 ms exactly (on the bound: le is inclusive), 3 ms, 20 s (past the last bound) */
    record(f, 0, r,
           (struct req_spec){.status = 200, .total_us = 100, .upstream_us = 90, .cpu_ns = 1000});
    record(f, 1, r, (struct req_spec){.status = 200, .total_us = 3000, .cpu_ns = 30000});
    record(f, 1, r,
           (struct req_spec){
               .status = 200, .total_us = 20000000, .upstream_us = 4000, .cpu_ns = 50000000});
    const char *t = render(f);
#define B(le) value(t, "sluice_request_duration_seconds_bucket{route=\"r\",le=\"" le "\"}")
    assert_true(B("0.0001") == 1);
    assert_true(B("0.00025") == 1);
    assert_true(B("0.0025") == 1);
    assert_true(B("0.005") == 2);
    assert_true(B("10") == 2);
    assert_true(B("+Inf") == 3);
#undef B
    assert_true(value(t, "sluice_request_duration_seconds_count{route=\"r\"}") == 3);
    assert_true(fabs(value(t, "sluice_request_duration_seconds_sum{route=\"r\"}") - 20.0031) <
                1e-9);
    /* upstream: only the two that reached one */
    assert_true(value(t, "sluice_upstream_duration_seconds_count{route=\"r\"}") == 2);
    assert_true(value(t, "sluice_upstream_duration_seconds_bucket{route=\"r\",le=\"0.0001\"}") ==
                1);
    assert_true(value(t, "sluice_upstream_duration_seconds_bucket{route=\"r\",le=\"0.005\"}") == 2);
    assert_true(fabs(value(t, "sluice_upstream_duration_seconds_sum{route=\"r\"}") - 0.00409) <
                1e-12);
    /* CPU: 1 us, 30 us, 50 ms */
    assert_true(value(t, "sluice_request_cpu_seconds_bucket{route=\"r\",le=\"0.000001\"}") == 1);
    assert_true(value(t, "sluice_request_cpu_seconds_bucket{route=\"r\",le=\"0.00005\"}") == 2);
    assert_true(value(t, "sluice_request_cpu_seconds_bucket{route=\"r\",le=\"0.01\"}") == 2);
    assert_true(value(t, "sluice_request_cpu_seconds_bucket{route=\"r\",le=\"+Inf\"}") == 3);
    assert_true(fabs(value(t, "sluice_request_cpu_seconds_sum{route=\"r\"}") - 0.050031) < 1e-12);

    /* every bucket line of every histogram is non-decreasing and ends at _count */
    const char *p = t;
    char prev_series[256] = "";
    double prev = 0;
    while ((p = strstr(p, "_bucket{")) != NULL) {
        const char *start = p;
        while (start > t && start[-1] != '\n')
            start--;
        const char *le = strstr(start, ",le=\"");
        assert_non_null(le);
        char series[256];
        snprintf(series, sizeof series, "%.*s", (int)(le - start), start);
        const char *sp = strchr(p, ' ');
        double v = strtod(sp + 1, NULL);
        if (strcmp(series, prev_series) == 0)
            assert_true(v >= prev);
        snprintf(prev_series, sizeof prev_series, "%s", series);
        prev = v;
        p = sp;
    }
}

static void test_bytes_retries_rejections(void **state)
{
    struct fixture *f = *state;
    static const char *const names[] = {"r"};
    set_routes(f, names, 1);
    assert_int_equal(sl_metrics_bind_routes(f->m, &f->cfg), 0);
    const struct sl_route_conf *r = &f->routes[0];
    /* The same reason text at two addresses (two translation units' literals) is one series. */
    static const char reason_a[] = "rate_limited";
    static const char reason_b[] = "rate_limited";
    assert_ptr_not_equal(reason_a, reason_b);
    for (int i = 0; i < 4; i++)
        record(f, i % 2, r,
               (struct req_spec){.status = 429,
                                 .filter = "rate_limit",
                                 .error = i < 2 ? reason_a : reason_b,
                                 .bytes_in = 100,
                                 .bytes_out = 250});
    record(f, 0, r, (struct req_spec){.status = 401, .filter = "jwt", .error = "token_expired"});
    record(f, 1, r, (struct req_spec){.status = 200, .retries = 2, .upstream_us = 10});
    const char *t = render(f);
    assert_true(value(t, "sluice_rejections_total{route=\"r\",filter=\"rate_limit\",reason=\""
                         "rate_limited\"}") == 4);
    assert_true(
        value(t, "sluice_rejections_total{route=\"r\",filter=\"jwt\",reason=\"token_expired\"}") ==
        1);
    assert_false(has_prefix_line(t, "sluice_gateway_errors_total{"));
    assert_true(value(t, "sluice_request_bytes_total{route=\"r\",direction=\"in\"}") == 400);
    assert_true(value(t, "sluice_request_bytes_total{route=\"r\",direction=\"out\"}") == 1000);
    assert_true(value(t, "sluice_retries_total{route=\"r\"}") == 2);
}

static void test_label_escaping(void **state)
{
    struct fixture *f = *state;
    /* Config names cannot hold these, but the exposition must stay valid whatever it gets. */
    static const char *const names[] = {"a\"b\\c\nd"};
    set_routes(f, names, 1);
    assert_int_equal(sl_metrics_bind_routes(f->m, &f->cfg), 0);
    record(f, 0, &f->routes[0], (struct req_spec){.status = 500, .error = "x\"y"});
    const char *t = render(f);
    assert_true(value(t, "sluice_requests_total{route=\"a\\\"b\\\\c\\nd\",code=\"5xx\"}") == 1);
    assert_true(value(t, "sluice_gateway_errors_total{route=\"a\\\"b\\\\c\\nd\",reason="
                         "\"x\\\"y\"}") == 1);
    /* no raw newline inside any sample line: every line is a comment or has a value */
    for (const char *p = t; *p;) {
        const char *eol = strchr(p, '\n');
        assert_non_null(eol);
        if (*p != '#') {
            const char *sp = eol;
            while (sp > p && sp[-1] != ' ')
                sp--;
            assert_true(sp > p);
        }
        p = eol + 1;
    }
}

static void test_slots_survive_rebind(void **state)
{
    struct fixture *f = *state;
    static const char *const v1[] = {"a", "b", NULL};
    set_routes(f, v1, 3);
    assert_int_equal(sl_metrics_bind_routes(f->m, &f->cfg), 0);
    size_t slot_a = f->routes[0].metrics_slot, slot_b = f->routes[1].metrics_slot;
    size_t slot_unnamed = f->routes[2].metrics_slot;
    assert_true(slot_a != 0 && slot_b != 0 && slot_a != slot_b && slot_unnamed != slot_a);
    record(f, 0, &f->routes[0], (struct req_spec){.status = 200});
    record(f, 1, &f->routes[1], (struct req_spec){.status = 200});
    record(f, 1, &f->routes[2], (struct req_spec){.status = 200});
    const char *t = render(f);
    assert_true(value(t, "sluice_requests_total{route=\"route2\",code=\"2xx\"}") == 1);

    /* reload: b renamed to b2, a moved, c added; a keeps its slot and counts on */
    static const char *const v2[] = {"c", "b2", "a"};
    set_routes(f, v2, 3);
    assert_int_equal(sl_metrics_bind_routes(f->m, &f->cfg), 0);
    assert_int_equal(f->routes[2].metrics_slot, slot_a);
    assert_true(f->routes[0].metrics_slot != slot_a && f->routes[0].metrics_slot != slot_b);
    assert_true(f->routes[1].metrics_slot != slot_b);
    record(f, 0, &f->routes[2], (struct req_spec){.status = 200});
    t = render(f);
    assert_true(value(t, "sluice_requests_total{route=\"a\",code=\"2xx\"}") == 2);
    /* b is gone from the config but counted, so its series stays; c shows zeros */
    assert_true(value(t, "sluice_requests_total{route=\"b\",code=\"2xx\"}") == 1);
    assert_true(value(t, "sluice_requests_total{route=\"c\",code=\"2xx\"}") == 0);
    assert_true(value(t, "sluice_requests_total{route=\"b2\",code=\"2xx\"}") == 0);

    /* back again: b returns to its old slot */
    static const char *const v3[] = {"b"};
    set_routes(f, v3, 1);
    assert_int_equal(sl_metrics_bind_routes(f->m, &f->cfg), 0);
    assert_int_equal(f->routes[0].metrics_slot, slot_b);
}

static void test_route_cap_and_unbound(void **state)
{
    struct fixture *f = *state;
    const char **names = calloc(MAX_ROUTES, sizeof *names);
    assert_non_null(names);
    size_t n = SL_METRICS_MAX_ROUTES + 3;
    for (size_t i = 0; i < n; i++) {
        snprintf(f->names[i], sizeof f->names[i], "r%zu", i);
        names[i] = f->names[i];
    }
    set_routes(f, names, n);
    assert_int_equal(sl_metrics_bind_routes(f->m, &f->cfg), 0);
    size_t last_own = f->routes[SL_METRICS_MAX_ROUTES - 1].metrics_slot;
    size_t over = f->routes[SL_METRICS_MAX_ROUTES].metrics_slot;
    assert_true(last_own != over);
    assert_int_equal(f->routes[SL_METRICS_MAX_ROUTES + 2].metrics_slot, over);
    record(f, 0, &f->routes[SL_METRICS_MAX_ROUTES - 1], (struct req_spec){.status = 200});
    record(f, 0, &f->routes[SL_METRICS_MAX_ROUTES], (struct req_spec){.status = 200});
    record(f, 1, &f->routes[SL_METRICS_MAX_ROUTES + 2], (struct req_spec){.status = 200});
    /* a route never bound (metrics_slot 0) counts under (other) too, not under another route */
    struct sl_route_conf unbound = {.name = "zzz"};
    record(f, 1, &unbound, (struct req_spec){.status = 200});
    const char *t = render(f);
    assert_true(value(t, "sluice_requests_total{route=\"r4095\",code=\"2xx\"}") == 1);
    assert_true(value(t, "sluice_requests_total{route=\"(other)\",code=\"2xx\"}") == 3);
    assert_false(has_prefix_line(t, "sluice_requests_total{route=\"r4096\""));
    free(names);
}

static void test_cost(void **state)
{
    struct fixture *f = *state;
    static const char *const names[] = {"r"};
    set_routes(f, names, 1);
    f->cfg.vcpu_hour_usd = 0.0181;
    const char *t = render(f);
    /* nothing bound with a price yet, and no request: no price, no per-request figure */
    assert_false(has_prefix_line(t, "sluice_vcpu_hour_usd "));
    assert_false(has_prefix_line(t, "sluice_cpu_seconds_per_request "));
    assert_true(has_line(t, "# TYPE sluice_cpu_seconds_per_request gauge"));

    assert_int_equal(sl_metrics_bind_routes(f->m, &f->cfg), 0);
    record(f, 0, &f->routes[0], (struct req_spec){.status = 200, .cpu_ns = 40000});
    record(f, 1, &f->routes[0], (struct req_spec){.status = 200, .cpu_ns = 20000});
    t = render(f);
    assert_true(value(t, "sluice_vcpu_hour_usd") == 0.0181);
    assert_true(value(t, "sluice_cpu_seconds_per_request") > 0);
    double per_route = value(t, "sluice_estimated_cost_usd_per_million_requests{route=\"r\"}");
    double want = 30e-6 * 1e6 / 3600.0 * 0.0181; /* 30 us on average */
    assert_true(fabs(per_route - want) < want * 1e-6);
    assert_true(value(t, "sluice_estimated_cost_usd_per_million_requests") > 0);
}

static void test_bad_worker_and_null(void **state)
{
    struct fixture *f = *state;
    record(f, 2, NULL, (struct req_spec){.status = 200}); /* out of range: ignored */
    sl_metrics_record(NULL, 0, NULL);
    struct sl_metrics_totals tot;
    assert_int_equal(sl_metrics_totals(f->m, &tot, false), 0);
    assert_int_equal(tot.requests, 0);
    assert_null(tot.routes);
    sl_metrics_totals_dispose(&tot);
    const char *t = render(f);
    /* no route bound and nothing counted: the families are announced without samples */
    assert_true(has_line(t, "# TYPE sluice_requests_total counter"));
    assert_false(has_prefix_line(t, "sluice_requests_total{"));
    sl_metrics_set_version(f->m, "1.2.3");
    t = render(f);
    assert_true(value(t, "sluice_build_info{version=\"1.2.3\"}") == 1);
}

static void test_log_ship_section(void **state)
{
    struct fixture *f = *state;
    const char *t = render(f);
    assert_false(has_prefix_line(t, "# TYPE sluice_access_log_shipped_segments_total"));
    struct sl_access_log_conf conf = {.directory = "/nonexistent-sluice-test",
                                      .ship_url = "http://127.0.0.1:9/ingest"};
    char err[256];
    struct sl_log_ship *ship = sl_log_ship_new(&conf, err, sizeof err);
    assert_non_null(ship);
    sl_metrics_set_log_ship(f->m, ship);
    t = render(f);
    assert_true(has_line(t, "# TYPE sluice_access_log_shipped_segments_total counter"));
    assert_true(value(t, "sluice_access_log_shipped_segments_total") == 0);
    assert_true(value(t, "sluice_access_log_shipped_bytes_total") == 0);
    assert_true(value(t, "sluice_access_log_ship_failures_total") == 0);
    assert_true(value(t, "sluice_access_log_ship_queued_segments") == 0);
    sl_metrics_set_log_ship(f->m, NULL);
    sl_log_ship_free(ship);
    t = render(f);
    assert_false(has_prefix_line(t, "# TYPE sluice_access_log_shipped_segments_total"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_counts_per_route_and_class, setup, teardown),
        cmocka_unit_test_setup_teardown(test_histograms_are_cumulative, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bytes_retries_rejections, setup, teardown),
        cmocka_unit_test_setup_teardown(test_label_escaping, setup, teardown),
        cmocka_unit_test_setup_teardown(test_slots_survive_rebind, setup, teardown),
        cmocka_unit_test_setup_teardown(test_route_cap_and_unbound, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cost, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_worker_and_null, setup, teardown),
        cmocka_unit_test_setup_teardown(test_log_ship_section, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
