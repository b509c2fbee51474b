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
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "config/config.h"
#include "core/loop.h"
#include "filters/redis.h"
#include "loop_wait.h"

/* Slow enough for ASan, far below anything a test waits for. */
#define WAIT_MS 5000

/* ---- redis-server ------------------------------------------------------------------------ */

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* A blocking side connection to look at what the client did. NULL when not up (yet). */
static redisContext *side_conn(int port, const char *password)
{
    struct timeval tv = {0, 200000};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
    if (!c || c->err) {
        if (c)
            redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, (struct timeval){2, 0});
    if (password) {
        redisReply *rep = redisCommand(c, "AUTH %s", password);
        bool ok = rep && rep->type == REDIS_REPLY_STATUS;
        if (rep)
            freeReplyObject(rep);
        if (!ok) {
            redisFree(c);
            return NULL;
        }
    }
    redisReply *rep = redisCommand(c, "PING");
    bool ok = rep && rep->type == REDIS_REPLY_STATUS;
    if (rep)
        freeReplyObject(rep);
    if (!ok) {
        redisFree(c);
        return NULL;
    }
    return c;
}

static pid_t start_redis(int port, const char *password)
{
    char port_s[16];
    snprintf(port_s, sizeof port_s, "%d", port);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int devnull = open("/dev/null", O_RDWR);
        if (devnull >= 0) {
            dup2(devnull, 0);
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        char *argv[16] = {"redis-server", "--port",      port_s, "--bind",
                          "127.0.0.1",    "--save",      "",     "--appendonly",
                          "no",           "--daemonize", "no",   NULL};
        if (password) {
            argv[11] = "--requirepass";
            argv[12] = (char *)password;
            argv[13] = NULL;
        }
        execv("/usr/bin/redis-server", argv);
        _exit(127);
    }
    /* Poll until it answers. */
    uint64_t deadline = sl_clock_now_ms() + WAIT_MS;
    for (;;) {
        redisContext *c = side_conn(port, password);
        if (c) {
            redisFree(c);
            return pid;
        }
        int status;
        assert_int_equal(waitpid(pid, &status, WNOHANG), 0); /* still running */
        assert_true(sl_clock_now_ms() < deadline);
        sleep_ms(10);
    }
}

static void stop_redis(pid_t pid)
{
    kill(pid, SIGKILL);
    int status;
    waitpid(pid, &status, 0);
}

static long long side_int(redisContext *c, const char *fmt, const char *arg)
{
    redisReply *rep = redisCommand(c, fmt, arg);
    assert_non_null(rep);
    assert_int_equal(rep->type, REDIS_REPLY_INTEGER);
    long long v = rep->integer;
    freeReplyObject(rep);
    return v;
}

/* How many times the server ran EVAL (the fallback), from INFO commandstats. */
static long long eval_calls(redisContext *c)
{
    redisReply *rep = redisCommand(c, "INFO commandstats");
    assert_non_null(rep);
    assert_int_equal(rep->type, REDIS_REPLY_STRING);
    long long n = 0;
    const char *p = strstr(rep->str, "cmdstat_eval:calls=");
    if (p)
        n = strtoll(p + strlen("cmdstat_eval:calls="), NULL, 10);
    freeReplyObject(rep);
    return n;
}

/* ---- loop helpers ------------------------------------------------------------------------ */

static bool is_up(void *arg)
{
    return sl_redis_is_connected(arg);
}

static bool is_down(void *arg)
{
    return !sl_redis_is_connected(arg);
}

struct outcome {
    struct sl_redis_call call;
    int count;
    int err;
    struct sl_rl_result res;
    uint64_t done_ms;
    bool free_client; /* sl_redis_free from inside the callback */
};

static void on_result(struct sl_redis_call *call, const struct sl_rl_result *res, int err)
{
    struct outcome *o = call->data;
    o->count++;
    o->err = err;
    o->done_ms = sl_clock_now_ms();
    if (res)
        o->res = *res;
    if (o->free_client)
        sl_redis_free(call->client);
}

static bool is_done(void *arg)
{
    return ((struct outcome *)arg)->count > 0;
}

struct fixture {
    struct sl_loop loop;
    struct sl_redis_conf conf;
    int port;
    pid_t pid;
};

static char prefix[] = "t:";

