#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "tls/tls_ctx.h"
#include "tls/tls_internal.h"
#include "tls/tls_transport.h"

enum {
    F_SERVER = 1u << 0,
    F_DONE = 1u << 1,        /* handshake complete */
    F_FATAL = 1u << 2,       /* a fatal error: only close is left */
    F_PEER_CLOSED = 1u << 3, /* EOF seen (close_notify, or truncation on a server) */
    F_SENT_CLOSE = 1u << 4,  /* our close_notify is out */
    F_WR_SHUT = 1u << 5,     /* TCP write side shut down */
    F_HELD = 1u << 6,        /* a read returned bytes with an EOF or error behind them */
    F_DRAINED = 1u << 7,     /* the last socket read came back short: the socket is empty */
    F_SUBJECT = 1u << 8,     /* subject/subject_len hold the peer subject (or none) */
};

enum { OP_NONE = 0, OP_HANDSHAKE, OP_READ, OP_WRITE, OP_SHUTDOWN };

static const char *const op_names[] = {"", "handshake", "read", "write", "shutdown"};

/* Gathering buffer for small iovecs. Per thread, since a connection lives on one worker and
 * OpenSSL has encrypted the bytes into its own buffer by the time SSL_write returns. */
static _Thread_local unsigned char gather_buf[SL_TLS_RECORD_BYTES];

static struct sl_tls_transport *tls_of(struct sl_transport *t)
{
    return (struct sl_tls_transport *)t; /* base is the first member */
}

static const struct sl_tls_transport *ctls_of(const struct sl_transport *t)
{
    return (const struct sl_tls_transport *)t;
}

static void note_progress(struct sl_tls_transport *t)
{
    t->want = 0;
    if (!(t->flags & F_DONE) && SSL_is_init_finished(t->ssl))
        t->flags |= F_DONE;
}

/*
 * Maps a failed SSL_* call. Returns -EAGAIN (with `want` set), 0 for an EOF on a read, or a
 * fatal -errno; a fatal error is sticky and keeps OpenSSL's reason for sl_tls_last_error_str.
 * `saved_errno` is errno right after the call. Leaves the thread's error queue empty.
 */
static int fail(struct sl_tls_transport *t, int r, int saved_errno, int op)
{
    int rc;
    switch (SSL_get_error(t->ssl, r)) {
    case SSL_ERROR_WANT_READ:
        t->want = EPOLLIN;
        ERR_clear_error();
        return -EAGAIN;
    case SSL_ERROR_WANT_WRITE:
        t->want = EPOLLOUT;
        ERR_clear_error();
        return -EAGAIN;
    case SSL_ERROR_ZERO_RETURN: /* close_notify */
        ERR_clear_error();
        t->want = 0;
        if (op == OP_READ) {
            t->flags |= F_PEER_CLOSED;
            return 0;
        }
        rc = op == OP_HANDSHAKE ? -ECONNRESET : -EPIPE;
        break;
    case SSL_ERROR_SYSCALL:
        t->ssl_err = ERR_peek_error();
        t->sys_err = saved_errno;
        /* errno 0: the peer closed the TCP connection where TLS expected more. */
        rc = saved_errno && saved_errno != EAGAIN ? -saved_errno : -ECONNRESET;
        break;
    case SSL_ERROR_SSL:
        t->ssl_err = ERR_peek_error();
        if (ERR_GET_LIB(t->ssl_err) == ERR_LIB_SSL &&
            ERR_GET_REASON(t->ssl_err) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
            if (op == OP_READ && (t->flags & F_SERVER)) {
                /* Truncation is harmless for a server (see the header); keep the reason for
                 * logs but report an ordinary EOF. */
                ERR_clear_error();
                t->want = 0;
                t->flags |= F_PEER_CLOSED;
                t->err_op = OP_READ;
                return 0;
            }
            rc = -ECONNRESET;
        } else {
            rc = -EPROTO;
        }
        break;
    default: /* callbacks we never install (async, client hello retry, X509 lookup) */
        t->ssl_err = ERR_peek_error();
        rc = -EPROTO;
        break;
    }
    ERR_clear_error();
    t->flags |= F_FATAL;
    t->want = 0;
    t->err_op = (uint8_t)op;
    t->base.err = rc;
    return rc;
}

