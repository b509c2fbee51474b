"""rate_limit filter against the real binary: the GCRA budget (burst + 1 at once, then the
rate), the 429 answer and RateLimit-* headers, every kind of key, default_filters, accuracy
under concurrent load across workers, fixed memory under a flood of distinct keys, and the
global scope on a real redis-server shared by two gateways, including Redis dying or hanging
mid-test (on_redis_error allow / deny) and coming back."""

import time

import pytest

from client import assert_gateway_error
from filter_peers import (HMAC_SECRET, KeepAliveClient, bearer, claims, direct_route,
                          error_of, filter_config, hammer, make_token, pipeline_flood, pipelined,
                          q, redis_server, request_from, route)
from helpers import is_sanitizer_build, poll

assert redis_server  # fixture, used by the global-scope tests

CONSUMERS = """\
consumers:
  - {name: team-a, api_key: "team-a-key-0123456789"}
  - {name: team-b, api_key: "team-b-key-0123456789"}
"""


def rl(**kw):
    return "rate_limit: {%s}" % ", ".join("%s: %s" % i for i in kw.items())


def one_route(gateway, backend, filters, direct=True, workers=1, top="", **kw):
    if direct:
        routes = direct_route("all", "/", filters)
    else:
        routes = route("all", "/", filters)
    b = backend()
    return gateway(filter_config(routes=routes, workers=workers, top=top, **kw), B1=b.addr)


def statuses(resps):
    return [r.status for r in resps]


def assert_limited(r):
    """A 429 as the spec describes it."""
    doc = assert_gateway_error(r, 429)
    assert doc["error"] == "rate_limited", doc
    ra = r.header("retry-after")
    assert ra is not None and ra.isdigit() and int(ra) >= 1, r
    for h in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"):
        v = r.header(h)
        assert v is not None, (h, r)
        assert v.split(",")[0].split(";")[0].strip().isdigit(), (h, v)
    assert int(r.header("RateLimit-Remaining").split(",")[0].split(";")[0]) == 0, r
    return int(ra)


def count_until_limited(get, limit=50):
    """Sends get() until a 429; returns how many passed before it."""
    for i in range(limit):
        r = get()
        if r.status == 429:
            return i
        assert r.status == 200, r
    raise AssertionError("never limited after %d requests" % limit)


# ---- local -------------------------------------------------------------------------------------


def test_burst_then_429_with_headers(gateway, backend):
    g = one_route(gateway, backend, [rl(rate="10/s", burst=5)])
    resps = pipelined(g.port, 20)
    st = statuses(resps)
    assert st.count(200) == 6, st
    assert st[:6] == [200] * 6, st
    assert st.count(429) == 14, st
    for r in resps[6:]:
        assert_limited(r)
    # headers: true (default): allowed answers carry the RateLimit-* fields too.
    rem = []
    for r in resps[:6]:
        assert r.header("RateLimit-Limit") is not None, r
        assert r.header("RateLimit-Reset") is not None, r
        rem.append(int(r.header("RateLimit-Remaining").split(",")[0].split(";")[0]))
    assert rem == sorted(rem, reverse=True) and rem[-1] == 0, rem


def test_passes_again_after_waiting(gateway, backend):
    g = one_route(gateway, backend, [rl(rate="10/s", burst=5)])
    resps = pipelined(g.port, 10)
    assert statuses(resps).count(429) >= 3
    ra = assert_limited(resps[-1])
    t0 = time.monotonic()
    assert poll(lambda: g.request("GET", "/").status == 200, ra + 2.0, interval=0.02)
    # 10/s: one request per 100 ms comes back, long before Retry-After's whole second ends.
    assert time.monotonic() - t0 <= ra + 0.5
    # Idle for the whole burst window: burst + 1 again.
    time.sleep(0.8)  # waiting for time to pass is the behaviour under test
    assert statuses(pipelined(g.port, 10)).count(200) == 6


def test_headers_false_only_on_429(gateway, backend):
    g = one_route(gateway, backend, [rl(rate="1/m", burst=0, headers="false")])
    r1, r2 = pipelined(g.port, 2)
    assert r1.status == 200 and r1.header("RateLimit-Limit") is None, r1
    assert_limited(r2)


def test_rate_per_minute_retry_after(gateway, backend):
    g = one_route(gateway, backend, [rl(rate="2/m", burst=1)])
    st = pipelined(g.port, 4)
    assert statuses(st) == [200, 200, 429, 429], st
    ra = assert_limited(st[2])
    assert 20 <= ra <= 31, ra  # 2/m: the next slot is ~30 s away


