"""Adyen end to end through the HTTPS Adyen double: Pay by Link creation in
Adyen's own minor units, every error shape, idempotent retries, link lookups
and expiry, webhooks (batches verified item by item), the official Node SDK
as a signature oracle, and a seeded flood of bad deliveries checked against
a model of the rules."""

import base64
import binascii
import hashlib
import hmac
import json
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from doubles.adyen_double import AdyenDouble, item_signature, signing_string
from gateways import deliver, payment

API_KEY = "AQEyhmfxK4_test_crmpay_integration_0123456789"
OTHER_KEY = "AQEyhmfxK4_test_crmpay_other_merchant_99"
HMAC_KEY = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"
WRONG_KEY = "DFB1EB5485895CFA84146406857104ABB4CBCABDC8AAF103A624C8F6A3EAAB00"
MERCHANT = "ShopECOM"
NODE_DIR = Path(__file__).resolve().parent / "node"


@pytest.fixture(scope="module")
def adyen_double(tls):
    double = AdyenDouble(api_keys={API_KEY, OTHER_KEY}, hmac_key=HMAC_KEY,
                         certfile=tls["server_cert"], keyfile=tls["server_key"],
                         merchant_accounts={OTHER_KEY: {"OtherECOM"}})
    double.start()
    yield double
    double.stop()


def add_adyen_account(conn, base_url, name="ady", key=API_KEY, hmac_key=HMAC_KEY, **settings):
    merged = {"api_base": base_url, "merchant_account": MERCHANT,
              "return_url": "https://shop.example/paid"}
    merged.update(settings)
    conn.execute("SELECT crmpay.add_account(%s, 'adyen', %s::jsonb, %s, %s::jsonb)",
                 (name, json.dumps({"api_key": key}), hmac_key, json.dumps(merged)))


@pytest.fixture
def shop(db, adyen_double):
    adyen_double.reset()
    add_adyen_account(db, adyen_double.base_url)
    return db


def create_link(conn, order_ref, amount="19.99", currency="EUR", **kw):
    cur = conn.execute(
        "SELECT * FROM crmpay.create_payment_link('ady', %s, %s::numeric, %s, %s, %s, %s::jsonb)",
        (order_ref, amount, currency, kw.get("email"), kw.get("description"),
         json.dumps(kw.get("metadata", {}))))
    return dict(zip([c.name for c in cur.description], cur.fetchone()))


def api_requests(double):
    return [r for r in double.requests() if r["path"].startswith("/v71/")]


def count(conn, sql, *args):
    return conn.execute(sql, args).fetchone()[0]


# ---------------------------------------------------------------------------
# Happy path
# ---------------------------------------------------------------------------

def test_order_goes_from_link_to_paid_and_refunded(shop, adyen_double):
    row = create_link(shop, "ORD-1", "19.99", "eur", email="ana@example.com",
                      description="Two hats", metadata={"crm_id": 42})
    assert row["status"] == "open"
    assert row["amount_minor"] == 1999 and row["currency"] == "EUR"
    assert row["gateway_ref"].startswith("PL") and len(row["gateway_ref"]) == 18
    assert row["url"] == adyen_double.base_url + "/l/" + row["gateway_ref"]
    assert 3500 < (row["expires_at"] - row["created_at"]).total_seconds() < 86400 + 60

    sent = api_requests(adyen_double)
    assert len(sent) == 1
    req = sent[0]
    assert req["method"] == "POST" and req["path"] == "/v71/paymentLinks"
    assert req["headers"]["X-API-Key"] == API_KEY[:4] + "*" * (len(API_KEY) - 8) + API_KEY[-4:]
    assert req["headers"]["Idempotency-Key"] == row["idempotency_key"]
    assert req["headers"]["Content-Type"] == "application/json"
    body = req["json"]
    assert body["reference"] == "ORD-1"
    assert body["amount"] == {"value": 1999, "currency": "EUR"}
    assert body["merchantAccount"] == MERCHANT
    assert body["returnUrl"] == "https://shop.example/paid"
    assert body["shopperEmail"] == "ana@example.com"
    assert body["description"] == "Two hats"
    assert body["reusable"] is False
    assert body["metadata"] == {"crmpay_order_ref": "ORD-1", "crm_id": "42"}
    link = adyen_double.get_link(row["gateway_ref"])
    assert link["expiresAt"] == body["expiresAt"]

    # the shopper pays; Adyen notifies; the order is paid once
    paid = adyen_double.pay(row["gateway_ref"], "authorised")
    rows = deliver(shop, "ady", paid["deliveries"][0])
    assert rows == [(200, "[accepted]", "applied", f"{paid['psp_reference']}:AUTHORISATION:true:")]
    after = payment(shop, "ady", "ORD-1")
    assert after["status"] == "paid" and after["paid_at"] is not None
    assert after["gateway_payment_ref"] == paid["psp_reference"]
    assert deliver(shop, "ady", paid["deliveries"][0])[0][2] == "duplicate"

    # two partial refunds (each REFUND notification carries its own amount)
    for amount, status in ((500, "partially_refunded"), (1499, "refunded")):
        refund = adyen_double.refund(paid["psp_reference"], amount)
        assert deliver(shop, "ady", refund["deliveries"][0])[0][2] == "applied"
        assert payment(shop, "ady", "ORD-1")["status"] == status
    assert payment(shop, "ady", "ORD-1")["refunded_minor"] == 1999


def test_same_order_again_makes_no_second_call(shop, adyen_double):
    first = create_link(shop, "ORD-2")
    second = create_link(shop, "ORD-2")
    assert second["id"] == first["id"] and second["url"] == first["url"]
    assert len(api_requests(adyen_double)) == 1
    with pytest.raises(errors.InvalidParameterValue):
        create_link(shop, "ORD-2", "20.00")
    assert len(api_requests(adyen_double)) == 1


