#!/usr/bin/env bash
# Runs the pg_regress suite (sql/*.sql against expected/*.out) on a throwaway
# temp instance with crmpay preloaded, using the private install tree.
#
# Usage: bash tests/run_regress.sh [BINDIR]
#   BINDIR: bin dir of the install tree to test (default: from tests/lib/pgtree.sh).
# Tests run in sorted order of their basenames, all in one database
# (contrib_regression), so an early test may set things up for later ones.
# On failure prints regression.diffs and the tail of the server log, exits 1.
# Env: CRMPAY_REGRESS_COUNTS=FILE makes it write "PASSED FAILED" test counts there.
# The temp dir (and any server still running in it) is removed on exit,
# on failure and on Ctrl-C / SIGTERM too.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$repo"

log() { echo "regress: $*" >&2; }

# --- which tests ----------------------------------------------------------
tests=()
while IFS= read -r f; do
  tests+=("$(basename "$f" .sql)")
done < <(find sql -maxdepth 1 -type f -name '*.sql' 2>/dev/null | LC_ALL=C sort)

if [ ${#tests[@]} -eq 0 ]; then
  log "no sql/*.sql files: nothing to run"
  exit 0
fi

bindir="${1:-}"
if [ -z "$bindir" ]; then
  bindir="$(bash tests/lib/pgtree.sh)"
fi
if [ ! -x "$bindir/postgres" ]; then
  log "no postgres binary in $bindir"
  exit 1
fi

# pg_regress ships with the server dev files; prefer the one in the tree.
pg_regress="$bindir/../lib/pgxs/src/test/regress/pg_regress"
[ -x "$pg_regress" ] || pg_regress=/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress
if [ ! -x "$pg_regress" ]; then
  log "pg_regress not found (run 'make deps': postgresql-server-dev-15)"
  exit 1
fi

# PostgreSQL refuses to run as root: run pg_regress as the postgres OS user.
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
  as_pg=(runuser -u postgres --)
fi

# --- temp dir, owned by the user that runs the server -----------------------
work="$(mktemp -d /tmp/crmpay-regress.XXXXXX)"
regress_pid=""
tail_pid=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # If pg_regress is still running (we were interrupted), stop it first.
  if [ -n "$regress_pid" ] && kill -0 "$regress_pid" 2>/dev/null; then
    kill -TERM "$regress_pid" 2>/dev/null || true
    wait "$regress_pid" 2>/dev/null || true
  fi
  if [ -n "$tail_pid" ]; then
    kill "$tail_pid" 2>/dev/null || true
  fi
  # pg_regress leaves its temp postmaster running when it is killed;
  # stop it (immediate: the data is thrown away anyway).
  if [ -f "$work/instance/data/postmaster.pid" ]; then
    (cd "$work" && "${as_pg[@]}" "$bindir/pg_ctl" -D "$work/instance/data" -m immediate -w -t 30 stop) \
      >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# pg_regress and the server must read the inputs: copy them out of the repo
# (CI may clone into a folder the postgres user cannot read, e.g. under /root).
mkdir -p "$work/in" "$work/out"
cp -r sql "$work/in/sql"
if [ -d expected ]; then cp -r expected "$work/in/expected"; else mkdir "$work/in/expected"; fi

# 32-byte master key the extension reads at startup.
head -c 32 /dev/urandom >"$work/master.key"
chmod 600 "$work/master.key"

cat >"$work/regress.conf" <<EOF
# appended to the temp instance's postgresql.conf by pg_regress --temp-config
shared_preload_libraries = 'crmpay'
crmpay.key_file = '$work/master.key'
fsync = off
EOF

if [ "$(id -u)" -eq 0 ]; then
  chown -R postgres:postgres "$work"
fi
chmod 700 "$work"

# A currently free TCP port (the temp instance only listens on a unix socket
# in a private dir, but pg_regress wants a port number for the socket name).
port="$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

log "running ${#tests[@]} test(s) with $pg_regress on port $port"

# Run in the background and `wait`, so a SIGTERM/SIGINT reaches our trap at
# once instead of after pg_regress finishes. cwd = $work: the postgres user
# may not be allowed into the caller's cwd. Its output goes to a file (kept
# for the counts below) that `tail --pid` shows live and ends with it.
: >"$work/pg_regress.log"   # exists before tail opens it
set +e
(cd "$work" && exec "${as_pg[@]}" "$pg_regress" \
    --bindir="$bindir" \
    --inputdir="$work/in" \
    --outputdir="$work/out" \
    --temp-instance="$work/instance" \
    --temp-config="$work/regress.conf" \
    --port="$port" \
    --encoding=UTF8 --no-locale \
    --dbname=contrib_regression \
    "${tests[@]}") >"$work/pg_regress.log" 2>&1 &
regress_pid=$!
tail -n +1 -s 0.2 -f --pid="$regress_pid" "$work/pg_regress.log" &
tail_pid=$!
wait "$regress_pid"
rc=$?
regress_pid=""
wait "$tail_pid"
tail_pid=""
set -e

# For tests/run_all.sh's closing line: "PASSED FAILED" counted from
# pg_regress's output (one line per test: "test NAME ... ok|FAILED").
if [ -n "${CRMPAY_REGRESS_COUNTS:-}" ]; then
  passed=$(grep -cE '^(test | +)[^ ]+ +\.\.\. ok ' "$work/pg_regress.log" 2>/dev/null || true)
  failed=$(grep -cE '^(test | +)[^ ]+ +\.\.\. (FAILED|failed)' "$work/pg_regress.log" 2>/dev/null || true)
  # A failure pg_regress did not count (crash, missing expected file) still counts once.
  if [ "$rc" -ne 0 ] && [ "${failed:-0}" -eq 0 ]; then failed=1; fi
  echo "${passed:-0} ${failed:-0}" >"$CRMPAY_REGRESS_COUNTS"
fi

if [ "$rc" -ne 0 ]; then
  echo >&2
  if [ -s "$work/out/regression.diffs" ]; then
    echo "===== regression.diffs =====" >&2
    cat "$work/out/regression.diffs" >&2
  fi
  # A test with no expected file makes pg_regress stop with "diff command
  # failed": show what the test printed, as a starting point for expected/.
  for t in "${tests[@]}"; do
    if ! compgen -G "$work/in/expected/${t}*.out" >/dev/null && [ -f "$work/out/results/$t.out" ]; then
      echo "===== expected/$t.out is missing; the test printed (results/$t.out): =====" >&2
      cat "$work/out/results/$t.out" >&2
    fi
  done
  # pg_regress writes the temp instance's server log under --outputdir.
  if [ -f "$work/out/log/postmaster.log" ]; then
    echo "===== tail of the temp instance's server log =====" >&2
    tail -n 60 "$work/out/log/postmaster.log" >&2
  elif [ -f "$work/out/log/initdb.log" ]; then
    echo "===== tail of initdb.log =====" >&2
    tail -n 30 "$work/out/log/initdb.log" >&2
  fi
  log "FAILED (pg_regress exit code $rc)"
  exit 1
fi
log "all ${#tests[@]} test(s) passed"
