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
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "l4/ip_limit.h"

/*
 * Per-address connection caps and rates. Every time is an explicit (fake) µs value; the
 * threaded tests check the invariants that matter under contention: a key's count never goes
 * above its cap, and every counted connection is released from the slot that counted it.
 */

#define T0 UINT64_C(1000000000000) /* an arbitrary start, far from 0 */
#define MS UINT64_C(1000)
#define SEC UINT64_C(1000000)

struct addr {
    struct sockaddr_storage ss;
};

static const struct sockaddr *sa(const struct addr *a)
{
    return (const struct sockaddr *)&a->ss;
}

static struct addr ip(const char *text)
{
    struct addr a;
    memset(&a, 0, sizeof a);
    struct sockaddr_in *sin = (struct sockaddr_in *)&a.ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&a.ss;
    if (inet_pton(AF_INET, text, &sin->sin_addr) == 1) {
        sin->sin_family = AF_INET;
        sin->sin_port = htons(1234);
    } else {
        assert_int_equal(inet_pton(AF_INET6, text, &sin6->sin6_addr), 1);
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons(1234);
    }
    return a;
}

/* 10.x.y.z for n */
static struct addr ip_n(uint32_t n)
{
    struct addr a;
    memset(&a, 0, sizeof a);
    struct sockaddr_in *sin = (struct sockaddr_in *)&a.ss;
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = htonl(0x0a000000u + n);
    return a;
}

static struct sl_ip_limit *limit_new(uint32_t max_conns, uint64_t period_us, uint32_t burst,
                                     size_t max_keys)
{
    struct sl_ip_limit_conf c = {
        .max_conns = max_conns, .period_us = period_us, .burst = burst, .max_keys = max_keys};
    int err = 1;
    struct sl_ip_limit *l = sl_ip_limit_new(&c, &err);
    assert_non_null(l);
    assert_int_equal(err, 0);
    return l;
}

static enum sl_ip_limit_reason try(struct sl_ip_limit *l, const struct addr *a, uint64_t now)
{
    enum sl_ip_limit_reason why = (enum sl_ip_limit_reason) - 1;
    bool ok = sl_ip_limit_acquire(l, sa(a), now, &why);
    assert_int_equal(ok, why == SL_IP_LIMIT_OK || why == SL_IP_LIMIT_UNTRACKED);
    return why;
}

static struct sl_ip_limit_stats stats(const struct sl_ip_limit *l)
{
    struct sl_ip_limit_stats s;
    sl_ip_limit_stats(l, &s);
    return s;
}

/* ---- single-threaded --------------------------------------------------------------------- */

static void test_conf_bounds(void **state)
{
    (void)state;
    int err = 0;
    struct sl_ip_limit_conf c = {.max_conns = 1, .max_keys = 0};
    assert_null(sl_ip_limit_new(&c, &err));
    assert_int_equal(err, -EINVAL);
    c.max_keys = 16;
    c.max_conns = SL_IP_LIMIT_MAX_CONNS + 1;
    assert_null(sl_ip_limit_new(&c, &err));
    c.max_conns = SL_IP_LIMIT_MAX_CONNS;
    c.v6_prefix_bits = 129;
    assert_null(sl_ip_limit_new(&c, &err));
    c.v6_prefix_bits = 0;
    c.period_us = 1000 * SEC; /* 1000 s x 10^4 burst: beyond the 2^42 µs horizon */
    c.burst = 10000;
    assert_null(sl_ip_limit_new(&c, &err));
    assert_int_equal(err, -EINVAL);
    c.burst = 100;
    struct sl_ip_limit *l = sl_ip_limit_new(&c, &err);
    assert_non_null(l);
    /* 2 x 16 keys -> 32 slots of 16 bytes */
    assert_int_equal(sl_ip_limit_capacity(l), 32);
    assert_true(sl_ip_limit_memory_bytes(l) >= 32 * 16);
    sl_ip_limit_free(l);
    sl_ip_limit_free(NULL);
    assert_string_equal(sl_ip_limit_reason_name(SL_IP_LIMIT_RATE), "rate");
    assert_string_equal(sl_ip_limit_reason_name(SL_IP_LIMIT_CONNS), "conns");
}

