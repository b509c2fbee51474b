#include "proxy/health_check.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include "config/config.h"
#include "core/log.h"
#include "core/loop.h"
#include "core/rand.h"
#include "http/h1_parse.h"
#include "proxy/pool.h"
#include "proxy/proxy_proto.h"
#include "tls/tls_transport.h"

/* Only the status matters, so the head buffer is small; a longer head is judged by its status
 * line alone (see judge_status_line). */
#define HEAD_MAX_BYTES 4096
#define HEAD_MAX_HEADERS 64

/* PH_PROXY and PH_HANDSHAKE only for upstreams with proxy_protocol: / tls:, which checks
 * speak too (a backend expecting them would refuse a check without). */
enum phase { PH_IDLE = 0, PH_CONNECTING, PH_PROXY, PH_HANDSHAKE, PH_WRITING, PH_READING };

/* Why the last check failed, for the transition log line. */
enum why {
    WHY_NONE = 0,
    WHY_NO_ADDRESS, /* the endpoint's host name never resolved */
    WHY_REFUSED,    /* detail: errno */
    WHY_CONNECT,    /* detail: errno */
    WHY_CONNECT_TIMEOUT,
    WHY_RESET, /* detail: errno */
    WHY_SEND,  /* detail: errno */
    WHY_RECV,  /* detail: errno */
    WHY_RESPONSE_TIMEOUT,
    WHY_CLOSED,    /* the peer closed before the head was complete */
    WHY_MALFORMED, /* detail: enum sl_h1_err */
    WHY_STATUS,    /* detail: the status */
    WHY_TLS,       /* text: OpenSSL's reason */
};

struct hc_pool;

/* One endpoint's check. At most one attempt runs at a time; between attempts only the timer is
 * armed. */
struct hc_check {
    struct hc_pool *hp;
    struct sl_endpoint *ep; /* holds a reference while checked */
    struct sl_io io;
    struct sl_timer timer; /* PH_IDLE: the next start; otherwise the attempt's timeout */
    int fd;                /* -1 between attempts; owned by `tr` when set */
    union {
        struct sl_transport tr; /* TCP, or the base of `tls` */
        struct sl_tls_transport tls;
    };
    bool has_tr;
    uint8_t pp_len, pp_off; /* PROXY header of the attempt, and what was sent */
    char pp[SL_PP_V1_MAX_BYTES + 1];
    char why_text[128]; /* WHY_TLS */
    enum phase phase;
    bool down;                    /* our verdict, mirrored into ep->active_down */
    bool visited;                 /* scratch for sync */
    uint32_t successes, failures; /* in a row */
    enum why why;
    int why_detail;
    uint64_t started_ms; /* of the current or last attempt */
    uint64_t next_due_ms;
    uint64_t attempts;
    char *req; /* the HTTP request, built once (NULL for TCP checks) */
    size_t req_len, sent;
    char *head; /* HEAD_MAX_BYTES + 2 while reading a response, else NULL */
    size_t head_len;
    struct sl_h1_head_state hs;
    struct hc_check *next_dead;
};

struct hc_pool {
    struct sl_health_checker *hc;
    struct sl_pool *pool;
    const struct sl_active_health_conf *conf;
    const char *name;
    uint64_t seen_version;
    bool synced;
    struct hc_check **checks; /* sorted by endpoint address, for lookups by identity */
    size_t count;
};

struct sl_health_checker {
    struct sl_loop *loop;
    struct hc_pool *pools;
    size_t pool_count;
    struct sl_timer sync_timer;
    uint64_t rng;
    bool local_error_logged;
    bool stopped;
    struct hc_check *dead; /* retired checks, freed by `reap` at the end of the turn */
    struct sl_defer reap;
};

static void on_check_timer(struct sl_timer *t);
static void on_check_io(struct sl_io *io, uint32_t events);

/* ---- small helpers ---------------------------------------------------------------------- */

static uint64_t rand_below(struct sl_health_checker *hc, uint64_t n)
{
    return n ? sl_rand_next(&hc->rng) % n : 0;
}

