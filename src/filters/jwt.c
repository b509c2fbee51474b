/*
 * jwt: validates a JSON Web Token before the request may reach a backend.
 *
 * The expensive part is the signature (tens of microseconds for RSA/ECDSA). A token is sent
 * again and again by the same client until it expires, so verified tokens go into a cache
 * shared by every worker, keyed by a keyed hash of the whole token and confirmed by comparing
 * the whole token: a repeated token costs a hash, a compare and a copy of its claims. Rejected
 * tokens go into a small negative cache so that replaying a bad token is cheap too.
 *
 * The cache is a table of fixed-size slots, each guarded by a sequence counter (a seqlock):
 * readers never write shared memory and retry nothing, a torn read is just a miss; a writer
 * claims a slot with one CAS and skips caching when another writer holds it. Every shared
 * field is an atomic read and written relaxed, so the races a seqlock tolerates stay defined.
 *
 * Keys come from a secret, a PEM file, or a key source (JWKS file or URL, jwks_source.c).
 * Each worker keeps its own reference to the current key set and swaps it when the source
 * posts a new one; a token naming an unknown kid pauses the request while the source refetches
 * (single-flight, rate-limited), then resumes it on the same worker.
 */
#include "filters/jwt.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "config/config.h"
#include "config/filter_conf.h"
#include "config/units.h"
#include "core/hash.h"
#include "core/log.h"
#include "core/worker.h"
#include "filters/jwks_source.h"
#include "filters/jws.h"
#include "http/request.h"

#define MAX_TOKEN_BYTES 8192
#define SLOT_BYTES 2048 /* one cache slot: header + token + flat claims */
#define FLAT_MAX 1024   /* claims kept per token (larger claim sets are partly left out) */

/* ---- configuration ------------------------------------------------------------------------ */

struct jwt_conf {
    char *secret;
    char *public_key_file;
    char *jwks_file;
    char *jwks_url;
    char **algorithms;
    size_t algorithm_count;
    char **issuers;
    size_t issuer_count;
    char **audiences;
    size_t audience_count;
    uint64_t leeway_ms;
    bool require_exp;
    char **required_claims;
    size_t required_count;
    struct sl_header_pair *claims;
    size_t claim_count;
    struct sl_header_pair *claims_to_headers;
    size_t claims_to_headers_count;
    char **from;
    size_t from_count;
    bool strip_authorization;
    uint64_t cache_size;
    uint64_t negative_cache_size;
    uint64_t jwks_refresh_ms;
    uint64_t jwks_refetch_interval_ms;
    uint64_t jwks_timeout_ms;
    char *jwks_ca_file;
};

static const char *check_alg(const char *s, size_t len, char *buf, size_t cap)
{
    if (sl_jws_alg_from_name(s, len))
        return NULL;
    snprintf(buf, cap,
             "unknown algorithm \"%.*s\"; use HS256/384/512, RS256/384/512, PS256/384/512, "
             "ES256/384 or EdDSA",
             (int)(len > 32 ? 32 : len), s);
    return buf;
}

static const char *check_header_name(const char *s, size_t len, char *buf, size_t cap)
{
    (void)buf;
    (void)cap;
    return sl__config_is_token(s, len) ? NULL : "must be a valid header name";
}

static const char *check_from(const char *s, size_t len, char *buf, size_t cap)
{
    (void)buf;
    (void)cap;
    if (len == 13 && memcmp(s, "authorization", 13) == 0)
        return NULL;
    const char *colon = memchr(s, ':', len);
    size_t kl = colon ? (size_t)(colon - s) : len;
    size_t nl = colon ? len - kl - 1 : 0;
    if (colon && nl &&
        ((kl == 6 && memcmp(s, "header", 6) == 0 && sl__config_is_token(colon + 1, nl)) ||
         (kl == 6 && memcmp(s, "cookie", 6) == 0 && sl__config_is_token(colon + 1, nl)) ||
         (kl == 5 && memcmp(s, "query", 5) == 0 && sl__config_is_token(colon + 1, nl))))
        return NULL;
    return "expected authorization, header:NAME, cookie:NAME or query:NAME";
}

static const char *check_url(const char *s, size_t len, char *buf, size_t cap)
{
    (void)buf;
    (void)cap;
    if ((len > 7 && strncmp(s, "http://", 7) == 0) || (len > 8 && strncmp(s, "https://", 8) == 0))
        return NULL;
    return "must be an http:// or https:// URL";
}

static void conf_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct jwt_conf *j = elem;
    int sources = (j->secret != NULL) + (j->public_key_file != NULL) + (j->jwks_file != NULL) +
                  (j->jwks_url != NULL);
    if (sources != 1)
        sl__config_error(c, map,
                         "needs exactly one of secret, public_key_file, jwks_file or jwks_url");
    if (j->secret && strlen(j->secret) < 32)
        sl__config_error(c, map,
                         "secret must be at least 32 bytes (RFC 7518 3.2: a key as long as the "
                         "hash)");
    for (size_t i = 0; i < j->claims_to_headers_count; i++) {
        const char *h = j->claims_to_headers[i].value;
        if (!sl__config_is_token(h, strlen(h)))
            sl__config_error(c, map, "claims_to_headers: \"%s\" is not a valid header name", h);
    }
}

