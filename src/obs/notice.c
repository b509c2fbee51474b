#include "obs/notice.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "config/config.h"
#include "core/fmt.h"
#include "core/log.h"
#include "core/loop.h"
#include "http/fetch.h"

#define ATTEMPT_MAX_MS 2000u
#define EXCERPT_MAX 200u
#define RESP_MAX_BYTES 4096u /* of the notice's body; only an excerpt is used */
#define TOKEN_MAX 512u
#define TOKEN_TTL_S 21600u /* what the AWS documentation uses: 6 h */
#define TOKEN_RENEW_MS (TOKEN_TTL_S * 1000ull - 10ull * 60 * 1000) /* 10 min of slack */
#define ERR_LEN 256u

struct sl_notice {
    char *url;
    char *token_url; /* IMDSv2 token endpoint on the same host */
    char target[600];
    uint64_t interval_ms;
    uint64_t timeout_ms;
    struct sl_fetch_tls *tls; /* https only */
    int stop_fd;              /* eventfd: stop (also cancels a fetch in flight) */
    sl_notice_cb on_notice;
    void *data;
    pthread_t thread;

    /* the thread's own */
    char token[TOKEN_MAX + 1]; /* "" = none; a secret */
    uint64_t token_renew_ms;
    unsigned errors_in_row;
};

static bool stop_requested(const struct sl_notice *n)
{
    struct pollfd p = {.fd = n->stop_fd, .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

/* Waits until `until_ms` or a stop; true when stopped. */
static bool sleep_until(const struct sl_notice *n, uint64_t until_ms)
{
    for (;;) {
        uint64_t now = sl_clock_now_ms();
        if (now >= until_ms)
            return stop_requested(n);
        uint64_t left = until_ms - now;
        struct pollfd p = {.fd = n->stop_fd, .events = POLLIN};
        int r = poll(&p, 1, left > INT32_MAX ? INT32_MAX : (int)left);
        if (r > 0)
            return true;
        if (r < 0 && errno != EINTR)
            return stop_requested(n);
    }
}

static void clear_token(struct sl_notice *n)
{
    OPENSSL_cleanse(n->token, sizeof n->token);
    n->token_renew_ms = 0;
}

/* A token goes into a header: visible ASCII only. */
static bool is_token(const char *s, size_t len)
{
    if (len == 0 || len > TOKEN_MAX)
        return false;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] <= 0x20 || (unsigned char)s[i] >= 0x7f)
            return false;
    return true;
}

/* IMDSv2: PUT /latest/api/token. True when a token was stored. */
static bool fetch_token(struct sl_notice *n)
{
    char err[ERR_LEN] = "";
    char ttl[64];
    snprintf(ttl, sizeof ttl, "X-aws-ec2-metadata-token-ttl-seconds: %u\r\n", TOKEN_TTL_S);
    struct sl_fetch_req rq = {.method = "PUT",
                              .url = n->token_url,
                              .extra_headers = ttl,
                              .timeout_ms = n->timeout_ms,
                              .max_body_bytes = TOKEN_MAX,
                              .tls = n->tls,
                              .cancel_fd = &n->stop_fd};
    struct sl_fetch_resp r;
    int rc = sl_fetch(&rq, &r, err, sizeof err);
    bool ok = false;
    if (rc == 0) {
        size_t len = r.body_len;
        while (len > 0 && (r.body[len - 1] == '\n' || r.body[len - 1] == '\r'))
            len--;
        ok = r.status == 200 && is_token(r.body, len);
        if (ok) {
            memcpy(n->token, r.body, len);
            n->token[len] = '\0';
            n->token_renew_ms = sl_clock_now_ms() + TOKEN_RENEW_MS;
        }
        OPENSSL_cleanse(r.body, r.body_len);
        sl_fetch_resp_dispose(&r);
    }
    return ok;
}

enum poll_result { NO_NOTICE, NOTICE, POLL_ERROR, UNAUTHORIZED };

/* One GET. NOTICE with the excerpt in `what`; POLL_ERROR with the reason in `err`. */
static enum poll_result poll_once(struct sl_notice *n, char *what, size_t what_cap, char *err,
                                  size_t err_len)
{
    char hdr[TOKEN_MAX + 64] = "";
    if (n->token[0])
        snprintf(hdr, sizeof hdr, "X-aws-ec2-metadata-token: %s\r\n", n->token);
    struct sl_fetch_req rq = {.url = n->url,
                              .extra_headers = hdr[0] ? hdr : NULL,
                              .timeout_ms = n->timeout_ms,
                              .max_body_bytes = RESP_MAX_BYTES,
                              .cut_body = true, /* a 200 with a long body is still a notice */
                              .tls = n->tls,
                              .cancel_fd = &n->stop_fd};
    struct sl_fetch_resp r;
    int rc = sl_fetch(&rq, &r, err, err_len);
    OPENSSL_cleanse(hdr, sizeof hdr);
    if (rc < 0)
        return POLL_ERROR;
    int status = r.status;
    if (status == 200) {
        size_t k = 0;
        for (size_t i = 0; i < r.body_len && k + 1 < what_cap && k < EXCERPT_MAX; i++) {
            unsigned char c = (unsigned char)r.body[i];
            what[k++] = (c >= 0x20 && c < 0x7f) ? (char)c : ' ';
        }
        what[k] = '\0';
    }
    sl_fetch_resp_dispose(&r);
    if (status == 200)
        return NOTICE;
    if (status == 404)
        return NO_NOTICE;
    if (status == 401)
        return UNAUTHORIZED;
    sl_fmt_err(err, err_len, "HTTP status %d", status);
    return POLL_ERROR;
}

