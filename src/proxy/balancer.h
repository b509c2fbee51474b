#ifndef SL_PROXY_BALANCER_H
#define SL_PROXY_BALANCER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config/config.h"

/*
 * Load balancing over one upstream's endpoints. Two parts:
 *  - struct sl_balancer_shared: immutable, built once per upstream per config snapshot and
 *    shared read-only by all workers (e.g. the Maglev lookup table).
 *  - struct sl_balancer: per-worker mutable state (round-robin position, in-flight counts).
 *    Never touched by another thread, so no locks or atomics.
 * Every pick is followed by exactly one release. The attempt's outcome does not come here:
 * it goes to the endpoint's shared health state (proxy/pool.h, through sl_upstream_done), the
 * one place that counts failures.
 */

enum sl_outcome {
    SL_OUTCOME_SUCCESS = 0,
    SL_OUTCOME_CONNECT_FAILURE,
    SL_OUTCOME_RESET,
    SL_OUTCOME_TIMEOUT,
    SL_OUTCOME_HTTP_5XX,
    SL_OUTCOME_CANCELLED, /* client went away; says nothing about the endpoint */
};

struct sl_balancer_shared;
struct sl_balancer;

/* Max endpoints one pick can exclude: the tries of one request (1 + retries.attempts). */
#define SL_PICK_MAX_EXCLUDE 11

struct sl_pick_ctx {
    uint64_t hash;      /* key hash for balance: hash (from sl_hash_bytes) */
    bool has_hash;      /* false -> hash balancer falls back to round robin */
    const int *exclude; /* endpoint indexes not to pick (tried already) */
    size_t exclude_count;
    const uint64_t *mask; /* eligible endpoints as a bitmap (bit i = index i); NULL = all */
};

/* Builds the shared part for `n` endpoints with these weights (NULL = all 1) and addresses
 * (the Maglev placement keys; copied). NULL on allocation failure. */
struct sl_balancer_shared *sl_balancer_shared_new(enum sl_balance policy, const uint32_t *weights,
                                                  const char *const *addresses, size_t n);
void sl_balancer_shared_free(struct sl_balancer_shared *s);

/* Per-worker state over a shared part (which must outlive it). NULL on allocation failure. */
struct sl_balancer *sl_balancer_new(const struct sl_balancer_shared *s);
void sl_balancer_free(struct sl_balancer *b);

/*
 * Picks an endpoint index in [0, endpoint_count), or -1 when every endpoint is excluded
 * (or there are none). Weighted round robin: smooth weighted RR. Least request: power of two
 * random choices over in-flight counts divided by weight. Hash: Maglev lookup on ctx->hash;
 * when the chosen endpoint is excluded, walks to the next distinct entry.
 * Increments the endpoint's in-flight count.
 * Details: excluded endpoints take no part in a round-robin step (their current weight is
 * left as is); least_request compares (in-flight + 1) / weight of two distinct random
 * eligible endpoints (ties: either, at random); hash without ctx->has_hash uses smooth
 * weighted round robin. `ctx` may be NULL (no hash, nothing excluded). Never allocates.
 */
int sl_balancer_pick(struct sl_balancer *b, const struct sl_pick_ctx *ctx);

/* Ends an attempt started by pick on endpoint `idx`: decrements its in-flight count. */
void sl_balancer_release(struct sl_balancer *b, int idx);

/* Sets endpoint `idx`'s in-flight count (carrying counts over to a new endpoint set). */
void sl_balancer_set_inflight(struct sl_balancer *b, int idx, uint32_t n);

/* In-flight attempts on endpoint `idx` from this worker (for tests and metrics). */
uint32_t sl_balancer_inflight(const struct sl_balancer *b, int idx);

/*
 * Reseeds the per-worker PRNG used by least_request. sl_balancer_new() seeds from the
 * object's address so workers differ; tests call this for reproducible picks.
 */
void sl_balancer_seed(struct sl_balancer *b, uint64_t seed);

/*
 * Maglev lookup table size (a prime >= 100 x endpoints, at least 65537) for balance: hash;
 * 0 for other policies or no endpoints.
 */
size_t sl_balancer_shared_maglev_size(const struct sl_balancer_shared *s);

#endif