@pytest.mark.parametrize("amount,currency,iso_minor,adyen_value", [
    ("500", "JPY", 500, 500),          # no decimals anywhere
    ("1.234", "KWD", 1234, 1234),      # three decimals
    ("1500", "ISK", 1500, 150000),     # ISO 0 decimals, Adyen 2
    ("990", "CLP", 990, 99000),        # ISO 0 decimals, Adyen 2
    ("15000", "IDR", 1500000, 15000),  # ISO 2 decimals, Adyen 0
    ("250", "CVE", 25000, 250),        # ISO 2 decimals, Adyen 0
    ("0.5", "USD", 50, 50),
])
def test_amounts_are_exact_in_adyen_units_both_ways(shop, adyen_double, amount, currency,
                                                    iso_minor, adyen_value):
    row = create_link(shop, f"AMT-{currency}", amount, currency)
    assert row["amount_minor"] == iso_minor
    assert api_requests(adyen_double)[-1]["json"]["amount"] == {"value": adyen_value,
                                                                  "currency": currency}
    # the AUTHORISATION comes back in Adyen's units and matches the order
    paid = adyen_double.pay(row["gateway_ref"])
    assert paid["deliveries"][0]["items"][0]["amount"]["value"] == adyen_value
    assert deliver(shop, "ady", paid["deliveries"][0])[0][2] == "applied"
    assert payment(shop, "ady", f"AMT-{currency}")["status"] == "paid"


@pytest.mark.parametrize("amount,currency,error,message", [
    ("15000.50", "IDR", errors.InvalidParameterValue, "Adyen cannot charge fractions of a IDR"),
    ("12.50", "CVE", errors.InvalidParameterValue, "Adyen cannot charge fractions of a CVE"),
    ("100", "BIF", errors.InvalidParameterValue, "Adyen does not accept currency BIF"),
    ("92233720368547759", "ISK", errors.NumericValueOutOfRange, "too large for Adyen"),
])
def test_amounts_adyen_cannot_take_are_refused_before_any_call(shop, adyen_double, amount,
                                                               currency, error, message):
    with pytest.raises(error) as exc:
        create_link(shop, "REFUSED", amount, currency)
    assert message in str(exc.value)
    assert api_requests(adyen_double) == []
    assert count(shop, "SELECT count(*) FROM crmpay.payments") == 0


@pytest.mark.parametrize("kw,message", [
    ({"metadata": {f"k{i}": i for i in range(20)}}, "too many metadata keys for Adyen"),
    ({"metadata": {"a_key_longer_than_twenty": 1}}, "is too long for Adyen"),
    ({"description": "d" * 281}, "description is too long for Adyen"),
])
def test_requests_adyen_would_refuse_are_refused_before_any_call(shop, adyen_double, kw, message):
    with pytest.raises(errors.InvalidParameterValue) as exc:
        create_link(shop, "REFUSED-2", **kw)
    assert message in str(exc.value)
    assert exc.value.diag.message_detail
    assert api_requests(adyen_double) == []
    assert count(shop, "SELECT count(*) FROM crmpay.payments") == 0


# ---------------------------------------------------------------------------
# Error shapes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode,error,message,detail", [
    ("500", errors.ConnectionFailure, "gateway is unavailable", "HTTP 500, 905: Internal error (errorType internal"),
    ("503", errors.ConnectionFailure, "gateway is unavailable", "HTTP 503, 999"),
    ("429", errors.ConfigurationLimitExceeded, "rate limiting", "HTTP 429, 000: Too many requests"),
    ("drop", errors.ConnectionFailure, "gateway connection failed", None),
    ("bad_json", errors.ProtocolViolation, "cannot read", "without a payment link"),
])
def test_gateway_faults_raise_a_fitting_error_and_write_nothing(shop, adyen_double, mode, error,
                                                                message, detail):
    adyen_double.set_faults(mode=mode, count=1, retry_after=7)
    with pytest.raises(error) as exc:
        create_link(shop, "ORD-F")
    assert message in exc.value.diag.message_primary
    assert 'account "ady", provider adyen' in exc.value.diag.message_primary
    if detail:
        assert detail in exc.value.diag.message_detail
    assert count(shop, "SELECT count(*) FROM crmpay.payments") == 0
    # the same call again (same idempotency key) succeeds once the fault is gone
    assert create_link(shop, "ORD-F")["status"] == "open"


def test_refused_credentials_and_merchant_account(shop, adyen_double):
    shop.execute("SELECT crmpay.update_account('ady', '{\"api_key\": \"AQE_wrong_key_0123456789\"}')")
    with pytest.raises(errors.InvalidAuthorizationSpecification) as exc:
        create_link(shop, "ORD-A")
    assert exc.value.diag.message_detail == "HTTP 401, 000: HTTP Status Response - Unauthorized (errorType security)"
    assert "update_account" in exc.value.diag.message_hint
    # a key that may not use this merchant account: 403 010
    shop.execute("SELECT crmpay.update_account('ady', %s::jsonb)", (json.dumps({"api_key": OTHER_KEY}),))
    with pytest.raises(errors.InvalidAuthorizationSpecification) as exc:
        create_link(shop, "ORD-A")
    assert exc.value.diag.message_detail.startswith("HTTP 403, 010: Not allowed (errorType security, pspReference ")
    assert OTHER_KEY not in str(exc.value) + exc.value.diag.message_detail
    assert count(shop, "SELECT count(*) FROM crmpay.payments") == 0


def test_validation_error_from_adyen(shop, adyen_double):
    # bypass crmpay's own checks to see how an Adyen 422 is reported
    request = {"order_ref": "X", "amount_minor": -5, "currency": "EUR", "exponent": 2,
               "idempotency_key": "crmpay-test-negative", "metadata": {}}
    with pytest.raises(errors.InvalidParameterValue) as exc:
        shop.execute("SELECT crmpay._gateway_create_link('ady', %s::jsonb)", (json.dumps(request),))
    assert "gateway rejected the request" in str(exc.value)
    assert exc.value.diag.message_detail.startswith(
        "HTTP 422, 000: Field 'amount.value' is not a valid amount (errorType validation, pspReference ")


