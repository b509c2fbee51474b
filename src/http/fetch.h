#ifndef SL_HTTP_FETCH_H
#define SL_HTTP_FETCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * A small blocking HTTP/1.1 client for control-plane work off the request path: key fetches,
 * shipping access-log segments, metadata polls. One request per connection (`Connection:
 * close`), every step (connect, TLS handshake, writes, reads) bounded by one deadline for the
 * whole exchange, HTTPS verified against the system store or a CA file (certificate chain and
 * host name, or the IP address for literals). Responses are parsed strictly: 1xx interim
 * answers skipped, Content-Length / chunked / close-delimited bodies, the head capped at 16 KiB
 * and the body at a size the caller picks. Name resolution uses getaddrinfo, whose own
 * timeouts are not bounded by the deadline. Never call it on a worker thread.
 */

/* A parsed http(s) URL. */
struct sl_fetch_url {
    bool https;
    bool host_is_ip;     /* a literal: no SNI, the certificate must name the IP */
    char host[256];      /* without brackets */
    char port[6];        /* decimal, the scheme's default when absent */
    char *path;          /* origin-form request target (starts with '/'), malloc'd */
    char authority[272]; /* the Host header value (port only when not the default) */
};

/*
 * Parses "http://host[:port][/path][?query]" or "https://...". Refuses user information,
 * fragments, spaces and control or non-ASCII bytes, and URLs over 2048 bytes. 0, or -EINVAL
 * (-ENOMEM) with a reason in `err`. On success the caller disposes of `u`.
 */
int sl_fetch_url_parse(const char *s, struct sl_fetch_url *u, char *err, size_t err_len);

/* Frees what sl_fetch_url_parse allocated; `u` may be zeroed or already disposed. */
void sl_fetch_url_dispose(struct sl_fetch_url *u);

/* Writes "scheme://authority/path" without the query string (which may carry credentials)
 * into `out` (NUL-terminated, truncated to `cap`), for log lines. */
void sl_fetch_url_loggable(const struct sl_fetch_url *u, char *out, size_t cap);

/*
 * Verification roots for HTTPS, loaded once and shared: `ca_file` (a PEM bundle) or, when
 * NULL, the system store. NULL with a reason in `err` when they cannot be loaded. Safe to use
 * from several threads at once; free it after the last sl_fetch using it returned.
 */
struct sl_fetch_tls *sl_fetch_tls_new(const char *ca_file, char *err, size_t err_len);

/* Frees `t`; NULL is fine. */
void sl_fetch_tls_free(struct sl_fetch_tls *t);

/* A request body streamed from a file: `len` bytes read with pread from `offset`. */
struct sl_fetch_body_file {
    int fd;
    uint64_t offset;
    uint64_t len;
};

/* Called once per header field of the final response, before sl_fetch returns, on the calling
 * thread. Name and value are not NUL-terminated and live only during the call; the value has
 * surrounding whitespace removed. */
typedef void (*sl_fetch_header_cb)(void *data, const char *name, size_t name_len, const char *value,
                                   size_t value_len);

/* One request. Zero fields take their defaults. Nothing is retained after sl_fetch returns. */
struct sl_fetch_req {
    const char *method;        /* a token; NULL = GET */
    const char *url;           /* as for sl_fetch_url_parse */
    const char *extra_headers; /* "Name: value\r\n" lines, or NULL; Host, Connection,
                                  User-Agent and Content-Length are written by the client */
    const void *body;          /* in memory, or NULL */
    size_t body_len;
    const struct sl_fetch_body_file *body_file; /* instead of `body`, or NULL */
    uint64_t timeout_ms;                        /* the whole exchange; default 5 s */
    size_t max_body_bytes;                      /* largest response body kept; default 1 MiB */
    bool cut_body; /* a body of any status over max_body_bytes is cut there (body_truncated)
                      instead of a 2xx one failing with -EFBIG: for callers to whom the body
                      is only diagnostic and the status is the answer */
    const struct sl_fetch_tls *tls; /* HTTPS roots; NULL = built from ca_file */
    const char *ca_file;            /* only when tls is NULL; NULL = system store */
    sl_fetch_header_cb on_header;   /* or NULL */
    void *header_data;
    const int *cancel_fd; /* when this fd is readable the exchange stops (-ECANCELED); NULL =
                             none. An eventfd written once by the thread that wants out. */
};

/* The answer. */
struct sl_fetch_resp {
    int status;          /* 101, or 200..599 */
    char *body;          /* malloc'd and NUL-terminated (also when empty) */
    size_t body_len;     /* without the NUL */
    bool body_truncated; /* a body longer than max_body_bytes was cut there (non-2xx, or any
                            status with rq->cut_body) */
    bool request_cut;    /* the server answered (not 2xx) before the whole request body was
                            sent: the status is its early refusal */
};

/*
 * Runs one exchange and fills `out` (which the caller disposes of). A request body (memory or
 * file) is sent with Content-Length; PUT, POST and PATCH without one send `Content-Length: 0`.
 * A 2xx body over max_body_bytes is an error unless rq->cut_body; any other status's body is
 * only kept up to that size (it is diagnostic), so that an error page never hides the status.
 * A server that answers before taking the whole request body (413, 401...) still yields its
 * status, with request_cut set (plain HTTP only); such an early answer with a 2xx status is
 * not one (the body was not taken) and sl_fetch fails with the write's error instead.
 *
 * Returns 0 whatever the HTTP status, or -errno with a reason in `err` (never containing the
 * query string or header values): -EINVAL (bad URL, method, extra_headers or CA file),
 * -EHOSTUNREACH (name resolution), -ECONNREFUSED and other connect errors, -ETIMEDOUT (the
 * deadline passed), -EPIPE / -ECONNRESET and other send errors (also when a 2xx answer came
 * before the whole request body was sent), -EPROTO (TLS failure or malformed response),
 * -EFBIG (a 2xx body too large, without cut_body), -E2BIG (a head over 16 KiB), -EIO (the body
 * file shrank or could not be read), -ECANCELED (cancel_fd became readable; checked before
 * connecting and at every wait), -ENOMEM. On failure `out` holds nothing to dispose of.
 * Blocks; for threads that may block.
 */
int sl_fetch(const struct sl_fetch_req *rq, struct sl_fetch_resp *out, char *err, size_t err_len);

/* Frees the body; `r` may be zeroed or already disposed. */
void sl_fetch_resp_dispose(struct sl_fetch_resp *r);

#endif
