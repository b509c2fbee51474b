#include "proxy/upstream.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <unistd.h>

#include <openssl/ssl.h>

#include "config/config.h"
#include "core/log.h"
#include "core/rand.h"
#include "core/worker.h"
#include "proxy/proxy_proto.h"
#include "tls/tls_transport.h"

static void on_uc_io(struct sl_io *io, uint32_t events);
static void on_uc_timer(struct sl_timer *t);
static void on_uc_free(struct sl_defer *d);

static void wep_put(struct sl_wep *w);

/* ---- the worker's endpoint set --------------------------------------------------------- */

static unsigned wid(const struct sl_upstream_rt *up)
{
    return up->worker->id;
}

static void masks_free(struct sl_upstream_rt *up)
{
    free(up->healthy);
    free(up->local_healthy);
    free(up->remote_healthy);
    up->healthy = up->local_healthy = up->remote_healthy = NULL;
    up->mask_words = 0;
}

static void close_idle_of(struct sl_wep *w);

/* Swaps in `set` (taking the caller's reference): endpoints that stay keep their per-worker
 * state and in-flight counts; removed ones lose their idle connections and are freed once
 * their last request ended. Returns 0 or -ENOMEM (the old set then stays). */
static int install_set(struct sl_upstream_rt *up, struct sl_endpoint_set *set)
{
    size_t n = set->count, words = (n + 63) / 64;
    struct sl_wep **weps = calloc(n ? n : 1, sizeof *weps);
    struct sl_balancer *bal = sl_balancer_new(set->bal);
    uint64_t *m[3];
    for (int i = 0; i < 3; i++)
        m[i] = calloc(words ? words : 1, sizeof(uint64_t));
    bool ok = weps && bal && m[0] && m[1] && m[2];
    for (size_t i = 0; ok && i < n; i++) {
        struct sl_endpoint *ep = set->eps[i];
        struct sl_wep *w = ep->wslot[wid(up)];
        if (!w) {
            if (!(w = calloc(1, sizeof *w))) {
                ok = false;
                break;
            }
            sl_endpoint_ref(ep);
            w->ep = ep;
            w->up = up;
            w->index = -1;
            ep->wslot[wid(up)] = w;
        }
        weps[i] = w;
    }
    if (!ok) {
        /* undo the per-worker states created above (those not in the old set) */
        for (size_t i = 0; weps && i < n; i++)
            if (weps[i] && weps[i]->index < 0 && weps[i]->users == 0 && !weps[i]->idle)
                wep_put(weps[i]);
        free(weps);
        sl_balancer_free(bal);
        for (int i = 0; i < 3; i++)
            free(m[i]);
        sl_endpoint_set_unref(set);
        return -ENOMEM;
    }
    sl_balancer_seed(bal, up->rng ^ set->version);
    /* carry in-flight counts over, then re-index */
    for (size_t i = 0; i < n; i++)
        if (weps[i]->index >= 0 && up->bal)
            sl_balancer_set_inflight(bal, (int)i, sl_balancer_inflight(up->bal, weps[i]->index));
    for (size_t i = 0; up->set && i < up->set->count; i++)
        up->weps[i]->index = -1;
    for (size_t i = 0; i < n; i++)
        weps[i]->index = (int)i;
    /* whatever is still -1 left the set */
    struct sl_wep **old = up->weps;
    size_t old_n = up->set ? up->set->count : 0;
    struct sl_endpoint_set *old_set = up->set;
    up->weps = weps;
    up->set = set;
    sl_balancer_free(up->bal);
    up->bal = bal;
    masks_free(up);
    up->healthy = m[0];
    up->local_healthy = m[1];
    up->remote_healthy = m[2];
    up->mask_words = words;
    up->health_gen = UINT64_MAX; /* force a rebuild on the next pick */
    for (size_t i = 0; i < old_n; i++) {
        if (old[i]->index >= 0)
            continue;
        close_idle_of(old[i]); /* frees it when nothing else uses it */
    }
    free(old);
    sl_endpoint_set_unref(old_set);
    return 0;
}

