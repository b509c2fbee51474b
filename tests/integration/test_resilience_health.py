"""Passive and active health of upstream endpoints against the real binary and real backend
processes: a SIGKILLed backend is ejected within a second with no client-visible error, a
SIGSTOPped (hung) one costs only the requests in flight, a backend answering 503 opens its
breaker, is probed, re-ejected for longer and closed again when it recovers, a pool with every
endpoint down answers a fast 503 `no_healthy_endpoint`, and HTTP / TCP active checks take
endpoints out of rotation and back. Detection windows are short (ejection 1-2 s, checks every
200 ms) so that each test takes a few seconds."""

import http.client
import time

from client import assert_gateway_error
from resilience_peers import (Load, ejections, gateway_error, names, rconfig, restorations,
                              rpeers, run_load, until, wait_ejected, wait_restored,
                              wait_until_wall)

assert rpeers  # fixture

FAST_RETRIES = "retries: {attempts: 2, backoff: {base: 5ms, max: 20ms}}"


def all_answer(load, backends, since=None):
    def cond():
        s = load.snapshot()
        if since is not None:
            s = s.since(since)
        return names(backends) <= set(s.backends)
    return cond


def wait_quiet(load, backend, after, timeout, window=0.5, min_requests=10):
    """Waits until a `window` of requests, all started after `after`, has no answer from
    `backend` (and no failure); returns the window's start."""
    def cond():
        now = time.time()
        t0 = max(after, now - window)
        if now - t0 < window:
            return None
        s = load.snapshot().between(t0, now)
        if s.total >= min_requests and backend.name not in s.backends and not s.failures:
            return t0
        return None
    return until(cond, timeout, "%s out of rotation" % backend.name,
                 diag=lambda: load.snapshot().since(after).describe())


# ---- the harness itself (no sluice) -----------------------------------------------------------


def test_harness_backend_modes_and_counts(rpeers):
    b = rpeers.backend("hb")
    c = http.client.HTTPConnection("127.0.0.1", b.port, timeout=2)
    c.request("GET", "/a")
    r = c.getresponse()
    assert (r.status, r.getheader("X-Backend"), r.read()) == (200, "hb", b"hb\n")
    b.set_mode("status", status=503)
    c.request("POST", "/a", body=b"xyz")
    r = c.getresponse()
    assert (r.status, r.read()) == (503, b"hb\n")
    b.set_mode("ok")
    b.set_mode("status", status=500, path="/healthz")
    c.request("GET", "/healthz")
    r = c.getresponse()
    assert r.status == 500 and r.read() == b"hb\n"
    for mode in ("close", "reset"):
        b.set_mode(mode, path="/x")
        c = http.client.HTTPConnection("127.0.0.1", b.port, timeout=2)
        c.request("GET", "/x")
        try:
            c.getresponse().read()
            raise AssertionError("mode %s answered" % mode)
        except (OSError, http.client.HTTPException):
            pass
    b.set_mode("hang", path="/x")
    s = run_load(b.port, threads=1, count=1, path="/x", timeout=0.3)
    assert len(s.errors) == 1 and s.results[0].latency >= 0.29, s
    assert b.count() == 5 and b.count(path="/healthz") == 1 and b.count(method="POST") == 1
    assert b.count(path="/x") == 3


def test_harness_load_is_bounded(rpeers):
    b = rpeers.backend("hl")
    s = run_load(b.port, threads=3, count=50)
    assert s.total == 50 and s.backends == {"hl": 50}, s
    t0 = time.monotonic()
    s = run_load(b.port, threads=2, duration=0.5, rate=100)
    assert time.monotonic() - t0 < 1.5
    assert 30 <= s.total <= 60, s
    b.pause()
    s = run_load(b.port, threads=1, count=1, timeout=0.3)
    b.resume()
    assert s.errors and s.results[0].status is None
    b.kill()
    s = run_load(b.port, threads=2, count=4)
    assert len(s.errors) == 4, s


# ---- passive health ---------------------------------------------------------------------------


