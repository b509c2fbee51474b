"""L4 (TCP) listeners: `protocol: tcp` forwards each connection to an endpoint of its upstream.

Backends here are raw TCP servers driven by per-connection handlers (threads); the client side
is plain sockets. Covered: a 1 GiB stream each way at once, byte-exact (SHA-256 of what each
side sent and received); half-close in each direction; connect failover from a refused
endpoint and its ejection; everything down; connect timeout against a SYN-dropping listener;
idle timeout; PROXY v1 and v2 headers with the client's address; circuit-breaker overflow;
200 concurrent connections byte-exact; drain with a connection open.
"""

import hashlib
import os
import socket
import struct
import threading
import time

import pytest

from helpers import is_sanitizer_build, poll, stalled_listener
from peers import dead_port

CHUNK = 1 << 20


class TcpBackend:
    """A raw TCP server; each accepted connection runs handler(conn, backend) on a thread.
    Handler results (anything it appends to backend.results) are read by the test."""

    def __init__(self, handler):
        self.handler = handler
        self.results = []
        self.errors = []
        self.accepted = 0
        self.lock = threading.Lock()
        self._stopped = threading.Event()
        self._conns = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.addr = "127.0.0.1:%d" % self.port
        self._t = threading.Thread(target=self._accept_loop, daemon=True)
        self._t.start()

    def _accept_loop(self):
        while not self._stopped.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            c.settimeout(30)
            with self.lock:
                self.accepted += 1
                self._conns.append(c)
            threading.Thread(target=self._run, args=(c,), daemon=True).start()

    def _run(self, c):
        try:
            self.handler(c, self)
        except Exception as e:  # noqa: BLE001 - reported to the test
            with self.lock:
                self.errors.append(repr(e))
        finally:
            try:
                c.close()
            except OSError:
                pass

    def add(self, r):
        with self.lock:
            self.results.append(r)

    def stop(self):
        self._stopped.set()
        self.sock.close()
        with self.lock:
            for c in self._conns:
                try:
                    c.close()
                except OSError:
                    pass


@pytest.fixture
def tcp_backend():
    started = []

    def make(handler):
        b = TcpBackend(handler)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


def l4_config(endpoints, upstream_extra="", listener_extra="", workers=2):
    eps = "".join("      - {address: %s}\n" % e for e in endpoints)
    text = (
        "workers: %d\n"
        "drain_timeout: 3s\n"
        "log_level: info\n"
        "listeners:\n"
        "  - name: tcp\n"
        "    address: 127.0.0.1:$PORT_tcp\n"
        "    protocol: tcp\n"
        "    upstream: back\n" % workers
    )
    if listener_extra:
        text += listener_extra.rstrip("\n") + "\n"
    text += "upstreams:\n  - name: back\n    endpoints:\n" + eps
    if upstream_extra:
        text += upstream_extra.rstrip("\n") + "\n"
    return text


def stream_chunks(seed, total):
    """A deterministic pseudo-random stream: 1 MiB chunks, each a fresh counter before a random
    block, so a lost, repeated or reordered piece changes the hash."""
    base = bytearray(hashlib.shake_256(b"sluice-l4-%d" % seed).digest(CHUNK))
    sent = 0
    i = 0
    while sent < total:
        base[:8] = struct.pack("<Q", i)
        n = min(CHUNK, total - sent)
        yield bytes(base[:n])
        sent += n
        i += 1


def send_stream(sock, seed, total, shut=True):
    h = hashlib.sha256()
    for chunk in stream_chunks(seed, total):
        h.update(chunk)
        sock.sendall(chunk)
    if shut:
        sock.shutdown(socket.SHUT_WR)
    return h.hexdigest()


