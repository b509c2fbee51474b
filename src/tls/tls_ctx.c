#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "core/fmt.h"
#include "core/hash.h"
#include "tls/tls_ctx.h"
#include "tls/tls_internal.h"
#include "tls/tls_tickets.h"

/*
 * Why one SSL_CTX per certificate, switched with SSL_set_SSL_CTX from the servername callback,
 * rather than one SSL_CTX and SSL_use_cert_and_key per handshake: the switch costs one CERT
 * copy (an allocation and reference bumps, no cryptography) and is skipped when the default
 * certificate matches, whereas SSL_use_cert_and_key re-checks that the key matches the
 * certificate and copies the chain on every handshake. Each per-certificate SSL_CTX is set up
 * identically (ciphers, ALPN, client CAs, ticket keys, session id context) because after the
 * switch OpenSSL reads several of those from the new context.
 *
 * The servername callback rather than the client-hello callback: OpenSSL has parsed and checked
 * the SNI extension by then, and the callback still runs before certificate and cipher choice.
 *
 * SSL_MODE_NO_AUTO_CHAIN: the chain is exactly what the PEM file holds. Without it, OpenSSL
 * builds the chain from the trust store on every handshake when the file has no intermediates,
 * and with mTLS that store holds the client CAs, which have no place in the server's chain.
 */

#define WILD_SEED 0x9e3779b97f4a7c15ull
#define MAX_NAME_LEN 253

struct name_slot {
    uint64_t hash;
    char *name; /* NULL: empty slot; for wildcards, the part after "*." */
    uint32_t len;
    uint32_t cert;
    bool wildcard;
};

struct sl_tls_ctx_snap {
    _Atomic unsigned refs;
    uint64_t generation;
    SSL_CTX **ctxs; /* one per certificate; [0] is the default */
    size_t count;
    struct name_slot *slots;
    size_t mask;         /* slots has mask + 1 entries, a power of two */
    unsigned char *alpn; /* wire format (length-prefixed), server preference */
    size_t alpn_len;
    unsigned char sid_ctx[32];
    struct sl_tls_ticket_keys *keys; /* a reference, or NULL when tickets are off */
};

/* What sl_tls_ctx_new was given, copied, so that a reload can rebuild from the files. */
struct conf {
    char **cert_files, **key_files;
    size_t cert_count;
    int min_version;
    char *ciphers, *ciphersuites, *client_ca_file;
    unsigned char *alpn;
    size_t alpn_len;
    enum sl_tls_client_auth client_auth;
    bool session_tickets;
};

struct sl_tls_ctx {
    struct sl_tls_ctx_snap *_Atomic cur;
    _Atomic unsigned readers; /* threads between loading `cur` and referencing it */
    pthread_mutex_t reload_lock;
    struct conf cf;
    struct sl_tls_ticket_keys *keys; /* a reference, or NULL when tickets are off */
    uint64_t generation;
};

struct sl_tls_client_ctx {
    SSL_CTX *ctx;
    bool verify;
};

void sl__tls_fmt_err(char *err, size_t err_len, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    unsigned long e = ERR_peek_error();
    char reason[160] = "";
    if (e) {
        const char *r = ERR_reason_error_string(e);
        if (r)
            snprintf(reason, sizeof reason, ": %s", r);
        else
            ERR_error_string_n(e, reason, sizeof reason);
    }
    ERR_clear_error();
    sl_fmt_err(err, err_len, "%s%s", msg, reason);
}

/* ---- descriptions ---- */

static int parse_version(const char *v, int dflt, const char *what, char *err, size_t err_len)
{
    if (!v)
        return dflt;
    if (strcmp(v, "1.2") == 0)
        return TLS1_2_VERSION;
    if (strcmp(v, "1.3") == 0)
        return TLS1_3_VERSION;
    sl_fmt_err(err, err_len, "%s: unsupported TLS version \"%s\" (use \"1.2\" or \"1.3\")", what,
               v);
    return -1;
}

