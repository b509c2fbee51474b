/*
 * bench/idleconns.c - hold N idle HTTP/1.1 keep-alive client connections to a proxy.
 *
 * Protocol with the driver (bench/bench.py) on stdin/stdout, one line each:
 *   1. opens one connection, sends one request, reads the response    -> prints "WARM"
 *   2. waits for a line on stdin ("go"), then opens the other N-1 connections (at most
 *      --inflight at once), sends one request on each and reads its response completely,
 *      so every connection is fully set up and then idle             -> prints "READY n ms"
 *   3. waits for a line on stdin ("check"), counts connections the proxy has closed in
 *      the meantime (recv MSG_PEEK returning 0 or an error)          -> prints "ALIVE k"
 *   4. waits for a line on stdin (or EOF) and exits, closing everything.
 *
 * Source addresses rotate over 127.0.0.2.. (one per 8,000 connections) so ephemeral ports
 * never run out; IP_BIND_ADDRESS_NO_PORT lets connect() pick the port per 4-tuple.
 *
 * Usage: idleconns HOST PORT N [INFLIGHT] [TIMEOUT_S]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { ST_CONNECTING, ST_READING, ST_DONE, ST_FAILED };

struct c {
    int fd;
    int state;
    unsigned short got;
    char buf[1024];
};

static const char REQ[] = "GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: idleconns\r\n\r\n";
static struct sockaddr_in dst;
static int ep;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int start_conn(struct c *c, int idx)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    struct sockaddr_in src = {.sin_family = AF_INET};
    src.sin_addr.s_addr = htonl(0x7f000002u + (uint32_t)(idx / 8000));
    if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
        close(fd);
        return -1;
    }
    c->fd = fd;
    c->got = 0;
    c->state = ST_CONNECTING;
    int r = connect(fd, (struct sockaddr *)&dst, sizeof dst);
    if (r < 0 && errno != EINPROGRESS) {
        close(fd);
        c->fd = -1;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)idx};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

/* Returns 1 when the response is complete, 0 to continue, -1 on failure. */
static int response_complete(struct c *c)
{
    char *h = memmem(c->buf, c->got, "\r\n\r\n", 4);
    if (!h)
        return c->got >= sizeof c->buf - 1 ? -1 : 0;
    size_t head = (size_t)(h + 4 - c->buf);
    c->buf[c->got] = 0;
    char *cl = strcasestr(c->buf, "\ncontent-length:");
    size_t body = 0;
    if (cl && cl < h)
        body = strtoul(cl + 16, NULL, 10);
    return c->got >= head + body ? 1 : 0;
}

/* Drives one event; returns 1 if the connection just finished, -1 if it failed. */
static int on_event(struct c *c, uint32_t events)
{
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err || (events & (EPOLLERR | EPOLLHUP)))
            return -1;
        if (send(c->fd, REQ, sizeof REQ - 1, MSG_NOSIGNAL) != (ssize_t)(sizeof REQ - 1))
            return -1;
        c->state = ST_READING; /* the caller switches the interest set to EPOLLIN */
        return 0;
    }
    if (c->state == ST_READING) {
        ssize_t n = recv(c->fd, c->buf + c->got, sizeof c->buf - 1 - c->got, 0);
        if (n == 0)
            return -1;
        if (n < 0)
            return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
        c->got += (unsigned short)n;
        int r = response_complete(c);
        if (r < 0)
            return -1;
        if (r == 1) {
            c->state = ST_DONE;
            return 1;
        }
    }
    return 0;
}

static int wait_line(void)
{
    char line[128];
    return fgets(line, sizeof line, stdin) != NULL;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s HOST PORT N [INFLIGHT] [TIMEOUT_S]\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int n = arg_int(argv[3], "connection count");
    int inflight_max = argc > 4 ? arg_int(argv[4], "inflight") : 256;
    double timeout_ms = (argc > 5 ? atof(argv[5]) : 120) * 1000;
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    if ((rlim_t)n + 16 > rl.rlim_cur) {
        fprintf(stderr, "idleconns: need %d fds, limit is %llu\n", n + 16,
                (unsigned long long)rl.rlim_cur);
        return 1;
    }
    dst.sin_family = AF_INET;
    dst.sin_port = htons((uint16_t)arg_int(argv[2], "port"));
    if (inet_pton(AF_INET, argv[1], &dst.sin_addr) != 1) {
        fprintf(stderr, "idleconns: bad address %s\n", argv[1]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct c *cs = calloc((size_t)n, sizeof *cs);
    struct epoll_event evs[512];
    double t0 = now_ms();
    int next = 0, inflight = 0, done = 0, failed = 0, retries = 0;

    for (int phase = 0; phase < 2; phase++) {
        int target = phase == 0 ? 1 : n;
        while (done < target) {
            while (next < target && inflight < inflight_max) {
                if (start_conn(&cs[next], next) < 0) {
                    fprintf(stderr, "idleconns: socket/connect failed at %d: %s\n", next,
                            strerror(errno));
                    return 1;
                }
                next++;
                inflight++;
            }
            if (now_ms() - t0 > timeout_ms) {
                fprintf(stderr, "idleconns: timeout with %d/%d done, %d failed\n", done, n, failed);
                printf("READY %d %.0f\n", done, now_ms() - t0);
                goto hold;
            }
            int k = epoll_wait(ep, evs, 512, 200);
            for (int i = 0; i < k; i++) {
                int idx = (int)evs[i].data.u32;
                struct c *c = &cs[idx];
                int prev = c->state;
                int r = on_event(c, evs[i].events);
                if (r == 0 && prev == ST_CONNECTING && c->state == ST_READING) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)idx};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                } else if (r == 1) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    inflight--;
                    done++;
                } else if (r < 0) {
                    /* Retry a few times (e.g. a SYN dropped by a full backlog), then fail. */
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    close(c->fd);
                    if (retries < n / 10 + 10) {
                        retries++;
                        if (start_conn(c, idx) < 0)
                            return 1;
                    } else {
                        c->state = ST_FAILED;
                        c->fd = -1;
                        inflight--;
                        failed++;
                        done++; /* counted as finished so the loop ends */
                    }
                }
            }
        }
        if (phase == 0) {
            printf("WARM\n");
            if (!wait_line())
                return 0;
            t0 = now_ms();
        }
    }
    printf("READY %d %.0f\n", done - failed, now_ms() - t0);
    if (failed || retries)
        fprintf(stderr, "idleconns: %d failed, %d retried\n", failed, retries);
hold:
    if (!wait_line())
        return 0;
    int alive = 0;
    for (int i = 0; i < n; i++) {
        if (cs[i].state != ST_DONE)
            continue;
        char b;
        ssize_t r = recv(cs[i].fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            alive++;
    }
    printf("ALIVE %d\n", alive);
    wait_line();
    return 0;
}