static void fixture_init(struct fixture *f, int port)
{
    memset(f, 0, sizeof *f);
    assert_int_equal(sl_loop_init(&f->loop), 0);
    f->port = port;
    struct sockaddr_in *a = (struct sockaddr_in *)&f->conf.addr;
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)port);
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    f->conf.addr_len = sizeof *a;
    f->conf.timeout_ms = 1000;
    f->conf.connect_timeout_ms = 1000;
    f->conf.key_prefix = prefix;
}

/* One call, run to completion; returns its err. */
static int gcra(struct fixture *f, struct sl_redis *r, const char *key, uint64_t period_us,
                uint64_t burst, struct sl_rl_result *out)
{
    struct outcome o = {0};
    f->loop.now_ms = sl_clock_now_ms();
    int rc = sl_redis_gcra(r, &o.call, key, strlen(key), period_us, burst, on_result, &o);
    if (rc)
        return rc;
    assert_int_equal(o.count, 0); /* never from inside sl_redis_gcra */
    assert_true(run_until(&f->loop, is_done, &o, WAIT_MS));
    assert_int_equal(o.count, 1);
    if (out)
        *out = o.res;
    return o.err;
}

static struct sl_redis *connect_client(struct fixture *f)
{
    struct sl_redis *r = sl_redis_new(&f->loop, &f->conf);
    assert_non_null(r);
    assert_true(run_until(&f->loop, is_up, r, WAIT_MS));
    return r;
}

static void fixture_dispose(struct fixture *f, struct sl_redis *r)
{
    sl_redis_free(r);
    sl_loop_run_deferred(&f->loop);
    if (f->pid > 0)
        stop_redis(f->pid);
    sl_loop_dispose(&f->loop);
}

/* ---- tests ------------------------------------------------------------------------------- */

static void test_burst_then_refused(void **state)
{
    (void)state;
    struct fixture f;
    fixture_init(&f, free_port());
    f.pid = start_redis(f.port, NULL);
    struct sl_redis *r = connect_client(&f);

    const uint64_t period_us = 300000; /* 300 ms */
    struct sl_rl_result res;
    for (uint64_t i = 0; i < 3; i++) {
        assert_int_equal(gcra(&f, r, "k1", period_us, 2, &res), 0);
        assert_true(res.allowed);
        assert_int_equal(res.limit, 3);
        assert_int_equal(res.remaining, 2 - i);
        assert_int_equal(res.retry_after_ms, 0);
        assert_true(res.reset_ms > 300 * i && res.reset_ms <= 300 * (i + 1));
    }
    assert_int_equal(gcra(&f, r, "k1", period_us, 2, &res), 0);
    assert_false(res.allowed);
    assert_int_equal(res.remaining, 0);
    assert_true(res.retry_after_ms > 0 && res.retry_after_ms <= 300);
    assert_true(res.reset_ms > 600 && res.reset_ms <= 900);

    /* Another key is its own bucket. */
    struct sl_rl_result other;
    assert_int_equal(gcra(&f, r, "k2", period_us, 2, &other), 0);
    assert_true(other.allowed);
    assert_int_equal(other.remaining, 2);

    /* key_prefix applied; the key expires when the bucket is full again. */
    redisContext *c = side_conn(f.port, NULL);
    assert_non_null(c);
    assert_int_equal(side_int(c, "EXISTS %s", "t:k1"), 1);
    assert_int_equal(side_int(c, "EXISTS %s", "k1"), 0);
    long long pttl = side_int(c, "PTTL %s", "t:k1");
    assert_true(pttl > 0 && pttl <= 900);

    /* After retry_after another one passes, and only one. */
    run_until(&f.loop, NULL, NULL, res.retry_after_ms + 5);
    assert_int_equal(gcra(&f, r, "k1", period_us, 2, &res), 0);
    assert_true(res.allowed);
    assert_int_equal(res.remaining, 0);
    assert_int_equal(gcra(&f, r, "k1", period_us, 2, &res), 0);
    assert_false(res.allowed);

    /* An odd key: binary, longer than the inline buffer. */
    char longkey[300];
    memset(longkey, 'x', sizeof longkey - 1);
    longkey[sizeof longkey - 1] = '\0';
    assert_int_equal(gcra(&f, r, longkey, period_us, 0, &res), 0);
    assert_true(res.allowed);
    assert_int_equal(res.limit, 1);
    assert_int_equal(gcra(&f, r, longkey, period_us, 0, &res), 0);
    assert_false(res.allowed);

    /* Not a bucket: the script's GET fails → -EPROTO. */
    redisReply *rep = redisCommand(c, "HSET %s a b", "t:hash");
    freeReplyObject(rep);
    assert_int_equal(gcra(&f, r, "hash", period_us, 1, &res), -EPROTO);
    assert_int_equal(sl_redis_gcra(r, &(struct outcome){0}.call, "k", 1, 0, 1, on_result, NULL),
                     -EINVAL);
    assert_true(sl_redis_is_connected(r));

    redisFree(c);
    fixture_dispose(&f, r);
}

