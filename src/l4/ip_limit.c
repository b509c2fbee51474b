#include "l4/ip_limit.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "core/hash.h"

/*
 * The state word: | gen:6 | count:14 | tat:44 |.
 *
 * tat is the GCRA theoretical arrival time in µs modulo 2^44 (about 203 days). Only its
 * distance ahead of now matters, which is at most tau + period (< 2^42, checked at creation):
 * a TAT that reads as further ahead is in the past, so the bucket is full. A key left untouched
 * in its slot for about five months could alias back into the window and be refused for at
 * most tau + period once; 64 bits cannot hold a count, a full time and a generation.
 *
 * count == BUSY marks a slot being claimed for a new key. gen changes with every claim, so a
 * thread that read a slot's state before it changed hands cannot complete its CAS on the new
 * key's state even when count and tat happen to match.
 */
#define TAT_BITS 44
#define TAT_MASK ((UINT64_C(1) << TAT_BITS) - 1)
#define COUNT_SHIFT TAT_BITS
#define COUNT_MASK UINT64_C(0x3fff)
#define GEN_SHIFT 58
#define BUSY ((uint32_t)COUNT_MASK)
#define HORIZON_MAX (UINT64_C(1) << 42)

#define GROUP 4
/* Claim races lost in a row before a connection is let through uncounted. */
#define ATTEMPTS 64

struct slot {
    _Atomic uint64_t key; /* 0 = unused */
    _Atomic uint64_t state;
};

struct sl_ip_limit {
    _Atomic uint32_t refs;
    uint64_t sipkey[2];
    size_t mask;
    struct slot *slots;
    uint32_t max_conns;
    uint64_t period_us, tau_us, horizon_us;
    uint8_t v4_bits, v6_bits;
    /* Bumped by every worker under a flood of refusals: kept off the read-mostly line. */
    _Alignas(64) _Atomic uint64_t refused_conns;
    _Atomic uint64_t refused_rate, untracked, unmatched;
};

static uint32_t st_count(uint64_t s)
{
    return (uint32_t)((s >> COUNT_SHIFT) & COUNT_MASK);
}

static uint64_t st_gen(uint64_t s)
{
    return s >> GEN_SHIFT;
}

static uint64_t st_make(uint64_t gen, uint32_t count, uint64_t tat)
{
    return ((gen & 63u) << GEN_SHIFT) | ((uint64_t)count << COUNT_SHIFT) | (tat & TAT_MASK);
}

/* How far the bucket's TAT is ahead of now (0: full bucket). */
static uint64_t st_ahead(const struct sl_ip_limit *l, uint64_t s, uint64_t now)
{
    uint64_t a = ((s & TAT_MASK) - now) & TAT_MASK;
    return a <= l->horizon_us ? a : 0;
}

const char *sl_ip_limit_reason_name(enum sl_ip_limit_reason r)
{
    switch (r) {
    case SL_IP_LIMIT_OK:
        return "ok";
    case SL_IP_LIMIT_UNTRACKED:
        return "untracked";
    case SL_IP_LIMIT_CONNS:
        return "conns";
    case SL_IP_LIMIT_RATE:
        return "rate";
    }
    return "unknown";
}

struct sl_ip_limit *sl_ip_limit_new(const struct sl_ip_limit_conf *conf, int *err)
{
    uint8_t v4 = conf->v4_prefix_bits ? conf->v4_prefix_bits : 32;
    uint8_t v6 = conf->v6_prefix_bits ? conf->v6_prefix_bits : 64;
    *err = -EINVAL;
    if (conf->max_keys == 0 || conf->max_keys > SL_IP_LIMIT_MAX_KEYS ||
        conf->max_conns > SL_IP_LIMIT_MAX_CONNS || v4 > 32 || v6 > 128)
        return NULL;
    if (conf->period_us >= HORIZON_MAX ||
        (conf->period_us && (uint64_t)conf->burst + 1 >= HORIZON_MAX / conf->period_us))
        return NULL;
    *err = -ENOMEM;
    /* Twice the keys in slots, as rl_table: with two choices of 4 slots nearly every key keeps
     * its slot up to half load. */
    size_t cap = 16;
    while (cap < 2 * conf->max_keys)
        cap <<= 1;
    size_t size = (sizeof(struct sl_ip_limit) + 63) & ~(size_t)63;
    struct sl_ip_limit *l = aligned_alloc(64, size);
    if (!l)
        return NULL;
    memset(l, 0, sizeof *l);
    l->slots = aligned_alloc(64, cap * sizeof *l->slots);
    if (!l->slots) {
        free(l);
        return NULL;
    }
    for (size_t i = 0; i < cap; i++) {
        atomic_init(&l->slots[i].key, 0);
        atomic_init(&l->slots[i].state, 0);
    }
    sl_siphash_key_init(l->sipkey);
    l->mask = cap - 1;
    l->max_conns = conf->max_conns;
    l->period_us = conf->period_us;
    l->tau_us = (uint64_t)conf->burst * conf->period_us;
    l->horizon_us = l->tau_us + conf->period_us;
    l->v4_bits = v4;
    l->v6_bits = v6;
    atomic_init(&l->refused_conns, 0);
    atomic_init(&l->refused_rate, 0);
    atomic_init(&l->untracked, 0);
    atomic_init(&l->unmatched, 0);
    atomic_init(&l->refs, 1);
    *err = 0;
    return l;
}

