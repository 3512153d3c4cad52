#!/usr/bin/env bash
# The micro-benchmarks (criterion), in one go: policy decide() on a 200-rule policy, the audit
# writer's parts (one record redacted + compressed + sealed, Parquet encoding of a batch, the
# whole pipeline, WAL group commit), and keygate's forward path against a direct call.
# Results: target/criterion/ (HTML reports) and the summary on stdout.
# Usage: bench/micro.sh [criterion arguments, e.g. a benchmark name filter]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p keygate-policies --bench decide -- "$@"
# Without the `cli` feature: the bench needs the library only, not the DataFusion-based command.
cargo bench -p keygate-auditlog --no-default-features --bench writer_pipeline -- "$@"
cargo bench -p keygate --bench forward -- "$@"