def test_killed_backend_ejected_within_1s_without_client_errors(gateway, rpeers):
    bs = rpeers.backends(3)
    victim = bs[0]
    gw = gateway(rconfig(bs, upstream=["""
        timeouts: {connect: 500ms, response: 2s}
        health:
          passive: {consecutive_failures: 5, ejection: 30s}
        """, FAST_RETRIES]))
    with Load(gw.port, threads=4, rate=200, duration=10) as load:
        until(all_answer(load, bs), 3, "all three backends answer")
        t_kill = time.time()
        victim.kill()
        ev = wait_ejected(gw, victim, 3)
        # The same port answers again (and counts): nothing may reach it while it is ejected.
        victim.restart()
        t_watch = time.time()
        wait_until_wall(t_watch + 1.0)  # the absence of traffic over a second is the point
        reached = victim.count()
    s = load.summary()
    assert ev.time - t_kill <= 1.0, "ejected %.3fs after SIGKILL" % (ev.time - t_kill)
    assert reached == 0, "%d requests reached the ejected endpoint" % reached
    assert s.between(t_watch, t_watch + 1.0).total >= 100, s
    assert not s.failures, s.describe()
    assert set(s.since(ev.time + 0.01).backends) == names(bs[1:]), s.since(ev.time).describe()


def test_hung_backend_costs_only_inflight_requests_and_returns(gateway, rpeers):
    bs = rpeers.backends(3)
    victim = bs[0]
    ejection = 2.0
    gw = gateway(rconfig(bs, upstream="""
        timeouts: {connect: 300ms, response: 400ms}
        health:
          passive: {consecutive_failures: 3, ejection: 2s}
        retries: {attempts: 2, per_try_timeout: 400ms, backoff: {base: 5ms, max: 20ms}}
        """))
    with Load(gw.port, threads=6, rate=150, duration=15) as load:
        until(all_answer(load, bs), 3, "all three backends answer")
        t_stop = time.time()
        victim.pause()
        ev = wait_ejected(gw, victim, 3)
        wait_until_wall(ev.time + 1.0)  # hung and ejected for a second
        t_cont = time.time()
        victim.resume()
        back = until(lambda: load.snapshot().since(t_cont).first_from(victim),
                     ev.time + ejection + 2.0 - time.time(), "the resumed backend answers again",
                     diag=gw.diag)
        wait_until_wall(back.start + 0.3)
    s = load.summary()
    assert ev.time - t_stop <= 0.4 + 1.0, "ejected %.3fs after SIGSTOP" % (ev.time - t_stop)
    assert not s.failures, s.describe()  # timed-out GETs were retried elsewhere
    slow = s.slow(0.3)
    assert slow, "no request waited for the per-try timeout: was the backend hung?"
    late = [r for r in slow if r.start > ev.time + 0.05]
    assert not late, "requests started after the ejection waited: %r" % late[:5]
    hung = s.between(ev.time + 0.05, t_cont)
    assert hung.total >= 50 and set(hung.backends) == names(bs[1:]), hung.describe()
    # Back after the ejection time and a successful probe, not before.
    assert back.start >= ev.time + ejection - 0.15, (ev, back)
    assert restorations(gw, victim), gw.diag()


def test_503_backend_breaker_opens_probes_reejects_longer_and_closes(gateway, rpeers):
    bs = rpeers.backends(3)
    victim = bs[0]
    gw = gateway(rconfig(bs, upstream=["""
        timeouts: {connect: 500ms, response: 2s}
        health:
          passive: {consecutive_failures: 3, ejection: 1s, max_ejection: 10s, half_open_requests: 1}
        """, FAST_RETRIES]))
    with Load(gw.port, threads=4, rate=150, duration=15) as load:
        until(all_answer(load, bs), 3, "all three backends answer")
        t_bad = time.time()
        victim.set_mode("status", status=503)
        e1 = wait_ejected(gw, victim, 2)
        wait_until_wall(e1.time + 0.3)  # requests in flight at the ejection have ended
        c1 = victim.count()
        assert e1.duration, "no duration in %r" % e1.line
        e2 = wait_ejected(gw, victim, e1.duration + 3, n=2)  # the half-open probe failed
        c2 = victim.count()
        victim.set_mode("ok")
        assert e2.duration, "no duration in %r" % e2.line
        back = wait_restored(gw, victim, e2.duration + 3)
        ans = until(lambda: load.snapshot().since(back.time).first_from(victim), 2,
                    "the recovered backend gets traffic again")
        wait_until_wall(ans.start + 0.3)
    s = load.summary()
    assert e1.time - t_bad <= 1.0, "ejected %.3fs after it began to answer 503" % (
        e1.time - t_bad)
    assert e2.time - e1.time >= e1.duration - 0.1, "probed before the ejection ended"
    assert c2 - c1 == 1, "%d requests reached it while ejected (one probe expected)" % (c2 - c1)
    assert e2.duration > e1.duration, "re-ejected for %r after %r" % (e2.line, e1.line)
    assert back.time - e2.time >= e2.duration - 0.1, (e2, back)
    assert not s.with_status(503), s.describe()
    assert not s.failures, s.describe()
    assert set(s.between(e1.time + 0.3, e2.time).backends) == names(bs[1:])