def test_key_ip_separate_clients(gateway, backend):
    g = one_route(gateway, backend, [rl(rate="1/m", burst=2, key="ip")])
    a = count_until_limited(lambda: request_from("127.0.0.1", g.port,
                                                 headers=[("X-Tenant", "x")]))
    assert a == 3
    # Another client address has its own budget; a header does not change the ip key.
    assert count_until_limited(lambda: request_from("127.0.0.2", g.port)) == 3
    assert request_from("127.0.0.1", g.port, headers=[("X-Tenant", "y")]).status == 429


def test_key_header_tenants_separate(gateway, backend):
    g = one_route(gateway, backend, [rl(rate="1/m", burst=2, key="header:X-Tenant")])
    for tenant in ("acme", "globex", "ACME"):
        n = count_until_limited(lambda: g.request("GET", "/", [("X-Tenant", tenant)]))
        assert n == 3, tenant
    # No header: one shared bucket with the empty value.
    assert count_until_limited(lambda: g.request("GET", "/")) == 3
    assert g.request("GET", "/", [("X-Tenant", "acme")]).status == 429


def test_key_consumer_with_api_key(gateway, backend):
    g = one_route(gateway, backend,
                  ["api_key: {}", rl(rate="1/m", burst=1, key="consumer")], top=CONSUMERS)
    for key in ("team-a-key-0123456789", "team-b-key-0123456789"):
        assert count_until_limited(lambda: g.request("GET", "/", [("X-API-Key", key)])) == 2
    # An unknown key is refused by api_key before it can spend anyone's budget.
    r = g.request("GET", "/", [("X-API-Key", "nobody-key-000000")])
    assert r.status == 401, r


def test_key_jwt_sub(gateway, backend):
    g = one_route(gateway, backend,
                  ["jwt: {secret: %s}" % q(HMAC_SECRET), rl(rate="1/m", burst=1, key="jwt:sub")])
    # Two different tokens of one subject share its budget.
    t1 = make_token("HS256", claims(sub="alice", jti="1"))
    t2 = make_token("HS256", claims(sub="alice", jti="2"))
    assert g.request("GET", "/", bearer(t1)).status == 200
    assert g.request("GET", "/", bearer(t2)).status == 200
    assert_limited(g.request("GET", "/", bearer(t1)))
    bob = make_token("HS256", claims(sub="bob"))
    assert count_until_limited(lambda: g.request("GET", "/", bearer(bob))) == 2


def test_key_list_combined(gateway, backend):
    g = one_route(gateway, backend, [rl(rate="1/m", burst=0, key="[ip, header:X-Tenant]")])
    assert g.request("GET", "/", [("X-Tenant", "a")]).status == 200
    assert g.request("GET", "/", [("X-Tenant", "a")]).status == 429
    assert g.request("GET", "/", [("X-Tenant", "b")]).status == 200
    assert request_from("127.0.0.3", g.port, headers=[("X-Tenant", "a")]).status == 200


def test_key_route_and_default_filters(gateway, backend):
    routes = (direct_route("a", "/a") + direct_route("b", "/b")
              + direct_route("c", "/c", extra="skip_default_filters: true"))
    b = backend()
    g = gateway(filter_config(routes=routes,
                              default_filters=[rl(rate="1/m", burst=1, key="route")]),
                B1=b.addr)
    assert count_until_limited(lambda: g.request("GET", "/a")) == 2
    assert count_until_limited(lambda: g.request("GET", "/b")) == 2  # its own bucket
    # skip_default_filters: never limited.
    assert statuses(pipelined(g.port, 30, "/c")) == [200] * 30


def test_default_filters_shared_instance(gateway, backend):
    """default_filters is one shared instance: with key ip, every route spends one budget;
    a route's own filters run after it."""
    routes = (direct_route("a", "/a") + direct_route("b", "/b")
              + direct_route("c", "/c", filters=[rl(rate="1/m", burst=0, key="ip")])
              + direct_route("free", "/free", extra="skip_default_filters: true"))
    b = backend()
    g = gateway(filter_config(routes=routes,
                              default_filters=[rl(rate="1/m", burst=3, key="ip")]),
                B1=b.addr)
    seq = [g.request("GET", p).status for p in ("/a", "/b", "/c", "/c", "/a")]
    # /a, /b, /c spend the default budget (4 = burst + 1); the 2nd /c is refused by the
    # route's own limit; the last /a finds the shared default budget empty.
    assert seq == [200, 200, 200, 429, 429], seq
    assert g.request("GET", "/free").status == 200


