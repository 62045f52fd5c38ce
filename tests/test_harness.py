"""Tests of the test harness itself: PgCluster, the private install tree and
the fixtures in conftest.py (not of crmpay's features)."""

import os
import pwd
import re
import signal
import stat
import subprocess
import textwrap
import time

import psycopg
import pytest

from lib.cluster import ClusterError, PgCluster, guc_literal

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PYTHON = "/usr/bin/python3"


def show(cluster, name):
    with cluster.connect() as conn:
        return conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0]


def postmaster_pid(cluster):
    # First line of postmaster.pid is the postmaster's PID.
    with open(os.path.join(cluster.datadir, "postmaster.pid")) as f:
        return int(f.readline())


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists" until reaped; treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_for_file(path, proc, timeout=90):
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"child exited early ({proc.returncode}):\n{out}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("child never started its cluster")
        time.sleep(0.1)


# --------------------------------------------------------------- shared cluster

def test_cluster_preloads_crmpay_with_key_file(pg, tls):
    assert show(pg, "shared_preload_libraries") == "crmpay"
    assert show(pg, "crmpay.key_file") == pg.key_file
    assert show(pg, "crmpay.ca_file") == tls["ca_cert"]
    assert show(pg, "fsync") == "off"
    assert int(show(pg, "port")) == pg.port
    assert show(pg, "unix_socket_directories") == pg.tmpdir
    assert show(pg, "data_directory") == pg.datadir
    assert show(pg, "server_encoding") == "UTF8"
    assert show(pg, "lc_collate") == "C"


def test_key_file_is_32_private_bytes(pg):
    st = os.stat(pg.key_file)
    assert st.st_size == 32
    assert stat.S_IMODE(st.st_mode) == 0o600
    if os.geteuid() == 0:
        assert st.st_uid == pwd.getpwnam("postgres").pw_uid


def test_server_runs_as_postgres_and_logs(pg):
    log_path = os.path.join(pg.tmpdir, "server.log")
    assert os.path.isfile(log_path)
    assert "database system is ready to accept connections" in pg.server_log()
    if os.geteuid() == 0:
        assert os.stat(f"/proc/{postmaster_pid(pg)}").st_uid == pwd.getpwnam("postgres").pw_uid


def test_server_loads_crmpay_from_the_private_tree(pg, pg_bindir):
    tree_lib = os.path.realpath(os.path.join(pg_bindir, "..", "lib"))
    assert tree_lib.startswith("/tmp/"), "tests must not use the system install"
    # The postmaster mapped crmpay.so at preload: it must be the tree's copy.
    with open(f"/proc/{postmaster_pid(pg)}/maps") as f:
        mapped = {line.split()[-1] for line in f if line.rstrip().endswith("/crmpay.so")}
    assert mapped == {os.path.join(tree_lib, "crmpay.so")}
    sharedir = subprocess.run([os.path.join(pg_bindir, "pg_config"), "--sharedir"],
                              stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    assert os.path.isfile(os.path.join(sharedir, "extension", "crmpay.control"))
    with pg.connect() as conn:
        row = conn.execute("SELECT default_version FROM pg_available_extensions"
                           " WHERE name = 'crmpay'").fetchone()
    assert row is not None


def test_psql_returns_stdout_and_raises_on_error(pg):
    assert pg.psql("SELECT 1 + 1") == "2\n"
    assert pg.psql("SELECT 'a'; \\echo b\nSELECT 'c';") == "a\nb\nc\n"
    with pytest.raises(ClusterError, match="division by zero"):
        pg.psql("SELECT 1/0")


def test_create_and_drop_database(pg):
    pg.create_database("harness Mixed-Case")
    assert pg.psql("SELECT 1", dbname="harness Mixed-Case") == "1\n"
    held = pg.connect("harness Mixed-Case")  # FORCE must end this session
    try:
        pg.drop_database("harness Mixed-Case")
    finally:
        held.close()
    assert pg.psql("SELECT count(*) FROM pg_database WHERE datname = 'harness Mixed-Case'") == "0\n"
    pg.drop_database("harness Mixed-Case")  # IF EXISTS: no error


def test_tcp_dsn(pg):
    with psycopg.connect(pg.dsn(tcp=True)) as conn:
        assert conn.execute("SELECT inet_server_addr()::text").fetchone()[0] == "127.0.0.1/32"


def test_db_fixture(db, db_name):
    assert db.autocommit
    assert db.execute("SELECT current_database()").fetchone()[0] == db_name
    assert db.execute("SELECT extname FROM pg_extension WHERE extname = 'crmpay'").fetchone() == ("crmpay",)
    assert db.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]


