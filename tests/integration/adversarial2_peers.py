"""Helpers for test_adversarial2.py (stdlib only).

`read_framed(reader)` reads one request exactly as a strict HTTP/1.1 server would, and keeps
the raw bytes: the head, the body as framed on the wire, and the decoded body. It refuses
anything whose framing is ambiguous (both Content-Length and Transfer-Encoding, more than
one of either, a Transfer-Encoding other than `chunked`, bare LF), so a test can tell that
what the gateway forwarded is exactly one well-formed request.

`recording_handler(backend, answer)` is a ScriptedBackend handler that reads requests in a
loop, records `(index, Framed)` in `backend.framed`, and answers each with `answer(framed)`
(bytes) or a small 200.
"""

import re

from peers import PeerProtocolError

TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class Framed:
    def __init__(self, raw_head, start, headers, raw_body, body, trailers):
        self.raw_head = raw_head
        self.start = start
        self.headers = headers
        self.raw_body = raw_body
        self.body = body
        self.trailers = trailers

    def all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def get(self, name, default=None):
        v = self.all(name)
        return v[0] if v else default

    def __repr__(self):
        return "<Framed %r headers=%r body=%d>" % (self.start, self.headers, len(self.body))


def _line(reader, limit=65536):
    line = reader.readline(limit)
    if line and not line.endswith(b"\r\n"):
        raise PeerProtocolError("bare LF or truncated line: %r" % line[:200])
    return line


def read_framed(reader):
    """One request, strictly. None on a clean EOF before the first byte."""
    first = _line(reader)
    if not first:
        return None
    raw = bytearray(first)
    start = first[:-2].decode("latin-1")
    if not re.match(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+ \S+ HTTP/1\.1$", start):
        raise PeerProtocolError("bad request line %r" % start)
    headers = []
    while True:
        h = _line(reader)
        if not h:
            raise PeerProtocolError("EOF inside head")
        raw += h
        if h == b"\r\n":
            break
        name, sep, value = h[:-2].partition(b":")
        if not sep or not TOKEN.match(name):
            raise PeerProtocolError("bad header line %r" % h)
        if any(b < 0x20 and b != 0x09 or b == 0x7F for b in value):
            raise PeerProtocolError("control byte in %r" % h)
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    cls = [v for k, v in headers if k.lower() == "content-length"]
    tes = [v for k, v in headers if k.lower() == "transfer-encoding"]
    hosts = [v for k, v in headers if k.lower() == "host"]
    if len(hosts) != 1:
        raise PeerProtocolError("%d Host headers" % len(hosts))
    if cls and tes:
        raise PeerProtocolError("both Content-Length and Transfer-Encoding")
    if len(cls) > 1 or len(tes) > 1:
        raise PeerProtocolError("repeated framing header")
    raw_body = bytearray()
    body = bytearray()
    trailers = []
    if tes:
        if tes[0] != "chunked":
            raise PeerProtocolError("Transfer-Encoding %r" % tes[0])
        while True:
            size_line = _line(reader)
            if not size_line:
                raise PeerProtocolError("EOF in chunk size")
            raw_body += size_line
            if not re.match(rb"^[0-9a-fA-F]+\r\n$", size_line):
                raise PeerProtocolError("chunk size line re-framed badly: %r" % size_line)
            n = int(size_line[:-2], 16)
            if n == 0:
                break
            data = reader.read_exact(n + 2)
            if data[-2:] != b"\r\n":
                raise PeerProtocolError("chunk data not followed by CRLF")
            raw_body += data
            body += data[:-2]
        while True:
            t = _line(reader)
            if not t:
                raise PeerProtocolError("EOF in trailers")
            raw_body += t
            if t == b"\r\n":
                break
            trailers.append(t[:-2].decode("latin-1"))
    elif cls:
        if not re.match(r"^[0-9]+$", cls[0]):
            raise PeerProtocolError("bad Content-Length %r" % cls[0])
        data = reader.read_exact(int(cls[0]))
        raw_body += data
        body += data
    return Framed(bytes(raw), start, headers, bytes(raw_body), bytes(body), trailers)


def ok_response(framed, body=None):
    body = body if body is not None else ("ok %s" % framed.start.split(" ")[1]).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def recording_handler(backend, answer=ok_response):
    """Reads framed requests until EOF, recording each; answers with answer(framed)."""
    if not hasattr(backend, "framed"):
        backend.framed = []
        backend.framing_errors = []

    def handler(conn, reader, index):
        while True:
            try:
                f = read_framed(reader)
            except PeerProtocolError as e:
                with backend.lock:
                    backend.framing_errors.append((index, repr(e)))
                raise
            if f is None:
                return
            with backend.lock:
                backend.framed.append((index, f))
            backend.record(index, f.start)
            out = answer(f)
            if out:
                conn.sendall(out)

    return handler
