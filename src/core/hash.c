#include "core/hash.h"

#include <sys/random.h>
#include <sys/types.h>
#include <time.h>

#include <string.h>

/*
 * A multiply-mix hash in the wyhash family, written for sluice: 16 input bytes per step are
 * folded into one 64-bit state with a 64x64->128 multiply whose halves are xored together.
 * Inputs are hosts, paths, header values and addresses (mostly < 64 bytes), so one lane and a
 * branch-light tail beat wider SIMD-style designs here.
 *
 * The output is part of the on-disk/behavioural contract (Maglev placement of keys, tests pin
 * expected values), so never change constants or the algorithm; add a new function instead.
 */

#define K0 0x9e3779b97f4a7c15ull
#define K1 0xc2b2ae3d27d4eb4full
#define K2 0x165667b19e3779f9ull
#define K3 0xd6e8feb86659fd93ull

#define HASH_INLINE static inline __attribute__((always_inline))

HASH_INLINE uint64_t mix(uint64_t a, uint64_t b)
{
    __extension__ unsigned __int128 r = (unsigned __int128)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

/* Loads are little-endian on every host so the hash is the same on every machine. */
HASH_INLINE uint64_t load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

HASH_INLINE uint64_t load32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

/*
 * Lowercases the ASCII letters of 8 packed bytes at once: a byte gets 0x20 added exactly when
 * it is in 'A'..'Z'. Bytes >= 0x80 are left alone, so UTF-8 passes through unchanged, which is
 * what a byte-wise tolower of the input would do too.
 */
HASH_INLINE uint64_t lower8(uint64_t x)
{
    const uint64_t lo7 = x & 0x7f7f7f7f7f7f7f7full;
    const uint64_t gt_z = lo7 + 0x2525252525252525ull; /* high bit set where byte > 'Z' */
    const uint64_t ge_a = lo7 + 0x3f3f3f3f3f3f3f3full; /* high bit set where byte >= 'A' */
    const uint64_t ascii = ~x & 0x8080808080808080ull;
    return x | (((ge_a ^ gt_z) & ascii) >> 2);
}

HASH_INLINE uint64_t lower1(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (uint64_t)c + 32 : c;
}

/*
 * Shared body; `lower` is a compile-time constant at both call sites, so each variant is its
 * own specialised copy with no per-word branch.
 */
HASH_INLINE uint64_t hash_core(const void *data, size_t len, uint64_t seed, int lower)
{
    const unsigned char *p = data;
    uint64_t s = mix(seed ^ K0, K1) ^ seed;
    uint64_t a, b;

    if (len <= 16) {
        if (len >= 8) {
            a = load64(p);
            b = load64(p + len - 8);
        } else if (len >= 4) {
            a = load32(p);
            b = load32(p + len - 4);
        } else if (len > 0) {
            /* first, middle and last byte cover every length 1..3 without a loop */
            uint64_t c0 = p[0], c1 = p[len >> 1], c2 = p[len - 1];
            if (lower) {
                c0 = lower1(p[0]);
                c1 = lower1(p[len >> 1]);
                c2 = lower1(p[len - 1]);
            }
            a = (c0 << 16) | (c1 << 8) | c2;
            b = 0;
        } else {
            a = 0;
            b = 0;
        }
    } else {
        size_t left = len;
        while (left > 16) {
            uint64_t w0 = load64(p), w1 = load64(p + 8);
            if (lower) {
                w0 = lower8(w0);
                w1 = lower8(w1);
            }
            s = mix(w0 ^ K1, w1 ^ s);
            p += 16;
            left -= 16;
        }
        /* the last 16 bytes, overlapping what was already mixed when left < 16 */
        a = load64(p + left - 16);
        b = load64(p + left - 8);
    }
    if (lower) {
        a = lower8(a);
        b = lower8(b);
    }
    a ^= K1;
    b ^= s;
    s = mix(a, b);
    return mix(s ^ K2, (uint64_t)len ^ K3 ^ seed);
}

uint64_t sl_hash_bytes(const void *p, size_t len, uint64_t seed)
{
    return hash_core(p, len, seed, 0);
}

uint64_t sl_hash_bytes_lower(const void *p, size_t len, uint64_t seed)
{
    return hash_core(p, len, seed, 1);
}

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                   \
    do {                                                                                           \
        v0 += v1;                                                                                  \
        v1 = ROTL(v1, 13);                                                                         \
        v1 ^= v0;                                                                                  \
        v0 = ROTL(v0, 32);                                                                         \
        v2 += v3;                                                                                  \
        v3 = ROTL(v3, 16);                                                                         \
        v3 ^= v2;                                                                                  \
        v0 += v3;                                                                                  \
        v3 = ROTL(v3, 21);                                                                         \
        v3 ^= v0;                                                                                  \
        v2 += v1;                                                                                  \
        v1 = ROTL(v1, 17);                                                                         \
        v1 ^= v2;                                                                                  \
        v2 = ROTL(v2, 32);                                                                         \
    } while (0)

uint64_t sl_siphash(const void *p, size_t len, const uint64_t key[2])
{
    const unsigned char *in = p;
    uint64_t v0 = 0x736f6d6570736575ull ^ key[0], v1 = 0x646f72616e646f6dull ^ key[1];
    uint64_t v2 = 0x6c7967656e657261ull ^ key[0], v3 = 0x7465646279746573ull ^ key[1];
    size_t full = len & ~(size_t)7;
    for (size_t i = 0; i < full; i += 8) {
        uint64_t m = 0;
        for (int j = 7; j >= 0; j--) /* little-endian load, whatever the host */
            m = (m << 8) | in[i + (size_t)j];
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
    }
    uint64_t b = (uint64_t)len << 56;
    for (size_t j = 0; j < (len & 7); j++)
        b |= (uint64_t)in[full + j] << (8 * j);
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

void sl_siphash_key_init(uint64_t key[2])
{
    if (getrandom(key, 2 * sizeof(uint64_t), 0) == (ssize_t)(2 * sizeof(uint64_t)))
        return;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    key[0] = sl_hash_bytes(&ts, sizeof ts, (uint64_t)(uintptr_t)key);
    key[1] = sl_hash_bytes(key, sizeof(uint64_t), (uint64_t)ts.tv_nsec);
}
