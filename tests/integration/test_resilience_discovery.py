"""Service discovery against the real binary: DNS A records from a real dnsmasq (TTL 1 s)
re-resolved as they change, the last good set kept when the name vanishes or the DNS server
dies; SRV records (ports and weights from the records); a watched endpoints file rewritten
by atomic rename under load, in YAML and JSON, mapping or bare list, an invalid version
keeping the last good set. No request may fail while the set changes, and a request in flight
on a removed endpoint finishes there.

DNS A records carry no port, so the DNS backends share one port on 127.0.0.2-4 (all
loopback)."""

import json
import os
import threading
import time

from resilience_peers import (Load, names, rconfig, rpeers, run_load, until,
                              wait_until_wall)

assert rpeers  # fixture


def resolver(dns):
    return 'resolver: {servers: ["127.0.0.1:%d"], timeout: 1s}' % dns.port


def diag(gw, load=None, dns=None):
    out = gw.diag()
    if load is not None:
        out += "\n--- load ---\n" + load.snapshot().last(1.0).describe()
    if dns is not None:
        out += "\n--- dnsmasq ---\n" + dns.log_text()[-1500:]
    return out


def wait_discovered(gw, backends, timeout, dns=None):
    """Before any load: polls until every one of `backends` answered (the first lookup or
    file read is done; until then the pool is empty and requests get 503)."""
    until(lambda: names(backends) <= set(run_load(gw.port, threads=2, count=20).backends),
          timeout, "%s discovered" % sorted(names(backends)),
          diag=lambda: diag(gw, None, dns))


def answers_from(load, backend, since):
    return lambda: load.snapshot().since(since).first_from(backend)


def wait_quiet(load, backend, after, timeout, window=0.5):
    """Waits until a `window` of requests started after `after` has none answered by
    `backend`; returns the window's start."""
    def cond():
        now = time.time()
        t0 = max(after, now - window)
        if now - t0 < window:
            return None
        s = load.snapshot().between(t0, now)
        return t0 if s.total >= 10 and backend.name not in s.backends else None
    return until(cond, timeout, "no more traffic to %s" % backend.name,
                 diag=lambda: load.snapshot().since(after).describe())


# ---- DNS --------------------------------------------------------------------------------------


