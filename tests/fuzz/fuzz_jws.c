#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "filters/jws.h"

/*
 * JWK Sets, PEM keys, compact tokens and claims. The input is split at the first '~': the part
 * before goes to sl_jwks_parse (oct allowed) and sl_jwks_from_pem, the part after is a token
 * parsed and verified against that set and against a fixed set of the RFC example keys, and
 * its payload (and the raw text) go through the claim checks. Without '~' the whole input
 * plays both roles. Each piece is copied to an exact-size buffer so overreads are caught.
 */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int cond, const char *what)
{
    if (!cond) {
        fprintf(stderr, "invariant failed: %s\n", what);
        abort();
    }
}

static char *dup_exact(const char *p, size_t n)
{
    char *b = malloc(n ? n : 1);
    check(b != NULL, "oom");
    if (n)
        memcpy(b, p, n);
    return b;
}

/* RFC 7515 A.1 (oct), A.2 (RSA), A.3 (EC P-256) and RFC 8037 (Ed25519) keys. */
static const char fixed_json[] =
    "{\"keys\":["
    "{\"kty\":\"oct\",\"kid\":\"a1\",\"k\":\"AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-"
    "1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow\"},"
    "{\"kty\":\"RSA\",\"kid\":\"a2\",\"n\":\"ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_"
    "wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_"
    "YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-"
    "UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-"
    "DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ\",\"e\":\"AQAB\"},"
    "{\"kty\":\"EC\",\"kid\":\"a3\",\"crv\":\"P-256\","
    "\"x\":\"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU\","
    "\"y\":\"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0\"},"
    "{\"kty\":\"OKP\",\"kid\":\"ed\",\"crv\":\"Ed25519\","
    "\"x\":\"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo\"}"
    "]}";

static struct sl_jwks *fixed_set(void)
{
    static struct sl_jwks *ks;
    if (!ks) {
        char err[128];
        ks = sl_jwks_parse(fixed_json, strlen(fixed_json), true, err, sizeof(err));
        check(ks != NULL && ks->count == 4, "fixed key set");
    }
    return ks;
}

static void check_set(const struct sl_jwks *ks)
{
    check(ks->count > 0, "a set has keys");
    check(ks->refs == 1, "one reference");
    for (size_t i = 0; i < ks->count; i++) {
        const struct sl_jwk *k = &ks->keys[i];
        check(k->algs != 0 && (k->algs & ~SL_JWS_ALL_ALGS) == 0, "key algs");
        check((k->pkey != NULL) != (k->secret != NULL), "pkey xor secret");
        if (k->secret)
            check(k->secret_len >= 32 && (k->algs & ~SL_JWS_HMAC_ALGS) == 0, "secret algs");
        else
            check((k->algs & SL_JWS_HMAC_ALGS) == 0, "public keys never allow HMAC");
    }
}

static int inside(const void *p, size_t n, const unsigned char *base, size_t cap)
{
    if (n == 0)
        return 1;
    const unsigned char *q = p;
    return q >= base && (size_t)(q - base) <= cap && n <= cap - (size_t)(q - base);
}

static void verify_all(const struct sl_jws_parsed *p, const struct sl_jwks *ks)
{
    if (!ks)
        return;
    const struct sl_jwk *f = sl_jwks_find(ks, p->kid, p->alg);
    if (f)
        check((f->algs & p->alg) != 0, "found key allows alg");
    for (size_t i = 0; i < ks->count; i++) {
        enum sl_jws_status st = sl_jws_verify(p, &ks->keys[i]);
        check(st == SL_JWS_OK || st == SL_JWS_BAD_SIGNATURE || st == SL_JWS_BAD_ALG,
              "verify status");
        if (!(ks->keys[i].algs & p->alg))
            check(st == SL_JWS_BAD_ALG, "alg outside the key refused");
    }
}

