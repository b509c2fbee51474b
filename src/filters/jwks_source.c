#include "filters/jwks_source.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "core/fmt.h"
#include "core/log.h"
#include "core/slice.h"
#include "filters/jwks_source_internal.h"
#include "http/fetch.h"

#define DEFAULT_REFRESH_MS (5u * 60u * 1000u)
#define DEFAULT_REFRESH_MIN_MS (60u * 1000u)
#define DEFAULT_REFRESH_MAX_MS (24u * 3600u * 1000u)
#define DEFAULT_REFETCH_MIN_INTERVAL_MS (30u * 1000u)
#define DEFAULT_TIMEOUT_MS (5u * 1000u)
#define DEFAULT_MAX_BYTES ((size_t)1 << 20)
#define MAX_MAX_BYTES ((size_t)1 << 30)

#define BACKOFF_FIRST_MS 1000u
#define ERR_LEN 256u
#define MAX_AGE_CAP ((int64_t)1 << 62)

/* ---- the source ---------------------------------------------------------------------------- */

enum source_kind { SOURCE_URL, SOURCE_FILE };

struct sl_jwks_source {
    enum source_kind kind;
    struct sl_jwks_source_opts opts; /* defaults filled in; ca_file owned */
    bool allow_oct;
    char *file_path;
    char *url;                  /* as configured */
    struct sl_fetch_url parsed; /* for log lines */
    struct sl_fetch_tls *tls;   /* https only; shared by every fetch of this source */

    /* `mu` guards the published set and the subscriber list; never held with g_mu. */
    pthread_mutex_t mu;
    struct sl_jwks *current;
    struct sl_jwks_subscriber *subs;

    _Atomic uint64_t generation;
    _Atomic uint64_t failures;
    atomic_bool fetching; /* written under g_mu, read lock-free */

    /* Scheduler state, guarded by g_mu. */
    struct sl_jwks_source *next;
    uint64_t next_due_ms;
    uint64_t last_fetch_start_ms;
    uint64_t backoff_ms;
    bool refetch_requested;
    bool in_use;  /* the thread works on it outside g_mu */
    bool freeing; /* sl_jwks_source_free waits for !in_use */

    /* File change detection; only the thread (or creation) touches these. */
    struct stat file_st;
    bool file_missing;
};

/* ---- the shared background thread ---------------------------------------------------------- */

/* g_life serialises start and stop of the thread so that a source created while the last one is
 * being freed never races with the join. Lock order: g_life, then g_mu. */
static pthread_mutex_t g_life = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cond; /* work or stop (CLOCK_MONOTONIC) */
static pthread_cond_t g_idle; /* a source stopped being in use */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static pthread_t g_thread;
static bool g_running;
static bool g_stop;
static struct sl_jwks_source *g_sources;

static void init_conds(void)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&g_cond, &attr);
    pthread_cond_init(&g_idle, &attr);
    pthread_condattr_destroy(&attr);
}

/* ---- small helpers ------------------------------------------------------------------------- */

static void fill_defaults(struct sl_jwks_source_opts *o, const struct sl_jwks_source_opts *in)
{
    memset(o, 0, sizeof *o);
    if (in)
        *o = *in;
    if (!o->refresh_ms)
        o->refresh_ms = DEFAULT_REFRESH_MS;
    if (!o->refresh_min_ms)
        o->refresh_min_ms = DEFAULT_REFRESH_MIN_MS;
    if (!o->refresh_max_ms)
        o->refresh_max_ms = DEFAULT_REFRESH_MAX_MS;
    if (o->refresh_max_ms < o->refresh_min_ms)
        o->refresh_max_ms = o->refresh_min_ms;
    if (!o->refetch_min_interval_ms)
        o->refetch_min_interval_ms = DEFAULT_REFETCH_MIN_INTERVAL_MS;
    if (!o->timeout_ms)
        o->timeout_ms = DEFAULT_TIMEOUT_MS;
    if (!o->max_bytes)
        o->max_bytes = DEFAULT_MAX_BYTES;
    if (o->max_bytes > MAX_MAX_BYTES)
        o->max_bytes = MAX_MAX_BYTES; /* keeps max_bytes + 1 and doubling far from overflow */
    o->ca_file = NULL;                /* the caller copies it */
}

/* ---- Cache-Control ------------------------------------------------------------------------- */

