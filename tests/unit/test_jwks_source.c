#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "core/loop.h"
#include "filters/jwks_source.h"
#include "filters/jwks_source_internal.h"
#include "filters/jws.h"

#include "stub_http.h"

#define DEADLINE_MS 10000u

/* ---- keys ----------------------------------------------------------------------------------- */

/* A fresh P-256 key rendered as a JWK ({"kty":"EC",...}) into `out`; the key is returned so that
 * tests can also write it as PEM. */
static EVP_PKEY *make_ec_jwk(const char *kid, char *out, size_t cap)
{
    EVP_PKEY *pk = EVP_EC_gen("P-256");
    assert_non_null(pk);
    BIGNUM *x = NULL, *y = NULL;
    assert_int_equal(EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_EC_PUB_X, &x), 1);
    assert_int_equal(EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_EC_PUB_Y, &y), 1);
    unsigned char xb[32], yb[32];
    assert_int_equal(BN_bn2binpad(x, xb, 32), 32);
    assert_int_equal(BN_bn2binpad(y, yb, 32), 32);
    BN_free(x);
    BN_free(y);
    char xs[64], ys[64];
    size_t xl = sl_b64url_encode(xb, 32, xs, sizeof xs);
    size_t yl = sl_b64url_encode(yb, 32, ys, sizeof ys);
    int n = snprintf(out, cap,
                     "{\"kty\":\"EC\",\"crv\":\"P-256\",\"use\":\"sig\",\"alg\":\"ES256\","
                     "\"kid\":\"%s\",\"x\":\"%.*s\",\"y\":\"%.*s\"}",
                     kid, (int)xl, xs, (int)yl, ys);
    assert_true(n > 0 && (size_t)n < cap);
    return pk;
}

/* A JWK Set of `count` fresh keys (malloc'd). */
static char *make_jwks(size_t count, const char *kid_prefix)
{
    size_t cap = 64 + count * 400;
    char *s = malloc(cap);
    assert_non_null(s);
    size_t len = (size_t)snprintf(s, cap, "{\"keys\":[");
    for (size_t i = 0; i < count; i++) {
        char kid[32], jwk[400];
        snprintf(kid, sizeof kid, "%s-%zu", kid_prefix, i);
        EVP_PKEY_free(make_ec_jwk(kid, jwk, sizeof jwk));
        len += (size_t)snprintf(s + len, cap - len, "%s%s", i ? "," : "", jwk);
    }
    snprintf(s + len, cap - len, "]}");
    return s;
}

static size_t key_count(struct sl_jwks_source *src)
{
    struct sl_jwks *ks = sl_jwks_source_acquire(src);
    size_t n = ks ? ks->count : 0;
    sl_jwks_unref(ks);
    return n;
}

/* ---- a scripted HTTP server ------------------------------------------------------------------ */

enum srv_mode {
    SRV_LENGTH,  /* 200 with Content-Length */
    SRV_CHUNKED, /* 200, chunked in small pieces with an extension and a trailer */
    SRV_CLOSE,   /* 200, body delimited by the close */
    SRV_500,
    SRV_GARBAGE,   /* 200 with a body that is not a JWK Set */
    SRV_TRUNCATED, /* Content-Length larger than what is sent */
    SRV_HANG,      /* accepts, reads, never answers */
};

struct srv {
    struct stub_http http; /* http.mu guards the fields below */
    atomic_int requests;   /* the well-formed ones */
    char *body;            /* owned */
    enum srv_mode mode;
    char cache_control[64];
    int delay_ms;
    size_t pad_bytes; /* an X-Pad header of this many bytes in SRV_LENGTH responses */
};

static uint64_t now_ms(void)
{
    return sl_clock_now_ms();
}

