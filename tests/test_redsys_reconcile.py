"""Redsys reconciliation by per-order status queries (the SOAP "Consulta"
service, Monitor messages) against the HTTPS Redsys double: the wire format
checked byte for byte against the worked examples of Redsys' manual, a
double seeded with orders of every kind (lost notifications healed through
the state machine, denials, refunds, amount and currency mismatches, orders
Redsys does not know), gateway errors midway (the run fails, nothing is
half-healed), a signature Redsys refuses, a forged answer, and a merchant
without the query service."""

import base64

import psycopg
import pytest

from doubles import redsys_double as rd
from doubles.redsys_double import RedsysDouble
from gateways import deliver, payment
from test_redsys import KEY, KEY2, MERCHANT, add_account, create_link, payment_form, post_form

NOQUERY_MERCHANT = "999008884"      # the bank did not enable the status query

# The manual's worked examples ("TPV-Virtual Consulta SOAP", RS.TE.CEL.MAN.0021
# v1.4, 3.3.1, 3.3.3 and 3.3.5): merchant 999008881, terminal 1, Redsys'
# public test key.  Requests, then the signatures Redsys put on its answers.
MANUAL_MONITOR_REQUEST = (
    '<Messages><Version Ds_Version="0.0"><Message><Monitor><Ds_MerchantCode>999008881</Ds_MerchantCode>'
    '<Ds_Terminal>1</Ds_Terminal><Ds_Order>7086YlQL</Ds_Order></Monitor></Message></Version>'
    '<Signature>J6YFXPHQKtzMt9eH8rtSNI6nq4qCeG1ATn+ojF2jdoc=</Signature>'
    '<SignatureVersion>HMAC_SHA256_V1</SignatureVersion></Messages>')
MANUAL_MONITOR_ANSWER_SIGNATURE = "ZVf4qrlfSfQVVr5RmViQJTzo6KgONcxsJbuouEyFAdw="
MANUAL_TRANSACTION = ('<Version Ds_Version="0.0"><Message><Transaction><Ds_MerchantCode>999008881'
                      '</Ds_MerchantCode><Ds_Terminal>1</Ds_Terminal><Ds_Order>5799L</Ds_Order>'
                      '<Ds_TransactionType>3</Ds_TransactionType></Transaction></Message></Version>',
                      "1KoxTgTakbTprzJ2N/e9JJ8yw/C3QzeNafbUMCNGSFM=")
MANUAL_DETAIL = (MANUAL_TRANSACTION[0].replace("Transaction>", "Detail>"),
                 "UfECD0KD9Wwo1iqY6PYZoJxw8KwMUz8m18bgLyH3BCI=")


@pytest.fixture(scope="module")
def double(tls):
    d = RedsysDouble(certfile=tls["server_cert"], keyfile=tls["server_key"])
    d.add_merchant(MERCHANT, KEY, terminals=("1", "2"))
    d.add_merchant(NOQUERY_MERCHANT, KEY, soap_query=False)
    d.start()
    yield d
    d.stop()


@pytest.fixture
def shop(db, double):
    double.reset()
    double.set_faults("none")
    add_account(db, "rs", double.base_url)
    return db


def reconcile(conn, heal=False, account="rs"):
    return conn.execute("SELECT crmpay.reconcile(%s, now() - interval '1 hour', now() + interval '1 minute', %s)",
                        (account, heal)).fetchone()[0]


def run_row(conn, run_id):
    cur = conn.execute("SELECT * FROM crmpay.reconciliation_runs WHERE id = %s", (run_id,))
    return dict(zip([c.name for c in cur.description], cur.fetchone()))


def items(conn, run_id):
    cur = conn.execute("SELECT kind, order_ref, healed, heal_action, gateway_ref, crm_amount_minor,"
                       "       gateway_amount_minor, crm_currency, gateway_currency, crm_status,"
                       "       gateway_status, detail, changes"
                       "  FROM crmpay.reconciliation_items WHERE run_id = %s ORDER BY order_ref, kind",
                       (run_id,))
    return [dict(zip([c.name for c in cur.description], r)) for r in cur.fetchall()]


