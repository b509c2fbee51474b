"""GET /metrics on the admin listener: the Prometheus text exposition parses strictly
(promparse), per-route request counts equal what was sent (direct response, proxied, no
route, rate-limited), upstream endpoint health shows, route series continue across a reload,
the saturation signals (event-loop lag, worker CPU) are present and sane, and the cost gauges
appear when cost.vcpu_hour_usd is set. The first tests check promparse itself."""

import http.client
import os
import re
import signal
import socket
import string

import pytest

import promparse
from client import build_request
from helpers import poll

# ---- promparse rejects what a scraper would -------------------------------------------------

GOOD = """# HELP a_total A counter.
# TYPE a_total counter
a_total{x="1"} 3
a_total{x="q\\"b\\\\s\\nn"} 0
# TYPE h histogram
h_bucket{le="0.1"} 1
h_bucket{le="1"} 2
h_bucket{le="+Inf"} 2
h_sum 0.6
h_count 2
# TYPE g gauge
g NaN
g{y="z"} -Inf 1700000000000
"""


def test_promparse_accepts_valid_text():
    f = promparse.parse(GOOD)
    assert f["a_total"].value(x="1") == 3
    assert f["a_total"].value(x='q"b\\s\nn') == 0
    h = f["h"].histogram()
    assert h.count == 2 and h.sum == 0.6 and h.buckets[-1] == (float("inf"), 2)
    assert f["g"].find(y="z")[0].timestamp == 1700000000000
    assert f["a_total"].help == "A counter."


@pytest.mark.parametrize("text, why", [
    ("a 1", "no final newline"),
    ("a 1\n", "sample without TYPE"),
    ("# TYPE a gauge\na{x=\"\\t\"} 1\n", "unknown escape"),
    ("# TYPE a gauge\na{x=\"1\"} 1\na{x=\"1\"} 2\n", "duplicate series"),
    ("# TYPE a gauge\na{x=\"1\",x=\"2\"} 1\n", "label given twice"),
    ("# TYPE a gauge\na 1\n# TYPE a gauge\n", "second TYPE"),
    ("# TYPE a gauge\na 1\n# HELP a x\n# HELP a y\n", "second HELP"),
    ("# HELP a x\\t\n# TYPE a gauge\n", "unknown escape in HELP"),
    ("# TYPE a gauge\n# TYPE b gauge\na 1\n", "not together"),
    ("# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na{x=\"2\"} 1\n", "interleaved"),
    ("# TYPE a counter\na -1\n", "negative counter"),
    ("# TYPE a gauge\na one\n", "value not a float"),
    ("# TYPE a gauge\na{1x=\"1\"} 1\n", "bad label name"),
    ("# TYPE a gauge\na{x=\"1} 1\n", "unterminated value"),
    ("# TYPE a gauge\na  1\n", "two spaces"),
    ("# TYPE a gauge\nb 1\n", "b without TYPE"),
    ("# TYPE a foo\n", "unknown type"),
    ("# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
     "not cumulative"),
    ("# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 2\n",
     "+Inf != count"),
    ("# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", "no +Inf"),
    ("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n", "no _sum"),
    ("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
     "le order"),
    ("# TYPE h histogram\nh 1\n", "histogram sample without suffix"),
    ("# TYPE h histogram\nh_bucket 1\n", "bucket without le"),
    ("# TYPE h histogram\nh_bucket{le=\"x\"} 1\nh_sum 1\nh_count 1\n", "le not a float"),
])
def test_promparse_rejects(text, why):
    with pytest.raises(promparse.ParseError):
        promparse.parse(text)


# ---- the gateway ------------------------------------------------------------------------------

def config(routes, upstreams="", top="", workers=2):
    text = ("workers: %d\ndrain_timeout: 3s\nlog_level: info\n"
            "admin: {address: 127.0.0.1:$PORT_admin}\n" % workers)
    if top:
        text += top.rstrip("\n") + "\n"
    text += "listeners:\n  - name: public\n    address: 127.0.0.1:$PORT_public\n"
    if upstreams:
        text += "upstreams:\n" + upstreams.rstrip("\n") + "\n"
    return text + "routes:\n" + routes.rstrip("\n") + "\n"


