#include "obs/admin.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "config/config.h"
#include "config/filter_conf.h"
#include "core/fmt.h"
#include "core/log.h"
#include "core/loop.h"
#include "core/sha256.h"
#include "core/slice.h"
#include "core/worker.h"
#include "http/h1_server.h"
#include "http/request.h"
#include "l4/gateway.h"
#include "obs/metrics.h"
#include "obs/obs.h"
#include "obs/status_page.h"
#include "proxy/pool.h"

/* Small limits: the admin API takes small JSON bodies and short heads only. */
#define ADMIN_BUF_BYTES (16 * 1024)
#define ADMIN_HEAD_BYTES (8 * 1024)
#define ADMIN_BODY_BYTES (64 * 1024)
#define ADMIN_TIMEOUT_MS 10000
#define RELOAD_MSG_BYTES 8192
#define TOKEN_FILE_MAX 4096
/* Open admin connections at most: beyond, a new one is closed at once, so a client that opens
 * connections without end cannot take the process's descriptors from the gateway. */
#define ADMIN_MAX_CONNS 64
/* Endpoints the admin API may add to one upstream: each change rebuilds the pool's set. */
#define ADMIN_MAX_EPS 1000

/* One endpoint the admin API added to an upstream. */
struct admin_ep {
    char *address; /* canonical "ip:port" or "[v6]:port" */
    struct sockaddr_storage addr;
    socklen_t addr_len;
    uint32_t weight;
    char *zone; /* or NULL */
};

/* The admin source of one upstream, by name: it outlives config generations. */
struct admin_list {
    struct admin_list *next;
    char *upstream;
    struct admin_ep *eps;
    size_t count, cap;
};

struct sl_admin {
    struct sl_obs *obs;
    char *address; /* as configured, for messages */
    int listen_fd; /* until the admin thread's acceptor owns it */
    struct sl_worker *worker;
    struct sl_limits_conf limits;
    struct sl_request_handler handler;
    struct sl_h1_server srv;
    bool srv_ready;
    struct sl_acceptor acceptor;
    bool auth; /* a token is required (token_file set) */
    unsigned char token_sha256[32];
    /* Guards `lists` and serializes endpoint changes with sl_admin_on_reload, so a change
     * made while a reload swaps generations reaches the new pools too. */
    pthread_mutex_t lock;
    struct admin_list *lists;
    /* Admin thread only: connections closed at accept for the cap, and whether the current
     * stretch of refusals has been logged. */
    uint64_t conns_refused;
    uint64_t stretch_refused;
    /* The reload running on its own thread, or NULL (admin thread only). */
    struct reload_job *job;
    /* How many reload threads may still post to the admin loop: sl_admin_stop waits for none
     * before the loop goes away. */
    pthread_mutex_t job_lock;
    pthread_cond_t job_cond;
    int job_threads;
};

/*
 * A POST /reload in progress. The reload runs on a short-lived thread so that the admin loop
 * keeps answering /live and /ready meanwhile; its end is posted back to the admin loop, which
 * answers the request (if the client is still there) and frees the job.
 */
struct reload_job {
    struct sl_admin *a;
    struct sl_request *req; /* NULL once the client went away (admin thread only) */
    struct sl_post post;
    int rc;
    uint64_t generation;
    char msg[RELOAD_MSG_BYTES];
};

/* What a request needs between its head and its body (in the request's arena). */
enum admin_op { OP_NONE = 0, OP_ADD_ENDPOINT, OP_RELOAD, OP_DRAIN };

struct admin_req {
    struct sl_admin *a;
    enum admin_op op;
    const char *upstream;
    char *body;
    size_t len, cap;
};

/* ---- text from outside ---- */

/*
 * A malloc'd NUL-terminated copy of s[0..n) with every byte that does not start a valid UTF-8
 * sequence (a NUL, a stray byte, a sequence cut at the end) replaced by '?'. jansson refuses
 * invalid UTF-8, and a message cut mid-character must still be shown. NULL when out of memory.
 */
static char *utf8_clean(const char *s, size_t n)
{
    char *out = malloc(n + 1);
    if (!out)
        return NULL;
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t k = u[i] ? sl_utf8_seq_len(u + i, n - i) : 0; /* jansson refuses NUL too */
        if (k == 0) {
            out[i++] = '?';
            continue;
        }
        memcpy(out + i, s + i, k);
        i += k;
    }
    out[n] = '\0';
    return out;
}

/* A JSON string of outside text (config, request, error message), made valid UTF-8. */
static json_t *json_textn(const char *s, size_t n)
{
    char *c = utf8_clean(s ? s : "", s ? n : 0);
    json_t *j = c ? json_stringn(c, n) : NULL;
    free(c);
    return j;
}

static json_t *json_text(const char *s)
{
    return json_textn(s, s ? strlen(s) : 0);
}

/* ---- responses ---- */

/* Headers on every admin answer: the data is live and may be secret. */
#define COMMON_HEADERS "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"

static void respond_raw(struct sl_request *req, int status, const char *ctype, const char *extra,
                        const char *body, size_t len)
{
    sl_request_respond(req, status, ctype, extra, extra ? strlen(extra) : 0, body, len);
}

/*
 * Answers with `j` (reference taken) as compact JSON. The text goes into the request's arena:
 * a body larger than the output buffer is written from the flush, after this returns.
 */
static void respond_json_extra(struct sl_request *req, int status, json_t *j, const char *extra)
{
    if (!j) {
        /* json_pack and friends return NULL for text they cannot encode, not only when memory
         * runs out: say so rather than blame memory. */
        static const char bad[] = "{\"status\":500,\"error\":\"format_error\",\"message\":"
                                  "\"the answer could not be encoded as JSON\"}\n";
        req->log.error = "format_error";
        respond_raw(req, 500, "application/json", COMMON_HEADERS, bad, sizeof bad - 1);
        return;
    }
    char *text = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    size_t n = text ? strlen(text) : 0;
    char *body = text ? sl_arena_alloc(&req->arena, n + 1) : NULL;
    if (!body) {
        free(text);
        static const char oom[] = "{\"status\":503,\"error\":\"out_of_memory\"}\n";
        respond_raw(req, 503, "application/json", COMMON_HEADERS, oom, sizeof oom - 1);
        return;
    }
    memcpy(body, text, n);
    body[n] = '\n';
    free(text);
    respond_raw(req, status, "application/json", extra ? extra : COMMON_HEADERS, body, n + 1);
}

static void respond_json(struct sl_request *req, int status, json_t *j)
{
    respond_json_extra(req, status, j, NULL);
}

/* Every error is JSON: {"status":N,"error":"name","message":"...","request_id":"..."}. */
static void respond_error_extra(struct sl_request *req, int status, const char *name,
                                const char *extra, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static void respond_error_extra(struct sl_request *req, int status, const char *name,
                                const char *extra, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_t *j = json_object();
    json_object_set_new(j, "status", json_integer(status));
    json_object_set_new(j, "error", json_text(name));
    json_object_set_new(j, "message", json_text(msg));
    json_object_set_new(j, "request_id", json_textn(req->request_id.ptr, req->request_id.len));
    req->log.error = name;
    respond_json_extra(req, status, j, extra);
}

#define respond_error(req, status, name, ...)                                                      \
    respond_error_extra(req, status, name, NULL, __VA_ARGS__)

/* ---- small helpers ---- */

static void iso_time(uint64_t unix_ms, char *buf, size_t cap)
{
    time_t t = (time_t)(unix_ms / 1000);
    struct tm tm;
    if (!gmtime_r(&t, &tm) || cap < 25) {
        if (cap)
            buf[0] = '\0';
        return;
    }
    size_t n = strftime(buf, cap, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, cap - n, ".%03uZ", (unsigned)(unix_ms % 1000));
}

static json_t *json_str_or_null(const char *s)
{
    return s ? json_text(s) : json_null();
}

static json_t *json_u64(uint64_t v)
{
    return json_integer(v > (uint64_t)INT64_MAX ? INT64_MAX : (json_int_t)v);
}

static uint64_t load_u64(const _Atomic uint64_t *p)
{
    return atomic_load_explicit(p, memory_order_relaxed);
}

static uint32_t load_u32(const _Atomic uint32_t *p)
{
    return atomic_load_explicit(p, memory_order_relaxed);
}

static bool same_sockaddr(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return false;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)a;
        const struct sockaddr_in *y = (const struct sockaddr_in *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a;
        const struct sockaddr_in6 *y = (const struct sockaddr_in6 *)b;
        return x->sin6_port == y->sin6_port &&
               memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr) == 0;
    }
    return false;
}

