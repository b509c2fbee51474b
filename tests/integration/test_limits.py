"""Listener limits: header bytes and count (431), URI length (414), body size (413), header
and body read timeouts (408), idle keep-alive timeout (silent close)."""

import select
import time

import pytest

from client import build_request, chunk_encode
from helpers import poll, proxy_config

LIMITS = ("{max_header_bytes: 4KiB, max_header_count: 20, max_uri_bytes: 1KiB, "
          "max_body_bytes: 1KiB, header_timeout: 500ms, body_timeout: 500ms, "
          "idle_timeout: 500ms}")


@pytest.fixture(scope="module")
def gw(module_gateway_factory, module_backend):
    b = module_backend()
    g = module_gateway_factory.start(proxy_config(limits=LIMITS), B1=b.addr)
    g.backend = b
    return g


def send_raw(gw, data, timeout=5.0):
    with gw.connect(timeout=timeout) as c:
        c.send(data)
        r = c.read_response()
        closed = c.closed(timeout=3) if r.status >= 400 else None
        return r, closed


def test_headers_within_limit_pass(gw):
    hs = [("X-H%d" % i, "v" * 250) for i in range(10)]  # ~2.7 KB head, 11 fields
    r, _ = send_raw(gw, build_request("GET", "/ok", hs))
    assert r.status == 200, r


def test_header_bytes_over_limit_is_431(gw):
    hs = [("X-H%d" % i, "v" * 500) for i in range(10)]  # ~5.1 KB, 11 fields
    r, closed = send_raw(gw, build_request("GET", "/big-head", hs))
    assert r.status == 431, r
    assert closed
    assert "/big-head" not in gw.backend.paths()


def test_single_huge_header_is_431(gw):
    r, closed = send_raw(gw, build_request("GET", "/huge-header", [("X-Big", "v" * 6000)]))
    assert r.status == 431, r


def test_header_count_within_limit_passes(gw):
    hs = [("X-C%d" % i, "1") for i in range(15)]
    assert send_raw(gw, build_request("GET", "/ok", hs))[0].status == 200


def test_header_count_over_limit_is_431(gw):
    hs = [("X-C%d" % i, "1") for i in range(25)]
    r, closed = send_raw(gw, build_request("GET", "/many-headers", hs))
    assert r.status == 431, r
    assert "/many-headers" not in gw.backend.paths()


def test_uri_within_limit_passes(gw):
    r, _ = send_raw(gw, build_request("GET", "/" + "u" * 900))
    assert r.status == 200, r


def test_uri_over_limit_is_414(gw):
    r, closed = send_raw(gw, build_request("GET", "/" + "u" * 2000))
    assert r.status == 414, r


def test_uri_over_limit_by_query_is_414(gw):
    r, closed = send_raw(gw, build_request("GET", "/q?" + "a=b&" * 400))
    assert r.status == 414, r


def test_body_at_limit_passes(gw):
    r, _ = send_raw(gw, build_request("POST", "/body", body=b"b" * 1024))
    assert r.status == 200 and r.json()["body_len"] == 1024, r


def test_body_over_limit_with_content_length_is_413(gw):
    with gw.connect() as c:
        # The head alone announces too much: 413 without waiting for the body.
        c.send(build_request("POST", "/too-big", [("Content-Length", "2000")]))
        r = c.read_response()
        assert r.status == 413, r
        assert c.closed(timeout=3)
    assert "/too-big" not in gw.backend.paths()


def test_chunked_body_over_limit_is_413_or_closed(gw):
    body = b"c" * 3000
    with gw.connect() as c:
        c.send(build_request("POST", "/chunked-too-big", [("Transfer-Encoding", "chunked")],
                             chunk_encode(body, sizes=(500,))))
        resp, err = c.try_read_response()
        if resp is not None:
            assert resp.status == 413, resp
            assert c.closed(timeout=3)
        else:
            assert c.wait_closed(timeout=3)[0], err
    # Whatever reached the backend, it must not be a complete oversized body.
    for rec in gw.backend.requests:
        if rec["path"] == "/chunked-too-big":
            assert not (rec["complete"] and rec["body_len"] > 1024), rec