/*
 * Called when a read of an established connection found nothing more to read: the owner now
 * waits for the peer, maybe for a long keep-alive. SSL_MODE_RELEASE_BUFFERS frees a buffer
 * after the I/O that emptied it, but OpenSSL sets both record buffers up again whenever its
 * handshake state machine runs, which it does after the handshake too (TLS 1.3 session tickets
 * on a client, a peer's KeyUpdate), and nothing frees the write buffer until the next write:
 * 16 KiB per idle connection. SSL_free_buffers frees both only when neither holds anything (no
 * partial or undelivered record, no unread decrypted bytes) and costs nothing when they are
 * already gone; OpenSSL sets them up again on the next call that needs them.
 */
static void release_idle(struct sl_tls_transport *t)
{
    if (SSL_pending(t->ssl) == 0)
        SSL_free_buffers(t->ssl);
}

/*
 * OpenSSL reads ahead (the contexts set read_ahead), asking the socket for as much as its
 * buffer holds; a read that comes back short, or would block, emptied the socket. Watching the
 * socket BIO's reads for that lets tls_read stop as soon as OpenSSL holds nothing more, where
 * asking OpenSSL again would cost one more read() returning EAGAIN per request. The callback's
 * argument is set before each read, since the transport may have been moved since the last.
 */
static long on_bio_read(BIO *b, int oper, const char *argp, size_t len, int argi, long argl,
                        int ret, size_t *processed)
{
    (void)argp;
    (void)argi;
    (void)argl;
    if (oper == (BIO_CB_READ | BIO_CB_RETURN)) {
        struct sl_tls_transport *t = (struct sl_tls_transport *)BIO_get_callback_arg(b);
        if (t && (ret <= 0 || (processed && *processed < len)))
            t->flags |= F_DRAINED;
    }
    return ret;
}

static void watch_reads(SSL *ssl)
{
    BIO *rb = SSL_get_rbio(ssl);
    if (rb)
        BIO_set_callback_ex(rb, on_bio_read);
}

/*
 * SSL_read_ex returns at most one record; reading on until the buffer is full or OpenSSL
 * wants the socket gives the owner the plain-socket meaning of a short read ("would block
 * now"), which edge-triggered owners rely on. An EOF or error met after some bytes is kept
 * for the next call (fail() made it sticky) and announced through pending().
 */
static int tls_read(struct sl_transport *bt, void *buf, size_t cap, size_t *n)
{
    struct sl_tls_transport *t = tls_of(bt);
    *n = 0;
    t->flags &= ~F_HELD;
    if (t->flags & F_FATAL)
        return bt->err;
    if (t->flags & F_PEER_CLOSED)
        return 0;
    if (cap == 0)
        return -EINVAL; /* 0 with *n = 0 would read as EOF */
    size_t total = 0;
    BIO *rb = SSL_get_rbio(t->ssl);
    if (rb)
        BIO_set_callback_arg(rb, (char *)t);
    t->flags &= ~F_DRAINED;
    while (total < cap) {
        ERR_clear_error();
        errno = 0;
        size_t got = 0;
        int r = SSL_read_ex(t->ssl, (unsigned char *)buf + total, cap - total, &got);
        int saved = errno;
        if (r == 1) {
            note_progress(t);
            total += got;
            if ((t->flags & F_DRAINED) && !SSL_has_pending(t->ssl)) {
                /* Socket empty, nothing buffered: the short read says "would block". */
                t->want = EPOLLIN;
                if (t->flags & F_DONE)
                    release_idle(t);
                break;
            }
            continue;
        }
        if (!(t->flags & F_DONE) && SSL_is_init_finished(t->ssl))
            t->flags |= F_DONE;
        int rc = fail(t, r, saved, t->flags & F_DONE ? OP_READ : OP_HANDSHAKE);
        if (rc == -EAGAIN && t->want == EPOLLIN && (t->flags & F_DONE))
            release_idle(t);
        if (total == 0)
            return rc;
        if (rc != -EAGAIN)
            t->flags |= F_HELD;
        break;
    }
    *n = total;
    return 0;
}

