#ifndef SL_PROXY_UPSTREAM_H
#define SL_PROXY_UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/buf.h"
#include "core/loop.h"
#include "core/transport.h"
#include "proxy/balancer.h"

struct sl_upstream_conf;
struct sl_worker;
struct sl_upstream_conn;

/*
 * Per-worker view of one upstream pool: its balancer state and its keep-alive connections.
 * Idle connections stay registered for reading so that a backend closing one is noticed at
 * once (the connection is dropped before any request can be sent on it), and each retires
 * before the backend's own keep-alive timeout (learned from `Keep-Alive: timeout=`).
 */
struct sl_upstream_rt {
    const struct sl_upstream_conf *conf;
    struct sl_balancer *bal;
    struct sl_worker *worker;
    struct sl_upstream_conn **idle; /* per endpoint: most recently used first */
    uint32_t idle_count;            /* across endpoints, bounded by keepalive.max_idle */
    uint64_t connects, reuses;      /* for tests and metrics */
};

/* Who is using a busy connection: the exchange's callbacks. */
struct sl_upstream_user {
    void (*on_event)(struct sl_upstream_conn *uc, uint32_t events, void *data);
    void (*on_timeout)(struct sl_upstream_conn *uc, void *data);
    void *data;
};

enum sl_uc_state { SL_UC_CONNECTING, SL_UC_BUSY, SL_UC_IDLE, SL_UC_CLOSED };

struct sl_upstream_conn {
    struct sl_io io;
    struct sl_transport tr;
    struct sl_timer timer;
    struct sl_defer free_defer;
    struct sl_buf in;
    struct sl_upstream_rt *up;
    int endpoint;
    enum sl_uc_state state;
    struct sl_upstream_conn *next, *prev; /* idle list */
    struct sl_upstream_user user;
    uint64_t keepalive_ms; /* learned from the backend; 0 = unknown */
    uint64_t idle_since_ms;
    uint32_t requests; /* requests sent on this connection */
    bool reused;       /* taken from the idle pool for the current request */
};

int sl_upstream_rt_init(struct sl_upstream_rt *up, const struct sl_upstream_conf *conf,
                        const struct sl_balancer_shared *shared, struct sl_worker *w);

/* Closes every idle connection and frees the per-worker state. Busy connections must have
 * been released by their users first. */
void sl_upstream_rt_dispose(struct sl_upstream_rt *up);

/* Closes idle connections (drain). */
void sl_upstream_rt_close_idle(struct sl_upstream_rt *up);

/*
 * Gets a connection to endpoint `ep`: a pooled idle one (state BUSY, reused = true) or a new
 * one being connected (state CONNECTING: the user's on_event sees EPOLLOUT when connected or
 * EPOLLERR on failure). Returns NULL with *err set when the socket cannot even be created
 * (-errno; e.g. -ECONNREFUSED may come back synchronously on loopback).
 * Events are delivered to `user` until the connection is released.
 */
struct sl_upstream_conn *sl_upstream_acquire(struct sl_upstream_rt *up, int ep,
                                             const struct sl_upstream_user *user, bool fresh,
                                             int *err);

/* Sets which events the user wants (EPOLLIN / EPOLLOUT). */
void sl_upstream_conn_want(struct sl_upstream_conn *uc, uint32_t events);

/* Arms the connection's timer for the user (on_timeout fires). */
void sl_upstream_conn_arm(struct sl_upstream_conn *uc, uint64_t ms);

/* Returns the connection: to the idle pool when `reusable` (and there is room), closed
 * otherwise. The user gets no more events. */
void sl_upstream_release(struct sl_upstream_conn *uc, bool reusable);

/* Reads into uc->in. Returns 0 (check *eof), -EAGAIN, -ENOBUFS (buffer full) or -errno. */
int sl_upstream_conn_read(struct sl_upstream_conn *uc, bool *eof);

/* Result of a finished connect: 0 or -errno (SO_ERROR). */
int sl_upstream_conn_connect_result(struct sl_upstream_conn *uc);

#endif
