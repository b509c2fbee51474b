#include "filters/rl_table.h"

#include "core/sha256.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/hash.h"

/*
 * Memory ordering: every decision reads and writes one atomic (the slot's TAT), and the key
 * word is only compared, never used to publish other data, so relaxed order is enough; the
 * CAS alone makes each key's decisions linearizable.
 */
struct sl_rl_slot {
    _Atomic uint64_t key; /* 0 = never used */
    _Atomic uint64_t tat;
};

struct sl_rl_table {
    uint64_t sipkey[2];
    size_t mask;
    struct sl_rl_slot *slots;
};

/* Claim races lost in a row before a decision gives up on recording (see the header). */
#define CLAIM_ATTEMPTS 16

struct sl_rl_table *sl_rl_table_new(size_t max_keys)
{
    if (max_keys == 0 || max_keys > SL_RL_MAX_KEYS)
        return NULL;
    /* Twice the keys: with two 4-slot choices a table at half load keeps nearly every live key
     * (measured over 131072 slots: all but 1 in 10^5 at 50% load, 99% at 75%, 87% at 100%). */
    size_t cap = 16;
    while (cap < 2 * max_keys)
        cap <<= 1;
    struct sl_rl_table *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    sl_siphash_key_init(t->sipkey);
    /* One group per cache line: a lookup touches exactly two lines. */
    t->slots = aligned_alloc(64, cap * sizeof *t->slots);
    if (!t->slots) {
        free(t);
        return NULL;
    }
    for (size_t i = 0; i < cap; i++) {
        atomic_init(&t->slots[i].key, 0);
        atomic_init(&t->slots[i].tat, 0);
    }
    t->mask = cap - 1;
    return t;
}

void sl_rl_table_free(struct sl_rl_table *t)
{
    if (!t)
        return;
    free(t->slots);
    free(t);
}

size_t sl_rl_table_capacity(const struct sl_rl_table *t)
{
    return t->mask + 1;
}

size_t sl_rl_table_live_count(const struct sl_rl_table *t, uint64_t now_us)
{
    size_t n = 0;
    for (size_t i = 0; i <= t->mask; i++)
        if (atomic_load_explicit(&t->slots[i].key, memory_order_relaxed) != 0 &&
            atomic_load_explicit(&t->slots[i].tat, memory_order_relaxed) > now_us)
            n++;
    return n;
}

static void first_request(const struct sl_rl_limit *lim, struct sl_rl_decision *out)
{
    out->allowed = true;
    out->limit = lim->burst + 1;
    out->remaining = lim->burst;
    out->reset_us = lim->period_us;
    out->retry_after_us = 0;
}

/*
 * The CAS loop on one slot's TAT. `fresh`: the slot was just taken from a live key, so while
 * its TAT is still the one seen (`seen_tat`) the newcomer starts from idle instead of
 * inheriting it.
 */
static void gcra(struct sl_rl_slot *s, const struct sl_rl_limit *lim, uint64_t now, bool fresh,
                 uint64_t seen_tat, struct sl_rl_decision *out)
{
    uint64_t period = lim->period_us, tau = lim->burst * lim->period_us;
    uint64_t tat = atomic_load_explicit(&s->tat, memory_order_relaxed);
    out->limit = lim->burst + 1;
    for (;;) {
        uint64_t base = (fresh && tat == seen_tat) ? now : (tat > now ? tat : now);
        uint64_t ahead = base - now;
        if (ahead > tau) {
            out->allowed = false;
            out->remaining = 0;
            out->reset_us = ahead;
            out->retry_after_us = ahead - tau;
            return;
        }
        uint64_t next = base + period;
        if (atomic_compare_exchange_weak_explicit(&s->tat, &tat, next, memory_order_relaxed,
                                                  memory_order_relaxed)) {
            out->allowed = true;
            /* next - now <= tau + period here, so this never underflows. */
            out->remaining = (tau + period - (next - now)) / period;
            out->reset_us = next - now;
            out->retry_after_us = 0;
            return;
        }
    }
}

/* The two groups a hash may live in: independent bits of the hash, never the same group. */
static void groups_of(const struct sl_rl_table *t, uint64_t h, struct sl_rl_slot *g[2])
{
    size_t gmask = (t->mask + 1) / SL_RL_GROUP - 1;
    size_t g1 = (size_t)h & gmask, g2 = (size_t)(h >> 32) & gmask;
    if (g2 == g1)
        g2 = g1 ^ 1;
    g[0] = &t->slots[g1 * SL_RL_GROUP];
    g[1] = &t->slots[g2 * SL_RL_GROUP];
}

void sl_rl_table_decide(struct sl_rl_table *t, const void *key, size_t len,
                        const struct sl_rl_limit *lim, uint64_t now_us, struct sl_rl_decision *out)
{
    uint64_t h = sl_siphash(key, len, t->sipkey);
    if (h == 0)
        h = 1; /* 0 marks an unused slot */
    struct sl_rl_slot *g[2];
    groups_of(t, h, g);
    for (int attempt = 0; attempt < CLAIM_ATTEMPTS; attempt++) {
        /* One pass over both groups: find the key, else the best slot to take. A free slot
         * (unused or expired: as good as new) goes in the group with more free slots (the
         * "power of two choices", which keeps groups even); with none free, the live slot
         * with the smallest TAT, i.e. the bucket closest to full, is evicted. */
        struct sl_rl_slot *first_free[2] = {NULL, NULL}, *oldest = NULL;
        uint64_t free_key[2] = {0, 0}, oldest_key = 0, oldest_tat = UINT64_MAX;
        unsigned free_count[2] = {0, 0};
        for (int gi = 0; gi < 2; gi++) {
            for (size_t i = 0; i < SL_RL_GROUP; i++) {
                struct sl_rl_slot *s = &g[gi][i];
                uint64_t k = atomic_load_explicit(&s->key, memory_order_relaxed);
                if (k == h) {
                    gcra(s, lim, now_us, false, 0, out);
                    return;
                }
                uint64_t tat = k ? atomic_load_explicit(&s->tat, memory_order_relaxed) : 0;
                if (k == 0 || tat <= now_us) {
                    if (!free_count[gi]++) {
                        first_free[gi] = s;
                        free_key[gi] = k;
                    }
                } else if (!oldest || tat < oldest_tat) {
                    oldest = s;
                    oldest_key = k;
                    oldest_tat = tat;
                }
            }
        }
        struct sl_rl_slot *cand;
        uint64_t cand_key;
        bool evict = false;
        if (free_count[0] || free_count[1]) {
            int gi = free_count[1] > free_count[0];
            cand = first_free[gi];
            cand_key = free_key[gi];
        } else {
            cand = oldest;
            cand_key = oldest_key;
            evict = true;
        }
        uint64_t expect = cand_key;
        if (atomic_compare_exchange_strong_explicit(&cand->key, &expect, h, memory_order_relaxed,
                                                    memory_order_relaxed)) {
            gcra(cand, lim, now_us, evict, oldest_tat, out);
            return;
        }
        if (expect == h) { /* another thread just placed this very key there */
            gcra(cand, lim, now_us, false, 0, out);
            return;
        }
        /* Someone else took the slot for another key: look again. */
    }
    first_request(lim, out);
}

uint64_t sl_rl_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

void sl_rl_digest128(const void *p, size_t len, unsigned char out[16])
{
    unsigned char full[32];
    sl_sha256(p, len, full);
    memcpy(out, full, 16);
}
