#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <netinet/in.h>
#include <sys/socket.h>

#include "proxy/proxy_proto.h"

/*
 * PROXY protocol headers, v1 and v2. The input is parsed from an exact-size copy (overreads
 * are caught). Invariants: a result only with a header inside the input, the authority inside
 * the header; a prefix gives SL_AGAIN or the same outcome; the header alone gives the same
 * result as the header with the rest of the input behind it. Every accepted header with
 * addresses is rebuilt with both builders and parsed back to the same addresses. The first
 * 36 input bytes also serve as raw addresses for a builder round trip of their own.
 */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int cond, const char *what)
{
    if (!cond) {
        fprintf(stderr, "invariant failed: %s\n", what);
        abort();
    }
}

struct outcome {
    enum sl_status st;
    enum sl_pp_err err;
    struct sl_pp_result r;
    size_t auth_off;
};

static struct outcome run(const uint8_t *in, size_t len)
{
    struct outcome o;
    memset(&o, 0, sizeof(o));
    uint8_t *b = malloc(len ? len : 1);
    check(b != NULL, "oom");
    if (len)
        memcpy(b, in, len);
    o.err = SL_PP_ERR_COUNT;
    o.st = sl_proxy_proto_parse(b, len, &o.r, &o.err);
    o.auth_off = SIZE_MAX;
    check(o.st == SL_OK || o.st == SL_AGAIN || o.st == SL_ERROR, "status");
    check(o.err < SL_PP_ERR_COUNT, "reason in range");
    check(sl_pp_err_name(o.err) != NULL, "reason name");
    check((o.st == SL_ERROR) == (o.err != SL_PP_ERR_NONE), "reason iff error");
    if (o.st == SL_OK) {
        const struct sl_pp_result *r = &o.r;
        check(r->header_bytes > 0 && r->header_bytes <= len, "header inside input");
        check(r->header_bytes <= SL_PP_MAX_HEADER_BYTES, "header bound");
        check(r->version == 1 || r->version == 2, "version");
        if (r->version == 1)
            check(r->header_bytes <= SL_PP_V1_MAX_BYTES && r->v2_family == 0, "v1 bounds");
        if (r->is_local) {
            check(r->src.ss_family == AF_UNSPEC && r->dst.ss_family == AF_UNSPEC,
                  "local has no addresses");
        } else {
            check(r->src.ss_family == r->dst.ss_family, "one family");
            check(r->src.ss_family == AF_INET || r->src.ss_family == AF_INET6, "ip family");
        }
        if (r->authority.ptr) {
            const uint8_t *a = (const uint8_t *)r->authority.ptr;
            check(r->version == 2, "authority only in v2");
            check(a >= b + SL_PP_V2_FIXED_BYTES && a + r->authority.len <= b + r->header_bytes,
                  "authority inside header");
            o.auth_off = (size_t)(a - b);
        }
    }
    free(b);
    return o;
}

static void same(const struct outcome *a, const struct outcome *b, const char *what)
{
    check(a->st == b->st && a->err == b->err, what);
    if (a->st != SL_OK)
        return;
    check(a->r.version == b->r.version && a->r.is_local == b->r.is_local &&
              a->r.v2_family == b->r.v2_family && a->r.header_bytes == b->r.header_bytes &&
              memcmp(&a->r.src, &b->r.src, sizeof(a->r.src)) == 0 &&
              memcmp(&a->r.dst, &b->r.dst, sizeof(a->r.dst)) == 0 && a->auth_off == b->auth_off &&
              a->r.authority.len == b->r.authority.len,
          what);
}

/* Address of an AF_INET/AF_INET6 sockaddr as 16 bytes (IPv4 mapped) and its port. */
static void norm(const struct sockaddr_storage *ss, uint8_t a[16], uint16_t *port)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
        memcpy(a, mapped, 12);
        memcpy(a + 12, &in->sin_addr, 4);
        *port = in->sin_port;
    } else {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        memcpy(a, &in6->sin6_addr, 16);
        *port = in6->sin6_port;
    }
}

static void same_endpoint(const struct sockaddr_storage *x, const struct sockaddr_storage *y)
{
    uint8_t a[16], b[16];
    uint16_t pa, pb;
    norm(x, a, &pa);
    norm(y, b, &pb);
    check(memcmp(a, b, 16) == 0 && pa == pb, "builder round trip keeps the endpoint");
}

static void rebuild(const struct sockaddr_storage *src, const struct sockaddr_storage *dst)
{
    char out[SL_PP_V1_MAX_BYTES];
    for (int ver = 1; ver <= 2; ver++) {
        size_t n =
            ver == 1
                ? sl_proxy_proto_write_v1(out, sizeof(out), (const void *)src, (const void *)dst)
                : sl_proxy_proto_write_v2(out, sizeof(out), (const void *)src, (const void *)dst);
        check(n > 0 && n <= sizeof(out), "builder fits");
        /* one byte short never fits */
        char small[SL_PP_V1_MAX_BYTES];
        size_t m =
            ver == 1 ? sl_proxy_proto_write_v1(small, n - 1, (const void *)src, (const void *)dst)
                     : sl_proxy_proto_write_v2(small, n - 1, (const void *)src, (const void *)dst);
        check(m == 0, "builder refuses a short buffer");
        struct outcome o = run((const uint8_t *)out, n);
        check(o.st == SL_OK && o.r.header_bytes == n, "built header parses");
        check(o.r.version == ver && !o.r.is_local, "built header kind");
        same_endpoint(&o.r.src, src);
        same_endpoint(&o.r.dst, dst);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct outcome whole = run(data, size);

    /* prefixes: SL_AGAIN or the same outcome */
    size_t cuts[3] = {size / 2, size ? size - 1 : 0, size > 16 ? 16 : 0};
    for (int i = 0; i < 3; i++) {
        if (cuts[i] >= size)
            continue;
        struct outcome p = run(data, cuts[i]);
        if (p.st == SL_AGAIN)
            continue;
        if (p.st == SL_OK)
            check(whole.st == SL_OK, "a prefix completes only if the whole does");
        same(&p, &whole, "prefix agrees with the whole");
    }

    if (whole.st == SL_OK) {
        size_t h = whole.r.header_bytes;
        struct outcome alone = run(data, h);
        same(&alone, &whole, "header alone");
        if (h > 0) {
            struct outcome shorter = run(data, h - 1);
            check(shorter.st == SL_AGAIN, "one byte short is incomplete");
        }
        if (!whole.r.is_local)
            rebuild(&whole.r.src, &whole.r.dst);
    }

    /* raw bytes as addresses for the builders */
    if (size >= 36) {
        struct sockaddr_storage e[2];
        for (int k = 0; k < 2; k++) {
            const uint8_t *p = data + k * 18;
            memset(&e[k], 0, sizeof(e[k]));
            if (p[0] & 1) {
                struct sockaddr_in *in = (struct sockaddr_in *)&e[k];
                in->sin_family = AF_INET;
                memcpy(&in->sin_addr, p + 2, 4);
                memcpy(&in->sin_port, p + 6, 2);
            } else {
                struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&e[k];
                in6->sin6_family = AF_INET6;
                memcpy(&in6->sin6_addr, p + 2, 16);
                memcpy(&in6->sin6_port, p, 2);
            }
        }
        rebuild(&e[0], &e[1]);
    }
    return 0;
}
