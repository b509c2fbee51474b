#include "l4/gateway.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
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

static struct sl_tls_ctx *build_tls(const struct sl_listener_conf *l, char *err, size_t err_len)
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
    struct sl_tls_ticket_keys *keys = NULL;
    struct sl_tls_ctx *ctx = NULL;
    /* One ticket key ring per listener, shared by its workers: a ticket resumes on any worker
     * of this listener but never on another listener (which may verify clients differently). */
    if (t->session_tickets &&
        !(keys = sl_tls_ticket_keys_new(t->ticket_rotation_ms, 0, terr, sizeof terr))) {
        snprintf(err, err_len, "listener %s: tls: %s", l->name, terr);
        goto out;
    }
    d.ticket_keys = keys;
    if (!(ctx = sl_tls_ctx_new(&d, terr, sizeof terr)))
        snprintf(err, err_len, "listener %s: tls: %s", l->name, terr);
out:
    sl_tls_ticket_keys_free(keys); /* the context keeps its own reference */
    free(certs);
    return ctx;
}

static int listener_rt_init(struct sl_listener_rt *lr, const struct sl_listener_conf *l, char *err,
                            size_t err_len)
{
    const struct sl_protection_conf *pc = &l->protection;
    lr->conf = l;
    snprintf(err, err_len, "out of memory building the runtime");
    if (pc->allow_count && !(lr->allow = sl_cidr_set_new(pc->allow, pc->allow_count)))
        return -1;
    if (pc->deny_count && !(lr->deny = sl_cidr_set_new(pc->deny, pc->deny_count)))
        return -1;
    if (l->proxy_protocol.accept &&
        !(lr->pp_trusted =
              sl_cidr_set_new(l->proxy_protocol.trusted, l->proxy_protocol.trusted_count)))
        return -1;
    if (pc->max_connections_per_ip || pc->new_connection_period_us) {
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
    if (l->tls.enabled) {
        lr->tls_files_sig = tls_files_signature(&l->tls);
        if (!(lr->tls = build_tls(l, err, err_len)))
            return -1;
    }
    return 0;
}

static void listener_rt_dispose(struct sl_listener_rt *lr)
{
    sl_cidr_set_free(lr->allow);
    sl_cidr_set_free(lr->deny);
    sl_cidr_set_free(lr->pp_trusted);
    sl_ip_limit_free(lr->ip_limit);
    sl_tls_ctx_free(lr->tls);
}

void sl_gateway_log_counters(const struct sl_gateway *gw, bool workers_exited)
{
    const struct sl_config *cfg = gw->rt.cfg;
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
        struct sl_listener_rt *lr = &gw->rt.listeners[i];
#define C(f) ((unsigned long long)atomic_load_explicit(&lr->f, memory_order_relaxed))
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
    const struct sl_config *cfg = gw->rt.cfg;
    for (size_t i = 0; i < cfg->listener_count; i++) {
        struct sl_listener_rt *lr = &gw->rt.listeners[i];
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
            atomic_fetch_add_explicit(&lr->tls_reloads, 1, memory_order_relaxed);
            SL_INFO("listener %s: certificates reloaded (generation %llu)", l->name,
                    (unsigned long long)sl_tls_ctx_generation(lr->tls));
        } else {
            atomic_fetch_add_explicit(&lr->tls_reload_failures, 1, memory_order_relaxed);
            SL_ERR("listener %s: certificate reload failed, keeping the current ones: %s", l->name,
                   terr);
        }
    }
}

