#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "filters/filter.h"

/*
 * Scripted filters: each instance's state says which verdict to return and records the order
 * of calls in a shared log. The request pointer is a dummy; these filters never touch it.
 */
struct trace {
    int calls[16]; /* filter ids in call order */
    int ncalls;
    int done_count;
    enum sl_filter_verdict done_verdict;
    struct sl_filter_run *done_run;
    size_t pos_at_done;
};

struct script {
    struct trace *trace;
    int id;
    enum sl_filter_verdict verdict;
    int status; /* with RESPOND */
    struct sl_request *seen_req;
    struct sl_filter_run *seen_run;
};

static enum sl_filter_verdict on_request(struct sl_filter_run *run, struct sl_request *req,
                                         void *state)
{
    struct script *s = state;
    s->seen_req = req;
    s->seen_run = run;
    if (s->trace->ncalls < 16)
        s->trace->calls[s->trace->ncalls] = s->id;
    s->trace->ncalls++;
    if (s->verdict == SL_FILTER_RESPOND)
        return sl_filter_respond(run, s->status, "text/plain", "denied", 6, "scripted_deny");
    return s->verdict;
}

static const struct sl_filter_ops script_ops = {
    .name = "script",
    .on_request = on_request,
};

static void on_done(struct sl_filter_run *run, enum sl_filter_verdict verdict)
{
    struct trace *t = run->data;
    t->done_count++;
    t->done_verdict = verdict;
    t->done_run = run;
    t->pos_at_done = run->pos;
}

/* A dummy request: never dereferenced. */
static char dummy_req_storage;
#define DUMMY_REQ ((struct sl_request *)(void *)&dummy_req_storage)

struct fixture {
    struct trace trace;
    struct script scripts[4];
    struct sl_filter_instance items[4];
    struct sl_filter_chain chain;
    struct sl_filter_run run;
};

static void fixture_init(struct fixture *f, size_t n, const enum sl_filter_verdict *verdicts)
{
    memset(f, 0, sizeof *f);
    for (size_t i = 0; i < n; i++) {
        f->scripts[i] = (struct script){
            .trace = &f->trace, .id = (int)i, .verdict = verdicts[i], .status = 401 + (int)i};
        f->items[i] = (struct sl_filter_instance){.ops = &script_ops, .state = &f->scripts[i]};
    }
    f->chain = (struct sl_filter_chain){.items = f->items, .count = n};
}

static void test_empty_chain(void **state)
{
    (void)state;
    struct fixture f;
    fixture_init(&f, 0, NULL);
    sl_filter_run_start(&f.run, &f.chain, NULL, DUMMY_REQ, on_done, &f.trace);
    /* Synchronously, exactly once. */
    assert_int_equal(f.trace.done_count, 1);
    assert_int_equal(f.trace.done_verdict, SL_FILTER_CONTINUE);
    assert_ptr_equal(f.trace.done_run, &f.run);
    assert_false(f.run.paused);
    assert_int_equal(f.run.status, 0);

    /* A NULL chain behaves as an empty one. */
    struct trace t2 = {0};
    struct sl_filter_run run2;
    sl_filter_run_start(&run2, NULL, NULL, DUMMY_REQ, on_done, &t2);
    assert_int_equal(t2.done_count, 1);
    assert_int_equal(t2.done_verdict, SL_FILTER_CONTINUE);
}