/*
 * Parses an endpoint address given to the API: an IP literal and a port ("10.0.0.5:8080",
 * "[2001:db8::1]:8080"). Names are refused: resolving one would block the admin thread, and
 * a name belongs in the config's `discovery:`, which re-resolves it. Writes the canonical
 * form into `canon`. Returns NULL, or why the address is not one.
 */
static const char *parse_ip_port(const char *s, struct sockaddr_storage *ss, socklen_t *len,
                                 char *canon, size_t cap)
{
    char host[64];
    const char *port_s;
    size_t hl;
    bool v6 = s[0] == '[';
    if (v6) {
        const char *end = strchr(s, ']');
        if (!end || end[1] != ':')
            return "an IPv6 address must be written [address]:port";
        hl = (size_t)(end - s - 1);
        if (hl == 0 || hl >= sizeof host)
            return "not an IPv6 address";
        memcpy(host, s + 1, hl);
        port_s = end + 2;
    } else {
        const char *colon = strrchr(s, ':');
        if (!colon)
            return "must be ip:port (the port is missing)";
        if (memchr(s, ':', (size_t)(colon - s)))
            return "an IPv6 address must be written [address]:port";
        hl = (size_t)(colon - s);
        if (hl == 0 || hl >= sizeof host)
            return "must be ip:port (the address is missing)";
        memcpy(host, s, hl);
        port_s = colon + 1;
    }
    host[hl] = '\0';
    unsigned long port = 0;
    size_t digits = 0;
    for (const char *p = port_s; *p; p++, digits++) {
        if (*p < '0' || *p > '9' || digits >= 5)
            return "the port must be a number from 1 to 65535";
        port = port * 10 + (unsigned long)(*p - '0');
    }
    if (digits == 0 || port == 0 || port > 65535)
        return "the port must be a number from 1 to 65535";
    memset(ss, 0, sizeof *ss);
    char text[INET6_ADDRSTRLEN];
    if (v6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
        if (inet_pton(AF_INET6, host, &in6->sin6_addr) != 1)
            return "not an IPv6 address";
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        *len = sizeof *in6;
        inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof text);
        snprintf(canon, cap, "[%s]:%lu", text, port);
    } else {
        struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
        if (inet_pton(AF_INET, host, &in4->sin_addr) != 1)
            return "must be an IP address and a port (ip:port); the admin API does not "
                   "resolve names: use the upstream's discovery for those";
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        *len = sizeof *in4;
        inet_ntop(AF_INET, &in4->sin_addr, text, sizeof text);
        snprintf(canon, cap, "%s:%lu", text, port);
    }
    return NULL;
}

/* Percent-decodes a path segment into the arena. NULL when malformed, NUL-bearing or OOM. */
static char *decode_segment(struct sl_request *req, struct sl_slice seg)
{
    char *out = sl_arena_alloc(&req->arena, seg.len + 1);
    if (!out)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < seg.len; i++) {
        char c = seg.ptr[i];
        if (c == '%') {
            if (i + 2 >= seg.len)
                return NULL;
            int hi = sl_hex_digit((unsigned char)seg.ptr[i + 1]);
            int lo = sl_hex_digit((unsigned char)seg.ptr[i + 2]);
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0))
                return NULL;
            c = (char)(hi << 4 | lo);
            i += 2;
        }
        out[o++] = c;
    }
    out[o] = '\0';
    return out;
}

/* ---- authentication ---- */

/*
 * Reads the token: the file's first line without surrounding blanks. Only its SHA-256 is
 * kept, so the comparison takes the same time whatever the presented token's length, and the
 * token itself does not stay in memory.
 */
static int load_token(struct sl_admin *a, const char *path, char *err, size_t err_len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, err_len, "admin: token_file %s: %s", path, strerror(errno));
        return -1;
    }
    char buf[TOKEN_FILE_MAX + 1];
    size_t n = 0;
    int read_err = 0;
    while (n < TOKEN_FILE_MAX) {
        ssize_t r = read(fd, buf + n, TOKEN_FILE_MAX - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            read_err = errno; /* a directory (EISDIR), an I/O error: not an empty token */
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    if (read_err) {
        OPENSSL_cleanse(buf, n);
        snprintf(err, err_len, "admin: token_file %s: %s", path, strerror(read_err));
        return -1;
    }
    buf[n] = '\0';
    char *line = buf;
    /* Editors on some systems start a UTF-8 file with a byte-order mark: not part of the token. */
    if (n >= 3 && memcmp(buf, "\xef\xbb\xbf", 3) == 0)
        line += 3;
    /* Lengths, not strlen: a NUL in the line is a control character to report, not its end. */
    char *end = buf + n;
    char *nl = memchr(line, '\n', (size_t)(end - line));
    if (nl)
        end = nl;
    while (line < end && sl_ascii_is_ows(*line))
        line++;
    size_t len = (size_t)(end - line);
    while (len && (sl_ascii_is_ows(line[len - 1]) || line[len - 1] == '\r'))
        len--;
    size_t bad = 0;
    while (bad < len && (unsigned char)line[bad] >= 0x20 && line[bad] != 0x7f)
        bad++;
    int rc = 0;
    if (len == 0) {
        snprintf(err, err_len, "admin: token_file %s: the first line (the token) is empty", path);
        rc = -1;
    } else if (bad < len) {
        /* Such a token cannot be sent in an Authorization header as written. */
        snprintf(err, err_len,
                 "admin: token_file %s: the token contains a control character (byte 0x%02x at "
                 "offset %zu of the first line); it must be printable text",
                 path, (unsigned)(unsigned char)line[bad], bad);
        rc = -1;
    } else {
        sl_sha256(line, len, a->token_sha256);
        a->auth = true;
    }
    OPENSSL_cleanse(buf, sizeof buf);
    return rc;
}

/* True when the request carries `Authorization: Bearer <the token>`. */
static bool authorized(const struct sl_admin *a, const struct sl_request *req)
{
    if (!a->auth)
        return true;
    struct sl_slice v;
    if (!sl_request_header(req, "Authorization", &v) || v.len < 7 ||
        !sl_slice_ieq(sl_slice_make(v.ptr, 6), SL_SLICE_LIT("Bearer")) || v.ptr[6] != ' ')
        return false;
    size_t i = 7;
    while (i < v.len && v.ptr[i] == ' ')
        i++;
    size_t end = v.len;
    while (end > i && sl_ascii_is_ows(v.ptr[end - 1]))
        end--;
    unsigned char sha[32];
    sl_sha256(v.ptr + i, end - i, sha);
    return CRYPTO_memcmp(sha, a->token_sha256, sizeof sha) == 0;
}

/* The config's rule for names (check_name in config.c): 1 to 64 letters, digits, '_', '-' or
 * '.'. A zone is written to the log and compared with the config's zones. */
/* ---- where a request comes from ---- */

/* True when `h` is "localhost", an IPv4 literal or a bracketed IPv6 literal, with an optional
 * port: a name a DNS-rebinding page can point at 127.0.0.1 is none of these. */
static bool host_is_literal(struct sl_slice h)
{
    char buf[256];
    if (h.len == 0 || h.len >= sizeof buf)
        return false;
    memcpy(buf, h.ptr, h.len);
    buf[h.len] = '\0';
    char *host = buf;
    char *port = NULL;
    if (buf[0] == '[') {
        char *close = strchr(buf, ']');
        if (!close)
            return false;
        *close = '\0';
        host = buf + 1;
        if (close[1] == ':')
            port = close + 2;
        else if (close[1] != '\0')
            return false;
    } else {
        char *colon = strchr(buf, ':');
        if (colon) {
            *colon = '\0';
            port = colon + 1;
        }
    }
    if (port) {
        size_t n = strlen(port);
        if (n == 0 || n > 5 || strspn(port, "0123456789") != n)
            return false;
    }
    unsigned char addr[16];
    if (host != buf)
        return inet_pton(AF_INET6, host, addr) == 1;
    return strcasecmp(host, "localhost") == 0 || inet_pton(AF_INET, host, addr) == 1;
}

/* True when the request has no Origin, or its Origin is this very Host (http or https): a
 * browser sends Origin on every cross-site POST, which a page cannot forge. */
static bool origin_ok(const struct sl_request *req)
{
    struct sl_slice o, h;
    if (!sl_request_header(req, "Origin", &o))
        return true;
    if (!sl_request_header(req, "Host", &h) || h.len == 0)
        return false;
    static const char *const schemes[] = {"http://", "https://"};
    for (size_t i = 0; i < 2; i++) {
        size_t sl = strlen(schemes[i]);
        if (o.len == sl + h.len &&
            sl_slice_ieq(sl_slice_make(o.ptr, sl), sl_slice_make(schemes[i], sl)) &&
            sl_slice_ieq(sl_slice_make(o.ptr + sl, h.len), h))
            return true;
    }
    return false;
}

/* True when the Content-Type's media type is application/json (parameters allowed). */
static bool is_json_body(const struct sl_request *req)
{
    struct sl_slice v;
    if (!sl_request_header(req, "Content-Type", &v))
        return false;
    size_t n = 0;
    while (n < v.len && v.ptr[n] != ';')
        n++;
    while (n && sl_ascii_is_ows(v.ptr[n - 1]))
        n--;
    return sl_slice_ieq(sl_slice_make(v.ptr, n), SL_SLICE_LIT("application/json"));
}

/* ---- the admin endpoint lists ---- */

static void admin_ep_dispose(struct admin_ep *e)
{
    free(e->address);
    free(e->zone);
}

static void admin_list_free(struct admin_list *l)
{
    for (size_t i = 0; i < l->count; i++)
        admin_ep_dispose(&l->eps[i]);
    free(l->eps);
    free(l->upstream);
    free(l);
}

static struct admin_list **find_list(struct sl_admin *a, const char *upstream)
{
    struct admin_list **pp = &a->lists;
    while (*pp && strcmp((*pp)->upstream, upstream) != 0)
        pp = &(*pp)->next;
    return pp;
}

/* Hands `l` (NULL = empty) to `pool` as its admin source. 0 or -ENOMEM. */
static int apply_list(struct sl_pool *pool, const struct admin_list *l)
{
    size_t n = l ? l->count : 0;
    struct sl_endpoint_spec *specs = calloc(n ? n : 1, sizeof *specs);
    if (!specs)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++) {
        const struct admin_ep *e = &l->eps[i];
        specs[i].address = e->address;
        specs[i].addr = e->addr;
        specs[i].addr_len = e->addr_len;
        specs[i].weight = e->weight;
        specs[i].zone = e->zone;
    }
    int rc = sl_pool_set_source(pool, SL_POOL_SRC_ADMIN, specs, n);
    free(specs);
    return rc < 0 ? rc : 0;
}

