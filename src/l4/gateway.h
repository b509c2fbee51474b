#ifndef SL_L4_GATEWAY_H
#define SL_L4_GATEWAY_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/slab.h"
#include "core/worker.h"
#include "http/h1_server.h"
#include "http/request.h"
#include "proxy/proxy_worker.h"
#include "proxy/upstream.h"

struct sl_config;
struct sl_router;
struct sl_pool;
struct sl_control;
struct sl_cidr_set;
struct sl_filter_set;
struct sl_tcp_proxy;
struct sl_ip_limit;
struct sl_tls_ctx;
struct sl_listener_conf;

/*
 * The running gateway: the immutable runtime built from one config snapshot (routers per
 * listener, balancer tables per upstream), and per-worker state (listening sockets, HTTP
 * front-ends, upstream pools). Workers read the snapshot without locks.
 */
/* Per listener, process-wide: who may connect, and the counts of who was turned away. */
struct sl_listener_rt {
    const struct sl_listener_conf *conf;
    struct sl_cidr_set *allow;            /* NULL = everyone */
    struct sl_cidr_set *deny;             /* NULL = no one */
    struct sl_cidr_set *pp_trusted;       /* PROXY headers accepted from these; NULL = off */
    struct sl_ip_limit *ip_limit;         /* per-IP cap and rate; NULL = none */
    struct sl_tls_ctx *tls;               /* NULL = plain */
    uint64_t tls_files_sig;               /* stat() signature of the certificate files, for watch */
    _Atomic uint64_t refused_denied;      /* address in `deny` */
    _Atomic uint64_t refused_not_allowed; /* `allow` set and the address not in it */
    _Atomic uint64_t refused_ip_conns;    /* max_connections_per_ip reached */
    _Atomic uint64_t refused_ip_rate;     /* new_connections_per_ip exceeded */
    _Atomic uint64_t pp_accepted;         /* PROXY headers taken from trusted senders */
    _Atomic uint64_t pp_refused_untrusted; /* a PROXY header from an untrusted address */
    _Atomic uint64_t pp_refused_malformed; /* invalid header, or none from a trusted sender */
    _Atomic uint64_t pp_timeouts;          /* no complete header within the timeout */
    _Atomic uint64_t tls_handshakes;       /* completed */
    _Atomic uint64_t tls_resumed;          /* completed by resuming a session (ticket) */
    _Atomic uint64_t tls_failed;           /* protocol or verification failures */
    _Atomic uint64_t tls_timeouts;         /* no handshake within the timeout */
    _Atomic uint64_t tls_reloads;          /* certificate reloads that took */
    _Atomic uint64_t tls_reload_failures;  /* reloads refused (old certificates kept) */
};

struct sl_runtime {
    struct sl_config *cfg;            /* owned */
    struct sl_router **routers;       /* per listener */
    struct sl_listener_rt *listeners; /* per listener */
    struct sl_pool **pools;           /* per upstream: endpoints and their health */
    unsigned worker_count;
    struct sl_filter_set *filters; /* instances and per-route chains */
};

struct sl_gw_worker;

struct sl_gw_listener {
    struct sl_acceptor acceptor;
    struct sl_proxy_listener http; /* HTTP listeners: the request path */
    struct sl_tcp_proxy *tcp;      /* protocol: tcp listeners: the forwarding, else NULL */
    struct sl_gw_worker *gw;
    size_t index;
    bool drained;
};

struct sl_edge_conn;

struct sl_gw_worker {
    struct sl_worker *worker;
    const struct sl_runtime *rt;
    struct sl_conn_gate *gate;
    struct sl_proxy_worker pw; /* upstreams, filters, scratch */
    struct sl_gw_listener *listeners;
    size_t listener_count;
    struct sl_slab edge_slab;        /* pending connections (l4/edge.c) */
    struct sl_edge_conn *edge_conns; /* every pending connection */
    size_t edge_count;
    bool draining;
};

struct sl_gateway {
    struct sl_runtime rt;
    struct sl_worker *workers;
    unsigned worker_count;
    int *listen_fds;            /* [worker][listener], handed to workers at start */
    struct sl_control *control; /* health checks and discovery thread, or NULL */
    struct sl_conn_gate gate;   /* max_connections across every worker and listener */
    uint64_t buffer_budget;     /* max_buffer_memory, resolved */
};

/* Builds the runtime from `cfg` (taking ownership, also on failure). NULL with a message in
 * `err` when a filter cannot be built or memory runs out. */
struct sl_gateway *sl_gateway_new(struct sl_config *cfg, char *err, size_t err_len);

/* Opens listening sockets and starts the workers. Returns 0 or -errno; on failure a message
 * naming the listener has been logged. */
int sl_gateway_start(struct sl_gateway *gw);

/* Asks every worker to drain: stop accepting, finish in-flight requests, then exit. */
void sl_gateway_drain(struct sl_gateway *gw);

/* Waits until every worker exited or `deadline_ms` passed; true when all exited. */
bool sl_gateway_wait(struct sl_gateway *gw, uint64_t deadline_ms);

/* Forces every worker to exit now (after a drain timed out), joins them, frees everything. */
void sl_gateway_free(struct sl_gateway *gw);

/*
 * Hands a connection that passed the accept path to its listener's protocol: HTTP or the TCP
 * proxy. The transport's storage (`size` bytes) moves; the caller's copy is dead afterwards.
 * `client` is the client's address, `dest` the address it connected to (NULL: unknown);
 * `cookie` (SL_EDGE_COOKIE_*) goes back to sl_edge_release when the connection closes.
 */
void sl_gw_listener_adopt(struct sl_gw_listener *gl, const struct sl_transport *tr, size_t size,
                          const struct sockaddr *client, const struct sockaddr *dest,
                          uint64_t cookie);

/* Re-reads the certificates of TLS listeners whose files changed (`force`: all of them) and
 * swaps them in for new connections. Called from the main thread (SIGHUP, periodic check). */
void sl_gateway_reload_tls(struct sl_gateway *gw, bool force);

/* Logs each listener's accept-path counters (refusals by reason, TLS and PROXY totals), one
 * line per listener that saw any, and the process-wide refusals (memory budget, connection
 * cap); at exit, until metrics expose them. Memory refusals are read only when
 * `workers_exited`. */
void sl_gateway_log_counters(const struct sl_gateway *gw, bool workers_exited);

/* Stops a draining worker's loop once it has nothing left (no connection, no exchange). */
void sl_gw_worker_check_drained(struct sl_gw_worker *gw);

#endif
