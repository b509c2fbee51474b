#include "http/fetch.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "core/fmt.h"
#include "core/loop.h"
#include "core/slice.h"
#include "http/fetch_internal.h"

#define DEFAULT_TIMEOUT_MS 5000u
#define DEFAULT_MAX_BODY ((size_t)1 << 20)
#define MAX_MAX_BODY ((size_t)1 << 30) /* keeps max + 1 and doubling far from overflow */
#define HEAD_MAX_BYTES (16u * 1024u)   /* status line + headers (+ chunk trailers) */
#define CHUNK_LINE_MAX 4096u
#define URL_MAX_LEN 2048u
#define METHOD_MAX_LEN 32u
#define FILE_PIECE (64u * 1024u)
#define ERR_LEN 256u

struct sl_fetch_tls {
    SSL_CTX *ctx; /* SSL_CTX is safe to share for SSL_new across threads */
};

/* ---- small helpers ------------------------------------------------------------------------- */

/* The parser holds names and values as pointer + length. */
static bool ieq(const char *a, size_t alen, const char *b)
{
    return sl_slice_ieq_cstr(sl_slice_make(a, alen), b);
}

/* RFC 9110 tchar */
static bool is_tchar(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* ---- URL ----------------------------------------------------------------------------------- */

static bool is_host_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.' || c == '_';
}

int sl_fetch_url_parse(const char *s, struct sl_fetch_url *u, char *err, size_t err_len)
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

void sl_fetch_url_dispose(struct sl_fetch_url *u)
{
    free(u->path);
    u->path = NULL;
}

void sl_fetch_url_loggable(const struct sl_fetch_url *u, char *out, size_t cap)
{
    const char *path = u->path ? u->path : "/";
    size_t plen = strcspn(path, "?");
    snprintf(out, cap, "%s://%s%.*s", u->https ? "https" : "http", u->authority,
             (int)(plen > 512 ? 512 : plen), path);
}

/* ---- TLS roots ----------------------------------------------------------------------------- */

struct sl_fetch_tls *sl_fetch_tls_new(const char *ca_file, char *err, size_t err_len)
{
    struct sl_fetch_tls *t = calloc(1, sizeof *t);
    if (!t) {
        sl_fmt_err(err, err_len, "out of memory");
        return NULL;
    }
    ERR_clear_error();
    t->ctx = SSL_CTX_new(TLS_client_method());
    if (!t->ctx) {
        sl_fmt_err(err, err_len, "TLS context: out of memory");
        free(t);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);
    int ok = ca_file ? SSL_CTX_load_verify_locations(t->ctx, ca_file, NULL)
                     : SSL_CTX_set_default_verify_paths(t->ctx);
    if (ok != 1) {
        char buf[160] = "unknown error";
        unsigned long e = ERR_get_error();
        if (e)
            ERR_error_string_n(e, buf, sizeof buf);
        ERR_clear_error();
        sl_fmt_err(err, err_len, "loading CA certificates from %s: %s",
                   ca_file ? ca_file : "the system store", buf);
        sl_fetch_tls_free(t);
        return NULL;
    }
    return t;
}

void sl_fetch_tls_free(struct sl_fetch_tls *t)
{
    if (!t)
        return;
    SSL_CTX_free(t->ctx);
    free(t);
}

/* ---- a blocking connection bounded by a deadline ------------------------------------------- */

