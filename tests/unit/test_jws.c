/* Unit tests for JWS/JWK/JWT: strict base64url, the RFC 7515 A.1-A.3 and RFC 8037 A.4
 * example tokens with their published keys, every other algorithm signed here with freshly
 * generated keys, the refusals that stop alg confusion, JWK Set parsing rules, PEM keys, and
 * the claim checks with their flat blob. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <errno.h>

#include <cmocka.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "filters/jws.h"

#define SCRATCH 8192

/* ---- RFC example values ---- */

/* RFC 7515 A.1-A.3 share this payload: {"iss":"joe",\r\n "exp":1300819380,\r\n
 * "http://example.com/is_root":true} */
#define RFC_PAYLOAD                                                                                \
    "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVl" \
    "fQ"

static const char a1_token[] = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9." RFC_PAYLOAD
                               ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
static const char a1_jwk[] = "{\"kty\":\"oct\",\"k\":\"AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-"
                             "EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow\"}";

static const char a2_token[] = "eyJhbGciOiJSUzI1NiJ9." RFC_PAYLOAD
                               ".cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7"
                               "AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4"
                               "BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K"
                               "0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqv"
                               "hJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrB"
                               "p0igcN_IoypGlUPQGe77Rw";
#define A2_N                                                                                       \
    "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-"                        \
    "4qPCJrcS2mJPMEzP1Pt0Bm4d"                                                                     \
    "4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-"                      \
    "bSf63kpaSHSXndS5z5rexM"                                                                       \
    "dbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_"                 \
    "I5IhlJH7aGhyxXFvU"                                                                            \
    "K-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ"
static const char a2_jwk[] = "{\"kty\":\"RSA\",\"n\":\"" A2_N "\",\"e\":\"AQAB\"}";

static const char a3_token[] =
    "eyJhbGciOiJFUzI1NiJ9." RFC_PAYLOAD
    ".DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q";
#define A3_X "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU"
#define A3_Y "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"
static const char a3_jwk[] =
    "{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"" A3_X "\",\"y\":\"" A3_Y "\"}";

/* RFC 8037 A.4 (signature) / A.5 (verification) */
static const char ed_token[] =
    "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
    "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";
static const char ed_jwk[] =
    "{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo\"}";

/* ---- helpers ---- */

static char *b64(const void *in, size_t len)
{
    size_t cap = len / 3 * 4 + 4;
    char *out = malloc(cap + 1);
    assert_non_null(out);
    size_t n = sl_b64url_encode(in, len, out, cap);
    out[n] = '\0';
    return out;
}

static char *b64s(const char *s)
{
    return b64(s, strlen(s));
}

static struct sl_jwks *parse_set(const char *json, bool allow_oct)
{
    char err[256] = "";
    struct sl_jwks *ks = sl_jwks_parse(json, strlen(json), allow_oct, err, sizeof(err));
    if (!ks)
        fail_msg("JWKS refused: %s\n%s", err, json);
    return ks;
}

/* parse -> find -> verify; UNKNOWN_KID when no key fits */
static enum sl_jws_status check(const struct sl_jwks *ks, const char *token, unsigned allowed)
{
    unsigned char scratch[SCRATCH];
    struct sl_jws_parsed p;
    enum sl_jws_status st =
        sl_jws_parse(token, strlen(token), allowed, scratch, sizeof(scratch), &p);
    if (st != SL_JWS_OK)
        return st;
    const struct sl_jwk *k = sl_jwks_find(ks, p.kid, p.alg);
    if (!k)
        return SL_JWS_UNKNOWN_KID;
    return sl_jws_verify(&p, k);
}

static enum sl_jws_status check_json(const char *jwks, const char *token)
{
    struct sl_jwks *ks = parse_set(jwks, true);
    enum sl_jws_status st = check(ks, token, SL_JWS_ALL_ALGS);
    sl_jwks_unref(ks);
    return st;
}

/* A copy of `token` with one bit of the last signature character changed (still base64url). */
static char *flip_sig(const char *token)
{
    char *t = strdup(token);
    assert_non_null(t);
    size_t n = strlen(t);
    /* change the first signature char: 'A' <-> 'B' keeps the alphabet and trailing bits */
    char *s = strrchr(t, '.') + 1;
    assert_true(s < t + n);
    *s = *s == 'A' ? 'B' : 'A';
    return t;
}

static char *flip_payload(const char *token)
{
    char *t = strdup(token);
    assert_non_null(t);
    char *p = strchr(t, '.') + 1;
    *p = *p == 'e' ? 'f' : 'e';
    return t;
}

/* Signs `input` with `priv` for `alg` (JOSE form: raw r||s for ECDSA). */
static unsigned char *sign(EVP_PKEY *priv, unsigned alg, const char *input, size_t *sig_len)
{
    const EVP_MD *md = NULL;
    if (alg & (SL_JWS_RS256 | SL_JWS_PS256 | SL_JWS_ES256))
        md = EVP_sha256();
    else if (alg & (SL_JWS_RS384 | SL_JWS_PS384 | SL_JWS_ES384))
        md = EVP_sha384();
    else if (alg & (SL_JWS_RS512 | SL_JWS_PS512))
        md = EVP_sha512();
    EVP_MD_CTX *mctx = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pctx = NULL;
    assert_non_null(mctx);
    assert_int_equal(EVP_DigestSignInit(mctx, &pctx, md, NULL, priv), 1);
    if (alg & (SL_JWS_PS256 | SL_JWS_PS384 | SL_JWS_PS512)) {
        assert_int_equal(EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING), 1);
        assert_int_equal(EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST), 1);
        assert_int_equal(EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, md), 1);
    }
    size_t n = 0;
    assert_int_equal(EVP_DigestSign(mctx, NULL, &n, (const unsigned char *)input, strlen(input)),
                     1);
    unsigned char *sig = malloc(n);
    assert_non_null(sig);
    assert_int_equal(EVP_DigestSign(mctx, sig, &n, (const unsigned char *)input, strlen(input)), 1);
    EVP_MD_CTX_free(mctx);
    if (alg & (SL_JWS_ES256 | SL_JWS_ES384)) {
        int half = alg == SL_JWS_ES256 ? 32 : 48;
        const unsigned char *p = sig;
        ECDSA_SIG *es = d2i_ECDSA_SIG(NULL, &p, (long)n);
        assert_non_null(es);
        unsigned char *raw = malloc(2 * (size_t)half);
        assert_non_null(raw);
        assert_int_equal(BN_bn2binpad(ECDSA_SIG_get0_r(es), raw, half), half);
        assert_int_equal(BN_bn2binpad(ECDSA_SIG_get0_s(es), raw + half, half), half);
        ECDSA_SIG_free(es);
        free(sig);
        sig = raw;
        n = 2 * (size_t)half;
    }
    *sig_len = n;
    return sig;
}

/* "<b64 header>.<b64 payload>.<b64 sig>" signed by priv (or by HMAC `secret` when priv is
 * NULL) — the header's alg is written as `alg` whatever the key. */
static char *make_token(const char *header, const char *payload, unsigned alg, EVP_PKEY *priv,
                        const unsigned char *secret, size_t secret_len)
{
    char *h = b64s(header), *p = b64s(payload);
    size_t in_len = strlen(h) + 1 + strlen(p);
    char *input = malloc(in_len + 1);
    assert_non_null(input);
    snprintf(input, in_len + 1, "%s.%s", h, p);
    unsigned char *sig;
    size_t sig_len;
    if (priv) {
        sig = sign(priv, alg, input, &sig_len);
    } else {
        const EVP_MD *md = alg == SL_JWS_HS256   ? EVP_sha256()
                           : alg == SL_JWS_HS384 ? EVP_sha384()
                                                 : EVP_sha512();
        sig = malloc(EVP_MAX_MD_SIZE);
        assert_non_null(sig);
        unsigned int n = 0;
        assert_non_null(
            HMAC(md, secret, (int)secret_len, (const unsigned char *)input, in_len, sig, &n));
        sig_len = n;
    }
    char *s = b64(sig, sig_len);
    size_t tl = in_len + 1 + strlen(s);
    char *tok = malloc(tl + 1);
    assert_non_null(tok);
    snprintf(tok, tl + 1, "%s.%s", input, s);
    free(h);
    free(p);
    free(input);
    free(sig);
    free(s);
    return tok;
}

static char *bn_b64(const BIGNUM *bn, int pad)
{
    int n = pad ? pad : BN_num_bytes(bn);
    unsigned char *buf = malloc((size_t)n);
    assert_non_null(buf);
    assert_int_equal(BN_bn2binpad(bn, buf, n), n);
    char *s = b64(buf, (size_t)n);
    free(buf);
    return s;
}

