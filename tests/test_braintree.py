"""Braintree webhooks: the official Node SDK as an oracle (its sample
notifications verify and apply in crmpay; it parses the double's
notifications; its challenge answer matches crmpay.braintree_challenge), and
an adversarial intake run checked against a model of the rules."""

import base64
import json
import os
import random
import shutil
import subprocess
import urllib.parse

import pytest
from psycopg import errors

from doubles import braintree_double as bd
from gateways import deliver, payment
from intake_model import Model, transitions

PUBLIC = "integration_public_key"
PRIVATE = "integration_private_key"
SECRET = json.dumps({"public_key": PUBLIC, "private_key": PRIVATE})
NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")


@pytest.fixture
def bt(db):
    db.execute("SELECT crmpay.add_account('bt', 'braintree', %s::jsonb, %s)",
               (json.dumps({"merchant_id": "crmpaytest", "public_key": PUBLIC,
                            "private_key": PRIVATE}), SECRET))
    return db


def add_payment(conn, order_ref, txn_id, amount_minor, currency="USD", status="open",
                gateway_ref=None):
    """Payments for Braintree come from the shop's own checkout: insert them."""
    conn.execute("INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status,"
                 " gateway_ref, gateway_payment_ref, idempotency_key)"
                 " VALUES ('bt', %s, %s, %s, %s, %s, %s, crmpay.idempotency_key('bt', %s))",
                 (order_ref, amount_minor, currency, status, gateway_ref, txn_id, order_ref))


def verify(conn, body, secret=SECRET):
    return conn.execute("SELECT crmpay.verify_signature('braintree', %s, '{}', %s)",
                        (secret, body)).fetchone()[0]


