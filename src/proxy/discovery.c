#include "proxy/discovery.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"
#include "core/log.h"
#include "core/loop.h"
#include "proxy/dns.h"
#include "proxy/epfile.h"
#include "proxy/pool.h"

/* One upstream's discovery source. */
struct source {
    struct sl_discovery *disc;
    const struct sl_upstream_conf *up;
    const struct sl_discovery_conf *conf;
    struct sl_pool *pool;
    struct sl_dns_query *query; /* lookup in flight, or NULL */
    struct sl_epfile_watch *watch;
    struct sl_timer timer;   /* next lookup, or the retry of a failed file read */
    uint64_t min_ms, max_ms; /* the conf's intervals, made sane */
    uint64_t retry_ms;       /* delay before the next retry after a failure */
    bool logged_ok;          /* the last state logged was "working" */
    char problem[192];       /* the failure last logged, "" when none */
    size_t published_count;  /* endpoints in the last set published */
    bool published;          /* something was published at least once */
};

struct sl_discovery {
    struct sl_loop *loop;
    struct sl_dns *dns; /* only when some source is dns or srv */
    struct source *sources;
    size_t count;
};

static const char *kind_name(enum sl_discovery_kind k)
{
    switch (k) {
    case SL_DISCOVERY_DNS:
        return "dns";
    case SL_DISCOVERY_SRV:
        return "srv";
    case SL_DISCOVERY_FILE:
        return "file";
    default:
        return "none";
    }
}