/* Public JWK text of `pkey` with `extra` members (",\"kid\":\"a\"" or "") appended. */
static char *jwk_of(EVP_PKEY *pkey, const char *extra)
{
    char *out = malloc(4096);
    assert_non_null(out);
    if (EVP_PKEY_is_a(pkey, "RSA")) {
        BIGNUM *n = NULL, *e = NULL;
        assert_int_equal(EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_RSA_N, &n), 1);
        assert_int_equal(EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_RSA_E, &e), 1);
        char *nb = bn_b64(n, 0), *eb = bn_b64(e, 0);
        snprintf(out, 4096, "{\"kty\":\"RSA\",\"n\":\"%s\",\"e\":\"%s\"%s}", nb, eb, extra);
        free(nb);
        free(eb);
        BN_free(n);
        BN_free(e);
    } else if (EVP_PKEY_is_a(pkey, "EC")) {
        BIGNUM *x = NULL, *y = NULL;
        int size = EVP_PKEY_get_bits(pkey) == 256 ? 32 : 48;
        assert_int_equal(EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_EC_PUB_X, &x), 1);
        assert_int_equal(EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_EC_PUB_Y, &y), 1);
        char *xb = bn_b64(x, size), *yb = bn_b64(y, size);
        snprintf(out, 4096, "{\"kty\":\"EC\",\"crv\":\"%s\",\"x\":\"%s\",\"y\":\"%s\"%s}",
                 size == 32 ? "P-256" : "P-384", xb, yb, extra);
        free(xb);
        free(yb);
        BN_free(x);
        BN_free(y);
    } else {
        unsigned char raw[32];
        size_t n = sizeof(raw);
        assert_int_equal(EVP_PKEY_get_raw_public_key(pkey, raw, &n), 1);
        char *xb = b64(raw, n);
        snprintf(out, 4096, "{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"%s\"%s}", xb, extra);
        free(xb);
    }
    return out;
}

static char *pem_of(EVP_PKEY *pkey)
{
    BIO *bio = BIO_new(BIO_s_mem());
    assert_non_null(bio);
    assert_int_equal(PEM_write_bio_PUBKEY(bio, pkey), 1);
    char *data = NULL;
    long n = BIO_get_mem_data(bio, &data);
    char *s = strndup(data, (size_t)n);
    BIO_free(bio);
    return s;
}

/* Keys generated once: RSA keygen is slow, under ASan especially. */
static EVP_PKEY *rsa_key, *p256_key, *p384_key, *ed_key;

static int setup_keys(void **state)
{
    (void)state;
    rsa_key = EVP_RSA_gen(2048);
    p256_key = EVP_EC_gen("P-256");
    p384_key = EVP_EC_gen("P-384");
    ed_key = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    return rsa_key && p256_key && p384_key && ed_key ? 0 : -1;
}

static int teardown_keys(void **state)
{
    (void)state;
    EVP_PKEY_free(rsa_key);
    EVP_PKEY_free(p256_key);
    EVP_PKEY_free(p384_key);
    EVP_PKEY_free(ed_key);
    return 0;
}

/* ---- base64url ---- */

static void expect_decode(const char *in, const char *want)
{
    unsigned char out[64];
    size_t n = 999;
    assert_int_equal(sl_b64url_decode(in, strlen(in), out, sizeof(out), &n), 0);
    assert_int_equal(n, strlen(want));
    assert_memory_equal(out, want, n);
}

static void expect_bad(const char *in, size_t len)
{
    unsigned char out[64];
    size_t n = 0;
    assert_int_equal(sl_b64url_decode(in, len, out, sizeof(out), &n), -EINVAL);
    /* also when the buffer is too small: bad input wins over -ENOSPC */
    assert_int_equal(sl_b64url_decode(in, len, out, 0, &n), -EINVAL);
}

static void test_b64_valid(void **state)
{
    (void)state;
    /* RFC 4648 §10 vectors without padding */
    expect_decode("", "");
    expect_decode("Zg", "f");
    expect_decode("Zm8", "fo");
    expect_decode("Zm9v", "foo");
    expect_decode("Zm9vYg", "foob");
    expect_decode("Zm9vYmE", "fooba");
    expect_decode("Zm9vYmFy", "foobar");
    /* the two url-safe characters */
    expect_decode("-_-_", "\xfb\xff\xbf");
    expect_decode("_w", "\xff");

    /* encode/decode round trip for every length and a spread of byte values */
    unsigned char in[70], back[70];
    for (size_t i = 0; i < sizeof(in); i++)
        in[i] = (unsigned char)(i * 37 + 11);
    for (size_t len = 0; len <= sizeof(in); len++) {
        char *s = b64(in, len);
        assert_int_equal(strlen(s), len / 3 * 4 + (len % 3 ? len % 3 + 1 : 0));
        size_t n = 0;
        assert_int_equal(sl_b64url_decode(s, strlen(s), back, sizeof(back), &n), 0);
        assert_int_equal(n, len);
        assert_memory_equal(back, in, len);
        free(s);
    }

    /* exact capacity works, one byte less is -ENOSPC */
    unsigned char out[3];
    size_t n = 0;
    assert_int_equal(sl_b64url_decode("Zm9v", 4, out, 3, &n), 0);
    assert_int_equal(sl_b64url_decode("Zm9v", 4, out, 2, &n), -ENOSPC);
    /* encoder refuses a too small buffer */
    char enc[3];
    assert_int_equal(sl_b64url_encode((const unsigned char *)"foo", 3, enc, sizeof(enc)), 0);
}

static void test_b64_invalid(void **state)
{
    (void)state;
    expect_bad("Zg==", 4);     /* padding */
    expect_bad("Zm8=", 4);     /* padding */
    expect_bad("Zm+v", 4);     /* standard alphabet */
    expect_bad("Zm/v", 4);     /* standard alphabet */
    expect_bad("Zm9 v", 5);    /* space */
    expect_bad("Zm9v\nYg", 7); /* newline */
    expect_bad("Zm9\tv", 5);   /* tab */
    expect_bad("Z", 1);        /* len % 4 == 1 */
    expect_bad("Zm9vY", 5);    /* len % 4 == 1 */
    expect_bad("Zh", 2);       /* non-zero trailing bits (4 unused) */
    expect_bad("Zm9", 3);
    expect_bad("Zm9vYh", 6);  /* non-zero trailing bits */
    expect_bad("Zm9vYmF", 7); /* 2 unused bits set: 'F' = 000101 */
    expect_bad("Zm\0v", 4);   /* NUL */
    expect_bad("Zm9v\x80", 5);
    expect_bad(".abc", 4);
}

/* ---- RFC examples ---- */

static void test_rfc7515_a1_hs256(void **state)
{
    (void)state;
    assert_int_equal(check_json(a1_jwk, a1_token), SL_JWS_OK);
    char *bad = flip_sig(a1_token);
    assert_int_equal(check_json(a1_jwk, bad), SL_JWS_BAD_SIGNATURE);
    free(bad);
    bad = flip_payload(a1_token);
    assert_int_equal(check_json(a1_jwk, bad), SL_JWS_BAD_SIGNATURE);
    free(bad);

    /* the parsed pieces */
    unsigned char scratch[SCRATCH];
    struct sl_jws_parsed p;
    assert_int_equal(
        sl_jws_parse(a1_token, strlen(a1_token), SL_JWS_HS256, scratch, sizeof(scratch), &p),
        SL_JWS_OK);
    assert_int_equal(p.alg, SL_JWS_HS256);
    assert_int_equal(p.kid.len, 0);
    assert_int_equal(p.sig_len, 32);
    static const char payload[] =
        "{\"iss\":\"joe\",\r\n \"exp\":1300819380,\r\n \"http://example.com/is_root\":true}";
    assert_int_equal(p.payload.len, strlen(payload));
    assert_memory_equal(p.payload.ptr, payload, p.payload.len);
    assert_int_equal(p.signing_input.len, strrchr(a1_token, '.') - a1_token);
    assert_ptr_equal(p.signing_input.ptr, a1_token);

    /* the same secret through sl_jwks_from_secret */
    unsigned char k[64];
    size_t kn = 0;
    const char *kb = strstr(a1_jwk, "\"k\":\"") + 5;
    assert_int_equal(sl_b64url_decode(kb, strchr(kb, '"') - kb, k, sizeof(k), &kn), 0);
    char err[128];
    struct sl_jwks *ks = sl_jwks_from_secret(k, kn, 0, err, sizeof(err));
    assert_non_null(ks);
    assert_int_equal(ks->keys[0].algs, SL_JWS_HMAC_ALGS);
    assert_int_equal(check(ks, a1_token, SL_JWS_ALL_ALGS), SL_JWS_OK);
    /* a filter that only allows RS256 refuses the HS256 token before any key is consulted */
    assert_int_equal(check(ks, a1_token, SL_JWS_RS256), SL_JWS_BAD_ALG);
    sl_jwks_unref(ks);
}

