#include "proxy/control.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"
#include "core/log.h"
#include "core/loop.h"
#include "proxy/discovery.h"
#include "proxy/health_check.h"
#include "proxy/pool.h"

struct sl_control {
    const struct sl_config *cfg;
    struct sl_pool **pools;
    struct sl_loop loop;
    pthread_t thread;
    struct sl_health_checker *hc;
    struct sl_discovery *disc;
    _Atomic bool stopping;
    int start_rc; /* what the thread's set-up returned, read after `started` */
    char start_err[256];
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool started;
};

static void on_wake(struct sl_loop *loop, void *data)
{
    struct sl_control *c = data;
    if (atomic_load(&c->stopping))
        sl_loop_stop(loop);
}

static bool has_active(const struct sl_config *cfg)
{
    for (size_t i = 0; i < cfg->upstream_count; i++)
        if (cfg->upstreams[i].active.enabled)
            return true;
    return false;
}

static bool has_discovery(const struct sl_config *cfg)
{
    for (size_t i = 0; i < cfg->upstream_count; i++)
        if (cfg->upstreams[i].discovery.kind != SL_DISCOVERY_NONE)
            return true;
    return false;
}

static void *control_main(void *arg)
{
    struct sl_control *c = arg;
    int rc = 0;
    if (has_discovery(c->cfg) && !(c->disc = sl_discovery_start(&c->loop, c->cfg, c->pools,
                                                                c->start_err, sizeof c->start_err)))
        rc = -EINVAL;
    /* checks start after discovery so that endpoints from a file are checked from the start */
    if (rc == 0 && has_active(c->cfg) &&
        !(c->hc = sl_health_checker_start(&c->loop, c->pools, c->cfg->upstream_count))) {
        snprintf(c->start_err, sizeof c->start_err, "out of memory starting health checks");
        rc = -ENOMEM;
    }
    pthread_mutex_lock(&c->lock);
    c->start_rc = rc;
    c->started = true;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
    if (rc == 0)
        sl_loop_run(&c->loop);
    sl_health_checker_stop(c->hc);
    c->hc = NULL;
    sl_discovery_stop(c->disc);
    c->disc = NULL;
    sl_loop_run_deferred(&c->loop);
    return NULL;
}

struct sl_control *sl_control_start(const struct sl_config *cfg, struct sl_pool **pools, char *err,
                                    size_t err_len)
{
    if (err_len)
        err[0] = '\0';
    if (!has_active(cfg) && !has_discovery(cfg))
        return NULL;
    struct sl_control *c = calloc(1, sizeof *c);
    if (!c) {
        snprintf(err, err_len, "out of memory starting the control thread");
        return NULL;
    }
    c->cfg = cfg;
    c->pools = pools;
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);
    int rc = sl_loop_init(&c->loop);
    if (rc < 0) {
        snprintf(err, err_len, "control thread: cannot create its event loop: %s", strerror(-rc));
        goto fail;
    }
    c->loop.on_wake = on_wake;
    c->loop.wake_data = c;
    rc = pthread_create(&c->thread, NULL, control_main, c);
    if (rc != 0) {
        snprintf(err, err_len, "control thread: cannot start: %s", strerror(rc));
        sl_loop_dispose(&c->loop);
        goto fail;
    }
    pthread_mutex_lock(&c->lock);
    while (!c->started)
        pthread_cond_wait(&c->cond, &c->lock);
    pthread_mutex_unlock(&c->lock);
    if (c->start_rc < 0) {
        snprintf(err, err_len, "%s", c->start_err);
        pthread_join(c->thread, NULL);
        sl_loop_dispose(&c->loop);
        goto fail;
    }
    return c;
fail:
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c);
    return NULL;
}

void sl_control_stop(struct sl_control *c)
{
    if (!c)
        return;
    atomic_store(&c->stopping, true);
    sl_loop_wake(&c->loop);
    pthread_join(c->thread, NULL);
    sl_loop_dispose(&c->loop);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c);
}
