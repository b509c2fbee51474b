/*
 * Memory an idle server-side TLS connection keeps: sl_tls_transport over OpenSSL 3.
 *
 * Build and run (from the repository root):
 *   make bench                       # builds build/release/bench/tls_idle_mem
 *   build/release/bench/tls_idle_mem [-n CONNS] [-v 1.2|1.3] [-m] [-s SITES] [-t TICKETS]
 *                                    [-r] [-x]
 *
 * An idle connection here is the keep-alive state: the handshake is done, one request was read
 * (until the read would block), one response written, and the server's next read returned
 * -EAGAIN. Two measurements:
 *
 * heap (default): the process counts OpenSSL's allocations through CRYPTO_set_mem_functions,
 *   tagged server or client by which side's call made them (both ends run in this process over
 *   socketpairs, one connection after another, all kept open). Reported per server
 *   connection: live bytes and live allocations after SSL_new, after the handshake and once
 *   idle, and (-s) the allocation sites (OpenSSL source file:line) that an idle connection
 *   still holds, largest first. glibc adds 8 bytes per allocation and rounds to 16, which the
 *   "with malloc overhead" column estimates from the live sizes.
 *
 * rss (-r): no allocation hooks; the clients run in a child process over loopback TCP, so the
 *   server process holds only server-side state. VmRSS and mallinfo2's in-use bytes are read
 *   before the connections (after one warm-up connection) and with all of them idle; the
 *   difference divided by the count is reported as is, then again after malloc_trim(0).
 *   The transports' own array is allocated and touched before the first sample (the owner's
 *   connection struct is not OpenSSL's memory); kernel socket memory is not in RSS.
 *
 * Options: -n connections (default 2000), -v TLS version (default: both), -m mutual TLS (the
 * client presents a certificate the server verifies), -t tickets per TLS 1.3 handshake
 * (SSL_set_num_tickets on each server connection; default: the context's), -x keep
 * OpenSSL's buffers (clear SSL_MODE_RELEASE_BUFFERS): the handshake figure then shows
 * what releasing saves; the idle one stays low since the transport frees them on idle reads.
 * Certificates (a P-256 CA, server and client leaves) are generated in-process into a
 * temporary directory that is removed at exit.
 */

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "core/transport.h"
#include "tls/tls_ctx.h"
#include "tls/tls_transport.h"

static const char request[] = "GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n";
static const char response[] = "HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nHello, world!";

struct opts {
    size_t conns;
    const char *version; /* NULL: both */
    bool mtls, rss, keep_buffers;
    const char *suites; /* -a: the client's TLS 1.3 suites (which one the server picks) */
    int key_update;     /* 0: none; 1: the client updates its keys; 2: and requests ours */
    int tickets;        /* -1: the context's default */
    size_t sites;
    size_t batch; /* rss mode: handshakes in flight at once */
};

/* ---- counting allocator ------------------------------------------------------------------ */

enum { TAG_OTHER = 0, TAG_SERVER, TAG_CLIENT, TAG_COUNT };
static int cur_tag, site_tag = 1; /* TAG_SERVER; -c: TAG_CLIENT */
static long live_bytes[TAG_COUNT], live_allocs[TAG_COUNT], live_chunk_bytes[TAG_COUNT];

#define SITE_SLOTS 8192u
struct site {
    const char *file;
    int line;
    long bytes, allocs;
};
static struct site sites[SITE_SLOTS];

struct hdr {
    size_t size;
    uint32_t site; /* index + 1 into sites, 0 when the table was full */
    int tag;
};

static size_t chunk_of(size_t n)
{
    /* glibc: 8 bytes of size header, 16-byte granularity, 32-byte minimum chunk. */
    size_t c = (n + 8 + 15) & ~(size_t)15;
    return c < 32 ? 32 : c;
}

