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
#include "core/loop.h"
#include "core/worker.h"
#include "proxy/pool.h"
#include "proxy/upstream.h"

/*
 * One worker's view of a shared pool: sl_upstream_pick / sl_upstream_done over a real
 * struct sl_upstream_rt on a real loop (worker 1 of 2, so the per-worker slot is not slot 0).
 * Time is the loop's cached now_ms, set directly; new sets reach the worker through the
 * loop's post queue, so tests run one loop turn to install them. Upstreams are built by hand.
 */

#define MAX_EP 8
#define T0 1000000u
#define WORKER_ID 1

/* ---- fixtures ------------------------------------------------------------------------------ */

struct up {
    struct sl_upstream_conf conf;
    struct sl_endpoint_conf eps[MAX_EP];
    char addrs[MAX_EP][32];
};

static void fill_addr(struct sockaddr_storage *ss, socklen_t *len, uint32_t ip)
{
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *sin = (struct sockaddr_in *)ss;
    sin->sin_family = AF_INET;
    sin->sin_port = htons(80);
    sin->sin_addr.s_addr = htonl(ip);
    *len = sizeof *sin;
}

/* `n` endpoints 10.0.0.1:80, ... with the documented defaults; zone_aware off. */
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
    c->passive.min_requests = 20;
    c->passive.window_ms = 10000;
    c->passive.ejection_ms = 1000;
    c->passive.max_ejection_ms = 300000;
    c->passive.max_ejection_percent = 100;
    c->passive.half_open_requests = 1;
    c->retries.budget_percent = 20;
    c->retries.min_retries = 10;
    c->zone_aware.panic_percent = 50;
    for (size_t i = 0; i < n; i++) {
        snprintf(u->addrs[i], sizeof u->addrs[i], "10.0.0.%zu:80", i + 1);
        fill_addr(&u->eps[i].addr, &u->eps[i].addr_len, 0x0a000000u + (uint32_t)i + 1);
        u->eps[i].address = u->addrs[i];
        u->eps[i].weight = 1;
    }
    return u;
}

struct fx {
    struct up *u;
    struct sl_pool *pool;
    struct sl_worker w;
    struct sl_upstream_rt up;
};

static struct fx *fx_new(struct up *u, const char *local_zone)
{
    struct fx *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->u = u;
    f->pool = sl_pool_new(&u->conf, local_zone, 2, NULL, 0);
    assert_non_null(f->pool);
    f->w.id = WORKER_ID;
    assert_int_equal(sl_loop_init(&f->w.loop), 0);
    sl_bpool_init(&f->w.buf_pool, 4096, 4);
    f->w.loop.now_ms = T0;
    assert_int_equal(sl_upstream_rt_init(&f->up, f->pool, &f->w), 0);
    assert_ptr_equal(f->up.set, f->pool->current);
    return f;
}

static void fx_free(struct fx *f)
{
    sl_upstream_rt_dispose(&f->up);
    sl_pool_free(f->pool);
    sl_loop_dispose(&f->w.loop);
    sl_bpool_dispose(&f->w.buf_pool);
    free(f->u);
    free(f);
}

static void on_wake_stop(struct sl_loop *loop, void *data)
{
    (void)data;
    sl_loop_stop(loop);
}

/* Runs one loop turn so that a set the pool posted is installed; keeps the test's time. */
static void run_posts(struct fx *f)
{
    assert_int_equal(atomic_load(&f->up.post.queued), 1); /* else the turn would block */
    uint64_t now = f->w.loop.now_ms;
    f->w.loop.on_wake = on_wake_stop;
    sl_loop_run(&f->w.loop);
    f->w.loop.on_wake = NULL;
    f->w.loop.now_ms = now;
}

static void set_now(struct fx *f, uint64_t now)
{
    f->w.loop.now_ms = now;
}

static struct sl_endpoint *ep_at(struct fx *f, size_t i)
{
    assert_true(i < f->up.set->count);
    return f->up.set->eps[i];
}

/* Ejects endpoint `i` of the worker's set with consecutive failures at the loop's time. */
static void eject(struct fx *f, size_t i)
{
    struct sl_endpoint *ep = ep_at(f, i);
    for (uint32_t k = 0; k < f->u->conf.passive.consecutive_failures; k++)
        sl_endpoint_report(ep, f->up.set, SL_OUTCOME_CONNECT_FAILURE, false, f->w.loop.now_ms);
    assert_int_equal(atomic_load(&ep->state), SL_EP_OPEN);
}

