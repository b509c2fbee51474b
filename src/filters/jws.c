/*
 * JWS verification, JWK parsing and JWT claim checks on OpenSSL 3 and jansson.
 *
 * Only non-deprecated OpenSSL 3 interfaces are used; OPENSSL_NO_DEPRECATED below makes the
 * compiler enforce that (a deprecated call does not even get a declaration).
 *
 * Every OpenSSL failure path ends with ERR_clear_error(): verification runs on worker threads
 * that also drive TLS, and a stale entry in the thread's error queue makes a later
 * SSL_get_error() report a bogus SSL_ERROR_SSL on an unrelated connection.
 *
 * Flat claims blob (sl_jwt_claims_check -> sl_jwt_flat_get): a sequence of records
 *     name_len (2 bytes, big-endian) | value_len (2 bytes, big-endian) | name | value
 * with no padding and no terminator. Only top-level string, number and boolean claims are
 * recorded; a name or value longer than 65535 bytes, or a record that would overflow
 * `flat_cap`, is left out and the following claims still get their chance.
 */
#define OPENSSL_API_COMPAT 30000
#define OPENSSL_NO_DEPRECATED

#include "filters/jws.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/decoder.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "core/fmt.h"
#include "filters/json_scratch.h"

/* ---- algorithms ---- */

static const struct {
    unsigned bit;
    const char *name;
} alg_names[] = {
    {SL_JWS_HS256, "HS256"}, {SL_JWS_HS384, "HS384"}, {SL_JWS_HS512, "HS512"},
    {SL_JWS_RS256, "RS256"}, {SL_JWS_RS384, "RS384"}, {SL_JWS_RS512, "RS512"},
    {SL_JWS_PS256, "PS256"}, {SL_JWS_PS384, "PS384"}, {SL_JWS_PS512, "PS512"},
    {SL_JWS_ES256, "ES256"}, {SL_JWS_ES384, "ES384"}, {SL_JWS_EDDSA, "EdDSA"},
};

#define ALG_SHA256 (SL_JWS_HS256 | SL_JWS_RS256 | SL_JWS_PS256 | SL_JWS_ES256)
#define ALG_SHA384 (SL_JWS_HS384 | SL_JWS_RS384 | SL_JWS_PS384 | SL_JWS_ES384)
#define ALG_SHA512 (SL_JWS_HS512 | SL_JWS_RS512 | SL_JWS_PS512)
#define ALG_RS (SL_JWS_RS256 | SL_JWS_RS384 | SL_JWS_RS512)
#define ALG_PS (SL_JWS_PS256 | SL_JWS_PS384 | SL_JWS_PS512)
#define ALG_ES (SL_JWS_ES256 | SL_JWS_ES384)

/* RFC 7518 §4.2 says larger keys only add cost; OpenSSL refuses beyond this anyway, and the
 * bound keeps a hostile JWKS from making every verification slow. */
#define RSA_MIN_BITS 2048
#define RSA_MAX_BITS 16384

unsigned sl_jws_alg_from_name(const char *name, size_t len)
{
    if (!name)
        return 0;
    for (size_t i = 0; i < sizeof(alg_names) / sizeof(alg_names[0]); i++)
        if (strlen(alg_names[i].name) == len && memcmp(alg_names[i].name, name, len) == 0)
            return alg_names[i].bit;
    return 0;
}

const char *sl_jws_alg_name(unsigned alg)
{
    for (size_t i = 0; i < sizeof(alg_names) / sizeof(alg_names[0]); i++)
        if (alg_names[i].bit == alg)
            return alg_names[i].name;
    return "?";
}

static const EVP_MD *alg_md(unsigned alg)
{
    if (alg & ALG_SHA256)
        return EVP_sha256();
    if (alg & ALG_SHA384)
        return EVP_sha384();
    if (alg & ALG_SHA512)
        return EVP_sha512();
    return NULL;
}

/* HMAC algorithms a secret of `len` bytes may serve: RFC 7518 §3.2 requires a key at least
 * as long as the hash output, so a short secret cannot be brute-forced offline as easily. */
static unsigned hmac_algs_for_len(size_t len)
{
    unsigned a = 0;
    if (len >= 32)
        a |= SL_JWS_HS256;
    if (len >= 48)
        a |= SL_JWS_HS384;
    if (len >= 64)
        a |= SL_JWS_HS512;
    return a;
}

static bool is_single_alg(unsigned alg)
{
    return alg != 0 && (alg & (alg - 1)) == 0 && (alg & ~SL_JWS_ALL_ALGS) == 0;
}

/* ---- base64url ---- */

static int b64_val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

/* Exact decoded size for a length that is not 1 mod 4. */
static size_t b64_decoded_len(size_t len)
{
    return len / 4 * 3 + (len % 4 ? len % 4 - 1 : 0);
}

/* Validates and, when `out` is not NULL, decodes (out holds b64_decoded_len(len) bytes). */
static int b64_run(const char *in, size_t len, unsigned char *out)
{
    uint32_t acc = 0;
    unsigned n = 0;
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        int v = b64_val((unsigned char)in[i]);
        if (v < 0)
            return -EINVAL;
        acc = (acc << 6) | (uint32_t)v;
        if (++n == 4) {
            if (out) {
                out[o] = (unsigned char)(acc >> 16);
                out[o + 1] = (unsigned char)(acc >> 8);
                out[o + 2] = (unsigned char)acc;
            }
            o += 3;
            n = 0;
            acc = 0;
        }
    }
    switch (n) {
    case 0:
        break;
    case 2: /* 12 bits: one byte and 4 unused bits */
        if (acc & 0xf)
            return -EINVAL;
        if (out)
            out[o] = (unsigned char)(acc >> 4);
        break;
    case 3: /* 18 bits: two bytes and 2 unused bits */
        if (acc & 0x3)
            return -EINVAL;
        if (out) {
            out[o] = (unsigned char)(acc >> 10);
            out[o + 1] = (unsigned char)(acc >> 2);
        }
        break;
    default:
        return -EINVAL;
    }
    return 0;
}