static void test_rfc7515_a2_rs256(void **state)
{
    (void)state;
    struct sl_jwks *ks = parse_set(a2_jwk, false);
    assert_int_equal(ks->count, 1);
    assert_int_equal(ks->keys[0].algs, SL_JWS_RSA_ALGS);
    assert_non_null(ks->keys[0].pkey);
    assert_null(ks->keys[0].secret);
    assert_int_equal(check(ks, a2_token, SL_JWS_ALL_ALGS), SL_JWS_OK);
    char *bad = flip_sig(a2_token);
    assert_int_equal(check(ks, bad, SL_JWS_ALL_ALGS), SL_JWS_BAD_SIGNATURE);
    free(bad);
    bad = flip_payload(a2_token);
    assert_int_equal(check(ks, bad, SL_JWS_ALL_ALGS), SL_JWS_BAD_SIGNATURE);
    free(bad);
    sl_jwks_unref(ks);
}

static void test_rfc7515_a3_es256(void **state)
{
    (void)state;
    struct sl_jwks *ks = parse_set(a3_jwk, false);
    assert_int_equal(ks->keys[0].algs, SL_JWS_ES256);
    assert_int_equal(check(ks, a3_token, SL_JWS_ALL_ALGS), SL_JWS_OK);
    char *bad = flip_sig(a3_token);
    assert_int_equal(check(ks, bad, SL_JWS_ALL_ALGS), SL_JWS_BAD_SIGNATURE);
    free(bad);
    bad = flip_payload(a3_token);
    assert_int_equal(check(ks, bad, SL_JWS_ALL_ALGS), SL_JWS_BAD_SIGNATURE);
    free(bad);
    sl_jwks_unref(ks);
}

static void test_rfc8037_ed25519(void **state)
{
    (void)state;
    struct sl_jwks *ks = parse_set(ed_jwk, false);
    assert_int_equal(ks->keys[0].algs, SL_JWS_EDDSA);
    assert_int_equal(check(ks, ed_token, SL_JWS_ALL_ALGS), SL_JWS_OK);
    char *bad = flip_sig(ed_token);
    assert_int_equal(check(ks, bad, SL_JWS_ALL_ALGS), SL_JWS_BAD_SIGNATURE);
    free(bad);
    bad = flip_payload(ed_token);
    assert_int_equal(check(ks, bad, SL_JWS_ALL_ALGS), SL_JWS_BAD_SIGNATURE);
    free(bad);
    unsigned char scratch[SCRATCH];
    struct sl_jws_parsed p;
    assert_int_equal(
        sl_jws_parse(ed_token, strlen(ed_token), SL_JWS_EDDSA, scratch, sizeof(scratch), &p),
        SL_JWS_OK);
    assert_int_equal(p.payload.len, strlen("Example of Ed25519 signing"));
    assert_memory_equal(p.payload.ptr, "Example of Ed25519 signing", p.payload.len);
    sl_jwks_unref(ks);
}

/* Every prefix and every one-character change of a valid token must fail (strict base64url
 * makes each change reach the signed bytes), each from an exact-size copy so ASan sees any
 * read past the end. */
static void mutate_all(const char *jwks, const char *token)
{
    struct sl_jwks *ks = parse_set(jwks, true);
    size_t n = strlen(token);
    for (size_t len = 0; len < n; len++) {
        char *t = malloc(len ? len : 1);
        assert_non_null(t);
        memcpy(t, token, len);
        unsigned char scratch[SCRATCH];
        struct sl_jws_parsed p;
        if (sl_jws_parse(t, len, SL_JWS_ALL_ALGS, scratch, sizeof(scratch), &p) == SL_JWS_OK) {
            const struct sl_jwk *k = sl_jwks_find(ks, p.kid, p.alg);
            assert_true(!k || sl_jws_verify(&p, k) != SL_JWS_OK);
        }
        free(t);
    }
    static const char subst[] = {'A', 'g', '_', '.'};
    char *t = malloc(n);
    assert_non_null(t);
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < sizeof(subst); j++) {
            if (token[i] == subst[j])
                continue;
            memcpy(t, token, n);
            t[i] = subst[j];
            unsigned char scratch[SCRATCH];
            struct sl_jws_parsed p;
            if (sl_jws_parse(t, n, SL_JWS_ALL_ALGS, scratch, sizeof(scratch), &p) != SL_JWS_OK)
                continue;
            const struct sl_jwk *k = sl_jwks_find(ks, p.kid, p.alg);
            assert_true(!k || sl_jws_verify(&p, k) != SL_JWS_OK);
        }
    }
    free(t);
    sl_jwks_unref(ks);
}

static void test_every_prefix_and_change_fails(void **state)
{
    (void)state;
    mutate_all(a1_jwk, a1_token);
    mutate_all(a3_jwk, a3_token);
    mutate_all(ed_jwk, ed_token);
}

/* ---- generated keys: every other algorithm ---- */

static void roundtrip(EVP_PKEY *priv, unsigned alg, const char *jwk_extra)
{
    char header[64];
    snprintf(header, sizeof(header), "{\"alg\":\"%s\",\"typ\":\"JWT\"}", sl_jws_alg_name(alg));
    char *tok = make_token(header, "{\"sub\":\"x\"}", alg, priv, NULL, 0);
    char *jwk = jwk_of(priv, jwk_extra);
    struct sl_jwks *ks = parse_set(jwk, false);
    assert_true(ks->keys[0].algs & alg);
    assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_OK);
    char *bad = flip_sig(tok);
    assert_int_equal(check(ks, bad, SL_JWS_ALL_ALGS), SL_JWS_BAD_SIGNATURE);
    free(bad);
    bad = flip_payload(tok);
    assert_int_equal(check(ks, bad, SL_JWS_ALL_ALGS), SL_JWS_BAD_SIGNATURE);
    free(bad);
    /* the same key from PEM verifies too */
    char *pem = pem_of(priv);
    char err[128];
    struct sl_jwks *pk = sl_jwks_from_pem(pem, strlen(pem), 0, err, sizeof(err));
    assert_non_null(pk);
    assert_int_equal(pk->keys[0].fingerprint, ks->keys[0].fingerprint);
    assert_int_equal(check(pk, tok, SL_JWS_ALL_ALGS), SL_JWS_OK);
    sl_jwks_unref(pk);
    free(pem);
    sl_jwks_unref(ks);
    free(jwk);
    free(tok);
}

static void test_rsa_algs(void **state)
{
    (void)state;
    roundtrip(rsa_key, SL_JWS_RS256, "");
    roundtrip(rsa_key, SL_JWS_RS384, "");
    roundtrip(rsa_key, SL_JWS_RS512, "");
    roundtrip(rsa_key, SL_JWS_PS256, "");
    roundtrip(rsa_key, SL_JWS_PS384, "");
    roundtrip(rsa_key, SL_JWS_PS512, ",\"use\":\"sig\",\"kid\":\"r1\"");
}

static void test_ec_ed_algs(void **state)
{
    (void)state;
    roundtrip(p256_key, SL_JWS_ES256, "");
    roundtrip(p384_key, SL_JWS_ES384, ",\"alg\":\"ES384\"");
    roundtrip(ed_key, SL_JWS_EDDSA, "");
}

static void test_hmac_algs(void **state)
{
    (void)state;
    unsigned char secret[64];
    assert_int_equal(RAND_bytes(secret, sizeof(secret)), 1);
    char *kb = b64(secret, sizeof(secret));
    char jwk[256];
    snprintf(jwk, sizeof(jwk), "{\"kty\":\"oct\",\"k\":\"%s\"}", kb);
    free(kb);
    static const unsigned algs[] = {SL_JWS_HS256, SL_JWS_HS384, SL_JWS_HS512};
    static const char *hdr[] = {"{\"alg\":\"HS256\"}", "{\"alg\":\"HS384\"}",
                                "{\"alg\":\"HS512\"}"};
    struct sl_jwks *ks = parse_set(jwk, true);
    assert_int_equal(ks->keys[0].algs, SL_JWS_HMAC_ALGS);
    for (size_t i = 0; i < 3; i++) {
        char *tok = make_token(hdr[i], "{}", algs[i], NULL, secret, sizeof(secret));
        assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_OK);
        char *bad = flip_sig(tok);
        assert_int_equal(check(ks, bad, SL_JWS_ALL_ALGS), SL_JWS_BAD_SIGNATURE);
        free(bad);
        bad = flip_payload(tok);
        assert_int_equal(check(ks, bad, SL_JWS_ALL_ALGS), SL_JWS_BAD_SIGNATURE);
        free(bad);
        free(tok);
    }
    sl_jwks_unref(ks);

    /* RFC 7518 §3.2: a secret shorter than the hash cannot serve that HS alg */
    char err[128];
    assert_null(sl_jwks_from_secret(secret, 31, 0, err, sizeof(err)));
    ks = sl_jwks_from_secret(secret, 40, 0, err, sizeof(err));
    assert_non_null(ks);
    assert_int_equal(ks->keys[0].algs, SL_JWS_HS256);
    sl_jwks_unref(ks);
    assert_null(sl_jwks_from_secret(secret, 40, SL_JWS_HS512, err, sizeof(err)));
    assert_null(sl_jwks_from_secret(secret, 64, SL_JWS_RS256, err, sizeof(err)));
    ks = sl_jwks_from_secret(secret, 64, SL_JWS_HS384, err, sizeof(err));
    assert_non_null(ks);
    assert_int_equal(ks->keys[0].algs, SL_JWS_HS384);
    sl_jwks_unref(ks);
}