static void test_noscript_fallback(void **state)
{
    (void)state;
    struct fixture f;
    fixture_init(&f, free_port());
    f.pid = start_redis(f.port, NULL);
    struct sl_redis *r = connect_client(&f);
    redisContext *c = side_conn(f.port, NULL);
    assert_non_null(c);

    /* A fresh server does not know the script: EVALSHA, NOSCRIPT, EVAL. */
    struct sl_rl_result res;
    assert_int_equal(gcra(&f, r, "n", 1000000, 5, &res), 0);
    assert_true(res.allowed);
    assert_int_equal(eval_calls(c), 1);
    /* Now cached: EVALSHA only. */
    assert_int_equal(gcra(&f, r, "n", 1000000, 5, &res), 0);
    assert_int_equal(res.remaining, 4);
    assert_int_equal(eval_calls(c), 1);

    redisReply *rep = redisCommand(c, "SCRIPT FLUSH");
    assert_non_null(rep);
    freeReplyObject(rep);
    assert_int_equal(gcra(&f, r, "n", 1000000, 5, &res), 0);
    assert_true(res.allowed);
    assert_int_equal(res.remaining, 3);
    assert_int_equal(eval_calls(c), 2);

    redisFree(c);
    fixture_dispose(&f, r);
}

static char good_pw[] = "s3cret-pw";
static char bad_pw[] = "nope";
static char default_user[] = "default";

static void test_auth_and_select(void **state)
{
    (void)state;
    struct fixture f;
    fixture_init(&f, free_port());
    f.pid = start_redis(f.port, good_pw);
    struct sl_rl_result res;

    /* Password only. */
    f.conf.password = good_pw;
    struct sl_redis *r = connect_client(&f);
    assert_int_equal(gcra(&f, r, "a", 1000000, 1, &res), 0);
    assert_true(res.allowed);
    sl_redis_free(r);

    /* Username + password, and a database. */
    struct fixture g;
    fixture_init(&g, f.port);
    g.conf.username = default_user;
    g.conf.password = good_pw;
    g.conf.db = 3;
    r = connect_client(&g);
    assert_int_equal(gcra(&g, r, "indb3", 1000000, 1, &res), 0);
    redisContext *c = side_conn(f.port, good_pw);
    assert_non_null(c);
    assert_int_equal(side_int(c, "EXISTS %s", "t:indb3"), 0); /* not in db 0 */
    redisReply *rep = redisCommand(c, "SELECT 3");
    freeReplyObject(rep);
    assert_int_equal(side_int(c, "EXISTS %s", "t:indb3"), 1);
    redisFree(c);
    sl_redis_free(r);
    sl_loop_dispose(&g.loop);

    /* Wrong password: never connected, calls fail at once. */
    f.conf.username = NULL;
    f.conf.password = bad_pw;
    r = sl_redis_new(&f.loop, &f.conf);
    assert_non_null(r);
    assert_false(run_until(&f.loop, is_up, r, 400));
    struct outcome o = {0};
    assert_int_equal(sl_redis_gcra(r, &o.call, "a", 1, 1000000, 1, on_result, &o), -ENOTCONN);
    run_until(&f.loop, NULL, NULL, 10);
    assert_int_equal(o.count, 0);

    fixture_dispose(&f, r);
}

struct ticker {
    struct sl_timer t;
    struct sl_loop *loop;
    int ticks;
};

static void on_ticker(struct sl_timer *t)
{
    struct ticker *k = t->data;
    k->ticks++;
    sl_timer_arm(k->loop, &k->t, 5);
}

