#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <errno.h>

#include "core/arena.h"
#include "core/buf.h"
#include "core/bpool.h"

/* ---- pool -------------------------------------------------------------------------------- */

static void test_pool_reuse(void **state)
{
    (void)state;
    struct sl_bpool p;
    sl_bpool_init(&p, 4096, 8);
    assert_int_equal(p.outstanding, 0);
    char *a = sl_bpool_get(&p);
    assert_non_null(a);
    assert_int_equal(p.outstanding, 1);
    memset(a, 0xab, 4096); /* the whole block is usable */
    sl_bpool_put(&p, a);
    assert_int_equal(p.outstanding, 0);
    assert_int_equal(p.free_count, 1);
    char *b = sl_bpool_get(&p);
    assert_ptr_equal(b, a); /* the same block back */
    assert_int_equal(p.outstanding, 1);
    assert_int_equal(p.free_count, 0);

    /* LIFO: the most recently returned block comes back first. */
    char *c = sl_bpool_get(&p);
    assert_ptr_not_equal(c, b);
    sl_bpool_put(&p, b);
    sl_bpool_put(&p, c);
    assert_ptr_equal(sl_bpool_get(&p), c);
    assert_ptr_equal(sl_bpool_get(&p), b);
    assert_int_equal(p.outstanding, 2);
    sl_bpool_put(&p, b);
    sl_bpool_put(&p, c);

    /* NULL is ignored. */
    sl_bpool_put(&p, NULL);
    assert_int_equal(p.outstanding, 0);
    assert_int_equal(p.free_count, 2);
    sl_bpool_dispose(&p);
    assert_int_equal(p.free_count, 0);
}

static void test_pool_max_free(void **state)
{
    (void)state;
    enum { N = 10 };
    struct sl_bpool p;
    sl_bpool_init(&p, 256, 3);
    void *blocks[N];
    for (int i = 0; i < N; i++) {
        blocks[i] = sl_bpool_get(&p);
        assert_non_null(blocks[i]);
        assert_int_equal(p.outstanding, (size_t)i + 1);
    }
    for (int i = 0; i < N; i++) {
        sl_bpool_put(&p, blocks[i]);
        assert_int_equal(p.outstanding, (size_t)(N - i - 1));
        assert_true(p.free_count <= 3);
    }
    assert_int_equal(p.free_count, 3);
    assert_int_equal(p.outstanding, 0);
    /* The cached ones come back first (LSan checks the rest were really freed). */
    void *x = sl_bpool_get(&p);
    assert_true(x == blocks[0] || x == blocks[1] || x == blocks[2]);
    sl_bpool_put(&p, x);
    sl_bpool_dispose(&p);

    /* max_free 0: nothing is cached. */
    sl_bpool_init(&p, 256, 0);
    void *y = sl_bpool_get(&p);
    sl_bpool_put(&p, y);
    assert_int_equal(p.free_count, 0);
    assert_int_equal(p.outstanding, 0);
    sl_bpool_dispose(&p);
}

/* sl_bpool_trim_idle gives back only the blocks that sat unused for a whole interval: a burst's
 * blocks go after the quiet interval that follows it, the working set of steady load stays. */
static void test_pool_trim_idle(void **state)
{
    (void)state;
    enum { N = 40 };
    struct sl_bpool p;
    sl_bpool_init(&p, 8192, 1024); /* page-sized: the mmap path */
    assert_int_equal(p.block_bytes, 8192);
    void *b[N];
    for (int i = 0; i < N; i++)
        assert_non_null(b[i] = sl_bpool_get(&p));
    for (int i = 0; i < N; i++)
        sl_bpool_put(&p, b[i]);
    assert_int_equal(p.free_count, N);
    /* The interval that saw the burst: the free list was empty at its low point. */
    assert_int_equal(sl_bpool_trim_idle(&p, 4), 0);
    assert_int_equal(p.free_count, N);
    /* Steady load during the next interval uses 10 blocks at most at once. */
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < 10; i++)
            b[i] = sl_bpool_get(&p);
        for (int i = 0; i < 10; i++)
            sl_bpool_put(&p, b[i]);
    }
    /* 30 blocks were never touched: all but `keep` of them go. */
    assert_int_equal(sl_bpool_trim_idle(&p, 4), N - 10 - 4);
    assert_int_equal(p.free_count, 14);
    /* A quiet interval: the rest beyond `keep` go too, and nothing more after that. */
    assert_int_equal(sl_bpool_trim_idle(&p, 4), 10);
    assert_int_equal(p.free_count, 4);
    assert_int_equal(sl_bpool_trim_idle(&p, 4), 0);
    assert_int_equal(p.outstanding, 0);
    sl_bpool_dispose(&p);
    assert_int_equal(p.free_count, 0);
}

