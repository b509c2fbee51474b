#include "proxy/pool.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"
#include "core/fmt.h"
#include "core/log.h"
#include "tls/tls_ctx.h"

#define RELAXED memory_order_relaxed

/* ---- sliding window ---------------------------------------------------------------------- */

/* Each bucket is two words: its full epoch (1-based bucket number; 0 = never written) and its
 * two counts packed [a:32 | b:32], each saturating. Keeping the whole epoch means a bucket
 * untouched for any length of time is never mistaken for a current one. Resetting a bucket
 * for a new epoch races with adds from other threads, which may then lose a count: fine for
 * statistics, and no lock on the request path. */
#define W_MAX 0xffffffffull

void sl_window_init(struct sl_window *w, uint64_t window_ms)
{
    for (size_t i = 0; i < SL_WINDOW_BUCKETS; i++) {
        atomic_init(&w->epoch[i], 0);
        atomic_init(&w->counts[i], 0);
    }
    w->bucket_ms = window_ms / SL_WINDOW_BUCKETS;
    if (w->bucket_ms == 0)
        w->bucket_ms = 1;
}

void sl_window_reset(struct sl_window *w)
{
    for (size_t i = 0; i < SL_WINDOW_BUCKETS; i++) {
        atomic_store_explicit(&w->epoch[i], 0, RELAXED);
        atomic_store_explicit(&w->counts[i], 0, RELAXED);
    }
}

void sl_window_add(struct sl_window *w, uint64_t now_ms, uint32_t a, uint32_t b)
{
    uint64_t e = now_ms / w->bucket_ms + 1;
    size_t slot = e % SL_WINDOW_BUCKETS;
    uint64_t cur = atomic_load_explicit(&w->epoch[slot], memory_order_acquire);
    if (cur < e && atomic_compare_exchange_strong_explicit(
                       &w->epoch[slot], &cur, e, memory_order_acq_rel, memory_order_acquire))
        atomic_store_explicit(&w->counts[slot], 0, memory_order_release);
    _Atomic uint64_t *cnt = &w->counts[slot];
    uint64_t old = atomic_load_explicit(cnt, RELAXED);
    for (;;) {
        uint64_t na = (old >> 32) + a, nb = (old & W_MAX) + b;
        na = na > W_MAX ? W_MAX : na;
        nb = nb > W_MAX ? W_MAX : nb;
        if (atomic_compare_exchange_weak_explicit(cnt, &old, (na << 32) | nb, RELAXED, RELAXED))
            return;
    }
}

void sl_window_sum(const struct sl_window *w, uint64_t now_ms, uint64_t *a, uint64_t *b)
{
    uint64_t e = now_ms / w->bucket_ms + 1;
    *a = *b = 0;
    for (size_t i = 0; i < SL_WINDOW_BUCKETS; i++) {
        uint64_t be = atomic_load_explicit(&w->epoch[i], memory_order_acquire);
        if (be == 0 || be > e || e - be >= SL_WINDOW_BUCKETS)
            continue;
        uint64_t v = atomic_load_explicit(&w->counts[i], RELAXED);
        *a += v >> 32;
        *b += v & W_MAX;
    }
}

/* ---- endpoints and sets ------------------------------------------------------------------ */

void sl_endpoint_ref(struct sl_endpoint *ep)
{
    atomic_fetch_add_explicit(&ep->refs, 1, RELAXED);
}

void sl_endpoint_unref(struct sl_endpoint *ep)
{
    if (!ep || atomic_fetch_sub_explicit(&ep->refs, 1, memory_order_acq_rel) != 1)
        return;
    /* An endpoint removed while ejected no longer holds a share of max_ejection_percent. */
    if (atomic_load_explicit(&ep->state, RELAXED) != SL_EP_CLOSED)
        atomic_fetch_sub_explicit(&ep->pool->ejected, 1, RELAXED);
    free(ep->address);
    free(ep->zone);
    free(ep);
}

void sl_endpoint_set_ref(struct sl_endpoint_set *s)
{
    atomic_fetch_add_explicit(&s->refs, 1, RELAXED);
}