def test_header_timeout_is_408_and_closed(gw):
    with gw.connect(timeout=10) as c:
        c.send(b"GET /partial HTTP/1.1\r\nHost: a\r\n")  # and never the final CRLF
        t0 = time.monotonic()
        r = c.read_response(timeout=10)
        elapsed = time.monotonic() - t0
        assert r.status == 408, r
        assert c.closed(timeout=3)
    assert 0.4 <= elapsed < 3.0, elapsed


def test_header_timeout_counts_whole_head_not_gaps(gw):
    # Trickling one byte every 100 ms must not extend the 500 ms deadline for the head.
    data = b"GET /trickle HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"s" * 60
    with gw.connect(timeout=10) as c:
        t0 = time.monotonic()
        for ch in data:
            readable, _, _ = select.select([c.sock], [], [], 0.1)  # the trickle rate
            if readable:
                break
            try:
                c.send(bytes([ch]))
            except OSError:
                break
        elapsed = time.monotonic() - t0
        resp, err = c.try_read_response(timeout=3)
    assert resp is not None and resp.status == 408, (resp, err)
    assert elapsed < 3.0, elapsed


def test_body_timeout_is_408_or_closed(gw):
    with gw.connect(timeout=10) as c:
        c.send(build_request("POST", "/stall", [("Content-Length", "100")]) + b"x" * 10)
        t0 = time.monotonic()
        resp, err = c.try_read_response(timeout=10)
        elapsed = time.monotonic() - t0
        if resp is not None:
            assert resp.status == 408, resp
        else:
            assert err != "timeout", err
    assert elapsed < 3.0, elapsed


def test_idle_keepalive_connection_closed_silently(gw):
    with gw.connect(timeout=10) as c:
        r = c.request("GET", "/idle")
        assert r.status == 200
        t0 = time.monotonic()
        assert c.closed(timeout=5), "server sent bytes or did not close: %r" % bytes(c.buf)
        elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 3.0, elapsed


def test_keepalive_within_idle_timeout_stays_open(gw):
    with gw.connect() as c:
        for i in range(3):
            r = c.request("GET", "/alive/%d" % i)
            assert r.status == 200
            time.sleep(0.2)  # well under idle_timeout: 500ms
        assert c.request("GET", "/alive/end").status == 200


# ---- slowloris: a minimum body rate --------------------------------------------------------


def _drip(gw, chunk, every, total, out, key):
    """POSTs `total` body bytes in `chunk`-byte pieces every `every` s; stores the status (or
    the way the connection ended) in out[key] and when it ended."""
    with gw.connect(timeout=15) as c:
        c.send(build_request("POST", "/drip-%s" % key, [("Content-Length", str(total))]))
        t0 = time.monotonic()
        sent = 0
        try:
            while sent < total:
                n = min(chunk, total - sent)
                c.send(b"d" * n)
                sent += n
                r, _, _ = select.select([c.sock], [], [], every)
                if r:  # the gateway answered (or closed) before the body was complete
                    break
        except OSError:
            pass
        resp, err = c.try_read_response(timeout=10)
        out[key] = (resp.status if resp is not None else err, time.monotonic() - t0, sent)


