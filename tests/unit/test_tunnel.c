#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/bpool.h"
#include "core/loop.h"
#include "core/transport.h"
#include "l4/tunnel.h"
#include "loop_wait.h"
#include "tls/tls_ctx.h"
#include "tls/tls_transport.h"

/*
 * The L4 tunnel over real loopback sockets and a real loop. Each test runs twice where it
 * makes sense: spliced (sl_tunnel_start) and copied (sl_tunnel_start_transports over TCP
 * transports with SL_TUNNEL_NO_SPLICE). The peers are the test's own sockets, driven on the
 * same loop: "client" talks to the tunnel's client fd, "upstream" to its upstream fd.
 * The TLS tests put a TLS server transport on the tunnel's client side (the copy path), with a
 * TLS client peer on the loop; certificates come from the openssl CLI into a temp directory.
 */

#define WAIT_MS 20000
#define BLOCK_BYTES 16384
#define PIPE_BYTES 65536

static const int MODE_SPLICE = 0, MODE_COPY = 1;

/* ---- peers ------------------------------------------------------------------------------- */

/* One test-side socket: sends `out` (then optionally shuts down writing), reads into `in`. */
struct peer {
    struct sl_loop *loop;
    struct sl_io io;
    int fd;
    const unsigned char *out;
    size_t out_len, out_off;
    bool shut_after; /* shutdown(SHUT_WR) once `out` is sent */
    bool shut_done;
    bool reading; /* false: leave bytes in the socket (a slow reader) */
    unsigned char *in;
    size_t in_cap, in_len;
    bool eof;
    int err; /* errno of the first failure */
};

static void peer_pump(struct peer *p)
{
    if (p->fd < 0 || p->err)
        return;
    while (p->reading && !p->eof) {
        unsigned char scratch[4096];
        unsigned char *dst = p->in_len < p->in_cap ? p->in + p->in_len : scratch;
        size_t room = p->in_len < p->in_cap ? p->in_cap - p->in_len : sizeof scratch;
        ssize_t n = recv(p->fd, dst, room, 0);
        if (n > 0) {
            assert_true(p->in_len + (size_t)n <= p->in_cap); /* never more than was sent */
            p->in_len += (size_t)n;
        } else if (n == 0) {
            p->eof = true;
        } else if (errno == EAGAIN) {
            break;
        } else if (errno != EINTR) {
            p->err = errno;
            return;
        }
    }
    while (p->out_off < p->out_len) {
        ssize_t n = send(p->fd, p->out + p->out_off, p->out_len - p->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            p->out_off += (size_t)n;
        } else if (errno == EAGAIN) {
            break;
        } else if (errno != EINTR) {
            p->err = errno;
            return;
        }
    }
    if (p->out_off == p->out_len && p->shut_after && !p->shut_done) {
        assert_int_equal(shutdown(p->fd, SHUT_WR), 0);
        p->shut_done = true;
    }
}

static void on_peer_io(struct sl_io *io, uint32_t events)
{
    (void)events;
    peer_pump(io->data);
}

static void peer_start(struct peer *p, struct sl_loop *loop, int fd, size_t in_cap)
{
    memset(p, 0, sizeof *p);
    p->loop = loop;
    p->fd = fd;
    p->reading = true;
    p->in_cap = in_cap;
    p->in = in_cap ? malloc(in_cap) : NULL;
    assert_true(in_cap == 0 || p->in);
    /* Edge-triggered with every event delivered: each callback does all it can. */
    assert_int_equal(
        sl_io_start(loop, &p->io, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | SL_IO_EDGE, on_peer_io, p),
        0);
}

static void peer_send(struct peer *p, const unsigned char *data, size_t len, bool shut)
{
    p->out = data;
    p->out_len = len;
    p->out_off = 0;
    p->shut_after = shut;
    peer_pump(p);
}

/* Closes with RST. */
static void peer_reset(struct peer *p)
{
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    assert_int_equal(setsockopt(p->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg), 0);
    sl_io_stop(p->loop, &p->io);
    close(p->fd);
    p->fd = -1;
}

static void peer_dispose(struct peer *p)
{
    sl_io_stop(p->loop, &p->io);
    if (p->fd >= 0)
        close(p->fd);
    p->fd = -1;
    free(p->in);
    p->in = NULL;
}

/* ---- fixture ----------------------------------------------------------------------------- */

struct fx {
    int mode;
    struct sl_loop loop;
    struct sl_bpool bufs;
    struct sl_tunnel_pipes pipes;
    struct sl_tunnel t;
    struct sl_transport tr[2];    /* copy mode: the transports handed to the tunnel */
    struct sl_tls_transport tsrv; /* TLS tests: the tunnel's client side */
    struct peer client, upstream;
    int done_count;
    enum sl_tunnel_reason reason;
    bool started;
    size_t max_held;     /* largest hold of UP seen by up_stalled */
    uint64_t last_moved; /* up_stalled's progress mark */
    int stable_checks;
};

/* A connected pair of non-blocking loopback TCP sockets. */
static void tcp_pair(int *a, int *b)
{
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(l >= 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(l, (struct sockaddr *)&sin, sizeof sin), 0);
    assert_int_equal(listen(l, 1), 0);
    socklen_t len = sizeof sin;
    assert_int_equal(getsockname(l, (struct sockaddr *)&sin, &len), 0);
    int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(c >= 0);
    assert_int_equal(connect(c, (struct sockaddr *)&sin, sizeof sin), 0);
    int s = accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    assert_true(s >= 0);
    assert_int_equal(fcntl(c, F_SETFL, fcntl(c, F_GETFL) | O_NONBLOCK), 0);
    close(l);
    *a = c;
    *b = s;
}

static void on_tunnel_done(struct sl_tunnel *t, enum sl_tunnel_reason reason, void *data)
{
    struct fx *f = data;
    assert_ptr_equal(t, &f->t);
    f->done_count++;
    f->reason = reason;
}

