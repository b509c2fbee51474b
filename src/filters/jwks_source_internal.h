#ifndef SL_FILTERS_JWKS_SOURCE_INTERNAL_H
#define SL_FILTERS_JWKS_SOURCE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

struct sl_jwks_source;
struct sl_jwks_source_opts;

/* The max-age of one Cache-Control header value in seconds, or -1 when it has none (or it is
 * malformed). Values beyond 2^62 are clamped there. */
int64_t sl__jwks_cache_max_age(const char *value, size_t len);

/* The delay until the next refresh after a successful fetch: `max_age_s` (when >= 0) clamped
 * to [refresh_min_ms, refresh_max_ms], else refresh_ms. `o` has its defaults filled in. */
uint64_t sl__jwks_refresh_delay_ms(const struct sl_jwks_source_opts *o, int64_t max_age_s);

/* When the background thread will next look at `src` (monotonic ms, sl_clock_now_ms). */
uint64_t sl__jwks_source_next_due_ms(struct sl_jwks_source *src);

#endif
