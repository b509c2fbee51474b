#ifndef SL_HTTP_H1_PARSE_H
#define SL_HTTP_H1_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/slice.h"
#include "core/status.h"

/*
 * Strict, incremental, zero-copy HTTP/1.1 message-head parser (RFC 9112) and chunked-body
 * decoder. Nothing here allocates: every slice points into the caller's buffer and stays valid
 * until the caller consumes or moves those bytes. Header storage is an array owned by the
 * caller (on the request arena or in the connection), bounded by the caller's limit.
 *
 * Strictness is the point: anything that two HTTP implementations could read differently
 * (request smuggling) is an error, never "fixed up".
 */

/* Why a message was rejected. sl_h1_err_status() maps each to the HTTP status to answer. */
enum sl_h1_err {
    SL_H1_ERR_NONE = 0,
    SL_H1_ERR_BAD_REQUEST_LINE,      /* 400: malformed method, target, or version */
    SL_H1_ERR_BAD_VERSION,           /* 505: version other than HTTP/1.0 or HTTP/1.1 */
    SL_H1_ERR_URI_TOO_LONG,          /* 414 */
    SL_H1_ERR_HEADERS_TOO_LARGE,     /* 431: head bytes beyond max_head_bytes */
    SL_H1_ERR_TOO_MANY_HEADERS,      /* 431: more than max_headers fields */
    SL_H1_ERR_BAD_HEADER_NAME,       /* 400: empty name, non-token char, whitespace before colon */
    SL_H1_ERR_BAD_HEADER_VALUE,      /* 400: CR, LF, NUL or other CTL in a value */
    SL_H1_ERR_OBS_FOLD,              /* 400: line folding */
    SL_H1_ERR_BAD_LINE_ENDING,       /* 400: bare CR or bare LF */
    SL_H1_ERR_BAD_CONTENT_LENGTH,    /* 400: not digits, overflow, duplicates or list */
    SL_H1_ERR_CL_AND_TE,             /* 400: both Content-Length and Transfer-Encoding */
    SL_H1_ERR_BAD_TRANSFER_ENCODING, /* 400 (501 for a request's unknown coding is not used:
                                        anything but a single final "chunked" is 400) */
    SL_H1_ERR_MISSING_HOST,          /* 400: HTTP/1.1 request without Host */
    SL_H1_ERR_DUPLICATE_HOST,        /* 400 */
    SL_H1_ERR_BAD_HOST,              /* 400: Host value with invalid characters */
    SL_H1_ERR_BAD_CHUNK,             /* 400 (502 from upstream): malformed chunk framing */
    SL_H1_ERR_CHUNK_TOO_LARGE,       /* 400: chunk size beyond 2^62 / malformed hex length */
    SL_H1_ERR_BAD_STATUS_LINE,       /* 502: upstream status line malformed */
    SL_H1_ERR_COUNT
};

/* HTTP status to answer for a request-side error (400, 414, 431, 505; 502 for
 * BAD_STATUS_LINE). 0 for SL_H1_ERR_NONE, 400 for values outside the enum. */
int sl_h1_err_status(enum sl_h1_err err);

/* Short stable name for logs and metrics, e.g. "cl_and_te"; "unknown" outside the enum. */
const char *sl_h1_err_name(enum sl_h1_err err);

struct sl_h1_header {
    struct sl_slice name;  /* as received (case preserved) */
    struct sl_slice value; /* leading/trailing SP/HTAB trimmed */
};

/* A zero field means "no limit" (the buffer and the caller's header array still bound). */
struct sl_h1_limits {
    size_t max_head_bytes; /* request/status line + headers + final CRLF */
    size_t max_headers;    /* number of header fields; also bounded by the caller's array */
    size_t max_uri_bytes;  /* request-target length (requests only) */
};

enum sl_h1_body {
    SL_H1_BODY_NONE = 0,    /* no body (no CL/TE on a request; 1xx/204/304/HEAD response) */
    SL_H1_BODY_LENGTH,      /* content_length bytes follow */
    SL_H1_BODY_CHUNKED,     /* chunked coding follows */
    SL_H1_BODY_UNTIL_CLOSE, /* response only: read until the upstream closes */
};

/* Flags derived from the header block while parsing, so nobody rescans it. */
enum sl_h1_flags {
    SL_H1_F_CONN_CLOSE = 1u << 0,      /* Connection: close token */
    SL_H1_F_CONN_KEEPALIVE = 1u << 1,  /* Connection: keep-alive token */
    SL_H1_F_CONN_UPGRADE = 1u << 2,    /* Connection: upgrade token */
    SL_H1_F_EXPECT_CONTINUE = 1u << 3, /* Expect: 100-continue */
    SL_H1_F_HAS_CONN_HEADER = 1u << 4, /* a Connection header exists (names other hop-by-hop) */
};

struct sl_h1_request {
    struct sl_slice method;
    struct sl_slice target; /* request-target as received */
    struct sl_slice path;   /* origin-form path part (before '?'); for absolute-form, the path */
    struct sl_slice query;  /* after '?', without it; empty when none */
    struct sl_slice host;   /* Host header value (or authority of absolute-form); may be empty */
    int version_minor;      /* 0 or 1 */
    enum sl_h1_body body;
    uint64_t content_length;      /* with SL_H1_BODY_LENGTH */
    unsigned flags;               /* enum sl_h1_flags */
    struct sl_h1_header *headers; /* caller's array */
    size_t header_count;
    size_t head_len; /* bytes of the head including the final CRLF (valid on SL_DONE) */
};

