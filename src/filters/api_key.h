#ifndef SL_FILTERS_API_KEY_H
#define SL_FILTERS_API_KEY_H

#include "filters/filter.h"

/* `api_key`: identifies the calling consumer by a key in a header or query parameter. */
extern const struct sl_filter_ops sl_filter_api_key;

#endif