static ssize_t upstream_index(const struct sl_config *cfg, const char *name)
{
    for (size_t i = 0; i < cfg->upstream_count; i++)
        if (strcmp(cfg->upstreams[i].name, name) == 0)
            return (ssize_t)i;
    return -1;
}

void sl_admin_on_reload(struct sl_admin *a, struct sl_runtime *rt)
{
    if (!a || !rt || !rt->cfg)
        return;
    pthread_mutex_lock(&a->lock);
    struct admin_list **pp = &a->lists;
    while (*pp) {
        struct admin_list *l = *pp;
        ssize_t i = upstream_index(rt->cfg, l->upstream);
        if (i < 0) {
            SL_WARN("admin: upstream %s is gone from the configuration; its %zu endpoint%s added "
                    "through the admin API are dropped",
                    l->upstream, l->count, l->count == 1 ? "" : "s");
            *pp = l->next;
            admin_list_free(l);
            continue;
        }
        if (apply_list(rt->pools[i], l) < 0)
            SL_ERR("admin: out of memory re-applying the admin endpoints of upstream %s",
                   l->upstream);
        pp = &l->next;
    }
    pthread_mutex_unlock(&a->lock);
}

/* ---- JSON views ---- */

static struct sl_runtime *acquire_rt(struct sl_admin *a)
{
    return a->obs->gw ? sl_gateway_runtime_acquire(a->obs->gw) : NULL;
}

/* What an endpoint change works on: the running configuration, the upstream in it and the
 * admin API's list for that upstream. */
struct admin_target {
    struct sl_runtime *rt;  /* held until target_unlock; NULL when the gateway is not running */
    ssize_t ui;             /* the upstream's index in rt->cfg; -1 when unknown */
    struct admin_list **pp; /* the list's link in a->lists, where a new list goes */
    struct admin_list *l;   /* NULL while the admin API lists nothing for the upstream */
};

/* Takes a->lock and looks `upstream` up into `t`. 0, or the status that ends the request
 * before any change: 503 (the gateway is not running) or 404 (no such upstream). The caller
 * calls target_unlock whatever this returns. */
static int target_lock(struct sl_admin *a, const char *upstream, struct admin_target *t)
{
    pthread_mutex_lock(&a->lock);
    t->rt = acquire_rt(a);
    t->ui = t->rt ? upstream_index(t->rt->cfg, upstream) : -1;
    t->pp = find_list(a, upstream);
    t->l = *t->pp;
    return !t->rt ? 503 : t->ui < 0 ? 404 : 0;
}

/* Drops a->lock and the runtime; t->rt stays set, to tell "not running" apart afterwards. */
static void target_unlock(struct sl_admin *a, const struct admin_target *t)
{
    pthread_mutex_unlock(&a->lock);
    if (t->rt)
        sl_runtime_release(t->rt);
}

static const char *protocol_name(int p)
{
    return p == SL_LISTENER_TCP ? "tcp" : "http";
}

static json_t *listeners_json(const struct sl_config *cfg)
{
    json_t *arr = json_array();
    for (size_t i = 0; i < cfg->listener_count; i++) {
        const struct sl_listener_conf *l = &cfg->listeners[i];
        json_t *o = json_object();
        json_object_set_new(o, "name", json_text(l->name));
        json_object_set_new(o, "address", json_text(l->address));
        json_object_set_new(o, "protocol", json_text(protocol_name(l->protocol)));
        json_object_set_new(o, "tls", json_boolean(l->tls.enabled));
        if (l->protocol == SL_LISTENER_TCP)
            json_object_set_new(o, "upstream", json_str_or_null(l->upstream));
        json_array_append_new(arr, o);
    }
    return arr;
}

/*
 * Request totals since start, from the metrics: what the status page charts (rate from the
 * total, mean latency from the duration sum over the count).
 */
static json_t *requests_json(struct sl_obs *obs)
{
    struct sl_metrics_totals t;
    memset(&t, 0, sizeof t);
    if (obs->metrics)
        sl_metrics_totals(obs->metrics, &t, true);
    double dsum = 0, usum = 0;
    uint64_t ureq = 0;
    for (size_t i = 0; t.routes && i < t.route_count; i++) {
        dsum += t.routes[i].duration_seconds_sum;
        usum += t.routes[i].upstream_duration_seconds_sum;
        ureq += t.routes[i].upstream_requests;
    }
    json_t *o = json_object();
    json_object_set_new(o, "total", json_u64(t.requests));
    json_t *cls = json_object();
    static const char *const names[SL_METRICS_CODE_COUNT] = {"1xx", "2xx", "3xx",
                                                             "4xx", "5xx", "none"};
    for (int i = 0; i < SL_METRICS_CODE_COUNT; i++)
        json_object_set_new(cls, names[i], json_u64(t.codes[i]));
    json_object_set_new(o, "by_class", cls);
    json_object_set_new(o, "duration_seconds_sum", json_real(dsum));
    json_object_set_new(o, "upstream_requests", json_u64(ureq));
    json_object_set_new(o, "upstream_duration_seconds_sum", json_real(usum));
    json_object_set_new(o, "cpu_seconds_sum", json_real(t.cpu_seconds_sum));
    sl_metrics_totals_dispose(&t);
    return o;
}

