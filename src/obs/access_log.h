#ifndef SL_OBS_ACCESS_LOG_H
#define SL_OBS_ACCESS_LOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * The access-log writer: one JSON line per finished request, in zstd-compressed segment files
 * (docs/access-log.md). Each worker owns a single-producer ring; recording a request copies a
 * compact binary record into it and nothing else (no system call, lock or allocation). A log
 * thread drains the rings every flush interval, formats JSON, compresses, and writes segments
 * under a hidden temporary name that is renamed once the segment is complete.
 */

struct sl_access_log_conf;
struct sl_request;
struct sl_alog;

/*
 * Counters, monotonic. Once sl_alog_stop() returned, every record handed to sl_alog_record()
 * is in exactly one of records_written, records_dropped_full and records_dropped_io.
 */
struct sl_alog_stats {
    uint64_t records_written;      /* in segments closed under their final name */
    uint64_t records_dropped_full; /* the worker's ring had no room */
    uint64_t records_dropped_io;   /* lost to a write error (disk full, EIO, no directory) */
    uint64_t bytes_uncompressed;   /* JSON bytes of the records written */
    uint64_t bytes_compressed;     /* segment bytes written */
    uint64_t segments_closed;      /* renamed to their final name */
    uint64_t segments_failed;      /* removed after a write error */
};

/*
 * Builds the writer: `workers` rings of conf->buffer_bytes each (rounded up to a power of
 * two), the compressor and the batch buffers. Creates conf->directory (and its parents) when
 * missing and fails when it is not a writable directory. Copies what it needs from `conf`.
 * Returns the writer (caller owns; release with sl_alog_free()), or NULL with a message in
 * `err`. Start-up only: it makes system calls and allocates.
 */
struct sl_alog *sl_alog_new(const struct sl_access_log_conf *conf, unsigned workers, char *err,
                            size_t err_len);

/*
 * Sets the function called on the log thread with the final path of each segment, once it
 * is complete and renamed (`path` is valid during the call only), including segments left
 * unfinished by a process that died and finished at start. Set before sl_alog_start().
 */
void sl_alog_on_segment(struct sl_alog *a, void (*cb)(const char *path, void *data), void *data);

/*
 * Starts the log thread (it takes no signals). Before its first pass, the thread finishes
 * the temporary segments in the directory that no live writer holds locked, whatever pid
 * their name carries: each is cut after its last whole block that ends a line and renamed;
 * one with no such block is removed; one that does not begin as this writer's segments do is
 * left in place (all logged). Returns 0, or -errno.
 */
int sl_alog_start(struct sl_alog *a);

/*
 * Records one finished request. Called by worker `worker` only (each ring has one producer),
 * during the request's last callback: `req` is read during the call and not kept. Never
 * blocks, allocates or makes a system call: copies the fields, truncated to fixed caps, into
 * the ring, or counts the record as dropped when the ring has no room. A NULL `a` or an
 * out-of-range `worker` records nothing.
 */
void sl_alog_record(struct sl_alog *a, unsigned worker, const struct sl_request *req);

/*
 * Drains every ring, writes what it held, closes and renames the open segment, stops the
 * thread and logs a one-line summary (written and dropped counts). Call after the workers
 * stopped. Idempotent; without sl_alog_start() it does the final drain on the calling
 * thread. Bounded: when the thread does not finish within 5 seconds (a stuck disk) it is
 * abandoned, logged, and sl_alog_free() then leaves the writer's memory to the process exit.
 *
 * Returns true when everything finished: the log thread (if any) has ended and will never
 * call the on_segment hook again. False when the thread was abandoned (this call or an
 * earlier one): it may still be running and may still call the hook later, so whatever the
 * hook uses (the shipper) must not be freed either. NULL returns true.
 */
bool sl_alog_stop(struct sl_alog *a);

/* Stops the writer if needed, then releases it. NULL is ignored. */
void sl_alog_free(struct sl_alog *a);

/* Reads the counters into *out. Any thread, at any time (relaxed loads: each counter is
 * exact, but they are not read as one snapshot). */
void sl_alog_get_stats(const struct sl_alog *a, struct sl_alog_stats *out);

#endif
