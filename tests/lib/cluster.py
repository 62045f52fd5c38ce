"""Throwaway PostgreSQL clusters for crmpay's integration tests.

A ``PgCluster`` is a private PostgreSQL instance in its own temp dir under
/tmp, run as the ``postgres`` OS user (PostgreSQL refuses to run as root; when
the tests do not run as root, the current user runs it instead). It listens on
a free TCP port on 127.0.0.1 and on a unix socket in its temp dir, preloads
crmpay and gives it a fresh 32-byte master key file.

    from lib.cluster import PgCluster
    c = PgCluster(bindir, {"crmpay.ca_file": "/tmp/x/ca.pem"}).start()
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION crmpay")
    c.cleanup()

Every started cluster registers ``cleanup()`` with atexit, so it is stopped
and removed when the interpreter exits normally or through SystemExit (see
``install_signal_handlers`` for SIGTERM/SIGINT). Set CRMPAY_KEEP_CLUSTERS=1 to
keep the temp dirs (servers are still stopped) for a post-mortem.
"""

import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

PG_OS_USER = "postgres"

# Name of the file (in the data dir) holding the harness's settings; it is
# included from postgresql.conf, so it wins over initdb's defaults.
SETTINGS_FILE = "crmpay_test.conf"

# A GUC name: identifiers separated by dots (custom GUCs like crmpay.key_file).
_GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)*$")

# Server-log phrases meaning "someone else took our port between our probe and
# the server's bind": worth a retry on another port.
_PORT_TAKEN = ("could not bind", "Address already in use", "could not create any TCP/IP sockets")


class ClusterError(RuntimeError):
    """A cluster operation failed; the message carries the relevant output."""


def free_port(host="127.0.0.1"):
    """A TCP port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def guc_literal(value):
    """``value`` written as a postgresql.conf value.

    bools become on/off, numbers stay bare, anything else (str, Path, ...) is a
    single-quoted string: quotes doubled, and backslashes and line breaks
    escaped, since the config-file lexer processes backslash escapes in quoted
    strings and does not allow raw newlines in them.
    """
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    s = str(value)
    s = s.replace("\\", "\\\\").replace("'", "''").replace("\n", "\\n").replace("\r", "\\r")
    return "'" + s + "'"


def _running_as_root():
    return os.geteuid() == 0


def _pg_ids():
    """(uid, gid) of the user that owns and runs the clusters."""
    if _running_as_root():
        pw = pwd.getpwnam(PG_OS_USER)
        return pw.pw_uid, pw.pw_gid
    return os.geteuid(), os.getegid()


def give_to_pg(path):
    """Hand ``path`` (a file or a whole tree) to the user that runs the servers."""
    uid, gid = _pg_ids()
    if not _running_as_root():
        return  # we are that user already
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _clean_env():
    """The environment for PostgreSQL commands: ours minus libpq's PG* variables,
    which could point psql or pg_ctl at some other server or change its options."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


_signal_handlers_installed = False
_fire_signal = None     # set by install_signal_handlers: raises for a signal number
_cleanup_depth = 0      # > 0 while some PgCluster.cleanup() runs
_deferred_signals = []  # signals that arrived during a cleanup