static void test_conn_cap_and_release(void **state)
{
    (void)state;
    struct sl_ip_limit *l = limit_new(3, 0, 0, 1024);
    struct addr a = ip("192.0.2.1"), b = ip("192.0.2.2");
    for (int i = 0; i < 3; i++)
        assert_int_equal(try(l, &a, T0), SL_IP_LIMIT_OK);
    assert_int_equal(sl_ip_limit_count(l, sa(&a)), 3);
    assert_int_equal(try(l, &a, T0), SL_IP_LIMIT_CONNS);
    assert_int_equal(try(l, &a, T0 + 10 * SEC), SL_IP_LIMIT_CONNS); /* time does not help */
    assert_int_equal(sl_ip_limit_count(l, sa(&a)), 3);              /* refusals count nothing */
    assert_int_equal(try(l, &b, T0), SL_IP_LIMIT_OK);               /* another address */
    sl_ip_limit_release(l, sa(&a));
    assert_int_equal(sl_ip_limit_count(l, sa(&a)), 2);
    assert_int_equal(try(l, &a, T0), SL_IP_LIMIT_OK);
    for (int i = 0; i < 3; i++)
        sl_ip_limit_release(l, sa(&a));
    sl_ip_limit_release(l, sa(&b));
    assert_int_equal(sl_ip_limit_count(l, sa(&a)), 0);
    assert_int_equal(sl_ip_limit_count(l, sa(&b)), 0);
    struct sl_ip_limit_stats s = stats(l);
    assert_int_equal(s.refused_conns, 2);
    assert_int_equal(s.refused_rate, 0);
    assert_int_equal(s.unmatched, 0);
    /* One release too many is counted, not wrapped around. */
    sl_ip_limit_release(l, sa(&a));
    assert_int_equal(sl_ip_limit_count(l, sa(&a)), 0);
    assert_int_equal(stats(l).unmatched, 1);
    sl_ip_limit_free(l);
}

static void test_rate_refill(void **state)
{
    (void)state;
    /* 10 per second, burst 2: three at once, then one per 100 ms. */
    struct sl_ip_limit *l = limit_new(0, 100 * MS, 2, 1024);
    struct addr a = ip("198.51.100.7");
    for (int i = 0; i < 3; i++)
        assert_int_equal(try(l, &a, T0), SL_IP_LIMIT_OK);
    assert_int_equal(try(l, &a, T0), SL_IP_LIMIT_RATE);
    assert_int_equal(try(l, &a, T0 + 100 * MS - 1), SL_IP_LIMIT_RATE);
    assert_int_equal(try(l, &a, T0 + 100 * MS), SL_IP_LIMIT_OK);
    assert_int_equal(try(l, &a, T0 + 100 * MS), SL_IP_LIMIT_RATE);
    /* Refusals do not use up the rate: exactly one more per period. */
    for (int k = 2; k < 10; k++) {
        assert_int_equal(try(l, &a, T0 + (uint64_t)k * 100 * MS), SL_IP_LIMIT_OK);
        assert_int_equal(try(l, &a, T0 + (uint64_t)k * 100 * MS + 50 * MS), SL_IP_LIMIT_RATE);
    }
    /* After a quiet second the whole burst is back. */
    uint64_t later = T0 + 3 * SEC;
    for (int i = 0; i < 3; i++)
        assert_int_equal(try(l, &a, later), SL_IP_LIMIT_OK);
    assert_int_equal(try(l, &a, later), SL_IP_LIMIT_RATE);
    assert_int_equal(stats(l).refused_rate, 12);
    /* No cap: nothing is counted, release is a no-op. */
    assert_int_equal(sl_ip_limit_count(l, sa(&a)), 0);
    sl_ip_limit_release(l, sa(&a));
    assert_int_equal(stats(l).unmatched, 0);
    sl_ip_limit_free(l);
}

