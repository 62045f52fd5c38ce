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
"amount"}``, ``POST /_double/faults`` ``{"mode", "count"}``, ``POST
/_double/reset``, ``GET /_double/stats``, ``GET /_double/requests``, ``GET
/_double/orders``.
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

try:
    from .tls_server import TLSThreadingServer
except ImportError:          # run as a script: tests/doubles is on sys.path
    from tls_server import TLSThreadingServer

SIGNATURE_VERSION = "HMAC_SHA256_V1"
REDIRECT_PATH = "/sis/realizarPago"
REST_PATH = "/sis/rest/trataPeticionREST"
P2F_PATH = "/sis/p2f"

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

FAULT_MODES = ("none", "500", "503", "slow", "drop", "drop_after_create", "bad_json")


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

_Server = TLSThreadingServer


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60

    def version_string(self):
        return "Apache"

    def log_message(self, fmt, *args):
        if self.server.double.verbose:
            sys.stderr.write("redsys_double: %s - %s\n" % (self.address_string(), fmt % args))

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def _handle(self, method):
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length > 0 else b""
        except (ValueError, OSError):
            self.close_connection = True
            return
        try:
            resp = self.server.double._dispatch(method, self.path, self.headers, body)
        except Exception:  # a bug in the double: answer 500, keep serving
            traceback.print_exc()
            resp = (500, {"Content-Type": "text/plain"}, b"redsys_double internal error")
        if resp is None:  # drop faults: close without answering
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        status, headers, payload = resp
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except (ConnectionError, ssl.SSLError, socket.timeout, OSError):
            self.close_connection = True


class SisError(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


# --------------------------------------------------------------------------
# The double
# --------------------------------------------------------------------------

class RedsysDouble:
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
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.certfile, self.keyfile)
        self._server = _Server((self.host, self.port), _Handler, self, ctx)
        self.port = self._server.server_address[1]
        self.base_url = "https://%s:%d" % (self.host, self.port)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name="redsys-double", daemon=True)
        self._thread.start()
        return self.base_url

    def stop(self):
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_all_connections()
        self._server.server_close()
        self._thread.join(5)
        self._server = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # ----------------------------------------------------------------- state

    def add_merchant(self, code, key, terminals=("1",), paygold=False, currencies=None):
        """Registers a merchant (FUC) with its key, terminals and options."""
        with self._lock:
            self.merchants[code] = {
                "key": key,
                "terminals": {str(int(t)) for t in terminals},
                "paygold": paygold,
                "currencies": dict(currencies or DEFAULT_CURRENCIES),
            }

    def _reset_state(self):
        with self._lock:
            self._orders = {}           # (merchant, order) -> dict
            self._tokens = {}           # p2f token -> (merchant, order)
            self._requests = []
            self._deliveries = []
            self._faults = {"mode": "none", "count": 0}
            self._stats = {"requests": 0, "redirects": 0, "rest": 0, "errors": 0,
                           "faults": 0, "tls_failures": 0, "notifications": 0}

    def reset(self):
        """Forgets orders, requests and faults (merchants stay)."""
        self._reset_state()

    def set_faults(self, mode="none", count=1):
        """Next `count` API requests fail with `mode` (see FAULT_MODES)."""
        if mode not in FAULT_MODES:
            raise ValueError("unknown fault mode %r" % mode)
        with self._lock:
            self._faults = {"mode": mode, "count": count if mode != "none" else 0}

    def _take_fault(self):
        with self._lock:
            if self._faults["count"] <= 0:
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
        }

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
                    self._orders[(code, order)] = self._new_order(code, order, params, "redirect")
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

    def _rest(self, entry, headers, body):
        with self._lock:
            self._stats["rest"] += 1
        fault = self._take_fault()
        if fault in ("500", "503"):
            return (int(fault), {"Content-Type": "text/html"},
                    b"<html><body>Service Unavailable</body></html>")
        if fault == "drop":
            return None
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
        delivery = self._notify(o, params, deliver)
        return {"deliveries": [delivery], "order": order, "refunded": o["refunded"]}

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
                self.set_faults(args.get("mode", "none"), int(args.get("count", 1)))
                return reply(200, {"ok": True})
            if method == "POST" and path == "/_double/pay":
                return reply(200, self.pay(args["order"], args.get("outcome", "authorised"),
                                           args.get("merchant"), args.get("deliver", True)))
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
