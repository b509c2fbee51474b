"""Shipping access-log segments (`access_log.ship`) to a collector.

The collector is a threaded http.server on 127.0.0.1 that stores every segment it is sent
and decodes it with `zstd -dc`. Covered: with PUT (to url/<segment name>) and POST (to url,
name in X-Sluice-Segment) the records of every request arrive, each segment once, and the
local files are deleted once accepted; the collector down for a while (connections refused)
then up again: nothing is lost or sent twice; segments left on disk by a process that stopped
while the collector was down are shipped by the next start.
"""

import http.server
import json
import os
import re
import subprocess
import threading
import time

import pytest

from helpers import poll, simple_config
from peers import free_port

SEGMENT_NAME = re.compile(
    r"^sluice-\d{8}T\d{6}\.\d{3}Z-\d+-[0-9a-f]{16}-\d+\.jsonl\.zst$")

ROUTES = ("  - name: hello\n"
          "    match: {path_prefix: /}\n"
          "    direct_response: {status: 200, body: \"ok\", content_type: text/plain}\n")


def decode(data):
    r = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, timeout=30)
    assert r.returncode == 0, "zstd -dc: %s" % r.stderr.decode(errors="replace")
    return r.stdout.decode("utf-8")


class Collector:
    """Receives segments on /ingest; `segments` maps name -> decoded text, `problems` lists
    anything unexpected (a bad header, a segment sent twice)."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.lock = threading.Lock()
        self.segments = {}
        self.order = []
        self.problems = []
        self.server = None
        self.thread = None
        self.start()

    def start(self):
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def receive(self, name):
                n = int(self.headers.get("Content-Length", "-1"))
                body = self.rfile.read(n) if n >= 0 else b""
                bad = []
                if n < 0:
                    bad.append("no Content-Length")
                if self.headers.get("Content-Type") != "application/x-ndjson":
                    bad.append("Content-Type %r" % self.headers.get("Content-Type"))
                if self.headers.get("Content-Encoding") != "zstd":
                    bad.append("Content-Encoding %r" % self.headers.get("Content-Encoding"))
                if not name or not SEGMENT_NAME.match(name):
                    bad.append("segment name %r" % name)
                text = decode(body) if not bad else ""
                with collector.lock:
                    if bad:
                        collector.problems.append("%s %s: %s" % (self.command, self.path, bad))
                    elif name in collector.segments:
                        collector.problems.append("%s sent twice" % name)
                    else:
                        collector.segments[name] = text
                        collector.order.append(name)
                self.send_response(400 if bad else 201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_PUT(self):
                prefix = "/ingest/"
                self.receive(self.path[len(prefix):] if self.path.startswith(prefix) else None)

            def do_POST(self):
                ok = self.path == "/ingest"
                self.receive(self.headers.get("X-Sluice-Segment") if ok else None)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        """Closes the listening socket: connections are refused until start()."""
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)
            self.server = None

    def lines(self):
        with self.lock:
            return [ln for text in self.segments.values() for ln in text.splitlines()]

    def paths(self):
        return sorted(json.loads(ln)["path"] for ln in self.lines())


@pytest.fixture
def collector():
    started = []

    def make(port=None):
        c = Collector(port)
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()


def ship_config(logdir, port, method="PUT", backoff_max="2s"):
    extra = ("access_log:\n"
             "  directory: %s\n"
             "  segment: {max_age: 500ms}\n"
             "  flush_interval: 50ms\n"
             "  ship: {url: http://127.0.0.1:%d/ingest, method: %s, timeout: 2s, "
             "backoff_max: %s}" % (logdir, port, method, backoff_max))
    return simple_config(ROUTES, global_extra=extra)


def send(gw, paths):
    for p in paths:
        r = gw.request("GET", p)
        assert r.status == 200, (p, r.status)


def final_segments(logdir):
    return sorted(n for n in os.listdir(logdir) if SEGMENT_NAME.match(n))


def stop_ok(gw):
    code = gw.stop()
    assert code == 0, "exit code %r%s" % (code, gw.diag())


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_segments_reach_the_collector(gateway, collector, tmp_path, method):
    logdir = str(tmp_path / "logs")
    col = collector()
    gw = gateway(ship_config(logdir, col.port, method))
    want = ["/r/%d" % i for i in range(120)]
    send(gw, want)
    assert poll(lambda: len(col.lines()) >= len(want), 20), \
        "collector has %d of %d records%s" % (len(col.lines()), len(want), gw.diag())
    assert col.paths() == sorted(want)
    assert not col.problems, col.problems
    # accepted segments are deleted locally
    assert poll(lambda: final_segments(logdir) == [], 10), final_segments(logdir)
    stop_ok(gw)
    assert col.paths() == sorted(want)  # nothing more came with the stop
    assert col.order == sorted(col.order)  # oldest first
    assert not col.problems, col.problems


def test_collector_down_then_up_nothing_lost(gateway, collector, tmp_path):
    logdir = str(tmp_path / "logs")
    col = collector()
    gw = gateway(ship_config(logdir, col.port))
    first = ["/a/%d" % i for i in range(40)]
    send(gw, first)
    assert poll(lambda: len(col.lines()) >= len(first), 20), gw.diag()

    col.stop()  # connections refused from now on
    second = ["/b/%d" % i for i in range(40)]
    send(gw, second[:20])
    # a closed segment waits on disk while the collector is away, and the failure is logged
    assert poll(lambda: final_segments(logdir), 20), gw.diag()
    assert poll(lambda: "access log shipping: sending" in gw.stderr_text(), 20), gw.diag()
    send(gw, second[20:])
    assert poll(lambda: len(final_segments(logdir)) >= 2, 20), gw.diag()

    col.start()
    want = sorted(first + second)
    assert poll(lambda: len(col.lines()) >= len(want), 30), \
        "collector has %d of %d records%s" % (len(col.lines()), len(want), gw.diag())
    assert poll(lambda: final_segments(logdir) == [], 10), final_segments(logdir)
    assert col.paths() == want  # nothing lost, nothing twice
    assert not col.problems, col.problems
    assert "works again" in gw.stderr_text()
    stop_ok(gw)


def test_leftovers_shipped_by_next_start(gateway, collector, tmp_path):
    logdir = str(tmp_path / "logs")
    port = free_port()  # nobody listens yet: every attempt is refused
    gw = gateway(ship_config(logdir, port, backoff_max="1s"))
    want = ["/left/%d" % i for i in range(30)]
    send(gw, want)
    stop_ok(gw)
    left = final_segments(logdir)
    assert left, "no segment left on disk" + gw.diag()
    assert "stay in %s" % logdir in gw.stderr_text()

    col = collector(port)
    gw2 = gateway(ship_config(logdir, port))
    assert poll(lambda: len(col.lines()) >= len(want), 20), gw2.diag()
    assert col.paths() == sorted(want)
    assert sorted(col.segments) == left
    assert poll(lambda: final_segments(logdir) == [], 10), final_segments(logdir)
    assert not col.problems, col.problems
    stop_ok(gw2)
