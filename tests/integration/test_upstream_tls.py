"""Upstream TLS (`tls:` on an upstream) against the real binary and Python TLS backends with
certificates made by the openssl CLI: verification against a CA file (on and off), SNI from the
endpoint's host name or `tls.sni` (none for an IP, whose certificate must then carry the IP),
a wrong CA answered 502 `upstream_tls_failed` and failed over, client certificates (mTLS) to a
backend that requires them, session resumption on a new connection, keep-alive reuse of a TLS
connection, and certificate problems refused at start-up and by `sluice -t`."""

import http.client
import json
import time

import pytest

from helpers import run_cli, simple_config
from upstream_tls_peers import Backend, Certs, server_ctx


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("certs"))


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


def tls_config(endpoints, tls, extra="", workers=1):
    ups = "  - name: app\n    endpoints:\n"
    for e in endpoints:
        ups += "      - {address: %s}\n" % e
    ups += "    tls: %s\n" % tls
    if extra:
        ups += extra.rstrip("\n") + "\n"
    routes = "  - name: all\n    match: {path_prefix: /}\n    upstream: app\n"
    return simple_config(routes, ups, workers=workers)


def get(gw, path="/", source=None):
    c = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10,
                                   source_address=(source, 0) if source else None)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        return r.status, (json.loads(body) if r.getheader("Content-Type", "").startswith(
            "application/json") else body)
    finally:
        c.close()


def test_verified_tls_with_sni_from_the_endpoint_host(gateway, peers, certs):
    b = peers("b1", tls=server_ctx(certs.server))
    gw = gateway(tls_config(["localhost:%d" % b.port], "{ca_file: %s}" % certs.ca[1]))
    status, body = get(gw)
    assert status == 200, body
    assert body["sni"] == "localhost"
    assert body["backend"] == "b1"


def test_tls_sni_setting_is_sent_and_verified(gateway, peers, certs):
    b = peers("b1", tls=server_ctx(certs.server))
    gw = gateway(tls_config(["127.0.0.1:%d" % b.port],
                            "{ca_file: %s, sni: backend.test}" % certs.ca[1]))
    status, body = get(gw)
    assert status == 200, body
    assert body["sni"] == "backend.test"


def test_ip_endpoint_sends_no_sni_and_verifies_the_ip(gateway, peers, certs):
    b = peers("b1", tls=server_ctx(certs.server))
    gw = gateway(tls_config(["127.0.0.1:%d" % b.port], "{ca_file: %s}" % certs.ca[1]))
    status, body = get(gw)
    assert status == 200, body
    assert body["sni"] is None


def test_name_mismatch_fails(gateway, peers, certs):
    b = peers("b1", tls=server_ctx(certs.server))
    gw = gateway(tls_config(["127.0.0.1:%d" % b.port],
                            "{ca_file: %s, sni: other.test}" % certs.ca[1]))
    status, body = get(gw)
    assert status == 502
    assert body["error"] == "upstream_tls_failed"


def test_verify_off_accepts_an_unknown_ca(gateway, peers, certs):
    b = peers("b1", tls=server_ctx(certs.stranger))
    gw = gateway(tls_config(["127.0.0.1:%d" % b.port], "{verify: false}"))
    status, body = get(gw)
    assert status == 200, body


def test_wrong_ca_is_502_and_fails_over_then_ejects(gateway, peers, certs):
    bad = peers("bad", tls=server_ctx(certs.stranger))
    good = peers("good", tls=server_ctx(certs.server))
    gw = gateway(tls_config(
        ["127.0.0.1:%d" % bad.port, "127.0.0.1:%d" % good.port],
        "{ca_file: %s}" % certs.ca[1],
        extra="    retries: {attempts: 2, on: [connect_failure]}\n"
              "    health: {passive: {consecutive_failures: 2, ejection: 30s}}\n"))
    for _ in range(10):
        status, body = get(gw)
        assert status == 200, body
        assert body["backend"] == "good"
    failures = bad.handshake_failures
    assert 1 <= failures <= 3  # ejected after its consecutive failures
    for _ in range(5):
        assert get(gw)[0] == 200
    assert bad.handshake_failures == failures


def test_only_a_wrong_ca_endpoint_gives_upstream_tls_failed(gateway, peers, certs):
    bad = peers("bad", tls=server_ctx(certs.stranger))
    gw = gateway(tls_config(["127.0.0.1:%d" % bad.port], "{ca_file: %s}" % certs.ca[1]))
    status, body = get(gw)
    assert status == 502
    assert body["error"] == "upstream_tls_failed"


def test_system_store_does_not_trust_a_private_ca(gateway, peers, certs):
    b = peers("b1", tls=server_ctx(certs.server))
    gw = gateway(tls_config(["127.0.0.1:%d" % b.port], "{}"))
    status, body = get(gw)
    assert status == 502
    assert body["error"] == "upstream_tls_failed"


def test_client_certificate_to_a_backend_that_requires_one(gateway, peers, certs):
    b = peers("b1", tls=server_ctx(certs.server, client_ca=certs.client_ca[1]))
    gw = gateway(tls_config(["localhost:%d" % b.port],
                            "{ca_file: %s, client_cert: %s, client_key: %s}"
                            % (certs.ca[1], certs.client[1], certs.client[0])))
    status, body = get(gw)
    assert status == 200, body
    assert body["client"] == "client"


