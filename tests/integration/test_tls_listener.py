"""TLS on listeners, against the real binary: certificate choice by SNI, protocol versions,
ALPN, session resumption across workers, client certificates, the handshake timeout,
certificate reload (file watch and SIGHUP), what non-TLS bytes do to a TLS port, the per-listener
counters logged at exit, and a bounded testssl.sh scan.

Every certificate is made here with the openssl CLI (one session-scoped PKI). Clients are
Python's ssl module, curl and `openssl s_client`. A TLS gateway is started with `start_tls`,
which waits for a full TLS request to succeed instead of the plain TCP probe the factory uses:
that probe would count as a failed handshake and blur the counters some tests check.
"""

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pytest

from client import IncompleteResponse, RawClient, build_request
from helpers import START_TIMEOUT, poll

# --------------------------------------------------------------------------------------------
# Certificates.


def _openssl(*args, cwd, stdin=None):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, capture_output=True,
                   input=stdin, timeout=30)


def _newkey(kind):
    return (["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if kind == "ec"
            else ["-newkey", "rsa:2048"])


class Pki:
    """Files of the test PKI, all under one directory. Each leaf is (cert path, key path)."""

    def __init__(self, d):
        self.dir = str(d)
        self.serial = 0x1000
        self.ca = self.make_ca("ca", "sluice test CA")
        self.client_ca = self.make_ca("client-ca", "sluice test client CA")
        self.other_ca = self.make_ca("other-ca", "someone else's CA")
        # Server certificates: ECDSA P-256 for the named ones, RSA-2048 for the default (which
        # also serves 127.0.0.1, for testssl.sh, and names a CRL so its scan of the certificate
        # does not report a missing revocation source).
        self.api = self.make_leaf("api", self.ca, "api.example.com", "DNS:api.example.com")
        self.wild = self.make_leaf("wild", self.ca, "*.wild.example.com",
                                   "DNS:*.wild.example.com")
        self.default = self.make_leaf(
            "default", self.ca, "default.example.com",
            "DNS:default.example.com,DNS:localhost,IP:127.0.0.1", kind="rsa", days=200,
            extra="crlDistributionPoints=URI:http://crl.invalid/ca.crl\n")
        # Replacements for the reload tests: the api certificate again under another subject
        # and serial, with the same key (one file changes) and with a new key (two files).
        self.api_rotated = self.make_leaf("api-rotated", self.ca, "api-rotated.example.com",
                                          "DNS:api.example.com", key_from=self.api[1])
        self.api_newkey = self.make_leaf("api-newkey", self.ca, "api-newkey.example.com",
                                         "DNS:api.example.com")
        self.client_good = self.make_leaf("client-good", self.client_ca, "client-good", None,
                                          client=True)
        self.client_bad = self.make_leaf("client-bad", self.other_ca, "client-bad", None,
                                         client=True)
        # Signed by the client CA, but for servers only (extendedKeyUsage serverAuth).
        self.client_wrong_use = self.make_leaf("client-wrong-use", self.client_ca,
                                               "client-wrong-use", None)

    def path(self, name):
        return os.path.join(self.dir, name)

    def next_serial(self):
        self.serial += 1
        return "0x%x" % self.serial

    def make_ca(self, name, cn):
        key, crt = self.path(name + ".key"), self.path(name + ".pem")
        _openssl("req", "-x509", *_newkey("ec"), "-nodes", "-keyout", key, "-out", crt,
                 "-days", "3", "-subj", "/CN=%s" % cn, "-set_serial", self.next_serial(),
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=self.dir)
        return crt, key

    def make_leaf(self, name, ca, cn, sans, kind="ec", days=3, client=False, key_from=None,
                  extra=""):
        key, csr, crt, ext = (self.path(name + e) for e in (".key", ".csr", ".pem", ".ext"))
        with open(ext, "w") as f:
            if sans:
                f.write("subjectAltName=%s\n" % sans)
            f.write("basicConstraints=critical,CA:FALSE\n")
            f.write("keyUsage=critical,digitalSignature%s\n"
                    % (",keyEncipherment" if kind == "rsa" else ""))
            f.write("extendedKeyUsage=%s\n" % ("clientAuth" if client else "serverAuth"))
            f.write(extra)
        if key_from:
            shutil.copyfile(key_from, key)
            _openssl("req", "-new", "-key", key, "-out", csr, "-subj", "/CN=%s" % cn,
                     cwd=self.dir)
        else:
            _openssl("req", *_newkey(kind), "-nodes", "-keyout", key, "-out", csr, "-subj",
                     "/CN=%s" % cn, cwd=self.dir)
        _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-set_serial",
                 self.next_serial(), "-out", crt, "-days", str(days), "-extfile", ext,
                 cwd=self.dir)
        return crt, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


# --------------------------------------------------------------------------------------------
# Configs and start-up.


def cert_list(*leaves):
    return [{"cert": c, "key": k} for c, k in leaves]