static uint32_t site_of(const char *file, int line)
{
    uint64_t h = ((uint64_t)(uintptr_t)file * 0x9e3779b97f4a7c15ull) ^ (uint64_t)line;
    for (uint32_t i = (uint32_t)(h % SITE_SLOTS), k = 0; k < SITE_SLOTS;
         i = (i + 1) % SITE_SLOTS, k++) {
        if (sites[i].file == file && sites[i].line == line)
            return i + 1;
        if (!sites[i].file) {
            sites[i].file = file ? file : "?";
            sites[i].line = line;
            return i + 1;
        }
    }
    return 0;
}

static void account(struct hdr *h, long sign)
{
    live_bytes[h->tag] += sign * (long)h->size;
    live_allocs[h->tag] += sign;
    live_chunk_bytes[h->tag] += sign * (long)chunk_of(h->size + sizeof *h - 16);
    if (h->site && h->tag == site_tag) {
        sites[h->site - 1].bytes += sign * (long)h->size;
        sites[h->site - 1].allocs += sign;
    }
}

static void *cm_malloc(size_t n, const char *file, int line)
{
    struct hdr *h = malloc(sizeof *h + n);
    if (!h)
        return NULL;
    *h = (struct hdr){.size = n, .site = site_of(file, line), .tag = cur_tag};
    account(h, 1);
    return h + 1;
}

static void cm_free(void *p, const char *file, int line)
{
    (void)file;
    (void)line;
    if (!p)
        return;
    struct hdr *h = (struct hdr *)p - 1;
    account(h, -1);
    free(h);
}

static void *cm_realloc(void *p, size_t n, const char *file, int line)
{
    if (!p)
        return cm_malloc(n, file, line);
    if (n == 0) {
        cm_free(p, file, line);
        return NULL;
    }
    void *q = cm_malloc(n, file, line);
    if (!q)
        return NULL;
    struct hdr *h = (struct hdr *)p - 1;
    memcpy(q, p, h->size < n ? h->size : n);
    cm_free(p, file, line);
    return q;
}

/* ---- certificates ------------------------------------------------------------------------ */

static char dir[64];
static char ca_pem[128], srv_pem[128], srv_key[128], cli_pem[128], cli_key[128];

static void die(const char *what)
{
    fprintf(stderr, "tls_idle_mem: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

static EVP_PKEY *write_key(const char *path)
{
    EVP_PKEY *k = EVP_EC_gen("P-256");
    FILE *f = fopen(path, "w");
    if (!k || !f || PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL) != 1)
        die("cannot write a key");
    fclose(f);
    return k;
}

static void add_ext(X509 *x, X509 *issuer, int nid, const char *value)
{
    X509V3_CTX v;
    X509V3_set_ctx(&v, issuer, x, NULL, NULL, 0);
    X509_EXTENSION *e = X509V3_EXT_conf_nid(NULL, &v, nid, value);
    if (!e || X509_add_ext(x, e, -1) != 1)
        die("cannot add an extension");
    X509_EXTENSION_free(e);
}

/* A certificate for `key`, signed by (issuer, ikey), or self-signed when issuer is NULL. */
static X509 *write_cert(const char *path, EVP_PKEY *key, const char *cn, X509 *issuer,
                        EVP_PKEY *ikey, const char *san, const char *eku, long serial)
{
    X509 *x = X509_new();
    if (!x)
        die("out of memory");
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), serial);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 3600L * 24 * 365);
    X509_set_pubkey(x, key);
    X509_NAME *name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, (const unsigned char *)"Sluice Bench", -1,
                               -1, 0);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
    X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer) : name);
    if (issuer) {
        add_ext(x, issuer, NID_basic_constraints, "critical,CA:FALSE");
        add_ext(x, issuer, NID_ext_key_usage, eku);
        if (san)
            add_ext(x, issuer, NID_subject_alt_name, san);
    } else {
        add_ext(x, x, NID_basic_constraints, "critical,CA:TRUE");
        add_ext(x, x, NID_key_usage, "critical,keyCertSign,cRLSign");
    }
    if (X509_sign(x, issuer ? ikey : key, EVP_sha256()) <= 0)
        die("cannot sign a certificate");
    FILE *f = fopen(path, "w");
    if (!f || PEM_write_X509(f, x) != 1)
        die("cannot write a certificate");
    fclose(f);
    return x;
}

