"""make demo: one order goes from CRM row to paid, end to end.

Starts a throwaway PostgreSQL cluster with crmpay preloaded, the Stripe
double on loopback over HTTPS (a CA made for the run; TLS verification on),
and the reference CRM webhook endpoint; then walks one order through
account -> order -> link -> customer pays -> webhook -> order paid, printing
each step.  Everything is stopped and removed at the end, even on failure.
"""

import json
import os
import shutil
import ssl
import sys
import tempfile
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "scripts"))

from doubles.stripe_double import StripeDouble  # noqa: E402
from doubles.tlsca import make_ca_and_server_cert  # noqa: E402
from lib.cluster import PgCluster, install_signal_handlers  # noqa: E402
from webhook_endpoint import WebhookEndpoint  # noqa: E402

STRIPE_KEY = "sk_test_demo_4eC39HqLyjWDarjtT1zdp7dc"
WHSEC = "whsec_demo_9f8e7d6c5b4a39281706f5e4d3c2b1a0"


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
    try:
        step(1, "Throwaway cluster with crmpay preloaded, Stripe double over HTTPS")
        tls = make_ca_and_server_cert(tmp)
        cluster = PgCluster(os.environ["CRMPAY_PG_BINDIR"], settings={"crmpay.ca_file": tls["ca_cert"]})
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
        db.close()
        if final != "paid":
            print("\nDEMO FAILED: the order did not reach 'paid'", file=sys.stderr)
            return 1
        print("\nDemo complete: order SO-1001 went from CRM row to paid.")
        return 0
    finally:
        step(8, "Stopping and removing everything")
        if double:
            double.stop()
        if endpoint:
            endpoint.stop()
        if cluster:
            cluster.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
        print("   done")


if __name__ == "__main__":
    sys.exit(main())