def tls_config(listeners, routes=None, upstreams="", workers=2):
    """`listeners`: {name: tls mapping (dict) or None for plain HTTP}; each gets $PORT_<name>.
    The tls mappings are written as JSON, which is YAML flow style."""
    lines = ["workers: %d" % workers, "drain_timeout: 3s", "log_level: info", "listeners:"]
    for name, tls in listeners.items():
        lines += ["  - name: %s" % name, "    address: 127.0.0.1:$PORT_%s" % name]
        if tls is not None:
            lines.append("    tls: %s" % json.dumps(tls))
    if upstreams:
        lines += ["upstreams:", upstreams.rstrip("\n")]
    lines += ["routes:", (routes or "  - name: hello\n    direct_response: "
                          "{status: 200, body: \"hello\\n\"}\n").rstrip("\n")]
    return "\n".join(lines) + "\n"


def client_ctx(pki, ca=True, cert=None, alpn=None, max_version=None, min_version=None):
    """A client context that verifies the chain against the test CA but not the name (the
    tests look at which certificate came back, including ones that do not match)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if ca:
        ctx.load_verify_locations(pki.ca[0])
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(cert[0], cert[1])
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if max_version:
        ctx.maximum_version = max_version
    if min_version:
        ctx.minimum_version = min_version
    return ctx


class TlsClient(RawClient):
    """RawClient over a TLS connection (the handshake is done in the constructor)."""

    def __init__(self, port, ctx, sni=None, session=None, timeout=5.0):
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname=sni, session=session)
        except BaseException:
            raw.close()
            raise
        self.timeout = timeout
        self.buf = bytearray()
        self.eof = False
        self.reset = False

    def get(self, target="/", headers=()):
        self.send(build_request("GET", target, list(headers), host="api.example.com"))
        return self.read_response()

    def subject_cn(self):
        return cert_cn(self.sock.getpeercert())

    def serial(self):
        return self.sock.getpeercert()["serialNumber"]


def cert_cn(cert):
    for rdn in cert["subject"]:
        for k, v in rdn:
            if k == "commonName":
                return v
    return None


class Counted:
    """Opens TLS connections to one gateway and counts the handshakes that completed, so a
    test can compare with the counters sluice logs at exit."""

    def __init__(self, gw):
        self.gw = gw
        self.handshakes = 0
        self.resumed = 0

    def connect(self, listener, ctx, sni=None, session=None, timeout=5.0):
        c = TlsClient(self.gw.ports[listener], ctx, sni, session, timeout)
        self.handshakes += 1
        if c.sock.session_reused:
            self.resumed += 1
        return c

    def fetch(self, listener, ctx, sni="api.example.com", session=None):
        """One request on a new connection; returns (status, peer cert dict, session, reused)."""
        with self.connect(listener, ctx, sni, session) as c:
            r = c.get()
            return r.status, c.sock.getpeercert(), c.sock.session, c.sock.session_reused


def start_tls(start, template, ready_ctx=None, **subs):
    """Starts a gateway whose listeners are all TLS and waits until each answers a request over
    TLS (bounded). `ready_ctx` is the client context to probe with (mTLS listeners need a
    certificate). Returns (gateway, Counted) with the probes counted."""
    for attempt in range(3):
        gw = start(template, wait=False, **subs)
        counted = Counted(gw)
        deadline = time.monotonic() + START_TIMEOUT
        pending = set(gw.ports)
        ctx = ready_ctx or client_ctx(None, ca=False)
        while pending and time.monotonic() < deadline and gw.alive():
            for name in sorted(pending):
                try:
                    c = counted.connect(name, ctx, timeout=2.0)
                except ConnectionRefusedError:
                    continue  # not listening yet: sluice saw nothing
                with c:
                    assert c.get().status == 200
                pending.discard(name)
            if pending:
                time.sleep(0.02)
        if not pending:
            return gw, counted
        if not gw.alive() and "in use" in gw.stderr_text().lower() and attempt < 2:
            start.__self__.started.remove(gw)  # a port was taken meanwhile: not a failure
            continue
        pytest.fail("TLS listeners %s not ready%s" % (sorted(pending), gw.diag()),
                    pytrace=False)
    raise AssertionError("unreachable")


def fetch(port, ctx, sni="api.example.com", session=None):
    """One request on a new connection: (status, peer certificate, session, session_reused)."""
    with TlsClient(port, ctx, sni, session) as c:
        r = c.get()
        return r.status, c.sock.getpeercert(), c.sock.session, c.sock.session_reused


def exit_counters(gw, listener):
    """Stops the gateway (SIGTERM, expecting exit 0) and returns the counters of the line
    sl_gateway_log_counters wrote for `listener`, as {name: int}."""
    code = gw.stop()
    assert code == 0, "exit code %r%s" % (code, gw.diag())
    pat = re.compile(r"listener %s: refused (.*)$" % re.escape(listener))
    for line in gw.stderr_text().splitlines():
        m = pat.search(line)
        if m:
            return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}
    raise AssertionError("no counter line for listener %s%s" % (listener, gw.diag()))


def s_client(port, *args, stdin=b"", timeout=20):
    """Runs `openssl s_client` against 127.0.0.1:port; returns (exit code, stdout, stderr)."""
    cmd = ["openssl", "s_client", "-connect", "127.0.0.1:%d" % port, "-nocommands"]
    r = subprocess.run(cmd + list(args), input=stdin, capture_output=True, timeout=timeout)
    return r.returncode, r.stdout.decode("latin-1"), r.stderr.decode("latin-1")


def s_client_subject(out):
    m = re.search(r"^subject=(.*)$", out, re.M)
    return m.group(1).strip() if m else None


def curl(port, name, cafile, *extra):
    cmd = ["curl", "-sS", "--noproxy", "*", "--max-time", "10", "--resolve",
           "%s:%d:127.0.0.1" % (name, port), "--cacert", cafile, "-o", "/dev/null", "-w",
           "%{http_code} %{http_version}"] + list(extra) + ["https://%s:%d/" % (name, port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20)


def client_hello(ctx, sni="api.example.com"):
    """The bytes of a real ClientHello from `ctx` (never sent by Python itself)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def wait_eof(sock, bound):
    """Reads until the peer closes (EOF or reset). Returns the bytes received, or None when
    the connection is still open after `bound` seconds."""
    deadline = time.monotonic() + bound
    got = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except socket.timeout:
            return None
        except ConnectionResetError:
            return got
        if not data:
            return got
        got += data