void sl_endpoint_set_unref(struct sl_endpoint_set *s)
{
    if (!s || atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1)
        return;
    for (size_t i = 0; i < s->count; i++)
        sl_endpoint_unref(s->eps[i]);
    free(s->eps);
    sl_balancer_shared_free(s->bal);
    free(s);
}

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

static bool same_str(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static struct sl_endpoint *endpoint_new(struct sl_pool *p, const struct sl_endpoint_spec *sp)
{
    struct sl_endpoint *ep = calloc(1, sizeof *ep + p->worker_count * sizeof(void *));
    if (!ep)
        return NULL;
    ep->address = strdup(sp->address ? sp->address : "");
    ep->zone = dup_or_null(sp->zone);
    if (!ep->address || (sp->zone && !ep->zone)) {
        free(ep->address);
        free(ep->zone);
        free(ep);
        return NULL;
    }
    atomic_init(&ep->refs, 1);
    ep->pool = p;
    ep->addr = sp->addr;
    ep->addr_len = sp->addr_len;
    ep->weight = sp->weight ? sp->weight : 1;
    ep->local = p->local_zone && ep->zone && strcmp(p->local_zone, ep->zone) == 0;
    sl_window_init(&ep->window, p->conf->passive.window_ms);
    return ep;
}

static void specs_free(struct sl_endpoint_spec *s, size_t n)
{
    for (size_t i = 0; s && i < n; i++) {
        free((char *)s[i].address);
        free((char *)s[i].zone);
    }
    free(s);
}

static struct sl_endpoint_spec *specs_copy(const struct sl_endpoint_spec *in, size_t n)
{
    struct sl_endpoint_spec *out = calloc(n ? n : 1, sizeof *out);
    if (!out)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        out[i] = in[i];
        out[i].address = strdup(in[i].address ? in[i].address : "");
        out[i].zone = dup_or_null(in[i].zone);
        if (!out[i].address || (in[i].zone && !out[i].zone)) {
            specs_free(out, i + 1);
            return NULL;
        }
    }
    return out;
}

/* The endpoint of the current set that `sp` describes exactly, to keep its health. */
static struct sl_endpoint *find_same(const struct sl_endpoint_set *cur,
                                     const struct sl_endpoint_spec *sp)
{
    uint32_t w = sp->weight ? sp->weight : 1;
    for (size_t i = 0; cur && i < cur->count; i++) {
        struct sl_endpoint *e = cur->eps[i];
        if (strcmp(e->address, sp->address ? sp->address : "") == 0 && e->weight == w &&
            same_str(e->zone, sp->zone) && e->addr_len == sp->addr_len &&
            memcmp(&e->addr, &sp->addr, sp->addr_len) == 0)
            return e;
    }
    return NULL;
}

/* Builds the union of every source's endpoints (caller holds the lock). NULL on ENOMEM. */
static struct sl_endpoint_set *build_set(struct sl_pool *p)
{
    size_t total = 0;
    for (int s = 0; s < SL_POOL_SRC_COUNT; s++)
        total += p->src_count[s];
    struct sl_endpoint_set *set = calloc(1, sizeof *set);
    if (!set)
        return NULL;
    atomic_init(&set->refs, 1);
    set->eps = calloc(total ? total : 1, sizeof *set->eps);
    if (!set->eps)
        goto fail;
    for (int s = 0; s < SL_POOL_SRC_COUNT; s++) {
        for (size_t i = 0; i < p->src_count[s]; i++) {
            const struct sl_endpoint_spec *sp = &p->src[s][i];
            /* One endpoint per socket address: "localhost:80" from the file and
             * "127.0.0.1:80" from the admin API are the same backend. */
            bool dup = false;
            for (size_t j = 0; j < set->count && !dup; j++) {
                const struct sl_endpoint *e = set->eps[j];
                dup = e && (strcmp(e->address, sp->address) == 0 ||
                            (sp->addr_len && e->addr_len == sp->addr_len &&
                             memcmp(&e->addr, &sp->addr, sp->addr_len) == 0));
            }
            if (dup)
                continue;
            struct sl_endpoint *e = find_same(p->current, sp);
            if (e)
                sl_endpoint_ref(e);
            else if (!(e = endpoint_new(p, sp)))
                goto fail;
            set->eps[set->count++] = e;
        }
    }
    uint32_t *weights = calloc(set->count ? set->count : 1, sizeof *weights);
    const char **addrs = calloc(set->count ? set->count : 1, sizeof *addrs);
    if (weights && addrs) {
        for (size_t i = 0; i < set->count; i++) {
            const struct sl_endpoint *e = set->eps[i];
            weights[i] = e ? e->weight : 1;
            addrs[i] = e ? e->address : "";
        }
        set->bal = sl_balancer_shared_new(p->conf->balance, weights, addrs, set->count);
    }
    free(weights);
    free(addrs);
    if (!set->bal)
        goto fail;
    return set;
fail:
    sl_endpoint_set_unref(set);
    return NULL;
}

