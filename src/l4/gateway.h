#ifndef SL_L4_GATEWAY_H
#define SL_L4_GATEWAY_H

#include <pthread.h>
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
struct sl_tls_ticket_keys;
struct sl_listener_conf;

/*
 * The running gateway: the immutable runtime built from one config snapshot (routers per
 * listener, balancer tables per upstream), and per-worker state (listening sockets, HTTP
 * front-ends, upstream pools). Workers read the snapshot without locks.
 */
/* Per listener, process-wide counters. They outlive config generations: a listener kept by a
 * reload (same name, address and protocol) keeps its counters. Relaxed atomics. */
struct sl_listener_stats {
    _Atomic uint32_t refs;
    _Atomic uint64_t accepted;             /* connections that passed the accept path */
    _Atomic uint64_t refused_denied;       /* address in `deny` */
    _Atomic uint64_t refused_not_allowed;  /* `allow` set and the address not in it */
    _Atomic uint64_t refused_ip_conns;     /* max_connections_per_ip reached */
    _Atomic uint64_t refused_ip_rate;      /* new_connections_per_ip exceeded */
    _Atomic uint64_t pp_accepted;          /* PROXY headers taken from trusted senders */
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

/* Per listener of one config generation: who may connect, its TLS context, its counters. */
struct sl_listener_rt {
    const struct sl_listener_conf *conf;
    struct sl_cidr_set *allow;              /* NULL = everyone */
    struct sl_cidr_set *deny;               /* NULL = no one */
    struct sl_cidr_set *pp_trusted;         /* PROXY headers accepted from these; NULL = off */
    struct sl_ip_limit *ip_limit;           /* per-IP cap and rate; NULL = none (shared with the
                                               generation before when the listener was kept) */
    struct sl_tls_ctx *tls;                 /* NULL = plain */
    struct sl_tls_ticket_keys *ticket_keys; /* a reference; kept across reloads */
    uint64_t tls_files_sig;          /* stat() signature of the certificate files, for watch */
    struct sl_listener_stats *stats; /* a reference; never NULL */
};

/*
 * One config generation: everything built from one config snapshot. Shared (refcounted) by
 * the gateway while current, by every worker's state of that generation, and by readers
 * (admin, metrics) while they look at it; freed by the main thread once the last holder let go.
 */
struct sl_runtime {
    _Atomic uint32_t refs;
    uint64_t generation;              /* 1 at start, +1 per reload */
    struct sl_config *cfg;            /* owned */
    struct sl_router **routers;       /* per listener */
    struct sl_listener_rt *listeners; /* per listener */
    struct sl_pool **pools;           /* per upstream: endpoints and their health */
    unsigned worker_count;
    struct sl_filter_set *filters; /* instances and per-route chains */
    int *listen_fds;               /* [worker][listener]: sockets opened for this generation's
                                      new listeners, taken by the workers; -1 = kept or taken */
    struct sl_runtime *next;       /* the gateway's list of replaced generations */
};

struct sl_gw_worker;
struct sl_gw_gen;

/* One listener on one worker. Its address is stable: connections point at it. A reload that
 * keeps the listener (same name, address and protocol) keeps this object, its socket and its
 * connections, and points it at the new generation; one that drops it drains it. */
struct sl_gw_listener {
    struct sl_acceptor acceptor;
    struct sl_proxy_listener http; /* HTTP listeners: the request path */
    struct sl_tcp_proxy *tcp;      /* protocol: tcp listeners: the forwarding, else NULL */
    struct sl_gw_worker *gw;
    struct sl_runtime *rt;     /* a reference on the generation `lr` belongs to */
    struct sl_listener_rt *lr; /* its settings in that generation */
    size_t edge_count;         /* connections in the accept path (PROXY header, handshake) */
    size_t tunnel_count;       /* TCP streams of this listener, in any generation */
    struct sl_gw_gen *gen;     /* the generation its new requests and streams use */
    bool removed;              /* dropped by a reload: draining, freed once empty */
    struct sl_gw_listener *next_removed;
};

struct sl_edge_conn;

struct sl_gw_worker {
    struct sl_worker *worker;
    struct sl_gateway *g;
    struct sl_conn_gate *gate;
    struct sl_gw_gen *gen;     /* the current generation's worker state */
    struct sl_gw_gen *retired; /* older generations with requests or streams still running */
    struct sl_gw_listener **listeners; /* current listeners, by index in gen's config */
    size_t listener_count;
    struct sl_gw_listener *removed;  /* dropped listeners still draining */
    struct sl_slab edge_slab;        /* pending connections (l4/edge.c) */
    struct sl_edge_conn *edge_conns; /* every pending connection */
    size_t edge_count;
    struct sl_defer reap;       /* frees retired generations and listeners once empty */
    struct sl_timer reap_timer; /* looks again while some are still in use */
    bool reaping;
    bool draining;
    bool finishing; /* the worker is freeing everything: no more bookkeeping */
};

struct sl_gateway {
    struct sl_runtime *rt; /* current generation (a reference); rt_lock for other threads */
    pthread_mutex_t rt_lock;
    struct sl_runtime *retired; /* replaced generations, freed once nobody holds them */
    struct sl_worker *workers;
    unsigned worker_count;
    struct sl_control *control;   /* health checks and discovery thread, or NULL */
    struct sl_conn_gate gate;     /* max_connections across every worker and listener */
    uint64_t buffer_budget;       /* max_buffer_memory, resolved */
    _Atomic uint64_t *worker_gen; /* [worker]: the generation each runs (UINT64_MAX: draining) */
    size_t block_bytes;           /* the workers' buffer size, fixed at start */
    pthread_mutex_t reload_lock;
    /* set before start: every HTTP request's end (access log, metrics) */
    void (*on_request_done)(struct sl_request *req, void *data);
    void *on_request_done_data;
};

/* Builds the runtime from `cfg` (taking ownership, also on failure). NULL with a message in
 * `err` when a filter cannot be built or memory runs out. */
struct sl_gateway *sl_gateway_new(struct sl_config *cfg, char *err, size_t err_len);

/* Opens listening sockets and starts the workers. Returns 0 or -errno; on failure a message
 * naming the listener has been logged. */
int sl_gateway_start(struct sl_gateway *gw);

/*
 * Swaps in a new configuration (taking ownership of `cfg`, also on failure): builds the new
 * generation beside the current one, opens sockets for new listeners, moves every worker to
 * it (new requests and connections use it; requests in flight finish on the old one; kept
 * listeners keep their sockets and connections; dropped ones drain), restarts health checks
 * and discovery for the new upstreams. Main or admin thread; serialised. Returns 0, or -1
 * with the reason in `err` (the current configuration keeps serving).
 */
int sl_gateway_reload(struct sl_gateway *gw, struct sl_config *cfg, char *err, size_t err_len);

/* Frees replaced generations nobody holds any more. Main thread, now and then. */
void sl_gateway_collect(struct sl_gateway *gw);

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
 * `cookie` (the per-IP table that counted it, or 0) goes back to sl_edge_release when the
 * connection closes.
 */
void sl_gw_listener_adopt(struct sl_gw_listener *gl, const struct sl_transport *tr, size_t size,
                          const struct sockaddr *client, const struct sockaddr *dest,
                          uint64_t cookie);

/* Re-reads the certificates of TLS listeners whose files changed (`force`: all of them) and
 * swaps them in for new connections. Called from the main thread (SIGHUP, periodic check). */
void sl_gateway_reload_tls(struct sl_gateway *gw, bool force);

/* The current config generation with a reference (any thread); release it when done. */
struct sl_runtime *sl_gateway_runtime_acquire(struct sl_gateway *gw);
void sl_runtime_release(struct sl_runtime *rt);

/* Number of worker threads (fixed for the process's life). */
unsigned sl_gateway_worker_count(const struct sl_gateway *gw);

/* Worker `i`'s event loop, for its saturation counters (loop->stats; read-only, any thread). */
const struct sl_loop *sl_gateway_worker_loop(const struct sl_gateway *gw, unsigned i);

/* CPU time (user + system) worker thread `i` has used, in ns. 0 or -errno. Any thread. */
int sl_gateway_worker_cpu_ns(const struct sl_gateway *gw, unsigned i, uint64_t *ns);

/* Client connections open now (HTTP and TCP, every listener). Any thread. */
uint32_t sl_gateway_open_connections(const struct sl_gateway *gw);

/* Logs each listener's accept-path counters (refusals by reason, TLS and PROXY totals), one
 * line per listener that saw any, and the process-wide refusals (memory budget, connection
 * cap); at exit, until metrics expose them. Memory refusals are read only when
 * `workers_exited`. */
void sl_gateway_log_counters(const struct sl_gateway *gw, bool workers_exited);

/* Stops a draining worker's loop once it has nothing left (no connection, no exchange). */
void sl_gw_worker_check_drained(struct sl_gw_worker *gw);

#endif