def test_no_client_certificate_is_refused_by_an_mtls_backend_tls12(gateway, peers, certs):
    b = peers("b1", tls=server_ctx(certs.server, client_ca=certs.client_ca[1], max_tls12=True))
    gw = gateway(tls_config(["localhost:%d" % b.port], "{ca_file: %s}" % certs.ca[1]))
    status, body = get(gw)
    assert status == 502
    assert body["error"] == "upstream_tls_failed"


def test_no_client_certificate_is_refused_by_an_mtls_backend_tls13(gateway, peers, certs):
    # TLS 1.3: the client's handshake is complete before the backend has read its (missing)
    # certificate, so the refusal is an alert after the request went out, or a reset when the
    # backend's close overtakes it.
    b = peers("b1", tls=server_ctx(certs.server, client_ca=certs.client_ca[1]))
    gw = gateway(tls_config(["localhost:%d" % b.port], "{ca_file: %s}" % certs.ca[1]))
    status, body = get(gw)
    assert status == 502
    assert body["error"] in ("upstream_tls_failed", "upstream_reset")


def test_keepalive_reuses_the_tls_connection(gateway, peers, certs):
    b = peers("b1", tls=server_ctx(certs.server))
    gw = gateway(tls_config(["localhost:%d" % b.port], "{ca_file: %s}" % certs.ca[1]))
    seen = []
    for _ in range(5):
        status, body = get(gw)
        assert status == 200, body
        seen.append((body["conn"], body["requests"]))
    assert {c for c, _ in seen} == {seen[0][0]}
    assert [n for _, n in seen] == [1, 2, 3, 4, 5]
    assert len(b.conns) == 1


def test_new_connection_resumes_the_session(gateway, peers, certs):
    b = peers("b1", tls=server_ctx(certs.server))
    gw = gateway(tls_config(["localhost:%d" % b.port], "{ca_file: %s}" % certs.ca[1],
                            extra="    keepalive: {max_idle: 0}\n"))
    results = [get(gw) for _ in range(3)]
    assert all(s == 200 for s, _ in results), results
    conns = [body["conn"] for _, body in results]
    assert len(set(conns)) == 3  # no pooling: a connection each
    assert results[0][1]["resumed"] is False
    assert results[1][1]["resumed"] is True
    assert results[2][1]["resumed"] is True


def test_tls13_minimum_and_many_requests(gateway, peers, certs):
    b = peers("b1", tls=server_ctx(certs.server))
    gw = gateway(tls_config(["localhost:%d" % b.port],
                            "{ca_file: %s, min_version: '1.3'}" % certs.ca[1], workers=2))
    for _ in range(20):
        assert get(gw)[0] == 200


def test_bad_client_key_fails_start_and_check(gateway, tmp_path, certs):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    text = tls_config(["localhost:1"], "{client_cert: %s, client_key: %s}"
                      % (bogus, certs.client[0])).replace("$PORT_public", "18080")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    r = run_cli(["-t", "-c", str(cfg)])
    assert r.returncode == 1
    assert "upstream app: tls:" in r.stderr, r.stderr
    gw = gateway(tls_config(["localhost:1"], "{client_cert: %s, client_key: %s}"
                            % (bogus, certs.client[0])), wait=False)
    deadline = time.monotonic() + 10
    while gw.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not gw.alive()
    gw.stopped, gw.exit_code = True, gw.proc.returncode
    assert gw.exit_code != 0
    assert "upstream app: tls:" in gw.stderr_text()


def test_tls_upstream_check_ok(tmp_path, certs):
    text = tls_config(["localhost:1"], "{ca_file: %s, client_cert: %s, client_key: %s}"
                      % (certs.ca[1], certs.client[1], certs.client[0])).replace(
                          "$PORT_public", "18080")
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(text)
    r = run_cli(["-t", "-c", str(cfg)])
    assert r.returncode == 0, r.stderr


def test_active_http_checks_use_tls(gateway, peers, certs):
    good = peers("good", tls=server_ctx(certs.server))
    bad = peers("bad", tls=server_ctx(certs.stranger))
    gw = gateway(tls_config(
        ["127.0.0.1:%d" % good.port, "127.0.0.1:%d" % bad.port],
        "{ca_file: %s}" % certs.ca[1],
        extra="    retries: {attempts: 0}\n"
              "    health: {passive: {enabled: false}, active: {path: /healthz, interval: 100ms,"
              " timeout: 80ms, healthy: 1, unhealthy: 1}}\n"))
    # The checks reach the good backend over TLS, and fail the bad one's handshake.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (
            any(c["requests"] for c in good.conns) and bad.handshake_failures >= 2):
        time.sleep(0.05)
    assert any(c["requests"] for c in good.conns)
    assert bad.handshake_failures >= 2
    time.sleep(0.3)
    for _ in range(6):
        status, body = get(gw, "/x")
        assert status == 200, body
        assert body["backend"] == "good"
