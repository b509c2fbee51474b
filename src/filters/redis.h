#ifndef SL_FILTERS_REDIS_H
#define SL_FILTERS_REDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/loop.h"

struct sl_redis_conf;

/*
 * One worker's Redis client: a hiredis async connection driven by the worker's own loop, used
 * by global rate limits. Never blocks and never stalls a request past the configured timeout:
 * a call answers within `timeout_ms` with a result or an error. While disconnected, calls
 * fail at once (-ENOTCONN) and the client reconnects in the background with exponential
 * backoff (100 ms doubling to 5 s), re-authenticating (AUTH, SELECT) each time. Loop thread
 * only.
 */
struct sl_redis;

/* The decision of one GCRA check in Redis. */
struct sl_rl_result {
    bool allowed;
    uint64_t limit;          /* burst + 1: requests allowed at once from idle */
    uint64_t remaining;      /* requests left right now */
    uint64_t reset_ms;       /* until the bucket is full again */
    uint64_t retry_after_ms; /* when refused: until one request would pass; else 0 */
};

struct sl_redis_call;
struct sl_redis_cmd;
/* `res` is valid only during the call. err: 0, -ETIMEDOUT, -ENOTCONN, -EPROTO (bad reply),
 * -ENOMEM. Runs on the loop thread, never from inside sl_redis_gcra(). */
typedef void (*sl_redis_gcra_cb)(struct sl_redis_call *call, const struct sl_rl_result *res,
                                 int err);

/* A pending call, embedded in its owner (the request's filter state). */
struct sl_redis_call {
    struct sl_redis *client;
    struct sl_timer timer;
    struct sl_defer defer; /* delivers immediate failures after the current call returns */
    struct sl_redis_call *prev, *next; /* the client's pending list */
    struct sl_redis_cmd *cmd;          /* the command in flight for it (client-owned), or NULL */
    sl_redis_gcra_cb cb;
    void *data;
    int err; /* for a deferred failure */
    bool pending;
};

/* Creates the client and starts connecting. NULL on allocation failure. `conf` must outlive
 * the client. */
struct sl_redis *sl_redis_new(struct sl_loop *loop, const struct sl_redis_conf *conf);

/* Cancels pending calls silently (their owners are being torn down too), disconnects and
 * frees. */
void sl_redis_free(struct sl_redis *r);

/*
 * One GCRA decision in Redis, atomically (one EVALSHA of a small Lua script; falls back to
 * EVAL on NOSCRIPT), using the Redis server's clock so every gateway instance agrees:
 * `period_us` is the emission interval (1 s / rate), `burst` the extra requests allowed at once.
 * The key expires when the bucket would be full again. The key in Redis is conf->key_prefix
 * followed by `key` (binary-safe; copied). Returns 0 (cb follows, after the call returns) or
 * -errno, and then cb does not follow: -ENOTCONN when disconnected, -ENOBUFS when 1024
 * commands are already in flight, -EINVAL for period_us 0 (or > 2^40, or burst > 2^20: the
 * script computes in doubles), -EALREADY when `call` is still pending, -ENOMEM.
 */
int sl_redis_gcra(struct sl_redis *r, struct sl_redis_call *call, const char *key, size_t key_len,
                  uint64_t period_us, uint64_t burst, sl_redis_gcra_cb cb, void *data);

/* Forgets a pending call: its callback will not run (a reply arriving later is dropped inside
 * the client, so the call's memory may be freed right after). Safe on a call that is not
 * pending. */
void sl_redis_cancel(struct sl_redis_call *call);

/* True while connected (and authenticated). */
bool sl_redis_is_connected(const struct sl_redis *r);

#endif
