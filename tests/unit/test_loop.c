#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/loop.h"

/* Deterministic PRNG so a failure reproduces. */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng_next(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    rng_state = x;
    return x;
}

static uint64_t rng_below(uint64_t n)
{
    return rng_next() % n;
}

/* ---- timers ------------------------------------------------------------------------------ */

/* Shared record of every timer firing: which timer, its deadline, the `now` it fired at. */
struct fire_log {
    struct sl_loop *loop;
    uint64_t now; /* the now passed to the current sl_loop_run_timers call */
    size_t count; /* firings so far */
    size_t cap;
    size_t *order; /* timer ids in firing order */
    uint64_t last_deadline;
    bool ordered;     /* deadlines never decreased */
    bool early;       /* some timer fired before its deadline */
    bool armed_in_cb; /* some timer was still marked armed inside its own callback */
};

struct tt {
    struct sl_timer timer;
    struct fire_log *log;
    size_t id;
    uint64_t expect_deadline; /* the model's deadline */
    int fired;
};

static void on_tt_fire(struct sl_timer *t)
{
    struct tt *x = t->data;
    struct fire_log *log = x->log;
    if (sl_timer_is_armed(t))
        log->armed_in_cb = true;
    if (t->deadline_ms > log->now)
        log->early = true;
    if (log->count && t->deadline_ms < log->last_deadline)
        log->ordered = false;
    log->last_deadline = t->deadline_ms;
    if (log->count < log->cap)
        log->order[log->count] = x->id;
    log->count++;
    x->fired++;
}

static void fire_log_init(struct fire_log *log, struct sl_loop *loop, size_t cap)
{
    memset(log, 0, sizeof *log);
    log->loop = loop;
    log->cap = cap;
    log->order = calloc(cap ? cap : 1, sizeof *log->order);
    assert_non_null(log->order);
    log->ordered = true;
}

static void run_timers_at(struct sl_loop *loop, struct fire_log *log, uint64_t now)
{
    loop->now_ms = now;
    log->now = now;
    sl_loop_run_timers(loop, now);
}

static int loop_setup(void **state)
{
    struct sl_loop *loop = calloc(1, sizeof *loop);
    if (!loop)
        return -1;
    if (sl_loop_init(loop) != 0) {
        free(loop);
        return -1;
    }
    *state = loop;
    return 0;
}

static int loop_teardown(void **state)
{
    struct sl_loop *loop = *state;
    sl_loop_dispose(loop);
    free(loop);
    return 0;
}

/* Every armed timer that has not fired must be due strictly after `now`. */
static void assert_none_overdue(const struct tt *ts, size_t n, uint64_t now)
{
    for (size_t i = 0; i < n; i++)
        if (sl_timer_is_armed(&ts[i].timer))
            assert_true(ts[i].timer.deadline_ms > now);
}

static void check_random_timers(struct sl_loop *loop, size_t n, uint64_t max_delay,
                                uint64_t max_step)
{
    struct fire_log log;
    fire_log_init(&log, loop, n);
    struct tt *ts = calloc(n, sizeof *ts);
    assert_non_null(ts);

    const uint64_t base = 1000000;
    loop->now_ms = base;
    for (size_t i = 0; i < n; i++) {
        ts[i].log = &log;
        ts[i].id = i;
        sl_timer_init(&ts[i].timer, on_tt_fire, &ts[i]);
        assert_false(sl_timer_is_armed(&ts[i].timer));
        uint64_t d = rng_below(max_delay + 1);
        sl_timer_arm(loop, &ts[i].timer, d);
        assert_true(sl_timer_is_armed(&ts[i].timer));
        assert_int_equal(ts[i].timer.deadline_ms, base + d);
        ts[i].expect_deadline = base + d;
    }

    uint64_t now = base;
    size_t steps = 0;
    while (log.count < n) {
        assert_true(++steps < 10 * (max_delay / (max_step ? max_step : 1) + 10) + n);
        size_t before = log.count;
        run_timers_at(loop, &log, now);
        /* Everything due fired; nothing not due did. */
        assert_none_overdue(ts, n, now);
        for (size_t k = before; k < log.count; k++)
            assert_true(ts[log.order[k]].expect_deadline <= now);
        now += rng_below(max_step + 1);
    }
    assert_true(log.ordered);
    assert_false(log.early);
    assert_false(log.armed_in_cb);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(ts[i].fired, 1);
        assert_false(sl_timer_is_armed(&ts[i].timer));
    }
    assert_int_equal(loop->heap_len, 0);
    assert_int_equal(sl_loop_next_timeout_ms(loop), -1);
    free(ts);
    free(log.order);
}

