#ifndef SL_L4_TCP_PROXY_H
#define SL_L4_TCP_PROXY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "core/transport.h"
#include "tls/tls_types.h"

/*
 * L4 (TCP) forwarding for one `protocol: tcp` listener on one worker: each client connection
 * handed over is joined to a fresh connection to an endpoint of the listener's upstream, and
 * bytes flow both ways through a tunnel (l4/tunnel.h: spliced when both sides are plain TCP,
 * copied otherwise) until both directions ended.
 *
 * Per connection:
 * 1. Pick an endpoint with the upstream's balancer, health and zones (sl_upstream_pick; with
 *    balance: hash, the client address is the key). None eligible: the client connection is
 *    closed at once with a reset (nothing was forwarded) and counted.
 * 2. Circuit breakers: the connection counts against circuit_breaker.max_pending while it
 *    connects and against max_connections while it is open, shared with the HTTP side of the
 *    same upstream. Over either: closed with a reset, counted as an overflow.
 * 3. Connect (never an idle HTTP connection) within timeouts.connect. A refused or timed out
 *    connect is reported to the endpoint's health (so repeated failures eject it) and the next
 *    endpoint is tried, up to retries.attempts more (within the retry budget): nothing has
 *    been forwarded yet, so it is always safe. A successful connect is reported as a success
 *    at once (a half-open probe ends there, not when the stream ends).
 * 4. With upstream `proxy_protocol: v1|v2`, a PROXY header carrying the client address and the
 *    address it connected to is written before any client byte.
 * 5. The tunnel runs with the listener's limits.idle_timeout (no byte either way for that long
 *    closes both sides). Half-closes are passed on both ways.
 *
 * While a connection connects, the client is not read from: its bytes wait in the kernel.
 */

struct sl_worker;
struct sl_listener_conf;
struct sl_upstream_conf;
struct sl_upstream_rt;
struct sl_tcp_proxy;

/* Storage big enough for any transport a client connection may arrive with. */
union sl_l4_transport {
    struct sl_transport plain;
    struct sl_tls_transport tls;
};

/*
 * Creates the per-worker state of one tcp listener. `w` is the worker (its loop and buffer
 * pool are used); `lc` and `uc` (the listener's and its upstream's config) must outlive it;
 * `up` is the worker's runtime for the listener's upstream (borrowed, must outlive it).
 * Returns NULL on OOM.
 */
struct sl_tcp_proxy *sl_tcp_proxy_new(struct sl_worker *w, const struct sl_listener_conf *lc,
                                      const struct sl_upstream_conf *uc, struct sl_upstream_rt *up);

/* Aborts every connection (reset both sides; on_close runs for each before this returns) and
 * frees. Call before the upstream runtime is disposed. NULL is a no-op. */
void sl_tcp_proxy_free(struct sl_tcp_proxy *p);

/*
 * Takes a client connection whose transport is ready for data (plain TCP, or TLS with its
 * handshake done). The transport storage `tr` (tr_size bytes, at most sizeof(union
 * sl_l4_transport)) is moved (memcpy) into the proxy's connection object: the caller's copy
 * is dead afterwards and must not be closed. `client` is the client's address (the PROXY
 * source when a trusted header was accepted), `dest` the address the client connected to
 * (for an outgoing PROXY header; NULL: read from the socket with getsockname); both are
 * copied. `cookie` is handed back to on_close. A connection that is refused (no endpoint,
 * breaker overflow) is closed with a reset and on_close follows from the deferred pass, like
 * any other end; only when there is no memory for the connection object at all is it closed
 * at once and on_close called before this returns.
 */
void sl_tcp_proxy_accept(struct sl_tcp_proxy *p, const struct sl_transport *tr, size_t tr_size,
                         const struct sockaddr *client, const struct sockaddr *dest,
                         uint64_t cookie);

/* Hooks the caller sets after new. on_close: a connection ended (from the deferred pass),
 * with its client address and cookie. on_drained: the last connection ended after
 * sl_tcp_proxy_drain (from the deferred pass; also when none was open at the drain). */
struct sl_tcp_proxy_hooks {
    void (*on_close)(void *data, const struct sockaddr *client, uint64_t cookie);
    void (*on_drained)(void *data);
    void *data;
};

void sl_tcp_proxy_set_hooks(struct sl_tcp_proxy *p, const struct sl_tcp_proxy_hooks *h);

/* Drain: nothing flowing is stopped (a TCP stream has no request boundary), but on_drained is
 * reported when the count reaches 0; the gateway force-closes at drain_timeout. */
void sl_tcp_proxy_drain(struct sl_tcp_proxy *p);

/* Connections open (connecting or tunnelling). */
size_t sl_tcp_proxy_conn_count(const struct sl_tcp_proxy *p);

/* Counters for metrics, per worker and listener. */
struct sl_tcp_proxy_stats {
    uint64_t accepted;            /* connections handed over */
    uint64_t connect_failures;    /* connect attempts refused or failed (each attempt) */
    uint64_t connect_timeouts;    /* connect attempts past timeouts.connect (each attempt) */
    uint64_t retries;             /* attempts on another endpoint after a failed connect */
    uint64_t no_healthy_endpoint; /* refused: no endpoint eligible (or none configured) */
    uint64_t overflow;            /* refused: circuit_breaker max_connections / max_pending */
    uint64_t unavailable;         /* closed after every allowed attempt failed */
    uint64_t idle_timeouts;       /* tunnels closed by limits.idle_timeout */
    uint64_t errors;              /* tunnels ended by a reset or error on either side */
    uint64_t bytes_up;            /* client -> upstream, ended and live tunnels */
    uint64_t bytes_down;          /* upstream -> client */
    uint64_t active;              /* connections open now */
};

void sl_tcp_proxy_stats(const struct sl_tcp_proxy *p, struct sl_tcp_proxy_stats *out);

#endif