int sl_b64url_decode(const char *in, size_t len, unsigned char *out, size_t cap, size_t *out_len)
{
    if (len % 4 == 1 || (!in && len))
        return -EINVAL;
    size_t need = b64_decoded_len(len);
    if (need > cap || (!out && need)) {
        /* bad input is reported as bad whatever the buffer size */
        int rc = b64_run(in, len, NULL);
        return rc ? rc : -ENOSPC;
    }
    int rc = b64_run(in, len, out);
    if (rc)
        return rc;
    if (out_len)
        *out_len = need;
    return 0;
}

size_t sl_b64url_encode(const unsigned char *in, size_t len, char *out, size_t cap)
{
    static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    if (len > SIZE_MAX / 4 * 3 - 3)
        return 0;
    size_t need = len / 3 * 4 + (len % 3 ? len % 3 + 1 : 0);
    if (need > cap || (len && (!in || !out)))
        return 0;
    size_t o = 0, i = 0;
    for (; i + 3 <= len; i += 3) {
        uint32_t v = ((uint32_t)in[i] << 16) | ((uint32_t)in[i + 1] << 8) | in[i + 2];
        out[o++] = abc[(v >> 18) & 63];
        out[o++] = abc[(v >> 12) & 63];
        out[o++] = abc[(v >> 6) & 63];
        out[o++] = abc[v & 63];
    }
    if (len - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = abc[(v >> 18) & 63];
        out[o++] = abc[(v >> 12) & 63];
    } else if (len - i == 2) {
        uint32_t v = ((uint32_t)in[i] << 16) | ((uint32_t)in[i + 1] << 8);
        out[o++] = abc[(v >> 18) & 63];
        out[o++] = abc[(v >> 12) & 63];
        out[o++] = abc[(v >> 6) & 63];
    }
    return o;
}

/* ---- small helpers ---- */

/* A stable 64-bit identity of key material: the first 8 bytes of its SHA-256. */
static uint64_t fingerprint(const unsigned char *b, size_t n)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    uint64_t fp = 0;
    if (EVP_Digest(b, n, md, &md_len, EVP_sha256(), NULL) == 1 && md_len >= 8)
        for (int i = 0; i < 8; i++)
            fp = (fp << 8) | md[i];
    ERR_clear_error();
    return fp;
}

static uint64_t pkey_fingerprint(EVP_PKEY *pkey)
{
    unsigned char *der = NULL;
    int n = i2d_PUBKEY(pkey, &der);
    uint64_t fp = n > 0 ? fingerprint(der, (size_t)n) : 0;
    OPENSSL_free(der);
    ERR_clear_error();
    return fp;
}

/* ES256/ES384 for a P-256/P-384 key, 0 for any other key or curve. */
static unsigned ec_curve_alg(EVP_PKEY *pkey)
{
    char name[64];
    size_t n = 0;
    if (!EVP_PKEY_is_a(pkey, "EC") ||
        EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, name, sizeof(name), &n) !=
            1) {
        ERR_clear_error();
        return 0;
    }
    if (strcmp(name, "prime256v1") == 0 || strcmp(name, "P-256") == 0)
        return SL_JWS_ES256;
    if (strcmp(name, "secp384r1") == 0 || strcmp(name, "P-384") == 0)
        return SL_JWS_ES384;
    return 0;
}

/* Algorithms a public key may verify, from its type alone (0 = unsupported). */
static unsigned pkey_algs(EVP_PKEY *pkey, const char **why)
{
    if (EVP_PKEY_is_a(pkey, "RSA") || EVP_PKEY_is_a(pkey, "RSA-PSS")) {
        int bits = EVP_PKEY_get_bits(pkey);
        if (bits < RSA_MIN_BITS) {
            *why = "RSA key shorter than 2048 bits";
            return 0;
        }
        if (bits > RSA_MAX_BITS) {
            *why = "RSA key longer than 16384 bits";
            return 0;
        }
        /* an RSASSA-PSS-only key (id-RSASSA-PSS) must not verify PKCS#1 v1.5 signatures */
        return EVP_PKEY_is_a(pkey, "RSA") ? SL_JWS_RSA_ALGS : ALG_PS;
    }
    if (EVP_PKEY_is_a(pkey, "EC")) {
        unsigned a = ec_curve_alg(pkey);
        if (!a)
            *why = "unsupported EC curve (P-256 and P-384 only)";
        return a;
    }
    if (EVP_PKEY_is_a(pkey, "ED25519"))
        return SL_JWS_EDDSA;
    *why = "unsupported key type";
    return 0;
}

/* ---- JWK ---- */

/* Decodes the base64url string member `name` of `o` into a fresh buffer (caller frees).
 * NULL when absent, not a string, empty or not strict base64url. */
static unsigned char *b64_member(json_t *o, const char *name, size_t *out_len)
{
    json_t *v = json_object_get(o, name);
    if (!json_is_string(v))
        return NULL;
    const char *s = json_string_value(v);
    size_t n = json_string_length(v);
    if (n == 0 || n % 4 == 1)
        return NULL;
    size_t cap = b64_decoded_len(n);
    unsigned char *buf = malloc(cap);
    if (!buf)
        return NULL;
    if (sl_b64url_decode(s, n, buf, cap, out_len) != 0) {
        free(buf);
        return NULL;
    }
    return buf;
}

static EVP_PKEY *pkey_fromdata(const char *type, OSSL_PARAM_BLD *bld)
{
    OSSL_PARAM *params = OSSL_PARAM_BLD_to_param(bld);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, type, NULL);
    EVP_PKEY *pkey = NULL;
    if (!params || !ctx || EVP_PKEY_fromdata_init(ctx) != 1 ||
        EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) != 1) {
        EVP_PKEY_free(pkey);
        pkey = NULL;
    }
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    ERR_clear_error();
    return pkey;
}