/* A connection refused by the cap does not use the rate, and the other way round. */
static void test_cap_and_rate_together(void **state)
{
    (void)state;
    struct sl_ip_limit *l = limit_new(1, SEC, 1, 1024);
    struct addr a = ip("203.0.113.9");
    assert_int_equal(try(l, &a, T0), SL_IP_LIMIT_OK);
    assert_int_equal(try(l, &a, T0), SL_IP_LIMIT_CONNS);
    assert_int_equal(try(l, &a, T0), SL_IP_LIMIT_CONNS);
    sl_ip_limit_release(l, sa(&a));
    assert_int_equal(try(l, &a, T0), SL_IP_LIMIT_OK); /* the burst's second token */
    sl_ip_limit_release(l, sa(&a));
    assert_int_equal(try(l, &a, T0), SL_IP_LIMIT_RATE);
    assert_int_equal(sl_ip_limit_count(l, sa(&a)), 0);
    assert_int_equal(try(l, &a, T0 + SEC), SL_IP_LIMIT_OK);
    assert_int_equal(sl_ip_limit_count(l, sa(&a)), 1);
    sl_ip_limit_release(l, sa(&a));
    sl_ip_limit_free(l);
}

static void test_v6_prefix(void **state)
{
    (void)state;
    struct sl_ip_limit *l = limit_new(2, 0, 0, 1024);
    struct addr a1 = ip("2001:db8:1:2::1"), a2 = ip("2001:db8:1:2:ffff:ffff:ffff:ffff"),
                other = ip("2001:db8:1:3::1");
    assert_int_equal(try(l, &a1, T0), SL_IP_LIMIT_OK);
    assert_int_equal(try(l, &a2, T0), SL_IP_LIMIT_OK); /* same /64 */
    assert_int_equal(try(l, &a1, T0), SL_IP_LIMIT_CONNS);
    assert_int_equal(try(l, &a2, T0), SL_IP_LIMIT_CONNS);
    assert_int_equal(sl_ip_limit_count(l, sa(&a2)), 2);
    assert_int_equal(try(l, &other, T0), SL_IP_LIMIT_OK); /* the next /64 */
    sl_ip_limit_release(l, sa(&a2));                      /* released by any of the /64 */
    assert_int_equal(sl_ip_limit_count(l, sa(&a1)), 1);
    sl_ip_limit_free(l);

    /* A /48 prefix, and a /24 for IPv4. */
    struct sl_ip_limit_conf c = {
        .max_conns = 1, .max_keys = 64, .v6_prefix_bits = 48, .v4_prefix_bits = 24};
    int err;
    l = sl_ip_limit_new(&c, &err);
    assert_non_null(l);
    struct addr b1 = ip("2001:db8:1:2::1"), b2 = ip("2001:db8:1:ffff::1"), b3 = ip("2001:db8:2::1");
    assert_int_equal(try(l, &b1, T0), SL_IP_LIMIT_OK);
    assert_int_equal(try(l, &b2, T0), SL_IP_LIMIT_CONNS);
    assert_int_equal(try(l, &b3, T0), SL_IP_LIMIT_OK);
    struct addr c1 = ip("192.0.2.1"), c2 = ip("192.0.2.254"), c3 = ip("192.0.3.1");
    assert_int_equal(try(l, &c1, T0), SL_IP_LIMIT_OK);
    assert_int_equal(try(l, &c2, T0), SL_IP_LIMIT_CONNS);
    assert_int_equal(try(l, &c3, T0), SL_IP_LIMIT_OK);
    sl_ip_limit_free(l);

    /* Odd prefix lengths cut inside a byte. */
    c.v6_prefix_bits = 61;
    l = sl_ip_limit_new(&c, &err);
    assert_non_null(l);
    struct addr d1 = ip("2001:db8:0:8::1"), d2 = ip("2001:db8:0:f::1"), d3 = ip("2001:db8:0:10::");
    assert_int_equal(try(l, &d1, T0), SL_IP_LIMIT_OK);
    assert_int_equal(try(l, &d2, T0), SL_IP_LIMIT_CONNS); /* 8..f share the /61 */
    assert_int_equal(try(l, &d3, T0), SL_IP_LIMIT_OK);
    sl_ip_limit_free(l);
}