def heal_events(conn):
    return conn.execute("SELECT count(*) FROM crmpay.events WHERE event_type = 'crmpay.reconcile.heal'").fetchone()[0]


def queries(double):
    return double.requests(path_prefix=rd.QUERY_PATH)


def order_at_gateway(conn, tls, order_ref, amount="20.00"):
    """A payment link whose form the customer posted: Redsys knows the
    order (one started operation).  Returns its Ds_Order."""
    row = create_link(conn, "rs", order_ref, amount)
    status, page = post_form(tls, payment_form(conn, row["id"]))
    assert status == 200 and "RSisException" not in page
    return row["gateway_ref"]


def force_status(conn, order_ref, status, refunded=0):
    """What the CRM believes, whatever Redsys did (seeding only)."""
    conn.execute("UPDATE crmpay.payments SET status = %s, refunded_minor = %s WHERE account = 'rs' AND order_ref = %s",
                 (status, refunded, order_ref))


def test_every_kind_is_found_and_safe_ones_are_healed(shop, double, tls):
    ok = order_at_gateway(shop, tls, "R-OK")
    deliver(shop, "rs", double.pay(ok)["deliveries"][0])                 # clean
    lost = order_at_gateway(shop, tls, "R-LOST")
    double.pay(lost)                                                      # notification lost
    denied = order_at_gateway(shop, tls, "R-DENIED")
    double.pay(denied, "denied")                                          # lost too: open vs denied is fine
    fake = order_at_gateway(shop, tls, "R-FAKE")
    double.pay(fake, "denied")
    force_status(shop, "R-FAKE", "paid")                                  # paid in the CRM only
    refund = order_at_gateway(shop, tls, "R-REFUND")
    deliver(shop, "rs", double.pay(refund)["deliveries"][0])
    double.refund(refund, 500)                                            # partial refund, lost
    lostref = order_at_gateway(shop, tls, "R-LOSTREF")
    double.pay(lostref)
    double.refund(lostref)                                                # both lost
    amount = create_link(shop, "rs", "R-AMOUNT", "60.00")["gateway_ref"]
    double.seed_operation(amount, "0", "0000", amount=6500, currency="978", merchant=MERCHANT)
    cur = create_link(shop, "rs", "R-CUR", "60.00")["gateway_ref"]
    double.seed_operation(cur, "0", "0000", amount=6000, currency="840", merchant=MERCHANT)
    create_link(shop, "rs", "R-NOGW", "30.00")
    force_status(shop, "R-NOGW", "paid")                                  # Redsys never saw it
    create_link(shop, "rs", "R-OPEN")                                     # form never posted
    order_at_gateway(shop, tls, "R-ABANDONED")                           # posted, never paid
    back = order_at_gateway(shop, tls, "R-BACK")
    deliver(shop, "rs", double.pay(back)["deliveries"][0])
    force_status(shop, "R-BACK", "refunded", 2000)                        # the CRM is ahead: no going back
    shop.execute("INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status,"
                 " idempotency_key, refunded_minor) VALUES ('rs', 'R-NOREF', 500, 'EUR', 'link_pending', 'z', 0)")
    before = {r: payment(shop, "rs", r) for r in ("R-DENIED", "R-FAKE", "R-AMOUNT", "R-CUR", "R-NOGW", "R-BACK")}

    run = reconcile(shop, heal=True)
    r = run_row(shop, run)
    assert r["status"] == "succeeded", r["error"]
    assert r["sources"] == ["orders"] and r["match_on"] == "gateway_ref"
    # one signed Monitor query per payment with an order number (not R-NOREF)
    asked = sorted(q["order"] for q in queries(double))
    refs = ("R-OK", "R-LOST", "R-DENIED", "R-FAKE", "R-REFUND", "R-LOSTREF", "R-AMOUNT", "R-CUR",
            "R-NOGW", "R-OPEN", "R-ABANDONED", "R-BACK")
    assert asked == sorted(payment(shop, "rs", o)["gateway_ref"] for o in refs)
    assert r["pages_fetched"] == len(refs)
    for q in queries(double):
        assert q["headers"]["SOAPAction"] == "consultaOperaciones"
        assert q["headers"]["Content-Type"].startswith("text/xml")
        version = q["cadena"][len("<Messages>"):q["cadena"].index("<Signature>")]
        assert q["cadena"] == ("<Messages>%s<Signature>%s</Signature><SignatureVersion>HMAC_SHA256_V1"
                               "</SignatureVersion></Messages>"
                               % (version, rd.xml_signature(KEY, q["order"], version)))
        assert "<Monitor><Ds_MerchantCode>%s</Ds_MerchantCode><Ds_Terminal>1</Ds_Terminal><Ds_Order>%s" \
               "</Ds_Order></Monitor>" % (MERCHANT, q["order"]) in version
    assert double.stats()["errors"] == 2           # XML0024: R-NOGW and R-OPEN, unknown to Redsys
    got = [(i["kind"], i["order_ref"], i["healed"]) for i in items(shop, run)]
    assert got == [
        ("amount_mismatch", "R-AMOUNT", False), ("status_mismatch", "R-AMOUNT", False),
        ("status_mismatch", "R-BACK", False),
        ("currency_mismatch", "R-CUR", False), ("status_mismatch", "R-CUR", False),
        ("status_mismatch", "R-FAKE", False),
        ("status_mismatch", "R-LOST", True),
        ("refunded_at_gateway", "R-LOSTREF", True), ("status_mismatch", "R-LOSTREF", True),
        ("missing_at_gateway", "R-NOGW", False),
        ("refunded_at_gateway", "R-REFUND", True),
    ]
    by = {(i["kind"], i["order_ref"]): i for i in items(shop, run)}
    assert by[("amount_mismatch", "R-AMOUNT")]["gateway_amount_minor"] == 6500
    assert by[("currency_mismatch", "R-CUR")]["gateway_currency"] == "USD"
    assert by[("status_mismatch", "R-FAKE")]["gateway_status"] == "failed"
    assert by[("status_mismatch", "R-LOST")]["gateway_ref"] == lost
    assert r["counts"] == {"amount_mismatch": 1, "currency_mismatch": 1, "status_mismatch": 6,
                           "missing_at_gateway": 1, "refunded_at_gateway": 2}
    assert r["healed"] == 4 and heal_events(shop) == 4
    # healed through the state machine
    assert payment(shop, "rs", "R-LOST")["status"] == "paid"
    assert payment(shop, "rs", "R-LOST")["paid_at"] is not None
    after = payment(shop, "rs", "R-REFUND")
    assert (after["status"], after["refunded_minor"]) == ("partially_refunded", 500)
    after = payment(shop, "rs", "R-LOSTREF")
    assert (after["status"], after["refunded_minor"]) == ("refunded", 2000)
    # nothing else moved (never backwards, nothing whose money differs)
    for ref, row in before.items():
        now = payment(shop, "rs", ref)
        assert (now["status"], now["refunded_minor"]) == (row["status"], row["refunded_minor"]), ref
    # the gateway's records: one per operation, in the window, the money per currency
    recs = shop.execute("SELECT match_key, record_type, status, amount_minor, currency, occurred_at > now() - interval '1 hour'"
                        "  FROM crmpay.gateway_records WHERE run_id = %s ORDER BY match_key, record_type, status",
                        (run,)).fetchall()
    assert ("%s" % lostref, "refund", None, 2000, "EUR", True) in [tuple(x) for x in recs]
    assert (refund, "refund", None, 500, "EUR", True) in [tuple(x) for x in recs]
    assert (payment(shop, "rs", "R-ABANDONED")["gateway_ref"], "charge", "open", 2000, "EUR", True) in \
        [tuple(x) for x in recs]
    assert r["totals"]["EUR"] == {"gross": 6 * 2000 + 6500 - 2000, "refunds": 2500, "records": 8}
    assert r["totals"]["USD"] == {"gross": 6000, "records": 1}
    # a second run finds only what needs a person, and heals nothing again
    run2 = reconcile(shop, heal=True)
    assert [(i["kind"], i["order_ref"]) for i in items(shop, run2)] == [
        ("amount_mismatch", "R-AMOUNT"), ("status_mismatch", "R-AMOUNT"), ("status_mismatch", "R-BACK"),
        ("currency_mismatch", "R-CUR"), ("status_mismatch", "R-CUR"), ("status_mismatch", "R-FAKE"),
        ("missing_at_gateway", "R-NOGW")]
    assert run_row(shop, run2)["healed"] == 0 and heal_events(shop) == 4


