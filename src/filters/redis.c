#include "filters/redis.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <openssl/evp.h>

#include "config/config.h"
#include "core/fmt.h"
#include "core/log.h"

/*
 * hiredis 0.14 (Debian 12) has no scheduleTimer hook and no connect timeout for async
 * contexts, so every deadline here is one of our own timers. Rules kept throughout, because
 * hiredis frees the context itself on errors and runs reply callbacks from inside
 * redisAsyncHandleRead/Write:
 *  - the context is only freed by us from outside hiredis callbacks (timers, after the io
 *    handler returned); a callback that wants the connection gone sets `drop_pending`;
 *  - whoever frees it (hiredis or us), the adapter's cleanup hook is the one place that notices
 *    the connection is gone and schedules the reconnect;
 *  - a reply's privdata is a client-owned command record, never the caller's call, so a
 *    call that timed out or was cancelled can be freed while its command is still in flight.
 */

#define MAX_CMDS 1024 /* commands in flight, i.e. pending calls plus abandoned ones */
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
#define INLINE_KEY_BYTES 128

/* KEYS[1]: the bucket; ARGV[1]: emission interval (µs); ARGV[2]: burst. The stored value is
 * the theoretical arrival time (TAT) in µs of the server clock; a request is allowed when,
 * once counted, the TAT is at most `period * (burst + 1)` ahead of now, so an idle key lets
 * burst + 1 requests through at once and then one per period. Numbers go through '%.0f'
 * because Lua's default conversion would print µs timestamps in exponent form. */
static const char gcra_script[] =
    "if redis.replicate_commands then redis.replicate_commands() end\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local period = tonumber(ARGV[1])\n"
    "local burst = tonumber(ARGV[2])\n"
    "local window = period * (burst + 1)\n"
    "local tat = tonumber(redis.call('GET', KEYS[1])) or now\n"
    "if tat < now then tat = now end\n"
    "local new_tat = tat + period\n"
    "if new_tat - now <= window then\n"
    "  local ttl = math.ceil((new_tat - now) / 1000)\n"
    "  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%.0f', "
    "ttl))\n"
    "  return {1, math.floor((window - (new_tat - now)) / period), ttl, 0}\n"
    "end\n"
    "return {0, 0, math.ceil((tat - now) / 1000), math.ceil((new_tat - now - window) / 1000)}\n";

enum conn_state {
    ST_DOWN,       /* no context; `retry_timer` armed */
    ST_CONNECTING, /* TCP connect in progress */
    ST_HANDSHAKE,  /* AUTH / SELECT sent, answers awaited */
    ST_UP,
};

/* One command handed to hiredis. Lives until hiredis hands back its reply (or NULL when the
 * context goes away), whatever happened to the call meanwhile. */
struct sl_redis_cmd {
    struct sl_redis *client;
    struct sl_redis_call *call; /* NULL once the call is gone (timed out, cancelled) */
    struct sl_redis_cmd *next_free;
    char *key; /* key_prefix + key: inline_key or heap */
    size_t key_len;
    char period[20], burst[20];
    size_t period_len, burst_len;
    uint64_t limit;
    bool eval; /* sent as EVAL after a NOSCRIPT */
    char inline_key[INLINE_KEY_BYTES];
};

struct sl_redis {
    struct sl_loop *loop;
    const struct sl_redis_conf *conf;
    redisAsyncContext *ac;
    struct sl_io io;
    enum conn_state state;
    struct sl_timer connect_timer; /* connect + handshake deadline */
    struct sl_timer retry_timer;
    uint64_t backoff_ms;
    int handshake_left;
    bool drop_pending; /* a hiredis callback asked for the connection to go */
    bool down_logged;  /* "cannot connect" already said since the last "connected" */
    unsigned depth;    /* inside redisAsyncHandleRead/Write */
    bool free_requested;
    bool destroying;
    unsigned timeouts_in_row; /* calls that timed out since the last reply */
    char reason[160];         /* why the current connection is being dropped */
    struct sl_redis_call *head, *tail;
    struct sl_redis_cmd *free_cmds;
    size_t cmd_count;
    char host[INET6_ADDRSTRLEN];
    int port;
    char name[INET6_ADDRSTRLEN + 8]; /* for logs: host:port */
    char sha[41];
};

static void start_connect(struct sl_redis *r);

/* ---- pending calls ------------------------------------------------------------------------- */