/* One attempt that succeeds at once; returns the set index picked (or -1). */
static int pick_ok(struct fx *f, struct sl_endpoint *const *tried, size_t n)
{
    bool probe = true;
    enum sl_pick_fail why = 0;
    struct sl_wep *w = sl_upstream_pick(&f->up, NULL, tried, n, &probe, &why);
    if (!w)
        return -1;
    assert_false(probe);
    int idx = w->index;
    sl_upstream_done(&f->up, w, SL_OUTCOME_SUCCESS, probe);
    return idx;
}

/* `rounds` successful picks counted per set index into `count`. */
static void pick_many(struct fx *f, unsigned rounds, unsigned *count, size_t n)
{
    memset(count, 0, n * sizeof *count);
    for (unsigned r = 0; r < rounds; r++) {
        int idx = pick_ok(f, NULL, 0);
        assert_true(idx >= 0 && (size_t)idx < n);
        count[idx]++;
    }
}

/* ---- tried, ejected, none healthy ---------------------------------------------------------- */

static void test_pick_never_tried(void **state)
{
    (void)state;
    struct fx *f = fx_new(up_new(3), NULL);
    struct sl_endpoint *e0 = ep_at(f, 0), *e1 = ep_at(f, 1), *e2 = ep_at(f, 2);

    struct sl_endpoint *tried2[2] = {e0, e1};
    for (int i = 0; i < 50; i++)
        assert_int_equal(pick_ok(f, tried2, 2), 2);

    struct sl_endpoint *tried1[1] = {e2};
    unsigned seen[3] = {0};
    for (int i = 0; i < 100; i++) {
        int idx = pick_ok(f, tried1, 1);
        assert_true(idx == 0 || idx == 1);
        seen[idx]++;
    }
    assert_true(seen[0] > 0 && seen[1] > 0);

    struct sl_endpoint *all[3] = {e0, e1, e2};
    bool probe = true;
    enum sl_pick_fail why = 0;
    assert_null(sl_upstream_pick(&f->up, NULL, all, 3, &probe, &why));
    assert_int_equal(why, SL_PICK_ALL_TRIED);
    assert_false(probe);
    fx_free(f);
}

static void test_pick_skips_ejected(void **state)
{
    (void)state;
    struct fx *f = fx_new(up_new(3), NULL);
    unsigned c[3];
    pick_many(f, 30, c, 3);
    assert_true(c[1] > 0);

    eject(f, 1);
    pick_many(f, 300, c, 3);
    assert_int_equal(c[1], 0);
    assert_true(c[0] > 100);
    assert_true(c[2] > 100);
    fx_free(f);
}

static void test_pick_none_healthy(void **state)
{
    (void)state;
    struct fx *f = fx_new(up_new(3), NULL);
    for (size_t i = 0; i < 3; i++)
        eject(f, i);

    bool probe = true;
    enum sl_pick_fail why = 0;
    assert_null(sl_upstream_pick(&f->up, NULL, NULL, 0, &probe, &why));
    assert_int_equal(why, SL_PICK_NONE_HEALTHY);
    assert_false(probe);

    /* some tried, the rest ejected: still "none healthy" */
    struct sl_endpoint *tried[1] = {ep_at(f, 0)};
    why = 0;
    assert_null(sl_upstream_pick(&f->up, NULL, tried, 1, &probe, &why));
    assert_int_equal(why, SL_PICK_NONE_HEALTHY);

    /* still inside the ejection: no probe either */
    set_now(f, T0 + 999);
    why = 0;
    assert_null(sl_upstream_pick(&f->up, NULL, NULL, 0, &probe, &why));
    assert_int_equal(why, SL_PICK_NONE_HEALTHY);
    fx_free(f);
}

static void test_pick_no_endpoints(void **state)
{
    (void)state;
    struct fx *f = fx_new(up_new(0), NULL);
    bool probe = true;
    enum sl_pick_fail why = 0;
    assert_null(sl_upstream_pick(&f->up, NULL, NULL, 0, &probe, &why));
    assert_int_equal(why, SL_PICK_NO_ENDPOINTS);
    assert_false(probe);
    fx_free(f);
}

