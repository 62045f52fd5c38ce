"""pytest configuration and shared fixtures for crmpay's integration tests.

Run through ``bash tests/run_all.sh integration`` (or ``make test``), or
directly with Debian's Python:

    CRMPAY_PG_BINDIR=$(bash tests/lib/pgtree.sh) /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/

Fixtures:
  pg_bindir     (session)  bin dir of the private install tree ($CRMPAY_PG_BINDIR,
                           else built by tests/lib/pgtree.sh)
  tls           (session)  test CA + server cert from doubles/tlsca.py, in a
                           temp dir the postgres user can read:
                           {"ca_cert", "server_cert", "server_key", "wrong_ca_cert"}
  pg            (session)  a started PgCluster (crmpay preloaded,
                           crmpay.ca_file = tls["ca_cert"]), shared by all tests:
                           do not crash/restart it or change its settings for
                           good; use make_cluster for that
  db_name       (function) the database name for the current test
  db            (function) a fresh database db_name on pg with CREATE EXTENSION
                           crmpay done; yields an autocommit psycopg connection
                           as superuser; dropped afterwards
  make_cluster  (function) factory for private clusters:
                           make_cluster(settings=None, preload=True, start=True)
                           -> PgCluster (crmpay.ca_file preset), cleaned up
                           after the test
"""

import atexit
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent

# Let tests import the harness and the gateway doubles:
#   from lib.cluster import PgCluster
#   from doubles.stripe_double import StripeDouble
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from lib.cluster import PgCluster, install_signal_handlers  # noqa: E402


def _exit_on_signal(signum):
    # pytest.exit raises pytest's Exit, which pytest lets through the test
    # (a plain SystemExit inside a test would just fail that test), stops the
    # session and then runs every fixture finalizer; atexit is the backstop.
    pytest.exit(f"interrupted by signal {signum}: cleaning up clusters", returncode=128 + signum)


# SIGTERM (CI's timeout, `timeout`, kill) and SIGINT (Ctrl-C) must still stop
# and remove the clusters, which run in their own sessions (pg_ctl setsid()s
# the postmaster) and so would outlive us.
install_signal_handlers(_exit_on_signal)


@pytest.fixture(scope="session")
def pg_bindir():
    """Bin dir of the private PostgreSQL tree holding this checkout's crmpay."""
    bindir = os.environ.get("CRMPAY_PG_BINDIR")
    if not bindir:
        # pgtree.sh prints the bin dir on stdout and its progress on stderr.
        proc = subprocess.run(["bash", str(TESTS_DIR / "lib" / "pgtree.sh")],
                              stdout=subprocess.PIPE, text=True, check=True)
        bindir = proc.stdout.strip().splitlines()[-1]
    if not os.path.isfile(os.path.join(bindir, "postgres")):
        pytest.fail(f"no postgres binary in {bindir}")
    return bindir


@pytest.fixture(scope="session")
def tls():
    """A throwaway CA and a server cert for 127.0.0.1/localhost (plus an
    unrelated CA), in a temp dir under /tmp that the postgres user can read."""
    from doubles.tlsca import make_ca_and_server_cert

    directory = tempfile.mkdtemp(prefix="crmpay-tls-", dir="/tmp")
    atexit.register(shutil.rmtree, directory, True)  # backstop if teardown is skipped
    os.chmod(directory, 0o755)
    paths = make_ca_and_server_cert(directory)
    # The server (as postgres) reads the CA certs; keep the dir traversable
    # and the certs readable whatever tlsca does about modes.
    for key in ("ca_cert", "server_cert", "wrong_ca_cert"):
        os.chmod(paths[key], 0o644)
    yield paths
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def stripe_double(tls):
    """The Stripe double with the suite's key and webhook secret, shared by
    a module's tests (each resets it as it needs)."""
    from doubles.stripe_double import StripeDouble
    from gateways import STRIPE_KEY, STRIPE_WHSEC

    with StripeDouble(api_keys={STRIPE_KEY}, webhook_secret=STRIPE_WHSEC,
                      certfile=tls["server_cert"], keyfile=tls["server_key"]) as double:
        yield double


@pytest.fixture(scope="session")
def pg(pg_bindir, tls):
    """The session's shared cluster: crmpay preloaded, trusting the test CA."""
    cluster = PgCluster(pg_bindir, settings={"crmpay.ca_file": tls["ca_cert"]})
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


def database_name_for(nodeid, name):
    """A valid, unique database name for a test: 't_' + the test's name
    (lowercased, non-alphanumerics as '_', cut short) + 8 hex of its node id,
    so parametrized and same-named tests in different files do not clash."""
    base = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")[:40]
    digest = hashlib.md5(nodeid.encode()).hexdigest()[:8]
    return f"t_{base}_{digest}"


@pytest.fixture
def db_name(request):
    """The name of the current test's database (see database_name_for)."""
    return database_name_for(request.node.nodeid, request.node.name)


@pytest.fixture
def db(pg, db_name):
    """A fresh database with crmpay created; an autocommit superuser connection to it."""
    pg.drop_database(db_name)  # in case a previous test of the same name left it
    pg.create_database(db_name)
    conn = None
    try:
        conn = pg.connect(db_name)
        conn.execute("CREATE EXTENSION crmpay")
        yield conn
    finally:
        if conn is not None:
            conn.close()
        pg.drop_database(db_name)


@pytest.fixture
def make_cluster(pg_bindir, tls):
    """Factory for private clusters (for restarts, crashes, special settings).
    Every cluster it makes is cleaned up after the test."""
    made = []

    def factory(settings=None, preload=True, start=True):
        merged = {"crmpay.ca_file": tls["ca_cert"]}
        merged.update(settings or {})
        cluster = PgCluster(pg_bindir, settings=merged, preload=preload)
        made.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield factory
    for cluster in made:
        cluster.cleanup()