struct sl_gateway *sl_gateway_new(struct sl_config *cfg, char *err, size_t err_len)
{
    struct sl_gateway *gw = calloc(1, sizeof *gw);
    snprintf(err, err_len, "out of memory building the runtime");
    if (!gw) {
        sl_config_free(cfg);
        return NULL;
    }
    gw->rt.cfg = cfg;
    gw->rt.routers = calloc(cfg->listener_count ? cfg->listener_count : 1, sizeof(void *));
    gw->rt.pools = calloc(cfg->upstream_count ? cfg->upstream_count : 1, sizeof(void *));
    gw->rt.listeners =
        calloc(cfg->listener_count ? cfg->listener_count : 1, sizeof *gw->rt.listeners);
    if (!gw->rt.listeners)
        goto fail;
    for (size_t i = 0; i < cfg->listener_count; i++)
        if (listener_rt_init(&gw->rt.listeners[i], &cfg->listeners[i], err, err_len) != 0)
            goto fail;
    gw->rt.worker_count = cfg->workers ? cfg->workers : sl_cpu_count();
    if (!gw->rt.routers || !gw->rt.pools)
        goto fail;
    for (size_t i = 0; i < cfg->listener_count; i++)
        if (!(gw->rt.routers[i] = sl_router_new(cfg, cfg->listeners[i].name)))
            goto fail;
    for (size_t i = 0; i < cfg->upstream_count; i++)
        if (!(gw->rt.pools[i] =
                  sl_pool_new(&cfg->upstreams[i], cfg->zone, gw->rt.worker_count, err, err_len)))
            goto fail;
    if (sl_filter_set_build(cfg, &gw->rt.filters, err, err_len) != 0)
        goto fail;
    return gw;
fail:
    gw->workers = NULL;
    sl_gateway_free(gw);
    return NULL;
}

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
        sl_tcp_proxy_accept(gl->tcp, tr, size, client, dest, cookie);
        return;
    }
    sl_h1_server_adopt(&gl->http.server, tr, size, client, cookie);
}

static void on_http_conn_closed(void *data, const struct sockaddr *client, uint64_t cookie)
{
    sl_edge_release(data, client, cookie);
}

void sl_gw_worker_check_drained(struct sl_gw_worker *gw)
{
    if (!gw->draining || gw->pw.inflight || gw->edge_count)
        return;
    for (size_t i = 0; i < gw->listener_count; i++)
        if (gw->listeners[i].http.server.conn_count ||
            (gw->listeners[i].tcp && sl_tcp_proxy_conn_count(gw->listeners[i].tcp)))
            return;
    for (size_t i = 0; i < gw->pw.upstream_count; i++)
        sl_upstream_rt_close_idle(&gw->pw.upstreams[i]);
    sl_loop_stop(&gw->worker->loop);
}

/* tcp listeners: a connection's end releases what the accept path counted for it. */
static void on_tcp_conn_closed(void *data, const struct sockaddr *client, uint64_t cookie)
{
    struct sl_gw_listener *gl = data;
    if (gl->gw->gate)
        atomic_fetch_sub_explicit(&gl->gw->gate->open, 1, memory_order_relaxed);
    sl_edge_release(gl, client, cookie);
}

static void on_tcp_drained(void *data)
{
    struct sl_gw_listener *gl = data;
    sl_gw_worker_check_drained(gl->gw);
}

static void on_server_drained(struct sl_h1_server *srv, void *data)
{
    (void)srv;
    sl_gw_worker_check_drained(data);
}

static void on_exchange_idle(struct sl_proxy_worker *pw)
{
    sl_gw_worker_check_drained(pw->owner);
}

