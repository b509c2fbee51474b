#include "http/h1_server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdatomic.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <unistd.h>

#include "config/config.h"
#include "core/buf.h"
#include "core/fmt.h"
#include "core/log.h"
#include "core/rand.h"
#include "core/transport.h"
#include "tls/tls_types.h"
#include "core/worker.h"
#include "http/h1_body.h"

enum conn_state {
    CS_IDLE,    /* between requests; idle timer */
    CS_HEAD,    /* reading a request head; header timer */
    CS_ACTIVE,  /* a request is with the handler */
    CS_FLUSH,   /* the handler finished; last response bytes going out */
    CS_LINGER,  /* response sent and write side shut; discarding what the client still sends */
    CS_CLOSING, /* closed; freed at the end of the turn */
};

enum conn_flag {
    CF_WANT_BODY = 1u << 0,  /* the handler waits for body bytes */
    CF_WANT_WRITE = 1u << 1, /* a write was short; EPOLLOUT armed */
    CF_EOF = 1u << 2,        /* the client closed its sending side */
    CF_CLOSE_AFTER = 1u << 3,
    CF_ABORT = 1u << 4, /* the client failed; on_abort pending */
    CF_NOTIFY_BODY = 1u << 5,
    CF_CONTINUE_SENT = 1u << 6,
    CF_BODY_TIMEOUT = 1u << 7, /* the body stalled past body_timeout: next peek fails, 408 */
};

struct sl_server_conn {
    struct sl_io io;
    union {
        struct sl_transport tr;
        struct sl_tls_transport tls_storage; /* room for any transport, moved in at adopt */
    };
    struct sl_timer timer;
    struct sl_defer defer;
    struct sl_buf in; /* the response buffer belongs to the request (h1_req.out) */
    struct sl_h1_server *srv;
    struct sl_server_conn *prev, *next;
    struct h1_req *req;
    struct sl_h1_head_state hs;
    uint8_t state;
    uint8_t family; /* peer address family; the address follows */
    uint16_t flags;
    uint32_t nreq;
    uint8_t peer_addr[16];
    uint16_t peer_port;
    uint64_t id;
    uint64_t cookie;     /* for on_conn_closed; 0 = none */
    uint64_t pre_cpu_ns; /* time spent on the next request before its head was complete */
};

/* The front-end's private part of a request; the public part comes first. */
struct h1_req {
    struct sl_request pub;
    struct sl_buf out; /* serialized response head, small bodies, framing */
    struct sl_h1_body_reader body;
    struct sl_h1_body_writer bw;
    uint64_t max_body;
    uint64_t body_waited_ms; /* time spent waiting for body bytes, for min_body_rate */
    uint64_t wait_since_ms;  /* start of the current wait for body bytes; 0 = not waiting */
    bool finished;           /* the handler called finish */
    const char *rest; /* what sl_request_respond could not write yet (outlives the request) */
    size_t rest_len;
    bool reusable;
};

static void conn_close(struct sl_server_conn *c);
static void conn_update_events(struct sl_server_conn *c);
static void conn_process(struct sl_server_conn *c);
static void on_conn_io(struct sl_io *io, uint32_t events);
static void on_conn_timer(struct sl_timer *t);
static void on_conn_defer(struct sl_defer *d);
static void conn_read_head(struct sl_server_conn *c, uint32_t events);

static struct sl_bpool *conn_pool(const struct sl_server_conn *c)
{
    return &c->srv->worker->buf_pool;
}

int sl_h1_server_init(struct sl_h1_server *srv, struct sl_worker *w, const char *name,
                      const struct sl_limits_conf *limits, const struct sl_request_handler *handler)
{
    memset(srv, 0, sizeof *srv);
    srv->worker = w;
    srv->loop = &w->loop;
    srv->handler = handler;
    if (sl_h1_server_set_limits(srv, name, limits) < 0)
        return -ENOMEM;
    sl_slab_init(&srv->conn_slab, sizeof(struct sl_server_conn));
    if (getrandom(&srv->rng, sizeof srv->rng, 0) != sizeof srv->rng || srv->rng == 0)
        srv->rng = 0x9e3779b97f4a7c15ull ^ (uint64_t)(uintptr_t)srv;
    return 0;
}

int sl_h1_server_set_limits(struct sl_h1_server *srv, const char *name,
                            const struct sl_limits_conf *limits)
{
    size_t cap = (size_t)limits->max_header_count + 1;
    if (cap > srv->scratch_cap) {
        struct sl_h1_header *s = calloc(cap, sizeof *s);
        if (!s)
            return -ENOMEM;
        free(srv->scratch);
        srv->scratch = s;
        srv->scratch_cap = cap;
    }
    srv->limits = limits;
    srv->name = name;
    srv->parse_limits.max_head_bytes = (size_t)limits->max_header_bytes;
    srv->parse_limits.max_headers = (size_t)limits->max_header_count;
    srv->parse_limits.max_uri_bytes = (size_t)limits->max_uri_bytes;
    return 0;
}

void sl_h1_server_dispose(struct sl_h1_server *srv)
{
    while (srv->conns) {
        struct sl_server_conn *c = srv->conns;
        if (c->req) {
            c->flags |= CF_ABORT;
            struct h1_req *r = c->req;
            if (!r->finished && srv->handler->on_abort)
                srv->handler->on_abort(&r->pub);
        }
        conn_close(c);
    }
    /* Closed connections are returned to the slab by the deferred pass: run it before the
     * slab goes away. */
    sl_loop_run_deferred(srv->loop);
    sl_slab_dispose(&srv->conn_slab);
    free(srv->scratch);
    srv->scratch = NULL;
}

static void link_conn(struct sl_h1_server *srv, struct sl_server_conn *c)
{
    c->prev = NULL;
    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    srv->conn_count++;
    if (srv->gate)
        atomic_fetch_add_explicit(&srv->gate->open, 1, memory_order_relaxed);
}

static void unlink_conn(struct sl_h1_server *srv, struct sl_server_conn *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else if (srv->conns == c)
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
    srv->conn_count--;
    if (srv->gate)
        atomic_fetch_sub_explicit(&srv->gate->open, 1, memory_order_relaxed);
}

