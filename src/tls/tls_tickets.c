#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include "core/fmt.h"
#include "core/loop.h"
#include "tls/tls_tickets.h"

/*
 * Why a sequence lock rather than a refcounted pointer to an immutable ring: taking a reference
 * on a pointer that another thread may swap and free at the same moment needs hazard pointers
 * or a grace period; here the ring lives inline in the manager and is never freed while the
 * manager exists, so there is nothing to reclaim. A reader copies the one key it needs (80
 * bytes) between two reads of `seq` and retries if a rotation overlapped, which happens once per
 * rotation interval at most. Readers write no shared memory, so handshakes on many workers do
 * not bounce a cache line; the writer side (rotation) is serialised by a mutex that handshakes
 * only ever try-lock.
 *
 * The key words are atomics accessed with relaxed loads and stores so that the racy copy is
 * well defined in C11; the fences around `seq` give the usual seqlock ordering.
 *
 * Ticket format is OpenSSL's (key name, IV, AES-256-CBC body, HMAC-SHA256): the evp callback
 * only supplies the keys, it cannot select an AEAD.
 */

#define KEY_WORDS 10 /* 16-byte name, 32-byte AES-256 key, 32-byte HMAC-SHA256 key */
#define AES_OFF 16
#define HMAC_OFF 48
#define HMAC_BYTES 32

struct key {
    uint64_t w[KEY_WORDS];
};

struct sl_tls_ticket_keys {
    _Atomic unsigned refs;
    _Atomic uint64_t seq; /* odd while a rotation writes the ring */
    _Atomic uint64_t ring[SL_TLS_TICKET_KEYS_MAX][KEY_WORDS];
    _Atomic unsigned head;  /* slot of the current key; older keys precede it (mod capacity) */
    _Atomic unsigned count; /* keys in the ring */
    _Atomic uint64_t next_rotation_ms;
    _Atomic uint64_t rotations;
    uint64_t rotation_ms;
    unsigned capacity;
    pthread_mutex_t write_lock;
    EVP_CIPHER *cipher;
};

static pthread_once_t ex_once = PTHREAD_ONCE_INIT;
static int ex_index = -1;