/* ---- refusals ---- */

static void test_alg_none_and_crit(void **state)
{
    (void)state;
    struct sl_jwks *ks = parse_set(a1_jwk, true);
    unsigned char scratch[SCRATCH];
    struct sl_jws_parsed p;
    char *h = b64s("{\"alg\":\"none\"}");
    char tok[256];
    snprintf(tok, sizeof(tok), "%s.%s.", h, "e30");
    /* an empty signature part is malformed; with any signature "none" is still refused */
    assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_MALFORMED);
    snprintf(tok, sizeof(tok), "%s.%s.AAAA", h, "e30");
    assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_BAD_ALG);
    free(h);
    assert_int_equal(sl_jws_alg_from_name("none", 4), 0);
    assert_int_equal(sl_jws_alg_from_name("NONE", 4), 0);
    assert_int_equal(sl_jws_alg_from_name("hs256", 5), 0);
    assert_string_equal(sl_jws_alg_name(SL_JWS_PS384), "PS384");
    assert_string_equal(sl_jws_alg_name(SL_JWS_HS256 | SL_JWS_HS384), "?");

    static const char *bad_alg_headers[] = {
        "{\"alg\":\"HS256\",\"crit\":[\"exp\"],\"exp\":1}",
        "{\"alg\":\"HS256\",\"crit\":[]}",
        "{\"alg\":\"HS256\",\"b64\":false,\"crit\":[\"b64\"]}",
        "{\"alg\":\"RS1\"}",
        "{\"alg\":\"ES512\"}",
    };
    for (size_t i = 0; i < sizeof(bad_alg_headers) / sizeof(bad_alg_headers[0]); i++) {
        h = b64s(bad_alg_headers[i]);
        snprintf(tok, sizeof(tok), "%s.e30.AAAA", h);
        assert_int_equal(
            sl_jws_parse(tok, strlen(tok), SL_JWS_ALL_ALGS, scratch, sizeof(scratch), &p),
            SL_JWS_BAD_ALG);
        free(h);
    }
    static const char *malformed_headers[] = {
        "{\"typ\":\"JWT\"}",                     /* no alg */
        "{\"alg\":256}",                         /* alg not a string */
        "{\"alg\":\"HS256\",\"typ\":\"JOSE\"}",  /* typ */
        "{\"alg\":\"HS256\",\"typ\":1}",         /* typ type */
        "{\"alg\":\"HS256\",\"kid\":7}",         /* kid type */
        "{\"alg\":\"HS256\",\"alg\":\"HS256\"}", /* duplicate member */
        "[\"HS256\"]",                           /* not an object */
        "{\"alg\":\"HS256\"} x",                 /* trailing garbage */
        "{\"alg\":\"HS256\"",                    /* truncated */
    };
    for (size_t i = 0; i < sizeof(malformed_headers) / sizeof(malformed_headers[0]); i++) {
        h = b64s(malformed_headers[i]);
        snprintf(tok, sizeof(tok), "%s.e30.AAAA", h);
        assert_int_equal(
            sl_jws_parse(tok, strlen(tok), SL_JWS_ALL_ALGS, scratch, sizeof(scratch), &p),
            SL_JWS_MALFORMED);
        free(h);
    }
    /* accepted typ values, any case; kid copied */
    static const char *ok_headers[] = {
        "{\"alg\":\"HS256\",\"typ\":\"jwt\",\"kid\":\"k1\"}",
        "{\"alg\":\"HS256\",\"typ\":\"AT+JWT\",\"kid\":\"k1\"}",
        "{\"kid\":\"k1\",\"alg\":\"HS256\"}",
    };
    for (size_t i = 0; i < 3; i++) {
        h = b64s(ok_headers[i]);
        snprintf(tok, sizeof(tok), "%s.e30.AAAA", h);
        assert_int_equal(sl_jws_parse(tok, strlen(tok), SL_JWS_HS256, scratch, sizeof(scratch), &p),
                         SL_JWS_OK);
        assert_int_equal(p.kid.len, 2);
        assert_memory_equal(p.kid.ptr, "k1", 2);
        assert_true((unsigned char *)p.kid.ptr >= scratch &&
                    (unsigned char *)p.kid.ptr < scratch + sizeof(scratch));
        free(h);
    }
    sl_jwks_unref(ks);
}

static void test_token_shape(void **state)
{
    (void)state;
    unsigned char scratch[SCRATCH];
    struct sl_jws_parsed p;
    static const char *bad[] = {
        "",
        "abc",
        "eyJhbGciOiJIUzI1NiJ9.e30",
        "eyJhbGciOiJIUzI1NiJ9.e30.AAAA.AAAA",
        ".e30.AAAA",
        "eyJhbGciOiJIUzI1NiJ9.e30.",
        "eyJhbGciOiJIUzI1NiJ9.e30=.AAAA",
        "eyJhbGciOiJIUzI1NiJ9.e30.AAA=",
        "eyJhbGciOiJIUzI1NiJ9.e.AAAA",
        "eyJhbGciOiJIUzI1NiJ9 .e30.AAAA",
        "eyJhbGciOiJIUzI1NiJ9.e30.AA+A",
        "eyJhbGciOiJIUzI1NiJ9.e31.AAAA", /* non-zero trailing bits in the payload */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(
            sl_jws_parse(bad[i], strlen(bad[i]), SL_JWS_ALL_ALGS, scratch, sizeof(scratch), &p),
            SL_JWS_MALFORMED);
    /* an empty payload is a valid JWS (the claims check refuses it later) */
    const char *t = "eyJhbGciOiJIUzI1NiJ9..AAAA";
    assert_int_equal(sl_jws_parse(t, strlen(t), SL_JWS_ALL_ALGS, scratch, sizeof(scratch), &p),
                     SL_JWS_OK);
    assert_int_equal(p.payload.len, 0);
    /* scratch: the RFC token needs header + payload + signature decoded */
    size_t need = 30 + 70 + 32;
    assert_int_equal(
        sl_jws_parse(a1_token, strlen(a1_token), SL_JWS_ALL_ALGS, scratch, need - 1, &p),
        SL_JWS_TOO_LARGE);
    assert_int_equal(sl_jws_parse(a1_token, strlen(a1_token), SL_JWS_ALL_ALGS, scratch, need, &p),
                     SL_JWS_OK);
    assert_int_equal(sl_jws_parse(a1_token, strlen(a1_token), SL_JWS_ALL_ALGS, NULL, 0, &p),
                     SL_JWS_TOO_LARGE);
    assert_string_equal(sl_jws_status_name(SL_JWS_BAD_SIGNATURE), "bad_signature");
    assert_string_equal(sl_jws_status_name(SL_JWS_UNKNOWN_KID), "unknown_kid");
}

static void test_alg_confusion(void **state)
{
    (void)state;
    /* HS256 "signed" with the RSA public key (its PEM, the classic attack) */
    char *pem = pem_of(rsa_key);
    char *tok = make_token("{\"alg\":\"HS256\"}", "{}", SL_JWS_HS256, NULL,
                           (const unsigned char *)pem, strlen(pem));
    char *jwk = jwk_of(rsa_key, "");
    struct sl_jwks *ks = parse_set(jwk, true);
    assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_UNKNOWN_KID);
    /* even handed the RSA key directly, verify refuses */
    unsigned char scratch[SCRATCH];
    struct sl_jws_parsed p;
    assert_int_equal(sl_jws_parse(tok, strlen(tok), SL_JWS_ALL_ALGS, scratch, sizeof(scratch), &p),
                     SL_JWS_OK);
    assert_int_equal(sl_jws_verify(&p, &ks->keys[0]), SL_JWS_BAD_ALG);
    /* and a key struct claiming HMAC but holding a pkey still does not verify */
    struct sl_jwk forged = ks->keys[0];
    forged.algs = SL_JWS_ALL_ALGS;
    assert_int_equal(sl_jws_verify(&p, &forged), SL_JWS_BAD_SIGNATURE);
    char err[128];
    struct sl_jwks *pk = sl_jwks_from_pem(pem, strlen(pem), 0, err, sizeof(err));
    assert_non_null(pk);
    assert_int_equal(pk->keys[0].algs, SL_JWS_RSA_ALGS);
    assert_int_equal(check(pk, tok, SL_JWS_ALL_ALGS), SL_JWS_UNKNOWN_KID);
    assert_null(sl_jwks_from_pem(pem, strlen(pem), SL_JWS_HS256, err, sizeof(err)));
    sl_jwks_unref(pk);
    sl_jwks_unref(ks);
    free(jwk);
    free(tok);
    free(pem);

    /* HS256 with an EC key, and with the Ed25519 key */
    EVP_PKEY *keys[] = {p256_key, ed_key};
    for (size_t i = 0; i < 2; i++) {
        jwk = jwk_of(keys[i], "");
        ks = parse_set(jwk, true);
        assert_int_equal(ks->keys[0].algs & SL_JWS_HMAC_ALGS, 0);
        tok = make_token("{\"alg\":\"HS256\"}", "{}", SL_JWS_HS256, NULL,
                         (const unsigned char *)jwk, strlen(jwk));
        assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_UNKNOWN_KID);
        assert_int_equal(
            sl_jws_parse(tok, strlen(tok), SL_JWS_ALL_ALGS, scratch, sizeof(scratch), &p),
            SL_JWS_OK);
        assert_int_equal(sl_jws_verify(&p, &ks->keys[0]), SL_JWS_BAD_ALG);
        sl_jwks_unref(ks);
        free(jwk);
        free(tok);
    }

    /* an EC P-256 key cannot verify ES384 and a P-384 key cannot verify ES256 */
    tok = make_token("{\"alg\":\"ES384\"}", "{}", SL_JWS_ES384, p384_key, NULL, 0);
    jwk = jwk_of(p256_key, "");
    ks = parse_set(jwk, false);
    assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_UNKNOWN_KID);
    sl_jwks_unref(ks);
    free(jwk);
    free(tok);
}

