/*
 * The process's operations side: builds the gateway and what watches it, reloads the
 * configuration (and rolls a bad one back), and runs the drain. main.c only turns signals
 * into these calls.
 */
#include "obs/obs.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#include "config/config.h"
#include "core/log.h"
#include "core/loop.h"
#include "core/worker.h"
#include "http/request.h"
#include "l4/gateway.h"
#include "obs/access_log.h"
#include "obs/admin.h"
#include "obs/log_ship.h"
#include "obs/metrics.h"
#include "obs/notice.h"
#include "obs/process.h"

/* What only main and this file see of the process. */
struct sl_process {
    struct sl_obs obs;
    struct sl_config *boot; /* the start-up config: settings that change only with a restart */
    char *text;             /* the config file as last applied (for a rollback) */
    size_t text_len;
    char *prev_text; /* the one before it, while a reload is watched */
    size_t prev_text_len;
    /* safe-reload watch: after a reload with rollback_on_5xx_ratio */
    bool watching;
    uint64_t watch_until_ms;
    uint64_t watch_base_requests, watch_base_5xx;
    uint32_t watch_permille, watch_min_requests;
    /* drain */
    _Atomic bool drain_requested;
    char drain_why[128];
    struct sl_log_ship *ship; /* NULL unless access_log.ship */
    struct sl_notice *notice; /* NULL unless drain.notice_url */
};

void sl_obs_on_request_done(struct sl_request *req, void *data)
{
    struct sl_obs *obs = data;
    unsigned w = req->worker ? req->worker->id : 0;
    sl_metrics_record(obs->metrics, w, req);
    if (obs->alog)
        sl_alog_record(obs->alog, w, req);
}

static uint64_t wall_ms(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (uint64_t)tv.tv_sec * 1000u + (uint64_t)tv.tv_usec / 1000u;
}

/* Reads the whole file (configs are small; the loader caps them anyway). */
static int read_file(const char *path, char **out, size_t *out_len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return -errno;
    size_t cap = 64 * 1024, len = 0;
    char *buf = malloc(cap);
    int rc = 0;
    while (buf) {
        size_t n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (n == 0)
            break;
        if (len == cap) {
            if (cap >= (64u << 20)) {
                rc = -EFBIG;
                break;
            }
            char *nb = realloc(buf, cap * 2);
            if (!nb)
                break;
            buf = nb;
            cap *= 2;
        }
    }
    if (!buf)
        rc = -ENOMEM;
    else if (ferror(f))
        rc = -EIO;
    fclose(f);
    if (rc < 0) {
        free(buf);
        return rc;
    }
    *out = buf;
    *out_len = len;
    return 0;
}

/* Cuts a string that snprintf may have cut inside a UTF-8 sequence back to its last whole
 * character, so that the message stays valid text for logs and JSON. */
static void utf8_trim_tail(char *s)
{
    size_t n = strlen(s), i = n;
    while (i > 0 && ((unsigned char)s[i - 1] & 0xC0) == 0x80)
        i--; /* continuation bytes */
    if (i == 0 || (unsigned char)s[i - 1] < 0x80)
        return;
    unsigned char lead = (unsigned char)s[i - 1];
    size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    if (n - (i - 1) < need)
        s[i - 1] = '\0';
}

/* Loads `text` as the config file `path`; on failure the errors go into `msg`. */
static struct sl_config *load_text(const char *path, const char *text, size_t len, char *msg,
                                   size_t cap)
{
    struct sl_config *cfg = NULL;
    struct sl_config_errors errs = {0};
    if (sl_config_load_string(path, text, len, &cfg, &errs) < 0) {
        size_t off = 0;
        msg[0] = '\0';
        for (size_t i = 0; i < errs.count && off + 1 < cap; i++) {
            const struct sl_config_error *e = &errs.items[i];
            int n = snprintf(msg + off, cap - off, "%s%s:%d:%d: %s: %s", i ? "\n" : "", path,
                             e->line, e->col, e->path ? e->path : "", e->message);
            if (n < 0)
                break;
            off += (size_t)n < cap - off ? (size_t)n : cap - off - 1;
        }
        sl_config_errors_dispose(&errs);
        utf8_trim_tail(msg);
        return NULL;
    }
    sl_config_errors_dispose(&errs);
    return cfg;
}

static void request_drain(struct sl_obs *obs, const char *why)
{
    struct sl_process *p = obs->owner;
    if (!atomic_exchange(&p->drain_requested, true)) {
        snprintf(p->drain_why, sizeof p->drain_why, "%s", why ? why : "requested");
        /* The main thread waits for signals: this one wakes it into the same drain. */
        kill(getpid(), SIGTERM);
    }
}

static bool str_differs(const char *a, const char *b)
{
    return (a == NULL) != (b == NULL) || (a && strcmp(a, b) != 0);
}

