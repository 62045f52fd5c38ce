#!/usr/bin/python3
"""PayPal test double for the crmpay test suite.

A loopback HTTPS server speaking the part of PayPal's REST API crmpay uses,
plus test-only control endpoints under ``/_double/``.  It reuses the HTTP
plumbing of stripe_double.py (threading TLS server, drop/keep-alive
handling).

Fidelity (PayPal REST docs and SDKs; "approx." marks best effort):

* ``POST /v1/oauth2/token``: HTTP Basic ``client_id:client_secret``, form
  body ``grant_type=client_credentials`` -> ``{"scope", "access_token",
  "token_type": "Bearer", "app_id", "expires_in", "nonce"}``.  Errors are
  OAuth style: 401 ``{"error": "invalid_client", "error_description":
  "Client Authentication failed"}``, 400 ``unsupported_grant_type``.
  Tokens expire after ``expires_in`` seconds (configurable, to test
  refresh); an expired or revoked token gets 401 ``{"error":
  "invalid_token", "error_description": "Token signature verification
  failed"}``; no Authorization header gets 401 ``AUTHENTICATION_FAILURE``.
* ``POST /v2/checkout/orders`` (intent CAPTURE, one purchase unit,
  ``amount.value`` a decimal string with the currency's decimals: JPY,
  HUF and TWD take none), ``Prefer: return=minimal|representation``,
  ``PayPal-Request-Id`` idempotency: the same id with the same body gets the
  order as it is now (no new order); with another body 422
  ``PAYPAL_REQUEST_ID_PREVIOUSLY_USED`` (approx.).  Errors use PayPal's
  ``{"name", "message", "debug_id", "details": [{"field", "value",
  "location", "issue", "description"}], "links"}`` shape (400
  INVALID_REQUEST, 422 UNPROCESSABLE_ENTITY, 404 RESOURCE_NOT_FOUND).
* ``GET /v2/checkout/orders/{id}``, ``POST /v2/checkout/orders/{id}/capture``
  (422 ``ORDER_NOT_APPROVED`` / ``ORDER_ALREADY_CAPTURED``; its own
  PayPal-Request-Id replays the first answer).
* Webhooks: compact JSON event envelopes signed as PayPal does: headers
  PAYPAL-TRANSMISSION-ID/-TIME/-SIG, PAYPAL-CERT-URL, PAYPAL-AUTH-ALGO
  (SHA256withRSA), sig = RSA-SHA256 over
  ``id|time|webhook_id|crc32(body)``.  The signing key and certificate
  (CN messageverificationcerts.paypal.com, issued by the test CA) are made
  at start with the openssl CLI; the certificate is served at
  ``GET /v1/notifications/certs/CERT-...``.
* ``GET /v1/reporting/transactions`` (Transaction Search): captures as
  T0006 and refunds (made with ``refund()``) as T1107 of the date range,
  ``transaction_info`` with signed decimal amounts, a 3.49 % + 0.49 fee,
  the order reference in ``custom_field``; ranges over 31 days, bad dates
  and page sizes outside 1..500 are 400 INVALID_REQUEST; ``page`` /
  ``total_pages`` paging.
* ``POST /v1/notifications/verify-webhook-signature``: SUCCESS when the
  transmission is one the double sent, with the same signature, time, cert
  URL and webhook id, and ``webhook_event`` equal to the event sent.

Python API::

    d = PayPalDouble({"client": "secret"}, webhook_id="WH-ID", ca_cert=..., ca_key=...,
                     certfile=..., keyfile=...)
    base = d.start()
    delivery = d.approve(order_id)         # CHECKOUT.ORDER.APPROVED, signed
    d.deliveries()                         # every event the double sent
    d.configure(expires_in=2); d.revoke_tokens(); d.set_faults("500", count=1)
"""

import base64
import copy
import datetime
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stripe_double import _Handler  # noqa: E402  (shared HTTP plumbing)
from tls_server import ServedDouble  # noqa: E402

# Decimals PayPal takes per currency (developer.paypal.com "Currency codes").
CURRENCY_DECIMALS = {c: 2 for c in (
    "AUD BRL CAD CNY CZK DKK EUR HKD ILS MYR MXN NZD NOK PHP PLN GBP RUB SGD SEK CHF THB USD"
).split()}
CURRENCY_DECIMALS.update({"JPY": 0, "HUF": 0, "TWD": 0})

FAULT_MODES = ("none", "500", "503", "429", "drop", "bad_json")
SIGNING_CN = "messageverificationcerts.paypal.com"


def _debug_id():
    return secrets.token_hex(7)[:13]


def _now_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class PayPalError(Exception):
    def __init__(self, status, name, message, details=None, headers=None):
        super().__init__(message)
        self.status = status
        self.name = name
        self.message = message
        self.details = details or []
        self.headers = headers or {}

    def body(self):
        body = {"name": self.name, "message": self.message, "debug_id": _debug_id()}
        if self.details:
            body["details"] = self.details
        body["links"] = [{"href": "https://developer.paypal.com/api/rest/reference/orders/v2/"
                          "errors/#%s" % (self.details[0]["issue"] if self.details else self.name),
                          "rel": "information_link", "method": "GET"}]
        return body