ROUTES = """\
  - name: hello
    match: {path_prefix: /hello}
    direct_response: {status: 200, body: "hi", content_type: text/plain}
  - name: api
    match: {path_prefix: /api}
    upstream: app
  - name: limited
    match: {path_prefix: /limited}
    direct_response: {status: 200, body: "ok"}
    filters:
      - rate_limit: {rate: 1/m, burst: 0}
"""

UPSTREAMS = """\
  - name: app
    endpoints: [{address: $B1}]
"""


def scrape_raw(g):
    c = http.client.HTTPConnection("127.0.0.1", g.ports["admin"], timeout=5)
    try:
        c.request("GET", "/metrics")
        r = c.getresponse()
        body = r.read()
        assert r.status == 200, (r.status, body[:300])
        ctype = r.getheader("Content-Type", "")
        assert ctype.startswith("text/plain"), ctype
        return body.decode()
    finally:
        c.close()


def scrape(g):
    return promparse.parse(scrape_raw(g))


def get(g, path, n=1):
    """`n` requests on one keep-alive connection; returns their statuses."""
    out = []
    with g.connect() as c:
        for _ in range(n):
            c.send(build_request("GET", path))
            out.append(c.read_response().status)
    return out


def requests_of(fams, route):
    f = fams["sluice_requests_total"]
    return {s.labels["code"]: s.value for s in f.find(route=route)}


def wait_total(g, want, timeout=5.0):
    """Polls /metrics until every route in `want` ({route: {code: n}}) shows those counts
    (a request is counted when it finishes, a moment after its last byte left); returns the
    last parse."""
    last = {}

    def ok():
        last["f"] = scrape(g)
        return all(requests_of(last["f"], r).get(c, 0) == n
                   for r, codes in want.items() for c, n in codes.items())

    poll(ok, timeout, interval=0.05)
    return last["f"]


@pytest.fixture
def gw(gateway, backend):
    b = backend()
    g = gateway(config(ROUTES, UPSTREAMS), B1=b.addr)
    g.backend = b
    return g


HELLO = """\
  - name: hello
    match: {path_prefix: /}
    direct_response: {status: 200, body: "hi"}
"""


def hello_metrics(gateway, top, n):
    """Starts a gateway whose one route, `hello`, answers by itself, with `top` added to its
    config; sends it `n` requests and returns the /metrics parse once they are counted."""
    g = gateway(config(HELLO, top=top))
    get(g, "/", n)
    return wait_total(g, {"hello": {"2xx": n}})


def test_metrics_parse_before_any_request(gw):
    fams = scrape(gw)
    for name in ("sluice_requests_total", "sluice_request_duration_seconds",
                 "sluice_event_loop_lag_seconds", "sluice_worker_cpu_utilization",
                 "sluice_connections_open", "sluice_build_info", "sluice_upstream_endpoint_up",
                 "sluice_listener_connections_accepted_total"):
        assert name in fams, name
        assert fams[name].help and fams[name].type, name
    # the routes of the config are there from the start, at zero
    assert requests_of(fams, "hello") == {c: 0 for c in ("1xx", "2xx", "3xx", "4xx", "5xx",
                                                         "none")}
    assert promparse.value(fams, "sluice_config_generation") == 1
    assert promparse.value(fams, "sluice_draining") == 0