/* ---- probes -------------------------------------------------------------------------------- */

static void test_pick_due_probe(void **state)
{
    (void)state;
    struct fx *f = fx_new(up_new(3), NULL);
    struct sl_endpoint *e1 = ep_at(f, 1);
    eject(f, 1); /* open until T0 + 1000 */
    unsigned c[3];

    set_now(f, T0 + 999);
    pick_many(f, 30, c, 3);
    assert_int_equal(c[1], 0);

    /* due, but this request already tried it: not its probe */
    set_now(f, T0 + 1000);
    struct sl_endpoint *tried[1] = {e1};
    assert_true(pick_ok(f, tried, 1) != 1);
    assert_int_equal(atomic_load(&e1->state), SL_EP_OPEN);

    /* the next pick is the probe */
    bool probe = false;
    enum sl_pick_fail why = 0;
    struct sl_wep *w = sl_upstream_pick(&f->up, NULL, NULL, 0, &probe, &why);
    assert_non_null(w);
    assert_ptr_equal(w->ep, e1);
    assert_true(probe);
    assert_int_equal(atomic_load(&e1->state), SL_EP_HALF_OPEN);
    assert_int_equal(sl_balancer_inflight(f->up.bal, 1), 1);

    /* while the probe is out, ordinary picks go elsewhere */
    pick_many(f, 30, c, 3);
    assert_int_equal(c[1], 0);

    /* the client of the probe went away: the slot goes to the next request */
    sl_upstream_done(&f->up, w, SL_OUTCOME_CANCELLED, true);
    assert_int_equal(atomic_load(&e1->state), SL_EP_HALF_OPEN);
    assert_int_equal(sl_balancer_inflight(f->up.bal, 1), 0);
    w = sl_upstream_pick(&f->up, NULL, NULL, 0, &probe, &why);
    assert_non_null(w);
    assert_ptr_equal(w->ep, e1);
    assert_true(probe);

    /* the probe fails: ejected again for 2 x ejection */
    set_now(f, T0 + 1100);
    sl_upstream_done(&f->up, w, SL_OUTCOME_CONNECT_FAILURE, true);
    assert_int_equal(atomic_load(&e1->state), SL_EP_OPEN);
    assert_int_equal(atomic_load(&e1->open_until_ms), T0 + 1100 + 2000);
    assert_int_equal(sl_balancer_inflight(f->up.bal, 1), 0);
    set_now(f, T0 + 3099);
    pick_many(f, 30, c, 3);
    assert_int_equal(c[1], 0);

    /* the next probe succeeds: in rotation again */
    set_now(f, T0 + 3100);
    w = sl_upstream_pick(&f->up, NULL, NULL, 0, &probe, &why);
    assert_non_null(w);
    assert_ptr_equal(w->ep, e1);
    assert_true(probe);
    sl_upstream_done(&f->up, w, SL_OUTCOME_SUCCESS, true);
    assert_int_equal(atomic_load(&e1->state), SL_EP_CLOSED);
    assert_int_equal(atomic_load(&f->pool->ejected), 0);
    pick_many(f, 30, c, 3);
    assert_true(c[1] > 0);
    fx_free(f);
}

/* ---- zones and panic ----------------------------------------------------------------------- */

/* 2 endpoints in az-a (this instance's zone), 4 in az-b. */
static struct fx *zoned_fx(void)
{
    struct up *u = up_new(6);
    u->conf.zone_aware.enabled = true;
    u->conf.zone_aware.panic_percent = 50;
    for (size_t i = 0; i < 6; i++)
        u->eps[i].zone = i < 2 ? "az-a" : "az-b";
    struct fx *f = fx_new(u, "az-a");
    for (size_t i = 0; i < 6; i++)
        assert_int_equal(ep_at(f, i)->local, i < 2);
    return f;
}

