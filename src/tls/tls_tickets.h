#ifndef SL_TLS_TLS_TICKETS_H
#define SL_TLS_TLS_TICKETS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * Session-ticket keys (RFC 5077 tickets, and TLS 1.3 stateless PSK tickets): one manager per
 * process, shared by every worker and every server context, so a ticket issued by any worker
 * resumes on any other and survives certificate reloads.
 *
 * The manager holds a ring of keys: the newest encrypts, the older ones still decrypt (a ticket
 * under an older key resumes and the client receives a fresh ticket under the current key). A
 * rotation adds a key from RAND_bytes and drops the oldest once the ring is full. Rotation
 * happens by itself on the handshake path once `rotation_ms` passed since the last one (no timer
 * needed), and on demand with sl_tls_ticket_keys_rotate().
 *
 * Thread safety: every function may be called from any thread. Readers (handshakes) take no lock
 * and write no shared memory; see tls_tickets.c for the sequence-lock design.
 *
 * Lifetime: refcounted. Each server context built with a manager holds a reference, so the
 * creator may drop its own with sl_tls_ticket_keys_free() whenever it no longer needs it.
 */

#define SL_TLS_TICKET_ROTATION_DEFAULT_MS (3600u * 1000u)
#define SL_TLS_TICKET_KEYS_DEFAULT_COUNT 3u
#define SL_TLS_TICKET_KEYS_MAX 8u
#define SL_TLS_TICKET_NAME_BYTES 16u

struct sl_tls_ticket_keys;
struct ssl_ctx_st;

/*
 * Creates a manager with one fresh key. `rotation_ms` 0 means the default (1 h); `key_count` is
 * the ring size, current key included (0 means the default 3; 2 to SL_TLS_TICKET_KEYS_MAX), so
 * a ticket is accepted for at least (key_count - 1) * rotation_ms and at most key_count times.
 * Returns the manager with one reference (release with sl_tls_ticket_keys_free), or NULL with a
 * message in `err` (bad count, RAND failure, OOM).
 */
struct sl_tls_ticket_keys *sl_tls_ticket_keys_new(uint64_t rotation_ms, unsigned key_count,
                                                  char *err, size_t err_len);

/* Adds a reference (for another owner). Returns `k`. */
struct sl_tls_ticket_keys *sl_tls_ticket_keys_ref(struct sl_tls_ticket_keys *k);

/* Drops a reference; the last one wipes the keys and frees the manager. NULL is a no-op. */
void sl_tls_ticket_keys_free(struct sl_tls_ticket_keys *k);

/* Rotates now: a new current key, the oldest dropped when the ring is full. Returns 0, or
 * -EIO when RAND_bytes failed (the ring is then unchanged). */
int sl_tls_ticket_keys_rotate(struct sl_tls_ticket_keys *k);

/* Number of rotations so far (for logs, metrics and tests). */
uint64_t sl_tls_ticket_keys_rotations(const struct sl_tls_ticket_keys *k);

/* How long a ticket stays valid, in seconds: (key_count - 1) * rotation, at least 1. Server
 * contexts use it as the session lifetime (the ticket_lifetime_hint clients see). */
uint64_t sl_tls_ticket_keys_lifetime_s(const struct sl_tls_ticket_keys *k);

/*
 * Installs the manager on an OpenSSL server context: the ticket callback
 * (SSL_CTX_set_tlsext_ticket_key_evp_cb) and the session lifetime. The context keeps a borrowed
 * pointer: the caller keeps a reference for at least as long as the context may handshake.
 * Returns 0, or -ENOMEM.
 */
int sl_tls_ticket_keys_attach(struct ssl_ctx_st *ctx, struct sl_tls_ticket_keys *k);

#endif