def node_oracle(request):
    """Runs tests/node/braintree_oracle.js with the official SDK."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed: the Braintree SDK oracle cannot run")
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "braintree")):
        subprocess.run(["bash", os.path.join(NODE_DIR, "install.sh")], check=True, timeout=300)
    proc = subprocess.run(["node", os.path.join(NODE_DIR, "braintree_oracle.js")],
                          input=json.dumps(request), capture_output=True, text=True,
                          timeout=60, cwd=NODE_DIR)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_official_sdk_samples_verify_and_apply(bt):
    kinds = [("transaction_settled", "txn-sdk-1"), ("transaction_settlement_declined", "txn-sdk-2"),
             ("subscription_charged_successfully", "sub-sdk-3"),
             ("subscription_charged_unsuccessfully", "sub-sdk-4"), ("check", ""),
             ("transaction_disbursed", "txn-sdk-5"), ("subscription_canceled", "sub-sdk-6")]
    out = node_oracle({"keys": {"merchant_id": "crmpaytest", "public_key": PUBLIC,
                                "private_key": PRIVATE}, "samples": kinds,
                       "challenge": "20f9f8ed05f77439fe955c977e4c8a53"})
    # the SDK's sample amounts: 100 USD for transactions, 49.99 for subscription charges
    add_payment(bt, "o1", "txn-sdk-1", 10000)
    add_payment(bt, "o2", "txn-sdk-2", 10000)
    add_payment(bt, "o3", "sub-sdk-3", 4999, gateway_ref="sub-sdk-3")
    add_payment(bt, "o4", "sub-sdk-4", 4999, gateway_ref="sub-sdk-4")
    expected = {"transaction_settled": ("applied", "paid"),
                "transaction_settlement_declined": ("applied", "failed"),
                "subscription_charged_successfully": ("applied", "paid"),
                "subscription_charged_unsuccessfully": ("applied", "failed"),
                "check": ("ignored", None), "transaction_disbursed": ("ignored", None),
                "subscription_canceled": ("ignored", None)}
    for sample in out["samples"]:
        body = urllib.parse.urlencode({"bt_signature": sample["bt_signature"],
                                       "bt_payload": sample["bt_payload"]})
        assert verify(bt, body), sample["kind"]
        assert not verify(bt, body, json.dumps({"public_key": PUBLIC, "private_key": "other"}))
        rows = deliver(bt, "bt", {"headers": {}, "body": body})
        assert [r[:3] for r in rows] == [(200, "", expected[sample["kind"]][0])], sample["kind"]
    statuses = dict(bt.execute("SELECT order_ref, status FROM crmpay.payments").fetchall())
    assert statuses == {"o1": "paid", "o2": "failed", "o3": "paid", "o4": "failed"}
    # B1 through the SDK and through crmpay
    assert out["challenge"] == "integration_public_key|d9b899556c966b3f06945ec21311865d35df3ce4"
    assert bt.execute("SELECT crmpay.braintree_challenge('bt', '20f9f8ed05f77439fe955c977e4c8a53')"
                      ).fetchone()[0] == out["challenge"]


def test_official_sdk_accepts_the_doubles_notifications(bt):
    made = [bd.sample_notification(PUBLIC, PRIVATE, "transaction_settled", "txn-d-1", style=style)
            for style in ("ruby", "node")]
    made.append(bd.sample_notification(PUBLIC, PRIVATE, "subscription_charged_successfully",
                                       "sub-d-2", extra_keys=[("old_public", "old_private")]))
    forged = dict(made[0])
    forged["bt_payload"] = made[0]["bt_payload"].replace("A", "B", 1)
    out = node_oracle({"keys": {"merchant_id": "crmpaytest", "public_key": PUBLIC,
                                "private_key": PRIVATE},
                       "parse": [{"bt_signature": m["bt_signature"], "bt_payload": m["bt_payload"]}
                                 for m in made + [forged]]})
    assert out["parsed"][:3] == [
        {"ok": True, "kind": "transaction_settled", "transaction_id": "txn-d-1", "subscription_id": None},
        {"ok": True, "kind": "transaction_settled", "transaction_id": "txn-d-1", "subscription_id": None},
        {"ok": True, "kind": "subscription_charged_successfully", "transaction_id": None,
         "subscription_id": "sub-d-2"}]
    assert out["parsed"][3]["ok"] is False
    for m in made:
        assert verify(bt, m["body"])
    assert not verify(bt, bd.form_body(forged["bt_signature"], forged["bt_payload"]))


def test_challenge_needs_a_braintree_account_and_a_hex_challenge(bt):
    with pytest.raises(errors.InvalidParameterValue):
        bt.execute("SELECT crmpay.braintree_challenge('bt', 'ABCDEF0123456789ABCDEF')")
    with pytest.raises(errors.UndefinedObject):
        bt.execute("SELECT crmpay.braintree_challenge('nope', '20f9f8ed05f77439fe955c977e4c8a53')")
    assert bt.execute("SELECT crmpay.braintree_challenge('bt', %s)", ("0" * 20,)).fetchone()[0] == \
        bd.challenge_answer(PUBLIC, PRIVATE, "0" * 20)


def test_settlement_by_order_id_and_out_of_order(bt):
    add_payment(bt, "ORD-9", None, 2500, "EUR")
    settled = bd.sample_notification(PUBLIC, PRIVATE, "transaction_settled", "txn-9",
                                     amount="25.00", currency="EUR", order_id="ORD-9")
    declined = bd.sample_notification(PUBLIC, PRIVATE, "transaction_settlement_declined", "txn-9",
                                      amount="25.00", currency="EUR", order_id="ORD-9")
    assert deliver(bt, "bt", settled)[0][2] == "applied"
    assert deliver(bt, "bt", declined)[0][2] == "ignored"       # paid never goes back
    p = payment(bt, "bt", "ORD-9")
    assert (p["status"], p["gateway_payment_ref"]) == ("paid", "txn-9")
    wrong = bd.sample_notification(PUBLIC, PRIVATE, "transaction_settled", "txn-10",
                                   amount="25.01", currency="EUR", order_id="ORD-10")
    add_payment(bt, "ORD-10", None, 2500, "EUR")
    rows = deliver(bt, "bt", wrong)
    assert rows[0][2] == "ignored"
    assert bt.execute("SELECT reason FROM crmpay.events WHERE event_key = 'transaction_settled:txn-10'"
                      ).fetchone()[0].startswith("amount mismatch")


def test_adversarial_braintree_intake(bt):
    rng = random.Random(424242)
    payments = {}
    for i in range(15):
        cur = ["USD", "EUR", "JPY", "KWD"][i % 4]
        exp = {"USD": 2, "EUR": 2, "JPY": 0, "KWD": 3}[cur]
        amount = rng.randint(1, 10 ** 6)
        txn = "txn-adv-%d" % i
        add_payment(bt, "ADV-%d" % i, txn, amount, cur)
        payments[txn] = {"status": "open", "amount": amount, "currency": cur, "exp": exp}
    model = Model(transitions(bt), payments)
    txns = list(payments) + ["txn-unknown-%d" % i for i in range(4)]
    kinds = ["transaction_settled", "transaction_settlement_declined", "transaction_disbursed",
             "check", "subscription_went_past_due"]

    def decimal(amount, exp):
        return str(amount) if exp == 0 else "%d.%0*d" % (amount // 10 ** exp, exp, amount % 10 ** exp)

    def make(kind, txn):
        p = payments.get(txn, {"amount": 500, "currency": "USD", "exp": 2})
        amount = p["amount"] + (1 if rng.random() < 0.1 else 0)
        ts = "2024-05-01T10:%02d:%02dZ" % (rng.randint(0, 59), rng.randint(0, 59))
        n = bd.sample_notification(PUBLIC, PRIVATE, kind, txn, timestamp=ts,
                                   amount=decimal(amount, p["exp"]), currency=p["currency"],
                                   style=rng.choice(["ruby", "node"]))
        if kind == "transaction_settled":
            return n, "%s:%s" % (kind, txn), "paid", amount, p["currency"]
        if kind == "transaction_settlement_declined":
            return n, "%s:%s" % (kind, txn), "failed", None, None
        if kind == "check":
            return n, "check:" + ts, None, None, None
        key = "%s:%s" % (kind, txn) if kind.startswith("transaction_") else "%s:%s:%s" % (kind, txn, txn)
        return n, key, None, None, None

    def signed(xml_bytes, keys=((PUBLIC, PRIVATE),)):
        payload = base64.b64encode(xml_bytes).decode() + "\n"
        return bd.form_body(bd.sign(payload, list(keys)), payload)

    sent = []
    counts = {}
    n = 0
    while n < 1100:
        attack = rng.choice(["valid", "valid", "tamper", "wrong_sig", "missing_field",
                             "wrong_key", "truncated", "bad_base64", "invalid_utf8", "duplicate",
                             "doctype", "not_xml", "no_pairs", "oversized"])
        if attack == "oversized" and counts.get("oversized", 0) >= 3:
            continue
        counts[attack] = counts.get(attack, 0) + 1
        n += 1
        txn = rng.choice(txns)
        note, key, status, amount, cur = make(rng.choice(kinds), txn)
        body = note["body"]
        authentic, http = True, 200
        if attack == "tamper":
            p = note["bt_payload"]
            i = rng.randrange(0, len(p) - 4)
            if p[i] == "\n":
                i += 1
            body = bd.form_body(note["bt_signature"], p[:i] + ("A" if p[i] != "A" else "B") + p[i + 1:])
            authentic = False
        elif attack == "wrong_sig":
            body = bd.form_body("%s|%s" % (PUBLIC, "%040x" % rng.getrandbits(160)), note["bt_payload"])
            authentic = False
        elif attack == "missing_field":
            body = rng.choice([urllib.parse.urlencode({"bt_payload": note["bt_payload"]}),
                               urllib.parse.urlencode({"bt_signature": note["bt_signature"]}),
                               "", "bt_signature=&bt_payload="])
            authentic = False
        elif attack == "wrong_key":
            body = bd.sample_notification(PUBLIC, "not-the-private-key", "transaction_settled", txn)["body"]
            authentic = False
        elif attack == "truncated":
            # (cutting just the final %0A leaves the payload the SDKs also accept)
            body = body[:rng.randint(0, len(body) - 4)]
            authentic = False
        elif attack == "no_pairs":
            body = bd.form_body("justsomething", note["bt_payload"])
            authentic = False
        elif attack == "bad_base64":
            payload = note["bt_payload"][:10] + "*%$" + note["bt_payload"][10:]
            body = bd.form_body(bd.sign(payload, [(PUBLIC, PRIVATE)]), payload)
            authentic, http = None, 400
        elif attack == "invalid_utf8":
            body = signed(b"<notification><kind>transaction_settled</kind><subject>\xff\xfe</subject></notification>")
            authentic, http = None, 400
        elif attack == "doctype":
            body = signed(b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><notification>'
                          b'<kind>check</kind><subject>&e;</subject></notification>')
            authentic, http = None, 400
        elif attack == "not_xml":
            body = signed(rng.choice([b"{}", b"<notification><kind>x</kind>", b"plain text",
                                      b"<a></b>", b"<notification></notification>"]))
            authentic, http = None, 400
        elif attack == "oversized":
            body = body + "&pad=" + "x" * (1024 * 1024)
            authentic, http = None, 413
        elif attack == "duplicate" and sent:
            body, key, status, amount, cur, txn = rng.choice(sent)
        rows = deliver(bt, "bt", {"headers": {}, "body": body})
        assert len(rows) == 1
        code, reply, outcome, event_id = rows[0]
        if authentic is None:
            assert (code, outcome) == (http, "rejected"), (attack, reply)
            continue
        expected = model.expect(authentic, key, status, txn, amount, cur)
        assert outcome == expected, (attack, reply, key)
        if authentic:
            assert code == 200 and event_id == key
            sent.append((body, key, status, amount, cur, txn))
        else:
            assert code == 400 and reply

    assert n >= 1000 and counts["oversized"] == 3
    rows = dict(bt.execute("SELECT gateway_payment_ref, status FROM crmpay.payments").fetchall())
    assert rows == {k: v["status"] for k, v in payments.items()}
    total, rejected = bt.execute("SELECT count(*), count(*) FILTER (WHERE outcome = 'rejected')"
                                 " FROM crmpay.events").fetchone()
    assert total == n and rejected > 500
