"""Bodies: 1 GiB both ways with bounded gateway memory, backpressure toward slow readers,
Expect: 100-continue, HEAD, 1xx/204/304 from the backend, HTTP/1.0 clients."""

import hashlib
import os
import time

import pytest

from client import build_request
from helpers import RssSampler, is_sanitizer_build, proxy_config
from peers import BLOCK, big_sha256, gen_stream

BIG = int(os.environ.get("SLUICE_BIG_BYTES", str(1 << 30)))
RSS_LIMIT_KIB = int(os.environ.get("SLUICE_RSS_LIMIT_MIB", "64")) * 1024
BIG_LIMITS = "{max_body_bytes: 2GiB, body_timeout: 30s}"


def check_rss(gw, sampler):
    assert sampler.samples > 0, "no RSS samples taken"
    if is_sanitizer_build():
        return  # ASan's shadow memory and quarantine make RSS meaningless
    assert sampler.max_kib < RSS_LIMIT_KIB, "gateway RSS peaked at %d KiB (limit %d KiB)" % (
        sampler.max_kib, RSS_LIMIT_KIB)


def upload(gw, n, target="/upload", timeout=120, chunked=False):
    framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(n))
    with gw.connect(timeout=30) as c:
        c.send(build_request("POST", target, [framing,
                                             ("Content-Type", "application/octet-stream")]))
        pending = []
        size = 0
        for block in gen_stream(n):
            pending.append(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            size += len(block)
            if size >= 4 * BLOCK:
                c.send(b"".join(pending))
                pending, size = [], 0
        if chunked:
            pending.append(b"0\r\n\r\n")
        if pending:
            c.send(b"".join(pending))
        return c.read_response(timeout=timeout)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_big_upload_streams_with_bounded_memory(gateway, backend, chunked):
    n = BIG if not chunked else max(1, BIG // 4)
    b = backend()
    g = gateway(proxy_config(limits=BIG_LIMITS, upstream_extra="    timeouts: {response: 60s}"),
                B1=b.addr)
    expected = big_sha256(n)
    t0 = time.monotonic()
    with RssSampler(g) as s:
        r = upload(g, n, chunked=chunked)
    elapsed = time.monotonic() - t0
    assert r.status == 200, r
    doc = r.json()
    assert doc["body_len"] == n
    assert doc["body_sha256"] == expected
    check_rss(g, s)
    print("upload %d bytes in %.1fs, peak RSS %d KiB" % (n, elapsed, s.max_kib))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_big_download_streams_with_bounded_memory(gateway, backend, chunked):
    n = BIG if not chunked else max(1, BIG // 4)
    b = backend("big")
    g = gateway(proxy_config(limits=BIG_LIMITS), B1=b.addr)
    expected = big_sha256(n)
    h = hashlib.sha256()
    t0 = time.monotonic()
    with RssSampler(g) as s, g.connect(timeout=30) as c:
        c.send(build_request("GET", "/big?size=%d%s" % (n, "&chunked=1" if chunked else "")))
        r = c.read_response(sink=h.update, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.status == 200, r
    assert r.body_len == n
    assert h.hexdigest() == expected
    check_rss(g, s)
    print("download %d bytes in %.1fs, peak RSS %d KiB" % (n, elapsed, s.max_kib))


SLOW_N = min(BIG, 256 << 20)


def test_backpressure_toward_slow_client(gateway, backend):
    b = backend("big")
    g = gateway(proxy_config(limits=BIG_LIMITS), B1=b.addr)
    h = hashlib.sha256()
    with RssSampler(g) as s, g.connect(timeout=30) as c:
        c.send(build_request("GET", "/big?size=%d" % SLOW_N))
        time.sleep(1.5)  # the client not reading is the point of the test
        r = c.read_response(sink=h.update, timeout=60)
    assert r.body_len == SLOW_N and h.hexdigest() == big_sha256(SLOW_N)
    check_rss(g, s)


def test_backpressure_toward_slow_backend(gateway, backend):
    b = backend(read_pause="1.5")  # reads nothing of the body for 1.5 s
    g = gateway(proxy_config(limits=BIG_LIMITS, upstream_extra="    timeouts: {response: 30s}"),
                B1=b.addr)
    with RssSampler(g) as s:
        r = upload(g, SLOW_N, timeout=60)
    doc = r.json()
    assert doc["body_len"] == SLOW_N and doc["body_sha256"] == big_sha256(SLOW_N)
    check_rss(g, s)


# --------------------------------------------------------------------------------------------


@pytest.fixture
def echo_gw(gateway, backend):
    b = backend()
    g = gateway(proxy_config(limits="{max_body_bytes: 1MiB}"), B1=b.addr)
    g.backend = b
    return g


def test_expect_100_continue(echo_gw):
    body = os.urandom(100000)
    with echo_gw.connect() as c:
        c.send(build_request("POST", "/expect", [("Expect", "100-continue"),
                                                  ("Content-Length", str(len(body)))]))
        interim = c.read_head(timeout=3)
        assert interim.status == 100, interim
        assert interim.raw_head.startswith(b"HTTP/1.1 100 Continue\r\n"), interim.raw_head
        c.send(body)
        r = c.read_response()
        # the connection stays usable
        r2 = c.request("GET", "/after")
    assert r.status == 200, r
    doc = r.json()
    assert doc["body_len"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert r2.status == 200


def test_expect_100_continue_rejected_when_too_large(echo_gw):
    with echo_gw.connect() as c:
        c.send(build_request("POST", "/expect-big", [("Expect", "100-continue"),
                                                      ("Content-Length", str(5 << 20))]))
        first = c.read_head(timeout=3)
        assert first.status == 413, first  # final answer, no 100 Continue first
    assert "/expect-big" not in echo_gw.backend.paths()


def test_head_has_headers_without_body(echo_gw):
    with echo_gw.connect() as c:
        r = c.request("HEAD", "/head")
        assert r.status == 200 and r.body == b""
        assert int(r.header("content-length", "1")) > 0, r.headers  # length of the GET body
        # A body sent after the HEAD response would break the next response's framing.
        r2 = c.request("GET", "/after-head")
        assert r2.json()["path"] == "/after-head"


def test_head_on_chunked_backend(gateway, backend):
    b = backend("chunked")
    g = gateway(proxy_config(), B1=b.addr)
    with g.connect() as c:
        r = c.request("HEAD", "/head-chunked")
        assert r.status == 200 and r.body == b""
        assert c.request("GET", "/after").json()["path"] == "/after"


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(gateway, backend, status):
    b = backend("status")
    g = gateway(proxy_config(), B1=b.addr)
    with g.connect() as c:
        t0 = time.monotonic()
        r = c.request("GET", "/nobody?status=%d" % status)
        assert time.monotonic() - t0 < 2  # 304 announces Content-Length: 50, sends nothing
        assert r.status == status
        assert r.header("transfer-encoding") is None, r.headers
        if status == 204:
            assert r.header("content-length") in (None, "0"), r.headers
        r2 = c.request("GET", "/after?status=200")
        assert r2.status == 200 and r2.json()["path"] == "/after"
        assert c.closed(timeout=0.2) is False  # still usable, nothing extra arrived


def test_interim_1xx_then_final(gateway, backend):
    b = backend("status")
    g = gateway(proxy_config(), B1=b.addr)
    with g.connect() as c:
        r = c.request("GET", "/early?status=200&interim=103")
        assert r.status == 200
        assert r.json()["path"] == "/early"
        assert all(i.status == 103 for i in r.interim), r.interim
        r2 = c.request("GET", "/after?status=200")
        assert r2.status == 200 and r2.json()["path"] == "/after"


def test_http10_client_gets_delimited_body_and_close(echo_gw):
    with echo_gw.connect() as c:
        c.send(b"GET /ten HTTP/1.0\r\nHost: a\r\n\r\n")
        r = c.read_response()
        assert r.status == 200
        assert r.header("transfer-encoding") is None, r.headers
        assert r.json()["path"] == "/ten"
        assert c.closed(timeout=3)


def test_http10_without_host_is_fine(echo_gw):
    with echo_gw.connect() as c:
        c.send(b"GET /ten-nohost HTTP/1.0\r\n\r\n")
        r = c.read_response()
        assert r.status == 200, r
        assert r.json()["path"] == "/ten-nohost"


def test_http10_client_with_chunked_backend_is_not_chunked(gateway, backend):
    b = backend("chunked")
    g = gateway(proxy_config(), B1=b.addr)
    with g.connect() as c:
        c.send(b"GET /ten-chunked HTTP/1.0\r\nHost: a\r\n\r\n")
        r = c.read_response()
        assert r.header("transfer-encoding") is None, r.headers
        assert r.json()["path"] == "/ten-chunked"
        assert c.closed(timeout=3)


def test_http10_keepalive(echo_gw):
    with echo_gw.connect() as c:
        c.send(b"GET /ka10 HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
        r = c.read_response()
        assert r.status == 200 and r.header("transfer-encoding") is None
        if "keep-alive" in r.header("connection", "").lower():
            assert r.header("content-length") is not None, r.headers
            c.send(b"GET /ka10b HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
            assert c.read_response().json()["path"] == "/ka10b"
        else:
            assert c.closed(timeout=3)
