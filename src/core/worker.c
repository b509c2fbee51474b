#include "core/worker.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core/log.h"

static _Thread_local struct sl_worker *t_current;

struct sl_worker *sl_worker_current(void)
{
    return t_current;
}

unsigned sl_cpu_count(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0)
            return (unsigned)n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (unsigned)n : 1;
}

static void on_wake(struct sl_loop *loop, void *data)
{
    (void)loop;
    struct sl_worker *w = data;
    unsigned cmds = atomic_exchange(&w->cmds, 0);
    if (cmds && w->hooks->on_command)
        w->hooks->on_command(w, cmds, w->hooks_data);
}

/*
 * Once a second, buffer blocks that sat unused in the pool for the whole second go back to
 * the system, so a burst (thousands of connections arriving at once) does not leave its
 * buffers resident for good, while steady load keeps its working set.
 */
#define POOL_KEEP_BLOCKS 8
#define POOL_TRIM_MS 1000

static void on_pool_trim(struct sl_timer *t)
{
    struct sl_worker *w = t->data;
    sl_bpool_trim_idle(&w->buf_pool, POOL_KEEP_BLOCKS);
    sl_timer_arm(&w->loop, &w->pool_trim, POOL_TRIM_MS);
}

static void *worker_main(void *arg)
{
    struct sl_worker *w = arg;
    t_current = w;
    sl_log_set_worker_id((int)w->id);
    int rc = w->hooks->init ? w->hooks->init(w, w->hooks_data) : 0;
    atomic_store(&w->init_rc, rc);
    atomic_store(&w->started, true);
    if (rc == 0) {
        sl_timer_init(&w->pool_trim, on_pool_trim, w);
        sl_timer_arm(&w->loop, &w->pool_trim, POOL_TRIM_MS);
        /* Commands posted before the loop ran are picked up by the first wake. */
        if (atomic_load(&w->cmds))
            sl_loop_wake(&w->loop);
        sl_loop_run(&w->loop);
    }
    if (w->hooks->fini)
        w->hooks->fini(w, w->hooks_data);
    atomic_store(&w->exited, true);
    return NULL;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

struct sl_worker *sl_workers_start(unsigned count, size_t buf_bytes,
                                   const struct sl_worker_hooks *hooks, void *data, int *err)
{
    struct sl_worker *ws = calloc(count, sizeof *ws);
    if (!ws) {
        *err = -ENOMEM;
        return NULL;
    }
    /* Workers never handle signals: the main thread waits for them with sigwait. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    unsigned started = 0;
    *err = 0;
    for (unsigned i = 0; i < count; i++) {
        struct sl_worker *w = &ws[i];
        w->id = i;
        w->hooks = hooks;
        w->hooks_data = data;
        int rc = sl_loop_init(&w->loop);
        if (rc < 0) {
            *err = rc;
            break;
        }
        w->loop.on_wake = on_wake;
        w->loop.wake_data = w;
        sl_bpool_init(&w->buf_pool, buf_bytes, 1024);
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            sl_loop_dispose(&w->loop);
            *err = -EAGAIN;
            break;
        }
        started++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    /* Start-up is bounded by what init does (socket set-up), so a poll is enough here. */
    for (unsigned i = 0; i < started; i++) {
        while (!atomic_load(&ws[i].started))
            sleep_ms(1);
        if (*err == 0 && atomic_load(&ws[i].init_rc) < 0)
            *err = atomic_load(&ws[i].init_rc);
    }
    if (*err != 0) {
        for (unsigned i = 0; i < started; i++)
            sl_worker_post(&ws[i], SL_WORKER_CMD_STOP);
        for (unsigned i = 0; i < started; i++) {
            pthread_join(ws[i].thread, NULL);
            sl_bpool_dispose(&ws[i].buf_pool);
            sl_loop_dispose(&ws[i].loop);
        }
        free(ws);
        return NULL;
    }
    return ws;
}

void sl_worker_post(struct sl_worker *w, unsigned cmds)
{
    atomic_fetch_or(&w->cmds, cmds);
    sl_loop_wake(&w->loop);
}

bool sl_workers_wait(struct sl_worker *ws, unsigned count, uint64_t deadline_ms)
{
    for (;;) {
        bool all = true;
        for (unsigned i = 0; i < count; i++)
            all = all && atomic_load(&ws[i].exited);
        if (all)
            return true;
        if (sl_clock_now_ms() >= deadline_ms)
            return false;
        sleep_ms(5);
    }
}

void sl_workers_free(struct sl_worker *ws, unsigned count)
{
    for (unsigned i = 0; i < count; i++) {
        pthread_join(ws[i].thread, NULL);
        sl_bpool_dispose(&ws[i].buf_pool);
        sl_loop_dispose(&ws[i].loop);
    }
    free(ws);
}

int sl_listen_socket(const struct sockaddr *addr, socklen_t len, int backlog)
{
    int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0)
        goto fail;
    if (addr->sa_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, addr, len) < 0 || listen(fd, backlog) < 0)
        goto fail;
    return fd;