static void test_jwk_alg_narrows(void **state)
{
    (void)state;
    char *jwk = jwk_of(rsa_key, ",\"alg\":\"RS256\"");
    struct sl_jwks *ks = parse_set(jwk, false);
    assert_int_equal(ks->keys[0].algs, SL_JWS_RS256);
    char *ps = make_token("{\"alg\":\"PS256\"}", "{}", SL_JWS_PS256, rsa_key, NULL, 0);
    char *rs = make_token("{\"alg\":\"RS256\"}", "{}", SL_JWS_RS256, rsa_key, NULL, 0);
    assert_int_equal(check(ks, ps, SL_JWS_ALL_ALGS), SL_JWS_UNKNOWN_KID);
    assert_int_equal(check(ks, rs, SL_JWS_ALL_ALGS), SL_JWS_OK);
    unsigned char scratch[SCRATCH];
    struct sl_jws_parsed p;
    assert_int_equal(sl_jws_parse(ps, strlen(ps), SL_JWS_ALL_ALGS, scratch, sizeof(scratch), &p),
                     SL_JWS_OK);
    assert_int_equal(sl_jws_verify(&p, &ks->keys[0]), SL_JWS_BAD_ALG);
    sl_jwks_unref(ks);
    free(jwk);
    free(ps);
    free(rs);

    /* a JWK alg that does not fit the kty leaves no usable key */
    char err[256];
    jwk = jwk_of(rsa_key, ",\"alg\":\"HS256\"");
    assert_null(sl_jwks_parse(jwk, strlen(jwk), true, err, sizeof(err)));
    assert_non_null(strstr(err, "alg does not fit"));
    free(jwk);
    jwk = jwk_of(rsa_key, ",\"alg\":\"RSA-OAEP\"");
    assert_null(sl_jwks_parse(jwk, strlen(jwk), true, err, sizeof(err)));
    free(jwk);
}

static void test_es256_sig_length(void **state)
{
    (void)state;
    struct sl_jwks *ks = parse_set(a3_jwk, false);
    unsigned char scratch[SCRATCH];
    struct sl_jws_parsed p;
    assert_int_equal(
        sl_jws_parse(a3_token, strlen(a3_token), SL_JWS_ALL_ALGS, scratch, sizeof(scratch), &p),
        SL_JWS_OK);
    assert_int_equal(p.sig_len, 64);
    struct sl_jws_parsed q = p;
    q.sig_len = 63;
    assert_int_equal(sl_jws_verify(&q, &ks->keys[0]), SL_JWS_BAD_SIGNATURE);
    /* a DER signature (what OpenSSL produces) is not the JOSE form */
    size_t dl = 0;
    char input[128];
    snprintf(input, sizeof(input), "%.*s", (int)p.signing_input.len, p.signing_input.ptr);
    EVP_MD_CTX *m = EVP_MD_CTX_new();
    assert_int_equal(EVP_DigestSignInit(m, NULL, EVP_sha256(), NULL, p256_key), 1);
    unsigned char der[80];
    dl = sizeof(der);
    assert_int_equal(EVP_DigestSign(m, der, &dl, (const unsigned char *)input, strlen(input)), 1);
    EVP_MD_CTX_free(m);
    q.sig = der;
    q.sig_len = dl;
    assert_int_equal(sl_jws_verify(&q, &ks->keys[0]), SL_JWS_BAD_SIGNATURE);
    /* 65 bytes built from a valid 64 plus one */
    unsigned char longer[65];
    memcpy(longer, p.sig, 64);
    longer[64] = 0;
    q.sig = longer;
    q.sig_len = 65;
    assert_int_equal(sl_jws_verify(&q, &ks->keys[0]), SL_JWS_BAD_SIGNATURE);
    q.sig_len = 64;
    assert_int_equal(sl_jws_verify(&q, &ks->keys[0]), SL_JWS_OK);
    sl_jwks_unref(ks);
}

static void test_kid_lookup(void **state)
{
    (void)state;
    char *k1 = jwk_of(p256_key, ",\"kid\":\"one\"");
    char *k2 = jwk_of(ed_key, ",\"kid\":\"two\"");
    char *k3 = jwk_of(rsa_key, ",\"kid\":\"three\"");
    char set[8192];
    snprintf(set, sizeof(set), "{\"keys\":[%s,%s,%s]}", k1, k2, k3);
    struct sl_jwks *ks = parse_set(set, false);
    assert_int_equal(ks->count, 3);
    assert_int_equal(ks->skipped, 0);
    assert_string_equal(ks->keys[0].kid, "one");
    assert_true(ks->keys[0].fingerprint != ks->keys[1].fingerprint);

    char *tok =
        make_token("{\"alg\":\"ES256\",\"kid\":\"one\"}", "{}", SL_JWS_ES256, p256_key, NULL, 0);
    assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_OK);
    free(tok);
    tok = make_token("{\"alg\":\"ES256\",\"kid\":\"nope\"}", "{}", SL_JWS_ES256, p256_key, NULL, 0);
    assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_UNKNOWN_KID);
    free(tok);
    /* kid of another key whose type does not allow the alg */
    tok = make_token("{\"alg\":\"ES256\",\"kid\":\"two\"}", "{}", SL_JWS_ES256, p256_key, NULL, 0);
    assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_UNKNOWN_KID);
    free(tok);
    /* no kid: the only ES256 key is found */
    tok = make_token("{\"alg\":\"ES256\"}", "{}", SL_JWS_ES256, p256_key, NULL, 0);
    assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_OK);
    free(tok);
    assert_null(sl_jwks_find(ks, SL_SLICE_LIT("one"), SL_JWS_ES256 | SL_JWS_EDDSA));
    assert_null(sl_jwks_find(ks, SL_SLICE_LIT("on"), SL_JWS_ES256));
    assert_non_null(sl_jwks_find(ks, SL_SLICE_LIT("three"), SL_JWS_PS512));
    sl_jwks_unref(ks);

    /* no kid with two candidate keys: no guessing */
    snprintf(set, sizeof(set), "{\"keys\":[%s,%s]}", k1, a3_jwk);
    ks = parse_set(set, false);
    assert_int_equal(ks->count, 2);
    tok = make_token("{\"alg\":\"ES256\"}", "{}", SL_JWS_ES256, p256_key, NULL, 0);
    assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_UNKNOWN_KID);
    free(tok);
    assert_null(sl_jwks_find(ks, (struct sl_slice){NULL, 0}, SL_JWS_ES256));
    /* with the kid the right one is found */
    tok = make_token("{\"alg\":\"ES256\",\"kid\":\"one\"}", "{}", SL_JWS_ES256, p256_key, NULL, 0);
    assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_OK);
    free(tok);
    /* refcount */
    sl_jwks_ref(ks);
    sl_jwks_unref(ks);
    assert_int_equal(ks->refs, 1);
    sl_jwks_unref(ks);
    sl_jwks_unref(NULL);
    free(k1);
    free(k2);
    free(k3);
}

