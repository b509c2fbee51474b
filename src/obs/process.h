#ifndef SL_OBS_PROCESS_H
#define SL_OBS_PROCESS_H

#include <stdbool.h>
#include <stdint.h>

/*
 * One running sluice process as main.c drives it: start, reload, drain, stop. Everything but
 * signal handling lives behind this (obs/obs.c).
 */

struct sl_process;
struct sl_config;
struct sl_obs;

/*
 * Builds and starts everything from `cfg` (taking it) loaded from `path`: metrics, the
 * gateway and its workers, the access log, the admin listener. NULL when something failed
 * to start (logged; everything started was stopped again).
 */
struct sl_process *sl_process_start(const char *path, struct sl_config *cfg, const char *version);

struct sl_obs *sl_process_obs(struct sl_process *p);

/* Re-reads the config file and swaps it in (SIGHUP). 0, or -1 (logged; the old one stays). */
int sl_process_reload(struct sl_process *p);

/* Once a second from the main thread: certificate file watch, the safe-reload watch, freeing
 * replaced configuration generations. */
void sl_process_tick(struct sl_process *p);

/* Why a drain was asked for from inside the process (POST /drain, a spot notice), or NULL
 * when the stop signal came from outside. */
const char *sl_process_drain_reason(struct sl_process *p);

/* The drain's first step: /ready answers 503 from now on; serving goes on. */
void sl_process_drain_begin(struct sl_process *p);

/* `drain.grace` and `drain_timeout` of the start-up configuration. */
uint64_t sl_process_grace_ms(const struct sl_process *p);
uint64_t sl_process_drain_timeout_ms(const struct sl_process *p);

/* Stops and frees everything: admin, the gateway (after the caller drained it or gave up;
 * `workers_exited` says which), then the access log is flushed to its last record. */
void sl_process_stop(struct sl_process *p, bool workers_exited);

#endif
