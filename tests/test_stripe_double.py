"""Tests of the Stripe test double itself (tests/doubles/stripe_double.py)
and of the test CA helper (tests/doubles/tlsca.py).

These prove the double behaves like Stripe where crmpay depends on it (TLS,
auth errors, bracket-notation bodies, idempotency, list pagination, signed
webhook events, fault injection), so that crmpay's own tests can trust it.

Run: /usr/bin/python3 -m pytest -q tests/test_stripe_double.py   (< 20 s)
"""

import hashlib
import hmac
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from doubles import tlsca  # noqa: E402
from doubles.stripe_double import (  # noqa: E402
    StripeDouble, StripeError, as_list, mask_key, parse_form, webhook_signature)

API_KEY = "sk_test_51CrmpayDoubleKeyAbCdEfGh1234"
OTHER_KEY = "sk_test_51CrmpayOtherKeyZyXwVuTs9876"
WEBHOOK_SECRET = "whsec_crmpayDoubleTestSecret0123456789"
PYTHON = "/usr/bin/python3"
DOUBLE_PY = os.path.join(HERE, "doubles", "stripe_double.py")
TLSCA_PY = os.path.join(HERE, "doubles", "tlsca.py")


# --------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return tlsca.make_ca_and_server_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def double(certs):
    d = StripeDouble([API_KEY, OTHER_KEY], WEBHOOK_SECRET, certs["server_cert"],
                     certs["server_key"])
    d.start()
    yield d
    d.stop()


@pytest.fixture(autouse=True)
def fresh(request):
    """Reset the shared double before each test that uses it."""
    if "double" in request.fixturenames:
        d = request.getfixturevalue("double")
        d.reset()
        d.configure(webhook_url=None, webhook_ca=None, latency=0)
    yield


@pytest.fixture(scope="module")
def tls(certs):
    return ssl.create_default_context(cafile=certs["ca_cert"])


def call(double, tls, method, path, params=None, key=API_KEY, idem=None, headers=None,
         timeout=10, raw=False):
    """One Stripe API call with urllib; returns (status, headers, parsed JSON)."""
    data = urllib.parse.urlencode(params or [])
    url = double.base_url + path
    body = None
    if method == "GET":
        if data:
            url += "?" + data
    else:
        body = data.encode()
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    if key is not None:
        req.add_header("Authorization", "Bearer " + key)
    if idem is not None:
        req.add_header("Idempotency-Key", idem)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        resp = urllib.request.urlopen(req, context=tls, timeout=timeout)
        status, hdrs, payload = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        status, hdrs, payload = e.code, e.headers, e.read()
    return status, hdrs, (payload if raw else json.loads(payload))


def session_params(amount=1999, qty=1, name="Order 123", currency="eur", extra=()):
    return [
        ("mode", "payment"),
        ("line_items[0][price_data][currency]", currency),
        ("line_items[0][price_data][unit_amount]", str(amount)),
        ("line_items[0][price_data][product_data][name]", name),
        ("line_items[0][quantity]", str(qty)),
        ("success_url", "https://crm.example/ok?cs={CHECKOUT_SESSION_ID}"),
        ("cancel_url", "https://crm.example/cancel"),
        ("client_reference_id", "order-123"),
        ("metadata[crm_order]", "123"),
        ("payment_intent_data[metadata][crm_order]", "123"),
    ] + list(extra)


def create_session(double, tls, **kw):
    idem = kw.pop("idem", None)
    status, _, body = call(double, tls, "POST", "/v1/checkout/sessions", session_params(**kw),
                           idem=idem)
    assert status == 200, body
    return body


def verify_signature(header, body, secret, tolerance=300):
    """Independent re-implementation of Stripe's v1 webhook check."""
    items = [part.split("=", 1) for part in header.split(",")]
    ts = [v for k, v in items if k == "t"]
    sigs = [v for k, v in items if k == "v1"]
    assert ts and sigs, header
    signed = ts[0].encode() + b"." + body.encode("utf-8")
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    assert abs(time.time() - int(ts[0])) <= tolerance
    return any(hmac.compare_digest(expected, s) for s in sigs)


