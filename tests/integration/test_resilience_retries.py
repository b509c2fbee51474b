"""Retries, the retry budget and the circuit breaker against the real binary: a retry goes to
another endpoint, a POST is never replayed once its bytes reached a backend (unless it carries
an Idempotency-Key) but is retried after a connect failure, the client gets the last failure
when every try failed, a full outage costs at most the budget in extra tries, a route's
retries override the upstream's, `circuit_breaker.max_requests` answers 503
`upstream_overloaded` at once, and out-of-range resilience settings are config errors with a
position."""

import re
import threading
import time

import pytest

from client import assert_gateway_error
from helpers import run_cli, stalled_listener
from peers import dead_port
from resilience_peers import rconfig, rpeers, run_load, until

assert rpeers  # fixture

NO_PASSIVE = "health: {passive: {consecutive_failures: 0}}"


def syn_sent_to(port):
    """True when some socket is in SYN_SENT towards 127.0.0.1:port (a connect in progress)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            rem, st = cols[2], cols[3]
            if st == "02" and int(rem.split(":")[1], 16) == port:
                return True
    return False


def tries(backends, path):
    return {b.name: b.count(path=path) for b in backends}


# ---- which requests are retried ---------------------------------------------------------------


def test_get_retried_on_another_endpoint_after_reset(gateway, rpeers):
    b1, b2 = rpeers.backends(2)
    b1.set_mode("reset")
    gw = gateway(rconfig([b1, b2], workers=1, upstream=[NO_PASSIVE, """
        retries: {attempts: 2, backoff: {base: 5ms, max: 20ms}}
        """]))
    for i in range(6):
        p = "/get/%d" % i
        r = gw.request("GET", p)
        assert r.status == 200 and r.header("x-backend") == "b2", r
        t = tries([b1, b2], p)
        assert t["b2"] == 1 and t["b1"] <= 1, (p, t)  # never twice on one endpoint
    assert b1.count() >= 1, "no GET went to the resetting backend first"


def test_post_not_replayed_after_bytes_reached_backend(gateway, rpeers):
    b1, b2 = rpeers.backends(2)
    b1.set_mode("reset")  # reads the whole request, then resets
    gw = gateway(rconfig([b1, b2], workers=1, upstream=[NO_PASSIVE, """
        retries: {attempts: 2, backoff: {base: 5ms, max: 20ms}}
        """]))
    failed = 0
    for i in range(6):
        p = "/post/%d" % i
        r = gw.request("POST", p, body=b"order=%d" % i)
        t = tries([b1, b2], p)
        assert sum(t.values()) == 1, "POST %s tried %r" % (p, t)
        if t["b1"]:
            doc = assert_gateway_error(r, 502)
            assert doc["error"] == "upstream_reset", doc
            failed += 1
        else:
            assert r.status == 200 and r.header("x-backend") == "b2", r
    assert failed >= 1, "no POST reached the resetting backend"


@pytest.mark.parametrize("how", ["idempotency-key", "non_idempotent"])
def test_post_retried_on_another_endpoint_when_replay_allowed(gateway, rpeers, how):
    b1, b2 = rpeers.backends(2)
    b1.set_mode("reset")
    flag = ", non_idempotent: true" if how == "non_idempotent" else ""
    gw = gateway(rconfig([b1, b2], workers=1, upstream=[NO_PASSIVE, """
        retries: {attempts: 2, backoff: {base: 5ms, max: 20ms}%s}
        """ % flag]))
    for i in range(6):
        p = "/post/%d" % i
        hs = [("Idempotency-Key", "key-%d" % i)] if how == "idempotency-key" else []
        r = gw.request("POST", p, hs, body=b"order=%d" % i)
        assert r.status == 200 and r.header("x-backend") == "b2", r
        t = tries([b1, b2], p)
        assert t["b2"] == 1 and t["b1"] <= 1, (p, t)
    assert b1.count(method="POST") >= 1, "no POST went to the resetting backend first"


def test_post_body_over_max_body_not_retried(gateway, rpeers):
    b1, b2 = rpeers.backends(2)
    b1.set_mode("reset")
    gw = gateway(rconfig([b1, b2], workers=1, upstream=[NO_PASSIVE, """
        retries: {attempts: 2, max_body: 1KiB, backoff: {base: 5ms, max: 20ms}}
        """]))
    failed = 0
    for i in range(6):
        p = "/big/%d" % i
        # An Idempotency-Key allows a replay, but 4 KiB were not kept for one.
        r = gw.request("POST", p, [("Idempotency-Key", "big-%d" % i)], body=b"x" * 4096)
        t = tries([b1, b2], p)
        assert sum(t.values()) == 1, "POST %s of 4 KiB tried %r" % (p, t)
        if t["b1"]:
            assert assert_gateway_error(r, 502)["error"] == "upstream_reset"
            failed += 1
        else:
            assert r.status == 200 and r.header("x-backend") == "b2", r
    assert failed >= 1, "no POST reached the resetting backend"
    for i in range(4):
        r = gw.request("POST", "/small/%d" % i, [("Idempotency-Key", "small-%d" % i)],
                       body=b"x" * 512)
        assert r.status == 200 and r.header("x-backend") == "b2", r


def test_post_retried_after_connect_failure(gateway, rpeers):
    b2 = rpeers.backend("b2")
    dead = "127.0.0.1:%d" % dead_port()
    gw = gateway(rconfig([dead, b2], workers=1, upstream=[NO_PASSIVE, """
        timeouts: {connect: 500ms}
        retries: {attempts: 2, backoff: {base: 5ms, max: 20ms}}
        """]))
    for i in range(6):
        p = "/post/%d" % i
        r = gw.request("POST", p, body=b"order=%d" % i)
        # Half of them go to the dead address first: nothing was sent, so they are retried.
        assert r.status == 200 and r.header("x-backend") == "b2", (i, r)
        assert b2.count(path=p) == 1


@pytest.mark.parametrize("mode,status,error", [
    ("status", 503, None),
    ("reset", 502, "upstream_reset"),
    ("hang", 504, "upstream_timeout"),
    ("dead", 503, "upstream_connect_failed"),
])
def test_every_try_failed_client_gets_last_failure(gateway, rpeers, mode, status, error):
    if mode == "dead":
        bs = []
        eps = ["127.0.0.1:%d" % dead_port() for _ in range(3)]
    else:
        bs = rpeers.backends(3)
        for b in bs:
            b.set_mode(mode, status=status if mode == "status" else None)
        eps = bs
    gw = gateway(rconfig(eps, upstream=[NO_PASSIVE, """
        timeouts: {connect: 300ms, response: 2s}
        retries: {attempts: 2, per_try_timeout: 300ms, backoff: {base: 5ms, max: 20ms}}
        """]))
    t0 = time.monotonic()
    r = gw.request("GET", "/all-fail")
    took = time.monotonic() - t0
    if error is None:
        # The backend's own answer, as is.
        assert r.status == status and r.header("x-backend") in {b.name for b in bs}, r
        assert r.body.strip().decode() == r.header("x-backend"), r
    else:
        doc = assert_gateway_error(r, status)
        assert doc["error"] == error, doc
    if bs:
        t = tries(bs, "/all-fail")
        assert t == {b.name: 1 for b in bs}, "3 tries on 3 different endpoints, got %r" % t
    if mode == "hang":
        assert 0.85 <= took < 2.0, "3 tries of 300ms took %.3fs" % took


def test_route_retries_override_upstream(gateway, rpeers):
    b1, b2 = rpeers.backends(2)
    b1.set_mode("status", status=503)
    routes = """\
  - name: once
    match: {path_prefix: /once}
    upstream: users
    retries: {attempts: 0}
  - name: all
    match: {path_prefix: /}
    upstream: users
