"""The background worker's life: where it runs, what pg_stat_activity shows,
how it is woken, that it holds no transaction during HTTP, and how it
behaves on SIGHUP, SIGTERM, postmaster death, DROP DATABASE (its own or
another) and DROP EXTENSION."""

import os
import shutil
import signal
import subprocess
import tempfile
import time

import psycopg
import pytest

from lib.cluster import PgCluster, free_port, give_to_pg
from outbox_support import (OTHER_DB, SPARE_DB, WORKER_DB, fresh_extension,  # noqa: F401
                            job_rows, launcher_pid, payment_row, query, request_link, scalar,
                            set_worker_settings, shop, stripe, stripe_created_per_key, wait_for,
                            wait_for_worker, wait_until_drained, worker_cluster, worker_pid)
from gateways import add_stripe_account


def activity(cluster, pid):
    rows = query(cluster, "postgres",
                 "SELECT backend_type, application_name, datname, state, query, wait_event_type,"
                 "       xact_start, backend_xid, backend_xmin, state_change"
                 "  FROM pg_stat_activity WHERE pid = %s", (pid,))
    if not rows:
        return None
    names = ["backend_type", "application_name", "datname", "state", "query", "wait_event_type",
             "xact_start", "backend_xid", "backend_xmin", "state_change"]
    return dict(zip(names, rows[0]))


def test_launcher_and_worker_in_pg_stat_activity(worker_cluster, shop):
    pid = wait_for_worker(worker_cluster)
    act = wait_for(lambda: (lambda a: a if a and a["state"] == "idle" else None)(activity(worker_cluster, pid)),
                   what="an idle worker")
    assert act["backend_type"] == "crmpay worker"
    assert act["application_name"] == "crmpay worker"
    assert act["datname"] == WORKER_DB
    assert act["query"] == "crmpay worker: waiting for jobs"
    assert act["wait_event_type"] == "Extension"
    launcher = activity(worker_cluster, launcher_pid(worker_cluster))
    assert launcher["backend_type"] == "crmpay launcher" and launcher["datname"] is None
    # a listed database that does not exist gets no worker, and a log line
    assert worker_pid(worker_cluster, SPARE_DB) is None
    log = worker_cluster.server_log()
    assert f'database "{SPARE_DB}" of crmpay.database does not exist' in log
    assert "crmpay worker started for database" in log and "libcurl" in log and "OpenSSL" in log


def test_woken_at_commit_not_by_polling(worker_cluster, shop, stripe):
    pid = wait_for_worker(worker_cluster)

    def settled_idle():
        """Idle, and still the same idle 1.5 s later (the wakes the fixtures'
        commits caused are over; on a loaded machine they can come late)."""
        first = activity(worker_cluster, pid)
        if not first or first["state"] != "idle":
            return None
        time.sleep(1.5)
        again = activity(worker_cluster, pid)
        return again if again and again["state_change"] == first["state_change"] else None

    idle = wait_for(settled_idle, timeout=30, what="a settled idle worker")
    # idle with nothing due, it sleeps: no pass every second
    time.sleep(2.5)
    assert activity(worker_cluster, pid)["state_change"] == idle["state_change"]

    # queued but not committed: the worker does not see it, nor is it woken
    shop.execute("BEGIN")
    request_link(shop, "WAKE-1")
    time.sleep(0.5)
    assert activity(worker_cluster, pid)["state_change"] == idle["state_change"]
    assert stripe.stats()["requests_total"] == 0
    committed = time.monotonic()
    shop.execute("COMMIT")
    wait_for(lambda: payment_row(shop, "WAKE-1")["status"] == "open", timeout=10, interval=0.01,
             what="the link")
    assert time.monotonic() - committed < 1.5, "the worker was not woken by the commit"

    # rolled back: nothing queued, nothing sent
    shop.execute("BEGIN")
    request_link(shop, "WAKE-2")
    shop.execute("ROLLBACK")
    time.sleep(0.3)
    assert payment_row(shop, "WAKE-2") is None and job_rows(shop, "payload->>'order_ref' = 'WAKE-2'") == []
    assert stripe.stats()["requests_total"] == 1


