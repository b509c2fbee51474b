#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/hash.h"
#include "core/sha256.h"

struct pinned {
    const char *in;
    uint64_t seed0;
    uint64_t seed1;
};

/*
 * Pinned outputs: Maglev placement and anything persisted depend on these, so a change here
 * is a compatibility break, not a test to update. Lengths cover every code path
 * (0, 1..3, 4..7, 8..16, 17+ and multi-block).
 */
static const struct pinned pinned[] = {
    {"", 0xb9f76fc0b54647a5ull, 0x67d79054ebed16a0ull},
    {"a", 0x4bcb32ab51d9c41dull, 0x5aab58d8d357e3deull},
    {"abc", 0xb6077d8d9360b984ull, 0x734196a6c6d966c7ull},
    {"abcd", 0xd1064e2780bdc76bull, 0x690ab06b65ccd7e0ull},
    {"hello world", 0xeb89430d0d1e3894ull, 0x701531329cdac247ull},
    {"0123456789abcdef", 0xfb37bf55bcebf242ull, 0x9acfd0acf4548788ull},
    {"0123456789abcdefg", 0x8ce3135330b58c3aull, 0xc748cd9008d86c50ull},
    {"The quick brown fox jumps over the lazy dog", 0xd8d35b7ac4b0671bull, 0xc66c9189b8bc9280ull},
};

static void test_stable_values(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof pinned / sizeof pinned[0]; i++) {
        size_t n = strlen(pinned[i].in);
        assert_int_equal(sl_hash_bytes(pinned[i].in, n, 0), pinned[i].seed0);
        assert_int_equal(sl_hash_bytes(pinned[i].in, n, 1), pinned[i].seed1);
    }
}

static void test_seed_sensitivity(void **state)
{
    (void)state;
    char buf[64];
    for (size_t len = 0; len < sizeof buf; len++) {
        memset(buf, 'x', len);
        uint64_t base = sl_hash_bytes(buf, len, 0);
        for (uint64_t seed = 1; seed < 64; seed++) {
            uint64_t h = sl_hash_bytes(buf, len, seed);
            assert_true(h != base);
            /* a one-bit seed change should flip roughly half the output bits */
            if ((seed & (seed - 1)) == 0) {
                int flips = __builtin_popcountll(h ^ base);
                assert_in_range(flips, 12, 52);
            }
        }
    }
}

/* Unaligned starts and every length up to a few blocks must agree with an aligned copy. */
static void test_unaligned_same_as_aligned(void **state)
{
    (void)state;
    _Alignas(16) unsigned char src[128], copy[128];
    for (size_t i = 0; i < sizeof src; i++)
        src[i] = (unsigned char)(i * 31 + 7);
    for (size_t off = 1; off < 16; off++) {
        for (size_t len = 0; len + off <= sizeof src; len++) {
            memcpy(copy, src + off, len);
            assert_int_equal(sl_hash_bytes(src + off, len, 42), sl_hash_bytes(copy, len, 42));
        }
    }
}

static void test_lower_matches_lowercased_copy(void **state)
{
    (void)state;
    /* every byte value appears, so the SWAR lowercasing is checked at the edges ('@','[',
       'A','Z', 0x80+) at every position within a word */
    unsigned char src[300], low[300];
    for (size_t i = 0; i < sizeof src; i++)
        src[i] = (unsigned char)(i * 7 + 3);
    for (size_t i = 0; i < sizeof src; i++)
        low[i] = (src[i] >= 'A' && src[i] <= 'Z') ? (unsigned char)(src[i] + 32) : src[i];
    for (size_t off = 0; off < 40; off++) {
        for (size_t len = 0; len + off <= sizeof src; len += (len < 40 ? 1 : 13)) {
            assert_int_equal(sl_hash_bytes_lower(src + off, len, 9),
                             sl_hash_bytes(low + off, len, 9));
        }
    }
    assert_int_equal(sl_hash_bytes_lower("API.Example.COM", 15, 0),
                     sl_hash_bytes("api.example.com", 15, 0));
    assert_true(sl_hash_bytes("API.Example.COM", 15, 0) != sl_hash_bytes("api.example.com", 15, 0));
}

