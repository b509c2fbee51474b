#ifndef SL_CORE_SHA256_H
#define SL_CORE_SHA256_H

#include <stddef.h>

/* SHA-256 of `len` bytes into `out`; allocates nothing (see sha256.c for why it is here). */
void sl_sha256(const void *p, size_t len, unsigned char out[32]);

#endif
