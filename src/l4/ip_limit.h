#ifndef SL_L4_IP_LIMIT_H
#define SL_L4_IP_LIMIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct sockaddr;

/*
 * Per-client-address limits at accept, shared by every worker thread without locks: at most
 * `max_conns` connections open at once per address, and new connections per address at most
 * one per `period_us` after a burst of `burst` (GCRA, as in filters/rl_table.h).
 *
 * An address is keyed by its network: IPv4 by its first v4_prefix_bits (32: the address), IPv6
 * by its first v6_prefix_bits (64: one customer usually owns a whole /64, so counting single
 * addresses would let one client open 2^64 "clients"). An IPv4-mapped IPv6 address
 * (::ffff:a.b.c.d, what a dual-stack listener reports) counts as the IPv4 address.
 *
 * One fixed table of slots, allocated at creation. A slot is 16 bytes: the key's 64-bit hash
 * (SipHash under a per-table random key, so clients cannot aim collisions) and one 64-bit state
 * word packing the open-connection count, the GCRA time and a generation; each decision is a
 * compare-and-swap on the state word, so a key's count and rate stay exact under any number of
 * threads. Memory: 16 bytes x slots, slots = 2 x max_keys rounded up to a power of two (at least
 * 16): 1 Mi keys take 32 MiB.
 *
 * A key lives in one of two groups of 4 slots chosen by its hash (one cache line each). A slot
 * whose key has no open connection and a full bucket is as good as free and is reused first;
 * then one with no open connection whose bucket is not full (its rate history is forgotten:
 * that client gets a fresh burst); a slot with open connections is never taken, since its
 * count must meet its releases. When all 8 are taken, the connection is allowed without being
 * counted (fail open: a table flooded with addresses must not lock everyone out) and
 * counted in `untracked`.
 */

enum sl_ip_limit_reason {
    SL_IP_LIMIT_OK,        /* allowed and counted: call sl_ip_limit_release at close */
    SL_IP_LIMIT_UNTRACKED, /* allowed, not counted (table full, or no IP): no release */
    SL_IP_LIMIT_CONNS,     /* refused: the address has max_conns connections open */
    SL_IP_LIMIT_RATE,      /* refused: new connections faster than the rate and burst */
};

/* Short name for logs and metrics ("ok", "untracked", "conns", "rate"). */
const char *sl_ip_limit_reason_name(enum sl_ip_limit_reason r);

/* Largest max_conns (the count has 14 bits, one value kept as a marker). */
#define SL_IP_LIMIT_MAX_CONNS 16382u

/* Largest max_keys (2^24 slots = 256 MiB). */
#define SL_IP_LIMIT_MAX_KEYS (1u << 23)

struct sl_ip_limit_conf {
    uint32_t max_conns;     /* open connections per key; 0: no cap (and no counting) */
    uint64_t period_us;     /* 1 s / rate (sl_config_parse_rate gives it); 0: no rate limit */
    uint32_t burst;         /* connections allowed at once above the rate */
    uint8_t v4_prefix_bits; /* 1..32; 0 means 32 */
    uint8_t v6_prefix_bits; /* 1..128; 0 means 64 */
    size_t max_keys;        /* addresses tracked at once (with open connections or a recent
                               burst); 1..SL_IP_LIMIT_MAX_KEYS */
};

/* Rejections and fail-opens since creation (relaxed counters; read any time). */
struct sl_ip_limit_stats {
    uint64_t refused_conns;
    uint64_t refused_rate;
    uint64_t untracked; /* allowed uncounted because the key's slots were all taken */
    uint64_t unmatched; /* releases that found no counted connection (caller bug) */
};

struct sl_ip_limit;

/*
 * Creates the table with one reference. Returns NULL with *err set: -EINVAL for a bad conf
 * (bounds above; burst x period_us must stay below 2^42 µs, about 50 days), -ENOMEM. Caller
 * owns that reference; release with sl_ip_limit_free().
 */
struct sl_ip_limit *sl_ip_limit_new(const struct sl_ip_limit_conf *conf, int *err);

/* Adds a reference: the table lives while its creator and every connection it counted
 * (which hold one each) need it, across configuration reloads. */
void sl_ip_limit_ref(struct sl_ip_limit *l);

/* Drops a reference (the creator's, from sl_ip_limit_new, or one from sl_ip_limit_ref); the
 * last one frees the table. NULL is fine. */
void sl_ip_limit_free(struct sl_ip_limit *l);

/* Number of slots and bytes held by the table. */
size_t sl_ip_limit_capacity(const struct sl_ip_limit *l);
size_t sl_ip_limit_memory_bytes(const struct sl_ip_limit *l);

/*
 * Decides a new connection from `sa` (borrowed for the call; AF_INET or AF_INET6, anything else
 * is allowed untracked) at `now_us` (CLOCK_MONOTONIC µs, e.g. sl_loop_now_us). Returns true
 * when allowed; *why (may be NULL) says how: only SL_IP_LIMIT_OK must be released. Refusals
 * change no state: a refused connection neither counts nor uses the rate. Thread-safe,
 * lock-free, never allocates, never calls back.
 *
 * Exact for every key that keeps its slot. Looser, never stricter, in these cases: a key with
 * nothing open whose slot was taken for another starts over with a full burst; with all 8
 * candidate slots holding open connections, or after 64 claim races lost in a row, the
 * connection passes untracked.
 */
bool sl_ip_limit_acquire(struct sl_ip_limit *l, const struct sockaddr *sa, uint64_t now_us,
                         enum sl_ip_limit_reason *why);

/* Ends a connection acquired with SL_IP_LIMIT_OK from the same address. Thread-safe. */
void sl_ip_limit_release(struct sl_ip_limit *l, const struct sockaddr *sa);

/* Connections currently counted for `sa`'s key (a lookup, for tests and status). */
uint32_t sl_ip_limit_count(const struct sl_ip_limit *l, const struct sockaddr *sa);

void sl_ip_limit_stats(const struct sl_ip_limit *l, struct sl_ip_limit_stats *out);

#endif
