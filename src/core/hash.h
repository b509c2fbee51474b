#ifndef SL_CORE_HASH_H
#define SL_CORE_HASH_H

#include <stddef.h>
#include <stdint.h>

/* Fast non-cryptographic 64-bit hash (stable across runs and machines, seedable). */
uint64_t sl_hash_bytes(const void *p, size_t len, uint64_t seed);

/* Case-insensitive ASCII variant, for header names and hosts. */
uint64_t sl_hash_bytes_lower(const void *p, size_t len, uint64_t seed);

#endif
