#include "obs/access_log.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <zstd.h>

#include "config/config.h"
#include "core/fmt.h"
#include "core/log.h"
#include "core/slice.h"
#include "http/request.h"

/*
 * Two halves. The worker side (sl_alog_record) sizes a binary record, copies it into the
 * worker's ring and publishes it with one release store: the whole cost a request pays.
 * The log thread does everything else: JSON, time conversion, escaping, compression, files.
 *
 * Ring: a byte ring of power-of-two capacity with free-running 64-bit head (consumer) and
 * tail (producer) positions. Records are padded to 8 bytes, so a record's length word never
 * straddles the end; the record itself may, and is then staged in a per-ring scratch area
 * and copied in two parts.
 */

/* ---- record layout --------------------------------------------------------------------- */

enum {
    S_REQUEST_ID,
    S_CLIENT,
    S_METHOD,
    S_HOST,
    S_PATH,
    S_ROUTE,
    S_CONSUMER,
    S_UPSTREAM,
    S_ENDPOINT,
    S_ERROR,
    S_FILTER,
    S_SUBJECT,
    S_COUNT
};

/* Longest kept byte count of each string; longer ones are cut (the record says so). */
static const uint16_t str_cap[S_COUNT] = {
    [S_REQUEST_ID] = 128, [S_CLIENT] = 64, [S_METHOD] = 32,    [S_HOST] = 256,
    [S_PATH] = 2048,      [S_ROUTE] = 256, [S_CONSUMER] = 256, [S_UPSTREAM] = 256,
    [S_ENDPOINT] = 256,   [S_ERROR] = 128, [S_FILTER] = 64,    [S_SUBJECT] = 512,
};
#define STR_CAP_TOTAL (128 + 64 + 32 + 256 + 2048 + 256 + 256 + 256 + 256 + 128 + 64 + 512)

#define HDR_VALUE_CAP 1024  /* one header value */
#define HDR_TOTAL_CAP 4096  /* all header values of one record */
#define HDR_ENTRIES_MAX 32  /* header occurrences kept per record */
#define CONF_HEADERS_MAX 64 /* distinct configured headers (a bit each in a uint64_t) */
#define HDR_NAME_MAX 64     /* configured header name length */

#define F_ABORTED 1u
#define F_TLS 2u
#define F_TRUNCATED 4u

/* Fixed part of a record in the ring; header entries, strings and header values follow. */
struct rec {
    uint32_t len; /* whole record including padding: always the first word */
    uint16_t status;
    uint8_t flags;
    uint8_t nhdr;
    uint32_t retries;
    uint16_t present; /* bit per string: set when it exists (an empty one is then "") */
    uint16_t pad;
    uint64_t bytes_in, bytes_out;
    uint64_t start_us, end_us, up_start_us, up_end_us;
    uint64_t cpu_ns;
    uint16_t slen[S_COUNT];
};

struct rec_hdr {
    uint16_t idx; /* into the writer's recorded-header list */
    uint16_t len;
};

#define REC_MAX                                                                                    \
    (sizeof(struct rec) + HDR_ENTRIES_MAX * sizeof(struct rec_hdr) + STR_CAP_TOTAL +               \
     HDR_TOTAL_CAP + 8)
#define RING_MIN 4096

/* Worst-case JSON of one record: every byte escaped to six, plus keys and numbers. */
#define JSON_REC_MAX (64 * 1024)
_Static_assert(6 * (STR_CAP_TOTAL + HDR_TOTAL_CAP) + HDR_ENTRIES_MAX * (6 * HDR_NAME_MAX + 8) +
                       2048 <=
                   JSON_REC_MAX,
               "JSON_REC_MAX too small for the caps");
#define JSON_BATCH (512 * 1024) /* formatted bytes compressed per flush */

#define STOP_TIMEOUT_S 5
#define ERR_LOG_INTERVAL_US (10ull * 1000 * 1000)

static const char *const always_redacted[] = {"authorization", "proxy-authorization", "cookie",
                                              "set-cookie", "x-api-key"};

/* An empty last block (last-block bit, raw, size 0): ends a zstd frame after any whole block.
 * Frames carry no content checksum, so a frame may end at any batch boundary. */
static const unsigned char end_block[3] = {1, 0, 0};

#define TMP_PREFIX ".sluice-"
#define TMP_SUFFIX ".jsonl.zst.tmp"

/* ---- the writer ------------------------------------------------------------------------ */

struct ring {
    /* the producer's line: written by the worker only (dropped is read by stats readers) */
    alignas(64) _Atomic uint64_t tail;
    uint64_t head_cache; /* last head seen, so the producer reads the consumer's line rarely */
    _Atomic uint64_t dropped;
    unsigned char *buf;
    unsigned char *scratch; /* REC_MAX bytes, for a record that wraps */
    uint64_t mask;
    /* the consumer's line */
    alignas(64) _Atomic uint64_t head;
};

struct sl_alog {
    /* fixed after sl_alog_new: what the workers read */
    struct ring *rings;
    unsigned ring_count;
    uint64_t ring_cap;
    unsigned hdr_count;
    uint8_t hdr_len[CONF_HEADERS_MAX];
    char hdr_name[CONF_HEADERS_MAX][HDR_NAME_MAX + 1]; /* lower case */

    char *dir;
    uint64_t seg_max_bytes, seg_max_age_us, flush_interval_ms;
    int pid;
    char inst[17]; /* this run's random id, 16 hex digits: in each name, beside the pid */
    bool lock_warned;
    void (*on_segment)(const char *path, void *data);
    void *on_segment_data;

    /* lifecycle (main thread), and the stop request (under mu) */
    pthread_t thread;
    bool thread_started, stopped, abandoned;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool stop_requested;

    /* the log thread's state (the caller's after a stop without a thread) */
    ZSTD_CCtx *cctx;
    char *json;
    size_t json_len;
    uint64_t batch_records;
    unsigned char *out;
    size_t out_cap;
    unsigned char *rec_buf; /* REC_MAX, 8-aligned */
    bool cycle_failed;      /* a write failed this cycle: the rest of it is dropped */
    bool io_failing;        /* since the last successful write */
    uint64_t pair_mono_us, pair_wall_us;
    int64_t tcache_sec;
    char tcache[20]; /* "YYYY-MM-DDTHH:MM:SS" of tcache_sec */
    uint64_t seq, last_name_ms;
    uint64_t err_logged_us, err_suppressed;
    bool err_logged;
    /* the open segment (fd < 0: none) */
    int fd;
    char tmp_path[PATH_MAX];
    uint64_t seg_seq, seg_wall_ms, seg_opened_us;
    uint64_t seg_good;    /* end of the frame's blocks after the last complete batch */
    uint64_t seg_pos;     /* where the compressor's next bytes go */
    uint64_t seg_counted; /* file bytes already counted in bytes_comp */
    uint64_t seg_records;

    /* counters: written by the log thread only, read by anyone */
    alignas(64) _Atomic uint64_t written, dropped_io, bytes_unc, bytes_comp, seg_closed, seg_failed;
};

static inline void count(_Atomic uint64_t *c, uint64_t n)
{
    /* single writer: a plain load and store, no locked instruction */
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + n,
                          memory_order_relaxed);
}

