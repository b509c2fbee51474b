#include "proxy/upstream.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <unistd.h>

#include "config/config.h"
#include "core/log.h"
#include "core/worker.h"

static void on_uc_io(struct sl_io *io, uint32_t events);
static void on_uc_timer(struct sl_timer *t);
static void on_uc_free(struct sl_defer *d);

int sl_upstream_rt_init(struct sl_upstream_rt *up, const struct sl_upstream_conf *conf,
                        const struct sl_balancer_shared *shared, struct sl_worker *w)
{
    memset(up, 0, sizeof *up);
    up->conf = conf;
    up->worker = w;
    up->bal = sl_balancer_new(shared);
    up->idle = calloc(conf->endpoint_count ? conf->endpoint_count : 1, sizeof *up->idle);
    if (!up->bal || !up->idle) {
        sl_balancer_free(up->bal);
        free(up->idle);
        return -ENOMEM;
    }
    return 0;
}

static void uc_close(struct sl_upstream_conn *uc)
{
    if (uc->state == SL_UC_CLOSED)
        return;
    struct sl_upstream_rt *up = uc->up;
    if (uc->state == SL_UC_IDLE) {
        if (uc->prev)
            uc->prev->next = uc->next;
        else
            up->idle[uc->endpoint] = uc->next;
        if (uc->next)
            uc->next->prev = uc->prev;
        up->idle_count--;
    }
    uc->state = SL_UC_CLOSED;
    struct sl_loop *loop = &up->worker->loop;
    sl_timer_cancel(loop, &uc->timer);
    sl_io_stop(loop, &uc->io);
    sl_transport_close(&uc->tr);
    sl_buf_release(&uc->in, &up->worker->buf_pool);
    sl_defer_queue(loop, &uc->free_defer);
}

void sl_upstream_rt_close_idle(struct sl_upstream_rt *up)
{
    for (size_t i = 0; i < up->conf->endpoint_count; i++)
        while (up->idle[i])
            uc_close(up->idle[i]);
}

void sl_upstream_rt_dispose(struct sl_upstream_rt *up)
{
    if (up->idle) {
        sl_upstream_rt_close_idle(up);
        free(up->idle);
    }
    sl_balancer_free(up->bal);
    up->idle = NULL;
    up->bal = NULL;
}

static void on_uc_free(struct sl_defer *d)
{
    free(d->data);
}

/* The backend's keep-alive timeout, less a margin for the request in flight to reach it. */
static uint64_t idle_budget_ms(const struct sl_upstream_conn *uc)
{
    uint64_t cfg = uc->up->conf->keepalive_idle_timeout_ms;
    if (uc->keepalive_ms) {
        uint64_t margin = uc->keepalive_ms / 4 < 1000 ? uc->keepalive_ms / 4 : 1000;
        uint64_t learned = uc->keepalive_ms - margin;
        if (learned < cfg)
            return learned;
    }
    return cfg;
}

struct sl_upstream_conn *sl_upstream_acquire(struct sl_upstream_rt *up, int ep,
                                             const struct sl_upstream_user *user, bool fresh,
                                             int *err)
{
    struct sl_loop *loop = &up->worker->loop;
    *err = 0;
    while (!fresh && up->idle[ep]) {
        struct sl_upstream_conn *uc = up->idle[ep];
        up->idle[ep] = uc->next;
        if (uc->next)
            uc->next->prev = NULL;
        up->idle_count--;
        uc->next = uc->prev = NULL;
        uc->state = SL_UC_BUSY;
        /* A connection past its budget may be closed by the backend any moment: drop it
         * rather than race the backend's close. */
        if (sl_loop_now_ms(loop) - uc->idle_since_ms >= idle_budget_ms(uc)) {
            uc_close(uc);
            continue;
        }
        sl_timer_cancel(loop, &uc->timer);
        uc->user = *user;
        uc->reused = true;
        up->reuses++;
        sl_io_modify(loop, &uc->io, 0);
        return uc;
    }
    const struct sl_endpoint_conf *e = &up->conf->endpoints[ep];
    int fd = socket(e->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        *err = -errno;
        return NULL;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (const struct sockaddr *)&e->addr, e->addr_len) < 0 && errno != EINPROGRESS) {
        *err = -errno;
        close(fd);
        return NULL;
    }
    struct sl_upstream_conn *uc = calloc(1, sizeof *uc);
    if (!uc) {
        close(fd);
        *err = -ENOMEM;
        return NULL;
    }
    uc->up = up;
    uc->endpoint = ep;
    uc->state = SL_UC_CONNECTING;
    uc->user = *user;
    sl_tcp_transport_init(&uc->tr, fd);
    sl_timer_init(&uc->timer, on_uc_timer, uc);
    sl_defer_init(&uc->free_defer, on_uc_free, uc);
    if (sl_io_start(loop, &uc->io, fd, EPOLLOUT | SL_IO_EDGE, on_uc_io, uc) < 0) {
        *err = -errno;
        close(fd);
        free(uc);
        return NULL;
    }
    up->connects++;
    return uc;
}