static int worker_init(struct sl_worker *w, void *data)
{
    struct sl_gateway *g = data;
    const struct sl_config *cfg = g->rt.cfg;
    struct sl_gw_worker *gw = calloc(1, sizeof *gw);
    if (!gw)
        return -ENOMEM;
    w->app = gw;
    gw->worker = w;
    gw->rt = &g->rt;
    gw->gate = &g->gate;
    sl_edge_worker_init(gw);
    /* The buffer budget is split evenly: each worker refuses work past its share, with no
     * shared counter on the request path. */
    w->buf_pool.max_outstanding = g->buffer_budget / g->rt.worker_count / w->buf_pool.block_bytes;
    if (w->buf_pool.max_outstanding < 8)
        w->buf_pool.max_outstanding = 8;
    struct sl_proxy_worker *pw = &gw->pw;
    pw->worker = w;
    pw->filters = g->rt.filters;
    pw->owner = gw;
    pw->on_idle = on_exchange_idle;
    gw->listeners = calloc(cfg->listener_count, sizeof *gw->listeners);
    pw->upstreams = calloc(cfg->upstream_count ? cfg->upstream_count : 1, sizeof *pw->upstreams);
    pw->resp_scratch_cap = RESP_MAX_HEADERS;
    pw->resp_scratch = calloc(RESP_MAX_HEADERS, sizeof *pw->resp_scratch);
    if (!gw->listeners || !pw->upstreams || !pw->resp_scratch)
        return -ENOMEM;
    int frc = sl_filter_set_worker_init(g->rt.filters, w, &pw->filter_wstates);
    if (frc < 0)
        return frc;
    for (size_t i = 0; i < cfg->upstream_count; i++) {
        int rc = sl_upstream_rt_init(&pw->upstreams[i], g->rt.pools[i], w);
        if (rc < 0)
            return rc;
        pw->upstream_count++;
    }
    for (size_t i = 0; i < cfg->listener_count; i++) {
        struct sl_gw_listener *gl = &gw->listeners[i];
        gl->gw = gw;
        gl->index = i;
        gl->http.router = g->rt.routers[i];
        gl->http.pw = pw;
        gl->acceptor.io.fd = -1;
        sl_exchange_handler_init(&gl->http.handler, &gl->http);
        int rc = sl_h1_server_init(&gl->http.server, w, cfg->listeners[i].name,
                                   &cfg->listeners[i].limits, &gl->http.handler);
        if (rc < 0)
            return rc;
        gw->listener_count++;
        gl->http.server.on_drained = on_server_drained;
        gl->http.server.on_drained_data = gw;
        gl->http.server.gate = &g->gate;
        gl->http.server.on_conn_closed = on_http_conn_closed;
        gl->http.server.on_conn_closed_data = gl;
        const struct sl_listener_conf *lc = &cfg->listeners[i];
        if (lc->protocol == SL_LISTENER_TCP) {
            gl->tcp = sl_tcp_proxy_new(w, lc, &cfg->upstreams[lc->upstream_index],
                                       &pw->upstreams[lc->upstream_index]);
            if (!gl->tcp)
                return -ENOMEM;
            struct sl_tcp_proxy_hooks th = {
                .on_close = on_tcp_conn_closed, .on_drained = on_tcp_drained, .data = gl};
            sl_tcp_proxy_set_hooks(gl->tcp, &th);
        }
        int fd = g->listen_fds[w->id * cfg->listener_count + i];
        g->listen_fds[w->id * cfg->listener_count + i] = -1;
        rc = sl_acceptor_start(&gl->acceptor, &w->loop, fd, on_accept, gl);
        if (rc < 0)
            return rc;
        gl->acceptor.gate = &g->gate;
    }
    return 0;
}

static void worker_command(struct sl_worker *w, unsigned cmds, void *data)
{
    (void)data;
    struct sl_gw_worker *gw = w->app;
    if (cmds & SL_WORKER_CMD_STOP) {
        sl_loop_stop(&w->loop);
        return;
    }
    if ((cmds & SL_WORKER_CMD_DRAIN) && !gw->draining) {
        gw->draining = true;
        for (size_t i = 0; i < gw->listener_count; i++)
            sl_acceptor_stop(&gw->listeners[i].acceptor);
        sl_edge_drain(gw);
        for (size_t i = 0; i < gw->listener_count; i++)
            sl_h1_server_drain(&gw->listeners[i].http.server);
        for (size_t i = 0; i < gw->listener_count; i++)
            if (gw->listeners[i].tcp)
                sl_tcp_proxy_drain(gw->listeners[i].tcp);
        sl_gw_worker_check_drained(gw);
    }
}