/* Frees a per-worker endpoint state that left the set and has no users. */
static void wep_put(struct sl_wep *w)
{
    if (w->index >= 0 || w->users > 0 || w->idle)
        return;
    struct sl_upstream_rt *up = w->up;
    w->ep->wslot[wid(up)] = NULL;
    sl_endpoint_unref(w->ep);
    /* OpenSSL's own free: tls/ has no wrapper for a bare session */
    SSL_SESSION_free(w->tls_session);
    free(w);
}

static void wep_unuse(struct sl_wep *w)
{
    if (w->users)
        w->users--;
    if (w->users == 0 && w->index < 0)
        wep_put(w);
}

static void on_set_post(struct sl_post *p)
{
    struct sl_upstream_rt *up = p->data;
    struct sl_endpoint_set *set = atomic_exchange(&up->incoming, NULL);
    if (set && install_set(up, set) < 0)
        SL_WARN("upstream %s: out of memory installing a new endpoint set; keeping the old one",
                up->conf->name);
}

/* The pool published a set (any thread, pool lock held): hand it to this worker's loop. */
static void on_publish(struct sl_endpoint_set *set, void *ctx)
{
    struct sl_upstream_rt *up = ctx;
    struct sl_endpoint_set *prev = atomic_exchange(&up->incoming, set);
    sl_endpoint_set_unref(prev);
    sl_loop_post(&up->worker->loop, &up->post);
}

int sl_upstream_rt_init(struct sl_upstream_rt *up, struct sl_pool *pool, struct sl_worker *w)
{
    memset(up, 0, sizeof *up);
    up->conf = pool->conf;
    up->pool = pool;
    up->worker = w;
    up->rng = (uint64_t)(uintptr_t)up * 0x9e3779b97f4a7c15ull + w->id + 1;
    up->next_probe_ms = UINT64_MAX;
    up->post.cb = on_set_post;
    up->post.data = up;
    atomic_init(&up->incoming, NULL);
    struct sl_endpoint_set *set = sl_pool_register_worker(pool, w->id, on_publish, up);
    if (install_set(up, set) < 0) {
        sl_pool_unregister_worker(pool, w->id);
        return -ENOMEM;
    }
    return 0;
}

/* Keeps the connection's current TLS session as the endpoint's one to resume with (TLS 1.3
 * tickets arrive after the handshake, so the newest is taken when a connection is let go). */
static void save_session(struct sl_upstream_conn *uc)
{
    if (!uc->is_tls || !uc->wep || !sl_tls_is_handshake_done(&uc->tls))
        return;
    struct ssl_session_st *s = sl_tls_get1_session(&uc->tls);
    if (!s)
        return;
    struct sl_wep *w = uc->wep;
    if (s == w->tls_session) {
        SSL_SESSION_free(s); /* the extra reference get1 took */
        return;
    }
    SSL_SESSION_free(w->tls_session);
    w->tls_session = s;
}

static void uc_close(struct sl_upstream_conn *uc)
{
    if (uc->state == SL_UC_CLOSED)
        return;
    save_session(uc);
    struct sl_upstream_rt *up = uc->up;
    struct sl_wep *w = uc->wep;
    if (uc->state == SL_UC_IDLE) {
        if (uc->prev)
            uc->prev->next = uc->next;
        else
            w->idle = uc->next;
        if (uc->next)
            uc->next->prev = uc->prev;
        up->idle_count--;
    }
    uc->state = SL_UC_CLOSED;
    struct sl_loop *loop = &up->worker->loop;
    sl_timer_cancel(loop, &uc->timer);
    sl_io_stop(loop, &uc->io);
    sl_transport_close(&uc->tr);
    sl_buf_release(&uc->in, &up->worker->buf_pool);
    if (up->conf->breaker.max_connections)
        atomic_fetch_sub_explicit(&up->pool->connections, 1, memory_order_relaxed);
    uc->wep = NULL;
    wep_unuse(w);
    sl_defer_queue(loop, &uc->free_defer);
}

