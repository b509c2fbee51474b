#include "http/h1_parse.h"

#include <limits.h>
#include <string.h>

#include "core/fmt.h"

/*
 * Design notes.
 *
 * The head is parsed in two phases. While it is incomplete, each call only searches the new
 * bytes for the end of the head ("\n\r\n", or "\n\n" which the full pass then rejects), so a
 * slowly arriving head costs O(total bytes), not O(calls * bytes). Once the end E is known, one
 * strict pass parses [start, E). Because buf[E-1] is '\n' and no character class below contains
 * '\n', every class-scanning loop in that pass stops at or before E-1 without a bounds check;
 * explicit bounds are only needed where fixed-length tokens (versions, status codes) are read.
 *
 * All decisions of the incremental phase depend only on the bytes before the position being
 * examined, so feeding a message whole, byte by byte or in any split gives the same result
 * (the fuzzers assert this).
 */

enum {
    C_TOKEN = 1 << 0,  /* tchar (RFC 9110 5.6.2) */
    C_VALUE = 1 << 1,  /* field-value octet: HTAB, SP, VCHAR, obs-text */
    C_TARGET = 1 << 2, /* request-target octet: VCHAR except '#' (no fragment on the wire) */
    C_HOST = 1 << 3,   /* reg-name octet: unreserved / sub-delims ('%' handled apart) */
    C_HEX = 1 << 4,
};

/* Generated; one lookup per byte instead of a chain of comparisons. */
static const uint8_t cls[256] = {
    0,  0,  0,  0,  0,  0,  0,  0,  0,  2,  0,  0,  0,  0,  0,  0,  /* 0x00 */
    0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  /* 0x10 */
    2,  15, 6,  3,  15, 7,  15, 15, 14, 14, 15, 15, 14, 15, 15, 6,  /* 0x20 */
    31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 6,  14, 6,  14, 6,  6,  /* 0x30 */
    6,  31, 31, 31, 31, 31, 31, 15, 15, 15, 15, 15, 15, 15, 15, 15, /* 0x40 */
    15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 6,  6,  6,  7,  15, /* 0x50 */
    7,  31, 31, 31, 31, 31, 31, 15, 15, 15, 15, 15, 15, 15, 15, 15, /* 0x60 */
    15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 6,  7,  6,  15, 0,  /* 0x70 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* 0x80 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* 0x90 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* 0xa0 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* 0xb0 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* 0xc0 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* 0xd0 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* 0xe0 */
    2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  2,  /* 0xf0 */
};

#define MAX_LEADING_EMPTY_LINES 8
#define CHUNK_LINE_MAX 4096
#define CHUNK_TRAILERS_MAX 16384
#define CHUNK_SIZE_MAX (UINT64_C(1) << 62)
#define CONTENT_LENGTH_MAX (UINT64_C(1) << 62)
#define KEEPALIVE_TIMEOUT_MAX_S UINT64_C(86400)

static inline unsigned char uc(char c)
{
    return (unsigned char)c;
}

static inline bool is_ows(char c)
{
    return c == ' ' || c == '\t';
}

static inline unsigned char lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

/* `lit` must be lowercase. */
static bool ieq_lit(const char *p, size_t n, const char *lit, size_t lit_len)
{
    if (n != lit_len)
        return false;
    for (size_t i = 0; i < n; i++)
        if (lower(uc(p[i])) != uc(lit[i]))
            return false;
    return true;
}

#define IEQ(p, n, lit) ieq_lit((p), (n), (lit), sizeof(lit) - 1)

/* --- word-at-a-time scanning ------------------------------------------------------------- */

#define REP(b) (UINT64_C(0x0101010101010101) * (uint64_t)(b))
/* Non-zero iff some byte of x is zero / below n (n <= 128); exact as booleans. */
#define HAS_ZERO(x) (((x)-REP(1)) & ~(x)&REP(0x80))
#define HAS_LESS(x, n) (((x)-REP(n)) & ~(x)&REP(0x80))
#define HAS_BYTE(x, b) HAS_ZERO((x) ^ REP(b))

static inline uint64_t load64(const char *p)
{
    uint64_t x;
    memcpy(&x, p, sizeof(x));
    return x;
}

/*
 * Field values are the bulk of a head (cookies, user agents), so they are checked 8 bytes at a
 * time; the table handles HTAB, the tail and the stopping byte. Returns the first byte that is
 * not a value octet; the caller guarantees one exists before `end`.
 */