static json_t *status_json(struct sl_admin *a)
{
    struct sl_obs *obs = a->obs;
    json_t *o = json_object();
    char when[40];
    uint64_t now = sl_clock_now_ms();
    uint64_t up_ms = now > obs->started_mono_ms ? now - obs->started_mono_ms : 0;
    json_object_set_new(o, "version", json_text(obs->version ? obs->version : ""));
    json_object_set_new(o, "pid", json_integer(getpid()));
    json_object_set_new(o, "uptime_s", json_u64(up_ms / 1000));
    json_object_set_new(o, "uptime_ms", json_u64(up_ms));
    iso_time(obs->started_unix_ms, when, sizeof when);
    json_object_set_new(o, "started_at", json_text(when));

    pthread_mutex_lock(&obs->hist_lock);
    uint64_t gen = obs->generation, ok = obs->reloads, failed = obs->reload_failures;
    uint64_t rollbacks = obs->rollbacks, last_at = obs->last_reload_unix_ms;
    json_t *last_error =
        obs->last_reload_error[0] ? json_text(obs->last_reload_error) : json_null();
    pthread_mutex_unlock(&obs->hist_lock);

    json_t *conf = json_object();
    json_object_set_new(conf, "path", json_str_or_null(obs->config_path));
    json_object_set_new(conf, "generation", json_u64(gen));
    json_object_set_new(o, "config", conf);
    json_t *rl = json_object();
    json_object_set_new(rl, "ok", json_u64(ok));
    json_object_set_new(rl, "failed", json_u64(failed));
    json_object_set_new(rl, "rollbacks", json_u64(rollbacks));
    if (last_at) {
        iso_time(last_at, when, sizeof when);
        json_object_set_new(rl, "last_at", json_text(when));
    } else {
        json_object_set_new(rl, "last_at", json_null());
    }
    json_object_set_new(rl, "last_error", last_error);
    json_object_set_new(o, "reloads", rl);

    bool draining = atomic_load(&obs->draining), started = atomic_load(&obs->started);
    json_object_set_new(o, "state",
                        json_text(draining  ? "draining"
                                  : started ? "ready"
                                            : "starting"));
    json_object_set_new(o, "draining", json_boolean(draining));
    if (obs->gw) {
        json_object_set_new(o, "workers", json_integer(sl_gateway_worker_count(obs->gw)));
        json_object_set_new(o, "open_connections",
                            json_integer(sl_gateway_open_connections(obs->gw)));
    }
    json_object_set_new(o, "requests", requests_json(obs));
    json_t *adm = json_object();
    json_object_set_new(adm, "open_connections", json_u64(a->srv.conn_count));
    json_object_set_new(adm, "refused_connections", json_u64(a->conns_refused));
    json_object_set_new(o, "admin", adm);
    struct sl_runtime *rt = acquire_rt(a);
    if (rt) {
        json_object_set_new(o, "listeners", listeners_json(rt->cfg));
        sl_runtime_release(rt);
    } else {
        json_object_set_new(o, "listeners", json_array());
    }
    return o;
}

static const struct {
    unsigned bit;
    const char *name;
} method_names[] = {
    {SL_METHOD_GET, "GET"},         {SL_METHOD_HEAD, "HEAD"},     {SL_METHOD_POST, "POST"},
    {SL_METHOD_PUT, "PUT"},         {SL_METHOD_DELETE, "DELETE"}, {SL_METHOD_PATCH, "PATCH"},
    {SL_METHOD_OPTIONS, "OPTIONS"}, {SL_METHOD_TRACE, "TRACE"},   {SL_METHOD_CONNECT, "CONNECT"},
};

static json_t *match_json(const struct sl_route_match_conf *m)
{
    json_t *o = json_object();
    if (m->host)
        json_object_set_new(o, "host", json_text(m->host));
    if (m->path)
        json_object_set_new(o, "path", json_text(m->path));
    if (m->path_prefix)
        json_object_set_new(o, "path_prefix", json_text(m->path_prefix));
    if (m->methods || m->method_name_count) {
        json_t *arr = json_array();
        for (size_t i = 0; i < sizeof method_names / sizeof method_names[0]; i++)
            if (m->methods & method_names[i].bit)
                json_array_append_new(arr, json_text(method_names[i].name));
        for (size_t i = 0; i < m->method_name_count; i++)
            json_array_append_new(arr, json_text(m->method_names[i]));
        json_object_set_new(o, "methods", arr);
    }
    if (m->header_count) {
        json_t *h = json_object();
        for (size_t i = 0; i < m->header_count; i++) {
            char *k = utf8_clean(m->headers[i].name, strlen(m->headers[i].name));
            if (k)
                json_object_set_new(h, k, json_text(m->headers[i].value));
            free(k);
        }
        json_object_set_new(o, "headers", h);
    }
    return o;
}

static json_t *filter_names(const struct sl_filter_conf *f, size_t n)
{
    json_t *arr = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(arr, json_text(f[i].type ? f[i].type->name : "?"));
    return arr;
}

/* The route's request counts since start (0 when the metrics have none for it). */
static json_t *route_counts_json(const struct sl_metrics_totals *t, const char *name)
{
    const struct sl_metrics_route_totals *rt = NULL;
    for (size_t i = 0; t->routes && i < t->route_count && !rt; i++)
        if (strcmp(t->routes[i].name, name) == 0)
            rt = &t->routes[i];
    json_t *o = json_object();
    json_object_set_new(o, "total", json_u64(rt ? rt->requests : 0));
    json_object_set_new(o, "5xx", json_u64(rt ? rt->codes[SL_METRICS_5XX] : 0));
    json_object_set_new(o, "duration_seconds_sum", json_real(rt ? rt->duration_seconds_sum : 0));
    return o;
}

static json_t *routes_json(const struct sl_config *cfg, const struct sl_metrics_totals *t)
{
    json_t *arr = json_array();
    for (size_t r = 0; r < cfg->route_count; r++) {
        const struct sl_route_conf *rc = &cfg->routes[r];
        /* An unnamed route goes by "route<index>", as in the metrics' route label. */
        char fallback[32];
        snprintf(fallback, sizeof fallback, "route%zu", rc->index);
        const char *name = rc->name ? rc->name : fallback;
        json_t *o = json_object();
        json_object_set_new(o, "name", json_text(name));
        json_t *ls = json_array();
        if (rc->listener_count) {
            for (size_t i = 0; i < rc->listener_count; i++)
                json_array_append_new(ls, json_text(rc->listeners[i]));
        } else {
            /* no `listeners:` = every HTTP listener */
            for (size_t i = 0; i < cfg->listener_count; i++)
                if (cfg->listeners[i].protocol == SL_LISTENER_HTTP)
                    json_array_append_new(ls, json_text(cfg->listeners[i].name));
        }
        json_object_set_new(o, "listeners", ls);
        json_object_set_new(o, "match", match_json(&rc->match));
        if (rc->has_direct_response) {
            json_t *d = json_object();
            json_object_set_new(d, "status", json_integer(rc->direct_response.status));
            json_object_set_new(d, "content_type",
                                json_str_or_null(rc->direct_response.content_type));
            json_object_set_new(o, "direct_response", d);
            json_object_set_new(o, "upstream", json_null());
        } else {
            json_object_set_new(o, "upstream", json_str_or_null(rc->upstream));
        }
        json_object_set_new(o, "filters", filter_names(rc->filters, rc->filter_count));
        json_object_set_new(o, "default_filters",
                            rc->skip_default_filters
                                ? json_array()
                                : filter_names(cfg->default_filters, cfg->default_filter_count));
        json_object_set_new(o, "strip_prefix", json_boolean(rc->strip_prefix));
        json_object_set_new(o, "rewrite_prefix", json_str_or_null(rc->rewrite_prefix));
        json_object_set_new(o, "requests", route_counts_json(t, name));
        json_array_append_new(arr, o);
    }
    return arr;
}

static const char *balancer_name(enum sl_balance b)
{
    switch (b) {
    case SL_BALANCE_LEAST_REQUEST:
        return "least_request";
    case SL_BALANCE_HASH:
        return "hash";
    default:
        return "round_robin";
    }
}

static const char *state_name(int s)
{
    switch (s) {
    case SL_EP_OPEN:
        return "open";
    case SL_EP_HALF_OPEN:
        return "half_open";
    default:
        return "closed";
    }
}

static const char *const source_names[SL_POOL_SRC_COUNT] = {"config", "discovery", "admin"};

/* Which sources list `e` (by the address they wrote, or the same IP and port). */
static unsigned sources_of(const struct sl_pool *p, const struct sl_endpoint *e)
{
    unsigned mask = 0;
    for (int s = 0; s < SL_POOL_SRC_COUNT; s++)
        for (size_t i = 0; i < p->src_count[s] && !(mask & (1u << s)); i++) {
            const struct sl_endpoint_spec *sp = &p->src[s][i];
            if ((sp->address && strcmp(sp->address, e->address) == 0) ||
                (sp->addr_len && e->addr_len && same_sockaddr(&sp->addr, &e->addr)))
                mask |= 1u << s;
        }
    return mask;
}

static json_t *endpoint_json(const struct sl_pool *p, struct sl_endpoint *e, unsigned sources)
{
    json_t *o = json_object();
    json_object_set_new(o, "address", json_text(e->address));
    json_object_set_new(o, "zone", json_str_or_null(e->zone));
    json_object_set_new(o, "weight", json_integer(e->weight));
    json_object_set_new(o, "healthy", json_boolean(sl_endpoint_is_healthy(e)));
    json_object_set_new(
        o, "state", json_text(state_name(atomic_load_explicit(&e->state, memory_order_relaxed))));
    const char *active = "unknown"; /* the upstream has no active check */
    if (p->conf->active.enabled)
        active = atomic_load_explicit(&e->active_down, memory_order_relaxed) ? "down" : "up";
    json_object_set_new(o, "active_check", json_text(active));
    json_object_set_new(o, "consecutive_failures",
                        json_integer(load_u32(&e->consecutive_failures)));
    json_object_set_new(o, "ejections", json_integer(load_u32(&e->ejections)));
    json_t *src = json_array();
    for (int s = 0; s < SL_POOL_SRC_COUNT; s++)
        if (sources & (1u << s))
            json_array_append_new(src, json_text(source_names[s]));
    json_object_set_new(o, "sources", src);
    return o;
}