@pytest.mark.parametrize("variant", ["a-b", "a_b"])
def test_db_name(db_name, variant):
    assert re.fullmatch(r"t_test_db_name_a_b_[0-9a-f]{8}", db_name)


def test_database_names_are_unique_and_valid():
    from conftest import database_name_for

    a = database_name_for("x.py::test_t[a-b]", "test_t[a-b]")
    b = database_name_for("x.py::test_t[a_b]", "test_t[a_b]")
    c = database_name_for("y.py::test_t[a-b]", "test_t[a-b]")
    assert len({a, b, c}) == 3
    long_name = database_name_for("x.py::" + "t" * 200, "t" * 200)
    assert len(long_name.encode()) < 64  # NAMEDATALEN


# ------------------------------------------------------------ private clusters

def test_restart_crash_and_start_again(make_cluster):
    c = make_cluster()
    with c.connect() as conn:
        conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        started = conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
    pid = postmaster_pid(c)

    c.restart()
    with c.connect() as conn:
        assert conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0] > started
    assert postmaster_pid(c) != pid
    assert "received fast shutdown request" in c.server_log()

    with c.connect() as conn:
        conn.execute("INSERT INTO t VALUES (2)")
    c.crash()
    assert not c.is_running()
    with pytest.raises(psycopg.OperationalError):
        c.connect().close()
    c.start_again()
    assert c.is_running()
    with pytest.raises(ClusterError, match="already running"):
        c.start_again()
    assert "automatic recovery in progress" in c.server_log()
    with c.connect() as conn:
        assert conn.execute("SELECT array_agg(x ORDER BY x) FROM t").fetchone()[0] == [1, 2]
    assert show(c, "shared_preload_libraries") == "crmpay"


def test_set_settings_reload_and_quoting(make_cluster):
    c = make_cluster()
    tricky = "it's a \\ test\nline two"
    c.set_settings({"harness.note": tricky, "work_mem": "8MB"})
    assert show(c, "harness.note") == tricky
    assert show(c, "work_mem") == "8MB"
    c.set_settings({"work_mem": None})  # None removes the setting
    assert show(c, "work_mem") == "4MB"
    with pytest.raises(ValueError):
        c.set_settings({"bad name; x": 1})


def test_preload_false(make_cluster):
    c = make_cluster(preload=False)
    assert show(c, "shared_preload_libraries") == ""
    assert show(c, "crmpay.key_file") == c.key_file  # still set, as a placeholder


def test_cleanup_stops_and_removes(make_cluster):
    c = make_cluster()
    pid = postmaster_pid(c)
    tmpdir = c.tmpdir
    c.cleanup()
    assert not os.path.exists(tmpdir)
    assert not pid_alive(pid)
    c.cleanup()  # idempotent


def test_cleanup_after_crash(make_cluster):
    c = make_cluster()
    c.crash()
    c.cleanup()
    assert not os.path.exists(c.tmpdir)


def test_start_failure_shows_server_log(make_cluster):
    c = make_cluster(settings={"shared_buffers": "lots"}, start=False)
    with pytest.raises(ClusterError) as err:
        c.start()
    assert "shared_buffers" in str(err.value)
    assert "server.log" in str(err.value)
    assert not os.path.exists(c.tmpdir)  # a failed start cleans up