static void note_error(struct sl_notice *n, const char *err)
{
    n->errors_in_row++;
    unsigned k = n->errors_in_row;
    if ((k & (k - 1)) == 0) /* the first, then each time the count doubles */
        SL_WARN("drain: polling %s for an interruption notice failed: %s (%u in a row; "
                "taken as no notice)",
                n->target, err, k);
}

static void *thread_main(void *arg)
{
    struct sl_notice *n = arg;
    uint64_t next = sl_clock_now_ms();
    for (;;) {
        if (sleep_until(n, next))
            break;
        next = sl_clock_now_ms() + n->interval_ms;
        if (n->token[0] && sl_clock_now_ms() >= n->token_renew_ms)
            clear_token(n);
        char what[EXCERPT_MAX + 1] = "", err[ERR_LEN] = "";
        enum poll_result res = poll_once(n, what, sizeof what, err, sizeof err);
        if (res == UNAUTHORIZED) {
            /* IMDSv2 wants a session token: get one and ask again at once */
            clear_token(n);
            if (fetch_token(n))
                res = poll_once(n, what, sizeof what, err, sizeof err);
            if (res == UNAUTHORIZED) {
                sl_fmt_err(err, sizeof err, "HTTP status 401 (and no session token)");
                res = POLL_ERROR;
            }
        }
        if (stop_requested(n))
            break;
        if (res == POLL_ERROR) {
            note_error(n, err);
            continue;
        }
        if (n->errors_in_row) {
            SL_INFO("drain: %s answers again after %u failed polls", n->target, n->errors_in_row);
            n->errors_in_row = 0;
        }
        if (res == NOTICE) {
            SL_WARN("drain: interruption notice from %s: %s", n->target, what);
            n->on_notice(n->data, what);
            break;
        }
    }
    clear_token(n);
    return NULL;
}

/* "<scheme>://<authority>/latest/api/token" */
static char *token_url(const struct sl_fetch_url *u)
{
    size_t len = strlen(u->authority) + 64;
    char *s = malloc(len);
    if (s)
        snprintf(s, len, "%s://%s/latest/api/token", u->https ? "https" : "http", u->authority);
    return s;
}

static void destroy(struct sl_notice *n)
{
    if (n->stop_fd >= 0)
        close(n->stop_fd);
    sl_fetch_tls_free(n->tls);
    free(n->url);
    free(n->token_url);
    free(n);
}

struct sl_notice *sl_notice_start(const struct sl_drain_conf *conf, sl_notice_cb on_notice,
                                  void *data, char *err, size_t err_len)
{
    if (!conf->notice_url || !on_notice) {
        sl_fmt_err(err, err_len, "no drain.notice_url or no callback");
        return NULL;
    }
    struct sl_notice *n = calloc(1, sizeof *n);
    if (!n) {
        sl_fmt_err(err, err_len, "out of memory");
        return NULL;
    }
    n->stop_fd = -1;
    n->on_notice = on_notice;
    n->data = data;
    n->interval_ms = conf->notice_interval_ms ? conf->notice_interval_ms : 5000;
    n->timeout_ms = n->interval_ms < ATTEMPT_MAX_MS ? n->interval_ms : ATTEMPT_MAX_MS;
    struct sl_fetch_url u;
    char why[ERR_LEN];
    if (sl_fetch_url_parse(conf->notice_url, &u, why, sizeof why) < 0) {
        sl_fmt_err(err, err_len, "drain.notice_url: %s", why);
        destroy(n);
        return NULL;
    }
    sl_fetch_url_loggable(&u, n->target, sizeof n->target);
    n->url = strdup(conf->notice_url);
    n->token_url = token_url(&u);
    bool https = u.https;
    sl_fetch_url_dispose(&u);
    int rc;
    if (!n->url || !n->token_url) {
        sl_fmt_err(err, err_len, "out of memory");
        goto fail;
    }
    if (https && !(n->tls = sl_fetch_tls_new(NULL, err, err_len)))
        goto fail;
    n->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (n->stop_fd < 0) {
        sl_fmt_err(err, err_len, "eventfd: %s", strerror(errno));
        goto fail;
    }
    /* The thread must not take the process's signals (main waits for them); a blocked
     * SIGPIPE also keeps OpenSSL's writes to a closed socket an EPIPE. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&n->thread, NULL, thread_main, n);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        sl_fmt_err(err, err_len, "starting the notice thread: %s", strerror(rc));
        goto fail;
    }
    SL_INFO("drain: polling %s every %llu ms for an interruption notice", n->target,
            (unsigned long long)n->interval_ms);
    return n;
fail:
    destroy(n);
    return NULL;
}

void sl_notice_stop(struct sl_notice *n)
{
    if (!n)
        return;
    uint64_t one = 1;
    if (write(n->stop_fd, &one, sizeof one) < 0)
        SL_WARN("drain: stopping the notice poller: %s", strerror(errno));
    pthread_join(n->thread, NULL);
    destroy(n);
}
