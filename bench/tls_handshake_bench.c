/*
 * bench/tls_handshake_bench.c - TLS client load for bench/edge_peers.py (OpenSSL, epoll).
 *
 * Two modes:
 *
 *   tls_handshake_bench loop HOST PORT CONC SECONDS full|resume
 *     CONC connections at a time, each looping: TCP connect -> TLS 1.3 handshake ->
 *     "GET / HTTP/1.1" -> read the whole response (Content-Length) -> close_notify + close,
 *     for SECONDS. `full`: no session is offered, every handshake is a full one. `resume`:
 *     each slot keeps the session of its previous connection (SSL_get1_session once the
 *     response is read: in TLS 1.3 the server's NewSessionTicket arrives after the handshake,
 *     before the response) and offers it with SSL_set_session, so after each slot's first
 *     connection every handshake resumes from a ticket (PSK with (EC)DHE, OpenSSL's default).
 *     Prints one line at the end:
 *       RESULT conns N resumed R errors E seconds S
 *     N = connections that completed the request, R = how many of them resumed
 *     (SSL_session_reused), E = connections that failed (connect, handshake, bad response).
 *
 *   tls_handshake_bench idle HOST PORT N [INFLIGHT] [TIMEOUT_S]
 *     N TLS connections, each completing the handshake and one keep-alive request, then
 *     held idle. The driver protocol on stdin/stdout is that of bench/idleconns.c:
 *       one connection + request -> "WARM"; a line on stdin -> the other N-1 (at most
 *       INFLIGHT at once) -> "READY n ms"; a line -> "ALIVE k" (connections the proxy has
 *       not closed: recv MSG_PEEK would block); a line or EOF -> exit.
 *
 * Certificates are not verified (SSL_VERIFY_NONE; the TLS 1.3 CertificateVerify signature is
 * still checked by OpenSSL). SNI "localhost". Source addresses rotate over 127.0.0.2..9 with
 * IP_BIND_ADDRESS_NO_PORT so that the TIME_WAIT sockets of closed connections (this client
 * closes first) never exhaust the ephemeral ports.
 *
 * Build: cc -O2 -o tls_handshake_bench bench/tls_handshake_bench.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdbool.h>
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

enum { ST_CONNECTING, ST_HANDSHAKE, ST_WRITE, ST_READ, ST_IDLE, ST_FAILED };

struct conn {
    int fd;
    int state;
    SSL *ssl;
    SSL_SESSION *sess; /* loop/resume: the session to offer next time */
    double started_ms;
    unsigned got;
    char buf[2048];
};

static const char REQ[] =
    "GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: tls_handshake_bench\r\n\r\n";
static struct sockaddr_in dst;
static int ep;
static SSL_CTX *ctx;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void drop(struct conn *c)
{
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
}

/* Opens the TCP connection and the SSL object; 0 or -1. */
static int start_conn(struct conn *c, int idx)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in src = {.sin_family = AF_INET};
    src.sin_addr.s_addr = htonl(0x7f000002u + (uint32_t)(idx % 8));
    if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
        close(fd);
        return -1;
    }
    int r = connect(fd, (struct sockaddr *)&dst, sizeof dst);
    if (r < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    c->fd = fd;
    c->got = 0;
    c->state = ST_CONNECTING;
    c->started_ms = now_ms();
    c->ssl = SSL_new(ctx);
    if (!c->ssl) {
        drop(c);
        return -1;
    }
    SSL_set_fd(c->ssl, fd);
    SSL_set_tlsext_host_name(c->ssl, "localhost");
    if (c->sess)
        SSL_set_session(c->ssl, c->sess);
    SSL_set_connect_state(c->ssl);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        drop(c);
        return -1;
    }
    return 0;
}

/* 1 when the response (head + Content-Length body) is complete, 0 to go on, -1 if bad. */
static int response_complete(struct conn *c)
{
    char *h = memmem(c->buf, c->got, "\r\n\r\n", 4);
    if (!h)
        return c->got >= sizeof c->buf - 1 ? -1 : 0;
    size_t head = (size_t)(h + 4 - c->buf);
    c->buf[c->got] = 0;
    if (strncmp(c->buf, "HTTP/1.1 200", 12) != 0 && strncmp(c->buf, "HTTP/1.0 200", 12) != 0)
        return -1;
    char *cl = strcasestr(c->buf, "\ncontent-length:");
    size_t body = 0;
    if (cl && cl < h)
        body = strtoul(cl + 16, NULL, 10);
    return c->got >= head + body ? 1 : 0;
}

