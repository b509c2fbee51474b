#include "config/config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "config/errors.h"
#include "config/filter_conf.h"
#include "config/schema.h"
#include "config/units.h"
#include "config/yaml_tree.h"
#include "core/cidr.h"
#include "core/fmt.h"
#include "core/slice.h"

#define SEC 1000ull
#define MIN (60 * SEC)
#define HOUR (60 * MIN)
#define KIB 1024ull
#define MIB (1024 * KIB)
#define GIB (1024ull * MIB)

/* Config files larger than this are certainly a mistake (a log, a binary). */
#define MAX_FILE_BYTES (16 * MIB)

/* ---- value checks (STRING `check` callbacks) ---------------------------------------------- */

bool sl_config_is_name(const char *s, size_t len)
{
    bool ok = len > 0 && len <= 64;
    for (size_t i = 0; ok && i < len; i++) {
        char ch = s[i];
        ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
             ch == '_' || ch == '-' || ch == '.';
    }
    return ok;
}

static const char *check_name(const char *s, size_t len, char *buf, size_t cap)
{
    if (sl_config_is_name(s, len))
        return NULL;
    char q[160];
    snprintf(buf, cap, "invalid name %s: use 1 to 64 letters, digits, '_', '-' or '.'",
             sl__config_quote(q, sizeof(q), s, len));
    return buf;
}

static const char *check_path(const char *s, size_t len, char *buf, size_t cap)
{
    (void)buf;
    (void)cap;
    if (len == 0 || s[0] != '/')
        return "must start with \"/\"";
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch <= 0x20 || ch == 0x7f || ch == '?' || ch == '#')
            return "must not contain spaces, control characters, '?' or '#'";
    }
    return NULL;
}

static const char *check_token(const char *s, size_t len, char *buf, size_t cap)
{
    if (sl__config_is_token(s, len))
        return NULL;
    char q[160];
    snprintf(buf, cap, "invalid header name %s (must be an HTTP token)",
             sl__config_quote(q, sizeof(q), s, len));
    return buf;
}

static const char *check_header_value(const char *s, size_t len, char *buf, size_t cap)
{
    (void)buf;
    (void)cap;
    for (size_t i = 0; i < len; i++)
        if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0')
            return "header value must not contain CR, LF or NUL";
    return NULL;
}

static bool is_host_char(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '-' || ch == '_';
}

static const char *check_host(const char *s, size_t len, char *buf, size_t cap)
{
    if (len == 0)
        return "must not be empty";
    if (s[0] == '[') {
        char v6[64];
        struct in6_addr a;
        if (len < 3 || s[len - 1] != ']' || len - 2 >= sizeof(v6))
            return "invalid IPv6 literal; write it as [::1]";
        memcpy(v6, s + 1, len - 2);
        v6[len - 2] = '\0';
        return inet_pton(AF_INET6, v6, &a) == 1 ? NULL : "invalid IPv6 literal; write it as [::1]";
    }
    size_t start = 0;
    if (s[0] == '*') {
        if (len < 3 || s[1] != '.')
            return "a wildcard must be the whole first label, e.g. *.example.com";
        start = 2;
    }
    if (memchr(s + start, '*', len - start))
        return "a wildcard must be the whole first label, e.g. *.example.com";
    if (memchr(s, ':', len))
        return "must not include a port (the port is ignored when matching)";
    size_t label = 0;
    for (size_t i = start; i < len; i++) {
        if (s[i] == '.') {
            if (label == 0)
                break;
            label = 0;
            continue;
        }
        if (!is_host_char(s[i]) || ++label > 63) {
            label = 0;
            break;
        }
    }
    if (label == 0 || len > 253) {
        char q[160];
        snprintf(buf, cap, "invalid host %s", sl__config_quote(q, sizeof(q), s, len));
        return buf;
    }
    return NULL;
}

/* ---- custom setters ----------------------------------------------------------------------- */

static void set_workers(struct sl__config_ctx *c, const struct sl__schema_key *k,
                        const struct sl_yaml_node *n, void *base)
{
    (void)k;
    struct sl_config *cfg = base;
    const char *s = sl__config_scalar(c, n, "\"auto\" or an integer in 1..256");
    if (!s)
        return;
    if (strcmp(s, "auto") == 0) {
        cfg->workers = 0;
        return;
    }
    unsigned v = 0;
    size_t i = 0;
    for (; s[i] >= '0' && s[i] <= '9' && i < 4; i++)
        v = v * 10 + (unsigned)(s[i] - '0');
    if (i == 0 || s[i] != '\0' || v < 1 || v > 256) {
        char q[160];
        sl__config_error(c, n, "expected \"auto\" or an integer in 1..256, got %s",
                         sl__config_q(q, sizeof(q), n));
        return;
    }
    cfg->workers = v;
}

static const struct sl__schema_section limits_section;

static void set_global_limits(struct sl__config_ctx *c, const struct sl__schema_key *k,
                              const struct sl_yaml_node *n, void *base)
{
    (void)k;
    (void)base;
    sl__config_schema_apply(c, &limits_section, n, &c->global_limits);
}

static void parse_address(struct sl__config_ctx *c, const struct sl_yaml_node *n, char **text,
                          struct sockaddr_storage *ss, socklen_t *ss_len)
{
    const char *s = sl__config_scalar(c, n, "an address (host:port)");
    if (!s)
        return;
    char msg[200], q[160];
    if (sl__config_address_parse(s, c->resolve, ss, ss_len, msg, sizeof(msg)) != 0) {
        sl__config_error(c, n, "invalid address %s: %s", sl__config_q(q, sizeof(q), n), msg);
        return;
    }
    free(*text);
    *text = sl__config_strndup(c, n->str, n->len);
}

static void set_listener_address(struct sl__config_ctx *c, const struct sl__schema_key *k,
                                 const struct sl_yaml_node *n, void *base)
{
    (void)k;
    struct sl_listener_conf *l = base;
    parse_address(c, n, &l->address, &l->addr, &l->addr_len);
}

static void set_endpoint_address(struct sl__config_ctx *c, const struct sl__schema_key *k,
                                 const struct sl_yaml_node *n, void *base)
{
    (void)k;
    struct sl_endpoint_conf *e = base;
    parse_address(c, n, &e->address, &e->addr, &e->addr_len);
}

static void endpoint_from_scalar(struct sl__config_ctx *c, const struct sl_yaml_node *n, void *elem)
{
    set_endpoint_address(c, NULL, n, elem);
}

static void set_hash_on(struct sl__config_ctx *c, const struct sl__schema_key *k,
                        const struct sl_yaml_node *n, void *base)
{
    (void)k;
    struct sl_upstream_conf *u = base;
    char q[160];
    const char *s = sl__config_scalar(c, n, "ip, header:NAME or cookie:NAME");
    if (!s)
        return;
    enum sl_hash_on on;
    size_t skip;
    if (strcmp(s, "ip") == 0) {
        u->hash_on = SL_HASH_IP;
        return;
    } else if (strncmp(s, "header:", 7) == 0) {
        on = SL_HASH_HEADER;
        skip = 7;
    } else if (strncmp(s, "cookie:", 7) == 0) {
        on = SL_HASH_COOKIE;
        skip = 7;
    } else {
        sl__config_error(c, n, "expected ip, header:NAME or cookie:NAME, got %s",
                         sl__config_q(q, sizeof(q), n));
        return;
    }
    if (!sl__config_is_token(s + skip, n->len - skip)) {
        sl__config_error(c, n, "invalid %s name %s (must be an HTTP token)",
                         on == SL_HASH_HEADER ? "header" : "cookie",
                         sl__config_quote(q, sizeof(q), s + skip, n->len - skip));
        return;
    }
    free(u->hash_key);
    u->hash_on = on;
    u->hash_key = sl__config_strndup(c, s + skip, n->len - skip);
}

static void free_pairs(struct sl_header_pair *p, size_t n)
{
    for (size_t i = 0; p && i < n; i++) {
        free(p[i].name);
        free(p[i].value);
    }
    free(p);
}

static void free_strings(char **p, size_t n)
{
    for (size_t i = 0; p && i < n; i++)
        free(p[i]);
    free(p);
}

/* A mapping of header name -> value into a sl_header_pair array at k->offset. */
static void set_header_map(struct sl__config_ctx *c, const struct sl__schema_key *k,
                           const struct sl_yaml_node *n, void *base)
{
    struct sl_header_pair **arr = (void *)((char *)base + k->offset);
    size_t *count = (void *)((char *)base + k->count_offset);
    char q[160], buf[256];
    if (n->kind != SL_YAML_MAP) {
        sl__config_error(c, n, "expected a mapping of header names to values, got %s",
                         sl__config_yaml_kind_name(n));
        return;
    }
    free_pairs(*arr, *count);
    *count = 0;
    *arr = n->count ? calloc(n->count, sizeof(**arr)) : NULL;
    if (n->count && !*arr) {
        sl__config_error(c, n, "out of memory");
        return;
    }
    for (size_t i = 0; i < n->count; i++) {
        const struct sl_yaml_node *key = n->keys[i], *val = n->items[i];
        size_t saved = sl__config_path_push_key(c, key->str, key->len);
        const char *msg = check_token(key->str, key->len, buf, sizeof(buf));
        if (msg) {
            sl__config_error(c, key, "%s", msg);
            goto next;
        }
        for (size_t j = 0; j < *count; j++) {
            if (strlen((*arr)[j].name) == key->len &&
                strncasecmp((*arr)[j].name, key->str, key->len) == 0) {
                sl__config_error(c, key, "duplicate header %s (header names are case-insensitive)",
                                 sl__config_q(q, sizeof(q), key));
                goto next;
            }
        }
        if (val->kind != SL_YAML_SCALAR || val->is_null) {
            sl__config_error(c, val, "expected a header value, got %s",
                             sl__config_yaml_kind_name(val));
            goto next;
        }
        if ((msg = check_header_value(val->str, val->len, buf, sizeof(buf)))) {
            sl__config_error(c, val, "%s", msg);
            goto next;
        }
        struct sl_header_pair *p = &(*arr)[*count];
        p->name = sl__config_strndup(c, key->str, key->len);
        p->value = sl__config_strndup(c, val->str, val->len);
        ++*count;
    next:
        sl__config_path_pop(c, saved);
    }
}

/* A list of strings into a char * array at k->offset, each checked with k->check. */
static void set_string_list(struct sl__config_ctx *c, const struct sl__schema_key *k,
                            const struct sl_yaml_node *n, void *base)
{
    char ***arr = (void *)((char *)base + k->offset);
    size_t *count = (void *)((char *)base + k->count_offset);
    char buf[256];
    if (n->kind != SL_YAML_SEQ) {
        sl__config_error(c, n, "expected a list, got %s", sl__config_yaml_kind_name(n));
        return;
    }
    free_strings(*arr, *count);
    *count = 0;
    *arr = n->count ? calloc(n->count, sizeof(**arr)) : NULL;
    if (n->count && !*arr) {
        sl__config_error(c, n, "out of memory");
        return;
    }
    for (size_t i = 0; i < n->count; i++) {
        const struct sl_yaml_node *item = n->items[i];
        size_t saved = sl__config_path_push_index(c, i);
        const char *s = sl__config_scalar(c, item, "a string");
        const char *msg = s && k->check ? k->check(s, item->len, buf, sizeof(buf)) : NULL;
        if (msg)
            sl__config_error(c, item, "%s", msg);
        else if (s)
            (*arr)[(*count)++] = sl__config_strndup(c, s, item->len);
        sl__config_path_pop(c, saved);
    }
}

