/*
 * rate_limit: GCRA per key. The key is built per request from the configured parts into a
 * bounded stack buffer, each part length-prefixed ("<len>:<bytes>,") so that no two
 * different part lists give the same key; a part longer than PART_INLINE_MAX is replaced by
 * "#<hex SHA-256/128>," (a length prefix starts with a digit, so the two cannot be confused).
 *
 * scope local decides in this instance's rl_table (one per instance, shared by every worker,
 * lock-free). scope global pauses the request for one Redis call (sl_redis_gcra) on the
 * worker's client, keyed "rl:<id>:<key>", and resumes from the reply; Redis errors follow
 * on_redis_error. Nothing here allocates per request outside the request arena, and nothing
 * takes a lock.
 */
#include "filters/rate_limit.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"
#include "config/filter_conf.h"
#include "config/units.h"
#include "config/yaml_tree.h"
#include "core/fmt.h"
#include "core/worker.h"
#include "filters/jwt.h"
#include "filters/redis.h"
#include "filters/rl_table.h"
#include "http/request.h"

#define MAX_PARTS 8
#define PART_INLINE_MAX 56 /* longer values are digested */
#define KEY_BUF 512        /* MAX_PARTS x (2 + 1 + PART_INLINE_MAX + 1) fits */
#define REDIS_KEY_INLINE 64
#define ID_MAX 128
#define REDIS_KEY_BUF (3 + ID_MAX + 1 + REDIS_KEY_INLINE + 1)
#define BURST_MAX 1000000u /* the Redis script keeps µs quantities exact below 2^53 */

enum scope { SCOPE_LOCAL = 0, SCOPE_GLOBAL };
enum on_error { ON_ERROR_ALLOW = 0, ON_ERROR_DENY };

struct rate_limit_conf {
    char *rate;
    uint64_t burst;
    char **key;
    size_t key_count;
    int scope;          /* enum scope */
    int on_redis_error; /* enum on_error */
    uint64_t max_keys;
    bool headers;
    char *id;
};

enum part_kind { PART_IP, PART_CONSUMER, PART_ROUTE, PART_JWT, PART_HEADER };

struct part {
    enum part_kind kind;
    const char *name; /* claim or header name (NUL-terminated, in the conf), else NULL */
    size_t name_len;
};

struct rl_state {
    struct sl_rl_limit lim;
    struct part parts[MAX_PARTS];
    size_t part_count;
    bool global, deny_on_error, headers;
    struct sl_rl_table *table; /* local scope */
    const struct sl_redis_conf *redis;
    char *id; /* global scope: the counter's name */
    size_t id_len;
};

/* ---- config ---------------------------------------------------------------------------------- */

static const char *check_rate(const char *s, size_t len, char *buf, size_t cap)
{
    uint64_t period;
    int rc = sl_config_parse_rate(s, len, &period);
    if (rc == -ERANGE)
        snprintf(buf, cap,
                 "rate \"%.*s\" is too high: at most 1000000/s, 60000000/m or 3600000000/h",
                 (int)(len > 40 ? 40 : len), s);
    else if (rc != 0)
        snprintf(buf, cap, "invalid rate \"%.*s\": use N/s, N/m or N/h with N >= 1, e.g. 100/s",
                 (int)(len > 40 ? 40 : len), s);
    return rc ? buf : NULL;
}

static bool has_prefix(const char *s, size_t len, const char *prefix)
{
    size_t n = strlen(prefix);
    return len >= n && memcmp(s, prefix, n) == 0;
}

