#!/usr/bin/env bash
# The webhook ingress benchmark (issue 16): how many Stripe webhook events keygate acknowledges
# per second on one core with `audit.durability: sync`, and what the acknowledgement adds over
# this machine's fsync.
#
#  1. keygate-bench fsync: append + fdatasync latency in the folder holding keygate's WAL and
#     webhook state file (the floor under every acknowledgement).
#  2. keygate (release build, one Tokio worker, pinned to CPU 0 with taskset) with a webhook
#     endpoint whose one destination is bench-upstream (answers 200), audit lake on, durability
#     sync. Every event is distinct (its own evt_ id), about 2 KiB, signed in Stripe's scheme by
#     bench-load --webhook: closed loop with 64 connections (throughput), then open loop at
#     1,000/s and at 5,000/s (latency from each event's intended send time to its 200).
#  3. keygate's own keygate_webhook_ack_duration_seconds histogram (body read to 200).
#
# The load generator and the upstream run on CPU 1. Everything is on loopback, in a folder under
# BENCH_WORK_DIR (default /var/tmp: a disk, not tmpfs) removed at the end. Prints one JSON
# object per measurement on stdout; progress on stderr. About 1 minute after the build
# (BENCH_NO_BUILD=1 uses the release binaries as they are; BENCH_SECONDS sets each phase's
# length).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${BENCH_SECONDS:-10}"
work="$(mktemp -d "${BENCH_WORK_DIR:-/var/tmp}/keygate-bench-webhooks.XXXXXX")"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

if [ -z "${BENCH_NO_BUILD:-}" ]; then
    echo "bench/webhooks.sh: building the release binaries" >&2
    cargo build --release -p keygate --bin keygate -p keygate-bench --bin keygate-bench --bin bench-load --bin bench-upstream >&2
fi
bin="$PWD/target/release"
if [ "$(nproc)" -ge 2 ]; then
    on_keygate=(taskset -c 0)
    on_load=(taskset -c 1)
else
    on_keygate=()
    on_load=()
fi
hex32() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

kg="$work/keygate"
mkdir -p "$kg/wal" "$kg/webhooks" "$kg/lake" "$kg/policies"

echo "bench/webhooks.sh: fsync latency in the WAL's folder" >&2
"$bin/keygate-bench" fsync --dir "$kg/wal" --samples 2000 \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); d["measurement"]="fsync (append 4 KiB + fdatasync), WAL folder"; print(json.dumps(d))'

"${on_load[@]}" "$bin/bench-upstream" > "$work/upstream.out" &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$work/upstream.out" 2>/dev/null && break; sleep 0.05; done
upstream="$(sed -n 's/^listening //p' "$work/upstream.out")"

# Secrets in files (secret references), never on a command line.
endpoint_secret="whsec_bench$(hex32)"
printf '%s' "$endpoint_secret" > "$work/endpoint-secret"
printf 'whsec_dest%s' "$(hex32)" > "$work/destination-secret"
hex32 > "$work/kek"
hex32 > "$work/signing-key"
token_out="$("$bin/keygate" token new --service bench)"
hash="$(printf '%s\n' "$token_out" | grep -o 'sha256:[0-9a-f]*' | head -1)"
cat > "$kg/policies/bench.yaml" <<POLICY
service: bench
token_hashes:
  - "$hash"
stripe_key: env://BENCH_STRIPE_KEY
rules:
  - id: all
    effect: allow
    operation: "* /**"
POLICY
cat > "$kg/keygate.yaml" <<CONFIG
listen:
  address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
upstreams:
  api: http://$upstream
  files: http://$upstream
  connect: http://$upstream
  meter_events: http://$upstream
policies:
  dir: $kg/policies
audit:
  lake: $kg/lake
  wal_dir: $kg/wal
  kek: file://$work/kek
  signing_key: file://$work/signing-key
  writer_id: bench-webhooks
  durability: sync
log:
  level: warn,keygate=info
webhooks:
  listen:
    address: 127.0.0.1:0
  state_dir: $kg/webhooks
  endpoints:
    - name: bench
      secrets: ["file://$work/endpoint-secret"]
      destinations:
        - name: sink
          url: http://$upstream/v1/payment_intents
          secret: "file://$work/destination-secret"
          concurrency: 64
CONFIG
(cd "$kg" && TOKIO_WORKER_THREADS=1 BENCH_STRIPE_KEY=sk_test_bench exec "${on_keygate[@]}" "$bin/keygate" serve --config "$kg/keygate.yaml" 2> "$kg/log") &
pids+=($!)
for _ in $(seq 400); do grep -q '"webhook ingress listening"' "$kg/log" 2>/dev/null && grep -q '"keygate listening"' "$kg/log" && break; sleep 0.05; done
ingress="$(grep '"webhook ingress listening"' "$kg/log" | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["address"])')"
admin="$(grep '"keygate listening"' "$kg/log" | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["admin"])')"

run_load() {
    local label="$1"; shift
    BENCH_WEBHOOK_SECRET="$endpoint_secret" "${on_load[@]}" "$bin/bench-load" --webhook --body-bytes 2048 \
        --url "http://$ingress/webhooks/stripe/bench" --duration-s "$seconds" "$@" \
        | python3 -c "import json,sys; d=json.load(sys.stdin); d['measurement']='webhook ingress, durability sync, $label'; print(json.dumps(d))"
}
echo "bench/webhooks.sh: closed loop, 64 connections" >&2
run_load "closed loop, 64 connections" --connections 64
echo "bench/webhooks.sh: open loop at 1,000/s" >&2
run_load "open loop at 1000/s" --rate 1000 --connections 32
echo "bench/webhooks.sh: open loop at 5,000/s" >&2
run_load "open loop at 5000/s" --rate 5000 --connections 128
python3 - "$admin" <<'PY'
import json, sys, urllib.request
admin = sys.argv[1]
text = urllib.request.urlopen(f"http://{admin}/metrics").read().decode()
buckets, delivered = [], 0.0
for line in text.splitlines():
    if line.startswith("keygate_webhook_ack_duration_seconds_bucket"):
        buckets.append((line.split('le="')[1].split('"')[0], float(line.rsplit(" ", 1)[1])))
    if line.startswith("keygate_webhook_deliveries_total") and 'outcome="delivered"' in line:
        delivered += float(line.rsplit(" ", 1)[1])
print(json.dumps({"measurement": "keygate /metrics", "keygate_webhook_ack_duration_seconds_bucket": buckets, "delivered": delivered}))
PY