static void make_certs(void)
{
    snprintf(dir, sizeof dir, "/tmp/sluice_tlsmem_XXXXXX");
    if (!mkdtemp(dir))
        die("mkdtemp");
    snprintf(ca_pem, sizeof ca_pem, "%s/ca.pem", dir);
    snprintf(srv_pem, sizeof srv_pem, "%s/server.pem", dir);
    snprintf(srv_key, sizeof srv_key, "%s/server.key", dir);
    snprintf(cli_pem, sizeof cli_pem, "%s/client.pem", dir);
    snprintf(cli_key, sizeof cli_key, "%s/client.key", dir);
    char ca_key[128];
    snprintf(ca_key, sizeof ca_key, "%s/ca.key", dir);
    EVP_PKEY *cak = write_key(ca_key);
    X509 *ca = write_cert(ca_pem, cak, "Sluice Bench CA", NULL, NULL, NULL, NULL, 1);
    EVP_PKEY *sk = write_key(srv_key);
    X509 *s = write_cert(srv_pem, sk, "bench.test", ca, cak, "DNS:bench.test", "serverAuth", 2);
    EVP_PKEY *ck = write_key(cli_key);
    X509 *c = write_cert(cli_pem, ck, "bench client", ca, cak, NULL, "clientAuth", 3);
    X509_free(ca);
    X509_free(s);
    X509_free(c);
    EVP_PKEY_free(cak);
    EVP_PKEY_free(sk);
    EVP_PKEY_free(ck);
}

static void remove_certs(void)
{
    const char *files[] = {ca_pem, srv_pem, srv_key, cli_pem, cli_key};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
        unlink(files[i]);
    char ca_key[128];
    snprintf(ca_key, sizeof ca_key, "%s/ca.key", dir);
    unlink(ca_key);
    rmdir(dir);
}

static struct sl_tls_ctx *server_ctx(const struct opts *o, const char *version)
{
    static struct sl_tls_cert_desc cert;
    cert = (struct sl_tls_cert_desc){.cert_file = srv_pem, .key_file = srv_key};
    static const char *const alpn[] = {"http/1.1"};
    struct sl_tls_server_desc d = {.certs = &cert,
                                   .cert_count = 1,
                                   .min_version = version,
                                   .alpn = alpn,
                                   .alpn_count = 1,
                                   .client_ca_file = o->mtls ? ca_pem : NULL,
                                   .client_auth = o->mtls ? SL_TLS_CLIENT_AUTH_REQUIRED
                                                          : SL_TLS_CLIENT_AUTH_NONE,
                                   .session_tickets = true};
    char err[256];
    struct sl_tls_ctx *c = sl_tls_ctx_new(&d, err, sizeof err);
    if (!c) {
        fprintf(stderr, "tls_idle_mem: server context: %s\n", err);
        exit(1);
    }
    return c;
}

static struct sl_tls_client_ctx *client_ctx(const struct opts *o, const char *version)
{
    static const char *const alpn[] = {"http/1.1"};
    struct sl_tls_client_desc d = {.ca_file = ca_pem,
                                   .cert_file = o->mtls ? cli_pem : NULL,
                                   .key_file = o->mtls ? cli_key : NULL,
                                   .min_version = version,
                                   .max_version = version,
                                   .ciphersuites = o->suites,
                                   .alpn = alpn,
                                   .alpn_count = 1};
    char err[256];
    struct sl_tls_client_ctx *c = sl_tls_client_ctx_new(&d, err, sizeof err);
    if (!c) {
        fprintf(stderr, "tls_idle_mem: client context: %s\n", err);
        exit(1);
    }
    return c;
}

/* ---- one connection, step by step (both ends non-blocking) ------------------------------- */

