#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "config/config.h"
#include "core/hash.h"
#include "proxy/balancer.h"

/* Upstreams are built by hand so these tests do not depend on the YAML loader. */

#define MAX_EP 1000

struct up {
    struct sl_upstream_conf conf;
    struct sl_endpoint_conf eps[MAX_EP];
    char addrs[MAX_EP][32];
};

static struct up *up_new(enum sl_balance policy, size_t n, const uint32_t *weights)
{
    struct up *u = calloc(1, sizeof *u);
    assert_non_null(u);
    assert_true(n <= MAX_EP);
    u->conf.name = "u";
    u->conf.balance = policy;
    u->conf.endpoints = u->eps;
    u->conf.endpoint_count = n;
    for (size_t i = 0; i < n; i++) {
        snprintf(u->addrs[i], sizeof u->addrs[i], "10.0.%zu.%zu:8080", i / 250, i % 250 + 1);
        u->eps[i].address = u->addrs[i];
        u->eps[i].weight = weights ? weights[i] : 1;
    }
    return u;
}

struct lb {
    struct sl_balancer_shared *s;
    struct sl_balancer *b;
};

static struct lb lb_new(const struct up *u)
{
    struct lb l;
    static uint32_t w[MAX_EP];
    static const char *a[MAX_EP];
    for (size_t i = 0; i < u->conf.endpoint_count; i++) {
        w[i] = u->eps[i].weight;
        a[i] = u->eps[i].address;
    }
    l.s = sl_balancer_shared_new(u->conf.balance, w, a, u->conf.endpoint_count);
    assert_non_null(l.s);
    l.b = sl_balancer_new(l.s);
    assert_non_null(l.b);
    sl_balancer_seed(l.b, 42);
    return l;
}

static void lb_free(struct lb *l)
{
    sl_balancer_free(l->b);
    sl_balancer_shared_free(l->s);
}

/* pick immediately followed by a successful release: a steady-state request */
static int pick1(struct sl_balancer *b, const struct sl_pick_ctx *ctx)
{
    int idx = sl_balancer_pick(b, ctx);
    if (idx >= 0)
        sl_balancer_release(b, idx);
    return idx;
}

static uint64_t key_hash(unsigned k)
{
    char buf[32];
    int n = snprintf(buf, sizeof buf, "client-%u", k);
    return sl_hash_bytes(buf, (size_t)n, 0);
}

/* ---- smooth weighted round robin ------------------------------------------------------- */

static void test_swrr_exact_sequence(void **state)
{
    (void)state;
    static const uint32_t w[] = {5, 1, 1};
    static const int expect[] = {0, 0, 1, 0, 2, 0, 0}; /* a a b a c a a */
    struct up *u = up_new(SL_BALANCE_ROUND_ROBIN, 3, w);
    struct lb l = lb_new(u);
    for (int round = 0; round < 3; round++)
        for (size_t i = 0; i < 7; i++)
            assert_int_equal(pick1(l.b, NULL), expect[i]);
    lb_free(&l);
    free(u);
}

static void test_swrr_proportional(void **state)
{
    (void)state;
    static const uint32_t w[] = {3, 2, 1, 10, 1};
    struct up *u = up_new(SL_BALANCE_ROUND_ROBIN, 5, w);
    struct lb l = lb_new(u);
    unsigned counts[5] = {0};
    /* 17 = sum of weights: every full cycle is exactly proportional */
    for (int i = 0; i < 17 * 100; i++)
        counts[pick1(l.b, NULL)]++;
    for (int i = 0; i < 5; i++)
        assert_int_equal(counts[i], w[i] * 100);
    lb_free(&l);
    free(u);
}