def test_all_backends_killed_fast_503_then_no_healthy_endpoint(gateway, rpeers):
    bs = rpeers.backends(3)
    gw = gateway(rconfig(bs, upstream=["""
        timeouts: {connect: 1s, response: 2s}
        health:
          passive: {consecutive_failures: 2, ejection: 30s, max_ejection_percent: 100}
        """, FAST_RETRIES]))
    s = run_load(gw.port, threads=3, count=30)
    assert s.statuses == {200: 30}, s
    for b in bs:
        b.kill()
    s = run_load(gw.port, threads=2, count=40)
    assert not s.errors, s.describe()
    assert s.statuses == {503: 40}, s.describe()
    assert s.latency_max() < 0.5, "a 503 took %.3fs" % s.latency_max()
    kinds = [gateway_error(r) for r in s.results]
    assert set(kinds) <= {"upstream_connect_failed", "no_healthy_endpoint"}, kinds
    assert kinds[-1] == "no_healthy_endpoint", kinds
    t0 = time.monotonic()
    r = gw.request("GET", "/after")
    assert time.monotonic() - t0 < 0.5
    doc = assert_gateway_error(r, 503)
    assert doc["error"] == "no_healthy_endpoint", doc
    ra = r.header("retry-after")
    assert ra is not None and ra.isdigit() and 1 <= int(ra) <= 30, r


def test_failure_ratio_ejects_a_flaky_backend(gateway, rpeers):
    bs = rpeers.backends(3)
    victim = bs[0]
    gw = gateway(rconfig(bs, upstream=["""
        health:
          passive: {consecutive_failures: 5, failure_ratio: 0.3, min_requests: 20, window: 1s,
                    ejection: 30s}
        """, FAST_RETRIES]))
    with Load(gw.port, threads=4, rate=300, duration=10) as load:
        until(all_answer(load, bs), 3, "all three backends answer")
        t_bad = time.time()
        # Every other answer a 503: never 5 failures in a row, but half of them fail.
        victim.set_mode("status", status=503, every=2)
        ev = wait_ejected(gw, victim, 4)
        wait_until_wall(ev.time + 0.5)
    s = load.summary()
    assert ev.time - t_bad <= 2.0, "ejected %.3fs after it became flaky" % (ev.time - t_bad)
    assert "consecutive" not in ev.line, ev.line
    assert not s.failures, s.describe()
    assert victim.name not in s.since(ev.time + 0.05).backends


def test_max_ejection_percent_keeps_half_the_pool(gateway, rpeers):
    bs = rpeers.backends(4)
    for b in bs:
        b.set_mode("status", status=503)
    gw = gateway(rconfig(bs, upstream="""
        health:
          passive: {consecutive_failures: 2, ejection: 30s}
        retries: {attempts: 0}
        """))
    run_load(gw.port, threads=2, count=100)
    ejected = {e.endpoint for e in ejections(gw)}
    assert len(ejected) == 2, "default max_ejection_percent 50 of 4: %s" % gw.diag()
    s = run_load(gw.port, threads=2, count=100)
    assert set(s.backends) == {b.name for b in bs if b.addr not in ejected}, s.describe()
    # One endpoint of one may always be ejected.
    solo = rpeers.backend("solo")
    solo.set_mode("status", status=503)
    gw = gateway(rconfig([solo], upstream="""
        health:
          passive: {consecutive_failures: 2, ejection: 30s}
        retries: {attempts: 0}
        """))
    s = run_load(gw.port, threads=1, count=10)
    assert ejections(gw, solo), gw.diag()
    assert gateway_error(s.results[-1]) == "no_healthy_endpoint", s.describe()


