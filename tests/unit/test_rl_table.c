#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>
#include <errno.h>
#include <pthread.h>

#include "config/units.h"
#include "filters/rl_table.h"

#define SEC 1000000ull
#define T0 (1000 * SEC) /* any start; monotonic clocks are far from 0 */

static struct sl_rl_decision decide(struct sl_rl_table *t, const char *key,
                                    const struct sl_rl_limit *lim, uint64_t now)
{
    struct sl_rl_decision d;
    sl_rl_table_decide(t, key, strlen(key), lim, now, &d);
    return d;
}

static void test_parse_rate(void **state)
{
    (void)state;
    uint64_t p = 0;
    assert_int_equal(sl_config_parse_rate("100/s", 5, &p), 0);
    assert_int_equal(p, 10000);
    assert_int_equal(sl_config_parse_rate("5/m", 3, &p), 0);
    assert_int_equal(p, 12 * SEC);
    assert_int_equal(sl_config_parse_rate("1/h", 3, &p), 0);
    assert_int_equal(p, 3600 * SEC);
    assert_int_equal(sl_config_parse_rate("1000000/s", 9, &p), 0);
    assert_int_equal(p, 1);
    /* rounded up, so never more than N per unit */
    assert_int_equal(sl_config_parse_rate("3/s", 3, &p), 0);
    assert_int_equal(p, 333334);

    static const char *const bad[] = {"0/s",   "10/x", "abc",  "",     "/s",    "10",   "10/",
                                      "10/ss", "-1/s", " 1/s", "1/s ", "1.5/s", "10/S", "1e3/s"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        p = 42;
        assert_int_equal(sl_config_parse_rate(bad[i], strlen(bad[i]), &p), -EINVAL);
        assert_int_equal(p, 42);
    }
    assert_int_equal(sl_config_parse_rate("1000001/s", 9, &p), -ERANGE);
    assert_int_equal(sl_config_parse_rate("99999999999999999999999/s", 25, &p), -ERANGE);
    /* the length bounds the parse, not a NUL */
    assert_int_equal(sl_config_parse_rate("7/sXYZ", 3, &p), 0);
    assert_int_equal(p, 142858);
}

static void test_burst_then_one_per_period(void **state)
{
    (void)state;
    struct sl_rl_table *t = sl_rl_table_new(64);
    assert_non_null(t);
    const struct sl_rl_limit lim = {.period_us = 100000, .burst = 4}; /* 10/s, burst 4 */
    for (uint64_t i = 0; i < 5; i++) {
        struct sl_rl_decision d = decide(t, "k", &lim, T0);
        assert_true(d.allowed);
        assert_int_equal(d.limit, 5);
        assert_int_equal(d.remaining, 4 - i);
        assert_int_equal(d.reset_us, (i + 1) * 100000);
        assert_int_equal(d.retry_after_us, 0);
    }
    struct sl_rl_decision d = decide(t, "k", &lim, T0);
    assert_false(d.allowed);
    assert_int_equal(d.limit, 5);
    assert_int_equal(d.remaining, 0);
    assert_int_equal(d.retry_after_us, 100000);
    assert_int_equal(d.reset_us, 500000);

    /* 30 ms later: 70 ms to wait, bucket full in 470 ms; refusals change nothing */
    d = decide(t, "k", &lim, T0 + 30000);
    assert_false(d.allowed);
    assert_int_equal(d.retry_after_us, 70000);
    assert_int_equal(d.reset_us, 470000);

    /* exactly one period later: one passes, the next does not */
    d = decide(t, "k", &lim, T0 + 100000);
    assert_true(d.allowed);
    assert_int_equal(d.remaining, 0);
    assert_int_equal(d.reset_us, 500000);
    d = decide(t, "k", &lim, T0 + 100000);
    assert_false(d.allowed);
    assert_int_equal(d.retry_after_us, 100000);

    /* 250 ms more: two periods refilled (half a period is not a request) */
    d = decide(t, "k", &lim, T0 + 350000);
    assert_true(d.allowed);
    assert_int_equal(d.remaining, 1);
    d = decide(t, "k", &lim, T0 + 350000);
    assert_true(d.allowed);
    assert_int_equal(d.remaining, 0);
    d = decide(t, "k", &lim, T0 + 350000);
    assert_false(d.allowed);
    assert_int_equal(d.retry_after_us, 50000);

    /* idle for long: full again, exactly burst + 1 at once */
    unsigned allowed = 0;
    for (int i = 0; i < 20; i++)
        allowed += decide(t, "k", &lim, T0 + 100 * SEC).allowed;
    assert_int_equal(allowed, 5);
    sl_rl_table_free(t);
}