static struct fx *fx_new(int mode, uint32_t max_free, uint32_t max_live)
{
    struct fx *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->mode = mode;
    assert_int_equal(sl_loop_init(&f->loop), 0);
    sl_bpool_init(&f->bufs, BLOCK_BYTES, 8);
    assert_int_equal(sl_tunnel_pipes_init(&f->pipes, &f->bufs, PIPE_BYTES, max_free, max_live), 0);
    return f;
}

/* New sockets, peers with room for in_cap bytes each, and a started tunnel. */
static void fx_connect(struct fx *f, size_t in_cap, uint64_t idle_ms)
{
    int cli, tcli, tup, up;
    tcp_pair(&cli, &tcli);
    tcp_pair(&tup, &up);
    peer_start(&f->client, &f->loop, cli, in_cap);
    peer_start(&f->upstream, &f->loop, up, in_cap);
    f->done_count = 0;
    if (f->mode == MODE_COPY) {
        sl_tcp_transport_init(&f->tr[0], tcli);
        sl_tcp_transport_init(&f->tr[1], tup);
        assert_int_equal(sl_tunnel_start_transports(&f->t, &f->loop, &f->pipes, &f->tr[0],
                                                    &f->tr[1], SL_TUNNEL_NO_SPLICE, idle_ms,
                                                    on_tunnel_done, f),
                         0);
        assert_false(sl_tunnel_can_splice(&f->t, SL_TUNNEL_UP));
    } else {
        assert_int_equal(
            sl_tunnel_start(&f->t, &f->loop, &f->pipes, tcli, tup, idle_ms, on_tunnel_done, f), 0);
        assert_true(sl_tunnel_can_splice(&f->t, SL_TUNNEL_UP));
        assert_true(sl_tunnel_can_splice(&f->t, SL_TUNNEL_DOWN));
    }
    f->started = true;
}

/* Peers closed; the tunnel must have ended (or is aborted here). */
static void fx_disconnect(struct fx *f)
{
    if (f->started && f->done_count == 0) {
        sl_tunnel_abort(&f->t);
        sl_loop_run_deferred(&f->loop);
    }
    assert_int_equal(f->done_count, 1);
    f->started = false;
    peer_dispose(&f->client);
    peer_dispose(&f->upstream);
}

static void fx_free(struct fx *f)
{
    if (f->started)
        fx_disconnect(f);
    /* Every pipe is back in the cache: none leaked, none held by an ended tunnel. */
    assert_int_equal(f->pipes.live, f->pipes.free_count);
    assert_int_equal(f->bufs.outstanding, 0);
    sl_tunnel_pipes_dispose(&f->pipes);
    sl_bpool_dispose(&f->bufs);
    sl_loop_dispose(&f->loop);
    free(f);
}

static unsigned char *random_bytes(size_t n, uint64_t seed)
{
    unsigned char *p = malloc(n);
    assert_non_null(p);
    uint64_t x = seed | 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = (unsigned char)(x >> 24);
    }
    return p;
}

/* ---- predicates -------------------------------------------------------------------------- */

static bool is_done(void *arg)
{
    struct fx *f = arg;
    return f->done_count > 0;
}

struct want {
    struct fx *f;
    size_t client_len, upstream_len; /* bytes each peer must have received */
    bool client_eof, upstream_eof;
    bool done;
};

static bool wanted(void *arg)
{
    struct want *w = arg;
    struct fx *f = w->f;
    return f->client.in_len >= w->client_len && f->upstream.in_len >= w->upstream_len &&
           (!w->client_eof || f->client.eof) && (!w->upstream_eof || f->upstream.eof) &&
           (!w->done || f->done_count > 0);
}

static bool client_failed(void *arg)
{
    struct fx *f = arg;
    peer_pump(&f->client);
    return f->client.err != 0;
}

static bool upstream_failed(void *arg)
{
    struct fx *f = arg;
    peer_pump(&f->upstream);
    return f->upstream.err != 0;
}

/* The UP direction stopped reading (its destination takes nothing, its hold is full) and stayed
 * so, with nothing moving, over STABLE_CHECKS consecutive checks: kernel buffers between the
 * tunnel and a reader that does not read fill up gradually, so one look is not enough. */
#define STABLE_CHECKS 20

static bool up_stalled(void *arg)
{
    struct fx *f = arg;
    size_t held = sl_tunnel_held_bytes(&f->t, SL_TUNNEL_UP);
    if (held > f->max_held)
        f->max_held = held;
    uint64_t moved = sl_tunnel_bytes(&f->t, SL_TUNNEL_UP) + f->client.out_off;
    if (sl_tunnel_is_reading(&f->t, SL_TUNNEL_UP) || held == 0 || moved != f->last_moved) {
        f->last_moved = moved;
        f->stable_checks = 0;
        return false;
    }
    return ++f->stable_checks >= STABLE_CHECKS;
}

/* A reader that does not read fills up sooner with a small receive buffer. */
static void small_rcvbuf(int fd)
{
    int sz = 32768;
    assert_int_equal(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz), 0);
}

/* ---- tests ------------------------------------------------------------------------------- */

/* Bytes both ways at once, exact, then a clean close from both sides. */
static void test_both_ways(void **state)
{
    const size_t n = 4u << 20;
    struct fx *f = fx_new(*(const int *)*state, 4, 16);
    unsigned char *a = random_bytes(n, 1), *b = random_bytes(n, 2);
    fx_connect(f, n, 0);
    peer_send(&f->client, a, n, true);
    peer_send(&f->upstream, b, n, true);
    struct want w = {f, n, n, true, true, true};
    assert_true(run_until(&f->loop, wanted, &w, WAIT_MS));
    assert_int_equal(f->reason, SL_TUNNEL_CLOSED);
    assert_int_equal(f->client.err, 0);
    assert_int_equal(f->upstream.err, 0);
    assert_memory_equal(f->upstream.in, a, n);
    assert_memory_equal(f->client.in, b, n);
    assert_int_equal(sl_tunnel_bytes(&f->t, SL_TUNNEL_UP), n);
    assert_int_equal(sl_tunnel_bytes(&f->t, SL_TUNNEL_DOWN), n);
    assert_int_equal(sl_tunnel_held_bytes(&f->t, SL_TUNNEL_UP), 0);
    assert_int_equal(sl_tunnel_error(&f->t), 0);
    fx_disconnect(f);
    if (f->mode == MODE_SPLICE)
        assert_true(f->pipes.created >= 1);
    else
        assert_int_equal(f->pipes.created, 0);
    fx_free(f);
    free(a);
    free(b);
}

