#include "l4/gateway.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "config/config.h"
#include "core/cidr.h"
#include "core/log.h"
#include "l4/edge.h"
#include "l4/ip_limit.h"
#include "l4/tcp_proxy.h"
#include "tls/tls_ctx.h"
#include "tls/tls_tickets.h"
#include "filters/filter_set.h"
#include "proxy/balancer.h"
#include "proxy/control.h"
#include "proxy/pool.h"
#include "proxy/router.h"

#define RESP_MAX_HEADERS 128

static size_t buffer_bytes(const struct sl_config *cfg)
{
    /* One block must hold a whole request head at the largest configured limit, plus room
     * for what the gateway adds when it forwards it. */
    size_t need = 16 * 1024;
    for (size_t i = 0; i < cfg->listener_count; i++) {
        size_t h = (size_t)cfg->listeners[i].limits.max_header_bytes + 4096;
        if (h > need)
            need = h;
    }
    return (need + 4095) & ~(size_t)4095;
}

/* Mixes one file's identity and times into `sig`: any replacement or rewrite changes it. A
 * missing file (NULL, or not there right now) adds nothing. */
static uint64_t file_signature(uint64_t sig, const char *path)
{
    struct stat st;
    if (!path || stat(path, &st) != 0)
        return sig;
    sig = sig * 1000003u + (uint64_t)st.st_ino;
    sig = sig * 1000003u + (uint64_t)st.st_size;
    sig = sig * 1000003u + (uint64_t)st.st_mtim.tv_sec * 1000000000u + (uint64_t)st.st_mtim.tv_nsec;
    return sig * 1000003u + (uint64_t)st.st_ctim.tv_nsec;
}

/* Every certificate, key and the client CA file: a listener may list thousands of pairs, and a
 * change to any of them must be seen. */
static uint64_t tls_files_signature(const struct sl_listener_tls_conf *t)
{
    uint64_t sig = 0;
    for (size_t i = 0; i < t->certificate_count; i++) {
        sig = file_signature(sig, t->certificates[i].cert);
        sig = file_signature(sig, t->certificates[i].key);
    }
    return file_signature(sig, t->client_ca);
}

/* Builds listener `l`'s TLS context. `keys` is the listener's ticket key ring: reused when
 * *keys is set (a reload keeps tickets valid), else made here; the caller owns the result. */
static struct sl_tls_ctx *build_tls(const struct sl_listener_conf *l,
                                    struct sl_tls_ticket_keys **keys_io, char *err, size_t err_len)
{
    const struct sl_listener_tls_conf *t = &l->tls;
    struct sl_tls_cert_desc *certs = calloc(t->certificate_count, sizeof *certs);
    if (!certs) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < t->certificate_count; i++) {
        certs[i].cert_file = t->certificates[i].cert;
        certs[i].key_file = t->certificates[i].key;
    }
    static const char *const http_alpn[] = {"http/1.1"};
    struct sl_tls_server_desc d = {
        .certs = certs,
        .cert_count = t->certificate_count,
        .min_version = t->min_version == SL_TLS_V1_3 ? "1.3" : "1.2",
        .ciphers = t->ciphers,
        .ciphersuites = t->ciphersuites,
        .client_ca_file = t->client_ca,
        .client_auth = !t->client_ca ? SL_TLS_CLIENT_AUTH_NONE
                       : t->client_auth == SL_TLS_CLIENT_AUTH_CONF_OPTIONAL
                           ? SL_TLS_CLIENT_AUTH_OPTIONAL
                           : SL_TLS_CLIENT_AUTH_REQUIRED,
        .session_tickets = t->session_tickets,
    };
    if (t->alpn_count) {
        d.alpn = (const char *const *)t->alpn;
        d.alpn_count = t->alpn_count;
    } else if (l->protocol == SL_LISTENER_HTTP) {
        d.alpn = http_alpn;
        d.alpn_count = 1;
    }
    char terr[512] = "";
    struct sl_tls_ctx *ctx = NULL;
    /* One ticket key ring per listener, shared by its workers: a ticket resumes on any worker
     * of this listener but never on another listener (which may verify clients differently). */
    if (t->session_tickets && !*keys_io &&
        !(*keys_io = sl_tls_ticket_keys_new(t->ticket_rotation_ms, 0, terr, sizeof terr))) {
        snprintf(err, err_len, "listener %s: tls: %s", l->name, terr);
        goto out;
    }
    d.ticket_keys = t->session_tickets ? *keys_io : NULL;
    if (!(ctx = sl_tls_ctx_new(&d, terr, sizeof terr)))
        snprintf(err, err_len, "listener %s: tls: %s", l->name, terr);
out:
    free(certs);
    return ctx;
}

/* The same listener in two configs: a reload keeps its sockets, connections and counters. */
static bool same_listener(const struct sl_listener_conf *a, const struct sl_listener_conf *b)
{
    return !strcmp(a->name, b->name) && a->protocol == b->protocol && a->addr_len == b->addr_len &&
           !memcmp(&a->addr, &b->addr, a->addr_len);
}

static bool same_ip_limits(const struct sl_protection_conf *a, const struct sl_protection_conf *b)
{
    return a->max_connections_per_ip == b->max_connections_per_ip &&
           a->new_connection_period_us == b->new_connection_period_us &&
           a->new_connections_burst == b->new_connections_burst &&
           a->tracked_addresses == b->tracked_addresses;
}

static void stats_unref(struct sl_listener_stats *st)
{
    if (st && atomic_fetch_sub_explicit(&st->refs, 1, memory_order_acq_rel) == 1)
        free(st);
}

/* Builds listener `l`'s settings for a generation. `prev` is the same listener in the
 * generation before (NULL: a new listener): its counters and, when the limits did not change,
 * its per-IP table carry over. Tables are refcounted (connections hold the one that counted
 * them, whatever generation they outlive). */
