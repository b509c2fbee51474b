"""Peers and helpers for the resilience integration tests (passive and active health, circuit
breakers, retries, zone-aware balancing, service discovery) and for bench/resilience.py.

- BackendProcess: an HTTP/1.1 keep-alive backend in its own OS process (so it can be
  SIGKILLed, SIGSTOPped and SIGCONTed), started from BACKEND_SRC with `python3 -c`. It answers
  200 with its name as the body and `X-Backend: <name>`, counts requests per "METHOD path",
  and is switched at run time, for every path or for one path, into the modes:
      ok      200 (the default)
      status  answer `status` (503, 500, ...), still with X-Backend and the name as the body;
              with `every` = k only every k-th request of that path setting (a flaky one)
      slow    200 after `delay` seconds
      hang    read the request, never answer (until the gateway closes the connection)
      close   read the request, close the connection without answering (FIN)
      reset   read the request, reset the connection (RST) without answering
  Control goes over the process's stdin/stdout (one JSON line each way), so it works in any
  mode; not while the process is stopped (resume() first) and not after kill(). The process
  exits by itself when its stdin closes (the test process went away).
- Peers: the `rpeers` fixture; starts backends (also groups on one port across 127.0.0.x for
  DNS A records) and dnsmasq; stops every process it started by PID at teardown.
- Dnsmasq: a real /usr/sbin/dnsmasq on a free 127.0.0.1 port answering from a hosts file
  (set_hosts() rewrites it and sends SIGHUP) and --srv-host records (set_srv() restarts it on
  the same port); dns_query() asks it directly.
- Load: a bounded load generator: N threads with keep-alive http.client connections sending
  requests to the gateway for a fixed duration and/or count (optionally paced), recording
  for every request its status, X-Backend, connection errors and latency. Summary slices
  and counts those records.
- Gateway log: ejections() / restorations() / wait_log() read sluice's stderr lines
  `upstream U endpoint A: ejected for 1s (...)` and `... back in rotation` with their
  timestamps (wall clock, ms).
- rconfig(): an inline config with one upstream `users` behind a catch-all route.

Nothing here skips: a missing dnsmasq fails the test that needs it.
"""

import calendar
import collections
import http.client
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from helpers import simple_config
from peers import free_port

PYTHON = sys.executable or "/usr/bin/python3"
DNSMASQ = "/usr/sbin/dnsmasq"
START_TIMEOUT = 10.0
CTL_TIMEOUT = 5.0
LOAD_HARD_CAP = 60.0  # no load generator runs longer than this, whatever it is asked

# ---------------------------------------------------------------------------------------------
# The backend process (stdlib only; argv: NAME HOST PORT).

