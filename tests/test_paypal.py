"""PayPal end to end through the HTTPS PayPal double: OAuth token sharing and
refresh, orders as payment links with exact amounts, the capture step,
PayPal's error shapes, webhook verification (certificate fetched and
cached, or online) and an adversarial intake run checked against a model."""

import base64
import copy
import json
import os
import random
import shutil
import tempfile
import threading
import time

import pytest
from psycopg import errors

from doubles.paypal_double import PayPalDouble, _Signer, make_signing_cert, signed_message
from gateways import deliver, payment
from intake_model import Model, transitions

CLIENT_ID = "AXcrmpayTestClientId0123456789"
CLIENT_SECRET = "ECcrmpayTestClientSecret0123456789"
WEBHOOK_ID = "8PT597110X687430LKGECATA"


@pytest.fixture(scope="module")
def paypal(tls):
    double = PayPalDouble({CLIENT_ID: CLIENT_SECRET}, WEBHOOK_ID, tls["ca_cert"],
                          os.path.join(os.path.dirname(tls["ca_cert"]), "ca.key"),
                          tls["server_cert"], tls["server_key"])
    double.start()
    yield double
    double.stop()


def add_paypal_account(conn, base, name="pp", secret=CLIENT_SECRET, **settings):
    merged = {"api_base": base, "return_url": "https://shop.example/paid",
              "cancel_url": "https://shop.example/cart"}
    merged.update(settings)
    conn.execute("SELECT crmpay.add_account(%s, 'paypal', %s::jsonb, %s, %s::jsonb)",
                 (name, json.dumps({"client_id": CLIENT_ID, "client_secret": secret}),
                  json.dumps({"webhook_id": WEBHOOK_ID}), json.dumps(merged)))


@pytest.fixture
def shop(db, paypal, db_name):
    paypal.reset()
    paypal.configure(expires_in=32400, latency=0)
    # the double serves its signing certificate on 127.0.0.1
    db.execute(f"ALTER DATABASE {db_name} SET crmpay.paypal_cert_hosts = '127.0.0.1'")
    db.execute("SET crmpay.paypal_cert_hosts = '127.0.0.1'")
    add_paypal_account(db, paypal.base_url)
    return db


def create_link(conn, order_ref, amount="19.99", currency="EUR", account="pp", **kw):
    cur = conn.execute(
        "SELECT * FROM crmpay.create_payment_link(%s, %s, %s::numeric, %s, %s, %s)",
        (account, order_ref, amount, currency, kw.get("email"), kw.get("description")))
    return dict(zip([c.name for c in cur.description], cur.fetchone()))


def capture(conn, payment_id):
    cur = conn.execute("SELECT * FROM crmpay.capture_payment(%s)", (payment_id,))
    return dict(zip([c.name for c in cur.description], cur.fetchone()))


def order_requests(double):
    return [r for r in double.requests() if r["path"] == "/v2/checkout/orders"]