static void respond(struct srv *s, int fd)
{
    pthread_mutex_lock(&s->http.mu);
    enum srv_mode mode = s->mode;
    char *body = strdup(s->body ? s->body : "");
    char cc[96] = "";
    if (s->cache_control[0])
        snprintf(cc, sizeof cc, "Cache-Control: %s\r\n", s->cache_control);
    int delay = s->delay_ms;
    size_t pad = s->pad_bytes;
    pthread_mutex_unlock(&s->http.mu);
    if (delay > 0)
        poll(NULL, 0, delay); /* the server's behaviour under test, not a wait in the test */
    char head[512];
    size_t blen = strlen(body);
    switch (mode) {
    case SRV_LENGTH:
    case SRV_TRUNCATED: {
        int n = snprintf(head, sizeof head,
                         "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%s"
                         "Content-Length: %zu\r\n\r\n",
                         cc, mode == SRV_TRUNCATED ? blen + 100 : blen);
        if (pad) {
            char *p = malloc(pad + 16);
            memcpy(p, "X-Pad: ", 7);
            memset(p + 7, 'p', pad);
            memcpy(p + 7 + pad, "\r\n", 2);
            stub_http_write_all(fd, head, (size_t)n - 2); /* before the blank line */
            stub_http_write_all(fd, p, pad + 9);
            stub_http_write_all(fd, "\r\n", 2);
            free(p);
        } else {
            stub_http_write_all(fd, head, (size_t)n);
        }
        stub_http_write_all(fd, body, blen);
        break;
    }
    case SRV_CLOSE: {
        int n = snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\n%s\r\n", cc);
        stub_http_write_all(fd, head, (size_t)n);
        stub_http_write_all(fd, body, blen);
        break;
    }
    case SRV_CHUNKED: {
        /* an interim 103 first, then the chunked 200 */
        int n = snprintf(head, sizeof head,
                         "HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                         "HTTP/1.1 200 OK\r\n%sTransfer-Encoding: chunked\r\n\r\n",
                         cc);
        stub_http_write_all(fd, head, (size_t)n);
        for (size_t off = 0; off < blen; off += 37) {
            size_t piece = blen - off < 37 ? blen - off : 37;
            n = snprintf(head, sizeof head, "%zx;ext=1\r\n", piece);
            stub_http_write_all(fd, head, (size_t)n);
            stub_http_write_all(fd, body + off, piece);
            stub_http_write_all(fd, "\r\n", 2);
        }
        stub_http_write_all(fd, "0\r\nX-Trailer: 1\r\n\r\n", 20);
        break;
    }
    case SRV_500: {
        const char *r = "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\noops!";
        stub_http_write_all(fd, r, strlen(r));
        break;
    }
    case SRV_GARBAGE: {
        const char *r = "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!";
        stub_http_write_all(fd, r, strlen(r));
        break;
    }
    case SRV_HANG:
        break;
    }
    free(body);
}

static void on_conn(struct stub_http *h, int fd)
{
    struct srv *s = h->data;
    struct stub_http_req rq;
    /* only the request a source should send is answered */
    bool ok = stub_http_read(fd, true, &rq) && strncmp(rq.buf, "GET /jwks HTTP/1.1\r\n", 20) == 0 &&
              strstr(rq.buf, "\r\nHost: 127.0.0.1:") && strstr(rq.buf, "\r\nConnection: close");
    free(rq.buf);
    if (!ok) {
        close(fd);
        return;
    }
    atomic_fetch_add(&s->requests, 1);
    pthread_mutex_lock(&h->mu);
    bool held = s->mode == SRV_HANG && stub_http_hold(h, fd);
    pthread_mutex_unlock(&h->mu);
    if (held)
        return;
    respond(s, fd);
    close(fd);
}

static void srv_set(struct srv *s, enum srv_mode mode, char *body_take, const char *cc)
{
    pthread_mutex_lock(&s->http.mu);
    s->mode = mode;
    if (body_take) {
        free(s->body);
        s->body = body_take;
    }
    snprintf(s->cache_control, sizeof s->cache_control, "%s", cc ? cc : "");
    pthread_mutex_unlock(&s->http.mu);
}

static struct srv *srv_start(enum srv_mode mode, char *body_take)
{
    struct srv *s = calloc(1, sizeof *s);
    assert_non_null(s);
    s->mode = mode;
    s->body = body_take;
    stub_http_start(&s->http, on_conn, s);
    return s;
}

static void srv_stop(struct srv *s)
{
    stub_http_stop(&s->http);
    free(s->body);
    free(s);
}

static void srv_url(const struct srv *s, char *out, size_t cap)
{
    stub_http_url(&s->http, "/jwks", out, cap);
}

/* ---- polling ------------------------------------------------------------------------------- */

static bool wait_idle(struct sl_jwks_source *src)
{
    uint64_t deadline = now_ms() + DEADLINE_MS;
    while (sl_jwks_source_fetching(src)) {
        if (now_ms() > deadline)
            return false;
        poll(NULL, 0, 2);
    }
    return true;
}

static bool wait_generation(struct sl_jwks_source *src, uint64_t gen)
{
    uint64_t deadline = now_ms() + DEADLINE_MS;
    while (sl_jwks_source_generation(src) < gen) {
        if (now_ms() > deadline)
            return false;
        poll(NULL, 0, 2);
    }
    return true;
}

