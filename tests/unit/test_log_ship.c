#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "config/config.h"
#include "core/loop.h"
#include "obs/log_ship.h"

#include "stub_http.h"

#define WAIT_MS 20000u
#define MAX_RECS 512

/* ---- a collector: records every request, answers 503 to the first `fail_first`, or never
 * answers when `hang` ---------------------------------------------------------------------- */

struct rec {
    char head[1024];
    char *body;
    size_t body_len;
    uint64_t at_ms;
    bool file_existed; /* the segment was still on disk when its request arrived */
};

struct collector {
    struct stub_http http; /* http.mu guards the fields below */
    const char *dir;
    int fail_first;
    bool hang;
    const char *accept; /* the 2xx answer; NULL = a 201 without a body */
    int early_first;    /* the first ones get a 200 right after the head, the body unread */
    struct rec recs[MAX_RECS];
    atomic_int count;
};

/* Reads head and Content-Length body; false when the client went away first. */
static bool read_req(int fd, struct rec *r)
{
    struct stub_http_req rq;
    bool whole = stub_http_read(fd, false, &rq);
    if (whole) {
        snprintf(r->head, sizeof r->head, "%.*s", (int)rq.head_len, rq.buf);
        r->body_len = rq.body_len;
        r->body = malloc(r->body_len + 1);
        assert_non_null(r->body);
        memcpy(r->body, rq.buf + rq.head_len, r->body_len);
    }
    free(rq.buf);
    return whole;
}

/* The segment name a request is about: the last path component (PUT) or the header (POST). */
static void seg_name(const struct rec *r, char *out, size_t cap)
{
    const char *h = strstr(r->head, "\r\nX-Sluice-Segment: ");
    if (h) {
        h += 20;
        snprintf(out, cap, "%.*s", (int)strcspn(h, "\r"), h);
        return;
    }
    const char *sp = strchr(r->head, ' ');
    const char *end = sp ? strchr(sp + 1, ' ') : NULL;
    assert_non_null(end);
    const char *slash = sp;
    for (const char *p = sp; p < end; p++)
        if (*p == '/')
            slash = p;
    snprintf(out, cap, "%.*s", (int)(end - slash - 1), slash + 1);
}

static void on_conn(struct stub_http *h, int fd)
{
    struct collector *c = h->data;
    struct rec r = {0};
    pthread_mutex_lock(&h->mu);
    bool early = c->early_first > 0;
    if (early)
        c->early_first--;
    pthread_mutex_unlock(&h->mu);
    if (early) {
        /* takes the head only, says yes and closes: the rest of the body is never read */
        struct stub_http_req rq;
        stub_http_read(fd, true, &rq);
        free(rq.buf);
        static const char ok[] = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        stub_http_write_all(fd, ok, sizeof ok - 1);
        close(fd);
        return;
    }
    if (!read_req(fd, &r)) {
        close(fd);
        return;
    }
    r.at_ms = sl_clock_now_ms();
    char name[256], path[512];
    seg_name(&r, name, sizeof name);
    snprintf(path, sizeof path, "%s/%s", c->dir, name);
    r.file_existed = access(path, F_OK) == 0;
    pthread_mutex_lock(&h->mu);
    int n = atomic_load(&c->count);
    bool fail = n < c->fail_first;
    bool held = c->hang && stub_http_hold(h, fd);
    if (n < MAX_RECS) {
        c->recs[n] = r;
        atomic_store(&c->count, n + 1);
    } else {
        free(r.body);
    }
    pthread_mutex_unlock(&h->mu);
    if (held)
        return;
    const char *answer = fail        ? "HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy"
                         : c->accept ? c->accept
                                     : "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
    stub_http_write_all(fd, answer, strlen(answer));
    close(fd);
}

static struct collector *collector_start(const char *dir, int fail_first)
{
    struct collector *c = calloc(1, sizeof *c);
    assert_non_null(c);
    c->dir = dir;
    c->fail_first = fail_first;
    stub_http_start(&c->http, on_conn, c);
    return c;
}