def test_accuracy_under_concurrent_load(gateway, backend):
    rate, burst = 200, 20
    g = one_route(gateway, backend, [rl(rate="%d/s" % rate, burst=burst)], workers=2)
    res = hammer(g.port, 5.0, 8, "/")
    assert res, "no requests made"
    allowed = [r for r in res if r[2] == 200]
    other = {r[2] for r in res} - {200, 429}
    assert not other, other
    t_first = res[0][0]
    t_last = max(r[0] for r in res)
    elapsed = t_last - t_first
    ceiling = rate * elapsed + burst + 1
    base = rate * elapsed + burst
    n = len(allowed)
    assert len(res) > 3 * ceiling, "load too light to test the limit: %d requests" % len(res)
    assert base * 0.99 <= n <= ceiling * 1.01, (n, base, ceiling, elapsed, len(res))


def test_distinct_key_flood_memory_bounded(gateway, backend):
    g = one_route(gateway, backend,
                  [rl(rate="1/s", burst=0, key="header:X-Key", max_keys=1000, headers="false")],
                  workers=2)

    def reqs(lo, hi):
        for i in range(lo, hi):
            yield b"GET / HTTP/1.1\r\nHost: t\r\nX-Key: k%07d\r\n\r\n" % i

    t0 = time.monotonic()
    c1 = pipeline_flood(g.port, reqs(0, 20000))
    rss_20k = g.rss_kib()
    c2 = pipeline_flood(g.port, reqs(20000, 200000))
    rss_200k = g.rss_kib()
    took = time.monotonic() - t0
    assert sum(c1.values()) == 20000 and sum(c2.values()) == 180000, (c1, c2)
    assert set(c1) | set(c2) <= {200, 429}, (c1, c2)
    # Every key is new: each first request passes (evicting idle keys, not refusing).
    assert c2.get(200, 0) >= 179000, c2
    assert g.alive()
    if not is_sanitizer_build():
        assert rss_200k - rss_20k < 8 * 1024, (rss_20k, rss_200k)
    # Limiting still works for a hot key after the flood.
    st = statuses(pipelined(g.port, 5, headers=[("X-Key", "hot")]))
    assert st[0] == 200 and st.count(429) >= 3, st
    assert took < 120, took


# ---- global (Redis) ----------------------------------------------------------------------------


def global_config(redis, rule, workers=1, timeout="50ms"):
    top = "redis: {address: %s, timeout: %s, connect_timeout: 200ms, key_prefix: %s}\n" % (
        redis.addr, timeout, q("sluice-test:"))
    return filter_config(routes=direct_route("all", "/", [rule]), top=top, workers=workers,
                         upstream="127.0.0.1:9")