/* Parses one key part; returns NULL or a message. `out` may be NULL (check only). */
static const char *parse_part(const char *s, size_t len, struct part *out, char *buf, size_t cap)
{
    struct part p = {0};
    int shown = (int)(len > 60 ? 60 : len);
    if (len == 2 && memcmp(s, "ip", 2) == 0) {
        p.kind = PART_IP;
    } else if (len == 8 && memcmp(s, "consumer", 8) == 0) {
        p.kind = PART_CONSUMER;
    } else if (len == 5 && memcmp(s, "route", 5) == 0) {
        p.kind = PART_ROUTE;
    } else if (has_prefix(s, len, "jwt:")) {
        p.kind = PART_JWT;
        p.name = s + 4;
        p.name_len = len - 4;
        if (p.name_len == 0)
            return "key part \"jwt:\" needs a claim name, e.g. jwt:sub";
    } else if (has_prefix(s, len, "header:")) {
        p.kind = PART_HEADER;
        p.name = s + 7;
        p.name_len = len - 7;
        if (!sl__config_is_token(p.name, p.name_len)) {
            snprintf(buf, cap, "key part \"%.*s\": \"%.*s\" is not a valid header name", shown, s,
                     (int)(p.name_len > 60 ? 60 : p.name_len), p.name);
            return buf;
        }
    } else {
        snprintf(buf, cap,
                 "unknown key part \"%.*s\"; use ip, consumer, route, jwt:CLAIM or header:NAME",
                 shown, s);
        return buf;
    }
    if (out)
        *out = p;
    return NULL;
}

static const char *check_part(const char *s, size_t len, char *buf, size_t cap)
{
    return parse_part(s, len, NULL, buf, cap);
}

static const char *check_id(const char *s, size_t len, char *buf, size_t cap)
{
    (void)buf;
    (void)cap;
    if (len > ID_MAX)
        return "must be at most 128 bytes";
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] < 0x21 || s[i] == 0x7f)
            return "must not contain spaces or control characters";
    return NULL;
}

static void conf_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    const struct rate_limit_conf *rc = elem;
    if (rc->key_count > MAX_PARTS) {
        const struct sl_yaml_node *n = sl__config_yaml_get(map, "key");
        size_t saved = sl__config_path_push_key(c, "key", 3);
        sl__config_error(c, n ? n : map, "at most %d key parts, got %zu", MAX_PARTS, rc->key_count);
        sl__config_path_pop(c, saved);
    }
}

#define FIELD(m) SL__FIELD(struct rate_limit_conf, m)

static const char *const scope_names[] = {"local", "global", NULL};
static const char *const on_error_names[] = {"allow", "deny", NULL};

static const struct sl__schema_key conf_keys[] = {
    {.name = "rate",
     .type = SL__T_STRING,
     FIELD(rate),
     .check = check_rate,
     .flags = SL__KEY_REQUIRED | SL__KEY_NONEMPTY},
    {.name = "burst", .type = SL__T_UINT, FIELD(burst), .min = 0, .max = BURST_MAX, .def = 0},
    {.name = "key",
     .type = SL__T_STRLIST,
     FIELD(key),
     .count_offset = offsetof(struct rate_limit_conf, key_count),
     .min = 1,
     .check = check_part,
     .flags = SL__KEY_NONEMPTY},
    {.name = "scope",
     .type = SL__T_ENUM,
     FIELD(scope),
     .enum_names = scope_names,
     .def = SCOPE_LOCAL},
    {.name = "on_redis_error",
     .type = SL__T_ENUM,
     FIELD(on_redis_error),
     .enum_names = on_error_names,
     .def = ON_ERROR_ALLOW},
    {.name = "max_keys",
     .type = SL__T_UINT,
     FIELD(max_keys),
     .min = 1,
     .max = SL_RL_MAX_KEYS,
     .def = 100000},
    {.name = "headers", .type = SL__T_BOOL, FIELD(headers), .def = true},
    {.name = "id", .type = SL__T_STRING, FIELD(id), .check = check_id, .flags = SL__KEY_NONEMPTY},
};

static const struct sl__schema_section conf_section = {
    .keys = conf_keys,
    .key_count = sizeof conf_keys / sizeof conf_keys[0],
    .check = conf_check,
};

static const struct sl_config_filter_type conf_type = {
    .name = "rate_limit",
    .section = &conf_section,
    .conf_size = sizeof(struct rate_limit_conf),
};

/* ---- create / destroy ------------------------------------------------------------------------ */

