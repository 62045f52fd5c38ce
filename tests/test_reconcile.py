"""Reconciliation against the Stripe HTTPS double: a double seeded with
known discrepancies of every kind, paging at 100 per page, a gateway
failure midway, webhooks racing a heal, the step-by-step runners (CALL and
the background worker) holding no snapshot while the gateway answers, the
live progress view, per-order queries, report downloads, and pg_cron."""

import base64
import http.server
import json
import ssl
import threading
import time
import urllib.parse
import urllib.request

import psycopg
import pytest

from doubles.stripe_double import FEE_FIXED, FEE_PERCENT_TENTHS, StripeDouble
from gateways import STRIPE_KEY, STRIPE_WHSEC, add_stripe_account, deliver, payment

KINDS = ("missing_in_crm", "missing_at_gateway", "amount_mismatch", "currency_mismatch",
         "status_mismatch", "duplicate_payment", "refunded_at_gateway")


@pytest.fixture
def shop(db, stripe_double):
    stripe_double.reset()
    stripe_double.configure(latency=0)
    add_stripe_account(db, stripe_double.base_url)
    return db


def fee_of(amount):
    """The double's Stripe fee model: 1.5 % + 25 minor units."""
    return (amount * FEE_PERCENT_TENTHS + 500) // 1000 + FEE_FIXED


def create_link(conn, order_ref, amount="10.00", currency="EUR", account="shop"):
    cur = conn.execute("SELECT * FROM crmpay.create_payment_link(%s, %s, %s::numeric, %s)",
                       (account, order_ref, amount, currency))
    return dict(zip([c.name for c in cur.description], cur.fetchone()))


def deliver_all(conn, result, account="shop"):
    return [deliver(conn, account, d) for d in result["deliveries"]]


def stripe_api(double, tls, path, params):
    """A POST to the double's Stripe API, as another client of the account would."""
    ctx = ssl.create_default_context(cafile=tls["ca_cert"])
    req = urllib.request.Request(double.base_url + path, method="POST",
                                 data=urllib.parse.urlencode(params).encode(),
                                 headers={"Authorization": "Bearer " + STRIPE_KEY})
    with urllib.request.urlopen(req, context=ctx) as resp:
        return json.loads(resp.read())


def foreign_session(double, tls, order_ref, amount=1000):
    """A checkout session made outside crmpay (dashboard, another system)."""
    return stripe_api(double, tls, "/v1/checkout/sessions", {
        "mode": "payment", "success_url": "https://shop.example/paid",
        "client_reference_id": order_ref,
        "payment_intent_data[metadata][crmpay_order_ref]": order_ref,
        "line_items[0][price_data][currency]": "eur",
        "line_items[0][price_data][unit_amount]": str(amount),
        "line_items[0][price_data][product_data][name]": "Order " + order_ref,
        "line_items[0][quantity]": "1"})["id"]


def set_session(double, session_id, **fields):
    """Changes a session at the gateway (what the CRM did not ask for)."""
    with double._lock:
        double._objects["checkout.session"][session_id].update(fields)


def reconcile(conn, heal=False, since="now() - interval '1 hour'", until="now() + interval '1 minute'",
              account="shop"):
    return conn.execute(f"SELECT crmpay.reconcile(%s, {since}, {until}, %s)", (account, heal)).fetchone()[0]


def run_row(conn, run_id):
    cur = conn.execute("SELECT * FROM crmpay.reconciliation_runs WHERE id = %s", (run_id,))
    return dict(zip([c.name for c in cur.description], cur.fetchone()))


def items(conn, run_id):
    cur = conn.execute("SELECT kind, order_ref, healed, heal_action, gateway_ref, crm_amount_minor,"
                       "       gateway_amount_minor, crm_status, gateway_status, detail, changes"
                       "  FROM crmpay.reconciliation_items WHERE run_id = %s ORDER BY order_ref, kind",
                       (run_id,))
    return [dict(zip([c.name for c in cur.description], r)) for r in cur.fetchall()]