static void test_v4_mapped(void **state)
{
    (void)state;
    struct sl_ip_limit *l = limit_new(2, 0, 0, 1024);
    struct addr v4 = ip("192.0.2.33"), mapped = ip("::ffff:192.0.2.33"),
                compat = ip("::192.0.2.33"); /* not mapped: an IPv6 network */
    assert_int_equal(try(l, &v4, T0), SL_IP_LIMIT_OK);
    assert_int_equal(try(l, &mapped, T0), SL_IP_LIMIT_OK);
    assert_int_equal(try(l, &v4, T0), SL_IP_LIMIT_CONNS);
    assert_int_equal(try(l, &mapped, T0), SL_IP_LIMIT_CONNS);
    assert_int_equal(try(l, &compat, T0), SL_IP_LIMIT_OK);
    sl_ip_limit_release(l, sa(&mapped));
    assert_int_equal(sl_ip_limit_count(l, sa(&v4)), 1);
    sl_ip_limit_free(l);
}

static void test_non_ip_untracked(void **state)
{
    (void)state;
    struct sl_ip_limit *l = limit_new(1, 0, 0, 16);
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    enum sl_ip_limit_reason why;
    for (int i = 0; i < 3; i++) {
        assert_true(sl_ip_limit_acquire(l, (struct sockaddr *)&un, T0, &why));
        assert_int_equal(why, SL_IP_LIMIT_UNTRACKED);
    }
    assert_true(sl_ip_limit_acquire(l, (struct sockaddr *)&un, T0, NULL));
    assert_int_equal(stats(l).untracked, 0); /* not a full table */
    sl_ip_limit_free(l);
}

/* Every slot holds open connections: new addresses pass uncounted, and are counted as such;
 * the counted ones keep their exact counts. */
static void test_full_table_fails_open(void **state)
{
    (void)state;
    struct sl_ip_limit *l = limit_new(5, 0, 0, 1); /* 16 slots */
    enum sl_ip_limit_reason why[200];
    size_t ok = 0, untracked = 0;
    for (uint32_t i = 0; i < 200; i++) {
        struct addr a = ip_n(i);
        assert_true(sl_ip_limit_acquire(l, sa(&a), T0, &why[i]));
        if (why[i] == SL_IP_LIMIT_OK)
            ok++;
        else if (why[i] == SL_IP_LIMIT_UNTRACKED)
            untracked++;
    }
    assert_int_equal(ok + untracked, 200);
    assert_true(ok <= sl_ip_limit_capacity(l));
    assert_true(ok >= 8); /* at least the first key's two groups */
    assert_int_equal(stats(l).untracked, untracked);
    assert_true(untracked > 0);
    /* Counted addresses are still capped exactly. */
    for (uint32_t i = 0; i < 200; i++) {
        if (why[i] != SL_IP_LIMIT_OK)
            continue;
        struct addr a = ip_n(i);
        for (int k = 1; k < 5; k++)
            assert_int_equal(try(l, &a, T0), SL_IP_LIMIT_OK);
        assert_int_equal(try(l, &a, T0), SL_IP_LIMIT_CONNS);
        for (int k = 0; k < 5; k++)
            sl_ip_limit_release(l, sa(&a));
        assert_int_equal(sl_ip_limit_count(l, sa(&a)), 0);
    }
    assert_int_equal(stats(l).unmatched, 0);
    /* Once closed, their slots serve new addresses again. */
    size_t before = stats(l).untracked;
    for (uint32_t i = 1000; i < 1008; i++) {
        struct addr a = ip_n(i);
        assert_int_equal(try(l, &a, T0), SL_IP_LIMIT_OK);
        sl_ip_limit_release(l, sa(&a));
    }
    assert_int_equal(stats(l).untracked, before);
    sl_ip_limit_free(l);
}

