#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/loop.h"
#include "proxy/dns.h"
#include "dnsmasq.h"
#include "loop_wait.h"

/* Slow enough for ASan, far below anything a test waits for. */
#define WAIT_MS 5000

/* ---- the TTL walker ------------------------------------------------------------------------ */

static size_t unhex(const char *hex, uint8_t *out, size_t cap)
{
    size_t n = 0;
    for (; hex[0] && hex[1]; hex += 2) {
        assert_true(n < cap);
        unsigned v;
        assert_int_equal(sscanf(hex, "%2x", &v), 1);
        out[n++] = (uint8_t)v;
    }
    return n;
}

/* Copies into an exact-size heap block so that ASan sees any read past `len`. */
static int walk(const uint8_t *msg, size_t len, uint32_t *ttl, size_t *answers)
{
    uint8_t *b = malloc(len ? len : 1);
    assert_non_null(b);
    memcpy(b, msg, len);
    int rc = sl_dns_answer_min_ttl(b, len, ttl, answers);
    free(b);
    return rc;
}

/* dnsmasq's answer for a.test A: two records, TTL 7. */
static const char a_reply[] = "123485800001000200000000016104746573740000010001c00c000100010000"
                              "000700047f000002c00c000100010000000700047f000003";
/* dnsmasq's answer for _http._tcp.svc.test SRV: two SRV answers (TTL 7) and an additional
 * section with the targets' addresses. */
static const char srv_reply[] =
    "123485800001000200000002055f68747470045f7463700373766304746573740000210001c00c002100010000"
    "00070013001400001f9102743203737663047465737400c00c00210001000000070013000a00051f90027431"
    "03737663047465737400c056000100010000000700047f000009c037001c0001000000070010000000000000"
    "00000000000000000001";
/* NXDOMAIN for nope.test: no answer. */
static const char nx_reply[] = "123481830001000000000000046e6f706504746573740000010001";

static void test_walker_real_answers(void **state)
{
    (void)state;
    uint8_t m[512];
    uint32_t ttl = 99;
    size_t an = 99;
    size_t n = unhex(a_reply, m, sizeof m);
    assert_int_equal(walk(m, n, &ttl, &an), 0);
    assert_int_equal(an, 2);
    assert_int_equal(ttl, 7);

    n = unhex(srv_reply, m, sizeof m);
    assert_int_equal(walk(m, n, &ttl, &an), 0);
    assert_int_equal(an, 2);
    assert_int_equal(ttl, 7);

    n = unhex(nx_reply, m, sizeof m);
    assert_int_equal(walk(m, n, &ttl, &an), 0);
    assert_int_equal(an, 0);
    assert_int_equal(ttl, 0);
}

/* The end of the answer section of the SRV reply (the additional section follows). */
static size_t srv_answers_end(const uint8_t *m)
{
    /* header 12, question "_http._tcp.svc.test" (21) + 4, then two SRV records of
     * 2 (pointer) + 10 + 19 bytes each */
    (void)m;
    return 12 + 21 + 4 + 2 * (2 + 10 + 19);
}

static void test_walker_every_prefix(void **state)
{
    (void)state;
    uint8_t m[512];
    size_t n = unhex(srv_reply, m, sizeof m);
    size_t end = srv_answers_end(m);
    for (size_t k = 0; k <= n; k++) {
        uint32_t ttl = 12345;
        size_t an = 12345;
        int rc = walk(m, k, &ttl, &an);
        if (k < end) {
            assert_int_equal(rc, -EBADMSG);
            assert_int_equal(ttl, 12345); /* untouched on failure */
            assert_int_equal(an, 12345);
        } else {
            /* the walker stops after the answers */
            assert_int_equal(rc, 0);
            assert_int_equal(an, 2);
            assert_int_equal(ttl, 7);
        }
    }
}

/* Builds a message: header with the given counts, then `body`. */
static size_t msg(uint8_t *out, unsigned qd, unsigned an, const uint8_t *body, size_t blen)
{
    uint8_t h[12] = {
        0x12, 0x34, 0x81, 0x80, (uint8_t)(qd >> 8), (uint8_t)qd, (uint8_t)(an >> 8), (uint8_t)an,
        0,    0,    0,    0};
    memcpy(out, h, 12);
    memcpy(out + 12, body, blen);
    return 12 + blen;
}

#define RR_A(ttl3) 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, ttl3, 0x00, 0x04, 127, 0, 0, 1