static bool same_set(const struct sl_endpoint_set *a, const struct sl_endpoint_set *b)
{
    if (!a || !b || a->count != b->count)
        return false;
    for (size_t i = 0; i < a->count; i++)
        if (a->eps[i] != b->eps[i])
            return false;
    return true;
}

/* Makes `set` current and hands it to every registered worker (lock held). */
static void publish(struct sl_pool *p, struct sl_endpoint_set *set)
{
    struct sl_endpoint_set *old = p->current;
    set->version = (old ? old->version : 0) + 1;
    p->current = set;
    atomic_store_explicit(&p->version, set->version, memory_order_release);
    atomic_fetch_add_explicit(&p->stats.updates, 1, RELAXED);
    for (unsigned w = 0; w < p->worker_count; w++) {
        if (!p->worker_cb[w])
            continue;
        sl_endpoint_set_ref(set);
        p->worker_cb[w](set, p->worker_ctx[w]);
    }
    sl_endpoint_set_unref(old);
}

int sl_pool_set_source(struct sl_pool *p, enum sl_pool_source src,
                       const struct sl_endpoint_spec *specs, size_t n)
{
    struct sl_endpoint_spec *copy = specs_copy(specs, n);
    if (!copy)
        return -ENOMEM;
    pthread_mutex_lock(&p->lock);
    struct sl_endpoint_spec *old = p->src[src];
    size_t old_n = p->src_count[src];
    p->src[src] = copy;
    p->src_count[src] = n;
    int rc = 0;
    struct sl_endpoint_set *set = build_set(p);
    if (!set) {
        p->src[src] = old;
        p->src_count[src] = old_n;
        old = copy;
        old_n = n;
        rc = -ENOMEM;
    } else if (same_set(set, p->current)) {
        sl_endpoint_set_unref(set);
    } else {
        publish(p, set);
        rc = 1;
    }
    pthread_mutex_unlock(&p->lock);
    specs_free(old, old_n);
    return rc;
}

struct sl_tls_client_ctx *sl_pool_tls_ctx_new(const struct sl_upstream_conf *conf, char *err,
                                              size_t err_len)
{
    const struct sl_upstream_tls_conf *t = &conf->tls;
    static const char *const http11[] = {"http/1.1"};
    struct sl_tls_client_desc d = {
        .skip_verify = !t->verify,
        .ca_file = t->ca_file,
        .cert_file = t->client_cert,
        .key_file = t->client_key,
        .min_version = t->min_version == SL_TLS_V1_3 ? "1.3" : "1.2",
        /* The exchange speaks HTTP/1.1 only: that is what is offered unless the config
         * lists the protocols itself. */
        .alpn = t->alpn_count ? (const char *const *)t->alpn : http11,
        .alpn_count = t->alpn_count ? t->alpn_count : 1,
    };
    char why[256] = "";
    struct sl_tls_client_ctx *c = sl_tls_client_ctx_new(&d, why, sizeof why);
    if (!c && err)
        sl_fmt_err(err, err_len, "upstream %s: tls: %s", conf->name, why);
    return c;
}