static void test_timer_order_random(void **state)
{
    struct sl_loop *loop = *state;
    check_random_timers(loop, 1000, 5000, 37);
}

static void test_timer_order_many_equal_deadlines(void **state)
{
    struct sl_loop *loop = *state;
    /* Few distinct deadlines: ties everywhere in the heap. */
    check_random_timers(loop, 2000, 7, 1);
}

static void test_timer_10000(void **state)
{
    struct sl_loop *loop = *state;
    check_random_timers(loop, 10000, 100000, 500);
}

static void test_timer_not_fired_before_due(void **state)
{
    struct sl_loop *loop = *state;
    struct fire_log log;
    fire_log_init(&log, loop, 4);
    struct tt a = {.log = &log, .id = 0};
    sl_timer_init(&a.timer, on_tt_fire, &a);
    loop->now_ms = 500;
    sl_timer_arm(loop, &a.timer, 100);
    run_timers_at(loop, &log, 500);
    run_timers_at(loop, &log, 599);
    assert_int_equal(a.fired, 0);
    assert_true(sl_timer_is_armed(&a.timer));
    run_timers_at(loop, &log, 600);
    assert_int_equal(a.fired, 1);
    assert_false(sl_timer_is_armed(&a.timer));
    /* One-shot: it does not fire again. */
    run_timers_at(loop, &log, 100000);
    assert_int_equal(a.fired, 1);
    free(log.order);
}

static void test_timer_zero_delay(void **state)
{
    struct sl_loop *loop = *state;
    struct fire_log log;
    fire_log_init(&log, loop, 4);
    struct tt a = {.log = &log, .id = 0};
    sl_timer_init(&a.timer, on_tt_fire, &a);
    loop->now_ms = 42;
    sl_timer_arm(loop, &a.timer, 0);
    assert_int_equal(sl_loop_next_timeout_ms(loop), 0);
    run_timers_at(loop, &log, 42);
    assert_int_equal(a.fired, 1);
    free(log.order);
}

static void test_timer_rearm(void **state)
{
    struct sl_loop *loop = *state;
    struct fire_log log;
    fire_log_init(&log, loop, 8);
    struct tt t[3];
    for (size_t i = 0; i < 3; i++) {
        t[i] = (struct tt){.log = &log, .id = i};
        sl_timer_init(&t[i].timer, on_tt_fire, &t[i]);
    }
    loop->now_ms = 1000;
    sl_timer_arm(loop, &t[0].timer, 100);
    sl_timer_arm(loop, &t[1].timer, 200);
    sl_timer_arm(loop, &t[2].timer, 300);
    assert_int_equal(sl_loop_next_timeout_ms(loop), 100);

    /* Earlier: t2 moves to the front. */
    sl_timer_arm(loop, &t[2].timer, 50);
    assert_int_equal(t[2].timer.deadline_ms, 1050);
    assert_int_equal(sl_loop_next_timeout_ms(loop), 50);
    /* Later: t0 moves to the back. */
    sl_timer_arm(loop, &t[0].timer, 400);
    assert_int_equal(t[0].timer.deadline_ms, 1400);
    /* Re-arming does not add a second heap entry. */
    assert_int_equal(loop->heap_len, 3);
    /* Same deadline again: still one entry, unchanged. */
    sl_timer_arm(loop, &t[1].timer, 200);
    assert_int_equal(loop->heap_len, 3);

    run_timers_at(loop, &log, 1049);
    assert_int_equal(log.count, 0);
    run_timers_at(loop, &log, 1050);
    assert_int_equal(log.count, 1);
    run_timers_at(loop, &log, 1399);
    assert_int_equal(log.count, 2);
    run_timers_at(loop, &log, 1400);
    assert_int_equal(log.count, 3);
    assert_int_equal(log.order[0], 2);
    assert_int_equal(log.order[1], 1);
    assert_int_equal(log.order[2], 0);
    for (size_t i = 0; i < 3; i++)
        assert_int_equal(t[i].fired, 1);
    free(log.order);
}

