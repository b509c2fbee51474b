#include "l4/tcp_proxy.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config/config.h"
#include "core/hash.h"
#include "core/log.h"
#include "core/loop.h"
#include "core/slab.h"
#include "core/worker.h"
#include "l4/tunnel.h"
#include "proxy/pool.h"
#include "proxy/proxy_proto.h"
#include "proxy/upstream.h"

/* Pipes for spliced directions, per proxy: a pipe is held only while bytes are in flight, so
 * these bound busy directions, not connections; past max_live a direction copies through a
 * pool block instead. Pipes start at the kernel's 64 KiB; a bulk flow that fills its pipe
 * grows it to 1 MiB, which the kernel refuses past the per-user pipe memory soft limit
 * (fs.pipe-user-pages-soft, docs/operations.md), leaving it at 64 KiB. */
#define PIPE_BYTES 0u              /* the kernel's default, 64 KiB */
#define PIPE_GROW_BYTES (1u << 20) /* for flows that fill theirs (tunnel.c pipe_grow) */
#define PIPES_MAX_FREE 16u
#define PIPES_MAX_LIVE 256u

/* A v2 header for two IPv6 addresses is 52 bytes; a v1 line at most 107. */
#define PP_MAX_BYTES SL_PP_V1_MAX_BYTES

enum tp_state {
    TP_CONNECTING, /* upstream connect in progress */
    TP_HEADER,     /* writing the PROXY header */
    TP_TUNNEL,     /* forwarding; the tunnel owns both transports */
    TP_ENDING,     /* closed, on_close and the free queued */
};

struct tp_conn {
    struct sl_tcp_proxy *p;
    struct tp_conn *prev, *next;
    enum tp_state state;
    union sl_l4_transport client; /* moved in at accept */
    struct sl_transport upstream; /* fd -1 when none */
    struct sl_io uio;             /* upstream socket until the tunnel starts */
    struct sl_timer timer;        /* connect / header write */
    struct sl_defer end;          /* on_close and free, for a connection that never tunnelled */
    struct sl_tunnel tunnel;
    struct sockaddr_storage client_addr, dest_addr;
    uint64_t cookie;
    struct sl_wep *wep; /* the endpoint of the current attempt (a use held), or NULL */
    bool probe;
    bool counted_pending; /* holds a slot of circuit_breaker.max_pending */
    bool counted_conn;    /* holds a slot of circuit_breaker.max_connections */
    uint8_t tried_count, retries;
    uint8_t pp_len, pp_off;
    struct sl_endpoint *tried[SL_PICK_MAX_EXCLUDE];
    char pp[PP_MAX_BYTES];
};

struct sl_tcp_proxy {
    struct sl_worker *worker;
    struct sl_loop *loop;
    const struct sl_listener_conf *lc;
    const struct sl_upstream_conf *uc;
    struct sl_upstream_rt *up;
    struct sl_tunnel_pipes pipes;
    struct sl_slab conns_slab;
    struct tp_conn *conns; /* every open connection, newest first */
    size_t count;
    struct sl_tcp_proxy_hooks hooks;
    struct sl_defer drained; /* on_drained when a drain found nothing open */
    bool draining;
    struct sl_tcp_proxy_stats stats;
};

static void try_connect(struct tp_conn *c);

/* ---- ending ------------------------------------------------------------------------------ */

static void release_slots(struct tp_conn *c)
{
    struct sl_pool *pool = c->p->up->pool;
    if (c->counted_pending) {
        atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_relaxed);
        c->counted_pending = false;
    }
    if (c->counted_conn) {
        atomic_fetch_sub_explicit(&pool->connections, 1, memory_order_relaxed);
        c->counted_conn = false;
    }
}

/* Ends the current attempt's hold on its endpoint (balancer in-flight count, use). */
static void release_endpoint(struct tp_conn *c, enum sl_outcome outcome)
{
    if (!c->wep)
        return;
    sl_upstream_done(c->p->up, c->wep, outcome, c->probe);
    c->wep = NULL;
    c->probe = false;
}

