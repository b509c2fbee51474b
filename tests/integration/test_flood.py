"""Connection floods and slow clients against the real binary: one address flooding
connections is capped (`protection.max_connections_per_ip`, `new_connections_per_ip`) while
other addresses are served; the caps follow a trusted PROXY header's source; slow heads, slow
bodies and idle half-open connections (also in the PROXY stage) do not stop normal clients;
`max_connections` queues connections in the backlog across workers instead of refusing them.

Already covered elsewhere and not repeated: a trickled head cut at header_timeout and 5,000
idle connections (test_adversarial.py), a dripped body cut by min_body_rate and the
max_connections pause with one worker (test_limits.py), allow/deny (test_protection.py).

Loopback owns 127.0.0.0/8: client sockets bound to 127.0.0.2, 127.0.0.3, ... act as different
addresses of clients of the gateway on 127.0.0.1.
"""

import re
import select
import socket
import threading
import time


from client import build_request
from helpers import poll, proxy_config, read_response, run_cli

FLOODER = "127.0.0.2"
OTHER = "127.0.0.3"
REQ = build_request("GET", "/flood")


def listener_extra(config, extra):
    return config.replace("    address: 127.0.0.1:$PORT_public\n",
                          "    address: 127.0.0.1:$PORT_public\n" + extra, 1)


def protected(protection, limits="{header_timeout: 30s, idle_timeout: 30s}", pp=None,
              workers=2):
    extra = "    protection: %s\n" % protection
    if pp:
        extra += "    proxy_protocol: %s\n" % pp
    return listener_extra(proxy_config(limits=limits, workers=workers), extra)


def connect_from(port, source, timeout=5.0):
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s



def served(s, timeout=5.0):
    try:
        s.sendall(REQ)
    except OSError:
        return False
    return read_response(s, timeout).startswith(b"HTTP/1.1 200")


def request_from(port, source, timeout=2.0, prefix=b""):
    """A GET on a fresh connection from `source`; (served?, seconds it took)."""
    t0 = time.monotonic()
    try:
        s = connect_from(port, source, timeout)
    except OSError:
        return False, time.monotonic() - t0
    try:
        s.sendall(prefix)
        return served(s, timeout), time.monotonic() - t0
    except OSError:
        return False, time.monotonic() - t0
    finally:
        s.close()


def is_closed(s):
    """True when the gateway closed `s` (EOF or reset) without sending a byte; False while it
    is open and silent. A byte received is a test failure."""
    r, _, _ = select.select([s], [], [], 0)
    if not r:
        return False
    try:
        data = s.recv(1)
    except ConnectionResetError:
        return True
    assert data == b"", "the gateway sent %r on a refused connection" % data
    return True


def split_closed(socks, expect_closed, timeout=5.0):
    """Polls until `expect_closed` of `socks` are closed (or the deadline), then waits a little
    for any more; returns (open, closed)."""
    poll(lambda: sum(map(is_closed_cached, socks)) >= expect_closed, timeout)
    time.sleep(0.2)  # nothing to poll for: give a wrongly refused connection time to show
    closed = [s for s in socks if is_closed_cached(s)]
    return [s for s in socks if s not in closed], closed


_closed = set()


def is_closed_cached(s):
    if s in _closed:
        return True
    if is_closed(s):
        _closed.add(s)
        return True
    return False


def close_all(socks):
    for s in socks:
        _closed.discard(s)
        s.close()


def counters(gw):
    """Stops the gateway (SIGTERM) and returns the listener counters logged at exit."""
    assert gw.stop() == 0, gw.diag()
    m = re.search(r"listener public: refused (.*)", gw.stderr_text())
    assert m, "no counters line" + gw.diag()
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


def v1(src):
    return ("PROXY TCP4 %s 198.51.100.1 40000 443\r\n" % src).encode()


# ---- max_connections_per_ip -------------------------------------------------------------------


def test_connection_flood_from_one_address_is_capped_while_another_is_served(gateway, backend):
    b = backend()
    g = gateway(protected("{max_connections_per_ip: 20}"), B1=b.addr)
    flood, fresh = [], []
    try:
        for _ in range(100):
            flood.append(connect_from(g.port, FLOODER))
        # meanwhile, another address is served promptly
        ok, took = request_from(g.port, OTHER)
        assert ok and took < 2.0, took
        held, refused = split_closed(flood, 80)
        assert len(held) == 20 and len(refused) == 80, (len(held), len(refused))
        # the 20 that stay are real connections: each is served
        assert all(served(s) for s in held)
        ok, took = request_from(g.port, OTHER)
        assert ok and took < 2.0, took
        # closing some frees their slots: as many new connections are accepted, no more
        close_all(held[:5])
        held = held[5:]
        def one_more():
            s = connect_from(g.port, FLOODER)
            if served(s):
                fresh.append(s)
                return len(fresh) == 5
            s.close()
            return False

        assert poll(one_more, 5, interval=0.02), "only %d slots came back" % len(fresh)
        extra = connect_from(g.port, FLOODER)
        flood.append(extra)
        assert not served(extra, timeout=2)
        held += fresh
    finally:
        close_all(flood + fresh)
    c = counters(g)
    assert c["ip_conns"] >= 81 and c["ip_rate"] == 0, c


