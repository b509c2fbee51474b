#!/usr/bin/python3
# Usage: make && /usr/bin/python3 bench/resilience.py [--runs 5] [--bin build/release/sluice]
"""Resilience measurements for docs/resilience.md: how long sluice takes to eject a backend
that dies (SIGKILL), hangs (SIGSTOP) or answers 503, and what clients see meanwhile; and what
a client gets when every backend is down.

Each run starts a fresh sluice (`workers: 2`) and fresh backend processes from the
integration-test harness (tests/integration/resilience_peers.py), with realistic settings:
passive health `consecutive_failures: 5, ejection: 5s`, `timeouts: {connect: 1s, response: 1s}`
and the default retries (2 retries on another endpoint, budget 20% + 10 per 10 s). A paced
keep-alive load (8 clients, 400 requests/s in all) runs for 1 s, then the fault is injected and
the load goes on until 2 s after the ejection is logged (well before the 5 s ejection ends).

  kill     3 backends, one SIGKILLed
  hang     3 backends, one SIGSTOPped (connections still accepted, nothing answered)
  503      3 backends, one starts answering 503
  all-down 3 backends, all SIGKILLed (max_ejection_percent: 100, so that all can be ejected)

Detection time is the timestamp of sluice's `endpoint ...: ejected for 5s` log line minus the
moment of the fault (for all-down: the last of the three ejections). A client-visible error
is a connection error or a 5xx, counted from the fault to the end of the run (all runs
summed); for all-down every request after the fault is one, so the notes give their kind and
latency. Detection times are medians over the runs, with min-max.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

import helpers  # noqa: E402
from resilience_peers import (Load, Peers, ejections, gateway_error, rconfig,  # noqa: E402
                              until, wait_until_wall)

SETTINGS = """
    timeouts: {connect: 1s, response: 1s}
    health:
      passive: {consecutive_failures: 5, ejection: 5s%s}
    """
THREADS, RATE = 8, 400
WARMUP, AFTER = 1.0, 2.0
SLOW = 0.5  # a request slower than this waited for a timeout


def run_one(scenario, gwf, peers):
    bs = peers.backends(3)
    extra = ", max_ejection_percent: 100" if scenario == "all-down" else ""
    gw = gwf.start(rconfig(bs, upstream=SETTINGS % extra))
    victims = bs if scenario == "all-down" else bs[:1]
    try:
        with Load(gw.port, threads=THREADS, rate=RATE, duration=30, timeout=10) as load:
            until(lambda: {b.name for b in bs} <= set(load.snapshot().backends), 5,
                  "all backends answer")
            wait_until_wall(load.started_at + WARMUP)
            t_fault = time.time()
            for v in victims:
                if scenario in ("kill", "all-down"):
                    v.kill()
                elif scenario == "hang":
                    v.pause()
                else:
                    v.set_mode("status", status=503)
            evs = [until(lambda v=v: ejections(gw, v), 15, "%s ejected" % v.name, diag=gw.diag)
                   for v in victims]
            t_eject = max(e[0].time for e in evs)
            wait_until_wall(t_eject + AFTER)
        s = load.summary()
    finally:
        for v in victims:
            v.resume()
        gw.stop()
    after = s.since(t_fault)
    row = {
        "detect": t_eject - t_fault,
        "total": after.total,
        "errors": len(after.failures),
        "slow": len(after.slow(SLOW)),
        "after_eject": len(s.since(t_eject + 0.01).failures),
    }
    if scenario == "all-down":
        fast = s.since(t_eject + 0.01)
        row["lat_max"] = fast.latency_max()
        row["lat_med"] = statistics.median(r.latency for r in fast.results) if fast.total else 0
        row["kinds"] = sorted({gateway_error(r) or str(r.status or r.error)
                               for r in fast.results})
        row["before"] = len(s.between(t_fault, t_eject + 0.01).failures)
    return row


def shown_path(path):
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def fmt_range(xs, unit="s", scale=1.0):
    xs = [x * scale for x in xs]
    return "%.2f%s (%.2f-%.2f)" % (statistics.median(xs), unit, min(xs), max(xs))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bin", default=os.environ.get("SLUICE_BIN")
                    or os.path.join(ROOT, "build", "release", "sluice"))
    ap.add_argument("--only", nargs="*", default=["kill", "hang", "503", "all-down"])
    args = ap.parse_args()
    helpers.SLUICE_BIN = os.path.abspath(args.bin)
    if not os.access(helpers.SLUICE_BIN, os.X_OK):
        sys.exit("no sluice binary at %s (run make first)" % helpers.SLUICE_BIN)
    tmp = tempfile.mkdtemp(prefix="sluice-resilience-")
    gwf = helpers.GatewayFactory(tmp)
    results = {sc: [] for sc in args.only}
    try:
        for i in range(args.runs):
            for sc in args.only:
                peers = Peers(tmp)
                try:
                    row = run_one(sc, gwf, peers)
                finally:
                    peers.finish()
                results[sc].append(row)
                print("run %d %-8s detect %.3fs, %d/%d client-visible errors, %d slow"
                      % (i + 1, sc, row["detect"], row["errors"], row["total"], row["slow"]),
                      file=sys.stderr)
    finally:
        problems = gwf.finish()
        shutil.rmtree(tmp, ignore_errors=True)
    if problems:
        print("\n".join(problems), file=sys.stderr)

    print("sluice %s, %d runs per scenario, %d clients at %d req/s, "
          "consecutive_failures 5, ejection 5s, timeouts.response 1s, default retries\n"
          % (shown_path(helpers.SLUICE_BIN), args.runs, THREADS, RATE))
    print("| scenario | detection time, median (min-max) | client-visible errors / requests "
          "from the fault on | requests that waited > %.1fs | notes |" % SLOW)
    print("|---|---|---|---|---|")
    label = {"kill": "backend killed (SIGKILL)", "hang": "backend hung (SIGSTOP)",
             "503": "backend answers 503", "all-down": "all 3 backends killed"}
    for sc, rows in results.items():
        errors = sum(r["errors"] for r in rows)
        total = sum(r["total"] for r in rows)
        note = ""
        if sc == "all-down":
            note = ("%d errors before the last ejection; after it: %s, latency median %.1f ms, "
                    "max %.1f ms") % (
                sum(r["before"] for r in rows),
                "/".join(sorted({k for r in rows for k in r["kinds"]})),
                statistics.median(r["lat_med"] for r in rows) * 1000,
                max(r["lat_max"] for r in rows) * 1000)
        else:
            note = "%d errors after the ejection" % sum(r["after_eject"] for r in rows)
        print("| %s | %s | %d / %d | %d | %s |" % (
            label[sc], fmt_range([r["detect"] for r in rows]), errors, total,
            sum(r["slow"] for r in rows), note))


if __name__ == "__main__":
    main()
