#!/usr/bin/python3
"""What an access log costs nginx and HAProxy, measured like bench/access_log_cost.py does for
sluice: the same proxied route to bench/backend.c, one worker pinned to CPU 0, wrk on the other
CPU, each peer with and without its access log in alternating runs; CPU-microseconds per request
(utime + stime of the whole process tree / requests).

- nginx: `access_log FILE json buffer=64k flush=1s gzip=1` with a JSON `log_format` (escape=json)
  of the fields sluice records: nginx's own way to write compressed batches.
- HAProxy: `option httplog` sent to a syslog server on 127.0.0.1 over UDP (HAProxy does not write
  files; a local UDP sink that discards is its usual set-up and the cheapest).

Usage: bench/access_log_peers.py [--runs 5] [--duration 5] [--conns 32]. Never part of make test.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from access_log_cost import (CLK_TCK, HERE, cpus, free_port, log, pinned, run_wrk,  # noqa: E402
                             wait_port)

NGINX = """worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; use epoll; }}
http {{
    log_format json escape=json '{{"time":"$time_iso8601","request_id":"$request_id",'
        '"client":"$remote_addr","method":"$request_method","host":"$host","path":"$uri",'
        '"status":$status,"bytes_in":$request_length,"bytes_out":$bytes_sent,'
        '"upstream":"$upstream_addr","upstream_ms":"$upstream_response_time",'
        '"total_ms":"$request_time","user_agent":"$http_user_agent"}}';
    {log}
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    client_body_temp_path {d}/cb; proxy_temp_path {d}/pt; fastcgi_temp_path {d}/ft;
    uwsgi_temp_path {d}/ut; scgi_temp_path {d}/st;
    upstream backend {{ server 127.0.0.1:{bport}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ proxy_pass http://backend; proxy_http_version 1.1;
                     proxy_set_header Connection ""; }}
    }}
}}
"""

HAPROXY = """global
    nbthread 1
    maxconn 4096
    {glog}
defaults
    mode http
    {dlog}
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s1 127.0.0.1:{bport}
"""


class UdpSink:
    """A syslog server that counts and discards datagrams."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self.stop = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop:
            try:
                self.sock.recv(65536)
                self.count += 1
            except socket.timeout:
                pass

    def close(self):
        self.stop = True
        self.t.join(2)
        self.sock.close()


def tree_ticks(pid):
    pids = [pid]
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total


def measure(peer, on, args, bport, work, sink, px_cpus, load_cpus):
    port = free_port()
    d = tempfile.mkdtemp(prefix="%s-" % peer, dir=work)
    if peer == "nginx":
        logline = ("access_log %s/access.json.gz json buffer=64k flush=1s gzip=1;" % d) if on \
            else "access_log off;"
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX.format(d=d, log=logline, port=port, bport=bport))
        cmd = ["nginx", "-p", d, "-e", os.path.join(d, "error.log"), "-c", conf]
    else:
        glog = ("log 127.0.0.1:%d local0 info" % sink.port) if on else ""
        dlog = "log global\n    option httplog" if on else ""
        conf = os.path.join(d, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(HAPROXY.format(glog=glog, dlog=dlog, port=port, bport=bport))
        cmd = ["haproxy", "-db", "-f", conf]
    proc = subprocess.Popen(pinned(cmd, px_cpus), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        if not wait_port(port):
            raise RuntimeError("%s did not start" % peer)
        run_wrk(port, args.conns, 1, load_cpus)
        c0 = tree_ticks(proc.pid)
        n = run_wrk(port, args.conns, args.duration, load_cpus)
        c1 = tree_ticks(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"rps": n / args.duration, "cpu_us": (c1 - c0) * (1e6 / CLK_TCK) / n}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=32)
    args = ap.parse_args()
    cpu_list = cpus()
    px_cpus = cpu_list[:1] if len(cpu_list) > 1 else []
    load_cpus = cpu_list[1:] if len(cpu_list) > 1 else []
    work = tempfile.mkdtemp(prefix="alog-peers-")
    exe = os.path.join(work, "backend")
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(HERE, "backend.c")], check=True)
    bport = free_port()
    backend = subprocess.Popen(pinned([exe, str(bport)], load_cpus))
    sink = UdpSink()
    rows = {(p, w): [] for p in ("nginx", "haproxy") for w in ("off", "on")}
    try:
        if not wait_port(bport):
            sys.exit("backend did not start")
        for r in range(args.runs):
            for peer in ("nginx", "haproxy"):
                order = ("off", "on") if r % 2 == 0 else ("on", "off")
                for w in order:
                    res = measure(peer, w == "on", args, bport, work, sink, px_cpus, load_cpus)
                    rows[(peer, w)].append(res)
                    log("run %d %-7s %-3s %8.0f req/s %6.2f CPU-us/req"
                        % (r + 1, peer, w, res["rps"], res["cpu_us"]))
    finally:
        backend.terminate()
        backend.wait(5)
        sink.close()
    print("\naccess log cost of the peers, proxied route, 1 worker, %d runs x %ds, %d conns"
          % (args.runs, args.duration, args.conns))
    print("| peer | off CPU-us/req | on CPU-us/req | on/off |")
    print("|---|---|---|---|")
    for peer in ("nginx", "haproxy"):
        off = statistics.median(x["cpu_us"] for x in rows[(peer, "off")])
        on = statistics.median(x["cpu_us"] for x in rows[(peer, "on")])
        print("| %s | %.2f | %.2f | %.3f (%+.1f%%) |" % (peer, off, on, on / off,
                                                        (on / off - 1) * 100))


if __name__ == "__main__":
    main()
