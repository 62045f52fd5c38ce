"""The outbox end to end through the background worker and the HTTPS Stripe
double: links for request_payment_link and for a linked CRM table, retries
with backoff and Retry-After, dead letters and requeueing, the per-account
circuit breaker, health, alerts, a burst of 10,000 orders and 30 % gateway
faults."""

import json
import random
import time

import psycopg
import pytest

from doubles.stripe_double import StripeDouble
from gateways import STRIPE_KEY, STRIPE_WHSEC, add_stripe_account, deliver
from outbox_support import (WORKER_DB, crm_orders_table, job_rows, payment_row,  # noqa: F401
                            query, request_link, scalar, set_worker_settings, shop, stripe,
                            stripe_created_per_key, wait_for, wait_until_drained, worker_cluster)


def sessions(double):
    return [r for r in double.requests() if r["path"] == "/v1/checkout/sessions"]


def test_request_payment_link_gets_its_link(worker_cluster, shop, stripe):
    listener = worker_cluster.connect(WORKER_DB)
    notes = []
    listener.add_notify_handler(notes.append)
    listener.execute("LISTEN crmpay_payments")
    row = request_link(shop, "ORD-1", "19.99", "eur", email="ana@example.com")
    assert row["status"] == "link_pending" and row["url"] is None
    wait_until_drained(worker_cluster)
    paid = payment_row(shop, "ORD-1")
    assert paid["status"] == "open"
    assert paid["url"].startswith(stripe.base_url + "/c/pay/cs_test_")
    assert paid["gateway_ref"].startswith("cs_test_") and paid["expires_at"] is not None
    sent = sessions(stripe)
    assert len(sent) == 1
    assert sent[0]["headers"]["Idempotency-Key"] == row["idempotency_key"]
    assert sent[0]["params"]["client_reference_id"] == "ORD-1"
    assert sent[0]["params"]["line_items"]["0"]["price_data"]["unit_amount"] == "1999"
    [job] = job_rows(shop)
    assert (job["state"], job["attempts"], job["last_error"]) == ("done", 1, None)
    # NOTIFY crmpay_payments announced the change, as for synchronous links
    listener.execute("SELECT 1")
    wait_for(lambda: listener.execute("SELECT 1") and [n for n in notes if json.loads(n.payload)["new_status"] == "open"],
             timeout=5, what="the notification")
    note = [json.loads(n.payload) for n in notes if json.loads(n.payload)["new_status"] == "open"][0]
    assert note["old_status"] == "link_pending" and note["order_ref"] == "ORD-1"
    listener.close()


def test_crm_orders_get_links_and_statuses_without_application_code(worker_cluster, shop, stripe):
    crm_orders_table(shop)
    shop.execute("INSERT INTO orders (order_no, customer, total, email)"
                 " SELECT 'CRM-' || g, 'Customer ' || g, 10 + g, 'c' || g || '@example.com'"
                 "   FROM generate_series(1, 50) g")
    shop.execute("INSERT INTO orders (order_no, total, currency) VALUES ('CRM-bad', 5, 'XYZ')")
    wait_until_drained(worker_cluster)
    rows = shop.execute("SELECT order_no, pay_url, pay_status FROM orders WHERE order_no <> 'CRM-bad'").fetchall()
    assert len(rows) == 50
    assert all(url and url.startswith(stripe.base_url + "/c/pay/") and status == "open"
               for _, url, status in rows)
    assert len({url for _, url, _ in rows}) == 50
    assert len(sessions(stripe)) == 50
    # the invalid order did not fail the CRM's insert: its job is dead with the reason
    [bad] = job_rows(shop, "payload->'order'->>'order_ref' = 'CRM-bad'")
    assert bad["state"] == "dead" and 'unknown currency "XYZ"' in bad["last_error"]
    assert shop.execute("SELECT pay_url FROM orders WHERE order_no = 'CRM-bad'").fetchone() == (None,)

    # later status changes (a verified webhook) reach the CRM row too
    ref = payment_row(shop, "CRM-7")["gateway_ref"]
    out = stripe.pay(ref, "paid")
    for delivery in out["deliveries"]:
        deliver(shop, "shop", delivery)
    assert shop.execute("SELECT pay_status FROM orders WHERE order_no = 'CRM-7'").fetchone() == ("paid",)


