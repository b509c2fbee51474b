"""The access log (`access_log:`): one JSON line per request in zstd segments.

Segments are read back with `zstd -dc` and parsed with Python's json. Covered: under load
(2000 requests from 8 keep-alive clients, direct responses and proxied ones) the records
equal the requests after SIGTERM; SIGTERM writes what was still buffered; a full disk (a
256 KiB tmpfs) never fails or slows a request, the drop is counted and logged, and writing
resumes once there is room; credentials sent by the client (Authorization, Cookie, X-Api-Key,
Proxy-Authorization, configured redactions, the query string) never reach a segment; segment
names sort by time and no temporary file is visible after stop.
"""

import http.client
import json
import os
import random
import re
import shutil
import socket
import ssl
import string
import subprocess
import threading
import time

import pytest

from helpers import poll, simple_config

# sluice-<UTC open time>Z-<pid>-<instance id>-<seq>.jsonl.zst
SEGMENT_NAME = re.compile(
    r"^sluice-(\d{8}T\d{6}\.\d{3})Z-(\d+)-([0-9a-f]{16})-(\d+)\.jsonl\.zst$")
SUMMARY = re.compile(r"access log: (\d+) records written in (\d+) segments, (\d+) dropped "
                     r"\(buffer full\), (\d+) dropped \(write errors\)")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

DIRECT_ROUTE = ("  - name: hello\n"
                "    match: {path_prefix: /}\n"
                "    direct_response: {status: 200, body: \"ok\", content_type: text/plain}\n")


def alog_config(logdir, access_extra="", routes=DIRECT_ROUTE, upstreams="", workers=2):
    lines = ["access_log:", "  directory: %s" % logdir]
    lines += ["  " + ln for ln in access_extra.strip("\n").splitlines() if ln.strip()]
    if not any(ln.strip().startswith("segment:") for ln in lines):
        lines.append("  segment: {max_age: 1s}")
    return simple_config(routes, upstreams, workers=workers, global_extra="\n".join(lines))


def segment_names(logdir):
    """Final segment names, sorted; temporary (hidden) names are returned separately."""
    names = os.listdir(logdir)
    final = sorted(n for n in names if not n.startswith("."))
    hidden = sorted(n for n in names if n.startswith("."))
    return final, hidden


def read_segment(path):
    """The decoded text of one segment; fails on a corrupt or incomplete frame."""
    r = subprocess.run(["zstd", "-dc", path], capture_output=True, timeout=30)
    assert r.returncode == 0, "zstd -dc %s: %s" % (path, r.stderr.decode(errors="replace"))
    return r.stdout.decode("utf-8")


def read_records(logdir):
    """(records of every segment in name order, raw text, names). Asserts the names have the
    final form and no temporary file is left."""
    final, hidden = segment_names(logdir)
    assert hidden == [], "temporary files left after stop: %s" % hidden
    records, raw = [], []
    for n in final:
        assert SEGMENT_NAME.match(n), "unexpected file in the log directory: %s" % n
        text = read_segment(os.path.join(logdir, n))
        raw.append(text)
        for line in text.splitlines():
            records.append(json.loads(line))
    return records, "".join(raw), final


def summary(gw):
    m = SUMMARY.search(gw.stderr_text())
    assert m, "no access-log summary line at stop" + gw.diag()
    written, segments, full, io = (int(x) for x in m.groups())
    return {"written": written, "segments": segments, "dropped_full": full, "dropped_io": io}