static int listener_rt_init(struct sl_listener_rt *lr, const struct sl_listener_conf *l,
                            const struct sl_listener_rt *prev, char *err, size_t err_len)
{
    const struct sl_protection_conf *pc = &l->protection;
    lr->conf = l;
    snprintf(err, err_len, "out of memory building the runtime");
    if (prev) {
        lr->stats = prev->stats;
        atomic_fetch_add_explicit(&lr->stats->refs, 1, memory_order_relaxed);
    } else {
        if (!(lr->stats = calloc(1, sizeof *lr->stats)))
            return -1;
        atomic_store(&lr->stats->refs, 1);
    }
    if (pc->allow_count && !(lr->allow = sl_cidr_set_new(pc->allow, pc->allow_count)))
        return -1;
    if (pc->deny_count && !(lr->deny = sl_cidr_set_new(pc->deny, pc->deny_count)))
        return -1;
    if (l->proxy_protocol.accept &&
        !(lr->pp_trusted =
              sl_cidr_set_new(l->proxy_protocol.trusted, l->proxy_protocol.trusted_count)))
        return -1;
    if (pc->max_connections_per_ip || pc->new_connection_period_us) {
        if (prev && prev->ip_limit && same_ip_limits(&prev->conf->protection, pc)) {
            lr->ip_limit = prev->ip_limit;
            sl_ip_limit_ref(lr->ip_limit);
        } else {
            struct sl_ip_limit_conf ic = {
                .max_conns = pc->max_connections_per_ip,
                .period_us = pc->new_connection_period_us,
                .burst = pc->new_connection_period_us ? pc->new_connections_burst : 0,
                .max_keys = pc->tracked_addresses,
            };
            int ierr = 0;
            if (!(lr->ip_limit = sl_ip_limit_new(&ic, &ierr))) {
                snprintf(err, err_len, "listener %s: protection: %s", l->name,
                         ierr == -ENOMEM ? "out of memory" : "invalid per-IP limits");
                return -1;
            }
        }
    }
    if (l->tls.enabled) {
        lr->tls_files_sig = tls_files_signature(&l->tls);
        /* A kept listener keeps its ticket keys: tickets issued before a reload resume. */
        if (prev && prev->ticket_keys && l->tls.session_tickets &&
            prev->conf->tls.ticket_rotation_ms == l->tls.ticket_rotation_ms)
            lr->ticket_keys = sl_tls_ticket_keys_ref(prev->ticket_keys);
        if (!(lr->tls = build_tls(l, &lr->ticket_keys, err, err_len)))
            return -1;
    }
    return 0;
}

static void listener_rt_dispose(struct sl_listener_rt *lr)
{
    sl_cidr_set_free(lr->allow);
    sl_cidr_set_free(lr->deny);
    sl_cidr_set_free(lr->pp_trusted);
    sl_tls_ctx_free(lr->tls);
    sl_ip_limit_free(lr->ip_limit); /* connections counted in it hold their own references */
    sl_tls_ticket_keys_free(lr->ticket_keys);
    stats_unref(lr->stats);
}

/* ---- generations ---- */

static void runtime_free(struct sl_runtime *rt)
{
    if (!rt)
        return;
    const struct sl_config *cfg = rt->cfg;
    if (rt->listen_fds && cfg) {
        size_t nfds = (size_t)rt->worker_count * cfg->listener_count;
        for (size_t i = 0; i < nfds; i++)
            if (rt->listen_fds[i] >= 0)
                close(rt->listen_fds[i]);
    }
    free(rt->listen_fds);
    if (cfg) {
        for (size_t i = 0; rt->routers && i < cfg->listener_count; i++)
            sl_router_free(rt->routers[i]);
        for (size_t i = 0; rt->pools && i < cfg->upstream_count; i++)
            sl_pool_free(rt->pools[i]);
        for (size_t i = 0; rt->listeners && i < cfg->listener_count; i++)
            listener_rt_dispose(&rt->listeners[i]);
    }
    free(rt->listeners);
    free(rt->routers);
    free(rt->pools);
    sl_filter_set_free(rt->filters);
    sl_config_free(rt->cfg);
    free(rt);
}

/* Builds a generation from `cfg` (taking it). `prev` is the running one, or NULL at start. */
static struct sl_runtime *runtime_build(struct sl_config *cfg, const struct sl_runtime *prev,
                                        unsigned workers, char *err, size_t err_len)
{
    struct sl_runtime *rt = calloc(1, sizeof *rt);
    snprintf(err, err_len, "out of memory building the runtime");
    if (!rt) {
        sl_config_free(cfg);
        return NULL;
    }
    atomic_store(&rt->refs, 1);
    rt->cfg = cfg;
    rt->generation = prev ? prev->generation + 1 : 1;
    rt->worker_count = workers;
    size_t nl = cfg->listener_count ? cfg->listener_count : 1;
    rt->routers = calloc(nl, sizeof(void *));
    rt->pools = calloc(cfg->upstream_count ? cfg->upstream_count : 1, sizeof(void *));
    rt->listeners = calloc(nl, sizeof *rt->listeners);
    if (!rt->routers || !rt->pools || !rt->listeners)
        goto fail;
    for (size_t i = 0; i < cfg->listener_count; i++) {
        const struct sl_listener_rt *old = NULL;
        for (size_t j = 0; prev && j < prev->cfg->listener_count; j++)
            if (same_listener(&prev->cfg->listeners[j], &cfg->listeners[i]))
                old = &prev->listeners[j];
        if (listener_rt_init(&rt->listeners[i], &cfg->listeners[i], old, err, err_len) != 0)
            goto fail;
    }
    for (size_t i = 0; i < cfg->listener_count; i++)
        if (!(rt->routers[i] = sl_router_new(cfg, cfg->listeners[i].name)))
            goto fail;
    for (size_t i = 0; i < cfg->upstream_count; i++) {
        if (!(rt->pools[i] = sl_pool_new(&cfg->upstreams[i], cfg->zone, workers, err, err_len)))
            goto fail;
        for (size_t j = 0; prev && j < prev->cfg->upstream_count; j++)
            if (!strcmp(prev->cfg->upstreams[j].name, cfg->upstreams[i].name))
                sl_pool_inherit(rt->pools[i], prev->pools[j], sl_clock_now_ms());
    }
    if (sl_filter_set_build(cfg, &rt->filters, err, err_len) != 0)
        goto fail;
    return rt;
fail:
    runtime_free(rt);
    return NULL;
}

struct sl_runtime *sl_gateway_runtime_acquire(struct sl_gateway *gw)
{
    pthread_mutex_lock(&gw->rt_lock);
    struct sl_runtime *rt = gw->rt;
    atomic_fetch_add_explicit(&rt->refs, 1, memory_order_relaxed);
    pthread_mutex_unlock(&gw->rt_lock);
    return rt;
}

/* The last release only marks the generation unused: it is freed on the main thread
 * (sl_gateway_collect), since freeing stops threads and closes files. */
void sl_runtime_release(struct sl_runtime *rt)
{
    if (rt)
        atomic_fetch_sub_explicit(&rt->refs, 1, memory_order_acq_rel);
}