/* ---- buf --------------------------------------------------------------------------------- */

#define BLOCK 1024

static void fill_pattern(char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (char)(seed * 31u + i * 7u);
}

/* The memory budget: past max_outstanding blocks, get refuses (and counts) instead of
 * allocating; a block given back makes room again. Cached free blocks do not count. */
static void test_pool_budget(void **state)
{
    (void)state;
    struct sl_bpool p;
    sl_bpool_init(&p, 4096, 16);
    p.max_outstanding = 2;
    void *a = sl_bpool_get(&p), *b = sl_bpool_get(&p);
    assert_non_null(a);
    assert_non_null(b);
    assert_null(sl_bpool_get(&p));
    assert_null(sl_bpool_get(&p));
    assert_int_equal(p.refused, 2);
    assert_true(p.over_budget);
    sl_bpool_put(&p, a);
    assert_false(p.over_budget); /* 1 of 2 in use: below 90% */
    void *c = sl_bpool_get(&p);
    assert_non_null(c); /* the cached block, within budget */
    assert_int_equal(p.outstanding, 2);
    sl_bpool_put(&p, b);
    sl_bpool_put(&p, c);
    sl_bpool_dispose(&p);
}

static void test_buf_acquire_append_consume(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    struct sl_buf b = {0};
    assert_int_equal(sl_buf_len(&b), 0);
    assert_int_equal(sl_buf_acquire(&b, &pool), 0);
    assert_non_null(b.data);
    assert_int_equal(pool.outstanding, 1);
    assert_int_equal(sl_buf_len(&b), 0);
    assert_int_equal(sl_buf_space(&b), BLOCK);
    char *held = b.data;
    /* Acquire while holding is a no-op. */
    assert_int_equal(sl_buf_acquire(&b, &pool), 0);
    assert_ptr_equal(b.data, held);
    assert_int_equal(pool.outstanding, 1);

    assert_true(sl_buf_append(&b, "hello", 5));
    assert_true(sl_buf_append(&b, " world", 6));
    assert_int_equal(sl_buf_len(&b), 11);
    assert_memory_equal(sl_buf_head(&b), "hello world", 11);
    assert_int_equal(sl_buf_space(&b), BLOCK - 11);
    assert_true(sl_buf_append(&b, "", 0));
    assert_int_equal(sl_buf_len(&b), 11);

    sl_buf_consume(&b, 6);
    assert_int_equal(sl_buf_len(&b), 5);
    assert_memory_equal(sl_buf_head(&b), "world", 5);
    assert_ptr_equal(sl_buf_head(&b), held + 6); /* consume does not move bytes */
    sl_buf_consume(&b, 0);
    assert_int_equal(sl_buf_len(&b), 5);

    /* Consuming everything resets the positions: the whole block is free again. */
    sl_buf_consume(&b, 5);
    assert_int_equal(sl_buf_len(&b), 0);
    assert_int_equal(sl_buf_space(&b), BLOCK);
    assert_ptr_equal(sl_buf_head(&b), held);
    assert_ptr_equal(b.data, held);

    sl_buf_release(&b, &pool);
    assert_null(b.data);
    assert_int_equal(sl_buf_len(&b), 0);
    assert_int_equal(pool.outstanding, 0);
    sl_buf_release(&b, &pool); /* no block: no-op */
    assert_int_equal(pool.outstanding, 0);
    sl_bpool_dispose(&pool);
}

