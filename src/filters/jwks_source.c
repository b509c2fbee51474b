#include "filters/jwks_source.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "core/fmt.h"
#include "core/log.h"
#include "filters/jwks_source_internal.h"

#define DEFAULT_REFRESH_MS (5u * 60u * 1000u)
#define DEFAULT_REFRESH_MIN_MS (60u * 1000u)
#define DEFAULT_REFRESH_MAX_MS (24u * 3600u * 1000u)
#define DEFAULT_REFETCH_MIN_INTERVAL_MS (30u * 1000u)
#define DEFAULT_TIMEOUT_MS (5u * 1000u)
#define DEFAULT_MAX_BYTES ((size_t)1 << 20)
#define MAX_MAX_BYTES ((size_t)1 << 30)

#define HEAD_MAX_BYTES (16u * 1024u) /* status line + headers (+ chunk trailers) */
#define CHUNK_LINE_MAX 4096u
#define URL_MAX_LEN 2048u
#define BACKOFF_FIRST_MS 1000u
#define ERR_LEN 256u
#define MAX_AGE_CAP ((int64_t)1 << 62)

/* ---- the source ---------------------------------------------------------------------------- */

enum source_kind { SOURCE_URL, SOURCE_FILE };

struct url {
    bool https;
    bool host_is_ip; /* literal: no SNI, IP SAN check instead of DNS name */
    char host[256];  /* without brackets */
    char port[6];
    char *path;          /* origin-form request target, starts with '/' */
    char authority[272]; /* Host header value */
};

struct sl_jwks_source {
    enum source_kind kind;
    struct sl_jwks_source_opts opts; /* defaults filled in; ca_file owned */
    bool allow_oct;
    char *file_path;
    struct url url;
    SSL_CTX *ssl_ctx; /* https only; SSL_CTX is safe to share for SSL_new across threads */

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

static bool is_ows(char c)
{
    return c == ' ' || c == '\t';
}

static char lower(char c)
{
    return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
}

static bool ieq(const char *a, size_t alen, const char *b)
{
    size_t blen = strlen(b);
    if (alen != blen)
        return false;
    for (size_t i = 0; i < alen; i++)
        if (lower(a[i]) != lower(b[i]))
            return false;
    return true;
}

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
        while (i < len && (is_ows(v[i]) || v[i] == ','))
            i++;
        size_t name = i;
        while (i < len && v[i] != '=' && v[i] != ',' && !is_ows(v[i]))
            i++;
        size_t name_len = i - name;
        while (i < len && is_ows(v[i]))
            i++;
        if (i >= len || v[i] != '=') {
            continue; /* a directive without a value (or the end) */
        }
        i++;
        while (i < len && is_ows(v[i]))
            i++;
        bool quoted = i < len && v[i] == '"';
        size_t val = quoted ? ++i : i;
        if (quoted) {
            while (i < len && v[i] != '"')
                i += (v[i] == '\\' && i + 1 < len) ? 2 : 1;
        } else {
            while (i < len && v[i] != ',' && !is_ows(v[i]))
                i++;
        }
        size_t val_end = i < len ? i : len;
        if (quoted && i < len)
            i++; /* closing quote */
        if (!ieq(v + name, name_len, "max-age"))
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

/* ---- URL ----------------------------------------------------------------------------------- */

static bool is_host_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.' || c == '_';
}

