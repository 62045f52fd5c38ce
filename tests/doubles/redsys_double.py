#!/usr/bin/python3
"""Redsys (SIS, "TPV Virtual") test double for the crmpay test suite.

A loopback HTTPS server that speaks the parts of Redsys crmpay uses, plus
test-only control endpoints under ``/_double/`` to pay orders, produce
correctly signed notifications, inject faults and inspect what the client
sent.  Standard library only, except for the 3DES step, done with the
``openssl`` command line (Python's stdlib has no DES) and cached per order.

Fidelity notes (sources: pagosonline.redsys.es, the official apiRedsys
examples, the redsys-easy and sermepa test suites; see
shared/reference/gateways.md section 5; "approx." marks guesses):

* Signature HMAC_SHA256_V1: the merchant key (base64 of 24 bytes) encrypts
  the order number with 3DES-CBC (zero IV, zero padding); that key signs
  the Ds_MerchantParameters text as sent, HMAC-SHA256.  The double checks
  every request's signature and signs every answer and notification.
* ``POST /sis/realizarPago``: form-encoded Ds_SignatureVersion,
  Ds_MerchantParameters, Ds_Signature, posted by the customer's browser.
  Success: HTTP 200 with the (fake) card page.  Errors: HTTP 200 with an
  HTML page carrying ``RSisException`` and the code as ``<!--SIS0042:-->``
  (seen in the sermepa integration tests): SIS0042 bad signature, SIS0026
  unknown merchant/terminal, SIS0051 repeated order, SIS0014 bad order,
  SIS0018/SIS0019 amount, SIS0015/SIS0016/SIS0027 currency, SIS0030
  transaction type, SIS0008-SIS0011 merchant code and terminal.
* ``POST /sis/rest/trataPeticionREST``: JSON triple; the answer is a JSON
  triple signed with standard base64 (as the redsys-easy fixtures show), or
  ``{"errorCode": "SIS0xxx"}`` with HTTP 200.  Implemented: Paygold
  (DS_MERCHANT_TRANSACTIONTYPE "F") for merchants that have it: the answer
  carries Ds_Response 9998 and Ds_UrlPago2Fases (``/sis/p2f?t=<40 hex>``,
  the real link's shape).  Other transaction types answer SIS0030 (approx.).
* Idempotency: Redsys has no idempotency key; the order number is unique per
  merchant.  A Paygold request for a known order, or a redirect for an
  order already paid, answers SIS0051.  Re-posting the form of an unpaid
  order (the customer reloads, or retries after a denial) is accepted.
* ``POST /apl02/services/SerClsWSConsulta``: the SOAP status query
  ("Consulta SOAP", Redsys manual RS.TE.CEL.MAN.0021 v1.4, whose worked
  examples the double reproduces byte for byte).  The SOAP call
  consultaOperaciones carries in cadenaXML the message
  ``<Messages><Version Ds_Version="0.0"><Message><Monitor>`` (or
  ``<Transaction>`` with Ds_TransactionType) ``...</Version><Signature/>
  <SignatureVersion/></Messages>``, signed HMAC-SHA256 over the exact
  ``<Version ...>...</Version>`` text with the order key, standard base64.
  The double checks it as the manual describes (element order as in its
  XML schema, XML0001-XML0030 for bad fields, XML0023 for a bad signature,
  XML0041 for a merchant without the service) and answers every operation
  of the order, newest first, as ``<Response>`` elements in the schema's
  order, signed the same way over its own ``<Version>`` element; an order
  it does not know answers ``<ErrorMsg><Ds_ErrorCode>XML0024``.  Approx.
  (not in the manual, taken from public clients): the SOAP envelope, the
  answer's message as escaped text in
  consultaOperacionesResponse/consultaOperacionesReturn, error answers
  unsigned, SIS0026 for an unknown merchant or terminal, a SOAP fault with
  HTTP 500 for a body that is not a SOAP call, the time zone of Ds_Date and
  Ds_Hour (Europe/Madrid).  Operations: a form posted or a Paygold link
  made opens one (Ds_State S, no Ds_Response); paying finishes it (F with
  0000 or the denial code); refunds add type 3 / 0900; ``seed_operation``
  adds any other (an amount or currency the CRM does not expect...).
* Notifications: POST to DS_MERCHANT_MERCHANTURL, form-encoded
  Ds_SignatureVersion / Ds_MerchantParameters (base64url) / Ds_Signature
  (base64url); parameters Ds_Date ("dd%2Fmm%2Fyyyy"), Ds_Hour ("HH%3AMM"),
  Ds_Amount, Ds_Currency, Ds_Order, Ds_MerchantCode, Ds_Terminal ("001"),
  Ds_Response, Ds_AuthorisationCode, Ds_TransactionType, ... as in the
  redsys-easy notification fixtures.  Outcomes: authorised (0000), denied
  (0190), cancelled by the customer (9915), refund (type 3, 0900).

Python API::

    d = RedsysDouble(certfile=..., keyfile=...)
    d.add_merchant("999008881", "sq7HjrUOBfKmC576ILgskD5srU870gJ7",
                   terminals=("1",), paygold=True)
    base = d.start()                       # "https://127.0.0.1:PORT"
    d.pay(order, "authorised")             # -> {"deliveries": [...], ...}
    d.stop()

CLI::

    /usr/bin/python3 tests/doubles/redsys_double.py --cert C --key K \\
        --merchant 999008881:sq7HjrUOBfKmC576ILgskD5srU870gJ7[:paygold] [--port N]

CONTROL ENDPOINTS (JSON in / JSON out): ``POST /_double/pay`` ``{"merchant",
"order", "outcome"}``, ``POST /_double/refund`` ``{"merchant", "order",
"amount"}``, ``POST /_double/seed`` ``{"merchant", "order", "type",
"response", "amount", "currency", "state"}``, ``POST /_double/faults``
``{"mode", "count", "after", "code"}``, ``POST /_double/reset``, ``GET
/_double/stats``, ``GET /_double/requests``, ``GET /_double/orders``.

Fault modes: 500, 503 (HTML error page), slow (5 s), drop (connection
closed), drop_after_create (Paygold made, answer lost), bad_json (REST
answer cut short), and for the status query soap_error (an ErrorMsg with
``code``, default XML0000), soap_fault (HTTP 500 with a SOAP fault),
bad_signature (the answer signed with another key), bad_xml (the answer
cut short).  ``after`` lets that many requests
through first.
"""