def test_requests_counted_per_route_and_code(gw):
    assert get(gw, "/hello", 7) == [200] * 7
    assert get(gw, "/api/x", 5) == [200] * 5
    assert get(gw, "/nowhere") == [404]
    want = {"hello": {"2xx": 7}, "api": {"2xx": 5}, "(none)": {"4xx": 1}}
    fams = wait_total(gw, want)
    assert requests_of(fams, "hello") == {"1xx": 0, "2xx": 7, "3xx": 0, "4xx": 0, "5xx": 0,
                                          "none": 0}
    assert requests_of(fams, "api") == {"1xx": 0, "2xx": 5, "3xx": 0, "4xx": 0, "5xx": 0,
                                        "none": 0}
    assert requests_of(fams, "(none)")["4xx"] == 1
    errors = fams["sluice_gateway_errors_total"]
    assert errors.value(route="(none)", reason="no_route") == 1
    assert errors.find(route="hello") == [] and errors.find(route="api") == []

    dur = fams["sluice_request_duration_seconds"]
    assert dur.histogram(route="hello").count == 7
    assert dur.histogram(route="api").count == 5
    up = fams["sluice_upstream_duration_seconds"]
    # only requests that reached an upstream: the proxied ones, none of the direct ones
    assert up.histogram(route="api").count == 5
    assert up.histogram(route="hello").count == 0
    assert 0 < up.histogram(route="api").sum <= dur.histogram(route="api").sum
    cpu = fams["sluice_request_cpu_seconds"].histogram(route="hello")
    assert cpu.count == 7 and cpu.sum > 0
    by = fams["sluice_request_bytes_total"]
    assert by.value(route="hello", direction="in") > 7 * len("GET /hello HTTP/1.1\r\n")
    assert by.value(route="hello", direction="out") > 7 * len("HTTP/1.1 200 OK\r\n")
    assert fams["sluice_retries_total"].value(route="api") == 0
    # the backend saw exactly what the metrics say was proxied
    assert len(gw.backend.requests) == 5


def test_rate_limited_requests_show_as_rejections(gw):
    statuses = get(gw, "/limited", 4)
    assert statuses == [200, 429, 429, 429], statuses
    fams = wait_total(gw, {"limited": {"2xx": 1, "4xx": 3}})
    assert requests_of(fams, "limited")["4xx"] == 3
    rej = fams["sluice_rejections_total"]
    assert rej.value(route="limited", filter="rate_limit", reason="rate_limited") == 3
    assert fams["sluice_gateway_errors_total"].find(route="limited") == []


def test_saturation_signals_present_and_sane(gw):
    get(gw, "/hello", 20)
    first = scrape(gw)
    workers = {s.labels["worker"] for s in first["sluice_worker_cpu_utilization"].samples}
    assert workers == {"0", "1"}
    for w in workers:
        lag = first["sluice_event_loop_lag_seconds"].histogram(worker=w)
        assert lag.sum >= 0 and lag.count >= 0
        assert first["sluice_event_loop_lag_max_seconds"].value(worker=w) >= 0
        assert first["sluice_event_loop_busy_seconds_total"].value(worker=w) >= 0
        u = first["sluice_worker_cpu_utilization"].value(worker=w)
        assert 0 <= u <= 1, (w, u)
    # the worker that answered has used CPU and waited for its loop at least once
    total_lag = sum(first["sluice_event_loop_lag_seconds"].histogram(worker=w).count
                    for w in workers)
    assert total_lag > 0
    cpu1 = {w: first["sluice_worker_cpu_seconds_total"].value(worker=w) for w in workers}
    assert sum(cpu1.values()) > 0
    proc1 = promparse.value(first, "sluice_process_cpu_seconds_total")
    # the process includes its workers (the process figure is read first, hence the slack)
    assert proc1 + 0.05 >= sum(cpu1.values())
    assert promparse.value(first, "sluice_process_resident_memory_bytes") > 1 << 20
    assert promparse.value(first, "sluice_process_start_time_seconds") > 1.6e9

    get(gw, "/hello", 20)
    second = scrape(gw)
    for w in workers:
        assert second["sluice_worker_cpu_seconds_total"].value(worker=w) >= cpu1[w]
        assert 0 <= second["sluice_worker_cpu_utilization"].value(worker=w) <= 1
    assert promparse.value(second, "sluice_process_cpu_seconds_total") >= proc1