static void conn_start(struct sl_h1_server *srv, struct sl_server_conn *c,
                       const struct sockaddr *peer)
{
    int fd = c->tr.fd;
    c->srv = srv;
    c->id = ++srv->next_conn_id;
    sl_timer_init(&c->timer, on_conn_timer, c);
    sl_defer_init(&c->defer, on_conn_defer, c);
    /* The peer is kept as raw bytes (text is made per request) to keep idle connections
     * small. */
    c->family = 0;
    if (peer->sa_family == AF_INET) {
        c->family = AF_INET;
        memcpy(c->peer_addr, &((const struct sockaddr_in *)peer)->sin_addr, 4);
        c->peer_port = ntohs(((const struct sockaddr_in *)peer)->sin_port);
    } else if (peer->sa_family == AF_INET6) {
        c->family = AF_INET6;
        memcpy(c->peer_addr, &((const struct sockaddr_in6 *)peer)->sin6_addr, 16);
        c->peer_port = ntohs(((const struct sockaddr_in6 *)peer)->sin6_port);
    }
    if (sl_io_start(srv->loop, &c->io, fd, EPOLLIN | EPOLLRDHUP | SL_IO_EDGE, on_conn_io, c) < 0) {
        sl_transport_close(&c->tr);
        if (c->cookie && srv->on_conn_closed)
            srv->on_conn_closed(srv->on_conn_closed_data, peer, c->cookie);
        sl_slab_put(&srv->conn_slab, c);
        return;
    }
    link_conn(srv, c);
    c->state = CS_HEAD;
    sl_timer_arm(srv->loop, &c->timer, srv->limits->header_timeout_ms);
    /* Bytes still in the socket are reported by the registration above; bytes a handshake
     * read ahead into the transport raise no edge: look now. */
    if (sl_transport_pending(&c->tr)) {
        c->io.ready |= EPOLLIN;
        sl_defer_queue(srv->loop, &c->defer);
    }
}

void sl_h1_server_accept(struct sl_h1_server *srv, int fd, const struct sockaddr *peer,
                         socklen_t peer_len)
{
    (void)peer_len;
    struct sl_server_conn *c = sl_slab_get(&srv->conn_slab);
    if (!c) {
        close(fd);
        return;
    }
    sl_tcp_transport_init(&c->tr, fd);
    c->cookie = 0;
    conn_start(srv, c, peer);
}

void sl_h1_server_adopt(struct sl_h1_server *srv, const struct sl_transport *tr, size_t size,
                        const struct sockaddr *client, uint64_t cookie)
{
    struct sl_server_conn *c = sl_slab_get(&srv->conn_slab);
    if (!c || size > sizeof c->tls_storage) {
        if (c)
            sl_slab_put(&srv->conn_slab, c);
        struct sl_transport *dead = (struct sl_transport *)tr;
        sl_transport_close(dead);
        if (cookie && srv->on_conn_closed)
            srv->on_conn_closed(srv->on_conn_closed_data, client, cookie);
        return;
    }
    memcpy(&c->tls_storage, tr, size);
    c->cookie = cookie;
    conn_start(srv, c, client);
}

/* ---- request objects ---- */

/* Creates the request object (arena, response buffer) for connection `c`. NULL on OOM. */
static struct h1_req *new_request(struct sl_server_conn *c)
{
    struct sl_arena arena;
    sl_arena_init(&arena, conn_pool(c));
    struct h1_req *r = sl_arena_alloc(&arena, sizeof *r);
    if (!r) {
        sl_arena_reset(&arena);
        return NULL;
    }
    memset(r, 0, sizeof *r);
    /* From here the connection's time (reading and parsing the head) is the request's. */
    sl_loop_charge(c->srv->loop, &r->pub.log.cpu_ns);
    r->pub.log.cpu_ns = c->pre_cpu_ns;
    c->pre_cpu_ns = 0;
    r->pub.arena = arena;
    r->pub.conn = c;
    r->pub.worker = c->srv->worker;
    c->req = r;
    return r;
}

static void release_request(struct sl_server_conn *c)
{
    struct h1_req *r = c->req;
    struct sl_h1_server *srv = c->srv;
    c->req = NULL;
    if (srv->loop->charge == &r->pub.log.cpu_ns)
        sl_loop_charge(srv->loop, NULL);
    if (r->pub.log.start_us && srv->on_request_done) {
        r->pub.log.end_us = sl_clock_now_ns() / 1000u;
        r->pub.log.aborted = !r->finished || (c->flags & CF_ABORT);
        srv->on_request_done(&r->pub, srv->on_request_done_data);
    }
    if (r->pub.on_release)
        r->pub.on_release(&r->pub, r->pub.release_data);
    sl_buf_release(&r->out, conn_pool(c));
    struct sl_arena arena = r->pub.arena; /* r itself lives in the arena */
    sl_arena_reset(&arena);
}

/* ---- closing ---- */

/* The client's address and port as a sockaddr (family AF_UNSPEC, false, when unknown). */
static bool conn_peer_sockaddr(const struct sl_server_conn *c, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    if (c->family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)ss;
        in->sin_family = AF_INET;
        in->sin_port = htons(c->peer_port);
        memcpy(&in->sin_addr, c->peer_addr, 4);
        return true;
    }
    if (c->family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(c->peer_port);
        memcpy(&in6->sin6_addr, c->peer_addr, 16);
        return true;
    }
    return false;
}

static void conn_close(struct sl_server_conn *c)
{
    if (c->state == CS_CLOSING)
        return;
    struct sl_h1_server *srv = c->srv;
    c->state = CS_CLOSING;
    sl_timer_cancel(srv->loop, &c->timer);
    sl_io_stop(srv->loop, &c->io);
    sl_transport_close(&c->tr);
    if (c->req)
        release_request(c);
    sl_buf_release(&c->in, conn_pool(c));
    unlink_conn(srv, c);
    if (c->cookie && srv->on_conn_closed) {
        struct sockaddr_storage ss;
        conn_peer_sockaddr(c, &ss);
        srv->on_conn_closed(srv->on_conn_closed_data, (struct sockaddr *)&ss, c->cookie);
        c->cookie = 0;
    }
    sl_defer_queue(srv->loop, &c->defer); /* freed after this turn's callbacks */
    if (srv->draining && srv->conn_count == 0 && srv->on_drained)
        srv->on_drained(srv, srv->on_drained_data);
}