import argparse
import base64
import datetime
import hashlib
import hmac
import html
import http.client
import http.server
import json
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import xml.etree.ElementTree as ET
import zoneinfo
from xml.sax.saxutils import escape as xml_escape

try:
    from .tls_server import DoubleHandler, ServedDouble
except ImportError:          # run as a script: tests/doubles is on sys.path
    from tls_server import DoubleHandler, ServedDouble

SIGNATURE_VERSION = "HMAC_SHA256_V1"
REDIRECT_PATH = "/sis/realizarPago"
REST_PATH = "/sis/rest/trataPeticionREST"
P2F_PATH = "/sis/p2f"
QUERY_PATH = "/apl02/services/SerClsWSConsulta"
QUERY_NS = "http://webservices.apl02.redsys.es"
SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
SPAIN = zoneinfo.ZoneInfo("Europe/Madrid")

# The query's message types and their elements, in the order of the
# manual's XML schema (a different order fails the DTD: XML0001).
QUERY_MESSAGES = {
    "Transaction": ("Ds_MerchantCode", "Ds_Terminal", "Ds_Order", "Ds_TransactionType"),
    "Monitor": ("Ds_MerchantCode", "Ds_Terminal", "Ds_Order"),
    "Detail": ("Ds_MerchantCode", "Ds_Terminal", "Ds_Order", "Ds_TransactionType"),
    "TransactionMasiva": ("Ds_Order", "Ds_MerchantCode", "Ds_Terminal", "Ds_TransactionType",
                          "Ds_Fecha_inicio", "Ds_Fecha_fin"),
    "MonitorMasiva": ("Ds_Order", "Ds_MerchantCode", "Ds_Terminal", "Ds_Fecha_inicio", "Ds_Fecha_fin"),
}

# ISO 4217 numeric codes the double's terminals take by default, with the
# exponent Redsys uses (two decimals, none for the yen).
DEFAULT_CURRENCIES = {"978": 2, "840": 2, "826": 2, "392": 0}

SIS_TEXTS = {
    "SIS0008": "Error falta Ds_Merchant_MerchantCode",
    "SIS0009": "Error de formato en Ds_Merchant_MerchantCode",
    "SIS0010": "Error falta Ds_Merchant_Terminal",
    "SIS0011": "Error de formato en Ds_Merchant_Terminal",
    "SIS0014": "Error de formato en Ds_Merchant_Order",
    "SIS0015": "Error falta Ds_Merchant_Currency",
    "SIS0016": "Error de formato en Ds_Merchant_Currency",
    "SIS0018": "Error falta Ds_Merchant_Amount",
    "SIS0019": "Error de formato en Ds_Merchant_Amount",
    "SIS0026": "Error No existe el comercio / terminal enviado",
    "SIS0027": "Error Moneda enviada por el comercio es diferente a la asignada para ese terminal",
    "SIS0030": "Error en tipo de operacion",
    "SIS0042": "Error en el calculo de la firma",
    "SIS0051": "Error numero de pedido repetido",
}

OUTCOMES = {
    # outcome: (Ds_Response, gets an authorisation code)
    "authorised": ("0000", True),
    "denied": ("0190", False),
    "cancelled": ("9915", False),
}

FAULT_MODES = ("none", "500", "503", "slow", "drop", "drop_after_create", "bad_json",
               "soap_error", "soap_fault", "bad_signature", "bad_xml")


# --------------------------------------------------------------------------
# The signature (independent of crmpay's C code)
# --------------------------------------------------------------------------

_order_key_cache = {}
_order_key_lock = threading.Lock()


def order_key(merchant_key_b64, order):
    """3DES-CBC(key, IV 0, order zero-padded to a multiple of 8)."""
    cache_key = (merchant_key_b64, order)
    with _order_key_lock:
        hit = _order_key_cache.get(cache_key)
    if hit is not None:
        return hit
    key = base64.b64decode(merchant_key_b64)
    data = order.encode("utf-8")
    data += b"\0" * (-len(data) % 8)
    out = subprocess.run(["openssl", "enc", "-des-ede3-cbc", "-K", key.hex(), "-iv", "0" * 16,
                          "-nopad"], input=data, capture_output=True, check=True).stdout
    with _order_key_lock:
        if len(_order_key_cache) > 100000:
            _order_key_cache.clear()
        _order_key_cache[cache_key] = out
    return out


