#include <string.h>

#include "filters/api_key.h"
#include "filters/filter.h"
#include "filters/jwt.h"
#include "filters/rate_limit.h"

/* One line per filter. */
static const struct sl_filter_ops *const registry[] = {
    &sl_filter_api_key,
    &sl_filter_jwt,
    &sl_filter_rate_limit,
    NULL,
};

const struct sl_filter_ops *const *sl_filter_registry(size_t *count)
{
    *count = sizeof registry / sizeof registry[0] - 1;
    return registry;
}

const struct sl_filter_ops *sl_filter_find(const char *name)
{
    for (size_t i = 0; registry[i]; i++)
        if (strcmp(registry[i]->name, name) == 0)
            return registry[i];
    return NULL;
}