static void set_methods(struct sl__config_ctx *c, const struct sl__schema_key *k,
                        const struct sl_yaml_node *n, void *base)
{
    (void)k;
    struct sl_route_match_conf *m = base;
    char q[160];
    if (n->kind != SL_YAML_SEQ) {
        sl__config_error(c, n, "expected a list of methods, got %s", sl__config_yaml_kind_name(n));
        return;
    }
    for (size_t i = 0; i < n->count; i++) {
        const struct sl_yaml_node *item = n->items[i];
        size_t saved = sl__config_path_push_index(c, i);
        const char *s = sl__config_scalar(c, item, "a method");
        if (!s)
            goto next;
        if (!sl__config_is_token(s, item->len)) {
            sl__config_error(c, item, "invalid method %s (must be an HTTP token)",
                             sl__config_q(q, sizeof(q), item));
            goto next;
        }
        enum sl_method bit = sl_method_from_token(s, item->len);
        if (bit != SL_METHOD_OTHER) {
            m->methods |= (uint32_t)bit;
            goto next;
        }
        /* Methods are case-sensitive (RFC 9110): `get` would silently never match GET. */
        char upper[16];
        if (item->len < sizeof(upper)) {
            for (size_t j = 0; j <= item->len; j++)
                upper[j] = (s[j] >= 'a' && s[j] <= 'z') ? (char)(s[j] - 32) : s[j];
            if (sl_method_from_token(upper, item->len) != SL_METHOD_OTHER) {
                sl__config_error(c, item,
                                 "unknown method %s (methods are case-sensitive; did you mean "
                                 "\"%s\"?)",
                                 sl__config_q(q, sizeof(q), item), upper);
                goto next;
            }
        }
        char **names = realloc(m->method_names, (m->method_name_count + 1) * sizeof(*names));
        if (!names) {
            sl__config_error(c, item, "out of memory");
            goto next;
        }
        m->method_names = names;
        char *copy = sl__config_strndup(c, s, item->len);
        if (copy)
            m->method_names[m->method_name_count++] = copy;
    next:
        sl__config_path_pop(c, saved);
    }
}

/* ---- section tables ----------------------------------------------------------------------- */

static const struct sl__schema_key limits_keys[] = {
    {.name = "max_header_bytes",
     .type = SL__T_SIZE,
     SL__FIELD(struct sl_limits_conf, max_header_bytes),
     .min = KIB,
     .max = 16 * MIB,
     .def = 16 * KIB},
    {.name = "max_header_count",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_limits_conf, max_header_count),
     .min = 1,
     .max = 10000,
     .def = 100},
    {.name = "max_uri_bytes",
     .type = SL__T_SIZE,
     SL__FIELD(struct sl_limits_conf, max_uri_bytes),
     .min = 256,
     .max = 16 * MIB,
     .def = 8 * KIB},
    {.name = "max_body_bytes",
     .type = SL__T_SIZE,
     SL__FIELD(struct sl_limits_conf, max_body_bytes),
     .min = 0,
     .max = UINT64_MAX,
     .def = 10 * MIB},
    {.name = "header_timeout",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_limits_conf, header_timeout_ms),
     .min = 1,
     .max = HOUR,
     .def = 10 * SEC},
    {.name = "body_timeout",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_limits_conf, body_timeout_ms),
     .min = 1,
     .max = 24 * HOUR,
     .def = 60 * SEC},
    {.name = "min_body_rate",
     .type = SL__T_SIZE,
     SL__FIELD(struct sl_limits_conf, min_body_rate),
     .min = 0,
     .max = GIB,
     .def = 100},
    {.name = "min_body_rate_after",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_limits_conf, min_body_rate_after_ms),
     .min = 0,
     .max = HOUR,
     .def = 10 * SEC},
    {.name = "idle_timeout",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_limits_conf, idle_timeout_ms),
     .min = 1,
     .max = 24 * HOUR,
     .def = 60 * SEC},
    {.name = "send_timeout",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_limits_conf, send_timeout_ms),
     .min = 1,
     .max = 24 * HOUR,
     .def = 60 * SEC},
    {.name = "max_requests_per_conn",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_limits_conf, max_requests_per_conn),
     .min = 0,
     .max = UINT32_MAX,
     .def = 0},
};

static const struct sl__schema_section limits_section = {
    .keys = limits_keys,
    .key_count = sizeof(limits_keys) / sizeof(limits_keys[0]),
};

static void listener_init(struct sl__config_ctx *c, void *elem, size_t index)
{
    (void)index;
    struct sl_listener_conf *l = elem;
    /* Global -> listener: start from the top-level limits; the listener's own keys win. */
    l->limits = c->global_limits;
}

static void error_at_key(struct sl__config_ctx *c, const struct sl_yaml_node *map, const char *key,
                         const char *msg);

/* HTTP is spoken as HTTP/1.1 only: offering another protocol in ALPN would make a peer that
 * picks it speak a language we do not. */
static void check_http_alpn(struct sl__config_ctx *c, const struct sl_yaml_node *tls_map,
                            char **alpn, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(alpn[i], "http/1.1") != 0) {
            char msg[400];
            snprintf(msg, sizeof msg,
                     "\"%.200s\" is not spoken here: HTTP goes as http/1.1 only (h2 comes with "
                     "HTTP/2)",
                     alpn[i]);
            error_at_key(c, tls_map, "alpn", msg);
            return;
        }
}

static void listener_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct sl_listener_conf *l = elem;
    l->line = map->line;
    l->col = map->col;
    if (l->protocol == SL_LISTENER_TCP && !l->upstream)
        sl__config_error(c, map, "protocol: tcp needs upstream: <name>");
    if (l->protocol == SL_LISTENER_HTTP && l->upstream)
        error_at_key(c, map, "upstream",
                     "only applies to protocol: tcp (HTTP listeners pick upstreams by route)");
    if (l->protocol == SL_LISTENER_HTTP && l->tls.alpn_count) {
        size_t saved = sl__config_path_push_key(c, "tls", 3);
        check_http_alpn(c, sl__config_yaml_get(map, "tls"), l->tls.alpn, l->tls.alpn_count);
        sl__config_path_pop(c, saved);
    }
}

static void listener_free(void *elem)
{
    struct sl_listener_conf *l = elem;
    free(l->address);
    l->address = NULL;
}

/* A list of CIDR prefixes into a struct sl_cidr array at k->offset (count at count_offset). */
static void set_cidr_list(struct sl__config_ctx *c, const struct sl__schema_key *k,
                          const struct sl_yaml_node *n, void *base)
{
    struct sl_cidr **arr = (void *)((char *)base + k->offset);
    size_t *count = (void *)((char *)base + k->count_offset);
    if (n->kind != SL_YAML_SEQ) {
        sl__config_error(c, n, "expected a list of addresses or prefixes (10.0.0.0/8), got %s",
                         sl__config_yaml_kind_name(n));
        return;
    }
    free(*arr);
    *count = 0;
    *arr = n->count ? calloc(n->count, sizeof(**arr)) : NULL;
    if (n->count && !*arr) {
        sl__config_error(c, n, "out of memory");
        return;
    }
    for (size_t i = 0; i < n->count; i++) {
        const struct sl_yaml_node *item = n->items[i];
        size_t saved = sl__config_path_push_index(c, i);
        const char *v = sl__config_scalar(c, item, "an address or prefix (10.0.0.0/8)");
        char msg[160];
        if (v && sl_cidr_parse(v, &(*arr)[*count], msg, sizeof msg) != 0)
            sl__config_error(c, item, "%s", msg);
        else if (v)
            (*count)++;
        sl__config_path_pop(c, saved);
    }
}

static void protection_free(void *elem)
{
    struct sl_protection_conf *p = elem;
    free(p->allow);
    free(p->deny);
    p->allow = p->deny = NULL;
    p->allow_count = p->deny_count = 0;
}

static const char *check_rate(const char *s, size_t len, char *buf, size_t cap)
{
    uint64_t period = 0;
    int rc = sl_config_parse_rate(s, len, &period);
    if (rc == -ERANGE)
        return "rate too high: at most 1000000/s";
    if (rc < 0) {
        snprintf(buf, cap, "invalid rate \"%.*s\": use N/s, N/m or N/h with N >= 1, e.g. 50/s",
                 (int)(len > 40 ? 40 : len), s);
        return buf;
    }
    return NULL;
}

static void protection_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct sl_protection_conf *p = elem;
    if (!p->new_connections_per_ip)
        return;
    uint64_t period = 0;
    if (sl_config_parse_rate(p->new_connections_per_ip, strlen(p->new_connections_per_ip),
                             &period) != 0)
        return; /* check_rate reported it */
    p->new_connection_period_us = period;
    if (!sl__config_yaml_get(map, "new_connections_burst")) {
        /* One period's worth at once: a browser opening its 6 connections, a pool warming up. */
        uint64_t per_s = 1000000 / period;
        p->new_connections_burst = per_s < 1 ? 1 : per_s > 100000 ? 100000 : (uint32_t)per_s;
    }
    /* The limiter keeps burst x period in 42 bits of microseconds. */
    if ((uint64_t)p->new_connections_burst * period >= (1ull << 42)) {
        char msg[200];
        snprintf(msg, sizeof msg,
                 "%u connections at %s is a burst of over 50 days of the rate; use a smaller "
                 "burst or a faster rate",
                 p->new_connections_burst, p->new_connections_per_ip);
        error_at_key(c, map,
                     sl__config_yaml_get(map, "new_connections_burst") ? "new_connections_burst"
                                                                       : "new_connections_per_ip",
                     msg);
    }
}

static const struct sl__schema_key protection_keys[] = {
    {.name = "allow",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_protection_conf, allow),
     .count_offset = offsetof(struct sl_protection_conf, allow_count),
     .set = set_cidr_list},
    {.name = "deny",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_protection_conf, deny),
     .count_offset = offsetof(struct sl_protection_conf, deny_count),
     .set = set_cidr_list},
    {.name = "max_connections_per_ip",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_protection_conf, max_connections_per_ip),
     .min = 0,
     .max = 16382,
     .def = 0},
    {.name = "new_connections_per_ip",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_protection_conf, new_connections_per_ip),
     .check = check_rate},
    {.name = "new_connections_burst",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_protection_conf, new_connections_burst),
     .min = 1,
     .max = 100000,
     .def = 1},
    {.name = "tracked_addresses",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_protection_conf, tracked_addresses),
     .min = 16,
     .max = 1u << 23,
     .def = 65536},
};

static const struct sl__schema_section protection_section = {
    .keys = protection_keys,
    .key_count = sizeof(protection_keys) / sizeof(protection_keys[0]),
    .check = protection_check,
    .free = protection_free,
};

/* ---- TLS and PROXY protocol ---- */

/*
 * A file path: relative ones are taken from the config file's directory (so a config and its
 * certificates move together), and the file must be readable now, so that a typo is a located
 * error rather than a failed start.
 */
/* A relative path is taken from the config file's directory. False on OOM (reported). */
static bool resolve_relative(struct sl__config_ctx *c, const struct sl_yaml_node *map, char **path)
{
    if (!*path || (*path)[0] == '/' || !c->file_dir)
        return true;
    size_t dl = strlen(c->file_dir), pl = strlen(*path);
    char *full = malloc(dl + pl + 2);
    if (!full) {
        sl__config_error(c, map, "out of memory");
        return false;
    }
    memcpy(full, c->file_dir, dl);
    full[dl] = '/';
    memcpy(full + dl + 1, *path, pl + 1);
    free(*path);
    *path = full;
    return true;
}

static void resolve_file(struct sl__config_ctx *c, const struct sl_yaml_node *map, const char *key,
                         char **path)
{
    if (!*path || !resolve_relative(c, map, path))
        return;
    if (access(*path, R_OK) != 0) {
        char msg[4200];
        snprintf(msg, sizeof msg, "cannot read %s: %s", *path, strerror(errno));
        error_at_key(c, map, key, msg);
    }
}

static void tls_cert_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct sl_tls_cert_conf *t = elem;
    resolve_file(c, map, "cert", &t->cert);
    resolve_file(c, map, "key", &t->key);
}

static const struct sl__schema_key tls_cert_keys[] = {
    {.name = "cert",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_tls_cert_conf, cert),
     .flags = SL__KEY_REQUIRED | SL__KEY_NONEMPTY},
    {.name = "key",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_tls_cert_conf, key),
     .flags = SL__KEY_REQUIRED | SL__KEY_NONEMPTY},
};

static const struct sl__schema_section tls_cert_section = {
    .keys = tls_cert_keys,
    .key_count = sizeof(tls_cert_keys) / sizeof(tls_cert_keys[0]),
    .elem_size = sizeof(struct sl_tls_cert_conf),
    .check = tls_cert_check,
};

static const char *const tls_version_names[] = {"1.2", "1.3", NULL};
static const char *const client_auth_names[] = {"required", "optional", NULL};

static const char *check_alpn(const char *s, size_t len, char *buf, size_t cap)
{
    (void)s;
    (void)buf;
    (void)cap;
    if (len == 0 || len > 255)
        return "an ALPN protocol name is 1 to 255 bytes";
    return NULL;
}