static uint64_t clock_us(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* ---- the worker side ------------------------------------------------------------------- */

static inline void set_cstr(struct sl_slice *s, unsigned *present, int i, const char *v)
{
    if (v) {
        s[i] = sl_slice_cstr(v);
        *present |= 1u << i;
    } else {
        s[i] = (struct sl_slice){"", 0};
    }
}

static inline void set_slice(struct sl_slice *s, unsigned *present, int i, struct sl_slice v)
{
    if (v.len && v.ptr) {
        s[i] = v;
        *present |= 1u << i;
    } else {
        s[i] = (struct sl_slice){"", 0};
    }
}

/* Index of `name` in the recorded-header list, or -1. Lengths first: most names differ. */
static inline int match_header(const struct sl_alog *a, struct sl_slice name)
{
    for (unsigned j = 0; j < a->hdr_count; j++) {
        if (a->hdr_len[j] != name.len)
            continue;
        const char *h = a->hdr_name[j];
        size_t k = 0;
        while (k < name.len && sl_ascii_lower(name.ptr[k]) == h[k])
            k++;
        if (k == name.len)
            return (int)j;
    }
    return -1;
}

static void ring_copy_in(struct ring *r, uint64_t off, const unsigned char *src, size_t n)
{
    size_t first = (size_t)(r->mask + 1 - off);
    if (first >= n) {
        memcpy(r->buf + off, src, n);
    } else {
        memcpy(r->buf + off, src, first);
        memcpy(r->buf, src + first, n - first);
    }
}

void sl_alog_record(struct sl_alog *a, unsigned worker, const struct sl_request *req)
{
    if (!a || !req || worker >= a->ring_count)
        return;
    struct ring *r = &a->rings[worker];
    const struct sl_request_log *lg = &req->log;
    struct sl_slice s[S_COUNT];
    unsigned present = 0;
    set_slice(s, &present, S_REQUEST_ID, req->request_id);
    set_slice(s, &present, S_CLIENT, req->client_ip);
    set_slice(s, &present, S_METHOD, req->method);
    set_slice(s, &present, S_HOST, req->host);
    set_slice(s, &present, S_PATH, req->path);
    set_cstr(s, &present, S_ROUTE, lg->route);
    set_slice(s, &present, S_CONSUMER, req->consumer);
    set_cstr(s, &present, S_UPSTREAM, lg->upstream);
    set_cstr(s, &present, S_ENDPOINT, lg->endpoint);
    set_cstr(s, &present, S_ERROR, lg->error);
    set_cstr(s, &present, S_FILTER, lg->filter);
    char subject[512 + 1];
    s[S_SUBJECT] = (struct sl_slice){subject, 0};
    if (req->secure) {
        /* cached by the TLS transport after the first call on a connection */
        size_t n = sl_request_client_subject(req, subject, sizeof subject);
        if (n) {
            s[S_SUBJECT].len = n;
            present |= 1u << S_SUBJECT;
        }
    }

    struct rec h;
    h.flags = 0;
    size_t total = sizeof h;
    for (int i = 0; i < S_COUNT; i++) {
        if (s[i].len > str_cap[i]) {
            s[i].len = str_cap[i];
            h.flags |= F_TRUNCATED;
        }
        h.slen[i] = (uint16_t)s[i].len;
        total += s[i].len;
    }

    struct rec_hdr ent[HDR_ENTRIES_MAX];
    const char *val[HDR_ENTRIES_MAX];
    unsigned n = 0;
    size_t hbytes = 0;
    if (a->hdr_count && req->headers) {
        for (size_t i = 0; i < req->header_count; i++) {
            int idx = match_header(a, req->headers[i].name);
            if (idx < 0)
                continue;
            if (n == HDR_ENTRIES_MAX) {
                h.flags |= F_TRUNCATED;
                break;
            }
            size_t vl = req->headers[i].value.len;
            if (vl > HDR_VALUE_CAP) {
                vl = HDR_VALUE_CAP;
                h.flags |= F_TRUNCATED;
            }
            if (vl > HDR_TOTAL_CAP - hbytes) {
                vl = HDR_TOTAL_CAP - hbytes;
                h.flags |= F_TRUNCATED;
            }
            ent[n] = (struct rec_hdr){(uint16_t)idx, (uint16_t)vl};
            val[n] = req->headers[i].value.ptr;
            hbytes += vl;
            n++;
        }
    }
    total += n * sizeof(struct rec_hdr) + hbytes;
    total = (total + 7) & ~(size_t)7;

    /* Room check against the cached head first; the consumer's line is read only when the
     * cached view says the ring is full. */
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    uint64_t cap = r->mask + 1;
    if (cap - (tail - r->head_cache) < total) {
        r->head_cache = atomic_load_explicit(&r->head, memory_order_acquire);
        if (cap - (tail - r->head_cache) < total) {
            count(&r->dropped, 1);
            return;
        }
    }

    h.len = (uint32_t)total;
    h.status = (uint16_t)(lg->status > 0 && lg->status < 65536 ? lg->status : 0);
    h.flags |= (lg->aborted ? F_ABORTED : 0) | (req->secure ? F_TLS : 0);
    h.nhdr = (uint8_t)n;
    h.retries = lg->retries;
    h.present = (uint16_t)present;
    h.pad = 0;
    h.bytes_in = lg->bytes_in;
    h.bytes_out = lg->bytes_out;
    h.start_us = lg->start_us;
    h.end_us = lg->end_us;
    h.up_start_us = lg->upstream_start_us;
    h.up_end_us = lg->upstream_end_us;
    h.cpu_ns = lg->cpu_ns;

    uint64_t off = tail & r->mask;
    bool wraps = off + total > cap;
    unsigned char *dst = wraps ? r->scratch : r->buf + off;
    unsigned char *p = dst;
    memcpy(p, &h, sizeof h);
    p += sizeof h;
    if (n) {
        memcpy(p, ent, n * sizeof ent[0]);
        p += n * sizeof ent[0];
    }
    for (int i = 0; i < S_COUNT; i++) {
        if (s[i].len)
            memcpy(p, s[i].ptr, s[i].len);
        p += s[i].len;
    }
    for (unsigned j = 0; j < n; j++) {
        if (ent[j].len)
            memcpy(p, val[j], ent[j].len);
        p += ent[j].len;
    }
    if (wraps)
        ring_copy_in(r, off, r->scratch, total);
    atomic_store_explicit(&r->tail, tail + total, memory_order_release);
}

/* ---- JSON (log thread) ----------------------------------------------------------------- */

#define LIT(o, s) (memcpy((o), (s), sizeof(s) - 1), (o) + sizeof(s) - 1)

static char *esc_byte(char *o, unsigned c)
{
    static const char hex[] = "0123456789abcdef";
    o = LIT(o, "\\u00");
    *o++ = hex[c >> 4];
    *o++ = hex[c & 15];
    return o;
}

/* 1 for the bytes that cannot be copied into a JSON string as they are: controls, quote,
 * backslash, DEL, and every non-ASCII byte (those go through UTF-8 validation). */
static const uint8_t needs_care[256] = {
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
};

#define ONES 0x0101010101010101ull
#define HIGHS 0x8080808080808080ull
#define HAS_ZERO(v) (((v)-ONES) & ~(v)&HIGHS)

/* True when one of the 8 bytes of `w` is a control byte, '"', '\\', DEL or non-ASCII. */
static inline bool word_needs_care(uint64_t w)
{
    uint64_t ctl = (w - 0x20 * ONES) & ~w & HIGHS; /* below 0x20, or borrowed through */
    return (ctl | (w & HIGHS) | HAS_ZERO(w ^ ('"' * ONES)) | HAS_ZERO(w ^ ('\\' * ONES)) |
            HAS_ZERO(w ^ (0x7f * ONES))) != 0;
}

/*
 * Escapes for a JSON string: quote, backslash and control bytes escaped, valid UTF-8 kept,
 * and each byte of an invalid sequence written as \u00XX (the code point of that byte's
 * value), so the original bytes can still be told apart. At most 6 output bytes per input.
 */
static char *esc(char *o, const char *src, size_t n)
{
    const unsigned char *s = (const unsigned char *)src;
    size_t i = 0;
    while (i < n) {
        /* eight plain bytes at a time (request ids, paths): copied with one store */
        while (n - i >= 8) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (word_needs_care(w))
                break;
            memcpy(o, &w, 8);
            o += 8;
            i += 8;
        }
        if (i == n)
            break;
        unsigned c = s[i];
        if (!needs_care[c]) { /* one table load per byte */
            *o++ = (char)c;
            i++;
            continue;
        }
        if (c < 0x80) {
            switch (c) {
            case '"':
                o = LIT(o, "\\\"");
                break;
            case '\\':
                o = LIT(o, "\\\\");
                break;
            case '\n':
                o = LIT(o, "\\n");
                break;
            case '\r':
                o = LIT(o, "\\r");
                break;
            case '\t':
                o = LIT(o, "\\t");
                break;
            default:
                o = esc_byte(o, c);
            }
            i++;
            continue;
        }
        size_t k = sl_utf8_seq_len(s + i, n - i);
        if (k) {
            memcpy(o, s + i, k);
            o += k;
            i += k;
        } else {
            o = esc_byte(o, c);
            i++;
        }
    }
    return o;
}

