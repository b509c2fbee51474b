#ifndef SL_CONFIG_UNITS_H
#define SL_CONFIG_UNITS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* The public parsers (durations, sizes, addresses, methods) are declared in config/config.h. */

/*
 * Parses "host:port" / "[v6]:port" like sl_config_parse_address(). When `resolve` is false a
 * syntactically valid hostname is accepted without a lookup and *out_len is set to 0. On
 * failure returns -EINVAL (syntax) or -ENOENT (lookup failed) and writes the reason to `msg`.
 */
int sl__config_address_parse(const char *s, bool resolve, struct sockaddr_storage *out,
                             socklen_t *out_len, char *msg, size_t msg_cap);

/* Whether sl_config_load*() resolves hostnames (see sl_config_set_resolve()). */
bool sl__config_resolve_enabled(void);

/* RFC 9110 token: one or more tchar. */
bool sl__config_is_token(const char *s, size_t len);

/* Writes a duration / size in the largest unit that divides it exactly ("90s", "16KiB"). */
void sl__config_format_duration(uint64_t ms, char *buf, size_t cap);
void sl__config_format_size(uint64_t bytes, char *buf, size_t cap);

/*
 * A rate "N/s", "N/m" or "N/h" (N >= 1, decimal, nothing else) of `len` bytes as the emission
 * interval in microseconds, rounded up so that no more than N pass per unit. Returns 0,
 * -EINVAL (bad syntax or N == 0) or -ERANGE (N per unit finer than 1 µs apart).
 */
int sl_config_parse_rate(const char *s, size_t len, uint64_t *period_us);

#endif
