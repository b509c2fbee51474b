#include "config/units.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

#include "config/config.h"

static bool resolve_hostnames = true;

void sl_config_set_resolve(bool resolve)
{
    resolve_hostnames = resolve;
}

bool sl__config_resolve_enabled(void)
{
    return resolve_hostnames;
}

/* Reads leading decimal digits; returns how many, 0 on none or overflow. */
static size_t parse_digits(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    size_t i = 0;
    for (; s[i] >= '0' && s[i] <= '9'; i++) {
        uint64_t d = (uint64_t)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return 0;
        v = v * 10 + d;
    }
    *out = v;
    return i;
}

struct unit {
    const char *name;
    uint64_t mult;
};

static int parse_with_units(const char *s, const struct unit *units, size_t n, uint64_t *out)
{
    uint64_t v;
    size_t i = parse_digits(s, &v);
    if (i == 0)
        return -EINVAL;
    for (size_t u = 0; u < n; u++) {
        if (strcmp(s + i, units[u].name) != 0)
            continue;
        if (units[u].mult && v > UINT64_MAX / units[u].mult)
            return -EINVAL;
        *out = v * units[u].mult;
        return 0;
    }
    return -EINVAL;
}

int sl_config_parse_duration(const char *s, uint64_t *out_ms)
{
    static const struct unit units[] = {
        {"", 1}, {"ms", 1}, {"s", 1000}, {"m", 60000}, {"h", 3600000},
    };
    return parse_with_units(s, units, sizeof(units) / sizeof(units[0]), out_ms);
}

int sl_config_parse_size(const char *s, uint64_t *out_bytes)
{
    static const struct unit units[] = {
        {"", 1},
        {"B", 1},
        {"KB", 1000},
        {"MB", 1000000},
        {"GB", 1000000000},
        {"TB", 1000000000000},
        {"KiB", 1ull << 10},
        {"MiB", 1ull << 20},
        {"GiB", 1ull << 30},
        {"TiB", 1ull << 40},
    };
    return parse_with_units(s, units, sizeof(units) / sizeof(units[0]), out_bytes);
}

static void format_units(uint64_t v, const struct unit *units, size_t n, char *buf, size_t cap)
{
    /* Units are listed largest first; the first that divides exactly wins. */
    for (size_t u = 0; u < n; u++) {
        if (v != 0 && v % units[u].mult == 0) {
            snprintf(buf, cap, "%llu%s", (unsigned long long)(v / units[u].mult), units[u].name);
            return;
        }
    }
    snprintf(buf, cap, "%llu%s", (unsigned long long)v, units[n - 1].name);
}

void sl__config_format_duration(uint64_t ms, char *buf, size_t cap)
{
    static const struct unit units[] = {{"h", 3600000}, {"m", 60000}, {"s", 1000}, {"ms", 1}};
    format_units(ms, units, sizeof(units) / sizeof(units[0]), buf, cap);
}

void sl__config_format_size(uint64_t bytes, char *buf, size_t cap)
{
    static const struct unit units[] = {
        {"TiB", 1ull << 40}, {"GiB", 1ull << 30}, {"MiB", 1ull << 20}, {"KiB", 1ull << 10}, {"", 1},
    };
    format_units(bytes, units, sizeof(units) / sizeof(units[0]), buf, cap);
}

bool sl__config_is_token(const char *s, size_t len)
{
    if (len == 0)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
            continue;
        if (c == 0 || !strchr("!#$%&'*+-.^_`|~", c))
            return false;
    }
    return true;
}

enum sl_method sl_method_from_token(const char *p, size_t len)
{
    static const struct {
        const char *name;
        enum sl_method bit;
    } methods[] = {
        {"GET", SL_METHOD_GET},         {"HEAD", SL_METHOD_HEAD},
        {"POST", SL_METHOD_POST},       {"PUT", SL_METHOD_PUT},
        {"DELETE", SL_METHOD_DELETE},   {"PATCH", SL_METHOD_PATCH},
        {"OPTIONS", SL_METHOD_OPTIONS}, {"TRACE", SL_METHOD_TRACE},
        {"CONNECT", SL_METHOD_CONNECT},
    };
    for (size_t i = 0; i < sizeof(methods) / sizeof(methods[0]); i++)
        if (strlen(methods[i].name) == len && memcmp(methods[i].name, p, len) == 0)
            return methods[i].bit;
    return SL_METHOD_OTHER;
}

static bool is_hostname(const char *h, size_t len)
{
    if (len == 0 || len > 253)
        return false;
    size_t label = 0;
    for (size_t i = 0; i < len; i++) {
        char c = h[i];
        if (c == '.') {
            if (label == 0)
                return false;
            label = 0;
            continue;
        }
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_'))
            return false;
        if (++label > 63)
            return false;
    }
    return label > 0;
}