def test_dns_discovery_follows_answers_and_keeps_last_good_set(gateway, rpeers):
    d1, d2, d3 = rpeers.same_port_group(["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    dns = rpeers.dnsmasq({"users.test": [d1.host, d2.host]})
    gw = gateway(rconfig(top=resolver(dns), upstream="""
        discovery: {dns: users.test, port: %d, min_interval: 200ms, max_interval: 5s}
        timeouts: {connect: 300ms, response: 2s}
        """ % d1.port))
    wait_discovered(gw, [d1, d2], 3, dns)
    with Load(gw.port, threads=3, rate=150, duration=25) as load:
        wait_until_wall(load.started_at + 0.3)
        assert d3.count() == 0, "a backend not in DNS got traffic"

        t_add = time.time()
        dns.set_hosts({"users.test": [d1.host, d2.host, d3.host]})
        until(answers_from(load, d3, t_add), 4, "the added address gets traffic",
              diag=lambda: diag(gw, load, dns))

        t_rm = time.time()
        dns.set_hosts({"users.test": [d2.host, d3.host]})
        t_q = wait_quiet(load, d1, t_rm, 4)

        # The name vanishes (NXDOMAIN): the last good set stays.
        t_gone = time.time()
        dns.set_hosts({"other.test": [d1.host]})
        wait_until_wall(t_gone + 2.5)  # more than two TTLs of failed lookups

        # The DNS server dies: the last good set stays.
        t_dead = time.time()
        dns.kill()
        wait_until_wall(t_dead + 2.5)
        t_end = time.time()
    s = load.summary()
    assert not s.failures, s.describe()
    kept = s.between(t_q, t_end)
    assert set(kept.backends) == {d2.name, d3.name}, kept.describe()
    for t0, t1 in ((t_gone + 1.5, t_dead), (t_dead + 1.5, t_end)):
        w = s.between(t0, t1)
        assert w.total >= 50 and set(w.backends) == {d2.name, d3.name}, w.describe()


def test_srv_discovery_ports_weights_and_changes(gateway, rpeers):
    s1, s2, s3 = rpeers.backends(3, prefix="s")
    svc = "_users._tcp.test"
    dns = rpeers.dnsmasq({"srv-target.test": ["127.0.0.1"]},
                         srv=[(svc, "srv-target.test", s1.port, 0, 1),
                              (svc, "srv-target.test", s2.port, 0, 3)])
    gw = gateway(rconfig(top=resolver(dns), upstream="""
        discovery: {srv: %s, min_interval: 200ms, max_interval: 5s}
        timeouts: {connect: 300ms, response: 2s}
        """ % svc))
    wait_discovered(gw, [s1, s2], 3, dns)
    s = run_load(gw.port, threads=4, count=400)
    assert not s.failures and set(s.backends) == names([s1, s2]), s.describe()
    share = s.backends[s2.name] / s.total
    assert 0.6 <= share <= 0.9, "weight 3 of 4 got %.2f: %s" % (share, s.describe())
    assert s3.count() == 0

    with Load(gw.port, threads=3, rate=150, duration=15) as load:
        t_ch = time.time()
        dns.set_srv([(svc, "srv-target.test", s2.port, 0, 1),
                     (svc, "srv-target.test", s3.port, 0, 1)])
        until(answers_from(load, s3, t_ch), 4, "the new SRV target gets traffic",
              diag=lambda: diag(gw, load, dns))
        t_q = wait_quiet(load, s1, t_ch, 4)
        wait_until_wall(t_q + 1.0)
        t_end = time.time()
    s = load.summary()
    assert not s.failures, s.describe()
    assert set(s.between(t_q, t_end).backends) == names([s2, s3]), s.describe()


# ---- file -------------------------------------------------------------------------------------


def write_endpoints(path, backends, form):
    """Atomic rename of a new endpoints file: form is yaml-map, yaml-list, json-map,
    json-list, or raw text."""
    eps = [{"address": b.addr} for b in backends] if not isinstance(backends, str) else None
    if form == "raw":
        text = backends
    elif form.startswith("json"):
        text = json.dumps({"endpoints": eps} if form == "json-map" else eps)
    else:
        items = "".join("  - {address: %s}\n" % e["address"] for e in eps)
        text = ("endpoints:\n" + items) if form == "yaml-map" else items.replace("  - ", "- ")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def test_file_discovery_changes_under_load_without_failures(gateway, rpeers, tmp_path):
    f1, f2, f3, f4 = rpeers.backends(4, prefix="f")
    path = str(tmp_path / "endpoints.yaml")
    write_endpoints(path, [f1, f2], "yaml-map")
    gw = gateway(rconfig(upstream="""
        discovery: {file: %s}
        timeouts: {connect: 300ms, response: 2s}
        """ % path))
    wait_discovered(gw, [f1, f2], 3)
    with Load(gw.port, threads=4, rate=200, duration=25) as load:

        t = time.time()
        write_endpoints(path, [f1, f2, f3], "json-list")
        until(answers_from(load, f3, t), 3, "f3 added (JSON list)")

        t = time.time()
        write_endpoints(path, [f2, f3], "yaml-list")
        wait_quiet(load, f1, t, 3)

        t = time.time()
        write_endpoints(path, [f3, f4], "json-map")
        until(answers_from(load, f4, t), 3, "f4 added (JSON mapping)")
        t_q = wait_quiet(load, f2, t, 3)

        # Invalid versions: the last good set (f3, f4) stays.
        t_bad = time.time()
        write_endpoints(path, "endpoints: [{address: 127.0.0.1:", "raw")
        wait_until_wall(t_bad + 1.0)
        t_bad2 = time.time()
        write_endpoints(path, "endpoints:\n  - {address: not-an-address}\n", "raw")
        wait_until_wall(t_bad2 + 1.0)

        # Still watched after the invalid versions.
        t_fix = time.time()
        write_endpoints(path, [f1], "yaml-map")
        until(answers_from(load, f1, t_fix), 3, "f1 back after a valid file")
        t_end = wait_quiet(load, f3, t_fix, 3)
        wait_quiet(load, f4, t_fix, 3)
    s = load.summary()
    assert not s.failures, s.describe()
    kept = s.between(t_q, t_fix)
    assert kept.total >= 200 and set(kept.backends) == names([f3, f4]), kept.describe()
    assert t_end >= t_fix


def test_file_discovery_removal_lets_inflight_request_finish(gateway, rpeers, tmp_path):
    f1, f2 = rpeers.backends(2, prefix="f")
    for b in (f1, f2):
        b.set_mode("slow", delay=2.0, path="/slow")
    path = str(tmp_path / "endpoints.yaml")
    write_endpoints(path, [f1, f2], "yaml-map")
    gw = gateway(rconfig(upstream="""
        discovery: {file: %s}
        timeouts: {response: 5s}
        """ % path))
    wait_discovered(gw, [f1, f2], 3)
    out = []
    t = threading.Thread(target=lambda: out.append(gw.request("GET", "/slow", timeout=8)))
    t.start()
    try:
        until(lambda: f1.count(path="/slow") + f2.count(path="/slow") == 1, 3,
              "the slow request reached a backend")
        t_rm = time.monotonic()
        busy, other = (f1, f2) if f1.count(path="/slow") else (f2, f1)
        write_endpoints(path, [other], "yaml-map")
        until(lambda: run_load(gw.port, threads=2, count=10).backends == {other.name: 10}, 1.5,
              "the removed endpoint out of the set while the slow request runs")
        assert time.monotonic() - t_rm < 1.9, "the update came too late to test anything"
    finally:
        t.join(10)
    assert len(out) == 1, "the slow request did not complete"
    r = out[0]
    assert r.status == 200 and r.header("x-backend") == busy.name, r


def test_empty_pool_answers_no_endpoint_until_discovery_fills_it(gateway, rpeers, tmp_path):
    # An upstream fed only by discovery starts empty: a fast 503 `no_endpoint` with
    # Retry-After, not a hang; once the file lists an endpoint, it is served.
    b = rpeers.backend()
    path = str(tmp_path / "endpoints.yaml")
    with open(path, "w") as f:
        f.write("endpoints: []\n")
    gw = gateway(rconfig(upstream="discovery: {file: %s}" % path))
    t0 = time.monotonic()
    r = gw.request("GET", "/empty")
    assert time.monotonic() - t0 < 1
    assert r.status == 503 and json.loads(r.body)["error"] == "no_endpoint", r
    assert r.header("retry-after") == "1", r
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("endpoints: [%s]\n" % b.addr)
    os.rename(tmp, path)
    until(lambda: gw.request("GET", "/filled").status == 200, 3, "the discovered endpoint")