static bool list_differs(char **a, size_t an, char **b, size_t bn)
{
    if (an != bn)
        return true;
    for (size_t i = 0; i < an; i++)
        if (str_differs(a[i], b[i]))
            return true;
    return false;
}

/* Settings read once at start: a reload that changes them says they wait for a restart. */
static void warn_boot_only(const struct sl_config *boot, const struct sl_config *cfg)
{
    const struct sl_access_log_conf *x = &boot->access_log, *y = &cfg->access_log;
    if (str_differs(boot->admin.address, cfg->admin.address) ||
        str_differs(boot->admin.token_file, cfg->admin.token_file))
        SL_WARN("reload: `admin` changes at the next restart");
    if (str_differs(x->directory, y->directory) || str_differs(x->ship_url, y->ship_url) ||
        x->buffer_bytes != y->buffer_bytes || x->segment_max_bytes != y->segment_max_bytes ||
        x->segment_max_age_ms != y->segment_max_age_ms ||
        x->flush_interval_ms != y->flush_interval_ms || x->ship_method != y->ship_method ||
        x->ship_timeout_ms != y->ship_timeout_ms ||
        x->ship_backoff_max_ms != y->ship_backoff_max_ms ||
        list_differs(x->headers, x->header_count, y->headers, y->header_count) ||
        list_differs(x->redact_headers, x->redact_header_count, y->redact_headers,
                     y->redact_header_count))
        SL_WARN("reload: `access_log` changes at the next restart");
    if (boot->drain.grace_ms != cfg->drain.grace_ms ||
        str_differs(boot->drain.notice_url, cfg->drain.notice_url) ||
        boot->drain.notice_interval_ms != cfg->drain.notice_interval_ms ||
        boot->drain_timeout_ms != cfg->drain_timeout_ms)
        SL_WARN("reload: `drain` and `drain_timeout` change at the next restart");
}

/* Applies config text `text` (taking it). 0, or -1 with the errors in `msg`. Holds obs->lock. */
static int apply(struct sl_process *p, char *text, size_t len, bool rollback, char *msg, size_t cap)
{
    struct sl_obs *obs = &p->obs;
    struct sl_config *cfg = load_text(obs->config_path, text, len, msg, cap);
    if (!cfg) {
        free(text);
        return -1;
    }
    if (!rollback)
        warn_boot_only(p->boot, cfg);
    uint32_t permille = cfg->reload.rollback_permille;
    uint64_t window = cfg->reload.window_ms;
    uint32_t min_req = cfg->reload.min_requests;
    if (sl_metrics_bind_routes(obs->metrics, cfg) < 0) {
        snprintf(msg, cap, "out of memory");
        sl_config_free(cfg);
        free(text);
        return -1;
    }
    if (sl_gateway_reload(obs->gw, cfg, msg, cap) < 0) {
        /* The refused config's routes were bound: the running ones get their names back
         * (same slots, so nothing changes under the workers). */
        struct sl_runtime *cur = sl_gateway_runtime_acquire(obs->gw);
        sl_metrics_bind_routes(obs->metrics, cur->cfg);
        sl_runtime_release(cur);
        free(text);
        return -1;
    }
    struct sl_runtime *rt = sl_gateway_runtime_acquire(obs->gw);
    pthread_mutex_lock(&obs->hist_lock);
    obs->generation = rt->generation;
    pthread_mutex_unlock(&obs->hist_lock);
    sl_admin_on_reload(obs->admin, rt);
    sl_runtime_release(rt);
    free(p->prev_text);
    p->prev_text = p->text;
    p->prev_text_len = p->text_len;
    p->text = text;
    p->text_len = len;
    p->watching = false;
    if (!rollback && permille && p->prev_text) {
        struct sl_metrics_totals t;
        sl_metrics_totals(obs->metrics, &t, false);
        p->watching = true;
        p->watch_until_ms = sl_clock_now_ms() + window;
        p->watch_base_requests = t.requests;
        p->watch_base_5xx = t.codes[4];
        p->watch_permille = permille;
        p->watch_min_requests = min_req;
        sl_metrics_totals_dispose(&t);
    }
    return 0;
}

