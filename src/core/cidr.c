#include "core/cidr.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "core/fmt.h"

/*
 * A set is two sorted arrays of disjoint, non-adjacent inclusive ranges (one per family),
 * built by sorting the prefixes and merging. A lookup is one binary search, so the cost does
 * not depend on how the prefixes overlap, and the whole set is one block of memory.
 */

struct u128 {
    uint64_t hi, lo;
};

struct range4 {
    uint32_t first, last;
};

struct range6 {
    struct u128 first, last;
};

struct sl_cidr_set {
    const struct range4 *v4;
    const struct range6 *v6;
    size_t v4_count;
    size_t v6_count;
};

/* Longest address part echoed back in a message; the rest is cut so one bad line of config
 * cannot flood the error list. */
#define ECHO_MAX 64

/* ---- address text ------------------------------------------------------------------------ */

int sl_cidr_parse_ipv4(const char *s, size_t len, uint8_t out[4])
{
    size_t i = 0;
    for (int part = 0; part < 4; part++) {
        if (part) {
            if (i >= len || s[i] != '.')
                return -1;
            i++;
        }
        size_t start = i;
        unsigned v = 0;
        while (i < len && i - start < 3 && s[i] >= '0' && s[i] <= '9')
            v = v * 10 + (unsigned)(s[i++] - '0');
        if (i == start || v > 255 || (s[start] == '0' && i - start > 1))
            return -1;
        out[part] = (uint8_t)v;
    }
    return i == len ? 0 : -1;
}

int sl_cidr_parse_ipv6(const char *s, size_t len, uint8_t out[16])
{
    uint16_t words[8];
    int n = 0;
    int gap = -1; /* index in words where "::" stands, or -1 */
    size_t i = 0;

    if (len >= 1 && s[0] == ':') {
        if (len < 2 || s[1] != ':')
            return -1;
        gap = 0;
        i = 2;
    }
    while (i < len) {
        if (n == 8)
            return -1;
        size_t start = i;
        unsigned v = 0;
        int d;
        while (i < len && i - start < 4 && (d = sl_hex_digit((unsigned char)s[i])) >= 0) {
            v = v << 4 | (unsigned)d;
            i++;
        }
        if (i == start)
            return -1;
        if (i < len && s[i] == '.') {
            /* dotted IPv4 tail: takes the last two groups and the rest of the text */
            uint8_t v4[4];
            if (n > 6 || sl_cidr_parse_ipv4(s + start, len - start, v4) != 0)
                return -1;
            words[n++] = (uint16_t)(v4[0] << 8 | v4[1]);
            words[n++] = (uint16_t)(v4[2] << 8 | v4[3]);
            break;
        }
        words[n++] = (uint16_t)v;
        if (i == len)
            break;
        if (s[i] != ':')
            return -1;
        i++;
        if (i == len)
            return -1; /* a single trailing ':' */
        if (s[i] == ':') {
            if (gap >= 0)
                return -1;
            gap = n;
            i++;
        }
    }
    /* "::" stands for at least one group (RFC 4291 2.2) */
    if (gap < 0 ? n != 8 : n > 7)
        return -1;
    int zeros = 8 - n;
    int w = 0;
    for (int k = 0; k < n; k++) {
        if (k == gap)
            for (int z = 0; z < zeros; z++, w++)
                out[2 * w] = out[2 * w + 1] = 0;
        out[2 * w] = (uint8_t)(words[k] >> 8);
        out[2 * w + 1] = (uint8_t)words[k];
        w++;
    }
    for (; w < 8; w++) /* "::" at the end (or the whole address) */
        out[2 * w] = out[2 * w + 1] = 0;
    return 0;
}

/* ---- prefixes ----------------------------------------------------------------------------- */

static uint32_t load32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t load64(const uint8_t *p)
{
    return (uint64_t)load32(p) << 32 | load32(p + 4);
}

static uint32_t mask32(unsigned prefix_len)
{
    return prefix_len == 0 ? 0 : ~(uint32_t)0 << (32 - prefix_len);
}

static struct u128 mask128(unsigned prefix_len)
{
    struct u128 m = {0, 0};
    if (prefix_len > 64) {
        m.hi = ~(uint64_t)0;
        m.lo = ~(uint64_t)0 << (128 - prefix_len);
    } else if (prefix_len > 0) {
        m.hi = ~(uint64_t)0 << (64 - prefix_len);
    }
    return m;
}

/* Clears the bits beyond the prefix; returns whether any was set. */
static bool clear_host_bits(struct sl_cidr *c)
{
    unsigned bits = c->family == AF_INET ? 32 : 128;
    bool had = false;
    for (unsigned b = c->prefix_len; b < bits; b++) {
        uint8_t m = (uint8_t)(0x80u >> (b % 8));
        if (c->addr[b / 8] & m) {
            had = true;
            c->addr[b / 8] &= (uint8_t)~m;
        }
    }
    return had;
}

