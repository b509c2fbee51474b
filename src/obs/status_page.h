#ifndef SL_OBS_STATUS_PAGE_H
#define SL_OBS_STATUS_PAGE_H

#include <stddef.h>

/*
 * The admin API's HTML status page: one self-contained document (inline CSS and script, no
 * external fetch of any kind) that polls the admin API (/status, /routes, /upstreams) from
 * the browser and draws the process summary, the routes, each upstream's endpoints with
 * their health, and live request-rate and latency charts.
 *
 * The page itself holds no data, so the admin listener serves it without a token; its
 * script reads the token from the URL fragment (`/#token=...`, never sent to the server) and
 * sends it as `Authorization: Bearer` on its own requests. Elements carrying values have
 * stable ids and data- attributes (see docs/admin-api.md) so tests and scripts can read them.
 */

/* The page (static storage, never freed) and its length in *len. Any thread. */
const char *sl_status_page(size_t *len);

/* The Content-Security-Policy the page is served with: no origin other than the admin
 * listener itself, inline style and script only. Static storage. */
const char *sl_status_page_csp(void);

#endif
