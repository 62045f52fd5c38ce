"""Tests of the Adyen test double itself (tests/doubles/adyen_double.py),
over real HTTPS with the test CA: auth and error bodies, idempotency,
link lookups and expiry, the hosted page, signed notifications checked with
an independent HMAC, control endpoints and the CLI.  (< 10 s)"""

import base64
import binascii
import hashlib
import hmac
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from doubles.adyen_double import AdyenDouble  # noqa: E402

API_KEY = "AQEyhmfxK4_double_test_0123456789abcdef"
OTHER_KEY = "AQEyhmfxK4_double_other_0123456789abcde"
HMAC_KEY = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"


@pytest.fixture(scope="module")
def double(tls):
    d = AdyenDouble([API_KEY, OTHER_KEY], HMAC_KEY, tls["server_cert"], tls["server_key"],
                    merchant_accounts={OTHER_KEY: {"OtherECOM"}})
    d.start()
    yield d
    d.stop()


@pytest.fixture
def call(double, tls):
    double.reset()
    ctx = ssl.create_default_context(cafile=tls["ca_cert"])

    def request(method, path, body=None, key=API_KEY, headers=None):
        hdrs = {"Content-Type": "application/json"}
        if key:
            hdrs["X-API-Key"] = key
        hdrs.update(headers or {})
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(double.base_url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read().decode()
    return request


LINK = {"reference": "ORD-1", "amount": {"value": 1999, "currency": "EUR"},
        "merchantAccount": "ShopECOM", "returnUrl": "https://shop.example/paid"}


def test_auth_and_error_bodies(call):
    status, _, body = call("POST", "/v71/paymentLinks", LINK, key=None)
    assert status == 401
    assert json.loads(body) == {"status": 401, "errorCode": "000",
                                "message": "HTTP Status Response - Unauthorized", "errorType": "security"}
    status, _, body = call("POST", "/v71/paymentLinks", LINK, key=OTHER_KEY)
    err = json.loads(body)
    assert status == 403 and err["errorCode"] == "010" and err["message"] == "Not allowed"
    assert len(err["pspReference"]) == 16
    status, _, body = call("POST", "/v71/paymentLinks", {k: v for k, v in LINK.items() if k != "amount"})
    assert status == 422 and json.loads(body)["message"] == "Required object 'amount' is not provided."
    status, _, body = call("POST", "/v71/paymentLinks", dict(LINK, metadata={str(i): "v" for i in range(21)}))
    assert status == 422 and json.loads(body)["errorCode"] == "177"
    status, _, body = call("POST", "/v71/paymentLinks", dict(LINK, metadata={"k" * 21: "v"}))
    assert status == 422 and json.loads(body)["errorCode"] == "178"
    status, _, body = call("POST", "/v71/paymentLinks", dict(LINK, bogus=1))
    assert status == 400 and "unknown fields: [bogus]" in json.loads(body)["message"]
    status, _, body = call("POST", "/v71/paymentLinks", b"{not json")
    assert status == 400 and json.loads(body)["errorCode"] == "702"
    status, _, body = call("POST", "/v70/paymentLinks", LINK)
    assert status == 404


def test_create_lookup_expire_and_idempotency(call, double):
    status, headers, body = call("POST", "/v71/paymentLinks", LINK, headers={"Idempotency-Key": "k-1"})
    link = json.loads(body)
    assert status == 201 and link["status"] == "active" and link["id"].startswith("PL")
    assert link["url"] == double.base_url + "/l/" + link["id"]
    assert headers["Idempotency-Key"] == "k-1"
    expires = time.mktime(time.strptime(link["expiresAt"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert abs(expires - time.time() - 86400) < 120
    # same key, other body: Adyen answers with the first response
    status, _, again = call("POST", "/v71/paymentLinks", dict(LINK, reference="ORD-2"),
                            headers={"Idempotency-Key": "k-1"})
    assert status == 201 and json.loads(again)["id"] == link["id"]
    assert double.stats()["links_created"] == 1 and double.stats()["idempotent_replays"] == 1
    status, _, _ = call("POST", "/v71/paymentLinks", LINK, headers={"Idempotency-Key": "x" * 65})
    assert status == 422

    status, _, body = call("GET", "/v71/paymentLinks/" + link["id"], None)
    assert status == 200 and json.loads(body)["reference"] == "ORD-1"
    status, _, body = call("PATCH", "/v71/paymentLinks/" + link["id"], {"status": "active"})
    assert status == 422
    status, _, body = call("PATCH", "/v71/paymentLinks/" + link["id"], {"status": "expired"})
    assert status == 200 and json.loads(body)["status"] == "expired"
    status, _, body = call("GET", "/v71/paymentLinks/PLNOSUCHLINK00000", None)
    assert status == 422
    for r in double.requests():
        key = next(v for k, v in r["headers"].items() if k.lower() == "x-api-key")
        assert key != API_KEY and "*" in key


def test_hosted_page_and_signed_notifications(call, double):
    link = json.loads(call("POST", "/v71/paymentLinks", LINK)[2])
    status, _, page = call("GET", "/l/" + link["id"], None, key=None)
    assert status == 200 and link["id"] in page and "1999 EUR" in page
    paid = double.pay(link["id"], "authorised")
    delivery = paid["deliveries"][0]
    notification = json.loads(delivery["body"])
    item = notification["notificationItems"][0]["NotificationRequestItem"]
    assert notification["live"] == "false"
    assert item["eventCode"] == "AUTHORISATION" and item["success"] == "true"
    assert item["additionalData"]["paymentLinkId"] == link["id"]
    assert item["merchantReference"] == "ORD-1" and item["amount"] == {"currency": "EUR", "value": 1999}
    signing = f"{item['pspReference']}::ShopECOM:ORD-1:1999:EUR:AUTHORISATION:true"
    expected = base64.b64encode(hmac.new(binascii.unhexlify(HMAC_KEY), signing.encode(), hashlib.sha256).digest())
    assert item["additionalData"]["hmacSignature"] == expected.decode()
    assert double.get_link(link["id"])["status"] == "completed"
    # a completed link cannot be expired
    status, _, body = call("PATCH", "/v71/paymentLinks/" + link["id"], {"status": "expired"})
    assert status == 422 and "completed" in json.loads(body)["message"]
    # modifications name the payment in originalReference
    refund = double.refund(paid["psp_reference"], 500)["deliveries"][0]
    ref_item = json.loads(refund["body"])["notificationItems"][0]["NotificationRequestItem"]
    assert ref_item["originalReference"] == paid["psp_reference"]
    assert ref_item["eventCode"] == "REFUND" and ref_item["amount"]["value"] == 500
    # header-signed whole bodies
    whole = double.notify([item], sign="header")
    assert whole["headers"]["HmacSignature"] == base64.b64encode(hmac.new(
        binascii.unhexlify(HMAC_KEY), whole["body"].encode(), hashlib.sha256).digest()).decode()


def test_control_endpoints_and_faults(call, double):
    link = json.loads(call("POST", "/v71/paymentLinks", LINK)[2])
    status, _, body = call("POST", f"/_double/paymentLinks/{link['id']}/pay", {"outcome": "refused"}, key=None)
    assert status == 200 and json.loads(body)["deliveries"][0]["items"][0]["success"] == "false"
    status, _, body = call("POST", "/_double/paymentLinks/PLX/pay", {}, key=None)
    assert status == 404
    call("POST", "/_double/faults", {"mode": "503", "count": 1, "retry_after": 3}, key=None)
    status, headers, body = call("POST", "/v71/paymentLinks", LINK)
    assert status == 503 and headers["Retry-After"] == "3"
    assert call("POST", "/v71/paymentLinks", LINK)[0] == 201
    status, _, body = call("GET", "/_double/stats", None, key=None)
    assert json.loads(body)["faults_injected"] == 1


def test_cli_serves_until_terminated(tls, tmp_path):
    ready = tmp_path / "ready"
    proc = subprocess.Popen(["/usr/bin/python3", os.path.join(HERE, "doubles", "adyen_double.py"),
                             "--cert", tls["server_cert"], "--key", tls["server_key"], "--api-key", API_KEY,
                             "--hmac-key", HMAC_KEY, "--ready-file", str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if ready.exists():
                break
            time.sleep(0.05)
        base = ready.read_text().strip()
        ctx = ssl.create_default_context(cafile=tls["ca_cert"])
        with urllib.request.urlopen(base + "/_double/health", context=ctx, timeout=5) as resp:
            assert json.loads(resp.read()) == {"ok": True}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
