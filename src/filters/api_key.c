/*
 * api_key: the caller presents a key (header, else query parameter); the filter hashes it with
 * SHA-256 and looks the hash up among the configured consumers. Only hashes are kept, so a
 * config may carry api_key_sha256 instead of the key itself, and lookups compare fixed-size
 * digests in constant time. The consumer's name becomes the request's identity (rate-limit
 * key `consumer`, logs) and is passed upstream in `consumer_header`.
 */
#include "filters/api_key.h"

#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <string.h>

#include <openssl/crypto.h>

#include "config/config.h"
#include "config/filter_conf.h"
#include "config/units.h"
#include "core/sha256.h"
#include "http/request.h"

struct api_key_conf {
    char *header;
    char *query;
    char **consumers;
    size_t consumer_count;
    bool strip;
    char *consumer_header;
};

struct consumer {
    unsigned char sha[32];
    const char *name;
    size_t name_len;
    bool allowed; /* in this filter's `consumers` list (or the list is empty) */
};

struct api_key_state {
    const struct api_key_conf *conf;
    struct consumer *slots; /* open addressing by the digest's first bytes */
    size_t mask;
    size_t consumer_header_len;
};

static const char *check_header_name(const char *s, size_t len, char *buf, size_t cap)
{
    (void)buf;
    (void)cap;
    return sl__config_is_token(s, len) ? NULL : "must be a valid header name";
}

static const char *check_param(const char *s, size_t len, char *buf, size_t cap)
{
    (void)buf;
    (void)cap;
    for (size_t i = 0; i < len; i++)
        if (s[i] == '&' || s[i] == '=' || s[i] == '#' || (unsigned char)s[i] <= 0x20)
            return "must be a plain query parameter name";
    return len ? NULL : "must not be empty";
}

static void conf_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct api_key_conf *k = elem;
    if (k->header && k->consumer_header && strcasecmp(k->header, k->consumer_header) == 0)
        sl__config_error(c, map, "header and consumer_header must differ");
}

#define FIELD(m) SL__FIELD(struct api_key_conf, m)

static const struct sl__schema_key conf_keys[] = {
    {.name = "header",
     .type = SL__T_STRING,
     FIELD(header),
     .def_str = "X-API-Key",
     .check = check_header_name},
    {.name = "query", .type = SL__T_STRING, FIELD(query), .check = check_param},
    {.name = "consumers",
     .type = SL__T_STRLIST,
     FIELD(consumers),
     .count_offset = offsetof(struct api_key_conf, consumer_count),
     .flags = SL__KEY_NONEMPTY},
    {.name = "strip", .type = SL__T_BOOL, FIELD(strip), .def = true},
    {.name = "consumer_header",
     .type = SL__T_STRING,
     FIELD(consumer_header),
     .def_str = "X-Consumer",
     .check = check_header_name},
};

static const struct sl__schema_section conf_section = {
    .keys = conf_keys,
    .key_count = sizeof conf_keys / sizeof conf_keys[0],
    .check = conf_check,
};

static const struct sl_config_filter_type conf_type = {
    .name = "api_key",
    .section = &conf_section,
    .conf_size = sizeof(struct api_key_conf),
};

static size_t slot_of(const unsigned char *sha, size_t mask)
{
    size_t h = 0;
    memcpy(&h, sha, sizeof h);
    return h & mask;
}

