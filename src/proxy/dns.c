#include "proxy/dns.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>

#include <ares.h>

#include "core/log.h"
#include "core/loop.h"

/*
 * c-ares 1.18 (Debian 12) rules this file lives by:
 *  - c-ares runs our answer callbacks from inside ares_process_fd(), ares_search() (immediate
 *    failures) and ares_destroy(). Those callbacks only record what arrived and queue the
 *    query's defer; every user callback and every next step (the SRV targets' lookups) runs
 *    from that defer or from a timer, outside c-ares, so a user callback may free the channel.
 *  - 1.18 cannot cancel one query, only all of them. A c-ares query therefore carries a small
 *    `struct lookup` holding a reference to our query; a query that timed out or was cancelled
 *    stays allocated (silent) until c-ares has answered every lookup it started, each with a
 *    bounded timeout of its own, or until ares_destroy() flushes them.
 *  - ares_parse_srv_reply() gives no TTL, hence sl_dns_answer_min_ttl(); it is used for every
 *    reply so that CNAMEs count too.
 */

#define DNS_CLASS_IN 1
#define DNS_TYPE_A 1
#define DNS_TYPE_AAAA 28
#define DNS_TYPE_SRV 33

#define DEFAULT_TIMEOUT_MS 2000
/* Tries per server; our own stage deadline is what bounds a lookup, so c-ares gets a third of
 * it per try (its later tries wait twice as long) and as many tries as fit. */
#define ARES_TRIES 3
/* EDNS buffer size of the DNS flag day 2020: big SRV answers avoid a TCP retry. */
#define EDNS_PAYLOAD 1232

struct dns_sock {
    struct sl_io io;
    struct sl_dns *d; /* NULL once closed: the record waits for the end of the turn */
    struct dns_sock *next;
    struct sl_defer free_defer;
};

struct sl_dns {
    struct sl_loop *loop;
    ares_channel channel;
    uint64_t timeout_ms;
    struct sl_timer timer;        /* c-ares's own next timeout */
    struct dns_sock *socks;       /* sockets c-ares has open */
    struct sl_dns_query *queries; /* live: their callback is still due */
    bool destroying;
};

/* One address as a reply gave it. */
struct raw_addr {
    int family;
    uint8_t bytes[16];
};

/* A name whose A and AAAA records are looked up: the SL_DNS_ADDR name, or one SRV target. */
struct target {
    char *host;
    struct raw_addr *addrs;
    size_t naddrs, cap;
    uint32_t ttl; /* smallest TTL of the replies that gave addresses */
    bool has_ttl;
    bool nxdomain[2]; /* per family: A, AAAA */
    int failed[2];    /* per family: the c-ares failure of that lookup, or ARES_SUCCESS */
};

struct srv_rec {
    size_t target;
    uint16_t port, priority, weight;
    size_t order; /* position in the reply, to sort deterministically */
};

enum stage { STAGE_SRV, STAGE_TARGETS };

struct sl_dns_query {
    struct sl_dns *d;
    struct sl_dns_query *prev, *next; /* d->queries while live */
    unsigned refs;                    /* 1 while live, plus one per lookup in flight */
    bool live;
    bool literal;
    enum sl_dns_kind kind;
    enum stage stage;
    unsigned pending; /* lookups of the current stage not answered yet */
    int failure;      /* first c-ares failure of any lookup, or ARES_SUCCESS */
    sl_dns_cb cb;
    void *data;
    struct sl_timer deadline; /* of the current stage */
    struct sl_defer step;     /* next step, run outside c-ares */
    char *name;
    uint32_t srv_ttl;
    bool srv_has_ttl;
    struct srv_rec *recs;
    size_t nrecs;
    struct target *targets;
    size_t ntargets;
};

/* One c-ares query in flight; freed by its answer callback, whatever happened to `q`. */
struct lookup {
    struct sl_dns_query *q;
    int type;
    size_t target;
};

static pthread_once_t lib_once = PTHREAD_ONCE_INIT;
static int lib_status = ARES_ENOTINITIALIZED;

static void lib_init(void)
{
    lib_status = ares_library_init(ARES_LIB_INIT_ALL);
}

/* ---- the DNS message walker ---------------------------------------------------------------- */

#define MAX_NAME_BYTES 255
/* A name has at most 127 labels, and a well-formed compressed name needs at most one pointer
 * per label; the cap keeps a chain of pointers from costing more than a name's worth. */