static void test_pick_zone_aware(void **state)
{
    (void)state;
    struct fx *f = zoned_fx();
    unsigned c[6];

    /* the local zone whole: all of it local */
    pick_many(f, 1000, c, 6);
    assert_true(c[0] > 0 && c[1] > 0);
    assert_int_equal(c[0] + c[1], 1000);

    /* half the local capacity gone: about half spills to the other zone */
    eject(f, 0);
    pick_many(f, 10000, c, 6);
    assert_int_equal(c[0], 0);
    unsigned remote = c[2] + c[3] + c[4] + c[5];
    assert_true(remote > 4000 && remote < 6000);
    assert_int_equal(c[1] + remote, 10000);
    for (size_t i = 2; i < 6; i++)
        assert_true(c[i] > 0);

    /* no local capacity left: all remote (4 of 6 healthy is no panic) */
    eject(f, 1);
    pick_many(f, 1000, c, 6);
    assert_int_equal(c[0] + c[1], 0);
    for (size_t i = 2; i < 6; i++)
        assert_true(c[i] > 150);
    fx_free(f);
}

static void test_pick_zone_aware_tried_local(void **state)
{
    (void)state;
    struct fx *f = zoned_fx();
    /* both local endpoints tried: the retry goes to the other zone rather than failing */
    struct sl_endpoint *tried[2] = {ep_at(f, 0), ep_at(f, 1)};
    for (int i = 0; i < 20; i++) {
        int idx = pick_ok(f, tried, 2);
        assert_true(idx >= 2);
    }
    fx_free(f);
}

static void test_pick_panic(void **state)
{
    (void)state;
    struct up *u = up_new(4);
    u->conf.zone_aware.enabled = true; /* panic_threshold lives under zone_aware */
    u->conf.zone_aware.panic_percent = 50;
    struct fx *f = fx_new(u, NULL);
    unsigned c[4];

    /* 2 of 4 healthy = 50%: not below the threshold, ejected ones stay out */
    eject(f, 0);
    eject(f, 1);
    pick_many(f, 400, c, 4);
    assert_int_equal(c[0] + c[1], 0);
    assert_int_equal(c[2] + c[3], 400);

    /* 1 of 4 healthy = 25%: panic, every endpoint takes traffic */
    eject(f, 2);
    pick_many(f, 400, c, 4);
    for (size_t i = 0; i < 4; i++)
        assert_true(c[i] >= 50);
    /* panic does not restore anyone */
    for (size_t i = 0; i < 3; i++)
        assert_int_equal(atomic_load(&ep_at(f, i)->state), SL_EP_OPEN);
    fx_free(f);
}

/* ---- a new set on the worker --------------------------------------------------------------- */

static struct sl_wep *pick_only(struct fx *f, struct sl_endpoint *const *tried, size_t n)
{
    bool probe = true;
    enum sl_pick_fail why = 0;
    struct sl_wep *w = sl_upstream_pick(&f->up, NULL, tried, n, &probe, &why);
    assert_non_null(w);
    assert_false(probe);
    return w;
}