static int create(const void *vconf, const struct sl_config *cfg, void **out, char *err,
                  size_t err_len)
{
    const struct api_key_conf *conf = vconf;
    if (cfg->consumer_count == 0) {
        snprintf(err, err_len, "api_key needs consumers: declare them at the top level");
        return -1;
    }
    for (size_t i = 0; i < conf->consumer_count; i++) {
        size_t j = 0;
        while (j < cfg->consumer_count && strcmp(cfg->consumers[j].name, conf->consumers[i]) != 0)
            j++;
        if (j == cfg->consumer_count) {
            snprintf(err, err_len, "consumers: unknown consumer \"%s\"", conf->consumers[i]);
            return -1;
        }
    }
    struct api_key_state *st = calloc(1, sizeof *st);
    if (!st)
        goto oom;
    size_t cap = 4;
    while (cap < cfg->consumer_count * 2)
        cap *= 2;
    st->slots = calloc(cap, sizeof *st->slots);
    if (!st->slots)
        goto oom;
    st->mask = cap - 1;
    st->conf = conf;
    st->consumer_header_len = conf->consumer_header ? strlen(conf->consumer_header) : 0;
    for (size_t i = 0; i < cfg->consumer_count; i++) {
        const struct sl_consumer_conf *cc = &cfg->consumers[i];
        if (!cc->has_sha256)
            continue;
        size_t s = slot_of(cc->key_sha256, st->mask);
        while (st->slots[s].name) {
            if (memcmp(st->slots[s].sha, cc->key_sha256, 32) == 0) {
                snprintf(err, err_len, "consumers %s and %s share one key", st->slots[s].name,
                         cc->name);
                free(st->slots);
                free(st);
                return -1;
            }
            s = (s + 1) & st->mask;
        }
        memcpy(st->slots[s].sha, cc->key_sha256, 32);
        st->slots[s].name = cc->name;
        st->slots[s].name_len = strlen(cc->name);
        st->slots[s].allowed = conf->consumer_count == 0;
        for (size_t j = 0; j < conf->consumer_count; j++)
            if (strcmp(conf->consumers[j], cc->name) == 0)
                st->slots[s].allowed = true;
    }
    *out = st;
    return 0;
oom:
    if (st)
        free(st->slots);
    free(st);
    snprintf(err, err_len, "out of memory");
    return -1;
}

static void destroy(void *state)
{
    struct api_key_state *st = state;
    if (!st)
        return;
    free(st->slots);
    free(st);
}

static enum sl_filter_verdict deny(struct sl_filter_run *run, struct sl_request *req, int status,
                                   const char *error)
{
    if (status == 401) {
        run->extra_headers = "WWW-Authenticate: ApiKey\r\n";
        run->extra_len = strlen(run->extra_headers);
    }
    return sl_filter_reject(run, req, status, error);
}

static enum sl_filter_verdict on_request(struct sl_filter_run *run, struct sl_request *req,
                                         void *state)
{
    const struct api_key_state *st = state;
    const struct api_key_conf *conf = st->conf;
    struct sl_slice key = {0};
    bool found = sl_request_header(req, conf->header, &key);
    if (!found && conf->query)
        found = sl_request_query_param(req, conf->query, &key);
    if (!found || key.len == 0)
        return deny(run, req, 401, "missing_api_key");
    unsigned char sha[32];
    sl_sha256(key.ptr, key.len, sha);
    const struct consumer *hit = NULL;
    for (size_t s = slot_of(sha, st->mask); st->slots[s].name; s = (s + 1) & st->mask) {
        if (CRYPTO_memcmp(st->slots[s].sha, sha, 32) == 0) {
            hit = &st->slots[s];
            break;
        }
    }
    if (!hit)
        return deny(run, req, 401, "invalid_api_key");
    if (!hit->allowed)
        return deny(run, req, 403, "consumer_not_allowed");
    req->consumer = sl_slice_make(hit->name, hit->name_len);
    if (conf->strip)
        sl_request_header_remove(req, conf->header);
    if (conf->consumer_header) {
        sl_request_header_remove(req, conf->consumer_header);
        if (sl_request_header_append(req,
                                     sl_slice_make(conf->consumer_header, st->consumer_header_len),
                                     req->consumer) != 0)
            return sl_filter_reject(run, req, 503, "out_of_memory");
    }
    return SL_FILTER_CONTINUE;
}

const struct sl_filter_ops sl_filter_api_key = {
    .name = "api_key",
    .conf_type = &conf_type,
    .create = create,
    .destroy = destroy,
    .on_request = on_request,
};
