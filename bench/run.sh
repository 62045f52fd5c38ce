#!/usr/bin/env bash
# make bench: runs every benchmark in bench/ against a private install tree
# with this checkout's crmpay.  Benchmarks print ratios measured in one run;
# they are not tests and do not fail on a missed target.
set -euo pipefail
cd "$(dirname "$0")/.."
bindir=$(bash tests/lib/pgtree.sh)
for bench in bench/webhooks.py bench/verify_redsys.py bench/verify_paypal_braintree.py bench/verify_adyen.py bench/outbox.py bench/reconcile.py; do
  echo "== $bench"
  CRMPAY_PG_BINDIR="$bindir" /usr/bin/python3 "$bench"
done
