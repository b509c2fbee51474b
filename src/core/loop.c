#include "core/loop.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256

uint64_t sl_clock_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* One clock read per turn serves both the millisecond timers and microsecond users. */
static void loop_read_clock(struct sl_loop *loop)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    loop->now_us = (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
    loop->now_ms = loop->now_us / 1000u;
}

const uint64_t sl_loop_lag_bounds_us[SL_LOOP_LAG_BUCKETS] = {
    50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000};

uint64_t sl_clock_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Single-writer counter bump: no locked instruction on the loop's thread. */
static inline void stat_add(_Atomic uint64_t *c, uint64_t v)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + v,
                          memory_order_relaxed);
}

void sl_loop_charge(struct sl_loop *loop, uint64_t *acc)
{
    uint64_t now = sl_clock_now_ns();
    if (loop->charge)
        *loop->charge += now - loop->charge_since_ns;
    loop->charge = acc;
    loop->charge_since_ns = now;
}

/* After each callback: the time since its last charge call goes to its account. */
static inline void charge_settle(struct sl_loop *loop)
{
    if (loop->charge) {
        *loop->charge += sl_clock_now_ns() - loop->charge_since_ns;
        loop->charge = NULL;
    }
}

uint64_t sl_loop_take_max_lag(const struct sl_loop *loop)
{
    /* The stats are the reader's to reset: a const loop only promises the loop itself is not
     * changed. */
    struct sl_loop_stats *st = (struct sl_loop_stats *)&loop->stats;
    return atomic_exchange_explicit(&st->lag_max_us, 0, memory_order_relaxed);
}

static void record_lag(struct sl_loop *loop, uint64_t lag_us)
{
    struct sl_loop_stats *st = &loop->stats;
    size_t b = 0;
    while (b < SL_LOOP_LAG_BUCKETS && lag_us > sl_loop_lag_bounds_us[b])
        b++;
    stat_add(&st->lag_buckets[b], 1);
    stat_add(&st->lag_sum_us, lag_us);
    /* The reader resets the max with an exchange; a lost update here only loses a sample. */
    if (lag_us > atomic_load_explicit(&st->lag_max_us, memory_order_relaxed))
        atomic_store_explicit(&st->lag_max_us, lag_us, memory_order_relaxed);
}

static void on_wake_io(struct sl_io *io, uint32_t events)
{
    (void)events;
    struct sl_loop *loop = io->data;
    uint64_t v;
    ssize_t r = read(loop->wake_fd, &v, sizeof v);
    (void)r;
    struct sl_post *p = atomic_exchange(&loop->posted, NULL);
    struct sl_post *rev = NULL;
    while (p) { /* the stack is newest first: run in posting order */
        struct sl_post *next = p->next;
        p->next = rev;
        rev = p;
        p = next;
    }
    while (rev) {
        struct sl_post *next = rev->next;
        rev->next = NULL;
        atomic_store(&rev->queued, 0);
        rev->cb(rev);
        charge_settle(loop);
        rev = next;
    }
    if (loop->on_wake)
        loop->on_wake(loop, loop->wake_data);
}

int sl_loop_init(struct sl_loop *loop)
{
    memset(loop, 0, sizeof *loop);
    loop->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (loop->epfd < 0)
        return -errno;
    loop->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (loop->wake_fd < 0) {
        int e = -errno;
        close(loop->epfd);
        return e;
    }
    loop_read_clock(loop);
    int rc = sl_io_start(loop, &loop->wake_io, loop->wake_fd, EPOLLIN, on_wake_io, loop);
    if (rc < 0) {
        close(loop->wake_fd);
        close(loop->epfd);
    }
    return rc;
}

void sl_loop_dispose(struct sl_loop *loop)
{
    if (loop->epfd >= 0)
        close(loop->epfd);
    if (loop->wake_fd >= 0)
        close(loop->wake_fd);
    free(loop->heap);
    loop->heap = NULL;
    loop->epfd = loop->wake_fd = -1;
}

void sl_loop_post(struct sl_loop *loop, struct sl_post *p)
{
    int expected = 0;
    if (!atomic_compare_exchange_strong(&p->queued, &expected, 1))
        return;
    struct sl_post *head = atomic_load(&loop->posted);
    do
        p->next = head;
    while (!atomic_compare_exchange_weak(&loop->posted, &head, p));
    sl_loop_wake(loop);
}

void sl_loop_wake(struct sl_loop *loop)
{
    uint64_t one = 1;
    ssize_t r = write(loop->wake_fd, &one, sizeof one);
    (void)r;
}