static void test_buf_append_no_fit(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    struct sl_buf b = {0};
    assert_int_equal(sl_buf_acquire(&b, &pool), 0);
    char src[BLOCK + 1];
    fill_pattern(src, sizeof src, 1);

    /* Exactly full fits. */
    assert_true(sl_buf_append(&b, src, BLOCK));
    assert_int_equal(sl_buf_space(&b), 0);
    assert_false(sl_buf_append(&b, "x", 1));
    assert_int_equal(sl_buf_len(&b), BLOCK);
    assert_memory_equal(sl_buf_head(&b), src, BLOCK);
    sl_buf_consume(&b, BLOCK);

    /* One byte too many: false, nothing appended, existing bytes intact. */
    assert_true(sl_buf_append(&b, src, 100));
    assert_false(sl_buf_append(&b, src, BLOCK - 99));
    assert_int_equal(sl_buf_len(&b), 100);
    assert_memory_equal(sl_buf_head(&b), src, 100);
    assert_true(sl_buf_append(&b, src + 100, BLOCK - 100));
    assert_memory_equal(sl_buf_head(&b), src, BLOCK);
    sl_buf_consume(&b, BLOCK);

    /* Bigger than the block: false. */
    assert_false(sl_buf_append(&b, src, BLOCK + 1));
    assert_int_equal(sl_buf_len(&b), 0);

    /* Fits only after compaction: the free space at the front is reclaimed. */
    assert_true(sl_buf_append(&b, src, BLOCK));
    sl_buf_consume(&b, 300);
    assert_int_equal(sl_buf_space(&b), 0);
    assert_true(sl_buf_append(&b, "abc", 3));
    assert_int_equal(sl_buf_len(&b), BLOCK - 300 + 3);
    assert_memory_equal(sl_buf_head(&b), src + 300, BLOCK - 300);
    assert_memory_equal(sl_buf_head(&b) + BLOCK - 300, "abc", 3);
    /* Does not fit even after compaction: false and the readable bytes are unchanged. */
    sl_buf_consume(&b, 10);
    assert_false(sl_buf_append(&b, src, 308)); /* 717 + 308 = BLOCK + 1 */
    assert_int_equal(sl_buf_len(&b), BLOCK - 300 + 3 - 10);
    assert_memory_equal(sl_buf_head(&b), src + 310, BLOCK - 310);
    assert_memory_equal(sl_buf_head(&b) + BLOCK - 310, "abc", 3);

    sl_buf_release(&b, &pool);
    sl_bpool_dispose(&pool);
}

static void test_buf_compact(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    struct sl_buf b = {0};
    assert_int_equal(sl_buf_acquire(&b, &pool), 0);
    assert_true(sl_buf_append(&b, "0123456789", 10));

    sl_buf_compact(&b); /* already at the front: nothing changes */
    assert_ptr_equal(sl_buf_head(&b), b.data);
    assert_int_equal(sl_buf_len(&b), 10);

    sl_buf_consume(&b, 4);
    assert_int_equal(sl_buf_space(&b), BLOCK - 10);
    sl_buf_compact(&b);
    assert_ptr_equal(sl_buf_head(&b), b.data);
    assert_int_equal(sl_buf_len(&b), 6);
    assert_memory_equal(sl_buf_head(&b), "456789", 6);
    assert_int_equal(sl_buf_space(&b), BLOCK - 6);
    sl_buf_release(&b, &pool);
    sl_bpool_dispose(&pool);
}

static void test_buf_release_if_empty(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    struct sl_buf b = {0};
    /* No block: no-op. */
    sl_buf_release_if_empty(&b, &pool);
    assert_null(b.data);

    assert_int_equal(sl_buf_acquire(&b, &pool), 0);
    assert_true(sl_buf_append(&b, "abc", 3));
    sl_buf_release_if_empty(&b, &pool);
    assert_non_null(b.data); /* bytes pending: kept */
    assert_int_equal(pool.outstanding, 1);
    assert_memory_equal(sl_buf_head(&b), "abc", 3);

    sl_buf_consume(&b, 2);
    sl_buf_release_if_empty(&b, &pool);
    assert_non_null(b.data);
    sl_buf_consume(&b, 1);
    sl_buf_release_if_empty(&b, &pool);
    assert_null(b.data);
    assert_int_equal(sl_buf_len(&b), 0);
    assert_int_equal(pool.outstanding, 0);
    assert_int_equal(pool.free_count, 1);

    /* Re-acquire gets an empty buffer from the pool (the same block). */
    assert_int_equal(sl_buf_acquire(&b, &pool), 0);
    assert_int_equal(sl_buf_len(&b), 0);
    assert_int_equal(sl_buf_space(&b), BLOCK);

    /* sl_buf_release discards pending bytes. */
    assert_true(sl_buf_append(&b, "xyz", 3));
    sl_buf_release(&b, &pool);
    assert_null(b.data);
    assert_int_equal(sl_buf_len(&b), 0);
    assert_int_equal(sl_buf_space(&b), 0);
    assert_int_equal(pool.outstanding, 0);
    sl_bpool_dispose(&pool);
}