struct conn {
    int fd;
    SSL *ssl;
    uint64_t deadline_ms;
    int cancel_fd; /* -1 = none */
    char *err;
    size_t err_len;
    /* a memory "server" instead of the socket (sl__fetch_parse_response) */
    const char *mem;
    size_t mem_len, mem_pos, mem_piece;
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

/* Waits for `events` on the socket until the deadline or a cancel. 0, -ETIMEDOUT,
 * -ECANCELED or -errno. */
static int wait_fd(struct conn *c, short events)
{
    for (;;) {
        int left = remaining_ms(c);
        if (left == 0)
            return -ETIMEDOUT;
        struct pollfd pfd[2] = {{.fd = c->fd, .events = events},
                                {.fd = c->cancel_fd, .events = POLLIN}};
        int r = poll(pfd, c->cancel_fd >= 0 ? 2 : 1, left);
        if (r > 0 && c->cancel_fd >= 0 && pfd[1].revents)
            return -ECANCELED;
        if (r > 0)
            return 0; /* readiness or an error: the next I/O call reports which */
        if (r == 0)
            return -ETIMEDOUT;
        if (errno != EINTR)
            return -errno;
    }
}

static bool is_cancelled(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return fd >= 0 && poll(&p, 1, 0) > 0;
}

static const char *wait_error(int e)
{
    return e == -ETIMEDOUT ? "timed out" : e == -ECANCELED ? "cancelled" : strerror(-e);
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
    if (r < 0)
        sl_fmt_err(c->err, c->err_len, "%s: %s", what, wait_error(r));
    return r;
}

static int conn_connect(struct conn *c, const struct sl_fetch_url *u)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    if (u->host_is_ip)
        hints.ai_flags |= AI_NUMERICHOST;
    hints.ai_flags |= AI_NUMERICSERV;
    struct addrinfo *res = NULL;
    /* Not bounded by the deadline: the libc resolver has its own timeouts, and callers run on
     * background threads (or once at start-up). */
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
        sl_fmt_err(c->err, c->err_len, "connect: %s", wait_error(r));
        close(fd);
        c->fd = -1;
        if (r == -ETIMEDOUT || r == -ECANCELED)
            break;
    }
    freeaddrinfo(res);
    return rc;
}

static int conn_tls(struct conn *c, SSL_CTX *ctx, const struct sl_fetch_url *u)
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
 * process ignoring SIGPIPE as main.c does (or on the calling thread blocking it). */
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
                        sl_fmt_err(c->err, c->err_len, "write: %s", wait_error(e));
                        return e;
                    }
                    continue;
                }
                int e = errno;
                sl_fmt_err(c->err, c->err_len, "write: %s", strerror(e));
                return -e;
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
    if (c->mem) {
        size_t n = c->mem_len - c->mem_pos;
        if (n == 0) {
            c->eof = true;
            return 0;
        }
        if (n > sizeof c->buf - c->len)
            n = sizeof c->buf - c->len;
        if (c->mem_piece && n > c->mem_piece)
            n = c->mem_piece;
        memcpy(c->buf + c->len, c->mem + c->mem_pos, n);
        c->mem_pos += n;
        c->len += n;
        return 0;
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
                    sl_fmt_err(c->err, c->err_len, "read: %s", wait_error(e));
                    return e;
                }
                continue;
            }
            int e = errno;
            sl_fmt_err(c->err, c->err_len, "read: %s", strerror(e));
            return -e;
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

/* ---- the response -------------------------------------------------------------------------- */

struct body {
    char *data;
    size_t len, cap, max;
    bool cut_ok; /* past `max`, stop and keep what fits instead of failing */
    bool cut;
};

/* 0, 1 when the body was cut at `max` (stop reading), or -errno. */
static int body_append(struct conn *c, struct body *b, const char *p, size_t n)
{
    bool cut = false;
    if (n > b->max - b->len) {
        if (!b->cut_ok) {
            sl_fmt_err(c->err, c->err_len, "body larger than %zu bytes", b->max);
            return -EFBIG;
        }
        n = b->max - b->len;
        cut = true;
    }
    if (n > 0) {
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
    }
    if (cut) {
        b->cut = true;
        return 1;
    }
    return 0;
}

/* Moves exactly `n` body bytes (or until EOF when `to_eof`). 0, 1 (cut), or -errno. */
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
        if (r != 0)
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
        char ch = sl_ascii_lower(s[i]);
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

/* 0, 1 (cut), or -errno. */
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
        while (k < (size_t)n && sl_ascii_is_ows(line[k]))
            k++;
        uint64_t size;
        if (parse_hex(line, digits, &size) < 0 || (k < (size_t)n && line[k] != ';')) {
            sl_fmt_err(c->err, c->err_len, "bad chunk size");
            return -EPROTO;
        }
        if (size == 0)
            break;
        if (size > b->max - b->len && !b->cut_ok) {
            sl_fmt_err(c->err, c->err_len, "body larger than %zu bytes", b->max);
            return -EFBIG;
        }
        int r = read_body_bytes(c, b, size, false);
        if (r != 0)
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