/* The client shuts down writing first: the upstream sees the EOF, then answers, and the
 * client still receives the whole answer before its own EOF. */
static void test_half_close_client_first(void **state)
{
    const size_t n = 300000, m = 500000;
    struct fx *f = fx_new(*(const int *)*state, 4, 16);
    unsigned char *a = random_bytes(n, 3), *b = random_bytes(m, 4);
    fx_connect(f, m, 0);
    peer_send(&f->client, a, n, true);
    struct want w1 = {.f = f, .upstream_len = n, .upstream_eof = true};
    assert_true(run_until(&f->loop, wanted, &w1, WAIT_MS));
    assert_memory_equal(f->upstream.in, a, n);
    assert_int_equal(f->done_count, 0); /* the other direction is still open */
    peer_send(&f->upstream, b, m, true);
    struct want w2 = {.f = f, .client_len = m, .client_eof = true, .done = true};
    assert_true(run_until(&f->loop, wanted, &w2, WAIT_MS));
    assert_memory_equal(f->client.in, b, m);
    assert_int_equal(f->reason, SL_TUNNEL_CLOSED);
    fx_free(f);
    free(a);
    free(b);
}

/* The same the other way round: the upstream finishes first, the client keeps sending. */
static void test_half_close_upstream_first(void **state)
{
    const size_t n = 300000, m = 500000;
    struct fx *f = fx_new(*(const int *)*state, 4, 16);
    unsigned char *a = random_bytes(n, 5), *b = random_bytes(m, 6);
    fx_connect(f, m, 0);
    peer_send(&f->upstream, a, n, true);
    struct want w1 = {.f = f, .client_len = n, .client_eof = true};
    assert_true(run_until(&f->loop, wanted, &w1, WAIT_MS));
    assert_memory_equal(f->client.in, a, n);
    assert_int_equal(f->done_count, 0);
    peer_send(&f->client, b, m, true);
    struct want w2 = {.f = f, .upstream_len = m, .upstream_eof = true, .done = true};
    assert_true(run_until(&f->loop, wanted, &w2, WAIT_MS));
    assert_memory_equal(f->upstream.in, b, m);
    assert_int_equal(f->reason, SL_TUNNEL_CLOSED);
    fx_free(f);
    free(a);
    free(b);
}

/* A client reset reaches the upstream as a reset. */
static void test_client_reset(void **state)
{
    struct fx *f = fx_new(*(const int *)*state, 4, 16);
    unsigned char *a = random_bytes(1000, 7);
    fx_connect(f, 4096, 0);
    peer_send(&f->client, a, 1000, false);
    struct want w = {.f = f, .upstream_len = 1000};
    assert_true(run_until(&f->loop, wanted, &w, WAIT_MS));
    peer_reset(&f->client);
    assert_true(run_until(&f->loop, is_done, f, WAIT_MS));
    assert_int_equal(f->reason, SL_TUNNEL_CLIENT_ERROR);
    assert_int_equal(sl_tunnel_error(&f->t), -ECONNRESET);
    assert_true(run_until(&f->loop, upstream_failed, f, WAIT_MS));
    assert_int_equal(f->upstream.err, ECONNRESET);
    fx_free(f);
    free(a);
}

/* An upstream reset reaches the client as a reset, also after the client half-closed (then
 * no flow reads from or writes to the client: the error comes from the socket itself). */
static void test_upstream_reset(void **state)
{
    for (int after_half_close = 0; after_half_close < 2; after_half_close++) {
        struct fx *f = fx_new(*(const int *)*state, 4, 16);
        fx_connect(f, 4096, 0);
        if (after_half_close) {
            peer_send(&f->client, NULL, 0, true);
            struct want w = {.f = f, .upstream_eof = true};
            assert_true(run_until(&f->loop, wanted, &w, WAIT_MS));
        }
        peer_reset(&f->upstream);
        assert_true(run_until(&f->loop, is_done, f, WAIT_MS));
        assert_int_equal(f->reason, SL_TUNNEL_UPSTREAM_ERROR);
        assert_true(run_until(&f->loop, client_failed, f, WAIT_MS));
        assert_int_equal(f->client.err, ECONNRESET);
        fx_free(f);
    }
}

/* No byte either way for the idle timeout: both sides are closed (FIN, not RST); bytes
 * moving push the deadline back. */
static void test_idle_timeout(void **state)
{
    const uint64_t idle = 80;
    struct fx *f = fx_new(*(const int *)*state, 4, 16);
    fx_connect(f, 4096, idle);
    uint64_t start = sl_clock_now_ms();
    unsigned char msg[10];
    memset(msg, 'x', sizeof msg);
    /* Five messages 40 ms apart keep it alive well past one timeout. */
    for (int i = 0; i < 5; i++) {
        run_until(&f->loop, is_done, f, idle / 2);
        assert_int_equal(f->done_count, 0);
        peer_send(&f->client, msg, sizeof msg, false);
        struct want w = {.f = f, .upstream_len = (size_t)(i + 1) * sizeof msg};
        assert_true(run_until(&f->loop, wanted, &w, WAIT_MS));
    }
    uint64_t last = sl_clock_now_ms();
    assert_true(last - start >= 2 * idle);
    assert_true(run_until(&f->loop, is_done, f, WAIT_MS));
    assert_true(sl_clock_now_ms() - last >= idle - 5);
    assert_int_equal(f->reason, SL_TUNNEL_IDLE_TIMEOUT);
    struct want w = {.f = f, .client_eof = true, .upstream_eof = true};
    assert_true(run_until(&f->loop, wanted, &w, WAIT_MS));
    assert_int_equal(f->client.err, 0);
    assert_int_equal(f->upstream.err, 0);
    fx_free(f);
}

