#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/transport.h"

static int tcp_read(struct sl_transport *t, void *buf, size_t cap, size_t *n)
{
    for (;;) {
        ssize_t r = recv(t->fd, buf, cap, 0);
        if (r >= 0) {
            *n = (size_t)r;
            return 0;
        }
        if (errno == EINTR)
            continue;
        *n = 0;
        t->err = -errno;
        return -errno;
    }
}

static int tcp_writev(struct sl_transport *t, const struct iovec *iov, int iovcnt, size_t *n)
{
    /* sendmsg rather than writev: MSG_NOSIGNAL spares us a SIGPIPE on a reset peer. */
    struct msghdr msg = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)iovcnt};
    for (;;) {
        ssize_t r = sendmsg(t->fd, &msg, MSG_NOSIGNAL);
        if (r >= 0) {
            *n = (size_t)r;
            return 0;
        }
        if (errno == EINTR)
            continue;
        *n = 0;
        t->err = -errno;
        return -errno;
    }
}

static int tcp_shutdown(struct sl_transport *t)
{
    return shutdown(t->fd, SHUT_WR) < 0 ? -errno : 0;
}

static void tcp_close(struct sl_transport *t)
{
    if (t->fd >= 0)
        close(t->fd);
    t->fd = -1;
}

static size_t tcp_pending(const struct sl_transport *t)
{
    (void)t;
    return 0;
}

static int tcp_last_error(const struct sl_transport *t)
{
    return t->err;
}

const struct sl_transport_ops sl_tcp_transport_ops = {
    .name = "tcp",
    .read = tcp_read,
    .writev = tcp_writev,
    .shutdown = tcp_shutdown,
    .close = tcp_close,
    .pending = tcp_pending,
    .last_error = tcp_last_error,
};

void sl_tcp_transport_init(struct sl_transport *t, int fd)
{
    t->ops = &sl_tcp_transport_ops;
    t->fd = fd;
    t->err = 0;
}
