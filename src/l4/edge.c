#include "l4/edge.h"

#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "config/config.h"
#include "core/cidr.h"
#include "core/log.h"
#include "core/loop.h"
#include "core/transport.h"
#include "l4/gateway.h"
#include "l4/ip_limit.h"
#include "proxy/proxy_proto.h"
#include "tls/tls_transport.h"
#include "tls/tls_types.h"

enum edge_state {
    ES_PROXY,   /* waiting for the PROXY header (or the first bytes of an untrusted peer) */
    ES_TLS,     /* TLS handshake */
    ES_CLOSING, /* closed; returned to the slab after this turn */
};

struct sl_edge_conn {
    struct sl_io io;
    struct sl_timer timer;
    struct sl_defer defer;
    union {
        struct sl_transport plain;
        struct sl_tls_transport tls;
    } t;
    struct sl_gw_listener *gl;
    struct sl_edge_conn *prev, *next;
    struct sockaddr_storage client; /* the TCP peer, then a trusted PROXY header's source */
    struct sockaddr_storage dest;   /* a PROXY header's destination; ss_family 0 = unknown */
    uint64_t cookie;
    int fd;
    uint8_t state;
    bool has_transport; /* t owns fd */
    bool trusted;       /* the TCP peer may send a PROXY header */
};

static const unsigned char pp_v2_sig[12] = {0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d,
                                            0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a};

static struct sl_listener_rt *listener_rt(const struct sl_gw_listener *gl)
{
    return gl->lr;
}