/* Idle with bytes held for a peer that stopped reading: those bytes are lost, so both peers
 * get a reset rather than a clean-looking FIN. */
static void test_idle_timeout_stalled(void **state)
{
    const size_t n = 16u << 20;
    struct fx *f = fx_new(*(const int *)*state, 4, 16);
    unsigned char *a = random_bytes(n, 15);
    fx_connect(f, n, 100);
    f->upstream.reading = false;
    small_rcvbuf(f->upstream.fd);
    peer_send(&f->client, a, n, false);
    assert_true(run_until(&f->loop, is_done, f, WAIT_MS));
    assert_int_equal(f->reason, SL_TUNNEL_IDLE_TIMEOUT);
    assert_true(run_until(&f->loop, client_failed, f, WAIT_MS));
    assert_true(f->client.err == ECONNRESET || f->client.err == EPIPE);
    fx_free(f);
    free(a);
}

/* A slow reader: the tunnel holds at most one pipe (or block) of bytes, stops reading from the
 * client, and resumes when the upstream reads again; nothing is lost. */
static void test_backpressure(void **state)
{
    const size_t n = 16u << 20;
    struct fx *f = fx_new(*(const int *)*state, 4, 16);
    unsigned char *a = random_bytes(n, 8);
    fx_connect(f, n, 0);
    f->upstream.reading = false;
    small_rcvbuf(f->upstream.fd);
    peer_send(&f->client, a, n, true);
    peer_send(&f->upstream, NULL, 0, true);
    assert_true(run_until(&f->loop, up_stalled, f, WAIT_MS));
    size_t bound = f->mode == MODE_SPLICE ? PIPE_BYTES : BLOCK_BYTES;
    assert_true(f->max_held <= bound);  /* at every check while it filled up */
    assert_true(f->client.out_off < n); /* the client is held back, not buffered for */
    assert_false(sl_tunnel_is_reading(&f->t, SL_TUNNEL_UP));
    assert_true(f->t.side[1].io.interest & EPOLLOUT); /* waiting for the upstream to drain */
    f->upstream.reading = true;
    peer_pump(&f->upstream);
    struct want w = {f, 0, n, true, true, true};
    assert_true(run_until(&f->loop, wanted, &w, WAIT_MS));
    assert_memory_equal(f->upstream.in, a, n);
    assert_int_equal(f->reason, SL_TUNNEL_CLOSED);
    fx_free(f);
    free(a);
}

/* Aborted with bytes held: on_done follows from the deferred pass, both peers see a reset,
 * the pipe with stale bytes is closed rather than cached, nothing leaks. */
static void test_abort_in_flight(void **state)
{
    const size_t n = 8u << 20;
    struct fx *f = fx_new(*(const int *)*state, 4, 16);
    unsigned char *a = random_bytes(n, 9);
    fx_connect(f, n, 0);
    f->upstream.reading = false;
    small_rcvbuf(f->upstream.fd);
    peer_send(&f->client, a, n, false);
    assert_true(run_until(&f->loop, up_stalled, f, WAIT_MS));
    sl_tunnel_abort(&f->t);
    assert_int_equal(f->done_count, 0); /* never from inside abort */
    sl_tunnel_abort(&f->t);             /* a no-op once ended */
    assert_true(run_until(&f->loop, is_done, f, WAIT_MS));
    assert_int_equal(f->done_count, 1);
    assert_int_equal(f->reason, SL_TUNNEL_ABORTED);
    if (f->mode == MODE_SPLICE)
        assert_int_equal(f->pipes.discarded, 1);
    assert_true(run_until(&f->loop, client_failed, f, WAIT_MS));
    assert_true(f->client.err == ECONNRESET || f->client.err == EPIPE);
    f->upstream.reading = true;
    assert_true(run_until(&f->loop, upstream_failed, f, WAIT_MS));
    assert_int_equal(f->upstream.err, ECONNRESET);
    run_until(&f->loop, NULL, NULL, 5);
    assert_int_equal(f->done_count, 1);
    fx_free(f);
    free(a);
}

/* Pipes come back to the pool when a direction goes idle and are reused by later tunnels. */
static void test_pipe_reuse(void **state)
{
    (void)state;
    const size_t n = 200000;
    struct fx *f = fx_new(MODE_SPLICE, 4, 16);
    unsigned char *a = random_bytes(n, 10), *b = random_bytes(n, 11);
    for (int round = 0; round < 5; round++) {
        fx_connect(f, n, 0);
        peer_send(&f->client, a, n, false);
        struct want w1 = {.f = f, .upstream_len = n};
        assert_true(run_until(&f->loop, wanted, &w1, WAIT_MS));
        peer_send(&f->upstream, b, n, false);
        struct want w2 = {.f = f, .client_len = n};
        assert_true(run_until(&f->loop, wanted, &w2, WAIT_MS));
        /* Quiet now: the tunnel holds no pipe. */
        assert_int_equal(f->pipes.live, f->pipes.free_count);
        assert_memory_equal(f->upstream.in, a, n);
        assert_memory_equal(f->client.in, b, n);
        peer_send(&f->client, NULL, 0, true);
        peer_send(&f->upstream, NULL, 0, true);
        assert_true(run_until(&f->loop, is_done, f, WAIT_MS));
        assert_int_equal(f->reason, SL_TUNNEL_CLOSED);
        fx_disconnect(f);
    }
    assert_true(f->pipes.created <= 2);
    assert_true(f->pipes.reused >= 8);
    assert_int_equal(f->pipes.denied, 0);
    fx_free(f);
    free(a);
    free(b);
}