def test_wire_format_is_the_manuals(shop, double):
    """The manual's Monitor example, end to end: crmpay's request is the
    manual's byte for byte, the double's answer carries the manual's
    signature, and crmpay reads and verifies it (a preauthorisation and
    its confirmation: the payment is paid)."""
    shop.execute("INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status,"
                 " idempotency_key, refunded_minor, gateway_ref) VALUES ('rs', 'MANUAL', 145, 'EUR',"
                 " 'processing', 'm', 0, '7086YlQL')")
    double.seed_operation("7086YlQL", "1", "0000", 145, "978", merchant=MERCHANT,
                          when=("2018-03-01", "15:05:23"), card="454881******0003")
    double.seed_operation("7086YlQL", "2", "0900", 145, "978", merchant=MERCHANT,
                          when=("2018-03-01", "15:05:42"), card="454881******0003")
    run = reconcile(shop, heal=True)
    assert run_row(shop, run)["status"] == "succeeded"
    [q] = queries(double)
    assert q["cadena"] == MANUAL_MONITOR_REQUEST
    assert MANUAL_MONITOR_ANSWER_SIGNATURE in double.query_answer(
        MERCHANT, "7086YlQL", list(reversed(double.get_order(MERCHANT, "7086YlQL")["ops"])))
    recs = shop.execute("SELECT record_type, status, amount_minor, currency, gateway_status, occurred_at"
                        "  FROM crmpay.gateway_records WHERE run_id = %s ORDER BY occurred_at", (run,)).fetchall()
    assert [tuple(x[:5]) for x in recs] == [
        ("charge", "processing", 145, "EUR", "type 1, state F, Ds_Response 0000"),
        ("charge", "paid", 145, "EUR", "type 2, state F, Ds_Response 0900")]
    # Spanish time (CET in March)
    assert shop.execute("SELECT %s = '2018-03-01 15:05:23+01'::timestamptz", (recs[0][5],)).fetchone()[0]
    assert [(i["kind"], i["healed"]) for i in items(shop, run)] == [("status_mismatch", True)]
    assert payment(shop, "rs", "MANUAL")["status"] == "paid"
    # crmpay's signing of the manual's other examples (Transaction, Detail)
    for text, sig in (MANUAL_TRANSACTION, MANUAL_DETAIL):
        assert shop.execute("SELECT crmpay._redsys_signature(%s, '5799L', %s)", (KEY, text)).fetchone()[0] == sig