def seed_every_kind(conn, double, tls):
    """One order per discrepancy kind (and two that are fine); returns the
    gateway's expected money per currency."""
    ok = create_link(conn, "ORD-OK", "10.00")
    deliver_all(conn, double.pay(ok["gateway_ref"]))
    create_link(conn, "ORD-OPEN", "11.00")                       # not paid yet: fine
    lost = create_link(conn, "ORD-LOST", "12.00")
    double.pay(lost["gateway_ref"])                             # webhooks never arrive
    refund = create_link(conn, "ORD-REFUND", "13.00")
    paid = double.pay(refund["gateway_ref"])
    deliver_all(conn, paid)
    double.refund(paid["payment_intent"])                       # charge.refunded is lost
    amount = create_link(conn, "ORD-AMOUNT", "14.00")
    set_session(double, amount["gateway_ref"], amount_total=1450, amount_subtotal=1450)
    double.pay(amount["gateway_ref"])
    cur = create_link(conn, "ORD-CUR", "15.00")
    set_session(double, cur["gateway_ref"], currency="usd")
    double.pay(cur["gateway_ref"])
    dup = create_link(conn, "ORD-DUP", "16.00")
    deliver_all(conn, double.pay(dup["gateway_ref"]))
    double.pay(foreign_session(double, tls, "ORD-DUP", 1600))    # charged twice
    double.pay(foreign_session(double, tls, "ORD-GHOST", 1700))  # not in the CRM
    conn.execute("INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status,"
                 " idempotency_key, refunded_minor) VALUES ('shop', 'ORD-NOGW', 1800, 'EUR', 'paid', 'x', 0)")
    eur = [1000, 1200, 1300, 1450, 1600, 1600, 1700]
    return {"EUR": {"gross": sum(eur), "refunds": 1300, "fees": sum(fee_of(a) for a in eur),
                    "net": sum(a - fee_of(a) for a in eur) - 1300, "records": len(eur) + 1},
            "USD": {"gross": 1500, "fees": fee_of(1500), "net": 1500 - fee_of(1500), "records": 1}}


def test_stripe_discrepancies_of_every_kind_and_healing(shop, stripe_double, tls):
    totals = seed_every_kind(shop, stripe_double, tls)
    expected = {
        ("amount_mismatch", "ORD-AMOUNT"), ("status_mismatch", "ORD-AMOUNT"),
        ("currency_mismatch", "ORD-CUR"), ("status_mismatch", "ORD-CUR"),
        ("duplicate_payment", "ORD-DUP"), ("missing_in_crm", "ORD-GHOST"),
        ("status_mismatch", "ORD-LOST"), ("missing_at_gateway", "ORD-NOGW"),
        ("refunded_at_gateway", "ORD-REFUND"),
    }

    # report only: nothing changes
    run = reconcile(shop)
    found = items(shop, run)
    assert {(i["kind"], i["order_ref"]) for i in found} == expected
    assert not any(i["healed"] for i in found)
    assert payment(shop, "shop", "ORD-LOST")["status"] == "open"
    r = run_row(shop, run)
    assert r["status"] == "succeeded" and r["sources"] == ["list"] and r["pages_fetched"] == 3
    assert r["totals"] == totals
    assert r["payments_checked"] == 8

    # what each item says
    by = {(i["kind"], i["order_ref"]): i for i in found}
    assert by[("amount_mismatch", "ORD-AMOUNT")]["crm_amount_minor"] == 1400
    assert by[("amount_mismatch", "ORD-AMOUNT")]["gateway_amount_minor"] == 1450
    assert by[("status_mismatch", "ORD-AMOUNT")]["heal_action"] is None
    assert "Not healed automatically" in by[("status_mismatch", "ORD-AMOUNT")]["detail"]
    assert by[("duplicate_payment", "ORD-DUP")]["gateway_amount_minor"] == 3200
    assert by[("missing_in_crm", "ORD-GHOST")]["gateway_ref"].startswith("pi_")
    assert by[("refunded_at_gateway", "ORD-REFUND")]["gateway_status"] == "refunded"
    assert by[("status_mismatch", "ORD-LOST")]["gateway_status"] == "paid"
    assert by[("status_mismatch", "ORD-LOST")]["heal_action"] is None   # heal was off

    # healing fixes exactly the lost webhooks: ORD-LOST paid, ORD-REFUND refunded
    before = {o: payment(shop, "shop", o) for o in ("ORD-OK", "ORD-OPEN", "ORD-AMOUNT", "ORD-CUR",
                                                    "ORD-DUP", "ORD-NOGW")}
    run = reconcile(shop, heal=True)
    healed = {(i["kind"], i["order_ref"]) for i in items(shop, run) if i["healed"]}
    assert healed == {("status_mismatch", "ORD-LOST"), ("refunded_at_gateway", "ORD-REFUND")}
    lost = payment(shop, "shop", "ORD-LOST")
    assert lost["status"] == "paid" and lost["gateway_payment_ref"].startswith("pi_")
    assert lost["paid_at"] is not None
    refunded = payment(shop, "shop", "ORD-REFUND")
    assert refunded["status"] == "refunded" and refunded["refunded_minor"] == 1300
    for order, row in before.items():
        after = payment(shop, "shop", order)
        assert (after["status"], after["refunded_minor"]) == (row["status"], row["refunded_minor"]), order
    events = shop.execute("SELECT p.order_ref, e.old_status, e.new_status FROM crmpay.events e"
                          "  JOIN crmpay.payments p ON p.id = e.payment_id"
                          " WHERE e.event_type = 'crmpay.reconcile.heal' ORDER BY 1").fetchall()
    assert events == [("ORD-LOST", "open", "paid"), ("ORD-REFUND", "paid", "refunded")]
    assert run_row(shop, run)["healed"] == 2

    # the lost webhooks arriving late change nothing more
    for event in stripe_double.events():
        if event["data"]["object"].get("client_reference_id") == "ORD-LOST" or \
                event["type"] == "charge.refunded":
            for d in stripe_double.resend(event["id"])["deliveries"]:
                assert deliver(shop, "shop", d)[0][2] in ("ignored", "duplicate")
    # and a third run has nothing left to heal
    run = reconcile(shop, heal=True)
    assert {(i["kind"], i["order_ref"]) for i in items(shop, run)} == expected - {
        ("status_mismatch", "ORD-LOST"), ("refunded_at_gateway", "ORD-REFUND")}
    assert run_row(shop, run)["healed"] == 0


