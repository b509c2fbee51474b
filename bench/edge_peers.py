#!/usr/bin/python3
# Usage: make && /usr/bin/python3 bench/edge_peers.py [--runs 3] [--quick]
#            [--only sluice,nginx,haproxy] [--parts https,handshake,l4,idle] [--sluice PATH]
"""Edge tier side by side: sluice, nginx and HAProxy terminating TLS and forwarding TCP.

One run measures every proxy with one worker (sluice `workers: 1`, nginx `worker_processes 1`,
HAProxy `nbthread 1`) pinned to the proxy core with taskset, while this driver, the load
generators and the backends run on the load core (as bench/run.sh does). Parts:

  https      HTTPS termination, keep-alive: `wrk -t1 -cC` over TLS 1.3 (ECDSA P-256
             certificate) to the proxy, which forwards over keep-alive HTTP/1.1 to
             bench/backend.c. req/s, and CPU-µs per request = proxy CPU time / requests.
  handshake  New connections: bench/tls_handshake_bench.c keeps CONC connections busy, each
             looping connect -> TLS 1.3 handshake -> GET -> read the response -> close.
             `full`: no session offered. `resumed`: each connection offers the session
             (ticket) its slot got on the previous connection. Both with the ECDSA P-256 and
             the RSA-2048 certificate. Handshakes/s and CPU-µs per handshake (each includes
             its one proxied request, the TCP accept and the close).
  l4         TCP forwarding: bench/l4_stream.c sends UP bytes and receives DOWN bytes (both
             directions at once) over a few connections through the proxy to a sink/source
             backend. Throughput (both directions together) and proxy CPU-seconds per GB
             (10^9 bytes, both directions counted) moved. sluice `protocol: tcp`, HAProxy
             `mode tcp` and nginx `stream` with their defaults (16 KiB buffers, copying),
             then labelled variants of the peers: HAProxy with `option splice-request` and
             `option splice-response` forced ("haproxy-splice"), HAProxy with
             `tune.bufsize 262144` ("haproxy-buf256k"), nginx with `proxy_buffer_size 256k`
             ("nginx-buf256k").
  idle       RSS per idle TLS connection: N TLS connections (ECDSA), each completing the
             handshake and one keep-alive request, then held idle; (RSS with them - RSS
             before) / N, RSS = VmRSS summed over the proxy's processes (/proc/PID/status).

Configs: bench/conf/edge-<proxy>-https.* and edge-<proxy>-tcp.* (the templates say what each
setting is for). A self-signed ECDSA P-256 and an RSA-2048 certificate are generated with
openssl into the results directory at start. Each part gets a fresh proxy process (https and
handshake share one); every proxy process is stopped by PID at the end of its part and the
whole script is bounded by --timeout. A sluice part whose config `sluice -t` refuses or whose
process does not start is reported as skipped with the reason, the peers go on.

Every metric is the median over --runs runs (proxy order rotated every run) with min–max.
CPU time is utime + stime of all the proxy's processes (/proc/PID/stat) over the measured
window; this kernel charges the loopback TCP work done in the proxy's context to the proxy's
stime. Raw results: bench/results/<stamp>-edge/ (raw.json, summary.md, rendered configs,
proxy logs, wrk outputs).
"""
import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench  # noqa: E402  (helpers: /proc accounting, processes, wrk parsing)
from bench import (CLK_TCK, children, cpu_stat, cpu_stat_delta, cpu_ticks, fmt,  # noqa: E402
                   free_port, http_get, kill_all, med, parse_wrk, rng, rss_kib, rss_sum,
                   stop, tree, wait_port, wait_quiet)

PROXIES = ("sluice", "nginx", "haproxy")
PARTS = ("https", "handshake", "l4", "idle")
# L4 rows: each proxy with its defaults, then the peers' variants that change how bytes move:
# HAProxy with splicing forced, and both peers with 256 KiB instead of 16 KiB buffers.
L4_VARIANTS = {"sluice": ["sluice"], "nginx": ["nginx", "nginx-buf256k"],
               "haproxy": ["haproxy", "haproxy-splice", "haproxy-buf256k"]}
L4_LABEL = {"haproxy-splice": "haproxy (splice-request/-response forced)",
            "haproxy-buf256k": "haproxy (tune.bufsize 256k)",
            "nginx-buf256k": "nginx (proxy_buffer_size 256k)"}
L4_TUNED = ("haproxy-splice", "haproxy-buf256k", "nginx-buf256k")
HS_CASES = [("ec", "full"), ("ec", "resume"), ("rsa", "full"), ("rsa", "resume")]
CERT_LABEL = {"ec": "ECDSA P-256", "rsa": "RSA-2048"}
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
HELPERS = {"backend": ("backend.c", []),
           "tls_handshake_bench": ("tls_handshake_bench.c", ["-lssl", "-lcrypto"]),
           "l4_stream": ("l4_stream.c", [])}