static char *put_str(char *o, const char *s, size_t n)
{
    *o++ = '"';
    o = esc(o, s, n);
    *o++ = '"';
    return o;
}

static char *put_opt(char *o, bool present, const char *s, size_t n)
{
    return present ? put_str(o, s, n) : LIT(o, "null");
}

static char *put_u64(char *o, uint64_t v)
{
    return o + sl_fmt_u64(o, v);
}

/* v thousandths as "int.ddd" (microseconds as milliseconds, nanoseconds as microseconds) */
static char *put_milli(char *o, uint64_t v)
{
    o = put_u64(o, v / 1000);
    unsigned f = (unsigned)(v % 1000);
    *o++ = '.';
    *o++ = (char)('0' + f / 100);
    *o++ = (char)('0' + f / 10 % 10);
    *o++ = (char)('0' + f % 10);
    return o;
}

static char *put_pad(char *o, unsigned v, int width)
{
    for (int i = width - 1; i >= 0; i--) {
        o[i] = (char)('0' + v % 10);
        v /= 10;
    }
    return o + width;
}

/* "YYYY-MM-DDTHH:MM:SS" (sep true) or "YYYYMMDDTHHMMSS" */
static char *put_civil(char *o, time_t sec, bool sep)
{
    struct tm tm;
    if (!gmtime_r(&sec, &tm))
        memset(&tm, 0, sizeof tm);
    unsigned year = (unsigned)(tm.tm_year + 1900) % 10000;
    o = put_pad(o, year, 4);
    if (sep)
        *o++ = '-';
    o = put_pad(o, (unsigned)tm.tm_mon + 1, 2);
    if (sep)
        *o++ = '-';
    o = put_pad(o, (unsigned)tm.tm_mday, 2);
    *o++ = 'T';
    o = put_pad(o, (unsigned)tm.tm_hour, 2);
    if (sep)
        *o++ = ':';
    o = put_pad(o, (unsigned)tm.tm_min, 2);
    if (sep)
        *o++ = ':';
    return put_pad(o, (unsigned)tm.tm_sec, 2);
}

/* Wall-clock microseconds of a loop-clock reading, through this cycle's (mono, wall) pair. */
static uint64_t wall_of(const struct sl_alog *a, uint64_t mono_us)
{
    if (mono_us == 0)
        return a->pair_wall_us;
    if (mono_us <= a->pair_mono_us)
        return a->pair_wall_us - (a->pair_mono_us - mono_us);
    return a->pair_wall_us + (mono_us - a->pair_mono_us);
}

static char *put_time(struct sl_alog *a, char *o, uint64_t wall_us)
{
    uint64_t ms = wall_us / 1000;
    int64_t sec = (int64_t)(ms / 1000);
    if (sec != a->tcache_sec) {
        put_civil(a->tcache, (time_t)sec, true);
        a->tcache_sec = sec;
    }
    memcpy(o, a->tcache, 19);
    o += 19;
    *o++ = '.';
    o = put_pad(o, (unsigned)(ms % 1000), 3);
    *o++ = 'Z';
    return o;
}

/* Formats the record in a->rec_buf as one JSON line at `o`; returns the end. */
static char *format_record(struct sl_alog *a, char *o)
{
    struct rec h;
    memcpy(&h, a->rec_buf, sizeof h);
    struct rec_hdr ent[HDR_ENTRIES_MAX];
    unsigned n = h.nhdr <= HDR_ENTRIES_MAX ? h.nhdr : HDR_ENTRIES_MAX;
    const char *p = (const char *)a->rec_buf + sizeof h;
    memcpy(ent, p, n * sizeof ent[0]);
    p += h.nhdr * sizeof ent[0];
    const char *str[S_COUNT];
    for (int i = 0; i < S_COUNT; i++) {
        str[i] = p;
        p += h.slen[i];
    }
#define HAS(i) ((h.present >> (i)) & 1u)
#define STR(i) str[i], h.slen[i]

    o = LIT(o, "{\"time\":\"");
    o = put_time(a, o, wall_of(a, h.start_us));
    o = LIT(o, "\",\"request_id\":");
    o = put_str(o, STR(S_REQUEST_ID));
    o = LIT(o, ",\"client\":");
    o = put_str(o, STR(S_CLIENT));
    o = LIT(o, ",\"method\":");
    o = put_str(o, STR(S_METHOD));
    o = LIT(o, ",\"host\":");
    o = put_str(o, STR(S_HOST));
    o = LIT(o, ",\"path\":");
    o = put_str(o, STR(S_PATH));
    o = LIT(o, ",\"status\":");
    o = put_u64(o, h.status);
    o = LIT(o, ",\"bytes_in\":");
    o = put_u64(o, h.bytes_in);
    o = LIT(o, ",\"bytes_out\":");
    o = put_u64(o, h.bytes_out);
    o = LIT(o, ",\"route\":");
    o = put_opt(o, HAS(S_ROUTE), STR(S_ROUTE));
    o = LIT(o, ",\"consumer\":");
    o = put_opt(o, HAS(S_CONSUMER), STR(S_CONSUMER));
    o = LIT(o, ",\"upstream\":");
    o = put_opt(o, HAS(S_UPSTREAM), STR(S_UPSTREAM));
    o = LIT(o, ",\"endpoint\":");
    o = put_opt(o, HAS(S_ENDPOINT), STR(S_ENDPOINT));
    o = LIT(o, ",\"upstream_ms\":");
    if (h.up_start_us && h.up_end_us >= h.up_start_us)
        o = put_milli(o, h.up_end_us - h.up_start_us);
    else
        o = LIT(o, "null");
    o = LIT(o, ",\"total_ms\":");
    o = put_milli(o, h.end_us >= h.start_us ? h.end_us - h.start_us : 0);
    o = LIT(o, ",\"retries\":");
    o = put_u64(o, h.retries);
    o = LIT(o, ",\"error\":");
    o = put_opt(o, HAS(S_ERROR), STR(S_ERROR));
    if (HAS(S_FILTER)) {
        o = LIT(o, ",\"filter\":");
        o = put_str(o, STR(S_FILTER));
    }
    o = LIT(o, ",\"cpu_us\":");
    o = put_milli(o, h.cpu_ns);
    o = (h.flags & F_TLS) ? LIT(o, ",\"tls\":true") : LIT(o, ",\"tls\":false");
    if (HAS(S_SUBJECT)) {
        o = LIT(o, ",\"client_subject\":");
        o = put_str(o, STR(S_SUBJECT));
    }
    if (h.flags & F_ABORTED)
        o = LIT(o, ",\"aborted\":true");
    if (h.flags & F_TRUNCATED)
        o = LIT(o, ",\"truncated\":true");
    if (a->hdr_count) {
        const char *val[HDR_ENTRIES_MAX];
        for (unsigned j = 0; j < n; j++) {
            val[j] = p;
            p += ent[j].len;
        }
        o = LIT(o, ",\"headers\":{");
        uint64_t done = 0;
        bool first = true;
        /* repeated headers become one key, values joined with ", " as HTTP allows */
        for (unsigned j = 0; j < n; j++) {
            unsigned idx = ent[j].idx;
            if (idx >= a->hdr_count || (done >> idx) & 1u)
                continue;
            done |= 1ull << idx;
            if (!first)
                *o++ = ',';
            first = false;
            o = put_str(o, a->hdr_name[idx], a->hdr_len[idx]);
            o = LIT(o, ":\"");
            o = esc(o, val[j], ent[j].len);
            for (unsigned k = j + 1; k < n; k++) {
                if (ent[k].idx != idx)
                    continue;
                o = LIT(o, ", ");
                o = esc(o, val[k], ent[k].len);
            }
            *o++ = '"';
        }
        *o++ = '}';
    }
#undef HAS
#undef STR
    return LIT(o, "}\n");
}