def test_paging_100_per_page(shop, stripe_double):
    n = 230
    sessions = [create_link(shop, f"ORD-P{i:03d}", "5.00")["gateway_ref"] for i in range(n)]
    for i, s in enumerate(sessions):
        result = stripe_double.pay(s)
        if i % 10:          # every tenth webhook is lost
            deliver(shop, "shop", [d for d in result["deliveries"]
                                   if d["type"] == "checkout.session.completed"][0])
    before = len(stripe_double.requests(path_prefix="/v1/"))
    run = reconcile(shop, heal=True)
    r = run_row(shop, run)
    gets = stripe_double.requests(path_prefix="/v1/")[before:]
    assert all(q["method"] == "GET" for q in gets)
    assert len(gets) == r["pages_fetched"] == 9
    for stream in ("/v1/checkout/sessions", "/v1/payment_intents", "/v1/balance_transactions"):
        pages = [q for q in gets if q["path"] == stream]
        assert len(pages) == 3
        assert all(q["params"]["limit"] == "100" for q in pages)
        assert "starting_after" not in pages[0]["params"]
        assert pages[1]["params"]["starting_after"] and pages[2]["params"]["starting_after"]
        assert set(pages[0]["params"]["created"]) == {"gte", "lte"}
    assert r["records_loaded"] == 3 * n and r["records_matched"] == 3 * n
    assert r["counts"] == {"status_mismatch": 23} and r["healed"] == 23
    assert r["totals"]["EUR"]["gross"] == 500 * n
    assert r["totals"]["EUR"]["fees"] == fee_of(500) * n
    assert shop.execute("SELECT count(*) FROM crmpay.payments WHERE status = 'paid'").fetchone()[0] == n


def test_gateway_failure_midway_leaves_a_failed_run_and_nothing_healed(shop, stripe_double):
    lost = create_link(shop, "ORD-LOST", "12.00")
    stripe_double.pay(lost["gateway_ref"])
    for i in range(4):
        deliver_all(shop, stripe_double.pay(create_link(shop, f"ORD-{i}")["gateway_ref"]))
    shop.execute("SET crmpay.reconcile_page_size = 2")      # 3 pages per list
    # the 7th gateway request (1st page of the balance transactions) fails
    stripe_double.set_faults(mode="500", count=1, path_prefix="/v1/balance_transactions")
    n_before = len(stripe_double.requests(path_prefix="/v1/"))
    with _notices(shop) as notices:
        run = reconcile(shop, heal=True)
    r = run_row(shop, run)
    assert r["status"] == "failed" and r["phase"] == "failed"
    assert r["error"].startswith("gateway is unavailable") and r["error_sqlstate"] == "08006"
    assert "HTTP 500" in r["error_detail"]
    assert "page 7 (list 2" in r["error_context"]
    assert r["pages_fetched"] == 6 and r["records_loaded"] == 10
    assert len(stripe_double.requests(path_prefix="/v1/")) - n_before == 7
    assert any("reconciliation run %d of account \"shop\" failed" % run in n for n in notices)
    # nothing half-done: no records kept, no items, nothing healed
    assert shop.execute("SELECT count(*) FROM crmpay.gateway_records WHERE run_id = %s", (run,)).fetchone()[0] == 0
    assert shop.execute("SELECT count(*) FROM crmpay.reconciliation_items WHERE run_id = %s", (run,)).fetchone()[0] == 0
    assert payment(shop, "shop", "ORD-LOST")["status"] == "open"
    assert shop.execute("SELECT count(*) FROM crmpay.events WHERE event_type = 'crmpay.reconcile.heal'").fetchone()[0] == 0
    # once the gateway is back, the next run heals
    run = reconcile(shop, heal=True)
    assert run_row(shop, run)["status"] == "succeeded"
    assert payment(shop, "shop", "ORD-LOST")["status"] == "paid"