static json_t *upstream_json(const struct sl_upstream_conf *u, struct sl_pool *p)
{
    json_t *o = json_object();
    json_object_set_new(o, "name", json_text(u->name));
    json_object_set_new(o, "balancer", json_text(balancer_name(u->balance)));
    /* The set and the source lists change together under the pool's publisher lock: read
     * both there, so each endpoint's sources are those of the set shown. */
    pthread_mutex_lock(&p->lock);
    struct sl_endpoint_set *set = p->current;
    if (set)
        sl_endpoint_set_ref(set);
    size_t n = set ? set->count : 0;
    unsigned *masks = calloc(n ? n : 1, sizeof *masks);
    for (size_t i = 0; masks && i < n; i++)
        masks[i] = sources_of(p, set->eps[i]);
    pthread_mutex_unlock(&p->lock);
    json_t *eps = json_array();
    size_t healthy = 0;
    for (size_t i = 0; i < n; i++) {
        struct sl_endpoint *e = set->eps[i];
        healthy += sl_endpoint_is_healthy(e);
        json_array_append_new(eps, endpoint_json(p, e, masks ? masks[i] : 0));
    }
    free(masks);
    if (set)
        sl_endpoint_set_unref(set);
    json_object_set_new(o, "endpoints", eps);
    json_object_set_new(o, "healthy", json_u64(healthy));
    json_object_set_new(o, "ejected", json_integer(load_u32(&p->ejected)));
    json_t *b = json_object();
    json_object_set_new(b, "connections", json_integer(load_u32(&p->connections)));
    json_object_set_new(b, "max_connections", json_integer(u->breaker.max_connections));
    json_object_set_new(b, "pending", json_integer(load_u32(&p->pending)));
    json_object_set_new(b, "max_pending", json_integer(u->breaker.max_pending));
    json_object_set_new(b, "requests", json_integer(load_u32(&p->requests)));
    json_object_set_new(b, "max_requests", json_integer(u->breaker.max_requests));
    json_object_set_new(o, "breaker", b);
    const struct sl_pool_stats *st = &p->stats;
    json_t *s = json_object();
    json_object_set_new(s, "ejections", json_u64(load_u64(&st->ejections)));
    json_object_set_new(s, "reopens", json_u64(load_u64(&st->reopens)));
    json_object_set_new(s, "half_opens", json_u64(load_u64(&st->half_opens)));
    json_object_set_new(s, "restores", json_u64(load_u64(&st->restores)));
    json_object_set_new(s, "ejections_refused", json_u64(load_u64(&st->ejections_refused)));
    json_object_set_new(s, "retries", json_u64(load_u64(&st->retries)));
    json_object_set_new(s, "retries_budget_exhausted",
                        json_u64(load_u64(&st->retries_budget_exhausted)));
    json_object_set_new(s, "overflow_connections", json_u64(load_u64(&st->overflow_connections)));
    json_object_set_new(s, "overflow_pending", json_u64(load_u64(&st->overflow_pending)));
    json_object_set_new(s, "overflow_requests", json_u64(load_u64(&st->overflow_requests)));
    json_object_set_new(s, "no_healthy_endpoint", json_u64(load_u64(&st->no_healthy_endpoint)));
    json_object_set_new(s, "active_up", json_u64(load_u64(&st->active_up)));
    json_object_set_new(s, "active_down", json_u64(load_u64(&st->active_down)));
    json_object_set_new(s, "updates", json_u64(load_u64(&st->updates)));
    json_object_set_new(o, "stats", s);
    return o;
}

/* ---- handlers ---- */

static void get_live(struct sl_request *req)
{
    respond_json(req, 200, json_pack("{s:s}", "status", "ok"));
}

static void get_ready(struct sl_admin *a, struct sl_request *req)
{
    if (atomic_load(&a->obs->draining))
        respond_json(req, 503, json_pack("{s:s}", "status", "draining"));
    else if (!atomic_load(&a->obs->started))
        respond_json(req, 503, json_pack("{s:s}", "status", "starting"));
    else
        respond_json(req, 200, json_pack("{s:s}", "status", "ready"));
}

static void get_routes(struct sl_admin *a, struct sl_request *req)
{
    struct sl_runtime *rt = acquire_rt(a);
    if (!rt) {
        respond_error(req, 503, "not_running", "the gateway is not running");
        return;
    }
    struct sl_metrics_totals t;
    memset(&t, 0, sizeof t);
    if (a->obs->metrics)
        sl_metrics_totals(a->obs->metrics, &t, true);
    json_t *j = routes_json(rt->cfg, &t);
    sl_metrics_totals_dispose(&t);
    sl_runtime_release(rt);
    respond_json(req, 200, j);
}

static void get_upstreams(struct sl_admin *a, struct sl_request *req, const char *name)
{
    struct sl_runtime *rt = acquire_rt(a);
    if (!rt) {
        respond_error(req, 503, "not_running", "the gateway is not running");
        return;
    }
    const struct sl_config *cfg = rt->cfg;
    json_t *j = NULL;
    if (name) {
        ssize_t i = upstream_index(cfg, name);
        if (i >= 0)
            j = upstream_json(&cfg->upstreams[i], rt->pools[i]);
    } else {
        j = json_array();
        for (size_t i = 0; i < cfg->upstream_count; i++)
            json_array_append_new(j, upstream_json(&cfg->upstreams[i], rt->pools[i]));
    }
    sl_runtime_release(rt);
    if (name && !j) {
        respond_error(req, 404, "unknown_upstream", "there is no upstream named '%s'", name);
        return;
    }
    respond_json(req, 200, j);
}

/* HEAD /metrics: the headers only. Rendering is not free of effects (it resets the max-lag
 * gauges and moves the CPU sample), so a HEAD, which a monitor may send to check the port,
 * does not render, and so announces no length. */
static void head_metrics(struct sl_request *req)
{
    char head[512];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 200 %s\r\nContent-Type: text/plain; version=0.0.4; "
                     "charset=utf-8\r\nX-Request-Id: %.*s\r\n" COMMON_HEADERS,
                     sl_http_reason(200), (int)req->request_id.len,
                     req->request_id.ptr ? req->request_id.ptr : "");
    bool ok = n > 0 && (size_t)n < sizeof head &&
              sl_request_respond_head(req, 200, head, (size_t)n, SL_H1_BODY_NONE, 0) == 0;
    sl_request_finish(req, ok);
}

static void get_metrics(struct sl_admin *a, struct sl_request *req)
{
    if (req->method_bit == SL_METHOD_HEAD) {
        head_metrics(req);
        return;
    }
    size_t len = 0;
    char *text = sl_metrics_render(a->obs, &len);
    char *body = text ? sl_arena_dup(&req->arena, text, len) : NULL;
    free(text);
    if (!body && len) {
        respond_error(req, 503, "out_of_memory", "out of memory rendering the metrics");
        return;
    }
    respond_raw(req, 200, "text/plain; version=0.0.4; charset=utf-8", COMMON_HEADERS,
                body ? body : "", body ? len : 0);
}

static void get_page(struct sl_request *req)
{
    char extra[512];
    snprintf(extra, sizeof extra,
             "Content-Security-Policy: %s\r\nReferrer-Policy: no-referrer\r\n"
             "X-Frame-Options: DENY\r\n" COMMON_HEADERS,
             sl_status_page_csp());
    size_t len = 0;
    const char *page = sl_status_page(&len);
    respond_raw(req, 200, "text/html; charset=utf-8", extra, page, len);
}

static void post_drain(struct sl_admin *a, struct sl_request *req)
{
    struct sl_obs *obs = a->obs;
    if (!obs->request_drain) {
        respond_error(req, 503, "drain_unavailable", "this process cannot drain on request");
        return;
    }
    SL_INFO("admin: drain requested through the admin API (client %.*s)", (int)req->client_ip.len,
            req->client_ip.ptr);
    /* /ready turns 503 before this answer leaves, not when the main thread gets to it: a
     * script that drains and then watches /ready sees the change at once. */
    atomic_store(&obs->draining, true);
    obs->request_drain(obs, "admin API");
    respond_json(req, 202, json_pack("{s:s}", "status", "draining"));
}