static bool wait_failures(struct sl_jwks_source *src, uint64_t n)
{
    uint64_t deadline = now_ms() + DEADLINE_MS;
    while (sl_jwks_source_failures(src) < n) {
        if (now_ms() > deadline)
            return false;
        poll(NULL, 0, 2);
    }
    return true;
}

/* Polls refetch until the min interval lets one start. */
static bool refetch_when_allowed(struct sl_jwks_source *src)
{
    uint64_t deadline = now_ms() + DEADLINE_MS;
    while (!sl_jwks_source_refetch(src)) {
        if (now_ms() > deadline)
            return false;
        poll(NULL, 0, 2);
    }
    return true;
}

/* ---- tests --------------------------------------------------------------------------------- */

static void test_cache_control(void **state)
{
    (void)state;
#define MA(s) sl__jwks_cache_max_age(s, strlen(s))
    assert_int_equal(MA("max-age=120"), 120);
    assert_int_equal(MA("public, max-age=60, must-revalidate"), 60);
    assert_int_equal(MA("private,max-age=7"), 7);
    assert_int_equal(MA("Max-Age=5"), 5);
    assert_int_equal(MA("max-age=\"30\""), 30);
    assert_int_equal(MA("no-cache=\"a, max-age=9\", max-age=11"), 11);
    assert_int_equal(MA("s-maxage=10"), -1);
    assert_int_equal(MA("no-store"), -1);
    assert_int_equal(MA("max-age="), -1);
    assert_int_equal(MA("max-age=12abc"), -1);
    assert_int_equal(MA("max-age=-1"), -1);
    assert_int_equal(MA(""), -1);
    assert_int_equal(MA("max-age=99999999999999999999999999"), (int64_t)1 << 62);
#undef MA
    struct sl_jwks_source_opts o = {
        .refresh_ms = 300000, .refresh_min_ms = 60000, .refresh_max_ms = 3600000};
    assert_int_equal(sl__jwks_refresh_delay_ms(&o, -1), 300000);
    assert_int_equal(sl__jwks_refresh_delay_ms(&o, 0), 60000);
    assert_int_equal(sl__jwks_refresh_delay_ms(&o, 10), 60000);
    assert_int_equal(sl__jwks_refresh_delay_ms(&o, 120), 120000);
    assert_int_equal(sl__jwks_refresh_delay_ms(&o, (int64_t)1 << 62), 3600000);
}

static void test_bad_urls(void **state)
{
    (void)state;
    static const char *bad[] = {
        "ftp://127.0.0.1/x",
        "http://user:pw@127.0.0.1/",
        "http://127.0.0.1/#frag",
        "http://127.0.0.1:0/",
        "http://127.0.0.1:65536/",
        "http://127.0.0.1:/",
        "http://127.0.0.1:8x/",
        "http://[::1/",
        "http://[zz]/",
        "http:///path",
        "http://ho st/",
        "http://h\xc3\xa9/",
        "http://127.0.0.1/a b",
        "127.0.0.1/jwks",
        "",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char err[256] = "";
        struct sl_jwks_source *src = sl_jwks_source_new_url(bad[i], NULL, err, sizeof err);
        if (src)
            fail_msg("accepted %s", bad[i]);
        assert_true(err[0] != '\0');
    }
    char err[256] = "";
    struct sl_jwks_source_opts o = {.ca_file = "/nonexistent/ca.pem"};
    assert_null(sl_jwks_source_new_url("https://127.0.0.1:1/jwks", &o, err, sizeof err));
    assert_non_null(strstr(err, "/nonexistent/ca.pem"));
}

/* Well-formed URLs against a closed port: the source exists, without keys, one failure. */
static void test_unreachable_still_starts(void **state)
{
    (void)state;
    static const char *good[] = {"http://127.0.0.1:1/jwks",  "http://127.0.0.1:1",
                                 "http://127.0.0.1:1?x=1",   "http://[::1]:1/jwks",
                                 "https://127.0.0.1:1/jwks", "HTTPS://localhost:1/jwks"};
    struct sl_jwks_source_opts o = {.timeout_ms = 2000};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        char err[256] = "";
        struct sl_jwks_source *src = sl_jwks_source_new_url(good[i], &o, err, sizeof err);
        if (!src)
            fail_msg("rejected %s: %s", good[i], err);
        assert_int_equal(sl_jwks_source_failures(src), 1);
        assert_int_equal(sl_jwks_source_generation(src), 0);
        assert_null(sl_jwks_source_acquire(src));
        sl_jwks_source_free(src);
    }
}

