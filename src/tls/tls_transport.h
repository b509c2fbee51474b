#ifndef SL_TLS_TLS_TRANSPORT_H
#define SL_TLS_TLS_TRANSPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "tls/tls_types.h"

/*
 * TLS as a struct sl_transport (core/transport.h) over a connected non-blocking socket, so the
 * HTTP layer reads and writes without knowing about TLS.
 *
 * Handshake: runs inside read and writev (they return -EAGAIN until it is done), or explicitly
 * with sl_tls_handshake() when the caller wants the handshake finished first (to read ALPN
 * before picking HTTP/1.1 or HTTP/2, for instance). Its timeout is the caller's timer.
 *
 * Readiness: after -EAGAIN, sl_tls_want() says which readiness the transport waits for. It may
 * be the opposite of the call (a read that must write handshake or alert bytes, a write that
 * must read the peer's handshake), so an edge-triggered owner clears and waits for exactly
 * those bits. pending() is nonzero while decrypted bytes or whole records sit inside OpenSSL:
 * those produce no new edge, so the owner keeps reading while it is nonzero.
 *
 * writev: small iovecs are gathered into records of up to 16 KiB (one record for a whole header
 * block, not one per line); large ones are encrypted in place. It may write part and report it
 * in *n. After -EAGAIN, or a partial count, the caller must offer the unwritten bytes again,
 * unchanged and not fewer, in its next writev (it may append more): OpenSSL has already
 * encrypted a record of them. An owner that keeps its unsent bytes queued does this naturally.
 *
 * EOF: read returns 0 with *n = 0 after the peer's close_notify. An EOF without close_notify
 * is a truncation: a client connection reports -ECONNRESET, since an upstream response framed
 * by connection close could have been cut; an established server connection reports a plain
 * EOF, since a request is always framed by its headers and many clients close without
 * close_notify (the reason stays available to sl_tls_last_error_str). A peer that leaves in
 * the middle of the handshake is -ECONNRESET on both sides.
 *
 * Errors: -ECONNRESET / -EPIPE / other -errno from the socket, -EPROTO for TLS protocol and
 * verification failures; sl_tls_last_error_str() gives OpenSSL's reason for logs. The thread's
 * OpenSSL error queue is cleared before and after each call, so one connection's error never
 * shows up on another.
 *
 * A connection stays on one thread at a time (its worker). SIGPIPE must be ignored by the
 * process, as main.c does: OpenSSL's socket BIO writes with write(), not MSG_NOSIGNAL.
 */

struct sl_tls_ctx;
struct sl_tls_client_ctx;
struct ssl_session_st;

/* The 16 KiB maximum TLS plaintext record (RFC 8446 §5.1). */
#define SL_TLS_RECORD_BYTES 16384u

extern const struct sl_transport_ops sl_tls_transport_ops;

/*
 * Server side over an accepted socket: takes a reference on `ctx`'s current snapshot (kept
 * until close, so a reload does not disturb this connection) and creates the SSL in accept
 * state. `t` is the caller's storage. On success (0) the transport owns `fd`; on failure
 * (-ENOMEM) `fd` stays the caller's and `t` needs no close. No callback runs.
 */
int sl_tls_transport_init_server(struct sl_tls_transport *t, int fd, struct sl_tls_ctx *ctx);

/*
 * Client side over a connected socket (upstream TLS). `server_name` (may be NULL) is sent as
 * SNI unless it is an IP literal, and, when the context verifies, the certificate must match
 * it (DNS name, or IP address for a literal). `session` (may be NULL; not taken, OpenSSL keeps
 * its own reference) is offered for resumption. Ownership and results as for the server side;
 * -EINVAL when verification is on and `server_name` is NULL or unusable.
 */
int sl_tls_transport_init_client(struct sl_tls_transport *t, int fd, struct sl_tls_client_ctx *ctx,
                                 const char *server_name, struct ssl_session_st *session);

/* The TLS transport behind a generic one, or NULL when `t` is not TLS. */
struct sl_tls_transport *sl_tls_from_transport(struct sl_transport *t);

/*
 * Drives the handshake. SL_OK once it is complete (at once if it already was), SL_AGAIN when
 * it waits for I/O (see sl_tls_want), SL_ERROR when it failed (see sl_tls_last_error_str; the
 * transport then only accepts close).
 */
enum sl_status sl_tls_handshake(struct sl_tls_transport *t);

bool sl_tls_is_handshake_done(const struct sl_tls_transport *t);

/* EPOLLIN and/or EPOLLOUT: what the last -EAGAIN (or SL_AGAIN) waits for; 0 after a call that
 * made progress. */
uint32_t sl_tls_want(const struct sl_tls_transport *t);

/*
 * Describes the last failure for a log line ("handshake: certificate verify failed: hostname
 * mismatch"), without secrets. Writes at most `cap` bytes including the NUL and returns `buf`
 * (an empty string when nothing failed).
 */
const char *sl_tls_last_error_str(const struct sl_tls_transport *t, char *buf, size_t cap);

/* True when the peer presented a certificate that verified against our CAs (server side with
 * client_auth; client side unless skip_verify). Meaningful once the handshake is done. */
bool sl_tls_peer_is_verified(const struct sl_tls_transport *t);

/*
 * The peer certificate's subject as an RFC 2253 string ("CN=client,O=Example") into `buf`
 * (NUL-terminated, truncated to `cap`). Returns the full length, or 0 when there is no peer
 * certificate. Allocates temporarily; meant for filters and logs, not per byte.
 */
size_t sl_tls_peer_subject(const struct sl_tls_transport *t, char *buf, size_t cap);

/* The ALPN protocol agreed on (not NUL-terminated; *len 0 when none), borrowed until close. */
const unsigned char *sl_tls_alpn(const struct sl_tls_transport *t, size_t *len);

/* The SNI name the client sent (server side) or we sent (client side), or NULL. Borrowed. */
const char *sl_tls_server_name(const struct sl_tls_transport *t);

/* Whether the handshake resumed a session (ticket). */
bool sl_tls_is_resumed(const struct sl_tls_transport *t);

/* "TLSv1.3", "TLSv1.2" (static strings). */
const char *sl_tls_version_name(const struct sl_tls_transport *t);

/* Client side: the session to offer next time, with one reference the caller owns
 * (SSL_SESSION_free), or NULL when none is resumable yet (TLS 1.3 tickets arrive after the
 * handshake, with the first reads). */
struct ssl_session_st *sl_tls_get1_session(const struct sl_tls_transport *t);

/* The OpenSSL connection (borrowed, for diagnostics and tests); NULL before init. */
struct ssl_st *sl_tls_ssl(const struct sl_tls_transport *t);

#endif
