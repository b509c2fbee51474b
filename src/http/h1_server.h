#ifndef SL_HTTP_H1_SERVER_H
#define SL_HTTP_H1_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "core/loop.h"
#include "core/slab.h"
#include "http/h1_parse.h"
#include "http/request.h"

struct sl_limits_conf;
struct sl_transport;
struct sl_worker;
struct sl_server_conn;

/*
 * HTTP/1.1 front-end: one per listener per worker. Accepted sockets become server
 * connections that parse requests (strictly), hand them to the registered handler as
 * struct sl_request, frame responses, and enforce the listener's limits and timeouts.
 * Everything runs on the owning worker's loop.
 */
struct sl_conn_gate;

struct sl_h1_server {
    struct sl_worker *worker;
    struct sl_loop *loop;
    const struct sl_limits_conf *limits;
    struct sl_h1_limits parse_limits;
    const struct sl_request_handler *handler;
    struct sl_h1_header *scratch; /* parse-time header storage, max_header_count entries */
    size_t scratch_cap;
    struct sl_slab conn_slab;     /* connection objects */
    struct sl_server_conn *conns; /* every open connection, for drain and stop */
    size_t conn_count;
    uint64_t next_conn_id;
    uint64_t rng; /* request-id generator state */
    bool draining;
    const char *name;          /* listener name, for logs */
    struct sl_conn_gate *gate; /* process-wide connection count, or NULL */
    /* Called when the last connection closes while draining. */
    void (*on_drained)(struct sl_h1_server *srv, void *data);
    void *on_drained_data;
    /* Called when a connection adopted with a nonzero cookie closes, with its client address
     * (the per-IP count it held is released there). */
    void (*on_conn_closed)(void *data, const struct sockaddr *client, uint64_t cookie);
    void *on_conn_closed_data;
    /* Called once per request whose head was complete, when it ends (response out, or the
     * exchange aborted), with req->log filled in; before the request is freed. Must not
     * keep `req`. */
    void (*on_request_done)(struct sl_request *req, void *data);
    void *on_request_done_data;
};

/* Prepares a front-end. `limits` and `handler` must outlive it. Returns 0 or -ENOMEM. */
int sl_h1_server_init(struct sl_h1_server *srv, struct sl_worker *w, const char *name,
                      const struct sl_limits_conf *limits,
                      const struct sl_request_handler *handler);

/*
 * Switches to other limits (a reload): connections use them from their next request or wait
 * on. `name` and `limits` must outlive the front-end or the next call. Between loop callbacks
 * only (never during a parse). 0, or -ENOMEM (the old limits stay).
 */
int sl_h1_server_set_limits(struct sl_h1_server *srv, const char *name,
                            const struct sl_limits_conf *limits);

/* Closes every connection (aborting requests in flight) and frees the front-end's storage. */
void sl_h1_server_dispose(struct sl_h1_server *srv);

/* Takes ownership of accepted socket `fd` and starts reading requests on it. */
void sl_h1_server_accept(struct sl_h1_server *srv, int fd, const struct sockaddr *peer,
                         socklen_t peer_len);

/*
 * Takes a client connection whose transport is ready for data (plain TCP, or TLS after its
 * handshake). The transport's storage (`size` bytes, at most sizeof(struct sl_tls_transport)) is
 * moved into the connection: the caller's copy is dead afterwards and must not be closed. `client`
 * is the client's address (a trusted PROXY header's source, or the TCP peer); `cookie` is
 * handed to on_conn_closed when nonzero.
 */
void sl_h1_server_adopt(struct sl_h1_server *srv, const struct sl_transport *tr, size_t size,
                        const struct sockaddr *client, uint64_t cookie);

/* Starts draining: idle connections close now, busy ones after their current response
 * (with `Connection: close`). on_drained fires once none is left. */
void sl_h1_server_drain(struct sl_h1_server *srv);

#endif