/* Aborts the request in flight (if any) from the deferred pass, then closes. */
static void conn_fail(struct sl_server_conn *c)
{
    if (c->state == CS_CLOSING)
        return;
    if (c->req && !c->req->finished) {
        c->flags |= CF_ABORT;
        sl_defer_queue(c->srv->loop, &c->defer);
        sl_io_modify(c->srv->loop, &c->io, 0);
        sl_timer_cancel(c->srv->loop, &c->timer);
        return;
    }
    conn_close(c);
}

/* ---- request ids and peer text ---- */

static uint64_t next_rand(struct sl_h1_server *srv)
{
    return sl_rand_next(&srv->rng); /* request ids need uniqueness, not secrecy */
}

static bool valid_request_id(struct sl_slice v)
{
    if (v.len == 0 || v.len > 128)
        return false;
    for (size_t i = 0; i < v.len; i++) {
        unsigned char ch = (unsigned char)v.ptr[i];
        if (ch <= 0x20 || ch >= 0x7f || ch == '"' || ch == '\\')
            return false;
    }
    return true;
}

static void make_request_id(struct sl_server_conn *c, struct sl_request *r)
{
    static const char hex[] = "0123456789abcdef";
    char *p = sl_arena_alloc(&r->arena, 32);
    if (!p) {
        r->request_id = SL_SLICE_LIT("-");
        return;
    }
    uint64_t a = next_rand(c->srv), b = next_rand(c->srv);
    for (int i = 0; i < 16; i++) {
        p[i] = hex[(a >> (60 - 4 * i)) & 15];
        p[16 + i] = hex[(b >> (60 - 4 * i)) & 15];
    }
    r->request_id = sl_slice_make(p, 32);
}

static void set_client_ip(struct sl_server_conn *c, struct sl_request *r)
{
    char *p = sl_arena_alloc(&r->arena, INET6_ADDRSTRLEN);
    if (p && c->family == AF_INET) {
        /* glibc's inet_ntop formats IPv4 with sprintf, which showed in per-request profiles. */
        size_t n = 0;
        for (int i = 0; i < 4; i++) {
            if (i)
                p[n++] = '.';
            n += sl_fmt_u64(p + n, c->peer_addr[i]);
        }
        r->client_ip = sl_slice_make(p, n);
    } else if (p && c->family && inet_ntop(c->family, c->peer_addr, p, INET6_ADDRSTRLEN)) {
        r->client_ip = sl_slice_cstr(p);
    } else {
        r->client_ip = SL_SLICE_LIT("unknown");
    }
}

/* ---- answering errors found by the front-end itself ---- */

static void respond_early_error(struct sl_server_conn *c, int status, const char *reason_name)
{
    /* The head did not parse: a bare request object carries the answer (JSON like the
     * handler's errors, without a request id), then the connection closes. */
    struct h1_req *r = c->req ? c->req : new_request(c);
    if (!r || sl_buf_acquire(&r->out, conn_pool(c)) < 0) {
        conn_close(c);
        return;
    }
    r->finished = true;
    char body[160];
    int blen =
        snprintf(body, sizeof body, "{\"status\":%d,\"error\":\"%s\"}\n", status, reason_name);
    char head[256];
    int hlen = snprintf(head, sizeof head,
                        "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: "
                        "%d\r\nConnection: close\r\n\r\n",
                        status, sl_http_reason(status), blen);
    if (hlen > 0 && blen > 0) {
        sl_buf_append(&r->out, head, (size_t)hlen);
        sl_buf_append(&r->out, body, (size_t)blen);
        r->pub.log.bytes_out += (uint64_t)hlen + (uint64_t)blen;
    }
    /* A head that did not parse is still a request for the access log and the metrics. */
    if (!r->pub.log.start_us) {
        r->pub.log.start_us = sl_loop_now_us(c->srv->loop);
        r->pub.log.bytes_in = c->in.data ? sl_buf_len(&c->in) : 0;
        if (!r->pub.client_ip.len)
            set_client_ip(c, &r->pub);
    }
    if (!r->pub.log.error) {
        r->pub.log.error = reason_name;
        r->pub.log.status = status;
    }
    c->flags |= CF_CLOSE_AFTER;
    c->state = CS_FLUSH;
    /* Stop reading: whatever follows a bad head must never be parsed as a request. */
    sl_buf_release(&c->in, conn_pool(c));
    sl_timer_arm(c->srv->loop, &c->timer, c->srv->limits->send_timeout_ms);
    sl_defer_queue(c->srv->loop, &c->defer);
}

/* ---- head → request ---- */

/* Moves a slice of the head in the read buffer [from, from + n) onto the copy at `to`. A slice
 * outside the head (the parser's static "/" for "http://h") is static: it is kept as is. */
static struct sl_slice rebase(struct sl_slice s, const char *from, size_t n, const char *to)
{
    if (!s.ptr || s.len == 0)
        return (struct sl_slice){to, 0};
    size_t off = (size_t)((uintptr_t)s.ptr - (uintptr_t)from);
    if (off >= n)
        return s;
    return (struct sl_slice){to + off, s.len};
}

static struct sl_slice strip_port(struct sl_slice host)
{
    if (host.len && host.ptr[0] == '[') {
        const char *e = memchr(host.ptr, ']', host.len);
        return e ? sl_slice_make(host.ptr, (size_t)(e - host.ptr) + 1) : host;
    }
    const char *colon = memchr(host.ptr, ':', host.len);
    return colon ? sl_slice_make(host.ptr, (size_t)(colon - host.ptr)) : host;
}