static void close_idle_of(struct sl_wep *w)
{
    /* the last close may free w: hold it meanwhile */
    w->users++;
    while (w->idle)
        uc_close(w->idle);
    wep_unuse(w);
}

void sl_upstream_rt_detach(struct sl_upstream_rt *up)
{
    if (up->pool)
        sl_pool_unregister_worker(up->pool, wid(up));
}

bool sl_upstream_rt_post_pending(const struct sl_upstream_rt *up)
{
    return up->pool && atomic_load_explicit(&up->post.queued, memory_order_acquire);
}

void sl_upstream_rt_close_idle(struct sl_upstream_rt *up)
{
    for (size_t i = 0; up->set && i < up->set->count; i++)
        close_idle_of(up->weps[i]);
}

void sl_upstream_rt_dispose(struct sl_upstream_rt *up)
{
    if (!up->pool)
        return;
    sl_pool_unregister_worker(up->pool, wid(up));
    sl_endpoint_set_unref(atomic_exchange(&up->incoming, NULL));
    for (size_t i = 0; up->set && i < up->set->count; i++) {
        struct sl_wep *w = up->weps[i];
        w->index = -1;
        close_idle_of(w); /* frees w when nothing else uses it */
    }
    free(up->weps);
    up->weps = NULL;
    sl_endpoint_set_unref(up->set);
    up->set = NULL;
    masks_free(up);
    sl_balancer_free(up->bal);
    up->bal = NULL;
    up->pool = NULL;
}

/* ---- choosing an endpoint ------------------------------------------------------------- */

static inline void bit_set(uint64_t *m, size_t i)
{
    m[i / 64] |= 1ull << (i % 64);
}

/* Rebuilds the eligibility cache from the endpoints' shared health. */
static void refresh(struct sl_upstream_rt *up, uint64_t gen)
{
    const struct sl_endpoint_set *set = up->set;
    size_t words = up->mask_words;
    memset(up->healthy, 0, words * sizeof(uint64_t));
    memset(up->local_healthy, 0, words * sizeof(uint64_t));
    memset(up->remote_healthy, 0, words * sizeof(uint64_t));
    uint64_t total_w = 0, healthy_w = 0;
    up->local_total_w = up->local_healthy_w = up->remote_healthy_w = 0;
    up->healthy_count = 0;
    up->next_probe_ms = UINT64_MAX;
    up->has_half_open = false;
    for (size_t i = 0; i < set->count; i++) {
        struct sl_endpoint *ep = set->eps[i];
        int st = atomic_load_explicit(&ep->state, memory_order_acquire);
        bool down = atomic_load_explicit(&ep->active_down, memory_order_relaxed);
        total_w += ep->weight;
        if (ep->local)
            up->local_total_w += ep->weight;
        if (st == SL_EP_OPEN && !down) {
            uint64_t until = atomic_load_explicit(&ep->open_until_ms, memory_order_relaxed);
            if (until < up->next_probe_ms)
                up->next_probe_ms = until;
        }
        if (st == SL_EP_HALF_OPEN && !down)
            up->has_half_open = true;
        if (st != SL_EP_CLOSED || down)
            continue;
        bit_set(up->healthy, i);
        up->healthy_count++;
        healthy_w += ep->weight;
        if (ep->local) {
            bit_set(up->local_healthy, i);
            up->local_healthy_w += ep->weight;
        } else {
            bit_set(up->remote_healthy, i);
            up->remote_healthy_w += ep->weight;
        }
    }
    const struct sl_zone_aware_conf *za = &up->conf->zone_aware;
    up->panic =
        za->enabled && total_w > 0 && healthy_w * 100 < (uint64_t)za->panic_percent * total_w;
    up->health_gen = gen;
}

