"""The worker with the other gateways: PayPal (the shared OAuth token, and
a refused token fetched anew once), Redsys' signed redirect form (a link
made without any gateway call) and Redsys Paygold (a REST link); PayPal's
capture as a job queued by the CHECKOUT.ORDER.APPROVED webhook (one call
with the payment's own PayPal-Request-Id, retried with the same one, a new
token after a 401, declined and pending outcomes, refusals dead with
PayPal's error, nothing to do for a payment paid already)."""

import json
import os

import pytest

from doubles.paypal_double import PayPalDouble
from doubles.redsys_double import RedsysDouble
from gateways import deliver
from outbox_support import (WORKER_DB, fresh_extension, job_rows, payment_row,  # noqa: F401
                            request_link, wait_until_drained, worker_cluster)
from test_paypal import CLIENT_ID, CLIENT_SECRET, WEBHOOK_ID, add_paypal_account
from test_redsys import KEY, KEY2, MERCHANT, PAYGOLD_MERCHANT
from test_redsys import add_account as add_redsys_account


@pytest.fixture(scope="module")
def paypal(tls):
    double = PayPalDouble({CLIENT_ID: CLIENT_SECRET}, WEBHOOK_ID, tls["ca_cert"],
                          os.path.join(os.path.dirname(tls["ca_cert"]), "ca.key"),
                          tls["server_cert"], tls["server_key"])
    double.start()
    yield double
    double.stop()


@pytest.fixture(scope="module")
def redsys(tls):
    double = RedsysDouble(certfile=tls["server_cert"], keyfile=tls["server_key"])
    double.add_merchant(MERCHANT, KEY, terminals=("1",))
    double.add_merchant(PAYGOLD_MERCHANT, KEY2, terminals=("1",), paygold=True)
    double.start()
    yield double
    double.stop()


@pytest.fixture
def conn(worker_cluster):
    fresh_extension(worker_cluster)
    with worker_cluster.connect(WORKER_DB) as c:
        yield c


def test_paypal_links_through_the_worker(worker_cluster, conn, paypal):
    paypal.reset()
    paypal.configure(expires_in=32400, latency=0)
    add_paypal_account(conn, paypal.base_url)
    conn.execute("BEGIN")
    for i in range(5):
        request_link(conn, f"PP-{i}", account="pp")
    conn.execute("COMMIT")
    assert wait_until_drained(worker_cluster) == {"done": 5}
    rows = [payment_row(conn, f"PP-{i}", account="pp") for i in range(5)]
    assert all(r["status"] == "open" and r["url"] and r["gateway_ref"] for r in rows)
    stats = paypal.stats()
    assert stats["tokens_issued"] == 1 and stats["orders_created"] == 5
    # a token PayPal stops accepting: one 401, a new token, the same order request again
    paypal.revoke_tokens()
    request_link(conn, "PP-401", account="pp")
    assert wait_until_drained(worker_cluster) == {"done": 6}
    [job] = job_rows(conn, "payload->>'order_ref' = 'PP-401'")
    assert job["attempts"] == 2
    stats = paypal.stats()
    assert stats["tokens_issued"] == 2 and stats["auth_failures"] == 1 and stats["orders_created"] == 6
    assert payment_row(conn, "PP-401", account="pp")["status"] == "open"


def test_paypal_bad_credentials_are_dead_without_secrets(worker_cluster, conn, paypal):
    paypal.reset()
    add_paypal_account(conn, paypal.base_url, secret="not-the-secret-at-all")
    request_link(conn, "PP-BAD", account="pp")
    assert wait_until_drained(worker_cluster) == {"dead": 1}
    [job] = job_rows(conn)
    assert job["last_error"].startswith("gateway refused the account's credentials")
    assert "not-the-secret-at-all" not in job["last_error"]
    assert paypal.stats()["orders_created"] == 0


def test_redsys_links_through_the_worker(worker_cluster, conn, redsys):
    redsys.reset()
    add_redsys_account(conn, "rs", redsys.base_url)
    add_redsys_account(conn, "pg", redsys.base_url, merchant=PAYGOLD_MERCHANT, key=KEY2,
                       paygold=True, paygold_expiry_minutes="60")
    request_link(conn, "RS-1", account="rs")
    request_link(conn, "PG-1", "12.00", account="pg", email="ana@example.com")
    assert wait_until_drained(worker_cluster) == {"done": 2}
    # the redirect form is signed locally: open at once, no call to Redsys for it
    form = payment_row(conn, "RS-1", account="rs")
    assert form["status"] == "open" and form["gateway_ref"]
    paygold = payment_row(conn, "PG-1", account="pg")
    assert paygold["status"] == "open" and paygold["url"]
    paths = [r["path"] for r in redsys.requests()]
    assert len(paths) == 1 and "trataPeticionREST" in paths[0]