/* A "redis" that completes the TCP handshake (kernel backlog) and never answers. */
static int silent_server(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(fd, 64), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    *port = ntohs(a.sin_port);
    return fd;
}

static void test_timeout_and_bounds(void **state)
{
    (void)state;
    int port;
    int lfd = silent_server(&port);
    struct fixture f;
    fixture_init(&f, port);
    f.conf.timeout_ms = 100;
    struct sl_redis *r = connect_client(&f); /* no AUTH: up once TCP is */

    struct ticker k = {.loop = &f.loop};
    sl_timer_init(&k.t, on_ticker, &k);
    sl_timer_arm(&f.loop, &k.t, 5);

    struct outcome o = {0};
    uint64_t t0 = sl_clock_now_ms();
    f.loop.now_ms = t0;
    assert_int_equal(sl_redis_gcra(r, &o.call, "x", 1, 1000000, 1, on_result, &o), 0);
    /* A second call, cancelled and freed before its (never coming) reply. */
    struct outcome *gone = calloc(1, sizeof *gone);
    assert_non_null(gone);
    assert_int_equal(sl_redis_gcra(r, &gone->call, "y", 1, 1000000, 1, on_result, gone), 0);
    sl_redis_cancel(&gone->call);
    sl_redis_cancel(&gone->call); /* twice is fine */
    free(gone);

    assert_true(run_until(&f.loop, is_done, &o, WAIT_MS));
    assert_int_equal(o.err, -ETIMEDOUT);
    uint64_t took = o.done_ms - t0;
    assert_true(took >= 100 && took < 100 + 400);
    assert_true(k.ticks >= 10); /* the loop kept running meanwhile */
    sl_timer_cancel(&f.loop, &k.t);
    assert_true(sl_redis_is_connected(r)); /* a slow command does not drop the connection */

    /* Bounded: 1024 commands in flight (the two above still are), then -ENOBUFS. */
    f.conf.timeout_ms = 10000;
    enum { N = 1024 };
    struct outcome *many = calloc(N, sizeof *many);
    assert_non_null(many);
    int ok = 0, nobufs = 0;
    for (int i = 0; i < N; i++) {
        int rc = sl_redis_gcra(r, &many[i].call, "z", 1, 1000000, 1, on_result, &many[i]);
        if (rc == 0)
            ok++;
        else if (rc == -ENOBUFS)
            nobufs++;
    }
    assert_int_equal(ok, N - 2);
    assert_int_equal(nobufs, 2);
    /* A pending call cannot be reused. */
    assert_int_equal(sl_redis_gcra(r, &many[0].call, "z", 1, 1000000, 1, on_result, &many[0]),
                     -EALREADY);
    /* Freeing the client with calls pending: none of them hears back. */
    sl_redis_free(r);
    run_until(&f.loop, NULL, NULL, 10);
    for (int i = 0; i < N; i++)
        assert_int_equal(many[i].count, 0);
    free(many);

    /* AUTH that is never answered: the connect timeout drops it, calls fail at once. */
    f.conf.timeout_ms = 100;
    f.conf.connect_timeout_ms = 100;
    f.conf.password = good_pw;
    r = sl_redis_new(&f.loop, &f.conf);
    assert_non_null(r);
    assert_false(run_until(&f.loop, is_up, r, 350));
    assert_int_equal(sl_redis_gcra(r, &o.call, "x", 1, 1000000, 1, on_result, &o), -ENOTCONN);

    fixture_dispose(&f, r);
    close(lfd);
}

/* A server that accepts and never answers: after 8 timeouts in a row the client gives up on
 * the connection and reconnects instead of waiting on it forever. */
static void test_silent_server_forces_reconnect(void **state)
{
    (void)state;
    int port;
    int lfd = silent_server(&port);
    struct fixture f;
    fixture_init(&f, port);
    f.conf.timeout_ms = 20;
    struct sl_redis *r = connect_client(&f);
    for (int i = 0; i < 8; i++) {
        assert_true(sl_redis_is_connected(r));
        struct outcome o = {0};
        assert_int_equal(sl_redis_gcra(r, &o.call, "x", 1, 1000000, 1, on_result, &o), 0);
        assert_true(run_until(&f.loop, is_done, &o, WAIT_MS));
        assert_int_equal(o.err, -ETIMEDOUT);
    }
    assert_false(sl_redis_is_connected(r));
    /* The backoff then connects again (the listener's backlog completes the handshake). */
    assert_true(run_until(&f.loop, is_up, r, WAIT_MS));
    fixture_dispose(&f, r);
    close(lfd);
}

