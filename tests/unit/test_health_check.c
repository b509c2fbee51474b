#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "config/config.h"
#include "core/loop.h"
#include "proxy/health_check.h"
#include "proxy/pool.h"

/*
 * Active health checks against real sockets: every test runs one sl_loop that carries both the
 * checker and in-test servers on 127.0.0.1 (ephemeral ports), and polls for conditions every
 * millisecond with a deadline. Intervals are tens of milliseconds, so a 1 ms poll sees every
 * attempt and every verdict before the next attempt starts.
 */

/* ---- in-test servers -------------------------------------------------------------------- */

enum srv_mode {
    SRV_TCP,      /* accept and close */
    SRV_200,      /* read the request, answer 200 */
    SRV_503,      /* answer 503 */
    SRV_GARBAGE,  /* answer something that is not HTTP */
    SRV_SILENT,   /* read the request, never answer */
    SRV_BIG_HEAD, /* 200 with a head longer than the checker's buffer */
};

struct srv;

struct sconn {
    struct srv *srv;
    struct sconn *next;
    int fd;
    struct sl_io io;
    char buf[1024];
    size_t len;
    bool answered;
};

struct srv {
    struct sl_loop *loop;
    int fd;
    struct sl_io io;
    uint16_t port;
    char address[32];
    enum srv_mode mode;
    unsigned accepts;
    unsigned open_conns;
    char first_req[512];
    size_t first_req_len;
    struct sconn *conns; /* freed at srv_close: an event for a closed one may still be due */
};

static void send_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return; /* the checker gave up; nothing to do */
        p += w;
        n -= (size_t)w;
    }
}

static void sconn_close(struct sconn *c)
{
    if (c->fd < 0)
        return;
    sl_io_stop(c->srv->loop, &c->io);
    close(c->fd);
    c->fd = -1;
    c->srv->open_conns--;
}

static void answer(struct sconn *c)
{
    static const char ok[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
    static const char unavailable[] =
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
    static const char garbage[] = "SSH-2.0-OpenSSH_9.6\r\n\r\n";
    c->answered = true;
    switch (c->srv->mode) {
    case SRV_200:
        send_all(c->fd, ok, sizeof ok - 1);
        break;
    case SRV_503:
        send_all(c->fd, unavailable, sizeof unavailable - 1);
        break;
    case SRV_GARBAGE:
        send_all(c->fd, garbage, sizeof garbage - 1);
        break;
    case SRV_BIG_HEAD: {
        static char big[8192];
        size_t n = 0;
        n += (size_t)snprintf(big, sizeof big, "HTTP/1.1 200 OK\r\nX-Padding: ");
        memset(big + n, 'a', 6000);
        n += 6000;
        memcpy(big + n, "\r\nContent-Length: 0\r\n\r\n", 23);
        n += 23;
        send_all(c->fd, big, n);
        break;
    }
    case SRV_SILENT:
        return; /* keep the connection open until the checker closes it */
    case SRV_TCP:
        break;
    }
    sconn_close(c);
}

static void on_sconn(struct sl_io *io, uint32_t events)
{
    (void)events;
    struct sconn *c = io->data;
    ssize_t n = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0 || c->len + (size_t)n == sizeof c->buf) {
        sconn_close(c);
        return;
    }
    c->len += (size_t)n;
    const char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
    if (!end || c->answered)
        return;
    struct srv *s = c->srv;
    if (!s->first_req_len) {
        size_t len = (size_t)(end + 4 - c->buf);
        if (len < sizeof s->first_req) {
            memcpy(s->first_req, c->buf, len);
            s->first_req_len = len;
        }
    }
    answer(c);
}

