#ifndef SL_PROXY_DISCOVERY_H
#define SL_PROXY_DISCOVERY_H

#include <stddef.h>

struct sl_loop;
struct sl_config;
struct sl_pool;

/*
 * Service discovery: keeps the SL_POOL_SRC_DISCOVERY source of each upstream pool that has a
 * `discovery:` section up to date, from one loop (the control thread's). Never blocks the
 * loop, except to read an endpoints file (local, bounded in size).
 *
 * dns / srv: the name is resolved (sl_dns; A and AAAA, or SRV and then its targets) with the
 * `resolver:` servers and timeout, and again after its TTL clamped to
 * [min_interval, max_interval]. A failed lookup (NXDOMAIN, timeout, server failure) or an
 * answer without addresses publishes nothing: the last good set stays, and the lookup is
 * retried after min_interval, doubling up to max_interval while it keeps failing. dns gives
 * every address discovery.port and discovery.weight; srv gives each target address its
 * record's port and weight (0 taken as 1). Of the SRV records, only those of the lowest
 * priority value that has addresses are published: pools have no priority tiers, and RFC 2782
 * says the lowest is the one to use. Both take discovery.zone as every endpoint's zone.
 *
 * file: the endpoints file (sl_epfile: YAML or JSON) is read at start and again each time its
 * watcher says it changed. A missing or invalid file publishes nothing and keeps the last good
 * set; a valid file with an empty list does publish "no endpoints" (the config's `endpoints:`,
 * if any, stay). A read that failed for another reason (I/O) is retried with the same backoff
 * as DNS.
 *
 * Logging: one warning when a source starts failing, and again only when the reason changes;
 * one info line when it recovers and whenever the published set changes.
 */
struct sl_discovery;

/*
 * Starts discovery for every upstream of `cfg` with a `discovery:` section. `pools` has one
 * entry per cfg->upstreams[i] (NULL allowed for upstreams without discovery); results are
 * published with sl_pool_set_source(pools[i], SL_POOL_SRC_DISCOVERY, ...). `loop`, `cfg` and
 * the pools are borrowed and must outlive the discovery; `pools` itself is not kept. Call on
 * the loop's thread. The first DNS answers arrive from the loop; an endpoints file is read
 * (and published) before this returns. Returns the discovery (caller owns; release with
 * sl_discovery_stop, even when no upstream uses discovery) or NULL with a reason in `err`:
 * a bad resolver setting, a missing pool, a file whose directory cannot be watched, or
 * allocation failure, with nothing left running.
 */
struct sl_discovery *sl_discovery_start(struct sl_loop *loop, const struct sl_config *cfg,
                                        struct sl_pool **pools, char *err, size_t err_len);

/*
 * Stops every lookup and watch and frees the discovery; what was published stays in the
 * pools. Loop thread only. Some small records are released at the end of the current loop turn
 * (or by sl_loop_run_deferred() once the loop has stopped). NULL is a no-op.
 */
void sl_discovery_stop(struct sl_discovery *d);

#endif