def test_connections_open(gw):
    with gw.connect() as c:
        c.send(build_request("GET", "/hello"))
        assert c.read_response().status == 200
        # the keep-alive connection stays open (the admin listener's own does not count)
        assert poll(lambda: promparse.value(scrape(gw), "sluice_connections_open") == 1, 5)
    assert poll(lambda: promparse.value(scrape(gw), "sluice_connections_open") == 0, 5)


def test_upstream_endpoint_health(gateway, backend):
    b = backend()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
    dead_addr = "127.0.0.1:%d" % dead.getsockname()[1]
    ups = """\
  - name: app
    endpoints: [{address: $B1, zone: z1}]
    circuit_breaker: {max_requests: 50}
  - name: gone
    endpoints: [{address: $DEAD}]
    health:
      passive: {consecutive_failures: 1, ejection: 60s}
"""
    routes = """\
  - name: api
    match: {path_prefix: /api}
    upstream: app
  - name: down
    match: {path_prefix: /down}
    upstream: gone
"""
    g = gateway(config(routes, ups), B1=b.addr, DEAD=dead_addr)
    try:
        assert get(g, "/api", 2) == [200, 200]
        assert get(g, "/down")[0] in (502, 503)
        fams = wait_total(g, {"api": {"2xx": 2}})

        def ejected():
            f = scrape(g)
            return f["sluice_upstream_endpoint_up"].value(
                upstream="gone", endpoint=dead_addr, zone="") == 0 and f

        fams = poll(ejected, 5)
        assert fams, "the refused endpoint never showed as down"
        up = fams["sluice_upstream_endpoint_up"]
        assert up.value(upstream="app", endpoint=b.addr, zone="z1") == 1
        st = fams["sluice_upstream_endpoint_state"]
        assert st.value(upstream="app", endpoint=b.addr, state="closed") == 1
        assert st.value(upstream="app", endpoint=b.addr, state="open") == 0
        assert st.value(upstream="gone", endpoint=dead_addr, state="open") == 1
        assert st.value(upstream="gone", endpoint=dead_addr, state="closed") == 0
        assert fams["sluice_upstream_ejections_total"].value(upstream="gone") >= 1
        assert fams["sluice_upstream_endpoints_ejected"].value(upstream="gone") == 1
        # the breaker gauge is there with its limit for the upstream that sets one
        assert fams["sluice_upstream_max_requests"].value(upstream="app") == 50
        assert fams["sluice_upstream_requests_in_flight"].value(upstream="app") == 0
        assert fams["sluice_upstream_max_requests"].find(upstream="gone") == []
        assert requests_of(fams, "down")["5xx"] == 1
        reasons = {s.labels["reason"] for s in
                   fams["sluice_gateway_errors_total"].find(route="down")}
        assert reasons and all(r.startswith("upstream_") for r in reasons), reasons
    finally:
        dead.close()


def test_route_series_continue_across_reload(gateway):
    routes_v1 = """\
  - name: keep
    match: {path_prefix: /keep}
    direct_response: {status: 200, body: "k"}
  - name: old
    match: {path_prefix: /old}
    direct_response: {status: 200, body: "o"}
"""
    routes_v2 = """\
  - name: new
    match: {path_prefix: /new}
    direct_response: {status: 201, body: "n"}
  - name: keep
    match: {path_prefix: /keep}
    direct_response: {status: 200, body: "k2"}
"""
    g = gateway(config(routes_v1))
    assert get(g, "/keep", 3) == [200] * 3
    assert get(g, "/old") == [200]
    wait_total(g, {"keep": {"2xx": 3}, "old": {"2xx": 1}})
    text = string.Template(config(routes_v2)).substitute(
        {"PORT_" + n: str(p) for n, p in g.ports.items()})
    tmp = g.config_path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, g.config_path)
    g.signal(signal.SIGHUP)
    assert poll(lambda: promparse.value(scrape(g), "sluice_config_generation") == 2, 10), \
        g.diag()
    assert get(g, "/keep", 2) == [200] * 2
    assert get(g, "/new") == [201]
    fams = wait_total(g, {"keep": {"2xx": 5}, "new": {"2xx": 1}})
    assert requests_of(fams, "keep")["2xx"] == 5
    assert requests_of(fams, "old")["2xx"] == 1  # gone from the config, its count stays
    assert fams["sluice_reloads_total"].value(result="ok") == 1