static uint64_t interval_of(const struct hc_check *c)
{
    return c->hp->conf->interval_ms ? c->hp->conf->interval_ms : 1;
}

/* interval ±10%, uniformly. */
static uint64_t jittered_interval(struct hc_check *c)
{
    uint64_t iv = interval_of(c);
    uint64_t spread = iv / 10;
    return iv - spread + rand_below(c->hp->hc, 2 * spread + 1);
}

static int cmp_check_ep(const void *a, const void *b)
{
    uintptr_t x = (uintptr_t)(*(struct hc_check *const *)a)->ep;
    uintptr_t y = (uintptr_t)(*(struct hc_check *const *)b)->ep;
    return x < y ? -1 : x > y;
}

static struct hc_check *find_check(const struct hc_pool *hp, const struct sl_endpoint *ep)
{
    size_t lo = 0, hi = hp->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        uintptr_t m = (uintptr_t)hp->checks[mid]->ep;
        if (m == (uintptr_t)ep)
            return hp->checks[mid];
        if (m < (uintptr_t)ep)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

static const char *describe(const struct hc_check *c, char *buf, size_t cap)
{
    char eb[64];
    switch (c->why) {
    case WHY_NO_ADDRESS:
        return "no address";
    case WHY_REFUSED:
        return "connect refused";
    case WHY_CONNECT:
        snprintf(buf, cap, "connect failed: %s", strerror_r(c->why_detail, eb, sizeof eb));
        return buf;
    case WHY_CONNECT_TIMEOUT:
        return "connect timed out";
    case WHY_RESET:
        return "connection reset";
    case WHY_SEND:
        snprintf(buf, cap, "send failed: %s", strerror_r(c->why_detail, eb, sizeof eb));
        return buf;
    case WHY_RECV:
        snprintf(buf, cap, "read failed: %s", strerror_r(c->why_detail, eb, sizeof eb));
        return buf;
    case WHY_RESPONSE_TIMEOUT:
        return "no response in time";
    case WHY_CLOSED:
        return "closed before the response head";
    case WHY_MALFORMED:
        snprintf(buf, cap, "malformed response: %s", sl_h1_err_name((enum sl_h1_err)c->why_detail));
        return buf;
    case WHY_STATUS:
        snprintf(buf, cap, "status %d", c->why_detail);
        return buf;
    case WHY_TLS:
        snprintf(buf, cap, "TLS failed: %.100s", c->why_text);
        return buf;
    case WHY_NONE:
        break;
    }
    return "unknown";
}

/* ---- verdicts --------------------------------------------------------------------------- */

/* sl_endpoint_set_active_down also counts the change in pool->stats.active_up/active_down,
 * which is why it is called on transitions only. */
static void record(struct hc_check *c, bool ok)
{
    const struct sl_active_health_conf *conf = c->hp->conf;
    uint32_t healthy = conf->healthy ? conf->healthy : 1;
    uint32_t unhealthy = conf->unhealthy ? conf->unhealthy : 1;
    if (ok) {
        c->failures = 0;
        if (c->successes < UINT32_MAX)
            c->successes++;
        if (c->down && c->successes >= healthy) {
            c->down = false;
            sl_endpoint_set_active_down(c->ep, false);
            SL_INFO("upstream %s endpoint %s: active health check passed %u times: marked up",
                    c->hp->name, c->ep->address, c->successes);
        }
        return;
    }
    c->successes = 0;
    if (c->failures < UINT32_MAX)
        c->failures++;
    char buf[128];
    if (!c->down && c->failures >= unhealthy) {
        c->down = true;
        sl_endpoint_set_active_down(c->ep, true);
        SL_WARN("upstream %s endpoint %s: active health check failed %u times (%s): marked down",
                c->hp->name, c->ep->address, c->failures, describe(c, buf, sizeof buf));
    } else {
        SL_DEBUG("upstream %s endpoint %s: active health check failed (%s)", c->hp->name,
                 c->ep->address, describe(c, buf, sizeof buf));
    }
}

/* ---- one attempt ------------------------------------------------------------------------ */

static void close_socket(struct hc_check *c)
{
    struct sl_loop *loop = c->hp->hc->loop;
    if (c->fd >= 0) {
        sl_io_stop(loop, &c->io);
        if (c->has_tr)
            sl_transport_close(&c->tr);
        else
            close(c->fd);
        c->has_tr = false;
        c->fd = -1;
    }
    free(c->head);
    c->head = NULL;
    c->head_len = 0;
    c->phase = PH_IDLE;
}

/* Ends the attempt (with a verdict unless `judged` is false) and schedules the next one. */
static void end_attempt(struct hc_check *c, bool judged, bool ok)
{
    struct sl_loop *loop = c->hp->hc->loop;
    close_socket(c);
    if (judged)
        record(c, ok);
    uint64_t now = sl_loop_now_ms(loop);
    sl_timer_arm(loop, &c->timer, c->next_due_ms > now ? c->next_due_ms - now : 0);
}

static void fail(struct hc_check *c, enum why why, int detail)
{
    c->why = why;
    c->why_detail = detail;
    end_attempt(c, true, false);
}

/* A problem of this process (descriptors, memory), not of the endpoint: no verdict, logged
 * once until a check gets a socket again. */
static void skip_local(struct hc_check *c, const char *what, int err)
{
    struct sl_health_checker *hc = c->hp->hc;
    if (!hc->local_error_logged) {
        char eb[64];
        SL_WARN("upstream %s endpoint %s: active health check skipped: %s: %s", c->hp->name,
                c->ep->address, what, strerror_r(err, eb, sizeof eb));
        hc->local_error_logged = true;
    }
    end_attempt(c, false, false);
}

static void fail_tls(struct hc_check *c)
{
    sl_tls_last_error_str(&c->tls, c->why_text, sizeof c->why_text);
    fail(c, WHY_TLS, 0);
}

static void fail_errno(struct hc_check *c, enum why otherwise, int err)
{
    if (err == EPROTO && c->hp->pool->tls)
        fail_tls(c);
    else if (err == ECONNREFUSED)
        fail(c, WHY_REFUSED, err);
    else if (err == ECONNRESET || err == EPIPE)
        fail(c, WHY_RESET, err);
    else
        fail(c, otherwise, err);
}

/* Decides on a complete head: the status must be one of the expected ones. */
static void judge(struct hc_check *c, const struct sl_h1_response *resp)
{
    c->why = WHY_STATUS;
    c->why_detail = resp->status;
    end_attempt(c, true, sl_status_set_has(&c->hp->conf->statuses, resp->status));
}

/* The head does not fit the buffer (or has more fields than we keep): judge the status line
 * alone, parsed as a head of its own by ending it with an empty line in place. */
static void judge_status_line(struct hc_check *c)
{
    char *eol = memmem(c->head, c->head_len, "\r\n", 2);
    if (!eol) {
        fail(c, WHY_MALFORMED, SL_H1_ERR_BAD_STATUS_LINE);
        return;
    }
    size_t line = (size_t)(eol - c->head) + 2;
    /* line <= HEAD_MAX_BYTES and the buffer has 2 bytes more, so the CRLF fits */
    c->head[line] = '\r';
    c->head[line + 1] = '\n';
    struct sl_h1_head_state st = {0};
    struct sl_h1_response resp;
    struct sl_h1_header hdr[1];
    enum sl_h1_err err = SL_H1_ERR_NONE;
    struct sl_h1_limits lim = {.max_head_bytes = line + 2, .max_headers = 1};
    enum sl_status s =
        sl_h1_parse_response(&st, c->head, line + 2, &lim, false, &resp, hdr, 1, &err);
    if (s == SL_DONE)
        judge(c, &resp);
    else
        fail(c, WHY_MALFORMED, s == SL_ERROR ? (int)err : (int)SL_H1_ERR_BAD_STATUS_LINE);
}

static void read_step(struct hc_check *c)
{
    for (;;) {
        size_t n = 0;
        int rc = sl_transport_read(&c->tr, c->head + c->head_len, HEAD_MAX_BYTES - c->head_len, &n);
        if (rc == -EAGAIN) {
            /* level-triggered: wait for what the transport needs (TLS may need to write) */
            sl_io_modify(c->hp->hc->loop, &c->io, sl_transport_want(&c->tr, EPOLLIN));
            return;
        }
        if (rc < 0) {
            fail_errno(c, WHY_RECV, -rc);
            return;
        }
        if (n == 0) {
            fail(c, WHY_CLOSED, 0);
            return;
        }
        c->head_len += n;
        struct sl_h1_response resp;
        struct sl_h1_header hdrs[HEAD_MAX_HEADERS];
        enum sl_h1_err err = SL_H1_ERR_NONE;
        struct sl_h1_limits lim = {.max_head_bytes = HEAD_MAX_BYTES,
                                   .max_headers = HEAD_MAX_HEADERS};
        enum sl_status s = sl_h1_parse_response(&c->hs, c->head, c->head_len, &lim, false, &resp,
                                                hdrs, HEAD_MAX_HEADERS, &err);
        if (s == SL_DONE) {
            judge(c, &resp);
            return;
        }
        if (s == SL_ERROR) {
            if (err == SL_H1_ERR_HEADERS_TOO_LARGE || err == SL_H1_ERR_TOO_MANY_HEADERS)
                judge_status_line(c);
            else
                fail(c, WHY_MALFORMED, (int)err);
            return;
        }
        if (c->head_len == HEAD_MAX_BYTES) {
            judge_status_line(c);
            return;
        }
    }
}

static void write_step(struct hc_check *c)
{
    struct sl_loop *loop = c->hp->hc->loop;
    while (c->sent < c->req_len) {
        struct iovec iov = {c->req + c->sent, c->req_len - c->sent};
        size_t n = 0;
        int rc = sl_transport_writev(&c->tr, &iov, 1, &n);
        c->sent += n;
        if (rc == -EAGAIN) {
            sl_io_modify(loop, &c->io, sl_transport_want(&c->tr, EPOLLOUT));
            return;
        }
        if (rc < 0) {
            fail_errno(c, WHY_SEND, -rc);
            return;
        }
    }
    c->phase = PH_READING;
    sl_io_modify(loop, &c->io, EPOLLIN);
    /* The answer may already be there; when it is not, recv says EAGAIN and we wait. */
    read_step(c);
}

/* The connection is ready for the check itself: a TCP check is done, an HTTP one sends. */
static void ready(struct hc_check *c)
{
    if (!c->req) {
        c->why = WHY_NONE;
        end_attempt(c, true, true);
        return;
    }
    c->phase = PH_WRITING;
    c->sent = 0;
    write_step(c);
}

static void handshake_step(struct hc_check *c)
{
    int rc = sl_transport_handshake(&c->tr);
    if (rc == -EAGAIN) {
        sl_io_modify(c->hp->hc->loop, &c->io, sl_transport_want(&c->tr, EPOLLIN));
        return;
    }
    if (rc < 0) {
        fail_errno(c, WHY_CONNECT, -rc);
        return;
    }
    ready(c);
}

static void after_proxy(struct hc_check *c)
{
    if (c->hp->pool->tls) {
        c->phase = PH_HANDSHAKE;
        handshake_step(c);
        return;
    }
    ready(c);
}

/* The PROXY header goes first, in the clear (before any TLS byte). */
static void proxy_step(struct hc_check *c)
{
    while (c->pp_off < c->pp_len) {
        ssize_t n = send(c->fd, c->pp + c->pp_off, (size_t)(c->pp_len - c->pp_off), MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            sl_io_modify(c->hp->hc->loop, &c->io, EPOLLOUT);
            return;
        }
        if (n < 0) {
            fail_errno(c, WHY_SEND, errno);
            return;
        }
        c->pp_off = (uint8_t)(c->pp_off + n);
    }
    after_proxy(c);
}

static void connected(struct hc_check *c)
{
    if (c->pp_len) {
        c->phase = PH_PROXY;
        proxy_step(c);
        return;
    }
    after_proxy(c);
}

static void begin_attempt(struct hc_check *c)
{
    struct sl_health_checker *hc = c->hp->hc;
    struct sl_loop *loop = hc->loop;
    uint64_t now = sl_loop_now_ms(loop);
    c->started_ms = now;
    c->attempts++;
    c->next_due_ms = now + jittered_interval(c);
    c->head_len = 0;
    memset(&c->hs, 0, sizeof c->hs);
    if (c->ep->addr_len == 0) {
        fail(c, WHY_NO_ADDRESS, 0);
        return;
    }
    if (c->req) {
        c->head = malloc(HEAD_MAX_BYTES + 2);
        if (!c->head) {
            skip_local(c, "allocating the response buffer", ENOMEM);
            return;
        }
    }
    int fd = socket(c->ep->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        skip_local(c, "socket", errno);
        return;
    }
    c->fd = fd;
    struct sl_pool *pool = c->hp->pool;
    if (pool->tls) {
        /* No session resumption for checks: one full handshake per interval and endpoint. */
        char name[256];
        const char *sni = sl_pool_tls_name(pool, c->ep, name, sizeof name);
        int trc = sl_tls_transport_init_client(&c->tls, fd, pool->tls, sni, NULL);
        if (trc == -ENOMEM) {
            skip_local(c, "TLS", ENOMEM);
            return;
        }
        if (trc < 0) {
            snprintf(c->why_text, sizeof c->why_text, "no usable server name");
            fail(c, WHY_TLS, 0);
            return;
        }
    } else {
        sl_tcp_transport_init(&c->tr, fd);
    }
    c->has_tr = true;
    c->pp_len = c->pp_off = 0;
    if (pool->conf->proxy_protocol != SL_PP_SEND_OFF) {
        /* A check speaks for no client: UNKNOWN (v1) / AF_UNSPEC (v2), "use the connection's
         * addresses". */
        c->pp_len = (uint8_t)sl_proxy_proto_write(pool->conf->proxy_protocol == SL_PP_SEND_V2,
                                                  c->pp, sizeof c->pp, NULL, NULL);
    }
    /* Any outcome below, immediate or not, ends through end_attempt, which re-arms the timer
     * for the next start; until then it is the attempt's deadline. */
    c->phase = PH_CONNECTING;
    sl_timer_arm(loop, &c->timer, c->hp->conf->timeout_ms);
    int rc = connect(fd, (const struct sockaddr *)&c->ep->addr, c->ep->addr_len);
    int err = rc < 0 ? errno : 0;
    if (rc < 0 && err != EINPROGRESS) {
        fail_errno(c, WHY_CONNECT, err);
        return;
    }
    /* Registered after connect(): an unconnected socket polls as writable and hung up. */
    rc = sl_io_start(loop, &c->io, fd, EPOLLOUT, on_check_io, c);
    if (rc < 0) {
        skip_local(c, "epoll", -rc);
        return;
    }
    hc->local_error_logged = false;
    if (err == 0)
        connected(c);
}

static void on_check_io(struct sl_io *io, uint32_t events)
{
    struct hc_check *c = io->data;
    switch (c->phase) {
    case PH_CONNECTING: {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err)
            fail_errno(c, WHY_CONNECT, err);
        else if (events & EPOLLOUT)
            connected(c);
        else
            fail(c, WHY_RESET, ECONNRESET); /* hung up without an error: treat as a reset */
        break;
    }
    case PH_PROXY:
        proxy_step(c);
        break;
    case PH_HANDSHAKE:
        handshake_step(c);
        break;
    case PH_WRITING:
        write_step(c);
        break;
    case PH_READING:
        read_step(c);
        break;
    case PH_IDLE:
        break; /* a stale event for a closed socket is never dispatched; nothing to do */
    }
}