static void test_initial_fetch(void **state)
{
    (void)state;
    struct srv *s = srv_start(SRV_LENGTH, make_jwks(2, "a"));
    char url[64], err[256] = "";
    srv_url(s, url, sizeof url);
    uint64_t t0 = now_ms();
    struct sl_jwks_source *src = sl_jwks_source_new_url(url, NULL, err, sizeof err);
    assert_non_null(src);
    assert_int_equal(sl_jwks_source_generation(src), 1);
    assert_int_equal(sl_jwks_source_failures(src), 0);
    assert_int_equal(key_count(src), 2);
    assert_int_equal(atomic_load(&s->requests), 1);
    assert_false(sl_jwks_source_fetching(src));
    /* no Cache-Control: the default refresh (5 min) */
    uint64_t due = sl__jwks_source_next_due_ms(src);
    assert_true(due >= t0 + 300000 && due <= now_ms() + 300000);
    sl_jwks_source_free(src);
    srv_stop(s);
}

static void test_refetch_publishes_change(void **state)
{
    (void)state;
    struct srv *s = srv_start(SRV_LENGTH, make_jwks(2, "a"));
    char url[64], err[256] = "";
    srv_url(s, url, sizeof url);
    struct sl_jwks_source_opts o = {.refetch_min_interval_ms = 50};
    struct sl_jwks_source *src = sl_jwks_source_new_url(url, &o, err, sizeof err);
    assert_non_null(src);
    struct sl_jwks *first = sl_jwks_source_acquire(src);
    assert_non_null(first);

    /* same set served again: no new generation, same object */
    assert_true(refetch_when_allowed(src));
    assert_true(wait_idle(src));
    assert_int_equal(atomic_load(&s->requests), 2);
    assert_int_equal(sl_jwks_source_generation(src), 1);
    struct sl_jwks *same = sl_jwks_source_acquire(src);
    assert_ptr_equal(same, first);
    sl_jwks_unref(same);

    /* a rotated set is published */
    srv_set(s, SRV_LENGTH, make_jwks(3, "b"), NULL);
    assert_true(refetch_when_allowed(src));
    assert_true(wait_generation(src, 2));
    assert_true(wait_idle(src));
    assert_int_equal(key_count(src), 3);
    assert_int_equal(sl_jwks_source_failures(src), 0);
    /* the old set stays valid for whoever holds it */
    assert_int_equal(first->count, 2);
    sl_jwks_unref(first);
    sl_jwks_source_free(src);
    srv_stop(s);
}

struct racer {
    struct sl_jwks_source *src;
    pthread_barrier_t *barrier;
    bool result;
};

static void *on_race(void *arg)
{
    struct racer *r = arg;
    pthread_barrier_wait(r->barrier);
    r->result = sl_jwks_source_refetch(r->src);
    return NULL;
}

static void test_single_flight(void **state)
{
    (void)state;
    struct srv *s = srv_start(SRV_LENGTH, make_jwks(1, "a"));
    char url[64], err[256] = "";
    srv_url(s, url, sizeof url);
    struct sl_jwks_source_opts o = {.refetch_min_interval_ms = 1};
    struct sl_jwks_source *src = sl_jwks_source_new_url(url, &o, err, sizeof err);
    assert_non_null(src);
    assert_int_equal(atomic_load(&s->requests), 1);
    pthread_mutex_lock(&s->http.mu);
    s->delay_ms = 400; /* keeps the fetch in flight while every racer calls */
    pthread_mutex_unlock(&s->http.mu);
    /* let the 1 ms interval pass (polled, cheap) */
    uint64_t t = now_ms() + 2;
    while (now_ms() < t)
        poll(NULL, 0, 1);

    enum { N = 8 };
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, N);
    pthread_t th[N];
    struct racer r[N];
    for (int i = 0; i < N; i++) {
        r[i] = (struct racer){.src = src, .barrier = &barrier};
        assert_int_equal(pthread_create(&th[i], NULL, on_race, &r[i]), 0);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        assert_true(r[i].result);
    }
    pthread_barrier_destroy(&barrier);
    assert_true(sl_jwks_source_fetching(src));
    assert_true(wait_idle(src));
    assert_int_equal(atomic_load(&s->requests), 2);
    sl_jwks_source_free(src);
    srv_stop(s);
}

