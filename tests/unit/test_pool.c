#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <sys/socket.h>

#include "config/config.h"
#include "core/log.h"
#include "proxy/pool.h"

/*
 * The shared endpoint pool: the sliding window, the per-endpoint state machine (closed -> open
 * -> half-open -> closed), max_ejection_percent, the growing ejection time and its
 * forgiveness, the retry budget and the publication of endpoint sets. Upstreams are built by
 * hand so these tests do not depend on the YAML loader; every time is an explicit now_ms.
 */

#define W_MAX 0xffffffffull /* saturation of one count in one bucket: 2^32 - 1 */
#define MAX_EP 8
#define T0 1000000u /* an arbitrary start time, far from 0 */

/* ---- fixtures ------------------------------------------------------------------------------ */

struct up {
    struct sl_upstream_conf conf;
    struct sl_endpoint_conf eps[MAX_EP];
    char addrs[MAX_EP][32];
};

/* `n` endpoints 10.0.0.1:80, 10.0.0.2:80, ... with the documented defaults. */
static struct up *up_new(size_t n)
{
    struct up *u = calloc(1, sizeof *u);
    assert_non_null(u);
    assert_true(n <= MAX_EP);
    struct sl_upstream_conf *c = &u->conf;
    c->name = "u";
    c->balance = SL_BALANCE_ROUND_ROBIN;
    c->endpoints = u->eps;
    c->endpoint_count = n;
    c->keepalive_max_idle = 64;
    c->keepalive_idle_timeout_ms = 30000;
    c->passive.enabled = true;
    c->passive.consecutive_failures = 5;
    c->passive.failure_ratio_permille = 0;
    c->passive.min_requests = 20;
    c->passive.window_ms = 10000;
    c->passive.ejection_ms = 5000;
    c->passive.max_ejection_ms = 300000;
    c->passive.max_ejection_percent = 50;
    c->passive.half_open_requests = 1;
    c->retries.attempts = 2;
    c->retries.budget_percent = 20;
    c->retries.min_retries = 10;
    c->zone_aware.panic_percent = 50;
    for (size_t i = 0; i < n; i++) {
        snprintf(u->addrs[i], sizeof u->addrs[i], "10.0.0.%zu:80", i + 1);
        struct sockaddr_in *sin = (struct sockaddr_in *)&u->eps[i].addr;
        sin->sin_family = AF_INET;
        sin->sin_port = htons(80);
        sin->sin_addr.s_addr = htonl(0x0a000000u + (uint32_t)i + 1);
        u->eps[i].addr_len = sizeof *sin;
        u->eps[i].address = u->addrs[i];
        u->eps[i].weight = 1;
    }
    return u;
}

/* A spec for 10.0.1.<host>:80 as a discovery source would give it. */
static struct sl_endpoint_spec spec(char (*buf)[32], unsigned host)
{
    struct sl_endpoint_spec s;
    memset(&s, 0, sizeof s);
    snprintf(*buf, sizeof *buf, "10.0.1.%u:80", host);
    struct sockaddr_in *sin = (struct sockaddr_in *)&s.addr;
    sin->sin_family = AF_INET;
    sin->sin_port = htons(80);
    sin->sin_addr.s_addr = htonl(0x0a000100u + host);
    s.addr_len = sizeof *sin;
    s.address = *buf;
    s.weight = 1;
    return s;
}

static int ep_state(struct sl_endpoint *ep)
{
    return atomic_load(&ep->state);
}

static uint64_t counter(_Atomic uint64_t *c)
{
    return atomic_load(c);
}

/* Reports `n` outcomes of ordinary (non-probe) attempts at `now`. */
static void report_n(struct sl_endpoint *ep, const struct sl_endpoint_set *set, enum sl_outcome o,
                     unsigned n, uint64_t now)
{
    for (unsigned i = 0; i < n; i++)
        sl_endpoint_report(ep, set, o, false, now);
}

/* ---- sliding window ------------------------------------------------------------------------ */

static void test_window_add_sum_age_reset(void **state)
{
    (void)state;
    struct sl_window w;
    uint64_t a, b;
    sl_window_init(&w, 1000); /* buckets of 100 ms */
    assert_int_equal(w.bucket_ms, 100);

    sl_window_sum(&w, T0, &a, &b);
    assert_int_equal(a, 0);
    assert_int_equal(b, 0);

    sl_window_add(&w, T0, 1, 2);
    sl_window_add(&w, T0 + 50, 3, 4); /* same bucket */
    sl_window_add(&w, T0 + 150, 5, 0);
    sl_window_sum(&w, T0 + 150, &a, &b);
    assert_int_equal(a, 9);
    assert_int_equal(b, 6);

    /* still inside the window: the last bucket of the window is T0's */
    sl_window_sum(&w, T0 + 999, &a, &b);
    assert_int_equal(a, 9);
    assert_int_equal(b, 6);
    /* one window after T0 its bucket is out, T0 + 150's is still in */
    sl_window_sum(&w, T0 + 1000, &a, &b);
    assert_int_equal(a, 5);
    assert_int_equal(b, 0);
    sl_window_sum(&w, T0 + 1100, &a, &b);
    assert_int_equal(a, 0);
    assert_int_equal(b, 0);

    /* a write into a slot holding an old bucket starts it afresh */
    sl_window_add(&w, T0 + 1000, 1, 1);
    sl_window_sum(&w, T0 + 1000, &a, &b);
    assert_int_equal(a, 6);
    assert_int_equal(b, 1);

    sl_window_reset(&w);
    sl_window_sum(&w, T0 + 1000, &a, &b);
    assert_int_equal(a, 0);
    assert_int_equal(b, 0);

    /* a window shorter than the bucket count still has buckets of 1 ms */
    sl_window_init(&w, 5);
    assert_int_equal(w.bucket_ms, 1);
    sl_window_add(&w, 7, 1, 1);
    sl_window_sum(&w, 16, &a, &b);
    assert_int_equal(a, 1);
    sl_window_sum(&w, 17, &a, &b);
    assert_int_equal(a, 0);
}