int64_t sl__jwks_cache_max_age(const char *v, size_t len)
{
    size_t i = 0;
    while (i < len) {
        /* one directive: token [ "=" ( token / quoted-string ) ] */
        while (i < len && (sl_ascii_is_ows(v[i]) || v[i] == ','))
            i++;
        size_t name = i;
        while (i < len && v[i] != '=' && v[i] != ',' && !sl_ascii_is_ows(v[i]))
            i++;
        size_t name_len = i - name;
        while (i < len && sl_ascii_is_ows(v[i]))
            i++;
        if (i >= len || v[i] != '=') {
            continue; /* a directive without a value (or the end) */
        }
        i++;
        while (i < len && sl_ascii_is_ows(v[i]))
            i++;
        bool quoted = i < len && v[i] == '"';
        size_t val = quoted ? ++i : i;
        if (quoted) {
            while (i < len && v[i] != '"')
                i += (v[i] == '\\' && i + 1 < len) ? 2 : 1;
        } else {
            while (i < len && v[i] != ',' && !sl_ascii_is_ows(v[i]))
                i++;
        }
        size_t val_end = i < len ? i : len;
        if (quoted && i < len)
            i++; /* closing quote */
        if (!sl_slice_ieq_cstr(sl_slice_make(v + name, name_len), "max-age"))
            continue;
        if (val_end == val)
            return -1;
        int64_t n = 0;
        for (size_t k = val; k < val_end; k++) {
            if (v[k] < '0' || v[k] > '9')
                return -1;
            n = n >= MAX_AGE_CAP / 10 ? MAX_AGE_CAP : n * 10 + (v[k] - '0');
        }
        return n > MAX_AGE_CAP ? MAX_AGE_CAP : n;
    }
    return -1;
}

uint64_t sl__jwks_refresh_delay_ms(const struct sl_jwks_source_opts *o, int64_t max_age_s)
{
    if (max_age_s < 0)
        return o->refresh_ms;
    uint64_t ms =
        (uint64_t)max_age_s > UINT64_MAX / 1000u ? UINT64_MAX : (uint64_t)max_age_s * 1000u;
    if (ms < o->refresh_min_ms)
        ms = o->refresh_min_ms;
    if (ms > o->refresh_max_ms)
        ms = o->refresh_max_ms;
    return ms;
}

/* ---- publishing ---------------------------------------------------------------------------- */

static bool key_equal(const struct sl_jwk *a, const struct sl_jwk *b)
{
    if (a->fingerprint != b->fingerprint || a->algs != b->algs)
        return false;
    if (!a->kid || !b->kid)
        return a->kid == b->kid;
    return strcmp(a->kid, b->kid) == 0;
}

static bool set_contains(const struct sl_jwks *s, const struct sl_jwk *k)
{
    for (size_t i = 0; i < s->count; i++)
        if (key_equal(&s->keys[i], k))
            return true;
    return false;
}

/* Same keys (fingerprint, kid, algs), in any order. O(n^2); sets hold a handful of keys. */
static bool same_keys(const struct sl_jwks *a, const struct sl_jwks *b)
{
    if (!a || !b || a->count != b->count)
        return false;
    for (size_t i = 0; i < a->count; i++)
        if (!set_contains(b, &a->keys[i]) || !set_contains(a, &b->keys[i]))
            return false;
    return true;
}

/* Takes `ks`. Returns true when it was published (differed from the current set). */
static bool publish(struct sl_jwks_source *src, struct sl_jwks *ks)
{
    struct sl_jwks *old;
    pthread_mutex_lock(&src->mu);
    if (same_keys(src->current, ks)) {
        pthread_mutex_unlock(&src->mu);
        sl_jwks_unref(ks);
        return false;
    }
    old = src->current;
    src->current = ks;
    atomic_fetch_add(&src->generation, 1);
    pthread_mutex_unlock(&src->mu);
    sl_jwks_unref(old);
    return true;
}

static void notify(struct sl_jwks_source *src)
{
    /* Posting under `mu` is what lets unsubscribe promise no callback after it returns. */
    pthread_mutex_lock(&src->mu);
    for (struct sl_jwks_subscriber *s = src->subs; s; s = s->next)
        sl_loop_post(s->loop, &s->post);
    pthread_mutex_unlock(&src->mu);
}

