#ifndef SL_CORE_CIDR_H
#define SL_CORE_CIDR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * CIDR prefixes and immutable sets of them, for allow/deny lists and trusted-proxy lists on
 * the edge (PROXY protocol senders, per-IP limits). Parsing happens at load; the set is built
 * once (one malloc) and then only read, so workers share it without locks. Lookups allocate
 * nothing and cost O(log n).
 *
 * Address text is strict: IPv4 is exactly four decimal numbers 0-255 without leading zeros
 * ("010.0.0.1" could be read as octal elsewhere, so it is refused), IPv6 is RFC 4291 text
 * (1-4 hex digits per group, at most one "::", optional dotted IPv4 tail), no zone index, no
 * brackets, no surrounding spaces.
 *
 * IPv4-mapped IPv6 (::ffff:a.b.c.d) is IPv4: a mapped address looks up the IPv4 entries, and
 * an entry inside ::ffff:0:0/96 is stored as the IPv4 entry it names. A dual-stack listener
 * reports IPv4 clients that way, and one rule must cover both spellings. The other side of
 * the same decision: an IPv6 entry shorter than /96 that happens to cover ::ffff:0:0/96
 * (::/0, ::/64) does not match IPv4 clients.
 */

struct sockaddr;

/* One prefix. Address bytes in network order; IPv4 uses addr[0..3], the rest is zero. */
struct sl_cidr {
    int family;         /* AF_INET or AF_INET6 */
    uint8_t addr[16];   /* host bits beyond prefix_len are zero after sl_cidr_parse */
    uint8_t prefix_len; /* 0-32 for AF_INET, 0-128 for AF_INET6 */
};

/* An immutable set of prefixes. Opaque; built by sl_cidr_set_new. */
struct sl_cidr_set;

/*
 * Parses one entry from the NUL-terminated `s`: "10.0.0.0/8", "2001:db8::/32", or a bare
 * address ("192.168.1.7" = /32, "::1" = /128). Fills *out and returns 0, or returns -1 with
 * a one-line message in err (no location: the config loader adds file:line:col and the key
 * path). Refuses host bits set beyond the prefix ("10.0.0.1/8"; the message names the
 * network meant), prefix lengths out of range or with a leading zero, and anything that is
 * not an address. `s` and `err` are borrowed; err may be NULL.
 */
int sl_cidr_parse(const char *s, struct sl_cidr *out, char *err, size_t err_len);

/*
 * Parses exactly `len` bytes of address text (no NUL needed) in the strict syntax above.
 * sl_cidr_parse_ipv4 fills 4 bytes, sl_cidr_parse_ipv6 fills 16 (and accepts the dotted
 * tail, so "::ffff:1.2.3.4" is an IPv6 address here). Return 0, or -1 leaving out in an
 * unspecified state. Allocation-free; for other parsers of untrusted text (PROXY protocol).
 */
int sl_cidr_parse_ipv4(const char *s, size_t len, uint8_t out[4]);
int sl_cidr_parse_ipv6(const char *s, size_t len, uint8_t out[16]);

/*
 * Builds a set from `n` entries (borrowed; copied). Overlapping and duplicate entries are
 * fine; host bits beyond a prefix are ignored. n may be 0 (entries may then be NULL): an
 * empty set contains nothing. Returns a set owned by the caller (free with sl_cidr_set_free),
 * or NULL when out of memory or when an entry has a family other than AF_INET/AF_INET6 or a
 * prefix longer than its family allows. Boot-time only: allocates.
 */
struct sl_cidr_set *sl_cidr_set_new(const struct sl_cidr *entries, size_t n);

/* Frees a set from sl_cidr_set_new; NULL is a no-op. No lookup may be running on it. */
void sl_cidr_set_free(struct sl_cidr_set *s);

/* Number of disjoint address ranges the set holds after merging (for logs and tests). */
size_t sl_cidr_set_range_count(const struct sl_cidr_set *s);

/*
 * Whether the address in `sa` (AF_INET or AF_INET6; the port is ignored) lies in the set.
 * Mapped IPv6 addresses are looked up as IPv4 (see above). Other families, a NULL set or a
 * NULL address: false. Both borrowed. Allocation-free, lock-free, O(log n); safe to call from
 * any number of threads at once.
 */
bool sl_cidr_set_contains(const struct sl_cidr_set *s, const struct sockaddr *sa);

#endif
