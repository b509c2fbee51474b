#ifndef SL_TLS_TLS_INTERNAL_H
#define SL_TLS_TLS_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>

/* Shared between tls_ctx.c and tls_transport.c; not part of the module's API. */

struct ssl_ctx_st;
struct sl_tls_ctx_snap;
struct sl_tls_client_ctx;

/* The SSL_CTX a new server connection starts on (the default certificate's). Borrowed: valid
 * while the caller holds its snapshot reference. */
struct ssl_ctx_st *sl__tls_snap_initial(const struct sl_tls_ctx_snap *s);

/* The client context's SSL_CTX (borrowed) and whether it verifies the server. */
struct ssl_ctx_st *sl__tls_client_ctx_ssl_ctx(const struct sl_tls_client_ctx *c);
bool sl__tls_client_ctx_verifies(const struct sl_tls_client_ctx *c);

/* Formats "<message>: <first queued OpenSSL error>" into `err` and clears the error queue. */
void sl__tls_fmt_err(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
