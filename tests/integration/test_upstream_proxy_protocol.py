"""`proxy_protocol: v1|v2` on an HTTP upstream against the real binary: every new upstream
connection starts with a PROXY header carrying the client's address and port and the address
the client connected to; a pooled connection only serves the client address it was opened for
(127.0.0.1 and 127.0.0.2 are both loopback on Linux), and the header goes before TLS when the
upstream has both."""

import http.client
import json

import pytest

from helpers import simple_config
from upstream_tls_peers import Backend, Certs, server_ctx


@pytest.fixture
def peers():
    started = []

    def make(*a, **kw):
        b = Backend(*a, **kw)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


def pp_config(port, version, extra="", workers=1):
    ups = ("  - name: app\n    endpoints:\n      - {address: 127.0.0.1:%d}\n"
           "    proxy_protocol: %s\n" % (port, version))
    if extra:
        ups += extra.rstrip("\n") + "\n"
    routes = "  - name: all\n    match: {path_prefix: /}\n    upstream: app\n"
    return simple_config(routes, ups, workers=workers)


class Client:
    """One keep-alive client connection bound to a source address."""

    def __init__(self, gw, source):
        self.c = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10,
                                            source_address=(source, 0))
        self.c.connect()
        self.port = self.c.sock.getsockname()[1]

    def get(self, path="/"):
        self.c.request("GET", path)
        r = self.c.getresponse()
        body = r.read()
        assert r.status == 200, body
        return json.loads(body)

    def close(self):
        self.c.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_carries_client_and_destination(gateway, peers, version):
    b = peers("pp", proxy=True)
    gw = gateway(pp_config(b.port, version))
    c = Client(gw, "127.0.0.1")
    body = c.get()
    c.close()
    pp = body["proxy"]
    assert pp["version"] == int(version[1])
    if version == "v1":
        assert pp["proto"] == "TCP4"
    else:
        assert pp["command"] == 1 and pp["family"] == 0x11
    assert pp["src"] == "127.0.0.1:%d" % c.port
    assert pp["dst"] == "127.0.0.1:%d" % gw.port


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_two_client_addresses_never_share_a_connection(gateway, peers, version):
    b = peers("pp", proxy=True)
    gw = gateway(pp_config(b.port, version))
    one, two = Client(gw, "127.0.0.1"), Client(gw, "127.0.0.2")
    seen = {}
    for _ in range(4):
        for cl, addr in ((one, "127.0.0.1"), (two, "127.0.0.2")):
            body = cl.get()
            assert body["proxy"]["src"].split(":")[0] == addr
            seen.setdefault(addr, set()).add(body["conn"])
    one.close()
    two.close()
    # each address kept its own pooled connection, and none served the other
    assert len(seen["127.0.0.1"]) == 1 and len(seen["127.0.0.2"]) == 1
    assert not seen["127.0.0.1"] & seen["127.0.0.2"]
    assert len(b.conns) == 2
    # a new client connection from a known address reuses that address's upstream connection
    three = Client(gw, "127.0.0.2")
    assert three.get()["conn"] in seen["127.0.0.2"]
    three.close()


def test_proxy_header_before_tls(gateway, peers, tmp_path):
    certs = Certs(tmp_path)
    b = peers("pptls", tls=server_ctx(certs.server), proxy=True)
    gw = gateway(pp_config(b.port, "v2", extra="    tls: {ca_file: %s}\n" % certs.ca[1]))
    c = Client(gw, "127.0.0.2")
    body = c.get()
    c.close()
    assert body["proxy"]["src"] == "127.0.0.2:%d" % c.port
    assert body["sni"] is None  # an IP endpoint


def test_without_proxy_protocol_connections_are_shared(gateway, peers):
    b = peers("plain")
    gw = gateway(pp_config(b.port, "off"))
    one, two = Client(gw, "127.0.0.1"), Client(gw, "127.0.0.2")
    conns = {one.get()["conn"], two.get()["conn"], one.get()["conn"]}
    one.close()
    two.close()
    assert len(conns) == 1
    assert b.conns[0]["proxy"] is None


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_active_checks_send_a_header_for_no_client(gateway, peers, version):
    import time

    b = peers("pp", proxy=True)
    gateway(pp_config(b.port, version, extra="    health: {active: {path: /healthz, "
                                             "interval: 100ms, timeout: 80ms}}\n"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(c["requests"] for c in b.conns):
        time.sleep(0.05)
    checks = [c for c in b.conns if c["requests"]]
    assert checks, b.conns
    pp = checks[0]["proxy"]
    if version == "v1":
        assert pp["proto"] == "UNKNOWN"
    else:
        assert pp["family"] == 0 and "src" not in pp