static void on_check_timer(struct sl_timer *t)
{
    struct hc_check *c = t->data;
    switch (c->phase) {
    case PH_IDLE:
        begin_attempt(c);
        break;
    case PH_CONNECTING:
    case PH_PROXY:
    case PH_HANDSHAKE:
        fail(c, WHY_CONNECT_TIMEOUT, 0);
        break;
    case PH_WRITING:
    case PH_READING:
        fail(c, WHY_RESPONSE_TIMEOUT, 0);
        break;
    }
}

/* ---- following the pools' sets ---------------------------------------------------------- */

static struct hc_check *check_new(struct hc_pool *hp, struct sl_endpoint *ep)
{
    struct hc_check *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    const struct sl_active_health_conf *conf = hp->conf;
    if (conf->path) {
        const char *host = conf->host ? conf->host : ep->address;
        static const char fmt[] = "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: sluice-health-check"
                                  "\r\nConnection: close\r\n\r\n";
        int n = snprintf(NULL, 0, fmt, conf->path, host);
        if (n < 0 || !(c->req = malloc((size_t)n + 1))) {
            free(c);
            return NULL;
        }
        snprintf(c->req, (size_t)n + 1, fmt, conf->path, host);
        c->req_len = (size_t)n;
    }
    c->hp = hp;
    c->ep = ep;
    sl_endpoint_ref(ep);
    c->fd = -1;
    c->phase = PH_IDLE;
    /* Only this checker writes the flag, so it is ours to resume from (an endpoint kept across
     * checkers, or a previous checker's verdict). */
    c->down = atomic_load_explicit(&ep->active_down, memory_order_relaxed);
    sl_timer_init(&c->timer, on_check_timer, c);
    sl_timer_arm(hp->hc->loop, &c->timer, rand_below(hp->hc, interval_of(c)));
    SL_DEBUG("upstream %s endpoint %s: active health checks start", hp->name, ep->address);
    return c;
}