static void listener_tls_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct sl_listener_tls_conf *t = elem;
    t->enabled = true;
    if (t->certificate_count == 0 && !sl__config_yaml_get(map, "certificates"))
        sl__config_error(c, map, "needs certificates: [{cert: ..., key: ...}]");
    resolve_file(c, map, "client_ca", &t->client_ca);
    if (sl__config_yaml_get(map, "client_auth") && !t->client_ca)
        error_at_key(c, map, "client_auth", "needs client_ca");
}

static const struct sl__schema_key listener_tls_keys[] = {
    {.name = "certificates",
     .type = SL__T_LIST,
     SL__FIELD(struct sl_listener_tls_conf, certificates),
     .count_offset = offsetof(struct sl_listener_tls_conf, certificate_count),
     .min = 1,
     .section = &tls_cert_section},
    {.name = "min_version",
     .type = SL__T_ENUM,
     SL__FIELD(struct sl_listener_tls_conf, min_version),
     .enum_names = tls_version_names,
     .def = SL_TLS_V1_2},
    {.name = "ciphers", .type = SL__T_STRING, SL__FIELD(struct sl_listener_tls_conf, ciphers)},
    {.name = "ciphersuites",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_listener_tls_conf, ciphersuites)},
    {.name = "alpn",
     .type = SL__T_STRLIST,
     SL__FIELD(struct sl_listener_tls_conf, alpn),
     .count_offset = offsetof(struct sl_listener_tls_conf, alpn_count),
     .check = check_alpn},
    {.name = "client_ca", .type = SL__T_STRING, SL__FIELD(struct sl_listener_tls_conf, client_ca)},
    {.name = "client_auth",
     .type = SL__T_ENUM,
     SL__FIELD(struct sl_listener_tls_conf, client_auth),
     .enum_names = client_auth_names,
     .def = SL_TLS_CLIENT_AUTH_CONF_REQUIRED},
    {.name = "session_tickets",
     .type = SL__T_BOOL,
     SL__FIELD(struct sl_listener_tls_conf, session_tickets),
     .def = true},
    {.name = "ticket_rotation",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_listener_tls_conf, ticket_rotation_ms),
     .min = SEC,
     .max = 7 * 24 * HOUR,
     .def = HOUR},
    {.name = "handshake_timeout",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_listener_tls_conf, handshake_timeout_ms),
     .min = 1,
     .max = HOUR,
     .def = 10 * SEC},
    {.name = "watch",
     .type = SL__T_BOOL,
     SL__FIELD(struct sl_listener_tls_conf, watch),
     .def = true},
};

static const struct sl__schema_section listener_tls_section = {
    .keys = listener_tls_keys,
    .key_count = sizeof(listener_tls_keys) / sizeof(listener_tls_keys[0]),
    .check = listener_tls_check,
};

static void pp_accept_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct sl_pp_accept_conf *p = elem;
    if (p->accept && p->trusted_count == 0 && !sl__config_yaml_get(map, "trusted"))
        sl__config_error(c, map,
                         "accept: true needs trusted: [addresses or prefixes] (a PROXY header "
                         "from anyone would let any client choose its own address)");
}

static void pp_accept_free(void *elem)
{
    struct sl_pp_accept_conf *p = elem;
    free(p->trusted);
    p->trusted = NULL;
    p->trusted_count = 0;
}

static const struct sl__schema_key pp_accept_keys[] = {
    {.name = "accept", .type = SL__T_BOOL, SL__FIELD(struct sl_pp_accept_conf, accept), .def = 0},
    {.name = "trusted",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_pp_accept_conf, trusted),
     .count_offset = offsetof(struct sl_pp_accept_conf, trusted_count),
     .set = set_cidr_list},
    {.name = "timeout",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_pp_accept_conf, timeout_ms),
     .min = 1,
     .max = 10 * 60 * SEC,
     .def = 5 * SEC},
};

static const struct sl__schema_section pp_accept_section = {
    .keys = pp_accept_keys,
    .key_count = sizeof(pp_accept_keys) / sizeof(pp_accept_keys[0]),
    .check = pp_accept_check,
    .free = pp_accept_free,
};

static const char *const listener_protocol_names[] = {"http", "tcp", NULL};

static const struct sl__schema_key listener_keys[] = {
    {.name = "name",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_listener_conf, name),
     .check = check_name,
     .flags = SL__KEY_REQUIRED},
    {.name = "address",
     .type = SL__T_CUSTOM,
     .set = set_listener_address,
     .flags = SL__KEY_REQUIRED},
    {.name = "backlog",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_listener_conf, backlog),
     .min = 1,
     .max = 65535,
     .def = 4096},
    {.name = "limits",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_listener_conf, limits),
     .section = &limits_section},
    {.name = "protection",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_listener_conf, protection),
     .section = &protection_section},
    {.name = "protocol",
     .type = SL__T_ENUM,
     SL__FIELD(struct sl_listener_conf, protocol),
     .enum_names = listener_protocol_names,
     .def = SL_LISTENER_HTTP},
    {.name = "upstream",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_listener_conf, upstream),
     .check = check_name},
    {.name = "tls",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_listener_conf, tls),
     .section = &listener_tls_section,
     .flags = SL__KEY_LAZY},
    {.name = "proxy_protocol",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_listener_conf, proxy_protocol),
     .section = &pp_accept_section},
};

static const struct sl__schema_section listener_section = {
    .keys = listener_keys,
    .key_count = sizeof(listener_keys) / sizeof(listener_keys[0]),
    .elem_size = sizeof(struct sl_listener_conf),
    .init = listener_init,
    .check = listener_check,
    .free = listener_free,
};

static void endpoint_free(void *elem)
{
    struct sl_endpoint_conf *e = elem;
    free(e->address);
    e->address = NULL;
}

static const struct sl__schema_key endpoint_keys[] = {
    {.name = "address",
     .type = SL__T_CUSTOM,
     .set = set_endpoint_address,
     .flags = SL__KEY_REQUIRED},
    {.name = "weight",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_endpoint_conf, weight),
     .min = 1,
     .max = 1000,
     .def = 1},
    {.name = "zone",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_endpoint_conf, zone),
     .check = check_name},
};

static const struct sl__schema_section endpoint_section = {
    .keys = endpoint_keys,
    .key_count = sizeof(endpoint_keys) / sizeof(endpoint_keys[0]),
    .elem_size = sizeof(struct sl_endpoint_conf),
    .from_scalar = endpoint_from_scalar,
    .free = endpoint_free,
};

/* keepalive: and timeouts: are nested in the file but flat in sl_upstream_conf, so these
 * sections' offsets are relative to the upstream itself (SECTION at offset 0). */
static const struct sl__schema_key keepalive_keys[] = {
    {.name = "max_idle",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_upstream_conf, keepalive_max_idle),
     .min = 0,
     .max = 65535,
     .def = 64},
    {.name = "idle_timeout",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_upstream_conf, keepalive_idle_timeout_ms),
     .min = 1,
     .max = HOUR,
     .def = 30 * SEC},
};

static const struct sl__schema_section keepalive_section = {
    .keys = keepalive_keys,
    .key_count = sizeof(keepalive_keys) / sizeof(keepalive_keys[0]),
};

static const struct sl__schema_key timeouts_keys[] = {
    {.name = "connect",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_upstream_conf, connect_timeout_ms),
     .min = 1,
     .max = 10 * MIN,
     .def = 1 * SEC},
    {.name = "response",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_upstream_conf, response_timeout_ms),
     .min = 1,
     .max = 24 * HOUR,
     .def = 15 * SEC},
    {.name = "idle",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_upstream_conf, idle_timeout_ms),
     .min = 1,
     .max = 24 * HOUR,
     .def = 60 * SEC},
};

static const struct sl__schema_section timeouts_section = {
    .keys = timeouts_keys,
    .key_count = sizeof(timeouts_keys) / sizeof(timeouts_keys[0]),
};

/* ---- upstream resilience: health, breakers, retries, zones, discovery ---- */

static void error_at_key(struct sl__config_ctx *c, const struct sl_yaml_node *map, const char *key,
                         const char *msg);

/* "20%" or, for a percent key, "20"; "0.2" or "20%" for a ratio key. Stored as permille. */
static bool parse_share(const char *s, size_t len, bool plain_is_percent, uint32_t *out_permille)
{
    bool pct = len > 0 && s[len - 1] == '%';
    size_t end = pct ? len - 1 : len;
    uint64_t ip = 0, frac = 0, fdiv = 1;
    size_t i = 0;
    for (; i < end && s[i] >= '0' && s[i] <= '9' && i < 6; i++)
        ip = ip * 10 + (uint64_t)(s[i] - '0');
    size_t int_digits = i;
    if (i < end && s[i] == '.') {
        i++;
        for (size_t d = 0; i < end && s[i] >= '0' && s[i] <= '9' && d < 6; i++, d++) {
            frac = frac * 10 + (uint64_t)(s[i] - '0');
            fdiv *= 10;
        }
    }
    if (i != end || (int_digits == 0 && fdiv == 1))
        return false;
    uint64_t permille =
        pct || plain_is_percent ? ip * 10 + frac * 10 / fdiv : ip * 1000 + frac * 1000 / fdiv;
    if (permille > 1000)
        return false;
    *out_permille = (uint32_t)permille;
    return true;
}

static void set_share(struct sl__config_ctx *c, const struct sl__schema_key *k,
                      const struct sl_yaml_node *n, void *base, bool percent)
{
    const char *s =
        sl__config_scalar(c, n, percent ? "a percentage (\"20%\")" : "a ratio (0.5 or \"50%\")");
    if (!s)
        return;
    uint32_t pm = 0;
    if (!parse_share(s, n->len, percent, &pm)) {
        char q[160];
        sl__config_error(c, n, "expected %s, got %s",
                         percent ? "a percentage from 0% to 100% (like \"20%\")"
                                 : "a ratio from 0 to 1 (like 0.5 or \"50%\")",
                         sl__config_q(q, sizeof(q), n));
        return;
    }
    uint32_t *field = (void *)((char *)base + k->offset);
    *field = percent ? pm / 10 : pm;
}

static void set_permille(struct sl__config_ctx *c, const struct sl__schema_key *k,
                         const struct sl_yaml_node *n, void *base)
{
    set_share(c, k, n, base, false);
}

static void set_percent(struct sl__config_ctx *c, const struct sl__schema_key *k,
                        const struct sl_yaml_node *n, void *base)
{
    set_share(c, k, n, base, true);
}

static void status_set_add(struct sl_status_set *set, int lo, int hi)
{
    for (int st = lo; st <= hi; st++) {
        unsigned i = (unsigned)(st - 100);
        set->bits[i / 64] |= 1ull << (i % 64);
    }
}

/* One status "503" or a class "5xx" into `set`; false when it is neither. */
static bool parse_status_item(const char *s, size_t len, struct sl_status_set *set)
{
    if (len != 3)
        return false;
    if (s[0] < '1' || s[0] > '5')
        return false;
    if ((s[1] == 'x' || s[1] == 'X') && (s[2] == 'x' || s[2] == 'X')) {
        int lo = (s[0] - '0') * 100;
        status_set_add(set, lo, lo + 99);
        return true;
    }
    if (s[1] < '0' || s[1] > '9' || s[2] < '0' || s[2] > '9')
        return false;
    int st = (s[0] - '0') * 100 + (s[1] - '0') * 10 + (s[2] - '0');
    status_set_add(set, st, st);
    return true;
}

static void set_status_list(struct sl__config_ctx *c, const struct sl__schema_key *k,
                            const struct sl_yaml_node *n, void *base)
{
    struct sl_status_set *set = (void *)((char *)base + k->offset);
    struct sl_status_set tmp = {{0}};
    if (n->kind != SL_YAML_SEQ) {
        sl__config_error(c, n, "expected a list of statuses (503 or \"5xx\"), got %s",
                         sl__config_yaml_kind_name(n));
        return;
    }
    for (size_t i = 0; i < n->count; i++) {
        const struct sl_yaml_node *item = n->items[i];
        size_t saved = sl__config_path_push_index(c, i);
        const char *v = sl__config_scalar(c, item, "a status (503) or a class (\"5xx\")");
        if (v && !parse_status_item(v, item->len, &tmp)) {
            char q[160];
            sl__config_error(c, item, "expected a status 100..599 or a class like \"5xx\", got %s",
                             sl__config_q(q, sizeof(q), item));
        }
        sl__config_path_pop(c, saved);
    }
    *set = tmp;
}