def recv_all(sock, limit=None):
    """Reads until EOF; returns (sha256 hex, byte count)."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    n_total = 0
    while True:
        n = sock.recv_into(view)
        if n == 0:
            return h.hexdigest(), n_total
        h.update(view[:n])
        n_total += n
        if limit is not None and n_total > limit:
            raise AssertionError("more bytes than sent")


def echo(c):
    """Echoes until EOF, then half-closes; returns the byte count."""
    n = 0
    while True:
        d = c.recv(65536)
        if not d:
            break
        n += len(d)
        c.sendall(d)
    c.shutdown(socket.SHUT_WR)
    return n


def echo_handler(c, b):
    # The gateway's start-up probe (a connect and close) is forwarded too: only connections
    # that carried bytes count.
    if echo(c):
        b.add("echoed")


def connect(gw, timeout=10):
    s = socket.create_connection(("127.0.0.1", gw.ports["tcp"]), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def closed_promptly(s, within):
    """True when the connection ends (EOF or reset) within `within` seconds."""
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


# ---- tests --------------------------------------------------------------------------------------


def test_gib_both_ways_byte_exact(gateway, tcp_backend):
    total = (1 << 30) if not is_sanitizer_build() else (128 << 20)

    def handler(c, b):
        out = {}

        def sender():
            try:
                out["sent"] = send_stream(c, 2, total)
            except OSError:
                pass  # the start-up probe: the gateway closed it

        t = threading.Thread(target=sender)
        t.start()
        got, n = recv_all(c, total)
        t.join()
        if n:
            b.add({"recv": got, "n": n, "sent": out.get("sent")})

    be = tcp_backend(handler)
    gw = gateway(l4_config([be.addr]))
    s = connect(gw, timeout=60)
    t0 = time.monotonic()
    out = {}
    t = threading.Thread(target=lambda: out.update(sent=send_stream(s, 1, total)))
    t.start()
    got, n = recv_all(s, total)
    t.join()
    took = time.monotonic() - t0
    s.close()
    assert poll(lambda: be.results, 10), be.errors
    r = be.results[0]
    assert n == total and r["n"] == total
    assert got == r["sent"], "downstream bytes differ"
    assert r["recv"] == out["sent"], "upstream bytes differ"
    print("\n%d MiB each way in %.1fs (%.0f MiB/s per direction)"
          % (total >> 20, took, (total >> 20) / took))
    assert took < 60


def test_half_close_client_first(gateway, tcp_backend):
    answer = os.urandom(300000)

    def handler(c, b):
        got, n = recv_all(c)  # until the client's FIN
        if n == 0:
            return  # the start-up probe
        c.sendall(answer)  # the backend still answers after it
        c.shutdown(socket.SHUT_WR)
        b.add((got, n))

    be = tcp_backend(handler)
    gw = gateway(l4_config([be.addr]))
    s = connect(gw)
    req = os.urandom(100000)
    s.sendall(req)
    s.shutdown(socket.SHUT_WR)
    got, n = recv_all(s)
    assert n == len(answer) and got == hashlib.sha256(answer).hexdigest()
    assert poll(lambda: be.results, 5)
    assert be.results[0] == (hashlib.sha256(req).hexdigest(), len(req))
    s.close()


def test_half_close_backend_first(gateway, tcp_backend):
    greeting = os.urandom(200000)

    def handler(c, b):
        try:
            c.sendall(greeting)
            c.shutdown(socket.SHUT_WR)  # done talking, still listening
            got, n = recv_all(c)
        except OSError:
            return  # the start-up probe
        if n:
            b.add((got, n))

    be = tcp_backend(handler)
    gw = gateway(l4_config([be.addr]))
    s = connect(gw)
    got, n = recv_all(s)  # the backend's FIN reaches the client
    assert n == len(greeting) and got == hashlib.sha256(greeting).hexdigest()
    body = os.urandom(500000)
    s.sendall(body)  # and the client can still send
    s.shutdown(socket.SHUT_WR)
    assert poll(lambda: be.results, 5)
    assert be.results[0] == (hashlib.sha256(body).hexdigest(), len(body))
    assert closed_promptly(s, 5)
    s.close()


def test_failover_from_refused_endpoint_and_ejection(gateway, tcp_backend):
    be = tcp_backend(echo_handler)
    dead = "127.0.0.1:%d" % dead_port()
    gw = gateway(l4_config([dead, be.addr], workers=1, upstream_extra="""
    retries: {attempts: 2}
    health: {passive: {consecutive_failures: 2, ejection: 30s}}
"""))
    for i in range(8):
        s = connect(gw)
        msg = b"hello %d" % i
        s.sendall(msg)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            d = s.recv(100)
            if not d:
                break
            data += d
        assert data == msg
        s.close()
    assert poll(lambda: len(be.results) == 8, 5), be.results
    assert poll(lambda: "endpoint %s: ejected" % dead in gw.stderr_text(), 5), gw.diag()


def test_all_endpoints_down_closes_promptly(gateway):
    gw = gateway(l4_config(["127.0.0.1:%d" % dead_port(), "127.0.0.1:%d" % dead_port()],
                           upstream_extra="    retries: {attempts: 1}"))
    for _ in range(3):
        t0 = time.monotonic()
        try:
            s = connect(gw)
        except ConnectionResetError:
            continue  # closed before connect() even returned
        assert closed_promptly(s, 2)
        assert time.monotonic() - t0 < 1.0
        s.close()


def test_connect_timeout_then_failover(gateway, tcp_backend):
    be = tcp_backend(echo_handler)
    with stalled_listener() as port:
        # Only the blackhole: the client is closed once the connect timed out.
        gw = gateway(l4_config(["127.0.0.1:%d" % port], workers=1, upstream_extra="""
    timeouts: {connect: 300ms}
    retries: {attempts: 0}
