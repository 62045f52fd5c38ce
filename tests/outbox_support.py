"""Helpers and fixtures for the tests of the outbox and its background worker.

The worker only runs for the databases of crmpay.database, a postmaster
setting, so these tests share one private cluster per test module
(``worker_cluster``) whose crmpay.database lists WORKER_DB, OTHER_DB and
SPARE_DB.  ``shop`` gives each test WORKER_DB with crmpay freshly created
(DROP/CREATE EXTENSION: the running worker copes with that, which is a
test of its own) and a Stripe account "shop" on a freshly reset double.
Settings a test changes with ``set_worker_settings`` (ALTER SYSTEM +
reload, i.e. SIGHUP) are reset afterwards.

Import the fixtures into a test module to use them:

    from outbox_support import worker_cluster, stripe, shop  # noqa: F401
"""

import json
import os
import signal
import time

import psycopg
import pytest
from psycopg import sql

from gateways import add_stripe_account

WORKER_DB = "ob_main"
OTHER_DB = "ob_other"
SPARE_DB = "ob_spare"

# Quick retries so that tests of retries take milliseconds.
BASE_SETTINGS = {
    "crmpay.database": f"{WORKER_DB}, {OTHER_DB}, {SPARE_DB}",
    "crmpay.retry_base_delay": "20ms",
    "crmpay.retry_max_delay": "500ms",
    "crmpay.max_concurrent_requests": 32,
    "crmpay.max_host_connections": 32,
    "max_worker_processes": 16,
}


def wait_for(predicate, timeout=30.0, interval=0.05, what="a condition"):
    """Polls predicate() until it returns something true; returns that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def query(cluster, dbname, text, params=None):
    """All rows of one query on a new connection (survives server restarts)."""
    with cluster.connect(dbname) as conn:
        return conn.execute(text, params).fetchall()


def scalar(cluster, dbname, text, params=None):
    rows = query(cluster, dbname, text, params)
    return rows[0][0] if rows else None


def worker_pid(cluster, dbname=WORKER_DB):
    """PID of the crmpay worker of a database, or None."""
    try:
        return scalar(cluster, "postgres",
                      "SELECT pid FROM pg_stat_activity WHERE backend_type = 'crmpay worker' AND datname = %s",
                      (dbname,))
    except psycopg.OperationalError:
        return None  # the server is restarting


def launcher_pid(cluster):
    return scalar(cluster, "postgres",
                  "SELECT pid FROM pg_stat_activity WHERE backend_type = 'crmpay launcher'")


def wait_for_worker(cluster, dbname=WORKER_DB, other_than=None, timeout=30):
    return wait_for(lambda: (lambda pid: pid if pid and pid != other_than else None)(worker_pid(cluster, dbname)),
                    timeout=timeout, what=f"the crmpay worker of {dbname}")


def pending_jobs(cluster, dbname=WORKER_DB):
    return scalar(cluster, dbname, "SELECT count(*) FROM crmpay.jobs WHERE state IN ('queued', 'running')")


def wait_until_drained(cluster, dbname=WORKER_DB, timeout=60):
    """Waits until no job is queued or running; returns the job states."""
    wait_for(lambda: pending_jobs(cluster, dbname) == 0, timeout=timeout, what="the outbox to drain")
    return dict(query(cluster, dbname, "SELECT state, count(*) FROM crmpay.jobs GROUP BY 1"))


def set_worker_settings(cluster, settings):
    """ALTER SYSTEM SET each setting (None resets it), then reload (SIGHUP)."""
    with cluster.connect() as conn:
        for name, value in settings.items():
            if value is None:
                conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
            else:
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name),
                                                                       sql.Literal(str(value))))
    cluster.reload()


def recreate_database(cluster, dbname):
    cluster.drop_database(dbname)
    cluster.create_database(dbname)


def fresh_extension(cluster, dbname=WORKER_DB):
    """crmpay created anew in dbname (the database is created if missing),
    with an empty public schema."""
    with cluster.connect() as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
    if not exists:
        cluster.create_database(dbname)
    with cluster.connect(dbname) as conn:
        conn.execute("DROP EXTENSION IF EXISTS crmpay CASCADE")
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
        conn.execute("CREATE EXTENSION crmpay")


def kill_worker(cluster, dbname=WORKER_DB, sig=signal.SIGKILL):
    pid = worker_pid(cluster, dbname)
    assert pid, "no worker to kill"
    os.kill(pid, sig)
    return pid


def crm_orders_table(conn, name="orders"):
    """A CRM orders table linked to the account 'shop'."""
    conn.execute(sql.SQL("""
        CREATE TABLE {} (
            id          bigserial PRIMARY KEY,
            order_no    text NOT NULL,
            customer    text,
            total       numeric(12, 2) NOT NULL,
            currency    text NOT NULL DEFAULT 'EUR',
            email       text,
            pay_url     text,
            pay_status  text,
            created_at  timestamptz NOT NULL DEFAULT now())""").format(sql.Identifier(name)))
    conn.execute(sql.SQL("CREATE INDEX ON {} (order_no)").format(sql.Identifier(name)))
    conn.execute("SELECT crmpay.link_orders(%s::regclass, 'shop', 'order_no', 'total', 'currency',"
                 " email => 'email', url_column => 'pay_url', status_column => 'pay_status')", (name,))


def stripe_created_per_key(double):
    """{idempotency key: objects the double created with it}."""
    return double.stats()["objects_created_per_idempotency_key"]


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def worker_cluster(pg_bindir, tls):
    """A private cluster whose crmpay.database lists WORKER_DB, OTHER_DB and
    SPARE_DB (WORKER_DB created, so its worker runs)."""
    from lib.cluster import PgCluster

    settings = {"crmpay.ca_file": tls["ca_cert"]}
    settings.update(BASE_SETTINGS)
    cluster = PgCluster(pg_bindir, settings=settings)
    cluster.start()
    try:
        cluster.create_database(WORKER_DB)
        wait_for_worker(cluster)
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="module")
def stripe(stripe_double):
    """The Stripe double, shared by a module's tests (reset for each)."""
    return stripe_double


