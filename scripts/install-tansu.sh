#!/usr/bin/env bash
# Installs the `tansu` Kafka-protocol broker (crates.io) for the Kafka webhook destination tests,
# into a persistent cache folder keyed by version, so that a machine builds it once (about 9
# minutes cold on 2 cores) and every later run reuses it:
#
#   $KEYGATE_TANSU_CACHE (default ~/.cache/keygate)/tansu-<version>/bin/tansu
#
# Not $KEYGATE_CACHE: CI (.ci/run) points that at a new, empty folder on every run to install the
# Python and npm tools as a first run does; a 9-minute compile of a pinned broker version would
# add nothing to that check but would not fit CI's time budget. A new version is a new folder.
#
# The build is `cargo install tansu --version <version> --locked --features dynostore` (the
# default features have no storage engine; the tests run `--storage-engine memory://tansu/`). It is
# built into a temporary root and moved into place only when it succeeded, so an interrupted build
# never leaves a half-installed broker that a later run would trust.
#
# Run by scripts/setup-test-env.sh, which exports the path as KEYGATE_TANSU for the Kafka tests
# in tests/tests/webhooks_brokers.rs. Never edit this file while it runs: bash reads a running
# script from disk as it goes, and an edit mid-build loses the build.
#
# Usage: scripts/install-tansu.sh        (prints the tansu path on stdout, progress on stderr)
# Test hooks (scripts/tests/setup-scripts.sh): KEYGATE_TANSU_VERSION (default below), KEYGATE_CARGO
# (default cargo) is the cargo program used to build it, KEYGATE_TANSU_CACHE the cache folder.
set -euo pipefail

version="${KEYGATE_TANSU_VERSION:-0.6.0}"
cargo="${KEYGATE_CARGO:-cargo}"
cache="${KEYGATE_TANSU_CACHE:-$HOME/.cache/keygate}"
root="$cache/tansu-$version"
bin="$root/bin/tansu"

if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi

command -v "$cargo" >/dev/null 2>&1 || { echo "install-tansu: $cargo is required to build tansu $version (install Rust from https://rustup.rs)" >&2; exit 1; }
mkdir -p "$cache"
# One build at a time per version: a second setup run started meanwhile (another checkout, CI
# beside a developer) waits for the first and then uses its broker instead of building it again.
exec 9>"$cache/.tansu-$version.lock"
if ! flock -n 9; then
    echo "install-tansu: another install of tansu $version is running; waiting for it" >&2
    flock 9
fi
if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi
tmp="$(mktemp -d "$cache/.tansu-$version.XXXXXX")"
cleanup() { rm -rf "$tmp" || true; return 0; }
trap cleanup EXIT

echo "install-tansu: building tansu $version with cargo install (about 9 minutes on a cold 2-core machine) into $root" >&2
# Its own target dir inside the temporary folder: the build must not take the workspace's
# target-dir lock nor leave anything in it.
CARGO_TARGET_DIR="$tmp/target" "$cargo" install tansu --version "$version" --locked --features dynostore --root "$tmp/root" >&2
[[ -x "$tmp/root/bin/tansu" ]] || { echo "install-tansu: cargo install finished but $tmp/root/bin/tansu is missing" >&2; exit 1; }
rm -rf "$root"
mkdir -p "$root/bin"
mv "$tmp/root/bin/tansu" "$bin"
echo "$bin"
