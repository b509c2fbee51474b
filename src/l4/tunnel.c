#include "l4/tunnel.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "core/bpool.h"

#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)

/* Bytes one direction moves per wake-up before the rest of the loop has its turn: a fast
 * pair of peers could otherwise keep one callback busy for as long as they keep sending. */
#define TURN_BUDGET_BYTES (512u * 1024u)

#define EV_READABLE (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)
#define EV_WRITABLE (EPOLLOUT | EPOLLHUP | EPOLLERR)

const char *sl_tunnel_reason_name(enum sl_tunnel_reason r)
{
    switch (r) {
    case SL_TUNNEL_CLOSED:
        return "closed";
    case SL_TUNNEL_IDLE_TIMEOUT:
        return "idle_timeout";
    case SL_TUNNEL_CLIENT_ERROR:
        return "client_error";
    case SL_TUNNEL_UPSTREAM_ERROR:
        return "upstream_error";
    case SL_TUNNEL_LOCAL_ERROR:
        return "local_error";
    case SL_TUNNEL_ABORTED:
        return "aborted";
    }
    return "unknown";
}

/* ---- the pipe pool ---- */

int sl_tunnel_pipes_init(struct sl_tunnel_pipes *p, struct sl_bpool *bufs, uint32_t pipe_bytes,
                         uint32_t max_free, uint32_t max_live)
{
    memset(p, 0, sizeof *p);
    if (!bufs || max_free > max_live || pipe_bytes > (1u << 30))
        return -EINVAL;
    p->free = calloc(max_free ? max_free : 1, sizeof *p->free);
    if (!p->free)
        return -ENOMEM;
    p->bufs = bufs;
    p->max_free = max_free;
    p->max_live = max_live;
    p->pipe_bytes = pipe_bytes;
    return 0;
}

static void pipe_close(struct sl_tunnel_pipe *pp)
{
    close(pp->rd);
    close(pp->wr);
    pp->rd = pp->wr = -1;
}

void sl_tunnel_pipes_dispose(struct sl_tunnel_pipes *p)
{
    for (uint32_t i = 0; i < p->free_count; i++) {
        pipe_close(&p->free[i]);
        p->live--;
    }
    p->free_count = 0;
    p->max_free = 0; /* a tunnel still ending later closes its pipes instead of caching them */
    free(p->free);
    p->free = NULL;
}

/* Takes a cached pipe or opens one. Returns 0, -ENOBUFS at the bound, or pipe2's -errno. */
static int pipes_get(struct sl_tunnel_pipes *p, struct sl_tunnel_pipe *out)
{
    if (p->free_count) {
        *out = p->free[--p->free_count];
        p->reused++;
        return 0;
    }
    if (p->live >= p->max_live) {
        p->denied++;
        return -ENOBUFS;
    }
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) {
        p->denied++;
        return -errno;
    }
    /* Refused past the per-user pipe limits (pipe-user-pages-soft): the pipe then keeps the
     * size the kernel gave it, which is read back either way. */
    if (p->pipe_bytes)
        (void)fcntl(fds[1], F_SETPIPE_SZ, (int)p->pipe_bytes);
    int cap = fcntl(fds[1], F_GETPIPE_SZ);
    if (cap <= 0) {
        close(fds[0]);
        close(fds[1]);
        p->denied++;
        return -EINVAL;
    }
    out->rd = fds[0];
    out->wr = fds[1];
    out->cap_bytes = (uint32_t)cap;
    p->live++;
    p->created++;
    return 0;
}

/* Gives a pipe back; one with bytes inside (an aborted flow) is closed, since nothing could
 * tell its next user where the stale bytes end. */
static void pipes_put(struct sl_tunnel_pipes *p, struct sl_tunnel_pipe *pp, bool dirty)
{
    if (pp->rd < 0)
        return;
    if (!dirty && p->free_count < p->max_free) {
        p->free[p->free_count++] = *pp;
        pp->rd = pp->wr = -1;
        return;
    }
    if (dirty)
        p->discarded++;
    pipe_close(pp);
    p->live--;
}