static void log_target(const struct sl_jwks_source *src, char *out, size_t cap)
{
    if (src->kind == SOURCE_FILE) {
        snprintf(out, cap, "%s", src->file_path);
        return;
    }
    /* No query string: some IdPs put API keys there. */
    sl_fetch_url_loggable(&src->parsed, out, cap);
}

/* The first Cache-Control header carrying a max-age decides. */
static void on_fetch_header(void *data, const char *name, size_t name_len, const char *value,
                            size_t value_len)
{
    int64_t *max_age = data;
    if (*max_age < 0 && sl_slice_ieq_cstr(sl_slice_make(name, name_len), "cache-control"))
        *max_age = sl__jwks_cache_max_age(value, value_len);
}

/* One URL fetch attempt: 0 on success (whether or not the set changed), <0 on failure. */
static int url_attempt(struct sl_jwks_source *src, int64_t *max_age_s)
{
    char err[ERR_LEN] = "";
    *max_age_s = -1;
    struct sl_fetch_req rq = {
        .method = "GET",
        .url = src->url,
        .extra_headers = "Accept: application/json\r\n",
        .timeout_ms = src->opts.timeout_ms,
        .max_body_bytes = src->opts.max_bytes,
        .tls = src->tls,
        .on_header = on_fetch_header,
        .header_data = max_age_s,
    };
    struct sl_fetch_resp resp;
    int rc = sl_fetch(&rq, &resp, err, sizeof err);
    if (rc == 0 && resp.status != 200) {
        sl_fmt_err(err, sizeof err, "HTTP status %d", resp.status);
        rc = -EPROTO;
    }
    if (rc == 0) {
        struct sl_jwks *ks = sl_jwks_parse(resp.body, resp.body_len, false, err, sizeof err);
        if (ks)
            publish(src, ks);
        else
            rc = -EINVAL;
    }
    sl_fetch_resp_dispose(&resp);
    if (rc < 0) {
        char target[600];
        log_target(src, target, sizeof target);
        atomic_fetch_add(&src->failures, 1);
        SL_WARN("jwks: fetching %s failed: %s (keeping %s)", target, err,
                atomic_load(&src->generation) ? "the previous key set" : "no keys");
    }
    return rc;
}

/* ---- file sources -------------------------------------------------------------------------- */

static bool stat_changed(const struct stat *a, const struct stat *b)
{
    return a->st_mtim.tv_sec != b->st_mtim.tv_sec || a->st_mtim.tv_nsec != b->st_mtim.tv_nsec ||
           a->st_size != b->st_size || a->st_ino != b->st_ino || a->st_dev != b->st_dev;
}

/* Reads and parses the file. Returns a set with one reference and the stat of what was read,
 * or NULL with `err`. */
