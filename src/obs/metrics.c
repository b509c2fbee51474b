#include "obs/metrics.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "config/config.h"
#include "core/fmt.h"
#include "core/loop.h"
#include "http/request.h"
#include "l4/gateway.h"
#include "obs/access_log.h"
#include "obs/log_ship.h"
#include "obs/obs.h"
#include "proxy/pool.h"

/* ---- buckets ---------------------------------------------------------------------------- */

/* Request and upstream durations, in microseconds: from a cached answer on loopback
 * (100 us) to the slowest timeouts worth telling apart (10 s). */
static const uint64_t dur_bounds_us[] = {100,     250,     500,     1000,    2500,   5000,
                                         10000,   25000,   50000,   100000,  250000, 500000,
                                         1000000, 2500000, 5000000, 10000000};
#define DUR_N (sizeof dur_bounds_us / sizeof dur_bounds_us[0])

/* Worker CPU per request, in nanoseconds: a direct response costs a few microseconds, a
 * request that verifies an RSA signature or moves megabytes costs milliseconds. */
static const uint64_t cpu_bounds_ns[] = {1000,   2500,   5000,    10000,   25000,   50000,   100000,
                                         250000, 500000, 1000000, 2500000, 5000000, 10000000};
#define CPU_N (sizeof cpu_bounds_ns / sizeof cpu_bounds_ns[0])

#define HIST_MAX 17 /* buckets of the widest histogram, +Inf included */
_Static_assert(DUR_N + 1 <= HIST_MAX && CPU_N + 1 <= HIST_MAX, "histogram too wide");
_Static_assert(SL_LOOP_LAG_BUCKETS + 1 <= HIST_MAX, "loop lag histogram too wide");

/* ---- per-worker counters ------------------------------------------------------------------ */

/* Non-cumulative bucket counts ([n] = +Inf) and the sum, in the histogram's integer unit. */
struct hist {
    _Atomic uint64_t b[HIST_MAX];
    _Atomic uint64_t sum;
};

struct route_ctr {
    _Atomic uint64_t codes[SL_METRICS_CODE_COUNT];
    _Atomic uint64_t bytes_in, bytes_out, retries;
    struct hist dur;      /* us */
    struct hist upstream; /* us */
    struct hist cpu;      /* ns */
};

/* Slot 0 counts requests without a route, slot 1 routes past the cap (and routes that were
 * never bound, whose metrics_slot is still 0); names start at 2. */
#define SLOT_NONE 0
#define SLOT_OTHER 1
#define SLOT_FIRST 2
#define NSLOTS (SL_METRICS_MAX_ROUTES + SLOT_FIRST)
/* Slot counters are allocated 64 at a time when bind_routes first hands out a slot of the
 * chunk, so a process with ten routes does not carry 4096 routes' counters per worker. */
#define CHUNK 64
#define NCHUNKS ((NSLOTS + CHUNK - 1) / CHUNK)

/* Filter rejections and gateway errors per (slot, filter, reason). The strings come from a
 * small fixed set in the code, so a small open-addressed table per worker suffices; the keys
 * are compared by pointer on the hot path and their text is copied on insertion, so render
 * never follows a pointer whose owner might be gone. */
#define REJ_CAP 512
#define REJ_PROBES 32
struct rej_entry {
    _Atomic uint32_t used; /* set (release) after the keys below were written */
    uint32_t slot;
    const char *filter_key; /* NULL for gateway errors */
    const char *reason_key;
    _Atomic uint64_t count;
    char filter[32];
    char reason[48];
};

struct wctr {
    _Atomic(struct route_ctr *) chunks[NCHUNKS];
    struct rej_entry rej[REJ_CAP];
    _Atomic uint64_t rej_overflow[2]; /* [0] gateway errors, [1] filter rejections */
};

#define NAME_HASH_CAP 8192 /* power of two, twice SL_METRICS_MAX_ROUTES */

struct sl_metrics {
    unsigned workers;
    struct wctr **w;                          /* [workers], each its own allocation */
    _Atomic(const struct sl_log_ship *) ship; /* or NULL */
    /* Everything below is guarded by `lock`: taken by bind (main thread), render and totals
     * (admin thread), never by a worker. */
    pthread_mutex_t lock;
    size_t nslots;                /* slots handed out, SLOT_FIRST.. included */
    char *names[NSLOTS];          /* [SLOT_FIRST..nslots) owned */
    uint64_t slot_bind[NSLOTS];   /* bind_seq of the last bind that used the slot */
    uint32_t hash[NAME_HASH_CAP]; /* slot, 0 = empty */
    uint64_t bind_seq;
    double vcpu_hour_usd;
    char version[64];
    double start_unix_s;
    /* the previous worker CPU sample, for utilisation */
    uint64_t util_mono_ns;
    uint64_t *util_cpu_ns; /* [workers] */
    double *util_last;     /* [workers], -1 = none yet */
};

static inline void bump(_Atomic uint64_t *c, uint64_t by)
{
    /* Single writer: a plain load and store, no locked instruction on the request path. */
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + by,
                          memory_order_relaxed);
}