/* Copies from (i, off) onwards into gather_buf, up to one record. Returns the bytes copied. */
static size_t gather(const struct iovec *iov, int i, size_t off, int iovcnt)
{
    size_t len = 0;
    while (i < iovcnt && len < SL_TLS_RECORD_BYTES) {
        size_t take = iov[i].iov_len - off;
        if (take > SL_TLS_RECORD_BYTES - len)
            take = SL_TLS_RECORD_BYTES - len;
        if (take)
            memcpy(gather_buf + len, (const unsigned char *)iov[i].iov_base + off, take);
        len += take;
        off += take;
        if (off == iov[i].iov_len) {
            i++;
            off = 0;
        }
    }
    return len;
}

/*
 * One SSL_write per record-sized piece. A piece is either one iovec's remainder written in
 * place (when it is at least a record, or the last data) or small iovecs gathered into one
 * record. With SSL_MODE_ENABLE_PARTIAL_WRITE each SSL_write returns after one record, so the
 * count we report is exact; on WANT_* OpenSSL keeps the record it encrypted and the caller's
 * retry offers the same bytes first (see the header), which is all OpenSSL checks.
 */
static int tls_writev(struct sl_transport *bt, const struct iovec *iov, int iovcnt, size_t *n)
{
    struct sl_tls_transport *t = tls_of(bt);
    *n = 0;
    if (t->flags & F_FATAL)
        return bt->err;
    if (t->flags & F_SENT_CLOSE)
        return -EPIPE;
    int last = iovcnt - 1; /* the last iovec with data: its remainder is never gathered */
    while (last >= 0 && iov[last].iov_len == 0)
        last--;
    size_t done = 0, off = 0;
    int i = 0;
    for (;;) {
        while (i < iovcnt && off == iov[i].iov_len) {
            i++;
            off = 0;
        }
        if (i == iovcnt)
            break;
        const void *p;
        size_t len, rem = iov[i].iov_len - off;
        if (rem >= SL_TLS_RECORD_BYTES || i == last) {
            p = (const unsigned char *)iov[i].iov_base + off;
            len = rem;
        } else {
            len = gather(iov, i, off, iovcnt);
            p = gather_buf;
        }
        ERR_clear_error();
        errno = 0;
        size_t w = 0;
        int r = SSL_write_ex(t->ssl, p, len, &w);
        int saved = errno;
        if (r != 1) {
            if (!(t->flags & F_DONE) && SSL_is_init_finished(t->ssl))
                t->flags |= F_DONE;
            int rc = fail(t, r, saved, t->flags & F_DONE ? OP_WRITE : OP_HANDSHAKE);
            *n = done;
            return rc == -EAGAIN && done > 0 ? 0 : rc;
        }
        note_progress(t);
        done += w;
        while (w) {
            size_t step = iov[i].iov_len - off;
            if (step > w)
                step = w;
            off += step;
            w -= step;
            if (off == iov[i].iov_len) {
                i++;
                off = 0;
            }
        }
    }
    *n = done;
    return 0;
}

static int tls_shutdown(struct sl_transport *bt)
{
    struct sl_tls_transport *t = tls_of(bt);
    /* close_notify only on an established, healthy connection: OpenSSL refuses it during the
     * handshake, and after a fatal error the peer has had an alert already. */
    if ((t->flags & (F_DONE | F_FATAL | F_SENT_CLOSE)) == F_DONE) {
        ERR_clear_error();
        errno = 0;
        int r = SSL_shutdown(t->ssl);
        int saved = errno;
        if (r < 0)
            return fail(t, r, saved, OP_SHUTDOWN);
        t->flags |= F_SENT_CLOSE;
        t->want = 0;
    }
    if (!(t->flags & F_WR_SHUT)) {
        if (shutdown(bt->fd, SHUT_WR) < 0)
            return -errno;
        t->flags |= F_WR_SHUT;
    }
    return 0;
}