static int index_of(const struct sl_upstream_rt *up, const struct sl_endpoint *ep)
{
    const struct sl_wep *w = ep->wslot[wid(up)];
    return w ? w->index : -1;
}

static bool is_tried(struct sl_endpoint *const *tried, size_t n, const struct sl_endpoint *ep)
{
    for (size_t i = 0; i < n; i++)
        if (tried[i] == ep)
            return true;
    return false;
}

/* An ejected endpoint whose time is up gets the next request as its probe. */
static struct sl_wep *pick_probe(struct sl_upstream_rt *up, struct sl_endpoint *const *tried,
                                 size_t tried_count, uint64_t now_ms)
{
    const struct sl_endpoint_set *set = up->set;
    for (size_t i = 0; i < set->count; i++) {
        struct sl_endpoint *ep = set->eps[i];
        int st = atomic_load_explicit(&ep->state, memory_order_relaxed);
        if (st == SL_EP_CLOSED || atomic_load_explicit(&ep->active_down, memory_order_relaxed) ||
            is_tried(tried, tried_count, ep))
            continue;
        if (sl_endpoint_try_probe(ep, now_ms))
            return up->weps[i];
    }
    return NULL;
}

static bool mask_any(const uint64_t *m, size_t words, const int *excl, size_t nexcl)
{
    for (size_t wi = 0; wi < words; wi++) {
        uint64_t v = m[wi];
        for (size_t k = 0; k < nexcl; k++)
            if (excl[k] >= 0 && (size_t)excl[k] / 64 == wi)
                v &= ~(1ull << (excl[k] % 64));
        if (v)
            return true;
    }
    return false;
}

struct sl_wep *sl_upstream_pick(struct sl_upstream_rt *up, const struct sl_pick_ctx *hash_ctx,
                                struct sl_endpoint *const *tried, size_t tried_count, bool *probe,
                                enum sl_pick_fail *why)
{
    *probe = false;
    if (!up->set || up->set->count == 0) {
        *why = SL_PICK_NO_ENDPOINTS;
        return NULL;
    }
    uint64_t now = sl_loop_now_ms(&up->worker->loop);
    uint64_t gen = atomic_load_explicit(&up->pool->health_gen, memory_order_acquire);
    if (gen != up->health_gen)
        refresh(up, gen);
    if (now >= up->next_probe_ms || up->has_half_open) {
        struct sl_wep *w = pick_probe(up, tried, tried_count, now);
        if (w) {
            *probe = true;
            w->users++;
            sl_balancer_set_inflight(up->bal, w->index,
                                     sl_balancer_inflight(up->bal, w->index) + 1);
            return w;
        }
    }
    int excl[SL_PICK_MAX_EXCLUDE];
    size_t nexcl = 0;
    for (size_t i = 0; i < tried_count && nexcl < SL_PICK_MAX_EXCLUDE; i++) {
        int idx = index_of(up, tried[i]);
        if (idx >= 0)
            excl[nexcl++] = idx;
    }
    struct sl_pick_ctx ctx = {0};
    if (hash_ctx)
        ctx = *hash_ctx;
    ctx.exclude = excl;
    ctx.exclude_count = nexcl;
    const uint64_t *mask = up->panic ? NULL : up->healthy; /* panic: every endpoint */
    if (!up->panic && up->conf->zone_aware.enabled && up->local_healthy_w > 0) {
        /* The local zone keeps the share of traffic its healthy capacity can take (all of
         * it when whole); the rest spills to the other zones by their healthy weight. */
        bool local = up->remote_healthy_w == 0 || up->local_healthy_w >= up->local_total_w;
        if (!local) {
            uint64_t r = sl_rand_next(&up->rng) % up->local_total_w;
            local = r < up->local_healthy_w;
        }
        const uint64_t *zm = local ? up->local_healthy : up->remote_healthy;
        if (mask_any(zm, up->mask_words, excl, nexcl))
            mask = zm;
    }
    /* every endpoint eligible: no mask, so the balancer's fast paths apply */
    ctx.mask = mask == up->healthy && up->healthy_count == up->set->count ? NULL : mask;
    int idx = sl_balancer_pick(up->bal, &ctx);
    if (idx < 0) {
        /* `excl` holds distinct endpoints of this set: fewer than all means some untried one
         * is out of rotation */
        *why = nexcl < up->set->count ? SL_PICK_NONE_HEALTHY : SL_PICK_ALL_TRIED;
        return NULL;
    }
    struct sl_wep *w = up->weps[idx];
    w->users++;
    return w;
}