"""
    gw = gateway(rconfig([b1, b2], workers=1, routes=routes, upstream=[NO_PASSIVE, """
        retries: {attempts: 2, backoff: {base: 5ms, max: 20ms}}
        """]))
    seen_503 = 0
    for i in range(6):
        r = gw.request("GET", "/once/%d" % i)
        if r.status == 503:
            assert r.header("x-backend") == "b1", r
            seen_503 += 1
        else:
            assert r.status == 200 and r.header("x-backend") == "b2", r
        assert sum(tries([b1, b2], "/once/%d" % i).values()) == 1
    assert seen_503 >= 1, "the route without retries never met the 503 backend"
    for i in range(6):
        r = gw.request("GET", "/other/%d" % i)
        assert r.status == 200 and r.header("x-backend") == "b2", r


# ---- budget -----------------------------------------------------------------------------------


def test_retry_budget_bounds_tries_in_full_outage(gateway, rpeers):
    bs = rpeers.backends(3)
    for b in bs:
        b.set_mode("status", status=503)
    gw = gateway(rconfig(bs, upstream=[NO_PASSIVE, """
        retries: {attempts: 2, budget: 20%, min_retries: 10, backoff: {base: 1ms, max: 5ms}}
        """]))
    n, threads = 200, 4
    s = run_load(gw.port, threads=threads, count=n, path=lambda t, k: "/outage/%d" % k)
    assert s.total == n and not s.errors, s.describe()
    assert s.statuses == {503: n}, s.describe()
    assert all(r.backend for r in s.results), "a 503 that is not the backend's own"
    per_path = {}
    for b in bs:
        for key, v in b.stats()["counts"].items():
            assert v == 1, "%s got %s %d times (a retry must go elsewhere)" % (b.name, key, v)
            per_path[key] = per_path.get(key, 0) + v
    total = sum(per_path.values())
    bound = n * 1.2 + 10 + threads  # budget 20% + min_retries 10, slack: concurrent checks
    assert n < total <= bound, "%d tries for %d requests (budget allows %d, no budget %d)" % (
        total, n, bound, 3 * n)


# ---- circuit breaker --------------------------------------------------------------------------


def test_breaker_max_requests_answers_overloaded_at_once(gateway, rpeers):
    b = rpeers.backend()
    b.set_mode("slow", delay=1.5, path="/slow")
    gw = gateway(rconfig([b], upstream="""
        timeouts: {response: 5s}
        circuit_breaker: {max_requests: 2}
        """))
    out = [None, None]

    def slow(i):
        out[i] = gw.request("GET", "/slow", timeout=5)

    ts = [threading.Thread(target=slow, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    try:
        until(lambda: b.count(path="/slow") == 2, 3, "two slow requests at the backend")
        t0 = time.monotonic()
        r = gw.request("GET", "/slow", timeout=5)
        took = time.monotonic() - t0
    finally:
        for t in ts:
            t.join(10)
    doc = assert_gateway_error(r, 503)
    assert doc["error"] == "upstream_overloaded", doc
    ra = r.header("retry-after")
    assert ra is not None and ra.isdigit() and int(ra) >= 1, r
    assert took < 0.5, "the overflow answer took %.3fs" % took
    assert b.count(path="/slow") == 2, "the third request reached the backend"
    assert [x.status for x in out] == [200, 200], out
    r = gw.request("GET", "/after")
    assert r.status == 200, r  # the slots were given back


# ---- config errors ----------------------------------------------------------------------------

BAD_BASE = """\
listeners:
  - {name: public, address: 127.0.0.1:9}
