"""Benchmark (issue 3): Redsys notification verification, measured in one run.

Verifications per second on a realistic notification (a redirect payment's
form-encoded Ds_SignatureVersion / Ds_MerchantParameters / Ds_Signature,
about 800 bytes), three ways:

1. crmpay.verify_signature('redsys', ...) in SQL (form parsing, base64,
   JSON, 3DES, HMAC, constant-time compare);
2. raw OpenSSL in C with the same primitives (bench/raw_redsys.c: 3DES-CBC
   + HMAC-SHA256 + base64 decode + CRYPTO_memcmp, no parsing);
3. redsys-easy's verifier in node (tests/node; skipped if node or the
   module is missing).
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from lib.cluster import PgCluster  # noqa: E402
from doubles import redsys_double as rd  # noqa: E402

BINDIR = os.environ["CRMPAY_PG_BINDIR"]
KEY = "sq7HjrUOBfKmC576ILgskD5srU870gJ7"
ORDER = "863170589631"


def notification():
    params = {"Ds_Date": "26%2F11%2F2026", "Ds_Hour": "10%3A41", "Ds_SecurePayment": "1",
              "Ds_Card_Number": "454881******0004", "Ds_Card_Country": "724", "Ds_Amount": "1999",
              "Ds_Currency": "978", "Ds_Order": ORDER, "Ds_MerchantCode": "999008881",
              "Ds_Terminal": "001", "Ds_Response": "0000", "Ds_MerchantData": "ORD-1001",
              "Ds_TransactionType": "0", "Ds_ConsumerLanguage": "1", "Ds_AuthorisationCode": "052029",
              "Ds_Card_Brand": "1", "Ds_ProcessedPayMethod": "1"}
    text, sig = rd.sign_params(KEY, params, urlsafe=True)
    body = urllib.parse.urlencode({"Ds_SignatureVersion": "HMAC_SHA256_V1",
                                   "Ds_MerchantParameters": text, "Ds_Signature": sig})
    return body, text, sig


def best_of(runs, fn):
    return max(fn() for _ in range(runs))


def main():
    body, params_text, sig = notification()
    tmp = tempfile.mkdtemp(prefix="crmpay-bench-redsys-")
    cluster = PgCluster(BINDIR, settings={"synchronous_commit": "off"})
    cluster.start()
    try:
        cluster.create_database("bench")
        conn = cluster.connect("bench")
        conn.execute("CREATE EXTENSION crmpay")
        n = 100000
        sql = ("SELECT count(*) FROM generate_series(1, %s) "
               "WHERE crmpay.verify_signature('redsys', %s, '{}', %s)")

        def crmpay_rate():
            t0 = time.perf_counter()
            ok = conn.execute(sql, (n, KEY, body)).fetchone()[0]
            assert ok == n, "every verification must succeed"
            return n / (time.perf_counter() - t0)

        crmpay = best_of(3, crmpay_rate)

        with open(os.path.join(tmp, "params.txt"), "w") as f:
            f.write(params_text)
        exe = os.path.join(tmp, "raw_redsys")
        subprocess.run(["cc", "-O2", "-o", exe, os.path.join(REPO, "bench", "raw_redsys.c"), "-lcrypto"],
                       check=True)
        key_hex = base64.b64decode(KEY).hex()
        raw = best_of(3, lambda: float(subprocess.run(
            [exe, key_hex, ORDER, os.path.join(tmp, "params.txt"), sig, str(n * 5)],
            check=True, capture_output=True, text=True).stdout))

        print(f"notification: {len(body)} bytes, form-encoded, Ds_Order {ORDER}")
        print(f"crmpay.verify_signature('redsys'): {crmpay:,.0f}/s in SQL")
        print(f"raw OpenSSL (3DES + HMAC-SHA256 + compare, C): {raw:,.0f}/s "
              f"-> crmpay at {crmpay / raw:.2f} of raw")
        node_modules = os.path.join(REPO, "tests", "node", "node_modules", "redsys-easy")
        if shutil.which("node") and os.path.isdir(node_modules):
            with open(os.path.join(tmp, "body.txt"), "w") as f:
                f.write(body)
            easy = best_of(3, lambda: float(subprocess.run(
                ["node", os.path.join(REPO, "bench", "redsys_easy_verify.js"), KEY,
                 os.path.join(tmp, "body.txt"), str(n)],
                check=True, capture_output=True, text=True).stdout))
            print(f"redsys-easy processRedirectNotification (node): {easy:,.0f}/s "
                  f"-> crmpay at {crmpay / easy:.2f}x redsys-easy")
        else:
            print("redsys-easy: skipped (run tests/node/install.sh; needs node and npm)")
        conn.close()
    finally:
        cluster.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
