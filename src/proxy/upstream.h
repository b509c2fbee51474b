#ifndef SL_PROXY_UPSTREAM_H
#define SL_PROXY_UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/buf.h"
#include "core/loop.h"
#include "core/transport.h"
#include "proxy/balancer.h"
#include "proxy/pool.h"
#include "tls/tls_types.h"

struct sl_upstream_conf;
struct sl_worker;
struct sl_upstream_conn;
struct sl_pool;
struct sl_endpoint;
struct sl_endpoint_set;
struct sockaddr;
struct sockaddr_storage;
struct ssl_session_st;

/* One endpoint as one worker sees it: its keep-alive connections and who uses it. Lives while
 * the endpoint is in the worker's current set or anything still uses it. */
struct sl_wep {
    struct sl_endpoint *ep; /* reference held */
    struct sl_upstream_rt *up;
    struct sl_upstream_conn *idle;      /* most recently used first */
    uint32_t users;                     /* exchanges and connections holding it */
    int index;                          /* position in the worker's current set; -1 once removed */
    struct ssl_session_st *tls_session; /* TLS: the last session to resume (owned), or NULL */
};

/*
 * Per-worker view of one upstream pool: the endpoint set it currently uses (swapped in when
 * the pool publishes a new one), its balancer state, its keep-alive connections, and a cache
 * of which endpoints are eligible (rebuilt when the pool's health generation moves).
 * Idle connections stay registered for reading so that a backend closing one is noticed at
 * once (the connection is dropped before any request can be sent on it), and each retires
 * before the backend's own keep-alive timeout (learned from `Keep-Alive: timeout=`).
 */
struct sl_upstream_rt {
    const struct sl_upstream_conf *conf;
    struct sl_pool *pool;
    struct sl_worker *worker;
    struct sl_endpoint_set *set; /* reference held */
    struct sl_wep **weps;        /* [set->count] */
    struct sl_balancer *bal;     /* over set->bal */
    /* eligibility cache, bit i = set index i */
    uint64_t *healthy, *local_healthy, *remote_healthy;
    size_t mask_words;
    uint64_t health_gen;    /* pool generation the cache was built at */
    uint64_t next_probe_ms; /* earliest end of an ejection; UINT64_MAX when none */
    bool has_half_open;
    bool panic; /* healthy share under zone_aware.panic_threshold: use every endpoint */
    uint64_t healthy_count;
    uint64_t local_total_w, local_healthy_w, remote_healthy_w;
    uint64_t rng;
    struct sl_post post;
    struct sl_endpoint_set *_Atomic incoming; /* published, not yet installed */
    uint32_t idle_count;                      /* across endpoints, bounded by keepalive.max_idle */
    uint64_t connects, reuses;                /* for tests and metrics */
};

/* Who is using a busy connection: the exchange's callbacks. */
struct sl_upstream_user {
    void (*on_event)(struct sl_upstream_conn *uc, uint32_t events, void *data);
    void (*on_timeout)(struct sl_upstream_conn *uc, void *data);
    void *data;
};

enum sl_uc_state { SL_UC_CONNECTING, SL_UC_BUSY, SL_UC_IDLE, SL_UC_CLOSED };

/* What a new connection does before it counts as connected (SL_UC_CONNECTING). */
enum sl_uc_setup {
    SL_UC_SETUP_TCP = 0, /* connect() in progress */
    SL_UC_SETUP_PROXY,   /* writing the PROXY header */
    SL_UC_SETUP_TLS,     /* TLS handshake */
    SL_UC_SETUP_DONE,
};

/*
 * Who a connection is opened for, when the upstream sends PROXY headers (`proxy_protocol:`).
 * A PROXY header describes one client, so a connection is tagged with the client's address
 * and reused only for requests from that same address (any port). Read only during
 * sl_upstream_acquire_for.
 */
struct sl_upstream_origin {
    const struct sockaddr *client; /* the header's source and the reuse tag; NULL: unknown */
    const struct sockaddr *local;  /* the header's destination, or NULL to ask get_local */
    /* Asked only when a new connection is opened (it may cost a syscall): 0 or -errno. */
    int (*get_local)(const void *data, struct sockaddr_storage *out);
    const void *data;
};

/* The longest PROXY header an upstream connection sends (v1 is the longer one). */
#define SL_UC_PP_MAX_BYTES 108

struct sl_upstream_conn {
    struct sl_io io;
    union {
        struct sl_transport tr;      /* TCP, or the base of `tls` */
        struct sl_tls_transport tls; /* when the upstream has `tls:` */
    };
    struct sl_timer timer;
    struct sl_defer free_defer;
    struct sl_buf in;
    struct sl_upstream_rt *up;
    struct sl_wep *wep; /* holds a use */
    enum sl_uc_state state;
    struct sl_upstream_conn *next, *prev; /* idle list */
    struct sl_upstream_user user;
    uint64_t keepalive_ms; /* learned from the backend; 0 = unknown */
    uint64_t idle_since_ms;
    uint32_t requests; /* requests sent on this connection */
    bool reused;       /* taken from the idle pool for the current request */
    bool is_tls;
    uint8_t setup;         /* enum sl_uc_setup */
    int setup_err;         /* why the setup failed (-errno; -EPROTO: TLS), or 0 */
    uint8_t origin_family; /* PROXY reuse tag: AF_INET/AF_INET6, or 0 (unknown client) */
    uint8_t origin_addr[16];
    uint8_t pp_len, pp_off; /* PROXY header bytes to send, and sent */
    char pp[SL_UC_PP_MAX_BYTES];
};

