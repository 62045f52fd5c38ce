#!/usr/bin/env bash
# make demo: the one-time payment flow end to end on a throwaway cluster and
# the loopback Stripe double (HTTPS, test CA).  Builds a private install tree
# with this checkout's crmpay, then runs scripts/demo.py, which stops and
# removes everything it started, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bindir=$(bash tests/lib/pgtree.sh)
CRMPAY_PG_BINDIR="$bindir" exec /usr/bin/python3 scripts/demo.py