/* ---- files (log thread) ---------------------------------------------------------------- */

static int mkdir_p(const char *dir)
{
    char path[PATH_MAX];
    size_t len = strlen(dir);
    if (len == 0 || len >= sizeof path)
        return -ENAMETOOLONG;
    memcpy(path, dir, len + 1);
    for (size_t i = 1; i <= len; i++) {
        if (path[i] != '/' && path[i] != 0)
            continue;
        char saved = path[i];
        path[i] = 0;
        if (mkdir(path, 0750) < 0 && errno != EEXIST)
            return -errno;
        path[i] = saved;
    }
    return 0;
}

static int pwrite_all(int fd, const void *buf, size_t len, uint64_t at)
{
    const char *p = buf;
    while (len) {
        ssize_t n = pwrite(fd, p, len, (off_t)at);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        p += n;
        len -= (size_t)n;
        at += (uint64_t)n;
    }
    return 0;
}

/* Logs a write failure at most once per ERR_LOG_INTERVAL_US, with how many were not logged. */
static void log_io_error(struct sl_alog *a, const char *what, const char *path, int rc)
{
    uint64_t now = clock_us(CLOCK_MONOTONIC);
    a->io_failing = true;
    if (a->err_logged && now - a->err_logged_us < ERR_LOG_INTERVAL_US) {
        a->err_suppressed++;
        return;
    }
    SL_ERR("access log: %s %s: %s; records are dropped and counted until writes succeed "
           "(%" PRIu64 " more errors since the last message, %" PRIu64 " records dropped)",
           what, path, strerror(-rc), a->err_suppressed,
           atomic_load_explicit(&a->dropped_io, memory_order_relaxed));
    a->err_logged = true;
    a->err_logged_us = now;
    a->err_suppressed = 0;
}

/* The file grew to `size`: count what was not counted yet. */
static void account(struct sl_alog *a, uint64_t size)
{
    if (size > a->seg_counted) {
        count(&a->bytes_comp, size - a->seg_counted);
        a->seg_counted = size;
    }
}

static void seg_reset(struct sl_alog *a)
{
    a->fd = -1;
    a->seg_pos = a->seg_good = a->seg_records = a->seg_counted = 0;
    a->tmp_path[0] = 0;
}

/* Removes and closes the open segment; its records, already flushed to it, are lost. The
 * name goes first: closing drops the lock, and recovery must not find it unlocked. */
static void seg_discard(struct sl_alog *a)
{
    if (a->tmp_path[0])
        unlink(a->tmp_path);
    if (a->fd >= 0)
        close(a->fd);
    count(&a->dropped_io, a->seg_records);
    count(&a->seg_failed, 1);
    seg_reset(a);
}

/*
 * A write lock on the whole segment, held from its creation until it has its final name: it
 * is what tells recovery (in this process or any other sharing the directory, whatever its pid
 * namespace) that a writer is alive; the kernel drops it when the writer dies. An open file
 * description lock, so that no other open and close of the file in this process releases it;
 * flock (also per open file) where the kernel has none. 0, -EAGAIN when someone else holds
 * it, or -errno.
 */
static int lock_segment(int fd)
{
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    if (fcntl(fd, F_OFD_SETLK, &fl) == 0)
        return 0;
    int e = errno;
    if (e == EINVAL) { /* Linux before 3.15 */
        if (flock(fd, LOCK_EX | LOCK_NB) == 0)
            return 0;
        e = errno;
    }
    return e == EAGAIN || e == EACCES || e == EWOULDBLOCK ? -EAGAIN : -e;
}

/* True when `name` in `dfd` is still the file open as `fd`. */
static bool names_file(int dfd, const char *name, int fd)
{
    struct stat by_fd, by_name;
    return fstat(fd, &by_fd) == 0 && fstatat(dfd, name, &by_name, AT_SYMLINK_NOFOLLOW) == 0 &&
           by_fd.st_dev == by_name.st_dev && by_fd.st_ino == by_name.st_ino;
}

