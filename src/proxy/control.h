#ifndef SL_PROXY_CONTROL_H
#define SL_PROXY_CONTROL_H

#include <stddef.h>

struct sl_config;
struct sl_pool;

/*
 * The control thread: one event loop per process, beside the workers, for work that must
 * happen once rather than once per worker and must never delay a request: active health
 * checks and service discovery (DNS through c-ares, watched endpoint files). What it learns
 * reaches the workers through the pools (atomic health, published endpoint sets).
 */
struct sl_control;

/*
 * Starts the thread when some upstream has active checks or discovery; returns NULL with an
 * empty `err` when there is nothing to run, NULL with a message on failure. `cfg` and `pools`
 * (pools[i] for cfg->upstreams[i]) are borrowed and must outlive the control thread.
 */
struct sl_control *sl_control_start(const struct sl_config *cfg, struct sl_pool **pools, char *err,
                                    size_t err_len);

/* Stops the thread (checks and queries in flight are abandoned), joins it, frees it. */
void sl_control_stop(struct sl_control *c);

#endif