static void count(_Atomic uint64_t *c)
{
    atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

void sl_edge_release(struct sl_gw_listener *gl, const struct sockaddr *client, uint64_t cookie)
{
    (void)gl;
    /* The table the connection was counted in: a reload may have given the listener another. */
    if (cookie) {
        struct sl_ip_limit *t = (struct sl_ip_limit *)(uintptr_t)cookie;
        sl_ip_limit_release(t, client);
        sl_ip_limit_free(t); /* the connection's reference */
    }
}

/* Applies the per-IP cap and rate to `client`. False (and counted) when refused. */
static bool ip_admit(struct sl_gw_listener *gl, const struct sockaddr *client, uint64_t *cookie)
{
    struct sl_listener_rt *lr = listener_rt(gl);
    if (!lr->ip_limit)
        return true;
    enum sl_ip_limit_reason why = SL_IP_LIMIT_OK;
    uint64_t now = sl_loop_now_us(&gl->gw->worker->loop);
    if (!sl_ip_limit_acquire(lr->ip_limit, client, now, &why)) {
        count(why == SL_IP_LIMIT_RATE ? &lr->stats->refused_ip_rate : &lr->stats->refused_ip_conns);
        return false;
    }
    if (why == SL_IP_LIMIT_OK) {
        /* The connection keeps its table alive: a reload may give the listener another. */
        sl_ip_limit_ref(lr->ip_limit);
        *cookie = (uint64_t)(uintptr_t)lr->ip_limit;
    }
    return true;
}

/* ---- pending connections ---- */

static void on_edge_io(struct sl_io *io, uint32_t events);
static void on_edge_timer(struct sl_timer *t);
static void on_edge_defer(struct sl_defer *d);

static void edge_close(struct sl_edge_conn *ec, bool release_ip)
{
    if (ec->state == ES_CLOSING)
        return;
    struct sl_gw_worker *gw = ec->gl->gw;
    struct sl_loop *loop = &gw->worker->loop;
    ec->state = ES_CLOSING;
    sl_timer_cancel(loop, &ec->timer);
    sl_io_stop(loop, &ec->io);
    /* The slot first: a client that sees the close may reconnect at once. */
    if (release_ip)
        sl_edge_release(ec->gl, (const struct sockaddr *)&ec->client, ec->cookie);
    if (ec->fd >= 0) {
        if (ec->has_transport)
            sl_transport_close(&ec->t.plain);
        else
            close(ec->fd);
        ec->fd = -1;
    }
    if (ec->prev)
        ec->prev->next = ec->next;
    else
        gw->edge_conns = ec->next;
    if (ec->next)
        ec->next->prev = ec->prev;
    gw->edge_count--;
    ec->gl->edge_count--;
    if (gw->gate)
        atomic_fetch_sub_explicit(&gw->gate->open, 1, memory_order_relaxed);
    sl_defer_queue(loop, &ec->defer);
    sl_gw_worker_check_drained(gw);
}

/* The connection passed every step: to its protocol. */
static void edge_hand_over(struct sl_edge_conn *ec)
{
    struct sl_gw_listener *gl = ec->gl;
    sl_io_stop(&gl->gw->worker->loop, &ec->io);
    if (!ec->has_transport) {
        sl_tcp_transport_init(&ec->t.plain, ec->fd);
        ec->has_transport = true;
    }
    size_t size = ec->t.plain.ops == &sl_tcp_transport_ops ? sizeof ec->t.plain : sizeof ec->t.tls;
    uint64_t cookie = ec->cookie;
    ec->fd = -1; /* moved */
    ec->cookie = 0;
    sl_gw_listener_adopt(gl, &ec->t.plain, size, (const struct sockaddr *)&ec->client,
                         ec->dest.ss_family ? (const struct sockaddr *)&ec->dest : NULL, cookie);
    edge_close(ec, false);
}

static void edge_start_tls(struct sl_edge_conn *ec);
static void edge_tls_step(struct sl_edge_conn *ec);

/* After the PROXY stage: TLS if the listener has it, else hand over. */
static void edge_next(struct sl_edge_conn *ec)
{
    if (listener_rt(ec->gl)->tls)
        edge_start_tls(ec);
    else
        edge_hand_over(ec);
}

/* Bytes that are, or may still become, a PROXY signature. */
static bool looks_like_proxy(const unsigned char *b, size_t n, bool *complete)
{
    size_t v1 = n < 6 ? n : 6, v2 = n < sizeof pp_v2_sig ? n : sizeof pp_v2_sig;
    if (memcmp(b, "PROXY ", v1) == 0) {
        *complete = n >= 6;
        return true;
    }
    if (memcmp(b, pp_v2_sig, v2) == 0) {
        *complete = n >= sizeof pp_v2_sig;
        return true;
    }
    return false;
}

static void edge_proxy_step(struct sl_edge_conn *ec)
{
    struct sl_listener_rt *lr = listener_rt(ec->gl);
    unsigned char buf[SL_PP_MAX_HEADER_BYTES];
    ssize_t n;
    do
        n = recv(ec->fd, buf, sizeof buf, MSG_PEEK);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN) {
            sl_io_clear_ready(&ec->io, EPOLLIN);
            return;
        }
        edge_close(ec, true);
        return;
    }
    if (n == 0) {
        edge_close(ec, true);
        return;
    }
    if (!ec->trusted) {
        /* Spec section 5: a header from a peer we do not trust is an attempt to choose its
         * own address. Anything else is an ordinary client: nothing is consumed. */
        bool complete = false;
        if (looks_like_proxy(buf, (size_t)n, &complete)) {
            if (complete) {
                count(&lr->stats->pp_refused_untrusted);
                edge_close(ec, true);
            } else {
                sl_io_clear_ready(&ec->io, EPOLLIN);
            }
            return;
        }
        edge_next(ec);
        return;
    }
    struct sl_pp_result res;
    enum sl_pp_err err = SL_PP_ERR_NONE;
    enum sl_status st = sl_proxy_proto_parse(buf, (size_t)n, &res, &err);
    if (st == SL_AGAIN) {
        if ((size_t)n == sizeof buf) {
            count(&lr->stats->pp_refused_malformed);
            edge_close(ec, true);
            return;
        }
        /* The peek saw everything the socket holds; more comes with a new edge. */
        sl_io_clear_ready(&ec->io, EPOLLIN);
        return;
    }
    if (st == SL_ERROR) {
        SL_DEBUG("listener %s: PROXY header refused: %s", ec->gl->lr->conf->name,
                 sl_pp_err_name(err));
        count(&lr->stats->pp_refused_malformed);
        edge_close(ec, true);
        return;
    }
    /* Consume exactly the header; the payload stays for the protocol. */
    ssize_t got = recv(ec->fd, buf, res.header_bytes, 0);
    if (got != (ssize_t)res.header_bytes) {
        edge_close(ec, true);
        return;
    }
    count(&lr->stats->pp_accepted);
    if (!res.is_local) {
        /* The per-IP limit belongs to the real client, not to the load balancer. */
        memcpy(&ec->client, &res.src, sizeof res.src);
        memcpy(&ec->dest, &res.dst, sizeof res.dst);
        if (!ip_admit(ec->gl, (const struct sockaddr *)&ec->client, &ec->cookie)) {
            edge_close(ec, false);
            return;
        }
    }
    edge_next(ec);
}