def signature(merchant_key_b64, order, params_text, urlsafe=False):
    """Ds_Signature of a Ds_MerchantParameters text."""
    mac = hmac.new(order_key(merchant_key_b64, order), params_text.encode("ascii"),
                   hashlib.sha256).digest()
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(mac).decode("ascii")


def xml_signature(merchant_key_b64, order, version_text):
    """Signature of a status query message: the <Version> element text."""
    mac = hmac.new(order_key(merchant_key_b64, order), version_text.encode("utf-8"),
                   hashlib.sha256).digest()
    return base64.b64encode(mac).decode("ascii")


def encode_params(params, urlsafe=False):
    text = json.dumps(params, separators=(",", ":"))
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(text.encode()).decode("ascii")


def decode_b64(text):
    """Either alphabet, padding optional; raises ValueError."""
    text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    return base64.b64decode(text, validate=True)


def sign_params(merchant_key_b64, params, order_field="Ds_Order", urlsafe=False):
    """(Ds_MerchantParameters, Ds_Signature) for a dict of parameters."""
    text = encode_params(params, urlsafe)
    return text, signature(merchant_key_b64, params[order_field], text, urlsafe)


def notification_body(merchant_key_b64, params):
    """A form-encoded notification, as Redsys POSTs it."""
    text, sig = sign_params(merchant_key_b64, params, urlsafe=True)
    return urllib.parse.urlencode({"Ds_SignatureVersion": SIGNATURE_VERSION,
                                   "Ds_MerchantParameters": text, "Ds_Signature": sig})


def field(params, name):
    """A parameter in any letter case (Redsys accepts DS_X and Ds_X)."""
    for k, v in params.items():
        if k.lower() == name.lower():
            return v
    return None


# --------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------



class _Handler(DoubleHandler):
    double_name = "redsys_double"
    internal_error = (500, {"Content-Type": "text/plain"}, b"redsys_double internal error")


