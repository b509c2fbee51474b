#ifndef SL_TESTS_DNSMASQ_H
#define SL_TESTS_DNSMASQ_H

/* A real DNS server for unit tests: Debian's dnsmasq on a free 127.0.0.1 port, answering for
 * the zone "test" from a hosts file, stopped by PID (and killed with its parent). Header-only
 * so each test binary gets its own copy; include after <cmocka.h>. */

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/loop.h"

#define DNSMASQ "/usr/sbin/dnsmasq"
#define DNSMASQ_WAIT_MS 5000 /* slow enough for ASan, far below anything a test waits for */

struct dnsmasq {
    pid_t pid;
    int port;
    char hosts[160]; /* addn-hosts file, re-read on SIGHUP */
    char server[32]; /* "127.0.0.1:port" for a resolver list */
};

static inline bool have_dnsmasq(void)
{
    return access(DNSMASQ, X_OK) == 0;
}

static inline void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both). Other tests may
 * run beside this one, so the caller still retries when the server cannot bind it. */
static inline int free_dns_port(void)
{
    for (;;) {
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        assert_true(fd >= 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
        socklen_t len = sizeof a;
        assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
        int tfd = socket(AF_INET, SOCK_STREAM, 0);
        assert_true(tfd >= 0);
        int ok = bind(tfd, (struct sockaddr *)&a, sizeof a) == 0;
        close(tfd);
        close(fd);
        if (ok)
            return ntohs(a.sin_port);
    }
}

/* True when something answers a DNS query for "up.test" on 127.0.0.1:port within 100 ms. */
static inline bool dns_answers(int port)
{
    static const uint8_t q[] = {0xab, 0xcd, 1, 0,   0,   1,   0,   0, 0, 0, 0, 0, 2,
                                'u',  'p',  4, 't', 'e', 's', 't', 0, 0, 1, 0, 1};
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    assert_true(fd >= 0);
    struct timeval tv = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    uint8_t buf[512];
    bool ok = sendto(fd, q, sizeof q, 0, (struct sockaddr *)&a, sizeof a) == (ssize_t)sizeof q &&
              recv(fd, buf, sizeof buf, 0) >= 12;
    close(fd);
    return ok;
}

/* Writes `text` to `path` by replacing it with a rename, as tools that rewrite such files do. */
static inline void write_file(const char *path, const char *text)
{
    char tmp[200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    assert_non_null(f);
    assert_true(fputs(text, f) >= 0);
    assert_int_equal(fclose(f), 0);
    assert_int_equal(rename(tmp, path), 0);
}

/* One try: false when dnsmasq exited before answering (its port was taken meanwhile). */
static inline bool dnsmasq_try(struct dnsmasq *m, int ttl, const char *const *args)
{
    m->port = free_dns_port();
    snprintf(m->server, sizeof m->server, "127.0.0.1:%d", m->port);
    char port_arg[32], hosts_arg[200], ttl_arg[32];
    snprintf(port_arg, sizeof port_arg, "--port=%d", m->port);
    snprintf(hosts_arg, sizeof hosts_arg, "--addn-hosts=%s", m->hosts);
    snprintf(ttl_arg, sizeof ttl_arg, "--local-ttl=%d", ttl);
    const char *argv[64] = {"dnsmasq",
                            "--no-daemon",
                            port_arg,
                            "--listen-address=127.0.0.1",
                            "--bind-interfaces",
                            "--no-resolv",
                            "--no-hosts",
                            "--local=/test/",
                            hosts_arg,
                            ttl_arg,
                            "--conf-file=/dev/null",
                            "--pid-file=",
                            "--log-facility=/dev/null"};
    size_t n = 13;
    if (geteuid() == 0)
        argv[n++] = "--user=root"; /* no switch to nobody: the hosts file stays readable */
    for (size_t i = 0; args && args[i] && n < 63; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    m->pid = fork();
    assert_true(m->pid >= 0);
    if (m->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int devnull = open("/dev/null", O_RDWR);
        if (devnull >= 0) {
            dup2(devnull, 0);
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        execv(DNSMASQ, (char *const *)argv);
        _exit(127);
    }
    uint64_t deadline = sl_clock_now_ms() + DNSMASQ_WAIT_MS;
    while (!dns_answers(m->port)) {
        int status;
        if (waitpid(m->pid, &status, WNOHANG) == m->pid) {
            m->pid = 0;
            return false;
        }
        assert_true(sl_clock_now_ms() < deadline);
        sleep_ms(10);
    }
    return true;
}

/* Starts dnsmasq answering from `hosts_text` (written to `hosts_path`) with the extra `args`
 * (NULL terminated) and `ttl` seconds for local answers. */
static inline void dnsmasq_start(struct dnsmasq *m, const char *hosts_path, const char *hosts_text,
                                 int ttl, const char *const *args)
{
    memset(m, 0, sizeof *m);
    snprintf(m->hosts, sizeof m->hosts, "%s", hosts_path);
    write_file(m->hosts, hosts_text);
    for (int i = 0; i < 20; i++)
        if (dnsmasq_try(m, ttl, args))
            return;
    fail_msg("dnsmasq did not start");
}

/* New hosts file contents, read again on SIGHUP. */
static inline void dnsmasq_set_hosts(struct dnsmasq *m, const char *hosts_text)
{
    write_file(m->hosts, hosts_text);
    assert_int_equal(kill(m->pid, SIGHUP), 0);
}

/* Stops it by PID and removes its hosts file. */
static inline void dnsmasq_stop(struct dnsmasq *m)
{
    if (m->pid > 0) {
        kill(m->pid, SIGTERM);
        int status;
        waitpid(m->pid, &status, 0);
        m->pid = 0;
    }
    unlink(m->hosts);
}

#endif