def test_idempotency_key_in_flight_is_a_retryable_failure(shop, adyen_double, pg, db_name):
    """Two calls with one idempotency key at once: Adyen answers the second
    with errorCode 704, which crmpay reports as retryable."""
    request = json.dumps({"order_ref": "FLIGHT", "amount_minor": 100, "currency": "EUR",
                          "exponent": 2, "idempotency_key": "crmpay-test-flight", "metadata": {}})
    adyen_double.configure(latency=1.0)
    results = []

    def call():
        with pg.connect(db_name) as conn:
            try:
                conn.execute("SELECT crmpay._gateway_create_link('ady', %s::jsonb)", (request,))
                results.append("ok")
            except psycopg.Error as exc:
                results.append(exc)

    try:
        threads = [threading.Thread(target=call) for _ in range(2)]
        threads[0].start()
        time.sleep(0.3)
        threads[1].start()
        for t in threads:
            t.join(30)
    finally:
        adyen_double.configure(latency=0)
    assert results.count("ok") == 1
    failure = next(r for r in results if r != "ok")
    assert isinstance(failure, errors.ConnectionFailure)
    assert "HTTP 422, 704: request already processed or in progress" in failure.diag.message_detail
    assert adyen_double.stats()["links_created"] == 1


def test_lost_answer_then_retry_returns_the_same_link(shop, adyen_double):
    adyen_double.set_faults(mode="drop_after_create", count=1)
    with pytest.raises(errors.ConnectionFailure) as exc:
        create_link(shop, "ORD-LOST")
    assert "retrying the same call is safe" in exc.value.diag.message_hint
    assert count(shop, "SELECT count(*) FROM crmpay.payments") == 0
    row = create_link(shop, "ORD-LOST")
    stats = adyen_double.stats()
    assert stats["links_created"] == 1 and stats["idempotent_replays"] == 1
    assert adyen_double.get_link(row["gateway_ref"])["reference"] == "ORD-LOST"
    first, second = api_requests(adyen_double)
    assert first["headers"]["Idempotency-Key"] == second["headers"]["Idempotency-Key"]


def test_live_account_calls_the_live_host(db, adyen_double):
    """Without api_base, live_url_prefix selects Adyen's live endpoint; the
    test cluster cannot resolve it, which shows which host was called."""
    db.execute("""SELECT crmpay.add_account('ady-live', 'adyen', '{"api_key": "AQE_live_0123456789"}', NULL,
                  '{"merchant_account": "ShopLIVE", "return_url": "https://shop.example/paid",
                    "live_url_prefix": "1797a841fbb37ca7-AdyenDemo"}')""")
    db.execute("SET crmpay.connect_timeout = 2000")
    with pytest.raises(psycopg.Error) as exc:
        db.execute("SELECT crmpay.create_payment_link('ady-live', 'L-1', 1, 'EUR')")
    assert "1797a841fbb37ca7-AdyenDemo-checkout-live.adyenpayments.com" in (exc.value.diag.message_detail or "")


# ---------------------------------------------------------------------------
# Link lookups and expiry
# ---------------------------------------------------------------------------

def test_refresh_payment_reads_the_link_status(shop, adyen_double):
    row = create_link(shop, "ORD-R1")
    assert shop.execute("SELECT status FROM crmpay.refresh_payment(%s)", (row["id"],)).fetchone()[0] == "open"
    adyen_double.pay(row["gateway_ref"], "authorised")      # the webhook is "lost"
    refreshed = shop.execute("SELECT status, paid_at FROM crmpay.refresh_payment(%s)", (row["id"],)).fetchone()
    assert refreshed[0] == "paid" and refreshed[1] is not None
    get = api_requests(adyen_double)[-1]
    assert get["method"] == "GET" and get["path"] == f"/v71/paymentLinks/{row['gateway_ref']}"
    assert get["body"] == "" and "Idempotency-Key" not in get["headers"]

    pending = create_link(shop, "ORD-R2")
    adyen_double.pay(pending["gateway_ref"], "pending")
    assert shop.execute("SELECT status FROM crmpay.refresh_payment(%s)", (pending["id"],)).fetchone()[0] == "processing"

    gone = create_link(shop, "ORD-R3")
    adyen_double.expire_now(gone["gateway_ref"])
    assert shop.execute("SELECT status FROM crmpay.refresh_payment(%s)", (gone["id"],)).fetchone()[0] == "expired"


def test_expire_payment_link(shop, adyen_double):
    row = create_link(shop, "ORD-E1")
    expired = shop.execute("SELECT status FROM crmpay.expire_payment_link(%s)", (row["id"],)).fetchone()[0]
    assert expired == "expired"
    patch = api_requests(adyen_double)[-1]
    assert patch["method"] == "PATCH" and patch["path"] == f"/v71/paymentLinks/{row['gateway_ref']}"
    assert patch["json"] == {"status": "expired"}
    assert adyen_double.get_link(row["gateway_ref"])["status"] == "expired"
    # again: nothing to do, no call
    calls = len(api_requests(adyen_double))
    shop.execute("SELECT crmpay.expire_payment_link(%s)", (row["id"],))
    assert len(api_requests(adyen_double)) == calls

    # paid at Adyen but not yet here: Adyen refuses, the payment is untouched
    paid = create_link(shop, "ORD-E2")
    adyen_double.pay(paid["gateway_ref"])
    with pytest.raises(errors.InvalidParameterValue) as exc:
        shop.execute("SELECT crmpay.expire_payment_link(%s)", (paid["id"],))
    assert "cannot be updated" in exc.value.diag.message_detail
    assert payment(shop, "ady", "ORD-E2")["status"] == "open"
    shop.execute("SELECT crmpay.refresh_payment(%s)", (paid["id"],))
    with pytest.raises(errors.ObjectNotInPrerequisiteState) as exc:
        shop.execute("SELECT crmpay.expire_payment_link(%s)", (paid["id"],))
    assert "is paid" in str(exc.value)


