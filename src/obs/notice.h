#ifndef SL_OBS_NOTICE_H
#define SL_OBS_NOTICE_H

#include <stddef.h>

/*
 * The spot-interruption notice poller: one thread that GETs drain.notice_url every
 * notice_interval and reports the first 200 answer. It models AWS EC2's
 * http://169.254.169.254/latest/meta-data/spot/instance-action, which answers 404 until an
 * interruption is scheduled (about two minutes ahead) and then 200 with a JSON body such as
 * {"action": "terminate", "time": "2026-11-28T20:00:00Z"}. A 404, any other status, a
 * connection error or a timeout all mean "no notice"; the ones that are not 404 are logged
 * when they start and then each time their count doubles.
 *
 * IMDSv2: when the URL answers 401 (the instance requires session tokens), the poller asks
 * for a token with `PUT <scheme>://<host>/latest/api/token` (header
 * `X-aws-ec2-metadata-token-ttl-seconds: 21600`), sends it as `X-aws-ec2-metadata-token` from
 * then on, and renews it before it expires or on the next 401. The token is never logged.
 */

struct sl_drain_conf;
struct sl_notice;

/* Called once, on the notice thread, with a printable excerpt of the 200 answer's body (at
 * most 200 bytes; valid during the call). Must be safe to call from any thread. */
typedef void (*sl_notice_cb)(void *data, const char *what);

/*
 * Starts polling conf->notice_url (set) every conf->notice_interval_ms, each attempt bounded
 * by the interval (at most 2 s). After the first 200 answer, `on_notice(data, excerpt)` runs
 * once and the thread ends. Returns the poller (released by sl_notice_stop), or NULL with a
 * reason in `err` for a bad URL, no URL, or a failure to start the thread. The thread takes
 * no signals. Copies what it needs from `conf`.
 */
struct sl_notice *sl_notice_start(const struct sl_drain_conf *conf, sl_notice_cb on_notice,
                                  void *data, char *err, size_t err_len);

/* Stops polling (an attempt in flight is cancelled), joins the thread and frees `n`. After it
 * returns `on_notice` is not running and never will. NULL is fine. */
void sl_notice_stop(struct sl_notice *n);

#endif
