#!/usr/bin/env bash
# Installs one program from Debian's packages for keygate's tests and benchmarks (nginx, the
# benchmark's reference proxy; redis-server, for the limit store; chromium, for the report test),
# unless it is already on PATH or in one of the usual folders. Never starts the package's system
# service: the tests run their own servers on free loopback ports, each in its own folder.
#
# Leaves the machine as it found it: a `policy-rc.d` that keeps the package's maintainer scripts
# from starting the system service is created for the install only when none exists, and removed
# afterwards; an existing one is left untouched. Exits 0 exactly when the program is usable
# afterwards, and prints its path on stdout (progress goes to stderr).
#
# Usage: scripts/install-deb.sh PROGRAM [PACKAGE]     (PACKAGE defaults to PROGRAM)
#   e.g. scripts/install-deb.sh nginx; scripts/install-deb.sh redis-server
# Test hooks (scripts/tests/setup-scripts.sh): KEYGATE_DEB_BIN_DIRS (default "/usr/bin /usr/sbin")
# is where a packaged program lands, KEYGATE_POLICY_RC_D (default /usr/sbin/policy-rc.d) the
# policy file.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || -z "$1" ]]; then
    echo "usage: scripts/install-deb.sh PROGRAM [PACKAGE]" >&2
    exit 2
fi
program="$1"
package="${2:-$1}"
bin_dirs="${KEYGATE_DEB_BIN_DIRS:-/usr/bin /usr/sbin}"
policy="${KEYGATE_POLICY_RC_D:-/usr/sbin/policy-rc.d}"
me="install-deb ($program)"

find_program() {
    command -v "$program" 2>/dev/null && return 0
    local dir
    for dir in $bin_dirs; do
        [[ -x "$dir/$program" ]] && { echo "$dir/$program"; return 0; }
    done
    return 1
}

if path=$(find_program); then
    echo "$path"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "$me: $program is not installed and apt-get is not available: install the $package package yourself" >&2
    exit 1
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "$me: installing $package needs root (or sudo)" >&2; exit 1; }
    sudo="sudo"
fi

# policy-rc.d answering 101 keeps the package's maintainer scripts from starting the system
# service during the install; an existing policy is left as it is.
created_policy=0
cleanup() {
    # Must not fail: its status would become the script's (the bug of issue 11).
    if [[ $created_policy -eq 1 ]]; then
        $sudo rm -f "$policy" || echo "$me: could not remove $policy; remove it by hand" >&2
    fi
    return 0
}
trap cleanup EXIT
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    created_policy=1
    $sudo chmod 755 "$policy"
fi

echo "$me: installing $package from Debian's packages (apt-get)..." >&2
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$package" >&2
find_program || { echo "$me: apt-get installed $package but no $program binary was found" >&2; exit 1; }