static int start_request(struct sl_server_conn *c, const struct sl_h1_request *h)
{
    struct sl_h1_server *srv = c->srv;
    struct h1_req *r = new_request(c);
    if (!r)
        return -ENOMEM;
    struct sl_request *q = &r->pub;
    char *copy = sl_arena_dup(&q->arena, sl_buf_head(&c->in), h->head_len);
    struct sl_h1_header *hdrs =
        copy ? sl_arena_alloc(&q->arena, (h->header_count + 1) * sizeof *hdrs) : NULL;
    if (!hdrs) {
        release_request(c);
        return -ENOMEM;
    }
    const char *base = sl_buf_head(&c->in);
    q->method = rebase(h->method, base, h->head_len, copy);
    q->method_bit = sl_method_from_token(q->method.ptr, q->method.len);
    q->target = rebase(h->target, base, h->head_len, copy);
    q->path = rebase(h->path, base, h->head_len, copy);
    q->query = rebase(h->query, base, h->head_len, copy);
    q->host = rebase(h->host, base, h->head_len, copy);
    q->host_name = strip_port(q->host);
    q->version_minor = h->version_minor;
    q->flags = h->flags;
    for (size_t i = 0; i < h->header_count; i++) {
        hdrs[i].name = rebase(h->headers[i].name, base, h->head_len, copy);
        hdrs[i].value = rebase(h->headers[i].value, base, h->head_len, copy);
    }
    q->headers = hdrs;
    q->header_count = h->header_count;
    q->body_kind = h->body;
    q->content_length = h->content_length;
    q->conn = c;
    q->handler_ctx = srv->handler->data;
    q->worker = srv->worker;
    q->start_ms = sl_loop_now_ms(srv->loop);
    q->log.start_us = sl_loop_now_us(srv->loop);
    q->log.bytes_in = h->head_len;
    q->id = (c->id << 16) | (c->nreq & 0xffff);
    int rid = sl_h1_find_header(hdrs, h->header_count, SL_SLICE_LIT("X-Request-Id"));
    if (rid >= 0 && valid_request_id(hdrs[rid].value))
        q->request_id = hdrs[rid].value;
    else
        make_request_id(c, q);
    set_client_ip(c, q);
    q->secure = c->tr.ops->secure;
    bool ka = h->version_minor >= 1 ? !(h->flags & SL_H1_F_CONN_CLOSE)
                                    : (h->flags & SL_H1_F_CONN_KEEPALIVE) != 0;
    if (srv->draining ||
        (srv->limits->max_requests_per_conn && c->nreq + 1 >= srv->limits->max_requests_per_conn))
        ka = false;
    q->keepalive = ka;
    sl_h1_body_reader_init(&r->body, h->body, h->content_length);
    r->max_body = srv->limits->max_body_bytes;
    c->req = r;
    c->nreq++;
    sl_buf_consume(&c->in, h->head_len);
    return 0;
}

/* Parses the next head from the input buffer; hands a complete one to the handler. */
static void try_parse_head(struct sl_server_conn *c)
{
    struct sl_h1_server *srv = c->srv;
    if (!c->in.data || sl_buf_len(&c->in) == 0)
        return;
    if (c->state == CS_IDLE) {
        c->state = CS_HEAD;
        memset(&c->hs, 0, sizeof c->hs);
        sl_timer_arm(srv->loop, &c->timer, srv->limits->header_timeout_ms);
    }
    struct sl_h1_request h;
    enum sl_h1_err err = SL_H1_ERR_NONE;
    enum sl_status st =
        sl_h1_parse_request(&c->hs, sl_buf_head(&c->in), sl_buf_len(&c->in), &srv->parse_limits, &h,
                            srv->scratch, srv->scratch_cap, &err);
    if (st == SL_AGAIN) {
        if (sl_buf_len(&c->in) >= c->in.cap) /* cannot happen when cap > max head */
            respond_early_error(c, 431, "headers_too_large");
        return;
    }
    if (st == SL_ERROR) {
        SL_DEBUG("conn %llu: bad request head: %s", (unsigned long long)c->id, sl_h1_err_name(err));
        respond_early_error(c, sl_h1_err_status(err), sl_h1_err_name(err));
        return;
    }
    if (h.body == SL_H1_BODY_LENGTH && srv->limits->max_body_bytes &&
        h.content_length > srv->limits->max_body_bytes) {
        respond_early_error(c, 413, "body_too_large");
        return;
    }
    if (start_request(c, &h) < 0) {
        respond_early_error(c, 503, "out_of_memory");
        return;
    }
    memset(&c->hs, 0, sizeof c->hs);
    c->state = CS_ACTIVE;
    c->flags &= ~(CF_WANT_BODY | CF_WANT_WRITE | CF_NOTIFY_BODY | CF_CONTINUE_SENT);
    sl_timer_cancel(srv->loop, &c->timer);
    conn_update_events(c);
    srv->handler->on_request(&c->req->pub);
}

/* ---- reading ---- */

/* Reads what fits into the input buffer. Returns 0, -EAGAIN, or -errno; sets CF_EOF. */
static int conn_read(struct sl_server_conn *c)
{
    if (sl_buf_acquire(&c->in, conn_pool(c)) < 0)
        return -ENOMEM;
    if (sl_buf_space(&c->in) == 0)
        sl_buf_compact(&c->in);
    if (sl_buf_space(&c->in) == 0)
        return -ENOBUFS; /* full: the consumer has to make room first (backpressure) */
    size_t n = 0, space = sl_buf_space(&c->in);
    int rc = sl_transport_read(&c->tr, c->in.data + c->in.end, space, &n);
    if (rc < 0) {
        if (rc == -EAGAIN)
            sl_io_clear_ready(&c->io, EPOLLIN);
        return rc;
    }
    if (n == 0) {
        c->flags |= CF_EOF;
        return 0;
    }
    /* A short read drained the socket: the next bytes will come with a new edge (unless the
     * transport holds more, which raises no edge). */
    if (n < space && !sl_transport_pending(&c->tr))
        sl_io_clear_ready(&c->io, EPOLLIN);
    c->in.end += (uint32_t)n;
    return 0;
}

static void conn_update_events(struct sl_server_conn *c)
{
    if (c->state == CS_CLOSING)
        return;
    uint32_t ev = 0;
    bool room = !c->in.data || sl_buf_space(&c->in) > 0 || c->in.start > 0;
    switch (c->state) {
    case CS_IDLE:
    case CS_HEAD:
        if (!(c->flags & CF_EOF))
            ev |= EPOLLIN | EPOLLRDHUP;
        break;
    case CS_ACTIVE:
        if ((c->flags & CF_WANT_BODY) && room && !(c->flags & CF_EOF))
            ev |= EPOLLIN;
        if (c->flags & CF_WANT_WRITE)
            ev |= EPOLLOUT;
        break;
    case CS_FLUSH:
        ev |= EPOLLOUT;
        break;
    case CS_LINGER:
        ev |= EPOLLIN | EPOLLRDHUP;
        break;
    }
    /* What the transport waits for (TLS reading may need to write, and the reverse). */
    if (c->tr.ops->want)
        ev |= c->tr.ops->want(&c->tr);
    sl_io_modify(c->srv->loop, &c->io, ev);
}