static void test_all_continue(void **state)
{
    (void)state;
    const enum sl_filter_verdict v[] = {SL_FILTER_CONTINUE, SL_FILTER_CONTINUE, SL_FILTER_CONTINUE};
    struct fixture f;
    fixture_init(&f, 3, v);
    sl_filter_run_start(&f.run, &f.chain, NULL, DUMMY_REQ, on_done, &f.trace);
    assert_int_equal(f.trace.ncalls, 3);
    assert_int_equal(f.trace.calls[0], 0);
    assert_int_equal(f.trace.calls[1], 1);
    assert_int_equal(f.trace.calls[2], 2);
    assert_int_equal(f.trace.done_count, 1);
    assert_int_equal(f.trace.done_verdict, SL_FILTER_CONTINUE);
    /* Each filter saw the request and the run. */
    for (int i = 0; i < 3; i++) {
        assert_ptr_equal(f.scripts[i].seen_req, DUMMY_REQ);
        assert_ptr_equal(f.scripts[i].seen_run, &f.run);
    }
    assert_ptr_equal(f.run.req, DUMMY_REQ);
    assert_ptr_equal(f.run.data, &f.trace);
    /* No response set by anyone. */
    assert_int_equal(f.run.status, 0);
    assert_null(f.run.body);
    assert_null(f.run.error);
}

static void test_respond_stops_chain(void **state)
{
    (void)state;
    const enum sl_filter_verdict v[] = {SL_FILTER_CONTINUE, SL_FILTER_RESPOND, SL_FILTER_CONTINUE};
    struct fixture f;
    fixture_init(&f, 3, v);
    sl_filter_run_start(&f.run, &f.chain, NULL, DUMMY_REQ, on_done, &f.trace);
    assert_int_equal(f.trace.ncalls, 2); /* the third filter never ran */
    assert_int_equal(f.trace.calls[0], 0);
    assert_int_equal(f.trace.calls[1], 1);
    assert_int_equal(f.trace.done_count, 1);
    assert_int_equal(f.trace.done_verdict, SL_FILTER_RESPOND);
    assert_int_equal(f.run.status, 402);
    assert_string_equal(f.run.content_type, "text/plain");
    assert_int_equal(f.run.body_len, 6);
    assert_memory_equal(f.run.body, "denied", 6);
    assert_string_equal(f.run.error, "scripted_deny");
}

static void test_respond_helper(void **state)
{
    (void)state;
    struct sl_filter_run run;
    memset(&run, 0, sizeof run);
    static const char body[] = "{\"error\":\"rate\"}";
    enum sl_filter_verdict v =
        sl_filter_respond(&run, 429, "application/json", body, sizeof body - 1, "rate_limited");
    assert_int_equal(v, SL_FILTER_RESPOND);
    assert_int_equal(run.status, 429);
    assert_ptr_equal(run.body, body); /* kept, not copied: the caller owns the lifetime */
    assert_int_equal(run.body_len, sizeof body - 1);
    assert_string_equal(run.content_type, "application/json");
    assert_string_equal(run.error, "rate_limited");
}

static void test_pause_then_continue(void **state)
{
    (void)state;
    const enum sl_filter_verdict v[] = {SL_FILTER_CONTINUE, SL_FILTER_PAUSE, SL_FILTER_CONTINUE};
    struct fixture f;
    fixture_init(&f, 3, v);
    sl_filter_run_start(&f.run, &f.chain, NULL, DUMMY_REQ, on_done, &f.trace);
    /* Paused at filter 1: done not called, filter 2 not called yet. */
    assert_int_equal(f.trace.ncalls, 2);
    assert_int_equal(f.trace.done_count, 0);
    assert_true(f.run.paused);

    sl_filter_resume(&f.run, SL_FILTER_CONTINUE);
    /* The next filter runs (the paused one is not called again), then done once. */
    assert_int_equal(f.trace.ncalls, 3);
    assert_int_equal(f.trace.calls[2], 2);
    assert_int_equal(f.trace.done_count, 1);
    assert_int_equal(f.trace.done_verdict, SL_FILTER_CONTINUE);
    assert_false(f.run.paused);

    /* A stray resume after completion is a no-op. */
    sl_filter_resume(&f.run, SL_FILTER_CONTINUE);
    sl_filter_resume(&f.run, SL_FILTER_RESPOND);
    assert_int_equal(f.trace.ncalls, 3);
    assert_int_equal(f.trace.done_count, 1);
}