void sl_loop_stop(struct sl_loop *loop)
{
    loop->stop = true;
}

int sl_io_start(struct sl_loop *loop, struct sl_io *io, int fd, uint32_t events, sl_io_cb cb,
                void *data)
{
    io->fd = fd;
    io->cb = cb;
    io->data = data;
    io->edge = (events & SL_IO_EDGE) != 0;
    io->interest = events & ~(uint32_t)SL_IO_EDGE;
    io->ready = 0;
    struct epoll_event ev = {.events = io->edge ? (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)
                                                : io->interest,
                             .data.ptr = io};
    if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        io->registered = 0;
        return -errno;
    }
    io->registered = 1;
    return 0;
}

int sl_io_modify(struct sl_loop *loop, struct sl_io *io, uint32_t events)
{
    if (io->interest == events || !io->registered) {
        io->interest = events;
        return 0;
    }
    io->interest = events;
    if (io->edge)
        return 0;
    struct epoll_event ev = {.events = events, .data.ptr = io};
    if (epoll_ctl(loop->epfd, EPOLL_CTL_MOD, io->fd, &ev) < 0)
        return -errno;
    return 0;
}

void sl_io_stop(struct sl_loop *loop, struct sl_io *io)
{
    if (!io->registered)
        return;
    epoll_ctl(loop->epfd, EPOLL_CTL_DEL, io->fd, NULL);
    io->registered = 0;
    io->interest = 0;
    io->ready = 0;
}

/* ---- timers: binary min-heap of pointers, each timer knows its slot ---- */

void sl_timer_init(struct sl_timer *t, sl_timer_cb cb, void *data)
{
    t->deadline_ms = 0;
    t->heap_index = 0;
    t->cb = cb;
    t->data = data;
}

static void heap_set(struct sl_loop *loop, uint32_t i, struct sl_timer *t)
{
    loop->heap[i] = t;
    t->heap_index = i;
}

static void sift_up(struct sl_loop *loop, uint32_t i)
{
    struct sl_timer *t = loop->heap[i];
    while (i > 1) {
        uint32_t p = i / 2;
        if (loop->heap[p]->deadline_ms <= t->deadline_ms)
            break;
        heap_set(loop, i, loop->heap[p]);
        i = p;
    }
    heap_set(loop, i, t);
}

static void sift_down(struct sl_loop *loop, uint32_t i)
{
    struct sl_timer *t = loop->heap[i];
    uint32_t n = loop->heap_len;
    for (;;) {
        uint32_t c = i * 2;
        if (c > n)
            break;
        if (c + 1 <= n && loop->heap[c + 1]->deadline_ms < loop->heap[c]->deadline_ms)
            c++;
        if (loop->heap[c]->deadline_ms >= t->deadline_ms)
            break;
        heap_set(loop, i, loop->heap[c]);
        i = c;
    }
    heap_set(loop, i, t);
}

static void heap_remove(struct sl_loop *loop, struct sl_timer *t)
{
    uint32_t i = t->heap_index;
    struct sl_timer *last = loop->heap[loop->heap_len--];
    t->heap_index = 0;
    if (last == t)
        return;
    heap_set(loop, i, last);
    if (i > 1 && loop->heap[i / 2]->deadline_ms > last->deadline_ms)
        sift_up(loop, i);
    else
        sift_down(loop, i);
}

void sl_timer_arm(struct sl_loop *loop, struct sl_timer *t, uint64_t delay_ms)
{
    uint64_t deadline = loop->now_ms + delay_ms;
    if (t->heap_index) {
        uint64_t old = t->deadline_ms;
        t->deadline_ms = deadline;
        if (deadline < old)
            sift_up(loop, t->heap_index);
        else if (deadline > old)
            sift_down(loop, t->heap_index);
        return;
    }
    if (loop->heap_len + 1 >= loop->heap_cap) {
        uint32_t cap = loop->heap_cap ? loop->heap_cap * 2 : 256;
        struct sl_timer **h = realloc(loop->heap, cap * sizeof *h);
        if (!h)
            abort(); /* the heap only grows with connections, which are bounded; OOM here is
                        not recoverable without losing a timeout */
        loop->heap = h;
        loop->heap_cap = cap;
    }
    t->deadline_ms = deadline;
    loop->heap_len++;
    heap_set(loop, loop->heap_len, t);
    sift_up(loop, loop->heap_len);
}

