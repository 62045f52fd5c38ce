#!/usr/bin/python3
"""Braintree webhook double for the crmpay test suite.

Braintree has no payment-link API that crmpay calls; what crmpay receives
from it are webhook notifications.  This module makes them as Braintree's
servers (and its SDKs' WebhookTesting.sample_notification) do:

* the XML ``<notification><timestamp type="datetime">..</timestamp>
  <kind>..</kind><subject>..</subject></notification>``;
* ``bt_payload`` = base64 of it, MIME style (lines of 60 characters, each
  ending in ``\\n``, like Ruby's Base64.encode64) or one line plus ``\\n``
  (like the Node SDK);
* ``bt_signature`` = ``public_key|hex(HMAC-SHA1(SHA1(private_key), bt_payload))``,
  several pairs joined by ``&`` when keys rotate;
* the delivery body is ``application/x-www-form-urlencoded``.

Also: the challenge answer for the URL check.
"""

import base64
import datetime
import hashlib
import hmac
import urllib.parse
from xml.sax.saxutils import escape


def bt_hmac(private_key, message):
    if isinstance(message, str):
        message = message.encode("utf-8")
    key = hashlib.sha1(private_key.encode("utf-8")).digest()
    return hmac.new(key, message, hashlib.sha1).hexdigest()


def challenge_answer(public_key, private_key, challenge):
    return "%s|%s" % (public_key, bt_hmac(private_key, challenge))


def transaction_xml(txn_id, status="settled", amount="100.00", currency="USD", order_id=None):
    order = "<order-id>%s</order-id>" % escape(order_id) if order_id is not None else ""
    return ("<transaction>\n  <id>%s</id>\n  <status>%s</status>\n  <type>sale</type>\n"
            "  <currency-iso-code>%s</currency-iso-code>\n  <amount>%s</amount>\n  %s\n"
            "  <merchant-account-id>crmpaytest</merchant-account-id>\n"
            "  <payment-instrument-type>credit_card</payment-instrument-type>\n</transaction>"
            % (escape(txn_id), escape(status), escape(currency), escape(amount), order))


def subscription_xml(sub_id, txn_id, amount="49.99", status="submitted_for_settlement"):
    return ("<subscription>\n    <id>%s</id>\n    <transactions type=\"array\">\n"
            "      <transaction>\n        <id>%s</id>\n        <status>%s</status>\n"
            "        <amount>%s</amount>\n      </transaction>\n    </transactions>\n"
            "    <add_ons type=\"array\"></add_ons>\n    <discounts type=\"array\"></discounts>\n"
            "</subscription>" % (escape(sub_id), escape(txn_id), escape(status), escape(amount)))


def notification_xml(kind, subject_xml, timestamp=None):
    ts = timestamp or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<notification>\n'
            '  <timestamp type="datetime">%s</timestamp>\n  <kind>%s</kind>\n'
            '  <subject>%s</subject>\n</notification>\n' % (ts, escape(kind), subject_xml))


def subject_for(kind, ident, **kw):
    """The subject XML the SDK's sample_notification would use for kind."""
    if kind == "check":
        return '<check type="boolean">true</check>'
    if kind.startswith("transaction_"):
        status = {"transaction_settled": "settled",
                  "transaction_settlement_declined": "settlement_declined"}.get(kind, "settled")
        return transaction_xml(ident, status=status, **kw)
    if kind.startswith("subscription_"):
        return subscription_xml(ident, kw.get("txn_id", ident), amount=kw.get("amount", "49.99"))
    if kind.startswith("dispute_"):
        return ("<dispute><id>%s</id><status>open</status><transaction><id>%s</id>"
                "<amount>250.00</amount></transaction></dispute>"
                % (escape(ident), escape(kw.get("txn_id", ident))))
    return "<%s><id>%s</id></%s>" % ("subscription", escape(ident), "subscription")


def encode_payload(xml, mime=True):
    """mime: Python-style base64.encodebytes (76-character lines, each ending
    in \\n); otherwise one line plus a final \\n, like the Node SDK."""
    raw = xml.encode("utf-8")
    if mime:
        return base64.encodebytes(raw).decode("ascii")
    return base64.b64encode(raw).decode("ascii") + "\n"


def encode_payload_60(xml):
    """Ruby's Base64.encode64 style: lines of 60 characters, each ending in \\n."""
    b64 = base64.b64encode(xml.encode("utf-8")).decode("ascii")
    return "".join(b64[i:i + 60] + "\n" for i in range(0, len(b64), 60))


def sign(payload, keys):
    """bt_signature for payload; keys is [(public, private), ...]."""
    return "&".join("%s|%s" % (pub, bt_hmac(priv, payload)) for pub, priv in keys)


def form_body(signature, payload):
    return urllib.parse.urlencode({"bt_signature": signature, "bt_payload": payload})


def sample_notification(public_key, private_key, kind, ident, timestamp=None, extra_keys=(),
                        style="ruby", **kw):
    """A signed delivery: {"headers", "body", "bt_signature", "bt_payload", "xml"}."""
    xml = notification_xml(kind, subject_for(kind, ident, **kw), timestamp)
    payload = encode_payload_60(xml) if style == "ruby" else encode_payload(xml, mime=False)
    signature = sign(payload, list(extra_keys) + [(public_key, private_key)])
    return {"headers": {"Content-Type": "application/x-www-form-urlencoded",
                        "User-Agent": "Braintree/1.0"},
            "body": form_body(signature, payload), "bt_signature": signature,
            "bt_payload": payload, "xml": xml}