static void test_walker_compression(void **state)
{
    (void)state;
    uint8_t m[2048];
    uint32_t ttl;
    size_t an;

    /* a pointer back to the question name: fine */
    const uint8_t ok[] = {1, 'a', 0, 0, 1, 0, 1, 0xc0, 12, RR_A(30)};
    assert_int_equal(walk(m, msg(m, 1, 1, ok, sizeof ok), &ttl, &an), 0);
    assert_int_equal(ttl, 30);

    /* a pointer to itself */
    const uint8_t self[] = {1, 'a', 0, 0, 1, 0, 1, 0xc0, 19, RR_A(30)};
    assert_int_equal(walk(m, msg(m, 1, 1, self, sizeof self), &ttl, &an), -EBADMSG);

    /* a pointer forward (to the answer's own rdata) */
    const uint8_t fwd[] = {1, 'a', 0, 0, 1, 0, 1, 0xc0, 40, RR_A(30)};
    assert_int_equal(walk(m, msg(m, 1, 1, fwd, sizeof fwd), &ttl, &an), -EBADMSG);

    /* two pointers into each other: question name at 12 is "x" + pointer to 19, and the
     * answer's name at 19 is a pointer to 12 */
    const uint8_t loop2[] = {1, 'x', 0xc0, 19, 0, 1, 0, 1, 0xc0, 12, RR_A(30)};
    assert_int_equal(walk(m, msg(m, 1, 1, loop2, sizeof loop2), &ttl, &an), -EBADMSG);

    /* a label that points into the middle of an earlier label's bytes, backwards: legal */
    const uint8_t mid[] = {3, 'a', 1, 'b', 0, 0, 1, 0, 1, 0xc0, 14, RR_A(9)};
    assert_int_equal(walk(m, msg(m, 1, 1, mid, sizeof mid), &ttl, &an), 0);
    assert_int_equal(ttl, 9);

    /* a pointer cut in half at the end */
    const uint8_t half[] = {1, 'a', 0, 0, 1, 0, 1, 0xc0};
    assert_int_equal(walk(m, msg(m, 1, 1, half, sizeof half), &ttl, &an), -EBADMSG);

    /* 0x40 and 0x80 label types */
    const uint8_t ext[] = {0x41, 'a', 0, 0, 1, 0, 1};
    assert_int_equal(walk(m, msg(m, 1, 0, ext, sizeof ext), &ttl, &an), -EBADMSG);
    const uint8_t rsv[] = {0x81, 'a', 0, 0, 1, 0, 1};
    assert_int_equal(walk(m, msg(m, 1, 0, rsv, sizeof rsv), &ttl, &an), -EBADMSG);

    /* Chains of pointers: question k is a pointer to question k-1, question 1 the root name.
     * A chain is legal up to a name's worth of hops (127), refused beyond. */
    uint16_t prev;
    uint8_t qs[1300];
    size_t ql = 0;
    qs[ql++] = 0; /* question 1: root, at 12 */
    qs[ql++] = 0;
    qs[ql++] = 1;
    qs[ql++] = 0;
    qs[ql++] = 1;
    prev = 12;
    for (int i = 0; i < 200; i++) {
        uint16_t here = (uint16_t)(12 + ql);
        qs[ql++] = (uint8_t)(0xc0 | (prev >> 8)); /* question i+2: a pointer to the last */
        qs[ql++] = (uint8_t)prev;
        qs[ql++] = 0;
        qs[ql++] = 1;
        qs[ql++] = 0;
        qs[ql++] = 1;
        prev = here;
        /* Each question's own chain is i+1 hops long. */
        size_t len = msg(m, (unsigned)i + 2, 0, qs, ql);
        int rc = walk(m, len, &ttl, &an);
        assert_int_equal(rc, i + 1 <= 127 ? 0 : -EBADMSG);
    }
}

static void test_walker_bad_counts_and_names(void **state)
{
    (void)state;
    uint8_t m[1024] = {0};
    uint32_t ttl = 5;
    size_t an = 5;

    /* shorter than a header */
    assert_int_equal(walk(m, 0, &ttl, &an), -EBADMSG);
    assert_int_equal(sl_dns_answer_min_ttl(NULL, 0, &ttl, &an), -EBADMSG);
    memset(m, 0, 12);
    assert_int_equal(walk(m, 11, &ttl, &an), -EBADMSG);
    assert_int_equal(walk(m, 12, &ttl, &an), 0);
    assert_int_equal(an, 0);

    /* more answers announced than present */
    const uint8_t one[] = {1, 'a', 0, 0, 1, 0, 1, 0xc0, 12, RR_A(30)};
    assert_int_equal(walk(m, msg(m, 1, 2, one, sizeof one), &ttl, &an), -EBADMSG);
    assert_int_equal(walk(m, msg(m, 1, 65535, one, sizeof one), &ttl, &an), -EBADMSG);
    /* more questions announced than present */
    assert_int_equal(walk(m, msg(m, 3, 1, one, sizeof one), &ttl, &an), -EBADMSG);
    /* fewer answers announced: the rest is not read */
    assert_int_equal(walk(m, msg(m, 1, 0, one, sizeof one), &ttl, &an), 0);
    assert_int_equal(an, 0);

    /* rdlength past the end */
    uint8_t longrd[] = {1, 'a', 0, 0, 1, 0, 1, 0xc0, 12, RR_A(30)};
    longrd[sizeof longrd - 5] = 5;
    assert_int_equal(walk(m, msg(m, 1, 1, longrd, sizeof longrd), &ttl, &an), -EBADMSG);

    /* a label running past the end */
    const uint8_t lab[] = {9, 'a', 'b'};
    assert_int_equal(walk(m, msg(m, 1, 0, lab, sizeof lab), &ttl, &an), -EBADMSG);

    /* names of 255 bytes pass, 256 do not: four labels of 63 plus one of 1 = 4*64 + 2 + 1 */
    uint8_t name[300];
    size_t nl = 0;
    for (int l = 0; l < 3; l++) {
        name[nl++] = 63;
        memset(name + nl, 'x', 63);
        nl += 63;
    }
    name[nl++] = 61; /* 3*64 + 62 + 1 = 255 */
    memset(name + nl, 'y', 61);
    nl += 61;
    name[nl++] = 0;
    name[nl++] = 0;
    name[nl++] = 1;
    name[nl++] = 0;
    name[nl++] = 1;
    assert_int_equal(walk(m, msg(m, 1, 0, name, nl), &ttl, &an), 0);
    name[3 * 64] = 62; /* 256 bytes */
    uint8_t name2[300];
    memcpy(name2, name, 3 * 64 + 1);
    memset(name2 + 3 * 64 + 1, 'y', 62);
    memcpy(name2 + 3 * 64 + 63, "\0\0\1\0\1", 5);
    assert_int_equal(walk(m, msg(m, 1, 0, name2, 3 * 64 + 68), &ttl, &an), -EBADMSG);

    /* TTLs: the smallest wins; the top bit set counts as 0 */
    const uint8_t two[] = {1, 'a', 0, 0, 1, 0, 1, 0xc0, 12, RR_A(30), 0xc0, 12, RR_A(20)};
    assert_int_equal(walk(m, msg(m, 1, 2, two, sizeof two), &ttl, &an), 0);
    assert_int_equal(ttl, 20);
    assert_int_equal(an, 2);
    uint8_t neg[] = {1, 'a', 0, 0, 1, 0, 1, 0xc0, 12, RR_A(30)};
    neg[7 + 2 + 4] = 0x80;
    assert_int_equal(walk(m, msg(m, 1, 1, neg, sizeof neg), &ttl, &an), 0);
    assert_int_equal(ttl, 0);
    uint8_t max[] = {1, 'a', 0, 0, 1, 0, 1, 0xc0, 12, RR_A(30)};
    max[13] = 0x7f;
    max[14] = max[15] = max[16] = 0xff;
    assert_int_equal(walk(m, msg(m, 1, 1, max, sizeof max), &ttl, &an), 0);
    assert_int_equal(ttl, 0x7fffffff);
}

