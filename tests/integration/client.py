"""Raw HTTP/1.1 client for the integration tests: sends exact bytes, parses responses with
timeouts, and tells whether the server closed the connection."""

import json
import socket
import time

DEFAULT_TIMEOUT = 5.0


class IncompleteResponse(Exception):
    """The connection ended (or timed out) before a complete, valid response was read."""

    def __init__(self, msg, partial=None):
        super().__init__(msg)
        self.partial = partial


class Response:
    def __init__(self, version, status, reason, headers, raw_head):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers  # [(name, value)] in order received
        self.raw_head = raw_head
        self.body = b""
        self.body_len = 0
        self.trailers = []
        self.chunked = False
        self.interim = []  # 1xx responses that preceded this one

    def header(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def headers_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def has_header(self, name):
        return self.header(name) is not None

    def json(self):
        return json.loads(self.body.decode())

    def __repr__(self):
        return "<Response %s %d %r headers=%r body=%r>" % (
            self.version,
            self.status,
            self.reason,
            self.headers,
            self.body[:300],
        )


def build_request(method="GET", target="/", headers=None, body=b"", version="HTTP/1.1",
                  host="test.local", content_length=True):
    """Builds request bytes. `headers` is a list of (name, value); Host is added first unless
    `host` is None or a Host header is given; Content-Length is added for a non-empty body
    unless `content_length` is False or one is given."""
    headers = list(headers or [])
    names = {k.lower() for k, _ in headers}
    lines = ["%s %s %s" % (method, target, version)]
    if host is not None and "host" not in names:
        lines.append("Host: %s" % host)
    for k, v in headers:
        lines.append("%s: %s" % (k, v))
    if body and content_length and "content-length" not in names and \
            "transfer-encoding" not in names:
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk_encode(body, sizes=(1, 7, 100, 4096, 65536), ext=False, trailers=()):
    """Chunked coding of `body` with irregular chunk sizes (cycled)."""
    out = bytearray()
    i = 0
    k = 0
    while i < len(body):
        n = sizes[k % len(sizes)]
        k += 1
        piece = body[i : i + n]
        i += len(piece)
        out += b"%x" % len(piece)
        if ext and k % 3 == 0:
            out += b";name=value"
        out += b"\r\n" + piece + b"\r\n"
    out += b"0\r\n"
    for t in trailers:
        out += t.encode("latin-1") + b"\r\n"
    out += b"\r\n"
    return bytes(out)


class RawClient:
    def __init__(self, port, timeout=DEFAULT_TIMEOUT, host="127.0.0.1"):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = bytearray()
        self.eof = False
        self.reset = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        self.sock.sendall(data)

    def request(self, method="GET", target="/", headers=None, body=b"", timeout=None, **kw):
        self.send(build_request(method, target, headers, body, **kw))
        return self.read_response(head=(method == "HEAD"), timeout=timeout)

    # -- low level -------------------------------------------------------------------------

    def _fill(self, deadline):
        """Reads more bytes; False on EOF or reset. Raises socket.timeout past `deadline`."""
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("deadline passed")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(256 * 1024)
        except ConnectionResetError:
            self.eof = True
            self.reset = True
            return False
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _readline(self, deadline, limit=1 << 20):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > limit:
                raise IncompleteResponse("line too long")
            if not self._fill(deadline):
                raise IncompleteResponse("EOF inside a line", bytes(self.buf))

    def _read_exact(self, n, deadline):
        while len(self.buf) < n:
            if not self._fill(deadline):
                raise IncompleteResponse("EOF after %d of %d bytes" % (len(self.buf), n))
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    # -- responses -------------------------------------------------------------------------

    def read_head(self, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.buf:
            if not self._fill(deadline):
                raise IncompleteResponse("connection closed before any response byte")
        raw = bytearray()
        line = self._readline(deadline)
        raw += line
        if not line.endswith(b"\r\n"):
            raise IncompleteResponse("status line not CRLF-terminated: %r" % line)
        parts = line[:-2].decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise IncompleteResponse("bad status line %r" % line)
        version = parts[0]
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        headers = []
        while True:
            h = self._readline(deadline)
            raw += h
            if h == b"\r\n":
                break
            if not h.endswith(b"\r\n") or b":" not in h:
                raise IncompleteResponse("bad header line %r" % h)
            k, v = h[:-2].decode("latin-1").split(":", 1)
            headers.append((k, v.strip(" \t")))
        return Response(version, status, reason, headers, bytes(raw))

    def read_response(self, head=False, timeout=None, sink=None, skip_interim=True):
        """Reads one response (by default skipping and collecting 1xx ones). The body is
        delimited as RFC 9112 says; with `sink`, body bytes are passed to sink(bytes) instead
        of being kept. Raises IncompleteResponse when the response is cut or invalid."""
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        interim = []
        while True:
            resp = self.read_head(max(0.001, deadline - time.monotonic()))
            if 100 <= resp.status < 200 and skip_interim and resp.status != 101:
                interim.append(resp)
                continue
            break
        resp.interim = interim
        body = bytearray()

        def take(data):
            resp.body_len += len(data)
            if sink is not None:
                sink(data)
            else:
                body.extend(data)

        te = resp.header("transfer-encoding")
        cl = resp.headers_all("content-length")
        if head or resp.status in (204, 304) or 100 <= resp.status < 200:
            pass
        elif te is not None:
            if te.strip().lower() != "chunked":
                raise IncompleteResponse("unexpected transfer-encoding %r" % te)
            resp.chunked = True
            while True:
                line = self._readline(deadline)
                if not line.endswith(b"\r\n"):
                    raise IncompleteResponse("chunk size line not CRLF-terminated")
                try:
                    size = int(line[:-2].split(b";")[0].strip(), 16)
                except ValueError:
                    raise IncompleteResponse("bad chunk size %r" % line)
                if size == 0:
                    while True:
                        t = self._readline(deadline)
                        if t == b"\r\n":
                            break
                        resp.trailers.append(t[:-2].decode("latin-1"))
                    break
                left = size
                while left:
                    while not self.buf:
                        if not self._fill(deadline):
                            raise IncompleteResponse("EOF in chunk data")
                    piece = bytes(self.buf[:left])
                    del self.buf[: len(piece)]
                    left -= len(piece)
                    take(piece)
                if self._read_exact(2, deadline) != b"\r\n":
                    raise IncompleteResponse("chunk data not followed by CRLF")
        elif cl:
            if len(set(cl)) != 1 or not cl[0].isdigit():
                raise IncompleteResponse("bad content-length %r" % cl)
            left = int(cl[0])
            while left:
                while not self.buf:
                    if not self._fill(deadline):
                        raise IncompleteResponse(
                            "EOF with %d body bytes missing" % left, resp
                        )
                piece = bytes(self.buf[:left])
                del self.buf[: len(piece)]
                left -= len(piece)
                take(piece)
        else:
            # Delimited by close.
            while True:
                if self.buf:
                    take(bytes(self.buf))
                    self.buf.clear()
                if not self._fill(deadline):
                    break
        if sink is None:
            resp.body = bytes(body)
        return resp

    def try_read_response(self, **kw):
        """(response, None) or (None, reason) when no complete valid response arrived."""
        try:
            return self.read_response(**kw), None
        except IncompleteResponse as e:
            return None, str(e)
        except socket.timeout:
            return None, "timeout"

    def closed(self, timeout=2.0):
        """True when the server closes (EOF or reset) within `timeout` without sending more
        bytes; False on timeout. Extra bytes received are kept in self.buf (and make the
        result False)."""
        deadline = time.monotonic() + timeout
        if self.buf:
            return False
        try:
            while True:
                if not self._fill(deadline):
                    return not self.buf
                if self.buf:
                    return False
        except socket.timeout:
            return False

    def wait_closed(self, timeout=2.0):
        """Like closed() but ignores bytes that arrive; returns (closed, extra_bytes)."""
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                pass
            return True, bytes(self.buf)
        except socket.timeout:
            return False, bytes(self.buf)


def one_request(port, method="GET", target="/", headers=None, body=b"", timeout=DEFAULT_TIMEOUT,
                **kw):
    """Sends one request on a fresh connection and returns the response."""
    with RawClient(port, timeout=timeout) as c:
        c.send(build_request(method, target, headers, body, **kw))
        return c.read_response(head=(method == "HEAD"))


def assert_gateway_error(resp, status):
    """A gateway-generated error: the status, a JSON body, and a request_id equal to the
    response's X-Request-Id header."""
    assert resp.status == status, resp
    ctype = resp.header("content-type", "")
    assert ctype.split(";")[0].strip().lower() == "application/json", resp
    doc = resp.json()
    assert "request_id" in doc, doc
    assert doc["request_id"], doc
    rid = resp.header("x-request-id")
    assert rid is not None, "no X-Request-Id header on %r" % resp
    assert doc["request_id"] == rid, (doc, rid)
    return doc