static const char *scan_value(const char *p, const char *end)
{
    for (;;) {
        while (end - p >= 8) {
            uint64_t x = load64(p);
            if (HAS_LESS(x, 0x20) | HAS_BYTE(x, 0x7f))
                break;
            p += 8;
        }
        if (!(cls[uc(*p)] & C_VALUE))
            return p;
        p++;
    }
}

static const char *scan_target(const char *p, const char *end)
{
    for (;;) {
        while (end - p >= 8) {
            uint64_t x = load64(p);
            if (HAS_LESS(x, 0x21) | HAS_BYTE(x, 0x7f) | (x & REP(0x80)) | HAS_BYTE(x, '#'))
                break;
            p += 8;
        }
        if (!(cls[uc(*p)] & C_TARGET))
            return p;
        p++;
    }
}

/*
 * A scan stopped at p on an unexpected byte. A CR not followed by LF, or any LF reached this
 * way, is a line-ending problem (the thing smuggling relies on); anything else is `other`.
 * p[1] is readable when *p is CR because the region ends with LF.
 */
static enum sl_h1_err stop_err(const char *p, enum sl_h1_err other)
{
    if (*p == '\n' || (*p == '\r' && p[1] != '\n'))
        return SL_H1_ERR_BAD_LINE_ENDING;
    return other;
}

/* --- end-of-head search ------------------------------------------------------------------ */

static size_t limit_or_max(size_t v)
{
    return v ? v : SIZE_MAX;
}

/*
 * Finds the end of the head. On SL_DONE *start_out is where the start line begins (after
 * skipped empty lines) and *end_out is one past the final LF.
 */
static enum sl_status find_head_end(struct sl_h1_head_state *st, const char *buf, size_t len,
                                    size_t max_head, bool is_request, size_t max_uri,
                                    size_t *start_out, size_t *end_out, enum sl_h1_err *e)
{
    size_t start = 0;
    if (is_request) {
        unsigned lines = 0;
        while (start + 1 < len && buf[start] == '\r' && buf[start + 1] == '\n') {
            if (++lines > MAX_LEADING_EMPTY_LINES) {
                /* An endless stream of CRLF is not a request; bounding it also keeps this
                   per-call rescan O(1). */
                *e = SL_H1_ERR_BAD_REQUEST_LINE;
                return SL_ERROR;
            }
            start += 2;
        }
        if (start == len || (start + 1 == len && buf[start] == '\r'))
            return len >= max_head ? (*e = SL_H1_ERR_HEADERS_TOO_LARGE, SL_ERROR) : SL_AGAIN;

        /* Request line longer than max_uri + 64 with no end in sight: 414 without waiting for
           the whole head. Only when it would fire before the head limit, so the verdict does
           not depend on how the bytes were split. */
        size_t uri_trigger = max_uri > SIZE_MAX - 65 - start ? SIZE_MAX : start + max_uri + 65;
        if (uri_trigger <= max_head && len >= uri_trigger && st->scanned < uri_trigger &&
            !memchr(buf + start, '\n', uri_trigger - start)) {
            *e = SL_H1_ERR_URI_TOO_LONG;
            return SL_ERROR;
        }
    }

    /* The head must end within max_head bytes, so nothing past that is searched. */
    size_t n = len < max_head ? len : max_head;
    size_t from = st->scanned > start ? st->scanned : start;
    while (from < n) {
        const char *nl = memchr(buf + from, '\n', n - from);
        if (!nl) {
            from = n;
            break;
        }
        size_t i = (size_t)(nl - buf);
        if (i + 1 >= n) {
            from = i; /* revisit this LF when the next byte arrives */
            break;
        }
        size_t end = 0;
        if (buf[i + 1] == '\n') {
            end = i + 2;
        } else if (buf[i + 1] == '\r') {
            if (i + 2 >= n) {
                from = i;
                break;
            }
            if (buf[i + 2] == '\n')
                end = i + 3;
        }
        if (end) {
            /* Leave scanned on this LF so a repeated call finds the same end. */
            st->scanned = i;
            *start_out = start;
            *end_out = end;
            return SL_DONE;
        }
        from = i + 1;
    }
    st->scanned = from;
    if (len >= max_head) {
        *e = SL_H1_ERR_HEADERS_TOO_LARGE;
        return SL_ERROR;
    }
    return SL_AGAIN;
}

/* --- field section ----------------------------------------------------------------------- */

struct fields {
    struct sl_h1_header *headers;
    size_t cap;
    size_t count;
    unsigned flags;
    bool is_response;
    bool has_cl;
    bool has_te;
    bool has_host;
    uint64_t content_length;
    struct sl_slice host;
    uint64_t keepalive_timeout_ms;
};