def test_no_transaction_is_open_during_http(worker_cluster, shop, stripe):
    stripe.configure(latency=2.0)
    pid = wait_for_worker(worker_cluster)
    for i in range(3):
        request_link(shop, f"SLOW-{i}")
    wait_for(lambda: stripe.stats()["requests_total"] == 3, timeout=10, what="requests in flight")
    time.sleep(0.2)
    act = activity(worker_cluster, pid)
    assert act["query"] == "crmpay worker: 3 request(s) in flight"
    assert act["xact_start"] is None and act["backend_xid"] is None and act["backend_xmin"] is None
    assert scalar(worker_cluster, "postgres", "SELECT count(*) FROM pg_locks WHERE pid = %s", (pid,)) == 0
    assert wait_until_drained(worker_cluster) == {"done": 3}


def test_sighup_reloads_the_concurrency_cap(worker_cluster, shop, stripe):
    stripe.configure(latency=0.3)
    set_worker_settings(worker_cluster, {"crmpay.max_concurrent_requests": 1})
    for i in range(4):
        request_link(shop, f"ONE-{i}")
    wait_until_drained(worker_cluster)
    times = sorted(r["time"] for r in stripe.requests() if r["path"] == "/v1/checkout/sessions")
    assert len(times) == 4
    assert all(b - a >= 0.28 for a, b in zip(times, times[1:])), f"requests overlapped: {times}"

    stripe.reset()
    stripe.configure(latency=0.3)
    set_worker_settings(worker_cluster, {"crmpay.max_concurrent_requests": 8})
    shop.execute("BEGIN")
    for i in range(4):
        request_link(shop, f"FOUR-{i}")
    shop.execute("COMMIT")
    wait_until_drained(worker_cluster)
    times = sorted(r["time"] for r in stripe.requests() if r["path"] == "/v1/checkout/sessions")
    assert times[-1] - times[0] < 0.25, f"requests were not concurrent: {times}"


def test_per_host_connection_cap(worker_cluster, shop, stripe):
    stripe.configure(latency=0.3)
    set_worker_settings(worker_cluster, {"crmpay.max_concurrent_requests": 8,
                                         "crmpay.max_host_connections": 2})
    shop.execute("BEGIN")
    for i in range(6):
        request_link(shop, f"HOST-{i}")
    shop.execute("COMMIT")
    assert wait_until_drained(worker_cluster) == {"done": 6}
    times = sorted(r["time"] for r in stripe.requests() if r["path"] == "/v1/checkout/sessions")
    assert len(times) == 6
    # never more than two at once at the one gateway host: pairs 0.3 s apart
    assert all(times[i + 2] - times[i] >= 0.25 for i in range(4)), f"more than 2 at once: {times}"
    assert times[-1] - times[0] < 1.2


def test_sigterm_stops_it_and_its_replacement_repeats_no_link(worker_cluster, shop, stripe):
    stripe.configure(latency=1.5)
    pid = wait_for_worker(worker_cluster)
    row = request_link(shop, "TERM-1")
    wait_for(lambda: stripe.stats()["requests_total"] == 1, timeout=10, what="the request in flight")
    stopped = time.monotonic()
    assert scalar(worker_cluster, "postgres", "SELECT pg_terminate_backend(%s)", (pid,))
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or worker_pid(worker_cluster) != pid,
             timeout=5, what="the worker to exit")
    assert time.monotonic() - stopped < 2.0, "the worker did not honour SIGTERM during HTTP"
    new_pid = wait_for_worker(worker_cluster, other_than=pid, timeout=10)
    assert new_pid != pid
    wait_until_drained(worker_cluster)
    paid = payment_row(shop, "TERM-1")
    assert paid["status"] == "open"
    # the interrupted request had reached Stripe, which created the session;
    # the retry carried the same key and got the same session back
    assert stripe_created_per_key(stripe) == {row["idempotency_key"]: 1}
    assert stripe.stats()["requests_total"] >= 2
    assert "claiming again 1 job(s) left running by an earlier worker" in worker_cluster.server_log()


def test_drop_database_of_a_worker(worker_cluster, shop):
    for force in (False, True):
        worker_cluster.create_database(OTHER_DB)
        fresh_extension(worker_cluster, OTHER_DB)
        pid = wait_for_worker(worker_cluster, OTHER_DB)
        launcher = launcher_pid(worker_cluster)
        log_start = len(worker_cluster.server_log())
        started = time.monotonic()
        with worker_cluster.connect() as conn:
            conn.execute(f"DROP DATABASE {OTHER_DB}" + (" WITH (FORCE)" if force else ""))
        assert time.monotonic() - started < 10
        assert not os.path.exists(f"/proc/{pid}/status") or worker_pid(worker_cluster, OTHER_DB) is None
        time.sleep(2.5)
        # no worker tries to come back for the dropped database
        assert worker_pid(worker_cluster, OTHER_DB) is None
        assert launcher_pid(worker_cluster) == launcher
        log = worker_cluster.server_log()[log_start:]
        assert f'stopping the worker of database "{OTHER_DB}"' in log
        assert f'crmpay worker started for database "{OTHER_DB}"' not in log
        assert f'FATAL:  database "{OTHER_DB}" does not exist' not in log
    # and it comes back with the database
    worker_cluster.create_database(OTHER_DB)
    wait_for_worker(worker_cluster, OTHER_DB, timeout=10)
    worker_cluster.drop_database(OTHER_DB)