/* retries.on: condition names and statuses. */
static void set_retry_on(struct sl__config_ctx *c, const struct sl__schema_key *k,
                         const struct sl_yaml_node *n, void *base)
{
    (void)k;
    struct sl_retry_conf *r = base;
    uint32_t on = 0;
    struct sl_status_set st = {{0}};
    if (n->kind != SL_YAML_SEQ) {
        sl__config_error(c, n,
                         "expected a list like [connect_failure, reset, timeout, 503], got %s",
                         sl__config_yaml_kind_name(n));
        return;
    }
    for (size_t i = 0; i < n->count; i++) {
        const struct sl_yaml_node *item = n->items[i];
        size_t saved = sl__config_path_push_index(c, i);
        const char *v = sl__config_scalar(c, item, "a retry condition");
        if (v) {
            if (strcmp(v, "connect_failure") == 0)
                on |= SL_RETRY_CONNECT_FAILURE;
            else if (strcmp(v, "reset") == 0)
                on |= SL_RETRY_RESET;
            else if (strcmp(v, "timeout") == 0)
                on |= SL_RETRY_TIMEOUT;
            else if (!parse_status_item(v, item->len, &st)) {
                char q[160];
                sl__config_error(c, item,
                                 "expected connect_failure, reset, timeout, a status (503) or a "
                                 "class (\"5xx\"), got %s",
                                 sl__config_q(q, sizeof(q), item));
            }
        }
        sl__config_path_pop(c, saved);
    }
    r->on = on;
    r->statuses = st;
}

static const struct sl__schema_key passive_keys[] = {
    {.name = "enabled",
     .type = SL__T_BOOL,
     SL__FIELD(struct sl_passive_health_conf, enabled),
     .def = true},
    {.name = "consecutive_failures",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_passive_health_conf, consecutive_failures),
     .min = 0,
     .max = 1000,
     .def = 5},
    {.name = "failure_ratio",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_passive_health_conf, failure_ratio_permille),
     .set = set_permille},
    {.name = "min_requests",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_passive_health_conf, min_requests),
     .min = 1,
     .max = 1000000,
     .def = 20},
    {.name = "window",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_passive_health_conf, window_ms),
     .min = 100,
     .max = HOUR,
     .def = 10 * SEC},
    {.name = "ejection",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_passive_health_conf, ejection_ms),
     .min = 10,
     .max = HOUR,
     .def = 5 * SEC},
    {.name = "max_ejection",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_passive_health_conf, max_ejection_ms),
     .min = 10,
     .max = 24 * HOUR,
     .def = 5 * MIN},
    {.name = "max_ejection_percent",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_passive_health_conf, max_ejection_percent),
     .set = set_percent},
    {.name = "half_open_requests",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_passive_health_conf, half_open_requests),
     .min = 1,
     .max = 100,
     .def = 1},
    {.name = "statuses",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_passive_health_conf, statuses),
     .set = set_status_list},
};

static const struct sl__schema_section passive_section = {
    .keys = passive_keys,
    .key_count = sizeof(passive_keys) / sizeof(passive_keys[0]),
};

static void active_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct sl_active_health_conf *a = elem;
    a->enabled = true;
    if (a->timeout_ms >= a->interval_ms)
        error_at_key(c, map, "timeout", "must be shorter than the interval");
}

static const struct sl__schema_key active_keys[] = {
    {.name = "path",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_active_health_conf, path),
     .check = check_path},
    {.name = "host", .type = SL__T_STRING, SL__FIELD(struct sl_active_health_conf, host)},
    {.name = "interval",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_active_health_conf, interval_ms),
     .min = 50,
     .max = HOUR,
     .def = 5 * SEC},
    {.name = "timeout",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_active_health_conf, timeout_ms),
     .min = 10,
     .max = 10 * MIN,
     .def = 1 * SEC},
    {.name = "healthy",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_active_health_conf, healthy),
     .min = 1,
     .max = 100,
     .def = 2},
    {.name = "unhealthy",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_active_health_conf, unhealthy),
     .min = 1,
     .max = 100,
     .def = 3},
    {.name = "statuses",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_active_health_conf, statuses),
     .set = set_status_list},
};

static const struct sl__schema_section active_section = {
    .keys = active_keys,
    .key_count = sizeof(active_keys) / sizeof(active_keys[0]),
    .check = active_check,
};

/* health: is nested in the file, passive/active are fields of the upstream. */
static const struct sl__schema_key health_keys[] = {
    {.name = "passive",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_upstream_conf, passive),
     .section = &passive_section},
    {.name = "active",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_upstream_conf, active),
     .section = &active_section,
     .flags = SL__KEY_LAZY},
};

static const struct sl__schema_section health_section = {
    .keys = health_keys,
    .key_count = sizeof(health_keys) / sizeof(health_keys[0]),
};

static const struct sl__schema_key breaker_keys[] = {
    {.name = "max_connections",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_breaker_conf, max_connections),
     .min = 0,
     .max = 10000000,
     .def = 0},
    {.name = "max_pending",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_breaker_conf, max_pending),
     .min = 0,
     .max = 10000000,
     .def = 0},
    {.name = "max_requests",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_breaker_conf, max_requests),
     .min = 0,
     .max = 10000000,
     .def = 0},
};

static const struct sl__schema_section breaker_section = {
    .keys = breaker_keys,
    .key_count = sizeof(breaker_keys) / sizeof(breaker_keys[0]),
};

static const struct sl__schema_key backoff_keys[] = {
    {.name = "base",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_retry_conf, backoff_base_ms),
     .min = 0,
     .max = MIN,
     .def = 25},
    {.name = "max",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_retry_conf, backoff_max_ms),
     .min = 0,
     .max = 10 * MIN,
     .def = 250},
};

static const struct sl__schema_section backoff_section = {
    .keys = backoff_keys,
    .key_count = sizeof(backoff_keys) / sizeof(backoff_keys[0]),
};

static void retry_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct sl_retry_conf *r = elem;
    if (r->backoff_max_ms < r->backoff_base_ms)
        error_at_key(c, map, "backoff", "max must not be below base");
}

static const struct sl__schema_key retry_keys[] = {
    {.name = "attempts",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_retry_conf, attempts),
     .min = 0,
     .max = 10,
     .def = 2},
    {.name = "on", .type = SL__T_CUSTOM, .set = set_retry_on},
    {.name = "per_try_timeout",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_retry_conf, per_try_timeout_ms),
     .min = 0,
     .max = 24 * HOUR,
     .def = 0},
    {.name = "backoff", .type = SL__T_SECTION, .offset = 0, .section = &backoff_section},
    {.name = "budget",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_retry_conf, budget_percent),
     .set = set_percent},
    {.name = "min_retries",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_retry_conf, min_retries),
     .min = 0,
     .max = 1000000,
     .def = 10},
    {.name = "non_idempotent",
     .type = SL__T_BOOL,
     SL__FIELD(struct sl_retry_conf, non_idempotent),
     .def = false},
    {.name = "max_body",
     .type = SL__T_SIZE,
     SL__FIELD(struct sl_retry_conf, max_body_bytes),
     .min = 0,
     .max = 16 * MIB,
     .def = 64 * KIB},
};

static const struct sl__schema_section retry_section = {
    .keys = retry_keys,
    .key_count = sizeof(retry_keys) / sizeof(retry_keys[0]),
    .check = retry_check,
};

static void retry_defaults(struct sl_retry_conf *r)
{
    r->on = SL_RETRY_CONNECT_FAILURE | SL_RETRY_RESET | SL_RETRY_TIMEOUT;
    memset(&r->statuses, 0, sizeof r->statuses);
    status_set_add(&r->statuses, 502, 504);
    r->budget_percent = 20;
}

static const struct sl__schema_key zone_aware_keys[] = {
    {.name = "enabled",
     .type = SL__T_BOOL,
     SL__FIELD(struct sl_zone_aware_conf, enabled),
     .def = false},
    {.name = "panic_threshold",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_zone_aware_conf, panic_percent),
     .set = set_percent},
};

static const struct sl__schema_section zone_aware_section = {
    .keys = zone_aware_keys,
    .key_count = sizeof(zone_aware_keys) / sizeof(zone_aware_keys[0]),
};

static void set_discovery_source(struct sl__config_ctx *c, const struct sl_yaml_node *n,
                                 struct sl_discovery_conf *d, enum sl_discovery_kind kind)
{
    const char *s =
        sl__config_scalar(c, n, kind == SL_DISCOVERY_FILE ? "a file path" : "a DNS name");
    if (!s)
        return;
    if (d->kind != SL_DISCOVERY_NONE) {
        sl__config_error(c, n, "only one of dns, srv and file may be given");
        return;
    }
    if (n->len == 0 || memchr(s, '\0', n->len)) {
        sl__config_error(c, n, "must not be empty");
        return;
    }
    if (kind != SL_DISCOVERY_FILE) {
        bool ok = n->len <= 253;
        for (size_t i = 0; ok && i < n->len; i++) {
            char ch = s[i];
            ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                 ch == '-' || ch == '_' || ch == '.';
        }
        if (!ok) {
            char q[160];
            sl__config_error(c, n, "invalid DNS name %s", sl__config_q(q, sizeof(q), n));
            return;
        }
    }
    d->kind = kind;
    free(d->name);
    d->name = sl__config_strndup(c, s, n->len);
}

static void set_discovery_dns(struct sl__config_ctx *c, const struct sl__schema_key *k,
                              const struct sl_yaml_node *n, void *base)
{
    (void)k;
    set_discovery_source(c, n, base, SL_DISCOVERY_DNS);
}

static void set_discovery_srv(struct sl__config_ctx *c, const struct sl__schema_key *k,
                              const struct sl_yaml_node *n, void *base)
{
    (void)k;
    set_discovery_source(c, n, base, SL_DISCOVERY_SRV);
}

static void set_discovery_file(struct sl__config_ctx *c, const struct sl__schema_key *k,
                               const struct sl_yaml_node *n, void *base)
{
    (void)k;
    set_discovery_source(c, n, base, SL_DISCOVERY_FILE);
}

static void discovery_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct sl_discovery_conf *d = elem;
    d->line = map->line;
    d->col = map->col;
    bool named = sl__config_yaml_get(map, "dns") || sl__config_yaml_get(map, "srv") ||
                 sl__config_yaml_get(map, "file");
    if (!named)
        sl__config_error(c, map, "needs one of dns, srv or file");
    if (d->kind == SL_DISCOVERY_DNS && d->port == 0)
        sl__config_error(c, map, "dns needs a port");
    if ((d->kind == SL_DISCOVERY_SRV || d->kind == SL_DISCOVERY_FILE) &&
        sl__config_yaml_get(map, "port"))
        error_at_key(c, map, "port", "only applies to dns (srv records carry their ports)");
    if (d->kind == SL_DISCOVERY_FILE &&
        (sl__config_yaml_get(map, "zone") || sl__config_yaml_get(map, "weight")))
        error_at_key(c, map, sl__config_yaml_get(map, "zone") ? "zone" : "weight",
                     "comes from the file for file discovery");
    if (d->max_interval_ms < d->min_interval_ms)
        error_at_key(c, map, "max_interval", "must not be below min_interval");
    if (d->kind == SL_DISCOVERY_FILE && d->name) {
        /* The file may appear later, but its directory is watched from the start. */
        char dir[4096];
        const char *slash = strrchr(d->name, '/');
        size_t len = slash ? (size_t)(slash - d->name) : 1;
        if (len == 0)
            len = 1; /* "/file" lives in "/" */
        if (len < sizeof dir) {
            memcpy(dir, slash ? d->name : ".", len);
            dir[len] = '\0';
            struct stat st;
            if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
                char msg[4200];
                snprintf(msg, sizeof msg, "directory %s does not exist", dir);
                error_at_key(c, map, "file", msg);
            }
        }
    }
}

static void discovery_free(void *elem)
{
    struct sl_discovery_conf *d = elem;
    free(d->name);
    d->name = NULL;
}