class _notices:
    """Collects the server's NOTICE/WARNING messages on a connection."""

    def __init__(self, conn):
        self.conn = conn
        self.messages = []

    def __enter__(self):
        self._handler = lambda d: self.messages.append(d.message_primary)
        self.conn.add_notice_handler(self._handler)
        return self.messages

    def __exit__(self, *exc):
        self.conn.remove_notice_handler(self._handler)


def _watch(pg, db_name, pid_query, stop, samples, interval=0.02):
    """Samples pg_stat_activity of the backend running the reconciliation."""
    conn = pg.connect(db_name)
    try:
        while not stop.is_set():
            row = conn.execute("SELECT a.pid, a.wait_event_type, a.wait_event, a.xact_start IS NOT NULL,"
                               "       a.backend_xmin IS NOT NULL, p.phase, p.pages_fetched, p.records_loaded"
                               "  FROM pg_stat_activity a"
                               "  JOIN crmpay.reconciliation_progress p ON p.pid = a.pid"
                               f" WHERE {pid_query}").fetchall()
            samples.extend(row)
            time.sleep(interval)
    finally:
        conn.close()


def test_step_by_step_run_commits_per_page_and_holds_no_snapshot_during_http(shop, stripe_double, pg, db_name):
    lost = create_link(shop, "ORD-LOST", "12.00")
    stripe_double.pay(lost["gateway_ref"])
    for i in range(3):
        deliver_all(shop, stripe_double.pay(create_link(shop, f"ORD-{i}")["gateway_ref"]))
    stripe_double.configure(latency=0.15)
    shop.execute("SET crmpay.reconcile_page_size = 1")
    samples, stop = [], threading.Event()
    watcher = threading.Thread(target=_watch, args=(pg, db_name, "a.pid <> pg_backend_pid()", stop, samples))
    watcher.start()
    try:
        run = shop.execute("CALL crmpay.reconcile_in_steps('shop', now() - interval '1 hour',"
                           " now() + interval '1 minute', true, NULL)").fetchone()[0]
    finally:
        stop.set()
        watcher.join()
    r = run_row(shop, run)
    assert r["mode"] == "stepwise" and r["status"] == "succeeded" and r["healed"] == 1
    assert r["pages_fetched"] == 3 * 4      # one record per page, three lists
    assert payment(shop, "shop", "ORD-LOST")["status"] == "paid"
    http = [s for s in samples if s[2] == "Extension"]
    assert http, "never saw the backend waiting for the gateway"
    assert not any(s[4] for s in http), "a snapshot was held during a gateway call"
    pages = [s[6] for s in samples if s[5] == "fetching"]
    assert pages and max(pages) > min(pages)    # progress visible while it ran
    assert not shop.execute("SELECT * FROM crmpay.reconciliation_progress").fetchall()


def test_failure_midway_in_steps(shop, stripe_double):
    lost = create_link(shop, "ORD-LOST", "12.00")
    stripe_double.pay(lost["gateway_ref"])
    shop.execute("SET crmpay.reconcile_page_size = 1")
    stripe_double.set_faults(mode="503", count=1, path_prefix="/v1/payment_intents")
    with _notices(shop) as notices:
        run = shop.execute("CALL crmpay.reconcile_in_steps('shop', now() - interval '1 hour',"
                           " now() + interval '1 minute', true, NULL)").fetchone()[0]
    r = run_row(shop, run)
    assert r["status"] == "failed" and r["mode"] == "stepwise"
    assert r["error"].startswith("gateway is unavailable") and "page 2 (list 1" in r["error_context"]
    assert r["pages_fetched"] == 1
    assert any("failed" in n for n in notices)
    # pages committed before the failure are gone too, nothing was healed
    assert shop.execute("SELECT count(*) FROM crmpay.gateway_records WHERE run_id = %s", (run,)).fetchone()[0] == 0
    assert payment(shop, "shop", "ORD-LOST")["status"] == "open"


