#!/bin/sh
# Installs the Debian 12 packages sluice needs to build and test, only those missing.
set -e
PKGS="build-essential clang libclang-rt-14-dev pkg-config libyaml-dev libcmocka-dev \
python3 python3-pytest curl clang-format clang-tools libssl-dev libjansson-dev libhiredis-dev \
redis-server python3-jwt python3-cryptography openssl libc-ares-dev dnsmasq-base \
testssl.sh libzstd-dev zstd jq chromium"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "installing:$missing"
if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: need root to install:$missing" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $missing
