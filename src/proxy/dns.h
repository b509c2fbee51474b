#ifndef SL_PROXY_DNS_H
#define SL_PROXY_DNS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct sl_loop;

/*
 * Asynchronous DNS for service discovery: one c-ares channel whose sockets and timeouts are
 * driven by one of our loops, so a lookup never blocks the thread. Loop thread only.
 *
 * A lookup asks DNS only (never /etc/hosts) and answers through its callback within the
 * channel's timeout: either the addresses with the smallest TTL among the records used, or an
 * error. With explicit servers, names are looked up as written (no search domains; the
 * resolv.conf search list belongs to the resolv.conf servers). Without, /etc/resolv.conf gives
 * the servers, search domains and ndots, read once when the channel is created.
 */
struct sl_dns;
struct sl_dns_query;

enum sl_dns_kind {
    SL_DNS_ADDR, /* A and AAAA records of the name */
    SL_DNS_SRV,  /* SRV records of the name, then A and AAAA of each target */
};

/* At most this many addresses in one answer (the rest are dropped). */
#define SL_DNS_MAX_ADDRS 256
/* At most this many distinct SRV targets are looked up (records naming others are dropped). */
#define SL_DNS_MAX_SRV_TARGETS 64

struct sl_dns_addr {
    struct sockaddr_storage addr; /* port filled in */
    socklen_t addr_len;
    uint16_t priority, weight; /* SRV values; 0 for SL_DNS_ADDR */
    char text[64];             /* "ip:port" or "[ip6]:port" */
};

/*
 * The answer of one lookup.
 *
 * status 0: answered. `n` may be 0: the name exists with no usable address ("empty"), or for
 * SRV every target is "." or has no address. `addrs` are sorted by priority, then address,
 * then port, without duplicates. ttl_s is the smallest TTL over every record used (the SRV
 * records and the answers of the targets that gave addresses, CNAMEs included); 0 when none.
 *
 * Otherwise a negative errno with `error` a short message for logs:
 *   -ENOENT       "NXDOMAIN" (for SRV: the SRV name; a target that does not exist only
 *                 contributes nothing)
 *   -ETIMEDOUT    "timeout"
 *   -EIO          "server failure or unreachable" (c-ares 1.18 says so for SERVFAIL and
 *                 REFUSED answers too, once every try got one), "FORMERR", ...
 *   -EBADMSG      "bad response"
 *   -EINVAL       "bad name"
 *   -ENOMEM       "out of memory"
 * An error while looking up any SRV target fails the whole lookup: a partial answer would
 * drop endpoints only because one lookup failed for a moment.
 *
 * `addrs` and `error` are valid only during the call. Runs on the loop thread, never from
 * inside sl_dns_resolve(), and never after sl_dns_cancel() or sl_dns_free(). The query handle
 * is gone once the callback runs: do not cancel it from (or after) its own callback. The
 * callback may start new lookups, cancel others, or free the channel.
 */
typedef void (*sl_dns_cb)(void *data, int status, const char *error,
                          const struct sl_dns_addr *addrs, size_t n, uint32_t ttl_s);

/*
 * A channel on `loop` (which must outlive it). `servers` lists "ip", "ip:port", "[ip6]" or
 * "[ip6]:port" (a bare IPv6 address is taken whole); none (nservers 0) uses /etc/resolv.conf.
 * The strings are copied. `timeout_ms` bounds each lookup stage (0 means 2 s): the whole
 * SL_DNS_ADDR lookup, or for SL_DNS_SRV the SRV lookup and then the targets' lookups (which
 * run in parallel). Returns NULL with a reason in `err` on a bad server address, a c-ares
 * initialisation failure or allocation failure. Reads /etc/resolv.conf (a small file) here
 * and never again.
 */
struct sl_dns *sl_dns_new(struct sl_loop *loop, char *const *servers, size_t nservers,
                          uint64_t timeout_ms, char *err, size_t err_len);

/*
 * Cancels every pending lookup silently (no callback runs), closes the sockets and frees the
 * channel. NULL is a no-op. The sockets' small bookkeeping records are released at the end of
 * the current loop turn (sl_loop_run_deferred), because an event for them may still be queued
 * in this turn.
 */
void sl_dns_free(struct sl_dns *d);

/*
 * Starts a lookup of `name` (copied). For SL_DNS_ADDR every address gets `port`; for
 * SL_DNS_SRV `port` is ignored and each address gets its record's port, priority and weight:
 * all priorities are returned, the caller decides what to do with them. An IP literal answers
 * itself (with ttl_s UINT32_MAX) without asking DNS. The returned handle is owned by the
 * channel; it stays valid until the callback runs or sl_dns_cancel() is called. Returns NULL
 * (and cb never runs) on allocation failure or an empty name or one over 253 characters.
 */
struct sl_dns_query *sl_dns_resolve(struct sl_dns *d, const char *name, enum sl_dns_kind kind,
                                    uint16_t port, sl_dns_cb cb, void *data);

/* Forgets a pending lookup: its callback will not run. Packets still in flight for it are
 * dropped when they arrive. */
void sl_dns_cancel(struct sl_dns_query *q);

/*
 * Walks a DNS message (untrusted bytes, `len` of them) and finds the smallest TTL in its answer
 * section: the header, the question names, then every answer record (owner name, type, class,
 * TTL, rdata length, rdata). TTLs with the top bit set count as 0 (RFC 2181 §8). Names are
 * checked whole, compression pointers followed: each pointer must point strictly before the
 * labels that lead to it (so loops are impossible), labels are at most 63 bytes and names at
 * most 255. The authority and additional sections are not read. Returns 0 with *answers the
 * answer count and *min_ttl the smallest TTL (0 when there is no answer), or -EBADMSG when the
 * header, a question or an answer is malformed or runs past `len`; the outputs are then
 * untouched.
 */
int sl_dns_answer_min_ttl(const uint8_t *msg, size_t len, uint32_t *min_ttl, size_t *answers);

#endif