def test_new_connection_rate_admits_the_burst_then_refuses(gateway, backend):
    b = backend()
    g = gateway(protected("{new_connections_per_ip: 10/s, new_connections_burst: 10}"),
                B1=b.addr)
    flood = []
    try:
        t0 = time.monotonic()
        for _ in range(50):
            flood.append(connect_from(g.port, FLOODER))
        took = time.monotonic() - t0
        # burst + 1 at once (the burst is on top of the rate, as for rate_limit), plus one per
        # 100 ms the 50 connects took
        allowed = 11 + int(took * 10) + 1
        held, refused = split_closed(flood, 50 - allowed)
        assert 11 <= len(held) <= allowed, (len(held), took)
        assert all(served(s) for s in held)
        ok, t = request_from(g.port, OTHER)
        assert ok and t < 2.0, t
        # the rate refills: a new connection from the flooder is served again shortly
        assert poll(lambda: request_from(g.port, FLOODER)[0], 3, interval=0.05)
    finally:
        close_all(flood)
    c = counters(g)
    assert c["ip_rate"] >= 50 - allowed and c["ip_conns"] == 0, c


# ---- behind a trusted PROXY sender ------------------------------------------------------------


def test_per_ip_cap_follows_the_proxy_source(gateway, backend):
    """Over one trusted load balancer (127.0.0.2), each client its header names has its own
    cap; the load balancer itself is not capped; an untrusted peer is capped by its own
    address."""
    b = backend()
    g = gateway(protected("{max_connections_per_ip: 3}",
                          pp="{accept: true, trusted: [127.0.0.2/32], timeout: 2s}"), B1=b.addr)
    socks = []

    def via_lb(src):
        s = connect_from(g.port, FLOODER)
        socks.append(s)
        s.sendall(v1(src))
        return s

    try:
        # one at a time, so that which one is over the cap does not depend on the workers
        a = [via_lb("192.0.2.1") for _ in range(3)]
        assert all(served(s) for s in a)
        bb = [via_lb("192.0.2.2") for _ in range(3)]
        assert all(served(s) for s in bb)
        assert not served(via_lb("192.0.2.1"), timeout=2)
        # an untrusted address is capped by its TCP address
        u = [connect_from(g.port, OTHER) for _ in range(4)]
        socks += u
        held, refused = split_closed(u, 1)
        assert len(held) == 3 and len(refused) == 1
        # a closed connection's slot goes back to the source its header named
        close_all([a[0]])
        assert poll(lambda: served(via_lb("192.0.2.1"), timeout=2), 5, interval=0.02)
        # IPv6 sources count per /64
        h6 = []
        for i in range(4):
            s = connect_from(g.port, FLOODER)
            socks.append(s)
            s.sendall(b"PROXY TCP6 2001:db8:0:7::%x 2001:db8::1 40000 443\r\n" % (i + 1))
            h6.append(served(s, timeout=2))
        assert h6 == [True, True, True, False]
        s = connect_from(g.port, FLOODER)
        socks.append(s)
        s.sendall(b"PROXY TCP6 2001:db8:0:8::1 2001:db8::1 40000 443\r\n")
        assert served(s)
        # LOCAL (the sender's own health checks) and UNKNOWN name no client: not limited
        local = []
        for hdr in [V2_LOCAL] * 2 + [b"PROXY UNKNOWN\r\n"] * 2:
            s = connect_from(g.port, FLOODER)
            socks.append(s)
            s.sendall(hdr)
            local.append(s)
        assert all(served(s) for s in local)
    finally:
        close_all(socks)
    c = counters(g)
    assert c["ip_conns"] >= 3 and c["proxy"] >= 12, c


