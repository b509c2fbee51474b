#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "http/request.h"

#include "filters/filter.h"

static void run_from(struct sl_filter_run *run)
{
    while (run->pos < run->chain->count) {
        const struct sl_filter_instance *f = &run->chain->items[run->pos];
        run->in_call = true;
        run->early = -1;
        enum sl_filter_verdict v = f->ops->on_request(run, run->req, f->state);
        run->in_call = false;
        if (v == SL_FILTER_PAUSE) {
            /* Async work that completed at once resumed from inside on_request: carry on
             * here instead of recursing. */
            if (run->early < 0) {
                run->paused = true;
                return;
            }
            v = (enum sl_filter_verdict)run->early;
        }
        if (v == SL_FILTER_RESPOND) {
            run->done(run, SL_FILTER_RESPOND);
            return;
        }
        run->pos++;
    }
    run->done(run, SL_FILTER_CONTINUE);
}

void sl_filter_run_start(struct sl_filter_run *run, const struct sl_filter_chain *chain,
                         void *const *wstates, struct sl_request *req, sl_filter_done_cb done,
                         void *data)
{
    static const struct sl_filter_chain empty = {NULL, 0};
    run->chain = chain ? chain : &empty;
    run->wstates = wstates;
    run->extra_headers = NULL;
    run->extra_len = 0;
    run->req = req;
    run->pos = 0;
    run->paused = false;
    run->in_call = false;
    run->early = -1;
    run->done = done;
    run->data = data;
    run->status = 0;
    run->content_type = NULL;
    run->body = NULL;
    run->body_len = 0;
    run->error = NULL;
    run_from(run);
}

void sl_filter_resume(struct sl_filter_run *run, enum sl_filter_verdict verdict)
{
    if (run->in_call) {
        run->early = (int)verdict;
        return;
    }
    if (!run->paused)
        return;
    run->paused = false;
    if (verdict == SL_FILTER_RESPOND) {
        run->done(run, SL_FILTER_RESPOND);
        return;
    }
    run->pos++;
    run_from(run);
}

void sl_filter_run_cancel(struct sl_filter_run *run)
{
    if (!run->paused || run->pos >= run->chain->count)
        return;
    run->paused = false;
    const struct sl_filter_instance *f = &run->chain->items[run->pos];
    if (f->ops->on_cancel)
        f->ops->on_cancel(run, f->state);
}

enum sl_filter_verdict sl_filter_respond(struct sl_filter_run *run, int status,
                                         const char *content_type, const char *body,
                                         size_t body_len, const char *error)
{
    run->status = status;
    run->content_type = content_type;
    run->body = body;
    run->body_len = body_len;
    run->error = error;
    return SL_FILTER_RESPOND;
}

enum sl_filter_verdict sl_filter_reject(struct sl_filter_run *run, struct sl_request *req,
                                        int status, const char *error)
{
    size_t cap = 64 + strlen(error) + req->request_id.len;
    char *body = sl_arena_alloc(&req->arena, cap);
    int n = body ? snprintf(body, cap, "{\"status\":%d,\"error\":\"%s\",\"request_id\":\"%.*s\"}\n",
                            status, error, (int)req->request_id.len, req->request_id.ptr)
                 : -1;
    if (n < 0 || (size_t)n >= cap) {
        body = "{\"error\":\"denied\"}\n";
        n = (int)strlen(body);
    }
    return sl_filter_respond(run, status, "application/json", body, (size_t)n, error);
}
