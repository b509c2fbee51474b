#!/usr/bin/env bash
# Side-by-side benchmark: sluice vs nginx vs HAProxy (Debian packages) against one fast
# backend. See docs/benchmarks.md. Usage:
#   bench/run.sh [--quick] [--runs N] [--duration S] [--only sluice,nginx,haproxy,direct]
#                [--conns 64,256] [--idle-conns 10000] [--sluice PATH] [--sluice-cmd CMD]
# Results: bench/results/<stamp>/{raw.json,summary.md,wrk-*.txt}; the summary table is
# printed to stdout. Whole run bounded by $BENCH_TIMEOUT seconds (default 3600).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=bench
BIN=$BENCH/results/bin
PY=/usr/bin/python3

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
command -v taskset >/dev/null || need+=(util-linux)
command -v cc >/dev/null || need+=(gcc libc6-dev)
[ -x "$PY" ] || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "bench: missing ${need[*]}; run as root or: apt-get install -y ${need[*]}" >&2
        exit 1
    fi
    echo "bench: installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2 ||
        { apt-get update >&2 &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2; }
fi
export PATH="$PATH:/usr/sbin:/sbin"
# The Debian packages enable and start their services; keep them out of the measurement.
for svc in nginx haproxy; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
        echo "bench: note: system $svc service is running (it is not stopped; it idles)" >&2
    fi
done

mkdir -p "$BIN"
cc -O2 -Wall -Wextra -o "$BIN/backend" $BENCH/backend.c
cc -O2 -Wall -Wextra -o "$BIN/idleconns" $BENCH/idleconns.c

# As many descriptors as we are allowed (10,000 idle connections need >10,000 in both the
# client and the proxy).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(nproc)" -lt 2 ]; then
    echo "bench: only one CPU; proxy and load generator share core 0" >&2
    set -- --proxy-core 0 --load-core 0 "$@"
fi

pid=
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# The driver itself runs on the load core so that the proxy core only runs the proxy.
timeout -k 15 "${BENCH_TIMEOUT:-3600}" taskset -c 0 "$PY" $BENCH/bench.py --bindir "$BIN" "$@" &
pid=$!
wait "$pid"
