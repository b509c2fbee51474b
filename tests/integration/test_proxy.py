"""Proxy semantics: hop-by-hop headers, X-Forwarded-*, X-Request-Id, keep-alive reuse toward
upstreams (including upstreams that time out or drop idle connections), pipelining, chunked
bodies both ways, connect failover, timeouts and malformed upstream responses."""

import hashlib
import threading
import time

import pytest

from client import RawClient, assert_gateway_error, build_request, chunk_encode
from helpers import proxy_config
from peers import dead_port

HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade")


@pytest.fixture
def echo_gw(gateway, backend):
    b = backend()
    g = gateway(proxy_config(), B1=b.addr)
    g.backend = b
    return g


def seen_headers(doc):
    return [(k.lower(), v) for k, v in doc["headers"]]


def hvals(pairs, name):
    return [v for k, v in pairs if k == name]


# --------------------------------------------------------------------------------------------
# Header semantics


def test_hop_by_hop_request_headers_not_forwarded(echo_gw):
    r = echo_gw.request("GET", "/hop", [
        ("Connection", "keep-alive, X-Custom-Hop"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),
        ("X-Custom-Hop", "must-not-pass"),
        ("X-End-To-End", "must-pass"),
    ])
    assert r.status == 200, r
    hs = seen_headers(r.json())
    for name in ("keep-alive", "proxy-connection", "te", "trailer", "upgrade", "x-custom-hop"):
        assert hvals(hs, name) == [], (name, hs)
    for v in hvals(hs, "connection"):  # sluice may speak its own Connection header
        assert "x-custom-hop" not in v.lower() and "upgrade" not in v.lower(), hs
    assert hvals(hs, "x-end-to-end") == ["must-pass"], hs


def test_hop_by_hop_response_headers_not_forwarded(echo_gw):
    q = "&".join("rh=" + h for h in (
        "Connection:X-Resp-Hop", "X-Resp-Hop:1", "Proxy-Connection:keep-alive",
        "Upgrade:h2c", "Trailer:X-Checksum", "X-Resp-Keep:1"))
    r = echo_gw.request("GET", "/hop?" + q)
    assert r.status == 200, r
    for name in ("x-resp-hop", "proxy-connection", "upgrade", "trailer"):
        assert r.header(name) is None, (name, r.headers)
    for v in r.headers_all("connection"):
        assert "x-resp-hop" not in v.lower(), r.headers
    assert r.header("x-resp-keep") == "1"


def test_x_forwarded_headers(echo_gw):
    r = echo_gw.request("GET", "/xff", [("X-Forwarded-For", "1.2.3.4")], host="orig.example")
    hs = seen_headers(r.json())
    assert hvals(hs, "x-forwarded-for") == ["1.2.3.4, 127.0.0.1"], hs
    assert hvals(hs, "x-forwarded-proto") == ["http"], hs
    assert hvals(hs, "x-forwarded-host") == ["orig.example"], hs
    # Without an incoming X-Forwarded-For the client address starts the list.
    r = echo_gw.request("GET", "/xff", host="orig.example")
    assert hvals(seen_headers(r.json()), "x-forwarded-for") == ["127.0.0.1"]


def test_request_id_generated_and_returned(echo_gw):
    ids = []
    for _ in range(2):
        r = echo_gw.request("GET", "/rid")
        seen = hvals(seen_headers(r.json()), "x-request-id")
        assert len(seen) == 1 and seen[0], r
        assert r.header("x-request-id") == seen[0], (r.headers, seen)
        ids.append(seen[0])
    assert ids[0] != ids[1]


def test_request_id_passed_through(echo_gw):
    r = echo_gw.request("GET", "/rid", [("X-Request-Id", "abc-123")])
    assert hvals(seen_headers(r.json()), "x-request-id") == ["abc-123"]
    assert r.header("x-request-id") in (None, "abc-123"), r.headers


# --------------------------------------------------------------------------------------------
# Keep-alive toward upstreams


def test_upstream_keepalive_reuse_one_client_connection(echo_gw):
    with echo_gw.connect() as c:
        for i in range(50):
            r = c.request("GET", "/ka/%d" % i)
            assert r.status == 200 and r.json()["path"] == "/ka/%d" % i
    assert echo_gw.backend.conn_count <= 2, echo_gw.backend.conn_count