static EVP_PKEY *rsa_from_jwk(json_t *o, unsigned *algs, const char **why)
{
    size_t nl = 0, el = 0;
    unsigned char *nb = b64_member(o, "n", &nl);
    unsigned char *eb = b64_member(o, "e", &el);
    BIGNUM *n = NULL, *e = NULL;
    OSSL_PARAM_BLD *bld = NULL;
    EVP_PKEY *pkey = NULL;
    *why = "RSA key without valid n and e";
    if (!nb || !eb || nl > RSA_MAX_BITS / 8 + 1 || el > 8)
        goto out;
    n = BN_bin2bn(nb, (int)nl, NULL);
    e = BN_bin2bn(eb, (int)el, NULL);
    if (!n || !e)
        goto out;
    if (BN_num_bits(n) < RSA_MIN_BITS) {
        *why = "RSA key shorter than 2048 bits";
        goto out;
    }
    if (BN_num_bits(n) > RSA_MAX_BITS) {
        *why = "RSA key longer than 16384 bits";
        goto out;
    }
    if (!BN_is_odd(e) || BN_num_bits(e) < 2 || !BN_is_odd(n)) {
        *why = "RSA key with an invalid modulus or exponent";
        goto out;
    }
    bld = OSSL_PARAM_BLD_new();
    if (!bld || OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, n) != 1 ||
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, e) != 1)
        goto out;
    pkey = pkey_fromdata("RSA", bld);
    if (!pkey)
        *why = "RSA key rejected by OpenSSL";
    *algs = SL_JWS_RSA_ALGS;
out:
    OSSL_PARAM_BLD_free(bld);
    BN_free(n);
    BN_free(e);
    free(nb);
    free(eb);
    ERR_clear_error();
    return pkey;
}

static EVP_PKEY *ec_from_jwk(json_t *o, unsigned *algs, const char **why)
{
    json_t *crv = json_object_get(o, "crv");
    const char *group;
    size_t size;
    unsigned alg;
    if (json_is_string(crv) && strcmp(json_string_value(crv), "P-256") == 0) {
        group = "prime256v1";
        size = 32;
        alg = SL_JWS_ES256;
    } else if (json_is_string(crv) && strcmp(json_string_value(crv), "P-384") == 0) {
        group = "secp384r1";
        size = 48;
        alg = SL_JWS_ES384;
    } else {
        *why = "unsupported EC curve (P-256 and P-384 only)";
        return NULL;
    }
    size_t xl = 0, yl = 0;
    unsigned char *x = b64_member(o, "x", &xl);
    unsigned char *y = b64_member(o, "y", &yl);
    OSSL_PARAM_BLD *bld = NULL;
    EVP_PKEY *pkey = NULL;
    EVP_PKEY_CTX *chk = NULL;
    unsigned char pt[1 + 2 * 48];
    *why = "EC key without x and y of the curve's size";
    /* RFC 7518 §6.2.1.2: coordinates are always the full field size, never shortened */
    if (!x || !y || xl != size || yl != size)
        goto out;
    pt[0] = 0x04; /* uncompressed point */
    memcpy(pt + 1, x, size);
    memcpy(pt + 1 + size, y, size);
    bld = OSSL_PARAM_BLD_new();
    if (!bld || OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, group, 0) != 1 ||
        OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pt, 1 + 2 * size) != 1)
        goto out;
    *why = "EC point not on the curve";
    pkey = pkey_fromdata("EC", bld);
    if (!pkey)
        goto out;
    /* an off-curve or small-subgroup point would leak nothing here (we only verify), but a
     * key OpenSSL considers invalid is a broken JWKS and is better refused at load */
    chk = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL);
    if (!chk || EVP_PKEY_public_check(chk) != 1) {
        EVP_PKEY_free(pkey);
        pkey = NULL;
        goto out;
    }
    *algs = alg;
out:
    EVP_PKEY_CTX_free(chk);
    OSSL_PARAM_BLD_free(bld);
    free(x);
    free(y);
    ERR_clear_error();
    return pkey;
}

static EVP_PKEY *okp_from_jwk(json_t *o, unsigned *algs, const char **why)
{
    json_t *crv = json_object_get(o, "crv");
    if (!json_is_string(crv) || strcmp(json_string_value(crv), "Ed25519") != 0) {
        *why = "unsupported OKP curve (Ed25519 only)";
        return NULL;
    }
    size_t xl = 0;
    unsigned char *x = b64_member(o, "x", &xl);
    EVP_PKEY *pkey = NULL;
    *why = "Ed25519 key without a 32-byte x";
    if (x && xl == 32)
        pkey = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, x, xl);
    free(x);
    ERR_clear_error();
    if (pkey)
        *algs = SL_JWS_EDDSA;
    return pkey;
}

static void jwk_dispose(struct sl_jwk *k)
{
    EVP_PKEY_free(k->pkey);
    if (k->secret)
        OPENSSL_clear_free(k->secret, k->secret_len);
    free(k->kid);
    memset(k, 0, sizeof(*k));
}

static bool has_verify_op(json_t *ops)
{
    size_t i;
    json_t *v;
    if (!json_is_array(ops))
        return false;
    json_array_foreach(ops, i, v)
    {
        if (json_is_string(v) && strcmp(json_string_value(v), "verify") == 0)
            return true;
    }
    return false;
}