static void collector_stop(struct collector *c)
{
    stub_http_stop(&c->http);
    for (int i = 0; i < atomic_load(&c->count); i++)
        free(c->recs[i].body);
    free(c);
}

/* ---- helpers -------------------------------------------------------------------------------- */

struct seg {
    char name[64];
    char path[512];
    unsigned char *data;
    size_t len;
};

static void make_seg(const char *dir, const char *name, size_t len, unsigned seed, struct seg *s)
{
    snprintf(s->name, sizeof s->name, "%s", name);
    snprintf(s->path, sizeof s->path, "%s/%s", dir, name);
    s->len = len;
    s->data = malloc(len ? len : 1);
    assert_non_null(s->data);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < len; i++) {
        x = x * 1103515245u + 12345u;
        s->data[i] = (unsigned char)(x >> 16);
    }
    /* written aside and renamed, as the access log does: a segment appears complete */
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
    FILE *f = fopen(tmp, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(s->data, 1, len, f), len);
    fclose(f);
    assert_int_equal(rename(tmp, s->path), 0);
}

static bool exists(const char *path)
{
    return access(path, F_OK) == 0;
}

static bool wait_stat(struct sl_log_ship *s, size_t field, uint64_t want)
{
    uint64_t deadline = sl_clock_now_ms() + WAIT_MS;
    for (;;) {
        struct sl_log_ship_stats st;
        sl_log_ship_get_stats(s, &st);
        if (*(uint64_t *)((char *)&st + field) >= want)
            return true;
        if (sl_clock_now_ms() > deadline)
            return false;
        poll(NULL, 0, 5);
    }
}

#define WAIT_SHIPPED(s, n) wait_stat(s, offsetof(struct sl_log_ship_stats, shipped), n)
#define WAIT_FAILURES(s, n) wait_stat(s, offsetof(struct sl_log_ship_stats, failures), n)

static void rm_dir(const char *dir)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *e;
    char p[1024];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

/* One test's directory, the collector and the shipper between them. */
struct rig {
    char dir[32];
    char url[128];
    struct sl_access_log_conf conf;
    struct collector *c;
    struct sl_log_ship *s;
};

/* Makes the directory and starts a collector that refuses the first `fail_first` requests. */
static void rig_open(struct rig *g, int fail_first)
{
    memset(g, 0, sizeof *g);
    snprintf(g->dir, sizeof g->dir, "/tmp/sluice_ship_XXXXXX");
    assert_non_null(mkdtemp(g->dir));
    g->c = collector_start(g->dir, fail_first);
}

/* Starts a shipper of the directory to the collector's `path` with `method` and an attempt
 * timeout of `timeout_ms`. */
static struct sl_log_ship *rig_ship(struct rig *g, const char *path, int method,
                                    uint64_t timeout_ms)
{
    stub_http_url(&g->c->http, path, g->url, sizeof g->url);
    g->conf.directory = g->dir;
    g->conf.ship_url = g->url;
    g->conf.ship_method = method;
    g->conf.ship_timeout_ms = timeout_ms;
    g->conf.ship_backoff_max_ms = 10000;
    char err[256] = "";
    g->s = sl_log_ship_new(&g->conf, err, sizeof err);
    if (!g->s)
        fail_msg("sl_log_ship_new: %s", err);
    assert_int_equal(sl_log_ship_start(g->s), 0);
    return g->s;
}

static void rig_close(struct rig *g)
{
    sl_log_ship_free(g->s);
    collector_stop(g->c);
    rm_dir(g->dir);
}

/* ---- tests ---------------------------------------------------------------------------------- */

/*
 * Segments left by an earlier run go first, oldest first; the collector refuses twice: the
 * first segment is retried after a growing backoff and stays on disk until accepted; then
 * each arrives byte-exact with its headers and is deleted. A segment enqueued later follows.
 */