/* ---- writing ---- */

/* Writes pending output (head and framing) without body data. Returns 0 when flushed,
 * -EAGAIN, or -errno. */
static int flush_out(struct sl_server_conn *c, bool fin)
{
    size_t w = 0;
    bool flushed = false;
    struct h1_req *r = c->req;
    int rc =
        sl_h1_body_writer_write(&r->bw, &c->tr, &r->out, r->rest, r->rest_len, fin, &w, &flushed);
    r->rest += w;
    r->rest_len -= w;
    r->pub.log.bytes_out += w;
    if (rc < 0)
        return rc;
    return flushed && r->rest_len == 0 ? 0 : -EAGAIN;
}

/*
 * Lingering close: closing a socket whose receive queue still holds client bytes makes the
 * kernel send RST, which discards the response still in flight in the send queue (a client
 * that was uploading when it was refused would never see the 413). So after a half-close we
 * read and drop what the client sends until it closes, for at most LINGER_MS.
 */
#define LINGER_MS 2000
#define LINGER_READS_PER_TURN 16

static void start_linger(struct sl_server_conn *c)
{
    c->state = CS_LINGER;
    c->flags &= ~(CF_WANT_BODY | CF_WANT_WRITE | CF_NOTIFY_BODY);
    sl_buf_release(&c->in, conn_pool(c));
    sl_timer_arm(c->srv->loop, &c->timer, LINGER_MS);
    conn_update_events(c);
    if (c->io.ready & (EPOLLIN | EPOLLRDHUP | EPOLLHUP))
        sl_defer_queue(c->srv->loop, &c->defer);
}

static void linger_discard(struct sl_server_conn *c)
{
    char sink[16384];
    for (int i = 0; i < LINGER_READS_PER_TURN; i++) {
        size_t n = 0;
        int rc = sl_transport_read(&c->tr, sink, sizeof sink, &n);
        if (rc == -EAGAIN) {
            sl_io_clear_ready(&c->io, EPOLLIN);
            return;
        }
        if (rc < 0 || n == 0) {
            conn_close(c);
            return;
        }
    }
    /* Still more: continue next turn rather than starve other connections. */
    sl_defer_queue(c->srv->loop, &c->defer);
}

/* A response is fully out: recycle the request and look at what comes next. */
static void complete_request(struct sl_server_conn *c)
{
    struct sl_h1_server *srv = c->srv;
    struct h1_req *r = c->req;
    bool reuse = r && r->reusable && r->pub.keepalive && r->body.done && r->body.pending == 0 &&
                 !(c->flags & (CF_CLOSE_AFTER | CF_EOF)) && !srv->draining;
    /* Is the client perhaps still sending (an unread body, pipelined bytes)? */
    bool unread =
        !(c->flags & CF_EOF) && ((r && (!r->body.done || r->body.pending)) ||
                                 (c->in.data && sl_buf_len(&c->in)) || (c->io.ready & EPOLLIN));
    if (r)
        release_request(c);
    if (!reuse) {
        /* Half-close first so the client reads the whole response before the FIN. */
        c->tr.ops->shutdown(&c->tr);
        if (unread)
            start_linger(c);
        else
            conn_close(c);
        return;
    }
    c->state = CS_IDLE;
    c->flags &= ~(CF_WANT_BODY | CF_WANT_WRITE | CF_NOTIFY_BODY);
    sl_buf_release_if_empty(&c->in, conn_pool(c));
    if (c->in.data && sl_buf_len(&c->in)) {
        try_parse_head(c); /* pipelined request already here */
        if (c->state == CS_HEAD || c->state == CS_IDLE) {
            conn_update_events(c);
            /* The buffered bytes ended inside a head and the socket still holds more (the
             * last read filled the buffer, so no new edge will come): read them now. */
            if (c->io.ready & (EPOLLIN | EPOLLRDHUP | EPOLLHUP))
                conn_read_head(c, c->io.ready);
        }
        return;
    }
    sl_timer_arm(srv->loop, &c->timer, srv->limits->idle_timeout_ms);
    conn_update_events(c);
    /* Bytes that arrived while the request was busy raised their edge then: read them now. */
    if (c->io.ready & (EPOLLIN | EPOLLRDHUP | EPOLLHUP))
        conn_read_head(c, c->io.ready);
}

static void flush_finished(struct sl_server_conn *c)
{
    int rc = flush_out(c, true);
    if (rc == -EAGAIN) {
        c->state = CS_FLUSH;
        sl_timer_arm(c->srv->loop, &c->timer, c->srv->limits->send_timeout_ms);
        conn_update_events(c);
        return;
    }
    if (rc < 0) {
        conn_close(c);
        return;
    }
    complete_request(c);
}

/* ---- event handling ---- */

/* Reads and parses while waiting for a request head. Edge-triggered: keep reading while the
 * socket may hold more and the parser needs more. */
static void conn_read_head(struct sl_server_conn *c, uint32_t events)
{
    for (;;) {
        int rc = conn_read(c);
        if ((rc < 0 && rc != -EAGAIN && rc != -ENOBUFS) || (events & EPOLLERR)) {
            conn_close(c);
            return;
        }
        if (c->flags & CF_EOF) {
            /* EOF between requests is a normal close; inside a head it is an abandoned
             * request. Either way there is nobody to answer. */
            conn_close(c);
            return;
        }
        try_parse_head(c);
        if (rc != 0 || (c->state != CS_IDLE && c->state != CS_HEAD) || !(c->io.ready & EPOLLIN))
            return;
    }
}