class SisError(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


# --------------------------------------------------------------------------
# The double
# --------------------------------------------------------------------------

class RedsysDouble(ServedDouble):
    """In-process Redsys double (see the module docstring)."""

    def __init__(self, certfile, keyfile, host="127.0.0.1", port=0, verbose=False,
                 notification_ca=None):
        self.certfile = certfile
        self.keyfile = keyfile
        self.host = host
        self.port = port
        self.verbose = verbose
        self.notification_ca = notification_ca
        self._lock = threading.RLock()
        self._server = None
        self._thread = None
        self.base_url = None
        self.merchants = {}
        self._reset_state()

    # ------------------------------------------------------------------ life

    def _note_tls_failure(self, exc):
        with self._lock:
            self._stats["tls_failures"] += 1

    def start(self):
        """Start serving in a background thread; return the base URL."""
        return self.serve(_Handler, "redsys-double")

    # ----------------------------------------------------------------- state

    def add_merchant(self, code, key, terminals=("1",), paygold=False, currencies=None,
                     soap_query=True):
        """Registers a merchant (FUC) with its key, terminals and options
        (soap_query: the bank enabled the status query service)."""
        with self._lock:
            self.merchants[code] = {
                "key": key,
                "terminals": {str(int(t)) for t in terminals},
                "paygold": paygold,
                "currencies": dict(currencies or DEFAULT_CURRENCIES),
                "soap_query": soap_query,
            }

    def _reset_state(self):
        with self._lock:
            self._orders = {}           # (merchant, order) -> dict
            self._tokens = {}           # p2f token -> (merchant, order)
            self._requests = []
            self._deliveries = []
            self._faults = {"mode": "none", "count": 0, "after": 0, "code": None}
            self._stats = {"requests": 0, "redirects": 0, "rest": 0, "queries": 0, "errors": 0,
                           "faults": 0, "tls_failures": 0, "notifications": 0}

    def reset(self):
        """Forgets orders, requests and faults (merchants stay)."""
        self._reset_state()

    def set_faults(self, mode="none", count=1, after=0, code=None):
        """After `after` more API requests, the next `count` fail with `mode`
        (see FAULT_MODES); `code` is the soap_error's Ds_ErrorCode."""
        if mode not in FAULT_MODES:
            raise ValueError("unknown fault mode %r" % mode)
        with self._lock:
            self._faults = {"mode": mode, "count": count if mode != "none" else 0,
                            "after": int(after), "code": code}

    def _take_fault(self):
        with self._lock:
            if self._faults["count"] <= 0:
                return "none"
            if self._faults["after"] > 0:
                self._faults["after"] -= 1
                return "none"
            self._faults["count"] -= 1
            self._stats["faults"] += 1
            return self._faults["mode"]

    def stats(self):
        with self._lock:
            return dict(self._stats)

    def requests(self, path_prefix=None):
        with self._lock:
            return [dict(r) for r in self._requests
                    if path_prefix is None or r["path"].startswith(path_prefix)]

    def orders(self):
        with self._lock:
            return {"%s/%s" % k: dict(v) for k, v in self._orders.items()}

    def get_order(self, merchant, order):
        with self._lock:
            o = self._orders.get((merchant, order))
            return dict(o) if o else None

    def register_order(self, merchant, order, amount="100", currency="978", terminal="1"):
        """Makes Redsys know an order already (to test repeated orders)."""
        with self._lock:
            self._orders[(merchant, order)] = self._new_order(
                merchant, order, {"DS_MERCHANT_AMOUNT": amount, "DS_MERCHANT_CURRENCY": currency,
                                  "DS_MERCHANT_TERMINAL": terminal, "DS_MERCHANT_TRANSACTIONTYPE": "0"},
                "redirect")

    # ------------------------------------------------------------- dispatch

    def _dispatch(self, method, raw_path, headers, body):
        parsed = urllib.parse.urlsplit(raw_path)
        path = parsed.path
        if path.startswith("/_double/"):
            return self._control(method, path, body)
        entry = {"method": method, "path": path, "query": parsed.query,
                 "headers": {k: v for k, v in headers.items()},
                 "body": body.decode("utf-8", "replace"), "time": time.time()}
        with self._lock:
            self._requests.append(entry)
            del self._requests[:-1000]
            self._stats["requests"] += 1
        if method == "POST" and path == REDIRECT_PATH:
            return self._redirect(entry, headers, body)
        if method == "POST" and path == REST_PATH:
            return self._rest(entry, headers, body)
        if method == "GET" and path == P2F_PATH:
            return self._p2f_page(parsed.query)
        if method == "POST" and path == QUERY_PATH:
            return self._query(entry, headers, body)
        return (404, {"Content-Type": "text/html"}, b"<html><body>Not Found</body></html>")

    # The checks both interfaces share; returns (merchant, params, order).
    def _check_request(self, entry, version, params_text, sig):
        if version != SIGNATURE_VERSION or not params_text:
            raise SisError("SIS0042" if params_text else "SIS0007")
        try:
            params = json.loads(decode_b64(params_text))
            if not isinstance(params, dict):
                raise ValueError("not an object")
        except ValueError:
            raise SisError("SIS0007")
        entry["params"] = params
        code = field(params, "DS_MERCHANT_MERCHANTCODE")
        terminal = field(params, "DS_MERCHANT_TERMINAL")
        order = field(params, "DS_MERCHANT_ORDER")
        if not code:
            raise SisError("SIS0008")
        if not (isinstance(code, str) and code.isdigit() and len(code) == 9):
            raise SisError("SIS0009")
        if not terminal:
            raise SisError("SIS0010")
        if not (isinstance(terminal, str) and terminal.isdigit() and len(terminal) <= 3):
            raise SisError("SIS0011")
        merchant = self.merchants.get(code)
        if merchant is None or str(int(terminal)) not in merchant["terminals"]:
            raise SisError("SIS0026")
        if not (isinstance(order, str) and 4 <= len(order) <= 12 and order[:4].isdigit()
                and order.isascii() and order.isalnum()):
            raise SisError("SIS0014")
        try:
            ok = sig and hmac.compare_digest(decode_b64(sig),
                                             decode_b64(signature(merchant["key"], order, params_text)))
        except ValueError:
            ok = False
        if not ok:
            raise SisError("SIS0042")
        amount = field(params, "DS_MERCHANT_AMOUNT")
        currency = field(params, "DS_MERCHANT_CURRENCY")
        if amount is None:
            raise SisError("SIS0018")
        if not (isinstance(amount, str) and amount.isdigit() and len(amount) <= 12 and int(amount) > 0):
            raise SisError("SIS0019")
        if currency is None:
            raise SisError("SIS0015")
        if not (isinstance(currency, str) and currency.isdigit() and len(currency) <= 4):
            raise SisError("SIS0016")
        if currency.zfill(3) not in merchant["currencies"]:
            raise SisError("SIS0027")
        return code, merchant, params, order

    def _new_order(self, code, order, params, channel):
        return {
            "merchant": code, "order": order, "channel": channel,
            "terminal": str(int(field(params, "DS_MERCHANT_TERMINAL"))),
            "amount": field(params, "DS_MERCHANT_AMOUNT"),
            "currency": field(params, "DS_MERCHANT_CURRENCY"),
            "type": field(params, "DS_MERCHANT_TRANSACTIONTYPE"),
            "merchant_url": field(params, "DS_MERCHANT_MERCHANTURL"),
            "url_ok": field(params, "DS_MERCHANT_URLOK"),
            "url_ko": field(params, "DS_MERCHANT_URLKO"),
            "description": field(params, "DS_MERCHANT_PRODUCTDESCRIPTION"),
            "merchant_data": field(params, "DS_MERCHANT_MERCHANTDATA") or "",
            "email": field(params, "DS_MERCHANT_CUSTOMER_MAIL"),
            "expiry_minutes": field(params, "DS_MERCHANT_P2F_EXPIRYDATE"),
            "status": "pending", "refunded": 0, "attempts": 0, "token": None,
            "created": time.time(),
            # what the status query answers: one started operation
            "ops": [self._new_op(field(params, "DS_MERCHANT_TRANSACTIONTYPE") or "0",
                                 field(params, "DS_MERCHANT_AMOUNT"),
                                 field(params, "DS_MERCHANT_CURRENCY"), "S", None)],
        }

    @staticmethod
    def _new_op(ttype, amount, currency, state, response, when=None, card=None, secure=None):
        """One operation of an order as the status query reports it."""
        if isinstance(when, tuple):
            date, hour = when
        else:
            when = (when or datetime.datetime.now(datetime.timezone.utc)).astimezone(SPAIN)
            date, hour = when.strftime("%Y-%m-%d"), when.strftime("%H:%M:%S")
        return {"type": str(ttype), "date": date, "hour": hour, "amount": str(amount),
                "currency": str(currency), "state": state, "response": response,
                "card": card, "secure": secure}

    def _redirect(self, entry, headers, body):
        with self._lock:
            self._stats["redirects"] += 1
        form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        try:
            with self._lock:
                code, merchant, params, order = self._check_request(
                    entry, form.get("Ds_SignatureVersion"), form.get("Ds_MerchantParameters"),
                    form.get("Ds_Signature"))
                if field(params, "DS_MERCHANT_TRANSACTIONTYPE") not in ("0", "1"):
                    raise SisError("SIS0030")
                known = self._orders.get((code, order))
                if known is not None and known["status"] != "pending":
                    if known["status"] != "denied" or known["channel"] != "redirect":
                        raise SisError("SIS0051")
                if known is None or known["status"] == "denied":
                    fresh = self._new_order(code, order, params, "redirect")
                    if known is not None:
                        fresh["ops"] = known["ops"] + fresh["ops"]
                    self._orders[(code, order)] = fresh
                entry["order"] = order
        except SisError as e:
            return self._error_page(e.code)
        amount = int(field(params, "DS_MERCHANT_AMOUNT"))
        exponent = merchant["currencies"][field(params, "DS_MERCHANT_CURRENCY").zfill(3)]
        shown = "%d" % amount if exponent == 0 else "%d,%02d" % divmod(amount, 100)
        page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Redsys - TPV Virtual</title>"
                "</head><body><h1>Pago con tarjeta</h1>"
                "<p>Pedido: <span id=\"order\">%s</span></p><p>Importe: <span id=\"amount\">%s</span></p>"
                "<p>Comercio: %s</p></body></html>"
                % (html.escape(order), shown, html.escape(code)))
        return (200, {"Content-Type": "text/html; charset=utf-8"}, page.encode())

    def _error_page(self, code):
        with self._lock:
            self._stats["errors"] += 1
        text = SIS_TEXTS.get(code, "Error")
        page = ("<!DOCTYPE html><html><head><title>Redsys - TPV Virtual</title></head><body>"
                "<!-- RSisException -->"
                "<div class=\"error\"><p>Se ha producido un error.</p><p>%s (%s)</p></div>"
                "<!--%s:--></body></html>" % (html.escape(text), code, code))
        return (200, {"Content-Type": "text/html; charset=utf-8"}, page.encode())

    @staticmethod
    def _transport_fault(fault):
        """What the wire shows for a 500/503 fault (an HTML page), or None to drop the connection."""
        if fault == "drop":
            return None
        return (int(fault), {"Content-Type": "text/html"}, b"<html><body>Service Unavailable</body></html>")

    def _rest(self, entry, headers, body):
        with self._lock:
            self._stats["rest"] += 1
        fault = self._take_fault()
        if fault in ("500", "503", "drop"):
            return self._transport_fault(fault)
        if fault == "slow":
            time.sleep(5)
        try:
            try:
                request = json.loads(body)
                if not isinstance(request, dict):
                    raise ValueError
            except ValueError:
                raise SisError("SIS0007")
            with self._lock:
                code, merchant, params, order = self._check_request(
                    entry, request.get("Ds_SignatureVersion"), request.get("Ds_MerchantParameters"),
                    request.get("Ds_Signature"))
                entry["order"] = order
                if field(params, "DS_MERCHANT_TRANSACTIONTYPE") != "F" or not merchant["paygold"]:
                    raise SisError("SIS0030")
                if (code, order) in self._orders:
                    raise SisError("SIS0051")
                o = self._new_order(code, order, params, "paygold")
                o["token"] = secrets.token_hex(20).upper()
                self._orders[(code, order)] = o
                self._tokens[o["token"]] = (code, order)
        except SisError as e:
            with self._lock:
                self._stats["errors"] += 1
            return (200, {"Content-Type": "application/json"},
                    json.dumps({"errorCode": e.code}).encode())
        if fault == "drop_after_create":
            return None
        answer = {
            "Ds_Amount": o["amount"], "Ds_Currency": o["currency"], "Ds_Order": order,
            "Ds_MerchantCode": code, "Ds_Terminal": o["terminal"], "Ds_Response": "9998",
            "Ds_AuthorisationCode": "", "Ds_TransactionType": "F", "Ds_SecurePayment": "0",
            "Ds_Language": "1", "Ds_MerchantData": o["merchant_data"],
            "Ds_UrlPago2Fases": "%s%s?t=%s" % (self.base_url, P2F_PATH, o["token"]),
        }
        text, sig = sign_params(merchant["key"], answer)
        payload = json.dumps({"Ds_SignatureVersion": SIGNATURE_VERSION,
                              "Ds_MerchantParameters": text, "Ds_Signature": sig})
        if fault == "bad_json":
            payload = payload[:-7]
        return (200, {"Content-Type": "application/json"}, payload.encode())

    def _p2f_page(self, query):
        token = urllib.parse.parse_qs(query).get("t", [""])[0]
        with self._lock:
            ref = self._tokens.get(token)
            o = self._orders.get(ref) if ref else None
        if o is None:
            return self._error_page("SIS0007")
        page = ("<!DOCTYPE html><html><head><title>Redsys - Paygold</title></head><body>"
                "<p>Pedido: <span id=\"order\">%s</span></p><p>Importe: %s</p></body></html>"
                % (html.escape(o["order"]), html.escape(o["amount"])))
        return (200, {"Content-Type": "text/html; charset=utf-8"}, page.encode())

    # --------------------------------------------------------- status query

    @staticmethod
    def _soap_fault(text):
        body = ('<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="%s">'
                '<soapenv:Body><soapenv:Fault><faultcode>soapenv:Server</faultcode>'
                '<faultstring>%s</faultstring></soapenv:Fault></soapenv:Body></soapenv:Envelope>'
                % (SOAP_NS, xml_escape(text)))
        return (500, {"Content-Type": "text/xml; charset=utf-8"}, body.encode())

    @staticmethod
    def _soap_answer(messages):
        body = ('<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="%s"'
                ' xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/"'
                ' xmlns:xsd="http://www.w3.org/2001/XMLSchema"'
                ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>'
                '<p259:consultaOperacionesResponse xmlns:p259="%s"><consultaOperacionesReturn>%s'
                '</consultaOperacionesReturn></p259:consultaOperacionesResponse></soapenv:Body>'
                '</soapenv:Envelope>' % (SOAP_NS, QUERY_NS, xml_escape(messages)))
        return (200, {"Content-Type": "text/xml; charset=utf-8"}, body.encode())

    @staticmethod
    def _error_message(code):
        return ('<Messages><Version Ds_Version="0.0"><Message><ErrorMsg><Ds_ErrorCode>%s'
                '</Ds_ErrorCode></ErrorMsg></Message></Version></Messages>' % code)

    @staticmethod
    def response_xml(code, terminal, order, op):
        """One <Response> element, in the schema's order."""
        parts = ["<Response><Ds_MerchantCode>%s</Ds_MerchantCode><Ds_Terminal>%s</Ds_Terminal>"
                 "<Ds_Order>%s</Ds_Order><Ds_TransactionType>%s</Ds_TransactionType>"
                 "<Ds_Date>%s</Ds_Date><Ds_Hour>%s</Ds_Hour><Ds_Amount>%s</Ds_Amount>"
                 "<Ds_Currency>%s</Ds_Currency>"
                 % (code, terminal, order, op["type"], op["date"], op["hour"], op["amount"],
                    op["currency"])]
        if op.get("card"):
            parts.append("<Ds_CardNumber>%s</Ds_CardNumber>" % op["card"])
        parts.append("<Ds_SecurePayment>%s</Ds_SecurePayment><Ds_State>%s</Ds_State>"
                     % (op.get("secure") or "0", op["state"]))
        if op.get("response") is not None:
            parts.append("<Ds_Response>%s</Ds_Response>" % op["response"])
        parts.append("</Response>")
        return "".join(parts)

    def query_answer(self, code, order, ops, key=None):
        """The signed <Messages> answer listing ops (newest first)."""
        merchant = self.merchants[code]
        terminal = "1"
        with self._lock:
            o = self._orders.get((code, order))
            if o is not None:
                terminal = o["terminal"]
        version = ('<Version Ds_Version="0.0"><Message>%s</Message></Version>'
                   % "".join(self.response_xml(code, terminal, order, op) for op in ops))
        return "<Messages>%s<Signature>%s</Signature></Messages>" % (
            version, xml_signature(key or merchant["key"], order, version))

    def _check_query(self, entry, cadena):
        """Checks the message as the manual says Redsys does; returns
        (merchant code, merchant, message type, fields).  Raises SisError."""
        try:
            root = ET.fromstring(cadena)
        except ET.ParseError:
            raise SisError("XML0001")
        if root.tag != "Messages":
            raise SisError("XML0001")
        children = [c.tag for c in root]
        if children[:2] != ["Version", "Signature"] or children[2:] not in ([], ["SignatureVersion"]):
            raise SisError("XML0021" if "Signature" not in children else "XML0001")
        version, sig = root[0], root[1]
        if version.get("Ds_Version") is None:
            raise SisError("XML0001")
        messages = list(version)
        if not messages or messages[0].tag != "Message":
            raise SisError("XML0002")
        if len(list(messages[0])) != 1 or messages[0][0].tag not in QUERY_MESSAGES:
            raise SisError("XML0003")
        body = messages[0][0]
        kind = body.tag
        if tuple(c.tag for c in body) != QUERY_MESSAGES[kind]:
            missing = [n for n in QUERY_MESSAGES[kind] if body.find(n) is None]
            codes = {"Ds_MerchantCode": "XML0004", "Ds_Terminal": "XML0008", "Ds_Order": "XML0012",
                     "Ds_TransactionType": "XML0016", "Ds_Fecha_inicio": "XML0026",
                     "Ds_Fecha_fin": "XML0027"}
            raise SisError(codes.get(missing[0], "XML0001") if missing else "XML0001")
        fields = {c.tag: (c.text or "").strip() for c in body}
        if not (sig.text or "").strip():
            raise SisError("XML0022")
        if len(children) == 3:
            sv = (root[2].text or "").strip()
            if not sv:
                raise SisError("XML0029")
            if sv != SIGNATURE_VERSION:
                raise SisError("XML0030")
        code, terminal, order = fields["Ds_MerchantCode"], fields["Ds_Terminal"], fields["Ds_Order"]
        if not code:
            raise SisError("XML0005")
        if len(code) != 9:
            raise SisError("XML0006")
        if not code.isdigit():
            raise SisError("XML0007")
        if not terminal:
            raise SisError("XML0009")
        if len(terminal) > 3:
            raise SisError("XML0010")
        if not terminal.isdigit():
            raise SisError("XML0011")
        if not order:
            raise SisError("XML0013")
        if not (4 <= len(order) <= 12):
            raise SisError("XML0014")
        if not order[:4].isdigit():
            raise SisError("XML0015")
        if "Ds_TransactionType" in fields:
            ttype = fields["Ds_TransactionType"]
            if not ttype:
                raise SisError("XML0017")
            if len(ttype) != 1:
                raise SisError("XML0018")
        entry["order"] = order
        merchant = self.merchants.get(code)
        if merchant is None or str(int(terminal)) not in merchant["terminals"]:
            raise SisError("SIS0026")
        # the signature covers the <Version> element exactly as sent
        start = cadena.find("<Version")
        stop = cadena.find("</Version>")
        signed = cadena[start:stop + len("</Version>")] if 0 <= start < stop else ""
        try:
            ok = hmac.compare_digest(decode_b64(sig.text.strip()),
                                     decode_b64(xml_signature(merchant["key"], order, signed)))
        except ValueError:
            ok = False
        if not ok:
            raise SisError("XML0023")
        if not merchant["soap_query"]:
            raise SisError("XML0041")
        if kind not in ("Monitor", "Transaction"):
            raise SisError("XML0003")     # approx.: the double answers only these
        return code, merchant, kind, fields

    def _query(self, entry, headers, body):
        with self._lock:
            self._stats["queries"] += 1
        fault = self._take_fault()
        if fault in ("500", "503", "drop"):
            return self._transport_fault(fault)
        if fault == "slow":
            time.sleep(5)
        if fault == "soap_fault":
            return self._soap_fault("java.lang.NullPointerException (redsys_double fault)")
        try:
            envelope = ET.fromstring(body)
            call = envelope.find("{%s}Body/{%s}consultaOperaciones" % (SOAP_NS, QUERY_NS))
            cadena = call.find("cadenaXML").text if call is not None and call.find("cadenaXML") is not None else None
        except ET.ParseError:
            cadena = None
        if not cadena:
            with self._lock:
                self._stats["errors"] += 1
            return self._soap_fault("org.xml.sax.SAXException: not a consultaOperaciones call")
        entry["cadena"] = cadena
        try:
            with self._lock:
                code, merchant, kind, fields = self._check_query(entry, cadena)
                if fault == "soap_error":
                    raise SisError(self._faults["code"] or "XML0000")
                o = self._orders.get((code, fields["Ds_Order"]))
                ops = list(reversed(o["ops"])) if o else []
                if kind == "Transaction":
                    ops = [op for op in ops if op["type"] == fields["Ds_TransactionType"]]
                if not ops:
                    raise SisError("XML0024")
                ops = [dict(op) for op in ops]
        except SisError as e:
            with self._lock:
                self._stats["errors"] += 1
            return self._soap_answer(self._error_message(e.code))
        answer = self.query_answer(code, fields["Ds_Order"], ops,
                                   key=base64.b64encode(secrets.token_bytes(24)).decode()
                                   if fault == "bad_signature" else None)
        status, hdrs, payload = self._soap_answer(answer)
        if fault == "bad_xml":
            payload = payload[:len(payload) // 2]
        return (status, hdrs, payload)

    # ---------------------------------------------------------- the customer

    def _notification_params(self, o, response, amount, ttype, auth):
        now = datetime.datetime.now()
        return {
            "Ds_Date": urllib.parse.quote(now.strftime("%d/%m/%Y"), safe=""),
            "Ds_Hour": urllib.parse.quote(now.strftime("%H:%M"), safe=""),
            "Ds_SecurePayment": "1", "Ds_Card_Country": "724",
            "Ds_Amount": str(amount), "Ds_Currency": o["currency"], "Ds_Order": o["order"],
            "Ds_MerchantCode": o["merchant"], "Ds_Terminal": o["terminal"].zfill(3),
            "Ds_Response": response, "Ds_MerchantData": o["merchant_data"],
            "Ds_TransactionType": ttype, "Ds_ConsumerLanguage": "1",
            "Ds_AuthorisationCode": auth, "Ds_Card_Brand": "1", "Ds_ProcessedPayMethod": "1",
        }

    def _notify(self, o, params, deliver):
        merchant = self.merchants[o["merchant"]]
        body = notification_body(merchant["key"], params)
        delivery = {"url": o["merchant_url"], "params": params, "body": body,
                    "headers": {"Content-Type": "application/x-www-form-urlencoded",
                                "User-Agent": "Redsys"},
                    "delivered_status": None, "delivery_error": None}
        if deliver and o["merchant_url"]:
            self._post(delivery)
        with self._lock:
            self._deliveries.append(delivery)
            self._stats["notifications"] += 1
        return delivery

    def _post(self, delivery):
        url = urllib.parse.urlsplit(delivery["url"])
        try:
            if url.scheme == "https":
                ctx = ssl.create_default_context(cafile=self.notification_ca)
                conn = http.client.HTTPSConnection(url.hostname, url.port or 443, timeout=10, context=ctx)
            else:
                conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=10)
            conn.request("POST", url.path or "/", body=delivery["body"], headers=delivery["headers"])
            delivery["delivered_status"] = conn.getresponse().status
            conn.close()
        except (OSError, http.client.HTTPException) as exc:
            delivery["delivery_error"] = str(exc)

    def pay(self, order, outcome="authorised", merchant=None, deliver=False):
        """The customer pays (or fails to pay) an order the double knows.
        Returns {"deliveries": [notification], "order": ..., "response": ...}."""
        if outcome not in OUTCOMES:
            raise ValueError("outcome must be one of %s" % ", ".join(OUTCOMES))
        response, with_auth = OUTCOMES[outcome]
        with self._lock:
            o = self._find(order, merchant)
            if o["status"] in ("authorised", "refunded", "partially_refunded"):
                raise ValueError("order %s is already paid" % order)
            o["attempts"] += 1
            o["status"] = "authorised" if outcome == "authorised" else "denied"
            auth = "%06d" % secrets.randbelow(1000000) if with_auth else ""
            o["auth"] = auth
            ttype = "F" if o["channel"] == "paygold" else "0"
            params = self._notification_params(o, response, o["amount"], ttype, auth)
            started = [op for op in o["ops"] if op["state"] != "F" and op["type"] == (o["type"] or "0")]
            op = started[-1] if started else None
            if op is None:
                op = self._new_op(o["type"] or "0", o["amount"], o["currency"], "F", None)
                o["ops"].append(op)
            op.update(self._new_op(op["type"], o["amount"], o["currency"], "F", response,
                                   card="454881******0004", secure="1"))
        delivery = self._notify(o, params, deliver)
        return {"deliveries": [delivery], "order": order, "response": response}

    def refund(self, order, amount=None, merchant=None, deliver=False):
        """The merchant refunds (part of) a paid order: type 3, Ds_Response 0900."""
        with self._lock:
            o = self._find(order, merchant)
            if o["status"] not in ("authorised", "partially_refunded"):
                raise ValueError("order %s is not paid" % order)
            amount = int(o["amount"]) - o["refunded"] if amount is None else int(amount)
            if amount <= 0 or o["refunded"] + amount > int(o["amount"]):
                raise ValueError("SIS0057: refund larger than what is left")
            o["refunded"] += amount
            o["status"] = "refunded" if o["refunded"] == int(o["amount"]) else "partially_refunded"
            params = self._notification_params(o, "0900", amount, "3",
                                               "%06d" % secrets.randbelow(1000000))
            o["ops"].append(self._new_op("3", amount, o["currency"], "F", "0900",
                                         card="454881******0004", secure="0"))
        delivery = self._notify(o, params, deliver)
        return {"deliveries": [delivery], "order": order, "refunded": o["refunded"]}

    def seed_operation(self, order, ttype="0", response="0000", amount=None, currency=None,
                       state="F", merchant=None, when=None, card=None, secure="0", terminal="1"):
        """Adds an operation the CRM did not ask for (a different amount or
        currency, a cancellation...) to an order, which the double then
        knows (merchant needed for a new one).  when: a datetime, or the
        (Ds_Date, Ds_Hour) texts.  Returns the operation."""
        with self._lock:
            try:
                o = self._find(order, merchant)
            except KeyError:
                if merchant is None:
                    raise
                o = self._new_order(merchant, order, {
                    "DS_MERCHANT_AMOUNT": str(amount or 100), "DS_MERCHANT_CURRENCY": currency or "978",
                    "DS_MERCHANT_TERMINAL": terminal, "DS_MERCHANT_TRANSACTIONTYPE": ttype}, "seeded")
                o["ops"] = []
                self._orders[(merchant, order)] = o
            op = self._new_op(ttype, amount if amount is not None else o["amount"],
                              currency or o["currency"], state, response, when, card, secure)
            o["ops"].append(op)
            return dict(op)

    def _find(self, order, merchant):
        hits = [v for (m, n), v in self._orders.items()
                if n == order and (merchant is None or m == merchant)]
        if len(hits) != 1:
            raise KeyError("no single order %s known to the double" % order)
        return hits[0]

    # ------------------------------------------------------------- control

    def _control(self, method, path, body):
        def reply(status, obj):
            return (status, {"Content-Type": "application/json"}, json.dumps(obj).encode())
        try:
            args = json.loads(body) if body else {}
            if method == "GET" and path == "/_double/stats":
                return reply(200, self.stats())
            if method == "GET" and path == "/_double/requests":
                return reply(200, self.requests())
            if method == "GET" and path == "/_double/orders":
                return reply(200, self.orders())
            if method == "POST" and path == "/_double/reset":
                self.reset()
                return reply(200, {"ok": True})
            if method == "POST" and path == "/_double/faults":
                self.set_faults(args.get("mode", "none"), int(args.get("count", 1)),
                                int(args.get("after", 0)), args.get("code"))
                return reply(200, {"ok": True})
            if method == "POST" and path == "/_double/pay":
                return reply(200, self.pay(args["order"], args.get("outcome", "authorised"),
                                           args.get("merchant"), args.get("deliver", True)))
            if method == "POST" and path == "/_double/seed":
                return reply(200, self.seed_operation(
                    args["order"], args.get("type", "0"), args.get("response", "0000"),
                    args.get("amount"), args.get("currency"), args.get("state", "F"),
                    args.get("merchant")))
            if method == "POST" and path == "/_double/refund":
                return reply(200, self.refund(args["order"], args.get("amount"),
                                              args.get("merchant"), args.get("deliver", True)))
        except (KeyError, ValueError) as exc:
            return reply(400, {"error": str(exc)})
        return reply(404, {"error": "unknown control endpoint %s %s" % (method, path)})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--merchant", action="append", default=[],
                    help="CODE:KEY[:paygold] (repeatable); terminal 1")
    ap.add_argument("--notification-ca", help="CA file to trust when POSTing notifications")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    double = RedsysDouble(args.cert, args.key, args.host, args.port, args.verbose,
                          args.notification_ca)
    for spec in args.merchant:
        parts = spec.split(":")
        double.add_merchant(parts[0], parts[1], paygold=len(parts) > 2 and parts[2] == "paygold")
    print(double.start(), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    stop.wait()
    double.stop()


if __name__ == "__main__":
    main()
