#ifndef SL_PROXY_PROXY_WORKER_H
#define SL_PROXY_PROXY_WORKER_H

#include <stddef.h>

#include "http/h1_server.h"
#include "http/request.h"

struct sl_worker;
struct sl_router;
struct sl_filter_set;
struct sl_upstream_rt;
struct sl_h1_header;

/*
 * What the HTTP request path needs on one worker: the upstreams' per-worker state, the
 * filters' per-worker state and scratch storage. The listener layer above (l4/gateway.c)
 * owns and fills it; exchanges only read it, and report their end through on_idle so the
 * owner can notice when a draining worker has nothing left.
 */
struct sl_proxy_worker {
    struct sl_worker *worker;
    const struct sl_filter_set *filters;
    struct sl_upstream_rt *upstreams; /* by upstream index */
    size_t upstream_count;
    struct sl_h1_header *resp_scratch; /* upstream response header storage */
    size_t resp_scratch_cap;
    void **filter_wstates; /* per-worker filter states, by slot */
    size_t inflight;       /* exchanges alive on this worker */
    void (*on_idle)(struct sl_proxy_worker *pw);
    void *owner;
};

/* One HTTP listener's request path on one worker. */
struct sl_proxy_listener {
    struct sl_h1_server server;
    struct sl_request_handler handler;
    const struct sl_router *router;
    struct sl_proxy_worker *pw;
};

/* Sets up `h` to proxy the requests of listener `pl` (exchange.c). */
void sl_exchange_handler_init(struct sl_request_handler *h, struct sl_proxy_listener *pl);

#endif
