#ifndef SL_CORE_RAND_H
#define SL_CORE_RAND_H

#include <stdint.h>

/*
 * xorshift64*: a fast per-thread generator for choices that need spread, not secrecy
 * (request ids, power-of-two-choices picks). `state` must be non-zero.
 */
static inline uint64_t sl_rand_next(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

#endif