static void wait_want(struct sl_tls_transport *t)
{
    struct pollfd p = {.fd = t->base.fd, .events = (short)sl_transport_want(&t->base, POLLIN)};
    if (poll(&p, 1, 10000) <= 0)
        die("timed out waiting for the peer");
}

/* The server's side of one keep-alive exchange: read the request until the read would block,
 * write the response, then read once more (-EAGAIN: the connection is idle). */
static void server_exchange(struct sl_tls_transport *t)
{
    char buf[4096];
    size_t got = 0, n;
    while (got < sizeof request - 1) {
        int rc = sl_transport_read(&t->base, buf + got, sizeof buf - got, &n);
        if (rc == -EAGAIN) {
            wait_want(t);
            continue;
        }
        if (rc != 0 || n == 0)
            die("server read failed");
        got += n;
    }
    struct iovec v = {(void *)response, sizeof response - 1};
    size_t sent = 0;
    while (sent < v.iov_len) {
        struct iovec r = {(char *)v.iov_base + sent, v.iov_len - sent};
        int rc = sl_transport_writev(&t->base, &r, 1, &n);
        sent += n;
        if (rc == -EAGAIN)
            wait_want(t);
        else if (rc != 0)
            die("server write failed");
    }
    if (sl_transport_read(&t->base, buf, sizeof buf, &n) != -EAGAIN)
        die("server: expected an idle connection");
}

static void client_send(struct sl_tls_transport *t)
{
    size_t sent = 0, n;
    while (sent < sizeof request - 1) {
        struct iovec r = {(char *)request + sent, sizeof request - 1 - sent};
        int rc = sl_transport_writev(&t->base, &r, 1, &n);
        sent += n;
        if (rc == -EAGAIN)
            wait_want(t);
        else if (rc != 0)
            die("client write failed");
    }
}

static void client_recv(struct sl_tls_transport *t)
{
    char buf[4096];
    size_t got = 0, n;
    while (got < sizeof response - 1) {
        int rc = sl_transport_read(&t->base, buf + got, sizeof buf - got, &n);
        if (rc == -EAGAIN) {
            wait_want(t);
            continue;
        }
        if (rc != 0 || n == 0)
            die("client read failed");
        got += n;
    }
}

static void tune_server(const struct opts *o, struct sl_tls_transport *t)
{
    SSL *ssl = sl_tls_ssl(t);
    if (o->keep_buffers)
        SSL_clear_mode(ssl, SSL_MODE_RELEASE_BUFFERS);
    if (o->tickets >= 0)
        SSL_set_num_tickets(ssl, (size_t)o->tickets);
}

/* ---- heap mode ----------------------------------------------------------------------------- */

struct stage {
    long bytes, allocs, chunks;
};

static struct stage snap_tag(int tag)
{
    return (struct stage){live_bytes[tag], live_allocs[tag], live_chunk_bytes[tag]};
}

static struct stage diff(struct stage a, struct stage b)
{
    return (struct stage){b.bytes - a.bytes, b.allocs - a.allocs, b.chunks - a.chunks};
}

static void print_stage(const char *what, struct stage s, size_t n)
{
    printf("  %-34s %8.0f B %6.1f allocs  (%6.0f B with malloc overhead)\n", what,
           (double)s.bytes / (double)n, (double)s.allocs / (double)n, (double)s.chunks / (double)n);
}

static int by_bytes(const void *a, const void *b)
{
    const struct site *x = a, *y = b;
    return (y->bytes > x->bytes) - (y->bytes < x->bytes);
}