static struct sl_jwks *load_file(const char *path, size_t max_bytes, bool allow_oct,
                                 struct stat *st, char *err, size_t err_len)
{
    struct sl_jwks *ks = NULL;
    char *data = NULL;
    size_t cap = 0, len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        sl_fmt_err(err, err_len, "%s: %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fd, st) < 0) {
        sl_fmt_err(err, err_len, "%s: %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st->st_mode)) {
        sl_fmt_err(err, err_len, "%s: not a regular file", path);
        goto out;
    }
    if ((uint64_t)st->st_size > max_bytes) {
        sl_fmt_err(err, err_len, "%s: larger than %zu bytes", path, max_bytes);
        goto out;
    }
    cap = (size_t)st->st_size + 1;
    data = malloc(cap);
    if (!data) {
        sl_fmt_err(err, err_len, "out of memory");
        goto out;
    }
    for (;;) { /* the file may change under us: read at most what fstat saw, plus one byte */
        ssize_t r = read(fd, data + len, cap - len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            sl_fmt_err(err, err_len, "%s: %s", path, strerror(errno));
            goto out;
        }
        if (r == 0)
            break;
        len += (size_t)r;
        if (len == cap) {
            sl_fmt_err(err, err_len, "%s: changed while being read", path);
            goto out;
        }
    }
    data[len] = '\0';
    size_t skip = 0;
    while (skip < len &&
           (data[skip] == ' ' || data[skip] == '\t' || data[skip] == '\r' || data[skip] == '\n'))
        skip++;
    if (len - skip >= 10 && memcmp(data + skip, "-----BEGIN", 10) == 0)
        ks = sl_jwks_from_pem(data, len, 0, err, err_len);
    else
        ks = sl_jwks_parse(data, len, allow_oct, err, err_len);
    if (!ks && err && err_len) {
        /* prefix the path; the parser's reason never holds key material */
        char reason[ERR_LEN];
        snprintf(reason, sizeof reason, "%s", err);
        sl_fmt_err(err, err_len, "%s: %s", path, reason);
    }
out:
    if (data)
        OPENSSL_cleanse(data, cap); /* JWK text may hold an HMAC secret */
    free(data);
    close(fd);
    return ks;
}

/* Returns true when the file changed since the last look (a reload was attempted). */
static bool file_attempt(struct sl_jwks_source *src)
{
    bool *missing = &src->file_missing;
    char err[ERR_LEN] = "";
    struct stat st;
    if (stat(src->file_path, &st) < 0) {
        if (!*missing) { /* warn on the transition only, not every refresh */
            *missing = true;
            atomic_fetch_add(&src->failures, 1);
            SL_WARN("jwks: %s: %s (keeping the previous key set)", src->file_path, strerror(errno));
        }
        return false;
    }
    *missing = false;
    if (!stat_changed(&st, &src->file_st))
        return false;
    struct stat read_st;
    struct sl_jwks *ks =
        load_file(src->file_path, src->opts.max_bytes, src->allow_oct, &read_st, err, sizeof err);
    if (ks) {
        src->file_st = read_st;
        if (publish(src, ks))
            SL_INFO("jwks: reloaded %s", src->file_path);
    } else {
        /* Remember the bad version so that it is reported once, not every refresh. */
        src->file_st = st;
        atomic_fetch_add(&src->failures, 1);
        SL_WARN("jwks: reloading failed: %s (keeping the previous key set)", err);
    }
    return true;
}

/* ---- the scheduler ------------------------------------------------------------------------- */

static uint64_t next_backoff(struct sl_jwks_source *src)
{
    uint64_t b = src->backoff_ms ? src->backoff_ms * 2 : BACKOFF_FIRST_MS;
    if (b > src->opts.refresh_ms)
        b = src->opts.refresh_ms;
    src->backoff_ms = b;
    return b;
}

/* Runs one attempt for `src`. Called and returns with g_mu held; drops it meanwhile. */
static void run_source(struct sl_jwks_source *src, uint64_t now)
{
    bool forced = src->refetch_requested;
    src->refetch_requested = false;
    src->in_use = true;
    if (!forced)
        src->last_fetch_start_ms = now; /* sl_jwks_source_refetch set it otherwise */
    atomic_store(&src->fetching, true);
    pthread_mutex_unlock(&g_mu);

    bool ok = true, attempted = true;
    int64_t max_age = -1;
    if (src->kind == SOURCE_URL)
        ok = url_attempt(src, &max_age) == 0;
    else
        attempted = file_attempt(src);

    pthread_mutex_lock(&g_mu);
    uint64_t delay;
    if (src->kind == SOURCE_FILE) {
        delay = src->opts.refresh_ms;
    } else if (ok) {
        src->backoff_ms = 0;
        delay = sl__jwks_refresh_delay_ms(&src->opts, max_age);
    } else {
        delay = next_backoff(src);
    }
    /* No refetch can have been queued meanwhile: `fetching` made it return early. */
    src->next_due_ms = sl_clock_now_ms() + delay;
    atomic_store(&src->fetching, false);
    pthread_mutex_unlock(&g_mu);

    /* Waiters (a request paused on an unknown kid) need failures as much as successes. */
    if (attempted || forced)
        notify(src);

    pthread_mutex_lock(&g_mu);
    src->in_use = false;
    if (src->freeing)
        pthread_cond_broadcast(&g_idle);
}

static void *thread_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&g_mu);
    while (!g_stop) {
        uint64_t now = sl_clock_now_ms();
        struct sl_jwks_source *due = NULL;
        for (struct sl_jwks_source *s = g_sources; s; s = s->next)
            if (!s->freeing && (!due || s->next_due_ms < due->next_due_ms))
                due = s;
        if (due && due->next_due_ms <= now) {
            run_source(due, now);
            continue;
        }
        if (!due) {
            pthread_cond_wait(&g_cond, &g_mu);
        } else {
            struct timespec ts = {.tv_sec = (time_t)(due->next_due_ms / 1000u),
                                  .tv_nsec = (long)(due->next_due_ms % 1000u) * 1000000L};
            pthread_cond_timedwait(&g_cond, &g_mu, &ts);
        }
    }
    pthread_mutex_unlock(&g_mu);
    return NULL;
}