upstreams:
  - name: users
    endpoints: [127.0.0.1:9]
%s
routes:
  - name: all
    match: {path_prefix: /}
    upstream: users
%s
"""


@pytest.mark.parametrize("up,route,path,needle", [
    ("    retries: {attempts: 2, budget: 120%}", "", "upstreams[0].retries.budget", "120%"),
    ("", "    retries: {budget: 120%}", "routes[0].retries.budget", "120%"),
    ("    retries: {on: [connect_failure, teapot]}", "", "upstreams[0].retries.on", "teapot"),
    ("    health: {passive: {max_ejection_percent: 101}}", "",
     "upstreams[0].health.passive.max_ejection_percent", "101"),
    ("    zone_aware: {enabled: true, panic_threshold: 150%}", "",
     "upstreams[0].zone_aware.panic_threshold", "150%"),
])
def test_bad_resilience_value_is_a_located_config_error(tmp_path, up, route, path, needle):
    text = BAD_BASE % (up, route)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    r = run_cli(["-t", "-c", str(cfg)])
    assert r.returncode == 1, (r.returncode, r.stderr)
    line = text[:text.index(needle)].count("\n") + 1
    rx = re.compile(r"^%s:(\d+):(\d+): %s\S*: " % (re.escape(str(cfg)), re.escape(path)))
    hits = [m for m in map(rx.match, r.stderr.splitlines()) if m]
    assert hits, "no `%s:LINE:COL: %s: ...` line in:\n%s" % (cfg, path, r.stderr)
    assert int(hits[0].group(1)) == line, (line, r.stderr)


def test_breaker_max_connections_counts_busy_and_reuses_idle(gateway, rpeers):
    b = rpeers.backend()
    b.set_mode("slow", delay=1.0, path="/slow")
    gw = gateway(rconfig([b], workers=1, upstream="""
        timeouts: {response: 5s}
        circuit_breaker: {max_connections: 2}
        """))
    out = [None, None]

    def slow(i):
        out[i] = gw.request("GET", "/slow", timeout=5)

    ts = [threading.Thread(target=slow, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    try:
        until(lambda: b.count(path="/slow") == 2, 3, "two slow requests at the backend")
        # both connections are busy: a request that needs a third is refused at once
        t0 = time.monotonic()
        r = gw.request("GET", "/fast", timeout=5)
        took = time.monotonic() - t0
    finally:
        for t in ts:
            t.join(10)
    doc = assert_gateway_error(r, 503)
    assert doc["error"] == "upstream_overloaded", doc
    assert r.header("retry-after") == "1", r
    assert took < 0.5, "the overflow answer took %.3fs" % took
    assert [o.status for o in out] == [200, 200], out
    # the two connections are idle now and are reused: no new connection is needed
    for i in range(4):
        assert gw.request("GET", "/after/%d" % i).status == 200


def test_breaker_max_pending_bounds_requests_waiting_for_a_connect(gateway):
    with stalled_listener() as port:
        gw = gateway(rconfig(["127.0.0.1:%d" % port], workers=1, upstream="""
            timeouts: {connect: 2s}
            retries: {attempts: 0}
            health: {passive: {consecutive_failures: 0}}
            circuit_breaker: {max_pending: 1}
            """))
        first = []
        t = threading.Thread(target=lambda: first.append(gw.request("GET", "/a", timeout=5)))
        t.start()
        try:
            until(lambda: syn_sent_to(port), 3, "the first request's connect is pending")
            t0 = time.monotonic()
            r = gw.request("GET", "/b", timeout=5)
            took = time.monotonic() - t0
        finally:
            t.join(10)
        doc = assert_gateway_error(r, 503)
        assert doc["error"] == "upstream_overloaded", doc
        assert took < 0.5, "the overflow answer took %.3fs" % took
        assert first and first[0].status == 504, first  # its own connect timed out


def test_breaker_max_pending_counts_only_connects_in_progress(gateway, rpeers):
    # A request whose connection is open is waiting for its answer, not for a connection:
    # it must not hold a max_pending slot.
    b = rpeers.backend()
    b.set_mode("slow", delay=1.0, path="/slow")
    gw = gateway(rconfig([b], workers=1, upstream="""
        timeouts: {response: 5s}
        circuit_breaker: {max_pending: 1}
        """))
    out = []
    t = threading.Thread(target=lambda: out.append(gw.request("GET", "/slow", timeout=5)))
    t.start()
    try:
        until(lambda: b.count(path="/slow") == 1, 3, "the slow request at the backend")
        r = gw.request("GET", "/fast", timeout=5)
    finally:
        t.join(10)
    assert r.status == 200, r
    assert out and out[0].status == 200, out


def test_first_retry_is_immediate_later_ones_back_off(gateway, rpeers):
    # backoff base 1s: a first retry that waited would take >= 0.5 s (equal jitter: half of
    # base at least); the second retry must wait that long. 503s, not resets: a reset on a
    # reused connection is replayed once without being a retry, which would blur the count.
    b1, b2, b3 = rpeers.backends(3)
    gw = gateway(rconfig([b1, b2, b3], workers=1, upstream=[NO_PASSIVE, """
        retries: {attempts: 2, backoff: {base: 1s, max: 2s}}
        """]))
    b1.set_mode("status", status=503)
    b2.set_mode("status", status=503)
    one, two = [], []
    for i in range(9):
        p = "/r/%d" % i
        t0 = time.monotonic()
        r = gw.request("GET", p, timeout=10)
        took = time.monotonic() - t0
        assert r.status == 200 and r.header("x-backend") == "b3", r
        n_tries = sum(b.count(path=p) for b in (b1, b2, b3))
        (one if n_tries == 2 else two if n_tries == 3 else []).append(took)
    assert one and two, (one, two)
    assert max(one) < 0.5, one  # the first retry did not wait
    assert min(two) >= 0.5, two  # the second did