/* Builds the length-prefixed ALPN list. Returns 0 (with *out NULL for an empty list) or -1. */
static int build_alpn(const char *const *protos, size_t count, unsigned char **out, size_t *out_len,
                      char *err, size_t err_len)
{
    *out = NULL;
    *out_len = 0;
    if (count == 0)
        return 0;
    size_t total = 0;
    for (size_t i = 0; i < count; i++) {
        size_t n = protos[i] ? strlen(protos[i]) : 0;
        if (n == 0 || n > 255) {
            sl_fmt_err(err, err_len, "alpn: protocol %zu must be 1 to 255 bytes", i + 1);
            return -1;
        }
        total += 1 + n;
    }
    if (total > 0xffff) {
        sl_fmt_err(err, err_len, "alpn: list too long");
        return -1;
    }
    unsigned char *w = malloc(total);
    if (!w) {
        sl_fmt_err(err, err_len, "out of memory");
        return -1;
    }
    size_t off = 0;
    for (size_t i = 0; i < count; i++) {
        size_t n = strlen(protos[i]);
        w[off++] = (unsigned char)n;
        memcpy(w + off, protos[i], n);
        off += n;
    }
    *out = w;
    *out_len = total;
    return 0;
}

static char *dup_or_null(const char *s, bool *oom)
{
    if (!s)
        return NULL;
    char *d = strdup(s);
    if (!d)
        *oom = true;
    return d;
}

static void conf_dispose(struct conf *cf)
{
    for (size_t i = 0; i < cf->cert_count; i++) {
        if (cf->cert_files)
            free(cf->cert_files[i]);
        if (cf->key_files)
            free(cf->key_files[i]);
    }
    free(cf->cert_files);
    free(cf->key_files);
    free(cf->ciphers);
    free(cf->ciphersuites);
    free(cf->client_ca_file);
    free(cf->alpn);
    memset(cf, 0, sizeof *cf);
}

static int conf_init(struct conf *cf, const struct sl_tls_server_desc *d, char *err, size_t err_len)
{
    memset(cf, 0, sizeof *cf);
    if (!d->certs || d->cert_count == 0) {
        sl_fmt_err(err, err_len, "at least one certificate is needed");
        return -EINVAL;
    }
    if (d->cert_count > SL_TLS_MAX_CERTS) {
        sl_fmt_err(err, err_len, "too many certificates (%zu, at most %u)", d->cert_count,
                   SL_TLS_MAX_CERTS);
        return -EINVAL;
    }
    for (size_t i = 0; i < d->cert_count; i++) {
        if (!d->certs[i].cert_file || !d->certs[i].key_file) {
            sl_fmt_err(err, err_len, "certificate %zu: cert_file and key_file are required", i + 1);
            return -EINVAL;
        }
    }
    cf->min_version = parse_version(d->min_version, TLS1_2_VERSION, "min_version", err, err_len);
    if (cf->min_version < 0)
        return -EINVAL;
    if (d->client_ca_file && d->client_auth == SL_TLS_CLIENT_AUTH_NONE) {
        sl_fmt_err(err, err_len, "client_ca_file needs client_auth optional or required");
        return -EINVAL;
    }
    if (!d->client_ca_file && d->client_auth != SL_TLS_CLIENT_AUTH_NONE) {
        sl_fmt_err(err, err_len, "client_auth needs a client_ca_file");
        return -EINVAL;
    }
    if (build_alpn(d->alpn, d->alpn_count, &cf->alpn, &cf->alpn_len, err, err_len) < 0)
        return -EINVAL;
    cf->client_auth = d->client_auth;
    cf->session_tickets = d->session_tickets;
    bool oom = false;
    cf->cert_files = calloc(d->cert_count, sizeof *cf->cert_files);
    cf->key_files = calloc(d->cert_count, sizeof *cf->key_files);
    cf->cert_count = d->cert_count;
    if (!cf->cert_files || !cf->key_files)
        oom = true;
    for (size_t i = 0; !oom && i < d->cert_count; i++) {
        cf->cert_files[i] = dup_or_null(d->certs[i].cert_file, &oom);
        cf->key_files[i] = dup_or_null(d->certs[i].key_file, &oom);
    }
    cf->ciphers = dup_or_null(d->ciphers, &oom);
    cf->ciphersuites = dup_or_null(d->ciphersuites, &oom);
    cf->client_ca_file = dup_or_null(d->client_ca_file, &oom);
    if (oom) {
        conf_dispose(cf);
        sl_fmt_err(err, err_len, "out of memory");
        return -ENOMEM;
    }
    return 0;
}