"""))
        s = connect(gw)
        t0 = time.monotonic()
        assert closed_promptly(s, 3)
        took = time.monotonic() - t0
        assert 0.25 <= took < 1.5, took
        s.close()
        gw.stop()
        # The blackhole first, then a live one: the stream goes through after the timeout.
        gw = gateway(l4_config(["127.0.0.1:%d" % port, be.addr], workers=1, upstream_extra="""
    timeouts: {connect: 300ms}
    retries: {attempts: 1}
"""))
        s = connect(gw)
        t0 = time.monotonic()
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        assert time.monotonic() - t0 < 2
        s.close()


def test_idle_timeout_closes_both_sides(gateway, tcp_backend):
    def handler(c, b):
        d = c.recv(100)
        c.sendall(d)
        t0 = time.monotonic()
        rest = c.recv(100)  # the gateway's FIN after the idle timeout
        b.add((rest, time.monotonic() - t0))

    be = tcp_backend(handler)
    gw = gateway(l4_config([be.addr], listener_extra="    limits: {idle_timeout: 400ms}"))
    s = connect(gw)
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    t0 = time.monotonic()
    assert closed_promptly(s, 3)
    took = time.monotonic() - t0
    assert 0.3 <= took < 2.0, took
    assert poll(lambda: be.results, 3)
    assert be.results[0][0] == b""
    s.close()


def read_exact(c, n):
    data = b""
    while len(data) < n:
        d = c.recv(n - len(data))
        if not d:
            raise AssertionError("EOF inside the PROXY header")
        data += d
    return data


def parse_proxy_header(c):
    """Reads one PROXY v1 or v2 header; returns (version, (src ip, port), (dst ip, port))."""
    first = read_exact(c, 1)
    if first == b"P":
        line = first
        while not line.endswith(b"\r\n"):
            line += read_exact(c, 1)
            assert len(line) <= 107
        parts = line[:-2].decode().split(" ")
        assert parts[0] == "PROXY" and parts[1] in ("TCP4", "TCP6"), line
        return 1, (parts[2], int(parts[4])), (parts[3], int(parts[5]))
    head = first + read_exact(c, 15)
    assert head[:12] == b"\r\n\r\n\x00\r\nQUIT\n", head
    assert head[12] == 0x21, "version 2, PROXY command"
    fam = head[13]
    length = struct.unpack(">H", head[14:16])[0]
    body = read_exact(c, length)
    if fam == 0x11:
        src = socket.inet_ntop(socket.AF_INET, body[0:4])
        dst = socket.inet_ntop(socket.AF_INET, body[4:8])
        sp, dp = struct.unpack(">HH", body[8:12])
    else:
        assert fam == 0x21, fam
        src = socket.inet_ntop(socket.AF_INET6, body[0:16])
        dst = socket.inet_ntop(socket.AF_INET6, body[16:32])
        sp, dp = struct.unpack(">HH", body[32:36])
    return 2, (src, sp), (dst, dp)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_header(gateway, tcp_backend, version):
    def handler(c, b):
        try:
            hdr = parse_proxy_header(c)
        except AssertionError:
            return  # the start-up probe closed before its header was whole
        if echo(c):
            b.add(hdr)

    be = tcp_backend(handler)
    gw = gateway(l4_config([be.addr], upstream_extra="    proxy_protocol: %s" % version))
    s = connect(gw)
    s.sendall(b"payload after the header")
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        d = s.recv(1000)
        if not d:
            break
        data += d
    assert data == b"payload after the header"
    assert poll(lambda: be.results, 5), be.errors
    ver, src, dst = be.results[0]
    assert ver == int(version[1])
    assert src == s.getsockname()
    assert dst == ("127.0.0.1", gw.ports["tcp"])
    s.close()


def test_breaker_max_connections_refuses(gateway, tcp_backend):
    be = tcp_backend(echo_handler)
    gw = gateway(l4_config([be.addr], upstream_extra="    circuit_breaker: {max_connections: 1}"))

    def open_one():
        try:
            c = connect(gw)
        except ConnectionResetError:
            return None
        try:
            c.sendall(b"c")
            if c.recv(1) == b"c":
                return c
        except OSError:
            pass
        c.close()
        return None

    # The start-up probe may hold the slot for a moment; then `a` holds it.
    a = poll(open_one, 5, interval=0.05)
    assert a
    try:
        b = connect(gw)
    except ConnectionResetError:
        pass  # the reset came before connect() returned: refused at once
    else:
        assert closed_promptly(b, 2)  # refused at once: the breaker is full
        b.close()
    a.close()
    c = poll(open_one, 5, interval=0.05)  # the slot came back when `a` ended
    assert c
    c.close()



def test_process_connection_cap_counts_tcp_streams(gateway, tcp_backend):
    """Tunnels count against the process-wide max_connections like HTTP connections: at the
    cap a new client waits in the backlog (not refused) and is served once a stream ends."""
    be = tcp_backend(echo_handler)
    gw = gateway("max_connections: 2\n" + l4_config([be.addr], workers=1))

    def open_one():
        c = connect(gw)
        c.settimeout(5)
        c.sendall(b"x")
        if c.recv(1) == b"x":
            return c
        c.close()
        return None

    held = [poll(open_one, 5, interval=0.05), poll(open_one, 5, interval=0.05)]
    assert all(held)
    waiting = connect(gw)  # completes in the kernel's backlog
    waiting.sendall(b"w")
    waiting.settimeout(0.5)
    with pytest.raises(socket.timeout):
        waiting.recv(1)  # not accepted while two streams are open
    held.pop().close()
    waiting.settimeout(5)
    assert waiting.recv(1) == b"w"  # accepted once one ended
    waiting.close()
    for c in held:
        c.close()


def test_many_concurrent_connections_byte_exact(gateway, tcp_backend):
    be = tcp_backend(echo_handler)
    gw = gateway(l4_config([be.addr]))
    n_conns, size = 200, 256 * 1024
    results = [None] * n_conns
    payloads = [os.urandom(size) for _ in range(n_conns)]
    barrier = threading.Barrier(n_conns)

    def one(i):
        try:
            s = connect(gw, timeout=30)
            barrier.wait(timeout=30)  # every connection open at once
            t = threading.Thread(target=lambda: (s.sendall(payloads[i]),
                                                 s.shutdown(socket.SHUT_WR)))
            t.start()
            got = bytearray()
            while True:
                d = s.recv(65536)
                if not d:
                    break
                got += d
            t.join()
            s.close()
            results[i] = bytes(got) == payloads[i]
        except Exception as e:  # noqa: BLE001
            results[i] = repr(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * n_conns, [r for r in results if r is not True][:5]
    assert poll(lambda: len(be.results) == n_conns, 5), len(be.results)


def test_drain_waits_for_open_connection(gateway, tcp_backend):
    be = tcp_backend(echo_handler)
    gw = gateway(l4_config([be.addr]))
    s = connect(gw)
    s.sendall(b"1")
    assert s.recv(1) == b"1"
    gw.signal(15)
    time.sleep(0.3)  # the drain must not cut a flowing stream
    assert gw.alive()
    s.sendall(b"2")
    assert s.recv(1) == b"2"
    s.shutdown(socket.SHUT_WR)
    assert s.recv(1) == b""
    s.close()
    assert gw.wait_exit(5) == 0, gw.diag()


def test_tls_listener_forwards_plain(gateway, tcp_backend, tmp_path):
    """tls: on a tcp listener: the accept path terminates TLS, the tunnel copies the decrypted
    stream to a plain backend and back; the backend's FIN reaches the client as a clean TLS
    close."""
    import ssl

    from upstream_tls_peers import make_ca, make_cert

    ca = make_ca(str(tmp_path), "ca")
    key, crt = make_cert(str(tmp_path), "server", ca, "DNS:localhost,IP:127.0.0.1")
    be = tcp_backend(echo_handler)
    gw = gateway(l4_config([be.addr], listener_extra="    tls: {certificates: [{cert: %s, key: %s}]}"
                           % (crt, key)))
    ctx = ssl.create_default_context(cafile=ca[1])
    raw = socket.create_connection(("127.0.0.1", gw.ports["tcp"]), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    # One thread per socket (an SSL socket is not for concurrent use): rounds small enough
    # for the kernel buffers to hold while the echo comes back.
    for i in range(32):
        piece = os.urandom(256 * 1024)
        s.sendall(piece)
        got = bytearray()
        while len(got) < len(piece):
            d = s.recv(1 << 16)
            assert d, "EOF after %d bytes of round %d" % (len(got), i)
            got += d
        assert bytes(got) == piece
    s.close()