def log(*a):
    print("[edge-peers %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


class Deadline(Exception):
    pass


# ---------------------------------------------------------------- setup
def build_helpers(bindir):
    """cc -O2 each C helper into bindir when missing or older than its source."""
    os.makedirs(bindir, exist_ok=True)
    paths = {}
    for name, (src, libs) in HELPERS.items():
        out, s = os.path.join(bindir, name), os.path.join(HERE, src)
        if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(s):
            subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-o", out, s] + libs, check=True)
        paths[name] = out
    return paths


def make_certs(d):
    """Self-signed ECDSA P-256 and RSA-2048 certificates for CN=localhost; HAProxy wants the
    certificate and key in one PEM file."""
    os.makedirs(d, exist_ok=True)
    subs = {}
    for kind, newkey in (("ec", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
                         ("rsa", ["-newkey", "rsa:2048"])):
        cert, key = os.path.join(d, kind + "-cert.pem"), os.path.join(d, kind + "-key.pem")
        subprocess.run(["openssl", "req", "-x509", "-nodes", "-days", "30", "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"] + newkey +
                       ["-keyout", key, "-out", cert], check=True, capture_output=True)
        pem = os.path.join(d, kind + ".pem")
        with open(pem, "w") as f:
            f.write(open(cert).read() + open(key).read())
        K = kind.upper()
        subs.update({K + "_CERT": cert, K + "_KEY": key, K + "_PEM": pem})
    return subs


# ---------------------------------------------------------------- proxies
class Proxy:
    """One proxy process tree on a rendered template, under taskset on the proxy core."""
    EXT = {"sluice": "yaml", "nginx": "conf", "haproxy": "cfg"}

    def __init__(self, variant, part, binary, subs, workdir, core):
        self.variant, self.part = variant, part  # part: "https" or "tcp"
        self.kind = variant.split("-")[0]
        self.binary, self.subs, self.workdir, self.core = binary, subs, workdir, core
        self.proc = None
        self.ports = {}

    def template(self):
        return "edge-%s-%s.%s.in" % (self.variant, self.part, self.EXT[self.kind])

    def render(self):
        self.ports = ({"PORT_EC": free_port(), "PORT_RSA": free_port()} if self.part == "https"
                      else {"PORT_TCP": free_port()})
        with open(os.path.join(HERE, "conf", self.template())) as f:
            text = f.read()
        subs = dict(self.subs, PREFIX=self.workdir, STREAM_MODULE=STREAM_MODULE, **self.ports)
        for k, v in subs.items():
            text = text.replace("@%s@" % k, str(v))
        left = re.findall(r"@[A-Z_]+@", re.sub(r"(?m)^\s*#.*$", "", text))
        if left:
            raise RuntimeError("%s: unfilled %s" % (self.template(), ", ".join(sorted(set(left)))))
        os.makedirs(self.workdir, exist_ok=True)
        conf = os.path.join(self.workdir, "%s-%s.%s" % (self.variant, self.part,
                                                          self.EXT[self.kind]))
        with open(conf, "w") as f:
            f.write(text)
        return conf

    def command(self, conf, test=False):
        if self.kind == "sluice":
            return [self.binary] + (["-t"] if test else []) + ["-c", conf]
        if self.kind == "haproxy":
            return [self.binary, "-c" if test else "-db", "-f", conf]
        return ([self.binary] + (["-t"] if test else []) +
                ["-p", self.workdir, "-e", os.path.join(self.workdir, "nginx-error.log"),
                 "-c", conf])

    def check(self):
        """sluice -t / haproxy -c / nginx -t: (ok, output)."""
        conf = self.render()
        p = subprocess.run(self.command(conf, test=True), capture_output=True, text=True,
                           timeout=30)
        return p.returncode == 0, (p.stdout + p.stderr).strip()

    def start(self):
        conf = self.render()
        self.logfile = os.path.join(self.workdir, "%s-%s.log" % (self.variant, self.part))
        logf = open(self.logfile, "ab")
        self.proc = subprocess.Popen(["taskset", "-c", str(self.core)] + self.command(conf),
                                     stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.STDOUT, cwd=self.workdir)
        logf.close()
        children[self.proc.pid] = self.variant
        for port in self.ports.values():
            if not wait_port(port, timeout=10, proc=self.proc):
                out = self.output()
                self.stop()
                raise RuntimeError("%s did not listen on %d: %s" % (self.variant, port,
                                                                    out.strip()[-600:]))
        end = time.time() + 5  # nginx: the worker must exist before anything is measured
        while self.kind == "nginx" and len(self.pids()) < 2 and time.time() < end:
            time.sleep(0.05)
        for p in self.pids():
            children.setdefault(p, self.variant)
        return self

    def output(self):
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def pids(self):
        return tree(self.proc.pid) if self.proc else []

    def stop(self):
        if self.proc is not None:
            stop(self.proc, self.variant)
            for p in list(children):
                if children[p] == self.variant:
                    children.pop(p, None)
            self.proc = None


# ---------------------------------------------------------------- measuring
class Window:
    """Proxy CPU time and the proxy core's load over one measured window."""

    def __init__(self, px, args):
        self.px, self.args = px, args

    def __enter__(self):
        self.pids = self.px.pids()
        self.s0 = cpu_stat()
        self.c0, self.t0 = cpu_ticks(self.pids), time.monotonic()
        return self

    def __exit__(self, *exc):
        self.c1, self.t1 = cpu_ticks(self.px.pids() or self.pids), time.monotonic()
        self.s1 = cpu_stat()
        return False

    def result(self):
        cpu_s = (self.c1 - self.c0) / CLK_TCK
        wall = self.t1 - self.t0
        r = {"cpu_s": cpu_s, "wall_s": wall, "cpu_pct": 100.0 * cpu_s / wall}
        pc = cpu_stat_delta(self.s0, self.s1, self.args.proxy_core)
        if pc:
            busy = pc["busy_pct"] + pc["irq_pct"]
            r["proxy_core_busy_pct"] = busy
            # Work on the proxy core that was not the proxy's: other jobs on this machine.
            r["foreign_pct"] = max(0.0, busy - r["cpu_pct"])
        lc = cpu_stat_delta(self.s0, self.s1, self.args.load_core)
        if lc:
            r["load_core_busy_pct"] = lc["busy_pct"] + lc["irq_pct"]
        return r


def quiet(args):
    if not args.quiet_wait:
        return {}
    if subprocess.run(["pgrep", "-f", "pytest"], capture_output=True).returncode == 0:
        log("note: a pytest run is active on this machine")
    waited, busy = wait_quiet(args.quiet_wait)
    return {"quiet_wait_s": round(waited, 1), "busy_before_pct": round(busy, 1)}


def run_cmd(cmd, timeout, tag=None, outdir=None):
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    children[p.pid] = "load"
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        out += "\n(timed out after %.0f s)\n" % timeout
    children.pop(p.pid, None)
    if tag and outdir:
        with open(os.path.join(outdir, tag + ".txt"), "w") as f:
            f.write(" ".join(cmd) + "\n" + out)
    return out


def measure_https(px, args, outdir, tag):
    port = px.ports["PORT_EC"]
    url = "https://127.0.0.1:%d/" % port
    wrk = ["taskset", "-c", str(args.load_core), "wrk", "-t1", "-c%d" % args.conns]
    r = quiet(args)
    if args.warmup:
        run_cmd(wrk + ["-d%ds" % args.warmup, url], args.warmup + 30)
    with Window(px, args) as w:
        out = run_cmd(wrk + ["-d%ds" % args.duration, "--latency", url], args.duration + 30,
                      "wrk-" + tag, outdir)
    r.update(w.result())
    r.update(parse_wrk(out))
    if r.get("requests"):
        r["cpu_us_per_req"] = r["cpu_s"] * 1e6 / r["requests"]
    problems = []
    if not r.get("requests"):
        problems.append("no request count in wrk output")
    if r.get("non2xx"):
        problems.append("%d non-2xx" % r["non2xx"])
    if r.get("socket_errors"):
        problems.append("%d socket errors" % r["socket_errors"])
    if not px.alive():
        problems.append("proxy exited")
    r["invalid"] = "; ".join(problems) or None
    return r


def parse_result(out, keys):
    m = re.search(r"^RESULT (.*)$", out, re.M)
    if not m:
        return None
    f = m.group(1).split()
    d = dict(zip(f[::2], f[1::2]))
    return {k: float(d[k]) for k in keys if k in d}


def measure_handshakes(px, cert, mode, args, bins, outdir, tag):
    port = px.ports["PORT_EC" if cert == "ec" else "PORT_RSA"]
    cmd = ["taskset", "-c", str(args.load_core), bins["tls_handshake_bench"], "loop",
           "127.0.0.1", str(port), str(args.hs_conc)]
    r = quiet(args)
    if args.hs_warmup:
        run_cmd(cmd + [str(args.hs_warmup), mode], args.hs_warmup + 30)
    with Window(px, args) as w:
        out = run_cmd(cmd + [str(args.hs_duration), mode], args.hs_duration + 30,
                      "hs-" + tag, outdir)
    r.update(w.result())
    res = parse_result(out, ("conns", "resumed", "errors", "seconds"))
    problems = []
    if res is None:
        problems.append("no RESULT from tls_handshake_bench: %s" % out.strip()[-300:])
    else:
        r.update(res)
        if res["conns"]:
            r["hs_per_s"] = res["conns"] / res["seconds"]
            r["cpu_us_per_hs"] = r["cpu_s"] * 1e6 / res["conns"]
            r["resumed_pct"] = 100.0 * res["resumed"] / res["conns"]
        else:
            problems.append("no handshake completed")
        if res["errors"]:
            problems.append("%d failed connections" % res["errors"])
        if mode == "resume" and res["conns"] and r["resumed_pct"] < 90:
            problems.append("only %.0f%% resumed" % r["resumed_pct"])
    if not px.alive():
        problems.append("proxy exited")
    r["invalid"] = "; ".join(problems) or None
    return r


def pipes_of(pids):
    n = 0
    for p in pids:
        try:
            for fd in os.listdir("/proc/%d/fd" % p):
                try:
                    if os.readlink("/proc/%d/fd/%s" % (p, fd)).startswith("pipe:"):
                        n += 1
                except OSError:
                    pass
        except OSError:
            pass
    return n


def measure_l4(px, args, bins, outdir, tag, sink_port):
    port = px.ports["PORT_TCP"]
    cmd = ["taskset", "-c", str(args.load_core), bins["l4_stream"], "client", "127.0.0.1",
           str(port), str(args.l4_conns)]
    # Warm-up, and the check that bytes really flow both ways through this listener.
    warm = 64 << 20
    res = parse_result(run_cmd(cmd + [str(warm), str(warm), "20"], 40),
                       ("up", "down", "errors"))
    if not res or res["errors"] or res["up"] != warm or res["down"] != warm:
        raise RuntimeError("no TCP forwarding through %s (64 MiB each way: %s)%s"
                           % (px.variant, res, plain_http_note(port)))
    r = quiet(args)
    idle_pipes = pipes_of(px.pids())
    seen = []
    halt = threading.Event()

    def sample():  # pipes the proxy holds mid-transfer: a sign that it splices
        while not halt.wait(0.2):
            seen.append(pipes_of(px.pids()))
    t = threading.Thread(target=sample, daemon=True)
    with Window(px, args) as w:
        t.start()
        down = 0 if args.l4_oneway else args.l4_bytes
        out = run_cmd(cmd + [str(args.l4_bytes), str(down), str(args.l4_timeout)],
                      args.l4_timeout + 30, "l4-" + tag, outdir)
        halt.set()
        t.join()
    r.update(w.result())
    res = parse_result(out, ("up", "down", "seconds", "errors"))
    problems = []
    if res is None:
        problems.append("no RESULT from l4_stream: %s" % out.strip()[-300:])
    else:
        r.update(res)
        moved = res["up"] + res["down"]
        r["bytes"] = moved
        if moved:
            r["mb_per_s"] = moved / 1e6 / res["seconds"]
            r["cpu_s_per_gb"] = r["cpu_s"] / (moved / 1e9)
        if res["errors"] or res["up"] < args.l4_bytes * 0.99 or res["down"] < down * 0.99:
            problems.append("incomplete transfer (%d errors, up %d, down %d)"
                            % (res["errors"], res["up"], res["down"]))
    r["pipes_idle"], r["pipes_max"] = idle_pipes, max(seen, default=0)
    if not px.alive():
        problems.append("proxy exited")
    r["invalid"] = "; ".join(problems) or None
    return r


def measure_idle(px, args, bins, settle=2.0):
    """The bench.py memory phase with TLS connections (tls_handshake_bench idle speaks the
    protocol of bench/idleconns.c)."""
    import select
    r = quiet(args)
    r["n"] = args.idle_conns
    p = subprocess.Popen(["taskset", "-c", str(args.load_core), bins["tls_handshake_bench"],
                          "idle", "127.0.0.1", str(px.ports["PORT_EC"]), str(args.idle_conns),
                          "64", "90"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, bufsize=1)
    children[p.pid] = "tls-idle"
    deadline = time.time() + 120

    def expect(prefix):
        while time.time() < deadline:
            rl, _, _ = select.select([p.stdout], [], [], 1.0)
            if rl:
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError("tls_handshake_bench idle exited: %s" % p.stderr.read())
                if line.startswith(prefix):
                    return line.split()
        raise RuntimeError("tls_handshake_bench idle: timed out waiting for %s" % prefix)

    try:
        expect("WARM")
        time.sleep(0.5)
        r["rss_before_kib"] = rss_sum(px.pids())
        p.stdin.write("go\n")
        ready = expect("READY")
        r["established"], r["setup_ms"] = int(ready[1]), float(ready[2])
        time.sleep(settle)
        r["rss_with_kib"] = rss_sum(px.pids())
        r["rss_with_per_proc_kib"] = {str(x): rss_kib(x) for x in px.pids()}
        p.stdin.write("check\n")
        r["alive"] = int(expect("ALIVE")[1])
        p.stdin.write("bye\n")
        p.stdin.close()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        children.pop(p.pid, None)
    problems = []
    if r.get("established"):
        r["kib_per_conn"] = (r["rss_with_kib"] - r["rss_before_kib"]) / r["established"]
    if r.get("established", 0) < args.idle_conns:
        problems.append("%s/%d established" % (r.get("established"), args.idle_conns))
    if r.get("alive", 0) < r.get("established", 0):
        problems.append("proxy closed %d" % (r["established"] - r["alive"]))
    if not px.alive():
        problems.append("proxy exited")
    r["invalid"] = "; ".join(problems) or None
    return r


def tls_check(port):
    """What openssl s_client negotiates by default (offering ALPN http/1.1) and whether TLS 1.2
    is accepted."""
    def sc(extra):
        try:
            p = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % port,
                                "-servername", "localhost", "-alpn", "http/1.1"] + extra,
                               input="", capture_output=True, text=True, timeout=10)
            return p.stdout + p.stderr
        except subprocess.TimeoutExpired:
            return ""
    out = sc([])
    d = {}
    m = re.search(r"^New, (\S+), Cipher is (\S+)", out, re.M)
    d["protocol"], d["cipher"] = (m.group(1), m.group(2)) if m else (None, None)
    m = re.search(r"Server Temp Key: ([^\n]+)", out)
    d["group"] = m.group(1).strip() if m else None
    m = re.search(r"ALPN protocol: (\S+)", out)
    d["alpn"] = m.group(1) if m else "none"
    m = re.search(r"^New, (\S+), Cipher is", sc(["-tls1_2"]), re.M)
    d["tls1_2"] = m.group(1) if m else "refused"
    return d


# ---------------------------------------------------------------- one proxy, one run
def run_proxy(kind, run, args, bins, subs, out, res):
    """All selected parts for one proxy (and its L4 variants) in one run."""
    work = os.path.join(out, "work")
    binary = args.binaries[kind]

    def record(part, key, r):
        r.update(run=run, proxy=key[0], case=key[1])
        res["samples"].append(dict(r, part=part))
        log("run %d %-14s %-10s %-12s %s%s" % (run, key[0], part, key[1], describe(part, r),
                                                "  INVALID: " + r["invalid"]
                                                if r.get("invalid") else ""))

    def skip(part, variant, why):
        res["skipped"].setdefault("%s/%s" % (variant, part), why)
        log("run %d %s %s skipped: %s" % (run, variant, part, why))

    https_parts = [p for p in ("https", "handshake") if p in args.parts]
    if https_parts and ("https", kind) not in args.refused:
        px = Proxy(kind, "https", binary, subs, os.path.join(work, "%s-https-r%d" % (kind, run)),
                   args.proxy_core)
        try:
            px.start()
            require_tls(px)
            if kind not in res["tls"]:
                res["tls"][kind] = {c: tls_check(px.ports["PORT_" + c.upper()])
                                    for c in ("ec", "rsa")}
                log("%s TLS: %s" % (kind, res["tls"][kind]))
            if "https" in args.parts:
                record("https", (kind, "keep-alive"),
                       measure_https(px, args, out, "%s-r%d" % (kind, run)))
            if "handshake" in args.parts:
                for cert, mode in HS_CASES:
                    if cert not in args.certs:
                        continue
                    record("handshake", (kind, "%s-%s" % (cert, mode)),
                           measure_handshakes(px, cert, mode, args, bins, out,
                                              "%s-%s-%s-r%d" % (kind, cert, mode, run)))
        except (Deadline, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - one failed part, go on
            for p in https_parts:
                skip(p, kind, str(e))
        finally:
            px.stop()
    if "idle" in args.parts and ("https", kind) not in args.refused:
        px = Proxy(kind, "https", binary, subs, os.path.join(work, "%s-idle-r%d" % (kind, run)),
                   args.proxy_core)
        try:
            px.start()
            require_tls(px)
            record("idle", (kind, "idle"), measure_idle(px, args, bins))
        except (Deadline, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001
            skip("idle", kind, str(e))
        finally:
            px.stop()
    if "l4" in args.parts:
        for variant in L4_VARIANTS[kind]:
            if ("tcp", variant) in args.refused:
                continue
            px = Proxy(variant, "tcp", binary, subs,
                       os.path.join(work, "%s-tcp-r%d" % (variant, run)), args.proxy_core)
            try:
                px.start()
                record("l4", (variant, "tcp"),
                       measure_l4(px, args, bins, out, "%s-r%d" % (variant, run),
                                  subs["SINK_PORT"]))
            except (Deadline, KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001
                skip("l4", variant, str(e))
            finally:
                px.stop()


def plain_http_note(port):
    st = http_get(port, timeout=2)
    return ("; the listener answers plain HTTP (%s): its TLS / tcp settings are not in effect"
            % st) if st else ""


def require_tls(px):
    """Raises unless both TLS listeners answer a GET over TLS with 200."""
    for name in ("PORT_EC", "PORT_RSA"):
        port = px.ports[name]
        if http_get_tls(port) != 200:
            raise RuntimeError("no 200 to a GET over TLS through %s on :%d%s"
                               % (px.variant, port, plain_http_note(port)))


def http_get_tls(port):
    """One GET over TLS (Python's ssl, no verification); the status or None."""
    import socket
    import ssl
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname, c.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            with c.wrap_socket(s, server_hostname="localhost") as t:
                t.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                data = b""
                while True:
                    b = t.recv(4096)
                    if not b:
                        break
                    data += b
    except (OSError, ssl.SSLError):
        return None
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(m.group(1)) if m else None


def describe(part, r):
    if part == "https":
        return "%s req/s, %s CPU-us/req, CPU %s%%" % (fmt(r.get("rps"), ",.0f"),
                                                   fmt(r.get("cpu_us_per_req"), ".2f"),
                                                   fmt(r.get("cpu_pct"), ".0f"))
    if part == "handshake":
        return "%s hs/s, %s CPU-us/hs, %s%% resumed, CPU %s%%" % (
            fmt(r.get("hs_per_s"), ",.0f"), fmt(r.get("cpu_us_per_hs"), ".1f"),
            fmt(r.get("resumed_pct"), ".0f"), fmt(r.get("cpu_pct"), ".0f"))
    if part == "l4":
        return "%s MB/s, %s CPU-s/GB, CPU %s%%, pipes %s" % (
            fmt(r.get("mb_per_s"), ",.0f"), fmt(r.get("cpu_s_per_gb"), ".3f"),
            fmt(r.get("cpu_pct"), ".0f"), r.get("pipes_max"))
    return "%s KiB/conn (%s -> %s KiB), alive %s/%s" % (
        fmt(r.get("kib_per_conn"), ".2f"), r.get("rss_before_kib"), r.get("rss_with_kib"),
        r.get("alive"), r.get("established"))


# ---------------------------------------------------------------- report
def cell(vals, spec, scale=1.0):
    vals = [v * scale for v in vals if v is not None]
    if not vals:
        return "–"
    m, (lo, hi) = med(vals), rng(vals)
    if format(lo, spec) == format(hi, spec):
        return format(m, spec)
    return "%s (%s–%s)" % (format(m, spec), format(lo, spec), format(hi, spec))


def summarize(res, args):
    mi = res["machine"]
    lines = ["Run: %s; %d run(s), medians (min–max) over the valid runs; proxy (one worker) on "
             "core %d, load + backends + driver on core %d." % (mi["date"], args.runs,
                                                              args.proxy_core, args.load_core),
             "Machine: %s, %s CPUs (%s), %s, %s. sluice HEAD %s (binary %s); %s; %s; %s." % (
                 mi["cpu_model"], mi["cpus"], mi["hypervisor"] or "bare metal", mi["kernel"],
                 mi["os"], mi["sluice"], mi.get("sluice_binary", "?"),
                 (mi.get("haproxy") or "haproxy ?").split(" - ")[0], mi.get("nginx", "?"),
                 mi.get("openssl", "?")),
             ""]

    def rows(part, proxy, case):
        return [s for s in res["samples"]
                if s["part"] == part and s["proxy"] == proxy and s["case"] == case]

    def valid(rs):
        return [s for s in rs if not s.get("invalid")]

    def notes(part, proxy, rs):
        n = []
        bad = sorted({s["invalid"] for s in rs if s.get("invalid")})
        if bad:
            n.append("invalid: " + "; ".join(bad))
        why = res["skipped"].get("%s/%s" % (proxy, part))
        if why:
            n.append("skipped: " + why.splitlines()[0][:200])
        return "; ".join(n)

    order = [p for p in PROXIES if p in args.only]

    def ratio(what, part, case, key, variants=None):
        """'sluice / better peer' for one metric (lower is better), from the medians."""
        meds = {}
        for v in variants or order:
            m = med([s.get(key) for s in valid(rows(part, v, case))])
            if m is not None:
                meds[v] = m
        peers = {v: m for v, m in meds.items() if v != "sluice"}
        if "sluice" not in meds or not peers:
            return []
        best = min(peers, key=peers.get)
        return ["%s: sluice %.3g / %s %.3g = **%.2f×**" % (what, meds["sluice"], best,
                                                            peers[best],
                                                            meds["sluice"] / peers[best])]

    if "https" in args.parts:
        lines += ["### HTTPS termination, keep-alive (TLS 1.3, ECDSA P-256; `wrk -t1 -c%d -d%ds`)"
                  % (args.conns, args.duration), "",
                  "| proxy | req/s | CPU-µs/req | p99 ms | proxy CPU % | foreign load on proxy "
                  "core % | valid runs | notes |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for p in order:
            rs = rows("https", p, "keep-alive")
            ok = valid(rs)
            lines.append("| %s | %s | %s | %s | %s | %s | %d/%d | %s |" % (
                p, cell([s.get("rps") for s in ok], ",.0f"),
                cell([s.get("cpu_us_per_req") for s in ok], ".2f"),
                cell([s.get("p99_ms") for s in ok], ".2f"),
                cell([s.get("cpu_pct") for s in ok], ".0f"),
                cell([s.get("foreign_pct") for s in ok], ".0f"), len(ok), len(rs),
                notes("https", p, rs)))
        lines += [""] + ["- " + x for x in ratio("CPU-µs/req, sluice ÷ better peer", "https",
                                                 "keep-alive", "cpu_us_per_req")]
        lines.append("")
    if "handshake" in args.parts:
        lines += ["### New TLS 1.3 connections (handshake + one GET + close; %d at a time, %d s)"
                  % (args.hs_conc, args.hs_duration), "",
                  "| proxy | certificate | handshake | handshakes/s | CPU-µs/handshake | resumed % "
                  "| proxy CPU % | foreign % | valid runs | notes |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for cert, mode in HS_CASES:
            if cert not in args.certs:
                continue
            for p in order:
                rs = rows("handshake", p, "%s-%s" % (cert, mode))
                ok = valid(rs)
                lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %d/%d | %s |" % (
                    p, CERT_LABEL[cert], "full" if mode == "full" else "resumed (ticket)",
                    cell([s.get("hs_per_s") for s in ok], ",.0f"),
                    cell([s.get("cpu_us_per_hs") for s in ok], ".1f"),
                    cell([s.get("resumed_pct") for s in ok], ".0f"),
                    cell([s.get("cpu_pct") for s in ok], ".0f"),
                    cell([s.get("foreign_pct") for s in ok], ".0f"), len(ok), len(rs),
                    notes("handshake", p, rs)))
        rs = []
        for cert, mode in HS_CASES:
            if cert in args.certs:
                rs += ratio("CPU-µs/handshake %s %s, sluice ÷ better peer" % (CERT_LABEL[cert],
                                                                               mode),
                            "handshake", "%s-%s" % (cert, mode), "cpu_us_per_hs")
        lines += [""] + ["- " + x for x in rs]
        lines.append("")
    if "l4" in args.parts:
        lines += [("### L4 forwarding (%d connections, %.2f GiB client to backend only)"
                   if getattr(args, "l4_oneway", False) else
                   "### L4 forwarding (%d connections, %.2f GiB each direction at once)")
                  % (args.l4_conns, args.l4_bytes / 2**30), "",
                  "| proxy | MB/s (both directions) | CPU-s per GB moved | proxy CPU % | "
                  "pipes held idle → mid-transfer | foreign % | valid runs | notes |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for p in order:
            for v in L4_VARIANTS[p]:
                rs = rows("l4", v, "tcp")
                ok = valid(rs)
                label = L4_LABEL.get(v, v)
                lines.append("| %s | %s | %s | %s | %s | %s | %d/%d | %s |" % (
                    label, cell([s.get("mb_per_s") for s in ok], ",.0f"),
                    cell([s.get("cpu_s_per_gb") for s in ok], ".3f"),
                    cell([s.get("cpu_pct") for s in ok], ".0f"),
                    "%s → %s" % (cell([s.get("pipes_idle") for s in ok], ".0f"),
                                     cell([s.get("pipes_max") for s in ok], ".0f")),
                    cell([s.get("foreign_pct") for s in ok], ".0f"), len(ok), len(rs),
                    notes("l4", v, rs)))
        defaults = [v for p in order for v in L4_VARIANTS[p] if v not in L4_TUNED]
        lines += [""] + ["- " + x for x in
                         ratio("CPU-s/GB, sluice ÷ better peer with its defaults", "l4", "tcp",
                               "cpu_s_per_gb", defaults) +
                         ratio("CPU-s/GB, sluice ÷ best tuned peer variant", "l4", "tcp",
                               "cpu_s_per_gb", ["sluice"] + list(L4_TUNED))]
        lines.append("")
    if "idle" in args.parts:
        lines += ["### Memory per idle TLS connection (%d connections, handshake + one request "
                  "each, then idle)" % args.idle_conns, "",
                  "| proxy | processes | RSS before MiB | RSS with them MiB | KiB per idle TLS "
                  "conn | alive after hold | valid runs | notes |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for p in order:
            rs = rows("idle", p, "idle")
            ok = valid(rs)
            lines.append("| %s | %s | %s | %s | %s | %s | %d/%d | %s |" % (
                p, cell([len(s.get("rss_with_per_proc_kib") or {}) or None for s in ok], ".0f"),
                cell([s.get("rss_before_kib") for s in ok], ".1f", 1 / 1024),
                cell([s.get("rss_with_kib") for s in ok], ".1f", 1 / 1024),
                cell([s.get("kib_per_conn") for s in ok], ".2f"),
                cell([s.get("alive") for s in ok], ".0f"), len(ok), len(rs),
                notes("idle", p, rs)))
        lines += [""] + ["- " + x for x in ratio("KiB per idle TLS connection, sluice ÷ better "
                                                 "peer", "idle", "idle", "kib_per_conn")]
        lines.append("")
    if res["tls"]:
        lines += ["What `openssl s_client -alpn http/1.1` negotiates by default (and whether "
                  "`-tls1_2` is accepted):", ""]
        for p in order:
            for c, d in sorted(res["tls"].get(p, {}).items()):
                lines.append("- %s, %s: %s, %s, group %s, ALPN %s; TLS 1.2: %s" % (
                    p, CERT_LABEL[c], d.get("protocol"), d.get("cipher"), d.get("group"),
                    d.get("alpn"), d.get("tls1_2")))
        lines.append("")
    for k, why in sorted(res["skipped"].items()):
        if not any(s for s in res["samples"] if "%s/%s" % (s["proxy"], s["part"]) == k):
            lines.append("Not measured: %s: %s" % (k, why.splitlines()[0][:300]))
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="1 run, short windows, 512 MiB for L4, 500 idle connections")
    ap.add_argument("--only", default=",".join(PROXIES),
                    help="comma list of sluice,nginx,haproxy (each includes its L4 variants)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ",".join(PARTS))
    ap.add_argument("--certs", default="ec,rsa", help="handshake certificates: ec,rsa")
    ap.add_argument("--conns", type=int, default=64, help="wrk connections (https)")
    ap.add_argument("--duration", type=int, default=8, help="wrk seconds (https)")
    ap.add_argument("--warmup", type=int, default=2, help="wrk warm-up seconds")
    ap.add_argument("--hs-conc", type=int, default=16, help="concurrent new connections")
    ap.add_argument("--hs-duration", type=int, default=5)
    ap.add_argument("--hs-warmup", type=int, default=1)
    ap.add_argument("--l4-conns", type=int, default=4)
    ap.add_argument("--l4-bytes", type=int, default=2 << 30, help="bytes each direction")
    ap.add_argument("--l4-timeout", type=int, default=120)
    ap.add_argument("--l4-oneway", action="store_true",
                    help="L4: client to backend only (no bytes back), as a one-way bulk upload")
    ap.add_argument("--idle-conns", type=int, default=2000)
    two = (os.cpu_count() or 1) >= 2
    ap.add_argument("--proxy-core", type=int, default=1 if two else 0)
    ap.add_argument("--load-core", type=int, default=0)
    ap.add_argument("--quiet-wait", type=float, default=20,
                    help="before each measurement wait up to this long for an idle machine")
    ap.add_argument("--timeout", type=float, default=2400,
                    help="the whole script is stopped (and cleaned up) after this many s")
    ap.add_argument("--sluice", default=os.environ.get("SLUICE_BIN")
                    or os.path.join(ROOT, "build", "release", "sluice"))
    ap.add_argument("--bindir", default=os.path.join(HERE, "results", "bin"))
    ap.add_argument("--out", default=None, help="results directory")
    ap.add_argument("--report", metavar="RAW_JSON", help="only print a finished run's summary")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            res = json.load(f)
        for k, v in res["args"].items():
            setattr(args, k, v)
        print(summarize(res, args))
        return 0
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 3, 1
        args.hs_duration, args.hs_warmup = 2, 1
        args.l4_bytes, args.idle_conns = 512 << 20, 500
        args.quiet_wait = min(args.quiet_wait, 5)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.certs = [c.strip() for c in args.certs.split(",") if c.strip()]
    for p in args.only:
        if p not in PROXIES:
            ap.error("unknown proxy %r" % p)
    for p in args.parts:
        if p not in PARTS:
            ap.error("unknown part %r" % p)
    os.environ["PATH"] += ":/usr/sbin:/sbin"
    need = ["taskset", "openssl", "cc"] + (["wrk"] if "https" in args.parts else [])
    need += [p for p in args.only if p != "sluice"]
    for tool in need:
        if not shutil.which(tool):
            sys.exit("%s not found (apt-get install %s)" % (tool, {
                "nginx": "nginx-light", "taskset": "util-linux", "cc": "gcc libc6-dev"}.get(
                    tool, tool)))
    if "nginx" in args.only and "l4" in args.parts and not os.path.exists(STREAM_MODULE):
        sys.exit("%s not found (apt-get install libnginx-mod-stream)" % STREAM_MODULE)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def on_alarm(*_):
        raise Deadline("--timeout %.0f s reached" % args.timeout)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.timeout))
    # This process and everything it starts (load, backends) on the load core.
    os.sched_setaffinity(0, {args.load_core})

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join(HERE, "results", stamp + "-edge")
    os.makedirs(os.path.join(out, "work"), exist_ok=True)
    bins = build_helpers(args.bindir)
    subs = make_certs(os.path.join(out, "certs"))
    mi = bench.machine_info()
    mi["openssl"] = subprocess.run(["openssl", "version"], capture_output=True,
                                   text=True).stdout.strip()
    args.binaries = {"nginx": shutil.which("nginx"), "haproxy": shutil.which("haproxy")}
    if "sluice" in args.only:
        if os.access(args.sluice, os.X_OK):
            # A private copy: others may rebuild build/release/sluice during the run.
            snap = os.path.join(out, "sluice")
            shutil.copy2(args.sluice, snap)
            args.binaries["sluice"] = snap
            mi["sluice_binary"] = "built %s UTC" % time.strftime(
                "%Y-%m-%d %H:%M", time.gmtime(os.stat(args.sluice).st_mtime))
        else:
            log("no sluice binary at %s (run make): sluice skipped" % args.sluice)
            args.only.remove("sluice")
    res = {"machine": mi, "args": {k: v for k, v in vars(args).items() if k != "binaries"},
           "samples": [], "skipped": {}, "tls": {}, "checks": {}}

    backend_port, sink_port = free_port(), free_port()
    subs.update(BACKEND_PORT=backend_port, SINK_PORT=sink_port)
    try:
        bk = subprocess.Popen(["taskset", "-c", str(args.load_core), bins["backend"],
                               str(backend_port)], stdin=subprocess.DEVNULL)
        children[bk.pid] = "backend"
        sk = subprocess.Popen(["taskset", "-c", str(args.load_core), bins["l4_stream"], "serve",
                               str(sink_port)], stdin=subprocess.DEVNULL)
        children[sk.pid] = "sink"
        if not wait_port(backend_port, proc=bk) or http_get(backend_port) != 200:
            raise RuntimeError("backend did not start")
        if not wait_port(sink_port, proc=sk):
            raise RuntimeError("l4_stream sink did not start")
        log("backend :%d, sink/source :%d, results in %s" % (backend_port, sink_port, out))

        # Config check first: a part whose config the proxy refuses (e.g. a sluice listener
        # type that has not landed yet) is reported as not measured; the others go on.
        args.refused = set()
        for kind in args.only:
            for part, variants in (("https", [kind]), ("tcp", L4_VARIANTS[kind])):
                if part == "https" and not {"https", "handshake", "idle"} & set(args.parts):
                    continue
                if part == "tcp" and "l4" not in args.parts:
                    continue
                for v in variants:
                    px = Proxy(v, part, args.binaries[kind], subs,
                               os.path.join(out, "work", "%s-%s-check" % (v, part)),
                               args.proxy_core)
                    ok, msg = px.check()
                    if not ok:
                        args.refused.add((part, v))
                        first = (msg.splitlines() or ["refused"])[0]
                        for p in ({"https": ["https", "handshake", "idle"],
                                   "tcp": ["l4"]}[part]):
                            if p in args.parts:
                                res["skipped"]["%s/%s" % (v, p)] = "config refused: " + first
                        log("%s %s: config refused: %s" % (v, part, msg[-400:]))
        for run in range(1, args.runs + 1):
            k = (run - 1) % len(args.only)
            for kind in args.only[k:] + args.only[:k]:
                run_proxy(kind, run, args, bins, subs, out, res)
            with open(os.path.join(out, "raw.json"), "w") as f:
                json.dump(res, f, indent=1, default=str)
    finally:
        signal.alarm(0)
        for name in ("backend", "sink"):
            for pid, what in list(children.items()):
                if what == name:
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except OSError:
                        pass
        kill_all()
        with open(os.path.join(out, "raw.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    md = summarize(res, args)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    latest = os.path.join(HERE, "results", "latest-edge")
    try:
        if os.path.dirname(os.path.abspath(out)) == os.path.dirname(latest):
            if os.path.islink(latest) or os.path.exists(latest):
                os.remove(latest)
            os.symlink(os.path.relpath(out, os.path.dirname(latest)), latest)
    except OSError:
        pass
    print(md)
    return 1 if any(s.get("invalid") for s in res["samples"]) else 0


def on_signal(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        sys.exit(main())
    except Deadline as e:
        kill_all()
        sys.exit("edge_peers: stopped: %s (every process it started was ended)" % e)