/* Random arm / re-arm / cancel against a model; then fire everything and compare. */
static void test_timer_random_ops_model(void **state)
{
    struct sl_loop *loop = *state;
    enum { N = 500, OPS = 20000 };
    struct fire_log log;
    fire_log_init(&log, loop, N);
    struct tt *ts = calloc(N, sizeof *ts);
    assert_non_null(ts);
    bool *armed = calloc(N, sizeof *armed);
    assert_non_null(armed);
    loop->now_ms = 10;
    for (size_t i = 0; i < N; i++) {
        ts[i].log = &log;
        ts[i].id = i;
        sl_timer_init(&ts[i].timer, on_tt_fire, &ts[i]);
    }
    size_t armed_count = 0;
    for (size_t op = 0; op < OPS; op++) {
        size_t i = (size_t)rng_below(N);
        if (rng_below(4) == 0) {
            sl_timer_cancel(loop, &ts[i].timer);
            if (armed[i])
                armed_count--;
            armed[i] = false;
        } else {
            uint64_t d = rng_below(10000);
            sl_timer_arm(loop, &ts[i].timer, d);
            if (!armed[i])
                armed_count++;
            armed[i] = true;
            ts[i].expect_deadline = loop->now_ms + d;
        }
        assert_int_equal(loop->heap_len, armed_count);
        assert_int_equal(sl_timer_is_armed(&ts[i].timer), armed[i]);
    }
    uint64_t min = UINT64_MAX;
    for (size_t i = 0; i < N; i++)
        if (armed[i] && ts[i].expect_deadline < min)
            min = ts[i].expect_deadline;
    if (armed_count)
        assert_int_equal(sl_loop_next_timeout_ms(loop), (int)(min - loop->now_ms));

    uint64_t now = loop->now_ms;
    while (log.count < armed_count) {
        run_timers_at(loop, &log, now);
        assert_none_overdue(ts, N, now);
        now += 7;
        assert_true(now < 20000);
    }
    assert_true(log.ordered);
    assert_false(log.early);
    assert_int_equal(log.count, armed_count);
    for (size_t i = 0; i < N; i++) {
        assert_int_equal(ts[i].fired, armed[i] ? 1 : 0);
        if (armed[i])
            assert_int_equal(ts[i].timer.deadline_ms, ts[i].expect_deadline);
    }
    free(armed);
    free(ts);
    free(log.order);
}

static void test_timer_cancel(void **state)
{
    struct sl_loop *loop = *state;
    struct fire_log log;
    fire_log_init(&log, loop, 8);
    struct tt a = {.log = &log, .id = 0}, b = {.log = &log, .id = 1}, c = {.log = &log, .id = 2};
    sl_timer_init(&a.timer, on_tt_fire, &a);
    sl_timer_init(&b.timer, on_tt_fire, &b);
    sl_timer_init(&c.timer, on_tt_fire, &c);
    loop->now_ms = 0;

    /* Cancel of a never-armed timer is a no-op. */
    sl_timer_cancel(loop, &a.timer);
    assert_false(sl_timer_is_armed(&a.timer));
    assert_int_equal(loop->heap_len, 0);

    sl_timer_arm(loop, &a.timer, 10);
    sl_timer_arm(loop, &b.timer, 20);
    sl_timer_arm(loop, &c.timer, 30);
    /* Cancel the root, then a leaf; twice is a no-op. */
    sl_timer_cancel(loop, &a.timer);
    sl_timer_cancel(loop, &a.timer);
    sl_timer_cancel(loop, &c.timer);
    assert_false(sl_timer_is_armed(&a.timer));
    assert_false(sl_timer_is_armed(&c.timer));
    assert_true(sl_timer_is_armed(&b.timer));
    assert_int_equal(loop->heap_len, 1);
    assert_int_equal(sl_loop_next_timeout_ms(loop), 20);

    run_timers_at(loop, &log, 1000);
    assert_int_equal(a.fired, 0);
    assert_int_equal(b.fired, 1);
    assert_int_equal(c.fired, 0);

    /* A cancelled timer can be armed again. */
    loop->now_ms = 1000;
    sl_timer_arm(loop, &a.timer, 5);
    run_timers_at(loop, &log, 1005);
    assert_int_equal(a.fired, 1);
    free(log.order);
}

/* A timer whose callback cancels, arms and re-arms other timers. */
struct actor {
    struct sl_timer timer;
    struct sl_loop *loop;
    struct sl_timer *cancel; /* cancelled from the callback */
    struct sl_timer *arm;    /* armed from the callback with arm_delay */
    uint64_t arm_delay;
    bool rearm_self;
    uint64_t self_delay;
    int fired;
};

