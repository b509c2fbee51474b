#ifndef SL_PROXY_POOL_H
#define SL_PROXY_POOL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "proxy/balancer.h"

struct sl_upstream_conf;
struct sl_retry_conf;
struct sl_tls_client_ctx;

/*
 * The endpoints of one upstream as the whole process sees them, and their health.
 *
 * - struct sl_endpoint: one backend address. Shared by every worker and the control thread;
 *   its health fields are atomics, so an ejection decided on one worker is seen by every
 *   other on its next pick. Refcounted: sets, per-worker states and the health checker hold
 *   references, so an endpoint removed by discovery lives until its last request ended.
 * - struct sl_endpoint_set: an immutable list of endpoints (plus the balancer table built for
 *   it). A discovery update builds a new set, reusing the endpoint objects whose address,
 *   weight and zone stay (their health is kept; a changed weight or zone makes a new
 *   endpoint, since workers read those fields without synchronisation), and publishes it:
 *   each worker receives it through its loop's
 *   post queue and swaps it in between two events. No lock is taken on the request path.
 * - struct sl_pool: per upstream. Holds the current set (under a mutex that only publishers
 *   take), the upstream-wide breaker counters, the retry budget and the counters for metrics.
 */

/* Passive health and circuit-breaker state of one endpoint (one state machine for both). */
enum sl_ep_state {
    SL_EP_CLOSED = 0, /* in rotation */
    SL_EP_OPEN,       /* ejected until open_until_ms */
    SL_EP_HALF_OPEN,  /* ejection over: probe requests decide */
};

/* Sliding window of two counts (e.g. requests and failures) in time buckets, lock-free: a
 * bucket from an older epoch is reset by the first writer that sees it. Counts saturate at
 * 2^32 - 1 per bucket. */
#define SL_WINDOW_BUCKETS 10
struct sl_window {
    _Atomic uint64_t epoch[SL_WINDOW_BUCKETS];  /* bucket number + 1; 0 = empty */
    _Atomic uint64_t counts[SL_WINDOW_BUCKETS]; /* [a:32 | b:32] */
    uint64_t bucket_ms;                         /* window / SL_WINDOW_BUCKETS, at least 1 */
};

void sl_window_init(struct sl_window *w, uint64_t window_ms);
void sl_window_add(struct sl_window *w, uint64_t now_ms, uint32_t a, uint32_t b);
/* Sums of both counts over the buckets of the last window. */
void sl_window_sum(const struct sl_window *w, uint64_t now_ms, uint64_t *a, uint64_t *b);
void sl_window_reset(struct sl_window *w);

struct sl_endpoint {
    _Atomic uint32_t refs;
    struct sl_pool *pool; /* not owned; outlives its endpoints */
    char *address;        /* "host:port" as configured or "ip:port" as discovered */
    struct sockaddr_storage addr;
    socklen_t addr_len;
    uint32_t weight;
    char *zone; /* or NULL */
    bool local; /* zone equals this instance's zone */
    /* passive health / per-endpoint breaker */
    _Atomic int state; /* enum sl_ep_state */
    _Atomic uint32_t consecutive_failures;
    _Atomic uint64_t open_until_ms;
    _Atomic uint32_t ejections;   /* ejections in a row, grows the ejection time */
    _Atomic uint64_t restored_ms; /* when it last returned to rotation */
    _Atomic uint32_t probes_inflight;
    _Atomic uint32_t probe_successes;
    struct sl_window window; /* [requests, failures], only when failure_ratio is on */
    /* active health: written by the checker thread only */
    _Atomic bool active_down;
    /* per-worker state, wslot[i] touched only by worker i */
    void *wslot[];
};

/* Takes / drops a reference. The last drop frees the endpoint. */
void sl_endpoint_ref(struct sl_endpoint *ep);
void sl_endpoint_unref(struct sl_endpoint *ep);

/* True when the endpoint may take ordinary requests now (closed and not actively down). */
static inline bool sl_endpoint_is_healthy(struct sl_endpoint *ep)
{
    return atomic_load_explicit(&ep->state, memory_order_relaxed) == SL_EP_CLOSED &&
           !atomic_load_explicit(&ep->active_down, memory_order_relaxed);
}