static bool parse_content_length(const char *p, size_t n, uint64_t *out)
{
    if (n == 0 || n > 19)
        return false;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned d = (unsigned)uc(p[i]) - '0';
        if (d > 9)
            return false;
        v = v * 10 + d; /* 19 digits cannot overflow uint64_t */
    }
    if (v > CONTENT_LENGTH_MAX)
        return false;
    *out = v;
    return true;
}

/* Calls fn on each comma-separated element of a list value, OWS-trimmed, empties skipped. */
static void for_each_element(const char *p, size_t n, void (*fn)(const char *, size_t, void *),
                             void *arg)
{
    const char *end = p + n;
    while (p < end) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *e = comma ? comma : end;
        const char *s = p;
        while (s < e && is_ows(*s))
            s++;
        const char *t = e;
        while (t > s && is_ows(t[-1]))
            t--;
        if (t > s)
            fn(s, (size_t)(t - s), arg);
        p = comma ? comma + 1 : end;
    }
}

static void on_connection_token(const char *p, size_t n, void *arg)
{
    unsigned *flags = arg;
    if (IEQ(p, n, "close"))
        *flags |= SL_H1_F_CONN_CLOSE;
    else if (IEQ(p, n, "keep-alive"))
        *flags |= SL_H1_F_CONN_KEEPALIVE;
    else if (IEQ(p, n, "upgrade"))
        *flags |= SL_H1_F_CONN_UPGRADE;
}

static void on_keepalive_param(const char *p, size_t n, void *arg)
{
    uint64_t *ms = arg;
    if (n <= 8 || !IEQ(p, 8, "timeout="))
        return;
    uint64_t v = 0;
    for (size_t i = 8; i < n; i++) {
        unsigned d = (unsigned)uc(p[i]) - '0';
        if (d > 9)
            return; /* advisory header: ignore what we cannot read */
        if (v < KEEPALIVE_TIMEOUT_MAX_S)
            v = v * 10 + d;
    }
    if (v > KEEPALIVE_TIMEOUT_MAX_S)
        v = KEEPALIVE_TIMEOUT_MAX_S;
    *ms = v * 1000;
}

static bool is_valid_port(const char *p, const char *e)
{
    if (p == e || e - p > 5)
        return false;
    unsigned v = 0;
    for (; p < e; p++) {
        unsigned d = (unsigned)uc(*p) - '0';
        if (d > 9)
            return false;
        v = v * 10 + d;
    }
    return v <= 65535;
}

/* host [ ":" port ] per RFC 3986: IP-literal, IPv4 or reg-name (pct-encoding allowed). */
static bool is_valid_host(const char *p, size_t n, bool need_port)
{
    const char *e = p + n;
    if (n == 0)
        return false;
    if (*p == '[') {
        const char *s = ++p;
        while (p < e && *p != ']') {
            if (!(cls[uc(*p)] & C_HOST) && *p != ':')
                return false;
            p++;
        }
        if (p == e || p == s)
            return false;
        p++;
    } else {
        const char *s = p;
        while (p < e && *p != ':') {
            if (*p == '%') {
                if (e - p < 3 || !(cls[uc(p[1])] & C_HEX) || !(cls[uc(p[2])] & C_HEX))
                    return false;
                p += 3;
                continue;
            }
            if (!(cls[uc(*p)] & C_HOST))
                return false;
            p++;
        }
        if (p == s)
            return false;
    }
    if (p == e)
        return !need_port;
    if (*p != ':')
        return false;
    return is_valid_port(p + 1, e);
}