#define MAX_POINTER_HOPS 127

static uint16_t be16(const uint8_t *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

static uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Checks the name at *pos whole and moves *pos past its bytes at that place. */
static int skip_name(const uint8_t *msg, size_t len, size_t *pos)
{
    size_t p = *pos;
    size_t seg = p; /* where the labels being read began: pointers must go before it */
    size_t end = 0;
    size_t total = 0;
    unsigned hops = 0;
    for (;;) {
        if (p >= len)
            return -1;
        uint8_t c = msg[p];
        if (c == 0) {
            if (total + 1 > MAX_NAME_BYTES)
                return -1;
            if (!hops)
                end = p + 1;
            break;
        }
        if ((c & 0xC0) == 0xC0) {
            if (len - p < 2 || ++hops > MAX_POINTER_HOPS)
                return -1;
            size_t to = ((size_t)(c & 0x3F) << 8) | msg[p + 1];
            if (to >= seg)
                return -1;
            if (hops == 1)
                end = p + 2;
            p = seg = to;
            continue;
        }
        if (c & 0xC0)
            return -1; /* 0x40 and 0x80: extended and reserved label types */
        total += (size_t)c + 1;
        if (total > MAX_NAME_BYTES || c >= len - p)
            return -1;
        p += (size_t)c + 1;
    }
    *pos = end;
    return 0;
}

int sl_dns_answer_min_ttl(const uint8_t *msg, size_t len, uint32_t *min_ttl, size_t *answers)
{
    if (!msg || len < 12)
        return -EBADMSG;
    size_t qd = be16(msg + 4), an = be16(msg + 6);
    size_t pos = 12;
    for (size_t i = 0; i < qd; i++) {
        if (skip_name(msg, len, &pos) < 0 || len - pos < 4)
            return -EBADMSG;
        pos += 4; /* type, class */
    }
    uint32_t min = UINT32_MAX;
    for (size_t i = 0; i < an; i++) {
        if (skip_name(msg, len, &pos) < 0 || len - pos < 10)
            return -EBADMSG;
        uint32_t ttl = be32(msg + pos + 4);
        size_t rdlen = be16(msg + pos + 8);
        pos += 10;
        if (rdlen > len - pos)
            return -EBADMSG;
        pos += rdlen;
        if (ttl > 0x7fffffffu)
            ttl = 0;
        if (ttl < min)
            min = ttl;
    }
    *min_ttl = an ? min : 0;
    *answers = an;
    return 0;
}

/* ---- sockets and timeouts --------------------------------------------------------------- */

static void arm_ares_timer(struct sl_dns *d)
{
    if (d->destroying)
        return;
    struct timeval tv;
    if (!ares_timeout(d->channel, NULL, &tv)) {
        sl_timer_cancel(d->loop, &d->timer);
        return;
    }
    /* Rounded up: firing before c-ares's deadline would find nothing to do and re-arm. */
    uint64_t ms = (uint64_t)tv.tv_sec * 1000 + ((uint64_t)tv.tv_usec + 999) / 1000;
    sl_timer_arm(d->loop, &d->timer, ms);
}

static void on_ares_timer(struct sl_timer *t)
{
    struct sl_dns *d = t->data;
    ares_process_fd(d->channel, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    arm_ares_timer(d);
}

static void on_sock_io(struct sl_io *io, uint32_t events)
{
    struct dns_sock *s = io->data;
    struct sl_dns *d = s->d;
    if (!d)
        return;
    ares_socket_t rfd = (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) ? io->fd : ARES_SOCKET_BAD;
    ares_socket_t wfd = (events & EPOLLOUT) ? io->fd : ARES_SOCKET_BAD;
    ares_process_fd(d->channel, rfd, wfd);
    arm_ares_timer(d);
}

static void on_sock_free(struct sl_defer *df)
{
    free(df->data);
}

static void sock_close(struct sl_dns *d, struct dns_sock *s)
{
    for (struct dns_sock **pp = &d->socks; *pp; pp = &(*pp)->next) {
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    }
    sl_io_stop(d->loop, &s->io);
    s->d = NULL;
    /* The loop may still hold an event for this io in the current batch. */
    sl_defer_queue(d->loop, &s->free_defer);
}

/* c-ares opened, closed, or changed what it waits for on one of its sockets. */
static void on_sock_state(void *data, ares_socket_t fd, int readable, int writable)
{
    struct sl_dns *d = data;
    struct dns_sock *s = d->socks;
    while (s && s->io.fd != fd)
        s = s->next;
    if (!readable && !writable) {
        if (s)
            sock_close(d, s);
        return;
    }
    uint32_t ev = (readable ? EPOLLIN : 0) | (writable ? EPOLLOUT : 0);
    if (s) {
        int rc = sl_io_modify(d->loop, &s->io, ev);
        if (rc < 0)
            SL_WARN("dns: cannot watch socket %d: %s", fd, strerror(-rc));
        return;
    }
    s = calloc(1, sizeof(*s));
    if (!s) {
        /* The lookups on this socket end with c-ares's timeout (our timer drives it). */
        SL_WARN("dns: cannot watch socket %d: out of memory", fd);
        return;
    }
    s->d = d;
    sl_defer_init(&s->free_defer, on_sock_free, s);
    int rc = sl_io_start(d->loop, &s->io, fd, ev, on_sock_io, s);
    if (rc < 0) {
        SL_WARN("dns: cannot watch socket %d: %s", fd, strerror(-rc));
        free(s);
        return;
    }
    s->next = d->socks;
    d->socks = s;
}

/* ---- channel ------------------------------------------------------------------------------ */

/* "ip", "ip:port", "[ip6]", "[ip6]:port" or a bare IPv6 address. */
static int parse_server(const char *s, struct ares_addr_port_node *n)
{
    char host[INET6_ADDRSTRLEN + 1];
    const char *port_s = NULL;
    size_t hl;
    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        if (!close)
            return -1;
        hl = (size_t)(close - s - 1);
        if (hl >= sizeof(host))
            return -1;
        memcpy(host, s + 1, hl);
        if (close[1] == ':')
            port_s = close + 2;
        else if (close[1] != '\0')
            return -1;
    } else {
        const char *colon = strchr(s, ':');
        if (colon && strchr(colon + 1, ':'))
            colon = NULL; /* two colons or more: a bare IPv6 address */
        hl = colon ? (size_t)(colon - s) : strlen(s);
        if (hl >= sizeof(host))
            return -1;
        memcpy(host, s, hl);
        if (colon)
            port_s = colon + 1;
    }
    host[hl] = '\0';
    int port = 53;
    if (port_s) {
        char *end;
        errno = 0;
        unsigned long v = strtoul(port_s, &end, 10);
        if (errno || end == port_s || *end || v == 0 || v > 65535 || port_s[0] == '+' ||
            port_s[0] == '-')
            return -1;
        port = (int)v;
    }
    memset(n, 0, sizeof(*n));
    if (inet_pton(AF_INET, host, &n->addr.addr4) == 1)
        n->family = AF_INET;
    else if (inet_pton(AF_INET6, host, &n->addr.addr6) == 1)
        n->family = AF_INET6;
    else
        return -1;
    n->udp_port = port;
    n->tcp_port = port;
    return 0;
}

struct sl_dns *sl_dns_new(struct sl_loop *loop, char *const *servers, size_t nservers,
                          uint64_t timeout_ms, char *err, size_t err_len)
{
    struct ares_addr_port_node *nodes = NULL;
    struct sl_dns *d = NULL;
    if (err_len)
        err[0] = '\0';
    pthread_once(&lib_once, lib_init);
    if (lib_status != ARES_SUCCESS) {
        snprintf(err, err_len, "c-ares: %s", ares_strerror(lib_status));
        return NULL;
    }
    if (nservers) {
        nodes = calloc(nservers, sizeof(*nodes));
        if (!nodes)
            goto oom;
        for (size_t i = 0; i < nservers; i++) {
            if (!servers[i] || parse_server(servers[i], &nodes[i]) < 0) {
                snprintf(err, err_len,
                         "bad DNS server address '%s' (want ip, ip:port or [ip6]:port)",
                         servers[i] ? servers[i] : "");
                goto fail;
            }
            nodes[i].next = i + 1 < nservers ? &nodes[i + 1] : NULL;
        }
    }
    d = calloc(1, sizeof(*d));
    if (!d)
        goto oom;
    d->loop = loop;
    d->timeout_ms = timeout_ms ? timeout_ms : DEFAULT_TIMEOUT_MS;
    sl_timer_init(&d->timer, on_ares_timer, d);

    struct ares_options o;
    memset(&o, 0, sizeof(o));
    int mask = ARES_OPT_SOCK_STATE_CB | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_FLAGS |
               ARES_OPT_EDNSPSZ;
    o.sock_state_cb = on_sock_state;
    o.sock_state_cb_data = d;
    uint64_t per_try = d->timeout_ms / 3;
    o.timeout = per_try == 0 ? 1 : per_try > 60000 ? 60000 : (int)per_try;
    o.tries = ARES_TRIES;
    o.ednspsz = EDNS_PAYLOAD;
    /* HOSTALIASES would make answers depend on the environment; explicit servers come without
     * the resolv.conf search list. */
    o.flags = ARES_FLAG_NOALIASES | ARES_FLAG_EDNS | (nservers ? ARES_FLAG_NOSEARCH : 0);
    int rc = ares_init_options(&d->channel, &o, mask);
    if (rc != ARES_SUCCESS) {
        d->channel = NULL;
        snprintf(err, err_len, "c-ares: %s", ares_strerror(rc));
        goto fail;
    }
    if (nodes) {
        rc = ares_set_servers_ports(d->channel, nodes);
        if (rc != ARES_SUCCESS) {
            snprintf(err, err_len, "c-ares: setting servers: %s", ares_strerror(rc));
            goto fail;
        }
    }
    free(nodes);
    return d;
oom:
    snprintf(err, err_len, "out of memory");
fail:
    if (d && d->channel)
        ares_destroy(d->channel);
    free(d);
    free(nodes);
    return NULL;
}

/* ---- queries ------------------------------------------------------------------------------ */

static void query_free(struct sl_dns_query *q)
{
    for (size_t i = 0; i < q->ntargets; i++) {
        free(q->targets[i].host);
        free(q->targets[i].addrs);
    }
    free(q->targets);
    free(q->recs);
    free(q->name);
    free(q);
}

static void query_unref(struct sl_dns_query *q)
{
    if (--q->refs == 0)
        query_free(q);
}

/* No callback after this; drops nothing: the caller still holds the live reference. */
static void query_detach(struct sl_dns_query *q)
{
    struct sl_dns *d = q->d;
    q->live = false;
    if (q->prev)
        q->prev->next = q->next;
    else
        d->queries = q->next;
    if (q->next)
        q->next->prev = q->prev;
    q->prev = q->next = NULL;
    sl_timer_cancel(d->loop, &q->deadline);
    sl_defer_cancel(d->loop, &q->step);
}

/* Hands the answer over. Touches neither q's channel after the callback (which may free it)
 * nor q after dropping its reference. */
static void finish(struct sl_dns_query *q, int status, const char *error,
                   const struct sl_dns_addr *addrs, size_t n, uint32_t ttl)
{
    sl_dns_cb cb = q->cb;
    void *data = q->data;
    query_detach(q);
    cb(data, status, error, addrs, n, ttl);
    query_unref(q);
}

static void failure_text(int ares_status, int *status, const char **error)
{
    switch (ares_status) {
    case ARES_ENOTFOUND:
        *status = -ENOENT;
        *error = "NXDOMAIN";
        return;
    case ARES_ETIMEOUT:
        *status = -ETIMEDOUT;
        *error = "timeout";
        return;
    case ARES_EBADRESP:
        *status = -EBADMSG;
        *error = "bad response";
        return;
    case ARES_EBADNAME:
    case ARES_EBADQUERY:
        *status = -EINVAL;
        *error = "bad name";
        return;
    case ARES_ENOMEM:
        *status = -ENOMEM;
        *error = "out of memory";
        return;
    case ARES_ESERVFAIL:
        *error = "SERVFAIL";
        break;
    case ARES_EREFUSED:
        *error = "REFUSED";
        break;
    case ARES_ENOTIMP:
        *error = "NOTIMP";
        break;
    case ARES_EFORMERR:
        *error = "FORMERR";
        break;
    case ARES_ECONNREFUSED:
        /* 1.18 also ends with this status a query whose every try got SERVFAIL or REFUSED */
        *error = "server failure or unreachable";
        break;
    default:
        *error = ares_strerror(ares_status);
        break;
    }
    *status = -EIO;
}

static void note_failure(struct sl_dns_query *q, int ares_status)
{
    if (q->failure == ARES_SUCCESS)
        q->failure = ares_status;
}

static void stage_done_one(struct sl_dns_query *q)
{
    if (--q->pending == 0)
        sl_defer_queue(q->d->loop, &q->step);
}

static void on_answer(void *arg, int status, int timeouts, unsigned char *abuf, int alen);

/* Starts one c-ares lookup for the current stage; the caller counted it in q->pending. */
static void launch(struct sl_dns_query *q, const char *name, int type, size_t target, bool search)
{
    struct lookup *lk = malloc(sizeof(*lk));
    if (!lk) {
        note_failure(q, ARES_ENOMEM);
        stage_done_one(q);
        return;
    }
    lk->q = q;
    lk->type = type;
    lk->target = target;
    q->refs++;
    if (search)
        ares_search(q->d->channel, name, DNS_CLASS_IN, type, on_answer, lk);
    else
        ares_query(q->d->channel, name, DNS_CLASS_IN, type, on_answer, lk);
}

static int target_add(struct target *t, int family, const void *bytes)
{
    size_t blen = family == AF_INET ? 4 : 16;
    for (size_t i = 0; i < t->naddrs; i++)
        if (t->addrs[i].family == family && memcmp(t->addrs[i].bytes, bytes, blen) == 0)
            return 0;
    if (t->naddrs == t->cap) {
        if (t->cap >= 2 * SL_DNS_MAX_ADDRS)
            return 0; /* bounded: the answer keeps at most SL_DNS_MAX_ADDRS anyway */
        size_t cap = t->cap ? t->cap * 2 : 4;
        struct raw_addr *a = realloc(t->addrs, cap * sizeof(*a));
        if (!a)
            return -1;
        t->addrs = a;
        t->cap = cap;
    }
    struct raw_addr *r = &t->addrs[t->naddrs++];
    memset(r, 0, sizeof(*r));
    r->family = family;
    memcpy(r->bytes, bytes, blen);
    return 0;
}

/* An A or AAAA reply for target t: its addresses and TTL. Returns an ares status. */
static int take_addr_reply(struct target *t, int type, const unsigned char *abuf, int alen)
{
    uint32_t ttl;
    size_t answers;
    if (sl_dns_answer_min_ttl(abuf, (size_t)alen, &ttl, &answers) < 0)
        return ARES_EBADRESP;
    int n = SL_DNS_MAX_ADDRS;
    int rc;
    size_t before = t->naddrs;
    if (type == DNS_TYPE_A) {
        struct ares_addrttl v4[SL_DNS_MAX_ADDRS];
        rc = ares_parse_a_reply(abuf, alen, NULL, v4, &n);
        for (int i = 0; rc == ARES_SUCCESS && i < n; i++)
            if (target_add(t, AF_INET, &v4[i].ipaddr) < 0)
                return ARES_ENOMEM;
    } else {
        struct ares_addr6ttl v6[SL_DNS_MAX_ADDRS];
        rc = ares_parse_aaaa_reply(abuf, alen, NULL, v6, &n);
        for (int i = 0; rc == ARES_SUCCESS && i < n; i++)
            if (target_add(t, AF_INET6, &v6[i].ip6addr) < 0)
                return ARES_ENOMEM;
    }
    if (rc == ARES_ENODATA)
        return ARES_SUCCESS; /* e.g. only a CNAME to a name without this family */
    if (rc != ARES_SUCCESS)
        return rc;
    if (t->naddrs > before && answers) {
        if (!t->has_ttl || ttl < t->ttl)
            t->ttl = ttl;
        t->has_ttl = true;
    }
    return ARES_SUCCESS;
}

static int find_or_add_target(struct sl_dns_query *q, const char *host, size_t *idx)
{
    for (size_t i = 0; i < q->ntargets; i++) {
        if (q->targets[i].host && strcasecmp(q->targets[i].host, host) == 0) {
            *idx = i;
            return 0;
        }
    }
    if (q->ntargets == SL_DNS_MAX_SRV_TARGETS)
        return 1;
    char *h = strdup(host);
    if (!h)
        return -1;
    struct target *t = &q->targets[q->ntargets];
    memset(t, 0, sizeof(*t));
    t->host = h;
    *idx = q->ntargets++;
    return 0;
}

/* The SRV reply: its records (bounded) and their distinct targets. Returns an ares status. */
static int take_srv_reply(struct sl_dns_query *q, const unsigned char *abuf, int alen)
{
    uint32_t ttl;
    size_t answers;
    if (sl_dns_answer_min_ttl(abuf, (size_t)alen, &ttl, &answers) < 0)
        return ARES_EBADRESP;
    struct ares_srv_reply *srv = NULL;
    int rc = ares_parse_srv_reply(abuf, alen, &srv);
    if (rc == ARES_ENODATA)
        return ARES_SUCCESS;
    if (rc != ARES_SUCCESS)
        return rc;
    q->srv_ttl = ttl;
    q->srv_has_ttl = answers > 0;
    q->recs = calloc(SL_DNS_MAX_ADDRS, sizeof(*q->recs));
    q->targets = calloc(SL_DNS_MAX_SRV_TARGETS, sizeof(*q->targets));
    if (!q->recs || !q->targets) {
        rc = ARES_ENOMEM;
        goto out;
    }
    for (struct ares_srv_reply *r = srv; r && q->nrecs < SL_DNS_MAX_ADDRS; r = r->next) {
        /* "." (expanded as "") means the service is decidedly not available there. */
        if (!r->host || r->host[0] == '\0' || strcmp(r->host, ".") == 0 || r->port == 0)
            continue;
        size_t ti;
        int added = find_or_add_target(q, r->host, &ti);
        if (added < 0) {
            rc = ARES_ENOMEM;
            goto out;
        }
        if (added > 0)
            continue; /* over SL_DNS_MAX_SRV_TARGETS distinct targets */
        q->recs[q->nrecs] = (struct srv_rec){.target = ti,
                                             .port = r->port,
                                             .priority = r->priority,
                                             .weight = r->weight,
                                             .order = q->nrecs};
        q->nrecs++;
    }
out:
    ares_free_data(srv);
    return rc;
}

static void on_answer(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    (void)timeouts;
    struct lookup *lk = arg;
    struct sl_dns_query *q = lk->q;
    int type = lk->type;
    size_t ti = lk->target;
    free(lk);
    if (!q->live || status == ARES_EDESTRUCTION || status == ARES_ECANCELLED) {
        query_unref(q);
        return;
    }
    bool family_nx = false;
    if (status == ARES_SUCCESS && (!abuf || alen <= 0))
        status = ARES_EBADRESP;
    if (status == ARES_SUCCESS) {
        status = type == DNS_TYPE_SRV ? take_srv_reply(q, abuf, alen)
                                      : take_addr_reply(&q->targets[ti], type, abuf, alen);
    } else if (status == ARES_ENODATA) {
        status = ARES_SUCCESS; /* the name exists without records of this type */
    } else if (status == ARES_ENOTFOUND && type != DNS_TYPE_SRV) {
        family_nx = true; /* whether that is an error is decided with both families */
        status = ARES_SUCCESS;
    }
    if (family_nx)
        q->targets[ti].nxdomain[type == DNS_TYPE_A ? 0 : 1] = true;
    /* A failed A or AAAA lookup is judged with the other family (deliver_targets): some
     * servers refuse or fail AAAA for names they only know as A. */
    if (status != ARES_SUCCESS && type != DNS_TYPE_SRV)
        q->targets[ti].failed[type == DNS_TYPE_A ? 0 : 1] = status;
    else if (status != ARES_SUCCESS)
        note_failure(q, status);
    stage_done_one(q);
    query_unref(q);
}

static void on_deadline(struct sl_timer *t)
{
    finish(t->data, -ETIMEDOUT, "timeout", NULL, 0, 0);
}

static int cmp_addr(const void *a, const void *b)
{
    const struct sl_dns_addr *x = a, *y = b;
    if (x->priority != y->priority)
        return x->priority < y->priority ? -1 : 1;
    if (x->addr.ss_family != y->addr.ss_family)
        return x->addr.ss_family == AF_INET ? -1 : 1;
    int c;
    uint16_t px, py;
    if (x->addr.ss_family == AF_INET) {
        const struct sockaddr_in *s = (const void *)&x->addr, *t = (const void *)&y->addr;
        c = memcmp(&s->sin_addr, &t->sin_addr, 4);
        px = ntohs(s->sin_port);
        py = ntohs(t->sin_port);
    } else {
        const struct sockaddr_in6 *s = (const void *)&x->addr, *t = (const void *)&y->addr;
        c = memcmp(&s->sin6_addr, &t->sin6_addr, 16);
        px = ntohs(s->sin6_port);
        py = ntohs(t->sin6_port);
    }
    if (c)
        return c;
    return px < py ? -1 : px > py;
}

static int cmp_rec(const void *a, const void *b)
{
    const struct srv_rec *x = a, *y = b;
    if (x->priority != y->priority)
        return x->priority < y->priority ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

static void fill_addr(struct sl_dns_addr *o, const struct raw_addr *r, const struct srv_rec *rec)
{
    memset(o, 0, sizeof(*o));
    char ip[INET6_ADDRSTRLEN];
    if (r->family == AF_INET) {
        struct sockaddr_in *s = (struct sockaddr_in *)&o->addr;
        s->sin_family = AF_INET;
        s->sin_port = htons(rec->port);
        memcpy(&s->sin_addr, r->bytes, 4);
        o->addr_len = sizeof(*s);
        inet_ntop(AF_INET, r->bytes, ip, sizeof(ip));
        snprintf(o->text, sizeof(o->text), "%s:%u", ip, (unsigned)rec->port);
    } else {
        struct sockaddr_in6 *s = (struct sockaddr_in6 *)&o->addr;
        s->sin6_family = AF_INET6;
        s->sin6_port = htons(rec->port);
        memcpy(&s->sin6_addr, r->bytes, 16);
        o->addr_len = sizeof(*s);
        inet_ntop(AF_INET6, r->bytes, ip, sizeof(ip));
        snprintf(o->text, sizeof(o->text), "[%s]:%u", ip, (unsigned)rec->port);
    }
    o->priority = rec->priority;
    o->weight = rec->weight;
}

static bool same_endpoint(const struct sl_dns_addr *a, const struct sl_dns_addr *b)
{
    return a->addr_len == b->addr_len && memcmp(&a->addr, &b->addr, a->addr_len) == 0;
}

/* Every lookup of the last stage answered: build the answer and deliver it. */
static void deliver_targets(struct sl_dns_query *q)
{
    int status;
    const char *error;
    /* A name that got addresses from one family is answered even when the other family's
     * lookup failed; a name with none fails with the first failure. */
    for (size_t i = 0; i < q->ntargets && q->failure == ARES_SUCCESS; i++) {
        const struct target *t = &q->targets[i];
        if (t->naddrs)
            continue;
        if (t->failed[0] != ARES_SUCCESS)
            note_failure(q, t->failed[0]);
        else if (t->failed[1] != ARES_SUCCESS)
            note_failure(q, t->failed[1]);
    }
    if (q->failure != ARES_SUCCESS) {
        failure_text(q->failure, &status, &error);
        finish(q, status, error, NULL, 0, 0);
        return;
    }
    if (q->kind == SL_DNS_ADDR && !q->literal && q->targets[0].nxdomain[0] &&
        q->targets[0].nxdomain[1]) {
        finish(q, -ENOENT, "NXDOMAIN", NULL, 0, 0);
        return;
    }
    struct sl_dns_addr *out = calloc(SL_DNS_MAX_ADDRS, sizeof(*out));
    if (!out) {
        finish(q, -ENOMEM, "out of memory", NULL, 0, 0);
        return;
    }
    /* Lower priorities first, so that the bound drops the least preferred records. */
    if (q->nrecs > 1)
        qsort(q->recs, q->nrecs, sizeof(*q->recs), cmp_rec);
    size_t n = 0;
    bool has_ttl = q->srv_has_ttl;
    uint32_t ttl = q->srv_ttl;
    for (size_t r = 0; r < q->nrecs && n < SL_DNS_MAX_ADDRS; r++) {
        struct target *t = &q->targets[q->recs[r].target];
        for (size_t a = 0; a < t->naddrs && n < SL_DNS_MAX_ADDRS; a++) {
            fill_addr(&out[n], &t->addrs[a], &q->recs[r]);
            bool dup = false;
            for (size_t k = 0; k < n && !dup; k++)
                dup = same_endpoint(&out[k], &out[n]);
            if (!dup)
                n++;
        }
        if (t->naddrs && t->has_ttl && (!has_ttl || t->ttl < ttl)) {
            ttl = t->ttl;
            has_ttl = true;
        }
    }
    if (n > 1)
        qsort(out, n, sizeof(*out), cmp_addr);
    if (q->literal)
        ttl = UINT32_MAX;
    else if (!has_ttl)
        ttl = 0;
    finish(q, 0, NULL, out, n, ttl);
    free(out);
}

/* The SRV stage answered: look up every target, A and AAAA in parallel. */
static void start_targets(struct sl_dns_query *q)
{
    if (q->failure != ARES_SUCCESS || q->ntargets == 0) {
        deliver_targets(q); /* the error, or an empty answer */
        return;
    }
    q->stage = STAGE_TARGETS;
    sl_timer_arm(q->d->loop, &q->deadline, q->d->timeout_ms);
    /* All counted first: a lookup may fail at once, and the stage must not end early. */
    q->pending = (unsigned)(2 * q->ntargets);
    for (size_t i = 0; i < q->ntargets; i++) {
        launch(q, q->targets[i].host, DNS_TYPE_A, i, false);
        launch(q, q->targets[i].host, DNS_TYPE_AAAA, i, false);
    }
    arm_ares_timer(q->d);
}

static void on_step(struct sl_defer *df)
{
    struct sl_dns_query *q = df->data;
    if (!q->live)
        return;
    if (q->stage == STAGE_SRV)
        start_targets(q);
    else
        deliver_targets(q);
}

static bool is_literal(struct sl_dns_query *q, const char *name)
{
    uint8_t b[16];
    int family;
    if (inet_pton(AF_INET, name, b) == 1)
        family = AF_INET;
    else if (inet_pton(AF_INET6, name, b) == 1)
        family = AF_INET6;
    else
        return false;
    return target_add(&q->targets[0], family, b) == 0;
}

struct sl_dns_query *sl_dns_resolve(struct sl_dns *d, const char *name, enum sl_dns_kind kind,
                                    uint16_t port, sl_dns_cb cb, void *data)
{
    if (!d || !name || !cb || d->destroying)
        return NULL;
    size_t len = strlen(name);
    if (len == 0 || len - (name[len - 1] == '.') > 253)
        return NULL;
    struct sl_dns_query *q = calloc(1, sizeof(*q));
    if (!q)
        return NULL;
    q->d = d;
    q->refs = 1;
    q->kind = kind;
    q->cb = cb;
    q->data = data;
    q->failure = ARES_SUCCESS;
    sl_timer_init(&q->deadline, on_deadline, q);
    sl_defer_init(&q->step, on_step, q);
    q->name = strdup(name);
    if (!q->name)
        goto fail;
    if (kind == SL_DNS_ADDR) {
        q->targets = calloc(1, sizeof(*q->targets));
        q->recs = calloc(1, sizeof(*q->recs));
        if (!q->targets || !q->recs)
            goto fail;
        q->targets[0].host = strdup(name);
        if (!q->targets[0].host)
            goto fail;
        q->ntargets = 1;
        q->recs[0] = (struct srv_rec){.target = 0, .port = port};
        q->nrecs = 1;
        q->stage = STAGE_TARGETS;
    } else {
        q->stage = STAGE_SRV;
    }
    q->live = true;
    q->next = d->queries;
    if (q->next)
        q->next->prev = q;
    d->queries = q;
    if (kind == SL_DNS_ADDR && is_literal(q, name)) {
        q->literal = true;
        sl_defer_queue(d->loop, &q->step);
        return q;
    }
    sl_timer_arm(d->loop, &q->deadline, d->timeout_ms);
    if (kind == SL_DNS_ADDR) {
        q->pending = 2;
        launch(q, name, DNS_TYPE_A, 0, true);
        launch(q, name, DNS_TYPE_AAAA, 0, true);
    } else {
        q->pending = 1;
        launch(q, name, DNS_TYPE_SRV, 0, true);
    }
    arm_ares_timer(d);
    return q;
fail:
    query_free(q);
    return NULL;
}

void sl_dns_cancel(struct sl_dns_query *q)
{
    if (!q || !q->live)
        return;
    query_detach(q);
    query_unref(q);
}

void sl_dns_free(struct sl_dns *d)
{
    if (!d)
        return;
    d->destroying = true;
    sl_timer_cancel(d->loop, &d->timer);
    struct sl_dns_query *q = d->queries;
    d->queries = NULL;
    while (q) {
        struct sl_dns_query *next = q->next;
        q->live = false;
        q->prev = q->next = NULL;
        sl_timer_cancel(d->loop, &q->deadline);
        sl_defer_cancel(d->loop, &q->step);
        query_unref(q);
        q = next;
    }
    /* Answers every lookup in flight with ARES_EDESTRUCTION (dropping the last references to
     * silent queries) and reports each socket closed. */
    ares_destroy(d->channel);
    while (d->socks)
        sock_close(d, d->socks);
    free(d);
}