def test_cost_metrics_when_priced(gateway):
    fams = hello_metrics(gateway, "cost: {vcpu_hour_usd: 0.0181}", 10)
    assert promparse.value(fams, "sluice_vcpu_hour_usd") == 0.0181
    per_req = promparse.value(fams, "sluice_cpu_seconds_per_request")
    assert per_req > 0
    cost = fams["sluice_estimated_cost_usd_per_million_requests"]
    overall = cost.value()
    # CPU seconds per request x 1e6 / 3600 x price; the process's CPU moved on between the
    # two gauges' readings, so allow a little
    assert overall == pytest.approx(per_req * 1e6 / 3600 * 0.0181, rel=0.5)
    route_cost = cost.value(route="hello")
    cpu = fams["sluice_request_cpu_seconds"].histogram(route="hello")
    assert route_cost == pytest.approx(cpu.sum / cpu.count * 1e6 / 3600 * 0.0181, rel=1e-6)
    assert 0 < route_cost <= overall


def test_no_cost_metrics_without_price(gw):
    get(gw, "/hello", 2)
    fams = wait_total(gw, {"hello": {"2xx": 2}})
    assert "sluice_vcpu_hour_usd" not in fams
    assert "sluice_estimated_cost_usd_per_million_requests" not in fams
    assert promparse.value(fams, "sluice_cpu_seconds_per_request") > 0


def test_access_log_counters(gateway, tmp_path):
    fams = hello_metrics(gateway, "access_log: {directory: %s}" % (tmp_path / "alog"), 3)
    recs = fams["sluice_access_log_records_total"]
    assert {s.labels["result"] for s in recs.samples} == {"written", "dropped_full",
                                                          "dropped_io"}
    assert recs.value(result="dropped_full") == 0 and recs.value(result="dropped_io") == 0
    assert "sluice_access_log_segments_total" in fams


def wait_closed(s):
    """Reads until the gateway closes (or resets) a connection it refused."""
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass


def test_listener_tls_and_proxy_protocol_counters(gateway, tmp_path):
    import ssl

    from filter_peers import tls_files

    ca, cert, key = tls_files(tmp_path)
    text = """workers: 2
drain_timeout: 3s
admin: {address: 127.0.0.1:$PORT_admin}
listeners:
  - name: secure
    address: 127.0.0.1:$PORT_secure
    tls: {certificates: [{cert: %s, key: %s}]}
  - name: pp
    address: 127.0.0.1:$PORT_pp
    proxy_protocol: {accept: true, trusted: [127.0.0.1/32]}
routes:
  - name: hello
    match: {path_prefix: /}
    direct_response: {status: 200, body: "hi"}
""" % (cert, key)
    g = gateway(text)
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", g.ports["secure"]), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(build_request("GET", "/", headers=[("Connection", "close")]))
            assert s.recv(100).startswith(b"HTTP/1.1 200")
    with socket.create_connection(("127.0.0.1", g.ports["secure"]), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not a TLS record: a failed handshake
        wait_closed(s)
    with socket.create_connection(("127.0.0.1", g.ports["pp"]), timeout=5) as s:
        s.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 4321 80\r\n" +
                  build_request("GET", "/", headers=[("Connection", "close")]))
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    with socket.create_connection(("127.0.0.1", g.ports["pp"]), timeout=5) as s:
        s.sendall(b"PROXY TCP4 not-an-address\r\n")
        wait_closed(s)

    # The start-up readiness probe connects to each listener and closes at once, which the
    # gateway may count as a failed handshake or a missing PROXY header: hence ">=" for
    # those, and exact counts for what only this test's connections can produce.
    def counted():
        f = scrape(g)
        return (f["sluice_tls_handshake_failures_total"].value(listener="secure",
                                                               reason="failed") >= 1
                and f["sluice_proxy_protocol_total"].value(listener="pp",
                                                           result="malformed") >= 1) and f

    fams = poll(counted, 5)
    assert fams, scrape_raw(g)
    hs = fams["sluice_tls_handshakes_total"]
    assert hs.value(listener="secure", resumed="false") == 1
    assert hs.value(listener="secure", resumed="true") == 0
    assert hs.find(listener="pp") == []  # a plain listener has no TLS series
    assert fams["sluice_tls_handshake_failures_total"].value(listener="secure",
                                                             reason="timeout") == 0
    assert fams["sluice_tls_certificate_reloads_total"].value(listener="secure",
                                                              result="ok") == 0
    ppc = fams["sluice_proxy_protocol_total"]
    assert ppc.value(listener="pp", result="accepted") == 1
    assert ppc.find(listener="secure") == []
    # every connection that passed the accept path (before TLS or PROXY) is counted
    acc = fams["sluice_listener_connections_accepted_total"]
    assert acc.value(listener="secure") >= 2
    assert acc.value(listener="pp") >= 2
    refused = fams["sluice_listener_connections_refused_total"]
    assert refused.value(listener="pp", reason="denied") == 0