class OAuthError(Exception):
    def __init__(self, status, error, description):
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


def _invalid(field, value, issue, description, status=400):
    name = "INVALID_REQUEST" if status == 400 else "UNPROCESSABLE_ENTITY"
    message = ("Request is not well-formed, syntactically incorrect, or violates schema."
               if status == 400 else
               "The requested action could not be performed, semantically incorrect, or "
               "failed business validation.")
    detail = {"field": field, "location": "body", "issue": issue, "description": description}
    if value is not None:
        detail["value"] = value
    return PayPalError(status, name, message, [detail])


def _openssl(args, cwd):
    subprocess.run([shutil.which("openssl") or "/usr/bin/openssl"] + args, cwd=cwd, check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RANDFILE": "/dev/null"})


def make_signing_cert(directory, ca_cert, ca_key, cn=SIGNING_CN, days=7):
    """An RSA-2048 key and a certificate for cn issued by the test CA (openssl CLI)."""
    key = os.path.join(directory, "paypal-signing.key")
    csr = os.path.join(directory, "paypal-signing.csr")
    crt = os.path.join(directory, "paypal-signing.crt")
    ext = os.path.join(directory, "paypal-signing.ext")
    with open(ext, "w") as fh:
        fh.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                 "subjectAltName=DNS:%s\n" % cn)
    _openssl(["req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
              "-subj", "/C=US/O=PayPal, Inc./CN=%s" % cn], directory)
    _openssl(["x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
              "-set_serial", "0x" + secrets.token_hex(16), "-days", str(days), "-sha256",
              "-extfile", ext, "-out", crt], directory)
    return key, crt


class _Signer:
    """RSA-SHA256 PKCS#1 v1.5 signatures with the double's key: the
    cryptography package when present, else the openssl CLI."""

    def __init__(self, key_path):
        self.key_path = key_path
        try:
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import padding
            with open(key_path, "rb") as fh:
                self._key = serialization.load_pem_private_key(fh.read(), None)
            self._sign = lambda data: self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        except ImportError:
            self._sign = self._sign_cli

    def _sign_cli(self, data):
        proc = subprocess.run(["openssl", "dgst", "-sha256", "-sign", self.key_path],
                              input=data, stdout=subprocess.PIPE, check=True)
        return proc.stdout

    def sign(self, data):
        return self._sign(data)


def signed_message(transmission_id, transmission_time, webhook_id, body):
    if isinstance(body, str):
        body = body.encode("utf-8")
    return "%s|%s|%s|%d" % (transmission_id, transmission_time, webhook_id,
                            zlib.crc32(body) & 0xFFFFFFFF)