static void test_min_interval(void **state)
{
    (void)state;
    struct srv *s = srv_start(SRV_LENGTH, make_jwks(1, "a"));
    char url[64], err[256] = "";
    srv_url(s, url, sizeof url);

    /* the creation fetch counts: a refetch right after it is refused */
    struct sl_jwks_source_opts o = {.refetch_min_interval_ms = 60000};
    struct sl_jwks_source *src = sl_jwks_source_new_url(url, &o, err, sizeof err);
    assert_non_null(src);
    assert_false(sl_jwks_source_refetch(src));
    assert_false(sl_jwks_source_fetching(src));
    sl_jwks_source_free(src);
    assert_int_equal(atomic_load(&s->requests), 1);

    o.refetch_min_interval_ms = 200;
    src = sl_jwks_source_new_url(url, &o, err, sizeof err);
    assert_non_null(src);
    uint64_t created = now_ms();
    assert_true(refetch_when_allowed(src));
    assert_true(now_ms() - created >= 190);
    assert_true(wait_idle(src));
    assert_false(sl_jwks_source_refetch(src)); /* inside the interval again */
    assert_int_equal(atomic_load(&s->requests), 3);
    sl_jwks_source_free(src);
    srv_stop(s);
}

static void test_failures_keep_old_set(void **state)
{
    (void)state;
    struct srv *s = srv_start(SRV_LENGTH, make_jwks(2, "a"));
    char url[64], err[256] = "";
    srv_url(s, url, sizeof url);
    struct sl_jwks_source_opts o = {.refetch_min_interval_ms = 1};
    struct sl_jwks_source *src = sl_jwks_source_new_url(url, &o, err, sizeof err);
    assert_non_null(src);
    struct sl_jwks *good = sl_jwks_source_acquire(src);

    static const enum srv_mode modes[] = {SRV_500, SRV_GARBAGE, SRV_TRUNCATED};
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        srv_set(s, modes[i], make_jwks(1, "bad"), NULL);
        uint64_t before = sl_jwks_source_failures(src);
        assert_true(refetch_when_allowed(src));
        assert_true(wait_failures(src, before + 1));
        assert_true(wait_idle(src));
        struct sl_jwks *cur = sl_jwks_source_acquire(src);
        assert_ptr_equal(cur, good);
        sl_jwks_unref(cur);
        assert_int_equal(sl_jwks_source_generation(src), 1);
    }
    /* after a failure the next attempt is a backoff away, not a full refresh */
    assert_true(sl__jwks_source_next_due_ms(src) < now_ms() + 60000);

    /* recovery */
    srv_set(s, SRV_LENGTH, make_jwks(1, "c"), NULL);
    assert_true(refetch_when_allowed(src));
    assert_true(wait_generation(src, 2));
    assert_int_equal(key_count(src), 1);
    sl_jwks_unref(good);
    sl_jwks_source_free(src);
    srv_stop(s);
}

/* Failed fetches retry on their own: 1 s, then 2 s, ... */
static void test_backoff(void **state)
{
    (void)state;
    struct srv *s = srv_start(SRV_500, NULL);
    char url[64], err[256] = "";
    srv_url(s, url, sizeof url);
    uint64_t t0 = now_ms();
    struct sl_jwks_source *src = sl_jwks_source_new_url(url, NULL, err, sizeof err);
    assert_non_null(src);
    assert_int_equal(sl_jwks_source_failures(src), 1);
    uint64_t due = sl__jwks_source_next_due_ms(src);
    assert_true(due >= t0 + 1000 && due <= now_ms() + 1000);
    assert_true(wait_failures(src, 2)); /* the background retry, about 1 s later */
    assert_true(wait_idle(src));
    uint64_t t1 = now_ms();
    due = sl__jwks_source_next_due_ms(src);
    assert_true(due >= t1 + 2000 - 500 && due <= t1 + 2000);
    assert_true(now_ms() - t0 >= 990);
    assert_int_equal(atomic_load(&s->requests), 2);
    sl_jwks_source_free(src);
    srv_stop(s);
}

static void test_cache_control_schedule(void **state)
{
    (void)state;
    struct srv *s = srv_start(SRV_LENGTH, make_jwks(1, "a"));
    srv_set(s, SRV_LENGTH, NULL, "public, max-age=120");
    char url[64], err[256] = "";
    srv_url(s, url, sizeof url);
    struct sl_jwks_source_opts o = {
        .refresh_min_ms = 60000, .refresh_max_ms = 3600000, .refetch_min_interval_ms = 1};
    uint64_t t0 = now_ms();
    struct sl_jwks_source *src = sl_jwks_source_new_url(url, &o, err, sizeof err);
    assert_non_null(src);
    uint64_t due = sl__jwks_source_next_due_ms(src);
    assert_true(due >= t0 + 120000 && due <= now_ms() + 120000);

    /* below the floor: clamped up to refresh_min */
    srv_set(s, SRV_LENGTH, NULL, "max-age=5");
    assert_true(refetch_when_allowed(src));
    assert_true(wait_idle(src));
    t0 = now_ms();
    due = sl__jwks_source_next_due_ms(src);
    assert_true(due >= t0 + 60000 - 5000 && due <= t0 + 60000);

    /* above the ceiling: clamped down to refresh_max */
    srv_set(s, SRV_LENGTH, NULL, "max-age=31536000");
    assert_true(refetch_when_allowed(src));
    assert_true(wait_idle(src));
    t0 = now_ms();
    due = sl__jwks_source_next_due_ms(src);
    assert_true(due >= t0 + 3600000 - 5000 && due <= t0 + 3600000);
    sl_jwks_source_free(src);
    srv_stop(s);
}

