"""Routing table: host (exact, wildcard, any), path (exact, prefix on segment boundaries),
methods, header equality, precedence, listener scoping, prefix stripping/rewriting, header
operations, direct responses and the 404 for no match.

Direct-response routes answer with their own name as the body, so the winner of each lookup
is visible to the client."""

import pytest

from client import assert_gateway_error

CONFIG = r"""
workers: 2
drain_timeout: 3s
log_level: info
listeners:
  - name: public
    address: 127.0.0.1:$PORT_public
  - name: bare
    address: 127.0.0.1:$PORT_bare
upstreams:
  - name: echo
    endpoints:
      - {address: $B1}
routes:
  # --- host precedence (all with the same path condition) ---
  - name: host-any
    listeners: [public]
    match: {path_prefix: /}
    direct_response: {status: 200, body: "host-any"}
  - name: host-wild
    listeners: [public]
    match: {host: "*.example.com", path_prefix: /}
    direct_response: {status: 200, body: "host-wild"}
  - name: host-wild-longer
    listeners: [public]
    match: {host: "*.deep.example.com", path_prefix: /}
    direct_response: {status: 200, body: "host-wild-longer"}
  - name: host-exact
    listeners: [public]
    match: {host: api.example.com, path_prefix: /}
    direct_response: {status: 200, body: "host-exact"}
  # --- path precedence within one host ---
  - name: p-root
    match: {host: paths.test, path_prefix: /}
    direct_response: {status: 200, body: "p-root"}
  - name: p-users
    match: {host: paths.test, path_prefix: /users}
    direct_response: {status: 200, body: "p-users"}
  - name: p-exact
    match: {host: paths.test, path: /users}
    direct_response: {status: 200, body: "p-exact"}
  - name: p-users-admin
    match: {host: paths.test, path_prefix: /users/admin}
    direct_response: {status: 200, body: "p-users-admin"}
  # --- methods ---
  - name: m-fallback
    match: {host: methods.test, path_prefix: /}
    direct_response: {status: 200, body: "m-fallback"}
  - name: m-get
    match: {host: methods.test, path: /m, methods: [GET, HEAD]}
    direct_response: {status: 200, body: "m-get"}
  - name: m-post
    match: {host: methods.test, path: /m, methods: [POST]}
    direct_response: {status: 200, body: "m-post"}
  - name: m-purge
    match: {host: methods.test, path: /m, methods: [PURGE]}
    direct_response: {status: 200, body: "m-purge"}
  # --- header equality; more conditions first ---
  - name: h-plain
    match: {host: headers.test, path: /h}
    direct_response: {status: 200, body: "h-plain"}
  - name: h-v2
    match: {host: headers.test, path: /h, headers: {X-Version: "2"}}
    direct_response: {status: 200, body: "h-v2"}
  - name: h-v2-beta
    match: {host: headers.test, path: /h, headers: {X-Version: "2", X-Beta: "1"}}
    direct_response: {status: 200, body: "h-v2-beta"}
  # --- direct responses ---
  - name: health
    listeners: [public]
    match: {path: /healthz}
    direct_response: {status: 200, body: "ok\n", content_type: text/plain}
  - name: teapot
    listeners: [public]
    match: {path: /teapot}
    direct_response: {status: 418, body: '{"short":"stout"}', content_type: application/json}
  # --- upstream routes: path rewriting and header operations ---
  - name: rw-plain
    match: {host: rw.test, path_prefix: /}
    upstream: echo
  - name: rw-strip
    match: {host: rw.test, path_prefix: /strip}
    upstream: echo
    strip_prefix: true
  - name: rw-rewrite
    match: {host: rw.test, path_prefix: /old}
    upstream: echo
    rewrite_prefix: /new
  - name: rw-headers
    match: {host: rw.test, path_prefix: /hdr}
    upstream: echo
    request_headers: {set: {X-Gateway: sluice}, add: {X-Extra: a}, remove: [X-Internal]}
    response_headers: {set: {X-Frame-Options: DENY}, remove: [Server]}
  # --- only on the second listener ---
  - name: bare-only
    listeners: [bare]
    match: {path: /only}
    direct_response: {status: 200, body: "bare-only"}
"""