static void test_ship_in_order_after_failures(void **state)
{
    (void)state;
    struct rig g;
    rig_open(&g, 2);
    struct collector *c = g.c;
    struct seg segs[4];
    make_seg(g.dir, "sluice-20260101T000002.000Z-1-000002.jsonl.zst", 200000, 2, &segs[1]);
    make_seg(g.dir, "sluice-20260101T000001.000Z-1-000001.jsonl.zst", 1000, 1, &segs[0]);
    make_seg(g.dir, "sluice-20260101T000003.000Z-1-000003.jsonl.zst", 0, 3, &segs[2]);
    struct seg other;
    make_seg(g.dir, ".sluice-20260101T000004.000Z-1-000004.jsonl.zst.tmp", 10, 4, &other);
    struct sl_log_ship *s = rig_ship(&g, "/ingest", SL_SHIP_PUT, 2000);

    assert_true(WAIT_FAILURES(s, 1));
    struct sl_log_ship_stats st;
    sl_log_ship_get_stats(s, &st);
    assert_int_equal(st.shipped, 0);
    assert_true(exists(segs[0].path)); /* a refused segment stays */

    assert_true(WAIT_SHIPPED(s, 3));
    make_seg(g.dir, "sluice-20260101T000005.000Z-1-000005.jsonl.zst", 5000, 5, &segs[3]);
    sl_log_ship_enqueue(s, segs[3].path);
    assert_true(WAIT_SHIPPED(s, 4));
    sl_log_ship_get_stats(s, &st);
    assert_int_equal(st.failures, 2);
    assert_int_equal(st.bytes, 1000 + 200000 + 0 + 5000);
    assert_int_equal(st.queued, 0);

    pthread_mutex_lock(&c->http.mu);
    assert_int_equal(atomic_load(&c->count), 6);
    static const int order[] = {0, 0, 0, 1, 2, 3};
    for (int i = 0; i < 6; i++) {
        const struct rec *r = &c->recs[i];
        const struct seg *sg = &segs[order[i]];
        char want[256];
        snprintf(want, sizeof want, "PUT /ingest/%s HTTP/1.1\r\n", sg->name);
        assert_true(strncmp(r->head, want, strlen(want)) == 0);
        assert_non_null(strstr(r->head, "\r\nContent-Type: application/x-ndjson\r\n"));
        assert_non_null(strstr(r->head, "\r\nContent-Encoding: zstd\r\n"));
        snprintf(want, sizeof want, "\r\nContent-Length: %zu\r\n", sg->len);
        assert_non_null(strstr(r->head, want));
        assert_int_equal(r->body_len, sg->len);
        assert_memory_equal(r->body, sg->data, sg->len);
        assert_true(r->file_existed);
    }
    /* backoff: about 1 s, then about 2 s (each minus up to a quarter of jitter) */
    uint64_t gap1 = c->recs[1].at_ms - c->recs[0].at_ms;
    uint64_t gap2 = c->recs[2].at_ms - c->recs[1].at_ms;
    assert_true(gap1 >= 740);
    assert_true(gap2 >= 1490);
    assert_true(gap2 > gap1);
    pthread_mutex_unlock(&c->http.mu);

    for (int i = 0; i < 4; i++) {
        assert_false(exists(segs[i].path));
        free(segs[i].data);
    }
    assert_true(exists(other.path)); /* not a closed segment: never touched */
    free(other.data);
    sl_log_ship_stop(s, sl_clock_now_ms() + 1000);
    rig_close(&g);
}

