#!/usr/bin/python3
"""Stripe test double for the crmpay test suite.

A loopback HTTPS server that speaks the part of Stripe's REST API crmpay
uses (Checkout Sessions, PaymentIntents, Charges, Balance Transactions,
Refunds, Events), plus a set of test-only control endpoints under
``/_double/`` to "pay" sessions, generate signed webhooks, inject faults and
inspect what the client sent.  Standard library only (Python 3.11).

Fidelity notes (checked against Stripe's docs / real error payloads where a
source was found; items marked "approx." are best-effort):

* Auth: ``Authorization: Bearer <secret key>`` (HTTP Basic with the key as the
  user name is accepted too, as Stripe does).  Failures are 401 with
  ``{"error": {"message": "Invalid API Key provided: sk_test_****abcd",
  "type": "invalid_request_error"}}`` -- the key is masked: the ``sk_test_``
  style prefix and the last 4 characters are kept, the rest become ``*``.
* Bodies are ``application/x-www-form-urlencoded`` with bracket notation;
  parsed into nested dicts (``a[b]``) and lists (``a[]`` / ``a[0]`` where the
  schema expects an array).
* Errors use Stripe's envelope ``{"error": {code, doc_url, message, param,
  request_log_url, type}}``; messages such as ``Received unknown parameter:
  X``, ``Missing required param: X.``, ``Invalid integer: X``, ``No such
  checkout.session: 'cs_...'``, ``Unrecognized request URL (GET: /v1/x).``
  follow real Stripe responses.
* Idempotency: results of POSTs are stored per (API key, Idempotency-Key);
  the same key with the same method/path/params replays the stored response
  (``Idempotent-Replayed: true``); different params give 400
  ``idempotency_error`` with Stripe's message; a concurrent request with a
  key still in flight gives 409 (approx. wording).  Requests that fail
  validation are not stored (Stripe "saves results only after the execution
  of an endpoint begins").
* Lists: ``{"object": "list", "data": [...], "has_more": bool, "url": ...}``,
  newest first, ``limit`` 1..100 (default 10), ``starting_after`` /
  ``ending_before`` (mutually exclusive), ``created`` / ``created[gt|gte|lt|lte]``.
* Webhooks: Stripe event envelopes, body pretty-printed JSON (2-space
  indent, like Stripe), header ``Stripe-Signature: t=<unix>,v1=<hex>`` where
  v1 = HMAC-SHA256(key = whole ``whsec_...`` string, msg = ``t.body``).
* Currency must be a lower-case ISO code from a supported list (Stripe's
  docs say "in lowercase"; the double is deliberately strict here).

Python API::

    d = StripeDouble(api_keys={"sk_test_x"}, webhook_secret="whsec_y",
                     certfile=..., keyfile=...)
    base = d.start()            # "https://127.0.0.1:PORT"
    d.pay(session_id, "paid")   # -> {"deliveries": [...], ...}
    d.stop()

CLI::

    /usr/bin/python3 tests/doubles/stripe_double.py --cert C --key K \\
        --api-key sk_test_x --webhook-secret whsec_y [--port N] \\
        [--webhook-url URL] [--webhook-ca F] [--ready-file F] [--verbose]

See ``CONTROL ENDPOINTS`` below (class StripeDouble) for the test-only API.
"""

import argparse
import base64
import collections
import copy
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
import string
import sys
import threading
import time
import traceback
import urllib.parse

try:
    from .tls_server import DoubleHandler, ServedDouble
except ImportError:          # run as a script: tests/doubles is on sys.path
    from tls_server import DoubleHandler, ServedDouble

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

DEFAULT_API_VERSION = "2024-06-20"
WEBHOOK_USER_AGENT = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
WEBHOOK_CONTENT_TYPE = "application/json; charset=utf-8"
REQUEST_LOG_SIZE = 1000
DELIVERY_LOG_SIZE = 1000

# Stripe's fee model used by the double: 1.5 % + 25 minor units (rounded).
FEE_PERCENT_TENTHS = 15          # 1.5 % expressed in tenths of a percent
FEE_FIXED = 25

# Currencies Stripe accepts for card payments (lower-case ISO 4217).
SUPPORTED_CURRENCIES = (
    "usd aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bhd bif bmd bnd bob brl bsd "
    "bwp byn bzd cad cdf chf clp cny cop crc cve czk djf dkk dop dzd egp etb eur fjd fkp gbp "
    "gel gip gmd gnf gtq gyd hkd hnl htg huf idr ils inr isk jmd jod jpy kes kgs khr kmf krw "
    "kwd kyd kzt lak lbp lkr lrd lsl mad mdl mga mkd mmk mnt mop mur mvr mwk mxn myr mzn nad "
    "ngn nio nok npr nzd omr pab pen pgk php pkr pln pyg qar ron rsd rub rwf sar sbd scr sek "
    "sgd shp sle sos srd std szl thb tjs tnd top try ttd twd tzs uah ugx uyu uzs vnd vuv wst "
    "xaf xcd xof xpf yer zar zmw"
).split()
_CURRENCY_SET = frozenset(SUPPORTED_CURRENCIES)

MAX_AMOUNT = 99999999            # Stripe's 8-digit amount limit
_ALNUM = string.ascii_letters + string.digits

PAY_OUTCOMES = ("paid", "async_pending", "async_succeeded", "async_failed", "failed")
FAULT_MODES = ("none", "500", "429", "503", "slow", "drop", "drop_after_create", "bad_json")


def _rand(n):
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def new_id(prefix):
    """Stripe-looking object id for ``prefix`` (cs_test_, pi_, ch_, ...)."""
    lengths = {"cs_test_": 58, "req_": 14, "prod_": 14}
    return prefix + _rand(lengths.get(prefix, 24))


def mask_key(key):
    """Mask an API key the way Stripe does in 'Invalid API Key provided: ...'.

    The type prefix (``sk_test_``, ``rk_live_`` ...) and the last four
    characters stay; everything in between becomes ``*``.
    """
    if key is None:
        return ""
    m = re.match(r"^((?:sk|rk|pk)_(?:test|live)_)(.*)$", key, re.S)
    prefix, rest = (m.group(1), m.group(2)) if m else ("", key)
    if len(rest) <= 4:
        return prefix + "*" * len(rest)
    return prefix + "*" * (len(rest) - 4) + rest[-4:]


def webhook_signature(secret, timestamp, body):
    """Stripe's v1 scheme: hex HMAC-SHA256(secret, "<t>.<body>")."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    msg = str(int(timestamp)).encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), msg, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class StripeError(Exception):
    """An error answered in Stripe's JSON error envelope."""

    def __init__(self, status, message, type_="invalid_request_error", code=None,
                 param=None, save=False, headers=None, log_url=True):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        # save=True: Stripe has started executing the endpoint, so the result
        # is stored under the idempotency key (e.g. expiring a paid session).
        self.save = save
        self.headers = headers or {}
        self.log_url = log_url

    def body(self, request_id):
        err = {"message": self.message, "type": self.type}
        if self.code:
            err["code"] = self.code
            err["doc_url"] = "https://stripe.com/docs/error-codes/" + self.code.replace("_", "-")
        if self.param is not None:
            err["param"] = self.param
        if self.log_url and request_id:
            err["request_log_url"] = "https://dashboard.stripe.com/test/logs/%s?t=%d" % (
                request_id, int(time.time()))
        return {"error": dict(sorted(err.items()))}


def _missing(param):
    return StripeError(400, "Missing required param: %s." % param, code="parameter_missing",
                       param=param)


def _unknown(param):
    return StripeError(400, "Received unknown parameter: %s" % param, code="parameter_unknown",
                       param=param)


def _no_such(kind, obj_id, param="id"):
    return StripeError(404, "No such %s: '%s'" % (kind, obj_id), code="resource_missing",
                       param=param)


class _ControlError(Exception):
    """Error from a /_double/ control endpoint: {"error": message}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------
# Bracket-notation form parsing
# --------------------------------------------------------------------------

_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_SEG_RE = re.compile(r"\[([^\[\]]*)\]")


def parse_form(text):
    """Parse a Stripe-style form body / query string into nested structures.

    ``a=1`` -> {"a": "1"}; ``a[b][c]=1`` -> {"a": {"b": {"c": "1"}}};
    ``a[]=1&a[]=2`` -> {"a": ["1", "2"]}; ``a[0][b]=1`` -> {"a": {"0": {"b": "1"}}}
    (numeric hashes become lists where the schema expects an array, see
    ``as_list``).  Values stay strings.  Raises StripeError on malformed keys
    or on a key used both as a scalar and as a hash.
    """
    root = {}
    pairs = urllib.parse.parse_qsl(text or "", keep_blank_values=True)
    for key, value in pairs:
        m = _KEY_RE.match(key)
        if not m:
            raise StripeError(400, "Invalid parameter name: %s" % key, param=key)
        segs = [m.group(1)] + _SEG_RE.findall(m.group(2))
        node = root
        shown = segs[0]
        for i, seg in enumerate(segs):
            last = i == len(segs) - 1
            if isinstance(node, list):
                # Parent was "x[]": every "[]" opens a new element.
                if seg != "":
                    raise StripeError(400, "Invalid array", param=shown)
                if last:
                    node.append(value)
                else:
                    nxt = segs[i + 1]
                    child = [] if nxt == "" else {}
                    node.append(child)
                    node = child
                continue
            if seg == "":
                raise StripeError(400, "Invalid hash", param=shown)
            if last:
                if isinstance(node.get(seg), (dict, list)):
                    raise StripeError(400, "Invalid hash", param=shown)
                node[seg] = value
            else:
                nxt = segs[i + 1]
                want = list if nxt == "" else dict
                child = node.get(seg)
                if child is None:
                    child = want()
                    node[seg] = child
                elif not isinstance(child, want):
                    raise StripeError(400, "Invalid %s" % ("array" if want is list else "hash"),
                                      param=shown)
                node = child
            if i + 1 < len(segs):
                shown += "[%s]" % segs[i + 1]
    return root


def as_list(value, param):
    """Coerce a parsed value to a list (``x[]`` list or ``x[0]..x[n]`` hash)."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and value and all(k.isdigit() for k in value):
        idx = sorted(value, key=int)
        if [int(k) for k in idx] != list(range(len(idx))):
            raise StripeError(400, "Invalid array", param=param)
        return [value[k] for k in idx]
    raise StripeError(400, "Invalid array", param=param)