const char *sl_pool_tls_name(const struct sl_pool *p, const struct sl_endpoint *ep, char *buf,
                             size_t cap)
{
    const struct sl_upstream_conf *u = p->conf;
    const char *name = u->tls.sni;
    size_t len = name ? strlen(name) : 0;
    if (!name) {
        /* "host:port", "[v6]:port" or "v4:port" */
        const char *a = ep->address ? ep->address : "";
        if (a[0] == '[') {
            const char *end = strchr(a, ']');
            name = a + 1;
            len = end ? (size_t)(end - name) : strlen(name);
        } else {
            const char *colon = strrchr(a, ':');
            name = a;
            len = colon ? (size_t)(colon - a) : strlen(a);
        }
    }
    if (len + 1 > cap)
        return NULL;
    memcpy(buf, name, len);
    buf[len] = 0;
    if (!u->tls.sni && u->discovery.kind == SL_DISCOVERY_DNS && u->discovery.name) {
        /* DNS discovery publishes addresses; the name it resolved is what the certificate
         * is for. */
        unsigned char tmp[16];
        if (inet_pton(AF_INET, buf, tmp) == 1 || inet_pton(AF_INET6, buf, tmp) == 1) {
            len = strlen(u->discovery.name);
            if (len + 1 > cap)
                return NULL;
            memcpy(buf, u->discovery.name, len + 1);
        }
    }
    return buf;
}

struct sl_pool *sl_pool_new(const struct sl_upstream_conf *conf, const char *local_zone,
                            unsigned worker_count, char *err, size_t err_len)
{
    struct sl_pool *p = calloc(1, sizeof *p);
    if (err)
        sl_fmt_err(err, err_len, "upstream %s: out of memory", conf->name);
    if (!p)
        return NULL;
    p->conf = conf;
    p->local_zone = local_zone;
    p->worker_count = worker_count;
    pthread_mutex_init(&p->lock, NULL);
    sl_window_init(&p->budget, 10000);
    p->worker_cb = calloc(worker_count ? worker_count : 1, sizeof *p->worker_cb);
    p->worker_ctx = calloc(worker_count ? worker_count : 1, sizeof *p->worker_ctx);
    if (!p->worker_cb || !p->worker_ctx)
        goto fail;
    if (conf->tls.enabled && !(p->tls = sl_pool_tls_ctx_new(conf, err, err_len)))
        goto fail;
    struct sl_endpoint_spec *specs =
        calloc(conf->endpoint_count ? conf->endpoint_count : 1, sizeof *specs);
    if (!specs)
        goto fail;
    for (size_t i = 0; i < conf->endpoint_count; i++) {
        const struct sl_endpoint_conf *e = &conf->endpoints[i];
        specs[i].address = e->address;
        specs[i].addr = e->addr;
        specs[i].addr_len = e->addr_len;
        specs[i].weight = e->weight;
        specs[i].zone = e->zone;
    }
    int rc = sl_pool_set_source(p, SL_POOL_SRC_CONFIG, specs, conf->endpoint_count);
    free(specs);
    if (rc < 0) /* rc is 1: the first set, empty when discovery fills the pool */
        goto fail;
    return p;
fail:
    sl_pool_free(p);
    return NULL;
}

/* Gives `p` what source `src` of `old` lists (a copy taken under old's lock). */
static void copy_source(struct sl_pool *p, struct sl_pool *old, enum sl_pool_source src)
{
    pthread_mutex_lock(&old->lock);
    struct sl_endpoint_spec *copy = specs_copy(old->src[src], old->src_count[src]);
    size_t n = copy ? old->src_count[src] : 0;
    pthread_mutex_unlock(&old->lock);
    if (copy && n)
        sl_pool_set_source(p, src, copy, n);
    specs_free(copy, n);
}

