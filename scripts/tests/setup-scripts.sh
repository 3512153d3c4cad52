#!/usr/bin/env bash
# Tests of the setup scripts themselves (issue 11), run by scripts/test.sh:
#   - bench/install-nginx.sh with nginx already present, without nginx and with or without an
#     existing policy-rc.d, and with a failing apt-get: simulated with a temporary PATH holding a
#     fake apt-get and temporary locations for the policy file and the packaged nginx, so the
#     machine's own nginx and policy-rc.d are never touched;
#   - scripts/setup-test-env.sh's output (exactly two export lines naming folders that hold the
#     tools) and its failure (a missing prerequisite fails with the step named);
#   - scripts/test.sh stops at once, naming the step, when the setup fails.
# Prints `N passed, N failed` and exits non-zero on any failure.
set -uo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
passed=0
failed=0
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

ok() { passed=$((passed + 1)); echo "ok   $1"; }
bad() { failed=$((failed + 1)); echo "FAIL $1: $2"; }

# A fake root: bin/ for the PATH (fake apt-get, coreutils from the system), sbin/ where the fake
# package puts nginx, and a log of what apt-get saw.
fake_root() {
    local root="$tmp/$1"
    mkdir -p "$root/bin" "$root/sbin"
    cat > "$root/bin/apt-get" <<APT
#!/bin/sh
echo "apt-get \$*" >> "$root/apt.log"
case "\$1" in
  update) exit 0 ;;
  install)
    if [ -e "$root/policy-rc.d" ]; then echo "policy present during install" >> "$root/apt.log"; fi
    if [ -n "\${FAKE_APT_FAIL:-}" ]; then echo "E: fake failure" >&2; exit 100; fi
    printf '#!/bin/sh\necho fake nginx\n' > "$root/sbin/nginx"; chmod 755 "$root/sbin/nginx"; exit 0 ;;
esac
exit 0
APT
    chmod 755 "$root/bin/apt-get"
    echo "$root"
}

# PATH without the machine's sbin folders, so a real nginx is not found.
run_installer() {
    local root="$1"
    shift
    env "$@" PATH="$root/bin:/usr/bin:/bin" KEYGATE_NGINX_SBIN="$root/sbin" \
        KEYGATE_POLICY_RC_D="$root/policy-rc.d" bash "$here/bench/install-nginx.sh" \
        > "$root/out" 2> "$root/err"
}

# 1. nginx already present: found, nothing installed.
root=$(fake_root present)
printf '#!/bin/sh\n' > "$root/sbin/nginx"; chmod 755 "$root/sbin/nginx"
if run_installer "$root" && [ "$(cat "$root/out")" = "$root/sbin/nginx" ] && [ ! -e "$root/apt.log" ]; then
    ok "install-nginx: nginx present -> its path, no apt-get"
else
    bad "install-nginx: nginx present" "status/out: $(cat "$root/out" "$root/err")"
fi

# 2. no nginx, no policy file: installed with a temporary policy that is removed afterwards.
root=$(fake_root fresh)
if run_installer "$root" && [ "$(cat "$root/out")" = "$root/sbin/nginx" ] \
    && grep -q "policy present during install" "$root/apt.log" && [ ! -e "$root/policy-rc.d" ]; then
    ok "install-nginx: no policy file -> exit 0, policy only during the install"
else
    bad "install-nginx: no policy file" "$(cat "$root/out" "$root/err" "$root/apt.log" 2>&1)"
fi

# 3. no nginx, an existing policy file (the machine image of issue 11): exit 0, file untouched.
root=$(fake_root existing-policy)
printf '#!/bin/sh\n# the image'"'"'s own\nexit 101\n' > "$root/policy-rc.d"; chmod 755 "$root/policy-rc.d"
before=$(sha256sum < "$root/policy-rc.d")
if run_installer "$root" && [ "$(cat "$root/out")" = "$root/sbin/nginx" ] \
    && [ -e "$root/policy-rc.d" ] && [ "$(sha256sum < "$root/policy-rc.d")" = "$before" ]; then
    ok "install-nginx: existing policy file -> exit 0, file left as it was"
else
    bad "install-nginx: existing policy file" "$(cat "$root/out" "$root/err" 2>&1)"
fi

# 4. apt-get fails: non-zero, and the temporary policy is still removed.
root=$(fake_root apt-fails)
if run_installer "$root" FAKE_APT_FAIL=1; then
    bad "install-nginx: failing apt-get" "exit 0 although apt-get failed"
elif [ -e "$root/policy-rc.d" ]; then
    bad "install-nginx: failing apt-get" "left its temporary policy-rc.d behind"
else
    ok "install-nginx: failing apt-get -> non-zero, policy removed"
fi

# 5. setup-test-env's output: exactly the two export lines, naming folders that hold the tools.
# (scripts/test.sh ran it just before; with the same cache this is a quick, up-to-date run.)
if out=$("$here/scripts/setup-test-env.sh" 2> "$tmp/setup.err"); then
    lines=$(printf '%s\n' "$out" | wc -l)
    tools=$(printf '%s\n' "$out" | sed -n 's/^export KEYGATE_TOOLS_BIN=//p')
    modules=$(printf '%s\n' "$out" | sed -n 's/^export KEYGATE_NODE_MODULES=//p')
    if [ "$lines" -eq 2 ] && [ -x "$tools/localstripe" ] && [ -x "$tools/bao" ] && [ -x "$tools/moto_server" ] \
        && "$tools/python" -c 'import pyarrow, duckdb, stripe' 2>/dev/null && [ -d "$modules/stripe" ]; then
        ok "setup-test-env: two export lines naming installed tools"
    else
        bad "setup-test-env output" "$out"
    fi
else
    bad "setup-test-env" "failed: $(cat "$tmp/setup.err")"
fi

# 6. setup-test-env with a missing prerequisite: non-zero, step named, no export line.
if out=$(PYTHON=/nonexistent/python3 KEYGATE_CACHE="$tmp/cache" "$here/scripts/setup-test-env.sh" 2> "$tmp/fail.err"); then
    bad "setup-test-env failure" "exit 0 without python"
elif [ -n "$out" ] || ! grep -q "FAILED in step: check prerequisites" "$tmp/fail.err"; then
    bad "setup-test-env failure" "out=[$out] err=[$(cat "$tmp/fail.err")]"
else
    ok "setup-test-env: missing python -> non-zero, step named, nothing exported"
fi

# 7. scripts/test.sh stops at once when the setup fails, naming the step (cargo never starts).
if PYTHON=/nonexistent/python3 KEYGATE_CACHE="$tmp/cache2" "$here/scripts/test.sh" --no-run > "$tmp/t.out" 2> "$tmp/t.err"; then
    bad "test.sh with failing setup" "exit 0"
elif ! grep -q "FAILED in step: install test tools" "$tmp/t.err" || grep -q "build binaries" "$tmp/t.err"; then
    bad "test.sh with failing setup" "$(cat "$tmp/t.err")"
else
    ok "test.sh: failing setup -> stops at once, step named"
fi

echo "setup scripts: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
