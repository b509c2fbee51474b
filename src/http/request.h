#ifndef SL_HTTP_REQUEST_H
#define SL_HTTP_REQUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "core/arena.h"
#include "core/slice.h"
#include "core/status.h"
#include "http/h1_parse.h"

/*
 * The request object every protocol front-end produces (HTTP/1.1 now, HTTP/2 later) and
 * every handler consumes. The head lives in the request's arena, so it stays valid for the
 * whole exchange whatever happens to the connection's buffers. The body and the response go
 * through the stream functions below; a front-end implements them for its framing.
 *
 * Lifetime: created by the front-end, handed to the handler's on_request, and freed by the
 * front-end after the handler called sl_request_finish() or after on_abort returned.
 */

struct sl_request;
struct sl_server_conn;
struct sl_worker;

/* What the layer above (request handling) registers with a listener. All run on the
 * request's worker; none may free the request. */
struct sl_request_handler {
    /* A complete head arrived. The handler now drives the exchange. */
    void (*on_request)(struct sl_request *req);
    /* Body bytes (or the body's end, or a body error) became available after a peek said
     * SL_AGAIN. */
    void (*on_body)(struct sl_request *req);
    /* The client can take more response bytes after a write said -EAGAIN. */
    void (*on_writable)(struct sl_request *req);
    /* The client went away or timed out; the handler must release what it holds (upstream
     * connections, timers). The request is freed right after this returns. */
    void (*on_abort)(struct sl_request *req);
    void *data; /* the handler's context (per listener, per worker) */
};

/*
 * What the access log and the metrics record of one request. The front-end fills the
 * status, byte counts and times; the handler the route, upstream and error fields. Strings
 * live in the request's arena or in the config snapshot, valid until the request is freed.
 */
struct sl_request_log {
    const char *route;          /* route name, or NULL (no route matched) */
    const char *upstream;       /* upstream name, or NULL */
    const char *endpoint;       /* address of the last endpoint tried, or NULL */
    const char *error;          /* why the gateway answered itself (an error name), or NULL */
    const char *filter;         /* the filter that answered (its type name), or NULL */
    uint32_t retries;           /* attempts after the first */
    int status;                 /* status sent; 0 when no response started */
    bool aborted;               /* the client went away, or a timeout cut the exchange */
    uint64_t bytes_in;          /* request bytes received: head and body as framed */
    uint64_t bytes_out;         /* response bytes written: head, body and framing */
    uint64_t start_us;          /* head complete (loop clock) */
    uint64_t end_us;            /* last response byte handed to the socket, or the abort */
    uint64_t upstream_start_us; /* first upstream attempt began; 0 = none */
    uint64_t upstream_end_us;   /* upstream response complete (or failed) */
    uint64_t cpu_ns;            /* worker time spent on this request (sl_loop_charge) */
};

struct sl_request {
    struct sl_arena arena;
    /* head, copied into the arena */
    struct sl_slice method;
    unsigned method_bit; /* enum sl_method */
    struct sl_slice target, path, query;
    struct sl_slice host;      /* Host (or absolute-form authority) with any port */
    struct sl_slice host_name; /* host without port, for routing */
    int version_minor;
    unsigned flags; /* enum sl_h1_flags */
    struct sl_h1_header *headers;
    size_t header_count;
    enum sl_h1_body body_kind;
    uint64_t content_length;
    struct sl_slice request_id; /* from X-Request-Id or generated */
    struct sl_slice client_ip;  /* textual peer address */
    uint64_t id;                /* connection id << 16 | request number, for logs */
    uint64_t start_ms;
    /* the front-end */
    struct sl_server_conn *conn;
    struct sl_worker *worker;
    /* the handler's context (its sl_request_handler.data), its state for this request (an
     * exchange), and the route it chose */
    void *handler_ctx;
    void *handler_state;
    const void *route;
    bool response_started;
    bool keepalive; /* the front-end may reuse the connection after this response */
    bool secure;    /* the client connection is encrypted (TLS): https */
    /* set by filters */
    struct sl_slice consumer; /* who is calling (api_key consumer name), for limits and logs */
    const void *jwt_claims;   /* verified token claims (filters/jwt.h reads them) */
    char *resp_extra;         /* header lines added to the response, in the arena */
    size_t resp_extra_len, resp_extra_cap;
    struct sl_request_log log;
    /* Set by the handler: called once when the front-end frees the request (after the
     * response is out or the exchange was aborted, after on_request_done), so that whatever
     * the request still points into (its route, a direct response's body) is kept until
     * then. */
    void (*on_release)(struct sl_request *req, void *data);
    void *release_data;
};

/*
 * Request body, with framing removed. Returns SL_OK with *data (bytes at the head of the
 * body), SL_AGAIN (nothing now; on_body will be called), SL_DONE (complete) or SL_ERROR (the
 * client sent a malformed or oversized body; *status is 400 or 413 and the connection will be
 * closed). The first peek on an `Expect: 100-continue` request sends "100 Continue".
 */