void sl_gateway_collect(struct sl_gateway *gw)
{
    pthread_mutex_lock(&gw->rt_lock);
    struct sl_runtime **pp = &gw->retired;
    while (*pp) {
        struct sl_runtime *rt = *pp;
        if (atomic_load_explicit(&rt->refs, memory_order_acquire) == 0) {
            *pp = rt->next;
            pthread_mutex_unlock(&gw->rt_lock);
            SL_DEBUG("configuration generation %llu released", (unsigned long long)rt->generation);
            runtime_free(rt);
            pthread_mutex_lock(&gw->rt_lock);
            pp = &gw->retired;
            continue;
        }
        pp = &rt->next;
    }
    pthread_mutex_unlock(&gw->rt_lock);
}

unsigned sl_gateway_worker_count(const struct sl_gateway *gw)
{
    return gw->worker_count;
}

const struct sl_loop *sl_gateway_worker_loop(const struct sl_gateway *gw, unsigned i)
{
    return i < gw->worker_count && gw->workers ? &gw->workers[i].loop : NULL;
}

int sl_gateway_worker_cpu_ns(const struct sl_gateway *gw, unsigned i, uint64_t *ns)
{
    if (i >= gw->worker_count || !gw->workers)
        return -EINVAL;
    if (atomic_load(&gw->workers[i].exited))
        return -ESRCH;
    clockid_t cid;
    int rc = pthread_getcpuclockid(gw->workers[i].thread, &cid);
    if (rc)
        return -rc;
    struct timespec ts;
    if (clock_gettime(cid, &ts) != 0)
        return -errno;
    *ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    return 0;
}

uint32_t sl_gateway_open_connections(const struct sl_gateway *gw)
{
    return atomic_load_explicit(&gw->gate.open, memory_order_relaxed);
}

void sl_gateway_log_counters(const struct sl_gateway *gw, bool workers_exited)
{
    const struct sl_runtime *rt = gw->rt;
    const struct sl_config *cfg = rt->cfg;
    /* A worker's pool counters are its own, plain integers: read only once it has exited. */
    unsigned long long mem_refused = 0;
    for (unsigned i = 0; workers_exited && gw->workers && i < gw->worker_count; i++)
        mem_refused += gw->workers[i].buf_pool.refused;
    unsigned long long pauses = atomic_load_explicit(&gw->gate.pauses, memory_order_relaxed);
    if (mem_refused || pauses)
        SL_INFO("refused for memory (max_buffer_memory): %llu buffer requests; accepting paused "
                "at max_connections: %llu times",
                mem_refused, pauses);
    for (size_t i = 0; i < cfg->listener_count; i++) {
        struct sl_listener_stats *st = rt->listeners[i].stats;
#define C(f) ((unsigned long long)atomic_load_explicit(&st->f, memory_order_relaxed))
        unsigned long long all = C(refused_denied) + C(refused_not_allowed) + C(refused_ip_conns) +
                                 C(refused_ip_rate) + C(pp_accepted) + C(pp_refused_untrusted) +
                                 C(pp_refused_malformed) + C(pp_timeouts) + C(tls_handshakes) +
                                 C(tls_failed) + C(tls_timeouts) + C(tls_reloads) +
                                 C(tls_reload_failures);
        if (!all)
            continue;
        SL_INFO("listener %s: refused denied=%llu not_allowed=%llu ip_conns=%llu ip_rate=%llu "
                "proxy_untrusted=%llu proxy_malformed=%llu proxy_timeout=%llu tls_failed=%llu "
                "tls_timeout=%llu; accepted proxy=%llu tls=%llu tls_resumed=%llu; "
                "certificate reloads=%llu failed=%llu",
                cfg->listeners[i].name, C(refused_denied), C(refused_not_allowed),
                C(refused_ip_conns), C(refused_ip_rate), C(pp_refused_untrusted),
                C(pp_refused_malformed), C(pp_timeouts), C(tls_failed), C(tls_timeouts),
                C(pp_accepted), C(tls_handshakes), C(tls_resumed), C(tls_reloads),
                C(tls_reload_failures));
#undef C
    }
}

void sl_gateway_reload_tls(struct sl_gateway *gw, bool force)
{
    pthread_mutex_lock(&gw->reload_lock);
    struct sl_runtime *rt = gw->rt;
    const struct sl_config *cfg = rt->cfg;
    for (size_t i = 0; i < cfg->listener_count; i++) {
        struct sl_listener_rt *lr = &rt->listeners[i];
        const struct sl_listener_conf *l = &cfg->listeners[i];
        if (!lr->tls || (!force && !l->tls.watch))
            continue;
        uint64_t sig = tls_files_signature(&l->tls);
        if (!force && sig == lr->tls_files_sig)
            continue;
        /* Remembered before the attempt: a half-written pair (new certificate, old key) fails
         * once and is retried when the next file lands, not every second. */
        lr->tls_files_sig = sig;
        char terr[512];
        if (sl_tls_ctx_reload(lr->tls, terr, sizeof terr) == 0) {
            atomic_fetch_add_explicit(&lr->stats->tls_reloads, 1, memory_order_relaxed);
            SL_INFO("listener %s: certificates reloaded (generation %llu)", l->name,
                    (unsigned long long)sl_tls_ctx_generation(lr->tls));
        } else {
            atomic_fetch_add_explicit(&lr->stats->tls_reload_failures, 1, memory_order_relaxed);
            SL_ERR("listener %s: certificate reload failed, keeping the current ones: %s", l->name,
                   terr);
        }
    }
    pthread_mutex_unlock(&gw->reload_lock);
}

struct sl_gateway *sl_gateway_new(struct sl_config *cfg, char *err, size_t err_len)
{
    struct sl_gateway *gw = calloc(1, sizeof *gw);
    snprintf(err, err_len, "out of memory building the runtime");
    if (!gw) {
        sl_config_free(cfg);
        return NULL;
    }
    pthread_mutex_init(&gw->rt_lock, NULL);
    pthread_mutex_init(&gw->reload_lock, NULL);
    unsigned workers = cfg->workers ? cfg->workers : sl_cpu_count();
    gw->rt = runtime_build(cfg, NULL, workers, err, err_len);
    if (!gw->rt) {
        sl_gateway_free(gw);
        return NULL;
    }
    return gw;
}

/* ---- one worker ---- */

/* A generation's state on one worker: the upstreams' connection pools and views, the filters'
 * per-worker state, and the TCP proxies made for it. Requests keep the one they started on. */
struct sl_gw_gen {
    struct sl_runtime *rt; /* a reference */
    struct sl_proxy_worker pw;
    struct sl_tcp_proxy **tcps; /* made for this generation (by listener index); may be NULL */
    struct sl_gw_listener **tcp_owner; /* the listener each proxy reports to */
    size_t tcp_count;
    size_t listener_refs;   /* listeners whose new requests and streams use this generation */
    struct sl_gw_gen *next; /* retired list */
};