def lost_orders(conn, double, tls, n=3):
    refs = []
    for i in range(n):
        ref = "R-LOST-%d" % i
        double.pay(order_at_gateway(conn, tls, ref))
        refs.append(ref)
    return refs


@pytest.mark.parametrize("mode, code, sqlstate, message, detail", [
    ("soap_error", "XML0025", "08006", "gateway is unavailable", "Redsys error XML0025: Redsys' answer XML is malformed"),
    ("soap_error", "SIS0034", "22023", "gateway rejected the request", "Redsys error SIS0034"),
    ("soap_fault", None, "08006", "gateway is unavailable", "SOAP fault: java.lang.NullPointerException"),
    ("bad_xml", None, "08P01", "gateway answered something crmpay cannot read", "not readable"),
    ("drop", None, "08006", "gateway connection failed", None),
])
def test_gateway_error_midway_fails_the_run_and_heals_nothing(shop, double, tls, mode, code, sqlstate,
                                                             message, detail):
    refs = lost_orders(shop, double, tls)
    # the 2nd query fails (libcurl sends a request again once on a kept-alive
    # connection closed under it: a drop has to happen twice)
    double.set_faults(mode, count=2 if mode == "drop" else 1, after=1, code=code)
    run = reconcile(shop, heal=True)
    r = run_row(shop, run)
    assert r["status"] == "failed" and r["phase"] == "failed"
    assert r["error"].startswith(message) and r["error_sqlstate"] == sqlstate, r
    if detail:
        assert detail in r["error_detail"]
    assert "page 2 (order R-LOST-1)" in r["error_context"]
    assert r["pages_fetched"] == 1
    assert len(queries(double)) == (3 if mode == "drop" else 2)
    # nothing half-done: no records, no items, nothing healed
    assert shop.execute("SELECT count(*) FROM crmpay.gateway_records WHERE run_id = %s", (run,)).fetchone()[0] == 0
    assert shop.execute("SELECT count(*) FROM crmpay.reconciliation_items WHERE run_id = %s", (run,)).fetchone()[0] == 0
    assert [payment(shop, "rs", ref)["status"] for ref in refs] == ["open"] * 3 and heal_events(shop) == 0
    # once Redsys is fine again, the next run heals them all
    run = reconcile(shop, heal=True)
    assert run_row(shop, run)["status"] == "succeeded" and run_row(shop, run)["healed"] == 3
    assert [payment(shop, "rs", ref)["status"] for ref in refs] == ["paid"] * 3