static void test_pause_last_filter(void **state)
{
    (void)state;
    const enum sl_filter_verdict v[] = {SL_FILTER_PAUSE};
    struct fixture f;
    fixture_init(&f, 1, v);
    sl_filter_run_start(&f.run, &f.chain, NULL, DUMMY_REQ, on_done, &f.trace);
    assert_int_equal(f.trace.done_count, 0);
    sl_filter_resume(&f.run, SL_FILTER_CONTINUE);
    assert_int_equal(f.trace.ncalls, 1);
    assert_int_equal(f.trace.done_count, 1);
    assert_int_equal(f.trace.done_verdict, SL_FILTER_CONTINUE);
}

static void test_pause_twice(void **state)
{
    (void)state;
    const enum sl_filter_verdict v[] = {SL_FILTER_PAUSE, SL_FILTER_PAUSE, SL_FILTER_CONTINUE};
    struct fixture f;
    fixture_init(&f, 3, v);
    sl_filter_run_start(&f.run, &f.chain, NULL, DUMMY_REQ, on_done, &f.trace);
    assert_int_equal(f.trace.ncalls, 1);
    sl_filter_resume(&f.run, SL_FILTER_CONTINUE);
    assert_int_equal(f.trace.ncalls, 2);
    assert_true(f.run.paused);
    assert_int_equal(f.trace.done_count, 0);
    sl_filter_resume(&f.run, SL_FILTER_CONTINUE);
    assert_int_equal(f.trace.ncalls, 3);
    assert_int_equal(f.trace.calls[0], 0);
    assert_int_equal(f.trace.calls[1], 1);
    assert_int_equal(f.trace.calls[2], 2);
    assert_int_equal(f.trace.done_count, 1);
    assert_int_equal(f.trace.done_verdict, SL_FILTER_CONTINUE);
}

static void test_pause_then_respond(void **state)
{
    (void)state;
    const enum sl_filter_verdict v[] = {SL_FILTER_PAUSE, SL_FILTER_CONTINUE};
    struct fixture f;
    fixture_init(&f, 2, v);
    sl_filter_run_start(&f.run, &f.chain, NULL, DUMMY_REQ, on_done, &f.trace);
    assert_int_equal(f.trace.done_count, 0);
    /* The paused filter's async work decided to answer. */
    sl_filter_respond(&f.run, 403, "text/plain", "no", 2, "async_deny");
    sl_filter_resume(&f.run, SL_FILTER_RESPOND);
    assert_int_equal(f.trace.ncalls, 1); /* later filters not called */
    assert_int_equal(f.trace.done_count, 1);
    assert_int_equal(f.trace.done_verdict, SL_FILTER_RESPOND);
    assert_int_equal(f.run.status, 403);
    assert_memory_equal(f.run.body, "no", 2);
    assert_string_equal(f.run.error, "async_deny");
    assert_false(f.run.paused);
    /* No second done. */
    sl_filter_resume(&f.run, SL_FILTER_CONTINUE);
    assert_int_equal(f.trace.done_count, 1);
    assert_int_equal(f.trace.ncalls, 1);
}

static void test_resume_not_paused(void **state)
{
    (void)state;
    const enum sl_filter_verdict v[] = {SL_FILTER_CONTINUE, SL_FILTER_CONTINUE};
    struct fixture f;
    fixture_init(&f, 2, v);
    sl_filter_run_start(&f.run, &f.chain, NULL, DUMMY_REQ, on_done, &f.trace);
    assert_int_equal(f.trace.done_count, 1);
    size_t pos = f.run.pos;
    sl_filter_resume(&f.run, SL_FILTER_CONTINUE);
    sl_filter_resume(&f.run, SL_FILTER_RESPOND);
    assert_int_equal(f.trace.ncalls, 2);
    assert_int_equal(f.trace.done_count, 1);
    assert_int_equal(f.run.pos, pos);
}