static void worker_fini(struct sl_worker *w, void *data)
{
    (void)data;
    struct sl_gw_worker *gw = w->app;
    if (!gw)
        return;
    for (size_t i = 0; i < gw->listener_count; i++)
        sl_acceptor_stop(&gw->listeners[i].acceptor);
    sl_edge_worker_dispose(gw);
    for (size_t i = 0; i < gw->listener_count; i++) {
        sl_h1_server_dispose(&gw->listeners[i].http.server);
        sl_tcp_proxy_free(gw->listeners[i].tcp); /* before the upstreams it reports to */
        gw->listeners[i].tcp = NULL;
    }
    sl_loop_run_deferred(&w->loop);
    for (size_t i = 0; i < gw->pw.upstream_count; i++)
        sl_upstream_rt_dispose(&gw->pw.upstreams[i]);
    sl_loop_run_deferred(&w->loop);
    if (gw->pw.filter_wstates)
        sl_filter_set_worker_fini(gw->rt->filters, gw->pw.filter_wstates);
    sl_loop_run_deferred(&w->loop);
    free(gw->listeners);
    free(gw->pw.upstreams);
    free(gw->pw.resp_scratch);
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

int sl_gateway_start(struct sl_gateway *gw)
{
    const struct sl_config *cfg = gw->rt.cfg;
    gw->gate.max = connection_cap(cfg);
    gw->buffer_budget = cfg->max_buffer_memory;
    if (!gw->buffer_budget) {
        long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
        gw->buffer_budget =
            pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page / 2 : (uint64_t)1 << 30;
    }
    unsigned n = gw->rt.worker_count;
    size_t nfds = (size_t)n * cfg->listener_count;
    gw->listen_fds = malloc((nfds ? nfds : 1) * sizeof(int));
    if (!gw->listen_fds)
        return -ENOMEM;
    for (size_t i = 0; i < nfds; i++)
        gw->listen_fds[i] = -1;
    /* Sockets are opened here, before any thread starts, so that a bad address fails start-up
     * with a clear message and nothing half-running. */
    for (size_t i = 0; i < cfg->listener_count; i++) {
        const struct sl_listener_conf *l = &cfg->listeners[i];
        const struct sockaddr *sa = (const struct sockaddr *)&l->addr;
        in_port_t port = sa->sa_family == AF_INET6 ? ((const struct sockaddr_in6 *)sa)->sin6_port
                                                   : ((const struct sockaddr_in *)sa)->sin_port;
        int rc = port ? sl_listen_probe(sa, l->addr_len) : 0;
        if (rc < 0) {
            SL_ERR("listener %s: cannot listen on %s: %s", l->name, l->address, strerror(-rc));
            return rc;
        }
    }
    for (unsigned w = 0; w < n; w++) {
        for (size_t i = 0; i < cfg->listener_count; i++) {
            const struct sl_listener_conf *l = &cfg->listeners[i];
            int fd = sl_listen_socket((const struct sockaddr *)&l->addr, l->addr_len, l->backlog);
            if (fd < 0) {
                SL_ERR("listener %s: cannot listen on %s: %s", l->name, l->address, strerror(-fd));
                return fd;
            }
            gw->listen_fds[w * cfg->listener_count + i] = fd;
        }
    }
    int err = 0;
    gw->workers = sl_workers_start(n, buffer_bytes(cfg), &hooks, gw, &err);
    if (!gw->workers) {
        SL_ERR("cannot start workers: %s", strerror(-err));
        return err;
    }
    gw->worker_count = n;
    char cerr[256];
    gw->control = sl_control_start(cfg, gw->rt.pools, cerr, sizeof cerr);
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
    }
    const struct sl_config *cfg = gw->rt.cfg;
    if (gw->listen_fds && cfg) {
        size_t nfds = (size_t)gw->rt.worker_count * cfg->listener_count;
        for (size_t i = 0; i < nfds; i++)
            if (gw->listen_fds[i] >= 0)
                close(gw->listen_fds[i]);
    }
    free(gw->listen_fds);
    if (cfg) {
        for (size_t i = 0; gw->rt.routers && i < cfg->listener_count; i++)
            sl_router_free(gw->rt.routers[i]);
        for (size_t i = 0; gw->rt.pools && i < cfg->upstream_count; i++)
            sl_pool_free(gw->rt.pools[i]);
    }
    for (size_t i = 0; cfg && gw->rt.listeners && i < cfg->listener_count; i++)
        listener_rt_dispose(&gw->rt.listeners[i]);
    free(gw->rt.listeners);
    free(gw->rt.routers);
    free(gw->rt.pools);
    sl_filter_set_free(gw->rt.filters);
    sl_config_free(gw->rt.cfg);
    free(gw);
}
