"""Exactly once through crashes: 1,000 orders of a linked CRM table while
the worker is killed with SIGKILL several times (each a server crash and
restart) and the cluster is stopped with -m immediate mid-run.  Afterwards
every order has exactly one link, and the Stripe double created exactly one
object per order: retries reuse the order's idempotency key."""

import signal
import time

import psycopg

from doubles.stripe_double import StripeDouble
from gateways import STRIPE_KEY, STRIPE_WHSEC, add_stripe_account
from outbox_support import crm_orders_table, kill_worker, wait_for, wait_for_worker, worker_pid

DB = "crashdb"
ORDERS = 1000


def done_jobs(cluster):
    try:
        with cluster.connect(DB) as conn:
            return conn.execute("SELECT count(*) FROM crmpay.jobs WHERE state = 'done'").fetchone()[0]
    except psycopg.OperationalError:
        return None  # restarting after a crash


def wait_for_progress(cluster, at_least):
    return wait_for(lambda: (lambda n: n if n is not None and n >= at_least else None)(done_jobs(cluster)),
                    timeout=60, interval=0.02, what=f"{at_least} links")


def test_every_order_gets_exactly_one_link_through_crashes(make_cluster, tls):
    cluster = make_cluster(settings={
        "crmpay.database": DB,
        "crmpay.max_concurrent_requests": 16,
        "crmpay.max_host_connections": 16,
        "crmpay.retry_base_delay": "20ms",
        "crmpay.retry_max_delay": "200ms",
        "crmpay.max_attempts": 1000,
        "crmpay.circuit_failure_threshold": 0,
        "restart_after_crash": True,
    })
    double = StripeDouble(api_keys={STRIPE_KEY}, webhook_secret=STRIPE_WHSEC,
                          certfile=tls["server_cert"], keyfile=tls["server_key"])
    double.start()
    try:
        double.configure(latency=0.08)
        cluster.create_database(DB)
        with cluster.connect(DB) as conn:
            conn.execute("CREATE EXTENSION crmpay")
            add_stripe_account(conn, double.base_url)
            crm_orders_table(conn)
        wait_for_worker(cluster, DB)
        with cluster.connect(DB) as conn:
            conn.execute("INSERT INTO orders (order_no, total, email)"
                         " SELECT 'X-' || g, 1 + g %% 90, 'x' || g || '@example.com'"
                         "   FROM generate_series(1, %s) g", (ORDERS,))

        # three SIGKILLs of the worker mid-run (each restarts the whole server)
        killed = []
        for target in (100, 300, 500):
            wait_for_progress(cluster, target)
            wait_for(lambda: double.stats()["requests_total"] > target, timeout=10, what="requests in flight")
            killed.append(kill_worker(cluster, DB, signal.SIGKILL))
            wait_for_worker(cluster, DB, other_than=killed[-1], timeout=60)
        # then an immediate shutdown mid-run, and a restart
        wait_for_progress(cluster, 700)
        cluster.crash()
        assert worker_pid(cluster, DB) is None
        cluster.start_again()

        wait_for(lambda: (lambda n: n == ORDERS)(done_jobs(cluster)), timeout=120, interval=0.1,
                 what="all orders to get their link")
        with cluster.connect(DB) as conn:
            assert conn.execute("SELECT state, count(*) FROM crmpay.jobs GROUP BY 1").fetchall() == [("done", ORDERS)]
            orders = conn.execute("SELECT order_no, pay_url, pay_status FROM orders").fetchall()
            keys = {k for (k,) in conn.execute("SELECT idempotency_key FROM crmpay.payments").fetchall()}
            refs = conn.execute("SELECT count(*), count(DISTINCT order_ref), count(DISTINCT url)"
                                "  FROM crmpay.payments WHERE status = 'open'").fetchone()
        assert len(orders) == ORDERS
        assert all(url and status == "open" for _, url, status in orders)
        assert len({url for _, url, _ in orders}) == ORDERS
        assert refs == (ORDERS, ORDERS, ORDERS)

        stats = double.stats()
        per_key = stats["objects_created_per_idempotency_key"]
        assert set(per_key) == keys, "the double saw keys that are not the orders' keys"
        assert set(per_key.values()) == {1}, "an order got a second gateway object"
        assert stats["sessions_created"] == ORDERS
        # the kills really hit requests in flight: some were sent again
        assert stats["requests_total"] > ORDERS
        log = cluster.server_log()
        assert log.count("was terminated by signal 9") == 3
        assert "left running by an earlier worker" in log
        # every link in the CRM is the gateway's session for that order
        for ref, url, _ in orders[:100]:
            assert double.get_object("checkout.session", url.rsplit("/", 1)[1])["client_reference_id"] == ref
    finally:
        double.stop()
