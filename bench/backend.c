/*
 * bench/backend.c - the "same fast backend" used by bench/run.sh for every proxy.
 *
 * A single-threaded epoll HTTP/1.1 keep-alive server that answers every request with a
 * fixed 200 response carrying a 13-byte body. It parses just enough to find request
 * boundaries: the end of the head ("\r\n\r\n") and a Content-Length body, which it reads
 * and discards. Pipelined requests are answered in order with one write per read burst.
 * "Connection: close" from the client is honoured. Chunked request bodies are not
 * supported (none of the benchmark clients send them).
 *
 * Usage: backend PORT [ADDR]     (ADDR defaults to 127.0.0.1)
 * Build: cc -O2 -o backend bench/backend.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common.h"

#define RBUF 16384
#define MAX_EVENTS 256

static const char RESP[] = "HTTP/1.1 200 OK\r\n"
                           "Content-Type: text/plain\r\n"
                           "Content-Length: 13\r\n"
                           "\r\n"
                           "Hello, world!";
#define RESP_LEN (sizeof(RESP) - 1)

struct conn {
    int fd;
    size_t len;       /* bytes buffered in buf */
    uint64_t discard; /* body bytes still to skip */
    char *out;        /* pending output (only when a write would block) */
    size_t out_len, out_off;
    int close_after;
    char buf[RBUF];
};

static int ep;

static void conn_free(struct conn *c)
{
    close(c->fd);
    free(c->out);
    free(c);
}

/* Case-insensitive search for a header name at line starts within [p, end). */
static int find_header(const char *p, const char *end, const char *name, const char **val,
                       const char **vend)
{
    size_t nl = strlen(name);
    const char *line = memchr(p, '\n', (size_t)(end - p));
    while (line && line + 1 < end) {
        const char *s = line + 1;
        const char *e = memchr(s, '\n', (size_t)(end - s));
        if (!e)
            break;
        if ((size_t)(e - s) > nl && strncasecmp(s, name, nl) == 0 && s[nl] == ':') {
            const char *v = s + nl + 1;
            while (v < e && (*v == ' ' || *v == '\t'))
                v++;
            const char *ve = e;
            while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            *val = v;
            *vend = ve;
            return 1;
        }
        line = e;
    }
    return 0;
}

static int flush_out(struct conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 1;
            if (errno == EINTR)
                continue;
            return -1;
        }
        c->out_off += (size_t)n;
    }
    free(c->out);
    c->out = NULL;
    c->out_len = c->out_off = 0;
    return 0;
}

/* Sends `count` responses; buffers what does not fit. Returns -1 on error. */
static int respond(struct conn *c, unsigned count)
{
    static char batch[RESP_LEN * 64];
    while (count) {
        unsigned k = count > 64 ? 64 : count;
        for (unsigned i = 0; i < k; i++)
            memcpy(batch + i * RESP_LEN, RESP, RESP_LEN);
        size_t total = k * RESP_LEN, off = 0;
        count -= k;
        if (!c->out) {
            while (off < total) {
                ssize_t n = send(c->fd, batch + off, total - off, MSG_NOSIGNAL);
                if (n < 0) {
                    if (errno == EINTR)
                        continue;
                    if (errno == EAGAIN || errno == EWOULDBLOCK)
                        break;
                    return -1;
                }
                off += (size_t)n;
            }
            if (off == total)
                continue;
        }
        /* Queue the rest. */
        size_t rest = total - off;
        char *nb = realloc(c->out, c->out_len + rest);
        if (!nb)
            return -1;
        memcpy(nb + c->out_len, batch + off, rest);
        c->out = nb;
        c->out_len += rest;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    }
    return 0;
}

/* Consumes complete requests from the buffer; returns how many were found, -1 on error. */
static int parse(struct conn *c, unsigned *count)
{
    size_t off = 0;
    *count = 0;
    for (;;) {
        if (c->discard) {
            size_t avail = c->len - off;
            size_t d = c->discard < avail ? (size_t)c->discard : avail;
            off += d;
            c->discard -= d;
            if (c->discard)
                break;
        }
        if (off >= c->len)
            break;
        const char *p = c->buf + off, *end = c->buf + c->len;
        const char *h = memmem(p, (size_t)(end - p), "\r\n\r\n", 4);
        if (!h) {
            if (c->len - off >= RBUF && off == 0)
                return -1; /* head too large */
            break;
        }
        h += 4;
        const char *v, *ve;
        uint64_t cl = 0;
        if (find_header(p, h, "content-length", &v, &ve))
            cl = strtoull(v, NULL, 10);
        if (find_header(p, h, "connection", &v, &ve) && (size_t)(ve - v) == 5 &&
            strncasecmp(v, "close", 5) == 0)
            c->close_after = 1;
        (*count)++;
        off = (size_t)(h - c->buf);
        c->discard = cl;
        if (c->close_after)
            break;
    }
    if (off) {
        memmove(c->buf, c->buf + off, c->len - off);
        c->len -= off;
    }
    return 0;
}

static void on_readable(struct conn *c)
{
    for (;;) {
        size_t space = RBUF - c->len;
        ssize_t n = recv(c->fd, c->buf + c->len, space, 0);
        if (n == 0) {
            conn_free(c);
            return;
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            conn_free(c);
            return;
        }
        c->len += (size_t)n;
        unsigned count;
        if (parse(c, &count) < 0 || respond(c, count) < 0) {
            conn_free(c);
            return;
        }
        if (c->close_after) {
            if (c->out) { /* best effort: wait for flush via EPOLLOUT */
                c->len = 0;
                return;
            }
            conn_free(c);
            return;
        }
        /* Level-triggered: a short read means the socket is drained for now; skip the
         * extra recv() that would only return EAGAIN. */
        if ((size_t)n < space)
            return;
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s PORT [ADDR]\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int port = arg_int(argv[1], "port");
    const char *addr = argc > 2 ? argv[2] : "127.0.0.1";
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, addr, &sa.sin_addr);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 4096) < 0) {
        perror("bind/listen");
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                for (;;) {
                    int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0)
                        break;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *nc = malloc(sizeof *nc);
                    if (!nc) {
                        close(fd);
                        continue;
                    }
                    nc->fd = fd;
                    nc->len = 0;
                    nc->discard = 0;
                    nc->out = NULL;
                    nc->out_len = nc->out_off = 0;
                    nc->close_after = 0;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT) {
                int r = flush_out(c);
                if (r < 0) {
                    conn_free(c);
                    continue;
                }
                if (r == 0) {
                    if (c->close_after) {
                        conn_free(c);
                        continue;
                    }
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
                }
                if (!(evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                    continue;
            }
            on_readable(c);
        }
    }
}