/* Stops checking: closes the socket, drops the endpoint, frees at the end of the turn. */
static void check_retire(struct hc_check *c)
{
    struct sl_health_checker *hc = c->hp->hc;
    close_socket(c);
    sl_timer_cancel(hc->loop, &c->timer);
    sl_endpoint_unref(c->ep);
    c->ep = NULL;
    c->next_dead = hc->dead;
    hc->dead = c;
    sl_defer_queue(hc->loop, &hc->reap);
}

static void check_free(struct hc_check *c)
{
    free(c->req);
    free(c->head);
    free(c);
}

static void pool_sync(struct hc_pool *hp)
{
    uint64_t v = atomic_load_explicit(&hp->pool->version, memory_order_acquire);
    if (hp->synced && v == hp->seen_version)
        return;
    struct sl_endpoint_set *s = sl_pool_acquire_set(hp->pool);
    size_t n = s ? s->count : 0;
    struct hc_check **next = NULL;
    if (n && !(next = malloc(n * sizeof *next))) {
        sl_endpoint_set_unref(s);
        return; /* retried at the next tick */
    }
    bool complete = true;
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        struct sl_endpoint *ep = s->eps[i];
        struct hc_check *c = find_check(hp, ep);
        if (c) {
            if (!c->visited) {
                c->visited = true;
                next[m++] = c;
            }
            continue;
        }
        c = check_new(hp, ep);
        if (!c) {
            complete = false; /* the endpoint is picked up at the next tick */
            continue;
        }
        c->visited = true;
        next[m++] = c;
    }
    for (size_t i = 0; i < hp->count; i++) {
        struct hc_check *c = hp->checks[i];
        if (!c->visited) {
            SL_DEBUG("upstream %s endpoint %s: active health checks stop (left the pool)", hp->name,
                     c->ep->address);
            check_retire(c);
        }
    }
    for (size_t i = 0; i < m; i++)
        next[i]->visited = false;
    if (m > 1)
        qsort(next, m, sizeof *next, cmp_check_ep);
    /* Sets hold no duplicates, but one listed twice and new in this set would have two
     * checks (lookups above only see the previous array): keep one, since the binary search
     * and the verdict both assume a single check per endpoint. */
    size_t w = 0;
    for (size_t i = 0; i < m; i++) {
        if (w && next[w - 1]->ep == next[i]->ep)
            check_retire(next[i]);
        else
            next[w++] = next[i];
    }
    m = w;
    free(hp->checks);
    hp->checks = next;
    hp->count = m;
    if (complete) {
        hp->seen_version = s ? s->version : v;
        hp->synced = true;
    }
    if (s)
        sl_endpoint_set_unref(s);
}