static void test_window_saturates(void **state)
{
    (void)state;
    struct sl_window w;
    uint64_t a, b;
    sl_window_init(&w, 1000);

    sl_window_add(&w, T0, W_MAX - 1, 7);
    sl_window_add(&w, T0, 5, 0);
    sl_window_sum(&w, T0, &a, &b);
    assert_int_equal(a, W_MAX); /* saturated, not wrapped */
    assert_int_equal(b, 7);     /* the other count is untouched */

    sl_window_add(&w, T0, 0, UINT32_MAX);
    sl_window_add(&w, T0, 1, 1);
    sl_window_sum(&w, T0, &a, &b);
    assert_int_equal(a, W_MAX);
    assert_int_equal(b, W_MAX);

    /* saturation is per bucket: a second bucket adds its own */
    sl_window_add(&w, T0 + 100, 3, 0);
    sl_window_sum(&w, T0 + 100, &a, &b);
    assert_int_equal(a, W_MAX + 3);
    assert_int_equal(b, W_MAX);

    /* an old epoch in the slot is still recognised after saturation */
    sl_window_sum(&w, T0 + 1100, &a, &b);
    assert_int_equal(a, 0);
    assert_int_equal(b, 0);
}

/* Old buckets age out however long the window stayed idle: a bucket written exactly 2^16
 * buckets ago (where a 16-bit epoch would wrap) is not taken for a current one. */
#define WRAP_MS (65536u * 100u) /* 2^16 buckets of 100 ms */

static void test_window_sum_after_epoch_wrap(void **state)
{
    (void)state;
    struct sl_window w;
    uint64_t a, b;
    sl_window_init(&w, 1000);
    sl_window_add(&w, T0, 5, 3);
    sl_window_sum(&w, T0 + WRAP_MS, &a, &b);
    assert_int_equal(a, 0); /* nothing was added in the last window */
    assert_int_equal(b, 0);
}

static void test_window_add_after_epoch_wrap(void **state)
{
    (void)state;
    struct sl_window w;
    uint64_t a, b;
    sl_window_init(&w, 1000);
    sl_window_add(&w, T0, 5, 3);
    /* 5 x 2^16 buckets later: the same slot (5 x 65536 is a multiple of 10), the same 16-bit
     * epoch; the old counts must not be added to */
    sl_window_add(&w, T0 + 5 * WRAP_MS, 1, 0);
    sl_window_sum(&w, T0 + 5 * WRAP_MS, &a, &b);
    assert_int_equal(a, 1);
    assert_int_equal(b, 0);
}

/* ---- consecutive failures ------------------------------------------------------------------ */

static void test_consecutive_failures_eject(void **state)
{
    (void)state;
    struct up *u = up_new(2);
    u->conf.passive.consecutive_failures = 3;
    u->conf.passive.ejection_ms = 1000;
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    struct sl_endpoint_set *s = sl_pool_acquire_set(p);
    struct sl_endpoint *ep = s->eps[0];

    report_n(ep, s, SL_OUTCOME_CONNECT_FAILURE, 2, T0);
    assert_int_equal(ep_state(ep), SL_EP_CLOSED);
    assert_true(sl_endpoint_is_healthy(ep));
    assert_int_equal(atomic_load(&p->ejected), 0);

    sl_endpoint_report(ep, s, SL_OUTCOME_HTTP_5XX, false, T0 + 10);
    assert_int_equal(ep_state(ep), SL_EP_OPEN);
    assert_false(sl_endpoint_is_healthy(ep));
    assert_int_equal(atomic_load(&ep->open_until_ms), T0 + 10 + 1000);
    assert_int_equal(atomic_load(&p->ejected), 1);
    assert_int_equal(counter(&p->stats.ejections), 1);
    /* the other endpoint is untouched */
    assert_int_equal(ep_state(s->eps[1]), SL_EP_CLOSED);

    sl_endpoint_set_unref(s);
    sl_pool_free(p);
    free(u);
}

static void test_consecutive_failures_reset_by_success(void **state)
{
    (void)state;
    struct up *u = up_new(1);
    u->conf.passive.consecutive_failures = 3;
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    struct sl_endpoint_set *s = sl_pool_acquire_set(p);
    struct sl_endpoint *ep = s->eps[0];

    report_n(ep, s, SL_OUTCOME_TIMEOUT, 2, T0);
    sl_endpoint_report(ep, s, SL_OUTCOME_SUCCESS, false, T0);
    report_n(ep, s, SL_OUTCOME_RESET, 2, T0);
    assert_int_equal(ep_state(ep), SL_EP_CLOSED); /* 2 + 2, never 3 in a row */
    sl_endpoint_report(ep, s, SL_OUTCOME_RESET, false, T0);
    assert_int_equal(ep_state(ep), SL_EP_OPEN);

    sl_endpoint_set_unref(s);
    sl_pool_free(p);
    free(u);
}