static const struct sl__schema_key discovery_keys[] = {
    {.name = "dns", .type = SL__T_CUSTOM, .set = set_discovery_dns},
    {.name = "srv", .type = SL__T_CUSTOM, .set = set_discovery_srv},
    {.name = "file", .type = SL__T_CUSTOM, .set = set_discovery_file},
    {.name = "port",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_discovery_conf, port),
     .min = 1,
     .max = 65535,
     .def = 0},
    {.name = "weight",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_discovery_conf, weight),
     .min = 1,
     .max = 1000,
     .def = 1},
    {.name = "zone",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_discovery_conf, zone),
     .check = check_name},
    {.name = "min_interval",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_discovery_conf, min_interval_ms),
     .min = 100,
     .max = HOUR,
     .def = 1 * SEC},
    {.name = "max_interval",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_discovery_conf, max_interval_ms),
     .min = 100,
     .max = 24 * HOUR,
     .def = 5 * MIN},
};

static const struct sl__schema_section discovery_section = {
    .keys = discovery_keys,
    .key_count = sizeof(discovery_keys) / sizeof(discovery_keys[0]),
    .check = discovery_check,
    .free = discovery_free,
};

static void upstream_init(struct sl__config_ctx *c, void *elem, size_t index)
{
    (void)c;
    (void)index;
    struct sl_upstream_conf *u = elem;
    status_set_add(&u->passive.statuses, 502, 504);
    u->passive.max_ejection_percent = 50;
    status_set_add(&u->active.statuses, 200, 399);
    retry_defaults(&u->retries);
    u->zone_aware.panic_percent = 50;
}

static const char *const balance_names[] = {"round_robin", "least_request", "hash", NULL};

static void upstream_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct sl_upstream_conf *u = elem;
    u->line = map->line;
    u->col = map->col;
    if (u->endpoint_count == 0 && u->discovery.kind == SL_DISCOVERY_NONE &&
        !sl__config_yaml_get(map, "discovery")) {
        if (sl__config_yaml_get(map, "endpoints"))
            error_at_key(c, map, "endpoints",
                         "needs at least one endpoint (or a discovery source)");
        else
            sl__config_error(c, map, "needs endpoints or discovery");
    }
    /* hash_on is deliberately not an error without `balance: hash`: it is ignored, so a
     * balancer can be switched by editing one line. */
}

static void upstream_free(void *elem)
{
    struct sl_upstream_conf *u = elem;
    free(u->hash_key);
    u->hash_key = NULL;
}

static void upstream_tls_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct sl_upstream_tls_conf *t = elem;
    t->enabled = true;
    resolve_file(c, map, "ca_file", &t->ca_file);
    resolve_file(c, map, "client_cert", &t->client_cert);
    resolve_file(c, map, "client_key", &t->client_key);
    if (!t->client_cert != !t->client_key)
        sl__config_error(c, map, "client_cert and client_key go together");
    check_http_alpn(c, map, t->alpn, t->alpn_count);
}

static const struct sl__schema_key upstream_tls_keys[] = {
    {.name = "verify",
     .type = SL__T_BOOL,
     SL__FIELD(struct sl_upstream_tls_conf, verify),
     .def = 1},
    {.name = "ca_file", .type = SL__T_STRING, SL__FIELD(struct sl_upstream_tls_conf, ca_file)},
    {.name = "sni",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_upstream_tls_conf, sni),
     .check = check_host},
    {.name = "client_cert",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_upstream_tls_conf, client_cert)},
    {.name = "client_key",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_upstream_tls_conf, client_key)},
    {.name = "min_version",
     .type = SL__T_ENUM,
     SL__FIELD(struct sl_upstream_tls_conf, min_version),
     .enum_names = tls_version_names,
     .def = SL_TLS_V1_2},
    {.name = "alpn",
     .type = SL__T_STRLIST,
     SL__FIELD(struct sl_upstream_tls_conf, alpn),
     .count_offset = offsetof(struct sl_upstream_tls_conf, alpn_count),
     .check = check_alpn},
};

static const struct sl__schema_section upstream_tls_section = {
    .keys = upstream_tls_keys,
    .key_count = sizeof(upstream_tls_keys) / sizeof(upstream_tls_keys[0]),
    .check = upstream_tls_check,
};

static const char *const pp_send_names[] = {"off", "v1", "v2", NULL};

static const struct sl__schema_key upstream_keys[] = {
    {.name = "name",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_upstream_conf, name),
     .check = check_name,
     .flags = SL__KEY_REQUIRED},
    {.name = "balance",
     .type = SL__T_ENUM,
     SL__FIELD(struct sl_upstream_conf, balance),
     .enum_names = balance_names,
     .def = SL_BALANCE_ROUND_ROBIN},
    {.name = "hash_on", .type = SL__T_CUSTOM, .set = set_hash_on},
    {.name = "endpoints",
     .type = SL__T_LIST,
     SL__FIELD(struct sl_upstream_conf, endpoints),
     .count_offset = offsetof(struct sl_upstream_conf, endpoint_count),
     .min = 0,
     .section = &endpoint_section},
    {.name = "keepalive", .type = SL__T_SECTION, .offset = 0, .section = &keepalive_section},
    {.name = "timeouts", .type = SL__T_SECTION, .offset = 0, .section = &timeouts_section},
    {.name = "health", .type = SL__T_SECTION, .offset = 0, .section = &health_section},
    {.name = "circuit_breaker",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_upstream_conf, breaker),
     .section = &breaker_section},
    {.name = "retries",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_upstream_conf, retries),
     .section = &retry_section},
    {.name = "zone_aware",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_upstream_conf, zone_aware),
     .section = &zone_aware_section},
    {.name = "discovery",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_upstream_conf, discovery),
     .section = &discovery_section,
     .flags = SL__KEY_LAZY},
    {.name = "tls",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_upstream_conf, tls),
     .section = &upstream_tls_section,
     .flags = SL__KEY_LAZY},
    {.name = "proxy_protocol",
     .type = SL__T_ENUM,
     SL__FIELD(struct sl_upstream_conf, proxy_protocol),
     .enum_names = pp_send_names,
     .def = SL_PP_SEND_OFF},
};

static const struct sl__schema_section upstream_section = {
    .keys = upstream_keys,
    .key_count = sizeof(upstream_keys) / sizeof(upstream_keys[0]),
    .elem_size = sizeof(struct sl_upstream_conf),
    .init = upstream_init,
    .check = upstream_check,
    .free = upstream_free,
};

static void match_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    (void)c;
    (void)map;
    struct sl_route_match_conf *m = elem;
    /* Hosts compare case-insensitively; lowercase once here so the router need not. */
    for (char *p = m->host; p && *p; p++)
        *p = sl_ascii_lower(*p);
}

static void match_free(void *elem)
{
    struct sl_route_match_conf *m = elem;
    free_strings(m->method_names, m->method_name_count);
    free_pairs(m->headers, m->header_count);
    m->method_names = NULL;
    m->headers = NULL;
}

static const struct sl__schema_key match_keys[] = {
    {.name = "host",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_route_match_conf, host),
     .check = check_host},
    {.name = "path",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_route_match_conf, path),
     .check = check_path},
    {.name = "path_prefix",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_route_match_conf, path_prefix),
     .check = check_path},
    {.name = "methods", .type = SL__T_CUSTOM, .set = set_methods},
    {.name = "headers",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_route_match_conf, headers),
     .count_offset = offsetof(struct sl_route_match_conf, header_count),
     .set = set_header_map},
};

static const struct sl__schema_section match_section = {
    .keys = match_keys,
    .key_count = sizeof(match_keys) / sizeof(match_keys[0]),
    .check = match_check,
    .free = match_free,
};

static void header_ops_free(void *elem)
{
    struct sl_header_ops_conf *h = elem;
    free_pairs(h->set, h->set_count);
    free_pairs(h->add, h->add_count);
    free_strings(h->remove, h->remove_count);
    memset(h, 0, sizeof(*h));
}

static const struct sl__schema_key header_ops_keys[] = {
    {.name = "set",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_header_ops_conf, set),
     .count_offset = offsetof(struct sl_header_ops_conf, set_count),
     .set = set_header_map},
    {.name = "add",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_header_ops_conf, add),
     .count_offset = offsetof(struct sl_header_ops_conf, add_count),
     .set = set_header_map},
    {.name = "remove",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_header_ops_conf, remove),
     .count_offset = offsetof(struct sl_header_ops_conf, remove_count),
     .set = set_string_list,
     .check = check_token},
};

static const struct sl__schema_section header_ops_section = {
    .keys = header_ops_keys,
    .key_count = sizeof(header_ops_keys) / sizeof(header_ops_keys[0]),
    .free = header_ops_free,
};

static const struct sl__schema_key direct_keys[] = {
    /* 1xx is interim: a client would read the configured body as the final response. */
    {.name = "status",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_direct_response_conf, status),
     .min = 200,
     .max = 599,
     .def = 200},
    {.name = "body",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_direct_response_conf, body),
     .count_offset = offsetof(struct sl_direct_response_conf, body_len),
     .def_str = "",
     .flags = SL__KEY_ALLOW_NUL},
    {.name = "content_type",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_direct_response_conf, content_type),
     .def_str = "text/plain",
     .check = check_header_value,
     .flags = SL__KEY_NONEMPTY},
};

static const struct sl__schema_section direct_section = {
    .keys = direct_keys,
    .key_count = sizeof(direct_keys) / sizeof(direct_keys[0]),
};

static void route_init(struct sl__config_ctx *c, void *elem, size_t index)
{
    struct sl_route_conf *r = elem;
    char name[32];
    int n = snprintf(name, sizeof(name), "route%zu", index);
    r->index = index;
    r->name = sl__config_strndup(c, name, n > 0 ? (size_t)n : 0);
    retry_defaults(&r->retries);
}

/* Reports `fmt` at the value of `key` inside `map`, with `key` appended to the path. */
static void error_at_key(struct sl__config_ctx *c, const struct sl_yaml_node *map, const char *key,
                         const char *msg)
{
    const struct sl_yaml_node *n = sl__config_yaml_get(map, key);
    size_t saved = sl__config_path_push_key(c, key, strlen(key));
    sl__config_error(c, n ? n : map, "%s", msg);
    sl__config_path_pop(c, saved);
}

static void route_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct sl_route_conf *r = elem;
    const struct sl_yaml_node *match = sl__config_yaml_get(map, "match");
    bool has_upstream = sl__config_yaml_get(map, "upstream") != NULL;
    bool has_direct = sl__config_yaml_get(map, "direct_response") != NULL;
    bool has_prefix = sl__config_yaml_get(match, "path_prefix") != NULL;
    r->line = map->line;
    r->col = map->col;
    r->has_retries = sl__config_yaml_get(map, "retries") != NULL;
    r->has_direct_response = has_direct && r->direct_response.body;
    if (has_upstream && has_direct)
        error_at_key(c, map, "direct_response", "cannot be combined with \"upstream\"");
    else if (!has_upstream && !has_direct)
        sl__config_error(c, map, "route needs \"upstream\" or \"direct_response\"");
    if (has_prefix && sl__config_yaml_get(match, "path")) {
        size_t saved = sl__config_path_push_key(c, "match", 5);
        error_at_key(c, match, "path_prefix", "cannot be combined with \"path\"");
        sl__config_path_pop(c, saved);
    }
    if (r->strip_prefix && !has_prefix)
        error_at_key(c, map, "strip_prefix", "requires match.path_prefix");
    if (sl__config_yaml_get(map, "rewrite_prefix") && !has_prefix)
        error_at_key(c, map, "rewrite_prefix", "requires match.path_prefix");
    /* rewrite_prefix replaces the prefix, so it strips too; one flag for the proxy to test. */
    if (r->rewrite_prefix)
        r->strip_prefix = true;
}

/* ---- filters, redis, consumers ------------------------------------------------------------ */

static const struct sl_config_filter_type *const *filter_types;
static size_t filter_type_count;

void sl_config_set_filter_types(const struct sl_config_filter_type *const *types, size_t count)
{
    filter_types = types;
    filter_type_count = count;
}

static void filter_confs_free(struct sl_filter_conf *f, size_t n)
{
    for (size_t i = 0; f && i < n; i++) {
        if (f[i].conf) {
            sl__config_schema_free(f[i].type->section, f[i].conf);
            free(f[i].conf);
        }
        free(f[i].where);
    }
    free(f);
}

