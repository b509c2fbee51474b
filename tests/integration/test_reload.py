"""Hot reload (SIGHUP): a new configuration is validated and swapped in for new requests while
requests in flight finish on the old one; listeners come and go; a bad file changes nothing;
a reload under load fails no request; safe-reload rolls a bad change back by itself."""

import http.client
import signal
import threading
import time

from helpers import admin_get, can_connect, http_get, poll

BASE = """workers: 2
drain_timeout: 5s
log_level: info
listeners:
  - name: public
    address: 127.0.0.1:$PORT_public
upstreams:
  - name: a
    endpoints: [{address: $A}]
    timeouts: {response: 10s}
  - name: b
    endpoints: [{address: $B}]
routes:
"""


def write_config(g, text):
    """Replaces the running gateway's config file (atomically, like an editor or ConfigMap)."""
    tmp = g.config_path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    import os
    os.replace(tmp, g.config_path)


def reload_and_wait(g, generation):
    """SIGHUP, then polls the log for the generation going live (or the rejection)."""
    g.signal(signal.SIGHUP)
    ok = "configuration generation %d from" % generation
    assert poll(lambda: ok in g.stderr_text() or "reload rejected" in g.stderr_text(), 10), \
        g.diag()


def subst(g, text, **kw):
    import string
    m = {"PORT_" + n: str(p) for n, p in g.ports.items()}
    m.update({k: str(v) for k, v in kw.items()})
    return string.Template(text).substitute(m)


def test_sighup_adds_and_removes_routes(gateway, backend):
    a, b = backend(), backend()
    cfg1 = BASE + "  - {name: ra, match: {path_prefix: /a}, upstream: a}\n"
    g = gateway(cfg1, A=a.addr, B=b.addr)
    assert http_get(g.port, "/a/1")[0] == 200
    assert http_get(g.port, "/b/1")[0] == 404
    cfg2 = BASE + "  - {name: rb, match: {path_prefix: /b}, upstream: b}\n"
    write_config(g, subst(g, cfg2, A=a.addr, B=b.addr))
    reload_and_wait(g, 2)
    assert "reload rejected" not in g.stderr_text(), g.diag()
    st, body, _ = http_get(g.port, "/b/1")
    assert st == 200 and b.paths() == ["/b/1"], (st, body)
    assert http_get(g.port, "/a/2")[0] == 404, "the removed route still answers"


def test_invalid_config_is_rejected_and_old_one_serves(gateway, backend):
    a, b = backend(), backend()
    cfg1 = BASE + "  - {name: ra, match: {path_prefix: /a}, upstream: a}\n"
    g = gateway(cfg1, A=a.addr, B=b.addr)
    bad = BASE + "  - {name: ra, match: {path_prefix: /a}, upstream: nowhere}\n"
    write_config(g, subst(g, bad, A=a.addr, B=b.addr))
    g.signal(signal.SIGHUP)
    assert poll(lambda: "reload rejected" in g.stderr_text(), 10), g.diag()
    err = g.stderr_text()
    # the error names the file, line and column of the bad key
    assert g.config_path + ":" in err and "upstream" in err and "nowhere" in err, err[-2000:]
    assert http_get(g.port, "/a/still")[0] == 200
    assert g.alive()


def test_inflight_request_finishes_on_old_config(gateway, backend):
    a = backend("slow", delay="1.5")
    b = backend()
    cfg1 = BASE + "  - {name: r, match: {path_prefix: /}, upstream: a}\n"
    g = gateway(cfg1, A=a.addr, B=b.addr)
    result = {}

    def slow():
        try:
            result["r"] = http_get(g.port, "/inflight", timeout=15)
        except Exception as e:  # noqa: BLE001 - asserted below
            result["err"] = repr(e)

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    assert a.wait_requests(1, timeout=5)
    cfg2 = BASE + "  - {name: r, match: {path_prefix: /}, upstream: b}\n"
    write_config(g, subst(g, cfg2, A=a.addr, B=b.addr))
    reload_and_wait(g, 2)
    # new requests go to b while the old one is still running on a
    assert http_get(g.port, "/new")[0] == 200
    assert b.paths() == ["/new"]
    t.join(15)
    assert "err" not in result, result
    assert result["r"][0] == 200 and b"/inflight" in result["r"][1]