def test_link_lookups_refuse_clearly(shop, adyen_double):
    with pytest.raises(errors.UndefinedObject):
        shop.execute("SELECT crmpay.refresh_payment(424242)")
    shop.execute("""INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, idempotency_key)
                    VALUES ('ady', 'NO-LINK', 100, 'EUR', 'k')""")
    pid = count(shop, "SELECT id FROM crmpay.payments WHERE order_ref = 'NO-LINK'")
    with pytest.raises(errors.ObjectNotInPrerequisiteState) as exc:
        shop.execute("SELECT crmpay.refresh_payment(%s)", (pid,))
    assert "create_payment_link" in exc.value.diag.message_hint
    # a gateway without lookups yet says so, before any call
    shop.execute("""SELECT crmpay.add_account('stripe-shop', 'stripe', '{"secret_key": "sk_test_x"}', NULL,
                    '{"success_url": "https://shop.example/ok"}')""")
    shop.execute("""INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, gateway_ref, idempotency_key)
                    VALUES ('stripe-shop', 'S-1', 100, 'EUR', 'cs_test_1', 'k')""")
    sid = count(shop, "SELECT id FROM crmpay.payments WHERE order_ref = 'S-1'")
    with pytest.raises(errors.FeatureNotSupported):
        shop.execute("SELECT crmpay.expire_payment_link(%s)", (sid,))


def test_app_role_may_refresh_and_expire(shop, adyen_double, pg, db_name):
    row = create_link(shop, "ORD-ROLE")
    shop.execute("CREATE ROLE t_adyen_app LOGIN IN ROLE crmpay_app")
    try:
        with pg.connect(db_name, user="t_adyen_app") as app:
            assert app.execute("SELECT status FROM crmpay.refresh_payment(%s)", (row["id"],)).fetchone()[0] == "open"
            with pytest.raises(errors.InsufficientPrivilege):
                app.execute("SELECT crmpay._gateway_link_state('ady', 'x', false)")
    finally:
        shop.execute("DROP ROLE t_adyen_app")


# ---------------------------------------------------------------------------
# Webhooks
# ---------------------------------------------------------------------------

def batch(double, items, sign="items", key=None):
    return double.notify(items, sign=sign, key=key)


def test_batch_items_are_verified_and_deduped_one_by_one(shop, adyen_double):
    a = create_link(shop, "ORD-B1")
    b = create_link(shop, "ORD-B2")
    item_a = adyen_double.pay(a["gateway_ref"])["deliveries"][0]["items"][0]
    item_b = adyen_double.pay(b["gateway_ref"])["deliveries"][0]["items"][0]
    forged = dict(item_b, pspReference="FORGED0000000001")   # keeps b's signature
    delivery = batch(adyen_double, [item_a, forged], sign="none")
    rows = deliver(shop, "ady", delivery)
    assert [(r[0], r[1], r[2]) for r in rows] == [(200, "[accepted]", "applied"),
                                                  (200, "[accepted]", "rejected")]
    assert payment(shop, "ady", "ORD-B1")["status"] == "paid"
    assert payment(shop, "ady", "ORD-B2")["status"] == "open"
    reasons = [r[0] for r in shop.execute("SELECT reason FROM crmpay.events ORDER BY id")]
    assert reasons[-1] == "item 2: HMAC signature does not match"
    # the real b, in a batch with a again: a is a duplicate, b applied
    rows = deliver(shop, "ady", batch(adyen_double, [item_a, item_b], sign="none"))
    assert [r[2] for r in rows] == ["duplicate", "applied"]
    # nothing authentic: refused as a whole, so Adyen retries it
    rows = deliver(shop, "ady", batch(adyen_double, [forged], key=WRONG_KEY))
    assert rows == [(400, "item 1: HMAC signature does not match", "rejected", None)]


def test_modification_events(shop, adyen_double):
    row = create_link(shop, "ORD-M1")
    paid = adyen_double.pay(row["gateway_ref"])
    deliver(shop, "ady", paid["deliveries"][0])
    cb = adyen_double.chargeback(paid["psp_reference"])
    assert deliver(shop, "ady", cb["deliveries"][0])[0][2] == "applied"
    assert payment(shop, "ady", "ORD-M1")["status"] == "disputed"

    refused = create_link(shop, "ORD-M2")
    first = adyen_double.pay(refused["gateway_ref"], "refused")
    assert deliver(shop, "ady", first["deliveries"][0])[0][2] == "applied"
    assert payment(shop, "ady", "ORD-M2")["status"] == "failed"
    second = adyen_double.pay(refused["gateway_ref"], "authorised")
    deliver(shop, "ady", second["deliveries"][0])
    after = payment(shop, "ady", "ORD-M2")
    assert after["status"] == "paid" and after["gateway_payment_ref"] == second["psp_reference"]
    failed_refund = adyen_double.refund(second["psp_reference"], 100, success=False)
    assert deliver(shop, "ady", failed_refund["deliveries"][0])[0][2] == "ignored"
    capture = adyen_double.capture(second["psp_reference"])
    assert deliver(shop, "ady", capture["deliveries"][0])[0][2] == "ignored"
    assert payment(shop, "ady", "ORD-M2")["status"] == "paid"

    canceled = create_link(shop, "ORD-M3")
    pay3 = adyen_double.pay(canceled["gateway_ref"], "refused")
    deliver(shop, "ady", pay3["deliveries"][0])
    item = dict(pay3["deliveries"][0]["items"][0], eventCode="CANCELLATION", success="true",
                pspReference="CANCEL0000000001", originalReference=pay3["psp_reference"])
    assert deliver(shop, "ady", batch(adyen_double, [item]))[0][2] == "applied"
    assert payment(shop, "ady", "ORD-M3")["status"] == "canceled"