/* Sets up the worker's view of `pool` and registers for its updates. 0 or -ENOMEM. */
int sl_upstream_rt_init(struct sl_upstream_rt *up, struct sl_pool *pool, struct sl_worker *w);

/* Unregisters, closes every idle connection and frees the per-worker state. Busy connections
 * must have been released by their users first. */
void sl_upstream_rt_dispose(struct sl_upstream_rt *up);

/* Stops taking endpoint-set updates from the pool (a configuration generation retired):
 * requests in flight keep using the current set. Idempotent. */
void sl_upstream_rt_detach(struct sl_upstream_rt *up);

/* True while an update the pool published is queued on the worker's loop (the view must not
 * be freed before it ran). */
bool sl_upstream_rt_post_pending(const struct sl_upstream_rt *up);

/* Closes idle connections (drain). */
void sl_upstream_rt_close_idle(struct sl_upstream_rt *up);

/* Why a pick found nothing. */
enum sl_pick_fail {
    SL_PICK_NO_ENDPOINTS = 1, /* the pool is empty */
    SL_PICK_NONE_HEALTHY,     /* every endpoint not tried yet is ejected or down */
    SL_PICK_ALL_TRIED,        /* every eligible endpoint was tried by this request */
};

/*
 * Chooses an endpoint for one attempt: a due half-open probe first, else the balancer over
 * the eligible endpoints (healthy ones; with zone_aware, the local zone's share first; in
 * panic, all), never one of `tried`. Takes a use of the result and counts it in flight.
 * Returns NULL with *why set when there is none. *probe says the attempt is a probe.
 */
struct sl_wep *sl_upstream_pick(struct sl_upstream_rt *up, const struct sl_pick_ctx *hash_ctx,
                                struct sl_endpoint *const *tried, size_t tried_count, bool *probe,
                                enum sl_pick_fail *why);

/* Ends an attempt on `w`: outcome to the balancer and the endpoint's health, use dropped. */
void sl_upstream_done(struct sl_upstream_rt *up, struct sl_wep *w, enum sl_outcome outcome,
                      bool probe);

/* Seconds until the earliest ejection ends (for Retry-After), at least 1. */
uint64_t sl_upstream_retry_after_s(const struct sl_upstream_rt *up);

/*
 * Gets a connection to endpoint `w`: a pooled idle one (state BUSY, reused = true) or a new
 * one being connected (state CONNECTING: the user's on_event sees EPOLLOUT once connected, or
 * EPOLLERR on failure, then sl_upstream_conn_connect_result says why). "Connected" includes
 * what the upstream asks for before any request: the PROXY header (`proxy_protocol:`) and the
 * TLS handshake (`tls:`, resuming the endpoint's last session); the user's connect timer
 * bounds all of it. Returns NULL with *err set when the socket cannot even be created
 * (-errno; e.g. -ECONNREFUSED may come back synchronously on loopback), or -EUSERS when the
 * upstream's circuit_breaker.max_connections is reached.
 * Events are delivered to `user` until the connection is released.
 * This form has no client: with `proxy_protocol:`, a new connection's header says UNKNOWN
 * (v1) / AF_UNSPEC (v2), and only such connections are reused.
 */
struct sl_upstream_conn *sl_upstream_acquire(struct sl_upstream_rt *up, struct sl_wep *w,
                                             const struct sl_upstream_user *user, bool fresh,
                                             int *err);

/* sl_upstream_acquire for a client (`origin` may be NULL): with `proxy_protocol:`, only idle
 * connections opened for the same client address are reused, and a new one starts with a
 * header describing `origin`. Without it, `origin` is ignored. */
struct sl_upstream_conn *sl_upstream_acquire_for(struct sl_upstream_rt *up, struct sl_wep *w,
                                                 const struct sl_upstream_user *user, bool fresh,
                                                 const struct sl_upstream_origin *origin, int *err);

/* Sets which events the user wants (EPOLLIN / EPOLLOUT); what the transport itself waits for
 * (a TLS read that must write, a write that must read) is added, and an event it waited for
 * reaches the user as both EPOLLIN and EPOLLOUT, so the stalled operation is retried. */
void sl_upstream_conn_want(struct sl_upstream_conn *uc, uint32_t events);

/* Arms the connection's timer for the user (on_timeout fires). */
void sl_upstream_conn_arm(struct sl_upstream_conn *uc, uint64_t ms);

/* Returns the connection: to the idle pool when `reusable` (and there is room), closed
 * otherwise. The user gets no more events. */
void sl_upstream_release(struct sl_upstream_conn *uc, bool reusable);

/* Reads into uc->in. Returns 0 (check *eof), -EAGAIN, -ENOBUFS (buffer full) or -errno
 * (-EPROTO: TLS). EPOLLIN stays in io.ready while the transport holds more (TLS records
 * decrypted or buffered raise no new edge): a reader loops while it is set. */
int sl_upstream_conn_read(struct sl_upstream_conn *uc, bool *eof);

/* Result of a finished connect: 0, or -errno (SO_ERROR, or the PROXY header's write error),
 * or -EPROTO when the TLS handshake failed (the reason is logged at debug level). */
int sl_upstream_conn_connect_result(struct sl_upstream_conn *uc);

/* Describes the last TLS failure on `uc` for a log line (empty when not TLS). Returns buf. */
const char *sl_upstream_conn_tls_error(const struct sl_upstream_conn *uc, char *buf, size_t cap);

#endif