#define FIELD(m) SL__FIELD(struct jwt_conf, m)
#define SEC 1000ull

static const struct sl__schema_key conf_keys[] = {
    {.name = "secret", .type = SL__T_STRING, FIELD(secret), .flags = SL__KEY_NONEMPTY},
    {.name = "public_key_file",
     .type = SL__T_STRING,
     FIELD(public_key_file),
     .flags = SL__KEY_NONEMPTY},
    {.name = "jwks_file", .type = SL__T_STRING, FIELD(jwks_file), .flags = SL__KEY_NONEMPTY},
    {.name = "jwks_url", .type = SL__T_STRING, FIELD(jwks_url), .check = check_url},
    {.name = "algorithms",
     .type = SL__T_STRLIST,
     FIELD(algorithms),
     .count_offset = offsetof(struct jwt_conf, algorithm_count),
     .min = 1,
     .check = check_alg},
    {.name = "issuers",
     .type = SL__T_STRLIST,
     FIELD(issuers),
     .count_offset = offsetof(struct jwt_conf, issuer_count),
     .flags = SL__KEY_NONEMPTY},
    {.name = "audiences",
     .type = SL__T_STRLIST,
     FIELD(audiences),
     .count_offset = offsetof(struct jwt_conf, audience_count),
     .flags = SL__KEY_NONEMPTY},
    {.name = "leeway", .type = SL__T_DURATION, FIELD(leeway_ms), .min = 0, .max = 3600 * SEC},
    {.name = "require_exp", .type = SL__T_BOOL, FIELD(require_exp), .def = true},
    {.name = "required_claims",
     .type = SL__T_STRLIST,
     FIELD(required_claims),
     .count_offset = offsetof(struct jwt_conf, required_count),
     .flags = SL__KEY_NONEMPTY},
    {.name = "claims",
     .type = SL__T_STRMAP,
     FIELD(claims),
     .count_offset = offsetof(struct jwt_conf, claim_count)},
    {.name = "claims_to_headers",
     .type = SL__T_STRMAP,
     FIELD(claims_to_headers),
     .count_offset = offsetof(struct jwt_conf, claims_to_headers_count),
     .check = check_header_name},
    {.name = "from",
     .type = SL__T_STRLIST,
     FIELD(from),
     .count_offset = offsetof(struct jwt_conf, from_count),
     .min = 1,
     .check = check_from},
    {.name = "strip_authorization", .type = SL__T_BOOL, FIELD(strip_authorization)},
    {.name = "cache_size", .type = SL__T_UINT, FIELD(cache_size), .max = 1u << 20, .def = 4096},
    {.name = "negative_cache_size",
     .type = SL__T_UINT,
     FIELD(negative_cache_size),
     .max = 1u << 20,
     .def = 1024},
    {.name = "jwks_refresh",
     .type = SL__T_DURATION,
     FIELD(jwks_refresh_ms),
     .min = SEC,
     .max = 24 * 3600 * SEC,
     .def = 300 * SEC},
    {.name = "jwks_refetch_interval",
     .type = SL__T_DURATION,
     FIELD(jwks_refetch_interval_ms),
     .min = SEC,
     .max = 3600 * SEC,
     .def = 30 * SEC},
    {.name = "jwks_timeout",
     .type = SL__T_DURATION,
     FIELD(jwks_timeout_ms),
     .min = 100,
     .max = 60 * SEC,
     .def = 5 * SEC},
    {.name = "jwks_ca_file", .type = SL__T_STRING, FIELD(jwks_ca_file), .flags = SL__KEY_NONEMPTY},
};

static const struct sl__schema_section conf_section = {
    .keys = conf_keys,
    .key_count = sizeof conf_keys / sizeof conf_keys[0],
    .check = conf_check,
};

static const struct sl_config_filter_type conf_type = {
    .name = "jwt",
    .section = &conf_section,
    .conf_size = sizeof(struct jwt_conf),
};

/* ---- shared caches ------------------------------------------------------------------------ */

/* One verified token. Everything is atomic (see the file comment); `data` holds the token,
 * then the flat claims, as 8-byte words. */
struct cslot {
    _Atomic uint64_t seq; /* odd while a writer fills the slot */
    _Atomic uint64_t hash;
    _Atomic uint64_t lens; /* token_len << 32 | flat_len */
    _Atomic int64_t exp;
    _Atomic uint64_t key_fp;
    _Atomic uint64_t data[(SLOT_BYTES - 5 * 8) / 8];
};
#define SLOT_DATA_BYTES (sizeof(((struct cslot *)0)->data))

struct nslot {
    _Atomic uint64_t hash;
    _Atomic uint64_t meta; /* key generation << 8 | reason index */
};