static void test_consecutive_failures_ignore_cancelled(void **state)
{
    (void)state;
    struct up *u = up_new(2);
    u->conf.passive.consecutive_failures = 3;
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    struct sl_endpoint_set *s = sl_pool_acquire_set(p);

    /* cancelled does not count: any number of them ejects nothing */
    struct sl_endpoint *a = s->eps[0];
    report_n(a, s, SL_OUTCOME_CONNECT_FAILURE, 2, T0);
    report_n(a, s, SL_OUTCOME_CANCELLED, 10, T0);
    assert_int_equal(ep_state(a), SL_EP_CLOSED);
    /* ... and does not reset: the failure after it is the third in a row */
    sl_endpoint_report(a, s, SL_OUTCOME_CONNECT_FAILURE, false, T0);
    assert_int_equal(ep_state(a), SL_EP_OPEN);

    /* only cancellations never eject */
    struct sl_endpoint *b = s->eps[1];
    report_n(b, s, SL_OUTCOME_CANCELLED, 100, T0);
    assert_int_equal(ep_state(b), SL_EP_CLOSED);
    assert_int_equal(atomic_load(&b->consecutive_failures), 0);

    sl_endpoint_set_unref(s);
    sl_pool_free(p);
    free(u);
}

/* ---- failure ratio ------------------------------------------------------------------------- */

static void test_failure_ratio(void **state)
{
    (void)state;
    struct up *u = up_new(2);
    u->conf.passive.consecutive_failures = 0; /* only the ratio */
    u->conf.passive.failure_ratio_permille = 400;
    u->conf.passive.min_requests = 10;
    u->conf.passive.max_ejection_percent = 100;
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    struct sl_endpoint_set *s = sl_pool_acquire_set(p);

    /* below min_requests: 9 failures out of 9 eject nothing */
    struct sl_endpoint *a = s->eps[0];
    report_n(a, s, SL_OUTCOME_CONNECT_FAILURE, 9, T0);
    assert_int_equal(ep_state(a), SL_EP_CLOSED);
    /* the 10th request reaches min_requests at 100% */
    sl_endpoint_report(a, s, SL_OUTCOME_CONNECT_FAILURE, false, T0);
    assert_int_equal(ep_state(a), SL_EP_OPEN);

    /* 7 successes + 4 failures = 36% < 40%: stays; the 5th failure makes 5/12 = 42%: out */
    struct sl_endpoint *b = s->eps[1];
    report_n(b, s, SL_OUTCOME_SUCCESS, 7, T0);
    report_n(b, s, SL_OUTCOME_HTTP_5XX, 4, T0 + 100);
    assert_int_equal(ep_state(b), SL_EP_CLOSED);
    sl_endpoint_report(b, s, SL_OUTCOME_HTTP_5XX, false, T0 + 200);
    assert_int_equal(ep_state(b), SL_EP_OPEN);
    assert_int_equal(atomic_load(&b->open_until_ms), T0 + 200 + 5000);
    assert_int_equal(counter(&p->stats.ejections), 2);

    sl_endpoint_set_unref(s);
    sl_pool_free(p);
    free(u);
}

static void test_failure_ratio_old_requests_age_out(void **state)
{
    (void)state;
    struct up *u = up_new(1);
    u->conf.passive.consecutive_failures = 0;
    u->conf.passive.failure_ratio_permille = 500;
    u->conf.passive.min_requests = 10;
    u->conf.passive.window_ms = 1000;
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    struct sl_endpoint_set *s = sl_pool_acquire_set(p);
    struct sl_endpoint *ep = s->eps[0];

    /* 9 failures, then a window later 9 more: never 10 requests in one window */
    report_n(ep, s, SL_OUTCOME_CONNECT_FAILURE, 9, T0);
    report_n(ep, s, SL_OUTCOME_CONNECT_FAILURE, 9, T0 + 1000);
    assert_int_equal(ep_state(ep), SL_EP_CLOSED);
    sl_endpoint_report(ep, s, SL_OUTCOME_CONNECT_FAILURE, false, T0 + 1000);
    assert_int_equal(ep_state(ep), SL_EP_OPEN);

    sl_endpoint_set_unref(s);
    sl_pool_free(p);
    free(u);
}

static void test_passive_disabled_never_ejects(void **state)
{
    (void)state;
    struct up *u = up_new(1);
    u->conf.passive.enabled = false;
    u->conf.passive.consecutive_failures = 2;
    u->conf.passive.failure_ratio_permille = 100;
    u->conf.passive.min_requests = 1;
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    struct sl_endpoint_set *s = sl_pool_acquire_set(p);
    struct sl_endpoint *ep = s->eps[0];

    report_n(ep, s, SL_OUTCOME_CONNECT_FAILURE, 100, T0);
    report_n(ep, s, SL_OUTCOME_HTTP_5XX, 100, T0 + 1);
    assert_int_equal(ep_state(ep), SL_EP_CLOSED);
    assert_true(sl_endpoint_is_healthy(ep));
    assert_int_equal(counter(&p->stats.ejections), 0);
    assert_int_equal(atomic_load(&p->ejected), 0);

    sl_endpoint_set_unref(s);
    sl_pool_free(p);
    free(u);
}

/* ---- max_ejection_percent ------------------------------------------------------------------ */