static int do_reload(struct sl_obs *obs, char *msg, size_t cap)
{
    struct sl_process *p = obs->owner;
    if (atomic_load(&obs->draining)) {
        snprintf(msg, cap, "draining: a reload would not be served");
        return -1;
    }
    pthread_mutex_lock(&obs->lock);
    char *text = NULL;
    size_t len = 0;
    int rc = read_file(obs->config_path, &text, &len);
    if (rc < 0) {
        snprintf(msg, cap, "%s: %s", obs->config_path, strerror(-rc));
    } else {
        rc = apply(p, text, len, false, msg, cap);
    }
    pthread_mutex_lock(&obs->hist_lock);
    obs->last_reload_unix_ms = wall_ms();
    if (rc == 0) {
        obs->reloads++;
        obs->last_reload_error[0] = '\0';
        pthread_mutex_unlock(&obs->hist_lock);
        SL_INFO("reload: configuration generation %llu from %s is live",
                (unsigned long long)obs->generation, obs->config_path);
    } else {
        obs->reload_failures++;
        snprintf(obs->last_reload_error, sizeof obs->last_reload_error, "%s", msg);
        utf8_trim_tail(obs->last_reload_error);
        pthread_mutex_unlock(&obs->hist_lock);
        SL_ERR("reload rejected, the running configuration stays:\n%s", msg);
    }
    pthread_mutex_unlock(&obs->lock);
    return rc < 0 ? -1 : 0;
}

/* After a watched reload: back to the previous config when the 5xx share went over. */
static void watch_reload(struct sl_process *p, uint64_t now)
{
    struct sl_obs *obs = &p->obs;
    pthread_mutex_lock(&obs->lock);
    if (!p->watching) {
        pthread_mutex_unlock(&obs->lock);
        return;
    }
    struct sl_metrics_totals t;
    sl_metrics_totals(obs->metrics, &t, false);
    uint64_t req = t.requests - p->watch_base_requests;
    uint64_t bad = t.codes[4] - p->watch_base_5xx;
    sl_metrics_totals_dispose(&t);
    if (req >= p->watch_min_requests && bad * 1000 > (uint64_t)p->watch_permille * req) {
        SL_ERR("reload: %llu of %llu responses were 5xx since generation %llu went live (over "
               "%u.%u%%): rolling back to the previous configuration",
               (unsigned long long)bad, (unsigned long long)req,
               (unsigned long long)obs->generation, p->watch_permille / 10, p->watch_permille % 10);
        char *text = p->prev_text;
        size_t len = p->prev_text_len;
        p->prev_text = NULL;
        char msg[2048];
        if (apply(p, text, len, true, msg, sizeof msg) == 0) {
            pthread_mutex_lock(&obs->hist_lock);
            obs->rollbacks++;
            snprintf(obs->last_reload_error, sizeof obs->last_reload_error,
                     "rolled back: %llu of %llu responses were 5xx", (unsigned long long)bad,
                     (unsigned long long)req);
            pthread_mutex_unlock(&obs->hist_lock);
            SL_INFO("reload: rolled back; configuration generation %llu is live",
                    (unsigned long long)obs->generation);
        } else {
            SL_ERR("reload: rollback failed, keeping the new configuration: %s", msg);
        }
        p->watching = false;
    } else if (now >= p->watch_until_ms) {
        p->watching = false;
        SL_INFO("reload: generation %llu passed its watch (%llu responses, %llu 5xx)",
                (unsigned long long)obs->generation, (unsigned long long)req,
                (unsigned long long)bad);
    }
    pthread_mutex_unlock(&obs->lock);
}

/* The notice thread saw an interruption notice: the same drain as SIGTERM. */
static void on_notice(void *data, const char *what)
{
    struct sl_obs *obs = data;
    SL_WARN("spot interruption notice: %s; draining", what ? what : "");
    obs->request_drain(obs, "spot interruption notice");
}