void sl_pool_inherit(struct sl_pool *p, struct sl_pool *old, uint64_t now_ms)
{
    const struct sl_discovery_conf *d = &p->conf->discovery, *od = &old->conf->discovery;
    if (d->kind != SL_DISCOVERY_NONE && d->kind == od->kind && same_str(d->name, od->name))
        copy_source(p, old, SL_POOL_SRC_DISCOVERY);
    /* Endpoints the admin API added: in the new pool before it serves a request (the admin
     * module gives them again after the swap, which then changes nothing). */
    copy_source(p, old, SL_POOL_SRC_ADMIN);
    struct sl_endpoint_set *was = sl_pool_acquire_set(old);
    struct sl_endpoint_set *now = sl_pool_acquire_set(p);
    for (size_t i = 0; now && was && i < now->count; i++) {
        struct sl_endpoint *e = now->eps[i];
        for (size_t j = 0; j < was->count; j++) {
            struct sl_endpoint *o = was->eps[j];
            if (strcmp(o->address, e->address) != 0)
                continue;
            atomic_store(&e->active_down, atomic_load(&o->active_down));
            int st = atomic_load(&o->state);
            if (st != SL_EP_CLOSED) {
                /* A half-open endpoint's probes were the old generation's: it is open again,
                 * with its time up, so the next pick sends a fresh probe. */
                uint64_t until = atomic_load(&o->open_until_ms);
                atomic_store(&e->open_until_ms, st == SL_EP_HALF_OPEN ? now_ms : until);
                atomic_store(&e->ejections, atomic_load(&o->ejections));
                atomic_store(&e->state, SL_EP_OPEN);
                atomic_fetch_add_explicit(&p->ejected, 1, RELAXED);
            }
            atomic_store(&e->consecutive_failures, atomic_load(&o->consecutive_failures));
            atomic_store(&e->restored_ms, atomic_load(&o->restored_ms));
            break;
        }
    }
    if (now)
        atomic_fetch_add_explicit(&p->health_gen, 1, RELAXED);
    sl_endpoint_set_unref(now);
    sl_endpoint_set_unref(was);
}

