"""Zone-aware balancing against the real binary: with `zone_aware.enabled` the local zone takes
all the traffic while it is healthy; when part of it is down the share that stays local is the
healthy fraction of the local weight and the rest spills to the other zones in proportion to
their healthy weight; with the local zone gone everything spills; below `panic_threshold`
the whole pool is used again, health ignored. The instance's zone is `zone:` or, when that
key is absent, $SLUICE_ZONE.

Shares are measured over hundreds of requests with tolerances of more than five standard
deviations of a random split, so a correct balancer never fails them and a zone-blind one
(a2 at 1/5 instead of 1/2) always does."""

import time

from resilience_peers import Load, rconfig, rpeers, run_load, wait_ejected

assert rpeers  # fixture

ZONES = {"az-a": ("a1", "a2"), "az-b": ("b1", "b2"), "az-c": ("c1", "c2")}
A, B, C = (set(ZONES[z]) for z in ("az-a", "az-b", "az-c"))


def count_in(s, group):
    return sum(v for k, v in s.backends.items() if k in group)


def eject(gw, backends):
    """Keeps traffic flowing until each of `backends` is logged as ejected."""
    with Load(gw.port, threads=4, rate=300, duration=6):
        for b in backends:
            wait_ejected(gw, b, 5)


def test_zone_aware_local_first_spill_and_panic(gateway, rpeers):
    bs = {}
    for zone, ns in ZONES.items():
        for n in ns:
            bs[n] = rpeers.backend(n, zone=zone)
    gw = gateway(rconfig(list(bs.values()), top="zone: az-a", upstream="""
        timeouts: {connect: 300ms, response: 2s}
        health:
          passive: {consecutive_failures: 3, ejection: 30s, max_ejection_percent: 100}
        retries: {attempts: 2, backoff: {base: 5ms, max: 20ms}}
        zone_aware: {enabled: true, panic_threshold: 50%}
        """))

    # Everything healthy: all traffic stays in az-a, on both of its endpoints.
    s = run_load(gw.port, threads=4, count=300)
    assert not s.failures, s.describe()
    assert set(s.backends) == A, s.describe()

    # One of two local endpoints down: half the traffic stays local, half spills to b and c.
    bs["a1"].kill()
    eject(gw, [bs["a1"]])
    s = run_load(gw.port, threads=4, count=600)
    assert not s.failures, s.describe()
    local = s.share(A)
    assert 0.35 <= local <= 0.65, "local share %.2f, expected ~0.50: %s" % (local, s.describe())
    spill_b, spill_c = count_in(s, B), count_in(s, C)
    assert spill_b + spill_c == s.total - count_in(s, A)
    assert 0.3 <= spill_b / (spill_b + spill_c) <= 0.7, s.describe()
    assert set(s.backends) == {"a2"} | B | C, s.describe()

    # The whole local zone down: everything to b and c, split by their healthy weight.
    bs["a2"].kill()
    eject(gw, [bs["a2"]])
    s = run_load(gw.port, threads=4, count=400)
    assert not s.failures, s.describe()
    assert set(s.backends) == B | C, s.describe()
    assert 0.3 <= count_in(s, B) / s.total <= 0.7, s.describe()

    # Two more ejected (503s): 2 of 6 healthy, under the 50% panic threshold: the whole pool
    # takes traffic again, the ejected b1 and c1 included.
    for n in ("b1", "c1"):
        bs[n].set_mode("status", status=503)
    eject(gw, [bs["b1"], bs["c1"]])
    before = {n: bs[n].count() for n in ("b1", "c1")}
    t0 = time.time()
    s = run_load(gw.port, threads=4, count=300)
    got = {n: bs[n].count() - before[n] for n in ("b1", "c1")}
    assert got["b1"] >= 15 and got["c1"] >= 15, (
        "in panic the ejected endpoints get traffic again; got %r of %d requests since %.3f"
        % (got, s.total, t0))


def test_sluice_zone_env_when_zone_key_absent(gateway, rpeers, monkeypatch):
    a1 = rpeers.backend("a1", zone="az-a")
    b1 = rpeers.backend("b1", zone="az-b")
    up = "zone_aware: {enabled: true}"
    monkeypatch.setenv("SLUICE_ZONE", "az-b")
    gw = gateway(rconfig([a1, b1], upstream=up))
    s = run_load(gw.port, threads=2, count=60)
    assert s.backends == {"b1": 60}, s.describe()
    # The key wins over the environment.
    gw = gateway(rconfig([a1, b1], upstream=up, top="zone: az-a"))
    s = run_load(gw.port, threads=2, count=60)
    assert s.backends == {"a1": 60}, s.describe()
    # Without zone_aware the zones do not matter.
    gw = gateway(rconfig([a1, b1], top="zone: az-a"))
    s = run_load(gw.port, threads=2, count=60)
    assert set(s.backends) == {"a1", "b1"}, s.describe()