static void test_swrr_exclusion(void **state)
{
    (void)state;
    static const uint32_t w[] = {5, 1, 1};
    struct up *u = up_new(SL_BALANCE_ROUND_ROBIN, 3, w);
    struct lb l = lb_new(u);
    int ex0[] = {0};
    struct sl_pick_ctx ctx = {.exclude = ex0, .exclude_count = 1};
    unsigned counts[3] = {0};
    for (int i = 0; i < 100; i++)
        counts[pick1(l.b, &ctx)]++;
    assert_int_equal(counts[0], 0);
    assert_int_equal(counts[1], 50);
    assert_int_equal(counts[2], 50);

    int all[] = {2, 0, 1, 1, 99, -1};
    struct sl_pick_ctx none = {.exclude = all, .exclude_count = 6};
    assert_int_equal(sl_balancer_pick(l.b, &none), -1);
    /* duplicates and out-of-range entries do not hide the one eligible endpoint */
    int dup[] = {0, 0, 2, 7, -3};
    struct sl_pick_ctx one = {.exclude = dup, .exclude_count = 5};
    for (int i = 0; i < 10; i++)
        assert_int_equal(pick1(l.b, &one), 1);
    lb_free(&l);
    free(u);
}

static void test_inflight_counts(void **state)
{
    (void)state;
    struct up *u = up_new(SL_BALANCE_ROUND_ROBIN, 2, NULL);
    struct lb l = lb_new(u);
    int a = sl_balancer_pick(l.b, NULL);
    int b = sl_balancer_pick(l.b, NULL);
    int c = sl_balancer_pick(l.b, NULL);
    assert_int_equal(a, 0);
    assert_int_equal(b, 1);
    assert_int_equal(c, 0);
    assert_int_equal(sl_balancer_inflight(l.b, 0), 2);
    assert_int_equal(sl_balancer_inflight(l.b, 1), 1);

    sl_balancer_release(l.b, a);
    sl_balancer_release(l.b, c);
    sl_balancer_release(l.b, b);
    assert_int_equal(sl_balancer_inflight(l.b, 0), 0);
    assert_int_equal(sl_balancer_inflight(l.b, 1), 0);

    /* carried over to a new set's balancer */
    sl_balancer_set_inflight(l.b, 1, 7);
    assert_int_equal(sl_balancer_inflight(l.b, 1), 7);

    /* bad indexes are ignored rather than corrupting state */
    sl_balancer_release(l.b, -1);
    sl_balancer_release(l.b, 2);
    sl_balancer_set_inflight(l.b, 2, 9);
    sl_balancer_release(l.b, 0); /* nothing in flight: stays 0 */
    assert_int_equal(sl_balancer_inflight(l.b, 0), 0);
    assert_int_equal(sl_balancer_inflight(l.b, 5), 0);
    lb_free(&l);
    free(u);
}

static void test_no_endpoints(void **state)
{
    (void)state;
    for (int p = SL_BALANCE_ROUND_ROBIN; p <= SL_BALANCE_HASH; p++) {
        struct up *u = up_new((enum sl_balance)p, 0, NULL);
        struct lb l = lb_new(u);
        struct sl_pick_ctx ctx = {.hash = 1, .has_hash = true};
        assert_int_equal(sl_balancer_pick(l.b, &ctx), -1);
        assert_int_equal(sl_balancer_pick(l.b, NULL), -1);
        lb_free(&l);
        free(u);
    }
}

/* ---- least request (P2C) --------------------------------------------------------------- */

static void test_p2c_prefers_less_loaded(void **state)
{
    (void)state;
    struct up *u = up_new(SL_BALANCE_LEAST_REQUEST, 10, NULL);
    struct lb l = lb_new(u);
    /* hold 5 requests on endpoint 0 by excluding everyone else */
    int others[] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    struct sl_pick_ctx only0 = {.exclude = others, .exclude_count = 9};
    for (int i = 0; i < 5; i++)
        assert_int_equal(sl_balancer_pick(l.b, &only0), 0);
    assert_int_equal(sl_balancer_inflight(l.b, 0), 5);
    unsigned counts[10] = {0};
    for (int i = 0; i < 5000; i++)
        counts[pick1(l.b, NULL)]++;
    /* endpoint 0 loses every comparison it takes part in */
    assert_int_equal(counts[0], 0);
    for (int i = 1; i < 10; i++)
        assert_in_range(counts[i], 5000 / 9 * 8 / 10, 5000 / 9 * 12 / 10);
    lb_free(&l);
    free(u);
}

