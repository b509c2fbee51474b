#ifndef SL_L4_EDGE_H
#define SL_L4_EDGE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/*
 * The accept path of every listener, between the kernel and the protocol (HTTP or a TCP
 * tunnel): the listener's deny/allow lists, the per-IP connection cap and new-connection rate,
 * a PROXY protocol header from trusted senders, and the TLS handshake. A step that is not
 * configured costs nothing; a connection that needs none of them goes to its protocol from
 * the accept callback itself, with no object of its own.
 *
 * A connection that needs a step lives here as a small pending connection (its own timer:
 * proxy_protocol.timeout, then tls.handshake_timeout) until it is handed over with
 * sl_gw_listener_adopt, or refused and closed. An untrusted peer still silent when
 * proxy_protocol.timeout expires goes on to its protocol (whose own timeouts then apply).
 * Refusals are counted per listener (struct sl_listener_rt), never logged per connection:
 * under a flood the log would be the attack.
 *
 * The per-IP count a connection holds is released through sl_edge_release with the cookie
 * the protocol got at hand-over, when the protocol closes the connection. The cookie is the
 * per-IP table that counted the connection (0: none): a reload that changes the limits
 * gives the listener a new table while older connections still hold counts in theirs.
 */

struct sl_gw_listener;
struct sl_gw_worker;

/* Takes accepted socket `fd` from `peer` on listener `gl` (ownership passes here). */
void sl_edge_accept(struct sl_gw_listener *gl, int fd, const struct sockaddr *peer);

/* Per-worker set-up and tear-down; dispose closes every pending connection. */
void sl_edge_worker_init(struct sl_gw_worker *gw);
void sl_edge_worker_dispose(struct sl_gw_worker *gw);

/* Draining: pending connections (no request yet) are closed. */
void sl_edge_drain(struct sl_gw_worker *gw);

/* Pending connections on this worker. */
size_t sl_edge_conn_count(const struct sl_gw_worker *gw);

/* Releases what a handed-over connection held (its per-IP count), given its client address
 * and cookie. Safe from any worker. */
void sl_edge_release(struct sl_gw_listener *gl, const struct sockaddr *client, uint64_t cookie);

#endif
