"""Every promise of the user documentation (README.md, docs/configuration.md,
docs/operations.md, examples/quickstart.yaml) checked against the binary, read as a new user
would: the quickstart as written, each configuration key and its default, the `sluice -t`
error format, exit codes and signals, the gateway error table and route precedence.

Each test names the documented sentence it pins. Everything runs on 127.0.0.1."""

import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from client import RawClient, assert_gateway_error, build_request
from helpers import (REPO, SLUICE_BIN, can_connect, poll, proxy_config, require_binary,
                     run_cli, simple_config, sluice_env, stalled_listener)
from peers import dead_port, free_port

HEX_ID = re.compile(r"^[0-9a-f]{32}$")


# ------------------------------------------------------------------------------------------
# helpers


def check(tmp_path, text, name="sluice.yaml"):
    """Runs `sluice -t -c FILE` on `text`; returns (returncode, stdout, stderr lines)."""
    p = tmp_path / name
    p.write_text(text)
    r = run_cli(["-t", "-c", str(p)])
    return r.returncode, r.stdout, [ln for ln in r.stderr.splitlines() if ln.strip()]


def error_lines(lines):
    """Only the `file:line:col: key.path: message` lines (not the summary line)."""
    return [ln for ln in lines if re.match(r"^[^:]+:\d+:\d+: ", ln)]


LISTENER = "listeners:\n  - name: public\n    address: 127.0.0.1:%d\n"
UPSTREAM = "upstreams:\n  - name: u\n    endpoints: [127.0.0.1:9]\n"


def listener_text():
    return LISTENER % free_port()


def assert_rejected(tmp_path, text, *expected):
    """`sluice -t` exits 1 and prints exactly the expected `line:col: path: message` tails,
    in order, each prefixed with the file name."""
    rc, _, lines = check(tmp_path, text)
    errs = error_lines(lines)
    assert rc == 1, lines
    assert [e.split(":", 1)[1] for e in errs] == list(expected), lines
    assert all(e.startswith(str(tmp_path / "sluice.yaml") + ":") for e in errs), errs


def assert_accepted(tmp_path, text):
    rc, out, lines = check(tmp_path, text)
    assert rc == 0, lines
    assert "configuration OK" in out + "\n".join(lines)


def backend_doc(gw, target="/", headers=(), method="GET", host="test.local", listener=None):
    r = gw.request(method, target, list(headers), host=host, listener=listener)
    assert r.status == 200, r
    return r.json()


def hvals(doc, name):
    return [v for k, v in doc["headers"] if k.lower() == name.lower()]


# ------------------------------------------------------------------------------------------
# README quickstart, run as written (only the two fixed ports are swapped for free ones).


@pytest.fixture
def quickstart(gateway, tmp_path):
    with open(os.path.join(REPO, "examples", "quickstart.yaml")) as f:
        text = f.read()
    assert "127.0.0.1:8080" in text and "127.0.0.1:8081" in text
    assert "127.0.0.1:9901" in text and "/tmp/sluice-quickstart-logs" in text
    text = text.replace("$", "$$")
    text = text.replace("127.0.0.1:8080", "127.0.0.1:$PORT_public")
    text = text.replace("127.0.0.1:8081", "127.0.0.1:$PORT_demo")
    text = text.replace("127.0.0.1:9901", "127.0.0.1:$PORT_admin")
    text = text.replace("/tmp/sluice-quickstart-logs", str(tmp_path / "logs"))
    g = gateway(text)
    g.log_dir = str(tmp_path / "logs")
    return g


def test_quickstart_status_page_metrics_and_access_log(quickstart):
    # quickstart.yaml: the status page and metrics on 127.0.0.1:9901, the access log in
    # /tmp/sluice-quickstart-logs, read with zstdcat | jq.
    import http.client
    import glob
    assert quickstart.request("GET", "/healthz").status == 200
    c = http.client.HTTPConnection("127.0.0.1", quickstart.ports["admin"], timeout=5)
    c.request("GET", "/")
    r = c.getresponse()
    page = r.read()
    assert r.status == 200 and b"<html" in page.lower()
    c.request("GET", "/metrics")
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    assert r.status == 200 and 'sluice_requests_total{route="healthz",code="2xx"} 1' in text, \
        text[:2000]
    assert quickstart.stop() == 0
    segs = glob.glob(os.path.join(quickstart.log_dir, "*.jsonl.zst"))
    assert segs, os.listdir(quickstart.log_dir)
    out = subprocess.run(["zstdcat"] + sorted(segs), capture_output=True, timeout=10).stdout
    assert b'"path":"/healthz"' in out, out[:500]


def test_quickstart_file_is_valid(tmp_path):
    r = run_cli(["-t", "-c", os.path.join(REPO, "examples", "quickstart.yaml")])
    assert r.returncode == 0, r.stderr
    assert "configuration OK" in r.stdout + r.stderr


def test_quickstart_healthz_answered_by_gateway(quickstart):
    # README: `curl -i http://127.0.0.1:8080/healthz  # 200 "ok", answered by the gateway`
    r = quickstart.request("GET", "/healthz")
    assert r.status == 200 and r.body == b"ok\n", r
    assert r.header("content-type") == "text/plain"
    assert HEX_ID.match(r.header("x-request-id", "")), r


def test_quickstart_api_hello_proxied_as_hello(quickstart):
    # README: `/api/hello  # proxied to the demo upstream as /hello`
    r = quickstart.request("GET", "/api/hello")
    assert r.status == 200, r
    assert r.json() == {"hello": "world"}
    assert r.header("x-served-by") == "sluice-quickstart"  # response_headers.set
    # The demo listener only answers /hello with this body; /api/hello there is the index.
    direct = quickstart.request("GET", "/api/hello", listener="demo")
    assert "service" in direct.json()
    # The gateway's request id travels upstream and back unchanged.
    assert HEX_ID.match(r.header("x-request-id", ""))


def test_quickstart_nothing_is_404_json_with_request_id(quickstart):
    # README: `/nothing  # 404 JSON with the request id`
    r = quickstart.request("GET", "/nothing")
    doc = assert_gateway_error(r, 404)
    assert doc == {"status": 404, "error": "no_route", "request_id": r.header("x-request-id")}


def test_quickstart_demo_backend_directly(quickstart):
    # README: `curl -i http://127.0.0.1:8081/  # the demo "backend" directly`
    r = quickstart.request("GET", "/", listener="demo")
    assert r.status == 200
    assert r.json()["service"] == "sluice demo backend"
    r = quickstart.request("GET", "/teapot", listener="demo")
    assert r.status == 418 and r.body == b"I'm a teapot\n"


def test_quickstart_private_needs_the_demo_api_key(quickstart):
    # README: `/private/hello  # 401: needs an API key`, then 200 with the demo key.
    r = quickstart.request("GET", "/private/hello")
    doc = assert_gateway_error(r, 401)
    assert doc["error"] == "missing_api_key"
    r = quickstart.request("GET", "/private/hello",
                           headers=[("X-API-Key", "demo-key-change-me")])
    assert r.status == 200 and r.json() == {"hello": "world"}, r
    assert r.header("ratelimit-limit") == "11"  # quickstart: burst 10 per consumer


def test_quickstart_api_is_rate_limited_per_ip(quickstart):
    # quickstart.yaml: 20/s per client IP, burst 10 on /api/. 100 pipelined requests arrive
    # within well under a second even under sanitizers, so most must be refused.
    n = 100
    with quickstart.connect(timeout=10) as c:
        c.send(b"".join(build_request("GET", "/api/hello") for _ in range(n)))
        statuses = [c.read_response().status for _ in range(n)]
    assert statuses.count(200) >= 11 and statuses.count(429) >= n // 2, statuses