static void tls_close(struct sl_transport *bt)
{
    struct sl_tls_transport *t = tls_of(bt);
    if (t->ssl) {
        /* A quiet shutdown marks the session as cleanly closed without sending anything;
         * otherwise SSL_free marks it not resumable, which would cost a client its next
         * resumption after an ordinary close. */
        if ((t->flags & (F_DONE | F_FATAL)) == F_DONE) {
            SSL_set_quiet_shutdown(t->ssl, 1);
            SSL_shutdown(t->ssl);
        }
        SSL_free(t->ssl);
        t->ssl = NULL;
        ERR_clear_error();
    }
    if (bt->fd >= 0)
        close(bt->fd);
    bt->fd = -1;
    sl_tls_ctx_snap_release(t->snap);
    t->snap = NULL;
    free(t->subject);
    t->subject = NULL;
    t->subject_len = 0;
}

/* Nonzero while OpenSSL holds decrypted bytes or, reading ahead, undecrypted records, or while
 * an EOF or error waits behind returned bytes: none of these raises a new edge. */
static size_t tls_pending(const struct sl_transport *bt)
{
    const struct sl_tls_transport *t = ctls_of(bt);
    if (t->flags & F_HELD)
        return 1; /* an EOF or error waits for the next read */
    if (!t->ssl || (t->flags & F_FATAL))
        return 0;
    int p = SSL_pending(t->ssl);
    if (p > 0)
        return (size_t)p;
    /* Records read ahead but not yet decrypted raise no new edge either. */
    return SSL_has_pending(t->ssl) ? 1 : 0;
}

static size_t tls_peer_subject_op(const struct sl_transport *bt, char *buf, size_t cap);

static int tls_handshake_op(struct sl_transport *bt)
{
    struct sl_tls_transport *t = tls_of(bt);
    enum sl_status st = sl_tls_handshake(t);
    if (st == SL_OK) {
        /* A client's verified subject is formatted now, once per connection, so that no
         * request (its header, its access-log record) pays the allocations later. */
        if ((t->flags & F_SERVER) && !(t->flags & F_SUBJECT))
            tls_peer_subject_op(bt, NULL, 0);
        return 0;
    }
    return st == SL_AGAIN ? -EAGAIN : (bt->err ? bt->err : -EPROTO);
}

static unsigned tls_want_op(const struct sl_transport *bt)
{
    return ctls_of(bt)->want;
}

/*
 * Formatting a subject costs a BIO and its allocations, and it cannot change on a connection:
 * it is formatted once (when the server-side handshake completes, or on the first ask) and
 * kept until close, so a request costs a copy. The cache is not part of the transport's observable
 * state, hence the cast.
 */
static size_t tls_peer_subject_op(const struct sl_transport *bt, char *buf, size_t cap)
{
    struct sl_tls_transport *t = (struct sl_tls_transport *)ctls_of(bt);
    if (cap)
        buf[0] = 0;
    if (!(t->flags & F_SUBJECT) && (t->flags & F_DONE)) {
        char tmp[1024];
        size_t n = sl_tls_peer_is_verified(t) ? sl_tls_peer_subject(t, tmp, sizeof tmp) : 0;
        if (n >= sizeof tmp)
            n = 0; /* longer than any header would carry: treat as none */
        if (n && (t->subject = malloc(n + 1)) != NULL) {
            memcpy(t->subject, tmp, n + 1);
            t->subject_len = (uint16_t)n;
        }
        t->flags |= F_SUBJECT;
    }
    if (!t->subject)
        return 0; /* none, or no memory for it */
    if (cap) {
        size_t c = t->subject_len < cap ? t->subject_len : cap - 1;
        memcpy(buf, t->subject, c);
        buf[c] = 0;
    }
    return t->subject_len;
}

static int tls_last_error(const struct sl_transport *bt)
{
    return bt->err;
}

const struct sl_transport_ops sl_tls_transport_ops = {
    .name = "tls",
    .secure = true,
    .read = tls_read,
    .writev = tls_writev,
    .shutdown = tls_shutdown,
    .close = tls_close,
    .pending = tls_pending,
    .last_error = tls_last_error,
    .handshake = tls_handshake_op,
    .want = tls_want_op,
    .peer_subject = tls_peer_subject_op,
};