def test_progress_view_while_a_run_is_going(shop, stripe_double, pg, db_name):
    for i in range(5):
        stripe_double.pay(create_link(shop, f"ORD-{i}")["gateway_ref"])
    stripe_double.configure(latency=0.1)
    shop.execute("SET crmpay.reconcile_page_size = 1")
    samples, stop = [], threading.Event()
    watcher = threading.Thread(target=_watch, args=(pg, db_name, "a.pid <> pg_backend_pid()", stop, samples))
    watcher.start()
    try:
        run = reconcile(shop, heal=True)
    finally:
        stop.set()
        watcher.join()
    fetching = [s for s in samples if s[5] == "fetching"]
    assert len({s[6] for s in fetching}) >= 3           # pages fetched counted up live
    assert max(s[7] for s in fetching) >= 5              # records loaded too
    # the synchronous run holds its transaction (and snapshot) while fetching: documented
    assert any(s[4] for s in fetching if s[2] == "Extension")
    assert run_row(shop, run)["healed"] == 5
    summary = shop.execute("SELECT status, pages_fetched, records_loaded, records_matched, status_mismatch, healed"
                           "  FROM crmpay.reconciliation_summary WHERE run_id = %s", (run,)).fetchone()
    assert summary == ("succeeded", 15, 15, 15, 5, 5)
    assert not shop.execute("SELECT * FROM crmpay.reconciliation_progress").fetchall()


def wait_for_lock_wait(pg, db_name, timeout=20):
    """Waits until some backend of the database waits for a lock."""
    conn = pg.connect(db_name)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                            "   AND wait_event_type = 'Lock'").fetchone()[0]:
                return
            time.sleep(0.02)
        pytest.fail("no backend ever waited for the row lock")
    finally:
        conn.close()


@pytest.mark.parametrize("heal_first", [True, False], ids=["heal_then_webhook", "webhook_then_heal"])
def test_webhook_racing_a_heal_is_applied_once(shop, stripe_double, pg, db_name, heal_first):
    lost = create_link(shop, "ORD-RACE", "12.00")
    paid = stripe_double.pay(lost["gateway_ref"])
    completed = [d for d in paid["deliveries"] if d["type"] == "checkout.session.completed"]
    other = pg.connect(db_name, autocommit=False)
    try:
        if heal_first:
            # the heal holds the payment row until its transaction commits
            other.execute("SELECT crmpay.reconcile('shop', now() - interval '1 hour', now() + interval '1 minute', true)")
            result = {}
            t = threading.Thread(target=lambda: result.update(r=deliver(shop, "shop", completed[0])))
            t.start()
            wait_for_lock_wait(pg, db_name)     # the webhook waits for the heal's row lock
            other.commit()
            t.join(10)
            assert result["r"][0][2] == "ignored"
        else:
            # the webhook is being applied when the heal comes to the payment
            assert deliver(other, "shop", completed[0])[0][2] == "applied"
            result = {}
            t = threading.Thread(target=lambda: result.update(run=reconcile(shop, heal=True)))
            t.start()
            wait_for_lock_wait(pg, db_name)     # the heal waits for the webhook's row lock
            other.commit()
            t.join(10)
            it = [i for i in items(shop, result["run"]) if i["order_ref"] == "ORD-RACE"]
            assert len(it) == 1 and not it[0]["healed"]
            assert "Not healed: the payment was already paid" in it[0]["detail"]
    finally:
        other.close()
    p = payment(shop, "shop", "ORD-RACE")
    assert p["status"] == "paid"
    moves = shop.execute("SELECT event_type FROM crmpay.events WHERE payment_id = %s AND outcome = 'applied'"
                         "   AND new_status = 'paid'", (p["id"],)).fetchall()
    assert len(moves) == 1
    assert moves[0][0] == ("crmpay.reconcile.heal" if heal_first else "checkout.session.completed")