def test_keepalive_connection_uses_new_config_for_next_request(gateway, backend):
    a, b = backend(), backend()
    cfg1 = BASE + "  - {name: r, match: {path_prefix: /}, upstream: a}\n"
    g = gateway(cfg1, A=a.addr, B=b.addr)
    with g.connect(timeout=10) as c:
        assert c.request("GET", "/one").status == 200
        cfg2 = BASE + ("  - name: r\n    match: {path_prefix: /}\n    upstream: b\n"
                       "    response_headers: {add: {X-Generation: two}}\n")
        write_config(g, subst(g, cfg2, A=a.addr, B=b.addr))
        reload_and_wait(g, 2)
        r = c.request("GET", "/two")
        assert r.status == 200
        assert r.header("x-generation") == "two", r.headers
    assert a.paths() == ["/one"] and b.paths() == ["/two"]


def test_listener_added_and_removed(gateway, backend):
    a, b = backend(), backend()
    cfg1 = BASE + "  - {name: r, match: {path_prefix: /}, upstream: a}\n"
    g = gateway(cfg1 + "# $PORT_extra\n", wait=False, A=a.addr, B=b.addr)
    assert poll(lambda: can_connect(g.port), 10), g.diag()
    extra = g.ports["extra"]
    assert not can_connect(extra)
    with_extra = cfg1.replace(
        "upstreams:", "  - name: extra\n    address: 127.0.0.1:$PORT_extra\nupstreams:")
    write_config(g, subst(g, with_extra, A=a.addr, B=b.addr))
    reload_and_wait(g, 2)
    assert poll(lambda: can_connect(extra), 5), g.diag()
    assert http_get(extra, "/via-extra")[0] == 200
    write_config(g, subst(g, cfg1, A=a.addr, B=b.addr))
    reload_and_wait(g, 3)
    assert poll(lambda: not can_connect(extra), 5), "removed listener still accepts"
    assert http_get(g.port, "/main")[0] == 200


def test_reload_under_load_fails_no_request(gateway, backend):
    a, b = backend(), backend()
    cfgs = [BASE + "  - {name: r, match: {path_prefix: /}, upstream: a}\n",
            BASE + ("  - name: r\n    match: {path_prefix: /}\n    upstream: b\n"
                    "    response_headers: {add: {X-Gen: b}}\n")]
    g = gateway(cfgs[0], A=a.addr, B=b.addr)
    stop = threading.Event()
    stats = {"ok": 0, "failed": [], "conns": 0}
    lock = threading.Lock()

    def client(keepalive):
        conn = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
                    with lock:
                        stats["conns"] += 1
                conn.request("GET", "/load", headers={} if keepalive else
                             {"Connection": "close"})
                r = conn.getresponse()
                r.read()
                with lock:
                    if r.status == 200:
                        stats["ok"] += 1
                    else:
                        stats["failed"].append(r.status)
                if not keepalive or r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001 - every failure is counted
                with lock:
                    stats["failed"].append(repr(e))
                if conn:
                    conn.close()
                conn = None
        if conn:
            conn.close()

    threads = [threading.Thread(target=client, args=(i % 2 == 0,), daemon=True)
               for i in range(6)]
    for t in threads:
        t.start()
    assert poll(lambda: stats["ok"] > 200, 10)
    for n in range(2, 8):
        write_config(g, subst(g, cfgs[n % 2], A=a.addr, B=b.addr))
        before = stats["ok"]
        reload_and_wait(g, n)
        assert poll(lambda: stats["ok"] > before + 100, 10), "traffic stopped after a reload"
    stop.set()
    for t in threads:
        t.join(15)
    assert "reload rejected" not in g.stderr_text()
    assert stats["failed"] == [], stats["failed"][:10]
    assert stats["ok"] > 600, stats
    assert len(a.paths()) > 0 and len(b.paths()) > 0