/* `filters:` / `default_filters:`: a list of one-key mappings `- <type>: {<its keys>}`. */
static void set_filters(struct sl__config_ctx *c, const struct sl__schema_key *k,
                        const struct sl_yaml_node *n, void *base)
{
    struct sl_filter_conf **arr = (void *)((char *)base + k->offset);
    size_t *count = (void *)((char *)base + k->count_offset);
    char q[160];
    if (n->kind != SL_YAML_SEQ) {
        sl__config_error(c, n, "expected a list of filters, got %s", sl__config_yaml_kind_name(n));
        return;
    }
    filter_confs_free(*arr, *count);
    *arr = NULL;
    *count = 0;
    if (n->count == 0)
        return;
    if (!(*arr = calloc(n->count, sizeof(**arr)))) {
        sl__config_error(c, n, "out of memory");
        return;
    }
    for (size_t i = 0; i < n->count; i++) {
        const struct sl_yaml_node *item = n->items[i];
        size_t saved = sl__config_path_push_index(c, i);
        if (item->kind != SL_YAML_MAP || item->count != 1) {
            sl__config_error(c, item,
                             "expected a filter as a one-key mapping, e.g. \"- jwt: {...}\"");
            goto next;
        }
        const struct sl_yaml_node *key = item->keys[0], *val = item->items[0];
        const struct sl_config_filter_type *t = NULL;
        for (size_t j = 0; j < filter_type_count && !t; j++)
            if (strlen(filter_types[j]->name) == key->len &&
                memcmp(filter_types[j]->name, key->str, key->len) == 0)
                t = filter_types[j];
        if (!t) {
            char known[256];
            size_t o = 0;
            known[0] = '\0';
            for (size_t j = 0; j < filter_type_count && o < sizeof(known); j++) {
                int w = snprintf(known + o, sizeof(known) - o, "%s%s", j ? ", " : "",
                                 filter_types[j]->name);
                if (w > 0)
                    o += (size_t)w;
            }
            sl__config_error(c, key, "unknown filter %s (known: %s)",
                             sl__config_q(q, sizeof(q), key), known);
            goto next;
        }
        struct sl_filter_conf *f = &(*arr)[*count];
        size_t saved2 = sl__config_path_push_key(c, key->str, key->len);
        f->type = t;
        f->line = key->line;
        f->col = key->col;
        f->where = sl__config_strndup(c, c->path, c->path_len);
        f->conf = calloc(1, t->conf_size ? t->conf_size : 1);
        ++*count;
        if (!f->conf) {
            sl__config_error(c, key, "out of memory");
        } else {
            sl__config_schema_defaults(c, t->section, f->conf);
            if (val->kind == SL_YAML_SCALAR && val->is_null) {
                /* `- api_key:` with no body: only defaults, but required keys still count. */
                for (size_t j = 0; j < t->section->key_count; j++)
                    if (t->section->keys[j].flags & SL__KEY_REQUIRED)
                        sl__config_error(c, key, "missing required key \"%s\"",
                                         t->section->keys[j].name);
                if (t->section->check)
                    t->section->check(c, key, f->conf);
            } else {
                sl__config_schema_apply(c, t->section, val, f->conf);
            }
        }
        sl__config_path_pop(c, saved2);
    next:
        sl__config_path_pop(c, saved);
    }
}

static void set_redis_address(struct sl__config_ctx *c, const struct sl__schema_key *k,
                              const struct sl_yaml_node *n, void *base)
{
    (void)k;
    struct sl_redis_conf *r = base;
    parse_address(c, n, &r->address, &r->addr, &r->addr_len);
}

static void redis_free(void *elem)
{
    struct sl_redis_conf *r = elem;
    free(r->address);
    r->address = NULL;
}

static const struct sl__schema_key redis_keys[] = {
    {.name = "address", .type = SL__T_CUSTOM, .set = set_redis_address, .flags = SL__KEY_REQUIRED},
    {.name = "username", .type = SL__T_STRING, SL__FIELD(struct sl_redis_conf, username)},
    {.name = "password", .type = SL__T_STRING, SL__FIELD(struct sl_redis_conf, password)},
    {.name = "db",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_redis_conf, db),
     .min = 0,
     .max = 1000000,
     .def = 0},
    {.name = "timeout",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_redis_conf, timeout_ms),
     .min = 1,
     .max = 10 * SEC,
     .def = 50},
    {.name = "connect_timeout",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_redis_conf, connect_timeout_ms),
     .min = 1,
     .max = 60 * SEC,
     .def = 200},
    {.name = "key_prefix",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_redis_conf, key_prefix),
     .def_str = "sluice:"},
};

static const struct sl__schema_section redis_section = {
    .keys = redis_keys,
    .key_count = sizeof(redis_keys) / sizeof(redis_keys[0]),
    .free = redis_free,
};

static void set_consumer_sha256(struct sl__config_ctx *c, const struct sl__schema_key *k,
                                const struct sl_yaml_node *n, void *base)
{
    (void)k;
    struct sl_consumer_conf *cs = base;
    const char *s = sl__config_scalar(c, n, "a SHA-256 as 64 hex digits");
    if (!s)
        return;
    bool ok = n->len == 64;
    for (size_t i = 0; ok && i < 32; i++) {
        int hi = sl_hex_digit((unsigned char)s[2 * i]),
            lo = sl_hex_digit((unsigned char)s[2 * i + 1]);
        ok = hi >= 0 && lo >= 0;
        cs->key_sha256[i] = (unsigned char)(ok ? hi * 16 + lo : 0);
    }
    if (!ok) {
        char q[160];
        sl__config_error(c, n, "expected a SHA-256 as 64 hex digits, got %s",
                         sl__config_q(q, sizeof(q), n));
        return;
    }
    cs->has_sha256 = true;
}

static void consumer_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct sl_consumer_conf *cs = elem;
    cs->line = map->line;
    cs->col = map->col;
    bool has_key = cs->api_key != NULL, has_sha = sl__config_yaml_get(map, "api_key_sha256");
    if (has_key && has_sha) {
        error_at_key(c, map, "api_key_sha256", "cannot be combined with \"api_key\"");
        return;
    }
    if (has_key) {
        unsigned int len = 0;
        if (!EVP_Digest(cs->api_key, strlen(cs->api_key), cs->key_sha256, &len, EVP_sha256(), NULL))
            sl__config_error(c, map, "cannot hash the key");
        cs->has_sha256 = true;
    }
}

static const char *check_api_key(const char *s, size_t len, char *buf, size_t cap)
{
    (void)buf;
    (void)cap;
    if (len < 8)
        return "must be at least 8 characters (use a random key of 32 or more)";
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] <= 0x20 || (unsigned char)s[i] >= 0x7f)
            return "must be printable ASCII without spaces";
    return NULL;
}

static const struct sl__schema_key consumer_keys[] = {
    {.name = "name",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_consumer_conf, name),
     .check = check_name,
     .flags = SL__KEY_REQUIRED},
    {.name = "api_key",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_consumer_conf, api_key),
     .check = check_api_key},
    {.name = "api_key_sha256", .type = SL__T_CUSTOM, .set = set_consumer_sha256},
};

static const struct sl__schema_section consumer_section = {
    .keys = consumer_keys,
    .key_count = sizeof(consumer_keys) / sizeof(consumer_keys[0]),
    .elem_size = sizeof(struct sl_consumer_conf),
    .check = consumer_check,
};

static void config_top_free(void *elem)
{
    struct sl_config *cfg = elem;
    filter_confs_free(cfg->default_filters, cfg->default_filter_count);
    cfg->default_filters = NULL;
    cfg->default_filter_count = 0;
}

static void route_free(void *elem)
{
    struct sl_route_conf *r = elem;
    free_strings(r->listeners, r->listener_count);
    r->listeners = NULL;
    r->listener_count = 0;
    filter_confs_free(r->filters, r->filter_count);
    r->filters = NULL;
    r->filter_count = 0;
}

static const struct sl__schema_key route_keys[] = {
    {.name = "name",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_route_conf, name),
     .check = check_name},
    {.name = "listeners",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_route_conf, listeners),
     .count_offset = offsetof(struct sl_route_conf, listener_count),
     .set = set_string_list,
     .check = check_name},
    {.name = "match",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_route_conf, match),
     .section = &match_section},
    {.name = "upstream",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_route_conf, upstream),
     .check = check_name},
    {.name = "strip_prefix",
     .type = SL__T_BOOL,
     SL__FIELD(struct sl_route_conf, strip_prefix),
     .def = false},
    {.name = "rewrite_prefix",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_route_conf, rewrite_prefix),
     .check = check_path},
    {.name = "request_headers",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_route_conf, request_headers),
     .section = &header_ops_section},
    {.name = "response_headers",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_route_conf, response_headers),
     .section = &header_ops_section},
    {.name = "direct_response",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_route_conf, direct_response),
     .section = &direct_section,
     .flags = SL__KEY_LAZY},
    {.name = "filters",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_route_conf, filters),
     .count_offset = offsetof(struct sl_route_conf, filter_count),
     .set = set_filters},
    {.name = "skip_default_filters",
     .type = SL__T_BOOL,
     SL__FIELD(struct sl_route_conf, skip_default_filters),
     .def = false},
    {.name = "retries",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_route_conf, retries),
     .section = &retry_section,
     .flags = SL__KEY_LAZY},
};

static const struct sl__schema_section route_section = {
    .keys = route_keys,
    .key_count = sizeof(route_keys) / sizeof(route_keys[0]),
    .elem_size = sizeof(struct sl_route_conf),
    .init = route_init,
    .check = route_check,
    .free = route_free,
};

static const char *check_dns_server(const char *s, size_t len, char *buf, size_t cap)
{
    struct sockaddr_storage ss;
    socklen_t sl = 0;
    char msg[160];
    (void)len;
    /* an IP with an optional port: "10.0.0.2", "10.0.0.2:5353", "[::1]:53" */
    if (sl__config_address_parse(s, false, &ss, &sl, msg, sizeof(msg)) == 0)
        return NULL;
    struct in6_addr a6;
    struct in_addr a4;
    if (inet_pton(AF_INET, s, &a4) == 1 || inet_pton(AF_INET6, s, &a6) == 1)
        return NULL;
    char q[160];
    snprintf(buf, cap, "invalid DNS server %s: expected an IP address with an optional port",
             sl__config_quote(q, sizeof(q), s, len));
    return buf;
}

static const struct sl__schema_key resolver_keys[] = {
    {.name = "servers",
     .type = SL__T_STRLIST,
     SL__FIELD(struct sl_config, dns_servers),
     .count_offset = offsetof(struct sl_config, dns_server_count),
     .check = check_dns_server},
    {.name = "timeout",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_config, dns_timeout_ms),
     .min = 10,
     .max = MIN,
     .def = 2 * SEC},
};

static const struct sl__schema_section resolver_section = {
    .keys = resolver_keys,
    .key_count = sizeof(resolver_keys) / sizeof(resolver_keys[0]),
};

/* ---- operations: admin, access log, drain, reload, cost ---- */

static const char *check_http_url(const char *s, size_t len, char *buf, size_t cap)
{
    (void)buf;
    (void)cap;
    size_t off = 0;
    if (len > 7 && strncmp(s, "http://", 7) == 0)
        off = 7;
    else if (len > 8 && strncmp(s, "https://", 8) == 0)
        off = 8;
    else
        return "must be an http:// or https:// URL";
    /* What the fetch client cannot use is refused here, at load, not at start. */
    for (size_t i = off; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch <= ' ' || ch >= 0x7f || ch == '#')
            return "must be an http(s) URL without spaces, control bytes or a #fragment";
        if (ch == '/' || ch == '?')
            break;
        if (ch == '@')
            return "must not carry credentials (user@host)";
    }
    if (off == len || s[off] == '/' || s[off] == ':' || s[off] == '?')
        return "needs a host";
    for (size_t i = off; i < len; i++)
        if ((unsigned char)s[i] <= ' ' || s[i] == '#' || (unsigned char)s[i] >= 0x7f)
            return "must be an http(s) URL without spaces, control bytes or a #fragment";
    return NULL;
}

static bool addr_is_loopback(const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)ss)->sin_addr.s_addr) >> 24) == 127;
    if (ss->ss_family == AF_INET6)
        return IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)ss)->sin6_addr);
    return false;
}

static void set_admin_address(struct sl__config_ctx *c, const struct sl__schema_key *k,
                              const struct sl_yaml_node *n, void *base)
{
    (void)k;
    struct sl_admin_conf *a = base;
    parse_address(c, n, &a->address, &a->addr, &a->addr_len);
    a->loopback = addr_is_loopback(&a->addr);
}

