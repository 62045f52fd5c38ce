"""Reconciliation matching (extension/reconcile_match.c) when its memory is
short: the hash table of a window's orders outgrows
crmpay.reconcile_work_mem, and matching goes in several passes, each over a
share of the keys.  The outcome must be exactly that of one pass."""

import pytest

PERIOD = 40          # one discrepancy of each kind every PERIOD orders


def load(conn, account, n):
    """n orders of an Adyen account, as an imported settlement report gives
    them: clean ones, discrepancies of every kind, orders with several
    records, records without a key, records and payments in the margins."""
    conn.execute("SELECT crmpay.add_account(%s, 'adyen', '{\"api_key\": \"AQE_t\"}', NULL,"
                 " '{\"merchant_account\": \"M\", \"return_url\": \"https://shop.example/paid\"}')", (account,))
    conn.execute("ALTER TABLE crmpay.payments DISABLE TRIGGER USER")
    # k = i % PERIOD: 1 open (status), 6 no record (missing at gateway), 7
    # created two days before the window (its record is in it: the payment
    # is found by its key), 8 partially refunded in the CRM
    conn.execute(f"""
        INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status, idempotency_key,
                                     created_at, refunded_minor, gateway_payment_ref)
        SELECT %s, 'O-' || i, 1000 + i %% 97, CASE WHEN i %% 5 = 0 THEN 'USD' ELSE 'EUR' END,
               CASE i %% {PERIOD} WHEN 1 THEN 'open' WHEN 8 THEN 'partially_refunded' ELSE 'paid' END,
               %s || i,
               CASE WHEN i %% {PERIOD} = 7 THEN timestamptz '2024-04-29'
                    ELSE timestamptz '2024-05-01' + (i - 1) * (interval '10 days' / %s) END,
               CASE WHEN i %% {PERIOD} = 8 THEN 300 ELSE 0 END, 'psp' || i
          FROM generate_series(1, %s) i""", (account, account + "-k", n, n))
    conn.execute("ALTER TABLE crmpay.payments ENABLE TRIGGER USER")
    imp = conn.execute("INSERT INTO crmpay.report_imports (account, format, source, lines, records, duplicates,"
                       " first_at, last_at, sha256) VALUES (%s, 'adyen_settlement_details', 'test', %s, %s, 0,"
                       " '2024-04-30', '2024-05-12', 'x') RETURNING id", (account, n, n)).fetchone()[0]
    # a charge per order (2 amount, 3 currency, none for 6), a second
    # charge for 4 (duplicate), refunds for 5 and 8 (8 as in the CRM), a
    # charge of an unknown order for 0, a fee line without a key for 9
    conn.execute(f"""
        INSERT INTO crmpay.gateway_records (import_id, account, line_no, record_type, record_ref, match_key,
               order_ref, gateway_payment_ref, status, gateway_status, amount_minor, currency,
               fin_currency, fin_amount_minor, fee_minor, net_minor, occurred_at)
        SELECT %s, %s, i * 10 + r.line, r.type, r.ref || i, r.key, r.key, r.psp, r.status, 'Settled', r.amount,
               r.currency, r.currency, r.signed, 25, r.signed - 25,
               timestamptz '2024-05-01' + (i - 1) * (interval '10 days' / %s) + interval '1 minute'
          FROM generate_series(1, %s) i
          CROSS JOIN LATERAL (VALUES
              (1, 'charge', 'S', 'O-' || i, 'psp' || i, 'paid',
               1000 + i %% 97 + CASE WHEN i %% {PERIOD} = 2 THEN 100 ELSE 0 END,
               CASE WHEN (i %% 5 = 0) <> (i %% {PERIOD} = 3) THEN 'USD' ELSE 'EUR' END, 1000 + i %% 97,
               i %% {PERIOD} <> 6),
              (2, 'charge', 'D', 'O-' || i, 'dup' || i, 'paid', 1000 + i %% 97,
               CASE WHEN i %% 5 = 0 THEN 'USD' ELSE 'EUR' END, 1000 + i %% 97, i %% {PERIOD} = 4),
              (3, 'refund', 'R', 'O-' || i, 'psp' || i, NULL, 300,
               CASE WHEN i %% 5 = 0 THEN 'USD' ELSE 'EUR' END, -300, i %% {PERIOD} IN (5, 8)),
              (4, 'charge', 'G', 'ghost-' || i, 'ghost' || i, 'paid', 700, 'EUR', 700, i %% {PERIOD} = 0),
              (5, 'balance', 'F', NULL, NULL, NULL, NULL, 'EUR', -10, i %% {PERIOD} = 9)
          ) AS r(line, type, ref, key, psp, status, amount, currency, signed, wanted)
         WHERE r.wanted""", (imp, account, n, n))
    conn.execute("ANALYZE crmpay.payments")
    conn.execute("ANALYZE crmpay.gateway_records")


