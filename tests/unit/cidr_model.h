#ifndef SL_TESTS_CIDR_MODEL_H
#define SL_TESTS_CIDR_MODEL_H

/*
 * The CIDR matching rule written the slow way, for the unit test and the fuzzer to compare
 * core/cidr.c's sorted ranges against: a linear scan, bit by bit, where an IPv4-mapped IPv6
 * address or entry (::ffff:a.b.c.d, /96 and longer) counts as its IPv4 one.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#include "core/cidr.h"

static const uint8_t cidr_model_mapped_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

static inline void cidr_model_unmap(int *family, uint8_t a[16], unsigned *prefix_len)
{
    if (*family != AF_INET6 || memcmp(a, cidr_model_mapped_prefix, 12) != 0)
        return;
    if (prefix_len) {
        if (*prefix_len < 96)
            return;
        *prefix_len -= 96;
    }
    *family = AF_INET;
    memmove(a, a + 12, 4);
    memset(a + 4, 0, 12);
}

static inline bool cidr_model_match(const struct sl_cidr *e, size_t n, int family,
                                    const uint8_t addr[16])
{
    uint8_t a[16];
    memcpy(a, addr, 16);
    cidr_model_unmap(&family, a, NULL);
    for (size_t i = 0; i < n; i++) {
        int f = e[i].family;
        uint8_t ea[16];
        unsigned bits = e[i].prefix_len, k;
        memcpy(ea, e[i].addr, 16);
        cidr_model_unmap(&f, ea, &bits);
        if (f != family)
            continue;
        for (k = 0; k < bits; k++) {
            uint8_t m = (uint8_t)(0x80u >> (k % 8));
            if ((ea[k / 8] & m) != (a[k / 8] & m))
                break;
        }
        if (k == bits)
            return true;
    }
    return false;
}

#endif