def test_per_order_queries(db, stripe_double):
    stripe_double.reset()
    stripe_double.configure(latency=0)
    add_stripe_account(db, stripe_double.base_url, reconcile_sources=["orders"])
    lost = create_link(db, "ORD-LOST", "12.00")
    stripe_double.pay(lost["gateway_ref"])
    deliver_all(db, stripe_double.pay(create_link(db, "ORD-OK")["gateway_ref"]))
    create_link(db, "ORD-OPEN")
    db.execute("INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status,"
               " idempotency_key, refunded_minor) VALUES ('shop', 'ORD-PENDING', 500, 'EUR', 'link_pending', 'y', 0)")
    n_before = len(stripe_double.requests(path_prefix="/v1/"))
    run = reconcile(db, heal=True)
    r = run_row(db, run)
    asked = [q["path"] for q in stripe_double.requests(path_prefix="/v1/")[n_before:]]
    # pending orders only (ORD-OK is paid and listed by nothing else, so it is asked too)
    assert sorted(asked) == sorted("/v1/checkout/sessions/" + payment(db, "shop", o)["gateway_ref"]
                                   for o in ("ORD-LOST", "ORD-OK", "ORD-OPEN"))
    assert r["sources"] == ["orders"] and r["pages_fetched"] == 3
    assert [(i["kind"], i["order_ref"], i["healed"]) for i in items(db, run)] == [
        ("status_mismatch", "ORD-LOST", True)]
    assert payment(db, "shop", "ORD-LOST")["status"] == "paid"


def test_settings_reconcile_sources_is_checked(db, stripe_double):
    add_stripe_account(db, stripe_double.base_url, reconcile_sources=["reports"])
    with pytest.raises(psycopg.errors.InvalidParameterValue, match='cannot reconcile from source reports'):
        reconcile(db)


class _ReportHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        want = "Basic " + base64.b64encode(b"ws_report@Company.Shop:report-secret").decode()
        if self.headers.get("Authorization") != want:
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"status":401,"errorCode":"000","message":"HTTP Status Response - Unauthorized"}')
            return
        body = self.server.reports.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "text/csv")
        self.end_headers()
        self.wfile.write((body or "").encode())

    def log_message(self, *args):
        pass


def test_fetch_report_with_report_credentials(db, tls):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ReportHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls["server_cert"], tls["server_key"])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    base = "https://127.0.0.1:%d/reports/download/MerchantAccount/ShopECOM/" % server.server_address[1]
    header = ("Company Account,Merchant Account,Psp Reference,Merchant Reference,Payment Method,Creation Date,"
              "TimeZone,Type,Modification Reference,Gross Currency,Gross Debit (GC),Gross Credit (GC),"
              "Exchange Rate,Net Currency,Net Debit (NC),Net Credit (NC),Commission (NC),Markup (NC),"
              "Scheme Fees (NC),Interchange (NC),Payment Method Variant,Modification Merchant Reference,"
              "Batch Number")
    server.reports = {"/reports/download/MerchantAccount/ShopECOM/settlement_detail_report_batch_7.csv":
                      header + "\nCo,ShopECOM,8815000000000001,A-1,visa,2024-03-01 11:00:00,CET,Settled,"
                      "8825000000000001,EUR,,10.00,1,EUR,,9.75,,0.10,0.05,0.10,visa,,7\n"}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        db.execute("SELECT crmpay.add_account('ady', 'adyen', %s::jsonb, NULL, %s::jsonb)",
                   (json.dumps({"api_key": "AQE_test", "report_username": "ws_report@Company.Shop",
                                "report_password": "report-secret"}),
                    json.dumps({"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid",
                                "report_base_url": base})))
        imp = db.execute("SELECT crmpay.fetch_report('ady', %s)",
                         (base + "settlement_detail_report_batch_7.csv",)).fetchone()[0]
        row = db.execute("SELECT format, source, records FROM crmpay.report_imports WHERE id = %s", (imp,)).fetchone()
        assert row == ("adyen_settlement_details", base + "settlement_detail_report_batch_7.csv", 1)
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="not under the account's settings.report_base_url"):
            db.execute("SELECT crmpay.fetch_report('ady', 'https://evil.example/reports/x.csv')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="not under"):
            db.execute("SELECT crmpay.fetch_report('ady', %s)", (base + "../../other.csv",))
        # a base without its trailing slash still ends at a path boundary
        db.execute("SELECT crmpay.update_account('ady', NULL, NULL, %s::jsonb)",
                   (json.dumps({"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid",
                                "report_base_url": base.rstrip("/")}),))
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="not under"):
            db.execute("SELECT crmpay.fetch_report('ady', %s)", (base.rstrip("/") + "evil/x.csv",))
        assert db.execute("SELECT crmpay.fetch_report('ady', %s)",
                          (base + "settlement_detail_report_batch_7.csv",)).fetchone()[0] > imp
        db.execute("SELECT crmpay.update_account('ady', %s::jsonb)",
                   (json.dumps({"api_key": "AQE_test", "report_username": "ws_report@Company.Shop",
                                "report_password": "wrong"}),))
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification) as e:
            db.execute("SELECT crmpay.fetch_report('ady', %s)", (base + "settlement_detail_report_batch_7.csv",))
        assert "wrong" not in str(e.value) + (e.value.diag.message_detail or "")
    finally:
        server.shutdown()
        server.server_close()