def _as_hash(value, param):
    if not isinstance(value, dict):
        raise StripeError(400, "Invalid object", param=param)
    return value


def _as_str(value, param):
    if not isinstance(value, str):
        raise StripeError(400, "Invalid string: %s" % _short(value), param=param)
    return value


def _short(value):
    return json.dumps(value)[:60] if not isinstance(value, str) else value


def _as_int(value, param, minimum=None, maximum=None):
    if not isinstance(value, str) or not re.fullmatch(r"-?\d+", value.strip()):
        raise StripeError(400, "Invalid integer: %s" % _short(value),
                          code="parameter_invalid_integer", param=param)
    n = int(value)
    if minimum == 0 and n < 0:
        raise StripeError(400, "Invalid non-negative integer",
                          code="parameter_invalid_integer", param=param)
    if minimum is not None and n < minimum:
        raise StripeError(400, "This value must be greater than or equal to %d." % minimum,
                          code="parameter_invalid_integer", param=param)
    if maximum is not None and n > maximum:
        raise StripeError(400, "This value must be less than or equal to %d." % maximum,
                          code="parameter_invalid_integer", param=param)
    return n


def _as_bool(value, param):
    if value in ("true", "false"):
        return value == "true"
    raise StripeError(400, "Invalid boolean: %s" % _short(value), param=param)


def _check_keys(d, allowed, prefix):
    """Reject keys of hash ``d`` that are not in ``allowed``."""
    for k in d:
        if k not in allowed:
            raise _unknown("%s[%s]" % (prefix, k) if prefix else k)


def _check_metadata(value, param):
    md = _as_hash(value, param) if value != "" else {}
    if len(md) > 50:
        raise StripeError(400, "Invalid metadata: metadata can have up to 50 keys, but you "
                          "passed in %d keys." % len(md), param=param)
    out = {}
    for k, v in md.items():
        if not isinstance(v, str):
            raise StripeError(400, "Invalid string: %s" % _short(v), param="%s[%s]" % (param, k))
        if len(k) > 40:
            raise StripeError(400, "Metadata keys can have up to 40 characters: %s" % k,
                              param="%s[%s]" % (param, k))
        if len(v) > 500:
            raise StripeError(400, "Metadata values can have up to 500 characters, but you "
                              "passed in a value that is %d characters." % len(v),
                              param="%s[%s]" % (param, k))
        if v != "":          # an empty value means "unset" in Stripe
            out[k] = v
    return out


def _check_url(value, param):
    value = _as_str(value, param)
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or len(value) > 5000:
        raise StripeError(400, "Not a valid URL", code="url_invalid", param=param)
    return value


_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


# --------------------------------------------------------------------------
# Checkout Session creation: parameters we accept (a subset of Stripe's)
# --------------------------------------------------------------------------

SESSION_PARAMS = {
    "mode", "line_items", "success_url", "cancel_url", "client_reference_id",
    "customer_email", "customer", "customer_creation", "metadata", "payment_intent_data",
    "expires_at", "expand", "locale", "payment_method_types", "submit_type",
    "billing_address_collection", "allow_promotion_codes", "ui_mode", "return_url",
    "currency", "phone_number_collection", "invoice_creation", "automatic_tax",
}
LINE_ITEM_PARAMS = {"price", "price_data", "quantity", "adjustable_quantity", "tax_rates",
                    "dynamic_tax_rates"}
PRICE_DATA_PARAMS = {"currency", "product", "product_data", "unit_amount",
                     "unit_amount_decimal", "tax_behavior", "recurring"}
PRODUCT_DATA_PARAMS = {"name", "description", "images", "metadata", "tax_code"}
PI_DATA_PARAMS = {"metadata", "description", "capture_method", "receipt_email",
                  "statement_descriptor", "statement_descriptor_suffix", "setup_future_usage",
                  "shipping", "transfer_group", "on_behalf_of", "application_fee_amount",
                  "transfer_data"}
LOCALES = {"auto", "bg", "cs", "da", "de", "el", "en", "en-GB", "es", "es-419", "et", "fi",
           "fil", "fr", "fr-CA", "hr", "hu", "id", "it", "ja", "ko", "lt", "lv", "ms", "mt",
           "nb", "nl", "pl", "pt", "pt-BR", "ro", "ru", "sk", "sl", "sv", "th", "tr", "vi",
           "zh", "zh-HK", "zh-TW"}

# What may be expanded on each object type (field -> object store name).
EXPANDABLE = {
    "checkout.session": {"payment_intent": "payment_intent", "line_items": None},
    "payment_intent": {"latest_charge": "charge"},
    "charge": {"balance_transaction": "balance_transaction", "payment_intent": "payment_intent"},
    "balance_transaction": {"source": None},
    "refund": {"balance_transaction": "balance_transaction", "charge": "charge",
               "payment_intent": "payment_intent"},
    "event": {},
}

# Stores: object type -> (url path, Stripe object name used in messages)
STORES = {
    "checkout.session": "/v1/checkout/sessions",
    "payment_intent": "/v1/payment_intents",
    "charge": "/v1/charges",
    "balance_transaction": "/v1/balance_transactions",
    "refund": "/v1/refunds",
    "event": "/v1/events",
}

# Extra list filters accepted per list endpoint (besides limit/cursors/created/expand).
LIST_FILTERS = {
    "checkout.session": {"payment_intent", "status", "customer", "customer_details",
                         "payment_link", "subscription", "client_reference_id"},
    "payment_intent": {"customer"},
    "charge": {"payment_intent", "customer", "transfer_group"},
    "balance_transaction": {"type", "source", "currency", "payout"},
    "refund": {"charge", "payment_intent"},
    "event": {"type", "types", "delivery_success"},
}


# --------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------




class _Handler(DoubleHandler):
    server_header = "nginx"
    sys_version = ""
    timeout = 120            # idle keep-alive timeout per connection
    double_name = "stripe_double"
    internal_error = (500, {"Content-Type": "application/json"},
                      json.dumps({"error": {"type": "api_error",
                                            "message": "stripe_double internal error"}}).encode())


# --------------------------------------------------------------------------
# The double
# --------------------------------------------------------------------------