/* The filter's key path ("routes[1].filters[0].rate_limit"): the default id. */
static const char *where_of(const void *conf, const struct sl_config *cfg)
{
    for (size_t i = 0; i < cfg->default_filter_count; i++)
        if (cfg->default_filters[i].conf == conf)
            return cfg->default_filters[i].where;
    for (size_t r = 0; r < cfg->route_count; r++)
        for (size_t i = 0; i < cfg->routes[r].filter_count; i++)
            if (cfg->routes[r].filters[i].conf == conf)
                return cfg->routes[r].filters[i].where;
    return NULL;
}

static void destroy(void *state)
{
    struct rl_state *st = state;
    if (!st)
        return;
    sl_rl_table_free(st->table);
    free(st->id);
    free(st);
}

static int create(const void *vconf, const struct sl_config *cfg, void **out, char *err,
                  size_t err_len)
{
    const struct rate_limit_conf *conf = vconf;
    char msg[256];
    if (conf->scope == SCOPE_GLOBAL && !cfg->redis.address) {
        snprintf(err, err_len, "scope: global needs a top-level redis: section");
        return -1;
    }
    struct rl_state *st = calloc(1, sizeof *st);
    if (!st)
        goto oom;
    if (!conf->rate || sl_config_parse_rate(conf->rate, strlen(conf->rate), &st->lim.period_us)) {
        snprintf(err, err_len, "rate: missing or invalid");
        goto fail;
    }
    st->lim.burst = conf->burst;
    if (conf->key_count > MAX_PARTS) {
        snprintf(err, err_len, "key: at most %d key parts", MAX_PARTS);
        goto fail;
    }
    for (size_t i = 0; i < conf->key_count; i++) {
        const char *m =
            parse_part(conf->key[i], strlen(conf->key[i]), &st->parts[i], msg, sizeof msg);
        if (m) {
            snprintf(err, err_len, "key: %s", m);
            goto fail;
        }
    }
    st->part_count = conf->key_count;
    if (st->part_count == 0) { /* default: ip */
        st->parts[0].kind = PART_IP;
        st->part_count = 1;
    }
    st->global = conf->scope == SCOPE_GLOBAL;
    st->deny_on_error = conf->on_redis_error == ON_ERROR_DENY;
    st->headers = conf->headers;
    st->redis = &cfg->redis;
    const char *id = conf->id ? conf->id : where_of(vconf, cfg);
    if (!id)
        id = "rate_limit";
    st->id_len = strlen(id);
    if (st->id_len > ID_MAX)
        st->id_len = ID_MAX; /* a default path that long: its prefix still names it */
    if (!(st->id = malloc(st->id_len + 1)))
        goto oom;
    memcpy(st->id, id, st->id_len);
    st->id[st->id_len] = '\0';
    if (!st->global && !(st->table = sl_rl_table_new((size_t)conf->max_keys)))
        goto oom;
    *out = st;
    return 0;
oom:
    snprintf(err, err_len, "out of memory");
fail:
    destroy(st);
    return -1;
}

/* ---- per worker (global scope) --------------------------------------------------------------- */

struct rl_call;

struct rl_worker {
    struct sl_redis *redis;
    struct rl_call *pending; /* calls in flight, so on_cancel can find a run's call */
};

/* One request's Redis call, in the request arena. */
struct rl_call {
    struct sl_redis_call rc;
    struct sl_filter_run *run;
    struct sl_request *req;
    const struct rl_state *st;
    struct rl_worker *rw;
    struct rl_call *prev, *next;
};

static int worker_init(void *state, struct sl_worker *w, void **wstate)
{
    const struct rl_state *st = state;
    if (!st->global)
        return 0;
    struct rl_worker *rw = calloc(1, sizeof *rw);
    if (!rw)
        return -ENOMEM;
    rw->redis = sl_redis_new(&w->loop, st->redis);
    if (!rw->redis) {
        free(rw);
        return -ENOMEM;
    }
    *wstate = rw;
    return 0;
}

static void worker_fini(void *state, void *wstate)
{
    (void)state;
    struct rl_worker *rw = wstate;
    if (!rw)
        return;
    sl_redis_free(rw->redis); /* cancels what is still pending: those requests are going too */
    free(rw);
}

static void call_unlink(struct rl_call *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        c->rw->pending = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
}

