"""Peers and helpers for the filter integration tests (jwt, api_key, rate_limit).

- Keys and tokens: one RSA / EC P-256 / EC P-384 / Ed25519 key pair per test process (made
  with python3-cryptography), PEM and JWK forms, tokens signed with PyJWT, and hand-made tokens
  (alg none, HMAC keyed with a public key, broken encodings).
- JwksServer: a threaded HTTP(S) server whose JWK Set the test can change; it counts fetches.
- tls_files(): a self-signed CA and a 127.0.0.1 server certificate for an https jwks_url.
- RedisServer: a real redis-server on a free port, started and stopped by PID.
- filter_config(): an inline config with one upstream and routes carrying filters.
- Load helpers: keep-alive request loops and a pipelining sender for key floods.

A missing peer binary (redis-server) fails the test; nothing here skips.
"""

import base64
import datetime
import hashlib
import hmac
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from functools import lru_cache

import pytest

import jwt as pyjwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from client import RawClient, build_request
from helpers import poll, simple_config
from peers import free_port

# ---------------------------------------------------------------------------------------------
# Keys and tokens.

# 64 bytes: long enough for HS512 too (the config minimum is 32).
HMAC_SECRET = "sluice-test-hmac-secret-0123456789abcdef-0123456789abcdef-xyz!+64b"
assert len(HMAC_SECRET) >= 64

ALG_KEY = {
    "HS256": "hmac", "HS384": "hmac", "HS512": "hmac",
    "RS256": "rsa", "RS384": "rsa", "RS512": "rsa",
    "PS256": "rsa", "PS384": "rsa", "PS512": "rsa",
    "ES256": "ec256", "ES384": "ec384",
    "EdDSA": "ed25519",
}
ASYMMETRIC_ALGS = [a for a, k in ALG_KEY.items() if k != "hmac"]
HMAC_ALGS = [a for a, k in ALG_KEY.items() if k == "hmac"]


def private_key(kind, n=0):
    """The process-wide key pair `kind` (rsa, ec256, ec384, ed25519); `n` makes another one."""
    return _private_key(kind, int(n))


@lru_cache(maxsize=None)
def _private_key(kind, n):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def public_pem(kind, n=0):
    return private_key(kind, n).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_public_pem(dirpath, kind, n=0):
    p = os.path.join(str(dirpath), "%s-%d.pub.pem" % (kind, n))
    with open(p, "wb") as f:
        f.write(public_pem(kind, n))
    return p


def jwk(kind, kid, n=0, alg=None):
    """The public JWK (dict) of key pair `kind`/`n` with `kid` (and `alg` when given)."""
    pub = private_key(kind, n).public_key()
    if kind == "rsa":
        d = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(pub))
    elif kind in ("ec256", "ec384"):
        d = json.loads(pyjwt.algorithms.ECAlgorithm.to_jwk(pub))
    else:
        d = json.loads(pyjwt.algorithms.OKPAlgorithm.to_jwk(pub))
    d["kid"] = kid
    d["use"] = "sig"
    if alg:
        d["alg"] = alg
    return d


def jwks(*keys):
    return {"keys": list(keys)}


def write_json(dirpath, name, doc):
    p = os.path.join(str(dirpath), name)
    tmp = p + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, p)
    return p


def claims(sub="user-1", ttl=300, **extra):
    now = int(time.time())
    c = {"sub": sub, "iat": now, "exp": now + ttl}
    c.update(extra)
    return {k: v for k, v in c.items() if v is not None}


def make_token(alg, payload=None, kid=None, n=0, secret=HMAC_SECRET, headers=None):
    """A token signed with PyJWT by the key for `alg` (HMAC: `secret`)."""
    payload = claims() if payload is None else payload
    hdr = dict(headers or {})
    if kid is not None:
        hdr["kid"] = kid
    kind = ALG_KEY[alg]
    key = secret if kind == "hmac" else private_key(kind, n)
    return pyjwt.encode(payload, key, algorithm=alg, headers=hdr or None)


def b64u(data):
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header, payload, signature=b""):
    """A hand-made token: base64url(JSON header) . base64url(JSON payload) . base64url(sig)."""
    return "%s.%s.%s" % (b64u(json.dumps(header, separators=(",", ":"))),
                         b64u(json.dumps(payload, separators=(",", ":"))), b64u(signature))


