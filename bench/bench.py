#!/usr/bin/python3
"""Side-by-side benchmark driver: sluice vs nginx vs HAProxy. Run it through bench/run.sh,
which installs what is missing, builds the C helpers and pins this driver to the load core.

For each run (proxy order rotated every run) and each proxy:
  memory phase  a fresh proxy process: idle RSS after start, then bench/idleconns opens
                N keep-alive client connections (one request each, then idle) and the RSS
                delta / N gives the RSS per idle client connection;
  load phase    a fresh proxy process: for each connection count, a short wrk warm-up,
                then `wrk -t1 -cC -dD --latency`; the proxy's CPU time (utime+stime of all
                its processes, /proc/PID/stat) over the measured window divided by the
                completed requests gives CPU-microseconds per request; VmRSS is sampled
                during the run (peak reported).
The proxy runs on one core (taskset), backend + wrk + this driver on the other. Each
metric is reported as the median over runs. Raw results go to bench/results/<stamp>/.
"""
import argparse
import datetime
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PEERS = ("nginx", "haproxy")
ALL = ("sluice", "nginx", "haproxy", "direct")

children = {}  # pid -> description, every process we started (or discovered) and must end


def log(*a):
    print("[bench %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes and /proc
def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def proc_children(pid):
    out = []
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid):
    """pid and all its descendants."""
    res, todo = [], [pid]
    while todo:
        p = todo.pop()
        res.append(p)
        todo += proc_children(p)
    return res


def cpu_ticks(pids):
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except (OSError, IndexError):
            pass
    return total


def rss_kib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid):
    """Proportional set size: shared pages divided among the processes mapping them."""
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_sum(pids):
    return sum(rss_kib(p) for p in pids)


def cpu_stat():
    """Per-CPU jiffies from /proc/stat: {cpu: (busy_no_irq, irq+softirq, steal, total)}."""
    res = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                v = [int(x) for x in line.split()[1:]]
                user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
                res[int(line[3:line.index(" ")])] = (user + nice + system, irq + softirq,
                                                     steal, sum(v[:8]))
    return res


def cpu_stat_delta(a, b, cpu):
    if cpu not in a or cpu not in b:
        return None
    d = [y - x for x, y in zip(a[cpu], b[cpu])]
    tot = d[3] or 1
    return {"busy_pct": 100.0 * d[0] / tot, "irq_pct": 100.0 * d[1] / tot,
            "steal_pct": 100.0 * d[2] / tot, "busy_ticks": d[0], "irq_ticks": d[1]}


def wait_quiet(max_wait, threshold=15.0):
    """Wait (up to max_wait s) until the machine is quiet: other sessions share it."""
    t0 = time.monotonic()
    busy = None
    while True:
        a = cpu_stat()
        time.sleep(0.5)
        b = cpu_stat()
        busy = max(cpu_stat_delta(a, b, c)["busy_pct"] + cpu_stat_delta(a, b, c)["irq_pct"]
                   for c in b)
        if busy < threshold or time.monotonic() - t0 >= max_wait:
            break
    waited = time.monotonic() - t0
    if busy >= threshold:
        log("machine still busy (%.0f%% on a core) after %.0f s; measuring anyway"
            % (busy, waited))
    return waited, busy