/* ---- per request ----------------------------------------------------------------------------- */

static void append_digest(char *buf, size_t *o, const char *p, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char d[16];
    sl_rl_digest128(p, len, d);
    buf[(*o)++] = '#';
    for (int i = 0; i < 16; i++) {
        buf[(*o)++] = hex[d[i] >> 4];
        buf[(*o)++] = hex[d[i] & 15];
    }
}

static struct sl_slice part_value(const struct part *p, const struct sl_request *req)
{
    struct sl_slice v = {"", 0};
    switch (p->kind) {
    case PART_IP:
        v = req->client_ip;
        break;
    case PART_CONSUMER:
        v = req->consumer;
        break;
    case PART_ROUTE: {
        const struct sl_route_conf *rc = req->route;
        if (rc && rc->name)
            v = sl_slice_cstr(rc->name);
        break;
    }
    case PART_JWT:
        if (!sl_jwt_request_claim(req, p->name, p->name_len, &v))
            v = (struct sl_slice){"", 0};
        break;
    case PART_HEADER:
        if (!sl_request_header(req, p->name, &v))
            v = (struct sl_slice){"", 0};
        break;
    }
    if (!v.ptr)
        v = (struct sl_slice){"", 0};
    return v;
}

/* Writes the request's key into buf (KEY_BUF bytes); returns its length. A missing part
 * (no such header, claim or consumer) is the empty value: one shared bucket. */
static size_t build_key(const struct rl_state *st, const struct sl_request *req, char *buf)
{
    size_t o = 0;
    for (size_t i = 0; i < st->part_count; i++) {
        struct sl_slice v = part_value(&st->parts[i], req);
        if (v.len <= PART_INLINE_MAX) {
            o += sl_fmt_u64(buf + o, v.len);
            buf[o++] = ':';
            if (v.len)
                memcpy(buf + o, v.ptr, v.len);
            o += v.len;
        } else {
            append_digest(buf, &o, v.ptr, v.len);
        }
        buf[o++] = ',';
    }
    return o;
}

static uint64_t ceil_div(uint64_t a, uint64_t b)
{
    return a / b + (a % b != 0);
}

static void add_header(struct sl_request *req, struct sl_slice name, uint64_t v)
{
    char num[24];
    size_t n = sl_fmt_u64(num, v);
    /* Out of memory here only loses an informational header; the decision stands. */
    (void)sl_request_add_response_header(req, name, sl_slice_make(num, n));
}

static enum sl_filter_verdict allowed(struct sl_request *req, const struct rl_state *st,
                                      uint64_t limit, uint64_t remaining, uint64_t reset_s)
{
    if (st->headers) {
        add_header(req, SL_SLICE_LIT("RateLimit-Limit"), limit);
        add_header(req, SL_SLICE_LIT("RateLimit-Remaining"), remaining);
        add_header(req, SL_SLICE_LIT("RateLimit-Reset"), reset_s);
    }
    return SL_FILTER_CONTINUE;
}

static size_t put_line(char *p, const char *name, uint64_t v)
{
    size_t n = strlen(name);
    memcpy(p, name, n);
    p[n++] = ':';
    p[n++] = ' ';
    n += sl_fmt_u64(p + n, v);
    p[n++] = '\r';
    p[n++] = '\n';
    return n;
}

static enum sl_filter_verdict refused(struct sl_filter_run *run, struct sl_request *req,
                                      uint64_t limit, uint64_t retry_s, uint64_t reset_s)
{
    char *h = sl_arena_alloc(&req->arena, 192); /* four lines of at most 43 bytes */
    if (h) {
        size_t n = put_line(h, "Retry-After", retry_s < 1 ? 1 : retry_s);
        n += put_line(h + n, "RateLimit-Limit", limit);
        n += put_line(h + n, "RateLimit-Remaining", 0);
        n += put_line(h + n, "RateLimit-Reset", reset_s < 1 ? 1 : reset_s);
        run->extra_headers = h;
        run->extra_len = n;
    }
    return sl_filter_reject(run, req, 429, "rate_limited");
}

