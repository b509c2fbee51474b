#ifndef SL_CONFIG_FILTER_CONF_H
#define SL_CONFIG_FILTER_CONF_H

#include <stddef.h>

#include "config/schema.h"

/*
 * Filter configs. The config layer sits below the filters, so it does not know them: the
 * filters layer registers each filter type (name + schema section) at start-up with
 * sl_config_set_filter_types(), and the loader then checks `filters:` entries against those
 * tables like any other section, with every error located.
 *
 * A filter entry in YAML is a one-key mapping: `- jwt: {secret: ...}`.
 */
struct sl_config_filter_type {
    const char *name;
    const struct sl__schema_section *section; /* keys of the filter's mapping */
    size_t conf_size;                         /* size of the struct `section` fills */
};

/* Registers the filter types the loader accepts (process-wide; before the first load, on one
 * thread). `types` must outlive every load. */
void sl_config_set_filter_types(const struct sl_config_filter_type *const *types, size_t count);

#endif
