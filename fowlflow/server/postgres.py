"""A throwaway PostgreSQL cluster in a data directory: the stack's backend store.

Debian's ``postgresql`` package provides the binaries; no system service is used. Run as root,
the cluster belongs to the ``postgres`` user (PostgreSQL refuses to run as root), so every
``initdb``/``pg_ctl`` call goes through ``runuser -u postgres --``::

    pg = PostgresServer(cfg, secrets)
    pg.start()            # initdb + create databases on first start, then pg_ctl start
    pg.dump(path)         # plain-SQL pg_dump of the tracking database (backups, leak tests)
    pg.stop()             # fast shutdown of the postmaster it started

Passwords never reach a command line: ``initdb`` reads the role's password from a 0600 file
that is deleted right after, and clients (mlflow server, pg_dump) read it from the 0600
``PGPASSFILE``. The server listens on 127.0.0.1 and a private Unix socket only, and requires
SCRAM passwords for every connection.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
from pathlib import Path

from fowlflow.errors import ServerError
from fowlflow.server.config import (AUTH_DB, DB_USER, TRACKING_DB, Secrets, StackConfig,
                                    _write_private)
from fowlflow.server.procs import Owner, ProcessRecord, log_tail, spawn, stop, wait_until

log = logging.getLogger(__name__)
OS_USER = "postgres"


def pg_bindir() -> Path:
    """The folder with ``initdb``/``pg_ctl``/``pg_dump`` (newest Debian version wins).

    ``FOWLFLOW_PG_BINDIR`` overrides the search.
    """
    override = os.environ.get("FOWLFLOW_PG_BINDIR")
    candidates = [override] if override else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))[::-1]
    if not override and shutil.which("pg_ctl"):
        candidates.append(str(Path(shutil.which("pg_ctl")).resolve().parent))
    for c in candidates:
        if (Path(c) / "pg_ctl").exists():
            return Path(c)
    raise ServerError("PostgreSQL binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin "
                      "or on PATH; install them: apt-get install postgresql (or set "
                      "FOWLFLOW_PG_BINDIR)")


def _running_as_root() -> bool:
    return os.geteuid() == 0


class PostgresServer:
    """The stack's PostgreSQL cluster (one per state directory)."""

    def __init__(self, cfg: StackConfig, secrets: Secrets):
        self.cfg = cfg
        self.secrets = secrets
        self.root = cfg.state_dir / "postgres"
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "run"
        self.log_path = cfg.logs_dir / "postgres.log"
        self.owner = Owner(cfg.marker, "postgres", workdir=str(self.data_dir))
        self.pgpass = cfg.secrets_dir / "pgpass"
        self.port = cfg.ports["postgres"]

    # -- helpers -------------------------------------------------------------------------
    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", OS_USER, "--", *argv] if _running_as_root() else argv

    def _chown(self, path: Path) -> None:
        if _running_as_root():
            pw = pwd.getpwnam(OS_USER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _run(self, argv: list[str], what: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._as_owner(argv), capture_output=True, text=True,
                              start_new_session=True, cwd="/")
        if proc.returncode != 0:
            raise ServerError(f"{what} failed (exit {proc.returncode}): {argv[0]}\n"
                              f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc

    def _check_traversable(self) -> None:
        """As root, the postgres user must be able to reach the data directory."""
        if not _running_as_root():
            return
        uid = pwd.getpwnam(OS_USER).pw_uid
        for parent in self.cfg.state_dir.parents:
            st = parent.stat()
            if st.st_uid != uid and not st.st_mode & stat.S_IXOTH:
                raise ServerError(
                    f"the postgres user can't reach {self.cfg.state_dir}: {parent} has mode "
                    f"{oct(st.st_mode & 0o777)}; choose a state directory under a world-"
                    f"traversable path (e.g. /var/tmp/fowlflow) or run: chmod o+x {parent}")

    def write_pgpass(self) -> None:
        """The 0600 libpq password file clients read (``PGPASSFILE``)."""
        self.cfg.secrets_dir.mkdir(parents=True, exist_ok=True)
        _write_private(self.pgpass,
                       f"{self.cfg.host}:{self.port}:*:{DB_USER}:{self.secrets.db_password}\n")

    def client_env(self) -> dict[str, str]:
        """Environment entries a libpq/psycopg client of this cluster needs."""
        return {"PGPASSFILE": str(self.pgpass)}

    def connect(self, database: str = TRACKING_DB, **kwargs):
        """A psycopg connection to ``database`` (password via the 0600 PGPASSFILE)."""
        import psycopg

        return psycopg.connect(host=self.cfg.host, port=self.port, user=DB_USER,
                               dbname=database, passfile=str(self.pgpass), **kwargs)

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """``initdb`` a new cluster whose superuser ``mlflow`` has the stack's password."""
        self._check_traversable()
        for d in (self.root, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
            self._chown(d)
        pwfile = self.root / ".initdb-pw"
        _write_private(pwfile, self.secrets.db_password + "\n")
        self._chown(pwfile)
        try:
            self._run([str(pg_bindir() / "initdb"), "-D", str(self.data_dir), "-U", DB_USER,
                       f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
                       "--locale=C", "--no-instructions"], "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
        log.info("initialized PostgreSQL cluster in %s", self.data_dir)

    def start(self) -> ProcessRecord:
        """Start the postmaster (initdb first if needed); return its process record."""
        fresh = not self.initialized
        if fresh:
            self.init()
        self.write_pgpass()
        # Why not Popen(postgres): pg_ctl handles a stale postmaster.pid after a crash. Without
        # -l, the postmaster writes to pg_ctl's stdout: the pipe to the rotated log.
        opts = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses={self.cfg.host} "
                "-c unix_socket_permissions=0700")
        argv = [str(pg_bindir() / "pg_ctl"), "-D", str(self.data_dir), "-o", opts, "-w", "-t",
                "60", "start"]
        pg_ctl = spawn(self._as_owner(argv), owner=self.owner, log_path=self.log_path,
                       env=os.environ, cwd=Path("/"), max_bytes=self.cfg.log_max_bytes,
                       backups=self.cfg.log_backups)
        if pg_ctl.wait(timeout=90) != 0:
            raise ServerError(f"pg_ctl start failed (exit {pg_ctl.returncode}); log tail:\n"
                              f"{log_tail(self.log_path)}")
        record = ProcessRecord.of(self.postmaster_pid())
        wait_until(self.healthy, what="PostgreSQL", timeout=30, record=record,
                   log_path=self.log_path)
        if fresh:
            self.create_databases()
        log.info("PostgreSQL on %s:%d (pid %d)", self.cfg.host, self.port, record.pid)
        return record

    def healthy(self) -> bool:
        """The cluster accepts a login and answers a query."""
        import psycopg

        try:
            with self.connect("postgres", connect_timeout=3) as conn:
                return conn.execute("SELECT 1").fetchone() == (1,)
        except psycopg.Error:
            return False

    def postmaster_pid(self) -> int:
        pidfile = self.data_dir / "postmaster.pid"
        try:
            return int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError) as exc:
            raise ServerError(f"PostgreSQL started but {pidfile} is unreadable: {exc}; "
                              f"see {self.log_path}") from exc

    def create_databases(self) -> None:
        with self.connect("postgres", autocommit=True) as conn:
            for db in (TRACKING_DB, AUTH_DB):
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                      (db,)).fetchone()
                if not exists:
                    conn.execute(f'CREATE DATABASE "{db}"')  # names are our constants

    def stop(self, record: ProcessRecord | None) -> bool:
        """Fast shutdown (SIGINT: abort open transactions, checkpoint, exit), then leftovers."""
        return stop(self.owner, record, signal.SIGINT, timeout=60)

    def dump(self, path: Path, database: str = TRACKING_DB) -> Path:
        """Write a plain-SQL ``pg_dump`` of ``database`` to ``path``."""
        env = {**os.environ, **self.client_env()}
        with open(path, "wb") as out:
            proc = subprocess.run([str(pg_bindir() / "pg_dump"), "-h", self.cfg.host, "-p",
                                   str(self.port), "-U", DB_USER, "-d", database, "-w"],
                                  stdout=out, stderr=subprocess.PIPE, env=env)
        if proc.returncode != 0:
            raise ServerError(f"pg_dump of {database} failed: {proc.stderr.decode()[-2000:]}")
        return path
