#ifndef SL_TLS_TLS_TYPES_H
#define SL_TLS_TLS_TYPES_H

#include <stdint.h>

/* core/transport.h is not a _types.h, but it is where struct sl_transport is defined and it
 * includes only system headers, so embedding through it keeps the rule's intent. */
#include "core/transport.h"

struct ssl_st;
struct sl_tls_ctx_snap;

/*
 * A TLS connection's transport, for owners that embed it (connection structs from a worker's
 * pool); the fields are private to tls_transport.c. Initialise with sl_tls_transport_init_server
 * or _client, pass &t->base wherever a struct sl_transport * is expected, and do not copy it.
 * About 48 bytes besides OpenSSL's own per-connection state.
 */
struct sl_tls_transport {
    struct sl_transport base; /* first: the ops receive &base */
    struct ssl_st *ssl;
    struct sl_tls_ctx_snap *snap; /* server side: the snapshot this connection started on */
    unsigned long ssl_err;        /* first OpenSSL error of the last failure (ERR_peek_error) */
    int sys_err;                  /* errno of the last SSL_ERROR_SYSCALL, or 0 */
    uint16_t flags;               /* SL__TLS_F_* in tls_transport.c */
    char *subject;                /* verified peer subject, formatted once (peer_subject) */
    uint16_t subject_len;
    uint8_t want;   /* EPOLLIN / EPOLLOUT after the last -EAGAIN */
    uint8_t err_op; /* what failed: handshake, read, write, shutdown */
};

#endif