static int seg_open(struct sl_alog *a)
{
    bool recreated = false;
    for (int tries = 0; tries < 100; tries++) {
        uint64_t seq = ++a->seq;
        snprintf(a->tmp_path, sizeof a->tmp_path, "%s/" TMP_PREFIX "%d-%s-%06" PRIu64 TMP_SUFFIX,
                 a->dir, a->pid, a->inst, seq);
        int fd = open(a->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
        if (fd < 0 && errno == ENOENT && !recreated) {
            /* the directory was removed under us: make it again, once per attempt */
            recreated = true;
            if (mkdir_p(a->dir) == 0)
                fd = open(a->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
        }
        if (fd < 0) {
            if (errno == EEXIST)
                continue; /* never overwrite, however unlikely with this run's id */
            int rc = -errno;
            a->tmp_path[0] = 0;
            return rc;
        }
        /* A recovery elsewhere may have opened the new, empty file before it was locked: it
         * then holds the lock, or has removed the name already. Leave that name to it. */
        int rc = lock_segment(fd);
        if (rc == 0 && !names_file(AT_FDCWD, a->tmp_path, fd))
            rc = -EAGAIN;
        if (rc == -EAGAIN) {
            close(fd);
            continue;
        }
        if (rc < 0 && !a->lock_warned) {
            /* No locks on this file system: write anyway. Recovery leaves alone what it cannot
             * lock, so it cannot take this segment over either. */
            a->lock_warned = true;
            SL_WARN("access log: cannot lock %s: %s; writing anyway (leftovers of a crash in "
                    "this directory will not be recovered)",
                    a->tmp_path, strerror(-rc));
        }
        a->fd = fd;
        a->seg_seq = seq;
        a->seg_pos = a->seg_good = a->seg_records = a->seg_counted = 0;
        a->seg_opened_us = clock_us(CLOCK_MONOTONIC);
        /* names sort by time: never go back, even when the wall clock steps back */
        uint64_t ms = clock_us(CLOCK_REALTIME) / 1000;
        if (ms < a->last_name_ms)
            ms = a->last_name_ms;
        a->seg_wall_ms = a->last_name_ms = ms;
        ZSTD_CCtx_reset(a->cctx, ZSTD_reset_session_only);
        return 0;
    }
    a->tmp_path[0] = 0;
    return -EEXIST;
}

/* Compresses `src` (with `mode`) and writes the output at seg_pos, advancing it. */
static int compress_write(struct sl_alog *a, const void *src, size_t len, ZSTD_EndDirective mode)
{
    ZSTD_inBuffer in = {src, len, 0};
    for (;;) {
        ZSTD_outBuffer out = {a->out, a->out_cap, 0};
        size_t left = ZSTD_compressStream2(a->cctx, &out, &in, mode);
        if (ZSTD_isError(left)) {
            SL_ERR("access log: zstd: %s", ZSTD_getErrorName(left));
            return -EIO;
        }
        if (out.pos) {
            int rc = pwrite_all(a->fd, a->out, out.pos, a->seg_pos);
            if (rc < 0)
                return rc;
            a->seg_pos += out.pos;
        }
        if (left == 0 && in.pos == in.size)
            return 0;
    }
}

/* `dir`/sluice-<YYYYMMDDTHHMMSS.mmm>Z-<pid>-<instance>-<seq>.jsonl.zst */
static void final_name(char *out, size_t cap, const char *dir, uint64_t wall_ms, long pid,
                       const char *inst, uint64_t seq)
{
    char stamp[16];
    *put_civil(stamp, (time_t)(wall_ms / 1000), false) = 0;
    snprintf(out, cap, "%s/sluice-%s.%03uZ-%ld-%s-%06" PRIu64 ".jsonl.zst", dir, stamp,
             (unsigned)(wall_ms % 1000), pid, inst, seq);
}

/* Renames without ever replacing a segment (several processes may share the directory).
 * 0, -EEXIST when `to` exists, or -errno. */
static int rename_new(const char *from, const char *to)
{
    if (renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE) == 0)
        return 0;
    /* EINVAL: the file system cannot promise it; ENOSYS: an old kernel; EPERM: a seccomp
     * profile (some container runtimes) refusing the call. A hard link cannot replace either. */
    if (errno != EINVAL && errno != ENOSYS && errno != EPERM)
        return -errno;
    if (link(from, to) == 0) {
        if (unlink(from) == 0)
            return 0;
        int e = errno;
        unlink(to); /* keep one name: the temporary one, which recovery knows */
        return -e;
    }
    if (errno != EPERM && errno != EOPNOTSUPP && errno != ENOSYS)
        return -errno;
    /* No hard links here either (FAT, some FUSE): check, then rename. The window between the
     * two cannot be closed, but names carry their writer's random instance id, so no other
     * writer aims at the same one. */
    if (access(to, F_OK) == 0)
        return -EEXIST;
    return rename(from, to) == 0 ? 0 : -errno;
}

/* fsync, close, rename to the final name, then the hook. The segment's records count as
 * written only here, so a segment lost at this point moves them to dropped_io instead. */
static void seg_finish(struct sl_alog *a)
{
    if (fsync(a->fd) < 0) {
        log_io_error(a, "syncing", a->tmp_path, -errno);
        seg_discard(a);
        return;
    }
    /* renamed while still open, so locked: recovery never finds the temporary name unlocked */
    char final[PATH_MAX];
    int rc = -EEXIST;
    for (int tries = 0; tries < 100 && rc == -EEXIST; tries++) {
        final_name(final, sizeof final, a->dir, a->seg_wall_ms, a->pid, a->inst, a->seg_seq);
        rc = rename_new(a->tmp_path, final);
        if (rc == -EEXIST)
            a->seg_seq = ++a->seq;
    }
    if (rc < 0) {
        log_io_error(a, "renaming", a->tmp_path, rc);
        seg_discard(a);
        return;
    }
    close(a->fd);
    a->fd = -1;
    int dfd = open(a->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd); /* the rename itself; the data is already synced */
        close(dfd);
    }
    count(&a->written, a->seg_records);
    count(&a->seg_closed, 1);
    seg_reset(a);
    if (a->on_segment)
        a->on_segment(final, a->on_segment_data);
}

/*
 * After a failed write: close the segment with the batches it held before. The file is
 * [frame up to seg_good][end block] before each batch, and the batch's bytes overwrote the
 * end block and went on from there; cutting the file at seg_good + 3 and writing the end
 * block back at seg_good restores it. Both stay inside space the file already had, so this
 * works on a full disk (or at a file-size limit) as well.
 */
static void seg_salvage(struct sl_alog *a)
{
    ZSTD_CCtx_reset(a->cctx, ZSTD_reset_session_only);
    if (a->seg_records == 0) {
        seg_discard(a);
        return;
    }
    if (ftruncate(a->fd, (off_t)(a->seg_good + sizeof end_block)) < 0 ||
        pwrite_all(a->fd, end_block, sizeof end_block, a->seg_good) < 0) {
        seg_discard(a);
        return;
    }
    seg_finish(a);
}

static void io_failed(struct sl_alog *a, const char *what, int rc, uint64_t records)
{
    count(&a->dropped_io, records);
    a->cycle_failed = true;
    log_io_error(a, what, a->tmp_path[0] ? a->tmp_path : a->dir, rc);
    if (a->fd >= 0)
        seg_salvage(a);
}

/* Ends the frame for real (the compressor's own last block replaces the end block). */
static void seg_close(struct sl_alog *a)
{
    a->seg_pos = a->seg_good;
    int rc = compress_write(a, NULL, 0, ZSTD_e_end);
    if (rc == 0 && ftruncate(a->fd, (off_t)a->seg_pos) < 0)
        rc = -errno;
    if (rc < 0) {
        log_io_error(a, "ending", a->tmp_path, rc);
        seg_salvage(a);
        return;
    }
    account(a, a->seg_pos);
    seg_finish(a);
}

/*
 * Compresses and writes the formatted batch, ending with a flush so it is on disk promptly,
 * then an empty last block, so the file on disk is a complete zstd frame after every batch:
 * readable while open, recoverable after a crash, and cut back to it after a failed write.
 * The next batch overwrites that end block. Rotates by size.
 */
static void flush_batch(struct sl_alog *a)
{
    if (!a->batch_records)
        return;
    uint64_t records = a->batch_records;
    size_t len = a->json_len;
    a->batch_records = 0;
    a->json_len = 0;
    int rc = a->fd >= 0 ? 0 : seg_open(a);
    if (rc < 0) {
        io_failed(a, "creating a segment in", rc, records);
        return;
    }
    a->seg_pos = a->seg_good;
    rc = compress_write(a, a->json, len, ZSTD_e_flush);
    if (rc == 0)
        rc = pwrite_all(a->fd, end_block, sizeof end_block, a->seg_pos);
    if (rc < 0) {
        io_failed(a, "writing", rc, records);
        return;
    }
    if (a->io_failing) {
        SL_WARN("access log: segments are written again (%" PRIu64 " records dropped so far)",
                atomic_load_explicit(&a->dropped_io, memory_order_relaxed));
        a->io_failing = false;
    }
    a->seg_good = a->seg_pos;
    account(a, a->seg_good + sizeof end_block);
    count(&a->bytes_unc, len);
    a->seg_records += records;
    if (a->seg_good >= a->seg_max_bytes)
        seg_close(a);
}