def install_signal_handlers(on_signal=None):
    """Make SIGTERM and SIGINT end the program through an exception, so that
    ``finally`` blocks, fixture finalizers and atexit handlers (which stop and
    remove the clusters) run. By default the exception is SystemExit(128+signo);
    ``on_signal(signum)`` may raise something else instead (conftest.py uses
    pytest.exit, because pytest reports a SystemExit raised inside a test as a
    mere test failure and carries on).

    A signal arriving while a cleanup() runs is held until that cleanup has
    finished, so a cluster is never left half-removed; signals after the
    first are ignored (the program is already on its way out). Idempotent;
    does nothing outside the main thread."""
    global _signal_handlers_installed, _fire_signal
    if _signal_handlers_installed:
        return
    if threading.current_thread() is not threading.main_thread():
        return
    fired = []

    def fire(signum):
        fired.append(signum)
        if on_signal is not None:
            on_signal(signum)
        raise SystemExit(128 + signum)

    def handler(signum, frame):
        if fired or _deferred_signals:
            return  # already shutting down: let the cleanup finish
        if _cleanup_depth > 0:
            _deferred_signals.append(signum)  # raised when the cleanup ends
            return
        fire(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    _fire_signal = fire
    _signal_handlers_installed = True


class PgCluster:
    """A throwaway PostgreSQL cluster (see the module docstring).

    Attributes set by start(): ``tmpdir`` (the temp dir), ``datadir``
    (tmpdir/data), ``key_file`` (tmpdir/master.key), ``port``; the unix socket
    lives in ``tmpdir`` and the server log is ``tmpdir/server.log``.
    """

    def __init__(self, bindir, settings=None, preload=True):
        self.bindir = str(bindir)
        self.settings = dict(settings or {})
        self.preload = preload
        self.tmpdir = None
        self.datadir = None
        self.key_file = None
        self.log_file = None
        self.port = None
        self._cleaned = False
        for name in self.settings:
            self._check_guc_name(name)

    # ----------------------------------------------------------------- helpers

    def __repr__(self):
        return f"<PgCluster port={self.port} tmpdir={self.tmpdir}>"

    def __enter__(self):
        if self.tmpdir is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.cleanup()

    @staticmethod
    def _check_guc_name(name):
        if not _GUC_NAME.match(name):
            raise ValueError(f"not a valid setting name: {name!r}")

    def _bin(self, program):
        return os.path.join(self.bindir, program)

    def _run(self, argv, check=True, input=None, timeout=120):
        """Run a PostgreSQL program as the cluster's OS user, in the temp dir
        (that user may not be allowed into our cwd). Returns CompletedProcess;
        with check=True a non-zero exit raises ClusterError with its output."""
        if _running_as_root():
            argv = ["runuser", "-u", PG_OS_USER, "--"] + list(argv)
        proc = subprocess.run(
            argv,
            input=input,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.tmpdir or "/tmp",
            env=_clean_env(),
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"{' '.join(argv)} exited with {proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout}--- stderr ---\n{proc.stderr}"
            )
        return proc

    def _require_started(self):
        if self.tmpdir is None or self._cleaned:
            raise ClusterError("cluster not started (or already cleaned up)")

    def _log_tail(self, lines=40, since=0):
        """The last ``lines`` lines of the server log, from byte ``since`` on."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(since)
                text = f.read().decode("utf-8", "replace")
        except (OSError, TypeError):
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def _log_size(self):
        try:
            return os.path.getsize(self.log_file)
        except OSError:
            return 0

    def _effective_settings(self):
        """The harness's base settings, then the caller's (which may override them)."""
        base = {
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            "unix_socket_directories": self.tmpdir,
            "crmpay.key_file": self.key_file,
            "fsync": False,
        }
        if self.preload:
            base["shared_preload_libraries"] = "crmpay"
        base.update(self.settings)
        return base

    def _write_settings(self):
        lines = ["# written by tests/lib/cluster.py; rewritten by set_settings()"]
        for name, value in self._effective_settings().items():
            if value is None:
                continue
            lines.append(f"{name} = {guc_literal(value)}")
        path = os.path.join(self.datadir, SETTINGS_FILE)
        tmp = path + ".new"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        give_to_pg(tmp)
        os.replace(tmp, path)  # atomic: a concurrent reload never sees half a file

    # --------------------------------------------------------------- lifecycle

    def start(self):
        """Create, initdb and start the cluster. Returns self.

        Raises ClusterError (with the server log's tail) when the server does
        not come up; the temp dir is then removed."""
        if self.tmpdir is not None:
            raise ClusterError("start() may be called once; use start_again() after stop()/crash()")
        self.tmpdir = tempfile.mkdtemp(prefix="crmpay-pg-", dir="/tmp")
        atexit.register(self.cleanup)
        try:
            self.datadir = os.path.join(self.tmpdir, "data")
            self.log_file = os.path.join(self.tmpdir, "server.log")
            self.key_file = os.path.join(self.tmpdir, "master.key")
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
            give_to_pg(self.tmpdir)  # the dir and the key file

            self._run([
                self._bin("initdb"), "-D", self.datadir, "-U", PG_OS_USER,
                "-A", "trust", "-E", "UTF8", "--locale=C",
                "--no-sync",          # throwaway cluster: skip the fsyncs
                "--no-instructions",
            ])
            with open(os.path.join(self.datadir, "postgresql.conf"), "a") as f:
                f.write(f"\ninclude '{SETTINGS_FILE}'\n")
            self.port = int(self.settings["port"]) if "port" in self.settings else free_port()
            self._write_settings()
            self._start_server()
        except BaseException:
            self.cleanup()
            raise
        return self

    def _start_server(self):
        """pg_ctl start -w; on a lost race for the port, retry on a new one."""
        for attempt in range(3):
            offset = self._log_size()
            proc = self._run([
                self._bin("pg_ctl"), "-D", self.datadir, "-l", self.log_file,
                "-w", "-t", "60", "start",
            ], check=False)
            if proc.returncode == 0:
                return
            tail = self._log_tail(since=offset)
            if "port" not in self.settings and any(p in tail for p in _PORT_TAKEN) and attempt < 2:
                self.port = free_port()
                self._write_settings()
                continue
            raise ClusterError(
                f"PostgreSQL did not start in {self.tmpdir} (pg_ctl exit {proc.returncode})\n"
                f"{proc.stdout}{proc.stderr}"
                f"--- tail of {self.log_file} ---\n{tail}"
            )

    def is_running(self):
        """True when a postmaster runs on the data dir (pg_ctl status)."""
        if self.datadir is None or not os.path.isdir(self.datadir):
            return False
        return self._run([self._bin("pg_ctl"), "-D", self.datadir, "status"], check=False).returncode == 0

    def stop(self, mode="fast"):
        """pg_ctl stop -m MODE (smart, fast or immediate) and wait for it."""
        self._require_started()
        if not self.is_running():
            return
        self._run([self._bin("pg_ctl"), "-D", self.datadir, "-m", mode, "-w", "-t", "60", "stop"])

    def crash(self):
        """Simulate a crash: immediate shutdown, no checkpoint; the next start recovers."""
        self.stop(mode="immediate")

    def start_again(self):
        """Start the existing data dir again after stop() or crash()."""
        self._require_started()
        if self.is_running():
            raise ClusterError("the cluster is already running")
        self._start_server()

    def restart(self):
        """Fast stop, then start again (same data dir and settings)."""
        self.stop()
        self.start_again()

    def reload(self, timeout=15):
        """pg_ctl reload, and wait until the postmaster has re-read the config
        (new connections then see the new values)."""
        self._require_started()
        before = self._conf_load_time()
        self._run([self._bin("pg_ctl"), "-D", self.datadir, "reload"])
        deadline = time.monotonic() + timeout
        while self._conf_load_time() == before:
            if time.monotonic() > deadline:
                raise ClusterError(
                    "the server did not reload its configuration (an invalid setting?)\n"
                    f"--- tail of {self.log_file} ---\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def _conf_load_time(self):
        with self.connect() as conn:
            return conn.execute("SELECT pg_conf_load_time()").fetchone()[0]

    def set_settings(self, settings):
        """Merge ``settings`` into the cluster's settings (a value of None
        removes one), rewrite the settings file and reload if running.
        Settings that need a restart take effect at the next restart()."""
        self._require_started()
        for name, value in settings.items():
            self._check_guc_name(name)
            if value is None:
                self.settings.pop(name, None)
            else:
                self.settings[name] = value
        self._write_settings()
        if self.is_running():
            self.reload()

    def cleanup(self):
        """Stop the server if it runs and remove the temp dir. Idempotent.
        Raises only to deliver a SIGTERM/SIGINT that arrived meanwhile (see
        install_signal_handlers); errors are ignored (it also runs from atexit)."""
        global _cleanup_depth
        if self.tmpdir is None or self._cleaned:
            return
        self._cleaned = True
        _cleanup_depth += 1  # hold SIGTERM/SIGINT until the cluster is gone
        try:
            if self.is_running():
                proc = self._run([self._bin("pg_ctl"), "-D", self.datadir, "-m", "fast",
                                  "-w", "-t", "30", "stop"], check=False)
                if proc.returncode != 0:
                    self._run([self._bin("pg_ctl"), "-D", self.datadir, "-m", "immediate",
                               "-w", "-t", "30", "stop"], check=False)
        except Exception:
            pass
        finally:
            if not os.environ.get("CRMPAY_KEEP_CLUSTERS"):
                shutil.rmtree(self.tmpdir, ignore_errors=True)
            atexit.unregister(self.cleanup)
            _cleanup_depth -= 1
            if _cleanup_depth == 0 and _deferred_signals and _fire_signal is not None:
                _fire_signal(_deferred_signals.pop())  # raises

    # ------------------------------------------------------------------ access

    def dsn(self, dbname="postgres", user="postgres", tcp=False):
        """libpq connection string: through the unix socket in tmpdir, or over
        TCP on 127.0.0.1 with tcp=True."""
        self._require_started()
        host = "127.0.0.1" if tcp else self.tmpdir
        return make_conninfo(host=host, port=str(self.port), dbname=dbname, user=user,
                             connect_timeout="10")

    def connect(self, dbname="postgres", user="postgres", autocommit=True, **kwargs):
        """A psycopg 3 connection (through the unix socket)."""
        return psycopg.connect(self.dsn(dbname, user), autocommit=autocommit, **kwargs)

    def psql(self, sql_text, dbname="postgres", user="postgres", args=()):
        """Run ``sql_text`` (may hold several statements and psql meta-commands)
        with psql as the cluster's OS user; return its stdout. Output is
        unaligned, tuples only (-At), quiet; stops at the first error and raises
        ClusterError. ``args`` are extra psql options."""
        self._require_started()
        proc = self._run([
            self._bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", self.tmpdir, "-p", str(self.port), "-U", user, "-d", dbname,
            *args, "-f", "-",
        ], input=sql_text)
        return proc.stdout

    def create_database(self, name):
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name):
        """DROP DATABASE IF EXISTS ... WITH (FORCE): ends its sessions first."""
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def server_log(self):
        """The whole server log as text."""
        self._require_started()
        try:
            with open(self.log_file, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