/* POST sends to the URL itself (query kept) and names the segment in a header. */
static void test_post_method(void **state)
{
    (void)state;
    struct rig g;
    rig_open(&g, 0);
    struct collector *c = g.c;
    struct sl_log_ship *s = rig_ship(&g, "/logs?stream=edge", SL_SHIP_POST, 2000);
    struct seg sg;
    make_seg(g.dir, "sluice-20260101T000001.000Z-7-000001.jsonl.zst", 777, 9, &sg);
    sl_log_ship_enqueue(s, sg.path);
    sl_log_ship_enqueue(s, sg.path); /* twice: sent once */
    assert_true(WAIT_SHIPPED(s, 1));
    sl_log_ship_stop(s, sl_clock_now_ms() + 1000);
    pthread_mutex_lock(&c->http.mu);
    assert_int_equal(atomic_load(&c->count), 1);
    const struct rec *r = &c->recs[0];
    assert_true(strncmp(r->head, "POST /logs?stream=edge HTTP/1.1\r\n", 33) == 0);
    assert_non_null(strstr(r->head, "\r\nX-Sluice-Segment: " /* the name */));
    assert_non_null(strstr(r->head, sg.name));
    assert_int_equal(r->body_len, 777);
    assert_memory_equal(r->body, sg.data, 777);
    pthread_mutex_unlock(&c->http.mu);
    assert_false(exists(sg.path));
    free(sg.data);
    rig_close(&g);
}

/* A collector whose 2xx answer has a body past what the shipper keeps (1 KiB): each segment
 * is still accepted once and deleted, not retried as a failure. */