static int parse_url(const char *s, struct url *u, char *err, size_t err_len)
{
    memset(u, 0, sizeof *u);
    size_t len = strlen(s);
    if (len > URL_MAX_LEN) {
        sl_fmt_err(err, err_len, "URL longer than %u bytes", URL_MAX_LEN);
        return -EINVAL;
    }
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c <= 0x20 || c >= 0x7f) {
            sl_fmt_err(err, err_len, "URL contains a space or control character");
            return -EINVAL;
        }
    }
    const char *p;
    if (len >= 8 && ieq(s, 8, "https://")) {
        u->https = true;
        p = s + 8;
    } else if (len >= 7 && ieq(s, 7, "http://")) {
        p = s + 7;
    } else {
        sl_fmt_err(err, err_len, "URL scheme must be http or https");
        return -EINVAL;
    }
    if (strchr(p, '#')) {
        sl_fmt_err(err, err_len, "URL must not have a fragment");
        return -EINVAL;
    }
    size_t auth_len = strcspn(p, "/?");
    const char *rest = p + auth_len;
    if (memchr(p, '@', auth_len)) {
        sl_fmt_err(err, err_len, "URL must not carry user information");
        return -EINVAL;
    }
    const char *h = p, *hend;
    const char *port_s = NULL;
    if (auth_len > 0 && p[0] == '[') {
        const char *close = memchr(p, ']', auth_len);
        if (!close) {
            sl_fmt_err(err, err_len, "URL has an unterminated IPv6 address");
            return -EINVAL;
        }
        h = p + 1;
        hend = close;
        if (close + 1 < p + auth_len) {
            if (close[1] != ':') {
                sl_fmt_err(err, err_len, "URL has junk after the IPv6 address");
                return -EINVAL;
            }
            port_s = close + 2;
        }
        size_t hl = (size_t)(hend - h);
        if (hl == 0 || hl >= sizeof u->host) {
            sl_fmt_err(err, err_len, "URL has a bad IPv6 address");
            return -EINVAL;
        }
        memcpy(u->host, h, hl);
        u->host[hl] = '\0';
        struct in6_addr a6;
        if (inet_pton(AF_INET6, u->host, &a6) != 1) {
            sl_fmt_err(err, err_len, "URL has a bad IPv6 address");
            return -EINVAL;
        }
        u->host_is_ip = true;
    } else {
        const char *colon = memchr(p, ':', auth_len);
        hend = colon ? colon : p + auth_len;
        if (colon)
            port_s = colon + 1;
        size_t hl = (size_t)(hend - h);
        if (hl == 0 || hl > 253) {
            sl_fmt_err(err, err_len, "URL has no host or one too long");
            return -EINVAL;
        }
        for (size_t i = 0; i < hl; i++) {
            if (!is_host_char(h[i])) {
                sl_fmt_err(err, err_len, "URL host has an invalid character");
                return -EINVAL;
            }
        }
        memcpy(u->host, h, hl);
        u->host[hl] = '\0';
        struct in_addr a4;
        u->host_is_ip = inet_pton(AF_INET, u->host, &a4) == 1;
    }
    unsigned port = u->https ? 443 : 80;
    bool explicit_port = false;
    if (port_s) {
        size_t pl = (size_t)(rest - port_s);
        if (pl == 0 || pl > 5) {
            sl_fmt_err(err, err_len, "URL has a bad port");
            return -EINVAL;
        }
        port = 0;
        for (size_t i = 0; i < pl; i++) {
            if (port_s[i] < '0' || port_s[i] > '9') {
                sl_fmt_err(err, err_len, "URL has a bad port");
                return -EINVAL;
            }
            port = port * 10 + (unsigned)(port_s[i] - '0');
        }
        if (port == 0 || port > 65535) {
            sl_fmt_err(err, err_len, "URL port out of range");
            return -EINVAL;
        }
        explicit_port = true;
    }
    snprintf(u->port, sizeof u->port, "%u", port);
    bool v6 = strchr(u->host, ':') != NULL;
    bool default_port = port == (u->https ? 443u : 80u);
    if (explicit_port && !default_port)
        snprintf(u->authority, sizeof u->authority, "%s%s%s:%u", v6 ? "[" : "", u->host,
                 v6 ? "]" : "", port);
    else
        snprintf(u->authority, sizeof u->authority, "%s%s%s", v6 ? "[" : "", u->host,
                 v6 ? "]" : "");
    size_t rl = strlen(rest);
    bool need_slash = rl == 0 || rest[0] == '?';
    u->path = malloc(rl + 2);
    if (!u->path) {
        sl_fmt_err(err, err_len, "out of memory");
        return -ENOMEM;
    }
    size_t o = 0;
    if (need_slash)
        u->path[o++] = '/';
    memcpy(u->path + o, rest, rl);
    u->path[o + rl] = '\0';
    return 0;
}

/* ---- a blocking connection bounded by a deadline ------------------------------------------- */

struct conn {
    int fd;
    SSL *ssl;
    uint64_t deadline_ms;
    char *err;
    size_t err_len;
    /* read buffer: a whole head line of HEAD_MAX_BYTES must fit */
    char buf[HEAD_MAX_BYTES + 16];
    size_t pos, len;
    bool eof;
};

static int remaining_ms(const struct conn *c)
{
    uint64_t now = sl_clock_now_ms();
    if (now >= c->deadline_ms)
        return 0;
    uint64_t left = c->deadline_ms - now;
    return left > INT32_MAX ? INT32_MAX : (int)left;
}