/*
 * Length of the longest prefix of `p` that is a zstd frame header plus whole blocks whose
 * text ends with a line feed, and whether a last block closed the frame there (*ended); 0
 * when there is none. A writer that died between two writes of one batch leaves whole blocks
 * of that batch, and blocks end every 128 KiB of text, mid-line: so each block is
 * decompressed (with `dctx`, into `buf`) to see where the text stands after it. Frames
 * written here declare no content size and no checksum; a file that does not start the way
 * they do (another magic number, a header with those flags) is not ours to cut: 0 with
 * *foreign set. RFC 8878 section 3.1.1.
 */
static size_t whole_lines(ZSTD_DCtx *dctx, unsigned char *buf, size_t buf_cap,
                          const unsigned char *p, size_t n, bool *ended, bool *foreign)
{
    static const unsigned char magic[4] = {0x28, 0xb5, 0x2f, 0xfd};
    _Static_assert(ZSTD_MAGICNUMBER == 0xFD2FB528, "magic bytes, little-endian");
    *ended = false;
    *foreign = memcmp(p, magic, n < 4 ? n : 4) != 0;
    if (*foreign || n < 6)
        return 0; /* not ours, or a torn start of ours */
    unsigned desc = p[4];
    bool single = desc & 0x20;
    if ((desc >> 6) != 0 || single || (desc & 0x08) || (desc & 0x04)) {
        *foreign = true; /* content size, single segment, reserved bit, checksum */
        return 0;
    }
    static const size_t did_size[4] = {0, 1, 2, 4};
    size_t off = 4 + 1 + 1 + did_size[desc & 3], good = 0;
    bool at_line_end = false; /* the text so far ends with '\n' */
    ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only);
    ZSTD_inBuffer in = {p, 0, 0};
    while (off <= n && n - off >= 3) {
        uint32_t bh = (uint32_t)p[off] | (uint32_t)p[off + 1] << 8 | (uint32_t)p[off + 2] << 16;
        unsigned type = (bh >> 1) & 3;
        size_t size = bh >> 3;
        size_t payload = type == 1 ? 1 : size; /* RLE: one byte repeated `size` times */
        if (type == 3 || size > ZSTD_BLOCKSIZE_MAX || n - off - 3 < payload)
            break; /* garbage or cut short: the frame ends at the previous block */
        off += 3 + payload;
        in.size = off; /* this block, and all its text out */
        for (;;) {
            ZSTD_outBuffer out = {buf, buf_cap, 0};
            size_t r = ZSTD_decompressStream(dctx, &out, &in);
            if (ZSTD_isError(r))
                return good; /* a block that does not decode: cut before it */
            if (out.pos)
                at_line_end = buf[out.pos - 1] == '\n';
            if (in.pos == in.size && out.pos < out.size)
                break;
        }
        if (at_line_end)
            good = off;
        if (bh & 1) {
            *ended = at_line_end;
            break;
        }
    }
    return good;
}

/* What recovery made of one temporary file. */
enum recovery {
    RECOVERED, /* ended and renamed: its final name is in `final` */
    REMOVED,   /* held no whole block */
    FOREIGN,   /* does not start as our frames do, or is no regular file: left as it is */
    LIVE,      /* locked: its writer is alive */
    GONE,      /* renamed or removed by its writer or another recovery meanwhile */
};

/* Makes a temporary segment whose writer died a complete one: cut after its last whole block
 * that ends a line (whole_lines) and end the frame there. An enum recovery, or -errno on an
 * I/O error (left as it is). a->out is the decompressed text's scratch space. */
static int recover_one(struct sl_alog *a, ZSTD_DCtx *dctx, int dfd, const char *name, long pid,
                       const char *inst, uint64_t seq, char *final, size_t cap)
{
    int fd = openat(dfd, name, O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0)
        return errno == ENOENT ? GONE : errno == ELOOP ? FOREIGN : -errno;
    int rc = lock_segment(fd);
    if (rc < 0) {
        close(fd);
        return rc == -EAGAIN ? LIVE : rc;
    }
    /* Locked; but its writer may have renamed it (and let go) after we opened it. */
    if (!names_file(dfd, name, fd)) {
        rc = GONE;
        goto out;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        rc = -errno;
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = FOREIGN;
        goto out;
    }
    size_t n = (size_t)st.st_size, good = 0;
    bool ended = false, foreign = false;
    if (n > 0) {
        void *m = mmap(NULL, n, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            rc = -errno;
            goto out;
        }
        good = whole_lines(dctx, a->out, a->out_cap, m, n, &ended, &foreign);
        munmap(m, n);
    }
    if (foreign) {
        rc = FOREIGN;
        goto out;
    }
    if (good == 0) {
        rc = unlinkat(dfd, name, 0) == 0 ? REMOVED : -errno;
        goto out;
    }
    if (!ended) {
        if (ftruncate(fd, (off_t)(good + sizeof end_block)) < 0) {
            rc = -errno;
            goto out;
        }
        if ((rc = pwrite_all(fd, end_block, sizeof end_block, good)) < 0)
            goto out;
    } else if (good < n && ftruncate(fd, (off_t)good) < 0) {
        rc = -errno;
        goto out;
    }
    if (fsync(fd) < 0) {
        rc = -errno;
        goto out;
    }
    /* named by its last write: later than anything its writer closed, earlier than ours */
    uint64_t ms = (uint64_t)st.st_mtim.tv_sec * 1000 + (uint64_t)st.st_mtim.tv_nsec / 1000000;
    char from[PATH_MAX];
    snprintf(from, sizeof from, "%s/%s", a->dir, name);
    rc = -EEXIST;
    for (unsigned k = 0; k < 100 && rc == -EEXIST; k++) {
        final_name(final, cap, a->dir, ms, pid, inst, seq + k * 1000000);
        rc = rename_new(from, final);
    }
    if (rc == 0) {
        fsync(dfd); /* the rename, before the segment is handed on as closed */
        rc = RECOVERED;
    }
out:
    close(fd); /* only now: the lock covers the rename */
    return rc;
}

/*
 * Parses a temporary name, ".sluice-<pid>-<instance>-<seq>.jsonl.zst.tmp" (or, from versions
 * without instance ids, ".sluice-<pid>-<seq>.jsonl.zst.tmp": the instance is then zeros). False
 * for any other name.
 */
static bool parse_tmp_name(const char *name, long *pid, char inst[17], uint64_t *seq)
{
    size_t plen = strlen(TMP_PREFIX), slen = strlen(TMP_SUFFIX), len = strlen(name);
    if (len < plen + slen || strncmp(name, TMP_PREFIX, plen) != 0 ||
        strcmp(name + len - slen, TMP_SUFFIX) != 0)
        return false;
    const char *p = name + plen;
    char *end;
    errno = 0;
    *pid = strtol(p, &end, 10);
    if (end == p || *end != '-' || errno)
        *pid = 0;
    memcpy(inst, "0000000000000000", 17);
    *seq = 0;
    if (*end == '-') {
        const char *q = end + 1;
        if (strspn(q, "0123456789abcdef") == 16 && q[16] == '-') {
            memcpy(inst, q, 16);
            q += 17;
        }
        *seq = strtoull(q, NULL, 10);
    }
    return true;
}

/*
 * Temporary segments in the directory whose writer is gone: each batch left a complete frame
 * on disk, so a crash loses at most the batch being written. A writer holds a lock on its
 * segment for as long as it writes it, so "gone" is "unlocked": pids say nothing here, as
 * processes in other pid namespaces (containers sharing a volume) look dead or have ours.
 * Each is cut back to its last whole block that ends a line, ended and renamed (then handed to
 * the hook like any closed segment); one with no such block is removed. Runs on the log thread
 * before its first pass.
 */