def test_order_link_approve_capture_paid(shop, paypal):
    row = create_link(shop, "ORD-1", "19.99", "EUR", email="ana@example.com",
                      description="Two hats")
    assert row["status"] == "open"
    assert row["url"] == "%s/checkoutnow?token=%s" % (paypal.base_url, row["gateway_ref"])
    sent = order_requests(paypal)
    assert len(sent) == 1
    req = sent[0]
    assert req["headers"]["PayPal-Request-Id"] == row["idempotency_key"]
    assert req["headers"]["Authorization"].startswith("Bearer ")
    body = json.loads(req["body"])
    assert body["intent"] == "CAPTURE"
    unit = body["purchase_units"][0]
    assert unit["amount"] == {"currency_code": "EUR", "value": "19.99"}
    assert unit["custom_id"] == unit["reference_id"] == "ORD-1"
    assert unit["description"] == "Two hats"
    assert body["payer"] == {"email_address": "ana@example.com"}
    assert body["application_context"]["return_url"] == "https://shop.example/paid"
    assert body["application_context"]["cancel_url"] == "https://shop.example/cart"

    # the buyer approves: the APPROVED webhook marks it processing and makes a capture due
    approved = paypal.approve(row["gateway_ref"])
    assert deliver(shop, "pp", approved) == [(200, "", "applied", approved["event_id"])]
    assert payment(shop, "pp", "ORD-1")["status"] == "processing"
    assert shop.execute("SELECT follow_up FROM crmpay.events WHERE event_key = %s",
                        (approved["event_id"],)).fetchone() == ("capture",)
    # a redelivery is a duplicate and makes no second capture due
    assert deliver(shop, "pp", approved)[0][2] == "duplicate"
    assert shop.execute("SELECT count(*) FROM crmpay.events WHERE follow_up IS NOT NULL"
                        ).fetchone() == (1,)
    # the capture is queued for the worker; with none running (this cluster
    # has no crmpay.database) it waits, and capture_payment works meanwhile
    assert shop.execute("SELECT kind, state, payment_id FROM crmpay.jobs").fetchall() == [
        ("capture", "queued", row["id"])]

    paid = capture(shop, row["id"])
    assert paid["status"] == "paid" and paid["paid_at"] is not None
    order = paypal.order(row["gateway_ref"])
    assert paid["gateway_payment_ref"] == order["purchase_units"][0]["payments"]["captures"][0]["id"]
    cap_req = [r for r in paypal.requests() if r["path"].endswith("/capture")]
    assert len(cap_req) == 1
    assert cap_req[0]["headers"]["PayPal-Request-Id"] == row["idempotency_key"] + "-capture"
    # capturing again changes nothing and calls nobody
    assert capture(shop, row["id"])["status"] == "paid"
    assert len([r for r in paypal.requests() if r["path"].endswith("/capture")]) == 1

    # PayPal's own PAYMENT.CAPTURE.COMPLETED arrives later: verified, nothing more to do
    completed = [d for d in paypal.deliveries() if d["type"] == "PAYMENT.CAPTURE.COMPLETED"]
    assert len(completed) == 1
    assert deliver(shop, "pp", completed[0])[0][:3] == (200, "", "ignored")
    assert paypal.stats()["tokens_issued"] == 1       # one token, shared by every call
    assert paypal.stats()["cert_fetches"] == 1         # the certificate is cached


def test_a_payment_changed_while_its_capture_is_queued_still_moves(shop, paypal):
    """Between finding the approved order's payment and writing its move,
    the intake queues the capture job; a CRM trigger on crmpay.jobs that
    updates the payment makes the found row version stale, and the move is
    then written by the SQL statement on the latest version
    (intake_direct.c), keeping the trigger's change."""
    row = create_link(shop, "ORD-J")
    shop.execute("""CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN UPDATE crmpay.payments SET description = 'touched' WHERE id = NEW.payment_id;
                          RETURN NULL; END $$""")
    shop.execute("CREATE TRIGGER touch AFTER INSERT ON crmpay.jobs FOR EACH ROW EXECUTE FUNCTION public.touch()")
    approved = paypal.approve(row["gateway_ref"])
    assert deliver(shop, "pp", approved)[0][2] == "applied"
    after = payment(shop, "pp", "ORD-J")
    assert (after["status"], after["description"]) == ("processing", "touched")
    assert shop.execute("SELECT old_status, new_status, follow_up FROM crmpay.events WHERE event_key = %s",
                        (approved["event_id"],)).fetchone() == ("open", "processing", "capture")


def test_capture_completed_webhook_settles_without_capture_call(shop, paypal):
    """If PayPal's capture webhook arrives first (capture made elsewhere), it settles."""
    row = create_link(shop, "ORD-2", "5.00", "USD")
    paypal.approve(row["gateway_ref"])
    # captured outside this database's view (say, in the dashboard): only the webhook tells
    capture(shop, row["id"])
    shop.execute("UPDATE crmpay.payments SET status = 'processing', paid_at = NULL,"
                 " gateway_payment_ref = NULL WHERE id = %s", (row["id"],))
    completed = [d for d in paypal.deliveries() if d["type"] == "PAYMENT.CAPTURE.COMPLETED"][0]
    assert deliver(shop, "pp", completed)[0][2] == "applied"
    p = payment(shop, "pp", "ORD-2")
    assert p["status"] == "paid"
    assert p["gateway_payment_ref"] == json.loads(completed["body"])["resource"]["id"]