static void on_accept(struct sl_acceptor *a, int fd, const struct sockaddr *peer,
                      socklen_t peer_len)
{
    (void)peer_len;
    sl_edge_accept(a->data, fd, peer);
}

void sl_gw_listener_adopt(struct sl_gw_listener *gl, const struct sl_transport *tr, size_t size,
                          const struct sockaddr *client, const struct sockaddr *dest,
                          uint64_t cookie)
{
    if (gl->tcp) { /* protocol: tcp */
        /* The HTTP server counts its connections in the gate itself; the tunnel's are counted
         * here and released in on_tcp_conn_closed. */
        if (gl->gw->gate)
            atomic_fetch_add_explicit(&gl->gw->gate->open, 1, memory_order_relaxed);
        gl->tunnel_count++;
        sl_tcp_proxy_accept(gl->tcp, tr, size, client, dest, cookie);
        return;
    }
    sl_h1_server_adopt(&gl->http.server, tr, size, client, cookie);
}

static void on_http_conn_closed(void *data, const struct sockaddr *client, uint64_t cookie)
{
    sl_edge_release(data, client, cookie);
}

/* Requests of the generation not freed yet, or streams of it still running. */
static bool gen_active(const struct sl_gw_gen *gen)
{
    if (gen->pw.inflight)
        return true;
    for (size_t i = 0; i < gen->tcp_count; i++)
        if (gen->tcps[i] && sl_tcp_proxy_conn_count(gen->tcps[i]))
            return true;
    return false;
}

/* A generation's worker state may be freed once it is not active, no listener starts
 * requests or streams on it any more, and no endpoint-set update for it is queued. */
static bool gen_busy(const struct sl_gw_gen *gen)
{
    if (gen->listener_refs || gen_active(gen))
        return true;
    for (size_t i = 0; i < gen->pw.upstream_count; i++)
        if (sl_upstream_rt_post_pending(&gen->pw.upstreams[i]))
            return true;
    return false;
}

static bool listener_busy(const struct sl_gw_listener *gl)
{
    return gl->http.server.conn_count || gl->edge_count || gl->tunnel_count;
}

void sl_gw_worker_check_drained(struct sl_gw_worker *gw)
{
    if (gw->finishing)
        return;
    /* Retired generations and dropped listeners are freed once empty, outside the callback
     * that noticed (it may still be using them). */
    if (gw->retired || gw->removed)
        sl_defer_queue(&gw->worker->loop, &gw->reap);
    if (!gw->draining || gw->edge_count || gen_active(gw->gen))
        return;
    for (struct sl_gw_gen *g = gw->retired; g; g = g->next)
        if (gen_active(g))
            return;
    for (size_t i = 0; i < gw->listener_count; i++)
        if (listener_busy(gw->listeners[i]))
            return;
    for (struct sl_gw_listener *gl = gw->removed; gl; gl = gl->next_removed)
        if (listener_busy(gl))
            return;
    for (size_t i = 0; i < gw->gen->pw.upstream_count; i++)
        sl_upstream_rt_close_idle(&gw->gen->pw.upstreams[i]);
    sl_loop_stop(&gw->worker->loop);
}

/* tcp listeners: a connection's end releases what the accept path counted for it. */
static void on_tcp_conn_closed(void *data, const struct sockaddr *client, uint64_t cookie)
{
    struct sl_gw_listener *gl = data;
    if (gl->gw->gate)
        atomic_fetch_sub_explicit(&gl->gw->gate->open, 1, memory_order_relaxed);
    gl->tunnel_count--;
    sl_edge_release(gl, client, cookie);
    sl_gw_worker_check_drained(gl->gw);
}

static void on_tcp_drained(void *data)
{
    struct sl_gw_listener *gl = data;
    sl_gw_worker_check_drained(gl->gw);
}

static void on_server_drained(struct sl_h1_server *srv, void *data)
{
    (void)srv;
    struct sl_gw_listener *gl = data;
    sl_gw_worker_check_drained(gl->gw);
}

static void on_exchange_idle(struct sl_proxy_worker *pw)
{
    sl_gw_worker_check_drained(pw->owner);
}

static void gen_free(struct sl_gw_gen *gen)
{
    if (!gen)
        return;
    for (size_t i = 0; i < gen->tcp_count; i++)
        sl_tcp_proxy_free(gen->tcps[i]); /* before the upstreams they report to */
    free(gen->tcps);
    free(gen->tcp_owner);
    struct sl_proxy_worker *pw = &gen->pw;
    if (pw->worker)
        sl_loop_run_deferred(&pw->worker->loop);
    for (size_t i = 0; i < pw->upstream_count; i++)
        sl_upstream_rt_dispose(&pw->upstreams[i]);
    if (pw->worker)
        sl_loop_run_deferred(&pw->worker->loop);
    if (pw->filter_wstates)
        sl_filter_set_worker_fini(gen->rt->filters, pw->filter_wstates);
    free(pw->upstreams);
    free(pw->resp_scratch);
    sl_runtime_release(gen->rt);
    free(gen);
}

static struct sl_gw_gen *gen_new(struct sl_gw_worker *gw, struct sl_runtime *rt, int *err)
{
    struct sl_worker *w = gw->worker;
    const struct sl_config *cfg = rt->cfg;
    struct sl_gw_gen *gen = calloc(1, sizeof *gen);
    *err = -ENOMEM;
    if (!gen)
        return NULL;
    gen->rt = rt;
    atomic_fetch_add_explicit(&rt->refs, 1, memory_order_relaxed);
    struct sl_proxy_worker *pw = &gen->pw;
    pw->worker = w;
    pw->filters = rt->filters;
    pw->owner = gw;
    pw->on_idle = on_exchange_idle;
    pw->upstreams = calloc(cfg->upstream_count ? cfg->upstream_count : 1, sizeof *pw->upstreams);
    pw->resp_scratch_cap = RESP_MAX_HEADERS;
    pw->resp_scratch = calloc(RESP_MAX_HEADERS, sizeof *pw->resp_scratch);
    gen->tcps = calloc(cfg->listener_count ? cfg->listener_count : 1, sizeof *gen->tcps);
    gen->tcp_owner = calloc(cfg->listener_count ? cfg->listener_count : 1, sizeof *gen->tcp_owner);
    if (!pw->upstreams || !pw->resp_scratch || !gen->tcps || !gen->tcp_owner)
        goto fail;
    gen->tcp_count = cfg->listener_count;
    int frc = sl_filter_set_worker_init(rt->filters, w, &pw->filter_wstates);
    if (frc < 0) {
        *err = frc;
        goto fail;
    }
    for (size_t i = 0; i < cfg->upstream_count; i++) {
        int rc = sl_upstream_rt_init(&pw->upstreams[i], rt->pools[i], w);
        if (rc < 0) {
            *err = rc;
            goto fail;
        }
        pw->upstream_count++;
    }
    return gen;
fail:
    gen_free(gen);
    return NULL;
}