int sl__config_address_parse(const char *s, bool resolve, struct sockaddr_storage *out,
                             socklen_t *out_len, char *msg, size_t msg_cap)
{
    char host[256];
    const char *port_s;
    size_t hlen;
    memset(out, 0, sizeof(*out));
    *out_len = 0;
    if (s[0] == '[') {
        const char *end = strchr(s, ']');
        if (!end || end[1] != ':') {
            snprintf(msg, msg_cap, "expected [v6]:port");
            return -EINVAL;
        }
        hlen = (size_t)(end - s - 1);
        if (hlen >= sizeof(host)) {
            snprintf(msg, msg_cap, "invalid IPv6 address");
            return -EINVAL;
        }
        memcpy(host, s + 1, hlen);
        port_s = end + 2;
    } else {
        const char *colon = strrchr(s, ':');
        if (!colon) {
            snprintf(msg, msg_cap, "expected host:port or [v6]:port");
            return -EINVAL;
        }
        hlen = (size_t)(colon - s);
        if (memchr(s, ':', hlen)) {
            snprintf(msg, msg_cap, "IPv6 addresses need brackets, e.g. [::1]:8080");
            return -EINVAL;
        }
        if (hlen == 0 || hlen >= sizeof(host)) {
            snprintf(msg, msg_cap, "expected host:port or [v6]:port");
            return -EINVAL;
        }
        memcpy(host, s, hlen);
        port_s = colon + 1;
    }
    host[hlen] = '\0';

    uint64_t port;
    size_t digits = parse_digits(port_s, &port);
    if (digits == 0 || port_s[digits] != '\0' || digits > 5 || port == 0 || port > 65535) {
        snprintf(msg, msg_cap, "port must be a number in 1..65535");
        return -EINVAL;
    }

    /* Numeric fast path: no resolver involved. */
    if (s[0] == '[') {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)out;
        if (inet_pton(AF_INET6, host, &a6->sin6_addr) != 1) {
            snprintf(msg, msg_cap, "invalid IPv6 address");
            return -EINVAL;
        }
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        *out_len = sizeof(*a6);
        return 0;
    }
    struct sockaddr_in *a4 = (struct sockaddr_in *)out;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        *out_len = sizeof(*a4);
        return 0;
    }
    if (!is_hostname(host, hlen)) {
        snprintf(msg, msg_cap, "invalid host name");
        return -EINVAL;
    }
    if (!resolve)
        return 0;

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(host, NULL, &hints, &res);
    if (rc != 0 || !res) {
        snprintf(msg, msg_cap, "cannot resolve host: %s", rc ? gai_strerror(rc) : "no address");
        return -ENOENT;
    }
    if (res->ai_addrlen > sizeof(*out)) {
        freeaddrinfo(res);
        snprintf(msg, msg_cap, "cannot resolve host: unsupported address");
        return -ENOENT;
    }
    memcpy(out, res->ai_addr, res->ai_addrlen);
    *out_len = res->ai_addrlen;
    freeaddrinfo(res);
    if (out->ss_family == AF_INET6)
        ((struct sockaddr_in6 *)out)->sin6_port = htons((uint16_t)port);
    else
        ((struct sockaddr_in *)out)->sin_port = htons((uint16_t)port);
    return 0;
}

int sl_config_parse_address(const char *s, struct sockaddr_storage *out, socklen_t *out_len)
{
    char msg[128];
    return sl__config_address_parse(s, resolve_hostnames, out, out_len, msg, sizeof(msg));
}

int sl_config_parse_rate(const char *s, size_t len, uint64_t *period_us)
{
    size_t i = 0;
    uint64_t n = 0;
    while (i < len && s[i] >= '0' && s[i] <= '9') {
        if (n > 1000000000000ull) /* far above any usable rate; avoids overflow */
            return -ERANGE;
        n = n * 10 + (uint64_t)(s[i] - '0');
        i++;
    }
    if (i == 0 || i + 2 != len || s[i] != '/' || n == 0)
        return -EINVAL;
    uint64_t unit_us;
    switch (s[i + 1]) {
    case 's':
        unit_us = 1000000ull;
        break;
    case 'm':
        unit_us = 60ull * 1000000ull;
        break;
    case 'h':
        unit_us = 3600ull * 1000000ull;
        break;
    default:
        return -EINVAL;
    }
    if (n > unit_us)
        return -ERANGE;
    /* Rounded up: the spec promises at most rate x T (+ burst + 1) over T. */
    *period_us = (unit_us + n - 1) / n;
    return 0;
}