struct sl_endpoint_set {
    _Atomic uint32_t refs;
    uint64_t version; /* increases with each published set of this pool */
    size_t count;
    struct sl_endpoint **eps;       /* each holds a reference */
    struct sl_balancer_shared *bal; /* weights and Maglev table for these endpoints */
};

void sl_endpoint_set_ref(struct sl_endpoint_set *s);
void sl_endpoint_set_unref(struct sl_endpoint_set *s);

/* One endpoint as a source describes it (the config file, DNS, a watched file, the admin API). */
struct sl_endpoint_spec {
    const char *address; /* printable "ip:port" or "host:port"; copied */
    struct sockaddr_storage addr;
    socklen_t addr_len;
    uint32_t weight;  /* 0 is taken as 1 */
    const char *zone; /* or NULL; copied */
};

/* Where a pool's endpoints come from; the published set is the union (first source wins on
 * a duplicate address). */
enum sl_pool_source {
    SL_POOL_SRC_CONFIG = 0,
    SL_POOL_SRC_DISCOVERY,
    SL_POOL_SRC_ADMIN,
    SL_POOL_SRC_COUNT
};

/* Counters for metrics; relaxed atomics, read by the metrics endpoint. */
struct sl_pool_stats {
    _Atomic uint64_t ejections;         /* closed -> open */
    _Atomic uint64_t reopens;           /* half-open -> open (a probe failed) */
    _Atomic uint64_t half_opens;        /* open -> half-open (a probe was sent) */
    _Atomic uint64_t restores;          /* half-open -> closed */
    _Atomic uint64_t ejections_refused; /* over max_ejection_percent */
    _Atomic uint64_t retries;
    _Atomic uint64_t retries_budget_exhausted;
    _Atomic uint64_t overflow_connections; /* circuit_breaker limits hit */
    _Atomic uint64_t overflow_pending;
    _Atomic uint64_t overflow_requests;
    _Atomic uint64_t no_healthy_endpoint;
    _Atomic uint64_t active_up;   /* active check turned an endpoint healthy */
    _Atomic uint64_t active_down; /* active check turned an endpoint unhealthy */
    _Atomic uint64_t updates;     /* sets published */
};

/* Called (with the pool's mutex held) for each published set, once per registered worker,
 * handing over one reference to `s`. Must not block (post to the worker's loop). */
typedef void (*sl_pool_publish_cb)(struct sl_endpoint_set *s, void *ctx);

struct sl_pool {
    const struct sl_upstream_conf *conf;
    const char *local_zone; /* not owned, or NULL */
    unsigned worker_count;
    pthread_mutex_t lock; /* publishers only: never taken on the request path */
    struct sl_endpoint_set *current;
    struct sl_endpoint_spec *src[SL_POOL_SRC_COUNT]; /* owned copies (strings owned too) */
    size_t src_count[SL_POOL_SRC_COUNT];
    sl_pool_publish_cb *worker_cb; /* [worker_count], NULL = not registered */
    void **worker_ctx;             /* [worker_count] */
    _Atomic uint64_t health_gen;   /* bumped on every state change of any endpoint */
    _Atomic uint64_t version;      /* version of `current` */
    _Atomic uint32_t ejected;      /* endpoints not closed (open or half-open) */
    /* upstream circuit breaker */
    _Atomic uint32_t connections, pending, requests;
    /* retry budget: [requests, retries] over 10 s */
    struct sl_window budget;
    struct sl_pool_stats stats;
    struct sl_tls_client_ctx *tls; /* owned; NULL unless the upstream has `tls:` */
};

/*
 * Creates the pool of `conf` for `worker_count` workers, builds its TLS client context when
 * the upstream has `tls:` (reading the CA and client certificate files: start-up only), and
 * publishes the config's endpoints (already resolved by the loader). `local_zone` (may be
 * NULL) must outlive the pool. Returns NULL with the reason in `err` (may be NULL) when a TLS
 * file or setting is bad ("upstream NAME: tls: ...") or memory ran out.
 */