/* Waits for `events` on the socket until the deadline. 0, -ETIMEDOUT or -errno. */
static int wait_fd(struct conn *c, short events)
{
    for (;;) {
        int left = remaining_ms(c);
        if (left == 0)
            return -ETIMEDOUT;
        struct pollfd pfd = {.fd = c->fd, .events = events};
        int r = poll(&pfd, 1, left);
        if (r > 0)
            return 0; /* readiness or an error: the next I/O call reports which */
        if (r == 0)
            return -ETIMEDOUT;
        if (errno != EINTR)
            return -errno;
    }
}

static void ssl_err(struct conn *c, const char *what)
{
    unsigned long e = ERR_get_error();
    char buf[160] = "unknown error";
    if (e)
        ERR_error_string_n(e, buf, sizeof buf);
    if (c->ssl) {
        long vr = SSL_get_verify_result(c->ssl);
        if (vr != X509_V_OK) {
            sl_fmt_err(c->err, c->err_len, "%s: certificate: %s", what,
                       X509_verify_cert_error_string(vr));
            ERR_clear_error();
            return;
        }
    }
    sl_fmt_err(c->err, c->err_len, "%s: %s", what, buf);
    ERR_clear_error();
}

/* Handles an SSL_ERROR_WANT_*: waits, or reports. 0 to retry, <0 on failure. */
static int ssl_wait(struct conn *c, int ret, const char *what)
{
    int e = SSL_get_error(c->ssl, ret);
    int r;
    if (e == SSL_ERROR_WANT_READ)
        r = wait_fd(c, POLLIN);
    else if (e == SSL_ERROR_WANT_WRITE)
        r = wait_fd(c, POLLOUT);
    else {
        if (e == SSL_ERROR_SYSCALL && errno)
            sl_fmt_err(c->err, c->err_len, "%s: %s", what, strerror(errno));
        else
            ssl_err(c, what);
        return -EPROTO;
    }
    if (r == -ETIMEDOUT)
        sl_fmt_err(c->err, c->err_len, "%s: timed out", what);
    return r;
}

static int conn_connect(struct conn *c, const struct url *u)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    if (u->host_is_ip)
        hints.ai_flags |= AI_NUMERICHOST;
    hints.ai_flags |= AI_NUMERICSERV;
    struct addrinfo *res = NULL;
    /* Not bounded by the deadline: the libc resolver has its own timeouts, and this runs on the
     * background thread (or once at start-up). */
    int gr = getaddrinfo(u->host, u->port, &hints, &res);
    if (gr != 0) {
        sl_fmt_err(c->err, c->err_len, "resolving %s: %s", u->host, gai_strerror(gr));
        return -EHOSTUNREACH;
    }
    int rc = -ECONNREFUSED;
    sl_fmt_err(c->err, c->err_len, "connect: no address");
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd =
            socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            rc = -errno;
            sl_fmt_err(c->err, c->err_len, "socket: %s", strerror(errno));
            continue;
        }
        c->fd = fd;
        int r = connect(fd, ai->ai_addr, ai->ai_addrlen);
        if (r < 0 && errno == EINPROGRESS) {
            r = wait_fd(c, POLLOUT);
            if (r == 0) {
                int soerr = 0;
                socklen_t sl = sizeof soerr;
                if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0)
                    soerr = errno;
                r = soerr ? -soerr : 0;
            }
        } else if (r < 0) {
            r = -errno;
        }
        if (r == 0) {
            rc = 0;
            break;
        }
        rc = r;
        sl_fmt_err(c->err, c->err_len, "connect: %s", strerror(-r));
        close(fd);
        c->fd = -1;
        if (r == -ETIMEDOUT)
            break;
    }
    freeaddrinfo(res);
    return rc;
}

