#ifndef SL_FILTERS_FILTER_SET_H
#define SL_FILTERS_FILTER_SET_H

#include <stddef.h>

#include "filters/filter.h"

struct sl_config;
struct sl_worker;

/*
 * Every filter instance built from one config snapshot, and the chain of each route:
 * default_filters (one shared instance each, so a default limit is one limit across routes)
 * followed by the route's own. An instance's slot is its index in `instances`; each worker
 * keeps its per-worker states in an array indexed by slot.
 */
struct sl_filter_set {
    struct sl_filter_instance *instances;
    size_t instance_count;
    struct sl_filter_chain *route_chains; /* by route index in cfg->routes */
    size_t route_count;
};

/* Registers every filter type's config schema with the loader. Call once before loading. */
void sl_filters_register_config(void);

/* Creates every instance and chain for `cfg` (which must outlive the set). Returns 0, or -1
 * with "file:line:col: path: message" for the first filter that failed in `err`. */
int sl_filter_set_build(const struct sl_config *cfg, struct sl_filter_set **out, char *err,
                        size_t err_len);

void sl_filter_set_free(struct sl_filter_set *set);

/* On worker `w`'s thread: makes each instance's per-worker state. On success *wstates is an
 * array by slot (the caller releases it with sl_filter_set_worker_fini). 0 or -errno. */
int sl_filter_set_worker_init(const struct sl_filter_set *set, struct sl_worker *w,
                              void ***wstates);

void sl_filter_set_worker_fini(const struct sl_filter_set *set, void **wstates);

#endif