def ssl_reason(e):
    """OpenSSL's reason as an upper-case token (TLSV1_ALERT_UNKNOWN_CA): Python fills
    SSLError.reason only for reasons it knows, the message always has the text."""
    if getattr(e, "reason", None):
        return e.reason
    m = re.search(r"\] ([a-z0-9 ]+?) \(_ssl", str(e))
    return m.group(1).upper().replace(" ", "_") if m else type(e).__name__


def refusal(port, ctx, sni="api.example.com"):
    """For a client the server should refuse: where and why, ("handshake", reason) or
    ("first read", reason); None when the connection was not refused within 5 s.

    After a handshake that completed on the client's side (TLS 1.3 sends the client's
    certificate in its last flight), this reads before writing anything: a request sent at
    once would reach a server that already closed, and the reset answering it can destroy the
    alert still in flight; the client would then see a bare EOF or reset."""
    try:
        c = TlsClient(port, ctx, sni)
    except (ssl.SSLError, ConnectionError) as e:
        return "handshake", ssl_reason(e)
    with c:
        c.sock.settimeout(5.0)
        try:
            data = c.sock.recv(1)
        except socket.timeout:
            return None
        except (ssl.SSLError, ConnectionError) as e:
            return "first read", ssl_reason(e)
        return ("first read", "EOF") if not data else None


def served(port, ctx, sni="api.example.com"):
    return fetch(port, ctx, sni)[0] == 200


def served_now(port, ctx):
    """served(), with a refusal (an alert, a reset, EOF) as False rather than an error."""
    try:
        return served(port, ctx)
    except (ssl.SSLError, ConnectionError, IncompleteResponse):
        return False


# --------------------------------------------------------------------------------------------
# One gateway for the read-only checks: SNI, versions, ALPN, resumption, client certificates.


@pytest.fixture(scope="module")
def gw(module_gateway_factory, pki):
    main = {"certificates": cert_list(pki.default, pki.api, pki.wild)}
    mtls = {"certificates": cert_list(pki.api), "client_ca": pki.client_ca[0]}
    tpl = tls_config({
        "main": main,
        "main2": dict(main),  # same certificates and settings, its own ticket keys
        "tls13": {"certificates": cert_list(pki.api), "min_version": "1.3"},
        "notickets": {"certificates": cert_list(pki.api), "session_tickets": False},
        "mtls_required": dict(mtls, client_auth="required"),
        "mtls_default": dict(mtls),  # client_auth defaults to required
        "mtls_optional": dict(mtls, client_auth="optional"),
    })
    g, _ = start_tls(module_gateway_factory.start, tpl,
                     ready_ctx=client_ctx(pki, ca=False, cert=pki.client_good))
    return g


@pytest.mark.parametrize("sni, cn", [
    ("api.example.com", "api.example.com"),
    ("a.wild.example.com", "*.wild.example.com"),
    ("zz-9.wild.example.com", "*.wild.example.com"),
    ("a.b.wild.example.com", "default.example.com"),  # a wildcard covers exactly one label
    ("wild.example.com", "default.example.com"),  # ... and not the bare parent
    ("unknown.example.org", "default.example.com"),
    (None, "default.example.com"),  # no SNI: the first certificate
])
def test_sni_selects_the_certificate(gw, pki, sni, cn):
    with TlsClient(gw.ports["main"], client_ctx(pki), sni) as c:
        assert c.subject_cn() == cn
        assert c.get().status == 200