/* ---- SNI name table ---- */

/* Lower-cases `name` into `out` and drops one trailing dot. Returns the length, or 0 when the
 * name cannot be a host name (empty, too long, NUL inside). */
static size_t normalize_name(const char *name, size_t len, char *out)
{
    if (len > 0 && name[len - 1] == '.')
        len--;
    if (len == 0 || len > MAX_NAME_LEN)
        return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)name[i];
        if (ch == 0)
            return 0;
        out[i] = (char)(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch);
    }
    return len;
}

static int table_find(const struct sl_tls_ctx_snap *s, const char *name, size_t len, bool wild)
{
    uint64_t h = sl_hash_bytes(name, len, wild ? WILD_SEED : 0);
    for (size_t i = h & s->mask;; i = (i + 1) & s->mask) {
        const struct name_slot *e = &s->slots[i];
        if (!e->name)
            return -1;
        if (e->hash == h && e->len == len && e->wildcard == wild && memcmp(e->name, name, len) == 0)
            return (int)e->cert;
    }
}

/* Adds a certificate name; the first certificate to claim a name keeps it. Returns 0 or
 * -ENOMEM; names that are not usable host names are skipped. */
static int table_add(struct sl_tls_ctx_snap *s, const char *raw, size_t raw_len, uint32_t cert)
{
    char buf[MAX_NAME_LEN + 1];
    size_t len = normalize_name(raw, raw_len, buf);
    if (len == 0)
        return 0;
    const char *name = buf;
    bool wild = false;
    if (len > 2 && buf[0] == '*' && buf[1] == '.') {
        name += 2;
        len -= 2;
        wild = true;
        /* "*.com" would cover a whole top-level domain: clients refuse it, so do we. */
        if (!memchr(name, '.', len))
            return 0;
    }
    if (memchr(name, '*', len))
        return 0; /* partial wildcards (f*.example.com) are not honoured by clients either */
    if (table_find(s, name, len, wild) >= 0)
        return 0;
    uint64_t h = sl_hash_bytes(name, len, wild ? WILD_SEED : 0);
    size_t i = h & s->mask;
    while (s->slots[i].name)
        i = (i + 1) & s->mask;
    char *copy = malloc(len + 1);
    if (!copy)
        return -ENOMEM;
    memcpy(copy, name, len);
    copy[len] = 0;
    s->slots[i] = (struct name_slot){
        .hash = h, .name = copy, .len = (uint32_t)len, .cert = cert, .wildcard = wild};
    return 0;
}

static size_t snap_select(const struct sl_tls_ctx_snap *s, const char *sni)
{
    if (!sni)
        return 0;
    char buf[MAX_NAME_LEN + 1];
    size_t len = normalize_name(sni, strnlen(sni, MAX_NAME_LEN + 2), buf);
    if (len == 0)
        return 0;
    int i = table_find(s, buf, len, false);
    if (i >= 0)
        return (size_t)i;
    const char *dot = memchr(buf, '.', len);
    if (dot && dot != buf) {
        size_t off = (size_t)(dot + 1 - buf);
        i = table_find(s, dot + 1, len - off, true);
        if (i >= 0)
            return (size_t)i;
    }
    return 0;
}

/* The names a certificate answers for: its subjectAltName DNS entries, or its last common name
 * when it has none (RFC 6125 §6.4.4). Counts them into *added when `s` is NULL. */