def test_gateway_error_midway_in_steps(shop, double, tls):
    refs = lost_orders(shop, double, tls)
    double.set_faults("soap_error", count=1, after=2, code="XML0000")
    run = shop.execute("CALL crmpay.reconcile_in_steps('rs', now() - interval '1 hour',"
                       " now() + interval '1 minute', true, NULL)").fetchone()[0]
    r = run_row(shop, run)
    assert r["status"] == "failed" and r["mode"] == "stepwise"
    assert r["error"].startswith("gateway rejected the request") and "XML0000" in r["error_detail"]
    assert "page 3 (order R-LOST-2)" in r["error_context"] and r["pages_fetched"] == 2
    # the two pages committed before are gone too; nothing healed
    assert shop.execute("SELECT count(*) FROM crmpay.gateway_records WHERE run_id = %s", (run,)).fetchone()[0] == 0
    assert [payment(shop, "rs", ref)["status"] for ref in refs] == ["open"] * 3 and heal_events(shop) == 0
    run = shop.execute("CALL crmpay.reconcile_in_steps('rs', now() - interval '1 hour',"
                       " now() + interval '1 minute', true, NULL)").fetchone()[0]
    assert run_row(shop, run)["status"] == "succeeded"
    assert [payment(shop, "rs", ref)["status"] for ref in refs] == ["paid"] * 3


def test_a_signature_redsys_refuses(db, double, tls):
    """A wrong merchant key: Redsys answers XML0023; the run fails saying so."""
    double.reset()
    add_account(db, "rs", double.base_url, key=KEY2)
    order = create_link(db, "rs", "R-1", "20.00")["gateway_ref"]
    double.seed_operation(order, "0", "0000", amount=2000, currency="978", merchant=MERCHANT)
    run = reconcile(db, heal=True)
    r = run_row(db, run)
    assert r["status"] == "failed" and r["error_sqlstate"] == "28000"
    assert r["error"] == 'gateway refused the account\'s credentials (account "rs", provider redsys)'
    assert r["error_detail"] == ("HTTP 200, XML0023: Redsys error XML0023: the signature is not correct "
                                 "(is credentials.merchant_key this terminal's key?) (query of order %s)" % order)
    assert "crmpay.update_account" in r["error_hint"]
    assert double.stats()["errors"] == 1 and payment(db, "rs", "R-1")["status"] == "open"
    # with the right key, the same order is healed
    db.execute("SELECT crmpay.update_account('rs', credentials => %s::jsonb)", ('{"merchant_key": "%s"}' % KEY,))
    assert run_row(db, reconcile(db, heal=True))["status"] == "succeeded"
    assert payment(db, "rs", "R-1")["status"] == "paid"