static void test_p2c_balances_held_requests(void **state)
{
    (void)state;
    struct up *u = up_new(SL_BALANCE_LEAST_REQUEST, 4, NULL);
    struct lb l = lb_new(u);
    /* requests that never finish: P2C keeps the in-flight counts close together */
    for (int i = 0; i < 400; i++)
        assert_true(sl_balancer_pick(l.b, NULL) >= 0);
    for (int i = 0; i < 4; i++)
        assert_in_range(sl_balancer_inflight(l.b, i), 95, 105);
    lb_free(&l);
    free(u);
}

static void test_p2c_weights(void **state)
{
    (void)state;
    static const uint32_t w[] = {1, 3};
    struct up *u = up_new(SL_BALANCE_LEAST_REQUEST, 2, w);
    struct lb l = lb_new(u);
    /* held requests end up spread in proportion to weight */
    for (int i = 0; i < 400; i++)
        assert_true(sl_balancer_pick(l.b, NULL) >= 0);
    assert_in_range(sl_balancer_inflight(l.b, 0), 98, 102);
    assert_in_range(sl_balancer_inflight(l.b, 1), 298, 302);
    lb_free(&l);
    free(u);
}

static void test_p2c_exclusion(void **state)
{
    (void)state;
    struct up *u = up_new(SL_BALANCE_LEAST_REQUEST, 5, NULL);
    struct lb l = lb_new(u);
    int ex[] = {0, 3, 4};
    struct sl_pick_ctx ctx = {.exclude = ex, .exclude_count = 3};
    unsigned counts[5] = {0};
    for (int i = 0; i < 2000; i++)
        counts[pick1(l.b, &ctx)]++;
    assert_int_equal(counts[0] + counts[3] + counts[4], 0);
    assert_in_range(counts[1], 800, 1200);
    assert_in_range(counts[2], 800, 1200);

    int ex4[] = {0, 1, 3, 4};
    struct sl_pick_ctx one = {.exclude = ex4, .exclude_count = 4};
    assert_int_equal(pick1(l.b, &one), 2);
    int all[] = {4, 3, 2, 1, 0};
    struct sl_pick_ctx none = {.exclude = all, .exclude_count = 5};
    assert_int_equal(sl_balancer_pick(l.b, &none), -1);
    lb_free(&l);
    free(u);
}

/* A large pool with a mask takes the sampling path: masked endpoints are never picked, every
 * eligible one is, the least loaded of two draws wins, and a nearly empty mask still finds
 * the few eligible endpoints (the counting fallback). */
static void test_p2c_mask_large_pool(void **state)
{
    (void)state;
    struct up *u = up_new(SL_BALANCE_LEAST_REQUEST, 100, NULL);
    struct lb l = lb_new(u);
    uint64_t mask[2] = {0, 0};
    for (int i = 0; i < 100; i += 2)
        mask[i / 64] |= 1ull << (i % 64); /* even endpoints only */
    struct sl_pick_ctx ctx = {.mask = mask};
    unsigned counts[100] = {0};
    for (int i = 0; i < 20000; i++)
        counts[pick1(l.b, &ctx)]++;
    for (int i = 0; i < 100; i++) {
        if (i % 2)
            assert_int_equal(counts[i], 0);
        else
            assert_in_range(counts[i], 200, 600);
    }
    /* held requests: in-flight counts stay balanced across the eligible endpoints */
    for (int i = 0; i < 5000; i++)
        assert_true(sl_balancer_pick(l.b, &ctx) % 2 == 0);
    for (int i = 0; i < 100; i += 2)
        assert_in_range(sl_balancer_inflight(l.b, i), 90, 110);
    uint64_t two[2] = {1ull << 7, 1ull << (90 - 64)};
    struct sl_pick_ctx sparse = {.mask = two};
    for (int i = 0; i < 50; i++) {
        int k = pick1(l.b, &sparse);
        assert_true(k == 7 || k == 90);
    }
    lb_free(&l);
    free(u);
}