def wait_port(port, timeout=15.0, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def http_get(port, timeout=5.0):
    """One GET over a fresh connection; returns the status code or None."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            b = s.recv(4096)
            if not b:
                break
            data += b
        s.close()
        m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def stop(proc, name, grace=5.0):
    if proc is None or proc.poll() is not None:
        children.pop(proc.pid if proc else None, None)
        return
    kids = [p for p in tree(proc.pid) if p != proc.pid]
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log("%s did not stop on SIGTERM; SIGKILL pid %d" % (name, proc.pid))
        proc.kill()
        proc.wait(timeout=5)
    for k in kids:  # e.g. nginx workers if the master died first
        try:
            os.kill(k, signal.SIGKILL)
        except OSError:
            pass
        children.pop(k, None)
    children.pop(proc.pid, None)


def kill_all():
    for pid in list(children):
        for p in reversed(tree(pid)):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        children.pop(pid, None)


# ---------------------------------------------------------------- proxies
class Proxy:
    def __init__(self, name, args, workdir, backend_port, proxy_core):
        self.name = name
        self.args = args
        self.workdir = workdir
        self.backend_port = backend_port
        self.core = proxy_core
        self.proc = None
        self.port = None

    def render(self, template, dest):
        with open(os.path.join(HERE, "conf", template)) as f:
            text = f.read()
        text = (text.replace("@PORT@", str(self.port))
                .replace("@BACKEND_PORT@", str(self.backend_port))
                .replace("@PREFIX@", self.workdir))
        with open(dest, "w") as f:
            f.write(text)
        return dest

    def command(self):
        d = self.workdir
        if self.name == "nginx":
            conf = self.render("nginx.conf.in", os.path.join(d, "nginx.conf"))
            return ["nginx", "-p", d, "-e", os.path.join(d, "nginx-error.log"), "-c", conf]
        if self.name == "haproxy":
            conf = self.render("haproxy.cfg.in", os.path.join(d, "haproxy.cfg"))
            return ["haproxy", "-db", "-f", conf]
        if self.name == "sluice":
            conf = self.render("sluice.yaml.in", os.path.join(d, "sluice.yaml"))
            return [a.replace("{conf}", conf) for a in self.args.sluice_cmd]
        raise ValueError(self.name)

    def start(self):
        self.port = free_port()
        os.makedirs(self.workdir, exist_ok=True)
        cmd = ["taskset", "-c", str(self.core)] + self.command()
        logf = open(os.path.join(self.workdir, "%s.log" % self.name), "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.STDOUT)
        logf.close()
        children[self.proc.pid] = self.name
        if not wait_port(self.port, proc=self.proc):
            self.stop()
            raise RuntimeError("%s did not start listening on %d (see %s)"
                               % (self.name, self.port, self.workdir))
        # nginx: wait for the worker to exist before measuring anything
        end = time.time() + 5
        while self.name == "nginx" and len(self.pids()) < 2 and time.time() < end:
            time.sleep(0.05)
        for p in self.pids():
            children.setdefault(p, self.name)
        return self

    def pids(self):
        return tree(self.proc.pid) if self.proc else []

    def stop(self):
        stop(self.proc, self.name)
        for p in list(children):
            if children[p] == self.name:
                children.pop(p, None)
        self.proc = None


# ---------------------------------------------------------------- wrk
WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(text):
    r = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if m:
        r["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        r["rps"] = float(m.group(1))
    for pct in ("50", "99"):
        m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s|m)\s*$" % pct, text, re.M)
        if m:
            r["p%s_ms" % pct] = float(m.group(1)) * WRK_UNITS[m.group(2)]
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    r["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    r["non2xx"] = int(m.group(1)) if m else 0
    return r


def run_wrk(port, conns, duration, core, latency=True, timeout_extra=30):
    cmd = ["taskset", "-c", str(core), "wrk", "-t1", "-c%d" % conns, "-d%ds" % duration]
    if latency:
        cmd.append("--latency")
    cmd.append("http://127.0.0.1:%d/" % port)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children[p.pid] = "wrk"
    try:
        out, _ = p.communicate(timeout=duration + timeout_extra)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        out += "\n(wrk timed out)\n"
    children.pop(p.pid, None)
    return out


class RssSampler(threading.Thread):
    def __init__(self, pids_fn, interval=0.25):
        super().__init__(daemon=True)
        self.pids_fn, self.interval = pids_fn, interval
        self.samples = []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.wait(self.interval):
            self.samples.append(rss_sum(self.pids_fn()))

    def finish(self):
        self.halt.set()
        self.join()
        return max(self.samples) if self.samples else None


def measure_load(proxy_pids, port, conns, duration, warmup, load_core, outdir, tag,
                 proxy_core=None, quiet_wait=0):
    waited, busy_before = wait_quiet(quiet_wait) if quiet_wait else (0, None)
    if warmup:
        run_wrk(port, conns, warmup, load_core, latency=False)
    pids = proxy_pids()
    s0 = cpu_stat()
    c0, t0 = cpu_ticks(pids), time.monotonic()
    sampler = RssSampler(proxy_pids)
    sampler.start()
    out = run_wrk(port, conns, duration, load_core)
    rss_peak = sampler.finish()
    c1, t1 = cpu_ticks(proxy_pids()), time.monotonic()
    s1 = cpu_stat()
    with open(os.path.join(outdir, "wrk-%s.txt" % tag), "w") as f:
        f.write(out)
    r = parse_wrk(out)
    cpu_s = (c1 - c0) / CLK_TCK
    r["cpu_s"] = cpu_s
    r["wall_s"] = t1 - t0
    r["cpu_pct"] = 100.0 * cpu_s / (t1 - t0) if pids else None
    r["rss_load_kib"] = rss_peak if pids else None
    if pids and r.get("requests"):
        r["cpu_us_per_req"] = cpu_s * 1e6 / r["requests"]
    r["quiet_wait_s"], r["busy_before_pct"] = waited, busy_before
    r["load_core"] = cpu_stat_delta(s0, s1, load_core)
    if proxy_core is not None:
        pc = cpu_stat_delta(s0, s1, proxy_core)
        r["proxy_core"] = pc
        if pc:
            # Whole proxy core, all processes, incl. irq/softirq (loopback TCP work that is
            # not charged to any process): ~100 % means the proxy core was saturated.
            r["proxy_core_busy_pct"] = pc["busy_pct"] + pc["irq_pct"]
            if pids and r.get("requests"):
                # Everything the proxy core did per request, incl. softirq (loopback TCP);
                # inflated by any foreign load on that core.
                r["core_us_per_req"] = ((pc["busy_ticks"] + pc["irq_ticks"]) / CLK_TCK
                                        * 1e6 / r["requests"])
    return r


# ---------------------------------------------------------------- idle connections
def measure_idle_conns(proxy, n, idle_bin, load_core, settle=2.0):
    r = {"n": n}
    p = subprocess.Popen(["taskset", "-c", str(load_core), idle_bin, "127.0.0.1",
                          str(proxy.port), str(n), "256", "90"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, bufsize=1)
    children[p.pid] = "idleconns"
    deadline = time.time() + 150

    def expect(prefix):
        import select
        while time.time() < deadline:
            rl, _, _ = select.select([p.stdout], [], [], 1.0)
            if rl:
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError("idleconns exited: %s" % p.stderr.read())
                if line.startswith(prefix):
                    return line.split()
        raise RuntimeError("idleconns: timed out waiting for %s" % prefix)

    try:
        expect("WARM")
        time.sleep(0.5)
        r["rss_before_kib"] = rss_sum(proxy.pids())
        p.stdin.write("go\n")
        ready = expect("READY")
        r["established"] = int(ready[1])
        r["setup_ms"] = float(ready[2])
        time.sleep(settle)
        r["rss_with_kib"] = rss_sum(proxy.pids())
        r["rss_with_per_proc_kib"] = {str(x): rss_kib(x) for x in proxy.pids()}
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
    if r.get("established"):
        r["kib_per_conn"] = (r["rss_with_kib"] - r["rss_before_kib"]) / r["established"]
    return r


# ---------------------------------------------------------------- report
def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def rng(vals):
    vals = [v for v in vals if v is not None]
    return (min(vals), max(vals)) if vals else (None, None)


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def machine_info():
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:
            return ""
    model = sh("lscpu | sed -n 's/^Model name: *//p' | head -1")
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "hypervisor": sh("lscpu | sed -n 's/^Hypervisor vendor: *//p'"),
        "kernel": sh("uname -srm"),
        "os": sh(". /etc/os-release && echo $PRETTY_NAME"),
        "mem": sh("free -g | awk '/^Mem:/{print $2\" GiB\"}'"),
        "nginx": sh("nginx -v 2>&1 | sed 's/^nginx version: //'"),
        "nginx_pkg": sh("dpkg-query -W -f '${Package} ${Version}' nginx-light 2>/dev/null "
                        "|| dpkg-query -W -f '${Package} ${Version}' nginx-core"),
        "haproxy": sh("haproxy -v | head -1"),
        "wrk": sh("wrk -v 2>&1 | head -1"),
        "sluice": sh("cd %s && git rev-parse --short HEAD 2>/dev/null" % ROOT),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def summarize(res, args):
    lines = []
    mi = res["machine"]
    lines.append("Run: %s; %d run(s) × %d s per configuration (+%d s warm-up), medians; "
                 "proxy on core %d, backend + wrk on core %d."
                 % (mi["date"], args.runs, args.duration, args.warmup, args.proxy_core,
                    args.load_core))
    lines.append("Machine: %s, %s CPUs (%s VM), %s RAM, %s, %s."
                 % (mi["cpu_model"], mi["cpus"], mi["hypervisor"] or "bare metal", mi["mem"],
                    mi["kernel"], mi["os"]))
    lines.append("Versions: nginx %s (%s), %s, %s, sluice %s."
                 % (mi["nginx"], mi["nginx_pkg"], mi["haproxy"].split(" - ")[0],
                    mi["wrk"].split(" Copyright")[0],
                    "from the working tree at HEAD %s, binary %s" % (mi["sluice"] or "?",
                                                 mi.get("sluice_binary", "not built"))))
    lines.append("")
    lines.append("| proxy | conns | req/s | p50 ms | p99 ms | CPU-µs/req (min–max) | "
                 "proxy CPU % | proxy core busy % | RSS under load MiB | errors |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    agg = {}
    for name in args.only:
        for c in args.conns:
            rows = [r for r in res["load"] if r["proxy"] == name and r["conns"] == c]
            if not rows:
                if name == "sluice" and res.get("sluice_missing"):
                    lines.append("| **sluice: pending** | %d | – | – | – | – | – | – | – | – |"
                                 % c)
                continue
            a = {k: med([r.get(k) for r in rows]) for k in
                 ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "cpu_pct", "rss_load_kib",
                  "proxy_core_busy_pct")}
            a["cpu_rng"] = rng([r.get("cpu_us_per_req") for r in rows])
            a["errors"] = sum((r.get("socket_errors") or 0) + (r.get("non2xx") or 0)
                              for r in rows)
            a["n"] = len(rows)
            agg[(name, c)] = a
            label = name if name != "direct" else "backend direct (no proxy)"
            cr = ("%.2f (%.2f–%.2f)" % (a["cpu_us_per_req"], *a["cpu_rng"])
                  if a["cpu_us_per_req"] is not None else "–")
            lines.append("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %d |" % (
                label, c, fmt(a["rps"], ",.0f"), fmt(a["p50_ms"], ".2f"),
                fmt(a["p99_ms"], ".2f"), cr, fmt(a["cpu_pct"], ".0f"),
                fmt(a["proxy_core_busy_pct"], ".0f"),
                fmt(a["rss_load_kib"] and a["rss_load_kib"] / 1024, ".1f"), a["errors"]))
    lines.append("")
    lines.append("| proxy | processes | idle RSS MiB | idle PSS MiB | RSS before MiB | "
                 "RSS with %d idle conns MiB | KiB per idle conn (min–max) | "
                 "conns alive after hold |" % args.idle_conns)
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    magg = {}
    for name in args.only:
        if name == "direct":
            continue
        rows = [r for r in res["memory"] if r["proxy"] == name]
        if not rows:
            if name == "sluice" and res.get("sluice_missing"):
                lines.append("| **sluice: pending** | – | – | – | – | – | – | – |")
            continue
        m = {k: med([r.get(k) for r in rows]) for k in
             ("idle_rss_kib", "idle_pss_kib", "rss_before_kib", "rss_with_kib",
              "kib_per_conn", "alive", "processes")}
        m["rng"] = rng([r.get("kib_per_conn") for r in rows])
        magg[name] = m
        mib = lambda v: None if v is None else v / 1024
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s/%d |" % (
            name, fmt(m["processes"], ".0f"), fmt(mib(m["idle_rss_kib"]), ".1f"),
            fmt(mib(m["idle_pss_kib"]), ".1f"), fmt(mib(m["rss_before_kib"]), ".1f"),
            fmt(mib(m["rss_with_kib"]), ".1f"),
            "%.2f (%.2f–%.2f)" % (m["kib_per_conn"], *m["rng"])
            if m["kib_per_conn"] is not None else "–",
            fmt(m["alive"], ".0f"), args.idle_conns))
    # targets
    if "sluice" in args.only:
        lines.append("")
        lines.append("| target | sluice | better peer | ratio | met? |")
        lines.append("|---|---:|---:|---:|:-:|")
        for c in args.conns:
            s = agg.get(("sluice", c), {}).get("cpu_us_per_req")
            peers = [(agg[(p, c)]["cpu_us_per_req"], p) for p in PEERS
                     if (p, c) in agg and agg[(p, c)]["cpu_us_per_req"] is not None]
            best = min(peers) if peers else None
            if s is None or best is None:
                lines.append("| CPU-µs/req ≤ 0.85× better peer @%d | %s | %s | – | pending |"
                             % (c, "pending" if s is None else "%.2f" % s,
                                "–" if best is None else "%.2f (%s)" % best))
            else:
                ratio = s / best[0]
                lines.append("| CPU-µs/req ≤ 0.85× better peer @%d | %.2f | %.2f (%s) | %.2f× "
                             "| %s |" % (c, s, best[0], best[1], ratio,
                                         "yes" if ratio <= 0.85 else "**no**"))
        sm = magg.get("sluice")
        if sm and sm["kib_per_conn"] is not None:
            lines.append("| RSS per idle keep-alive conn ≤ 0.25 KiB | %.2f KiB | %s | – | %s |"
                         % (sm["kib_per_conn"], ", ".join(
                             "%s %.2f" % (p, magg[p]["kib_per_conn"]) for p in PEERS
                             if p in magg and magg[p]["kib_per_conn"] is not None) or "–",
                            "yes" if sm["kib_per_conn"] <= 0.25 else "**no**"))
            lines.append("| idle RSS < 8 MiB | %.1f MiB | %s | – | %s |"
                         % (sm["idle_rss_kib"] / 1024, ", ".join(
                             "%s %.1f" % (p, magg[p]["idle_rss_kib"] / 1024) for p in PEERS
                             if p in magg and magg[p]["idle_rss_kib"] is not None) or "–",
                            "yes" if sm["idle_rss_kib"] < 8 * 1024 else "**no**"))
        else:
            lines.append("| RSS per idle keep-alive conn ≤ 0.25 KiB | pending | – | – | pending |")
            lines.append("| idle RSS < 8 MiB | pending | – | – | pending |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of wrk warm-up")
    ap.add_argument("--quick", action="store_true", help="1 run × 5 s, 1 s warm-up")
    ap.add_argument("--only", default="sluice,nginx,haproxy,direct",
                    help="comma list of sluice,nginx,haproxy,direct")
    ap.add_argument("--conns", default="64,256")
    ap.add_argument("--idle-conns", type=int, default=10000)
    ap.add_argument("--proxy-core", type=int, default=1)
    ap.add_argument("--load-core", type=int, default=0)
    ap.add_argument("--quiet-wait", type=float, default=60,
                    help="before each measurement wait up to this many seconds for the "
                         "(shared) machine to be idle; 0 disables")
    ap.add_argument("--sluice", default=os.path.join(ROOT, "build/release/sluice"))
    ap.add_argument("--sluice-cmd", default=None,
                    help="command line for sluice; {bin} and {conf} are substituted "
                         "(default: '{bin} -c {conf}', or $SLUICE_CMD)")
    ap.add_argument("--out", default=None, help="results directory")
    ap.add_argument("--bindir", default=os.path.join(HERE, "results", "bin"))
    args = ap.parse_args()
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 5, 1
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    for x in args.only:
        if x not in ALL:
            ap.error("unknown proxy %r" % x)
    args.conns = [int(x) for x in args.conns.split(",")]
    sc = args.sluice_cmd or os.environ.get("SLUICE_CMD") or "{bin} -c {conf}"
    args.sluice_cmd = [a.replace("{bin}", args.sluice) for a in sc.split()]

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join(HERE, "results", stamp)
    os.makedirs(out, exist_ok=True)
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.idle_conns + 100:
        log("RLIMIT_NOFILE hard limit %d is below %d idle connections; lowering N"
            % (hard, args.idle_conns))
        args.idle_conns = hard - 200

    res = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items()},
           "load": [], "memory": [], "notes": []}
    if "sluice" in args.only and not os.access(args.sluice, os.X_OK):
        log("sluice binary %s not found: sluice is reported as pending" % args.sluice)
        res["sluice_missing"] = True
    if "sluice" in args.only and not res.get("sluice_missing"):
        # Snapshot the binary: others may rebuild build/release/sluice during the run.
        snap = os.path.join(out, "sluice")
        shutil.copy2(args.sluice, snap)
        st = os.stat(args.sluice)
        res["machine"]["sluice_binary"] = "%s (%d bytes, built %s)" % (
            args.sluice, st.st_size, time.strftime("%Y-%m-%d %H:%M", time.gmtime(st.st_mtime)))
        args.sluice_cmd = [snap if a == args.sluice else a for a in args.sluice_cmd]
    names = [n for n in args.only if n != "direct"
             and not (n == "sluice" and res.get("sluice_missing"))]

    backend_port = free_port()
    bk = subprocess.Popen(["taskset", "-c", str(args.load_core),
                           os.path.join(args.bindir, "backend"), str(backend_port)],
                          stdin=subprocess.DEVNULL)
    children[bk.pid] = "backend"
    if not wait_port(backend_port, proc=bk) or http_get(backend_port) != 200:
        raise RuntimeError("backend did not start")
    log("backend on 127.0.0.1:%d (pid %d), results in %s" % (backend_port, bk.pid, out))

    for run in range(args.runs):
        order = names[run % len(names):] + names[:run % len(names)] if names else []
        if "direct" in args.only:
            for c in args.conns:
                log("run %d/%d direct c=%d" % (run + 1, args.runs, c))
                r = measure_load(lambda: [], backend_port, c, args.duration, args.warmup,
                                 args.load_core, out, "direct-c%d-r%d" % (c, run + 1),
                                 args.proxy_core, args.quiet_wait)
                r.update(proxy="direct", conns=c, run=run + 1)
                res["load"].append(r)
        for name in order:
            wd = os.path.join(work, "%s-r%d" % (name, run + 1))
            # memory phase on a fresh process
            px = Proxy(name, args, wd + "-mem", backend_port, args.proxy_core)
            try:
                px.start()
                time.sleep(1.0)
                if args.quiet_wait:
                    wait_quiet(min(args.quiet_wait, 10))
                idle = rss_sum(px.pids())
                idle_pss = sum(pss_kib(x) for x in px.pids())
                idle_per_proc = {str(x): rss_kib(x) for x in px.pids()}
                log("run %d/%d %s: idle RSS %.1f MiB; opening %d idle conns"
                    % (run + 1, args.runs, name, idle / 1024, args.idle_conns))
                m = measure_idle_conns(px, args.idle_conns,
                                       os.path.join(args.bindir, "idleconns"), args.load_core)
                m.update(proxy=name, run=run + 1, idle_rss_kib=idle, idle_pss_kib=idle_pss,
                         idle_rss_per_proc_kib=idle_per_proc, processes=len(idle_per_proc))
                res["memory"].append(m)
                log("  %s: %d established, %.3f KiB/conn, %d alive"
                    % (name, m.get("established", 0), m.get("kib_per_conn") or -1,
                       m.get("alive", -1)))
            except Exception as e:
                log("memory phase for %s failed: %s" % (name, e))
                res["notes"].append("run %d %s memory: %s" % (run + 1, name, e))
            finally:
                px.stop()
            # load phase on a fresh process
            px = Proxy(name, args, wd + "-load", backend_port, args.proxy_core)
            try:
                px.start()
                st = http_get(px.port)
                if st != 200:
                    raise RuntimeError("%s answered %s instead of 200" % (name, st))
                for c in args.conns:
                    r = measure_load(px.pids, px.port, c, args.duration, args.warmup,
                                     args.load_core, out, "%s-c%d-r%d" % (name, c, run + 1),
                                     args.proxy_core, args.quiet_wait)
                    r.update(proxy=name, conns=c, run=run + 1)
                    res["load"].append(r)
                    log("run %d/%d %s c=%d: %s req/s, %s CPU-us/req, p99 %s ms, CPU %s%%"
                        % (run + 1, args.runs, name, c, fmt(r.get("rps"), ".0f"),
                           fmt(r.get("cpu_us_per_req"), ".2f"), fmt(r.get("p99_ms"), ".2f"),
                           fmt(r.get("cpu_pct"), ".0f")))
            except Exception as e:
                log("load phase for %s failed: %s" % (name, e))
                res["notes"].append("run %d %s load: %s" % (run + 1, name, e))
            finally:
                px.stop()
        with open(os.path.join(out, "raw.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)

    stop(bk, "backend")
    md = summarize(res, args)
    if res["notes"]:
        md += "\nNotes:\n" + "".join("- %s\n" % n for n in res["notes"])
    with open(os.path.join(out, "raw.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    latest = os.path.join(HERE, "results", "latest")
    try:
        if os.path.islink(latest) or os.path.exists(latest):
            os.remove(latest)
        os.symlink(os.path.relpath(out, os.path.dirname(latest)), latest)
    except OSError:
        pass
    print(md)
    return 0


def on_signal(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        sys.exit(main())
    finally:
        kill_all()
