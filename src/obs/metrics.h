#ifndef SL_OBS_METRICS_H
#define SL_OBS_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * Prometheus metrics: per-request counters kept by each worker without locks, and a text
 * exposition (format 0.0.4) rendered on demand from those counters plus what the rest of the
 * process already counts (listeners, upstream pools, event loops, access log, reloads).
 *
 * Per-request counters are per worker and per route *slot*. A slot belongs to a route name
 * for the life of the process, so a route kept across reloads keeps counting in the same
 * series; sl_metrics_bind_routes() writes each route's slot into its config before the
 * config goes live. Two slots are reserved: requests that matched no route, and routes past
 * SL_METRICS_MAX_ROUTES (or never bound), which share one.
 */

struct sl_metrics;
struct sl_config;
struct sl_request;
struct sl_obs;

/* Distinct route names that get their own series; later ones share route="(other)". */
#define SL_METRICS_MAX_ROUTES 4096

/* The route label of requests that matched no route (404 no_route, unparsable heads) and of
 * routes sharing the overflow slot. Route names cannot contain parentheses, so these never
 * collide with a configured name. */
#define SL_METRICS_ROUTE_NONE "(none)"
#define SL_METRICS_ROUTE_OTHER "(other)"

/* Status classes counted per route, in this order. */
enum sl_metrics_code {
    SL_METRICS_1XX = 0,
    SL_METRICS_2XX,
    SL_METRICS_3XX,
    SL_METRICS_4XX,
    SL_METRICS_5XX,
    SL_METRICS_NONE, /* ended without a response (client gone, cut before the head) */
    SL_METRICS_CODE_COUNT
};

/*
 * Creates the counters for `workers` worker threads (start-up, main thread). Returns NULL
 * when memory runs out. The caller owns the result (sl_metrics_free).
 */
struct sl_metrics *sl_metrics_new(unsigned workers);

/* Frees everything. No other thread may use `m` any more. NULL is accepted. */
void sl_metrics_free(struct sl_metrics *m);

/*
 * The version reported by sluice_build_info (copied; default "unknown"). Main thread,
 * start-up.
 */
void sl_metrics_set_version(struct sl_metrics *m, const char *version);

struct sl_log_ship;

/*
 * The access-log shipper whose counters the exposition shows (NULL: none, the default). Any
 * thread; the shipper must outlive every render that may see it, so set NULL before freeing
 * it (a render already running finishes with the old pointer: stop the admin thread first).
 */
void sl_metrics_set_log_ship(struct sl_metrics *m, const struct sl_log_ship *ship);

/*
 * Main thread, before `cfg` goes live (start and every reload): sets each route's
 * `metrics_slot` by route name (an unnamed route is "route<index>"), so a route whose name
 * survives a reload keeps its counters; a new name gets a new slot, and past
 * SL_METRICS_MAX_ROUTES names the route shares the "(other)" slot. Also notes
 * `cfg->vcpu_hour_usd` for the cost metrics when no gateway is there to ask. `cfg` stays the
 * caller's; the names are copied. Safe while workers record and a scrape renders.
 * Returns 0, or -ENOMEM (then routes not yet given a slot count as "(other)").
 */
int sl_metrics_bind_routes(struct sl_metrics *m, struct sl_config *cfg);

/*
 * Worker `worker`'s thread, once per finished request: counts it under its route's slot
 * (req->route, NULL = no route). No lock, allocation, syscall or atomic read-modify-write:
 * each worker writes only its own counters. `req->log.filter` and `req->log.error` are
 * matched by pointer and copied on first sight, so they must be strings the code owns
 * (literals), not per-request text. A `worker` out of range is ignored.
 */
void sl_metrics_record(struct sl_metrics *m, unsigned worker, const struct sl_request *req);

/*
 * Any thread (the admin thread): the Prometheus text exposition of every family
 * (docs/metrics.md), malloc'ed and NUL-terminated, its length in *len (may be NULL). Gateway
 * sections (connections, listeners, upstreams, event loops, worker CPU) are skipped when
 * obs->gw is NULL, the access log section when obs->alog is NULL. Resets the per-worker
 * maximum event-loop lag and moves the CPU-utilisation sample (see docs/metrics.md).
 * Returns NULL when memory runs out. The caller frees the result.
 */
char *sl_metrics_render(struct sl_obs *obs, size_t *len);

/* One route's totals since start. */
struct sl_metrics_route_totals {
    char name[72]; /* route name, SL_METRICS_ROUTE_NONE or SL_METRICS_ROUTE_OTHER */
    uint64_t requests;
    uint64_t codes[SL_METRICS_CODE_COUNT];
    double duration_seconds_sum;          /* total time of its requests */
    double upstream_duration_seconds_sum; /* of those that reached an upstream */
    uint64_t upstream_requests;
    double cpu_seconds_sum; /* worker time spent on its requests */
};

/* Totals since start, for the status page and /status. */
struct sl_metrics_totals {
    uint64_t requests;
    uint64_t codes[SL_METRICS_CODE_COUNT];
    double duration_seconds_sum;            /* total time of all requests */
    double cpu_seconds_sum;                 /* worker time of all requests */
    struct sl_metrics_route_totals *routes; /* NULL unless asked for; malloc'ed */
    size_t route_count;
};

/*
 * Fills `t` with the totals since start (requests counts every request once; codes splits it
 * by status class). With `with_routes`, also one entry per route: the routes of the config
 * last bound and any former route that counted something, in the order they were first
 * bound, then "(none)" and "(other)" when they counted anything. Any thread; takes the
 * metrics lock, never one a worker waits on. Returns 0 or -ENOMEM (then t->routes is NULL
 * and the overall counts are still filled). Release with sl_metrics_totals_dispose.
 */
int sl_metrics_totals(struct sl_metrics *m, struct sl_metrics_totals *t, bool with_routes);

/* Frees what sl_metrics_totals allocated in `t`. */
void sl_metrics_totals_dispose(struct sl_metrics_totals *t);

#endif
