#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <poll.h>
#include <stdatomic.h>
#include <unistd.h>

#include "config/config.h"
#include "core/loop.h"
#include "obs/notice.h"

#include "stub_http.h"

#define WAIT_MS 10000u
#define TOKEN "AQAEAExampleToken_0123456789=="

/* ---- a metadata service ---------------------------------------------------------------------- */

enum mode {
    MODE_SPOT,   /* 404 `not_found` times, then 200 with the notice */
    MODE_IMDSV2, /* as SPOT, but GETs without the session token get 401 */
    MODE_500,    /* always 500 */
    MODE_LONG,   /* 200 at once, with `long_answer` (a body past what the poller keeps) */
};

struct imds {
    struct stub_http http;
    enum mode mode;
    int not_found;
    const char *long_answer;
    atomic_int gets;       /* every GET */
    atomic_int token_puts; /* PUT /latest/api/token with a TTL header */
    atomic_int gets_with_token;
};

static const char *answer(struct imds *m, const char *req)
{
    if (strncmp(req, "PUT /latest/api/token HTTP/1.1\r\n", 32) == 0) {
        if (!strstr(req, "\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n"))
            return "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
        atomic_fetch_add(&m->token_puts, 1);
        return "HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n" TOKEN;
    }
    if (strncmp(req, "GET /latest/meta-data/spot/instance-action HTTP/1.1\r\n", 53) != 0)
        return "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
    int n = atomic_fetch_add(&m->gets, 1);
    if (m->mode == MODE_500)
        return "HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n";
    if (m->mode == MODE_LONG)
        return m->long_answer;
    if (m->mode == MODE_IMDSV2) {
        if (!strstr(req, "\r\nX-aws-ec2-metadata-token: " TOKEN "\r\n"))
            return "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
        n = atomic_fetch_add(&m->gets_with_token, 1);
    }
    if (n < m->not_found)
        return "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 9\r\n\r\n"
               "not found";
    return "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 52\r\n\r\n"
           "{\"action\":\"terminate\",\"time\":\"2026-11-28T20:00:00Z\"}";
}

static void on_conn(struct stub_http *h, int fd)
{
    struct stub_http_req rq;
    if (stub_http_read(fd, true, &rq)) {
        const char *a = answer(h->data, rq.buf);
        stub_http_write_all(fd, a, strlen(a));
    }
    free(rq.buf);
    close(fd);
}

static struct imds *imds_start(enum mode mode, int not_found)
{
    struct imds *m = calloc(1, sizeof *m);
    assert_non_null(m);
    m->mode = mode;
    m->not_found = not_found;
    stub_http_start(&m->http, on_conn, m);
    return m;
}

static void imds_stop(struct imds *m)
{
    stub_http_stop(&m->http);
    free(m);
}

/* ---- the callback -------------------------------------------------------------------------- */

struct seen {
    atomic_int calls;
    char what[256];
};

static void on_notice(void *data, const char *what)
{
    struct seen *s = data;
    snprintf(s->what, sizeof s->what, "%s", what);
    atomic_fetch_add(&s->calls, 1);
}

static bool wait_calls(struct seen *s, int n)
{
    uint64_t deadline = sl_clock_now_ms() + WAIT_MS;
    while (atomic_load(&s->calls) < n) {
        if (sl_clock_now_ms() > deadline)
            return false;
        poll(NULL, 0, 5);
    }
    return true;
}

/* One test's metadata service, the poller's configuration and what its callback saw. */
struct rig {
    struct imds *m;
    char url[160];
    struct sl_drain_conf conf;
    struct seen seen;
};

/* Starts a metadata service (`mode`, `not_found`) and points a 100 ms poll at it. */
static void rig_open(struct rig *g, enum mode mode, int not_found)
{
    memset(g, 0, sizeof *g);
    g->m = imds_start(mode, not_found);
    stub_http_url(&g->m->http, "/latest/meta-data/spot/instance-action", g->url, sizeof g->url);
    g->conf.notice_url = g->url;
    g->conf.notice_interval_ms = 100;
}

/* Starts a poller with the rig's configuration, reporting into g->seen. */
static struct sl_notice *rig_poll(struct rig *g)
{
    char err[256] = "";
    struct sl_notice *n = sl_notice_start(&g->conf, on_notice, &g->seen, err, sizeof err);
    if (!n)
        fail_msg("sl_notice_start: %s", err);
    return n;
}

/* ---- tests --------------------------------------------------------------------------------- */