def documented_families():
    """{family: (type, {labels})} from the tables of docs/metrics.md."""
    from helpers import REPO

    out = {}
    with open(os.path.join(REPO, "docs", "metrics.md")) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) != 4 or not cells[0].startswith("`sluice_"):
                continue
            labels = set(re.findall(r"`([a-z_]+)`", cells[2]))
            for name in re.findall(r"`(sluice_[a-z_]+)`", cells[0]):
                out[name] = (cells[1], labels)
    return out


def test_docs_list_every_family_with_its_type_and_labels(gateway, tmp_path):
    top = "cost: {vcpu_hour_usd: 0.02}\naccess_log: {directory: %s}" % (tmp_path / "alog")
    fams = hello_metrics(gateway, top, 2)
    docs = documented_families()
    # the shipper's families need a collector: test_log_ship_counters covers them
    missing = set(docs) - set(fams) - SHIP_FAMILIES
    assert set(fams) <= set(docs) and not missing, (sorted(set(fams) - set(docs)),
                                                    sorted(missing))
    for name, fam in fams.items():
        typ, labels = docs[name]
        assert fam.type == typ, (name, fam.type, typ)
        for s in fam.samples:
            extra = set(s.labels) - labels - {"le"}
            assert not extra, (name, extra)


SHIP_FAMILIES = {"sluice_access_log_shipped_segments_total", "sluice_access_log_shipped_bytes_total",
                 "sluice_access_log_ship_failures_total", "sluice_access_log_ship_queued_segments"}


def test_log_ship_counters(gateway, tmp_path):
    from test_log_ship import Collector

    col = Collector()
    try:
        top = ("access_log:\n  directory: %s\n  segment: {max_age: 500ms}\n"
               "  flush_interval: 50ms\n  ship: {url: http://127.0.0.1:%d/ingest}"
               % (tmp_path / "alog", col.port))
        g = gateway(config(HELLO, top=top))
        get(g, "/", 3)

        def shipped():
            f = scrape(g)
            fam = f.get("sluice_access_log_shipped_segments_total")
            return fam and fam.value() >= 1 and f

        fams = poll(shipped, 10)
        assert fams, scrape_raw(g)
        with col.lock:
            segments = len(col.segments)
        assert segments >= promparse.value(fams, "sluice_access_log_shipped_segments_total")
        assert promparse.value(fams, "sluice_access_log_shipped_bytes_total") > 0
        assert promparse.value(fams, "sluice_access_log_ship_failures_total") == 0
        assert promparse.value(fams, "sluice_access_log_ship_queued_segments") >= 0
        assert fams["sluice_access_log_records_total"].value(result="written") >= 3
    finally:
        col.stop()