@pytest.fixture
def shop(worker_cluster, stripe):
    """WORKER_DB with crmpay created anew and the Stripe account 'shop' on the
    reset double; an autocommit connection to it.  Settings changed with
    set_worker_settings are reset afterwards."""
    stripe.reset()
    stripe.configure(latency=0)
    fresh_extension(worker_cluster)
    conn = worker_cluster.connect(WORKER_DB)
    add_stripe_account(conn, stripe.base_url)
    try:
        yield conn
    finally:
        conn.close()
        with worker_cluster.connect() as admin:
            changed = admin.execute("SELECT count(*) FROM pg_file_settings"
                                    " WHERE sourcefile LIKE '%postgresql.auto.conf'").fetchone()[0]
            if changed:
                admin.execute("ALTER SYSTEM RESET ALL")
        if changed:
            worker_cluster.reload()


def request_link(conn, order_ref, amount="19.99", currency="EUR", email=None, account="shop"):
    cur = conn.execute("SELECT * FROM crmpay.request_payment_link(%s, %s, %s::numeric, %s, %s)",
                       (account, order_ref, amount, currency, email))
    return dict(zip([c.name for c in cur.description], cur.fetchone()))


def job_rows(conn, where="true", params=None):
    cur = conn.execute(f"SELECT * FROM crmpay.jobs WHERE {where} ORDER BY id", params)
    names = [c.name for c in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def payment_row(conn, order_ref, account="shop"):
    cur = conn.execute("SELECT * FROM crmpay.payments WHERE account = %s AND order_ref = %s",
                       (account, order_ref))
    row = cur.fetchone()
    return dict(zip([c.name for c in cur.description], row)) if row else None


__all__ = ["worker_cluster", "stripe", "shop", "wait_for", "query", "scalar", "worker_pid",
           "launcher_pid", "wait_for_worker", "pending_jobs", "wait_until_drained",
           "set_worker_settings", "recreate_database", "fresh_extension", "kill_worker",
           "crm_orders_table", "stripe_created_per_key", "request_link", "job_rows",
           "payment_row", "WORKER_DB", "OTHER_DB", "SPARE_DB", "json"]