def test_transient_failures_are_retried_with_the_same_key(worker_cluster, shop, stripe):
    stripe.set_faults(mode="500", count=2)
    row = request_link(shop, "RETRY-1")
    wait_until_drained(worker_cluster)
    [job] = job_rows(shop)
    assert job["state"] == "done" and job["attempts"] == 3
    keys = [r["idempotency_key"] for r in sessions(stripe)]
    assert keys == [row["idempotency_key"]] * 3
    assert stripe_created_per_key(stripe) == {row["idempotency_key"]: 1}
    assert payment_row(shop, "RETRY-1")["status"] == "open"


@pytest.mark.parametrize("mode", ["429", "503"])
def test_retry_after_is_honoured(worker_cluster, shop, stripe, mode):
    stripe.set_faults(mode=mode, count=1, retry_after=2)
    request_link(shop, f"LATER-{mode}")
    wait_until_drained(worker_cluster)
    times = [r["time"] for r in sessions(stripe)]
    assert len(times) == 2
    assert times[1] - times[0] >= 2.0, "retried before the gateway's Retry-After"
    assert times[1] - times[0] < 4.0


def test_backoff_grows_with_full_jitter_and_ends_dead(worker_cluster, shop, stripe):
    set_worker_settings(worker_cluster, {"crmpay.retry_base_delay": "100ms", "crmpay.retry_max_delay": "400ms",
                                         "crmpay.max_attempts": 5, "crmpay.circuit_failure_threshold": 0})
    stripe.set_faults(mode="503")
    row = request_link(shop, "DOWN-1")
    wait_until_drained(worker_cluster, timeout=30)
    times = [r["time"] for r in sessions(stripe)]
    assert len(times) == 5
    gaps = [b - a for a, b in zip(times, times[1:])]
    # attempt n waits at most min(400 ms, 100 ms * 2^(n-1)) (plus the loop's slack)
    for n, gap in enumerate(gaps, start=1):
        assert gap <= min(0.4, 0.1 * 2 ** (n - 1)) + 0.25, f"gap {n} was {gap:.3f} s"
    [job] = job_rows(shop)
    assert job["state"] == "dead" and job["attempts"] == 5
    assert job["last_error"].startswith("gateway is unavailable: HTTP 503")
    assert "temporarily unavailable" in job["last_error"]
    assert job["last_http_status"] == 503
    assert payment_row(shop, "DOWN-1")["status"] == "link_pending"
    # fixed gateway: the dead job is queued again on request, same key, one link
    stripe.set_faults(mode="none")
    shop.execute("SELECT crmpay.retry_job(%s)", (job["id"],))
    wait_until_drained(worker_cluster)
    assert payment_row(shop, "DOWN-1")["status"] == "open"
    assert stripe_created_per_key(stripe) == {row["idempotency_key"]: 1}


def test_a_job_that_keeps_stopping_its_worker_goes_dead(worker_cluster, shop, stripe):
    """A job claimed again and again with no outcome recorded (its worker died
    each time, say on a crash) is dead once out of attempts: no crash loop."""
    set_worker_settings(worker_cluster, {"crmpay.max_attempts": 3})
    shop.execute("BEGIN")
    request_link(shop, "POISON-1")
    # as left by three workers that died with it in flight, the last lease over
    shop.execute("UPDATE crmpay.jobs SET state = 'running', attempts = 3, run_at = now() - interval '1 s'")
    shop.execute("COMMIT")
    wait_until_drained(worker_cluster)
    [job] = job_rows(shop)
    assert job["state"] == "dead" and job["attempts"] == 4
    assert job["last_error"] == "claimed 3 times without an outcome: the worker stopped while it was in flight"
    assert sessions(stripe) == []
    assert query(worker_cluster, WORKER_DB, "SELECT kind FROM crmpay.alerts") == [("job_dead",)]