/* Adds `src` to the scheduler, starting the thread if it is the first. 0 or -errno. */
static int register_source(struct sl_jwks_source *src)
{
    int rc = 0;
    pthread_once(&g_once, init_conds);
    pthread_mutex_lock(&g_life);
    pthread_mutex_lock(&g_mu);
    if (!g_running) {
        /* The thread must not take the process's signals (main waits for them). */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        g_stop = false;
        rc = -pthread_create(&g_thread, NULL, thread_main, NULL);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (rc == 0)
            g_running = true;
    }
    if (rc == 0) {
        src->next = g_sources;
        g_sources = src;
        pthread_cond_signal(&g_cond);
    }
    pthread_mutex_unlock(&g_mu);
    pthread_mutex_unlock(&g_life);
    return rc;
}

/* ---- creation and the API ------------------------------------------------------------------ */

static void on_post(struct sl_post *p)
{
    struct sl_jwks_subscriber *sub =
        (struct sl_jwks_subscriber *)((char *)p - offsetof(struct sl_jwks_subscriber, post));
    sub->cb(sub);
}

static void destroy(struct sl_jwks_source *src)
{
    sl_jwks_unref(src->current);
    sl_fetch_tls_free(src->tls);
    sl_fetch_url_dispose(&src->parsed);
    free(src->url);
    free(src->file_path);
    free((char *)src->opts.ca_file);
    pthread_mutex_destroy(&src->mu);
    free(src);
}

static struct sl_jwks_source *alloc_source(enum source_kind kind,
                                           const struct sl_jwks_source_opts *opts, char *err,
                                           size_t err_len)
{
    struct sl_jwks_source *src = calloc(1, sizeof *src);
    if (!src) {
        sl_fmt_err(err, err_len, "out of memory");
        return NULL;
    }
    src->kind = kind;
    fill_defaults(&src->opts, opts);
    pthread_mutex_init(&src->mu, NULL);
    atomic_init(&src->generation, 0);
    atomic_init(&src->failures, 0);
    atomic_init(&src->fetching, false);
    if (opts && opts->ca_file) {
        char *ca = strdup(opts->ca_file);
        if (!ca) {
            sl_fmt_err(err, err_len, "out of memory");
            destroy(src);
            return NULL;
        }
        src->opts.ca_file = ca;
    }
    return src;
}

struct sl_jwks_source *sl_jwks_source_new_url(const char *url,
                                              const struct sl_jwks_source_opts *opts, char *err,
                                              size_t err_len)
{
    struct sl_jwks_source *src = alloc_source(SOURCE_URL, opts, err, err_len);
    if (!src)
        return NULL;
    if (sl_fetch_url_parse(url, &src->parsed, err, err_len) < 0)
        goto fail;
    src->url = strdup(url);
    if (!src->url) {
        sl_fmt_err(err, err_len, "out of memory");
        goto fail;
    }
    if (src->parsed.https) {
        src->tls = sl_fetch_tls_new(src->opts.ca_file, err, err_len);
        if (!src->tls)
            goto fail;
    }
    /* Nobody else sees the source yet: no lock needed for the first fetch. */
    uint64_t now = sl_clock_now_ms();
    src->last_fetch_start_ms = now;
    int64_t max_age = -1;
    if (url_attempt(src, &max_age) == 0)
        src->next_due_ms = sl_clock_now_ms() + sl__jwks_refresh_delay_ms(&src->opts, max_age);
    else
        src->next_due_ms = sl_clock_now_ms() + next_backoff(src);
    int rc = register_source(src);
    if (rc < 0) {
        sl_fmt_err(err, err_len, "starting the key fetch thread: %s", strerror(-rc));
        goto fail;
    }
    return src;
fail:
    destroy(src);
    return NULL;
}

