#ifndef SL_CORE_HASH_H
#define SL_CORE_HASH_H

#include <stddef.h>
#include <stdint.h>

/* Fast non-cryptographic 64-bit hash (stable across runs and machines, seedable). */
uint64_t sl_hash_bytes(const void *p, size_t len, uint64_t seed);

/* Case-insensitive ASCII variant, for header names and hosts. */
uint64_t sl_hash_bytes_lower(const void *p, size_t len, uint64_t seed);

/* SipHash-2-4 with a 128-bit secret key: a keyed hash for tables whose keys an attacker
 * chooses (rate-limit keys, token caches), so collisions cannot be aimed. */
uint64_t sl_siphash(const void *p, size_t len, const uint64_t key[2]);

/* Fills a key from getrandom(); falls back to clock and address bits if it fails. */
void sl_siphash_key_init(uint64_t key[2]);

#endif