/* A bulk flow fills its pipe and gets a larger one; a small exchange keeps the default size.
 * Bytes stay exact across the resize. */
static void test_pipe_grows_for_bulk(void **state)
{
    (void)state;
    const size_t small = 100, n = 8u << 20;
    struct fx *f = fx_new(MODE_SPLICE, 4, 16);
    f->pipes.grow_bytes = 1u << 20;
    unsigned char *a = random_bytes(n, 21), *b = random_bytes(n, 22);
    fx_connect(f, n, 0);
    peer_send(&f->client, a, small, false);
    struct want w1 = {.f = f, .upstream_len = small};
    assert_true(run_until(&f->loop, wanted, &w1, WAIT_MS));
    assert_int_equal(f->pipes.grown, 0);
    peer_send(&f->client, a + small, n - small, true);
    peer_send(&f->upstream, b, n, true);
    struct want w = {f, n, n, true, true, true};
    assert_true(run_until(&f->loop, wanted, &w, WAIT_MS));
    assert_int_equal(f->reason, SL_TUNNEL_CLOSED);
    assert_memory_equal(f->upstream.in, a, n);
    assert_memory_equal(f->client.in, b, n);
    assert_true(f->pipes.grown >= 1);
    fx_disconnect(f);
    fx_free(f);
    free(a);
    free(b);
}

/* At the pool's bound a direction copies instead: one direction holds the only pipe (its
 * reader is slow), the other still delivers its bytes exactly. */
static void test_pipe_bound(void **state)
{
    (void)state;
    const size_t n = 16u << 20, m = 2u << 20; /* n: more than the kernel buffers hold */
    struct fx *f = fx_new(MODE_SPLICE, 1, 1);
    unsigned char *a = random_bytes(n, 12), *b = random_bytes(m, 13);
    fx_connect(f, n, 0);
    f->upstream.reading = false;
    small_rcvbuf(f->upstream.fd);
    peer_send(&f->client, a, n, true);
    assert_true(run_until(&f->loop, up_stalled, f, WAIT_MS));
    assert_int_equal(f->pipes.live, 1);
    assert_int_equal(f->pipes.free_count, 0);
    peer_send(&f->upstream, b, m, true);
    struct want w1 = {.f = f, .client_len = m, .client_eof = true};
    assert_true(run_until(&f->loop, wanted, &w1, WAIT_MS));
    assert_memory_equal(f->client.in, b, m);
    assert_true(f->pipes.denied > 0);
    assert_int_equal(f->pipes.live, 1);
    f->upstream.reading = true;
    peer_pump(&f->upstream);
    struct want w2 = {.f = f, .upstream_len = n, .upstream_eof = true, .done = true};
    assert_true(run_until(&f->loop, wanted, &w2, WAIT_MS));
    assert_memory_equal(f->upstream.in, a, n);
    assert_int_equal(f->reason, SL_TUNNEL_CLOSED);
    fx_free(f);
    free(a);
    free(b);
}

/* A pool without pipes (max_live 0) never splices. */
static void test_no_pipes_copies(void **state)
{
    (void)state;
    const size_t n = 1u << 20;
    struct fx *f = fx_new(MODE_SPLICE, 0, 0);
    unsigned char *a = random_bytes(n, 14);
    int cli, tcli, tup, up;
    tcp_pair(&cli, &tcli);
    tcp_pair(&tup, &up);
    peer_start(&f->client, &f->loop, cli, n);
    peer_start(&f->upstream, &f->loop, up, n);
    assert_int_equal(sl_tunnel_start(&f->t, &f->loop, &f->pipes, tcli, tup, 0, on_tunnel_done, f),
                     0);
    f->started = true;
    assert_false(sl_tunnel_can_splice(&f->t, SL_TUNNEL_UP));
    peer_send(&f->client, a, n, true);
    peer_send(&f->upstream, NULL, 0, true);
    struct want w = {f, 0, n, true, true, true};
    assert_true(run_until(&f->loop, wanted, &w, WAIT_MS));
    assert_memory_equal(f->upstream.in, a, n);
    assert_int_equal(f->pipes.created, 0);
    fx_free(f);
    free(a);
}

/* Bytes that arrived before the tunnel started (the client spoke first, the upstream greeted
 * while the connect completed) are forwarded without waiting for more. */
static void test_bytes_before_start(void **state)
{
    const size_t n = 30000;
    struct fx *f = fx_new(*(const int *)*state, 4, 16);
    unsigned char *a = random_bytes(n, 16), *b = random_bytes(n, 17);
    int cli, tcli, tup, up;
    tcp_pair(&cli, &tcli);
    tcp_pair(&tup, &up);
    peer_start(&f->client, &f->loop, cli, n);
    peer_start(&f->upstream, &f->loop, up, n);
    peer_send(&f->client, a, n, false);
    peer_send(&f->upstream, b, n, false);
    assert_true(f->client.out_off > 0); /* in the kernel before the tunnel starts */
    assert_true(f->upstream.out_off > 0);
    if (f->mode == MODE_COPY) {
        sl_tcp_transport_init(&f->tr[0], tcli);
        sl_tcp_transport_init(&f->tr[1], tup);
        assert_int_equal(sl_tunnel_start_transports(&f->t, &f->loop, &f->pipes, &f->tr[0],
                                                    &f->tr[1], SL_TUNNEL_NO_SPLICE, 0,
                                                    on_tunnel_done, f),
                         0);
    } else {
        assert_int_equal(
            sl_tunnel_start(&f->t, &f->loop, &f->pipes, tcli, tup, 0, on_tunnel_done, f), 0);
    }
    f->started = true;
    struct want w = {.f = f, .client_len = n, .upstream_len = n};
    assert_true(run_until(&f->loop, wanted, &w, WAIT_MS));
    assert_memory_equal(f->upstream.in, a, n);
    assert_memory_equal(f->client.in, b, n);
    fx_free(f);
    free(a);
    free(b);
}