/* Random appends and consumes against a model byte queue. */
static void test_buf_random_model(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, BLOCK, 4);
    struct sl_buf b = {0};
    assert_int_equal(sl_buf_acquire(&b, &pool), 0);
    char model[BLOCK];
    size_t mlen = 0;
    uint32_t seed = 12345;
    unsigned char next = 0;
    for (int op = 0; op < 20000; op++) {
        seed = seed * 1103515245u + 12345u;
        size_t n = (seed >> 8) % 300;
        if ((seed >> 20) & 1) {
            char in[300];
            for (size_t i = 0; i < n; i++)
                in[i] = (char)(next + i);
            bool fits = mlen + n <= BLOCK;
            assert_int_equal(sl_buf_append(&b, in, n), fits);
            if (fits) {
                memcpy(model + mlen, in, n);
                mlen += n;
                next = (unsigned char)(next + n);
            }
        } else {
            if (n > mlen)
                n = mlen;
            sl_buf_consume(&b, n);
            memmove(model, model + n, mlen - n);
            mlen -= n;
        }
        assert_int_equal(sl_buf_len(&b), mlen);
        assert_true(b.start <= b.end && b.end <= b.cap);
        if (mlen)
            assert_memory_equal(sl_buf_head(&b), model, mlen);
        else
            assert_int_equal(sl_buf_space(&b), BLOCK);
    }
    sl_buf_release(&b, &pool);
    sl_bpool_dispose(&pool);
}

/* ---- arena ------------------------------------------------------------------------------- */

static void test_arena_alignment(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, 4096, 8);
    struct sl_arena a;
    sl_arena_init(&a, &pool);
    char *prev = NULL;
    size_t prev_n = 0;
    for (size_t n = 0; n <= 100; n++) {
        char *p = sl_arena_alloc(&a, n);
        assert_non_null(p);
        assert_int_equal((uintptr_t)p % 16, 0);
        memset(p, 0x5a, n); /* the whole request is writable (ASan checks) */
        /* No overlap with the previous allocation. */
        if (prev && p > prev)
            assert_true(p >= prev + prev_n);
        prev = p;
        prev_n = n;
    }
    sl_arena_reset(&a);
    assert_int_equal(pool.outstanding, 0);
    sl_bpool_dispose(&pool);
}

static void test_arena_many_small(void **state)
{
    (void)state;
    enum { N = 2000, SZ = 40 };
    struct sl_bpool pool;
    sl_bpool_init(&pool, 1024, 64);
    struct sl_arena a;
    sl_arena_init(&a, &pool);
    unsigned char *ptrs[N];
    for (int i = 0; i < N; i++) {
        ptrs[i] = sl_arena_alloc(&a, SZ);
        assert_non_null(ptrs[i]);
        assert_int_equal((uintptr_t)ptrs[i] % 16, 0);
        memset(ptrs[i], i & 0xff, SZ);
    }
    /* 48 bytes each after rounding, ~1008 usable per block: many blocks. */
    assert_true(pool.outstanding >= (size_t)N * 48 / 1024);
    assert_true(pool.outstanding <= (size_t)N * 48 / (1024 - 64) + 1);
    /* Nothing was overwritten by a later allocation. */
    for (int i = 0; i < N; i++)
        for (int k = 0; k < SZ; k++)
            assert_int_equal(ptrs[i][k], i & 0xff);
    sl_arena_reset(&a);
    assert_int_equal(pool.outstanding, 0);
    assert_true(pool.free_count > 0);

    /* After reset the arena is usable again and reuses pool blocks. */
    size_t cached = pool.free_count;
    assert_non_null(sl_arena_alloc(&a, 10));
    assert_int_equal(pool.outstanding, 1);
    assert_int_equal(pool.free_count, cached - 1);
    sl_arena_reset(&a);
    sl_arena_reset(&a); /* twice is harmless */
    assert_int_equal(pool.outstanding, 0);
    sl_bpool_dispose(&pool);
}