/* ---- hash (Maglev) --------------------------------------------------------------------- */

static void test_maglev_table_size(void **state)
{
    (void)state;
    struct up *u = up_new(SL_BALANCE_HASH, 3, NULL);
    struct lb l = lb_new(u);
    assert_int_equal(sl_balancer_shared_maglev_size(l.s), 65537);
    lb_free(&l);
    free(u);

    u = up_new(SL_BALANCE_HASH, 700, NULL);
    l = lb_new(u);
    size_t m = sl_balancer_shared_maglev_size(l.s);
    assert_true(m >= 70000);
    for (size_t d = 2; d * d <= m; d++)
        assert_true(m % d != 0);
    lb_free(&l);
    free(u);

    u = up_new(SL_BALANCE_ROUND_ROBIN, 3, NULL);
    l = lb_new(u);
    assert_int_equal(sl_balancer_shared_maglev_size(l.s), 0);
    lb_free(&l);
    free(u);
}

static void test_maglev_consistent_and_even(void **state)
{
    (void)state;
    enum { N = 10, KEYS = 100000 };
    struct up *u = up_new(SL_BALANCE_HASH, N, NULL);
    struct lb l = lb_new(u);
    struct sl_balancer *other_worker = sl_balancer_new(l.s);
    assert_non_null(other_worker);
    unsigned counts[N] = {0};
    for (unsigned k = 0; k < KEYS; k++) {
        struct sl_pick_ctx ctx = {.hash = key_hash(k), .has_hash = true};
        int a = pick1(l.b, &ctx);
        assert_true(a >= 0 && a < N);
        assert_int_equal(pick1(l.b, &ctx), a);
        assert_int_equal(pick1(other_worker, &ctx), a);
        counts[a]++;
    }
    for (int i = 0; i < N; i++)
        assert_in_range(counts[i], KEYS / N * 9 / 10, KEYS / N * 11 / 10);
    sl_balancer_free(other_worker);
    lb_free(&l);
    free(u);
}

static void test_maglev_weights(void **state)
{
    (void)state;
    static const uint32_t w[] = {1, 2, 1};
    enum { KEYS = 80000 };
    struct up *u = up_new(SL_BALANCE_HASH, 3, w);
    struct lb l = lb_new(u);
    unsigned counts[3] = {0};
    for (unsigned k = 0; k < KEYS; k++) {
        struct sl_pick_ctx ctx = {.hash = key_hash(k), .has_hash = true};
        counts[pick1(l.b, &ctx)]++;
    }
    assert_in_range(counts[0], 18000, 22000);
    assert_in_range(counts[1], 36000, 44000);
    assert_in_range(counts[2], 18000, 22000);
    lb_free(&l);
    free(u);
}