static void on_conn_io(struct sl_io *io, uint32_t events)
{
    struct sl_server_conn *c = io->data;
    if (c->state == CS_CLOSING || (c->flags & CF_ABORT))
        return;
    sl_loop_charge(c->srv->loop, c->req ? &c->req->pub.log.cpu_ns : &c->pre_cpu_ns);
    /* The readiness the transport waited for serves whichever operation waited, in either
     * direction: a read that wanted EPOLLOUT is retried as a read, and the reverse. */
    unsigned want = c->tr.ops->want ? c->tr.ops->want(&c->tr) : 0;
    if (want && (events & want)) {
        events |= EPOLLIN | EPOLLOUT;
        c->io.ready |= EPOLLIN;
    }
    if (events & EPOLLOUT) {
        if (c->state == CS_FLUSH) {
            flush_finished(c);
            return;
        }
        if (c->state == CS_ACTIVE && (c->flags & CF_WANT_WRITE)) {
            c->flags &= ~CF_WANT_WRITE;
            sl_timer_cancel(c->srv->loop, &c->timer);
            conn_update_events(c);
            c->srv->handler->on_writable(&c->req->pub);
            if (c->state == CS_CLOSING)
                return;
        }
    }
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        if (c->state == CS_LINGER) {
            linger_discard(c);
            return;
        }
        if (c->state == CS_IDLE || c->state == CS_HEAD) {
            conn_read_head(c, events);
            return;
        }
        if (c->state == CS_ACTIVE && (c->flags & CF_WANT_BODY)) {
            int rc = conn_read(c);
            if (rc < 0 && rc != -EAGAIN && rc != -ENOBUFS) {
                conn_fail(c);
                return;
            }
            c->flags &= ~CF_WANT_BODY;
            sl_timer_cancel(c->srv->loop, &c->timer);
            conn_update_events(c);
            c->srv->handler->on_body(&c->req->pub);
            return;
        }
        if (events & (EPOLLHUP | EPOLLERR)) {
            conn_fail(c);
            return;
        }
    }
}

static void on_conn_timer(struct sl_timer *t)
{
    struct sl_server_conn *c = t->data;
    switch (c->state) {
    case CS_IDLE:
        conn_close(c);
        break;
    case CS_HEAD:
        respond_early_error(c, 408, "header_timeout");
        break;
    case CS_ACTIVE:
        if ((c->flags & CF_WANT_BODY) && !c->req->pub.response_started) {
            /* The handler learns of it from its next peek and answers 408 itself. */
            c->flags &= ~CF_WANT_BODY;
            c->flags |= CF_BODY_TIMEOUT | CF_CLOSE_AFTER | CF_NOTIFY_BODY;
            conn_update_events(c);
            sl_defer_queue(c->srv->loop, &c->defer);
            break;
        }
        conn_fail(c);
        break;
    case CS_FLUSH:
    case CS_LINGER:
        conn_close(c);
        break;
    default:
        break;
    }
}

static void on_conn_defer(struct sl_defer *d)
{
    struct sl_server_conn *c = d->data;
    if (c->state == CS_CLOSING) {
        sl_slab_put(&c->srv->conn_slab, c);
        return;
    }
    sl_loop_charge(c->srv->loop, c->req ? &c->req->pub.log.cpu_ns : &c->pre_cpu_ns);
    if (c->flags & CF_ABORT) {
        struct h1_req *r = c->req;
        if (r && !r->finished && c->srv->handler->on_abort)
            c->srv->handler->on_abort(&r->pub);
        conn_close(c);
        return;
    }
    conn_process(c);
}

/* Deferred work: flushing an early error, or notifying the handler outside its own call. */
static void conn_process(struct sl_server_conn *c)
{
    if (c->state == CS_LINGER) {
        linger_discard(c);
        return;
    }
    if (c->state == CS_FLUSH) {
        flush_finished(c);
        return;
    }
    if (c->state == CS_ACTIVE && (c->flags & CF_NOTIFY_BODY)) {
        c->flags &= ~CF_NOTIFY_BODY;
        c->srv->handler->on_body(&c->req->pub);
        return;
    }
    if (c->state == CS_IDLE || c->state == CS_HEAD) {
        /* Bytes may wait in the socket or inside the transport (read ahead with a TLS
         * handshake) with no edge to come: read while readiness says so. */
        if (c->io.ready & (EPOLLIN | EPOLLRDHUP | EPOLLHUP))
            conn_read_head(c, c->io.ready & (EPOLLIN | EPOLLRDHUP | EPOLLHUP));
        else
            try_parse_head(c);
    }
}

/* ---- the request API ---- */

static struct sl_server_conn *req_conn(struct sl_request *req)
{
    return req->conn;
}

/*
 * How long to wait for more body bytes: the gap allowed by body_timeout, shortened so that a
 * client dripping its body (slowloris) is cut once the bytes it sent fall below min_body_rate
 * per second of waiting for it, after a grace of min_body_rate_after. Only time spent waiting
 * on the client counts: while the gateway itself holds the body back (a slow upstream), the
 * client is not charged. A client below the rate meets a timer that fires at once and gets
 * the body_timeout answer (408).
 */
static uint64_t body_wait_ms(struct sl_server_conn *c, struct h1_req *r)
{
    const struct sl_limits_conf *lim = c->srv->limits;
    uint64_t wait = lim->body_timeout_ms;
    if (!lim->min_body_rate)
        return wait;
    uint64_t now = sl_loop_now_ms(c->srv->loop);
    if (!r->wait_since_ms)
        r->wait_since_ms = now ? now : 1;
    uint64_t waited = r->body_waited_ms + (now - r->wait_since_ms);
    uint64_t earned =
        r->body.total > UINT64_MAX / 1000 ? UINT64_MAX : r->body.total * 1000 / lim->min_body_rate;
    uint64_t allowed = earned > lim->min_body_rate_after_ms ? earned : lim->min_body_rate_after_ms;
    uint64_t left = allowed > waited ? allowed - waited : 0;
    return left < wait ? left : wait;
}

/* Body bytes are here: the current wait for them (if any) ends. */
static void body_wait_end(struct sl_server_conn *c, struct h1_req *r)
{
    if (!r->wait_since_ms)
        return;
    r->body_waited_ms += sl_loop_now_ms(c->srv->loop) - r->wait_since_ms;
    r->wait_since_ms = 0;
}