def test_global_two_gateways_share_budget(gateway, redis_server):
    rate, burst = 50, 10
    r = redis_server()
    rule = rl(rate="%d/s" % rate, burst=burst, scope="global", id="shared-counter",
              key="header:X-Run")
    # A generous Redis timeout: with on_redis_error allow, a slow answer under load would
    # let requests through uncounted and blur what this test measures.
    g1 = gateway(global_config(r, rule, workers=2, timeout="1s"))
    g2 = gateway(global_config(r, rule, workers=2, timeout="1s"))
    # Warm both gateways' Redis connections on another key's bucket.
    for gw in (g1, g2):
        assert poll(lambda: gw.request("GET", "/", [("X-Run", "warm")]).status == 429, 5.0), \
            gw.diag()
    import threading

    results = {}

    def run(name, gw):
        results[name] = hammer(gw.port, 4.0, 3, "/", [("X-Run", "go")])

    ts = [threading.Thread(target=run, args=(n, gw)) for n, gw in (("g1", g1), ("g2", g2))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    res = sorted(results["g1"] + results["g2"])
    assert res
    other = {x[2] for x in res} - {200, 429}
    assert not other, other
    n = sum(1 for x in res if x[2] == 200)
    per = {k: sum(1 for x in v if x[2] == 200) for k, v in results.items()}
    elapsed = max(x[0] for x in res) - res[0][0]
    base = rate * elapsed + burst
    ceiling = base + 1
    assert per["g1"] > 0 and per["g2"] > 0, per
    assert base * 0.99 <= n <= ceiling * 1.01, (n, base, ceiling, elapsed, per, len(res))


def timed_requests(port, n, headers=None):
    """n sequential keep-alive requests; returns [(status, seconds, error)]."""
    out = []
    k = KeepAliveClient(port, timeout=5.0)
    try:
        for _ in range(n):
            t0 = time.monotonic()
            r = k.request("/", headers)
            out.append((r.status, time.monotonic() - t0, error_of(r)))
    finally:
        k.close()
    return out


@pytest.mark.parametrize("failure", ["killed", "hung"])
@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_global_redis_failure(gateway, redis_server, policy, failure):
    r = redis_server()
    rule = rl(rate="5/s", burst=0, scope="global", on_redis_error=policy, id="fail-" + policy)
    g = gateway(global_config(r, rule, workers=2, timeout="50ms"))
    bound = 0.050 + 0.250
    # Redis up: limiting works.
    assert poll(lambda: 429 in statuses(pipelined(g.port, 10)), 5.0, interval=0.05), \
        "never limited while Redis was up" + g.diag()
    if failure == "killed":
        r.kill()
    else:
        r.pause()
    try:
        res = timed_requests(g.port, 60)
    finally:
        if failure == "hung":
            r.resume()
    want = 200 if policy == "allow" else 503
    bad = [x for x in res if x[0] != want]
    assert not bad, (policy, failure, bad[:5])
    if policy == "deny":
        assert {x[2] for x in res} == {"redis_unavailable"}, res[:3]
    slow = [x for x in res if x[1] > bound]
    assert not slow, ("answers slower than timeout + 250 ms", slow[:5])
    # Redis back: limiting resumes (bounded).
    if failure == "killed":
        r.start()
    assert poll(lambda: 429 in statuses(pipelined(g.port, 10)), 15.0, interval=0.1), \
        "limiting did not resume after Redis came back" + g.diag()
    assert g.alive()


def _redis_raw(r, payload, timeout=2.0):
    """Inline commands on one connection (so AUTH and SELECT apply to what follows)."""
    import socket
    with socket.create_connection(("127.0.0.1", r.port), timeout=timeout) as s:
        s.sendall(payload)
        s.settimeout(timeout)
        out = b""
        while out.count(b"\r\n") < payload.count(b"\r\n"):
            d = s.recv(65536)
            if not d:
                break
            out += d
        return out


def test_global_with_acl_user_password_and_db(gateway, redis_server):
    # redis: {username, password, db}: the limit works through AUTH user pass + SELECT, and
    # its keys land in that database; a wrong password fails closed with deny (503).
    r = redis_server()
    assert r.command("ACL", "SETUSER", "gw", "on", ">s3cret-pw", "~*", "+@all").startswith(b"+OK")
    assert r.command("ACL", "SETUSER", "default", "off").startswith(b"+OK")
    rule = rl(rate="1/m", burst=1, scope="global", on_redis_error="deny", key="ip")
    top = ("redis: {address: %s, username: gw, password: %s, db: 3, timeout: 500ms, "
           "connect_timeout: 500ms, key_prefix: %s}\n" % (r.addr, q("s3cret-pw"), q("acl:")))
    g = gateway(filter_config(routes=direct_route("all", "/", [rule]), top=top,
                              upstream="127.0.0.1:9"))
    # The first answers may be 503 while the connection authenticates: poll for a 200.
    assert poll(lambda: g.request("GET", "/").status == 200, 5.0), g.diag()
    codes = [g.request("GET", "/").status for _ in range(3)]
    assert codes.count(429) >= 2 and 503 not in codes, codes
    out = _redis_raw(r, b"AUTH gw s3cret-pw\r\nSELECT 3\r\nDBSIZE\r\n")
    assert out.startswith(b"+OK\r\n+OK\r\n:") and not out.endswith(b":0\r\n"), out

    bad = ("redis: {address: %s, username: gw, password: wrong, timeout: 100ms, "
           "connect_timeout: 200ms}\n" % r.addr)
    g2 = gateway(filter_config(routes=direct_route("all", "/", [rule]), top=bad,
                               upstream="127.0.0.1:9"))
    for _ in range(3):
        resp = g2.request("GET", "/")
        assert resp.status == 503 and error_of(resp) == "redis_unavailable", resp


def test_global_client_gone_while_redis_call_pending(gateway, redis_server):
    # The filter is paused on a Redis call when the client disconnects: the call must be
    # cancelled (its reply later must not touch the freed request; the ASan run and the
    # fixture's sanitizer check catch a use-after-free) and the gateway keeps serving.
    r = redis_server()
    rule = rl(rate="100/s", burst=10, scope="global", on_redis_error="deny", key="ip")
    g = gateway(global_config(r, rule, timeout="3s"))
    assert poll(lambda: g.request("GET", "/").status == 200, 5.0), g.diag()
    r.pause()
    try:
        import socket
        import struct
        for i in range(5):
            s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
            s.sendall(b"GET /gone/%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
            # Wait until the request is parked on Redis (the call is on the wire), then reset
            # the connection: a RST, unlike a FIN, aborts the request at once.
            time.sleep(0.05)  # nothing to poll from outside: Redis is stopped, no answer yet
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
    finally:
        r.resume()
    # Redis answers the abandoned calls now; the next requests are decided normally.
    assert poll(lambda: g.request("GET", "/after").status == 200, 5.0), g.diag()
    assert g.alive()