enum sl_status sl_request_body_peek(struct sl_request *req, struct sl_slice *data, int *status);

/* Marks `n` bytes from the last peek as used. */
void sl_request_body_consume(struct sl_request *req, size_t n);

/*
 * Starts the response: `head` is a complete serialized status line + headers (the front-end
 * adds nothing but framing headers it needs: it appends Content-Length / Transfer-Encoding /
 * Connection per `body_kind`/`length` and its keep-alive decision, then the final CRLF).
 * So `head` ends after the last header line, without the blank line.
 * Returns 0 or -ENOMEM (head too large for the output buffer).
 */
int sl_request_respond_head(struct sl_request *req, int status, const char *head, size_t len,
                            enum sl_h1_body body_kind, uint64_t length);

/*
 * Writes response body bytes. *written tells how many were taken. Returns 0, -EAGAIN when
 * the client cannot take more now (on_writable follows), or -errno (the client is gone;
 * on_abort follows from the loop, not from inside this call).
 */
int sl_request_write(struct sl_request *req, const char *data, size_t len, size_t *written);

/* Sends whatever response bytes are queued (a head waiting for its body) without body data.
 * Returns 0 when nothing is pending, -EAGAIN (on_writable follows) or -errno. */
int sl_request_flush(struct sl_request *req);

/*
 * Ends the response (final chunk when chunked) and hands the request back to the front-end,
 * which frees it once the last bytes are out. `reusable` false forces the connection closed
 * afterwards (e.g. the request body was not fully read). The handler must not touch `req`
 * after this call.
 */
void sl_request_finish(struct sl_request *req, bool reusable);

/*
 * Answers a whole small response in one call (errors, direct responses): status line,
 * Content-Type, Content-Length, X-Request-Id, `extra_headers` (serialized lines, may be
 * NULL), and the body, then finishes the request. Returns 0 or -ENOMEM.
 */
int sl_request_respond(struct sl_request *req, int status, const char *content_type,
                       const char *extra_headers, size_t extra_len, const char *body,
                       size_t body_len);

/* Answers a gateway-generated error as JSON {"status":N,"error":"<name>","request_id":"..."}
 * and finishes the request. */
void sl_request_respond_error(struct sl_request *req, int status, const char *name);

/* ---- helpers for filters (request_util.c); all allocation is in the request arena ---- */

/*
 * The client's verified identity (the subject of a client certificate checked against the
 * listener's client_ca, as "CN=client,O=Example") into `buf`, NUL-terminated and truncated to
 * `cap`. Returns its full length, or 0 when the client presented no verified certificate.
 */
size_t sl_request_client_subject(const struct sl_request *req, char *buf, size_t cap);

struct sockaddr_storage;

/*
 * The client connection's two ends, for a PROXY header towards an upstream: `client` (may be
 * NULL) gets the client's address and port (a trusted PROXY header's source, or the TCP
 * peer), from memory; `local` (may be NULL) the address the client connected to, which costs
 * a getsockname(), so callers ask for it once per upstream connection, not per request.
 * Returns 0, or -errno (-ENOTCONN without a connection, -EAFNOSUPPORT for a peer that is not
 * IPv4 or IPv6; `client` then has family AF_UNSPEC).
 */
int sl_request_conn_addrs(const struct sl_request *req, struct sockaddr_storage *client,
                          struct sockaddr_storage *local);

/* First header named `name` (case-insensitive). Returns true and sets *value when found. */
bool sl_request_header(const struct sl_request *req, const char *name, struct sl_slice *value);

/* Removes every header named `name`, so it never reaches the upstream. */
void sl_request_header_remove(struct sl_request *req, const char *name);

/* Appends a header sent upstream (copies name and value into the arena). 0 or -ENOMEM. */
int sl_request_header_append(struct sl_request *req, struct sl_slice name, struct sl_slice value);

/* Query parameter `name`, percent-decoded into the arena when it contains escapes. Returns true
 * when present (value may be empty); false when absent or its escapes are malformed. */
bool sl_request_query_param(struct sl_request *req, const char *name, struct sl_slice *value);

/* Cookie `name` from the Cookie header(s). Returns true when present. */
bool sl_request_cookie(const struct sl_request *req, const char *name, struct sl_slice *value);

/* Adds a "name: value" line to every response to this request (the upstream's, a direct
 * response, or a filter's answer). 0 or -ENOMEM. */
int sl_request_add_response_header(struct sl_request *req, struct sl_slice name,
                                   struct sl_slice value);

/* Standard reason phrase for a status ("OK", "Not Found", ...); "" when unknown. */
const char *sl_http_reason(int status);

#endif