def reconcile(conn, account, work_mem):
    """A run with crmpay.reconcile_work_mem = work_mem: its row, its items and
    the passes the matching said it took."""
    said = []
    conn.add_notice_handler(lambda d: said.append(d.message_primary or ""))
    conn.execute("SELECT set_config('crmpay.reconcile_work_mem', %s, false)", (work_mem,))
    conn.execute("SET client_min_messages = debug1")
    try:
        run = conn.execute("SELECT crmpay.reconcile(%s, '2024-05-01', '2024-05-11')", (account,)).fetchone()[0]
    finally:
        conn.execute("RESET client_min_messages")
        conn.execute("RESET crmpay.reconcile_work_mem")
    row = conn.execute("SELECT status, error, records_loaded, records_matched, payments_checked, discrepancies,"
                       " counts, totals FROM crmpay.reconciliation_runs WHERE id = %s", (run,)).fetchone()
    items = conn.execute("SELECT kind, payment_id, order_ref, gateway_ref, crm_amount_minor, gateway_amount_minor,"
                         " crm_currency, gateway_currency, crm_status, gateway_status, detail, evidence,"
                         " heal_action FROM crmpay.reconciliation_items WHERE run_id = %s"
                         " ORDER BY order_ref, kind, detail", (run,)).fetchall()
    passes = [m for m in said if "reconciliation matching done in" in m]
    return row, items, passes


def test_matching_in_passes_when_memory_is_short_finds_the_same(db):
    n = 6000
    load(db, "shop", n)
    row, items, passes = reconcile(db, "shop", "256MB")
    assert passes == ["crmpay: reconciliation matching done in 1 pass"]
    assert row[0] == "succeeded", row[1]
    per_kind = n // PERIOD
    assert row[6] == {"missing_in_crm": per_kind, "amount_mismatch": per_kind, "currency_mismatch": per_kind,
                      "duplicate_payment": per_kind, "status_mismatch": per_kind,
                      "refunded_at_gateway": per_kind, "missing_at_gateway": per_kind}
    assert row[4] == n - per_kind        # payments created in the window (7 is before it)
    assert row[2] == n + 4 * per_kind    # records: a charge but for 6, a duplicate, 2 refunds, ghost, fee
    assert row[3] == n + 2 * per_kind    # matched: all but the key-less fee lines and the ghosts

    # 64 kB (times hash_mem_multiplier) holds a few hundred orders: several passes
    row2, items2, passes2 = reconcile(db, "shop", "64kB")
    assert len(passes2) == 1 and passes2[0] != passes[0], passes2
    assert int(passes2[0].split()[-2]) > 1
    assert row2 == row
    assert items2 == items
    assert len(items) == 7 * per_kind


def test_passes_share_out_keys_without_losing_orders_across_accounts(db):
    """Two accounts of different sizes, both short of memory: each run sees
    its own orders only, every one of them once."""
    load(db, "a", 1200)
    load(db, "b", 2400)
    for account, n in (("a", 1200), ("b", 2400)):
        big, _, _ = reconcile(db, account, "256MB")
        small, _, passes = reconcile(db, account, "64kB")
        assert int(passes[0].split()[-2]) > 1
        assert small == big
        assert big[4] == n - n // PERIOD


if __name__ == "__main__":
    pytest.main([__file__])
