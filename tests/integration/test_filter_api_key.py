"""api_key filter against the real binary: keys by header and query, consumers declared by
plain key or SHA-256, the 401/403 answers, and what reaches the backend (key header stripped,
X-Consumer set by the gateway only)."""

import hashlib

import pytest

from client import assert_gateway_error
from filter_peers import backend_headers, error_of, filter_config, hvalues, route

MOBILE_KEY = "mobile-key-0123456789abcdef"
PARTNER_KEY = "partner-key-fedcba9876543210"
INTERN_KEY = "intern-key-00112233"

CONSUMERS = """\
consumers:
  - {name: mobile-app, api_key: "%s"}
  - {name: partner, api_key_sha256: "%s"}
  - {name: intern, api_key: "%s"}
""" % (MOBILE_KEY, hashlib.sha256(PARTNER_KEY.encode()).hexdigest(), INTERN_KEY)


@pytest.fixture(scope="module")
def gw(module_gateway_factory, module_backend):
    b = module_backend()
    routes = (route("header", "/h", ["api_key: {}"])
              + route("query", "/q", ["api_key: {query: api_key}"])
              + route("only", "/only", ["api_key: {consumers: [mobile-app, partner]}"])
              + route("keep", "/keep", ["api_key: {strip: false, consumer_header: X-Who}"]))
    return module_gateway_factory.start(filter_config(routes=routes, top=CONSUMERS), B1=b.addr)


def test_header_key_accepted(gw):
    r = gw.request("GET", "/h/x", [("X-API-Key", MOBILE_KEY)])
    assert r.status == 200, r
    assert r.json()["path"] == "/h/x"


def test_query_key_accepted(gw):
    r = gw.request("GET", "/q/x?api_key=" + MOBILE_KEY)
    assert r.status == 200, r
    assert hvalues(backend_headers(r), "X-Consumer") == ["mobile-app"]


def test_header_checked_before_query(gw):
    # Header first: a bad header key is not rescued by a good query key.
    r = gw.request("GET", "/q/x?api_key=" + MOBILE_KEY, [("X-API-Key", "wrong-key-123456")])
    assert r.status == 401, r
    assert error_of(r) == "invalid_api_key"


def test_sha256_consumer_accepted(gw):
    r = gw.request("GET", "/h/x", [("X-API-Key", PARTNER_KEY)])
    assert r.status == 200, r
    assert hvalues(backend_headers(r), "X-Consumer") == ["partner"]


def test_unknown_key_is_401_invalid_api_key(gw):
    r = gw.request("GET", "/h/x", [("X-API-Key", "not-a-known-key-at-all")])
    doc = assert_gateway_error(r, 401)
    assert doc["error"] == "invalid_api_key", doc
    assert r.header("www-authenticate") == "ApiKey", r
    assert b"not-a-known-key-at-all" not in r.body


def test_missing_key_is_401_missing_api_key(gw):
    r = gw.request("GET", "/h/x")
    doc = assert_gateway_error(r, 401)
    assert doc["error"] == "missing_api_key", doc
    assert r.header("www-authenticate") == "ApiKey", r
    # An empty header counts as missing.
    r = gw.request("GET", "/h/x", [("X-API-Key", "")])
    assert r.status == 401 and error_of(r) == "missing_api_key", r


def test_query_route_missing_key(gw):
    r = gw.request("GET", "/q/x?other=1")
    assert r.status == 401 and error_of(r) == "missing_api_key", r


def test_consumer_not_in_list_is_403(gw):
    r = gw.request("GET", "/only/x", [("X-API-Key", INTERN_KEY)])
    doc = assert_gateway_error(r, 403)
    assert doc["error"] == "consumer_not_allowed", doc
    for key, name in ((MOBILE_KEY, "mobile-app"), (PARTNER_KEY, "partner")):
        r = gw.request("GET", "/only/x", [("X-API-Key", key)])
        assert r.status == 200, r
        assert hvalues(backend_headers(r), "X-Consumer") == [name]


def test_key_header_stripped_and_consumer_set(gw):
    r = gw.request("GET", "/h/x", [("X-API-Key", MOBILE_KEY), ("X-Consumer", "admin"),
                                   ("x-consumer", "root")])
    assert r.status == 200, r
    got = backend_headers(r)
    assert hvalues(got, "X-API-Key") == [], got
    assert hvalues(got, "X-Consumer") == ["mobile-app"], got
    assert not any(MOBILE_KEY in v for _, v in got), got


def test_strip_false_keeps_key_and_custom_consumer_header(gw):
    r = gw.request("GET", "/keep/x", [("X-API-Key", INTERN_KEY), ("X-Who", "forged")])
    assert r.status == 200, r
    got = backend_headers(r)
    assert hvalues(got, "X-API-Key") == [INTERN_KEY], got
    assert hvalues(got, "X-Who") == ["intern"], got
    assert hvalues(got, "X-Consumer") == [], got


def test_many_keys_on_one_connection(gw):
    """Alternating good and bad keys on one keep-alive connection: each answered on its own."""
    with gw.connect() as c:
        for i in range(50):
            key = [MOBILE_KEY, "bogus-key-%08d" % i, PARTNER_KEY][i % 3]
            r = c.request("GET", "/h/%d" % i, [("X-API-Key", key)])
            assert r.status == (401 if i % 3 == 1 else 200), (i, r)