static void test_jwks_rules(void **state)
{
    (void)state;
    char set[4096];
    snprintf(set, sizeof(set),
             "{\"keys\":["
             "{\"kty\":\"RSA\",\"use\":\"enc\",\"n\":\"%s\",\"e\":\"AQAB\"},"
             "{\"kty\":\"EC\",\"crv\":\"secp256k1\",\"x\":\"%s\",\"y\":\"%s\"},"
             "{\"kty\":\"OKP\",\"crv\":\"X25519\",\"x\":\"%s\"},"
             "{\"kty\":\"foo\"},"
             "{\"use\":\"sig\"},"
             "42,"
             "{\"kty\":\"RSA\",\"key_ops\":[\"encrypt\"],\"n\":\"%s\",\"e\":\"AQAB\"},"
             "{\"kty\":\"oct\",\"k\":\"AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ\"},"
             "{\"kty\":\"RSA\",\"use\":\"sig\",\"key_ops\":[\"verify\"],\"kid\":\"a2\","
             "\"n\":\"%s\",\"e\":\"AQAB\"}"
             "]}",
             A2_N, A3_X, A3_Y, A3_X, A2_N, A2_N);
    struct sl_jwks *ks = parse_set(set, true);
    assert_int_equal(ks->count, 1);
    assert_int_equal(ks->skipped, 8);
    assert_string_equal(ks->keys[0].kid, "a2");
    assert_int_equal(check(ks, a2_token, SL_JWS_ALL_ALGS), SL_JWS_OK);
    sl_jwks_unref(ks);

    char err[256];
    /* oct refused when the source is not trusted with secrets */
    assert_null(sl_jwks_parse(a1_jwk, strlen(a1_jwk), false, err, sizeof(err)));
    assert_non_null(strstr(err, "oct"));
    snprintf(set, sizeof(set), "{\"keys\":[%s,%s]}", a1_jwk, a3_jwk);
    ks = parse_set(set, false);
    assert_int_equal(ks->count, 1);
    assert_int_equal(ks->skipped, 1);
    assert_int_equal(check(ks, a1_token, SL_JWS_ALL_ALGS), SL_JWS_UNKNOWN_KID);
    sl_jwks_unref(ks);

    /* structural errors */
    static const char *bad[] = {
        "",
        "[]",
        "{\"keys\":{}}",
        "{\"keys\":[]}",
        "{\"foo\":1}",
        "{\"keys\":[{\"kty\":\"oct\",\"k\":\"\"}]}",
        "{\"keys\":[{\"kty\":\"oct\",\"k\":\"AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-"
        "EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow=\"}]}",
        "{\"keys\":[{\"kty\":\"oct\",\"k\":\"x\",\"k\":\"y\"}]}",
        "{\"keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"" A3_X "\"}]}",
        "{\"keys\":[{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"" A3_X "AA\"}]}",
        "{\"keys\":[{\"kty\":\"RSA\",\"n\":\"" A2_N "\",\"e\":\"AQAA\"}]}",
        "{\"keys\":[{\"kty\":\"RSA\",\"n\":\"" A2_N "\",\"e\":\"AQAB\",\"kid\":1}]}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        assert_null(sl_jwks_parse(bad[i], strlen(bad[i]), true, err, sizeof(err)));
        assert_true(err[0] != '\0');
    }
    /* at most 1024 entries */
    for (size_t total = 1024; total <= 1025; total++) {
        size_t cap = total * 3 + strlen(a3_jwk) + 16;
        char *big = malloc(cap);
        assert_non_null(big);
        size_t off = (size_t)snprintf(big, cap, "{\"keys\":[%s", a3_jwk);
        for (size_t i = 1; i < total; i++)
            off += (size_t)snprintf(big + off, cap - off, ",{}");
        snprintf(big + off, cap - off, "]}");
        ks = sl_jwks_parse(big, strlen(big), false, err, sizeof(err));
        if (total == 1024) {
            assert_non_null(ks);
            assert_int_equal(ks->skipped, 1023);
            sl_jwks_unref(ks);
        } else {
            assert_null(ks);
            assert_non_null(strstr(err, "1024"));
        }
        free(big);
    }
    /* a single JWK (not in a set) is accepted */
    ks = parse_set(a3_jwk, false);
    assert_int_equal(ks->count, 1);
    sl_jwks_unref(ks);
}

static void test_rsa_1024_rejected(void **state)
{
    (void)state;
    EVP_PKEY *small = EVP_RSA_gen(1024);
    assert_non_null(small);
    char *jwk = jwk_of(small, "");
    char err[256];
    assert_null(sl_jwks_parse(jwk, strlen(jwk), false, err, sizeof(err)));
    assert_non_null(strstr(err, "2048"));
    char *pem = pem_of(small);
    assert_null(sl_jwks_from_pem(pem, strlen(pem), 0, err, sizeof(err)));
    assert_non_null(strstr(err, "2048"));
    free(pem);
    free(jwk);
    EVP_PKEY_free(small);
}

static void test_ec_point_off_curve(void **state)
{
    (void)state;
    /* the RFC key with y changed in one bit: no longer on P-256 */
    char jwk[256];
    snprintf(jwk, sizeof(jwk), "{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"%s\",\"y\":\"%s\"}", A3_X,
             "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5b0");
    char err[256];
    assert_null(sl_jwks_parse(jwk, strlen(jwk), false, err, sizeof(err)));
    assert_non_null(strstr(err, "curve"));
    /* the point at x=0,y=0 */
    snprintf(jwk, sizeof(jwk), "{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"%s\",\"y\":\"%s\"}",
             "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
             "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert_null(sl_jwks_parse(jwk, strlen(jwk), false, err, sizeof(err)));
    /* P-384 coordinates on a P-256 key */
    char *k384 = jwk_of(p384_key, "");
    char *crv = strstr(k384, "P-384");
    memcpy(crv, "P-256", 5);
    assert_null(sl_jwks_parse(k384, strlen(k384), false, err, sizeof(err)));
    free(k384);
}

static void test_pem_forms(void **state)
{
    (void)state;
    char err[256];
    /* PKCS#1 "RSA PUBLIC KEY": i2d_PublicKey gives the RSAPublicKey DER */
    unsigned char *der = NULL;
    int dl = i2d_PublicKey(rsa_key, &der);
    assert_true(dl > 0);
    BIO *bio = BIO_new(BIO_s_mem());
    assert_true(PEM_write_bio(bio, "RSA PUBLIC KEY", "", der, dl) > 0);
    OPENSSL_free(der);
    char *data = NULL;
    long n = BIO_get_mem_data(bio, &data);
    assert_non_null(memmem(data, (size_t)n, "BEGIN RSA PUBLIC KEY", 20));
    struct sl_jwks *ks =
        sl_jwks_from_pem(data, (size_t)n, SL_JWS_PS256 | SL_JWS_ES256, err, sizeof(err));
    if (!ks)
        fail_msg("RSA PUBLIC KEY: %s", err);
    assert_int_equal(ks->keys[0].algs, SL_JWS_PS256);
    char *tok = make_token("{\"alg\":\"PS256\"}", "{}", SL_JWS_PS256, rsa_key, NULL, 0);
    assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_OK);
    sl_jwks_unref(ks);
    BIO_free(bio);

    /* an X.509 certificate (self-signed here) */
    X509 *cert = X509_new();
    assert_non_null(cert);
    ASN1_INTEGER_set(X509_get_serialNumber(cert), 1);
    X509_gmtime_adj(X509_getm_notBefore(cert), 0);
    X509_gmtime_adj(X509_getm_notAfter(cert), 3600);
    X509_set_pubkey(cert, rsa_key);
    X509_NAME *name = X509_get_subject_name(cert);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"t", -1, -1, 0);
    X509_set_issuer_name(cert, name);
    assert_true(X509_sign(cert, rsa_key, EVP_sha256()) > 0);
    bio = BIO_new(BIO_s_mem());
    assert_int_equal(PEM_write_bio_X509(bio, cert), 1);
    n = BIO_get_mem_data(bio, &data);
    ks = sl_jwks_from_pem(data, (size_t)n, 0, err, sizeof(err));
    if (!ks)
        fail_msg("certificate: %s", err);
    assert_int_equal(ks->keys[0].algs, SL_JWS_RSA_ALGS);
    assert_int_equal(check(ks, tok, SL_JWS_ALL_ALGS), SL_JWS_OK);
    sl_jwks_unref(ks);
    BIO_free(bio);
    X509_free(cert);
    free(tok);

    /* EC and Ed25519 PEM keys get their algorithm from the curve */
    char *pem = pem_of(p384_key);
    ks = sl_jwks_from_pem(pem, strlen(pem), 0, err, sizeof(err));
    assert_non_null(ks);
    assert_int_equal(ks->keys[0].algs, SL_JWS_ES384);
    sl_jwks_unref(ks);
    assert_null(sl_jwks_from_pem(pem, strlen(pem), SL_JWS_ES256, err, sizeof(err)));
    free(pem);
    pem = pem_of(ed_key);
    ks = sl_jwks_from_pem(pem, strlen(pem), 0, err, sizeof(err));
    assert_non_null(ks);
    assert_int_equal(ks->keys[0].algs, SL_JWS_EDDSA);
    sl_jwks_unref(ks);
    free(pem);

    /* secp256k1 is not a JOSE ES256 curve */
    EVP_PKEY *k1 = EVP_EC_gen("secp256k1");
    assert_non_null(k1);
    pem = pem_of(k1);
    assert_null(sl_jwks_from_pem(pem, strlen(pem), 0, err, sizeof(err)));
    free(pem);
    EVP_PKEY_free(k1);

    /* garbage and private keys */
    static const char junk[] = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
    assert_null(sl_jwks_from_pem(junk, strlen(junk), 0, err, sizeof(err)));
    assert_null(sl_jwks_from_pem("", 0, 0, err, sizeof(err)));
    bio = BIO_new(BIO_s_mem());
    assert_int_equal(PEM_write_bio_PrivateKey(bio, p256_key, NULL, NULL, 0, NULL, NULL), 1);
    n = BIO_get_mem_data(bio, &data);
    assert_null(sl_jwks_from_pem(data, (size_t)n, 0, err, sizeof(err)));
    BIO_free(bio);
    /* a private key is refused even in the PKCS#1 form the RSA PUBLIC KEY decoder reads */
    bio = BIO_new(BIO_s_mem());
    assert_int_equal(PEM_write_bio_PrivateKey_traditional(bio, rsa_key, NULL, NULL, 0, NULL, NULL),
                     1);
    n = BIO_get_mem_data(bio, &data);
    assert_non_null(memmem(data, (size_t)n, "BEGIN RSA PRIVATE KEY", 21));
    assert_null(sl_jwks_from_pem(data, (size_t)n, 0, err, sizeof(err)));
    BIO_free(bio);
}