class _Receiver:
    """A tiny webhook receiver recording what it gets."""

    def __init__(self, status=200, certs=None):
        self.got = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                outer.got.append({"path": self.path, "headers": dict(self.headers),
                                  "body": self.rfile.read(n)})
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        scheme = "http"
        if certs:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certs["server_cert"], certs["server_key"])
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = "%s://127.0.0.1:%d/stripe/webhook" % (scheme, self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def control(double, tls, method, path, obj=None):
    """Call a /_double/ control endpoint over HTTPS (JSON)."""
    data = json.dumps(obj).encode() if obj is not None else None
    req = urllib.request.Request(double.base_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        resp = urllib.request.urlopen(req, context=tls, timeout=10)
        return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# --------------------------------------------------------------------------
# TLS and the CA helper
# --------------------------------------------------------------------------


def test_tlsca_files_and_cli(tmp_path):
    out = subprocess.run([PYTHON, TLSCA_PY, str(tmp_path / "ca")], check=True,
                         capture_output=True, text=True, timeout=30)
    paths = json.loads(out.stdout)
    assert set(paths) == {"ca_cert", "server_cert", "server_key", "wrong_ca_cert"}
    for p in paths.values():
        assert os.path.isfile(p)
        assert stat.S_IMODE(os.stat(p).st_mode) & 0o444 == 0o444     # world-readable
    # openssl agrees: good CA verifies the server cert, wrong CA does not.
    ok = subprocess.run(["openssl", "verify", "-CAfile", paths["ca_cert"], paths["server_cert"]],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(["openssl", "verify", "-CAfile", paths["wrong_ca_cert"],
                          paths["server_cert"]], capture_output=True, text=True)
    assert bad.returncode != 0
    txt = subprocess.run(["openssl", "x509", "-in", paths["server_cert"], "-noout", "-text"],
                         capture_output=True, text=True, check=True).stdout
    assert "DNS:localhost" in txt and "IP Address:127.0.0.1" in txt
    ca_txt = subprocess.run(["openssl", "x509", "-in", paths["ca_cert"], "-noout", "-subject"],
                            capture_output=True, text=True, check=True).stdout
    assert "crmpay test CA" in ca_txt


def test_tls_with_right_ca_and_localhost_name(double, tls):
    status, hdrs, body = call(double, tls, "GET", "/v1/checkout/sessions")
    assert status == 200 and body["object"] == "list"
    # The certificate is also valid for the DNS name "localhost".
    url = "https://localhost:%d/v1/checkout/sessions" % double.port
    req = urllib.request.Request(url, headers={"Authorization": "Bearer " + API_KEY})
    assert urllib.request.urlopen(req, context=tls, timeout=10).status == 200


def test_tls_wrong_ca_is_refused(double, certs):
    wrong = ssl.create_default_context(cafile=certs["wrong_ca_cert"])
    with pytest.raises(urllib.error.URLError) as exc:
        urllib.request.urlopen(double.base_url + "/v1/checkout/sessions", context=wrong,
                               timeout=10)
    assert isinstance(exc.value.reason, ssl.SSLCertVerificationError)
    # Also refused with the system trust store (nobody else signed it).
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(double.base_url + "/v1/checkout/sessions",
                               context=ssl.create_default_context(), timeout=10)
    assert double.stats()["tls_handshake_failures"] >= 1


# --------------------------------------------------------------------------
# Auth
# --------------------------------------------------------------------------


def test_missing_key_401(double, tls):
    status, hdrs, body = call(double, tls, "GET", "/v1/checkout/sessions", key=None)
    assert status == 401
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("You did not provide an API key.")
    assert hdrs["Request-Id"].startswith("req_")


def test_bad_key_401_is_masked(double, tls):
    bad = "sk_test_51ThisKeyIsNotKnownXYZabcd"
    status, hdrs, body = call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                              key=bad)
    assert status == 401
    assert body == {"error": {"message": "Invalid API Key provided: " + mask_key(bad),
                              "type": "invalid_request_error"}}
    assert bad not in json.dumps(body)
    assert mask_key(bad) == "sk_test_" + "*" * (len(bad) - 12) + "abcd"
    assert hdrs["Content-Type"] == "application/json"
    assert double.stats()["sessions_created"] == 0


def test_basic_auth_is_accepted_like_stripe(double, tls):
    import base64
    cred = base64.b64encode((API_KEY + ":").encode()).decode()
    status, _, _ = call(double, tls, "GET", "/v1/checkout/sessions", key=None,
                        headers={"Authorization": "Basic " + cred})
    assert status == 200
    last = double.stats()["last_request"]
    assert last["headers"]["Authorization"].startswith("Basic ")
    assert API_KEY not in json.dumps(last)


# --------------------------------------------------------------------------
# Bracket-notation parsing and validation
# --------------------------------------------------------------------------


def test_parse_form_bracket_notation():
    body = urllib.parse.urlencode([
        ("mode", "payment"),
        ("line_items[0][price_data][unit_amount]", "1999"),
        ("line_items[0][price_data][product_data][name]", "A & B = C"),
        ("line_items[1][quantity]", "2"),
        ("metadata[k]", "v"),
        ("metadata[empty]", ""),
        ("payment_intent_data[metadata][crm_order]", "42"),
        ("expand[]", "payment_intent"),
        ("expand[]", "line_items"),
    ])
    got = parse_form(body)
    assert got == {
        "mode": "payment",
        "line_items": {"0": {"price_data": {"unit_amount": "1999",
                                            "product_data": {"name": "A & B = C"}}},
                       "1": {"quantity": "2"}},
        "metadata": {"k": "v", "empty": ""},
        "payment_intent_data": {"metadata": {"crm_order": "42"}},
        "expand": ["payment_intent", "line_items"],
    }
    assert as_list(got["line_items"], "line_items")[1] == {"quantity": "2"}
    # Percent-encoded brackets are the same thing.
    assert parse_form("metadata%5Bk%5D=v") == {"metadata": {"k": "v"}}
    with pytest.raises(StripeError):
        parse_form("a=1&a[b]=2")               # scalar and hash at once
    with pytest.raises(StripeError):
        as_list({"0": "x", "2": "y"}, "x")     # holes in an array


def test_create_session_object_shape(double, tls):
    params = session_params(amount=1999, qty=2) + [
        ("line_items[1][price_data][currency]", "eur"),
        ("line_items[1][price_data][unit_amount]", "500"),
        ("line_items[1][price_data][product_data][name]", "Shipping"),
        ("line_items[1][quantity]", "1"),
        ("customer_email", "buyer@example.com"),
    ]
    status, hdrs, s = call(double, tls, "POST", "/v1/checkout/sessions", params)
    assert status == 200
    assert hdrs["Content-Type"] == "application/json"
    assert hdrs["Request-Id"].startswith("req_")
    assert int(hdrs["Content-Length"]) > 0
    assert s["id"].startswith("cs_test_") and s["object"] == "checkout.session"
    assert s["amount_subtotal"] == s["amount_total"] == 2 * 1999 + 500
    assert s["currency"] == "eur" and s["mode"] == "payment"
    assert s["status"] == "open" and s["payment_status"] == "unpaid"
    assert s["payment_intent"] is None and s["livemode"] is False
    assert s["client_reference_id"] == "order-123"
    assert s["customer_email"] == "buyer@example.com"
    assert s["metadata"] == {"crm_order": "123"}
    assert s["url"] == "%s/c/pay/%s" % (double.base_url, s["id"])
    assert s["expires_at"] - s["created"] == 24 * 3600
    assert s["success_url"] == "https://crm.example/ok?cs={CHECKOUT_SESSION_ID}"
    # What the client sent is visible to tests, with bracket fields parsed.
    last = double.stats()["last_request"]
    assert last["params"]["line_items"]["1"]["price_data"]["unit_amount"] == "500"
    assert last["headers"]["Authorization"] == "Bearer " + mask_key(API_KEY)
    assert "line_items%5B0%5D%5Bquantity%5D=2" in last["body"]
    # Retrieve + line items + expand.
    status, _, got = call(double, tls, "GET", "/v1/checkout/sessions/" + s["id"])
    assert status == 200 and got == s
    status, _, li = call(double, tls, "GET", "/v1/checkout/sessions/%s/line_items" % s["id"])
    assert [x["description"] for x in li["data"]] == ["Order 123", "Shipping"]
    assert li["data"][0]["amount_total"] == 3998 and li["data"][0]["quantity"] == 2
    status, _, exp = call(double, tls, "GET", "/v1/checkout/sessions/" + s["id"],
                          [("expand[]", "line_items")])
    assert exp["line_items"]["object"] == "list"


@pytest.mark.parametrize("change,status,code,param,msg", [
    (lambda p: [x for x in p if x[0] != "mode"], 400, "parameter_missing", "mode",
     "Missing required param: mode."),
    (lambda p: [x for x in p if x[0] != "success_url"], 400, "parameter_missing",
     "success_url", "Missing required param: success_url."),
    (lambda p: p + [("bogus", "1")], 400, "parameter_unknown", "bogus",
     "Received unknown parameter: bogus"),
    (lambda p: p + [("line_items[0][price_data][colour]", "red")], 400, "parameter_unknown",
     "line_items[0][price_data][colour]", "Received unknown parameter"),
    (lambda p: [(k, "EUR" if k.endswith("[currency]") else v) for k, v in p], 400, None,
     "line_items[0][price_data][currency]", "Invalid currency: EUR"),
    (lambda p: [(k, "xyz" if k.endswith("[currency]") else v) for k, v in p], 400, None,
     "line_items[0][price_data][currency]", "Invalid currency: xyz"),
    (lambda p: [(k, "19.99" if k.endswith("[unit_amount]") else v) for k, v in p], 400,
     "parameter_invalid_integer", "line_items[0][price_data][unit_amount]",
     "Invalid integer: 19.99"),
    (lambda p: [(k, "-5" if k.endswith("[unit_amount]") else v) for k, v in p], 400,
     "parameter_invalid_integer", "line_items[0][price_data][unit_amount]",
     "Invalid non-negative integer"),
    (lambda p: [(k, "0" if k.endswith("[quantity]") else v) for k, v in p], 400,
     "parameter_invalid_integer", "line_items[0][quantity]", "greater than or equal to 1"),
    (lambda p: [(k, "subscriptions" if k == "mode" else v) for k, v in p], 400, None, "mode",
     "Invalid mode"),
    (lambda p: [x for x in p if not x[0].endswith("[product_data][name]")] +
     [("line_items[0][price_data][product_data][description]", "d")], 400,
     "parameter_missing", "line_items[0][price_data][product_data][name]", "Missing required"),
    (lambda p: [x for x in p if not x[0].endswith("[product_data][name]")], 400, None,
     "line_items[0][price_data]", "You must specify either `product` or `product_data`"),
    (lambda p: p + [("customer_email", "")], 400, "parameter_invalid_empty", "customer_email",
     "You passed an empty string for 'customer_email'"),
    (lambda p: p + [("customer_email", "not-an-email")], 400, "email_invalid",
     "customer_email", "Invalid email address"),
    (lambda p: [(k, "notaurl" if k == "success_url" else v) for k, v in p], 400, "url_invalid",
     "success_url", "Not a valid URL"),
    (lambda p: p + [("expires_at", str(int(time.time()) + 60))], 400, None, "expires_at",
     "at least 30 minutes"),
    (lambda p: p + [("expires_at", str(int(time.time()) + 2 * 86400))], 400, None,
     "expires_at", "less than 24 hours"),
])
def test_create_session_validation(double, tls, change, status, code, param, msg):
    st, _, body = call(double, tls, "POST", "/v1/checkout/sessions", change(session_params()),
                       idem="validation-key")
    assert st == status, body
    err = body["error"]
    assert err["type"] == "invalid_request_error"
    assert err.get("code") == code
    assert err["param"] == param
    assert msg in err["message"]
    assert double.stats()["sessions_created"] == 0
    # A request that failed validation is not stored under its idempotency
    # key: a corrected retry with the same key goes through.
    st, _, ok = call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                     idem="validation-key")
    assert st == 200 and ok["object"] == "checkout.session"


def test_custom_expires_at_and_404s(double, tls):
    exp = int(time.time()) + 3600
    s = create_session(double, tls, extra=[("expires_at", str(exp))])
    assert s["expires_at"] == exp
    for path, kind, oid in [("/v1/checkout/sessions/cs_test_nope", "checkout.session",
                             "cs_test_nope"),
                            ("/v1/payment_intents/pi_nope", "payment_intent", "pi_nope"),
                            ("/v1/charges/ch_nope", "charge", "ch_nope")]:
        status, _, body = call(double, tls, "GET", path)
        assert status == 404
        assert body["error"]["code"] == "resource_missing"
        assert body["error"]["message"] == "No such %s: '%s'" % (kind, oid)
    status, _, body = call(double, tls, "GET", "/v1/checkout/session")
    assert status == 404
    assert body["error"]["message"].startswith(
        "Unrecognized request URL (GET: /v1/checkout/session).")


# --------------------------------------------------------------------------
# Idempotency
# --------------------------------------------------------------------------


def test_idempotent_replay_and_mismatch(double, tls):
    st1, h1, s1 = call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                       idem="order-123-attempt-1")
    st2, h2, s2 = call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                       idem="order-123-attempt-1")
    assert st1 == st2 == 200
    assert s1 == s2
    assert h1.get("Idempotent-Replayed") is None
    assert h2["Idempotent-Replayed"] == "true"
    assert h2["Original-Request"] == h1["Request-Id"]
    st3, _, err = call(double, tls, "POST", "/v1/checkout/sessions",
                       session_params(amount=2999), idem="order-123-attempt-1")
    assert st3 == 400
    assert err["error"]["type"] == "idempotency_error"
    assert err["error"]["message"] == (
        "Keys for idempotent requests can only be used with the same parameters they were "
        "first used with. Try using a key other than 'order-123-attempt-1' if you meant to "
        "execute a different request.")
    # Keys are scoped per API key: the other key creates its own object.
    st4, _, s4 = call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                      idem="order-123-attempt-1", key=OTHER_KEY)
    assert st4 == 200 and s4["id"] != s1["id"]
    stats = double.stats()
    assert stats["sessions_created"] == 2
    assert stats["objects_created_per_idempotency_key"] == {"order-123-attempt-1": 2}
    assert stats["idempotent_replays"] == 1 and stats["idempotency_errors"] == 1
    req = double.requests()[-1]
    assert req["idempotency_key"] == "order-123-attempt-1"
    assert req["headers"]["Idempotency-Key"] == "order-123-attempt-1"


