#ifndef SL_FILTERS_FILTER_H
#define SL_FILTERS_FILTER_H

#include <stdbool.h>
#include <stddef.h>

/*
 * Route filters: small units that look at a request before it is routed upstream and may
 * let it continue, answer it themselves (401, 403, 429...), or pause for asynchronous work
 * (a Redis reply, a key fetch) and resume later on the same worker. They never touch
 * sockets, and a request a filter answers never opens an upstream connection.
 *
 * Adding a filter = one file with a `const struct sl_filter_ops` + one line in registry.c.
 */

struct sl_request;
struct sl_filter_run;

enum sl_filter_verdict {
    SL_FILTER_CONTINUE = 0, /* next filter, then the upstream */
    SL_FILTER_RESPOND,      /* the filter set a response with sl_filter_respond() */
    SL_FILTER_PAUSE,        /* async work started; the filter calls sl_filter_resume() */
};

struct sl_config;
struct sl_config_filter_type;
struct sl_worker;

struct sl_filter_ops {
    const char *name;
    /* The filter's config keys (its mapping under `- <name>: {...}`), checked by the config
     * loader with every error located; see config/filter_conf.h. */
    const struct sl_config_filter_type *conf_type;
    /* Builds the filter's immutable state from its parsed config `conf` (the struct its
     * conf_type describes) and the whole snapshot `cfg` (consumers, redis). Returns 0 or -1
     * with a message in err. At load time only, on the main thread. */
    int (*create)(const void *conf, const struct sl_config *cfg, void **state, char *err,
                  size_t err_len);
    void (*destroy)(void *state);
    /* Optional: per-worker state (a Redis connection, waiter lists), made on the worker's own
     * thread before it serves; *wstate is then found with sl_filter_wstate(). 0 or -errno. */
    int (*worker_init)(void *state, struct sl_worker *w, void **wstate);
    void (*worker_fini)(void *state, void *wstate);
    /* Per request, in route order. `run` identifies the request's pass through the chain. */
    enum sl_filter_verdict (*on_request)(struct sl_filter_run *run, struct sl_request *req,
                                         void *state);
    /* Required when on_request may pause: the request went away while paused; forget `run`
     * (no sl_filter_resume() may follow). */
    void (*on_cancel)(struct sl_filter_run *run, void *state);
    /* Optional: may edit nothing yet; later used for response header work and logging. */
    void (*on_response_headers)(struct sl_request *req, int status, void *state);
    void (*on_log)(struct sl_request *req, void *state);
};

struct sl_filter_instance {
    const struct sl_filter_ops *ops;
    void *state;
    size_t slot; /* index of this instance's per-worker state in the run's `wstates` */
};

struct sl_filter_chain {
    struct sl_filter_instance *items;
    size_t count;
};

typedef void (*sl_filter_done_cb)(struct sl_filter_run *run, enum sl_filter_verdict verdict);

/* One request's pass through a chain; embedded in the caller's per-request state. */
struct sl_filter_run {
    const struct sl_filter_chain *chain;
    void *const *wstates; /* the worker's per-filter states, by slot (may be NULL) */
    struct sl_request *req;
    size_t pos;
    bool paused;
    bool in_call;           /* a filter's on_request is on the stack */
    int early;              /* verdict of a resume made from inside on_request, or -1 */
    sl_filter_done_cb done; /* called once with CONTINUE (all passed) or RESPOND */
    void *data;             /* the caller's */
    /* response set by a filter */
    int status;
    const char *content_type;
    const char *body;
    size_t body_len;
    const char *error;         /* short reason for logs ("jwt_expired") */
    const char *extra_headers; /* serialized "Name: value\r\n" lines for the answer */
    size_t extra_len;
};

/* The per-worker state of the filter now running (from its worker_init), or NULL. */
static inline void *sl_filter_wstate(const struct sl_filter_run *run)
{
    if (!run->wstates || run->pos >= run->chain->count)
        return NULL;
    return run->wstates[run->chain->items[run->pos].slot];
}

/*
 * Runs the chain from the start. Calls `done` exactly once: synchronously when no filter
 * pauses, otherwise from the sl_filter_resume() that completes the chain.
 */
void sl_filter_run_start(struct sl_filter_run *run, const struct sl_filter_chain *chain,
                         void *const *wstates, struct sl_request *req, sl_filter_done_cb done,
                         void *data);

/* The request is going away: tells a paused filter to forget the run. No callback follows. */
void sl_filter_run_cancel(struct sl_filter_run *run);

/* Resumes a paused run with the paused filter's verdict (CONTINUE or RESPOND), on the
 * request's worker. */
void sl_filter_resume(struct sl_filter_run *run, enum sl_filter_verdict verdict);

/* Sets the response a filter answers with (strings must outlive the request: static or in
 * the request arena). Returns SL_FILTER_RESPOND for `return sl_filter_respond(...)`.
 * Extra header lines for the answer go in run->extra_headers (set before or after). */
enum sl_filter_verdict sl_filter_respond(struct sl_filter_run *run, int status,
                                         const char *content_type, const char *body,
                                         size_t body_len, const char *error);

/* Answers with the gateway's JSON error body {"status":N,"error":"<error>","request_id":...}
 * built in the request arena (a static fallback when the arena is exhausted). */
enum sl_filter_verdict sl_filter_reject(struct sl_filter_run *run, struct sl_request *req,
                                        int status, const char *error);

/* Finds a registered filter by name; NULL when unknown. */
const struct sl_filter_ops *sl_filter_find(const char *name);

/* The registered filters (for docs and config errors). */
const struct sl_filter_ops *const *sl_filter_registry(size_t *count);

#endif