/* Applies the semantics of the few fields that decide framing and connection handling. */
static enum sl_h1_err classify(struct fields *f, const char *name, size_t nlen, const char *v,
                               size_t vlen)
{
    switch (nlen) {
    case 4:
        if (!f->is_response && IEQ(name, nlen, "host")) {
            if (f->has_host)
                return SL_H1_ERR_DUPLICATE_HOST;
            f->has_host = true;
            f->host = sl_slice_make(v, vlen);
        }
        break;
    case 6:
        if (!f->is_response && IEQ(name, nlen, "expect") && IEQ(v, vlen, "100-continue"))
            f->flags |= SL_H1_F_EXPECT_CONTINUE;
        break;
    case 10:
        if (IEQ(name, nlen, "connection")) {
            f->flags |= SL_H1_F_HAS_CONN_HEADER;
            for_each_element(v, vlen, on_connection_token, &f->flags);
        } else if (f->is_response && IEQ(name, nlen, "keep-alive")) {
            for_each_element(v, vlen, on_keepalive_param, &f->keepalive_timeout_ms);
        }
        break;
    case 14:
        if (IEQ(name, nlen, "content-length")) {
            /* Even an identical duplicate is refused: some peers take the first, some the
               last, some join them; only refusal is unambiguous. */
            if (f->has_cl || !parse_content_length(v, vlen, &f->content_length))
                return SL_H1_ERR_BAD_CONTENT_LENGTH;
            f->has_cl = true;
        }
        break;
    case 17:
        if (IEQ(name, nlen, "transfer-encoding")) {
            /* Only a lone "chunked": lists and repeated fields are where implementations
               disagree about which coding is final. */
            if (f->has_te || !IEQ(v, vlen, "chunked"))
                return SL_H1_ERR_BAD_TRANSFER_ENCODING;
            f->has_te = true;
        }
        break;
    default:
        break;
    }
    return SL_H1_ERR_NONE;
}

/*
 * Parses header lines from p up to and including the empty line; *out is set past it.
 * The region [p, end) ends with LF.
 */
static enum sl_h1_err parse_fields(const char *p, const char *end, struct fields *f,
                                   const char **out)
{
    for (;;) {
        if (*p == '\r') {
            if (p[1] != '\n')
                return SL_H1_ERR_BAD_LINE_ENDING;
            *out = p + 2;
            return SL_H1_ERR_NONE;
        }
        const char *name = p;
        while (cls[uc(*p)] & C_TOKEN)
            p++;
        if (*p != ':') {
            if (p == name && is_ows(*p))
                return SL_H1_ERR_OBS_FOLD;
            if (is_ows(*p))
                return SL_H1_ERR_BAD_HEADER_NAME; /* "Name : v" is a classic smuggling form */
            return stop_err(p, SL_H1_ERR_BAD_HEADER_NAME);
        }
        if (p == name)
            return SL_H1_ERR_BAD_HEADER_NAME;
        size_t nlen = (size_t)(p - name);
        p++;
        while (is_ows(*p))
            p++;
        const char *v = p;
        p = scan_value(p, end);
        if (*p != '\r' || p[1] != '\n')
            return stop_err(p, SL_H1_ERR_BAD_HEADER_VALUE);
        const char *ve = p;
        while (ve > v && is_ows(ve[-1]))
            ve--;
        p += 2;
        if (f->count == f->cap)
            return SL_H1_ERR_TOO_MANY_HEADERS;
        size_t vlen = (size_t)(ve - v);
        f->headers[f->count].name = sl_slice_make(name, nlen);
        f->headers[f->count].value = sl_slice_make(v, vlen);
        f->count++;
        enum sl_h1_err e = classify(f, name, nlen, v, vlen);
        if (e != SL_H1_ERR_NONE)
            return e;
    }
}

static size_t header_cap(const struct sl_h1_limits *limits, struct sl_h1_header *headers,
                         size_t max_headers)
{
    size_t cap = headers ? max_headers : 0;
    if (limits && limits->max_headers && limits->max_headers < cap)
        cap = limits->max_headers;
    return cap;
}

/* --- requests ---------------------------------------------------------------------------- */

static const char root_path[] = "/";

static enum sl_h1_err parse_target(struct sl_h1_request *req)
{
    const char *t = req->target.ptr;
    size_t n = req->target.len;
    const char *tend = t + n;