def test_idempotency_key_in_flight_gives_409(double, tls):
    double.configure(latency=0.6)
    results = []

    def worker():
        results.append(call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                            idem="inflight")[0])

    t = threading.Thread(target=worker)
    t.start()
    time.sleep(0.2)
    st, _, body = call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                       idem="inflight")
    t.join()
    assert results == [200]
    assert st == 409 and body["error"]["code"] == "idempotency_key_in_use"
    assert double.stats()["sessions_created"] == 1


# --------------------------------------------------------------------------
# Paying, events, webhook signatures
# --------------------------------------------------------------------------


def test_signature_function_matches_reference_vector_s1():
    """Vector S1 of shared/reference/gateways.md (inputs from stripe-python's tests)."""
    body = ('{\n  "id": "evt_test_webhook",\n  "object": "event",\n'
            '  "data": { "object": { "id": "rdr_123", "object": "terminal.reader" } }\n}')
    assert len(body.encode()) == 125
    assert webhook_signature("whsec_test_secret", 12345, body) == (
        "07b1ede164afb7b5de91267ffa656f568c65d6e0783ce0ac55ee094643578eda")
    assert webhook_signature("whsec_test_secret", 1700000000, body) == (
        "3bfab77baf5f7b6991a46c9b53b6547d7afc56148b10468fcad9f35c1992ffbd")