/* Removing one of N endpoints must move about 1/N of the keys, not reshuffle everything. */
static void test_maglev_minimal_disruption(void **state)
{
    (void)state;
    enum { N = 10, KEYS = 100000, GONE = 4 };
    struct up *full = up_new(SL_BALANCE_HASH, N, NULL);
    struct up *less = up_new(SL_BALANCE_HASH, N, NULL);
    /* same addresses minus one, so indexes after GONE shift down by one */
    for (int i = GONE; i < N - 1; i++)
        less->eps[i] = full->eps[i + 1];
    less->conf.endpoint_count = N - 1;
    struct lb a = lb_new(full);
    struct lb b = lb_new(less);
    unsigned moved = 0, on_gone = 0;
    for (unsigned k = 0; k < KEYS; k++) {
        struct sl_pick_ctx ctx = {.hash = key_hash(k), .has_hash = true};
        int ia = pick1(a.b, &ctx), ib = pick1(b.b, &ctx);
        const char *aa = full->conf.endpoints[ia].address;
        const char *ab = less->conf.endpoints[ib].address;
        if (ia == GONE)
            on_gone++;
        else if (strcmp(aa, ab) != 0)
            moved++;
    }
    /* keys of the removed endpoint must move; others mostly stay (Maglev trades a little
       extra movement for evenness: allow 3 % of all keys) */
    assert_in_range(on_gone, KEYS / N * 9 / 10, KEYS / N * 11 / 10);
    assert_true(moved < KEYS * 3 / 100);
    lb_free(&a);
    lb_free(&b);
    free(full);
    free(less);
}

static void test_maglev_exclusion(void **state)
{
    (void)state;
    enum { N = 5 };
    struct up *u = up_new(SL_BALANCE_HASH, N, NULL);
    struct lb l = lb_new(u);
    unsigned spread[N] = {0};
    for (unsigned k = 0; k < 2000; k++) {
        struct sl_pick_ctx ctx = {.hash = key_hash(k), .has_hash = true};
        int first = pick1(l.b, &ctx);
        int ex[] = {first};
        ctx.exclude = ex;
        ctx.exclude_count = 1;
        int second = pick1(l.b, &ctx);
        assert_true(second >= 0 && second != first);
        /* the failover choice is itself stable for the key */
        assert_int_equal(pick1(l.b, &ctx), second);
        spread[second]++;
    }
    /* failover does not pile every retry onto one endpoint */
    for (int i = 0; i < N; i++)
        assert_true(spread[i] > 2000 / N / 2);

    int all[] = {0, 1, 2, 3, 4};
    struct sl_pick_ctx none = {.hash = 7, .has_hash = true, .exclude = all, .exclude_count = 5};
    assert_int_equal(sl_balancer_pick(l.b, &none), -1);
    int four[] = {0, 1, 3, 4};
    struct sl_pick_ctx one = {.hash = 7, .has_hash = true, .exclude = four, .exclude_count = 4};
    assert_int_equal(pick1(l.b, &one), 2);
    lb_free(&l);
    free(u);
}

static void test_hash_without_key_is_round_robin(void **state)
{
    (void)state;
    static const uint32_t w[] = {5, 1, 1};
    static const int expect[] = {0, 0, 1, 0, 2, 0, 0};
    struct up *u = up_new(SL_BALANCE_HASH, 3, w);
    struct lb l = lb_new(u);
    struct sl_pick_ctx ctx = {.hash = 12345, .has_hash = false};
    for (size_t i = 0; i < 7; i++)
        assert_int_equal(pick1(l.b, &ctx), expect[i]);
    lb_free(&l);
    free(u);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_swrr_exact_sequence),
        cmocka_unit_test(test_swrr_proportional),
        cmocka_unit_test(test_swrr_exclusion),
        cmocka_unit_test(test_inflight_counts),
        cmocka_unit_test(test_no_endpoints),
        cmocka_unit_test(test_p2c_prefers_less_loaded),
        cmocka_unit_test(test_p2c_balances_held_requests),
        cmocka_unit_test(test_p2c_weights),
        cmocka_unit_test(test_p2c_exclusion),
        cmocka_unit_test(test_p2c_mask_large_pool),
        cmocka_unit_test(test_maglev_table_size),
        cmocka_unit_test(test_maglev_consistent_and_even),
        cmocka_unit_test(test_maglev_weights),
        cmocka_unit_test(test_maglev_minimal_disruption),
        cmocka_unit_test(test_maglev_exclusion),
        cmocka_unit_test(test_hash_without_key_is_round_robin),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