static void test_chunked_and_close_delimited(void **state)
{
    (void)state;
    struct srv *s = srv_start(SRV_CHUNKED, make_jwks(3, "a"));
    char url[64], err[256] = "";
    srv_url(s, url, sizeof url);
    struct sl_jwks_source *src = sl_jwks_source_new_url(url, NULL, err, sizeof err);
    assert_non_null(src);
    assert_int_equal(sl_jwks_source_failures(src), 0);
    assert_int_equal(key_count(src), 3);
    sl_jwks_source_free(src);

    srv_set(s, SRV_CLOSE, make_jwks(2, "b"), NULL);
    src = sl_jwks_source_new_url(url, NULL, err, sizeof err);
    assert_non_null(src);
    assert_int_equal(sl_jwks_source_failures(src), 0);
    assert_int_equal(key_count(src), 2);
    sl_jwks_source_free(src);
    srv_stop(s);
}

static void test_oversize_body(void **state)
{
    (void)state;
    struct srv *s = srv_start(SRV_LENGTH, make_jwks(4, "a"));
    char url[64], err[256] = "";
    srv_url(s, url, sizeof url);
    struct sl_jwks_source_opts o = {.max_bytes = 300}; /* one key fits, four do not */
    static const enum srv_mode modes[] = {SRV_LENGTH, SRV_CHUNKED, SRV_CLOSE};
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        srv_set(s, modes[i], NULL, NULL);
        struct sl_jwks_source *src = sl_jwks_source_new_url(url, &o, err, sizeof err);
        assert_non_null(src);
        assert_int_equal(sl_jwks_source_failures(src), 1);
        assert_int_equal(sl_jwks_source_generation(src), 0);
        assert_null(sl_jwks_source_acquire(src));
        sl_jwks_source_free(src);
    }
    /* at the limit it is accepted */
    srv_set(s, SRV_LENGTH, make_jwks(1, "b"), NULL);
    o.max_bytes = strlen(s->body);
    struct sl_jwks_source *src = sl_jwks_source_new_url(url, &o, err, sizeof err);
    assert_non_null(src);
    assert_int_equal(sl_jwks_source_generation(src), 1);
    sl_jwks_source_free(src);
    srv_stop(s);
}

/* The response head is bounded (16 KiB) without the buffer ever stalling. */
static void test_head_limit(void **state)
{
    (void)state;
    struct srv *s = srv_start(SRV_LENGTH, make_jwks(1, "a"));
    char url[64], err[256] = "";
    srv_url(s, url, sizeof url);
    static const size_t pads[] = {12000, 16200, 17000, 40000};
    static const bool ok[] = {true, true, false, false};
    for (size_t i = 0; i < sizeof pads / sizeof pads[0]; i++) {
        pthread_mutex_lock(&s->http.mu);
        s->pad_bytes = pads[i];
        pthread_mutex_unlock(&s->http.mu);
        uint64_t t0 = now_ms();
        struct sl_jwks_source *src = sl_jwks_source_new_url(url, NULL, err, sizeof err);
        assert_non_null(src);
        assert_true(now_ms() - t0 < 2000); /* refused at once, not by the timeout */
        assert_int_equal(sl_jwks_source_generation(src), ok[i] ? 1 : 0);
        assert_int_equal(sl_jwks_source_failures(src), ok[i] ? 0 : 1);
        sl_jwks_source_free(src);
    }
    srv_stop(s);
}