static void edge_start_tls(struct sl_edge_conn *ec)
{
    struct sl_listener_rt *lr = listener_rt(ec->gl);
    if (sl_tls_transport_init_server(&ec->t.tls, ec->fd, lr->tls) != 0) {
        edge_close(ec, true);
        return;
    }
    ec->has_transport = true;
    ec->state = ES_TLS;
    sl_timer_arm(&ec->gl->gw->worker->loop, &ec->timer, lr->conf->tls.handshake_timeout_ms);
    edge_tls_step(ec);
}

static void edge_tls_step(struct sl_edge_conn *ec)
{
    struct sl_listener_rt *lr = listener_rt(ec->gl);
    int rc = sl_transport_handshake(&ec->t.plain);
    if (rc == 0) {
        count(&lr->stats->tls_handshakes);
        if (sl_tls_is_resumed(&ec->t.tls))
            count(&lr->stats->tls_resumed);
        edge_hand_over(ec);
        return;
    }
    if (rc == -EAGAIN) {
        unsigned want = sl_transport_want(&ec->t.plain, EPOLLIN);
        sl_io_clear_ready(&ec->io, want);
        sl_io_modify(&ec->gl->gw->worker->loop, &ec->io, want | EPOLLRDHUP);
        return;
    }
    if (sl_log_enabled(SL_LOG_LVL_DEBUG)) {
        char why[256];
        SL_DEBUG("listener %s: TLS handshake failed: %s", ec->gl->lr->conf->name,
                 sl_tls_last_error_str(&ec->t.tls, why, sizeof why));
    }
    count(&lr->stats->tls_failed);
    edge_close(ec, true);
}

static void on_edge_io(struct sl_io *io, uint32_t events)
{
    struct sl_edge_conn *ec = io->data;
    if (ec->state == ES_PROXY) {
        if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
            edge_proxy_step(ec);
    } else if (ec->state == ES_TLS) {
        edge_tls_step(ec);
    }
}

static void on_edge_timer(struct sl_timer *t)
{
    struct sl_edge_conn *ec = t->data;
    struct sl_listener_rt *lr = listener_rt(ec->gl);
    if (ec->state == ES_PROXY && !ec->trusted) {
        /* An untrusted peer silent so far is an ordinary client that has not spoken yet (a
         * browser's preconnect, a protocol where the server speaks first): its protocol's own
         * timeouts take over. Only a stalled start of a PROXY signature is closed here. */
        unsigned char b;
        ssize_t n = recv(ec->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            edge_next(ec);
            return;
        }
    }
    count(ec->state == ES_PROXY ? &lr->stats->pp_timeouts : &lr->stats->tls_timeouts);
    edge_close(ec, true);
}