fail:;
    int e = -errno;
    close(fd);
    return e;
}

int sl_listen_probe(const struct sockaddr *addr, socklen_t len)
{
    int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1, rc = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (addr->sa_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, addr, len) < 0)
        rc = -errno;
    close(fd);
    return rc;
}

/* Accepts a bounded batch per wake-up so one busy listener cannot starve a turn. */
static void on_listen_ready(struct sl_io *io, uint32_t events)
{
    (void)events;
    struct sl_acceptor *a = io->data;
    for (int i = 0; i < 64 && !a->paused && a->io.fd >= 0; i++) {
        if (a->gate && a->gate->max &&
            atomic_load_explicit(&a->gate->open, memory_order_relaxed) >= a->gate->max) {
            /* At the connection cap: leave new connections in the backlog and look again
             * shortly (a level-triggered listener would spin otherwise). */
            if (!a->at_cap) {
                SL_WARN("accept: %u connections open, the cap (max_connections); new ones wait "
                        "in the backlog",
                        a->gate->max);
                atomic_fetch_add_explicit(&a->gate->pauses, 1, memory_order_relaxed);
            }
            a->at_cap = true;
            a->paused = true;
            sl_io_modify(a->loop, &a->io, 0);
            sl_timer_arm(a->loop, &a->resume, 10);
            return;
        }
        if (a->at_cap) {
            a->at_cap = false;
            SL_INFO("accept: below the connection cap again");
        }
        struct sockaddr_storage peer;
        socklen_t plen = sizeof peer;
        int fd = accept4(a->io.fd, (struct sockaddr *)&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* Out of descriptors or memory: a level-triggered listener would spin. Stop
                 * accepting for a moment; pending connections wait in the backlog. */
                SL_WARN("accept: %s; pausing this listener for 100ms", strerror(errno));
                a->paused = true;
                sl_io_modify(a->loop, &a->io, 0);
                sl_timer_arm(a->loop, &a->resume, 100);
            }
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        a->on_accept(a, fd, (struct sockaddr *)&peer, plen);
    }
}

static void on_acceptor_resume(struct sl_timer *t)
{
    struct sl_acceptor *a = t->data;
    if (a->io.fd < 0)
        return;
    a->paused = false;
    sl_io_modify(a->loop, &a->io, EPOLLIN);
}

int sl_acceptor_start(struct sl_acceptor *a, struct sl_loop *loop, int fd, sl_accept_cb cb,
                      void *data)
{
    sl_timer_init(&a->resume, on_acceptor_resume, a);
    a->loop = loop;
    a->on_accept = cb;
    a->data = data;
    a->paused = false;
    int rc = sl_io_start(loop, &a->io, fd, EPOLLIN, on_listen_ready, a);
    if (rc < 0) {
        close(fd);
        a->io.fd = -1;
    }
    return rc;
}

void sl_acceptor_stop(struct sl_acceptor *a)
{
    if (a->io.fd < 0)
        return;
    sl_timer_cancel(a->loop, &a->resume);
    sl_io_stop(a->loop, &a->io);
    close(a->io.fd);
    a->io.fd = -1;
}