/* A failed start leaves the descriptors to the caller and calls nothing back. */
static void test_start_failure(void **state)
{
    (void)state;
    struct fx *f = fx_new(MODE_SPLICE, 4, 16);
    int a, b;
    tcp_pair(&a, &b);
    assert_int_equal(sl_tunnel_start(&f->t, &f->loop, &f->pipes, a, -1, 0, on_tunnel_done, f),
                     -EBADF);
    run_until(&f->loop, NULL, NULL, 2);
    assert_int_equal(f->done_count, 0);
    assert_true(fcntl(a, F_GETFD) >= 0); /* still open, still ours */
    close(a);
    close(b);
    fx_free(f);
}

static void test_pool_bounds(void **state)
{
    (void)state;
    struct sl_bpool bufs;
    struct sl_tunnel_pipes p;
    sl_bpool_init(&bufs, BLOCK_BYTES, 1);
    assert_int_equal(sl_tunnel_pipes_init(&p, &bufs, PIPE_BYTES, 2, 1), -EINVAL);
    assert_int_equal(sl_tunnel_pipes_init(&p, NULL, PIPE_BYTES, 1, 1), -EINVAL);
    assert_int_equal(sl_tunnel_pipes_init(&p, &bufs, PIPE_BYTES, 1, 2), 0);
    sl_tunnel_pipes_dispose(&p);
    sl_bpool_dispose(&bufs);
    assert_string_equal(sl_tunnel_reason_name(SL_TUNNEL_IDLE_TIMEOUT), "idle_timeout");
    assert_string_equal(sl_tunnel_reason_name(SL_TUNNEL_ABORTED), "aborted");
}

/* ---- TLS on the client side ----------------------------------------------------------------- */

static char tls_dir[64];
static struct sl_tls_ctx *tls_server_ctx;
static struct sl_tls_client_ctx *tls_client_ctx;

static int sh(const char *cmd)
{
    int rc = system(cmd);
    if (rc != 0)
        fprintf(stderr, "fixture command failed (%d): %s\n", rc, cmd);
    return rc;
}

/* A CA and a leaf for tunnel.test (ECDSA P-256), made with the openssl CLI as test_tls.c does. */
static int tls_setup(void **state)
{
    (void)state;
    snprintf(tls_dir, sizeof tls_dir, "/tmp/sluice_tunnel_XXXXXX");
    if (!mkdtemp(tls_dir))
        return -1;
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "cd '%s' && printf '[req]\\ndistinguished_name = dn\\n[dn]\\n' > req.cnf && "
             "openssl req -config req.cnf -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
             "-noenc -keyout ca.key -out ca.pem -days 3650 -subj '/CN=Tunnel Test CA' "
             "-addext basicConstraints=critical,CA:TRUE "
             "-addext keyUsage=critical,keyCertSign,cRLSign >/dev/null 2>&1 && "
             "openssl req -config req.cnf -x509 -CA ca.pem -CAkey ca.key -newkey ec "
             "-pkeyopt ec_paramgen_curve:P-256 -noenc -keyout leaf.key -out leaf.pem -days 3650 "
             "-subj '/CN=tunnel.test' -addext subjectAltName=DNS:tunnel.test "
             "-addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth "
             ">/dev/null 2>&1",
             tls_dir);
    if (sh(cmd) != 0)
        return -1;
    char cert[160], key[160], ca[160], err[512] = "";
    snprintf(cert, sizeof cert, "%s/leaf.pem", tls_dir);
    snprintf(key, sizeof key, "%s/leaf.key", tls_dir);
    snprintf(ca, sizeof ca, "%s/ca.pem", tls_dir);
    struct sl_tls_cert_desc cd = {.cert_file = cert, .key_file = key};
    struct sl_tls_server_desc sd = {.certs = &cd, .cert_count = 1};
    tls_server_ctx = sl_tls_ctx_new(&sd, err, sizeof err);
    struct sl_tls_client_desc cdesc = {.ca_file = ca};
    tls_client_ctx = sl_tls_client_ctx_new(&cdesc, err, sizeof err);
    if (!tls_server_ctx || !tls_client_ctx) {
        fprintf(stderr, "TLS contexts: %s\n", err);
        return -1;
    }
    return 0;
}

static int tls_teardown(void **state)
{
    (void)state;
    sl_tls_ctx_free(tls_server_ctx);
    sl_tls_client_ctx_free(tls_client_ctx);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tls_dir);
    return sh(cmd) == 0 ? 0 : -1;
}

/* The test's TLS client: like struct peer, through the TLS transport. */
struct tpeer {
    struct sl_loop *loop;
    struct sl_io io;
    struct sl_tls_transport tls;
    const unsigned char *out;
    size_t out_len, out_off;
    bool shut_after, shut_done;
    unsigned char *in;
    size_t in_cap, in_len;
    bool eof;
    int err;
};

static void tpeer_pump(struct tpeer *p)
{
    if (p->err)
        return;
    while (!p->eof) {
        unsigned char scratch[4096];
        unsigned char *dst = p->in_len < p->in_cap ? p->in + p->in_len : scratch;
        size_t room = p->in_len < p->in_cap ? p->in_cap - p->in_len : sizeof scratch;
        size_t n = 0;
        int rc = sl_transport_read(&p->tls.base, dst, room, &n);
        if (rc == -EAGAIN)
            break;
        if (rc < 0) {
            p->err = -rc;
            return;
        }
        if (n == 0) {
            p->eof = true;
            break;
        }
        assert_true(p->in_len + n <= p->in_cap);
        p->in_len += n;
    }
    while (p->out_off < p->out_len) {
        /* From the first unsent byte, never fewer than last time (the TLS retry rule). */
        size_t len = p->out_len - p->out_off;
        struct iovec iov = {.iov_base = (void *)(p->out + p->out_off), .iov_len = len};
        size_t n = 0;
        int rc = sl_transport_writev(&p->tls.base, &iov, 1, &n);
        p->out_off += n;
        if (rc == -EAGAIN || (rc == 0 && n < len))
            break;
        if (rc < 0) {
            p->err = -rc;
            return;
        }
    }
    if (p->out_off == p->out_len && p->shut_after && !p->shut_done) {
        int rc = p->tls.base.ops->shutdown(&p->tls.base);
        if (rc == 0)
            p->shut_done = true;
        else if (rc != -EAGAIN)
            p->err = -rc;
    }
}

