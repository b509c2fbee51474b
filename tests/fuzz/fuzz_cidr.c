#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "core/cidr.h"
#include "../unit/cidr_model.h"

/*
 * CIDR text and sets. The whole input goes to the two address parsers (exact-size copy, so
 * overreads are caught) and, NUL-terminated, to sl_cidr_parse; then each line is parsed as
 * one entry, the accepted ones become a set, and that set is asked about addresses taken from
 * the input and from the edges of every entry, against a linear scan of the documented rule.
 * Every accepted text must print (inet_ntop) and parse back to the same value.
 */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int cond, const char *what)
{
    if (!cond) {
        fprintf(stderr, "invariant failed: %s\n", what);
        abort();
    }
}

static void check_text_round_trip(int family, const uint8_t *a)
{
    char text[INET6_ADDRSTRLEN];
    uint8_t back[16];
    check(inet_ntop(family, a, text, sizeof(text)) != NULL, "inet_ntop");
    int rc = family == AF_INET ? sl_cidr_parse_ipv4(text, strlen(text), back)
                               : sl_cidr_parse_ipv6(text, strlen(text), back);
    check(rc == 0, "printed address parses");
    check(memcmp(back, a, family == AF_INET ? 4 : 16) == 0, "printed address round trip");
}

static void check_entry(const struct sl_cidr *c)
{
    check(c->family == AF_INET || c->family == AF_INET6, "family");
    unsigned bits = c->family == AF_INET ? 32 : 128;
    check(c->prefix_len <= bits, "prefix range");
    for (unsigned b = c->prefix_len; b < 128; b++)
        check(!(c->addr[b / 8] & (0x80u >> (b % 8))), "no host bits");
    check_text_round_trip(c->family, c->addr);

    /* printed as "addr/len" it parses to the same entry */
    char text[INET6_ADDRSTRLEN + 8], err[160];
    char a[INET6_ADDRSTRLEN];
    check(inet_ntop(c->family, c->addr, a, sizeof(a)) != NULL, "inet_ntop entry");
    snprintf(text, sizeof(text), "%s/%u", a, c->prefix_len);
    struct sl_cidr back;
    check(sl_cidr_parse(text, &back, err, sizeof(err)) == 0, "printed entry parses");
    check(back.family == c->family && back.prefix_len == c->prefix_len &&
              memcmp(back.addr, c->addr, 16) == 0,
          "entry round trip");
}

static void query(const struct sl_cidr_set *s, const struct sl_cidr *e, size_t n, int family,
                  const uint8_t a[16])
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    uint8_t full[16] = {0};
    if (family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&ss;
        in->sin_family = AF_INET;
        memcpy(&in->sin_addr, a, 4);
        memcpy(full, a, 4);
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
        in6->sin6_family = AF_INET6;
        memcpy(&in6->sin6_addr, a, 16);
        memcpy(full, a, 16);
    }
    int got = sl_cidr_set_contains(s, (const struct sockaddr *)&ss);
    check(got == cidr_model_match(e, n, family, full), "set agrees with a linear scan");
}

#define MAX_ENTRIES 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t a[16];
    char *exact = malloc(size ? size : 1);
    check(exact != NULL, "oom");
    if (size)
        memcpy(exact, data, size);
    if (sl_cidr_parse_ipv4(exact, size, a) == 0)
        check_text_round_trip(AF_INET, a);
    if (sl_cidr_parse_ipv6(exact, size, a) == 0)
        check_text_round_trip(AF_INET6, a);
    free(exact);

    char *text = malloc(size + 1);
    check(text != NULL, "oom");
    if (size)
        memcpy(text, data, size);
    text[size] = '\0';
    struct sl_cidr c;
    char err[128];
    memset(err, 'Z', sizeof(err));
    if (sl_cidr_parse(text, &c, err, sizeof(err)) == 0)
        check_entry(&c);
    else
        check(memchr(err, '\0', sizeof(err)) != NULL && err[0] != '\0', "error text");

    /* each line one entry */
    struct sl_cidr e[MAX_ENTRIES];
    size_t n = 0;
    char *line = text;
    while (line && n < MAX_ENTRIES) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        if (sl_cidr_parse(line, &e[n], err, sizeof(err)) == 0) {
            check_entry(&e[n]);
            n++;
        }
        line = nl ? nl + 1 : NULL;
    }
    free(text);
    struct sl_cidr_set *s = sl_cidr_set_new(e, n);
    check(s != NULL, "set built");
    check(sl_cidr_set_range_count(s) <= n, "merging never adds ranges");

    /* addresses from the raw input, and just inside and outside each entry */
    for (size_t off = 0; off + 16 <= size && off < 256; off += 7) {
        query(s, e, n, AF_INET, data + off);
        query(s, e, n, AF_INET6, data + off);
        uint8_t m[16];
        memcpy(m, cidr_model_mapped_prefix, 12);
        memcpy(m + 12, data + off, 4);
        query(s, e, n, AF_INET6, m);
    }
    for (size_t i = 0; i < n; i++) {
        unsigned bits = e[i].family == AF_INET ? 32 : 128;
        uint8_t lo[16], hi[16];
        memcpy(lo, e[i].addr, 16);
        memcpy(hi, e[i].addr, 16);
        for (unsigned b = e[i].prefix_len; b < bits; b++)
            hi[b / 8] |= (uint8_t)(0x80u >> (b % 8));
        query(s, e, n, e[i].family, lo);
        query(s, e, n, e[i].family, hi);
        /* one below the first and one above the last address */
        unsigned bytes = bits / 8;
        uint8_t below[16], above[16];
        memcpy(below, lo, 16);
        memcpy(above, hi, 16);
        for (unsigned k = bytes; k-- > 0;)
            if (below[k]-- != 0)
                break;
        for (unsigned k = bytes; k-- > 0;)
            if (++above[k] != 0)
                break;
        query(s, e, n, e[i].family, below);
        query(s, e, n, e[i].family, above);
    }
    sl_cidr_set_free(s);
    return 0;
}
