#ifndef SL_FILTERS_RL_TABLE_H
#define SL_FILTERS_RL_TABLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * Local rate limiting: GCRA (the generic cell rate algorithm, a leaky bucket kept as one
 * timestamp per key) over a fixed-size open-addressing table shared by every worker thread,
 * without locks.
 *
 * Each slot holds an atomic 64-bit key hash and an atomic 64-bit TAT (theoretical arrival
 * time, µs on CLOCK_MONOTONIC). A decision is a compare-and-swap loop on the TAT, so one key
 * stays exact however many threads hit it at once.
 *
 * GCRA with period T (1 s / rate) and tolerance tau = burst * T: a request at `now` passes
 * when max(TAT, now) - now <= tau, and then TAT becomes max(TAT, now) + T. From idle, burst+1
 * requests pass at once, then one per T. A slot whose TAT <= now is in the same state as a
 * key never seen, which is what makes eviction cheap: reusing such a slot loses nothing.
 *
 * Keys are hashed with SipHash-2-4 (core/hash.h) under a random per-table key, so a client
 * cannot choose values that collide in the table. Memory is fixed at creation.
 */

/* Slots per group. A key lives in one of two groups picked by its hash (2 x 4 slots probed,
 * one 64-byte line each): two choices keep groups even, where linear probing would build
 * clusters and evict live keys at half load. */
#define SL_RL_GROUP 4

/* Largest max_keys accepted (2^24 slots = 256 MiB). */
#define SL_RL_MAX_KEYS (1u << 23)

struct sl_rl_table;

/* A limit: emission interval and extra requests allowed at once. */
struct sl_rl_limit {
    uint64_t period_us; /* 1 s / rate, rounded up; >= 1 */
    uint64_t burst;
};

/* One decision. Times are µs. */
struct sl_rl_decision {
    bool allowed;
    uint64_t limit;          /* burst + 1: requests allowed at once from idle */
    uint64_t remaining;      /* requests that would still pass right now (0 when refused) */
    uint64_t reset_us;       /* until the bucket is full again (idle state) */
    uint64_t retry_after_us; /* refused: until one request would pass; allowed: 0 */
};

/*
 * Creates a table for `max_keys` live keys (1..SL_RL_MAX_KEYS): 2 x max_keys rounded up to a
 * power of two slots (at least 16), 16 bytes each. Up to about 3/4 of max_keys live keys every
 * key keeps its slot; at max_keys nearly all do (measured: 1 in 10^5 evicted); beyond, the
 * least-informative buckets are evicted (see decide). Memory is fixed from here on. Returns
 * NULL when out of memory. Caller owns; release with sl_rl_table_free().
 */
struct sl_rl_table *sl_rl_table_new(size_t max_keys);

/* Frees the table. No decision may be running. NULL is fine. */
void sl_rl_table_free(struct sl_rl_table *t);

/* Number of slots (2 x max_keys rounded up to a power of two). */
size_t sl_rl_table_capacity(const struct sl_rl_table *t);

/* Slots holding a key whose bucket is not full at `now_us` (a scan, for tests and status). */
size_t sl_rl_table_live_count(const struct sl_rl_table *t, uint64_t now_us);

/*
 * Decides one request for `key` (`len` bytes, borrowed for the call) under `lim` at `now_us`
 * and writes the outcome to *out. Thread-safe and lock-free; never allocates, never calls back.
 *
 * Exact for every key that keeps its slot. Inexact cases, all under a flood of distinct keys:
 * - when all 8 slots of a key's two groups are live, the one with the smallest TAT (the bucket
 *   closest to full, so the least information) is evicted and its key starts over as new
 *   (this starts to happen as live keys approach the capacity);
 * - two threads inserting the same new key while a third changes its groups may give it two
 *   slots; lookups then use the first one and the other expires unused (one extra burst);
 * - two threads racing to reuse the same slot for different keys may let the newcomer
 *   inherit the evicted key's TAT (stricter, never looser) for one decision;
 * - after 16 lost claim races in a row (pathological contention) the request is decided as
 *   a new key's first request without being recorded.
 */
void sl_rl_table_decide(struct sl_rl_table *t, const void *key, size_t len,
                        const struct sl_rl_limit *lim, uint64_t now_us, struct sl_rl_decision *out);

/* CLOCK_MONOTONIC in µs (the clock decisions are made against). */
uint64_t sl_rl_now_us(void);

/* First 16 bytes of SHA-256 of `len` bytes at `p`: the stable digest that stands for a key
 * part too long to keep whole (the same on every gateway instance, for Redis keys). */
void sl_rl_digest128(const void *p, size_t len, unsigned char out[16]);

#endif