def test_min_body_rate_cuts_a_dripping_client_and_serves_others(module_gateway_factory,
                                                                module_backend):
    import threading
    b = module_backend()
    g = module_gateway_factory.start(proxy_config(
        limits="{body_timeout: 30s, min_body_rate: 100, min_body_rate_after: 1s}"), B1=b.addr)
    out = {}
    # 5 bytes/s: below 100 B/s, cut about 1 s (the grace) into the body, long before
    # body_timeout; 500 bytes/s for 2.5 s: above the rate, never cut.
    slow = threading.Thread(target=_drip, args=(g, 1, 0.2, 1000, out, "slow"))
    fine = threading.Thread(target=_drip, args=(g, 100, 0.2, 1200, out, "fine"))
    slow.start()
    fine.start()
    try:
        # meanwhile ordinary requests are served
        for i in range(5):
            assert g.request("POST", "/normal/%d" % i, body=b"n" * 500).status == 200
    finally:
        slow.join(20)
        fine.join(20)
    status, took, sent = out["slow"]
    assert status in (408, "closed"), out
    assert took < 5, out  # well before body_timeout (30 s)
    assert sent < 1000, out
    assert out["fine"][0] == 200, out


def test_min_body_rate_zero_turns_it_off(module_gateway_factory, module_backend):
    b = module_backend()
    g = module_gateway_factory.start(proxy_config(
        limits="{body_timeout: 30s, min_body_rate: 0, min_body_rate_after: 100ms}"), B1=b.addr)
    out = {}
    _drip(g, 1, 0.1, 15, out, "slowbutallowed")
    assert out["slowbutallowed"][0] == 200, out


# ---- the process-wide connection cap -------------------------------------------------------


def test_max_connections_pauses_accepting_instead_of_failing(module_gateway_factory,
                                                             module_backend):
    import socket
    b = module_backend()
    g = module_gateway_factory.start(
        proxy_config(workers=1, limits="{idle_timeout: 30s}").replace(
            "listeners:", "max_connections: 3\nlisteners:", 1), B1=b.addr)
    held = [g.connect(timeout=10) for _ in range(3)]
    try:
        for i, c in enumerate(held):  # all three are open and served
            assert c.request("GET", "/held/%d" % i).status == 200
        # a fourth connection completes in the kernel's backlog but is not served yet
        extra = socket.create_connection(("127.0.0.1", g.port), timeout=10)
        extra.sendall(b"GET /waiting HTTP/1.1\r\nHost: x\r\n\r\n")
        extra.settimeout(0.5)
        with pytest.raises(socket.timeout):
            extra.recv(1)
        # one closes: the waiting connection is accepted and answered, nothing failed
        held.pop().close()
        extra.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = extra.recv(4096)
            assert chunk, "closed without an answer: %r" % data
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data
        extra.close()
    finally:
        for c in held:
            c.close()
    assert "the cap (max_connections)" in g.stderr_text()


# ---- the buffer memory budget --------------------------------------------------------------


def test_buffer_budget_refuses_new_work_and_recovers(module_gateway_factory, module_backend):
    import socket
    b = module_backend()
    # One worker, 8 pooled blocks (the floor): partial heads pin one block each.
    g = module_gateway_factory.start(
        proxy_config(workers=1, limits="{header_timeout: 30s}").replace(
            "listeners:", "max_buffer_memory: 64KiB\nlisteners:", 1), B1=b.addr)
    holders = []
    try:
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
            s.sendall(b"GET /partial HTTP/1.1\r\nHost: x\r\n")  # no end of head
            holders.append(s)
        # new work is refused early: the connection is closed (or reset, its request unread)
        # without an answer, and the process keeps running
        assert _refused(g)
        assert poll(lambda: "buffer memory budget reached" in g.stderr_text(), 5), g.diag()
        assert g.alive()
    finally:
        for s in holders:
            s.close()
    # the holders' blocks come back: the gateway serves again and is still alive
    assert poll(lambda: _served(g), 5), g.diag()
    assert "back under budget" in g.stderr_text()


def _refused(g):
    import socket
    s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    try:
        s.sendall(b"GET /probe HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True
    finally:
        s.close()


def _served(g):
    try:
        return g.request("GET", "/after", timeout=2).status == 200
    except Exception:  # noqa: BLE001 - refused while blocks come back
        return False
