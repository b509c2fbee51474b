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

struct sl_filter_ops {
    const char *name;
    /* Builds the filter's immutable state from its config (`conf` is the filter's own config
     * object, opaque here). Returns 0 or -1 with a message in err. At load time only. */
    int (*create)(const void *conf, void **state, char *err, size_t err_len);
    void (*destroy)(void *state);
    /* Per request, in route order. `run` identifies the request's pass through the chain. */
    enum sl_filter_verdict (*on_request)(struct sl_filter_run *run, struct sl_request *req,
                                         void *state);
    /* Optional: may edit nothing yet; later used for response header work and logging. */
    void (*on_response_headers)(struct sl_request *req, int status, void *state);
    void (*on_log)(struct sl_request *req, void *state);
};

struct sl_filter_instance {
    const struct sl_filter_ops *ops;
    void *state;
};

struct sl_filter_chain {
    struct sl_filter_instance *items;
    size_t count;
};

typedef void (*sl_filter_done_cb)(struct sl_filter_run *run, enum sl_filter_verdict verdict);

/* One request's pass through a chain; embedded in the caller's per-request state. */
struct sl_filter_run {
    const struct sl_filter_chain *chain;
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
    const char *error; /* short reason for logs ("jwt_expired") */
};

/*
 * Runs the chain from the start. Calls `done` exactly once: synchronously when no filter
 * pauses, otherwise from the sl_filter_resume() that completes the chain.
 */
void sl_filter_run_start(struct sl_filter_run *run, const struct sl_filter_chain *chain,
                         struct sl_request *req, sl_filter_done_cb done, void *data);

/* Resumes a paused run with the paused filter's verdict (CONTINUE or RESPOND), on the
 * request's worker. */
void sl_filter_resume(struct sl_filter_run *run, enum sl_filter_verdict verdict);

/* Sets the response a filter answers with (strings must outlive the request: static or in
 * the request arena). Returns SL_FILTER_RESPOND for `return sl_filter_respond(...)`. */
enum sl_filter_verdict sl_filter_respond(struct sl_filter_run *run, int status,
                                         const char *content_type, const char *body,
                                         size_t body_len, const char *error);

/* Finds a registered filter by name; NULL when unknown. */
const struct sl_filter_ops *sl_filter_find(const char *name);

/* The registered filters (for docs and config errors). */
const struct sl_filter_ops *const *sl_filter_registry(size_t *count);

#endif