/* 404, 404, then 200: the callback runs once with the body, and polling stops there. */
static void test_notice_after_two_404(void **state)
{
    (void)state;
    struct rig g;
    rig_open(&g, MODE_SPOT, 2);
    struct sl_notice *n = rig_poll(&g);
    assert_true(wait_calls(&g.seen, 1));
    assert_string_equal(g.seen.what,
                        "{\"action\":\"terminate\",\"time\":\"2026-11-28T20:00:00Z\"}");
    sl_notice_stop(n); /* joins: nothing can poll or call back after this */
    assert_int_equal(atomic_load(&g.seen.calls), 1);
    assert_int_equal(atomic_load(&g.m->gets), 3);
    assert_int_equal(atomic_load(&g.m->token_puts), 0); /* IMDSv1 answers: no token asked */
    imds_stop(g.m);
}

/* A 200 whose body is longer than the poller keeps (4 KiB) is still a notice, reported with
 * the start of the body. */
static void test_long_notice(void **state)
{
    (void)state;
    enum { BODY = 10000 };
    static const char json[] = "{\"action\":\"stop\",\"time\":\"2026-11-28T20:00:00Z\"}";
    char *a = malloc(BODY + 128);
    assert_non_null(a);
    int n = snprintf(a, 128, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", BODY, json);
    memset(a + n, ' ', BODY - (sizeof json - 1));
    a[n + BODY - (sizeof json - 1)] = '\0';
    struct rig g;
    rig_open(&g, MODE_LONG, 0);
    g.m->long_answer = a;
    struct sl_notice *nt = rig_poll(&g);
    assert_true(wait_calls(&g.seen, 1));
    sl_notice_stop(nt);
    assert_int_equal(atomic_load(&g.seen.calls), 1);
    assert_int_equal(atomic_load(&g.m->gets), 1);
    assert_true(strncmp(g.seen.what, json, sizeof json - 1) == 0);
    imds_stop(g.m);
    free(a);
}

/* An instance that requires IMDSv2 tokens: one token, then every GET carries it. */
static void test_imdsv2_token(void **state)
{
    (void)state;
    struct rig g;
    rig_open(&g, MODE_IMDSV2, 2);
    struct sl_notice *n = rig_poll(&g);
    assert_true(wait_calls(&g.seen, 1));
    sl_notice_stop(n);
    assert_int_equal(atomic_load(&g.seen.calls), 1);
    assert_int_equal(atomic_load(&g.m->token_puts), 1);
    assert_int_equal(atomic_load(&g.m->gets_with_token), 3);
    assert_int_equal(atomic_load(&g.m->gets), 4); /* the first, refused, plus three */
    imds_stop(g.m);
}

/* Errors are "no notice"; stop is prompt even with a long interval. */
static void test_errors_are_no_notice(void **state)
{
    (void)state;
    struct rig g;
    rig_open(&g, MODE_500, 0);
    struct sl_notice *n = rig_poll(&g);
    uint64_t deadline = sl_clock_now_ms() + WAIT_MS;
    while (atomic_load(&g.m->gets) < 3 && sl_clock_now_ms() < deadline)
        poll(NULL, 0, 5);
    assert_true(atomic_load(&g.m->gets) >= 3);
    sl_notice_stop(n);
    assert_int_equal(atomic_load(&g.seen.calls), 0);

    /* an hour between polls: stop does not wait for the next one */
    g.conf.notice_interval_ms = 3600000;
    int before = atomic_load(&g.m->gets);
    n = rig_poll(&g);
    deadline = sl_clock_now_ms() + WAIT_MS;
    while (atomic_load(&g.m->gets) <= before && sl_clock_now_ms() < deadline)
        poll(NULL, 0, 5);
    uint64_t t0 = sl_clock_now_ms();
    sl_notice_stop(n);
    assert_true(sl_clock_now_ms() - t0 < 1000);
    assert_int_equal(atomic_load(&g.seen.calls), 0);
    imds_stop(g.m);
}

static void test_bad_config(void **state)
{
    (void)state;
    struct sl_drain_conf conf = {0};
    char err[256] = "";
    struct seen seen = {0};
    assert_null(sl_notice_start(&conf, on_notice, &seen, err, sizeof err));
    assert_true(err[0] != '\0');
    conf.notice_url = "http://169.254.169.254/x#frag";
    err[0] = '\0';
    assert_null(sl_notice_start(&conf, on_notice, &seen, err, sizeof err));
    assert_non_null(strstr(err, "fragment"));
    sl_notice_stop(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_notice_after_two_404), cmocka_unit_test(test_long_notice),
        cmocka_unit_test(test_imdsv2_token),         cmocka_unit_test(test_errors_are_no_notice),
        cmocka_unit_test(test_bad_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
