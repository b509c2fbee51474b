#!/usr/bin/python3
# Usage: make && /usr/bin/python3 bench/resilience_peers.py [--runs 3] [--bin build/release/sluice]
#            [--proxies sluice nginx haproxy haproxy-httpchk] [--scenarios kill hang 503 all-down]
#            [--keep DIR]
"""Resilience side by side: sluice, nginx and HAProxy facing the faults of bench/resilience.py.

Every run starts three fresh backend processes (tests/integration/resilience_peers.py) and a
fresh proxy with one worker (sluice `workers: 1`, nginx `worker_processes 1`, HAProxy
`nbthread 1`) pinned to one core with taskset, while this driver, its load generator and
the backends are pinned to another (as bench/run.sh does). The paced keep-alive GET load of
bench/resilience.py (same client count and rate) runs for 1 s, then the fault is injected and
the load goes on for WINDOW (5 s) more:

  kill     one backend SIGKILLed
  hang     one backend SIGSTOPped (the kernel still accepts connections, nothing is answered)
  503      one backend starts answering 503
  all-down all three SIGKILLed

The configs aim at the same thing: 1 s connect / response timeouts, a backend taken out
after 5 failures for 5 s, idempotent requests retried twice on other backends.
  sluice   the config of bench/resilience.py (rconfig() with its SETTINGS), `workers: 1`
  nginx    bench/conf/resilience-nginx.conf.in
  haproxy  bench/conf/resilience-haproxy.cfg.in
  haproxy-httpchk  bench/conf/resilience-haproxy-httpchk.cfg.in: the same with an HTTP
           active check instead of a TCP one (HAProxy's `observe` does not count what its
           layer-7 retries hide, so only an HTTP check finds a hung or 503 backend)
(the templates say what each setting is for and what differs).

Measured per run, over the requests started in the WINDOW after the fault:
  errors      client-visible errors (a connection error or a 5xx) / requests
  p99, max    their latency; slow: how many waited more than SLOW (0.5 s)
  to faulty   what still reached the faulty backend(s) after the fault: for hang and 503 the
              requests the backend read (a SIGSTOPped one is resumed after the window and
              counts what was queued for it); for kill and all-down, where nothing is left to
              count, the connection attempts (TCP SYNs) to its port seen on the loopback
              interface (HAProxy's health checks are among them, ~1 per second per server)
  detection   the proxy's own log line taking the backend out (sluice "ejected for",
              nginx "upstream server temporarily disabled", HAProxy "Server users/bN is
              DOWN"), time of arrival on its stderr minus the fault; for all-down the last
              of the three. After the load stops, the script waits for it up to DETECT_MAX
              (10 s) after the fault: only active checks can still find it then.
Each cell is the median over the runs with (min-max). Proxies are started in a rotated order
every run. Every process started here is stopped by PID at the end of its run, and the whole
script is bounded by --timeout.
"""

import argparse
import ctypes
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# tests/integration first: its resilience_peers is the harness, this file only shares the name.
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
sys.path.insert(1, HERE)

import helpers  # noqa: E402
import resilience_peers as rp  # noqa: E402

assert os.path.dirname(os.path.abspath(rp.__file__)) != HERE, "wrong resilience_peers imported"
import resilience  # noqa: E402  (bench/resilience.py: the sluice settings, client count, rate)
from bench import tree, wait_port, wait_quiet  # noqa: E402

THREADS, RATE, WARMUP = resilience.THREADS, resilience.RATE, resilience.WARMUP
WINDOW = 5.0  # measured after the fault (the ejection time of every config)
DETECT_MAX = 10.0  # after the load, wait until this long after the fault for the log line
PROXIES = ("sluice", "nginx", "haproxy", "haproxy-httpchk")
SLOW = resilience.SLOW
SCENARIOS = ("kill", "hang", "503", "all-down")
LABEL = {"kill": "backend killed (SIGKILL)", "hang": "backend hung (SIGSTOP)",
         "503": "backend answers 503", "all-down": "all 3 backends killed"}

live = {}  # pid -> description of every proxy process started and not yet stopped