static inline uint64_t rd(const _Atomic uint64_t *c)
{
    return atomic_load_explicit(c, memory_order_relaxed);
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

struct sl_metrics *sl_metrics_new(unsigned workers)
{
    struct sl_metrics *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->workers = workers;
    m->nslots = SLOT_FIRST;
    snprintf(m->version, sizeof m->version, "unknown");
    pthread_mutex_init(&m->lock, NULL);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    m->start_unix_s = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    m->util_mono_ns = mono_ns();
    m->w = calloc(workers ? workers : 1, sizeof *m->w);
    m->util_cpu_ns = calloc(workers ? workers : 1, sizeof *m->util_cpu_ns);
    m->util_last = calloc(workers ? workers : 1, sizeof *m->util_last);
    if (!m->w || !m->util_cpu_ns || !m->util_last)
        goto fail;
    for (unsigned i = 0; i < workers; i++) {
        m->util_last[i] = -1;
        m->w[i] = calloc(1, sizeof *m->w[i]);
        if (!m->w[i])
            goto fail;
        /* chunk 0 holds the two reserved slots, so every worker always has somewhere to count */
        struct route_ctr *c = calloc(CHUNK, sizeof *c);
        if (!c)
            goto fail;
        atomic_store_explicit(&m->w[i]->chunks[0], c, memory_order_release);
    }
    return m;
fail:
    sl_metrics_free(m);
    return NULL;
}

void sl_metrics_free(struct sl_metrics *m)
{
    if (!m)
        return;
    if (m->w) {
        for (unsigned i = 0; i < m->workers; i++) {
            if (!m->w[i])
                continue;
            for (size_t c = 0; c < NCHUNKS; c++)
                free(atomic_load_explicit(&m->w[i]->chunks[c], memory_order_relaxed));
            free(m->w[i]);
        }
    }
    for (size_t s = SLOT_FIRST; s < m->nslots; s++)
        free(m->names[s]);
    free(m->w);
    free(m->util_cpu_ns);
    free(m->util_last);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

void sl_metrics_set_version(struct sl_metrics *m, const char *version)
{
    if (!m || !version)
        return;
    pthread_mutex_lock(&m->lock);
    snprintf(m->version, sizeof m->version, "%s", version);
    pthread_mutex_unlock(&m->lock);
}

void sl_metrics_set_log_ship(struct sl_metrics *m, const struct sl_log_ship *ship)
{
    if (m)
        atomic_store_explicit(&m->ship, ship, memory_order_release);
}

/* ---- route slots ---------------------------------------------------------------------------- */

static uint32_t name_hash(const char *s)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

static const char *slot_name(const struct sl_metrics *m, size_t slot)
{
    if (slot == SLOT_NONE)
        return SL_METRICS_ROUTE_NONE;
    if (slot < SLOT_FIRST || slot >= m->nslots || !m->names[slot])
        return SL_METRICS_ROUTE_OTHER;
    return m->names[slot];
}

/* The slot named `name`, or 0. Lock held. */
static size_t slot_find(const struct sl_metrics *m, const char *name, uint32_t *pos)
{
    uint32_t i = name_hash(name) & (NAME_HASH_CAP - 1);
    while (m->hash[i]) {
        if (strcmp(m->names[m->hash[i]], name) == 0)
            break;
        i = (i + 1) & (NAME_HASH_CAP - 1);
    }
    *pos = i;
    return m->hash[i];
}

/* Makes sure every worker has the counters of `slot`. Lock held. 0 or -ENOMEM. */
static int slot_alloc(struct sl_metrics *m, size_t slot)
{
    size_t c = slot / CHUNK;
    for (unsigned i = 0; i < m->workers; i++) {
        if (atomic_load_explicit(&m->w[i]->chunks[c], memory_order_relaxed))
            continue;
        struct route_ctr *p = calloc(CHUNK, sizeof *p);
        if (!p)
            return -ENOMEM;
        atomic_store_explicit(&m->w[i]->chunks[c], p, memory_order_release);
    }
    return 0;
}

int sl_metrics_bind_routes(struct sl_metrics *m, struct sl_config *cfg)
{
    if (!m || !cfg)
        return 0;
    int rc = 0;
    pthread_mutex_lock(&m->lock);
    m->bind_seq++;
    m->vcpu_hour_usd = cfg->vcpu_hour_usd;
    for (size_t r = 0; r < cfg->route_count; r++) {
        struct sl_route_conf *route = &cfg->routes[r];
        char fallback[32];
        const char *name = route->name;
        if (!name) {
            snprintf(fallback, sizeof fallback, "route%zu", route->index);
            name = fallback;
        }
        /* A config that is live is bound again when a reload is refused: its routes keep
         * their slots, and a slot is written only when it changes (workers read it). */
        size_t want = SLOT_OTHER;
        uint32_t pos;
        size_t slot = slot_find(m, name, &pos);
        if (!slot && m->nslots < NSLOTS && rc == 0) {
            char *copy = strdup(name);
            if (!copy || slot_alloc(m, m->nslots) != 0) {
                free(copy);
                rc = -ENOMEM;
                continue;
            }
            slot = m->nslots++;
            m->names[slot] = copy;
            m->hash[pos] = (uint32_t)slot;
        }
        if (slot) {
            want = slot;
            m->slot_bind[slot] = m->bind_seq;
        }
        if (route->metrics_slot != want)
            route->metrics_slot = want;
    }
    pthread_mutex_unlock(&m->lock);
    return rc;
}

/* ---- recording (worker threads) --------------------------------------------------------- */

static inline struct route_ctr *slot_ctr(struct wctr *w, size_t slot)
{
    struct route_ctr *c = atomic_load_explicit(&w->chunks[slot / CHUNK], memory_order_acquire);
    return c ? &c[slot % CHUNK] : NULL;
}

static inline void observe(struct hist *h, const uint64_t *bounds, size_t n, uint64_t v)
{
    size_t i = 0;
    while (i < n && v > bounds[i])
        i++;
    bump(&h->b[i], 1);
    bump(&h->sum, v);
}

static void copy_key(char *dst, size_t cap, const char *src)
{
    size_t n = strnlen(src, cap - 1);
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static void count_rejection(struct wctr *w, uint32_t slot, const char *filter, const char *reason)
{
    uintptr_t h = (uintptr_t)filter * 0x9E3779B97F4A7C15ull ^ (uintptr_t)reason * 31u ^ slot;
    h ^= h >> 29;
    for (size_t k = 0; k < REJ_PROBES; k++) {
        struct rej_entry *e = &w->rej[(h + k) & (REJ_CAP - 1)];
        if (!atomic_load_explicit(&e->used, memory_order_relaxed)) {
            e->slot = slot;
            e->filter_key = filter;
            e->reason_key = reason;
            copy_key(e->filter, sizeof e->filter, filter ? filter : "");
            copy_key(e->reason, sizeof e->reason, reason);
            atomic_store_explicit(&e->count, 1, memory_order_relaxed);
            atomic_store_explicit(&e->used, 1, memory_order_release);
            return;
        }
        if (e->slot == slot && e->filter_key == filter && e->reason_key == reason) {
            bump(&e->count, 1);
            return;
        }
    }
    bump(&w->rej_overflow[filter != NULL], 1);
}

static enum sl_metrics_code code_class(int status)
{
    if (status < 100 || status > 599)
        return SL_METRICS_NONE;
    return (enum sl_metrics_code)(status / 100 - 1);
}

void sl_metrics_record(struct sl_metrics *m, unsigned worker, const struct sl_request *req)
{
    if (!m || !req || worker >= m->workers)
        return;
    struct wctr *w = m->w[worker];
    const struct sl_request_log *lg = &req->log;
    const struct sl_route_conf *route = req->route;
    size_t slot = SLOT_NONE;
    if (route) {
        slot = route->metrics_slot;
        if (slot < SLOT_FIRST || slot >= NSLOTS)
            slot = SLOT_OTHER;
    }
    struct route_ctr *c = slot_ctr(w, slot);
    if (!c) {
        slot = SLOT_OTHER;
        c = slot_ctr(w, SLOT_OTHER);
        if (!c)
            return;
    }
    bump(&c->codes[code_class(lg->status)], 1);
    bump(&c->bytes_in, lg->bytes_in);
    bump(&c->bytes_out, lg->bytes_out);
    if (lg->retries)
        bump(&c->retries, lg->retries);
    uint64_t total = lg->end_us > lg->start_us && lg->start_us ? lg->end_us - lg->start_us : 0;
    observe(&c->dur, dur_bounds_us, DUR_N, total);
    if (lg->upstream_start_us) {
        uint64_t end = lg->upstream_end_us ? lg->upstream_end_us : lg->end_us;
        observe(&c->upstream, dur_bounds_us, DUR_N,
                end > lg->upstream_start_us ? end - lg->upstream_start_us : 0);
    }
    observe(&c->cpu, cpu_bounds_ns, CPU_N, lg->cpu_ns);
    /* A filter that rejected names itself; an error without one is the gateway's (NULL). */
    if (lg->error)
        count_rejection(w, (uint32_t)slot, lg->filter, lg->error);
}

/* ---- reading the counters ------------------------------------------------------------------ */

struct hist_sum {
    uint64_t b[HIST_MAX];
    uint64_t sum;
};

struct route_sum {
    uint64_t codes[SL_METRICS_CODE_COUNT];
    uint64_t bytes_in, bytes_out, retries;
    struct hist_sum dur, upstream, cpu;
};

static void hist_add(struct hist_sum *d, const struct hist *h)
{
    for (size_t i = 0; i < HIST_MAX; i++)
        d->b[i] += rd(&h->b[i]);
    d->sum += rd(&h->sum);
}

static uint64_t hist_count(const struct hist_sum *h)
{
    uint64_t n = 0;
    for (size_t i = 0; i < HIST_MAX; i++)
        n += h->b[i];
    return n;
}

/* Sums every worker's counters of `slot`. Lock held. */
static void route_read(const struct sl_metrics *m, size_t slot, struct route_sum *out)
{
    memset(out, 0, sizeof *out);
    for (unsigned i = 0; i < m->workers; i++) {
        const struct route_ctr *c = slot_ctr(m->w[i], slot);
        if (!c)
            continue;
        for (size_t k = 0; k < SL_METRICS_CODE_COUNT; k++)
            out->codes[k] += rd(&c->codes[k]);
        out->bytes_in += rd(&c->bytes_in);
        out->bytes_out += rd(&c->bytes_out);
        out->retries += rd(&c->retries);
        hist_add(&out->dur, &c->dur);
        hist_add(&out->upstream, &c->upstream);
        hist_add(&out->cpu, &c->cpu);
    }
}

static uint64_t route_requests(const struct route_sum *r)
{
    uint64_t n = 0;
    for (size_t k = 0; k < SL_METRICS_CODE_COUNT; k++)
        n += r->codes[k];
    return n;
}

/* The slots worth showing: those of the config last bound, and any that counted something
 * (a route removed by a reload, no route, overflow). Lock held. */
static bool slot_shown(const struct sl_metrics *m, size_t slot, const struct route_sum *s)
{
    if (slot >= SLOT_FIRST && m->slot_bind[slot] == m->bind_seq)
        return true;
    return route_requests(s) > 0;
}

/* ---- totals ---------------------------------------------------------------------------------- */

int sl_metrics_totals(struct sl_metrics *m, struct sl_metrics_totals *t, bool with_routes)
{
    memset(t, 0, sizeof *t);
    if (!m)
        return 0;
    int rc = 0;
    pthread_mutex_lock(&m->lock);
    size_t n = m->nslots;
    if (with_routes) {
        t->routes = calloc(n, sizeof *t->routes);
        if (!t->routes)
            rc = -ENOMEM;
    }
    /* named slots first, then no-route and overflow, as the status page lists them */
    for (size_t k = 0; k < n; k++) {
        size_t slot = k + SLOT_FIRST < n ? k + SLOT_FIRST : k + SLOT_FIRST - n;
        struct route_sum s;
        route_read(m, slot, &s);
        uint64_t req = route_requests(&s);
        t->requests += req;
        for (size_t c = 0; c < SL_METRICS_CODE_COUNT; c++)
            t->codes[c] += s.codes[c];
        t->duration_seconds_sum += (double)s.dur.sum / 1e6;
        t->cpu_seconds_sum += (double)s.cpu.sum / 1e9;
        if (!t->routes || !slot_shown(m, slot, &s))
            continue;
        struct sl_metrics_route_totals *rt = &t->routes[t->route_count++];
        snprintf(rt->name, sizeof rt->name, "%s", slot_name(m, slot));
        rt->requests = req;
        memcpy(rt->codes, s.codes, sizeof rt->codes);
        rt->duration_seconds_sum = (double)s.dur.sum / 1e6;
        rt->upstream_duration_seconds_sum = (double)s.upstream.sum / 1e6;
        rt->upstream_requests = hist_count(&s.upstream);
        rt->cpu_seconds_sum = (double)s.cpu.sum / 1e9;
    }
    pthread_mutex_unlock(&m->lock);
    return rc;
}

void sl_metrics_totals_dispose(struct sl_metrics_totals *t)
{
    if (!t)
        return;
    free(t->routes);
    t->routes = NULL;
    t->route_count = 0;
}

/* ---- text output ----------------------------------------------------------------------------- */

struct sb {
    char *p;
    size_t len, cap;
    bool oom;
};

static bool sb_reserve(struct sb *s, size_t n)
{
    if (s->oom)
        return false;
    if (s->len + n + 1 <= s->cap)
        return true;
    size_t cap = s->cap ? s->cap : 16384;
    while (cap < s->len + n + 1)
        cap *= 2;
    char *p = realloc(s->p, cap);
    if (!p) {
        s->oom = true;
        return false;
    }
    s->p = p;
    s->cap = cap;
    return true;
}

static void sb_put(struct sb *s, const char *str, size_t n)
{
    if (!sb_reserve(s, n))
        return;
    memcpy(s->p + s->len, str, n);
    s->len += n;
    s->p[s->len] = '\0';
}

static void sb_puts(struct sb *s, const char *str)
{
    sb_put(s, str, strlen(str));
}

static void sb_putc(struct sb *s, char ch)
{
    sb_put(s, &ch, 1);
}

static void sb_u64(struct sb *s, uint64_t v)
{
    char tmp[24];
    sb_put(s, tmp, sl_fmt_u64(tmp, v));
}

/* v / 10^scale written exactly, without trailing zeros ("0.0025", "1", "12.5"), NUL-terminated
 * into `out` (at least 48 bytes). Returns the length. */
static size_t fixed_str(char *out, uint64_t v, unsigned scale)
{
    uint64_t div = 1;
    for (unsigned i = 0; i < scale; i++)
        div *= 10;
    size_t n = sl_fmt_u64(out, v / div);
    uint64_t frac = v % div;
    if (frac) {
        out[n++] = '.';
        size_t first = n;
        for (unsigned i = scale; i > 0; i--) {
            out[first + i - 1] = (char)('0' + frac % 10);
            frac /= 10;
        }
        n += scale;
        while (out[n - 1] == '0')
            n--;
    }
    out[n] = '\0';
    return n;
}

static void sb_fixed(struct sb *s, uint64_t v, unsigned scale)
{
    char tmp[48];
    sb_put(s, tmp, fixed_str(tmp, v, scale));
}

static void sb_double(struct sb *s, double v)
{
    if (isnan(v)) {
        sb_puts(s, "NaN");
        return;
    }
    if (isinf(v)) {
        sb_puts(s, v > 0 ? "+Inf" : "-Inf");
        return;
    }
    /* the shortest of 15..17 digits that reads back as the same double: 0.0181, not
     * 0.018100000000000001 */
    char tmp[40];
    int n = 0;
    for (int prec = 15; prec <= 17; prec++) {
        n = snprintf(tmp, sizeof tmp, "%.*g", prec, v);
        if (n <= 0 || (size_t)n >= sizeof tmp) {
            n = 0;
            break;
        }
        if (strtod(tmp, NULL) == v)
            break;
    }
    if (n > 0)
        sb_put(s, tmp, (size_t)n);
    else
        sb_putc(s, '0');
}

/* A label value, escaped as the text format wants (backslash, double quote, newline). */
static void sb_label_value(struct sb *s, const char *v)
{
    const char *run = v;
    for (; *v; v++) {
        const char *esc = *v == '\\' ? "\\\\" : *v == '"' ? "\\\"" : *v == '\n' ? "\\n" : NULL;
        if (!esc)
            continue;
        sb_put(s, run, (size_t)(v - run));
        sb_puts(s, esc);
        run = v + 1;
    }
    sb_put(s, run, (size_t)(v - run));
}

struct lbl {
    const char *k, *v;
};

static void family(struct sb *s, const char *name, const char *type, const char *help)
{
    sb_puts(s, "# HELP ");
    sb_puts(s, name);
    sb_putc(s, ' ');
    /* HELP text escapes backslash and newline; ours are literals without either, but a
     * future edit should not be able to break the format by accident. */
    for (const char *p = help; *p; p++) {
        if (*p == '\\')
            sb_puts(s, "\\\\");
        else if (*p == '\n')
            sb_puts(s, "\\n");
        else
            sb_putc(s, *p);
    }
    sb_puts(s, "\n# TYPE ");
    sb_puts(s, name);
    sb_putc(s, ' ');
    sb_puts(s, type);
    sb_putc(s, '\n');
}

/* `name``suffix`{labels[,extra]} and the separating space; the caller writes the value. */
static void series(struct sb *s, const char *name, const char *suffix, const struct lbl *l,
                   size_t n, const struct lbl *extra)
{
    sb_puts(s, name);
    if (suffix)
        sb_puts(s, suffix);
    if (n || extra) {
        sb_putc(s, '{');
        for (size_t i = 0; i < n + (extra != NULL); i++) {
            const struct lbl *x = i < n ? &l[i] : extra;
            if (i)
                sb_putc(s, ',');
            sb_puts(s, x->k);
            sb_puts(s, "=\"");
            sb_label_value(s, x->v ? x->v : "");
            sb_putc(s, '"');
        }
        sb_putc(s, '}');
    }
    sb_putc(s, ' ');
}

static void sample_u64(struct sb *s, const char *name, const struct lbl *l, size_t n, uint64_t v)
{
    series(s, name, NULL, l, n, NULL);
    sb_u64(s, v);
    sb_putc(s, '\n');
}

static void sample_double(struct sb *s, const char *name, const struct lbl *l, size_t n, double v)
{
    series(s, name, NULL, l, n, NULL);
    sb_double(s, v);
    sb_putc(s, '\n');
}

/* The samples of one histogram: cumulative buckets, _sum and _count. `counts` are
 * non-cumulative with [nb] = +Inf; bounds and sum are integers in units of 10^-scale s. */
static void hist_samples(struct sb *s, const char *name, const struct lbl *l, size_t n,
                         const uint64_t *bounds, size_t nb, const uint64_t *counts, uint64_t sum,
                         unsigned scale)
{
    uint64_t cum = 0;
    char le[48];
    for (size_t i = 0; i <= nb; i++) {
        cum += counts[i];
        if (i < nb)
            fixed_str(le, bounds[i], scale);
        else
            snprintf(le, sizeof le, "+Inf");
        struct lbl extra = {"le", le};
        series(s, name, "_bucket", l, n, &extra);
        sb_u64(s, cum);
        sb_putc(s, '\n');
    }
    series(s, name, "_sum", l, n, NULL);
    sb_fixed(s, sum, scale);
    sb_putc(s, '\n');
    series(s, name, "_count", l, n, NULL);
    sb_u64(s, cum);
    sb_putc(s, '\n');
}

/* ---- process ------------------------------------------------------------------------------- */

static double process_cpu_seconds(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static uint64_t resident_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "re");
    if (!f)
        return 0;
    unsigned long long size = 0, resident = 0;
    int n = fscanf(f, "%llu %llu", &size, &resident);
    fclose(f);
    long page = sysconf(_SC_PAGESIZE);
    return n == 2 && page > 0 ? (uint64_t)resident * (uint64_t)page : 0;
}

static void render_process(struct sb *s, struct sl_obs *obs, struct sl_metrics *m)
{
    char version[64] = "unknown";
    double start = 0;
    if (m) {
        pthread_mutex_lock(&m->lock);
        snprintf(version, sizeof version, "%s", m->version);
        start = m->start_unix_s;
        pthread_mutex_unlock(&m->lock);
    }
    family(s, "sluice_build_info", "gauge", "Always 1; the version in a label.");
    struct lbl v = {"version", version};
    sample_u64(s, "sluice_build_info", &v, 1, 1);

    pthread_mutex_lock(&obs->hist_lock);
    uint64_t gen = obs->generation, ok = obs->reloads, failed = obs->reload_failures,
             rollbacks = obs->rollbacks;
    pthread_mutex_unlock(&obs->hist_lock);
    family(s, "sluice_config_generation", "gauge",
           "Config generation serving now: 1 at start, +1 per reload that took.");
    sample_u64(s, "sluice_config_generation", NULL, 0, gen);
    family(s, "sluice_reloads_total", "counter",
           "Config reloads by result: ok, failed (old config kept), rollback (undone after "
           "errors rose).");
    struct lbl r = {"result", "ok"};
    sample_u64(s, "sluice_reloads_total", &r, 1, ok);
    r.v = "failed";
    sample_u64(s, "sluice_reloads_total", &r, 1, failed);
    r.v = "rollback";
    sample_u64(s, "sluice_reloads_total", &r, 1, rollbacks);
    family(s, "sluice_draining", "gauge", "1 once a drain began (SIGTERM, POST /drain, notice).");
    sample_u64(s, "sluice_draining", NULL, 0,
               atomic_load_explicit(&obs->draining, memory_order_relaxed) ? 1 : 0);

    family(s, "sluice_process_start_time_seconds", "gauge",
           "Start time of the process, seconds since the Unix epoch.");
    if (obs->started_unix_ms) {
        series(s, "sluice_process_start_time_seconds", NULL, NULL, 0, NULL);
        sb_fixed(s, obs->started_unix_ms, 3);
        sb_putc(s, '\n');
    } else {
        sample_double(s, "sluice_process_start_time_seconds", NULL, 0, start);
    }
    family(s, "sluice_process_cpu_seconds_total", "counter",
           "User and system CPU time of the whole process (getrusage).");
    sample_double(s, "sluice_process_cpu_seconds_total", NULL, 0, process_cpu_seconds());
    family(s, "sluice_process_resident_memory_bytes", "gauge", "Resident set size.");
    sample_u64(s, "sluice_process_resident_memory_bytes", NULL, 0, resident_bytes());
}

/* ---- requests ------------------------------------------------------------------------------ */

struct rej_row {
    uint32_t slot;
    const char *filter; /* "" for gateway errors */
    const char *reason;
    uint64_t count;
};

static int rej_cmp(const void *a, const void *b)
{
    const struct rej_row *x = a, *y = b;
    if (x->slot != y->slot)
        return x->slot < y->slot ? -1 : 1;
    int c = strcmp(x->filter, y->filter);
    return c ? c : strcmp(x->reason, y->reason);
}

static const char *const code_names[SL_METRICS_CODE_COUNT] = {"1xx", "2xx", "3xx",
                                                              "4xx", "5xx", "none"};

/* Lock held. Returns the merged rows (malloc'ed) and their number in *n, or NULL. */
static struct rej_row *rej_collect(const struct sl_metrics *m, size_t *n)
{
    size_t cap = (size_t)m->workers * REJ_CAP + 2;
    struct rej_row *rows = calloc(cap, sizeof *rows);
    if (!rows)
        return NULL;
    size_t k = 0;
    uint64_t overflow[2] = {0, 0};
    for (unsigned i = 0; i < m->workers; i++) {
        const struct wctr *w = m->w[i];
        for (size_t j = 0; j < REJ_CAP; j++) {
            const struct rej_entry *e = &w->rej[j];
            if (!atomic_load_explicit(&e->used, memory_order_acquire))
                continue;
            rows[k++] = (struct rej_row){e->slot, e->filter, e->reason, rd(&e->count)};
        }
        overflow[0] += rd(&w->rej_overflow[0]);
        overflow[1] += rd(&w->rej_overflow[1]);
    }
    if (overflow[0])
        rows[k++] = (struct rej_row){SLOT_OTHER, "", SL_METRICS_ROUTE_OTHER, overflow[0]};
    if (overflow[1])
        rows[k++] = (struct rej_row){SLOT_OTHER, SL_METRICS_ROUTE_OTHER, SL_METRICS_ROUTE_OTHER,
                                     overflow[1]};
    qsort(rows, k, sizeof *rows, rej_cmp);
    size_t out = 0;
    for (size_t i = 0; i < k; i++) {
        if (out && rej_cmp(&rows[out - 1], &rows[i]) == 0)
            rows[out - 1].count += rows[i].count;
        else
            rows[out++] = rows[i];
    }
    *n = out;
    return rows;
}

/* The per-route families from `sums` (one per slot in use, `n` of them). Lock held. */
static void render_requests(struct sb *s, struct sl_metrics *m, struct route_sum *sums, size_t n)
{
    family(s, "sluice_requests_total", "counter",
           "Requests finished, by route and status class (none: ended without a response).");
    for (size_t slot = 0; slot < n; slot++) {
        if (!slot_shown(m, slot, &sums[slot]))
            continue;
        struct lbl l[2] = {{"route", slot_name(m, slot)}, {"code", NULL}};
        for (size_t c = 0; c < SL_METRICS_CODE_COUNT; c++) {
            l[1].v = code_names[c];
            sample_u64(s, "sluice_requests_total", l, 2, sums[slot].codes[c]);
        }
    }
    static const struct {
        const char *name, *help;
        size_t off;
        const uint64_t *bounds;
        size_t nb;
        unsigned scale;
    } hs[] = {
        {"sluice_request_duration_seconds",
         "Time from a complete request head to the last response byte, by route.",
         offsetof(struct route_sum, dur), dur_bounds_us, DUR_N, 6},
        {"sluice_upstream_duration_seconds",
         "Time from the first upstream attempt to the end of the upstream response (requests "
         "that reached an upstream), by route.",
         offsetof(struct route_sum, upstream), dur_bounds_us, DUR_N, 6},
        {"sluice_request_cpu_seconds", "Worker CPU time spent on each request, by route.",
         offsetof(struct route_sum, cpu), cpu_bounds_ns, CPU_N, 9},
    };
    for (size_t h = 0; h < sizeof hs / sizeof hs[0]; h++) {
        family(s, hs[h].name, "histogram", hs[h].help);
        for (size_t slot = 0; slot < n; slot++) {
            if (!slot_shown(m, slot, &sums[slot]))
                continue;
            const struct hist_sum *hsum =
                (const struct hist_sum *)((const char *)&sums[slot] + hs[h].off);
            struct lbl l = {"route", slot_name(m, slot)};
            hist_samples(s, hs[h].name, &l, 1, hs[h].bounds, hs[h].nb, hsum->b, hsum->sum,
                         hs[h].scale);
        }
    }
    family(s, "sluice_request_bytes_total", "counter",
           "Bytes received from (in) and sent to (out) clients, framing included, by route.");
    for (size_t slot = 0; slot < n; slot++) {
        if (!slot_shown(m, slot, &sums[slot]))
            continue;
        struct lbl l[2] = {{"route", slot_name(m, slot)}, {"direction", "in"}};
        sample_u64(s, "sluice_request_bytes_total", l, 2, sums[slot].bytes_in);
        l[1].v = "out";
        sample_u64(s, "sluice_request_bytes_total", l, 2, sums[slot].bytes_out);
    }
    family(s, "sluice_retries_total", "counter", "Upstream attempts after the first, by route.");
    for (size_t slot = 0; slot < n; slot++) {
        if (!slot_shown(m, slot, &sums[slot]))
            continue;
        struct lbl l = {"route", slot_name(m, slot)};
        sample_u64(s, "sluice_retries_total", &l, 1, sums[slot].retries);
    }

    size_t nrows = 0;
    struct rej_row *rows = rej_collect(m, &nrows);
    if (!rows) {
        s->oom = true;
        return;
    }
    family(s, "sluice_rejections_total", "counter",
           "Requests a filter answered itself (rate_limit, jwt, api_key...), by route, filter "
           "and reason.");
    for (size_t i = 0; i < nrows; i++) {
        if (!rows[i].filter[0])
            continue;
        struct lbl l[3] = {{"route", slot_name(m, rows[i].slot)},
                           {"filter", rows[i].filter},
                           {"reason", rows[i].reason}};
        sample_u64(s, "sluice_rejections_total", l, 3, rows[i].count);
    }
    family(s, "sluice_gateway_errors_total", "counter",
           "Requests the gateway answered with an error of its own (no_route, "
           "upstream_connect_failed, upstream_timeout...), by route and reason.");
    for (size_t i = 0; i < nrows; i++) {
        if (rows[i].filter[0])
            continue;
        struct lbl l[2] = {{"route", slot_name(m, rows[i].slot)}, {"reason", rows[i].reason}};
        sample_u64(s, "sluice_gateway_errors_total", l, 2, rows[i].count);
    }
    free(rows);
}

static void render_cost(struct sb *s, struct sl_metrics *m, const struct route_sum *sums, size_t n,
                        double price)
{
    uint64_t requests = 0;
    for (size_t slot = 0; slot < n; slot++)
        requests += route_requests(&sums[slot]);
    double per_req = requests ? process_cpu_seconds() / (double)requests : NAN;
    family(s, "sluice_cpu_seconds_per_request", "gauge",
           "Process CPU time divided by requests finished, since start.");
    if (requests)
        sample_double(s, "sluice_cpu_seconds_per_request", NULL, 0, per_req);
    if (price <= 0)
        return;
    family(s, "sluice_vcpu_hour_usd", "gauge", "The configured price of one vCPU for an hour.");
    sample_double(s, "sluice_vcpu_hour_usd", NULL, 0, price);
    family(s, "sluice_estimated_cost_usd_per_million_requests", "gauge",
           "CPU cost of a million requests at cost.vcpu_hour_usd, since start: without labels "
           "from the whole process's CPU time, by route from the worker time of that route's "
           "requests.");
    if (requests)
        sample_double(s, "sluice_estimated_cost_usd_per_million_requests", NULL, 0,
                      per_req * 1e6 / 3600.0 * price);
    for (size_t slot = 0; slot < n; slot++) {
        uint64_t count = hist_count(&sums[slot].cpu);
        if (!count)
            continue;
        double cpu = (double)sums[slot].cpu.sum / 1e9 / (double)count;
        struct lbl l = {"route", slot_name(m, slot)};
        sample_double(s, "sluice_estimated_cost_usd_per_million_requests", &l, 1,
                      cpu * 1e6 / 3600.0 * price);
    }
}

static void render_metrics_sections(struct sb *s, struct sl_metrics *m, double gw_price,
                                    bool have_gw_price)
{
    pthread_mutex_lock(&m->lock);
    size_t n = m->nslots;
    struct route_sum *sums = calloc(n, sizeof *sums);
    if (!sums) {
        s->oom = true;
        pthread_mutex_unlock(&m->lock);
        return;
    }
    for (size_t slot = 0; slot < n; slot++)
        route_read(m, slot, &sums[slot]);
    render_requests(s, m, sums, n);
    render_cost(s, m, sums, n, have_gw_price ? gw_price : m->vcpu_hour_usd);
    pthread_mutex_unlock(&m->lock);
    free(sums);
}

/* ---- the gateway: connections, listeners, upstreams, event loops ------------------------- */

static void render_listeners(struct sb *s, const struct sl_runtime *rt)
{
    const struct sl_config *cfg = rt->cfg;
    size_t n = cfg->listener_count;
#define LSTAT(i, f) atomic_load_explicit(&rt->listeners[i].stats->f, memory_order_relaxed)
    family(s, "sluice_listener_connections_accepted_total", "counter",
           "Connections that passed the accept path (allow/deny, per-IP limits), by listener.");
    for (size_t i = 0; i < n; i++) {
        struct lbl l = {"listener", cfg->listeners[i].name};
        sample_u64(s, "sluice_listener_connections_accepted_total", &l, 1, LSTAT(i, accepted));
    }
    family(s, "sluice_listener_connections_refused_total", "counter",
           "Connections turned away at accept, by listener and reason (denied, not_allowed, "
           "ip_connections, ip_rate).");
    for (size_t i = 0; i < n; i++) {
        struct lbl l[2] = {{"listener", cfg->listeners[i].name}, {"reason", "denied"}};
        sample_u64(s, "sluice_listener_connections_refused_total", l, 2, LSTAT(i, refused_denied));
        l[1].v = "not_allowed";
        sample_u64(s, "sluice_listener_connections_refused_total", l, 2,
                   LSTAT(i, refused_not_allowed));
        l[1].v = "ip_connections";
        sample_u64(s, "sluice_listener_connections_refused_total", l, 2,
                   LSTAT(i, refused_ip_conns));
        l[1].v = "ip_rate";
        sample_u64(s, "sluice_listener_connections_refused_total", l, 2, LSTAT(i, refused_ip_rate));
    }
    family(s, "sluice_tls_handshakes_total", "counter",
           "Completed TLS handshakes, by listener and whether a session was resumed.");
    for (size_t i = 0; i < n; i++) {
        if (!cfg->listeners[i].tls.enabled)
            continue;
        uint64_t all = LSTAT(i, tls_handshakes), resumed = LSTAT(i, tls_resumed);
        struct lbl l[2] = {{"listener", cfg->listeners[i].name}, {"resumed", "false"}};
        sample_u64(s, "sluice_tls_handshakes_total", l, 2, all > resumed ? all - resumed : 0);
        l[1].v = "true";
        sample_u64(s, "sluice_tls_handshakes_total", l, 2, resumed);
    }
    family(s, "sluice_tls_handshake_failures_total", "counter",
           "TLS handshakes that failed (protocol or verification) or timed out, by listener.");
    for (size_t i = 0; i < n; i++) {
        if (!cfg->listeners[i].tls.enabled)
            continue;
        struct lbl l[2] = {{"listener", cfg->listeners[i].name}, {"reason", "failed"}};
        sample_u64(s, "sluice_tls_handshake_failures_total", l, 2, LSTAT(i, tls_failed));
        l[1].v = "timeout";
        sample_u64(s, "sluice_tls_handshake_failures_total", l, 2, LSTAT(i, tls_timeouts));
    }
    family(s, "sluice_tls_certificate_reloads_total", "counter",
           "Certificate reloads, by listener and result (ok; failed: old certificates kept).");
    for (size_t i = 0; i < n; i++) {
        if (!cfg->listeners[i].tls.enabled)
            continue;
        struct lbl l[2] = {{"listener", cfg->listeners[i].name}, {"result", "ok"}};
        sample_u64(s, "sluice_tls_certificate_reloads_total", l, 2, LSTAT(i, tls_reloads));
        l[1].v = "failed";
        sample_u64(s, "sluice_tls_certificate_reloads_total", l, 2, LSTAT(i, tls_reload_failures));
    }
    family(s, "sluice_proxy_protocol_total", "counter",
           "PROXY protocol headers by listener and result (accepted, untrusted, malformed, "
           "timeout).");
    for (size_t i = 0; i < n; i++) {
        if (!cfg->listeners[i].proxy_protocol.accept)
            continue;
        struct lbl l[2] = {{"listener", cfg->listeners[i].name}, {"result", "accepted"}};
        sample_u64(s, "sluice_proxy_protocol_total", l, 2, LSTAT(i, pp_accepted));
        l[1].v = "untrusted";
        sample_u64(s, "sluice_proxy_protocol_total", l, 2, LSTAT(i, pp_refused_untrusted));
        l[1].v = "malformed";
        sample_u64(s, "sluice_proxy_protocol_total", l, 2, LSTAT(i, pp_refused_malformed));
        l[1].v = "timeout";
        sample_u64(s, "sluice_proxy_protocol_total", l, 2, LSTAT(i, pp_timeouts));
    }
#undef LSTAT
}

static const char *const ep_state_names[] = {"closed", "open", "half_open"};

static void render_endpoints(struct sb *s, const struct sl_runtime *rt)
{
    const struct sl_config *cfg = rt->cfg;
    size_t n = cfg->upstream_count;
    struct sl_endpoint_set **sets = calloc(n ? n : 1, sizeof *sets);
    if (!sets) {
        s->oom = true;
        return;
    }
    for (size_t u = 0; u < n; u++)
        sets[u] = rt->pools && rt->pools[u] ? sl_pool_acquire_set(rt->pools[u]) : NULL;

    family(s, "sluice_upstream_endpoint_up", "gauge",
           "1 when the endpoint takes ordinary requests (closed breaker, active check not "
           "down), else 0.");
    for (size_t u = 0; u < n; u++) {
        for (size_t e = 0; sets[u] && e < sets[u]->count; e++) {
            struct sl_endpoint *ep = sets[u]->eps[e];
            struct lbl l[3] = {{"upstream", cfg->upstreams[u].name},
                               {"endpoint", ep->address},
                               {"zone", ep->zone ? ep->zone : ""}};
            sample_u64(s, "sluice_upstream_endpoint_up", l, 3, sl_endpoint_is_healthy(ep));
        }
    }
    family(s, "sluice_upstream_endpoint_state", "gauge",
           "Passive health / circuit breaker state of each endpoint: 1 for the state it is in.");
    for (size_t u = 0; u < n; u++) {
        for (size_t e = 0; sets[u] && e < sets[u]->count; e++) {
            struct sl_endpoint *ep = sets[u]->eps[e];
            int st = atomic_load_explicit(&ep->state, memory_order_relaxed);
            struct lbl l[3] = {
                {"upstream", cfg->upstreams[u].name}, {"endpoint", ep->address}, {"state", NULL}};
            for (int k = 0; k < 3; k++) {
                l[2].v = ep_state_names[k];
                sample_u64(s, "sluice_upstream_endpoint_state", l, 3, st == k);
            }
        }
    }
    family(s, "sluice_upstream_endpoint_active_check_up", "gauge",
           "Result of the active health check (upstreams with health.active): 1 passing.");
    for (size_t u = 0; u < n; u++) {
        if (!cfg->upstreams[u].active.enabled)
            continue;
        for (size_t e = 0; sets[u] && e < sets[u]->count; e++) {
            struct sl_endpoint *ep = sets[u]->eps[e];
            struct lbl l[2] = {{"upstream", cfg->upstreams[u].name}, {"endpoint", ep->address}};
            sample_u64(s, "sluice_upstream_endpoint_active_check_up", l, 2,
                       !atomic_load_explicit(&ep->active_down, memory_order_relaxed));
        }
    }
    for (size_t u = 0; u < n; u++)
        if (sets[u])
            sl_endpoint_set_unref(sets[u]);
    free(sets);
}

static void render_pools(struct sb *s, const struct sl_runtime *rt)
{
    const struct sl_config *cfg = rt->cfg;
    size_t n = rt->pools ? cfg->upstream_count : 0;
#define PLOAD(f) atomic_load_explicit(&p->f, memory_order_relaxed)
    family(s, "sluice_upstream_endpoints_ejected", "gauge",
           "Endpoints out of rotation (open or half-open), by upstream.");
    for (size_t u = 0; u < n; u++) {
        const struct sl_pool *p = rt->pools[u];
        if (!p)
            continue;
        struct lbl l = {"upstream", cfg->upstreams[u].name};
        sample_u64(s, "sluice_upstream_endpoints_ejected", &l, 1, PLOAD(ejected));
    }
    /* The breaker counters are kept only for limits that are set, so only those are shown. */
    static const struct {
        const char *name, *max_name, *help, *max_help;
        size_t conf_off;
        int which;
    } gauges[] = {
        {"sluice_upstream_connections", "sluice_upstream_max_connections",
         "Open upstream connections, busy and idle (upstreams with "
         "circuit_breaker.max_connections).",
         "circuit_breaker.max_connections.", offsetof(struct sl_breaker_conf, max_connections), 0},
        {"sluice_upstream_pending", "sluice_upstream_max_pending",
         "Requests waiting for an upstream connection to open (upstreams with "
         "circuit_breaker.max_pending).",
         "circuit_breaker.max_pending.", offsetof(struct sl_breaker_conf, max_pending), 1},
        {"sluice_upstream_requests_in_flight", "sluice_upstream_max_requests",
         "Requests in flight to the upstream (upstreams with circuit_breaker.max_requests).",
         "circuit_breaker.max_requests.", offsetof(struct sl_breaker_conf, max_requests), 2},
    };
    for (size_t g = 0; g < sizeof gauges / sizeof gauges[0]; g++) {
        for (int pass = 0; pass < 2; pass++) {
            family(s, pass ? gauges[g].max_name : gauges[g].name, "gauge",
                   pass ? gauges[g].max_help : gauges[g].help);
            for (size_t u = 0; u < n; u++) {
                const struct sl_pool *p = rt->pools[u];
                uint32_t max = *(const uint32_t *)((const char *)&cfg->upstreams[u].breaker +
                                                   gauges[g].conf_off);
                if (!p || !max)
                    continue;
                uint32_t cur = gauges[g].which == 0   ? PLOAD(connections)
                               : gauges[g].which == 1 ? PLOAD(pending)
                                                      : PLOAD(requests);
                struct lbl l = {"upstream", cfg->upstreams[u].name};
                sample_u64(s, pass ? gauges[g].max_name : gauges[g].name, &l, 1, pass ? max : cur);
            }
        }
    }
    static const struct {
        const char *name, *help;
        size_t off;
    } counters[] = {
        {"sluice_upstream_ejections_total", "Endpoints ejected (closed to open).",
         offsetof(struct sl_pool_stats, ejections)},
        {"sluice_upstream_ejections_refused_total",
         "Ejections not made because of max_ejection_percent.",
         offsetof(struct sl_pool_stats, ejections_refused)},
        {"sluice_upstream_retries_total", "Retries sent to the upstream.",
         offsetof(struct sl_pool_stats, retries)},
        {"sluice_upstream_retries_budget_exhausted_total",
         "Retries not sent because the retry budget was spent.",
         offsetof(struct sl_pool_stats, retries_budget_exhausted)},
        {"sluice_upstream_no_healthy_endpoint_total", "Requests that found no endpoint to send to.",
         offsetof(struct sl_pool_stats, no_healthy_endpoint)},
        {"sluice_upstream_endpoint_set_updates_total",
         "Endpoint sets published (config, discovery, admin API).",
         offsetof(struct sl_pool_stats, updates)},
    };
    for (size_t c = 0; c < sizeof counters / sizeof counters[0]; c++) {
        family(s, counters[c].name, "counter", counters[c].help);
        for (size_t u = 0; u < n; u++) {
            const struct sl_pool *p = rt->pools[u];
            if (!p)
                continue;
            const _Atomic uint64_t *v =
                (const _Atomic uint64_t *)((const char *)&p->stats + counters[c].off);
            struct lbl l = {"upstream", cfg->upstreams[u].name};
            sample_u64(s, counters[c].name, &l, 1, rd(v));
        }
    }
    family(s, "sluice_upstream_health_transitions_total", "counter",
           "Endpoint health changes other than ejections, by upstream and transition "
           "(half_open, restored, reopened, active_up, active_down).");
    for (size_t u = 0; u < n; u++) {
        const struct sl_pool *p = rt->pools[u];
        if (!p)
            continue;
        struct lbl l[2] = {{"upstream", cfg->upstreams[u].name}, {"transition", "half_open"}};
        sample_u64(s, "sluice_upstream_health_transitions_total", l, 2, rd(&p->stats.half_opens));
        l[1].v = "restored";
        sample_u64(s, "sluice_upstream_health_transitions_total", l, 2, rd(&p->stats.restores));
        l[1].v = "reopened";
        sample_u64(s, "sluice_upstream_health_transitions_total", l, 2, rd(&p->stats.reopens));
        l[1].v = "active_up";
        sample_u64(s, "sluice_upstream_health_transitions_total", l, 2, rd(&p->stats.active_up));
        l[1].v = "active_down";
        sample_u64(s, "sluice_upstream_health_transitions_total", l, 2, rd(&p->stats.active_down));
    }
    family(s, "sluice_upstream_overflow_total", "counter",
           "Requests refused by the upstream circuit breaker, by limit (connections, pending, "
           "requests).");
    for (size_t u = 0; u < n; u++) {
        const struct sl_pool *p = rt->pools[u];
        if (!p)
            continue;
        struct lbl l[2] = {{"upstream", cfg->upstreams[u].name}, {"kind", "connections"}};
        sample_u64(s, "sluice_upstream_overflow_total", l, 2, rd(&p->stats.overflow_connections));
        l[1].v = "pending";
        sample_u64(s, "sluice_upstream_overflow_total", l, 2, rd(&p->stats.overflow_pending));
        l[1].v = "requests";
        sample_u64(s, "sluice_upstream_overflow_total", l, 2, rd(&p->stats.overflow_requests));
    }
#undef PLOAD
}

/* Worker CPU utilisation over the interval since the previous sample that is at least 1 s
 * old (so two scrapes in a row do not report the noise of a few milliseconds); the same
 * value is reported again until then. Lock held. */
static void utilisation(struct sl_metrics *m, const uint64_t *cpu, const bool *have, unsigned n,
                        double *out)
{
    uint64_t now = mono_ns();
    uint64_t dt = now - m->util_mono_ns;
    bool move = dt >= 1000000000u;
    for (unsigned i = 0; i < n; i++) {
        if (!have[i]) {
            out[i] = m->util_last[i] >= 0 ? m->util_last[i] : 0;
            continue;
        }
        if (move || m->util_last[i] < 0) {
            uint64_t d = cpu[i] > m->util_cpu_ns[i] ? cpu[i] - m->util_cpu_ns[i] : 0;
            double u = dt ? (double)d / (double)dt : 0;
            u = u < 0 ? 0 : u > 1 ? 1 : u;
            m->util_last[i] = u;
        }
        out[i] = m->util_last[i];
    }
    if (move) {
        for (unsigned i = 0; i < n; i++)
            if (have[i])
                m->util_cpu_ns[i] = cpu[i];
        m->util_mono_ns = now;
    }
}

static void render_workers(struct sb *s, struct sl_gateway *gw, struct sl_metrics *m)
{
    unsigned n = sl_gateway_worker_count(gw);
    char(*names)[16] = NULL;
    const struct sl_loop **loops = calloc(n ? n : 1, sizeof *loops);
    uint64_t *cpu = calloc(n ? n : 1, sizeof *cpu);
    bool *have = calloc(n ? n : 1, sizeof *have);
    double *util = calloc(n ? n : 1, sizeof *util);
    if (!loops || !cpu || !have || !util) {
        s->oom = true;
        goto out;
    }
    for (unsigned i = 0; i < n; i++) {
        loops[i] = sl_gateway_worker_loop(gw, i);
        have[i] = sl_gateway_worker_cpu_ns(gw, i, &cpu[i]) == 0;
    }
    names = calloc(n ? n : 1, sizeof *names);
    if (!names) {
        s->oom = true;
        goto out;
    }
    for (unsigned i = 0; i < n; i++)
        snprintf(names[i], sizeof names[i], "%u", i);

    family(s, "sluice_event_loop_lag_seconds", "histogram",
           "How long ready sockets waited for their worker's event loop, by worker.");
    for (unsigned i = 0; i < n; i++) {
        if (!loops[i])
            continue;
        const struct sl_loop_stats *st = &loops[i]->stats;
        uint64_t b[SL_LOOP_LAG_BUCKETS + 1];
        for (size_t k = 0; k <= SL_LOOP_LAG_BUCKETS; k++)
            b[k] = rd(&st->lag_buckets[k]);
        struct lbl l = {"worker", names[i]};
        hist_samples(s, "sluice_event_loop_lag_seconds", &l, 1, sl_loop_lag_bounds_us,
                     SL_LOOP_LAG_BUCKETS, b, rd(&st->lag_sum_us), 6);
    }
    family(s, "sluice_event_loop_lag_max_seconds", "gauge",
           "Largest event-loop lag since the previous scrape, by worker.");
    for (unsigned i = 0; i < n; i++) {
        if (!loops[i])
            continue;
        uint64_t max_us = sl_loop_take_max_lag(loops[i]); /* and resets it */
        struct lbl l = {"worker", names[i]};
        series(s, "sluice_event_loop_lag_max_seconds", NULL, &l, 1, NULL);
        sb_fixed(s, max_us, 6);
        sb_putc(s, '\n');
    }
    family(s, "sluice_event_loop_busy_seconds_total", "counter",
           "Time each worker's event loop spent outside epoll_wait.");
    for (unsigned i = 0; i < n; i++) {
        if (!loops[i])
            continue;
        struct lbl l = {"worker", names[i]};
        series(s, "sluice_event_loop_busy_seconds_total", NULL, &l, 1, NULL);
        sb_fixed(s, rd(&loops[i]->stats.busy_us), 6);
        sb_putc(s, '\n');
    }
    family(s, "sluice_worker_cpu_seconds_total", "counter",
           "CPU time (user and system) of each worker thread.");
    for (unsigned i = 0; i < n; i++) {
        if (!have[i])
            continue;
        struct lbl l = {"worker", names[i]};
        series(s, "sluice_worker_cpu_seconds_total", NULL, &l, 1, NULL);
        sb_fixed(s, cpu[i], 9);
        sb_putc(s, '\n');
    }
    unsigned nu = m && n > m->workers ? m->workers : n;
    if (m) {
        pthread_mutex_lock(&m->lock);
        utilisation(m, cpu, have, nu, util);
        pthread_mutex_unlock(&m->lock);
    }
    family(s, "sluice_worker_cpu_utilization", "gauge",
           "Share of one CPU each worker thread used (0 to 1) over the last interval of at "
           "least a second between scrapes.");
    for (unsigned i = 0; m && i < nu; i++) {
        struct lbl l = {"worker", names[i]};
        sample_double(s, "sluice_worker_cpu_utilization", &l, 1, util[i]);
    }
out:
    free(names);
    free(loops);
    free(cpu);
    free(have);
    free(util);
}

static void render_gateway(struct sb *s, struct sl_obs *obs, double *price, bool *have_price)
{
    struct sl_gateway *gw = obs->gw;
    family(s, "sluice_connections_open", "gauge",
           "Client connections open now (HTTP and TCP, every listener).");
    sample_u64(s, "sluice_connections_open", NULL, 0, sl_gateway_open_connections(gw));
    render_workers(s, gw, obs->metrics);
    struct sl_runtime *rt = sl_gateway_runtime_acquire(gw);
    if (!rt)
        return;
    if (rt->cfg) {
        *price = rt->cfg->vcpu_hour_usd;
        *have_price = true;
        if (rt->listeners)
            render_listeners(s, rt);
        render_endpoints(s, rt);
        render_pools(s, rt);
    }
    sl_runtime_release(rt);
}

static void render_access_log(struct sb *s, const struct sl_alog *alog)
{
    struct sl_alog_stats st;
    sl_alog_get_stats(alog, &st);
    family(s, "sluice_access_log_records_total", "counter",
           "Access-log records by result: written (in a complete segment), dropped_full (the "
           "worker's ring had no room), dropped_io (lost to a write error).");
    struct lbl l = {"result", "written"};
    sample_u64(s, "sluice_access_log_records_total", &l, 1, st.records_written);
    l.v = "dropped_full";
    sample_u64(s, "sluice_access_log_records_total", &l, 1, st.records_dropped_full);
    l.v = "dropped_io";
    sample_u64(s, "sluice_access_log_records_total", &l, 1, st.records_dropped_io);
    family(s, "sluice_access_log_bytes_total", "counter",
           "Access-log bytes: JSON before compression (uncompressed) and segment bytes written "
           "(compressed).");
    struct lbl k = {"stage", "uncompressed"};
    sample_u64(s, "sluice_access_log_bytes_total", &k, 1, st.bytes_uncompressed);
    k.v = "compressed";
    sample_u64(s, "sluice_access_log_bytes_total", &k, 1, st.bytes_compressed);
    family(s, "sluice_access_log_segments_total", "counter",
           "Access-log segments: closed (complete, under their final name) and failed (removed "
           "after a write error).");
    struct lbl r = {"result", "closed"};
    sample_u64(s, "sluice_access_log_segments_total", &r, 1, st.segments_closed);
    r.v = "failed";
    sample_u64(s, "sluice_access_log_segments_total", &r, 1, st.segments_failed);
}

static void render_log_ship(struct sb *s, const struct sl_log_ship *ship)
{
    struct sl_log_ship_stats st;
    sl_log_ship_get_stats(ship, &st);
    family(s, "sluice_access_log_shipped_segments_total", "counter",
           "Access-log segments the collector accepted (2xx); each is then deleted.");
    sample_u64(s, "sluice_access_log_shipped_segments_total", NULL, 0, st.shipped);
    family(s, "sluice_access_log_shipped_bytes_total", "counter",
           "File bytes of the access-log segments shipped.");
    sample_u64(s, "sluice_access_log_shipped_bytes_total", NULL, 0, st.bytes);
    family(s, "sluice_access_log_ship_failures_total", "counter",
           "Shipping attempts that failed (connect error, timeout, non-2xx); retried later.");
    sample_u64(s, "sluice_access_log_ship_failures_total", NULL, 0, st.failures);
    family(s, "sluice_access_log_ship_queued_segments", "gauge",
           "Closed segments waiting to be shipped, the one in flight included.");
    sample_u64(s, "sluice_access_log_ship_queued_segments", NULL, 0, st.queued);
}

char *sl_metrics_render(struct sl_obs *obs, size_t *len)
{
    struct sb s = {0};
    if (!sb_reserve(&s, 0))
        return NULL;
    s.p[0] = '\0';
    double price = 0;
    bool have_price = false;
    render_process(&s, obs, obs->metrics);
    if (obs->gw)
        render_gateway(&s, obs, &price, &have_price);
    if (obs->metrics)
        render_metrics_sections(&s, obs->metrics, price, have_price);
    if (obs->alog)
        render_access_log(&s, obs->alog);
    const struct sl_log_ship *ship =
        obs->metrics ? atomic_load_explicit(&obs->metrics->ship, memory_order_acquire) : NULL;
    if (ship)
        render_log_ship(&s, ship);
    if (s.oom) {
        free(s.p);
        return NULL;
    }
    if (len)
        *len = s.len;
    return s.p;
}