# ---------------------------------------------------------------- PayPal capture jobs
#
# CHECKOUT.ORDER.APPROVED, applied by receive_webhook, queues a 'capture' job
# in the same transaction; the worker captures with the payment's own
# PayPal-Request-Id (idempotency key + '-capture') and the answer moves the
# payment through the state machine.

def paypal_open_payment(worker_cluster, conn, paypal, order_ref):
    """An open PayPal payment whose link the worker made."""
    conn.execute("SET crmpay.paypal_cert_hosts = '127.0.0.1'")
    if not conn.execute("SELECT 1 FROM crmpay.gateway_accounts WHERE name = 'pp'").fetchone():
        add_paypal_account(conn, paypal.base_url)
    request_link(conn, order_ref, account="pp")
    wait_until_drained(worker_cluster)
    row = payment_row(conn, order_ref, account="pp")
    assert row["status"] == "open" and row["gateway_ref"]
    return row


def capture_requests(paypal, order_id=None):
    return [r for r in paypal.requests() if r["path"].endswith("/capture")
            and (order_id is None or r["path"] == f"/v2/checkout/orders/{order_id}/capture")]


def capture_jobs(conn):
    return job_rows(conn, "kind = 'capture'")


@pytest.fixture
def pp_conn(conn, paypal):
    paypal.reset()
    paypal.configure(expires_in=32400, latency=0)
    return conn


def test_paypal_approval_is_captured_by_the_worker(worker_cluster, pp_conn, paypal):
    conn = pp_conn
    row = paypal_open_payment(worker_cluster, conn, paypal, "CAP-1")
    approved = paypal.approve(row["gateway_ref"])
    assert deliver(conn, "pp", approved) == [(200, "", "applied", approved["event_id"])]
    assert wait_until_drained(worker_cluster) == {"done": 2}
    [job] = capture_jobs(conn)
    assert job["payment_id"] == row["id"] and job["attempts"] == 1
    assert job["payload"]["event_key"] == approved["event_id"]
    # exactly one capture call, with the payment's own request id and the shared token
    [sent] = capture_requests(paypal)
    assert sent["path"] == f"/v2/checkout/orders/{row['gateway_ref']}/capture"
    assert sent["headers"]["PayPal-Request-Id"] == row["idempotency_key"] + "-capture"
    assert sent["headers"]["Authorization"].startswith("Bearer ")
    assert paypal.stats()["tokens_issued"] == 1
    capture = paypal.order(row["gateway_ref"])["purchase_units"][0]["payments"]["captures"][0]
    paid = payment_row(conn, "CAP-1", account="pp")
    assert paid["status"] == "paid" and paid["paid_at"] is not None
    assert paid["gateway_payment_ref"] == capture["id"]
    assert job["payload"]["capture"]["capture_id"] == capture["id"]
    assert job["payload"]["capture"]["gateway_status"] == "COMPLETED"
    # the same delivery again: a duplicate, no second job, no second call
    assert deliver(conn, "pp", approved)[0][2] == "duplicate"
    assert len(capture_jobs(conn)) == 1
    # PayPal's PAYMENT.CAPTURE.COMPLETED comes later: authentic, nothing left to do
    [completed] = [d for d in paypal.deliveries() if d["type"] == "PAYMENT.CAPTURE.COMPLETED"]
    assert deliver(conn, "pp", completed)[0][:3] == (200, "", "ignored")
    assert wait_until_drained(worker_cluster) == {"done": 2}
    assert len(capture_requests(paypal)) == 1 and paypal.stats()["captures"] == 1


def test_paypal_capture_retried_with_the_same_request_id(worker_cluster, pp_conn, paypal):
    conn = pp_conn
    row = paypal_open_payment(worker_cluster, conn, paypal, "CAP-500")
    paypal.set_faults("500", count=1, path_prefix=f"/v2/checkout/orders/{row['gateway_ref']}/capture")
    deliver(conn, "pp", paypal.approve(row["gateway_ref"]))
    assert wait_until_drained(worker_cluster) == {"done": 2}
    [job] = capture_jobs(conn)
    assert job["attempts"] == 2 and job["last_error"] is None
    sent = capture_requests(paypal)
    assert len(sent) == 2
    assert {r["headers"]["PayPal-Request-Id"] for r in sent} == {row["idempotency_key"] + "-capture"}
    assert paypal.stats()["captures"] == 1
    assert payment_row(conn, "CAP-500", account="pp")["status"] == "paid"


