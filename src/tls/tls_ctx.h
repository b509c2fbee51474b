#ifndef SL_TLS_TLS_CTX_H
#define SL_TLS_TLS_CTX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * TLS contexts (OpenSSL 3), built from plain descriptions so the config layer can fill them
 * from whatever it parses.
 *
 * Server side: a `struct sl_tls_ctx` is one listener's TLS setup. It owns an immutable,
 * refcounted snapshot (one SSL_CTX per certificate, the SNI name table, ALPN list) that a
 * reload replaces atomically; each connection takes a reference on the snapshot it starts with
 * and keeps it until it closes, so a reload never disturbs connections in progress.
 *
 * Certificate selection (SNI): each certificate gets its own SSL_CTX, all configured alike;
 * the servername callback looks the client's name up in a hash table of the certificates'
 * DNS names (exact first, then `*.` wildcards covering exactly one label) and switches the
 * connection with SSL_set_SSL_CTX. No SNI, or no match, keeps the first certificate (the
 * default) and costs no switch. See tls_ctx.c for why this beats SSL_use_cert_and_key.
 *
 * Sessions: no server-side session cache (it would be per worker and per process); resumption
 * is by stateless tickets only, encrypted with keys from a shared sl_tls_ticket_keys manager,
 * so a ticket resumes on every worker and every context that shares the manager.
 *
 * Client side: `struct sl_tls_client_ctx` for upstream TLS (verification, CA file, optional
 * client certificate, ALPN offer). Per-connection settings (SNI, host name to verify) go to
 * sl_tls_transport_init_client().
 *
 * Threads: everything here may be called from any thread; building and reloading read files,
 * so they belong to start-up or the control thread, never a worker's loop.
 */

struct sl_tls_ticket_keys;

/* Modern ECDHE + AEAD suites for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults). */
#define SL_TLS_DEFAULT_CIPHERS                                                                     \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"                                   \
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"                                   \
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"

/* TLS 1.3 suites for servers, in our order of preference: AES-128-GCM costs the least CPU
 * per byte with AES instructions; ChaCha20 goes first for clients that ask for it first. */
#define SL_TLS_DEFAULT_SUITES                                                                      \
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

#define SL_TLS_MAX_CERTS 4096u

enum sl_tls_client_auth {
    SL_TLS_CLIENT_AUTH_NONE = 0,
    SL_TLS_CLIENT_AUTH_OPTIONAL, /* a certificate is requested; if sent it must verify */
    SL_TLS_CLIENT_AUTH_REQUIRED, /* no verified certificate, no handshake */
};

struct sl_tls_cert_desc {
    const char *cert_file; /* PEM: the leaf first, then its intermediates */
    const char *key_file;  /* PEM private key, not encrypted */
};

/* Strings and arrays are only read during sl_tls_ctx_new (copied). */
struct sl_tls_server_desc {
    const struct sl_tls_cert_desc *certs; /* at least one; certs[0] is the default */
    size_t cert_count;
    const char *min_version;  /* "1.2" or "1.3"; NULL means "1.2" */
    const char *ciphers;      /* TLS 1.2 cipher list; NULL means SL_TLS_DEFAULT_CIPHERS */
    const char *ciphersuites; /* TLS 1.3 suites; NULL means SL_TLS_DEFAULT_SUITES */
    const char *const *alpn;  /* protocols in server preference ("h2", "http/1.1"); may be NULL */
    size_t alpn_count;
    const char *client_ca_file;          /* PEM CAs that sign client certificates; NULL: no mTLS */
    enum sl_tls_client_auth client_auth; /* must be OPTIONAL or REQUIRED with client_ca_file */
    bool session_tickets;
    /* Shared ticket keys when session_tickets is on (the context takes its own reference).
     * NULL then means a private manager with the defaults, shared by this context's reloads. */
    struct sl_tls_ticket_keys *ticket_keys;
};

struct sl_tls_ctx;
struct sl_tls_ctx_snap;

/*
 * Builds a server context: loads every certificate chain and key (each key must match its
 * certificate), the client CA file, and checks versions, ciphers and ALPN names. Returns the
 * context (caller owns; sl_tls_ctx_free) or NULL with the first problem in `err`, naming the
 * file for file problems.
 */
struct sl_tls_ctx *sl_tls_ctx_new(const struct sl_tls_server_desc *desc, char *err, size_t err_len);

/*
 * Rebuilds the snapshot from the same files and swaps it in atomically; new connections get
 * the new certificates, connections in progress keep theirs. On failure (unreadable or bad
 * PEM, key mismatch) the current snapshot stays and the message is in `err`.
 * Returns 0, -EINVAL (bad files) or -ENOMEM. Concurrent reloads are serialised.
 */
int sl_tls_ctx_reload(struct sl_tls_ctx *c, char *err, size_t err_len);

/* Frees the context and drops its reference on the current snapshot; connections that hold
 * snapshots keep them until they close. No sl_tls_ctx_acquire may run concurrently. */
void sl_tls_ctx_free(struct sl_tls_ctx *c);

/* Generation of the current snapshot: 1 after sl_tls_ctx_new, +1 per successful reload. */
uint64_t sl_tls_ctx_generation(struct sl_tls_ctx *c);

/*
 * Which certificate (index into desc.certs) the current snapshot serves for an SNI `name`
 * (NULL: no SNI). Same rules as the handshake: case-insensitive, one trailing dot ignored,
 * exact names before wildcards, the default (0) when nothing matches.
 */
size_t sl_tls_ctx_match(struct sl_tls_ctx *c, const char *name);

/*
 * Takes a reference on the current snapshot, lock-free (see tls_ctx.c). The caller owns the
 * reference and drops it with sl_tls_ctx_snap_release once nothing made from it (an SSL) is
 * alive. sl_tls_transport_init_server does this itself.
 */
struct sl_tls_ctx_snap *sl_tls_ctx_acquire(struct sl_tls_ctx *c);

/* Drops a reference; the last one frees the snapshot's SSL_CTXs. NULL is a no-op. */
void sl_tls_ctx_snap_release(struct sl_tls_ctx_snap *s);

uint64_t sl_tls_ctx_snap_generation(const struct sl_tls_ctx_snap *s);

/* Upstream (client) side. Strings are only read during sl_tls_client_ctx_new. */
struct sl_tls_client_desc {
    bool skip_verify;         /* true: accept any certificate and name (testing only) */
    const char *ca_file;      /* PEM trust anchors; NULL: the system's default store */
    const char *cert_file;    /* optional client certificate chain (PEM), with key_file */
    const char *key_file;     /* its private key (PEM, not encrypted) */
    const char *min_version;  /* "1.2" (NULL) or "1.3" */
    const char *max_version;  /* "1.2" or "1.3"; NULL: no maximum */
    const char *ciphers;      /* TLS 1.2 list; NULL means SL_TLS_DEFAULT_CIPHERS */
    const char *ciphersuites; /* TLS 1.3 suites; NULL means OpenSSL's defaults */
    const char *const *alpn;  /* protocols offered, in preference order; may be NULL */
    size_t alpn_count;
};

struct sl_tls_client_ctx;

/* Builds a client context. Returns it (caller owns; sl_tls_client_ctx_free) or NULL with the
 * reason in `err`. */
struct sl_tls_client_ctx *sl_tls_client_ctx_new(const struct sl_tls_client_desc *desc, char *err,
                                                size_t err_len);

/* Frees the context; connections made from it keep working (OpenSSL refcounts the SSL_CTX). */
void sl_tls_client_ctx_free(struct sl_tls_client_ctx *c);

#endif