def _check_delivery(d, double):
    h = d["headers"]
    assert h["Content-Type"] == "application/json; charset=utf-8"
    assert h["User-Agent"] == "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
    assert verify_signature(h["Stripe-Signature"], d["body"], WEBHOOK_SECRET)
    assert not verify_signature(h["Stripe-Signature"], d["body"] + " ", WEBHOOK_SECRET)
    assert not verify_signature(h["Stripe-Signature"], d["body"], "whsec_other")
    evt = json.loads(d["body"])
    assert evt["id"] == d["event_id"] and evt["id"].startswith("evt_")
    assert evt["object"] == "event" and evt["type"] == d["type"]
    assert set(evt) == {"id", "object", "api_version", "created", "data", "livemode",
                        "pending_webhooks", "request", "type"}
    assert evt["livemode"] is False and "object" in evt["data"]
    return evt


def test_pay_paid_generates_signed_events(double, tls):
    s = create_session(double, tls, amount=1999, qty=2)
    res = double.pay(s["id"], "paid")
    types = [d["type"] for d in res["deliveries"]]
    assert types == ["charge.succeeded", "payment_intent.succeeded",
                     "checkout.session.completed"]
    evts = {d["type"]: _check_delivery(d, double) for d in res["deliveries"]}
    assert all(d["delivered_status"] is None for d in res["deliveries"])   # no URL set
    cs = evts["checkout.session.completed"]["data"]["object"]
    assert cs["id"] == s["id"] and cs["status"] == "complete"
    assert cs["payment_status"] == "paid" and cs["payment_intent"] == res["payment_intent"]
    assert cs["client_reference_id"] == "order-123" and cs["metadata"] == {"crm_order": "123"}
    pi = evts["payment_intent.succeeded"]["data"]["object"]
    assert pi["status"] == "succeeded" and pi["amount"] == pi["amount_received"] == 3998
    assert pi["metadata"] == {"crm_order": "123"}
    ch = evts["charge.succeeded"]["data"]["object"]
    assert ch["payment_intent"] == pi["id"] and ch["paid"] and ch["status"] == "succeeded"
    # API views agree.
    _, _, got = call(double, tls, "GET", "/v1/checkout/sessions/" + s["id"],
                     [("expand[]", "payment_intent")])
    assert got["status"] == "complete" and got["url"] is None
    assert got["payment_intent"]["id"] == pi["id"]
    _, _, txn = call(double, tls, "GET", "/v1/balance_transactions/" + ch["balance_transaction"])
    fee = round(3998 * 0.015) + 25
    assert (txn["amount"], txn["fee"], txn["net"]) == (3998, fee, 3998 - fee)
    assert txn["source"] == ch["id"] and txn["type"] == "charge"
    _, _, charge = call(double, tls, "GET", "/v1/charges/" + ch["id"])
    assert charge["amount"] == 3998
    _, _, pis = call(double, tls, "GET", "/v1/payment_intents")
    assert [p["id"] for p in pis["data"]] == [pi["id"]]
    assert pis["url"] == "/v1/payment_intents"
    # Paying twice is refused.
    with pytest.raises(Exception):
        double.pay(s["id"], "paid")


