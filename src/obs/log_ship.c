#include "obs/log_ship.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "config/config.h"
#include "core/fmt.h"
#include "core/log.h"
#include "core/loop.h"
#include "core/rand.h"
#include "http/fetch.h"

#define QUEUE_CAP 256u
#define BACKOFF_FIRST_MS 1000u
#define RESP_MAX_BYTES 1024u /* the collector's answer is only diagnostic: cut there */
#define ERR_LEN 256u
#define SEG_PREFIX "sluice-"
#define SEG_SUFFIX ".jsonl.zst"

struct sl_log_ship {
    char *dir;
    char *url; /* base: PUT appends "/<name>" to its path */
    struct sl_fetch_url parsed;
    char target[600]; /* the URL without its query, for log lines */
    int method;       /* enum sl_ship_method */
    uint64_t timeout_ms;
    uint64_t backoff_max_ms;
    struct sl_fetch_tls *tls; /* https only */
    int cancel_fd;            /* eventfd: written once when the stop deadline passed */

    /* `mu` guards the queue and the run state. The queue holds full paths sorted by file
     * name, which starts with the segment's UTC open time: oldest first. */
    pthread_mutex_t mu;
    pthread_cond_t cond; /* CLOCK_MONOTONIC: work, stop, or the thread exited */
    char *queue[QUEUE_CAP];
    size_t count;
    bool rescan; /* files may be on disk that the queue does not hold */
    bool started, stopping, exited, joined;
    uint64_t stop_deadline_ms;
    pthread_t thread;

    _Atomic uint64_t shipped, failures, bytes, queued;

    /* the thread's own (and sl_log_ship_start's, before the thread exists) */
    uint64_t rand_state;
    unsigned fails_in_row;
    char **skipped; /* names of segments that cannot be read, sorted: a rescan leaves them */
    size_t skipped_count, skipped_cap;
};