static void test_no_burst(void **state)
{
    (void)state;
    struct sl_rl_table *t = sl_rl_table_new(16);
    const struct sl_rl_limit lim = {.period_us = 12 * SEC, .burst = 0}; /* 5/m */
    struct sl_rl_decision d = decide(t, "a", &lim, T0);
    assert_true(d.allowed);
    assert_int_equal(d.limit, 1);
    assert_int_equal(d.remaining, 0);
    assert_int_equal(d.reset_us, 12 * SEC);
    d = decide(t, "a", &lim, T0 + SEC);
    assert_false(d.allowed);
    assert_int_equal(d.retry_after_us, 11 * SEC);
    assert_int_equal(d.reset_us, 11 * SEC);
    /* another key is independent */
    assert_true(decide(t, "b", &lim, T0 + SEC).allowed);
    assert_true(decide(t, "a", &lim, T0 + 12 * SEC).allowed);
    sl_rl_table_free(t);
}

/* Over a window W from idle, with requests at every µs-ish step: rate x W + burst + 1. */
static void test_window_count(void **state)
{
    (void)state;
    struct sl_rl_table *t = sl_rl_table_new(16);
    uint64_t period;
    assert_int_equal(sl_config_parse_rate("100/s", 5, &period), 0);
    const struct sl_rl_limit lim = {.period_us = period, .burst = 7};
    unsigned allowed = 0;
    for (uint64_t now = T0; now <= T0 + 3 * SEC; now += 125)
        allowed += decide(t, "w", &lim, now).allowed;
    assert_int_equal(allowed, 300 + 7 + 1);
    /* samples that miss the window's last instant miss its last request: at most, not more */
    allowed = 0;
    for (uint64_t now = T0 + 10 * SEC; now <= T0 + 13 * SEC; now += 137)
        allowed += decide(t, "w", &lim, now).allowed;
    assert_int_equal(allowed, 300 + 7);
    sl_rl_table_free(t);
}

static unsigned pass_count(struct sl_rl_table *t, const struct sl_rl_limit *lim, int nkeys,
                           uint64_t now)
{
    char key[32];
    unsigned allowed = 0;
    for (int i = 0; i < nkeys; i++) {
        snprintf(key, sizeof key, "client-%d", i);
        allowed += decide(t, key, lim, now).allowed;
    }
    return allowed;
}

static void test_many_keys(void **state)
{
    (void)state;
    const struct sl_rl_limit lim = {.period_us = SEC, .burst = 1};
    for (int rep = 0; rep < 20; rep++) { /* each table has its own random hash key */
        struct sl_rl_table *t = sl_rl_table_new(2048);
        assert_int_equal(sl_rl_table_capacity(t), 4096);
        /* up to 3/4 of max_keys, every key keeps its own bucket (2000 of 2000 runs measured) */
        assert_int_equal(pass_count(t, &lim, 1536, T0), 1536);
        assert_int_equal(pass_count(t, &lim, 1536, T0), 1536);
        assert_int_equal(pass_count(t, &lim, 1536, T0), 0);
        assert_int_equal(sl_rl_table_live_count(t, T0), 1536);
        sl_rl_table_free(t);
    }
    /* at max_keys, nearly all: an unlucky key may lose its bucket (and start over) */
    struct sl_rl_table *t = sl_rl_table_new(2048);
    assert_int_equal(pass_count(t, &lim, 2048, T0), 2048);
    assert_int_equal(pass_count(t, &lim, 2048, T0), 2048);
    assert_in_range(pass_count(t, &lim, 2048, T0), 0, 20);
    assert_in_range(sl_rl_table_live_count(t, T0), 2040, 2048);
    sl_rl_table_free(t);
}

static void test_capacity_rounding(void **state)
{
    (void)state;
    assert_null(sl_rl_table_new(0));
    assert_null(sl_rl_table_new((size_t)SL_RL_MAX_KEYS + 1));
    struct sl_rl_table *t = sl_rl_table_new(1), *t2;
    assert_int_equal(sl_rl_table_capacity(t), 16);
    sl_rl_table_free(t);
    t = sl_rl_table_new(100000);
    assert_int_equal(sl_rl_table_capacity(t), 262144);
    t2 = sl_rl_table_new(8);
    assert_int_equal(sl_rl_table_capacity(t2), 16);
    sl_rl_table_free(t2);
    sl_rl_table_free(t);
    sl_rl_table_free(NULL);
}

