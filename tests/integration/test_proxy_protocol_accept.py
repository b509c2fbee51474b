"""PROXY protocol on a listener (`proxy_protocol: {accept: true, trusted: [...]}`) against the
real binary.

A peer in `trusted` must start with a valid v1 or v2 header: it is consumed and its source
becomes the client address (X-Forwarded-For, per-IP limits, logs); v2 LOCAL and v1 UNKNOWN keep
the TCP peer's address; a malformed or missing header closes the connection without an answer,
and so does a header that stalls past `proxy_protocol.timeout`. A peer outside `trusted` whose
first bytes are a PROXY signature is closed (it is trying to choose its own address); any other
untrusted client is served as usual. The counters line logged at exit says what happened.

Loopback owns 127.0.0.0/8: client sockets bound to 127.0.0.2 (trusted here) and 127.0.0.3 (not)
act as different peers of the gateway on 127.0.0.1.
"""

import json
import re
import select
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

from client import build_request
from helpers import proxy_config, read_response, run_cli

TRUSTED = "127.0.0.2"
UNTRUSTED = "127.0.0.3"
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
REQ = build_request("GET", "/pp")


# ---- header builders --------------------------------------------------------------------------


def v1(src="192.0.2.10", dst="198.51.100.1", sport=56324, dport=443, proto=None):
    proto = proto or ("TCP6" if ":" in src else "TCP4")
    return ("PROXY %s %s %s %s %s\r\n" % (proto, src, dst, sport, dport)).encode()


def tlv(kind, value):
    return bytes([kind]) + struct.pack(">H", len(value)) + value


def v2(cmd=1, fam=0x11, src="192.0.2.10", dst="198.51.100.1", sport=56324, dport=443,
       tlvs=b"", ver=2, length=None):
    """A v2 header: `cmd` 0 LOCAL / 1 PROXY, `fam` 0x11 TCP4 / 0x21 TCP6 / 0x00 UNSPEC;
    `length` overrides the length field."""
    if fam == 0x11:
        addr = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack(">HH", sport, dport)
    elif fam == 0x21:
        addr = (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
                + struct.pack(">HH", sport, dport))
    else:
        addr = b""
    body = addr + tlvs
    n = len(body) if length is None else length
    return V2_SIG + bytes([(ver << 4) | cmd, fam]) + struct.pack(">H", n) + body


# ---- configs and sockets ----------------------------------------------------------------------


def pp_config(pp="{accept: true, trusted: [127.0.0.2/32], timeout: 3s}", tls=None, limits="",
              workers=2):
    extra = "    proxy_protocol: %s\n" % pp
    if tls:
        extra += "    tls: {certificates: [{cert: %s, key: %s}]}\n" % tls
    return proxy_config(limits=limits, workers=workers).replace(
        "    address: 127.0.0.1:$PORT_public\n",
        "    address: 127.0.0.1:$PORT_public\n" + extra, 1)


def connect_from(port, source, timeout=5.0):
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s



def xff_of(resp):
    """The X-Forwarded-For the echo backend received (one line expected)."""
    assert resp.startswith(b"HTTP/1.1 200"), resp[:300]
    doc = json.loads(resp.split(b"\r\n\r\n", 1)[1])
    vals = [v for k, v in doc["headers"] if k.lower() == "x-forwarded-for"]
    assert len(vals) == 1, doc["headers"]
    return vals[0], doc


def exchange(port, source, payload, timeout=5.0):
    s = connect_from(port, source, timeout)
    try:
        s.sendall(payload)
        return read_response(s, timeout)
    finally:
        s.close()


def closed_silently(s, within):
    """True when the peer closes (EOF or reset) within `within` s without sending a byte."""
    s.settimeout(within)
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def refused(port, source, payload, within=1.0):
    s = connect_from(port, source)
    try:
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            return True
        return closed_silently(s, within)
    finally:
        s.close()


COUNTER_NAMES = ("denied", "not_allowed", "ip_conns", "ip_rate", "proxy_untrusted",
                 "proxy_malformed", "proxy_timeout", "tls_failed", "tls_timeout", "proxy", "tls",
                 "tls_resumed")


