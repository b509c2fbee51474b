#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/fetch.h"
#include "http/fetch_internal.h"

/*
 * What a control-plane server (an identity provider, a log collector, a metadata endpoint)
 * sends back to sl_fetch: status line, interim answers, head, framing, body caps. The same
 * bytes are parsed whole and in reads of a fuzzed size; the verdicts must agree.
 * data[0] bit 0: the request was HEAD; bits 1-2 pick max_body_bytes; data[1]: the read size.
 */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int cond, const char *what)
{
    if (!cond) {
        fprintf(stderr, "invariant failed: %s\n", what);
        abort();
    }
}

static void on_header(void *data, const char *name, size_t name_len, const char *value,
                      size_t value_len)
{
    size_t *count = data;
    (*count)++;
    check(name_len > 0, "header name non-empty");
    check(!memchr(name, ':', name_len) && !memchr(name, '\n', name_len), "header name clean");
    check(!memchr(value, '\n', value_len) && !memchr(value, '\r', value_len), "value clean");
    check(value_len == 0 || (value[0] != ' ' && value[value_len - 1] != ' '), "value trimmed");
}

struct outcome {
    int rc;
    struct sl_fetch_resp resp;
    size_t headers;
};

static void run(const char *in, size_t len, size_t piece, bool head, size_t max, struct outcome *o)
{
    o->headers = 0;
    struct sl_fetch_req rq = {.method = head ? "HEAD" : "GET",
                              .max_body_bytes = max,
                              .on_header = on_header,
                              .header_data = &o->headers};
    char err[256] = "";
    o->rc = sl__fetch_parse_response(in, len, piece, &rq, &o->resp, err, sizeof err);
    check(o->rc == 0 || o->rc == -EPROTO || o->rc == -EFBIG || o->rc == -E2BIG, "error kinds");
    if (o->rc != 0) {
        check(err[0] != '\0', "error explained");
        check(o->resp.body == NULL, "nothing to dispose on error");
        return;
    }
    const struct sl_fetch_resp *r = &o->resp;
    check(r->status == 101 || (r->status >= 200 && r->status <= 599), "final status");
    check(r->body != NULL && r->body[r->body_len] == '\0', "body terminated");
    check(r->body_len <= max, "body capped");
    check(!r->body_truncated || r->status < 200 || r->status > 299, "2xx never cut");
    check(!r->body_truncated || r->body_len == max, "cut at the cap");
    if (head || r->status == 204 || r->status == 304 || r->status == 101)
        check(r->body_len == 0, "bodiless");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    static const size_t maxes[] = {16, 256, 4096, 1 << 20};
    bool head = data[0] & 1;
    size_t max = maxes[(data[0] >> 1) & 3];
    size_t piece = data[1];
    const char *in = (const char *)data + 2;
    size -= 2;

    struct outcome whole, split;
    run(in, size, 0, head, max, &whole);
    run(in, size, piece ? piece : 1, head, max, &split);
    check(whole.rc == split.rc, "same verdict");
    if (whole.rc == 0) {
        check(whole.resp.status == split.resp.status, "same status");
        check(whole.resp.body_len == split.resp.body_len &&
                  memcmp(whole.resp.body, split.resp.body, whole.resp.body_len) == 0,
              "same body");
        check(whole.resp.body_truncated == split.resp.body_truncated, "same cut");
        check(whole.headers == split.headers, "same headers");
    }
    sl_fetch_resp_dispose(&whole.resp);
    sl_fetch_resp_dispose(&split.resp);
    return 0;
}