@pytest.fixture(scope="module")
def gw(module_gateway_factory, module_backend):
    b = module_backend()
    g = module_gateway_factory.start(CONFIG, B1=b.addr)
    g.backend = b
    return g


def route_of(gw, host, target="/", method="GET", headers=(), listener=None):
    r = gw.request(method, target, list(headers), host=host, listener=listener)
    assert r.status == 200, r
    return r.body.decode()


@pytest.mark.parametrize(
    "host,expected",
    [
        ("api.example.com", "host-exact"),
        ("API.Example.COM", "host-exact"),  # host names compare case-insensitively
        ("api.example.com:8080", "host-exact"),  # port is not part of the match
        ("www.example.com", "host-wild"),
        ("x.deep.example.com", "host-wild-longer"),  # longer wildcard suffix first
        ("example.com", "host-any"),  # "*.example.com" needs at least one more label
        ("api.example.com.evil.org", "host-any"),
        ("other.org", "host-any"),
    ],
)
def test_host_precedence(gw, host, expected):
    assert route_of(gw, host, "/some/path") == expected


@pytest.mark.parametrize(
    "target,expected",
    [
        ("/users", "p-exact"),
        ("/users?x=1", "p-exact"),  # the query is not part of the path
        ("/users/", "p-users"),
        ("/users/42", "p-users"),
        ("/usersx", "p-root"),  # prefix matches on segment boundaries only
        ("/users/admin", "p-users-admin"),  # longest prefix wins
        ("/users/admin/x", "p-users-admin"),
        ("/users/adminx", "p-users"),
        ("/", "p-root"),
        ("/other", "p-root"),
    ],
)
def test_path_precedence(gw, target, expected):
    assert route_of(gw, "paths.test", target) == expected


def test_host_condition_outranks_path_condition(gw):
    # router.h: host specificity is compared first, then path. An exact-host route with
    # prefix "/" beats an any-host route with the exact path /healthz.
    assert route_of(gw, "api.example.com", "/healthz") == "host-exact"
    assert gw.request("GET", "/healthz", host="nohost.test").body == b"ok\n"


@pytest.mark.parametrize(
    "method,expected",
    [
        ("GET", "m-get"),
        ("HEAD", None),
        ("POST", "m-post"),
        ("PURGE", "m-purge"),  # a method outside the well-known set
        ("PUT", "m-fallback"),  # host/path match but methods do not: next candidate
        ("DELETE", "m-fallback"),
    ],
)
def test_methods(gw, method, expected):
    if method == "HEAD":
        r = gw.request("HEAD", "/m", host="methods.test")
        assert r.status == 200 and r.body == b""
        assert r.header("content-length") == str(len("m-get")), r
        return
    assert route_of(gw, "methods.test", "/m", method=method) == expected


@pytest.mark.parametrize(
    "headers,expected",
    [
        ([("X-Version", "2")], "h-v2"),
        ([("x-version", "2")], "h-v2"),  # header names are case-insensitive
        ([("X-Version", "2"), ("X-Beta", "1")], "h-v2-beta"),  # more conditions first
        ([("X-Beta", "1")], "h-plain"),
        ([("X-Version", "3")], "h-plain"),
        ([("X-Version", "22")], "h-plain"),
        ([], "h-plain"),
    ],
)
def test_header_match(gw, headers, expected):
    assert route_of(gw, "headers.test", "/h", headers=headers) == expected