static void test_max_ejection_percent(void **state)
{
    (void)state;
    struct up *u = up_new(3);
    u->conf.passive.consecutive_failures = 2;
    u->conf.passive.ejection_ms = 1000;
    u->conf.passive.max_ejection_percent = 50;
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    struct sl_endpoint_set *s = sl_pool_acquire_set(p);

    report_n(s->eps[0], s, SL_OUTCOME_CONNECT_FAILURE, 2, T0);
    assert_int_equal(ep_state(s->eps[0]), SL_EP_OPEN);
    assert_int_equal(atomic_load(&p->ejected), 1);
    assert_int_equal(counter(&p->stats.ejections_refused), 0);

    /* a second one would be 2 of 3 > 50% */
    report_n(s->eps[1], s, SL_OUTCOME_CONNECT_FAILURE, 2, T0);
    assert_int_equal(ep_state(s->eps[1]), SL_EP_CLOSED);
    assert_int_equal(counter(&p->stats.ejections_refused), 1);
    assert_int_equal(atomic_load(&p->ejected), 1);
    assert_int_equal(counter(&p->stats.ejections), 1);

    /* the first one comes back (probe succeeds): the share is free again */
    assert_true(sl_endpoint_try_probe(s->eps[0], T0 + 1000));
    assert_int_equal(atomic_load(&p->ejected), 1); /* half-open still counts */
    sl_endpoint_report(s->eps[0], s, SL_OUTCOME_SUCCESS, true, T0 + 1000);
    assert_int_equal(ep_state(s->eps[0]), SL_EP_CLOSED);
    assert_int_equal(atomic_load(&p->ejected), 0);
    report_n(s->eps[1], s, SL_OUTCOME_CONNECT_FAILURE, 2, T0 + 1000);
    assert_int_equal(ep_state(s->eps[1]), SL_EP_OPEN);
    assert_int_equal(atomic_load(&p->ejected), 1);

    sl_endpoint_set_unref(s);
    sl_pool_free(p);
    free(u);
}

static void test_max_ejection_percent_single_endpoint(void **state)
{
    (void)state;
    struct up *u = up_new(1);
    u->conf.passive.consecutive_failures = 1;
    u->conf.passive.max_ejection_percent = 50;
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    struct sl_endpoint_set *s = sl_pool_acquire_set(p);

    sl_endpoint_report(s->eps[0], s, SL_OUTCOME_CONNECT_FAILURE, false, T0);
    assert_int_equal(ep_state(s->eps[0]), SL_EP_OPEN);
    assert_int_equal(atomic_load(&p->ejected), 1);
    assert_int_equal(counter(&p->stats.ejections_refused), 0);

    sl_endpoint_set_unref(s);
    sl_pool_free(p);
    free(u);
}

/* ---- probes -------------------------------------------------------------------------------- */

static void test_probe_cycle(void **state)
{
    (void)state;
    struct up *u = up_new(1);
    u->conf.passive.consecutive_failures = 1;
    u->conf.passive.ejection_ms = 1000;
    u->conf.passive.max_ejection_ms = 2500;
    u->conf.passive.half_open_requests = 1;
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    struct sl_endpoint_set *s = sl_pool_acquire_set(p);
    struct sl_endpoint *ep = s->eps[0];

    sl_endpoint_report(ep, s, SL_OUTCOME_CONNECT_FAILURE, false, T0);
    assert_int_equal(ep_state(ep), SL_EP_OPEN);
    assert_int_equal(atomic_load(&ep->open_until_ms), T0 + 1000);

    /* not before open_until */
    assert_false(sl_endpoint_try_probe(ep, T0));
    assert_false(sl_endpoint_try_probe(ep, T0 + 999));
    assert_int_equal(ep_state(ep), SL_EP_OPEN);
    assert_int_equal(counter(&p->stats.half_opens), 0);

    /* once after it; a second caller gets nothing while the probe is out */
    assert_true(sl_endpoint_try_probe(ep, T0 + 1000));
    assert_int_equal(ep_state(ep), SL_EP_HALF_OPEN);
    assert_int_equal(counter(&p->stats.half_opens), 1);
    assert_false(sl_endpoint_try_probe(ep, T0 + 1000));
    assert_false(sl_endpoint_try_probe(ep, T0 + 5000));
    assert_false(sl_endpoint_is_healthy(ep));

    /* a cancelled probe gives its slot back */
    sl_endpoint_report(ep, s, SL_OUTCOME_CANCELLED, true, T0 + 1100);
    assert_int_equal(ep_state(ep), SL_EP_HALF_OPEN);
    assert_true(sl_endpoint_try_probe(ep, T0 + 1100));
    assert_false(sl_endpoint_try_probe(ep, T0 + 1100));

    /* the probe fails: open again for 2 x ejection */
    sl_endpoint_report(ep, s, SL_OUTCOME_CONNECT_FAILURE, true, T0 + 1200);
    assert_int_equal(ep_state(ep), SL_EP_OPEN);
    assert_int_equal(atomic_load(&ep->open_until_ms), T0 + 1200 + 2000);
    assert_int_equal(counter(&p->stats.reopens), 1);
    assert_int_equal(atomic_load(&p->ejected), 1);
    assert_false(sl_endpoint_try_probe(ep, T0 + 3199));

    /* fails again: 3 x ejection = 3000, capped at max_ejection 2500 */
    assert_true(sl_endpoint_try_probe(ep, T0 + 3200));
    sl_endpoint_report(ep, s, SL_OUTCOME_TIMEOUT, true, T0 + 3200);
    assert_int_equal(ep_state(ep), SL_EP_OPEN);
    assert_int_equal(atomic_load(&ep->open_until_ms), T0 + 3200 + 2500);
    assert_int_equal(counter(&p->stats.reopens), 2);

    /* the probe succeeds: back in rotation */
    assert_true(sl_endpoint_try_probe(ep, T0 + 5700));
    sl_endpoint_report(ep, s, SL_OUTCOME_SUCCESS, true, T0 + 5700);
    assert_int_equal(ep_state(ep), SL_EP_CLOSED);
    assert_true(sl_endpoint_is_healthy(ep));
    assert_int_equal(counter(&p->stats.restores), 1);
    assert_int_equal(counter(&p->stats.half_opens), 3);
    assert_int_equal(atomic_load(&p->ejected), 0);
    /* a closed endpoint takes no probe */
    assert_false(sl_endpoint_try_probe(ep, T0 + 100000));
    assert_int_equal(ep_state(ep), SL_EP_CLOSED);

    sl_endpoint_set_unref(s);
    sl_pool_free(p);
    free(u);
}