static void admin_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct sl_admin_conf *a = elem;
    resolve_file(c, map, "token_file", &a->token_file);
    if (a->address && !a->loopback && !a->token_file)
        error_at_key(c, map, "address",
                     "an admin listener off loopback needs token_file (a bearer token)");
}

static void admin_free(void *elem)
{
    struct sl_admin_conf *a = elem;
    free(a->address);
    a->address = NULL;
}

static const struct sl__schema_key admin_keys[] = {
    {.name = "address", .type = SL__T_CUSTOM, .set = set_admin_address, .flags = SL__KEY_REQUIRED},
    {.name = "token_file",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_admin_conf, token_file),
     .flags = SL__KEY_NONEMPTY},
};

static const struct sl__schema_section admin_section = {
    .keys = admin_keys,
    .key_count = sizeof(admin_keys) / sizeof(admin_keys[0]),
    .check = admin_check,
    .free = admin_free,
};

static const char *const ship_method_names[] = {"PUT", "POST", NULL};

static const struct sl__schema_key ship_keys[] = {
    {.name = "url",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_access_log_conf, ship_url),
     .check = check_http_url,
     .flags = SL__KEY_REQUIRED},
    {.name = "method",
     .type = SL__T_ENUM,
     SL__FIELD(struct sl_access_log_conf, ship_method),
     .enum_names = ship_method_names,
     .def = SL_SHIP_PUT},
    {.name = "timeout",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_access_log_conf, ship_timeout_ms),
     .min = 10,
     .max = 10 * MIN,
     .def = 5 * SEC},
    {.name = "backoff_max",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_access_log_conf, ship_backoff_max_ms),
     .min = 10,
     .max = HOUR,
     .def = MIN},
};

static const struct sl__schema_section ship_section = {
    .keys = ship_keys,
    .key_count = sizeof(ship_keys) / sizeof(ship_keys[0]),
};

static const struct sl__schema_key segment_keys[] = {
    {.name = "max_bytes",
     .type = SL__T_SIZE,
     SL__FIELD(struct sl_access_log_conf, segment_max_bytes),
     .min = 4096,
     .max = 1ull << 40,
     .def = 64ull << 20},
    {.name = "max_age",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_access_log_conf, segment_max_age_ms),
     .min = 100,
     .max = 24 * HOUR,
     .def = MIN},
};

static const struct sl__schema_section segment_section = {
    .keys = segment_keys,
    .key_count = sizeof(segment_keys) / sizeof(segment_keys[0]),
};

static void access_log_check(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem)
{
    struct sl_access_log_conf *a = elem;
    /* Created at start when missing: only made absolute here. */
    resolve_relative(c, map, &a->directory);
}

static const struct sl__schema_key access_log_keys[] = {
    {.name = "directory",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_access_log_conf, directory),
     .flags = SL__KEY_REQUIRED | SL__KEY_NONEMPTY},
    {.name = "buffer",
     .type = SL__T_SIZE,
     SL__FIELD(struct sl_access_log_conf, buffer_bytes),
     .min = 64 * 1024,
     .max = 1ull << 32,
     .def = 8ull << 20},
    {.name = "segment", .type = SL__T_SECTION, .offset = 0, .section = &segment_section},
    {.name = "flush_interval",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_access_log_conf, flush_interval_ms),
     .min = 10,
     .max = 10 * SEC,
     .def = 200},
    {.name = "ship",
     .type = SL__T_SECTION,
     .offset = 0,
     .section = &ship_section,
     .flags = SL__KEY_LAZY},
    {.name = "headers",
     .type = SL__T_STRLIST,
     SL__FIELD(struct sl_access_log_conf, headers),
     .count_offset = offsetof(struct sl_access_log_conf, header_count),
     .check = check_token},
    {.name = "redact_headers",
     .type = SL__T_STRLIST,
     SL__FIELD(struct sl_access_log_conf, redact_headers),
     .count_offset = offsetof(struct sl_access_log_conf, redact_header_count),
     .check = check_token},
};

static const struct sl__schema_section access_log_section = {
    .keys = access_log_keys,
    .key_count = sizeof(access_log_keys) / sizeof(access_log_keys[0]),
    .check = access_log_check,
};

static const struct sl__schema_key drain_keys[] = {
    {.name = "grace",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_drain_conf, grace_ms),
     .min = 0,
     .max = HOUR,
     .def = 0},
    {.name = "notice_url",
     .type = SL__T_STRING,
     SL__FIELD(struct sl_drain_conf, notice_url),
     .check = check_http_url},
    {.name = "notice_interval",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_drain_conf, notice_interval_ms),
     .min = 100,
     .max = HOUR,
     .def = 5 * SEC},
};

static const struct sl__schema_section drain_section = {
    .keys = drain_keys,
    .key_count = sizeof(drain_keys) / sizeof(drain_keys[0]),
};

static const struct sl__schema_key reload_keys[] = {
    {.name = "rollback_on_5xx_ratio",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_reload_conf, rollback_permille),
     .set = set_permille},
    {.name = "window",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_reload_conf, window_ms),
     .min = 100,
     .max = HOUR,
     .def = 30 * SEC},
    {.name = "min_requests",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_reload_conf, min_requests),
     .min = 1,
     .max = 100000000,
     .def = 20},
};

static const struct sl__schema_section reload_section = {
    .keys = reload_keys,
    .key_count = sizeof(reload_keys) / sizeof(reload_keys[0]),
};

static void set_vcpu_price(struct sl__config_ctx *c, const struct sl__schema_key *k,
                           const struct sl_yaml_node *n, void *base)
{
    (void)k;
    const char *s = sl__config_scalar(c, n, "a price in USD (like 0.0181)");
    if (!s)
        return;
    char tmp[64], q[160];
    double v = -1;
    if (n->len < sizeof tmp) {
        memcpy(tmp, s, n->len);
        tmp[n->len] = '\0';
        char *end = NULL;
        v = strtod(tmp, &end);
        if (!end || *end || end == tmp)
            v = -1;
    }
    if (!(v >= 0 && v <= 1000)) {
        sl__config_error(c, n, "expected a price per vCPU-hour in USD from 0 to 1000, got %s",
                         sl__config_q(q, sizeof(q), n));
        return;
    }
    ((struct sl_config *)base)->vcpu_hour_usd = v;
}

static const struct sl__schema_key cost_keys[] = {
    {.name = "vcpu_hour_usd", .type = SL__T_CUSTOM, .set = set_vcpu_price},
};

static const struct sl__schema_section cost_section = {
    .keys = cost_keys,
    .key_count = sizeof(cost_keys) / sizeof(cost_keys[0]),
};

static const char *const log_level_names[] = {"error", "warn", "info", "debug", NULL};

/* Order matters: `limits` is read before `listeners` (they inherit it), and the route checks
 * run after both. */
static const struct sl__schema_key top_keys[] = {
    {.name = "workers", .type = SL__T_CUSTOM, .set = set_workers},
    {.name = "max_connections",
     .type = SL__T_UINT,
     SL__FIELD(struct sl_config, max_connections),
     .min = 0,
     .max = 100000000,
     .def = 0},
    {.name = "max_buffer_memory",
     .type = SL__T_SIZE,
     SL__FIELD(struct sl_config, max_buffer_memory),
     .min = 0,
     .max = UINT64_MAX,
     .def = 0},
    {.name = "drain_timeout",
     .type = SL__T_DURATION,
     SL__FIELD(struct sl_config, drain_timeout_ms),
     .min = 0,
     .max = HOUR,
     .def = 10 * SEC},
    {.name = "log_level",
     .type = SL__T_ENUM,
     SL__FIELD(struct sl_config, log_level),
     .enum_names = log_level_names,
     .def = SL_LOG_INFO},
    {.name = "limits", .type = SL__T_CUSTOM, .set = set_global_limits},
    {.name = "listeners",
     .type = SL__T_LIST,
     SL__FIELD(struct sl_config, listeners),
     .count_offset = offsetof(struct sl_config, listener_count),
     .min = 1,
     .section = &listener_section,
     .flags = SL__KEY_REQUIRED},
    {.name = "upstreams",
     .type = SL__T_LIST,
     SL__FIELD(struct sl_config, upstreams),
     .count_offset = offsetof(struct sl_config, upstream_count),
     .section = &upstream_section},
    {.name = "redis",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_config, redis),
     .section = &redis_section,
     .flags = SL__KEY_LAZY},
    {.name = "consumers",
     .type = SL__T_LIST,
     SL__FIELD(struct sl_config, consumers),
     .count_offset = offsetof(struct sl_config, consumer_count),
     .section = &consumer_section},
    {.name = "default_filters",
     .type = SL__T_CUSTOM,
     SL__FIELD(struct sl_config, default_filters),
     .count_offset = offsetof(struct sl_config, default_filter_count),
     .set = set_filters},
    {.name = "zone", .type = SL__T_STRING, SL__FIELD(struct sl_config, zone), .check = check_name},
    {.name = "resolver", .type = SL__T_SECTION, .offset = 0, .section = &resolver_section},
    {.name = "admin",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_config, admin),
     .section = &admin_section,
     .flags = SL__KEY_LAZY},
    {.name = "access_log",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_config, access_log),
     .section = &access_log_section,
     .flags = SL__KEY_LAZY},
    {.name = "drain",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_config, drain),
     .section = &drain_section},
    {.name = "reload",
     .type = SL__T_SECTION,
     SL__FIELD(struct sl_config, reload),
     .section = &reload_section},
    {.name = "cost", .type = SL__T_SECTION, .offset = 0, .section = &cost_section},
    {.name = "routes",
     .type = SL__T_LIST,
     SL__FIELD(struct sl_config, routes),
     .count_offset = offsetof(struct sl_config, route_count),
     .section = &route_section},
};

static const struct sl__schema_section top_section = {
    .keys = top_keys,
    .key_count = sizeof(top_keys) / sizeof(top_keys[0]),
    .free = config_top_free,
};

/* ---- step 2: resolve names ---------------------------------------------------------------- */

/* The YAML element for list entry `i`, when the list parsed as a list of that length. */
static const struct sl_yaml_node *list_item(const struct sl_yaml_node *root, const char *key,
                                            size_t count, size_t i)
{
    const struct sl_yaml_node *seq = sl__config_yaml_get(root, key);
    if (!seq || seq->kind != SL_YAML_SEQ || seq->count != count)
        return NULL;
    return seq->items[i];
}

/* Reports at list[i].key (the key's value, or the element when absent). */
static void error_in_item(struct sl__config_ctx *c, const struct sl_yaml_node *root,
                          const char *list, size_t count, size_t i, const char *key,
                          const char *fmt, ...) __attribute__((format(printf, 7, 8)));

static void error_in_item(struct sl__config_ctx *c, const struct sl_yaml_node *root,
                          const char *list, size_t count, size_t i, const char *key,
                          const char *fmt, ...)
{
    const struct sl_yaml_node *item = list_item(root, list, count, i);
    const struct sl_yaml_node *at = sl__config_yaml_get(item, key);
    if (!at)
        at = item;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    size_t saved = sl__config_path_push_key(c, list, strlen(list));
    sl__config_path_push_index(c, i);
    if (at && sl__config_yaml_get(item, key))
        sl__config_path_push_key(c, key, strlen(key));
    sl__config_error(c, at, "%s", msg);
    sl__config_path_pop(c, saved);
}

static void where(const struct sl_yaml_node *root, const char *list, size_t count, size_t i,
                  char *buf, size_t cap)
{
    const struct sl_yaml_node *item = list_item(root, list, count, i);
    const struct sl_yaml_node *name = sl__config_yaml_get(item, "name");
    const struct sl_yaml_node *at = name ? name : item;
    if (at)
        snprintf(buf, cap, " (first defined at %d:%d)", at->line, at->col);
    else
        buf[0] = '\0';
}

static bool addr_is_any(const struct sockaddr_storage *a)
{
    if (a->ss_family == AF_INET)
        return ((const struct sockaddr_in *)a)->sin_addr.s_addr == htonl(INADDR_ANY);
    if (a->ss_family == AF_INET6)
        return IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)a)->sin6_addr);
    return false;
}

static uint16_t addr_port(const struct sockaddr_storage *a)
{
    if (a->ss_family == AF_INET)
        return ((const struct sockaddr_in *)a)->sin_port;
    return ((const struct sockaddr_in6 *)a)->sin6_port;
}

