"""Reconciliation benchmark (issue 6), ratios measured in one run:

1. Matching 1,000,000 gateway records against 1,000,000 payments with 0.5 %
   discrepancies (all seven kinds) -- crmpay.reconcile(), set-based -- versus
   a bare FULL OUTER JOIN of the same two tables in the same run, with the
   same work_mem.  Target: at most 2x the bare join.
2. Linear scaling: the same at 100,000 against 100,000 (time per order
   should be the same), with the bare join's own scaling next to it (what
   the hardware gives: at 1,000,000 orders neither hash table fits in the
   CPU caches), and a 100,000-record window inside an account of 1,000,000
   payments (should cost like the 100,000 run, not the 1,000,000).
3. Gateway paging through the Stripe double at 100 records per page:
   records per second fetched, parsed and staged by crmpay.reconcile().
4. Report import: an Adyen settlement details report parsed and stored,
   lines per second.

    CRMPAY_PG_BINDIR=$(bash tests/lib/pgtree.sh) /usr/bin/python3 bench/reconcile.py [--scale 0.1]

--scale shrinks every size (for a quick look); the numbers in the README
come from --scale 1.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from doubles.stripe_double import StripeDouble, STORES  # noqa: E402
from doubles.tlsca import make_ca_and_server_cert  # noqa: E402
from lib.cluster import PgCluster  # noqa: E402

BINDIR = os.environ["CRMPAY_PG_BINDIR"]
WORK_MEM = "256MB"
KINDS = 7           # one discrepancy of each kind every PERIOD payments
PERIOD = 1400       # 7 / 1400 = 0.5 %


def load_account(conn, account, n, start="2024-01-01", days=30, offset=0):
    """n payments and their gateway records (as an imported Adyen settlement
    report would give them), 0.5 % of them discrepancies of every kind."""
    conn.execute("SELECT crmpay.add_account(%s, 'adyen', '{\"api_key\": \"AQE_bench\"}', NULL,"
                 " '{\"merchant_account\": \"BenchECOM\", \"return_url\": \"https://shop.example/paid\"}')",
                 (account,))
    span = f"{days} days"
    # payments: k = i % PERIOD picks the discrepancy (1 status, 6 missing at gateway)
    conn.execute(f"""
        INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status, idempotency_key,
                                     created_at, refunded_minor, gateway_payment_ref)
        SELECT %s, %s || i, 1000 + i %% 9000, 'EUR',
               CASE WHEN i %% {PERIOD} = 1 THEN 'open' ELSE 'paid' END,
               %s || i, %s::timestamptz + (i - 1) * (interval '{span}' / %s), 0, 'psp' || i
          FROM generate_series(1, %s) i""",
                 (account, account + "-", account + "-k", start, n, n))
    imp = conn.execute("INSERT INTO crmpay.report_imports (account, format, source, lines, records, duplicates,"
                       " first_at, last_at, sha256) VALUES (%s, 'adyen_settlement_details', 'bench', %s, %s, 0,"
                       " %s::timestamptz, %s::timestamptz + %s::interval, 'x') RETURNING id",
                       (account, n, n, start, start, span)).fetchone()[0]
    # one settled record per payment (2 amount, 3 currency), none for 6
    # (missing at gateway), a second charge for 4 (duplicate), a refund for 5,
    # a charge of an order the CRM does not have for 0 (missing in CRM)
    conn.execute(f"""
        INSERT INTO crmpay.gateway_records (import_id, account, line_no, record_type, record_ref, match_key,
               order_ref, gateway_payment_ref, status, gateway_status, amount_minor, currency,
               fin_currency, fin_amount_minor, fee_minor, net_minor, occurred_at)
        SELECT %s, %s, r.line, r.type, r.ref, r.key, r.key, r.psp, r.status, 'Settled', r.amount, r.currency,
               r.currency, r.signed, 25, r.signed - 25,
               %s::timestamptz + (i - 1) * (interval '{span}' / %s) + interval '1 minute'
          FROM generate_series(1, %s) i
          CROSS JOIN LATERAL (VALUES
              (1, 'charge', 'S' || i, %s || i, 'psp' || i, 'paid',
               1000 + i %% 9000 + CASE WHEN i %% {PERIOD} = 2 THEN 100 ELSE 0 END,
               CASE WHEN i %% {PERIOD} = 3 THEN 'USD' ELSE 'EUR' END, 1000 + i %% 9000, i %% {PERIOD} <> 6),
              (2, 'charge', 'D' || i, %s || i, 'dup' || i, 'paid', 1000 + i %% 9000, 'EUR', 1000 + i %% 9000,
               i %% {PERIOD} = 4),
              (3, 'refund', 'R' || i, %s || i, 'psp' || i, NULL, 500, 'EUR', -500, i %% {PERIOD} = 5),
              (4, 'charge', 'G' || i, %s || i, 'ghost' || i, 'paid', 700, 'EUR', 700, i %% {PERIOD} = 0)
          ) AS r(line, type, ref, key, psp, status, amount, currency, signed, wanted)
         WHERE r.wanted""",
                 (imp, account, start, n, n, account + "-", account + "-", account + "-", account + "-ghost-"))
    return imp


def bench_matching(conn, account, imp, since, until, tries=3):
    """crmpay.reconcile() vs the bare FULL OUTER JOIN of the same tables, in
    turns (so that a neighbour's load hits both alike); the best of each."""
    conn.execute(f"SET work_mem = '{WORK_MEM}'")
    conn.execute("SET jit = off")       # crmpay's matching runs without JIT too
    conn.execute(f"SET crmpay.reconcile_work_mem = '{WORK_MEM}'")
    bares, runs = [], []
    for _ in range(tries):
        t = time.perf_counter()
        conn.execute("""
            SELECT count(*) FROM (SELECT match_key FROM crmpay.gateway_records
                                   WHERE import_id IS NOT NULL AND account = %s
                                     AND occurred_at >= %s::timestamptz - interval '15 minutes'
                                     AND occurred_at < %s::timestamptz + interval '15 minutes') g
            FULL JOIN (SELECT order_ref FROM crmpay.payments
                        WHERE account = %s AND created_at >= %s::timestamptz - interval '15 minutes'
                          AND created_at < %s::timestamptz + interval '15 minutes') p
              ON p.order_ref = g.match_key""", (account, since, until, account, since, until)).fetchall()
        bares.append(time.perf_counter() - t)
        t = time.perf_counter()
        run = conn.execute("SELECT crmpay.reconcile(%s, %s, %s)", (account, since, until)).fetchone()[0]
        runs.append((time.perf_counter() - t, run))
    bare = min(bares)
    dt, run = min(runs)
    row = conn.execute("SELECT status, records_loaded, records_matched, payments_checked, discrepancies, counts"
                       "  FROM crmpay.reconciliation_runs WHERE id = %s", (run,)).fetchone()
    return bare, dt, row


class FastListDouble(StripeDouble):
    """The Stripe double with list endpoints that make their objects on the
    fly (a million dicts would not fit): same wire format, auth, paging
    rules and fault switches; objects numbered newest first."""

    def __init__(self, n, created, *a, **kw):
        super().__init__(*a, **kw)
        self.n = n
        self.created = created

    def _synth(self, kind, i):
        order = "F-%d" % i
        if kind == "checkout.session":
            return {"id": "cs_f%07d" % i, "object": "checkout.session", "amount_total": 1000 + i % 9000,
                    "currency": "eur", "client_reference_id": order, "created": self.created,
                    "metadata": {"crmpay_order_ref": order}, "payment_intent": "pi_f%07d" % i,
                    "payment_status": "paid", "status": "complete", "mode": "payment", "url": None}
        if kind == "payment_intent":
            return {"id": "pi_f%07d" % i, "object": "payment_intent", "amount": 1000 + i % 9000,
                    "amount_received": 1000 + i % 9000, "currency": "eur", "created": self.created,
                    "metadata": {"crmpay_order_ref": order}, "status": "succeeded",
                    "latest_charge": {"id": "ch_f%07d" % i, "object": "charge", "amount_refunded": 0,
                                      "disputed": False}}
        return {"id": "txn_f%07d" % i, "object": "balance_transaction", "amount": 1000 + i % 9000,
                "currency": "eur", "created": self.created, "fee": 40, "net": 960 + i % 9000,
                "type": "charge", "status": "available",
                "source": {"id": "ch_f%07d" % i, "object": "charge",
                           "payment_intent": {"id": "pi_f%07d" % i, "object": "payment_intent",
                                              "metadata": {"crmpay_order_ref": order}}}}

    def _list_generic(self, params, ctx, kind):
        limit = int(params.get("limit", 10))
        after = params.get("starting_after")
        start = int(after[4:] if kind == "checkout.session" else after.split("_f")[1]) + 1 if after else 0
        data = [self._synth(kind, i) for i in range(start, min(start + limit, self.n))]
        return 200, {"object": "list", "data": data, "has_more": start + limit < self.n, "url": STORES[kind]}


def bench_paging(pg, tls, n):
    """n orders listed through the double: three lists of n objects."""
    created = int(time.time()) - 60
    double = FastListDouble(n, created, api_keys={"sk_test_bench"}, webhook_secret="whsec_bench",
                            certfile=tls["server_cert"], keyfile=tls["server_key"])
    double.start()
    try:
        pg.create_database("paging")
        conn = pg.connect("paging")
        conn.execute("CREATE EXTENSION crmpay")
        conn.execute("SELECT crmpay.add_account('shop', 'stripe', '{\"secret_key\": \"sk_test_bench\"}', NULL,"
                     " %s::jsonb)", (json.dumps({"api_base": double.base_url,
                                                 "success_url": "https://shop.example/paid"}),))
        conn.execute("ALTER TABLE crmpay.payments DISABLE TRIGGER USER")
        conn.execute("INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status,"
                     " idempotency_key, gateway_ref, refunded_minor)"
                     " SELECT 'shop', 'F-' || i, 1000 + i %% 9000, 'EUR', 'paid', 'k' || i,"
                     "        'cs_f' || lpad(i::text, 7, '0'), 0 FROM generate_series(0, %s - 1) i", (n,))
        conn.execute("ALTER TABLE crmpay.payments ENABLE TRIGGER USER")
        conn.execute("ANALYZE crmpay.payments")
        t = time.perf_counter()
        run = conn.execute("SELECT crmpay.reconcile('shop', now() - interval '1 hour', now())").fetchone()[0]
        dt = time.perf_counter() - t
        row = conn.execute("SELECT status, pages_fetched, records_loaded, records_matched, discrepancies"
                           "  FROM crmpay.reconciliation_runs WHERE id = %s", (run,)).fetchone()
        conn.close()
        return dt, row
    finally:
        double.stop()


def adyen_report(n):
    header = ("Company Account,Merchant Account,Psp Reference,Merchant Reference,Payment Method,Creation Date,"
              "TimeZone,Type,Modification Reference,Gross Currency,Gross Debit (GC),Gross Credit (GC),"
              "Exchange Rate,Net Currency,Net Debit (NC),Net Credit (NC),Commission (NC),Markup (NC),"
              "Scheme Fees (NC),Interchange (NC),Payment Method Variant,Modification Merchant Reference,"
              "Batch Number,Reserved4,Reserved5,Reserved6,Reserved7,Reserved8,Reserved9,Reserved10")
    lines = [header]
    for i in range(n):
        lines.append("Co,BenchECOM,88%014d,I-%d,visa,2024-02-%02d %02d:%02d:%02d,CET,Settled,89%014d,"
                     "EUR,,%d.%02d,1,EUR,,%d.%02d,,0.10,0.05,0.10,visa,,7,,,,,,," % (
                         i, i, 1 + i % 28, i % 24, i % 60, i % 60, i, 10 + i % 90, i % 100,
                         9 + i % 90, 75 + i % 25))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    big = int(1_000_000 * args.scale)
    small = int(100_000 * args.scale)
    paging_n = int(20_000 * max(args.scale, 0.05))
    report_n = int(200_000 * args.scale)

    tmp = tempfile.mkdtemp(prefix="crmpay-bench-tls-", dir="/tmp")
    os.chmod(tmp, 0o755)
    tls = make_ca_and_server_cert(tmp)
    for k in ("ca_cert", "server_cert", "wrong_ca_cert"):
        os.chmod(tls[k], 0o644)
    pg = PgCluster(BINDIR, settings={"crmpay.ca_file": tls["ca_cert"], "shared_buffers": "1GB",
                                     "max_wal_size": "8GB", "checkpoint_timeout": "30min",
                                     "synchronous_commit": False})
    pg.start()
    try:
        pg.create_database("bench")
        conn = pg.connect("bench")
        conn.execute("CREATE EXTENSION crmpay")
        conn.execute("ALTER TABLE crmpay.payments DISABLE TRIGGER USER")  # no NOTIFY per loaded row
        t = time.perf_counter()
        imp_big = load_account(conn, "big", big)
        imp_small = load_account(conn, "small", small)
        conn.execute("ALTER TABLE crmpay.payments ENABLE TRIGGER USER")
        conn.execute("VACUUM ANALYZE crmpay.payments")
        conn.execute("VACUUM ANALYZE crmpay.gateway_records")
        print(f"loaded {big:,} + {small:,} payments and their gateway records in {time.perf_counter() - t:.1f} s")

        def short(n):
            return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)

        results = {}
        for name, account, imp, since, until, n in (
                ("big", "big", imp_big, "2024-01-01", "2024-02-01", big),
                ("small", "small", imp_small, "2024-01-01", "2024-02-01", small),
                ("window", "big", imp_big, "2024-01-01", "2024-01-04", small)):
            bare, dt, row = bench_matching(conn, account, imp, since, until)
            results[name] = (bare, dt, row)
            label = {"big": f"{short(big)} vs {short(big)}", "small": f"{short(small)} vs {short(small)}",
                     "window": f"{short(small)} window in {short(big)}"}[name]
            print(f"{label:>18}: reconcile() {dt:6.3f} s ({dt / n * 1e6:.2f} us/order), bare FULL JOIN {bare:6.3f} s"
                  f" ({bare / n * 1e6:.2f} us/order), ratio {dt / bare:4.2f}x;"
                  f" {row[1]:,} records loaded, {row[2]:,} matched, {row[3]:,} payments,"
                  f" {row[4]:,} discrepancies {row[5]}")
        big_bare, big_t = results["big"][:2]
        small_bare, small_t = results["small"][:2]
        win_t = results["window"][1]
        print(f"scaling: {big:,} / {small:,} orders = {big / small:.0f}x data; reconcile() {big_t / small_t:.1f}x time"
              f" ({small_t / small * 1e6:.2f} -> {big_t / big * 1e6:.2f} us/order), the bare FULL JOIN"
              f" {big_bare / small_bare:.1f}x ({small_bare / small * 1e6:.2f} -> {big_bare / big * 1e6:.2f} us/order);"
              f" a 10 % window of the big account takes {win_t / small_t:.2f}x the small account's run")

        # report import: parse + store
        report = adyen_report(report_n)
        t = time.perf_counter()
        conn.execute("SELECT crmpay.import_report('big', 'adyen_settlement_details', %s)", (report,))
        dt = time.perf_counter() - t
        print(f"import_report: {report_n:,} lines ({len(report) / 1e6:.0f} MB) in {dt:.2f} s = "
              f"{report_n / dt:,.0f} lines/s")
        conn.close()

        dt, row = bench_paging(pg, tls, paging_n)
        print(f"paging through the Stripe double at 100 per page: {row[1]} pages, {row[2]:,} records in "
              f"{dt:.2f} s = {row[2] / dt:,.0f} records/s ({dt / row[1] * 1000:.1f} ms per page, HTTPS"
              f" round trip, parse, stage); {row[3]:,} matched, {row[4]} discrepancies")
    finally:
        pg.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
