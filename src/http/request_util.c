/*
 * Request helpers for filters: header lookup and edits, query parameters, cookies, and extra
 * response headers. Edits rebuild small arrays in the request arena; nothing is malloc'ed.
 */
#include <errno.h>
#include <string.h>

#include "http/request.h"

#include "core/fmt.h"

bool sl_request_header(const struct sl_request *req, const char *name, struct sl_slice *value)
{
    for (size_t i = 0; i < req->header_count; i++) {
        if (sl_slice_ieq_cstr(req->headers[i].name, name)) {
            *value = req->headers[i].value;
            return true;
        }
    }
    return false;
}

void sl_request_header_remove(struct sl_request *req, const char *name)
{
    size_t o = 0;
    for (size_t i = 0; i < req->header_count; i++) {
        if (sl_slice_ieq_cstr(req->headers[i].name, name))
            continue;
        if (o != i)
            req->headers[o] = req->headers[i];
        o++;
    }
    req->header_count = o;
}

int sl_request_header_append(struct sl_request *req, struct sl_slice name, struct sl_slice value)
{
    /* The parser's array has no spare room, so an append copies it (headers are slices: the
     * copy is a few hundred bytes, and only requests a filter edits pay it). */
    struct sl_h1_header *h =
        sl_arena_alloc(&req->arena, (req->header_count + 1) * sizeof(struct sl_h1_header));
    const char *n = sl_arena_dup(&req->arena, name.ptr, name.len);
    const char *v = value.len ? sl_arena_dup(&req->arena, value.ptr, value.len) : "";
    if (!h || !n || !v)
        return -ENOMEM;
    if (req->header_count)
        memcpy(h, req->headers, req->header_count * sizeof(*h));
    memset(&h[req->header_count], 0, sizeof(*h));
    h[req->header_count].name = sl_slice_make(n, name.len);
    h[req->header_count].value = sl_slice_make(v, value.len);
    req->headers = h;
    req->header_count++;
    return 0;
}

bool sl_request_query_param(struct sl_request *req, const char *name, struct sl_slice *value)
{
    size_t nl = strlen(name);
    const char *p = req->query.ptr, *end = p + req->query.len;
    while (p && p < end) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *pe = amp ? amp : end;
        const char *eq = memchr(p, '=', (size_t)(pe - p));
        const char *ke = eq ? eq : pe;
        if ((size_t)(ke - p) == nl && memcmp(p, name, nl) == 0) {
            const char *v = eq ? eq + 1 : pe;
            size_t vl = (size_t)(pe - v);
            if (!memchr(v, '%', vl) && !memchr(v, '+', vl)) {
                *value = sl_slice_make(v, vl);
                return true;
            }
            char *out = sl_arena_alloc(&req->arena, vl + 1);
            if (!out)
                return false;
            size_t o = 0;
            for (size_t i = 0; i < vl; i++) {
                if (v[i] == '%') {
                    int hi = i + 1 < vl ? sl_hex_digit((unsigned char)v[i + 1]) : -1;
                    int lo = i + 2 < vl ? sl_hex_digit((unsigned char)v[i + 2]) : -1;
                    if (hi < 0 || lo < 0)
                        return false;
                    out[o++] = (char)(hi * 16 + lo);
                    i += 2;
                    continue;
                }
                out[o++] = v[i] == '+' ? ' ' : v[i];
            }
            *value = sl_slice_make(out, o);
            return true;
        }
        p = amp ? amp + 1 : end;
    }
    return false;
}

static bool is_ows(char c)
{
    return c == ' ' || c == '\t';
}

bool sl_request_cookie(const struct sl_request *req, const char *name, struct sl_slice *value)
{
    size_t nl = strlen(name);
    for (size_t i = 0; i < req->header_count; i++) {
        if (!sl_slice_ieq_cstr(req->headers[i].name, "Cookie"))
            continue;
        const char *p = req->headers[i].value.ptr, *end = p + req->headers[i].value.len;
        while (p < end) {
            while (p < end && (is_ows(*p) || *p == ';'))
                p++;
            const char *semi = memchr(p, ';', (size_t)(end - p));
            const char *pe = semi ? semi : end;
            const char *eq = memchr(p, '=', (size_t)(pe - p));
            if (eq && (size_t)(eq - p) == nl && memcmp(p, name, nl) == 0) {
                const char *v = eq + 1;
                size_t vl = (size_t)(pe - v);
                while (vl && is_ows(v[vl - 1]))
                    vl--;
                if (vl >= 2 && v[0] == '"' && v[vl - 1] == '"') {
                    v++;
                    vl -= 2;
                }
                *value = sl_slice_make(v, vl);
                return true;
            }
            p = pe;
        }
    }
    return false;
}

int sl_request_add_response_header(struct sl_request *req, struct sl_slice name,
                                   struct sl_slice value)
{
    size_t need = req->resp_extra_len + name.len + value.len + 4;
    if (need > req->resp_extra_cap) {
        size_t cap = req->resp_extra_cap ? req->resp_extra_cap * 2 : 256;
        while (cap < need)
            cap *= 2;
        char *nb = sl_arena_alloc(&req->arena, cap);
        if (!nb)
            return -ENOMEM;
        if (req->resp_extra_len)
            memcpy(nb, req->resp_extra, req->resp_extra_len);
        req->resp_extra = nb;
        req->resp_extra_cap = cap;
    }
    char *p = req->resp_extra + req->resp_extra_len;
    memcpy(p, name.ptr, name.len);
    p += name.len;
    *p++ = ':';
    *p++ = ' ';
    memcpy(p, value.ptr, value.len);
    p += value.len;
    *p++ = '\r';
    *p++ = '\n';
    req->resp_extra_len = (size_t)(p - req->resp_extra);
    return 0;
}