/* Fills `k` from one JWK object. false with a reason in *why when the key is to be skipped. */
static bool jwk_from_json(json_t *o, bool allow_oct, struct sl_jwk *k, const char **why)
{
    memset(k, 0, sizeof(*k));
    if (!json_is_object(o)) {
        *why = "key is not an object";
        return false;
    }
    json_t *kty = json_object_get(o, "kty");
    json_t *use = json_object_get(o, "use");
    json_t *ops = json_object_get(o, "key_ops");
    json_t *kid = json_object_get(o, "kid");
    json_t *alg = json_object_get(o, "alg");
    if (!json_is_string(kty)) {
        *why = "key without kty";
        return false;
    }
    if (use && !(json_is_string(use) && strcmp(json_string_value(use), "sig") == 0)) {
        *why = "key use is not sig";
        return false;
    }
    if (ops && !has_verify_op(ops)) {
        *why = "key_ops without verify";
        return false;
    }
    if (kid && !json_is_string(kid)) {
        *why = "kid is not a string";
        return false;
    }
    unsigned narrow = SL_JWS_ALL_ALGS;
    if (alg) {
        narrow = json_is_string(alg)
                     ? sl_jws_alg_from_name(json_string_value(alg), json_string_length(alg))
                     : 0;
        if (!narrow) {
            *why = "unsupported alg";
            return false;
        }
    }

    const char *t = json_string_value(kty);
    if (strcmp(t, "RSA") == 0) {
        k->pkey = rsa_from_jwk(o, &k->algs, why);
    } else if (strcmp(t, "EC") == 0) {
        k->pkey = ec_from_jwk(o, &k->algs, why);
    } else if (strcmp(t, "OKP") == 0) {
        k->pkey = okp_from_jwk(o, &k->algs, why);
    } else if (strcmp(t, "oct") == 0) {
        if (!allow_oct) {
            *why = "oct (shared secret) keys are not accepted from this source";
            return false;
        }
        k->secret = b64_member(o, "k", &k->secret_len);
        if (!k->secret) {
            *why = "oct key without a valid k";
            return false;
        }
        k->algs = hmac_algs_for_len(k->secret_len);
        if (!k->algs) {
            *why = "oct key shorter than 32 bytes";
            jwk_dispose(k);
            return false;
        }
    } else {
        *why = "unsupported kty";
        return false;
    }
    if (!k->pkey && !k->secret)
        return false;

    k->algs &= narrow;
    if (!k->algs) {
        *why = "alg does not fit the key";
        jwk_dispose(k);
        return false;
    }
    if (kid) {
        k->kid = strndup(json_string_value(kid), json_string_length(kid));
        if (!k->kid) {
            *why = "out of memory";
            jwk_dispose(k);
            return false;
        }
    }
    k->fingerprint = k->pkey ? pkey_fingerprint(k->pkey) : fingerprint(k->secret, k->secret_len);
    return true;
}

static struct sl_jwks *jwks_alloc(size_t cap)
{
    struct sl_jwks *ks = calloc(1, sizeof(*ks));
    if (!ks)
        return NULL;
    ks->keys = calloc(cap ? cap : 1, sizeof(*ks->keys));
    if (!ks->keys) {
        free(ks);
        return NULL;
    }
    atomic_init(&ks->refs, 1u);
    return ks;
}

static void jwks_free(struct sl_jwks *ks)
{
    for (size_t i = 0; i < ks->count; i++)
        jwk_dispose(&ks->keys[i]);
    free(ks->keys);
    free(ks);
}

/* Identity providers publish a handful of keys; the bound keeps a hostile set of tiny entries
 * from costing a key slot (and RSA/EC import work) each. */
#define JWKS_MAX_KEYS 1024

struct sl_jwks *sl_jwks_parse(const char *json, size_t len, bool allow_oct, char *err,
                              size_t err_len)
{
    json_error_t jerr;
    if (!json) {
        sl_fmt_err(err, err_len, "no JSON");
        return NULL;
    }
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        /* jerr.text quotes input, which may be secret key material: position only */
        sl_fmt_err(err, err_len, "invalid JSON at line %d column %d", jerr.line, jerr.column);
        return NULL;
    }
    struct sl_jwks *ks = NULL;
    json_t *keys = json_is_object(root) ? json_object_get(root, "keys") : NULL;
    size_t n;
    if (keys) {
        if (!json_is_array(keys)) {
            sl_fmt_err(err, err_len, "\"keys\" is not an array");
            goto out;
        }
        n = json_array_size(keys);
        if (n > JWKS_MAX_KEYS) {
            sl_fmt_err(err, err_len, "more than %d keys in the set", JWKS_MAX_KEYS);
            goto out;
        }
    } else if (json_is_object(root) && json_object_get(root, "kty")) {
        n = 1;
    } else {
        sl_fmt_err(err, err_len, "neither a JWK Set nor a JWK");
        goto out;
    }
    ks = jwks_alloc(n);
    if (!ks) {
        sl_fmt_err(err, err_len, "out of memory");
        goto out;
    }
    const char *why = "empty key set";
    for (size_t i = 0; i < n; i++) {
        json_t *o = keys ? json_array_get(keys, i) : root;
        const char *w = NULL;
        if (jwk_from_json(o, allow_oct, &ks->keys[ks->count], &w)) {
            ks->count++;
        } else {
            ks->skipped++;
            why = w ? w : "invalid key";
        }
    }
    if (ks->count == 0) {
        sl_fmt_err(err, err_len, "no usable key (%zu skipped; last: %s)", ks->skipped, why);
        jwks_free(ks);
        ks = NULL;
    }
out:
    json_decref(root);
    return ks;
}

struct sl_jwks *sl_jwks_from_secret(const unsigned char *secret, size_t len, unsigned algs,
                                    char *err, size_t err_len)
{
    if (!secret || len == 0) {
        sl_fmt_err(err, err_len, "empty secret");
        return NULL;
    }
    if (algs & ~SL_JWS_HMAC_ALGS) {
        sl_fmt_err(err, err_len, "a secret only serves HS256, HS384 and HS512");
        return NULL;
    }
    unsigned a = hmac_algs_for_len(len) & (algs ? algs : SL_JWS_HMAC_ALGS);
    if (!a) {
        sl_fmt_err(err, err_len,
                   "secret too short: HS256/HS384/HS512 need at least 32/48/64 bytes");
        return NULL;
    }
    struct sl_jwks *ks = jwks_alloc(1);
    unsigned char *copy = malloc(len);
    if (!ks || !copy) {
        free(copy);
        if (ks)
            jwks_free(ks);
        sl_fmt_err(err, err_len, "out of memory");
        return NULL;
    }
    memcpy(copy, secret, len);
    ks->keys[0] = (struct sl_jwk){
        .algs = a,
        .secret = copy,
        .secret_len = len,
        .fingerprint = fingerprint(secret, len),
    };
    ks->count = 1;
    return ks;
}

