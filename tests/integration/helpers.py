"""Helpers for the sluice integration tests: the gateway process, backend factories,
config templates, RSS sampling.

The binary comes from env SLUICE_BIN (default <repo>/build/release/sluice). Configs are inline
YAML templates: `$PORT_<name>` placeholders get a free 127.0.0.1 port each (the gateway is
polled until every one of them accepts), other `$NAME` placeholders come from keyword
arguments (backend addresses and the like).
"""

import contextlib
import http.client
import os
import re
import signal
import socket
import string
import subprocess
import sys
import time

import pytest

from client import RawClient, build_request
from peers import Backend, free_port

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SLUICE_BIN = os.environ.get("SLUICE_BIN") or os.path.join(REPO, "build", "release", "sluice")
START_TIMEOUT = 10.0
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")

_asan_cache = {}


def is_sanitizer_build(path=SLUICE_BIN):
    """True when the binary was built with ASan (its RSS is then meaningless)."""
    if path not in _asan_cache:
        try:
            with open(path, "rb") as f:
                _asan_cache[path] = b"__asan_init" in f.read()
        except OSError:
            _asan_cache[path] = False
    return _asan_cache[path]


def sluice_env():
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    return env


def require_binary():
    if not (os.path.isfile(SLUICE_BIN) and os.access(SLUICE_BIN, os.X_OK)):
        pytest.fail("sluice binary not found at %s (build it with `make MODE=release all` or "
                    "set SLUICE_BIN)" % SLUICE_BIN, pytrace=False)
    return SLUICE_BIN


def run_cli(args, timeout=10.0):
    """Runs the binary to completion (for -t, --version, --help)."""
    require_binary()
    return subprocess.run([SLUICE_BIN] + list(args), capture_output=True, timeout=timeout,
                          env=sluice_env(), text=True)


@contextlib.contextmanager
def stalled_listener():
    """A listener on 127.0.0.1 whose accept queue is full, so the kernel drops further SYNs and
    a connect to it never completes. Yields its port; skips the test when the kernel accepts
    past the backlog anyway."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(srv.getsockname())
            fillers.append(s)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(srv.getsockname())
            pytest.skip("kernel accepted past the backlog; cannot stage a hanging connect")
        except (socket.timeout, OSError):
            pass
        finally:
            probe.close()
        yield srv.getsockname()[1]
    finally:
        for s in fillers:
            s.close()
        srv.close()


def http_get(port, path, headers=None, timeout=5.0):
    """One GET of `path` from 127.0.0.1:`port` on a connection of its own: (status, body,
    {header: value}). Connection errors propagate (OSError)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read(), dict(r.getheaders())
    finally:
        c.close()


def admin_get(g, path, timeout=5.0):
    """http_get of `path` from gateway `g`'s admin listener."""
    return http_get(g.ports["admin"], path, timeout=timeout)


def can_connect(port, timeout=0.2):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False



def read_response(s, timeout=5.0):
    """Reads one response with a Content-Length body from socket `s`; b"" when the gateway
    closed (or reset) the connection without a byte."""
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while True:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", data[:end])
                if len(data) >= end + 4 + (int(m.group(1)) if m else 0):
                    return data
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data

