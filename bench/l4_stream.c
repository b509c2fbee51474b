/*
 * bench/l4_stream.c - bulk TCP source/sink for the L4 part of bench/edge_peers.py.
 *
 *   l4_stream serve PORT
 *     Backend on 127.0.0.1:PORT. Each connection starts with two 8-byte big-endian counts
 *     sent by the client, U then D; the server then sends D bytes back while reading and
 *     discarding the U bytes that follow the header, and closes once both are done.
 *     Single-threaded, epoll.
 *
 *   l4_stream client HOST PORT CONNS UP_BYTES DOWN_BYTES [TIMEOUT_S]
 *     CONNS connections at once; each sends the counts, then UP_BYTES/CONNS bytes while
 *     reading (and discarding) the DOWN_BYTES/CONNS coming back. Both directions run at the
 *     same time. Prints
 *       RESULT up U down D seconds S errors E
 *     (bytes actually moved; E = connections that ended early or failed).
 *
 * Neither side half-closes: nginx's stream proxy ends the whole session at the first EOF
 * unless `proxy_half_close on`, which is not its default. Each side closes only once it has
 * sent and received everything, so a forwarder without half-close support moves all bytes.
 *
 * Received bytes are discarded with recv(MSG_TRUNC), which for TCP drops them without copying
 * into user space, and sent bytes come from one static buffer, so both ends cost little beside
 * the proxy in the middle.
 *
 * Build: cc -O2 -o l4_stream bench/l4_stream.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define CHUNK (256u * 1024u)
#define MAXC 4096

static char out_buf[CHUNK];
static char sink_buf[CHUNK]; /* not written with MSG_TRUNC; there for the API */

struct s {
    int fd;
    bool hdr_done, wr_done, rd_done;
    unsigned char hdr[16];
    unsigned hdr_got;
    uint64_t to_send, sent, received, expect;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Sends as much as the socket takes. 0 = would block / finished, -1 = error. */
static int pump_out(struct s *c)
{
    while (c->sent < c->to_send) {
        uint64_t left = c->to_send - c->sent;
        size_t n = left < CHUNK ? (size_t)left : CHUNK;
        ssize_t r = send(c->fd, out_buf, n, MSG_NOSIGNAL);
        if (r < 0)
            return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
        c->sent += (uint64_t)r;
    }
    c->wr_done = true;
    return 0;
}

/* Reads and discards until EAGAIN or EOF. 0 = ok, -1 = error. */
static int pump_in(struct s *c, bool server)
{
    for (;;) {
        if (server && !c->hdr_done) {
            ssize_t r = recv(c->fd, c->hdr + c->hdr_got, 16 - c->hdr_got, 0);
            if (r == 0)
                return -1;
            if (r < 0)
                return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
            c->hdr_got += (unsigned)r;
            if (c->hdr_got == 16) {
                uint64_t u = 0, d = 0;
                for (int i = 0; i < 8; i++) {
                    u = u << 8 | c->hdr[i];
                    d = d << 8 | c->hdr[8 + i];
                }
                c->expect = u;
                c->to_send = d;
                c->hdr_done = true;
            }
            continue;
        }
        if (c->received >= c->expect) {
            c->rd_done = true;
            return 0;
        }
        ssize_t r = recv(c->fd, sink_buf, CHUNK, MSG_TRUNC);
        if (r == 0)
            return -1; /* EOF before everything arrived */
        if (r < 0)
            return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
        c->received += (uint64_t)r;
    }
}

static int serve(int port)
{
    int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sin = {.sin_family = AF_INET,
                              .sin_port = htons((uint16_t)port),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(l, (struct sockaddr *)&sin, sizeof sin) < 0 || listen(l, 1024) < 0) {
        perror("l4_stream: listen");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
    struct epoll_event evs[64];
    for (;;) {
        int k = epoll_wait(ep, evs, 64, -1);
        for (int i = 0; i < k; i++) {
            struct s *c = evs[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    c = calloc(1, sizeof *c);
                    if (!c) {
                        close(fd);
                        continue;
                    }
                    c->fd = fd;
                    struct epoll_event e2 = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e2);
                }
                continue;
            }
            int r = pump_in(c, true);
            if (r == 0 && c->hdr_done)
                r = pump_out(c);
            if (r < 0 || (c->hdr_done && c->rd_done && c->wr_done)) {
                close(c->fd);
                free(c);
            }
        }
    }
}