void sl_timer_cancel(struct sl_loop *loop, struct sl_timer *t)
{
    if (t->heap_index)
        heap_remove(loop, t);
}

int sl_loop_next_timeout_ms(const struct sl_loop *loop)
{
    if (loop->defer_head)
        return 0;
    if (loop->heap_len == 0)
        return -1;
    uint64_t d = loop->heap[1]->deadline_ms;
    if (d <= loop->now_ms)
        return 0;
    uint64_t wait = d - loop->now_ms;
    return wait > 60000 ? 60000 : (int)wait;
}

void sl_loop_run_timers(struct sl_loop *loop, uint64_t now_ms)
{
    while (loop->heap_len && loop->heap[1]->deadline_ms <= now_ms) {
        struct sl_timer *t = loop->heap[1];
        heap_remove(loop, t);
        t->cb(t);
        charge_settle(loop);
    }
}

/* ---- deferred callbacks ----
 * The queue is singly linked through `next`; the last entry points at DEFER_TAIL rather than
 * NULL so that "queued" needs no field of its own (NULL means not queued, which is also what
 * a zeroed object says). */

#define DEFER_TAIL ((struct sl_defer *)(uintptr_t)1)

void sl_defer_init(struct sl_defer *d, sl_defer_cb cb, void *data)
{
    d->next = NULL;
    d->cb = cb;
    d->data = data;
}

void sl_defer_queue(struct sl_loop *loop, struct sl_defer *d)
{
    if (d->next)
        return;
    d->next = DEFER_TAIL;
    if (loop->defer_tail)
        loop->defer_tail->next = d;
    else
        loop->defer_head = d;
    loop->defer_tail = d;
}

void sl_defer_cancel(struct sl_loop *loop, struct sl_defer *d)
{
    if (!d->next)
        return;
    struct sl_defer *prev = NULL, *cur = loop->defer_head;
    while (cur && cur != d) {
        prev = cur;
        cur = cur->next == DEFER_TAIL ? NULL : cur->next;
    }
    if (cur) {
        struct sl_defer *after = d->next == DEFER_TAIL ? NULL : d->next;
        if (prev)
            prev->next = after ? after : DEFER_TAIL;
        else
            loop->defer_head = after;
        if (loop->defer_tail == d)
            loop->defer_tail = prev;
    }
    d->next = NULL;
}

void sl_loop_run_deferred(struct sl_loop *loop)
{
    /* Callbacks may queue more; those run in the same pass, so a close queued by a flush
     * still happens this turn. Bounded because each object queues itself at most once per
     * state change. */
    while (loop->defer_head) {
        struct sl_defer *d = loop->defer_head;
        loop->defer_head = d->next == DEFER_TAIL ? NULL : d->next;
        if (!loop->defer_head)
            loop->defer_tail = NULL;
        d->next = NULL;
        d->cb(d);
        charge_settle(loop);
    }
}

void sl_loop_run(struct sl_loop *loop)
{
    struct epoll_event evs[MAX_EVENTS];
    loop->stop = false;
    loop_read_clock(loop);
    uint64_t woke_us = loop->now_us; /* when the previous epoll_wait returned */
    while (!loop->stop) {
        int timeout = sl_loop_next_timeout_ms(loop);
        uint64_t call_us = sl_clock_now_ns() / 1000u;
        int n = epoll_wait(loop->epfd, evs, MAX_EVENTS, timeout);
        loop_read_clock(loop);
        /* Events found without waiting became ready while the loop was busy since its last
         * wake-up: that time is part of their lag. */
        uint64_t carried = loop->now_us - call_us < 20 ? call_us - woke_us : 0;
        stat_add(&loop->stats.busy_us, call_us - woke_us);
        woke_us = loop->now_us;
        if (n < 0 && errno != EINTR)
            break;
        for (int i = 0; i < n; i++) {
            struct sl_io *io = evs[i].data.ptr;
            uint32_t ev = evs[i].events;
            if (!io->registered)
                continue; /* stopped by an earlier callback of this batch */
            if (io->edge) {
                io->ready |= ev;
                ev &= io->interest | EPOLLERR | EPOLLHUP;
                if (!ev)
                    continue;
            }
            io->cb(io, ev);
            charge_settle(loop);
        }
        if (n > 0)
            record_lag(loop, sl_clock_now_ns() / 1000u - woke_us + carried);
        sl_loop_run_timers(loop, loop->now_ms);
        sl_loop_run_deferred(loop);
        loop->turns++;
    }
}