static void test_probe_needs_half_open_requests(void **state)
{
    (void)state;
    struct up *u = up_new(1);
    u->conf.passive.consecutive_failures = 1;
    u->conf.passive.ejection_ms = 1000;
    u->conf.passive.half_open_requests = 2;
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    struct sl_endpoint_set *s = sl_pool_acquire_set(p);
    struct sl_endpoint *ep = s->eps[0];

    sl_endpoint_report(ep, s, SL_OUTCOME_CONNECT_FAILURE, false, T0);
    assert_true(sl_endpoint_try_probe(ep, T0 + 1000));
    assert_true(sl_endpoint_try_probe(ep, T0 + 1000));
    assert_false(sl_endpoint_try_probe(ep, T0 + 1000)); /* two out */
    sl_endpoint_report(ep, s, SL_OUTCOME_SUCCESS, true, T0 + 1001);
    assert_int_equal(ep_state(ep), SL_EP_HALF_OPEN); /* one of two */
    assert_false(sl_endpoint_try_probe(ep, T0 + 1001));
    sl_endpoint_report(ep, s, SL_OUTCOME_SUCCESS, true, T0 + 1002);
    assert_int_equal(ep_state(ep), SL_EP_CLOSED);
    assert_int_equal(atomic_load(&p->ejected), 0);

    sl_endpoint_set_unref(s);
    sl_pool_free(p);
    free(u);
}

/* ---- forgiveness of ejections in a row ----------------------------------------------------- */

/* Ejects `ep` at `t`, fails one probe, then restores it; returns the time it was restored.
 * After this the endpoint has two ejections in a row behind it. */
static uint64_t eject_twice_then_restore(struct sl_endpoint *ep, const struct sl_endpoint_set *s,
                                         uint64_t t)
{
    sl_endpoint_report(ep, s, SL_OUTCOME_CONNECT_FAILURE, false, t);
    assert_int_equal(atomic_load(&ep->open_until_ms), t + 1000);
    t += 1000;
    assert_true(sl_endpoint_try_probe(ep, t));
    sl_endpoint_report(ep, s, SL_OUTCOME_CONNECT_FAILURE, true, t);
    assert_int_equal(atomic_load(&ep->open_until_ms), t + 2000);
    t += 2000;
    assert_true(sl_endpoint_try_probe(ep, t));
    sl_endpoint_report(ep, s, SL_OUTCOME_SUCCESS, true, t);
    assert_int_equal(ep_state(ep), SL_EP_CLOSED);
    return t;
}

static void test_ejection_count_forgiven(void **state)
{
    (void)state;
    struct up *u = up_new(2);
    u->conf.passive.consecutive_failures = 1;
    u->conf.passive.ejection_ms = 1000;
    u->conf.passive.window_ms = 2000; /* the forgiveness step: max(window, ejection) */
    u->conf.passive.max_ejection_ms = 60000;
    u->conf.passive.max_ejection_percent = 100;
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    struct sl_endpoint_set *s = sl_pool_acquire_set(p);

    /* failing again soon after the return: the third ejection in a row, 3 x 1000 */
    struct sl_endpoint *a = s->eps[0];
    uint64_t t = eject_twice_then_restore(a, s, T0);
    sl_endpoint_report(a, s, SL_OUTCOME_CONNECT_FAILURE, false, t + 100);
    assert_int_equal(ep_state(a), SL_EP_OPEN);
    assert_int_equal(atomic_load(&a->open_until_ms), t + 100 + 3000);

    /* healthy for more than two steps: both forgiven, the next ejection is short again */
    struct sl_endpoint *b = s->eps[1];
    t = eject_twice_then_restore(b, s, T0);
    uint64_t later = t + 2 * 2000 + 1;
    sl_endpoint_report(b, s, SL_OUTCOME_CONNECT_FAILURE, false, later);
    assert_int_equal(ep_state(b), SL_EP_OPEN);
    assert_int_equal(atomic_load(&b->open_until_ms), later + 1000);

    sl_endpoint_set_unref(s);
    sl_pool_free(p);
    free(u);
}

/* ---- retry budget -------------------------------------------------------------------------- */

static void test_retry_budget(void **state)
{
    (void)state;
    struct up *u = up_new(1);
    struct sl_retry_conf rc = u->conf.retries;
    rc.budget_percent = 20;
    rc.min_retries = 10;
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);

    for (int i = 0; i < 100; i++)
        sl_pool_budget_request(p, T0 + (uint64_t)i * 10);
    /* 10 always + 20% of 100 */
    for (int i = 0; i < 30; i++)
        assert_true(sl_pool_budget_retry(p, &rc, T0 + 1000));
    assert_int_equal(counter(&p->stats.retries), 30);
    assert_int_equal(counter(&p->stats.retries_budget_exhausted), 0);
    assert_false(sl_pool_budget_retry(p, &rc, T0 + 1000));
    assert_false(sl_pool_budget_retry(p, &rc, T0 + 2000));
    assert_int_equal(counter(&p->stats.retries_budget_exhausted), 2);
    assert_int_equal(counter(&p->stats.retries), 30);

    /* five more requests buy one more retry */
    for (int i = 0; i < 5; i++)
        sl_pool_budget_request(p, T0 + 2000);
    assert_true(sl_pool_budget_retry(p, &rc, T0 + 2000));
    assert_false(sl_pool_budget_retry(p, &rc, T0 + 2000));

    /* 10 s later requests and retries have aged out: min_retries again, no more */
    uint64_t later = T0 + 2000 + 10000;
    for (int i = 0; i < 10; i++)
        assert_true(sl_pool_budget_retry(p, &rc, later));
    assert_false(sl_pool_budget_retry(p, &rc, later));
    assert_int_equal(counter(&p->stats.retries), 41);
    assert_int_equal(counter(&p->stats.retries_budget_exhausted), 4);

    sl_pool_free(p);
    free(u);
}