static void on_tpeer_io(struct sl_io *io, uint32_t events)
{
    (void)events;
    tpeer_pump(io->data);
}

static void tpeer_send(struct tpeer *p, const unsigned char *data, size_t len, bool shut)
{
    p->out = data;
    p->out_len = len;
    p->out_off = 0;
    p->shut_after = shut;
    tpeer_pump(p);
}

static void tpeer_dispose(struct tpeer *p)
{
    sl_io_stop(p->loop, &p->io);
    sl_transport_close(&p->tls.base);
    free(p->in);
    p->in = NULL;
}

/* Steps both handshakes until done (bounded), waiting with poll for what each wants. */
static void tls_handshake_both(struct sl_tls_transport *a, struct sl_tls_transport *b)
{
    uint64_t deadline = sl_clock_now_ms() + WAIT_MS;
    enum sl_status sa = SL_AGAIN, sb = SL_AGAIN;
    while ((sa == SL_AGAIN || sb == SL_AGAIN) && sl_clock_now_ms() < deadline) {
        if (sa == SL_AGAIN)
            sa = sl_tls_handshake(a);
        if (sb == SL_AGAIN)
            sb = sl_tls_handshake(b);
        struct pollfd pf[2] = {{.fd = a->base.fd, .events = (short)sl_tls_want(a)},
                               {.fd = b->base.fd, .events = (short)sl_tls_want(b)}};
        if (sa == SL_AGAIN || sb == SL_AGAIN)
            (void)poll(pf, 2, 10);
    }
    assert_int_equal(sa, SL_OK);
    assert_int_equal(sb, SL_OK);
}

struct tfx {
    struct fx *f;
    struct tpeer client;
};

/* A TLS client peer, a TLS server transport as the tunnel's client side (handshake done, as
 * the accept path hands it over), a plain upstream; small socket buffers on the TLS socket so
 * that both directions meet -EAGAIN often. */