def test_connections_refused_or_timed_out_in_the_proxy_stage_give_their_slot_back(gateway,
                                                                                 backend):
    """With a cap of 1 per address, an untrusted peer's spoofed headers (refused), a stalled
    start of a signature (closed at the timeout) and a silent connection handed to HTTP and
    cut at header_timeout each release the address's slot. The edge releases it before it
    closes, so each refusal is seen as such (not as ip_conns) by the next connection."""
    b = backend()
    # one worker: a release and the next accept cannot race (with two, the client may see the
    # close a moment before the slot is released, and the other worker refuse the next one)
    g = gateway(protected("{max_connections_per_ip: 1}", limits="{header_timeout: 1s}",
                          pp="{accept: true, trusted: [127.0.0.2/32], timeout: 300ms}",
                          workers=1), B1=b.addr)
    for _ in range(5):
        s = connect_from(g.port, OTHER)
        s.sendall(v1("192.0.2.1") + REQ)
        assert read_response(s, 2) == b""
        s.close()
    s = connect_from(g.port, OTHER)
    s.sendall(b"PROX")
    assert read_response(s, 3) == b""  # closed at the PROXY timeout
    s.close()
    s = connect_from(g.port, OTHER)
    assert read_response(s, 3).startswith(b"HTTP/1.1 408")  # handed to HTTP, header_timeout
    s.close()
    assert poll(lambda: request_from(g.port, OTHER)[0], 3, interval=0.02)
    c = counters(g)
    assert c["proxy_untrusted"] == 5 and c["proxy_timeout"] == 1, c


def test_new_connection_rate_follows_the_proxy_source(gateway, backend):
    b = backend()
    g = gateway(protected("{new_connections_per_ip: 1/m, new_connections_burst: 2}",
                          pp="{accept: true, trusted: [127.0.0.2/32], timeout: 2s}"), B1=b.addr)
    results = {}
    for src in ("192.0.2.1", "192.0.2.2"):
        results[src] = [request_from(g.port, FLOODER, prefix=v1(src))[0] for _ in range(4)]
    # burst + 1 at once per source; the load balancer's own address is not limited
    assert results == {"192.0.2.1": [True, True, True, False],
                       "192.0.2.2": [True, True, True, False]}
    c = counters(g)
    assert c["ip_rate"] == 2, c


# ---- slow clients -----------------------------------------------------------------------------


def test_slow_heads_from_one_address_are_capped_and_cut_while_others_are_served(gateway,
                                                                                backend):
    """30 connections trickling a head one byte per 200 ms from one address: 10 are admitted
    (max_connections_per_ip), cut at header_timeout (1 s) with 408; other clients are served
    promptly meanwhile."""
    b = backend()
    g = gateway(protected("{max_connections_per_ip: 10}", limits="{header_timeout: 1s}",
                          workers=1), B1=b.addr)
    head = build_request("GET", "/slow", [("X-Pad", "p" * 40)])
    slow = [connect_from(g.port, FLOODER, timeout=10) for _ in range(30)]
    outcome = {}
    t0 = time.monotonic()
    stop = threading.Event()

    def trickle():
        i = 0
        while not stop.is_set() and i < len(head) and len(outcome) < len(slow):
            for s in slow:
                if s in outcome:
                    continue
                r, _, _ = select.select([s], [], [], 0)
                if r:
                    try:
                        data = s.recv(65536)
                    except ConnectionResetError:
                        data = b""
                    outcome[s] = (data[:12], time.monotonic() - t0)
                    continue
                try:
                    s.sendall(head[i:i + 1])
                except OSError:
                    outcome[s] = (b"", time.monotonic() - t0)
            i += 1
            stop.wait(0.2)

    t = threading.Thread(target=trickle)
    t.start()
    worst = 0.0
    try:
        while t.is_alive() and time.monotonic() - t0 < 2.5:
            ok, took = request_from(g.port, OTHER)
            assert ok
            worst = max(worst, took)
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(10)
        close_all(slow)
    assert worst < 0.5, "a normal client waited %.2fs behind the slow heads" % worst
    cut = [v for v in outcome.values() if v[0].startswith(b"HTTP/1.1 408")]
    refused = [v for v in outcome.values() if v[0] == b""]
    assert len(cut) == 10 and len(refused) == 20, outcome.values()
    assert all(0.9 <= v[1] < 2.5 for v in cut), cut
    assert all(v[1] < 0.9 for v in refused), refused


def test_slow_bodies_are_cut_by_min_body_rate_while_others_are_served(gateway, backend):
    """Ten uploads dripping 100 B/s, below min_body_rate: 1000, are cut (408 or closed) soon
    after min_body_rate_after: 1s; an upload at 5000 B/s and short requests are not."""
    b = backend()
    g = gateway(proxy_config(limits="{body_timeout: 30s, min_body_rate: 1000, "
                                    "min_body_rate_after: 1s}", workers=1), B1=b.addr)
    out = {}

    def upload(key, src, chunk, total):
        s = connect_from(g.port, src, timeout=15)
        t0 = time.monotonic()
        sent = 0
        try:
            s.sendall(build_request("POST", "/up", [("Content-Length", str(total))]))
            while sent < total:
                s.sendall(b"u" * chunk)
                sent += chunk
                r, _, _ = select.select([s], [], [], 0.1)
                if r:
                    break
        except OSError:
            pass
        resp = read_response(s, timeout=10)
        out[key] = (resp[:12], time.monotonic() - t0, sent)
        s.close()

    ts = [threading.Thread(target=upload, args=("slow%d" % i, FLOODER, 10, 3000))
          for i in range(10)]
    ts.append(threading.Thread(target=upload, args=("fine", OTHER, 500, 12000)))
    for th in ts:
        th.start()
    worst = 0.0
    try:
        while any(th.is_alive() for th in ts[:-1]):
            ok, took = request_from(g.port, OTHER)
            assert ok
            worst = max(worst, took)
            time.sleep(0.1)
    finally:
        for th in ts:
            th.join(20)
    assert worst < 0.5, worst
    for i in range(10):
        status, took, sent = out["slow%d" % i]
        assert status in (b"HTTP/1.1 408", b""), out
        assert took < 4.0 and sent < 3000, out
    assert out["fine"][0] == b"HTTP/1.1 200", out


