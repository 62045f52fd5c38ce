"""Webhook verification rates for PayPal and Braintree (issue 3), in one run:

1. crmpay.verify_signature('paypal', ...) on a realistic ~2 KB
   CHECKOUT.ORDER.APPROVED event (offline check, pinned certificate, so no
   network), versus the same primitive in plain C (bench/raw_paypal_verify.c:
   CRC32 + RSA-2048 SHA-256 verify with OpenSSL).
2. crmpay.verify_signature('braintree', ...) on a realistic notification
   (form body with bt_signature/bt_payload), versus plain C HMAC-SHA1 with a
   SHA1-derived key (bench/raw_braintree_verify.c), and versus the official
   braintree Node SDK's webhookNotification.parse (when node and
   tests/node/node_modules are there).
Prints verifications per second and the ratios.
"""

import base64
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from lib.cluster import PgCluster  # noqa: E402
from doubles import braintree_double as bd  # noqa: E402

BINDIR = os.environ["CRMPAY_PG_BINDIR"]
WEBHOOK_ID = "8PT597110X687430LKGECATA"
TID = "b2384410-f8d2-11ee-8e40-b5ae8a4ab7a3"
TTIME = "2024-05-01T10:00:05Z"


def paypal_event():
    unit = {"reference_id": "BENCH-1", "custom_id": "BENCH-1", "description": "Order BENCH-1",
            "amount": {"currency_code": "EUR", "value": "19.99"},
            "payee": {"email_address": "merchant@example.com", "merchant_id": "C7CYMKZDG8D6E"},
            "shipping": {"name": {"full_name": "Ana Garcia"},
                         "address": {"address_line_1": "Gran Via 1", "admin_area_2": "Madrid",
                                     "postal_code": "28013", "country_code": "ES"}}}
    resource = {"id": "5O190127TN364715T", "intent": "CAPTURE", "status": "APPROVED",
                "purchase_units": [unit], "create_time": "2024-05-01T09:59:00Z",
                "payer": {"name": {"given_name": "Ana", "surname": "Garcia"},
                          "email_address": "ana@example.com", "payer_id": "QYR5Z8XDVJNXQ",
                          "address": {"country_code": "ES"}},
                "links": [{"href": "https://api.paypal.com/v2/checkout/orders/5O190127TN364715T",
                           "rel": rel, "method": m} for rel, m in
                          (("self", "GET"), ("update", "PATCH"), ("capture", "POST"))]}
    event = {"id": "WH-58D329510W468432D-8HN650336L201105X", "event_version": "1.0",
             "create_time": "2024-05-01T10:00:00Z", "resource_type": "checkout-order",
             "resource_version": "2.0", "event_type": "CHECKOUT.ORDER.APPROVED",
             "summary": "An order has been approved by buyer", "resource": resource,
             "links": [{"href": "https://api.paypal.com/v1/notifications/webhooks-events/WH-58D3",
                        "rel": "self", "method": "GET"},
                       {"href": "https://api.paypal.com/v1/notifications/webhooks-events/WH-58D3/resend",
                        "rel": "resend", "method": "POST"}]}
    body = json.dumps(event, separators=(",", ":"))
    return body + " " * max(0, 2048 - len(body))