static void call_unlink(struct sl_redis *r, struct sl_redis_call *call)
{
    if (call->prev)
        call->prev->next = call->next;
    else
        r->head = call->next;
    if (call->next)
        call->next->prev = call->prev;
    else
        r->tail = call->prev;
    call->prev = call->next = NULL;
}

/* Takes `call` out of the client without running its callback. */
static void call_forget(struct sl_redis_call *call)
{
    struct sl_redis *r = call->client;
    if (call->cmd) {
        call->cmd->call = NULL;
        call->cmd = NULL;
    }
    sl_timer_cancel(r->loop, &call->timer);
    sl_defer_cancel(r->loop, &call->defer);
    call_unlink(r, call);
    call->pending = false;
}

/* Delivers the outcome now. The callback may free the client or reuse `call`. */
static void call_finish(struct sl_redis_call *call, const struct sl_rl_result *res, int err)
{
    call_forget(call);
    call->cb(call, res, err);
}

/* Delivers a failure at the end of this loop turn (never from inside sl_redis_gcra nor from
 * inside hiredis' teardown). */
static void call_fail_later(struct sl_redis_call *call, int err)
{
    struct sl_redis *r = call->client;
    if (call->cmd) {
        call->cmd->call = NULL;
        call->cmd = NULL;
    }
    sl_timer_cancel(r->loop, &call->timer);
    call->err = err;
    sl_defer_queue(r->loop, &call->defer);
}

static void on_call_defer(struct sl_defer *d)
{
    struct sl_redis_call *call = d->data;
    call_finish(call, NULL, call->err);
}

/* A server that accepts but never answers (stopped, wedged, a black-holed route) would
 * otherwise keep the connection forever while every call times out: after this many timeouts
 * in a row with no reply at all, reconnect. */
#define TIMEOUTS_BEFORE_RECONNECT 8

static void drop_connection(struct sl_redis *r, const char *why);

static void on_call_timeout(struct sl_timer *t)
{
    struct sl_redis_call *call = t->data;
    struct sl_redis *r = call->client;
    call_forget(call);
    if (++r->timeouts_in_row >= TIMEOUTS_BEFORE_RECONNECT && r->state == ST_UP && !r->depth) {
        r->timeouts_in_row = 0;
        drop_connection(r, "no reply to 8 commands in a row within the timeout");
    }
    call->cb(call, NULL, -ETIMEDOUT);
}

/* ---- command records --------------------------------------------------------------------- */

static struct sl_redis_cmd *cmd_get(struct sl_redis *r, int *err)
{
    struct sl_redis_cmd *c = r->free_cmds;
    if (c) {
        r->free_cmds = c->next_free;
    } else if (r->cmd_count >= MAX_CMDS) {
        *err = -ENOBUFS;
        return NULL;
    } else {
        c = malloc(sizeof *c);
        if (!c) {
            *err = -ENOMEM;
            return NULL;
        }
        r->cmd_count++;
    }
    memset(c, 0, offsetof(struct sl_redis_cmd, inline_key));
    c->client = r;
    return c;
}

static void cmd_put(struct sl_redis *r, struct sl_redis_cmd *c)
{
    if (c->key != c->inline_key)
        free(c->key);
    c->key = NULL;
    c->call = NULL;
    c->next_free = r->free_cmds;
    r->free_cmds = c;
}

/* ---- the hiredis adapter: one sl_io, level-triggered ------------------------------------- */

static void ev_set(struct sl_redis *r, uint32_t add, uint32_t del)
{
    if (r->io.registered)
        (void)sl_io_modify(r->loop, &r->io, (r->io.interest | add) & ~del);
}

static void ev_add_read(void *p)
{
    ev_set(p, EPOLLIN, 0);
}

static void ev_del_read(void *p)
{
    ev_set(p, 0, EPOLLIN);
}

static void ev_add_write(void *p)
{
    ev_set(p, EPOLLOUT, 0);
}

static void ev_del_write(void *p)
{
    ev_set(p, 0, EPOLLOUT);
}

/* The context is being freed (by hiredis on an error, or by us); its pending reply callbacks
 * have already run with NULL replies. */
