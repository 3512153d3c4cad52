#!/usr/bin/env bash
# Installs redis-server from Debian's packages for the limit store tests (the `redis` store's
# conformance suite and the shared-budget end-to-end tests), unless a redis-server binary is
# already on PATH (or in /usr/bin). Never starts the system Redis service: the tests run their own
# redis-server on free loopback ports, each in its own temporary folder.
#
# Leaves the machine as it found it: a `policy-rc.d` that keeps the package's maintainer scripts
# from starting the system service is created for the install only when none exists, and removed
# afterwards; an existing one is left untouched. Exits 0 exactly when redis-server is usable
# afterwards.
#
# Usage: scripts/install-redis.sh        (prints the redis-server path on stdout)
# Test hooks (scripts/tests/setup-scripts.sh): KEYGATE_REDIS_BIN_DIR (default /usr/bin) is where
# a packaged redis-server lands, KEYGATE_POLICY_RC_D (default /usr/sbin/policy-rc.d) the policy file.
set -euo pipefail

bin_dir="${KEYGATE_REDIS_BIN_DIR:-/usr/bin}"
policy="${KEYGATE_POLICY_RC_D:-/usr/sbin/policy-rc.d}"

find_redis() {
    command -v redis-server 2>/dev/null && return 0
    [[ -x "$bin_dir/redis-server" ]] && { echo "$bin_dir/redis-server"; return 0; }
    return 1
}

if path=$(find_redis); then
    echo "$path"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-redis: redis-server is not installed and apt-get is not available: install Redis (>= 7) yourself" >&2
    exit 1
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-redis: installing redis-server needs root (or sudo)" >&2; exit 1; }
    sudo="sudo"
fi

# policy-rc.d answering 101 keeps the package's maintainer scripts from starting the system
# service (port 6379) during the install; an existing policy is left as it is.
created_policy=0
cleanup() {
    # Must not fail: its status would become the script's.
    if [[ $created_policy -eq 1 ]]; then
        $sudo rm -f "$policy" || echo "install-redis: could not remove $policy; remove it by hand" >&2
    fi
    return 0
}
trap cleanup EXIT
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    created_policy=1
    $sudo chmod 755 "$policy"
fi

echo "install-redis: installing redis-server from Debian's packages (apt-get)..." >&2
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends redis-server >&2
find_redis || { echo "install-redis: apt-get installed redis-server but no redis-server binary was found" >&2; exit 1; }
