#!/usr/bin/env bash
# Installs the test oracles (official gateway SDKs) pinned in package-lock.json
# into tests/node/node_modules.  Needs node + npm and the npm registry.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
exec npm ci --no-audit --no-fund --loglevel=error