static void test_long_2xx_answer_accepted(void **state)
{
    (void)state;
    struct rig g;
    rig_open(&g, 0);
    struct collector *c = g.c;
    enum { BODY = 8000 };
    char *answer = malloc(BODY + 128);
    assert_non_null(answer);
    int n = snprintf(answer, 128, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n", BODY);
    memset(answer + n, 'x', BODY);
    answer[n + BODY] = '\0';
    c->accept = answer;
    struct seg a, b;
    make_seg(g.dir, "sluice-20260101T000001.000Z-1-000001.jsonl.zst", 100, 1, &a);
    make_seg(g.dir, "sluice-20260101T000002.000Z-1-000002.jsonl.zst", 100, 2, &b);
    struct sl_log_ship *s = rig_ship(&g, "/ingest", SL_SHIP_PUT, 2000);
    assert_true(WAIT_SHIPPED(s, 2));
    sl_log_ship_stop(s, sl_clock_now_ms() + 1000);
    struct sl_log_ship_stats st;
    sl_log_ship_get_stats(s, &st);
    assert_int_equal(st.failures, 0);
    assert_int_equal(atomic_load(&c->count), 2); /* each once */
    assert_false(exists(a.path));
    assert_false(exists(b.path));
    free(a.data);
    free(b.data);
    rig_close(&g);
    free(answer);
}

/* A collector that answers 200 after the head and closes without reading the body did not
 * store the segment: that attempt is a failure, the file stays, and the next attempt sends
 * it whole. */
static void test_early_2xx_not_accepted(void **state)
{
    (void)state;
    struct rig g;
    rig_open(&g, 0);
    struct collector *c = g.c;
    c->early_first = 1;
    struct seg a;
    /* more than the socket buffers on both sides hold, so the send fails */
    make_seg(g.dir, "sluice-20260101T000001.000Z-1-000001.jsonl.zst", 24u << 20, 1, &a);
    struct sl_log_ship *s = rig_ship(&g, "/ingest", SL_SHIP_PUT, 10000);
    assert_true(WAIT_FAILURES(s, 1));
    struct sl_log_ship_stats st;
    sl_log_ship_get_stats(s, &st);
    assert_int_equal(st.shipped, 0);
    assert_true(exists(a.path));
    assert_true(WAIT_SHIPPED(s, 1));
    sl_log_ship_stop(s, sl_clock_now_ms() + 1000);
    pthread_mutex_lock(&c->http.mu);
    assert_int_equal(atomic_load(&c->count), 1); /* the whole one */
    assert_int_equal(c->recs[0].body_len, a.len);
    assert_memory_equal(c->recs[0].body, a.data, a.len);
    pthread_mutex_unlock(&c->http.mu);
    assert_false(exists(a.path));
    free(a.data);
    rig_close(&g);
}

/* A collector that keeps refusing: stop gives up at its deadline and leaves every file. */
static void test_stop_deadline_leaves_files(void **state)
{
    (void)state;
    struct rig g;
    rig_open(&g, 1000);
    struct collector *c = g.c;
    struct seg a, b;
    make_seg(g.dir, "sluice-20260101T000001.000Z-1-000001.jsonl.zst", 100, 1, &a);
    make_seg(g.dir, "sluice-20260101T000002.000Z-1-000002.jsonl.zst", 100, 2, &b);
    struct sl_log_ship *s = rig_ship(&g, "/ingest/", SL_SHIP_PUT, 2000);
    assert_true(WAIT_FAILURES(s, 1));
    uint64_t t0 = sl_clock_now_ms();
    sl_log_ship_stop(s, t0 + 300);
    uint64_t took = sl_clock_now_ms() - t0;
    assert_true(took < 1500);
    struct sl_log_ship_stats st;
    sl_log_ship_get_stats(s, &st);
    assert_int_equal(st.shipped, 0);
    assert_int_equal(st.queued, 2);
    assert_true(exists(a.path));
    assert_true(exists(b.path));
    pthread_mutex_lock(&c->http.mu);
    /* a trailing slash in the URL is not doubled */
    assert_true(strncmp(c->recs[0].head, "PUT /ingest/sluice-", 19) == 0);
    pthread_mutex_unlock(&c->http.mu);
    free(a.data);
    free(b.data);
    rig_close(&g);
}

/* An attempt hanging on a silent collector is cut at the stop deadline, not its timeout. */
static void test_stop_cancels_attempt(void **state)
{
    (void)state;
    struct rig g;
    rig_open(&g, 0);
    struct collector *c = g.c;
    struct seg a;
    make_seg(g.dir, "sluice-20260101T000001.000Z-1-000001.jsonl.zst", 100, 1, &a);
    c->hang = true;
    struct sl_log_ship *s = rig_ship(&g, "/ingest", SL_SHIP_PUT, 60000);
    uint64_t deadline = sl_clock_now_ms() + WAIT_MS;
    while (atomic_load(&c->count) < 1 && sl_clock_now_ms() < deadline)
        poll(NULL, 0, 5);
    assert_int_equal(atomic_load(&c->count), 1);
    uint64_t t0 = sl_clock_now_ms();
    sl_log_ship_stop(s, t0 + 200);
    assert_true(sl_clock_now_ms() - t0 < 1500);
    struct sl_log_ship_stats st;
    sl_log_ship_get_stats(s, &st);
    assert_int_equal(st.failures, 0); /* a cancel is not a collector failure */
    assert_true(exists(a.path));
    free(a.data);
    rig_close(&g);
}

/* More segments than the queue holds: all shipped, in order, none lost. */
static void test_more_than_the_queue(void **state)
{
    (void)state;
    struct rig g;
    rig_open(&g, 0);
    struct collector *c = g.c;
    enum { N = 300 };
    for (int i = 0; i < N; i++) {
        char name[64];
        snprintf(name, sizeof name, "sluice-20260101T%06d.000Z-1-000001.jsonl.zst", i);
        struct seg sg;
        make_seg(g.dir, name, 10, (unsigned)i, &sg);
        free(sg.data);
    }
    struct sl_log_ship *s = rig_ship(&g, "/ingest", SL_SHIP_PUT, 2000);
    /* and a burst of hand-overs racing the scan */
    for (int i = N - 1; i >= 0; i -= 7) {
        char path[512];
        snprintf(path, sizeof path, "%s/sluice-20260101T%06d.000Z-1-000001.jsonl.zst", g.dir, i);
        sl_log_ship_enqueue(s, path);
    }
    assert_true(WAIT_SHIPPED(s, N));
    sl_log_ship_stop(s, sl_clock_now_ms() + 1000);
    pthread_mutex_lock(&c->http.mu);
    assert_int_equal(atomic_load(&c->count), N);
    for (int i = 0; i < N; i++) {
        char want[128];
        snprintf(want, sizeof want, "PUT /ingest/sluice-20260101T%06d.000Z", i);
        if (strncmp(c->recs[i].head, want, strlen(want)) != 0)
            fail_msg("request %d: %.60s", i, c->recs[i].head);
    }
    pthread_mutex_unlock(&c->http.mu);
    rig_close(&g);
}

/* Out of file descriptors when the segment is opened: a failure like any other, retried after
 * the backoff, and the segment is shipped once descriptors are back (not skipped until the
 * next start). */
static void test_transient_open_error_retried(void **state)
{
    (void)state;
    struct rig g;
    rig_open(&g, 0);
    struct collector *c = g.c;
    struct sl_log_ship *s = rig_ship(&g, "/ingest", SL_SHIP_PUT, 2000);
    struct seg a;
    make_seg(g.dir, "sluice-20260101T000001.000Z-1-000001.jsonl.zst", 100, 1, &a);

    struct rlimit old, lim;
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &old), 0);
    lim = old;
    if (lim.rlim_cur > 256)
        lim.rlim_cur = 256;
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &lim), 0);
    int fill[256], nfill = 0;
    while (nfill < 256) {
        int fd = dup(2);
        if (fd < 0)
            break;
        fill[nfill++] = fd;
    }
    int e = errno;
    sl_log_ship_enqueue(s, a.path);
    bool failed = WAIT_FAILURES(s, 1);
    for (int i = 0; i < nfill; i++)
        close(fill[i]);
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &old), 0);
    assert_int_equal(e, EMFILE);
    assert_true(failed);

    assert_true(WAIT_SHIPPED(s, 1));
    sl_log_ship_stop(s, sl_clock_now_ms() + 1000);
    assert_int_equal(atomic_load(&c->count), 1);
    assert_false(exists(a.path));
    free(a.data);
    rig_close(&g);
}

