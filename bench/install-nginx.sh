#!/usr/bin/env bash
# Installs nginx from Debian's packages for the benchmark's reference proxy (scenario N), unless
# an nginx binary is already on PATH (or in /usr/sbin). Never starts the system nginx service:
# the benchmark runs its own nginx with its own configuration on loopback ports.
#
# Leaves the machine as it found it: a `policy-rc.d` that keeps the package's maintainer scripts
# from starting the system service is created for the install only when none exists, and removed
# afterwards; an existing one is left untouched. Exits 0 exactly when nginx is usable afterwards.
#
# Usage: bench/install-nginx.sh        (prints the nginx path on stdout)
# Test hooks (scripts/tests/setup-scripts.sh): KEYGATE_NGINX_SBIN (default /usr/sbin) is where
# a packaged nginx lands, KEYGATE_POLICY_RC_D (default /usr/sbin/policy-rc.d) the policy file.
set -euo pipefail

sbin="${KEYGATE_NGINX_SBIN:-/usr/sbin}"
policy="${KEYGATE_POLICY_RC_D:-/usr/sbin/policy-rc.d}"

find_nginx() {
    command -v nginx 2>/dev/null && return 0
    [[ -x "$sbin/nginx" ]] && { echo "$sbin/nginx"; return 0; }
    return 1
}

if path=$(find_nginx); then
    echo "$path"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-nginx: nginx is not installed and apt-get is not available: install nginx (>= 1.18) yourself" >&2
    exit 1
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-nginx: installing nginx needs root (or sudo)" >&2; exit 1; }
    sudo="sudo"
fi

# policy-rc.d answering 101 keeps the package's maintainer scripts from starting the system
# service (port 80) during the install; an existing policy is left as it is.
created_policy=0
cleanup() {
    # Must not fail: its status would become the script's (the bug of issue 11).
    if [[ $created_policy -eq 1 ]]; then
        $sudo rm -f "$policy" || echo "install-nginx: could not remove $policy; remove it by hand" >&2
    fi
    return 0
}
trap cleanup EXIT
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    created_policy=1
    $sudo chmod 755 "$policy"
fi

echo "install-nginx: installing nginx from Debian's packages (apt-get)..." >&2
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nginx >&2
find_nginx || { echo "install-nginx: apt-get installed nginx but no nginx binary was found" >&2; exit 1; }