/*
 * A flood of distinct keys: the table never grows, expired buckets are reused first, and a
 * key whose bucket stays far from full (a long period) survives, since eviction takes the
 * smallest TAT among the probed slots.
 */
static void test_flood_eviction(void **state)
{
    (void)state;
    struct sl_rl_table *t = sl_rl_table_new(512);
    const size_t cap = sl_rl_table_capacity(t);
    assert_int_equal(cap, 1024);
    const struct sl_rl_limit slow = {.period_us = 3600 * SEC, .burst = 0}; /* 1/h */
    const struct sl_rl_limit fast = {.period_us = 10000, .burst = 0};      /* 100/s */
    char key[32];
    /* 64 "vip" keys made live for an hour */
    for (int i = 0; i < 64; i++) {
        snprintf(key, sizeof key, "vip-%d", i);
        assert_true(decide(t, key, &slow, T0).allowed);
    }
    /* 200,000 distinct keys, 1 ms apart every 100: the oldest expire as the flood goes on */
    uint64_t now = T0;
    for (int i = 0; i < 200000; i++) {
        if (i % 100 == 0)
            now += 1000;
        snprintf(key, sizeof key, "flood-%d", i);
        assert_true(decide(t, key, &fast, now).allowed); /* new keys always start full */
        assert_true(sl_rl_table_live_count(t, now) <= cap);
    }
    assert_int_equal(sl_rl_table_capacity(t), cap);
    /* every vip bucket is still there: their next request is refused */
    for (int i = 0; i < 64; i++) {
        snprintf(key, sizeof key, "vip-%d", i);
        struct sl_rl_decision d = decide(t, key, &slow, now);
        assert_false(d.allowed);
        assert_int_equal(d.retry_after_us, 3600 * SEC - (now - T0));
    }
    /* the most recent flood keys (the last 10 ms, so still live) are kept too */
    for (int i = 199900; i < 200000; i++) {
        snprintf(key, sizeof key, "flood-%d", i);
        assert_false(decide(t, key, &fast, now).allowed);
    }
    sl_rl_table_free(t);
}

/* When every probed slot is live, the one nearest to full is given up and its key starts
 * over: a table that is too small degrades toward allowing, never toward refusing. */
static void test_full_table_evicts_smallest_tat(void **state)
{
    (void)state;
    struct sl_rl_table *t = sl_rl_table_new(8); /* 16 slots */
    const struct sl_rl_limit lim = {.period_us = 3600 * SEC, .burst = 0};
    char key[32];
    for (int i = 0; i < 1000; i++) {
        snprintf(key, sizeof key, "k%d", i);
        /* every key is new or evicted by the time it comes: all pass */
        assert_true(decide(t, key, &lim, T0 + (uint64_t)i).allowed);
        assert_true(sl_rl_table_live_count(t, T0 + (uint64_t)i) <= 16);
    }
    /* the newest key is still held */
    assert_false(decide(t, "k999", &lim, T0 + 1000).allowed);
    sl_rl_table_free(t);
}

/* ---- concurrency: one key, four threads, a shared simulated clock --------------------------- */

struct hammer {
    struct sl_rl_table *t;
    const struct sl_rl_limit *lim;
    _Atomic uint64_t *tick; /* each decision takes the next µs of simulated time */
    uint64_t end;           /* last tick */
    const char *key;
    unsigned allowed;
};

static void *hammer_main(void *arg)
{
    struct hammer *h = arg;
    for (;;) {
        uint64_t now = atomic_fetch_add(h->tick, 1);
        if (now > h->end)
            break;
        struct sl_rl_decision d;
        sl_rl_table_decide(h->t, h->key, strlen(h->key), h->lim, now, &d);
        h->allowed += d.allowed;
    }
    return NULL;
}

static unsigned run_hammer(struct sl_rl_table *t, const struct sl_rl_limit *lim, const char *key,
                           uint64_t start, uint64_t window)
{
    _Atomic uint64_t tick = start;
    struct hammer hs[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        hs[i] = (struct hammer){
            .t = t, .lim = lim, .tick = &tick, .end = start + window, .key = key, .allowed = 0};
        assert_int_equal(pthread_create(&th[i], NULL, hammer_main, &hs[i]), 0);
    }
    unsigned total = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        total += hs[i].allowed;
    }
    return total;
}

