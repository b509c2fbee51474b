#ifndef SL_FILTERS_JWS_H
#define SL_FILTERS_JWS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/slice.h"

/*
 * JSON Web Signatures (RFC 7515) and keys (RFC 7517/7518/8037) for the jwt filter, on
 * OpenSSL 3 (EVP) and jansson. Pure functions: no I/O, no global state, safe from any thread.
 *
 * Algorithms are bits so that a key's allowed set and a filter's allowed set are one AND.
 * `none` has no bit: it can never be allowed.
 */
enum sl_jws_alg {
    SL_JWS_HS256 = 1u << 0,
    SL_JWS_HS384 = 1u << 1,
    SL_JWS_HS512 = 1u << 2,
    SL_JWS_RS256 = 1u << 3,
    SL_JWS_RS384 = 1u << 4,
    SL_JWS_RS512 = 1u << 5,
    SL_JWS_PS256 = 1u << 6,
    SL_JWS_PS384 = 1u << 7,
    SL_JWS_PS512 = 1u << 8,
    SL_JWS_ES256 = 1u << 9,
    SL_JWS_ES384 = 1u << 10,
    SL_JWS_EDDSA = 1u << 11, /* Ed25519 only */
};
#define SL_JWS_HMAC_ALGS (SL_JWS_HS256 | SL_JWS_HS384 | SL_JWS_HS512)
#define SL_JWS_RSA_ALGS                                                                            \
    (SL_JWS_RS256 | SL_JWS_RS384 | SL_JWS_RS512 | SL_JWS_PS256 | SL_JWS_PS384 | SL_JWS_PS512)
#define SL_JWS_ALL_ALGS 0xfffu

/* "HS256" -> SL_JWS_HS256; 0 when unknown (including "none"). */
unsigned sl_jws_alg_from_name(const char *name, size_t len);

/* SL_JWS_HS256 -> "HS256"; "?" for anything but a single known bit. */
const char *sl_jws_alg_name(unsigned alg);

/*
 * Strict base64url without padding (RFC 7515 §2): only [A-Za-z0-9_-], no '=', no whitespace,
 * a length that is not 1 mod 4, and unused trailing bits zero. Writes at most `cap` bytes.
 * Returns 0 with *out_len, -EINVAL on bad input, -ENOSPC when `cap` is too small.
 */
int sl_b64url_decode(const char *in, size_t len, unsigned char *out, size_t cap, size_t *out_len);

/* Encoder (for tests and thumbprints): writes ceil(len*4/3) chars, no padding and no NUL, and
 * returns that; returns 0 (writing nothing) when `cap` is too small. */
size_t sl_b64url_encode(const unsigned char *in, size_t len, char *out, size_t cap);

struct evp_pkey_st; /* EVP_PKEY, without pulling OpenSSL headers into every includer */

struct sl_jwk {
    char *kid;                /* NULL when the key has none */
    unsigned algs;            /* algorithms this key may verify (from kty/crv and "alg") */
    struct evp_pkey_st *pkey; /* public key (RSA, EC P-256/P-384, Ed25519), or NULL */
    unsigned char *secret;    /* HMAC secret (kty oct), or NULL */
    size_t secret_len;
    uint64_t fingerprint; /* stable hash of the key material, to tell keys apart */
};

/* An immutable key set, shared by threads and refcounted. */
struct sl_jwks {
    _Atomic unsigned refs;
    struct sl_jwk *keys;
    size_t count;
    size_t skipped; /* entries ignored: use != "sig", unsupported kty/crv/alg, bad params */
};

/*
 * Parses a JWK Set ({"keys":[...]}) or a single JWK object. Supports kty RSA (n, e; at least
 * 2048 bits), EC (crv P-256 / P-384, x, y, point checked on the curve), OKP (crv Ed25519, x)
 * and oct (k; only when `allow_oct`, since a shared secret must not come from a URL; at least 32
 * bytes, see sl_jwks_from_secret). Keys with "use" other than "sig", "key_ops" without
 * "verify", an unknown "alg", or unsupported types are skipped and counted. Returns a set with one
 * reference, or NULL with a reason in `err` (also when no usable key remains, or for more than
 * 1024 entries).
 */
struct sl_jwks *sl_jwks_parse(const char *json, size_t len, bool allow_oct, char *err,
                              size_t err_len);

/* A set with one HMAC key. `algs` is a subset of SL_JWS_HMAC_ALGS (0 = all three). The secret is
 * copied. RFC 7518 §3.2: HS256/HS384/HS512 need a secret of at least 32/48/64 bytes; algorithms
 * the secret is too short for are dropped, and NULL (with a reason) when none remains. */
struct sl_jwks *sl_jwks_from_secret(const unsigned char *secret, size_t len, unsigned algs,
                                    char *err, size_t err_len);

/* A set with one public key from PEM text (SubjectPublicKeyInfo "PUBLIC KEY", "RSA PUBLIC
 * KEY", or an X.509 certificate). `algs` restricts what the key type allows (0 = all it
 * allows). NULL with a reason in `err`. */