static int cert_names(X509 *x, struct sl_tls_ctx_snap *s, uint32_t cert, size_t *added)
{
    int rc = 0;
    size_t n = 0;
    GENERAL_NAMES *gens = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
    for (int i = 0; gens && i < sk_GENERAL_NAME_num(gens); i++) {
        const GENERAL_NAME *g = sk_GENERAL_NAME_value(gens, i);
        if (g->type != GEN_DNS)
            continue;
        n++;
        if (s) {
            const ASN1_STRING *str = g->d.dNSName;
            rc = table_add(s, (const char *)ASN1_STRING_get0_data(str),
                           (size_t)ASN1_STRING_length(str), cert);
            if (rc < 0)
                break;
        }
    }
    GENERAL_NAMES_free(gens);
    if (n == 0 && rc == 0) {
        const X509_NAME *subj = X509_get_subject_name(x);
        int pos = -1, last = -1;
        while ((pos = X509_NAME_get_index_by_NID(subj, NID_commonName, pos)) >= 0)
            last = pos;
        if (last >= 0) {
            n++;
            unsigned char *utf8 = NULL;
            const ASN1_STRING *d = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subj, last));
            int len = ASN1_STRING_to_UTF8(&utf8, d);
            if (s && len > 0)
                rc = table_add(s, (const char *)utf8, (size_t)len, cert);
            OPENSSL_free(utf8);
        }
    }
    if (added)
        *added += n;
    return rc;
}

/* ---- callbacks ---- */

static int on_servername(SSL *ssl, int *alert, void *arg)
{
    const struct sl_tls_ctx_snap *s = arg;
    size_t i = snap_select(s, SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name));
    if (SSL_get_SSL_CTX(ssl) != s->ctxs[i] && !SSL_set_SSL_CTX(ssl, s->ctxs[i])) {
        *alert = SSL_AD_INTERNAL_ERROR;
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    return SSL_TLSEXT_ERR_OK;
}

/*
 * Server preference: the first of our protocols the client offers. Not SSL_select_next_proto,
 * which falls back to the client's first protocol on no overlap; RFC 7301 §3.2 wants the
 * handshake refused with no_application_protocol, which OpenSSL sends for ALERT_FATAL. A client
 * that sends no ALPN extension never gets here and proceeds without ALPN.
 */
static int on_alpn_select(SSL *ssl, const unsigned char **out, unsigned char *out_len,
                          const unsigned char *in, unsigned int in_len, void *arg)
{
    (void)ssl;
    const struct sl_tls_ctx_snap *s = arg;
    for (size_t i = 0; i < s->alpn_len; i += 1u + s->alpn[i]) {
        const unsigned char *p = s->alpn + i + 1;
        unsigned plen = s->alpn[i];
        for (unsigned j = 0; j < in_len;) {
            unsigned qlen = in[j];
            if (qlen == 0 || j + 1 + qlen > in_len)
                break;
            if (qlen == plen && memcmp(in + j + 1, p, plen) == 0) {
                *out = p; /* lives as long as the snapshot, which outlives the handshake */
                *out_len = (unsigned char)plen;
                return SSL_TLSEXT_ERR_OK;
            }
            j += 1 + qlen;
        }
    }
    return SSL_TLSEXT_ERR_ALERT_FATAL;
}

/* Encrypted keys are refused rather than prompting on the terminal from a server. */
static int on_no_password(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return 0;
}

/* ---- building ---- */

static int apply_protocol(SSL_CTX *ctx, int min_version, int max_version, const char *ciphers,
                          const char *suites, char *err, size_t err_len)
{
    if (SSL_CTX_set_min_proto_version(ctx, min_version) != 1 ||
        SSL_CTX_set_max_proto_version(ctx, max_version) != 1) {
        sl__tls_fmt_err(err, err_len, "cannot set the TLS versions");
        return -EINVAL;
    }
    if (SSL_CTX_set_cipher_list(ctx, ciphers ? ciphers : SL_TLS_DEFAULT_CIPHERS) != 1) {
        sl__tls_fmt_err(err, err_len, "ciphers \"%s\"", ciphers ? ciphers : "(default)");
        return -EINVAL;
    }
    if (suites && SSL_CTX_set_ciphersuites(ctx, suites) != 1) {
        sl__tls_fmt_err(err, err_len, "ciphersuites \"%s\"", suites);
        return -EINVAL;
    }
    /*
     * RELEASE_BUFFERS: the 16 KiB read and write buffers are freed whenever empty, so an idle
     * connection holds none. PARTIAL_WRITE + MOVING_WRITE_BUFFER: SSL_write reports each record
     * as it goes and a retry may pass the same bytes from another address (our coalescing
     * buffer), which a non-blocking writev needs.
     */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE |
                              SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_NO_AUTO_CHAIN);
    /* Renegotiation only buys a peer a way to make us do handshakes mid-connection. */
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    /* One read() takes every byte the socket has (see tls_transport.c's on_bio_read). */
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_passwd_cb(ctx, on_no_password);
    return 0;
}

