#!/usr/bin/python3
"""What the access log costs: sluice side by side with and without `access_log:`.

Both configurations are identical (1 worker, one route) except for the `access_log:` block.
Each run starts a fresh sluice for each configuration, in alternating order, warms it up,
then drives it with `wrk -t1 -cC -dD` (or, without wrk, a Python load generator over
keep-alive connections) and reads the process's CPU time (utime + stime of every thread,
/proc/PID/stat) over the measured window: CPU-microseconds per request. The log thread is
part of the process, so formatting, compression and writes are counted too; its own share
is reported separately (/proc/PID/task/TID/stat of the thread named sl-alog). Where `perf`
works, instructions and cycles per request (perf stat on the process) are reported too: on a
busy machine they move much less than CPU time.

The route is a direct response by default (the cheapest request, so the largest relative
cost); `--mode proxy` puts bench/backend.c behind it. sluice runs on CPU 0, the load (and the
backend) on the others when there are at least two.

Usage: bench/access_log_cost.py [--runs 5] [--duration 5] [--conns 32] [--mode direct|proxy]
                                [--sluice build/release/sluice] [--logdir DIR]
Prints a per-run table, the medians and the on/off ratio (target: < 1.05). Never part of
`make test`.
"""
import argparse
import http.client
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
SUMMARY = re.compile(r"access log: (\d+) records written in (\d+) segments, (\d+) dropped "
                     r"\(buffer full\), (\d+) dropped \(write errors\)")


def log(*a):
    print("[alog-bench %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def cpu_ticks(pid, tid=None):
    path = "/proc/%d/task/%d/stat" % (pid, tid) if tid else "/proc/%d/stat" % pid
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def log_thread(pid):
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                if f.read().strip() == "sl-alog":
                    return int(tid)
        except OSError:
            pass
    return None


def cpus():
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def pinned(cmd, cpu_list):
    if shutil.which("taskset") and cpu_list:
        return ["taskset", "-c", ",".join(str(c) for c in cpu_list)] + cmd
    return cmd


def config(port, mode, backend_port, logdir):
    lines = ["workers: 1", "log_level: info", "drain_timeout: 2s"]
    if logdir:
        lines += ["access_log:", "  directory: %s" % logdir, "  headers: [User-Agent]"]
    lines += ["listeners:", "  - name: public", "    address: 127.0.0.1:%d" % port]
    if mode == "proxy":
        lines += ["upstreams:", "  - name: app", "    endpoints:",
                  "      - {address: 127.0.0.1:%d}" % backend_port]
    lines += ["routes:", "  - name: bench", "    match: {path_prefix: /}"]
    if mode == "proxy":
        lines.append("    upstream: app")
    else:
        lines.append("    direct_response: {status: 200, body: \"Hello, world!\", "
                     "content_type: text/plain}")
    return "\n".join(lines) + "\n"


def run_wrk(port, conns, duration, cpu_list):
    cmd = pinned(["wrk", "-t1", "-c%d" % conns, "-d%ds" % duration,
                  "http://127.0.0.1:%d/bench/path" % port], cpu_list)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30).stdout
    m = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: (.*)", out)
    if not m:
        raise RuntimeError("wrk output not understood:\n" + out)
    if bad or errs:
        log("wrk reported problems:", bad.group(0) if bad else "", errs.group(0) if errs else "")
    return int(m.group(1))