static uint64_t clamp_u64(uint64_t v, uint64_t lo, uint64_t hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

static const char *plural(size_t n)
{
    return n == 1 ? "" : "s";
}

/* A failure: logged when it differs from the one logged last (so a name that keeps failing
 * for the same reason logs once), then retried with backoff when `retry`. */
static void source_failed(struct source *s, const char *why, bool retry)
{
    if (strcmp(s->problem, why) != 0) {
        snprintf(s->problem, sizeof(s->problem), "%s", why);
        /* a file's messages start with its path already */
        bool file = s->conf->kind == SL_DISCOVERY_FILE;
        const char *name = file ? "" : s->conf->name;
        const char *sep = file ? "" : " ";
        if (s->published)
            SL_WARN("upstream %s: discovery %s%s%s: %s; keeping the last good set (%zu "
                    "endpoint%s)",
                    s->up->name, kind_name(s->conf->kind), sep, name, why, s->published_count,
                    plural(s->published_count));
        else
            SL_WARN("upstream %s: discovery %s%s%s: %s; nothing discovered yet", s->up->name,
                    kind_name(s->conf->kind), sep, name, why);
    }
    s->logged_ok = false;
    if (retry) {
        sl_timer_arm(s->disc->loop, &s->timer, s->retry_ms);
        s->retry_ms = clamp_u64(s->retry_ms * 2, s->min_ms, s->max_ms);
    }
}

/* Publishes `specs` as the pool's discovery source. Returns false when the pool could not take
 * them (out of memory), after logging. */
static bool source_publish(struct source *s, const struct sl_endpoint_spec *specs, size_t n)
{
    int rc = sl_pool_set_source(s->pool, SL_POOL_SRC_DISCOVERY, specs, n);
    if (rc < 0) {
        source_failed(s, "cannot publish: out of memory", true);
        return false;
    }
    bool recovered = s->problem[0] != '\0';
    s->problem[0] = '\0';
    s->retry_ms = s->min_ms;
    /* Only a file can say "no endpoints" (an empty DNS answer is a failure): worth a warning. */
    if (rc == 1 || recovered || !s->logged_ok)
        sl_log(n ? SL_LOG_LVL_INFO : SL_LOG_LVL_WARN,
               "upstream %s: discovery %s %s: %s%zu endpoint%s", s->up->name,
               kind_name(s->conf->kind), s->conf->name, recovered ? "working again, " : "", n,
               plural(n));
    s->logged_ok = true;
    s->published = true;
    s->published_count = n;
    return true;
}

/* ---- dns and srv --------------------------------------------------------------------------- */

static void on_answer(void *data, int status, const char *error, const struct sl_dns_addr *addrs,
                      size_t n, uint32_t ttl_s);

static void dns_lookup(struct source *s)
{
    const struct sl_discovery_conf *c = s->conf;
    s->query = sl_dns_resolve(s->disc->dns, c->name,
                              c->kind == SL_DISCOVERY_SRV ? SL_DNS_SRV : SL_DNS_ADDR,
                              (uint16_t)c->port, on_answer, s);
    if (!s->query)
        source_failed(s, "cannot start a lookup: out of memory", true);
}

static void on_dns_timer(struct sl_timer *t)
{
    dns_lookup(t->data);
}

static void on_answer(void *data, int status, const char *error, const struct sl_dns_addr *addrs,
                      size_t n, uint32_t ttl_s)
{
    struct source *s = data;
    const struct sl_discovery_conf *c = s->conf;
    s->query = NULL;
    if (status < 0) {
        source_failed(s, error, true);
        return;
    }
    /* SRV: the lowest priority present (addrs are sorted by priority). */
    size_t count = n;
    if (c->kind == SL_DISCOVERY_SRV)
        for (count = 0; count < n && addrs[count].priority == addrs[0].priority; count++)
            ;
    if (count == 0) {
        source_failed(s, "the answer has no address", true);
        return;
    }
    struct sl_endpoint_spec *specs = calloc(count, sizeof(*specs));
    if (!specs) {
        source_failed(s, "cannot publish: out of memory", true);
        return;
    }
    for (size_t i = 0; i < count; i++) {
        specs[i].address = addrs[i].text;
        specs[i].addr = addrs[i].addr;
        specs[i].addr_len = addrs[i].addr_len;
        if (c->kind == SL_DISCOVERY_SRV)
            specs[i].weight = addrs[i].weight ? addrs[i].weight : 1;
        else
            specs[i].weight = c->weight ? c->weight : 1;
        specs[i].zone = c->zone;
    }
    bool ok = source_publish(s, specs, count);
    free(specs);
    if (ok)
        sl_timer_arm(s->disc->loop, &s->timer,
                     clamp_u64((uint64_t)ttl_s * 1000, s->min_ms, s->max_ms));
}

/* ---- file ---------------------------------------------------------------------------------- */

static void file_read(struct source *s)
{
    struct sl_endpoint_spec *specs = NULL;
    size_t n = 0;
    char err[256];
    int rc = sl_epfile_read(s->conf->name, &specs, &n, err, sizeof(err));
    if (rc < 0) {
        /* A missing or invalid file changes only by being written, which the watch sees; an
         * I/O error may pass by itself. */
        source_failed(s, err, rc != -ENOENT && rc != -EINVAL && rc != -EFBIG);
        return;
    }
    sl_timer_cancel(s->disc->loop, &s->timer);
    source_publish(s, specs, n);
    sl_epfile_specs_free(specs, n);
}

static void on_file_changed(void *data)
{
    file_read(data);
}

static void on_file_timer(struct sl_timer *t)
{
    file_read(t->data);
}

/* ---- start and stop ------------------------------------------------------------------------ */

struct sl_discovery *sl_discovery_start(struct sl_loop *loop, const struct sl_config *cfg,
                                        struct sl_pool **pools, char *err, size_t err_len)
{
    if (err_len)
        err[0] = '\0';
    struct sl_discovery *d = calloc(1, sizeof(*d));
    if (!d)
        goto oom;
    d->loop = loop;
    size_t want = 0;
    bool need_dns = false;
    for (size_t i = 0; i < cfg->upstream_count; i++) {
        enum sl_discovery_kind k = cfg->upstreams[i].discovery.kind;
        if (k == SL_DISCOVERY_NONE)
            continue;
        if (!pools || !pools[i]) {
            snprintf(err, err_len, "upstream %s: discovery without a pool", cfg->upstreams[i].name);
            goto fail;
        }
        want++;
        need_dns |= k == SL_DISCOVERY_DNS || k == SL_DISCOVERY_SRV;
    }
    if (want) {
        d->sources = calloc(want, sizeof(*d->sources));
        if (!d->sources)
            goto oom;
    }
    if (need_dns) {
        char derr[192];
        d->dns = sl_dns_new(loop, cfg->dns_servers, cfg->dns_server_count, cfg->dns_timeout_ms,
                            derr, sizeof(derr));
        if (!d->dns) {
            snprintf(err, err_len, "resolver: %s", derr);
            goto fail;
        }
    }
    for (size_t i = 0; i < cfg->upstream_count; i++) {
        const struct sl_upstream_conf *up = &cfg->upstreams[i];
        if (up->discovery.kind == SL_DISCOVERY_NONE)
            continue;
        struct source *s = &d->sources[d->count++];
        s->disc = d;
        s->up = up;
        s->conf = &up->discovery;
        s->pool = pools[i];
        /* The loader enforces min >= 100 ms and max >= min; a hand-built config might not. */
        s->min_ms = s->conf->min_interval_ms ? s->conf->min_interval_ms : 1000;
        s->max_ms = s->conf->max_interval_ms > s->min_ms ? s->conf->max_interval_ms : s->min_ms;
        s->retry_ms = s->min_ms;
        if (s->conf->kind == SL_DISCOVERY_FILE) {
            sl_timer_init(&s->timer, on_file_timer, s);
            char werr[256];
            s->watch =
                sl_epfile_watch_new(loop, s->conf->name, on_file_changed, s, werr, sizeof(werr));
            if (!s->watch) {
                /* the watcher's message starts with the path already */
                snprintf(err, err_len, "upstream %s: discovery file: %s", up->name, werr);
                goto fail;
            }
        } else {
            sl_timer_init(&s->timer, on_dns_timer, s);
        }
    }
    /* Everything is set up: now the first reads and lookups, which cannot fail the start. */
    for (size_t i = 0; i < d->count; i++) {
        struct source *s = &d->sources[i];
        if (s->conf->kind == SL_DISCOVERY_FILE)
            file_read(s);
        else
            dns_lookup(s);
    }
    return d;
oom:
    snprintf(err, err_len, "out of memory");
fail:
    sl_discovery_stop(d);
    return NULL;
}

void sl_discovery_stop(struct sl_discovery *d)
{
    if (!d)
        return;
    for (size_t i = 0; i < d->count; i++) {
        struct source *s = &d->sources[i];
        sl_timer_cancel(d->loop, &s->timer);
        if (s->query)
            sl_dns_cancel(s->query);
        sl_epfile_watch_free(s->watch);
    }
    sl_dns_free(d->dns);
    free(d->sources);
    free(d);
}