static int load_cert_key(SSL_CTX *ctx, const char *cert_file, const char *key_file, char *err,
                         size_t err_len)
{
    if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) {
        sl__tls_fmt_err(err, err_len, "%s: cannot load the certificate chain", cert_file);
        return -EINVAL;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1) {
        sl__tls_fmt_err(err, err_len, "%s: cannot load the private key", key_file);
        return -EINVAL;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        sl__tls_fmt_err(err, err_len, "%s: the private key does not match %s", key_file, cert_file);
        return -EINVAL;
    }
    return 0;
}

/*
 * The session id context ties sessions (and so tickets) to the client-authentication policy:
 * OpenSSL refuses to resume a session whose context differs. A ticket from a listener without
 * mTLS, or with other client CAs, must never resume here as if its client had been verified by
 * our CAs; the hash of the CA file's bytes and the mode makes those contexts differ.
 */
static int compute_sid_ctx(const struct conf *cf, unsigned char out[32], char *err, size_t err_len)
{
    char head[64];
    int hn = snprintf(head, sizeof head, "sluice-tls-sid|auth=%d|", (int)cf->client_auth);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    FILE *f = NULL;
    int rc = -ENOMEM;
    if (!md || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1 ||
        EVP_DigestUpdate(md, head, (size_t)hn) != 1) {
        sl__tls_fmt_err(err, err_len, "cannot hash the session id context");
        goto out;
    }
    if (cf->client_ca_file) {
        f = fopen(cf->client_ca_file, "rb");
        if (!f) {
            sl_fmt_err(err, err_len, "%s: %s", cf->client_ca_file, strerror(errno));
            rc = -EINVAL;
            goto out;
        }
        unsigned char chunk[4096];
        size_t got;
        while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) {
            if (EVP_DigestUpdate(md, chunk, got) != 1) {
                sl__tls_fmt_err(err, err_len, "cannot hash the session id context");
                goto out;
            }
        }
        if (ferror(f)) {
            sl_fmt_err(err, err_len, "%s: read error", cf->client_ca_file);
            rc = -EINVAL;
            goto out;
        }
    }
    unsigned len = 0;
    if (EVP_DigestFinal_ex(md, out, &len) != 1 || len != 32) {
        sl__tls_fmt_err(err, err_len, "cannot hash the session id context");
        goto out;
    }
    rc = 0;
out:
    if (f)
        fclose(f);
    EVP_MD_CTX_free(md);
    ERR_clear_error();
    return rc;
}

static void snap_free(struct sl_tls_ctx_snap *s)
{
    for (size_t i = 0; s->ctxs && i < s->count; i++)
        SSL_CTX_free(s->ctxs[i]);
    free(s->ctxs);
    for (size_t i = 0; s->slots && i <= s->mask; i++)
        free(s->slots[i].name);
    free(s->slots);
    free(s->alpn);
    sl_tls_ticket_keys_free(s->keys);
    free(s);
}