/* ---- names and the queue -------------------------------------------------------------------- */

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* Names go into a URL path and a header unescaped, so only a plain alphabet is accepted. */
static bool is_safe_name(const char *name)
{
    if (!name[0] || name[0] == '.')
        return false;
    for (const char *p = name; *p; p++) {
        char c = *p;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

static bool is_segment_name(const char *name)
{
    size_t n = strlen(name), pl = strlen(SEG_PREFIX), sl = strlen(SEG_SUFFIX);
    return n > pl + sl && memcmp(name, SEG_PREFIX, pl) == 0 &&
           memcmp(name + n - sl, SEG_SUFFIX, sl) == 0 && is_safe_name(name);
}

static int by_name(const char *a, const char *b)
{
    int c = strcmp(base_name(a), base_name(b));
    return c ? c : strcmp(a, b);
}

static void publish_count(struct sl_log_ship *s)
{
    atomic_store_explicit(&s->queued, s->count, memory_order_relaxed);
}

/* Inserts a copy of `path` in name order. Under `mu`. A full queue keeps the oldest names:
 * the newest one (this or the last) is left on disk and the rescan flag set, so order holds
 * and the rescan after the queue drained finds it. False when `path` was not queued. */
static bool queue_insert(struct sl_log_ship *s, const char *path)
{
    size_t at = s->count;
    for (size_t i = 0; i < s->count; i++) {
        int c = by_name(path, s->queue[i]);
        if (c == 0)
            return true;
        if (c < 0 && at == s->count)
            at = i;
    }
    /* While a rescan is pending, files newer than the queue may wait on disk: a newer one
     * queued now would overtake them. */
    if (s->rescan && at == s->count)
        return false;
    if (s->count == QUEUE_CAP) {
        s->rescan = true;
        if (at == s->count)
            return false;
        free(s->queue[--s->count]);
    }
    char *copy = strdup(path);
    if (!copy) {
        s->rescan = true;
        publish_count(s);
        return false;
    }
    memmove(&s->queue[at + 1], &s->queue[at], (s->count - at) * sizeof s->queue[0]);
    s->queue[at] = copy;
    s->count++;
    publish_count(s);
    return true;
}

/* Removes `path` (wherever it is now). Under `mu`. */
static void queue_remove(struct sl_log_ship *s, const char *path)
{
    for (size_t i = 0; i < s->count; i++) {
        if (strcmp(s->queue[i], path) == 0) {
            free(s->queue[i]);
            memmove(&s->queue[i], &s->queue[i + 1], (s->count - i - 1) * sizeof s->queue[0]);
            s->count--;
            publish_count(s);
            return;
        }
    }
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static bool is_skipped(const struct sl_log_ship *s, const char *name)
{
    return s->skipped_count &&
           bsearch(&name, s->skipped, s->skipped_count, sizeof *s->skipped, cmp_str) != NULL;
}

/* Remembers a segment that cannot be read, so that rescans do not queue it again: with a
 * queue's worth of them, every rescan would queue the same ones and never reach the files
 * behind them. Without memory it may be queued again; that costs a retry, not progress. */
static void skip_add(struct sl_log_ship *s, const char *name)
{
    if (is_skipped(s, name))
        return;
    if (s->skipped_count == s->skipped_cap) {
        size_t nc = s->skipped_cap ? s->skipped_cap * 2 : 16;
        char **ns = realloc(s->skipped, nc * sizeof *ns);
        if (!ns)
            return;
        s->skipped = ns;
        s->skipped_cap = nc;
    }
    char *copy = strdup(name);
    if (!copy)
        return;
    size_t at = 0;
    while (at < s->skipped_count && strcmp(s->skipped[at], name) < 0)
        at++;
    memmove(&s->skipped[at + 1], &s->skipped[at], (s->skipped_count - at) * sizeof *s->skipped);
    s->skipped[at] = copy;
    s->skipped_count++;
}

/* Lists the closed segments in the directory, oldest first, and queues as many as fit. Takes
 * `mu` only to insert. */
static void rescan_dir(struct sl_log_ship *s)
{
    DIR *d = opendir(s->dir);
    if (!d) {
        SL_WARN("access log shipping: listing %s: %s", s->dir, strerror(errno));
        return;
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!is_segment_name(e->d_name) || is_skipped(s, e->d_name))
            continue;
        if (e->d_type != DT_REG && e->d_type != DT_UNKNOWN)
            continue;
        if (n == cap) {
            size_t nc = cap ? cap * 2 : 64;
            char **nn = realloc(names, nc * sizeof *nn);
            if (!nn)
                break;
            names = nn;
            cap = nc;
        }
        if (!(names[n] = strdup(e->d_name)))
            break;
        n++;
    }
    closedir(d);
    if (n)
        qsort(names, n, sizeof *names, cmp_str);
    size_t dl = strlen(s->dir);
    pthread_mutex_lock(&s->mu);
    for (size_t i = 0; i < n; i++) {
        size_t len = dl + strlen(names[i]) + 2;
        char *path = malloc(len);
        if (!path) {
            s->rescan = true;
            break;
        }
        snprintf(path, len, "%s/%s", s->dir, names[i]);
        bool ok = queue_insert(s, path);
        free(path);
        if (!ok)
            break; /* the rest stays on disk for the next rescan */
    }
    pthread_mutex_unlock(&s->mu);
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

/* ---- one attempt ---------------------------------------------------------------------------- */

enum outcome { SHIPPED, GONE, UNREADABLE, FAILED, CANCELLED };

/* The segment's URL: PUT puts the name at the end of the base URL's path (before a query). */
static char *segment_url(const struct sl_log_ship *s, const char *name)
{
    if (s->method != SL_SHIP_PUT)
        return strdup(s->url);
    size_t q = strcspn(s->url, "?");
    bool slash = q > 0 && s->url[q - 1] == '/';
    size_t len = strlen(s->url) + strlen(name) + 2;
    char *u = malloc(len);
    if (u)
        snprintf(u, len, "%.*s%s%s%s", (int)q, s->url, slash ? "" : "/", name, s->url + q);
    return u;
}

/* An open error that a retry cannot cure: permissions, or not a file (O_NOFOLLOW's ELOOP for
 * a symbolic link). Anything else (EMFILE, ENFILE, ENOMEM, EIO...) may pass. */
static bool open_error_stays(int e)
{
    return e == EACCES || e == EPERM || e == ELOOP || e == ENXIO || e == ENODEV || e == EISDIR;
}

static enum outcome ship_one(struct sl_log_ship *s, const char *path, uint64_t timeout_ms,
                             uint64_t *size, char *err, size_t err_len)
{
    const char *name = base_name(path);
    /* O_NONBLOCK: a FIFO named like a segment must not hang the thread in open() (it has no
     * effect on a regular file). O_NOFOLLOW: a symbolic link must not upload what it names. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW);
    if (fd < 0) {
        int e = errno;
        sl_fmt_err(err, err_len, "%s: %s", path, e == ELOOP ? "a symbolic link" : strerror(e));
        if (e == ENOENT)
            return GONE;
        return open_error_stays(e) ? UNREADABLE : FAILED;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        sl_fmt_err(err, err_len, "%s: %s", path, strerror(e));
        close(fd);
        return FAILED;
    }
    if (!S_ISREG(st.st_mode)) {
        sl_fmt_err(err, err_len, "%s: not a regular file", path);
        close(fd);
        return UNREADABLE;
    }
    *size = (uint64_t)st.st_size;
    char headers[512];
    snprintf(headers, sizeof headers,
             "Content-Type: application/x-ndjson\r\nContent-Encoding: zstd\r\n%s%s%s",
             s->method == SL_SHIP_POST ? "X-Sluice-Segment: " : "",
             s->method == SL_SHIP_POST ? name : "", s->method == SL_SHIP_POST ? "\r\n" : "");
    char *url = segment_url(s, name);
    if (!url) {
        sl_fmt_err(err, err_len, "out of memory");
        close(fd);
        return FAILED;
    }
    struct sl_fetch_body_file bf = {.fd = fd, .offset = 0, .len = *size};
    struct sl_fetch_req rq = {
        .method = s->method == SL_SHIP_POST ? "POST" : "PUT",
        .url = url,
        .extra_headers = headers,
        .body_file = &bf,
        .timeout_ms = timeout_ms,
        .max_body_bytes = RESP_MAX_BYTES,
        .cut_body = true, /* a 2xx with a long body is still an acceptance */
        .tls = s->tls,
        .cancel_fd = &s->cancel_fd,
    };
    struct sl_fetch_resp resp;
    int rc = sl_fetch(&rq, &resp, err, err_len);
    free(url);
    close(fd);
    if (rc == -ECANCELED)
        return CANCELLED;
    if (rc < 0)
        return FAILED;
    int status = resp.status;
    bool cut = resp.request_cut;
    sl_fetch_resp_dispose(&resp);
    if (status < 200 || status > 299 || cut) {
        /* (sl_fetch never reports an early 2xx as one; `cut` is checked all the same, as an
         * answer to part of the segment must never delete it) */
        sl_fmt_err(err, err_len, "HTTP status %d%s", status,
                   cut ? " before the whole segment was sent" : "");
        return FAILED;
    }
    /* Accepted: only now may the local copy go. */
    if (unlink(path) < 0 && errno != ENOENT)
        SL_WARN("access log shipping: %s shipped but not removed: %s (it will be sent again "
                "by the next start)",
                path, strerror(errno));
    return SHIPPED;
}

/* ---- the thread ----------------------------------------------------------------------------- */

/* The wait before retrying after the n-th failure in a row: 1 s doubling up to the cap, minus
 * up to a quarter of jitter, so that instances that failed together do not retry together
 * while each step stays longer than the one before. */
static uint64_t backoff_ms(struct sl_log_ship *s, unsigned fails)
{
    uint64_t b = BACKOFF_FIRST_MS;
    for (unsigned i = 1; i < fails && b < s->backoff_max_ms; i++)
        b *= 2;
    if (b > s->backoff_max_ms)
        b = s->backoff_max_ms;
    uint64_t quarter = b / 4;
    return quarter ? b - sl_rand_next(&s->rand_state) % (quarter + 1) : b;
}

static void timed_wait(struct sl_log_ship *s, uint64_t until_ms)
{
    struct timespec ts = {.tv_sec = (time_t)(until_ms / 1000u),
                          .tv_nsec = (long)(until_ms % 1000u) * 1000000L};
    pthread_cond_timedwait(&s->cond, &s->mu, &ts);
}

static void on_failure(struct sl_log_ship *s, const char *path, const char *err, uint64_t wait_ms)
{
    atomic_fetch_add_explicit(&s->failures, 1, memory_order_relaxed);
    s->fails_in_row++;
    /* One line when an outage starts, then one each time the failure count doubles: a long
     * outage costs a few lines, not one per attempt. */
    unsigned n = s->fails_in_row;
    if ((n & (n - 1)) == 0)
        SL_WARN("access log shipping: sending %s to %s failed: %s (%u failures in a row, next "
                "try in %llu ms; the segment stays on disk)",
                base_name(path), s->target, err, n, (unsigned long long)wait_ms);
}

static void *thread_main(void *arg)
{
    struct sl_log_ship *s = arg;
    uint64_t retry_at = 0;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        uint64_t now = sl_clock_now_ms();
        if (s->stopping && now >= s->stop_deadline_ms)
            break;
        if (s->count == 0 && s->rescan) {
            s->rescan = false;
            pthread_mutex_unlock(&s->mu);
            rescan_dir(s);
            pthread_mutex_lock(&s->mu);
            continue;
        }
        if (s->count == 0) {
            if (s->stopping)
                break;
            pthread_cond_wait(&s->cond, &s->mu);
            continue;
        }
        if (now < retry_at) {
            if (s->stopping && retry_at >= s->stop_deadline_ms)
                break; /* the next try would come too late */
            timed_wait(s, retry_at);
            continue;
        }
        char *path = strdup(s->queue[0]);
        uint64_t timeout = s->timeout_ms;
        if (s->stopping && s->stop_deadline_ms - now < timeout)
            timeout = s->stop_deadline_ms - now;
        pthread_mutex_unlock(&s->mu);
        if (!path) {
            pthread_mutex_lock(&s->mu);
            retry_at = sl_clock_now_ms() + BACKOFF_FIRST_MS;
            continue;
        }

        char err[ERR_LEN] = "";
        uint64_t size = 0;
        enum outcome o = ship_one(s, path, timeout, &size, err, sizeof err);
        uint64_t wait = 0;
        switch (o) {
        case SHIPPED:
            atomic_fetch_add_explicit(&s->shipped, 1, memory_order_relaxed);
            atomic_fetch_add_explicit(&s->bytes, size, memory_order_relaxed);
            if (s->fails_in_row)
                SL_INFO("access log shipping to %s works again after %u failed attempts", s->target,
                        s->fails_in_row);
            s->fails_in_row = 0;
            break;
        case GONE: /* removed by someone else, or queued twice: nothing to send */
            break;
        case UNREADABLE:
            /* Retrying cannot help and would hold back every later segment; it stays on disk,
             * rescans of this run leave it, and the next start tries again. */
            atomic_fetch_add_explicit(&s->failures, 1, memory_order_relaxed);
            SL_WARN("access log shipping: skipping %s", err);
            skip_add(s, base_name(path));
            break;
        case FAILED:
            wait = backoff_ms(s, s->fails_in_row + 1);
            on_failure(s, path, err, wait);
            break;
        case CANCELLED: /* the stop deadline passed: neither a failure nor news */
            break;
        }
        pthread_mutex_lock(&s->mu);
        if (o == FAILED || o == CANCELLED)
            retry_at = sl_clock_now_ms() + wait;
        else
            queue_remove(s, path);
        free(path);
    }
    s->exited = true;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- the API -------------------------------------------------------------------------------- */

struct sl_log_ship *sl_log_ship_new(const struct sl_access_log_conf *conf, char *err,
                                    size_t err_len)
{
    if (!conf->ship_url || !conf->directory) {
        sl_fmt_err(err, err_len, "access log shipping needs a directory and a URL");
        return NULL;
    }
    struct sl_log_ship *s = calloc(1, sizeof *s);
    if (!s) {
        sl_fmt_err(err, err_len, "out of memory");
        return NULL;
    }
    s->cancel_fd = -1;
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cond, &attr);
    pthread_condattr_destroy(&attr);
    s->method = conf->ship_method;
    s->timeout_ms = conf->ship_timeout_ms ? conf->ship_timeout_ms : 5000;
    s->backoff_max_ms = conf->ship_backoff_max_ms ? conf->ship_backoff_max_ms : 60000;
    s->rand_state = (sl_clock_now_ms() ^ ((uint64_t)getpid() << 32) ^ (uintptr_t)s) | 1;
    s->dir = strdup(conf->directory);
    s->url = strdup(conf->ship_url);
    if (!s->dir || !s->url) {
        sl_fmt_err(err, err_len, "out of memory");
        goto fail;
    }
    char why[ERR_LEN];
    if (sl_fetch_url_parse(s->url, &s->parsed, why, sizeof why) < 0) {
        sl_fmt_err(err, err_len, "access_log.ship.url: %s", why);
        goto fail;
    }
    sl_fetch_url_loggable(&s->parsed, s->target, sizeof s->target);
    if (s->parsed.https && !(s->tls = sl_fetch_tls_new(NULL, err, err_len)))
        goto fail;
    s->cancel_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->cancel_fd < 0) {
        sl_fmt_err(err, err_len, "eventfd: %s", strerror(errno));
        goto fail;
    }
    return s;
fail:
    sl_log_ship_free(s);
    return NULL;
}