static int plain_fired[4];

static void on_plain(struct sl_timer *t)
{
    plain_fired[(intptr_t)t->data]++;
}

static void on_actor(struct sl_timer *t)
{
    struct actor *a = t->data;
    a->fired++;
    if (a->cancel)
        sl_timer_cancel(a->loop, a->cancel);
    if (a->arm)
        sl_timer_arm(a->loop, a->arm, a->arm_delay);
    if (a->rearm_self) {
        a->rearm_self = false;
        sl_timer_arm(a->loop, &a->timer, a->self_delay);
    }
}

static void test_timer_cancel_from_callback(void **state)
{
    struct sl_loop *loop = *state;
    memset(plain_fired, 0, sizeof plain_fired);
    struct sl_timer victim, bystander;
    sl_timer_init(&victim, on_plain, (void *)(intptr_t)0);
    sl_timer_init(&bystander, on_plain, (void *)(intptr_t)1);
    struct actor a = {.loop = loop, .cancel = &victim};
    sl_timer_init(&a.timer, on_actor, &a);

    loop->now_ms = 100;
    sl_timer_arm(loop, &a.timer, 10);
    sl_timer_arm(loop, &victim, 11); /* due in the same pass, after the actor */
    sl_timer_arm(loop, &bystander, 12);
    loop->now_ms = 200;
    sl_loop_run_timers(loop, 200);
    assert_int_equal(a.fired, 1);
    assert_int_equal(plain_fired[0], 0);
    assert_int_equal(plain_fired[1], 1);
    assert_false(sl_timer_is_armed(&victim));
    assert_int_equal(loop->heap_len, 0);

    /* Cancelling an unarmed timer from a callback, and the running timer itself. */
    a.cancel = &a.timer;
    a.fired = 0;
    sl_timer_arm(loop, &a.timer, 1);
    sl_loop_run_timers(loop, 201);
    assert_int_equal(a.fired, 1);
    assert_int_equal(loop->heap_len, 0);
}

static void test_timer_arm_from_callback(void **state)
{
    struct sl_loop *loop = *state;
    memset(plain_fired, 0, sizeof plain_fired);
    struct sl_timer now_t, later_t;
    sl_timer_init(&now_t, on_plain, (void *)(intptr_t)0);
    sl_timer_init(&later_t, on_plain, (void *)(intptr_t)1);
    struct actor a = {.loop = loop, .arm = &now_t, .arm_delay = 0};
    sl_timer_init(&a.timer, on_actor, &a);
    struct actor b = {
        .loop = loop, .arm = &later_t, .arm_delay = 50, .rearm_self = true, .self_delay = 10};
    sl_timer_init(&b.timer, on_actor, &b);

    loop->now_ms = 1000;
    sl_timer_arm(loop, &a.timer, 0);
    sl_timer_arm(loop, &b.timer, 0);
    sl_loop_run_timers(loop, 1000);
    /* Armed with delay 0 from a callback: already due, fires in the same pass. */
    assert_int_equal(a.fired, 1);
    assert_int_equal(plain_fired[0], 1);
    /* Armed for later from a callback: not fired yet. b re-armed itself. */
    assert_int_equal(b.fired, 1);
    assert_int_equal(plain_fired[1], 0);
    assert_true(sl_timer_is_armed(&later_t));
    assert_true(sl_timer_is_armed(&b.timer));
    assert_int_equal(later_t.deadline_ms, 1050);
    assert_int_equal(b.timer.deadline_ms, 1010);
    assert_int_equal(sl_loop_next_timeout_ms(loop), 10);

    loop->now_ms = 1010;
    sl_loop_run_timers(loop, 1010);
    assert_int_equal(b.fired, 2); /* the self re-arm fired; b re-armed later_t to 1060 */
    assert_int_equal(later_t.deadline_ms, 1060);
    assert_int_equal(plain_fired[1], 0);
    loop->now_ms = 1060;
    sl_loop_run_timers(loop, 1060);
    assert_int_equal(plain_fired[1], 1);
    assert_int_equal(loop->heap_len, 0);
}