static void test_new_set_keeps_inflight_and_frees_removed(void **state)
{
    (void)state;
    struct fx *f = fx_new(up_new(4), NULL); /* endpoints a, b, d, e */
    struct sl_endpoint *ea = ep_at(f, 0), *eb = ep_at(f, 1), *ed = ep_at(f, 2), *ee = ep_at(f, 3);
    sl_endpoint_ref(ed); /* the test's own references, to look at them after removal */
    sl_endpoint_ref(ee);

    struct sl_endpoint *not_a[3] = {eb, ed, ee}, *not_d[3] = {ea, eb, ee};
    struct sl_wep *wa1 = pick_only(f, not_a, 3);
    struct sl_wep *wa2 = pick_only(f, not_a, 3);
    struct sl_wep *wd = pick_only(f, not_d, 3);
    assert_ptr_equal(wa1->ep, ea);
    assert_ptr_equal(wa2, wa1);
    assert_ptr_equal(wd->ep, ed);
    assert_int_equal(sl_balancer_inflight(f->up.bal, 0), 2);
    assert_int_equal(sl_balancer_inflight(f->up.bal, 2), 1);
    assert_ptr_equal(ea->wslot[WORKER_ID], wa1);

    /* the pool now says c, b, a: a moves to index 2, c is new, d and e leave */
    struct sl_endpoint_spec specs[3];
    memset(specs, 0, sizeof specs);
    specs[0].address = "10.0.0.9:80";
    fill_addr(&specs[0].addr, &specs[0].addr_len, 0x0a000009u);
    specs[0].weight = 1;
    for (size_t i = 1; i < 3; i++) {
        const struct sl_endpoint_conf *e = &f->u->eps[2 - i]; /* b, then a */
        specs[i].address = e->address;
        specs[i].addr = e->addr;
        specs[i].addr_len = e->addr_len;
        specs[i].weight = e->weight;
    }
    assert_int_equal(sl_pool_set_source(f->pool, SL_POOL_SRC_CONFIG, specs, 3), 1);
    /* not installed before the worker's loop runs */
    assert_int_equal(f->up.set->count, 4);
    run_posts(f);
    assert_ptr_equal(f->up.set, f->pool->current);
    assert_int_equal(f->up.set->count, 3);
    assert_ptr_equal(ep_at(f, 2), ea);
    assert_ptr_equal(ep_at(f, 1), eb);

    /* a keeps its per-worker state and its two attempts in flight, at its new index */
    assert_ptr_equal(ea->wslot[WORKER_ID], wa1);
    assert_int_equal(wa1->index, 2);
    assert_int_equal(sl_balancer_inflight(f->up.bal, 2), 2);
    assert_int_equal(sl_balancer_inflight(f->up.bal, 1), 0);
    assert_int_equal(sl_balancer_inflight(f->up.bal, 0), 0);

    /* e was unused: its per-worker state is gone with the set, only the test's ref is left */
    assert_null(ee->wslot[WORKER_ID]);
    assert_int_equal(atomic_load(&ee->refs), 1);

    /* d is still in use: kept (out of the set) until that attempt ends */
    assert_ptr_equal(ed->wslot[WORKER_ID], wd);
    assert_int_equal(wd->index, -1);
    assert_int_equal(atomic_load(&ed->refs), 2);
    unsigned c[3];
    pick_many(f, 30, c, 3);
    assert_int_equal(c[0], 10); /* c, b, a in turn; d never */
    assert_int_equal(c[1], 10);
    assert_int_equal(c[2], 10);
    sl_upstream_done(&f->up, wd, SL_OUTCOME_SUCCESS, false);
    assert_null(ed->wslot[WORKER_ID]);
    assert_int_equal(atomic_load(&ed->refs), 1);

    sl_upstream_done(&f->up, wa1, SL_OUTCOME_SUCCESS, false);
    sl_upstream_done(&f->up, wa2, SL_OUTCOME_SUCCESS, false);
    assert_int_equal(sl_balancer_inflight(f->up.bal, 2), 0);
    assert_int_equal(wa1->users, 0);

    sl_endpoint_unref(ed);
    sl_endpoint_unref(ee);
    fx_free(f);
}

static void test_two_sets_before_a_turn_install_the_last(void **state)
{
    (void)state;
    struct fx *f = fx_new(up_new(2), NULL);
    struct sl_endpoint_spec s[1];
    memset(s, 0, sizeof s);
    s[0].address = "10.0.0.9:80";
    fill_addr(&s[0].addr, &s[0].addr_len, 0x0a000009u);
    assert_int_equal(sl_pool_set_source(f->pool, SL_POOL_SRC_DISCOVERY, s, 1), 1);
    assert_int_equal(sl_pool_set_source(f->pool, SL_POOL_SRC_DISCOVERY, NULL, 0), 1);
    run_posts(f);
    assert_ptr_equal(f->up.set, f->pool->current);
    assert_int_equal(f->up.set->count, 2);
    assert_int_equal(f->up.set->version, atomic_load(&f->pool->version));
    fx_free(f);
}

int main(void)
{
    sl_log_set_level(SL_LOG_LVL_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pick_never_tried),
        cmocka_unit_test(test_pick_skips_ejected),
        cmocka_unit_test(test_pick_none_healthy),
        cmocka_unit_test(test_pick_no_endpoints),
        cmocka_unit_test(test_pick_due_probe),
        cmocka_unit_test(test_pick_zone_aware),
        cmocka_unit_test(test_pick_zone_aware_tried_local),
        cmocka_unit_test(test_pick_panic),
        cmocka_unit_test(test_new_set_keeps_inflight_and_frees_removed),
        cmocka_unit_test(test_two_sets_before_a_turn_install_the_last),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
