#include "proxy/balancer.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/hash.h"
#include "core/rand.h"

/* Seeds of the two Maglev permutation hashes; part of key placement, never change them. */
#define MAGLEV_SEED_OFFSET 0x6d61676c65763031ull
#define MAGLEV_SEED_SKIP 0x6d61676c65763032ull

/* Maglev table size floor (the paper's value); about 100 slots per endpoint keeps each
   endpoint's share within ~1 % of its weight. */
#define MAGLEV_MIN_SIZE 65537u
#define MAGLEV_SLOTS_PER_ENDPOINT 100u

struct sl_balancer_shared {
    size_t n;
    enum sl_balance policy;
    uint32_t *weights;
    char **addresses; /* Maglev placement keys */
    uint32_t *maglev; /* endpoint index per slot, only for SL_BALANCE_HASH */
    uint32_t maglev_size;
};

struct sl_balancer {
    const struct sl_balancer_shared *s;
    int64_t *current; /* smooth WRR current weights */
    uint32_t *inflight;
    uint64_t rng;
};

/* ---- shared part ------------------------------------------------------------------------ */

static bool is_prime(uint64_t v)
{
    if (v < 2)
        return false;
    for (uint64_t d = 2; d * d <= v; d++)
        if (v % d == 0)
            return false;
    return true;
}

static uint32_t maglev_size_for(size_t n)
{
    uint64_t want = (uint64_t)n * MAGLEV_SLOTS_PER_ENDPOINT;
    if (want < MAGLEV_MIN_SIZE)
        return MAGLEV_MIN_SIZE;
    while (!is_prime(want))
        want++;
    return want > UINT32_MAX ? 0 : (uint32_t)want;
}

/*
 * Maglev (Eisenbud et al., NSDI 2016) with weights: each endpoint walks its own permutation
 * of the table (offset + j * skip, skip coprime to the prime size) claiming the next free slot.
 * Weights are honoured by letting endpoint i claim a slot in a round only when its running
 * credit reaches the max weight, so over w_max rounds it claims w_i slots; the max-weight
 * endpoint claims every round, which bounds the loop.
 */
static int maglev_build(struct sl_balancer_shared *s)
{
    const uint32_t m = maglev_size_for(s->n);
    if (m == 0)
        return -1;
    uint32_t *table = malloc((size_t)m * sizeof *table);
    uint64_t *offset = calloc(s->n, sizeof *offset);
    uint64_t *skip = calloc(s->n, sizeof *skip);
    uint64_t *next = calloc(s->n, sizeof *next);
    uint64_t *credit = calloc(s->n, sizeof *credit);
    int rc = -1;
    if (!table || !offset || !skip || !next || !credit)
        goto out;

    uint32_t wmax = 0;
    for (size_t i = 0; i < s->n; i++) {
        const char *addr = s->addresses[i] ? s->addresses[i] : "";
        size_t len = strlen(addr);
        offset[i] = sl_hash_bytes(addr, len, MAGLEV_SEED_OFFSET) % m;
        skip[i] = sl_hash_bytes(addr, len, MAGLEV_SEED_SKIP) % (m - 1) + 1;
        if (s->weights[i] > wmax)
            wmax = s->weights[i];
    }
    memset(table, 0xff, (size_t)m * sizeof *table);
    uint32_t filled = 0;
    while (filled < m) {
        for (size_t i = 0; i < s->n && filled < m; i++) {
            credit[i] += s->weights[i];
            if (credit[i] < wmax)
                continue;
            credit[i] -= wmax;
            uint64_t c = (offset[i] + next[i] * skip[i]) % m;
            while (table[c] != UINT32_MAX) {
                next[i]++;
                c = (offset[i] + next[i] * skip[i]) % m;
            }
            table[c] = (uint32_t)i;
            next[i]++;
            filled++;
        }
    }
    s->maglev = table;
    s->maglev_size = m;
    table = NULL;
    rc = 0;
out:
    free(table);
    free(offset);
    free(skip);
    free(next);
    free(credit);
    return rc;
}

void sl_balancer_shared_free(struct sl_balancer_shared *s)
{
    if (!s)
        return;
    for (size_t i = 0; s->addresses && i < s->n; i++)
        free(s->addresses[i]);
    free(s->addresses);
    free(s->weights);
    free(s->maglev);
    free(s);
}