def test_refusals_are_dead_at_once_with_the_gateways_error(worker_cluster, shop, stripe):
    listener = worker_cluster.connect(WORKER_DB)
    notes = []
    listener.add_notify_handler(notes.append)
    listener.execute("LISTEN crmpay_alerts")
    # a currency crmpay knows but Stripe refuses: 400
    request_link(shop, "REFUSED-1", "10", "BOV")
    # credentials Stripe refuses: 401
    add_stripe_account(shop, stripe.base_url, name="badkey", key="sk_test_not_known_to_the_double")
    request_link(shop, "REFUSED-2", account="badkey")
    wait_until_drained(worker_cluster)
    jobs = {j["payload"]["order_ref"]: j for j in job_rows(shop)}
    assert jobs["REFUSED-1"]["state"] == "dead" and jobs["REFUSED-1"]["attempts"] == 1
    assert jobs["REFUSED-1"]["last_http_status"] == 400
    assert "gateway rejected the request: HTTP 400" in jobs["REFUSED-1"]["last_error"]
    assert "Invalid currency: bov" in jobs["REFUSED-1"]["last_error"]
    assert jobs["REFUSED-2"]["state"] == "dead" and jobs["REFUSED-2"]["attempts"] == 1
    assert jobs["REFUSED-2"]["last_http_status"] == 401
    assert "Invalid API Key provided" in jobs["REFUSED-2"]["last_error"]
    assert "sk_test_not_known_to_the_double" not in jobs["REFUSED-2"]["last_error"]
    assert len(sessions(stripe)) == 2
    # each death is an alert row and a NOTIFY crmpay_alerts
    alerts = query(worker_cluster, WORKER_DB, "SELECT kind, account, job_id FROM crmpay.alerts ORDER BY id")
    assert sorted(alerts) == sorted([("job_dead", "shop", jobs["REFUSED-1"]["id"]),
                                     ("job_dead", "badkey", jobs["REFUSED-2"]["id"])])
    wait_for(lambda: listener.execute("SELECT 1") and len(notes) >= 2, timeout=5, what="alert notifications")
    payloads = [json.loads(n.payload) for n in notes]
    assert {(p["kind"], p["account"]) for p in payloads} == {("job_dead", "shop"), ("job_dead", "badkey")}
    listener.close()
    # fixed credentials: retry_dead requeues the account's dead jobs
    shop.execute("SELECT crmpay.update_account('badkey', credentials => %s::jsonb)",
                 (json.dumps({"secret_key": STRIPE_KEY}),))
    assert shop.execute("SELECT crmpay.retry_dead('badkey')").fetchone() == (1,)
    wait_until_drained(worker_cluster)
    assert payment_row(shop, "REFUSED-2", account="badkey")["status"] == "open"
    health = {r[0]: r[1:] for r in shop.execute(
        "SELECT account, queue_depth, dead_jobs, circuit_state FROM crmpay.health").fetchall()}
    assert health == {"shop": (0, 1, "closed"), "badkey": (0, 0, "closed")}


def test_circuit_opens_for_one_account_while_others_go_on(worker_cluster, shop, stripe, tls):
    set_worker_settings(worker_cluster, {"crmpay.circuit_failure_threshold": 3,
                                         "crmpay.circuit_cooldown": "3s",
                                         "crmpay.max_attempts": 100,
                                         "crmpay.retry_base_delay": "10ms",
                                         "crmpay.retry_max_delay": "50ms"})
    healthy = StripeDouble(api_keys={STRIPE_KEY}, webhook_secret=STRIPE_WHSEC,
                           certfile=tls["server_cert"], keyfile=tls["server_key"])
    healthy.start()
    try:
        add_stripe_account(shop, healthy.base_url, name="other")
        stripe.set_faults(mode="503")
        for i in range(10):
            request_link(shop, f"SHOP-{i}")
        opened = wait_for(lambda: scalar(worker_cluster, WORKER_DB,
                                         "SELECT state FROM crmpay.circuits WHERE account = 'shop'") == "open",
                          timeout=10, what="the circuit to open")
        assert opened
        seen_when_open = len(sessions(stripe))
        # the other account is served meanwhile
        for i in range(5):
            request_link(shop, f"OTHER-{i}", account="other")
        wait_for(lambda: scalar(worker_cluster, WORKER_DB,
                                "SELECT count(*) FROM crmpay.payments WHERE account = 'other' AND status = 'open'") == 5,
                 timeout=10, what="the other account's links")
        health = dict((r[0], r[1:]) for r in shop.execute(
            "SELECT account, circuit_state, queue_depth, oldest_pending_age IS NOT NULL,"
            "       coalesce(last_error LIKE 'gateway is unavailable: HTTP 503%', false)"
            "  FROM crmpay.health").fetchall())
        assert health["shop"] == ("open", 10, True, True)
        assert health["other"] == ("closed", 0, False, False)
        # no request for the paused account during the cool-down; jobs stay queued
        time.sleep(0.5)
        assert len(sessions(stripe)) == seen_when_open
        assert scalar(worker_cluster, WORKER_DB,
                      "SELECT count(*) FROM crmpay.jobs WHERE account = 'shop' AND state = 'queued'") == 10
        alerts = query(worker_cluster, WORKER_DB, "SELECT kind, account FROM crmpay.alerts")
        assert alerts == [("circuit_open", "shop")]
        # the gateway recovers: after the cool-down one trial call closes the circuit
        stripe.set_faults(mode="none")
        wait_until_drained(worker_cluster, timeout=20)
        assert scalar(worker_cluster, WORKER_DB,
                      "SELECT state FROM crmpay.circuits WHERE account = 'shop'") == "closed"
        assert scalar(worker_cluster, WORKER_DB,
                      "SELECT count(*) FROM crmpay.payments WHERE account = 'shop' AND status = 'open'") == 10
        assert all(n == 1 for n in stripe_created_per_key(stripe).values())
        assert len(stripe_created_per_key(stripe)) == 10
    finally:
        healthy.stop()