static void test_restart(void **state)
{
    (void)state;
    struct fixture f;
    fixture_init(&f, free_port());
    f.pid = start_redis(f.port, NULL);
    struct sl_redis *r = connect_client(&f);
    struct sl_rl_result res;
    assert_int_equal(gcra(&f, r, "r", 1000000, 100, &res), 0);

    stop_redis(f.pid);
    f.pid = -1;
    /* The client has not noticed yet: the call is accepted, then fails fast. */
    struct outcome o = {0};
    uint64_t t0 = sl_clock_now_ms();
    f.loop.now_ms = t0;
    int rc = sl_redis_gcra(r, &o.call, "r", 1, 1000000, 100, on_result, &o);
    if (rc == 0) {
        assert_true(run_until(&f.loop, is_done, &o, WAIT_MS));
        assert_int_equal(o.err, -ENOTCONN);
        assert_true(o.done_ms - t0 < f.conf.timeout_ms);
    } else {
        assert_int_equal(rc, -ENOTCONN);
    }
    assert_true(run_until(&f.loop, is_down, r, WAIT_MS));
    assert_int_equal(gcra(&f, r, "r", 1000000, 100, &res), -ENOTCONN);

    /* Let a couple of reconnects fail, then bring it back on the same port. */
    run_until(&f.loop, NULL, NULL, 300);
    f.pid = start_redis(f.port, NULL);
    assert_true(run_until(&f.loop, is_up, r, 6000));
    assert_int_equal(gcra(&f, r, "r", 1000000, 100, &res), 0);
    assert_true(res.allowed);

    fixture_dispose(&f, r);
}

static void test_cancel_and_free(void **state)
{
    (void)state;
    struct fixture f;
    fixture_init(&f, free_port());
    f.pid = start_redis(f.port, NULL);
    struct sl_redis *r = connect_client(&f);

    /* Load the script first: a cancelled call whose EVALSHA meets NOSCRIPT is not resent. */
    assert_int_equal(gcra(&f, r, "warm", 1000000, 1, NULL), 0);

    /* Cancelled: its callback never runs, and its memory may go at once. */
    struct outcome *a = calloc(1, sizeof *a);
    assert_non_null(a);
    f.loop.now_ms = sl_clock_now_ms();
    assert_int_equal(sl_redis_gcra(r, &a->call, "c", 1, 1000000, 1, on_result, a), 0);
    sl_redis_cancel(&a->call);
    free(a);
    struct outcome b = {0};
    assert_int_equal(sl_redis_gcra(r, &b.call, "c", 1, 1000000, 1, on_result, &b), 0);
    assert_true(run_until(&f.loop, is_done, &b, WAIT_MS));
    assert_int_equal(b.err, 0);
    /* The cancelled call still counted in Redis (it was sent): one of two left. */
    assert_true(b.res.allowed);
    assert_int_equal(b.res.remaining, 0);

    /* The same call object again once done. */
    assert_int_equal(sl_redis_gcra(r, &b.call, "c2", 2, 1000000, 1, on_result, &b), 0);
    assert_true(run_until(&f.loop, is_done, &b, WAIT_MS));

    /* The client freed from inside a callback, with another call in flight. */
    struct outcome c = {.free_client = true};
    struct outcome d = {0};
    assert_int_equal(sl_redis_gcra(r, &c.call, "c3", 2, 1000000, 1, on_result, &c), 0);
    assert_int_equal(sl_redis_gcra(r, &d.call, "c4", 2, 1000000, 1, on_result, &d), 0);
    assert_true(run_until(&f.loop, is_done, &c, WAIT_MS));
    run_until(&f.loop, NULL, NULL, 20);
    assert_int_equal(c.count, 1);
    assert_int_equal(d.count, 0);

    fixture_dispose(&f, NULL);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_burst_then_refused),
        cmocka_unit_test(test_noscript_fallback),
        cmocka_unit_test(test_auth_and_select),
        cmocka_unit_test(test_timeout_and_bounds),
        cmocka_unit_test(test_silent_server_forces_reconnect),
        cmocka_unit_test(test_restart),
        cmocka_unit_test(test_cancel_and_free),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