/* ---- publishing endpoint sets -------------------------------------------------------------- */

struct recorder {
    struct sl_endpoint_set *sets[16];
    uint32_t refs_at_call[16];
    size_t n;
};

static void on_publish(struct sl_endpoint_set *s, void *ctx)
{
    struct recorder *r = ctx;
    assert_true(r->n < 16);
    r->refs_at_call[r->n] = atomic_load(&s->refs);
    r->sets[r->n++] = s; /* keeps the reference handed over */
}

static void recorder_release(struct recorder *r)
{
    for (size_t i = 0; i < r->n; i++)
        sl_endpoint_set_unref(r->sets[i]);
    r->n = 0;
}

static struct sl_endpoint *find_ep(const struct sl_endpoint_set *s, const char *address)
{
    for (size_t i = 0; i < s->count; i++)
        if (strcmp(s->eps[i]->address, address) == 0)
            return s->eps[i];
    return NULL;
}

static void test_set_source_publishes_on_change(void **state)
{
    (void)state;
    struct up *u = up_new(0);
    u->conf.passive.consecutive_failures = 1;
    u->conf.passive.max_ejection_percent = 100;
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    /* no endpoints in the config: an empty set is current from the start */
    assert_non_null(p->current);
    assert_int_equal(p->current->count, 0);
    uint64_t v0 = atomic_load(&p->version);

    char buf[4][32];
    struct sl_endpoint_spec two[2] = {spec(&buf[0], 1), spec(&buf[1], 2)};
    assert_int_equal(sl_pool_set_source(p, SL_POOL_SRC_DISCOVERY, two, 2), 1);
    assert_int_equal(atomic_load(&p->version), v0 + 1);
    struct sl_endpoint_set *s1 = sl_pool_acquire_set(p);
    assert_int_equal(s1->count, 2);
    assert_int_equal(s1->version, v0 + 1);
    struct sl_endpoint *e1 = find_ep(s1, "10.0.1.1:80");
    struct sl_endpoint *e2 = find_ep(s1, "10.0.1.2:80");
    assert_non_null(e1);
    assert_non_null(e2);

    /* the same list again: nothing published */
    uint64_t updates = counter(&p->stats.updates);
    assert_int_equal(sl_pool_set_source(p, SL_POOL_SRC_DISCOVERY, two, 2), 0);
    assert_int_equal(counter(&p->stats.updates), updates);
    assert_int_equal(atomic_load(&p->version), v0 + 1);
    assert_ptr_equal(p->current, s1);

    /* e1 is ejected, then the list changes: e1 stays the same object, ejected */
    sl_endpoint_report(e1, s1, SL_OUTCOME_CONNECT_FAILURE, false, T0);
    assert_int_equal(ep_state(e1), SL_EP_OPEN);
    struct sl_endpoint_spec next[2] = {spec(&buf[2], 3), spec(&buf[3], 1)};
    assert_int_equal(sl_pool_set_source(p, SL_POOL_SRC_DISCOVERY, next, 2), 1);
    struct sl_endpoint_set *s2 = sl_pool_acquire_set(p);
    assert_int_equal(s2->count, 2);
    assert_true(s2->version > s1->version);
    assert_ptr_equal(find_ep(s2, "10.0.1.1:80"), e1);
    assert_int_equal(ep_state(e1), SL_EP_OPEN);
    assert_int_equal(atomic_load(&e1->open_until_ms), T0 + 5000);
    assert_null(find_ep(s2, "10.0.1.2:80"));
    assert_non_null(find_ep(s2, "10.0.1.3:80"));
    assert_int_equal(atomic_load(&p->ejected), 1);

    /* the old set still holds e2 for whoever uses it */
    assert_ptr_equal(find_ep(s1, "10.0.1.2:80"), e2);
    sl_endpoint_set_unref(s1);
    sl_endpoint_set_unref(s2);
    sl_pool_free(p);
    free(u);
}

/* A name and an IP for the same socket address are one endpoint: the first source's. */
/* A reload's new pool starts from the old one's discovered and admin endpoints (same
 * discovery name) and from the health of the endpoints that stay. */