static void ex_index_init(void)
{
    ex_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

static void pause_reader(unsigned spins)
{
    /* A writer holds the odd sequence for a few hundred nanoseconds; yield only if it was
     * preempted in the middle. */
    if (spins > 64)
        sched_yield();
}

static void copy_slot(struct sl_tls_ticket_keys *k, unsigned slot, struct key *out)
{
    for (unsigned i = 0; i < KEY_WORDS; i++)
        out->w[i] = atomic_load_explicit(&k->ring[slot][i], memory_order_relaxed);
}

static void read_current(struct sl_tls_ticket_keys *k, struct key *out)
{
    for (unsigned spins = 0;; spins++) {
        uint64_t s1 = atomic_load_explicit(&k->seq, memory_order_acquire);
        if (!(s1 & 1)) {
            unsigned h = atomic_load_explicit(&k->head, memory_order_relaxed);
            copy_slot(k, h % k->capacity, out);
            atomic_thread_fence(memory_order_acquire);
            if (atomic_load_explicit(&k->seq, memory_order_relaxed) == s1)
                return;
        }
        pause_reader(spins);
    }
}

/* Copies the key named `name`. Returns 0 when no key has that name, 1 for the current key, 2
 * for an older one. */
static int read_named(struct sl_tls_ticket_keys *k, const unsigned char *name, struct key *out)
{
    uint64_t n0, n1;
    memcpy(&n0, name, 8);
    memcpy(&n1, name + 8, 8);
    for (unsigned spins = 0;; spins++) {
        uint64_t s1 = atomic_load_explicit(&k->seq, memory_order_acquire);
        if (!(s1 & 1)) {
            unsigned h = atomic_load_explicit(&k->head, memory_order_relaxed);
            unsigned c = atomic_load_explicit(&k->count, memory_order_relaxed);
            int found = 0;
            for (unsigned j = 0; j < c && j < k->capacity; j++) {
                unsigned slot = (h + k->capacity - j) % k->capacity;
                if (atomic_load_explicit(&k->ring[slot][0], memory_order_relaxed) == n0 &&
                    atomic_load_explicit(&k->ring[slot][1], memory_order_relaxed) == n1) {
                    copy_slot(k, slot, out);
                    found = j == 0 ? 1 : 2;
                    break;
                }
            }
            atomic_thread_fence(memory_order_acquire);
            if (atomic_load_explicit(&k->seq, memory_order_relaxed) == s1)
                return found;
        }
        pause_reader(spins);
    }
}

/* Caller holds write_lock. */
static int rotate_locked(struct sl_tls_ticket_keys *k)
{
    struct key nk;
    if (RAND_bytes((unsigned char *)nk.w, (int)sizeof nk.w) != 1) {
        ERR_clear_error();
        return -EIO;
    }
    unsigned h = (atomic_load_explicit(&k->head, memory_order_relaxed) + 1) % k->capacity;
    unsigned c = atomic_load_explicit(&k->count, memory_order_relaxed);
    if (c < k->capacity)
        c++;
    uint64_t s = atomic_load_explicit(&k->seq, memory_order_relaxed);
    atomic_store_explicit(&k->seq, s + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    for (unsigned i = 0; i < KEY_WORDS; i++)
        atomic_store_explicit(&k->ring[h][i], nk.w[i], memory_order_relaxed);
    atomic_store_explicit(&k->head, h, memory_order_relaxed);
    atomic_store_explicit(&k->count, c, memory_order_relaxed);
    atomic_store_explicit(&k->seq, s + 2, memory_order_release);
    OPENSSL_cleanse(&nk, sizeof nk);
    atomic_fetch_add_explicit(&k->rotations, 1, memory_order_relaxed);
    return 0;
}

/*
 * Rotation driven by handshakes, so that no timer has to be wired: the check is one relaxed load
 * and a clock read; the handshake that finds the rotation due try-locks and rotates, the others
 * go on with the current key. After a long quiet period it rotates once per elapsed interval (up
 * to the ring size) so that an idle night does not stretch the acceptance window of old keys.
 */
static void maybe_rotate(struct sl_tls_ticket_keys *k)
{
    uint64_t now = sl_clock_now_ms();
    if (now < atomic_load_explicit(&k->next_rotation_ms, memory_order_relaxed))
        return;
    if (pthread_mutex_trylock(&k->write_lock) != 0)
        return;
    uint64_t due = atomic_load_explicit(&k->next_rotation_ms, memory_order_relaxed);
    if (now >= due) {
        uint64_t periods = (now - due) / k->rotation_ms + 1;
        if (periods > k->capacity)
            periods = k->capacity;
        for (uint64_t i = 0; i < periods; i++)
            if (rotate_locked(k) < 0)
                break;
        atomic_store_explicit(&k->next_rotation_ms, now + k->rotation_ms, memory_order_relaxed);
    }
    pthread_mutex_unlock(&k->write_lock);
}

static int init_cipher_ctxs(const struct sl_tls_ticket_keys *k, const struct key *key,
                            const unsigned char *iv, EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx,
                            int enc)
{
    const unsigned char *bytes = (const unsigned char *)key->w;
    OSSL_PARAM params[3];
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, (void *)(bytes + HMAC_OFF),
                                                  HMAC_BYTES);
    params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[2] = OSSL_PARAM_construct_end();
    int ok = enc ? EVP_EncryptInit_ex2(cctx, k->cipher, bytes + AES_OFF, iv, NULL)
                 : EVP_DecryptInit_ex2(cctx, k->cipher, bytes + AES_OFF, iv, NULL);
    return ok == 1 && EVP_MAC_CTX_set_params(hctx, params) == 1;
}

/*
 * OpenSSL's contract: encrypting, fill the name and IV and return 1 (0 issues no ticket, -1
 * fails); decrypting, return 0 for an unknown name (full handshake), 1 for a valid ticket, 2 for
 * a valid ticket that should be replaced by one under the current key.
 */
static int on_ticket_key(SSL *s, unsigned char *name, unsigned char *iv, EVP_CIPHER_CTX *cctx,
                         EVP_MAC_CTX *hctx, int enc)
{
    struct sl_tls_ticket_keys *k = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(s), ex_index);
    if (!k)
        return 0;
    maybe_rotate(k);
    struct key key;
    int rc;
    if (enc) {
        read_current(k, &key);
        int iv_len = EVP_CIPHER_get_iv_length(k->cipher);
        if (iv_len <= 0 || RAND_bytes(iv, iv_len) != 1) {
            rc = -1;
            goto out;
        }
        memcpy(name, key.w, SL_TLS_TICKET_NAME_BYTES);
        rc = init_cipher_ctxs(k, &key, iv, cctx, hctx, 1) ? 1 : -1;
    } else {
        int found = read_named(k, name, &key);
        if (!found) {
            rc = 0;
            goto out;
        }
        rc = init_cipher_ctxs(k, &key, iv, cctx, hctx, 0) ? found : -1;
    }
out:
    OPENSSL_cleanse(&key, sizeof key);
    return rc;
}