def test_hmac_signature_header_delivery(shop, adyen_double):
    row = create_link(shop, "ORD-H1")
    item = adyen_double.pay(row["gateway_ref"])["deliveries"][0]["items"][0]
    del item["additionalData"]["hmacSignature"]
    good = batch(adyen_double, [item], sign="header")
    assert "hmacSignature" not in good["body"]
    bad = dict(good, body=good["body"].replace('"live": "false"', '"live": "true"'))
    assert deliver(shop, "ady", bad) == [(400, "HmacSignature header does not match the body", "rejected", None)]
    assert deliver(shop, "ady", good)[0][:3] == (200, "[accepted]", "applied")


# ---------------------------------------------------------------------------
# The official Node SDK as oracle
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node_oracle():
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed: the Adyen SDK oracle is not available")
    subprocess.run(["bash", str(NODE_DIR / "install.sh")], check=True, capture_output=True)

    def call(request):
        proc = subprocess.run(["node", str(NODE_DIR / "adyen_oracle.js")], input=json.dumps(request),
                              capture_output=True, text=True, check=True, timeout=60)
        return json.loads(proc.stdout)
    return call


def random_text(rng, alphabet, n):
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_node_sdk_signatures_verify_in_crmpay(db, node_oracle):
    """Items with random references (including ':' '\\' '/' and non-ASCII),
    signed by @adyen/api-library's HmacValidator, verify in crmpay; any
    change to a signed field makes them fail; crmpay's double signs what the
    SDK validates."""
    rng = random.Random(20260101)
    alphabet = "abcXYZ0189:\\/-_ .é€漢\"'"
    keys = ["".join(rng.choice("0123456789ABCDEF") for _ in range(64)) for _ in range(3)]
    items = []
    for i in range(150):
        item = {"pspReference": random_text(rng, "ABCDEFGHJKLMNPQRSTUVWXYZ23456789", 16),
                "merchantAccountCode": random_text(rng, alphabet, rng.randrange(1, 20)),
                "merchantReference": random_text(rng, alphabet, rng.randrange(0, 40)),
                "amount": {"value": rng.randrange(0, 10 ** rng.randrange(1, 12)),
                           "currency": rng.choice(["EUR", "JPY", "KWD", "ISK"])},
                "eventCode": rng.choice(["AUTHORISATION", "CAPTURE", "REFUND", "CANCELLATION", "CHARGEBACK"]),
                "success": rng.choice(["true", "false"]),
                "additionalData": {}}
        if rng.random() < 0.5:
            item["originalReference"] = random_text(rng, alphabet, 16)
        items.append(item)
    for key in keys:
        signatures = node_oracle({"op": "sign", "key": key, "items": items})
        bodies, tampered = [], []
        for item, sig in zip(items, signatures):
            signed = dict(item, additionalData={"hmacSignature": sig})
            bodies.append(json.dumps({"live": "false", "notificationItems": [{"NotificationRequestItem": signed}]}))
            changed = dict(signed, merchantReference=signed["merchantReference"] + ":")
            tampered.append(json.dumps({"live": "false", "notificationItems": [{"NotificationRequestItem": changed}]}))
            assert sig == item_signature(key, item)   # the double signs as the SDK does
        ok = db.execute("SELECT array_agg(crmpay.verify_signature('adyen', %s, '{}', b, '0') ORDER BY n) "
                        "FROM unnest(%s::text[]) WITH ORDINALITY AS t(b, n)", (key, bodies)).fetchone()[0]
        assert ok == [True] * len(bodies)
        bad = db.execute("SELECT array_agg(crmpay.verify_signature('adyen', %s, '{}', b, '0') ORDER BY n) "
                         "FROM unnest(%s::text[]) WITH ORDINALITY AS t(b, n)", (key, tampered)).fetchone()[0]
        assert bad == [False] * len(tampered)
        # the SDK agrees on both
        assert node_oracle({"op": "validate", "key": key, "items": [
            json.loads(b)["notificationItems"][0]["NotificationRequestItem"] for b in bodies]}) == [True] * len(bodies)
        assert node_oracle({"op": "validate", "key": key, "items": [
            json.loads(b)["notificationItems"][0]["NotificationRequestItem"] for b in tampered]}) == [False] * len(bodies)

    # raw-body signatures (HmacSignature header)
    raw = [json.dumps({"type": "merchant.updated", "data": {"id": random_text(rng, alphabet, 30)}}, ensure_ascii=False)
           for _ in range(30)]
    sigs = node_oracle({"op": "sign_body", "key": keys[0], "bodies": raw})
    results = db.execute("SELECT array_agg(crmpay.verify_signature('adyen', %s, jsonb_build_object('HmacSignature', s), b, '0') ORDER BY n) "
                         "FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS t(b, s, n)",
                         (keys[0], raw, sigs)).fetchone()[0]
    assert results == [True] * len(raw)
    assert node_oracle({"op": "validate_body", "key": keys[0], "bodies": raw, "signatures": sigs}) == [True] * len(raw)


# ---------------------------------------------------------------------------
# Adversarial intake: a seeded flood of bad deliveries against a model
# ---------------------------------------------------------------------------

STATUS_MOVES = {
    ("open", "paid"), ("open", "failed"), ("open", "canceled"), ("failed", "paid"),
    ("failed", "canceled"), ("paid", "partially_refunded"), ("paid", "refunded"),
    ("paid", "disputed"), ("partially_refunded", "refunded"), ("partially_refunded", "disputed"),
    ("disputed", "refunded"), ("canceled", "paid"),
}