struct sl_balancer_shared *sl_balancer_shared_new(enum sl_balance policy, const uint32_t *weights,
                                                  const char *const *addresses, size_t n)
{
    struct sl_balancer_shared *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->n = n;
    s->policy = policy;
    /* pick returns an int and the table stores uint32_t indexes */
    if (s->n > INT32_MAX)
        goto fail;
    if (s->n) {
        s->weights = malloc(s->n * sizeof *s->weights);
        s->addresses = calloc(s->n, sizeof *s->addresses);
        if (!s->weights || !s->addresses)
            goto fail;
        for (size_t i = 0; i < s->n; i++) {
            /* the schema enforces 1..1000; 0 would starve SWRR and break Maglev's loop */
            uint32_t w = weights ? weights[i] : 1;
            s->weights[i] = w ? w : 1;
            if (!(s->addresses[i] = strdup(addresses && addresses[i] ? addresses[i] : "")))
                goto fail;
        }
    }
    if (s->policy == SL_BALANCE_HASH && s->n && maglev_build(s) != 0)
        goto fail;
    return s;
fail:
    sl_balancer_shared_free(s);
    return NULL;
}

size_t sl_balancer_shared_maglev_size(const struct sl_balancer_shared *s)
{
    return s->maglev_size;
}

/* ---- per-worker part -------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

void sl_balancer_seed(struct sl_balancer *b, uint64_t seed)
{
    b->rng = splitmix64(seed);
    if (b->rng == 0) /* xorshift's one fixed point */
        b->rng = 1;
}

struct sl_balancer *sl_balancer_new(const struct sl_balancer_shared *s)
{
    struct sl_balancer *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    b->s = s;
    if (s->n) {
        b->current = calloc(s->n, sizeof *b->current);
        b->inflight = calloc(s->n, sizeof *b->inflight);
        if (!b->current || !b->inflight) {
            sl_balancer_free(b);
            return NULL;
        }
    }
    /* distinct per worker without shared state: each worker's object has its own address */
    sl_balancer_seed(b, (uint64_t)(uintptr_t)b);
    return b;
}

void sl_balancer_free(struct sl_balancer *b)
{
    if (!b)
        return;
    free(b->current);
    free(b->inflight);
    free(b);
}

static uint64_t rng_next(struct sl_balancer *b)
{
    return sl_rand_next(&b->rng);
}

/* Uniform-enough value in [0, n) without division (Lemire's multiply-shift). */
static size_t rng_below(struct sl_balancer *b, size_t n)
{
    __extension__ unsigned __int128 r = (unsigned __int128)rng_next(b) * n;
    return (size_t)(r >> 64);
}

static bool is_excluded(const struct sl_pick_ctx *ctx, size_t idx)
{
    if (!ctx)
        return false;
    if (ctx->mask && !((ctx->mask[idx / 64] >> (idx % 64)) & 1u))
        return true;
    for (size_t i = 0; i < ctx->exclude_count; i++)
        if (ctx->exclude[i] >= 0 && (size_t)ctx->exclude[i] == idx)
            return true;
    return false;
}

/* Endpoints left after exclusion; duplicate and out-of-range exclusions are ignored. */
static size_t eligible_count(size_t n, const struct sl_pick_ctx *ctx)
{
    if (!ctx || (ctx->exclude_count == 0 && !ctx->mask))
        return n;
    if (ctx->mask) {
        size_t m = 0;
        for (size_t i = 0; i < n; i++)
            m += !is_excluded(ctx, i);
        return m;
    }
    size_t excluded = 0;
    for (size_t i = 0; i < ctx->exclude_count; i++) {
        int e = ctx->exclude[i];
        if (e < 0 || (size_t)e >= n)
            continue;
        bool dup = false;
        for (size_t j = 0; j < i && !dup; j++)
            dup = ctx->exclude[j] == e;
        excluded += !dup;
    }
    return n - excluded;
}

/* The k-th (0-based) non-excluded endpoint. */
static size_t nth_eligible(size_t n, const struct sl_pick_ctx *ctx, size_t k)
{
    if (!ctx || (ctx->exclude_count == 0 && !ctx->mask))
        return k;
    for (size_t i = 0; i < n; i++) {
        if (is_excluded(ctx, i))
            continue;
        if (k-- == 0)
            return i;
    }
    return n; /* unreachable when k < eligible_count */
}

/*
 * nginx's smooth weighted round robin: every eligible endpoint gains its weight, the largest
 * current wins and pays back the total. Excluded endpoints neither gain nor pay, so a retry
 * does not disturb the long-run proportions of the others.
 */
static int pick_swrr(struct sl_balancer *b, const struct sl_pick_ctx *ctx)
{
    const struct sl_balancer_shared *s = b->s;
    int64_t total = 0;
    size_t best = s->n;
    for (size_t i = 0; i < s->n; i++) {
        if (is_excluded(ctx, i))
            continue;
        b->current[i] += s->weights[i];
        total += s->weights[i];
        if (best == s->n || b->current[i] > b->current[best])
            best = i;
    }
    if (best == s->n)
        return -1;
    b->current[best] -= total;
    return (int)best;
}