struct sl_tls_ticket_keys *sl_tls_ticket_keys_new(uint64_t rotation_ms, unsigned key_count,
                                                  char *err, size_t err_len)
{
    if (rotation_ms == 0)
        rotation_ms = SL_TLS_TICKET_ROTATION_DEFAULT_MS;
    if (key_count == 0)
        key_count = SL_TLS_TICKET_KEYS_DEFAULT_COUNT;
    if (key_count < 2 || key_count > SL_TLS_TICKET_KEYS_MAX) {
        sl_fmt_err(err, err_len, "ticket key count must be 2 to %u (got %u)",
                   SL_TLS_TICKET_KEYS_MAX, key_count);
        return NULL;
    }
    pthread_once(&ex_once, ex_index_init);
    if (ex_index < 0) {
        sl_fmt_err(err, err_len, "cannot allocate an OpenSSL ex_data index");
        return NULL;
    }
    struct sl_tls_ticket_keys *k = calloc(1, sizeof *k);
    if (!k) {
        sl_fmt_err(err, err_len, "out of memory");
        return NULL;
    }
    k->rotation_ms = rotation_ms;
    k->capacity = key_count;
    atomic_init(&k->refs, 1);
    if (pthread_mutex_init(&k->write_lock, NULL) != 0) {
        free(k);
        sl_fmt_err(err, err_len, "cannot create the ticket key lock");
        return NULL;
    }
    /* Fetched once: an implicit fetch per ticket would search the provider store each time. */
    k->cipher = EVP_CIPHER_fetch(NULL, "AES-256-CBC", NULL);
    if (!k->cipher) {
        sl_fmt_err(err, err_len, "AES-256-CBC unavailable for session tickets");
        goto fail;
    }
    /* The first key lands in slot 1 % capacity with count 1; rotate_locked does the stores. */
    atomic_init(&k->head, 0);
    atomic_init(&k->count, 0);
    if (rotate_locked(k) < 0) {
        sl_fmt_err(err, err_len, "RAND_bytes failed for a session ticket key");
        goto fail;
    }
    atomic_store(&k->rotations, 0);
    atomic_store(&k->next_rotation_ms, sl_clock_now_ms() + rotation_ms);
    return k;
fail:
    EVP_CIPHER_free(k->cipher);
    pthread_mutex_destroy(&k->write_lock);
    free(k);
    ERR_clear_error();
    return NULL;
}

struct sl_tls_ticket_keys *sl_tls_ticket_keys_ref(struct sl_tls_ticket_keys *k)
{
    atomic_fetch_add_explicit(&k->refs, 1, memory_order_relaxed);
    return k;
}

void sl_tls_ticket_keys_free(struct sl_tls_ticket_keys *k)
{
    if (!k || atomic_fetch_sub_explicit(&k->refs, 1, memory_order_acq_rel) != 1)
        return;
    OPENSSL_cleanse((void *)k->ring, sizeof k->ring);
    EVP_CIPHER_free(k->cipher);
    pthread_mutex_destroy(&k->write_lock);
    free(k);
}

int sl_tls_ticket_keys_rotate(struct sl_tls_ticket_keys *k)
{
    pthread_mutex_lock(&k->write_lock);
    int rc = rotate_locked(k);
    if (rc == 0)
        atomic_store_explicit(&k->next_rotation_ms, sl_clock_now_ms() + k->rotation_ms,
                              memory_order_relaxed);
    pthread_mutex_unlock(&k->write_lock);
    return rc;
}

uint64_t sl_tls_ticket_keys_rotations(const struct sl_tls_ticket_keys *k)
{
    return atomic_load_explicit(&k->rotations, memory_order_relaxed);
}

uint64_t sl_tls_ticket_keys_lifetime_s(const struct sl_tls_ticket_keys *k)
{
    uint64_t s = (k->capacity - 1) * k->rotation_ms / 1000;
    return s ? s : 1;
}

int sl_tls_ticket_keys_attach(struct ssl_ctx_st *ctx, struct sl_tls_ticket_keys *k)
{
    if (SSL_CTX_set_ex_data(ctx, ex_index, k) != 1 ||
        SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, on_ticket_key) != 1) {
        ERR_clear_error();
        return -ENOMEM;
    }
    SSL_CTX_set_timeout(ctx, (long)sl_tls_ticket_keys_lifetime_s(k));
    return 0;
}