def run_clients(port, requests, clients):
    """Sends `requests` (a list of (target, headers)) over `clients` keep-alive connections in
    parallel; returns the list of statuses (None for a failed request)."""
    statuses = [None] * len(requests)
    errors = []

    def work(k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for i in range(k, len(requests), clients):
                target, headers = requests[i]
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
                resp.read()
                statuses[i] = resp.status
        except Exception as e:  # reported below with the count of missing statuses
            errors.append(repr(e))
        finally:
            conn.close()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    return statuses


def stop_ok(gw):
    t0 = time.monotonic()
    code = gw.stop()
    assert code == 0, "exit code %r%s" % (code, gw.diag())
    return time.monotonic() - t0


# ------------------------------------------------------------------------------------------


def test_records_equal_requests_under_load(gateway, backend, tmp_path):
    logdir = str(tmp_path / "logs")
    be = backend()
    routes = ("  - name: api\n"
              "    match: {path_prefix: /api/}\n"
              "    upstream: app\n") + DIRECT_ROUTE
    upstreams = "  - name: app\n    endpoints:\n      - {address: %s}\n" % be.addr
    gw = gateway(alog_config(logdir, "headers: [User-Agent, X-Trace]", routes=routes,
                             upstreams=upstreams))
    n = 2000
    reqs = []
    for i in range(n):
        target = ("/api/item/%d" % i) if i % 4 == 0 else ("/page/%d?page=%d" % (i, i))
        reqs.append((target, {"X-Trace": "t-%d" % i, "User-Agent": "load/1"}))
    statuses = run_clients(gw.port, reqs, clients=8)
    assert statuses == [200] * n
    stop_ok(gw)

    records, raw, names = read_records(logdir)
    assert len(records) == n
    assert summary(gw) == {"written": n, "segments": len(names), "dropped_full": 0,
                           "dropped_io": 0}
    assert len({r["request_id"] for r in records}) == n
    by_trace = {r["headers"]["x-trace"]: r for r in records}
    assert len(by_trace) == n
    for i in (0, 1, 4, 1001, n - 1):
        r = by_trace["t-%d" % i]
        assert TIME.match(r["time"])
        assert r["client"] == "127.0.0.1" and r["method"] == "GET"
        assert r["status"] == 200 and r["bytes_in"] > 0 and r["bytes_out"] > 0
        assert r["tls"] is False and r["error"] is None and r["retries"] == 0
        assert r["headers"] == {"user-agent": "load/1", "x-trace": "t-%d" % i}
        assert isinstance(r["total_ms"], (int, float)) and r["total_ms"] >= 0
        assert isinstance(r["cpu_us"], (int, float)) and r["cpu_us"] > 0
        if i % 4 == 0:
            assert r["path"] == "/api/item/%d" % i
            assert r["route"] == "api" and r["upstream"] == "app" and r["endpoint"] == be.addr
            assert isinstance(r["upstream_ms"], (int, float))
            assert r["upstream_ms"] <= r["total_ms"]
        else:
            assert r["path"] == "/page/%d" % i  # never the query string
            assert r["route"] == "hello" and r["upstream"] is None
            assert r["upstream_ms"] is None
    assert "page=" not in raw


def test_sigterm_writes_what_is_buffered(gateway, tmp_path):
    logdir = str(tmp_path / "logs")
    # nothing is written on its own for 10 s: the records stay in the workers' buffers
    gw = gateway(alog_config(logdir, "flush_interval: 10s\nsegment: {max_age: 1h}"))
    statuses = run_clients(gw.port, [("/x/%d" % i, {}) for i in range(50)], clients=2)
    assert statuses == [200] * 50
    assert segment_names(logdir) == ([], [])
    took = stop_ok(gw)
    assert took < 5
    records, _, names = read_records(logdir)
    assert len(names) == 1
    assert sorted(r["path"] for r in records) == sorted("/x/%d" % i for i in range(50))
    assert summary(gw)["written"] == 50


def test_credentials_never_logged(gateway, tmp_path):
    logdir = str(tmp_path / "logs")
    # asks for the credential headers too: they are redacted whatever the config says
    gw = gateway(alog_config(
        logdir, "headers: [Authorization, Cookie, X-Api-Key, Proxy-Authorization, X-Internal, "
                "X-Trace]\nredact_headers: [X-Internal]"))
    secret = {
        "Authorization": "Bearer s3cr3t-authz",
        "Cookie": "session=s3cr3t-cookie",
        "X-Api-Key": "s3cr3t-apikey",
        "Proxy-Authorization": "Basic s3cr3t-proxy",
        "X-Internal": "s3cr3t-internal",
        "X-Trace": "visible-trace",
    }
    statuses = run_clients(gw.port, [("/login?token=s3cr3t-query&x=1", secret)] * 20, clients=2)
    assert statuses == [200] * 20
    stop_ok(gw)
    records, raw, _ = read_records(logdir)
    assert len(records) == 20
    assert "s3cr3t" not in raw
    assert "token" not in raw
    for r in records:
        assert r["headers"] == {"x-trace": "visible-trace"}
        assert r["path"] == "/login"
    for name in ("Authorization", "Cookie", "X-Api-Key", "Proxy-Authorization", "X-Internal"):
        assert "%s is redacted" % name in gw.stderr_text()


def test_segment_names_sort_by_time(gateway, tmp_path):
    logdir = str(tmp_path / "logs")
    gw = gateway(alog_config(logdir, "flush_interval: 20ms\nsegment: {max_age: 100ms}"))
    for burst in range(3):
        statuses = run_clients(gw.port, [("/b%d/%d" % (burst, i), {}) for i in range(20)],
                               clients=2)
        assert statuses == [200] * 20
        # each burst goes to a segment of its own, closed by age while the gateway runs
        assert poll(lambda: len(segment_names(logdir)[0]) == burst + 1, 10), \
            segment_names(logdir)
    stop_ok(gw)
    records, _, names = read_records(logdir)
    assert len(names) == 3 and len(records) == 60
    stamps = [SEGMENT_NAME.match(n).group(1) for n in names]
    assert stamps == sorted(stamps)
    assert len({SEGMENT_NAME.match(n).group(2) for n in names}) == 1  # one pid
    assert len({SEGMENT_NAME.match(n).group(3) for n in names}) == 1  # one run
    per_seg = [[json.loads(ln) for ln in read_segment(os.path.join(logdir, n)).splitlines()]
               for n in names]
    for k, seg in enumerate(per_seg):
        assert {r["path"].split("/")[1] for r in seg} == {"b%d" % k}
        if k:
            assert max(r["time"] for r in per_seg[k - 1]) <= min(r["time"] for r in seg)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs mounted for the test (skipped where mounting is not permitted)."""
    d = str(tmp_path / "small")
    os.mkdir(d)
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) to make a small file system")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", d],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a 256 KiB tmpfs to fill (needs root or CAP_SYS_ADMIN): %s"
                    % r.stderr.strip())
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], capture_output=True)


def dir_bytes(d):
    total = 0
    for n in os.listdir(d):
        try:
            total += os.stat(os.path.join(d, n)).st_size
        except FileNotFoundError:
            pass
    return total


def test_full_disk_never_fails_a_request(gateway, small_disk):
    logdir = small_disk
    gw = gateway(alog_config(logdir, "flush_interval: 20ms"))
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits

    def wave(count=40):
        # about 1 KiB of incompressible log per request: 256 KiB is full after ~250
        reqs = [("/" + "".join(rng.choices(alphabet, k=1500)), {}) for _ in range(count)]
        assert run_clients(gw.port, reqs, clients=4) == [200] * count
        return count

    def full():
        return "No space left on device" in gw.stderr_text()

    # fill the disk a wave at a time, each wave written before the next is sent
    sent = 0
    for _ in range(30):
        before = dir_bytes(logdir)
        sent += wave()
        assert poll(lambda: full() or dir_bytes(logdir) > before, 10), gw.diag()
        if full():
            break
    assert full(), "256 KiB never filled" + gw.diag()
    # the segment that hit the wall was closed with the batches it already held
    kept = segment_names(logdir)[0]
    assert len(kept) == 1
    kept_records = len(read_segment(os.path.join(logdir, kept[0])).splitlines())
    assert 0 < kept_records < sent

    # full: requests keep succeeding, the process keeps serving, one error line
    for _ in range(5):
        sent += wave()
        time.sleep(0.03)  # let a flush run into the full disk between waves
    assert gw.alive()
    assert gw.stderr_text().count("No space left on device") == 1

    # make room (what a shipper or an operator does): writing resumes in a new segment
    removed_records = 0
    for n in segment_names(logdir)[0]:
        removed_records += len(read_segment(os.path.join(logdir, n)).splitlines())
        os.unlink(os.path.join(logdir, n))
    statuses = run_clients(gw.port, [("/after/%d" % i, {}) for i in range(20)], clients=2)
    sent += 20
    assert statuses == [200] * 20
    assert poll(lambda: "segments are written again" in gw.stderr_text(), 10), gw.diag()
    stop_ok(gw)

    s = summary(gw)
    assert s["dropped_io"] > 0
    assert s["dropped_full"] == 0
    assert s["written"] + s["dropped_io"] == sent
    records, _, _ = read_records(logdir)  # every remaining segment decodes completely
    assert len(records) + removed_records == s["written"]
    assert {"/after/%d" % i for i in range(20)} <= {r["path"] for r in records}


def _openssl(cwd, *args):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, capture_output=True, timeout=30)


def make_pki(d):
    """A CA, a server certificate for 127.0.0.1 and a client certificate (CN=alog-client)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=alog test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign")
    for serial, name, use, san in ((11, "server", "serverAuth", "subjectAltName=IP:127.0.0.1\n"),
                                   (12, "client", "clientAuth", "")):
        with open(os.path.join(d, name + ".ext"), "w") as f:
            f.write(san + "basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=%s\n" % use)
        _openssl(d, "req", *ec, "-keyout", name + ".key", "-out", name + ".csr", "-subj",
                 "/CN=alog-" + name)
        _openssl(d, "x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-set_serial", str(serial), "-days", "2", "-extfile",
                 name + ".ext", "-out", name + ".pem")
    return {n: os.path.join(d, n) for n in ("ca.pem", "server.pem", "server.key", "client.pem",
                                            "client.key")}


def tls_get(port, ctx):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(b"GET /secure HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    return int(data.split(b" ", 2)[1])


def test_tls_and_client_subject(gateway, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make certificates")
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    pki = make_pki(str(pki_dir))
    logdir = str(tmp_path / "logs")
    tls = json.dumps({"certificates": [{"cert": pki["server.pem"], "key": pki["server.key"]}],
                      "client_ca": pki["ca.pem"], "client_auth": "optional"})
    text = alog_config(logdir).replace(
        "    address: 127.0.0.1:$PORT_public\n",
        "    address: 127.0.0.1:$PORT_public\n    tls: %s\n" % tls)
    gw = gateway(text)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki["ca.pem"])
    plain_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain_ctx.load_verify_locations(pki["ca.pem"])
    ctx.load_cert_chain(pki["client.pem"], pki["client.key"])
    assert tls_get(gw.port, ctx) == 200
    assert tls_get(gw.port, plain_ctx) == 200
    stop_ok(gw)
    records, _, _ = read_records(logdir)
    assert len(records) == 2
    with_cert = [r for r in records if "client_subject" in r]
    assert len(with_cert) == 1
    assert with_cert[0]["client_subject"] == "CN=alog-client"
    assert all(r["tls"] is True and r["path"] == "/secure" for r in records)