/* A FIFO named like a segment does not hang the thread, and a symbolic link named like one
 * does not upload the file it points to: both are skipped (and stay), the next segment goes. */
static void test_fifo_and_symlink_skipped(void **state)
{
    (void)state;
    struct rig g;
    rig_open(&g, 0);
    struct collector *c = g.c;
    struct sl_log_ship *s = rig_ship(&g, "/ingest", SL_SHIP_PUT, 2000);
    char fifo[512], link[512], secret[64];
    snprintf(fifo, sizeof fifo, "%s/sluice-20260101T000001.000Z-1-000001.jsonl.zst", g.dir);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    snprintf(secret, sizeof secret, "/tmp/sluice_ship_secret_XXXXXX");
    int fd = mkstemp(secret);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "secret", 6), 6);
    close(fd);
    snprintf(link, sizeof link, "%s/sluice-20260101T000002.000Z-1-000002.jsonl.zst", g.dir);
    assert_int_equal(symlink(secret, link), 0);
    struct seg a;
    make_seg(g.dir, "sluice-20260101T000003.000Z-1-000003.jsonl.zst", 100, 3, &a);
    sl_log_ship_enqueue(s, fifo);
    sl_log_ship_enqueue(s, link);
    sl_log_ship_enqueue(s, a.path);
    assert_true(WAIT_SHIPPED(s, 1));
    sl_log_ship_stop(s, sl_clock_now_ms() + 1000);
    struct sl_log_ship_stats st;
    sl_log_ship_get_stats(s, &st);
    assert_int_equal(st.shipped, 1);
    assert_int_equal(st.failures, 2);
    pthread_mutex_lock(&c->http.mu);
    assert_int_equal(atomic_load(&c->count), 1);
    char name[256];
    seg_name(&c->recs[0], name, sizeof name);
    assert_string_equal(name, a.name);
    pthread_mutex_unlock(&c->http.mu);
    assert_true(exists(fifo));
    assert_true(exists(link));
    unlink(secret);
    free(a.data);
    rig_close(&g);
}

/* The child of test_many_unreadable: ships `dir` as a user that cannot read the unreadable
 * files (root reads everything). No cmocka here: a failed check is the exit status. */