def test_safe_reload_rolls_back_on_5xx(gateway, backend, tmp_path):
    a = backend()
    dead = "127.0.0.1:9"  # nothing listens on the discard port here: connections are refused
    head = BASE.replace("routes:", "reload: {rollback_on_5xx_ratio: 0.2, window: 20s, "
                                   "min_requests: 10}\nroutes:")
    cfg1 = head + "  - {name: r, match: {path_prefix: /}, upstream: a}\n"
    g = gateway(cfg1, A=a.addr, B=dead)
    assert http_get(g.port, "/before")[0] == 200
    cfg2 = head + "  - {name: r, match: {path_prefix: /}, upstream: b}\n"
    write_config(g, subst(g, cfg2, A=a.addr, B=dead))
    reload_and_wait(g, 2)
    statuses = [http_get(g.port, "/bad%d" % i)[0] for i in range(12)]
    assert any(s >= 500 for s in statuses), statuses
    assert poll(lambda: "rolling back" in g.stderr_text(), 5), g.diag()
    assert poll(lambda: "configuration generation 3 is live" in g.stderr_text() or
                "rolled back" in g.stderr_text(), 5), g.diag()
    assert poll(lambda: http_get(g.port, "/after")[0] == 200, 5), "still failing after rollback"
    assert "/after" in a.paths()


def test_reload_keeps_endpoint_health(gateway, backend):
    """An endpoint ejected before a reload stays ejected after it: the new generation does not
    send requests to a backend the old one knew to be down."""
    import json
    a = backend()
    dead = "127.0.0.1:9"
    cfg = """workers: 1
admin: {address: 127.0.0.1:$PORT_admin}
listeners:
  - name: public
    address: 127.0.0.1:$PORT_public
upstreams:
  - name: app
    balance: round_robin
    endpoints: [{address: $A}, {address: $D}]
    health: {passive: {consecutive_failures: 1, ejection: 60s}}
    retries: {attempts: 1, on: [connect_failure]}
routes:
  - {name: r, match: {path_prefix: /}, upstream: app$EXTRA}
"""

    def state():
        us = json.loads(admin_get(g, "/upstreams")[1])
        return {e["address"]: e["state"] for e in us[0]["endpoints"]}

    g = gateway(cfg, A=a.addr, D=dead, EXTRA="")
    for i in range(4):
        assert http_get(g.port, "/warm%d" % i)[0] == 200
    assert poll(lambda: state().get(dead) == "open", 5), state()
    write_config(g, subst(g, cfg, A=a.addr, D=dead,
                          EXTRA=", response_headers: {add: {X-Gen: two}}"))
    reload_and_wait(g, 2)
    st, _, hdrs = http_get(g.port, "/after")
    assert st == 200 and hdrs.get("X-Gen") == "two", hdrs
    assert state() == {a.addr: "closed", dead: "open"}, state()


def test_reload_names_settings_that_wait_for_a_restart(gateway, backend):
    a, b = backend(), backend()
    cfg1 = BASE + "  - {name: r, match: {path_prefix: /}, upstream: a}\n"
    g = gateway(cfg1, A=a.addr, B=b.addr)
    cfg2 = cfg1.replace("workers: 2", "workers: 1").replace(
        "drain_timeout: 5s", "drain_timeout: 6s")
    write_config(g, subst(g, cfg2, A=a.addr, B=b.addr))
    reload_and_wait(g, 2)
    err = g.stderr_text()
    assert "reload rejected" not in err, err[-2000:]
    assert "reload: `workers` changes at the next restart" in err, err[-2000:]
    assert "reload: `drain` and `drain_timeout` change at the next restart" in err, err[-2000:]
    assert http_get(g.port, "/still")[0] == 200


