"""Self-tests of the scripted peers and the raw client, without sluice: if these fail, the
other results mean nothing."""

import hashlib
import time

from client import RawClient, build_request, chunk_encode
from peers import BLOCK, Backend, big_sha256, dead_port, gen_stream


def test_echo_reports_request_and_counts_connections(backend):
    b = backend()
    body = b"x" * 1000
    with RawClient(b.port) as c:
        for i in range(3):
            r = c.request("POST", "/p/%d?a=1&b=2" % i, [("X-A", "1")], body)
            assert r.status == 200
            doc = r.json()
            assert doc["method"] == "POST"
            assert doc["path"] == "/p/%d" % i
            assert doc["query"] == "a=1&b=2"
            assert ["X-A", "1"] in doc["headers"]
            assert doc["body_len"] == 1000
            assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert b.conn_count == 1
    assert len(b.requests) == 3


def test_chunked_request_and_response(backend):
    b = backend("chunked")
    body = bytes(range(256)) * 400
    with RawClient(b.port) as c:
        c.send(build_request("POST", "/c", [("Transfer-Encoding", "chunked")],
                             chunk_encode(body, ext=True, trailers=["X-T: 1"])))
        r = c.read_response()
        assert r.chunked
        doc = r.json()
        assert doc["body_len"] == len(body)
        assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_big_stream_hash_known(backend):
    b = backend("big")
    n = 3 * BLOCK + 123
    h = hashlib.sha256()
    with RawClient(b.port) as c:
        c.send(build_request("GET", "/big?size=%d" % n))
        r = c.read_response(sink=h.update)
    assert r.body_len == n
    assert h.hexdigest() == big_sha256(n)
    # chunked variant, and the generator differs block by block
    with RawClient(b.port) as c:
        h2 = hashlib.sha256()
        c.send(build_request("GET", "/big?size=%d&chunked=1" % n))
        r = c.read_response(sink=h2.update)
        assert r.chunked and h2.hexdigest() == big_sha256(n)
    blocks = list(gen_stream(4 * BLOCK))
    assert len(set(blocks)) == 4


def test_slow_and_hang(backend):
    b = backend()
    with RawClient(b.port) as c:
        t0 = time.monotonic()
        r = c.request("GET", "/s?mode=slow&delay=0.3")
        assert r.status == 200 and time.monotonic() - t0 >= 0.3
    with RawClient(b.port, timeout=0.5) as c:
        c.send(build_request("GET", "/h?mode=hang"))
        resp, err = c.try_read_response()
        assert resp is None and err == "timeout"


def test_close_after_headers_is_incomplete(backend):
    b = backend("close_after_headers")
    with RawClient(b.port) as c:
        c.send(build_request())
        resp, err = c.try_read_response()
        assert resp is None and "missing" in err


def test_raw_and_status_modes(backend):
    b = backend("raw", raw=b"HTTP/1.1 2x0 OK\r\n\r\n")
    with RawClient(b.port) as c:
        c.send(build_request())
        resp, err = c.try_read_response()
        assert resp is None and "bad status" in err
    s = backend("status")
    with RawClient(s.port) as c:
        for st in (204, 304):
            r = c.request("GET", "/?status=%d" % st)
            assert r.status == st and r.body == b""
        r = c.request("GET", "/?status=200&interim=103")
        assert r.status == 200 and [i.status for i in r.interim] == [103]


def test_keepalive_timeout_backend_closes_idle(backend):
    b = backend("ka_timeout", idle="0.3")
    with RawClient(b.port) as c:
        r = c.request()
        assert r.header("keep-alive") == "timeout=1"
        t0 = time.monotonic()
        assert c.closed(timeout=3)
        assert 0.25 <= time.monotonic() - t0 < 2


def test_close_silently_backend(backend):
    b = backend("close_silently")
    with RawClient(b.port) as c:
        r = c.request()
        assert r.status == 200 and r.header("connection") is None
        assert c.closed(timeout=2)


def test_expect_continue_and_slow_reader(backend):
    b = backend(read_rate="200000")
    body = b"y" * 100000
    with RawClient(b.port) as c:
        c.send(build_request("POST", "/e", [("Expect", "100-continue"),
                                              ("Content-Length", str(len(body)))]))
        interim = c.read_head()
        assert interim.status == 100
        t0 = time.monotonic()
        c.send(body)
        r = c.read_response()
        assert r.json()["body_len"] == len(body)
        assert time.monotonic() - t0 >= 0.4  # 100 kB at 200 kB/s


def test_pipelined_requests_to_peer(backend):
    b = backend()
    with RawClient(b.port) as c:
        c.send(b"".join(build_request("GET", "/%d" % i) for i in range(3)))
        assert [c.read_response().json()["path"] for _ in range(3)] == ["/0", "/1", "/2"]


def test_dead_port_refuses():
    import socket

    p = dead_port()
    try:
        socket.create_connection(("127.0.0.1", p), timeout=1).close()
        assert False, "connected to a dead port"
    except ConnectionRefusedError:
        pass


def test_backend_stop_is_bounded():
    b = Backend("hang")
    c = RawClient(b.port)
    c.send(build_request())
    assert b.wait_requests(1)
    t0 = time.monotonic()
    b.stop()
    assert time.monotonic() - t0 < 3
    assert c.closed(timeout=2)
    c.close()


def test_keepalive_timeout_lazy_close_resets_stale_use(backend):
    b = backend("ka_timeout", idle="0.2", lazy_close="1")
    with RawClient(b.port) as c:
        assert c.request().status == 200
        time.sleep(0.4)  # past the backend's idle period
        c.send(build_request())
        resp, err = c.try_read_response()
        assert resp is None and c.reset, err
    assert b.stale_resets == 1
