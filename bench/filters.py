#!/usr/bin/python3
"""Filters benchmark driver: what sluice's filters cost per request. Run it through
bench/filters.sh, which installs what is missing, builds the backend and pins this driver to
the load core.

Scenarios, all against the same backend (bench/backend.c) with the same wrk settings, sluice
with `workers: 1` pinned to the proxy core (configs in bench/conf/filters-*.yaml.in):
  bare                 no filters: the baseline
  jwt-hs256            jwt HS256, default caches (one token repeated: served from the cache)
  jwt-hs256-nocache    jwt HS256, cache_size 0 + negative_cache_size 0 (HMAC every request)
  jwt-es256            jwt ES256 (public_key_file, P-256 PEM), default caches
  jwt-es256-nocache    jwt ES256, no caches (ECDSA verification every request)
  ratelimit            local rate_limit, 1000000/s (the maximum) keyed by ip (never refuses)
  jwt-hs256+ratelimit  jwt HS256 cached, then the local rate_limit (issue target: <= 1.10x bare)
  ratelimit-global     the rate_limit with scope: global on a redis-server this driver starts
                       on the load core (--save '' --appendonly no); Redis's own CPU time per
                       request and its commands per request are reported separately.

The peers, Debian 12's HAProxy 2.6 and nginx 1.22 (nginx-light), measured the same way (same
backend, pinned to the same proxy core, same wrk settings and token header; configs in
bench/conf/filters-haproxy-*.cfg.in and filters-nginx-*.conf.in). They are not in the default
selection: `--only peers` (or their names) adds them; each ratio is also given to the peer's
own bare scenario, which is added whenever one of its filter scenarios is selected:
  haproxy-bare                 HAProxy, `nbthread 1`, keep-alive to the backend
  haproxy-jwt-hs256            jwt_header_query alg == HS256, jwt_verify("HS256", secret) == 1
                               and exp (jwt_payload_query) > date: no cache, HMAC every request
  haproxy-ratelimit            stick-table per source IP (http_req_rate(1s)), deny 429 above
                               1000000/s
  haproxy-jwt-hs256+ratelimit  both, jwt first
  nginx-bare                   nginx, `worker_processes 1` (master + worker counted)
  nginx-ratelimit              limit_req_zone $binary_remote_addr rate=1000000r/s, limit_req
                               burst=1000 nodelay (status 429)
nginx-light has no JWT module (auth_jwt is nginx Plus only): no nginx jwt scenario.
For the peers' rate limits, which add no response headers, the driver first starts the same
config with a tiny limit and checks that requests beyond it get 429.

Per run (scenario order rotated every run), each scenario gets a fresh sluice process; before
measuring, the driver checks that the filter really runs (jwt: no token -> 401, a token with a
bad signature -> 401, an expired token with a good signature -> 401, the token -> 200; rate_limit: RateLimit-* headers on the 200; global:
Redis sees the calls), then a wrk warm-up and `wrk -t1 -cC -dD` with the token in an
`Authorization: Bearer` header (scenarios without jwt send the HS256 token too, so requests
have the same size everywhere). CPU-µs/request = sluice's utime+stime over the window /
requests (all the proxy's processes). A run with any non-2xx response or socket error is marked invalid and left out of
the medians. Results go to bench/results/<stamp>-filters/.
"""
import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench  # noqa: E402  (helpers: /proc accounting, processes, wrk parsing)
from bench import (children, cpu_stat, cpu_stat_delta, cpu_ticks, fmt, free_port,  # noqa: E402
                   http_get, kill_all, log, med, parse_wrk, rng, stop, tree, wait_port,
                   wait_quiet, CLK_TCK)

# name, template, substitutions, token kind (None: no jwt), rate limited, needs redis,
# proxy, the scenario its "× own bare" ratio divides by
Scenario = collections.namedtuple("Scenario", "name template subs token limited redis proxy base",
                                  defaults=("sluice", "bare"))