def test_a_forged_answer_is_refused(shop, double, tls):
    lost = lost_orders(shop, double, tls, n=1)
    double.set_faults("bad_signature", count=1)
    r = run_row(shop, reconcile(shop, heal=True))
    assert r["status"] == "failed" and r["error_sqlstate"] == "08P01"
    assert "Signature does not match the merchant key, the order and its <Version> element" in r["error_detail"]
    assert payment(shop, "rs", lost[0])["status"] == "open" and heal_events(shop) == 0


def test_a_merchant_without_the_query_service(db, double, tls):
    double.reset()
    add_account(db, "nq", double.base_url, merchant=NOQUERY_MERCHANT)
    db.execute("INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status,"
               " idempotency_key, refunded_minor, gateway_ref) VALUES ('nq', 'N-1', 100, 'EUR', 'open', 'n', 0,"
               " '260400000001')")
    r = run_row(db, reconcile(db, account="nq"))
    assert r["status"] == "failed" and r["error_sqlstate"] == "22023"
    assert "XML0041" in r["error_detail"] and "settings.reconcile_sources to []" in r["error_detail"]
    # reports only: no query (and here no report either, which is said)
    db.execute("""SELECT crmpay.update_account('nq', settings => settings || '{"reconcile_sources": []}')
                    FROM crmpay.gateway_accounts WHERE name = 'nq'""")
    n = len(queries(double))
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="nothing tells what gateway"):
        reconcile(db, account="nq")
    assert len(queries(double)) == n


def test_odd_answers(shop, double, tls):
    """What the parser takes and refuses, fed through the double's SOAP
    envelope: the message as CDATA or as elements, whitespace between tags;
    an answer about another order or terminal."""
    order = order_at_gateway(shop, tls, "R-ODD")
    double.pay(order)
    answer = double.query_answer(MERCHANT, order, list(reversed(double.get_order(MERCHANT, order)["ops"])))
    plain = rd.RedsysDouble._soap_answer(answer)[2].decode()
    inner_escaped = plain[plain.index("<consultaOperacionesReturn>") + 27:plain.index("</consultaOperacionesReturn>")]
    variants = {
        "cdata": plain.replace(inner_escaped, "<![CDATA[%s]]>" % answer),
        "elements": plain.replace(inner_escaped, answer),
    }
    version = answer[len("<Messages>"):answer.index("<Signature>")]

    def signed(v):
        """A message signed right (with this order's key) saying v."""
        return rd.xml_escape("<Messages>%s<Signature>%s</Signature></Messages>" % (v, rd.xml_signature(KEY, order, v)))
    bad = {
        "other order": (plain.replace(inner_escaped, signed(version.replace(order, "999999999999"))),
                        'operation of order "999999999999"'),
        "other terminal": (plain.replace(inner_escaped, signed(version.replace("<Ds_Terminal>1<", "<Ds_Terminal>2<"))),
                           "operation of another terminal"),
        "other merchant": (plain.replace(inner_escaped, signed(version.replace(MERCHANT, "999008882"))),
                           "operation of another merchant"),
        "bad amount": (plain.replace(inner_escaped, signed(version.replace("<Ds_Amount>2000<", "<Ds_Amount>20.00<"))),
                       "Ds_Amount is not a number"),
        "two signatures": (plain.replace(inner_escaped, signed(version).replace("&lt;/Messages&gt;", "&lt;Signature&gt;x&lt;/Signature&gt;&lt;/Messages&gt;")),
                           "more than one Version or Signature"),
        "broken": (plain.replace(inner_escaped, signed(version).replace("&lt;/Response&gt;", "", 1)),
                   "malformed"),
        "bad entity": (plain.replace(inner_escaped, signed(version).replace("Ds_State&gt;F", "Ds_State&gt;&amp;bogus;")),
                       "unreadable Ds_State"),
        "unsigned": (plain.replace(inner_escaped, rd.xml_escape("<Messages>%s</Messages>" % version)),
                     "the answer has no Signature"),
        "tampered": (plain.replace(inner_escaped, rd.xml_escape(answer.replace("<Ds_Amount>2000<", "<Ds_Amount>20<"))),
                     "Signature does not match"),
        "no envelope": (answer, "not a SOAP envelope"),
    }
    # indented, with a comment and a declaration: signed over the text as sent
    variants["spaces"] = plain.replace(inner_escaped, rd.xml_escape('<?xml version="1.0"?>\n') +
                                       signed(version.replace("><", ">\n  <")).replace(
                                           "&lt;/Messages&gt;", "&lt;!-- end --&gt;\n&lt;/Messages&gt;"))
    original = double._query

    def canned(text):
        def answer_with(entry, headers, body):
            original(entry, headers, body)
            return (200, {"Content-Type": "text/xml"}, text.encode())
        return answer_with

    try:
        for name, text in variants.items():
            double._query = canned(text)
            run = reconcile(shop)
            assert run_row(shop, run)["status"] == "succeeded", name
            assert [i["kind"] for i in items(shop, run)] == ["status_mismatch"], name
        for name, (text, why) in bad.items():
            double._query = canned(text)
            r = run_row(shop, reconcile(shop))
            assert r["status"] == "failed" and why in r["error_detail"], (name, r["error_detail"])
    finally:
        double._query = original
    assert payment(shop, "rs", "R-ODD")["status"] == "open"


