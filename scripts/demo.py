"""make demo: one order goes from CRM row to paid, end to end.

Starts a throwaway PostgreSQL cluster with crmpay preloaded (and its
background worker), the gateway doubles on loopback over HTTPS (a CA made
for the run; TLS verification on), and the reference CRM webhook endpoint;
then walks one Stripe order through account -> order -> link -> customer
pays -> webhook -> order paid, and one order each on Adyen, PayPal and
Redsys through the outbox, printing each step.  Everything is stopped and
removed at the end, even on failure.
"""

import json
import os
import time
import shutil
import ssl
import sys
import tempfile
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "scripts"))

from doubles.adyen_double import AdyenDouble  # noqa: E402
from doubles.paypal_double import PayPalDouble  # noqa: E402
from doubles.redsys_double import RedsysDouble  # noqa: E402
from doubles.stripe_double import StripeDouble  # noqa: E402
from gateways import deliver  # noqa: E402
from doubles.tlsca import make_ca_and_server_cert  # noqa: E402
from lib.cluster import PgCluster, install_signal_handlers  # noqa: E402
from webhook_endpoint import WebhookEndpoint  # noqa: E402

STRIPE_KEY = "sk_test_demo_4eC39HqLyjWDarjtT1zdp7dc"
WHSEC = "whsec_demo_9f8e7d6c5b4a39281706f5e4d3c2b1a0"
ADYEN_KEY = "AQEyhmfxK4_demo_0123456789abcdef"
ADYEN_HMAC = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"
PAYPAL_ID, PAYPAL_SECRET, PAYPAL_WEBHOOK = "AXdemoClient0123456789", "ECdemoSecret0123456789", "8PT597110X687430LKGECATA"
REDSYS_KEY, REDSYS_MERCHANT = "Mk9m98IfEblmPfrpsawt7BmxObt98Jev", "999008882"