/* ---- loop helpers ------------------------------------------------------------------------ */

/* ---- answers ------------------------------------------------------------------------------ */

struct answer {
    int count;
    int status;
    char error[64];
    struct sl_dns_addr addrs[16];
    size_t n;
    uint32_t ttl;
    uint64_t done_ms;
    struct sl_dns **free_channel; /* sl_dns_free(*free_channel) from inside the callback */
    bool inside_resolve;          /* set while sl_dns_resolve runs */
};

static bool resolving;

static void on_answer(void *data, int status, const char *error, const struct sl_dns_addr *addrs,
                      size_t n, uint32_t ttl_s)
{
    struct answer *a = data;
    a->count++;
    a->inside_resolve = resolving;
    a->status = status;
    snprintf(a->error, sizeof a->error, "%s", error ? error : "");
    a->n = n;
    for (size_t i = 0; i < n && i < 16; i++)
        a->addrs[i] = addrs[i];
    a->ttl = ttl_s;
    a->done_ms = sl_clock_now_ms();
    if (status == 0)
        assert_null(error);
    else
        assert_non_null(error);
    if (a->free_channel) {
        sl_dns_free(*a->free_channel);
        *a->free_channel = NULL;
    }
}

static bool is_answered(void *arg)
{
    return ((struct answer *)arg)->count > 0;
}

struct fixture {
    struct sl_loop loop;
    struct dnsmasq m;
    struct sl_dns *dns;
};

static void fixture_start(struct fixture *f, const char *hosts, const char *const *args,
                          uint64_t timeout_ms)
{
    memset(f, 0, sizeof *f);
    assert_int_equal(sl_loop_init(&f->loop), 0);
    char path[64];
    snprintf(path, sizeof path, "/tmp/sl_test_dns_%d.hosts", (int)getpid());
    dnsmasq_start(&f->m, path, hosts, 7, args);
    char *servers[] = {f->m.server};
    char err[128];
    f->dns = sl_dns_new(&f->loop, servers, 1, timeout_ms, err, sizeof err);
    assert_non_null(f->dns);
}

static void fixture_stop(struct fixture *f)
{
    sl_dns_free(f->dns);
    sl_loop_run_deferred(&f->loop);
    dnsmasq_stop(&f->m);
    sl_loop_dispose(&f->loop);
}

/* One lookup run to completion. */
static void resolve(struct fixture *f, const char *name, enum sl_dns_kind kind, uint16_t port,
                    struct answer *a)
{
    memset(a, 0, sizeof *a);
    f->loop.now_ms = sl_clock_now_ms();
    resolving = true;
    struct sl_dns_query *q = sl_dns_resolve(f->dns, name, kind, port, on_answer, a);
    resolving = false;
    assert_non_null(q);
    assert_int_equal(a->count, 0); /* never from inside sl_dns_resolve */
    assert_true(run_until(&f->loop, is_answered, a, WAIT_MS));
    assert_int_equal(a->count, 1);
    assert_false(a->inside_resolve);
}

static const char hosts_text[] = "127.0.0.3 a.test\n"
                                 "127.0.0.2 a.test\n"
                                 "2001:db8::5 a.test\n"
                                 "2001:db8::6 six.test\n"
                                 "127.0.0.9 t1.svc.test\n"
                                 "127.0.0.10 t1.svc.test\n";

static const char *const dnsmasq_args[] = {
    /* SRV: t1 (prio 10, weight 5, port 8080), t2 (prio 20, weight 0, port 8081), a target
     * that does not exist, and a duplicate of t1's first record */
    "--srv-host=_http._tcp.svc.test,t1.svc.test,8080,10,5",
    "--srv-host=_http._tcp.svc.test,t2.svc.test,8081,20,0",
    "--srv-host=_http._tcp.svc.test,gone.svc.test,8082,30,1",
    /* t2 has both families and a shorter TTL than everything else */
    "--host-record=t2.svc.test,127.0.0.20,::1,3",
    /* "." target: the service is decidedly not available */
    "--srv-host=_none._tcp.svc.test",
    /* a name with records but no address */
    "--txt-record=noaddr.test,hello",
    NULL,
};

