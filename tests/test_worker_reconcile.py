"""The background worker runs due reconciliation schedules by itself: a
lost webhook is healed with no call from the CRM or the DBA beyond
schedule_reconciliation()."""

import pytest

from outbox_support import WORKER_DB, set_worker_settings, shop, stripe, wait_for, worker_cluster  # noqa: F401
from gateways import payment


def test_worker_runs_a_due_schedule_and_heals_the_lost_webhook(shop, stripe, worker_cluster):
    set_worker_settings(worker_cluster, {"crmpay.reconcile_check_interval": "200ms"})
    link = shop.execute("SELECT gateway_ref FROM crmpay.create_payment_link('shop', 'ORD-LOST', 12.00, 'EUR')"
                        ).fetchone()[0]
    stripe.pay(link, "paid")            # the customer paid; the webhook never arrives
    assert payment(shop, "shop", "ORD-LOST")["status"] == "open"

    shop.execute("SELECT crmpay.schedule_reconciliation('shop', every => '1 day', \"window\" => '2 days', heal => true)")
    run_id = wait_for(lambda: shop.execute("SELECT last_run_id FROM crmpay.reconciliation_schedules"
                                           " WHERE account = 'shop'").fetchone()[0],
                      timeout=30, what="the worker to start the scheduled run")
    status = wait_for(lambda: shop.execute("SELECT status FROM crmpay.reconciliation_runs WHERE id = %s"
                                           " AND status <> 'running'", (run_id,)).fetchone(),
                      timeout=30, what="the scheduled run to finish")[0]
    assert status == "succeeded"
    assert payment(shop, "shop", "ORD-LOST")["status"] == "paid"
    healed = shop.execute("SELECT count(*) FROM crmpay.reconciliation_items WHERE run_id = %s AND healed",
                          (run_id,)).fetchone()[0]
    assert healed == 1
    # the schedule moved on: not due again for a day, so no second run starts
    next_run = shop.execute("SELECT next_run_at > now() + interval '23 hours' FROM crmpay.reconciliation_schedules"
                            " WHERE account = 'shop'").fetchone()[0]
    assert next_run


def test_schedule_checks_keep_an_idle_worker_idle(make_cluster):
    """Timer wakes that look for due schedules (every 200 ms here) are not a
    poll of the outbox: an idle worker's activity does not change."""
    import time
    cluster = make_cluster(settings={"crmpay.database": "idle_db", "crmpay.reconcile_check_interval": "200ms"})
    cluster.create_database("idle_db")
    cluster.restart()
    conn = cluster.connect("idle_db")
    conn.execute("CREATE EXTENSION crmpay")
    sql = ("SELECT state, state_change, query FROM pg_stat_activity WHERE backend_type = 'crmpay worker'"
           " AND datname = 'idle_db'")
    first = wait_for(lambda: (lambda r: r if r and r[0] == "idle" else None)(conn.execute(sql).fetchone()),
                     what="an idle worker")
    time.sleep(1.0)             # let the start-up passes settle
    settled = conn.execute(sql).fetchone()
    time.sleep(2.0)             # ten schedule checks
    assert conn.execute(sql).fetchone() == settled
    assert settled[2] == "crmpay worker: waiting for jobs" and first[0] == "idle"