/* ---- flows ---- */

static size_t flow_held(const struct sl_tunnel_flow *f)
{
    return f->in_pipe + sl_buf_len(&f->buf);
}

static bool flow_has_room(const struct sl_tunnel_flow *f)
{
    if (f->in_pipe)
        return !f->pipe_full && f->in_pipe < f->pipe.cap_bytes;
    if (f->buf.data)
        return sl_buf_space(&f->buf) > 0 || f->buf.start > 0;
    return true;
}

static bool side_is_tcp(const struct sl_tunnel_side *s)
{
    return s->tr->ops == &sl_tcp_transport_ops;
}

/* The readiness bits that satisfy a transport's wish (EPOLLIN and/or EPOLLOUT). */
static uint32_t ready_bits(uint32_t want)
{
    uint32_t b = 0;
    if (want & EPOLLIN)
        b |= EV_READABLE;
    if (want & EPOLLOUT)
        b |= EV_WRITABLE;
    return b;
}

/* Whether the flow's source may give bytes now. A read waits for what the transport said it
 * wants: TLS may need the socket writable to read (a record of its own to send first). */
static bool flow_src_ready(const struct sl_tunnel_flow *f)
{
    /* A TLS transport may hold decrypted bytes that no edge will announce. */
    return (f->src->io.ready & ready_bits(f->rd_want)) || sl_transport_pending(f->src->tr) > 0;
}

/* Whether the flow's destination may take bytes (or the EOF) now; TLS may need it readable. */
static bool flow_dst_ready(const struct sl_tunnel_flow *f)
{
    return (f->dst->io.ready & ready_bits(f->wr_want)) != 0;
}

/* The transport would block: remember what it waits for and forget that readiness, so the
 * next edge of it is awaited. `dflt` is the call's own direction. */
static uint32_t side_would_block(struct sl_tunnel_side *s, uint32_t dflt)
{
    uint32_t want = sl_transport_want(s->tr, dflt) & (EPOLLIN | EPOLLOUT);
    if (!want)
        want = dflt;
    sl_io_clear_ready(&s->io, want);
    return want;
}

/* Returns what an idle flow holds to the pools (an idle tunnel holds no pipe, no block). */
static void flow_release(struct sl_tunnel *t, struct sl_tunnel_flow *f)
{
    pipes_put(t->pool, &f->pipe, f->in_pipe != 0);
    f->in_pipe = 0;
    f->pipe_full = false;
    sl_buf_release(&f->buf, t->pool->bufs);
}

/*
 * A flow that fills its pipe is a bulk transfer: a larger pipe moves more per splice pair,
 * which is most of the CPU per byte (64 KiB to 1 MiB measured about 0.43 to 0.31 CPU-s/GB in
 * bench/edge_peers.py). Interactive flows never fill theirs and keep the small default. Past
 * the per-user pipe limits the kernel refuses (EPERM) and the pipe keeps its size.
 */
static void pipe_grow(struct sl_tunnel_pipes *p, struct sl_tunnel_pipe *pp)
{
    if (fcntl(pp->wr, F_SETPIPE_SZ, (int)p->grow_bytes) < 0)
        return;
    int cap = fcntl(pp->wr, F_GETPIPE_SZ);
    if (cap > 0 && (uint32_t)cap > pp->cap_bytes) {
        pp->cap_bytes = (uint32_t)cap;
        p->grown++;
    }
}