def test_worker_runner_commits_between_gateway_calls(shop, stripe_double, pg, db_name):
    lost = create_link(shop, "ORD-LOST", "12.00")
    stripe_double.pay(lost["gateway_ref"])
    shop.execute("SELECT crmpay.schedule_reconciliation('shop', '1 hour', '2 hours')")
    shop.execute("ALTER DATABASE %s SET crmpay.reconcile_page_size = 1" % db_name)
    stripe_double.configure(latency=0.15)
    samples, stop = [], threading.Event()
    watcher = threading.Thread(target=_watch, args=(pg, db_name, "a.backend_type = 'crmpay reconciliation'",
                                                    stop, samples))
    watcher.start()
    try:
        shop.execute("SELECT crmpay._run_due_reconciliations_in_background(true)")
    finally:
        stop.set()
        watcher.join()
    run = shop.execute("SELECT last_run_id FROM crmpay.reconciliation_schedules").fetchone()[0]
    r = run_row(shop, run)
    assert r["mode"] == "stepwise" and r["status"] == "succeeded" and r["healed"] == 1
    assert payment(shop, "shop", "ORD-LOST")["status"] == "paid"
    http = [s for s in samples if s[2] == "Extension"]
    assert http, "never saw the worker waiting for the gateway"
    assert not any(s[3] or s[4] for s in http), "the worker held a transaction during a gateway call"


@pytest.fixture(scope="module", autouse=True)
def cron_setup(pg_bindir, tls):
    """A private cluster with pg_cron, set up when this module starts (pg_cron
    1.4 runs jobs at minute boundaries: the wait overlaps the other tests).
    It has its own Stripe double: the other tests reset theirs."""
    from lib.cluster import PgCluster

    double = StripeDouble(api_keys={STRIPE_KEY}, webhook_secret=STRIPE_WHSEC,
                          certfile=tls["server_cert"], keyfile=tls["server_key"])
    double.start()
    cluster = PgCluster(pg_bindir, settings={"crmpay.ca_file": tls["ca_cert"],
                                             "shared_preload_libraries": "crmpay,pg_cron",
                                             "cron.database_name": "postgres",
                                             "cron.use_background_workers": True,
                                             "max_worker_processes": 16})
    try:
        cluster.start()
        conn = cluster.connect("postgres")
        conn.execute("CREATE EXTENSION crmpay")
        conn.execute("CREATE EXTENSION pg_cron")
        add_stripe_account(conn, double.base_url)
        lost = create_link(conn, "ORD-CRON", "12.00")
        double.pay(lost["gateway_ref"])             # its webhooks are lost
        # the README's call, every minute instead of nightly
        conn.execute("SELECT cron.schedule('nightly-reconcile', '* * * * *', $$SELECT crmpay.reconcile("
                     "'shop', now() - interval '2 days', now(), heal => true)$$)")
        yield conn
        conn.close()
    finally:
        cluster.cleanup()
        double.stop()


def test_pg_cron_runs_the_nightly_reconciliation(cron_setup):
    conn = cron_setup
    deadline = time.time() + 75
    runs = []
    while time.time() < deadline:
        runs = conn.execute("SELECT status, healed FROM crmpay.reconciliation_runs").fetchall()
        if runs:
            break
        time.sleep(0.5)
    assert runs and runs[0] == ("succeeded", 1)
    assert payment(conn, "shop", "ORD-CRON")["status"] == "paid"
    details = []
    for _ in range(40):
        details = conn.execute("SELECT status, return_message FROM cron.job_run_details").fetchall()
        if details and details[0][0] != "running":
            break
        time.sleep(0.25)
    assert details[0] == ("succeeded", "SELECT 1")


# ---------------------------------------------------------------------
# PayPal: the Transaction Search API, in 31-day pieces, page by page
# ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def paypal_double(tls):
    import os
    from doubles.paypal_double import PayPalDouble
    from test_paypal import CLIENT_ID, CLIENT_SECRET, WEBHOOK_ID

    double = PayPalDouble({CLIENT_ID: CLIENT_SECRET}, WEBHOOK_ID, tls["ca_cert"],
                          os.path.join(os.path.dirname(tls["ca_cert"]), "ca.key"),
                          tls["server_cert"], tls["server_key"])
    double.start()
    yield double
    double.stop()