static void test_next_timeout(void **state)
{
    struct sl_loop *loop = *state;
    struct sl_timer t, u;
    sl_timer_init(&t, on_plain, (void *)(intptr_t)0);
    sl_timer_init(&u, on_plain, (void *)(intptr_t)1);
    assert_int_equal(sl_loop_next_timeout_ms(loop), -1);

    loop->now_ms = 5000;
    sl_timer_arm(loop, &t, 250);
    assert_int_equal(sl_loop_next_timeout_ms(loop), 250);
    loop->now_ms = 5100;
    assert_int_equal(sl_loop_next_timeout_ms(loop), 150);
    loop->now_ms = 5250;
    assert_int_equal(sl_loop_next_timeout_ms(loop), 0);
    loop->now_ms = 9000; /* overdue */
    assert_int_equal(sl_loop_next_timeout_ms(loop), 0);

    /* Long delays are capped for epoll_wait's int. */
    sl_timer_cancel(loop, &t);
    sl_timer_arm(loop, &u, 10ull * 24 * 3600 * 1000);
    int w = sl_loop_next_timeout_ms(loop);
    assert_true(w > 0);
    assert_true(w <= 60000);

    /* A queued deferred callback means "do not block". */
    struct sl_defer d;
    sl_defer_init(&d, NULL, NULL);
    sl_defer_queue(loop, &d);
    assert_int_equal(sl_loop_next_timeout_ms(loop), 0);
    sl_defer_cancel(loop, &d);
    assert_int_equal(sl_loop_next_timeout_ms(loop), w);
    sl_timer_cancel(loop, &u);
    assert_int_equal(sl_loop_next_timeout_ms(loop), -1);
}

/* ---- deferred callbacks ------------------------------------------------------------------ */

struct dlog {
    int order[32];
    int n;
};

struct dd {
    struct sl_defer d;
    struct dlog *log;
    int id;
    struct sl_loop *loop;
    struct sl_defer *queue_other; /* queued from the callback */
    int requeue_self;             /* times left to re-queue itself */
};

static void on_dd(struct sl_defer *d)
{
    struct dd *x = d->data;
    assert_false(sl_defer_is_queued(d));
    if (x->log->n < 32)
        x->log->order[x->log->n] = x->id;
    x->log->n++;
    if (x->queue_other)
        sl_defer_queue(x->loop, x->queue_other);
    if (x->requeue_self > 0) {
        x->requeue_self--;
        sl_defer_queue(x->loop, d);
    }
}

static void dd_init(struct dd *x, struct dlog *log, struct sl_loop *loop, int id)
{
    memset(x, 0, sizeof *x);
    x->log = log;
    x->id = id;
    x->loop = loop;
    sl_defer_init(&x->d, on_dd, x);
}

static void test_defer_order_once(void **state)
{
    struct sl_loop *loop = *state;
    struct dlog log = {0};
    struct dd x[4];
    for (int i = 0; i < 4; i++)
        dd_init(&x[i], &log, loop, i);
    sl_defer_queue(loop, &x[2].d);
    sl_defer_queue(loop, &x[0].d);
    sl_defer_queue(loop, &x[2].d); /* already queued: no-op, keeps its place */
    sl_defer_queue(loop, &x[3].d);
    sl_defer_queue(loop, &x[1].d);
    sl_defer_queue(loop, &x[0].d);
    assert_true(sl_defer_is_queued(&x[0].d));
    sl_loop_run_deferred(loop);
    assert_int_equal(log.n, 4);
    assert_int_equal(log.order[0], 2);
    assert_int_equal(log.order[1], 0);
    assert_int_equal(log.order[2], 3);
    assert_int_equal(log.order[3], 1);
    for (int i = 0; i < 4; i++)
        assert_false(sl_defer_is_queued(&x[i].d));
    assert_null(loop->defer_head);
    /* Ran once: a second pass runs nothing. */
    sl_loop_run_deferred(loop);
    assert_int_equal(log.n, 4);
    /* Can be queued again after running. */
    sl_defer_queue(loop, &x[1].d);
    sl_loop_run_deferred(loop);
    assert_int_equal(log.n, 5);
    assert_int_equal(log.order[4], 1);
}