static void heap_run(const struct opts *o, const char *version)
{
    struct sl_tls_ctx *sc = server_ctx(o, version);
    struct sl_tls_client_ctx *cc = client_ctx(o, version);
    size_t n = o->conns;
    struct sl_tls_transport *srv = calloc(n + 1, sizeof *srv), *cli = calloc(n + 1, sizeof *cli);
    if (!srv || !cli)
        die("out of memory");
    struct stage s0 = {0}, s_new = {0}, s_hs = {0}, s_idle = {0}, c0 = {0}, c_idle = {0};
    /* Connection 0 is a warm-up: OpenSSL builds some tables lazily on first use (kept
     * process-wide); counting starts with connection 1. */
    for (size_t i = 0; i <= n; i++) {
        if (i == 1) {
            for (size_t k = 0; k < SITE_SLOTS; k++)
                sites[k].bytes = sites[k].allocs = 0;
            s0 = snap_tag(TAG_SERVER);
            c0 = snap_tag(TAG_CLIENT);
        }
        int fds[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) < 0)
            die("socketpair (raise the open-file limit?)");
        struct stage a = snap_tag(TAG_SERVER);
        cur_tag = TAG_SERVER;
        if (sl_tls_transport_init_server(&srv[i], fds[0], sc) != 0)
            die("init_server");
        tune_server(o, &srv[i]);
        struct stage b = snap_tag(TAG_SERVER);
        cur_tag = TAG_CLIENT;
        if (sl_tls_transport_init_client(&cli[i], fds[1], cc, "bench.test", NULL) != 0)
            die("init_client");
        /* Step both handshakes in turn until both are done. */
        enum sl_status ss = SL_AGAIN, cs = SL_AGAIN;
        for (int spins = 0; ss == SL_AGAIN || cs == SL_AGAIN; spins++) {
            if (spins > 1000)
                die("handshake does not progress");
            cur_tag = TAG_SERVER;
            if (ss == SL_AGAIN)
                ss = sl_tls_handshake(&srv[i]);
            cur_tag = TAG_CLIENT;
            if (cs == SL_AGAIN)
                cs = sl_tls_handshake(&cli[i]);
            if (ss == SL_ERROR || cs == SL_ERROR)
                die("handshake failed");
        }
        struct stage c = snap_tag(TAG_SERVER);
        cur_tag = TAG_CLIENT;
        if (o->key_update && SSL_key_update(sl_tls_ssl(&cli[i]),
                                            o->key_update == 2 ? SSL_KEY_UPDATE_REQUESTED
                                                               : SSL_KEY_UPDATE_NOT_REQUESTED) != 1)
            die("key update");
        client_send(&cli[i]);
        cur_tag = TAG_SERVER;
        server_exchange(&srv[i]);
        cur_tag = TAG_CLIENT;
        client_recv(&cli[i]);
        cur_tag = TAG_OTHER;
        struct stage d = snap_tag(TAG_SERVER);
        if (i > 0) {
            s_new.bytes += b.bytes - a.bytes;
            s_new.allocs += b.allocs - a.allocs;
            s_new.chunks += b.chunks - a.chunks;
            s_hs.bytes += c.bytes - a.bytes;
            s_hs.allocs += c.allocs - a.allocs;
            s_hs.chunks += c.chunks - a.chunks;
        }
        (void)d;
    }
    s_idle = diff(s0, snap_tag(TAG_SERVER));
    c_idle = diff(c0, snap_tag(TAG_CLIENT));
    printf("TLS %s%s, %zu server connections (heap, OpenSSL allocations per connection):\n",
           version, o->mtls ? " + client certificate" : "", n);
    print_stage("after SSL_new", s_new, n);
    print_stage("after the handshake", s_hs, n);
    print_stage("idle after one request", s_idle, n);
    print_stage("(client side, idle, for contrast)", c_idle, n);
    if (o->sites) {
        static struct site sorted[SITE_SLOTS];
        memcpy(sorted, sites, sizeof sites);
        qsort(sorted, SITE_SLOTS, sizeof sorted[0], by_bytes);
        printf("  what an idle %s connection holds, by allocation site:\n",
               site_tag == TAG_CLIENT ? "client" : "server");
        for (size_t k = 0; k < o->sites && k < SITE_SLOTS && sorted[k].bytes > 0; k++)
            printf("    %7.0f B %5.2f allocs  %s:%d\n", (double)sorted[k].bytes / (double)n,
                   (double)sorted[k].allocs / (double)n, sorted[k].file, sorted[k].line);
    }
    /* Resumption still works with what the idle connections kept: one more connection offering
     * the last client's session. */
    SSL_SESSION *sess = sl_tls_get1_session(&cli[n]);
    for (size_t i = 0; i <= n; i++) {
        cur_tag = TAG_SERVER;
        sl_transport_close(&srv[i].base);
        cur_tag = TAG_CLIENT;
        sl_transport_close(&cli[i].base);
    }
    cur_tag = TAG_OTHER;
    if (sess) {
        int fds[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) < 0)
            die("socketpair");
        struct sl_tls_transport s, c;
        if (sl_tls_transport_init_server(&s, fds[0], sc) != 0 ||
            sl_tls_transport_init_client(&c, fds[1], cc, "bench.test", sess) != 0)
            die("init");
        enum sl_status ss = SL_AGAIN, cs = SL_AGAIN;
        for (int spins = 0; (ss == SL_AGAIN || cs == SL_AGAIN) && spins < 1000; spins++) {
            if (ss == SL_AGAIN)
                ss = sl_tls_handshake(&s);
            if (cs == SL_AGAIN)
                cs = sl_tls_handshake(&c);
        }
        printf("  resumption with the last session: %s\n",
               ss == SL_OK && sl_tls_is_resumed(&s) ? "yes" : "NO");
        sl_transport_close(&s.base);
        sl_transport_close(&c.base);
        SSL_SESSION_free(sess);
    } else {
        printf("  resumption: the client got no resumable session\n");
    }
    free(srv);
    free(cli);
    sl_tls_client_ctx_free(cc);
    sl_tls_ctx_free(sc);
}