# ---- active health ----------------------------------------------------------------------------

ACTIVE_HTTP = """
    health:
      active: {path: /healthz, interval: 200ms, timeout: 150ms, healthy: 2, unhealthy: 2,
               statuses: [200]}
    """


def test_active_http_check_takes_backend_out_and_back(gateway, rpeers):
    bs = rpeers.backends(2)
    b1 = bs[0]
    gw = gateway(rconfig(bs, upstream=ACTIVE_HTTP))
    with Load(gw.port, threads=2, rate=100, duration=15) as load:
        until(all_answer(load, bs), 3, "both backends answer")
        checks = until(lambda: b1.count(path="/healthz"), 2, "health checks reach b1")
        t_bad = time.time()
        b1.set_mode("status", status=500, path="/healthz")
        t_quiet = wait_quiet(load, b1, t_bad, 3)
        wait_until_wall(t_quiet + 1.5)  # it stays out while /healthz fails
        t_end_bad = time.time()
        # Its other paths still answer 200: only the check took it out.
        direct = run_load(b1.port, threads=1, count=3, path="/direct")
        more_checks = b1.count(path="/healthz")
        t_ok = time.time()
        b1.set_mode("ok")
        back = until(lambda: load.snapshot().since(t_ok).first_from(b1), 3,
                     "b1 back in rotation after /healthz recovered")
        wait_until_wall(back.start + 0.2)
    s = load.summary()
    last_b1 = [r for r in s.between(t_bad, t_quiet).results if r.backend == b1.name]
    if last_b1:
        assert last_b1[-1].start - t_bad <= 1.5, "still routed to b1 %.3fs after /healthz "\
            "failed" % (last_b1[-1].start - t_bad)
    assert direct.statuses == {200: 3}, direct
    assert more_checks > checks
    out = s.between(t_quiet, t_end_bad)
    assert out.total >= 100 and set(out.backends) == {bs[1].name}, out.describe()
    assert not s.failures, s.describe()


def test_active_tcp_check_takes_dead_backend_out_and_back(gateway, rpeers):
    bs = rpeers.backends(2)
    b1 = bs[0]
    # Passive health off and no retries: only the TCP check can stop the failures.
    gw = gateway(rconfig(bs, upstream="""
        health:
          passive: {consecutive_failures: 0}
          active: {interval: 200ms, timeout: 150ms, healthy: 2, unhealthy: 2}
        retries: {attempts: 0}
        """))
    with Load(gw.port, threads=2, rate=100, duration=15) as load:
        until(all_answer(load, bs), 3, "both backends answer")
        t_kill = time.time()
        b1.kill()
        t_quiet = wait_quiet(load, b1, t_kill, 3)
        wait_until_wall(t_quiet + 1.0)
        t_up = time.time()
        b1.restart()
        back = until(lambda: load.snapshot().since(t_up).first_from(b1), 3,
                     "b1 back in rotation after it accepts connections again")
        wait_until_wall(back.start + 0.2)
    s = load.summary()
    fails = s.since(t_kill).failures
    if fails:
        assert fails[-1].start - t_kill <= 1.5, "failures went on for %.3fs" % (
            fails[-1].start - t_kill)
    assert not s.between(t_quiet, t_up).failures, s.between(t_quiet, t_up).describe()
    assert not s.since(back.start).failures, s.since(back.start).describe()
    assert b1.stats()["conns"] >= 2  # the checks connect to it


def test_every_endpoint_actively_down_fast_503_no_healthy_endpoint(gateway, rpeers):
    b = rpeers.backend()
    b.set_mode("status", status=500, path="/healthz")
    gw = gateway(rconfig([b], upstream=ACTIVE_HTTP))

    def refused():
        r = gw.request("GET", "/x")
        return r if r.status == 503 else None

    r = until(refused, 3, "503 once the only endpoint is actively down")
    doc = assert_gateway_error(r, 503)
    assert doc["error"] == "no_healthy_endpoint", doc
    ra = r.header("retry-after")
    assert ra is not None and ra.isdigit() and int(ra) >= 1, r
    before = b.count()
    s = run_load(gw.port, threads=2, count=20)
    assert s.statuses == {503: 20} and s.latency_max() < 0.5, s.describe()
    assert b.count() == before, "requests reached an actively-down endpoint"
