#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <unistd.h>

#include "config/config.h"
#include "core/loop.h"
#include "obs/notice.h"

#define WAIT_MS 10000u
#define TOKEN "AQAEAExampleToken_0123456789=="

/* ---- a metadata service ---------------------------------------------------------------------- */

enum mode {
    MODE_SPOT,   /* 404 `not_found` times, then 200 with the notice */
    MODE_IMDSV2, /* as SPOT, but GETs without the session token get 401 */
    MODE_500,    /* always 500 */
};

struct imds {
    int lfd;
    uint16_t port;
    pthread_t thread;
    atomic_bool stop;
    enum mode mode;
    int not_found;
    atomic_int gets;       /* every GET */
    atomic_int token_puts; /* PUT /latest/api/token with a TTL header */
    atomic_int gets_with_token;
};

static void send_all(int fd, const char *p)
{
    size_t n = strlen(p);
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

static bool read_head(int fd, char *buf, size_t cap)
{
    size_t len = 0;
    uint64_t deadline = sl_clock_now_ms() + 5000;
    while (len + 1 < cap) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 50) <= 0) {
            if (sl_clock_now_ms() > deadline)
                return false;
            continue;
        }
        ssize_t r = recv(fd, buf + len, cap - 1 - len, 0);
        if (r <= 0)
            return false;
        len += (size_t)r;
        buf[len] = '\0';
        if (strstr(buf, "\r\n\r\n"))
            return true;
    }
    return false;
}

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

static void *imds_main(void *arg)
{
    struct imds *m = arg;
    while (!atomic_load(&m->stop)) {
        struct pollfd p = {.fd = m->lfd, .events = POLLIN};
        if (poll(&p, 1, 20) <= 0)
            continue;
        int fd = accept(m->lfd, NULL, NULL);
        if (fd < 0)
            continue;
        char req[4096];
        if (read_head(fd, req, sizeof req))
            send_all(fd, answer(m, req));
        close(fd);
    }
    return NULL;
}

static struct imds *imds_start(enum mode mode, int not_found)
{
    struct imds *m = calloc(1, sizeof *m);
    assert_non_null(m);
    m->mode = mode;
    m->not_found = not_found;
    m->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(m->lfd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(m->lfd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(m->lfd, 16), 0);
    socklen_t al = sizeof a;
    assert_int_equal(getsockname(m->lfd, (struct sockaddr *)&a, &al), 0);
    m->port = ntohs(a.sin_port);
    assert_int_equal(pthread_create(&m->thread, NULL, imds_main, m), 0);
    return m;
}

static void imds_stop(struct imds *m)
{
    atomic_store(&m->stop, true);
    pthread_join(m->thread, NULL);
    close(m->lfd);
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

static void conf_for(struct sl_drain_conf *c, char *url, size_t cap, uint16_t port,
                     uint64_t interval_ms)
{
    snprintf(url, cap, "http://127.0.0.1:%u/latest/meta-data/spot/instance-action", (unsigned)port);
    memset(c, 0, sizeof *c);
    c->notice_url = url;
    c->notice_interval_ms = interval_ms;
}

/* ---- tests --------------------------------------------------------------------------------- */

/* 404, 404, then 200: the callback runs once with the body, and polling stops there. */
static void test_notice_after_two_404(void **state)
{
    (void)state;
    struct imds *m = imds_start(MODE_SPOT, 2);
    struct sl_drain_conf conf;
    char url[160], err[256] = "";
    conf_for(&conf, url, sizeof url, m->port, 100);
    struct seen seen = {0};
    struct sl_notice *n = sl_notice_start(&conf, on_notice, &seen, err, sizeof err);
    assert_non_null(n);
    assert_true(wait_calls(&seen, 1));
    assert_string_equal(seen.what, "{\"action\":\"terminate\",\"time\":\"2026-11-28T20:00:00Z\"}");
    sl_notice_stop(n); /* joins: nothing can poll or call back after this */
    assert_int_equal(atomic_load(&seen.calls), 1);
    assert_int_equal(atomic_load(&m->gets), 3);
    assert_int_equal(atomic_load(&m->token_puts), 0); /* IMDSv1 answers: no token asked */
    imds_stop(m);
}

/* An instance that requires IMDSv2 tokens: one token, then every GET carries it. */
static void test_imdsv2_token(void **state)
{
    (void)state;
    struct imds *m = imds_start(MODE_IMDSV2, 2);
    struct sl_drain_conf conf;
    char url[160], err[256] = "";
    conf_for(&conf, url, sizeof url, m->port, 100);
    struct seen seen = {0};
    struct sl_notice *n = sl_notice_start(&conf, on_notice, &seen, err, sizeof err);
    assert_non_null(n);
    assert_true(wait_calls(&seen, 1));
    sl_notice_stop(n);
    assert_int_equal(atomic_load(&seen.calls), 1);
    assert_int_equal(atomic_load(&m->token_puts), 1);
    assert_int_equal(atomic_load(&m->gets_with_token), 3);
    assert_int_equal(atomic_load(&m->gets), 4); /* the first, refused, plus three */
    imds_stop(m);
}

/* Errors are "no notice"; stop is prompt even with a long interval. */
static void test_errors_are_no_notice(void **state)
{
    (void)state;
    struct imds *m = imds_start(MODE_500, 0);
    struct sl_drain_conf conf;
    char url[160], err[256] = "";
    conf_for(&conf, url, sizeof url, m->port, 100);
    struct seen seen = {0};
    struct sl_notice *n = sl_notice_start(&conf, on_notice, &seen, err, sizeof err);
    assert_non_null(n);
    uint64_t deadline = sl_clock_now_ms() + WAIT_MS;
    while (atomic_load(&m->gets) < 3 && sl_clock_now_ms() < deadline)
        poll(NULL, 0, 5);
    assert_true(atomic_load(&m->gets) >= 3);
    sl_notice_stop(n);
    assert_int_equal(atomic_load(&seen.calls), 0);

    /* an hour between polls: stop does not wait for the next one */
    conf.notice_interval_ms = 3600000;
    int before = atomic_load(&m->gets);
    n = sl_notice_start(&conf, on_notice, &seen, err, sizeof err);
    assert_non_null(n);
    deadline = sl_clock_now_ms() + WAIT_MS;
    while (atomic_load(&m->gets) <= before && sl_clock_now_ms() < deadline)
        poll(NULL, 0, 5);
    uint64_t t0 = sl_clock_now_ms();
    sl_notice_stop(n);
    assert_true(sl_clock_now_ms() - t0 < 1000);
    assert_int_equal(atomic_load(&seen.calls), 0);
    imds_stop(m);
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
        cmocka_unit_test(test_notice_after_two_404),
        cmocka_unit_test(test_imdsv2_token),
        cmocka_unit_test(test_errors_are_no_notice),
        cmocka_unit_test(test_bad_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