class Model:
    """The rules, independently: per-item authenticity, dedupe per key,
    matching, amounts in Adyen units, the state machine and refund sums."""

    def __init__(self, payments):
        self.payments = payments            # order_ref -> dict(status, amount, currency, link, psp, refunded)
        self.applied = set()

    def find(self, item):
        link = (item.get("additionalData") or {}).get("paymentLinkId")
        code = item.get("eventCode")
        if code == "AUTHORISATION":     # a refused attempt's reference is not kept
            psp = item["pspReference"] if item["success"] == "true" else None
        else:
            psp = item.get("originalReference") or item["pspReference"]
        for ref, p in self.payments.items():
            if link and p["link"] == link:
                return ref
        for ref, p in self.payments.items():
            if psp and p["psp"] == psp:
                return ref
        if code == "AUTHORISATION":
            for ref in self.payments:
                if ref == item.get("merchantReference"):
                    return ref
        return None

    def apply(self, item):
        """The outcome crmpay must record for one authentic item."""
        code, success = item["eventCode"], item["success"] == "true"
        key = "%s:%s:%s:%s" % (item["pspReference"], code, item["success"], item.get("originalReference", ""))
        if key in self.applied:
            return "duplicate"
        if item["merchantAccountCode"] != MERCHANT:
            return "ignored"
        exp = {"EUR": 2, "JPY": 0, "ISK": 2}[item["amount"]["currency"]]
        iso_exp = {"EUR": 2, "JPY": 0, "ISK": 0}[item["amount"]["currency"]]
        value = item["amount"]["value"]
        if value % (10 ** max(0, exp - iso_exp)):
            return "ignored"
        iso_value = value // 10 ** (exp - iso_exp)
        target = {"AUTHORISATION": "paid" if success else "failed", "CAPTURE": "paid",
                  "REFUND": "refunded", "CANCELLATION": "canceled", "CHARGEBACK": "disputed"}.get(code)
        if target is None or (not success and code != "AUTHORISATION"):
            return "ignored"
        if code == "REFUND" and iso_value <= 0:
            return "ignored"
        ref = self.find(item)
        if ref is None:
            return "ignored"
        p = self.payments[ref]
        if target == "paid" and (iso_value != p["amount"] or item["amount"]["currency"] != p["currency"]):
            return "ignored"
        psp = item["pspReference"] if code == "AUTHORISATION" else item.get("originalReference") or item["pspReference"]
        remember = code != "AUTHORISATION" or success
        if code == "REFUND":
            if item["amount"]["currency"] != p["currency"]:
                return "ignored"
            if p["status"] not in ("paid", "partially_refunded", "disputed"):
                return "ignored"
            p["refunded"] = min(p["amount"], p["refunded"] + min(iso_value, p["amount"]))
            target = "refunded" if p["refunded"] >= p["amount"] else "partially_refunded"
            if (p["status"], target) in STATUS_MOVES:
                p["status"] = target
            if p["psp"] is None:
                p["psp"] = psp
            self.applied.add(key)
            return "applied"
        if (p["status"], target) in STATUS_MOVES:
            p["status"] = target
            if p["psp"] is None and remember:
                p["psp"] = psp
            self.applied.add(key)
            return "applied"
        if p["psp"] is None and remember:
            p["psp"] = psp
        return "ignored"


