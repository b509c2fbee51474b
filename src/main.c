/* sluice: process start-up, signals, and worker lifetime. Nothing else lives here. */
#include <errno.h>
#include <signal.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config/config.h"
#include "core/log.h"
#include "core/loop.h"
#include "filters/filter_set.h"
#include "l4/gateway.h"
#include "obs/obs.h"
#include "obs/process.h"

#define SLUICE_VERSION "0.1.0"

/* Exit codes (documented in docs/operations.md). */
enum {
    EXIT_OK = 0,
    EXIT_CONFIG = 1, /* invalid configuration, or start-up failed (e.g. address in use) */
    EXIT_USAGE = 2,  /* bad command line */
};

static void usage(FILE *out)
{
    fprintf(out, "usage: sluice [-c FILE] [-t] [--version] [--help]\n"
                 "  -c, --config FILE  configuration file (default: sluice.yaml)\n"
                 "  -t, --test         validate the configuration and exit (0 valid, 1 invalid)\n"
                 "  -v, --version      print the version and exit\n"
                 "  -h, --help         print this help and exit\n"
                 "Signals: SIGTERM/SIGINT drain (drain.grace, then in-flight requests within\n"
                 "drain_timeout) and exit 0; a second one stops at once. SIGHUP reloads the\n"
                 "configuration and certificates.\n");
}

int main(int argc, char **argv)
{
    const char *path = "sluice.yaml";
    bool test_only = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-c") || !strcmp(a, "--config")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "sluice: %s needs a file\n", a);
                return EXIT_USAGE;
            }
            path = argv[++i];
        } else if (!strncmp(a, "--config=", 9)) {
            path = a + 9;
        } else if (!strcmp(a, "-t") || !strcmp(a, "--test")) {
            test_only = true;
        } else if (!strcmp(a, "-v") || !strcmp(a, "--version")) {
            printf("sluice %s\n", SLUICE_VERSION);
            return EXIT_OK;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return EXIT_OK;
        } else {
            fprintf(stderr, "sluice: unknown argument '%s'\n", a);
            usage(stderr);
            return EXIT_USAGE;
        }
    }

    struct sl_config *cfg = NULL;
    struct sl_config_errors errs = {0};
    sl_filters_register_config();
    if (sl_config_load(path, &cfg, &errs) < 0) {
        sl_config_errors_print(&errs, stderr);
        fprintf(stderr, "sluice: %s: %zu error%s, configuration rejected\n", path, errs.count,
                errs.count == 1 ? "" : "s");
        sl_config_errors_dispose(&errs);
        return EXIT_CONFIG;
    }
    sl_config_errors_dispose(&errs);
    if (test_only) {
        /* Filters load keys, TLS contexts certificates and CA files when built: a config that
         * only parses is not OK yet. Building the runtime does all of it and starts nothing. */
        char ferr[512];
        struct sl_gateway *tgw = sl_gateway_new(cfg, ferr, sizeof ferr);
        if (!tgw) {
            fprintf(stderr, "%s\nsluice: %s: configuration rejected\n", ferr, path);
            return EXIT_CONFIG;
        }
        sl_gateway_free(tgw);
        printf("sluice: %s: configuration OK\n", path);
        return EXIT_OK;
    }
    sl_log_set_level((int)cfg->log_level);

    /* Signals are taken synchronously by this thread only; every other thread blocks them. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct sl_process *proc = sl_process_start(path, cfg, SLUICE_VERSION);
    if (!proc)
        return EXIT_CONFIG;
    struct sl_obs *obs = sl_process_obs(proc);
    SL_INFO("sluice %s started (pid %ld, config %s)", SLUICE_VERSION, (long)getpid(), path);

    for (;;) {
        /* Woken at least once a second for the file watches and the reload watch. */
        struct timespec tick = {1, 0};
        int sig = sigtimedwait(&set, NULL, &tick);
        if (sig < 0) {
            sl_process_tick(proc);
            continue;
        }
        if (sig == SIGHUP) {
            SL_INFO("SIGHUP: reloading the configuration and certificates");
            /* A reload re-reads the certificates with everything else; when it is refused,
             * the certificates are still re-read on their own. */
            if (sl_process_reload(proc) < 0)
                sl_gateway_reload_tls(obs->gw, true);
            continue;
        }
        break;
    }
    const char *why = sl_process_drain_reason(proc);
    uint64_t grace_ms = sl_process_grace_ms(proc);
    uint64_t drain_ms = sl_process_drain_timeout_ms(proc);
    sl_process_drain_begin(proc);
    bool stop_now = false;
    if (grace_ms) {
        /* Load balancers see /ready fail and stop sending; until then, everything is served. */
        SL_INFO("draining (%s): /ready answers 503; serving on for the %llums grace period",
                why ? why : "stop signal", (unsigned long long)grace_ms);
        uint64_t until = sl_clock_now_ms() + grace_ms;
        for (uint64_t now = sl_clock_now_ms(); now < until; now = sl_clock_now_ms()) {
            uint64_t left = until - now < 1000 ? until - now : 1000;
            struct timespec ts = {(time_t)(left / 1000), (long)(left % 1000) * 1000000L};
            int sig = sigtimedwait(&set, NULL, &ts);
            if (sig == SIGTERM || sig == SIGINT) {
                SL_WARN("second stop signal: stopping now");
                stop_now = true;
                break;
            }
            if (sig < 0)
                sl_process_tick(proc);
        }
    }
    bool done = false;
    if (!stop_now) {
        SL_INFO("draining (%s): no new connections; finishing in-flight requests within %llums",
                why ? why : "stop signal", (unsigned long long)drain_ms);
        sl_gateway_drain(obs->gw);
        /* A second signal during the drain means "stop now". */
        sigset_t pending;
        uint64_t deadline = sl_clock_now_ms() + drain_ms;
        while (!done) {
            done = sl_gateway_wait(
                obs->gw, sl_clock_now_ms() + 20 < deadline ? sl_clock_now_ms() + 20 : deadline);
            if (done || sl_clock_now_ms() >= deadline)
                break;
            sigpending(&pending);
            if (sigismember(&pending, SIGTERM) || sigismember(&pending, SIGINT)) {
                SL_WARN("second stop signal: stopping now");
                break;
            }
        }
        if (!done)
            SL_WARN("drain timeout reached; closing remaining connections");
    }
    sl_process_stop(proc, done);
    SL_INFO("stopped");
    return EXIT_OK;
}
