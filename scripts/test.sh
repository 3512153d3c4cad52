#!/usr/bin/env bash
# The README's test command: installs what the tests talk to (once, cached outside the clone),
# builds every binary, and runs every test: shell tests of the setup scripts, then unit, property,
# fuzz, component and end-to-end tests.
# Usage: scripts/test.sh [extra cargo test arguments, e.g. a test name filter]
# Each step is named; the first that fails stops the run with its name.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "== scripts/test.sh: $1" >&2; current="$1"; }
current="start"
trap 'status=$?; [ $status -eq 0 ] || echo "scripts/test.sh: FAILED in step: $current (exit $status)" >&2' EXIT

# The setup runs as a command of its own, its exports written to a file: a failure stops the run
# here (set -e), it cannot be hidden inside a command substitution.
step "install test tools (scripts/setup-test-env.sh)"
env_file="$(mktemp)"
trap 'status=$?; rm -f "$env_file"; [ $status -eq 0 ] || echo "scripts/test.sh: FAILED in step: $current (exit $status)" >&2' EXIT
scripts/setup-test-env.sh > "$env_file"
# shellcheck disable=SC1090
source "$env_file"
if [ -z "${KEYGATE_TOOLS_BIN:-}" ] || [ -z "${KEYGATE_NODE_MODULES:-}" ]; then
  echo "scripts/test.sh: scripts/setup-test-env.sh succeeded but printed no KEYGATE_TOOLS_BIN / KEYGATE_NODE_MODULES" >&2
  exit 1
fi
export KEYGATE_TOOLS_BIN KEYGATE_NODE_MODULES

step "setup script tests (scripts/tests/setup-scripts.sh)"
scripts/tests/setup-scripts.sh

# Binaries first: the end-to-end tests start the real `keygate` and `auditlog` executables.
step "build binaries (cargo build --workspace --bins)"
cargo build --workspace --bins
step "run tests (cargo test --workspace)"
cargo test --workspace --no-fail-fast "$@"
current="done"