def test_idle_half_open_connections_in_the_proxy_stage_do_not_block_others(gateway, backend):
    """200 connections from the trusted load balancer that never finish their PROXY header,
    200 untrusted ones that never send a byte and 200 with half a request head: normal
    clients (via the load balancer and direct) are served promptly; the stalled headers are
    closed at proxy_protocol.timeout and counted; the rest are left to header_timeout."""
    b = backend()
    g = gateway(listener_extra(
        proxy_config(limits="{header_timeout: 30s, idle_timeout: 30s}", workers=1),
        "    proxy_protocol: {accept: true, trusted: [127.0.0.2/32], timeout: 1500ms}\n"),
        B1=b.addr)
    stalled, silent, half = [], [], []
    try:
        for i in range(200):
            s = connect_from(g.port, FLOODER)
            s.sendall(b"PROXY TCP4 192.0.2.%d " % (i % 250))
            stalled.append(s)
            silent.append(connect_from(g.port, OTHER))
            h = connect_from(g.port, "127.0.0.4")
            h.sendall(b"GET /half HTTP/1.1\r\nHost: x\r\n")
            half.append(h)
        t_open = time.monotonic()
        for _ in range(5):
            ok, took = request_from(g.port, FLOODER, prefix=v1("192.0.2.250"))
            assert ok and took < 0.5, took
            ok, took = request_from(g.port, "127.0.0.5")
            assert ok and took < 0.5, took
        assert not any(map(is_closed_cached, silent + half))
        # the stalled headers go at the timeout; the silent and half-open ones stay
        assert poll(lambda: all(map(is_closed_cached, stalled)), 5), \
            sum(map(is_closed_cached, stalled))
        assert time.monotonic() - t_open < 4
        assert not any(map(is_closed_cached, silent + half))
    finally:
        close_all(stalled + silent + half)
    c = counters(g)
    assert c["proxy_timeout"] == 200 and c["proxy"] == 5, c


# ---- the process-wide cap ---------------------------------------------------------------------


def test_max_connections_queues_across_workers_and_all_waiting_are_served(gateway, backend):
    """max_connections: 50 with two workers: 50 held connections, then 10 more with their
    request sent wait in the backlog (neither answered nor refused); when 10 of the held ones
    close, every waiting one is served."""
    b = backend()
    g = gateway(proxy_config(workers=2, limits="{idle_timeout: 30s, header_timeout: 30s}")
                .replace("listeners:", "max_connections: 50\nlisteners:", 1), B1=b.addr)
    held = [connect_from(g.port, "127.0.0.1", timeout=10) for _ in range(50)]
    waiting = []
    try:
        assert all(served(s) for s in held)
        for _ in range(10):
            s = connect_from(g.port, "127.0.0.1", timeout=10)
            s.sendall(REQ)
            waiting.append(s)
        r, _, _ = select.select(waiting, [], [], 0.5)
        assert not r, "a connection past the cap was answered or refused"
        # a further request on a held connection is still served
        assert served(held[0])
        close_all(held[-10:])
        held = held[:-10]
        got = [read_response(s, timeout=5) for s in waiting]
        assert all(x.startswith(b"HTTP/1.1 200") for x in got), [x[:20] for x in got]
    finally:
        close_all(held + waiting)
    assert g.stop() == 0
    assert re.search(r"accepting paused at max_connections: [1-9]", g.stderr_text()), g.diag()


# ---- configuration ----------------------------------------------------------------------------


def test_rate_and_burst_beyond_the_horizon_is_a_located_error(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("listeners:\n  - name: p\n    address: 127.0.0.1:1\n"
                 "    protection: {new_connections_per_ip: 1/h, new_connections_burst: 100000}\n")
    r = run_cli(["-t", "-c", str(p)])
    assert r.returncode == 1, r.stderr
    assert re.search(r":4:\d+: listeners\[0\]\.protection\.new_connections_burst: ", r.stderr), \
        r.stderr