/* ---- claims ---- */

static enum sl_jwt_claims_status claims(const char *payload, const struct sl_jwt_rules *r,
                                        int64_t now)
{
    int64_t exp = -1;
    return sl_jwt_claims_check(payload, strlen(payload), r, now, &exp, NULL, 0, NULL);
}

static void test_claims_time(void **state)
{
    (void)state;
    struct sl_jwt_rules r = {0};
    const char *p = "{\"exp\":1000,\"nbf\":500,\"iat\":400}";
    int64_t exp = 0;
    assert_int_equal(sl_jwt_claims_check(p, strlen(p), &r, 1000, &exp, NULL, 0, NULL),
                     SL_JWT_CLAIMS_OK);
    assert_int_equal(exp, 1000);
    assert_int_equal(claims(p, &r, 1001), SL_JWT_EXPIRED);
    assert_int_equal(claims(p, &r, 500), SL_JWT_CLAIMS_OK);
    assert_int_equal(claims(p, &r, 499), SL_JWT_NOT_YET_VALID);
    r.leeway_s = 30;
    assert_int_equal(claims(p, &r, 1030), SL_JWT_CLAIMS_OK);
    assert_int_equal(claims(p, &r, 1031), SL_JWT_EXPIRED);
    assert_int_equal(claims(p, &r, 470), SL_JWT_CLAIMS_OK);
    assert_int_equal(claims(p, &r, 469), SL_JWT_NOT_YET_VALID);
    /* iat in the future (nbf absent) */
    r.leeway_s = 0;
    assert_int_equal(claims("{\"iat\":2000}", &r, 1999), SL_JWT_ISSUED_IN_FUTURE);
    assert_int_equal(claims("{\"iat\":2000}", &r, 2000), SL_JWT_CLAIMS_OK);
    r.leeway_s = 5;
    assert_int_equal(claims("{\"iat\":2000}", &r, 1995), SL_JWT_CLAIMS_OK);
    assert_int_equal(claims("{\"iat\":2000}", &r, 1994), SL_JWT_ISSUED_IN_FUTURE);
    r.leeway_s = 0;
    /* fractions round toward the stricter answer */
    assert_int_equal(claims("{\"exp\":1000.5}", &r, 1000), SL_JWT_CLAIMS_OK);
    assert_int_equal(claims("{\"exp\":1000.5}", &r, 1001), SL_JWT_EXPIRED);
    assert_int_equal(claims("{\"nbf\":1000.5}", &r, 1000), SL_JWT_NOT_YET_VALID);
    assert_int_equal(claims("{\"nbf\":1000.5}", &r, 1001), SL_JWT_CLAIMS_OK);
    /* extremes do not overflow */
    r.leeway_s = UINT64_MAX;
    assert_int_equal(claims("{\"exp\":-9223372036854775808}", &r, INT64_MAX), SL_JWT_EXPIRED);
    assert_int_equal(claims("{\"exp\":9223372036854775807}", &r, INT64_MIN), SL_JWT_CLAIMS_OK);
    assert_int_equal(claims("{\"nbf\":1e300}", &r, 0), SL_JWT_NOT_YET_VALID);
    assert_int_equal(claims("{\"exp\":-1e300}", &r, 0), SL_JWT_EXPIRED);
    r.leeway_s = 0;
    /* require_exp */
    assert_int_equal(claims("{}", &r, 0), SL_JWT_CLAIMS_OK);
    r.require_exp = true;
    assert_int_equal(claims("{}", &r, 0), SL_JWT_EXPIRED);
    assert_int_equal(claims("{\"exp\":10}", &r, 0), SL_JWT_CLAIMS_OK);
    /* non-numeric times and non-object payloads */
    assert_int_equal(claims("{\"exp\":\"1000\"}", &r, 0), SL_JWT_CLAIMS_MALFORMED);
    assert_int_equal(claims("{\"exp\":10,\"nbf\":true}", &r, 0), SL_JWT_CLAIMS_MALFORMED);
    assert_int_equal(claims("{\"exp\":10,\"iat\":null}", &r, 0), SL_JWT_CLAIMS_MALFORMED);
    assert_int_equal(claims("[1]", &r, 0), SL_JWT_CLAIMS_MALFORMED);
    assert_int_equal(claims("", &r, 0), SL_JWT_CLAIMS_MALFORMED);
    assert_int_equal(claims("{\"exp\":1,\"exp\":2}", &r, 0), SL_JWT_CLAIMS_MALFORMED);
    assert_int_equal(claims("{\"exp\":10}x", &r, 0), SL_JWT_CLAIMS_MALFORMED);
    assert_string_equal(sl_jwt_claims_status_name(SL_JWT_NOT_YET_VALID), "not_yet_valid");
}

static void test_claims_iss_aud(void **state)
{
    (void)state;
    char *iss[] = {"https://a.example", "https://b.example"};
    char *aud[] = {"api", "web"};
    struct sl_jwt_rules r = {.issuers = iss, .issuer_count = 2};
    assert_int_equal(claims("{\"iss\":\"https://b.example\"}", &r, 0), SL_JWT_CLAIMS_OK);
    assert_int_equal(claims("{\"iss\":\"https://b.example/\"}", &r, 0), SL_JWT_BAD_ISSUER);
    assert_int_equal(claims("{\"iss\":\"HTTPS://B.EXAMPLE\"}", &r, 0), SL_JWT_BAD_ISSUER);
    assert_int_equal(claims("{}", &r, 0), SL_JWT_BAD_ISSUER);
    assert_int_equal(claims("{\"iss\":[\"https://a.example\"]}", &r, 0), SL_JWT_BAD_ISSUER);
    r = (struct sl_jwt_rules){.audiences = aud, .audience_count = 2};
    assert_int_equal(claims("{\"aud\":\"web\"}", &r, 0), SL_JWT_CLAIMS_OK);
    assert_int_equal(claims("{\"aud\":[\"x\",\"api\"]}", &r, 0), SL_JWT_CLAIMS_OK);
    assert_int_equal(claims("{\"aud\":[\"x\",\"y\"]}", &r, 0), SL_JWT_BAD_AUDIENCE);
    assert_int_equal(claims("{\"aud\":[]}", &r, 0), SL_JWT_BAD_AUDIENCE);
    assert_int_equal(claims("{\"aud\":\"apix\"}", &r, 0), SL_JWT_BAD_AUDIENCE);
    assert_int_equal(claims("{\"aud\":[\"api\",7]}", &r, 0), SL_JWT_BAD_AUDIENCE);
    assert_int_equal(claims("{\"aud\":{\"api\":1}}", &r, 0), SL_JWT_BAD_AUDIENCE);
    assert_int_equal(claims("{}", &r, 0), SL_JWT_BAD_AUDIENCE);
    /* not configured: anything goes */
    r = (struct sl_jwt_rules){0};
    assert_int_equal(claims("{\"aud\":7,\"iss\":false}", &r, 0), SL_JWT_CLAIMS_OK);
    /* the RFC 7515 payload: issuer joe, expired long ago */
    char *joe[] = {"joe"};
    r = (struct sl_jwt_rules){.issuers = joe, .issuer_count = 1};
    const char *p = "{\"iss\":\"joe\",\r\n \"exp\":1300819380,\r\n "
                    "\"http://example.com/is_root\":true}";
    assert_int_equal(claims(p, &r, 1300819380), SL_JWT_CLAIMS_OK);
    assert_int_equal(claims(p, &r, 1700000000), SL_JWT_EXPIRED);
}