def test_sni_with_openssl_s_client_case_and_trailing_dot(gw, pki):
    port = gw.ports["main"]
    for name, subject in (("api.example.com", "CN = api.example.com"),
                          ("API.Example.COM", "CN = api.example.com"),
                          ("api.example.com.", "CN = api.example.com"),
                          ("A.WILD.example.com", "CN = *.wild.example.com"),
                          ("a.b.wild.example.com", "CN = default.example.com")):
        rc, out, err = s_client(port, "-servername", name, "-CAfile", pki.ca[0], "-showcerts")
        assert rc == 0, err
        assert s_client_subject(out) == subject, (name, out)
        assert "Verify return code: 0 (ok)" in out, out
    rc, out, err = s_client(port, "-noservername", "-CAfile", pki.ca[0])
    assert s_client_subject(out) == "CN = default.example.com", out


def test_curl_verifies_the_names_it_asked_for(gw, pki):
    port = gw.ports["main"]
    for name in ("api.example.com", "x.wild.example.com", "default.example.com"):
        r = curl(port, name, pki.ca[0])
        # curl offers h2 and http/1.1; an HTTP/1 listener picks http/1.1.
        assert (r.returncode, r.stdout) == (0, "200 1.1"), (name, r.stderr)
    # Two labels under the wildcard get the default certificate, whose names do not match.
    r = curl(port, "a.b.wild.example.com", pki.ca[0])
    assert r.returncode == 60, (r.returncode, r.stdout, r.stderr)


def test_tls12_and_tls13_are_accepted_by_default(gw, pki):
    port = gw.ports["main"]
    for v, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
        with TlsClient(port, client_ctx(pki, min_version=v, max_version=v),
                       "api.example.com") as c:
            assert c.sock.version() == name
            assert c.get().status == 200
    with TlsClient(port, client_ctx(pki), "api.example.com") as c:
        assert c.sock.version() == "TLSv1.3"  # the best both sides have


@pytest.mark.parametrize("flag", ["-tls1_1", "-tls1"])
def test_tls11_and_tls10_are_refused(gw, pki, flag):
    # SECLEVEL=0 lets this OpenSSL 3 client send the old version at all; then the refusal
    # seen is the server's protocol_version alert (70), not a local one.
    rc, out, err = s_client(gw.ports["main"], flag, "-cipher", "DEFAULT:@SECLEVEL=0",
                            "-servername", "api.example.com")
    assert rc != 0, out
    assert "alert protocol version" in err and "alert number 70" in err, err
    assert with_ok(gw, pki)


def with_ok(gw, pki, listener="main"):
    """True when a normal client is still served on `listener`."""
    return served(gw.ports[listener], client_ctx(pki, cert=pki.client_good))


def test_min_version_13_refuses_tls12(gw, pki):
    port = gw.ports["tls13"]
    with pytest.raises(ssl.SSLError) as e:
        TlsClient(port, client_ctx(pki, max_version=ssl.TLSVersion.TLSv1_2), "api.example.com")
    assert ssl_reason(e.value) == "TLSV1_ALERT_PROTOCOL_VERSION", e.value
    with TlsClient(port, client_ctx(pki), "api.example.com") as c:
        assert c.sock.version() == "TLSv1.3"
        assert c.get().status == 200


def test_alpn(gw, pki):
    port = gw.ports["main"]
    with TlsClient(port, client_ctx(pki, alpn=["h2", "http/1.1"]), "api.example.com") as c:
        assert c.sock.selected_alpn_protocol() == "http/1.1"
        assert c.get().status == 200
    with TlsClient(port, client_ctx(pki), "api.example.com") as c:  # no ALPN extension
        assert c.sock.selected_alpn_protocol() is None
        assert c.get().status == 200
    # No overlap: RFC 7301 section 3.2, the handshake is refused with no_application_protocol
    # (alert 120) rather than continuing without ALPN; in TLS 1.2 and 1.3 alike.
    for v in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        with pytest.raises(ssl.SSLError) as e:
            TlsClient(port, client_ctx(pki, alpn=["h2"], max_version=v), "api.example.com")
        assert ssl_reason(e.value) == "TLSV1_ALERT_NO_APPLICATION_PROTOCOL", e.value
    assert with_ok(gw, pki)


REQ_CLOSE = b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_resumption_with_openssl_s_client(gw, pki, tmp_path, version):
    port, sess = gw.ports["main"], str(tmp_path / "session.pem")
    common = [version, "-servername", "api.example.com", "-CAfile", pki.ca[0], "-ign_eof"]
    # -ign_eof: read until the server closes (Connection: close), so that TLS 1.3 tickets,
    # sent after the handshake, reach the session file.
    rc, out, err = s_client(port, *common, "-sess_out", sess, stdin=REQ_CLOSE)
    assert rc == 0 and "HTTP/1.1 200" in out, out + err
    assert re.search(r"^New, TLSv1\.[23]", out, re.M), out
    rc, out, err = s_client(port, *common, "-sess_in", sess, stdin=REQ_CLOSE)
    assert rc == 0 and "HTTP/1.1 200" in out, out + err
    assert re.search(r"^Reused, TLSv1\.[23]", out, re.M), out
    # Without tickets there is nothing to resume.
    rc, out, err = s_client(gw.ports["notickets"], *common, "-sess_in", sess, stdin=REQ_CLOSE)
    assert rc == 0 and re.search(r"^New, ", out, re.M), out


