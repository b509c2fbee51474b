#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proxy/dns.h"

/*
 * The DNS answer walker (sl_dns_answer_min_ttl) on untrusted replies. Each input is one DNS
 * message, copied to an exact-size buffer so that any read past its end is caught. Checked:
 * the result is 0 or -EBADMSG, the outputs are untouched on failure and consistent with the
 * header on success, and a prefix never succeeds where the whole message fails (the walker
 * reads forwards and pointers only go back, so what a prefix holds decides alone).
 */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int cond, const char *what)
{
    if (!cond) {
        fprintf(stderr, "invariant failed: %s\n", what);
        abort();
    }
}

struct result {
    int rc;
    uint32_t ttl;
    size_t answers;
};

static struct result walk(const uint8_t *data, size_t len)
{
    uint8_t *b = malloc(len ? len : 1);
    check(b != NULL, "oom");
    if (len)
        memcpy(b, data, len);
    struct result r = {.ttl = 0xdeadbeef, .answers = 0xabcdef};
    r.rc = sl_dns_answer_min_ttl(b, len, &r.ttl, &r.answers);
    free(b);
    check(r.rc == 0 || r.rc == -EBADMSG, "status");
    if (r.rc) {
        check(r.ttl == 0xdeadbeef && r.answers == 0xabcdef, "outputs untouched on failure");
    } else {
        check(len >= 12, "a header at least");
        check(r.answers == (size_t)((data[6] << 8) | data[7]), "answer count from the header");
        check(r.ttl <= 0x7fffffffu, "TTL at most 2^31 - 1");
        if (r.answers == 0)
            check(r.ttl == 0, "no answer, TTL 0");
    }
    return r;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct result whole = walk(data, size);
    size_t cuts[2] = {size / 2, size ? size - 1 : 0};
    for (size_t i = 0; i < 2; i++) {
        struct result part = walk(data, cuts[i]);
        if (part.rc == 0)
            check(whole.rc == 0 && whole.ttl == part.ttl && whole.answers == part.answers,
                  "a prefix decides alone");
    }
    return 0;
}