static SSL_CTX *build_server_ctx(const struct conf *cf, struct sl_tls_ctx_snap *s, size_t i,
                                 X509_STORE *store, const STACK_OF(X509_NAME) * ca_names, char *err,
                                 size_t err_len)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        sl__tls_fmt_err(err, err_len, "cannot create an SSL_CTX");
        return NULL;
    }
    if (apply_protocol(ctx, cf->min_version, 0, cf->ciphers,
                       cf->ciphersuites ? cf->ciphersuites : SL_TLS_DEFAULT_SUITES, err,
                       err_len) < 0 ||
        load_cert_key(ctx, cf->cert_files[i], cf->key_files[i], err, err_len) < 0)
        goto fail;
    /* Our order decides (every suite offered is strong, the first is the cheapest), except
     * that a client putting ChaCha20 first, as phones without AES instructions do, gets it. */
    SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_PRIORITIZE_CHACHA);
    /* Stateless tickets only: a server-side cache would be private to one process. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (SSL_CTX_set_session_id_context(ctx, s->sid_ctx, sizeof s->sid_ctx) != 1) {
        sl__tls_fmt_err(err, err_len, "cannot set the session id context");
        goto fail;
    }
    if (s->keys) {
        /* One TLS 1.3 ticket per handshake, not OpenSSL's two: clients resume with one, and
         * each ticket costs an encryption and a record on every full handshake. */
        SSL_CTX_set_num_tickets(ctx, 1);
        if (sl_tls_ticket_keys_attach(ctx, s->keys) < 0) {
            sl_fmt_err(err, err_len, "out of memory");
            goto fail;
        }
    } else {
        /* Also no TLS 1.3 tickets: with NO_TICKET OpenSSL would send stateful ones, which
         * need the cache we turned off. */
        SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
        SSL_CTX_set_num_tickets(ctx, 0);
    }
    if (store) {
        SSL_CTX_set1_cert_store(ctx, store);
        STACK_OF(X509_NAME) *names = SSL_dup_CA_list(ca_names);
        if (!names) {
            sl__tls_fmt_err(err, err_len, "out of memory");
            goto fail;
        }
        SSL_CTX_set_client_CA_list(ctx, names);
        int mode = SSL_VERIFY_PEER;
        if (cf->client_auth == SL_TLS_CLIENT_AUTH_REQUIRED)
            mode |= SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
        SSL_CTX_set_verify(ctx, mode, NULL);
    }
    if (s->alpn_len)
        SSL_CTX_set_alpn_select_cb(ctx, on_alpn_select, s);
    SSL_CTX_set_tlsext_servername_callback(ctx, on_servername);
    SSL_CTX_set_tlsext_servername_arg(ctx, s);
    return ctx;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

static struct sl_tls_ctx_snap *build_snap(const struct conf *cf, struct sl_tls_ticket_keys *keys,
                                          char *err, size_t err_len, int *rc)
{
    X509_STORE *store = NULL;
    STACK_OF(X509_NAME) *ca_names = NULL;
    struct sl_tls_ctx_snap *s = calloc(1, sizeof *s);
    *rc = -ENOMEM;
    if (!s) {
        sl_fmt_err(err, err_len, "out of memory");
        return NULL;
    }
    atomic_init(&s->refs, 1);
    s->keys = keys ? sl_tls_ticket_keys_ref(keys) : NULL;
    s->ctxs = calloc(cf->cert_count, sizeof *s->ctxs);
    s->alpn = cf->alpn_len ? malloc(cf->alpn_len) : NULL;
    if (!s->ctxs || (cf->alpn_len && !s->alpn)) {
        sl_fmt_err(err, err_len, "out of memory");
        goto fail;
    }
    if (cf->alpn_len)
        memcpy(s->alpn, cf->alpn, cf->alpn_len);
    s->alpn_len = cf->alpn_len;
    *rc = compute_sid_ctx(cf, s->sid_ctx, err, err_len);
    if (*rc < 0)
        goto fail;
    *rc = -EINVAL;
    if (cf->client_ca_file) {
        store = X509_STORE_new();
        if (!store || X509_STORE_load_file(store, cf->client_ca_file) != 1) {
            sl__tls_fmt_err(err, err_len, "%s: cannot load the client CAs", cf->client_ca_file);
            goto fail;
        }
        ca_names = SSL_load_client_CA_file(cf->client_ca_file);
        if (!ca_names) {
            sl__tls_fmt_err(err, err_len, "%s: no CA certificate found", cf->client_ca_file);
            goto fail;
        }
    }
    for (size_t i = 0; i < cf->cert_count; i++) {
        s->ctxs[i] = build_server_ctx(cf, s, i, store, ca_names, err, err_len);
        if (!s->ctxs[i])
            goto fail;
        s->count = i + 1;
    }
    size_t names = 0;
    for (size_t i = 0; i < s->count; i++)
        cert_names(SSL_CTX_get0_certificate(s->ctxs[i]), NULL, 0, &names);
    size_t cap = 8;
    while (cap < names * 2)
        cap *= 2;
    s->slots = calloc(cap, sizeof *s->slots);
    if (!s->slots) {
        *rc = -ENOMEM;
        sl_fmt_err(err, err_len, "out of memory");
        goto fail;
    }
    s->mask = cap - 1;
    for (size_t i = 0; i < s->count; i++) {
        if (cert_names(SSL_CTX_get0_certificate(s->ctxs[i]), s, (uint32_t)i, NULL) < 0) {
            *rc = -ENOMEM;
            sl_fmt_err(err, err_len, "out of memory");
            goto fail;
        }
    }
    X509_STORE_free(store);
    sk_X509_NAME_pop_free(ca_names, X509_NAME_free);
    *rc = 0;
    return s;
fail:
    X509_STORE_free(store);
    sk_X509_NAME_pop_free(ca_names, X509_NAME_free);
    snap_free(s);
    ERR_clear_error();
    return NULL;
}

