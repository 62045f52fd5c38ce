"""Redsys end to end through the HTTPS Redsys double: the signed redirect
form (crmpay.payment_form posted to /sis/realizarPago), Paygold links
(trataPeticionREST), notifications into crmpay.receive_webhook, every way
the gateway refuses, an adversarial intake run checked against a model of
the rules, and redsys-easy (npm) as an independent signature oracle."""

import base64
import datetime
import json
import random
import shutil
import ssl
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from doubles import redsys_double as rd
from doubles.redsys_double import RedsysDouble
from gateways import deliver, payment

KEY = "sq7HjrUOBfKmC576ILgskD5srU870gJ7"        # Redsys' public test key
KEY2 = "Mk9m98IfEblmPfrpsawt7BmxObt98Jev"       # the apiRedsys examples' key
MERCHANT = "999008881"                          # redirect only
PAYGOLD_MERCHANT = "999008882"                  # has Paygold
NODE_DIR = Path(__file__).resolve().parent / "node"


@pytest.fixture(scope="module")
def double(tls):
    d = RedsysDouble(certfile=tls["server_cert"], keyfile=tls["server_key"])
    d.add_merchant(MERCHANT, KEY, terminals=("1", "2"))
    d.add_merchant(PAYGOLD_MERCHANT, KEY2, terminals=("1",), paygold=True)
    d.start()
    yield d
    d.stop()


def add_account(conn, name, base_url, merchant=MERCHANT, key=KEY, terminal="1", **settings):
    merged = {"api_base": base_url, "merchant_code": merchant, "terminal": terminal,
              "notification_url": "https://crm.example/redsys/" + name,
              "url_ok": "https://shop.example/ok", "url_ko": "https://shop.example/ko"}
    merged.update(settings)
    conn.execute("SELECT crmpay.add_account(%s, 'redsys', %s::jsonb, NULL, %s::jsonb)",
                 (name, json.dumps({"merchant_key": key}), json.dumps(merged)))


@pytest.fixture
def shop(db, double):
    """Accounts 'rs' (redirect form) and 'pg' (Paygold, links valid 60 min)."""
    double.reset()
    add_account(db, "rs", double.base_url)
    add_account(db, "pg", double.base_url, merchant=PAYGOLD_MERCHANT, key=KEY2,
                paygold=True, paygold_expiry_minutes="60")
    return db


def create_link(conn, account, order_ref, amount="19.99", currency="EUR", email=None,
                description=None):
    cur = conn.execute("SELECT * FROM crmpay.create_payment_link(%s, %s, %s::numeric, %s, %s, %s)",
                       (account, order_ref, amount, currency, email, description))
    return dict(zip([c.name for c in cur.description], cur.fetchone()))


def payment_form(conn, payment_id):
    cur = conn.execute("SELECT * FROM crmpay.payment_form(%s)", (payment_id,))
    return dict(zip([c.name for c in cur.description], cur.fetchone()))