    if (req->method.len == 7 && memcmp(req->method.ptr, "CONNECT", 7) == 0) {
        /* authority-form, and only for CONNECT */
        if (!is_valid_host(t, n, true))
            return SL_H1_ERR_BAD_REQUEST_LINE;
        req->host = req->target;
        req->path = sl_slice_make(t, 0);
        req->query = sl_slice_make(tend, 0);
        return SL_H1_ERR_NONE;
    }
    if (*t == '*') {
        if (n != 1 || req->method.len != 7 || memcmp(req->method.ptr, "OPTIONS", 7) != 0)
            return SL_H1_ERR_BAD_REQUEST_LINE;
        req->path = req->target;
        req->query = sl_slice_make(tend, 0);
        return SL_H1_ERR_NONE;
    }
    const char *path = t;
    if (*t != '/') {
        size_t scheme;
        if (n > 7 && IEQ(t, 7, "http://"))
            scheme = 7;
        else if (n > 8 && IEQ(t, 8, "https://"))
            scheme = 8;
        else
            return SL_H1_ERR_BAD_REQUEST_LINE;
        const char *a = t + scheme;
        const char *ae = a;
        while (ae < tend && *ae != '/' && *ae != '?')
            ae++;
        /* No userinfo ('@' is not a host char): it only serves phishing and confusion. */
        if (!is_valid_host(a, (size_t)(ae - a), false))
            return SL_H1_ERR_BAD_REQUEST_LINE;
        /* RFC 9112 3.2.2: the target's authority overrides Host. */
        req->host = sl_slice_make(a, (size_t)(ae - a));
        path = ae;
    }
    const char *q = path < tend ? memchr(path, '?', (size_t)(tend - path)) : NULL;
    const char *pe = q ? q : tend;
    if (pe == path || *path != '/')
        req->path = sl_slice_make(root_path, 1); /* "http://h" and "http://h?q" mean "/" */
    else
        req->path = sl_slice_make(path, (size_t)(pe - path));
    req->query = q ? sl_slice_make(q + 1, (size_t)(tend - q - 1)) : sl_slice_make(tend, 0);
    return SL_H1_ERR_NONE;
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static enum sl_h1_err parse_request_line(const char *p, const char *end, size_t max_uri,
                                         struct sl_h1_request *req, const char **out)
{
    const char *m = p;
    while (cls[uc(*p)] & C_TOKEN)
        p++;
    if (p == m || *p != ' ')
        return stop_err(p, SL_H1_ERR_BAD_REQUEST_LINE);
    req->method = sl_slice_make(m, (size_t)(p - m));
    p++;

    const char *t = p;
    p = scan_target(p, end);
    size_t tlen = (size_t)(p - t);
    if (tlen > max_uri)
        return SL_H1_ERR_URI_TOO_LONG;
    if (tlen == 0 || *p != ' ')
        return stop_err(p, SL_H1_ERR_BAD_REQUEST_LINE);
    req->target = sl_slice_make(t, tlen);
    p++;

    if (end - p >= 10 && memcmp(p, "HTTP/", 5) == 0 && is_digit(p[5]) && p[6] == '.' &&
        is_digit(p[7]) && p[8] == '\r' && p[9] == '\n') {
        if (p[5] != '1' || (p[7] != '0' && p[7] != '1'))
            return SL_H1_ERR_BAD_VERSION;
        req->version_minor = p[7] - '0';
        *out = p + 10;
    } else {
        while (*p != '\r' && *p != '\n')
            p++;
        return stop_err(p, SL_H1_ERR_BAD_REQUEST_LINE);
    }
    return parse_target(req);
}

enum sl_status sl_h1_parse_request(struct sl_h1_head_state *st, const char *buf, size_t len,
                                   const struct sl_h1_limits *limits, struct sl_h1_request *req,
                                   struct sl_h1_header *headers, size_t max_headers,
                                   enum sl_h1_err *err)
{
    enum sl_h1_err e = SL_H1_ERR_NONE;
    size_t max_head = limit_or_max(limits ? limits->max_head_bytes : 0);
    size_t max_uri = limit_or_max(limits ? limits->max_uri_bytes : 0);
    size_t start = 0, end = 0;

    if (st->scanned > len)
        st->scanned = 0; /* a different buffer: start over rather than skip bytes */
    enum sl_status s = find_head_end(st, buf, len, max_head, true, max_uri, &start, &end, &e);
    if (s != SL_DONE)
        goto out;

    memset(req, 0, sizeof(*req));
    const char *p = buf + start;
    const char *hend = buf + end;
    e = parse_request_line(p, hend, max_uri, req, &p);
    if (e != SL_H1_ERR_NONE)
        goto fail;

    struct fields f = {
        .headers = headers,
        .cap = header_cap(limits, headers, max_headers),
    };
    e = parse_fields(p, hend, &f, &p);
    if (e != SL_H1_ERR_NONE)
        goto fail;