static EVP_PKEY *pem_pubkey(const char *pem, size_t len)
{
    EVP_PKEY *pkey = NULL;
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    if (bio)
        pkey = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
    BIO_free(bio);
    if (pkey)
        return pkey;

    /* PKCS#1 "RSA PUBLIC KEY": the type-specific structure, through the decoder API */
    OSSL_DECODER_CTX *dctx = OSSL_DECODER_CTX_new_for_pkey(&pkey, "PEM", "type-specific", "RSA",
                                                           EVP_PKEY_PUBLIC_KEY, NULL, NULL);
    const unsigned char *data = (const unsigned char *)pem;
    size_t left = len;
    if (dctx && OSSL_DECODER_from_data(dctx, &data, &left) != 1) {
        EVP_PKEY_free(pkey);
        pkey = NULL;
    }
    OSSL_DECODER_CTX_free(dctx);
    if (pkey)
        return pkey;

    bio = BIO_new_mem_buf(pem, (int)len);
    X509 *cert = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    if (cert)
        pkey = X509_get_pubkey(cert);
    X509_free(cert);
    return pkey;
}

struct sl_jwks *sl_jwks_from_pem(const char *pem, size_t len, unsigned algs, char *err,
                                 size_t err_len)
{
    if (!pem || len == 0 || len > INT_MAX) {
        sl_fmt_err(err, err_len, "empty or oversized PEM");
        return NULL;
    }
    EVP_PKEY *pkey = pem_pubkey(pem, len);
    ERR_clear_error();
    if (!pkey) {
        sl_fmt_err(err, err_len, "no PUBLIC KEY, RSA PUBLIC KEY or CERTIFICATE in PEM");
        return NULL;
    }
    const char *why = "unsupported key";
    unsigned a = pkey_algs(pkey, &why);
    if (a && algs)
        a &= algs;
    if (!a) {
        if (algs && pkey_algs(pkey, &why))
            why = "none of the configured algorithms fits this key";
        sl_fmt_err(err, err_len, "%s", why);
        EVP_PKEY_free(pkey);
        return NULL;
    }
    struct sl_jwks *ks = jwks_alloc(1);
    if (!ks) {
        EVP_PKEY_free(pkey);
        sl_fmt_err(err, err_len, "out of memory");
        return NULL;
    }
    ks->keys[0] = (struct sl_jwk){
        .algs = a,
        .pkey = pkey,
        .fingerprint = pkey_fingerprint(pkey),
    };
    ks->count = 1;
    return ks;
}

void sl_jwks_ref(struct sl_jwks *ks)
{
    if (ks)
        atomic_fetch_add_explicit(&ks->refs, 1u, memory_order_relaxed);
}

void sl_jwks_unref(struct sl_jwks *ks)
{
    if (!ks)
        return;
    /* acq_rel: the freeing thread must see every other holder's last use of the set */
    if (atomic_fetch_sub_explicit(&ks->refs, 1u, memory_order_acq_rel) == 1u)
        jwks_free(ks);
}

const struct sl_jwk *sl_jwks_find(const struct sl_jwks *ks, struct sl_slice kid, unsigned alg)
{
    if (!ks || !is_single_alg(alg))
        return NULL;
    const struct sl_jwk *found = NULL;
    for (size_t i = 0; i < ks->count; i++) {
        const struct sl_jwk *k = &ks->keys[i];
        if (!(k->algs & alg))
            continue;
        if (kid.len) {
            if (k->kid && strlen(k->kid) == kid.len && memcmp(k->kid, kid.ptr, kid.len) == 0)
                return k;
            continue;
        }
        /* no kid: trying several keys would let a token pick its verifier; demand one */
        if (found)
            return NULL;
        found = k;
    }
    return found;
}

/* ---- JWS ---- */

const char *sl_jws_status_name(enum sl_jws_status st)
{
    switch (st) {
    case SL_JWS_OK:
        return "ok";
    case SL_JWS_MALFORMED:
        return "malformed";
    case SL_JWS_TOO_LARGE:
        return "too_large";
    case SL_JWS_BAD_ALG:
        return "bad_alg";
    case SL_JWS_UNKNOWN_KID:
        return "unknown_kid";
    case SL_JWS_BAD_SIGNATURE:
        return "bad_signature";
    }
    return "unknown";
}

/* Reads the decoded protected header; copies the kid over the header bytes in `kid_dst`
 * (jansson holds its own copy by then). */
static enum sl_jws_status check_header(json_t *h, unsigned allowed, unsigned *alg_out,
                                       unsigned char *kid_dst, size_t kid_cap, size_t *kid_len)
{
    if (!json_is_object(h))
        return SL_JWS_MALFORMED;
    json_t *alg = json_object_get(h, "alg");
    if (!json_is_string(alg))
        return SL_JWS_MALFORMED;
    unsigned a = sl_jws_alg_from_name(json_string_value(alg), json_string_length(alg));
    if (!a || !(a & allowed))
        return SL_JWS_BAD_ALG;
    /* we implement no extension, so any critical one must make the token unacceptable */
    if (json_object_get(h, "crit"))
        return SL_JWS_BAD_ALG;
    json_t *typ = json_object_get(h, "typ");
    if (typ) {
        if (!json_is_string(typ))
            return SL_JWS_MALFORMED;
        struct sl_slice t = sl_slice_make(json_string_value(typ), json_string_length(typ));
        if (!sl_slice_ieq_cstr(t, "JWT") && !sl_slice_ieq_cstr(t, "at+jwt"))
            return SL_JWS_MALFORMED;
    }
    json_t *kid = json_object_get(h, "kid");
    *kid_len = 0;
    if (kid) {
        if (!json_is_string(kid))
            return SL_JWS_MALFORMED;
        size_t n = json_string_length(kid);
        if (n > kid_cap) /* cannot happen: the JSON text is longer than any string in it */
            return SL_JWS_MALFORMED;
        memcpy(kid_dst, json_string_value(kid), n);
        *kid_len = n;
    }
    *alg_out = a;
    return SL_JWS_OK;
}

