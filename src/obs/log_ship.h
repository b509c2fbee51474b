#ifndef SL_OBS_LOG_SHIP_H
#define SL_OBS_LOG_SHIP_H

#include <stddef.h>
#include <stdint.h>

/*
 * The access-log shipper: one thread that sends closed segments (`sluice-*.jsonl.zst` in the
 * access-log directory) to a collector over HTTP(S), oldest first, and deletes each file once
 * the collector answered 2xx. A failed attempt (connect error, timeout, any other status)
 * leaves the file where it is and retries the same segment after an exponential backoff with
 * jitter (1 s, 2 s, 4 s... up to ship_backoff_max); so does a file that cannot be opened for
 * a reason that may pass (out of file descriptors or memory, an I/O error). A segment that can
 * never be read as it is (permissions, a symbolic link, not a regular file) is skipped, left on
 * disk and not queued again until the next start. Nothing is ever deleted unshipped: what is
 * not shipped by the time the process stops stays on disk, and the next start picks it up.
 */

struct sl_access_log_conf;
struct sl_log_ship;

/* Counters, monotonic except `queued`. */
struct sl_log_ship_stats {
    uint64_t shipped;  /* segments the collector accepted (2xx) */
    uint64_t failures; /* attempts that failed */
    uint64_t bytes;    /* file bytes of the shipped segments */
    uint64_t queued;   /* gauge: segments known and waiting, the one in flight included */
};

/*
 * A shipper for conf->ship_url (set) that takes segments from conf->directory with
 * conf->ship_method, ship_timeout_ms (each attempt, upload included) and ship_backoff_max_ms.
 * Copies what it needs from `conf`; an https URL loads the system's CA store here. Returns the
 * shipper (the caller frees it with sl_log_ship_free), or NULL with a reason in `err` for a
 * bad URL, unusable CA store, or allocation failure. Start-up only.
 */
struct sl_log_ship *sl_log_ship_new(const struct sl_access_log_conf *conf, char *err,
                                    size_t err_len);

/*
 * Queues the closed segments already in the directory (left by an earlier run; on the calling
 * thread, one directory listing), then starts the ship thread (it takes no signals). Returns
 * 0, or -errno.
 */
int sl_log_ship_start(struct sl_log_ship *s);

/*
 * Hands over a closed segment (its final path; copied). Any thread, typically the access
 * log's on_segment hook; takes a short mutex and never waits for I/O. A path already queued
 * is ignored. When the queue is full the file is left on disk and found again by a rescan of
 * the directory once the queue has drained. Names outside [A-Za-z0-9._-] are refused (logged)
 * and stay on disk.
 */
void sl_log_ship_enqueue(struct sl_log_ship *s, const char *path);

/* sl_log_ship_enqueue in the shape of the access log's segment hook, `data` being the
 * shipper: sl_alog_on_segment(alog, sl_log_ship_on_segment, ship). */
void sl_log_ship_on_segment(const char *path, void *data);

/*
 * Ships what is queued until `deadline_ms` (sl_clock_now_ms scale), then stops and joins the
 * thread: an attempt still running at the deadline is cancelled. Unshipped segments stay on
 * disk (their count is logged). Returns by the deadline plus a little, name resolution
 * aside. Idempotent; a shipper never started just returns.
 */
void sl_log_ship_stop(struct sl_log_ship *s, uint64_t deadline_ms);

/* Stops at once if still running (as sl_log_ship_stop with a past deadline), then frees.
 * NULL is fine. */
void sl_log_ship_free(struct sl_log_ship *s);

/* Reads the counters into *out. Any thread, at any time (relaxed loads). */
void sl_log_ship_get_stats(const struct sl_log_ship *s, struct sl_log_ship_stats *out);

#endif