struct sl_h1_response {
    int status; /* 100..599; anything else is SL_H1_ERR_BAD_STATUS_LINE */
    struct sl_slice reason;
    int version_minor;
    enum sl_h1_body body; /* computed from status and CL/TE; caller adjusts for HEAD */
    uint64_t content_length;
    unsigned flags;
    uint64_t keepalive_timeout_ms; /* from "Keep-Alive: timeout=N", 0 when absent */
    struct sl_h1_header *headers;
    size_t header_count;
    size_t head_len;
};

/*
 * Incremental head parsing. The caller keeps a `struct sl_h1_head_state` per message, zeroed
 * before the first call, and calls again with the same buffer (possibly longer, same start)
 * whenever more bytes arrive. The state only remembers how far the end-of-head search got,
 * so re-calls cost O(new bytes) until the head is complete; the full parse then runs once.
 */
struct sl_h1_head_state {
    size_t scanned; /* bytes already searched for the end of the head */
};

/*
 * Parses a request head from buf[0..len). `headers`/`max_headers` is the caller's storage.
 * Returns SL_DONE when the head is complete and valid (req filled, req->head_len set),
 * SL_AGAIN when more bytes are needed (nothing in req is valid yet), SL_ERROR with *err set.
 * Exceeding limits->max_head_bytes without finding the end is SL_ERROR/HEADERS_TOO_LARGE;
 * a request line longer than max_uri_bytes + 64 without its end is SL_ERROR/URI_TOO_LONG.
 * Leading empty lines (CRLF) before the request line are skipped (RFC 9112 2.2) and counted in
 * head_len; more than 8 of them is BAD_REQUEST_LINE. Rules beyond the grammar: Content-Length
 * must be a single 1*DIGIT <= 2^62; Transfer-Encoding must be a single field "chunked" and is
 * refused in HTTP/1.0 and together with Content-Length; target is origin-form, absolute-form
 * (http/https, no userinfo; its authority becomes req->host), "*" for OPTIONS only, or
 * authority-form for CONNECT only (req->host = target, path empty); an HTTP/1.1 request needs
 * exactly one valid, non-empty Host. path of "http://h" is "/" (a static string). A repeated
 * call after SL_DONE with the same state returns the same result. Never calls back.
 */
enum sl_status sl_h1_parse_request(struct sl_h1_head_state *st, const char *buf, size_t len,
                                   const struct sl_h1_limits *limits, struct sl_h1_request *req,
                                   struct sl_h1_header *headers, size_t max_headers,
                                   enum sl_h1_err *err);

/*
 * Parses a response head. `request_was_head` makes the body SL_H1_BODY_NONE; 1xx, 204 and 304
 * never have a body. A response with neither CL nor chunked is SL_H1_BODY_UNTIL_CLOSE.
 * Malformed status line (including versions other than 1.0/1.1, and leading empty lines) ->
 * SL_H1_ERR_BAD_STATUS_LINE; header errors as for requests. "HTTP/1.1 200\r\n" (no reason, no
 * SP) is accepted. For bodiless responses CL/TE are syntax-checked but never an error together;
 * otherwise CL+TE is CL_AND_TE and TE in an HTTP/1.0 response is BAD_TRANSFER_ENCODING
 * (RFC 9112 6.1). content_length is set whenever a Content-Length was present.
 */
enum sl_status sl_h1_parse_response(struct sl_h1_head_state *st, const char *buf, size_t len,
                                    const struct sl_h1_limits *limits, bool request_was_head,
                                    struct sl_h1_response *resp, struct sl_h1_header *headers,
                                    size_t max_headers, enum sl_h1_err *err);

/* Chunked-body decoder; zero it before the first call (or call sl_h1_chunked_init). */
struct sl_h1_chunked {
    int state;
    uint64_t remaining; /* data bytes left in the current chunk */
    size_t line_bytes;  /* bytes seen on the current size/trailer line, bounded */
    size_t trailer_bytes;
};

void sl_h1_chunked_init(struct sl_h1_chunked *ch);

/*
 * Consumes framing and returns data from in[0..len). On each call:
 *  - SL_OK: *consumed bytes of `in` were used; *data (possibly empty) is a slice of `in` with
 *    body bytes to forward. Call again with the rest.
 *  - SL_AGAIN: all `len` bytes were consumed (*consumed == len) and *data may hold data;
 *    more input is needed.
 *  - SL_DONE: the last chunk and trailers (ignored, dropped) are complete; *consumed bytes
 *    were used, the rest belongs to the next message.
 *  - SL_ERROR: *err is SL_H1_ERR_BAD_CHUNK or SL_H1_ERR_CHUNK_TOO_LARGE.
 * Chunk extensions are accepted and ignored (bounded by the line limit of 4096 bytes);
 * trailers are parsed for validity, bounded to 16 KiB, and dropped.
 */
enum sl_status sl_h1_chunked_parse(struct sl_h1_chunked *ch, const char *in, size_t len,
                                   size_t *consumed, struct sl_slice *data, enum sl_h1_err *err);

/* Finds a header by case-insensitive name; returns its index or -1. */
int sl_h1_find_header(const struct sl_h1_header *headers, size_t count, struct sl_slice name);

#endif