int sl_log_ship_start(struct sl_log_ship *s)
{
    /* Segments left by an earlier run are older than anything the access log hands over
     * from now on: queue them before the first hand-over can. */
    rescan_dir(s);
    /* The thread must not take the process's signals (main waits for them); a blocked
     * SIGPIPE also keeps OpenSSL's writes to a closed socket an EPIPE. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = -pthread_create(&s->thread, NULL, thread_main, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc == 0) {
        pthread_mutex_lock(&s->mu);
        s->started = true;
        pthread_mutex_unlock(&s->mu);
    }
    return rc;
}

void sl_log_ship_enqueue(struct sl_log_ship *s, const char *path)
{
    if (!is_safe_name(base_name(path))) {
        SL_WARN("access log shipping: not sending %s: its name needs escaping", path);
        return;
    }
    pthread_mutex_lock(&s->mu);
    if (!queue_insert(s, path))
        SL_DEBUG("access log shipping: queue full, %s waits on disk for a rescan", path);
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
}

void sl_log_ship_on_segment(const char *path, void *data)
{
    sl_log_ship_enqueue(data, path);
}

void sl_log_ship_stop(struct sl_log_ship *s, uint64_t deadline_ms)
{
    pthread_mutex_lock(&s->mu);
    if (!s->started || s->joined) {
        pthread_mutex_unlock(&s->mu);
        return;
    }
    s->stopping = true;
    s->stop_deadline_ms = deadline_ms;
    pthread_cond_broadcast(&s->cond);
    while (!s->exited && sl_clock_now_ms() < deadline_ms)
        timed_wait(s, deadline_ms);
    bool exited = s->exited;
    pthread_mutex_unlock(&s->mu);
    if (!exited) {
        /* an attempt is still in flight: cut it (the eventfd stays readable) */
        uint64_t one = 1;
        if (write(s->cancel_fd, &one, sizeof one) < 0)
            SL_WARN("access log shipping: cancelling: %s", strerror(errno));
    }
    pthread_join(s->thread, NULL);
    pthread_mutex_lock(&s->mu);
    s->joined = true;
    size_t left = s->count;
    bool more = s->rescan;
    pthread_mutex_unlock(&s->mu);
    if (left || more)
        SL_WARN("access log shipping stopped with %zu%s segment(s) unsent; they stay in %s for "
                "the next start",
                left, more ? "+" : "", s->dir);
}

void sl_log_ship_free(struct sl_log_ship *s)
{
    if (!s)
        return;
    sl_log_ship_stop(s, 0);
    for (size_t i = 0; i < s->count; i++)
        free(s->queue[i]);
    for (size_t i = 0; i < s->skipped_count; i++)
        free(s->skipped[i]);
    free(s->skipped);
    sl_fetch_tls_free(s->tls);
    sl_fetch_url_dispose(&s->parsed);
    if (s->cancel_fd >= 0)
        close(s->cancel_fd);
    free(s->dir);
    free(s->url);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

void sl_log_ship_get_stats(const struct sl_log_ship *s, struct sl_log_ship_stats *out)
{
    out->shipped = atomic_load_explicit(&s->shipped, memory_order_relaxed);
    out->failures = atomic_load_explicit(&s->failures, memory_order_relaxed);
    out->bytes = atomic_load_explicit(&s->bytes, memory_order_relaxed);
    out->queued = atomic_load_explicit(&s->queued, memory_order_relaxed);
}