static void test_resolve_a_aaaa(void **state)
{
    (void)state;
    if (!have_dnsmasq())
        skip();
    struct fixture f;
    fixture_start(&f, hosts_text, dnsmasq_args, 2000);
    struct answer a;

    resolve(&f, "a.test", SL_DNS_ADDR, 8000, &a);
    assert_int_equal(a.status, 0);
    assert_int_equal(a.n, 3);
    /* sorted: IPv4 by address, then IPv6 */
    assert_string_equal(a.addrs[0].text, "127.0.0.2:8000");
    assert_string_equal(a.addrs[1].text, "127.0.0.3:8000");
    assert_string_equal(a.addrs[2].text, "[2001:db8::5]:8000");
    assert_int_equal(a.ttl, 7);
    const struct sockaddr_in *s4 = (const struct sockaddr_in *)&a.addrs[0].addr;
    assert_int_equal(s4->sin_family, AF_INET);
    assert_int_equal(ntohs(s4->sin_port), 8000);
    assert_int_equal(ntohl(s4->sin_addr.s_addr), 0x7f000002);
    assert_int_equal(a.addrs[0].addr_len, sizeof(struct sockaddr_in));
    const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&a.addrs[2].addr;
    assert_int_equal(s6->sin6_family, AF_INET6);
    assert_int_equal(ntohs(s6->sin6_port), 8000);
    assert_int_equal(a.addrs[2].addr_len, sizeof(struct sockaddr_in6));
    assert_int_equal(a.addrs[0].priority, 0);
    assert_int_equal(a.addrs[0].weight, 0);

    /* AAAA only */
    resolve(&f, "six.test", SL_DNS_ADDR, 443, &a);
    assert_int_equal(a.status, 0);
    assert_int_equal(a.n, 1);
    assert_string_equal(a.addrs[0].text, "[2001:db8::6]:443");

    /* a host-record with its own TTL */
    resolve(&f, "t2.svc.test", SL_DNS_ADDR, 1, &a);
    assert_int_equal(a.status, 0);
    assert_int_equal(a.n, 2);
    assert_string_equal(a.addrs[0].text, "127.0.0.20:1");
    assert_string_equal(a.addrs[1].text, "[::1]:1");
    assert_int_equal(a.ttl, 3);

    /* the name exists without an address: answered, empty */
    resolve(&f, "noaddr.test", SL_DNS_ADDR, 80, &a);
    assert_int_equal(a.status, 0);
    assert_int_equal(a.n, 0);

    /* does not exist */
    resolve(&f, "nope.test", SL_DNS_ADDR, 80, &a);
    assert_int_equal(a.status, -ENOENT);
    assert_string_equal(a.error, "NXDOMAIN");
    assert_int_equal(a.n, 0);

    /* a trailing dot is the same name */
    resolve(&f, "a.test.", SL_DNS_ADDR, 8000, &a);
    assert_int_equal(a.status, 0);
    assert_int_equal(a.n, 3);

    /* IP literals answer themselves */
    resolve(&f, "10.1.2.3", SL_DNS_ADDR, 99, &a);
    assert_int_equal(a.status, 0);
    assert_int_equal(a.n, 1);
    assert_string_equal(a.addrs[0].text, "10.1.2.3:99");
    assert_int_equal(a.ttl, UINT32_MAX);
    resolve(&f, "fe80::1", SL_DNS_ADDR, 99, &a);
    assert_int_equal(a.n, 1);
    assert_string_equal(a.addrs[0].text, "[fe80::1]:99");

    /* a name c-ares refuses to encode */
    resolve(&f, "bad..name.test", SL_DNS_ADDR, 80, &a);
    assert_true(a.status < 0);

    /* names: empty or too long are refused at once */
    assert_null(sl_dns_resolve(f.dns, "", SL_DNS_ADDR, 1, on_answer, &a));
    char longname[300];
    memset(longname, 'a', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    assert_null(sl_dns_resolve(f.dns, longname, SL_DNS_ADDR, 1, on_answer, &a));
    fixture_stop(&f);
}

static void test_resolve_srv(void **state)
{
    (void)state;
    if (!have_dnsmasq())
        skip();
    struct fixture f;
    fixture_start(&f, hosts_text, dnsmasq_args, 2000);
    struct answer a;

    resolve(&f, "_http._tcp.svc.test", SL_DNS_SRV, 1, &a);
    assert_int_equal(a.status, 0);
    /* t1's two addresses at priority 10, then t2's two at 20; gone.svc.test contributes none */
    assert_int_equal(a.n, 4);
    assert_string_equal(a.addrs[0].text, "127.0.0.9:8080");
    assert_string_equal(a.addrs[1].text, "127.0.0.10:8080");
    assert_int_equal(a.addrs[0].priority, 10);
    assert_int_equal(a.addrs[0].weight, 5);
    assert_int_equal(a.addrs[1].priority, 10);
    assert_string_equal(a.addrs[2].text, "127.0.0.20:8081");
    assert_string_equal(a.addrs[3].text, "[::1]:8081");
    assert_int_equal(a.addrs[2].priority, 20);
    assert_int_equal(a.addrs[2].weight, 0);
    assert_int_equal(a.addrs[3].priority, 20);
    /* the smallest TTL of the records used: t2's 3 */
    assert_int_equal(a.ttl, 3);

    /* "." target */
    resolve(&f, "_none._tcp.svc.test", SL_DNS_SRV, 1, &a);
    assert_int_equal(a.status, 0);
    assert_int_equal(a.n, 0);

    /* no SRV records at a name that exists */
    resolve(&f, "a.test", SL_DNS_SRV, 1, &a);
    assert_int_equal(a.status, 0);
    assert_int_equal(a.n, 0);

    /* no such SRV name */
    resolve(&f, "_nope._tcp.svc.test", SL_DNS_SRV, 1, &a);
    assert_int_equal(a.status, -ENOENT);
    assert_string_equal(a.error, "NXDOMAIN");
    fixture_stop(&f);
}

/* A UDP socket that never answers. */
static int silent_server(int *port)
{
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    *port = ntohs(a.sin_port);
    return fd;
}

static void test_timeout(void **state)
{
    (void)state;
    struct sl_loop loop;
    assert_int_equal(sl_loop_init(&loop), 0);
    int port;
    int fd = silent_server(&port);
    char server[32];
    snprintf(server, sizeof server, "127.0.0.1:%d", port);
    char *servers[] = {server};
    char err[128];
    struct sl_dns *d = sl_dns_new(&loop, servers, 1, 300, err, sizeof err);
    assert_non_null(d);

    for (int kind = 0; kind < 2; kind++) {
        struct answer a = {0};
        loop.now_ms = sl_clock_now_ms();
        uint64_t start = sl_clock_now_ms();
        assert_non_null(
            sl_dns_resolve(d, "x.test", kind ? SL_DNS_SRV : SL_DNS_ADDR, 80, on_answer, &a));
        assert_true(run_until(&loop, is_answered, &a, WAIT_MS));
        assert_int_equal(a.count, 1);
        assert_int_equal(a.status, -ETIMEDOUT);
        assert_string_equal(a.error, "timeout");
        uint64_t took = a.done_ms - start;
        assert_true(took >= 250 && took < 1500);
    }
    /* Silent lookups still in flight inside c-ares end with it. */
    sl_dns_free(d);
    sl_loop_run_deferred(&loop);
    close(fd);
    sl_loop_dispose(&loop);
}

static void test_connection_refused(void **state)
{
    (void)state;
    struct sl_loop loop;
    assert_int_equal(sl_loop_init(&loop), 0);
    int port;
    int fd = silent_server(&port);
    close(fd); /* nothing listens there now: ICMP port unreachable */
    char server[32];
    snprintf(server, sizeof server, "127.0.0.1:%d", port);
    char *servers[] = {server};
    char err[128];
    struct sl_dns *d = sl_dns_new(&loop, servers, 1, 1000, err, sizeof err);
    assert_non_null(d);
    struct answer a = {0};
    loop.now_ms = sl_clock_now_ms();
    assert_non_null(sl_dns_resolve(d, "x.test", SL_DNS_ADDR, 80, on_answer, &a));
    assert_true(run_until(&loop, is_answered, &a, WAIT_MS));
    assert_true(a.status == -EIO || a.status == -ETIMEDOUT);
    sl_dns_free(d);
    sl_loop_run_deferred(&loop);
    sl_loop_dispose(&loop);
}

static void test_cancel(void **state)
{
    (void)state;
    if (!have_dnsmasq())
        skip();
    struct fixture f;
    fixture_start(&f, hosts_text, dnsmasq_args, 2000);
    struct answer a = {0}, b = {0}, c = {0};
    f.loop.now_ms = sl_clock_now_ms();
    struct sl_dns_query *qa = sl_dns_resolve(f.dns, "a.test", SL_DNS_ADDR, 1, on_answer, &a);
    struct sl_dns_query *qb =
        sl_dns_resolve(f.dns, "_http._tcp.svc.test", SL_DNS_SRV, 1, on_answer, &b);
    struct sl_dns_query *qc = sl_dns_resolve(f.dns, "10.0.0.1", SL_DNS_ADDR, 1, on_answer, &c);
    assert_non_null(qa);
    assert_non_null(qb);
    assert_non_null(qc);
    sl_dns_cancel(qa);
    sl_dns_cancel(qb);
    sl_dns_cancel(qc);
    run_until(&f.loop, NULL, NULL, 100);
    assert_int_equal(a.count, 0);
    assert_int_equal(b.count, 0);
    assert_int_equal(c.count, 0);
    /* the channel still works */
    resolve(&f, "a.test", SL_DNS_ADDR, 1, &a);
    assert_int_equal(a.status, 0);
    assert_int_equal(a.n, 3);
    fixture_stop(&f);
}

static void test_free_with_pending(void **state)
{
    (void)state;
    if (!have_dnsmasq())
        skip();
    struct fixture f;
    fixture_start(&f, hosts_text, dnsmasq_args, 2000);
    struct answer a[4] = {0};
    f.loop.now_ms = sl_clock_now_ms();
    assert_non_null(sl_dns_resolve(f.dns, "a.test", SL_DNS_ADDR, 1, on_answer, &a[0]));
    assert_non_null(sl_dns_resolve(f.dns, "_http._tcp.svc.test", SL_DNS_SRV, 1, on_answer, &a[1]));
    assert_non_null(sl_dns_resolve(f.dns, "nope.test", SL_DNS_ADDR, 1, on_answer, &a[2]));
    assert_non_null(sl_dns_resolve(f.dns, "10.0.0.1", SL_DNS_ADDR, 1, on_answer, &a[3]));
    sl_dns_free(f.dns);
    f.dns = NULL;
    run_until(&f.loop, NULL, NULL, 100);
    for (int i = 0; i < 4; i++)
        assert_int_equal(a[i].count, 0);

    /* freeing the channel from inside a callback, with other lookups pending */
    char *servers[] = {f.m.server};
    char err[128];
    f.dns = sl_dns_new(&f.loop, servers, 1, 2000, err, sizeof err);
    assert_non_null(f.dns);
    memset(a, 0, sizeof a);
    a[0].free_channel = &f.dns;
    f.loop.now_ms = sl_clock_now_ms();
    assert_non_null(sl_dns_resolve(f.dns, "10.0.0.1", SL_DNS_ADDR, 1, on_answer, &a[0]));
    assert_non_null(sl_dns_resolve(f.dns, "10.0.0.2", SL_DNS_ADDR, 1, on_answer, &a[1]));
    assert_non_null(sl_dns_resolve(f.dns, "a.test", SL_DNS_ADDR, 1, on_answer, &a[2]));
    assert_true(run_until(&f.loop, is_answered, &a[0], WAIT_MS));
    assert_null(f.dns);
    run_until(&f.loop, NULL, NULL, 100);
    assert_int_equal(a[0].count, 1);
    /* one of them was delivered first; whatever was still pending never is */
    assert_int_equal(a[1].count + a[2].count <= 1, 1);
    assert_int_equal(a[2].count, 0);

    /* a query answered by the network, freeing from its callback */
    f.dns = sl_dns_new(&f.loop, servers, 1, 2000, err, sizeof err);
    memset(a, 0, sizeof a);
    a[0].free_channel = &f.dns;
    f.loop.now_ms = sl_clock_now_ms();
    assert_non_null(sl_dns_resolve(f.dns, "a.test", SL_DNS_ADDR, 1, on_answer, &a[0]));
    assert_non_null(sl_dns_resolve(f.dns, "_http._tcp.svc.test", SL_DNS_SRV, 1, on_answer, &a[1]));
    assert_true(run_until(&f.loop, is_answered, &a[0], WAIT_MS));
    assert_null(f.dns);
    run_until(&f.loop, NULL, NULL, 100);
    assert_int_equal(a[1].count, 0);
    fixture_stop(&f);
}

static void test_bad_servers(void **state)
{
    (void)state;
    struct sl_loop loop;
    assert_int_equal(sl_loop_init(&loop), 0);
    char err[128];
    const char *bad[] = {"",          "1.2.3", "1.2.3.4:", "1.2.3.4:0", "1.2.3.4:65536",
                         "1.2.3.4:x", "[::1",  "[::1]x",   "[::1]:",    "host.example:53",
                         "1.2.3.4:-5"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *s[] = {(char *)bad[i]};
        err[0] = '\0';
        assert_null(sl_dns_new(&loop, s, 1, 100, err, sizeof err));
        assert_true(strstr(err, "bad DNS server") != NULL);
    }
    const char *good[] = {"1.2.3.4", "1.2.3.4:5353", "::1", "[::1]", "[::1]:5353", "fe80::1"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        char *s[] = {(char *)good[i]};
        struct sl_dns *d = sl_dns_new(&loop, s, 1, 100, err, sizeof err);
        assert_non_null(d);
        sl_dns_free(d);
    }
    /* resolv.conf */
    struct sl_dns *d = sl_dns_new(&loop, NULL, 0, 0, err, sizeof err);
    assert_non_null(d);
    sl_dns_free(d);
    sl_dns_free(NULL);
    sl_loop_run_deferred(&loop);
    sl_loop_dispose(&loop);
}

/* ---- a scripted DNS server on the test's own loop ------------------------------------------ */

enum script_mode {
    SCRIPT_MANY,         /* 70 SRV targets with 5 addresses each */
    SCRIPT_SILENT_A,     /* SRV answered, targets' A queries never */
    SCRIPT_SERVFAIL,     /* SRV answered, one target's A answered SERVFAIL */
    SCRIPT_SHORT,        /* an A answer that announces 2 records and carries 1 */
    SCRIPT_AAAA_REFUSED, /* A answered, AAAA refused (dnsmasq without upstreams does this) */
};

struct script_conn {
    struct sl_io io;
    struct script *sc;
    uint8_t buf[2048];
    size_t len;
};

struct script {
    struct sl_io io, tcp_io;
    int fd, lfd;
    int port;
    enum script_mode mode;
    int a_queries;
    int tcp_queries;
    struct sl_loop *loop;
    struct script_conn conns[4];
};

static void put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static size_t put_name(uint8_t *p, const char *name)
{
    size_t n = 0;
    while (*name) {
        const char *dot = strchr(name, '.');
        size_t l = dot ? (size_t)(dot - name) : strlen(name);
        p[n++] = (uint8_t)l;
        memcpy(p + n, name, l);
        n += l;
        name += l + (dot ? 1 : 0);
    }
    p[n++] = 0;
    return n;
}

/* Starts an answer record to the question (owner: a pointer to it). */
static size_t put_rr(uint8_t *p, unsigned type, uint32_t ttl, unsigned rdlen)
{
    p[0] = 0xc0;
    p[1] = 12;
    put16(p + 2, type);
    put16(p + 4, 1);
    p[6] = (uint8_t)(ttl >> 24);
    p[7] = (uint8_t)(ttl >> 16);
    p[8] = (uint8_t)(ttl >> 8);
    p[9] = (uint8_t)ttl;
    put16(p + 10, rdlen);
    return 12;
}

/* The answer to query q (qlen bytes) in r; 0 to stay silent. */
static size_t script_answer(struct script *sc, const uint8_t *q, size_t qlen, uint8_t *r)
{
    if (qlen < 17)
        return 0;
    /* the question: a plain name (queries are never compressed), type, class */
    char name[256];
    size_t p = 12, nl = 0;
    while (p < qlen && q[p] && nl + q[p] + 1 < sizeof name) {
        size_t l = q[p++];
        if (nl)
            name[nl++] = '.';
        memcpy(name + nl, q + p, l);
        nl += l;
        p += l;
    }
    name[nl] = '\0';
    p++;
    if (p + 4 > qlen)
        return 0;
    unsigned type = (unsigned)((q[p] << 8) | q[p + 1]);
    size_t qend = p + 4;
    memcpy(r, q, qend);
    r[2] = 0x81;
    r[3] = 0x80;
    put16(r + 6, 0);
    put16(r + 8, 0);
    put16(r + 10, 0);
    size_t n = qend;
    unsigned an = 0;
    if (type == 33) {
        unsigned targets = sc->mode == SCRIPT_MANY ? 70 : 2;
        for (unsigned k = 0; k < targets; k++) {
            char target[32];
            snprintf(target, sizeof target, "t%u.x", k);
            size_t at = n;
            n += put_rr(r + n, 33, 60, 0);
            put16(r + n, k % 3); /* priority */
            put16(r + n + 2, 1); /* weight */
            put16(r + n + 4, 1000 + k);
            size_t tl = put_name(r + n + 6, target);
            put16(r + at + 10, (unsigned)(6 + tl));
            n += 6 + tl;
            an++;
        }
    } else if (type == 1) {
        sc->a_queries++;
        unsigned k = 0;
        if (sscanf(name, "t%u.x", &k) != 1)
            k = 0;
        if (sc->mode == SCRIPT_SILENT_A)
            return 0;
        if (sc->mode == SCRIPT_SERVFAIL && k == 1) {
            r[3] = 0x82;
        } else {
            unsigned count = sc->mode == SCRIPT_MANY ? 5 : 1;
            for (unsigned i = 0; i < count; i++) {
                n += put_rr(r + n, 1, 30, 4);
                r[n++] = 10;
                r[n++] = (uint8_t)k;
                r[n++] = 0;
                r[n++] = (uint8_t)i;
                an++;
            }
            if (sc->mode == SCRIPT_SHORT)
                an++;
        }
    }
    if (type == 28 && sc->mode == SCRIPT_AAAA_REFUSED)
        r[3] = 0x85; /* REFUSED */
    put16(r + 6, an);
    return n;
}

static void on_script_io(struct sl_io *io, uint32_t events)
{
    (void)events;
    struct script *sc = io->data;
    uint8_t q[1024], r[4096];
    struct sockaddr_storage from;
    socklen_t fl = sizeof from;
    ssize_t got = recvfrom(sc->fd, q, sizeof q, 0, (struct sockaddr *)&from, &fl);
    if (got <= 0)
        return;
    size_t n = script_answer(sc, q, (size_t)got, r);
    if (n)
        sendto(sc->fd, r, n, 0, (struct sockaddr *)&from, fl);
}

/* TCP: messages with a two-byte length in front. */
static void on_script_conn(struct sl_io *io, uint32_t events)
{
    (void)events;
    struct script_conn *c = io->data;
    ssize_t got = read(io->fd, c->buf + c->len, sizeof c->buf - c->len);
    if (got <= 0) {
        int fd = io->fd;
        sl_io_stop(c->sc->loop, io);
        close(fd);
        io->fd = -1;
        return;
    }
    c->len += (size_t)got;
    while (c->len >= 2 && c->len >= 2 + (size_t)((c->buf[0] << 8) | c->buf[1])) {
        size_t ql = (size_t)((c->buf[0] << 8) | c->buf[1]);
        uint8_t r[4098];
        c->sc->tcp_queries++;
        size_t n = script_answer(c->sc, c->buf + 2, ql, r + 2);
        if (n) {
            put16(r, (unsigned)n);
            assert_int_equal(write(io->fd, r, n + 2), (ssize_t)(n + 2));
        }
        memmove(c->buf, c->buf + 2 + ql, c->len - 2 - ql);
        c->len -= 2 + ql;
    }
}

static void on_script_accept(struct sl_io *io, uint32_t events)
{
    (void)events;
    struct script *sc = io->data;
    int fd = accept(sc->lfd, NULL, NULL);
    if (fd < 0)
        return;
    for (size_t i = 0; i < 4; i++) {
        struct script_conn *c = &sc->conns[i];
        if (c->io.fd < 0) {
            c->sc = sc;
            c->len = 0;
            assert_int_equal(sl_io_start(sc->loop, &c->io, fd, EPOLLIN, on_script_conn, c), 0);
            return;
        }
    }
    close(fd);
}

static void script_start(struct script *sc, struct sl_loop *loop, enum script_mode mode)
{
    memset(sc, 0, sizeof *sc);
    sc->loop = loop;
    sc->mode = mode;
    for (size_t i = 0; i < 4; i++)
        sc->conns[i].io.fd = -1;
    for (;;) {
        sc->fd = silent_server(&sc->port);
        sc->lfd = socket(AF_INET, SOCK_STREAM, 0);
        assert_true(sc->lfd >= 0);
        struct sockaddr_in a = {.sin_family = AF_INET,
                                .sin_port = htons((uint16_t)sc->port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        if (bind(sc->lfd, (struct sockaddr *)&a, sizeof a) == 0)
            break;
        close(sc->lfd);
        close(sc->fd);
    }
    assert_int_equal(listen(sc->lfd, 8), 0);
    assert_int_equal(sl_io_start(loop, &sc->io, sc->fd, EPOLLIN, on_script_io, sc), 0);
    assert_int_equal(sl_io_start(loop, &sc->tcp_io, sc->lfd, EPOLLIN, on_script_accept, sc), 0);
}

static void script_stop(struct script *sc, struct sl_loop *loop)
{
    for (size_t i = 0; i < 4; i++) {
        if (sc->conns[i].io.fd >= 0) {
            int fd = sc->conns[i].io.fd;
            sl_io_stop(loop, &sc->conns[i].io);
            close(fd);
        }
    }
    sl_io_stop(loop, &sc->io);
    sl_io_stop(loop, &sc->tcp_io);
    close(sc->fd);
    close(sc->lfd);
}

static struct sl_dns *script_channel(struct script *sc, struct sl_loop *loop, uint64_t timeout)
{
    char server[32];
    snprintf(server, sizeof server, "127.0.0.1:%d", sc->port);
    char *servers[] = {server};
    char err[128];
    struct sl_dns *d = sl_dns_new(loop, servers, 1, timeout, err, sizeof err);
    assert_non_null(d);
    return d;
}

/* Keeps every address of an answer. */
struct big_answer {
    int count, status;
    size_t n;
    uint16_t prio[SL_DNS_MAX_ADDRS];
    uint16_t port[SL_DNS_MAX_ADDRS];
    uint32_t ttl;
};

static void on_big_answer(void *data, int status, const char *error,
                          const struct sl_dns_addr *addrs, size_t n, uint32_t ttl_s)
{
    (void)error;
    struct big_answer *a = data;
    a->count++;
    a->status = status;
    a->n = n;
    a->ttl = ttl_s;
    assert_true(n <= SL_DNS_MAX_ADDRS);
    for (size_t i = 0; i < n; i++) {
        a->prio[i] = addrs[i].priority;
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)&addrs[i].addr;
        a->port[i] = ntohs(s4->sin_port);
    }
}

static bool big_answered(void *arg)
{
    return ((struct big_answer *)arg)->count > 0;
}

static void test_srv_bounds(void **state)
{
    (void)state;
    struct sl_loop loop;
    assert_int_equal(sl_loop_init(&loop), 0);
    struct script sc;
    script_start(&sc, &loop, SCRIPT_MANY);
    struct sl_dns *d = script_channel(&sc, &loop, 2000);
    struct big_answer a = {0};
    loop.now_ms = sl_clock_now_ms();
    assert_non_null(sl_dns_resolve(d, "_s._tcp.x", SL_DNS_SRV, 0, on_big_answer, &a));
    assert_true(run_until(&loop, big_answered, &a, WAIT_MS));
    assert_int_equal(a.status, 0);
    /* 70 targets: 64 looked up, 5 addresses each, 256 kept, lowest priorities first. The SRV
     * answer is over the EDNS size: it came again over TCP. */
    assert_true(sc.tcp_queries >= 1);
    assert_int_equal(sc.a_queries, SL_DNS_MAX_SRV_TARGETS);
    assert_int_equal(a.n, SL_DNS_MAX_ADDRS);
    for (size_t i = 1; i < a.n; i++)
        assert_true(a.prio[i - 1] <= a.prio[i]);
    for (size_t i = 0; i < a.n; i++)
        assert_true(a.port[i] >= 1000 && a.port[i] < 1000 + SL_DNS_MAX_SRV_TARGETS);
    /* priorities 0 and 1 have 43 records among the first 64 targets: 215 addresses */
    size_t low = 0;
    for (size_t i = 0; i < a.n; i++)
        low += a.prio[i] < 2;
    assert_int_equal(low, 43 * 5);
    assert_int_equal(a.ttl, 30);
    sl_dns_free(d);
    sl_loop_run_deferred(&loop);
    script_stop(&sc, &loop);
    sl_loop_dispose(&loop);
}

static bool saw_a_query(void *arg)
{
    return ((struct script *)arg)->a_queries > 0;
}

static void test_srv_cancel_and_timeout_in_targets(void **state)
{
    (void)state;
    struct sl_loop loop;
    assert_int_equal(sl_loop_init(&loop), 0);
    struct script sc;
    script_start(&sc, &loop, SCRIPT_SILENT_A);
    struct sl_dns *d = script_channel(&sc, &loop, 300);

    /* cancelled while its targets are being looked up */
    struct big_answer a = {0};
    loop.now_ms = sl_clock_now_ms();
    struct sl_dns_query *q = sl_dns_resolve(d, "_s._tcp.x", SL_DNS_SRV, 0, on_big_answer, &a);
    assert_non_null(q);
    assert_true(run_until(&loop, saw_a_query, &sc, WAIT_MS));
    sl_dns_cancel(q);
    run_until(&loop, NULL, NULL, 500);
    assert_int_equal(a.count, 0);

    /* the targets' stage has a deadline of its own */
    sc.a_queries = 0;
    uint64_t start = sl_clock_now_ms();
    loop.now_ms = start;
    assert_non_null(sl_dns_resolve(d, "_s._tcp.x", SL_DNS_SRV, 0, on_big_answer, &a));
    assert_true(run_until(&loop, big_answered, &a, WAIT_MS));
    assert_int_equal(a.status, -ETIMEDOUT);
    uint64_t took = sl_clock_now_ms() - start;
    assert_true(took >= 250 && took < 1500);

    /* freed while targets are pending */
    memset(&a, 0, sizeof a);
    sc.a_queries = 0;
    assert_non_null(sl_dns_resolve(d, "_s._tcp.x", SL_DNS_SRV, 0, on_big_answer, &a));
    assert_true(run_until(&loop, saw_a_query, &sc, WAIT_MS));
    sl_dns_free(d);
    run_until(&loop, NULL, NULL, 50);
    assert_int_equal(a.count, 0);
    sl_loop_run_deferred(&loop);
    script_stop(&sc, &loop);
    sl_loop_dispose(&loop);
}

static void test_target_failure_and_bad_reply(void **state)
{
    (void)state;
    struct sl_loop loop;
    assert_int_equal(sl_loop_init(&loop), 0);
    struct script sc;

    /* one target answering SERVFAIL fails the whole lookup */
    script_start(&sc, &loop, SCRIPT_SERVFAIL);
    struct sl_dns *d = script_channel(&sc, &loop, 2000);
    struct answer a = {0};
    loop.now_ms = sl_clock_now_ms();
    assert_non_null(sl_dns_resolve(d, "_s._tcp.x", SL_DNS_SRV, 0, on_answer, &a));
    assert_true(run_until(&loop, is_answered, &a, WAIT_MS));
    /* c-ares 1.18 ends a query whose every try got SERVFAIL with ECONNREFUSED */
    assert_int_equal(a.status, -EIO);
    assert_true(a.error[0] != '\0');
    sl_dns_free(d);
    script_stop(&sc, &loop);

    /* an answer shorter than its counts */
    script_start(&sc, &loop, SCRIPT_SHORT);
    d = script_channel(&sc, &loop, 2000);
    memset(&a, 0, sizeof a);
    loop.now_ms = sl_clock_now_ms();
    assert_non_null(sl_dns_resolve(d, "t0.x", SL_DNS_ADDR, 80, on_answer, &a));
    assert_true(run_until(&loop, is_answered, &a, WAIT_MS));
    assert_int_equal(a.status, -EBADMSG);
    assert_string_equal(a.error, "bad response");
    sl_dns_free(d);
    sl_loop_run_deferred(&loop);
    script_stop(&sc, &loop);
    sl_loop_dispose(&loop);
}

static void test_one_family_refused(void **state)
{
    (void)state;
    struct sl_loop loop;
    assert_int_equal(sl_loop_init(&loop), 0);
    struct script sc;
    script_start(&sc, &loop, SCRIPT_AAAA_REFUSED);
    struct sl_dns *d = script_channel(&sc, &loop, 2000);

    /* the A answer stands although the AAAA lookup was refused */
    struct answer a = {0};
    loop.now_ms = sl_clock_now_ms();
    assert_non_null(sl_dns_resolve(d, "t0.x", SL_DNS_ADDR, 80, on_answer, &a));
    assert_true(run_until(&loop, is_answered, &a, WAIT_MS));
    assert_int_equal(a.status, 0);
    assert_int_equal(a.n, 1);

    /* likewise for every SRV target */
    memset(&a, 0, sizeof a);
    loop.now_ms = sl_clock_now_ms();
    assert_non_null(sl_dns_resolve(d, "_s._tcp.x", SL_DNS_SRV, 0, on_answer, &a));
    assert_true(run_until(&loop, is_answered, &a, WAIT_MS));
    assert_int_equal(a.status, 0);
    assert_int_equal(a.n, 2);
    sl_dns_free(d);
    sl_loop_run_deferred(&loop);
    script_stop(&sc, &loop);
    sl_loop_dispose(&loop);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_walker_real_answers),
        cmocka_unit_test(test_walker_every_prefix),
        cmocka_unit_test(test_walker_compression),
        cmocka_unit_test(test_walker_bad_counts_and_names),
        cmocka_unit_test(test_resolve_a_aaaa),
        cmocka_unit_test(test_resolve_srv),
        cmocka_unit_test(test_timeout),
        cmocka_unit_test(test_connection_refused),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_free_with_pending),
        cmocka_unit_test(test_bad_servers),
        cmocka_unit_test(test_srv_bounds),
        cmocka_unit_test(test_srv_cancel_and_timeout_in_targets),
        cmocka_unit_test(test_target_failure_and_bad_reply),
        cmocka_unit_test(test_one_family_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