struct sl_jwks *sl_jwks_from_pem(const char *pem, size_t len, unsigned algs, char *err,
                                 size_t err_len);

void sl_jwks_ref(struct sl_jwks *ks);
void sl_jwks_unref(struct sl_jwks *ks); /* frees on the last reference; NULL is fine */

/*
 * The key for a token: with a kid, the key with that kid that allows `alg`; without one, the
 * only key that allows `alg` (NULL when none or several match). NULL when not found.
 */
const struct sl_jwk *sl_jwks_find(const struct sl_jwks *ks, struct sl_slice kid, unsigned alg);

enum sl_jws_status {
    SL_JWS_OK = 0,
    SL_JWS_MALFORMED,     /* not three base64url parts, bad JSON header, bad base64 */
    SL_JWS_TOO_LARGE,     /* longer than the scratch space allows */
    SL_JWS_BAD_ALG,       /* "none", unknown, or not in the allowed set; "crit" present */
    SL_JWS_UNKNOWN_KID,   /* no key in the set fits (kid + alg) */
    SL_JWS_BAD_SIGNATURE, /* includes key/alg type mismatches found late */
};

/* Short names for logs and the 401 body ("malformed", "bad_signature", ...). */
const char *sl_jws_status_name(enum sl_jws_status st);

/* A token split and its header read. Slices point into the token or the scratch buffer. */
struct sl_jws_parsed {
    struct sl_slice signing_input; /* "<header>.<payload>" as in the token */
    struct sl_slice payload;       /* decoded payload JSON (in scratch) */
    unsigned char *sig;            /* decoded signature (in scratch) */
    size_t sig_len;
    unsigned alg;        /* one SL_JWS_* bit */
    struct sl_slice kid; /* may be empty (in scratch) */
};

/*
 * Splits `token` (compact serialization), decodes the header and checks alg (must be in
 * `allowed_algs`), typ (absent, "JWT" or "at+jwt", case-insensitive) and crit (must be
 * absent), then decodes payload and signature into `scratch`. Allocates nothing that outlives
 * the call.
 */
enum sl_jws_status sl_jws_parse(const char *token, size_t len, unsigned allowed_algs,
                                unsigned char *scratch, size_t scratch_cap,
                                struct sl_jws_parsed *out);

/* Verifies the signature of a parsed token with `key` (which must allow p->alg). ES* take
 * the JOSE r||s form; HMAC compares in constant time. */
enum sl_jws_status sl_jws_verify(const struct sl_jws_parsed *p, const struct sl_jwk *key);

/* ---- claims (RFC 7519) ---- */

struct sl_jwt_rules {
    char **issuers; /* any of, exact string match; none = not checked */
    size_t issuer_count;
    char **audiences; /* token "aud" (string or array) must contain one of these */
    size_t audience_count;
    char **required; /* claim names that must be present (a null value counts as absent) */
    size_t required_count;
    char **claim_names;  /* claim_names[i] must equal claim_values[i] (a string claim equal, or */
    char **claim_values; /* an array claim containing it, or a number/bool whose text equals) */
    size_t claim_count;
    uint64_t leeway_s;
    bool require_exp;
};

enum sl_jwt_claims_status {
    SL_JWT_CLAIMS_OK = 0,
    SL_JWT_CLAIMS_MALFORMED, /* payload is not a JSON object, or exp/nbf/iat not numbers */
    SL_JWT_EXPIRED,          /* now > exp + leeway (or exp missing with require_exp) */
    SL_JWT_NOT_YET_VALID,    /* now < nbf - leeway */
    SL_JWT_ISSUED_IN_FUTURE, /* now < iat - leeway */
    SL_JWT_BAD_ISSUER,       /* 401 */
    SL_JWT_BAD_AUDIENCE,     /* 401 */
    SL_JWT_CLAIM_MISSING,    /* a required (or value-checked) claim is absent: 403 */
    SL_JWT_CLAIM_MISMATCH,   /* a claim value differs: 403 */
};

const char *sl_jwt_claims_status_name(enum sl_jwt_claims_status st);

/*
 * Checks the payload against `rules` at time `now_s`. On OK, writes the token's exp (0 when
 * none) to *exp_s and, when `flat` is not NULL, the top-level string, number and boolean claims
 * as a flat blob (see sl_jwt_flat_get) of at most `flat_cap` bytes into `flat` (*flat_len;
 * claims that do not fit are left out, and *flat_len counts what was written).
 */
enum sl_jwt_claims_status sl_jwt_claims_check(const char *payload, size_t len,
                                              const struct sl_jwt_rules *rules, int64_t now_s,
                                              int64_t *exp_s, unsigned char *flat, size_t flat_cap,
                                              size_t *flat_len);

/* Looks claim `name` up in a flat blob. Strings come unquoted and unescaped, numbers and
 * booleans as their JSON text. Returns true when found. */
bool sl_jwt_flat_get(const unsigned char *flat, size_t flat_len, const char *name, size_t name_len,
                     struct sl_slice *value);

#endif