static void init_common(struct sl_tls_transport *t, int fd, SSL *ssl)
{
    t->base.ops = &sl_tls_transport_ops;
    t->base.fd = fd;
    t->base.err = 0;
    t->ssl = ssl;
}

int sl_tls_transport_init_server(struct sl_tls_transport *t, int fd, struct sl_tls_ctx *ctx)
{
    memset(t, 0, sizeof *t);
    t->base.fd = -1;
    struct sl_tls_ctx_snap *s = sl_tls_ctx_acquire(ctx);
    SSL *ssl = SSL_new(sl__tls_snap_initial(s));
    if (!ssl || SSL_set_fd(ssl, fd) != 1) {
        SSL_free(ssl);
        sl_tls_ctx_snap_release(s);
        ERR_clear_error();
        return -ENOMEM;
    }
    SSL_set_accept_state(ssl);
    watch_reads(ssl);
    init_common(t, fd, ssl);
    t->snap = s;
    t->flags = F_SERVER;
    return 0;
}

static bool is_ip_literal(const char *name)
{
    unsigned char addr[16];
    return inet_pton(AF_INET, name, addr) == 1 || inet_pton(AF_INET6, name, addr) == 1;
}

int sl_tls_transport_init_client(struct sl_tls_transport *t, int fd, struct sl_tls_client_ctx *ctx,
                                 const char *server_name, struct ssl_session_st *session)
{
    memset(t, 0, sizeof *t);
    t->base.fd = -1;
    bool verify = sl__tls_client_ctx_verifies(ctx);
    if (verify && (!server_name || !*server_name))
        return -EINVAL;
    SSL *ssl = SSL_new(sl__tls_client_ctx_ssl_ctx(ctx));
    if (!ssl)
        goto oom;
    if (SSL_set_fd(ssl, fd) != 1)
        goto oom;
    watch_reads(ssl);
    int rc = -EINVAL;
    if (server_name && *server_name) {
        bool ip = is_ip_literal(server_name);
        /* RFC 6066 §3: SNI carries host names only, never address literals. */
        if (!ip && SSL_set_tlsext_host_name(ssl, server_name) != 1)
            goto fail;
        if (verify) {
            X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
            X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
            if ((ip ? X509_VERIFY_PARAM_set1_ip_asc(param, server_name)
                    : SSL_set1_host(ssl, server_name)) != 1)
                goto fail;
        }
    }
    if (session && SSL_set_session(ssl, session) != 1)
        goto oom;
    SSL_set_connect_state(ssl);
    init_common(t, fd, ssl);
    return 0;
oom:
    rc = -ENOMEM;
fail:
    SSL_free(ssl);
    ERR_clear_error();
    return rc;
}

struct sl_tls_transport *sl_tls_from_transport(struct sl_transport *t)
{
    return t && t->ops == &sl_tls_transport_ops ? tls_of(t) : NULL;
}

enum sl_status sl_tls_handshake(struct sl_tls_transport *t)
{
    if (t->flags & F_FATAL)
        return SL_ERROR;
    if (t->flags & F_DONE)
        return SL_OK;
    ERR_clear_error();
    errno = 0;
    int r = SSL_do_handshake(t->ssl);
    int saved = errno;
    if (r == 1) {
        note_progress(t);
        return SL_OK;
    }
    int rc = fail(t, r, saved, OP_HANDSHAKE);
    return rc == -EAGAIN ? SL_AGAIN : SL_ERROR;
}

bool sl_tls_is_handshake_done(const struct sl_tls_transport *t)
{
    return t->flags & F_DONE;
}

uint32_t sl_tls_want(const struct sl_tls_transport *t)
{
    return t->want;
}