    if (f.has_te) {
        /* RFC 9112 6.1: TE in HTTP/1.0 means the framing is faulty. */
        if (req->version_minor == 0) {
            e = SL_H1_ERR_BAD_TRANSFER_ENCODING;
            goto fail;
        }
        if (f.has_cl) {
            e = SL_H1_ERR_CL_AND_TE;
            goto fail;
        }
        req->body = SL_H1_BODY_CHUNKED;
    } else if (f.has_cl) {
        req->body = SL_H1_BODY_LENGTH;
        req->content_length = f.content_length;
    }
    if (f.has_host) {
        if (f.host.len == 0 ? req->version_minor == 1
                            : !is_valid_host(f.host.ptr, f.host.len, false)) {
            e = SL_H1_ERR_BAD_HOST;
            goto fail;
        }
        if (!req->host.ptr)
            req->host = f.host;
    } else if (req->version_minor == 1) {
        e = SL_H1_ERR_MISSING_HOST;
        goto fail;
    }
    if (!req->host.ptr)
        req->host = sl_slice_make(p, 0);
    if (req->version_minor == 0)
        f.flags &= ~(unsigned)SL_H1_F_EXPECT_CONTINUE; /* RFC 9110 10.1.1: ignore in 1.0 */
    req->flags = f.flags;
    req->headers = headers;
    req->header_count = f.count;
    req->head_len = (size_t)(p - buf);
    s = SL_DONE;
    goto out;
fail:
    s = SL_ERROR;
out:
    if (s == SL_ERROR && e == SL_H1_ERR_NONE)
        e = SL_H1_ERR_BAD_REQUEST_LINE;
    if (err)
        *err = s == SL_ERROR ? e : SL_H1_ERR_NONE;
    return s;
}

/* --- responses --------------------------------------------------------------------------- */

static enum sl_h1_err parse_status_line(const char *p, const char *end, struct sl_h1_response *resp,
                                        const char **out)
{
    if (end - p < 12 || memcmp(p, "HTTP/1.", 7) != 0 || (p[7] != '0' && p[7] != '1') ||
        p[8] != ' ' || !is_digit(p[9]) || !is_digit(p[10]) || !is_digit(p[11])) {
        while (*p != '\r' && *p != '\n')
            p++;
        return stop_err(p, SL_H1_ERR_BAD_STATUS_LINE);
    }
    resp->version_minor = p[7] - '0';
    resp->status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    if (resp->status < 100 || resp->status > 599)
        return SL_H1_ERR_BAD_STATUS_LINE;
    p += 12;
    const char *r = p;
    if (*p == ' ') {
        r = ++p;
        p = scan_value(p, end);
    }
    resp->reason = sl_slice_make(r, (size_t)(p - r));
    if (*p != '\r' || p[1] != '\n')
        return stop_err(p, SL_H1_ERR_BAD_STATUS_LINE);
    *out = p + 2;
    return SL_H1_ERR_NONE;
}

enum sl_status sl_h1_parse_response(struct sl_h1_head_state *st, const char *buf, size_t len,
                                    const struct sl_h1_limits *limits, bool request_was_head,
                                    struct sl_h1_response *resp, struct sl_h1_header *headers,
                                    size_t max_headers, enum sl_h1_err *err)
{
    enum sl_h1_err e = SL_H1_ERR_NONE;
    size_t max_head = limit_or_max(limits ? limits->max_head_bytes : 0);
    size_t start = 0, end = 0;

    if (st->scanned > len)
        st->scanned = 0;
    enum sl_status s = find_head_end(st, buf, len, max_head, false, 0, &start, &end, &e);
    if (s != SL_DONE)
        goto out;

    memset(resp, 0, sizeof(*resp));
    const char *p = buf + start;
    const char *hend = buf + end;
    e = parse_status_line(p, hend, resp, &p);
    if (e != SL_H1_ERR_NONE)
        goto fail;

    struct fields f = {
        .headers = headers,
        .cap = header_cap(limits, headers, max_headers),
        .is_response = true,
    };
    e = parse_fields(p, hend, &f, &p);
    if (e != SL_H1_ERR_NONE)
        goto fail;

    int code = resp->status;
    if (code < 200 || code == 204 || code == 304 || request_was_head) {
        /* No body whatever CL/TE say, so they cannot desynchronise the connection; their
           syntax was still checked above because a peer sending garbage is not trusted. */
        resp->body = SL_H1_BODY_NONE;
    } else if (f.has_te) {
        if (resp->version_minor == 0) {
            e = SL_H1_ERR_BAD_TRANSFER_ENCODING; /* RFC 9112 6.1: faulty framing */
            goto fail;
        }
        if (f.has_cl) {
            e = SL_H1_ERR_CL_AND_TE;
            goto fail;
        }
        resp->body = SL_H1_BODY_CHUNKED;
    } else if (f.has_cl) {
        resp->body = SL_H1_BODY_LENGTH;
    } else {
        resp->body = SL_H1_BODY_UNTIL_CLOSE;
    }
    if (f.has_cl)
        resp->content_length = f.content_length;
    resp->flags = f.flags;
    resp->keepalive_timeout_ms = f.keepalive_timeout_ms;
    resp->headers = headers;
    resp->header_count = f.count;
    resp->head_len = (size_t)(p - buf);
    s = SL_DONE;
    goto out;
fail:
    s = SL_ERROR;
out:
    if (s == SL_ERROR && e == SL_H1_ERR_NONE)
        e = SL_H1_ERR_BAD_STATUS_LINE;
    if (err)
        *err = s == SL_ERROR ? e : SL_H1_ERR_NONE;
    return s;
}

/* --- chunked ----------------------------------------------------------------------------- */

enum {
    CH_SIZE = 0, /* hex digits; line_bytes counts them */
    CH_EXT,      /* after ';' up to CR */
    CH_SIZE_LF,
    CH_DATA,
    CH_DATA_CR,
    CH_DATA_LF,
    CH_TR_START, /* start of a trailer line or of the final CRLF */
    CH_TR_NAME,
    CH_TR_VALUE,
    CH_TR_LF,
    CH_END_LF,
    CH_DONE,
    CH_ERR_BAD,
    CH_ERR_LARGE,
};

void sl_h1_chunked_init(struct sl_h1_chunked *ch)
{
    memset(ch, 0, sizeof(*ch));
}

enum sl_status sl_h1_chunked_parse(struct sl_h1_chunked *ch, const char *in, size_t len,
                                   size_t *consumed, struct sl_slice *data, enum sl_h1_err *err)
{
    size_t pos = 0;
    *data = sl_slice_make(in, 0);
    *consumed = 0;
    if (ch->state == CH_DONE)
        return SL_DONE;
    if (ch->state == CH_ERR_BAD || ch->state == CH_ERR_LARGE)
        goto fail;

    for (;;) {
        if (ch->state == CH_DATA) {
            size_t avail = len - pos;
            size_t n = (uint64_t)avail < ch->remaining ? avail : (size_t)ch->remaining;
            *data = sl_slice_make(in + pos, n);
            pos += n;
            ch->remaining -= n;
            if (ch->remaining == 0)
                ch->state = CH_DATA_CR;
            *consumed = pos;
            /* One data slice per call keeps the contract simple; framing after it is
               handled on the next call. */
            return pos == len ? SL_AGAIN : SL_OK;
        }
        if (pos == len) {
            *consumed = pos;
            return SL_AGAIN;
        }
        unsigned char c = uc(in[pos++]);
        switch (ch->state) {
        case CH_SIZE: {
            int d = sl_hex_digit((unsigned char)c);
            if (d >= 0) {
                if (ch->line_bytes == 16) {
                    ch->state = CH_ERR_LARGE;
                    goto fail;
                }
                ch->line_bytes++;
                ch->remaining = ch->remaining * 16 + (unsigned)d;
                if (ch->remaining > CHUNK_SIZE_MAX) {
                    ch->state = CH_ERR_LARGE;
                    goto fail;
                }
                break;
            }
            /* No whitespace anywhere on the size line: "BWS ;" is where parsers differ. */
            if (ch->line_bytes == 0)
                ch->state = CH_ERR_BAD;
            else if (c == ';')
                ch->state = CH_EXT;
            else if (c == '\r')
                ch->state = CH_SIZE_LF;
            else
                ch->state = CH_ERR_BAD;
            if (ch->state == CH_ERR_BAD)
                goto fail;
            ch->line_bytes++;
            break;
        }
        case CH_EXT:
            if (c == '\r') {
                ch->state = CH_SIZE_LF;
                break;
            }
            /* Extensions are ignored, but a CTL in them (bare LF above all) is a framing
               ambiguity, so only field-value octets are allowed. */
            if (!(cls[c] & C_VALUE) || ++ch->line_bytes > CHUNK_LINE_MAX) {
                ch->state = CH_ERR_BAD;
                goto fail;
            }
            break;
        case CH_SIZE_LF:
            if (c != '\n') {
                ch->state = CH_ERR_BAD;
                goto fail;
            }
            ch->line_bytes = 0;
            if (ch->remaining == 0) {
                ch->state = CH_TR_START;
                ch->trailer_bytes = 0;
            } else {
                ch->state = CH_DATA;
            }
            break;
        case CH_DATA_CR:
            if (c != '\r') {
                ch->state = CH_ERR_BAD;
                goto fail;
            }
            ch->state = CH_DATA_LF;
            break;
        case CH_DATA_LF:
            if (c != '\n') {
                ch->state = CH_ERR_BAD;
                goto fail;
            }
            ch->state = CH_SIZE;
            ch->remaining = 0;
            ch->line_bytes = 0;
            break;
        default:
            /* trailer section */
            if (++ch->trailer_bytes > CHUNK_TRAILERS_MAX) {
                ch->state = CH_ERR_BAD;
                goto fail;
            }
            switch (ch->state) {
            case CH_TR_START:
                if (c == '\r')
                    ch->state = CH_END_LF;
                else if (cls[c] & C_TOKEN)
                    ch->state = CH_TR_NAME;
                else
                    ch->state = CH_ERR_BAD; /* includes obs-fold and empty names */
                break;
            case CH_TR_NAME:
                if (c == ':')
                    ch->state = CH_TR_VALUE;
                else if (!(cls[c] & C_TOKEN))
                    ch->state = CH_ERR_BAD;
                break;
            case CH_TR_VALUE:
                if (c == '\r')
                    ch->state = CH_TR_LF;
                else if (!(cls[c] & C_VALUE))
                    ch->state = CH_ERR_BAD;
                break;
            case CH_TR_LF:
                ch->state = c == '\n' ? CH_TR_START : CH_ERR_BAD;
                break;
            case CH_END_LF:
                if (c != '\n') {
                    ch->state = CH_ERR_BAD;
                    break;
                }
                ch->state = CH_DONE;
                *consumed = pos;
                return SL_DONE;
            default:
                ch->state = CH_ERR_BAD; /* corrupted state: fail closed */
                break;
            }
            if (ch->state == CH_ERR_BAD)
                goto fail;
            break;
        }
    }
fail:
    *consumed = pos;
    if (err)
        *err = ch->state == CH_ERR_LARGE ? SL_H1_ERR_CHUNK_TOO_LARGE : SL_H1_ERR_BAD_CHUNK;
    return SL_ERROR;
}

/* --- misc -------------------------------------------------------------------------------- */

int sl_h1_find_header(const struct sl_h1_header *headers, size_t count, struct sl_slice name)
{
    for (size_t i = 0; i < count && i < (size_t)INT_MAX; i++)
        if (sl_slice_ieq(headers[i].name, name))
            return (int)i;
    return -1;
}

static const struct {
    int status;
    const char *name;
} err_table[SL_H1_ERR_COUNT] = {
    [SL_H1_ERR_NONE] = {0, "none"},
    [SL_H1_ERR_BAD_REQUEST_LINE] = {400, "bad_request_line"},
    [SL_H1_ERR_BAD_VERSION] = {505, "bad_version"},
    [SL_H1_ERR_URI_TOO_LONG] = {414, "uri_too_long"},
    [SL_H1_ERR_HEADERS_TOO_LARGE] = {431, "headers_too_large"},
    [SL_H1_ERR_TOO_MANY_HEADERS] = {431, "too_many_headers"},
    [SL_H1_ERR_BAD_HEADER_NAME] = {400, "bad_header_name"},
    [SL_H1_ERR_BAD_HEADER_VALUE] = {400, "bad_header_value"},
    [SL_H1_ERR_OBS_FOLD] = {400, "obs_fold"},
    [SL_H1_ERR_BAD_LINE_ENDING] = {400, "bad_line_ending"},
    [SL_H1_ERR_BAD_CONTENT_LENGTH] = {400, "bad_content_length"},
    [SL_H1_ERR_CL_AND_TE] = {400, "cl_and_te"},
    [SL_H1_ERR_BAD_TRANSFER_ENCODING] = {400, "bad_transfer_encoding"},
    [SL_H1_ERR_MISSING_HOST] = {400, "missing_host"},
    [SL_H1_ERR_DUPLICATE_HOST] = {400, "duplicate_host"},
    [SL_H1_ERR_BAD_HOST] = {400, "bad_host"},
    [SL_H1_ERR_BAD_CHUNK] = {400, "bad_chunk"},
    [SL_H1_ERR_CHUNK_TOO_LARGE] = {400, "chunk_too_large"},
    [SL_H1_ERR_BAD_STATUS_LINE] = {502, "bad_status_line"},
};

int sl_h1_err_status(enum sl_h1_err err)
{
    if ((unsigned)err >= SL_H1_ERR_COUNT)
        return 400;
    return err_table[err].status;
}

const char *sl_h1_err_name(enum sl_h1_err err)
{
    if ((unsigned)err >= SL_H1_ERR_COUNT)
        return "unknown";
    return err_table[err].name;
}
