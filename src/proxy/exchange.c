/*
 * One request's trip through the gateway: route, filters, then either a direct response or
 * the upstream exchange (pick an endpoint, get a pooled or new connection, send the head and
 * stream the body, parse the response strictly, stream it back). Every step is driven by
 * events from the two connections and bounded by a timer.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "config/config.h"
#include "core/fmt.h"
#include "core/hash.h"
#include "core/log.h"
#include "core/rand.h"
#include "filters/filter.h"
#include "filters/filter_set.h"
#include "http/h1_body.h"
#include "http/h1_parse.h"
#include "http/request.h"
#include "proxy/balancer.h"
#include "core/worker.h"
#include "proxy/proxy_worker.h"
#include "proxy/pool.h"
#include "proxy/router.h"
#include "proxy/upstream.h"

enum ex_state {
    EX_FILTERS,
    EX_BACKOFF, /* waiting to retry */
    EX_CONNECTING,
    EX_SENDING,   /* head and request body going upstream; response may arrive meanwhile */
    EX_STREAMING, /* response head sent to the client; body streaming */
    EX_DONE,
};

struct exchange {
    struct sl_request *req;
    struct sl_proxy_listener *gl;
    /* The worker state of the config generation the request started on: a reload swaps the
     * listener's for new requests while this one finishes on its own. */
    struct sl_proxy_worker *pw;
    const struct sl_route_conf *route;
    struct sl_upstream_rt *up;
    struct sl_filter_run frun;
    struct sl_upstream_conn *uc;
    enum ex_state state;
    struct sl_wep *wep; /* endpoint of the current attempt (a use held) */
    bool probe;         /* the current attempt is a half-open probe */
    struct sl_endpoint *tried[SL_PICK_MAX_EXCLUDE]; /* each holds a reference until the
                                                       request is freed */
    size_t tried_count;
    const struct sl_retry_conf *rc;
    unsigned retries;
    struct sl_timer retry_timer;
    bool counted_request;  /* holds a slot of circuit_breaker.max_requests */
    bool counted_pending;  /* holds a slot of circuit_breaker.max_pending */
    bool retryable_method; /* idempotent, Idempotency-Key, or retries.non_idempotent */
    char *body_copy;       /* request body kept for a retry (arena) */
    size_t body_copy_len, body_copy_cap;
    size_t replay_off;  /* bytes of body_copy sent on this attempt */
    bool body_overflow; /* the body outgrew body_copy: no retry once any was consumed */
    int last_status;    /* the last failed attempt, answered when no retry follows */
    const char *last_name;
    bool replayed;
    bool req_sent;         /* head + whole body written upstream */
    bool req_write_failed; /* the backend stopped taking the body after it began answering */
    bool wrote_upstream;   /* at least one byte reached the upstream socket */
    bool body_consumed;    /* client body bytes were consumed (a replay cannot resend them) */
    bool resp_head_done;
    bool resp_done;
    bool upstream_reusable;
    bool client_blocked; /* the client cannot take more: upstream reads paused */
    bool last_outcome_5xx;
    char *up_head; /* serialized request head in the arena */
    size_t up_head_len;
    struct sl_buf head_view; /* a view over up_head consumed as written; never pooled */
    struct sl_h1_body_writer reqw;
    struct sl_h1_head_state rhs;
    struct sl_h1_body_reader respr;
    int status;
};

static void ex_upstream_event(struct sl_upstream_conn *uc, uint32_t events, void *data);
static void ex_upstream_timeout(struct sl_upstream_conn *uc, void *data);
static void ex_try_endpoint(struct exchange *ex);
static void ex_pump_request(struct exchange *ex);
static void ex_pump_response(struct exchange *ex);
static void on_retry_timer(struct sl_timer *t);

static const struct sl_upstream_user *ex_user(struct exchange *ex)
{
    static _Thread_local struct sl_upstream_user u;
    u.on_event = ex_upstream_event;
    u.on_timeout = ex_upstream_timeout;
    u.data = ex;
    return &u;
}

/* ---- a bounded string builder over arena memory ---- */

struct sb {
    char *p;
    size_t len, cap;
    bool overflow;
};