static void test_defer_cancel(void **state)
{
    struct sl_loop *loop = *state;
    struct dlog log = {0};
    struct dd x[5];
    for (int i = 0; i < 5; i++)
        dd_init(&x[i], &log, loop, i);

    /* Cancel of an unqueued defer is a no-op. */
    sl_defer_cancel(loop, &x[0].d);
    assert_null(loop->defer_head);

    for (int i = 0; i < 5; i++)
        sl_defer_queue(loop, &x[i].d);
    sl_defer_cancel(loop, &x[0].d); /* head */
    sl_defer_cancel(loop, &x[2].d); /* middle */
    sl_defer_cancel(loop, &x[4].d); /* tail */
    sl_defer_cancel(loop, &x[4].d); /* twice */
    assert_false(sl_defer_is_queued(&x[4].d));
    /* The tail must be right after cancelling the old tail: a new entry goes last. */
    sl_defer_queue(loop, &x[0].d);
    sl_loop_run_deferred(loop);
    assert_int_equal(log.n, 3);
    assert_int_equal(log.order[0], 1);
    assert_int_equal(log.order[1], 3);
    assert_int_equal(log.order[2], 0);

    /* Cancel the only entry, then queue: the list must not be left half-linked. */
    log.n = 0;
    sl_defer_queue(loop, &x[1].d);
    sl_defer_cancel(loop, &x[1].d);
    assert_null(loop->defer_head);
    assert_null(loop->defer_tail);
    sl_defer_queue(loop, &x[2].d);
    sl_defer_queue(loop, &x[3].d);
    sl_loop_run_deferred(loop);
    assert_int_equal(log.n, 2);
    assert_int_equal(log.order[0], 2);
    assert_int_equal(log.order[1], 3);
}

static void test_defer_queued_from_callback(void **state)
{
    struct sl_loop *loop = *state;
    struct dlog log = {0};
    struct dd x[3];
    for (int i = 0; i < 3; i++)
        dd_init(&x[i], &log, loop, i);
    x[0].queue_other = &x[2].d;
    x[1].requeue_self = 1;
    sl_defer_queue(loop, &x[0].d);
    sl_defer_queue(loop, &x[1].d);
    sl_loop_run_deferred(loop);
    /* Queued during the pass: run in the same pass, after what was already queued. */
    assert_int_equal(log.n, 4);
    assert_int_equal(log.order[0], 0);
    assert_int_equal(log.order[1], 1);
    assert_int_equal(log.order[2], 2);
    assert_int_equal(log.order[3], 1);
    assert_null(loop->defer_head);
}

/* ---- fd readiness, sl_loop_run, stop, wake ----------------------------------------------- */

struct io_ctx {
    struct sl_loop *loop;
    struct sl_io io;
    int calls;
    uint32_t last_events;
    char got[64];
    size_t got_len;
    bool stop_on_call;
};

static void on_io(struct sl_io *io, uint32_t events)
{
    struct io_ctx *c = io->data;
    c->calls++;
    c->last_events = events;
    if (events & EPOLLIN) {
        ssize_t r = read(io->fd, c->got + c->got_len, sizeof c->got - c->got_len);
        if (r > 0)
            c->got_len += (size_t)r;
    }
    if (c->stop_on_call)
        sl_loop_stop(c->loop);
}

/* Bounds every sl_loop_run: if this fires, the test failed to see its event. */
static bool watchdog_fired;

static void on_watchdog(struct sl_timer *t)
{
    watchdog_fired = true;
    sl_loop_stop(t->data);
}

static void run_bounded(struct sl_loop *loop, struct sl_timer *wd)
{
    watchdog_fired = false;
    loop->now_ms = sl_clock_now_ms();
    sl_timer_init(wd, on_watchdog, loop);
    sl_timer_arm(loop, wd, 5000);
    sl_loop_run(loop);
    sl_timer_cancel(loop, wd);
    assert_false(watchdog_fired);
}

static void make_pair(int sv[2])
{
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
}

static void test_io_read_and_stop(void **state)
{
    struct sl_loop *loop = *state;
    int sv[2];
    make_pair(sv);
    struct io_ctx c = {.loop = loop, .stop_on_call = true};
    assert_int_equal(sl_io_start(loop, &c.io, sv[0], EPOLLIN, on_io, &c), 0);
    assert_int_equal(c.io.fd, sv[0]);
    assert_ptr_equal(c.io.data, &c);
    assert_int_equal(write(sv[1], "ping", 4), 4);

    struct sl_timer wd;
    uint64_t turns = loop->turns;
    run_bounded(loop, &wd);
    assert_int_equal(c.calls, 1);
    assert_true(c.last_events & EPOLLIN);
    assert_int_equal(c.got_len, 4);
    assert_memory_equal(c.got, "ping", 4);
    /* sl_loop_stop from the callback ends the run after that turn. */
    assert_int_equal(loop->turns, turns + 1);

    sl_io_stop(loop, &c.io);
    sl_io_stop(loop, &c.io); /* twice is safe */
    close(sv[0]);
    close(sv[1]);
}