/* ---- rss mode ------------------------------------------------------------------------------ */

static long status_kib(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return -1;
    char line[256];
    long v = -1;
    size_t kl = strlen(key);
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, key, kl) == 0 && line[kl] == ':') {
            v = strtol(line + kl + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return v;
}

/*
 * Concurrent connections, for the RSS mode: each end steps every connection of a batch in turn
 * (handshake, then its half of the exchange) and polls for what they wait for when none made
 * progress, so up to `batch` handshakes overlap as they would on a busy listener and their
 * transient allocations interleave with the long-lived ones.
 */
enum { ST_HS = 0, ST_SEND, ST_RECV, ST_IDLE, ST_DONE };

struct peer {
    struct sl_tls_transport t;
    int st;
    size_t cnt;
};

/* One step of connection `p`. Returns true when it made progress. */
static bool step(struct peer *p, bool server)
{
    const char *out = server ? response : request;
    size_t out_len = server ? sizeof response - 1 : sizeof request - 1;
    size_t in_len = server ? sizeof request - 1 : sizeof response - 1;
    char buf[4096];
    size_t n = 0;
    int rc;
    switch (p->st) {
    case ST_HS: {
        enum sl_status st = sl_tls_handshake(&p->t);
        if (st == SL_ERROR)
            die("handshake failed");
        if (st == SL_AGAIN)
            return false;
        p->st = server ? ST_RECV : ST_SEND;
        return true;
    }
    case ST_SEND: {
        struct iovec v = {(char *)out + p->cnt, out_len - p->cnt};
        rc = sl_transport_writev(&p->t.base, &v, 1, &n);
        if (rc != 0 && rc != -EAGAIN)
            die("write failed");
        p->cnt += n;
        if (p->cnt == out_len) {
            p->cnt = 0;
            p->st = server ? ST_IDLE : ST_RECV;
        }
        return n > 0;
    }
    case ST_RECV:
        rc = sl_transport_read(&p->t.base, buf, sizeof buf, &n);
        if (rc == -EAGAIN)
            return false;
        if (rc != 0 || n == 0)
            die("read failed");
        p->cnt += n;
        if (p->cnt >= in_len) {
            p->cnt = 0;
            p->st = server ? ST_SEND : ST_DONE;
        }
        return true;
    case ST_IDLE: /* the server's read that finds the connection idle */
        if (sl_transport_read(&p->t.base, buf, sizeof buf, &n) != -EAGAIN)
            die("server: expected an idle connection");
        p->st = ST_DONE;
        return true;
    default:
        return false;
    }
}

static void drive(struct peer *ps, size_t count, bool server)
{
    struct pollfd *pfd = calloc(count, sizeof *pfd);
    if (!pfd)
        die("out of memory");
    for (;;) {
        bool progress = false, all_done = true;
        for (size_t i = 0; i < count; i++) {
            while (ps[i].st != ST_DONE && step(&ps[i], server))
                progress = true;
            all_done &= ps[i].st == ST_DONE;
        }
        if (all_done)
            break;
        if (progress)
            continue;
        nfds_t nf = 0;
        for (size_t i = 0; i < count; i++) {
            if (ps[i].st != ST_DONE)
                pfd[nf++] =
                    (struct pollfd){.fd = ps[i].t.base.fd,
                                    .events = (short)sl_transport_want(&ps[i].t.base, POLLIN)};
        }
        if (poll(pfd, nf, 10000) <= 0)
            die("timed out waiting for the peer");
    }
    free(pfd);
}

/* The clients: batches of connections, each handshaken, one request sent and its response
 * read, all kept open until the parent closes `ctl`. */
static void client_proc(const struct opts *o, const char *version, uint16_t port, int ctl)
{
    struct sl_tls_client_ctx *cc = client_ctx(o, version);
    size_t total = o->conns + 1;
    struct peer *cli = calloc(total, sizeof *cli);
    if (!cli)
        die("out of memory");
    for (size_t first = 0; first < total;) {
        size_t count = first == 0 ? 1 : o->batch; /* connection 0 alone: the warm-up */
        if (count > total - first)
            count = total - first;
        for (size_t i = first; i < first + count; i++) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            int one = 1;
            if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0 ||
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
                die("connect");
            fcntl(fd, F_SETFL, O_NONBLOCK);
            if (sl_tls_transport_init_client(&cli[i].t, fd, cc, "bench.test", NULL) != 0)
                die("init_client");
        }
        drive(cli + first, count, false);
        first += count;
    }
    char c = 'd';
    if (write(ctl, &c, 1) != 1)
        die("ctl write");
    (void)!read(ctl, &c, 1); /* until the parent is done measuring */
    for (size_t i = 0; i < total; i++)
        sl_transport_close(&cli[i].t.base);
    free(cli);
    sl_tls_client_ctx_free(cc);
}