def test_drop_of_another_database_does_not_wait_for_busy_worker(worker_cluster, shop, stripe):
    stripe.configure(latency=3.0)
    for i in range(4):
        request_link(shop, f"BUSY-{i}")
    wait_for(lambda: stripe.stats()["requests_total"] == 4, timeout=10, what="requests in flight")
    with worker_cluster.connect() as conn:
        conn.execute("CREATE DATABASE crmpay_scratch")
        started = time.monotonic()
        conn.execute("DROP DATABASE crmpay_scratch")
    # DROP DATABASE waits for every backend to absorb a barrier: the busy worker answers at once
    assert time.monotonic() - started < 2.0
    assert wait_until_drained(worker_cluster) == {"done": 4}


def test_drop_extension_while_running(worker_cluster, shop, stripe):
    stripe.configure(latency=1.0)
    pid = wait_for_worker(worker_cluster)
    for i in range(5):
        request_link(shop, f"GONE-{i}")
    wait_for(lambda: stripe.stats()["requests_total"] == 5, timeout=10, what="requests in flight")
    started = time.monotonic()
    shop.execute("DROP EXTENSION crmpay CASCADE")
    assert time.monotonic() - started < 3.0
    time.sleep(2.0)
    # the same worker is alive and idle: nothing to do without crmpay
    assert worker_pid(worker_cluster) == pid
    assert activity(worker_cluster, pid)["state"] == "idle"
    # created again, it serves at once (woken by the first commit)
    stripe.configure(latency=0)
    shop.execute("CREATE EXTENSION crmpay")
    add_stripe_account(shop, stripe.base_url)
    request_link(shop, "BACK-1")
    wait_for(lambda: payment_row(shop, "BACK-1")["status"] == "open", timeout=10, what="the link")
    assert worker_pid(worker_cluster) == pid


def test_worker_exits_when_the_postmaster_dies(make_cluster):
    cluster = make_cluster(settings={"crmpay.database": "postgres"})
    pid = wait_for_worker(cluster, "postgres")
    launcher = launcher_pid(cluster)
    with open(os.path.join(cluster.datadir, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    os.kill(postmaster, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") and not os.path.exists(f"/proc/{launcher}"),
             timeout=10, what="the worker and launcher to exit")


def test_worker_runs_only_on_a_primary(make_cluster, pg_bindir, tls):
    settings = {"crmpay.database": "postgres", "crmpay.ca_file": tls["ca_cert"]}
    primary = make_cluster(settings=settings)
    wait_for_worker(primary, "postgres")

    standby = PgCluster(pg_bindir, settings=settings)
    standby.tmpdir = tempfile.mkdtemp(prefix="crmpay-pg-", dir="/tmp")
    try:
        standby.datadir = os.path.join(standby.tmpdir, "data")
        standby.log_file = os.path.join(standby.tmpdir, "server.log")
        standby.key_file = os.path.join(standby.tmpdir, "master.key")
        shutil.copyfile(primary.key_file, standby.key_file)
        os.chmod(standby.key_file, 0o600)
        give_to_pg(standby.tmpdir)
        standby._run([os.path.join(pg_bindir, "pg_basebackup"), "-D", standby.datadir, "-R",
                      "-h", primary.tmpdir, "-p", str(primary.port), "-U", "postgres", "-X", "stream"])
        standby.port = free_port()
        standby._write_settings()
        standby._start_server()
        wait_for(lambda: scalar(standby, "postgres", "SELECT pg_is_in_recovery()"), what="a standby")
        time.sleep(2.0)
        assert query(standby, "postgres",
                     "SELECT backend_type FROM pg_stat_activity WHERE backend_type LIKE 'crmpay%'") == []
        standby._run([os.path.join(pg_bindir, "pg_ctl"), "-D", standby.datadir, "-w", "promote"])
        wait_for_worker(standby, "postgres", timeout=15)
    finally:
        standby.cleanup()