@pytest.mark.parametrize("outcome,status,event", [("declined", "failed", "PAYMENT.CAPTURE.DENIED"),
                                                  ("pending", "processing", "PAYMENT.CAPTURE.PENDING")])
def test_capture_declined_or_pending(shop, paypal, outcome, status, event):
    row = create_link(shop, "ORD-" + outcome, "42.00", "GBP")
    deliver(shop, "pp", paypal.approve(row["gateway_ref"], capture=outcome))
    assert capture(shop, row["id"])["status"] == status
    sent = [d for d in paypal.deliveries() if d["type"] == event]
    assert len(sent) == 1
    assert deliver(shop, "pp", sent[0])[0][0] == 200


@pytest.mark.parametrize("amount,currency,value", [
    ("500", "JPY", "500"), ("1500", "HUF", "1500"), ("12000", "TWD", "12000"),
    ("0.01", "USD", "0.01"), ("1234567.89", "EUR", "1234567.89"), ("1.10", "CHF", "1.10"),
    ("99999999.99", "USD", "99999999.99")])
def test_amounts_are_exact_decimal_strings(shop, paypal, amount, currency, value):
    row = create_link(shop, "AMT-%s-%s" % (currency, amount), amount, currency)
    body = json.loads(order_requests(paypal)[-1]["body"])
    assert body["purchase_units"][0]["amount"] == {"currency_code": currency, "value": value}
    assert row["currency"] == currency


def test_refused_currencies_make_no_call(shop, paypal):
    before = paypal.stats()["requests_total"]
    for amount, currency, message in [("1.234", "KWD", "PayPal does not accept currency KWD"),
                                      ("1500.50", "HUF", "PayPal cannot charge HUF amounts"),
                                      ("10.01", "TWD", "PayPal cannot charge TWD amounts")]:
        with pytest.raises(errors.InvalidParameterValue) as exc:
            create_link(shop, "REF-" + currency, amount, currency)
        assert message in str(exc.value)
    assert paypal.stats()["requests_total"] == before
    assert shop.execute("SELECT count(*) FROM crmpay.payments").fetchone() == (0,)


@pytest.mark.parametrize("mode,error,text", [
    ("500", errors.ConnectionFailure, "INTERNAL_SERVER_ERROR"),
    ("503", errors.ConnectionFailure, "SERVICE_UNAVAILABLE"),
    ("429", errors.ConfigurationLimitExceeded, "RATE_LIMIT_REACHED"),
    ("bad_json", errors.ProtocolViolation, "order id and approve link"),
    ("drop", errors.ConnectionFailure, "")])
def test_gateway_faults_then_retry_makes_one_order(shop, paypal, mode, error, text):
    create_link(shop, "WARM")                  # token in place: the fault hits the order call
    # curl resends a request once when a reused keep-alive connection turns out dead
    drops = 2 if mode == "drop" else 1
    paypal.set_faults(mode, count=drops, path_prefix="/v2/")
    with pytest.raises(error) as exc:
        create_link(shop, "FLT-1")
    assert text in (exc.value.diag.message_detail or "")
    assert payment(shop, "pp", "FLT-1") is None
    row = create_link(shop, "FLT-1")
    assert row["status"] == "open"
    keys = [r["headers"]["PayPal-Request-Id"] for r in order_requests(paypal)]
    assert keys.count(row["idempotency_key"]) == drops + 1      # every retry reused the key


def test_bad_client_secret_is_an_authorization_error_without_secrets(db, paypal):
    paypal.reset()
    add_paypal_account(db, paypal.base_url, secret="ECwrongSecret000000000")
    with pytest.raises(errors.InvalidAuthorizationSpecification) as exc:
        create_link(db, "AUTH-1")
    assert "invalid_client" in exc.value.diag.message_detail
    assert "Client Authentication failed" in exc.value.diag.message_detail
    assert "ECwrongSecret" not in str(exc.value) + (exc.value.diag.message_detail or "")
    assert db.execute("SELECT count(*) FROM crmpay.payments").fetchone() == (0,)


def test_capture_before_approval_shows_paypals_issue(shop, paypal):
    row = create_link(shop, "EARLY-1")
    with pytest.raises(errors.InvalidParameterValue) as exc:
        capture(shop, row["id"])
    assert "HTTP 422, ORDER_NOT_APPROVED" in exc.value.diag.message_detail
    assert "debug_id" in exc.value.diag.message_detail
    assert payment(shop, "pp", "EARLY-1")["status"] == "open"