struct sl_jwks_source *sl_jwks_source_new_file(const char *path,
                                               const struct sl_jwks_source_opts *opts,
                                               bool allow_oct, char *err, size_t err_len)
{
    struct sl_jwks_source *src = alloc_source(SOURCE_FILE, opts, err, err_len);
    if (!src)
        return NULL;
    src->allow_oct = allow_oct;
    src->file_path = strdup(path);
    if (!src->file_path) {
        sl_fmt_err(err, err_len, "out of memory");
        goto fail;
    }
    struct sl_jwks *ks =
        load_file(path, src->opts.max_bytes, allow_oct, &src->file_st, err, err_len);
    if (!ks)
        goto fail;
    src->current = ks;
    atomic_store(&src->generation, 1);
    uint64_t now = sl_clock_now_ms();
    src->last_fetch_start_ms = now;
    src->next_due_ms = now + src->opts.refresh_ms;
    int rc = register_source(src);
    if (rc < 0) {
        sl_fmt_err(err, err_len, "starting the key fetch thread: %s", strerror(-rc));
        goto fail;
    }
    return src;
fail:
    destroy(src);
    return NULL;
}

void sl_jwks_source_free(struct sl_jwks_source *src)
{
    if (!src)
        return;
    pthread_mutex_lock(&g_life);
    pthread_mutex_lock(&g_mu);
    src->freeing = true;
    while (src->in_use)
        pthread_cond_wait(&g_idle, &g_mu);
    for (struct sl_jwks_source **pp = &g_sources; *pp; pp = &(*pp)->next) {
        if (*pp == src) {
            *pp = src->next;
            break;
        }
    }
    bool stop = g_sources == NULL && g_running;
    if (stop) {
        g_stop = true;
        pthread_cond_broadcast(&g_cond);
    }
    pthread_mutex_unlock(&g_mu);
    if (stop) {
        pthread_join(g_thread, NULL);
        pthread_mutex_lock(&g_mu);
        g_running = false;
        g_stop = false;
        pthread_mutex_unlock(&g_mu);
    }
    pthread_mutex_unlock(&g_life);
    destroy(src);
}

struct sl_jwks *sl_jwks_source_acquire(struct sl_jwks_source *src)
{
    pthread_mutex_lock(&src->mu);
    struct sl_jwks *ks = src->current;
    if (ks)
        sl_jwks_ref(ks);
    pthread_mutex_unlock(&src->mu);
    return ks;
}

uint64_t sl_jwks_source_generation(const struct sl_jwks_source *src)
{
    return atomic_load(&src->generation);
}

bool sl_jwks_source_refetch(struct sl_jwks_source *src)
{
    bool started = false;
    pthread_mutex_lock(&g_mu);
    uint64_t now = sl_clock_now_ms();
    if (atomic_load(&src->fetching) || src->refetch_requested) {
        started = true;
    } else if (now - src->last_fetch_start_ms >= src->opts.refetch_min_interval_ms) {
        src->refetch_requested = true;
        src->last_fetch_start_ms = now;
        src->next_due_ms = now;
        atomic_store(&src->fetching, true);
        pthread_cond_signal(&g_cond);
        started = true;
    }
    pthread_mutex_unlock(&g_mu);
    return started;
}

bool sl_jwks_source_fetching(const struct sl_jwks_source *src)
{
    return atomic_load(&src->fetching);
}

uint64_t sl_jwks_source_failures(const struct sl_jwks_source *src)
{
    return atomic_load(&src->failures);
}

uint64_t sl__jwks_source_next_due_ms(struct sl_jwks_source *src)
{
    pthread_mutex_lock(&g_mu);
    uint64_t due = src->next_due_ms;
    pthread_mutex_unlock(&g_mu);
    return due;
}

void sl_jwks_source_subscribe(struct sl_jwks_source *src, struct sl_jwks_subscriber *sub)
{
    sub->post.cb = on_post;
    sub->post.data = sub;
    sub->post.next = NULL;
    atomic_store(&sub->post.queued, 0);
    pthread_mutex_lock(&src->mu);
    sub->next = src->subs;
    src->subs = sub;
    pthread_mutex_unlock(&src->mu);
}

void sl_jwks_source_unsubscribe(struct sl_jwks_source *src, struct sl_jwks_subscriber *sub)
{
    pthread_mutex_lock(&src->mu);
    for (struct sl_jwks_subscriber **pp = &src->subs; *pp; pp = &(*pp)->next) {
        if (*pp == sub) {
            *pp = sub->next;
            break;
        }
    }
    sub->next = NULL;
    pthread_mutex_unlock(&src->mu);
}