static void test_timeout(void **state)
{
    (void)state;
    struct srv *s = srv_start(SRV_HANG, make_jwks(1, "a"));
    char url[64], err[256] = "";
    srv_url(s, url, sizeof url);
    struct sl_jwks_source_opts o = {.timeout_ms = 300};
    uint64_t t0 = now_ms();
    struct sl_jwks_source *src = sl_jwks_source_new_url(url, &o, err, sizeof err);
    uint64_t took = now_ms() - t0;
    assert_non_null(src);
    assert_true(took >= 290);
    assert_true(took < 3000);
    assert_int_equal(sl_jwks_source_failures(src), 1);
    assert_null(sl_jwks_source_acquire(src));
    /* freeing while a background retry may be hanging is bounded by the timeout too */
    t0 = now_ms();
    sl_jwks_source_free(src);
    assert_true(now_ms() - t0 < 3000);
    srv_stop(s);
}

/* ---- file sources -------------------------------------------------------------------------- */

static void write_file(const char *dir, const char *path, const char *text)
{
    /* write beside, then rename: the reader never sees a half-written file */
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s/.tmp", dir);
    FILE *f = fopen(tmp, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    assert_int_equal(rename(tmp, path), 0);
}

static void test_file_source(void **state)
{
    (void)state;
    char dir[] = "/tmp/sluice_jwks_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[512];
    snprintf(path, sizeof path, "%s/keys.json", dir);

    char err[256] = "";
    assert_null(sl_jwks_source_new_file(path, NULL, false, err, sizeof err)); /* missing */
    assert_true(err[0] != '\0');
    write_file(dir, path, "{\"keys\":[]}");
    err[0] = '\0';
    assert_null(sl_jwks_source_new_file(path, NULL, false, err, sizeof err)); /* no key */
    assert_true(err[0] != '\0');

    char *a = make_jwks(2, "a");
    write_file(dir, path, a);
    free(a);
    struct sl_jwks_source_opts o = {.refresh_ms = 20, .refetch_min_interval_ms = 1};
    struct sl_jwks_source *src = sl_jwks_source_new_file(path, &o, false, err, sizeof err);
    assert_non_null(src);
    assert_int_equal(sl_jwks_source_generation(src), 1);
    assert_int_equal(key_count(src), 2);

    char *b = make_jwks(3, "b");
    write_file(dir, path, b);
    free(b);
    assert_true(wait_generation(src, 2));
    assert_int_equal(key_count(src), 3);

    /* a bad file keeps the old set and counts once */
    write_file(dir, path, "{\"keys\": [ nope");
    assert_true(wait_failures(src, 1));
    assert_int_equal(key_count(src), 3);
    assert_int_equal(sl_jwks_source_generation(src), 2);

    /* a PEM public key */
    char jwk[400];
    EVP_PKEY *pk = make_ec_jwk("p", jwk, sizeof jwk);
    BIO *bio = BIO_new(BIO_s_mem());
    assert_int_equal(PEM_write_bio_PUBKEY(bio, pk), 1);
    char *pem_data;
    long pem_len = BIO_get_mem_data(bio, &pem_data);
    char *pem = strndup(pem_data, (size_t)pem_len);
    BIO_free(bio);
    EVP_PKEY_free(pk);
    write_file(dir, path, pem);
    assert_true(wait_generation(src, 3));
    assert_int_equal(key_count(src), 1);
    assert_int_equal(sl_jwks_source_failures(src), 1);
    sl_jwks_source_free(src);

    /* and a PEM file at creation */
    src = sl_jwks_source_new_file(path, NULL, false, err, sizeof err);
    assert_non_null(src);
    assert_int_equal(key_count(src), 1);
    sl_jwks_source_free(src);
    free(pem);

    unlink(path);
    rmdir(dir);
}

/* ---- subscribers on a real loop ------------------------------------------------------------ */

struct sub_ctx {
    struct sl_jwks_subscriber sub;
    struct sl_loop *loop;
    struct sl_jwks_source *src;
    int calls;
    uint64_t seen_generation; /* what the source said when the callback ran */
    uint64_t seen_failures;
    pthread_t expect_thread;
    bool wrong_thread;
};

static void on_keys(struct sl_jwks_subscriber *sub)
{
    struct sub_ctx *c = sub->data;
    c->calls++;
    c->seen_generation = sl_jwks_source_generation(c->src);
    c->seen_failures = sl_jwks_source_failures(c->src);
    if (!pthread_equal(pthread_self(), c->expect_thread))
        c->wrong_thread = true;
    sl_loop_stop(c->loop);
}

static void on_give_up(struct sl_timer *t)
{
    struct sl_loop *loop = t->data;
    sl_loop_stop(loop);
}

/* Runs the loop until a notification or `ms`. */
static void run_loop(struct sl_loop *loop, uint64_t ms)
{
    struct sl_timer give_up;
    sl_timer_init(&give_up, on_give_up, loop);
    loop->now_ms = sl_clock_now_ms();
    sl_timer_arm(loop, &give_up, ms);
    loop->stop = false;
    sl_loop_run(loop);
    sl_timer_cancel(loop, &give_up);
}

static void test_subscriber_notified_on_loop(void **state)
{
    (void)state;
    struct srv *s = srv_start(SRV_LENGTH, make_jwks(1, "a"));
    char url[64], err[256] = "";
    srv_url(s, url, sizeof url);
    struct sl_jwks_source_opts o = {.refetch_min_interval_ms = 1};
    struct sl_jwks_source *src = sl_jwks_source_new_url(url, &o, err, sizeof err);
    assert_non_null(src);

    struct sl_loop loop;
    assert_int_equal(sl_loop_init(&loop), 0);
    struct sub_ctx c = {.loop = &loop, .src = src, .expect_thread = pthread_self()};
    c.sub.loop = &loop;
    c.sub.cb = on_keys;
    c.sub.data = &c;
    sl_jwks_source_subscribe(src, &c.sub);

    /* a publish: a callback runs on this thread and sees the new generation */
    srv_set(s, SRV_LENGTH, make_jwks(2, "b"), NULL);
    assert_true(refetch_when_allowed(src));
    uint64_t deadline = now_ms() + DEADLINE_MS;
    while (c.seen_generation < 2 && now_ms() < deadline)
        run_loop(&loop, DEADLINE_MS);
    assert_int_equal(c.seen_generation, 2);
    assert_false(c.wrong_thread);

    /* a failed attempt notifies too, so a paused request can answer */
    assert_true(wait_idle(src));
    srv_set(s, SRV_500, NULL, NULL);
    uint64_t failures = sl_jwks_source_failures(src);
    assert_true(refetch_when_allowed(src));
    while (c.seen_failures <= failures && now_ms() < deadline)
        run_loop(&loop, DEADLINE_MS);
    assert_true(c.seen_failures > failures);
    assert_int_equal(c.seen_generation, 2);
    assert_false(c.wrong_thread);

    /* after unsubscribing, nothing more is posted */
    sl_jwks_source_unsubscribe(src, &c.sub);
    run_loop(&loop, 0); /* drains a post queued before the unsubscribe */
    int calls = c.calls;
    assert_true(refetch_when_allowed(src));
    assert_true(wait_failures(src, c.seen_failures + 1));
    assert_true(wait_idle(src));
    sl_jwks_source_free(src); /* also waits for the thread to finish with the source */
    run_loop(&loop, 20);
    assert_int_equal(c.calls, calls);
    sl_loop_dispose(&loop);
    srv_stop(s);
}

/* Several sources at once, created and freed in turn, so the shared thread stops and starts. */
static void test_thread_restart(void **state)
{
    (void)state;
    struct srv *s = srv_start(SRV_LENGTH, make_jwks(1, "a"));
    char url[64], err[256] = "";
    srv_url(s, url, sizeof url);
    struct sl_jwks_source_opts o = {.refetch_min_interval_ms = 1};
    for (int round = 0; round < 3; round++) {
        struct sl_jwks_source *a = sl_jwks_source_new_url(url, &o, err, sizeof err);
        struct sl_jwks_source *b = sl_jwks_source_new_url(url, &o, err, sizeof err);
        assert_non_null(a);
        assert_non_null(b);
        assert_true(refetch_when_allowed(a));
        assert_true(refetch_when_allowed(b));
        sl_jwks_source_free(a);
        assert_true(wait_idle(b));
        assert_int_equal(sl_jwks_source_generation(b), 1);
        sl_jwks_source_free(b);
    }
    srv_stop(s);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* as main.c does */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cache_control),
        cmocka_unit_test(test_bad_urls),
        cmocka_unit_test(test_unreachable_still_starts),
        cmocka_unit_test(test_initial_fetch),
        cmocka_unit_test(test_refetch_publishes_change),
        cmocka_unit_test(test_single_flight),
        cmocka_unit_test(test_min_interval),
        cmocka_unit_test(test_failures_keep_old_set),
        cmocka_unit_test(test_backoff),
        cmocka_unit_test(test_cache_control_schedule),
        cmocka_unit_test(test_chunked_and_close_delimited),
        cmocka_unit_test(test_oversize_body),
        cmocka_unit_test(test_head_limit),
        cmocka_unit_test(test_timeout),
        cmocka_unit_test(test_file_source),
        cmocka_unit_test(test_subscriber_notified_on_loop),
        cmocka_unit_test(test_thread_restart),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