def test_adversarial_deliveries_match_the_model(db):
    """2,000 generated deliveries, most of them bad (tampered, unsigned,
    wrongly signed, truncated, oversized, invalid UTF-8 or base64,
    duplicated, replayed, for unknown payments, out of order): none of the
    bad ones is applied, each gets its documented status, nothing crashes,
    and the payments table ends as the model predicts."""
    rng = random.Random(424242)
    db.execute("""SELECT crmpay.add_account('ady', 'adyen', '{"api_key": "AQE_adversarial_0123"}', %s,
                  '{"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid"}')""", (HMAC_KEY,))
    db.execute("SET crmpay.max_webhook_bytes = 65536")
    payments = {}
    rows = []
    for i in range(40):
        currency = rng.choice(["EUR", "JPY", "ISK"])
        amount = rng.randrange(1, 5000)
        ref = f"ADV-{i}"
        payments[ref] = {"status": "open", "amount": amount, "currency": currency,
                         "link": f"PLADV{i:013d}", "psp": None, "refunded": 0}
        rows.append((ref, amount, currency, f"PLADV{i:013d}"))
    db.execute("""INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status, gateway_ref, idempotency_key)
                  SELECT 'ady', r, a, c, 'open', l, 'k-' || r FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[]) t(r, a, c, l)""",
               ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]))
    model = Model(payments)
    psps = {}

    def adyen_value(ref, iso=None):
        p = payments[ref]
        iso = p["amount"] if iso is None else iso
        return iso * 100 if p["currency"] == "ISK" else iso

    def genuine_item():
        ref = rng.choice(list(payments))
        p = payments[ref]
        kind = rng.random()
        psp = psps.setdefault(ref, "PSPADV%010d" % rng.randrange(10 ** 10))
        if kind < 0.4:
            item = {"pspReference": psp if rng.random() < 0.8 else "PSPADV%010d" % rng.randrange(10 ** 10),
                    "merchantAccountCode": MERCHANT, "merchantReference": ref,
                    "amount": {"value": adyen_value(ref), "currency": p["currency"]},
                    "eventCode": "AUTHORISATION", "success": rng.choice(["true", "true", "false"]),
                    "additionalData": {"paymentLinkId": p["link"]} if rng.random() < 0.5 else {}}
        else:
            code = rng.choice(["REFUND", "REFUND", "CANCELLATION", "CHARGEBACK", "CAPTURE", "REPORT_AVAILABLE"])
            item = {"pspReference": "MODADV%010d" % rng.randrange(10 ** 10), "originalReference": psp,
                    "merchantAccountCode": MERCHANT, "merchantReference": "mod-" + ref,
                    "amount": {"value": adyen_value(ref, rng.randrange(1, p["amount"] + 1)), "currency": p["currency"]},
                    "eventCode": code, "success": rng.choice(["true", "true", "true", "false"]),
                    "additionalData": {}}
        if rng.random() < 0.05:
            item["merchantAccountCode"] = "OtherECOM"
        if rng.random() < 0.05:
            item["merchantReference"] = "UNKNOWN-%d" % rng.randrange(1000)
            item["additionalData"] = {}
        if rng.random() < 0.03 and p["currency"] == "ISK":
            item["amount"]["value"] += 1    # a fraction of an ISK: never compared
        item["additionalData"]["hmacSignature"] = item_signature(HMAC_KEY, item)
        return item

    def body_of(items):
        return json.dumps({"live": "false", "notificationItems": [{"NotificationRequestItem": i} for i in items]})

    sent = []      # (headers, body, expected) ; expected: list of outcomes per item or ("rejected", status)
    history = []   # genuine items sent so far, for replays

    def tamper(item):
        bad = json.loads(json.dumps(item))
        field = rng.choice(["pspReference", "merchantReference", "value", "currency", "eventCode", "success",
                            "signature", "merchantAccountCode", "unsigned", "nosig", "wrongkey", "b64"])
        if field == "value":
            bad["amount"]["value"] += rng.choice([1, -1, 100])
        elif field == "currency":
            bad["amount"]["currency"] = "USD"
        elif field == "success":
            bad["success"] = "false" if bad["success"] == "true" else "true"
        elif field == "signature":
            sig = bad["additionalData"]["hmacSignature"]
            pos = rng.randrange(len(sig) - 1)
            bad["additionalData"]["hmacSignature"] = sig[:pos] + ("A" if sig[pos] != "A" else "B") + sig[pos + 1:]
        elif field == "unsigned":
            bad["additionalData"]["hmacSignature"] = ""
        elif field == "nosig":
            del bad["additionalData"]["hmacSignature"]
        elif field == "wrongkey":
            bad["additionalData"]["hmacSignature"] = item_signature(WRONG_KEY, bad)
        elif field == "b64":
            bad["additionalData"]["hmacSignature"] = "!!" + bad["additionalData"]["hmacSignature"][2:]
        else:
            bad[field] = bad[field] + "x"
        return bad, ("unsigned" if field in ("unsigned", "nosig") else "forged")

    for n in range(2000):
        r = rng.random()
        if r < 0.25:
            items = [genuine_item() for _ in range(rng.randrange(1, 4))]
            history.extend(items)
            sent.append(({}, body_of(items), ("items", items, [True] * len(items))))
        elif r < 0.35 and history:
            items = [rng.choice(history) for _ in range(rng.randrange(1, 3))]      # replays
            sent.append(({}, body_of(items), ("items", items, [True] * len(items))))
        elif r < 0.60:
            good = [genuine_item() for _ in range(rng.randrange(0, 3))]
            bad = [tamper(genuine_item())[0] for _ in range(rng.randrange(1, 3))]
            items = good + bad
            rng.shuffle(items)
            authentic = [any(i is g for g in good) for i in items]
            history.extend(good)
            sent.append(({}, body_of(items), ("items", items, authentic)))
        elif r < 0.70:
            body = body_of([genuine_item()])
            cut = rng.randrange(1, len(body) - 1)
            sent.append(({}, body[:cut], ("rejected", 400)))                      # truncated
        elif r < 0.75:
            body = body_of([genuine_item()])
            sent.append(({}, body + " " * 70000, ("rejected", 413)))               # oversized
        elif r < 0.78:
            body = body_of([genuine_item()]).encode()
            pos = rng.randrange(len(body))
            sent.append(({}, body[:pos] + bytes([0xC3, 0x28]) + body[pos:], ("not text",)))   # invalid UTF-8
        elif r < 0.80:
            item = genuine_item()
            item["merchantReference"] += "\\" + rng.choice(["ud800", "udfff", "u0000"])
            body = body_of([item]).replace("\\\\u", "\\u")     # a JSON escape, not text
            sent.append(({}, body, ("rejected", 400)))                   # invalid \u escapes
        elif r < 0.85:
            body = body_of([genuine_item()])
            sig = rng.choice(["not base64!", "", base64.b64encode(b"x" * 32).decode(), "=" * 44])
            sent.append(({"HmacSignature": sig}, body, ("rejected", 400)))        # bad header signature
        elif r < 0.90:
            junk = rng.choice(['{"live": "false"}', '[]', '{"notificationItems": {}}', '"x"', 'null',
                               '{"notificationItems": [1, 2]}', '{' * 100 + '}' * 100,
                               '{"notificationItems": [{"NotificationRequestItem": {"amount": []}}]}'])
            sent.append(({}, junk, ("rejected", 400)))
        else:
            item = genuine_item()
            history.append(item)
            body = body_of([item])
            sent.append(({"HmacSignature": base64.b64encode(hmac.new(binascii.unhexlify(HMAC_KEY), body.encode(),
                                                                     hashlib.sha256).digest()).decode()},
                         body, ("items", [item], [True])))

    results = []
    with db.cursor() as cur:
        for headers, body, expected in sent:
            if expected[0] == "not text":
                # invalid UTF-8 cannot even become a text argument: the
                # database refuses it before crmpay runs, and nothing is written
                with pytest.raises(errors.CharacterNotInRepertoire):
                    cur.execute("SELECT * FROM crmpay.receive_webhook('ady', %s, convert_from(%s::bytea, 'UTF8'))",
                                (json.dumps(headers), body))
                results.append(None)
                continue
            cur.execute("SELECT http_status, reply, outcome, event_id FROM crmpay.receive_webhook('ady', %s, %s)",
                        (json.dumps(headers), body))
            results.append(cur.fetchall())

    applied_by_crmpay = 0
    expected_rows = 0
    for (headers, body, expected), got in zip(sent, results):
        if expected[0] == "not text":
            continue
        expected_rows += 1 if expected[0] == "rejected" or not any(expected[2]) else len(expected[1])
        if expected[0] == "rejected":
            assert len(got) == 1 and got[0][0] == expected[1] and got[0][2] == "rejected", (body[:200], got)
            continue
        _, items, authentic = expected
        if not any(authentic):
            assert len(got) == 1 and got[0][0] == 400 and got[0][2] == "rejected", got
            continue
        assert [g[0] for g in got] == [200] * len(items) and all(g[1] == "[accepted]" for g in got)
        for item, ok, g in zip(items, authentic, got):
            want = model.apply(item) if ok else "rejected"
            assert g[2] == want, (item, g, want)
            applied_by_crmpay += g[2] == "applied"

    bad = sum(1 for (_, _, e) in sent if e[0] != "items" or not all(e[2]))
    replays = sum(1 for g in results if g and any(r[2] == "duplicate" for r in g))
    assert bad + replays >= 1000, (bad, replays)
    assert applied_by_crmpay > 50          # the flood also carried real progress
    final = {r[0]: r[1:] for r in db.execute(
        "SELECT order_ref, status, refunded_minor, gateway_payment_ref FROM crmpay.payments WHERE account = 'ady'")}
    for ref, p in payments.items():
        assert final[ref] == (p["status"], p["refunded"], p["psp"]), ref
    assert count(db, "SELECT count(*) FROM crmpay.events WHERE account = 'ady'") == expected_rows
    assert count(db, "SELECT count(*) FROM crmpay.events WHERE outcome = 'applied'") == applied_by_crmpay


