#ifndef SL_TESTS_LOOP_WAIT_H
#define SL_TESTS_LOOP_WAIT_H

/* Polling a condition on a real event loop, for unit tests that drive sockets: no sleeps, a
 * deadline on every wait. Header-only so each test binary gets its own copy. */

#include <stdbool.h>
#include <stdint.h>

#include "core/loop.h"

struct waiter {
    struct sl_loop *loop;
    bool (*pred)(void *);
    void *arg;
    struct sl_timer tick, deadline;
};

static void on_wait_tick(struct sl_timer *t)
{
    struct waiter *w = t->data;
    if (w->pred && w->pred(w->arg))
        sl_loop_stop(w->loop);
    else
        sl_timer_arm(w->loop, &w->tick, 1);
}

static void on_wait_deadline(struct sl_timer *t)
{
    struct waiter *w = t->data;
    sl_loop_stop(w->loop);
}

/* Runs the loop until pred(arg) holds (checked every millisecond) or max_ms passed; NULL pred
 * just runs the loop for max_ms. Returns whether pred holds at the end. */
static inline bool run_until(struct sl_loop *loop, bool (*pred)(void *), void *arg, uint64_t max_ms)
{
    loop->now_ms = sl_clock_now_ms();
    if (pred && pred(arg))
        return true;
    struct waiter w = {.loop = loop, .pred = pred, .arg = arg};
    sl_timer_init(&w.tick, on_wait_tick, &w);
    sl_timer_init(&w.deadline, on_wait_deadline, &w);
    sl_timer_arm(loop, &w.tick, 1);
    sl_timer_arm(loop, &w.deadline, max_ms);
    sl_loop_run(loop);
    sl_timer_cancel(loop, &w.tick);
    sl_timer_cancel(loop, &w.deadline);
    loop->now_ms = sl_clock_now_ms();
    return pred ? pred(arg) : true;
}

#endif