/* ---- server contexts ---- */

struct sl_tls_ctx *sl_tls_ctx_new(const struct sl_tls_server_desc *desc, char *err, size_t err_len)
{
    struct sl_tls_ctx *c = calloc(1, sizeof *c);
    if (!c) {
        sl_fmt_err(err, err_len, "out of memory");
        return NULL;
    }
    if (conf_init(&c->cf, desc, err, err_len) < 0) {
        free(c);
        return NULL;
    }
    if (pthread_mutex_init(&c->reload_lock, NULL) != 0) {
        sl_fmt_err(err, err_len, "cannot create the reload lock");
        goto fail;
    }
    if (desc->session_tickets) {
        if (desc->ticket_keys)
            c->keys = sl_tls_ticket_keys_ref(desc->ticket_keys);
        else if (!(c->keys = sl_tls_ticket_keys_new(0, 0, err, err_len)))
            goto fail_lock;
    }
    int rc;
    struct sl_tls_ctx_snap *s = build_snap(&c->cf, c->keys, err, err_len, &rc);
    if (!s)
        goto fail_lock;
    c->generation = s->generation = 1;
    atomic_init(&c->cur, s);
    atomic_init(&c->readers, 0);
    return c;
fail_lock:
    sl_tls_ticket_keys_free(c->keys);
    pthread_mutex_destroy(&c->reload_lock);
fail:
    conf_dispose(&c->cf);
    free(c);
    return NULL;
}

/*
 * Acquire without a lock: a reader announces itself in `readers` before loading `cur` and
 * leaves once it holds a reference. A reload exchanges `cur` first and then waits for `readers`
 * to reach zero before dropping the old snapshot's reference: any reader that could still have
 * loaded the old pointer announced itself before the exchange (sequentially consistent order),
 * so it is counted and the old snapshot stays alive until it has taken its reference. Readers
 * never wait; the reload waits a few nanoseconds. The cost per connection is two atomic
 * increments on a shared line, the same order as the SSL_CTX reference OpenSSL takes anyway.
 */
struct sl_tls_ctx_snap *sl_tls_ctx_acquire(struct sl_tls_ctx *c)
{
    atomic_fetch_add(&c->readers, 1);
    struct sl_tls_ctx_snap *s = atomic_load(&c->cur);
    atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
    atomic_fetch_sub_explicit(&c->readers, 1, memory_order_release);
    return s;
}

void sl_tls_ctx_snap_release(struct sl_tls_ctx_snap *s)
{
    if (s && atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) == 1)
        snap_free(s);
}

uint64_t sl_tls_ctx_snap_generation(const struct sl_tls_ctx_snap *s)
{
    return s->generation;
}

struct ssl_ctx_st *sl__tls_snap_initial(const struct sl_tls_ctx_snap *s)
{
    return s->ctxs[0];
}