def test_pay_async_and_failed_outcomes(double, tls):
    s = create_session(double, tls)
    r1 = double.pay(s["id"], "async_pending")
    assert [d["type"] for d in r1["deliveries"]] == ["payment_intent.processing",
                                                     "checkout.session.completed"]
    done = json.loads(r1["deliveries"][1]["body"])["data"]["object"]
    assert done["status"] == "complete" and done["payment_status"] == "unpaid"
    r2 = double.pay(s["id"], "async_succeeded")
    assert [d["type"] for d in r2["deliveries"]] == [
        "charge.succeeded", "payment_intent.succeeded",
        "checkout.session.async_payment_succeeded"]
    assert r2["payment_intent"] == r1["payment_intent"]
    for d in r1["deliveries"] + r2["deliveries"]:
        _check_delivery(d, double)

    s2 = create_session(double, tls)
    r3 = double.pay(s2["id"], "async_failed")
    assert [d["type"] for d in r3["deliveries"]] == [
        "payment_intent.processing", "checkout.session.completed",
        "payment_intent.payment_failed", "checkout.session.async_payment_failed"]
    pi = double.get_object("payment_intent", r3["payment_intent"])
    assert pi["status"] == "requires_payment_method" and pi["last_payment_error"]

    s3 = create_session(double, tls)
    r4 = double.pay(s3["id"], "failed")
    assert [d["type"] for d in r4["deliveries"]] == ["payment_intent.payment_failed"]
    assert double.get_object("checkout.session", s3["id"])["status"] == "open"
    r5 = double.pay(s3["id"], "paid")                      # customer retries
    assert r5["payment_intent"] == r4["payment_intent"]
    assert r5["deliveries"][-1]["type"] == "checkout.session.completed"


def test_expire_and_refund(double, tls):
    s = create_session(double, tls)
    r = double.expire(s["id"])
    assert [d["type"] for d in r["deliveries"]] == ["checkout.session.expired"]
    assert json.loads(r["deliveries"][0]["body"])["data"]["object"]["status"] == "expired"
    with pytest.raises(Exception):
        double.pay(s["id"], "paid")
    # Stripe API expire endpoint.
    s2 = create_session(double, tls)
    st, _, body = call(double, tls, "POST", "/v1/checkout/sessions/%s/expire" % s2["id"])
    assert st == 200 and body["status"] == "expired" and body["url"] is None
    st, _, body = call(double, tls, "POST", "/v1/checkout/sessions/%s/expire" % s2["id"])
    assert st == 400 and "open" in body["error"]["message"]
    # Refunds.
    s3 = create_session(double, tls, amount=1000)
    paid = double.pay(s3["id"], "paid")
    r1 = double.refund(paid["payment_intent"], 300)
    evt = json.loads(r1["deliveries"][0]["body"])
    assert evt["type"] == "charge.refunded"
    ch = evt["data"]["object"]
    assert (ch["amount_refunded"], ch["refunded"], ch["payment_intent"]) == (
        300, False, paid["payment_intent"])
    assert evt["data"]["previous_attributes"] == {"amount_refunded": 0, "refunded": False}
    r2 = double.refund(paid["payment_intent"])             # the rest
    ch = json.loads(r2["deliveries"][0]["body"])["data"]["object"]
    assert (ch["amount_refunded"], ch["refunded"]) == (1000, True)
    with pytest.raises(Exception):
        double.refund(paid["payment_intent"], 1)
    _, _, txns = call(double, tls, "GET", "/v1/balance_transactions", [("type", "refund")])
    assert sorted(t["amount"] for t in txns["data"]) == [-700, -300]