static void test_inherit(void **state)
{
    (void)state;
    struct up *u = up_new(1); /* config: 10.0.0.1:80 */
    u->conf.discovery.kind = SL_DISCOVERY_DNS;
    u->conf.discovery.name = "api.internal";
    struct sl_pool *old = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(old);
    char b1[32], b2[32];
    struct sl_endpoint_spec disc = spec(&b1, 7), adm = spec(&b2, 8);
    sl_pool_set_source(old, SL_POOL_SRC_DISCOVERY, &disc, 1);
    sl_pool_set_source(old, SL_POOL_SRC_ADMIN, &adm, 1);
    struct sl_endpoint_set *os = sl_pool_acquire_set(old);
    struct sl_endpoint *c1 = find_ep(os, "10.0.0.1:80");
    assert_non_null(c1);
    report_n(c1, os, SL_OUTCOME_CONNECT_FAILURE, 5, 1000); /* ejected */
    assert_int_equal(ep_state(c1), SL_EP_OPEN);

    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    sl_pool_inherit(p, old, 1000);
    struct sl_endpoint_set *ns = sl_pool_acquire_set(p);
    assert_int_equal(ns->count, 3);
    assert_non_null(find_ep(ns, "10.0.1.7:80"));
    assert_non_null(find_ep(ns, "10.0.1.8:80"));
    struct sl_endpoint *n1 = find_ep(ns, "10.0.0.1:80");
    assert_ptr_not_equal(n1, c1);
    assert_int_equal(ep_state(n1), SL_EP_OPEN);
    assert_int_equal(atomic_load(&p->ejected), 1);
    assert_int_equal(ep_state(find_ep(ns, "10.0.1.7:80")), SL_EP_CLOSED);
    sl_endpoint_set_unref(ns);
    sl_pool_free(p);

    /* another discovery name: its endpoints are not carried (the admin's still are) */
    struct sl_upstream_conf other = u->conf;
    other.discovery.name = "other.internal";
    p = sl_pool_new(&other, NULL, 1, NULL, 0);
    assert_non_null(p);
    sl_pool_inherit(p, old, 1000);
    ns = sl_pool_acquire_set(p);
    assert_null(find_ep(ns, "10.0.1.7:80"));
    assert_non_null(find_ep(ns, "10.0.1.8:80"));
    sl_endpoint_set_unref(ns);
    sl_pool_free(p);
    sl_endpoint_set_unref(os);
    sl_pool_free(old);
    free(u);
}

static void test_set_source_dedup_by_socket_address(void **state)
{
    (void)state;
    struct up *u = up_new(1); /* config: 10.0.0.1:80 */

    snprintf(u->addrs[0], sizeof u->addrs[0], "backend.internal:80"); /* resolved to 10.0.0.1 */
    u->eps[0].weight = 2;
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    struct sl_endpoint_spec admin = {0};
    admin.address = "10.0.0.1:80";
    admin.addr = u->eps[0].addr;
    admin.addr_len = u->eps[0].addr_len;
    admin.weight = 1000;
    sl_pool_set_source(p, SL_POOL_SRC_ADMIN, &admin, 1);
    struct sl_endpoint_set *s = sl_pool_acquire_set(p);
    assert_int_equal(s->count, 1);
    assert_string_equal(s->eps[0]->address, "backend.internal:80");
    assert_int_equal(s->eps[0]->weight, 2);
    sl_endpoint_set_unref(s);
    sl_pool_free(p);
    free(u);
}

static void test_set_source_union(void **state)
{
    (void)state;
    struct up *u = up_new(2); /* config: 10.0.0.1:80, 10.0.0.2:80 */
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 1, NULL, 0);
    assert_non_null(p);
    struct sl_endpoint_set *s0 = sl_pool_acquire_set(p);
    assert_int_equal(s0->count, 2);
    struct sl_endpoint *c1 = find_ep(s0, "10.0.0.1:80");
    struct sl_endpoint *c2 = find_ep(s0, "10.0.0.2:80");

    /* the config's own list again is no change */
    struct sl_endpoint_spec cfg[2];
    for (size_t i = 0; i < 2; i++) {
        memset(&cfg[i], 0, sizeof cfg[i]);
        cfg[i].address = u->eps[i].address;
        cfg[i].addr = u->eps[i].addr;
        cfg[i].addr_len = u->eps[i].addr_len;
        cfg[i].weight = u->eps[i].weight;
    }
    assert_int_equal(sl_pool_set_source(p, SL_POOL_SRC_CONFIG, cfg, 2), 0);

    /* discovery adds one new address and repeats one of the config's */
    char buf[1][32];
    struct sl_endpoint_spec disc[2] = {spec(&buf[0], 9), cfg[1]};
    assert_int_equal(sl_pool_set_source(p, SL_POOL_SRC_DISCOVERY, disc, 2), 1);
    struct sl_endpoint_set *s1 = sl_pool_acquire_set(p);
    assert_int_equal(s1->count, 3); /* duplicates removed */
    assert_ptr_equal(find_ep(s1, "10.0.0.1:80"), c1);
    assert_ptr_equal(find_ep(s1, "10.0.0.2:80"), c2);
    struct sl_endpoint *d9 = find_ep(s1, "10.0.1.9:80");
    assert_non_null(d9);
    size_t twice = 0;
    for (size_t i = 0; i < s1->count; i++)
        twice += strcmp(s1->eps[i]->address, "10.0.0.2:80") == 0;
    assert_int_equal(twice, 1);

    /* the config source empties: discovery's two remain, the same objects */
    assert_int_equal(sl_pool_set_source(p, SL_POOL_SRC_CONFIG, NULL, 0), 1);
    struct sl_endpoint_set *s2 = sl_pool_acquire_set(p);
    assert_int_equal(s2->count, 2);
    assert_ptr_equal(find_ep(s2, "10.0.0.2:80"), c2);
    assert_ptr_equal(find_ep(s2, "10.0.1.9:80"), d9);
    assert_null(find_ep(s2, "10.0.0.1:80"));

    /* nothing from any source: an empty set is published (once) */
    assert_int_equal(sl_pool_set_source(p, SL_POOL_SRC_DISCOVERY, NULL, 0), 1);
    struct sl_endpoint_set *s3 = sl_pool_acquire_set(p);
    assert_int_equal(s3->count, 0);
    assert_true(s3->version > s2->version);
    assert_int_equal(sl_pool_set_source(p, SL_POOL_SRC_DISCOVERY, NULL, 0), 0);

    sl_endpoint_set_unref(s0);
    sl_endpoint_set_unref(s1);
    sl_endpoint_set_unref(s2);
    sl_endpoint_set_unref(s3);
    sl_pool_free(p);
    free(u);
}