static void test_threads_one_key_exact(void **state)
{
    (void)state;
    struct sl_rl_table *t = sl_rl_table_new(1024);
    const struct sl_rl_limit lim = {.period_us = 1000, .burst = 9}; /* 1000/s, limit 10 */
    for (int rep = 0; rep < 5; rep++) {
        char key[16];
        snprintf(key, sizeof key, "hot-%d", rep);
        /* The first request is made before the threads start, so the bucket's chain starts
         * at T0 whichever thread the scheduler runs first. */
        struct sl_rl_decision d;
        sl_rl_table_decide(t, key, strlen(key), &lim, T0, &d);
        assert_true(d.allowed);
        /* 200 ms of simulated time, one decision per µs across four threads */
        unsigned total = 1 + run_hammer(t, &lim, key, T0, 200000);
        assert_int_equal(total, 200 + 9 + 1);
    }
    sl_rl_table_free(t);
}

/* Four threads inserting the same 2000 new keys at once. */
static void *insert_main(void *arg)
{
    struct hammer *h = arg;
    char key[32];
    for (int i = 0; i < 2000; i++) {
        snprintf(key, sizeof key, "shared-%d", i);
        struct sl_rl_decision d;
        sl_rl_table_decide(h->t, key, strlen(key), h->lim, T0, &d);
        h->allowed += d.allowed;
    }
    return NULL;
}

static void test_threads_insert_race(void **state)
{
    (void)state;
    struct sl_rl_table *t = sl_rl_table_new(8192);
    const struct sl_rl_limit lim = {.period_us = SEC, .burst = 1};
    struct hammer hs[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        hs[i] = (struct hammer){.t = t, .lim = &lim, .allowed = 0};
        assert_int_equal(pthread_create(&th[i], NULL, insert_main, &hs[i]), 0);
    }
    unsigned total = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        total += hs[i].allowed;
    }
    /* 2000 keys, burst 1: two each. The documented insert race (two threads placing the
     * same new key while another key lands in its groups) may give a key a second slot and
     * one extra pass; it shows about once in 100 runs here, never more than a few keys. */
    assert_in_range(total, 4000, 4004);
    assert_in_range(sl_rl_table_live_count(t, T0), 2000, 2002);
    sl_rl_table_free(t);
}

static void test_digest(void **state)
{
    (void)state;
    unsigned char out[16];
    static const unsigned char abc[16] = {0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea,
                                          0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23};
    sl_rl_digest128("abc", 3, out);
    assert_memory_equal(out, abc, 16);
    /* 56 bytes: the length no longer fits in the first padding block */
    static const unsigned char b56[16] = {0xa5, 0xfc, 0x6e, 0x20, 0x3a, 0x4c, 0x2b, 0x65,
                                          0x7d, 0x0d, 0x15, 0x38, 0x85, 0x93, 0x24, 0x14};
    char buf[1000];
    memset(buf, 'b', 56);
    sl_rl_digest128(buf, 56, out);
    assert_memory_equal(out, b56, 16);
    static const unsigned char a1000[16] = {0x41, 0xed, 0xec, 0xe4, 0x2d, 0x63, 0xe8, 0xd9,
                                            0xbf, 0x51, 0x5a, 0x9b, 0xa6, 0x93, 0x2e, 0x1c};
    memset(buf, 'a', sizeof buf);
    sl_rl_digest128(buf, sizeof buf, out);
    assert_memory_equal(out, a1000, 16);
}

static void test_now_moves(void **state)
{
    (void)state;
    uint64_t a = sl_rl_now_us(), b = sl_rl_now_us();
    assert_true(a > 0 && b >= a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_rate),
        cmocka_unit_test(test_burst_then_one_per_period),
        cmocka_unit_test(test_no_burst),
        cmocka_unit_test(test_window_count),
        cmocka_unit_test(test_many_keys),
        cmocka_unit_test(test_capacity_rounding),
        cmocka_unit_test(test_flood_eviction),
        cmocka_unit_test(test_full_table_evicts_smallest_tat),
        cmocka_unit_test(test_threads_one_key_exact),
        cmocka_unit_test(test_threads_insert_race),
        cmocka_unit_test(test_digest),
        cmocka_unit_test(test_now_moves),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
