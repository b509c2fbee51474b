#ifndef SL_FILTERS_RATE_LIMIT_H
#define SL_FILTERS_RATE_LIMIT_H

#include "filters/filter.h"

/*
 * `rate_limit`: GCRA limits per key (client ip, consumer, route, a JWT claim, a header, or a
 * combination). scope local: one lock-free table per filter instance shared by every worker
 * (filters/rl_table.h), exact across workers. scope global: one Redis call per request
 * through the worker's client (filters/redis.h), shared by every gateway using the same id.
 * Refused requests get 429 with Retry-After and RateLimit-Limit/-Remaining/-Reset; allowed
 * ones get the three RateLimit fields too unless `headers: false`. When several rate_limit
 * filters pass one request, each adds its own fields (the response then carries several).
 */
extern const struct sl_filter_ops sl_filter_rate_limit;

#endif
