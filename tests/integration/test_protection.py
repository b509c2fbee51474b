"""Listener protections against the real binary: allow/deny CIDR lists turn connections away
before any byte is read (closed, nothing answered) while other addresses are served, and bad
prefixes are config errors with a position."""

import socket

from helpers import proxy_config, run_cli


def protected(protection, **kw):
    return proxy_config(**kw).replace(
        "    address: 127.0.0.1:$PORT_public\n",
        "    address: 127.0.0.1:$PORT_public\n    protection: %s\n" % protection, 1)


def exchange_from(port, source):
    """Sends a GET from `source` (a loopback address); returns the response bytes (b"" when
    the gateway closed or reset the connection without answering)."""
    s = socket.socket()
    s.settimeout(5)
    try:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data
    except ConnectionResetError:
        return b""
    finally:
        s.close()


def test_deny_closes_and_others_are_served(module_gateway_factory, module_backend):
    b = module_backend()
    g = module_gateway_factory.start(
        protected("{deny: [127.0.0.2, 10.0.0.0/8]}"), B1=b.addr)
    assert exchange_from(g.port, "127.0.0.2") == b""
    assert exchange_from(g.port, "127.0.0.1").startswith(b"HTTP/1.1 200")
    assert exchange_from(g.port, "127.0.0.3").startswith(b"HTTP/1.1 200")
    assert g.alive()


def test_allow_list_admits_only_its_prefixes_and_deny_wins(module_gateway_factory,
                                                           module_backend):
    b = module_backend()
    g = module_gateway_factory.start(
        protected("{allow: [127.0.0.0/30], deny: [127.0.0.2/32]}"), B1=b.addr)
    assert exchange_from(g.port, "127.0.0.1").startswith(b"HTTP/1.1 200")
    assert exchange_from(g.port, "127.0.0.2") == b""  # allowed, but denied
    assert exchange_from(g.port, "127.0.0.3").startswith(b"HTTP/1.1 200")
    assert exchange_from(g.port, "127.0.0.5") == b""  # outside the allow list


def test_bad_prefixes_are_located_config_errors(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("listeners:\n  - name: public\n    address: 127.0.0.1:1\n"
                 "    protection: {allow: [10.0.0.1/8, nonsense], deny: 10.0.0.0/8}\n")
    r = run_cli(["-t", "-c", str(p)])
    lines = [ln for ln in r.stderr.splitlines() if ":" in ln]
    assert r.returncode == 1, r.stderr
    assert "4:" in lines[0] and "listeners[0].protection.allow[0]" in lines[0], lines
    assert "listeners[0].protection.allow[1]" in lines[1], lines
    assert "listeners[0].protection.deny" in lines[2] and "expected a list" in lines[2], lines