/* Points listener `gl` at generation `gen`'s listener `i`: its router, settings and worker
 * state for new requests; a tcp listener gets a TCP proxy of this generation. */
static int listener_bind(struct sl_gw_listener *gl, struct sl_gw_gen *gen, size_t i)
{
    struct sl_runtime *rt = gen->rt;
    const struct sl_config *cfg = rt->cfg;
    const struct sl_listener_conf *lc = &cfg->listeners[i];
    if (sl_h1_server_set_limits(&gl->http.server, lc->name, &lc->limits) < 0)
        return -ENOMEM;
    if (lc->protocol == SL_LISTENER_TCP) {
        struct sl_tcp_proxy *tp =
            sl_tcp_proxy_new(gl->gw->worker, lc, &cfg->upstreams[lc->upstream_index],
                             &gen->pw.upstreams[lc->upstream_index]);
        if (!tp)
            return -ENOMEM;
        struct sl_tcp_proxy_hooks th = {
            .on_close = on_tcp_conn_closed, .on_drained = on_tcp_drained, .data = gl};
        sl_tcp_proxy_set_hooks(tp, &th);
        if (gl->tcp)
            sl_tcp_proxy_drain(gl->tcp); /* its streams finish in the older generation */
        gl->tcp = tp;
        gen->tcps[i] = tp;
        gen->tcp_owner[i] = gl;
    }
    atomic_fetch_add_explicit(&rt->refs, 1, memory_order_relaxed);
    sl_runtime_release(gl->rt);
    gl->rt = rt;
    gl->lr = &rt->listeners[i];
    gl->http.router = rt->routers[i];
    gl->http.pw = &gen->pw;
    if (gl->gen)
        gl->gen->listener_refs--;
    gl->gen = gen;
    gen->listener_refs++;
    return 0;
}

/* Frees the TCP proxies that report to `gl` (all without streams once `gl` is idle), in every
 * generation of its worker, so that no drain of an older generation calls back into it. */
static void listener_forget_proxies(struct sl_gw_listener *gl)
{
    struct sl_gw_worker *gw = gl->gw;
    for (struct sl_gw_gen *g = gw->gen; g; g = g == gw->gen ? gw->retired : g->next)
        for (size_t i = 0; i < g->tcp_count; i++)
            if (g->tcp_owner[i] == gl) {
                sl_tcp_proxy_free(g->tcps[i]);
                g->tcps[i] = NULL;
                g->tcp_owner[i] = NULL;
            }
    gl->tcp = NULL;
}

static struct sl_gw_listener *listener_new(struct sl_gw_worker *gw, struct sl_gw_gen *gen, size_t i,
                                           int fd, int *err)
{
    struct sl_gateway *g = gw->g;
    const struct sl_listener_conf *lc = &gen->rt->cfg->listeners[i];
    struct sl_gw_listener *gl = calloc(1, sizeof *gl);
    *err = -ENOMEM;
    if (!gl) {
        close(fd);
        return NULL;
    }
    gl->gw = gw;
    gl->acceptor.io.fd = -1;
    sl_exchange_handler_init(&gl->http.handler, &gl->http);
    int rc =
        sl_h1_server_init(&gl->http.server, gw->worker, lc->name, &lc->limits, &gl->http.handler);
    if (rc < 0) {
        *err = rc;
        close(fd);
        free(gl);
        return NULL;
    }
    gl->http.server.on_drained = on_server_drained;
    gl->http.server.on_drained_data = gl;
    gl->http.server.gate = &g->gate;
    gl->http.server.on_conn_closed = on_http_conn_closed;
    gl->http.server.on_conn_closed_data = gl;
    gl->http.server.on_request_done = g->on_request_done;
    gl->http.server.on_request_done_data = g->on_request_done_data;
    if ((rc = listener_bind(gl, gen, i)) < 0) {
        close(fd);
    } else if ((rc = sl_acceptor_start(&gl->acceptor, &gw->worker->loop, fd, on_accept, gl)) < 0) {
        /* sl_acceptor_start closed the socket itself */
    }
    if (rc < 0) {
        *err = rc;
        listener_forget_proxies(gl);
        if (gl->gen)
            gl->gen->listener_refs--;
        sl_h1_server_dispose(&gl->http.server);
        sl_runtime_release(gl->rt);
        free(gl);
        return NULL;
    }
    gl->acceptor.gate = &g->gate;
    return gl;
}

static void listener_free(struct sl_gw_listener *gl)
{
    sl_acceptor_stop(&gl->acceptor);
    sl_h1_server_dispose(&gl->http.server);
    listener_forget_proxies(gl);
    if (gl->gen)
        gl->gen->listener_refs--;
    sl_runtime_release(gl->rt);
    free(gl);
}

/* Stops taking connections on a listener a reload dropped and lets the ones it has finish. */
static void listener_remove(struct sl_gw_worker *gw, struct sl_gw_listener *gl)
{
    gl->removed = true;
    sl_acceptor_stop(&gl->acceptor);
    sl_h1_server_drain(&gl->http.server);
    if (gl->tcp)
        sl_tcp_proxy_drain(gl->tcp);
    gl->next_removed = gw->removed;
    gw->removed = gl;
}

static void on_reap(struct sl_defer *d)
{
    struct sl_gw_worker *gw = d->data;
    /* Freeing runs deferred callbacks, which may ask for a reap again: never nested. */
    if (gw->reaping)
        return;
    gw->reaping = true;
    for (struct sl_gw_listener **pp = &gw->removed; *pp;) {
        struct sl_gw_listener *gl = *pp;
        if (listener_busy(gl)) {
            pp = &gl->next_removed;
            continue;
        }
        *pp = gl->next_removed;
        listener_free(gl);
    }
    for (struct sl_gw_gen **pp = &gw->retired; *pp;) {
        struct sl_gw_gen *gen = *pp;
        if (gen_busy(gen)) {
            pp = &gen->next;
            continue;
        }
        *pp = gen->next;
        /* No listener uses it any more: every proxy here is drained and empty. */
        gen_free(gen);
    }
    gw->reaping = false;
    /* What is left waits for requests, streams or queued updates: look again soon (an
     * update that ran does not announce itself). */
    if ((gw->retired || gw->removed) && !gw->finishing)
        sl_timer_arm(&gw->worker->loop, &gw->reap_timer, 100);
}

