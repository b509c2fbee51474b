/*
 * CPU cost of L4 forwarding through sl_tunnel: CPU-seconds per GB moved, spliced and copied.
 *
 * Build and run (from the repository root):
 *   make MODE=release build/release/libsluice.a
 *   cc -O2 -Isrc bench/l4_tunnel_bench.c build/release/libsluice.a -lpthread \
 *      -o build/l4_tunnel_bench
 *   ./build/l4_tunnel_bench [GiB per run, default 4]
 *
 * One process, three threads, loopback TCP: a client thread sends N GiB to the tunnel's
 * client socket and shuts down writing; the tunnel runs on the main thread's loop and forwards
 * to its upstream socket; a server thread reads everything (spliced into /dev/null, so the
 * sink costs little) and closes when it sees the EOF. A second set of runs sends N/2 GiB each
 * way at once (the server echoes its own stream back while reading).
 *
 * Each configuration runs REPEAT times; the run with the median tunnel CPU is reported, with
 * the lowest and highest. Reported: the tunnel thread's CPU time (getrusage RUSAGE_THREAD, user +
 * system) per GB (10^9 bytes) forwarded, which is the forwarding cost itself; the whole process's
 * CPU per GB, which adds both peers' socket work; and the throughput. Loopback sends do the
 * receiving side's TCP work in the sender's context, so the tunnel thread also pays the receive
 * processing of the bytes it sends, as a forwarder on a real NIC would in softirq.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core/bpool.h"
#include "core/loop.h"
#include "core/transport.h"
#include "l4/tunnel.h"

#define CHUNK (1u << 20)

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void tcp_pair(int *a, int *b)
{
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sin;
    if (l < 0 || bind(l, (struct sockaddr *)&sin, sizeof sin) < 0 || listen(l, 1) < 0 ||
        getsockname(l, (struct sockaddr *)&sin, &len) < 0)
        die("listen");
    int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c < 0 || connect(c, (struct sockaddr *)&sin, sizeof sin) < 0)
        die("connect");
    int s = accept4(l, NULL, NULL, SOCK_CLOEXEC);
    if (s < 0)
        die("accept");
    close(l);
    *a = c;
    *b = s;
}

static void set_nonblock(int fd)
{
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0)
        die("fcntl");
}

static double cpu_s(int who)
{
    struct rusage ru;
    getrusage(who, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static double wall_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A peer thread: sends `send_bytes` then shuts down writing, and reads until EOF. */
struct peer {
    int fd;
    uint64_t send_bytes;
    uint64_t received;
    const char *buf;
    pthread_t thread;
};

/* Reading is spliced into /dev/null so the sink's cost stays out of the way. */
static void *reader_main(void *arg)
{
    struct peer *p = arg;
    int null_fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
    int pfd[2];
    if (null_fd < 0 || pipe2(pfd, O_CLOEXEC) < 0)
        die("sink");
    for (;;) {
        ssize_t n = splice(p->fd, NULL, pfd[1], NULL, CHUNK, SPLICE_F_MOVE);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("sink splice");
        if (n == 0)
            break;
        p->received += (uint64_t)n;
        while (n > 0) {
            ssize_t m = splice(pfd[0], NULL, null_fd, NULL, (size_t)n, SPLICE_F_MOVE);
            if (m <= 0)
                die("sink drain");
            n -= m;
        }
    }
    close(pfd[0]);
    close(pfd[1]);
    close(null_fd);
    return NULL;
}

