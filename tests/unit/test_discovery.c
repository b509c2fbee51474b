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
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "config/config.h"
#include "core/loop.h"
#include "proxy/discovery.h"
#include "proxy/pool.h"
#include "dnsmasq.h"
#include "loop_wait.h"

/* Slow enough for ASan, far below anything a test waits for. */
#define WAIT_MS 5000

/* ---- loop helpers ------------------------------------------------------------------------ */

/* ---- pools --------------------------------------------------------------------------------- */

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The pool's current set as "address/weight/zone" items, sorted, joined by spaces. */
static void set_text(struct sl_pool *p, char *out, size_t cap)
{
    struct sl_endpoint_set *s = sl_pool_acquire_set(p);
    assert_non_null(s);
    char items[64][96];
    char *ptrs[64];
    assert_true(s->count <= 64);
    for (size_t i = 0; i < s->count; i++) {
        const struct sl_endpoint *ep = s->eps[i];
        snprintf(items[i], sizeof items[i], "%s/%u/%s", ep->address, (unsigned)ep->weight,
                 ep->zone ? ep->zone : "-");
        ptrs[i] = items[i];
    }
    qsort(ptrs, s->count, sizeof ptrs[0], cmp_str);
    size_t n = 0;
    out[0] = '\0';
    for (size_t i = 0; i < s->count; i++)
        n += (size_t)snprintf(out + n, cap - n, "%s%s", i ? " " : "", ptrs[i]);
    sl_endpoint_set_unref(s);
}

struct expect {
    struct sl_pool *pool;
    const char *text;
};

static bool pool_is(void *arg)
{
    struct expect *e = arg;
    char buf[2048];
    set_text(e->pool, buf, sizeof buf);
    return strcmp(buf, e->text) == 0;
}

static void wait_pool(struct sl_loop *loop, struct sl_pool *p, const char *text)
{
    struct expect e = {p, text};
    if (!run_until(loop, pool_is, &e, WAIT_MS)) {
        char buf[2048];
        set_text(p, buf, sizeof buf);
        fail_msg("pool is \"%s\", expected \"%s\"", buf, text);
    }
}

static void assert_pool(struct sl_pool *p, const char *text)
{
    char buf[2048];
    set_text(p, buf, sizeof buf);
    assert_string_equal(buf, text);
}

/* ---- tests --------------------------------------------------------------------------------- */

struct fixture {
    struct sl_loop loop;
    char dir[64];
    char file[96];
    struct dnsmasq m;
    char *servers[1];
    struct sl_upstream_conf ups[4];
    struct sl_config cfg;
    struct sl_pool *pools[4];
};