static void on_sync_timer(struct sl_timer *t)
{
    struct sl_health_checker *hc = t->data;
    sl_health_checker_sync(hc);
    sl_timer_arm(hc->loop, &hc->sync_timer, SL_HEALTH_SYNC_MS);
}

static void on_reap(struct sl_defer *d)
{
    struct sl_health_checker *hc = d->data;
    while (hc->dead) {
        struct hc_check *c = hc->dead;
        hc->dead = c->next_dead;
        check_free(c);
    }
    if (hc->stopped) {
        for (size_t i = 0; i < hc->pool_count; i++)
            free(hc->pools[i].checks);
        free(hc->pools);
        free(hc);
    }
}

/* ---- API -------------------------------------------------------------------------------- */

struct sl_health_checker *sl_health_checker_start(struct sl_loop *loop, struct sl_pool **pools,
                                                  size_t pool_count)
{
    struct sl_health_checker *hc = calloc(1, sizeof *hc);
    if (!hc)
        return NULL;
    size_t enabled = 0;
    for (size_t i = 0; i < pool_count; i++)
        if (pools[i] && pools[i]->conf && pools[i]->conf->active.enabled)
            enabled++;
    if (enabled && !(hc->pools = calloc(enabled, sizeof *hc->pools))) {
        free(hc);
        return NULL;
    }
    hc->loop = loop;
    /* Seeded per process so that instances started together do not check in step. */
    if (getrandom(&hc->rng, sizeof hc->rng, 0) != sizeof hc->rng || hc->rng == 0)
        hc->rng = (sl_clock_now_ms() << 20) ^ (uint64_t)(uintptr_t)hc ^ 0x9e3779b97f4a7c15ull;
    if (hc->rng == 0)
        hc->rng = 0x9e3779b97f4a7c15ull;
    sl_defer_init(&hc->reap, on_reap, hc);
    sl_timer_init(&hc->sync_timer, on_sync_timer, hc);
    for (size_t i = 0; i < pool_count; i++) {
        if (!pools[i] || !pools[i]->conf || !pools[i]->conf->active.enabled)
            continue;
        struct hc_pool *hp = &hc->pools[hc->pool_count++];
        hp->hc = hc;
        hp->pool = pools[i];
        hp->conf = &pools[i]->conf->active;
        hp->name = pools[i]->conf->name ? pools[i]->conf->name : "?";
    }
    sl_health_checker_sync(hc);
    if (hc->pool_count)
        sl_timer_arm(loop, &hc->sync_timer, SL_HEALTH_SYNC_MS);
    return hc;
}

void sl_health_checker_sync(struct sl_health_checker *hc)
{
    if (hc->stopped)
        return;
    for (size_t i = 0; i < hc->pool_count; i++)
        pool_sync(&hc->pools[i]);
}

void sl_health_checker_stop(struct sl_health_checker *hc)
{
    if (!hc || hc->stopped)
        return;
    sl_timer_cancel(hc->loop, &hc->sync_timer);
    for (size_t i = 0; i < hc->pool_count; i++) {
        struct hc_pool *hp = &hc->pools[i];
        for (size_t j = 0; j < hp->count; j++)
            check_retire(hp->checks[j]);
        hp->count = 0;
    }
    hc->stopped = true;
    sl_defer_queue(hc->loop, &hc->reap);
}

uint64_t sl_health_checker_check_count(const struct sl_health_checker *hc,
                                       const struct sl_endpoint *ep, uint64_t *last_start_ms)
{
    if (last_start_ms)
        *last_start_ms = 0;
    for (size_t i = 0; hc && i < hc->pool_count; i++) {
        const struct hc_check *c = find_check(&hc->pools[i], ep);
        if (c) {
            if (last_start_ms)
                *last_start_ms = c->started_ms;
            return c->attempts;
        }
    }
    return 0;
}