static void rss_run(const struct opts *o, const char *version)
{
    struct sl_tls_ctx *sc = server_ctx(o, version);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof a;
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 4096) < 0 ||
        getsockname(ls, (struct sockaddr *)&a, &al) < 0)
        die("listen");
    int ctl[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, ctl) < 0)
        die("socketpair");
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        close(ctl[0]);
        close(ls);
        client_proc(o, version, ntohs(a.sin_port), ctl[1]);
        _exit(0);
    }
    close(ctl[1]);
    size_t total = o->conns + 1;
    struct peer *srv = calloc(total, sizeof *srv);
    struct pollfd *pfd = calloc(o->batch, sizeof *pfd);
    if (!srv || !pfd)
        die("out of memory");
    memset(srv, 0, total * sizeof *srv); /* touched: the owner's memory, not OpenSSL's */
    long rss0 = 0;
    size_t heap0 = 0;
    for (size_t first = 0; first < total;) {
        size_t count = first == 0 ? 1 : o->batch;
        if (count > total - first)
            count = total - first;
        if (first == 1) {
            rss0 = status_kib("VmRSS");
            heap0 = mallinfo2().uordblks;
        }
        for (size_t i = first; i < first + count; i++) {
            int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            int one = 1; /* as sluice's listeners do: no Nagle wait behind small records */
            if (fd < 0 || setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
                die("accept");
            if (sl_tls_transport_init_server(&srv[i].t, fd, sc) != 0)
                die("init_server");
            tune_server(o, &srv[i].t);
        }
        drive(srv + first, count, true);
        first += count;
    }
    char c;
    if (read(ctl[0], &c, 1) != 1)
        die("client process failed");
    size_t n = o->conns;
    long rss1 = status_kib("VmRSS");
    size_t heap1 = mallinfo2().uordblks;
    malloc_trim(0);
    long rss2 = status_kib("VmRSS");
    printf("TLS %s%s, %zu idle server connections, %zu handshakes at a time, clients in another "
           "process (RSS):\n",
           version, o->mtls ? " + client certificate" : "", n, o->batch);
    printf("  RSS delta per connection           %8.0f B (%.2f KiB)\n",
           (double)(rss1 - rss0) * 1024 / (double)n, (double)(rss1 - rss0) / (double)n);
    printf("  after malloc_trim(0)               %8.0f B (%.2f KiB)\n",
           (double)(rss2 - rss0) * 1024 / (double)n, (double)(rss2 - rss0) / (double)n);
    printf("  malloc in-use bytes per connection %8.0f B\n", (double)(heap1 - heap0) / (double)n);
    close(ctl[0]);
    int st;
    waitpid(pid, &st, 0);
    for (size_t i = 0; i < total; i++)
        sl_transport_close(&srv[i].t.base);
    free(srv);
    free(pfd);
    close(ls);
    sl_tls_ctx_free(sc);
}