class StripeDouble(ServedDouble):
    """In-process Stripe double.

    CONTROL ENDPOINTS (JSON in / JSON out, no auth, not counted as API requests):

    * ``POST /_double/checkout/sessions/{id}/pay`` ``{"outcome": "paid" |
      "async_pending" | "async_succeeded" | "async_failed" | "failed"}``
    * ``POST /_double/checkout/sessions/{id}/expire_now``
    * ``POST /_double/payment_intents/{id}/refund`` ``{"amount": n}`` (default: all)
    * ``POST /_double/events/{id}/resend`` ``{"timestamp": t, "secret": s,
      "tamper": bool}`` (all optional) -- redeliver an event (duplicates happen)
      These four answer ``{"deliveries": [{"event_id", "type", "headers",
      "body", "delivered_status", "delivery_error"}], ...ids...}``.
    * ``POST /_double/faults`` ``{"mode", "count", "retry_after", "delay",
      "probability", "path_prefix"}``; ``GET /_double/faults``
    * ``POST /_double/config`` ``{"webhook_url", "webhook_ca", "latency",
      "api_version", "webhook_timeout", "signature_v0"}``; ``GET /_double/config``
    * ``GET /_double/stats``, ``GET /_double/requests[?limit=&path_prefix=]``,
      ``GET /_double/events``, ``GET /_double/deliveries``,
      ``POST /_double/reset``, ``GET /_double/health``

    Test-only hosted page: ``GET <base>/c/pay/{id}`` (HTML) and
    ``POST <base>/c/pay/{id}`` with form ``outcome=paid`` -> 303 to success_url.
    """

    def __init__(self, api_keys, webhook_secret, certfile, keyfile, host="127.0.0.1", port=0,
                 webhook_url=None, webhook_ca=None, verbose=False,
                 api_version=DEFAULT_API_VERSION):
        if isinstance(api_keys, str):
            api_keys = [api_keys]
        self.api_keys = set(api_keys)
        self.webhook_secret = webhook_secret
        self.certfile = certfile
        self.keyfile = keyfile
        self.host = host
        self.port = port
        self.verbose = verbose
        self._lock = threading.RLock()
        self._config = {
            "webhook_url": webhook_url,
            "webhook_ca": webhook_ca,
            "latency": 0.0,
            "api_version": api_version,
            "webhook_timeout": 10.0,
            "signature_v0": False,
        }
        self._server = None
        self._thread = None
        self.base_url = None
        self._reset_state()

    # ------------------------------------------------------------------ life

    def start(self):
        """Start serving in a background thread; return the base URL."""
        return self.serve(_Handler, "stripe-double")

    # ----------------------------------------------------------------- state

    def _reset_state(self):
        with self._lock:
            self._objects = {name: collections.OrderedDict() for name in STORES}
            self._line_items = {}          # session id -> [line item objects]
            self._session_extra = {}       # session id -> {"payment_intent_data": {...}}
            self._idem = {}                # (api_key, idem_key) -> record
            self._requests = collections.deque(maxlen=REQUEST_LOG_SIZE)
            self._deliveries = collections.deque(maxlen=DELIVERY_LOG_SIZE)
            self._request_seq = 0
            self._stats = {
                "requests_total": 0,
                "requests_by_path": {},
                "objects_created_total": 0,
                "objects_created_per_idempotency_key": {},
                "sessions_created": 0,
                "idempotent_replays": 0,
                "idempotency_errors": 0,
                "auth_failures": 0,
                "faults_injected": 0,
                "faults_injected_by_mode": {},
                "tls_handshake_failures": 0,
                "webhooks_sent": 0,
                "last_request": None,
            }
            self._faults = {"mode": "none", "count": None, "retry_after": None, "delay": None,
                            "probability": None, "path_prefix": None}

    def reset(self):
        """Clear all objects, logs, counters and faults (config is kept)."""
        self._reset_state()
        return {"ok": True}

    def _note_tls_failure(self, exc):
        with self._lock:
            self._stats["tls_handshake_failures"] += 1
        if self.verbose:
            sys.stderr.write("stripe_double: TLS handshake failed: %s\n" % exc)

    def _store(self, kind, obj):
        self._objects[kind][obj["id"]] = obj
        return obj

    def _get(self, kind, obj_id):
        return self._objects[kind].get(obj_id)

    # ---------------------------------------------------------- config/faults

    def configure(self, **kw):
        """Set config keys (webhook_url, webhook_ca, latency, api_version,
        webhook_timeout, signature_v0); return the whole config."""
        with self._lock:
            for k, v in kw.items():
                if k not in self._config:
                    raise _ControlError(400, "unknown config key: %s" % k)
                if k in ("latency", "webhook_timeout"):
                    v = float(v or 0)
                self._config[k] = v
            return dict(self._config)

    def set_faults(self, mode="none", count=None, retry_after=None, delay=None,
                   probability=None, path_prefix=None):
        """Arm a fault for the following Stripe-API requests (see module doc)."""
        mode = str(mode)
        if mode not in FAULT_MODES:
            raise _ControlError(400, "unknown fault mode %r; one of %s" % (mode, FAULT_MODES))
        if count is not None:
            count = int(count)
        if probability is not None:
            probability = float(probability)
        with self._lock:
            self._faults = {"mode": mode, "count": count,
                            "retry_after": retry_after, "delay": delay,
                            "probability": probability, "path_prefix": path_prefix}
            return dict(self._faults)

    def _take_fault(self, path):
        """Decide (under the lock) whether this API request is faulted."""
        f = self._faults
        if f["mode"] == "none":
            return None
        if f["path_prefix"] and not path.startswith(f["path_prefix"]):
            return None
        if f["count"] is not None and f["count"] <= 0:
            return None
        if f["probability"] is not None and random.random() >= f["probability"]:
            return None
        fault = dict(f)
        if f["count"] is not None:
            f["count"] -= 1
            if f["count"] <= 0:
                f["mode"] = "none"
        self._stats["faults_injected"] += 1
        by = self._stats["faults_injected_by_mode"]
        by[fault["mode"]] = by.get(fault["mode"], 0) + 1
        return fault

    # ----------------------------------------------------------- inspection

    def stats(self):
        with self._lock:
            return copy.deepcopy(self._stats)

    def requests(self, limit=None, path_prefix=None):
        with self._lock:
            reqs = [r for r in self._requests
                    if not path_prefix or r["path"].startswith(path_prefix)]
        if limit:
            reqs = reqs[-int(limit):]
        return copy.deepcopy(reqs)

    def events(self):
        """All events generated so far, oldest first."""
        with self._lock:
            return copy.deepcopy(list(self._objects["event"].values()))

    def deliveries(self):
        with self._lock:
            return copy.deepcopy(list(self._deliveries))

    def get_object(self, kind, obj_id):
        """Current state of an object (kind: 'checkout.session', 'payment_intent', ...)."""
        with self._lock:
            obj = self._get(kind, obj_id)
            return copy.deepcopy(obj) if obj else None

    # ============================================================ dispatcher

    def _dispatch(self, method, raw_path, headers, body):
        """Route one HTTP request; return (status, headers, bytes) or None to drop."""
        parts = urllib.parse.urlsplit(raw_path)
        path = parts.path
        if path.startswith("/_double/") or path == "/_double":
            return self._control(method, path, parts.query, body)
        if path.startswith("/c/pay/"):
            return self._hosted_page(method, path, body)
        return self._api(method, path, parts.query, headers, body)

    # ----------------------------------------------------------- Stripe API

    def _api(self, method, path, query, headers, body):
        request_id = new_id("req_")
        body_text = body.decode("utf-8", errors="replace")
        auth_header = headers.get("Authorization")
        idem_key = headers.get("Idempotency-Key") if method == "POST" else None
        api_version = headers.get("Stripe-Version") or self._config["api_version"]

        with self._lock:
            self._request_seq += 1
            entry = {
                "seq": self._request_seq,
                "time": time.time(),
                "request_id": request_id,
                "method": method,
                "path": path,
                "query": query,
                "headers": self._masked_headers(headers),
                "body": body_text,
                "params": None,
                "status": None,
                "fault": None,
                "idempotency_key": idem_key,
                "replayed": False,
            }
            self._requests.append(entry)
            self._stats["requests_total"] += 1
            by = self._stats["requests_by_path"]
            key = "%s %s" % (method, path)
            by[key] = by.get(key, 0) + 1
            self._stats["last_request"] = entry
            fault = self._take_fault(path)
            entry["fault"] = fault["mode"] if fault else None
            latency = self._config["latency"]

        base_headers = {
            "Content-Type": "application/json",
            "Request-Id": request_id,
            "Stripe-Version": api_version,
            "Cache-Control": "no-cache, no-store",
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Expose-Headers": "Request-Id, Stripe-Manage-Version, "
                                             "Stripe-Should-Retry, Idempotency-Key",
            "Strict-Transport-Security": "max-age=63072000; includeSubDomains; preload",
        }

        # Configured latency is slept exactly once per API request: inside the
        # idempotency "in flight" window for executed requests, or just before
        # answering for requests that end early (faults, auth, validation).
        latency_left = [latency]

        def sleep_latency():
            if latency_left[0]:
                time.sleep(latency_left[0])
                latency_left[0] = 0

        def reply(status, obj, extra=None):
            sleep_latency()
            entry["status"] = status
            hdrs = dict(base_headers)
            hdrs.update(extra or {})
            return status, hdrs, (json.dumps(obj, indent=2) + "\n").encode("utf-8")

        def reply_error(err):
            return reply(err.status, err.body(request_id), err.headers)

        # ---- faults that replace the answer and create nothing
        if fault:
            mode = fault["mode"]
            if mode == "drop":
                sleep_latency()
                entry["status"] = "dropped"
                return None
            if mode == "500":
                return reply_error(StripeError(
                    500, "An unknown error occurred", type_="api_error", log_url=False))
            if mode == "503":
                extra = {}
                if fault["retry_after"] is not None:
                    extra["Retry-After"] = str(fault["retry_after"])
                return reply_error(StripeError(
                    503, "The server is temporarily unavailable. Please retry the request "
                    "later.", type_="api_error", headers=extra, log_url=False))
            if mode == "429":
                extra = {}
                if fault["retry_after"] is not None:
                    extra["Retry-After"] = str(fault["retry_after"])
                return reply_error(StripeError(
                    429, "Request rate limit exceeded. You can learn more about rate limits "
                    "here https://stripe.com/docs/rate-limits.", code="rate_limit",
                    headers=extra))
            if mode == "bad_json":
                sleep_latency()
                entry["status"] = 200
                hdrs = dict(base_headers)
                return 200, hdrs, b'{\n  "id": "cs_test_truncated",\n  "object": "checkout.sess'

        # ---- authentication
        api_key, auth_err = self._authenticate(auth_header)
        if auth_err is not None:
            with self._lock:
                self._stats["auth_failures"] += 1
            return reply_error(auth_err)

        # ---- parameters (bracket notation)
        try:
            params = parse_form(query)
            ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if method == "POST" and body and ctype in ("", "application/x-www-form-urlencoded"):
                for k, v in parse_form(body_text).items():
                    params[k] = v
        except StripeError as err:
            return reply_error(err)
        entry["params"] = params

        # ---- idempotency (POST only; scoped per API key)
        idem_slot = None
        fingerprint = (method, path, json.dumps(params, sort_keys=True))
        if idem_key is not None:
            if len(idem_key) > 255:
                return reply_error(StripeError(
                    400, "Idempotency key must be at most 255 characters long.",
                    param="Idempotency-Key"))
            slot_key = (api_key, idem_key)
            with self._lock:
                rec = self._idem.get(slot_key)
                if rec is not None and rec["state"] == "done":
                    if rec["fingerprint"] != fingerprint:
                        self._stats["idempotency_errors"] += 1
                        return reply_error(StripeError(
                            400, "Keys for idempotent requests can only be used with the same "
                            "parameters they were first used with. Try using a key other than "
                            "'%s' if you meant to execute a different request." % idem_key,
                            type_="idempotency_error"))
                    self._stats["idempotent_replays"] += 1
                    entry["replayed"] = True
                    entry["status"] = rec["status"]
                    hdrs = dict(base_headers)
                    hdrs.update(rec["headers"])
                    hdrs["Idempotency-Key"] = idem_key
                    hdrs["Original-Request"] = rec["request_id"]
                    hdrs["Idempotent-Replayed"] = "true"
                    payload = rec["payload"]
                    replay = (rec["status"], hdrs, payload)
                elif rec is not None:
                    return reply_error(StripeError(
                        409, "There is currently another in-progress request using this "
                        "Stripe-Idempotency-Key (that probably means you submitted twice, and "
                        "the other request is still going through): %s. Please try again "
                        "later." % idem_key, code="idempotency_key_in_use"))
                else:
                    replay = None
                    self._idem[slot_key] = {"state": "running"}
                    idem_slot = slot_key
            if replay is not None:
                sleep_latency()
                return self._finish_fault(fault, replay)
            base_headers["Idempotency-Key"] = idem_key
            base_headers["Original-Request"] = request_id

        # ---- execute the endpoint
        ctx = {"request_id": request_id, "idempotency_key": idem_key, "api_key": api_key}
        try:
            sleep_latency()
            status, obj = self._route(method, path, params, ctx)
            result = reply(status, obj)
            save = True
        except StripeError as err:
            result = reply_error(err)
            save = err.save
        except BaseException:
            if idem_slot is not None:
                with self._lock:
                    self._idem.pop(idem_slot, None)
            raise

        if idem_slot is not None:
            # Replace the "running" marker atomically: either the stored
            # result (endpoint executed) or nothing (validation failure, which
            # Stripe does not save, so the client may retry with the same key).
            with self._lock:
                if save:
                    stored_headers = {k: v for k, v in result[1].items()
                                      if k in ("Retry-After",)}
                    self._idem[idem_slot] = {"state": "done", "fingerprint": fingerprint,
                                             "status": result[0], "headers": stored_headers,
                                             "payload": result[2], "request_id": request_id}
                else:
                    self._idem.pop(idem_slot, None)

        # Events triggered by API calls (e.g. expire) are delivered
        # asynchronously, as Stripe does (they may even arrive before the
        # API response does).
        pending = ctx.get("pending_events")
        if pending:
            threading.Thread(target=self._deliver_events, args=(pending,),
                             daemon=True).start()

        return self._finish_fault(fault, result)

    def _finish_fault(self, fault, result):
        """Apply the faults that act after the endpoint ran (slow, drop_after_create)."""
        if fault and fault["mode"] == "slow":
            time.sleep(float(fault["delay"] if fault["delay"] is not None else 5.0))
        if fault and fault["mode"] == "drop_after_create":
            return None
        return result

    def _masked_headers(self, headers):
        out = {}
        for k, v in headers.items():
            if k.lower() == "authorization":
                scheme, _, cred = v.partition(" ")
                if scheme.lower() == "basic":
                    try:
                        user = base64.b64decode(cred).decode().split(":", 1)[0]
                        v = "Basic <%s:>" % mask_key(user)
                    except Exception:
                        v = "Basic ****"
                else:
                    v = "%s %s" % (scheme, mask_key(cred.strip())) if cred else scheme
            out[k] = v
        return out

    def _authenticate(self, header):
        """Return (api_key, None) or (None, StripeError 401)."""
        no_key = ("You did not provide an API key. You need to provide your API key in the "
                  "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                  "YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for "
                  "details, or we can help at https://support.stripe.com/.")
        if not header or not header.strip():
            return None, StripeError(401, no_key, log_url=False)
        scheme, _, cred = header.strip().partition(" ")
        cred = cred.strip()
        if scheme.lower() == "bearer":
            key = cred
        elif scheme.lower() == "basic":
            try:
                key = base64.b64decode(cred, validate=True).decode("utf-8").split(":", 1)[0]
            except Exception:
                key = ""
        else:
            return None, StripeError(
                401, "Invalid API Key provided: %s" % mask_key(header.strip()), log_url=False)
        if not key:
            return None, StripeError(
                401, "You did not provide an API key, though you did set your Authorization "
                "header to \"%s\". Using Bearer auth, your Authorization header should look "
                "something like 'Authorization: Bearer YOUR_SECRET_KEY'. See "
                "https://stripe.com/docs/api#authentication for details, or we can help at "
                "https://support.stripe.com/." % scheme, log_url=False)
        if " " in key:
            return None, StripeError(
                401, "Invalid API Key provided: %s. This key contains at least one space. "
                "Please delete the spaces and try again." % mask_key(key), log_url=False)
        if key not in self.api_keys:
            return None, StripeError(401, "Invalid API Key provided: %s" % mask_key(key),
                                     log_url=False)
        return key, None

    # ---------------------------------------------------------------- routes

    _ROUTES = [
        ("POST", re.compile(r"^/v1/checkout/sessions$"), "_create_session"),
        ("GET", re.compile(r"^/v1/checkout/sessions$"), "_list_sessions"),
        ("GET", re.compile(r"^/v1/checkout/sessions/([^/]+)$"), "_retrieve_session"),
        ("POST", re.compile(r"^/v1/checkout/sessions/([^/]+)/expire$"), "_api_expire_session"),
        ("GET", re.compile(r"^/v1/checkout/sessions/([^/]+)/line_items$"), "_session_line_items"),
        ("GET", re.compile(r"^/v1/payment_intents$"), "_list_generic:payment_intent"),
        ("GET", re.compile(r"^/v1/payment_intents/([^/]+)$"), "_retrieve_generic:payment_intent"),
        ("GET", re.compile(r"^/v1/charges$"), "_list_generic:charge"),
        ("GET", re.compile(r"^/v1/charges/([^/]+)$"), "_retrieve_generic:charge"),
        ("GET", re.compile(r"^/v1/balance_transactions$"), "_list_generic:balance_transaction"),
        ("GET", re.compile(r"^/v1/balance_transactions/([^/]+)$"),
         "_retrieve_generic:balance_transaction"),
        ("GET", re.compile(r"^/v1/refunds$"), "_list_generic:refund"),
        ("GET", re.compile(r"^/v1/refunds/([^/]+)$"), "_retrieve_generic:refund"),
        ("GET", re.compile(r"^/v1/events$"), "_list_generic:event"),
        ("GET", re.compile(r"^/v1/events/([^/]+)$"), "_retrieve_generic:event"),
    ]

    def _route(self, method, path, params, ctx):
        for m, rx, name in self._ROUTES:
            if m != method:
                continue
            match = rx.match(path)
            if not match:
                continue
            args = [urllib.parse.unquote(a) for a in match.groups()]
            if ":" in name:
                name, kind = name.split(":")
                args = [kind] + args
            return getattr(self, name)(params, ctx, *args)
        raise StripeError(404, "Unrecognized request URL (%s: %s). Please see "
                          "https://stripe.com/docs or we can help at "
                          "https://support.stripe.com/." % (method, path))

    # ------------------------------------------------------------ expansion

    def _expand(self, kind, obj, expand, prefix=""):
        """Return a copy of ``obj`` with the requested fields expanded."""
        obj = copy.deepcopy(obj)
        for path in expand:
            head, _, rest = path.partition(".")
            allowed = EXPANDABLE.get(kind, {})
            if head not in allowed:
                raise StripeError(400, "This property cannot be expanded (%s%s)."
                                  % (prefix, head), param="expand")
            if kind == "checkout.session" and head == "line_items":
                obj["line_items"] = self._list_object(
                    list(reversed(self._line_items.get(obj["id"], []))), {},
                    "/v1/checkout/sessions/%s/line_items" % obj["id"])
                continue
            value = obj.get(head)
            if not isinstance(value, str):
                continue
            target = allowed[head]
            if target is None:            # polymorphic (balance_transaction.source)
                target = {"ch_": "charge", "re_": "refund", "pi_": "payment_intent"}.get(
                    value[:3])
            sub = self._get(target, value) if target else None
            if sub is not None:
                obj[head] = self._expand(target, sub, [rest] if rest else [],
                                         prefix + head + ".")
        return obj

    def _expand_param(self, params):
        if "expand" not in params:
            return []
        return [_as_str(v, "expand") for v in as_list(params["expand"], "expand")]

    # ----------------------------------------------------------------- lists

    def _list_object(self, items, params, url, kind=None, pred=None):
        """Apply Stripe list semantics to ``items`` (given oldest first).

        Cursors are located in the full newest-first list; filters (``pred``
        and ``created``) are applied to the window after the cursor.
        """
        limit = 10
        if "limit" in params:
            limit = _as_int(params["limit"], "limit", 1, 100)
        after = params.get("starting_after")
        before = params.get("ending_before")
        if after is not None and before is not None:
            raise StripeError(400, "You may only specify one of these parameters: "
                              "ending_before, starting_after.", param="ending_before")
        created_ok = self._created_pred(params)
        preds = [p for p in (pred, created_ok) if p is not None]
        full = list(reversed(items))            # newest first, like Stripe

        def keep(seq):
            return [o for o in seq if all(p(o) for p in preds)]

        if after is not None:
            idx = self._index_of(full, after, kind, "starting_after")
            window = keep(full[idx + 1:])
            data, has_more = window[:limit], len(window) > limit
        elif before is not None:
            idx = self._index_of(full, before, kind, "ending_before")
            window = keep(full[:idx])
            data, has_more = window[-limit:], len(window) > limit
        else:
            window = keep(full)
            data, has_more = window[:limit], len(window) > limit
        return {"object": "list", "data": data, "has_more": has_more, "url": url}

    @staticmethod
    def _index_of(items, obj_id, kind, param):
        obj_id = _as_str(obj_id, param)
        for i, o in enumerate(items):
            if o["id"] == obj_id:
                return i
        raise _no_such(kind or "object", obj_id, param=param)

    @staticmethod
    def _created_pred(params):
        """Validate ``created`` / ``created[op]`` now; return a predicate or None."""
        if "created" not in params:
            return None
        cond = params["created"]
        if isinstance(cond, str):
            exact = _as_int(cond, "created")
            return lambda o: o["created"] == exact
        cond = _as_hash(cond, "created")
        ops = {"gt": lambda a, b: a > b, "gte": lambda a, b: a >= b,
               "lt": lambda a, b: a < b, "lte": lambda a, b: a <= b}
        checks = []
        for op, v in cond.items():
            if op not in ops:
                raise _unknown("created[%s]" % op)
            checks.append((ops[op], _as_int(v, "created[%s]" % op)))
        return lambda o: all(fn(o["created"], b) for fn, b in checks)

    def _list_generic(self, params, ctx, kind):
        allowed = {"limit", "starting_after", "ending_before", "created", "expand"}
        allowed |= LIST_FILTERS.get(kind, set())
        _check_keys(params, allowed, "")
        expand = self._expand_param(params)
        sub = []
        for e in expand:
            if not e.startswith("data."):
                raise StripeError(400, "This property cannot be expanded (%s)." % e,
                                  param="expand")
            sub.append(e[5:])
        pred = self._filter_pred(kind, params)
        with self._lock:
            items = list(self._objects[kind].values())
            result = self._list_object(items, params, STORES[kind], kind, pred)
            result["data"] = [self._expand(kind, o, sub) if sub else copy.deepcopy(o)
                              for o in result["data"]]
        return 200, result

    def _filter_pred(self, kind, params):
        """Validate the endpoint-specific list filters; return a predicate."""
        checks = []
        for key in sorted(LIST_FILTERS.get(kind, ())):
            if key not in params:
                continue
            want = params[key]
            if kind == "checkout.session" and key == "customer_details":
                want = _as_hash(want, key)
                _check_keys(want, {"email"}, key)
                if "email" in want:
                    email = _as_str(want["email"], "customer_details[email]")
                    checks.append(lambda o, e=email: (
                        (o.get("customer_details") or {}).get("email")
                        or o.get("customer_email")) == e)
            elif kind == "event" and key in ("type", "types"):
                pats = ([_as_str(want, key)] if key == "type" else
                        [_as_str(t, key) for t in as_list(want, key)])
                checks.append(lambda o, ps=pats: any(self._type_match(o["type"], p)
                                                     for p in ps))
            elif kind == "event" and key == "delivery_success":
                _as_bool(want, key)
            else:
                val = _as_str(want, key)
                checks.append(lambda o, k=key, v=val: o.get(k) == v)
        if not checks:
            return None
        return lambda o: all(c(o) for c in checks)

    @staticmethod
    def _type_match(actual, pattern):
        if pattern.endswith("*"):
            return actual.startswith(pattern[:-1])
        return actual == pattern

    def _retrieve_generic(self, params, ctx, kind, obj_id):
        _check_keys(params, {"expand"}, "")
        expand = self._expand_param(params)
        with self._lock:
            obj = self._get(kind, obj_id)
            if obj is None:
                raise _no_such(kind, obj_id)
            return 200, self._expand(kind, obj, expand)

    # ------------------------------------------------------ checkout sessions

    def _create_session(self, params, ctx):
        _check_keys(params, SESSION_PARAMS, "")
        # Stripe treats "" as "unset", which is an error for creation params.
        for k, v in params.items():
            if v == "" and k != "metadata":
                raise StripeError(
                    400, "You passed an empty string for '%s'. We assume empty values are an "
                    "attempt to unset a parameter; however '%s' cannot be unset. You should "
                    "remove '%s' from your request or supply a non-empty value." % (k, k, k),
                    code="parameter_invalid_empty", param=k)

        if "mode" not in params:
            raise _missing("mode")
        mode = params["mode"]
        if mode not in ("payment", "setup", "subscription"):
            raise StripeError(400, "Invalid mode: must be one of payment, setup, or "
                              "subscription", param="mode")
        if mode != "payment":
            raise StripeError(400, "stripe_double supports only mode=payment (got %s)" % mode,
                              param="mode")

        ui_mode = params.get("ui_mode", "hosted")
        if ui_mode not in ("hosted", "embedded", "custom"):
            raise StripeError(400, "Invalid ui_mode: must be one of hosted, embedded, or "
                              "custom", param="ui_mode")
        if ui_mode == "hosted":
            if "success_url" not in params:
                raise _missing("success_url")
            if "return_url" in params:
                raise StripeError(400, "`return_url` can only be used with `ui_mode: "
                                  "embedded` or `ui_mode: custom`.", param="return_url")
        success_url = _check_url(params["success_url"], "success_url") \
            if "success_url" in params else None
        cancel_url = _check_url(params["cancel_url"], "cancel_url") \
            if "cancel_url" in params else None

        if "line_items" not in params:
            raise _missing("line_items")
        raw_items = as_list(params["line_items"], "line_items")
        if not raw_items:
            raise _missing("line_items")
        if len(raw_items) > 100:
            raise StripeError(400, "You may only specify up to 100 line items.",
                              param="line_items")

        currency = None
        line_items = []
        subtotal = 0
        for i, raw in enumerate(raw_items):
            p = "line_items[%d]" % i
            raw = _as_hash(raw, p)
            _check_keys(raw, LINE_ITEM_PARAMS, p)
            if "price" in raw:
                price_id = _as_str(raw["price"], p + "[price]")
                raise _no_such("price", price_id, param=p + "[price]")
            if "price_data" not in raw:
                raise StripeError(400, "You must provide either price or price_data for each "
                                  "line item when using prices.", param=p)
            pd = _as_hash(raw["price_data"], p + "[price_data]")
            pp = p + "[price_data]"
            _check_keys(pd, PRICE_DATA_PARAMS, pp)
            if "currency" not in pd:
                raise _missing(pp + "[currency]")
            cur = _as_str(pd["currency"], pp + "[currency]")
            if cur not in _CURRENCY_SET:
                raise StripeError(400, "Invalid currency: %s. Stripe currently supports these "
                                  "currencies: %s" % (cur, ", ".join(SUPPORTED_CURRENCIES)),
                                  param=pp + "[currency]")
            if currency is None:
                currency = cur
            elif cur != currency:
                raise StripeError(400, "Checkout does not support multiple currencies. All "
                                  "line items must use the same currency.",
                                  param=pp + "[currency]")
            if "recurring" in pd:
                raise StripeError(400, "You specified `payment` mode but passed a recurring "
                                  "price. Either switch to `subscription` mode or use only "
                                  "one-time prices.", param=pp + "[recurring]")
            if "unit_amount" in pd and "unit_amount_decimal" in pd:
                raise StripeError(400, "You may only specify one of these parameters: "
                                  "unit_amount, unit_amount_decimal.", param=pp + "[unit_amount]")
            if "unit_amount" in pd:
                unit_amount = _as_int(pd["unit_amount"], pp + "[unit_amount]", 0, MAX_AMOUNT)
            elif "unit_amount_decimal" in pd:
                s = _as_str(pd["unit_amount_decimal"], pp + "[unit_amount_decimal]")
                if not re.fullmatch(r"\d+", s):
                    raise StripeError(400, "stripe_double supports only whole-number "
                                      "unit_amount_decimal", param=pp + "[unit_amount_decimal]")
                unit_amount = int(s)
            else:
                raise _missing(pp + "[unit_amount]")
            if "product" in pd and "product_data" in pd:
                raise StripeError(400, "You may only specify one of these parameters: product, "
                                  "product_data.", param=pp + "[product]")
            if "product" in pd:
                raise _no_such("product", _as_str(pd["product"], pp + "[product]"),
                               param=pp + "[product]")
            if "product_data" not in pd:
                raise StripeError(400, "You must specify either `product` or `product_data` "
                                  "when creating a price.", param=pp)
            prd = _as_hash(pd["product_data"], pp + "[product_data]")
            _check_keys(prd, PRODUCT_DATA_PARAMS, pp + "[product_data]")
            if "name" not in prd:
                raise _missing(pp + "[product_data][name]")
            name = _as_str(prd["name"], pp + "[product_data][name]")
            if name == "":
                raise StripeError(400, "You passed an empty string for '%s'. We assume empty "
                                  "values are an attempt to unset a parameter; however '%s' "
                                  "cannot be unset. You should remove '%s' from your request "
                                  "or supply a non-empty value."
                                  % ((pp + "[product_data][name]",) * 3),
                                  code="parameter_invalid_empty",
                                  param=pp + "[product_data][name]")
            if "metadata" in prd:
                _check_metadata(prd["metadata"], pp + "[product_data][metadata]")
            if "quantity" not in raw:
                raise _missing(p + "[quantity]")
            qty = _as_int(raw["quantity"], p + "[quantity]", 1, 999999)
            amount = unit_amount * qty
            subtotal += amount
            now = int(time.time())
            price = {
                "id": new_id("price_"), "object": "price", "active": False,
                "billing_scheme": "per_unit", "created": now, "currency": cur,
                "custom_unit_amount": None, "livemode": False, "lookup_key": None,
                "metadata": {}, "nickname": None, "product": new_id("prod_"),
                "recurring": None, "tax_behavior": pd.get("tax_behavior", "unspecified"),
                "tiers_mode": None, "transform_quantity": None, "type": "one_time",
                "unit_amount": unit_amount, "unit_amount_decimal": str(unit_amount),
            }
            line_items.append({
                "id": new_id("li_"), "object": "item", "amount_discount": 0,
                "amount_subtotal": amount, "amount_tax": 0, "amount_total": amount,
                "currency": cur, "description": name, "price": price, "quantity": qty,
            })
        if subtotal > MAX_AMOUNT:
            raise StripeError(400, "The Checkout Session's total amount due must be no more "
                              "than %d." % MAX_AMOUNT, code="amount_too_large",
                              param="line_items")

        metadata = _check_metadata(params["metadata"], "metadata") if "metadata" in params else {}

        pi_data = {}
        if "payment_intent_data" in params:
            pi_data = _as_hash(params["payment_intent_data"], "payment_intent_data")
            _check_keys(pi_data, PI_DATA_PARAMS, "payment_intent_data")
            if "metadata" in pi_data:
                pi_data = dict(pi_data)
                pi_data["metadata"] = _check_metadata(pi_data["metadata"],
                                                      "payment_intent_data[metadata]")
            if "capture_method" in pi_data and pi_data["capture_method"] not in (
                    "automatic", "automatic_async", "manual"):
                raise StripeError(400, "Invalid payment_intent_data[capture_method]: must be "
                                  "one of automatic, automatic_async, or manual",
                                  param="payment_intent_data[capture_method]")

        client_reference_id = None
        if "client_reference_id" in params:
            client_reference_id = _as_str(params["client_reference_id"], "client_reference_id")
            if len(client_reference_id) > 200:
                raise StripeError(400, "Invalid string: %s...; must be at most 200 characters"
                                  % client_reference_id[:20], param="client_reference_id")

        customer_email = None
        if "customer_email" in params:
            customer_email = _as_str(params["customer_email"], "customer_email")
            if not _EMAIL_RE.match(customer_email) or len(customer_email) > 800:
                raise StripeError(400, "Invalid email address: %s" % customer_email,
                                  code="email_invalid", param="customer_email")
        if "customer" in params:
            cus = _as_str(params["customer"], "customer")
            raise _no_such("customer", cus, param="customer")

        now = int(time.time())
        expires_at = now + 24 * 3600
        if "expires_at" in params:
            expires_at = _as_int(params["expires_at"], "expires_at")
            if expires_at > now + 24 * 3600:
                raise StripeError(400, "The `expires_at` timestamp must be less than 24 hours "
                                  "from Checkout Session creation.", param="expires_at")
            if expires_at < now + 30 * 60:
                raise StripeError(400, "The `expires_at` timestamp must be at least 30 minutes "
                                  "from Checkout Session creation.", param="expires_at")

        locale = params.get("locale")
        if locale is not None and locale not in LOCALES:
            raise StripeError(400, "Invalid locale: %s" % _short(locale), param="locale")
        pm_types = ["card"]
        if "payment_method_types" in params:
            pm_types = [_as_str(t, "payment_method_types")
                        for t in as_list(params["payment_method_types"], "payment_method_types")]
        allow_promo = None
        if "allow_promotion_codes" in params:
            allow_promo = _as_bool(params["allow_promotion_codes"], "allow_promotion_codes")
        expand = self._expand_param(params)

        session_id = new_id("cs_test_")
        session = {
            "id": session_id,
            "object": "checkout.session",
            "adaptive_pricing": {"enabled": False},
            "after_expiration": None,
            "allow_promotion_codes": allow_promo,
            "amount_subtotal": subtotal,
            "amount_total": subtotal,
            "automatic_tax": {"enabled": False, "liability": None, "status": None},
            "billing_address_collection": params.get("billing_address_collection"),
            "cancel_url": cancel_url,
            "client_reference_id": client_reference_id,
            "client_secret": None,
            "consent": None,
            "consent_collection": None,
            "created": now,
            "currency": currency,
            "currency_conversion": None,
            "custom_fields": [],
            "custom_text": {"after_submit": None, "shipping_address": None, "submit": None,
                            "terms_of_service_acceptance": None},
            "customer": None,
            "customer_creation": params.get("customer_creation", "if_required"),
            "customer_details": None,
            "customer_email": customer_email,
            "expires_at": expires_at,
            "invoice": None,
            "invoice_creation": {"enabled": False, "invoice_data": {
                "account_tax_ids": None, "custom_fields": None, "description": None,
                "footer": None, "issuer": None, "metadata": {}, "rendering_options": None}},
            "livemode": False,
            "locale": locale,
            "metadata": metadata,
            "mode": mode,
            "payment_intent": None,
            "payment_link": None,
            "payment_method_collection": "if_required",
            "payment_method_configuration_details": None,
            "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
            "payment_method_types": pm_types,
            "payment_status": "unpaid",
            "phone_number_collection": {"enabled": False},
            "recovered_from": None,
            "saved_payment_method_options": None,
            "setup_intent": None,
            "shipping_address_collection": None,
            "shipping_cost": None,
            "shipping_details": None,
            "shipping_options": [],
            "status": "open",
            "submit_type": params.get("submit_type"),
            "subscription": None,
            "success_url": success_url,
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": ui_mode,
            "url": None,
        }
        with self._lock:
            # URL on the double itself so tests can "open" the hosted page.
            if ui_mode == "hosted":
                session["url"] = "%s/c/pay/%s" % (self.base_url or "", session_id)
            else:
                session["client_secret"] = "%s_secret_%s" % (session_id, _rand(24))
            self._store("checkout.session", session)
            self._line_items[session_id] = line_items
            self._session_extra[session_id] = {"payment_intent_data": pi_data}
            self._stats["sessions_created"] += 1
            self._stats["objects_created_total"] += 1
            key = ctx.get("idempotency_key")
            if key is not None:
                per = self._stats["objects_created_per_idempotency_key"]
                per[key] = per.get(key, 0) + 1
            return 200, self._expand("checkout.session", session, expand)

    def _list_sessions(self, params, ctx):
        return self._list_generic(params, ctx, "checkout.session")

    def _retrieve_session(self, params, ctx, session_id):
        return self._retrieve_generic(params, ctx, "checkout.session", session_id)

    def _session_line_items(self, params, ctx, session_id):
        _check_keys(params, {"limit", "starting_after", "ending_before", "expand"}, "")
        with self._lock:
            if self._get("checkout.session", session_id) is None:
                raise _no_such("checkout.session", session_id)
            # Line items keep the order they were given in; _list_object
            # lists "newest first", so hand it the reversed sequence.
            items = list(reversed(self._line_items.get(session_id, [])))
            return 200, self._list_object(items, params,
                                          "/v1/checkout/sessions/%s/line_items" % session_id,
                                          "line_item")

    def _api_expire_session(self, params, ctx, session_id):
        _check_keys(params, {"expand"}, "")
        expand = self._expand_param(params)
        with self._lock:
            session = self._get("checkout.session", session_id)
            if session is None:
                raise _no_such("checkout.session", session_id)
            if session["status"] != "open":
                # approx. wording; the status rule itself is Stripe's documented one.
                raise StripeError(400, "Only Checkout Sessions with a status of `open` can be "
                                  "expired. This Checkout Session has a status of `%s`."
                                  % session["status"], save=True)
            events = self._do_expire(session, ctx)
            ctx["pending_events"] = events
            return 200, self._expand("checkout.session", session, expand)

    # ============================================================ simulation

    def _event(self, type_, obj, ctx=None, previous=None):
        """Create and store a Stripe event envelope (caller holds the lock)."""
        data = {"object": copy.deepcopy(obj)}
        if previous:
            data["previous_attributes"] = previous
        evt = {
            "id": new_id("evt_"),
            "object": "event",
            "api_version": self._config["api_version"],
            "created": int(time.time()),
            "data": data,
            "livemode": False,
            "pending_webhooks": 1 if self._config["webhook_url"] else 0,
            "request": {"id": (ctx or {}).get("request_id"),
                        "idempotency_key": (ctx or {}).get("idempotency_key")},
            "type": type_,
        }
        self._store("event", evt)
        return evt

    def _do_expire(self, session, ctx=None):
        session["status"] = "expired"
        session["url"] = None
        return [self._event("checkout.session.expired", session, ctx)]

    def _new_payment_intent(self, session):
        extra = self._session_extra.get(session["id"], {})
        pid = extra.get("payment_intent_data", {})
        now = int(time.time())
        pi_id = new_id("pi_")
        pi = {
            "id": pi_id, "object": "payment_intent",
            "amount": session["amount_total"], "amount_capturable": 0,
            "amount_details": {"tip": {}}, "amount_received": 0, "application": None,
            "application_fee_amount": None, "automatic_payment_methods": None,
            "canceled_at": None, "cancellation_reason": None,
            "capture_method": pid.get("capture_method", "automatic_async"),
            "client_secret": "%s_secret_%s" % (pi_id, _rand(25)),
            "confirmation_method": "automatic", "created": now,
            "currency": session["currency"], "customer": None,
            "description": pid.get("description"), "invoice": None,
            "last_payment_error": None, "latest_charge": None, "livemode": False,
            "metadata": dict(pid.get("metadata", {})), "next_action": None,
            "on_behalf_of": None, "payment_method": None,
            "payment_method_configuration_details": None,
            "payment_method_options": {"card": {"installments": None, "mandate_options": None,
                                                "network": None,
                                                "request_three_d_secure": "automatic"}},
            "payment_method_types": list(session["payment_method_types"]),
            "processing": None, "receipt_email": pid.get("receipt_email"), "review": None,
            "setup_future_usage": None, "shipping": None, "source": None,
            "statement_descriptor": pid.get("statement_descriptor"),
            "statement_descriptor_suffix": pid.get("statement_descriptor_suffix"),
            "status": "requires_payment_method", "transfer_data": None,
            "transfer_group": pid.get("transfer_group"),
        }
        self._store("payment_intent", pi)
        session["payment_intent"] = pi_id
        return pi

    def _new_charge(self, pi, session):
        now = int(time.time())
        amount = pi["amount"]
        fee = (amount * FEE_PERCENT_TENTHS + 500) // 1000 + FEE_FIXED
        ch_id = new_id("ch_")
        txn = {
            "id": new_id("txn_"), "object": "balance_transaction", "amount": amount,
            "available_on": now + 2 * 86400, "created": now, "currency": pi["currency"],
            "description": pi["description"], "exchange_rate": None, "fee": fee,
            "fee_details": [{"amount": fee, "application": None, "currency": pi["currency"],
                             "description": "Stripe processing fees", "type": "stripe_fee"}],
            "net": amount - fee, "reporting_category": "charge", "source": ch_id,
            "status": "pending", "type": "charge",
        }
        email = session.get("customer_email") or "customer@example.com"
        charge = {
            "id": ch_id, "object": "charge", "amount": amount, "amount_captured": amount,
            "amount_refunded": 0, "application": None, "application_fee": None,
            "application_fee_amount": None, "balance_transaction": txn["id"],
            "billing_details": {"address": {"city": None, "country": "FR", "line1": None,
                                            "line2": None, "postal_code": None,
                                            "state": None},
                                "email": email, "name": "Test Customer", "phone": None},
            "calculated_statement_descriptor": "CRMPAY TEST", "captured": True,
            "created": now, "currency": pi["currency"], "customer": None,
            "description": pi["description"], "disputed": False,
            "failure_balance_transaction": None, "failure_code": None,
            "failure_message": None, "fraud_details": {}, "invoice": None, "livemode": False,
            "metadata": dict(pi["metadata"]), "on_behalf_of": None,
            "outcome": {"network_status": "approved_by_network", "reason": None,
                        "risk_level": "normal", "risk_score": 32, "seller_message":
                        "Payment complete.", "type": "authorized"},
            "paid": True, "payment_intent": pi["id"], "payment_method": pi["payment_method"],
            "payment_method_details": {"card": {"brand": "visa", "country": "US",
                                                "exp_month": 12, "exp_year": 2034,
                                                "funding": "credit", "last4": "4242",
                                                "network": "visa"}, "type": "card"},
            "receipt_email": None, "receipt_number": None,
            "receipt_url": "https://pay.stripe.com/receipts/payment/%s" % _rand(40),
            "refunded": False, "review": None, "shipping": None, "source_transfer": None,
            "statement_descriptor": None, "statement_descriptor_suffix": None,
            "status": "succeeded", "transfer_data": None, "transfer_group": None,
        }
        self._store("balance_transaction", txn)
        self._store("charge", charge)
        return charge, txn

    def _complete_session(self, session, payment_status):
        email = session.get("customer_email") or "customer@example.com"
        session["status"] = "complete"
        session["payment_status"] = payment_status
        session["url"] = None
        session["customer_details"] = {
            "address": {"city": None, "country": "FR", "line1": None, "line2": None,
                        "postal_code": None, "state": None},
            "email": email, "name": "Test Customer", "phone": None,
            "tax_exempt": "none", "tax_ids": [],
        }

    def _succeed(self, session, pi):
        """PI succeeded + charge + balance txn; returns events (lock held)."""
        charge, txn = self._new_charge(pi, session)
        pi["status"] = "succeeded"
        pi["amount_received"] = pi["amount"]
        pi["latest_charge"] = charge["id"]
        pi["last_payment_error"] = None
        return charge, txn, [self._event("charge.succeeded", charge),
                             self._event("payment_intent.succeeded", pi)]

    def _fail(self, pi, message="Your card was declined.", code="card_declined"):
        pi["status"] = "requires_payment_method"
        pi["payment_method"] = None
        pi["last_payment_error"] = {
            "code": code, "decline_code": "generic_decline",
            "doc_url": "https://stripe.com/docs/error-codes/" + code.replace("_", "-"),
            "message": message, "type": "card_error",
            "payment_method": {"id": new_id("pm_"), "object": "payment_method",
                               "type": "card"},
        }
        return [self._event("payment_intent.payment_failed", pi)]

    def pay(self, session_id, outcome="paid"):
        """Simulate the customer paying on the hosted page.

        outcome: "paid" (card, immediate), "async_pending" (delayed method,
        still processing), "async_succeeded" / "async_failed" (settle a
        delayed payment; from an open session the pending step is done
        first), "failed" (card declined, session stays open).
        Returns {"deliveries": [...], "session": id, "payment_intent": id,
        "charge": id|None, "balance_transaction": id|None}.
        """
        if outcome not in PAY_OUTCOMES:
            raise _ControlError(400, "outcome must be one of %s" % (PAY_OUTCOMES,))
        with self._lock:
            session = self._get("checkout.session", session_id)
            if session is None:
                raise _ControlError(404, "No such checkout.session: '%s'" % session_id)
            pi = self._get("payment_intent", session["payment_intent"]) \
                if session["payment_intent"] else None
            events = []
            charge = txn = None
            if session["status"] == "expired":
                raise _ControlError(400, "checkout session %s is expired" % session_id)
            if session["status"] == "complete":
                pending = pi is not None and pi["status"] == "processing"
                if not (pending and outcome in ("async_succeeded", "async_failed")):
                    raise _ControlError(400, "checkout session %s is already complete "
                                        "(payment_status=%s)" % (session_id,
                                                                 session["payment_status"]))
            if pi is None:
                pi = self._new_payment_intent(session)
            if pi["payment_method"] is None:
                pi["payment_method"] = new_id("pm_")

            if outcome == "paid":
                charge, txn, evs = self._succeed(session, pi)
                events += evs
                self._complete_session(session, "paid")
                events.append(self._event("checkout.session.completed", session))
            elif outcome == "failed":
                events += self._fail(pi)
            else:
                if session["status"] == "open":
                    pi["status"] = "processing"
                    events.append(self._event("payment_intent.processing", pi))
                    self._complete_session(session, "unpaid")
                    events.append(self._event("checkout.session.completed", session))
                if outcome == "async_succeeded":
                    charge, txn, evs = self._succeed(session, pi)
                    events += evs
                    session["payment_status"] = "paid"
                    events.append(self._event("checkout.session.async_payment_succeeded",
                                              session))
                elif outcome == "async_failed":
                    events += self._fail(pi, "The payment could not be completed.",
                                         "payment_method_provider_decline")
                    events.append(self._event("checkout.session.async_payment_failed",
                                              session))
            result = {"session": session_id, "payment_intent": pi["id"],
                      "charge": charge["id"] if charge else None,
                      "balance_transaction": txn["id"] if txn else None}
        result["deliveries"] = self._deliver_events(events)
        return result

    def expire(self, session_id):
        """Expire an open session now (checkout.session.expired)."""
        with self._lock:
            session = self._get("checkout.session", session_id)
            if session is None:
                raise _ControlError(404, "No such checkout.session: '%s'" % session_id)
            if session["status"] != "open":
                raise _ControlError(400, "checkout session %s has status %s; only open "
                                    "sessions can expire" % (session_id, session["status"]))
            events = self._do_expire(session)
        return {"session": session_id, "deliveries": self._deliver_events(events)}

    def refund(self, payment_intent_id, amount=None):
        """Refund (part of) a succeeded PaymentIntent -> charge.refunded."""
        with self._lock:
            pi = self._get("payment_intent", payment_intent_id)
            if pi is None:
                raise _ControlError(404, "No such payment_intent: '%s'" % payment_intent_id)
            charge = self._get("charge", pi["latest_charge"]) if pi["latest_charge"] else None
            if pi["status"] != "succeeded" or charge is None:
                raise _ControlError(400, "This PaymentIntent (%s) does not have a successful "
                                    "charge to refund." % payment_intent_id)
            remaining = charge["amount"] - charge["amount_refunded"]
            amount = remaining if amount is None else int(amount)
            if amount <= 0 or amount > remaining:
                raise _ControlError(400, "Refund amount (%d) is greater than unrefunded amount "
                                    "on charge (%d)" % (amount, remaining)
                                    if amount > 0 else "refund amount must be positive")
            now = int(time.time())
            re_id = new_id("re_")
            txn = {
                "id": new_id("txn_"), "object": "balance_transaction", "amount": -amount,
                "available_on": now, "created": now, "currency": charge["currency"],
                "description": "REFUND FOR CHARGE", "exchange_rate": None, "fee": 0,
                "fee_details": [], "net": -amount, "reporting_category": "refund",
                "source": re_id, "status": "available", "type": "refund",
            }
            refund = {
                "id": re_id, "object": "refund", "amount": amount,
                "balance_transaction": txn["id"], "charge": charge["id"], "created": now,
                "currency": charge["currency"], "destination_details": None,
                "metadata": {}, "payment_intent": pi["id"], "reason": None,
                "receipt_number": None, "source_transfer_reversal": None,
                "status": "succeeded", "transfer_reversal": None,
            }
            self._store("balance_transaction", txn)
            self._store("refund", refund)
            previous = {"amount_refunded": charge["amount_refunded"],
                        "refunded": charge["refunded"]}
            charge["amount_refunded"] += amount
            charge["refunded"] = charge["amount_refunded"] == charge["amount"]
            events = [self._event("charge.refunded", charge, previous=previous)]
            result = {"payment_intent": pi["id"], "charge": charge["id"], "refund": re_id,
                      "balance_transaction": txn["id"]}
        result["deliveries"] = self._deliver_events(events)
        return result

    def resend(self, event_id, timestamp=None, secret=None, tamper=False):
        """Deliver an existing event again (optionally with a forced timestamp,
        another signing secret, or a body altered after signing)."""
        with self._lock:
            evt = self._get("event", event_id)
            if evt is None:
                raise _ControlError(404, "No such event: '%s'" % event_id)
        return {"deliveries": self._deliver_events([evt], timestamp=timestamp, secret=secret,
                                                   tamper=tamper)}

    # ------------------------------------------------------------- webhooks

    def _deliver_events(self, events, timestamp=None, secret=None, tamper=False):
        """Sign each event; POST it to webhook_url if configured. Never holds the lock
        while talking to the receiver (it may call back into the double)."""
        with self._lock:
            url = self._config["webhook_url"]
            ca = self._config["webhook_ca"]
            wh_timeout = self._config["webhook_timeout"]
            v0 = self._config["signature_v0"]
        out = []
        for evt in events:
            body = json.dumps(evt, indent=2)
            t = int(time.time()) if timestamp is None else int(timestamp)
            sig = webhook_signature(secret or self.webhook_secret, t, body)
            header = "t=%d,v1=%s" % (t, sig)
            if v0:
                header += ",v0=%s" % webhook_signature("whsec_v0_test_mode", t, body)
            if tamper:
                body = body.replace('"livemode": false', '"livemode": true', 1)
            headers = {
                "Stripe-Signature": header,
                "Content-Type": WEBHOOK_CONTENT_TYPE,
                "User-Agent": WEBHOOK_USER_AGENT,
            }
            delivery = {"event_id": evt["id"], "type": evt["type"], "headers": headers,
                        "body": body, "delivered_status": None, "delivery_error": None}
            if url:
                status, error = self._post_webhook(url, ca, wh_timeout, headers, body)
                delivery["delivered_status"] = status
                delivery["delivery_error"] = error
            with self._lock:
                self._deliveries.append(copy.deepcopy(delivery))
                if url:
                    self._stats["webhooks_sent"] += 1
            out.append(delivery)
        return out

    def _post_webhook(self, url, ca, wh_timeout, headers, body):
        parts = urllib.parse.urlsplit(url)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            if parts.scheme == "https":
                ctx = ssl.create_default_context(cafile=ca) if ca else \
                    ssl.create_default_context()
                conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443,
                                                   timeout=wh_timeout, context=ctx)
            elif parts.scheme == "http":
                conn = http.client.HTTPConnection(parts.hostname, parts.port or 80,
                                                  timeout=wh_timeout)
            else:
                return None, "unsupported webhook URL scheme: %s" % parts.scheme
            try:
                data = body.encode("utf-8")
                hdrs = dict(headers)
                hdrs["Content-Length"] = str(len(data))
                hdrs["Cache-Control"] = "no-cache"
                hdrs["Accept"] = "*/*; q=0.5, application/xml"
                conn.request("POST", path, body=data, headers=hdrs)
                resp = conn.getresponse()
                resp.read()
                return resp.status, None
            finally:
                conn.close()
        except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
            if self.verbose:
                sys.stderr.write("stripe_double: webhook to %s failed: %s\n" % (url, exc))
            return None, "%s: %s" % (type(exc).__name__, exc)

    # ------------------------------------------------------ control endpoints

    def _control(self, method, path, query, body):
        """Test-only /_double/ endpoints (JSON)."""
        try:
            data = {}
            if body:
                try:
                    data = json.loads(body.decode("utf-8"))
                except ValueError:
                    raise _ControlError(400, "control endpoints take a JSON body")
                if not isinstance(data, dict):
                    raise _ControlError(400, "JSON body must be an object")
            qs = dict(urllib.parse.parse_qsl(query))
            sub = path[len("/_double"):]
            m = re.match(r"^/checkout/sessions/([^/]+)/(pay|expire_now)$", sub)
            if m and method == "POST":
                if m.group(2) == "pay":
                    return self._json(200, self.pay(m.group(1), data.get("outcome", "paid")))
                return self._json(200, self.expire(m.group(1)))
            m = re.match(r"^/payment_intents/([^/]+)/refund$", sub)
            if m and method == "POST":
                return self._json(200, self.refund(m.group(1), data.get("amount")))
            m = re.match(r"^/events/([^/]+)/resend$", sub)
            if m and method == "POST":
                return self._json(200, self.resend(m.group(1), data.get("timestamp"),
                                                   data.get("secret"),
                                                   bool(data.get("tamper"))))
            if sub == "/faults":
                if method == "POST":
                    allowed = {"mode", "count", "retry_after", "delay", "probability",
                               "path_prefix"}
                    bad = set(data) - allowed
                    if bad:
                        raise _ControlError(400, "unknown fault keys: %s" % sorted(bad))
                    return self._json(200, self.set_faults(**data))
                with self._lock:
                    return self._json(200, dict(self._faults))
            if sub == "/config":
                if method == "POST":
                    return self._json(200, self.configure(**data))
                with self._lock:
                    return self._json(200, dict(self._config))
            if sub == "/stats" and method == "GET":
                return self._json(200, self.stats())
            if sub == "/requests" and method == "GET":
                return self._json(200, {"requests": self.requests(qs.get("limit"),
                                                                  qs.get("path_prefix"))})
            if sub == "/events" and method == "GET":
                return self._json(200, {"events": self.events()})
            if sub == "/deliveries" and method == "GET":
                return self._json(200, {"deliveries": self.deliveries()})
            if sub == "/reset" and method == "POST":
                return self._json(200, self.reset())
            if sub == "/health":
                return self._json(200, {"ok": True, "base_url": self.base_url})
            raise _ControlError(404, "unknown control endpoint %s %s" % (method, path))
        except _ControlError as err:
            return self._json(err.status, {"error": err.message})
        except (TypeError, ValueError) as err:
            return self._json(400, {"error": str(err)})

    @staticmethod
    def _json(status, obj):
        return status, {"Content-Type": "application/json"}, \
            (json.dumps(obj, indent=2) + "\n").encode("utf-8")

    # ---------------------------------------------------- hosted test page

    def _hosted_page(self, method, path, body):
        """Minimal stand-in for checkout.stripe.com/c/pay/<id>."""
        session_id = urllib.parse.unquote(path[len("/c/pay/"):].split("/")[0])
        with self._lock:
            session = copy.deepcopy(self._get("checkout.session", session_id))
        if session is None:
            return 404, {"Content-Type": "text/html; charset=utf-8"}, \
                b"<!doctype html><title>Not found</title><p>Something went wrong.</p>"
        if method == "POST":
            form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
            outcome = form.get("outcome", "paid")
            try:
                self.pay(session_id, outcome)
            except _ControlError as err:
                return 400, {"Content-Type": "text/plain; charset=utf-8"}, \
                    err.message.encode()
            target = session["success_url"] if outcome != "failed" else \
                (session["cancel_url"] or session["success_url"])
            target = (target or "").replace("{CHECKOUT_SESSION_ID}", session_id)
            return 303, {"Location": target, "Content-Type": "text/plain"}, b"See Other"
        esc = html.escape
        names = ", ".join(esc(li["description"]) for li in self._line_items.get(session_id, []))
        page = (
            "<!doctype html><html><head><meta charset='utf-8'><title>Pay %s</title></head>"
            "<body><h1>stripe_double checkout</h1><p id='session'>%s</p>"
            "<p id='status'>status=%s payment_status=%s</p>"
            "<p id='amount'>%d %s</p><p id='items'>%s</p>"
            "<form method='post'><button name='outcome' value='paid'>Pay</button>"
            "<button name='outcome' value='failed'>Decline</button></form>"
            "</body></html>" % (esc(session_id), esc(session_id), esc(session["status"]),
                                esc(session["payment_status"]), session["amount_total"],
                                esc(session["currency"] or ""), names))
        return 200, {"Content-Type": "text/html; charset=utf-8"}, page.encode("utf-8")


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description="Stripe test double (HTTPS, loopback).")
    ap.add_argument("--cert", required=True, help="server certificate (PEM)")
    ap.add_argument("--key", required=True, help="server private key (PEM)")
    ap.add_argument("--api-key", action="append", required=True,
                    help="accepted secret key (repeatable)")
    ap.add_argument("--webhook-secret", required=True, help="whsec_... signing secret")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = ephemeral")
    ap.add_argument("--webhook-url", help="POST each event here")
    ap.add_argument("--webhook-ca", help="CA file to trust for an https webhook URL")
    ap.add_argument("--ready-file", help="write the base URL here once listening")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to each API call")
    ap.add_argument("--api-version", default=DEFAULT_API_VERSION)
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = ap.parse_args(argv)

    double = StripeDouble(args.api_key, args.webhook_secret, args.cert, args.key,
                          host=args.host, port=args.port, webhook_url=args.webhook_url,
                          webhook_ca=args.webhook_ca, verbose=args.verbose,
                          api_version=args.api_version)
    if args.latency:
        double.configure(latency=args.latency)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    base = double.start()
    if args.ready_file:
        tmp = args.ready_file + ".tmp%d" % os.getpid()
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(base + "\n")
        os.replace(tmp, args.ready_file)
    print(base, flush=True)
    while not stop.wait(0.5):
        pass
    double.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