static int conn_tls(struct conn *c, SSL_CTX *ctx, const struct url *u)
{
    ERR_clear_error();
    c->ssl = SSL_new(ctx);
    if (!c->ssl) {
        ssl_err(c, "TLS");
        return -ENOMEM;
    }
    if (!SSL_set_fd(c->ssl, c->fd)) {
        ssl_err(c, "TLS");
        return -EPROTO;
    }
    if (u->host_is_ip) {
        /* No SNI for literals (RFC 6066 §3); the certificate must carry the IP in its SAN. */
        if (!X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), u->host)) {
            ssl_err(c, "TLS");
            return -EPROTO;
        }
    } else if (!SSL_set_tlsext_host_name(c->ssl, u->host) || !SSL_set1_host(c->ssl, u->host)) {
        ssl_err(c, "TLS");
        return -EPROTO;
    }
    SSL_set_verify(c->ssl, SSL_VERIFY_PEER, NULL);
    for (;;) {
        errno = 0;
        int r = SSL_connect(c->ssl);
        if (r == 1)
            break;
        int w = ssl_wait(c, r, "TLS handshake");
        if (w < 0)
            return w;
    }
    if (SSL_get_verify_result(c->ssl) != X509_V_OK) {
        ssl_err(c, "TLS handshake");
        return -EPROTO;
    }
    return 0;
}

/* SIGPIPE: plain writes use MSG_NOSIGNAL; OpenSSL's socket BIO uses write(), which relies on the
 * process ignoring SIGPIPE as main.c does. */
static int conn_write_all(struct conn *c, const char *p, size_t n)
{
    while (n > 0) {
        if (c->ssl) {
            size_t w = 0;
            ERR_clear_error();
            errno = 0;
            int r = SSL_write_ex(c->ssl, p, n, &w);
            if (r <= 0) {
                int e = ssl_wait(c, r, "TLS write");
                if (e < 0)
                    return e;
                continue;
            }
            p += w;
            n -= w;
        } else {
            ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    int e = wait_fd(c, POLLOUT);
                    if (e < 0) {
                        sl_fmt_err(c->err, c->err_len, "write: %s",
                                   e == -ETIMEDOUT ? "timed out" : strerror(-e));
                        return e;
                    }
                    continue;
                }
                sl_fmt_err(c->err, c->err_len, "write: %s", strerror(errno));
                return -errno;
            }
            p += w;
            n -= (size_t)w;
        }
    }
    return 0;
}

/* Reads more into the buffer (compacting it first). 0 with c->eof on a clean close. */
static int conn_fill(struct conn *c)
{
    if (c->pos > 0) {
        memmove(c->buf, c->buf + c->pos, c->len - c->pos);
        c->len -= c->pos;
        c->pos = 0;
    }
    if (c->len == sizeof c->buf) { /* callers bound lines below this; never spin */
        sl_fmt_err(c->err, c->err_len, "response line too long");
        return -E2BIG;
    }
    for (;;) {
        if (c->ssl) {
            size_t got = 0;
            ERR_clear_error();
            errno = 0;
            int r = SSL_read_ex(c->ssl, c->buf + c->len, sizeof c->buf - c->len, &got);
            if (r > 0) {
                c->len += got;
                return 0;
            }
            if (SSL_get_error(c->ssl, r) == SSL_ERROR_ZERO_RETURN) {
                c->eof = true;
                return 0;
            }
            /* An EOF without close_notify is an error here (OpenSSL 3 reports it as one): a
             * body delimited by the close must not be truncated by an attacker. */
            int e = ssl_wait(c, r, "TLS read");
            if (e < 0)
                return e;
        } else {
            ssize_t r = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
            if (r > 0) {
                c->len += (size_t)r;
                return 0;
            }
            if (r == 0) {
                c->eof = true;
                return 0;
            }
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                int e = wait_fd(c, POLLIN);
                if (e < 0) {
                    sl_fmt_err(c->err, c->err_len, "read: %s",
                               e == -ETIMEDOUT ? "timed out" : strerror(-e));
                    return e;
                }
                continue;
            }
            sl_fmt_err(c->err, c->err_len, "read: %s", strerror(errno));
            return -errno;
        }
    }
}

/* One line (without CR LF) of at most `max` bytes, copied to `out` (NUL-terminated, which
 * needs max + 1 bytes). *used is charged with the bytes consumed. */
static int conn_line(struct conn *c, char *out, size_t max, size_t *used, size_t budget)
{
    for (;;) {
        char *nl = memchr(c->buf + c->pos, '\n', c->len - c->pos);
        if (nl) {
            size_t n = (size_t)(nl - (c->buf + c->pos));
            size_t consumed = n + 1;
            if (n > 0 && c->buf[c->pos + n - 1] == '\r')
                n--;
            if (*used + consumed > budget || n > max) {
                sl_fmt_err(c->err, c->err_len, "response head too large");
                return -E2BIG;
            }
            memcpy(out, c->buf + c->pos, n);
            out[n] = '\0';
            if (memchr(out, '\0', n) || memchr(out, '\r', n)) {
                sl_fmt_err(c->err, c->err_len, "bad byte in response head");
                return -EPROTO;
            }
            c->pos += consumed;
            *used += consumed;
            return (int)n;
        }
        size_t have = c->len - c->pos;
        if (*used + have > budget || have > max + 2) {
            sl_fmt_err(c->err, c->err_len, "response head too large");
            return -E2BIG;
        }
        if (c->eof) {
            sl_fmt_err(c->err, c->err_len, "connection closed in the response head");
            return -EPROTO;
        }
        int r = conn_fill(c);
        if (r < 0)
            return r;
    }
}

