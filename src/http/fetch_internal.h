#ifndef SL_HTTP_FETCH_INTERNAL_H
#define SL_HTTP_FETCH_INTERNAL_H

#include <stddef.h>

struct sl_fetch_req;
struct sl_fetch_resp;

/*
 * The response side of sl_fetch over memory, for the fuzzer and tests: `data` is everything
 * the server sent before closing, handed to the parser in reads of at most `piece` bytes (0 =
 * as much as the read buffer takes). Uses rq->method (HEAD has no body), max_body_bytes,
 * cut_body and on_header from `rq`. Same results as sl_fetch: 0 with `out` filled (the caller
 * disposes of it), or -errno with a reason in `err`.
 */
int sl__fetch_parse_response(const char *data, size_t len, size_t piece,
                             const struct sl_fetch_req *rq, struct sl_fetch_resp *out, char *err,
                             size_t err_len);

#endif