struct sl_pool *sl_pool_new(const struct sl_upstream_conf *conf, const char *local_zone,
                            unsigned worker_count, char *err, size_t err_len);

/*
 * Builds the TLS client context `conf`'s `tls:` describes (verification, CA file or the
 * system store, client certificate, minimum version, ALPN offer). Returns it (caller owns;
 * sl_tls_client_ctx_free), or NULL with "upstream NAME: tls: reason" in `err`. sl_pool_new
 * calls it (and `sluice -t` builds the pools, so it checks the files as a start would).
 */
struct sl_tls_client_ctx *sl_pool_tls_ctx_new(const struct sl_upstream_conf *conf, char *err,
                                              size_t err_len);

/*
 * The name a TLS connection to `ep` sends as SNI and verifies the certificate against: `tls.sni`
 * when set, else the host of the endpoint's address as written ("api.internal" of
 * "api.internal:443"); for an address given as an IP, the name DNS discovery resolves when
 * the upstream has one, else the IP itself (no SNI is sent for an IP, and the certificate
 * must then carry that IP). Written NUL-terminated into `buf`; returns it, or NULL when it
 * does not fit.
 */
const char *sl_pool_tls_name(const struct sl_pool *p, const struct sl_endpoint *ep, char *buf,
                             size_t cap);
/*
 * A reload made `p` to replace `old` (an upstream of the same name): what `old` knows that the
 * new pool would otherwise only learn again is carried over, so that the reload itself fails
 * no request. The endpoints discovery found (when both discover from the same name or file:
 * the new discovery refreshes them on its first run), the endpoints the admin API added, and
 * the health of every endpoint whose address stays (ejections, active-check verdicts). Call before
 * `p` is handed to workers or to the control thread; `old` may be in use by both.
 */
void sl_pool_inherit(struct sl_pool *p, struct sl_pool *old, uint64_t now_ms);
void sl_pool_free(struct sl_pool *p);

/*
 * A worker's registration: returns the current set with a reference for the caller, and from
 * now on each published set is handed to cb(set, ctx) for this worker (with a reference).
 */
struct sl_endpoint_set *sl_pool_register_worker(struct sl_pool *p, unsigned worker,
                                                sl_pool_publish_cb cb, void *ctx);
void sl_pool_unregister_worker(struct sl_pool *p, unsigned worker);

/*
 * Replaces what source `src` says the endpoints are (copying `specs`) and publishes the union
 * when it changed. Any thread; takes the pool's mutex. Returns 1 when a new set was
 * published, 0 when nothing changed, -ENOMEM. An empty union is published as an empty set.
 */
int sl_pool_set_source(struct sl_pool *p, enum sl_pool_source src,
                       const struct sl_endpoint_spec *specs, size_t n);

/* The current set with a reference (for the health checker and the admin API). */
struct sl_endpoint_set *sl_pool_acquire_set(struct sl_pool *p);

/*
 * Records the outcome of one attempt on `ep` and runs the state machine: consecutive failures
 * or the failure ratio eject (within max_ejection_percent of `set`, the caller's current
 * set); a probe's success closes, its failure reopens for longer. `probe` says the attempt
 * was a half-open probe. `now_ms` is the caller's loop time.
 */
void sl_endpoint_report(struct sl_endpoint *ep, const struct sl_endpoint_set *set,
                        enum sl_outcome outcome, bool probe, uint64_t now_ms);

/* Tries to turn an OPEN endpoint whose time is up into HALF_OPEN and take a probe slot.
 * True when the caller must send the probe. */
bool sl_endpoint_try_probe(struct sl_endpoint *ep, uint64_t now_ms);

/* Active health result from the checker thread: marks the endpoint down/up. */
void sl_endpoint_set_active_down(struct sl_endpoint *ep, bool down);

/* Retry budget: counts a first try, and asks for one retry (true = allowed and counted). */
void sl_pool_budget_request(struct sl_pool *p, uint64_t now_ms);
bool sl_pool_budget_retry(struct sl_pool *p, const struct sl_retry_conf *rc, uint64_t now_ms);

#endif