static int client(int argc, char **argv)
{
    if (argc < 7) {
        fprintf(stderr, "usage: %s client HOST PORT CONNS UP_BYTES DOWN_BYTES [TIMEOUT_S]\n",
                argv[0]);
        return 2;
    }
    struct sockaddr_in dst = {.sin_family = AF_INET,
                              .sin_port = htons((uint16_t)arg_int(argv[3], "port"))};
    if (inet_pton(AF_INET, argv[2], &dst.sin_addr) != 1) {
        fprintf(stderr, "l4_stream: bad address %s\n", argv[2]);
        return 2;
    }
    int n = arg_int(argv[4], "connections");
    if (n < 1 || n > MAXC)
        n = 1;
    uint64_t up = strtoull(argv[5], NULL, 10) / (uint64_t)n;
    uint64_t down = strtoull(argv[6], NULL, 10) / (uint64_t)n;
    double timeout = argc > 7 ? atof(argv[7]) : 300;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct s *cs = calloc((size_t)n, sizeof *cs);
    if (!cs)
        return 1;
    double t0 = now_s();
    for (int i = 0; i < n; i++) {
        struct s *c = &cs[i];
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&dst, sizeof dst) < 0) {
            perror("l4_stream: connect");
            return 1;
        }
        unsigned char h[16];
        for (int b = 0; b < 8; b++) {
            h[b] = (unsigned char)(up >> (56 - 8 * b));
            h[8 + b] = (unsigned char)(down >> (56 - 8 * b));
        }
        if (send(c->fd, h, 16, MSG_NOSIGNAL) != 16) {
            perror("l4_stream: send");
            return 1;
        }
        if (fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK) < 0) {
            perror("l4_stream: fcntl");
            return 1;
        }
        c->to_send = up;
        c->expect = down;
        c->hdr_done = true;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }
    int live = n, errors = 0;
    struct epoll_event evs[64];
    while (live > 0) {
        if (now_s() - t0 > timeout) {
            fprintf(stderr, "l4_stream: timeout with %d connections unfinished\n", live);
            errors += live;
            break;
        }
        int k = epoll_wait(ep, evs, 64, 200);
        for (int i = 0; i < k; i++) {
            struct s *c = evs[i].data.ptr;
            if (c->fd < 0)
                continue;
            int r = pump_in(c, false);
            if (r == 0)
                r = pump_out(c);
            /* Done when both directions are: the server closes then too. */
            if (r < 0 || (c->rd_done && c->wr_done)) {
                if (r < 0 || c->received != c->expect || c->sent != c->to_send)
                    errors++;
                close(c->fd);
                c->fd = -1;
                live--;
            }
        }
    }
    double secs = now_s() - t0;
    uint64_t su = 0, sd = 0;
    for (int i = 0; i < n; i++) {
        su += cs[i].sent;
        sd += cs[i].received;
    }
    printf("RESULT up %llu down %llu seconds %.3f errors %d\n", (unsigned long long)su,
           (unsigned long long)sd, secs, errors);
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    memset(out_buf, 'x', sizeof out_buf);
    if (argc >= 3 && strcmp(argv[1], "serve") == 0)
        return serve(arg_int(argv[2], "port"));
    if (argc >= 2 && strcmp(argv[1], "client") == 0)
        return client(argc, argv);
    fprintf(stderr,
            "usage: %s serve PORT | client HOST PORT CONNS UP_BYTES DOWN_BYTES [TIMEOUT_S]\n",
            argv[0]);
    return 2;
}