def test_capture_refusals(shop, paypal):
    shop.execute("SELECT crmpay.add_account('bt', 'braintree', %s::jsonb)",
                 (json.dumps({"merchant_id": "m", "public_key": "p", "private_key": "k"}),))
    shop.execute("INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status,"
                 " idempotency_key) VALUES ('bt', 'b1', 100, 'EUR', 'open', 'k')")
    pid = shop.execute("SELECT id FROM crmpay.payments WHERE order_ref = 'b1'").fetchone()[0]
    with pytest.raises(errors.FeatureNotSupported):
        capture(shop, pid)
    row = create_link(shop, "EXP-1")
    shop.execute("UPDATE crmpay.payments SET status = 'expired' WHERE id = %s", (row["id"],))
    with pytest.raises(errors.ObjectNotInPrerequisiteState):
        capture(shop, row["id"])


def test_token_is_shared_sealed_and_refreshed_before_expiry(shop, paypal):
    paypal.configure(expires_in=2)
    create_link(shop, "TOK-1")
    create_link(shop, "TOK-2")
    assert paypal.stats()["tokens_issued"] == 1
    sealed, refreshes = shop.execute(
        "SELECT token, refresh_count FROM crmpay.oauth_tokens WHERE account = 'pp'").fetchone()
    assert refreshes == 1
    for token_req in [r for r in paypal.requests() if r["path"] == "/v2/checkout/orders"]:
        assert token_req["headers"]["Authorization"] == "Bearer ****"
    issued = list(paypal._tokens)               # the double's own record of the token
    assert issued and issued[0].encode() not in bytes(sealed)
    time.sleep(2.2)
    create_link(shop, "TOK-3")
    assert paypal.stats()["tokens_issued"] == 2
    assert paypal.stats()["auth_failures"] == 0     # refreshed before PayPal refused it


def test_token_refused_by_paypal_is_refreshed_once_and_retried(shop, paypal, pg):
    shop.execute("SET log_min_messages = debug1")
    shop.execute("SET log_statement = 'all'")
    create_link(shop, "R401-1")
    paypal.revoke_tokens()
    row = create_link(shop, "R401-2")
    assert row["status"] == "open"
    stats = paypal.stats()
    assert stats["tokens_issued"] == 2 and stats["auth_failures"] == 1
    assert [r["path"] for r in paypal.requests()][-3:] == [
        "/v2/checkout/orders", "/v1/oauth2/token", "/v2/checkout/orders"]
    # neither token nor client secret ever reaches the server log
    log = pg.server_log()
    assert "R401-2" in log                       # the statements were logged...
    for secret in list(paypal._tokens) + [CLIENT_SECRET]:
        assert secret not in log                 # ...but no secret


def test_new_credentials_drop_the_stored_token(shop, paypal):
    create_link(shop, "CRED-1")
    assert shop.execute("SELECT count(*) FROM crmpay.oauth_tokens").fetchone() == (1,)
    shop.execute("SELECT crmpay.update_account('pp', %s::jsonb)",
                 (json.dumps({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}),))
    assert shop.execute("SELECT count(*) FROM crmpay.oauth_tokens").fetchone() == (0,)


def test_concurrent_sessions_fetch_one_token(shop, paypal, pg, db_name):
    paypal.configure(latency=0.2)
    conns = [pg.connect(db_name) for _ in range(4)]
    errs = []

    def work(i):
        try:
            create_link(conns[i], "CONC-%d" % i)
        except Exception as exc:  # pragma: no cover - reported below
            errs.append(exc)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for c in conns:
        c.close()
    assert not errs
    assert paypal.stats()["tokens_issued"] == 1
    assert shop.execute("SELECT count(*) FROM crmpay.payments").fetchone() == (4,)


