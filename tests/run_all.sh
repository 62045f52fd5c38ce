#!/usr/bin/env bash
# Runs crmpay's test suites on private, throwaway PostgreSQL clusters:
#   1. tests/lib/pgtree.sh   private install tree with this checkout's build
#   2. tests/run_regress.sh  pg_regress over sql/*.sql          (part "regress")
#   3. pytest tests/         integration tests, Debian's Python (part "integration")
#
# Usage: bash tests/run_all.sh [all|regress|integration]    (default: all)
# Both parts run even if the first fails; exits non-zero if any part fails.
# pytest collecting no tests (exit 5) is a failure.
# Env: CRMPAY_REGRESS_TIMEOUT / CRMPAY_PYTEST_TIMEOUT (seconds; defaults
#      900 / 2400) bound each part; PYTEST_ADDOPTS passes extra pytest options.
set -euo pipefail

mode="${1:-all}"
case "$mode" in
  all|regress|integration) ;;
  *) echo "usage: bash tests/run_all.sh [all|regress|integration]" >&2; exit 2 ;;
esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$repo"

PYTHON=/usr/bin/python3   # Debian's, with pytest and psycopg 3 (not the first python3 on PATH)

section() { printf '\n===== %s =====\n' "$*"; }

work="$(mktemp -d /tmp/crmpay-runall.XXXXXX)"   # counts and junit XML
child=""                                         # pid of the running part

# Each part runs in the background while we `wait`, so that a SIGTERM/SIGINT
# to this script is handled at once: pass SIGTERM on to the part (both parts
# stop and remove their clusters on SIGTERM), wait for it, then exit.
on_signal() {
  trap - INT TERM
  if [ -n "$child" ]; then
    echo "run_all: signal $1: stopping the running part" >&2
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  exit $((128 + $2))
}
trap 'on_signal INT 2' INT
trap 'on_signal TERM 15' TERM
trap 'rm -rf "$work"' EXIT

# run_part SECONDS CMD...: run CMD under a timeout; sets part_rc.
# `timeout --foreground` keeps CMD in our process group (Ctrl-C still reaches
# it); on timeout CMD gets SIGTERM, and SIGKILL only a minute later.
run_part() {
  local limit=$1; shift
  timeout --foreground --kill-after=60 "$limit" "$@" &
  child=$!
  set +e
  wait "$child"
  part_rc=$?
  set -e
  child=""
  if [ "$part_rc" -eq 124 ]; then
    echo "run_all: timed out after $limit s" >&2
  fi
}

section "private PostgreSQL tree"
start=$SECONDS
if ! bindir="$(bash tests/lib/pgtree.sh)"; then
  echo "could not build/install crmpay into the private tree (see above)" >&2
  exit 1
fi
echo "bin dir: $bindir ($((SECONDS - start)) s)"

regress_rc=skipped
integration_rc=skipped
passed=0 failed=0 skipped=0   # for the closing line

if [ "$mode" = all ] || [ "$mode" = regress ]; then
  section "regression tests (pg_regress)"
  start=$SECONDS
  CRMPAY_REGRESS_COUNTS="$work/regress.counts" \
    run_part "${CRMPAY_REGRESS_TIMEOUT:-900}" bash tests/run_regress.sh "$bindir"
  regress_rc=$part_rc
  echo "regress: exit $regress_rc ($((SECONDS - start)) s)"
  p=0 f=0
  if [ -s "$work/regress.counts" ]; then read -r p f <"$work/regress.counts" || true; fi
  if [ "$regress_rc" -ne 0 ] && [ "${f:-0}" -eq 0 ]; then f=1; fi   # killed, timed out, ...
  passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0}))
fi

if [ "$mode" = all ] || [ "$mode" = integration ]; then
  section "integration tests (pytest)"
  start=$SECONDS
  # -p no:cacheprovider: no .pytest_cache in the checkout; junit XML for the counts.
  CRMPAY_PG_BINDIR="$bindir" PYTHONDONTWRITEBYTECODE=1 \
    run_part "${CRMPAY_PYTEST_TIMEOUT:-2400}" \
      "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$work/junit.xml" tests/
  integration_rc=$part_rc
  echo "integration: exit $integration_rc ($((SECONDS - start)) s)"
  if [ "$integration_rc" -eq 5 ]; then
    echo "integration: pytest collected no tests: counted as a failure" >&2
  fi
  p=0 f=0 s=0
  if [ -f "$work/junit.xml" ]; then
    read -r p f s < <("$PYTHON" - "$work/junit.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
tests = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skip = sum(int(s.get("skipped", 0)) for s in suites)
print(tests - bad - skip, bad, skip)
EOF
    ) || true
  fi
  # A failure pytest did not count (no tests collected, usage error, killed) still counts once.
  if [ "$integration_rc" -ne 0 ] && [ "${f:-0}" -eq 0 ]; then f=1; fi
  passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0})); skipped=$((skipped + ${s:-0}))
fi

section "summary"
ok=1
for part in regress integration; do
  rc_var="${part}_rc"
  rc="${!rc_var}"
  if [ "$rc" = skipped ]; then
    echo "$part: not run"
  elif [ "$rc" -eq 0 ]; then
    echo "$part: ok"
  else
    echo "$part: FAILED (exit $rc)"
    ok=0
  fi
done
# The closing line, in the plain "N passed, N failed" form any CI log reader knows.
echo "crmpay: $passed passed, $failed failed, $skipped skipped"
[ "$ok" -eq 1 ]