void sl_ip_limit_ref(struct sl_ip_limit *l)
{
    atomic_fetch_add_explicit(&l->refs, 1, memory_order_relaxed);
}

void sl_ip_limit_free(struct sl_ip_limit *l)
{
    if (!l || atomic_fetch_sub_explicit(&l->refs, 1, memory_order_acq_rel) != 1)
        return;
    free(l->slots);
    free(l);
}

size_t sl_ip_limit_capacity(const struct sl_ip_limit *l)
{
    return l->mask + 1;
}

size_t sl_ip_limit_memory_bytes(const struct sl_ip_limit *l)
{
    return (l->mask + 1) * sizeof(struct slot) + sizeof *l;
}

/* ---- keys ---- */

static void keep_prefix(unsigned char *p, size_t len, unsigned bits)
{
    for (size_t i = 0; i < len; i++) {
        if (bits >= 8) {
            bits -= 8;
            continue;
        }
        p[i] &= (unsigned char)(0xff00u >> bits);
        bits = 0;
    }
}

/* The key's hash, or 0 when `sa` is not an IP address. The family is part of the key, so an
 * IPv4 address and an IPv6 network with the same bytes stay apart. */
static uint64_t key_hash(const struct sl_ip_limit *l, const struct sockaddr *sa)
{
    unsigned char k[17] = {0};
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)(const void *)sa;
        k[0] = 4;
        memcpy(k + 1, &sin->sin_addr, 4);
        keep_prefix(k + 1, 4, l->v4_bits);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)(const void *)sa;
        if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
            k[0] = 4;
            memcpy(k + 1, sin6->sin6_addr.s6_addr + 12, 4);
            keep_prefix(k + 1, 4, l->v4_bits);
        } else {
            k[0] = 6;
            memcpy(k + 1, sin6->sin6_addr.s6_addr, 16);
            keep_prefix(k + 1, 16, l->v6_bits);
        }
    } else {
        return 0;
    }
    uint64_t h = sl_siphash(k, sizeof k, l->sipkey);
    return h ? h : 1; /* 0 marks an unused slot */
}

/* The two groups a hash may live in: independent bits of the hash, never the same group. */
static void groups_of(const struct sl_ip_limit *l, uint64_t h, struct slot *g[2])
{
    size_t gmask = (l->mask + 1) / GROUP - 1;
    size_t g1 = (size_t)h & gmask, g2 = (size_t)(h >> 32) & gmask;
    if (g2 == g1)
        g2 = g1 ^ 1;
    g[0] = &l->slots[g1 * GROUP];
    g[1] = &l->slots[g2 * GROUP];
}

/*
 * The published slot of key h: key == h and not being claimed, its state in *state. A key has
 * at most one published slot (see claim). Loads are acquire, pairing with the release that
 * publishes a claimed slot: a state read after that publication comes with the new key.
 */
static struct slot *find(struct slot *g[2], uint64_t h, uint64_t *state)
{
    for (int gi = 0; gi < 2; gi++) {
        for (int i = 0; i < GROUP; i++) {
            struct slot *s = &g[gi][i];
            if (atomic_load_explicit(&s->key, memory_order_acquire) != h)
                continue;
            uint64_t st = atomic_load_explicit(&s->state, memory_order_acquire);
            /* Re-read the key after the state: the slot may have changed hands in between, and
             * then this state belongs to its new key. */
            if (st_count(st) == BUSY || atomic_load_explicit(&s->key, memory_order_acquire) != h)
                continue;
            *state = st;
            return s;
        }
    }
    return NULL;
}