def max_nesting(text):
    """Deepest bracket nesting outside strings (as a parser would count it)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def test_scanner_accepts_exactly_the_json_crmpay_parses(db):
    """Adyen bodies are read by a single-pass scanner (the hot path of
    verification); it must accept exactly the JSON texts that crmpay's
    general parser (json.c, used for every other gateway) accepts, and
    both exactly what the server's own JSON parser accepts (jsonb input),
    up to crmpay's nesting limit of 64.  Differential check over seeded
    mutations of tricky JSON: crmpay's verdict is whether a Stripe delivery
    with the same body is refused as malformed JSON."""
    rng = random.Random(77)
    stripe_secret = "whsec_scanner_differential"
    db.execute("""SELECT crmpay.add_account('st', 'stripe', '{"secret_key": "sk_test_scan"}', %s,
                  '{"success_url": "https://shop.example/ok"}')""", (stripe_secret,))
    bases = [
        '{"type": "merchant.updated", "n": [0, -1, 2.5, 1e10, -0.0e-3, 1E+2], "s": "a\\"b\\\\c\\/d\\b\\f\\n\\r\\t",'
        ' "u": "\\u00e9\\u20ac\\ud83d\\ude00 \u00e9\u20ac", "t": true, "f": false, "z": null, "o": {"a": [[], {}]}}',
        '[1, "x", {"k": [true, null, {"d": {"e": ["\\u0041"]}}]}]',
        '{"notificationItems": [{"NotificationRequestItem": {"amount": {"value": 1, "currency": "EUR"}}}], "live": "false"}',
        '  \n\t{"a":1}\r\n ',
        '"just a string"',
    ]
    alphabet = list('{}[]",:\\/ 0123456789-+.eEtrufalsn\t\nu') + ["\\u", "\\ud800", "\\udc00", "\\u0000",
                                                                   "\u00e9", "\x01", "1e", "tru", "nul"]
    bodies = []
    for _ in range(4000):
        body = rng.choice(bases)
        for _ in range(rng.randrange(0, 4)):
            pos = rng.randrange(len(body) + 1)
            op = rng.random()
            if op < 0.4:
                body = body[:pos] + rng.choice(alphabet) + body[pos:]
            elif op < 0.7:
                body = body[:pos] + body[pos + 1:]
            else:
                body = body[:pos] + rng.choice(alphabet) + body[pos + 1:]
        bodies.append(body)
    bodies += ['{"a": ' + "[" * 64 + "]" * 64 + "}", "[" * 64 + "]" * 64, "[" * 65 + "]" * 65, "", " ",
               '{"a": 01}', '{"a": -}', '{"a": 1.}', '{"a": .5}', '{"a": "\\x"}', '{"a": "\\u12G4"}',
               '{"a": 1}x', '{"a" 1}', '{,}', '[1,]', '{"a": "\\ud83d\\u0041"}', "\ufeff{}"]
    now = int(time.time())
    stripe_headers = [json.dumps({"Stripe-Signature": "t=%d,v1=%s" % (
        now, hmac.new(stripe_secret.encode(), f"{now}.{b}".encode(), hashlib.sha256).hexdigest())}) for b in bodies]
    adyen_headers = [json.dumps({"HmacSignature": base64.b64encode(hmac.new(
        binascii.unhexlify(HMAC_KEY), b.encode(), hashlib.sha256).digest()).decode()}) for b in bodies]
    db.execute("""SELECT crmpay.add_account('ad', 'adyen', '{"api_key": "AQE_scan_0123"}', %s,
                  '{"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid"}')""", (HMAC_KEY,))
    db.execute("""CREATE FUNCTION pg_temp.is_jsonb(t text) RETURNS boolean LANGUAGE plpgsql AS $$
                  BEGIN PERFORM t::jsonb; RETURN true; EXCEPTION WHEN others THEN RETURN false; END $$""")
    rows = db.execute("""
        SELECT n, (SELECT reply FROM crmpay.receive_webhook('ad', ah::jsonb, b) LIMIT 1),
               (SELECT reply FROM crmpay.receive_webhook('st', sh::jsonb, b)), pg_temp.is_jsonb(b)
          FROM unnest(%s::text[], %s::text[], %s::text[]) WITH ORDINALITY AS t(b, sh, ah, n) ORDER BY n""",
                      (bodies, stripe_headers, adyen_headers)).fetchall()
    valid = 0
    for n, adyen_reply, stripe_reply, server_accepts in rows:
        body = bodies[n - 1]
        parsed = not stripe_reply.startswith("malformed JSON")
        assert adyen_reply is not None and stripe_reply is not None
        assert (not adyen_reply.startswith("malformed JSON")) == parsed, (body, adyen_reply, stripe_reply)
        assert parsed == (server_accepts and max_nesting(body) <= 64), (body, stripe_reply, server_accepts)
        valid += parsed
    assert 200 < valid < len(bodies) - 200     # both kinds are well represented