/* Idle entries (nothing open, full bucket) make room for new ones, while a key with recent
 * history keeps it. */
static void test_idle_entries_evicted(void **state)
{
    (void)state;
    struct sl_ip_limit *l = limit_new(4, SEC, 0, 1); /* 16 slots, 1 per second */
    /* Many addresses, each one connection at its own time: the table stays usable. */
    uint64_t now = T0;
    for (uint32_t i = 0; i < 1000; i++, now += 2 * SEC) {
        struct addr a = ip_n(i);
        assert_int_equal(try(l, &a, now), SL_IP_LIMIT_OK);
        sl_ip_limit_release(l, sa(&a));
    }
    assert_int_equal(stats(l).untracked, 0);
    /* A flood of new addresses at one instant fills every slot with a live bucket (those
     * evict one another, each new key getting its first connection). */
    for (uint32_t i = 2000; i < 2500; i++) {
        struct addr a = ip_n(i);
        assert_int_equal(try(l, &a, now), SL_IP_LIMIT_OK);
        sl_ip_limit_release(l, sa(&a));
    }
    assert_int_equal(stats(l).untracked, 0);
    /* Later every slot is idle; address A connects, then a few others: at most 7 live keys
     * can never fill A's 8 candidate slots, so the others take idle slots and A's bucket
     * survives. */
    now += 10 * SEC;
    struct addr a = ip("198.51.100.77");
    assert_int_equal(try(l, &a, now), SL_IP_LIMIT_OK);
    sl_ip_limit_release(l, sa(&a));
    for (uint32_t i = 3000; i < 3006; i++) {
        struct addr b = ip_n(i);
        assert_int_equal(try(l, &b, now + 1), SL_IP_LIMIT_OK);
        sl_ip_limit_release(l, sa(&b));
    }
    assert_int_equal(try(l, &a, now + 2), SL_IP_LIMIT_RATE);
    assert_int_equal(try(l, &a, now + SEC), SL_IP_LIMIT_OK);
    sl_ip_limit_release(l, sa(&a));
    assert_int_equal(stats(l).unmatched, 0);
    sl_ip_limit_free(l);
}

/* ---- threads ----------------------------------------------------------------------------- */

#define THREADS 4
#define MAX_ADDRS 256

struct shared {
    struct sl_ip_limit *l;
    uint32_t addrs;
    uint32_t cap;
    int iterations;
    _Atomic uint32_t held[MAX_ADDRS]; /* connections the test holds with SL_IP_LIMIT_OK */
    _Atomic bool over_cap;
    _Atomic uint64_t ok, refused, untracked;
};

struct worker {
    struct shared *sh;
    uint64_t rng;
    pthread_t thread;
};