/* Reads the response head: *status and the framing; the final response's header fields go to
 * rq->on_header. */
static int read_head(struct conn *c, const struct sl_fetch_req *rq, int *status, bool *chunked,
                     bool *has_cl, uint64_t *cl)
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
        bool final = *status >= 200 || *status == 101;
        *chunked = false;
        *has_cl = false;
        *cl = 0;
        bool has_te = false;
        for (;;) {
            n = conn_line(c, line, HEAD_MAX_BYTES, &used, HEAD_MAX_BYTES);
            if (n < 0)
                return n;
            if (n == 0)
                break;
            char *colon = memchr(line, ':', (size_t)n);
            if (!colon || colon == line || sl_ascii_is_ows(line[0])) {
                sl_fmt_err(c->err, c->err_len, "bad header line");
                return -EPROTO;
            }
            size_t name_len = (size_t)(colon - line);
            for (size_t i = 0; i < name_len; i++) {
                if (sl_ascii_is_ows(line[i])) {
                    sl_fmt_err(c->err, c->err_len, "bad header name");
                    return -EPROTO;
                }
            }
            const char *v = colon + 1;
            const char *end = line + n;
            while (v < end && sl_ascii_is_ows(*v))
                v++;
            while (end > v && sl_ascii_is_ows(end[-1]))
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
            }
            if (final && rq->on_header)
                rq->on_header(rq->header_data, line, name_len, v, vlen);
        }
        if (final)
            break;
    }
    if (*chunked)
        *has_cl = false; /* RFC 9112 §6.3: Transfer-Encoding overrides Content-Length */
    return 0;
}

static size_t max_body(const struct sl_fetch_req *rq)
{
    size_t m = rq->max_body_bytes ? rq->max_body_bytes : DEFAULT_MAX_BODY;
    return m > MAX_MAX_BODY ? MAX_MAX_BODY : m;
}

static bool is_head_method(const struct sl_fetch_req *rq)
{
    return rq->method && strcmp(rq->method, "HEAD") == 0;
}

/* Head and body of the answer into `out`. 0 or -errno (with c->err). */
static int read_response(struct conn *c, const struct sl_fetch_req *rq, struct sl_fetch_resp *out)
{
    int status = 0;
    bool chunked, has_cl;
    uint64_t cl;
    int rc = read_head(c, rq, &status, &chunked, &has_cl, &cl);
    if (rc < 0)
        return rc;
    struct body b = {.max = max_body(rq), .cut_ok = rq->cut_body || status < 200 || status > 299};
    /* RFC 9112 §6.3: these never have a body, whatever the head says. */
    bool bodiless = is_head_method(rq) || status < 200 || status == 204 || status == 304;
    if (bodiless) {
        rc = 0;
    } else if (chunked) {
        rc = read_chunked(c, &b);
    } else if (has_cl) {
        if (cl > b.max && !b.cut_ok) {
            sl_fmt_err(c->err, c->err_len, "body of %llu bytes exceeds %zu", (unsigned long long)cl,
                       b.max);
            rc = -EFBIG;
        } else {
            rc = read_body_bytes(c, &b, cl, false);
        }
    } else {
        rc = read_body_bytes(c, &b, 0, true);
    }
    if (rc < 0) {
        free(b.data);
        return rc;
    }
    if (!b.data) { /* an empty body still gets a valid, NUL-terminated buffer */
        b.data = calloc(1, 1);
        if (!b.data) {
            sl_fmt_err(c->err, c->err_len, "out of memory");
            return -ENOMEM;
        }
    }
    out->status = status;
    out->body = b.data;
    out->body_len = b.len;
    out->body_truncated = b.cut;
    return 0;
}

/* ---- the request --------------------------------------------------------------------------- */

static bool valid_method(const char *m)
{
    size_t n = strlen(m);
    if (n == 0 || n > METHOD_MAX_LEN)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!is_tchar(m[i]))
            return false;
    return true;
}

/* "Name: value\r\n" lines, none of them framing or connection headers (the client owns those,
 * and a second Content-Length would desynchronise the server). */