const char *sl_tls_last_error_str(const struct sl_tls_transport *t, char *buf, size_t cap)
{
    if (cap == 0)
        return buf;
    buf[0] = 0;
    if (!t->base.err && !t->ssl_err)
        return buf;
    char reason[160] = "";
    if (t->ssl_err) {
        const char *r = ERR_reason_error_string(t->ssl_err);
        if (r)
            snprintf(reason, sizeof reason, "%s", r);
        else
            ERR_error_string_n(t->ssl_err, reason, sizeof reason);
    } else if (t->sys_err) {
        char tmp[96];
        snprintf(reason, sizeof reason, "%s", strerror_r(t->sys_err, tmp, sizeof tmp));
    } else if (t->base.err == -ECONNRESET) {
        snprintf(reason, sizeof reason, "connection closed by the peer");
    } else {
        snprintf(reason, sizeof reason, "error %d", -t->base.err);
    }
    const char *op = t->err_op < sizeof op_names / sizeof op_names[0] ? op_names[t->err_op] : "";
    int len = snprintf(buf, cap, "%s%s%s", op, *op ? ": " : "", reason);
    if (t->ssl && len >= 0 && (size_t)len < cap && ERR_GET_LIB(t->ssl_err) == ERR_LIB_SSL &&
        ERR_GET_REASON(t->ssl_err) == SSL_R_CERTIFICATE_VERIFY_FAILED) {
        long v = SSL_get_verify_result(t->ssl);
        if (v != X509_V_OK)
            snprintf(buf + len, cap - (size_t)len, ": %s", X509_verify_cert_error_string(v));
    }
    return buf;
}

bool sl_tls_peer_is_verified(const struct sl_tls_transport *t)
{
    /* Not gated on later I/O errors: the access log of a failed exchange still wants it. */
    return t->ssl && (t->flags & F_DONE) && (SSL_get_verify_mode(t->ssl) & SSL_VERIFY_PEER) &&
           SSL_get0_peer_certificate(t->ssl) != NULL && SSL_get_verify_result(t->ssl) == X509_V_OK;
}

size_t sl_tls_peer_subject(const struct sl_tls_transport *t, char *buf, size_t cap)
{
    if (cap)
        buf[0] = 0;
    X509 *x = t->ssl ? SSL_get0_peer_certificate(t->ssl) : NULL;
    if (!x)
        return 0;
    BIO *b = BIO_new(BIO_s_mem());
    if (!b) {
        ERR_clear_error();
        return 0;
    }
    size_t len = 0;
    if (X509_NAME_print_ex(b, X509_get_subject_name(x), 0, XN_FLAG_RFC2253) >= 0) {
        char *data = NULL;
        long n = BIO_get_mem_data(b, &data);
        if (n > 0 && data) {
            len = (size_t)n;
            if (cap) {
                size_t c = len < cap - 1 ? len : cap - 1;
                memcpy(buf, data, c);
                buf[c] = 0;
            }
        }
    }
    BIO_free(b);
    ERR_clear_error();
    return len;
}

const unsigned char *sl_tls_alpn(const struct sl_tls_transport *t, size_t *len)
{
    const unsigned char *p = NULL;
    unsigned l = 0;
    if (t->ssl)
        SSL_get0_alpn_selected(t->ssl, &p, &l);
    *len = p ? l : 0;
    return p;
}

const char *sl_tls_server_name(const struct sl_tls_transport *t)
{
    return t->ssl ? SSL_get_servername(t->ssl, TLSEXT_NAMETYPE_host_name) : NULL;
}

bool sl_tls_is_resumed(const struct sl_tls_transport *t)
{
    return t->ssl && SSL_session_reused(t->ssl) == 1;
}

const char *sl_tls_version_name(const struct sl_tls_transport *t)
{
    return t->ssl ? SSL_get_version(t->ssl) : "";
}

struct ssl_session_st *sl_tls_get1_session(const struct sl_tls_transport *t)
{
    SSL_SESSION *s = t->ssl ? SSL_get1_session(t->ssl) : NULL;
    if (s && !SSL_SESSION_is_resumable(s)) {
        SSL_SESSION_free(s);
        return NULL;
    }
    return s;
}

struct ssl_st *sl_tls_ssl(const struct sl_tls_transport *t)
{
    return t->ssl;
}