void sl_upstream_done(struct sl_upstream_rt *up, struct sl_wep *w, enum sl_outcome outcome,
                      bool probe)
{
    if (w->index >= 0)
        sl_balancer_release(up->bal, w->index);
    sl_endpoint_report(w->ep, up->set, outcome, probe, sl_loop_now_ms(&up->worker->loop));
    wep_unuse(w);
}

uint64_t sl_upstream_retry_after_s(const struct sl_upstream_rt *up)
{
    uint64_t now = sl_loop_now_ms(&up->worker->loop);
    if (up->next_probe_ms == UINT64_MAX || up->next_probe_ms <= now)
        return 1;
    return (up->next_probe_ms - now + 999) / 1000;
}

/* ---- connections ------------------------------------------------------------------------ */

static void on_uc_free(struct sl_defer *d)
{
    free(d->data);
}

/* The backend's keep-alive timeout, less a margin for the request in flight to reach it. */
static uint64_t idle_budget_ms(const struct sl_upstream_conn *uc)
{
    uint64_t cfg = uc->up->conf->keepalive_idle_timeout_ms;
    if (uc->keepalive_ms) {
        uint64_t margin = uc->keepalive_ms / 4 < 1000 ? uc->keepalive_ms / 4 : 1000;
        uint64_t learned = uc->keepalive_ms - margin;
        if (learned < cfg)
            return learned;
    }
    return cfg;
}