def counters(gw):
    """Stops the gateway (SIGTERM) and returns its listener counters line as a dict. The line
    is logged only when a counter is not zero; without it every counter is 0."""
    assert gw.stop() == 0, gw.diag()
    m = re.search(r"listener public: refused (.*)", gw.stderr_text())
    if not m:
        return dict.fromkeys(COUNTER_NAMES, 0)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


# ---- valid headers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(module_gateway_factory, module_backend):
    b = module_backend()
    g = module_gateway_factory.start(pp_config(), B1=b.addr)
    g.backend = b
    return g


@pytest.mark.parametrize("header,client", [
    (v1("192.0.2.10"), "192.0.2.10"),
    (v1("2001:db8::7", "2001:db8::1"), "2001:db8::7"),
    (v2(fam=0x11, src="203.0.113.9"), "203.0.113.9"),
    (v2(fam=0x21, src="2001:db8:1::42", dst="2001:db8::1"), "2001:db8:1::42"),
    (v2(fam=0x11, src="203.0.113.10",
        tlvs=tlv(0x02, b"example.com") + tlv(0x04, b"\0" * 5) + tlv(0x05, b"id-1")),
     "203.0.113.10"),
    (v2(fam=0x21, src="2001:db8:2::1", dst="2001:db8::1", tlvs=tlv(0x01, b"h2")),
     "2001:db8:2::1"),
    (v1("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        65535, 65535), "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"),
    (v1("::ffff:192.0.2.33", "::ffff:192.0.2.1"), "::ffff:192.0.2.33"),
], ids=["v1-tcp4", "v1-tcp6", "v2-tcp4", "v2-tcp6", "v2-tcp4-tlvs", "v2-tcp6-tlv",
        "v1-longest-line", "v1-tcp6-mapped"])
def test_trusted_header_source_becomes_the_client(gw, header, client):
    # header and request in one write
    xff, _ = xff_of(exchange(gw.port, TRUSTED, header + REQ))
    assert xff == client


@pytest.mark.parametrize("header", [
    v2(cmd=0, fam=0x00),
    v2(cmd=0, fam=0x11, src="192.0.2.99"),  # LOCAL: the address block is ignored
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:f::1 ffff:f::2 65535 65535\r\n",
    v2(cmd=1, fam=0x00),  # PROXY with UNSPEC: fall back to the connection's addresses
], ids=["v2-local", "v2-local-with-addrs", "v1-unknown", "v1-unknown-with-addrs",
        "v2-proxy-unspec"])
def test_local_and_unknown_keep_the_tcp_peer(gw, header):
    xff, _ = xff_of(exchange(gw.port, TRUSTED, header + REQ))
    assert xff == TRUSTED


@pytest.mark.parametrize("header,client", [
    (v1("192.0.2.11"), "192.0.2.11"),
    (v2(fam=0x11, src="192.0.2.12", tlvs=tlv(0x02, b"a.example")), "192.0.2.12"),
], ids=["v1", "v2"])
def test_header_sent_byte_by_byte(gw, header, client):
    s = connect_from(gw.port, TRUSTED)
    try:
        for i in range(len(header)):
            s.sendall(header[i:i + 1])
            # each byte its own segment; the gateway must neither answer nor close meanwhile
            r, _, _ = select.select([s], [], [], 0.003)
            assert not r, "gateway answered or closed after %d header bytes" % (i + 1)
        s.sendall(REQ[:5])
        s.sendall(REQ[5:])
        xff, _ = xff_of(read_response(s))
    finally:
        s.close()
    assert xff == client


def test_header_then_request_in_separate_writes_and_keepalive(gw):
    s = connect_from(gw.port, TRUSTED)
    try:
        s.sendall(v1("192.0.2.13"))
        time.sleep(0.05)  # a separate segment on purpose: nothing to poll for
        s.sendall(REQ)
        assert xff_of(read_response(s))[0] == "192.0.2.13"
        # the header is consumed once: the next request on the connection keeps the client
        s.sendall(build_request("POST", "/second", body=b"x" * 100))
        xff, doc = xff_of(read_response(s))
        assert xff == "192.0.2.13" and doc["body_len"] == 100
    finally:
        s.close()


def test_client_x_forwarded_for_is_kept_before_the_proxy_source(gw):
    req = build_request("GET", "/xff", [("X-Forwarded-For", "10.9.9.9")])
    xff, _ = xff_of(exchange(gw.port, TRUSTED, v1("192.0.2.14") + req))
    assert xff == "10.9.9.9, 192.0.2.14"


# ---- malformed and missing headers from a trusted peer ----------------------------------------


MALFORMED = [
    (b"PROXZ TCP4 192.0.2.1 192.0.2.2 1 2\r\n", "bad-signature"),
    (b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n", "bad-protocol"),
    (b"PROXY TCP4 " + b"1" * 120, "no-crlf-in-107"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", "lf-only"),
    (b"PROXY TCP4 256.0.2.1 192.0.2.2 1 2\r\n", "bad-address"),
    (b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n", "family-mismatch"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n", "bad-port"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 0443 2\r\n", "port-leading-zero"),
    (b"PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n", "double-space"),
    (v2(ver=1), "v2-bad-version"),
    (v2(cmd=2), "v2-bad-command"),
    (v2(fam=0x41), "v2-bad-family"),
    (v2(fam=0x11, length=8), "v2-length-short-of-addresses"),
    (v2(fam=0x11, tlvs=b"\x02" + struct.pack(">H", 50) + b"abc"), "v2-tlv-runs-past"),
    (v2(fam=0x11, length=12 + 4000) + b"\0" * 4000, "v2-tlvs-too-large"),
    (REQ, "missing-header"),
]


@pytest.mark.parametrize("payload", [m[0] for m in MALFORMED], ids=[m[1] for m in MALFORMED])
def test_malformed_or_missing_header_closes_at_once(gw, payload):
    s = connect_from(gw.port, TRUSTED)
    try:
        t0 = time.monotonic()
        try:
            s.sendall(payload + REQ)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed_silently(s, 2.0), "answered or still open"
        # decided by the bytes, not by proxy_protocol.timeout (3 s here)
        assert time.monotonic() - t0 < 1.5
    finally:
        s.close()
    assert gw.alive()


# ---- untrusted peers --------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [v1("198.51.100.7") + REQ, v2(src="198.51.100.7") + REQ,
                                     b"PROXY " + REQ],
                         ids=["v1", "v2", "bare-signature"])
def test_header_from_untrusted_peer_is_refused(gw, payload):
    assert refused(gw.port, UNTRUSTED, payload)


def test_untrusted_plain_clients_are_served_with_their_own_address(gw):
    assert xff_of(exchange(gw.port, UNTRUSTED, REQ))[0] == UNTRUSTED
    assert xff_of(exchange(gw.port, "127.0.0.1", REQ))[0] == "127.0.0.1"
    # a request split just after a byte that could still start a v2 signature
    s = connect_from(gw.port, UNTRUSTED)
    try:
        s.sendall(b"\r\n")  # an empty line before a request is allowed (RFC 9112 2.2)
        time.sleep(0.05)
        s.sendall(REQ)
        assert xff_of(read_response(s))[0] == UNTRUSTED
    finally:
        s.close()


def test_untrusted_client_slow_to_send_its_first_byte_is_served(gateway, backend):
    """An untrusted client is an ordinary HTTP client (a browser's preconnect may stay silent
    for seconds): waiting for its first byte past proxy_protocol.timeout must not close it;
    header_timeout still bounds a silent one, with the usual 408."""
    b = backend()
    g = gateway(pp_config(pp="{accept: true, trusted: [127.0.0.2/32], timeout: 300ms}",
                          limits="{header_timeout: 1s}"), B1=b.addr)
    s = connect_from(g.port, UNTRUSTED)
    silent = connect_from(g.port, UNTRUSTED)
    t0 = time.monotonic()
    try:
        r, _, _ = select.select([s], [], [], 0.7)  # well past the PROXY timeout
        assert not r, "closed before header_timeout"
        s.sendall(REQ)
        assert xff_of(read_response(s))[0] == UNTRUSTED
        resp = read_response(silent, timeout=5)
        took = time.monotonic() - t0
        assert resp.startswith(b"HTTP/1.1 408"), resp
        assert 0.9 <= took < 3.0, took
    finally:
        s.close()
        silent.close()
    c = counters(g)
    assert c["proxy_timeout"] == 0 and c["proxy_untrusted"] == 0, c


class GreetingServer:
    """A TCP backend that speaks first (SMTP, MySQL, ...): sends a greeting on accept, then
    echoes one line."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stopped.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with c:
                c.settimeout(5)
                try:
                    c.sendall(b"220 hello\r\n")
                    c.sendall(c.recv(4096))
                except OSError:
                    pass

    def stop(self):
        self.stopped.set()
        self.sock.close()
        self.t.join(5)


def test_untrusted_client_of_a_server_speaks_first_tcp_listener_gets_the_greeting(gateway):
    """On a `protocol: tcp` listener the backend may speak first: an untrusted client that
    waits for the greeting must get it (the gateway cannot wait forever for its first bytes)."""
    srv = GreetingServer()
    try:
        g = gateway("workers: 1\ndrain_timeout: 3s\nlisteners:\n  - name: public\n"
                    "    address: 127.0.0.1:$PORT_public\n    protocol: tcp\n"
                    "    upstream: back\n"
                    "    proxy_protocol: {accept: true, trusted: [127.0.0.2/32], timeout: 300ms}\n"
                    "upstreams:\n  - name: back\n    endpoints:\n      - {address: $B1}\n",
                    B1=srv.addr)
        for src, pre in ((UNTRUSTED, b""), (TRUSTED, v1("192.0.2.5"))):
            s = connect_from(g.port, src)
            try:
                s.sendall(pre)
                s.settimeout(3)
                assert s.recv(64) == b"220 hello\r\n", src
                s.sendall(b"ping\r\n")
                assert s.recv(64) == b"ping\r\n", src
            finally:
                s.close()
    finally:
        srv.stop()


# ---- the PROXY timeout and the counters line --------------------------------------------------


def test_stalled_header_closes_at_the_timeout_and_counters_add_up(gateway, backend):
    b = backend()
    g = gateway(pp_config(pp="{accept: true, trusted: [127.0.0.2/32], timeout: 300ms}"),
                B1=b.addr)
    # accepted: 2 v1, 1 v2 PROXY, 1 v2 LOCAL, 1 v1 UNKNOWN
    for h in (v1("192.0.2.1"), v1("2001:db8::1", "2001:db8::2"), v2(src="192.0.2.2"),
              v2(cmd=0, fam=0), b"PROXY UNKNOWN\r\n"):
        assert exchange(g.port, TRUSTED, h + REQ).startswith(b"HTTP/1.1 200")
    # malformed: 3
    for p in (b"PROXY TCP4 1.2.3\r\n", v2(ver=3), REQ):
        assert refused(g.port, TRUSTED, p)
    # untrusted spoofs: 2; plain untrusted clients: served, not counted
    assert refused(g.port, UNTRUSTED, v1() + REQ)
    assert refused(g.port, UNTRUSTED, v2() + REQ)
    assert exchange(g.port, UNTRUSTED, REQ).startswith(b"HTTP/1.1 200")
    # timeouts: 3 (a trusted peer's truncated header or silence; an untrusted peer's start
    # of a signature that stalls)
    for src, p in ((TRUSTED, b"PROXY TCP4 192.0.2.1 "), (TRUSTED, b""), (UNTRUSTED, b"PROX")):
        s = connect_from(g.port, src)
        try:
            if p:
                s.sendall(p)
            t0 = time.monotonic()
            assert closed_silently(s, 3.0)
            took = time.monotonic() - t0
        finally:
            s.close()
        assert 0.2 <= took < 1.5, took
    c = counters(g)
    assert (c["proxy_untrusted"], c["proxy_malformed"], c["proxy_timeout"], c["proxy"]) == \
        (2, 3, 3, 5), c
    assert c["ip_conns"] == c["ip_rate"] == c["denied"] == c["tls"] == 0, c


# ---- TLS after the header ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("pp-tls")
    crt, key = str(d / "server.crt"), str(d / "server.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", crt, "-days",
                    "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    return crt, key


def client_ctx():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_exchange_in_one_flight(port, source, header):
    """TLS through memory BIOs, so the header and the ClientHello go out in one write."""
    s = connect_from(port, source)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ctx().wrap_bio(inc, out, server_hostname="localhost")
    first = True
    try:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                data = out.read()
                if first:
                    data, first = header + data, False
                if data:
                    s.sendall(data)
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("closed during the handshake")
                inc.write(chunk)
        obj.write(REQ)
        s.sendall(out.read())
        got = b""
        while b"}" not in got:
            try:
                got += obj.read(65536)
            except ssl.SSLWantReadError:
                chunk = s.recv(65536)
                if not chunk:
                    break
                inc.write(chunk)
        return got
    finally:
        s.close()


def test_tls_listener_header_then_handshake(gateway, backend, cert):
    b = backend()
    g = gateway(pp_config(tls=cert), B1=b.addr)
    # header, then the handshake on the same socket
    s = connect_from(g.port, TRUSTED)
    s.sendall(v2(fam=0x11, src="192.0.2.77", tlvs=tlv(0x02, b"localhost")))
    with client_ctx().wrap_socket(s, server_hostname="localhost") as t:
        t.sendall(REQ)
        xff, doc = xff_of(read_response(t))
    assert xff == "192.0.2.77"
    assert [v for k, v in doc["headers"] if k.lower() == "x-forwarded-proto"] == ["https"]
    # the header and the ClientHello in one write
    xff, _ = xff_of(tls_exchange_in_one_flight(g.port, TRUSTED, v1("192.0.2.78")))
    assert xff == "192.0.2.78"
    # an untrusted client speaks TLS directly
    s = connect_from(g.port, UNTRUSTED)
    with client_ctx().wrap_socket(s, server_hostname="localhost") as t:
        t.sendall(REQ)
        assert xff_of(read_response(t))[0] == UNTRUSTED
    # a trusted peer that skips the header and starts TLS is refused
    s = connect_from(g.port, TRUSTED)
    try:
        with pytest.raises((ssl.SSLError, OSError)):
            with client_ctx().wrap_socket(s, server_hostname="localhost") as t:
                t.sendall(REQ)
                if not t.recv(1):
                    raise ConnectionError("closed")
    finally:
        s.close()
    c = counters(g)
    assert (c["proxy"], c["proxy_malformed"], c["tls"]) == (2, 1, 3), c


def test_tls_listener_untrusted_client_silent_past_the_proxy_timeout_is_served(gateway,
                                                                               backend, cert):
    b = backend()
    g = gateway(pp_config(pp="{accept: true, trusted: [127.0.0.2/32], timeout: 300ms}",
                          tls=cert), B1=b.addr)
    s = connect_from(g.port, UNTRUSTED)
    r, _, _ = select.select([s], [], [], 0.6)  # twice the PROXY timeout, then the ClientHello
    assert not r, "closed while silent"
    with client_ctx().wrap_socket(s, server_hostname="localhost") as t:
        t.sendall(REQ)
        assert xff_of(read_response(t))[0] == UNTRUSTED
    c = counters(g)
    assert (c["proxy_timeout"], c["tls"]) == (0, 1), c


# ---- configuration errors ---------------------------------------------------------------------


def _check(tmp_path, pp):
    p = tmp_path / "s.yaml"
    p.write_text("listeners:\n  - name: public\n    address: 127.0.0.1:1\n"
                 "    proxy_protocol: %s\n" % pp)
    return run_cli(["-t", "-c", str(p)])


def test_accept_without_trusted_is_a_located_error(tmp_path):
    r = _check(tmp_path, "{accept: true}")
    assert r.returncode == 1, r.stderr
    assert re.search(r":4:\d+: listeners\[0\]\.proxy_protocol: accept: true needs trusted",
                     r.stderr), r.stderr


def test_bad_trusted_prefix_and_timeout_are_errors(tmp_path):
    r = _check(tmp_path, "{accept: true, trusted: [10.0.0.1/8, nope], timeout: 0s}")
    assert r.returncode == 1, r.stderr
    for path in ("proxy_protocol.trusted[0]", "proxy_protocol.trusted[1]",
                 "proxy_protocol.timeout"):
        assert "listeners[0]." + path in r.stderr, r.stderr


def test_trusted_without_accept_is_valid(tmp_path):
    r = _check(tmp_path, "{trusted: [10.0.0.0/8]}")
    assert r.returncode == 0, r.stderr
