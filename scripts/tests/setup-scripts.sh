#!/usr/bin/env bash
# Tests of the setup scripts themselves (issue 11), run by scripts/test.sh:
#   - scripts/install-deb.sh, for each program the setup installs with it (nginx, redis-server, chromium),
#     with the program already present, without it and with or without an existing policy-rc.d,
#     and with a failing apt-get, and its usage error: simulated
#     with a temporary PATH holding a fake apt-get and temporary locations for the policy file and
#     the packaged binary, so the machine's own nginx, redis-server and policy-rc.d are never touched;
#   - scripts/install-tansu.sh with the broker already cached, built (with a fake cargo) and with
#     a failing build (nothing half-installed is left in the cache), and two installs at once (one
#     builds, the other waits for it);
#   - scripts/setup-test-env.sh's output (exactly five export lines naming the installed tools)
#     and its failure (a missing prerequisite fails with the step named);
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

# A fake root: bin/ for the PATH (fake apt-get), sbin/ where the fake package puts its program
# (`$2`: nginx or redis-server), and a log of what apt-get saw.
fake_root() {
    local root="$tmp/$1"
    local program="$2"
    mkdir -p "$root/bin" "$root/sbin"
    cat > "$root/bin/apt-get" <<APT
#!/bin/sh
echo "apt-get \$*" >> "$root/apt.log"
case "\$1" in
  update) exit 0 ;;
  install)
    if [ -e "$root/policy-rc.d" ]; then echo "policy present during install" >> "$root/apt.log"; fi
    if [ -n "\${FAKE_APT_FAIL:-}" ]; then echo "E: fake failure" >&2; exit 100; fi
    printf '#!/bin/sh\necho fake $program\n' > "$root/sbin/$program"; chmod 755 "$root/sbin/$program"; exit 0 ;;
esac
exit 0
APT
    chmod 755 "$root/bin/apt-get"
    echo "$root"
}