static void claims(const char *payload, size_t len, int64_t now, int full)
{
    static char *iss[] = {"joe", "https://issuer.example"};
    static char *aud[] = {"api"};
    static char *req[] = {"sub"};
    static char *names[] = {"scope", "admin"};
    static char *values[] = {"read", "true"};
    struct sl_jwt_rules r = {0};
    if (full)
        r = (struct sl_jwt_rules){
            .issuers = iss,
            .issuer_count = 2,
            .audiences = aud,
            .audience_count = 1,
            .required = req,
            .required_count = 1,
            .claim_names = names,
            .claim_values = values,
            .claim_count = 2,
            .leeway_s = 60,
            .require_exp = true,
        };
    unsigned char flat[256];
    size_t flat_len = 12345;
    int64_t exp = -7;
    char *buf = dup_exact(payload, len);
    enum sl_jwt_claims_status st =
        sl_jwt_claims_check(buf, len, &r, now, &exp, flat, sizeof(flat), &flat_len);
    check(st >= SL_JWT_CLAIMS_OK && st <= SL_JWT_CLAIM_MISMATCH, "claims status");
    check(sl_jwt_claims_status_name(st) != NULL, "claims name");
    if (st == SL_JWT_CLAIMS_OK) {
        check(flat_len <= sizeof(flat), "flat bound");
        /* walk every record by name: each lookup must find a value inside the blob */
        size_t pos = 0;
        while (flat_len - pos >= 4) {
            size_t nl = ((size_t)flat[pos] << 8) | flat[pos + 1];
            size_t vl = ((size_t)flat[pos + 2] << 8) | flat[pos + 3];
            check(nl + vl <= flat_len - pos - 4, "record inside blob");
            struct sl_slice v;
            check(sl_jwt_flat_get(flat, flat_len, (const char *)flat + pos + 4, nl, &v),
                  "record found");
            check(inside(v.ptr, v.len, flat, flat_len), "value inside blob");
            pos += 4 + nl + vl;
        }
        check(pos == flat_len, "records fill the blob");
    } else {
        check(flat_len == 0, "no blob on failure");
        check(exp == -7, "exp untouched on failure");
    }
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *in = (const char *)data;
    const char *sep = memchr(in, '~', size);
    size_t jl = sep ? (size_t)(sep - in) : size;
    const char *tp = sep ? sep + 1 : in;
    size_t tl = sep ? size - jl - 1 : size;

    char err[128];
    char *j = dup_exact(in, jl);
    struct sl_jwks *ks = sl_jwks_parse(j, jl, true, err, sizeof(err));
    if (ks)
        check_set(ks);
    else
        check(memchr(err, '\0', sizeof(err)) != NULL && err[0] != '\0', "error text");
    struct sl_jwks *pk = sl_jwks_from_pem(j, jl, 0, err, sizeof(err));
    if (pk)
        check_set(pk);
    free(j);

    char *t = dup_exact(tp, tl);
    /* scratch exactly as large as one byte of the input says, to reach TOO_LARGE too */
    size_t cap = size && (data[0] & 1) ? tl / 2 : tl;
    unsigned char *scratch = malloc(cap ? cap : 1);
    check(scratch != NULL, "oom");
    struct sl_jws_parsed p;
    unsigned allowed = size && (data[size - 1] & 1) ? SL_JWS_ALL_ALGS : SL_JWS_ALL_ALGS >> 3;
    enum sl_jws_status st = sl_jws_parse(t, tl, allowed, scratch, cap, &p);
    check(st >= SL_JWS_OK && st <= SL_JWS_BAD_SIGNATURE, "parse status");
    check(st != SL_JWS_UNKNOWN_KID && st != SL_JWS_BAD_SIGNATURE, "parse never verifies");
    check(sl_jws_status_name(st) != NULL, "status name");
    if (st == SL_JWS_OK) {
        check(p.alg != 0 && (p.alg & (p.alg - 1)) == 0 && (p.alg & allowed), "one allowed alg");
        check(p.signing_input.ptr == t && p.signing_input.len < tl, "signing input prefix");
        check(t[p.signing_input.len] == '.', "signing input ends before the signature");
        check(inside(p.payload.ptr, p.payload.len, scratch, cap), "payload in scratch");
        check(p.sig_len > 0 && inside(p.sig, p.sig_len, scratch, cap), "sig in scratch");
        check(inside(p.kid.ptr, p.kid.len, scratch, cap), "kid in scratch");
        verify_all(&p, ks);
        verify_all(&p, pk);
        verify_all(&p, fixed_set());
        claims(p.payload.ptr, p.payload.len, 1300819000, 0);
        claims(p.payload.ptr, p.payload.len, 1300819000, 1);
    }
    /* the token text itself as claims, and as base64url (round trip) */
    claims(t, tl, (int64_t)size * 1000, size & 1);
    size_t dl = tl / 4 * 3 + 3;
    unsigned char *dec = malloc(dl);
    check(dec != NULL, "oom");
    size_t n = 0;
    if (sl_b64url_decode(t, tl, dec, dl, &n) == 0) {
        char *enc = malloc(tl ? tl : 1);
        check(enc != NULL, "oom");
        check(sl_b64url_encode(dec, n, enc, tl) == tl && memcmp(enc, t, tl) == 0,
              "base64url round trip");
        free(enc);
    }
    free(dec);
    free(scratch);
    free(t);
    sl_jwks_unref(ks);
    sl_jwks_unref(pk);
    return 0;
}