/* A random eligible endpoint other than `skip`, by rejection sampling: O(1) expected while
 * most endpoints are eligible. s->n when a few draws found none (the caller then counts). */
static size_t draw_eligible(struct sl_balancer *b, const struct sl_pick_ctx *ctx, size_t skip)
{
    const struct sl_balancer_shared *s = b->s;
    for (int i = 0; i < 8; i++) {
        size_t k = rng_below(b, s->n);
        if (k != skip && !is_excluded(ctx, k))
            return k;
    }
    return s->n;
}

/*
 * Power of two choices. Load is (in-flight + 1) / weight, compared by cross-multiplying: the
 * +1 makes an idle heavy endpoint preferred over an idle light one instead of a coin toss,
 * and equals plain in-flight comparison when weights are equal.
 */
static int pick_p2c(struct sl_balancer *b, const struct sl_pick_ctx *ctx)
{
    const struct sl_balancer_shared *s = b->s;
    if (ctx && (ctx->mask || ctx->exclude_count) && s->n > 16) {
        /* Large pools with some endpoints out: sample instead of counting all of them. */
        size_t a = draw_eligible(b, ctx, s->n);
        size_t c = a < s->n ? draw_eligible(b, ctx, a) : s->n;
        if (c < s->n) {
            uint64_t la = ((uint64_t)b->inflight[a] + 1) * s->weights[c];
            uint64_t lc = ((uint64_t)b->inflight[c] + 1) * s->weights[a];
            return (int)(la <= lc ? a : c);
        }
    }
    size_t m = eligible_count(s->n, ctx);
    if (m == 0)
        return -1;
    if (m == 1)
        return (int)nth_eligible(s->n, ctx, 0);
    size_t ka = rng_below(b, m);
    size_t kb = rng_below(b, m - 1);
    if (kb >= ka)
        kb++;
    size_t a = nth_eligible(s->n, ctx, ka), c = nth_eligible(s->n, ctx, kb);
    uint64_t la = ((uint64_t)b->inflight[a] + 1) * s->weights[c];
    uint64_t lc = ((uint64_t)b->inflight[c] + 1) * s->weights[a];
    if (la != lc)
        return (int)(la < lc ? a : c);
    /* ka and kb were random, so taking `a` on a tie is already a fair coin */
    return (int)a;
}

static int pick_maglev(struct sl_balancer *b, const struct sl_pick_ctx *ctx)
{
    const struct sl_balancer_shared *s = b->s;
    if (eligible_count(s->n, ctx) == 0)
        return -1;
    uint32_t m = s->maglev_size;
    uint32_t slot = (uint32_t)(ctx->hash % m);
    /* at least one endpoint is eligible and each owns some slot, so this ends within m */
    for (uint32_t i = 0; i < m; i++) {
        uint32_t idx = s->maglev[slot];
        if (!is_excluded(ctx, idx))
            return (int)idx;
        slot = slot + 1 == m ? 0 : slot + 1;
    }
    return -1;
}

int sl_balancer_pick(struct sl_balancer *b, const struct sl_pick_ctx *ctx)
{
    const struct sl_balancer_shared *s = b->s;
    int idx;
    if (s->n == 0)
        return -1;
    switch (s->policy) {
    case SL_BALANCE_LEAST_REQUEST:
        idx = pick_p2c(b, ctx);
        break;
    case SL_BALANCE_HASH:
        if (ctx && ctx->has_hash && s->maglev) {
            idx = pick_maglev(b, ctx);
            break;
        }
        idx = pick_swrr(b, ctx);
        break;
    case SL_BALANCE_ROUND_ROBIN:
    default:
        idx = pick_swrr(b, ctx);
        break;
    }
    if (idx >= 0)
        b->inflight[idx]++;
    return idx;
}

void sl_balancer_release(struct sl_balancer *b, int idx)
{
    if (idx < 0 || (size_t)idx >= b->s->n)
        return;
    if (b->inflight[idx] > 0)
        b->inflight[idx]--;
}

void sl_balancer_set_inflight(struct sl_balancer *b, int idx, uint32_t n)
{
    if (idx >= 0 && (size_t)idx < b->s->n)
        b->inflight[idx] = n;
}

uint32_t sl_balancer_inflight(const struct sl_balancer *b, int idx)
{
    if (idx < 0 || (size_t)idx >= b->s->n)
        return 0;
    return b->inflight[idx];
}