static void test_io_modify(void **state)
{
    struct sl_loop *loop = *state;
    int sv[2];
    make_pair(sv);
    struct io_ctx c = {.loop = loop, .stop_on_call = true};
    /* Registered with no readable data: switch to EPOLLOUT, which is ready at once. */
    assert_int_equal(sl_io_start(loop, &c.io, sv[0], EPOLLIN, on_io, &c), 0);
    assert_int_equal(sl_io_modify(loop, &c.io, EPOLLIN), 0); /* unchanged: no-op */
    assert_int_equal(sl_io_modify(loop, &c.io, EPOLLOUT), 0);
    struct sl_timer wd;
    run_bounded(loop, &wd);
    assert_int_equal(c.calls, 1);
    assert_true(c.last_events & EPOLLOUT);
    assert_false(c.last_events & EPOLLIN);

    /* Back to EPOLLIN: now only readable data wakes it. */
    assert_int_equal(sl_io_modify(loop, &c.io, EPOLLIN), 0);
    assert_int_equal(write(sv[1], "x", 1), 1);
    c.calls = 0;
    run_bounded(loop, &wd);
    assert_int_equal(c.calls, 1);
    assert_true(c.last_events & EPOLLIN);
    assert_false(c.last_events & EPOLLOUT);
    assert_int_equal(c.got_len, 1);

    /* Registered with no events at all, then modified to EPOLLOUT. */
    sl_io_stop(loop, &c.io);
    assert_int_equal(sl_io_start(loop, &c.io, sv[0], 0, on_io, &c), 0);
    assert_int_equal(sl_io_modify(loop, &c.io, EPOLLOUT), 0);
    c.calls = 0;
    run_bounded(loop, &wd);
    assert_int_equal(c.calls, 1);
    assert_true(c.last_events & EPOLLOUT);

    sl_io_stop(loop, &c.io);
    close(sv[0]);
    close(sv[1]);
}

static void test_io_stop_unregisters(void **state)
{
    struct sl_loop *loop = *state;
    int a[2], b[2];
    make_pair(a);
    make_pair(b);
    struct io_ctx stopped = {.loop = loop};
    struct io_ctx sentinel = {.loop = loop, .stop_on_call = true};
    assert_int_equal(sl_io_start(loop, &stopped.io, a[0], EPOLLIN, on_io, &stopped), 0);
    assert_int_equal(sl_io_start(loop, &sentinel.io, b[0], EPOLLIN, on_io, &sentinel), 0);
    sl_io_stop(loop, &stopped.io);
    /* Both fds readable before the turn: were `stopped` still registered, the same
     * epoll_wait would report it alongside the sentinel (level-triggered). */
    assert_int_equal(write(a[1], "a", 1), 1);
    assert_int_equal(write(b[1], "b", 1), 1);
    struct sl_timer wd;
    run_bounded(loop, &wd);
    assert_int_equal(sentinel.calls, 1);
    assert_int_equal(stopped.calls, 0);

    /* The fd is not closed by sl_io_stop and can be registered again. */
    assert_int_equal(sl_io_start(loop, &stopped.io, a[0], EPOLLIN, on_io, &stopped), 0);
    stopped.stop_on_call = true;
    sl_io_stop(loop, &sentinel.io);
    run_bounded(loop, &wd);
    assert_int_equal(stopped.calls, 1);
    assert_int_equal(stopped.got_len, 1);
    sl_io_stop(loop, &stopped.io);

    /* Stopping an io that was never registered is safe. */
    struct sl_io never = {0};
    sl_io_stop(loop, &never);

    close(a[0]);
    close(a[1]);
    close(b[0]);
    close(b[1]);
}

static void test_io_start_bad_fd(void **state)
{
    struct sl_loop *loop = *state;
    struct io_ctx c = {.loop = loop};
    assert_int_equal(sl_io_start(loop, &c.io, -1, EPOLLIN, on_io, &c), -EBADF);
    sl_io_stop(loop, &c.io); /* not registered: no-op */
}

/* Timers and deferred callbacks in a real run: the io callback queues a defer, which stops
 * the loop at the end of the same turn; a timer fires by its deadline. */