# The system's tools for the installers' PATH, as symlinks in one folder, less the programs
# under test (and apt-get), so that a real nginx or redis-server in /usr/bin is not found.
tools_bin="$tmp/system-bin"
mkdir -p "$tools_bin"
for tool in /usr/bin/* /bin/*; do
    name=$(basename "$tool")
    case "$name" in nginx|redis-server|chromium|apt-get) continue ;; esac
    [ -e "$tools_bin/$name" ] || ln -s "$tool" "$tools_bin/$name"
done

# run_installer PROGRAM ROOT [ENV...]: scripts/install-deb.sh PROGRAM in the fake root.
run_installer() {
    local program="$1" root="$2"
    shift 2
    env "$@" PATH="$root/bin:$tools_bin" KEYGATE_DEB_BIN_DIRS="$root/sbin" \
        KEYGATE_POLICY_RC_D="$root/policy-rc.d" bash "$here/scripts/install-deb.sh" "$program" \
        > "$root/out" 2> "$root/err"
}

# The four cases, for one program: PROGRAM.
installer_cases() {
    local program="$1" name root before
    name="install-deb-$program"

    # 1. program already present: found, nothing installed.
    root=$(fake_root "$name-present" "$program")
    printf '#!/bin/sh\n' > "$root/sbin/$program"; chmod 755 "$root/sbin/$program"
    if run_installer "$program" "$root" && [ "$(cat "$root/out")" = "$root/sbin/$program" ] && [ ! -e "$root/apt.log" ]; then
        ok "$name: $program present -> its path, no apt-get"
    else
        bad "$name: $program present" "status/out: $(cat "$root/out" "$root/err")"
    fi

    # 2. no program, no policy file: installed with a temporary policy that is removed afterwards.
    root=$(fake_root "$name-fresh" "$program")
    if run_installer "$program" "$root" && [ "$(cat "$root/out")" = "$root/sbin/$program" ] \
        && grep -q "policy present during install" "$root/apt.log" && [ ! -e "$root/policy-rc.d" ]; then
        ok "$name: no policy file -> exit 0, policy only during the install"
    else
        bad "$name: no policy file" "$(cat "$root/out" "$root/err" "$root/apt.log" 2>&1)"
    fi

    # 3. no program, an existing policy file (the machine image of issue 11): exit 0, file untouched.
    root=$(fake_root "$name-existing-policy" "$program")
    printf '#!/bin/sh\n# the image'"'"'s own\nexit 101\n' > "$root/policy-rc.d"; chmod 755 "$root/policy-rc.d"
    before=$(sha256sum < "$root/policy-rc.d")
    if run_installer "$program" "$root" && [ "$(cat "$root/out")" = "$root/sbin/$program" ] \
        && [ -e "$root/policy-rc.d" ] && [ "$(sha256sum < "$root/policy-rc.d")" = "$before" ]; then
        ok "$name: existing policy file -> exit 0, file left as it was"
    else
        bad "$name: existing policy file" "$(cat "$root/out" "$root/err" 2>&1)"
    fi

    # 4. apt-get fails: non-zero, and the temporary policy is still removed.
    root=$(fake_root "$name-apt-fails" "$program")
    if run_installer "$program" "$root" FAKE_APT_FAIL=1; then
        bad "$name: failing apt-get" "exit 0 although apt-get failed"
    elif [ -e "$root/policy-rc.d" ]; then
        bad "$name: failing apt-get" "left its temporary policy-rc.d behind"
    else
        ok "$name: failing apt-get -> non-zero, policy removed"
    fi
}

installer_cases nginx
installer_cases redis-server
installer_cases chromium

# Usage error: no program named -> exit 2 with the usage line, nothing installed.
root=$(fake_root "install-deb-usage" nginx)
if env PATH="$root/bin:$tools_bin" bash "$here/scripts/install-deb.sh" > "$root/out" 2> "$root/err"; then
    bad "install-deb: no program" "exit 0"
elif [ $? -ne 2 ] || ! grep -q "usage: scripts/install-deb.sh PROGRAM" "$root/err" || [ -e "$root/apt.log" ]; then
    bad "install-deb: no program" "$(cat "$root/err")"
else
    ok "install-deb: no program -> exit 2, usage, no apt-get"
fi

# install-tansu.sh, with a fake cargo that "builds" a tansu into its --root (or fails).
tansu_root="$tmp/tansu"
mkdir -p "$tansu_root/bin"
cat > "$tansu_root/bin/cargo" <<CARGO
#!/bin/sh
echo "cargo \$*" >> "$tansu_root/cargo.log"
[ -n "\${FAKE_CARGO_FAIL:-}" ] && { echo "error: fake build failure" >&2; exit 101; }
[ -n "\${FAKE_CARGO_SLEEP:-}" ] && sleep "\$FAKE_CARGO_SLEEP"
while [ \$# -gt 0 ]; do [ "\$1" = "--root" ] && root="\$2"; shift; done
mkdir -p "\$root/bin" && printf '#!/bin/sh\necho tansu\n' > "\$root/bin/tansu" && chmod 755 "\$root/bin/tansu"
CARGO
chmod 755 "$tansu_root/bin/cargo"
run_tansu_to() {
    local out="$1"
    shift
    env "$@" KEYGATE_CARGO="$tansu_root/bin/cargo" KEYGATE_TANSU_VERSION=9.9.9 \
        bash "$here/scripts/install-tansu.sh" > "$out" 2> "$out.err"
}
run_tansu() {
    run_tansu_to "$tansu_root/out" "$@"
    local code=$?
    cp "$tansu_root/out.err" "$tansu_root/err"
    return $code
}
# a. not cached: built with --locked --features dynostore, moved into the cache, path printed.
if run_tansu KEYGATE_TANSU_CACHE="$tansu_root/cache" && [ "$(cat "$tansu_root/out")" = "$tansu_root/cache/tansu-9.9.9/bin/tansu" ] \
    && [ -x "$tansu_root/cache/tansu-9.9.9/bin/tansu" ] && grep -q "install tansu --version 9.9.9 --locked --features dynostore" "$tansu_root/cargo.log"; then
    ok "install-tansu: not cached -> built once into the versioned cache folder"
else
    bad "install-tansu: not cached" "$(cat "$tansu_root/out" "$tansu_root/err" "$tansu_root/cargo.log" 2>&1)"
fi
# b. cached: its path, cargo not run again.
rm -f "$tansu_root/cargo.log"
if run_tansu KEYGATE_TANSU_CACHE="$tansu_root/cache" && [ "$(cat "$tansu_root/out")" = "$tansu_root/cache/tansu-9.9.9/bin/tansu" ] \
    && [ ! -e "$tansu_root/cargo.log" ]; then
    ok "install-tansu: cached -> its path, no build"
else
    bad "install-tansu: cached" "$(cat "$tansu_root/out" "$tansu_root/err" 2>&1)"
fi
# c. the build fails: non-zero, nothing left in the cache that a later run would trust.
if run_tansu KEYGATE_TANSU_CACHE="$tansu_root/cache-fail" FAKE_CARGO_FAIL=1; then
    bad "install-tansu: failing build" "exit 0 although cargo failed"
elif [ -e "$tansu_root/cache-fail/tansu-9.9.9" ] || [ -n "$(ls -A "$tansu_root/cache-fail" 2>/dev/null | grep -v '^\.tansu-9\.9\.9\.lock$')" ]; then
    bad "install-tansu: failing build" "left $(ls -A "$tansu_root/cache-fail") behind"
else
    ok "install-tansu: failing build -> non-zero, cache left empty (but for its lock file)"
fi
# d. two installs at once (two checkouts, CI beside a developer): one builds, the other waits
# for it and prints the same path.
rm -f "$tansu_root/cargo.log"
run_tansu_to "$tansu_root/one" KEYGATE_TANSU_CACHE="$tansu_root/cache-two" FAKE_CARGO_SLEEP=2 &
first=$!
sleep 0.5
run_tansu_to "$tansu_root/two" KEYGATE_TANSU_CACHE="$tansu_root/cache-two" FAKE_CARGO_SLEEP=2
second=$?
wait "$first"
first=$?
want="$tansu_root/cache-two/tansu-9.9.9/bin/tansu"
builds=$(grep -c "install tansu" "$tansu_root/cargo.log" 2>/dev/null || true)
waited=$(cat "$tansu_root/one.err" "$tansu_root/two.err" | grep -c "waiting for it" || true)
if [ "$first$second" = 00 ] && [ "$builds" = 1 ] && [ "$waited" = 1 ] \
    && [ "$(cat "$tansu_root/one")" = "$want" ] && [ "$(cat "$tansu_root/two")" = "$want" ]; then
    ok "install-tansu: two at once -> one build, the other waits and uses it"
else
    bad "install-tansu: two at once" "exits $first/$second, $builds build(s), $waited waited: $(cat "$tansu_root/one.err" "$tansu_root/two.err")"
fi

# 5. setup-test-env's output: exactly the five export lines, naming the installed tools.
# (scripts/test.sh ran it just before; with the same cache this is a quick, up-to-date run.)
if out=$("$here/scripts/setup-test-env.sh" 2> "$tmp/setup.err"); then
    lines=$(printf '%s\n' "$out" | wc -l)
    tools=$(printf '%s\n' "$out" | sed -n 's/^export KEYGATE_TOOLS_BIN=//p')
    modules=$(printf '%s\n' "$out" | sed -n 's/^export KEYGATE_NODE_MODULES=//p')
    redis=$(printf '%s\n' "$out" | sed -n 's/^export KEYGATE_REDIS_SERVER=//p')
    chromium=$(printf '%s\n' "$out" | sed -n 's/^export KEYGATE_CHROMIUM=//p')
    tansu=$(printf '%s\n' "$out" | sed -n 's/^export KEYGATE_TANSU=//p')
    if [ "$lines" -eq 5 ] && [ -x "$chromium" ] && [ -x "$tansu" ] && "$tansu" --version >/dev/null 2>&1 && [ -x "$tools/localstripe" ] && [ -x "$tools/bao" ] && [ -x "$tools/moto_server" ] \
        && "$tools/python" -c 'import pyarrow, duckdb, stripe, confluent_kafka' 2>/dev/null && [ -d "$modules/stripe" ] \
        && "$redis" --version 2>/dev/null | grep -q "Redis server v=[7-9]"; then
        ok "setup-test-env: five export lines naming installed tools"
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