/* Sequential keys (the typical weak spot) into 256 buckets: chi-square must look uniform. */
static void test_distribution(void **state)
{
    (void)state;
    enum { BUCKETS = 256, KEYS = 256 * 400 };
    static unsigned counts[BUCKETS];
    memset(counts, 0, sizeof counts);
    char key[32];
    for (int i = 0; i < KEYS; i++) {
        int n = snprintf(key, sizeof key, "10.0.%d.%d", i / 256, i % 256);
        counts[sl_hash_bytes(key, (size_t)n, 0) % BUCKETS]++;
    }
    double expect = (double)KEYS / BUCKETS, chi = 0;
    for (int b = 0; b < BUCKETS; b++)
        chi += ((double)counts[b] - expect) * ((double)counts[b] - expect) / expect;
    /* 255 degrees of freedom: mean 255, sd ~22.6; 400 is far in the tail */
    assert_true(chi < 400.0);

    /* high bits too (Maglev and hash maps use different parts of the value) */
    memset(counts, 0, sizeof counts);
    for (int i = 0; i < KEYS; i++) {
        uint64_t v = (uint64_t)i;
        counts[sl_hash_bytes(&v, sizeof v, 0) >> 56]++;
    }
    chi = 0;
    for (int b = 0; b < BUCKETS; b++)
        chi += ((double)counts[b] - expect) * ((double)counts[b] - expect) / expect;
    assert_true(chi < 400.0);
}

/* Flipping any single input bit should flip about half the output bits on average. */
static void test_avalanche(void **state)
{
    (void)state;
    static const size_t lens[] = {1, 3, 4, 7, 8, 12, 16, 17, 31, 40};
    unsigned char buf[40];
    for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
        size_t len = lens[li];
        double total = 0;
        int trials = 0;
        for (int rep = 0; rep < 20; rep++) {
            for (size_t i = 0; i < len; i++)
                buf[i] = (unsigned char)(rep * 13 + i * 101);
            uint64_t base = sl_hash_bytes(buf, len, 0);
            for (size_t bit = 0; bit < len * 8; bit++) {
                buf[bit / 8] ^= (unsigned char)(1u << (bit % 8));
                total += __builtin_popcountll(sl_hash_bytes(buf, len, 0) ^ base);
                buf[bit / 8] ^= (unsigned char)(1u << (bit % 8));
                trials++;
            }
        }
        double mean = total / trials;
        assert_true(mean > 30.0 && mean < 34.0);
    }
}

/* The reference vectors of the SipHash paper (key 00..0f, messages 00..len-1). */
static void test_siphash_vectors(void **state)
{
    (void)state;
    uint64_t key[2] = {0x0706050403020100ull, 0x0f0e0d0c0b0a0908ull};
    unsigned char msg[16];
    for (unsigned i = 0; i < sizeof msg; i++)
        msg[i] = (unsigned char)i;
    assert_int_equal(sl_siphash(msg, 0, key), 0x726fdb47dd0e0e31ull);
    assert_int_equal(sl_siphash(msg, 1, key), 0x74f839c593dc67fdull);
    assert_int_equal(sl_siphash(msg, 8, key), 0x93f5f5799a932462ull);
    assert_int_equal(sl_siphash(msg, 15, key), 0xa129ca6149be45e5ull);
    uint64_t k2[2];
    sl_siphash_key_init(k2);
    assert_true(k2[0] != 0 || k2[1] != 0);
}

/* FIPS 180-2 known answers: empty, one block, and a message whose padding needs two blocks. */
static void test_sha256_vectors(void **state)
{
    (void)state;
    static const struct {
        const char *msg;
        const char *hex;
    } v[] = {
        {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
        {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        unsigned char out[32];
        char hex[65];
        sl_sha256(v[i].msg, strlen(v[i].msg), out);
        for (int j = 0; j < 32; j++)
            snprintf(hex + 2 * j, 3, "%02x", out[j]);
        assert_string_equal(hex, v[i].hex);
    }
    /* A million 'a's crosses many blocks. */
    static char big[1000000];
    memset(big, 'a', sizeof big);
    unsigned char out[32];
    sl_sha256(big, sizeof big, out);
    assert_int_equal(out[0], 0xcd);
    assert_int_equal(out[1], 0xc7);
    assert_int_equal(out[31], 0xd0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stable_values),
        cmocka_unit_test(test_seed_sensitivity),
        cmocka_unit_test(test_unaligned_same_as_aligned),
        cmocka_unit_test(test_lower_matches_lowercased_copy),
        cmocka_unit_test(test_distribution),
        cmocka_unit_test(test_avalanche),
        cmocka_unit_test(test_siphash_vectors),
        cmocka_unit_test(test_sha256_vectors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