/* ---- the HTTP exchange --------------------------------------------------------------------- */

struct body {
    char *data;
    size_t len, cap, max;
};

static int body_append(struct conn *c, struct body *b, const char *p, size_t n)
{
    if (n == 0)
        return 0;
    if (n > b->max - b->len) {
        sl_fmt_err(c->err, c->err_len, "body larger than %zu bytes", b->max);
        return -EFBIG;
    }
    if (!b->data || b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        if (cap > b->max + 1)
            cap = b->max + 1;
        char *d = realloc(b->data, cap);
        if (!d) {
            sl_fmt_err(c->err, c->err_len, "out of memory");
            return -ENOMEM;
        }
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

/* Moves exactly `n` body bytes (or until EOF when `to_eof`). */
static int read_body_bytes(struct conn *c, struct body *b, uint64_t n, bool to_eof)
{
    while (to_eof || n > 0) {
        if (c->pos == c->len) {
            if (c->eof) {
                if (to_eof)
                    return 0;
                sl_fmt_err(c->err, c->err_len, "connection closed in the body");
                return -EPROTO;
            }
            int r = conn_fill(c);
            if (r < 0)
                return r;
            continue;
        }
        size_t avail = c->len - c->pos;
        size_t take = (!to_eof && n < avail) ? (size_t)n : avail;
        int r = body_append(c, b, c->buf + c->pos, take);
        if (r < 0)
            return r;
        c->pos += take;
        if (!to_eof)
            n -= take;
    }
    return 0;
}

static int parse_hex(const char *s, size_t n, uint64_t *out)
{
    uint64_t v = 0;
    if (n == 0)
        return -1;
    for (size_t i = 0; i < n; i++) {
        char ch = lower(s[i]);
        unsigned d;
        if (ch >= '0' && ch <= '9')
            d = (unsigned)(ch - '0');
        else if (ch >= 'a' && ch <= 'f')
            d = (unsigned)(ch - 'a' + 10);
        else
            return -1;
        if (v > (UINT64_MAX >> 4))
            return -1;
        v = (v << 4) | d;
    }
    *out = v;
    return 0;
}

static int read_chunked(struct conn *c, struct body *b)
{
    char line[CHUNK_LINE_MAX + 1];
    for (;;) {
        size_t used = 0;
        int n = conn_line(c, line, CHUNK_LINE_MAX, &used, CHUNK_LINE_MAX + 2);
        if (n < 0)
            return n;
        size_t digits = strspn(line, "0123456789abcdefABCDEF");
        size_t k = digits;
        while (k < (size_t)n && is_ows(line[k]))
            k++;
        uint64_t size;
        if (parse_hex(line, digits, &size) < 0 || (k < (size_t)n && line[k] != ';')) {
            sl_fmt_err(c->err, c->err_len, "bad chunk size");
            return -EPROTO;
        }
        if (size == 0)
            break;
        if (size > b->max - b->len) {
            sl_fmt_err(c->err, c->err_len, "body larger than %zu bytes", b->max);
            return -EFBIG;
        }
        int r = read_body_bytes(c, b, size, false);
        if (r < 0)
            return r;
        used = 0;
        n = conn_line(c, line, CHUNK_LINE_MAX, &used, CHUNK_LINE_MAX + 2);
        if (n != 0) {
            if (n > 0)
                sl_fmt_err(c->err, c->err_len, "chunk not followed by CRLF");
            return n > 0 ? -EPROTO : n;
        }
    }
    /* trailer section, bounded like a head */
    size_t used = 0;
    for (;;) {
        int n = conn_line(c, line, CHUNK_LINE_MAX, &used, HEAD_MAX_BYTES);
        if (n < 0)
            return n;
        if (n == 0)
            return 0;
    }
}

struct fetch_result {
    char *body;
    size_t body_len;
    int64_t max_age_s; /* -1 when none */
};

/* Reads the response head. On return: *status, framing, max-age. */
static int read_head(struct conn *c, int *status, bool *chunked, bool *has_cl, uint64_t *cl,
                     int64_t *max_age)
{
    char line[HEAD_MAX_BYTES + 1];
    size_t used = 0;
    for (;;) { /* skips 1xx interim responses */
        int n = conn_line(c, line, HEAD_MAX_BYTES, &used, HEAD_MAX_BYTES);
        if (n < 0)
            return n;
        /* "HTTP/1.x SSS[ reason]" */
        if (n < 12 || memcmp(line, "HTTP/1.", 7) != 0 || (line[7] != '0' && line[7] != '1') ||
            line[8] != ' ' || line[9] < '1' || line[9] > '5' || line[10] < '0' || line[10] > '9' ||
            line[11] < '0' || line[11] > '9' || (n > 12 && line[12] != ' ')) {
            sl_fmt_err(c->err, c->err_len, "bad status line");
            return -EPROTO;
        }
        *status = (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');
        *chunked = false;
        *has_cl = false;
        *cl = 0;
        *max_age = -1;
        bool has_te = false;
        for (;;) {
            n = conn_line(c, line, HEAD_MAX_BYTES, &used, HEAD_MAX_BYTES);
            if (n < 0)
                return n;
            if (n == 0)
                break;
            char *colon = memchr(line, ':', (size_t)n);
            if (!colon || colon == line || is_ows(line[0])) {
                sl_fmt_err(c->err, c->err_len, "bad header line");
                return -EPROTO;
            }
            size_t name_len = (size_t)(colon - line);
            for (size_t i = 0; i < name_len; i++) {
                if (is_ows(line[i])) {
                    sl_fmt_err(c->err, c->err_len, "bad header name");
                    return -EPROTO;
                }
            }
            const char *v = colon + 1;
            const char *end = line + n;
            while (v < end && is_ows(*v))
                v++;
            while (end > v && is_ows(end[-1]))
                end--;
            size_t vlen = (size_t)(end - v);
            if (ieq(line, name_len, "content-length")) {
                uint64_t val = 0;
                if (vlen == 0 || vlen > 19) {
                    sl_fmt_err(c->err, c->err_len, "bad Content-Length");
                    return -EPROTO;
                }
                for (size_t i = 0; i < vlen; i++) {
                    if (v[i] < '0' || v[i] > '9') {
                        sl_fmt_err(c->err, c->err_len, "bad Content-Length");
                        return -EPROTO;
                    }
                    val = val * 10 + (uint64_t)(v[i] - '0');
                }
                if (*has_cl && *cl != val) {
                    sl_fmt_err(c->err, c->err_len, "conflicting Content-Length");
                    return -EPROTO;
                }
                *has_cl = true;
                *cl = val;
            } else if (ieq(line, name_len, "transfer-encoding")) {
                if (has_te || !ieq(v, vlen, "chunked")) {
                    sl_fmt_err(c->err, c->err_len, "unsupported Transfer-Encoding");
                    return -EPROTO;
                }
                has_te = true;
                *chunked = true;
            } else if (ieq(line, name_len, "cache-control") && *max_age < 0) {
                *max_age = sl__jwks_cache_max_age(v, vlen);
            }
        }
        if (*status >= 200 || *status == 101)
            break;
    }
    if (*chunked)
        *has_cl = false; /* RFC 9112 §6.3: Transfer-Encoding overrides Content-Length */
    return 0;
}

/* One GET, bounded by timeout_ms. 0 with the body in `out` (malloc'd), or <0 with `err`. */
static int http_fetch(const struct sl_jwks_source *src, struct fetch_result *out, char *err,
                      size_t err_len)
{
    const struct url *u = &src->url;
    struct conn *c = calloc(1, sizeof *c);
    if (!c) {
        sl_fmt_err(err, err_len, "out of memory");
        return -ENOMEM;
    }
    c->fd = -1;
    c->deadline_ms = sl_clock_now_ms() + src->opts.timeout_ms;
    c->err = err;
    c->err_len = err_len;
    struct body b = {.max = src->opts.max_bytes};
    char *req = NULL;
    int rc = conn_connect(c, u);
    if (rc < 0)
        goto out;
    if (u->https) {
        rc = conn_tls(c, src->ssl_ctx, u);
        if (rc < 0)
            goto out;
    }
    size_t req_cap = strlen(u->path) + strlen(u->authority) + 128;
    req = malloc(req_cap);
    if (!req) {
        sl_fmt_err(err, err_len, "out of memory");
        rc = -ENOMEM;
        goto out;
    }
    int req_len = snprintf(req, req_cap,
                           "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: application/json\r\n"
                           "Connection: close\r\nUser-Agent: sluice\r\n\r\n",
                           u->path, u->authority);
    if (req_len < 0 || (size_t)req_len >= req_cap) {
        sl_fmt_err(err, err_len, "request too long");
        rc = -E2BIG;
        goto out;
    }
    rc = conn_write_all(c, req, (size_t)req_len);
    if (rc < 0)
        goto out;
    int status;
    bool chunked, has_cl;
    uint64_t cl;
    rc = read_head(c, &status, &chunked, &has_cl, &cl, &out->max_age_s);
    if (rc < 0)
        goto out;
    if (status != 200) {
        sl_fmt_err(err, err_len, "HTTP status %d", status);
        rc = -EPROTO;
        goto out;
    }
    if (chunked) {
        rc = read_chunked(c, &b);
    } else if (has_cl) {
        if (cl > b.max) {
            sl_fmt_err(err, err_len, "body of %llu bytes exceeds %zu", (unsigned long long)cl,
                       b.max);
            rc = -EFBIG;
            goto out;
        }
        rc = read_body_bytes(c, &b, cl, false);
    } else {
        rc = read_body_bytes(c, &b, 0, true);
    }
    if (rc < 0)
        goto out;
    if (!b.data) { /* an empty body still gets a valid, NUL-terminated buffer */
        b.data = calloc(1, 1);
        if (!b.data) {
            rc = -ENOMEM;
            goto out;
        }
    }
    out->body = b.data;
    out->body_len = b.len;
    b.data = NULL;
    rc = 0;
out:
    free(req);
    free(b.data);
    if (c->ssl)
        SSL_free(c->ssl);
    if (c->fd >= 0)
        close(c->fd);
    free(c);
    return rc;
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
    size_t plen = strcspn(src->url.path, "?");
    snprintf(out, cap, "%s://%s%.*s", src->url.https ? "https" : "http", src->url.authority,
             (int)(plen > 512 ? 512 : plen), src->url.path);
}

/* One URL fetch attempt: 0 on success (whether or not the set changed), <0 on failure. */
static int url_attempt(struct sl_jwks_source *src, int64_t *max_age_s)
{
    char err[ERR_LEN] = "";
    struct fetch_result fr = {.max_age_s = -1};
    int rc = http_fetch(src, &fr, err, sizeof err);
    *max_age_s = fr.max_age_s;
    if (rc == 0) {
        struct sl_jwks *ks = sl_jwks_parse(fr.body, fr.body_len, false, err, sizeof err);
        if (ks)
            publish(src, ks);
        else
            rc = -EINVAL;
    }
    free(fr.body);
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
    if (src->ssl_ctx)
        SSL_CTX_free(src->ssl_ctx);
    free(src->url.path);
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

static SSL_CTX *make_ssl_ctx(const char *ca_file, char *err, size_t err_len)
{
    ERR_clear_error();
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) {
        sl_fmt_err(err, err_len, "TLS context: out of memory");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    int ok = ca_file ? SSL_CTX_load_verify_locations(ctx, ca_file, NULL)
                     : SSL_CTX_set_default_verify_paths(ctx);
    if (ok != 1) {
        char buf[160] = "unknown error";
        unsigned long e = ERR_get_error();
        if (e)
            ERR_error_string_n(e, buf, sizeof buf);
        ERR_clear_error();
        sl_fmt_err(err, err_len, "loading CA certificates from %s: %s",
                   ca_file ? ca_file : "the system store", buf);
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

struct sl_jwks_source *sl_jwks_source_new_url(const char *url,
                                              const struct sl_jwks_source_opts *opts, char *err,
                                              size_t err_len)
{
    struct sl_jwks_source *src = alloc_source(SOURCE_URL, opts, err, err_len);
    if (!src)
        return NULL;
    if (parse_url(url, &src->url, err, err_len) < 0)
        goto fail;
    if (src->url.https) {
        src->ssl_ctx = make_ssl_ctx(src->opts.ca_file, err, err_len);
        if (!src->ssl_ctx)
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