static int echo_len(size_t n)
{
    return (int)(n > ECHO_MAX ? ECHO_MAX : n);
}

int sl_cidr_parse(const char *s, struct sl_cidr *out, char *err, size_t err_len)
{
    if (!s || !*s) {
        sl_fmt_err(err, err_len, "empty address");
        return -1;
    }
    const char *slash = strchr(s, '/');
    size_t alen = slash ? (size_t)(slash - s) : strlen(s);
    if (alen == 0) {
        sl_fmt_err(err, err_len, "missing address before '/'");
        return -1;
    }
    struct sl_cidr c = {0};
    unsigned max;
    if (memchr(s, ':', alen)) {
        c.family = AF_INET6;
        max = 128;
        if (sl_cidr_parse_ipv6(s, alen, c.addr) != 0)
            goto bad_addr;
    } else {
        c.family = AF_INET;
        max = 32;
        if (sl_cidr_parse_ipv4(s, alen, c.addr) != 0)
            goto bad_addr;
    }
    const char *fam = c.family == AF_INET ? "IPv4" : "IPv6";

    if (!slash) {
        c.prefix_len = (uint8_t)max;
        *out = c;
        return 0;
    }
    const char *p = slash + 1;
    size_t plen = strlen(p);
    if (plen == 0) {
        sl_fmt_err(err, err_len, "missing prefix length after '/'");
        return -1;
    }
    for (size_t i = 0; i < plen; i++) {
        if (p[i] < '0' || p[i] > '9') {
            sl_fmt_err(err, err_len, "prefix length '%.*s' is not a decimal number", echo_len(plen),
                       p);
            return -1;
        }
    }
    if (plen > 1 && p[0] == '0') {
        sl_fmt_err(err, err_len, "prefix length '%.*s' has a leading zero", echo_len(plen), p);
        return -1;
    }
    unsigned v = 0;
    for (size_t i = 0; i < plen && i < 4; i++)
        v = v * 10 + (unsigned)(p[i] - '0');
    if (plen > 3 || v > max) {
        sl_fmt_err(err, err_len, "prefix length %.*s is out of range for %s (0-%u)", echo_len(plen),
                   p, fam, max);
        return -1;
    }
    c.prefix_len = (uint8_t)v;
    struct sl_cidr net = c;
    if (clear_host_bits(&net)) {
        char text[INET6_ADDRSTRLEN];
        if (!inet_ntop(c.family, net.addr, text, sizeof(text)))
            text[0] = '\0';
        sl_fmt_err(err, err_len, "host bits set beyond the /%u prefix: did you mean %s/%u?", v,
                   text, v);
        return -1;
    }
    *out = c;
    return 0;

bad_addr:
    sl_fmt_err(err, err_len, "'%.*s' is not an IPv4 or IPv6 address", echo_len(alen), s);
    return -1;
}

/* ---- sets --------------------------------------------------------------------------------- */

static int cmp4(const void *a, const void *b)
{
    const struct range4 *x = a, *y = b;
    return x->first < y->first ? -1 : x->first > y->first;
}

static int cmp_u128(struct u128 a, struct u128 b)
{
    if (a.hi != b.hi)
        return a.hi < b.hi ? -1 : 1;
    return a.lo < b.lo ? -1 : a.lo > b.lo;
}

static int cmp6(const void *a, const void *b)
{
    const struct range6 *x = a, *y = b;
    return cmp_u128(x->first, y->first);
}

/* Merges sorted ranges in place (overlapping or adjacent ones become one); returns the count. */
static size_t merge4(struct range4 *r, size_t n)
{
    size_t out = 0;
    for (size_t i = 0; i < n; i++) {
        if (out > 0 && (r[out - 1].last == UINT32_MAX || r[i].first <= r[out - 1].last + 1)) {
            if (r[i].last > r[out - 1].last)
                r[out - 1].last = r[i].last;
        } else {
            r[out++] = r[i];
        }
    }
    return out;
}

static struct u128 inc_u128(struct u128 a)
{
    a.lo++;
    if (a.lo == 0)
        a.hi++;
    return a;
}

static bool is_max_u128(struct u128 a)
{
    return a.hi == UINT64_MAX && a.lo == UINT64_MAX;
}