def test_certificate_host_must_be_allowed(shop, paypal, db_name):
    row = create_link(shop, "HOST-1")
    approved = paypal.approve(row["gateway_ref"])
    shop.execute(f"ALTER DATABASE {db_name} RESET crmpay.paypal_cert_hosts")
    shop.execute("RESET crmpay.paypal_cert_hosts")
    assert deliver(shop, "pp", approved) == [(400, "PAYPAL-CERT-URL is not on a PayPal host",
                                              "rejected", None)]
    assert paypal.stats()["cert_fetches"] == 0
    assert payment(shop, "pp", "HOST-1")["status"] == "open"


def test_online_verification(shop, paypal):
    shop.execute("SELECT crmpay.update_account('pp', settings => %s::jsonb)",
                  (json.dumps({"api_base": paypal.base_url, "return_url": "https://shop.example/paid",
                               "cancel_url": "https://shop.example/cart",
                               "webhook_verification": "online"}),))
    row = create_link(shop, "ONL-1")
    approved = paypal.approve(row["gateway_ref"])
    forged = copy.deepcopy(approved)
    forged["body"] = forged["body"].replace('"APPROVED"', '"COMPLETED"', 1)
    assert deliver(shop, "pp", forged)[0][:3] == (
        400, "PayPal's verify-webhook-signature answered FAILURE", "rejected")
    assert deliver(shop, "pp", approved)[0][2] == "applied"
    assert paypal.stats()["verify_calls"] == 2
    assert paypal.stats()["cert_fetches"] == 0


# --------------------------------------------------------------------------
# Adversarial intake: >= 1000 generated deliveries against a model of the rules
# --------------------------------------------------------------------------

