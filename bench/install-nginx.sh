#!/usr/bin/env bash
# Installs nginx from Debian's packages for the benchmark's reference proxy (scenario N), unless
# an nginx binary is already on PATH (or in /usr/sbin). Never starts the system nginx service:
# the benchmark runs its own nginx with its own configuration on loopback ports.
# Usage: bench/install-nginx.sh        (prints the nginx path on stdout)
set -euo pipefail

find_nginx() {
    command -v nginx 2>/dev/null && return 0
    [[ -x /usr/sbin/nginx ]] && { echo /usr/sbin/nginx; return 0; }
    return 1
}

if path=$(find_nginx); then
    echo "$path"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "nginx is not installed and apt-get is not available: install nginx (>= 1.18) yourself" >&2
    exit 1
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "installing nginx needs root (or sudo)" >&2; exit 1; }
    sudo="sudo"
fi

# policy-rc.d answering 101 keeps the package's maintainer scripts from starting the system
# service (port 80) during the install; an existing policy is left as it is.
created_policy=""
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
fi
cleanup() { [[ -n "$created_policy" ]] && $sudo rm -f /usr/sbin/policy-rc.d; }
trap cleanup EXIT

echo "installing nginx from Debian's packages (apt-get)..." >&2
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nginx >&2
find_nginx || { echo "apt-get installed nginx but no nginx binary was found" >&2; exit 1; }