static void sb_put(struct sb *b, const char *s, size_t n)
{
    if (b->overflow || b->len + n > b->cap) {
        b->overflow = true;
        return;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void sb_slice(struct sb *b, struct sl_slice s)
{
    sb_put(b, s.ptr, s.len);
}

static void sb_str(struct sb *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

static void sb_header(struct sb *b, struct sl_slice name, struct sl_slice value)
{
    sb_slice(b, name);
    sb_put(b, ": ", 2);
    sb_slice(b, value);
    sb_put(b, "\r\n", 2);
}

static void sb_u64(struct sb *b, uint64_t v)
{
    char tmp[24];
    sb_put(b, tmp, sl_fmt_u64(tmp, v));
}

/* ---- header classification ---- */

/* Hop-by-hop and framing headers we never forward as received (RFC 9110 7.6.1). */
static bool is_hop_by_hop(struct sl_slice name)
{
    switch (name.len) {
    case 2:
        return sl_slice_ieq_cstr(name, "TE");
    case 7:
        return sl_slice_ieq_cstr(name, "Trailer") || sl_slice_ieq_cstr(name, "Upgrade");
    case 10:
        return sl_slice_ieq_cstr(name, "Connection") || sl_slice_ieq_cstr(name, "Keep-Alive");
    case 14:
        return sl_slice_ieq_cstr(name, "Content-Length");
    case 16:
        return sl_slice_ieq_cstr(name, "Proxy-Connection");
    case 17:
        return sl_slice_ieq_cstr(name, "Transfer-Encoding");
    default:
        return false;
    }
}

/* True when `name` is listed as a token of any Connection header. */
static bool named_in_connection(const struct sl_h1_header *h, size_t n, struct sl_slice name)
{
    for (size_t i = 0; i < n; i++) {
        if (!sl_slice_ieq_cstr(h[i].name, "Connection"))
            continue;
        const char *p = h[i].value.ptr, *end = p + h[i].value.len;
        while (p < end) {
            while (p < end && (*p == ' ' || *p == '\t' || *p == ','))
                p++;
            const char *s = p;
            while (p < end && *p != ',' && *p != ' ' && *p != '\t')
                p++;
            if (p > s && sl_slice_ieq(sl_slice_make(s, (size_t)(p - s)), name))
                return true;
        }
    }
    return false;
}

static bool in_name_list(char **names, size_t n, struct sl_slice name)
{
    for (size_t i = 0; i < n; i++)
        if (sl_slice_ieq_cstr(name, names[i]))
            return true;
    return false;
}

static bool in_pair_names(const struct sl_header_pair *p, size_t n, struct sl_slice name)
{
    for (size_t i = 0; i < n; i++)
        if (sl_slice_ieq_cstr(name, p[i].name))
            return true;
    return false;
}

static void sb_header_ops(struct sb *b, const struct sl_header_ops_conf *ops)
{
    for (size_t i = 0; i < ops->set_count; i++)
        sb_header(b, sl_slice_cstr(ops->set[i].name), sl_slice_cstr(ops->set[i].value));
    for (size_t i = 0; i < ops->add_count; i++)
        sb_header(b, sl_slice_cstr(ops->add[i].name), sl_slice_cstr(ops->add[i].value));
}

static size_t ops_size(const struct sl_header_ops_conf *ops)
{
    size_t n = 0;
    for (size_t i = 0; i < ops->set_count; i++)
        n += strlen(ops->set[i].name) + strlen(ops->set[i].value) + 4;
    for (size_t i = 0; i < ops->add_count; i++)
        n += strlen(ops->add[i].name) + strlen(ops->add[i].value) + 4;
    return n;
}

/* ---- ending ---- */

static void ex_unpend(struct exchange *ex)
{
    if (ex->counted_pending) {
        atomic_fetch_sub_explicit(&ex->up->pool->pending, 1, memory_order_relaxed);
        ex->counted_pending = false;
    }
}

static void ex_release_upstream(struct exchange *ex, enum sl_outcome outcome, bool reusable)
{
    ex_unpend(ex);
    if (ex->uc) {
        sl_upstream_release(ex->uc, reusable);
        ex->uc = NULL;
    }
    if (ex->wep) {
        sl_upstream_done(ex->up, ex->wep, outcome, ex->probe);
        ex->wep = NULL;
        ex->probe = false;
    }
}

static void ex_end(struct exchange *ex)
{
    struct sl_proxy_worker *pw = ex->pw;
    sl_timer_cancel(&pw->worker->loop, &ex->retry_timer);
    if (ex->counted_request) {
        atomic_fetch_sub_explicit(&ex->up->pool->requests, 1, memory_order_relaxed);
        ex->counted_request = false;
    }
    ex->state = EX_DONE;
    ex->req->handler_state = NULL;
    ex->req->log.retries = ex->retries;
    if (ex->req->log.upstream_start_us && !ex->req->log.upstream_end_us)
        ex->req->log.upstream_end_us = sl_clock_now_ns() / 1000u;
}

/* The front-end freed the request: only now is nothing of its configuration generation in
 * use (the response may have been flushed long after ex_end), nor the endpoints it tried
 * (the access log read the last one's address). */
static void ex_on_release(struct sl_request *req, void *data)
{
    (void)req;
    struct exchange *ex = data;
    struct sl_proxy_worker *pw = ex->pw;
    while (ex->tried_count)
        sl_endpoint_unref(ex->tried[--ex->tried_count]);
    pw->inflight--;
    if (pw->on_idle)
        pw->on_idle(pw);
}

/* Fails the exchange with a gateway error (or a cut connection once the response began). */
static void ex_fail(struct exchange *ex, int status, const char *name, enum sl_outcome outcome)
{
    struct sl_request *req = ex->req;
    ex_release_upstream(ex, outcome, false);
    if (sl_log_enabled(SL_LOG_LVL_INFO) && status >= 500) {
        char subject[256] = "";
        if (req->secure)
            sl_request_client_subject(req, subject, sizeof subject);
        SL_INFO("request %.*s: %d %s (route %s, upstream %s%s%s)", (int)req->request_id.len,
                req->request_id.ptr, status, name,
                ex->route && ex->route->name ? ex->route->name : "-",
                ex->up ? ex->up->conf->name : "-", subject[0] ? ", client " : "", subject);
    }
    ex_end(ex);
    sl_request_respond_error(req, status, name);
}

/* A fast 503 that tells the client when to come back. */
static void ex_fail_unavailable(struct exchange *ex, const char *name, uint64_t retry_after_s)
{
    char v[24];
    size_t n = sl_fmt_u64(v, retry_after_s ? retry_after_s : 1);
    sl_request_add_response_header(ex->req, SL_SLICE_LIT("Retry-After"), sl_slice_make(v, n));
    ex_fail(ex, 503, name, SL_OUTCOME_CANCELLED);
}

static void ex_finish(struct exchange *ex)
{
    struct sl_request *req = ex->req;
    bool client_reusable = ex->req_sent;
    ex_release_upstream(ex, ex->last_outcome_5xx ? SL_OUTCOME_HTTP_5XX : SL_OUTCOME_SUCCESS,
                        ex->upstream_reusable && ex->req_sent);
    ex_end(ex);
    sl_request_finish(req, client_reusable);
}

/* ---- direct responses ---- */

static void ex_direct(struct exchange *ex)
{
    const struct sl_route_conf *r = ex->route;
    const struct sl_direct_response_conf *d = &r->direct_response;
    struct sl_request *req = ex->req;
    size_t cap = ops_size(&r->response_headers) + 1;
    char *extra = sl_arena_alloc(&req->arena, cap);
    struct sb b = {extra, 0, cap, extra == NULL};
    sb_header_ops(&b, &r->response_headers);
    ex_end(ex);
    if (b.overflow) {
        sl_request_respond_error(req, 500, "internal");
        return;
    }
    sl_request_respond(req, d->status, d->content_type ? d->content_type : "text/plain", extra,
                       b.len, d->body ? d->body : "", d->body_len);
}

/* ---- the upstream request head ---- */

/* Visible ASCII and spaces only: what a header value may carry unescaped. */
static bool is_header_value(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] >= 0x7f)
            return false;
    return true;
}

static bool build_upstream_head(struct exchange *ex)
{
    struct sl_request *req = ex->req;
    const struct sl_route_conf *r = ex->route;
    /* The method, the host twice (Host and X-Forwarded-Host) or the endpoint's address in
     * its place, and everything else the head gets. */
    size_t cap = req->method.len + req->target.len + 64 + ops_size(&r->request_headers) +
                 req->client_ip.len + req->request_id.len + 2 * req->host.len + 160;
    const char *ep_addr = ex->wep ? ex->wep->ep->address : "";
    if (!req->host.len)
        cap += strlen(ep_addr);
    if (r->rewrite_prefix)
        cap += strlen(r->rewrite_prefix);
    for (size_t i = 0; i < req->header_count; i++)
        cap += req->headers[i].name.len + req->headers[i].value.len + 4;
    /* A verified client certificate's subject goes to the upstream; only TLS connections can
     * have one. */
    char subject[512];
    size_t subject_len = 0;
    if (req->secure) {
        subject_len = sl_request_client_subject(req, subject, sizeof subject);
        if (subject_len >= sizeof subject || !is_header_value(subject, subject_len))
            subject_len = 0;
        cap += subject_len + 24;
    }
    char *p = sl_arena_alloc(&req->arena, cap);
    if (!p)
        return false;
    struct sb b = {p, 0, cap, false};
    sb_slice(&b, req->method);
    sb_put(&b, " ", 1);
    struct sl_slice path = req->path;
    if (r->match.path_prefix && (r->strip_prefix || r->rewrite_prefix)) {
        size_t pl = strlen(r->match.path_prefix);
        if (pl && r->match.path_prefix[pl - 1] == '/' && path.len >= pl - 1)
            pl--; /* keep the slash: "/api/" strips to "/x", not "x" */
        if (path.len >= pl) {
            path.ptr += pl;
            path.len -= pl;
        }
        if (r->rewrite_prefix) {
            size_t rl = strlen(r->rewrite_prefix);
            if (rl && r->rewrite_prefix[rl - 1] == '/' && path.len && path.ptr[0] == '/')
                rl--;
            sb_put(&b, r->rewrite_prefix, rl);
            if (rl == 0 && (path.len == 0 || path.ptr[0] != '/'))
                sb_put(&b, "/", 1);
        } else if (path.len == 0 || path.ptr[0] != '/') {
            sb_put(&b, "/", 1);
        }
    }
    sb_slice(&b, path);
    if (req->query.len) {
        sb_put(&b, "?", 1);
        sb_slice(&b, req->query);
    }
    sb_str(&b, " HTTP/1.1\r\n");
    /* Exactly one Host, the one routing used: an absolute-form target's authority replaces the
     * Host header (RFC 9112 3.2.2); HTTP/1.0 without a Host gets the endpoint's address. A
     * route that sets or removes Host has the last word. */
    struct sl_slice host_name = SL_SLICE_LIT("Host");
    if (!in_name_list(r->request_headers.remove, r->request_headers.remove_count, host_name) &&
        !in_pair_names(r->request_headers.set, r->request_headers.set_count, host_name)) {
        sb_str(&b, "Host: ");
        if (req->host.len)
            sb_slice(&b, req->host);
        else
            sb_str(&b, ep_addr);
        sb_put(&b, "\r\n", 2);
    }
    bool has_xff = false;
    for (size_t i = 0; i < req->header_count; i++) {
        struct sl_slice n = req->headers[i].name;
        if (is_hop_by_hop(n) || sl_slice_ieq_cstr(n, "Host") || sl_slice_ieq_cstr(n, "Expect") ||
            sl_slice_ieq_cstr(n, "X-Request-Id") || sl_slice_ieq_cstr(n, "X-Forwarded-Proto") ||
            sl_slice_ieq_cstr(n, "X-Forwarded-Host") || sl_slice_ieq_cstr(n, "X-Client-Subject"))
            continue; /* ours to set: a client must not claim an identity */
        if (sl_slice_ieq_cstr(n, "X-Forwarded-For")) {
            has_xff = true; /* merged into one line below, in order */
            continue;
        }
        if (in_name_list(r->request_headers.remove, r->request_headers.remove_count, n) ||
            in_pair_names(r->request_headers.set, r->request_headers.set_count, n))
            continue;
        if ((req->flags & SL_H1_F_HAS_CONN_HEADER) &&
            named_in_connection(req->headers, req->header_count, n))
            continue;
        sb_header(&b, n, req->headers[i].value);
    }
    sb_str(&b, "X-Forwarded-For: ");
    for (size_t i = 0; has_xff && i < req->header_count; i++) {
        if (sl_slice_ieq_cstr(req->headers[i].name, "X-Forwarded-For") &&
            req->headers[i].value.len) {
            sb_slice(&b, req->headers[i].value);
            sb_put(&b, ", ", 2);
        }
    }
    sb_slice(&b, req->client_ip);
    sb_str(&b,
           req->secure ? "\r\nX-Forwarded-Proto: https\r\n" : "\r\nX-Forwarded-Proto: http\r\n");
    if (req->host.len)
        sb_header(&b, SL_SLICE_LIT("X-Forwarded-Host"), req->host);
    sb_header(&b, SL_SLICE_LIT("X-Request-Id"), req->request_id);
    if (subject_len)
        sb_header(&b, SL_SLICE_LIT("X-Client-Subject"), sl_slice_make(subject, subject_len));
    sb_header_ops(&b, &r->request_headers);
    if (req->body_kind == SL_H1_BODY_LENGTH) {
        sb_str(&b, "Content-Length: ");
        sb_u64(&b, req->content_length);
        sb_put(&b, "\r\n", 2);
    } else if (req->body_kind == SL_H1_BODY_CHUNKED) {
        sb_str(&b, "Transfer-Encoding: chunked\r\n");
    }
    sb_put(&b, "\r\n", 2);
    if (b.overflow)
        return false;
    ex->up_head = p;
    ex->up_head_len = b.len;
    return true;
}

/* ---- choosing an endpoint and connecting ---- */

static uint64_t pick_hash(struct exchange *ex, bool *has)
{
    const struct sl_upstream_conf *u = ex->up->conf;
    struct sl_request *req = ex->req;
    *has = false;
    if (u->balance != SL_BALANCE_HASH)
        return 0;
    if (u->hash_on == SL_HASH_IP) {
        *has = true;
        return sl_hash_bytes(req->client_ip.ptr, req->client_ip.len, 0);
    }
    struct sl_slice key = sl_slice_cstr(u->hash_key);
    if (u->hash_on == SL_HASH_HEADER) {
        int i = sl_h1_find_header(req->headers, req->header_count, key);
        if (i >= 0) {
            *has = true;
            return sl_hash_bytes(req->headers[i].value.ptr, req->headers[i].value.len, 0);
        }
        return 0;
    }
    /* cookie: find "name=value" in any Cookie header */
    for (size_t i = 0; i < req->header_count; i++) {
        if (!sl_slice_ieq_cstr(req->headers[i].name, "Cookie"))
            continue;
        const char *p = req->headers[i].value.ptr, *end = p + req->headers[i].value.len;
        while (p < end) {
            while (p < end && (*p == ' ' || *p == ';'))
                p++;
            const char *n = p;
            while (p < end && *p != '=' && *p != ';')
                p++;
            if (p >= end || *p != '=') {
                continue;
            }
            struct sl_slice name = sl_slice_make(n, (size_t)(p - n));
            const char *v = ++p;
            while (p < end && *p != ';')
                p++;
            if (sl_slice_eq(name, key)) {
                *has = true;
                return sl_hash_bytes(v, (size_t)(p - v), 0);
            }
        }
    }
    return 0;
}

static bool is_idempotent(const struct sl_request *req)
{
    return req->method_bit & (SL_METHOD_GET | SL_METHOD_HEAD | SL_METHOD_PUT | SL_METHOD_DELETE |
                              SL_METHOD_OPTIONS | SL_METHOD_TRACE);
}

static void ex_start_send(struct exchange *ex)
{
    /* A Host-less HTTP/1.0 request is sent with the chosen endpoint's address as Host, which
     * is only known now: rebuild its head for this attempt (a rare path). */
    if (!ex->req->host.len && !build_upstream_head(ex)) {
        ex_fail(ex, 503, "out_of_memory", SL_OUTCOME_CANCELLED);
        return;
    }
    ex->state = EX_SENDING;
    ex->head_view =
        (struct sl_buf){ex->up_head, 0, (uint32_t)ex->up_head_len, (uint32_t)ex->up_head_len};
    enum sl_h1_wmode mode = ex->req->body_kind == SL_H1_BODY_CHUNKED  ? SL_H1_W_CHUNKED
                            : ex->req->body_kind == SL_H1_BODY_LENGTH ? SL_H1_W_LENGTH
                                                                      : SL_H1_W_NONE;
    sl_h1_body_writer_init(&ex->reqw, mode);
    memset(&ex->rhs, 0, sizeof ex->rhs);
    ex->req_sent = false;
    ex->req_write_failed = false;
    ex->wrote_upstream = false;
    ex->replay_off = 0;
    ex->uc->requests++;
    /* While the request is still going out, a stall is a gap (idle); the response timeout
     * counts from the moment the whole request is sent, so a slow upload does not make a
     * healthy backend look hung. */
    sl_upstream_conn_arm(ex->uc, ex->up->conf->idle_timeout_ms);
    ex_pump_request(ex);
}

/* Response wait of one attempt: timeouts.response, or retries.per_try_timeout when shorter. */
static uint64_t ex_response_timeout(const struct exchange *ex)
{
    uint64_t t = ex->up->conf->response_timeout_ms;
    if (ex->rc && ex->rc->per_try_timeout_ms && ex->rc->per_try_timeout_ms < t)
        t = ex->rc->per_try_timeout_ms;
    return t;
}

/* What failed, as the retries.on bit that lists it (a status is looked up in the set). */
enum retry_cond {
    RC_STATUS = 0,
    RC_CONNECT = SL_RETRY_CONNECT_FAILURE,
    RC_RESET = SL_RETRY_RESET,
    RC_TIMEOUT = SL_RETRY_TIMEOUT,
};

/* Whether the failed attempt may be tried again elsewhere (and the budget allows it). */
static bool ex_may_retry(struct exchange *ex, enum retry_cond cond, int status)
{
    const struct sl_retry_conf *rc = ex->rc;
    if (!rc || ex->retries >= rc->attempts || ex->resp_head_done || ex->req->response_started)
        return false;
    bool listed =
        cond == RC_STATUS ? sl_status_set_has(&rc->statuses, status) : (rc->on & cond) != 0;
    if (!listed)
        return false;
    /* Nothing reached the backend on a connect failure, so any method may go elsewhere;
     * otherwise the request may have had its effect and only a safe one is sent twice. */
    if (cond != RC_CONNECT && ex->wrote_upstream && !ex->retryable_method)
        return false;
    if (ex->body_consumed && ex->body_overflow)
        return false; /* part of the body is gone and cannot be sent again */
    if (ex->tried_count >= SL_PICK_MAX_EXCLUDE)
        return false;
    return sl_pool_budget_retry(ex->up->pool, rc, sl_loop_now_ms(&ex->pw->worker->loop));
}

static void on_retry_timer(struct sl_timer *t)
{
    struct exchange *ex = t->data;
    sl_loop_charge(&ex->pw->worker->loop, &ex->req->log.cpu_ns);
    if (ex->state == EX_BACKOFF)
        ex_try_endpoint(ex);
}

/* Ends the current attempt (ex_may_retry said yes) and starts the next one after a jittered
 * backoff. */
static void ex_retry(struct exchange *ex, enum sl_outcome outcome, enum retry_cond cond)
{
    ex_release_upstream(ex, outcome, false);
    ex->retries++;
    SL_DEBUG("request %.*s: retry %u after %s", (int)ex->req->request_id.len,
             ex->req->request_id.ptr, ex->retries, ex->last_name);
    /* The first retry goes at once: it is sent to another endpoint, and one endpoint failing
     * is the common case, whose cost is then one round trip rather than a backoff. So does
     * any retry after a refused connect (nothing was sent). Later retries mean several
     * endpoints failed: they back off with equal jitter, so the retries of many requests do
     * not arrive together at what is left; the budget bounds them anyway. */
    uint64_t delay = 0;
    if (cond != RC_CONNECT && ex->retries >= 2 && ex->rc->backoff_base_ms) {
        unsigned step = ex->retries - 2;
        uint64_t d = ex->rc->backoff_base_ms << (step < 16 ? step : 16);
        if (d > ex->rc->backoff_max_ms)
            d = ex->rc->backoff_max_ms;
        uint64_t *rng = &ex->up->rng;
        delay = d / 2 + (d / 2 ? sl_rand_next(rng) % (d / 2 + 1) : 0);
    }
    if (delay == 0) {
        ex_try_endpoint(ex);
        return;
    }
    ex->state = EX_BACKOFF;
    sl_timer_arm(&ex->pw->worker->loop, &ex->retry_timer, delay);
}

/* Ends the current attempt as failed; retries when allowed, else answers the client with this
 * failure. */
static void ex_attempt_failed(struct exchange *ex, enum sl_outcome outcome, enum retry_cond cond,
                              int status, const char *name)
{
    ex->last_status = status;
    ex->last_name = name;
    if (!ex_may_retry(ex, cond, status)) {
        ex_fail(ex, status, name, outcome);
        return;
    }
    ex_retry(ex, outcome, cond);
}

/* The client's addresses for a PROXY header: the local one costs a syscall, so it is asked
 * only when a new upstream connection is opened. */
static int ex_local_addr(const void *data, struct sockaddr_storage *out)
{
    return sl_request_conn_addrs(data, NULL, out);
}

/* A pooled or new connection to `w`; with `proxy_protocol:`, one opened for this client. */
static struct sl_upstream_conn *ex_acquire(struct exchange *ex, struct sl_wep *w, bool fresh,
                                           int *err)
{
    if (ex->up->conf->proxy_protocol == SL_PP_SEND_OFF)
        return sl_upstream_acquire(ex->up, w, ex_user(ex), fresh, err);
    struct sockaddr_storage client;
    struct sl_upstream_origin o = {0};
    if (sl_request_conn_addrs(ex->req, &client, NULL) == 0) {
        o.client = (const struct sockaddr *)&client;
        o.get_local = ex_local_addr;
        o.data = ex->req;
    }
    return sl_upstream_acquire_for(ex->up, w, ex_user(ex), fresh, &o, err);
}

static void ex_connect_failed(struct exchange *ex, int err)
{
    SL_DEBUG("upstream %s endpoint %s: connect failed: %s", ex->up->conf->name,
             ex->wep ? ex->wep->ep->address : "-", strerror(-err));
    if (err == -EUSERS) {
        atomic_fetch_add_explicit(&ex->up->pool->stats.overflow_connections, 1,
                                  memory_order_relaxed);
        ex_release_upstream(ex, SL_OUTCOME_CANCELLED, false);
        ex_fail_unavailable(ex, "upstream_overloaded", 1);
        return;
    }
    if (err == -ETIMEDOUT)
        ex_attempt_failed(ex, SL_OUTCOME_TIMEOUT, RC_CONNECT, 504, "upstream_connect_timeout");
    else if (err == -EPROTO) /* TLS handshake or verification (reason logged by upstream.c) */
        ex_attempt_failed(ex, SL_OUTCOME_CONNECT_FAILURE, RC_CONNECT, 502, "upstream_tls_failed");
    else
        ex_attempt_failed(ex, SL_OUTCOME_CONNECT_FAILURE, RC_CONNECT, 503,
                          "upstream_connect_failed");
}

static void ex_try_endpoint(struct exchange *ex)
{
    struct sl_pick_ctx ctx = {0};
    ctx.hash = pick_hash(ex, &ctx.has_hash);
    enum sl_pick_fail why = 0;
    bool probe = false;
    struct sl_wep *w = sl_upstream_pick(ex->up, &ctx, ex->tried, ex->tried_count, &probe, &why);
    if (!w) {
        if (ex->last_name) {
            /* a retry found nowhere else to go: the client gets the last failure */
            ex_fail(ex, ex->last_status, ex->last_name, SL_OUTCOME_CANCELLED);
            return;
        }
        if (why == SL_PICK_NONE_HEALTHY) {
            atomic_fetch_add_explicit(&ex->up->pool->stats.no_healthy_endpoint, 1,
                                      memory_order_relaxed);
            ex_fail_unavailable(ex, "no_healthy_endpoint", sl_upstream_retry_after_s(ex->up));
            return;
        }
        ex_fail_unavailable(ex, "no_endpoint", 1);
        return;
    }
    ex->wep = w;
    ex->probe = probe;
    /* A reference: a new endpoint set (discovery, the admin API) may drop the endpoint while
     * this request still compares against it on a retry. */
    sl_endpoint_ref(w->ep);
    ex->tried[ex->tried_count++] = w->ep;
    ex->req->log.endpoint = w->ep->address; /* held with tried[] until the request is freed */
    if (!ex->req->log.upstream_start_us)
        ex->req->log.upstream_start_us = sl_loop_now_us(&ex->pw->worker->loop);
    int err = 0;
    ex->uc = ex_acquire(ex, w, false, &err);
    if (!ex->uc) {
        ex_connect_failed(ex, err);
        return;
    }
    if (ex->uc->state == SL_UC_BUSY) {
        ex_start_send(ex);
        return;
    }
    uint32_t maxp = ex->up->conf->breaker.max_pending;
    if (maxp) {
        uint32_t cur = atomic_fetch_add_explicit(&ex->up->pool->pending, 1, memory_order_relaxed);
        ex->counted_pending = true;
        if (cur >= maxp) {
            atomic_fetch_add_explicit(&ex->up->pool->stats.overflow_pending, 1,
                                      memory_order_relaxed);
            ex_release_upstream(ex, SL_OUTCOME_CANCELLED, false);
            ex_fail_unavailable(ex, "upstream_overloaded", 1);
            return;
        }
    }
    ex->state = EX_CONNECTING;
    sl_upstream_conn_arm(ex->uc, ex->up->conf->connect_timeout_ms);
}

/* A reused connection failed before any response byte: send again on a fresh one when that
 * cannot duplicate a non-idempotent request. Returns true when a replay started. */
static bool ex_maybe_replay(struct exchange *ex)
{
    if (!ex->uc || !ex->uc->reused || ex->replayed || ex->resp_head_done || ex->body_consumed)
        return false;
    if (ex->uc->in.data && sl_buf_len(&ex->uc->in))
        return false;
    if (ex->wrote_upstream && !is_idempotent(ex->req))
        return false;
    sl_upstream_release(ex->uc, false);
    ex->uc = NULL;
    ex->replayed = true;
    int err = 0;
    ex->uc = ex_acquire(ex, ex->wep, true, &err);
    if (!ex->uc) {
        ex_connect_failed(ex, err);
        return true;
    }
    ex->state = EX_CONNECTING;
    sl_upstream_conn_arm(ex->uc, ex->up->conf->connect_timeout_ms);
    return true;
}

/* ---- request direction ---- */

static void ex_update_upstream_events(struct exchange *ex, bool want_write)
{
    uint32_t ev = 0;
    if (!ex->resp_done && !ex->client_blocked)
        ev |= EPOLLIN | EPOLLRDHUP;
    if (want_write)
        ev |= EPOLLOUT;
    sl_upstream_conn_want(ex->uc, ev);
}

/* The upstream connection failed (reset, EOF before a full response, write error). */
static void ex_upstream_broken(struct exchange *ex, int err)
{
    if (ex_maybe_replay(ex))
        return;
    /* TLS failures after the handshake are alerts, e.g. a TLS 1.3 backend rejecting our client
     * certificate once it has read it: say so, with OpenSSL's reason. */
    bool tls = err == -EPROTO && ex->uc && ex->uc->is_tls;
    if (sl_log_enabled(SL_LOG_LVL_DEBUG)) {
        char why[256] = "";
        if (tls)
            sl_upstream_conn_tls_error(ex->uc, why, sizeof why);
        SL_DEBUG("upstream %s endpoint %s: connection failed: %s", ex->up->conf->name,
                 ex->wep ? ex->wep->ep->address : "-",
                 why[0] ? why : strerror(err < 0 ? -err : err));
    }
    const char *name = tls ? "upstream_tls_failed" : "upstream_reset";
    if (ex->resp_head_done) {
        ex_fail(ex, 502, name, SL_OUTCOME_RESET);
        return;
    }
    ex_attempt_failed(ex, SL_OUTCOME_RESET, RC_RESET, 502, name);
}

static bool ex_parse_response_head(struct exchange *ex, bool eof);

/* A backend that answers before taking the whole body (413) and then closes makes our next
 * write fail, yet its answer may already be in the socket: relay it rather than a 502.
 * Returns true when there was an answer (the exchange went on or ended with it). */
static bool ex_read_early_response(struct exchange *ex)
{
    bool eof = false;
    while (sl_upstream_conn_read(ex->uc, &eof) == 0 && !eof)
        ;
    if (!ex->uc->in.data || sl_buf_len(&ex->uc->in) == 0)
        return false;
    if (ex_parse_response_head(ex, true) && ex->state == EX_STREAMING && !ex->client_blocked)
        ex_pump_response(ex);
    return true;
}

/* Keeps body bytes sent upstream so that a retry can send them again (up to retries.max_body;
 * beyond it the copy is abandoned and such a request is not retried once bytes are gone). */
static void ex_keep_body(struct exchange *ex, const char *p, size_t n)
{
    if (ex->body_overflow)
        return;
    if (!ex->body_copy) {
        uint64_t cap = ex->rc->max_body_bytes;
        if (ex->req->body_kind == SL_H1_BODY_LENGTH && ex->req->content_length < cap)
            cap = ex->req->content_length;
        ex->body_copy = cap ? sl_arena_alloc(&ex->req->arena, (size_t)cap) : NULL;
        ex->body_copy_cap = ex->body_copy ? (size_t)cap : 0;
    }
    if (!ex->body_copy || ex->body_copy_len + n > ex->body_copy_cap) {
        ex->body_overflow = true;
        return;
    }
    memcpy(ex->body_copy + ex->body_copy_len, p, n);
    ex->body_copy_len += n;
    ex->replay_off = ex->body_copy_len;
}

static void ex_pump_request(struct exchange *ex)
{
    struct sl_request *req = ex->req;
    for (;;) {
        struct sl_slice data = {0};
        int status = 0;
        /* A retry first sends again what the client already gave us, then goes on reading. */
        bool from_copy = ex->replay_off < ex->body_copy_len;
        enum sl_status st = SL_OK;
        if (from_copy)
            data =
                sl_slice_make(ex->body_copy + ex->replay_off, ex->body_copy_len - ex->replay_off);
        else
            st = sl_request_body_peek(req, &data, &status);
        if (st == SL_ERROR) {
            ex_fail(ex, status,
                    status == 413   ? "body_too_large"
                    : status == 408 ? "body_timeout"
                                    : "bad_request_body",
                    SL_OUTCOME_CANCELLED);
            return;
        }
        if (ex->state != EX_SENDING && ex->state != EX_STREAMING)
            return; /* the peek failed the client connection; on_abort cleans up */
        bool fin = st == SL_DONE;
        size_t wrote = 0;
        bool flushed = false;
        uint32_t before = ex->head_view.start;
        int rc = sl_h1_body_writer_write(&ex->reqw, &ex->uc->tr, &ex->head_view, data.ptr, data.len,
                                         fin, &wrote, &flushed);
        if (ex->head_view.start != before || wrote)
            ex->wrote_upstream = true;
        if (wrote) {
            if (from_copy) {
                ex->replay_off += wrote;
            } else {
                ex_keep_body(ex, data.ptr, wrote);
                sl_request_body_consume(req, wrote);
                ex->body_consumed = true;
            }
            if (!ex->resp_head_done)
                sl_upstream_conn_arm(ex->uc, ex->up->conf->idle_timeout_ms);
        }
        if (rc == -EAGAIN) {
            ex_update_upstream_events(ex, true);
            return;
        }
        if (rc < 0) {
            if (ex->resp_head_done) {
                /* The backend stopped taking the body but is answering: let the answer
                 * finish; neither connection can be reused afterwards. */
                ex->req_write_failed = true;
                ex->upstream_reusable = false;
                ex_update_upstream_events(ex, false);
                return;
            }
            if (ex_read_early_response(ex))
                return;
            ex_upstream_broken(ex, rc);
            return;
        }
        if (fin && flushed) {
            ex->req_sent = true;
            if (!ex->resp_head_done)
                sl_upstream_conn_arm(ex->uc, ex_response_timeout(ex));
            ex_update_upstream_events(ex, false);
            if (ex->resp_done)
                ex_finish(ex);
            return;
        }
        if (st == SL_AGAIN) {
            /* Wait for the client; the head may already be out. */
            ex_update_upstream_events(ex, !flushed);
            return;
        }
    }
}

/* ---- response direction ---- */

static bool build_client_head(struct exchange *ex, const struct sl_h1_response *resp, struct sb *b)
{
    struct sl_request *req = ex->req;
    const struct sl_route_conf *r = ex->route;
    bool bodiless = req->method_bit == SL_METHOD_HEAD || resp->status == 304 || resp->status == 204;
    sb_str(b, "HTTP/1.1 ");
    sb_u64(b, (uint64_t)resp->status);
    sb_put(b, " ", 1);
    if (resp->reason.len)
        sb_slice(b, resp->reason);
    else
        sb_str(b, sl_http_reason(resp->status));
    sb_put(b, "\r\n", 2);
    for (size_t i = 0; i < resp->header_count; i++) {
        struct sl_slice n = resp->headers[i].name;
        if (bodiless && sl_slice_ieq_cstr(n, "Content-Length") && resp->status != 204) {
            sb_header(b, n, resp->headers[i].value); /* HEAD/304 keep the entity's length */
            continue;
        }
        if (is_hop_by_hop(n) || sl_slice_ieq_cstr(n, "X-Request-Id"))
            continue;
        if (in_name_list(r->response_headers.remove, r->response_headers.remove_count, n) ||
            in_pair_names(r->response_headers.set, r->response_headers.set_count, n))
            continue;
        if ((resp->flags & SL_H1_F_HAS_CONN_HEADER) &&
            named_in_connection(resp->headers, resp->header_count, n))
            continue;
        sb_header(b, n, resp->headers[i].value);
    }
    sb_header(b, SL_SLICE_LIT("X-Request-Id"), req->request_id);
    sb_header_ops(b, &r->response_headers);
    if (req->resp_extra_len)
        sb_put(b, req->resp_extra, req->resp_extra_len);
    return !b->overflow;
}

static void ex_on_response_head(struct exchange *ex, const struct sl_h1_response *resp)
{
    struct sl_request *req = ex->req;
    struct sl_upstream_conn *uc = ex->uc;
    ex->status = resp->status;
    ex->last_outcome_5xx = sl_status_set_has(&ex->up->conf->passive.statuses, resp->status);
    if (ex_may_retry(ex, RC_STATUS, resp->status)) {
        /* The client never sees this answer: another endpoint gets the request. */
        ex->last_status = resp->status;
        ex->last_name = "upstream_error";
        ex_retry(ex, ex->last_outcome_5xx ? SL_OUTCOME_HTTP_5XX : SL_OUTCOME_SUCCESS, RC_STATUS);
        return;
    }
    if (resp->keepalive_timeout_ms)
        uc->keepalive_ms = resp->keepalive_timeout_ms;
    ex->upstream_reusable = resp->version_minor >= 1 && !(resp->flags & SL_H1_F_CONN_CLOSE) &&
                            resp->body != SL_H1_BODY_UNTIL_CLOSE;
    /* "Name:value" and bare-LF lines grow by up to two bytes each when rebuilt. */
    size_t cap = resp->head_len + 2 * resp->header_count + ops_size(&ex->route->response_headers) +
                 req->request_id.len + req->resp_extra_len + 64;
    char *p = sl_arena_alloc(&req->arena, cap);
    struct sb b = {p, 0, cap, p == NULL};
    if (!build_client_head(ex, resp, &b)) {
        ex_fail(ex, 502, "upstream_head_too_large", SL_OUTCOME_SUCCESS);
        return;
    }
    enum sl_h1_body kind = resp->body;
    if (kind == SL_H1_BODY_UNTIL_CLOSE)
        kind = SL_H1_BODY_CHUNKED; /* unknown length: the front-end frames it */
    if (sl_request_respond_head(req, resp->status, p, b.len, kind, resp->content_length) < 0) {
        ex_fail(ex, 502, "upstream_head_too_large", SL_OUTCOME_SUCCESS);
        return;
    }
    sl_buf_consume(&uc->in, resp->head_len);
    sl_h1_body_reader_init(&ex->respr, resp->body, resp->content_length);
    ex->resp_head_done = true;
    ex->state = EX_STREAMING;
    sl_upstream_conn_arm(uc, ex->up->conf->idle_timeout_ms);
}

/* Parses what the upstream sent so far. Returns false when the exchange ended. */
static bool ex_parse_response_head(struct exchange *ex, bool eof)
{
    struct sl_proxy_worker *pw = ex->pw;
    struct sl_upstream_conn *uc = ex->uc;
    for (;;) {
        if (!uc->in.data || sl_buf_len(&uc->in) == 0) {
            if (eof) {
                ex_upstream_broken(ex, -ECONNRESET);
                return false;
            }
            return true;
        }
        struct sl_h1_limits lim = {uc->in.cap, pw->resp_scratch_cap, 0};
        struct sl_h1_response resp;
        enum sl_h1_err err = SL_H1_ERR_NONE;
        enum sl_status st =
            sl_h1_parse_response(&ex->rhs, sl_buf_head(&uc->in), sl_buf_len(&uc->in), &lim,
                                 ex->req->method_bit == SL_METHOD_HEAD, &resp, pw->resp_scratch,
                                 pw->resp_scratch_cap, &err);
        if (st == SL_AGAIN) {
            if (eof) {
                ex_attempt_failed(ex, SL_OUTCOME_RESET, RC_RESET, 502, "upstream_truncated_head");
                return false;
            }
            if (sl_buf_len(&uc->in) >= uc->in.cap) {
                ex_fail(ex, 502, "upstream_head_too_large", SL_OUTCOME_SUCCESS);
                return false;
            }
            return true;
        }
        if (st == SL_ERROR) {
            SL_INFO("upstream %s endpoint %s: invalid response: %s", ex->up->conf->name,
                    ex->wep->ep->address, sl_h1_err_name(err));
            ex_attempt_failed(ex, SL_OUTCOME_RESET, RC_RESET, 502, "upstream_bad_response");
            return false;
        }
        if (resp.status < 200) {
            if (resp.status == 101) {
                ex_fail(ex, 502, "upstream_unexpected_upgrade", SL_OUTCOME_HTTP_5XX);
                return false;
            }
            /* Interim responses are ours to absorb: 100 Continue was answered by the
             * front-end already. */
            sl_buf_consume(&uc->in, resp.head_len);
            memset(&ex->rhs, 0, sizeof ex->rhs);
            continue;
        }
        ex_on_response_head(ex, &resp);
        return ex->state == EX_STREAMING;
    }
}

static void ex_pump_response(struct exchange *ex)
{
    struct sl_request *req = ex->req;
    struct sl_upstream_conn *uc = ex->uc;
    for (;;) {
        bool eof = false;
        struct sl_slice data;
        enum sl_h1_err err = SL_H1_ERR_NONE;
        enum sl_status st = sl_h1_body_reader_peek(&ex->respr, &uc->in, false, &data, &err);
        if (st == SL_AGAIN) {
            int rc = sl_upstream_conn_read(uc, &eof);
            if (rc == -EAGAIN) {
                /* Nothing more for now: make sure the client already has the head (event
                 * streams and long polls wait on it), then wait for the backend. */
                int frc = sl_request_flush(req);
                if (frc < 0 && frc != -EAGAIN)
                    return; /* the client is gone; on_abort follows */
                ex->client_blocked = frc == -EAGAIN;
                ex_update_upstream_events(ex, !ex->req_sent && !ex->req_write_failed);
                return;
            }
            if (rc < 0 && rc != -ENOBUFS) {
                ex_fail(ex, 502, "upstream_reset", SL_OUTCOME_RESET);
                return;
            }
            st = sl_h1_body_reader_peek(&ex->respr, &uc->in, eof, &data, &err);
            if (st == SL_AGAIN)
                continue;
        }
        if (st == SL_ERROR) {
            SL_INFO("upstream %s endpoint %s: invalid response body: %s", ex->up->conf->name,
                    ex->wep ? ex->wep->ep->address : "-", sl_h1_err_name(err));
            ex_fail(ex, 502, "upstream_bad_body", SL_OUTCOME_RESET);
            return;
        }
        if (st == SL_DONE) {
            ex->resp_done = true;
            if (ex->respr.kind == SL_H1_BODY_UNTIL_CLOSE)
                ex->upstream_reusable = false;
            if (!ex->req_sent) {
                /* The upstream answered before taking the whole body: the client's
                 * connection cannot be reused (unread body) and neither can the upstream's. */
                ex->upstream_reusable = false;
            }
            ex_finish(ex);
            return;
        }
        size_t wrote = 0;
        int rc = sl_request_write(req, data.ptr, data.len, &wrote);
        if (wrote)
            sl_h1_body_reader_consume(&ex->respr, &uc->in, wrote);
        if (rc == -EAGAIN) {
            /* Now the client, not the backend, holds things up: its send_timeout applies. */
            ex->client_blocked = true;
            ex_update_upstream_events(ex, false);
            sl_upstream_conn_arm(uc, ex->gl->server.limits->send_timeout_ms);
            return;
        }
        if (rc < 0)
            return; /* the client is gone; on_abort follows */
        sl_upstream_conn_arm(uc, ex->up->conf->idle_timeout_ms);
    }
}

/* ---- upstream events ---- */

static void ex_upstream_event(struct sl_upstream_conn *uc, uint32_t events, void *data)
{
    struct exchange *ex = data;
    sl_loop_charge(&ex->pw->worker->loop, &ex->req->log.cpu_ns);
    (void)uc;
    if (ex->state == EX_CONNECTING) {
        int err = (events & (EPOLLERR | EPOLLHUP)) ? sl_upstream_conn_connect_result(ex->uc) : 0;
        if ((events & (EPOLLERR | EPOLLHUP)) && err == 0)
            err = -ECONNREFUSED;
        if (err == 0 && (events & EPOLLOUT))
            err = sl_upstream_conn_connect_result(ex->uc);
        if (err < 0) {
            ex_connect_failed(ex, err);
            return;
        }
        ex->uc->state = SL_UC_BUSY;
        ex_unpend(ex); /* connected: no longer waiting for a connection */
        ex_start_send(ex);
        return;
    }
    if ((ex->state == EX_SENDING || ex->state == EX_STREAMING) && (events & EPOLLOUT) &&
        !ex->req_sent && !ex->req_write_failed) {
        ex_pump_request(ex);
        if (ex->state == EX_DONE)
            return;
    }
    if (!(events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
        return;
    while (!ex->resp_head_done) {
        bool eof = false;
        int rc = sl_upstream_conn_read(ex->uc, &eof);
        if (rc < 0 && rc != -EAGAIN && rc != -ENOBUFS) {
            ex_upstream_broken(ex, rc);
            return;
        }
        if (!ex_parse_response_head(ex, eof))
            return;
        /* Edge-triggered: stop once the socket is drained (or the buffer is full, which the
         * parser has already turned into an error). */
        if (rc != 0 || eof || !(ex->uc->io.ready & EPOLLIN))
            break;
    }
    if (ex->state == EX_STREAMING && !ex->client_blocked)
        ex_pump_response(ex);
}

static void ex_upstream_timeout(struct sl_upstream_conn *uc, void *data)
{
    struct exchange *ex = data;
    sl_loop_charge(&ex->pw->worker->loop, &ex->req->log.cpu_ns);
    (void)uc;
    if (ex->state == EX_CONNECTING) {
        ex_connect_failed(ex, -ETIMEDOUT);
        return;
    }
    /* The name says which setting ran out: a stall while the body moves in either direction
     * is timeouts.idle, waiting for the head after the whole request went out is
     * timeouts.response. A client that stopped reading is its own send_timeout (the response
     * has started, so it only ever shows in logs: the client connection is cut). */
    if (ex->client_blocked)
        ex_fail(ex, 504, "client_send_timeout", SL_OUTCOME_CANCELLED);
    else if (ex->resp_head_done)
        ex_fail(ex, 504, "upstream_idle_timeout", SL_OUTCOME_TIMEOUT);
    else if (!ex->req_sent)
        ex_attempt_failed(ex, SL_OUTCOME_TIMEOUT, RC_TIMEOUT, 504, "upstream_idle_timeout");
    else
        ex_attempt_failed(ex, SL_OUTCOME_TIMEOUT, RC_TIMEOUT, 504, "upstream_timeout");
}

/* ---- filters, routing, and the request handler ---- */

static void on_filters_done(struct sl_filter_run *run, enum sl_filter_verdict v)
{
    struct exchange *ex = run->data;
    if (v == SL_FILTER_RESPOND) {
        struct sl_request *req = ex->req;
        req->log.error = run->error;
        if (run->chain && run->pos < run->chain->count)
            req->log.filter = run->chain->items[run->pos].ops->name;
        ex_end(ex);
        sl_request_respond(
            req, run->status, run->content_type ? run->content_type : "application/json",
            run->extra_headers, run->extra_len, run->body ? run->body : "", run->body_len);
        return;
    }
    if (ex->route->has_direct_response) {
        ex_direct(ex);
        return;
    }
    ex->up = &ex->pw->upstreams[ex->route->upstream_index];
    struct sl_request *req = ex->req;
    req->log.upstream = ex->up->conf->name;
    const struct sl_upstream_conf *uconf = ex->up->conf;
    uint32_t maxr = uconf->breaker.max_requests;
    if (maxr) {
        uint32_t cur = atomic_fetch_add_explicit(&ex->up->pool->requests, 1, memory_order_relaxed);
        ex->counted_request = true;
        if (cur >= maxr) {
            atomic_fetch_add_explicit(&ex->up->pool->stats.overflow_requests, 1,
                                      memory_order_relaxed);
            ex_fail_unavailable(ex, "upstream_overloaded", 1);
            return;
        }
    }
    ex->rc = ex->route->has_retries ? &ex->route->retries : &uconf->retries;
    if (ex->rc->attempts == 0)
        ex->rc = NULL;
    else
        sl_pool_budget_request(ex->up->pool, sl_loop_now_ms(&ex->pw->worker->loop));
    struct sl_slice idem;
    ex->retryable_method = is_idempotent(req) || (ex->rc && ex->rc->non_idempotent) ||
                           sl_request_header(req, "Idempotency-Key", &idem);
    ex->body_overflow = !ex->rc || !ex->retryable_method || req->body_kind == SL_H1_BODY_NONE;
    if (!build_upstream_head(ex)) {
        ex_fail(ex, 431, "request_head_too_large", SL_OUTCOME_CANCELLED);
        return;
    }
    ex_try_endpoint(ex);
}

static void h_on_request(struct sl_request *req);

static void h_on_body(struct sl_request *req)
{
    struct exchange *ex = req->handler_state;
    if (!ex)
        return;
    /* The body keeps flowing after the response head arrived: some backends answer while
     * still reading (and would deadlock if we stopped). */
    if ((ex->state == EX_SENDING || ex->state == EX_STREAMING) && !ex->req_sent &&
        !ex->req_write_failed)
        ex_pump_request(ex);
}

static void h_on_writable(struct sl_request *req)
{
    struct exchange *ex = req->handler_state;
    if (!ex || ex->state != EX_STREAMING)
        return;
    ex->client_blocked = false;
    sl_upstream_conn_arm(ex->uc, ex->up->conf->idle_timeout_ms);
    ex_pump_response(ex);
}

static void h_on_abort(struct sl_request *req)
{
    struct exchange *ex = req->handler_state;
    if (!ex)
        return;
    if (ex->state == EX_FILTERS)
        sl_filter_run_cancel(&ex->frun);
    ex_release_upstream(ex, SL_OUTCOME_CANCELLED, false);
    ex_end(ex);
}

static const struct sl_request_handler handler_template = {
    .on_request = h_on_request,
    .on_body = h_on_body,
    .on_writable = h_on_writable,
    .on_abort = h_on_abort,
};

void sl_exchange_handler_init(struct sl_request_handler *h, struct sl_proxy_listener *gl)
{
    *h = handler_template;
    h->data = gl;
}

static void h_on_request(struct sl_request *req)
{
    struct sl_proxy_listener *gl = req->handler_ctx;
    struct exchange *ex = sl_arena_alloc(&req->arena, sizeof *ex);
    if (!ex) {
        sl_request_respond_error(req, 503, "out_of_memory");
        return;
    }
    memset(ex, 0, sizeof *ex);
    ex->req = req;
    ex->gl = gl;
    ex->pw = gl->pw;
    sl_timer_init(&ex->retry_timer, on_retry_timer, ex);
    req->handler_state = ex;
    ex->pw->inflight++;
    req->on_release = ex_on_release;
    req->release_data = ex;
    struct sl_route_input in = {
        .host = req->host_name,
        .path = req->path,
        .method = req->method,
        .method_bit = req->method_bit,
        .headers = req->headers,
        .header_count = req->header_count,
    };
    ex->route = sl_router_match(gl->router, &in);
    req->route = ex->route;
    if (ex->route)
        req->log.route = ex->route->name;
    if (!ex->route) {
        ex_end(ex);
        sl_request_respond_error(req, 404, "no_route");
        return;
    }
    ex->state = EX_FILTERS;
    const struct sl_filter_set *fs = ex->pw->filters;
    sl_filter_run_start(&ex->frun, fs ? &fs->route_chains[ex->route->index] : NULL,
                        ex->pw->filter_wstates, req, on_filters_done, ex);
}
