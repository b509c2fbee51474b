#ifndef SL_CORE_WORKER_H
#define SL_CORE_WORKER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include "core/loop.h"
#include "core/bpool.h"

/*
 * Worker threads: each runs one event loop and owns every connection it accepts for that
 * connection's whole life. Workers share nothing mutable on the request path; the main thread
 * talks to them only through command bits plus an eventfd wake-up.
 */

enum sl_worker_cmd {
    SL_WORKER_CMD_DRAIN = 1u << 0,  /* stop accepting, finish in-flight work, then exit */
    SL_WORKER_CMD_STOP = 1u << 1,   /* exit now, closing whatever is left */
    SL_WORKER_CMD_RELOAD = 1u << 2, /* take the configuration generation the owner published */
};

struct sl_worker;

struct sl_worker_hooks {
    /* On the worker thread before its loop runs. Returns 0 or -errno (aborts start-up). */
    int (*init)(struct sl_worker *w, void *data);
    /* On the worker thread when the main thread posts commands (enum sl_worker_cmd bits). */
    void (*on_command)(struct sl_worker *w, unsigned cmds, void *data);
    /* On the worker thread after its loop returned. */
    void (*fini)(struct sl_worker *w, void *data);
};

struct sl_worker {
    unsigned id;
    pthread_t thread;
    struct sl_loop loop;
    struct sl_bpool buf_pool; /* I/O buffers and arena blocks */
    struct sl_timer pool_trim;
    const struct sl_worker_hooks *hooks;
    void *hooks_data;
    void *app; /* the higher layer's per-worker state */
    _Atomic unsigned cmds;
    _Atomic int init_rc;  /* result of hooks->init, read by the starter */
    _Atomic bool started; /* init finished (successfully or not) */
    _Atomic bool exited;
};

struct sl_worker *sl_worker_current(void);

/*
 * Starts `count` workers, each calling hooks->init on its thread then running its loop.
 * Waits until every init has finished. `buf_bytes` sizes the pool blocks.
 * Returns the array (caller owns; release with sl_workers_free after join) or NULL with
 * *err set to the first failure (-errno) — in that case every started worker was stopped.
 */
struct sl_worker *sl_workers_start(unsigned count, size_t buf_bytes,
                                   const struct sl_worker_hooks *hooks, void *data, int *err);

/* Posts command bits to a worker from any thread. */
void sl_worker_post(struct sl_worker *w, unsigned cmds);

/* Waits for every worker to exit, at most until `deadline_ms` (sl_clock_now_ms scale).
 * Returns true when all exited. */
bool sl_workers_wait(struct sl_worker *ws, unsigned count, uint64_t deadline_ms);

/* Joins every worker thread (they must be exiting) and frees the array. */
void sl_workers_free(struct sl_worker *ws, unsigned count);

/* Number of online CPUs (for workers: auto). */
unsigned sl_cpu_count(void);

/* Creates a non-blocking listening socket with SO_REUSEADDR and SO_REUSEPORT.
 * Returns the fd or -errno. */
/*
 * Binds and closes a socket on `addr` without SO_REUSEPORT: -EADDRINUSE when anything listens
 * there, including another process's SO_REUSEPORT sockets, which the per-worker sockets
 * would otherwise join silently and split the traffic with. 0 when the address is free.
 */
int sl_listen_probe(const struct sockaddr *addr, socklen_t len);

int sl_listen_socket(const struct sockaddr *addr, socklen_t len, int backlog);

/* An accepting socket registered on a worker's loop. */
struct sl_acceptor;
typedef void (*sl_accept_cb)(struct sl_acceptor *a, int fd, const struct sockaddr *peer,
                             socklen_t peer_len);

/*
 * A process-wide cap on client connections, shared by every acceptor of every worker: at the
 * cap, acceptors stop accepting and new connections wait in the kernel's backlog until some
 * close, instead of failing (or the process running out of descriptors mid-request). The
 * front-ends count connections in `open`.
 */
struct sl_conn_gate {
    _Atomic uint32_t open;
    uint32_t max;            /* 0 = no cap */
    _Atomic uint64_t pauses; /* times an acceptor stopped at the cap */
};

struct sl_acceptor {
    struct sl_io io;
    struct sl_loop *loop;
    sl_accept_cb on_accept;
    void *data;
    bool paused;
    bool at_cap;               /* paused by the gate (logged once per stretch) */
    struct sl_conn_gate *gate; /* or NULL; set after start */
    struct sl_timer resume;    /* re-enables accepting after running out of descriptors */
};

/* Registers listening socket `fd` (the acceptor owns it from now on). Returns 0 or -errno. */
int sl_acceptor_start(struct sl_acceptor *a, struct sl_loop *loop, int fd, sl_accept_cb cb,
                      void *data);

/* Unregisters and closes the listening socket. */
void sl_acceptor_stop(struct sl_acceptor *a);

#endif