enum sl_jws_status sl_jws_parse(const char *token, size_t len, unsigned allowed_algs,
                                unsigned char *scratch, size_t scratch_cap,
                                struct sl_jws_parsed *out)
{
    memset(out, 0, sizeof(*out));
    if (!token || len == 0)
        return SL_JWS_MALFORMED;
    const char *end = token + len;
    const char *d1 = memchr(token, '.', len);
    if (!d1)
        return SL_JWS_MALFORMED;
    const char *d2 = memchr(d1 + 1, '.', (size_t)(end - (d1 + 1)));
    if (!d2 || memchr(d2 + 1, '.', (size_t)(end - (d2 + 1))))
        return SL_JWS_MALFORMED;
    size_t hl = (size_t)(d1 - token), pl = (size_t)(d2 - d1 - 1), sl = (size_t)(end - d2 - 1);
    if (hl == 0 || sl == 0 || hl % 4 == 1 || pl % 4 == 1 || sl % 4 == 1)
        return SL_JWS_MALFORMED;
    size_t hn = b64_decoded_len(hl), pn = b64_decoded_len(pl), sn = b64_decoded_len(sl);
    /* each part is shorter than the token, so the sum cannot overflow */
    if (hn + pn + sn > scratch_cap || !scratch)
        return SL_JWS_TOO_LARGE;
    unsigned char *pay = scratch, *sig = scratch + pn, *hdr = sig + sn;
    if (b64_run(token, hl, hdr) != 0)
        return SL_JWS_MALFORMED;

    json_error_t jerr;
    sl_json_scratch_begin();
    json_t *h = json_loadb((const char *)hdr, hn, JSON_REJECT_DUPLICATES, &jerr);
    if (!h) {
        sl_json_scratch_end();
        return SL_JWS_MALFORMED;
    }
    unsigned alg = 0;
    size_t kid_len = 0;
    enum sl_jws_status st = check_header(h, allowed_algs, &alg, hdr, hn, &kid_len);
    json_decref(h);
    sl_json_scratch_end();
    if (st != SL_JWS_OK)
        return st;
    if (b64_run(d1 + 1, pl, pay) != 0 || b64_run(d2 + 1, sl, sig) != 0)
        return SL_JWS_MALFORMED;

    out->signing_input = sl_slice_make(token, (size_t)(d2 - token));
    out->payload = sl_slice_make((const char *)pay, pn);
    out->sig = sig;
    out->sig_len = sn;
    out->alg = alg;
    out->kid = sl_slice_make(kid_len ? (const char *)hdr : NULL, kid_len);
    return SL_JWS_OK;
}

static enum sl_jws_status verify_hmac(const struct sl_jws_parsed *p, const struct sl_jwk *key)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    if (!key->secret || key->secret_len == 0 || key->secret_len > INT_MAX)
        return SL_JWS_BAD_SIGNATURE;
    const unsigned char *data = (const unsigned char *)p->signing_input.ptr;
    if (!HMAC(alg_md(p->alg), key->secret, (int)key->secret_len, data, p->signing_input.len, md,
              &md_len)) {
        ERR_clear_error();
        return SL_JWS_BAD_SIGNATURE;
    }
    /* the length is public (it follows from alg); only the bytes need constant time */
    bool ok = p->sig_len == md_len && CRYPTO_memcmp(md, p->sig, md_len) == 0;
    OPENSSL_cleanse(md, sizeof(md));
    return ok ? SL_JWS_OK : SL_JWS_BAD_SIGNATURE;
}

static bool digest_verify(EVP_PKEY *pkey, const EVP_MD *md, bool pss, const unsigned char *sig,
                          size_t sig_len, const struct sl_slice data)
{
    EVP_MD_CTX *mctx = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pctx = NULL;
    bool ok = false;
    if (!mctx || EVP_DigestVerifyInit(mctx, &pctx, md, NULL, pkey) != 1)
        goto out;
    /* RFC 7518 §3.5: salt as long as the hash, MGF1 with the same hash */
    if (pss && (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) != 1 ||
                EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) != 1 ||
                EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, md) != 1))
        goto out;
    ok = EVP_DigestVerify(mctx, sig, sig_len, (const unsigned char *)data.ptr, data.len) == 1;
out:
    EVP_MD_CTX_free(mctx);
    ERR_clear_error();
    return ok;
}

/* JOSE carries ECDSA signatures as fixed-size r||s (RFC 7518 §3.4); OpenSSL wants DER. */
static bool verify_ecdsa(EVP_PKEY *pkey, unsigned alg, const struct sl_jws_parsed *p)
{
    size_t half = alg == SL_JWS_ES256 ? 32 : 48;
    if (p->sig_len != 2 * half || ec_curve_alg(pkey) != alg)
        return false;
    ECDSA_SIG *es = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(p->sig, (int)half, NULL);
    BIGNUM *s = BN_bin2bn(p->sig + half, (int)half, NULL);
    unsigned char *der = NULL;
    bool ok = false;
    if (!es || !r || !s || ECDSA_SIG_set0(es, r, s) != 1)
        goto fail;
    r = s = NULL; /* owned by es now */
    int der_len = i2d_ECDSA_SIG(es, &der);
    if (der_len > 0)
        ok = digest_verify(pkey, alg_md(alg), false, der, (size_t)der_len, p->signing_input);
fail:
    OPENSSL_free(der);
    BN_free(r);
    BN_free(s);
    ECDSA_SIG_free(es);
    ERR_clear_error();
    return ok;
}

