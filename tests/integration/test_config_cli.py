"""Command line and config errors: `sluice -t -c FILE` validates (0 / 1) and reports every
error as `FILE:LINE:COL: key.path: message`; --version and --help."""

import re
import subprocess

from helpers import SLUICE_BIN, require_binary, run_cli, sluice_env
from peers import free_port

VALID = """\
workers: 1
drain_timeout: 5s
log_level: info
listeners:
  - name: public
    address: 127.0.0.1:{port}
    limits: {{max_body_bytes: 1MiB, header_timeout: 5s}}
upstreams:
  - name: users
    balance: round_robin
    endpoints:
      - {{address: 127.0.0.1:9, weight: 1}}
    timeouts: {{connect: 1s, response: 15s}}
routes:
  - name: users
    match: {{path_prefix: /users, methods: [GET, POST]}}
    upstream: users
    strip_prefix: true
  - name: health
    match: {{path: /healthz}}
    direct_response: {{status: 200, body: "ok\\n", content_type: text/plain}}
"""


def write(tmp_path, text, name="sluice.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def position(text, needle, after=None):
    """1-based (line, column) of the first `needle`, searching from the first `after`."""
    start = text.index(after) if after else 0
    i = text.index(needle, start)
    line = text.count("\n", 0, i) + 1
    col = i - (text.rfind("\n", 0, i) + 1) + 1
    return line, col


def error_lines(stderr):
    return [ln for ln in stderr.splitlines() if ln.strip()]


def valid_text():
    return VALID.format(port=free_port())


def test_valid_config_passes(tmp_path):
    path = write(tmp_path, valid_text())
    r = run_cli(["-t", "-c", path])
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_unknown_upstream_reported_with_position(tmp_path):
    text = valid_text().replace("    upstream: users\n", "    upstream: user\n")
    path = write(tmp_path, text)
    r = run_cli(["-t", "-c", path])
    assert r.returncode == 1, (r.stdout, r.stderr)
    line, col = position(text, "user\n", after="    upstream: ")
    expected = '%s:%d:%d: routes[0].upstream: unknown upstream "user"' % (path, line, col)
    assert expected in error_lines(r.stderr), "expected %r in stderr:\n%s" % (expected, r.stderr)


def test_unknown_key_reported_with_position(tmp_path):
    text = valid_text().replace("    limits: {", "    limts: {")
    path = write(tmp_path, text)
    r = run_cli(["-t", "-c", path])
    assert r.returncode == 1, (r.stdout, r.stderr)
    line, col = position(text, "limts")
    prefix = "%s:%d:%d: listeners[0].limts: " % (path, line, col)
    hits = [ln for ln in error_lines(r.stderr) if ln.startswith(prefix)]
    assert hits, "expected a line starting %r in stderr:\n%s" % (prefix, r.stderr)
    assert "unknown" in hits[0].lower(), hits


def test_bad_duration_reported_with_position(tmp_path):
    text = valid_text().replace("header_timeout: 5s", "header_timeout: 5 parsecs")
    path = write(tmp_path, text)
    r = run_cli(["-t", "-c", path])
    assert r.returncode == 1, (r.stdout, r.stderr)
    line, col = position(text, "5 parsecs")
    prefix = "%s:%d:%d: listeners[0].limits.header_timeout: " % (path, line, col)
    hits = [ln for ln in error_lines(r.stderr) if ln.startswith(prefix)]
    assert hits, "expected a line starting %r in stderr:\n%s" % (prefix, r.stderr)


def test_bad_top_level_duration(tmp_path):
    text = valid_text().replace("drain_timeout: 5s", "drain_timeout: soon")
    path = write(tmp_path, text)
    r = run_cli(["-t", "-c", path])
    assert r.returncode == 1
    line, col = position(text, "soon")
    assert any(ln.startswith("%s:%d:%d: drain_timeout: " % (path, line, col))
               for ln in error_lines(r.stderr)), r.stderr


def test_every_error_is_reported(tmp_path):
    text = (valid_text().replace("    upstream: users\n", "    upstream: user\n")
            .replace("    limits: {", "    limts: {")
            .replace("drain_timeout: 5s", "drain_timeout: soon"))
    path = write(tmp_path, text)
    r = run_cli(["-t", "-c", path])
    assert r.returncode == 1
    lines = error_lines(r.stderr)
    for key in ("routes[0].upstream", "listeners[0].limts", "drain_timeout"):
        assert any(re.match(r"%s:\d+:\d+: %s: " % (re.escape(path), re.escape(key)), ln)
                   for ln in lines), (key, r.stderr)


def test_yaml_syntax_error_has_position(tmp_path):
    text = valid_text().replace("    match: {path: /healthz}", "    match: {path: /healthz")
    path = write(tmp_path, text)
    r = run_cli(["-t", "-c", path])
    assert r.returncode == 1
    assert re.search(r"^%s:\d+:\d+: " % re.escape(path), r.stderr, re.M), r.stderr


def test_route_without_target_is_an_error(tmp_path):
    text = valid_text().replace("    upstream: users\n", "")
    path = write(tmp_path, text)
    r = run_cli(["-t", "-c", path])
    assert r.returncode == 1
    assert re.search(r"^%s:\d+:\d+: routes\[0\]" % re.escape(path), r.stderr, re.M), r.stderr


def test_missing_file(tmp_path):
    path = str(tmp_path / "does-not-exist.yaml")
    r = run_cli(["-t", "-c", path])
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert path in r.stderr


def test_start_with_invalid_config_exits_1(tmp_path):
    text = valid_text().replace("    upstream: users\n", "    upstream: user\n")
    path = write(tmp_path, text)
    r = run_cli(["-c", path], timeout=5)
    assert r.returncode == 1
    assert 'routes[0].upstream: unknown upstream "user"' in r.stderr


def test_check_mode_does_not_bind(tmp_path):
    port = free_port()
    path = write(tmp_path, VALID.format(port=port))
    require_binary()
    p = subprocess.run([SLUICE_BIN, "-t", "-c", path], capture_output=True, timeout=10,
                       env=sluice_env(), text=True)
    assert p.returncode == 0, p.stderr
    # The port is still free: -t loads and stops.
    import socket

    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    finally:
        s.close()


def test_second_instance_on_the_same_port_exits_1(tmp_path, gateway):
    """Per-worker sockets use SO_REUSEPORT; without the start-up probe a second process on
    the same address would join the first one's port and split its traffic."""
    first = gateway(VALID.format(port="$PORT_public"))
    path = write(tmp_path, first.config_text)
    r = run_cli(["-c", path], timeout=10)
    assert r.returncode == 1, r.stderr
    assert "cannot listen on" in r.stderr and "Address already in use" in r.stderr, r.stderr
    assert first.alive()


def test_version_and_help():
    v = run_cli(["--version"])
    assert v.returncode == 0, v
    assert "sluice" in (v.stdout + v.stderr).lower()
    h = run_cli(["--help"])
    assert h.returncode == 0, h
    assert "-c" in h.stdout + h.stderr
    assert "-t" in h.stdout + h.stderr


def test_unknown_flag_fails():
    r = run_cli(["--no-such-flag"])
    assert r.returncode != 0