static bool valid_extra_headers(const char *h)
{
    while (*h) {
        size_t name = 0;
        while (is_tchar(h[name]))
            name++;
        if (name == 0 || h[name] != ':')
            return false;
        if (ieq(h, name, "content-length") || ieq(h, name, "transfer-encoding") ||
            ieq(h, name, "host") || ieq(h, name, "connection"))
            return false;
        const char *v = h + name + 1;
        while (*v && *v != '\r' && *v != '\n') {
            unsigned char ch = (unsigned char)*v;
            if ((ch < 0x20 && ch != '\t') || ch == 0x7f)
                return false;
            v++;
        }
        if (v[0] != '\r' || v[1] != '\n')
            return false;
        h = v + 2;
    }
    return true;
}

static bool method_has_body(const char *m)
{
    return strcmp(m, "PUT") == 0 || strcmp(m, "POST") == 0 || strcmp(m, "PATCH") == 0;
}

/* The request head, malloc'd into *out. 0 or -errno with `err`. */
static int build_head(const struct sl_fetch_req *rq, const char *method,
                      const struct sl_fetch_url *u, bool has_body, uint64_t body_len, char **out,
                      size_t *out_len, char *err, size_t err_len)
{
    const char *extra = rq->extra_headers ? rq->extra_headers : "";
    size_t cap = strlen(method) + strlen(u->path) + strlen(u->authority) + strlen(extra) + 160;
    char *h = malloc(cap);
    if (!h) {
        sl_fmt_err(err, err_len, "out of memory");
        return -ENOMEM;
    }
    char cl[48] = "";
    if (has_body)
        snprintf(cl, sizeof cl, "Content-Length: %llu\r\n", (unsigned long long)body_len);
    int n = snprintf(h, cap,
                     "%s %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\nUser-Agent: sluice\r\n"
                     "%s\r\n",
                     method, u->path, u->authority, extra, cl);
    if (n < 0 || (size_t)n >= cap) {
        free(h);
        sl_fmt_err(err, err_len, "request too long");
        return -E2BIG;
    }
    *out = h;
    *out_len = (size_t)n;
    return 0;
}

/* Streams the file body. 0, -EIO with `*file_failed` for a file problem, or a write error. */
static int send_file(struct conn *c, const struct sl_fetch_body_file *f, bool *file_failed)
{
    char *piece = malloc(FILE_PIECE);
    if (!piece) {
        sl_fmt_err(c->err, c->err_len, "out of memory");
        *file_failed = true;
        return -ENOMEM;
    }
    int rc = 0;
    uint64_t sent = 0;
    while (sent < f->len) {
        size_t want = f->len - sent < FILE_PIECE ? (size_t)(f->len - sent) : FILE_PIECE;
        ssize_t r = pread(f->fd, piece, want, (off_t)(f->offset + sent));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            sl_fmt_err(c->err, c->err_len, "reading the body file: %s",
                       r < 0 ? strerror(errno) : "it shrank");
            *file_failed = true;
            rc = -EIO;
            break;
        }
        rc = conn_write_all(c, piece, (size_t)r);
        if (rc < 0)
            break;
        sent += (uint64_t)r;
    }
    free(piece);
    return rc;
}