def test_paypal_transaction_search(db, paypal_double, db_name):
    from test_paypal import add_paypal_account, capture

    paypal_double.reset()
    db.execute(f"ALTER DATABASE {db_name} SET crmpay.paypal_cert_hosts = '127.0.0.1'")
    db.execute("SET crmpay.paypal_cert_hosts = '127.0.0.1'")
    add_paypal_account(db, paypal_double.base_url)

    def link(order, amount):
        return create_link(db, order, amount, account="pp")

    ok = link("PP-OK", "20.00")
    deliver(db, "pp", paypal_double.approve(ok["gateway_ref"]))
    assert capture(db, ok["id"])["status"] == "paid"
    lost = link("PP-LOST", "30.00")
    paypal_double.approve(lost["gateway_ref"])          # the approval webhook is lost,
    paypal_double.capture_now(lost["gateway_ref"])      # the capture made elsewhere
    refund = link("PP-REFUND", "40.00")
    deliver(db, "pp", paypal_double.approve(refund["gateway_ref"]))
    assert capture(db, refund["id"])["status"] == "paid"
    paypal_double.refund(refund["gateway_ref"], "15.00")
    db.execute("INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status,"
               " idempotency_key, refunded_minor) VALUES ('pp', 'PP-NOGW', 5000, 'EUR', 'paid', 'z', 0)")
    for order, change in (("PP-AMOUNT", {"value": "26.00"}), ("PP-CUR", {"currency_code": "USD"}),
                          ("PP-DUP", None)):
        row = link(order, "25.00")
        deliver(db, "pp", paypal_double.approve(row["gateway_ref"]))
        assert capture(db, row["id"])["status"] == "paid"
        if change:
            paypal_double.set_capture(row["gateway_ref"], **change)
    paypal_double.foreign_order("PP-DUP", "25.00")      # charged twice
    paypal_double.foreign_order("PP-GHOST", "12.00")    # not in the CRM

    db.execute("SET crmpay.reconcile_page_size = 2")
    before = len(paypal_double.requests())
    # 40 days: two pieces of at most 31 days
    run = reconcile(db, heal=True, since="now() - interval '40 days'", account="pp")
    r = run_row(db, run)
    assert r["status"] == "succeeded", r
    searches = [q for q in paypal_double.requests()[before:] if q["path"] == "/v1/reporting/transactions"]
    assert len(searches) == r["pages_fetched"] == 6     # an empty piece, then 9 transactions on 5 pages
    assert all(q["headers"]["Authorization"] == "Bearer ****" for q in searches)
    assert r["records_loaded"] == 9 and r["records_matched"] == 8
    found = {(i["kind"], i["order_ref"], i["healed"]) for i in items(db, run)}
    assert found == {("status_mismatch", "PP-LOST", True), ("refunded_at_gateway", "PP-REFUND", True),
                     ("missing_at_gateway", "PP-NOGW", False), ("amount_mismatch", "PP-AMOUNT", False),
                     ("currency_mismatch", "PP-CUR", False), ("duplicate_payment", "PP-DUP", False),
                     ("missing_in_crm", "PP-GHOST", False)}
    assert payment(db, "pp", "PP-LOST")["status"] == "paid"
    p = payment(db, "pp", "PP-REFUND")
    assert (p["status"], p["refunded_minor"]) == ("partially_refunded", 1500)
    eur = (2000, 3000, 4000, 2600, 2500, 2500, 1200)
    fees = sum((a * 349 + 5000) // 10000 + 49 for a in eur)
    usd_fee = (2500 * 349 + 5000) // 10000 + 49
    assert r["totals"] == {"EUR": {"gross": sum(eur), "refunds": 1500, "fees": fees,
                                   "net": sum(eur) - fees - 1500, "records": 8},
                           "USD": {"gross": 2500, "fees": usd_fee, "net": 2500 - usd_fee, "records": 1}}
    # the pieces are contiguous and none is longer than 31 days
    import datetime
    ranges = sorted({(q["query"]["start_date"], q["query"]["end_date"]) for q in searches})
    parsed = [tuple(datetime.datetime.strptime(x, "%Y-%m-%dT%H:%M:%S%z") for x in rg) for rg in ranges]
    assert len(parsed) == 2 and parsed[0][1] == parsed[1][0]
    assert all(b - a <= datetime.timedelta(days=31) for a, b in parsed)