static void on_srv_accept(struct sl_io *io, uint32_t events)
{
    (void)events;
    struct srv *s = io->data;
    for (;;) {
        int fd = accept4(s->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        s->accepts++;
        if (s->mode == SRV_TCP) {
            close(fd);
            continue;
        }
        struct sconn *c = calloc(1, sizeof *c);
        assert_non_null(c);
        c->srv = s;
        c->fd = fd;
        c->next = s->conns;
        s->conns = c;
        s->open_conns++;
        assert_int_equal(sl_io_start(s->loop, &c->io, fd, EPOLLIN, on_sconn, c), 0);
    }
}

static struct sockaddr_in loopback(uint16_t port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static void srv_open(struct srv *s, struct sl_loop *loop, enum srv_mode mode)
{
    memset(s, 0, sizeof *s);
    s->loop = loop;
    s->mode = mode;
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    assert_true(s->fd >= 0);
    struct sockaddr_in a = loopback(0);
    assert_int_equal(bind(s->fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(s->fd, 64), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(s->fd, (struct sockaddr *)&a, &len), 0);
    s->port = ntohs(a.sin_port);
    snprintf(s->address, sizeof s->address, "127.0.0.1:%u", (unsigned)s->port);
    assert_int_equal(sl_io_start(loop, &s->io, s->fd, EPOLLIN, on_srv_accept, s), 0);
}

static void srv_close(struct srv *s)
{
    sl_io_stop(s->loop, &s->io);
    close(s->fd);
    while (s->conns) {
        struct sconn *c = s->conns;
        s->conns = c->next;
        sconn_close(c);
        free(c);
    }
}

/* A port on which nothing listens: bound once to learn a free one, then closed. */
static uint16_t refused_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = loopback(0);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* ---- polling the loop ------------------------------------------------------------------- */

typedef bool (*pred_cb)(void *arg);

struct waiter {
    struct sl_loop *loop;
    struct sl_timer tick, deadline;
    pred_cb pred;
    void *arg;
    bool met;
};

static void on_wait_tick(struct sl_timer *t)
{
    struct waiter *w = t->data;
    if (w->pred(w->arg)) {
        w->met = true;
        sl_loop_stop(w->loop);
        return;
    }
    sl_timer_arm(w->loop, &w->tick, 1);
}

static void on_wait_deadline(struct sl_timer *t)
{
    struct waiter *w = t->data;
    sl_loop_stop(w->loop);
}

/* Runs the loop until pred(arg) holds (checked every millisecond) or max_ms passed. */
static bool run_until(struct sl_loop *loop, pred_cb pred, void *arg, uint64_t max_ms)
{
    struct waiter w = {.loop = loop, .pred = pred, .arg = arg};
    if (pred(arg))
        return true;
    sl_timer_init(&w.tick, on_wait_tick, &w);
    sl_timer_init(&w.deadline, on_wait_deadline, &w);
    sl_timer_arm(loop, &w.tick, 1);
    sl_timer_arm(loop, &w.deadline, max_ms);
    sl_loop_run(loop);
    sl_timer_cancel(loop, &w.tick);
    sl_timer_cancel(loop, &w.deadline);
    return w.met;
}

static bool never(void *arg)
{
    (void)arg;
    return false;
}

/* Lets the loop run for `ms` (only where the test asserts that something does not happen). */
static void run_for(struct sl_loop *loop, uint64_t ms)
{
    run_until(loop, never, NULL, ms);
}

/* ---- capturing the log ------------------------------------------------------------------ */

struct capture {
    int saved;
    FILE *f;
    char text[8192];
};

static void capture_begin(struct capture *cap)
{
    fflush(stderr);
    cap->f = tmpfile();
    assert_non_null(cap->f);
    cap->saved = dup(STDERR_FILENO);
    assert_true(cap->saved >= 0);
    assert_true(dup2(fileno(cap->f), STDERR_FILENO) >= 0);
}

static const char *capture_end(struct capture *cap)
{
    assert_true(dup2(cap->saved, STDERR_FILENO) >= 0);
    close(cap->saved);
    rewind(cap->f);
    size_t n = fread(cap->text, 1, sizeof cap->text - 1, cap->f);
    cap->text[n] = '\0';
    fclose(cap->f);
    fputs(cap->text, stderr); /* still visible when a test fails */
    return cap->text;
}

/* ---- the upstream, its pool and the checker --------------------------------------------- */

#define MAX_EPS 8

struct fx {
    struct sl_loop loop;
    struct sl_upstream_conf up;
    struct sl_endpoint_conf eps[MAX_EPS];
    char addrs[MAX_EPS][32];
    struct sl_pool *pool;
    struct sl_health_checker *hc;
};

static void status_range(struct sl_status_set *s, int from, int to)
{
    memset(s, 0, sizeof *s);
    for (int st = from; st <= to; st++) {
        unsigned i = (unsigned)(st - 100);
        s->bits[i / 64] |= 1ull << (i % 64);
    }
}

static void fx_init(struct fx *f, const char *path, uint64_t interval_ms, uint64_t timeout_ms,
                    uint32_t healthy, uint32_t unhealthy)
{
    memset(f, 0, sizeof *f);
    assert_int_equal(sl_loop_init(&f->loop), 0);
    f->up.name = "users";
    f->up.endpoints = f->eps;
    f->up.active.enabled = true;
    f->up.active.path = (char *)path;
    f->up.active.interval_ms = interval_ms;
    f->up.active.timeout_ms = timeout_ms;
    f->up.active.healthy = healthy;
    f->up.active.unhealthy = unhealthy;
    status_range(&f->up.active.statuses, 200, 399);
}

static void fx_add(struct fx *f, uint16_t port)
{
    size_t i = f->up.endpoint_count++;
    assert_true(i < MAX_EPS);
    snprintf(f->addrs[i], sizeof f->addrs[i], "127.0.0.1:%u", (unsigned)port);
    struct sockaddr_in a = loopback(port);
    f->eps[i].address = f->addrs[i];
    memcpy(&f->eps[i].addr, &a, sizeof a);
    f->eps[i].addr_len = sizeof a;
    f->eps[i].weight = 1;
}

static void fx_start(struct fx *f)
{
    f->pool = sl_pool_new(&f->up, NULL, 1, NULL, 0);
    assert_non_null(f->pool);
    f->hc = sl_health_checker_start(&f->loop, &f->pool, 1);
    assert_non_null(f->hc);
}

/* The endpoint with `address` in the current set, with a reference for the caller. */
static struct sl_endpoint *fx_ep(struct fx *f, const char *address)
{
    struct sl_endpoint_set *s = sl_pool_acquire_set(f->pool);
    assert_non_null(s);
    struct sl_endpoint *ep = NULL;
    for (size_t i = 0; i < s->count; i++)
        if (strcmp(s->eps[i]->address, address) == 0)
            ep = s->eps[i];
    assert_non_null(ep);
    sl_endpoint_ref(ep);
    sl_endpoint_set_unref(s);
    return ep;
}

static void fx_dispose(struct fx *f)
{
    sl_health_checker_stop(f->hc);
    sl_loop_run_deferred(&f->loop);
    sl_pool_free(f->pool);
    sl_loop_dispose(&f->loop);
}

static bool is_down(struct sl_endpoint *ep)
{
    return atomic_load(&ep->active_down);
}

static uint64_t attempts(struct fx *f, struct sl_endpoint *ep)
{
    return sl_health_checker_check_count(f->hc, ep, NULL);
}

/* Watches one endpoint: its attempts and when its verdict changed. */
struct watch {
    struct fx *f;
    struct sl_endpoint *ep;
    uint64_t min_attempts;
    bool want_down;
    uint64_t attempts_at_change;  /* attempts when the wanted verdict was first seen */
    uint64_t max_attempts_before; /* attempts seen while the verdict was still the old one */
};

static bool watch_verdict(void *arg)
{
    struct watch *w = arg;
    uint64_t n = attempts(w->f, w->ep);
    if (is_down(w->ep) == w->want_down) {
        w->attempts_at_change = n;
        return true;
    }
    if (n > w->max_attempts_before)
        w->max_attempts_before = n;
    return false;
}

static bool watch_attempts(void *arg)
{
    struct watch *w = arg;
    return attempts(w->f, w->ep) >= w->min_attempts;
}

/* ---- tests ------------------------------------------------------------------------------ */

static void test_tcp_up(void **state)
{
    (void)state;
    struct fx f;
    fx_init(&f, NULL, 30, 200, 2, 2);
    struct srv s;
    srv_open(&s, &f.loop, SRV_TCP);
    fx_add(&f, s.port);
    fx_start(&f);
    struct sl_endpoint *ep = fx_ep(&f, s.address);
    struct watch w = {.f = &f, .ep = ep, .min_attempts = 4};
    assert_true(run_until(&f.loop, watch_attempts, &w, 2000));
    assert_false(is_down(ep));
    assert_true(s.accepts >= 3);
    assert_int_equal(atomic_load(&f.pool->stats.active_down), 0);
    assert_int_equal(atomic_load(&f.pool->stats.active_up), 0);
    sl_endpoint_unref(ep);
    fx_dispose(&f);
    srv_close(&s);
}

static void test_refused_marks_down_after_threshold(void **state)
{
    (void)state;
    struct fx f;
    fx_init(&f, NULL, 40, 200, 2, 3);
    uint16_t port = refused_port();
    fx_add(&f, port);
    struct capture cap;
    capture_begin(&cap);
    fx_start(&f);
    struct sl_endpoint *ep = fx_ep(&f, f.addrs[0]);
    assert_false(is_down(ep)); /* endpoints start up */
    struct watch w = {.f = &f, .ep = ep, .want_down = true};
    bool down = run_until(&f.loop, watch_verdict, &w, 2000);
    /* a few more failures change nothing: transitions only */
    w.min_attempts = w.attempts_at_change + 2;
    bool more = run_until(&f.loop, watch_attempts, &w, 2000);
    const char *log = capture_end(&cap);
    assert_true(down);
    assert_true(more);
    assert_int_equal(w.attempts_at_change, 3);
    assert_true(w.max_attempts_before >= 2); /* seen still up after two failures */
    assert_true(is_down(ep));
    assert_int_equal(atomic_load(&f.pool->stats.active_down), 1);
    char want[160];
    snprintf(want, sizeof want,
             "upstream users endpoint %s: active health check failed 3 times (connect refused): "
             "marked down",
             f.addrs[0]);
    assert_non_null(strstr(log, want));
    assert_null(strstr(strstr(log, want) + strlen(want), "marked down"));
    sl_endpoint_unref(ep);
    fx_dispose(&f);
}

/* One HTTP endpoint answering in `mode`; returns whether it went down within a few intervals
 * (and fills the log and the request the server saw). */
struct http_run {
    bool down;
    uint64_t attempts_at_change;
    char log[8192];
    char req[512];
    char address[32];
    uint64_t down_count;
};

static void http_case(enum srv_mode mode, const char *host, struct http_run *out)
{
    struct fx f;
    /* the silent server needs a timeout shorter than the interval, so that each verdict is
     * seen before the next attempt starts */
    fx_init(&f, "/healthz", mode == SRV_SILENT ? 40 : 30, mode == SRV_SILENT ? 20 : 100, 2, 2);
    f.up.active.host = (char *)host;
    struct srv s;
    srv_open(&s, &f.loop, mode);
    fx_add(&f, s.port);
    struct capture cap;
    capture_begin(&cap);
    fx_start(&f);
    struct sl_endpoint *ep = fx_ep(&f, s.address);
    struct watch w = {.f = &f, .ep = ep, .want_down = true};
    /* 2 failures fit well within the deadline; 6 attempts or more tell that a healthy
     * endpoint stays up */
    out->down = run_until(&f.loop, watch_verdict, &w, 600);
    out->attempts_at_change = w.attempts_at_change;
    if (!out->down)
        assert_true(attempts(&f, ep) >= 6);
    out->down_count = atomic_load(&f.pool->stats.active_down);
    snprintf(out->log, sizeof out->log, "%s", capture_end(&cap));
    snprintf(out->req, sizeof out->req, "%.*s", (int)s.first_req_len, s.first_req);
    snprintf(out->address, sizeof out->address, "%s", s.address);
    sl_endpoint_unref(ep);
    fx_dispose(&f);
    srv_close(&s);
}

static void test_http_200_stays_up(void **state)
{
    (void)state;
    struct http_run r;
    http_case(SRV_200, NULL, &r);
    assert_false(r.down);
    assert_int_equal(r.down_count, 0);
    char want[256];
    snprintf(want, sizeof want,
             "GET /healthz HTTP/1.1\r\nHost: %s\r\nUser-Agent: sluice-health-check\r\n"
             "Connection: close\r\n\r\n",
             r.address);
    assert_string_equal(r.req, want);
}

static void test_http_host_override(void **state)
{
    (void)state;
    struct http_run r;
    http_case(SRV_200, "users.internal", &r);
    assert_false(r.down);
    assert_string_equal(r.req, "GET /healthz HTTP/1.1\r\nHost: users.internal\r\n"
                               "User-Agent: sluice-health-check\r\nConnection: close\r\n\r\n");
}

static void test_http_long_head_judged_by_status_line(void **state)
{
    (void)state;
    struct http_run r;
    http_case(SRV_BIG_HEAD, NULL, &r);
    assert_false(r.down);
}

static void test_http_503_marks_down(void **state)
{
    (void)state;
    struct http_run r;
    http_case(SRV_503, NULL, &r);
    assert_true(r.down);
    assert_int_equal(r.attempts_at_change, 2);
    assert_int_equal(r.down_count, 1);
    assert_non_null(strstr(r.log, "active health check failed 2 times (status 503): marked down"));
}

static void test_http_garbage_marks_down(void **state)
{
    (void)state;
    struct http_run r;
    http_case(SRV_GARBAGE, NULL, &r);
    assert_true(r.down);
    assert_int_equal(r.attempts_at_change, 2);
    assert_non_null(strstr(r.log, "failed 2 times (malformed response: "));
}

static void test_http_silent_times_out(void **state)
{
    (void)state;
    struct http_run r;
    http_case(SRV_SILENT, NULL, &r);
    assert_true(r.down);
    assert_int_equal(r.attempts_at_change, 2);
    assert_non_null(strstr(r.log, "failed 2 times (no response in time): marked down"));
}

static void test_recovery_after_healthy_successes(void **state)
{
    (void)state;
    struct fx f;
    fx_init(&f, "/healthz", 40, 200, 3, 2);
    struct srv s;
    srv_open(&s, &f.loop, SRV_503);
    fx_add(&f, s.port);
    struct capture cap;
    capture_begin(&cap);
    fx_start(&f);
    struct sl_endpoint *ep = fx_ep(&f, s.address);
    struct watch w = {.f = &f, .ep = ep, .want_down = true};
    bool down = run_until(&f.loop, watch_verdict, &w, 2000);
    /* The verdict is seen within a millisecond of the attempt that made it, ~40 ms before the
     * next one starts, so every attempt from here on sees the healthy server. */
    s.mode = SRV_200;
    uint64_t base = attempts(&f, ep);
    struct watch up = {.f = &f, .ep = ep, .want_down = false};
    bool recovered = run_until(&f.loop, watch_verdict, &up, 2000);
    const char *log = capture_end(&cap);
    assert_true(down);
    assert_true(recovered);
    assert_int_equal(up.attempts_at_change, base + 3);
    assert_true(up.max_attempts_before >= base + 2); /* still down after two successes */
    assert_false(is_down(ep));
    assert_int_equal(atomic_load(&f.pool->stats.active_down), 1);
    assert_int_equal(atomic_load(&f.pool->stats.active_up), 1);
    assert_non_null(strstr(log, "active health check passed 3 times: marked up"));
    sl_endpoint_unref(ep);
    fx_dispose(&f);
    srv_close(&s);
}

struct gone {
    struct fx *f;
    struct sl_endpoint *ep;
};

static bool not_checked(void *arg)
{
    struct gone *g = arg;
    return attempts(g->f, g->ep) == 0;
}

static void test_set_changes_followed(void **state)
{
    (void)state;
    struct fx f;
    fx_init(&f, NULL, 30, 200, 2, 2);
    struct srv a, b, c;
    srv_open(&a, &f.loop, SRV_TCP);
    srv_open(&b, &f.loop, SRV_TCP);
    srv_open(&c, &f.loop, SRV_TCP);
    fx_add(&f, a.port);
    fx_add(&f, b.port);
    fx_start(&f);
    struct sl_endpoint *ea = fx_ep(&f, a.address);
    struct sl_endpoint *eb = fx_ep(&f, b.address);
    struct watch wa = {.f = &f, .ep = ea, .min_attempts = 2};
    struct watch wb = {.f = &f, .ep = eb, .min_attempts = 2};
    assert_true(run_until(&f.loop, watch_attempts, &wa, 2000));
    assert_true(run_until(&f.loop, watch_attempts, &wb, 2000));

    /* b leaves the set: noticed by the version poll alone, without a call to sync */
    struct sl_endpoint_spec spec_a = {.address = a.address, .weight = 1};
    memcpy(&spec_a.addr, &f.eps[0].addr, sizeof spec_a.addr);
    spec_a.addr_len = f.eps[0].addr_len;
    assert_int_equal(sl_pool_set_source(f.pool, SL_POOL_SRC_CONFIG, &spec_a, 1), 1);
    struct gone g = {.f = &f, .ep = eb};
    assert_true(run_until(&f.loop, not_checked, &g, 2 * SL_HEALTH_SYNC_MS + 500));
    /* the check held a reference until then; now only ours is left */
    assert_int_equal(atomic_load(&eb->refs), 1);

    /* c joins through another source; sync makes the checker look at once */
    struct sl_endpoint_spec spec_c = {.address = c.address, .weight = 1};
    struct sockaddr_in ac = loopback(c.port);
    memcpy(&spec_c.addr, &ac, sizeof ac);
    spec_c.addr_len = sizeof ac;
    assert_int_equal(sl_pool_set_source(f.pool, SL_POOL_SRC_ADMIN, &spec_c, 1), 1);
    sl_health_checker_sync(f.hc);
    struct sl_endpoint *ec = fx_ep(&f, c.address);
    assert_int_equal(attempts(&f, ec), 0);
    struct watch wc = {.f = &f, .ep = ec, .min_attempts = 2};
    assert_true(run_until(&f.loop, watch_attempts, &wc, 2000));

    /* a stays checked with its counters kept; b gets no more connections */
    unsigned b_accepts = b.accepts;
    uint64_t a_before = attempts(&f, ea);
    run_for(&f.loop, 5 * 30);
    assert_int_equal(b.accepts, b_accepts);
    assert_true(attempts(&f, ea) >= a_before + 3);
    assert_int_equal(attempts(&f, eb), 0);

    sl_endpoint_unref(ea);
    sl_endpoint_unref(eb);
    sl_endpoint_unref(ec);
    fx_dispose(&f);
    srv_close(&a);
    srv_close(&b);
    srv_close(&c);
}

/* Start times of every attempt of every endpoint, recorded by a 1 ms poll. */
struct starts {
    struct fx *f;
    struct sl_endpoint *eps[MAX_EPS];
    size_t n;
    uint64_t at[MAX_EPS][16];
    size_t count[MAX_EPS];
};

static bool record_starts(void *arg)
{
    struct starts *st = arg;
    bool done = true;
    for (size_t i = 0; i < st->n; i++) {
        uint64_t last = 0;
        uint64_t n = sl_health_checker_check_count(st->f->hc, st->eps[i], &last);
        if (n > st->count[i] && st->count[i] < 16) {
            assert_int_equal(n, st->count[i] + 1); /* never two starts between polls */
            st->at[i][st->count[i]++] = last;
        }
        if (st->count[i] < 8)
            done = false;
    }
    return done;
}

static void test_jitter_within_bounds(void **state)
{
    (void)state;
    /* Lower bounds are exact (a timer never fires early); upper bounds allow for a loaded
     * machine (CI runs the suite twice, once under ASan, beside other jobs). */
    const uint64_t interval = 100, slack = 150;
    struct fx f;
    fx_init(&f, NULL, interval, 50, 2, 2);
    struct srv s[MAX_EPS];
    for (size_t i = 0; i < MAX_EPS; i++) {
        srv_open(&s[i], &f.loop, SRV_TCP);
        fx_add(&f, s[i].port);
    }
    uint64_t t0 = sl_loop_now_ms(&f.loop);
    fx_start(&f);
    struct starts st = {.f = &f, .n = MAX_EPS};
    for (size_t i = 0; i < MAX_EPS; i++)
        st.eps[i] = fx_ep(&f, s[i].address);
    assert_true(run_until(&f.loop, record_starts, &st, 3000));
    uint64_t first_min = UINT64_MAX, first_max = 0;
    size_t distinct_gaps = 0;
    uint64_t prev_gap = 0;
    for (size_t i = 0; i < MAX_EPS; i++) {
        uint64_t first = st.at[i][0] - t0;
        assert_true(first < interval + slack);
        first_min = first < first_min ? first : first_min;
        first_max = first > first_max ? first : first_max;
        for (size_t k = 1; k < st.count[i]; k++) {
            uint64_t gap = st.at[i][k] - st.at[i][k - 1];
            assert_true(gap >= interval - interval / 10);
            assert_true(gap <= interval + interval / 10 + slack);
            if (gap != prev_gap)
                distinct_gaps++;
            prev_gap = gap;
        }
    }
    /* first offsets spread over the interval, and the period itself varies */
    assert_true(first_max - first_min >= 20);
    assert_true(distinct_gaps >= 5);
    for (size_t i = 0; i < MAX_EPS; i++)
        sl_endpoint_unref(st.eps[i]);
    fx_dispose(&f);
    for (size_t i = 0; i < MAX_EPS; i++)
        srv_close(&s[i]);
}

/* The loader's structures as they reach the checker: `statuses` replaces the default 2xx/3xx,
 * so a 200 is a failure and a 503 a success here; the pool of the other upstream, without
 * `health.active`, is left alone. */
static void test_config_from_yaml(void **state)
{
    (void)state;
    struct sl_loop loop;
    assert_int_equal(sl_loop_init(&loop), 0);
    struct srv ok, unavailable;
    srv_open(&ok, &loop, SRV_200);
    srv_open(&unavailable, &loop, SRV_503);
    uint16_t refused = refused_port();
    char yaml[1024];
    /* the listener is only parsed, never bound, by this test */
    snprintf(yaml, sizeof yaml,
             "listeners: [{name: l, address: '127.0.0.1:8080'}]\n"
             "upstreams:\n"
             "  - name: users\n"
             "    endpoints: ['%s', '%s']\n"
             "    health:\n"
             "      active: {path: /status, interval: 50ms, timeout: 40ms, healthy: 1,"
             " unhealthy: 2, statuses: [503]}\n"
             "  - name: plain\n"
             "    endpoints: ['127.0.0.1:%u']\n"
             "routes:\n"
             "  - {upstream: users}\n",
             ok.address, unavailable.address, (unsigned)refused);
    struct sl_config *cfg = NULL;
    struct sl_config_errors errs = {0};
    int rc = sl_config_load_string("hc.yaml", yaml, strlen(yaml), &cfg, &errs);
    if (rc != 0)
        sl_config_errors_print(&errs, stderr);
    sl_config_errors_dispose(&errs);
    assert_int_equal(rc, 0);
    assert_int_equal(cfg->upstream_count, 2);
    struct sl_pool *pools[2];
    for (size_t i = 0; i < 2; i++) {
        pools[i] = sl_pool_new(&cfg->upstreams[i], NULL, 1, NULL, 0);
        assert_non_null(pools[i]);
    }
    struct fx f = {.pool = pools[0]};
    f.hc = sl_health_checker_start(&loop, pools, 2);
    assert_non_null(f.hc);
    struct sl_endpoint_set *s = sl_pool_acquire_set(pools[0]);
    assert_int_equal(s->count, 2);
    struct sl_endpoint *e200 = strcmp(s->eps[0]->address, ok.address) == 0 ? s->eps[0] : s->eps[1];
    struct sl_endpoint *e503 = e200 == s->eps[0] ? s->eps[1] : s->eps[0];
    struct sl_endpoint_set *plain = sl_pool_acquire_set(pools[1]);
    assert_int_equal(plain->count, 1);
    struct watch w = {.f = &f, .ep = e200, .want_down = true};
    assert_true(run_until(&loop, watch_verdict, &w, 2000));
    struct watch w503 = {.f = &f, .ep = e503, .min_attempts = 4};
    assert_true(run_until(&loop, watch_attempts, &w503, 2000));
    assert_false(is_down(e503));
    assert_int_equal(sl_health_checker_check_count(f.hc, plain->eps[0], NULL), 0);
    assert_non_null(strstr(ok.first_req, "GET /status HTTP/1.1\r\n"));
    sl_endpoint_set_unref(plain);
    sl_endpoint_set_unref(s);
    sl_health_checker_stop(f.hc);
    sl_loop_run_deferred(&loop);
    for (size_t i = 0; i < 2; i++)
        sl_pool_free(pools[i]);
    sl_config_free(cfg);
    srv_close(&ok);
    srv_close(&unavailable);
    sl_loop_dispose(&loop);
}

static bool conn_open(void *arg)
{
    return ((struct srv *)arg)->open_conns > 0;
}

static bool conns_closed(void *arg)
{
    return ((struct srv *)arg)->open_conns == 0;
}

static void test_stop_closes_checks_in_flight(void **state)
{
    (void)state;
    struct fx f;
    fx_init(&f, "/healthz", 20, 5000, 2, 2);
    struct srv s;
    srv_open(&s, &f.loop, SRV_SILENT);
    fx_add(&f, s.port);
    fx_start(&f);
    struct sl_endpoint *ep = fx_ep(&f, s.address);
    uint32_t refs_checked = atomic_load(&ep->refs);
    assert_true(run_until(&f.loop, conn_open, &s, 2000));
    sl_health_checker_stop(f.hc);
    /* the socket is closed and the reference dropped at once; memory at the end of the turn */
    assert_int_equal(atomic_load(&ep->refs), refs_checked - 1);
    assert_true(run_until(&f.loop, conns_closed, &s, 2000));
    f.hc = NULL;
    sl_endpoint_unref(ep);
    fx_dispose(&f);
    srv_close(&s);
}

static void test_disabled_pool_not_checked(void **state)
{
    (void)state;
    struct fx f;
    fx_init(&f, NULL, 10, 100, 1, 1);
    f.up.active.enabled = false;
    fx_add(&f, refused_port());
    fx_start(&f);
    struct sl_endpoint *ep = fx_ep(&f, f.addrs[0]);
    run_for(&f.loop, 50);
    assert_int_equal(attempts(&f, ep), 0);
    assert_false(is_down(ep));
    sl_endpoint_unref(ep);
    fx_dispose(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tcp_up),
        cmocka_unit_test(test_refused_marks_down_after_threshold),
        cmocka_unit_test(test_http_200_stays_up),
        cmocka_unit_test(test_http_host_override),
        cmocka_unit_test(test_http_long_head_judged_by_status_line),
        cmocka_unit_test(test_http_503_marks_down),
        cmocka_unit_test(test_http_garbage_marks_down),
        cmocka_unit_test(test_http_silent_times_out),
        cmocka_unit_test(test_recovery_after_healthy_successes),
        cmocka_unit_test(test_set_changes_followed),
        cmocka_unit_test(test_jitter_within_bounds),
        cmocka_unit_test(test_config_from_yaml),
        cmocka_unit_test(test_stop_closes_checks_in_flight),
        cmocka_unit_test(test_disabled_pool_not_checked),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