static void test_set_source_to_workers(void **state)
{
    (void)state;
    struct up *u = up_new(1);
    struct sl_pool *p = sl_pool_new(&u->conf, NULL, 3, NULL, 0);
    assert_non_null(p);

    struct recorder r0 = {0}, r2 = {0};
    struct sl_endpoint_set *cur0 = sl_pool_register_worker(p, 0, on_publish, &r0);
    struct sl_endpoint_set *cur2 = sl_pool_register_worker(p, 2, on_publish, &r2);
    assert_ptr_equal(cur0, p->current);
    assert_ptr_equal(cur2, p->current);
    assert_int_equal(atomic_load(&cur0->refs), 3); /* the pool's and one per worker */
    assert_int_equal(r0.n, 0);

    char buf[2][32];
    struct sl_endpoint_spec d[2] = {spec(&buf[0], 1), spec(&buf[1], 2)};
    assert_int_equal(sl_pool_set_source(p, SL_POOL_SRC_DISCOVERY, d, 2), 1);
    assert_int_equal(r0.n, 1);
    assert_int_equal(r2.n, 1);
    assert_ptr_equal(r0.sets[0], p->current);
    assert_ptr_equal(r2.sets[0], p->current);
    assert_int_equal(r0.sets[0]->count, 3);
    /* each callback got a reference of its own on top of the pool's */
    assert_int_equal(r0.refs_at_call[0], 2);
    assert_int_equal(r2.refs_at_call[0], 3);
    assert_int_equal(atomic_load(&p->current->refs), 3);

    /* no change, no call */
    assert_int_equal(sl_pool_set_source(p, SL_POOL_SRC_DISCOVERY, d, 2), 0);
    assert_int_equal(r0.n, 1);

    /* an unregistered worker gets nothing more */
    sl_pool_unregister_worker(p, 2);
    assert_int_equal(sl_pool_set_source(p, SL_POOL_SRC_DISCOVERY, d, 1), 1);
    assert_int_equal(r0.n, 2);
    assert_int_equal(r2.n, 1);
    assert_int_equal(r0.sets[1]->count, 2);
    assert_int_equal(atomic_load(&r0.sets[1]->refs), 2);

    sl_pool_unregister_worker(p, 0);
    sl_endpoint_set_unref(cur0);
    sl_endpoint_set_unref(cur2);
    recorder_release(&r0);
    recorder_release(&r2);
    sl_pool_free(p);
    free(u);
}

/* The TLS server name: tls.sni, else the host as written, bracketed IPv6 unwrapped, the DNS
 * discovery name for a discovered IP, and NULL when it does not fit. */
static void test_tls_name(void **state)
{
    (void)state;
    struct up *u = up_new(1);
    struct sl_pool p = {.conf = &u->conf};
    struct sl_endpoint ep = {.address = "api.internal:8443"};
    char buf[64];
    assert_string_equal(sl_pool_tls_name(&p, &ep, buf, sizeof buf), "api.internal");
    ep.address = "[2001:db8::1]:443";
    assert_string_equal(sl_pool_tls_name(&p, &ep, buf, sizeof buf), "2001:db8::1");
    ep.address = "10.0.0.1:443";
    assert_string_equal(sl_pool_tls_name(&p, &ep, buf, sizeof buf), "10.0.0.1");
    assert_null(sl_pool_tls_name(&p, &ep, buf, 8));
    u->conf.discovery.kind = SL_DISCOVERY_DNS;
    u->conf.discovery.name = "svc.example";
    assert_string_equal(sl_pool_tls_name(&p, &ep, buf, sizeof buf), "svc.example");
    ep.address = "static.example:443"; /* a host name stays itself */
    assert_string_equal(sl_pool_tls_name(&p, &ep, buf, sizeof buf), "static.example");
    u->conf.tls.sni = "named.example";
    assert_string_equal(sl_pool_tls_name(&p, &ep, buf, sizeof buf), "named.example");
    free(u);
}

int main(void)
{
    sl_log_set_level(SL_LOG_LVL_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_window_add_sum_age_reset),
        cmocka_unit_test(test_window_saturates),
        cmocka_unit_test(test_window_sum_after_epoch_wrap),
        cmocka_unit_test(test_window_add_after_epoch_wrap),
        cmocka_unit_test(test_consecutive_failures_eject),
        cmocka_unit_test(test_consecutive_failures_reset_by_success),
        cmocka_unit_test(test_consecutive_failures_ignore_cancelled),
        cmocka_unit_test(test_failure_ratio),
        cmocka_unit_test(test_failure_ratio_old_requests_age_out),
        cmocka_unit_test(test_passive_disabled_never_ejects),
        cmocka_unit_test(test_max_ejection_percent),
        cmocka_unit_test(test_max_ejection_percent_single_endpoint),
        cmocka_unit_test(test_probe_cycle),
        cmocka_unit_test(test_probe_needs_half_open_requests),
        cmocka_unit_test(test_ejection_count_forgiven),
        cmocka_unit_test(test_retry_budget),
        cmocka_unit_test(test_set_source_publishes_on_change),
        cmocka_unit_test(test_set_source_union),
        cmocka_unit_test(test_set_source_dedup_by_socket_address),
        cmocka_unit_test(test_inherit),
        cmocka_unit_test(test_set_source_to_workers),
        cmocka_unit_test(test_tls_name),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