def test_adversarial_paypal_intake(shop, paypal):
    rng = random.Random(20240501)
    decimals = {"EUR": 2, "USD": 2, "JPY": 0}
    payments = {}
    for i in range(12):
        cur = ["EUR", "USD", "JPY"][i % 3]
        amount = rng.randint(1, 500000) if cur != "JPY" else rng.randint(1, 90000)
        value = ("%d.%02d" % divmod(amount, 100)) if decimals[cur] else str(amount)
        row = create_link(shop, "ADV-%d" % i, value, cur)
        payments[row["gateway_ref"]] = {"status": "open", "amount": amount, "currency": cur,
                                        "order_ref": row["order_ref"]}
    model = Model(transitions(shop), payments)
    # a key of the right shape (its certificate even chains to the CA), but not PayPal's
    tmp = tempfile.mkdtemp(prefix="crmpay-pp-wrong-")
    try:
        wrong_signer = _Signer(make_signing_cert(tmp, paypal.ca_cert, paypal.ca_key)[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def value_of(amount, cur):
        return ("%d.%02d" % divmod(amount, 100)) if decimals[cur] else str(amount)

    def make_event(kind, order_id):
        p = payments.get(order_id)
        cur = p["currency"] if p else "EUR"
        amount = p["amount"] if p else 1000
        if rng.random() < 0.1:
            amount += 1                         # money facts that do not match
        amt = {"currency_code": cur, "value": value_of(amount, cur)}
        if kind == "CHECKOUT.ORDER.APPROVED":
            resource = {"id": order_id, "status": "APPROVED", "intent": "CAPTURE",
                        "purchase_units": [{"reference_id": "x", "amount": amt}]}
            status = "processing"
        else:
            resource = {"id": "CAP%08d" % rng.randint(0, 10 ** 8), "status": "X", "amount": amt,
                        "supplementary_data": {"related_ids": {"order_id": order_id}}}
            status = {"PAYMENT.CAPTURE.COMPLETED": "paid", "PAYMENT.CAPTURE.DENIED": "failed",
                      "PAYMENT.CAPTURE.PENDING": "processing",
                      "PAYMENT.CAPTURE.REFUNDED": None}[kind]
        ev = paypal.event(kind, resource, "x", "x")
        if kind == "PAYMENT.CAPTURE.DENIED" or status is None:
            return ev, status, None, None
        return ev, status, amount, cur

    order_ids = list(payments) + ["UNKNOWN%03d" % i for i in range(4)]
    kinds = ["CHECKOUT.ORDER.APPROVED", "PAYMENT.CAPTURE.COMPLETED", "PAYMENT.CAPTURE.DENIED",
             "PAYMENT.CAPTURE.PENDING", "PAYMENT.CAPTURE.REFUNDED"]
    sent = []                                   # authentic deliveries, for replays
    counts = {}
    n = 0
    while n < 1100:
        attack = rng.choice(["valid", "valid", "tamper", "wrong_sig", "missing_header",
                             "wrong_key", "truncated", "bad_base64", "replay", "duplicate",
                             "stale", "bad_json", "wrong_webhook_id", "oversized"])
        if attack == "oversized" and counts.get("oversized", 0) >= 3:
            continue
        counts[attack] = counts.get(attack, 0) + 1
        n += 1
        order_id = rng.choice(order_ids)
        ev, status, amount, cur = make_event(rng.choice(kinds), order_id)
        body = json.dumps(ev, separators=(",", ":"))
        headers = paypal.sign(body)
        authentic = True
        http = 200
        key = ev["id"]
        if attack == "tamper":
            body = body.replace('"event_version":"1.0"', '"event_version":"1.1"', 1)
            authentic = False
        elif attack == "wrong_sig":
            other = paypal.sign(body + " ")
            headers["Paypal-Transmission-Sig"] = other["Paypal-Transmission-Sig"]
            authentic = False
        elif attack == "missing_header":
            del headers[rng.choice(["Paypal-Transmission-Id", "Paypal-Transmission-Time",
                                    "Paypal-Transmission-Sig"])]
            authentic = False
        elif attack == "wrong_key":
            msg = signed_message(headers["Paypal-Transmission-Id"],
                                 headers["Paypal-Transmission-Time"], WEBHOOK_ID, body)
            headers["Paypal-Transmission-Sig"] = base64.b64encode(
                wrong_signer.sign(msg.encode())).decode()
            authentic = False
        elif attack == "truncated":
            body = body[:rng.randint(1, len(body) - 1)]
            authentic = False
        elif attack == "bad_base64":
            sig = headers["Paypal-Transmission-Sig"]
            pos = rng.randint(0, len(sig) - 3)
            headers["Paypal-Transmission-Sig"] = sig[:pos] + rng.choice("*!-_ ") + sig[pos + 1:]
            authentic = False
        elif attack == "stale":
            headers = paypal.sign(body, transmission_time="2020-01-01T00:00:00Z")
            authentic = False
        elif attack == "wrong_webhook_id":
            headers = paypal.sign(body, webhook_id="WH-SOMEONE-ELSE")
            authentic = False
        elif attack == "bad_json":
            body = body[:-1] + ",}"
            headers = paypal.sign(body)
            authentic = None                    # authentic but unreadable: rejected
            http = 400
        elif attack == "oversized":
            body = body[:-1] + ',"pad":"' + "x" * (1024 * 1024) + '"}'
            headers = paypal.sign(body)
            authentic = None
            http = 413
        elif attack in ("replay", "duplicate") and sent:
            old = rng.choice(sent)
            body, key, status, amount, cur, order_id, headers = old
            # a replay is re-signed now (PayPal's resend), a duplicate is the same delivery again
            if attack == "replay":
                headers = paypal.sign(body)
        rows = deliver(shop, "pp", {"headers": headers, "body": body})
        assert len(rows) == 1
        status_code, reply, outcome, event_id = rows[0]
        if authentic is None:
            assert (status_code, outcome) == (http, "rejected"), (attack, reply)
            continue
        expected = model.expect(authentic, key, status, order_id, amount, cur)
        assert outcome == expected, (attack, reply, key)
        if authentic:
            assert status_code == 200 and event_id == key
            sent.append((body, key, status, amount, cur, order_id, headers))
        else:
            assert status_code == 400 and reply

    assert n >= 1000 and counts.get("oversized") == 3
    rows = shop.execute("SELECT gateway_ref, status FROM crmpay.payments WHERE account = 'pp'"
                        ).fetchall()
    assert {r[0]: r[1] for r in rows} == {k: v["status"] for k, v in payments.items()}
    total, rejected = shop.execute(
        "SELECT count(*), count(*) FILTER (WHERE outcome = 'rejected') FROM crmpay.events").fetchone()
    assert total == n and rejected > 500
    assert shop.execute("SELECT count(*) FROM crmpay.events WHERE outcome = 'rejected'"
                        " AND (reason IS NULL OR event_key IS NOT NULL)").fetchone() == (0,)
    assert paypal.stats()["cert_fetches"] == 1
