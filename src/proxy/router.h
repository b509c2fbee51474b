#ifndef SL_PROXY_ROUTER_H
#define SL_PROXY_ROUTER_H

#include <stddef.h>

#include "core/slice.h"

struct sl_config;
struct sl_route_conf;
struct sl_h1_header;

/*
 * Route lookup for one listener, compiled once per config snapshot and then read-only
 * (shared by all workers without locks). Lookup cost depends on the host and path length and
 * on the few routes that share the longest matching prefix, not on the number of routes.
 *
 * Precedence (most specific wins), documented in docs/configuration.md:
 *  1. host: exact host > wildcard host (longer suffix first) > no host condition;
 *  2. path: exact `path` > longest `path_prefix` > no path condition;
 *  3. then routes with more conditions (methods, headers) first;
 *  4. then file order.
 * A route whose host/path match but whose methods or headers do not is skipped, and the
 * search continues with the next candidate in that order.
 *
 * Matching rules in detail:
 *  - Host comes first, strictly: every route of a more specific host class is tried before
 *    any route of a less specific one. So for a request to api.example.com, a route with
 *    `host: api.example.com` and only `path_prefix: /` beats a route with
 *    `host: "*.example.com"` and `path: /exact/match`, and that one beats a route without a
 *    host that has an exact path.
 *  - Request host: a `:port` suffix is ignored (`[v6]:port` keeps the brackets: `[::1]`),
 *    comparison is ASCII case-insensitive, and one trailing dot is ignored
 *    (`Example.COM.:8080` matches `host: example.com`). Configured hosts are normalised the
 *    same way; IPv6 literals are written in brackets (`host: "[::1]"`).
 *  - `host: "*.example.com"` matches any host ending in `.example.com` with at least one
 *    byte before it (`a.example.com`, `a.b.example.com`), not `example.com` itself. Among
 *    wildcards the longest suffix wins (`*.api.example.com` before `*.example.com`). `*` alone
 *    is the same as no host condition. A `*` anywhere else is not a wildcard.
 *  - `path` is an exact byte comparison with the request path (no query, no decoding,
 *    case-sensitive).
 *  - `path_prefix: /users` matches on a segment boundary: `/users` and `/users/...`, but not
 *    `/usersX`. A prefix ending in `/` (`/users/`, `/`) is a plain byte prefix: `/users/`
 *    matches `/users/x` but not `/users`. The longest matching prefix is tried first, then
 *    shorter ones.
 *  - `methods`: the request method must be in the set (tokens outside the standard set are
 *    compared exactly, case-sensitively). `headers`: every listed header must be present
 *    (name case-insensitive) with exactly the listed value; with repeated fields, any one
 *    field having that value is enough.
 *  - "More conditions" counts a method set as one condition and each header as one.
 */
struct sl_router;

struct sl_route_input {
    struct sl_slice host;   /* Host value; a `:port` suffix is ignored; case-insensitive */
    struct sl_slice path;   /* path without query, as received (no decoding) */
    struct sl_slice method; /* method token */
    unsigned method_bit;    /* enum sl_method for `method` (SL_METHOD_OTHER when unknown) */
    const struct sl_h1_header *headers;
    size_t header_count;
};

/*
 * Builds the router for routes that serve listener `listener_name` (routes with no
 * `listeners:` serve all; a NULL `listener_name` takes every route). `cfg` must outlive the router
 * (routes are referenced, not copied). Returns NULL on allocation failure. Caller owns the result
 * (sl_router_free).
 */
struct sl_router *sl_router_new(const struct sl_config *cfg, const char *listener_name);

void sl_router_free(struct sl_router *r);

/*
 * Returns the best matching route, or NULL when none matches (the caller answers 404).
 * `in` and everything it points to is only read during the call. Never allocates, never
 * calls back; safe to call from any thread concurrently.
 */
const struct sl_route_conf *sl_router_match(const struct sl_router *r,
                                            const struct sl_route_input *in);

#endif