/* A run can be started again on the same struct (state from the previous pass is reset). */
static void test_restart_resets_response(void **state)
{
    (void)state;
    const enum sl_filter_verdict v[] = {SL_FILTER_RESPOND};
    struct fixture f;
    fixture_init(&f, 1, v);
    sl_filter_run_start(&f.run, &f.chain, NULL, DUMMY_REQ, on_done, &f.trace);
    assert_int_equal(f.run.status, 401);
    f.scripts[0].verdict = SL_FILTER_CONTINUE;
    sl_filter_run_start(&f.run, &f.chain, NULL, DUMMY_REQ, on_done, &f.trace);
    assert_int_equal(f.trace.done_count, 2);
    assert_int_equal(f.trace.done_verdict, SL_FILTER_CONTINUE);
    assert_int_equal(f.run.status, 0);
    assert_null(f.run.body);
    assert_null(f.run.content_type);
    assert_null(f.run.error);
}

/* A filter whose async work completes at once resumes from inside its own on_request and then
 * returns PAUSE: the chain must go on (or answer) exactly once, without recursing. */
static enum sl_filter_verdict on_request_sync_resume(struct sl_filter_run *run,
                                                     struct sl_request *req, void *state)
{
    (void)req;
    struct script *s = state;
    if (s->trace->ncalls < 16)
        s->trace->calls[s->trace->ncalls] = s->id;
    s->trace->ncalls++;
    if (s->verdict == SL_FILTER_RESPOND)
        sl_filter_respond(run, s->status, "text/plain", "denied", 6, "sync_deny");
    sl_filter_resume(run, s->verdict);
    return SL_FILTER_PAUSE;
}

static const struct sl_filter_ops sync_resume_ops = {
    .name = "sync_resume",
    .on_request = on_request_sync_resume,
};

static void test_resume_inside_on_request(void **state)
{
    (void)state;
    const enum sl_filter_verdict v[] = {SL_FILTER_CONTINUE, SL_FILTER_CONTINUE};
    struct fixture f;
    fixture_init(&f, 2, v);
    f.items[0].ops = &sync_resume_ops;
    sl_filter_run_start(&f.run, &f.chain, NULL, DUMMY_REQ, on_done, &f.trace);
    assert_int_equal(f.trace.ncalls, 2);
    assert_int_equal(f.trace.calls[1], 1);
    assert_int_equal(f.trace.done_count, 1);
    assert_int_equal(f.trace.done_verdict, SL_FILTER_CONTINUE);
    assert_false(f.run.paused);

    const enum sl_filter_verdict r[] = {SL_FILTER_RESPOND, SL_FILTER_CONTINUE};
    fixture_init(&f, 2, r);
    f.items[0].ops = &sync_resume_ops;
    sl_filter_run_start(&f.run, &f.chain, NULL, DUMMY_REQ, on_done, &f.trace);
    assert_int_equal(f.trace.ncalls, 1); /* the second filter never ran */
    assert_int_equal(f.trace.done_count, 1);
    assert_int_equal(f.trace.done_verdict, SL_FILTER_RESPOND);
    assert_int_equal(f.run.status, 401);
}

static void test_registry(void **state)
{
    (void)state;
    assert_null(sl_filter_find("no_such_filter"));
    assert_null(sl_filter_find(""));
    size_t count = 99;
    const struct sl_filter_ops *const *reg = sl_filter_registry(&count);
    assert_non_null(reg);
    /* Every registered filter is found by its own name and has the mandatory ops. */
    for (size_t i = 0; i < count; i++) {
        assert_non_null(reg[i]);
        assert_non_null(reg[i]->name);
        assert_non_null(reg[i]->on_request);
        assert_ptr_equal(sl_filter_find(reg[i]->name), reg[i]);
        /* Names are unique. */
        for (size_t j = 0; j < i; j++)
            assert_true(strcmp(reg[i]->name, reg[j]->name) != 0);
    }
}

/* A filter that paused and whose request went away gets on_cancel, once, and no done. */
static int cancel_calls;
static struct sl_filter_run *cancel_run;