def test_context_manager(pg_bindir):
    with PgCluster(pg_bindir) as c:
        assert c.psql("SELECT 42") == "42\n"
        tmpdir = c.tmpdir
    assert not os.path.exists(tmpdir)


def test_guc_literal():
    assert guc_literal(True) == "on"
    assert guc_literal(False) == "off"
    assert guc_literal(10) == "10"
    assert guc_literal("a'b") == "'a''b'"
    assert guc_literal("C:\\x") == "'C:\\\\x'"
    assert guc_literal("1\n2") == "'1\\n2'"


# ------------------------------------------------- cleanup on SIGTERM / SIGINT

CHILD_CONFTEST = """
    # Loads the suite's conftest.py (fixtures and signal handlers) under another
    # module name, so this directory's own 'conftest' does not shadow it.
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("crmpay_suite_conftest", {path!r})
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    globals().update({{k: v for k, v in vars(mod).items() if not k.startswith("__")}})
"""

CHILD_TEST = """
    import os, time

    def test_hangs(make_cluster):
        c = make_cluster()
        with open(os.environ["MARKER"], "w") as f:
            f.write(c.tmpdir + "\\n" + c.datadir)
        time.sleep(120)
"""


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_pytest_run_cleans_up(pg_bindir, tmp_path, signo):
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(CHILD_CONFTEST.format(path=os.path.join(TESTS_DIR, "conftest.py"))))
    (tmp_path / "test_child.py").write_text(textwrap.dedent(CHILD_TEST))
    marker = tmp_path / "marker"
    env = dict(os.environ, CRMPAY_PG_BINDIR=pg_bindir, MARKER=str(marker))
    env.pop("CRMPAY_KEEP_CLUSTERS", None)
    proc = subprocess.Popen(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_file(marker, proc)
        tmpdir, datadir = marker.read_text().split("\n")
        with open(os.path.join(datadir, "postmaster.pid")) as f:
            pid = int(f.readline())
        proc.send_signal(signo)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signo, out
    assert not os.path.exists(tmpdir), out
    assert not pid_alive(pid), out


def test_sigterm_in_plain_script_cleans_up(pg_bindir, tmp_path):
    marker = tmp_path / "marker"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {TESTS_DIR!r})
        from lib.cluster import PgCluster, install_signal_handlers
        install_signal_handlers()
        c = PgCluster({pg_bindir!r}).start()
        with open({str(marker)!r}, "w") as f:
            f.write(c.tmpdir + "\\n" + c.datadir)
        time.sleep(120)
    """)
    env = dict(os.environ)
    env.pop("CRMPAY_KEEP_CLUSTERS", None)
    proc = subprocess.Popen([PYTHON, "-c", script], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_file(marker, proc)
        tmpdir, datadir = marker.read_text().split("\n")
        with open(os.path.join(datadir, "postmaster.pid")) as f:
            pid = int(f.readline())
        proc.terminate()
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert not os.path.exists(tmpdir), out
    assert not pid_alive(pid), out


def test_signal_during_cleanup_is_held_until_cleanup_ends(pg_bindir):
    # SIGTERM arrives in the middle of cleanup(): the cleanup must finish
    # (server stopped, dir removed) and only then SystemExit(143) is raised.
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {TESTS_DIR!r})
        from lib.cluster import PgCluster, install_signal_handlers
        install_signal_handlers()
        c = PgCluster({pg_bindir!r}).start()
        print(c.tmpdir, flush=True)
        real_is_running = c.is_running
        def is_running_then_signal():
            os.kill(os.getpid(), signal.SIGTERM)
            return real_is_running()
        c.is_running = is_running_then_signal
        try:
            c.cleanup()
        except SystemExit:
            print("gone" if not os.path.exists(c.tmpdir) else "still there", flush=True)
            raise
        print("signal lost", flush=True)
    """)
    proc = subprocess.run([PYTHON, "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout
    assert lines[-1] == "gone", proc.stdout
    assert not os.path.exists(lines[0])