static void set_reset(int fd)
{
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    if (fd >= 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
}

static void close_upstream(struct tp_conn *c, bool reset)
{
    struct sl_loop *loop = c->p->loop;
    sl_timer_cancel(loop, &c->timer);
    sl_io_stop(loop, &c->uio);
    if (c->upstream.fd >= 0) {
        if (reset)
            set_reset(c->upstream.fd);
        sl_transport_close(&c->upstream);
    }
    release_slots(c);
}

/* The connection is gone: tell the caller, unlink and free. From the deferred pass (or from
 * sl_tcp_proxy_free). */
static void conn_finish(struct tp_conn *c)
{
    struct sl_tcp_proxy *p = c->p;
    if (p->hooks.on_close)
        p->hooks.on_close(p->hooks.data, (const struct sockaddr *)&c->client_addr, c->cookie);
    if (c->prev)
        c->prev->next = c->next;
    else
        p->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    p->count--;
    sl_slab_put(&p->conns_slab, c);
    if (p->count == 0 && p->draining && p->hooks.on_drained)
        p->hooks.on_drained(p->hooks.data);
}

static void on_end(struct sl_defer *d)
{
    conn_finish(d->data);
}

/* Closes a connection that never reached the tunnel. Nothing was forwarded, so both sides are
 * reset: a FIN would look like an upstream that accepted and said nothing. */
static void conn_end(struct tp_conn *c)
{
    close_upstream(c, true);
    release_endpoint(c, SL_OUTCOME_CANCELLED);
    set_reset(c->client.plain.fd);
    sl_transport_close(&c->client.plain);
    c->state = TP_ENDING;
    sl_defer_queue(c->p->loop, &c->end);
}

/* ---- the tunnel -------------------------------------------------------------------------- */

static void on_tunnel_done(struct sl_tunnel *t, enum sl_tunnel_reason reason, void *data)
{
    struct tp_conn *c = data;
    struct sl_tcp_proxy *p = c->p;
    switch (reason) {
    case SL_TUNNEL_IDLE_TIMEOUT:
        p->stats.idle_timeouts++;
        break;
    case SL_TUNNEL_CLIENT_ERROR:
    case SL_TUNNEL_UPSTREAM_ERROR:
    case SL_TUNNEL_LOCAL_ERROR:
        p->stats.errors++;
        break;
    default:
        break;
    }
    p->stats.bytes_up += sl_tunnel_bytes(t, SL_TUNNEL_UP);
    p->stats.bytes_down += sl_tunnel_bytes(t, SL_TUNNEL_DOWN);
    SL_DEBUG("listener %s: tcp connection to %s ended: %s (%llu bytes up, %llu down)", p->lc->name,
             c->wep ? c->wep->ep->address : "-", sl_tunnel_reason_name(reason),
             (unsigned long long)sl_tunnel_bytes(t, SL_TUNNEL_UP),
             (unsigned long long)sl_tunnel_bytes(t, SL_TUNNEL_DOWN));
    /* The tunnel closed both transports. The connect was reported already; what happens on an
     * established stream (a reset by an application that is done) says nothing reliable
     * about the endpoint. */
    c->upstream.fd = -1;
    release_slots(c);
    release_endpoint(c, SL_OUTCOME_CANCELLED);
    conn_finish(c);
}

static void start_tunnel(struct tp_conn *c)
{
    struct sl_tcp_proxy *p = c->p;
    sl_timer_cancel(p->loop, &c->timer);
    /* The tunnel registers the socket itself; its first turn sees the current readiness. */
    sl_io_stop(p->loop, &c->uio);
    int rc =
        sl_tunnel_start_transports(&c->tunnel, p->loop, &p->pipes, &c->client.plain, &c->upstream,
                                   0, p->lc->limits.idle_timeout_ms, on_tunnel_done, c);
    if (rc < 0) {
        SL_WARN("listener %s: cannot start a tunnel: %s", p->lc->name, strerror(-rc));
        p->stats.errors++;
        conn_end(c);
        return;
    }
    c->state = TP_TUNNEL;
}

/* ---- the PROXY header -------------------------------------------------------------------- */

static void write_header(struct tp_conn *c)
{
    while (c->pp_off < c->pp_len) {
        ssize_t n =
            send(c->upstream.fd, c->pp + c->pp_off, (size_t)(c->pp_len - c->pp_off), MSG_NOSIGNAL);
        if (n > 0) {
            c->pp_off += (uint8_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            /* Only a socket buffer smaller than 108 bytes could do this: wait for room. */
            sl_io_clear_ready(&c->uio, EPOLLOUT);
            sl_io_modify(c->p->loop, &c->uio, EPOLLOUT);
            return;
        }
        SL_DEBUG("listener %s: endpoint %s: PROXY header not sent: %s", c->p->lc->name,
                 c->wep ? c->wep->ep->address : "-", strerror(errno));
        c->p->stats.errors++;
        conn_end(c);
        return;
    }
    start_tunnel(c);
}

/* ---- connecting -------------------------------------------------------------------------- */

/* A connect attempt failed: its outcome goes to the endpoint's health, and the next endpoint
 * is tried while attempts and the retry budget allow. */
static void attempt_failed(struct tp_conn *c, enum sl_outcome outcome, int err)
{
    struct sl_tcp_proxy *p = c->p;
    if (outcome == SL_OUTCOME_TIMEOUT)
        p->stats.connect_timeouts++;
    else
        p->stats.connect_failures++;
    SL_DEBUG("listener %s: upstream %s endpoint %s: connect failed: %s", p->lc->name, p->uc->name,
             c->wep ? c->wep->ep->address : "-", strerror(-err));
    close_upstream(c, false);
    release_endpoint(c, outcome);
    if (c->retries < p->uc->retries.attempts && c->tried_count < SL_PICK_MAX_EXCLUDE &&
        sl_pool_budget_retry(p->up->pool, &p->uc->retries, sl_loop_now_ms(p->loop))) {
        c->retries++;
        p->stats.retries++;
        try_connect(c);
        return;
    }
    p->stats.unavailable++;
    conn_end(c);
}

static void connected(struct tp_conn *c)
{
    struct sl_tcp_proxy *p = c->p;
    sl_timer_cancel(p->loop, &c->timer);
    if (c->counted_pending) {
        atomic_fetch_sub_explicit(&p->up->pool->pending, 1, memory_order_relaxed);
        c->counted_pending = false;
    }
    /* Health hears about the connect now, so a half-open probe does not last as long as the
     * stream; the balancer's in-flight count and the endpoint use stay until the end. */
    sl_endpoint_report(c->wep->ep, p->up->set, SL_OUTCOME_SUCCESS, c->probe,
                       sl_loop_now_ms(p->loop));
    c->probe = false;
    if (p->uc->proxy_protocol == SL_PP_SEND_OFF) {
        start_tunnel(c);
        return;
    }
    const struct sockaddr *src = (const struct sockaddr *)&c->client_addr;
    const struct sockaddr *dst =
        c->dest_addr.ss_family != AF_UNSPEC ? (const struct sockaddr *)&c->dest_addr : NULL;
    size_t n =
        sl_proxy_proto_write(p->uc->proxy_protocol == SL_PP_SEND_V2, c->pp, sizeof c->pp, src, dst);
    c->pp_len = (uint8_t)n;
    c->pp_off = 0;
    c->state = TP_HEADER;
    sl_timer_arm(p->loop, &c->timer, p->uc->connect_timeout_ms);
    write_header(c);
}

static void on_upstream_io(struct sl_io *io, uint32_t events)
{
    struct tp_conn *c = io->data;
    if (c->state == TP_HEADER) {
        write_header(c);
        return;
    }
    if (c->state != TP_CONNECTING || !(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
        return;
    int soerr = 0;
    socklen_t len = sizeof soerr;
    if (getsockopt(c->upstream.fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0)
        soerr = errno;
    if (!soerr && (events & (EPOLLERR | EPOLLHUP)))
        soerr = ECONNRESET;
    if (soerr) {
        attempt_failed(c, SL_OUTCOME_CONNECT_FAILURE, -soerr);
        return;
    }
    connected(c);
}

static void on_timer(struct sl_timer *t)
{
    struct tp_conn *c = t->data;
    if (c->state == TP_CONNECTING) {
        attempt_failed(c, SL_OUTCOME_TIMEOUT, -ETIMEDOUT);
    } else if (c->state == TP_HEADER) {
        /* Connected, yet the backend's window stays shut for a 108-byte header. */
        c->p->stats.errors++;
        conn_end(c);
    }
}

static uint64_t client_hash(const struct sockaddr_storage *a)
{
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *s = (const struct sockaddr_in *)a;
        return sl_hash_bytes(&s->sin_addr, sizeof s->sin_addr, 0);
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)a;
        return sl_hash_bytes(&s->sin6_addr, sizeof s->sin6_addr, 0);
    }
    return 0;
}

/* Takes a slot of an upstream-wide breaker counter; false (and nothing taken) when full. */
static bool take_slot(_Atomic uint32_t *counter, uint32_t max)
{
    uint32_t cur = atomic_fetch_add_explicit(counter, 1, memory_order_relaxed);
    if (cur < max)
        return true;
    atomic_fetch_sub_explicit(counter, 1, memory_order_relaxed);
    return false;
}

static void try_connect(struct tp_conn *c)
{
    struct sl_tcp_proxy *p = c->p;
    const struct sl_upstream_conf *uc = p->uc;
    struct sl_pool *pool = p->up->pool;
    struct sl_pick_ctx ctx = {0};
    if (uc->balance == SL_BALANCE_HASH && uc->hash_on == SL_HASH_IP) {
        ctx.hash = client_hash(&c->client_addr);
        ctx.has_hash = true;
    }
    enum sl_pick_fail why = 0;
    bool probe = false;
    struct sl_wep *w = sl_upstream_pick(p->up, &ctx, c->tried, c->tried_count, &probe, &why);
    if (!w) {
        if (c->tried_count) {
            p->stats.unavailable++; /* failed over as far as the pool goes */
        } else {
            if (why == SL_PICK_NONE_HEALTHY)
                atomic_fetch_add_explicit(&pool->stats.no_healthy_endpoint, 1,
                                          memory_order_relaxed);
            p->stats.no_healthy_endpoint++;
        }
        conn_end(c);
        return;
    }
    c->wep = w;
    c->probe = probe;
    c->tried[c->tried_count++] = w->ep;
    /* The upstream's breakers, shared with its HTTP traffic (exchange.c and upstream.c count
     * the same fields, and only when the limit is set). */
    if (uc->breaker.max_pending) {
        if (!take_slot(&pool->pending, uc->breaker.max_pending)) {
            atomic_fetch_add_explicit(&pool->stats.overflow_pending, 1, memory_order_relaxed);
            p->stats.overflow++;
            conn_end(c);
            return;
        }
        c->counted_pending = true;
    }
    if (uc->breaker.max_connections) {
        if (!take_slot(&pool->connections, uc->breaker.max_connections)) {
            atomic_fetch_add_explicit(&pool->stats.overflow_connections, 1, memory_order_relaxed);
            p->stats.overflow++;
            conn_end(c);
            return;
        }
        c->counted_conn = true;
    }
    const struct sl_endpoint *e = w->ep;
    int fd = socket(e->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        int err = -errno;
        SL_WARN("listener %s: cannot open a socket: %s", p->lc->name, strerror(-err));
        p->stats.errors++;
        conn_end(c); /* our failure (descriptors), not the endpoint's */
        return;
    }
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    sl_tcp_transport_init(&c->upstream, fd);
    c->state = TP_CONNECTING;
    if (connect(fd, (const struct sockaddr *)&e->addr, e->addr_len) < 0 && errno != EINPROGRESS) {
        attempt_failed(c, SL_OUTCOME_CONNECT_FAILURE, -errno);
        return;
    }
    int rc = sl_io_start(p->loop, &c->uio, fd, EPOLLOUT | SL_IO_EDGE, on_upstream_io, c);
    if (rc < 0) {
        p->stats.errors++;
        conn_end(c);
        return;
    }
    sl_timer_arm(p->loop, &c->timer, uc->connect_timeout_ms);
}

/* ---- API --------------------------------------------------------------------------------- */

static void on_drained_defer(struct sl_defer *d)
{
    struct sl_tcp_proxy *p = d->data;
    if (p->count == 0 && p->hooks.on_drained)
        p->hooks.on_drained(p->hooks.data);
}

struct sl_tcp_proxy *sl_tcp_proxy_new(struct sl_worker *w, const struct sl_listener_conf *lc,
                                      const struct sl_upstream_conf *uc, struct sl_upstream_rt *up)
{
    struct sl_tcp_proxy *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->worker = w;
    p->loop = &w->loop;
    p->lc = lc;
    p->uc = uc;
    p->up = up;
    if (sl_tunnel_pipes_init(&p->pipes, &w->buf_pool, PIPE_BYTES, PIPES_MAX_FREE, PIPES_MAX_LIVE) <
        0) {
        free(p);
        return NULL;
    }
    p->pipes.grow_bytes = PIPE_GROW_BYTES;
    sl_slab_init(&p->conns_slab, sizeof(struct tp_conn));
    sl_defer_init(&p->drained, on_drained_defer, p);
    return p;
}

void sl_tcp_proxy_set_hooks(struct sl_tcp_proxy *p, const struct sl_tcp_proxy_hooks *h)
{
    p->hooks = *h;
}

void sl_tcp_proxy_accept(struct sl_tcp_proxy *p, const struct sl_transport *tr, size_t tr_size,
                         const struct sockaddr *client, const struct sockaddr *dest,
                         uint64_t cookie)
{
    struct tp_conn *c =
        tr_size <= sizeof(union sl_l4_transport) ? sl_slab_get(&p->conns_slab) : NULL;
    if (!c) {
        union sl_l4_transport dead; /* the transport is ours now, even to close */
        memcpy(&dead, tr, tr_size <= sizeof dead ? tr_size : sizeof dead);
        set_reset(dead.plain.fd);
        sl_transport_close(&dead.plain);
        if (p->hooks.on_close)
            p->hooks.on_close(p->hooks.data, client, cookie);
        return;
    }
    c->p = p;
    memcpy(&c->client, tr, tr_size);
    c->upstream.fd = -1;
    c->cookie = cookie;
    size_t alen =
        client->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
    memcpy(&c->client_addr, client, alen);
    if (dest && (dest->sa_family == AF_INET || dest->sa_family == AF_INET6)) {
        memcpy(&c->dest_addr, dest,
               dest->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                           : sizeof(struct sockaddr_in));
    } else if (p->uc->proxy_protocol != SL_PP_SEND_OFF) {
        /* The header names the address the client connected to: the socket knows it. */
        socklen_t dlen = sizeof c->dest_addr;
        if (getsockname(c->client.plain.fd, (struct sockaddr *)&c->dest_addr, &dlen) < 0)
            memset(&c->dest_addr, 0, sizeof c->dest_addr);
    }
    c->uio.fd = -1;
    sl_timer_init(&c->timer, on_timer, c);
    sl_defer_init(&c->end, on_end, c);
    c->next = p->conns;
    if (c->next)
        c->next->prev = c;
    p->conns = c;
    p->count++;
    p->stats.accepted++;
    sl_pool_budget_request(p->up->pool, sl_loop_now_ms(p->loop));
    try_connect(c);
}

void sl_tcp_proxy_drain(struct sl_tcp_proxy *p)
{
    p->draining = true;
    if (p->count == 0)
        sl_defer_queue(p->loop, &p->drained);
}

size_t sl_tcp_proxy_conn_count(const struct sl_tcp_proxy *p)
{
    return p->count;
}

void sl_tcp_proxy_stats(const struct sl_tcp_proxy *p, struct sl_tcp_proxy_stats *out)
{
    *out = p->stats;
    out->active = p->count;
    for (const struct tp_conn *c = p->conns; c; c = c->next) {
        if (c->state != TP_TUNNEL)
            continue;
        out->bytes_up += sl_tunnel_bytes(&c->tunnel, SL_TUNNEL_UP);
        out->bytes_down += sl_tunnel_bytes(&c->tunnel, SL_TUNNEL_DOWN);
    }
}

void sl_tcp_proxy_free(struct sl_tcp_proxy *p)
{
    if (!p)
        return;
    p->draining = false; /* no on_drained from here */
    sl_defer_cancel(p->loop, &p->drained);
    while (p->conns) {
        struct tp_conn *c = p->conns;
        switch (c->state) {
        case TP_TUNNEL:
            /* A no-op when it has ended already and only its on_done is queued. */
            sl_tunnel_abort(&c->tunnel);
            sl_defer_cancel(p->loop, &c->tunnel.done);
            on_tunnel_done(&c->tunnel, c->tunnel.reason, c);
            break;
        case TP_CONNECTING:
        case TP_HEADER:
            conn_end(c);
            sl_defer_cancel(p->loop, &c->end);
            conn_finish(c);
            break;
        case TP_ENDING:
            sl_defer_cancel(p->loop, &c->end);
            conn_finish(c);
            break;
        }
    }
    sl_tunnel_pipes_dispose(&p->pipes);
    sl_slab_dispose(&p->conns_slab);
    free(p);
}