/* Splices from the source socket into the pipe. Same results as read_in. */
static ssize_t splice_in(struct sl_tunnel *t, struct sl_tunnel_flow *f)
{
    for (;;) {
        ssize_t n = splice(f->src->tr->fd, NULL, f->pipe.wr, NULL, f->pipe.cap_bytes - f->in_pipe,
                           SPLICE_FLAGS);
        if (n >= 0) {
            f->in_pipe += (uint32_t)n;
            if (f->in_pipe == f->pipe.cap_bytes && f->pipe.cap_bytes < t->pool->grow_bytes)
                pipe_grow(t->pool, &f->pipe);
            return n;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN)
            return -errno;
        /* With bytes in the pipe, EAGAIN may mean the pipe is out of slots (a slot holds one
         * socket fragment, often less than a page), not that the socket is empty: keep the
         * readiness and wait for a drain. With an empty pipe it can only be the socket. */
        if (f->in_pipe) {
            f->pipe_full = true;
        } else {
            sl_io_clear_ready(&f->src->io, EPOLLIN);
            flow_release(t, f);
        }
        return -EAGAIN;
    }
}

/* Reads from the source transport into the block. Same results as read_in. */
static ssize_t copy_in(struct sl_tunnel *t, struct sl_tunnel_flow *f)
{
    if (sl_buf_acquire(&f->buf, t->pool->bufs) < 0)
        return -ENOMEM;
    if (sl_buf_space(&f->buf) == 0)
        sl_buf_compact(&f->buf);
    size_t space = sl_buf_space(&f->buf), n = 0;
    int rc = sl_transport_read(f->src->tr, f->buf.data + f->buf.end, space, &n);
    if (rc == -EAGAIN) {
        f->rd_want = side_would_block(f->src, EPOLLIN);
        if (sl_buf_len(&f->buf) == 0)
            flow_release(t, f);
        return -EAGAIN;
    }
    if (rc < 0)
        return rc;
    /* A short read means the transport would block now (core/transport.h), unless it still
     * holds bytes or an EOF (pending): then the next bytes raise a new edge, of the readiness
     * the transport asked for. */
    if (n > 0 && n < space && sl_transport_pending(f->src->tr) == 0)
        f->rd_want = side_would_block(f->src, EPOLLIN);
    else
        f->rd_want = EPOLLIN;
    f->buf.end += (uint32_t)n;
    return (ssize_t)n;
}

/* Reads more from the source. Returns bytes read, 0 at EOF, -EAGAIN (readiness and pools are
 * updated), -ENOMEM (no block), or the source's -errno. */
static ssize_t read_in(struct sl_tunnel *t, struct sl_tunnel_flow *f)
{
    if (f->can_splice && !f->buf.data) {
        if (f->pipe.rd >= 0 || pipes_get(t->pool, &f->pipe) == 0) {
            ssize_t n = splice_in(t, f);
            if (n != -EINVAL || f->in_pipe)
                return n;
            /* This socket cannot be spliced from: copy from now on. */
            f->can_splice = false;
            flow_release(t, f);
        }
        /* No pipe to be had (pool bound, descriptors): this burst goes through a block. */
    }
    return copy_in(t, f);
}

/* Writes held bytes to the destination. Returns bytes written, -EAGAIN (readiness updated) or
 * the destination's -errno. */
static ssize_t write_out(struct sl_tunnel_flow *f)
{
    if (f->in_pipe) {
        ssize_t n;
        do
            n = splice(f->pipe.rd, NULL, f->dst->tr->fd, NULL, f->in_pipe, SPLICE_FLAGS);
        while (n < 0 && errno == EINTR);
        if (n < 0) {
            /* Any other failure here is the destination's: splicing into it worked before
             * (or the bytes could not be in the pipe) only if it is a TCP socket. */
            if (errno == EAGAIN)
                sl_io_clear_ready(&f->dst->io, EPOLLOUT);
            return -errno;
        }
        f->in_pipe -= (uint32_t)n;
        f->pipe_full = false;
        return n;
    }
    struct iovec iov = {.iov_base = sl_buf_head(&f->buf), .iov_len = sl_buf_len(&f->buf)};
    size_t n = 0;
    /* After -EAGAIN the same bytes are offered again first (the block keeps them), which a
     * TLS transport requires: it has encrypted a record of them already. */
    int rc = sl_transport_writev(f->dst->tr, &iov, 1, &n);
    if (rc < 0) {
        if (rc == -EAGAIN)
            f->wr_want = side_would_block(f->dst, EPOLLOUT);
        return rc;
    }
    f->wr_want = EPOLLOUT;
    sl_buf_consume(&f->buf, n);
    return (ssize_t)n;
}