static void reload_answer(struct sl_request *req, struct reload_job *job)
{
    if (job->rc == 0) {
        respond_json(req, 200,
                     json_pack("{s:s,s:I}", "status", "reloaded", "generation",
                               (json_int_t)job->generation));
        return;
    }
    char *msg = job->msg;
    size_t n = strlen(msg);
    while (n && msg[n - 1] == '\n')
        msg[--n] = '\0';
    json_t *o = json_object();
    json_object_set_new(o, "status", json_text("rejected"));
    json_object_set_new(o, "errors", json_text(msg[0] ? msg : "the configuration was rejected"));
    respond_json(req, 400, o);
}

/* On the admin loop, once the reload thread is done. */
static void reload_done(struct sl_post *p)
{
    struct reload_job *job = p->data;
    struct sl_admin *a = job->a;
    a->job = NULL;
    if (job->req)
        reload_answer(job->req, job);
    free(job);
}

static void *reload_main(void *arg)
{
    struct reload_job *job = arg;
    struct sl_admin *a = job->a;
    struct sl_obs *obs = a->obs;
    /* No admin lock is held, so the reload may call sl_admin_on_reload. */
    job->rc = obs->reload(obs, job->msg, sizeof job->msg);
    job->msg[sizeof job->msg - 1] = '\0';
    pthread_mutex_lock(&obs->hist_lock);
    job->generation = obs->generation;
    pthread_mutex_unlock(&obs->hist_lock);
    /* The job belongs to the admin loop from the post on: not touched after it. */
    pthread_mutex_lock(&a->job_lock);
    sl_loop_post(a->srv.loop, &job->post);
    a->job_threads--;
    pthread_cond_broadcast(&a->job_cond);
    pthread_mutex_unlock(&a->job_lock);
    return NULL;
}

static void post_reload(struct sl_admin *a, struct sl_request *req)
{
    struct sl_obs *obs = a->obs;
    if (!obs->reload) {
        respond_error(req, 503, "reload_unavailable", "this process cannot reload on request");
        return;
    }
    if (a->job) {
        respond_error(req, 409, "reload_in_progress",
                      "a reload requested through the admin API is running; retry when it ends");
        return;
    }
    struct reload_job *job = calloc(1, sizeof *job);
    if (!job) {
        respond_error(req, 503, "out_of_memory", "out of memory");
        return;
    }
    job->a = a;
    job->req = req;
    job->post.cb = reload_done;
    job->post.data = job;
    SL_INFO("admin: configuration reload requested through the admin API (client %.*s)",
            (int)req->client_ip.len, req->client_ip.ptr);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    pthread_mutex_lock(&a->job_lock);
    int rc = pthread_create(&t, &attr, reload_main, job);
    if (rc == 0)
        a->job_threads++;
    pthread_mutex_unlock(&a->job_lock);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        free(job);
        respond_error(req, 503, "reload_unavailable", "cannot start the reload: %s", strerror(rc));
        return;
    }
    /* Answered by reload_done; on_abort forgets the request if the client leaves first. */
    a->job = job;
}

static const char add_usage[] =
    "the body must be a JSON object like {\"address\":\"10.0.0.5:8080\",\"weight\":1,"
    "\"zone\":\"a\"} (weight and zone optional)";

static void post_endpoint(struct sl_admin *a, struct sl_request *req, const char *upstream,
                          const char *body, size_t len)
{
    json_error_t jerr;
    json_t *j = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!j) {
        respond_error(req, 400, "bad_json", "invalid JSON at line %d column %d: %s; %s", jerr.line,
                      jerr.column, jerr.text, add_usage);
        return;
    }
    const char *key;
    json_t *val;
    const char *why = NULL;
    if (!json_is_object(j))
        why = add_usage;
    json_object_foreach(j, key, val)
    {
        if (strcmp(key, "address") != 0 && strcmp(key, "weight") != 0 && strcmp(key, "zone") != 0)
            why = "unknown key in the body (known: address, weight, zone)";
    }
    json_t *jaddr = json_object_get(j, "address");
    json_t *jweight = json_object_get(j, "weight");
    json_t *jzone = json_object_get(j, "zone");
    char canon[INET6_ADDRSTRLEN + 16];
    struct admin_ep ep = {.weight = 1};
    if (!why && !json_is_string(jaddr))
        why = "\"address\" (a string, ip:port) is required";
    if (!why && (why = parse_ip_port(json_string_value(jaddr), &ep.addr, &ep.addr_len, canon,
                                     sizeof canon)) != NULL) {
        respond_error(req, 400, "bad_address", "address '%s': %s", json_string_value(jaddr), why);
        json_decref(j);
        return;
    }
    if (!why && jweight) {
        if (!json_is_integer(jweight) || json_integer_value(jweight) < 1 ||
            json_integer_value(jweight) > 1000)
            why = "\"weight\" must be an integer from 1 to 1000";
        else
            ep.weight = (uint32_t)json_integer_value(jweight);
    }
    if (!why && jzone && !json_is_null(jzone) &&
        (!json_is_string(jzone) ||
         !sl_config_is_name(json_string_value(jzone), json_string_length(jzone)))) {
        respond_error(req, 400, "bad_zone",
                      "\"zone\" must be 1 to 64 letters, digits, '_', '-' or '.' (as zones in "
                      "the config)");
        json_decref(j);
        return;
    }
    if (why) {
        respond_error(req, 400, "bad_request", "%s", why);
        json_decref(j);
        return;
    }
    bool has_zone = jzone && json_is_string(jzone);
    ep.address = strdup(canon);
    ep.zone = has_zone ? strdup(json_string_value(jzone)) : NULL;
    json_decref(j);
    if (!ep.address || (has_zone && !ep.zone)) {
        admin_ep_dispose(&ep);
        respond_error(req, 503, "out_of_memory", "out of memory");
        return;
    }

    struct admin_target t;
    int status = target_lock(a, upstream, &t);
    struct admin_list *l = t.l;
    for (size_t i = 0; !status && l && i < l->count; i++)
        if (same_sockaddr(&l->eps[i].addr, &ep.addr))
            status = 409;
    if (!status && l && l->count >= ADMIN_MAX_EPS)
        status = 429; /* answered as 409 too_many_endpoints */
    if (!status && !l) {
        l = calloc(1, sizeof *l);
        if (l && !(l->upstream = strdup(upstream))) {
            free(l);
            l = NULL;
        }
        if (l)
            *t.pp = l;
        else
            status = 503;
    }
    if (!status && l->count == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 4;
        struct admin_ep *eps = realloc(l->eps, cap * sizeof *eps);
        if (eps) {
            l->eps = eps;
            l->cap = cap;
        } else {
            status = 503;
        }
    }
    if (!status) {
        l->eps[l->count++] = ep;
        if (apply_list(t.rt->pools[t.ui], l) < 0) {
            l->count--;
            status = 503;
        } else {
            status = 201;
        }
    }
    if (l && l->count == 0) {
        *find_list(a, upstream) = l->next;
        admin_list_free(l);
    }
    target_unlock(a, &t);

    if (status == 201) {
        SL_INFO("admin: endpoint %s (weight %u%s%s) added to upstream %s", ep.address, ep.weight,
                ep.zone ? ", zone " : "", ep.zone ? ep.zone : "", upstream);
        json_t *o = json_object();
        json_object_set_new(o, "upstream", json_text(upstream));
        json_object_set_new(o, "address", json_text(ep.address));
        json_object_set_new(o, "weight", json_integer(ep.weight));
        json_object_set_new(o, "zone", json_str_or_null(ep.zone));
        json_object_set_new(o, "source", json_text("admin"));
        respond_json(req, 201, o);
        return; /* the list owns ep's strings now */
    }
    if (status == 404)
        respond_error(req, 404, "unknown_upstream", "there is no upstream named '%s'", upstream);
    else if (status == 409)
        respond_error(req, 409, "already_listed",
                      "upstream %s already has %s from the admin API (DELETE it first to change "
                      "its weight or zone)",
                      upstream, ep.address);
    else if (status == 429)
        respond_error(req, 409, "too_many_endpoints",
                      "upstream %s already has %d endpoints from the admin API", upstream,
                      ADMIN_MAX_EPS);
    else if (!t.rt)
        respond_error(req, 503, "not_running", "the gateway is not running");
    else
        respond_error(req, 503, "out_of_memory", "out of memory");
    admin_ep_dispose(&ep);
}