static void on_reap_timer(struct sl_timer *t)
{
    struct sl_gw_worker *gw = t->data;
    sl_defer_queue(&gw->worker->loop, &gw->reap);
}

static int worker_init(struct sl_worker *w, void *data)
{
    struct sl_gateway *g = data;
    struct sl_runtime *rt = g->rt;
    const struct sl_config *cfg = rt->cfg;
    struct sl_gw_worker *gw = calloc(1, sizeof *gw);
    if (!gw)
        return -ENOMEM;
    w->app = gw;
    gw->worker = w;
    gw->g = g;
    gw->gate = &g->gate;
    sl_defer_init(&gw->reap, on_reap, gw);
    sl_timer_init(&gw->reap_timer, on_reap_timer, gw);
    sl_edge_worker_init(gw);
    /* The buffer budget is split evenly: each worker refuses work past its share, with no
     * shared counter on the request path. */
    w->buf_pool.max_outstanding = g->buffer_budget / rt->worker_count / w->buf_pool.block_bytes;
    if (w->buf_pool.max_outstanding < 8)
        w->buf_pool.max_outstanding = 8;
    int rc = 0;
    if (!(gw->gen = gen_new(gw, rt, &rc)))
        return rc;
    gw->listeners = calloc(cfg->listener_count ? cfg->listener_count : 1, sizeof *gw->listeners);
    if (!gw->listeners)
        return -ENOMEM;
    for (size_t i = 0; i < cfg->listener_count; i++) {
        int *slot = &rt->listen_fds[w->id * cfg->listener_count + i];
        int fd = *slot;
        *slot = -1;
        if (!(gw->listeners[i] = listener_new(gw, gw->gen, i, fd, &rc)))
            return rc;
        gw->listener_count++;
    }
    atomic_store(&g->worker_gen[w->id], rt->generation);
    return 0;
}

/* Moves this worker to the generation the gateway published. Kept listeners are rebound
 * (their sockets and connections stay), new ones open on the sockets the main thread made,
 * dropped ones drain; the previous generation's state lives on until its requests end. */
static void worker_reload(struct sl_gw_worker *gw)
{
    struct sl_gateway *g = gw->g;
    pthread_mutex_lock(&g->rt_lock);
    struct sl_runtime *rt = g->rt;
    atomic_fetch_add_explicit(&rt->refs, 1, memory_order_relaxed);
    pthread_mutex_unlock(&g->rt_lock);
    if (rt == gw->gen->rt || rt->generation <= gw->gen->rt->generation) {
        sl_runtime_release(rt);
        return;
    }
    const struct sl_config *cfg = rt->cfg;
    struct sl_worker *w = gw->worker;
    int rc = 0;
    struct sl_gw_gen *gen = gen_new(gw, rt, &rc);
    struct sl_gw_listener **ls = calloc(cfg->listener_count ? cfg->listener_count : 1, sizeof *ls);
    if (!gen || !ls) {
        SL_ERR("worker %u: cannot take configuration generation %llu: %s; keeping %llu", w->id,
               (unsigned long long)rt->generation, strerror(-rc ? -rc : ENOMEM),
               (unsigned long long)gw->gen->rt->generation);
        gen_free(gen);
        free(ls);
        sl_runtime_release(rt);
        return;
    }
    for (size_t i = 0; i < cfg->listener_count; i++) {
        const struct sl_listener_conf *lc = &cfg->listeners[i];
        int *slot = &rt->listen_fds[w->id * cfg->listener_count + i];
        for (size_t j = 0; j < gw->listener_count; j++) {
            struct sl_gw_listener *old = gw->listeners[j];
            if (old && same_listener(old->lr->conf, lc)) {
                gw->listeners[j] = NULL;
                if (listener_bind(old, gen, i) < 0) {
                    /* It cannot stay on the old generation, which is going away. */
                    SL_ERR("worker %u: listener %s: out of memory rebinding; it stops here "
                           "until the next reload",
                           w->id, lc->name);
                    listener_remove(gw, old);
                    break;
                }
                ls[i] = old;
                break;
            }
        }
        if (!ls[i] && *slot >= 0) {
            int fd = *slot;
            *slot = -1;
            if (!(ls[i] = listener_new(gw, gen, i, fd, &rc)))
                SL_ERR("worker %u: listener %s: cannot start: %s", w->id, lc->name, strerror(-rc));
        }
    }
    for (size_t j = 0; j < gw->listener_count; j++)
        if (gw->listeners[j])
            listener_remove(gw, gw->listeners[j]);
    free(gw->listeners);
    /* Listeners that failed to start leave a hole: compact. */
    size_t n = 0;
    for (size_t i = 0; i < cfg->listener_count; i++)
        if (ls[i])
            ls[n++] = ls[i];
    gw->listeners = ls;
    gw->listener_count = n;
    /* The old generation serves its requests with the endpoint sets it has: it takes no
     * more updates, so none can arrive after it is freed. */
    for (size_t i = 0; i < gw->gen->pw.upstream_count; i++)
        sl_upstream_rt_detach(&gw->gen->pw.upstreams[i]);
    gw->gen->next = gw->retired;
    gw->retired = gw->gen;
    gw->gen = gen;
    sl_runtime_release(rt);
    atomic_store(&g->worker_gen[w->id], rt->generation);
    sl_gw_worker_check_drained(gw);
    if (gw->draining) {
        /* A drain that began before the swap: the new listeners must not accept either. */
        for (size_t i = 0; i < gw->listener_count; i++)
            sl_acceptor_stop(&gw->listeners[i]->acceptor);
    }
}

static void worker_command(struct sl_worker *w, unsigned cmds, void *data)
{
    (void)data;
    struct sl_gw_worker *gw = w->app;
    if (cmds & SL_WORKER_CMD_STOP) {
        sl_loop_stop(&w->loop);
        return;
    }
    if ((cmds & SL_WORKER_CMD_RELOAD) && !gw->draining)
        worker_reload(gw);
    if ((cmds & SL_WORKER_CMD_DRAIN) && !gw->draining) {
        gw->draining = true;
        /* A draining worker takes no more generations: nobody waits for it to. */
        atomic_store(&gw->g->worker_gen[w->id], UINT64_MAX);
        for (size_t i = 0; i < gw->listener_count; i++)
            sl_acceptor_stop(&gw->listeners[i]->acceptor);
        sl_edge_drain(gw);
        for (size_t i = 0; i < gw->listener_count; i++)
            sl_h1_server_drain(&gw->listeners[i]->http.server);
        for (size_t i = 0; i < gw->listener_count; i++)
            if (gw->listeners[i]->tcp)
                sl_tcp_proxy_drain(gw->listeners[i]->tcp);
        for (struct sl_gw_gen *gen = gw->retired; gen; gen = gen->next)
            for (size_t i = 0; i < gen->tcp_count; i++)
                if (gen->tcps[i])
                    sl_tcp_proxy_drain(gen->tcps[i]);
        sl_gw_worker_check_drained(gw);
    }
}