def test_upstream_keepalive_reuse_across_client_connections(echo_gw):
    for i in range(50):
        r = echo_gw.request("GET", "/ka/%d" % i, [("Connection", "close")])
        assert r.status == 200
    # One pool per worker (workers: 2): at most one upstream connection each.
    assert echo_gw.backend.conn_count <= 2, echo_gw.backend.conn_count


def test_upstream_keepalive_timeout_respected(gateway, backend):
    b = backend("ka_timeout")  # announces timeout=1 and closes idle connections after 1 s
    g = gateway(proxy_config(), B1=b.addr)
    with g.connect() as c:
        for i in range(4):
            if i:
                time.sleep(1.2)  # the spacing is the point of the test
            r = c.request("GET", "/spaced/%d" % i)
            assert r.status == 200, (i, r)
    assert len(b.requests) == 4


def test_upstream_keepalive_timeout_hint_avoids_stale_connections(gateway, backend):
    # The backend does not close at its announced timeout; it resets a connection that is
    # used after it. POSTs cannot be replayed once written, so only a gateway that retires
    # pooled connections before `Keep-Alive: timeout=1` runs out gets them all through.
    b = backend("ka_timeout", lazy_close="1")
    g = gateway(proxy_config(), B1=b.addr)
    with g.connect() as c:
        for i in range(3):
            if i:
                time.sleep(1.2)  # the spacing is the point of the test
            r = c.request("POST", "/stale/%d" % i, body=b"payload")
            assert r.status == 200, (i, r)
    assert b.stale_resets == 0


def test_upstream_silently_closed_connections_are_retired(gateway, backend):
    b = backend("close_silently")  # closes after every response without saying so
    g = gateway(proxy_config(), B1=b.addr)
    with g.connect() as c:
        for i in range(20):
            r = c.request("GET", "/silent/%d" % i)
            assert r.status == 200, (i, r)
            assert r.json()["path"] == "/silent/%d" % i
    for i in range(5):  # and on fresh client connections
        assert g.request("GET", "/silent/x%d" % i).status == 200


# --------------------------------------------------------------------------------------------
# Pipelining and chunked bodies


