/* libFuzzer target: arbitrary bytes through the endpoints-file parser. A success must describe
 * valid endpoints (IP literals, weights 1..1000, zone names, no duplicate address, within the
 * limits) and survive a round trip through JSON; a failure must leave nothing allocated and a
 * one-line "line:col: message". The input is copied to an exact-size buffer so an overread is
 * caught, and parsed a second time with a tiny error buffer to exercise truncation. */
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proxy/epfile.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int cond, const char *what)
{
    if (!cond) {
        fprintf(stderr, "invariant failed: %s\n", what);
        abort();
    }
}

static int addr_cmp(const void *a, const void *b)
{
    const struct sl_endpoint_spec *x = a, *y = b;
    if (x->addr_len != y->addr_len)
        return x->addr_len < y->addr_len ? -1 : 1;
    return memcmp(&x->addr, &y->addr, x->addr_len);
}

static void check_specs(const struct sl_endpoint_spec *s, size_t n)
{
    check(n <= SL_EPFILE_MAX_ENDPOINTS, "endpoint limit");
    check((n == 0) == (s == NULL), "NULL exactly when empty");
    for (size_t i = 0; i < n; i++) {
        check(s[i].address != NULL, "address set");
        size_t al = strlen(s[i].address);
        check(al >= 3, "address length");
        for (size_t j = 0; j < al; j++)
            check(strchr("0123456789abcdefABCDEF:.[]", s[i].address[j]) != NULL,
                  "address is an IP literal and a port");
        check(s[i].addr_len == sizeof(struct sockaddr_in) ||
                  s[i].addr_len == sizeof(struct sockaddr_in6),
              "address family");
        check(s[i].addr.ss_family ==
                  (s[i].addr_len == sizeof(struct sockaddr_in) ? AF_INET : AF_INET6),
              "family matches length");
        check((s[i].address[0] == '[') == (s[i].addr.ss_family == AF_INET6), "brackets iff v6");
        check(s[i].weight >= 1 && s[i].weight <= 1000, "weight range");
        if (s[i].zone) {
            size_t zl = strlen(s[i].zone);
            check(zl >= 1 && zl <= 64, "zone length");
            for (size_t j = 0; j < zl; j++)
                check(strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.",
                             s[i].zone[j]) != NULL,
                      "zone characters");
        }
    }
    if (n < 2)
        return;
    struct sl_endpoint_spec *sorted = malloc(n * sizeof(*sorted));
    check(sorted != NULL, "oom");
    memcpy(sorted, s, n * sizeof(*sorted));
    qsort(sorted, n, sizeof(*sorted), addr_cmp);
    for (size_t i = 1; i < n; i++)
        check(addr_cmp(&sorted[i - 1], &sorted[i]) != 0, "no duplicate address");
    free(sorted);
}

static void check_err(const char *err, size_t cap, const char *text, size_t len)
{
    check(memchr(err, '\0', cap) != NULL, "error is terminated");
    size_t i = 0, digits = 0, line = 0;
    while (err[i] >= '0' && err[i] <= '9') {
        line = line * 10 + (size_t)(err[i] - '0');
        i++, digits++;
    }
    check(digits > 0 && err[i] == ':', "error line");
    /* libyaml counts CR, LF and CRLF as line breaks (and NEL, LS, PS in UTF-8), and puts the
     * end of the stream at the start of the line after the last one, even without a final
     * line break: an error there ("[") names line breaks + 2. */
    size_t breaks = 0;
    for (size_t k = 0; k < len; k++)
        breaks += text[k] == '\n' || text[k] == '\r' || (unsigned char)text[k] >= 0x80;
    check(line >= 1 && line <= breaks + 2, "error line inside the input or just after");
    i++;
    digits = 0;
    while (err[i] >= '0' && err[i] <= '9')
        i++, digits++;
    check(digits > 0 && err[i] == ':' && err[i + 1] == ' ' && err[i + 2] != '\0', "error col");
    for (; err[i]; i++)
        check((unsigned char)err[i] >= 0x20 && err[i] != 0x7f, "one printable line");
}

/* The specs as a JSON document, which must parse back to the same list. */
static void round_trip(const struct sl_endpoint_spec *s, size_t n)
{
    size_t cap = 32 + n * 160, o = 0;
    char *j = malloc(cap);
    check(j != NULL, "oom");
    o += (size_t)snprintf(j + o, cap - o, "{\"endpoints\": [");
    for (size_t i = 0; i < n; i++) {
        o += (size_t)snprintf(j + o, cap - o, "%s{\"address\": \"%s\", \"weight\": %u",
                              i ? ", " : "", s[i].address, (unsigned)s[i].weight);
        if (s[i].zone)
            o += (size_t)snprintf(j + o, cap - o, ", \"zone\": \"%s\"", s[i].zone);
        o += (size_t)snprintf(j + o, cap - o, "}");
    }
    o += (size_t)snprintf(j + o, cap - o, "]}");
    check(o < cap, "json fits");
    struct sl_endpoint_spec *r;
    size_t rn;
    char err[256];
    int rc = sl_epfile_parse(j, o, &r, &rn, err, sizeof(err));
    if (rc != 0)
        fprintf(stderr, "round trip failed: %s\n", err);
    check(rc == 0 && rn == n, "round trip parses");
    for (size_t i = 0; i < n; i++) {
        check(strcmp(r[i].address, s[i].address) == 0, "round trip address");
        check(r[i].addr_len == s[i].addr_len && memcmp(&r[i].addr, &s[i].addr, s[i].addr_len) == 0,
              "round trip sockaddr");
        check(r[i].weight == s[i].weight, "round trip weight");
        check((r[i].zone == NULL) == (s[i].zone == NULL) &&
                  (!s[i].zone || strcmp(r[i].zone, s[i].zone) == 0),
              "round trip zone");
    }
    sl_epfile_specs_free(r, rn);
    free(j);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size ? size : 1);
    check(text != NULL, "oom");
    if (size)
        memcpy(text, data, size);

    struct sl_endpoint_spec *s = (void *)1;
    size_t n = 99;
    char err[512];
    memset(err, 'x', sizeof(err));
    int rc = sl_epfile_parse(text, size, &s, &n, err, sizeof(err));
    if (rc == 0) {
        check_specs(s, n);
        round_trip(s, n);
    } else {
        check(rc == -1, "return value");
        check(s == NULL && n == 0, "nothing returned on error");
        check_err(err, sizeof(err), text, size);
    }

    /* Same verdict with an error buffer too small for any message. */
    struct sl_endpoint_spec *s2;
    size_t n2;
    char small[6];
    memset(small, 'x', sizeof(small));
    int rc2 = sl_epfile_parse(text, size, &s2, &n2, small, (size_t)(size % 7));
    check(rc2 == rc, "deterministic");
    if (rc2 == 0) {
        check(n2 == n, "deterministic count");
        sl_epfile_specs_free(s2, n2);
    } else if (size % 7) {
        check(memchr(small, '\0', size % 7) != NULL, "truncated error is terminated");
        check(strncmp(small, err, size % 7 - 1) == 0, "truncated error is a prefix");
    }
    if (rc == 0)
        sl_epfile_specs_free(s, n);
    free(text);
    return 0;
}