def test_control_endpoints_over_https(double, tls):
    s = create_session(double, tls)
    st, res = control(double, tls, "POST", "/_double/checkout/sessions/%s/pay" % s["id"],
                      {"outcome": "paid"})
    assert st == 200 and len(res["deliveries"]) == 3
    for d in res["deliveries"]:
        _check_delivery(d, double)
    st, res = control(double, tls, "POST",
                      "/_double/payment_intents/%s/refund" % res["payment_intent"], {})
    assert st == 200 and res["deliveries"][0]["type"] == "charge.refunded"
    s2 = create_session(double, tls)
    st, res = control(double, tls, "POST", "/_double/checkout/sessions/%s/expire_now" % s2["id"])
    assert st == 200 and res["deliveries"][0]["type"] == "checkout.session.expired"
    st, res = control(double, tls, "POST", "/_double/checkout/sessions/cs_test_x/pay",
                      {"outcome": "paid"})
    assert st == 404 and "error" in res
    st, res = control(double, tls, "POST", "/_double/checkout/sessions/%s/pay" % s2["id"],
                      {"outcome": "bogus"})
    assert st == 400
    st, stats = control(double, tls, "GET", "/_double/stats")
    assert st == 200 and stats["sessions_created"] == 2
    assert stats["requests_by_path"]["POST /v1/checkout/sessions"] == 2
    st, reqs = control(double, tls, "GET", "/_double/requests?limit=1")
    assert len(reqs["requests"]) == 1
    st, _ = control(double, tls, "POST", "/_double/reset")
    assert double.stats()["requests_total"] == 0


def test_hosted_page(double, tls, certs):
    s = create_session(double, tls)
    resp = urllib.request.urlopen(s["url"], context=tls, timeout=10)
    assert resp.status == 200 and s["id"] in resp.read().decode()
    conn = http.client.HTTPSConnection("127.0.0.1", double.port, context=tls, timeout=10)
    conn.request("POST", "/c/pay/" + s["id"], body="outcome=paid",
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    r = conn.getresponse()
    r.read()
    assert r.status == 303
    assert r.getheader("Location") == "https://crm.example/ok?cs=" + s["id"]
    assert double.get_object("checkout.session", s["id"])["payment_status"] == "paid"


# --------------------------------------------------------------------------
# Lists and pagination
# --------------------------------------------------------------------------


def test_list_pagination(double, tls):
    ids = [create_session(double, tls)["id"] for _ in range(25)]
    newest_first = list(reversed(ids))
    st, _, page = call(double, tls, "GET", "/v1/checkout/sessions")
    assert st == 200 and page["object"] == "list" and page["url"] == "/v1/checkout/sessions"
    assert [o["id"] for o in page["data"]] == newest_first[:10] and page["has_more"] is True
    seen, after = [], None
    while True:
        params = [("limit", "7")] + ([("starting_after", after)] if after else [])
        _, _, page = call(double, tls, "GET", "/v1/checkout/sessions", params)
        seen += [o["id"] for o in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == newest_first
    _, _, back = call(double, tls, "GET", "/v1/checkout/sessions",
                      [("limit", "5"), ("ending_before", newest_first[12])])
    assert [o["id"] for o in back["data"]] == newest_first[7:12] and back["has_more"] is True
    now = int(time.time())
    _, _, none = call(double, tls, "GET", "/v1/checkout/sessions",
                      [("created[gt]", str(now + 1000))])
    assert none["data"] == [] and none["has_more"] is False
    _, _, some = call(double, tls, "GET", "/v1/checkout/sessions",
                      [("created[gte]", str(now - 1000)), ("created[lte]", str(now + 1000)),
                       ("limit", "100")])
    assert len(some["data"]) == 25
    for bad, param in [([("limit", "0")], "limit"), ([("limit", "101")], "limit"),
                       ([("limit", "x")], "limit"),
                       ([("starting_after", ids[0]), ("ending_before", ids[1])],
                        "ending_before"),
                       ([("created[since]", "1")], "created[since]"),
                       ([("colour", "red")], "colour")]:
        st, _, err = call(double, tls, "GET", "/v1/checkout/sessions", bad)
        assert st == 400 and err["error"]["param"] == param, (bad, err)
    st, _, err = call(double, tls, "GET", "/v1/checkout/sessions",
                      [("starting_after", "cs_test_unknown")])
    assert st == 404 and err["error"]["code"] == "resource_missing"


def test_list_filters_and_events(double, tls):
    a = create_session(double, tls)
    b = create_session(double, tls)
    pa = double.pay(a["id"], "paid")
    _, _, lst = call(double, tls, "GET", "/v1/checkout/sessions",
                     [("payment_intent", pa["payment_intent"])])
    assert [o["id"] for o in lst["data"]] == [a["id"]]
    _, _, lst = call(double, tls, "GET", "/v1/checkout/sessions", [("status", "open")])
    assert [o["id"] for o in lst["data"]] == [b["id"]]
    _, _, ev = call(double, tls, "GET", "/v1/events", [("type", "checkout.session.*")])
    assert [e["type"] for e in ev["data"]] == ["checkout.session.completed"]
    _, _, chs = call(double, tls, "GET", "/v1/charges",
                     [("payment_intent", pa["payment_intent"]),
                      ("expand[]", "data.balance_transaction")])
    assert chs["data"][0]["balance_transaction"]["object"] == "balance_transaction"


# --------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------


def test_fault_500_and_503_create_nothing(double, tls):
    double.set_faults(mode="500", count=2)
    for _ in range(2):
        st, hdrs, body = call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                              idem="k500")
        assert st == 500 and body["error"]["type"] == "api_error"
        assert hdrs["Request-Id"].startswith("req_")
    st, _, ok = call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                     idem="k500")
    assert st == 200
    double.set_faults(mode="503", count=1, retry_after=2)
    st, hdrs, body = call(double, tls, "GET", "/v1/checkout/sessions")
    assert st == 503 and hdrs["Retry-After"] == "2" and body["error"]["type"] == "api_error"
    stats = double.stats()
    assert stats["sessions_created"] == 1
    assert stats["objects_created_per_idempotency_key"] == {"k500": 1}
    assert stats["faults_injected"] == 3
    assert stats["faults_injected_by_mode"] == {"500": 2, "503": 1}