/* ---- ending ---- */

static void tunnel_finish(struct sl_tunnel *t, enum sl_tunnel_reason reason, int err)
{
    if (t->finished)
        return;
    t->finished = true;
    t->reason = reason;
    t->err = err;
    sl_timer_cancel(t->loop, &t->idle);
    sl_timer_cancel(t->loop, &t->resume);
    sl_defer_cancel(t->loop, &t->kick);
    for (int d = 0; d < 2; d++)
        flow_release(t, &t->flow[d]);
    for (int i = 0; i < 2; i++) {
        struct sl_tunnel_side *s = &t->side[i];
        sl_io_stop(t->loop, &s->io);
        if (s->reset) {
            struct linger lg = {.l_onoff = 1, .l_linger = 0};
            (void)setsockopt(s->tr->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
        sl_transport_close(s->tr);
    }
    /* on_done runs after this turn's callbacks, so the caller may free the tunnel in it while
     * no event of this turn can still point at it. */
    sl_defer_queue(t->loop, &t->done);
}

/* A side failed: both are reset, since a FIN would tell the other peer the stream ended
 * cleanly when it was cut. */
static void tunnel_fail(struct sl_tunnel *t, struct sl_tunnel_side *s, int err)
{
    t->side[0].reset = t->side[1].reset = true;
    tunnel_finish(t, s == &t->side[0] ? SL_TUNNEL_CLIENT_ERROR : SL_TUNNEL_UPSTREAM_ERROR, err);
}

/* ---- pumping ---- */

/* Moves the bytes of one direction until both ends would block, the source ended or the
 * budget ran out. Returns true when it stopped on the budget (more may be ready). */
static bool flow_pump(struct sl_tunnel *t, struct sl_tunnel_flow *f)
{
    size_t moved = 0;
    bool active = false, more = false;
    while (!f->shut) {
        bool progress = false;
        if (flow_held(f) && flow_dst_ready(f)) {
            ssize_t n = write_out(f);
            if (n > 0) {
                f->bytes += (uint64_t)n;
                moved += (size_t)n;
                progress = true;
            } else if (n < 0 && n != -EAGAIN) {
                tunnel_fail(t, f->dst, (int)n);
                return false;
            }
        }
        if (!f->eof && flow_has_room(f) && flow_src_ready(f)) {
            ssize_t n = read_in(t, f);
            if (n >= 0) {
                f->eof = n == 0;
                progress = true;
            } else if (n == -ENOMEM) {
                t->side[0].reset = t->side[1].reset = true; /* cut: see tunnel_fail */
                tunnel_finish(t, SL_TUNNEL_LOCAL_ERROR, (int)n);
                return false;
            } else if (n != -EAGAIN) {
                tunnel_fail(t, f->src, (int)n);
                return false;
            }
        }
        if (f->eof && flow_held(f) == 0 && (!f->shutting || flow_dst_ready(f))) {
            /* Every byte before the EOF went out: pass the EOF on, through the transport (a
             * TLS destination sends close_notify before its FIN, and may have to wait for the
             * socket to take it). */
            flow_release(t, f);
            int rc = f->dst->tr->ops->shutdown(f->dst->tr);
            if (rc == -EAGAIN) {
                f->shutting = true;
                f->wr_want = side_would_block(f->dst, EPOLLOUT);
                break;
            }
            if (rc < 0) {
                tunnel_fail(t, f->dst, rc);
                return false;
            }
            f->shutting = false;
            f->shut = true;
            active = true;
            break;
        }
        if (!progress)
            break;
        active = true;
        if (moved >= TURN_BUDGET_BYTES) {
            more = true;
            break;
        }
    }
    if (active)
        t->last_active_ms = sl_loop_now_ms(t->loop);
    return more;
}

/* Interest follows what each flow can take: read from a source only while its flow has room
 * (backpressure), wait for a destination to be writable only while bytes are held for it. */
static void tunnel_update_interest(struct sl_tunnel *t)
{
    uint32_t ev[2] = {0, 0};
    for (int d = 0; d < 2; d++) {
        const struct sl_tunnel_flow *f = &t->flow[d];
        if (!f->eof && flow_has_room(f))
            ev[d] |= f->rd_want & EPOLLIN ? f->rd_want | EPOLLRDHUP : f->rd_want;
        if (flow_held(f) || (f->shutting && !f->shut))
            ev[1 - d] |= f->wr_want;
    }
    for (int i = 0; i < 2; i++)
        (void)sl_io_modify(t->loop, &t->side[i].io, ev[i]);
}

static void tunnel_run(struct sl_tunnel *t)
{
    bool more = false;
    for (int d = 0; d < 2 && !t->finished; d++)
        if (flow_pump(t, &t->flow[d]))
            more = true;
    if (t->finished)
        return;
    if (t->flow[0].shut && t->flow[1].shut) {
        tunnel_finish(t, SL_TUNNEL_CLOSED, 0);
        return;
    }
    tunnel_update_interest(t);
    if (more)
        sl_defer_queue(t->loop, &t->kick);
}

static void on_side_io(struct sl_io *io, uint32_t events)
{
    struct sl_tunnel *t = io->data;
    if (t->finished)
        return;
    if (events & EPOLLERR) {
        /* An error (a reset, mostly) may hit a side no flow is about to touch (its reading
         * ended and nothing is held for it): take it from the socket. */
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(io->fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err) {
            tunnel_fail(t, io == &t->side[0].io ? &t->side[0] : &t->side[1], -err);
            return;
        }
    }
    tunnel_run(t);
}

/*
 * Continuing after a budget ran out takes two hops: the deferred pass arms a zero-delay timer,
 * which fires in the next turn after that turn's I/O was dispatched. Re-queueing a defer would
 * run again in the same pass, and re-arming a timer from its own callback in the same
 * timer run; either would starve the other connections.
 */
static void on_kick(struct sl_defer *d)
{
    struct sl_tunnel *t = d->data;
    if (!t->finished)
        sl_timer_arm(t->loop, &t->resume, 0);
}

static void on_resume(struct sl_timer *tm)
{
    struct sl_tunnel *t = tm->data;
    if (!t->finished)
        tunnel_run(t);
}

static void on_idle_timer(struct sl_timer *tm)
{
    struct sl_tunnel *t = tm->data;
    uint64_t quiet = sl_loop_now_ms(t->loop) - t->last_active_ms;
    /* Activity only stamps a time; the timer is pushed back lazily, here, rather than
     * re-armed per chunk. */
    if (quiet >= t->idle_timeout_ms) {
        /* Bytes still held (a peer stopped reading) are lost: say so with a reset. */
        if (flow_held(&t->flow[0]) || flow_held(&t->flow[1]))
            t->side[0].reset = t->side[1].reset = true;
        tunnel_finish(t, SL_TUNNEL_IDLE_TIMEOUT, 0);
    } else
        sl_timer_arm(t->loop, &t->idle, t->idle_timeout_ms - quiet);
}

static void on_done(struct sl_defer *d)
{
    struct sl_tunnel *t = d->data;
    t->cb(t, t->reason, t->data); /* may free t */
}

/* ---- starting ---- */

/* Starts a zeroed tunnel whose sides' transports are set. */
static int tunnel_begin(struct sl_tunnel *t, struct sl_loop *loop, struct sl_tunnel_pipes *pool,
                        unsigned flags, uint64_t idle_timeout_ms, sl_tunnel_done_cb cb, void *data)
{
    t->loop = loop;
    t->pool = pool;
    t->cb = cb;
    t->data = data;
    t->idle_timeout_ms = idle_timeout_ms;
    bool splice_ok = !(flags & SL_TUNNEL_NO_SPLICE) && pool->max_live > 0 &&
                     side_is_tcp(&t->side[0]) && side_is_tcp(&t->side[1]);
    for (int d = 0; d < 2; d++) {
        struct sl_tunnel_flow *f = &t->flow[d];
        f->src = &t->side[d];
        f->dst = &t->side[1 - d];
        f->pipe.rd = f->pipe.wr = -1;
        f->can_splice = splice_ok;
        f->rd_want = EPOLLIN;
        f->wr_want = EPOLLOUT;
    }
    sl_timer_init(&t->idle, on_idle_timer, t);
    sl_timer_init(&t->resume, on_resume, t);
    sl_defer_init(&t->kick, on_kick, t);
    sl_defer_init(&t->done, on_done, t);
    /* Registration reports the sockets' current readiness as a first edge, so bytes that
     * arrived before the tunnel started are picked up by the first turn. */
    int rc = sl_io_start(loop, &t->side[0].io, t->side[0].tr->fd, EPOLLIN | EPOLLRDHUP | SL_IO_EDGE,
                         on_side_io, t);
    if (rc < 0)
        return rc;
    rc = sl_io_start(loop, &t->side[1].io, t->side[1].tr->fd, EPOLLIN | EPOLLRDHUP | SL_IO_EDGE,
                     on_side_io, t);
    if (rc < 0) {
        sl_io_stop(loop, &t->side[0].io);
        return rc;
    }
    t->last_active_ms = sl_loop_now_ms(loop);
    if (idle_timeout_ms)
        sl_timer_arm(loop, &t->idle, idle_timeout_ms);
    return 0;
}

int sl_tunnel_start(struct sl_tunnel *t, struct sl_loop *loop, struct sl_tunnel_pipes *pool,
                    int client_fd, int upstream_fd, uint64_t idle_timeout_ms, sl_tunnel_done_cb cb,
                    void *data)
{
    memset(t, 0, sizeof *t);
    sl_tcp_transport_init(&t->side[0].tcp, client_fd);
    sl_tcp_transport_init(&t->side[1].tcp, upstream_fd);
    t->side[0].tr = &t->side[0].tcp;
    t->side[1].tr = &t->side[1].tcp;
    return tunnel_begin(t, loop, pool, 0, idle_timeout_ms, cb, data);
}

int sl_tunnel_start_transports(struct sl_tunnel *t, struct sl_loop *loop,
                               struct sl_tunnel_pipes *pool, struct sl_transport *client,
                               struct sl_transport *upstream, unsigned flags,
                               uint64_t idle_timeout_ms, sl_tunnel_done_cb cb, void *data)
{
    memset(t, 0, sizeof *t);
    t->side[0].tr = client;
    t->side[1].tr = upstream;
    return tunnel_begin(t, loop, pool, flags, idle_timeout_ms, cb, data);
}

void sl_tunnel_abort(struct sl_tunnel *t)
{
    if (t->finished)
        return;
    t->side[0].reset = t->side[1].reset = true;
    tunnel_finish(t, SL_TUNNEL_ABORTED, 0);
}

/* ---- getters ---- */

uint64_t sl_tunnel_bytes(const struct sl_tunnel *t, enum sl_tunnel_dir d)
{
    return t->flow[d].bytes;
}

size_t sl_tunnel_held_bytes(const struct sl_tunnel *t, enum sl_tunnel_dir d)
{
    return flow_held(&t->flow[d]);
}

bool sl_tunnel_is_reading(const struct sl_tunnel *t, enum sl_tunnel_dir d)
{
    return !t->finished && (t->side[d].io.interest & EPOLLIN) != 0;
}

bool sl_tunnel_can_splice(const struct sl_tunnel *t, enum sl_tunnel_dir d)
{
    return t->flow[d].can_splice;
}

int sl_tunnel_error(const struct sl_tunnel *t)
{
    return t->err;
}