class PayPalDouble(ServedDouble):
    """In-process PayPal double.

    CONTROL ENDPOINTS (JSON, no auth): ``POST /_double/orders/{id}/approve``
    ``{"capture": "completed"|"pending"|"declined"}`` (answers the signed
    CHECKOUT.ORDER.APPROVED delivery), ``POST /_double/config``
    ``{"expires_in", "latency"}``, ``POST /_double/faults`` ``{"mode",
    "count", "path_prefix"}``, ``POST /_double/tokens/revoke``,
    ``GET /_double/stats``, ``GET /_double/requests``,
    ``GET /_double/deliveries``, ``POST /_double/reset``.
    """

    def __init__(self, clients, webhook_id, ca_cert, ca_key, certfile, keyfile,
                 host="127.0.0.1", port=0, expires_in=32400, verbose=False):
        self.clients = dict(clients)
        self.webhook_id = webhook_id
        self.ca_cert = ca_cert
        self.ca_key = ca_key
        self.certfile = certfile
        self.keyfile = keyfile
        self.host = host
        self.port = port
        self.verbose = verbose
        self._lock = threading.RLock()
        self._config = {"expires_in": int(expires_in), "latency": 0.0}
        self._server = None
        self._thread = None
        self.base_url = None
        self._tmp = None
        self.cert_pem = None
        self.cert_path = None
        self._cert_name = "CERT-360caa42-fca2a594-%s" % secrets.token_hex(4)
        self._reset_state()

    # ------------------------------------------------------------ life

    def start(self):
        """Make the webhook signing certificate, then serve; return the base URL."""
        self._tmp = tempfile.mkdtemp(prefix="crmpay-paypal-")
        key, crt = make_signing_cert(self._tmp, self.ca_cert, self.ca_key)
        with open(crt) as fh:
            self.cert_pem = fh.read()
        self.cert_path = crt
        self._signer = _Signer(key)
        return self.serve(_Handler, "paypal-double")

    def stop(self):
        super().stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    @property
    def cert_url(self):
        return "%s/v1/notifications/certs/%s" % (self.base_url, self._cert_name)

    # ----------------------------------------------------------- state

    def _reset_state(self):
        with self._lock:
            self._tokens = {}          # token -> (client_id, expires_at)
            self._orders = {}
            self._refunds = []         # refunds made with refund(), for the search
            self._idem = {}            # (client_id, path, request id) -> record
            self._deliveries = []
            self._sent = {}            # transmission id -> delivery
            self._requests = []
            self._faults = {"mode": "none", "count": None, "path_prefix": None}
            self._stats = {"requests_total": 0, "tokens_issued": 0, "orders_created": 0,
                           "captures": 0, "idempotent_replays": 0, "auth_failures": 0,
                           "faults_injected": 0, "verify_calls": 0, "cert_fetches": 0,
                           "requests_by_path": {}}

    def reset(self):
        self._reset_state()
        return {"ok": True}

    def _note_tls_failure(self, exc):
        pass

    def configure(self, **kw):
        with self._lock:
            for k, v in kw.items():
                if k not in self._config:
                    raise ValueError("unknown config key %s" % k)
                self._config[k] = type(self._config[k])(v)
            return dict(self._config)

    def set_faults(self, mode="none", count=None, path_prefix=None):
        if mode not in FAULT_MODES:
            raise ValueError("unknown fault mode %r" % mode)
        with self._lock:
            self._faults = {"mode": mode, "count": count, "path_prefix": path_prefix}

    def revoke_tokens(self):
        """Every issued token becomes invalid (PayPal answers 401 to it)."""
        with self._lock:
            self._tokens.clear()

    def stats(self):
        with self._lock:
            return copy.deepcopy(self._stats)

    def requests(self):
        with self._lock:
            return copy.deepcopy(self._requests)

    def deliveries(self):
        with self._lock:
            return copy.deepcopy(self._deliveries)

    def order(self, order_id):
        with self._lock:
            o = self._orders.get(order_id)
            return copy.deepcopy(o["order"]) if o else None

    # -------------------------------------------------------- webhooks

    def sign(self, body, transmission_id=None, transmission_time=None, webhook_id=None):
        """PAYPAL-* headers for body, as PayPal would send them."""
        tid = transmission_id or str(uuid.uuid1())
        ttime = transmission_time or _now_iso()
        msg = signed_message(tid, ttime, webhook_id or self.webhook_id, body)
        sig = base64.b64encode(self._signer.sign(msg.encode("utf-8"))).decode("ascii")
        return {
            "Paypal-Transmission-Id": tid,
            "Paypal-Transmission-Time": ttime,
            "Paypal-Transmission-Sig": sig,
            "Paypal-Cert-Url": self.cert_url,
            "Paypal-Auth-Algo": "SHA256withRSA",
            "Content-Type": "application/json",
            "User-Agent": "PayPal/AUHD-214.0-58705015",
        }

    def event(self, event_type, resource, resource_type, summary):
        return {
            "id": "WH-%s-%s" % (secrets.token_hex(8).upper()[:17], secrets.token_hex(8).upper()[:17]),
            "event_version": "1.0",
            "create_time": _now_iso(),
            "resource_type": resource_type,
            "resource_version": "2.0",
            "event_type": event_type,
            "summary": summary,
            "resource": resource,
            "links": [{"href": "https://api.paypal.com/v1/notifications/webhooks-events/x",
                       "rel": "self", "method": "GET"}],
        }

    def deliver(self, event):
        """Sign an event and record the delivery; returns it."""
        body = json.dumps(event, separators=(",", ":"))
        headers = self.sign(body)
        delivery = {"event_id": event["id"], "type": event["event_type"], "headers": headers,
                    "body": body}
        with self._lock:
            self._deliveries.append(copy.deepcopy(delivery))
            self._sent[headers["Paypal-Transmission-Id"]] = delivery
        return delivery

    # -------------------------------------------------- simulation API

    def approve(self, order_id, capture="completed"):
        """The buyer approves: order APPROVED, CHECKOUT.ORDER.APPROVED sent."""
        if capture not in ("completed", "pending", "declined"):
            raise ValueError("capture must be completed, pending or declined")
        with self._lock:
            rec = self._orders.get(order_id)
            if rec is None:
                raise KeyError("no such order %s" % order_id)
            order = rec["order"]
            if order["status"] not in ("CREATED", "PAYER_ACTION_REQUIRED", "APPROVED"):
                raise ValueError("order %s is %s" % (order_id, order["status"]))
            order["status"] = "APPROVED"
            order["payer"] = {"name": {"given_name": "John", "surname": "Doe"},
                              "email_address": "buyer@example.com", "payer_id": "QYR5Z8XDVJNXQ",
                              "address": {"country_code": "US"}}
            rec["capture_outcome"] = capture
            resource = copy.deepcopy(order)
        return self.deliver(self.event("CHECKOUT.ORDER.APPROVED", resource, "checkout-order",
                                       "An order has been approved by buyer"))

    def foreign_order(self, reference, value, currency="EUR"):
        """An order made outside crmpay (another shop system, the dashboard),
        approved and captured: only the transaction search shows it."""
        body = json.dumps({"intent": "CAPTURE", "purchase_units": [{
            "reference_id": reference, "custom_id": reference,
            "amount": {"currency_code": currency, "value": value}}]}).encode()
        order_id = json.loads(self._create_order(("double", None), {}, body)[2])["id"]
        with self._lock:
            self._orders[order_id]["order"]["status"] = "APPROVED"
        self.capture_now(order_id)
        return order_id

    def set_capture(self, order_id, **amount):
        """Changes what PayPal says it captured (currency_code, value)."""
        with self._lock:
            self._orders[order_id]["captured"]["amount"].update(amount)

    def capture_now(self, order_id):
        """Captures an approved order outside crmpay (the dashboard, another
        system): no webhook is sent."""
        status, _, body = self._capture(("double", None), {}, order_id, b"")[:3]
        return json.loads(body)["purchase_units"][0]["payments"]["captures"][0]

    def refund(self, order_id, amount=None):
        """Refunds (part of) an order's capture; only the transaction search
        tells (no webhook)."""
        with self._lock:
            capture = self._orders[order_id]["captured"]
            unit = self._orders[order_id]["order"]["purchase_units"][0]
            value = amount if amount is not None else capture["amount"]["value"]
            refund = {"id": "%d%s" % (secrets.randbelow(9) + 1, secrets.token_hex(8).upper()),
                      "capture_id": capture["id"], "custom_id": unit.get("custom_id"),
                      "amount": {"currency_code": capture["amount"]["currency_code"], "value": value},
                      "create_time": _now_iso()}
            self._refunds.append(refund)
            return copy.deepcopy(refund)

    # ------------------------------------------------ transaction search

    @staticmethod
    def _search_time(iso):
        """PayPal's dates: 2024-03-01T10:00:00Z -> +0000 style."""
        t = datetime.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        return t, t.strftime("%Y-%m-%dT%H:%M:%S+0000")

    def _search(self, query):
        """GET /v1/reporting/transactions: captures (T0006) and refunds
        (T1107) of the date range, at most 31 days, page by page."""
        q = dict(urllib.parse.parse_qsl(query))
        details = []
        for name in ("start_date", "end_date"):
            if name not in q:
                details.append({"field": name, "location": "query", "issue": "MISSING_REQUIRED_PARAMETER",
                                "description": "A required field / parameter is missing."})
        try:
            start = datetime.datetime.strptime(q.get("start_date", ""), "%Y-%m-%dT%H:%M:%S%z")
            end = datetime.datetime.strptime(q.get("end_date", ""), "%Y-%m-%dT%H:%M:%S%z")
        except ValueError:
            start = end = None
            if not details:
                details.append({"field": "start_date", "location": "query", "issue": "INVALID_PARAMETER_SYNTAX",
                                "description": "The value of a field does not conform to the expected format."})
        if start and end and (end < start or end - start > datetime.timedelta(days=31)):
            details.append({"field": "end_date", "value": q["end_date"], "location": "query",
                            "issue": "Date range is greater than 31 days"})
        try:
            page_size = int(q.get("page_size", "100"))
            page = int(q.get("page", "1"))
        except ValueError:
            page_size = page = 0
        if not 1 <= page_size <= 500 or page < 1:
            details.append({"field": "page_size", "location": "query", "issue": "INVALID_PARAMETER_VALUE",
                            "description": "page_size is 1 to 500, page at least 1."})
        if details:
            raise PayPalError(400, "INVALID_REQUEST", "Request is not well-formed, syntactically "
                              "incorrect, or violates schema.", details)
        items = []
        with self._lock:
            for order_id, rec in self._orders.items():
                capture = rec.get("captured")
                if not capture:
                    continue
                at, shown = self._search_time(capture["create_time"])
                if not start <= at <= end:
                    continue
                amount = capture["amount"]
                minor = round(float(amount["value"]) * 100)
                fee = (minor * 349 + 5000) // 10000 + 49           # 3.49 % + 0.49
                items.append((at, {"transaction_info": {
                    "paypal_account_id": "QYR5Z8XDVJNXQ", "transaction_id": capture["id"],
                    "paypal_reference_id": order_id, "paypal_reference_id_type": "ODR",
                    "transaction_event_code": "T0006", "transaction_initiation_date": shown,
                    "transaction_updated_date": shown, "transaction_amount": dict(amount),
                    "fee_amount": {"currency_code": amount["currency_code"],
                                   "value": "-%d.%02d" % (fee // 100, fee % 100)},
                    "transaction_status": {"COMPLETED": "S", "PENDING": "P",
                                           "DECLINED": "D"}[capture["status"]],
                    "custom_field": capture.get("custom_id"), "protection_eligibility": "01"}}))
            for refund in self._refunds:
                at, shown = self._search_time(refund["create_time"])
                if not start <= at <= end:
                    continue
                items.append((at, {"transaction_info": {
                    "paypal_account_id": "QYR5Z8XDVJNXQ", "transaction_id": refund["id"],
                    "paypal_reference_id": refund["capture_id"], "paypal_reference_id_type": "TXN",
                    "transaction_event_code": "T1107", "transaction_initiation_date": shown,
                    "transaction_updated_date": shown,
                    "transaction_amount": {"currency_code": refund["amount"]["currency_code"],
                                           "value": "-" + refund["amount"]["value"]},
                    "transaction_status": "S", "custom_field": refund["custom_id"]}}))
        items.sort(key=lambda x: x[0])
        total = len(items)
        pages = (total + page_size - 1) // page_size
        body = {"transaction_details": [i[1] for i in items[(page - 1) * page_size:page * page_size]],
                "account_number": "QYR5Z8XDVJNXQ", "start_date": q["start_date"], "end_date": q["end_date"],
                "last_refreshed_datetime": _now_iso(), "page": page, "total_items": total,
                "total_pages": pages, "links": []}
        return self._json(200, body)

    # -------------------------------------------------------- dispatch

    def _dispatch(self, method, raw_path, headers, body):
        parts = urllib.parse.urlsplit(raw_path)
        path = parts.path
        if path.startswith("/_double/"):
            return self._control(method, path, body)
        with self._lock:
            self._stats["requests_total"] += 1
            key = "%s %s" % (method, re.sub(r"/orders/[^/]+", "/orders/{id}", path))
            self._stats["requests_by_path"][key] = self._stats["requests_by_path"].get(key, 0) + 1
            self._requests.append({"method": method, "path": path,
                                   "query": dict(urllib.parse.parse_qsl(parts.query)),
                                   "headers": {k: (v if k.lower() != "authorization" else
                                                   v.split(" ")[0] + " ****")
                                               for k, v in headers.items()},
                                   "body": body.decode("utf-8", "replace")})
            fault = self._take_fault(path)
            latency = self._config["latency"]
        if latency:
            time.sleep(latency)
        if path.startswith("/v1/notifications/certs/") and method == "GET":
            if path.rsplit("/", 1)[1] != self._cert_name:
                return self._json(404, {"name": "RESOURCE_NOT_FOUND"})
            with self._lock:
                self._stats["cert_fetches"] += 1
            return 200, {"Content-Type": "application/x-pem-file"}, self.cert_pem.encode()
        if fault == "drop":
            return None
        if fault in ("500", "503", "429"):
            status = int(fault)
            name = {500: "INTERNAL_SERVER_ERROR", 503: "SERVICE_UNAVAILABLE",
                    429: "RATE_LIMIT_REACHED"}[status]
            msg = {500: "An internal server error has occurred.",
                   503: "Service Unavailable.",
                   429: "Too many requests. Blocked due to rate limiting."}[status]
            return self._json(status, PayPalError(status, name, msg).body())
        if fault == "bad_json":
            return 200, {"Content-Type": "application/json"}, b'{"id": "5O190127TN36'
        try:
            if path == "/v1/oauth2/token" and method == "POST":
                return self._token(headers, body)
            client = self._bearer(headers)
            if path == "/v2/checkout/orders" and method == "POST":
                return self._create_order(client, headers, body)
            m = re.match(r"^/v2/checkout/orders/([^/]+)$", path)
            if m and method == "GET":
                return self._get_order(m.group(1))
            m = re.match(r"^/v2/checkout/orders/([^/]+)/capture$", path)
            if m and method == "POST":
                return self._capture(client, headers, urllib.parse.unquote(m.group(1)), body)
            if path == "/v1/notifications/verify-webhook-signature" and method == "POST":
                return self._verify(body)
            if path == "/v1/reporting/transactions" and method == "GET":
                return self._search(parts.query)
            raise PayPalError(404, "RESOURCE_NOT_FOUND",
                              "The specified resource does not exist.",
                              [{"issue": "INVALID_RESOURCE_ID",
                                "description": "Specified resource ID does not exist. Please "
                                               "check the resource ID and try again."}])
        except OAuthError as err:
            with self._lock:
                self._stats["auth_failures"] += 1
            return self._json(err.status, {"error": err.error,
                                           "error_description": err.description})
        except PayPalError as err:
            if err.name == "AUTHENTICATION_FAILURE":
                with self._lock:
                    self._stats["auth_failures"] += 1
            return self._json(err.status, err.body(), err.headers)

    def _take_fault(self, path):
        f = self._faults
        if f["mode"] == "none" or (f["path_prefix"] and not path.startswith(f["path_prefix"])):
            return None
        if path.startswith("/v1/notifications/certs/"):
            return None
        mode = f["mode"]
        if f["count"] is not None:
            f["count"] -= 1
            if f["count"] <= 0:
                f["mode"] = "none"
        self._stats["faults_injected"] += 1
        return mode

    @staticmethod
    def _json(status, obj, extra=None):
        headers = {"Content-Type": "application/json", "Paypal-Debug-Id": _debug_id()}
        headers.update(extra or {})
        return status, headers, json.dumps(obj).encode("utf-8")

    # ------------------------------------------------------------ auth

    def _token(self, headers, body):
        auth = headers.get("Authorization") or ""
        scheme, _, cred = auth.partition(" ")
        client_id = secret = None
        if scheme.lower() == "basic":
            try:
                client_id, _, secret = base64.b64decode(cred.strip(), validate=True) \
                    .decode("utf-8").partition(":")
            except Exception:
                client_id = None
        if client_id is None or self.clients.get(client_id) != secret:
            raise OAuthError(401, "invalid_client", "Client Authentication failed")
        form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
        grant = form.get("grant_type")
        if grant is None:
            raise OAuthError(400, "unsupported_grant_type", "Grant Type is NULL")
        if grant != "client_credentials":
            raise OAuthError(400, "unsupported_grant_type", "Grant Type %s is not supported" % grant)
        token = "A21AA" + base64.urlsafe_b64encode(secrets.token_bytes(60)).decode().rstrip("=")
        with self._lock:
            expires_in = self._config["expires_in"]
            self._tokens[token] = (client_id, time.time() + expires_in)
            self._stats["tokens_issued"] += 1
        return self._json(200, {
            "scope": "https://uri.paypal.com/services/payments/payment/authcapture openid "
                     "https://uri.paypal.com/services/checkout/one-click-with-merchant-issued-token",
            "access_token": token, "token_type": "Bearer", "app_id": "APP-80W284485P519543T",
            "expires_in": expires_in, "nonce": "%s%s" % (_now_iso(), secrets.token_hex(16))})

    def _bearer(self, headers):
        auth = headers.get("Authorization")
        if not auth:
            raise PayPalError(401, "AUTHENTICATION_FAILURE",
                              "Authentication failed due to invalid authentication credentials "
                              "or a missing Authorization header.")
        scheme, _, token = auth.partition(" ")
        with self._lock:
            rec = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
            if rec is None or rec[1] < time.time():
                raise OAuthError(401, "invalid_token", "Token signature verification failed")
            return rec[0]

    # ---------------------------------------------------------- orders

    def _parse_json(self, body):
        try:
            data = json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise PayPalError(400, "INVALID_REQUEST",
                              "Request is not well-formed, syntactically incorrect, or violates "
                              "schema.", [{"field": "/", "location": "body",
                                           "issue": "MALFORMED_REQUEST_JSON",
                                           "description": "The request JSON is not well formed."}])
        return data

    def _validate_order(self, data):
        if not isinstance(data, dict):
            raise _invalid("/", None, "INVALID_PARAMETER_SYNTAX", "The value of a field does "
                           "not conform to the expected format.")
        intent = data.get("intent")
        if intent is None:
            raise _invalid("/intent", None, "MISSING_REQUIRED_PARAMETER",
                           "A required field / parameter is missing.")
        if intent not in ("CAPTURE", "AUTHORIZE"):
            raise _invalid("/intent", intent, "INVALID_PARAMETER_VALUE",
                           "The value of a field is invalid.")
        units = data.get("purchase_units")
        if not isinstance(units, list) or not units:
            raise _invalid("/purchase_units", None, "MISSING_REQUIRED_PARAMETER",
                           "A required field / parameter is missing.")
        unit = units[0]
        amount = unit.get("amount") if isinstance(unit, dict) else None
        if not isinstance(amount, dict):
            raise _invalid("/purchase_units/@reference_id=='default'/amount", None,
                           "MISSING_REQUIRED_PARAMETER", "A required field / parameter is missing.")
        cur = amount.get("currency_code")
        value = amount.get("value")
        if cur not in CURRENCY_DECIMALS:
            raise _invalid("/purchase_units/@reference_id=='default'/amount/currency_code", cur,
                           "CURRENCY_NOT_SUPPORTED", "Currency code is not currently supported. "
                           "Please refer https://developer.paypal.com/api/rest/reference/"
                           "currency-codes/ for list of supported currency codes.", 422)
        if not isinstance(value, str) or not re.fullmatch(r"\d{1,10}(\.\d+)?", value):
            raise _invalid("/purchase_units/@reference_id=='default'/amount/value", value,
                           "INVALID_PARAMETER_SYNTAX", "The value of a field does not conform "
                           "to the expected format.")
        decimals = len(value.split(".")[1]) if "." in value else 0
        if decimals > CURRENCY_DECIMALS[cur]:
            raise _invalid("/purchase_units/@reference_id=='default'/amount/value", value,
                           "DECIMAL_PRECISION", "If the currency supports decimals, only two "
                           "decimal place precision is supported.")
        if float(value) <= 0:
            raise _invalid("/purchase_units/@reference_id=='default'/amount/value", value,
                           "CANNOT_BE_ZERO_OR_NEGATIVE", "Must be greater than zero.", 422)
        for field, limit in (("custom_id", 127), ("description", 127), ("reference_id", 256)):
            if isinstance(unit.get(field), str) and len(unit[field]) > limit:
                raise _invalid("/purchase_units/@reference_id=='default'/%s" % field, None,
                               "INVALID_STRING_MAX_LENGTH",
                               "The value of a field is too long.")
        ctx = data.get("application_context") or {}
        for field in ("return_url", "cancel_url"):
            if field in ctx and not re.match(r"^https?://", str(ctx[field])):
                raise _invalid("/application_context/%s" % field, ctx[field],
                               "INVALID_PARAMETER_SYNTAX", "The value of a field does not "
                               "conform to the expected format.")

    def _order_links(self, order_id, status):
        links = [{"href": "%s/v2/checkout/orders/%s" % (self.base_url, order_id),
                  "rel": "self", "method": "GET"}]
        if status == "CREATED":
            links.append({"href": "%s/checkoutnow?token=%s" % (self.base_url, order_id),
                          "rel": "approve", "method": "GET"})
            links.append({"href": "%s/v2/checkout/orders/%s" % (self.base_url, order_id),
                          "rel": "update", "method": "PATCH"})
        if status in ("CREATED", "APPROVED"):
            links.append({"href": "%s/v2/checkout/orders/%s/capture" % (self.base_url, order_id),
                          "rel": "capture", "method": "POST"})
        return links

    def _represent(self, order, prefer):
        out = copy.deepcopy(order)
        out["links"] = self._order_links(order["id"], order["status"])
        if "return=representation" in (prefer or ""):
            return out
        return {"id": out["id"], "status": out["status"], "links": out["links"]}

    def _idempotent(self, client, path, headers, body, run):
        """PayPal-Request-Id: same id + same body -> the current state again."""
        request_id = headers.get("PayPal-Request-Id")
        if request_id is None:
            return run()[:3]
        if len(request_id) > 108:
            raise _invalid("/", None, "INVALID_PARAMETER_SYNTAX",
                           "PayPal-Request-Id is too long.")
        key = (client, path, request_id)
        with self._lock:
            rec = self._idem.get(key)
            if rec is not None:
                if rec["body"] != body:
                    raise _invalid("/", None, "PAYPAL_REQUEST_ID_PREVIOUSLY_USED",
                                   "The PayPal-Request-Id has already been used for another "
                                   "request.", 422)
                self._stats["idempotent_replays"] += 1
                return rec["replay"]()
        result = run()
        if 200 <= result[0] < 300:
            with self._lock:
                self._idem[key] = {"body": body, "replay": result[3]}
        return result[:3]

    def _create_order(self, client, headers, body):
        data = self._parse_json(body)
        self._validate_order(data)
        prefer = headers.get("Prefer")

        def run():
            order_id = "%d%s" % (secrets.randbelow(9) + 1,
                                 "".join(secrets.choice("0123456789ABCDEFGHJKLMNPRSTUVWXYZ")
                                         for _ in range(16)))
            unit = copy.deepcopy(data["purchase_units"][0])
            unit.setdefault("reference_id", "default")
            unit["payee"] = {"email_address": "merchant@example.com",
                             "merchant_id": "C7CYMKZDG8D6E"}
            order = {"id": order_id, "intent": data["intent"], "status": "CREATED",
                     "purchase_units": [unit], "create_time": _now_iso()}
            with self._lock:
                self._orders[order_id] = {"order": order, "client": client,
                                          "capture_outcome": "completed", "captured": None}
                self._stats["orders_created"] += 1

            def replay():
                with self._lock:
                    return self._json(200, self._represent(self._orders[order_id]["order"],
                                                           prefer))
            status, hdrs, payload = self._json(201, self._represent(order, prefer))
            return status, hdrs, payload, replay
        return self._idempotent(client, "/v2/checkout/orders", headers, body, run)

    def _get_order(self, order_id):
        with self._lock:
            rec = self._orders.get(order_id)
            if rec is None:
                raise PayPalError(404, "RESOURCE_NOT_FOUND",
                                  "The specified resource does not exist.",
                                  [{"issue": "INVALID_RESOURCE_ID", "description":
                                    "Specified resource ID does not exist. Please check the "
                                    "resource ID and try again."}])
            return self._json(200, self._represent(rec["order"], "return=representation"))

    def _capture(self, client, headers, order_id, body):
        def run():
            with self._lock:
                rec = self._orders.get(order_id)
                if rec is None:
                    raise PayPalError(404, "RESOURCE_NOT_FOUND",
                                      "The specified resource does not exist.",
                                      [{"issue": "INVALID_RESOURCE_ID", "description":
                                        "Specified resource ID does not exist. Please check "
                                        "the resource ID and try again."}])
                order = rec["order"]
                if order["status"] == "COMPLETED" or rec["captured"]:
                    raise _invalid(None, None, "ORDER_ALREADY_CAPTURED",
                                   "Order already captured.If 'intent=CAPTURE' only one "
                                   "capture per order is allowed.", 422)
                if order["status"] != "APPROVED":
                    raise _invalid(None, None, "ORDER_NOT_APPROVED",
                                   "Payer has not yet approved the Order for payment. Please "
                                   "redirect the payer to the 'rel':'approve' url returned as "
                                   "part of the HATEOAS links within the Create Order call or "
                                   "provide a valid payment_source in the request.", 422)
                outcome = rec["capture_outcome"]
                unit = order["purchase_units"][0]
                capture_status = {"completed": "COMPLETED", "pending": "PENDING",
                                  "declined": "DECLINED"}[outcome]
                capture = {"id": "%d%s" % (secrets.randbelow(9) + 1, secrets.token_hex(8).upper()),
                           "status": capture_status, "amount": copy.deepcopy(unit["amount"]),
                           "final_capture": True,
                           "seller_protection": {"status": "ELIGIBLE"},
                           "create_time": _now_iso(), "update_time": _now_iso()}
                if "custom_id" in unit:
                    capture["custom_id"] = unit["custom_id"]
                if capture_status == "PENDING":
                    capture["status_details"] = {"reason": "PENDING_REVIEW"}
                unit["payments"] = {"captures": [capture]}
                order["status"] = "COMPLETED"
                rec["captured"] = capture
                self._stats["captures"] += 1
                response = self._represent(order, "return=representation")
                resource = copy.deepcopy(capture)
                resource["supplementary_data"] = {"related_ids": {"order_id": order_id}}
                resource["links"] = [{"href": "%s/v2/checkout/orders/%s" % (self.base_url, order_id),
                                      "rel": "up", "method": "GET"}]
                first = self._json(201, response)
            event_type = {"COMPLETED": "PAYMENT.CAPTURE.COMPLETED",
                          "PENDING": "PAYMENT.CAPTURE.PENDING",
                          "DECLINED": "PAYMENT.CAPTURE.DENIED"}[capture_status]
            self.deliver(self.event(event_type, resource, "capture",
                                    "Payment %s" % capture_status.lower()))
            return first[0], first[1], first[2], (lambda: first)
        return self._idempotent(client, "/v2/checkout/orders/%s/capture" % order_id, headers,
                                body, run)

    def _verify(self, body):
        with self._lock:
            self._stats["verify_calls"] += 1
        data = self._parse_json(body)
        required = ("auth_algo", "cert_url", "transmission_id", "transmission_sig",
                    "transmission_time", "webhook_id", "webhook_event")
        for field in required:
            if field not in data:
                raise _invalid("/%s" % field, None, "MISSING_REQUIRED_PARAMETER",
                               "A required field / parameter is missing.")
        with self._lock:
            sent = self._sent.get(data["transmission_id"])
        ok = (sent is not None and data["webhook_id"] == self.webhook_id
              and sent["headers"]["Paypal-Transmission-Sig"] == data["transmission_sig"]
              and sent["headers"]["Paypal-Transmission-Time"] == data["transmission_time"]
              and sent["headers"]["Paypal-Cert-Url"] == data["cert_url"]
              and json.loads(sent["body"]) == data["webhook_event"])
        return self._json(200, {"verification_status": "SUCCESS" if ok else "FAILURE"})

    # --------------------------------------------------------- control

    def _control(self, method, path, body):
        try:
            data = json.loads(body.decode("utf-8")) if body else {}
            sub = path[len("/_double"):]
            m = re.match(r"^/orders/([^/]+)/approve$", sub)
            if m and method == "POST":
                return self._json(200, self.approve(m.group(1), data.get("capture", "completed")))
            if sub == "/config" and method == "POST":
                return self._json(200, self.configure(**data))
            if sub == "/faults" and method == "POST":
                self.set_faults(**data)
                return self._json(200, {"ok": True})
            if sub == "/tokens/revoke" and method == "POST":
                self.revoke_tokens()
                return self._json(200, {"ok": True})
            if sub == "/stats":
                return self._json(200, self.stats())
            if sub == "/requests":
                return self._json(200, {"requests": self.requests()})
            if sub == "/deliveries":
                return self._json(200, {"deliveries": self.deliveries()})
            if sub == "/reset" and method == "POST":
                return self._json(200, self.reset())
            return self._json(404, {"error": "unknown control endpoint"})
        except (KeyError, ValueError, TypeError) as err:
            return self._json(400, {"error": str(err)})


def main(argv=None):
    import argparse
    import signal
    ap = argparse.ArgumentParser(description="PayPal test double (HTTPS, loopback).")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ca-cert", required=True)
    ap.add_argument("--ca-key", required=True)
    ap.add_argument("--client", action="append", required=True, help="client_id:secret")
    ap.add_argument("--webhook-id", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--expires-in", type=int, default=32400)
    args = ap.parse_args(argv)
    clients = dict(c.split(":", 1) for c in args.client)
    double = PayPalDouble(clients, args.webhook_id, args.ca_cert, args.ca_key, args.cert, args.key,
                          port=args.port, expires_in=args.expires_in)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(double.start(), flush=True)
    while not stop.wait(0.5):
        pass
    double.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