def test_direct_response_status_body_and_type(gw):
    r = gw.request("GET", "/healthz", host="x.test")
    assert r.status == 200
    assert r.body == b"ok\n"
    assert r.header("content-type", "").split(";")[0] == "text/plain"
    assert r.header("content-length") == "3"
    r = gw.request("GET", "/teapot", host="x.test")
    assert r.status == 418
    assert r.body == b'{"short":"stout"}'
    assert r.header("content-type", "").split(";")[0] == "application/json"
    assert not [p for p in gw.backend.paths() if p in ("/healthz", "/teapot")]


def test_direct_response_default_content_type(gw):
    r = gw.request("GET", "/", host="www.example.com")
    assert r.body == b"host-wild"
    assert r.header("content-type", "").split(";")[0] == "text/plain"


def test_no_match_is_404_json_with_request_id(gw):
    r = gw.request("GET", "/nothing/here", listener="bare", host="x.test")
    doc = assert_gateway_error(r, 404)
    assert doc.get("status", 404) == 404


def test_routes_are_scoped_to_listeners(gw):
    # /only is on `bare` only; /healthz on `public` only.
    assert route_of(gw, "x.test", "/only", listener="bare") == "bare-only"
    assert route_of(gw, "x.test", "/only") == "host-any"
    assert_gateway_error(gw.request("GET", "/healthz", listener="bare", host="x.test"), 404)


def test_request_ids_differ_between_404s(gw):
    a = gw.request("GET", "/nope", listener="bare", host="x.test")
    b = gw.request("GET", "/nope", listener="bare", host="x.test")
    assert a.header("x-request-id") and a.header("x-request-id") != b.header("x-request-id")


def backend_view(gw, target, headers=(), method="GET"):
    r = gw.request(method, target, list(headers), host="rw.test")
    assert r.status == 200, r
    return r, r.json()


@pytest.mark.parametrize(
    "target,path,query",
    [
        ("/plain/a", "/plain/a", ""),
        ("/strip/a/b", "/a/b", ""),
        ("/strip", "/", ""),
        ("/strip/", "/", ""),
        ("/strip/a?x=1&y=2", "/a", "x=1&y=2"),
        ("/stripx/a", "/stripx/a", ""),  # not under the prefix: the plain route, untouched
        ("/old/x?y=1", "/new/x", "y=1"),
        ("/old", "/new", ""),
        ("/old/", "/new/", ""),
        ("/old/a/b/c", "/new/a/b/c", ""),
    ],
)
def test_strip_and_rewrite_prefix(gw, target, path, query):
    _, doc = backend_view(gw, target)
    assert doc["path"] == path, doc
    assert doc["query"] == query, doc


def test_request_header_operations(gw):
    _, doc = backend_view(
        gw,
        "/hdr/x",
        [("X-Gateway", "client"), ("X-Extra", "z"), ("X-Internal", "secret"),
         ("x-internal", "again"), ("X-Keep", "kept")],
    )
    hs = doc["headers"]
    low = [(k.lower(), v) for k, v in hs]
    assert [v for k, v in low if k == "x-gateway"] == ["sluice"], hs  # set replaces
    assert sorted(v for k, v in low if k == "x-extra") == ["a", "z"], hs  # add appends
    assert [v for k, v in low if k == "x-internal"] == [], hs  # remove, any case
    assert ("x-keep", "kept") in low, hs


def test_response_header_operations(gw):
    r, doc = backend_view(gw, "/hdr/y?rh=X-Frame-Options:SAMEORIGIN&rh=X-Other:1")
    assert r.headers_all("x-frame-options") == ["DENY"], r.headers
    assert r.header("server") is None, r.headers  # removed (the peer sets it)
    assert r.header("x-other") == "1"
    # Without the route's operations the peer's headers come through untouched.
    r2, _ = backend_view(gw, "/plain?rh=X-Frame-Options:SAMEORIGIN")
    assert r2.headers_all("x-frame-options") == ["SAMEORIGIN"]
    assert r2.header("server") == "sluice-test-peer"