def log(*a):
    print("[resilience-peers %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


class Deadline(Exception):
    pass


# ---------------------------------------------------------------- connection attempts
class SynCounter:
    """Counts TCP SYNs (connection attempts, not their answers) to 127.0.0.1 ports, from an
    AF_PACKET socket on `lo` with a classic BPF filter (IPv4 TCP, SYN without ACK, incoming
    copy only: loopback shows every packet twice). Needs CAP_NET_RAW; without it
    .ok is False and counts are None."""

    SO_ATTACH_FILTER = 26
    PROG = [  # (code, jt, jf, k)
        (0x30, 0, 0, 0xfffff004),  # ldb [pkttype]
        (0x15, 0, 11, 0),          # jeq PACKET_HOST else drop
        (0x28, 0, 0, 12),          # ldh [12]  ethertype
        (0x15, 0, 9, 0x0800),      # jeq IPv4 else drop
        (0x30, 0, 0, 23),          # ldb [23]  IP protocol
        (0x15, 0, 7, 6),           # jeq TCP else drop
        (0x28, 0, 0, 20),          # ldh [20]  fragment offset
        (0x45, 5, 0, 0x1fff),      # jset -> drop (not a first fragment)
        (0xb1, 0, 0, 14),          # ldxb 4*([14]&0xf)  IP header length
        (0x50, 0, 0, 27),          # ldb [x+27]  TCP flags (14 + 13)
        (0x54, 0, 0, 0x12),        # and SYN|ACK
        (0x15, 0, 1, 0x02),        # jeq SYN else drop
        (0x06, 0, 0, 128),         # ret 128 bytes
        (0x06, 0, 0, 0),           # drop
    ]

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.ok = False
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        except (OSError, AttributeError) as e:
            log("no connection-attempt counts (AF_PACKET: %s)" % e)
            return
        insns = b"".join(struct.pack("HBBI", *i) for i in self.PROG)
        self._buf = ctypes.create_string_buffer(insns)
        fprog = struct.pack("HL", len(self.PROG), ctypes.addressof(self._buf))
        s.setsockopt(socket.SOL_SOCKET, self.SO_ATTACH_FILTER, fprog)
        s.bind(("lo", 0x0800))
        s.settimeout(0.2)
        self.sock = s
        self.ok = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.halt.is_set():
            try:
                pkt = self.sock.recv(256)
            except socket.timeout:
                continue
            except OSError:
                return
            t = time.time()
            if len(pkt) < 34:
                continue
            ihl = (pkt[14] & 0xF) * 4
            if pkt[30:34] != b"\x7f\x00\x00\x01" or len(pkt) < 14 + ihl + 4:
                continue
            dport = struct.unpack("!H", pkt[14 + ihl + 2:14 + ihl + 4])[0]
            with self.lock:
                self.events.append((t, dport))

    def count(self, ports, t0, t1):
        if not self.ok:
            return None
        ports = set(ports)
        with self.lock:
            n = sum(1 for t, p in self.events if p in ports and t0 <= t < t1)
            self.events = [e for e in self.events if e[0] >= t1 - 60]
        return n

    def close(self):
        self.halt.set()
        if self.ok:
            self.thread.join(2)
            self.sock.close()


# ---------------------------------------------------------------- proxies
DETECT = {
    "sluice": re.compile(r"upstream users endpoint (\S+?): (?:[^:]*\b)?ejected for"),
    "nginx": re.compile(r'upstream server temporarily disabled.*upstream: "http://([^/"]+)'),
    "haproxy": re.compile(r"Server users/(\S+) is DOWN"),
}
DETECT["haproxy-httpchk"] = DETECT["haproxy"]


def render(template, dest, subs):
    with open(os.path.join(HERE, "conf", template)) as f:
        text = f.read()
    for k, v in subs.items():
        text = text.replace("@%s@" % k, str(v))
    left = re.findall(r"^[^#]*?(@[A-Z0-9_]+@)", text, re.M)
    assert not left, "unfilled %s in %s" % (left, template)
    with open(dest, "w") as f:
        f.write(text)
    return text


class Proxy:
    """One proxy process tree, started under taskset; its stderr+stdout lines are read by a
    thread and kept with their arrival time (wall clock)."""

    def __init__(self, name, backends, scenario, args, workdir):
        self.name = name
        self.workdir = workdir
        self.port = helpers.free_port()
        self.lines = []
        self.proc = None
        self.kids = set()
        os.makedirs(workdir, exist_ok=True)
        addrs = {"B%d" % (i + 1): b.addr for i, b in enumerate(backends)}
        env = None
        if name == "sluice":
            extra = ", max_ejection_percent: 100" if scenario == "all-down" else ""
            text = rp.rconfig(backends, upstream=resilience.SETTINGS % extra, workers=1)
            text = text.replace("$PORT_public", str(self.port))
            conf = os.path.join(workdir, "sluice.yaml")
            with open(conf, "w") as f:
                f.write(text)
            cmd = [args.bin, "-c", conf]
            env = helpers.sluice_env()
        elif name == "nginx":
            conf = os.path.join(workdir, "nginx.conf")
            text = render("resilience-nginx.conf.in", conf,
                          dict(addrs, PORT=self.port, PREFIX=workdir))
            cmd = ["nginx", "-p", workdir, "-e", "stderr", "-c", conf]
        elif name.startswith("haproxy"):
            conf = os.path.join(workdir, "haproxy.cfg")
            text = render("resilience-%s.cfg.in" % name, conf, dict(addrs, PORT=self.port))
            cmd = ["haproxy", "-db", "-f", conf]
        else:
            raise ValueError(name)
        self.config = text
        self.names = {b.addr: b.name for b in backends}  # haproxy logs server names
        self.proc = subprocess.Popen(["taskset", "-c", str(args.proxy_core)] + cmd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, cwd=workdir)
        live[self.proc.pid] = name
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not wait_port(self.port, timeout=10, proc=self.proc):
            out = self.output()
            self.stop()
            raise RuntimeError("%s did not listen on %d:\n%s" % (name, self.port, out[-2000:]))
        end = time.time() + 5  # nginx: the worker must exist too
        while name == "nginx" and len(tree(self.proc.pid)) < 2 and time.time() < end:
            time.sleep(0.02)
        self.kids = set(tree(self.proc.pid)) - {self.proc.pid}
        for k in self.kids:
            live[k] = name

    def _read(self):
        with open(os.path.join(self.workdir, "%s.log" % self.name), "w") as f:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace")
                self.lines.append((time.time(), line))
                f.write(line)

    def output(self):
        return "".join(ln for _, ln in self.lines)

    def detected(self, victims, t0):
        """Arrival time of the first 'taken out' line for each victim after t0 (or None)."""
        rx = DETECT[self.name]
        first = {}
        for t, line in list(self.lines):
            m = rx.search(line)
            if not m or t < t0:
                continue
            who = m.group(1).rstrip(":")
            who = self.names.get(who, who)
            first.setdefault(who, t)
        return [first.get(v.name) for v in victims]

    def stop(self):
        if self.proc is None:
            return
        self.kids |= set(tree(self.proc.pid)) - {self.proc.pid}
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                log("%s pid %d did not stop on SIGTERM; SIGKILL" % (self.name, self.proc.pid))
                self.proc.kill()
                self.proc.wait(timeout=5)
        for k in self.kids:  # e.g. an nginx worker whose master went first
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
            live.pop(k, None)
        live.pop(self.proc.pid, None)
        self.reader.join(5)
        self.proc = None


def kill_live():
    for pid in list(live):
        for p in reversed(tree(pid)):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        live.pop(pid, None)


# ---------------------------------------------------------------- one run
def pct(values, q):
    if not values:
        return 0.0
    v = sorted(values)
    return v[max(0, min(len(v) - 1, int(-(-q * len(v) // 1)) - 1))]


def run_one(proxy, scenario, args, tmp, syn, n):
    peers = rp.Peers(tmp)
    px = None
    victims = []
    try:
        bs = peers.backends(3)
        victims = bs if scenario == "all-down" else bs[:1]
        px = Proxy(proxy, bs, scenario, args, os.path.join(tmp, "%s-%d" % (proxy, n)))
        with rp.Load(px.port, threads=THREADS, rate=RATE, duration=WARMUP + WINDOW + 15,
                     timeout=10) as load:
            rp.until(lambda: {b.name for b in bs} <= set(load.snapshot().backends), 5,
                     "all backends answer through %s" % proxy,
                     diag=lambda: load.snapshot().describe() + "\n" + px.output()[-2000:])
            rp.wait_until_wall(load.started_at + WARMUP)
            before = {v.name: v.count() for v in victims}
            t_fault = time.time()
            for v in victims:
                if scenario in ("kill", "all-down"):
                    v.kill()
                elif scenario == "hang":
                    v.pause()
                else:
                    v.set_mode("status", status=503)
            t_end = t_fault + WINDOW
            rp.wait_until_wall(t_end)
        # in-flight requests have ended (Load.__exit__ joined the clients)
        s = load.summary().between(t_fault, t_end)
        # Without load only active checks can still take the backend out: give them time
        # (a hung backend stays stopped meanwhile).
        while (time.time() < t_fault + DETECT_MAX
               and not all(d is not None for d in px.detected(victims, t_fault))):
            time.sleep(0.05)
        if scenario == "hang":
            for v in victims:
                v.resume()  # it reads what was queued for it while stopped
            time.sleep(0.5)
        reached = None
        if scenario in ("hang", "503"):
            reached = sum(v.count() - before[v.name] for v in victims)
        syns = syn.count([v.port for v in victims], t_fault, t_end)
        det = px.detected(victims, t_fault)
        lat = [r.latency for r in s.results]
        fails = s.failures
        kinds = {}
        for r in fails:
            k = str(r.status) if r.status is not None else r.error
            kinds[k] = kinds.get(k, 0) + 1
        return {
            "total": s.total,
            "errors": len(fails),
            "kinds": kinds,
            "p99": pct(lat, 0.99),
            "max": max(lat, default=0.0),
            "slow": len(s.slow(SLOW)),
            "reached": reached,
            "syns": syns,
            "detect": (max(det) - t_fault) if det and all(d is not None for d in det) else None,
        }
    finally:
        for v in victims:
            try:
                v.resume()
            except Exception:  # noqa: BLE001 - cleanup goes on
                pass
        if px is not None:
            px.stop()
        peers.finish()


# ---------------------------------------------------------------- report
def cell(vals, fmt, scale=1.0):
    vals = [v * scale for v in vals if v is not None]
    if not vals:
        return "–"
    m, lo, hi = statistics.median(vals), min(vals), max(vals)
    if lo == hi:
        return fmt % m
    return (fmt + " (" + fmt + "–" + fmt + ")") % (m, lo, hi)


def report(results, args, info):
    out = []
    out.append("%s; %d run(s) per cell, medians (min–max); %d clients at %d req/s, fault "
               "after %.0f s, measured over the %.0f s after it; proxy on core %d, load + "
               "backends on core %d." % (info["date"], args.runs, THREADS, RATE, WARMUP,
                                         WINDOW, args.proxy_core, args.load_core))
    out.append("Versions: sluice %s, %s, %s." % (info["sluice"], info["nginx"],
                                                info["haproxy"]))
    out.append("")
    out.append("| scenario | proxy | client-visible errors / requests | p99 latency | "
               "max latency | waited > %.1f s | to the faulty backend(s) after the fault | "
               "taken out after | errors seen |" % SLOW)
    out.append("|---|---|---|---|---|---|---|---|---|")
    for sc in args.scenarios:
        for px in args.proxies:
            rows = results.get((sc, px), [])
            if not rows:
                out.append("| %s | %s | failed | | | | | | |" % (LABEL[sc], px))
                continue
            errs = "%s / %s" % (cell([r["errors"] for r in rows], "%d"),
                                cell([r["total"] for r in rows], "%d"))
            if sc in ("hang", "503"):
                to = cell([r["reached"] for r in rows], "%d") + " requests"
            else:
                to = cell([r["syns"] for r in rows], "%d") + " connects"
            dets = [r["detect"] for r in rows]
            det = cell(dets, "%.0f ms", 1000)
            missed = sum(d is None for d in dets)
            if missed == len(rows):
                det = "not within %.0f s" % DETECT_MAX
            elif missed:
                det += " (not within %.0f s in %d of %d runs)" % (DETECT_MAX, missed, len(rows))
            kinds = {}
            for r in rows:
                for k, v in r["kinds"].items():
                    kinds[k] = kinds.get(k, 0) + v
            ks = ", ".join("%s×%d" % (k, v) for k, v in sorted(kinds.items())) or "none"
            out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                LABEL[sc], px, errs, cell([r["p99"] for r in rows], "%.1f ms", 1000),
                cell([r["max"] for r in rows], "%.1f ms", 1000),
                cell([r["slow"] for r in rows], "%d"), to, det, ks))
    out.append("")
    out.append("The last column sums the errors of all runs by kind (status or connection "
               "error). Connects to a killed backend include HAProxy's health checks "
               "(~1/s per server).")
    return "\n".join(out)


def versions(args):
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return "?"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sluice": "%s (HEAD %s)" % (os.path.relpath(args.bin_orig, ROOT)
                                   if not os.path.relpath(args.bin_orig, ROOT).startswith("..")
                                   else args.bin_orig,
                                   sh("cd %s && git rev-parse --short HEAD" % ROOT)),
        "nginx": "nginx " + sh("nginx -v 2>&1 | sed 's/^nginx version: nginx.//'"),
        "haproxy": sh("haproxy -v | head -1 | cut -d' ' -f1-3"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bin", default=os.environ.get("SLUICE_BIN")
                    or os.path.join(ROOT, "build", "release", "sluice"))
    ap.add_argument("--proxies", nargs="*", default=list(PROXIES), choices=PROXIES)
    ap.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=SCENARIOS)
    two = (os.cpu_count() or 1) >= 2
    ap.add_argument("--proxy-core", type=int, default=1 if two else 0)
    ap.add_argument("--load-core", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900,
                    help="the whole script is stopped (and cleaned up) after this many s")
    ap.add_argument("--quiet-wait", type=float, default=20,
                    help="before each run, wait up to this long for an idle machine")
    ap.add_argument("--keep", help="copy configs and proxy logs to this directory")
    args = ap.parse_args()
    os.environ["PATH"] += ":/usr/sbin:/sbin"
    for tool in {"taskset"} | {p.split("-")[0] for p in args.proxies if p != "sluice"}:
        if not shutil.which(tool):
            sys.exit("%s not found (apt-get install %s)" % (
                tool, {"nginx": "nginx-light", "taskset": "util-linux"}.get(tool, tool)))
    args.bin_orig = os.path.abspath(args.bin)
    if "sluice" in args.proxies and not os.access(args.bin_orig, os.X_OK):
        sys.exit("no sluice binary at %s (run make first)" % args.bin_orig)

    def on_alarm(*_):
        raise Deadline("--timeout %.0f s reached" % args.timeout)

    def on_term(sig, _):
        raise SystemExit(128 + sig)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    signal.alarm(int(args.timeout))
    # This thread and everything it starts (load threads, backends) on the load core.
    os.sched_setaffinity(0, {args.load_core})
    tmp = tempfile.mkdtemp(prefix="sluice-resilience-peers-")
    syn = None
    results = {}
    failed = []
    try:
        if "sluice" in args.proxies:  # a private copy: the tree may be rebuilt meanwhile
            args.bin = os.path.join(tmp, "sluice")
            shutil.copy2(args.bin_orig, args.bin)
        info = versions(args)
        syn = SynCounter()
        n = 0
        for run in range(args.runs):
            order = args.proxies[run % len(args.proxies):] + args.proxies[:run % len(args.proxies)]
            for sc in args.scenarios:
                for px in order:
                    n += 1
                    if args.quiet_wait:
                        wait_quiet(args.quiet_wait)
                    try:
                        row = run_one(px, sc, args, tmp, syn, n)
                    except (Deadline, KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e:  # noqa: BLE001 - one failed run, go on
                        log("run %d %s %s failed: %s" % (run + 1, sc, px, e))
                        failed.append((run + 1, sc, px, str(e)))
                        continue
                    results.setdefault((sc, px), []).append(row)
                    log("run %d %-8s %-7s %4d/%-4d errors, p99 %6.1f ms, max %6.1f ms, "
                        "faulty: %s req / %s connects, taken out after %s" % (
                            run + 1, sc, px, row["errors"], row["total"], row["p99"] * 1000,
                            row["max"] * 1000, row["reached"], row["syns"],
                            "%.0f ms" % (row["detect"] * 1000) if row["detect"] is not None
                            else "–"))
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            for d in os.listdir(tmp):
                src = os.path.join(tmp, d)
                if os.path.isdir(src):
                    shutil.copytree(src, os.path.join(args.keep, d), dirs_exist_ok=True)
        print(report(results, args, info))
        for f in failed:
            print("\nrun %d %s %s failed: %s" % f, file=sys.stderr)
    finally:
        signal.alarm(0)
        kill_live()
        if syn is not None:
            syn.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Deadline as e:
        sys.exit("resilience_peers: stopped: %s (every process it started was ended)" % e)
