#ifndef SL_OBS_ADMIN_H
#define SL_OBS_ADMIN_H

#include <stddef.h>

/*
 * The admin API: an HTTP/1.1 listener on its own thread and event loop (the same strict
 * parser, limits and timeouts as the public listeners, with small values), serving the
 * process's status, routes, upstreams and metrics as JSON and Prometheus text, the HTML
 * status page, and a few runtime changes (endpoints added or removed by hand, reload, drain).
 * Requests to it never go through the gateway's workers, so a saturated gateway can still be
 * inspected. See docs/admin-api.md.
 *
 * Endpoints added through the API are kept here, per upstream name, and handed to the pools
 * as their admin source (sl_pool_set_source). They survive config reloads (re-applied to the
 * new generation's pools by sl_admin_on_reload) but not a restart.
 */

struct sl_obs;
struct sl_admin;
struct sl_admin_conf;
struct sl_runtime;

/*
 * Reads the bearer token (when conf->token_file is set: its first line, trimmed; an empty
 * or unreadable file is an error), binds conf->addr and starts the admin thread. `obs` and
 * `conf` must outlive the admin listener (the conf is read at start only, but `obs` is read
 * for every request). Returns the listener (release with sl_admin_stop), or NULL with a
 * message in `err` ("admin: cannot listen on 127.0.0.1:9901: Address already in use").
 * Must be called after obs->gw is set.
 */
struct sl_admin *sl_admin_start(struct sl_obs *obs, const struct sl_admin_conf *conf, char *err,
                                size_t err_len);

/* Stops the admin thread (closing its connections, answering nothing more), joins it and
 * frees everything, including the admin endpoint lists. NULL is a no-op. Main thread. */
void sl_admin_stop(struct sl_admin *a);

/*
 * A new config generation `rt` went live: gives each of its pools the endpoints the admin
 * API added to the upstream of that name, and forgets the lists of upstreams `rt` no longer
 * has. Call after every swap (reloads and rollbacks), from any thread, the admin thread
 * included: POST /reload holds no admin lock while it waits for the reload, so the reload may
 * call this from inside it. Takes the admin's list lock, then the pools' publisher locks.
 * NULL `a` is a no-op. `rt` stays the caller's.
 */
void sl_admin_on_reload(struct sl_admin *a, struct sl_runtime *rt);

#endif