def test_mangled_answers_never_crash_or_heal(shop, double, tls):
    """The answer parser is hand-written: random cuts, byte flips and
    duplications of a real answer either read as a signed answer or fail the
    run with a reason; the server never falls over and never heals on them."""
    import random
    order = order_at_gateway(shop, tls, "R-MANGLED")
    double.pay(order)
    answer = double.query_answer(MERCHANT, order, list(reversed(double.get_order(MERCHANT, order)["ops"])))
    envelope = rd.RedsysDouble._soap_answer(answer)[2]
    rng = random.Random(2024)
    original = double._query
    outcomes = {"succeeded": 0, "failed": 0}
    try:
        for i in range(120):
            data = bytearray(envelope)
            for _ in range(rng.randint(1, 4)):
                op = rng.randrange(4)
                at = rng.randrange(len(data))
                if op == 0:
                    del data[at:]
                elif op == 1:
                    data[at] = rng.choice(b"<>&;/!?[]\"' \x00\xff=")
                elif op == 2:
                    n = rng.randint(1, 40)
                    data[at:at] = data[at:at + n]
                else:
                    del data[at:at + rng.randint(1, 40)]
            payload = bytes(data)
            double._query = (lambda p: lambda entry, headers, body: (
                original(entry, headers, body), (200, {"Content-Type": "text/xml"}, p))[1])(payload)
            heals = heal_events(shop)
            r = run_row(shop, reconcile(shop, heal=True))
            outcomes[r["status"]] += 1
            if r["status"] == "failed":
                assert r["error_sqlstate"] in ("08P01", "22023", "28000", "08006"), r
                assert heal_events(shop) == heals
            else:   # only a signed answer is read: this order, paid
                assert shop.execute("SELECT count(*) FROM crmpay.gateway_records g JOIN crmpay.reconciliation_runs r"
                                    " ON r.id = g.run_id WHERE r.id = (SELECT max(id) FROM crmpay.reconciliation_runs)"
                                    " AND (g.match_key <> %s OR g.status <> 'paid')", (order,)).fetchone()[0] == 0
    finally:
        double._query = original
    # most mangled answers are refused; the connection (and server) is fine
    assert outcomes["failed"] > 60
    assert shop.execute("SELECT 1").fetchone()[0] == 1