int sl_upstream_conn_connect_result(struct sl_upstream_conn *uc)
{
    int soerr = 0;
    socklen_t len = sizeof soerr;
    if (getsockopt(uc->tr.fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0)
        return -errno;
    return -soerr;
}

void sl_upstream_conn_want(struct sl_upstream_conn *uc, uint32_t events)
{
    sl_io_modify(&uc->up->worker->loop, &uc->io, events);
}

void sl_upstream_conn_arm(struct sl_upstream_conn *uc, uint64_t ms)
{
    sl_timer_arm(&uc->up->worker->loop, &uc->timer, ms);
}

void sl_upstream_release(struct sl_upstream_conn *uc, bool reusable)
{
    struct sl_upstream_rt *up = uc->up;
    struct sl_loop *loop = &up->worker->loop;
    memset(&uc->user, 0, sizeof uc->user);
    /* Unread bytes (in our buffer or, by the edge we saw, in the socket) or a FIN mean the
     * backend sent more than the response: such a connection must never carry another. */
    if (!reusable || uc->state != SL_UC_BUSY || up->idle_count >= up->conf->keepalive_max_idle ||
        (uc->in.data && sl_buf_len(&uc->in)) ||
        (uc->io.ready & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) || idle_budget_ms(uc) == 0) {
        uc_close(uc);
        return;
    }
    sl_buf_release(&uc->in, &up->worker->buf_pool);
    uc->state = SL_UC_IDLE;
    uc->reused = false;
    uc->idle_since_ms = sl_loop_now_ms(loop);
    uc->prev = NULL;
    uc->next = up->idle[uc->endpoint];
    if (uc->next)
        uc->next->prev = uc;
    up->idle[uc->endpoint] = uc;
    up->idle_count++;
    sl_timer_arm(loop, &uc->timer, idle_budget_ms(uc));
    /* Any readiness on an idle connection is the backend closing it (or misbehaving). */
    sl_io_modify(loop, &uc->io, EPOLLIN | EPOLLRDHUP);
}

int sl_upstream_conn_read(struct sl_upstream_conn *uc, bool *eof)
{
    *eof = false;
    if (sl_buf_acquire(&uc->in, &uc->up->worker->buf_pool) < 0)
        return -ENOMEM;
    if (sl_buf_space(&uc->in) == 0)
        sl_buf_compact(&uc->in);
    if (sl_buf_space(&uc->in) == 0)
        return -ENOBUFS;
    size_t n = 0, space = sl_buf_space(&uc->in);
    int rc = sl_transport_read(&uc->tr, uc->in.data + uc->in.end, space, &n);
    if (rc < 0) {
        if (rc == -EAGAIN)
            sl_io_clear_ready(&uc->io, EPOLLIN);
        return rc;
    }
    if (n == 0)
        *eof = true;
    else if (n < space)
        sl_io_clear_ready(&uc->io, EPOLLIN); /* drained: the next bytes raise a new edge */
    uc->in.end += (uint32_t)n;
    return 0;
}

static void on_uc_io(struct sl_io *io, uint32_t events)
{
    struct sl_upstream_conn *uc = io->data;
    if (uc->state == SL_UC_CLOSED)
        return;
    if (uc->state == SL_UC_IDLE) {
        uc_close(uc);
        return;
    }
    if (uc->user.on_event)
        uc->user.on_event(uc, events, uc->user.data);
}

static void on_uc_timer(struct sl_timer *t)
{
    struct sl_upstream_conn *uc = t->data;
    if (uc->state == SL_UC_IDLE) {
        uc_close(uc);
        return;
    }
    if (uc->user.on_timeout)
        uc->user.on_timeout(uc, uc->user.data);
}
