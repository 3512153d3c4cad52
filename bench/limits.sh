#!/usr/bin/env bash
# The limit store's cost (issue 15): what Redis adds to a budgeted, rate-limited request, and the
# throughput of one keygate instance with the Redis store, on loopback.
#
#  1. bench-limits: keygate's own RedisStore, the two calls such a request makes (acquire, then
#     charge), open loop at 1,000 requests/s (latency from the intended start), then closed loop.
#  2. keygate itself (release build, one worker, audit off, like scenario P0 of bench/run.sh) in
#     front of bench-upstream, with a policy that has a rate limit and a budget (so every request
#     is acquired and charged), once with `limit_store.kind: redis` and once with `memory`: open
#     loop at 1,000/s and closed loop with 64 connections, by bench-load. The difference is what
#     Redis adds end to end; /metrics' keygate_limit_store_duration_seconds is kept too.
#
# Redis runs with `appendonly yes` and `appendfsync everysec` (docs/deploy.md). Everything is on
# loopback ports picked by the kernel, in a temporary folder removed at the end. Prints one JSON
# object per measurement on stdout; progress on stderr. Takes about 2 minutes after the build
# (BENCH_NO_BUILD=1 uses the release binaries as they are; BENCH_SECONDS sets each phase's length).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${BENCH_SECONDS:-10}"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

redis_server="$(scripts/install-deb.sh redis-server)"
if [ -z "${BENCH_NO_BUILD:-}" ]; then
    echo "bench/limits.sh: building the release binaries" >&2
    cargo build --release -p keygate -p keygate-bench >&2
fi
bin=target/release

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing listens on $1" >&2; return 1; }

# Redis, with AUTH and AOF.
redis_port="$(free_port)"
password="bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '%s' "$password" > "$work/redis-password"
mkdir -p "$work/redis"
# The password goes in a config file, never on a command line.
printf 'port %s\nbind 127.0.0.1\ndir %s\nsave ""\nappendonly yes\nappendfsync everysec\nrequirepass %s\n' \
    "$redis_port" "$work/redis" "$password" > "$work/redis.conf"
"$redis_server" "$work/redis.conf" > /dev/null 2>&1 &
pids+=($!)
wait_port "$redis_port"

echo "bench/limits.sh: the store calls alone (bench-limits)" >&2
BENCH_REDIS_PASSWORD_FILE="$work/redis-password" "$bin/bench-limits" --redis "127.0.0.1:$redis_port" \
    --rate 1000 --duration-s "$seconds" | python3 -c 'import json,sys; d=json.load(sys.stdin); d["measurement"]="store calls (bench-limits)"; print(json.dumps(d))'

# The upstream.
"$bin/bench-upstream" > "$work/upstream.out" &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$work/upstream.out" 2>/dev/null && break; sleep 0.05; done
upstream="http://$(sed -n 's/^listening //p' "$work/upstream.out")"

# A service with a rate limit and a budget, both far above what the load reaches.
token_out="$("$bin/keygate" token new --service bench)"
token="$(printf '%s\n' "$token_out" | grep -o 'sk_kg_[A-Za-z0-9_-]*' | head -1)"
hash="$(printf '%s\n' "$token_out" | grep -o 'sha256:[0-9a-f]*' | head -1)"
mkdir -p "$work/policies"
cat > "$work/policies/bench.yaml" <<POLICY
service: bench
token_hashes:
  - "$hash"
stripe_key: env://BENCH_STRIPE_KEY
rate_limit: { per_second: 1000000, burst: 1000000 }
budgets:
  usd: { max: 9000000000000, window: 24h }
rules:
  - id: all
    effect: allow
    operation: "* /**"
POLICY

run_keygate() {
    local kind="$1" dir="$work/keygate-$1"
    mkdir -p "$dir"
    {
        printf 'listen:\n  address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\n'
        printf 'upstreams:\n  api: %s\n  files: %s\n  connect: %s\n  meter_events: %s\n' "$upstream" "$upstream" "$upstream" "$upstream"
        printf 'policies:\n  dir: %s\naudit:\n  enabled: false\nlog:\n  level: warn,keygate=info\n' "$work/policies"
        printf 'limit_store:\n  kind: %s\n' "$kind"
        if [ "$kind" = redis ]; then
            printf '  redis:\n    address: 127.0.0.1:%s\n    password: "file://%s"\n' "$redis_port" "$work/redis-password"
        fi
    } > "$dir/keygate.yaml"
    (cd "$dir" && TOKIO_WORKER_THREADS=1 BENCH_STRIPE_KEY=sk_test_bench exec "$OLDPWD/$bin/keygate" serve --config "$dir/keygate.yaml" 2> "$dir/log") &
    pids+=($!)
    for _ in $(seq 200); do grep -q '"keygate listening"' "$dir/log" 2>/dev/null && break; sleep 0.05; done
    proxy="$(grep '"keygate listening"' "$dir/log" | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["proxy"])')"
    admin="$(grep '"keygate listening"' "$dir/log" | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["admin"])')"
    for rate in 1000 ""; do
        local args=(--url "http://$proxy/v1/payment_intents" --duration-s "$seconds")
        if [ -n "$rate" ]; then args+=(--rate "$rate" --connections 32); else args+=(--connections 64); fi
        BENCH_AUTHORIZATION="Bearer $token" "$bin/bench-load" "${args[@]}" \
            | python3 -c "import json,sys; d=json.load(sys.stdin); d['measurement']='keygate, limit_store.kind: $kind, ' + ('open loop at $rate/s' if '$rate' else 'closed loop'); print(json.dumps(d))"
    done
    python3 - "$admin" "$kind" <<'PY'
import json, sys, urllib.request
admin, kind = sys.argv[1], sys.argv[2]
text = urllib.request.urlopen(f"http://{admin}/metrics").read().decode()
buckets = {}
for line in text.splitlines():
    if line.startswith("keygate_limit_store_duration_seconds_bucket"):
        op = line.split('operation="')[1].split('"')[0]
        le = line.split('le="')[1].split('"')[0]
        buckets.setdefault(op, []).append((le, float(line.rsplit(" ", 1)[1])))
print(json.dumps({"measurement": f"keygate /metrics, limit_store.kind: {kind}", "keygate_limit_store_duration_seconds_bucket": buckets}))
PY
}

echo "bench/limits.sh: keygate with the redis store" >&2
run_keygate redis
echo "bench/limits.sh: keygate with the memory store (no store round trip)" >&2
run_keygate memory