def poll(cond, timeout, interval=0.01, what="condition"):
    """Polls cond() until truthy or the deadline; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


class Gateway:
    def __init__(self, proc, config_path, config_text, ports, stdout_path, stderr_path):
        self.proc = proc
        self.pid = proc.pid
        self.config_path = config_path
        self.config_text = config_text
        self.ports = ports
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self.stopped = False
        self.exit_code = None

    @property
    def port(self):
        if "public" in self.ports:
            return self.ports["public"]
        return next(iter(self.ports.values()))

    def connect(self, listener=None, timeout=5.0):
        return RawClient(self.ports[listener] if listener else self.port, timeout=timeout)

    def request(self, method="GET", target="/", headers=None, body=b"", listener=None,
                timeout=5.0, **kw):
        """One request on a fresh connection; returns the Response."""
        with self.connect(listener, timeout) as c:
            c.send(build_request(method, target, headers, body, **kw))
            return c.read_response(head=(method == "HEAD"))

    def alive(self):
        return self.proc.poll() is None

    def rss_kib(self):
        """VmRSS of the gateway process in KiB (None when it is gone)."""
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def stderr_text(self):
        try:
            with open(self.stderr_path, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def diag(self, tail=3000):
        return "\n--- sluice stderr (tail) ---\n" + self.stderr_text()[-tail:]

    def sanitizer_lines(self):
        return [ln for ln in self.stderr_text().splitlines()
                if any(m in ln for m in SANITIZER_MARKS)]

    def signal(self, sig):
        os.kill(self.pid, sig)

    def wait_exit(self, timeout):
        try:
            self.exit_code = self.proc.wait(timeout=timeout)
            self.stopped = True
        except subprocess.TimeoutExpired:
            return None
        return self.exit_code

    def stop(self, timeout=15.0):
        """SIGTERM, bounded wait, SIGKILL as a last resort. Returns the exit code (negative
        for a signal, None when it had to be killed)."""
        if self.stopped:
            return self.exit_code
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.wait_exit(timeout) is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
            self.stopped = True
            self.exit_code = None
        return self.exit_code


class GatewayFactory:
    def __init__(self, tmpdir):
        self.tmpdir = str(tmpdir)
        self.started = []
        self.n = 0

    def start(self, template, wait=True, **subs):
        """Writes the config and starts `sluice -c FILE`; returns a Gateway once every
        `$PORT_<name>` listener accepts connections (bounded by START_TIMEOUT)."""
        require_binary()
        names = sorted(set(re.findall(r"\$\{?PORT_([A-Za-z0-9_]+)", template)))
        last_err = None
        for attempt in range(3):
            ports = {n: free_port() for n in names}
            mapping = {"PORT_" + n: str(p) for n, p in ports.items()}
            mapping.update({k: str(v) for k, v in subs.items()})
            text = string.Template(template).substitute(mapping)
            self.n += 1
            base = os.path.join(self.tmpdir, "sluice-%d" % self.n)
            cfg = base + ".yaml"
            with open(cfg, "w") as f:
                f.write(text)
            out_path, err_path = base + ".stdout", base + ".stderr"
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen([SLUICE_BIN, "-c", cfg], stdout=out, stderr=err,
                                        stdin=subprocess.DEVNULL, env=sluice_env())
            gw = Gateway(proc, cfg, text, ports, out_path, err_path)
            self.started.append(gw)
            if not wait:
                return gw
            deadline = time.monotonic() + START_TIMEOUT
            pending = set(ports.values())
            while pending and time.monotonic() < deadline and proc.poll() is None:
                pending = {p for p in pending if not can_connect(p)}
                if pending:
                    time.sleep(0.02)
            if not pending and proc.poll() is None:
                return gw
            if proc.poll() is None:
                gw.stop()
                pytest.fail("sluice did not accept on %s within %.0fs%s"
                            % (sorted(pending), START_TIMEOUT, gw.diag()), pytrace=False)
            gw.stopped, gw.exit_code = True, proc.returncode
            last_err = gw.stderr_text()
            if "in use" in last_err.lower() and attempt < 2:
                self.started.remove(gw)
                continue  # a port was taken between picking and binding; pick again
            pytest.fail("sluice exited with %s during start-up; config:\n%s\nstderr:\n%s"
                        % (proc.returncode, text, last_err[-3000:]), pytrace=False)
        pytest.fail("sluice could not bind its ports: %s" % last_err, pytrace=False)

    def finish(self):
        """Stops every gateway still running; returns a list of problems (bad exit code,
        sanitizer reports)."""
        problems = []
        for gw in self.started:
            was_stopped = gw.stopped
            code = gw.stop()
            if not was_stopped and code != 0:
                problems.append("sluice pid %d exited with %r after SIGTERM%s"
                                % (gw.pid, code, gw.diag()))
            san = gw.sanitizer_lines()
            if san:
                problems.append("sanitizer reports from pid %d:\n%s%s"
                                % (gw.pid, "\n".join(san[:20]), gw.diag(6000)))
        self.started = []
        return problems


class BackendFactory:
    def __init__(self):
        self.started = []

    def __call__(self, mode="echo", **opts):
        b = Backend(mode, **opts)
        self.started.append(b)
        return b

    def finish(self):
        for b in self.started:
            b.stop()
        self.started = []


def simple_config(routes, upstreams="", limits="", workers=2, drain_timeout="3s",
                  extra_listeners="", global_extra=""):
    """A one-listener config (`public` on $PORT_public). `routes` and `upstreams` are YAML
    list items indented by two spaces; `limits` is a flow mapping for the listener."""
    lines = [
        "workers: %s" % workers,
        "drain_timeout: %s" % drain_timeout,
        "log_level: info",
    ]
    if global_extra:
        lines.append(global_extra.rstrip("\n"))
    lines += ["listeners:", "  - name: public", "    address: 127.0.0.1:$PORT_public"]
    if limits:
        lines.append("    limits: %s" % limits)
    if extra_listeners:
        lines.append(extra_listeners.rstrip("\n"))
    if upstreams.strip():
        lines += ["upstreams:", upstreams.rstrip("\n")]
    lines += ["routes:", routes.rstrip("\n")]
    return "\n".join(lines) + "\n"


def proxy_config(limits="", upstream_extra="", route_extra="", workers=2, drain_timeout="3s",
                 endpoints="      - {address: $B1}"):
    """One upstream `app` (endpoints default to $B1) behind one catch-all route."""
    upstreams = "  - name: app\n    endpoints:\n" + endpoints.rstrip("\n") + "\n"
    if upstream_extra:
        upstreams += upstream_extra.rstrip("\n") + "\n"
    routes = "  - name: all\n    match: {path_prefix: /}\n    upstream: app\n"
    if route_extra:
        routes += route_extra.rstrip("\n") + "\n"
    return simple_config(routes, upstreams, limits=limits, workers=workers,
                         drain_timeout=drain_timeout)


class RssSampler:
    """Samples a process's VmRSS in a thread; .max_kib after stop()."""

    def __init__(self, gw, interval=0.05):
        import threading

        self.gw = gw
        self.interval = interval
        self.max_kib = gw.rss_kib() or 0
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            v = self.gw.rss_kib()
            if v is not None:
                self.samples += 1
                self.max_kib = max(self.max_kib, v)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)
