"""The one-time payment flow on Stripe, end to end, through the HTTPS
Stripe double: account -> link -> customer pays -> webhook -> order paid,
and every way the gateway call can fail."""

import json
import threading
import time

import psycopg
import pytest
from psycopg import errors

from gateways import STRIPE_KEY, STRIPE_WHSEC, add_stripe_account, deliver, payment


@pytest.fixture
def shop(db, stripe_double):
    """A database with a Stripe account 'shop' on a freshly reset double."""
    stripe_double.reset()
    add_stripe_account(db, stripe_double.base_url)
    return db


def create_link(conn, order_ref, amount="19.99", currency="EUR", **kw):
    cur = conn.execute(
        "SELECT * FROM crmpay.create_payment_link('shop', %s, %s::numeric, %s, %s, %s, %s::jsonb)",
        (order_ref, amount, currency, kw.get("email"), kw.get("description"),
         json.dumps(kw.get("metadata", {}))))
    return dict(zip([c.name for c in cur.description], cur.fetchone()))


def api_requests(double):
    return [r for r in double.requests() if r["path"].startswith("/v1/")]


def test_order_goes_from_link_to_paid(shop, stripe_double, pg, db_name):
    listener = pg.connect(db_name)
    notifications = []
    listener.add_notify_handler(lambda n: notifications.append(n))
    listener.execute("LISTEN crmpay_payments")
    shop.execute("CREATE TABLE public.invoices (payment_id bigint PRIMARY KEY, amount_minor bigint)")
    shop.execute("""CREATE FUNCTION public.issue_invoice() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN INSERT INTO public.invoices VALUES (NEW.id, NEW.amount_minor); RETURN NULL; END $$""")
    shop.execute("""CREATE TRIGGER issue_invoice AFTER UPDATE OF status ON crmpay.payments FOR EACH ROW
                    WHEN (NEW.status = 'paid' AND OLD.status <> 'paid') EXECUTE FUNCTION public.issue_invoice()""")

    row = create_link(shop, "ORD-1001", "19.99", "eur", email="ana@example.com",
                      description="Two hats", metadata={"crm_id": 42})
    assert row["status"] == "open"
    assert row["amount_minor"] == 1999 and row["currency"] == "EUR"
    assert row["gateway_ref"].startswith("cs_test_")
    assert row["url"].startswith(stripe_double.base_url + "/c/pay/")
    assert row["expires_at"] is not None

    # what crmpay sent is what Stripe expects
    sent = api_requests(stripe_double)
    assert len(sent) == 1
    req = sent[0]
    assert req["method"] == "POST" and req["path"] == "/v1/checkout/sessions"
    assert req["headers"]["Authorization"].startswith("Bearer sk_test_")
    assert req["headers"]["Idempotency-Key"] == row["idempotency_key"]
    assert req["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    p = req["params"]
    assert p["mode"] == "payment"
    assert p["line_items"]["0"]["price_data"] == {"currency": "eur", "unit_amount": "1999",
                                                  "product_data": {"name": "Two hats"}}
    assert p["line_items"]["0"]["quantity"] == "1"
    assert p["client_reference_id"] == "ORD-1001"
    assert p["customer_email"] == "ana@example.com"
    assert p["success_url"] == "https://shop.example/paid"
    assert p["cancel_url"] == "https://shop.example/cart"
    assert p["metadata"] == {"crmpay_order_ref": "ORD-1001", "crm_id": "42"}
    assert p["payment_intent_data"]["metadata"]["crmpay_order_ref"] == "ORD-1001"

    # the customer pays on the hosted page; Stripe sends its events
    paid = stripe_double.pay(row["gateway_ref"], "paid")
    outcomes = [deliver(shop, "shop", d)[0] for d in paid["deliveries"]]
    assert all(o[0] == 200 for o in outcomes)
    assert sorted(o[2] for o in outcomes).count("applied") == 1
    after = payment(shop, "shop", "ORD-1001")
    assert after["status"] == "paid"
    assert after["paid_at"] is not None
    assert after["gateway_payment_ref"] == paid["payment_intent"]

    # the same deliveries again change nothing
    again = [deliver(shop, "shop", d)[0][2] for d in paid["deliveries"]]
    assert "applied" not in again and "duplicate" in again
    assert shop.execute("SELECT count(*) FROM public.invoices").fetchone()[0] == 1

    # follow-up actions: NOTIFY for link creation and for paid, in order
    listener.execute("SELECT 1")  # psycopg delivers pending notifications on the next query
    payloads = [json.loads(n.payload) for n in notifications]
    assert [(n["old_status"], n["new_status"]) for n in payloads] == [(None, "open"), ("open", "paid")]
    assert all(n["order_ref"] == "ORD-1001" and n["payment_id"] == row["id"] for n in payloads)
    listener.close()

    # a refund arrives later
    refund = stripe_double.refund(paid["payment_intent"], 500)
    for d in refund["deliveries"]:
        deliver(shop, "shop", d)
    after = payment(shop, "shop", "ORD-1001")
    assert after["status"] == "partially_refunded" and after["refunded_minor"] == 500


def test_same_order_again_returns_the_row_without_a_second_call(shop, stripe_double):
    first = create_link(shop, "ORD-2")
    second = create_link(shop, "ORD-2")
    assert second["id"] == first["id"] and second["url"] == first["url"]
    assert len(api_requests(stripe_double)) == 1

    with pytest.raises(errors.InvalidParameterValue) as exc:
        create_link(shop, "ORD-2", "20.00")
    assert "different amount" in str(exc.value)
    assert "1999" in exc.value.diag.message_detail
    with pytest.raises(errors.InvalidParameterValue):
        create_link(shop, "ORD-2", "19.99", "USD")
    assert len(api_requests(stripe_double)) == 1


@pytest.mark.parametrize("amount,currency,unit_amount", [
    ("500", "JPY", "500"), ("1.230", "KWD", "1230"), ("0.5", "USD", "50"), ("1234.56", "EUR", "123456")])
def test_amounts_are_sent_in_exact_minor_units(shop, stripe_double, amount, currency, unit_amount):
    row = create_link(shop, f"AMT-{currency}", amount, currency)
    params = api_requests(stripe_double)[-1]["params"]
    assert params["line_items"]["0"]["price_data"]["unit_amount"] == unit_amount
    assert params["line_items"]["0"]["price_data"]["currency"] == currency.lower()
    assert str(row["amount_minor"]) == unit_amount


@pytest.mark.parametrize("mode,error,message", [
    ("500", errors.ConnectionFailure, "gateway is unavailable"),
    ("503", errors.ConnectionFailure, "gateway is unavailable"),
    ("429", errors.ConfigurationLimitExceeded, "rate limiting"),
    ("drop", errors.ConnectionFailure, "gateway connection failed"),
    ("bad_json", errors.ProtocolViolation, "cannot read"),
])
def test_gateway_faults_raise_a_fitting_error_and_write_nothing(shop, stripe_double, mode, error, message):
    stripe_double.set_faults(mode=mode, count=1, retry_after=7)
    with pytest.raises(error) as exc:
        create_link(shop, "ORD-F")
    assert message in exc.value.diag.message_primary
    assert exc.value.diag.message_hint
    if mode in ("500", "503", "429"):
        assert "HTTP " + mode in exc.value.diag.message_detail
    assert payment(shop, "shop", "ORD-F") is None
    # the fault is over: the same call now works
    assert create_link(shop, "ORD-F")["status"] == "open"


def test_bad_api_key_is_an_authorization_error_without_the_key(shop, stripe_double):
    shop.execute("""SELECT crmpay.update_account('shop', '{"secret_key": "sk_test_wrong_0000000000000000abcd"}')""")
    with pytest.raises(errors.InvalidAuthorizationSpecification) as exc:
        create_link(shop, "ORD-K")
    detail = exc.value.diag.message_detail
    assert "HTTP 401" in detail and "Invalid API Key" in detail
    assert "sk_test_wrong_0000000000000000abcd" not in str(exc.value) + detail
    assert payment(shop, "shop", "ORD-K") is None


def test_stripe_validation_error_is_shown_in_detail(shop, stripe_double):
    # BOV is an ISO 4217 code (so crmpay's own checks pass) that Stripe does
    # not support: Stripe's 400 and its message come back to the caller.
    with pytest.raises(errors.InvalidParameterValue) as exc:
        create_link(shop, "ORD-V", "10.00", "BOV")
    assert "gateway rejected the request" in exc.value.diag.message_primary
    assert "HTTP 400" in exc.value.diag.message_detail
    assert "Invalid currency: bov" in exc.value.diag.message_detail
    assert payment(shop, "shop", "ORD-V") is None


def test_timeout_then_retry_reuses_the_idempotency_key(shop, stripe_double):
    # "slow" creates the session but answers after the client gave up:
    # the crash window the idempotency key exists for.
    shop.execute("SET crmpay.request_timeout = '400ms'")
    stripe_double.set_faults(mode="slow", delay=2, count=1)
    t0 = time.monotonic()
    with pytest.raises(errors.ConnectionFailure) as exc:
        create_link(shop, "ORD-T")
    assert time.monotonic() - t0 < 1.8
    assert "timed out" in exc.value.diag.message_primary
    assert payment(shop, "shop", "ORD-T") is None
    shop.execute("RESET crmpay.request_timeout")
    time.sleep(2)
    row = create_link(shop, "ORD-T")
    stats = stripe_double.stats()
    assert stats["objects_created_per_idempotency_key"][row["idempotency_key"]] == 1
    assert stats["sessions_created"] == 1


def test_dropped_after_create_then_retry_gets_the_same_session(shop, stripe_double):
    stripe_double.set_faults(mode="drop_after_create", count=1)
    with pytest.raises(errors.ConnectionFailure):
        create_link(shop, "ORD-D")
    row = create_link(shop, "ORD-D")
    stats = stripe_double.stats()
    assert stats["sessions_created"] == 1
    assert stats["objects_created_per_idempotency_key"][row["idempotency_key"]] == 1
    assert stats["idempotent_replays"] >= 1


def test_wrong_ca_is_refused(shop, stripe_double, tls):
    shop.execute("SET crmpay.ca_file = %s" % psycopg.sql.quote(tls["wrong_ca_cert"]))
    with pytest.raises(errors.SqlclientUnableToEstablishSqlconnection) as exc:
        create_link(shop, "ORD-CA")
    assert "TLS" in exc.value.diag.message_primary
    assert payment(shop, "shop", "ORD-CA") is None
    # the system CAs do not trust the test CA either
    shop.execute("SET crmpay.ca_file = ''")
    with pytest.raises(errors.SqlclientUnableToEstablishSqlconnection):
        create_link(shop, "ORD-CA")


def test_refused_connection(shop):
    from lib.cluster import free_port
    shop.execute("SELECT crmpay.update_account('shop', settings => %s::jsonb)",
                 (json.dumps({"api_base": f"https://127.0.0.1:{free_port()}",
                              "success_url": "https://shop.example/paid"}),))
    with pytest.raises(errors.SqlclientUnableToEstablishSqlconnection) as exc:
        create_link(shop, "ORD-R")
    assert "could not connect" in exc.value.diag.message_primary


def test_plain_http_refused_unless_allowed(shop, stripe_double):
    http_base = stripe_double.base_url.replace("https://", "http://")
    with pytest.raises(errors.InvalidParameterValue) as exc:
        shop.execute("SELECT crmpay.update_account('shop', settings => %s::jsonb)",
                     (json.dumps({"api_base": http_base, "success_url": "https://shop.example/paid"}),))
    assert "plain http" in exc.value.diag.message_primary
    shop.execute("SET crmpay.allow_insecure_http = on")
    shop.execute("SELECT crmpay.update_account('shop', settings => %s::jsonb)",
                 (json.dumps({"api_base": http_base, "success_url": "https://shop.example/paid"}),))
    shop.execute("RESET crmpay.allow_insecure_http")
    # stored earlier, refused at call time once the switch is off again
    with pytest.raises(errors.InvalidParameterValue):
        create_link(shop, "ORD-H")


def test_transfer_is_interruptible(shop, stripe_double, pg, db_name):
    stripe_double.set_faults(mode="slow", delay=20)
    pid = shop.execute("SELECT pg_backend_pid()").fetchone()[0]
    admin = pg.connect(db_name)

    def cancel_soon():
        time.sleep(0.5)
        admin.execute("SELECT pg_cancel_backend(%s)", (pid,))

    threading.Thread(target=cancel_soon).start()
    t0 = time.monotonic()
    with pytest.raises(errors.QueryCanceled):
        create_link(shop, "ORD-C1")
    assert time.monotonic() - t0 < 5

    shop.execute("SET statement_timeout = '500ms'")
    t0 = time.monotonic()
    with pytest.raises(errors.QueryCanceled) as exc:
        create_link(shop, "ORD-C2")
    assert "statement timeout" in str(exc.value)
    assert time.monotonic() - t0 < 5
    shop.execute("RESET statement_timeout")
    stripe_double.set_faults(mode="none")
    assert payment(shop, "shop", "ORD-C1") is None and payment(shop, "shop", "ORD-C2") is None
    admin.close()


def test_concurrent_calls_for_one_order_make_one_link(shop, stripe_double, pg, db_name):
    stripe_double.configure(latency=0.3)
    results, failures = [], []

    def worker():
        try:
            conn = pg.connect(db_name)
            results.append(create_link(conn, "ORD-CC")["id"])
            conn.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stripe_double.configure(latency=0)
    assert not failures
    assert len(set(results)) == 1
    assert stripe_double.stats()["sessions_created"] == 1
    assert len(api_requests(stripe_double)) == 1


def test_secrets_never_reach_the_server_log(pg, db, stripe_double, db_name):
    stripe_double.reset()
    log_before = len(pg.server_log())
    # failures of every kind, several with the secrets in the statement text
    for bad in ({"api_base": "http://127.0.0.1:1"}, {"success_url": "nope"}):
        with pytest.raises(psycopg.Error):
            add_stripe_account(db, stripe_double.base_url, name="leaky", **bad)
    add_stripe_account(db, stripe_double.base_url)
    with pytest.raises(psycopg.Error):
        add_stripe_account(db, stripe_double.base_url)  # already exists
    db.execute(f"""SELECT crmpay.update_account('shop', '{{"secret_key": "{STRIPE_KEY}x"}}')""")
    with pytest.raises(errors.InvalidAuthorizationSpecification):
        create_link(db, "ORD-S")
    db.execute(f"""SELECT crmpay.update_account('shop', '{{"secret_key": "{STRIPE_KEY}"}}')""")
    stripe_double.set_faults(mode="500", count=1)
    with pytest.raises(errors.ConnectionFailure):
        create_link(db, "ORD-S")
    with pytest.raises(psycopg.Error):
        db.execute("SELECT * FROM crmpay.receive_webhook('shop', '{\"Stripe-Signature\": \"t=1,v1=00\"}', '{}')"
                   "  WHERE 1/0 = 1")
    time.sleep(0.3)
    log = pg.server_log()[log_before:]
    assert "ERROR" in log  # the failures above were logged ...
    for secret in (STRIPE_KEY, STRIPE_WHSEC, STRIPE_KEY[8:24], STRIPE_WHSEC[6:22]):
        assert secret not in log  # ... without any secret
    rows = db.execute("SELECT coalesce(string_agg(e::text, ''), '') FROM crmpay.events e").fetchone()[0]
    assert STRIPE_WHSEC not in rows


def test_signatures_made_by_the_official_stripe_sdk_verify(db):
    """stripe-node's own test-header generator is an independent oracle:
    every signature it makes must verify in crmpay, and fail once tampered."""
    import os
    import shutil
    import subprocess
    pkg = os.path.join(os.path.dirname(__file__), "node", "node_modules", "stripe")
    node = shutil.which("node")
    if not node or not os.path.isdir(pkg):
        pytest.skip("node or the stripe npm package missing (bash tests/node/install.sh)")
    script = """
      const stripe = require(process.argv[1])('sk_test_x');
      const out = [];
      for (let i = 0; i < 50; i++) {
        const payload = JSON.stringify({id: 'evt_' + i, object: 'event', data: {object: {n: i, s: '\\u00e9\\n' + 'x'.repeat(i * 37)}}}, null, i % 3);
        const secret = 'whsec_' + 'k'.repeat(i % 7) + i;
        const timestamp = 1700000000 + i;
        out.push({payload, secret, timestamp,
                  header: stripe.webhooks.generateTestHeaderString({payload, secret, timestamp})});
      }
      process.stdout.write(JSON.stringify(out));"""
    cases = json.loads(subprocess.run([node, "-e", script, pkg], capture_output=True, text=True,
                                      check=True, timeout=60).stdout)
    assert len(cases) == 50
    for c in cases:
        headers = json.dumps({"Stripe-Signature": c["header"]})
        ok, tampered = db.execute(
            "SELECT crmpay.verify_signature('stripe', %s, %s, %s, '5 minutes', to_timestamp(%s)),"
            "       crmpay.verify_signature('stripe', %s, %s, %s || ' ', '5 minutes', to_timestamp(%s))",
            (c["secret"], headers, c["payload"], c["timestamp"] + 10) * 2).fetchone()
        assert ok is True and tampered is False
