"""Shared helpers for integration tests that talk to the gateway doubles.

Fixtures that need a double live in tests/conftest.py; this module holds
plain helpers (account set-up, webhook delivery, error inspection).
"""

import json

STRIPE_KEY = "sk_test_crmpay_integration_51HxYz0123456789"
STRIPE_WHSEC = "whsec_crmpay_integration_secret_0123456789"


def add_stripe_account(conn, base_url, name="shop", key=STRIPE_KEY, whsec=STRIPE_WHSEC, **settings):
    """Adds a Stripe account pointed at the double."""
    merged = {"api_base": base_url, "success_url": "https://shop.example/paid",
              "cancel_url": "https://shop.example/cart"}
    merged.update(settings)
    conn.execute("SELECT crmpay.add_account(%s, 'stripe', %s::jsonb, %s, %s::jsonb)",
                 (name, json.dumps({"secret_key": key}), whsec, json.dumps(merged)))


def deliver(conn, account, delivery):
    """Hands one delivery (headers + raw body, as the double made it) to
    crmpay.receive_webhook, as a CRM's HTTP endpoint would."""
    return conn.execute("SELECT http_status, reply, outcome, event_id FROM crmpay.receive_webhook(%s, %s, %s)",
                        (account, json.dumps(delivery["headers"]), delivery["body"])).fetchall()


def payment(conn, account, order_ref):
    """The payment row as a dict, or None."""
    cur = conn.execute("SELECT * FROM crmpay.payments WHERE account = %s AND order_ref = %s",
                       (account, order_ref))
    row = cur.fetchone()
    if row is None:
        return None
    return dict(zip([c.name for c in cur.description], row))
