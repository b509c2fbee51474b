#ifndef SL_CORE_TRANSPORT_H
#define SL_CORE_TRANSPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/uio.h>

/*
 * A byte stream over a socket: plain TCP (core/tcp.c) or TLS (tls/tls_transport.c), so the
 * HTTP layer and the tunnel never know which one they talk to. The fd is still exposed for
 * epoll registration: a transport that needs the opposite readiness (TLS wanting to write
 * during a read) says so through `want`.
 *
 * Results follow the syscall-like convention: 0 or -errno, with counts in out-parameters.
 * read: *n = 0 with return 0 means the peer closed its side (EOF); -EAGAIN means no data now.
 * A read that returns fewer bytes than asked for means the transport would block now, unless
 * pending() is nonzero (an EOF or error is waiting behind the bytes, or more decrypted bytes
 * are inside): an edge-triggered owner clears its read readiness only when both hold.
 *
 * Optional ops may be NULL: handshake (none: always done), want (none: the direction of the
 * call that returned -EAGAIN), peer_subject (none: no peer identity).
 */
struct sl_transport;

struct sl_transport_ops {
    const char *name;
    bool secure; /* bytes are encrypted on the wire (https, not http) */
    int (*read)(struct sl_transport *t, void *buf, size_t cap, size_t *n);
    int (*writev)(struct sl_transport *t, const struct iovec *iov, int iovcnt, size_t *n);
    int (*shutdown)(struct sl_transport *t); /* half-close our sending side */
    void (*close)(struct sl_transport *t);
    size_t (*pending)(const struct sl_transport *t); /* bytes buffered inside (TLS) */
    int (*last_error)(const struct sl_transport *t); /* -errno of the last failure, or 0 */
    /* Drives the connection setup: 0 when done, -EAGAIN (see want), or -errno. */
    int (*handshake)(struct sl_transport *t);
    /* EPOLLIN and/or EPOLLOUT that the last -EAGAIN waits for. */
    unsigned (*want)(const struct sl_transport *t);
    /* The verified peer identity (a client certificate's subject) into buf, NUL-terminated and
     * truncated to cap; returns its full length, 0 when there is none. */
    size_t (*peer_subject)(const struct sl_transport *t, char *buf, size_t cap);
};

struct sl_transport {
    const struct sl_transport_ops *ops;
    int fd;
    int err;
};

/* Plain TCP over a connected non-blocking socket `fd` (ownership passes to the transport). */
void sl_tcp_transport_init(struct sl_transport *t, int fd);

extern const struct sl_transport_ops sl_tcp_transport_ops;

static inline int sl_transport_read(struct sl_transport *t, void *buf, size_t cap, size_t *n)
{
    return t->ops->read(t, buf, cap, n);
}

static inline int sl_transport_writev(struct sl_transport *t, const struct iovec *iov, int cnt,
                                      size_t *n)
{
    return t->ops->writev(t, iov, cnt, n);
}

/* 0 when the transport is ready for data, -EAGAIN, or -errno (the transport failed). */
static inline int sl_transport_handshake(struct sl_transport *t)
{
    return t->ops->handshake ? t->ops->handshake(t) : 0;
}

/* The readiness the last -EAGAIN waits for, or `dflt` when the transport does not say. */
static inline unsigned sl_transport_want(const struct sl_transport *t, unsigned dflt)
{
    unsigned w = t->ops->want ? t->ops->want(t) : 0;
    return w ? w : dflt;
}

static inline size_t sl_transport_pending(const struct sl_transport *t)
{
    return t->ops->pending(t);
}

static inline void sl_transport_close(struct sl_transport *t)
{
    if (t->ops)
        t->ops->close(t);
}

#endif