HP, NX = dict(proxy="haproxy", base="haproxy-bare"), dict(proxy="nginx", base="nginx-bare")
SCENARIOS = [
    Scenario("bare", "filters-bare.yaml.in", {}, None, False, False),
    Scenario("jwt-hs256", "filters-jwt-hs256.yaml.in",
             {"CACHE_SIZE": "4096", "NEG_CACHE_SIZE": "1024"}, "hs256", False, False),
    Scenario("jwt-hs256-nocache", "filters-jwt-hs256.yaml.in",
             {"CACHE_SIZE": "0", "NEG_CACHE_SIZE": "0"}, "hs256", False, False),
    Scenario("jwt-es256", "filters-jwt-es256.yaml.in",
             {"CACHE_SIZE": "4096", "NEG_CACHE_SIZE": "1024"}, "es256", False, False),
    Scenario("jwt-es256-nocache", "filters-jwt-es256.yaml.in",
             {"CACHE_SIZE": "0", "NEG_CACHE_SIZE": "0"}, "es256", False, False),
    Scenario("ratelimit", "filters-ratelimit.yaml.in", {}, None, True, False),
    Scenario("jwt-hs256+ratelimit", "filters-jwt-ratelimit.yaml.in", {}, "hs256", True, False),
    Scenario("ratelimit-global", "filters-ratelimit-global.yaml.in", {}, None, True, True),
]
# The peers: same backend, core, wrk settings and token header (see the docstring).
PEER_SCENARIOS = [
    Scenario("haproxy-bare", "filters-haproxy-bare.cfg.in", {}, None, False, False, **HP),
    Scenario("haproxy-jwt-hs256", "filters-haproxy-jwt-hs256.cfg.in", {}, "hs256", False, False,
             **HP),
    Scenario("haproxy-ratelimit", "filters-haproxy-ratelimit.cfg.in", {"RATE": "1000000"}, None,
             True, False, **HP),
    Scenario("haproxy-jwt-hs256+ratelimit", "filters-haproxy-jwt-ratelimit.cfg.in",
             {"RATE": "1000000"}, "hs256", True, False, **HP),
    Scenario("nginx-bare", "filters-nginx-bare.conf.in", {}, None, False, False, **NX),
    Scenario("nginx-ratelimit", "filters-nginx-ratelimit.conf.in",
             {"RATE": "1000000r/s", "BURST": "1000"}, None, True, False, **NX),
]
# The limiter check for the peers' rate-limit scenarios: the same config with these values
# must refuse (429) within a few requests.
TINY_LIMIT = {"haproxy": {"RATE": "2"}, "nginx": {"RATE": "1r/s", "BURST": "1"}}
SLUICE_NAMES = [s.name for s in SCENARIOS]
PEER_NAMES = [s.name for s in PEER_SCENARIOS]
NAMES = SLUICE_NAMES + PEER_NAMES
SCEN = {s.name: s for s in SCENARIOS + PEER_SCENARIOS}
TARGET = ("jwt-hs256+ratelimit", 1.10)


# ---------------------------------------------------------------- keys and tokens
def make_keys(workdir):
    """HS256 secret, ES256 key pair (PEM public key written to workdir) and one token each."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    secret = os.urandom(24).hex()  # 48 ASCII bytes (>= 32)
    priv = ec.generate_private_key(ec.SECP256R1())
    pub_pem = priv.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_file = os.path.join(workdir, "es256-public.pem")
    with open(pub_file, "wb") as f:
        f.write(pub_pem)
    now = int(time.time())
    claims = {"sub": "bench-user", "iat": now - 60, "exp": now + 86400}
    tok = {"hs256": jwt.encode(claims, secret, algorithm="HS256"),
           "es256": jwt.encode(claims, priv, algorithm="ES256")}
    tok = {k: v.decode() if isinstance(v, bytes) else v for k, v in tok.items()}
    # Same header and claims, signature of the other key: must be refused (bad_signature).
    bad = {"hs256": jwt.encode(claims, secret + "x", algorithm="HS256"),
           "es256": jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()),
                               algorithm="ES256")}
    bad = {k: v.decode() if isinstance(v, bytes) else v for k, v in bad.items()}
    # Good signature, expired an hour ago (beyond any leeway): must be refused.
    old = {"sub": "bench-user", "iat": now - 7200, "exp": now - 3600}
    expired = {"hs256": jwt.encode(old, secret, algorithm="HS256"),
               "es256": jwt.encode(old, priv, algorithm="ES256")}
    expired = {k: v.decode() if isinstance(v, bytes) else v for k, v in expired.items()}
    return {"SECRET": secret, "PUBLIC_KEY_FILE": pub_file}, tok, bad, expired


# ---------------------------------------------------------------- HTTP and Redis checks
def http_req(port, headers=(), timeout=5.0):
    """One GET over a fresh connection; returns (status, {lower-case header: value}, body)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        req = "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
        req += "".join("%s: %s\r\n" % h for h in headers) + "\r\n"
        s.sendall(req.encode())
        data = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    m = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    hdrs = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return (int(m.group(1)) if m else None), hdrs, body


