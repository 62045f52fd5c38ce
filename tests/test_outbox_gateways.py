"""The worker with the other gateways: PayPal (the shared OAuth token, and
a refused token fetched anew once), Redsys' signed redirect form (a link
made without any gateway call) and Redsys Paygold (a REST link)."""

import json
import os

import pytest

from doubles.paypal_double import PayPalDouble
from doubles.redsys_double import RedsysDouble
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
