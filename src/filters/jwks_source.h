#ifndef SL_FILTERS_JWKS_SOURCE_H
#define SL_FILTERS_JWKS_SOURCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/loop.h"
#include "filters/jws.h"

/*
 * Where a jwt filter's keys come from, kept fresh off the request path.
 *
 * A URL source fetches a JWK Set over HTTP or HTTPS (OpenSSL, certificate and host name
 * verified against the system store or `ca_file`) on one background thread shared by every
 * source of the process. It refreshes before the set expires (Cache-Control max-age clamped to
 * [refresh_min, refresh_max], else `refresh`), and on demand when a token names an unknown kid
 * (sl_jwks_source_refetch): one fetch at a time per source (single-flight) and at most one
 * per `refetch_min_interval`, so forged kids cannot hammer the identity provider. A failed
 * fetch keeps the last good set serving (stale-while-error; counted) and retries with backoff.
 *
 * A file source reads a JWK Set (or a PEM public key) at creation and re-reads it when its
 * mtime changes (checked every `refresh`), keeping the old set when the new file is bad.
 *
 * Workers never lock: each subscribes with its loop and keeps its own reference to the current
 * set; when a new set is published, or a fetch attempt ends, the source posts to every
 * subscriber's loop and the subscriber's callback runs there.
 */
struct sl_jwks_source;

/* Options; a zero field takes its default, and `opts` may be NULL for all defaults. The
 * structure and `ca_file` are copied. */
struct sl_jwks_source_opts {
    uint64_t refresh_ms;              /* default 5 min */
    uint64_t refresh_min_ms;          /* default 1 min */
    uint64_t refresh_max_ms;          /* default 24 h */
    uint64_t refetch_min_interval_ms; /* default 30 s */
    uint64_t timeout_ms;              /* whole fetch (connect + TLS + response), default 5 s */
    size_t max_bytes;                 /* largest accepted body (or file), default 1 MiB */
    const char *ca_file;              /* PEM bundle for HTTPS, or NULL for the system store */
};

/*
 * A source for `url` ("http://host[:port]/path" or "https://..."). Tries one synchronous fetch
 * (bounded by timeout_ms) so a healthy IdP has keys before the first request; when that fails
 * the source still starts (logged) and keeps retrying. NULL with a reason in `err` only for a
 * bad URL (userinfo and fragments are refused), an unusable `ca_file`, or allocation failure.
 * Starts the shared background thread if it is not running.
 */
struct sl_jwks_source *sl_jwks_source_new_url(const char *url,
                                              const struct sl_jwks_source_opts *opts, char *err,
                                              size_t err_len);

/* A source for a local file (JWK Set JSON, or PEM). NULL with a reason in `err` when the file
 * cannot be read or holds no usable key. `allow_oct` as in sl_jwks_parse. */
struct sl_jwks_source *sl_jwks_source_new_file(const char *path,
                                               const struct sl_jwks_source_opts *opts,
                                               bool allow_oct, char *err, size_t err_len);

/* Stops background work for this source and frees it, waiting for a fetch in progress to end
 * (bounded by timeout_ms, name resolution aside); the last source freed stops and joins the thread.
 * Every subscriber must have unsubscribed. NULL is fine. */
void sl_jwks_source_free(struct sl_jwks_source *src);

/* The current set with a reference taken (NULL when none was ever loaded). Any thread; takes
 * a short mutex, so workers call it on notification, not per request. */
struct sl_jwks *sl_jwks_source_acquire(struct sl_jwks_source *src);

/* Counter of published sets (starts at 1 after the first successful load, 0 before). */
uint64_t sl_jwks_source_generation(const struct sl_jwks_source *src);

/*
 * Asks for an early fetch because a token named an unknown kid. Returns true when a fetch is
 * running or was started (the subscribers will be notified when it ends), false when the
 * min interval forbids one now (the caller answers at once). Any thread.
 */
bool sl_jwks_source_refetch(struct sl_jwks_source *src);

/* True while a fetch is in flight. */
bool sl_jwks_source_fetching(const struct sl_jwks_source *src);

/* Fetches that failed since start (stale-while-error events), for metrics and tests. */
uint64_t sl_jwks_source_failures(const struct sl_jwks_source *src);

struct sl_jwks_subscriber;
typedef void (*sl_jwks_notify_cb)(struct sl_jwks_subscriber *sub);

/* One worker's subscription, embedded in the worker's filter state. */
struct sl_jwks_subscriber {
    struct sl_post post; /* internal */
    struct sl_loop *loop;
    sl_jwks_notify_cb cb; /* runs on `loop` after a publish or a finished fetch attempt */
    void *data;
    struct sl_jwks_subscriber *next; /* internal */
};

/* Registers `sub` (its loop, cb, data set by the caller). Any thread. */
void sl_jwks_source_subscribe(struct sl_jwks_source *src, struct sl_jwks_subscriber *sub);

/* Unregisters `sub`; on `sub`'s loop thread. After it returns no further callback runs, and a
 * post already queued is harmless only if `sub` stays alive until the loop turn ends: call it
 * from worker_fini, where the loop no longer runs posts. */
void sl_jwks_source_unsubscribe(struct sl_jwks_source *src, struct sl_jwks_subscriber *sub);

#endif
