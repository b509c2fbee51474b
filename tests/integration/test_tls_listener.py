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
from helpers import REPO, START_TIMEOUT, poll

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


def exchange_failure(port, ctx, sni="api.example.com"):
    """Tries one request. Returns None when a response came back, else where and why it
    failed: ("handshake", reason) or ("first read", reason)."""
    try:
        c = TlsClient(port, ctx, sni)
    except (ssl.SSLError, ConnectionError) as e:
        return "handshake", ssl_reason(e)
    with c:
        try:
            c.get()
        except (ssl.SSLError, ConnectionError, IncompleteResponse) as e:
            return "first read", ssl_reason(e)
    return None


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
    return fetch(gw.ports[listener], client_ctx(pki, cert=pki.client_good))[0] == 200


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
    t13, t12 = ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2
    # TLS 1.3: the client's handshake ends before the server has checked its certificate, so
    # the refusal (an alert) arrives on the first read.
    assert exchange_failure(port, client_ctx(pki)) == (
        "first read", "TLSV13_ALERT_CERTIFICATE_REQUIRED")
    assert exchange_failure(port, client_ctx(pki, cert=pki.client_bad)) == (
        "first read", "TLSV1_ALERT_UNKNOWN_CA")
    # TLS 1.2: the handshake itself fails.
    assert exchange_failure(port, client_ctx(pki, max_version=t12)) == (
        "handshake", "SSLV3_ALERT_HANDSHAKE_FAILURE")
    assert exchange_failure(port, client_ctx(pki, cert=pki.client_bad, max_version=t12)) == (
        "handshake", "TLSV1_ALERT_UNKNOWN_CA")
    for v in (t12, t13):
        assert exchange_failure(port, client_ctx(pki, cert=pki.client_good, max_version=v)) \
            is None
    # A certificate issued for servers (not clientAuth) by our server CA is not a client one.
    assert exchange_failure(port, client_ctx(pki, cert=pki.api))[1] in (
        "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE")


def test_client_certificate_optional(gw, pki):
    port = gw.ports["mtls_optional"]
    assert exchange_failure(port, client_ctx(pki)) is None
    assert exchange_failure(port, client_ctx(pki, cert=pki.client_good)) is None
    assert exchange_failure(port, client_ctx(pki, cert=pki.client_bad)) == (
        "first read", "TLSV1_ALERT_UNKNOWN_CA")
    assert exchange_failure(port, client_ctx(pki, cert=pki.client_bad,
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