struct run_ctx {
    struct sl_loop *loop;
    struct sl_defer d;
    int defer_calls;
    uint64_t turn_at_defer;
    struct sl_timer t;
    int timer_calls;
    uint64_t timer_now;
};

static void on_run_defer(struct sl_defer *d)
{
    struct run_ctx *c = d->data;
    c->defer_calls++;
    c->turn_at_defer = c->loop->turns;
    sl_loop_stop(c->loop);
}

static void on_run_io(struct sl_io *io, uint32_t events)
{
    (void)events;
    struct run_ctx *c = io->data;
    char b[8];
    ssize_t r = read(io->fd, b, sizeof b);
    (void)r;
    sl_defer_queue(c->loop, &c->d);
}

static void on_run_timer(struct sl_timer *t)
{
    struct run_ctx *c = t->data;
    c->timer_calls++;
    c->timer_now = sl_loop_now_ms(c->loop);
    sl_loop_stop(c->loop);
}

static void test_run_defer_and_timer(void **state)
{
    struct sl_loop *loop = *state;
    int sv[2];
    make_pair(sv);
    struct run_ctx c = {.loop = loop};
    sl_defer_init(&c.d, on_run_defer, &c);
    struct sl_io io;
    assert_int_equal(sl_io_start(loop, &io, sv[0], EPOLLIN, on_run_io, &c), 0);
    assert_int_equal(write(sv[1], "z", 1), 1);
    struct sl_timer wd;
    uint64_t turns = loop->turns;
    run_bounded(loop, &wd);
    assert_int_equal(c.defer_calls, 1);
    assert_int_equal(c.turn_at_defer, turns); /* same turn, before the turn count moved */
    assert_int_equal(loop->turns, turns + 1);
    sl_io_stop(loop, &io);

    /* A short timer wakes an otherwise idle loop, after its deadline. */
    loop->now_ms = sl_clock_now_ms();
    sl_timer_init(&c.t, on_run_timer, &c);
    sl_timer_arm(loop, &c.t, 2);
    uint64_t deadline = c.t.deadline_ms;
    run_bounded(loop, &wd);
    assert_int_equal(c.timer_calls, 1);
    assert_true(c.timer_now >= deadline);
    close(sv[0]);
    close(sv[1]);
}

struct wake_ctx {
    int calls;
    void *data_seen;
};

static void on_wake_cb(struct sl_loop *loop, void *data)
{
    struct wake_ctx *w = data;
    w->calls++;
    w->data_seen = data;
    sl_loop_stop(loop);
}

static void *wake_thread(void *arg)
{
    sl_loop_wake(arg);
    return NULL;
}

static void test_wake_from_thread(void **state)
{
    struct sl_loop *loop = *state;
    struct wake_ctx w = {0};
    loop->on_wake = on_wake_cb;
    loop->wake_data = &w;
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, wake_thread, loop), 0);
    struct sl_timer wd;
    run_bounded(loop, &wd);
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_int_equal(w.calls, 1);
    assert_ptr_equal(w.data_seen, &w);

    /* Several wakes before the loop runs coalesce into at least one on_wake, and the
     * eventfd is drained (the next run does not see a stale wake). */
    pthread_t ths[4];
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&ths[i], NULL, wake_thread, loop), 0);
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_join(ths[i], NULL), 0);
    w.calls = 0;
    run_bounded(loop, &wd);
    assert_int_equal(w.calls, 1);
    uint64_t v;
    assert_int_equal(read(loop->wake_fd, &v, sizeof v), -1);
    assert_int_equal(errno, EAGAIN);
    loop->on_wake = NULL;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_timer_order_random, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_timer_order_many_equal_deadlines, loop_setup,
                                        loop_teardown),
        cmocka_unit_test_setup_teardown(test_timer_10000, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_timer_not_fired_before_due, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_timer_zero_delay, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_timer_rearm, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_timer_random_ops_model, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_timer_cancel, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_timer_cancel_from_callback, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_timer_arm_from_callback, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_next_timeout, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_defer_order_once, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_defer_cancel, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_defer_queued_from_callback, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_io_read_and_stop, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_io_modify, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_io_stop_unregisters, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_io_start_bad_fd, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_run_defer_and_timer, loop_setup, loop_teardown),
        cmocka_unit_test_setup_teardown(test_wake_from_thread, loop_setup, loop_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
