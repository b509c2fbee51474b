"""Scripted misbehaving backends for test_adversarial.py (stdlib only).

`ScriptedBackend(handler)` listens on 127.0.0.1 (kernel-picked port) and runs
`handler(conn, reader, index)` in a thread for every accepted connection; `index` counts
connections from 1. The handler owns the conversation: it reads request heads with
`read_request(reader)` and writes whatever bytes it likes. Each socket has a timeout, and
stop() shuts every connection down and joins the threads, so a hung handler cannot outlive
its test.
"""

import socket
import struct
import threading
import time

from peers import PeerProtocolError, Reader, hget, read_head

IO_TIMEOUT = 20.0


def read_request(reader):
    """Reads one request head and its Content-Length body. Returns (start, headers, body)
    or None on a clean EOF before the head."""
    head = read_head(reader)
    if head is None:
        return None
    start, headers = head
    cl = hget(headers, "content-length")
    body = reader.read_exact(int(cl)) if cl else b""
    return start, headers, body


def reset(conn):
    """Closes `conn` with an RST (SO_LINGER 0)."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    conn.close()


class ScriptedBackend:
    def __init__(self, handler):
        self.handler = handler
        self.lock = threading.Lock()
        self.conn_count = 0
        self.requests = []  # (conn index, request line) as handlers report them
        self.errors = []
        self._stopped = threading.Event()
        self._conns = set()
        self._threads = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.addr = "127.0.0.1:%d" % self.port
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept_thread.start()

    @property
    def stopped(self):
        return self._stopped

    def record(self, index, line):
        with self.lock:
            self.requests.append((index, line))

    def lines(self):
        with self.lock:
            return [line for _, line in self.requests]

    def wait_requests(self, n, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.requests) >= n:
                    return True
            time.sleep(0.01)
        return False

    def _accept_loop(self):
        while not self._stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.conn_count += 1
                index = self.conn_count
                self._conns.add(conn)
            t = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn, index):
        conn.settimeout(IO_TIMEOUT)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.handler(conn, Reader(conn), index)
        except (OSError, PeerProtocolError, ConnectionError) as e:
            with self.lock:
                self.errors.append(repr(e))
        finally:
            with self.lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def hold(self, conn, reader):
        """Keeps `conn` open and silent until the peer closes it or stop()."""
        while not self._stopped.is_set():
            if reader.wait_data(0.1):
                reader.buf.clear()
            elif reader.eof:
                return

    def stop(self, timeout=5.0):
        if self._stopped.is_set():
            return
        self._stopped.set()
        try:
            self.sock.close()
        except OSError:
            pass
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