@pytest.mark.parametrize("v", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tickets_resume_on_every_worker_of_the_listener(gw, pki, v):
    port, ctx = gw.ports["main"], client_ctx(pki, max_version=v)
    status, _, sess, reused = fetch(port, ctx)
    assert status == 200 and not reused and sess is not None and sess.has_ticket
    # Two workers, each with its own SO_REUSEPORT socket: the kernel spreads connections by
    # their source port, so 16 of them land on both (all on one: probability 2**-15). Each
    # must resume with the ticket the first worker issued.
    results = [fetch(port, ctx, session=sess) for _ in range(16)]
    assert [r[0] for r in results] == [200] * 16
    assert [r[3] for r in results] == [True] * 16
    # The same ticket on another listener (same certificates, own key ring) is not resumed.
    status, _, _, reused = fetch(gw.ports["main2"], ctx, session=sess)
    assert status == 200 and not reused


@pytest.mark.parametrize("v", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_no_resumption_without_tickets(gw, pki, v):
    port, ctx = gw.ports["notickets"], client_ctx(pki, max_version=v)
    status, _, sess, reused = fetch(port, ctx)
    assert status == 200 and not reused
    assert sess is None or not sess.has_ticket
    if sess is not None:
        status, _, _, reused = fetch(port, ctx, session=sess)
        assert status == 200 and not reused


@pytest.mark.parametrize("listener", ["mtls_required", "mtls_default"])
def test_client_certificate_required(gw, pki, listener):
    port = gw.ports[listener]
    t12 = ssl.TLSVersion.TLSv1_2
    # TLS 1.3: the client's handshake ends before the server has checked its certificate, so
    # the refusal (an alert) arrives on the first read.
    assert refusal(port, client_ctx(pki)) == ("first read", "TLSV13_ALERT_CERTIFICATE_REQUIRED")
    assert refusal(port, client_ctx(pki, cert=pki.client_bad)) == (
        "first read", "TLSV1_ALERT_UNKNOWN_CA")
    # TLS 1.2: the handshake itself fails.
    assert refusal(port, client_ctx(pki, max_version=t12)) == (
        "handshake", "SSLV3_ALERT_HANDSHAKE_FAILURE")
    assert refusal(port, client_ctx(pki, cert=pki.client_bad, max_version=t12)) == (
        "handshake", "TLSV1_ALERT_UNKNOWN_CA")
    # A server certificate from the server CA is no client certificate here, nor is one from
    # the client CA that is only good for servers.
    assert refusal(port, client_ctx(pki, cert=pki.api)) == (
        "first read", "TLSV1_ALERT_UNKNOWN_CA")
    assert refusal(port, client_ctx(pki, cert=pki.client_wrong_use)) == (
        "first read", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE")
    for v in (t12, ssl.TLSVersion.TLSv1_3):
        assert served(port, client_ctx(pki, cert=pki.client_good, max_version=v))


def test_client_certificate_optional(gw, pki):
    port = gw.ports["mtls_optional"]
    assert served(port, client_ctx(pki))
    assert served(port, client_ctx(pki, max_version=ssl.TLSVersion.TLSv1_2))
    assert served(port, client_ctx(pki, cert=pki.client_good))
    # A certificate that is sent must verify.
    assert refusal(port, client_ctx(pki, cert=pki.client_bad)) == (
        "first read", "TLSV1_ALERT_UNKNOWN_CA")
    assert refusal(port, client_ctx(pki, cert=pki.client_bad,
                                    max_version=ssl.TLSVersion.TLSv1_2)) == (
        "handshake", "TLSV1_ALERT_UNKNOWN_CA")


def test_mtls_session_does_not_resume_elsewhere(gw, pki):
    # A ticket from a listener that verified the client must not resume on one that did not,
    # nor the other way round (different key rings, and session id contexts too).
    ctx = client_ctx(pki, cert=pki.client_good)
    status, _, sess, _ = fetch(gw.ports["mtls_required"], ctx)
    assert status == 200 and sess is not None
    assert fetch(gw.ports["mtls_required"], ctx, session=sess)[3] is True
    assert fetch(gw.ports["mtls_optional"], ctx, session=sess)[3] is False
    assert fetch(gw.ports["main"], ctx, session=sess)[3] is False


def test_client_subject_reaches_the_upstream(gateway, backend, pki):
    # The verified subject goes upstream as X-Client-Subject (RFC 2253); a client-sent one is
    # removed, with or without a certificate, so the upstream can trust the header.
    b = backend()
    mtls = {"certificates": cert_list(pki.api), "client_ca": pki.client_ca[0],
            "client_auth": "optional"}
    gw, _ = start_tls(gateway, tls_config({"edge": mtls}, routes=PROXY_ROUTE,
                                          upstreams=proxy_upstream(b)))
    spoof = [("X-Client-Subject", "CN=admin")]

    def subjects(ctx):
        with TlsClient(gw.ports["edge"], ctx) as c:
            r = c.get(headers=spoof)
        assert r.status == 200
        return [v for k, v in r.json()["headers"] if k.lower() == "x-client-subject"]

    assert subjects(client_ctx(pki, cert=pki.client_good)) == ["CN=client-good"]
    assert subjects(client_ctx(pki)) == []


PROXY_ROUTE = "  - name: all\n    match: {path_prefix: /}\n    upstream: app\n"


def proxy_upstream(b):
    return "  - name: app\n    endpoints: [%s]\n" % b.addr


# --------------------------------------------------------------------------------------------
# Gateways of their own: the counters logged at exit must match what each test did.


def test_handshake_timeout_closes_silent_and_partial_clients(gateway, pki):
    gw, counted = start_tls(gateway, tls_config(
        {"edge": {"certificates": cert_list(pki.api), "handshake_timeout": "300ms"}}))
    port = gw.ports["edge"]
    hello = client_hello(client_ctx(pki))
    assert hello[0] == 0x16 and len(hello) > 100
    silent = socket.create_connection(("127.0.0.1", port), timeout=5)
    t_silent = time.monotonic()
    partial = socket.create_connection(("127.0.0.1", port), timeout=5)
    partial.sendall(hello[: len(hello) // 2])
    t_partial = time.monotonic()
    try:
        # Meanwhile a normal client is served.
        with counted.connect("edge", client_ctx(pki), "api.example.com") as c:
            assert c.get().status == 200
        for s, t0 in ((silent, t_silent), (partial, t_partial)):
            got = wait_eof(s, 5.0)
            elapsed = time.monotonic() - t0
            assert got == b"", "not closed within 5 s (got %r)" % got
            assert 0.25 <= elapsed < 3.0, elapsed
    finally:
        silent.close()
        partial.close()
    assert gw.alive()
    c = exit_counters(gw, "edge")
    assert (c["tls_timeout"], c["tls_failed"]) == (2, 0), c
    assert (c["tls"], c["tls_resumed"]) == (counted.handshakes, counted.resumed), c


def test_non_tls_bytes_are_closed_and_the_backend_sees_https(gateway, backend, pki):
    b = backend()
    gw, counted = start_tls(gateway, tls_config(
        {"edge": {"certificates": cert_list(pki.api)}}, routes=PROXY_ROUTE,
        upstreams=proxy_upstream(b)))
    port = gw.ports["edge"]
    payloads = [
        b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n",  # plain HTTP to the TLS port
        bytes(range(256)) * 4,  # garbage
        b"\x16\x03\x01\x00\x05hello",  # a handshake record holding no valid message
    ]
    for p in payloads:
        with RawClient(port, timeout=5) as c:
            c.send(p)
            closed, extra = c.wait_closed(5.0)
            assert closed, "not closed after %r" % p[:20]
            # At most a TLS alert record (type 21), never an HTTP answer.
            assert extra == b"" or extra[0] == 0x15, (p[:20], extra)
        assert gw.alive()
    # Over TLS, the backend is told the client spoke https, whatever the client claims.
    with counted.connect("edge", client_ctx(pki), "api.example.com") as c:
        r = c.get(headers=[("X-Forwarded-Proto", "http")])
    assert r.status == 200
    got = [v for k, v in r.json()["headers"] if k.lower() == "x-forwarded-proto"]
    assert got == ["https"], r.json()["headers"]
    c = exit_counters(gw, "edge")
    assert (c["tls_failed"], c["tls_timeout"]) == (len(payloads), 0), c
    assert (c["tls"], c["tls_resumed"]) == (counted.handshakes, counted.resumed), c


def install(leaf, live, parts=("cert", "key")):
    """Replaces live/cert.pem and/or live/key.pem atomically (write aside, rename over)."""
    for part, src in zip(("cert", "key"), leaf):
        if part in parts:
            tmp = os.path.join(live, part + ".pem.new")
            shutil.copyfile(src, tmp)
            os.replace(tmp, os.path.join(live, part + ".pem"))


def live_config(tmp_path, pki, **tls):
    """A listener `rl` whose certificate files live in tmp_path/live, named relative to the
    config file's directory (tmp_path)."""
    live = tmp_path / "live"
    live.mkdir()
    install(pki.api, str(live))
    tls = dict({"certificates": [{"cert": "live/cert.pem", "key": "live/key.pem"}]}, **tls)
    return str(live), tls_config({"rl": tls})


def test_certificate_files_replaced_are_picked_up(gateway, pki, tmp_path):
    live, tpl = live_config(tmp_path, pki)
    gw, counted = start_tls(gateway, tpl)
    ctx = client_ctx(pki)
    old = counted.connect("rl", ctx, "api.example.com")
    try:
        assert old.get().status == 200 and old.subject_cn() == "api.example.com"
        old_serial = old.serial()
        # A new certificate (other subject and serial) for the same key: one file changes.
        install(pki.api_rotated, live, parts=("cert",))

        def served_cn():
            with counted.connect("rl", ctx, "api.example.com") as c:
                assert c.get().status == 200
                return c.subject_cn()

        assert poll(lambda: served_cn() == "api-rotated.example.com", 5.0, interval=0.1), \
            gw.diag()
        with counted.connect("rl", ctx, "api.example.com") as c:
            assert c.serial() != old_serial
        # The keep-alive connection opened before the reload goes on, on its certificate.
        assert old.get().status == 200 and old.subject_cn() == "api.example.com"
    finally:
        old.close()
    assert "listener rl: certificates reloaded (generation 2)" in gw.stderr_text()
    c = exit_counters(gw, "rl")
    assert (c["reloads"], c["failed"], c["tls_failed"]) == (1, 0, 0), c
    assert (c["tls"], c["tls_resumed"]) == (counted.handshakes, counted.resumed), c


def test_sighup_reloads_and_a_broken_pair_keeps_the_current_one(gateway, pki, tmp_path):
    live, tpl = live_config(tmp_path, pki, watch=False)
    gw, counted = start_tls(gateway, tpl)
    ctx = client_ctx(pki)

    def served_cn():
        with counted.connect("rl", ctx, "api.example.com") as c:
            assert c.get().status == 200
            return c.subject_cn()

    status, _, ticket, _ = counted.fetch("rl", ctx)
    assert status == 200 and ticket.has_ticket
    old = counted.connect("rl", ctx, "api.example.com")
    try:
        assert old.get().status == 200
        install(pki.api_newkey, live)  # certificate and key both new
        # watch: false, so the once-a-second check ignores the files: a negative, hence a
        # fixed window, a little over one check.
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            assert served_cn() == "api.example.com"
            time.sleep(0.1)
        gw.signal(signal.SIGHUP)
        assert poll(lambda: served_cn() == "api-newkey.example.com", 5.0, interval=0.05), \
            gw.diag()
        assert old.get().status == 200
        # Tickets outlive a reload (the key ring is the listener's, not the certificates').
        status, _, _, reused = counted.fetch("rl", ctx, session=ticket)
        assert status == 200 and reused
        # A certificate whose key is not the one in key.pem: refused, the current pair stays.
        install(pki.api, live, parts=("cert",))
        gw.signal(signal.SIGHUP)
        assert poll(lambda: "certificate reload failed" in gw.stderr_text(), 5.0), gw.diag()
        assert served_cn() == "api-newkey.example.com"
        assert old.get().status == 200 and old.subject_cn() == "api.example.com"
        assert gw.alive()
    finally:
        old.close()
    log = gw.stderr_text()
    assert "listener rl: certificate reload failed, keeping the current ones" in log, log
    assert "key.pem" in log and "mismatch" in log, log
    c = exit_counters(gw, "rl")
    assert (c["reloads"], c["failed"], c["tls_failed"]) == (1, 1, 0), c
    assert (c["tls"], c["tls_resumed"]) == (counted.handshakes, counted.resumed), c


# --------------------------------------------------------------------------------------------
# testssl.sh: protocols, cipher categories, forward secrecy, server cipher order, server defaults (certificate,
# tickets) and the known vulnerabilities, against a listener with default settings. The same
# command is in docs/operations.md. 35 to 45 s; no network: --nodns none, no --phone-out.

TESTSSL_CHECKS = ["-p", "-s", "-f", "-P", "-S", "-U"]


def scan_cmd(port, cafile, jsonfile):
    exe = shutil.which("testssl") or shutil.which("testssl.sh")
    if not exe:
        pytest.skip("testssl.sh is not installed (Debian package testssl.sh; `make deps`)")
    return [exe, "--quiet", "--color", "0", "--warnings", "off", "--nodns", "none",
            "--connect-timeout", "5", "--openssl-timeout", "5", "--add-ca", cafile,
            "--jsonfile", jsonfile] + TESTSSL_CHECKS + ["127.0.0.1:%d" % port]


def test_testssl_finds_nothing_high_or_critical(gateway, pki, tmp_path):
    gw, _ = start_tls(gateway, tls_config({"scan": {"certificates": cert_list(pki.default)}}))
    jsonfile = str(tmp_path / "testssl.json")
    cmd = scan_cmd(gw.ports["scan"], pki.ca[0], jsonfile)
    env = dict(os.environ, TERM="dumb")
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=str(tmp_path), env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=240)
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    # testssl's exit code adds up the checks' own return codes (a check it could not run adds
    # one); 242 and above are its fatal errors (bad options, no connection, missing files).
    assert r.returncode < 240 and os.path.exists(jsonfile), out[-4000:]
    with open(jsonfile) as f:
        findings = json.load(f)
    by_id = {f["id"]: f for f in findings}
    bad = [f for f in findings if f["severity"] in ("HIGH", "CRITICAL")]
    assert not bad, json.dumps(bad, indent=1)
    assert not [f for f in findings if f["severity"] == "FATAL" or f["id"] == "scanProblem"], \
        out[-4000:]
    # The scan did run the checks asked for (a scan that could not connect reports nothing).
    for pid, want in (("SSLv2", "not offered"), ("SSLv3", "not offered"),
                      ("TLS1", "not offered"), ("TLS1_1", "not offered"),
                      ("TLS1_2", "offered"), ("TLS1_3", "offered")):
        assert by_id[pid]["finding"].startswith(want), by_id[pid]
    for vid in ("heartbleed", "CCS", "ticketbleed", "ROBOT", "secure_client_renego", "CRIME_TLS",
                "POODLE_SSL", "SWEET32", "FREAK", "DROWN", "LOGJAM", "BEAST", "LUCKY13", "RC4"):
        assert vid in by_id, sorted(by_id)
    assert gw.alive()
    print("testssl.sh took %.1fs; %d findings, none HIGH or CRITICAL" % (took, len(findings)))


def test_a_change_to_any_of_many_certificates_is_picked_up(gateway, pki, tmp_path):
    # The file watch must cover every certificate of the list, not only the first ones: 65
    # entries of one pair, then the pair being replaced, in live/.
    live = tmp_path / "live"
    live.mkdir()
    install(pki.api, str(live))
    certs = cert_list(pki.default) * 65 + [{"cert": "live/cert.pem", "key": "live/key.pem"}]
    gw, counted = start_tls(gateway, tls_config({"many": {"certificates": certs}}))
    ctx = client_ctx(pki)

    def served_cn():
        with counted.connect("many", ctx, "api.example.com") as c:
            assert c.get().status == 200
            return c.subject_cn()

    assert served_cn() == "api.example.com"
    install(pki.api_rotated, str(live), parts=("cert",))
    assert poll(lambda: served_cn() == "api-rotated.example.com", 5.0, interval=0.1), gw.diag()
    c = exit_counters(gw, "many")
    assert (c["reloads"], c["failed"]) == (1, 0), c


def test_ticket_rotation_bounds_how_long_a_ticket_resumes(gateway, pki):
    # ticket_rotation: 1s and a ring of three keys: a ticket resumes for at least two
    # rotations and stops once its key left the ring (rotations happen on handshakes, so the
    # loop keeps making them).
    gw, counted = start_tls(gateway, tls_config(
        {"rot": {"certificates": cert_list(pki.api), "ticket_rotation": "1s"}}))
    ctx = client_ctx(pki, max_version=ssl.TLSVersion.TLSv1_2)
    t0 = time.monotonic()  # before the ticket is issued: its key is at most this old
    status, _, ticket, reused = counted.fetch("rot", ctx)
    assert status == 200 and not reused and ticket.has_ticket

    def still_resumes():
        counted.fetch("rot", ctx)  # a full handshake: lets a due rotation happen
        return counted.fetch("rot", ctx, session=ticket)[3]

    assert poll(lambda: not still_resumes(), 8.0, interval=0.1), "ticket still resumes"
    lived = time.monotonic() - t0
    assert 2.0 <= lived <= 5.0, lived
    c = exit_counters(gw, "rot")
    assert (c["tls"], c["tls_resumed"]) == (counted.handshakes, counted.resumed), c


def test_client_ca_file_is_reloaded_too(gateway, pki, tmp_path):
    # The watch covers client_ca: adding a CA to the file admits its clients from then on, and
    # tickets issued under the old CA set no longer resume (their clients were verified
    # against other CAs).
    live = tmp_path / "live"
    live.mkdir()
    shutil.copyfile(pki.client_ca[0], str(live / "clients.pem"))
    gw, counted = start_tls(gateway, tls_config({"m": {
        "certificates": cert_list(pki.api), "client_ca": "live/clients.pem"}}),
        ready_ctx=client_ctx(pki, ca=False, cert=pki.client_good))
    port = gw.ports["m"]
    good = client_ctx(pki, cert=pki.client_good)
    status, _, ticket, _ = counted.fetch("m", good)
    assert status == 200 and ticket.has_ticket
    assert counted.fetch("m", good, session=ticket)[3] is True
    assert refusal(port, client_ctx(pki, cert=pki.client_bad)) == (
        "first read", "TLSV1_ALERT_UNKNOWN_CA")
    both = str(live / "clients.pem.new")
    with open(both, "w") as out:
        for ca in (pki.client_ca[0], pki.other_ca[0]):
            with open(ca) as f:
                out.write(f.read())
    os.replace(both, str(live / "clients.pem"))
    assert poll(lambda: served_now(port, client_ctx(pki, cert=pki.client_bad)), 5.0, 0.1), \
        gw.diag()
    status, _, _, reused = counted.fetch("m", good, session=ticket)
    assert status == 200 and not reused
    c = exit_counters(gw, "m")
    assert (c["reloads"], c["failed"]) == (1, 0), c