def run_python(port, conns, duration):
    """Fallback load: `conns` threads, each a keep-alive connection sending GETs."""
    stop = time.monotonic() + duration
    counts = [0] * conns

    def work(k):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < stop:
            c.request("GET", "/bench/path")
            r = c.getresponse()
            r.read()
            if r.status == 200:
                counts[k] += 1
        c.close()

    ts = [threading.Thread(target=work, args=(k,)) for k in range(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts)


def start_perf(pid):
    """`perf stat` on the process (every thread) for the measured window: instructions and
    cycles per request do not move with the other load on the machine the way CPU time does."""
    return subprocess.Popen(["perf", "stat", "-x", ",", "-e", "instructions,cycles", "-p",
                             str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def stop_perf(perf):
    perf.send_signal(signal.SIGINT)
    try:
        _, err = perf.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        perf.kill()
        return {}
    counts = {}
    for line in err.splitlines():
        f = line.split(",")
        if len(f) > 2 and f[0].isdigit():
            counts[f[2].split(":")[0]] = int(f[0])
    return counts


def perf_works():
    if not shutil.which("perf"):
        return False
    r = subprocess.run(["perf", "stat", "-x", ",", "-e", "instructions", "true"],
                       capture_output=True, text=True)
    return r.returncode == 0 and any(ln.split(",")[0].isdigit() for ln in r.stderr.splitlines())


def measure(args, with_log, backend_port, work_dir, sl_cpus, load_cpus):
    port = free_port()
    logdir = os.path.join(work_dir, "logs-%d" % time.monotonic_ns()) if with_log else None
    cfg = os.path.join(work_dir, "sluice-%s.yaml" % ("on" if with_log else "off"))
    with open(cfg, "w") as f:
        f.write(config(port, args.mode, backend_port, logdir))
    err_path = cfg + ".stderr"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(pinned([args.sluice, "-c", cfg], sl_cpus),
                                stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    try:
        if not wait_port(port):
            raise RuntimeError("sluice did not start: " + open(err_path).read())
        load = (lambda d: run_wrk(port, args.conns, d, load_cpus)) if args.wrk else \
            (lambda d: run_python(port, args.conns, d))
        load(1)  # warm-up: connections, caches, the first segment
        tid = log_thread(proc.pid) if with_log else None
        perf = start_perf(proc.pid) if args.perf else None
        c0 = cpu_ticks(proc.pid)
        l0 = cpu_ticks(proc.pid, tid) if tid else 0
        n = load(args.duration)
        c1 = cpu_ticks(proc.pid)
        l1 = cpu_ticks(proc.pid, tid) if tid else 0
        counts = stop_perf(perf) if perf else {}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    tick_us = 1e6 / CLK_TCK
    res = {"requests": n, "rps": n / args.duration, "cpu_us": (c1 - c0) * tick_us / n,
           "log_thread_us": (l1 - l0) * tick_us / n if with_log else 0.0}
    if "instructions" in counts:
        res["kinstr"] = counts["instructions"] / n / 1000
    if "cycles" in counts:
        res["kcycles"] = counts["cycles"] / n / 1000
    if with_log:
        m = SUMMARY.search(open(err_path).read())
        if m:
            res["written"], _, res["dropped_full"], res["dropped_io"] = (int(x) for x in m.groups())
        seg_bytes = sum(os.path.getsize(os.path.join(logdir, x)) for x in os.listdir(logdir))
        res["bytes_per_record"] = seg_bytes / max(1, res.get("written", 1))
        shutil.rmtree(logdir, ignore_errors=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--mode", choices=("direct", "proxy"), default="direct")
    ap.add_argument("--sluice", default=os.path.join(ROOT, "build", "release", "sluice"))
    ap.add_argument("--logdir", default=None, help="where segments go (default: a temp dir)")
    args = ap.parse_args()
    args.wrk = shutil.which("wrk") is not None
    args.perf = perf_works()
    if not os.access(args.sluice, os.X_OK):
        sys.exit("no sluice binary at %s (make -j2)" % args.sluice)

    cpu_list = cpus()
    sl_cpus = cpu_list[:1] if len(cpu_list) > 1 else []
    load_cpus = cpu_list[1:] if len(cpu_list) > 1 else []
    work_dir = args.logdir or tempfile.mkdtemp(prefix="sluice-alog-bench-")
    os.makedirs(work_dir, exist_ok=True)
    backend = None
    backend_port = 0
    if args.mode == "proxy":
        exe = os.path.join(work_dir, "backend")
        subprocess.run(["cc", "-O2", "-o", exe, os.path.join(HERE, "backend.c")], check=True)
        backend_port = free_port()
        backend = subprocess.Popen(pinned([exe, str(backend_port)], load_cpus))
        if not wait_port(backend_port):
            sys.exit("backend did not start")
    log("mode %s, %d runs x %ds, %d connections, load by %s, sluice on CPU %s, segments in %s"
        % (args.mode, args.runs, args.duration, args.conns, "wrk" if args.wrk else "Python",
           sl_cpus or "any", work_dir))
    rows = {"off": [], "on": []}
    try:
        for r in range(args.runs):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for which in order:
                res = measure(args, which == "on", backend_port, work_dir, sl_cpus, load_cpus)
                rows[which].append(res)
                log("run %d %-3s  %8.0f req/s  %6.2f CPU-us/req  %s%s" % (
                    r + 1, which, res["rps"], res["cpu_us"],
                    ("%.1f k-instructions/req" % res["kinstr"]) if "kinstr" in res else "",
                    ("  (log thread %.2f, %.1f B/record, written %s, dropped %s+%s)" % (
                        res["log_thread_us"], res.get("bytes_per_record", 0),
                        res.get("written"), res.get("dropped_full"), res.get("dropped_io")))
                    if which == "on" else ""))
    finally:
        if backend:
            backend.terminate()
            backend.wait(5)
        if not args.logdir:
            shutil.rmtree(work_dir, ignore_errors=True)

    med = {k: statistics.median(x["cpu_us"] for x in v) for k, v in rows.items()}
    rps = {k: statistics.median(x["rps"] for x in v) for k, v in rows.items()}
    lt = statistics.median(x["log_thread_us"] for x in rows["on"])
    ratio = med["on"] / med["off"]
    print("\naccess log cost, %s route, 1 worker, %d runs x %ds, %d connections (%s)"
          % (args.mode, args.runs, args.duration, args.conns, "wrk" if args.wrk else "Python"))
    rest = statistics.median(x["cpu_us"] - x["log_thread_us"] for x in rows["on"])
    print("| access_log | CPU-us/request | of which the log thread | the rest (workers) "
          "| req/s |")
    print("|---|---|---|---|---|")
    print("| off | %.2f | - | %.2f | %.0f |" % (med["off"], med["off"], rps["off"]))
    print("| on  | %.2f | %.2f | %.2f | %.0f |" % (med["on"], lt, rest, rps["on"]))
    print("(medians; CPU-us per request = utime+stime of the whole process / requests)")
    print("ratio on/off: %.3f (%+.1f%%); target < 1.05: %s"
          % (ratio, (ratio - 1) * 100, "met" if ratio < 1.05 else "NOT met"))
    if all("kinstr" in x for v in rows.values() for x in v):
        ki = {k: statistics.median(x["kinstr"] for x in v) for k, v in rows.items()}
        kc = {k: statistics.median(x.get("kcycles", 0) for x in v) for k, v in rows.items()}
        print("instructions per request (perf stat, all threads, user + kernel): off %.1f k, "
              "on %.1f k, ratio %.3f (%+.1f%%); cycles: off %.1f k, on %.1f k, ratio %.3f"
              % (ki["off"], ki["on"], ki["on"] / ki["off"], (ki["on"] / ki["off"] - 1) * 100,
                 kc["off"], kc["on"], kc["on"] / kc["off"] if kc["off"] else 0))


if __name__ == "__main__":
    main()