/* The PROXY reuse tag of a client address: family and address bytes, port ignored. */
static void origin_tag(const struct sockaddr *sa, uint8_t *family, uint8_t addr[16])
{
    memset(addr, 0, 16);
    *family = 0;
    if (sa && sa->sa_family == AF_INET) {
        *family = AF_INET;
        memcpy(addr, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    } else if (sa && sa->sa_family == AF_INET6) {
        *family = AF_INET6;
        memcpy(addr, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
    }
}

/* Writes the PROXY header a new connection for `origin` starts with into uc->pp. */
static void build_proxy_header(struct sl_upstream_conn *uc, const struct sl_upstream_origin *o)
{
    struct sockaddr_storage local;
    const struct sockaddr *src = o ? o->client : NULL, *dst = o ? o->local : NULL;
    if (src && !dst && o->get_local && o->get_local(o->data, &local) == 0)
        dst = (const struct sockaddr *)&local;
    if (!dst)
        src = NULL; /* half an address pair is no pair: UNKNOWN / AF_UNSPEC */
    size_t n = sl_proxy_proto_write(uc->up->conf->proxy_protocol == SL_PP_SEND_V2, uc->pp,
                                    sizeof uc->pp, src, dst);
    uc->pp_len = (uint8_t)n;
    uc->pp_off = 0;
}

struct sl_upstream_conn *sl_upstream_acquire(struct sl_upstream_rt *up, struct sl_wep *w,
                                             const struct sl_upstream_user *user, bool fresh,
                                             int *err)
{
    return sl_upstream_acquire_for(up, w, user, fresh, NULL, err);
}

struct sl_upstream_conn *sl_upstream_acquire_for(struct sl_upstream_rt *up, struct sl_wep *w,
                                                 const struct sl_upstream_user *user, bool fresh,
                                                 const struct sl_upstream_origin *origin, int *err)
{
    struct sl_loop *loop = &up->worker->loop;
    bool pp = up->conf->proxy_protocol != SL_PP_SEND_OFF;
    uint8_t fam = 0, addr[16];
    if (pp)
        origin_tag(origin ? origin->client : NULL, &fam, addr);
    *err = 0;
    struct sl_upstream_conn *next = fresh ? NULL : w->idle;
    while (next) {
        struct sl_upstream_conn *uc = next;
        next = uc->next;
        /* A PROXY header speaks for one client: another client's connection is not ours. */
        if (pp && (uc->origin_family != fam || memcmp(uc->origin_addr, addr, 16) != 0))
            continue;
        if (uc->prev)
            uc->prev->next = uc->next;
        else
            w->idle = uc->next;
        if (uc->next)
            uc->next->prev = uc->prev;
        up->idle_count--;
        uc->next = uc->prev = NULL;
        uc->state = SL_UC_BUSY;
        /* A connection past its budget may be closed by the backend any moment: drop it
         * rather than race the backend's close. */
        if (sl_loop_now_ms(loop) - uc->idle_since_ms >= idle_budget_ms(uc)) {
            uc_close(uc);
            continue;
        }
        sl_timer_cancel(loop, &uc->timer);
        uc->user = *user;
        uc->reused = true;
        up->reuses++;
        sl_io_modify(loop, &uc->io, 0);
        return uc;
    }
    uint32_t maxc = up->conf->breaker.max_connections;
    if (maxc) {
        uint32_t cur = atomic_fetch_add_explicit(&up->pool->connections, 1, memory_order_relaxed);
        if (cur >= maxc) {
            atomic_fetch_sub_explicit(&up->pool->connections, 1, memory_order_relaxed);
            *err = -EUSERS; /* not EMFILE: that one means the process ran out of fds */
            return NULL;
        }
    }
    const struct sl_endpoint *e = w->ep;
    struct sl_upstream_conn *uc = NULL;
    int fd = socket(e->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        *err = -errno;
        goto fail;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (const struct sockaddr *)&e->addr, e->addr_len) < 0 && errno != EINPROGRESS) {
        *err = -errno;
        close(fd);
        goto fail;
    }
    uc = calloc(1, sizeof *uc);
    if (!uc) {
        close(fd);
        *err = -ENOMEM;
        goto fail;
    }
    uc->up = up;
    uc->wep = w;
    uc->state = SL_UC_CONNECTING;
    uc->setup = SL_UC_SETUP_TCP;
    uc->user = *user;
    if (pp) {
        uc->origin_family = fam;
        memcpy(uc->origin_addr, addr, 16);
        build_proxy_header(uc, origin);
    }
    if (up->pool->tls) {
        char name[256];
        const char *sni = sl_pool_tls_name(up->pool, e, name, sizeof name);
        int rc = sl_tls_transport_init_client(&uc->tls, fd, up->pool->tls, sni, w->tls_session);
        if (rc < 0) {
            SL_DEBUG("upstream %s endpoint %s: cannot set up TLS (server name %s): %s",
                     up->conf->name, e->address, sni ? sni : "-", strerror(-rc));
            close(fd);
            free(uc);
            *err = rc == -ENOMEM ? rc : -EPROTO;
            goto fail;
        }
        uc->is_tls = true;
    } else {
        sl_tcp_transport_init(&uc->tr, fd);
    }
    sl_timer_init(&uc->timer, on_uc_timer, uc);
    sl_defer_init(&uc->free_defer, on_uc_free, uc);
    if (sl_io_start(loop, &uc->io, fd, EPOLLOUT | SL_IO_EDGE, on_uc_io, uc) < 0) {
        *err = -errno;
        sl_transport_close(&uc->tr);
        free(uc);
        goto fail;
    }
    w->users++;
    up->connects++;
    return uc;
fail:
    if (maxc)
        atomic_fetch_sub_explicit(&up->pool->connections, 1, memory_order_relaxed);
    return NULL;
}

int sl_upstream_conn_connect_result(struct sl_upstream_conn *uc)
{
    if (uc->setup_err)
        return uc->setup_err;
    if (uc->setup == SL_UC_SETUP_DONE)
        return 0;
    int soerr = 0;
    socklen_t len = sizeof soerr;
    if (getsockopt(uc->tr.fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0)
        return -errno;
    return -soerr;
}

void sl_upstream_conn_want(struct sl_upstream_conn *uc, uint32_t events)
{
    if (uc->tr.ops->want)
        events |= uc->tr.ops->want(&uc->tr);
    sl_io_modify(&uc->up->worker->loop, &uc->io, events);
}

const char *sl_upstream_conn_tls_error(const struct sl_upstream_conn *uc, char *buf, size_t cap)
{
    if (!uc->is_tls) {
        if (cap)
            buf[0] = 0;
        return buf;
    }
    return sl_tls_last_error_str(&uc->tls, buf, cap);
}

void sl_upstream_conn_arm(struct sl_upstream_conn *uc, uint64_t ms)
{
    sl_timer_arm(&uc->up->worker->loop, &uc->timer, ms);
}

void sl_upstream_release(struct sl_upstream_conn *uc, bool reusable)
{
    struct sl_upstream_rt *up = uc->up;
    struct sl_loop *loop = &up->worker->loop;
    memset(&uc->user, 0, sizeof uc->user);
    /* Unread bytes (in our buffer, inside TLS or, by the edge we saw, in the socket) or a FIN
     * mean the backend sent more than the response: such a connection must never carry
     * another. */
    if (!reusable || uc->state != SL_UC_BUSY || up->idle_count >= up->conf->keepalive_max_idle ||
        uc->wep->index < 0 || (uc->in.data && sl_buf_len(&uc->in)) ||
        sl_transport_pending(&uc->tr) ||
        (uc->io.ready & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) || idle_budget_ms(uc) == 0) {
        uc_close(uc);
        return;
    }
    save_session(uc);
    sl_buf_release(&uc->in, &up->worker->buf_pool);
    uc->state = SL_UC_IDLE;
    uc->reused = false;
    uc->idle_since_ms = sl_loop_now_ms(loop);
    uc->prev = NULL;
    uc->next = uc->wep->idle;
    if (uc->next)
        uc->next->prev = uc;
    uc->wep->idle = uc;
    up->idle_count++;
    sl_timer_arm(loop, &uc->timer, idle_budget_ms(uc));
    /* Any readiness on an idle connection is the backend closing it (or misbehaving). */
    sl_io_modify(loop, &uc->io, EPOLLIN | EPOLLRDHUP);
}

int sl_upstream_conn_read(struct sl_upstream_conn *uc, bool *eof)
{
    *eof = false;
    if (sl_buf_acquire(&uc->in, &uc->up->worker->buf_pool) < 0)
        return -ENOMEM;
    if (sl_buf_space(&uc->in) == 0)
        sl_buf_compact(&uc->in);
    if (sl_buf_space(&uc->in) == 0)
        return -ENOBUFS;
    size_t n = 0, space = sl_buf_space(&uc->in);
    int rc = sl_transport_read(&uc->tr, uc->in.data + uc->in.end, space, &n);
    if (rc < 0) {
        if (rc == -EAGAIN)
            sl_io_clear_ready(&uc->io, EPOLLIN);
        return rc;
    }
    if (n == 0)
        *eof = true;
    else if (n < space && !sl_transport_pending(&uc->tr))
        sl_io_clear_ready(&uc->io, EPOLLIN); /* drained: the next bytes raise a new edge */
    uc->in.end += (uint32_t)n;
    return 0;
}

/* Moves a new connection through its setup (connect, PROXY header, TLS handshake) as events
 * allow; tells the user EPOLLOUT once done, EPOLLERR (with setup_err) when it failed. */
static void uc_setup(struct sl_upstream_conn *uc, uint32_t events)
{
    struct sl_loop *loop = &uc->up->worker->loop;
    int err = 0;
    if (uc->setup == SL_UC_SETUP_TCP) {
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
            return;
        int soerr = 0;
        socklen_t len = sizeof soerr;
        if (getsockopt(uc->tr.fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0)
            soerr = errno;
        err = -soerr;
        if (!err && (events & (EPOLLERR | EPOLLHUP)))
            err = -ECONNREFUSED; /* hung up without an error */
        if (err)
            goto fail;
        uc->setup = uc->pp_len   ? SL_UC_SETUP_PROXY
                    : uc->is_tls ? SL_UC_SETUP_TLS
                                 : SL_UC_SETUP_DONE;
    }
    if (uc->setup == SL_UC_SETUP_PROXY) {
        /* In the clear, before any TLS byte (the header is for the backend's TCP layer). */
        while (uc->pp_off < uc->pp_len) {
            ssize_t n = send(uc->tr.fd, uc->pp + uc->pp_off, (size_t)(uc->pp_len - uc->pp_off),
                             MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                sl_io_clear_ready(&uc->io, EPOLLOUT);
                sl_io_modify(loop, &uc->io, EPOLLOUT);
                return;
            }
            if (n < 0) {
                err = -errno;
                goto fail;
            }
            uc->pp_off = (uint8_t)(uc->pp_off + n);
        }
        uc->setup = uc->is_tls ? SL_UC_SETUP_TLS : SL_UC_SETUP_DONE;
    }
    if (uc->setup == SL_UC_SETUP_TLS) {
        int rc = sl_transport_handshake(&uc->tr);
        if (rc == -EAGAIN) {
            unsigned want = sl_transport_want(&uc->tr, EPOLLIN);
            sl_io_clear_ready(&uc->io, want);
            sl_io_modify(loop, &uc->io, want);
            return;
        }
        if (rc < 0) {
            if (sl_log_enabled(SL_LOG_LVL_DEBUG)) {
                char why[256];
                SL_DEBUG("upstream %s endpoint %s: TLS handshake failed: %s", uc->up->conf->name,
                         uc->wep->ep->address, sl_tls_last_error_str(&uc->tls, why, sizeof why));
            }
            /* A protocol or verification failure is -EPROTO; a reset stays a reset. */
            err = rc;
            goto fail;
        }
        uc->setup = SL_UC_SETUP_DONE;
    }
    sl_io_modify(loop, &uc->io, 0);
    if (uc->user.on_event)
        uc->user.on_event(uc, EPOLLOUT, uc->user.data);
    return;
fail:
    uc->setup_err = err;
    sl_io_modify(loop, &uc->io, 0);
    if (uc->user.on_event)
        uc->user.on_event(uc, EPOLLERR, uc->user.data);
}

static void on_uc_io(struct sl_io *io, uint32_t events)
{
    struct sl_upstream_conn *uc = io->data;
    if (uc->state == SL_UC_CLOSED)
        return;
    if (uc->state == SL_UC_IDLE) {
        uc_close(uc);
        return;
    }
    if (uc->state == SL_UC_CONNECTING && uc->setup != SL_UC_SETUP_DONE) {
        uc_setup(uc, events);
        return;
    }
    /* The readiness a transport waited for in the opposite direction serves the operation
     * that waited: a TLS read that wanted EPOLLOUT is retried as a read, and the reverse. */
    unsigned want = uc->tr.ops->want ? uc->tr.ops->want(&uc->tr) : 0;
    if (want && (events & want) && want != (events & (EPOLLIN | EPOLLOUT))) {
        events |= EPOLLIN | EPOLLOUT;
        uc->io.ready |= EPOLLIN;
    }
    if (uc->user.on_event)
        uc->user.on_event(uc, events, uc->user.data);
}

static void on_uc_timer(struct sl_timer *t)
{
    struct sl_upstream_conn *uc = t->data;
    if (uc->state == SL_UC_IDLE) {
        uc_close(uc);
        return;
    }
    if (uc->user.on_timeout)
        uc->user.on_timeout(uc, uc->user.data);
}