static int many_unreadable_child(const char *dir, int unreadable, int good)
{
    if (geteuid() == 0 && (setgid(65534) < 0 || setuid(65534) < 0))
        return 10;
    struct collector *c = collector_start(dir, 0);
    char url[128];
    stub_http_url(&c->http, "/ingest", url, sizeof url);
    struct sl_access_log_conf conf = {.directory = (char *)dir,
                                      .ship_url = url,
                                      .ship_method = SL_SHIP_PUT,
                                      .ship_timeout_ms = 2000,
                                      .ship_backoff_max_ms = 10000};
    char err[256] = "";
    struct sl_log_ship *s = sl_log_ship_new(&conf, err, sizeof err);
    if (!s || sl_log_ship_start(s) != 0)
        return 11;
    int rc = 0;
    if (!WAIT_SHIPPED(s, (uint64_t)good))
        rc = 12;
    sl_log_ship_stop(s, sl_clock_now_ms() + 1000);
    struct sl_log_ship_stats st;
    sl_log_ship_get_stats(s, &st);
    if (rc == 0 && st.failures != (uint64_t)unreadable)
        rc = 13; /* each skipped once: no rescan queued one again */
    if (rc == 0 && (st.queued != 0 || atomic_load(&c->count) != good))
        rc = 14;
    sl_log_ship_free(s);
    collector_stop(c);
    return rc;
}

/* More unreadable segments than the queue holds, oldest first: each is skipped once, and the
 * rescans that follow reach the readable segments behind them instead of queueing the same
 * unreadable ones again and again. */
static void test_many_unreadable(void **state)
{
    (void)state;
    enum { UNREADABLE = 300, GOOD = 3 };
    char dir[32];
    snprintf(dir, sizeof dir, "/tmp/sluice_ship_XXXXXX");
    assert_non_null(mkdtemp(dir));
    assert_int_equal(chmod(dir, 0777), 0); /* the child may run as another user */
    for (int i = 0; i < UNREADABLE + GOOD; i++) {
        char name[64];
        snprintf(name, sizeof name, "sluice-20260101T%06d.000Z-1-000001.jsonl.zst", i);
        struct seg sg;
        make_seg(dir, name, 10, (unsigned)i, &sg);
        if (i < UNREADABLE)
            assert_int_equal(chmod(sg.path, 0), 0);
        free(sg.data);
    }
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
        _exit(many_unreadable_child(dir, UNREADABLE, GOOD));
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    rm_dir(dir);
}

static void test_bad_config(void **state)
{
    (void)state;
    struct sl_access_log_conf conf = {0};
    char err[256] = "";
    conf.directory = "/tmp";
    assert_null(sl_log_ship_new(&conf, err, sizeof err));
    assert_true(err[0] != '\0');
    conf.ship_url = "http://user@127.0.0.1/x";
    err[0] = '\0';
    assert_null(sl_log_ship_new(&conf, err, sizeof err));
    assert_non_null(strstr(err, "user information"));
    /* never started: stop and free are fine */
    conf.ship_url = "http://127.0.0.1:1/x";
    struct sl_log_ship *s = sl_log_ship_new(&conf, err, sizeof err);
    assert_non_null(s);
    sl_log_ship_stop(s, 0);
    sl_log_ship_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ship_in_order_after_failures),
        cmocka_unit_test(test_post_method),
        cmocka_unit_test(test_long_2xx_answer_accepted),
        cmocka_unit_test(test_early_2xx_not_accepted),
        cmocka_unit_test(test_stop_deadline_leaves_files),
        cmocka_unit_test(test_stop_cancels_attempt),
        cmocka_unit_test(test_more_than_the_queue),
        cmocka_unit_test(test_transient_open_error_retried),
        cmocka_unit_test(test_fifo_and_symlink_skipped),
        cmocka_unit_test(test_many_unreadable),
        cmocka_unit_test(test_bad_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