static void recover_leftovers(struct sl_alog *a)
{
    DIR *d = opendir(a->dir);
    if (!d)
        return;
    unsigned recovered = 0, removed = 0;
    ZSTD_DCtx *dctx = NULL;
    struct dirent *e;
    char final[PATH_MAX];
    while ((e = readdir(d)) != NULL) {
        const char *name = e->d_name;
        long pid;
        char inst[17];
        uint64_t seq;
        if (!parse_tmp_name(name, &pid, inst, &seq))
            continue;
        if (!dctx && !(dctx = ZSTD_createDCtx())) {
            SL_WARN("access log: out of memory finishing %s/%s; left as it is", a->dir, name);
            continue;
        }
        int rc = recover_one(a, dctx, dirfd(d), name, pid, inst, seq, final, sizeof final);
        if (rc == RECOVERED) {
            recovered++;
            if (a->on_segment)
                a->on_segment(final, a->on_segment_data);
        } else if (rc == REMOVED) {
            removed++;
        } else if (rc == FOREIGN) {
            SL_WARN("access log: %s/%s is not a segment this version writes (its header differs "
                    "or it is no regular file); left as it is",
                    a->dir, name);
        } else if (rc < 0) {
            SL_WARN("access log: cannot finish %s/%s left by a stopped process: %s", a->dir, name,
                    strerror(-rc));
        }
    }
    closedir(d);
    ZSTD_freeDCtx(dctx);
    if (recovered || removed)
        SL_WARN("access log: %u unfinished segment%s left by a stopped process finished and "
                "renamed, %u with no whole block removed",
                recovered, recovered == 1 ? "" : "s", removed);
}

/* ---- the log thread -------------------------------------------------------------------- */

static void take_record(struct sl_alog *a)
{
    if (!a->cycle_failed && JSON_BATCH - a->json_len < JSON_REC_MAX)
        flush_batch(a);
    if (a->cycle_failed) {
        count(&a->dropped_io, 1);
        return;
    }
    a->json_len = (size_t)(format_record(a, a->json + a->json_len) - a->json);
    a->batch_records++;
}

/* Takes every record published so far; returns how many bytes the ring held. */
static uint64_t drain_ring(struct sl_alog *a, struct ring *r)
{
    uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
    uint64_t fill = tail - head;
    unsigned since = 0;
    while (head != tail) {
        uint64_t off = head & r->mask;
        uint32_t len;
        memcpy(&len, r->buf + off, sizeof len);
        if (len < sizeof(struct rec) || len > REC_MAX || len > tail - head || (len & 7)) {
            SL_ERR("access log: corrupt record in ring (length %" PRIu32 "); ring reset", len);
            head = tail;
            break;
        }
        size_t first = (size_t)(r->mask + 1 - off);
        if (first >= len) {
            memcpy(a->rec_buf, r->buf + off, len);
        } else {
            memcpy(a->rec_buf, r->buf + off, first);
            memcpy(a->rec_buf + first, r->buf, len - first);
        }
        head += len;
        if (++since == 64) { /* give the producer room while the rest is formatted */
            atomic_store_explicit(&r->head, head, memory_order_release);
            since = 0;
        }
        take_record(a);
    }
    atomic_store_explicit(&r->head, head, memory_order_release);
    return fill;
}

/* One pass: drain, write, rotate by age (or close, when `final`). Returns true when a ring
 * was over a quarter full, so the next pass should come sooner. */
static bool run_cycle(struct sl_alog *a, bool final)
{
    a->pair_mono_us = clock_us(CLOCK_MONOTONIC);
    a->pair_wall_us = clock_us(CLOCK_REALTIME);
    a->cycle_failed = false;
    uint64_t max_fill = 0;
    for (unsigned i = 0; i < a->ring_count; i++) {
        uint64_t fill = drain_ring(a, &a->rings[i]);
        if (fill > max_fill)
            max_fill = fill;
    }
    flush_batch(a);
    if (a->fd >= 0 && (final || clock_us(CLOCK_MONOTONIC) - a->seg_opened_us >= a->seg_max_age_us))
        seg_close(a);
    return max_fill > a->ring_cap / 4;
}

static void *thread_main(void *arg)
{
    struct sl_alog *a = arg;
    recover_leftovers(a);
    pthread_mutex_lock(&a->mu);
    while (!a->stop_requested) {
        pthread_mutex_unlock(&a->mu);
        bool busy = run_cycle(a, false);
        /* The workers never signal: under heavy load the thread just comes back sooner. */
        uint64_t wait_ms = busy ? a->flush_interval_ms / 8 : a->flush_interval_ms;
        if (wait_ms == 0)
            wait_ms = 1;
        struct timespec dl;
        clock_gettime(CLOCK_MONOTONIC, &dl);
        dl.tv_sec += (time_t)(wait_ms / 1000);
        dl.tv_nsec += (long)(wait_ms % 1000) * 1000000L;
        if (dl.tv_nsec >= 1000000000L) {
            dl.tv_sec++;
            dl.tv_nsec -= 1000000000L;
        }
        pthread_mutex_lock(&a->mu);
        while (!a->stop_requested && pthread_cond_timedwait(&a->cond, &a->mu, &dl) == 0) {
        }
    }
    pthread_mutex_unlock(&a->mu);
    run_cycle(a, true);
    return NULL;
}

/* ---- set-up and lifecycle -------------------------------------------------------------- */

static bool is_redacted(const struct sl_access_log_conf *conf, const char *name)
{
    struct sl_slice n = sl_slice_cstr(name);
    for (size_t i = 0; i < sizeof always_redacted / sizeof always_redacted[0]; i++)
        if (sl_slice_ieq_cstr(n, always_redacted[i]))
            return true;
    for (size_t i = 0; i < conf->redact_header_count; i++)
        if (conf->redact_headers && conf->redact_headers[i] &&
            sl_slice_ieq_cstr(n, conf->redact_headers[i]))
            return true;
    return false;
}

static void add_headers(struct sl_alog *a, const struct sl_access_log_conf *conf)
{
    for (size_t i = 0; i < conf->header_count; i++) {
        const char *name = conf->headers ? conf->headers[i] : NULL;
        if (!name || !*name)
            continue;
        size_t len = strlen(name);
        if (is_redacted(conf, name)) {
            SL_WARN("access_log.headers: %s is redacted; it is not recorded", name);
            continue;
        }
        if (len > HDR_NAME_MAX) {
            SL_WARN("access_log.headers: %.64s...: names past %d bytes are not recorded", name,
                    HDR_NAME_MAX);
            continue;
        }
        if (match_header(a, sl_slice_make(name, len)) >= 0)
            continue; /* listed twice */
        if (a->hdr_count == CONF_HEADERS_MAX) {
            SL_WARN("access_log.headers: only the first %d headers are recorded", CONF_HEADERS_MAX);
            break;
        }
        for (size_t k = 0; k < len; k++)
            a->hdr_name[a->hdr_count][k] = sl_ascii_lower(name[k]);
        a->hdr_name[a->hdr_count][len] = 0;
        a->hdr_len[a->hdr_count] = (uint8_t)len;
        a->hdr_count++;
    }
}

static uint64_t pow2_at_least(uint64_t v)
{
    uint64_t c = RING_MIN;
    while (c < v && c < (1ull << 40))
        c <<= 1;
    return c;
}