BACKEND_SRC = r'''
import json, os, socket, struct, sys, threading, time

NAME, HOST, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
BODY = NAME.encode() + b"\n"
lock = threading.Lock()
default = {"mode": "ok", "status": 200, "delay": 0.0, "every": 1, "n": 0}
by_path = {}
counts = {}
totals = {"conns": 0, "requests": 0}

try:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((HOST, PORT))
    ls.listen(1024)
except OSError as e:
    sys.stdout.write("BINDFAIL %s\n" % e)
    sys.stdout.flush()
    os._exit(3)


def reply(doc):
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def control():
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
        except ValueError:
            reply({"error": "bad json"})
            continue
        op = cmd.get("op")
        with lock:
            if op == "mode":
                s = {"mode": cmd["mode"], "status": int(cmd.get("status") or 200),
                     "delay": float(cmd.get("delay") or 0.0),
                     "every": int(cmd.get("every") or 1), "n": 0}
                if cmd.get("path"):
                    by_path[cmd["path"]] = s
                else:
                    default.clear()
                    default.update(s)
                    by_path.clear()
                doc = {"ok": True}
            elif op == "stats":
                doc = {"counts": dict(counts), "conns": totals["conns"],
                       "requests": totals["requests"]}
            elif op == "zero":
                counts.clear()
                totals["requests"] = 0
                totals["conns"] = 0
                doc = {"ok": True}
            else:
                doc = {"error": "unknown op %r" % op}
        reply(doc)
    os._exit(0)  # stdin closed: the test process is gone


class Closed(Exception):
    pass


def fill(conn, buf):
    data = conn.recv(65536)
    if not data:
        raise Closed()
    buf += data


def readline(conn, buf):
    while True:
        i = buf.find(b"\r\n")
        if i >= 0:
            line = bytes(buf[:i])
            del buf[:i + 2]
            return line
        fill(conn, buf)


def skip(conn, buf, n):
    while n:
        if not buf:
            fill(conn, buf)
        k = min(n, len(buf))
        del buf[:k]
        n -= k


def read_body(conn, buf, headers):
    te = headers.get("transfer-encoding", "").lower()
    if "chunked" in te:
        while True:
            size = int(readline(conn, buf).split(b";")[0].strip(), 16)
            if size == 0:
                while readline(conn, buf):
                    pass
                return
            skip(conn, buf, size + 2)
    n = int(headers.get("content-length", "0") or 0)
    skip(conn, buf, n)


def respond(conn, status, close, head_only):
    lines = ["HTTP/1.1 %d %s" % (status, "OK" if status == 200 else "Status"),
             "X-Backend: " + NAME, "Content-Type: text/plain",
             "Content-Length: %d" % len(BODY)]
    if close:
        lines.append("Connection: close")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode()
    conn.sendall(out if head_only else out + BODY)


def serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.settimeout(120)
    buf = bytearray()
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                fill(conn, buf)
            i = buf.index(b"\r\n\r\n")
            head = bytes(buf[:i]).decode("latin-1")
            del buf[:i + 4]
            first, _, rest = head.partition("\r\n")
            method, target, version = first.split(" ", 2)
            path = target.split("?", 1)[0]
            headers = {}
            for ln in rest.split("\r\n"):
                if ":" in ln:
                    k, v = ln.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            with lock:
                key = method + " " + path
                counts[key] = counts.get(key, 0) + 1
                totals["requests"] += 1
                live = by_path.get(path, default)
                live["n"] += 1
                s = dict(live)
            read_body(conn, buf, headers)
            close = "close" in headers.get("connection", "").lower() or version == "HTTP/1.0"
            mode = s["mode"]
            if mode == "hang":
                while True:
                    fill(conn, buf)  # until the gateway gives up and closes
            if mode == "close":
                conn.close()
                return
            if mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                return
            if mode == "slow":
                time.sleep(s["delay"])
            status = 200
            if mode == "status" and s["n"] % s["every"] == 0:
                status = s["status"]
            respond(conn, status, close, method == "HEAD")
            if close:
                conn.close()
                return
    except (Closed, OSError, ValueError):
        pass
    finally:
        try:
            conn.close()
        except OSError:
            pass


threading.Thread(target=control, daemon=True).start()
reply({"ready": ls.getsockname()[1]})
while True:
    c, _ = ls.accept()
    with lock:
        totals["conns"] += 1
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


class BackendProcess:
    """One backend process. `name` is its body and X-Backend value; `zone` and `weight` are
    only carried for rconfig(). Binds host:port (port 0 = the kernel picks one)."""

    def __init__(self, name, host="127.0.0.1", port=0, zone=None, weight=None):
        self.name = name
        self.host = host
        self.zone = zone
        self.weight = weight
        self.proc = None
        self.port = port
        self._spawn(port)

    # -- lifecycle -----------------------------------------------------------------------

    def _spawn(self, port):
        self.proc = subprocess.Popen(
            [PYTHON, "-c", BACKEND_SRC, self.name, self.host, str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            close_fds=True)
        self._buf = b""
        self.stopped = False
        line = self._readline(START_TIMEOUT)
        if line is None or line.startswith("BINDFAIL"):
            self._reap()
            raise OSError("backend %s could not bind %s:%s: %s"
                          % (self.name, self.host, port, line))
        self.port = json.loads(line)["ready"]
        self.addr = "%s:%d" % (self.host, self.port)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig):
        if self.alive():
            os.kill(self.proc.pid, sig)

    def kill(self):
        """SIGKILL (a crash): its port refuses connections from now on."""
        self._signal(signal.SIGKILL)
        self._reap()

    def pause(self):
        """SIGSTOP (a real hang): connections are still accepted by the kernel, nothing is
        read or answered."""
        self._signal(signal.SIGSTOP)

    def resume(self):
        self._signal(signal.SIGCONT)

    def restart(self, timeout=5.0):
        """A fresh process on the same host:port (counts start from zero)."""
        self.kill()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._spawn(self.port)
                return self
            except OSError:
                if time.monotonic() >= deadline:
                    raise

    def stop(self):
        """Ends the process by PID (SIGCONT first so a paused one can die too)."""
        if self.proc is None:
            return
        if self.alive():
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap()

    def _reap(self):
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.stopped = True

    # -- control -------------------------------------------------------------------------

    def _readline(self, timeout):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], left)
            if r:
                data = os.read(fd, 65536)
                if not data:
                    return None
                self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def ctl(self, **cmd):
        if not self.alive():
            raise RuntimeError("backend %s (pid %d) is not running" % (self.name, self.pid))
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        line = self._readline(CTL_TIMEOUT)
        if line is None:
            raise RuntimeError("backend %s (pid %d) did not answer %r (stopped?)"
                               % (self.name, self.pid, cmd))
        doc = json.loads(line)
        if "error" in doc:
            raise RuntimeError("backend %s: %s" % (self.name, doc["error"]))
        return doc

    def set_mode(self, mode="ok", status=None, delay=None, path=None, every=None):
        """Mode for every path (which also drops per-path modes), or for `path` only.
        status: the answer of mode "status", given to every `every`-th request only when
        set; delay: seconds of mode "slow"."""
        assert mode in ("ok", "status", "slow", "hang", "close", "reset"), mode
        self.ctl(op="mode", mode=mode, status=status, delay=delay, path=path, every=every)

    def stats(self):
        """{"counts": {"GET /x": n, ...}, "conns": accepted connections, "requests": n}"""
        return self.ctl(op="stats")

    def count(self, path=None, method=None, exclude=("/healthz",)):
        """Requests received (their heads read), optionally only for one path / method;
        paths in `exclude` (health checks) are not counted unless asked for by `path`."""
        n = 0
        for key, v in self.stats()["counts"].items():
            m, _, p = key.partition(" ")
            if path is not None and p != path:
                continue
            if path is None and p in exclude:
                continue
            if method is not None and m != method:
                continue
            n += v
        return n

    def zero(self):
        self.ctl(op="zero")

    def __repr__(self):
        return "<backend %s %s pid %d>" % (self.name, self.addr, self.pid)


# ---------------------------------------------------------------------------------------------
# dnsmasq.


def _qname(name):
    out = b""
    for part in name.rstrip(".").split("."):
        out += bytes([len(part)]) + part.encode()
    return out + b"\0"


def _skip_name(msg, i):
    while True:
        n = msg[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += 1 + n


def _read_name(msg, i):
    labels = []
    while True:
        n = msg[i]
        if n == 0:
            return ".".join(labels)
        if n & 0xC0 == 0xC0:
            i = ((n & 0x3F) << 8) | msg[i + 1]
            continue
        labels.append(msg[i + 1:i + 1 + n].decode())
        i += 1 + n


def dns_query(port, name, qtype="A", timeout=0.5):
    """Asks 127.0.0.1:port over UDP. Returns (rcode, answers): answers are IP strings for A,
    (priority, weight, port, target) tuples for SRV. Raises OSError on no answer."""
    code = {"A": 1, "SRV": 33}[qtype]
    qid = os.getpid() & 0xFFFF
    pkt = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + _qname(name) + struct.pack(
        ">HH", code, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(pkt, ("127.0.0.1", port))
        msg = s.recv(4096)
    _, flags, qd, an, _, _ = struct.unpack(">HHHHHH", msg[:12])
    i = 12
    for _ in range(qd):
        i = _skip_name(msg, i) + 4
    out = []
    for _ in range(an):
        i = _skip_name(msg, i)
        rtype, _, _, rdlen = struct.unpack(">HHIH", msg[i:i + 10])
        i += 10
        rdata = msg[i:i + rdlen]
        if rtype == 1 and code == 1:
            out.append(socket.inet_ntoa(rdata))
        elif rtype == 33 and code == 33:
            prio, weight, port_ = struct.unpack(">HHH", rdata[:6])
            out.append((prio, weight, port_, _read_name(msg, i + 6)))
        i += rdlen
    return flags & 0xF, out


class Dnsmasq:
    """dnsmasq on 127.0.0.1:<free port>: A records from a hosts file ({name: [ip, ...]}),
    SRV records from --srv-host ([(service, target, port, priority, weight)]), TTL 1 s.
    Names must end in .test (the zone it answers for)."""

    def __init__(self, tmpdir, hosts=None, srv=()):
        if not (os.path.isfile(DNSMASQ) and os.access(DNSMASQ, os.X_OK)):
            pytest.fail("%s not found (apt-get install dnsmasq-base)" % DNSMASQ, pytrace=False)
        self.dir = str(tmpdir)
        self.hosts_path = os.path.join(self.dir, "dns-hosts-%d" % id(self))
        self.log_path = self.hosts_path + ".log"
        self.proc = None
        self.port = None
        self.srv = list(srv)
        self._write_hosts(hosts or {})
        for attempt in range(5):
            self.port = free_port()
            if self._start():
                return
        pytest.fail("dnsmasq did not start:\n%s" % self.log_text()[-2000:], pytrace=False)

    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _write_hosts(self, hosts):
        self.hosts = {k: list(v) for k, v in hosts.items()}
        tmp = self.hosts_path + ".tmp"
        with open(tmp, "w") as f:
            for name, ips in hosts.items():
                for ip in ips:
                    f.write("%s %s\n" % (ip, name))
        os.replace(tmp, self.hosts_path)

    def _start(self, timeout=START_TIMEOUT):
        args = [DNSMASQ, "--no-daemon", "--port=%d" % self.port, "--listen-address=127.0.0.1",
                "--bind-interfaces", "--no-resolv", "--no-hosts",
                "--addn-hosts=%s" % self.hosts_path, "--local-ttl=1", "--conf-file=/dev/null",
                # Authoritative for .test, as a real zone's server: an A-only name gets an
                # empty AAAA answer (NODATA) and an unknown name NXDOMAIN, not REFUSED.
                "--local=/test/"]
        for service, target, port, prio, weight in self.srv:
            args.append("--srv-host=%s,%s,%d,%d,%d" % (service, target, port, prio, weight))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                dns_query(self.port, "probe.invalid", timeout=0.2)
                return True
            except OSError:
                time.sleep(0.02)
        self.stop()
        return False

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid

    def set_hosts(self, hosts, timeout=5.0):
        """Rewrites the hosts file, SIGHUP, and waits until dnsmasq answers the new set (no
        address for a name that was dropped)."""
        old = set(self.hosts)
        self._write_hosts(hosts)
        os.kill(self.proc.pid, signal.SIGHUP)
        for name in old | set(hosts):
            want = sorted(hosts.get(name, []))
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if sorted(dns_query(self.port, name)[1]) == want:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "dnsmasq still answers the old set"
                time.sleep(0.02)

    def set_srv(self, srv):
        """New SRV records: dnsmasq is restarted on the same port."""
        self.stop()
        self.srv = list(srv)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._start():
            assert time.monotonic() < deadline, "dnsmasq did not restart on port %d:\n%s" % (
                self.port, self.log_text()[-2000:])

    def kill(self):
        self.stop(signal.SIGKILL)

    def stop(self, sig=signal.SIGTERM):
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


# ---------------------------------------------------------------------------------------------
# The fixture: every process started here is stopped by PID at teardown.


class Peers:
    def __init__(self, tmpdir):
        self.tmpdir = tmpdir
        self.started = []
        self.n = 0

    def backend(self, name=None, host="127.0.0.1", port=0, zone=None, weight=None):
        self.n += 1
        b = BackendProcess(name or "b%d" % self.n, host, port, zone, weight)
        self.started.append(b)
        return b

    def backends(self, n, prefix="b", **kw):
        """n backends named prefix1..prefixN, started in parallel."""
        out = [None] * n
        errs = []

        def one(i):
            try:
                out[i] = BackendProcess("%s%d" % (prefix, i + 1), **kw)
            except Exception as e:  # noqa: BLE001 - reported below
                errs.append(e)

        ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(START_TIMEOUT + 5)
        self.started.extend(b for b in out if b is not None)
        if errs:
            raise errs[0]
        return out

    def same_port_group(self, hosts, prefix="d"):
        """One backend per host (127.0.0.2, 127.0.0.3, ...) all on the same port, as DNS A
        records need. The port is picked by the kernel for the first; on a clash with
        another process the whole group is started again on another port."""
        for attempt in range(10):
            group = []
            try:
                first = BackendProcess("%s%d" % (prefix, 1), hosts[0], 0)
                group.append(first)
                for i, h in enumerate(hosts[1:], 2):
                    group.append(BackendProcess("%s%d" % (prefix, i), h, first.port))
            except OSError:
                for b in group:
                    b.stop()
                continue
            self.started.extend(group)
            return group
        raise OSError("could not bind one port on %s" % (hosts,))

    def dnsmasq(self, hosts=None, srv=()):
        d = Dnsmasq(self.tmpdir, hosts, srv)
        self.started.append(d)
        return d

    def finish(self):
        for p in self.started:
            try:
                p.stop()
            except Exception:  # noqa: BLE001 - stop the others regardless
                pass
        self.started = []


@pytest.fixture
def rpeers(tmp_path):
    """Peers(tmp_path): .backend(), .backends(n), .same_port_group(hosts), .dnsmasq(); every
    process is stopped by PID at teardown, whatever the test did."""
    p = Peers(tmp_path)
    yield p
    p.finish()


# ---------------------------------------------------------------------------------------------
# Load.


Result = collections.namedtuple(
    "Result", "start end latency status backend error body retry_after thread")


class Summary:
    """Records of finished requests. `start`/`end` are wall-clock (time.time()) so they
    compare with the gateway's log timestamps; `latency` is monotonic seconds. A client-visible
    failure is a connection error (`error` set, `status` None) or a 5xx."""

    def __init__(self, results):
        self.results = sorted(results, key=lambda r: r.start)

    def __len__(self):
        return len(self.results)

    @property
    def total(self):
        return len(self.results)

    @property
    def statuses(self):
        return collections.Counter(r.status for r in self.results if r.status is not None)

    @property
    def backends(self):
        return collections.Counter(r.backend for r in self.results if r.backend)

    @property
    def errors(self):
        return [r for r in self.results if r.error is not None]

    @property
    def failures(self):
        return [r for r in self.results if r.error is not None or r.status >= 500]

    def with_status(self, status):
        return [r for r in self.results if r.status == status]

    def between(self, t0=None, t1=None):
        """Requests started in [t0, t1) (wall clock)."""
        return Summary([r for r in self.results
                        if (t0 is None or r.start >= t0) and (t1 is None or r.start < t1)])

    def since(self, t0):
        return self.between(t0, None)

    def last(self, seconds):
        if not self.results:
            return self
        return self.since(self.results[-1].start - seconds)

    def slow(self, threshold):
        return [r for r in self.results if r.latency >= threshold]

    def share(self, names):
        """Fraction of the answers (with an X-Backend) given by backends in `names`."""
        names = {getattr(n, "name", n) for n in names}
        b = self.backends
        total = sum(b.values())
        return sum(v for k, v in b.items() if k in names) / total if total else 0.0

    def first_from(self, name):
        name = getattr(name, "name", name)
        for r in self.results:
            if r.backend == name:
                return r
        return None

    def latency_max(self):
        return max((r.latency for r in self.results), default=0.0)

    def describe(self, failures=5):
        s = "%d requests, statuses %s, backends %s, errors %d" % (
            self.total, dict(self.statuses), dict(self.backends), len(self.errors))
        if self.results:
            s += ", max latency %.3fs" % self.latency_max()
        fl = self.failures[:failures]
        if fl:
            s += "; first failures: " + "; ".join(
                "%s %s %r" % (time.strftime("%H:%M:%S", time.gmtime(r.start))
                              + ".%03d" % int(r.start % 1 * 1000), r.status or r.error,
                              (r.body or b"")[:120]) for r in fl)
        return s

    __repr__ = describe


class Load:
    """`threads` keep-alive clients (http.client) send requests to 127.0.0.1:port until
    `duration` seconds passed or `count` requests were sent in all (whichever first; at
    least one of them must be given; never more than LOAD_HARD_CAP seconds), or stop().
    `rate` (requests/s over all threads) paces them; None = back to back. `path` may be a
    callable (thread index, request number) -> path, `headers` a dict. A connection error
    is recorded (error = exception name) and the next request opens a new connection.

        with Load(gw.port, threads=4, rate=200, duration=5) as load:
            ...                  # load.snapshot() while it runs
        s = load.summary()       # after the with block: stopped and joined
    """

    def __init__(self, port, threads=4, duration=None, count=None, rate=None, method="GET",
                 path="/", headers=None, body=None, timeout=5.0):
        assert duration is not None or count is not None, "a load must be bounded"
        self.port = port
        self.threads = threads
        self.duration = min(duration if duration is not None else LOAD_HARD_CAP, LOAD_HARD_CAP)
        self.count = count
        self.rate = rate
        self.method = method
        self.path = path
        self.headers = dict(headers or {})
        self.body = body
        self.timeout = timeout
        self._lock = threading.Lock()
        self._results = []
        self._sent = 0
        self._stop = threading.Event()
        self._ts = []
        self.started_at = None

    def _next_ticket(self):
        with self._lock:
            if self.count is not None and self._sent >= self.count:
                return None
            self._sent += 1
            return self._sent

    def _run(self, idx):
        conn = None
        interval = (self.threads / self.rate) if self.rate else 0.0
        t_begin = time.monotonic()
        deadline = t_begin + self.duration
        k = 0
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                if interval:
                    due = t_begin + interval * (k + idx / self.threads)
                    delay = due - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        break
                    if time.monotonic() >= deadline:
                        break
                k += 1
                n = self._next_ticket()
                if n is None:
                    break
                path = self.path(idx, n) if callable(self.path) else self.path
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                      timeout=self.timeout)
                wall0 = time.time()
                m0 = time.monotonic()
                status = backend = error = body = retry_after = None
                try:
                    conn.request(self.method, path, body=self.body, headers=self.headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status = resp.status
                    backend = resp.getheader("X-Backend")
                    retry_after = resp.getheader("Retry-After")
                    if status >= 400:
                        body = data[:500]
                    if resp.will_close:
                        conn.close()
                        conn = None
                except (OSError, http.client.HTTPException) as e:
                    error = type(e).__name__
                    try:
                        conn.close()
                    except OSError:
                        pass
                    conn = None
                r = Result(wall0, time.time(), time.monotonic() - m0, status, backend, error,
                           body, retry_after, idx)
                with self._lock:
                    self._results.append(r)
        finally:
            if conn is not None:
                conn.close()

    def start(self):
        self.started_at = time.time()
        self._ts = [threading.Thread(target=self._run, args=(i,), daemon=True)
                    for i in range(self.threads)]
        for t in self._ts:
            t.start()
        return self

    def stop(self):
        self._stop.set()
        return self.join()

    def join(self):
        for t in self._ts:
            t.join(self.duration + self.timeout + 10)
        assert not any(t.is_alive() for t in self._ts), "load threads did not end"
        return self.summary()

    def running(self):
        return any(t.is_alive() for t in self._ts)

    def snapshot(self):
        with self._lock:
            return Summary(list(self._results))

    summary = snapshot

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def run_load(port, **kw):
    """Runs a Load to its end; returns its Summary."""
    load = Load(port, **kw).start()
    return load.join()


# ---------------------------------------------------------------------------------------------
# Polling and the gateway's log.


def until(cond, timeout, what, interval=0.02, diag=None):
    """Polls cond() until truthy; fails with `what` (and diag()) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            extra = ""
            if diag is not None:
                extra = "\n" + (diag() if callable(diag) else str(diag))
            raise AssertionError("not within %.1fs: %s%s" % (timeout, what, extra))
        time.sleep(interval)


def wait_until_wall(t):
    """Returns once the wall clock passed t (for windows measured from a log timestamp)."""
    left = t - time.time()
    if left > 0:
        time.sleep(left)


_TS = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{3})Z ")
# "upstream U endpoint A: ejected for 1s (3 consecutive failures)",
# "upstream U endpoint A: probe failed, ejected for 2s", "...: probe succeeded, back in rotation"
_EJECT = re.compile(r"upstream (\S+) endpoint (\S+?): (?:[^:]*\b)?ejected for (\S+)")
_BACK = re.compile(r"upstream (\S+) endpoint (\S+?): (?:[^:]*\b)?back in rotation")

LogEvent = collections.namedtuple("LogEvent", "time upstream endpoint duration line")


def _line_time(line):
    m = _TS.match(line)
    if not m:
        return None
    y, mo, d, h, mi, s, ms = (int(x) for x in m.groups())
    return calendar.timegm((y, mo, d, h, mi, s)) + ms / 1000.0


def parse_duration(text):
    """'1s' / '1500ms' / '2m' / '1.5s' -> seconds."""
    m = re.match(r"^(\d+(?:\.\d+)?)(ms|s|m|h)\b", text)
    if not m:
        return None
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _events(gw, rx, endpoint, upstream):
    out = []
    for line in gw.stderr_text().splitlines():
        m = rx.search(line)
        if not m:
            continue
        ep = m.group(2).rstrip(":")
        if endpoint is not None and ep != getattr(endpoint, "addr", endpoint):
            continue
        if upstream is not None and m.group(1) != upstream:
            continue
        dur = parse_duration(m.group(3)) if m.lastindex >= 3 else None
        out.append(LogEvent(_line_time(line), m.group(1), ep, dur, line))
    return out


def ejections(gw, endpoint=None, upstream=None):
    """`ejected for D` log lines (optionally of one endpoint: a backend or "ip:port")."""
    return _events(gw, _EJECT, endpoint, upstream)


def restorations(gw, endpoint=None, upstream=None):
    """`back in rotation` log lines."""
    return _events(gw, _BACK, endpoint, upstream)


def wait_ejected(gw, endpoint, timeout, n=1):
    """Waits for the n-th ejection of `endpoint`; returns its LogEvent."""
    evs = until(lambda: (lambda e: e if len(e) >= n else None)(ejections(gw, endpoint)),
                timeout, "ejection #%d of %s logged" % (n, getattr(endpoint, "addr", endpoint)),
                diag=gw.diag)
    return evs[n - 1]


def wait_restored(gw, endpoint, timeout, n=1):
    evs = until(lambda: (lambda e: e if len(e) >= n else None)(restorations(gw, endpoint)),
                timeout, "%s back in rotation (#%d) logged"
                % (getattr(endpoint, "addr", endpoint), n), diag=gw.diag)
    return evs[n - 1]


def gateway_error(result):
    """The `error` field of a gateway JSON error recorded by the load generator, or None."""
    try:
        return json.loads(result.body.decode()).get("error")
    except (ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# Configs.


def endpoint_yaml(b):
    """A flow mapping for one endpoint: a BackendProcess (its zone / weight) or "ip:port"."""
    if isinstance(b, str):
        return "{address: %s}" % b
    parts = ["address: %s" % b.addr]
    if b.zone:
        parts.append("zone: %s" % b.zone)
    if b.weight:
        parts.append("weight: %d" % b.weight)
    return "{%s}" % ", ".join(parts)


def _block(text, indent):
    """Re-indents YAML: a string, or a list of strings each dedented on its own."""
    if not isinstance(text, str):
        return "\n".join(_block(t, indent) for t in text if t.strip())
    text = textwrap.dedent(text).strip("\n")
    return "\n".join((" " * indent + ln) if ln.strip() else ln for ln in text.split("\n"))


def rconfig(endpoints=(), upstream="", route="", top="", workers=2, balance=None,
            drain_timeout="3s", routes=None):
    """One upstream `users` with `endpoints` (backends or "ip:port"; none when discovery
    provides them) behind the catch-all route `all`. `upstream` and `route` are YAML blocks
    (any indentation; re-indented under the upstream / route), or lists of such blocks
    (each dedented on its own), `top` top-level YAML;
    `routes` replaces the route list (YAML items indented by two spaces)."""
    up = "  - name: users\n"
    if balance:
        up += "    balance: %s\n" % balance
    if endpoints:
        up += "    endpoints:\n" + "".join("      - %s\n" % endpoint_yaml(b) for b in endpoints)
    if _block(upstream, 4).strip():
        up += _block(upstream, 4) + "\n"
    if routes is None:
        routes = "  - name: all\n    match: {path_prefix: /}\n    upstream: users\n"
        if _block(route, 4).strip():
            routes += _block(route, 4) + "\n"
    return simple_config(routes, up, workers=workers, drain_timeout=drain_timeout,
                         global_extra=textwrap.dedent(top).strip("\n"))


def names(backends):
    return {b.name for b in backends}