int main(int argc, char **argv)
{
    struct opts o = {.conns = 2000, .tickets = -1, .batch = 1};
    int opt;
    while ((opt = getopt(argc, argv, "n:v:ms:t:rxck:p:a:")) != -1) {
        switch (opt) {
        case 'n':
            o.conns = strtoul(optarg, NULL, 10);
            break;
        case 'v':
            o.version = optarg;
            break;
        case 'm':
            o.mtls = true;
            break;
        case 's':
            o.sites = strtoul(optarg, NULL, 10);
            break;
        case 't':
            o.tickets = (int)strtol(optarg, NULL, 10);
            break;
        case 'r':
            o.rss = true;
            break;
        case 'x':
            o.keep_buffers = true;
            break;
        case 'c':
            site_tag = TAG_CLIENT;
            break;
        case 'a':
            o.suites = optarg;
            break;
        case 'p':
            o.batch = strtoul(optarg, NULL, 10);
            break;
        case 'k':
            o.key_update = (int)strtol(optarg, NULL, 10);
            break;
        default:
            fprintf(stderr,
                    "usage: %s [-n CONNS] [-v 1.2|1.3] [-m] [-s SITES] [-t TICKETS] "
                    "[-r] [-x]\n",
                    argv[0]);
            return 2;
        }
    }
    if (o.conns == 0)
        o.conns = 1;
    if (o.batch == 0)
        o.batch = 1;
    /* Before any OpenSSL allocation, or OpenSSL refuses the hooks. */
    if (!o.rss && !CRYPTO_set_mem_functions(cm_malloc, cm_realloc, cm_free))
        die("cannot install the allocation hooks");
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        size_t fit = rl.rlim_cur > 64 ? (rl.rlim_cur - 32) / (o.rss ? 1 : 2) - 1 : 1;
        if (o.conns > fit) {
            fprintf(stderr, "tls_idle_mem: %zu connections need more open files; using %zu\n",
                    o.conns, fit);
            o.conns = fit;
        }
    }
    make_certs();
    const char *versions[2] = {"1.3", "1.2"};
    for (int v = 0; v < 2; v++) {
        if (o.version && strcmp(o.version, versions[v]) != 0)
            continue;
        if (o.rss)
            rss_run(&o, versions[v]);
        else
            heap_run(&o, versions[v]);
    }
    remove_certs();
    return 0;
}