int sl_fetch(const struct sl_fetch_req *rq, struct sl_fetch_resp *out, char *err, size_t err_len)
{
    memset(out, 0, sizeof *out);
    const char *method = rq->method ? rq->method : "GET";
    if (!valid_method(method)) {
        sl_fmt_err(err, err_len, "bad request method");
        return -EINVAL;
    }
    if (rq->extra_headers && !valid_extra_headers(rq->extra_headers)) {
        sl_fmt_err(err, err_len, "bad extra request headers");
        return -EINVAL;
    }
    if (!rq->url) {
        sl_fmt_err(err, err_len, "no URL");
        return -EINVAL;
    }
    struct sl_fetch_url u;
    int rc = sl_fetch_url_parse(rq->url, &u, err, err_len);
    if (rc < 0)
        return rc;

    struct conn *c = NULL;
    struct sl_fetch_tls *own_tls = NULL;
    char *head = NULL;
    size_t head_len = 0;
    bool has_body = rq->body_file || rq->body || method_has_body(method);
    uint64_t body_len = rq->body_file ? rq->body_file->len : rq->body ? rq->body_len : 0;
    rc = build_head(rq, method, &u, has_body, body_len, &head, &head_len, err, err_len);
    if (rc < 0)
        goto out;
    const struct sl_fetch_tls *tls = rq->tls;
    if (u.https && !tls) {
        own_tls = sl_fetch_tls_new(rq->ca_file, err, err_len);
        if (!own_tls) {
            rc = -EINVAL;
            goto out;
        }
        tls = own_tls;
    }
    c = calloc(1, sizeof *c);
    if (!c) {
        sl_fmt_err(err, err_len, "out of memory");
        rc = -ENOMEM;
        goto out;
    }
    c->fd = -1;
    c->cancel_fd = rq->cancel_fd ? *rq->cancel_fd : -1;
    c->deadline_ms = sl_clock_now_ms() + (rq->timeout_ms ? rq->timeout_ms : DEFAULT_TIMEOUT_MS);
    c->err = err;
    c->err_len = err_len;
    if (is_cancelled(c->cancel_fd)) {
        sl_fmt_err(err, err_len, "cancelled");
        rc = -ECANCELED;
        goto out;
    }
    rc = conn_connect(c, &u);
    if (rc < 0)
        goto out;
    if (u.https && tls) {
        rc = conn_tls(c, tls->ctx, &u);
        if (rc < 0)
            goto out;
    }
    bool file_failed = false;
    rc = conn_write_all(c, head, head_len);
    if (rc == 0 && rq->body_file)
        rc = send_file(c, rq->body_file, &file_failed);
    else if (rc == 0 && rq->body && rq->body_len)
        rc = conn_write_all(c, rq->body, rq->body_len);
    if (rc < 0 && rc != -ETIMEDOUT && rc != -ECANCELED && !file_failed && !c->ssl) {
        /* The server may have answered and closed before taking the whole body (413, 401):
         * its status says more than our write error. Not over TLS: OpenSSL forbids I/O on a
         * connection after a fatal error. */
        char err2[ERR_LEN];
        c->err = err2;
        c->err_len = sizeof err2;
        if (read_response(c, rq, out) == 0) {
            if (out->status >= 200 && out->status <= 299) {
                /* A success for a body the server never took whole cannot be one (an upload
                 * would be taken as stored): the write error stands. */
                snprintf(err2, sizeof err2, "%s", err);
                sl_fmt_err(err, err_len,
                           "%s (the server answered %d before taking the whole "
                           "request body)",
                           err2, out->status);
                sl_fetch_resp_dispose(out);
                memset(out, 0, sizeof *out);
            } else {
                rc = 0;
                out->request_cut = true;
                sl_fmt_err(err, err_len, "%s", "");
            }
        }
        c->err = err;
        c->err_len = err_len;
        goto out;
    }
    if (rc < 0)
        goto out;
    rc = read_response(c, rq, out);
out:
    if (c) {
        if (c->ssl)
            SSL_free(c->ssl);
        if (c->fd >= 0)
            close(c->fd);
        free(c);
    }
    sl_fetch_tls_free(own_tls);
    free(head);
    sl_fetch_url_dispose(&u);
    return rc;
}

int sl__fetch_parse_response(const char *data, size_t len, size_t piece,
                             const struct sl_fetch_req *rq, struct sl_fetch_resp *out, char *err,
                             size_t err_len)
{
    memset(out, 0, sizeof *out);
    struct conn *c = calloc(1, sizeof *c);
    if (!c) {
        sl_fmt_err(err, err_len, "out of memory");
        return -ENOMEM;
    }
    c->fd = -1;
    c->cancel_fd = -1;
    c->err = err;
    c->err_len = err_len;
    c->mem = data ? data : "";
    c->mem_len = data ? len : 0;
    c->mem_piece = piece;
    int rc = read_response(c, rq, out);
    free(c);
    return rc;
}

void sl_fetch_resp_dispose(struct sl_fetch_resp *r)
{
    free(r->body);
    r->body = NULL;
    r->body_len = 0;
}
