#ifndef SL_OBS_OBS_H
#define SL_OBS_OBS_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * The operations side of one sluice process: the running gateway and what watches and
 * steers it (access log, metrics, admin API), plus the process state they report (draining,
 * config generation, reload history). main.c creates it, feeds it signals, and asks it to
 * reload or drain; the admin API asks the same through the function pointers below.
 */

struct sl_gateway;
struct sl_alog;
struct sl_metrics;
struct sl_admin;
struct sl_request;
struct sl_config;

struct sl_obs {
    struct sl_gateway *gw;
    struct sl_alog *alog;       /* NULL when access_log is off */
    struct sl_metrics *metrics; /* always present */
    struct sl_admin *admin;     /* NULL when there is no admin listener */
    char *config_path;          /* owned */
    const char *version;        /* the program's version string (static) */
    uint64_t started_unix_ms;   /* wall clock at start */
    uint64_t started_mono_ms;   /* sl_clock_now_ms() at start */
    _Atomic bool draining;      /* a drain began: /ready answers 503 from then on */
    _Atomic bool started;       /* listeners open and workers running */
    /* `lock` serializes reloads (held for a whole reload; never taken on a request path);
     * `hist_lock` guards the reload history below, held only for a copy, so that readers
     * (admin, metrics) never wait for a reload. */
    pthread_mutex_t lock;
    pthread_mutex_t hist_lock;
    uint64_t generation; /* current config generation (1 at start) */
    uint64_t reloads;    /* that took */
    uint64_t reload_failures;
    uint64_t rollbacks;
    uint64_t last_reload_unix_ms; /* 0 = never */
    char last_reload_error[2048]; /* "" when the last one took */
    /* Requests to the main thread. `request_drain` starts the same drain as SIGTERM and
     * returns at once. `reload` re-reads the config file and swaps it in; 0, or -1 with the
     * errors (file:line:col lines) in `msg`. Both are safe from any thread. */
    void (*request_drain)(struct sl_obs *obs, const char *why);
    int (*reload)(struct sl_obs *obs, char *msg, size_t cap);
    void *owner; /* main.c's */
};

/*
 * Called on a worker thread once per request when it ends (h1_server's on_request_done):
 * updates the worker's metrics and appends the access-log record. `data` is the sl_obs.
 */
void sl_obs_on_request_done(struct sl_request *req, void *data);

#endif
