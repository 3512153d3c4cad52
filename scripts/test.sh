#!/usr/bin/env bash
# The README's test command: installs what the tests talk to (once, cached outside the clone),
# builds every binary, and runs every test: unit, property, component and end-to-end.
# Usage: scripts/test.sh [extra cargo test arguments, e.g. a test name filter]
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(scripts/setup-test-env.sh)"

# Binaries first: the end-to-end tests start the real `keygate` and `auditlog` executables.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