static void *writer_main(void *arg)
{
    struct peer *p = arg;
    uint64_t sent = 0;
    while (sent < p->send_bytes) {
        uint64_t left = p->send_bytes - sent;
        ssize_t n = send(p->fd, p->buf, left < CHUNK ? (size_t)left : CHUNK, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("send");
        sent += (uint64_t)n;
    }
    shutdown(p->fd, SHUT_WR);
    return NULL;
}

/* Both halves of one socket: a writer thread and a reader thread. */
struct end {
    struct peer w, r;
};

static void end_start(struct end *e, int fd, uint64_t send_bytes, const char *buf)
{
    e->w = (struct peer){.fd = fd, .send_bytes = send_bytes, .buf = buf};
    e->r = (struct peer){.fd = fd};
    if (pthread_create(&e->w.thread, NULL, writer_main, &e->w) != 0 ||
        pthread_create(&e->r.thread, NULL, reader_main, &e->r) != 0)
        die("pthread_create");
}

static void end_join(struct end *e)
{
    pthread_join(e->w.thread, NULL);
    pthread_join(e->r.thread, NULL);
    close(e->w.fd);
}

static enum sl_tunnel_reason done_reason;

static void on_done(struct sl_tunnel *t, enum sl_tunnel_reason reason, void *data)
{
    (void)t;
    done_reason = reason;
    sl_loop_stop(data);
}

struct result {
    double tunnel_cpu, process_cpu, wall;
    uint64_t bytes;
};

static struct result run(bool copy, size_t block_bytes, uint32_t pipe_bytes, uint64_t up_bytes,
                         uint64_t down_bytes, const char *buf)
{
    struct sl_loop loop;
    struct sl_bpool bufs;
    struct sl_tunnel_pipes pipes;
    struct sl_tunnel t;
    struct sl_transport tr[2];
    if (sl_loop_init(&loop) < 0)
        die("loop");
    sl_bpool_init(&bufs, block_bytes, 4);
    if (sl_tunnel_pipes_init(&pipes, &bufs, pipe_bytes, 4, 16) < 0)
        die("pipes");
    int cli, tcli, tup, up;
    tcp_pair(&cli, &tcli);
    tcp_pair(&tup, &up);
    set_nonblock(tcli);
    set_nonblock(tup);
    struct end client, server;
    double c0 = cpu_s(RUSAGE_THREAD), p0 = cpu_s(RUSAGE_SELF), w0 = wall_s();
    end_start(&client, cli, up_bytes, buf);
    end_start(&server, up, down_bytes, buf);
    int rc;
    if (copy) {
        sl_tcp_transport_init(&tr[0], tcli);
        sl_tcp_transport_init(&tr[1], tup);
        rc = sl_tunnel_start_transports(&t, &loop, &pipes, &tr[0], &tr[1], SL_TUNNEL_NO_SPLICE, 0,
                                        on_done, &loop);
    } else {
        rc = sl_tunnel_start(&t, &loop, &pipes, tcli, tup, 0, on_done, &loop);
    }
    if (rc < 0) {
        errno = -rc;
        die("tunnel");
    }
    sl_loop_run(&loop);
    struct result r = {.tunnel_cpu = cpu_s(RUSAGE_THREAD) - c0};
    end_join(&client);
    end_join(&server);
    r.process_cpu = cpu_s(RUSAGE_SELF) - p0;
    r.wall = wall_s() - w0;
    r.bytes = sl_tunnel_bytes(&t, SL_TUNNEL_UP) + sl_tunnel_bytes(&t, SL_TUNNEL_DOWN);
    if (done_reason != SL_TUNNEL_CLOSED || r.bytes != up_bytes + down_bytes ||
        server.r.received != up_bytes || client.r.received != down_bytes) {
        fprintf(stderr, "run failed: %s, %llu of %llu bytes\n", sl_tunnel_reason_name(done_reason),
                (unsigned long long)r.bytes, (unsigned long long)(up_bytes + down_bytes));
        exit(1);
    }
    sl_tunnel_pipes_dispose(&pipes);
    sl_bpool_dispose(&bufs);
    sl_loop_dispose(&loop);
    return r;
}

#define REPEAT 3

static int by_tunnel_cpu(const void *a, const void *b)
{
    const struct result *x = a, *y = b;
    return (x->tunnel_cpu > y->tunnel_cpu) - (x->tunnel_cpu < y->tunnel_cpu);
}

/* Runs a configuration REPEAT times and prints the run with the median tunnel CPU (this kind
 * of machine varies by tens of percent from run to run with how the threads get scheduled). */
static void report(const char *name, bool copy, size_t block_bytes, uint32_t pipe_bytes,
                   uint64_t up_bytes, uint64_t down_bytes, const char *buf)
{
    struct result rs[REPEAT];
    for (int i = 0; i < REPEAT; i++)
        rs[i] = run(copy, block_bytes, pipe_bytes, up_bytes, down_bytes, buf);
    qsort(rs, REPEAT, sizeof rs[0], by_tunnel_cpu);
    struct result r = rs[REPEAT / 2];
    double gb = (double)r.bytes / 1e9;
    printf(
        "%-32s tunnel %5.3f CPU-s/GB (min %5.3f max %5.3f)  process %5.3f CPU-s/GB  %5.2f GB/s\n",
        name, r.tunnel_cpu / gb, rs[0].tunnel_cpu / gb, rs[REPEAT - 1].tunnel_cpu / gb,
        r.process_cpu / gb, gb / r.wall);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    double gib = argc > 1 ? strtod(argv[1], NULL) : 4.0;
    if (!(gib > 0))
        gib = 4.0;
    uint64_t total = (uint64_t)(gib * (double)(1ull << 30));
    char *buf = malloc(CHUNK);
    if (!buf)
        die("malloc");
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < CHUNK; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = (char)(x >> 24);
    }
    printf("%.2f GiB (%.2f GB) per run, median of %d; one tunnel; loopback TCP\n", gib,
           (double)total / 1e9, REPEAT);
    uint64_t half = total / 2;
    report("splice, 64 KiB pipe, one way", false, 16384, 65536, total, 0, buf);
    report("splice, 256 KiB pipe, one way", false, 16384, 262144, total, 0, buf);
    report("splice, 1 MiB pipe, one way", false, 16384, 1u << 20, total, 0, buf);
    report("copy, 16 KiB block, one way", true, 16384, 0, total, 0, buf);
    report("copy, 64 KiB block, one way", true, 65536, 0, total, 0, buf);
    report("splice, 64 KiB pipe, both ways", false, 16384, 65536, half, half, buf);
    report("splice, 1 MiB pipe, both ways", false, 16384, 1u << 20, half, half, buf);
    report("copy, 16 KiB block, both ways", true, 16384, 0, half, half, buf);
    free(buf);
    return 0;
}
