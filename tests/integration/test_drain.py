"""SIGTERM: stop accepting, finish requests in flight, close idle connections, exit 0 within
drain_timeout."""

import signal
import threading
import time

from client import build_request
from helpers import admin_get, can_connect, poll, proxy_config


def start_request(gw, target, result, timeout=15):
    def run():
        try:
            with gw.connect(timeout=timeout) as c:
                c.send(build_request("GET", target))
                result["resp"] = c.read_response(timeout=timeout)
                result["t"] = time.monotonic()
                result["closed_after"] = c.closed(timeout=3)
        except Exception as e:  # noqa: BLE001 - asserted by the test
            result["err"] = repr(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sigterm_drains_inflight_request(gateway, backend):
    b = backend("slow", delay="1")
    g = gateway(proxy_config(drain_timeout="5s", upstream_extra="    timeouts: {response: 10s}"),
                B1=b.addr)
    result = {}
    t = start_request(g, "/slow", result)
    assert b.wait_requests(1, timeout=5), "request never reached the backend"
    t_term = time.monotonic()
    g.signal(signal.SIGTERM)
    refused = poll(lambda: not can_connect(g.port), timeout=2)
    t_refused = time.monotonic()
    assert refused, "still accepting connections 2 s after SIGTERM"
    t.join(15)
    assert "err" not in result, result
    r = result["resp"]
    assert r.status == 200, r
    assert r.json()["path"] == "/slow"
    assert t_refused < result["t"], "listener was only closed after the in-flight request ended"
    assert result["closed_after"], "connection not closed after the drained response"
    code = g.wait_exit(timeout=6)
    assert code == 0, (code, g.diag())
    assert time.monotonic() - t_term < 5.0


def test_sigterm_with_idle_keepalive_connection_exits_promptly(gateway, backend):
    b = backend()
    g = gateway(proxy_config(drain_timeout="10s"), B1=b.addr)
    with g.connect(timeout=10) as c:
        assert c.request("GET", "/idle").status == 200
        t_term = time.monotonic()
        g.signal(signal.SIGTERM)
        assert c.wait_closed(timeout=5)[0], "idle keep-alive connection not closed on drain"
        code = g.wait_exit(timeout=10)
    assert code == 0, (code, g.diag())
    assert time.monotonic() - t_term < 3.0, "idle connections held the drain"


def test_drain_timeout_bounds_shutdown(gateway, backend):
    b = backend("hang")
    g = gateway(proxy_config(drain_timeout="1s", upstream_extra="    timeouts: {response: 30s}"),
                B1=b.addr)
    result = {}
    t = start_request(g, "/hang", result, timeout=10)
    assert b.wait_requests(1, timeout=5)
    t_term = time.monotonic()
    g.signal(signal.SIGTERM)
    code = g.wait_exit(timeout=6)
    elapsed = time.monotonic() - t_term
    t.join(10)
    assert code is not None, "still running 6 s after SIGTERM with drain_timeout: 1s"
    assert 0.8 <= elapsed < 3.0, elapsed
    assert code == 0, (code, g.diag())
    # The hung request was cut (or answered with an error), not left open.
    assert "resp" not in result or result["resp"].status >= 500, result


GRACE_CONFIG = """workers: 2
drain_timeout: 5s
drain: {grace: $GRACE}
admin: {address: 127.0.0.1:$PORT_admin}
listeners:
  - name: public
    address: 127.0.0.1:$PORT_public
upstreams:
  - name: app
    endpoints: [{address: $B1}]
    timeouts: {response: 10s}
routes:
  - {name: all, match: {path_prefix: /}, upstream: app}
"""


def admin_status(g, path):
    """The admin API's status for `path`; None once the gateway no longer answers."""
    try:
        return admin_get(g, path, timeout=2)[0]
    except OSError:
        return None


def test_sigterm_fails_ready_first_and_serves_through_grace(gateway, backend):
    b = backend()
    g = gateway(GRACE_CONFIG, GRACE="1500ms", B1=b.addr)
    assert admin_status(g, "/ready") == 200
    t_term = time.monotonic()
    g.signal(signal.SIGTERM)
    assert poll(lambda: admin_status(g, "/ready") == 503, 1.0), "/ready did not flip at once"
    assert time.monotonic() - t_term < 1.0
    # During the grace period new connections are still accepted and served.
    served = 0
    while time.monotonic() - t_term < 1.0:
        with g.connect(timeout=5) as c:
            c.send(build_request("GET", "/grace"))
            assert c.read_response().status == 200
            served += 1
    assert served > 0
    assert poll(lambda: not can_connect(g.port), 3), "still accepting after the grace period"
    assert time.monotonic() - t_term >= 1.4, "stopped accepting before the grace period ended"
    assert g.wait_exit(timeout=8) == 0, g.diag()


def test_ready_flips_before_inflight_request_finishes(gateway, backend):
    b = backend("slow", delay="1.5")
    g = gateway(GRACE_CONFIG, GRACE="0s", B1=b.addr)
    result = {}
    t = start_request(g, "/slow", result)
    assert b.wait_requests(1, timeout=5)
    g.signal(signal.SIGTERM)
    assert poll(lambda: admin_status(g, "/ready") in (503, None), 1.0)
    assert "resp" not in result, "the in-flight request ended before /ready flipped"
    t.join(15)
    assert "err" not in result, result
    assert result["resp"].status == 200
    assert result["resp"].header("connection") == "close", result["resp"].headers
    assert g.wait_exit(timeout=8) == 0, g.diag()


class NoticeServer:
    """A stand-in for the instance metadata endpoint: 404 until `notice()`, then 200."""

    def __init__(self):
        import http.server
        owner = self
        self.polls = 0
        self.active = False

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                owner.polls += 1
                if owner.active:
                    body = b'{"action": "terminate", "time": "2026-11-28T20:00:00Z"}'
                    self.send_response(200)
                else:
                    body = b"not found"
                    self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_spot_interruption_notice_starts_the_drain(gateway, backend):
    b = backend()
    ns = NoticeServer()
    try:
        cfg = GRACE_CONFIG.replace(
            "drain: {grace: $GRACE}",
            "drain: {grace: $GRACE, notice_url: "
            "'http://127.0.0.1:$NP/latest/meta-data/spot/instance-action', "
            "notice_interval: 200ms}")
        g = gateway(cfg, GRACE="500ms", NP=ns.port, B1=b.addr)
        assert poll(lambda: ns.polls >= 2, 5), "the notice URL is not polled"
        assert admin_status(g, "/ready") == 200 and g.alive()
        with g.connect(timeout=5) as c:
            c.send(build_request("GET", "/before"))
            assert c.read_response().status == 200
        ns.active = True
        assert poll(lambda: admin_status(g, "/ready") in (503, None), 3), g.diag()
        assert g.wait_exit(timeout=10) == 0, g.diag()
        assert "spot interruption notice" in g.stderr_text()
    finally:
        ns.stop()