static void ev_cleanup(void *p)
{
    struct sl_redis *r = p;
    redisAsyncContext *ac = r->ac;
    sl_io_stop(r->loop, &r->io);
    r->ac = NULL;
    r->drop_pending = false;
    sl_timer_cancel(r->loop, &r->connect_timer);
    if (r->destroying)
        return;
    const char *why = r->reason[0]                  ? r->reason
                      : ac && ac->err && ac->errstr ? ac->errstr
                                                    : "connection closed";
    if (r->state == ST_UP) {
        SL_WARN("redis %s: connection lost: %s", r->name, why);
        r->backoff_ms = BACKOFF_MIN_MS;
    } else if (!r->down_logged) {
        SL_WARN("redis %s: cannot connect: %s", r->name, why);
    }
    r->down_logged = true;
    r->state = ST_DOWN;
    sl_timer_arm(r->loop, &r->retry_timer, r->backoff_ms);
    r->backoff_ms = r->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : r->backoff_ms * 2;
}

/* Frees the context from outside hiredis callbacks; ev_cleanup does the rest. */
static void drop_connection(struct sl_redis *r, const char *why)
{
    if (!r->ac)
        return;
    if (why)
        snprintf(r->reason, sizeof r->reason, "%s", why);
    redisAsyncFree(r->ac);
}

static void destroy(struct sl_redis *r)
{
    r->destroying = true;
    while (r->head)
        call_forget(r->head);
    sl_timer_cancel(r->loop, &r->connect_timer);
    sl_timer_cancel(r->loop, &r->retry_timer);
    if (r->ac)
        redisAsyncFree(r->ac); /* runs the command callbacks with NULL: records come back */
    while (r->free_cmds) {
        struct sl_redis_cmd *c = r->free_cmds;
        r->free_cmds = c->next_free;
        free(c);
    }
    free(r);
}

static void on_io(struct sl_io *io, uint32_t events)
{
    struct sl_redis *r = io->data;
    redisAsyncContext *ac = r->ac;
    if (!ac)
        return;
    r->depth++;
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP))
        redisAsyncHandleRead(ac);
    if (r->ac == ac && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
        redisAsyncHandleWrite(ac);
    r->depth--;
    if (r->depth == 0) {
        if (r->free_requested) {
            destroy(r);
            return;
        }
        if (r->drop_pending)
            drop_connection(r, NULL);
    }
}

/* ---- connection life --------------------------------------------------------------------- */

static void set_up(struct sl_redis *r)
{
    sl_timer_cancel(r->loop, &r->connect_timer);
    r->state = ST_UP;
    r->backoff_ms = BACKOFF_MIN_MS;
    r->down_logged = false;
    SL_INFO("redis %s: connected", r->name);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    struct sl_redis *r = ac->data;
    /* On failure hiredis frees the context right after this returns: ev_cleanup follows. */
    if (status != REDIS_OK || r->state != ST_CONNECTING)
        return;
    if (r->handshake_left == 0)
        set_up(r);
    else
        r->state = ST_HANDSHAKE;
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)ac;
    (void)status; /* ev_cleanup already handled it */
}

static void handshake_reply(struct sl_redis *r, redisReply *reply, const char *what)
{
    if (!reply || r->drop_pending || r->state == ST_DOWN)
        return; /* the context is going away */
    if (reply->type == REDIS_REPLY_ERROR) {
        /* The server's message ("WRONGPASS invalid username-password pair") holds no secret. */
        snprintf(r->reason, sizeof r->reason, "%s failed: %.*s", what, (int)reply->len,
                 reply->str ? reply->str : "");
        r->drop_pending = true;
        return;
    }
    if (--r->handshake_left == 0 && r->state == ST_HANDSHAKE)
        set_up(r);
}

static void on_auth_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    (void)ac;
    handshake_reply(privdata, reply, "AUTH");
}

static void on_select_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    (void)ac;
    handshake_reply(privdata, reply, "SELECT");
}

static void on_connect_timeout(struct sl_timer *t)
{
    struct sl_redis *r = t->data;
    drop_connection(r, r->state == ST_CONNECTING ? "connect timed out" : "AUTH/SELECT timed out");
}

static void on_retry(struct sl_timer *t)
{
    start_connect(t->data);
}

/* Queues AUTH and SELECT right away: hiredis holds them until the socket is connected. */
static int send_handshake(struct sl_redis *r)
{
    const struct sl_redis_conf *conf = r->conf;
    r->handshake_left = 0;
    if (conf->password) {
        const char *argv[3] = {"AUTH"};
        size_t lens[3] = {4};
        int n = 1;
        if (conf->username) {
            argv[n] = conf->username;
            lens[n++] = strlen(conf->username);
        }
        argv[n] = conf->password;
        lens[n++] = strlen(conf->password);
        if (redisAsyncCommandArgv(r->ac, on_auth_reply, r, n, argv, lens) != REDIS_OK)
            return -1;
        r->handshake_left++;
    }
    if (conf->db) {
        char db[20];
        const char *argv[2] = {"SELECT", db};
        size_t lens[2] = {6, sl_fmt_u64(db, conf->db)};
        if (redisAsyncCommandArgv(r->ac, on_select_reply, r, 2, argv, lens) != REDIS_OK)
            return -1;
        r->handshake_left++;
    }
    return 0;
}

