#!/usr/bin/python3
"""Adyen test double for the crmpay test suite.

A loopback HTTPS server that speaks the part of Adyen's Checkout API crmpay
uses (Pay by Link, API v71), a hosted payment page to "pay" links, and
correctly signed standard webhooks (notifications) for payments and their
modifications, plus test-only control endpoints under ``/_double/``.
Standard library only (Python 3.11).

Fidelity notes (checked against Adyen's docs and official SDKs where a
source was found; items marked "approx." are best-effort):

* Paths: ``POST /v71/paymentLinks``, ``GET /v71/paymentLinks/{id}``,
  ``PATCH /v71/paymentLinks/{id}`` with ``{"status": "expired"}``.  Links
  answer as Adyen's PaymentLinkResponse: ``id`` ("PL" + 16 upper-case hex),
  ``url``, ``status`` (active, expired, completed, paymentPending),
  ``reference``, ``amount``, ``merchantAccount``, ``expiresAt``, ...;
  creation answers 201, lookups and updates 200.  expiresAt defaults to 24 h
  and may be at most 70 days ahead.
* Auth: ``X-API-Key``.  A missing or unknown key gives 401 ``{"status": 401,
  "errorCode": "000", "message": "HTTP Status Response - Unauthorized",
  "errorType": "security"}``; a merchant account the key may not use gives
  403 ``errorCode "010"``, ``"Not allowed"``.
* Errors: ``{"status", "errorCode", "message", "errorType",
  "pspReference"}``.  "Required object 'amount' is not provided." (errorCode
  100) is Adyen's own wording; metadata limits give errors 177 ("Metadata
  size exceeds limit") and 178 ("Metadata key size exceeds limit") as Adyen
  documents.  Other validation codes and wordings are approx.
* Idempotency (docs.adyen.com/development-resources/api-idempotency): POSTs
  with ``Idempotency-Key`` (at most 64 characters) are stored per API key;
  the same key again returns the first response, with the
  ``Idempotency-Key`` response header, whatever the new body says.  A
  request whose key is still being processed gets 422 errorCode "704"
  "request already processed or in progress" with ``Transient-Error: true``
  (approx.).  Requests refused by validation are not stored (approx.).
* Amounts in Adyen's minor units, with Adyen's own currency table (CLP and
  ISK have 2 decimals, CVE and IDR 0).
* Webhooks: ``{"live": "false", "notificationItems": [{"NotificationRequestItem":
  {...}}]}``; each item's ``additionalData.hmacSignature`` is
  base64(HMAC-SHA256(hex-decoded HMAC key, "pspReference:originalReference:
  merchantAccountCode:merchantReference:value:currency:eventCode:success"))
  with the fields joined unescaped, as Adyen does.  Payments through a link
  carry ``additionalData.paymentLinkId``.  Optionally the whole body is
  signed in an ``HmacSignature`` header instead (as Adyen's platform
  webhooks are).

Python API::

    d = AdyenDouble(api_keys={"AQE..."}, hmac_key="44782DEF...", certfile=..., keyfile=...)
    base = d.start()                     # "https://127.0.0.1:PORT"
    d.pay(link_id, "authorised")         # -> {"deliveries": [...], "psp_reference": ...}
    d.refund(psp, 500)                   # -> {"deliveries": [...]}
    d.stop()

CLI::

    /usr/bin/python3 tests/doubles/adyen_double.py --cert C --key K \\
        --api-key AQE... --hmac-key HEX [--port N] [--webhook-url URL] \\
        [--webhook-ca F] [--ready-file F] [--verbose]

See ``CONTROL ENDPOINTS`` in class AdyenDouble for the test-only API.
"""

import argparse
import base64
import binascii
import collections
import copy
import datetime
import hashlib
import hmac
import html
import http.client
import http.server
import json
import os
import random
import re
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
import traceback
import urllib.parse

try:
    from .tls_server import DoubleHandler, ServedDouble
except ImportError:          # run as a script: tests/doubles is on sys.path
    from tls_server import DoubleHandler, ServedDouble