def hs_token_with_key(key_bytes, payload=None, alg="HS256", kid=None):
    """HMAC-signed token whose secret is `key_bytes` (e.g. a public key PEM: the classic
    algorithm-confusion attack, which PyJWT itself refuses to produce)."""
    payload = claims() if payload is None else payload
    header = {"alg": alg, "typ": "JWT"}
    if kid:
        header["kid"] = kid
    signing_input = "%s.%s" % (b64u(json.dumps(header, separators=(",", ":"))),
                               b64u(json.dumps(payload, separators=(",", ":"))))
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    sig = hmac.new(key_bytes, signing_input.encode(), digest).digest()
    return signing_input + "." + b64u(sig)


def flip_signature(token):
    """The same token with one character of the signature changed (still valid base64url)."""
    head, sig = token.rsplit(".", 1)
    i = len(sig) // 2
    c = "A" if sig[i] != "A" else "B"
    return head + "." + sig[:i] + c + sig[i + 1:]


def bearer(token):
    return [("Authorization", "Bearer " + token)]


# ---------------------------------------------------------------------------------------------
# TLS material for an https jwks_url.


def tls_files(dirpath):
    """Writes ca.pem, server.pem, server.key (server cert for 127.0.0.1 and localhost, signed
    by a fresh CA). Returns (ca_path, cert_path, key_path)."""
    d = str(dirpath)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sluice test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress
    srv_cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
                .issuer_name(ca_name).public_key(srv_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.DNSName("localhost")]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
    ca_path = os.path.join(d, "ca.pem")
    cert_path = os.path.join(d, "server.pem")
    key_path = os.path.join(d, "server.key")
    with open(ca_path, "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    with open(cert_path, "wb") as f:
        f.write(srv_cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(srv_key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return ca_path, cert_path, key_path


# ---------------------------------------------------------------------------------------------
# JWKS server.


class _JwksHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def do_GET(self):
        owner = self.server.owner
        with owner.lock:
            owner.arrived += 1
        owner.gate.wait(10)  # hold() keeps answers back (a slow IdP); bounded
        with owner.lock:
            owner.fetches += 1
            owner.paths.append(self.path)
            body = owner.body
            status = owner.status
            extra = list(owner.extra_headers)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class JwksServer:
    """Serves one JWK Set at every path (http, or https with `certfile`/`keyfile`). `fetches`
    counts GET requests; set_keys() changes what is served; stop() makes the IdP go down
    (connections are then refused)."""

    def __init__(self, doc=None, certfile=None, keyfile=None):
        self.lock = threading.Lock()
        self.fetches = 0
        self.paths = []
        self.status = 200
        self.extra_headers = []
        self.body = json.dumps(doc or {"keys": []}).encode()
        self.arrived = 0  # requests received, answered or not
        self.gate = threading.Event()
        self.gate.set()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JwksHandler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.tls = bool(certfile)
        if certfile:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certfile, keyfile)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = "%s://127.0.0.1:%d/.well-known/jwks.json" % (
            "https" if self.tls else "http", self.port)
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self.stopped = False

    def set_doc(self, doc):
        with self.lock:
            self.body = json.dumps(doc).encode()

    def set_keys(self, *keys):
        self.set_doc(jwks(*keys))

    def count(self):
        with self.lock:
            return self.fetches

    def hold(self):
        """Fetches wait (at most 10 s) until release(): a slow identity provider."""
        self.gate.clear()

    def release(self):
        self.gate.set()

    def wait_fetches(self, n, timeout=5.0):
        return poll(lambda: self.count() >= n, timeout)

    def stop(self):
        if self.stopped:
            return
        self.stopped = True
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


# ---------------------------------------------------------------------------------------------
# Redis.


def redis_binary():
    path = shutil.which("redis-server")
    if not path:
        pytest.fail("redis-server not found in PATH (apt-get install redis-server)",
                    pytrace=False)
    return path


class RedisServer:
    """A real redis-server bound to 127.0.0.1 on a free port, no persistence. stop()/kill()
    by PID; start() again reuses the same port."""

    def __init__(self, tmpdir):
        self.bin = redis_binary()
        self.dir = str(tmpdir)
        self.port = free_port()
        self.addr = "127.0.0.1:%d" % self.port
        self.proc = None
        self.start()

    def start(self, timeout=10.0):
        assert self.proc is None or self.proc.poll() is not None
        self.log = open(os.path.join(self.dir, "redis-%d.log" % self.port), "ab")
        self.proc = subprocess.Popen(
            [self.bin, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ok = poll(lambda: self.proc.poll() is None and self.ping(), timeout, interval=0.02)
        if not ok:
            self.stop()
            pytest.fail("redis-server did not answer PING on %s within %.0fs"
                        % (self.addr, timeout), pytrace=False)

    def command(self, *args, timeout=1.0):
        """Sends one command; returns the raw reply bytes (enough for PING / FLUSHALL)."""
        req = b"*%d\r\n" % len(args)
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            req += b"$%d\r\n%s\r\n" % (len(a), a)
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(req)
            return s.recv(65536)

    def ping(self):
        try:
            return self.command("PING", timeout=0.3).startswith(b"+PONG")
        except OSError:
            return False

    def _end(self, sig):
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGCONT)  # a paused server must be able to exit
        os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.log.close()

    def kill(self):
        self._end(signal.SIGKILL)

    def pause(self):
        """SIGSTOP: connections still open, nothing is answered (a hung Redis)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self):
        self._end(signal.SIGTERM)


@pytest.fixture
def redis_server(tmp_path):
    """Factory: redis_server() -> RedisServer, stopped at teardown."""
    started = []

    def make():
        r = RedisServer(tmp_path)
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


@pytest.fixture
def jwks_server():
    """Factory: jwks_server(doc=None, certfile=None, keyfile=None) -> JwksServer."""
    started = []

    def make(doc=None, certfile=None, keyfile=None):
        s = JwksServer(doc, certfile, keyfile)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


# ---------------------------------------------------------------------------------------------
# Configs.


def filter_config(filters=(), routes=None, top="", workers=1, default_filters=(),
                  upstream="$B1", limits=""):
    """A config with upstream `app` at `upstream` and, by default, one catch-all route `all`
    running `filters` (YAML flow entries such as "jwt: {secret: ...}"). `routes` replaces the
    route list (YAML items indented by two spaces). `top` adds top-level YAML (consumers:,
    redis:) and default_filters a top-level default_filters: list."""
    if routes is None:
        routes = "  - name: all\n    match: {path_prefix: /}\n    upstream: app\n"
        if filters:
            routes += "    filters:\n" + "".join("      - %s\n" % f for f in filters)
    extra = top.rstrip("\n")
    if default_filters:
        extra += ("\n" if extra else "") + "default_filters:\n" + "".join(
            "  - %s\n" % f for f in default_filters).rstrip("\n")
    upstreams = "  - name: app\n    endpoints:\n      - {address: %s}\n" % upstream
    return simple_config(routes, upstreams, workers=workers, global_extra=extra, limits=limits)


def route(name, prefix, filters=(), extra="", upstream="app"):
    """One route item for filter_config(routes=...)."""
    s = "  - name: %s\n    match: {path_prefix: %s}\n    upstream: %s\n" % (name, prefix, upstream)
    if extra:
        s += "".join("    %s\n" % ln for ln in extra.strip("\n").split("\n"))
    if filters:
        s += "    filters:\n" + "".join("      - %s\n" % f for f in filters)
    return s


def direct_route(name, prefix, filters=(), extra=""):
    """A route answering 200 "ok" itself (no backend in the loop: fast floods)."""
    s = ("  - name: %s\n    match: {path_prefix: %s}\n"
         "    direct_response: {status: 200, body: \"ok\", content_type: text/plain}\n"
         % (name, prefix))
    if extra:
        s += "".join("    %s\n" % ln for ln in extra.strip("\n").split("\n"))
    if filters:
        s += "    filters:\n" + "".join("      - %s\n" % f for f in filters)
    return s


def q(s):
    """A YAML double-quoted scalar."""
    return json.dumps(s)


def backend_headers(resp):
    """Headers the echo backend received, from its JSON answer: [(name, value)]."""
    return [(k, v) for k, v in resp.json()["headers"]]


def hvalues(headers, name):
    return [v for k, v in headers if k.lower() == name.lower()]


def error_of(resp):
    try:
        return resp.json().get("error")
    except (ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# Load.


class KeepAliveClient:
    """One keep-alive connection that reconnects when the server closes it."""

    def __init__(self, port, timeout=5.0):
        self.port = port
        self.timeout = timeout
        self.c = None

    def request(self, target="/", headers=None, method="GET"):
        for attempt in range(2):
            if self.c is None:
                self.c = RawClient(self.port, timeout=self.timeout)
            try:
                self.c.send(build_request(method, target, headers))
                r = self.c.read_response(head=(method == "HEAD"))
            except Exception:
                self.c.close()
                self.c = None
                if attempt:
                    raise
                continue
            if (r.header("connection") or "").lower() == "close":
                self.c.close()
                self.c = None
            return r

    def close(self):
        if self.c:
            self.c.close()
            self.c = None


def hammer(port, seconds, threads, target="/", headers=None):
    """`threads` keep-alive clients send requests back to back for `seconds`. Returns a list of
    (t_sent, t_received, status) over all threads, sorted by t_sent."""
    out = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    errors = []

    def run(i):
        k = KeepAliveClient(port)
        mine = []
        try:
            while time.monotonic() < stop_at:
                hs = headers(i) if callable(headers) else headers
                t0 = time.monotonic()
                r = k.request(target, hs)
                mine.append((t0, time.monotonic(), r.status))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        finally:
            k.close()
            with lock:
                out.extend(mine)

    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 30)
    assert not errors, errors[:5]
    out.sort()
    return out


def pipeline_flood(port, requests, batch=300, timeout=30.0):
    """Sends `requests` (an iterable of request bytes or header lists for GET /) pipelined
    `batch` at a time, each batch on a fresh connection (resending what a closed connection
    left unanswered). Returns {status: count}. Responses must be short and bodies must not
    contain "HTTP/1.1 " (true for direct responses and the gateway's JSON errors).
    The default batch keeps each connection's pipelined bytes under 20 KiB: sluice currently
    stalls on a pipelined request that straddles input byte 20480 of a connection (it
    answers 408 header_timeout after header_timeout), see the report of this suite."""
    counts = {}

    def flush(reqs):
        left = list(reqs)
        stalls = 0
        while left:
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            got = 0
            try:
                s.sendall(b"".join(left))
                tail = b""
                while got < len(left):
                    data = s.recv(1 << 20)
                    if not data:
                        break
                    buf = tail + data
                    i = 0
                    while True:
                        j = buf.find(b"HTTP/1.1 ", i)
                        if j < 0 or len(buf) < j + 12:
                            break
                        st = int(buf[j + 9:j + 12])
                        counts[st] = counts.get(st, 0) + 1
                        got += 1
                        i = j + 12
                    tail = buf[max(i, len(buf) - 11):]
            finally:
                s.close()
            stalls = stalls + 1 if got == 0 else 0
            if stalls > 3:
                raise AssertionError("no response to a pipelined batch (%d left)" % len(left))
            left = left[got:]

    pending = []
    for item in requests:
        pending.append(item if isinstance(item, bytes) else build_request("GET", "/", item))
        if len(pending) >= batch:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    return counts


def request_from(src_ip, port, target="/", headers=None, timeout=5.0):
    """One request on a fresh connection whose source address is `src_ip` (any 127.x.y.z
    works on Linux loopback): a second client address for ip-keyed limits."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((src_ip, 0))
    s.connect(("127.0.0.1", port))
    c = RawClient.__new__(RawClient)
    c.sock, c.timeout, c.buf, c.eof, c.reset = s, timeout, bytearray(), False, False
    try:
        c.send(build_request("GET", target, headers))
        return c.read_response()
    finally:
        c.close()


def pipelined(port, n, target="/", headers=None, timeout=5.0):
    """n identical requests written at once on one connection; returns the n responses."""
    with RawClient(port, timeout=timeout) as c:
        c.send(build_request("GET", target, headers) * n)
        return [c.read_response() for _ in range(n)]