def make_paypal_vector(tmp):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.x509.oid import NameOID
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "messageverificationcerts.paypal.com")])
    now = datetime.datetime.utcnow()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(datetime.datetime(2024, 1, 1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    body = paypal_event()
    msg = "%s|%s|%s|%d" % (TID, TTIME, WEBHOOK_ID, zlib.crc32(body.encode()) & 0xFFFFFFFF)
    sig = base64.b64encode(key.sign(msg.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()
    with open(os.path.join(tmp, "cert.pem"), "w") as f:
        f.write(pem)
    with open(os.path.join(tmp, "pp_body.json"), "w") as f:
        f.write(body)
    return pem, body, sig


def cc(tmp, name):
    exe = os.path.join(tmp, name)
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(REPO, "bench", name + ".c"), "-lcrypto"],
                   check=True)
    return exe


def best_of(n, fn):
    return max(fn() for _ in range(n))


def sql_rate(conn, n, provider, secret, headers, body):
    sql = ("SELECT count(*) FROM generate_series(1, %s) WHERE crmpay.verify_signature("
           "%s, %s, %s::jsonb, %s, NULL, '2024-05-01 10:01:00+00')")

    def once():
        t0 = time.perf_counter()
        ok = conn.execute(sql, (n, provider, secret, headers, body)).fetchone()[0]
        assert ok == n, "every verification must succeed"
        return n / (time.perf_counter() - t0)
    return best_of(3, once)


def main():
    tmp = tempfile.mkdtemp(prefix="crmpay-bench-ppbt-")
    cluster = PgCluster(BINDIR)
    cluster.start()
    try:
        cluster.create_database("bench")
        conn = cluster.connect("bench")
        conn.execute("CREATE EXTENSION crmpay")

        # PayPal
        pem, body, sig = make_paypal_vector(tmp)
        secret = json.dumps({"webhook_id": WEBHOOK_ID, "cert_pem": pem})
        headers = json.dumps({"PAYPAL-TRANSMISSION-ID": TID, "PAYPAL-TRANSMISSION-TIME": TTIME,
                              "PAYPAL-TRANSMISSION-SIG": sig, "PAYPAL-AUTH-ALGO": "SHA256withRSA"})
        n = 20000
        pp_sql = sql_rate(conn, n, "paypal", secret, headers, body)
        exe = cc(tmp, "raw_paypal_verify")
        pp_raw = best_of(3, lambda: float(subprocess.run(
            [exe, os.path.join(tmp, "cert.pem"), os.path.join(tmp, "pp_body.json"), sig, TID, TTIME,
             WEBHOOK_ID, str(n)], check=True, capture_output=True, text=True).stdout))
        print(f"paypal    verify_signature ({len(body)} B event, RSA-2048): {pp_sql:,.0f}/s in SQL "
              f"vs raw C OpenSSL {pp_raw:,.0f}/s -> ratio {pp_sql / pp_raw:.2f}")

        # Braintree
        note = bd.sample_notification("bench_public_key", "bench_private_key", "transaction_settled",
                                      "txn-bench-1", amount="19.99", currency="EUR", order_id="BENCH-1")
        bt_secret = json.dumps({"public_key": "bench_public_key", "private_key": "bench_private_key"})
        n = 100000
        bt_sql = sql_rate(conn, n, "braintree", bt_secret, "{}", note["body"])
        with open(os.path.join(tmp, "payload.txt"), "w") as f:
            f.write(note["bt_payload"])
        exe = cc(tmp, "raw_braintree_verify")
        hexsig = note["bt_signature"].split("|", 1)[1]
        bt_raw = best_of(3, lambda: float(subprocess.run(
            [exe, os.path.join(tmp, "payload.txt"), "bench_private_key", hexsig, str(n)],
            check=True, capture_output=True, text=True).stdout))
        line = (f"braintree verify_signature ({len(note['body'])} B form body): {bt_sql:,.0f}/s in SQL "
                f"vs raw C OpenSSL {bt_raw:,.0f}/s -> ratio {bt_sql / bt_raw:.2f}")
        sdk = os.path.join(REPO, "tests", "node", "node_modules", "braintree")
        if shutil.which("node") and os.path.isdir(sdk):
            nn = 20000
            node = best_of(3, lambda: float(subprocess.run(
                ["node", os.path.join(REPO, "bench", "braintree_node_parse.js"), sdk,
                 "bench_public_key", "bench_private_key", note["bt_signature"],
                 os.path.join(tmp, "payload.txt"), str(nn)],
                check=True, capture_output=True, text=True).stdout))
            line += f"; braintree Node SDK parse {node:,.0f}/s -> crmpay {bt_sql / node:.1f}x the SDK"
        else:
            line += "; braintree Node SDK not installed (bash tests/node/install.sh)"
        print(line)
        conn.close()
    finally:
        cluster.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