# ---- regressions: state of an old generation that something still used after the swap ----

ONE = """workers: 1
log_level: info
admin: {address: 127.0.0.1:$PORT_admin}
listeners:
  - name: public
    address: 127.0.0.1:$PORT_public
$EXTRA
routes:
  - name: $ROUTE
    match: {path_prefix: /}
    direct_response: {status: 200, body: "$BODY"}
"""


def one(g, **kw):
    m = {"EXTRA": "", "ROUTE": "r1", "BODY": "ok"}
    m.update(kw)
    return subst(g, ONE, **m)


def test_removed_listener_serves_a_head_that_completes_after_the_reload(gateway):
    """A connection on a listener the reload drops, whose head was half sent before it, is
    answered (on the old generation, kept until it is done) and then closed."""
    import socket
    extra = "  - name: gone\n    address: 127.0.0.1:$PORT_gone"
    g = gateway(ONE.replace("$EXTRA", extra), ROUTE="r1", BODY="ok")
    s = socket.create_connection(("127.0.0.1", g.ports["gone"]), timeout=5)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert poll(lambda: "sluice_connections_open 1" in admin_get(g, "/metrics")[1].decode(),
                    5)
        write_config(g, one(g, EXTRA=""))
        reload_and_wait(g, 2)
        assert poll(lambda: not can_connect(g.ports["gone"]), 5)
        s.sendall(b"\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
        assert b"Connection: close" in data, data[:300]
    finally:
        s.close()
    assert g.alive()


def test_large_response_to_a_slow_reader_outlives_its_generation(gateway):
    """A direct response bigger than the socket buffers, read slowly across a reload that
    replaces its route: every byte arrives (the old generation lives until the request is
    freed, not only until its exchange ended)."""
    import socket
    body = "x" * 3000000
    g = gateway(ONE, EXTRA="", ROUTE="r1", BODY=body)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", g.port))
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first[:60]
        write_config(g, one(g, ROUTE="r2", BODY="new"))
        reload_and_wait(g, 2)
        # the main thread frees unused generations once a second: give it two chances
        time.sleep(2.2)
        got = first
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        head, _, rest = got.partition(b"\r\n\r\n")
        assert rest == body.encode(), (len(rest), len(body))
    finally:
        s.close()
    assert http_get(g.port, "/")[1] == b"new"


def test_refused_reload_leaves_the_metrics_routes_alone(gateway):
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        g = gateway(ONE, EXTRA="", ROUTE="current", BODY="ok")
        assert http_get(g.port, "/")[0] == 200
        extra = "  - name: other\n    address: 127.0.0.1:%d" % taken.getsockname()[1]
        write_config(g, one(g, EXTRA=extra, ROUTE="phantom"))
        g.signal(signal.SIGHUP)
        assert poll(lambda: "reload rejected" in g.stderr_text(), 10)
        assert "Address already in use" in g.stderr_text()
        text = admin_get(g, "/metrics")[1].decode()
        assert 'route="current"' in text and 'route="phantom"' not in text
        assert http_get(g.port, "/")[0] == 200
    finally:
        taken.close()


def test_reload_raising_header_limit_past_the_buffers_is_refused(gateway):
    g = gateway(ONE, EXTRA="", ROUTE="r1", BODY="ok")
    big = one(g).replace("    address: 127.0.0.1:%d\n" % g.port,
                         "    address: 127.0.0.1:%d\n    limits: {max_header_bytes: 256KiB}\n"
                         % g.port)
    write_config(g, big)
    g.signal(signal.SIGHUP)
    assert poll(lambda: "reload rejected" in g.stderr_text(), 10)
    assert "raising it needs a restart" in g.stderr_text()
    assert http_get(g.port, "/")[0] == 200