def wait_for(conn, sql, params=(), timeout=30):
    """Polls a query until it returns a true first column."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(sql, params).fetchone()
        if row and row[0]:
            return row
        time.sleep(0.1)
    raise RuntimeError("timed out waiting for: " + sql)


def other_gateways(db, tls, doubles):
    """One order each on Adyen, PayPal and Redsys (Paygold), through the
    background worker: request_payment_link -> link -> paid."""
    adyen = AdyenDouble(api_keys={ADYEN_KEY}, hmac_key=ADYEN_HMAC, certfile=tls["server_cert"],
                        keyfile=tls["server_key"])
    paypal = PayPalDouble({PAYPAL_ID: PAYPAL_SECRET}, PAYPAL_WEBHOOK, tls["ca_cert"],
                          os.path.join(os.path.dirname(tls["ca_cert"]), "ca.key"),
                          tls["server_cert"], tls["server_key"])
    redsys = RedsysDouble(certfile=tls["server_cert"], keyfile=tls["server_key"])
    redsys.add_merchant(REDSYS_MERCHANT, REDSYS_KEY, terminals=("1",), paygold=True)
    for d in (adyen, paypal, redsys):
        d.start()
        doubles.append(d)
    db.execute("SELECT crmpay.add_account('adyen-eu', 'adyen', %s::jsonb, %s, %s::jsonb)",
               (json.dumps({"api_key": ADYEN_KEY}), ADYEN_HMAC,
                json.dumps({"api_base": adyen.base_url, "merchant_account": "ShopECOM",
                            "return_url": "https://shop.example/thanks"})))
    db.execute("SELECT crmpay.add_account('paypal', 'paypal', %s::jsonb, %s, %s::jsonb)",
               (json.dumps({"client_id": PAYPAL_ID, "client_secret": PAYPAL_SECRET}),
                json.dumps({"webhook_id": PAYPAL_WEBHOOK}),
                json.dumps({"api_base": paypal.base_url, "return_url": "https://shop.example/thanks",
                            "cancel_url": "https://shop.example/cart"})))
    db.execute("SELECT crmpay.add_account('tienda', 'redsys', %s::jsonb, NULL, %s::jsonb)",
               (json.dumps({"merchant_key": REDSYS_KEY}),
                json.dumps({"api_base": redsys.base_url, "merchant_code": REDSYS_MERCHANT, "terminal": "1",
                            "paygold": True, "notification_url": "https://crm.example/redsys/notify",
                            "url_ok": "https://shop.example/thanks", "url_ko": "https://shop.example/ko"})))
    orders = [("adyen-eu", "SO-2001", "120.00", "EUR"), ("paypal", "SO-2002", "5000", "JPY"),
              ("tienda", "SO-2003", "75.50", "EUR")]
    for account, ref, amount, currency in orders:
        db.execute("SELECT crmpay.request_payment_link(%s, %s, %s::numeric, %s, 'ana@example.com')",
                   (account, ref, amount, currency))
        url = wait_for(db, "SELECT url FROM crmpay.payments WHERE order_ref = %s AND status = 'open'", (ref,))[0]
        gref = db.execute("SELECT gateway_ref FROM crmpay.payments WHERE order_ref = %s", (ref,)).fetchone()[0]
        print(f"   {account}: {ref} {amount} {currency}: the worker made the link {url}")
        if account == "adyen-eu":
            deliveries = adyen.pay(gref)["deliveries"]
        elif account == "paypal":
            deliveries = [paypal.approve(gref)]
        else:
            deliveries = redsys.pay(gref)["deliveries"]
        for d in deliveries:
            for status, reply, outcome, event_id in deliver(db, account, d):
                print(f"   {account}: webhook {event_id or '-'} -> {outcome} (HTTP {status}{', ' + reply if reply else ''})")
        if account == "paypal":
            print("   paypal: approved; the worker captures the order (PayPal-Request-Id fixed per payment)")
        wait_for(db, "SELECT status = 'paid' FROM crmpay.payments WHERE order_ref = %s", (ref,))
    show(db, """SELECT account, order_ref, status, amount_minor, currency, gateway_payment_ref
                  FROM crmpay.payments WHERE left(order_ref, 4) = 'SO-2' ORDER BY order_ref""")


def step(n, text):
    print(f"\n\033[1m{n}. {text}\033[0m", flush=True)


def show(conn, sql, params=()):
    cur = conn.execute(sql, params)
    names = [c.name for c in cur.description]
    for row in cur.fetchall():
        print("   " + ", ".join(f"{k}={v}" for k, v in zip(names, row)))


def main():
    install_signal_handlers()
    tmp = tempfile.mkdtemp(prefix="crmpay-demo-", dir="/tmp")
    os.chmod(tmp, 0o755)
    cluster = double = endpoint = None
    doubles = []
    try:
        step(1, "Throwaway cluster with crmpay preloaded, Stripe double over HTTPS")
        tls = make_ca_and_server_cert(tmp)
        cluster = PgCluster(os.environ["CRMPAY_PG_BINDIR"],
                            settings={"crmpay.ca_file": tls["ca_cert"],
                                      "crmpay.database": "postgres",          # the background worker's database
                                      "crmpay.paypal_cert_hosts": "127.0.0.1"})  # the PayPal double's signing cert
        cluster.start()
        print(f"   PostgreSQL on port {cluster.port}, data in {cluster.datadir}")
        db = cluster.connect()
        db.execute("CREATE EXTENSION crmpay")
        db.execute("CREATE ROLE demo_hook LOGIN IN ROLE crmpay_webhook")

        endpoint = WebhookEndpoint(cluster.dsn(user="demo_hook"),
                                   log=lambda m: print("   endpoint: " + m)).start()
        double = StripeDouble(api_keys={STRIPE_KEY}, webhook_secret=WHSEC,
                              certfile=tls["server_cert"], keyfile=tls["server_key"],
                              webhook_url=endpoint.url + "/webhooks/shop")
        double.start()
        print(f"   Stripe double at {double.base_url} (trusted through crmpay.ca_file)")
        print(f"   CRM webhook endpoint at {endpoint.url}/webhooks/shop")

        step(2, "Gateway account (secrets encrypted at rest; the view shows none)")
        db.execute("SELECT crmpay.add_account('shop', 'stripe', %s::jsonb, %s, %s::jsonb)",
                   (json.dumps({"secret_key": STRIPE_KEY}), WHSEC,
                    json.dumps({"api_base": double.base_url,
                                "success_url": "https://shop.example/thanks",
                                "cancel_url": "https://shop.example/cart"})))
        show(db, "SELECT name, provider, has_webhook_secret, settings->>'api_base' AS api_base FROM crmpay.accounts")

        step(3, "The CRM's order, and its follow-up action when paid")
        db.execute("""CREATE TABLE public.orders (id text PRIMARY KEY, customer_email text,
                      total numeric, currency text, status text DEFAULT 'new', payment_url text)""")
        db.execute("""CREATE FUNCTION public.order_paid() RETURNS trigger LANGUAGE plpgsql AS $$
                      BEGIN UPDATE public.orders SET status = NEW.status WHERE id = NEW.order_ref;
                      RETURN NULL; END $$""")
        db.execute("""CREATE TRIGGER order_status AFTER UPDATE OF status ON crmpay.payments
                      FOR EACH ROW EXECUTE FUNCTION public.order_paid()""")
        db.execute("INSERT INTO public.orders VALUES ('SO-1001', 'ana@example.com', 49.90, 'EUR', 'new')")
        show(db, "SELECT id, customer_email, total, currency, status FROM public.orders")

        step(4, "Payment link from Stripe (hosted Checkout: card data and 3-D Secure stay at the gateway)")
        cur = db.execute("""SELECT p.id, p.status, p.url, p.gateway_ref, p.idempotency_key
                              FROM public.orders o,
                                   crmpay.create_payment_link('shop', o.id, o.total, o.currency,
                                                              o.customer_email, 'Order ' || o.id) p
                             WHERE o.id = 'SO-1001'""")
        pid, status, url, session_id, key = cur.fetchone()
        db.execute("UPDATE public.orders SET payment_url = %s, status = 'awaiting_payment' WHERE id = 'SO-1001'",
                   (url,))
        print(f"   payment {pid}: {status}, Stripe session {session_id}")
        print(f"   Idempotency-Key {key}")
        print(f"   link stored on the order, to be emailed to ana@example.com:\n   {url}")

        step(5, "The customer opens the link and pays")
        context = ssl.create_default_context(cafile=tls["ca_cert"])
        form = urllib.parse.urlencode({"outcome": "paid"}).encode()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), NoRedirect)
        try:
            opener.open(urllib.request.Request(url, data=form, method="POST"), timeout=10)
        except urllib.error.HTTPError as redirect:
            print(f"   hosted page answered {redirect.code}, sending the browser to {redirect.headers['Location']}")

        step(6, "Stripe's signed webhooks reach the CRM endpoint -> crmpay.receive_webhook")
        show(db, """SELECT event_type, outcome, coalesce(old_status || ' -> ' || new_status, reason) AS effect
                      FROM crmpay.events ORDER BY id""")

        step(7, "The order is paid")
        show(db, "SELECT id, status, payment_url IS NOT NULL AS has_link FROM public.orders")
        show(db, """SELECT id, order_ref, status, amount_minor, currency, gateway_payment_ref, paid_at
                      FROM crmpay.payments""")
        final = db.execute("SELECT status FROM public.orders WHERE id = 'SO-1001'").fetchone()[0]
        if final != "paid":
            print("\nDEMO FAILED: the order did not reach 'paid'", file=sys.stderr)
            return 1

        step(8, "The same SQL on Adyen, PayPal and Redsys, through the background worker (outbox)")
        other_gateways(db, tls, doubles)
        db.close()
        print("\nDemo complete: one order on each gateway went from link to paid.")
        return 0
    finally:
        step(9, "Stopping and removing everything")
        for d in doubles + ([double] if double else []):
            d.stop()
        if endpoint:
            endpoint.stop()
        if cluster:
            cluster.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
        print("   done")


if __name__ == "__main__":
    sys.exit(main())
