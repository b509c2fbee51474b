"""The admin API (`admin:`): its own listener and thread serving /live, /ready, /status,
/routes, /upstreams, /metrics and the status page; endpoints added and removed at run time;
POST /reload and POST /drain; the bearer token required off loopback.

Every request to the admin port goes over plain sockets to 127.0.0.1 (an admin listener bound
to 0.0.0.0 is reached there too). Backends are the echo peers of peers.py.
"""

import json
import os
import re
import select
import socket
import time

import pytest

from client import RawClient, build_request
from helpers import poll, run_cli
from peers import free_port

TOKEN = "s3cret-Token_for-tests"


def config(admin="127.0.0.1:$PORT_admin", admin_extra="", routes=None, upstreams=None,
           extra=""):
    """Two listeners' worth of config: `public` with upstream `app` ($B1) behind route `all`,
    and the admin listener at `admin`."""
    if upstreams is None:
        upstreams = ("  - name: app\n"
                     "    endpoints:\n"
                     "      - {address: $B1}\n")
    if routes is None:
        routes = ("  - name: all\n"
                  "    match: {path_prefix: /}\n"
                  "    upstream: app\n")
    text = ("workers: 2\n"
            "drain_timeout: 3s\n"
            "log_level: info\n")
    text += extra
    text += ("listeners:\n"
             "  - name: public\n"
             "    address: 127.0.0.1:$PORT_public\n"
             "upstreams:\n" + upstreams +
             "routes:\n" + routes +
             "admin:\n"
             "  address: %s\n" % admin)
    if admin_extra:
        text += admin_extra
    return text


def admin(g, method, path, body=b"", token=None, headers=None):
    """One request to the admin port on a fresh connection; returns the Response."""
    hdrs = list(headers or [])
    if token is not None:
        hdrs.append(("Authorization", "Bearer " + token))
    if body and not any(k.lower() == "content-type" for k, _ in hdrs):
        hdrs.append(("Content-Type", "application/json"))
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    with RawClient(g.ports["admin"], timeout=10) as c:
        c.send(build_request(method, path, hdrs, body, host="127.0.0.1"))
        return c.read_response(timeout=10, head=(method == "HEAD"))


def get_json(g, path, token=None):
    r = admin(g, "GET", path, token=token)
    assert r.status == 200, r
    assert r.header("Content-Type") == "application/json", r
    return r.json()


def assert_error(r, status, name=None, contains=None):
    """Every admin error is JSON with status, error and message."""
    assert r.status == status, r
    assert r.header("Content-Type") == "application/json", r
    j = r.json()
    assert j["status"] == status, j
    if name:
        assert j["error"] == name, j
    if contains:
        assert contains in j["message"], j
    return j


def traffic(g, n, path="/t"):
    for _ in range(n):
        r = g.request("GET", path)
        assert r.status == 200, r


# ---- probes and read-only views ----