static void test_claims_required_and_values(void **state)
{
    (void)state;
    char *req[] = {"sub", "tenant"};
    struct sl_jwt_rules r = {.required = req, .required_count = 2};
    assert_int_equal(claims("{\"sub\":\"u\",\"tenant\":3}", &r, 0), SL_JWT_CLAIMS_OK);
    assert_int_equal(claims("{\"sub\":\"u\"}", &r, 0), SL_JWT_CLAIM_MISSING);
    assert_int_equal(claims("{\"sub\":\"u\",\"tenant\":null}", &r, 0), SL_JWT_CLAIM_MISSING);

    char *names[] = {"role", "level", "admin", "ratio"};
    char *values[] = {"ops", "3", "true", "0.5"};
    r = (struct sl_jwt_rules){.claim_names = names, .claim_values = values, .claim_count = 4};
    assert_int_equal(claims("{\"role\":\"ops\",\"level\":3,\"admin\":true,\"ratio\":0.5}", &r, 0),
                     SL_JWT_CLAIMS_OK);
    assert_int_equal(
        claims("{\"role\":[\"dev\",\"ops\"],\"level\":[1,3],\"admin\":true,\"ratio\":0.5}", &r, 0),
        SL_JWT_CLAIMS_OK);
    assert_int_equal(claims("{\"role\":\"Ops\",\"level\":3,\"admin\":true,\"ratio\":0.5}", &r, 0),
                     SL_JWT_CLAIM_MISMATCH);
    assert_int_equal(
        claims("{\"role\":\"ops\",\"level\":\"3\",\"admin\":true,\"ratio\":0.5}", &r, 0),
        SL_JWT_CLAIMS_OK); /* the string "3" has the text 3 */
    assert_int_equal(claims("{\"role\":\"ops\",\"level\":3.0,\"admin\":true,\"ratio\":0.5}", &r, 0),
                     SL_JWT_CLAIMS_OK); /* 3.0 prints as 3 */
    assert_int_equal(claims("{\"role\":\"ops\",\"level\":4,\"admin\":true,\"ratio\":0.5}", &r, 0),
                     SL_JWT_CLAIM_MISMATCH);
    assert_int_equal(claims("{\"role\":\"ops\",\"level\":3,\"admin\":false,\"ratio\":0.5}", &r, 0),
                     SL_JWT_CLAIM_MISMATCH);
    assert_int_equal(claims("{\"role\":[],\"level\":3,\"admin\":true,\"ratio\":0.5}", &r, 0),
                     SL_JWT_CLAIM_MISMATCH);
    assert_int_equal(
        claims("{\"role\":{\"ops\":1},\"level\":3,\"admin\":true,\"ratio\":0.5}", &r, 0),
        SL_JWT_CLAIM_MISMATCH);
    assert_int_equal(claims("{\"level\":3,\"admin\":true,\"ratio\":0.5}", &r, 0),
                     SL_JWT_CLAIM_MISSING);
}

static void expect_flat(const unsigned char *flat, size_t len, const char *name, const char *want)
{
    struct sl_slice v;
    if (!want) {
        assert_false(sl_jwt_flat_get(flat, len, name, strlen(name), &v));
        return;
    }
    assert_true(sl_jwt_flat_get(flat, len, name, strlen(name), &v));
    assert_int_equal(v.len, strlen(want));
    assert_memory_equal(v.ptr, want, v.len);
}

/* Claims parse in the per-thread scratch allocator; a payload larger than the scratch spills
 * to malloc part-way, and both kinds of memory must be released correctly (ASan checks). */
static void test_claims_scratch_spill(void **state)
{
    (void)state;
    size_t cap = 8000 * 24 + 64, o = 0;
    char *p = malloc(cap);
    assert_non_null(p);
    o += (size_t)snprintf(p + o, cap - o, "{\"exp\":99");
    for (int i = 0; i < 8000; i++)
        o += (size_t)snprintf(p + o, cap - o, ",\"claim%05d\":\"v%d\"", i, i);
    o += (size_t)snprintf(p + o, cap - o, ",\"sub\":\"last\"}");
    unsigned char flat[64];
    for (int round = 0; round < 3; round++) {
        size_t flat_len = 0;
        int64_t exp = 0;
        assert_int_equal(sl_jwt_claims_check(p, o, NULL, 0, &exp, flat, sizeof flat, &flat_len),
                         SL_JWT_CLAIMS_OK);
        assert_int_equal(exp, 99);
        /* and a small one right after, entirely in scratch */
        const char *small = "{\"exp\":7,\"sub\":\"s\"}";
        assert_int_equal(
            sl_jwt_claims_check(small, strlen(small), NULL, 0, &exp, flat, sizeof flat, &flat_len),
            SL_JWT_CLAIMS_OK);
        assert_int_equal(exp, 7);
        expect_flat(flat, flat_len, "sub", "s");
    }
    free(p);
}

static void test_claims_flat(void **state)
{
    (void)state;
    const char *p = "{\"sub\":\"u\\\"1\\u00e9\",\"n\":-42,\"big\":9007199254740993,"
                    "\"r\":0.1,\"f\":5.0,\"e\":1e21,\"t\":true,\"no\":false,\"nil\":null,"
                    "\"arr\":[1],\"obj\":{\"a\":1},\"empty\":\"\",\"exp\":99}";
    unsigned char flat[512];
    size_t flat_len = 0;
    int64_t exp = 0;
    assert_int_equal(
        sl_jwt_claims_check(p, strlen(p), NULL, 0, &exp, flat, sizeof(flat), &flat_len),
        SL_JWT_CLAIMS_OK);
    assert_int_equal(exp, 99);
    expect_flat(flat, flat_len, "sub", "u\"1\xc3\xa9");
    expect_flat(flat, flat_len, "n", "-42");
    expect_flat(flat, flat_len, "big", "9007199254740993");
    expect_flat(flat, flat_len, "r", "0.1");
    expect_flat(flat, flat_len, "f", "5");
    expect_flat(flat, flat_len, "e", "1e+21");
    expect_flat(flat, flat_len, "t", "true");
    expect_flat(flat, flat_len, "no", "false");
    expect_flat(flat, flat_len, "empty", "");
    expect_flat(flat, flat_len, "exp", "99");
    expect_flat(flat, flat_len, "nil", NULL);
    expect_flat(flat, flat_len, "arr", NULL);
    expect_flat(flat, flat_len, "obj", NULL);
    expect_flat(flat, flat_len, "su", NULL);
    expect_flat(flat, flat_len, "subx", NULL);

    /* a small blob keeps what fits: the long claim is skipped, later ones still recorded */
    const char *q = "{\"a\":\"1\",\"long\":\"0123456789012345678901234567890123456789\","
                    "\"b\":2}";
    size_t cap = (4 + 1 + 1) * 2;
    assert_int_equal(sl_jwt_claims_check(q, strlen(q), NULL, 0, &exp, flat, cap, &flat_len),
                     SL_JWT_CLAIMS_OK);
    assert_int_equal(flat_len, cap);
    assert_int_equal(exp, 0);
    expect_flat(flat, flat_len, "a", "1");
    expect_flat(flat, flat_len, "b", "2");
    expect_flat(flat, flat_len, "long", NULL);
    /* a truncated blob is never read past its end */
    expect_flat(flat, flat_len - 1, "b", NULL);
    expect_flat(flat, 3, "a", NULL);
    /* failure writes no blob */
    struct sl_jwt_rules r = {.require_exp = true};
    flat_len = 77;
    assert_int_equal(sl_jwt_claims_check(q, strlen(q), &r, 0, &exp, flat, sizeof(flat), &flat_len),
                     SL_JWT_EXPIRED);
    assert_int_equal(flat_len, 0);
}

int main(void)
{
    /* one test per line reads better than the columns clang-format would pack */
    // clang-format off
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_b64_valid),
        cmocka_unit_test(test_b64_invalid),
        cmocka_unit_test(test_rfc7515_a1_hs256),
        cmocka_unit_test(test_rfc7515_a2_rs256),
        cmocka_unit_test(test_rfc7515_a3_es256),
        cmocka_unit_test(test_rfc8037_ed25519),
        cmocka_unit_test(test_every_prefix_and_change_fails),
        cmocka_unit_test(test_rsa_algs),
        cmocka_unit_test(test_ec_ed_algs),
        cmocka_unit_test(test_hmac_algs),
        cmocka_unit_test(test_alg_none_and_crit),
        cmocka_unit_test(test_token_shape),
        cmocka_unit_test(test_alg_confusion),
        cmocka_unit_test(test_jwk_alg_narrows),
        cmocka_unit_test(test_es256_sig_length),
        cmocka_unit_test(test_kid_lookup),
        cmocka_unit_test(test_jwks_rules),
        cmocka_unit_test(test_rsa_1024_rejected),
        cmocka_unit_test(test_ec_point_off_curve),
        cmocka_unit_test(test_pem_forms),
        cmocka_unit_test(test_claims_time),
        cmocka_unit_test(test_claims_iss_aud),
        cmocka_unit_test(test_claims_required_and_values),
        cmocka_unit_test(test_claims_flat),
        cmocka_unit_test(test_claims_scratch_spill),
    };
    // clang-format on
    return cmocka_run_group_tests(tests, setup_keys, teardown_keys);
}