/* Whether an SSL_* result just means "wait for the socket". */
static bool is_wait(struct conn *c, int r)
{
    int e = SSL_get_error(c->ssl, r);
    return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE;
}

/* Drives one connection as far as it goes. Returns 1 when the response was read completely,
 * 0 to wait for the socket, -1 on failure. */
static int drive(struct conn *c)
{
    for (;;) {
        switch (c->state) {
        case ST_CONNECTING: {
            int err = 0;
            socklen_t l = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
            if (err)
                return -1;
            c->state = ST_HANDSHAKE;
            break;
        }
        case ST_HANDSHAKE: {
            int r = SSL_do_handshake(c->ssl);
            if (r == 1) {
                c->state = ST_WRITE;
                break;
            }
            return is_wait(c, r) ? 0 : -1;
        }
        case ST_WRITE: {
            int r = SSL_write(c->ssl, REQ, (int)(sizeof REQ - 1));
            if (r == (int)(sizeof REQ - 1)) {
                c->state = ST_READ;
                break;
            }
            return r <= 0 && is_wait(c, r) ? 0 : -1;
        }
        case ST_READ: {
            int r = SSL_read(c->ssl, c->buf + c->got, (int)(sizeof c->buf - 1 - c->got));
            if (r <= 0)
                return is_wait(c, r) ? 0 : -1;
            c->got += (unsigned)r;
            int k = response_complete(c);
            if (k != 0)
                return k;
            break;
        }
        default:
            return 0;
        }
    }
}

static void setup(const char *host, const char *port)
{
    signal(SIGPIPE, SIG_IGN);
    dst.sin_family = AF_INET;
    dst.sin_port = htons((uint16_t)arg_int(port, "port"));
    if (inet_pton(AF_INET, host, &dst.sin_addr) != 1) {
        fprintf(stderr, "tls_handshake_bench: bad address %s\n", host);
        exit(2);
    }
    ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx || SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1) {
        ERR_print_errors_fp(stderr);
        exit(1);
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    /* Sessions are kept by hand (SSL_get1_session); no client cache to maintain. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    ep = epoll_create1(EPOLL_CLOEXEC);
    setvbuf(stdout, NULL, _IOLBF, 0);
}

static int loop_mode(int argc, char **argv)
{
    if (argc < 7) {
        fprintf(stderr, "usage: %s loop HOST PORT CONC SECONDS full|resume\n", argv[0]);
        return 2;
    }
    setup(argv[2], argv[3]);
    int conc = arg_int(argv[4], "concurrency");
    double dur_ms = arg_int(argv[5], "seconds") * 1000.0;
    bool resume = strcmp(argv[6], "resume") == 0;
    if (!resume && strcmp(argv[6], "full") != 0) {
        fprintf(stderr, "mode must be full or resume\n");
        return 2;
    }
    struct conn *cs = calloc((size_t)conc, sizeof *cs);
    if (!cs)
        return 1;
    long done = 0, resumed = 0, errors = 0;
    double t0 = now_ms(), end = t0 + dur_ms;
    for (int i = 0; i < conc; i++) {
        cs[i].fd = -1;
        if (start_conn(&cs[i], i) < 0) {
            fprintf(stderr, "tls_handshake_bench: connect: %s\n", strerror(errno));
            return 1;
        }
    }
    struct epoll_event evs[256];
    int stuck_check = 0;
    while (now_ms() < end) {
        int k = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < k; i++) {
            int idx = (int)evs[i].data.u32;
            struct conn *c = &cs[idx];
            if (c->fd < 0)
                continue;
            int r = drive(c);
            if (r == 0)
                continue;
            if (r == 1) {
                done++;
                if (SSL_session_reused(c->ssl))
                    resumed++;
                if (resume) {
                    SSL_SESSION *s = SSL_get1_session(c->ssl);
                    if (s) {
                        if (c->sess)
                            SSL_SESSION_free(c->sess);
                        c->sess = s;
                    }
                }
                SSL_shutdown(c->ssl); /* sends close_notify; no wait for the peer's */
            } else {
                errors++;
                ERR_clear_error();
            }
            drop(c);
            if (now_ms() < end && start_conn(c, idx) < 0) {
                errors++;
                c->fd = -1;
            }
        }
        /* A connection without progress for 10 s counts as failed and starts over. */
        if (++stuck_check % 64 == 0) {
            double t = now_ms();
            for (int i = 0; i < conc; i++) {
                if (cs[i].fd >= 0 && t - cs[i].started_ms > 10000) {
                    errors++;
                    drop(&cs[i]);
                    if (start_conn(&cs[i], i) < 0)
                        cs[i].fd = -1;
                }
            }
        }
    }
    double secs = (now_ms() - t0) / 1000.0;
    printf("RESULT conns %ld resumed %ld errors %ld seconds %.3f\n", done, resumed, errors, secs);
    return 0;
}