static void on_edge_defer(struct sl_defer *d)
{
    struct sl_edge_conn *ec = d->data;
    if (ec->state == ES_CLOSING)
        sl_slab_put(&ec->gl->gw->edge_slab, ec);
}

/* ---- accept ---- */

void sl_edge_accept(struct sl_gw_listener *gl, int fd, const struct sockaddr *peer)
{
    struct sl_listener_rt *lr = listener_rt(gl);
    /* Turned away before any byte is read: no buffer, no timer, no log line per connection
     * (a flood would make those the attack); only counted. */
    if (lr->deny && sl_cidr_set_contains(lr->deny, peer)) {
        count(&lr->stats->refused_denied);
        close(fd);
        return;
    }
    if (lr->allow && !sl_cidr_set_contains(lr->allow, peer)) {
        count(&lr->stats->refused_not_allowed);
        close(fd);
        return;
    }
    bool trusted = lr->pp_trusted && sl_cidr_set_contains(lr->pp_trusted, peer);
    uint64_t cookie = 0;
    /* A trusted sender's connections are limited by the client its header names, later. */
    if (!trusted && !ip_admit(gl, peer, &cookie)) {
        close(fd);
        return;
    }
    count(&lr->stats->accepted);
    if (!lr->pp_trusted && !lr->tls) {
        struct sl_transport tr;
        sl_tcp_transport_init(&tr, fd);
        sl_gw_listener_adopt(gl, &tr, sizeof tr, peer, NULL, cookie);
        return;
    }
    struct sl_gw_worker *gw = gl->gw;
    struct sl_edge_conn *ec = sl_slab_get(&gw->edge_slab);
    if (!ec) {
        close(fd);
        sl_edge_release(gl, peer, cookie);
        return;
    }
    memset(ec, 0, sizeof *ec);
    ec->gl = gl;
    ec->fd = fd;
    ec->cookie = cookie;
    ec->trusted = trusted;
    memcpy(&ec->client, peer,
           peer->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in));
    sl_timer_init(&ec->timer, on_edge_timer, ec);
    sl_defer_init(&ec->defer, on_edge_defer, ec);
    struct sl_loop *loop = &gw->worker->loop;
    if (sl_io_start(loop, &ec->io, fd, EPOLLIN | EPOLLRDHUP | SL_IO_EDGE, on_edge_io, ec) < 0) {
        close(fd);
        sl_edge_release(gl, peer, cookie);
        sl_slab_put(&gw->edge_slab, ec);
        return;
    }
    ec->next = gw->edge_conns;
    if (gw->edge_conns)
        gw->edge_conns->prev = ec;
    gw->edge_conns = ec;
    gw->edge_count++;
    gl->edge_count++;
    if (gw->gate)
        atomic_fetch_add_explicit(&gw->gate->open, 1, memory_order_relaxed);
    if (lr->pp_trusted) {
        ec->state = ES_PROXY;
        sl_timer_arm(loop, &ec->timer, lr->conf->proxy_protocol.timeout_ms);
        /* Nothing has been read yet: the first bytes raise the first edge. */
        return;
    }
    edge_start_tls(ec);
}

void sl_edge_worker_init(struct sl_gw_worker *gw)
{
    sl_slab_init(&gw->edge_slab, sizeof(struct sl_edge_conn));
    gw->edge_conns = NULL;
    gw->edge_count = 0;
}

void sl_edge_drain(struct sl_gw_worker *gw)
{
    while (gw->edge_conns)
        edge_close(gw->edge_conns, true);
}

void sl_edge_worker_dispose(struct sl_gw_worker *gw)
{
    sl_edge_drain(gw);
    sl_loop_run_deferred(&gw->worker->loop);
    sl_slab_dispose(&gw->edge_slab);
}

size_t sl_edge_conn_count(const struct sl_gw_worker *gw)
{
    return gw->edge_count;
}
