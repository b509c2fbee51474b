#ifndef SL_PROXY_HEALTH_CHECK_H
#define SL_PROXY_HEALTH_CHECK_H

#include <stddef.h>
#include <stdint.h>

struct sl_loop;
struct sl_pool;
struct sl_endpoint;

/*
 * Active health checks (`health.active:` of an upstream), one checker per process on the
 * control thread's loop.
 *
 * Every endpoint of every pool with active checks on gets its own check: a TCP connect, or
 * (with `path`) an HTTP/1.1 GET whose response status must be in `statuses`, each bounded by
 * `timeout`. The first check runs at a random offset within the first interval and each next
 * one `interval` ±10% after the previous one started (later if that one is still running), so
 * checks of many endpoints and of several instances do not fall into step. An endpoint is
 * marked down after `unhealthy` failures in a row and up again after `healthy` successes in a
 * row (sl_endpoint_set_active_down, called only on a change since it also counts the change
 * in pool->stats.active_down/active_up; each change is logged). Endpoints start from whatever
 * verdict they carry, which for a new endpoint is up: passive health serves until the first
 * verdict.
 *
 * The checker follows each pool's endpoint set: it compares pool->version with the version it
 * last saw every SL_HEALTH_SYNC_MS (and on sl_health_checker_sync), checks endpoints that
 * appeared, and stops checking (closing any check in flight and dropping its reference)
 * endpoints that left. Endpoints are matched by identity, so one that stays across sets
 * keeps its counters.
 *
 * Everything runs on the loop's thread and never blocks it; the only lock taken is the
 * pool's publisher mutex inside sl_pool_acquire_set, when a set changed.
 */
struct sl_health_checker;

/* How often pool versions are compared, in milliseconds. */
#define SL_HEALTH_SYNC_MS 200

/*
 * Starts checks for every pool of `pools[0..pool_count)` whose upstream has active.enabled
 * (other pools are ignored). `loop` and every pool (with its conf) are borrowed and must
 * outlive the checker; `pools` itself is copied. Call on the loop's thread; the first checks
 * run from the loop, never before this returns. Returns the checker (caller owns; release
 * with sl_health_checker_stop) or NULL on allocation failure, with nothing started.
 */
struct sl_health_checker *sl_health_checker_start(struct sl_loop *loop, struct sl_pool **pools,
                                                  size_t pool_count);

/*
 * Looks at every pool's set now instead of at the next sync tick (for an owner that knows it
 * just published a set, and for tests). Loop thread only; may log, never calls back.
 */
void sl_health_checker_sync(struct sl_health_checker *hc);

/*
 * Stops every check: closes every socket, cancels every timer and drops every endpoint
 * reference before returning. Verdicts stay as they are (a checker started later for the
 * same pools resumes from them; an owner turning active checks off for a pool clears them
 * with sl_endpoint_set_active_down(ep, false)). Loop thread only; may be called from one of
 * the loop's callbacks. The memory is released by a deferred callback at the end of the
 * current turn (an event for a closed check may still be pending in this turn's batch), so an
 * owner whose loop will not turn again calls sl_loop_run_deferred() before disposing of it.
 * NULL is fine.
 */
void sl_health_checker_stop(struct sl_health_checker *hc);

/*
 * For tests and the admin API: checks started on `ep` so far by this checker (0 when it is
 * not checked), and the time the last one started (loop milliseconds; 0 when none).
 */
uint64_t sl_health_checker_check_count(const struct sl_health_checker *hc,
                                       const struct sl_endpoint *ep, uint64_t *last_start_ms);

#endif