void sl_pool_free(struct sl_pool *p)
{
    if (!p)
        return;
    sl_endpoint_set_unref(p->current);
    for (int s = 0; s < SL_POOL_SRC_COUNT; s++)
        specs_free(p->src[s], p->src_count[s]);
    free(p->worker_cb);
    free(p->worker_ctx);
    sl_tls_client_ctx_free(p->tls);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

struct sl_endpoint_set *sl_pool_register_worker(struct sl_pool *p, unsigned worker,
                                                sl_pool_publish_cb cb, void *ctx)
{
    pthread_mutex_lock(&p->lock);
    if (worker < p->worker_count) {
        p->worker_cb[worker] = cb;
        p->worker_ctx[worker] = ctx;
    }
    struct sl_endpoint_set *s = p->current;
    sl_endpoint_set_ref(s);
    pthread_mutex_unlock(&p->lock);
    return s;
}

void sl_pool_unregister_worker(struct sl_pool *p, unsigned worker)
{
    pthread_mutex_lock(&p->lock);
    if (worker < p->worker_count) {
        p->worker_cb[worker] = NULL;
        p->worker_ctx[worker] = NULL;
    }
    pthread_mutex_unlock(&p->lock);
}

struct sl_endpoint_set *sl_pool_acquire_set(struct sl_pool *p)
{
    pthread_mutex_lock(&p->lock);
    struct sl_endpoint_set *s = p->current;
    sl_endpoint_set_ref(s);
    pthread_mutex_unlock(&p->lock);
    return s;
}

/* ---- passive health: one state machine per endpoint -------------------------------------- */

static void bump_gen(struct sl_pool *p)
{
    atomic_fetch_add_explicit(&p->health_gen, 1, memory_order_release);
}

static void fmt_ms(uint64_t ms, char *buf, size_t cap)
{
    if (ms % 1000 == 0)
        snprintf(buf, cap, "%llus", (unsigned long long)(ms / 1000));
    else
        snprintf(buf, cap, "%llums", (unsigned long long)ms);
}

/* Ejection time of the n-th ejection in a row: base x n, capped. */
static uint64_t ejection_ms(const struct sl_passive_health_conf *pc, uint32_t n)
{
    uint64_t t = pc->ejection_ms * (n ? n : 1);
    return t > pc->max_ejection_ms ? pc->max_ejection_ms : t;
}

/* Takes a share of max_ejection_percent of `n` endpoints; one ejection is always allowed so
 * that a pool of one or two endpoints still gets the benefit. */
static bool take_ejection_slot(struct sl_pool *p, size_t n)
{
    uint32_t pct = p->conf->passive.max_ejection_percent;
    uint32_t cur = atomic_load_explicit(&p->ejected, RELAXED);
    for (;;) {
        if (cur > 0 && (uint64_t)(cur + 1) * 100 > (uint64_t)pct * n)
            return false;
        if (atomic_compare_exchange_weak_explicit(&p->ejected, &cur, cur + 1, RELAXED, RELAXED))
            return true;
    }
}

static void eject(struct sl_endpoint *ep, const struct sl_endpoint_set *set, uint64_t now_ms,
                  const char *why)
{
    struct sl_pool *p = ep->pool;
    const struct sl_passive_health_conf *pc = &p->conf->passive;
    if (atomic_load_explicit(&ep->state, RELAXED) != SL_EP_CLOSED)
        return;
    if (!take_ejection_slot(p, set ? set->count : 1)) {
        atomic_fetch_add_explicit(&p->stats.ejections_refused, 1, RELAXED);
        return;
    }
    int expect = SL_EP_CLOSED;
    if (!atomic_compare_exchange_strong(&ep->state, &expect, SL_EP_OPEN)) {
        atomic_fetch_sub_explicit(&p->ejected, 1, RELAXED);
        return;
    }
    /* Ejections in a row grow the time; each healthy stretch of max(window, ejection) since
     * the last return forgives one. */
    uint32_t n = atomic_load_explicit(&ep->ejections, RELAXED);
    uint64_t restored = atomic_load_explicit(&ep->restored_ms, RELAXED);
    uint64_t unit = pc->window_ms > pc->ejection_ms ? pc->window_ms : pc->ejection_ms;
    if (restored && now_ms > restored) {
        uint64_t forgiven = (now_ms - restored) / unit;
        n = forgiven >= n ? 0 : n - (uint32_t)forgiven;
    }
    n++;
    uint64_t t = ejection_ms(pc, n);
    atomic_store_explicit(&ep->ejections, n, RELAXED);
    atomic_store_explicit(&ep->open_until_ms, now_ms + t, RELAXED);
    atomic_store_explicit(&ep->consecutive_failures, 0, RELAXED);
    atomic_store_explicit(&ep->probe_successes, 0, RELAXED);
    sl_window_reset(&ep->window);
    atomic_fetch_add_explicit(&p->stats.ejections, 1, RELAXED);
    bump_gen(p);
    char d[32];
    fmt_ms(t, d, sizeof d);
    SL_INFO("upstream %s endpoint %s: ejected for %s (%s)", p->conf->name, ep->address, d, why);
}

bool sl_endpoint_try_probe(struct sl_endpoint *ep, uint64_t now_ms)
{
    struct sl_pool *p = ep->pool;
    uint32_t need = p->conf->passive.half_open_requests;
    int st = atomic_load_explicit(&ep->state, memory_order_acquire);
    if (st == SL_EP_OPEN) {
        if (now_ms < atomic_load_explicit(&ep->open_until_ms, RELAXED))
            return false;
        int expect = SL_EP_OPEN;
        if (!atomic_compare_exchange_strong(&ep->state, &expect, SL_EP_HALF_OPEN))
            return false;
        atomic_store_explicit(&ep->probe_successes, 0, RELAXED);
        atomic_store_explicit(&ep->probes_inflight, 1, RELAXED);
        atomic_fetch_add_explicit(&p->stats.half_opens, 1, RELAXED);
        bump_gen(p);
        return true;
    }
    if (st != SL_EP_HALF_OPEN)
        return false;
    uint32_t cur = atomic_load_explicit(&ep->probes_inflight, RELAXED);
    for (;;) {
        uint32_t done = atomic_load_explicit(&ep->probe_successes, RELAXED);
        if (cur + done >= need)
            return false;
        if (atomic_compare_exchange_weak_explicit(&ep->probes_inflight, &cur, cur + 1, RELAXED,
                                                  RELAXED))
            return true;
    }
}

static void probe_done(struct sl_endpoint *ep, bool failure, uint64_t now_ms)
{
    struct sl_pool *p = ep->pool;
    const struct sl_passive_health_conf *pc = &p->conf->passive;
    atomic_fetch_sub_explicit(&ep->probes_inflight, 1, RELAXED);
    if (failure) {
        int expect = SL_EP_HALF_OPEN;
        if (!atomic_compare_exchange_strong(&ep->state, &expect, SL_EP_OPEN))
            return;
        uint32_t n = atomic_fetch_add_explicit(&ep->ejections, 1, RELAXED) + 1;
        uint64_t t = ejection_ms(pc, n);
        atomic_store_explicit(&ep->open_until_ms, now_ms + t, RELAXED);
        atomic_fetch_add_explicit(&p->stats.reopens, 1, RELAXED);
        bump_gen(p);
        char d[32];
        fmt_ms(t, d, sizeof d);
        SL_INFO("upstream %s endpoint %s: probe failed, ejected for %s", p->conf->name, ep->address,
                d);
        return;
    }
    uint32_t ok = atomic_fetch_add_explicit(&ep->probe_successes, 1, RELAXED) + 1;
    if (ok < pc->half_open_requests)
        return;
    int expect = SL_EP_HALF_OPEN;
    if (!atomic_compare_exchange_strong(&ep->state, &expect, SL_EP_CLOSED))
        return;
    atomic_store_explicit(&ep->consecutive_failures, 0, RELAXED);
    sl_window_reset(&ep->window);
    atomic_store_explicit(&ep->restored_ms, now_ms ? now_ms : 1, RELAXED);
    atomic_fetch_sub_explicit(&p->ejected, 1, RELAXED);
    atomic_fetch_add_explicit(&p->stats.restores, 1, RELAXED);
    bump_gen(p);
    SL_INFO("upstream %s endpoint %s: probe succeeded, back in rotation", p->conf->name,
            ep->address);
}

void sl_endpoint_report(struct sl_endpoint *ep, const struct sl_endpoint_set *set,
                        enum sl_outcome outcome, bool probe, uint64_t now_ms)
{
    const struct sl_passive_health_conf *pc = &ep->pool->conf->passive;
    if (outcome == SL_OUTCOME_CANCELLED) {
        /* says nothing about the endpoint: give the probe slot back for another request */
        if (probe)
            atomic_fetch_sub_explicit(&ep->probes_inflight, 1, RELAXED);
        return;
    }
    bool failure = outcome != SL_OUTCOME_SUCCESS;
    if (probe) {
        probe_done(ep, failure, now_ms);
        return;
    }
    if (!pc->enabled)
        return;
    if (!failure) {
        /* read first: the common case writes nothing to the shared line */
        if (atomic_load_explicit(&ep->consecutive_failures, RELAXED))
            atomic_store_explicit(&ep->consecutive_failures, 0, RELAXED);
        if (pc->failure_ratio_permille)
            sl_window_add(&ep->window, now_ms, 1, 0);
        return;
    }
    uint32_t c = atomic_fetch_add_explicit(&ep->consecutive_failures, 1, RELAXED) + 1;
    char why[96];
    if (pc->consecutive_failures && c >= pc->consecutive_failures) {
        snprintf(why, sizeof why, "%u consecutive failures", c);
        eject(ep, set, now_ms, why);
        return;
    }
    if (pc->failure_ratio_permille) {
        sl_window_add(&ep->window, now_ms, 1, 1);
        uint64_t total, fails;
        sl_window_sum(&ep->window, now_ms, &total, &fails);
        if (total >= pc->min_requests &&
            fails * 1000 >= (uint64_t)pc->failure_ratio_permille * total) {
            snprintf(why, sizeof why, "%llu of %llu requests failed", (unsigned long long)fails,
                     (unsigned long long)total);
            eject(ep, set, now_ms, why);
        }
    }
}

void sl_endpoint_set_active_down(struct sl_endpoint *ep, bool down)
{
    atomic_store_explicit(&ep->active_down, down, RELAXED);
    atomic_fetch_add_explicit(down ? &ep->pool->stats.active_down : &ep->pool->stats.active_up, 1,
                              RELAXED);
    bump_gen(ep->pool);
}

/* ---- retry budget ------------------------------------------------------------------------ */

void sl_pool_budget_request(struct sl_pool *p, uint64_t now_ms)
{
    sl_window_add(&p->budget, now_ms, 1, 0);
}

bool sl_pool_budget_retry(struct sl_pool *p, const struct sl_retry_conf *rc, uint64_t now_ms)
{
    uint64_t requests, retries;
    sl_window_sum(&p->budget, now_ms, &requests, &retries);
    if (retries + 1 > rc->min_retries + requests * rc->budget_percent / 100) {
        atomic_fetch_add_explicit(&p->stats.retries_budget_exhausted, 1, RELAXED);
        return false;
    }
    sl_window_add(&p->budget, now_ms, 0, 1);
    atomic_fetch_add_explicit(&p->stats.retries, 1, RELAXED);
    return true;
}