static void delete_endpoint(struct sl_admin *a, struct sl_request *req, const char *upstream,
                            const char *address)
{
    struct sockaddr_storage ss;
    socklen_t sslen = 0;
    char canon[INET6_ADDRSTRLEN + 16];
    bool parsed = parse_ip_port(address, &ss, &sslen, canon, sizeof canon) == NULL;
    unsigned others = 0; /* sources other than the admin that list it */
    struct admin_target t;
    int status = target_lock(a, upstream, &t);
    struct admin_list *l = t.l;
    if (!status) {
        size_t at = SIZE_MAX;
        for (size_t i = 0; parsed && l && i < l->count && at == SIZE_MAX; i++)
            if (same_sockaddr(&l->eps[i].addr, &ss))
                at = i;
        if (at == SIZE_MAX) {
            status = 404;
            struct sl_pool *p = t.rt->pools[t.ui];
            pthread_mutex_lock(&p->lock);
            for (int s = 0; s < SL_POOL_SRC_ADMIN; s++)
                for (size_t i = 0; i < p->src_count[s]; i++) {
                    const struct sl_endpoint_spec *sp = &p->src[s][i];
                    if ((sp->address && strcmp(sp->address, address) == 0) ||
                        (parsed && sp->addr_len && same_sockaddr(&sp->addr, &ss)))
                        others |= 1u << s;
                }
            pthread_mutex_unlock(&p->lock);
        } else {
            struct admin_ep gone = l->eps[at];
            memmove(&l->eps[at], &l->eps[at + 1], (l->count - at - 1) * sizeof *l->eps);
            l->count--;
            if (apply_list(t.rt->pools[t.ui], l) < 0) {
                /* put it back where it was: the pool still has it */
                memmove(&l->eps[at + 1], &l->eps[at], (l->count - at) * sizeof *l->eps);
                l->eps[at] = gone;
                l->count++;
                status = 503;
            } else {
                admin_ep_dispose(&gone);
                status = 204;
                if (l->count == 0) {
                    *t.pp = l->next;
                    admin_list_free(l);
                }
            }
        }
    }
    target_unlock(a, &t);
    if (status == 204) {
        SL_INFO("admin: endpoint %s removed from upstream %s", canon, upstream);
        respond_raw(req, 204, "application/json", COMMON_HEADERS, "", 0);
    } else if (status == 503) {
        if (!t.rt)
            respond_error(req, 503, "not_running", "the gateway is not running");
        else
            respond_error(req, 503, "out_of_memory", "out of memory");
    } else if (t.ui < 0) {
        respond_error(req, 404, "unknown_upstream", "there is no upstream named '%s'", upstream);
    } else if (others & (1u << SL_POOL_SRC_CONFIG)) {
        respond_error(req, 404, "not_admin_endpoint",
                      "endpoint %s of upstream %s comes from the configuration file, not the "
                      "admin API: remove it there and reload",
                      address, upstream);
    } else if (others & (1u << SL_POOL_SRC_DISCOVERY)) {
        respond_error(req, 404, "not_admin_endpoint",
                      "endpoint %s of upstream %s comes from the upstream's discovery, not the "
                      "admin API: it changes with what discovery finds",
                      address, upstream);
    } else {
        respond_error(req, 404, "unknown_endpoint",
                      "upstream %s has no endpoint %s added through the admin API", upstream,
                      address);
    }
}

/* ---- request bodies ---- */

static void run_with_body(struct sl_request *req)
{
    struct admin_req *ar = req->handler_state;
    switch (ar->op) {
    case OP_ADD_ENDPOINT:
        post_endpoint(ar->a, req, ar->upstream, ar->body ? ar->body : "", ar->len);
        break;
    case OP_RELOAD:
        post_reload(ar->a, req);
        break;
    case OP_DRAIN:
        post_drain(ar->a, req);
        break;
    default:
        respond_error(req, 500, "internal", "no operation");
        break;
    }
}

/* Reads the whole body (bounded by the listener's 64 KiB) into the arena, then runs the op. */
static void read_body(struct sl_request *req)
{
    struct admin_req *ar = req->handler_state;
    for (;;) {
        struct sl_slice d;
        int status = 0;
        enum sl_status st = sl_request_body_peek(req, &d, &status);
        if (st == SL_AGAIN)
            return; /* on_body follows (or on_abort) */
        if (st == SL_ERROR) {
            if (status == 413)
                respond_error(req, 413, "body_too_large", "the body is larger than 64 KiB");
            else if (status == 408)
                respond_error(req, 408, "body_timeout", "the body did not arrive in time");
            else
                respond_error(req, 400, "bad_body", "the request body is malformed");
            return;
        }
        if (st == SL_DONE) {
            run_with_body(req);
            return;
        }
        if (d.len > ar->cap - ar->len) {
            respond_error(req, 413, "body_too_large", "the body is larger than 64 KiB");
            return;
        }
        memcpy(ar->body + ar->len, d.ptr, d.len);
        ar->len += d.len;
        sl_request_body_consume(req, d.len);
    }
}

static void start_body(struct sl_admin *a, struct sl_request *req, enum admin_op op,
                       const char *upstream)
{
    struct admin_req *ar = sl_arena_alloc(&req->arena, sizeof *ar);
    size_t cap = ADMIN_BODY_BYTES;
    if (req->body_kind == SL_H1_BODY_LENGTH && req->content_length < cap)
        cap = (size_t)req->content_length;
    char *buf = ar ? sl_arena_alloc(&req->arena, cap ? cap : 1) : NULL;
    if (!buf) {
        respond_error(req, 503, "out_of_memory", "out of memory");
        return;
    }
    *ar = (struct admin_req){.a = a, .op = op, .upstream = upstream, .body = buf, .cap = cap};
    req->handler_state = ar;
    read_body(req);
}

/* ---- dispatch ---- */

#define M_GET (SL_METHOD_GET | SL_METHOD_HEAD)

static bool method_ok(struct sl_request *req, unsigned allowed, const char *allow)
{
    if (req->method_bit & allowed)
        return true;
    char extra[160];
    snprintf(extra, sizeof extra, "Allow: %s\r\n" COMMON_HEADERS, allow);
    respond_error_extra(req, 405, "method_not_allowed", extra,
                        "%.*s is not allowed here (allowed: %s)", (int)req->method.len,
                        req->method.ptr, allow);
    return false;
}

static void on_request(struct sl_request *req)
{
    struct sl_admin *a = req->handler_ctx;
    req->handler_state = NULL;
    struct sl_slice path = req->path;
    /* Split into at most 4 segments after the leading '/'. */
    struct sl_slice seg[5];
    size_t nseg = 0;
    bool bad = path.len == 0 || path.ptr[0] != '/';
    size_t i = 1;
    while (!bad && i < path.len) {
        size_t j = i;
        while (j < path.len && path.ptr[j] != '/')
            j++;
        if (j == i || nseg == 4) {
            bad = true;
            break;
        }
        seg[nseg++] = sl_slice_make(path.ptr + i, j - i);
        i = j + 1;
        if (j + 1 == path.len && j < path.len)
            bad = true; /* trailing slash */
    }
#define IS(k, lit) sl_slice_eq(seg[k], SL_SLICE_LIT(lit))
    /* A web page in a browser on this host can reach a loopback admin: it cannot set Origin
     * (so a foreign one is refused) nor, when it got here by DNS rebinding, a Host that is an
     * address literal (so a name is refused unless a token protects the API anyway). */
    if (!origin_ok(req)) {
        respond_error(req, 403, "cross_origin",
                      "a request from another origin (Origin header) is refused");
        return;
    }
    struct sl_slice host;
    if (!a->auth && sl_request_header(req, "Host", &host) && !host_is_literal(host)) {
        respond_error(req, 403, "bad_host",
                      "without a token the Host header must be an IP address or localhost");
        return;
    }
    /* The probes load balancers send, and the page (which holds no data; its script sends
     * the token it was given), need no token. */
    bool public =
        !bad &&
        (nseg == 0 || (nseg == 1 && (IS(0, "live") || IS(0, "ready") || IS(0, "status.html"))));
    if (!public && !authorized(a, req)) {
        respond_error_extra(req, 401, "unauthorized",
                            "WWW-Authenticate: Bearer realm=\"sluice-admin\"\r\n" COMMON_HEADERS,
                            "this endpoint needs Authorization: Bearer <token> (the admin "
                            "token_file's token)");
        return;
    }
    if (bad)
        goto not_found;
    if (nseg == 0 || (nseg == 1 && IS(0, "status.html"))) {
        if (method_ok(req, M_GET, "GET, HEAD"))
            get_page(req);
        return;
    }
    if (nseg == 1) {
        if (IS(0, "live")) {
            if (method_ok(req, M_GET, "GET, HEAD"))
                get_live(req);
        } else if (IS(0, "ready")) {
            if (method_ok(req, M_GET, "GET, HEAD"))
                get_ready(a, req);
        } else if (IS(0, "status")) {
            if (method_ok(req, M_GET, "GET, HEAD"))
                respond_json(req, 200, status_json(a));
        } else if (IS(0, "routes")) {
            if (method_ok(req, M_GET, "GET, HEAD"))
                get_routes(a, req);
        } else if (IS(0, "upstreams")) {
            if (method_ok(req, M_GET, "GET, HEAD"))
                get_upstreams(a, req, NULL);
        } else if (IS(0, "metrics")) {
            if (method_ok(req, M_GET, "GET, HEAD"))
                get_metrics(a, req);
        } else if (IS(0, "reload")) {
            if (method_ok(req, SL_METHOD_POST, "POST"))
                start_body(a, req, OP_RELOAD, NULL);
        } else if (IS(0, "drain")) {
            if (method_ok(req, SL_METHOD_POST, "POST"))
                start_body(a, req, OP_DRAIN, NULL);
        } else {
            goto not_found;
        }
        return;
    }
    if (!IS(0, "upstreams") || (nseg >= 3 && !IS(2, "endpoints")))
        goto not_found;
    char *name = decode_segment(req, seg[1]);
    if (!name)
        goto not_found;
    if (nseg == 2) {
        if (method_ok(req, M_GET, "GET, HEAD"))
            get_upstreams(a, req, name);
        return;
    }
    if (nseg == 3) {
        if (!method_ok(req, SL_METHOD_POST, "POST"))
            return;
        /* A form or a no-cors fetch cannot send application/json without a preflight. */
        if (!is_json_body(req)) {
            respond_error(req, 415, "unsupported_media_type",
                          "the body must be sent as Content-Type: application/json");
            return;
        }
        start_body(a, req, OP_ADD_ENDPOINT, name);
        return;
    }
    char *addr = decode_segment(req, seg[3]);
    if (!addr)
        goto not_found;
    if (method_ok(req, SL_METHOD_DELETE, "DELETE"))
        delete_endpoint(a, req, name, addr);
    return;
#undef IS
not_found:
    respond_error(req, 404, "not_found", "no admin endpoint at %.*s (see docs/admin-api.md)",
                  (int)(path.len > 200 ? 200 : path.len), path.ptr);
}