/* Also the "reconnect" step: on any failure ev_cleanup (or the code below) arms the retry. */
static void start_connect(struct sl_redis *r)
{
    r->reason[0] = '\0';
    r->drop_pending = false;
    redisAsyncContext *ac = redisAsyncConnect(r->host, r->port);
    if (!ac || ac->err) {
        snprintf(r->reason, sizeof r->reason, "%s", ac ? ac->errstr : "out of memory");
        if (ac)
            redisAsyncFree(ac); /* not attached yet: no hooks run */
        if (!r->down_logged)
            SL_WARN("redis %s: cannot connect: %s", r->name, r->reason);
        r->down_logged = true;
        r->state = ST_DOWN;
        sl_timer_arm(r->loop, &r->retry_timer, r->backoff_ms);
        r->backoff_ms = r->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : r->backoff_ms * 2;
        return;
    }
    r->ac = ac;
    r->state = ST_CONNECTING;
    ac->data = r;
    ac->ev.data = r;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    sl_timer_arm(r->loop, &r->connect_timer, r->conf->connect_timeout_ms);
    /* Write interest is how the end of a non-blocking connect shows up. */
    int rc = sl_io_start(r->loop, &r->io, ac->c.fd, EPOLLOUT, on_io, r);
    if (rc < 0) {
        snprintf(r->reason, sizeof r->reason, "epoll: %s", strerror(-rc));
        drop_connection(r, NULL);
        return;
    }
    if (send_handshake(r) < 0)
        drop_connection(r, "cannot queue AUTH/SELECT");
}

static void format_peer(struct sl_redis *r)
{
    const struct sockaddr_storage *ss = &r->conf->addr;
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, r->host, sizeof r->host);
        r->port = ntohs(a->sin6_port);
        snprintf(r->name, sizeof r->name, "[%s]:%d", r->host, r->port);
    } else {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, r->host, sizeof r->host);
        r->port = ntohs(a->sin_port);
        snprintf(r->name, sizeof r->name, "%s:%d", r->host, r->port);
    }
}

static int script_sha1(char out[41])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (!EVP_Digest(gcra_script, sizeof gcra_script - 1, md, &len, EVP_sha1(), NULL) || len != 20)
        return -1;
    static const char hex[] = "0123456789abcdef";
    for (unsigned i = 0; i < 20; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 15];
    }
    out[40] = '\0';
    return 0;
}

struct sl_redis *sl_redis_new(struct sl_loop *loop, const struct sl_redis_conf *conf)
{
    struct sl_redis *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->loop = loop;
    r->conf = conf;
    r->backoff_ms = BACKOFF_MIN_MS;
    sl_timer_init(&r->connect_timer, on_connect_timeout, r);
    sl_timer_init(&r->retry_timer, on_retry, r);
    r->io.fd = -1;
    if (script_sha1(r->sha) < 0) {
        free(r);
        return NULL;
    }
    format_peer(r);
    start_connect(r);
    return r;
}

void sl_redis_free(struct sl_redis *r)
{
    if (!r)
        return;
    while (r->head)
        call_forget(r->head);
    if (r->depth) {
        /* Inside a reply callback: hiredis still uses the context; on_io finishes the job. */
        r->free_requested = true;
        return;
    }
    destroy(r);
}

bool sl_redis_is_connected(const struct sl_redis *r)
{
    return r->state == ST_UP && r->ac && !r->drop_pending && !r->free_requested;
}

/* ---- GCRA -------------------------------------------------------------------------------- */

static int send_gcra(struct sl_redis *r, struct sl_redis_cmd *c);

static int parse_gcra(const redisReply *reply, struct sl_rl_result *res)
{
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 4)
        return -EPROTO;
    long long v[4];
    for (int i = 0; i < 4; i++) {
        const redisReply *e = reply->element[i];
        if (!e || e->type != REDIS_REPLY_INTEGER || e->integer < 0)
            return -EPROTO;
        v[i] = e->integer;
    }
    if (v[0] > 1)
        return -EPROTO;
    res->allowed = v[0] == 1;
    res->remaining = (uint64_t)v[1];
    res->reset_ms = (uint64_t)v[2];
    res->retry_after_ms = res->allowed ? 0 : (uint64_t)v[3];
    return 0;
}