enum reason {
    R_NONE = 0,
    R_MISSING,
    R_MALFORMED,
    R_TOO_LARGE,
    R_BAD_ALG,
    R_UNKNOWN_KID,
    R_BAD_SIGNATURE,
    R_EXPIRED,
    R_NOT_YET_VALID,
    R_IAT_FUTURE,
    R_BAD_ISSUER,
    R_BAD_AUDIENCE,
    R_CLAIMS,  /* 403 */
    R_NO_KEYS, /* 503 */
};

static const char *const reason_names[] = {
    [R_NONE] = "ok",
    [R_MISSING] = "missing_token",
    [R_MALFORMED] = "malformed_token",
    [R_TOO_LARGE] = "token_too_large",
    [R_BAD_ALG] = "bad_algorithm",
    [R_UNKNOWN_KID] = "unknown_kid",
    [R_BAD_SIGNATURE] = "bad_signature",
    [R_EXPIRED] = "token_expired",
    [R_NOT_YET_VALID] = "token_not_yet_valid",
    [R_IAT_FUTURE] = "token_issued_in_future",
    [R_BAD_ISSUER] = "bad_issuer",
    [R_BAD_AUDIENCE] = "bad_audience",
    [R_CLAIMS] = "insufficient_claims",
    [R_NO_KEYS] = "jwks_unavailable",
};

enum src_kind { SRC_AUTHORIZATION, SRC_HEADER, SRC_COOKIE, SRC_QUERY };

struct token_src {
    enum src_kind kind;
    const char *name;
};

struct jwt_state {
    const struct jwt_conf *conf;
    struct sl_jwt_rules rules;
    unsigned algs;
    struct sl_jwks *static_keys;   /* secret or PEM: never changes */
    struct sl_jwks_source *source; /* jwks_file / jwks_url */
    bool source_is_url;
    struct token_src *srcs;
    size_t src_count;
    size_t *hdr_name_lens; /* claims_to_headers: [2i] claim name, [2i+1] header name lengths */
    struct cslot *cache;
    size_t cache_mask; /* 0 with no cache */
    struct nslot *neg;
    size_t neg_mask;
    uint64_t hkey[2];
    int64_t leeway_s;
};

/* A request paused until the key source answers. In the request arena. */
struct waiter {
    struct waiter *prev, *next;
    struct sl_filter_run *run;
    struct sl_request *req;
    struct sl_slice token;
    uint64_t hash, neg_hash; /* cache index hash, negative-cache hash */
};

struct jwt_worker {
    struct jwt_state *st;
    struct sl_worker *worker;
    struct sl_jwks *keys; /* this worker's reference to the current set */
    uint64_t gen;
    struct sl_jwks_subscriber sub;
    struct waiter *waiters;
    struct sl_timer wait_timer; /* bounds every pause, whatever the source does */
};

/* What a request's accepted token leaves for later filters (rate_limit's jwt:CLAIM). */
struct req_claims {
    const unsigned char *flat;
    size_t flat_len;
};

bool sl_jwt_request_claim(const struct sl_request *req, const char *name, size_t name_len,
                          struct sl_slice *out)
{
    const struct req_claims *rc = req->jwt_claims;
    if (!rc)
        return false;
    return sl_jwt_flat_get(rc->flat, rc->flat_len, name, name_len, out);
}

/* Token times are whole seconds. Full verification reads the precise clock: the coarse one
 * lags by up to a tick, and a token issued this very second would look issued in the future
 * when the second turns. The cached path only re-checks exp (which that lag makes lenient by
 * a few ms at most), so it takes the cheaper coarse clock. */
static int64_t now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec;
}

static int64_t now_s_coarse(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    return (int64_t)ts.tv_sec;
}

static size_t pow2_at_least(uint64_t n)
{
    size_t p = 1;
    while (p < n)
        p <<= 1;
    return p;
}

/* Copies the token's bytes into the slot as words (the last one zero-padded). */
static void words_store(_Atomic uint64_t *w, const unsigned char *p, size_t len)
{
    for (size_t i = 0; i < len; i += 8) {
        uint64_t v = 0;
        memcpy(&v, p + i, len - i < 8 ? len - i : 8);
        atomic_store_explicit(&w[i / 8], v, memory_order_relaxed);
    }
}

static bool words_equal(_Atomic uint64_t *w, const unsigned char *p, size_t len)
{
    for (size_t i = 0; i < len; i += 8) {
        uint64_t v = 0;
        memcpy(&v, p + i, len - i < 8 ? len - i : 8);
        if (atomic_load_explicit(&w[i / 8], memory_order_relaxed) != v)
            return false;
    }
    return true;
}

static void words_load(_Atomic uint64_t *w, unsigned char *out, size_t len)
{
    for (size_t i = 0; i < len; i += 8) {
        uint64_t v = atomic_load_explicit(&w[i / 8], memory_order_relaxed);
        memcpy(out + i, &v, len - i < 8 ? len - i : 8);
    }
}

struct cache_hit {
    int64_t exp;
    uint64_t key_fp;
    size_t flat_len;
};

