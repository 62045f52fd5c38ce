#!/usr/bin/env bash
# Installs the test oracles (tests/node/package-lock.json) into
# tests/node/node_modules with `npm ci`.  Tests that need them skip only
# when node or npm are absent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if ! command -v npm >/dev/null 2>&1; then
  echo "tests/node/install.sh: npm not found; the node oracle tests will be skipped" >&2
  exit 0
fi
npm ci --no-audit --no-fund --loglevel=error