static void on_gcra_reply(redisAsyncContext *ac, void *reply_, void *privdata)
{
    (void)ac;
    struct sl_redis_cmd *c = privdata;
    struct sl_redis *r = c->client;
    struct sl_redis_call *call = c->call;
    redisReply *reply = reply_;
    if (!call) {
        if (reply)
            r->timeouts_in_row = 0; /* late, but the server answers */
        cmd_put(r, c);              /* abandoned: timed out or cancelled */
        return;
    }
    if (!reply) {
        /* The context is being torn down, possibly from inside a hiredis handler. */
        call->cmd = NULL;
        cmd_put(r, c);
        call_fail_later(call, -ENOTCONN);
        return;
    }
    if (reply->type == REDIS_REPLY_ERROR && !c->eval && reply->str &&
        strncmp(reply->str, "NOSCRIPT", 8) == 0) {
        c->eval = true; /* EVAL also loads the script into the server's cache */
        if (send_gcra(r, c) == 0)
            return;
        call->cmd = NULL;
        cmd_put(r, c);
        call_fail_later(call, -ENOTCONN);
        return;
    }
    r->timeouts_in_row = 0;
    struct sl_rl_result res = {.limit = c->limit};
    int err = parse_gcra(reply, &res);
    call->cmd = NULL;
    cmd_put(r, c);
    call_finish(call, err ? NULL : &res, err);
}

static int send_gcra(struct sl_redis *r, struct sl_redis_cmd *c)
{
    const char *argv[6];
    size_t lens[6];
    if (c->eval) {
        argv[0] = "EVAL";
        lens[0] = 4;
        argv[1] = gcra_script;
        lens[1] = sizeof gcra_script - 1;
    } else {
        argv[0] = "EVALSHA";
        lens[0] = 7;
        argv[1] = r->sha;
        lens[1] = 40;
    }
    argv[2] = "1";
    lens[2] = 1;
    argv[3] = c->key;
    lens[3] = c->key_len;
    argv[4] = c->period;
    lens[4] = c->period_len;
    argv[5] = c->burst;
    lens[5] = c->burst_len;
    if (!r->ac || redisAsyncCommandArgv(r->ac, on_gcra_reply, c, 6, argv, lens) != REDIS_OK)
        return -ENOTCONN;
    return 0;
}

int sl_redis_gcra(struct sl_redis *r, struct sl_redis_call *call, const char *key, size_t key_len,
                  uint64_t period_us, uint64_t burst, sl_redis_gcra_cb cb, void *data)
{
    if (call->pending)
        return -EALREADY;
    if (!sl_redis_is_connected(r))
        return -ENOTCONN;
    /* The script computes in doubles: keep every µs quantity exact (< 2^53). */
    if (period_us == 0 || period_us > (1ull << 40) || burst > (1ull << 20))
        return -EINVAL;
    int err = 0;
    struct sl_redis_cmd *c = cmd_get(r, &err);
    if (!c)
        return err;
    const char *prefix = r->conf->key_prefix ? r->conf->key_prefix : "";
    size_t prefix_len = strlen(prefix);
    c->key_len = prefix_len + key_len;
    c->key = c->key_len <= sizeof c->inline_key ? c->inline_key : malloc(c->key_len);
    if (!c->key) {
        cmd_put(r, c);
        return -ENOMEM;
    }
    memcpy(c->key, prefix, prefix_len);
    if (key_len)
        memcpy(c->key + prefix_len, key, key_len);
    c->period_len = sl_fmt_u64(c->period, period_us);
    c->burst_len = sl_fmt_u64(c->burst, burst);
    c->limit = burst + 1;
    c->call = call;
    err = send_gcra(r, c);
    if (err) {
        cmd_put(r, c);
        return err;
    }
    call->client = r;
    call->cmd = c;
    call->cb = cb;
    call->data = data;
    call->err = 0;
    call->pending = true;
    sl_timer_init(&call->timer, on_call_timeout, call);
    sl_defer_init(&call->defer, on_call_defer, call);
    call->next = NULL;
    call->prev = r->tail;
    if (r->tail)
        r->tail->next = call;
    else
        r->head = call;
    r->tail = call;
    sl_timer_arm(r->loop, &call->timer, r->conf->timeout_ms);
    return 0;
}

void sl_redis_cancel(struct sl_redis_call *call)
{
    if (!call->pending)
        return;
    call_forget(call);
}