def test_fault_429_rate_limit(double, tls):
    st, res = control(double, tls, "POST", "/_double/faults",
                      {"mode": "429", "count": 1, "retry_after": 3})
    assert st == 200 and res["mode"] == "429"
    st, hdrs, body = call(double, tls, "POST", "/v1/checkout/sessions", session_params())
    assert st == 429 and hdrs["Retry-After"] == "3"
    assert body["error"]["code"] == "rate_limit"
    assert body["error"]["type"] == "invalid_request_error"
    assert double.stats()["sessions_created"] == 0
    assert call(double, tls, "POST", "/v1/checkout/sessions", session_params())[0] == 200


def _expect_connection_failure(fn):
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError,
                        ssl.SSLError, OSError)):
        fn()


def test_fault_drop_and_bad_json(double, tls):
    double.set_faults(mode="drop", count=1)
    _expect_connection_failure(
        lambda: call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                     idem="kdrop"))
    assert double.stats()["sessions_created"] == 0
    double.set_faults(mode="bad_json", count=1)
    st, hdrs, raw = call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                         idem="kdrop", raw=True)
    assert st == 200
    with pytest.raises(ValueError):
        json.loads(raw)
    assert double.stats()["sessions_created"] == 0
    st, _, ok = call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                     idem="kdrop")
    assert st == 200 and double.stats()["objects_created_per_idempotency_key"] == {"kdrop": 1}


@pytest.mark.parametrize("mode", ["slow", "drop_after_create"])
def test_fault_created_but_client_lost_answer(double, tls, mode):
    double.set_faults(mode=mode, count=1, delay=1.0)
    if mode == "slow":
        with pytest.raises((socket.timeout, TimeoutError, urllib.error.URLError)):
            call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                 idem="crash-window", timeout=0.3)
    else:
        _expect_connection_failure(
            lambda: call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                         idem="crash-window"))
    # The gateway did create it...
    assert double.stats()["sessions_created"] == 1
    # ...and a retry with the same key gets the same object, not a duplicate.
    st, hdrs, s = call(double, tls, "POST", "/v1/checkout/sessions", session_params(),
                       idem="crash-window")
    assert st == 200 and hdrs["Idempotent-Replayed"] == "true"
    _, _, lst = call(double, tls, "GET", "/v1/checkout/sessions")
    assert [o["id"] for o in lst["data"]] == [s["id"]]
    assert double.stats()["objects_created_per_idempotency_key"] == {"crash-window": 1}


def test_fault_probability_and_path_prefix(double, tls):
    double.set_faults(mode="500", path_prefix="/v1/payment_intents")
    assert call(double, tls, "GET", "/v1/checkout/sessions")[0] == 200
    assert call(double, tls, "GET", "/v1/payment_intents")[0] == 500
    assert call(double, tls, "GET", "/v1/payment_intents")[0] == 500     # count=None
    double.set_faults(mode="500", probability=0.5)
    codes = [call(double, tls, "GET", "/v1/charges")[0] for _ in range(40)]
    assert 500 in codes and 200 in codes
    double.set_faults(mode="none")
    assert call(double, tls, "GET", "/v1/payment_intents")[0] == 200


def test_latency(double, tls):
    double.configure(latency=0.25)
    t0 = time.monotonic()
    assert call(double, tls, "GET", "/v1/checkout/sessions")[0] == 200
    assert time.monotonic() - t0 >= 0.25


# --------------------------------------------------------------------------
# Webhook delivery, keep-alive, concurrency
# --------------------------------------------------------------------------


