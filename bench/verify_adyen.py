"""Benchmark for Adyen webhook verification (issue 3), measured in one run:

crmpay.verify_signature('adyen', ...) on a realistic standard notification
(one AUTHORISATION item, about 1.3 KB, as Adyen sends it), next to

1. raw OpenSSL: HMAC-SHA256 of the item's signing string + base64 + compare
   in plain C (bench/raw_hmac_adyen.c), the primitive with no parsing;
2. the official Node SDK (@adyen/api-library): JSON.parse of the same body
   and HmacValidator.validateHMAC of its item, as a Node handler does
   (tests/node/adyen_oracle.js; skipped when node is absent).

Target: crmpay at least as fast as the SDK per verification.
"""

import base64
import binascii
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from lib.cluster import PgCluster  # noqa: E402

BINDIR = os.environ["CRMPAY_PG_BINDIR"]
KEY = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"


def notification():
    """A realistic AUTHORISATION notification for a paid payment link."""
    item = {
        "additionalData": {
            "acquirerCode": "TestPmmAcquirer", "acquirerReference": "8NQH5BNF58M",
            "authCode": "039404", "avsResult": "5 No AVS data provided", "avsResultRaw": "5",
            "cardSummary": "1111", "checkout.cardAddedBrand": "visa", "cvcResult": "1 Matches",
            "cvcResultRaw": "M", "expiryDate": "03/2030", "paymentLinkId": "PL61C53A8B97E6915A",
            "paymentMethod": "visa", "refusalReasonRaw": "AUTHORISED",
            "retry.attempt1.acquirer": "TestPmmAcquirer",
            "retry.attempt1.acquirerAccount": "TestPmmAcquirerAccount",
            "retry.attempt1.avsResultRaw": "5", "retry.attempt1.rawResponse": "AUTHORISED",
            "retry.attempt1.responseCode": "Approved", "retry.attempt1.scaExemptionRequested": "lowValue",
            "scaExemptionRequested": "lowValue", "shopperCountry": "ES", "issuerCountry": "NL",
        },
        "amount": {"currency": "EUR", "value": 1999},
        "eventCode": "AUTHORISATION", "eventDate": "2026-01-10T13:40:54+01:00",
        "merchantAccountCode": "ShopECOM", "merchantReference": "ORD-2026-000123",
        "operations": ["CANCEL", "CAPTURE", "REFUND"], "paymentMethod": "visa",
        "pspReference": "M8NB66SBZSGLNK82", "reason": "039404:1111:03/2030", "success": "true",
    }
    signing = ":".join([item["pspReference"], "", item["merchantAccountCode"], item["merchantReference"],
                        str(item["amount"]["value"]), item["amount"]["currency"], item["eventCode"], item["success"]])
    sig = base64.b64encode(hmac.new(binascii.unhexlify(KEY), signing.encode(), hashlib.sha256).digest()).decode()
    item["additionalData"]["hmacSignature"] = sig
    body = json.dumps({"live": "false", "notificationItems": [{"NotificationRequestItem": item}]}, indent=2)
    return body, signing, sig


def bench_raw(tmp, signing, sig):
    exe = os.path.join(tmp, "raw_hmac_adyen")
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(REPO, "bench", "raw_hmac_adyen.c"), "-lcrypto"], check=True)
    return max(float(subprocess.run([exe, KEY, signing, sig, "500000"], check=True, capture_output=True,
                                    text=True).stdout) for _ in range(3))


def bench_crmpay(conn, body, n=100000):
    sql = ("SELECT count(*) FROM generate_series(1, %s) "
           "WHERE crmpay.verify_signature('adyen', %s, '{}'::jsonb, %s, '0', now())")
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        ok = conn.execute(sql, (n, KEY, body)).fetchone()[0]
        best = max(best, n / (time.perf_counter() - t0))
        assert ok == n, "every verification must succeed"
    return best


def bench_node(body):
    node_dir = os.path.join(REPO, "tests", "node")
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None
    subprocess.run(["bash", os.path.join(node_dir, "install.sh")], check=True, capture_output=True)
    best = 0.0
    for _ in range(3):
        out = subprocess.run(["node", os.path.join(node_dir, "adyen_oracle.js")],
                             input=json.dumps({"op": "bench", "key": KEY, "body": body, "seconds": 2}),
                             capture_output=True, text=True, check=True).stdout
        best = max(best, json.loads(out)["per_second"])
    return best


def main():
    body, signing, sig = notification()
    tmp = tempfile.mkdtemp(prefix="crmpay-bench-adyen-")
    cluster = PgCluster(BINDIR, settings={"synchronous_commit": "off"})
    cluster.start()
    try:
        cluster.create_database("bench")
        conn = cluster.connect("bench")
        conn.execute("CREATE EXTENSION crmpay")
        crmpay = bench_crmpay(conn, body)
        conn.close()
    finally:
        cluster.cleanup()
    raw = bench_raw(tmp, signing, sig)
    node = bench_node(body)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"Adyen notification of {len(body.encode())} bytes, one item:")
    print(f"  crmpay.verify_signature('adyen')     {crmpay:>12,.0f}/s")
    print(f"  raw OpenSSL HMAC + base64 (C)        {raw:>12,.0f}/s  -> crmpay at {crmpay / raw:.2f}x the raw rate")
    if node is None:
        print("  @adyen/api-library (Node)            skipped: node/npm not installed")
    else:
        ratio = crmpay / node
        print(f"  @adyen/api-library JSON.parse+validateHMAC {node:>6,.0f}/s  -> crmpay {ratio:.2f}x the SDK "
              f"(target >= 1.00: {'met' if ratio >= 1.0 else 'MISSED'})")


if __name__ == "__main__":
    main()
