#ifndef SL_L4_TUNNEL_H
#define SL_L4_TUNNEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/buf.h"
#include "core/loop.h"
#include "core/transport.h"

/*
 * A tunnel joins two connected sockets (the client's and the upstream's) on one worker's loop
 * and moves bytes both ways until both directions have ended, for L4 (TCP) forwarding.
 *
 * Each direction is either spliced or copied:
 * - spliced (both ends plain TCP): splice(2) socket -> pipe -> socket, so the bytes never
 *   enter user space. The pipe comes from the worker's pool (struct sl_tunnel_pipes) when
 *   bytes arrive and goes back when the direction is idle, so an idle tunnel holds no pipe;
 * - copied (one end is another transport, e.g. TLS, or splice is refused with EINVAL, or the
 *   pool is at its bound): transport read -> one pool block -> transport writev, the block
 *   held only while it has bytes. A transport's `want` is followed: a TLS read that must
 *   send first waits for the socket to be writable, a TLS write that must receive first for
 *   it to be readable. A source whose transport holds bytes inside (TLS pending()) is read
 *   again without waiting for an edge.
 * Either way a direction holds at most one pipe or one block of bytes: when the destination
 * does not take them, reading from the source stops (its read interest goes off) until it
 * does. Nothing is allocated per chunk.
 *
 * Half-close: EOF from one side is passed on as the other side's transport shutdown once every
 * byte before it went out (TCP: shutdown(SHUT_WR); TLS: close_notify then SHUT_WR, retried
 * when the socket cannot take it yet); the other direction keeps flowing. The tunnel ends when both
 * directions ended (SL_TUNNEL_CLOSED), on an error or reset of either side (the other side is
 * then reset too, so that a cut stream never looks complete to it), on the idle timeout (no
 * byte either way for idle_timeout_ms), or on sl_tunnel_abort().
 *
 * The tunnel starts after the upstream connection is established: the connect timeout is
 * the caller's, as is any byte read before (PROXY header parsing should peek, not read).
 *
 * Splicing into a socket whose peer went away raises SIGPIPE (splice has no MSG_NOSIGNAL);
 * the process must ignore SIGPIPE, as main.c does.
 */

/* Which way bytes go. */
enum sl_tunnel_dir {
    SL_TUNNEL_UP = 0,   /* client -> upstream */
    SL_TUNNEL_DOWN = 1, /* upstream -> client */
};

/* Why a tunnel ended (passed to on_done once). */
enum sl_tunnel_reason {
    SL_TUNNEL_CLOSED,         /* both directions ended with a FIN, every byte delivered */
    SL_TUNNEL_IDLE_TIMEOUT,   /* no byte either way for idle_timeout_ms (FIN both sides, or
                                 RST when bytes were still held for a peer not reading) */
    SL_TUNNEL_CLIENT_ERROR,   /* reset or socket error on the client side */
    SL_TUNNEL_UPSTREAM_ERROR, /* reset or socket error on the upstream side */
    SL_TUNNEL_LOCAL_ERROR,    /* out of memory for a copy buffer */
    SL_TUNNEL_ABORTED,        /* sl_tunnel_abort() */
};

/* Short name for logs and metrics ("closed", "idle_timeout", ...). */
const char *sl_tunnel_reason_name(enum sl_tunnel_reason r);

struct sl_tunnel;
struct sl_bpool;

/* Called once when the tunnel ended, from the loop's deferred pass (never from inside
 * sl_tunnel_start or sl_tunnel_abort). Both transports are closed by then. The callback may
 * free the tunnel; until it does, the getters below still answer. */
typedef void (*sl_tunnel_done_cb)(struct sl_tunnel *t, enum sl_tunnel_reason reason, void *data);

/* A pipe of the pool: read end, write end, capacity granted by the kernel. */
struct sl_tunnel_pipe {
    int rd, wr; /* -1 when none */
    uint32_t cap_bytes;
};

/*
 * Per-worker pool of pipes for spliced directions, and the block pool for copied ones.
 * Single-threaded, like the worker that owns it. A pipe costs two descriptors and up to
 * pipe_bytes of kernel memory while full; the pool caches at most max_free empty pipes and
 * keeps at most max_live open in all (cached + in use). Past max_live, or when pipe2 fails
 * (EMFILE), a direction copies through a block instead of failing (`denied` counts it).
 */
struct sl_tunnel_pipes {
    struct sl_bpool *bufs; /* copy-path blocks; borrowed (the worker's pool) */
    struct sl_tunnel_pipe *free;
    uint32_t free_count, max_free;
    uint32_t live, max_live;
    uint32_t pipe_bytes;              /* asked of F_SETPIPE_SZ */
    uint32_t grow_bytes;              /* a pipe a bulk flow fills is grown to this; 0 = never.
                                         Set after init. */
    uint64_t created, reused, denied; /* pipes made, taken from the cache, refused */
    uint64_t grown;                   /* pipes grown to grow_bytes */
    uint64_t discarded;               /* returned with bytes inside (aborts): closed */
};

/*
 * Sets up an empty pool: `bufs` (borrowed, must outlive the pool) gives copy buffers;
 * pipe_bytes is rounded up by the kernel (0 keeps its default, 64 KiB); max_free <= max_live.
 * Returns 0, -EINVAL on bad bounds, -ENOMEM.
 *
 * Sizing: each splice pair moves at most one pipe, so larger pipes cost less CPU per byte
 * (bench/l4_tunnel_bench.c: about 0.3 CPU-s/GB with 64 KiB, 0.2 with 1 MiB) but pin up to
 * pipe_bytes of kernel memory per busy direction. The kernel charges pipe capacity to the
 * user: past fs.pipe-user-pages-soft (64 MiB by default) an unprivileged process is given 8 KiB
 * pipes, which still work but slowly; keep max_live x pipe_bytes under it or raise it.
 */