/* 1: same socket address, 2: one is the wildcard of the other's family and port. */
static int addr_conflict(const struct sl_listener_conf *a, const struct sl_listener_conf *b)
{
    if (a->addr_len == 0 || b->addr_len == 0)
        return a->address && b->address && strcmp(a->address, b->address) == 0;
    if (a->addr.ss_family != b->addr.ss_family || addr_port(&a->addr) != addr_port(&b->addr))
        return 0;
    if (a->addr_len == b->addr_len && memcmp(&a->addr, &b->addr, a->addr_len) == 0)
        return 1;
    return addr_is_any(&a->addr) || addr_is_any(&b->addr) ? 2 : 0;
}

static void resolve_listeners(struct sl__config_ctx *c, const struct sl_yaml_node *root,
                              const struct sl_config *cfg)
{
    char at[64], q[160];
    for (size_t i = 0; i < cfg->listener_count; i++) {
        const struct sl_listener_conf *l = &cfg->listeners[i];
        for (size_t j = 0; j < i && l->name; j++) {
            if (cfg->listeners[j].name && strcmp(cfg->listeners[j].name, l->name) == 0) {
                where(root, "listeners", cfg->listener_count, j, at, sizeof(at));
                error_in_item(c, root, "listeners", cfg->listener_count, i, "name",
                              "duplicate listener name %s%s",
                              sl__config_quote(q, sizeof(q), l->name, strlen(l->name)), at);
                break;
            }
        }
        for (size_t j = 0; j < i && l->address; j++) {
            const struct sl_listener_conf *o = &cfg->listeners[j];
            int kind = addr_conflict(l, o);
            if (!kind)
                continue;
            char q2[160];
            sl__config_quote(q2, sizeof(q2), o->name ? o->name : "", o->name ? strlen(o->name) : 0);
            if (kind == 1)
                error_in_item(c, root, "listeners", cfg->listener_count, i, "address",
                              "duplicate listener address %s (already used by listener %s)",
                              sl__config_quote(q, sizeof(q), l->address, strlen(l->address)), q2);
            else
                error_in_item(c, root, "listeners", cfg->listener_count, i, "address",
                              "address %s overlaps listener %s (%s)",
                              sl__config_quote(q, sizeof(q), l->address, strlen(l->address)), q2,
                              o->address);
            break;
        }
    }
}

static void resolve_upstreams(struct sl__config_ctx *c, const struct sl_yaml_node *root,
                              const struct sl_config *cfg)
{
    char at[64], q[160];
    for (size_t i = 0; i < cfg->upstream_count; i++) {
        const char *name = cfg->upstreams[i].name;
        for (size_t j = 0; j < i && name; j++) {
            if (cfg->upstreams[j].name && strcmp(cfg->upstreams[j].name, name) == 0) {
                where(root, "upstreams", cfg->upstream_count, j, at, sizeof(at));
                error_in_item(c, root, "upstreams", cfg->upstream_count, i, "name",
                              "duplicate upstream name %s%s",
                              sl__config_quote(q, sizeof(q), name, strlen(name)), at);
                break;
            }
        }
    }
}

/* A list that failed to parse would make every reference to it look unknown; skip those. */
static bool names_complete(const struct sl_yaml_node *root, const char *key, size_t count,
                           const char *const *names, size_t stride)
{
    const struct sl_yaml_node *seq = sl__config_yaml_get(root, key);
    if (seq && (seq->kind != SL_YAML_SEQ || seq->count != count))
        return false;
    if (count && !names)
        return false;
    for (size_t i = 0; i < count; i++) {
        const char *const *p = (const void *)((const char *)names + i * stride);
        if (!*p)
            return false;
    }
    return true;
}

static void resolve_routes(struct sl__config_ctx *c, const struct sl_yaml_node *root,
                           struct sl_config *cfg)
{
    char at[64], q[160];
    bool upstreams_ok =
        names_complete(root, "upstreams", cfg->upstream_count,
                       cfg->upstreams ? (const char *const *)&cfg->upstreams[0].name : NULL,
                       sizeof(struct sl_upstream_conf));
    bool listeners_ok =
        names_complete(root, "listeners", cfg->listener_count,
                       cfg->listeners ? (const char *const *)&cfg->listeners[0].name : NULL,
                       sizeof(struct sl_listener_conf));
    for (size_t i = 0; upstreams_ok && cfg->listeners && i < cfg->listener_count; i++) {
        struct sl_listener_conf *l = &cfg->listeners[i];
        if (!l->upstream || !cfg->upstreams)
            continue;
        size_t u = 0;
        while (u < cfg->upstream_count && strcmp(cfg->upstreams[u].name, l->upstream) != 0)
            u++;
        if (u == cfg->upstream_count)
            error_in_item(c, root, "listeners", cfg->listener_count, i, "upstream",
                          "unknown upstream %s",
                          sl__config_quote(q, sizeof(q), l->upstream, strlen(l->upstream)));
        else if (cfg->upstreams[u].tls.enabled)
            error_in_item(c, root, "listeners", cfg->listener_count, i, "upstream",
                          "upstream %s has tls:, which protocol: tcp listeners do not support "
                          "yet (they forward to plain TCP endpoints; TLS in front is the "
                          "listener's tls:)",
                          sl__config_quote(q, sizeof(q), l->upstream, strlen(l->upstream)));
        else
            l->upstream_index = u;
    }
    for (size_t i = 0; i < cfg->route_count; i++) {
        struct sl_route_conf *r = &cfg->routes[i];
        for (size_t j = 0; j < i && r->name; j++) {
            if (cfg->routes[j].name && strcmp(cfg->routes[j].name, r->name) == 0) {
                where(root, "routes", cfg->route_count, j, at, sizeof(at));
                error_in_item(c, root, "routes", cfg->route_count, i, "name",
                              "duplicate route name %s%s",
                              sl__config_quote(q, sizeof(q), r->name, strlen(r->name)), at);
                break;
            }
        }
        if (r->upstream && upstreams_ok) {
            size_t u = 0;
            while (u < cfg->upstream_count && strcmp(cfg->upstreams[u].name, r->upstream) != 0)
                u++;
            if (u == cfg->upstream_count)
                error_in_item(c, root, "routes", cfg->route_count, i, "upstream",
                              "unknown upstream %s",
                              sl__config_quote(q, sizeof(q), r->upstream, strlen(r->upstream)));
            else
                r->upstream_index = u;
        }
        const struct sl_yaml_node *item = list_item(root, "routes", cfg->route_count, i);
        const struct sl_yaml_node *lseq = sl__config_yaml_get(item, "listeners");
        for (size_t k = 0; listeners_ok && k < r->listener_count; k++)
            for (size_t l = 0; l < cfg->listener_count; l++)
                if (strcmp(cfg->listeners[l].name, r->listeners[k]) == 0 &&
                    cfg->listeners[l].protocol == SL_LISTENER_TCP)
                    error_in_item(
                        c, root, "routes", cfg->route_count, i, "listeners",
                        "listener %s is protocol: tcp (it forwards to its upstream "
                        "without routes)",
                        sl__config_quote(q, sizeof(q), r->listeners[k], strlen(r->listeners[k])));
        for (size_t k = 0; listeners_ok && k < r->listener_count; k++) {
            size_t l = 0;
            while (l < cfg->listener_count && strcmp(cfg->listeners[l].name, r->listeners[k]) != 0)
                l++;
            if (l < cfg->listener_count)
                continue;
            /* listeners[] kept only valid names, so map k back to its list position. */
            const struct sl_yaml_node *at_node = NULL;
            size_t pos = 0;
            for (size_t m = 0; lseq && lseq->kind == SL_YAML_SEQ && m < lseq->count; m++) {
                const struct sl_yaml_node *it = lseq->items[m];
                if (it->kind == SL_YAML_SCALAR && !it->is_null &&
                    strcmp(it->str, r->listeners[k]) == 0) {
                    at_node = it;
                    pos = m;
                    break;
                }
            }
            size_t saved = sl__config_path_push_key(c, "routes", 6);
            sl__config_path_push_index(c, i);
            sl__config_path_push_key(c, "listeners", 9);
            sl__config_path_push_index(c, pos);
            sl__config_error(
                c, at_node ? at_node : item, "unknown listener %s",
                sl__config_quote(q, sizeof(q), r->listeners[k], strlen(r->listeners[k])));
            sl__config_path_pop(c, saved);
        }
    }
}

/* ---- load --------------------------------------------------------------------------------- */

int sl_config_load_string(const char *name, const char *yaml, size_t len, struct sl_config **out,
                          struct sl_config_errors *errs)
{
    struct sl__config_ctx c = {.errs = errs, .resolve = sl__config_resolve_enabled()};
    struct sl_yaml_node *root = NULL;
    struct sl_config *cfg = NULL;
    if (!name)
        name = "<config>";
    *out = NULL;
    memset(errs, 0, sizeof(*errs));
    errs->file = strdup(name);
    if (!errs->file)
        c.failed = true;
    const char *slash = strrchr(name, '/');
    if (slash && name[0] != '<') {
        size_t dl = slash == name ? 1 : (size_t)(slash - name);
        c.file_dir = strndup(name, dl);
        if (!c.file_dir)
            c.failed = true;
    }

    if (sl__config_yaml_parse(yaml, len, errs, &root) != 0) {
        c.failed = true;
        goto out;
    }
    if (errs->count)
        c.failed = true;
    cfg = calloc(1, sizeof(*cfg));
    if (!cfg) {
        sl__config_error(&c, root, "out of memory");
        goto out;
    }

    /* Step 1: parse and type-check every key, applying defaults. */
    sl__config_schema_defaults(&c, &limits_section, &c.global_limits);
    sl__config_schema_defaults(&c, &top_section, cfg);
    if (root->kind != SL_YAML_MAP)
        sl__config_error(&c, root, "expected a mapping at the top level, got %s",
                         sl__config_yaml_kind_name(root));
    else
        sl__config_schema_apply(&c, &top_section, root, cfg);

    /* Step 2: resolve names across sections (also on errors, to report everything). */
    if (root->kind == SL_YAML_MAP) {
        resolve_listeners(&c, root, cfg);
        resolve_upstreams(&c, root, cfg);
        resolve_routes(&c, root, cfg);
    }
    /* The same file serves every instance; the zone usually comes from where it runs. */
    const char *env_zone = getenv("SLUICE_ZONE");
    if (!cfg->zone && env_zone && *env_zone) {
        char buf[200];
        const char *msg = check_name(env_zone, strlen(env_zone), buf, sizeof(buf));
        if (msg)
            sl__config_error(&c, NULL, "SLUICE_ZONE: %s", msg);
        else
            cfg->zone = sl__config_strndup(&c, env_zone, strlen(env_zone));
    }

    /* Step 3: the snapshot is the parsed structs; it only needs its origin. */
    if (!c.failed) {
        cfg->path = strdup(name);
        if (!cfg->path)
            sl__config_error(&c, NULL, "out of memory");
    }

out:
    sl__config_yaml_free(root);
    free(c.path);
    free(c.file_dir);
    if (c.failed || errs->count) {
        sl_config_free(cfg);
        sl__config_errors_sort(errs);
        return -1;
    }
    *out = cfg;
    return 0;
}

int sl_config_load(const char *path, struct sl_config **out, struct sl_config_errors *errs)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t len = 0, cap = 0;
    int err = 0;
    *out = NULL;
    if (!f) {
        err = errno;
        goto fail;
    }
    for (;;) {
        if (len == cap) {
            if (cap >= MAX_FILE_BYTES) {
                err = EFBIG;
                break;
            }
            cap = cap ? cap * 2 : 64 * 1024;
            char *nb = realloc(buf, cap);
            if (!nb) {
                err = ENOMEM;
                break;
            }
            buf = nb;
        }
        size_t n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (n == 0) {
            if (ferror(f))
                err = EIO;
            break;
        }
    }
    fclose(f);
    if (err)
        goto fail;
    int rc = sl_config_load_string(path, buf ? buf : "", len, out, errs);
    free(buf);
    return rc;

fail:
    free(buf);
    memset(errs, 0, sizeof(*errs));
    errs->file = strdup(path);
    sl__config_errors_add(errs, 1, 1, "", "cannot read the file: %s", strerror(err));
    return -1;
}

void sl_config_free(struct sl_config *cfg)
{
    if (!cfg)
        return;
    sl__config_schema_free(&top_section, cfg);
    free(cfg->path);
    free(cfg);
}
