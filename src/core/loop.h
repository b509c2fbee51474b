#ifndef SL_CORE_LOOP_H
#define SL_CORE_LOOP_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>

/*
 * One event loop per worker thread: epoll for file descriptors, a timer heap for every
 * timeout, and a deferred-callback list that runs at the end of each turn (used to flush
 * writes once per turn and to free objects after their own callbacks have returned).
 *
 * A turn: wait until the earliest timer deadline, read the clock once, dispatch ready fds,
 * run expired timers, then run deferred callbacks. All of it on the owning thread; nothing
 * here is thread-safe except sl_loop_wake().
 *
 * Why a heap rather than a wheel (STYLE.md §6 says wheel): timers here are armed per phase,
 * not per byte, and re-arming an already armed timer to a later deadline is O(log n) with
 * no scan for the next deadline, which a wheel needs to compute the epoll timeout.
 */

struct sl_loop;
struct sl_io;
struct sl_timer;
struct sl_defer;

typedef void (*sl_io_cb)(struct sl_io *io, uint32_t events);
typedef void (*sl_timer_cb)(struct sl_timer *t);
typedef void (*sl_defer_cb)(struct sl_defer *d);

/*
 * A registered file descriptor. Embedded in its owner; `data` points back to it.
 *
 * Two modes. Level-triggered (listening sockets, eventfds): `interest` is what epoll watches
 * and sl_io_modify() changes it with epoll_ctl. Edge-triggered (pass SL_IO_EDGE to
 * sl_io_start; connections): the fd is registered once for everything, the loop records
 * readiness in `ready` as edges arrive, and sl_io_modify() only changes which events reach
 * the callback, with no syscall. An owner that turns interest on must first look at `ready`
 * (or just try the I/O): an edge that arrived while it was not interested is not repeated.
 * The owner clears a `ready` bit when the I/O says EAGAIN (sl_io_clear_ready).
 */
struct sl_io {
    int fd;
    uint32_t interest; /* events delivered to cb (plus EPOLLERR/EPOLLHUP, always) */
    uint32_t ready;    /* edge mode: readiness seen and not yet consumed */
    uint8_t registered;
    uint8_t edge;
    sl_io_cb cb;
    void *data;
};

#define SL_IO_EDGE EPOLLET

/* A one-shot timer. Embedded in its owner; zero-initialise or sl_timer_init() before use. */
struct sl_timer {
    uint64_t deadline_ms;
    uint32_t heap_index; /* 0 = not armed; otherwise 1-based position in the heap */
    sl_timer_cb cb;
    void *data;
};

/*
 * A callback posted from another thread to run on the loop's thread (a key set fetched by a
 * background thread, for example). Embedded in its owner, which keeps it alive until it ran.
 */
struct sl_post {
    struct sl_post *next;
    void (*cb)(struct sl_post *p);
    void *data;
    _Atomic int queued; /* 1 while posted and not yet run */
};

/* A callback queued to run at the end of the current loop turn (once, until re-queued). */
struct sl_defer {
    struct sl_defer *next; /* NULL when not queued */
    sl_defer_cb cb;
    void *data;
};

static inline bool sl_defer_is_queued(const struct sl_defer *d)
{
    return d->next != NULL;
}

/*
 * Saturation signals, written by the loop's own thread only and read by the metrics endpoint
 * from another thread (relaxed atomics: single writer, no read-modify-write on the hot path).
 * Lag is how long a ready socket waited before its callback ran: per turn with events, the
 * time from epoll_wait's return to the end of the batch, plus the time the loop was busy
 * before the call when epoll_wait found events already waiting (they became ready during it).
 */
#define SL_LOOP_LAG_BUCKETS 12
extern const uint64_t sl_loop_lag_bounds_us[SL_LOOP_LAG_BUCKETS]; /* upper bounds; +Inf after */
struct sl_loop_stats {
    _Atomic uint64_t lag_buckets[SL_LOOP_LAG_BUCKETS + 1]; /* non-cumulative; [last] = +Inf */
    _Atomic uint64_t lag_sum_us;
    _Atomic uint64_t lag_max_us; /* largest since a reader last took it (sl_loop_take_max_lag) */
    _Atomic uint64_t busy_us;    /* time spent outside epoll_wait */
};

struct sl_loop {
    int epfd;
    int wake_fd; /* eventfd; sl_loop_wake() makes the loop run `on_wake` */
    bool stop;
    uint64_t now_ms;        /* cached monotonic time, refreshed once per turn */
    uint64_t now_us;        /* the same reading in microseconds */
    uint64_t turns;         /* completed loop turns (tests use it to tell turns apart) */
    struct sl_timer **heap; /* 1-based binary min-heap */
    uint32_t heap_len, heap_cap;
    struct sl_defer *defer_head, *defer_tail;
    void (*on_wake)(struct sl_loop *loop, void *data);
    struct sl_post *_Atomic posted; /* stack of posts from other threads */
    void *wake_data;
    struct sl_io wake_io;
    struct sl_loop_stats stats;
    /* CPU charging (sl_loop_charge): where the running callback's time goes, and since when */
    uint64_t *charge;
    uint64_t charge_since_ns;
};