int sl_tunnel_pipes_init(struct sl_tunnel_pipes *p, struct sl_bpool *bufs, uint32_t pipe_bytes,
                         uint32_t max_free, uint32_t max_live);

/* Closes the cached pipes and frees the cache. Pipes still held by tunnels are closed by
 * those tunnels when they end (abort them first). */
void sl_tunnel_pipes_dispose(struct sl_tunnel_pipes *p);

/* One end of a tunnel. */
struct sl_tunnel_side {
    struct sl_io io;
    struct sl_transport *tr; /* the transport in use: `tcp` below or the caller's */
    struct sl_transport tcp; /* storage when started from a plain fd */
    bool reset;              /* close with RST (SO_LINGER 0) */
};

/* One direction's state. */
struct sl_tunnel_flow {
    struct sl_tunnel_side *src, *dst;
    struct sl_tunnel_pipe pipe; /* spliced: held while bytes are in flight */
    uint32_t in_pipe;           /* bytes in the pipe */
    struct sl_buf buf;          /* copied: held while bytes are in flight */
    uint64_t bytes;             /* delivered to dst */
    bool can_splice;            /* both ends plain TCP, no EINVAL seen */
    bool pipe_full;             /* splice-in got EAGAIN with bytes held: wait for a drain */
    uint32_t rd_want;           /* readiness the next read of src waits for (EPOLLIN, or
                                   EPOLLOUT when TLS must send first) */
    uint32_t wr_want;           /* readiness the next write to dst waits for */
    bool eof;                   /* src said EOF */
    bool shutting;              /* dst's shutdown said -EAGAIN (TLS close_notify): retry */
    bool shut;                  /* EOF passed on to dst: this direction ended */
};

/*
 * The tunnel. Its memory is the caller's (embedded in a connection object or allocated at
 * accept) and must stay valid until on_done ran; the definition is public for that reason.
 * Fields are private: use the functions below.
 */
struct sl_tunnel {
    struct sl_loop *loop;
    struct sl_tunnel_pipes *pool;
    struct sl_tunnel_side side[2]; /* 0 = client, 1 = upstream */
    struct sl_tunnel_flow flow[2]; /* indexed by enum sl_tunnel_dir */
    struct sl_timer idle;
    struct sl_timer resume;   /* next turn's continuation after a budget ran out */
    struct sl_defer kick;     /* arms `resume` from the deferred pass (see tunnel.c) */
    struct sl_defer done;     /* runs on_done */
    uint64_t idle_timeout_ms; /* 0: none */
    uint64_t last_active_ms;
    sl_tunnel_done_cb cb;
    void *data;
    int err; /* -errno behind an *_ERROR reason */
    enum sl_tunnel_reason reason;
    bool finished;
};

/* Flags for sl_tunnel_start_transports. */
#define SL_TUNNEL_NO_SPLICE 1u /* copy even between plain sockets (tests, benchmarks) */

/*
 * Starts forwarding between two connected non-blocking TCP sockets on `loop`. On success the
 * tunnel owns both fds (it closes them before on_done); on failure they stay the caller's.
 * `t` is initialised here; `pool` is borrowed and must outlive the tunnel. idle_timeout_ms 0
 * means none. No callback runs before this returns. Returns 0 or -errno (registration).
 */
int sl_tunnel_start(struct sl_tunnel *t, struct sl_loop *loop, struct sl_tunnel_pipes *pool,
                    int client_fd, int upstream_fd, uint64_t idle_timeout_ms, sl_tunnel_done_cb cb,
                    void *data);

/*
 * The same over two transports: a side whose ops are sl_tcp_transport_ops may be spliced, any
 * other (TLS) is copied. On success the tunnel owns both transports (it calls their close
 * before on_done) but not their memory, which must stay valid until on_done ran; on failure
 * they stay the caller's. `flags`: SL_TUNNEL_NO_SPLICE. Returns 0 or -errno.
 */
int sl_tunnel_start_transports(struct sl_tunnel *t, struct sl_loop *loop,
                               struct sl_tunnel_pipes *pool, struct sl_transport *client,
                               struct sl_transport *upstream, unsigned flags,
                               uint64_t idle_timeout_ms, sl_tunnel_done_cb cb, void *data);

/*
 * Ends the tunnel now: both sockets are reset (the streams are cut, which a FIN would hide)
 * and closed, and on_done(SL_TUNNEL_ABORTED) follows from the deferred pass. A no-op once the
 * tunnel has ended (on_done pending); not to be called after on_done ran.
 */
void sl_tunnel_abort(struct sl_tunnel *t);

/* Bytes delivered in direction `d` so far. */
uint64_t sl_tunnel_bytes(const struct sl_tunnel *t, enum sl_tunnel_dir d);

/* Bytes read from the source of `d` and not yet written (in the pipe or the buffer). */
size_t sl_tunnel_held_bytes(const struct sl_tunnel *t, enum sl_tunnel_dir d);

/* Whether the tunnel currently wants to read from the source of `d` (false while the
 * destination is not taking bytes: backpressure). */
bool sl_tunnel_is_reading(const struct sl_tunnel *t, enum sl_tunnel_dir d);

/* Whether `d` can splice (both ends plain TCP and no splice refused so far). */
bool sl_tunnel_can_splice(const struct sl_tunnel *t, enum sl_tunnel_dir d);

/* -errno behind SL_TUNNEL_*_ERROR, else 0. */
int sl_tunnel_error(const struct sl_tunnel *t);

#endif