static size_t merge6(struct range6 *r, size_t n)
{
    size_t out = 0;
    for (size_t i = 0; i < n; i++) {
        if (out > 0 && (is_max_u128(r[out - 1].last) ||
                        cmp_u128(r[i].first, inc_u128(r[out - 1].last)) <= 0)) {
            if (cmp_u128(r[i].last, r[out - 1].last) > 0)
                r[out - 1].last = r[i].last;
        } else {
            r[out++] = r[i];
        }
    }
    return out;
}

static bool is_mapped(const uint8_t a[16])
{
    static const uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return memcmp(a, prefix, sizeof(prefix)) == 0;
}

struct sl_cidr_set *sl_cidr_set_new(const struct sl_cidr *entries, size_t n)
{
    if (n > 0 && !entries)
        return NULL;
    size_t n4 = 0, n6 = 0;
    for (size_t i = 0; i < n; i++) {
        const struct sl_cidr *c = &entries[i];
        if (c->family == AF_INET && c->prefix_len <= 32)
            n4++;
        else if (c->family == AF_INET6 && c->prefix_len <= 128)
            n6 += !(c->prefix_len >= 96 && is_mapped(c->addr));
        else
            return NULL;
    }
    n4 += n - n4 - n6; /* mapped IPv6 entries become IPv4 ones */

    /* One block: header, then the IPv6 ranges, then the IPv4 ones (the stricter alignment
     * first, so no padding is needed after the header's pointer-sized fields). */
    size_t off6 = sizeof(struct sl_cidr_set);
    off6 = (off6 + _Alignof(struct range6) - 1) / _Alignof(struct range6) * _Alignof(struct range6);
    if (n6 > (SIZE_MAX - off6) / sizeof(struct range6))
        return NULL;
    size_t off4 = off6 + n6 * sizeof(struct range6);
    if (n4 > (SIZE_MAX - off4) / sizeof(struct range4))
        return NULL;
    size_t total = off4 + n4 * sizeof(struct range4);
    char *block = malloc(total);
    if (!block)
        return NULL;
    struct sl_cidr_set *s = (struct sl_cidr_set *)(void *)block;
    struct range6 *r6 = (struct range6 *)(void *)(block + off6);
    struct range4 *r4 = (struct range4 *)(void *)(block + off4);

    size_t i4 = 0, i6 = 0;
    for (size_t i = 0; i < n; i++) {
        const struct sl_cidr *c = &entries[i];
        if (c->family == AF_INET || (c->prefix_len >= 96 && is_mapped(c->addr))) {
            bool v4 = c->family == AF_INET;
            uint32_t a = load32(v4 ? c->addr : c->addr + 12);
            uint32_t m = mask32(v4 ? c->prefix_len : c->prefix_len - 96u);
            r4[i4].first = a & m;
            r4[i4].last = (a & m) | ~m;
            i4++;
        } else {
            struct u128 a = {load64(c->addr), load64(c->addr + 8)};
            struct u128 m = mask128(c->prefix_len);
            r6[i6].first = (struct u128){a.hi & m.hi, a.lo & m.lo};
            r6[i6].last = (struct u128){(a.hi & m.hi) | ~m.hi, (a.lo & m.lo) | ~m.lo};
            i6++;
        }
    }
    if (n4 > 1)
        qsort(r4, n4, sizeof(*r4), cmp4);
    if (n6 > 1)
        qsort(r6, n6, sizeof(*r6), cmp6);
    s->v4 = r4;
    s->v6 = r6;
    s->v4_count = merge4(r4, n4);
    s->v6_count = merge6(r6, n6);
    return s;
}

void sl_cidr_set_free(struct sl_cidr_set *s)
{
    free(s);
}

size_t sl_cidr_set_range_count(const struct sl_cidr_set *s)
{
    return s ? s->v4_count + s->v6_count : 0;
}

static bool contains4(const struct sl_cidr_set *s, uint32_t a)
{
    /* the last range whose first address is <= a is the only one that can hold it */
    size_t lo = 0, hi = s->v4_count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->v4[mid].first <= a)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo > 0 && a <= s->v4[lo - 1].last;
}

static bool contains6(const struct sl_cidr_set *s, struct u128 a)
{
    size_t lo = 0, hi = s->v6_count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cmp_u128(s->v6[mid].first, a) <= 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo > 0 && cmp_u128(a, s->v6[lo - 1].last) <= 0;
}

bool sl_cidr_set_contains(const struct sl_cidr_set *s, const struct sockaddr *sa)
{
    if (!s || !sa)
        return false;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)sa;
        return contains4(s, ntohl(in->sin_addr.s_addr));
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)sa;
        const uint8_t *b = in6->sin6_addr.s6_addr;
        if (is_mapped(b))
            return contains4(s, load32(b + 12));
        return contains6(s, (struct u128){load64(b), load64(b + 8)});
    }
    return false;
}