def test_quickstart_ctrl_c_drains_and_exits_0(quickstart):
    # README: "Stop it with Ctrl-C (drains in-flight requests, then exits 0)."
    assert quickstart.request("GET", "/healthz").status == 200
    quickstart.signal(signal.SIGINT)
    assert quickstart.wait_exit(10) == 0
    assert "stopped" in quickstart.stderr_text()


# ------------------------------------------------------------------------------------------
# operations.md: flags and exit codes


def test_version_help_and_bad_command_line_exit_codes():
    # operations.md exit codes: 0 for --version/--help, 2 for a bad command line.
    for flag in ("--version", "-v"):
        r = run_cli([flag])
        assert r.returncode == 0 and "sluice" in r.stdout, r
    for flag in ("--help", "-h"):
        r = run_cli([flag])
        assert r.returncode == 0, r
        assert "-c" in r.stdout and "-t" in r.stdout, r
    assert run_cli(["--no-such-flag"]).returncode == 2
    assert run_cli(["-c"]).returncode == 2  # -c without its FILE


def test_long_flags_config_and_test(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text(listener_text())
    r = run_cli(["--test", "--config", str(p)])
    assert r.returncode == 0, r.stderr
    assert "configuration OK" in r.stdout + r.stderr


def test_default_config_file_is_sluice_yaml(tmp_path):
    # operations.md: `-c FILE` ... (default `sluice.yaml`)
    (tmp_path / "sluice.yaml").write_text(listener_text())
    require_binary()
    r = subprocess.run([SLUICE_BIN, "-t"], cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=10, env=sluice_env())
    assert r.returncode == 0, r.stderr


def test_address_in_use_exits_1(tmp_path):
    # operations.md: exit 1 on start-up failure (an address in use).
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        p = tmp_path / "inuse.yaml"
        p.write_text(LISTENER % s.getsockname()[1])
        r = run_cli(["-c", str(p)], timeout=10)
        assert r.returncode == 1, r
        assert "in use" in r.stderr.lower(), r.stderr
    finally:
        s.close()


# ------------------------------------------------------------------------------------------
# operations.md: signals and logs


def test_sighup_is_logged_and_ignored(gateway):
    g = gateway(simple_config("  - {match: {path: /x}, direct_response: {body: x}}"))
    g.signal(signal.SIGHUP)
    assert poll(lambda: "SIGHUP" in g.stderr_text() or "hup" in g.stderr_text().lower(), 5), \
        g.diag()
    assert g.alive()
    assert g.request("GET", "/x").body == b"x"


def test_second_sigterm_stops_at_once(gateway, backend):
    b = backend("hang")
    g = gateway(proxy_config(drain_timeout="30s", upstream_extra="    timeouts: {response: 60s}"),
                B1=b.addr)
    c = g.connect(timeout=10)
    try:
        c.send(build_request("GET", "/hang"))
        assert b.wait_requests(1)
        g.signal(signal.SIGTERM)
        assert g.wait_exit(0.5) is None  # draining: waits for the hung request
        t0 = time.monotonic()
        g.signal(signal.SIGTERM)
        code = g.wait_exit(5)
        assert code is not None and time.monotonic() - t0 < 5
    finally:
        c.close()


def test_drain_in_flight_request_gets_connection_close(gateway, backend):
    # operations.md: "answer in-flight requests with `Connection: close`".
    b = backend("slow", delay="1")
    g = gateway(proxy_config(drain_timeout="5s"), B1=b.addr)
    with g.connect(timeout=10) as c:
        c.send(build_request("GET", "/slow"))
        assert b.wait_requests(1)
        g.signal(signal.SIGTERM)
        r = c.read_response(timeout=10)
        assert r.status == 200
        assert (r.header("connection") or "").lower() == "close", r
        assert c.closed(timeout=3)
    assert g.wait_exit(10) == 0


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (error|warn|info|debug) ")


def test_log_format_and_default_info(gateway):
    g = gateway(simple_config("  - {direct_response: {body: x}}").replace(
        "log_level: info\n", ""))
    assert poll(lambda: " started " in g.stderr_text(), 5), g.diag()
    lines = [ln for ln in g.stderr_text().splitlines() if ln]
    assert lines and all(LOG_LINE.match(ln) for ln in lines), lines
    assert any(" info " in ln for ln in lines), lines


def test_worker_log_lines_carry_worker_tag(gateway, backend):
    # operations.md: `2026-11-28T08:10:11.260Z info [w0] message`; gateway errors are logged
    # with the route at info (a worker event).
    g = gateway(proxy_config(endpoints="      - {address: 127.0.0.1:%d}" % dead_port()))
    assert g.request("GET", "/x").status == 503
    assert poll(lambda: re.search(r"Z (warn|info|error) \[w\d+\] .*\ball\b", g.stderr_text()),
                5), g.diag()


def test_log_level_error_hides_info(gateway):
    g = gateway(simple_config("  - {direct_response: {body: x}}").replace(
        "log_level: info", "log_level: error"))
    assert g.request("GET", "/").body == b"x"
    g.stop()
    assert " info " not in g.stderr_text(), g.stderr_text()


def test_log_level_debug_includes_info(gateway):
    g = gateway(simple_config("  - {direct_response: {body: x}}").replace(
        "log_level: info", "log_level: debug"))
    assert g.request("GET", "/").body == b"x"
    g.stop()
    assert " info " in g.stderr_text(), g.stderr_text()


def test_workers_count_is_logged(gateway):
    g = gateway(simple_config("  - {direct_response: {body: x}}", workers=3))
    assert poll(lambda: "3 workers running" in g.stderr_text(), 5), g.diag()
    # workers: auto = one per online CPU.
    g2 = gateway(simple_config("  - {direct_response: {body: x}}", workers="auto"))
    n = os.sysconf("SC_NPROCESSORS_ONLN")
    assert poll(lambda: "%d workers running" % n in g2.stderr_text(), 5), g2.diag()


# ------------------------------------------------------------------------------------------
# configuration.md: loading and errors (every example line, in the documented format)


def test_doc_example_unknown_key_with_suggestion(tmp_path):
    text = listener_text() + "  - name: b\n    address: 127.0.0.1:%d\n    limts: {}\n" % \
        free_port()
    assert_rejected(tmp_path, text,
                    '6:5: listeners[1].limts: unknown key "limts" (did you mean "limits"?)')


def test_doc_example_unknown_upstream(tmp_path):
    text = listener_text() + UPSTREAM + "routes:\n  - upstream: user\n"
    assert_rejected(tmp_path, text, '8:15: routes[0].upstream: unknown upstream "user"')


def test_doc_example_duration_without_unit(tmp_path):
    assert_rejected(tmp_path, "drain_timeout: 10\n" + listener_text(),
                    '1:16: drain_timeout: invalid duration "10": add a unit (ms, s, m or h), '
                    "e.g. 10s")


def test_doc_example_status_out_of_range(tmp_path):
    text = listener_text() + "routes:\n  - direct_response: {status: 700}\n"
    assert_rejected(tmp_path, text,
                    "5:31: routes[0].direct_response.status: 700 is out of range 200..599")


def test_doc_example_duplicate_listener_address(tmp_path):
    port = free_port()
    text = (LISTENER % port) + "  - name: b\n    address: 127.0.0.1:%d\n" % port
    assert_rejected(tmp_path, text,
                    '5:14: listeners[1].address: duplicate listener address "127.0.0.1:%d" '
                    '(already used by listener "public")' % port)


def test_wildcard_and_specific_address_on_same_port_conflict(tmp_path):
    port = free_port()
    text = ("listeners:\n  - name: public\n    address: 0.0.0.0:%d\n"
            "  - name: b\n    address: 127.0.0.1:%d\n" % (port, port))
    rc, _, lines = check(tmp_path, text)
    errs = error_lines(lines)
    assert rc == 1 and len(errs) == 1, lines
    assert ":5:14: listeners[1].address: " in errs[0] and '"public"' in errs[0], errs


def test_doc_example_yaml_syntax_error(tmp_path):
    text = listener_text() + "    limits: {max_body_bytes: 1 x: 3\n"
    assert_rejected(tmp_path, text,
                    "4:33: listeners[0].limits: YAML syntax error: did not find expected ',' "
                    "or '}' (while parsing a flow mapping at 4:13)")


def test_missing_listeners_is_root_error(tmp_path):
    assert_rejected(tmp_path, "workers: 1\n", '1:1: (root): missing required key "listeners"')


def test_every_error_is_reported_and_summarised(tmp_path):
    text = ("workers: 0\ndrain_timeout: 5\nlog_level: loud\n" + listener_text())
    rc, _, lines = check(tmp_path, text)
    assert rc == 1
    assert [e.split(":", 3)[3].split(":")[0].strip() for e in error_lines(lines)] == \
        ["workers", "drain_timeout", "log_level"], lines


def test_duplicate_key_anchor_and_second_document_are_errors(tmp_path):
    assert_rejected(tmp_path, listener_text() + "workers: 1\nworkers: 2\n",
                    '5:1: workers: duplicate key "workers" (first at 4:1)')
    rc, _, lines = check(tmp_path, listener_text() + "upstreams:\n  - name: a\n"
                         "    endpoints: &e [127.0.0.1:9]\n  - name: b\n    endpoints: *e\n")
    assert rc == 1 and any("anchors and aliases are not supported" in ln for ln in lines), lines
    assert_rejected(tmp_path, listener_text() + "---\nworkers: 1\n",
                    "4:1: (root): only one YAML document is allowed")


def test_null_is_rejected_and_scalars_typed_by_key(tmp_path):
    for null in ("", " ~", " null"):
        rc, _, lines = check(tmp_path, listener_text() + "workers:%s\n" % null)
        assert rc == 1 and any("got null" in ln for ln in lines), (null, lines)
    # `X-Version: 2` and `X-Version: "2"` are the same string.
    assert_accepted(tmp_path, listener_text() + UPSTREAM +
                    "routes:\n  - {upstream: u, match: {headers: {X-Version: 2}}}\n")


def test_nesting_deeper_than_64_levels_is_rejected(tmp_path):
    deep = "[" * 70 + "]" * 70
    rc, _, lines = check(tmp_path, listener_text() + "workers: %s\n" % deep)
    assert rc == 1, lines


@pytest.mark.parametrize("value,ok", [
    ("250ms", True), ("10s", True), ("1m", True), ("1h", True), ("0s", True),
    ("30", False), ("1.5s", False), ('"10 s"', False), ("1m30s", False), ("3d", False),
    ("2h", False),  # drain_timeout bounds 0s..1h
])
def test_duration_units(tmp_path, value, ok):
    text = "drain_timeout: %s\n" % value + listener_text()
    if ok:
        assert_accepted(tmp_path, text)
    else:
        rc, _, lines = check(tmp_path, text)
        assert rc == 1 and len(error_lines(lines)) == 1, lines
        assert "drain_timeout:" in lines[0]


@pytest.mark.parametrize("value,ok", [
    ("1024", True), ("1KiB", True), ("16KiB", True), ("4KB", True), ("16MiB", True),
    ("2048B", True), ("16kib", False), ("1023", False), ("17MiB", False), ("1.5KiB", False),
])
def test_size_units(tmp_path, value, ok):
    text = "limits: {max_header_bytes: %s}\n" % value + listener_text()
    if ok:
        assert_accepted(tmp_path, text)
    else:
        rc, _, lines = check(tmp_path, text)
        assert rc == 1 and "limits.max_header_bytes:" in lines[0], lines


def test_size_unit_bases(tmp_path):
    # 1KiB = 1024 (accepted at the 1KiB lower bound), 1KB = 1000 (below it).
    assert_accepted(tmp_path, "limits: {max_header_bytes: 1KiB}\n" + listener_text())
    assert_rejected(tmp_path, "limits: {max_header_bytes: 1KB}\n" + listener_text(),
                    "1:28: limits.max_header_bytes: 1KB is out of range 1KiB..16MiB")
    assert_accepted(tmp_path, "limits: {max_body_bytes: 1TB}\n" + listener_text())
    assert_accepted(tmp_path, "limits: {max_body_bytes: 1TiB}\n" + listener_text())


def test_addresses(tmp_path):
    assert_rejected(tmp_path, 'listeners:\n  - {name: public, address: "::1:8080"}\n',
                    '2:29: listeners[0].address: invalid address "::1:8080": IPv6 addresses '
                    "need brackets, e.g. [::1]:8080")
    rc, _, lines = check(tmp_path, 'listeners:\n  - {name: public, address: "127.0.0.1:0"}\n')
    assert rc == 1 and "port must be a number in 1..65535" in lines[0], lines
    # A host name is resolved at load; a failed lookup is a load error.
    rc, _, lines = check(tmp_path, listener_text() +
                         "upstreams:\n  - name: u\n    endpoints: [no-such-host.invalid:80]\n")
    assert rc == 1 and "upstreams[0].endpoints[0]" in lines[0], lines
    assert_accepted(tmp_path, listener_text() +
                    "upstreams:\n  - name: u\n    endpoints: [localhost:80, \"[::1]:80\"]\n")


def test_names(tmp_path):
    assert_accepted(tmp_path, 'listeners:\n  - {name: "A-b_c.9", address: "127.0.0.1:%d"}\n'
                    % free_port())
    for bad in ('"pub lic"', "a" * 65, '"a/b"'):
        rc, _, lines = check(tmp_path,
                             'listeners:\n  - {name: %s, address: "127.0.0.1:1"}\n' % bad)
        assert rc == 1 and "listeners[0].name: invalid name" in lines[0], lines
    assert_accepted(tmp_path, 'listeners:\n  - {name: %s, address: "127.0.0.1:%d"}\n'
                    % ("a" * 64, free_port()))


# ------------------------------------------------------------------------------------------
# configuration.md: top level and listener bounds


@pytest.mark.parametrize("key,value,ok", [
    ("workers", "auto", True), ("workers", "1", True), ("workers", "256", True),
    ("workers", "0", False), ("workers", "257", False), ("workers", "AUTO", False),
    ("drain_timeout", "1h", True), ("drain_timeout", "61m", False),
    ("log_level", "error", True), ("log_level", "warn", True), ("log_level", "debug", True),
    ("log_level", "INFO", False), ("log_level", "trace", False),
])
def test_top_level_bounds(tmp_path, key, value, ok):
    text = "%s: %s\n" % (key, value) + listener_text()
    if ok:
        assert_accepted(tmp_path, text)
    else:
        rc, _, lines = check(tmp_path, text)
        assert rc == 1 and (": %s: " % key) in lines[0], lines


@pytest.mark.parametrize("key,lo,hi,below,above", [
    ("max_header_bytes", "1KiB", "16MiB", "1023", "16777217"),
    ("max_header_count", "1", "10000", "0", "10001"),
    ("max_uri_bytes", "256", "16MiB", "255", "16777217"),
    ("header_timeout", "1ms", "1h", "0ms", "61m"),
    ("body_timeout", "1ms", "24h", "0ms", "25h"),
    ("idle_timeout", "1ms", "24h", "0ms", "25h"),
    ("send_timeout", "1ms", "24h", "0ms", "25h"),
    ("max_requests_per_conn", "0", "4294967295", "-1", "4294967296"),
    ("max_body_bytes", "0", "1TiB", "-1", None),
])
def test_limit_bounds(tmp_path, key, lo, hi, below, above):
    for v in (lo, hi):
        assert_accepted(tmp_path, "limits: {%s: %s}\n" % (key, v) + listener_text())
    for v in (below, above):
        if v is None:
            continue
        rc, _, lines = check(tmp_path, "limits: {%s: %s}\n" % (key, v) + listener_text())
        assert rc == 1 and ("limits.%s:" % key) in lines[0], (v, lines)


def test_listener_backlog_bounds(tmp_path):
    for v, ok in (("1", True), ("65535", True), ("0", False), ("65536", False)):
        text = "listeners:\n  - {name: public, address: \"127.0.0.1:%d\", backlog: %s}\n" % (
            free_port(), v)
        if ok:
            assert_accepted(tmp_path, text)
        else:
            rc, _, lines = check(tmp_path, text)
            assert rc == 1 and "listeners[0].backlog:" in lines[0], lines


def test_listener_names_unique(tmp_path):
    text = listener_text() + "  - name: public\n    address: 127.0.0.1:%d\n" % free_port()
    rc, _, lines = check(tmp_path, text)
    assert rc == 1 and "listeners[1].name" in lines[0] and "duplicate" in lines[0], lines


# ------------------------------------------------------------------------------------------
# configuration.md: upstream keys (syntax)


def test_upstream_key_bounds(tmp_path):
    up = ("upstreams:\n  - {name: u, endpoints: [127.0.0.1:9], keepalive: {max_idle: 65536, "
          "idle_timeout: 61m}, timeouts: {connect: 11m, response: 25h, idle: 0ms}, "
          "retries: {attempts: 11}}\n")
    rc, _, lines = check(tmp_path, listener_text() + up)
    paths = [e.split(": ")[1] for e in error_lines(lines)]
    assert rc == 1 and paths == [
        "upstreams[0].keepalive.max_idle", "upstreams[0].keepalive.idle_timeout",
        "upstreams[0].timeouts.connect", "upstreams[0].timeouts.response",
        "upstreams[0].timeouts.idle", "upstreams[0].retries.attempts"], lines
    assert_accepted(tmp_path, listener_text() + (
        "upstreams:\n  - {name: u, endpoints: [127.0.0.1:9], keepalive: {max_idle: 0, "
        "idle_timeout: 1h}, timeouts: {connect: 10m, response: 24h, idle: 24h}, "
        "retries: {attempts: 10}}\n"))


def test_upstream_balance_hash_on_and_endpoints(tmp_path):
    rc, _, lines = check(tmp_path, listener_text() +
                         "upstreams:\n  - {name: u, balance: random, endpoints: [127.0.0.1:9]}\n")
    assert rc == 1 and "upstreams[0].balance" in lines[0], lines
    # hash_on is syntax-checked even when balance is not hash.
    rc, _, lines = check(tmp_path, listener_text() + "upstreams:\n  - {name: u, balance: "
                         "round_robin, hash_on: \"header:X Y\", endpoints: [127.0.0.1:9]}\n")
    assert rc == 1 and "upstreams[0].hash_on" in lines[0], lines
    for ok in ("ip", "header:X-User-Id", "cookie:sid"):
        assert_accepted(tmp_path, listener_text() + "upstreams:\n  - {name: u, balance: "
                        "round_robin, hash_on: \"%s\", endpoints: [127.0.0.1:9]}\n" % ok)
    rc, _, lines = check(tmp_path, listener_text() +
                         "upstreams:\n  - {name: u, endpoints: []}\n")
    assert rc == 1 and "upstreams[0].endpoints" in lines[0], lines
    rc, _, lines = check(tmp_path, listener_text() + "upstreams:\n  - {name: u}\n")
    assert rc == 1 and "needs endpoints or discovery" in lines[0], lines
    rc, _, lines = check(tmp_path, listener_text() + (
        "upstreams:\n  - {name: u, endpoints: [{address: \"127.0.0.1:9\", weight: 0}, "
        "{address: \"127.0.0.1:10\", weight: 1001}, {address: \"127.0.0.1:11\", weight: 1000, "
        "zone: az-b}]}\n"))
    assert rc == 1 and [e.split(": ")[1] for e in error_lines(lines)] == [
        "upstreams[0].endpoints[0].weight", "upstreams[0].endpoints[1].weight"], lines


# ------------------------------------------------------------------------------------------
# configuration.md: route keys (syntax)


def test_route_needs_exactly_one_target(tmp_path):
    text = listener_text() + UPSTREAM + (
        "routes:\n  - {upstream: u, direct_response: {status: 200}}\n  - {match: {path: /x}}\n")
    rc, _, lines = check(tmp_path, text)
    errs = error_lines(lines)
    assert rc == 1 and len(errs) == 2, lines
    assert "routes[0].direct_response" in errs[0] and "routes[1]" in errs[1], errs


def test_route_generated_names_are_unique(tmp_path):
    text = listener_text() + UPSTREAM + "routes:\n  - {upstream: u}\n  - {name: route0, upstream: u}\n"
    rc, _, lines = check(tmp_path, text)
    assert rc == 1 and 'duplicate route name "route0"' in lines[0], lines
    assert_accepted(tmp_path, listener_text() + UPSTREAM +
                    "routes:\n  - {upstream: u}\n  - {name: route0x, upstream: u}\n")


def test_prefix_keys_need_path_prefix(tmp_path):
    text = listener_text() + UPSTREAM + (
        "routes:\n  - {upstream: u, strip_prefix: true, match: {path: /x}}\n"
        "  - {upstream: u, rewrite_prefix: /v2}\n")
    rc, _, lines = check(tmp_path, text)
    assert rc == 1 and [e.split(": ")[1] for e in error_lines(lines)] == [
        "routes[0].strip_prefix", "routes[1].rewrite_prefix"], lines
    assert_accepted(tmp_path, listener_text() + UPSTREAM +
                    "routes:\n  - {upstream: u, strip_prefix: false}\n")


def test_match_value_rules(tmp_path):
    text = listener_text() + UPSTREAM + (
        "routes:\n"
        "  - {upstream: u, match: {methods: [get]}}\n"
        "  - {upstream: u, match: {host: \"a.*.example.com\"}}\n"
        "  - {upstream: u, match: {host: \"api.example.com:8080\"}}\n"
        "  - {upstream: u, match: {path: x}}\n"
        "  - {upstream: u, match: {path: \"/a?b\"}}\n"
        "  - {upstream: u, match: {path_prefix: \"/a#b\"}}\n"
        "  - {upstream: u, match: {path: /a, path_prefix: /b}}\n"
        "  - {upstream: u, match: {headers: {\"X Y\": a}}}\n")
    rc, _, lines = check(tmp_path, text)
    errs = error_lines(lines)
    assert rc == 1 and len(errs) == 8, lines
    assert 'did you mean "GET"?' in errs[0]
    assert "routes[1].match.host" in errs[1] and "routes[2].match.host" in errs[2]
    assert 'must start with "/"' in errs[3]
    assert "routes[6].match.path_prefix: cannot be combined" in errs[6]
    assert_accepted(tmp_path, listener_text() + UPSTREAM + (
        "routes:\n  - {upstream: u, match: {methods: [PURGE, GET], host: \"[::1]\"}}\n"))


def test_header_operation_rules(tmp_path):
    text = listener_text() + UPSTREAM + (
        "routes:\n  - upstream: u\n"
        "    request_headers: {set: {X-A: 1, x-a: 2}, add: {\"Bad Name\": v}, remove: [\"X:Y\"]}\n"
        "    response_headers: {set: {X-B: \"a\\r\\nb\"}}\n")
    rc, _, lines = check(tmp_path, text)
    assert rc == 1 and [e.split(": ")[1] for e in error_lines(lines)] == [
        "routes[0].request_headers.set.x-a", "routes[0].request_headers.add.Bad Name",
        "routes[0].request_headers.remove[0]", "routes[0].response_headers.set.X-B"], lines


def test_direct_response_rules(tmp_path):
    text = listener_text() + (
        "routes:\n  - {direct_response: {status: 99}}\n"
        "  - {direct_response: {content_type: \"a\\nb\"}}\n")
    rc, _, lines = check(tmp_path, text)
    assert rc == 1 and [e.split(": ")[1] for e in error_lines(lines)] == [
        "routes[0].direct_response.status", "routes[1].direct_response.content_type"], lines


def test_route_listener_reference_must_exist(tmp_path):
    text = listener_text() + UPSTREAM + "routes:\n  - {upstream: u, listeners: [nope]}\n"
    assert_rejected(tmp_path, text, '8:31: routes[0].listeners[0]: unknown listener "nope"')


# ------------------------------------------------------------------------------------------
# limits at run time: defaults, merge of top level and listener values


def test_limits_merge_top_level_and_listener(gateway, backend):
    # configuration.md example: top-level {max_body_bytes: 1MiB(here 1KiB), header_timeout},
    # listener `uploads` overrides max_body_bytes only; header_timeout stays.
    b = backend()
    cfg = (
        "workers: 1\ndrain_timeout: 3s\n"
        "limits: {max_body_bytes: 1KiB, header_timeout: 300ms}\n"
        "listeners:\n"
        "  - {name: public, address: \"127.0.0.1:$PORT_public\"}\n"
        "  - {name: uploads, address: \"127.0.0.1:$PORT_uploads\", limits: {max_body_bytes: 4KiB}}\n"
        "upstreams:\n  - {name: app, endpoints: [\"$B1\"]}\n"
        "routes:\n  - {upstream: app}\n")
    g = gateway(cfg, B1=b.addr)
    body = b"x" * 2048
    assert g.request("POST", "/", body=body).status == 413
    assert g.request("POST", "/", body=body, listener="uploads").status == 200
    assert g.request("POST", "/", body=b"x" * 5000, listener="uploads").status == 413
    for listener in ("public", "uploads"):
        with g.connect(listener) as c:
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never completed
            t0 = time.monotonic()
            r = c.read_response(timeout=5)
            assert r.status == 408 and time.monotonic() - t0 < 3, (listener, r)


def test_default_header_count_limit_is_100(gateway, backend):
    b = backend()
    g = gateway(proxy_config(), B1=b.addr)
    # 100 fields in total (Host + 99) pass; 101 do not.
    ok = [("X-H%d" % i, "v") for i in range(99)]
    assert g.request("GET", "/", ok).status == 200
    r = g.request("GET", "/", ok + [("X-Extra", "v")])
    assert r.status == 431 and r.json()["error"] == "too_many_headers", r


def test_default_uri_limit_is_8kib(gateway, backend):
    b = backend()
    g = gateway(proxy_config(), B1=b.addr)
    line = len("GET  HTTP/1.1")
    assert g.request("GET", "/" + "a" * (8192 - 1)).status == 200
    r = g.request("GET", "/" + "a" * 8192)
    assert r.status == 414 and r.json()["error"] == "uri_too_long", r
    del line


def test_default_header_bytes_limit_is_16kib(gateway, backend):
    b = backend()
    g = gateway(proxy_config(), B1=b.addr)
    assert g.request("GET", "/", [("X-Big", "a" * 15000)]).status == 200
    r = g.request("GET", "/", [("X-Big", "a" * 17000)])
    assert r.status == 431 and r.json()["error"] == "headers_too_large", r


def test_default_body_limit_is_10mib(gateway, backend):
    b = backend()
    g = gateway(proxy_config(), B1=b.addr)
    with g.connect() as c:
        c.send(build_request("POST", "/", [("Content-Length", str(10 * 1024 * 1024 + 1))]))
        r = c.read_response()
        assert r.status == 413 and r.json()["error"] == "body_too_large", r
    assert not b.requests  # checked before any byte is read; nothing went upstream


def test_max_body_bytes_zero_is_unlimited(gateway, backend):
    b = backend()
    g = gateway(proxy_config(limits="{max_body_bytes: 0}"), B1=b.addr)
    body = b"y" * (64 * 1024)
    r = g.request("POST", "/", body=body)
    assert r.status == 200 and r.json()["body_len"] == len(body)


def test_max_requests_per_conn(gateway, backend):
    b = backend()
    g = gateway(proxy_config(limits="{max_requests_per_conn: 2}"), B1=b.addr)
    with g.connect() as c:
        assert c.request("GET", "/1").status == 200
        r = c.request("GET", "/2")
        assert r.status == 200
        assert c.closed(timeout=3), "connection still open after max_requests_per_conn"
    # 0 = unlimited (the default): many requests on one connection.
    g2 = gateway(proxy_config(), B1=b.addr)
    with g2.connect() as c:
        for i in range(50):
            assert c.request("GET", "/k%d" % i).status == 200


def test_idle_timeout_closes_silently(gateway, backend):
    b = backend()
    g = gateway(proxy_config(limits="{idle_timeout: 300ms}"), B1=b.addr)
    with g.connect() as c:
        assert c.request("GET", "/").status == 200
        t0 = time.monotonic()
        assert c.closed(timeout=3)
        assert 0.2 < time.monotonic() - t0 < 2.5


def test_body_timeout_is_gap_between_reads(gateway, backend):
    b = backend()
    g = gateway(proxy_config(limits="{body_timeout: 400ms}"), B1=b.addr)
    # Gaps shorter than body_timeout keep the upload going past it in total.
    with g.connect() as c:
        c.send(build_request("POST", "/", [("Content-Length", "5")]))
        for _ in range(5):
            time.sleep(0.15)
            c.send(b"z")
        r = c.read_response()
        assert r.status == 200 and r.json()["body_len"] == 5
    with g.connect() as c:
        c.send(build_request("POST", "/", [("Content-Length", "5")]) + b"z")
        r, err = c.try_read_response(timeout=5)
        assert r is None or r.status == 408, (r, err)


# ------------------------------------------------------------------------------------------
# operations.md: the gateway error table


def test_gateway_error_bodies(gateway, backend):
    b = backend()
    g = gateway(simple_config(
        "  - {match: {path_prefix: /p}, upstream: app}\n",
        upstreams="  - {name: app, endpoints: [\"$B1\"]}\n",
        limits="{max_uri_bytes: 256, max_header_count: 5, max_header_bytes: 1KiB, "
               "max_body_bytes: 10}"), B1=b.addr)

    def err(data):
        with g.connect() as c:
            c.send(data)
            r = c.read_response()
            assert r.header("content-type") == "application/json", r
            doc = r.json()
            assert doc["status"] == r.status, doc
            return r, doc

    r, doc = err(build_request("GET", "/nowhere"))
    assert (r.status, doc["error"]) == (404, "no_route")
    assert doc["request_id"] == r.header("x-request-id")
    # A Content-Length above the limit is refused by the parser, before a request exists:
    # like the other parser errors it has no request id (operations.md).
    r, doc = err(build_request("POST", "/p", body=b"x" * 11))
    assert (r.status, doc["error"]) == (413, "body_too_large")
    assert "request_id" not in doc and r.header("x-request-id") is None
    r, doc = err(build_request("GET", "/p/" + "a" * 300))
    assert (r.status, doc["error"]) == (414, "uri_too_long")
    r, doc = err(build_request("GET", "/p", [("X-%d" % i, "v") for i in range(6)]))
    assert (r.status, doc["error"]) == (431, "too_many_headers")
    r, doc = err(build_request("GET", "/p", [("X-Big", "a" * 1100)]))
    assert (r.status, doc["error"]) == (431, "headers_too_large")
    r, doc = err(b"GET /p HTTP/1.2\r\nHost: x\r\n\r\n")
    assert (r.status, doc["error"]) == (505, "bad_version")
    r, doc = err(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert (r.status, doc["error"]) == (400, "cl_and_te")
    r, doc = err(b"GET /p HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n")
    assert (r.status, doc["error"]) == (400, "obs_fold")
    assert not b.requests


def test_parser_errors_carry_no_request_id_and_close(gateway):
    # operations.md: 400/408/414/431/505 from the parser carry no request id; 400 closes.
    g = gateway(simple_config("  - {direct_response: {body: x}}",
                              limits="{max_uri_bytes: 256, header_timeout: 200ms}"))
    for data in (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                 b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: x\r\n"):
        with g.connect() as c:
            c.send(data)
            r = c.read_response()
            assert r.status in (400, 408, 414, 505), r
            assert "request_id" not in r.json(), r
            assert r.header("x-request-id") is None, r
            if r.status == 400:
                assert c.closed(timeout=3)


def test_upstream_errors_502_503_504(gateway, backend):
    hang = backend("hang")
    g = gateway(simple_config(
        "  - {match: {path: /refused}, upstream: refused}\n"
        "  - {match: {path: /hang}, upstream: hang}\n",
        upstreams=("  - {name: refused, endpoints: [\"127.0.0.1:%d\"]}\n" % dead_port() +
                   "  - {name: hang, endpoints: [\"$B1\"], timeouts: {response: 300ms}}\n")),
        B1=hang.addr)
    doc = assert_gateway_error(g.request("GET", "/refused"), 503)
    assert doc["error"] == "upstream_connect_failed", doc
    t0 = time.monotonic()
    doc = assert_gateway_error(g.request("GET", "/hang"), 504)
    assert doc["error"] == "upstream_timeout", doc
    assert time.monotonic() - t0 < 3


def test_upstream_connect_timeout_is_504(gateway):
    with stalled_listener() as port:
        g = gateway(proxy_config(upstream_extra="    timeouts: {connect: 200ms}\n"
                                 "    retries: {attempts: 0}"),
                    B1="127.0.0.1:%d" % port)
        t0 = time.monotonic()
        doc = assert_gateway_error(g.request("GET", "/"), 504)
        assert doc["error"] == "upstream_connect_timeout", doc
        assert time.monotonic() - t0 < 2


# ------------------------------------------------------------------------------------------
# upstreams at run time


def test_connect_failures_try_each_endpoint_at_most_once(gateway, backend):
    b = backend()
    eps = ("      - 127.0.0.1:%d\n      - 127.0.0.1:%d\n      - 127.0.0.1:%d\n      - $B1"
           % (dead_port(), dead_port(), dead_port()))
    # Passive health off so that every request meets the dead endpoints: 3 retries always
    # reach the 4th endpoint (each endpoint tried once); no retry cannot always.
    quiet = "    health: {passive: {enabled: false}}\n"
    g = gateway(proxy_config(endpoints=eps, upstream_extra=quiet +
                             "    retries: {attempts: 3, min_retries: 1000}"), B1=b.addr)
    for i in range(8):
        assert g.request("GET", "/a%d" % i).status == 200
    g1 = gateway(proxy_config(endpoints=eps, upstream_extra=quiet + "    retries: {attempts: 0}"),
                 B1=b.addr)
    statuses = [g1.request("GET", "/b%d" % i).status for i in range(8)]
    assert 503 in statuses and set(statuses) <= {200, 503}, statuses


def test_more_attempts_than_endpoints_is_not_a_loop(gateway):
    eps = "      - 127.0.0.1:%d\n      - 127.0.0.1:%d" % (dead_port(), dead_port())
    g = gateway(proxy_config(endpoints=eps, upstream_extra="    retries: {attempts: 10}"))
    r = g.request("GET", "/")
    assert r.status == 503, r
    doc = assert_gateway_error(r, r.status)
    assert doc["error"] in ("upstream_connect_failed", "no_endpoint"), doc


def test_endpoint_weights_round_robin(gateway, backend):
    b1, b2 = backend(), backend()
    eps = "      - {address: $B1, weight: 3}\n      - $B2"
    g = gateway(proxy_config(endpoints=eps, workers=1), B1=b1.addr, B2=b2.addr)
    with g.connect() as c:
        for i in range(40):
            assert c.request("GET", "/w%d" % i).status == 200
    assert (len(b1.requests), len(b2.requests)) == (30, 10)


def test_least_request_prefers_idle_endpoint(gateway, backend):
    slow, fast = backend("hang"), backend()
    eps = "      - $B1\n      - $B2"
    g = gateway(proxy_config(endpoints=eps, workers=1,
                             upstream_extra="    balance: least_request\n"
                                            "    timeouts: {response: 10s}"),
                B1=slow.addr, B2=fast.addr)
    hung = []
    try:
        # Keep requests stuck on the hanging endpoint, then the rest go to the free one.
        for i in range(4):
            c = g.connect(timeout=10)
            c.send(build_request("GET", "/hold%d" % i))
            hung.append(c)
        poll(lambda: len(slow.requests) + len(fast.requests) >= 4, 5)
        held = len(slow.requests)
        assert held >= 1
        for i in range(10):
            assert g.request("GET", "/free%d" % i).status == 200
        assert len(slow.requests) == held, "least_request sent more to the busy endpoint"
    finally:
        for c in hung:
            c.close()


def cookie_or_header_sticky(gateway, backend, hash_on, make_headers):
    bs = [backend() for _ in range(3)]
    eps = "\n".join("      - $B%d" % i for i in range(3))
    g = gateway(proxy_config(endpoints=eps, upstream_extra="    balance: hash\n"
                             "    hash_on: \"%s\"" % hash_on),
                **{"B%d" % i: b.addr for i, b in enumerate(bs)})
    seen = {}
    for _ in range(3):
        for key in ("k%d" % i for i in range(12)):
            doc = g.request("GET", "/", make_headers(key)).json()
            seen.setdefault(key, set()).add(doc["peer_port"])
    assert all(len(v) == 1 for v in seen.values()), seen
    assert len({next(iter(v)) for v in seen.values()}) > 1, "every key on one endpoint"
    return g


def test_hash_on_cookie_is_sticky(gateway, backend):
    cookie_or_header_sticky(gateway, backend, "cookie:sid",
                            lambda k: [("Cookie", "a=1; sid=%s; b=2" % k)])


def test_hash_on_header_is_sticky(gateway, backend):
    cookie_or_header_sticky(gateway, backend, "header:X-User-Id",
                            lambda k: [("x-user-id", k)])


def test_hash_on_ip_default_is_sticky(gateway, backend):
    bs = [backend() for _ in range(3)]
    eps = "\n".join("      - $B%d" % i for i in range(3))
    g = gateway(proxy_config(endpoints=eps, upstream_extra="    balance: hash"),
                **{"B%d" % i: b.addr for i, b in enumerate(bs)})
    ports = {g.request("GET", "/%d" % i).json()["peer_port"] for i in range(12)}
    assert len(ports) == 1, ports


def test_hash_on_ignored_unless_balance_hash(gateway, backend):
    b1, b2 = backend(), backend()
    g = gateway(proxy_config(endpoints="      - $B1\n      - $B2", workers=1,
                             upstream_extra="    hash_on: header:X-User-Id"),
                B1=b1.addr, B2=b2.addr)
    with g.connect() as c:
        for _ in range(6):
            assert c.request("GET", "/", [("X-User-Id", "same")]).status == 200
    assert len(b1.requests) == 3 and len(b2.requests) == 3


def test_keepalive_max_idle_zero_turns_pooling_off(gateway, backend):
    b = backend()
    g = gateway(proxy_config(upstream_extra="    keepalive: {max_idle: 0}"), B1=b.addr)
    with g.connect() as c:
        for i in range(4):
            assert c.request("GET", "/%d" % i).status == 200
    assert b.conn_count == 4
    b2 = backend()
    g2 = gateway(proxy_config(workers=1), B1=b2.addr)  # default 64: one reused connection
    with g2.connect() as c:
        for i in range(4):
            assert c.request("GET", "/%d" % i).status == 200
    assert b2.conn_count == 1


def test_keepalive_idle_timeout_retires_pooled_connection(gateway, backend):
    b = backend()
    g = gateway(proxy_config(workers=1, upstream_extra="    keepalive: {idle_timeout: 200ms}"),
                B1=b.addr)
    assert g.request("GET", "/1").status == 200
    assert poll(lambda: b.closed_by_peer >= 1, 3), "pooled connection not retired"
    assert g.request("GET", "/2").status == 200
    assert b.conn_count == 2


def test_timeouts_response_counts_after_request_sent(gateway, backend):
    b = backend("slow", delay="0.6")
    g = gateway(proxy_config(upstream_extra="    timeouts: {response: 300ms}"), B1=b.addr)
    doc = assert_gateway_error(g.request("GET", "/"), 504)
    assert doc["error"] == "upstream_timeout"
    g2 = gateway(proxy_config(upstream_extra="    timeouts: {response: 2s}"), B1=b.addr)
    assert g2.request("GET", "/").status == 200


# ------------------------------------------------------------------------------------------
# routes at run time


ROUTES = r"""
  - name: exact-host
    match: {host: api.example.com, path_prefix: /}
    direct_response: {body: exact-host}
  - name: wild
    match: {host: "*.example.com"}
    direct_response: {body: wild}
  - name: wild-eu
    match: {host: "*.eu.example.com"}
    direct_response: {body: wild-eu}
  - name: v6
    match: {host: "[::1]"}
    direct_response: {body: v6}
  - name: upper
    match: {host: UPPER.Example.ORG}
    direct_response: {body: upper}
  - name: prefix-users
    match: {host: p.test, path_prefix: /users}
    direct_response: {body: prefix-users}
  - name: prefix-slash
    match: {host: p.test, path_prefix: /api/}
    direct_response: {body: prefix-slash}
  - name: exact-users
    match: {host: p.test, path: /users}
    direct_response: {body: exact-users}
  - name: first
    match: {host: tie.test, path: /t}
    direct_response: {body: first}
  - name: second
    match: {host: tie.test, path: /t}
    direct_response: {body: second}
  - name: with-method
    match: {host: tie.test, path: /t, methods: [POST]}
    direct_response: {body: with-method}
  - name: hdr
    match: {host: tie.test, path: /h, headers: {X-Version: 2}}
    direct_response: {body: hdr}
  - name: anything
    direct_response: {status: 299, body: anything}
"""


@pytest.fixture(scope="module")
def rgw(module_gateway_factory):
    return module_gateway_factory.start(simple_config(ROUTES, workers=1))


def winner(g, host, target="/", method="GET", headers=()):
    return g.request(method, target, list(headers), host=host).body.decode()


@pytest.mark.parametrize("host,expected", [
    ("api.example.com", "exact-host"),
    ("a.example.com", "wild"),
    ("a.b.example.com", "wild"),
    ("example.com", "anything"),
    ("x.eu.example.com", "wild-eu"),  # longer wildcard suffix first
    ("[::1]:8080", "v6"),
    ("upper.example.org", "upper"),  # hosts lowercased at load
])
def test_route_host_rules(rgw, host, expected):
    assert winner(rgw, host) == expected


def test_route_without_conditions_matches_everything(rgw):
    r = rgw.request("DELETE", "/any/thing?q=1", host="nowhere.test")
    assert r.status == 299 and r.body == b"anything"


def test_exact_path_beats_prefix(rgw):
    assert winner(rgw, "p.test", "/users") == "exact-users"
    assert winner(rgw, "p.test", "/users/42") == "prefix-users"
    assert winner(rgw, "p.test", "/users?x") == "exact-users"


def test_path_prefix_is_a_segment_prefix(rgw):
    # configuration.md: path_prefix matches whole path segments, so `/users` matches
    # `/users/42` but not `/usersx`; a prefix ending in `/` needs that slash.
    assert winner(rgw, "p.test", "/usersx") == "anything"
    assert winner(rgw, "p.test", "/api/x") == "prefix-slash"
    assert winner(rgw, "p.test", "/api/") == "prefix-slash"
    assert winner(rgw, "p.test", "/api") == "anything"


def test_file_order_breaks_ties_and_more_conditions_first(rgw):
    assert winner(rgw, "tie.test", "/t") == "first"
    assert winner(rgw, "tie.test", "/t", method="POST") == "with-method"
    assert winner(rgw, "tie.test", "/h", headers=[("X-Version", "2")]) == "hdr"
    assert winner(rgw, "tie.test", "/h", headers=[("X-Version", "02")]) == "anything"


def test_methods_are_case_sensitive_at_run_time(rgw):
    # A lowercase `post` is another method token, not POST.
    assert winner(rgw, "tie.test", "/t", method="post") == "first"


def test_direct_response_defaults(gateway):
    g = gateway(simple_config("  - {direct_response: {}}"))
    r = g.request("GET", "/")
    assert r.status == 200 and r.body == b"", r
    assert r.header("content-type") == "text/plain"
    assert r.header("content-length") == "0"
    assert HEX_ID.match(r.header("x-request-id", ""))


def test_direct_response_body_may_contain_nul(gateway):
    g = gateway(simple_config('  - {direct_response: {body: "a\\0b", content_type: '
                              'application/octet-stream}}'))
    r = g.request("GET", "/")
    assert r.body == b"a\x00b" and r.header("content-type") == "application/octet-stream"


def test_routes_default_to_every_listener_and_scope_with_listeners(gateway):
    g = gateway(simple_config(
        "  - {name: a, match: {path: /a}, direct_response: {body: a}}\n"
        "  - {name: b, listeners: [admin], match: {path: /b}, direct_response: {body: b}}\n",
        extra_listeners="  - name: admin\n    address: 127.0.0.1:$PORT_admin"))
    assert g.request("GET", "/a").body == b"a"
    assert g.request("GET", "/a", listener="admin").body == b"a"
    assert g.request("GET", "/b", listener="admin").body == b"b"
    assert_gateway_error(g.request("GET", "/b"), 404)


def test_no_routes_means_every_request_gets_404(gateway):
    g = gateway("listeners:\n  - name: public\n    address: 127.0.0.1:$PORT_public\n")
    doc = assert_gateway_error(g.request("GET", "/"), 404)
    assert doc["error"] == "no_route"


@pytest.fixture
def pgw(gateway, backend):
    b = backend()
    g = gateway(simple_config(
        "  - {match: {path_prefix: /users}, upstream: app, strip_prefix: true}\n"
        "  - {match: {path_prefix: /old/}, upstream: app, rewrite_prefix: /v2/}\n"
        "  - {match: {path_prefix: /r}, upstream: app, rewrite_prefix: /v2}\n"
        "  - {match: {path_prefix: /keep}, upstream: app, strip_prefix: false}\n"
        "  - name: hdrs\n"
        "    match: {path_prefix: /h}\n"
        "    upstream: app\n"
        "    request_headers:\n"
        "      set: {X-Gateway: sluice, Host: rewritten.test}\n"
        "      add: {X-Multi: two}\n"
        "      remove: [X-Internal, Cookie]\n"
        "    response_headers:\n"
        "      set: {X-Frame-Options: DENY}\n"
        "      add: {X-Added: a}\n"
        "      remove: [Server]\n",
        upstreams="  - {name: app, endpoints: [\"$B1\"]}\n"), B1=b.addr)
    g.backend = b
    return g


@pytest.mark.parametrize("target,path", [
    ("/users/42", "/42"),  # documented example
    ("/users", "/"),
    ("/users/42?x=1", "/42"),
    ("/r/42", "/v2/42"),  # documented rewrite example
    ("/old/a", "/v2/a"),
    ("/keep/a", "/keep/a"),
])
def test_strip_and_rewrite_prefix(pgw, target, path):
    assert backend_doc(pgw, target)["path"] == path


def test_request_header_operations(pgw):
    doc = backend_doc(pgw, "/h", [("X-Gateway", "client"), ("X-Multi", "one"),
                                  ("x-internal", "1"), ("X-INTERNAL", "2"),
                                  ("Cookie", "s=1")])
    assert hvals(doc, "X-Gateway") == ["sluice"]
    assert hvals(doc, "X-Multi") == ["one", "two"]
    assert hvals(doc, "X-Internal") == [] and hvals(doc, "Cookie") == []


def test_request_headers_set_host(pgw):
    doc = backend_doc(pgw, "/h", host="orig.test")
    assert hvals(doc, "Host") == ["rewritten.test"], doc["headers"]


def test_response_header_operations(pgw):
    r = pgw.request("GET", "/h?rh=X-Frame-Options:SAMEORIGIN&rh=X-Added:b")
    assert r.headers_all("X-Frame-Options") == ["DENY"], r.headers
    assert r.headers_all("X-Added") == ["b", "a"], r.headers
    assert r.header("Server") is None


def test_response_headers_apply_to_direct_response(gateway):
    g = gateway(simple_config(
        "  - direct_response: {body: x}\n    response_headers: {set: {X-Frame-Options: DENY}}"))
    assert g.request("GET", "/").header("x-frame-options") == "DENY"


def test_x_forwarded_headers_and_request_id(pgw):
    doc = backend_doc(pgw, "/keep", [("X-Forwarded-For", "10.1.2.3")], host="front.test")
    assert hvals(doc, "X-Forwarded-For") == ["10.1.2.3, 127.0.0.1"], doc["headers"]
    assert hvals(doc, "X-Forwarded-Proto") == ["http"]
    assert hvals(doc, "X-Forwarded-Host") == ["front.test"]
    assert len(hvals(doc, "X-Request-Id")) == 1
    r = pgw.request("GET", "/keep", [("X-Request-Id", "my-id-123")])
    assert r.header("x-request-id") == "my-id-123"
    assert hvals(r.json(), "X-Request-Id") == ["my-id-123"]


def test_get_does_not_imply_head(gateway):
    # configuration.md: methods "any one matches"; unlike nginx's limit_except, GET does not
    # let HEAD through, so the quickstart lists [GET, HEAD].
    g = gateway(simple_config("  - {match: {path: /g, methods: [GET]}, direct_response: "
                              "{body: get-only}}\n  - {direct_response: {body: other}}"))
    assert g.request("GET", "/g").body == b"get-only"
    r = g.request("HEAD", "/g")
    assert r.status == 200 and r.header("content-length") == str(len("other"))


def test_paths_compared_as_received_without_normalisation(gateway, backend):
    # configuration.md: no percent-decoding and no dot-segment or // normalisation; such
    # requests do not match the route and are forwarded unchanged.
    b = backend()
    g = gateway(simple_config(
        "  - {match: {path_prefix: /admin}, direct_response: {status: 403, body: no}}\n"
        "  - {upstream: app}\n", upstreams="  - {name: app, endpoints: [\"$B1\"]}\n"),
        B1=b.addr)
    assert g.request("GET", "/admin/x").status == 403
    for target in ("/x/../admin", "/./admin", "//admin", "/%61dmin", "/Admin"):
        r = g.request("GET", target)
        assert r.status == 200 and r.json()["path"] == target, (target, r)


def test_response_headers_not_applied_to_gateway_errors(gateway):
    # configuration.md: response_headers apply to upstream and direct responses, not to the
    # gateway's own error answers.
    g = gateway(simple_config(
        "  - {upstream: dead, response_headers: {set: {X-Frame-Options: DENY}}}",
        upstreams="  - {name: dead, endpoints: [\"127.0.0.1:%d\"]}\n" % dead_port()))
    r = g.request("GET", "/")
    assert_gateway_error(r, 503)
    assert r.header("x-frame-options") is None


def test_send_timeout_cuts_client_that_stops_reading(gateway, backend):
    size = 256 * 1024 * 1024
    b = backend("big", size=str(size))
    g = gateway(proxy_config(limits="{send_timeout: 300ms}"), B1=b.addr)
    with g.connect(timeout=10) as c:
        c.send(build_request("GET", "/big"))
        c.read_head()
        # Not reading: once the socket buffers are full the gateway's writes stall; after
        # send_timeout it closes. Then only what was already buffered can arrive.
        time.sleep(1.5)
        got = len(c.buf)
        deadline = time.monotonic() + 5
        c.sock.settimeout(0.5)
        closed = False
        while time.monotonic() < deadline:
            try:
                d = c.sock.recv(1 << 20)
            except ConnectionResetError:
                closed = True
                break
            except socket.timeout:
                break
            if not d:
                closed = True
                break
            got += len(d)
        assert closed and got < size, (closed, got)


def test_upstream_idle_timeout_while_body_goes_out_is_504(gateway):
    # configuration.md: timeouts.idle bounds a stall while the request body goes out (504 if
    # no response byte was sent yet); timeouts.response does not run during the upload.
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(10)
    held = []
    acceptor = threading.Thread(target=lambda: held.append(srv.accept()[0]), daemon=True)
    acceptor.start()
    g = gateway(proxy_config(limits="{max_body_bytes: 0}",
                             upstream_extra="    timeouts: {idle: 300ms, response: 30s}"),
                B1="127.0.0.1:%d" % srv.getsockname()[1])
    size = 64 * 1024 * 1024
    stop = threading.Event()
    try:
        with g.connect(timeout=10) as c:
            c.send(build_request("POST", "/up", [("Content-Length", str(size))]))

            def pump():  # keeps offering body bytes; never the reason for a stall
                block = b"u" * 65536
                c.sock.settimeout(0.2)
                while not stop.is_set():
                    try:
                        c.sock.send(block)
                    except socket.timeout:
                        continue
                    except OSError:
                        return

            t = threading.Thread(target=pump, daemon=True)
            t.start()
            t0 = time.monotonic()
            try:
                r = c.read_response(timeout=8)
            finally:
                stop.set()
                t.join(2)
            doc = assert_gateway_error(r, 504)
            assert time.monotonic() - t0 < 5  # the idle timer, not response: 30s
            assert doc["error"] == "upstream_idle_timeout", doc
    finally:
        stop.set()
        for s in held:
            s.close()
        srv.close()


# ------------------------------------------------------------------------------------------
# resilience.md and configuration.md: the resilience examples are valid configurations


def _yaml_blocks(doc):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", doc)
    with open(path) as f:
        return re.findall(r"```yaml\n(.*?)```", f.read(), re.S)


@pytest.mark.parametrize("doc", ["resilience.md", "configuration.md"])
def test_resilience_examples_are_accepted(tmp_path, doc):
    blocks = [b for b in _yaml_blocks(doc) if "upstreams:" in b and "health:" in b]
    assert blocks, "no resilience example in %s" % doc
    for b in blocks:
        assert_accepted(tmp_path, listener_text() + b + "routes: [{upstream: users}]\n")