/* Monotonic clock in nanoseconds (vDSO, no system call). */
uint64_t sl_clock_now_ns(void);

/*
 * Charges the running callback's time from now on to `*acc` (nanoseconds; NULL: to nobody),
 * first settling the time since the previous charge call into the previous account. The loop
 * settles and clears the account when the callback returns. Because a worker never blocks
 * inside a callback, this wall time is the CPU time (user + system) the work cost, except
 * when the OS preempts the thread. Costs one clock read per call, none when unused.
 */
void sl_loop_charge(struct sl_loop *loop, uint64_t *acc);

/* The largest lag seen since the previous call (microseconds), resetting it. Any thread. */
uint64_t sl_loop_take_max_lag(const struct sl_loop *loop);

/* Monotonic clock in milliseconds (CLOCK_MONOTONIC_COARSE is not used: 1-4 ms jitter). */
uint64_t sl_clock_now_ms(void);

/* Sets up the loop. Returns 0 or -errno. */
int sl_loop_init(struct sl_loop *loop);

/* Releases the epoll and eventfd descriptors and the heap. Registered fds are not closed. */
void sl_loop_dispose(struct sl_loop *loop);

/* Runs turns until sl_loop_stop() is called from a callback on this thread. */
void sl_loop_run(struct sl_loop *loop);

/* Makes sl_loop_run() return after the current turn. Loop thread only. */
void sl_loop_stop(struct sl_loop *loop);

/* Wakes the loop from any thread; `on_wake` runs on the loop thread. Async-signal-safe. */
void sl_loop_wake(struct sl_loop *loop);

/* From any thread: runs p->cb on the loop's thread soon (posts run before `on_wake`). A post
 * already queued is not queued twice. Lock-free. */
void sl_loop_post(struct sl_loop *loop, struct sl_post *p);

static inline uint64_t sl_loop_now_ms(const struct sl_loop *loop)
{
    return loop->now_ms;
}

/* The turn's monotonic time in microseconds (same clock as sl_clock_now_ms). */
static inline uint64_t sl_loop_now_us(const struct sl_loop *loop)
{
    return loop->now_us;
}

/* Registers `fd` with interest `events` (EPOLLIN, EPOLLOUT, EPOLLRDHUP), level-triggered, or
 * edge-triggered when `events` includes SL_IO_EDGE. Returns 0 or -errno. `io` is owned by the
 * caller and must stay valid until sl_io_stop(). */
int sl_io_start(struct sl_loop *loop, struct sl_io *io, int fd, uint32_t events, sl_io_cb cb,
                void *data);

/* Changes the interest; a no-op when unchanged; never a syscall in edge mode.
 * Returns 0 or -errno. */
int sl_io_modify(struct sl_loop *loop, struct sl_io *io, uint32_t events);

/* Forgets readiness after an EAGAIN (or a short read) so that the next edge is awaited. */
static inline void sl_io_clear_ready(struct sl_io *io, uint32_t events)
{
    io->ready &= ~events;
}

/* Unregisters the fd (does not close it). Safe on an io that is not registered. */
void sl_io_stop(struct sl_loop *loop, struct sl_io *io);

void sl_timer_init(struct sl_timer *t, sl_timer_cb cb, void *data);

/* Arms (or re-arms) `t` to fire `delay_ms` from the loop's cached now. */
void sl_timer_arm(struct sl_loop *loop, struct sl_timer *t, uint64_t delay_ms);

/* Cancels `t`; a no-op when not armed. */
void sl_timer_cancel(struct sl_loop *loop, struct sl_timer *t);

static inline bool sl_timer_is_armed(const struct sl_timer *t)
{
    return t->heap_index != 0;
}

void sl_defer_init(struct sl_defer *d, sl_defer_cb cb, void *data);

/* Queues `d` to run at the end of this turn; a no-op when already queued. */
void sl_defer_queue(struct sl_loop *loop, struct sl_defer *d);

/* Removes `d` from the queue if queued (O(n) in the queue length; rare). */
void sl_defer_cancel(struct sl_loop *loop, struct sl_defer *d);

/* Runs every queued deferred callback now (used once more after the loop stopped, so that
 * objects closed during shutdown are freed). */
void sl_loop_run_deferred(struct sl_loop *loop);

/* Milliseconds until the earliest timer, or -1 when none (for epoll_wait). */
int sl_loop_next_timeout_ms(const struct sl_loop *loop);

/* Runs expired timers against `now_ms` (exposed for unit tests). */
void sl_loop_run_timers(struct sl_loop *loop, uint64_t now_ms);

#endif
