#ifndef SL_FILTERS_JWT_H
#define SL_FILTERS_JWT_H

#include <stdbool.h>
#include <stddef.h>

#include "core/slice.h"
#include "filters/filter.h"

struct sl_request;

/* `jwt`: validates a bearer token (signature, algorithm, time and claims). */
extern const struct sl_filter_ops sl_filter_jwt;

/*
 * A claim of the token a jwt filter accepted for this request (top-level string, number or
 * boolean claims; strings unquoted). Returns false when no token was accepted or the claim is
 * absent. The value lives in the request arena.
 */
bool sl_jwt_request_claim(const struct sl_request *req, const char *name, size_t name_len,
                          struct sl_slice *out);

#endif