enum sl_jws_status sl_jws_verify(const struct sl_jws_parsed *p, const struct sl_jwk *key)
{
    if (!p || !key)
        return SL_JWS_BAD_SIGNATURE;
    unsigned alg = p->alg;
    /* the key decides what it may verify, never the token: this is what stops alg confusion */
    if (!is_single_alg(alg) || !(alg & key->algs))
        return SL_JWS_BAD_ALG;
    if (!p->sig || p->sig_len == 0 || (!p->signing_input.ptr && p->signing_input.len))
        return SL_JWS_BAD_SIGNATURE;
    if (alg & SL_JWS_HMAC_ALGS)
        return key->pkey ? SL_JWS_BAD_SIGNATURE : verify_hmac(p, key);

    EVP_PKEY *pkey = key->pkey;
    if (!pkey || key->secret)
        return SL_JWS_BAD_SIGNATURE;
    bool ok = false;
    if (alg & (ALG_RS | ALG_PS)) {
        bool pss = (alg & ALG_PS) != 0;
        bool type_ok = pss ? (EVP_PKEY_is_a(pkey, "RSA") || EVP_PKEY_is_a(pkey, "RSA-PSS"))
                           : EVP_PKEY_is_a(pkey, "RSA");
        /* RFC 7518 §3.3: the signature is exactly as long as the modulus */
        if (type_ok && EVP_PKEY_get_size(pkey) > 0 && p->sig_len == (size_t)EVP_PKEY_get_size(pkey))
            ok = digest_verify(pkey, alg_md(alg), pss, p->sig, p->sig_len, p->signing_input);
    } else if (alg & ALG_ES) {
        ok = verify_ecdsa(pkey, alg, p);
    } else if (alg == SL_JWS_EDDSA) {
        if (EVP_PKEY_is_a(pkey, "ED25519") && p->sig_len == 64)
            ok = digest_verify(pkey, NULL, false, p->sig, p->sig_len, p->signing_input);
    }
    ERR_clear_error();
    return ok ? SL_JWS_OK : SL_JWS_BAD_SIGNATURE;
}

/* ---- claims ---- */

const char *sl_jwt_claims_status_name(enum sl_jwt_claims_status st)
{
    switch (st) {
    case SL_JWT_CLAIMS_OK:
        return "ok";
    case SL_JWT_CLAIMS_MALFORMED:
        return "malformed_claims";
    case SL_JWT_EXPIRED:
        return "expired";
    case SL_JWT_NOT_YET_VALID:
        return "not_yet_valid";
    case SL_JWT_ISSUED_IN_FUTURE:
        return "issued_in_future";
    case SL_JWT_BAD_ISSUER:
        return "bad_issuer";
    case SL_JWT_BAD_AUDIENCE:
        return "bad_audience";
    case SL_JWT_CLAIM_MISSING:
        return "claim_missing";
    case SL_JWT_CLAIM_MISMATCH:
        return "claim_mismatch";
    }
    return "unknown";
}

/* Times are clamped to ±2^62 s and the leeway to 2^40 s so that t ± leeway never overflows;
 * both bounds are far beyond any meaningful date. */
#define TIME_LIMIT (INT64_C(1) << 62)
#define LEEWAY_LIMIT (UINT64_C(1) << 40)

static int64_t clamp_time(int64_t t)
{
    return t > TIME_LIMIT ? TIME_LIMIT : t < -TIME_LIMIT ? -TIME_LIMIT : t;
}

/* A NumericDate as whole seconds, rounded down (`up` false) or up. Fractions round in the
 * direction that makes the check stricter: exp down, nbf and iat up. */
static int64_t numeric_date(json_t *v, bool up)
{
    if (json_is_integer(v))
        return clamp_time((int64_t)json_integer_value(v));
    double d = json_real_value(v);
    if (!(d > -4.6e18)) /* also NaN, which jansson never produces */
        return -TIME_LIMIT;
    if (d > 4.6e18)
        return TIME_LIMIT;
    return clamp_time((int64_t)(up ? ceil(d) : floor(d)));
}

/* Text of a scalar claim into (*s, *n): strings as they are, numbers and booleans as JSON
 * text (in `buf`). false for null, objects and arrays. */
