#!/usr/bin/env bash
# Filters benchmark: what sluice's jwt and rate_limit filters cost per request, against the
# bare proxy, in one run on one machine; optionally HAProxy's and nginx's equivalents side by
# side (--only peers, or names such as haproxy-jwt-hs256). See docs/benchmarks.md ("Filters").
# Usage:
#   bench/filters.sh [--quick] [--runs N] [--duration S] [--conns C] [--only a,b,...]
#                    [--sluice PATH]
# Results: bench/results/<stamp>-filters/{raw.json,summary.md,wrk-*.txt}; the summary table is
# printed to stdout. Whole run bounded by $BENCH_TIMEOUT seconds (default 1800).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=bench
BIN=$BENCH/results/bin
PY=/usr/bin/python3   # the Debian python3, where python3-jwt and python3-cryptography live

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v taskset >/dev/null || need+=(util-linux)
command -v cc >/dev/null || need+=(gcc libc6-dev)
command -v redis-server >/dev/null || need+=(redis-server)
[ -x "$PY" ] || need+=(python3)
# The peers only when a peer scenario is selected (--only peers|all|haproxy-*|nginx-*).
export PATH="$PATH:/usr/sbin:/sbin"
peers=
case " $* " in *haproxy*|*nginx*|*peers*|*all*) peers=1 ;; esac
if [ -n "$peers" ]; then
    command -v haproxy >/dev/null || need+=(haproxy)
    command -v nginx >/dev/null || need+=(nginx-light)
fi
if [ -x "$PY" ]; then
    "$PY" -c 'import jwt' 2>/dev/null || need+=(python3-jwt)
    "$PY" -c 'import cryptography' 2>/dev/null || need+=(python3-cryptography)
else
    need+=(python3-jwt python3-cryptography)
fi
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "filters bench: missing ${need[*]}; as root: apt-get install -y ${need[*]}" >&2
        exit 1
    fi
    echo "filters bench: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need[@]}" >&2 ||
        { apt-get update >&2 && apt-get install -y --no-install-recommends "${need[@]}" >&2; }
fi
# The Debian package enables and starts its own redis-server service: it idles, and the
# benchmark starts its own on a free port.
if command -v systemctl >/dev/null && systemctl is-active --quiet redis-server 2>/dev/null; then
    echo "filters bench: note: system redis-server service is running (not stopped; it idles)" >&2
fi
if [ -n "$peers" ]; then
    for svc in nginx haproxy; do
        if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
            echo "filters bench: note: system $svc service is running (not stopped; it idles)" >&2
        fi
    done
fi

mkdir -p "$BIN"
cc -O2 -Wall -Wextra -o "$BIN/backend" $BENCH/backend.c
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(nproc)" -lt 2 ]; then
    echo "filters bench: only one CPU; proxy and load generator share core 0" >&2
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
timeout -k 15 "${BENCH_TIMEOUT:-1800}" taskset -c 0 "$PY" $BENCH/filters.py --bindir "$BIN" "$@" &
pid=$!
wait "$pid"