def redis_cmd(port, *args):
    """One command over a fresh connection (RESP); returns the raw reply bytes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        msg = "*%d\r\n" % len(args) + "".join("$%d\r\n%s\r\n" % (len(a), a) for a in args)
        s.sendall(msg.encode())
        data = b""
        end = time.time() + 5
        while time.time() < end:
            b = s.recv(65536)
            if not b:
                break
            data += b
            if data.startswith(b"$"):
                n = int(data[1:data.index(b"\r\n")])
                if n < 0 or len(data) >= data.index(b"\r\n") + 2 + n + 2:
                    break
            elif data.endswith(b"\r\n"):
                break
        return data
    finally:
        s.close()


def redis_stat(port, key):
    m = re.search(rb"^%s:(\d+)" % key.encode(), redis_cmd(port, "INFO", "stats"), re.M)
    return int(m.group(1)) if m else None


def redis_script_calls(port):
    """EVAL + EVALSHA calls so far (one per round trip of sluice's GCRA script; the script's
    own TIME/GET/SET also count in total_commands_processed)."""
    info = redis_cmd(port, "INFO", "commandstats")
    return sum(int(m) for m in re.findall(rb"^cmdstat_eval(?:sha)?:calls=(\d+)", info, re.M))


def redis_dbsize(port):
    m = re.match(rb":(\d+)", redis_cmd(port, "DBSIZE"))
    return int(m.group(1)) if m else None


def verify(name, port, token, bad, limited, redis_port, proxy="sluice", expired=None):
    """Raises unless the filter really runs on this proxy. Returns a short description.
    `bad` is None for scenarios without jwt (the token is then only payload). Only sluice
    names the reason in the body and adds RateLimit-* headers; the peers' rate limits are
    checked separately (limiter_check)."""
    auth = [("Authorization", "Bearer " + token)] if token else []
    notes = []
    if bad:
        st, h, body = http_req(port)
        if st != 401:
            raise RuntimeError("no token: %s instead of 401" % st)
        st, h, body = http_req(port, [("Authorization", "Bearer " + bad)])
        if st != 401 or (proxy == "sluice" and b"bad_signature" not in body):
            raise RuntimeError("bad signature: %s %r instead of 401%s"
                               % (st, body[:80], " bad_signature" if proxy == "sluice" else ""))
        notes.append("no token 401, bad signature 401")
        if expired:
            st, h, body = http_req(port, [("Authorization", "Bearer " + expired)])
            if st != 401:
                raise RuntimeError("expired token: %s %r instead of 401" % (st, body[:80]))
            notes.append("expired 401")
    before = redis_stat(redis_port, "total_commands_processed") if redis_port else None
    for _ in range(3):  # the uncached paths are the same every time; cached: miss then hits
        st, h, body = http_req(port, auth)
        if st != 200:
            raise RuntimeError("request with the token: %s instead of 200: %r"
                               % (st, body[:120]))
    notes.append("%s200" % ("token " if bad else "with the HS256 token as payload: "))
    if limited and proxy == "sluice":
        if "ratelimit-limit" not in h:
            raise RuntimeError("no RateLimit-Limit header on the 200: is rate_limit running?")
        notes.append("RateLimit-Limit: %s, Remaining: %s" % (h.get("ratelimit-limit"),
                                                              h.get("ratelimit-remaining")))
    if redis_port:
        after = redis_stat(redis_port, "total_commands_processed")
        if after is None or after - before < 3 + 1:  # 3 calls + our INFO
            raise RuntimeError("Redis processed %s commands for 3 requests"
                               % (after - before if after is not None else "?"))
        notes.append("Redis saw the calls, dbsize %s" % redis_dbsize(redis_port))
    return "; ".join(notes)


# ---------------------------------------------------------------- processes
class Proxy:
    """One proxy process (sluice, haproxy or nginx) on a rendered template."""
    CONF = {"sluice": "sluice.yaml", "haproxy": "haproxy.cfg", "nginx": "nginx.conf"}

    def __init__(self, kind, binary, template, subs, workdir, backend_port, core):
        self.kind, self.binary, self.template, self.subs = kind, binary, template, subs
        self.workdir, self.backend_port, self.core = workdir, backend_port, core
        self.proc = None
        self.port = None

    def render(self):
        with open(os.path.join(HERE, "conf", self.template)) as f:
            text = f.read()
        subs = dict(self.subs, PORT=str(self.port), BACKEND_PORT=str(self.backend_port),
                    PREFIX=self.workdir)
        for k, v in subs.items():
            text = text.replace("@%s@" % k, v)
        left = re.findall(r"@[A-Z_]+@", re.sub(r"(?m)^\s*#.*$", "", text))
        if left:
            raise RuntimeError("%s: unfilled %s" % (self.template, ", ".join(sorted(set(left)))))
        conf = os.path.join(self.workdir, self.CONF[self.kind])
        with open(conf, "w") as f:
            f.write(text)
        return conf

    def command(self, conf, test=False):
        if self.kind == "sluice":
            return [self.binary] + (["-t"] if test else []) + ["-c", conf]
        if self.kind == "haproxy":
            return [self.binary, "-c" if test else "-db", "-f", conf]
        return ([self.binary] + (["-t"] if test else []) +
                ["-p", self.workdir, "-e", os.path.join(self.workdir, "nginx-error.log"),
                 "-c", conf])

    def check(self):
        """sluice -t / haproxy -c / nginx -t on the rendered config: returns (ok, output)."""
        self.port = self.port or free_port()
        os.makedirs(self.workdir, exist_ok=True)
        conf = self.render()
        p = subprocess.run(self.command(conf, test=True), capture_output=True, text=True,
                           timeout=30)
        return p.returncode == 0, (p.stdout + p.stderr).strip()

    def start(self):
        self.port = free_port()
        os.makedirs(self.workdir, exist_ok=True)
        conf = self.render()
        logf = open(os.path.join(self.workdir, "%s.log" % self.kind), "ab")
        self.proc = subprocess.Popen(["taskset", "-c", str(self.core)] + self.command(conf),
                                     stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.STDOUT)
        logf.close()
        children[self.proc.pid] = self.kind
        if not wait_port(self.port, proc=self.proc):
            self.stop()
            raise RuntimeError("%s did not start listening (see %s)" % (self.kind, self.workdir))
        # nginx: the worker must exist before anything is measured
        end = time.time() + 5
        while self.kind == "nginx" and len(self.pids()) < 2 and time.time() < end:
            time.sleep(0.05)
        return self

    def pids(self):
        return tree(self.proc.pid) if self.proc else []

    def stop(self):
        if self.proc is not None:
            stop(self.proc, self.kind)
            self.proc = None


def limiter_check(sc, binary, subs, token, workdir, backend_port, core):
    """The peers' rate limits add no headers: start the scenario's config with a tiny limit
    and check that a few requests in a row end in 429. Returns a short description."""
    px = Proxy(sc.proxy, binary, sc.template, dict(subs, **TINY_LIMIT[sc.proxy]), workdir,
               backend_port, core)
    try:
        px.start()
        codes = [http_req(px.port, [("Authorization", "Bearer " + token)])[0] for _ in range(6)]
    finally:
        px.stop()
    if codes[0] != 200 or 429 not in codes:
        raise RuntimeError("limiter check (%s): statuses %s, expected 200 then 429"
                           % (", ".join("%s=%s" % kv for kv in TINY_LIMIT[sc.proxy].items()),
                              codes))
    return "limiter active: with %s, 6 requests gave %s" % (
        ", ".join("%s=%s" % kv for kv in TINY_LIMIT[sc.proxy].items()),
        " ".join(str(c) for c in codes))


def start_redis(core, workdir):
    port = free_port()
    os.makedirs(workdir, exist_ok=True)
    logf = open(os.path.join(workdir, "redis.log"), "ab")
    p = subprocess.Popen(["taskset", "-c", str(core), "redis-server", "--port", str(port),
                          "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", workdir, "--protected-mode", "yes"],
                         stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    logf.close()
    children[p.pid] = "redis"
    if not wait_port(port, proc=p) or not redis_cmd(port, "PING").startswith(b"+PONG"):
        stop(p, "redis")
        raise RuntimeError("redis-server did not start (see %s/redis.log)" % workdir)
    return p, port


# ---------------------------------------------------------------- wrk
def run_wrk(port, conns, duration, core, token, latency=True, timeout_extra=30):
    cmd = ["taskset", "-c", str(core), "wrk", "-t1", "-c%d" % conns, "-d%ds" % duration]
    if token:
        cmd += ["-H", "Authorization: Bearer " + token]
    if latency:
        cmd.append("--latency")
    cmd.append("http://127.0.0.1:%d/" % port)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children[p.pid] = "wrk"
    try:
        out, _ = p.communicate(timeout=duration + timeout_extra)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        out += "\n(wrk timed out)\n"
    children.pop(p.pid, None)
    return out


def measure(sl, token, args, outdir, tag, redis_proc=None, redis_port=None):
    """sl: a started Proxy (sluice or a peer); CPU time is that of its whole process tree."""
    waited, busy_before = wait_quiet(args.quiet_wait) if args.quiet_wait else (0, None)
    if args.warmup:
        run_wrk(sl.port, args.conns, args.warmup, args.load_core, token, latency=False)
    pids = sl.pids()
    rpids = [redis_proc.pid] if redis_proc else []
    rc0 = redis_stat(redis_port, "total_commands_processed") if redis_port else None
    re0 = redis_script_calls(redis_port) if redis_port else None
    s0 = cpu_stat()
    c0, r0, t0 = cpu_ticks(pids), cpu_ticks(rpids), time.monotonic()
    out = run_wrk(sl.port, args.conns, args.duration, args.load_core, token)
    c1, r1, t1 = cpu_ticks(sl.pids()), cpu_ticks(rpids), time.monotonic()
    s1 = cpu_stat()
    rc1 = redis_stat(redis_port, "total_commands_processed") if redis_port else None
    re1 = redis_script_calls(redis_port) if redis_port else None
    with open(os.path.join(outdir, "wrk-%s.txt" % tag), "w") as f:
        f.write(out)
    r = parse_wrk(out)
    cpu_s = (c1 - c0) / CLK_TCK
    r.update(cpu_s=cpu_s, wall_s=t1 - t0, cpu_pct=100.0 * cpu_s / (t1 - t0),
             quiet_wait_s=waited, busy_before_pct=busy_before)
    n = r.get("requests")
    if n:
        r["cpu_us_per_req"] = cpu_s * 1e6 / n
    pc = cpu_stat_delta(s0, s1, args.proxy_core)
    if pc:
        r["proxy_core_busy_pct"] = pc["busy_pct"] + pc["irq_pct"]
        # Work on the proxy core that was not the proxy's: other jobs on this shared machine.
        r["foreign_pct"] = max(0.0, r["proxy_core_busy_pct"] - r["cpu_pct"])
        r["proxy_core_steal_pct"] = pc["steal_pct"]
    lc = cpu_stat_delta(s0, s1, args.load_core)
    if lc:
        r["load_core_busy_pct"] = lc["busy_pct"] + lc["irq_pct"]
    if redis_proc and n:
        r["redis_cpu_s"] = (r1 - r0) / CLK_TCK
        r["redis_cpu_us_per_req"] = r["redis_cpu_s"] * 1e6 / n
        if rc0 is not None and rc1 is not None:
            r["redis_cmds_per_req"] = (rc1 - rc0 - 2) / n  # minus our two INFOs
            r["redis_calls_per_req"] = (re1 - re0) / n
    problems = []
    if not n:
        problems.append("no request count in wrk output")
    if r.get("non2xx"):
        problems.append("%d non-2xx responses" % r["non2xx"])
    if r.get("socket_errors"):
        problems.append("%d socket errors" % r["socket_errors"])
    if "timed out" in out:
        problems.append("wrk timed out")
    if sl.proc is None or sl.proc.poll() is not None:
        problems.append("%s exited during the run" % sl.kind)
    r["invalid"] = "; ".join(problems) or None
    return r


# ---------------------------------------------------------------- report
def summarize(res, args):
    mi = res["machine"]
    peers = any(SCEN[n].proxy != "sluice" for n in args.only)
    lines = ["Run: %s; %d run(s) × %d s per scenario (+%d s warm-up), `wrk -t1 -c%d`, medians "
             "of the valid runs; %s on core %d, backend + wrk + redis-server "
             "on core %d." % (mi["date"], args.runs, args.duration, args.warmup, args.conns,
                             "the proxy (sluice `workers: 1`, HAProxy `nbthread 1`, nginx "
                             "`worker_processes 1`)" if peers else "sluice (`workers: 1`)",
                             args.proxy_core, args.load_core),
             "Machine: %s, %s CPUs (%s VM), %s, %s. sluice: HEAD %s, binary %s; %s.%s"
             % (mi["cpu_model"], mi["cpus"], mi["hypervisor"] or "bare metal", mi["kernel"],
                mi["os"], mi["sluice"] or "?", mi.get("sluice_binary", "?"),
                mi.get("redis", "redis ?"),
                " Peers: %s; nginx %s (%s)." % ((mi.get("haproxy") or "haproxy ?")
                                                .split(" - ")[0], mi.get("nginx", "?"),
                                                mi.get("nginx_pkg", "?")) if peers else ""),
             ""]
    if peers:
        # Each scenario against its own proxy's bare scenario (the cost of its filters) and
        # against sluice's bare (the absolute comparison).
        lines += ["| # | scenario | req/s | CPU-µs/req median (min–max) | × own bare (medians) | "
                  "× own bare (minima) | × sluice bare (medians) | × sluice bare (minima) | "
                  "proxy CPU % | foreign load on proxy core % | valid runs | notes |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    else:
        lines += ["| # | scenario | req/s | CPU-µs/req median (min–max) | × bare (medians) | "
                  "× bare (minima) | sluice CPU % | foreign load on proxy core % | valid runs | "
                  "notes |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    agg = {}
    for name in args.only:
        rows = [r for r in res["load"] if r["scenario"] == name]
        ok = [r for r in rows if not r.get("invalid")]
        a = {k: med([r.get(k) for r in ok]) for k in
             ("rps", "cpu_us_per_req", "cpu_pct", "foreign_pct", "redis_cpu_us_per_req",
              "redis_cmds_per_req", "redis_calls_per_req", "p50_ms", "p99_ms")}
        a["rng"] = rng([r.get("cpu_us_per_req") for r in ok])
        a["n"], a["total"] = len(ok), len(rows)
        agg[name] = a
    base = agg.get("bare", {}).get("cpu_us_per_req")
    # Noise on this shared machine only ever adds CPU time, so the ratio of the minima is the
    # other fair estimate next to the ratio of the medians.
    base_min = agg.get("bare", {}).get("rng", (None, None))[0]
    for i, name in enumerate(args.only):
        a = agg[name]
        notes = []
        if a["redis_cpu_us_per_req"] is not None:
            notes.append("redis-server: %.2f CPU-µs/req; %.2f EVALSHA/req (%.2f commands/req "
                         "counting the script's TIME, GET, SET)"
                         % (a["redis_cpu_us_per_req"], a["redis_calls_per_req"] or 0,
                            a["redis_cmds_per_req"] or 0))
        inval = [r["invalid"] for r in res["load"] if r["scenario"] == name and r.get("invalid")]
        if inval:
            notes.append("invalid: " + "; ".join(sorted(set(inval))))
        skip = res["skipped"].get(name)
        if skip:
            notes.append("not measured: " + skip)
        cr = ("%.2f (%.2f–%.2f)" % (a["cpu_us_per_req"], *a["rng"])
              if a["cpu_us_per_req"] is not None else "–")

        def ratios(b_med, b_min):
            rm = (a["cpu_us_per_req"] / b_med if b_med and a["cpu_us_per_req"] is not None
                  else None)
            rn = a["rng"][0] / b_min if b_min and a["rng"][0] is not None else None
            return [fmt(rm, ".2f") + ("×" if rm is not None else ""),
                    fmt(rn, ".2f") + ("×" if rn is not None else "")]
        own = agg.get(SCEN[name].base, {})
        cols = ratios(own.get("cpu_us_per_req"), own.get("rng", (None, None))[0])
        if peers:
            cols += ratios(base, base_min)
        lines.append("| " + " | ".join(
            [str(NAMES.index(name) + 1), name, fmt(a["rps"], ",.0f"), cr] + cols +
            [fmt(a["cpu_pct"], ".0f"), fmt(a["foreign_pct"], ".0f"),
             "%d/%d" % (a["n"], a["total"]), "; ".join(notes)]) + " |")
    t = agg.get(TARGET[0], {}).get("cpu_us_per_req")
    t_min = agg.get(TARGET[0], {}).get("rng", (None, None))[0]
    lines.append("")
    if t is not None and base:
        lines.append("Target: %s ≤ %.2f× bare: medians %.2f / %.2f = **%.3f×** → %s; "
                     "minima %.2f / %.2f = **%.3f×** → %s"
                     % (TARGET[0], TARGET[1], t, base, t / base,
                        "met" if t / base <= TARGET[1] else "**not met**",
                        t_min, base_min, t_min / base_min,
                        "met" if t_min / base_min <= TARGET[1] else "**not met**"))
    else:
        lines.append("Target: %s ≤ %.2f× bare: not measured" % TARGET)
    return "\n".join(lines) + "\n", agg


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of wrk warm-up")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="2 runs × 3 s, 1 s warm-up")
    ap.add_argument("--only", default=",".join(SLUICE_NAMES),
                    help="comma list of " + ",".join(NAMES) + "; `peers` = all the HAProxy "
                    "and nginx scenarios, `all` = everything (default: the sluice scenarios)")
    ap.add_argument("--proxy-core", type=int, default=1)
    ap.add_argument("--load-core", type=int, default=0)
    ap.add_argument("--quiet-wait", type=float, default=30,
                    help="before each measurement wait up to this many seconds for the "
                         "(shared) machine to be idle; 0 disables")
    ap.add_argument("--sluice", default=os.path.join(ROOT, "build/release/sluice"))
    ap.add_argument("--out", default=None, help="results directory")
    ap.add_argument("--bindir", default=os.path.join(HERE, "results", "bin"))
    ap.add_argument("--report", metavar="RAW_JSON",
                    help="only print the summary of a finished run's raw.json")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            res = json.load(f)
        for k, v in res["args"].items():
            setattr(args, k, v)
        md, _ = summarize(res, args)
        print(md)
        return 0
    if args.quick:
        args.runs, args.duration, args.warmup = 2, 3, 1
        args.quiet_wait = min(args.quiet_wait, 10)
    only = []
    for x in (x.strip() for x in args.only.split(",")):
        if x == "peers":
            only += PEER_NAMES
        elif x == "all":
            only += NAMES
        elif x in NAMES:
            only.append(x)
        elif x:
            ap.error("unknown scenario %r" % x)
    # Every ratio is to a bare proxy of the same run: sluice's, and each peer's own.
    only += ["bare"] + [SCEN[n].base for n in only]
    args.only = [n for n in NAMES if n in only]

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join(HERE, "results", stamp + "-filters")
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    if not os.access(args.sluice, os.X_OK):
        raise SystemExit("sluice binary %s not found: build it with `make -j2`" % args.sluice)
    # Snapshot the binary: others may rebuild build/release/sluice during the run.
    snap = os.path.join(out, "sluice")
    shutil.copy2(args.sluice, snap)
    st = os.stat(args.sluice)
    mi = bench.machine_info()
    mi["sluice_binary"] = "built %s UTC" % time.strftime("%Y-%m-%d %H:%M", time.gmtime(st.st_mtime))
    mi["redis"] = (subprocess.run(["redis-server", "--version"], capture_output=True,
                                  text=True).stdout.split(" sha=")[0].strip()
                   if shutil.which("redis-server") else "")
    binaries = {"sluice": snap}
    for kind in ("haproxy", "nginx"):
        if any(SCEN[n].proxy == kind for n in args.only):
            binaries[kind] = (shutil.which(kind) or shutil.which(kind, path="/usr/sbin:/sbin")
                              or kind)
    res = {"machine": mi, "args": vars(args), "load": [], "checks": {}, "skipped": {}}

    keys, tokens, bad, expired = make_keys(work)
    with open(os.path.join(out, "tokens.json"), "w") as f:
        json.dump({"tokens": tokens, "note": "bench-only keys, generated for this run"}, f)

    backend_port = free_port()
    bk = subprocess.Popen(["taskset", "-c", str(args.load_core),
                           os.path.join(args.bindir, "backend"), str(backend_port)],
                          stdin=subprocess.DEVNULL)
    children[bk.pid] = "backend"
    if not wait_port(backend_port, proc=bk) or http_get(backend_port) != 200:
        raise RuntimeError("backend did not start")
    redis_proc = redis_port = None
    if any(SCEN[n].redis for n in args.only):
        redis_proc, redis_port = start_redis(args.load_core, os.path.join(work, "redis"))
        log("redis-server on 127.0.0.1:%d (pid %d)" % (redis_port, redis_proc.pid))
    log("backend on 127.0.0.1:%d (pid %d), results in %s" % (backend_port, bk.pid, out))

    # Config check first: a scenario whose config the proxy refuses (e.g. a filter that is
    # not registered yet) is reported as not measured instead of failing the whole run. The
    # peers' rate limits are also started once with a tiny limit (limiter_check).
    names = []
    for name in args.only:
        sc = SCEN[name]
        allsubs = dict(keys, **sc.subs)
        if sc.redis:
            allsubs["REDIS_PORT"] = str(redis_port)
        tool = {"sluice": "sluice -t", "haproxy": "haproxy -c", "nginx": "nginx -t"}[sc.proxy]
        ok, msg = Proxy(sc.proxy, binaries[sc.proxy], sc.template, allsubs,
                        os.path.join(work, name + "-check"), backend_port,
                        args.proxy_core).check()
        if not ok:
            log("%s: %s refuses the config: %s" % (name, tool, msg))
            first = msg.splitlines()[0] if msg else "refused"
            res["skipped"][name] = tool + ": " + re.sub(r"^\S+\.yaml:[\d:]+ ", "", first)
            continue
        if sc.proxy != "sluice" and sc.limited:
            try:
                res["checks"][name + " (limiter)"] = limiter_check(
                    sc, binaries[sc.proxy], allsubs, tokens["hs256"],
                    os.path.join(work, name + "-limiter"), backend_port, args.proxy_core)
            except Exception as e:
                log("%s: %s" % (name, e))
                res["skipped"][name] = str(e)
                continue
        names.append(name)

    for run in range(args.runs):
        order = names[run % len(names):] + names[:run % len(names)] if names else []
        for name in order:
            sc = SCEN[name]
            tk, limited, needs_redis = sc.token, sc.limited, sc.redis
            allsubs = dict(keys, **sc.subs)
            if needs_redis:
                allsubs["REDIS_PORT"] = str(redis_port)
            # Scenarios without jwt send the HS256 token too (passed to the backend as is):
            # every scenario's requests then have the same size as the jwt scenarios' and
            # the ratios are the filters' cost, not that of a larger request.
            token = tokens[tk or "hs256"]
            sl = Proxy(sc.proxy, binaries[sc.proxy], sc.template, allsubs,
                       os.path.join(work, "%s-r%d" % (name, run + 1)), backend_port,
                       args.proxy_core)
            tag = "%s-r%d" % (name, run + 1)
            try:
                sl.start()
                check = verify(name, sl.port, token, bad.get(tk) if tk else None, limited,
                               redis_port if needs_redis else None, sc.proxy,
                               expired.get(tk) if tk else None)
                res["checks"].setdefault(name, check)
                r = measure(sl, token, args, out, tag,
                            redis_proc if needs_redis else None,
                            redis_port if needs_redis else None)
            except Exception as e:
                log("run %d/%d %s failed: %s" % (run + 1, args.runs, name, e))
                r = {"invalid": "check failed: %s" % e}
            finally:
                sl.stop()
            r.update(scenario=name, run=run + 1)
            res["load"].append(r)
            log("run %d/%d %-27s %s req/s, %s CPU-us/req, CPU %s%% (+%s%% foreign)%s%s"
                % (run + 1, args.runs, name, fmt(r.get("rps"), ".0f"),
                   fmt(r.get("cpu_us_per_req"), ".2f"), fmt(r.get("cpu_pct"), ".0f"),
                   fmt(r.get("foreign_pct"), ".0f"),
                   ", redis %s CPU-us/req" % fmt(r.get("redis_cpu_us_per_req"), ".2f")
                   if needs_redis else "",
                   "  INVALID: " + r["invalid"] if r.get("invalid") else ""))
        with open(os.path.join(out, "raw.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)

    if redis_proc:
        stop(redis_proc, "redis")
    stop(bk, "backend")
    md, agg = summarize(res, args)
    md += "\nChecks before measuring (first run):\n" + "".join(
        "- %s: %s\n" % (n, res["checks"][n]) for n in args.only for n in (n, n + " (limiter)")
        if n in res["checks"])
    res["summary"] = agg
    with open(os.path.join(out, "raw.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    latest = os.path.join(HERE, "results", "latest-filters")
    try:
        if os.path.dirname(os.path.abspath(out)) != os.path.dirname(latest):
            raise OSError("--out elsewhere: latest-filters left alone")
        if os.path.islink(latest) or os.path.exists(latest):
            os.remove(latest)
        os.symlink(os.path.relpath(out, os.path.dirname(latest)), latest)
    except OSError:
        pass
    print(md)
    bad_runs = sum(1 for r in res["load"] if r.get("invalid"))
    return 1 if bad_runs or res["skipped"] else 0


def on_signal(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        sys.exit(main())
    finally:
        kill_all()