static void worker_fini(struct sl_worker *w, void *data)
{
    (void)data;
    struct sl_gw_worker *gw = w->app;
    if (!gw)
        return;
    gw->finishing = true;
    for (size_t i = 0; i < gw->listener_count; i++)
        sl_acceptor_stop(&gw->listeners[i]->acceptor);
    sl_edge_worker_dispose(gw);
    /* Connections first (they hold requests of every generation), then the generations. */
    for (size_t i = 0; i < gw->listener_count; i++)
        sl_h1_server_dispose(&gw->listeners[i]->http.server);
    for (struct sl_gw_listener *gl = gw->removed; gl; gl = gl->next_removed)
        sl_h1_server_dispose(&gl->http.server);
    sl_loop_run_deferred(&w->loop);
    gen_free(gw->gen);
    while (gw->retired) {
        struct sl_gw_gen *gen = gw->retired;
        gw->retired = gen->next;
        gen_free(gen);
    }
    sl_loop_run_deferred(&w->loop);
    for (size_t i = 0; i < gw->listener_count; i++) {
        sl_runtime_release(gw->listeners[i]->rt);
        free(gw->listeners[i]);
    }
    while (gw->removed) {
        struct sl_gw_listener *gl = gw->removed;
        gw->removed = gl->next_removed;
        sl_runtime_release(gl->rt);
        free(gl);
    }
    sl_defer_cancel(&w->loop, &gw->reap);
    sl_timer_cancel(&w->loop, &gw->reap_timer);
    free(gw->listeners);
    free(gw);
    w->app = NULL;
}

static const struct sl_worker_hooks hooks = {
    .init = worker_init,
    .on_command = worker_command,
    .fini = worker_fini,
};

/*
 * The connection cap: `max_connections`, or half of the descriptors the process may open
 * (each client connection may need an upstream one), after raising the soft limit to the hard
 * one. Past the cap, acceptors pause rather than fail.
 */
static uint32_t connection_cap(const struct sl_config *cfg)
{
    struct rlimit rl;
    rlim_t fds = 1024;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        if (rl.rlim_cur < rl.rlim_max) {
            struct rlimit raised = {rl.rlim_max, rl.rlim_max};
            if (setrlimit(RLIMIT_NOFILE, &raised) == 0)
                rl.rlim_cur = rl.rlim_max;
        }
        fds = rl.rlim_cur;
    }
    uint64_t auto_cap = fds > 256 ? (fds - 128) / 2 : fds / 2;
    if (auto_cap > UINT32_MAX)
        auto_cap = UINT32_MAX;
    if (cfg->max_connections) {
        if (cfg->max_connections > auto_cap)
            SL_WARN("max_connections %u is above what %llu file descriptors can serve (about "
                    "%llu client connections with their upstream ones)",
                    cfg->max_connections, (unsigned long long)fds, (unsigned long long)auto_cap);
        return cfg->max_connections;
    }
    return (uint32_t)auto_cap;
}

static in_port_t addr_port(const struct sockaddr *sa)
{
    return sa->sa_family == AF_INET6 ? ((const struct sockaddr_in6 *)sa)->sin6_port
                                     : ((const struct sockaddr_in *)sa)->sin_port;
}

/* Opens every worker's socket for the listeners of `rt` that `prev` (NULL at start) does not
 * already have. A new address is first probed without SO_REUSEPORT, so that another process
 * listening there is an error rather than a silent split of its traffic. */
static int open_listen_fds(struct sl_runtime *rt, const struct sl_runtime *prev, char *err,
                           size_t err_len)
{
    const struct sl_config *cfg = rt->cfg;
    unsigned n = rt->worker_count;
    size_t nfds = (size_t)n * cfg->listener_count;
    rt->listen_fds = malloc((nfds ? nfds : 1) * sizeof(int));
    if (!rt->listen_fds) {
        snprintf(err, err_len, "out of memory");
        return -ENOMEM;
    }
    for (size_t i = 0; i < nfds; i++)
        rt->listen_fds[i] = -1;
    for (size_t i = 0; i < cfg->listener_count; i++) {
        const struct sl_listener_conf *l = &cfg->listeners[i];
        bool kept = false, ours = false;
        for (size_t j = 0; prev && j < prev->cfg->listener_count; j++) {
            const struct sl_listener_conf *o = &prev->cfg->listeners[j];
            kept = kept || same_listener(o, l);
            ours = ours || (o->addr_len == l->addr_len && !memcmp(&o->addr, &l->addr, l->addr_len));
        }
        if (kept)
            continue;
        const struct sockaddr *sa = (const struct sockaddr *)&l->addr;
        int rc = addr_port(sa) && !ours ? sl_listen_probe(sa, l->addr_len) : 0;
        for (unsigned w = 0; rc == 0 && w < n; w++) {
            int fd = sl_listen_socket(sa, l->addr_len, l->backlog);
            if (fd < 0)
                rc = fd;
            else
                rt->listen_fds[w * cfg->listener_count + i] = fd;
        }
        if (rc < 0) {
            snprintf(err, err_len, "listener %s: cannot listen on %s: %s", l->name, l->address,
                     strerror(-rc));
            return rc;
        }
    }
    return 0;
}