enum sl_status sl_request_body_peek(struct sl_request *req, struct sl_slice *data, int *status)
{
    struct h1_req *r = (struct h1_req *)req;
    struct sl_server_conn *c = req_conn(req);
    data->ptr = NULL;
    data->len = 0;
    if (c->flags & CF_BODY_TIMEOUT) {
        *status = 408;
        return SL_ERROR;
    }
    if (r->body.done && r->body.pending == 0)
        return SL_DONE;
    if ((req->flags & SL_H1_F_EXPECT_CONTINUE) && !(c->flags & CF_CONTINUE_SENT) &&
        !req->response_started && req->version_minor >= 1 && r->body.total == 0) {
        c->flags |= CF_CONTINUE_SENT;
        if ((!c->in.data || sl_buf_len(&c->in) == 0) && sl_buf_acquire(&r->out, conn_pool(c)) == 0)
            sl_buf_append(&r->out, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    }
    if (r->out.data && sl_buf_len(&r->out) && !req->response_started) {
        int rc = flush_out(c, false);
        if (rc < 0 && rc != -EAGAIN) {
            conn_fail(c);
            return SL_AGAIN;
        }
    }
    enum sl_h1_err err = SL_H1_ERR_NONE;
    enum sl_status st =
        sl_h1_body_reader_peek(&r->body, &c->in, (c->flags & CF_EOF) != 0, data, &err);
    if (st != SL_AGAIN)
        body_wait_end(c, r);
    if (st == SL_OK) {
        if (r->max_body && r->body.total + data->len > r->max_body) {
            *status = 413;
            c->flags |= CF_CLOSE_AFTER;
            return SL_ERROR;
        }
        return SL_OK;
    }
    if (st == SL_ERROR) {
        *status = 400;
        c->flags |= CF_CLOSE_AFTER;
        return SL_ERROR;
    }
    if (st == SL_DONE)
        return SL_DONE;
    /* Need more bytes: read now if the socket has them, otherwise wait. */
    int rc = conn_read(c);
    if (rc == 0 && ((c->in.data && sl_buf_len(&c->in)) || (c->flags & CF_EOF))) {
        c->flags |= CF_NOTIFY_BODY;
        sl_defer_queue(c->srv->loop, &c->defer);
        return SL_AGAIN;
    }
    if (rc < 0 && rc != -EAGAIN && rc != -ENOBUFS) {
        conn_fail(c);
        return SL_AGAIN;
    }
    c->flags |= CF_WANT_BODY;
    sl_timer_arm(c->srv->loop, &c->timer, body_wait_ms(c, r));
    conn_update_events(c);
    return SL_AGAIN;
}

void sl_request_body_consume(struct sl_request *req, size_t n)
{
    struct h1_req *r = (struct h1_req *)req;
    sl_h1_body_reader_consume(&r->body, &req_conn(req)->in, n);
    req->log.bytes_in += n;
}

static int content_length_line(char *out, uint64_t length)
{
    memcpy(out, "Content-Length: ", 16);
    size_t n = 16 + sl_fmt_u64(out + 16, length);
    out[n++] = '\r';
    out[n++] = '\n';
    return (int)n;
}

int sl_request_respond_head(struct sl_request *req, int status, const char *head, size_t len,
                            enum sl_h1_body body_kind, uint64_t length)
{
    struct h1_req *r = (struct h1_req *)req;
    struct sl_server_conn *c = req_conn(req);
    struct sl_buf *out = &r->out;
    if (sl_buf_acquire(out, conn_pool(c)) < 0)
        return -ENOMEM;
    enum sl_h1_wmode mode = SL_H1_W_NONE;
    bool head_req = req->method_bit == SL_METHOD_HEAD;
    bool bodiless = head_req || status == 204 || status == 304 || status < 200;
    if (!r->body.done || r->body.pending)
        req->keepalive = false; /* unread request body: we will not parse past it */
    if (c->srv->draining)
        req->keepalive = false;
    char extra[96];
    int n = 0;
    if (head_req && body_kind == SL_H1_BODY_LENGTH && status >= 200 && status != 204 &&
        status != 304) {
        /* HEAD announces the length the GET would have had (RFC 9110 9.3.2). */
        n = content_length_line(extra, length);
    }
    if (!bodiless) {
        if (body_kind == SL_H1_BODY_LENGTH) {
            mode = SL_H1_W_LENGTH;
            n = content_length_line(extra, length);
        } else if (body_kind == SL_H1_BODY_NONE) {
            mode = SL_H1_W_LENGTH;
            n = content_length_line(extra, 0);
        } else if (req->version_minor >= 1) {
            mode = SL_H1_W_CHUNKED;
            n = 28;
            memcpy(extra, "Transfer-Encoding: chunked\r\n", 28);
        } else {
            mode = SL_H1_W_CLOSE; /* HTTP/1.0 client: the close delimits the body */
            req->keepalive = false;
        }
    }
    const char *conn_hdr = "";
    if (!req->keepalive)
        conn_hdr = "Connection: close\r\n";
    else if (req->version_minor == 0)
        conn_hdr = "Connection: keep-alive\r\n";
    size_t clen = strlen(conn_hdr);
    if (sl_buf_space(out) < len + (size_t)n + clen + 2)
        sl_buf_compact(out);
    if (sl_buf_space(out) < len + (size_t)n + clen + 2)
        return -ENOMEM;
    sl_buf_append(out, head, len);
    if (n > 0)
        sl_buf_append(out, extra, (size_t)n);
    sl_buf_append(out, conn_hdr, clen);
    sl_buf_append(out, "\r\n", 2);
    sl_h1_body_writer_init(&r->bw, mode);
    req->response_started = true;
    req->log.status = status;
    req->log.bytes_out += len + (size_t)n + clen + 2;
    return 0;
}

int sl_request_write(struct sl_request *req, const char *data, size_t len, size_t *written)
{
    struct h1_req *r = (struct h1_req *)req;
    struct sl_server_conn *c = req_conn(req);
    *written = 0;
    if (c->flags & CF_ABORT)
        return -EPIPE;
    bool flushed = false;
    int rc = sl_h1_body_writer_write(&r->bw, &c->tr, &r->out, data, len, false, written, &flushed);
    req->log.bytes_out += *written;
    if (rc == 0 && *written == len && flushed)
        return 0;
    if (rc < 0 && rc != -EAGAIN) {
        conn_fail(c);
        return rc;
    }
    c->flags |= CF_WANT_WRITE;
    sl_timer_arm(c->srv->loop, &c->timer, c->srv->limits->send_timeout_ms);
    conn_update_events(c);
    return -EAGAIN;
}

int sl_request_flush(struct sl_request *req)
{
    struct h1_req *r = (struct h1_req *)req;
    if (!r->out.data || sl_buf_len(&r->out) == 0)
        return 0;
    size_t none = 0;
    return sl_request_write(req, NULL, 0, &none);
}

void sl_request_finish(struct sl_request *req, bool reusable)
{
    struct h1_req *r = (struct h1_req *)req;
    struct sl_server_conn *c = req_conn(req);
    r->finished = true;
    r->reusable = reusable;
    c->flags &= ~(CF_WANT_BODY | CF_WANT_WRITE);
    if (c->flags & CF_ABORT) {
        conn_close(c);
        return;
    }
    c->state = CS_FLUSH;
    /* Flush from the deferred pass: the handler may still be on the stack. */
    sl_timer_cancel(c->srv->loop, &c->timer);
    sl_defer_queue(c->srv->loop, &c->defer);
}

int sl_request_respond(struct sl_request *req, int status, const char *content_type,
                       const char *extra_headers, size_t extra_len, const char *body,
                       size_t body_len)
{
    struct sl_server_conn *c = req_conn(req);
    struct sl_buf *out = &((struct h1_req *)req)->out;
    char head[512];
    int n = snprintf(
        head, sizeof head, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nX-Request-Id: %.*s\r\n", status,
        sl_http_reason(status), content_type, (int)req->request_id.len, req->request_id.ptr);
    if (n < 0 || (size_t)n >= sizeof head) {
        sl_request_finish(req, false);
        return -ENOMEM;
    }
    /* The head and body are small: build them in the output buffer in one piece. */
    int rc = 0;
    if (extra_len || req->resp_extra_len) {
        /* Filters' lines (RateLimit-*, WWW-Authenticate) go with every answer. */
        if (sl_buf_acquire(out, conn_pool(c)) < 0 || !sl_buf_append(out, head, (size_t)n) ||
            (extra_len && !sl_buf_append(out, extra_headers, extra_len)) ||
            (req->resp_extra_len && !sl_buf_append(out, req->resp_extra, req->resp_extra_len)))
            rc = -ENOMEM;
        if (rc == 0) {
            /* respond_head appends framing after what is already in `out` */
            rc = sl_request_respond_head(req, status, "", 0, SL_H1_BODY_LENGTH, body_len);
            req->log.bytes_out += (size_t)n + extra_len + req->resp_extra_len;
        }
    } else {
        rc = sl_request_respond_head(req, status, head, (size_t)n, SL_H1_BODY_LENGTH, body_len);
    }
    if (rc == 0 && body_len && req->method_bit != SL_METHOD_HEAD && status != 204 &&
        status != 304) {
        if (sl_buf_space(out) < body_len)
            sl_buf_compact(out);
        if (sl_buf_space(out) >= body_len) {
            sl_buf_append(out, body, body_len);
            req->log.bytes_out += body_len;
        } else {
            /* Larger than the buffer: stream it (direct responses are config-sized). */
            size_t w = 0;
            int wr = sl_request_write(req, body, body_len, &w);
            if (wr == -EAGAIN) {
                /* The rest goes out from the flush (the body outlives the request). */
                struct h1_req *r = (struct h1_req *)req;
                r->rest = body + w;
                r->rest_len = body_len - w;
            } else if (wr < 0 || w != body_len) {
                rc = -ENOMEM; /* the client failed: give up on the connection */
            }
        }
    }
    sl_request_finish(req, rc == 0);
    return rc;
}

void sl_request_respond_error(struct sl_request *req, int status, const char *name)
{
    req->log.error = name;
    char body[256];
    int n =
        snprintf(body, sizeof body, "{\"status\":%d,\"error\":\"%s\",\"request_id\":\"%.*s\"}\n",
                 status, name, (int)req->request_id.len, req->request_id.ptr);
    if (n < 0 || (size_t)n >= sizeof body)
        n = 0;
    if (req->response_started) {
        /* Too late for a status: cut the connection so the client sees a failure. */
        struct sl_server_conn *c = req_conn(req);
        ((struct h1_req *)req)->finished = true;
        c->flags |= CF_CLOSE_AFTER;
        conn_close(c);
        return;
    }
    req->keepalive = req->keepalive && status < 500 && status != 408 && status != 413;
    sl_request_respond(req, status, "application/json", NULL, 0, body, (size_t)n);
}

void sl_h1_server_drain(struct sl_h1_server *srv)
{
    srv->draining = true;
    struct sl_server_conn *c = srv->conns;
    while (c) {
        struct sl_server_conn *next = c->next;
        if (c->state == CS_IDLE || (c->state == CS_HEAD && (!c->in.data || !sl_buf_len(&c->in))))
            conn_close(c);
        else if (c->req)
            c->req->pub.keepalive = false;
        c = next;
    }
    if (srv->conn_count == 0 && srv->on_drained)
        srv->on_drained(srv, srv->on_drained_data);
}

const char *sl_http_reason(int status)
{
    switch (status) {
    case 100:
        return "Continue";
    case 101:
        return "Switching Protocols";
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 204:
        return "No Content";
    case 206:
        return "Partial Content";
    case 301:
        return "Moved Permanently";
    case 302:
        return "Found";
    case 304:
        return "Not Modified";
    case 307:
        return "Temporary Redirect";
    case 308:
        return "Permanent Redirect";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 411:
        return "Length Required";
    case 413:
        return "Content Too Large";
    case 414:
        return "URI Too Long";
    case 415:
        return "Unsupported Media Type";
    case 418:
        return "I'm a teapot";
    case 422:
        return "Unprocessable Content";
    case 425:
        return "Too Early";
    case 426:
        return "Upgrade Required";
    case 428:
        return "Precondition Required";
    case 429:
        return "Too Many Requests";
    case 451:
        return "Unavailable For Legal Reasons";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 505:
        return "HTTP Version Not Supported";
    default:
        return "";
    }
}

size_t sl_request_client_subject(const struct sl_request *req, char *buf, size_t cap)
{
    const struct sl_server_conn *c = req->conn;
    if (cap)
        buf[0] = 0;
    if (!c || !c->tr.ops->peer_subject)
        return 0;
    return c->tr.ops->peer_subject(&c->tr, buf, cap);
}

int sl_request_conn_addrs(const struct sl_request *req, struct sockaddr_storage *client,
                          struct sockaddr_storage *local)
{
    const struct sl_server_conn *c = req->conn;
    if (!c)
        return -ENOTCONN;
    if (client && !conn_peer_sockaddr(c, client))
        return -EAFNOSUPPORT;
    if (local) {
        socklen_t len = sizeof *local;
        memset(local, 0, sizeof *local);
        if (getsockname(c->tr.fd, (struct sockaddr *)local, &len) < 0)
            return -errno;
    }
    return 0;
}
