#ifndef SL_CORE_TRANSPORT_H
#define SL_CORE_TRANSPORT_H

#include <stddef.h>
#include <sys/uio.h>

/*
 * A byte stream over a socket. Plain TCP is the only transport today; TLS will be another ops
 * table with the same shape, so the HTTP layer never knows which one it talks to. The fd is
 * still exposed for epoll registration: a transport that needs the opposite readiness (TLS
 * wanting to write during a read) says so through `want`.
 *
 * Results follow the syscall-like convention: 0 or -errno, with counts in out-parameters.
 * read: *n = 0 with return 0 means the peer closed its side (EOF); -EAGAIN means no data now.
 */
struct sl_transport;

struct sl_transport_ops {
    const char *name;
    int (*read)(struct sl_transport *t, void *buf, size_t cap, size_t *n);
    int (*writev)(struct sl_transport *t, const struct iovec *iov, int iovcnt, size_t *n);
    int (*shutdown)(struct sl_transport *t); /* half-close our sending side */
    void (*close)(struct sl_transport *t);
    size_t (*pending)(const struct sl_transport *t); /* bytes buffered inside (TLS) */
    int (*last_error)(const struct sl_transport *t); /* -errno of the last failure, or 0 */
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

static inline void sl_transport_close(struct sl_transport *t)
{
    if (t->ops)
        t->ops->close(t);
}

#endif