def test_webhook_delivery_http_and_https(double, tls, certs):
    rx = _Receiver()
    try:
        double.configure(webhook_url=rx.url)
        s = create_session(double, tls)
        res = double.pay(s["id"], "paid")
        assert [d["delivered_status"] for d in res["deliveries"]] == [200, 200, 200]
        assert len(rx.got) == 3
        for d, got in zip(res["deliveries"], rx.got):
            assert got["path"] == "/stripe/webhook"
            assert got["body"].decode() == d["body"]            # exact raw bytes
            assert got["headers"]["Stripe-Signature"] == d["headers"]["Stripe-Signature"]
            assert got["headers"]["Content-Type"] == "application/json; charset=utf-8"
            assert got["headers"]["User-Agent"].startswith("Stripe/1.0")
            assert verify_signature(got["headers"]["Stripe-Signature"], got["body"].decode(),
                                    WEBHOOK_SECRET)
            assert json.loads(got["body"])["pending_webhooks"] == 1
        # API-triggered events are delivered asynchronously.
        s2 = create_session(double, tls)
        call(double, tls, "POST", "/v1/checkout/sessions/%s/expire" % s2["id"],
             idem="expire-1")
        deadline = time.time() + 5
        while len(rx.got) < 4 and time.time() < deadline:
            time.sleep(0.02)
        evt = json.loads(rx.got[3]["body"])
        assert evt["type"] == "checkout.session.expired"
        assert evt["request"]["idempotency_key"] == "expire-1"
        assert evt["request"]["id"].startswith("req_")
        # Redelivery (duplicates happen) with an old timestamp.
        old = double.resend(evt["id"], timestamp=int(time.time()) - 3600)["deliveries"][0]
        assert old["body"] == rx.got[3]["body"].decode()
        assert old["headers"]["Stripe-Signature"].startswith("t=%d," % (int(time.time()) - 3600))
    finally:
        rx.close()
    bad = _Receiver(status=500)
    try:
        double.configure(webhook_url=bad.url)
        s = create_session(double, tls)
        res = double.pay(s["id"], "failed")
        assert res["deliveries"][0]["delivered_status"] == 500
    finally:
        bad.close()
    srx = _Receiver(certs=certs)
    try:
        double.configure(webhook_url=srx.url, webhook_ca=certs["ca_cert"])
        s = create_session(double, tls)
        res = double.expire(s["id"])
        assert res["deliveries"][0]["delivered_status"] == 200 and len(srx.got) == 1
        double.configure(webhook_ca=certs["wrong_ca_cert"])      # wrong CA: refused
        s = create_session(double, tls)
        res = double.expire(s["id"])
        assert res["deliveries"][0]["delivered_status"] is None
        assert "SSL" in res["deliveries"][0]["delivery_error"]
    finally:
        srx.close()


def test_keep_alive_and_headers(double, tls):
    conn = http.client.HTTPSConnection("127.0.0.1", double.port, context=tls, timeout=10)
    sock = None
    for i in range(5):
        body = urllib.parse.urlencode(session_params())
        conn.request("POST", "/v1/checkout/sessions", body=body, headers={
            "Authorization": "Bearer " + API_KEY, "Idempotency-Key": "ka-%d" % i,
            "Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        data = r.read()
        assert r.status == 200 and int(r.getheader("Content-Length")) == len(data)
        assert r.getheader("Request-Id").startswith("req_")
        if sock is None:
            sock = conn.sock
        assert conn.sock is sock                                 # same connection reused
    conn.close()


def test_64_concurrent_connections(double, tls):
    n = 64
    barrier = threading.Barrier(n)
    errors, statuses = [], []

    def worker(i):
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", double.port, context=tls,
                                               timeout=20)
            conn.connect()
            barrier.wait(timeout=20)
            for j in range(2):
                conn.request("POST", "/v1/checkout/sessions",
                             body=urllib.parse.urlencode(session_params()),
                             headers={"Authorization": "Bearer " + API_KEY,
                                      "Idempotency-Key": "c-%d-%d" % (i, j),
                                      "Content-Type": "application/x-www-form-urlencoded"})
                r = conn.getresponse()
                r.read()
                statuses.append(r.status)
            conn.close()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert statuses == [200] * (2 * n)
    stats = double.stats()
    assert stats["sessions_created"] == 2 * n
    assert set(stats["objects_created_per_idempotency_key"].values()) == {1}


# --------------------------------------------------------------------------
# CLI and (optional) cross-check with the official stripe npm package
# --------------------------------------------------------------------------


def test_cli_ready_file_and_sigterm(tmp_path, certs, tls):
    ready = tmp_path / "ready"
    proc = subprocess.Popen([PYTHON, DOUBLE_PY, "--cert", certs["server_cert"],
                             "--key", certs["server_key"], "--api-key", API_KEY,
                             "--webhook-secret", WEBHOOK_SECRET, "--port", "0",
                             "--ready-file", str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 10
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        base = ready.read_text().strip()
        assert base.startswith("https://127.0.0.1:")
        req = urllib.request.Request(base + "/v1/checkout/sessions",
                                     headers={"Authorization": "Bearer " + API_KEY})
        assert urllib.request.urlopen(req, context=tls, timeout=10).status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert err == b""                                         # quiet by default


def test_signature_with_official_stripe_node_package(double, tls):
    """Optional: verify with stripe-node's constructEvent if it is installed."""
    pkg = os.path.join(HERE, "node", "node_modules", "stripe")
    node = shutil.which("node")
    if not node or not os.path.isdir(pkg):
        pytest.skip("node or tests/node/node_modules/stripe not installed (bash tests/node/install.sh)")
    s = create_session(double, tls)
    d = double.pay(s["id"], "paid")["deliveries"][-1]
    script = (
        "const Stripe = require(%s);"
        "const stripe = Stripe('sk_test_x');"
        "const fs = require('fs');"
        "const a = JSON.parse(fs.readFileSync(0, 'utf8'));"
        "const evt = stripe.webhooks.constructEvent(a.body, a.sig, a.secret);"
        "process.stdout.write(evt.id);" % json.dumps(pkg))
    out = subprocess.run([node, "-e", script], input=json.dumps(
        {"body": d["body"], "sig": d["headers"]["Stripe-Signature"],
         "secret": WEBHOOK_SECRET}), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == d["event_id"]