static int wait_line(void)
{
    char line[128];
    return fgets(line, sizeof line, stdin) != NULL;
}

static int idle_mode(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s idle HOST PORT N [INFLIGHT] [TIMEOUT_S]\n", argv[0]);
        return 2;
    }
    setup(argv[2], argv[3]);
    int n = arg_int(argv[4], "connection count");
    int inflight_max = argc > 5 ? arg_int(argv[5], "inflight") : 64;
    double timeout_ms = (argc > 6 ? atof(argv[6]) : 120) * 1000;
    struct conn *cs = calloc((size_t)n, sizeof *cs);
    if (!cs)
        return 1;
    for (int i = 0; i < n; i++)
        cs[i].fd = -1;
    struct epoll_event evs[256];
    double t0 = now_ms();
    int next = 0, inflight = 0, done = 0, failed = 0, retries = 0;
    for (int phase = 0; phase < 2; phase++) {
        int target = phase == 0 ? 1 : n;
        while (done < target) {
            while (next < target && inflight < inflight_max) {
                if (start_conn(&cs[next], next) < 0) {
                    fprintf(stderr, "tls_handshake_bench: connect failed at %d: %s\n", next,
                            strerror(errno));
                    return 1;
                }
                next++;
                inflight++;
            }
            if (now_ms() - t0 > timeout_ms) {
                fprintf(stderr, "tls_handshake_bench: timeout with %d/%d done, %d failed\n", done,
                        n, failed);
                printf("READY %d %.0f\n", done - failed, now_ms() - t0);
                goto hold;
            }
            int k = epoll_wait(ep, evs, 256, 200);
            for (int i = 0; i < k; i++) {
                int idx = (int)evs[i].data.u32;
                struct conn *c = &cs[idx];
                if (c->fd < 0 || c->state == ST_IDLE)
                    continue;
                int r = drive(c);
                if (r == 1) {
                    /* Idle from now on: out of epoll, the SSL object and socket stay. */
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    c->state = ST_IDLE;
                    inflight--;
                    done++;
                } else if (r < 0) {
                    drop(c);
                    ERR_clear_error();
                    if (retries < n / 10 + 10) {
                        retries++;
                        if (start_conn(c, idx) < 0)
                            return 1;
                    } else {
                        c->state = ST_FAILED;
                        inflight--;
                        failed++;
                        done++;
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
        fprintf(stderr, "tls_handshake_bench: %d failed, %d retried\n", failed, retries);
hold:
    if (!wait_line())
        return 0;
    int alive = 0;
    for (int i = 0; i < n; i++) {
        if (cs[i].state != ST_IDLE || cs[i].fd < 0)
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

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "loop") == 0)
        return loop_mode(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "idle") == 0)
        return idle_mode(argc, argv);
    fprintf(stderr,
            "usage: %s loop HOST PORT CONC SECONDS full|resume\n"
            "       %s idle HOST PORT N [INFLIGHT] [TIMEOUT_S]\n",
            argv[0], argv[0]);
    return 2;
}
