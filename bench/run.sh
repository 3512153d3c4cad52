#!/usr/bin/env bash
# keygate's end-to-end benchmark in one command: installs nginx from Debian's packages if it is
# missing, builds the release binaries, runs every scenario (D, P0, P1, P2, N) three times, and
# writes bench/results/<date>.json and the generated block of docs/benchmarks.md.
# Usage: bench/run.sh [keygate-bench full options, e.g. --upstream-tls, --work-dir DIR, --reps N]
# Takes about 20 minutes; run it on a machine that is otherwise quiet.
set -euo pipefail
cd "$(dirname "$0")/.."

nginx=$(scripts/install-deb.sh nginx)
cargo build --release -p keygate -p keygate-bench --bins
bin_dir="${CARGO_TARGET_DIR:-target}/release"
exec "$bin_dir/keygate-bench" full --bin-dir "$bin_dir" --nginx "$nginx" --docs docs/benchmarks.md "$@"