static void test_arena_big_alloc_own_chunk(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, 1024, 8);
    struct sl_arena a;
    sl_arena_init(&a, &pool);

    char *p1 = sl_arena_alloc(&a, 16);
    assert_non_null(p1);
    assert_int_equal(pool.outstanding, 1);
    /* Use most of the block so a big request cannot fit its tail. */
    char *fill = sl_arena_alloc(&a, 512);
    assert_non_null(fill);
    assert_ptr_equal(fill, p1 + 16);
    assert_int_equal(pool.outstanding, 1);

    /* More than half a block and more than what is left: its own chunk. */
    char *big = sl_arena_alloc(&a, 600);
    assert_non_null(big);
    assert_int_equal((uintptr_t)big % 16, 0);
    memset(big, 0x11, 600);
    assert_int_equal(pool.outstanding, 1); /* not from the pool */
    /* The current block was not disturbed: the next small allocation continues in it. */
    char *p2 = sl_arena_alloc(&a, 16);
    assert_ptr_equal(p2, fill + 512);
    assert_int_equal(pool.outstanding, 1);

    /* Larger than a whole block: works, its own chunk. */
    char *huge = sl_arena_alloc(&a, 5000);
    assert_non_null(huge);
    assert_int_equal((uintptr_t)huge % 16, 0);
    memset(huge, 0x22, 5000);
    char *p3 = sl_arena_alloc(&a, 32);
    assert_ptr_equal(p3, p2 + 16);
    for (int i = 0; i < 600; i++)
        assert_int_equal(big[i], 0x11);

    /* Reset frees the big chunks (LSan) and returns the pool block. */
    sl_arena_reset(&a);
    assert_int_equal(pool.outstanding, 0);

    /* A big allocation first (no current block yet), then small ones. */
    char *b0 = sl_arena_alloc(&a, 900);
    assert_non_null(b0);
    memset(b0, 1, 900);
    assert_int_equal(pool.outstanding, 0);
    char *s0 = sl_arena_alloc(&a, 8);
    assert_non_null(s0);
    assert_int_equal(pool.outstanding, 1);
    char *b1 = sl_arena_alloc(&a, 2000);
    assert_non_null(b1);
    memset(b1, 2, 2000);
    char *s1 = sl_arena_alloc(&a, 8);
    assert_ptr_equal(s1, s0 + 16);
    sl_arena_reset(&a);
    assert_int_equal(pool.outstanding, 0);
    sl_bpool_dispose(&pool);
}

static void test_arena_dup(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, 1024, 8);
    struct sl_arena a;
    sl_arena_init(&a, &pool);
    char src[] = "Authorization-free header value";
    char *d = sl_arena_dup(&a, src, sizeof src - 1);
    assert_non_null(d);
    assert_ptr_not_equal(d, src);
    assert_int_equal((uintptr_t)d % 16, 0);
    assert_memory_equal(d, src, sizeof src - 1);
    src[0] = 'X'; /* a copy, not a view */
    assert_int_equal(d[0], 'A');

    /* Zero bytes: a valid (non-NULL) pointer, and a NULL source is not read. */
    assert_non_null(sl_arena_dup(&a, NULL, 0));

    /* A dup bigger than a block goes to its own chunk. */
    char big[3000];
    fill_pattern(big, sizeof big, 7);
    char *bd = sl_arena_dup(&a, big, sizeof big);
    assert_non_null(bd);
    assert_memory_equal(bd, big, sizeof big);
    sl_arena_reset(&a);
    assert_int_equal(pool.outstanding, 0);
    sl_bpool_dispose(&pool);
}

/* Sizes near SIZE_MAX must fail cleanly instead of wrapping in the rounding and the chunk
 * size (a regression test: both once returned a tiny or overflowing allocation). */
static void test_arena_overflow_is_null(void **state)
{
    (void)state;
    struct sl_bpool pool;
    sl_bpool_init(&pool, 1024, 8);
    struct sl_arena a;
    sl_arena_init(&a, &pool);
    assert_null(sl_arena_alloc(&a, SIZE_MAX));
    assert_null(sl_arena_alloc(&a, SIZE_MAX - 20));
    sl_arena_reset(&a);
    sl_bpool_dispose(&pool);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pool_reuse),
        cmocka_unit_test(test_pool_max_free),
        cmocka_unit_test(test_pool_trim_idle),
        cmocka_unit_test(test_pool_budget),
        cmocka_unit_test(test_buf_acquire_append_consume),
        cmocka_unit_test(test_buf_append_no_fit),
        cmocka_unit_test(test_buf_compact),
        cmocka_unit_test(test_buf_release_if_empty),
        cmocka_unit_test(test_buf_random_model),
        cmocka_unit_test(test_arena_alignment),
        cmocka_unit_test(test_arena_many_small),
        cmocka_unit_test(test_arena_big_alloc_own_chunk),
        cmocka_unit_test(test_arena_dup),
        cmocka_unit_test(test_arena_overflow_is_null),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