int sl_gateway_start(struct sl_gateway *gw)
{
    struct sl_runtime *rt = gw->rt;
    const struct sl_config *cfg = rt->cfg;
    gw->gate.max = connection_cap(cfg);
    gw->buffer_budget = cfg->max_buffer_memory;
    if (!gw->buffer_budget) {
        long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
        gw->buffer_budget =
            pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page / 2 : (uint64_t)1 << 30;
    }
    unsigned n = rt->worker_count;
    char lerr[512];
    /* Sockets are opened here, before any thread starts, so that a bad address fails start-up
     * with a clear message and nothing half-running. */
    int rc = open_listen_fds(rt, NULL, lerr, sizeof lerr);
    if (rc < 0) {
        SL_ERR("%s", lerr);
        return rc;
    }
    gw->worker_gen = calloc(n, sizeof *gw->worker_gen);
    if (!gw->worker_gen)
        return -ENOMEM;
    gw->block_bytes = buffer_bytes(cfg);
    int err = 0;
    gw->workers = sl_workers_start(n, gw->block_bytes, &hooks, gw, &err);
    if (!gw->workers) {
        SL_ERR("cannot start workers: %s", strerror(-err));
        return err;
    }
    gw->worker_count = n;
    char cerr[256];
    gw->control = sl_control_start(cfg, rt->pools, cerr, sizeof cerr);
    if (!gw->control && cerr[0]) {
        SL_ERR("%s", cerr);
        return -ENOMEM;
    }
    for (size_t i = 0; i < cfg->listener_count; i++)
        SL_INFO("listener %s on %s", cfg->listeners[i].name, cfg->listeners[i].address);
    SL_INFO("%u worker%s running, at most %u client connections", n, n == 1 ? "" : "s",
            gw->gate.max);
    return 0;
}

/* Settings a running process cannot change: named so the operator knows to restart. */
static void warn_fixed(const struct sl_config *old, const struct sl_config *cfg)
{
    if (old->workers != cfg->workers)
        SL_WARN("reload: `workers` changes at the next restart");
    if (old->max_connections != cfg->max_connections)
        SL_WARN("reload: `max_connections` changes at the next restart");
    if (old->max_buffer_memory != cfg->max_buffer_memory)
        SL_WARN("reload: `max_buffer_memory` changes at the next restart");
    for (size_t i = 0; i < cfg->listener_count; i++)
        for (size_t j = 0; j < old->listener_count; j++)
            if (same_listener(&old->listeners[j], &cfg->listeners[i]) &&
                old->listeners[j].backlog != cfg->listeners[i].backlog)
                SL_WARN("reload: listener %s: `backlog` changes at the next restart",
                        cfg->listeners[i].name);
}

int sl_gateway_reload(struct sl_gateway *gw, struct sl_config *cfg, char *err, size_t err_len)
{
    pthread_mutex_lock(&gw->reload_lock);
    struct sl_runtime *old = gw->rt;
    warn_fixed(old->cfg, cfg);
    if (buffer_bytes(cfg) > gw->block_bytes) {
        /* Buffers are sized at start for the largest head any listener allows. */
        snprintf(err, err_len,
                 "a listener's limits.max_header_bytes needs buffers of %zu bytes; this process "
                 "has %zu: raising it needs a restart",
                 buffer_bytes(cfg), gw->block_bytes);
        sl_config_free(cfg);
        pthread_mutex_unlock(&gw->reload_lock);
        return -1;
    }
    struct sl_runtime *rt = runtime_build(cfg, old, gw->worker_count, err, err_len);
    int rc = -1;
    if (!rt)
        goto out;
    if (open_listen_fds(rt, old, err, err_len) < 0)
        goto fail;
    char cerr[256] = "";
    struct sl_control *control = sl_control_start(rt->cfg, rt->pools, cerr, sizeof cerr);
    if (!control && cerr[0]) {
        snprintf(err, err_len, "%s", cerr);
        goto fail;
    }
    pthread_mutex_lock(&gw->rt_lock);
    gw->rt = rt; /* the gateway's reference moves to the new generation */
    old->next = gw->retired;
    gw->retired = old;
    pthread_mutex_unlock(&gw->rt_lock);
    for (unsigned i = 0; i < gw->worker_count; i++)
        sl_worker_post(&gw->workers[i], SL_WORKER_CMD_RELOAD);
    /* Wait until every running worker took it, so that the old health checks stop only when
     * no new request can pick from the old pools. Bounded: a worker busy for seconds is
     * already failing its requests. */
    uint64_t deadline = sl_clock_now_ms() + 5000;
    for (;;) {
        bool all = true;
        for (unsigned i = 0; i < gw->worker_count; i++)
            if (!atomic_load(&gw->workers[i].exited) &&
                atomic_load(&gw->worker_gen[i]) < rt->generation)
                all = false;
        if (all || sl_clock_now_ms() >= deadline)
            break;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    sl_control_stop(gw->control);
    gw->control = control;
    /* Certificates that changed came in with the configuration: counted like a reload of
     * the certificates alone. */
    for (size_t i = 0; i < rt->cfg->listener_count; i++)
        for (size_t j = 0; rt->listeners[i].tls && j < old->cfg->listener_count; j++)
            if (old->listeners[j].tls &&
                same_listener(&old->cfg->listeners[j], &rt->cfg->listeners[i]) &&
                old->listeners[j].tls_files_sig != rt->listeners[i].tls_files_sig) {
                atomic_fetch_add_explicit(&rt->listeners[i].stats->tls_reloads, 1,
                                          memory_order_relaxed);
                SL_INFO("listener %s: certificates reloaded with the configuration",
                        rt->cfg->listeners[i].name);
            }
    sl_runtime_release(old); /* the gateway's reference */
    rc = 0;
    SL_INFO("configuration generation %llu is live (%zu listeners, %zu routes, %zu upstreams)",
            (unsigned long long)rt->generation, rt->cfg->listener_count, rt->cfg->route_count,
            rt->cfg->upstream_count);
    goto out;
fail:
    runtime_free(rt);
out:
    pthread_mutex_unlock(&gw->reload_lock);
    sl_gateway_collect(gw);
    return rc;
}

void sl_gateway_drain(struct sl_gateway *gw)
{
    for (unsigned i = 0; i < gw->worker_count; i++)
        sl_worker_post(&gw->workers[i], SL_WORKER_CMD_DRAIN);
}

bool sl_gateway_wait(struct sl_gateway *gw, uint64_t deadline_ms)
{
    return sl_workers_wait(gw->workers, gw->worker_count, deadline_ms);
}

void sl_gateway_free(struct sl_gateway *gw)
{
    if (!gw)
        return;
    sl_control_stop(gw->control);
    gw->control = NULL;
    if (gw->workers) {
        for (unsigned i = 0; i < gw->worker_count; i++)
            sl_worker_post(&gw->workers[i], SL_WORKER_CMD_STOP);
        sl_workers_free(gw->workers, gw->worker_count);
        gw->workers = NULL;
    }
    runtime_free(gw->rt);
    while (gw->retired) {
        struct sl_runtime *rt = gw->retired;
        gw->retired = rt->next;
        runtime_free(rt);
    }
    free(gw->worker_gen);
    pthread_mutex_destroy(&gw->rt_lock);
    pthread_mutex_destroy(&gw->reload_lock);
    free(gw);
}