def test_burst_of_10000_orders_in_one_transaction(worker_cluster, shop, stripe):
    set_worker_settings(worker_cluster, {"crmpay.max_concurrent_requests": 64,
                                         "crmpay.max_host_connections": 64})
    crm_orders_table(shop)
    started = time.monotonic()
    shop.execute("INSERT INTO orders (order_no, total, email)"
                 " SELECT 'B-' || g, 1 + g % 500, 'b' || g || '@example.com' FROM generate_series(1, 10000) g")
    states = wait_until_drained(worker_cluster, timeout=180)
    elapsed = time.monotonic() - started
    assert states == {"done": 10000}
    assert shop.execute("SELECT count(*), count(DISTINCT pay_url) FROM orders"
                        " WHERE pay_status = 'open' AND pay_url IS NOT NULL").fetchone() == (10000, 10000)
    per_key = stripe_created_per_key(stripe)
    assert len(per_key) == 10000 and set(per_key.values()) == {1}
    assert stripe.stats()["faults_injected"] == 0
    print(f"10,000 orders: {elapsed:.1f} s ({10000 / elapsed:.0f} links/s)")


def test_thirty_percent_gateway_faults(worker_cluster, shop, stripe):
    set_worker_settings(worker_cluster, {"crmpay.max_attempts": 30,
                                         "crmpay.circuit_failure_threshold": 0,
                                         "crmpay.request_timeout": "2s"})
    modes = ["500", "503", "429", "drop", "drop_after_create", "bad_json"]
    taken = stripe._take_fault

    def mixed_fault(path):
        # a different fault each time, 30 % of all requests
        with stripe._lock:
            stripe._faults.update(mode=random.choice(modes), probability=0.3, retry_after="0")
        return taken(path)

    stripe._take_fault = mixed_fault
    try:
        crm_orders_table(shop)
        shop.execute("INSERT INTO orders (order_no, total) SELECT 'F-' || g, 5 FROM generate_series(1, 1000) g")
        states = wait_until_drained(worker_cluster, timeout=120)
    finally:
        del stripe._take_fault
        stripe.set_faults(mode="none")
    assert states == {"done": 1000}
    stats = stripe.stats()
    assert stats["faults_injected"] >= 200
    assert set(stats["faults_injected_by_mode"]) == set(modes)
    per_key = stripe_created_per_key(stripe)
    assert len(per_key) == 1000 and set(per_key.values()) == {1}
    assert shop.execute("SELECT count(*), count(DISTINCT pay_url) FROM orders WHERE pay_status = 'open'").fetchone() \
        == (1000, 1000)
    # every order's link is the one session Stripe made for it
    urls = dict(shop.execute("SELECT order_no, pay_url FROM orders").fetchall())
    for ref, url in list(urls.items())[:50]:
        session = stripe.get_object("checkout.session", url.rsplit("/", 1)[1])
        assert session["client_reference_id"] == ref