static uint64_t next_rand(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

/* Each thread keeps up to 3 connections open, releasing a random one when it has 3. */
static void *hammer(void *arg)
{
    struct worker *w = arg;
    struct shared *sh = w->sh;
    uint32_t open[3];
    int n_open = 0;
    for (int it = 0; it < sh->iterations; it++) {
        if (n_open == 3 || (n_open && next_rand(&w->rng) % 2)) {
            int k = (int)(next_rand(&w->rng) % (uint64_t)n_open);
            uint32_t idx = open[k];
            open[k] = open[--n_open];
            atomic_fetch_sub(&sh->held[idx], 1);
            struct addr a = ip_n(idx);
            sl_ip_limit_release(sh->l, sa(&a));
            continue;
        }
        uint32_t idx = (uint32_t)(next_rand(&w->rng) % sh->addrs);
        struct addr a = ip_n(idx);
        enum sl_ip_limit_reason why;
        bool allowed = sl_ip_limit_acquire(sh->l, sa(&a), T0, &why);
        if (!allowed) {
            atomic_fetch_add(&sh->refused, 1);
            continue;
        }
        if (why == SL_IP_LIMIT_UNTRACKED) {
            atomic_fetch_add(&sh->untracked, 1);
            continue; /* not counted: nothing to release */
        }
        atomic_fetch_add(&sh->ok, 1);
        /* The table counted this one before the test did, and the test uncounts before the
         * table does: the test's count is a lower bound of the table's. */
        if (atomic_fetch_add(&sh->held[idx], 1) + 1 > sh->cap)
            atomic_store(&sh->over_cap, true);
        open[n_open++] = idx;
    }
    while (n_open) {
        uint32_t idx = open[--n_open];
        atomic_fetch_sub(&sh->held[idx], 1);
        struct addr a = ip_n(idx);
        sl_ip_limit_release(sh->l, sa(&a));
    }
    return NULL;
}

static void run_hammer(uint32_t addrs, uint32_t cap, size_t max_keys, int iterations)
{
    struct shared *sh = calloc(1, sizeof *sh);
    assert_non_null(sh);
    sh->l = limit_new(cap, 0, 0, max_keys);
    sh->addrs = addrs;
    sh->cap = cap;
    sh->iterations = iterations;
    struct worker w[THREADS];
    for (int i = 0; i < THREADS; i++) {
        w[i].sh = sh;
        w[i].rng = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1);
        assert_int_equal(pthread_create(&w[i].thread, NULL, hammer, &w[i]), 0);
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(w[i].thread, NULL);
    assert_false(atomic_load(&sh->over_cap));
    assert_true(atomic_load(&sh->ok) > 0);
    for (uint32_t i = 0; i < addrs; i++) {
        struct addr a = ip_n(i);
        assert_int_equal(sl_ip_limit_count(sh->l, sa(&a)), 0);
    }
    struct sl_ip_limit_stats s = stats(sh->l);
    assert_int_equal(s.unmatched, 0);
    assert_int_equal(s.untracked, atomic_load(&sh->untracked));
    assert_int_equal(s.refused_conns, atomic_load(&sh->refused));
    sl_ip_limit_free(sh->l);
    free(sh);
}

/* 4 threads, 3 addresses, cap 2: constant contention on each key's one slot. */
static void test_threads_few_keys(void **state)
{
    (void)state;
    run_hammer(3, 2, 1024, 200000);
}

/* 4 threads, 256 addresses over 16 slots: slots change hands all the time while other threads
 * count and release on them, and the table is often full (fail open). */
static void test_threads_churn(void **state)
{
    (void)state;
    run_hammer(256, 2, 1, 200000);
}

/* The rate under contention: at one instant, exactly burst + 1 pass in all. */
struct rate_shared {
    struct sl_ip_limit *l;
    _Atomic uint64_t passed;
};

static void *rate_hammer(void *arg)
{
    struct rate_shared *rs = arg;
    struct addr a = ip("192.0.2.200");
    for (int i = 0; i < 20000; i++) {
        enum sl_ip_limit_reason why;
        if (sl_ip_limit_acquire(rs->l, sa(&a), T0, &why) && why == SL_IP_LIMIT_OK)
            atomic_fetch_add(&rs->passed, 1);
    }
    return NULL;
}

static void test_threads_rate_exact(void **state)
{
    (void)state;
    struct rate_shared rs = {.l = limit_new(0, SEC, 99, 64)};
    atomic_init(&rs.passed, 0);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, rate_hammer, &rs), 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    assert_int_equal(atomic_load(&rs.passed), 100);
    assert_int_equal(stats(rs.l).refused_rate, THREADS * 20000 - 100);
    sl_ip_limit_free(rs.l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_conf_bounds),
        cmocka_unit_test(test_conn_cap_and_release),
        cmocka_unit_test(test_rate_refill),
        cmocka_unit_test(test_cap_and_rate_together),
        cmocka_unit_test(test_v6_prefix),
        cmocka_unit_test(test_v4_mapped),
        cmocka_unit_test(test_non_ip_untracked),
        cmocka_unit_test(test_full_table_fails_open),
        cmocka_unit_test(test_idle_entries_evicted),
        cmocka_unit_test(test_threads_few_keys),
        cmocka_unit_test(test_threads_churn),
        cmocka_unit_test(test_threads_rate_exact),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