def post_form(tls, form, fields=None):
    """The customer's browser posting the form to Redsys."""
    data = {k: form[k] for k in ("signature_version", "merchant_parameters", "signature")}
    body = urllib.parse.urlencode({"Ds_SignatureVersion": data["signature_version"],
                                   "Ds_MerchantParameters": data["merchant_parameters"],
                                   "Ds_Signature": data["signature"], **(fields or {})}).encode()
    ctx = ssl.create_default_context(cafile=tls["ca_cert"])
    req = urllib.request.Request(form["action"], data=body, method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        return resp.status, resp.read().decode()


def decoded(params_text):
    return json.loads(rd.decode_b64(params_text))


def rest_requests(double):
    return double.requests(path_prefix=rd.REST_PATH)


# --------------------------------------------------------------------------
# The redirect form
# --------------------------------------------------------------------------

def test_redirect_form_flow_end_to_end(shop, double, tls):
    row = create_link(shop, "rs", "ORD-1", "19.99", "eur", "ana@example.com", "Dos sombreros")
    assert row["status"] == "open" and row["url"] is None
    assert row["amount_minor"] == 1999 and row["currency"] == "EUR"
    order = row["gateway_ref"]
    assert len(order) == 12 and order.isdigit()
    assert double.stats()["requests"] == 0          # no gateway call to make a form link

    form = payment_form(shop, row["id"])
    assert form["action"] == double.base_url + "/sis/realizarPago"
    assert form["signature_version"] == "HMAC_SHA256_V1"
    params = decoded(form["merchant_parameters"])
    assert params == {
        "DS_MERCHANT_AMOUNT": "1999", "DS_MERCHANT_ORDER": order,
        "DS_MERCHANT_MERCHANTCODE": MERCHANT, "DS_MERCHANT_CURRENCY": "978",
        "DS_MERCHANT_TRANSACTIONTYPE": "0", "DS_MERCHANT_TERMINAL": "1",
        "DS_MERCHANT_MERCHANTURL": "https://crm.example/redsys/rs",
        "DS_MERCHANT_URLOK": "https://shop.example/ok", "DS_MERCHANT_URLKO": "https://shop.example/ko",
        "DS_MERCHANT_PRODUCTDESCRIPTION": "Dos sombreros", "DS_MERCHANT_MERCHANTDATA": "ORD-1"}
    # the signature, recomputed independently (openssl 3DES + Python HMAC)
    assert form["signature"] == rd.signature(KEY, order, form["merchant_parameters"])
    assert 'name="Ds_MerchantParameters" value="%s"' % form["merchant_parameters"] in form["html"]

    status, page = post_form(tls, form)
    assert status == 200 and "RSisException" not in page and order in page and "19,99" in page
    seen = double.get_order(MERCHANT, order)
    assert (seen["amount"], seen["currency"], seen["merchant_url"]) == ("1999", "978", "https://crm.example/redsys/rs")

    # declined first: failed; the customer tries again with the same form
    denied = double.pay(order, "denied")
    assert [r[:3] for r in deliver(shop, "rs", denied["deliveries"][0])] == [(200, "", "applied")]
    assert payment(shop, "rs", "ORD-1")["status"] == "failed"
    status, page = post_form(tls, payment_form(shop, row["id"]))
    assert status == 200 and "RSisException" not in page

    paid = double.pay(order, "authorised")
    note = paid["deliveries"][0]
    assert note["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert [r[:3] for r in deliver(shop, "rs", note)] == [(200, "", "applied")]
    after = payment(shop, "rs", "ORD-1")
    assert after["status"] == "paid" and after["paid_at"] is not None
    assert after["gateway_payment_ref"] == "%s/%s" % (order, note["params"]["Ds_AuthorisationCode"])
    # Redsys (or anyone) sending it again changes nothing
    assert [r[2] for r in deliver(shop, "rs", note)] == ["duplicate"]

    # the form is not offered any more, and an old one is refused by Redsys
    with pytest.raises(errors.ObjectNotInPrerequisiteState):
        payment_form(shop, row["id"])
    status, page = post_form(tls, form)
    assert "RSisException" in page and "<!--SIS0051:-->" in page

    # refunds from the Redsys back office: partial, then the rest
    for amount, expected in ((500, ("partially_refunded", 500)), (None, ("refunded", 1999))):
        refund = double.refund(order, amount)
        assert [r[2] for r in deliver(shop, "rs", refund["deliveries"][0])] == ["applied"]
        assert [r[2] for r in deliver(shop, "rs", refund["deliveries"][0])] == ["duplicate"]
        after = payment(shop, "rs", "ORD-1")
        assert (after["status"], after["refunded_minor"]) == expected


def test_redsys_refuses_tampered_and_misconfigured_forms(shop, double, tls, db):
    row = create_link(shop, "rs", "ORD-T", "10.00")
    form = payment_form(shop, row["id"])
    params = decoded(form["merchant_parameters"])
    params["DS_MERCHANT_AMOUNT"] = "1"
    tampered = dict(form, merchant_parameters=base64.b64encode(json.dumps(params).encode()).decode())
    status, page = post_form(tls, tampered)
    assert status == 200 and "RSisException" in page and "<!--SIS0042:-->" in page

    # the account's key is not the terminal's: Redsys refuses the signature
    shop.execute("""SELECT crmpay.update_account('rs', %s::jsonb)""", (json.dumps({"merchant_key": KEY2}),))
    status, page = post_form(tls, payment_form(shop, row["id"]))
    assert "<!--SIS0042:-->" in page
    # an unknown merchant code or terminal
    add_account(shop, "nobody", double.base_url, merchant="999999999")
    other = create_link(shop, "nobody", "ORD-X", "1.00")
    status, page = post_form(tls, payment_form(shop, other["id"]))
    assert "<!--SIS0026:-->" in page
    add_account(shop, "t9", double.base_url, terminal="9")
    other = create_link(shop, "t9", "ORD-X", "1.00")
    status, page = post_form(tls, payment_form(shop, other["id"]))
    assert "<!--SIS0026:-->" in page
    assert double.stats()["errors"] == 4


def test_order_numbers_are_fixed_per_order_and_unique_per_merchant(shop, double):
    add_account(shop, "rs2", double.base_url, terminal="2")
    refs = {}
    for account in ("rs", "rs2"):
        for i in range(150):
            row = create_link(shop, account, "ORD-%d" % i, "1.00")
            refs[(account, i)] = row["gateway_ref"]
    assert len(set(refs.values())) == 300
    assert all(len(r) == 12 and r.isdigit() for r in refs.values())
    # same order again: same number, even after the row is gone (a rolled-back attempt)
    with shop.transaction():
        first = create_link(shop, "rs", "ORD-ROLLBACK", "1.00")["gateway_ref"]
        raise psycopg.Rollback()
    assert payment(shop, "rs", "ORD-ROLLBACK") is None
    again = create_link(shop, "rs", "ORD-ROLLBACK", "1.00")["gateway_ref"]
    assert again == first


# --------------------------------------------------------------------------
# Paygold
# --------------------------------------------------------------------------

def test_paygold_link(shop, double):
    before = datetime.datetime.now(datetime.timezone.utc)
    row = create_link(shop, "pg", "PG-1", "19.99", "EUR", "ana@example.com", "Factura 7")
    assert row["status"] == "open"
    assert row["url"].startswith(double.base_url + "/sis/p2f?t=")
    assert before + datetime.timedelta(minutes=59) < row["expires_at"] < before + datetime.timedelta(minutes=61)

    sent = rest_requests(double)
    assert len(sent) == 1
    req = sent[0]
    assert req["method"] == "POST" and req["headers"]["Content-Type"] == "application/json"
    body = json.loads(req["body"])
    assert set(body) == {"Ds_SignatureVersion", "Ds_MerchantParameters", "Ds_Signature"}
    params = decoded(body["Ds_MerchantParameters"])
    assert params == {
        "DS_MERCHANT_AMOUNT": "1999", "DS_MERCHANT_ORDER": row["gateway_ref"],
        "DS_MERCHANT_MERCHANTCODE": PAYGOLD_MERCHANT, "DS_MERCHANT_CURRENCY": "978",
        "DS_MERCHANT_TRANSACTIONTYPE": "F", "DS_MERCHANT_TERMINAL": "1",
        "DS_MERCHANT_MERCHANTURL": "https://crm.example/redsys/pg",
        "DS_MERCHANT_URLOK": "https://shop.example/ok", "DS_MERCHANT_URLKO": "https://shop.example/ko",
        "DS_MERCHANT_PRODUCTDESCRIPTION": "Factura 7", "DS_MERCHANT_MERCHANTDATA": "PG-1",
        "DS_MERCHANT_CUSTOMER_MAIL": "ana@example.com", "DS_MERCHANT_P2F_EXPIRYDATE": "60"}
    assert body["Ds_Signature"] == rd.signature(KEY2, row["gateway_ref"], body["Ds_MerchantParameters"])

    # the same order again: the stored link, no second request
    assert create_link(shop, "pg", "PG-1", "19.99")["url"] == row["url"]
    assert len(rest_requests(double)) == 1
    # its link is a Paygold one: no redirect form for it
    with pytest.raises(errors.ObjectNotInPrerequisiteState):
        payment_form(shop, row["id"])

    paid = double.pay(row["gateway_ref"], "authorised")
    assert paid["deliveries"][0]["params"]["Ds_TransactionType"] == "F"
    assert [r[2] for r in deliver(shop, "pg", paid["deliveries"][0])] == ["applied"]
    assert payment(shop, "pg", "PG-1")["status"] == "paid"


def test_paygold_amounts_and_currencies(shop, double):
    row = create_link(shop, "pg", "PG-JPY", "500", "JPY")
    params = decoded(json.loads(rest_requests(double)[-1]["body"])["Ds_MerchantParameters"])
    assert (params["DS_MERCHANT_AMOUNT"], params["DS_MERCHANT_CURRENCY"]) == ("500", "392")
    assert row["amount_minor"] == 500
    paid = double.pay(row["gateway_ref"])
    assert paid["deliveries"][0]["params"]["Ds_Amount"] == "500"
    assert [r[2] for r in deliver(shop, "pg", paid["deliveries"][0])] == ["applied"]

    requests_before = len(rest_requests(double))
    with pytest.raises(errors.InvalidParameterValue) as exc:
        create_link(shop, "pg", "PG-KWD", "1.234", "KWD")
    assert "Redsys does not accept currency KWD" in str(exc.value)
    assert "three" in exc.value.diag.message_detail
    with pytest.raises(errors.NumericValueOutOfRange):
        create_link(shop, "pg", "PG-BIG", "10000000000.00", "EUR")
    assert len(rest_requests(double)) == requests_before
    # CHF is a Redsys currency, but this terminal does not take it: SIS0027
    with pytest.raises(errors.InvalidParameterValue) as exc:
        create_link(shop, "pg", "PG-CHF", "5.00", "CHF")
    assert "SIS0027" in exc.value.diag.message_detail
    assert shop.execute("SELECT count(*) FROM crmpay.payments WHERE order_ref IN ('PG-KWD', 'PG-BIG', 'PG-CHF')").fetchone()[0] == 0


def test_paygold_gateway_refusals(shop, double):
    # wrong key: SIS0042, reported as refused credentials, nothing written
    add_account(shop, "pg-badkey", double.base_url, merchant=PAYGOLD_MERCHANT, key=KEY, paygold=True)
    with pytest.raises(errors.InvalidAuthorizationSpecification) as exc:
        create_link(shop, "pg-badkey", "PG-2", "1.00")
    assert exc.value.diag.message_detail.startswith("HTTP 200, SIS0042: Redsys error SIS0042")
    assert KEY not in str(exc.value) and KEY not in (exc.value.diag.message_detail or "")
    # unknown merchant
    add_account(shop, "pg-nobody", double.base_url, merchant="999999999", key=KEY2, paygold=True)
    with pytest.raises(errors.InvalidAuthorizationSpecification) as exc:
        create_link(shop, "pg-nobody", "PG-2", "1.00")
    assert "SIS0026" in exc.value.diag.message_detail
    # Paygold not enabled on the terminal
    add_account(shop, "rs-pg", double.base_url, paygold=True)
    with pytest.raises(errors.InvalidParameterValue) as exc:
        create_link(shop, "rs-pg", "PG-2", "1.00")
    assert "SIS0030" in exc.value.diag.message_detail
    assert shop.execute("SELECT count(*) FROM crmpay.payments").fetchone()[0] == 0


def test_paygold_retries_reuse_the_order_number(shop, double):
    # a 503 and an unreadable answer: retryable errors, the retry reuses the number
    double.set_faults("503", 1)
    with pytest.raises(errors.ConnectionFailure):
        create_link(shop, "pg", "PG-R", "2.00")
    double.set_faults("bad_json", 1)
    with pytest.raises(errors.ProtocolViolation):
        create_link(shop, "pg", "PG-R", "2.00")
    # bad_json: Redsys did register the order, so the next attempt is a repeat
    with pytest.raises(errors.InvalidParameterValue) as exc:
        create_link(shop, "pg", "PG-R", "2.00")
    assert "SIS0051" in exc.value.diag.message_detail
    assert "may already have created" in exc.value.diag.message_detail
    orders = {decoded(json.loads(r["body"])["Ds_MerchantParameters"])["DS_MERCHANT_ORDER"]
              for r in rest_requests(double)}
    assert len(orders) == 1 and len(rest_requests(double)) == 3

    # a dropped connection after Redsys created the link: libcurl may resend
    # at once on a reused connection, crmpay's caller may retry; either way
    # the same order number goes out and Redsys refuses the repeat (SIS0051)
    # instead of making a second link
    double.set_faults("drop_after_create", 1)
    with pytest.raises((errors.ConnectionFailure, errors.InvalidParameterValue)):
        create_link(shop, "pg", "PG-D", "2.00")
    with pytest.raises(errors.InvalidParameterValue) as exc:
        create_link(shop, "pg", "PG-D", "2.00")
    assert "SIS0051" in exc.value.diag.message_detail
    d_orders = [decoded(json.loads(r["body"])["Ds_MerchantParameters"])["DS_MERCHANT_ORDER"]
                for r in rest_requests(double)[3:]]
    assert len(d_orders) >= 2 and len(set(d_orders)) == 1
    assert sum(1 for o in double.orders().values() if o["merchant_data"] == "PG-D") == 1
    # a clean first attempt works, with its own number
    row = create_link(shop, "pg", "PG-OK", "2.00")
    assert row["gateway_ref"] not in orders and row["url"]


def test_notification_as_json_and_bad_money(shop, double):
    row = create_link(shop, "rs", "ORD-J", "7.00")
    double.register_order(MERCHANT, row["gateway_ref"], "700", "978")
    note = double.pay(row["gateway_ref"])["deliveries"][0]
    form = dict(urllib.parse.parse_qsl(note["body"]))
    as_json = {"headers": {"Content-Type": "application/json"}, "body": json.dumps(form)}
    # the amount must match the payment's
    wrong = dict(note["params"], Ds_Amount="699", Ds_Hour="23%3A59")
    bad = {"headers": note["headers"], "body": rd.notification_body(KEY, wrong)}
    assert [r[2] for r in deliver(shop, "rs", bad)] == ["ignored"]
    assert [r[2] for r in deliver(shop, "rs", as_json)] == ["applied"]
    assert payment(shop, "rs", "ORD-J")["status"] == "paid"
    reason = shop.execute("SELECT reason FROM crmpay.events WHERE outcome = 'ignored'").fetchone()[0]
    assert reason == "amount mismatch: event says 699 EUR, payment is 700 EUR"


# --------------------------------------------------------------------------
# Adversarial intake, against a model of the rules
# --------------------------------------------------------------------------

TRANSITIONS = {  # crmpay.status_transitions, the edges these events can use
    ("open", "paid"), ("open", "failed"), ("failed", "paid"), ("paid", "partially_refunded"),
    ("paid", "refunded"), ("partially_refunded", "refunded"),
}


class Model:
    """What crmpay must do with each delivery, by the documented rules."""

    def __init__(self, payments):
        self.payments = {p["order"]: dict(p) for p in payments}
        self.applied = set()

    def expect(self, kind, event):
        if kind != "valid":
            return ("rejected", 413 if kind == "oversized" else 400)
        p = self.payments.get(event["Ds_Order"])
        key = event["key"]
        if key in self.applied:
            return ("duplicate", 200)
        if p is None:
            return ("ignored", 200)
        response = int(event["Ds_Response"])
        if event["Ds_TransactionType"] == "3":
            if p["status"] not in ("paid", "partially_refunded"):
                return ("ignored", 200)
            p["refunded"] = min(p["amount"], p["refunded"] + int(event["Ds_Amount"]))  # never above the amount
            new = "refunded" if p["refunded"] >= p["amount"] else "partially_refunded"
            old, p["status"] = p["status"], new
            self.applied.add(key)
            return ("applied", 200)
        new = "paid" if response <= 99 else "failed"
        if new == "paid" and int(event["Ds_Amount"]) != p["amount"]:
            return ("ignored", 200)
        if (p["status"], new) in TRANSITIONS:
            p["status"] = new
            self.applied.add(key)
            return ("applied", 200)
        return ("ignored", 200)


def test_adversarial_intake_matches_the_model(shop, double):
    rng = random.Random(20261126)
    shop.execute("SET crmpay.max_webhook_bytes = '16kB'")
    payments = []
    for i in range(25):
        row = create_link(shop, "rs", "ADV-%d" % i, "%d.%02d" % (rng.randint(1, 300), rng.randint(0, 99)))
        payments.append({"order": row["gateway_ref"], "amount": row["amount_minor"],
                         "status": "open", "refunded": 0})
    model = Model(payments)
    sent = []          # valid events, for replays

    def event(p, kind):
        minute = rng.randint(0, 59)
        if kind == "refund":
            amount = rng.randint(1, max(1, p["amount"] // 2))
            params = {"Ds_Response": "0900", "Ds_TransactionType": "3", "Ds_Amount": str(amount)}
        else:
            ok = kind == "pay"
            amount = p["amount"] if rng.random() < 0.9 else p["amount"] + 1
            params = {"Ds_Response": rng.choice(["0000", "0099"]) if ok else rng.choice(["0190", "9915", "0180"]),
                      "Ds_TransactionType": "0", "Ds_Amount": str(amount)}
        auth = "%06d" % rng.randint(0, 999999) if params["Ds_Response"] in ("0000", "0099", "0900") else ""
        params.update({"Ds_Date": "01%2F02%2F2026", "Ds_Hour": "10%%3A%02d" % minute,
                       "Ds_Currency": "978", "Ds_Order": p["order"], "Ds_MerchantCode": MERCHANT,
                       "Ds_Terminal": "001", "Ds_AuthorisationCode": auth, "Ds_MerchantData": ""})
        params["key"] = "redsys:%s:%s:%s:%s:%s:%s:%s" % (
            p["order"], params["Ds_TransactionType"], params["Ds_Response"], auth,
            params["Ds_Amount"], params["Ds_Date"], params["Ds_Hour"])
        return params

    def body_for(params, key=KEY):
        wire = {k: v for k, v in params.items() if k != "key"}
        return rd.notification_body(key, wire)

    def bad_delivery(kind, params):
        body = body_for(params)
        form = dict(urllib.parse.parse_qsl(body))
        if kind == "tampered":
            p = list(form["Ds_MerchantParameters"])
            i = rng.randrange(len(p) - 4)
            p[i] = "A" if p[i] != "A" else "B"
            form["Ds_MerchantParameters"] = "".join(p)
            return urllib.parse.urlencode(form)
        if kind == "wrong_signature":
            form["Ds_Signature"] = base64.urlsafe_b64encode(rng.randbytes(32)).decode()
            return urllib.parse.urlencode(form)
        if kind == "missing_field":
            del form[rng.choice(list(form))]
            return urllib.parse.urlencode(form)
        if kind == "wrong_version":
            form["Ds_SignatureVersion"] = rng.choice(["HMAC_SHA256_V2", "", "hmac_sha256_v1"])
            return urllib.parse.urlencode(form)
        if kind == "wrong_key":
            return body_for(params, rng.choice([KEY2, "Lk9m98IfEblmPfrpsawt7BmxObt98Jev"]))
        if kind == "truncated":
            return body[:rng.randint(0, len(body) - 4)]
        if kind == "oversized":
            return body + "&pad=" + "x" * (16 * 1024)
        if kind == "bad_utf8":
            raw = json.dumps({k: v for k, v in params.items() if k != "key"}).encode()
            raw = raw.replace(b'"Ds_MerchantData": ""', b'"Ds_MerchantData": "\xff\xfe"')
            text = base64.urlsafe_b64encode(raw).decode()
            sig = rd.signature(KEY, params["Ds_Order"], text, urlsafe=True)
            return urllib.parse.urlencode({"Ds_SignatureVersion": "HMAC_SHA256_V1",
                                           "Ds_MerchantParameters": text, "Ds_Signature": sig})
        if kind == "bad_base64":
            form["Ds_MerchantParameters"] = form["Ds_MerchantParameters"][:10] + "!*" + form["Ds_MerchantParameters"][10:]
            return urllib.parse.urlencode(form)
        if kind == "bad_signature_base64":
            form["Ds_Signature"] = "%%%" + form["Ds_Signature"]
            return "&".join("%s=%s" % kv for kv in form.items())
        if kind == "garbage":
            return rng.choice(["", "{}", "[]", "Ds_Signature", "&&&", "{\"Ds_Signature\": 5}",
                               "%ZZ=1", "x" * rng.randint(1, 300)])
        if kind == "not_a_response":
            wire = dict(params, Ds_Response=rng.choice(["OK", "", "00000", "-1"]))
            return body_for(wire)
        raise AssertionError(kind)

    bad_kinds = ["tampered", "wrong_signature", "missing_field", "wrong_version", "wrong_key",
                 "truncated", "oversized", "bad_utf8", "bad_base64", "bad_signature_base64",
                 "garbage", "not_a_response"]
    plan = []
    for n in range(1400):
        r = rng.random()
        p = rng.choice(payments)
        if r < 0.55:
            kind = rng.choice(bad_kinds)
            plan.append((kind, bad_delivery(kind, event(p, rng.choice(["pay", "fail"]))), None))
        elif r < 0.65 and sent:
            params = rng.choice(sent)                       # replays, duplicates, out of order
            plan.append(("valid", body_for(params), params))
        elif r < 0.70:
            unknown = dict(p, order="%012d" % rng.randint(0, 10**12 - 1))
            params = event(unknown, "pay")                  # an order crmpay never made
            plan.append(("valid", body_for(params), params))
        else:
            params = event(p, rng.choice(["pay", "pay", "fail", "fail", "refund"]))
            sent.append(params)
            plan.append(("valid", body_for(params), params))

    counts = {}
    headers = json.dumps({"Content-Type": "application/x-www-form-urlencoded"})
    for kind, body, params in plan:
        expected = model.expect(kind, params)
        row = shop.execute("SELECT http_status, outcome FROM crmpay.receive_webhook('rs', %s, %s)",
                           (headers, body)).fetchall()
        assert row == [(expected[1], expected[0])], (kind, body[:200], params)
        counts[kind] = counts.get(kind, 0) + 1
    assert sum(v for k, v in counts.items() if k != "valid") >= 700
    assert len(plan) >= 1000

    # the payments table is what the model predicts
    rows = shop.execute("SELECT gateway_ref, status, refunded_minor FROM crmpay.payments WHERE account = 'rs'").fetchall()
    assert {r[0]: (r[1], r[2]) for r in rows} == {
        o: (p["status"], p["refunded"]) for o, p in model.payments.items()}
    # every delivery was recorded, rejected ones with a reason
    assert shop.execute("SELECT count(*) FROM crmpay.events").fetchone()[0] == len(plan)
    assert shop.execute("SELECT count(*) FROM crmpay.events WHERE outcome = 'rejected' AND reason IS NULL").fetchone()[0] == 0
    # and the run went through every rule: each outcome, each status change
    outcomes = dict(shop.execute("SELECT outcome, count(*) FROM crmpay.events GROUP BY 1").fetchall())
    assert set(outcomes) == {"applied", "duplicate", "ignored", "rejected"}
    moves = {tuple(r) for r in shop.execute(
        "SELECT DISTINCT old_status, new_status FROM crmpay.events WHERE outcome = 'applied'")}
    assert {("open", "failed"), ("failed", "paid"), ("open", "paid"), ("paid", "partially_refunded"),
            ("partially_refunded", "refunded")} <= moves
    reasons = {r for (r,) in shop.execute("SELECT DISTINCT reason FROM crmpay.events WHERE outcome = 'ignored'")}
    assert {"no matching payment", "payment is paid; failed would not move it forward"} <= reasons
    assert any(r.startswith("amount mismatch") for r in reasons)


# --------------------------------------------------------------------------
# redsys-easy as an oracle
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redsys_easy():
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed")
    if not (NODE_DIR / "node_modules" / "redsys-easy").is_dir():
        subprocess.run(["bash", str(NODE_DIR / "install.sh")], check=True, timeout=300)

    def run(cases):
        out = subprocess.run(["node", str(NODE_DIR / "redsys_oracle.js")], input=json.dumps(cases),
                             capture_output=True, text=True, check=True, timeout=60)
        return json.loads(out.stdout)
    return run


def test_redsys_easy_signatures_verify_in_crmpay_and_back(db, redsys_easy):
    rng = random.Random(7)
    sign = []
    for i in range(150):
        order = "%04d%s" % (rng.randint(0, 9999), "".join(rng.choice("ABCxyz0123456789") for _ in range(rng.randint(0, 8))))
        key = base64.b64encode(rng.randbytes(24)).decode()
        params = {"DS_MERCHANT_AMOUNT": str(rng.randint(1, 10**9)), "DS_MERCHANT_ORDER": order,
                  "DS_MERCHANT_MERCHANTCODE": MERCHANT, "DS_MERCHANT_CURRENCY": "978",
                  "DS_MERCHANT_TRANSACTIONTYPE": "0", "DS_MERCHANT_TERMINAL": "1",
                  "DS_MERCHANT_PRODUCTDESCRIPTION": "Artículo nº %d ✓" % i}
        sign.append({"key": key, "params": params})
    result = redsys_easy({"sign": sign})
    for case, triple in zip(sign, result["sign"]):
        body = urllib.parse.urlencode(triple)
        ok, bad = db.execute(
            "SELECT crmpay.verify_signature('redsys', %s, '{}', %s), crmpay.verify_signature('redsys', %s, '{}', %s)",
            (case["key"], body, KEY, body)).fetchone()
        assert ok and not bad
        assert triple["Ds_Signature"] == db.execute(
            "SELECT crmpay._redsys_signature(%s, %s, %s)",
            (case["key"], case["params"]["DS_MERCHANT_ORDER"], triple["Ds_MerchantParameters"])).fetchone()[0]

    # crmpay signs notification-style triples (Ds_Order); redsys-easy verifies them
    verify = []
    for case in sign[:50]:
        params = {"Ds_Order": case["params"]["DS_MERCHANT_ORDER"], "Ds_Response": "0000",
                  "Ds_Amount": case["params"]["DS_MERCHANT_AMOUNT"]}
        text = base64.b64encode(json.dumps(params).encode()).decode()
        sig = db.execute("SELECT crmpay._redsys_signature(%s, %s, %s)",
                         (case["key"], params["Ds_Order"], text)).fetchone()[0]
        verify.append({"key": case["key"], "triple": {"Ds_SignatureVersion": "HMAC_SHA256_V1",
                                                       "Ds_MerchantParameters": text, "Ds_Signature": sig}})
        verify.append({"key": KEY2, "triple": {"Ds_SignatureVersion": "HMAC_SHA256_V1",
                                                "Ds_MerchantParameters": text, "Ds_Signature": sig}})
    assert redsys_easy({"verify": verify})["verify"] == [True, False] * 50