static void tfx_connect(struct tfx *x, size_t in_cap, uint64_t idle_ms)
{
    struct fx *f = x->f;
    int cli, tcli, tup, up;
    tcp_pair(&cli, &tcli);
    tcp_pair(&tup, &up);
    int small = 16384;
    assert_int_equal(setsockopt(tcli, SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
    assert_int_equal(setsockopt(tcli, SOL_SOCKET, SO_RCVBUF, &small, sizeof small), 0);
    memset(&x->client, 0, sizeof x->client);
    x->client.loop = &f->loop;
    x->client.in_cap = in_cap;
    x->client.in = malloc(in_cap ? in_cap : 1);
    assert_non_null(x->client.in);
    assert_int_equal(sl_tls_transport_init_server(&f->tsrv, tcli, tls_server_ctx), 0);
    assert_int_equal(
        sl_tls_transport_init_client(&x->client.tls, cli, tls_client_ctx, "tunnel.test", NULL), 0);
    tls_handshake_both(&f->tsrv, &x->client.tls);
    assert_int_equal(sl_io_start(&f->loop, &x->client.io, cli,
                                 EPOLLIN | EPOLLOUT | EPOLLRDHUP | SL_IO_EDGE, on_tpeer_io,
                                 &x->client),
                     0);
    memset(&f->client, 0, sizeof f->client);
    f->client.fd = -1;
    f->client.loop = &f->loop;
    peer_start(&f->upstream, &f->loop, up, in_cap);
    sl_tcp_transport_init(&f->tr[1], tup);
    f->done_count = 0;
    assert_int_equal(sl_tunnel_start_transports(&f->t, &f->loop, &f->pipes, &f->tsrv.base,
                                                &f->tr[1], 0, idle_ms, on_tunnel_done, f),
                     0);
    assert_false(sl_tunnel_can_splice(&f->t, SL_TUNNEL_UP)); /* TLS is copied */
    f->started = true;
}

static void tfx_free(struct tfx *x)
{
    tpeer_dispose(&x->client);
    fx_free(x->f);
}

struct twant {
    struct tfx *x;
    size_t client_len, upstream_len;
    bool client_eof, upstream_eof, done;
};

static bool twanted(void *arg)
{
    struct twant *w = arg;
    struct fx *f = w->x->f;
    struct tpeer *c = &w->x->client;
    tpeer_pump(c); /* decrypted bytes may wait inside OpenSSL with no new edge */
    return c->in_len >= w->client_len && f->upstream.in_len >= w->upstream_len &&
           (!w->client_eof || c->eof) && (!w->upstream_eof || f->upstream.eof) &&
           (!w->done || f->done_count > 0);
}

/* Bytes both ways through TLS at once, exact; the client's close_notify reaches the upstream
 * as a FIN, the upstream's FIN reaches the client as close_notify (a clean TLS EOF). */
static void test_tls_both_ways(void **state)
{
    (void)state;
    const size_t n = 4u << 20;
    struct tfx x = {.f = fx_new(MODE_COPY, 4, 16)};
    unsigned char *a = random_bytes(n, 21), *b = random_bytes(n, 22);
    tfx_connect(&x, n, 0);
    tpeer_send(&x.client, a, n, true);
    peer_send(&x.f->upstream, b, n, true);
    struct twant w = {&x, n, n, true, true, true};
    assert_true(run_until(&x.f->loop, twanted, &w, WAIT_MS));
    assert_int_equal(x.f->reason, SL_TUNNEL_CLOSED);
    assert_int_equal(x.client.err, 0);
    assert_int_equal(x.f->upstream.err, 0);
    assert_memory_equal(x.f->upstream.in, a, n);
    assert_memory_equal(x.client.in, b, n);
    assert_int_equal(sl_tunnel_bytes(&x.f->t, SL_TUNNEL_UP), n);
    assert_int_equal(sl_tunnel_bytes(&x.f->t, SL_TUNNEL_DOWN), n);
    tfx_free(&x);
    free(a);
    free(b);
}

/* The TLS client half-closes (close_notify) first: the upstream receives every byte and a FIN, and
 * its answer still reaches the client. */
static void test_tls_half_close_client_first(void **state)
{
    (void)state;
    const size_t n = 300000, m = 700000;
    struct tfx x = {.f = fx_new(MODE_COPY, 4, 16)};
    unsigned char *a = random_bytes(n, 23), *b = random_bytes(m, 24);
    tfx_connect(&x, m, 0);
    tpeer_send(&x.client, a, n, true);
    struct twant w1 = {.x = &x, .upstream_len = n, .upstream_eof = true};
    assert_true(run_until(&x.f->loop, twanted, &w1, WAIT_MS));
    assert_memory_equal(x.f->upstream.in, a, n);
    assert_int_equal(x.f->done_count, 0);
    peer_send(&x.f->upstream, b, m, true);
    struct twant w2 = {.x = &x, .client_len = m, .client_eof = true, .done = true};
    assert_true(run_until(&x.f->loop, twanted, &w2, WAIT_MS));
    assert_memory_equal(x.client.in, b, m);
    assert_int_equal(x.f->reason, SL_TUNNEL_CLOSED);
    tfx_free(&x);
    free(a);
    free(b);
}

/* The upstream finishes first: the client receives its bytes and a close_notify, then still sends
 * (TLS allows writing after the peer's close_notify) and the upstream receives it all. */
static void test_tls_half_close_upstream_first(void **state)
{
    (void)state;
    const size_t n = 700000, m = 300000;
    struct tfx x = {.f = fx_new(MODE_COPY, 4, 16)};
    unsigned char *a = random_bytes(n, 25), *b = random_bytes(m, 26);
    tfx_connect(&x, n, 0);
    peer_send(&x.f->upstream, a, n, true);
    struct twant w1 = {.x = &x, .client_len = n, .client_eof = true};
    assert_true(run_until(&x.f->loop, twanted, &w1, WAIT_MS));
    assert_memory_equal(x.client.in, a, n);
    assert_int_equal(x.f->done_count, 0);
    tpeer_send(&x.client, b, m, true);
    struct twant w2 = {.x = &x, .upstream_len = m, .upstream_eof = true, .done = true};
    assert_true(run_until(&x.f->loop, twanted, &w2, WAIT_MS));
    assert_memory_equal(x.f->upstream.in, b, m);
    assert_int_equal(x.f->reason, SL_TUNNEL_CLOSED);
    tfx_free(&x);
    free(a);
    free(b);
}

/* A TLS client that stops reading: the tunnel holds at most one block for it and stops
 * reading from the upstream; when the client reads again everything arrives exactly. */
static void test_tls_backpressure(void **state)
{
    (void)state;
    const size_t n = 8u << 20;
    struct tfx x = {.f = fx_new(MODE_COPY, 4, 16)};
    unsigned char *b = random_bytes(n, 27);
    tfx_connect(&x, n, 0);
    sl_io_modify(&x.f->loop, &x.client.io, 0); /* the client does not read for now */
    peer_send(&x.f->upstream, b, n, true);
    run_until(&x.f->loop, NULL, NULL, 200);
    assert_true(sl_tunnel_held_bytes(&x.f->t, SL_TUNNEL_DOWN) <= BLOCK_BYTES);
    assert_true(x.f->upstream.out_off < n); /* held back in the upstream, not buffered */
    assert_int_equal(x.client.in_len, 0);
    sl_io_modify(&x.f->loop, &x.client.io, EPOLLIN | EPOLLOUT | EPOLLRDHUP);
    tpeer_send(&x.client, NULL, 0, true);
    struct twant w = {&x, n, 0, true, true, true};
    assert_true(run_until(&x.f->loop, twanted, &w, WAIT_MS));
    assert_memory_equal(x.client.in, b, n);
    assert_int_equal(x.f->reason, SL_TUNNEL_CLOSED);
    tfx_free(&x);
    free(b);
}

#define BOTH(fn)                                                                                   \
    cmocka_unit_test_prestate(fn, (void *)&MODE_SPLICE),                                           \
        cmocka_unit_test_prestate(fn, (void *)&MODE_COPY)

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* as main.c does: splice has no MSG_NOSIGNAL */
    const struct CMUnitTest tests[] = {
        BOTH(test_both_ways),
        BOTH(test_half_close_client_first),
        BOTH(test_half_close_upstream_first),
        BOTH(test_client_reset),
        BOTH(test_upstream_reset),
        BOTH(test_idle_timeout),
        BOTH(test_idle_timeout_stalled),
        BOTH(test_backpressure),
        BOTH(test_abort_in_flight),
        BOTH(test_bytes_before_start),
        cmocka_unit_test(test_pipe_reuse),
        cmocka_unit_test(test_pipe_grows_for_bulk),
        cmocka_unit_test(test_pipe_bound),
        cmocka_unit_test(test_no_pipes_copies),
        cmocka_unit_test(test_start_failure),
        cmocka_unit_test(test_pool_bounds),
    };
    const struct CMUnitTest tls_tests[] = {
        cmocka_unit_test(test_tls_both_ways),
        cmocka_unit_test(test_tls_half_close_client_first),
        cmocka_unit_test(test_tls_half_close_upstream_first),
        cmocka_unit_test(test_tls_backpressure),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    return failed + cmocka_run_group_tests_name("tls", tls_tests, tls_setup, tls_teardown);
}
