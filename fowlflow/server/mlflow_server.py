"""``mlflow server --app-name basic-auth``: PostgreSQL store, artifacts proxied to S3.

Clients talk only to this server (``MLFLOW_TRACKING_URI`` + username/password); they never need
S3 or database credentials, because ``--serve-artifacts`` streams artifacts through it into
``s3://<bucket>/artifacts``::

    srv = MlflowServer(cfg, secrets, pg_env=pg.client_env(), s3_env=s3.s3_env())
    record = srv.start()
    srv.stop(record)

What the server needs but must not show on its command line comes through its environment or
0600 files: the Flask secret key (``MLFLOW_FLASK_SERVER_SECRET_KEY``), the admin password for
the first bootstrap (``MLFLOW_AUTH_ADMIN_PASSWORD``), the database password (libpq's
``PGPASSFILE``; the store URIs carry no password) and the S3 keys (``AWS_*``). The basic-auth
config file (``MLFLOW_AUTH_CONFIG_PATH``) is 0600 and holds no secret either.
"""

from __future__ import annotations

import configparser
import logging
import os
import signal
import sys
from pathlib import Path

from fowlflow.server.config import AUTH_DB, Secrets, StackConfig, _write_private
from fowlflow.server.procs import (Owner, ProcessRecord, http_status, spawn, stop,
                                   wait_until)

log = logging.getLogger(__name__)

# What `fowlflow server env` exports for clients (MLflow's own variables). urllib3 waits
# 0, 2, 4, 8, 16, 32, 64, 120, 120, 120 s (+ up to 1 s jitter each) before the 10 retries,
# so a request keeps trying for about 8 minutes: a restart or an outage of 5 minutes is
# ridden out (tests/server/test_outage.py: 8 clients through a real outage, and the retry
# schedule these values give). 10 is MLflow's maximum number of retries.
CLIENT_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10",
                    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "120"}
AUTH_HOOK = "fowlflow.server.auth_hook:authenticate"
# Failed logins of one username from one address (per worker) before HTTP 429, and the window:
# the [fowlflow] section of auth.ini, written with these defaults at the first start; an
# admin's edits there are kept by later starts.
MAX_FAILED_LOGINS = 5
FAILED_LOGIN_WINDOW_S = 60
# Variables of the caller that must not leak into the server (a client's own login would
# otherwise be sent by the server's internal clients, and a stray tracking URI is confusing).
_DROP_FROM_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                  "MLFLOW_TRACKING_TOKEN", "MLFLOW_AUTH_CONFIG_PATH", "PGPASSWORD")


def auth_ini(cfg: StackConfig, secrets: Secrets, throttle: dict | None = None) -> str:
    """The basic-auth config: users and permissions live in their own PostgreSQL database.

    ``default_permission = READ``: on a team server everyone may browse every experiment and
    model; whoever creates an experiment or model gets MANAGE on it, and writing into anyone
    else's needs a grant (EDIT) from its owner or the admin. The authorization function is
    fowlflow's hook (MLflow's password check + throttling, the read-only role, attribution);
    its ``[fowlflow]`` section (``throttle``; default the constants above) sets the
    failed-login throttle.
    """
    throttle = {"max_failed_logins": MAX_FAILED_LOGINS,
                "failed_login_window_seconds": FAILED_LOGIN_WINDOW_S, **(throttle or {})}
    return ("[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {cfg.db_uri(AUTH_DB)}\n"
            f"admin_username = {secrets.admin_username}\n"
            f"authorization_function = {AUTH_HOOK}\n"
            # Each request otherwise pays a PBKDF2 hash of the password (tens of ms of CPU);
            # a changed password is honoured by every worker at most this long after.
            f"auth_cache_ttl_seconds = {cfg.auth_cache_ttl_s}\n"
            "\n[fowlflow]\n" + "".join(f"{k} = {v}\n" for k, v in throttle.items()))


def _kept_throttle(path: Path) -> dict:
    """The ``[fowlflow]`` settings of an existing auth.ini (an admin may have edited them)."""
    ini = configparser.ConfigParser()
    ini.read(path)
    return dict(ini["fowlflow"]) if ini.has_section("fowlflow") else {}


def server_argv(cfg: StackConfig) -> list[str]:
    """The ``mlflow server`` command line (pure; no secrets in it)."""
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", cfg.db_uri(),
            "--artifacts-destination", f"s3://{cfg.bucket}/artifacts",
            "--serve-artifacts",
            "--host", cfg.host, "--port", str(cfg.ports["mlflow"]),
            "--workers", str(cfg.workers),
            "--app-name", "basic-auth"]


class MlflowServer:
    """The stack's tracking server."""

    def __init__(self, cfg: StackConfig, secrets: Secrets, *, pg_env: dict, s3_env: dict):
        self.cfg = cfg
        self.secrets = secrets
        self.pg_env = pg_env
        self.s3_env = s3_env
        self.log_path = cfg.logs_dir / "mlflow.log"
        self.owner = Owner(cfg.marker, "mlflow")
        self.auth_config = cfg.secrets_dir / "auth.ini"

    def env(self) -> dict[str, str]:
        # The caller's own AWS settings (profile, session token, endpoint) would point the
        # artifact store elsewhere: the stack's S3 settings replace all of them.
        env = {k: v for k, v in os.environ.items()
               if k not in _DROP_FROM_ENV and not k.startswith("AWS_")}
        env.update(self.pg_env)
        env.update(self.s3_env)
        env.update({
            "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.secrets.admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secrets.flask_secret_key,
            # Background job runners (huey) are for GenAI features; on a small machine they
            # only cost CPU and memory.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def start(self) -> ProcessRecord:
        self.cfg.secrets_dir.mkdir(parents=True, exist_ok=True)
        _write_private(self.auth_config, auth_ini(self.cfg, self.secrets,
                                                  _kept_throttle(self.auth_config)))
        proc = spawn(server_argv(self.cfg), owner=self.owner, log_path=self.log_path,
                     env=self.env(), cwd=self.cfg.state_dir, max_bytes=self.cfg.log_max_bytes,
                     backups=self.cfg.log_backups)
        record = ProcessRecord.of(proc.pid)
        # First start migrates two empty databases: allow for a slow, shared CPU.
        wait_until(self.healthy,
                   what="mlflow server", timeout=180, record=record, log_path=self.log_path,
                   interval=0.5)
        log.info("mlflow server on %s (pid %d)", self.cfg.tracking_uri, record.pid)
        return record

    def healthy(self) -> bool:
        return http_status(self.cfg.tracking_uri + "/health") == 200

    def stop(self, record: ProcessRecord | None) -> bool:
        # `mlflow server` forwards SIGTERM to uvicorn, which drains its workers.
        return stop(self.owner, record, signal.SIGTERM, timeout=30)
