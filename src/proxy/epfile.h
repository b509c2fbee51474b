#ifndef SL_PROXY_EPFILE_H
#define SL_PROXY_EPFILE_H

#include <stddef.h>

#include "proxy/pool.h"

struct sl_loop;

/*
 * The endpoints file of file-based discovery (`discovery: {file: endpoints/users.yaml}`):
 * parsing it, and watching it for changes with inotify.
 *
 * File format
 * -----------
 * YAML, or JSON (libyaml reads JSON as YAML flow syntax). The document is either a mapping
 * whose only key is `endpoints:`, holding a list, or that list alone. Each element of the list
 * is either an address string or a mapping:
 *
 *     endpoints:
 *       - 10.0.0.1:8080                # weight 1, no zone
 *       - "[2001:db8::1]:8080"         # IPv6 in brackets; quoted, or YAML reads a list
 *       - address: 10.0.0.2:8080
 *         weight: 5                    # 1..1000, default 1
 *         zone: eu-west-1a             # optional
 *
 *     ["10.0.0.1:8080", {"address": "10.0.0.2:8080", "weight": 5, "zone": "eu-west-1a"}]
 *
 *     {"endpoints": [{"address": "127.0.0.1:9001", "zone": "az-a"}]}
 *
 * Rules:
 * - `address` (required in the mapping form): an IP literal and a port in 1..65535, IPv4 as
 *   `1.2.3.4:80`, IPv6 as `[::1]:80`. Host names are refused: resolving them would block the
 *   control loop (use DNS discovery for names).
 * - `weight`: an integer in 1..1000; default 1.
 * - `zone`: 1 to 64 letters, digits, '-', '_' or '.' (the rule of names in the config file).
 * - Any other key is an error; so are a duplicate key, a duplicate address (compared as
 *   addresses: `[::1]:80` and `[0::1]:80` are the same), anchors and aliases, and null where a
 *   value is expected.
 * - At most SL_EPFILE_MAX_ENDPOINTS endpoints and SL_EPFILE_MAX_BYTES bytes.
 * - An empty list (`endpoints: []` or `[]`) is valid and means no endpoints. An empty file is
 *   not: it is more likely a file caught half-written than a wish to drop every endpoint.
 * An invalid file changes nothing: the caller keeps the endpoints it had.
 */

#define SL_EPFILE_MAX_ENDPOINTS 10000
#define SL_EPFILE_MAX_BYTES (4u * 1024 * 1024)
/* The watcher calls back this long after the last event of a burst of writes... */
#define SL_EPFILE_DEBOUNCE_MS 50
/* ...but no later than this after its first event, so a file rewritten non-stop is still
 * re-read now and then. */
#define SL_EPFILE_DEBOUNCE_MAX_MS 500

/*
 * Parses an endpoints file held in `text[0..len)` (need not be NUL-terminated; not kept).
 * On success returns 0 and sets *out to an array of *n specs (NULL when *n is 0); the caller
 * owns it and its strings (`address` as written in the file, `zone` or NULL) and releases all
 * with sl_epfile_specs_free(). Every `weight` is set (1 when not written).
 * On error returns -1, sets *out NULL and *n 0, and writes "line:col: message" for the error
 * nearest the start of the file into `err` (truncated to `err_len`; nothing written when
 * `err_len` is 0). Never calls back.
 */
int sl_epfile_parse(const char *text, size_t len, struct sl_endpoint_spec **out, size_t *n,
                    char *err, size_t err_len);

/* Frees what sl_epfile_parse() or sl_epfile_read() returned. NULL is a no-op. */
void sl_epfile_specs_free(struct sl_endpoint_spec *specs, size_t n);

/*
 * Reads the endpoints file at `path` (not kept) and parses it like sl_epfile_parse(). Blocks
 * on the read of a local file of at most SL_EPFILE_MAX_BYTES; opening never blocks (a FIFO is
 * refused, not waited on). Returns 0 on success, or a negative errno with a message in `err`:
 * -ENOENT when the file does not exist ("path: no such file"), -EINVAL when it is invalid
 * ("path:line:col: message"), -EFBIG when larger than SL_EPFILE_MAX_BYTES, another -errno when
 * it cannot be read. *out and *n as for sl_epfile_parse().
 */
int sl_epfile_read(const char *path, struct sl_endpoint_spec **out, size_t *n, char *err,
                   size_t err_len);

struct sl_epfile_watch;

/* The file may have changed: re-read it. Runs on the loop's thread. */
typedef void (*sl_epfile_cb)(void *data);

/*
 * Watches `path` (copied) on `loop`, from the loop's thread. `cb(data)` runs on the loop
 * thread SL_EPFILE_DEBOUNCE_MS after the file was written (and closed), created, replaced by a
 * rename, renamed away or deleted; the events of a burst give one call. The parent directory
 * is what is watched, so the file need not exist yet, but the directory must. Also calls back
 * when the kernel dropped events (queue overflow) and when the directory itself is removed or
 * moved (after which nothing more is seen; a warning is logged).
 *
 * What is not seen: writes through a descriptor that is never closed, and changes to the
 * target of a symlink made in another directory. The exception is Kubernetes ConfigMap and
 * Secret volumes, whose files are symlinks through `..data`: swapping `..data` counts as a
 * change of every file in the directory.
 *
 * Returns NULL with a message in `err` when the directory cannot be watched (missing, not a
 * directory, inotify limits reached). Uses one inotify instance per watch.
 */
struct sl_epfile_watch *sl_epfile_watch_new(struct sl_loop *loop, const char *path, sl_epfile_cb cb,
                                            void *data, char *err, size_t err_len);

/*
 * Stops watching; no callback runs after this returns. May be called from `cb`. The memory is
 * released at the end of the current loop turn (or by sl_loop_run_deferred() once the loop
 * has stopped), since the loop may still hold an event for it in this turn. NULL is a no-op.
 */
void sl_epfile_watch_free(struct sl_epfile_watch *w);

#endif
