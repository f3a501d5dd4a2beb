"""Where the stack keeps its state, which ports it uses, and its secrets.

A state directory holds everything, so stopping and starting again keeps all runs, models and
artifacts. Its default (:func:`default_state_dir`) is fixed, so every shell of a user finds
the same server: ``$FOWLFLOW_SERVER_HOME``, else ``~/.fowlflow/server`` (as root
``/var/lib/fowlflow/server``, which the ``postgres`` user can reach)::

    ~/.fowlflow/server/
      ports.json          the ports chosen at first start (reused on every restart)
      state.json          pids of the running servers (pid + process start time)
      secrets/            0700; secrets.json, pgpass, auth.ini (all 0600), seaweedfs-tls/
      postgres/           the PostgreSQL cluster (owned by the postgres user when run as root)
      seaweedfs/          the S3 server's volumes and filer metadata
      logs/               postgres.log, seaweedfs.log, mlflow.log (each rotated, capped)

Secrets are generated once (``secrets.token_urlsafe``) and only ever handed to the servers
through their environment or 0600 files, never on a command line::

    cfg = StackConfig.load(default_state_dir(), mlflow_port=5000)
    secrets = Secrets.load_or_create(cfg.secrets_dir)
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets as _secrets
from pathlib import Path

from fowlflow.errors import ServerError
from fowlflow.server.procs import free_ports, port_free

DEFAULT_PORTS = {"mlflow": 5000, "postgres": 5433, "s3": 8333}
# SeaweedFS `weed mini` runs five services, each with an HTTP and a gRPC port; all are pinned
# so that nothing binds a default port another program (or a second stack) may hold. Its
# maintenance worker dials the admin's gRPC port as admin HTTP port + 10000 whatever
# -admin.port.grpc says, so that pair is always picked with that offset.
SEAWEED_PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                      "s3_grpc", "admin", "admin_grpc")
ADMIN_USERNAME = "admin"
DB_USER = "mlflow"
TRACKING_DB = "mlflow"
AUTH_DB = "mlflow_auth"
GRPC_PORT_OFFSET = 10000
# Every log is rotated at this size and keeps this many old files (40 MB per log at most).
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3


def default_state_dir() -> Path:
    """Where ``fowlflow server`` keeps its state unless told otherwise.

    ``$FOWLFLOW_SERVER_HOME`` if set; else ``~/.fowlflow/server``; as root
    ``/var/lib/fowlflow/server`` (root's home is 0700, and the ``postgres`` user must reach
    the cluster's directory).
    """
    home = os.environ.get("FOWLFLOW_SERVER_HOME")
    if home:
        return Path(home).expanduser().absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/fowlflow/server")
    return Path.home() / ".fowlflow" / "server"


def _free_port_pair(exclude: list[int]) -> tuple[int, int]:
    """A free port P with P + 10000 free too, both below the ephemeral range (32768)."""
    for _ in range(200):
        (port,) = free_ports(1, low=20000, high=32768 - GRPC_PORT_OFFSET, exclude=exclude)
        if port_free(port + GRPC_PORT_OFFSET) and port + GRPC_PORT_OFFSET not in exclude:
            return port, port + GRPC_PORT_OFFSET
    raise ServerError("could not find two free TCP ports 10000 apart in 20000-32767 on "
                      "127.0.0.1; free some ports, or stop other servers")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (0600 from creation on)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


@dataclasses.dataclass(frozen=True)
class Secrets:
    """Credentials of one stack. ``repr`` hides every value so that logs can't leak them."""

    admin_password: str = dataclasses.field(repr=False)
    flask_secret_key: str = dataclasses.field(repr=False)
    db_password: str = dataclasses.field(repr=False)
    s3_access_key: str = dataclasses.field(repr=False)
    s3_secret_key: str = dataclasses.field(repr=False)
    admin_username: str = ADMIN_USERNAME

    @classmethod
    def load_or_create(cls, secrets_dir: Path) -> Secrets:
        """Read ``secrets.json``, creating it (0600, in a 0700 folder) on first use.

        ``MLFLOW_AUTH_ADMIN_PASSWORD``, if set at first start, becomes the admin password;
        otherwise a random one is generated (read it from ``secrets/admin_password``).
        """
        path = secrets_dir / "secrets.json"
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise ServerError(f"{path} has mode {oct(mode)}, readable by others; "
                                  f"run: chmod 600 {path}")
            return cls(**json.loads(path.read_text()))
        secrets_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(secrets_dir, 0o700)
        token = _secrets.token_urlsafe
        made = cls(admin_password=os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") or token(18),
                   flask_secret_key=token(32), db_password=token(18),
                   s3_access_key="fowlflow" + _secrets.token_hex(6), s3_secret_key=token(30))
        _write_private(path, json.dumps(dataclasses.asdict(made), indent=1))
        # A one-value file so that a shell can do MLFLOW_TRACKING_PASSWORD=$(cat ...).
        _write_private(secrets_dir / "admin_password", made.admin_password + "\n")
        return made

    def values(self) -> list[str]:
        """Every secret value (for leak searches)."""
        return [self.admin_password, self.flask_secret_key, self.db_password, self.s3_secret_key]


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """The stack's state directory, bind address and ports."""

    state_dir: Path
    ports: dict
    host: str = "127.0.0.1"
    bucket: str = "mlflow"
    workers: int = 2
    # Seconds a verified login is cached per worker (0: a PBKDF2 check on every request).
    auth_cache_ttl_s: int = 30
    log_max_bytes: int = LOG_MAX_BYTES
    log_backups: int = LOG_BACKUPS

    @classmethod
    def load(cls, state_dir: Path, *, mlflow_port: int | None = None,
             postgres_port: int | None = None, s3_port: int | None = None,
             workers: int = 2, auth_cache_ttl_s: int = 30,
             log_max_bytes: int = LOG_MAX_BYTES, log_backups: int = LOG_BACKUPS,
             pick_free: bool = False) -> StackConfig:
        """The config of the stack in ``state_dir``: ports from ``ports.json`` if it exists.

        Explicit ports override the recorded ones (and are recorded by :meth:`save`).
        Unrecorded ports take the defaults (5000, 5433, 8333), or, with ``pick_free``, random
        free ports (tests, benchmarks). SeaweedFS's internal ports are always picked free once,
        then kept.

        Args:
            state_dir: the stack's directory (created on save/start).
            mlflow_port: port of the tracking server.
            postgres_port: port of PostgreSQL.
            s3_port: port of the S3 API.
            workers: mlflow server worker processes.
            auth_cache_ttl_s: seconds a verified login is cached (0: off).
            log_max_bytes: size at which each log is rotated.
            log_backups: rotated files kept per log.
            pick_free: choose free ports instead of the defaults for unrecorded ones.

        Returns:
            The config (not yet saved).
        """
        state_dir = Path(state_dir).absolute()
        ports_file = state_dir / "ports.json"
        ports = json.loads(ports_file.read_text()) if ports_file.exists() else {}
        wanted = {"mlflow": mlflow_port, "postgres": postgres_port, "s3": s3_port}
        ports.update({k: v for k, v in wanted.items() if v is not None})
        if ports.get("admin_grpc") != ports.get("admin", -1) + GRPC_PORT_OFFSET:
            ports.pop("admin", None)
            ports.pop("admin_grpc", None)
            ports["admin"], ports["admin_grpc"] = _free_port_pair(list(ports.values()))
        missing = [k for k in (*DEFAULT_PORTS, *SEAWEED_PORT_NAMES) if k not in ports]
        if missing:
            if not pick_free:
                for k in DEFAULT_PORTS:
                    ports.setdefault(k, DEFAULT_PORTS[k])
            still = [k for k in missing if k not in ports]
            picked = free_ports(len(still), exclude=list(ports.values()))
            ports.update(zip(still, picked))
        return cls(state_dir=state_dir, ports=ports, workers=workers,
                   auth_cache_ttl_s=auth_cache_ttl_s, log_max_bytes=log_max_bytes,
                   log_backups=log_backups)

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "ports.json").write_text(json.dumps(self.ports, indent=1) + "\n")

    @property
    def marker(self) -> str:
        """The value of ``FOWLFLOW_SERVER_STATE`` in every process of this stack."""
        return str(self.state_dir)

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.ports['mlflow']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.ports['s3']}"

    def db_uri(self, database: str = TRACKING_DB) -> str:
        """SQLAlchemy URI without a password: libpq reads it from the 0600 PGPASSFILE."""
        return (f"postgresql+psycopg://{DB_USER}@{self.host}:{self.ports['postgres']}"
                f"/{database}")