static void fixture_init(struct fixture *f)
{
    memset(f, 0, sizeof *f);
    assert_int_equal(sl_loop_init(&f->loop), 0);
    snprintf(f->dir, sizeof f->dir, "/tmp/sl_test_discovery_XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->file, sizeof f->file, "%s/endpoints.yaml", f->dir);
    f->cfg.upstreams = f->ups;
    f->cfg.dns_timeout_ms = 300;
}

static void fixture_pools(struct fixture *f, size_t n)
{
    f->cfg.upstream_count = n;
    for (size_t i = 0; i < n; i++) {
        f->pools[i] = sl_pool_new(&f->ups[i], NULL, 1, NULL, 0);
        assert_non_null(f->pools[i]);
    }
}

static void fixture_dispose(struct fixture *f)
{
    sl_loop_run_deferred(&f->loop);
    for (size_t i = 0; i < 4; i++)
        sl_pool_free(f->pools[i]);
    dnsmasq_stop(&f->m);
    char path[160];
    snprintf(path, sizeof path, "%s/hosts", f->dir);
    unlink(path);
    unlink(f->file);
    rmdir(f->dir);
    sl_loop_dispose(&f->loop);
}

static const char *const srv_args[] = {
    "--srv-host=_users._tcp.test,srv-target.test,9001,0,0",
    "--srv-host=_users._tcp.test,srv-target.test,9002,0,3",
    "--srv-host=_users._tcp.test,srv-target.test,9003,1,1", /* a backup: not published */
    NULL,
};

static void test_dns_srv_and_file(void **state)
{
    (void)state;
    if (!have_dnsmasq())
        skip();
    struct fixture f;
    fixture_init(&f);
    char hosts_path[160];
    snprintf(hosts_path, sizeof hosts_path, "%s/hosts", f.dir);
    dnsmasq_start(&f.m, hosts_path,
                  "127.0.0.2 users.test\n127.0.0.3 users.test\n127.0.0.1 srv-target.test\n", 1,
                  srv_args);
    f.servers[0] = f.m.server;
    f.cfg.dns_servers = f.servers;
    f.cfg.dns_server_count = 1;
    f.ups[0] = (struct sl_upstream_conf){.name = "users",
                                         .discovery = {.kind = SL_DISCOVERY_DNS,
                                                       .name = "users.test",
                                                       .port = 8080,
                                                       .weight = 2,
                                                       .zone = "az1",
                                                       .min_interval_ms = 100,
                                                       .max_interval_ms = 400}};
    f.ups[1] = (struct sl_upstream_conf){.name = "static"};
    f.ups[2] = (struct sl_upstream_conf){.name = "srv",
                                         .discovery = {.kind = SL_DISCOVERY_SRV,
                                                       .name = "_users._tcp.test",
                                                       .weight = 1,
                                                       .min_interval_ms = 100,
                                                       .max_interval_ms = 400}};
    f.ups[3] = (struct sl_upstream_conf){.name = "files",
                                         .discovery = {.kind = SL_DISCOVERY_FILE,
                                                       .name = f.file,
                                                       .min_interval_ms = 100,
                                                       .max_interval_ms = 400}};
    fixture_pools(&f, 4);
    write_file(f.file, "endpoints:\n  - 10.0.0.1:80\n  - {address: 10.0.0.2:80, weight: 4, "
                       "zone: z2}\n");
    char err[256];
    f.loop.now_ms = sl_clock_now_ms();
    struct sl_discovery *d = sl_discovery_start(&f.loop, &f.cfg, f.pools, err, sizeof err);
    assert_non_null(d);
    /* the file is read before the start returns */
    assert_pool(f.pools[3], "10.0.0.1:80/1/- 10.0.0.2:80/4/z2");
    assert_pool(f.pools[1], "");

    wait_pool(&f.loop, f.pools[0], "127.0.0.2:8080/2/az1 127.0.0.3:8080/2/az1");
    /* SRV: record ports and weights (0 taken as 1), the lowest priority only */
    wait_pool(&f.loop, f.pools[2], "127.0.0.1:9001/1/- 127.0.0.1:9002/3/-");

    /* the answer changes: followed after its TTL (1 s, clamped to 400 ms) */
    uint64_t t0 = sl_clock_now_ms();
    dnsmasq_set_hosts(&f.m, "127.0.0.4 users.test\n127.0.0.1 srv-target.test\n");
    wait_pool(&f.loop, f.pools[0], "127.0.0.4:8080/2/az1");
    assert_true(sl_clock_now_ms() - t0 < 2000);

    /* the name vanishes (NXDOMAIN), then the target of the SRV records: the last good sets
     * stay */
    dnsmasq_set_hosts(&f.m, "127.0.0.9 other.test\n");
    run_until(&f.loop, NULL, NULL, 1200);
    assert_pool(f.pools[0], "127.0.0.4:8080/2/az1");
    assert_pool(f.pools[2], "127.0.0.1:9001/1/- 127.0.0.1:9002/3/-");

    /* it comes back */
    dnsmasq_set_hosts(&f.m, "127.0.0.5 users.test\n");
    wait_pool(&f.loop, f.pools[0], "127.0.0.5:8080/2/az1");

    /* the file changes, then turns invalid, then disappears: the last good set stays */
    write_file(f.file, "[\"10.0.0.3:81\"]\n");
    wait_pool(&f.loop, f.pools[3], "10.0.0.3:81/1/-");
    write_file(f.file, "endpoints: [{address: 10.0.0.9:");
    run_until(&f.loop, NULL, NULL, 300);
    assert_pool(f.pools[3], "10.0.0.3:81/1/-");
    unlink(f.file);
    run_until(&f.loop, NULL, NULL, 300);
    assert_pool(f.pools[3], "10.0.0.3:81/1/-");
    write_file(f.file, "endpoints:\n  - 10.0.0.4:82\n");
    wait_pool(&f.loop, f.pools[3], "10.0.0.4:82/1/-");
    /* an empty list is what the file says */
    write_file(f.file, "endpoints: []\n");
    wait_pool(&f.loop, f.pools[3], "");

    /* the DNS server dies: lookups time out, the last good set stays */
    dnsmasq_stop(&f.m);
    run_until(&f.loop, NULL, NULL, 1500);
    assert_pool(f.pools[0], "127.0.0.5:8080/2/az1");
    assert_pool(f.pools[2], "127.0.0.1:9001/1/- 127.0.0.1:9002/3/-");

    sl_discovery_stop(d);
    /* nothing runs after the stop */
    run_until(&f.loop, NULL, NULL, 100);
    fixture_dispose(&f);
}

static void test_start_errors(void **state)
{
    (void)state;
    struct fixture f;
    fixture_init(&f);
    char err[256];
    f.ups[0] = (struct sl_upstream_conf){
        .name = "users", .discovery = {.kind = SL_DISCOVERY_DNS, .name = "users.test", .port = 80}};
    f.cfg.upstream_count = 1;

    /* a pool missing */
    assert_null(sl_discovery_start(&f.loop, &f.cfg, f.pools, err, sizeof err));
    assert_string_equal(err, "upstream users: discovery without a pool");

    /* a bad resolver address (the loader refuses it first; checked again here) */
    fixture_pools(&f, 1);
    char *bad[] = {"not-an-ip"};
    f.cfg.dns_servers = bad;
    f.cfg.dns_server_count = 1;
    assert_null(sl_discovery_start(&f.loop, &f.cfg, f.pools, err, sizeof err));
    assert_non_null(strstr(err, "resolver: bad DNS server address"));

    /* a file in a directory that does not exist */
    f.ups[0].discovery = (struct sl_discovery_conf){.kind = SL_DISCOVERY_FILE,
                                                    .name = "/nonexistent-dir-sl/eps.yaml"};
    assert_null(sl_discovery_start(&f.loop, &f.cfg, f.pools, err, sizeof err));
    assert_non_null(strstr(err, "upstream users: discovery file: /nonexistent-dir-sl/eps.yaml"));

    /* a missing file in a directory that exists is not an error: it may come later */
    f.ups[0].discovery.name = f.file;
    struct sl_discovery *d = sl_discovery_start(&f.loop, &f.cfg, f.pools, err, sizeof err);
    assert_non_null(d);
    assert_pool(f.pools[0], "");
    write_file(f.file, "- 10.0.0.7:80\n");
    wait_pool(&f.loop, f.pools[0], "10.0.0.7:80/1/-");
    sl_discovery_stop(d);

    /* no upstream with discovery: nothing to do, still a handle */
    f.ups[0].discovery.kind = SL_DISCOVERY_NONE;
    d = sl_discovery_start(&f.loop, &f.cfg, f.pools, err, sizeof err);
    assert_non_null(d);
    sl_discovery_stop(d);
    sl_discovery_stop(NULL);
    fixture_dispose(&f);
}

/* A DNS server that never answers: the first lookups fail, nothing is published, and the
 * retries back off from min_interval towards max_interval. */
static void test_backoff_without_answers(void **state)
{
    (void)state;
    struct fixture f;
    fixture_init(&f);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    char server[32];
    snprintf(server, sizeof server, "127.0.0.1:%d", ntohs(a.sin_port));
    f.servers[0] = server;
    f.cfg.dns_servers = f.servers;
    f.cfg.dns_server_count = 1;
    f.cfg.dns_timeout_ms = 50;
    f.ups[0] = (struct sl_upstream_conf){.name = "users",
                                         .discovery = {.kind = SL_DISCOVERY_DNS,
                                                       .name = "users.test",
                                                       .port = 80,
                                                       .min_interval_ms = 100,
                                                       .max_interval_ms = 400}};
    fixture_pools(&f, 1);
    char err[256];
    f.loop.now_ms = sl_clock_now_ms();
    struct sl_discovery *d = sl_discovery_start(&f.loop, &f.cfg, f.pools, err, sizeof err);
    assert_non_null(d);
    /* Lookups start at 0, then after each 50 ms timeout wait 100, 200, 400, 400 ms: about
     * 0, 150, 400, 850, 1300, 1750. Count the queries the silent server received. */
    run_until(&f.loop, NULL, NULL, 1500);
    /* Retries of one query reuse its id: distinct ids / 2 (A and AAAA) = lookups. */
    uint16_t ids[256];
    size_t nids = 0;
    uint8_t buf[512];
    while (recv(fd, buf, sizeof buf, MSG_DONTWAIT) >= 2) {
        uint16_t id = (uint16_t)((buf[0] << 8) | buf[1]);
        bool seen = false;
        for (size_t i = 0; i < nids && !seen; i++)
            seen = ids[i] == id;
        if (!seen && nids < 256)
            ids[nids++] = id;
    }
    size_t lookups = nids / 2;
    /* without backoff (every 100 ms after each 50 ms timeout) there would be 10 */
    assert_true(lookups >= 4 && lookups <= 6);
    assert_pool(f.pools[0], "");
    sl_discovery_stop(d);
    close(fd);
    fixture_dispose(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dns_srv_and_file),
        cmocka_unit_test(test_start_errors),
        cmocka_unit_test(test_backoff_without_answers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