/* Looks the token up; on a hit copies its claims into `flat` (FLAT_MAX bytes). */
static bool cache_get(const struct jwt_state *st, uint64_t h, const char *tok, size_t len,
                      unsigned char *flat, struct cache_hit *hit)
{
    if (!st->cache)
        return false;
    struct cslot *s = &st->cache[h & st->cache_mask];
    uint64_t s1 = atomic_load_explicit(&s->seq, memory_order_acquire);
    if (s1 & 1)
        return false;
    if (atomic_load_explicit(&s->hash, memory_order_relaxed) != h)
        return false;
    uint64_t lens = atomic_load_explicit(&s->lens, memory_order_relaxed);
    size_t tl = (size_t)(lens >> 32), fl = (size_t)(lens & 0xffffffffu);
    size_t tw = (tl + 7) & ~(size_t)7;
    if (tl != len || fl > FLAT_MAX || tw + fl > SLOT_DATA_BYTES)
        return false;
    if (!words_equal(s->data, (const unsigned char *)tok, len))
        return false;
    words_load(s->data + tw / 8, flat, fl);
    hit->exp = atomic_load_explicit(&s->exp, memory_order_relaxed);
    hit->key_fp = atomic_load_explicit(&s->key_fp, memory_order_relaxed);
    hit->flat_len = fl;
    atomic_thread_fence(memory_order_acquire);
    return atomic_load_explicit(&s->seq, memory_order_relaxed) == s1;
}

static void cache_put(const struct jwt_state *st, uint64_t h, const char *tok, size_t len,
                      const unsigned char *flat, size_t fl, int64_t exp, uint64_t key_fp)
{
    size_t tw = (len + 7) & ~(size_t)7;
    if (!st->cache || tw + fl > SLOT_DATA_BYTES)
        return;
    struct cslot *s = &st->cache[h & st->cache_mask];
    uint64_t seq = atomic_load_explicit(&s->seq, memory_order_relaxed);
    if ((seq & 1) || !atomic_compare_exchange_strong_explicit(
                         &s->seq, &seq, seq + 1, memory_order_acquire, memory_order_relaxed))
        return; /* another writer has it: caching is best effort */
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&s->hash, h, memory_order_relaxed);
    atomic_store_explicit(&s->lens, (uint64_t)len << 32 | fl, memory_order_relaxed);
    atomic_store_explicit(&s->exp, exp, memory_order_relaxed);
    atomic_store_explicit(&s->key_fp, key_fp, memory_order_relaxed);
    words_store(s->data, (const unsigned char *)tok, len);
    if (fl)
        words_store(s->data + tw / 8, flat, fl);
    atomic_store_explicit(&s->seq, seq + 2, memory_order_release);
}

static enum reason neg_get(const struct jwt_state *st, uint64_t h, uint64_t gen)
{
    if (!st->neg)
        return R_NONE;
    struct nslot *n = &st->neg[h & st->neg_mask];
    if (atomic_load_explicit(&n->hash, memory_order_relaxed) != h)
        return R_NONE;
    uint64_t meta = atomic_load_explicit(&n->meta, memory_order_relaxed);
    enum reason r = (enum reason)(meta & 0xff);
    /* Verdicts that depend on the key set only hold for the set they were made with. */
    if ((r == R_UNKNOWN_KID || r == R_BAD_SIGNATURE) && (meta >> 8) != gen)
        return R_NONE;
    if (r == R_NONE || r > R_CLAIMS || r == R_NOT_YET_VALID || r == R_IAT_FUTURE)
        return R_NONE;
    return r;
}

static void neg_put(const struct jwt_state *st, uint64_t h, uint64_t gen, enum reason r)
{
    if (!st->neg || r == R_NOT_YET_VALID || r == R_IAT_FUTURE || r == R_NO_KEYS || r == R_MISSING)
        return;
    struct nslot *n = &st->neg[h & st->neg_mask];
    atomic_store_explicit(&n->hash, 0, memory_order_relaxed);
    atomic_store_explicit(&n->meta, gen << 8 | (uint64_t)r, memory_order_relaxed);
    atomic_store_explicit(&n->hash, h, memory_order_relaxed);
}

/* ---- create / destroy --------------------------------------------------------------------- */

