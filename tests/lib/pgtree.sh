#!/usr/bin/env bash
# Builds or refreshes a private PostgreSQL 15 install tree for this checkout and
# prints its bin dir on stdout (everything else goes to stderr).
#
# Why: the tests must load *this* checkout's crmpay.so / crmpay.control, not
# whatever is in the system directories (several worktrees may build different
# crmpay versions at once). The tree is a plain copy of the system install:
# the postgres binary in it finds sharedir/pkglibdir relative to its own path,
# so after `make install DESTDIR=<tree>` it loads the crmpay installed there.
#
# Tree: /tmp/crmpay-pgtree-<first 8 hex of md5(absolute repo path)>
# Usage (from anywhere): bash tests/lib/pgtree.sh
set -euo pipefail

umask 022   # the tree must be readable by the postgres OS user, whatever CI's umask is

PG_LIB=/usr/lib/postgresql/15     # system binaries + pkglibdir
PG_SHARE=/usr/share/postgresql/15 # system sharedir (extension control/sql files)

# The repo root is two levels above this script (tests/lib/pgtree.sh);
# pwd -P gives the physical absolute path, which names the tree.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
hash="$(printf '%s' "$repo" | md5sum | cut -c1-8)"
tree="/tmp/crmpay-pgtree-$hash"

log() { echo "pgtree: $*" >&2; }

if [ ! -x "$PG_LIB/bin/postgres" ]; then
  log "no PostgreSQL 15 at $PG_LIB (run 'make deps')"
  exit 1
fi

# Serialise concurrent runs for the same checkout (e.g. 'make regress' and
# 'make integration' at once): one copies/installs while the other waits.
exec 9>"$tree.lock"
if ! flock -w 900 9; then
  log "timed out waiting for the lock $tree.lock"
  exit 1
fi

# Prune trees of checkouts that no longer exist (CI clones into a new folder
# every run, and each tree is ~50 MB). A tree whose lock someone holds is in
# use and is left alone.
for other in /tmp/crmpay-pgtree-*; do
  if [ ! -d "$other" ] || [ "$other" = "$tree" ] || [ ! -f "$other/.repo" ]; then continue; fi
  other_repo="$(cat "$other/.repo")"
  [ -d "$other_repo" ] && continue
  # shellcheck disable=SC2094  # the lock file is only locked, then removed
  if ( flock -n 8 || exit 1; rm -rf "$other" "$other.lock" ) 8>>"$other.lock"; then
    log "pruned $other (its checkout $other_repo is gone)"
  fi
done

sys_version="$("$PG_LIB/bin/postgres" --version)"
stamp="$tree/.pg-version"   # written only after a complete copy

# (Re)copy the PostgreSQL dirs when the tree is missing, incomplete (no stamp,
# e.g. an interrupted copy) or was copied from a different PostgreSQL build.
if [ ! -x "$tree$PG_LIB/bin/postgres" ] || [ ! -f "$stamp" ] \
   || [ "$(cat "$stamp")" != "$sys_version" ] \
   || [ "$("$tree$PG_LIB/bin/postgres" --version 2>/dev/null || true)" != "$sys_version" ]; then
  log "copying $PG_LIB and $PG_SHARE into $tree ($sys_version)"
  rm -rf "$tree"
  mkdir -p "$tree$(dirname "$PG_LIB")" "$tree$(dirname "$PG_SHARE")"
  # Real copies, not symlinks: PostgreSQL resolves its own executable's path
  # to find the share/lib dirs, so a symlinked binary would use the system ones.
  cp -a "$PG_LIB" "$tree$PG_LIB"
  cp -a "$PG_SHARE" "$tree$PG_SHARE"
  printf '%s\n' "$sys_version" >"$stamp"
fi
printf '%s\n' "$repo" >"$tree/.repo"   # which checkout this tree belongs to (for pruning)

# Always reinstall, so the newest build is what the tests load. `make install`
# builds first if needed (its output goes to stderr to keep stdout clean).
# It installs into a staging dir whose files are then renamed into the tree:
# tests already running on this tree (another run for the same checkout)
# never see a crmpay file missing or half-written, and a running server
# keeps the crmpay.so it mapped.
rm -rf "$tree".stage.*   # left by an interrupted run (we hold the lock: none is live)
stage="$(mktemp -d "$tree.stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
log "make install DESTDIR=$tree (via $stage)"
make -C "$repo" -s --no-print-directory install DESTDIR="$stage" >&2

if [ ! -f "$stage$PG_LIB/lib/crmpay.so" ] || [ ! -f "$stage$PG_SHARE/extension/crmpay.control" ]; then
  log "make install put no crmpay.so or crmpay.control in $stage"
  exit 1
fi

staged=()   # paths relative to the tree, e.g. ./usr/lib/postgresql/15/lib/crmpay.so
while IFS= read -r -d '' f; do staged+=("$f"); done \
  < <(cd "$stage" && find . \( -type f -o -type l \) -print0)
for f in "${staged[@]}"; do
  mkdir -p "$(dirname "$tree/$f")"
  mv -f "$stage/$f" "$tree/$f"   # rename(2) in /tmp: atomic replacement
done

# Remove crmpay files this build did not install: copies from the system
# install, or files an earlier build installed that have since been deleted
# from the repo (e.g. an upgrade script), so the tree holds exactly this build.
for f in "$tree$PG_SHARE"/extension/crmpay.control "$tree$PG_SHARE"/extension/crmpay--*.sql \
         "$tree$PG_LIB"/lib/crmpay.so "$tree$PG_LIB"/lib/bitcode/crmpay "$tree$PG_LIB"/lib/bitcode/crmpay.index.bc; do
  [ -e "$f" ] || continue
  rel=".${f#"$tree"}"
  keep=0
  for g in "${staged[@]}"; do
    case "$g" in "$rel"|"$rel"/*) keep=1; break ;; esac
  done
  if [ "$keep" -eq 0 ]; then
    log "removing stale $rel"
    rm -rf "$f"
  fi
done

# Make sure the postgres user can traverse and read everything.
chmod 755 "$tree"
chmod -R a+rX "$tree"

echo "$tree$PG_LIB/bin"