static bool scalar_text(json_t *v, char *buf, size_t cap, const char **s, size_t *n)
{
    int w;
    switch (json_typeof(v)) {
    case JSON_STRING:
        *s = json_string_value(v);
        *n = json_string_length(v);
        return true;
    case JSON_INTEGER:
        w = snprintf(buf, cap, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        break;
    case JSON_REAL: {
        double d = json_real_value(v);
        w = -1;
        /* the shortest text that reads back as the same double (0.1 -> "0.1", 5.0 -> "5") */
        for (int prec = 15; prec <= 17; prec++) {
            w = snprintf(buf, cap, "%.*g", prec, d);
            if (w > 0 && (size_t)w < cap && strtod(buf, NULL) == d)
                break;
        }
        break;
    }
    case JSON_TRUE:
        *s = "true";
        *n = 4;
        return true;
    case JSON_FALSE:
        *s = "false";
        *n = 5;
        return true;
    default:
        return false;
    }
    if (w <= 0 || (size_t)w >= cap)
        return false;
    *s = buf;
    *n = (size_t)w;
    return true;
}

static bool scalar_equals(json_t *v, const char *want)
{
    char buf[40];
    const char *s;
    size_t n;
    return scalar_text(v, buf, sizeof(buf), &s, &n) && n == strlen(want) && memcmp(s, want, n) == 0;
}

static bool in_list(json_t *v, char **list, size_t count)
{
    if (!json_is_string(v))
        return false;
    for (size_t i = 0; i < count; i++)
        if (list[i] && scalar_equals(v, list[i]))
            return true;
    return false;
}

static bool audience_ok(json_t *aud, const struct sl_jwt_rules *r)
{
    if (json_is_string(aud))
        return in_list(aud, r->audiences, r->audience_count);
    if (!json_is_array(aud))
        return false;
    size_t i;
    json_t *v;
    bool hit = false;
    json_array_foreach(aud, i, v)
    {
        if (!json_is_string(v))
            return false; /* RFC 7519 §4.1.3: an array of strings, nothing else */
        if (in_list(v, r->audiences, r->audience_count))
            hit = true;
    }
    return hit;
}

static void flat_put(json_t *obj, unsigned char *flat, size_t cap, size_t *used)
{
    const char *name;
    size_t name_len;
    json_t *v;
    json_object_keylen_foreach(obj, name, name_len, v)
    {
        char buf[40];
        const char *s;
        size_t n;
        if (!scalar_text(v, buf, sizeof(buf), &s, &n) || name_len > 0xffff || n > 0xffff)
            continue;
        size_t rec = 4 + name_len + n;
        if (rec > cap - *used)
            continue;
        unsigned char *w = flat + *used;
        w[0] = (unsigned char)(name_len >> 8);
        w[1] = (unsigned char)name_len;
        w[2] = (unsigned char)(n >> 8);
        w[3] = (unsigned char)n;
        memcpy(w + 4, name, name_len);
        if (n)
            memcpy(w + 4 + name_len, s, n);
        *used += rec;
    }
}

static bool is_present(json_t *v)
{
    return v && !json_is_null(v);
}

enum sl_jwt_claims_status sl_jwt_claims_check(const char *payload, size_t len,
                                              const struct sl_jwt_rules *rules, int64_t now_s,
                                              int64_t *exp_s, unsigned char *flat, size_t flat_cap,
                                              size_t *flat_len)
{
    static const struct sl_jwt_rules none = {0};
    const struct sl_jwt_rules *r = rules ? rules : &none;
    if (flat_len)
        *flat_len = 0;
    if (!payload)
        return SL_JWT_CLAIMS_MALFORMED;
    json_error_t jerr;
    sl_json_scratch_begin();
    json_t *c = json_loadb(payload, len, JSON_REJECT_DUPLICATES, &jerr);
    enum sl_jwt_claims_status st = SL_JWT_CLAIMS_MALFORMED;
    if (!json_is_object(c))
        goto out;

    json_t *exp = json_object_get(c, "exp");
    json_t *nbf = json_object_get(c, "nbf");
    json_t *iat = json_object_get(c, "iat");
    if ((exp && !json_is_number(exp)) || (nbf && !json_is_number(nbf)) ||
        (iat && !json_is_number(iat)))
        goto out;
    int64_t now = clamp_time(now_s);
    int64_t leeway = (int64_t)(r->leeway_s > LEEWAY_LIMIT ? LEEWAY_LIMIT : r->leeway_s);
    int64_t exp_v = exp ? numeric_date(exp, false) : 0;
    st = SL_JWT_EXPIRED;
    if (exp ? now > exp_v + leeway : r->require_exp)
        goto out;
    st = SL_JWT_NOT_YET_VALID;
    if (nbf && now < numeric_date(nbf, true) - leeway)
        goto out;
    st = SL_JWT_ISSUED_IN_FUTURE;
    if (iat && now < numeric_date(iat, true) - leeway)
        goto out;

    st = SL_JWT_BAD_ISSUER;
    if (r->issuer_count && !in_list(json_object_get(c, "iss"), r->issuers, r->issuer_count))
        goto out;
    st = SL_JWT_BAD_AUDIENCE;
    if (r->audience_count && !audience_ok(json_object_get(c, "aud"), r))
        goto out;

    st = SL_JWT_CLAIM_MISSING;
    for (size_t i = 0; i < r->required_count; i++)
        if (r->required[i] && !is_present(json_object_get(c, r->required[i])))
            goto out;
    for (size_t i = 0; i < r->claim_count; i++) {
        const char *name = r->claim_names ? r->claim_names[i] : NULL;
        const char *want = r->claim_values ? r->claim_values[i] : NULL;
        if (!name || !want)
            continue;
        json_t *v = json_object_get(c, name);
        if (!is_present(v)) {
            st = SL_JWT_CLAIM_MISSING;
            goto out;
        }
        bool hit = false;
        if (json_is_array(v)) {
            size_t j;
            json_t *e;
            json_array_foreach(v, j, e)
            {
                if (scalar_equals(e, want)) {
                    hit = true;
                    break;
                }
            }
        } else {
            hit = scalar_equals(v, want);
        }
        if (!hit) {
            st = SL_JWT_CLAIM_MISMATCH;
            goto out;
        }
    }

    st = SL_JWT_CLAIMS_OK;
    if (exp_s)
        *exp_s = exp_v;
    if (flat && flat_len)
        flat_put(c, flat, flat_cap, flat_len);
out:
    json_decref(c);
    sl_json_scratch_end();
    return st;
}

bool sl_jwt_flat_get(const unsigned char *flat, size_t flat_len, const char *name, size_t name_len,
                     struct sl_slice *value)
{
    size_t pos = 0;
    if (!flat || (!name && name_len))
        return false;
    while (flat_len - pos >= 4) {
        size_t nl = ((size_t)flat[pos] << 8) | flat[pos + 1];
        size_t vl = ((size_t)flat[pos + 2] << 8) | flat[pos + 3];
        pos += 4;
        if (nl + vl > flat_len - pos)
            return false; /* not a blob we wrote */
        if (nl == name_len && (nl == 0 || memcmp(flat + pos, name, nl) == 0)) {
            if (value)
                *value = sl_slice_make((const char *)flat + pos + nl, vl);
            return true;
        }
        pos += nl + vl;
    }
    return false;
}