static void on_body(struct sl_request *req)
{
    if (req->handler_state)
        read_body(req);
}

static void on_writable(struct sl_request *req)
{
    /* Whole responses are queued by sl_request_respond, which flushes them itself. */
    (void)req;
}

static void on_abort(struct sl_request *req)
{
    /* Everything a request holds lives in its arena, but a running reload answers it later. */
    struct sl_admin *a = req->handler_ctx;
    if (a && a->job && a->job->req == req)
        a->job->req = NULL;
}

/* ---- the admin thread ---- */

static void on_accept(struct sl_acceptor *acc, int fd, const struct sockaddr *peer,
                      socklen_t peer_len)
{
    struct sl_admin *a = acc->data;
    if (a->srv.conn_count >= ADMIN_MAX_CONNS) {
        close(fd);
        a->conns_refused++;
        if (a->stretch_refused++ == 0)
            SL_WARN("admin: %d connections are open; closing new ones until one ends",
                    ADMIN_MAX_CONNS);
        return;
    }
    if (a->stretch_refused) {
        SL_INFO("admin: accepting connections again (%llu closed at once meanwhile)",
                (unsigned long long)a->stretch_refused);
        a->stretch_refused = 0;
    }
    sl_h1_server_accept(&a->srv, fd, peer, peer_len);
}

static int admin_init(struct sl_worker *w, void *data)
{
    struct sl_admin *a = data;
    /* Not a gateway worker: log lines carry "admin:" instead of a worker number. */
    sl_log_set_worker_id(-1);
    int rc = sl_h1_server_init(&a->srv, w, "admin", &a->limits, &a->handler);
    if (rc < 0)
        return rc;
    a->srv_ready = true;
    int fd = a->listen_fd;
    a->listen_fd = -1;
    return sl_acceptor_start(&a->acceptor, &w->loop, fd, on_accept, a);
}

static void admin_command(struct sl_worker *w, unsigned cmds, void *data)
{
    (void)data;
    if (cmds & (SL_WORKER_CMD_STOP | SL_WORKER_CMD_DRAIN))
        sl_loop_stop(&w->loop);
}

static void admin_fini(struct sl_worker *w, void *data)
{
    struct sl_admin *a = data;
    sl_acceptor_stop(&a->acceptor);
    if (a->srv_ready) {
        sl_h1_server_dispose(&a->srv);
        a->srv_ready = false;
    }
    sl_loop_run_deferred(&w->loop);
}

static const struct sl_worker_hooks admin_hooks = {
    .init = admin_init,
    .on_command = admin_command,
    .fini = admin_fini,
};

static void admin_free(struct sl_admin *a)
{
    if (a->listen_fd >= 0)
        close(a->listen_fd);
    while (a->lists) {
        struct admin_list *l = a->lists;
        a->lists = l->next;
        admin_list_free(l);
    }
    pthread_mutex_destroy(&a->lock);
    pthread_mutex_destroy(&a->job_lock);
    pthread_cond_destroy(&a->job_cond);
    OPENSSL_cleanse(a->token_sha256, sizeof a->token_sha256);
    free(a->address);
    free(a);
}

struct sl_admin *sl_admin_start(struct sl_obs *obs, const struct sl_admin_conf *conf, char *err,
                                size_t err_len)
{
    if (err_len)
        err[0] = '\0';
    struct sl_admin *a = calloc(1, sizeof *a);
    if (!a || !(a->address = strdup(conf->address ? conf->address : "?"))) {
        free(a);
        snprintf(err, err_len, "admin: out of memory");
        return NULL;
    }
    a->obs = obs;
    a->listen_fd = -1;
    a->acceptor.io.fd = -1;
    pthread_mutex_init(&a->lock, NULL);
    pthread_mutex_init(&a->job_lock, NULL);
    pthread_cond_init(&a->job_cond, NULL);
    a->limits = (struct sl_limits_conf){
        .max_header_bytes = ADMIN_HEAD_BYTES,
        .max_header_count = 64,
        .max_uri_bytes = 4096,
        .max_body_bytes = ADMIN_BODY_BYTES,
        .header_timeout_ms = ADMIN_TIMEOUT_MS,
        .body_timeout_ms = ADMIN_TIMEOUT_MS,
        .min_body_rate = 0,
        .idle_timeout_ms = ADMIN_TIMEOUT_MS,
        .send_timeout_ms = ADMIN_TIMEOUT_MS,
    };
    a->handler = (struct sl_request_handler){
        .on_request = on_request,
        .on_body = on_body,
        .on_writable = on_writable,
        .on_abort = on_abort,
        .data = a,
    };
    if (conf->token_file && load_token(a, conf->token_file, err, err_len) < 0)
        goto fail;
    if (!conf->loopback && !a->auth) {
        /* The loader refuses this; a caller that built the conf by hand gets the same rule. */
        snprintf(err, err_len, "admin: %s is not a loopback address: token_file is required",
                 a->address);
        goto fail;
    }
    const struct sockaddr *sa = (const struct sockaddr *)&conf->addr;
    int rc = sl_listen_probe(sa, conf->addr_len);
    int fd = rc < 0 ? rc : sl_listen_socket(sa, conf->addr_len, 128);
    if (fd < 0) {
        snprintf(err, err_len, "admin: cannot listen on %s: %s", a->address, strerror(-fd));
        goto fail;
    }
    a->listen_fd = fd;
    int werr = 0;
    a->worker = sl_workers_start(1, ADMIN_BUF_BYTES, &admin_hooks, a, &werr);
    if (!a->worker) {
        snprintf(err, err_len, "admin: cannot start the admin thread: %s", strerror(-werr));
        goto fail;
    }
    SL_INFO("admin: listening on %s (%s)", a->address,
            a->auth ? "bearer token required" : "loopback, no token");
    return a;
fail:
    admin_free(a);
    return NULL;
}

void sl_admin_stop(struct sl_admin *a)
{
    if (!a)
        return;
    if (a->worker) {
        sl_worker_post(a->worker, SL_WORKER_CMD_STOP);
        /* A reload thread posts to the admin loop when it ends: wait for it while the loop
         * still exists (the reload itself needs nothing from this thread). */
        pthread_mutex_lock(&a->job_lock);
        while (a->job_threads > 0)
            pthread_cond_wait(&a->job_cond, &a->job_lock);
        pthread_mutex_unlock(&a->job_lock);
        sl_workers_free(a->worker, 1);
        a->worker = NULL;
    }
    /* Its post did not run if the loop had stopped first. */
    free(a->job);
    a->job = NULL;
    admin_free(a);
}
