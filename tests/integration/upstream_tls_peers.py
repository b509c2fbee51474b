"""Peers for the upstream TLS and PROXY protocol tests: certificates made with the openssl CLI,
and a small threaded HTTP/1.1 backend that can speak TLS (recording the SNI it was sent, whether
the session was resumed and the client certificate) and can expect a PROXY header (v1 or v2)
first. Each answer is JSON describing the connection it came on, so a test sees what the
gateway did."""

import json
import os
import socket
import ssl
import struct
import subprocess
import threading

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def _openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, capture_output=True)


def make_ca(d, name):
    key, crt = os.path.join(d, name + ".key"), os.path.join(d, name + ".pem")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt,
             "-days", "2", "-subj", "/CN=%s" % name, "-addext",
             "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
             cwd=d)
    return key, crt


def make_cert(d, name, ca, sans, client=False):
    """A leaf signed by `ca` (key, cert) with subjectAltName `sans` ("DNS:x,IP:y")."""
    key, csr, crt = (os.path.join(d, name + ext) for ext in (".key", ".csr", ".pem"))
    ext = os.path.join(d, name + ".ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=%s\n" % sans if sans else "")
        f.write("extendedKeyUsage=%s\n" % ("clientAuth" if client else "serverAuth"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj",
             "/CN=%s" % name, cwd=d)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
             "-out", crt, "-days", "2", "-extfile", ext, cwd=d)
    return key, crt


class Certs:
    """Two CAs (a trusted one and a stranger), a server certificate for `localhost`,
    `backend.test` and 127.0.0.1 from each, and a client certificate from a client CA."""

    def __init__(self, d):
        self.dir = str(d)
        self.ca = make_ca(self.dir, "ca")
        self.other_ca = make_ca(self.dir, "other-ca")
        self.client_ca = make_ca(self.dir, "client-ca")
        sans = "DNS:localhost,DNS:backend.test,IP:127.0.0.1"
        self.server = make_cert(self.dir, "server", self.ca, sans)
        self.stranger = make_cert(self.dir, "stranger", self.other_ca, sans)
        self.client = make_cert(self.dir, "client", self.client_ca, "", client=True)


def parse_proxy(sock):
    """Reads a PROXY v1 or v2 header from `sock` (blocking); returns a dict."""
    first = sock.recv(16, socket.MSG_PEEK | socket.MSG_WAITALL)
    if first.startswith(V2_SIG[:12]):
        head = _recv_exact(sock, 16)
        ver_cmd, fam, length = head[12], head[13], struct.unpack("!H", head[14:16])[0]
        body = _recv_exact(sock, length)
        out = {"version": 2, "command": ver_cmd & 0x0F, "family": fam}
        if fam == 0x11:
            src, dst = socket.inet_ntop(socket.AF_INET, body[0:4]), socket.inet_ntop(
                socket.AF_INET, body[4:8])
            sp, dp = struct.unpack("!HH", body[8:12])
            out.update(src="%s:%d" % (src, sp), dst="%s:%d" % (dst, dp))
        elif fam == 0x21:
            src, dst = socket.inet_ntop(socket.AF_INET6, body[0:16]), socket.inet_ntop(
                socket.AF_INET6, body[16:32])
            sp, dp = struct.unpack("!HH", body[32:36])
            out.update(src="[%s]:%d" % (src, sp), dst="[%s]:%d" % (dst, dp))
        return out
    line = b""
    while not line.endswith(b"\r\n"):
        c = sock.recv(1)
        if not c or len(line) > 107:
            raise ValueError("bad v1 header %r" % line)
        line += c
    parts = line.decode().strip().split(" ")
    out = {"version": 1, "proto": parts[1]}
    if parts[1] in ("TCP4", "TCP6"):
        out.update(src="%s:%s" % (parts[2], parts[4]), dst="%s:%s" % (parts[3], parts[5]))
    return out


def _recv_exact(sock, n):
    b = b""
    while len(b) < n:
        c = sock.recv(n - len(b))
        if not c:
            raise ValueError("short PROXY header")
        b += c
    return b


class Backend:
    """Threaded HTTP/1.1 backend on 127.0.0.1. `tls`: an ssl.SSLContext (server side) or None;
    `proxy`: expect a PROXY header first. Answers every request with JSON: the connection's
    number, the request number on it, SNI, resumed, client certificate subject, PROXY info."""

    def __init__(self, name, tls=None, proxy=False):
        self.name = name
        self.tls = tls
        self.proxy = proxy
        self.lock = threading.Lock()
        self.conns = []  # per accepted connection: dict of what it saw
        self.handshake_failures = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self.threads = []
        if tls is not None:
            tls.sni_callback = self._on_sni
        self.t = threading.Thread(target=self._accept, daemon=True)
        self.t.start()

    def _on_sni(self, sslobj, name, ctx):
        sslobj.sluice_sni = name

    def _accept(self):
        while not self.stopping:
            try:
                s, peer = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(s, peer), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, s, peer):
        info = {"peer": "%s:%d" % peer, "sni": None, "resumed": False, "client": None,
                "proxy": None, "requests": 0}
        s.settimeout(10)
        try:
            if self.proxy:
                info["proxy"] = parse_proxy(s)
            if self.tls is not None:
                try:
                    s = self.tls.wrap_socket(s, server_side=True)
                except (ssl.SSLError, OSError):
                    with self.lock:
                        self.handshake_failures += 1
                    return
                info["sni"] = getattr(s, "sluice_sni", None)
                info["resumed"] = s.session_reused
                cert = s.getpeercert()
                if cert:
                    info["client"] = dict(x[0] for x in cert.get("subject", ())).get(
                        "commonName")
            with self.lock:
                self.conns.append(info)
                index = len(self.conns)
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    c = s.recv(65536)
                    if not c:
                        return
                    buf += c
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip())
                while len(buf) < length:
                    buf += s.recv(65536)
                buf = buf[length:]
                info["requests"] += 1
                body = json.dumps(dict(info, conn=index, backend=self.name)).encode()
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\nKeep-Alive: timeout=30\r\n\r\n" % len(body)
                          + body)
        except (OSError, ValueError, ssl.SSLError):
            return
        finally:
            try:
                s.close()
            except OSError:
                pass

    def stop(self):
        self.stopping = True
        try:
            self.sock.close()
        except OSError:
            pass


def server_ctx(cert, client_ca=None, max_tls12=False):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert[1], cert[0])
    if max_tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