int sl_tls_ctx_reload(struct sl_tls_ctx *c, char *err, size_t err_len)
{
    pthread_mutex_lock(&c->reload_lock);
    int rc;
    struct sl_tls_ctx_snap *s = build_snap(&c->cf, c->keys, err, err_len, &rc);
    if (s) {
        s->generation = ++c->generation;
        struct sl_tls_ctx_snap *old = atomic_exchange(&c->cur, s);
        while (atomic_load(&c->readers) != 0)
            sched_yield();
        sl_tls_ctx_snap_release(old);
    }
    pthread_mutex_unlock(&c->reload_lock);
    return rc;
}

void sl_tls_ctx_free(struct sl_tls_ctx *c)
{
    if (!c)
        return;
    sl_tls_ctx_snap_release(atomic_load(&c->cur));
    sl_tls_ticket_keys_free(c->keys);
    pthread_mutex_destroy(&c->reload_lock);
    conf_dispose(&c->cf);
    free(c);
}

uint64_t sl_tls_ctx_generation(struct sl_tls_ctx *c)
{
    struct sl_tls_ctx_snap *s = sl_tls_ctx_acquire(c);
    uint64_t g = s->generation;
    sl_tls_ctx_snap_release(s);
    return g;
}

size_t sl_tls_ctx_match(struct sl_tls_ctx *c, const char *name)
{
    struct sl_tls_ctx_snap *s = sl_tls_ctx_acquire(c);
    size_t i = snap_select(s, name);
    sl_tls_ctx_snap_release(s);
    return i;
}

/* ---- client contexts ---- */

struct sl_tls_client_ctx *sl_tls_client_ctx_new(const struct sl_tls_client_desc *d, char *err,
                                                size_t err_len)
{
    int min = parse_version(d->min_version, TLS1_2_VERSION, "min_version", err, err_len);
    if (min < 0)
        return NULL;
    int max = parse_version(d->max_version, 0, "max_version", err, err_len);
    if (max < 0)
        return NULL;
    if (max && max < min) {
        sl_fmt_err(err, err_len, "max_version is below min_version");
        return NULL;
    }
    if (!d->cert_file != !d->key_file) {
        sl_fmt_err(err, err_len, "a client certificate needs both cert_file and key_file");
        return NULL;
    }
    unsigned char *alpn = NULL;
    size_t alpn_len = 0;
    if (build_alpn(d->alpn, d->alpn_count, &alpn, &alpn_len, err, err_len) < 0)
        return NULL;
    struct sl_tls_client_ctx *c = calloc(1, sizeof *c);
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!c || !ctx) {
        sl__tls_fmt_err(err, err_len, "out of memory");
        goto fail;
    }
    if (apply_protocol(ctx, min, max, d->ciphers, d->ciphersuites, err, err_len) < 0)
        goto fail;
    c->verify = !d->skip_verify;
    if (c->verify) {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        int ok = d->ca_file ? SSL_CTX_load_verify_file(ctx, d->ca_file)
                            : SSL_CTX_set_default_verify_paths(ctx);
        if (ok != 1) {
            sl__tls_fmt_err(err, err_len, "%s: cannot load the CA certificates",
                            d->ca_file ? d->ca_file : "default trust store");
            goto fail;
        }
    }
    if (d->cert_file && load_cert_key(ctx, d->cert_file, d->key_file, err, err_len) < 0)
        goto fail;
    /* Note the inverted convention: SSL_CTX_set_alpn_protos returns 0 on success. */
    if (alpn_len && SSL_CTX_set_alpn_protos(ctx, alpn, (unsigned)alpn_len) != 0) {
        sl__tls_fmt_err(err, err_len, "cannot set the ALPN list");
        goto fail;
    }
    free(alpn);
    c->ctx = ctx;
    return c;
fail:
    SSL_CTX_free(ctx);
    free(c);
    free(alpn);
    ERR_clear_error();
    return NULL;
}

void sl_tls_client_ctx_free(struct sl_tls_client_ctx *c)
{
    if (!c)
        return;
    SSL_CTX_free(c->ctx);
    free(c);
}

struct ssl_ctx_st *sl__tls_client_ctx_ssl_ctx(const struct sl_tls_client_ctx *c)
{
    return c->ctx;
}

bool sl__tls_client_ctx_verifies(const struct sl_tls_client_ctx *c)
{
    return c->verify;
}