def test_paypal_capture_gets_a_new_token_after_a_401(worker_cluster, pp_conn, paypal):
    conn = pp_conn
    row = paypal_open_payment(worker_cluster, conn, paypal, "CAP-401")
    paypal.revoke_tokens()
    deliver(conn, "pp", paypal.approve(row["gateway_ref"]))
    assert wait_until_drained(worker_cluster) == {"done": 2}
    [job] = capture_jobs(conn)
    assert job["attempts"] == 2
    stats = paypal.stats()
    assert stats["tokens_issued"] == 2 and stats["auth_failures"] == 1 and stats["captures"] == 1
    assert payment_row(conn, "CAP-401", account="pp")["status"] == "paid"


@pytest.mark.parametrize("outcome, status, gateway_status", [
    ("declined", "failed", "DECLINED"),
    ("pending", "processing", "PENDING"),
])
def test_paypal_capture_outcomes(worker_cluster, pp_conn, paypal, outcome, status, gateway_status):
    conn = pp_conn
    row = paypal_open_payment(worker_cluster, conn, paypal, f"CAP-{outcome}")
    deliver(conn, "pp", paypal.approve(row["gateway_ref"], capture=outcome))
    assert wait_until_drained(worker_cluster) == {"done": 2}
    [job] = capture_jobs(conn)
    assert job["payload"]["capture"]["gateway_status"] == gateway_status
    after = payment_row(conn, f"CAP-{outcome}", account="pp")
    assert after["status"] == status
    assert after["gateway_payment_ref"] == job["payload"]["capture"]["capture_id"]
    assert len(capture_requests(paypal)) == 1
    if outcome == "pending":
        # PayPal settles it later with PAYMENT.CAPTURE.COMPLETED
        capture = paypal.order(row["gateway_ref"])["purchase_units"][0]["payments"]["captures"][0]
        resource = dict(capture, status="COMPLETED",
                        supplementary_data={"related_ids": {"order_id": row["gateway_ref"]}})
        completed = paypal.deliver(paypal.event("PAYMENT.CAPTURE.COMPLETED", resource, "capture",
                                                "Payment completed"))
        assert deliver(conn, "pp", completed)[0][2] == "applied"
        assert payment_row(conn, "CAP-pending", account="pp")["status"] == "paid"


def test_paypal_capture_refused_is_dead_with_paypals_error(worker_cluster, pp_conn, paypal):
    conn = pp_conn
    row = paypal_open_payment(worker_cluster, conn, paypal, "CAP-422")
    approved = paypal.approve(row["gateway_ref"])
    paypal.capture_now(row["gateway_ref"])      # captured elsewhere (the dashboard)
    deliver(conn, "pp", approved)
    assert wait_until_drained(worker_cluster) == {"done": 1, "dead": 1}
    [job] = capture_jobs(conn)
    assert job["state"] == "dead" and job["attempts"] == 1     # not retried
    assert job["last_http_status"] == 422 and job["last_error_code"] == "ORDER_ALREADY_CAPTURED"
    assert "Order already captured" in job["last_error"]
    [alert] = conn.execute("SELECT kind, job_id, payment_id, details->>'kind' FROM crmpay.alerts").fetchall()
    assert alert == ("job_dead", job["id"], row["id"], "capture")
    assert payment_row(conn, "CAP-422", account="pp")["status"] == "processing"


def test_paypal_capture_job_of_a_paid_payment_is_a_no_op(worker_cluster, pp_conn, paypal):
    conn = pp_conn
    row = paypal_open_payment(worker_cluster, conn, paypal, "CAP-SYNC")
    approved = paypal.approve(row["gateway_ref"])
    # the webhook and a synchronous capture in one transaction: the job is
    # committed with a payment that is paid already
    with conn.transaction():
        assert deliver(conn, "pp", approved)[0][2] == "applied"
        assert conn.execute("SELECT status FROM crmpay.capture_payment(%s)",
                            (row["id"],)).fetchone() == ("paid",)
    assert wait_until_drained(worker_cluster) == {"done": 2}
    [job] = capture_jobs(conn)
    assert job["state"] == "done" and "capture" not in job["payload"]
    assert len(capture_requests(paypal)) == 1