/* ---- decisions ---- */

enum outcome { DONE_OK, DONE_REFUSED, RETRY };

/* One decision on a key's published slot: a CAS loop on its state, refusing without writing.
 * RETRY when the slot changed hands meanwhile. */
static enum outcome decide(struct sl_ip_limit *l, struct slot *s, uint64_t h, uint64_t st,
                           uint64_t now, enum sl_ip_limit_reason *why)
{
    for (;;) {
        uint32_t count = st_count(st);
        if (count == BUSY)
            return RETRY;
        if (l->max_conns && count >= l->max_conns) {
            atomic_fetch_add_explicit(&l->refused_conns, 1, memory_order_relaxed);
            *why = SL_IP_LIMIT_CONNS;
            return DONE_REFUSED;
        }
        uint64_t tat = st & TAT_MASK;
        if (l->period_us) {
            uint64_t ahead = st_ahead(l, st, now);
            if (ahead > l->tau_us) {
                atomic_fetch_add_explicit(&l->refused_rate, 1, memory_order_relaxed);
                *why = SL_IP_LIMIT_RATE;
                return DONE_REFUSED;
            }
            tat = now + ahead + l->period_us;
        }
        uint64_t next = st_make(st_gen(st), l->max_conns ? count + 1 : count, tat);
        if (atomic_compare_exchange_weak_explicit(&s->state, &st, next, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            /* The generation has 6 bits: a thread stalled between reading the state and this
             * CAS (preempted, say) may have seen the slot change hands 64 times and come back
             * to the same word under another key; with no rate the time is always 0 and that
             * is not rare. The key read now is the one of the state we replaced (the slot
             * cannot change hands again while our count is in it): if it is not ours, take
             * the count back and look again. */
            if (l->max_conns && atomic_load_explicit(&s->key, memory_order_acquire) != h) {
                uint64_t cur = atomic_load_explicit(&s->state, memory_order_relaxed);
                while (!atomic_compare_exchange_weak_explicit(
                    &s->state, &cur, cur - (UINT64_C(1) << COUNT_SHIFT), memory_order_acq_rel,
                    memory_order_relaxed))
                    ;
                return RETRY;
            }
            *why = SL_IP_LIMIT_OK;
            return DONE_OK;
        }
        /* The generation moved: the slot went to another key. */
        if (atomic_load_explicit(&s->key, memory_order_acquire) != h)
            return RETRY;
    }
}

/*
 * Takes slot `c` (state `st` seen with no connection open) for new key h and records its first
 * connection. Two threads may insert the same key at once into different slots: each writes
 * its key, then looks for the key elsewhere, both with sequentially consistent order, so at
 * least one of them sees the other (as in Dekker's algorithm) and backs off. Hence no key ever
 * has two published slots, which is what lets each release find the slot its acquire counted.
 */
static enum outcome claim(struct sl_ip_limit *l, struct slot *g[2], struct slot *c, uint64_t h,
                          uint64_t st, uint64_t now, enum sl_ip_limit_reason *why)
{
    uint64_t gen = st_gen(st) + 1;
    if (!atomic_compare_exchange_strong_explicit(&c->state, &st, st_make(gen, BUSY, 0),
                                                 memory_order_acq_rel, memory_order_relaxed))
        return RETRY;
    atomic_store_explicit(&c->key, h, memory_order_seq_cst);
    for (int gi = 0; gi < 2; gi++) {
        for (int i = 0; i < GROUP; i++) {
            struct slot *s = &g[gi][i];
            if (s != c && atomic_load_explicit(&s->key, memory_order_seq_cst) == h) {
                atomic_store_explicit(&c->key, 0, memory_order_relaxed);
                atomic_store_explicit(&c->state, st_make(gen, 0, 0), memory_order_release);
                return RETRY;
            }
        }
    }
    /* From an empty bucket the first connection always passes (burst >= 0, cap >= 1). */
    uint64_t tat = l->period_us ? now + l->period_us : 0;
    atomic_store_explicit(&c->state, st_make(gen, l->max_conns ? 1 : 0, tat), memory_order_release);
    *why = SL_IP_LIMIT_OK;
    return DONE_OK;
}

bool sl_ip_limit_acquire(struct sl_ip_limit *l, const struct sockaddr *sa, uint64_t now_us,
                         enum sl_ip_limit_reason *why)
{
    enum sl_ip_limit_reason dummy;
    if (!why)
        why = &dummy;
    *why = SL_IP_LIMIT_OK;
    if (!l->max_conns && !l->period_us)
        return true;
    uint64_t h = key_hash(l, sa);
    if (!h) {
        *why = SL_IP_LIMIT_UNTRACKED;
        return true;
    }
    struct slot *g[2];
    groups_of(l, h, g);
    for (int attempt = 0; attempt < ATTEMPTS; attempt++) {
        uint64_t st;
        struct slot *s = find(g, h, &st);
        if (s) {
            enum outcome o = decide(l, s, h, st, now_us, why);
            if (o != RETRY)
                return o == DONE_OK;
            continue;
        }
        /* A new key. Reuse a slot as good as free (nothing open, bucket full) in the group with
         * more of them; else forget the rate history closest to full; never a slot with
         * connections open, nor one being claimed. */
        struct slot *cand = NULL, *first_free[2] = {NULL, NULL};
        uint64_t cand_st = 0, free_st[2] = {0, 0}, best_ahead = UINT64_MAX;
        unsigned free_count[2] = {0, 0};
        bool busy_h = false;
        for (int gi = 0; gi < 2; gi++) {
            for (int i = 0; i < GROUP; i++) {
                struct slot *x = &g[gi][i];
                uint64_t k = atomic_load_explicit(&x->key, memory_order_acquire);
                uint64_t xs = atomic_load_explicit(&x->state, memory_order_acquire);
                if (st_count(xs) == BUSY) {
                    busy_h |= k == h;
                    continue;
                }
                if (st_count(xs) != 0)
                    continue;
                uint64_t ahead = k ? st_ahead(l, xs, now_us) : 0;
                if (ahead == 0) {
                    if (!free_count[gi]++) {
                        first_free[gi] = x;
                        free_st[gi] = xs;
                    }
                } else if (ahead < best_ahead) {
                    cand = x;
                    cand_st = xs;
                    best_ahead = ahead;
                }
            }
        }
        if (busy_h)
            continue; /* another thread is placing this key: use its slot once published */
        if (free_count[0] || free_count[1]) {
            int gi = free_count[1] > free_count[0];
            cand = first_free[gi];
            cand_st = free_st[gi];
        }
        if (!cand)
            break;
        enum outcome o = claim(l, g, cand, h, cand_st, now_us, why);
        if (o != RETRY)
            return o == DONE_OK;
    }
    atomic_fetch_add_explicit(&l->untracked, 1, memory_order_relaxed);
    *why = SL_IP_LIMIT_UNTRACKED;
    return true;
}

void sl_ip_limit_release(struct sl_ip_limit *l, const struct sockaddr *sa)
{
    if (!l->max_conns)
        return;
    uint64_t h = key_hash(l, sa);
    if (!h)
        return;
    struct slot *g[2];
    groups_of(l, h, g);
    /* The slot that counted this connection keeps count >= 1 until this release, so it is
     * never claimed meanwhile and never BUSY: find() cannot miss it. */
    uint64_t st;
    struct slot *s = find(g, h, &st);
    while (s && st_count(st) > 0 && st_count(st) != BUSY) {
        uint64_t next = st - (UINT64_C(1) << COUNT_SHIFT);
        if (atomic_compare_exchange_weak_explicit(&s->state, &st, next, memory_order_acq_rel,
                                                  memory_order_acquire))
            return;
    }
    atomic_fetch_add_explicit(&l->unmatched, 1, memory_order_relaxed);
}

uint32_t sl_ip_limit_count(const struct sl_ip_limit *l, const struct sockaddr *sa)
{
    uint64_t h = key_hash(l, sa);
    if (!h)
        return 0;
    struct slot *g[2];
    groups_of(l, h, g);
    uint64_t st;
    return find(g, h, &st) ? st_count(st) : 0;
}

void sl_ip_limit_stats(const struct sl_ip_limit *l, struct sl_ip_limit_stats *out)
{
    out->refused_conns = atomic_load_explicit(&l->refused_conns, memory_order_relaxed);
    out->refused_rate = atomic_load_explicit(&l->refused_rate, memory_order_relaxed);
    out->untracked = atomic_load_explicit(&l->untracked, memory_order_relaxed);
    out->unmatched = atomic_load_explicit(&l->unmatched, memory_order_relaxed);
}