def test_live_and_ready(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    r = admin(g, "GET", "/live")
    assert r.status == 200 and r.json() == {"status": "ok"}, r
    r = admin(g, "GET", "/ready")
    assert r.status == 200 and r.json() == {"status": "ready"}, r
    r = admin(g, "HEAD", "/live")
    assert r.status == 200 and r.body == b"", r


def test_status_fields(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    s = get_json(g, "/status")
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", s["version"]), s
    assert s["pid"] == g.pid
    assert isinstance(s["uptime_s"], int) and s["uptime_s"] >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", s["started_at"]), s
    assert s["config"] == {"path": g.config_path, "generation": 1}
    assert s["reloads"] == {"ok": 0, "failed": 0, "rollbacks": 0, "last_at": None,
                            "last_error": None}
    assert s["draining"] is False and s["state"] == "ready"
    assert s["workers"] == 2
    assert isinstance(s["open_connections"], int)
    assert s["listeners"] == [{"name": "public", "address": "127.0.0.1:%d" % g.ports["public"],
                               "protocol": "http", "tls": False}]
    before = s["requests"]["total"]
    traffic(g, 5)
    assert poll(lambda: get_json(g, "/status")["requests"]["total"] >= before + 5, timeout=5)
    after = get_json(g, "/status")["requests"]
    assert after["total"] == before + 5, after
    assert after["by_class"]["2xx"] >= 5, after
    assert after["duration_seconds_sum"] > 0, after


def test_admin_requests_are_not_counted_as_traffic(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    traffic(g, 3)
    assert poll(lambda: get_json(g, "/status")["requests"]["total"] == 3, timeout=5)
    for _ in range(5):
        get_json(g, "/status")
    assert get_json(g, "/status")["requests"]["total"] == 3


def test_routes_match_config(gateway, backend):
    b = backend()
    routes = ("  - name: api\n"
              "    match:\n"
              "      host: api.example.com\n"
              "      path_prefix: /api\n"
              "      methods: [GET, POST]\n"
              "      headers: {X-Env: prod}\n"
              "    upstream: app\n"
              "    strip_prefix: true\n"
              "  - name: old\n"
              "    listeners: [public]\n"
              "    match: {path_prefix: /v1}\n"
              "    upstream: app\n"
              "    rewrite_prefix: /v2\n"
              "  - name: health\n"
              "    match: {path: /healthz}\n"
              "    direct_response: {status: 204}\n")
    g = gateway(config(routes=routes), B1=b.addr)
    rs = get_json(g, "/routes")
    assert [r["name"] for r in rs] == ["api", "old", "health"]
    api, old, health = rs
    assert api["match"] == {"host": "api.example.com", "path_prefix": "/api",
                            "methods": ["GET", "POST"], "headers": {"X-Env": "prod"}}
    assert api["upstream"] == "app" and api["strip_prefix"] is True
    assert api["listeners"] == ["public"]
    assert api["filters"] == [] and api["default_filters"] == []
    assert old["rewrite_prefix"] == "/v2" and old["match"] == {"path_prefix": "/v1"}
    assert health["upstream"] is None
    assert health["direct_response"]["status"] == 204
    assert health["match"] == {"path": "/healthz"}
    r = g.request("GET", "/healthz")
    assert r.status == 204
    assert poll(lambda: [x for x in get_json(g, "/routes")
                         if x["name"] == "health"][0]["requests"]["total"] == 1, timeout=5)


def test_upstreams_match_config(gateway, backend):
    b1, b2 = backend(), backend()
    ups = ("  - name: app\n"
           "    balance: least_request\n"
           "    endpoints:\n"
           "      - {address: $B1, weight: 3, zone: a}\n"
           "      - {address: $B2}\n"
           "    circuit_breaker: {max_connections: 50, max_pending: 7, max_requests: 40}\n"
           "  - name: other\n"
           "    endpoints:\n"
           "      - {address: $B2}\n")
    g = gateway(config(upstreams=ups), B1=b1.addr, B2=b2.addr)
    us = get_json(g, "/upstreams")
    assert [u["name"] for u in us] == ["app", "other"]
    app = us[0]
    assert app["balancer"] == "least_request"
    eps = {e["address"]: e for e in app["endpoints"]}
    assert set(eps) == {b1.addr, b2.addr}
    e1 = eps[b1.addr]
    assert e1["weight"] == 3 and e1["zone"] == "a"
    assert e1["healthy"] is True and e1["state"] == "closed"
    assert e1["active_check"] == "unknown" and e1["sources"] == ["config"]
    assert eps[b2.addr]["zone"] is None and eps[b2.addr]["weight"] == 1
    br = app["breaker"]
    assert (br["max_connections"], br["max_pending"], br["max_requests"]) == (50, 7, 40)
    assert app["ejected"] == 0
    assert "ejections" in app["stats"]
    one = get_json(g, "/upstreams/other")
    assert one["name"] == "other" and [e["address"] for e in one["endpoints"]] == [b2.addr]
    assert_error(admin(g, "GET", "/upstreams/nope"), 404, "unknown_upstream")


def test_metrics_exposition(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    traffic(g, 2)
    r = admin(g, "GET", "/metrics")
    assert r.status == 200, r
    assert r.header("Content-Type").startswith("text/plain; version=0.0.4"), r
    assert b"sluice_build_info" in r.body


def test_unknown_path_and_wrong_method(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    assert_error(admin(g, "GET", "/nope"), 404, "not_found")
    assert_error(admin(g, "GET", "/status/"), 404, "not_found")
    r = admin(g, "DELETE", "/status")
    assert_error(r, 405, "method_not_allowed")
    assert r.header("Allow") == "GET, HEAD"
    r = admin(g, "GET", "/reload")
    assert_error(r, 405)
    assert r.header("Allow") == "POST"
    r = admin(g, "GET", "/upstreams/app/endpoints/127.0.0.1:1")
    assert_error(r, 405)
    assert r.header("Allow") == "DELETE"


def test_admin_port_uses_the_strict_parser(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    with RawClient(g.ports["admin"], timeout=5) as c:
        c.send(b"GET /live HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        r = c.read_response(timeout=5)
    assert r.status == 400, r
    big = b"x" * (70 * 1024)
    r = admin(g, "POST", "/upstreams/app/endpoints", body=big)
    assert r.status == 413, r


# ---- endpoints at run time ----


def test_post_endpoint_gets_traffic_and_delete_stops_it(gateway, backend):
    b1, b2 = backend(), backend()
    g = gateway(config(), B1=b1.addr)
    r = admin(g, "POST", "/upstreams/app/endpoints", {"address": b2.addr, "weight": 1,
                                                      "zone": "z1"})
    assert r.status == 201, r
    assert r.json() == {"upstream": "app", "address": b2.addr, "weight": 1, "zone": "z1",
                        "source": "admin"}
    eps = {e["address"]: e for e in get_json(g, "/upstreams/app")["endpoints"]}
    assert eps[b2.addr]["sources"] == ["admin"] and eps[b2.addr]["zone"] == "z1"

    def reached_b2():
        traffic(g, 4)
        return len(b2.paths()) > 0

    assert poll(reached_b2, timeout=10), "no request reached the endpoint added at run time"

    r = admin(g, "DELETE", "/upstreams/app/endpoints/" + b2.addr)
    assert r.status == 204 and r.body == b"", r
    assert b2.addr not in [e["address"] for e in get_json(g, "/upstreams/app")["endpoints"]]

    def none_to_b2():
        seen = len(b2.paths())
        traffic(g, 20)
        return len(b2.paths()) == seen

    assert poll(none_to_b2, timeout=10), "the deleted endpoint still gets requests"
    n1 = len(b1.paths())
    traffic(g, 5)
    assert len(b1.paths()) == n1 + 5


def test_endpoint_errors(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    url = "/upstreams/app/endpoints"
    assert_error(admin(g, "POST", url, b'{"address": "127.0.0.1:9'), 400, "bad_json",
                 "invalid JSON")
    assert_error(admin(g, "POST", url, b"[1,2]"), 400, "bad_request")
    assert_error(admin(g, "POST", url, {"weight": 2}), 400, "bad_request", "address")
    assert_error(admin(g, "POST", url, {"address": "localhost:9000"}), 400, "bad_address",
                 "does not resolve names")
    assert_error(admin(g, "POST", url, {"address": "127.0.0.1"}), 400, "bad_address")
    assert_error(admin(g, "POST", url, {"address": "127.0.0.1:70000"}), 400, "bad_address")
    assert_error(admin(g, "POST", url, {"address": "127.0.0.1:9000", "weight": 0}), 400,
                 "bad_request", "weight")
    assert_error(admin(g, "POST", url, {"address": "127.0.0.1:9000", "colour": "red"}), 400,
                 "bad_request", "unknown key")
    assert_error(admin(g, "POST", "/upstreams/nope/endpoints", {"address": "127.0.0.1:9000"}),
                 404, "unknown_upstream")
    port = free_port()
    ep = {"address": "127.0.0.1:%d" % port}
    assert admin(g, "POST", url, ep).status == 201
    assert_error(admin(g, "POST", url, ep), 409, "already_listed")
    j = assert_error(admin(g, "DELETE", url + "/" + b.addr), 404, "not_admin_endpoint")
    assert "configuration file" in j["message"], j
    assert_error(admin(g, "DELETE", url + "/127.0.0.1:1"), 404, "unknown_endpoint")
    assert_error(admin(g, "DELETE", "/upstreams/nope/endpoints/127.0.0.1:1"), 404,
                 "unknown_upstream")
    # the config's endpoint is still there, the admin one too
    addrs = [e["address"] for e in get_json(g, "/upstreams/app")["endpoints"]]
    assert addrs == [b.addr, ep["address"]]


def test_ipv6_endpoint_literal(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    r = admin(g, "POST", "/upstreams/app/endpoints", {"address": "[0:0::1]:9"})
    assert r.status == 201, r
    assert r.json()["address"] == "[::1]:9"
    assert admin(g, "DELETE", "/upstreams/app/endpoints/%5B::1%5D:9").status == 204


# ---- auth ----


def write_token(tmp_path, text=TOKEN + "\n"):
    p = tmp_path / "admin.token"
    p.write_text(text)
    os.chmod(p, 0o600)
    return str(p)


def test_token_required_off_loopback(gateway, backend, tmp_path):
    b = backend()
    tok = write_token(tmp_path, "  " + TOKEN + "  \nsecond line ignored\n")
    g = gateway(config(admin="0.0.0.0:$PORT_admin", admin_extra="  token_file: %s\n" % tok),
                B1=b.addr)
    for path in ("/status", "/routes", "/upstreams", "/metrics", "/upstreams/app"):
        r = admin(g, "GET", path)
        assert_error(r, 401, "unauthorized")
        assert r.header("WWW-Authenticate", "").startswith("Bearer"), r
    assert_error(admin(g, "GET", "/status", token="wrong"), 401)
    assert_error(admin(g, "GET", "/status", token=TOKEN + "x"), 401)
    assert_error(admin(g, "GET", "/status", headers=[("Authorization", "Basic " + TOKEN)]), 401)
    assert_error(admin(g, "POST", "/drain"), 401)
    assert_error(admin(g, "POST", "/upstreams/app/endpoints", {"address": "127.0.0.1:9"}), 401)
    assert get_json(g, "/status", token=TOKEN)["config"]["generation"] == 1
    r = admin(g, "POST", "/upstreams/app/endpoints", {"address": "127.0.0.1:9"}, token=TOKEN)
    assert r.status == 201, r
    # probes stay open for load balancers
    assert admin(g, "GET", "/live").status == 200
    assert admin(g, "GET", "/ready").status == 200
    # the token never reaches the log
    assert TOKEN not in g.stderr_text()


def test_loopback_without_token_file_needs_no_auth(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    assert admin(g, "GET", "/status").status == 200
    assert admin(g, "GET", "/status", token="anything").status == 200
    assert admin(g, "GET", "/metrics").status == 200


def test_non_loopback_admin_without_token_file_fails_check(tmp_path):
    text = config(admin="0.0.0.0:%d" % free_port()).replace(
        "$PORT_public", str(free_port())).replace("$B1", "127.0.0.1:9")
    path = tmp_path / "sluice.yaml"
    path.write_text(text)
    r = run_cli(["-t", "-c", str(path)])
    assert r.returncode == 1, (r.stdout, r.stderr)
    i = text.index("0.0.0.0:")  # the value of admin.address
    line = text.count("\n", 0, i) + 1
    col = i - (text.rfind("\n", 0, i) + 1) + 1
    assert re.search(r"%s:%d:%d: admin\.address: .*token_file" % (re.escape(str(path)), line,
                                                                  col), r.stderr), r.stderr


def test_empty_token_file_fails_start(gateway, backend, tmp_path):
    b = backend()
    tok = write_token(tmp_path, "\n")
    g = gateway(config(admin_extra="  token_file: %s\n" % tok), wait=False, B1=b.addr)
    assert g.wait_exit(10) == 1, g.diag()
    assert "token_file" in g.stderr_text() and "empty" in g.stderr_text()


def test_admin_address_in_use_fails_start(gateway, backend):
    b = backend()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        g = gateway(config(admin="127.0.0.1:%d" % port), wait=False, B1=b.addr)
        assert g.wait_exit(10) == 1, g.diag()
        assert re.search(r"admin: cannot listen on 127\.0\.0\.1:%d: Address already in use"
                         % port, g.stderr_text()), g.diag()
    finally:
        taken.close()


# ---- reload and drain ----


NEW_ROUTE = ("  - name: new\n"
             "    match: {path: /new}\n"
             "    direct_response: {status: 200, body: \"new route\"}\n")


def test_reload_serves_new_route_and_rejects_bad_edit(gateway, backend):
    b = backend()
    g = gateway(config(routes="  - name: all\n    match: {path_prefix: /app}\n"
                              "    upstream: app\n"), B1=b.addr)
    assert g.request("GET", "/new").status == 404
    text = open(g.config_path).read()
    good = text.replace("routes:\n", "routes:\n" + NEW_ROUTE)
    with open(g.config_path, "w") as f:
        f.write(good)
    r = admin(g, "POST", "/reload")
    assert r.status == 200, r
    assert r.json() == {"status": "reloaded", "generation": 2}
    r = g.request("GET", "/new")
    assert r.status == 200 and r.body == b"new route", r
    s = get_json(g, "/status")
    assert s["config"]["generation"] == 2 and s["reloads"]["ok"] == 1
    assert s["reloads"]["last_at"] and s["reloads"]["last_error"] is None
    assert "new" in [x["name"] for x in get_json(g, "/routes")]

    bad = good.replace("    upstream: app\n", "    upstream: missing\n")
    with open(g.config_path, "w") as f:
        f.write(bad)
    r = admin(g, "POST", "/reload")
    assert r.status == 400, r
    j = r.json()
    assert j["status"] == "rejected", j
    assert re.search(r"%s:\d+:\d+: routes\[1\]\.upstream" % re.escape(g.config_path),
                     j["errors"]), j
    r = g.request("GET", "/new")
    assert r.status == 200 and r.body == b"new route", r
    assert g.request("GET", "/app/x").status == 200
    s = get_json(g, "/status")
    assert s["config"]["generation"] == 2
    assert s["reloads"]["failed"] == 1 and "missing" in s["reloads"]["last_error"]


def test_admin_endpoints_survive_reload(gateway, backend):
    b1, b2 = backend(), backend()
    g = gateway(config(), B1=b1.addr)
    assert admin(g, "POST", "/upstreams/app/endpoints", {"address": b2.addr}).status == 201
    text = open(g.config_path).read()
    with open(g.config_path, "w") as f:
        f.write(text.replace("routes:\n", "routes:\n" + NEW_ROUTE))
    assert admin(g, "POST", "/reload").status == 200
    eps = {e["address"]: e for e in get_json(g, "/upstreams/app")["endpoints"]}
    assert eps[b2.addr]["sources"] == ["admin"], eps

    def reached_b2():
        traffic(g, 4)
        return len(b2.paths()) > 0

    assert poll(reached_b2, timeout=10), "the admin endpoint lost its traffic after a reload"
    assert admin(g, "DELETE", "/upstreams/app/endpoints/" + b2.addr).status == 204


def test_drain_turns_ready_503_then_exits_0(gateway, backend):
    b = backend()
    g = gateway(config(extra="drain:\n  grace: 2s\n"), B1=b.addr)
    r = admin(g, "POST", "/drain")
    assert r.status == 202 and r.json() == {"status": "draining"}, r
    r = admin(g, "GET", "/ready")
    assert r.status == 503 and r.json() == {"status": "draining"}, r
    assert get_json(g, "/status")["draining"] is True
    assert admin(g, "GET", "/live").status == 200
    assert g.wait_exit(10) == 0, g.diag()
    assert "admin API" in g.stderr_text()


# ---- browsers on the admin's host ----


def test_cross_origin_requests_are_refused(gateway, backend, tmp_path):
    b = backend()
    g = gateway(config(), B1=b.addr)
    evil = [("Origin", "http://evil.example")]
    assert_error(admin(g, "POST", "/drain", headers=evil), 403, "cross_origin")
    assert_error(admin(g, "POST", "/upstreams/app/endpoints", {"address": "127.0.0.1:9"},
                       headers=evil), 403, "cross_origin")
    assert_error(admin(g, "GET", "/status", headers=[("Origin", "null")]), 403, "cross_origin")
    # the status page's own fetches come from the same origin
    same = [("Host", "127.0.0.1:%d" % g.ports["admin"]),
            ("Origin", "http://127.0.0.1:%d" % g.ports["admin"])]
    assert admin(g, "GET", "/status", headers=same).status == 200
    assert get_json(g, "/ready") == {"status": "ready"}
    # with a token too
    tok = write_token(tmp_path, TOKEN + "\n")
    g2 = gateway(config(admin_extra="  token_file: %s\n" % tok), B1=b.addr)
    assert_error(admin(g2, "GET", "/status", token=TOKEN, headers=evil), 403, "cross_origin")


def test_dns_rebinding_host_is_refused_without_token(gateway, backend, tmp_path):
    b = backend()
    g = gateway(config(), B1=b.addr)
    for host in ("evil.example", "evil.example:%d" % g.ports["admin"], "127.0.0.1.nip.io"):
        assert_error(admin(g, "GET", "/status", headers=[("Host", host)]), 403, "bad_host")
    for host in ("127.0.0.1", "127.0.0.1:%d" % g.ports["admin"], "localhost:80", "[::1]:8080",
                 "[::1]", "LOCALHOST"):
        assert admin(g, "GET", "/status", headers=[("Host", host)]).status == 200, host
    # a token already stops a rebinding page, so any name is accepted with it
    tok = write_token(tmp_path, TOKEN + "\n")
    g2 = gateway(config(admin_extra="  token_file: %s\n" % tok), B1=b.addr)
    r = admin(g2, "GET", "/status", token=TOKEN, headers=[("Host", "admin.internal")])
    assert r.status == 200, r


def test_post_endpoint_needs_json_content_type(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    body = json.dumps({"address": "127.0.0.1:9"}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        assert_error(admin(g, "POST", "/upstreams/app/endpoints", body,
                           headers=[("Content-Type", ctype)]), 415, "unsupported_media_type")
    with RawClient(g.ports["admin"], timeout=10) as c:
        c.send(build_request("POST", "/upstreams/app/endpoints", [], body, host="127.0.0.1"))
        assert_error(c.read_response(timeout=10), 415)
    r = admin(g, "POST", "/upstreams/app/endpoints", body,
              headers=[("Content-Type", "Application/JSON; charset=utf-8")])
    assert r.status == 201, r


def test_admin_connections_are_capped(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    held = []
    try:
        for _ in range(64):
            c = RawClient(g.ports["admin"], timeout=10)
            held.append(c)
            # an answer shows the connection was accepted (and stays open: keep-alive)
            c.send(build_request("GET", "/live", host="127.0.0.1"))
            assert c.read_response(timeout=10).status == 200
        for _ in range(3):
            with RawClient(g.ports["admin"], timeout=10) as c:
                closed, extra = c.wait_closed(timeout=5)
                assert closed and extra == b"", "a connection over the cap stayed open"
    finally:
        for s in held:
            s.close()
    assert poll(lambda: admin(g, "GET", "/live").status == 200, timeout=5)
    s = get_json(g, "/status")
    assert s["admin"]["refused_connections"] == 3, s
    text = g.stderr_text()
    assert text.count("closing new ones until one ends") == 1, text
    assert "accepting connections again (3 closed at once meanwhile)" in text, text


def test_zone_must_be_a_config_name(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    url = "/upstreams/app/endpoints"
    for zone in ("a\n2026-11-28T00:00:00Z INFO forged", "", "x" * 65, "a b", "zone/1", 5):
        assert_error(admin(g, "POST", url, {"address": "127.0.0.1:9000", "zone": zone}), 400,
                     "bad_zone")
    assert "forged" not in g.stderr_text()
    r = admin(g, "POST", url, {"address": "127.0.0.1:9000", "zone": "eu-west_1." + "z" * 54})
    assert r.status == 201, r


def test_admin_endpoints_per_upstream_are_capped(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    url = "/upstreams/app/endpoints"
    with RawClient(g.ports["admin"], timeout=30) as c:
        for i in range(1000):
            body = json.dumps({"address": "127.0.%d.%d:9" % (i // 250, i % 250 + 1)}).encode()
            c.send(build_request("POST", url, [("Content-Type", "application/json")], body,
                                 host="127.0.0.1"))
            r = c.read_response(timeout=30)
            assert r.status == 201, (i, r)
    assert_error(admin(g, "POST", url, {"address": "127.0.9.1:9"}), 409, "too_many_endpoints")
    assert admin(g, "DELETE", url + "/127.0.0.1:9").status == 204
    assert admin(g, "POST", url, {"address": "127.0.9.1:9"}).status == 201


def test_reload_errors_cut_mid_character_are_reported(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    text = open(g.config_path).read()
    # the config quotes at most 64 bytes of a bad name: the 64th is the first byte of an é
    name = "a" + "\u00e9" * 40
    with open(g.config_path, "w", encoding="utf-8") as f:
        f.write(text.replace("    upstream: app\n", "    upstream: %s\n" % name))
    r = admin(g, "POST", "/reload")
    assert r.status == 400, r
    j = r.json()
    assert j["status"] == "rejected", j
    assert "routes[0].upstream" in j["errors"] and "a" + "\u00e9" * 31 + "?" in j["errors"], j
    s = get_json(g, "/status")
    assert s["reloads"]["failed"] == 1, s
    assert "a" + "\u00e9" * 31 + "?" in s["reloads"]["last_error"], s


def test_error_messages_with_bad_utf8_are_kept(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    r = admin(g, "GET", "/upstreams/%C3%A9%C3")
    j = assert_error(r, 404, "unknown_upstream")
    assert "\u00e9?" in j["message"], j
    r = admin(g, "DELETE", "/upstreams/app/endpoints/%FF%0A1.2.3.4:5")
    assert r.status in (400, 404), r
    assert "?\n1.2.3.4:5" in r.json()["message"], r


def test_head_metrics_does_not_render(gateway, backend):
    b = backend()
    g = gateway(config(), B1=b.addr)
    with RawClient(g.ports["admin"], timeout=10) as c:
        for _ in range(2):  # the connection stays usable after a bodiless HEAD
            c.send(build_request("HEAD", "/metrics", host="127.0.0.1"))
            r = c.read_response(timeout=10, head=True)
            assert r.status == 200 and r.body == b"", r
            assert r.header("Content-Type").startswith("text/plain; version=0.0.4"), r
            # a rendered exposition would announce its length: none was rendered
            assert not r.has_header("Content-Length"), r
            assert r.header("Cache-Control") == "no-store", r
        c.send(build_request("GET", "/metrics", host="127.0.0.1"))
        r = c.read_response(timeout=10)
        assert r.status == 200 and b"sluice_event_loop_lag_max_seconds" in r.body, r


def test_token_file_with_bom_is_accepted(gateway, backend, tmp_path):
    b = backend()
    tok = write_token(tmp_path, "\ufeff" + TOKEN + "\r\n")
    g = gateway(config(admin_extra="  token_file: %s\n" % tok), B1=b.addr)
    assert get_json(g, "/status", token=TOKEN)["pid"] == g.pid
    assert_error(admin(g, "GET", "/status", token="\xef\xbb\xbf" + TOKEN), 401)


def test_token_file_that_is_a_directory_reports_the_error(gateway, backend, tmp_path):
    b = backend()
    d = tmp_path / "tokdir"
    d.mkdir()
    g = gateway(config(admin_extra="  token_file: %s\n" % d), wait=False, B1=b.addr)
    assert g.wait_exit(10) == 1, g.diag()
    assert "token_file %s: Is a directory" % d in g.stderr_text(), g.diag()
    assert "empty" not in g.stderr_text(), g.diag()


@pytest.mark.parametrize("token,byte", [("abc\x01def", "0x01"), ("abc\tdef", "0x09"),
                                        ("abc\x00def", "0x00"), ("abc\x7fdef", "0x7f")])
def test_token_with_control_character_fails_start(gateway, backend, tmp_path, token, byte):
    b = backend()
    tok = write_token(tmp_path, token + "\n")
    g = gateway(config(admin_extra="  token_file: %s\n" % tok), wait=False, B1=b.addr)
    assert g.wait_exit(10) == 1, g.diag()
    assert "control character (byte %s at offset 3" % byte in g.stderr_text(), g.diag()


def many_routes(n):
    return "".join("  - name: r%d\n"
                   "    match: {path: /r%d}\n"
                   "    direct_response: {status: 200, body: r%d}\n" % (i, i, i)
                   for i in range(n))


def gateway_with_routes_on_disk(gateway, backend, n):
    """A gateway whose config file now holds `n` more routes, for the next reload to parse."""
    b = backend()
    g = gateway(config(), B1=b.addr)
    text = open(g.config_path).read()
    with open(g.config_path, "w") as f:
        f.write(text.replace("routes:\n", "routes:\n" + many_routes(n)))
    return g


def test_live_answers_during_a_slow_reload(gateway, backend):
    g = gateway_with_routes_on_disk(gateway, backend, 20000)
    with RawClient(g.ports["admin"], timeout=60) as c:
        c.send(build_request("POST", "/reload", host="127.0.0.1"))
        started = time.monotonic()
        slowest = 0.0
        probes = 0
        # probe /live on fresh connections until the reload answers
        while True:
            t0 = time.monotonic()
            r = admin(g, "GET", "/live")
            slowest = max(slowest, time.monotonic() - t0)
            probes += 1
            assert r.status == 200, r
            if probes == 1:
                r2 = admin(g, "POST", "/reload")
                second = r2.status
            if select.select([c.sock], [], [], 0.01)[0] or time.monotonic() - started > 60:
                break
        took = time.monotonic() - started
        r = c.read_response(timeout=60)
    assert r.status == 200 and r.json() == {"status": "reloaded", "generation": 2}, r
    assert slowest < 0.2, (slowest, probes, took)
    assert probes >= 2, "the reload was too quick to show anything (%.3f s)" % took
    # a second reload while one runs is refused, not queued behind it
    assert second == 409, second
    s = get_json(g, "/status")
    assert s["config"]["generation"] == 2 and s["reloads"]["ok"] == 1, s
    assert g.request("GET", "/r19999").body == b"r19999"


def test_client_leaving_during_reload_does_not_break_it(gateway, backend):
    g = gateway_with_routes_on_disk(gateway, backend, 5000)
    with RawClient(g.ports["admin"], timeout=10) as c:
        c.send(build_request("POST", "/reload", host="127.0.0.1"))
    assert poll(lambda: get_json(g, "/status")["config"]["generation"] == 2, timeout=30)
    r = admin(g, "POST", "/reload")
    assert r.status == 200 and r.json()["generation"] == 3, r