def test_pipelined_requests_answered_in_order(echo_gw):
    body = b"p" * 5000
    with echo_gw.connect() as c:
        c.send(build_request("GET", "/one") + build_request("POST", "/two", body=body)
               + build_request("GET", "/three"))
        docs = [c.read_response().json() for _ in range(3)]
    assert [d["path"] for d in docs] == ["/one", "/two", "/three"]
    assert docs[1]["body_len"] == 5000
    assert docs[1]["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_request_body_reaches_backend_intact(echo_gw):
    body = bytes(i * 7 % 251 for i in range(300000))
    with echo_gw.connect() as c:
        c.send(build_request("POST", "/up", [("Transfer-Encoding", "chunked")],
                             chunk_encode(body, ext=True, trailers=["X-Trailer: t"])))
        r = c.read_response()
        # and the connection stays usable after the chunked body
        r2 = c.request("GET", "/after")
    doc = r.json()
    assert doc["body_len"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert r2.json()["path"] == "/after"


def test_chunked_response_reaches_client_intact(gateway, backend):
    b = backend("chunked", chunk="3")
    g = gateway(proxy_config(), B1=b.addr)
    with g.connect() as c:
        r = c.request("GET", "/chunky?pad=" + "z" * 3000)
        r2 = c.request("GET", "/chunky2")
    doc = r.json()  # a cut or mis-framed body would not parse
    assert doc["path"] == "/chunky" and doc["query"] == "pad=" + "z" * 3000
    assert r2.json()["path"] == "/chunky2"


# --------------------------------------------------------------------------------------------
# Failover, timeouts, errors


def test_connect_refused_failover(gateway, backend):
    b = backend()
    eps = "      - {address: 127.0.0.1:%d}\n      - {address: $B1}" % dead_port()
    g = gateway(proxy_config(endpoints=eps, upstream_extra="    balance: round_robin"),
                B1=b.addr)
    statuses = [g.request("GET", "/fo/%d" % i).status for i in range(20)]
    assert statuses == [200] * 20


def test_all_endpoints_refused_is_503(gateway):
    eps = "      - {address: 127.0.0.1:%d}\n      - {address: 127.0.0.1:%d}" % (
        dead_port(), dead_port())
    g = gateway(proxy_config(endpoints=eps, upstream_extra="    timeouts: {connect: 1s}"))
    t0 = time.monotonic()
    r = g.request("GET", "/dead")
    assert time.monotonic() - t0 < 3
    assert_gateway_error(r, 503)


def test_hung_backend_is_504_within_response_timeout(gateway, backend):
    b = backend("hang")
    g = gateway(proxy_config(upstream_extra="    timeouts: {response: 500ms}"), B1=b.addr)
    with g.connect(timeout=10) as c:
        t0 = time.monotonic()
        c.send(build_request("GET", "/hang"))
        r = c.read_response(timeout=10)
        elapsed = time.monotonic() - t0
    assert_gateway_error(r, 504)
    assert 0.4 <= elapsed < 3.0, elapsed


def test_slow_backend_within_timeout_is_fine(gateway, backend):
    b = backend("slow", delay="0.2")
    g = gateway(proxy_config(upstream_extra="    timeouts: {response: 2s}"), B1=b.addr)
    assert g.request("GET", "/slow").status == 200


MALFORMED = {
    "bad_status_code": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
    "not_http": b"HELLO WORLD\r\n\r\n",
    "bad_version": b"HTTP/9.9 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "header_space_in_name": b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 2\r\n\r\nok",
    "header_no_colon": b"HTTP/1.1 200 OK\r\nNoColonHere\r\nContent-Length: 2\r\n\r\nok",
    "cl_and_te": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"2\r\nok\r\n0\r\n\r\n"),
    "cl_conflict": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "cl_not_number": b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nok",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_upstream_response_is_502(gateway, backend, case):
    b = backend("raw", raw=MALFORMED[case])
    g = gateway(proxy_config(), B1=b.addr)
    r = g.request("GET", "/bad")
    assert_gateway_error(r, 502)


# RFC 9112 lets a proxy either reject these with 502 or repair them before forwarding
# (remove the whitespace before the colon; replace obs-fold by SP).
REPAIRABLE = {
    "header_space_before_colon": b"HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 2\r\n\r\nok",
    "obs_fold": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  folded\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("case", sorted(REPAIRABLE))
def test_repairable_upstream_response_is_502_or_repaired(gateway, backend, case):
    b = backend("raw", raw=REPAIRABLE[case])
    g = gateway(proxy_config(), B1=b.addr)
    r = g.request("GET", "/bad")
    if r.status == 502:
        assert_gateway_error(r, 502)
        return
    assert r.status == 200 and r.body == b"ok", r
    for k, v in r.headers:
        assert k == k.strip() and "\r" not in v and "\n" not in v, r.headers


@pytest.mark.parametrize("chunk", [b"zz\r\nok\r\n0\r\n\r\n", b"2\r\nokXX0\r\n\r\n",
                                   b"ffffffffffffffffff\r\nok\r\n0\r\n\r\n"])
def test_bad_upstream_chunk_framing_is_502_or_cut(gateway, backend, chunk):
    b = backend("raw", raw=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)
    g = gateway(proxy_config(), B1=b.addr)
    with g.connect() as c:
        c.send(build_request("GET", "/badchunk"))
        resp, err = c.try_read_response()
        if resp is not None:
            # Only a gateway error is acceptable as a complete response.
            assert_gateway_error(resp, 502)
        else:
            assert c.wait_closed(timeout=3)[0], "connection neither answered nor closed"


def test_upstream_closing_mid_body_is_not_a_complete_response(gateway, backend):
    b = backend("close_after_headers")  # announces 1000 bytes, sends 3, closes
    g = gateway(proxy_config(), B1=b.addr)
    with g.connect() as c:
        c.send(build_request("GET", "/cut"))
        resp, err = c.try_read_response()
        if resp is not None:
            assert_gateway_error(resp, 502)
        else:
            assert c.wait_closed(timeout=3)[0]


def test_gateway_recovers_after_upstream_errors(gateway, backend):
    bad = backend("raw", raw=MALFORMED["bad_status_code"])
    good = backend()
    eps = "      - {address: $BAD}\n      - {address: $GOOD}"
    g = gateway(proxy_config(endpoints=eps), BAD=bad.addr, GOOD=good.addr)
    statuses = {g.request("GET", "/mix/%d" % i).status for i in range(10)}
    assert statuses <= {200, 502} and 200 in statuses, statuses


def test_concurrent_clients(echo_gw):
    errors = []

    def worker(n):
        try:
            with echo_gw.connect() as c:
                for i in range(20):
                    r = c.request("POST", "/cc/%d/%d" % (n, i), body=b"b" * (i * 100))
                    d = r.json()
                    assert d["path"] == "/cc/%d/%d" % (n, i) and d["body_len"] == i * 100
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    ts = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors, errors


def test_many_pipelined_requests(echo_gw):
    n = 30
    with echo_gw.connect(timeout=10) as c:
        c.send(b"".join(build_request("GET", "/pl/%d" % i) for i in range(n)))
        paths = [c.read_response().json()["path"] for _ in range(n)]
    assert paths == ["/pl/%d" % i for i in range(n)]


def test_pipelined_burst_larger_than_the_input_buffer(echo_gw):
    # 1000 requests (~60 KiB) in one write: the buffer fills, the last buffered head is cut,
    # and the rest must be read although no new readiness edge arrives for it.
    n = 1000
    with echo_gw.connect(timeout=20) as c:
        c.send(b"".join(build_request("GET", "/big/%05d" % i) for i in range(n)))
        paths = [c.read_response().json()["path"] for _ in range(n)]
    assert paths == ["/big/%05d" % i for i in range(n)]


def test_client_abort_mid_upload_does_not_hurt(echo_gw):
    with echo_gw.connect() as c:
        c.send(build_request("POST", "/abort", [("Content-Length", "100000")]) + b"a" * 5000)
    with echo_gw.connect() as c:
        c.send(build_request("POST", "/abort-chunked", [("Transfer-Encoding", "chunked")])
               + b"1000\r\n" + b"b" * 100)
    r = echo_gw.request("GET", "/after-abort")
    assert r.status == 200 and r.json()["path"] == "/after-abort"


def test_client_gone_while_backend_slow(gateway, backend):
    b = backend("slow", delay="0.5")
    g = gateway(proxy_config(), B1=b.addr)
    for i in range(3):
        with g.connect() as c:
            c.send(build_request("GET", "/gone/%d" % i))
        # closed before the answer
    assert b.wait_requests(3, timeout=5)
    r = g.request("GET", "/after-gone")
    assert r.status == 200 and r.json()["path"] == "/after-gone"


def test_round_robin_spreads_requests(gateway, backend):
    b1, b2 = backend(), backend()
    eps = "      - {address: $B1}\n      - {address: $B2}"
    g = gateway(proxy_config(endpoints=eps, upstream_extra="    balance: round_robin"),
                B1=b1.addr, B2=b2.addr)
    with g.connect() as c:
        for i in range(10):
            assert c.request("GET", "/rr/%d" % i).status == 200
    assert len(b1.requests) >= 4 and len(b2.requests) >= 4, (len(b1.requests), len(b2.requests))


def test_hash_on_header_is_sticky(gateway, backend):
    bs = [backend(), backend(), backend()]
    eps = "\n".join("      - {address: $B%d}" % i for i in range(3))
    g = gateway(proxy_config(endpoints=eps, upstream_extra="    balance: hash\n"
                             "    hash_on: header:X-User-Id"),
                **{"B%d" % i: b.addr for i, b in enumerate(bs)})
    seen = {}
    for rnd in range(4):
        for uid in ("alice", "bob", "carol", "dave", "erin", "frank"):
            doc = g.request("GET", "/h/%s" % uid, [("X-User-Id", uid)]).json()
            seen.setdefault(uid, set()).add(doc["peer_port"])
    assert all(len(ports) == 1 for ports in seen.values()), seen


@pytest.mark.parametrize("balance", ["round_robin", "least_request", "hash"])
def test_balancers_proxy(gateway, backend, balance):
    b1, b2 = backend(), backend()
    eps = "      - {address: $B1}\n      - {address: $B2}"
    g = gateway(proxy_config(endpoints=eps, upstream_extra="    balance: %s" % balance),
                B1=b1.addr, B2=b2.addr)
    assert [g.request("GET", "/b/%d" % i).status for i in range(10)] == [200] * 10