struct sl_process *sl_process_start(const char *path, struct sl_config *cfg, const char *version)
{
    struct sl_process *p = calloc(1, sizeof *p);
    if (!p) {
        sl_config_free(cfg);
        return NULL;
    }
    struct sl_obs *obs = &p->obs;
    obs->owner = p;
    obs->reload = do_reload;
    obs->request_drain = request_drain;
    pthread_mutex_init(&obs->lock, NULL);
    pthread_mutex_init(&obs->hist_lock, NULL);
    obs->started_unix_ms = wall_ms();
    obs->started_mono_ms = sl_clock_now_ms();
    obs->generation = 1;
    obs->version = version;
    char err[2048];
    int rc = read_file(path, &p->text, &p->text_len);
    obs->config_path = strdup(path);
    /* The boot copy holds what a reload does not change (admin, access log, drain). */
    if (rc < 0 || !obs->config_path ||
        !(p->boot = load_text(path, p->text, p->text_len, err, sizeof err))) {
        SL_ERR("%s: cannot read the configuration again at start", path);
        sl_config_free(cfg);
        goto fail;
    }
    unsigned workers = cfg->workers ? cfg->workers : sl_cpu_count();
    if (!(obs->metrics = sl_metrics_new(workers)) ||
        sl_metrics_bind_routes(obs->metrics, cfg) < 0) {
        SL_ERR("out of memory");
        sl_config_free(cfg);
        goto fail;
    }
    sl_metrics_set_version(obs->metrics, version);
    if (!(obs->gw = sl_gateway_new(cfg, err, sizeof err))) {
        SL_ERR("%s", err);
        goto fail;
    }
    obs->gw->on_request_done = sl_obs_on_request_done;
    obs->gw->on_request_done_data = obs;
    if (p->boot->access_log.directory) {
        if (!(obs->alog = sl_alog_new(&p->boot->access_log, workers, err, sizeof err))) {
            SL_ERR("%s", err);
            goto fail;
        }
        if (p->boot->access_log.ship_url) {
            if (!(p->ship = sl_log_ship_new(&p->boot->access_log, err, sizeof err))) {
                SL_ERR("access_log.ship: %s", err);
                goto fail;
            }
            sl_alog_on_segment(obs->alog, sl_log_ship_on_segment, p->ship);
            if ((rc = sl_log_ship_start(p->ship)) < 0) {
                SL_ERR("access_log.ship: cannot start: %s", strerror(-rc));
                goto fail;
            }
            sl_metrics_set_log_ship(obs->metrics, p->ship);
        }
        if ((rc = sl_alog_start(obs->alog)) < 0) {
            SL_ERR("access_log: cannot start the log thread: %s", strerror(-rc));
            goto fail;
        }
    }
    if (sl_gateway_start(obs->gw) < 0)
        goto fail;
    /* Listeners are open and workers run: ready from the admin listener's first answer. */
    atomic_store(&obs->started, true);
    if (p->boot->admin.address &&
        !(obs->admin = sl_admin_start(obs, &p->boot->admin, err, sizeof err))) {
        SL_ERR("%s", err);
        goto fail;
    }
    if (p->boot->drain.notice_url &&
        !(p->notice = sl_notice_start(&p->boot->drain, on_notice, obs, err, sizeof err))) {
        SL_ERR("drain.notice_url: %s", err);
        goto fail;
    }
    return p;
fail:
    sl_process_stop(p, false);
    return NULL;
}

struct sl_obs *sl_process_obs(struct sl_process *p)
{
    return &p->obs;
}

int sl_process_reload(struct sl_process *p)
{
    char msg[4096];
    return do_reload(&p->obs, msg, sizeof msg);
}

void sl_process_tick(struct sl_process *p)
{
    uint64_t now = sl_clock_now_ms();
    sl_gateway_reload_tls(p->obs.gw, false);
    watch_reload(p, now);
    sl_gateway_collect(p->obs.gw);
}

const char *sl_process_drain_reason(struct sl_process *p)
{
    return atomic_load(&p->drain_requested) ? p->drain_why : NULL;
}

void sl_process_drain_begin(struct sl_process *p)
{
    atomic_store(&p->obs.draining, true);
}

uint64_t sl_process_grace_ms(const struct sl_process *p)
{
    return p->boot ? p->boot->drain.grace_ms : 0;
}

uint64_t sl_process_drain_timeout_ms(const struct sl_process *p)
{
    return p->boot ? p->boot->drain_timeout_ms : 10000;
}

void sl_process_stop(struct sl_process *p, bool workers_exited)
{
    if (!p)
        return;
    struct sl_obs *obs = &p->obs;
    sl_notice_stop(p->notice);
    p->notice = NULL;
    sl_admin_stop(obs->admin);
    obs->admin = NULL;
    if (obs->gw) {
        sl_gateway_log_counters(obs->gw, workers_exited);
        sl_gateway_free(obs->gw); /* workers stop: every request has been recorded */
        obs->gw = NULL;
    }
    if (obs->alog) {
        /* Logs its own summary line. False: the log thread was given up on (a stuck disk)
         * and may still hand a segment to the shipper, which must then outlive us. */
        if (!sl_alog_stop(obs->alog)) {
            sl_metrics_set_log_ship(obs->metrics, NULL);
            p->ship = NULL;
        }
        sl_alog_free(obs->alog);
        obs->alog = NULL;
    }
    if (p->ship) {
        /* The last segments go out if the collector takes them soon; what is left stays on
         * disk for the next start. */
        sl_metrics_set_log_ship(obs->metrics, NULL);
        sl_log_ship_stop(p->ship, sl_clock_now_ms() + 5000);
        struct sl_log_ship_stats ss;
        sl_log_ship_get_stats(p->ship, &ss);
        if (ss.queued)
            SL_WARN("access log: %llu segments not shipped yet; they stay in the directory and "
                    "go out at the next start",
                    (unsigned long long)ss.queued);
        sl_log_ship_free(p->ship);
        p->ship = NULL;
    }
    sl_metrics_free(obs->metrics);
    sl_config_free(p->boot);
    free(p->text);
    free(p->prev_text);
    free(obs->config_path);
    pthread_mutex_destroy(&obs->lock);
    pthread_mutex_destroy(&obs->hist_lock);
    free(p);
}