API_VERSION = "v71"
REQUEST_LOG_SIZE = 1000
DELIVERY_LOG_SIZE = 1000
DEFAULT_TTL = 24 * 3600
MAX_TTL = 70 * 24 * 3600
FAULT_MODES = ("none", "500", "503", "429", "slow", "drop", "drop_after_create", "bad_json")
PAY_OUTCOMES = ("authorised", "refused", "pending", "pending_authorised", "pending_refused")

# Adyen's minor-unit exponents (docs.adyen.com/development-resources/currency-codes)
CURRENCY_EXPONENTS = dict(
    [(c, 2) for c in (
        "AED ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BRL BSD BWP BYN BZD "
        "CAD CHF CLP CNH CNY COP CRC CUP CZK DKK DOP DZD EGP ETB EUR FJD FKP GBP GEL GHS GIP GMD "
        "GTQ GYD HKD HNL HTG HUF ILS INR ISK JMD KES KGS KHR KYD KZT LAK LBP LKR MAD MDL MKD MMK "
        "MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR "
        "RON RSD RUB SAR SBD SCR SEK SGD SHP SLE SOS SRD STN SVC SZL THB TOP TRY TTD TWD TZS UAH "
        "USD UYU UZS WST XCD YER ZAR ZMW").split()]
    + [(c, 0) for c in "CVE DJF GNF IDR JPY KMF KRW PYG RWF UGX VND VUV XAF XOF XPF".split()]
    + [(c, 3) for c in "BHD IQD JOD KWD LYD OMR TND".split()])

CREATE_FIELDS = {
    "reference", "amount", "merchantAccount", "returnUrl", "expiresAt", "reusable",
    "shopperEmail", "description", "metadata", "shopperReference", "shopperLocale",
    "countryCode", "allowedPaymentMethods", "blockedPaymentMethods", "lineItems", "themeId",
    "storePaymentMethodMode", "recurringProcessingModel", "requiredShopperFields", "store",
    "captureDelayHours", "deliverAt", "billingAddress", "deliveryAddress", "shopperName",
    "telephoneNumber", "merchantOrderReference", "splits", "applicationInfo", "manualCapture",
}


def psp_reference():
    """Adyen-looking pspReference: 16 upper-case letters and digits."""
    return "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(16))


def link_id():
    return "PL" + secrets.token_hex(8).upper()