static enum sl_filter_verdict redis_failed(struct sl_filter_run *run, struct sl_request *req,
                                           const struct rl_state *st)
{
    if (st->deny_on_error)
        return sl_filter_reject(run, req, 503, "redis_unavailable");
    return SL_FILTER_CONTINUE;
}

static void on_gcra(struct sl_redis_call *rc, const struct sl_rl_result *res, int err)
{
    struct rl_call *c = rc->data;
    struct sl_filter_run *run = c->run;
    struct sl_request *req = c->req;
    const struct rl_state *st = c->st;
    call_unlink(c);
    enum sl_filter_verdict v;
    if (err || !res)
        v = redis_failed(run, req, st);
    else if (res->allowed)
        v = allowed(req, st, res->limit, res->remaining, ceil_div(res->reset_ms, 1000));
    else
        v = refused(run, req, res->limit, ceil_div(res->retry_after_ms, 1000),
                    ceil_div(res->reset_ms, 1000));
    sl_filter_resume(run, v); /* may finish the request and free `c` with its arena */
}

static enum sl_filter_verdict on_request(struct sl_filter_run *run, struct sl_request *req,
                                         void *state)
{
    const struct rl_state *st = state;
    char key[KEY_BUF];
    size_t key_len = build_key(st, req, key);
    if (!st->global) {
        struct sl_rl_decision d;
        /* The loop's time for this turn: no clock read per request. */
        uint64_t now = req->worker ? sl_loop_now_us(&req->worker->loop) : sl_rl_now_us();
        sl_rl_table_decide(st->table, key, key_len, &st->lim, now, &d);
        if (d.allowed)
            return allowed(req, st, d.limit, d.remaining, ceil_div(d.reset_us, 1000000));
        return refused(run, req, d.limit, ceil_div(d.retry_after_us, 1000000),
                       ceil_div(d.reset_us, 1000000));
    }
    struct rl_worker *rw = sl_filter_wstate(run);
    if (!rw)
        return redis_failed(run, req, st);
    /* "rl:<id>:<key>", the key digested when long, so the whole fits the client's inline
     * buffer in the common case */
    char rkey[REDIS_KEY_BUF];
    size_t o = 0;
    memcpy(rkey, "rl:", 3);
    o = 3;
    memcpy(rkey + o, st->id, st->id_len);
    o += st->id_len;
    rkey[o++] = ':';
    if (key_len <= REDIS_KEY_INLINE) {
        memcpy(rkey + o, key, key_len);
        o += key_len;
    } else {
        append_digest(rkey, &o, key, key_len);
    }
    struct rl_call *c = sl_arena_alloc(&req->arena, sizeof *c);
    if (!c)
        return redis_failed(run, req, st);
    memset(c, 0, sizeof *c);
    c->run = run;
    c->req = req;
    c->st = st;
    c->rw = rw;
    /* Errors at call time (-ENOTCONN while disconnected) are decided now, without pausing. */
    if (sl_redis_gcra(rw->redis, &c->rc, rkey, o, st->lim.period_us, st->lim.burst, on_gcra, c) !=
        0)
        return redis_failed(run, req, st);
    c->next = rw->pending;
    if (rw->pending)
        rw->pending->prev = c;
    rw->pending = c;
    return SL_FILTER_PAUSE;
}

/* The request went away while its Redis call was in flight. A linear scan: cancellations are
 * rare and the list holds only this worker's calls in flight. */
static void on_cancel(struct sl_filter_run *run, void *state)
{
    (void)state;
    struct rl_worker *rw = sl_filter_wstate(run);
    if (!rw)
        return;
    for (struct rl_call *c = rw->pending; c; c = c->next) {
        if (c->run == run) {
            sl_redis_cancel(&c->rc);
            call_unlink(c);
            return;
        }
    }
}

const struct sl_filter_ops sl_filter_rate_limit = {
    .name = "rate_limit",
    .conf_type = &conf_type,
    .create = create,
    .destroy = destroy,
    .worker_init = worker_init,
    .worker_fini = worker_fini,
    .on_request = on_request,
    .on_cancel = on_cancel,
};
