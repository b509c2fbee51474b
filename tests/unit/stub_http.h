#ifndef SL_TESTS_STUB_HTTP_H
#define SL_TESTS_STUB_HTTP_H

/*
 * A scripted HTTP peer for the unit tests that make sluice talk to a server (fetch, the log
 * shipper, the drain notice poller, the JWKS source): one thread on 127.0.0.1 accepts
 * connections one at a time and hands each to the test's serve callback, which reads the
 * request with stub_http_read and answers with stub_http_write_all, or keeps the connection
 * open without a word (stub_http_hold) to play a server that hangs. What the callback does is
 * the test's script; this file only owns the socket, the thread and the held connections.
 * Functions are static inline: each test binary has its own copy, and leaves out what it does
 * not call.
 */

#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/loop.h"

/* How long stub_http_read waits for the rest of a request the client stopped sending. */
#define STUB_HTTP_READ_MS 10000u
#define STUB_HTTP_HELD_MAX 16

struct stub_http;

/* Serves one accepted connection on the server thread. Owns `fd`: closes it, or hands it to
 * stub_http_hold. */
typedef void (*stub_http_serve_cb)(struct stub_http *h, int fd);

struct stub_http {
    int lfd;
    uint16_t port;
    pthread_t thread;
    atomic_bool stop;
    pthread_mutex_t
        mu; /* for what the serve callback shares with the test; the stub never takes it */
    stub_http_serve_cb serve;
    void *data;
    int held[STUB_HTTP_HELD_MAX]; /* the server thread's until stub_http_stop has joined it */
    int held_count;
};

/* One request as it arrived. */
struct stub_http_req {
    char *buf;       /* every byte read, NUL-terminated; malloc'd, the caller frees it */
    size_t len;      /* bytes in buf */
    size_t head_len; /* the head through its blank line; 0 when the head never ended */
    size_t body_len; /* what the head's Content-Length announced (0 without one) */
};

/* Sends all of `p`; a peer that has gone away ends it quietly (the test asserts elsewhere). */
static inline void stub_http_write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

/*
 * Reads one request from `fd` into `req`: the head, then, unless `head_only`, as many body
 * bytes as its Content-Length says. Stops early at EOF, an error or STUB_HTTP_READ_MS of
 * silence. True when all of that arrived; `req->buf` is set either way and the caller frees it.
 */
static inline bool stub_http_read(int fd, bool head_only, struct stub_http_req *req)
{
    size_t cap = 8192, need = 0;
    memset(req, 0, sizeof *req);
    req->buf = malloc(cap + 1);
    assert_non_null(req->buf);
    req->buf[0] = '\0';
    uint64_t deadline = sl_clock_now_ms() + STUB_HTTP_READ_MS;
    while (!need || req->len < need) {
        if (req->len == cap) {
            cap *= 2;
            req->buf = realloc(req->buf, cap + 1);
            assert_non_null(req->buf);
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 50) <= 0) {
            if (sl_clock_now_ms() > deadline)
                break;
            continue;
        }
        ssize_t got = recv(fd, req->buf + req->len, cap - req->len, 0);
        if (got <= 0)
            break;
        req->len += (size_t)got;
        req->buf[req->len] = '\0';
        char *end = need ? NULL : strstr(req->buf, "\r\n\r\n");
        if (end) {
            req->head_len = (size_t)(end - req->buf) + 4;
            const char *cl = strcasestr(req->buf, "\r\nContent-Length: ");
            if (cl && cl < end)
                req->body_len = strtoul(cl + 18, NULL, 10);
            need = req->head_len + (head_only ? 0 : req->body_len);
        }
    }
    return need && req->len >= need;
}

/* Keeps `fd` open and unanswered until stub_http_stop; server thread only. False when the
 * stub already holds all it can: the caller then still owns `fd`. */
static inline bool stub_http_hold(struct stub_http *h, int fd)
{
    if (h->held_count == STUB_HTTP_HELD_MAX)
        return false;
    h->held[h->held_count++] = fd;
    return true;
}

static inline void *stub_http_main(void *arg)
{
    struct stub_http *h = arg;
    while (!atomic_load(&h->stop)) {
        struct pollfd p = {.fd = h->lfd, .events = POLLIN};
        if (poll(&p, 1, 20) <= 0)
            continue;
        int fd = accept(h->lfd, NULL, NULL);
        if (fd >= 0)
            h->serve(h, fd);
    }
    return NULL;
}

/* Listens on an ephemeral 127.0.0.1 port (h->port) and starts the thread that passes every
 * connection to `serve`; `data` is left in h->data for it. `h` (zeroed by the caller, or part
 * of a calloc'd struct) must stay put until stub_http_stop. */
static inline void stub_http_start(struct stub_http *h, stub_http_serve_cb serve, void *data)
{
    pthread_mutex_init(&h->mu, NULL);
    h->serve = serve;
    h->data = data;
    h->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(h->lfd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(h->lfd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(h->lfd, 64), 0);
    socklen_t al = sizeof a;
    assert_int_equal(getsockname(h->lfd, (struct sockaddr *)&a, &al), 0);
    h->port = ntohs(a.sin_port);
    assert_int_equal(pthread_create(&h->thread, NULL, stub_http_main, h), 0);
}

/* Joins the thread (a serve callback in progress finishes first), then closes the held
 * connections and the listener. */
static inline void stub_http_stop(struct stub_http *h)
{
    atomic_store(&h->stop, true);
    pthread_join(h->thread, NULL);
    for (int i = 0; i < h->held_count; i++)
        close(h->held[i]);
    close(h->lfd);
    pthread_mutex_destroy(&h->mu);
}

/* "http://127.0.0.1:<port><path>" into `out`. */
static inline void stub_http_url(const struct stub_http *h, const char *path, char *out, size_t cap)
{
    snprintf(out, cap, "http://127.0.0.1:%u%s", (unsigned)h->port, path);
}

#endif
