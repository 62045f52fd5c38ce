#!/usr/bin/env bash
# Installs the test oracles of tests/node (the official @adyen/api-library,
# pinned by package-lock.json) into tests/node/node_modules.  Quick when
# they are already there.  Needs node and npm; the tests that use the
# oracles skip when node is absent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if ! command -v npm >/dev/null 2>&1; then
  echo "tests/node: npm not found; the SDK oracle tests will be skipped" >&2
  exit 0
fi
stamp="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ -f node_modules/.crmpay-installed ] && [ "$(cat node_modules/.crmpay-installed)" = "$stamp" ]; then
  echo "tests/node: oracles already installed"
  exit 0
fi
npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
echo "$stamp" >node_modules/.crmpay-installed