static void on_cancel_count(struct sl_filter_run *run, void *state)
{
    (void)state;
    cancel_calls++;
    cancel_run = run;
}

static const struct sl_filter_ops pausing_ops = {
    .name = "pausing",
    .on_request = on_request,
    .on_cancel = on_cancel_count,
};

static void test_cancel_paused(void **state)
{
    (void)state;
    const enum sl_filter_verdict v[] = {SL_FILTER_CONTINUE, SL_FILTER_PAUSE};
    struct fixture f;
    fixture_init(&f, 2, v);
    f.items[1].ops = &pausing_ops;
    cancel_calls = 0;
    sl_filter_run_start(&f.run, &f.chain, NULL, DUMMY_REQ, on_done, &f.trace);
    assert_true(f.run.paused);
    sl_filter_run_cancel(&f.run);
    assert_int_equal(cancel_calls, 1);
    assert_ptr_equal(cancel_run, &f.run);
    assert_false(f.run.paused);
    /* Neither a second cancel nor a late resume reaches anyone. */
    sl_filter_run_cancel(&f.run);
    sl_filter_resume(&f.run, SL_FILTER_CONTINUE);
    assert_int_equal(cancel_calls, 1);
    assert_int_equal(f.trace.done_count, 0);
}

/* A run that is not paused has nothing to cancel. */
static void test_cancel_not_paused(void **state)
{
    (void)state;
    const enum sl_filter_verdict v[] = {SL_FILTER_CONTINUE};
    struct fixture f;
    fixture_init(&f, 1, v);
    f.items[0].ops = &pausing_ops;
    cancel_calls = 0;
    sl_filter_run_start(&f.run, &f.chain, NULL, DUMMY_REQ, on_done, &f.trace);
    sl_filter_run_cancel(&f.run);
    assert_int_equal(cancel_calls, 0);
    assert_int_equal(f.trace.done_count, 1);
}

/* sl_filter_wstate gives the running filter its own worker slot. */
static void *seen_wstate[2];
static enum sl_filter_verdict on_request_wstate(struct sl_filter_run *run, struct sl_request *req,
                                                void *state)
{
    (void)req;
    seen_wstate[((struct script *)state)->id] = sl_filter_wstate(run);
    return SL_FILTER_CONTINUE;
}

static void test_worker_state_by_slot(void **state)
{
    (void)state;
    static const struct sl_filter_ops ws_ops = {.name = "ws", .on_request = on_request_wstate};
    const enum sl_filter_verdict v[] = {SL_FILTER_CONTINUE, SL_FILTER_CONTINUE};
    struct fixture f;
    fixture_init(&f, 2, v);
    int a = 1, b = 2;
    void *slots[5] = {NULL, NULL, &b, NULL, &a};
    f.items[0].ops = &ws_ops;
    f.items[0].slot = 4;
    f.items[1].ops = &ws_ops;
    f.items[1].slot = 2;
    sl_filter_run_start(&f.run, &f.chain, slots, DUMMY_REQ, on_done, &f.trace);
    assert_ptr_equal(seen_wstate[0], &a);
    assert_ptr_equal(seen_wstate[1], &b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty_chain),
        cmocka_unit_test(test_all_continue),
        cmocka_unit_test(test_respond_stops_chain),
        cmocka_unit_test(test_respond_helper),
        cmocka_unit_test(test_pause_then_continue),
        cmocka_unit_test(test_pause_last_filter),
        cmocka_unit_test(test_pause_twice),
        cmocka_unit_test(test_pause_then_respond),
        cmocka_unit_test(test_resume_not_paused),
        cmocka_unit_test(test_restart_resets_response),
        cmocka_unit_test(test_resume_inside_on_request),
        cmocka_unit_test(test_registry),
        cmocka_unit_test(test_cancel_paused),
        cmocka_unit_test(test_cancel_not_paused),
        cmocka_unit_test(test_worker_state_by_slot),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
