"""Endpoints added and removed at run time while requests retry across them: a request keeps
the endpoints it tried alive until it ends (it compares against them on each retry), so an
endpoint set that drops one mid-request is no use after free (checked by the ASan build, whose
reports fail the gateway fixture)."""

import http.client
import json
import threading
import time

from helpers import free_port, http_get, poll

CONFIG = """workers: 2
admin: {address: 127.0.0.1:$PORT_admin}
access_log: {directory: $LOGS}
listeners:
  - name: public
    address: 127.0.0.1:$PORT_public
upstreams:
  - name: app
    balance: round_robin
    endpoints: [{address: $B1}]
    retries: {attempts: 3, on: [connect_failure]}
routes:
  - {name: r, match: {path_prefix: /}, upstream: app}
"""


def admin(g, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", g.ports["admin"], timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def test_endpoints_removed_while_requests_retry_across_them(gateway, backend, tmp_path):
    """(The access log reads the last endpoint's address when the request is freed, after a
    DELETE may have dropped it from the set.)"""
    b = backend()
    g = gateway(CONFIG, B1=b.addr, LOGS=str(tmp_path / "logs"))
    dead = ["127.0.0.1:%d" % free_port() for _ in range(6)]  # nothing listens there
    stop = time.monotonic() + 4
    statuses = []
    churns = [0]

    def traffic():
        while time.monotonic() < stop:
            try:
                statuses.append(http_get(g.port, "/x", timeout=10)[0])
            except OSError as e:
                statuses.append(repr(e))

    def churn():
        i = 0
        while time.monotonic() < stop:
            a = dead[i % len(dead)]
            i += 1
            if admin(g, "POST", "/upstreams/app/endpoints", json.dumps({"address": a})) == 201:
                admin(g, "DELETE", "/upstreams/app/endpoints/" + a)
                churns[0] += 1

    ts = [threading.Thread(target=traffic) for _ in range(3)] + [threading.Thread(target=churn)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert g.alive(), g.diag()
    assert churns[0] > 20, churns
    # every request got an answer: the live endpoint, or a retry that found it
    bad = [s for s in statuses if s != 200]
    assert len(statuses) > 50 and not bad, (len(statuses), bad[:10])
    assert poll(lambda: http_get(g.port, "/after")[0] == 200, 5)