def iso8601(ts):
    return datetime.datetime.fromtimestamp(int(ts), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso8601(text):
    try:
        value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    if value.tzinfo is None:
        return None
    return value.timestamp()


def signing_string(item):
    """Adyen's 8 fields of a NotificationRequestItem, joined unescaped."""
    amount = item.get("amount") or {}

    def text(v):
        return "" if v is None else ("true" if v is True else "false" if v is False else str(v))
    return ":".join(text(v) for v in (
        item.get("pspReference"), item.get("originalReference"), item.get("merchantAccountCode"),
        item.get("merchantReference"), amount.get("value"), amount.get("currency"),
        item.get("eventCode"), item.get("success")))


def item_signature(hex_key, item):
    mac = hmac.new(binascii.unhexlify(hex_key), signing_string(item).encode("utf-8"), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode("ascii")


def body_signature(hex_key, body):
    if isinstance(body, str):
        body = body.encode("utf-8")
    return base64.b64encode(hmac.new(binascii.unhexlify(hex_key), body, hashlib.sha256).digest()).decode()


def mask_key(key):
    if not key:
        return ""
    return key[:4] + "*" * max(0, len(key) - 8) + key[-4:] if len(key) > 8 else "*" * len(key)


class AdyenError(Exception):
    """An error answered in Adyen's JSON error format."""

    def __init__(self, status, error_code, message, error_type="validation", headers=None,
                 with_psp=True):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.error_type = error_type
        self.headers = headers or {}
        self.with_psp = with_psp

    def body(self):
        out = {"status": self.status, "errorCode": self.error_code, "message": self.message,
               "errorType": self.error_type}
        if self.with_psp:
            out["pspReference"] = psp_reference()
        return out


def _unauthorized():
    return AdyenError(401, "000", "HTTP Status Response - Unauthorized", "security", with_psp=False)


class _ControlError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------




class _Handler(DoubleHandler):
    double_name = "adyen_double"
    internal_error = (500, {"Content-Type": "application/json"},
                      json.dumps({"status": 500, "errorCode": "905", "message": "adyen_double internal error",
                                  "errorType": "internal"}).encode())


# --------------------------------------------------------------------------
# The double
# --------------------------------------------------------------------------


class AdyenDouble(ServedDouble):
    """In-process Adyen double.

    CONTROL ENDPOINTS (JSON in / JSON out, no auth, not counted as API requests):

    * ``POST /_double/paymentLinks/{id}/pay`` ``{"outcome": "authorised" |
      "refused" | "pending" | "pending_authorised" | "pending_refused"}``
    * ``POST /_double/paymentLinks/{id}/expire_now``
    * ``POST /_double/payments/{psp}/refund`` ``{"amount": n}`` (default: the rest),
      ``.../capture``, ``.../cancel``, ``.../chargeback``
      These answer ``{"deliveries": [{"headers", "body", "items",
      "delivered_status", "delivery_error"}], "psp_reference": ...}``.
    * ``POST /_double/notify`` ``{"items": [NotificationRequestItem...],
      "sign": "items" | "header" | "none", "key": hex}`` -- any notification
    * ``POST /_double/faults`` ``{"mode", "count", "retry_after", "delay",
      "path_prefix"}``; ``GET /_double/faults``
    * ``POST /_double/config`` ``{"webhook_url", "webhook_ca", "latency",
      "hmac_key", "live"}``; ``GET /_double/config``
    * ``GET /_double/stats``, ``GET /_double/requests``, ``GET /_double/links``,
      ``GET /_double/deliveries``, ``POST /_double/reset``, ``GET /_double/health``

    Hosted page: ``GET <base>/l/{id}`` (HTML) and ``POST <base>/l/{id}`` with
    form ``outcome=authorised`` -> 303 to the link's returnUrl.
    """

    def __init__(self, api_keys, hmac_key, certfile, keyfile, host="127.0.0.1", port=0,
                 merchant_accounts=None, webhook_url=None, webhook_ca=None, verbose=False):
        if isinstance(api_keys, str):
            api_keys = [api_keys]
        self.api_keys = set(api_keys)
        # api key -> merchant accounts it may use (None: any)
        self.merchant_accounts = merchant_accounts or {}
        self.certfile = certfile
        self.keyfile = keyfile
        self.host = host
        self.port = port
        self.verbose = verbose
        self._lock = threading.RLock()
        self._config = {"webhook_url": webhook_url, "webhook_ca": webhook_ca, "latency": 0.0,
                        "hmac_key": hmac_key, "live": False}
        self._server = None
        self._thread = None
        self.base_url = None
        self._reset_state()

    # ------------------------------------------------------------ life

    def _note_tls_failure(self, exc):
        with self._lock:
            self._stats["tls_handshake_failures"] += 1

    def start(self):
        """Start serving in a background thread; return the base URL."""
        return self.serve(_Handler, "adyen-double")

    # ------------------------------------------------------------ state

    def _reset_state(self):
        with self._lock:
            self._links = collections.OrderedDict()
            self._payments = {}            # psp -> {"link", "amount", "currency", "refunded", ...}
            self._idem = {}                # (api_key, key) -> record
            self._requests = collections.deque(maxlen=REQUEST_LOG_SIZE)
            self._deliveries = collections.deque(maxlen=DELIVERY_LOG_SIZE)
            self._stats = {"requests_total": 0, "requests_by_path": {}, "links_created": 0,
                           "idempotent_replays": 0, "auth_failures": 0, "faults_injected": 0,
                           "tls_handshake_failures": 0, "webhooks_sent": 0}
            self._faults = {"mode": "none", "count": None, "retry_after": None, "delay": None,
                            "path_prefix": None}

    def reset(self):
        self._reset_state()
        return {"ok": True}

    def configure(self, **kw):
        with self._lock:
            for k, v in kw.items():
                if k not in self._config:
                    raise _ControlError(400, "unknown config key: %s" % k)
                self._config[k] = float(v or 0) if k == "latency" else v
            return dict(self._config)

    def set_faults(self, mode="none", count=None, retry_after=None, delay=None, path_prefix=None):
        if mode not in FAULT_MODES:
            raise _ControlError(400, "unknown fault mode %r; one of %s" % (mode, FAULT_MODES))
        with self._lock:
            self._faults = {"mode": mode, "count": None if count is None else int(count),
                            "retry_after": retry_after, "delay": delay, "path_prefix": path_prefix}
            return dict(self._faults)

    def _take_fault(self, path):
        f = self._faults
        if f["mode"] == "none" or (f["path_prefix"] and not path.startswith(f["path_prefix"])):
            return None
        if f["count"] is not None and f["count"] <= 0:
            return None
        fault = dict(f)
        if f["count"] is not None:
            f["count"] -= 1
            if f["count"] <= 0:
                f["mode"] = "none"
        self._stats["faults_injected"] += 1
        return fault

    def stats(self):
        with self._lock:
            return copy.deepcopy(self._stats)

    def requests(self, path_prefix=None):
        with self._lock:
            return copy.deepcopy([r for r in self._requests
                                  if not path_prefix or r["path"].startswith(path_prefix)])

    def deliveries(self):
        with self._lock:
            return copy.deepcopy(list(self._deliveries))

    def get_link(self, lid):
        with self._lock:
            link = self._links.get(lid)
            return copy.deepcopy(self._refresh_link(link)) if link else None

    # ------------------------------------------------------------ dispatcher

    def _dispatch(self, method, raw_path, headers, body):
        parts = urllib.parse.urlsplit(raw_path)
        path = parts.path
        if path.startswith("/_double/"):
            return self._control(method, path, body)
        if path.startswith("/l/"):
            return self._hosted_page(method, path, body)
        return self._api(method, path, headers, body)

    def _api(self, method, path, headers, body):
        api_key = headers.get("X-API-Key")
        idem_key = headers.get("Idempotency-Key") if method == "POST" else None
        with self._lock:
            entry = {"time": time.time(), "method": method, "path": path,
                     "headers": {k: (mask_key(v) if k.lower() == "x-api-key" else v)
                                 for k, v in headers.items()},
                     "body": body.decode("utf-8", errors="replace"), "json": None,
                     "status": None, "fault": None, "idempotency_key": idem_key, "replayed": False}
            self._requests.append(entry)
            self._stats["requests_total"] += 1
            by = self._stats["requests_by_path"]
            by["%s %s" % (method, path)] = by.get("%s %s" % (method, path), 0) + 1
            fault = self._take_fault(path)
            entry["fault"] = fault["mode"] if fault else None
            latency = self._config["latency"]

        def reply(status, obj, extra=None):
            entry["status"] = status
            hdrs = {"Content-Type": "application/json;charset=UTF-8",
                    "pspReference": psp_reference()}
            hdrs.update(extra or {})
            return status, hdrs, json.dumps(obj).encode("utf-8")

        def reply_error(err):
            return reply(err.status, err.body(), err.headers)

        if fault:
            mode = fault["mode"]
            extra = {"Retry-After": str(fault["retry_after"])} if fault["retry_after"] is not None else {}
            if mode == "drop":
                entry["status"] = "dropped"
                return None
            if mode == "500":
                return reply_error(AdyenError(500, "905", "Internal error", "internal"))
            if mode == "503":
                return reply_error(AdyenError(503, "999", "Service unavailable", "internal", extra))
            if mode == "429":
                return reply_error(AdyenError(429, "000", "Too many requests", "security", extra))
            if mode == "bad_json":
                entry["status"] = 201
                return 201, {"Content-Type": "application/json"}, b'{"amount":{"currency":"EUR","val'

        if not api_key or api_key not in self.api_keys:
            with self._lock:
                self._stats["auth_failures"] += 1
            return reply_error(_unauthorized())

        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            return reply_error(AdyenError(400, "702", "Unexpected input: malformed JSON", "validation"))
        entry["json"] = parsed

        slot = None
        if idem_key is not None:
            if len(idem_key) > 64:
                return reply_error(AdyenError(422, "000", "Idempotency key is too long (max 64 characters)"))
            slot = (api_key, idem_key)
            with self._lock:
                rec = self._idem.get(slot)
                if rec is not None and rec["state"] == "done":
                    self._stats["idempotent_replays"] += 1
                    entry["replayed"] = True
                    entry["status"] = rec["status"]
                    result = (rec["status"], dict(rec["headers"], **{"Idempotency-Key": idem_key}),
                              rec["payload"])
                    return self._finish_fault(fault, result)
                if rec is not None:
                    return reply_error(AdyenError(422, "704", "request already processed or in progress",
                                                  "validation", {"Transient-Error": "true"}))
                self._idem[slot] = {"state": "running"}

        try:
            # configured latency is spent while the request executes (so
            # inside the idempotency key's "in progress" window)
            if latency:
                time.sleep(latency)
            status, obj = self._route(method, path, parsed, api_key)
            result = reply(status, obj)
            save = True
        except AdyenError as err:
            result = reply_error(err)
            save = False
        except BaseException:
            if slot is not None:
                with self._lock:
                    self._idem.pop(slot, None)
            raise
        if slot is not None:
            # replace the "running" marker at once: the stored answer, or nothing
            with self._lock:
                if save:
                    self._idem[slot] = {"state": "done", "status": result[0], "payload": result[2],
                                        "headers": {"Content-Type": result[1]["Content-Type"]}}
                else:
                    self._idem.pop(slot, None)
            if save:
                result[1]["Idempotency-Key"] = idem_key
        return self._finish_fault(fault, result)

    @staticmethod
    def _finish_fault(fault, result):
        if fault and fault["mode"] == "slow":
            time.sleep(float(fault["delay"] if fault["delay"] is not None else 5.0))
        if fault and fault["mode"] == "drop_after_create":
            return None
        return result

    def _route(self, method, path, parsed, api_key):
        m = re.fullmatch(r"/(v\d+)/paymentLinks(?:/([^/]+))?", path)
        if not m or m.group(1) != API_VERSION:
            raise AdyenError(404, "000", "Unrecognized request: %s %s" % (method, path), "validation")
        lid = urllib.parse.unquote(m.group(2)) if m.group(2) else None
        if lid is None and method == "POST":
            return 201, self._create_link(parsed, api_key)
        if lid is not None and method == "GET":
            return 200, self._link_response(self._find_link(lid, api_key))
        if lid is not None and method == "PATCH":
            return 200, self._update_link(lid, parsed, api_key)
        raise AdyenError(405, "000", "Method %s not allowed" % method, "validation")

    def _check_merchant(self, api_key, merchant):
        allowed = self.merchant_accounts.get(api_key)
        if allowed is not None and merchant not in allowed:
            raise AdyenError(403, "010", "Not allowed", "security")

    def _create_link(self, req, api_key):
        if not isinstance(req, dict):
            raise AdyenError(400, "702", "Empty input which would have resulted in a null result.")
        unknown = sorted(set(req) - CREATE_FIELDS)
        if unknown:
            raise AdyenError(400, "702", "Structure of CreatePaymentLinkRequest contains the following "
                             "unknown fields: [%s]" % ", ".join(unknown))
        amount = req.get("amount")
        if not isinstance(amount, dict):
            raise AdyenError(422, "100", "Required object 'amount' is not provided.")
        value, currency = amount.get("value"), amount.get("currency")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise AdyenError(422, "000", "Field 'amount.value' is not a valid amount")
        if currency not in CURRENCY_EXPONENTS:
            raise AdyenError(422, "000", "Invalid currency code: %s" % currency)
        merchant = req.get("merchantAccount")
        if not isinstance(merchant, str) or not merchant:
            raise AdyenError(422, "000", "Required field 'merchantAccount' is not provided.")
        self._check_merchant(api_key, merchant)
        reference = req.get("reference")
        if not isinstance(reference, str) or not reference:
            raise AdyenError(422, "000", "Required field 'reference' is not provided.")
        if len(reference) > 80:
            raise AdyenError(422, "000", "Field 'reference' exceeds the maximum length of 80 characters")
        description = req.get("description")
        if description is not None and (not isinstance(description, str) or len(description) > 280):
            raise AdyenError(422, "000", "Field 'description' exceeds the maximum length of 280 characters")
        metadata = req.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise AdyenError(422, "000", "Field 'metadata' is not a map")
        if len(metadata) > 20:
            raise AdyenError(422, "177", "Metadata size exceeds limit")
        if any(len(k) > 20 for k in metadata):
            raise AdyenError(422, "178", "Metadata key size exceeds limit")
        now = time.time()
        expires = now + DEFAULT_TTL
        if req.get("expiresAt") is not None:
            expires = parse_iso8601(req["expiresAt"]) if isinstance(req["expiresAt"], str) else None
            if expires is None:
                raise AdyenError(422, "000", "Field 'expiresAt' is not a valid ISO 8601 date-time")
            if expires > now + MAX_TTL + 60:
                raise AdyenError(422, "000", "The expiry date must be within 70 days of the creation date")
        return_url = req.get("returnUrl")
        if return_url is not None and not (isinstance(return_url, str)
                                           and re.match(r"^https?://[^\s]+$", return_url)):
            raise AdyenError(422, "000", "Field 'returnUrl' is not a valid URL")
        lid = link_id()
        link = {"id": lid, "url": "%s/l/%s" % (self.base_url, lid), "status": "active",
                "reference": reference, "amount": {"currency": currency, "value": value},
                "merchantAccount": merchant, "expiresAt": iso8601(expires), "_expires": expires,
                "reusable": bool(req.get("reusable", False)), "_api_key": api_key}
        for field in ("returnUrl", "shopperEmail", "description", "shopperReference",
                      "shopperLocale", "countryCode"):
            if req.get(field) is not None:
                link[field] = req[field]
        if metadata:
            link["metadata"] = dict(metadata)
        with self._lock:
            self._links[lid] = link
            self._stats["links_created"] += 1
        return self._link_response(link)

    def _refresh_link(self, link):
        if link["status"] == "active" and time.time() > link["_expires"]:
            link["status"] = "expired"
        return link

    def _link_response(self, link):
        with self._lock:
            self._refresh_link(link)
            return {k: copy.deepcopy(v) for k, v in link.items() if not k.startswith("_")}

    def _find_link(self, lid, api_key):
        with self._lock:
            link = self._links.get(lid)
        if link is None:
            raise AdyenError(422, "000", "Payment link not found: %s" % lid)
        self._check_merchant(api_key, link["merchantAccount"])
        return link

    def _update_link(self, lid, req, api_key):
        link = self._find_link(lid, api_key)
        if not isinstance(req, dict) or set(req) != {"status"} or req["status"] != "expired":
            raise AdyenError(422, "000", "Field 'status' can only be set to 'expired'")
        with self._lock:
            self._refresh_link(link)
            if link["status"] in ("completed", "paid"):
                raise AdyenError(422, "000", "Payment link with status %s cannot be updated" % link["status"])
            link["status"] = "expired"
        return self._link_response(link)

    # ------------------------------------------------------------ payments

    def _item(self, code, success, psp, amount, currency, merchant, reference, original=None,
              link=None, reason=""):
        item = {"additionalData": {}, "amount": {"currency": currency, "value": amount},
                "eventCode": code, "eventDate": datetime.datetime.now(datetime.timezone.utc)
                .astimezone().isoformat(timespec="seconds"),
                "merchantAccountCode": merchant, "merchantReference": reference,
                "paymentMethod": "visa", "pspReference": psp, "reason": reason,
                "success": "true" if success else "false"}
        if original:
            item["originalReference"] = original
        if code == "AUTHORISATION":
            item["operations"] = ["CANCEL", "CAPTURE", "REFUND"]
            item["additionalData"].update({"authCode": "%06d" % random.randrange(10 ** 6),
                                           "cardSummary": "1111", "expiryDate": "03/2030"})
        if link:
            item["additionalData"]["paymentLinkId"] = link
        return item

    def notify(self, items, sign="items", key=None):
        """Builds (and, with a webhook_url, sends) one notification of these
        items, signed per item (sign="items"), as a whole in an HmacSignature
        header ("header"), or not at all ("none")."""
        key = key or self._config["hmac_key"]
        items = copy.deepcopy(items)
        for item in items:
            item.setdefault("additionalData", {})
            if sign == "items":
                item["additionalData"]["hmacSignature"] = item_signature(key, item)
        body = json.dumps({"live": "true" if self._config["live"] else "false",
                           "notificationItems": [{"NotificationRequestItem": i} for i in items]})
        headers = {"Content-Type": "application/json; charset=utf-8",
                   "User-Agent": "Adyen HttpClient 1.0"}
        if sign == "header":
            headers["HmacSignature"] = body_signature(key, body)
        delivery = {"headers": headers, "body": body, "items": items,
                    "delivered_status": None, "delivery_error": None}
        self._post_webhook(delivery)
        with self._lock:
            self._deliveries.append(delivery)
            self._stats["webhooks_sent"] += 1
        return delivery

    def pay(self, lid, outcome="authorised"):
        """The shopper pays the link; returns {"deliveries", "psp_reference"}."""
        if outcome not in PAY_OUTCOMES:
            raise _ControlError(400, "unknown outcome %r; one of %s" % (outcome, PAY_OUTCOMES))
        with self._lock:
            link = self._links.get(lid)
            if link is None:
                raise _ControlError(404, "no such payment link: %s" % lid)
            self._refresh_link(link)
            if link["status"] not in ("active", "paymentPending"):
                raise _ControlError(409, "payment link %s is %s" % (lid, link["status"]))
            psp = psp_reference()
            amount, currency = link["amount"]["value"], link["amount"]["currency"]
            success = outcome in ("authorised", "pending_authorised")
            if outcome == "pending":
                link["status"] = "paymentPending"
                link["_pending_psp"] = psp
                return {"deliveries": [], "psp_reference": psp}
            if success:
                link["status"] = "completed"
                self._payments[psp] = {"link": lid, "amount": amount, "currency": currency,
                                       "refunded": 0, "merchant": link["merchantAccount"],
                                       "reference": link["reference"]}
            elif outcome == "pending_refused":
                link["status"] = "active"
            item = self._item("AUTHORISATION", success, psp, amount, currency,
                              link["merchantAccount"], link["reference"], link=lid,
                              reason="" if success else "Refused")
        return {"deliveries": [self.notify([item])], "psp_reference": psp}

    def expire_now(self, lid):
        with self._lock:
            link = self._links.get(lid)
            if link is None:
                raise _ControlError(404, "no such payment link: %s" % lid)
            link["_expires"] = time.time() - 1
            self._refresh_link(link)
            return self._link_response(link)

    def _modification(self, psp, code, amount=None, success=True):
        with self._lock:
            payment = self._payments.get(psp)
            if payment is None:
                raise _ControlError(404, "no such payment: %s" % psp)
            if code == "REFUND":
                left = payment["amount"] - payment["refunded"]
                amount = left if amount is None else int(amount)
                if amount <= 0 or amount > left:
                    raise _ControlError(400, "refund of %s exceeds what is left (%s)" % (amount, left))
                if success:
                    payment["refunded"] += amount
            elif amount is None:
                amount = payment["amount"]
            mod_psp = psp_reference()
            item = self._item(code, success, mod_psp, amount, payment["currency"], payment["merchant"],
                              payment["reference"], original=psp, link=payment["link"])
        return {"deliveries": [self.notify([item])], "psp_reference": mod_psp}

    def refund(self, psp, amount=None, success=True):
        return self._modification(psp, "REFUND", amount, success)

    def capture(self, psp, amount=None):
        return self._modification(psp, "CAPTURE", amount)

    def cancel(self, psp):
        return self._modification(psp, "CANCELLATION")

    def chargeback(self, psp):
        return self._modification(psp, "CHARGEBACK")

    def _post_webhook(self, delivery):
        url = self._config["webhook_url"]
        if not url:
            return
        parts = urllib.parse.urlsplit(url)
        try:
            if parts.scheme == "https":
                ctx = ssl.create_default_context(cafile=self._config["webhook_ca"])
                conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, context=ctx,
                                                   timeout=10)
            else:
                conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=10)
            conn.request("POST", parts.path or "/", body=delivery["body"].encode("utf-8"),
                         headers=delivery["headers"])
            resp = conn.getresponse()
            delivery["delivered_status"] = resp.status
            delivery["delivered_reply"] = resp.read().decode("utf-8", "replace")
            conn.close()
        except (OSError, http.client.HTTPException) as exc:
            delivery["delivery_error"] = str(exc)

    # ------------------------------------------------------------ control

    def _control(self, method, path, body):
        try:
            args = json.loads(body) if body else {}
            if not isinstance(args, dict):
                raise _ControlError(400, "body must be a JSON object")
            return self._json(200, self._control_route(method, path[len("/_double"):], args))
        except _ControlError as err:
            return self._json(err.status, {"error": err.message})
        except (ValueError, TypeError) as err:
            return self._json(400, {"error": str(err)})

    def _control_route(self, method, sub, args):
        m = re.fullmatch(r"/paymentLinks/([^/]+)/(pay|expire_now)", sub)
        if m and method == "POST":
            return (self.pay(m.group(1), args.get("outcome", "authorised")) if m.group(2) == "pay"
                    else self.expire_now(m.group(1)))
        m = re.fullmatch(r"/payments/([^/]+)/(refund|capture|cancel|chargeback)", sub)
        if m and method == "POST":
            psp, op = m.groups()
            if op == "refund":
                return self.refund(psp, args.get("amount"), args.get("success", True))
            if op == "capture":
                return self.capture(psp, args.get("amount"))
            return self.cancel(psp) if op == "cancel" else self.chargeback(psp)
        routes = {
            ("POST", "/notify"): lambda: self.notify(args.get("items", []), args.get("sign", "items"),
                                                     args.get("key")),
            ("POST", "/faults"): lambda: self.set_faults(**args),
            ("GET", "/faults"): lambda: dict(self._faults),
            ("POST", "/config"): lambda: self.configure(**args),
            ("GET", "/config"): lambda: dict(self._config),
            ("GET", "/stats"): self.stats,
            ("GET", "/requests"): lambda: {"requests": self.requests()},
            ("GET", "/links"): lambda: {"links": [self.get_link(k) for k in list(self._links)]},
            ("GET", "/deliveries"): lambda: {"deliveries": self.deliveries()},
            ("POST", "/reset"): self.reset,
            ("GET", "/health"): lambda: {"ok": True},
        }
        if (method, sub) not in routes:
            raise _ControlError(404, "no control endpoint %s %s" % (method, sub))
        return routes[(method, sub)]()

    @staticmethod
    def _json(status, obj):
        return status, {"Content-Type": "application/json"}, json.dumps(obj).encode("utf-8")

    def _hosted_page(self, method, path, body):
        lid = path[len("/l/"):]
        link = self.get_link(lid)
        if link is None:
            return 404, {"Content-Type": "text/html"}, b"<h1>Payment link not found</h1>"
        if method == "GET":
            page = ("<!doctype html><title>Pay %s</title><h1>adyen_double pay by link</h1>"
                    "<p id='link'>%s</p><p id='amount'>%s %s</p><p id='status'>%s</p>"
                    "<form method='post'><button name='outcome' value='authorised'>Pay</button>"
                    "<button name='outcome' value='refused'>Decline</button></form>"
                    % tuple(html.escape(str(x)) for x in (lid, lid, link["amount"]["value"],
                                                         link["amount"]["currency"], link["status"])))
            return 200, {"Content-Type": "text/html; charset=utf-8"}, page.encode()
        outcome = urllib.parse.parse_qs(body.decode()).get("outcome", ["authorised"])[0]
        try:
            self.pay(lid, outcome)
        except _ControlError as err:
            return err.status, {"Content-Type": "text/plain"}, err.message.encode()
        return 303, {"Location": link.get("returnUrl", "/")}, b""


def main(argv=None):
    ap = argparse.ArgumentParser(description="Adyen Pay by Link double (HTTPS, loopback)")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--api-key", action="append", required=True)
    ap.add_argument("--hmac-key", required=True, help="hex HMAC key for webhooks")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--webhook-url")
    ap.add_argument("--webhook-ca")
    ap.add_argument("--ready-file", help="write the base URL here once listening")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    double = AdyenDouble(args.api_key, args.hmac_key, args.cert, args.key, host=args.host,
                         port=args.port, webhook_url=args.webhook_url, webhook_ca=args.webhook_ca,
                         verbose=args.verbose)
    base = double.start()
    if args.ready_file:
        with open(args.ready_file + ".tmp", "w") as f:
            f.write(base + "\n")
        os.replace(args.ready_file + ".tmp", args.ready_file)
    print(base, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    stop.wait()
    double.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