static char *read_file(const char *path, size_t max, size_t *len, char *err, size_t err_len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_len, "cannot read %s: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = malloc(max + 1);
    size_t n = buf ? fread(buf, 1, max + 1, f) : 0;
    fclose(f);
    if (!buf) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    if (n > max) {
        free(buf);
        snprintf(err, err_len, "%s is larger than %zu bytes", path, max);
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

static void destroy(void *state)
{
    struct jwt_state *st = state;
    if (!st)
        return;
    sl_jwks_unref(st->static_keys);
    if (st->source)
        sl_jwks_source_free(st->source);
    free(st->srcs);
    free(st->hdr_name_lens);
    free(st->rules.claim_names);
    free(st->rules.claim_values);
    free(st->cache);
    free(st->neg);
    free(st);
}

static int create(const void *vconf, const struct sl_config *cfg, void **out, char *err,
                  size_t err_len)
{
    (void)cfg;
    const struct jwt_conf *conf = vconf;
    struct jwt_state *st = calloc(1, sizeof *st);
    if (!st)
        goto oom;
    st->conf = conf;
    st->algs = 0;
    for (size_t i = 0; i < conf->algorithm_count; i++)
        st->algs |= sl_jws_alg_from_name(conf->algorithms[i], strlen(conf->algorithms[i]));
    if (!st->algs)
        st->algs = SL_JWS_ALL_ALGS;
    st->leeway_s = (int64_t)(conf->leeway_ms / 1000);
    st->rules.issuers = conf->issuers;
    st->rules.issuer_count = conf->issuer_count;
    st->rules.audiences = conf->audiences;
    st->rules.audience_count = conf->audience_count;
    st->rules.required = conf->required_claims;
    st->rules.required_count = conf->required_count;
    st->rules.leeway_s = conf->leeway_ms / 1000;
    st->rules.require_exp = conf->require_exp;
    if (conf->claim_count) {
        st->rules.claim_names = calloc(conf->claim_count, sizeof(char *));
        st->rules.claim_values = calloc(conf->claim_count, sizeof(char *));
        if (!st->rules.claim_names || !st->rules.claim_values)
            goto oom;
        for (size_t i = 0; i < conf->claim_count; i++) {
            st->rules.claim_names[i] = conf->claims[i].name;
            st->rules.claim_values[i] = conf->claims[i].value;
        }
        st->rules.claim_count = conf->claim_count;
    }
    size_t nsrc = conf->from_count ? conf->from_count : 1;
    st->srcs = calloc(nsrc, sizeof *st->srcs);
    st->hdr_name_lens = calloc(2 * conf->claims_to_headers_count + 1, sizeof(size_t));
    if (!st->srcs || !st->hdr_name_lens)
        goto oom;
    for (size_t i = 0; i < conf->claims_to_headers_count; i++) {
        st->hdr_name_lens[2 * i] = strlen(conf->claims_to_headers[i].name);
        st->hdr_name_lens[2 * i + 1] = strlen(conf->claims_to_headers[i].value);
    }
    if (!conf->from_count) {
        st->srcs[0].kind = SRC_AUTHORIZATION;
    } else {
        for (size_t i = 0; i < conf->from_count; i++) {
            const char *f = conf->from[i];
            const char *colon = strchr(f, ':');
            if (!colon) {
                st->srcs[i].kind = SRC_AUTHORIZATION;
                continue;
            }
            st->srcs[i].name = colon + 1;
            st->srcs[i].kind = f[0] == 'h' ? SRC_HEADER : f[0] == 'c' ? SRC_COOKIE : SRC_QUERY;
        }
    }
    st->src_count = nsrc;

    /* Keys. */
    if (conf->secret) {
        st->static_keys =
            sl_jwks_from_secret((const unsigned char *)conf->secret, strlen(conf->secret),
                                st->algs & SL_JWS_HMAC_ALGS, err, err_len);
        if (!st->static_keys)
            goto fail;
    } else if (conf->public_key_file) {
        size_t len = 0;
        char *pem = read_file(conf->public_key_file, 1 << 20, &len, err, err_len);
        if (!pem)
            goto fail;
        st->static_keys = sl_jwks_from_pem(pem, len, st->algs & ~SL_JWS_HMAC_ALGS, err, err_len);
        free(pem);
        if (!st->static_keys)
            goto fail;
    } else {
        struct sl_jwks_source_opts o = {
            .refresh_ms = conf->jwks_refresh_ms,
            .refresh_min_ms = 60 * SEC < conf->jwks_refresh_ms ? 60 * SEC : conf->jwks_refresh_ms,
            .refresh_max_ms = 24 * 3600 * SEC,
            .refetch_min_interval_ms = conf->jwks_refetch_interval_ms,
            .timeout_ms = conf->jwks_timeout_ms,
            .max_bytes = 1u << 20,
            .ca_file = conf->jwks_ca_file,
        };
        if (conf->jwks_file)
            st->source = sl_jwks_source_new_file(conf->jwks_file, &o, true, err, err_len);
        else
            st->source = sl_jwks_source_new_url(conf->jwks_url, &o, err, err_len);
        st->source_is_url = conf->jwks_url != NULL;
        if (!st->source)
            goto fail;
    }

    if (conf->cache_size) {
        size_t n = pow2_at_least(conf->cache_size);
        st->cache = calloc(n, sizeof *st->cache);
        if (!st->cache)
            goto oom;
        st->cache_mask = n - 1;
    }
    if (conf->negative_cache_size) {
        size_t n = pow2_at_least(conf->negative_cache_size);
        st->neg = calloc(n, sizeof *st->neg);
        if (!st->neg)
            goto oom;
        st->neg_mask = n - 1;
    }
    sl_siphash_key_init(st->hkey);
    *out = st;
    return 0;
oom:
    snprintf(err, err_len, "out of memory");
fail:
    destroy(st);
    return -1;
}

/* ---- per worker --------------------------------------------------------------------------- */

static void resume_waiters(struct jwt_worker *jw, bool timed_out);

static void on_keys(struct sl_jwks_subscriber *sub)
{
    struct jwt_worker *jw = sub->data;
    struct sl_jwks *ks = sl_jwks_source_acquire(jw->st->source);
    if (ks) {
        sl_jwks_unref(jw->keys);
        jw->keys = ks;
        jw->gen = sl_jwks_source_generation(jw->st->source);
    }
    /* A notification also means "a fetch attempt ended": waiters get their answer now. */
    if (!sl_jwks_source_fetching(jw->st->source))
        resume_waiters(jw, false);
}

static void on_wait_timeout(struct sl_timer *t)
{
    struct jwt_worker *jw = t->data;
    resume_waiters(jw, true);
}

static int worker_init(void *state, struct sl_worker *w, void **wstate)
{
    struct jwt_state *st = state;
    struct jwt_worker *jw = calloc(1, sizeof *jw);
    if (!jw)
        return -ENOMEM;
    *wstate = jw;
    jw->st = st;
    jw->worker = w;
    sl_timer_init(&jw->wait_timer, on_wait_timeout, jw);
    if (st->static_keys) {
        sl_jwks_ref(st->static_keys);
        jw->keys = st->static_keys;
        jw->gen = 1;
        return 0;
    }
    jw->sub.loop = &w->loop;
    jw->sub.cb = on_keys;
    jw->sub.data = jw;
    sl_jwks_source_subscribe(st->source, &jw->sub);
    jw->keys = sl_jwks_source_acquire(st->source);
    jw->gen = sl_jwks_source_generation(st->source);
    return 0;
}

static void worker_fini(void *state, void *wstate)
{
    struct jwt_state *st = state;
    struct jwt_worker *jw = wstate;
    if (st->source)
        sl_jwks_source_unsubscribe(st->source, &jw->sub);
    sl_timer_cancel(&jw->worker->loop, &jw->wait_timer);
    sl_jwks_unref(jw->keys);
    free(jw);
}

/* ---- the request path --------------------------------------------------------------------- */

static bool find_token(const struct jwt_state *st, struct sl_request *req, struct sl_slice *tok,
                       const char **carrier)
{
    for (size_t i = 0; i < st->src_count; i++) {
        const struct token_src *s = &st->srcs[i];
        struct sl_slice v;
        switch (s->kind) {
        case SRC_AUTHORIZATION:
            if (!sl_request_header(req, "Authorization", &v))
                break;
            /* RFC 6750 2.1: the scheme is case-insensitive; one or more spaces follow it. */
            if (v.len < 7 || strncasecmp(v.ptr, "Bearer ", 7) != 0)
                break;
            v.ptr += 7;
            v.len -= 7;
            while (v.len && v.ptr[0] == ' ') {
                v.ptr++;
                v.len--;
            }
            while (v.len && (v.ptr[v.len - 1] == ' ' || v.ptr[v.len - 1] == '\t'))
                v.len--;
            *tok = v;
            *carrier = "Authorization";
            return true;
        case SRC_HEADER:
            if (!sl_request_header(req, s->name, &v))
                break;
            *tok = v;
            *carrier = s->name;
            return true;
        case SRC_COOKIE:
            if (!sl_request_cookie(req, s->name, &v))
                break;
            *tok = v;
            *carrier = NULL;
            return true;
        case SRC_QUERY:
            if (!sl_request_query_param(req, s->name, &v))
                break;
            *tok = v;
            *carrier = NULL;
            return true;
        }
    }
    return false;
}

static enum sl_filter_verdict reject(struct sl_filter_run *run, struct sl_request *req,
                                     enum reason r)
{
    int status = r == R_CLAIMS ? 403 : r == R_NO_KEYS ? 503 : 401;
    if (status == 401) {
        /* RFC 6750 3: no error code when the request had no token at all. */
        run->extra_headers = r == R_MISSING
                                 ? "WWW-Authenticate: Bearer\r\n"
                                 : "WWW-Authenticate: Bearer error=\"invalid_token\"\r\n";
        run->extra_len = strlen(run->extra_headers);
    } else if (status == 403) {
        run->extra_headers = "WWW-Authenticate: Bearer error=\"insufficient_scope\"\r\n";
        run->extra_len = strlen(run->extra_headers);
    }
    return sl_filter_reject(run, req, status, reason_names[r]);
}

/* The token passed: expose its claims and rewrite headers for the upstream. */
static enum sl_filter_verdict accept_token(struct sl_filter_run *run, struct sl_request *req,
                                           const struct jwt_state *st, const unsigned char *flat,
                                           size_t flat_len)
{
    const struct jwt_conf *conf = st->conf;
    struct req_claims *rc = sl_arena_alloc(&req->arena, sizeof *rc);
    unsigned char *copy = flat_len ? sl_arena_dup(&req->arena, flat, flat_len) : NULL;
    if (!rc || (flat_len && !copy))
        return sl_filter_reject(run, req, 503, "out_of_memory");
    rc->flat = copy;
    rc->flat_len = flat_len;
    req->jwt_claims = rc;
    for (size_t i = 0; i < conf->claims_to_headers_count; i++) {
        const struct sl_header_pair *p = &conf->claims_to_headers[i];
        /* Whatever the client sent under that name must not reach the backend. */
        sl_request_header_remove(req, p->value);
        struct sl_slice v;
        if (!sl_jwt_flat_get(copy, flat_len, p->name, st->hdr_name_lens[2 * i], &v))
            continue;
        bool clean = true;
        for (size_t k = 0; k < v.len && clean; k++)
            clean = (unsigned char)v.ptr[k] >= 0x20 && v.ptr[k] != 0x7f;
        if (!clean)
            continue; /* a claim with control characters cannot become a header */
        if (sl_request_header_append(req, sl_slice_make(p->value, st->hdr_name_lens[2 * i + 1]),
                                     v) != 0)
            return sl_filter_reject(run, req, 503, "out_of_memory");
    }
    if (conf->strip_authorization)
        sl_request_header_remove(req, "Authorization");
    return SL_FILTER_CONTINUE;
}

static enum reason claims_reason(enum sl_jwt_claims_status cs)
{
    switch (cs) {
    case SL_JWT_CLAIMS_OK:
        return R_NONE;
    case SL_JWT_CLAIMS_MALFORMED:
        return R_MALFORMED;
    case SL_JWT_EXPIRED:
        return R_EXPIRED;
    case SL_JWT_NOT_YET_VALID:
        return R_NOT_YET_VALID;
    case SL_JWT_ISSUED_IN_FUTURE:
        return R_IAT_FUTURE;
    case SL_JWT_BAD_ISSUER:
        return R_BAD_ISSUER;
    case SL_JWT_BAD_AUDIENCE:
        return R_BAD_AUDIENCE;
    case SL_JWT_CLAIM_MISSING:
    case SL_JWT_CLAIM_MISMATCH:
        return R_CLAIMS;
    }
    return R_MALFORMED;
}

static enum reason jws_reason(enum sl_jws_status s)
{
    switch (s) {
    case SL_JWS_OK:
        return R_NONE;
    case SL_JWS_MALFORMED:
        return R_MALFORMED;
    case SL_JWS_TOO_LARGE:
        return R_TOO_LARGE;
    case SL_JWS_BAD_ALG:
        return R_BAD_ALG;
    case SL_JWS_UNKNOWN_KID:
        return R_UNKNOWN_KID;
    case SL_JWS_BAD_SIGNATURE:
        return R_BAD_SIGNATURE;
    }
    return R_MALFORMED;
}

/* Scratch for decoding: per thread, so verification allocates nothing. */
static _Thread_local unsigned char scratch[MAX_TOKEN_BYTES + 64];
static _Thread_local unsigned char flatbuf[FLAT_MAX];

/*
 * Full verification of a token that missed the cache. Returns R_NONE on success (claims in
 * flatbuf), R_UNKNOWN_KID / R_NO_KEYS when the key set may be stale.
 */
static enum reason verify(struct jwt_worker *jw, struct sl_slice tok, uint64_t ch, size_t *flat_len)
{
    const struct jwt_state *st = jw->st;
    struct sl_jws_parsed p;
    enum sl_jws_status js = sl_jws_parse(tok.ptr, tok.len, st->algs, scratch, sizeof scratch, &p);
    if (js != SL_JWS_OK)
        return jws_reason(js);
    if (!jw->keys)
        return R_NO_KEYS;
    const struct sl_jwk *key = sl_jwks_find(jw->keys, p.kid, p.alg);
    if (!key)
        return R_UNKNOWN_KID;
    js = sl_jws_verify(&p, key);
    if (js != SL_JWS_OK)
        return jws_reason(js);
    int64_t exp = 0;
    enum sl_jwt_claims_status cs = sl_jwt_claims_check(
        p.payload.ptr, p.payload.len, &st->rules, now_s(), &exp, flatbuf, sizeof flatbuf, flat_len);
    enum reason r = claims_reason(cs);
    if (r != R_NONE)
        return r;
    cache_put(st, ch, tok.ptr, tok.len, flatbuf, *flat_len, exp, key->fingerprint);
    return R_NONE;
}

static bool key_present(const struct sl_jwks *ks, uint64_t fp)
{
    for (size_t i = 0; ks && i < ks->count; i++)
        if (ks->keys[i].fingerprint == fp)
            return true;
    return false;
}

/* Decides a token: CONTINUE, RESPOND, or PAUSE (when `w` may wait for the key source). */
static enum sl_filter_verdict decide(struct sl_filter_run *run, struct sl_request *req,
                                     struct jwt_worker *jw, struct sl_slice tok, uint64_t ch,
                                     uint64_t nh, bool may_wait)
{
    const struct jwt_state *st = jw->st;
    size_t flat_len = 0;
    enum reason r = verify(jw, tok, ch, &flat_len);
    if (r == R_NONE)
        return accept_token(run, req, st, flatbuf, flat_len);
    if ((r == R_UNKNOWN_KID || r == R_NO_KEYS) && may_wait && st->source_is_url &&
        sl_jwks_source_refetch(st->source))
        return SL_FILTER_PAUSE;
    /* An unknown kid from a URL source may become known at the next refetch: not cached. */
    if (!(r == R_UNKNOWN_KID && st->source_is_url))
        neg_put(st, nh, jw->gen, r);
    return reject(run, req, r);
}

static void waiter_unlink(struct jwt_worker *jw, struct waiter *w)
{
    if (w->prev)
        w->prev->next = w->next;
    else
        jw->waiters = w->next;
    if (w->next)
        w->next->prev = w->prev;
    w->prev = w->next = NULL;
}

static void resume_waiters(struct jwt_worker *jw, bool timed_out)
{
    struct waiter *list = jw->waiters;
    jw->waiters = NULL;
    sl_timer_cancel(&jw->worker->loop, &jw->wait_timer);
    while (list) {
        struct waiter *w = list;
        list = w->next;
        w->prev = w->next = NULL;
        enum sl_filter_verdict v;
        if (timed_out && !jw->keys)
            v = reject(w->run, w->req, R_NO_KEYS);
        else
            v = decide(w->run, w->req, jw, w->token, w->hash, w->neg_hash, false);
        sl_filter_resume(w->run, v);
    }
}

static enum sl_filter_verdict on_request(struct sl_filter_run *run, struct sl_request *req,
                                         void *state)
{
    const struct jwt_state *st = state;
    struct jwt_worker *jw = sl_filter_wstate(run);
    struct sl_slice tok;
    const char *carrier = NULL;
    if (!jw)
        return sl_filter_reject(run, req, 500, "internal");
    if (!find_token(st, req, &tok, &carrier) || tok.len == 0)
        return reject(run, req, R_MISSING);
    if (tok.len > MAX_TOKEN_BYTES)
        return reject(run, req, R_TOO_LARGE);
    /* The positive cache confirms a hit by comparing the whole token, so a fast seeded hash
     * is enough for its index; the negative cache trusts its hash alone, so it gets SipHash,
     * computed only on a miss. */
    uint64_t ch = sl_hash_bytes(tok.ptr, tok.len, st->hkey[0] ^ st->hkey[1]);
    struct cache_hit hit;
    if (cache_get(st, ch, tok.ptr, tok.len, flatbuf, &hit)) {
        int64_t now = now_s_coarse();
        /* nbf passed when the token was verified and cached; only exp can change. */
        bool live = hit.exp == 0 || now <= hit.exp + st->leeway_s;
        /* A cached token stays good only while its key is still in the set. */
        if (live && key_present(jw->keys, hit.key_fp))
            return accept_token(run, req, st, flatbuf, hit.flat_len);
        if (!live) {
            neg_put(st, sl_siphash(tok.ptr, tok.len, st->hkey), jw->gen, R_EXPIRED);
            return reject(run, req, R_EXPIRED);
        }
    }
    uint64_t nh = sl_siphash(tok.ptr, tok.len, st->hkey);
    enum reason nr = neg_get(st, nh, jw->gen);
    if (nr != R_NONE)
        return reject(run, req, nr);
    enum sl_filter_verdict v = decide(run, req, jw, tok, ch, nh, true);
    if (v != SL_FILTER_PAUSE)
        return v;
    struct waiter *w = sl_arena_alloc(&req->arena, sizeof *w);
    if (!w)
        return sl_filter_reject(run, req, 503, "out_of_memory");
    memset(w, 0, sizeof *w);
    w->run = run;
    w->req = req;
    w->token = tok;
    w->hash = ch;
    w->neg_hash = nh;
    w->next = jw->waiters;
    if (jw->waiters)
        jw->waiters->prev = w;
    jw->waiters = w;
    if (!sl_timer_is_armed(&jw->wait_timer))
        sl_timer_arm(&jw->worker->loop, &jw->wait_timer, st->conf->jwks_timeout_ms + 1000);
    return SL_FILTER_PAUSE;
}

static void on_cancel(struct sl_filter_run *run, void *state)
{
    (void)state;
    struct jwt_worker *jw = sl_filter_wstate(run);
    if (!jw)
        return;
    for (struct waiter *w = jw->waiters; w; w = w->next) {
        if (w->run == run) {
            waiter_unlink(jw, w);
            break;
        }
    }
    if (!jw->waiters)
        sl_timer_cancel(&jw->worker->loop, &jw->wait_timer);
}

const struct sl_filter_ops sl_filter_jwt = {
    .name = "jwt",
    .conf_type = &conf_type,
    .create = create,
    .destroy = destroy,
    .worker_init = worker_init,
    .worker_fini = worker_fini,
    .on_request = on_request,
    .on_cancel = on_cancel,
};