struct sl_alog *sl_alog_new(const struct sl_access_log_conf *conf, unsigned workers, char *err,
                            size_t err_len)
{
    if (!conf || !conf->directory || !conf->directory[0]) {
        sl_fmt_err(err, err_len, "access_log.directory is not set");
        return NULL;
    }
    if (workers == 0) {
        sl_fmt_err(err, err_len, "access log: no workers");
        return NULL;
    }
    const char *dir = conf->directory;
    if (strlen(dir) + 128 >= PATH_MAX) { /* room for the longest segment name */
        sl_fmt_err(err, err_len, "access_log.directory: path too long");
        return NULL;
    }
    int rc = mkdir_p(dir);
    struct stat st = {0};
    if (rc == 0 && stat(dir, &st) < 0)
        rc = -errno;
    if (rc < 0) {
        sl_fmt_err(err, err_len, "access_log.directory: cannot create %s: %s", dir, strerror(-rc));
        return NULL;
    }
    if (!S_ISDIR(st.st_mode)) {
        sl_fmt_err(err, err_len, "access_log.directory: %s is not a directory", dir);
        return NULL;
    }
    if (access(dir, W_OK | X_OK) < 0) {
        sl_fmt_err(err, err_len, "access_log.directory: %s is not writable: %s", dir,
                   strerror(errno));
        return NULL;
    }

    size_t asize = (sizeof(struct sl_alog) + 63) & ~(size_t)63;
    struct sl_alog *a = aligned_alloc(64, asize);
    if (!a) {
        sl_fmt_err(err, err_len, "access log: out of memory");
        return NULL;
    }
    memset(a, 0, asize);
    a->fd = -1;
    a->tcache_sec = -1;
    a->pid = (int)getpid();
    uint64_t id;
    if (getrandom(&id, sizeof id, GRND_NONBLOCK) != (ssize_t)sizeof id)
        id = clock_us(CLOCK_REALTIME) ^ clock_us(CLOCK_MONOTONIC) << 20 ^ (uint64_t)a->pid << 40 ^
             (uintptr_t)a; /* no entropy yet (early boot): unique enough beside the pid */
    snprintf(a->inst, sizeof a->inst, "%016" PRIx64, id);
    a->seg_max_bytes = conf->segment_max_bytes ? conf->segment_max_bytes : 64ull << 20;
    a->seg_max_age_us = (conf->segment_max_age_ms ? conf->segment_max_age_ms : 60000) * 1000;
    a->flush_interval_ms = conf->flush_interval_ms ? conf->flush_interval_ms : 200;
    a->ring_cap = pow2_at_least(conf->buffer_bytes ? conf->buffer_bytes : 8ull << 20);
    pthread_mutex_init(&a->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&a->cond, &ca);
    pthread_condattr_destroy(&ca);
    add_headers(a, conf);

    a->dir = strdup(dir);
    a->rings = aligned_alloc(64, workers * sizeof(struct ring));
    a->cctx = ZSTD_createCCtx();
    a->json = malloc(JSON_BATCH);
    a->out_cap = ZSTD_CStreamOutSize();
    a->out = malloc(a->out_cap);
    a->rec_buf = aligned_alloc(64, (REC_MAX + 63) & ~(size_t)63);
    if (!a->dir || !a->rings || !a->cctx || !a->json || !a->out || !a->rec_buf)
        goto nomem;
    memset(a->rings, 0, workers * sizeof(struct ring));
    for (unsigned i = 0; i < workers; i++) {
        struct ring *r = &a->rings[i];
        a->ring_count = i + 1; /* so sl_alog_free releases what exists */
        r->mask = a->ring_cap - 1;
        r->buf = malloc(a->ring_cap);
        r->scratch = malloc(REC_MAX);
        if (!r->buf || !r->scratch)
            goto nomem;
    }
    ZSTD_CCtx_setParameter(a->cctx, ZSTD_c_compressionLevel, 1);
    ZSTD_CCtx_setParameter(a->cctx, ZSTD_c_checksumFlag, 0); /* see end_block */
    return a;

nomem:
    sl_fmt_err(err, err_len, "access log: out of memory");
    a->stopped = true;
    sl_alog_free(a);
    return NULL;
}

void sl_alog_on_segment(struct sl_alog *a, void (*cb)(const char *path, void *data), void *data)
{
    a->on_segment = cb;
    a->on_segment_data = data;
}

int sl_alog_start(struct sl_alog *a)
{
    if (a->thread_started || a->stopped)
        return -EALREADY;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&a->thread, NULL, thread_main, a);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0)
        return -rc;
    pthread_setname_np(a->thread, "sl-alog");
    a->thread_started = true;
    SL_INFO("access log: writing to %s (%u buffers of %" PRIu64 " KiB)", a->dir, a->ring_count,
            a->ring_cap >> 10);
    return 0;
}

bool sl_alog_stop(struct sl_alog *a)
{
    if (!a)
        return true;
    if (a->stopped)
        return !a->abandoned;
    a->stopped = true;
    if (a->thread_started) {
        pthread_mutex_lock(&a->mu);
        a->stop_requested = true;
        pthread_cond_signal(&a->cond);
        pthread_mutex_unlock(&a->mu);
        struct timespec dl;
        clock_gettime(CLOCK_REALTIME, &dl);
        dl.tv_sec += STOP_TIMEOUT_S;
        int rc = pthread_timedjoin_np(a->thread, NULL, &dl);
        if (rc != 0) {
            SL_ERR("access log: the log thread did not finish within %d s (disk stuck?); "
                   "records still buffered are lost",
                   STOP_TIMEOUT_S);
            pthread_detach(a->thread);
            a->abandoned = true;
        }
    } else {
        run_cycle(a, true);
    }
    struct sl_alog_stats s;
    sl_alog_get_stats(a, &s);
    SL_INFO("access log: %" PRIu64 " records written in %" PRIu64 " segments, %" PRIu64
            " dropped (buffer full), %" PRIu64 " dropped (write errors), %" PRIu64
            " segments failed",
            s.records_written, s.segments_closed, s.records_dropped_full, s.records_dropped_io,
            s.segments_failed);
    return !a->abandoned;
}

void sl_alog_free(struct sl_alog *a)
{
    if (!a)
        return;
    sl_alog_stop(a);
    if (a->abandoned)
        return; /* its thread may still run; the process is exiting */
    if (a->fd >= 0)
        close(a->fd);
    for (unsigned i = 0; a->rings && i < a->ring_count; i++) {
        free(a->rings[i].buf);
        free(a->rings[i].scratch);
    }
    free(a->rings);
    ZSTD_freeCCtx(a->cctx);
    free(a->json);
    free(a->out);
    free(a->rec_buf);
    free(a->dir);
    pthread_cond_destroy(&a->cond);
    pthread_mutex_destroy(&a->mu);
    free(a);
}

void sl_alog_get_stats(const struct sl_alog *a, struct sl_alog_stats *out)
{
    memset(out, 0, sizeof *out);
    if (!a)
        return;
    for (unsigned i = 0; i < a->ring_count; i++)
        out->records_dropped_full +=
            atomic_load_explicit(&a->rings[i].dropped, memory_order_relaxed);
    out->records_written = atomic_load_explicit(&a->written, memory_order_relaxed);
    out->records_dropped_io = atomic_load_explicit(&a->dropped_io, memory_order_relaxed);
    out->bytes_uncompressed = atomic_load_explicit(&a->bytes_unc, memory_order_relaxed);
    out->bytes_compressed = atomic_load_explicit(&a->bytes_comp, memory_order_relaxed);
    out->segments_closed = atomic_load_explicit(&a->seg_closed, memory_order_relaxed);
    out->segments_failed = atomic_load_explicit(&a->seg_failed, memory_order_relaxed);
}
