"""Authentication and authorization on the team server, and secrets that never leak."""

from __future__ import annotations

import subprocess

import pytest
import requests

from tests.conftest import BIN
from tests.local_user import as_user, ensure_local_user
from tests.server.conftest import admin_login, client_env, fowlflow

API = "/api/2.0/mlflow"


@pytest.fixture(scope="module")
def owned(stack, admin, reader):
    """An experiment, a run and a registered model of the admin; ``reader`` gets READ on them."""
    with admin_login(stack) as client:
        exp_id = client.create_experiment("security-owned")
        run = client.create_run(exp_id)
        client.log_metric(run.info.run_id, "loss", 1.0, step=0)
        client.create_registered_model("security-model")
    admin.grant(reader[0], "experiment", exp_id, "READ")
    admin.grant(reader[0], "registered_model", "security-model", "READ")
    return {"experiment_id": exp_id, "run_id": run.info.run_id, "model": "security-model"}


@pytest.fixture
def as_reader(stack, reader, monkeypatch):
    """An ``MlflowClient(tracking_uri)`` logged in as ``reader`` for this test."""
    from mlflow import MlflowClient

    for k, v in client_env(stack, *reader).items():
        monkeypatch.setenv(k, v)
    return MlflowClient(stack.cfg.tracking_uri)


@pytest.mark.parametrize("method,path", [
    ("GET", f"{API}/experiments/search?max_results=1"),
    ("POST", f"{API}/runs/create"),
    ("POST", f"{API}/registered-models/create"),
    ("GET", "/api/2.0/mlflow-artifacts/artifacts"),
    ("GET", "/"),                       # the UI itself
])
def test_requests_without_credentials_are_refused(stack, method, path):
    resp = requests.request(method, stack.cfg.tracking_uri + path, json={}, timeout=30)
    assert resp.status_code == 401, (path, resp.status_code, resp.text[:200])
    assert resp.headers.get("WWW-Authenticate", "").startswith("Basic")


@pytest.mark.parametrize("user,password", [("admin", "wrong-password"), ("nobody", "x" * 16)])
def test_wrong_credentials_are_refused(stack, user, password):
    resp = requests.get(f"{stack.cfg.tracking_uri}{API}/experiments/search",
                        params={"max_results": 1}, auth=(user, password), timeout=30)
    assert resp.status_code == 401


def _denied(call, *args, **kwargs) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as info:
        call(*args, **kwargs)
    assert info.value.get_http_status_code() == 403, info.value
    assert info.value.error_code == "PERMISSION_DENIED", info.value


def test_reader_can_read(owned, as_reader):
    assert as_reader.get_experiment(owned["experiment_id"]).name == "security-owned"
    assert as_reader.get_run(owned["run_id"]).data.metrics["loss"] == 1.0
    assert as_reader.get_registered_model(owned["model"]).name == owned["model"]


def test_reader_cannot_log_to_the_experiment(owned, as_reader, tmp_path):
    from mlflow.entities import Metric

    run_id = owned["run_id"]
    _denied(as_reader.create_run, owned["experiment_id"])
    _denied(as_reader.log_metric, run_id, "loss", 0.5, step=1)
    _denied(as_reader.log_batch, run_id, metrics=[Metric("loss", 0.4, 0, 2)])
    _denied(as_reader.log_param, run_id, "p", "v")
    _denied(as_reader.set_tag, run_id, "t", "v")
    _denied(as_reader.set_terminated, run_id, "FAILED")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(requests.HTTPError) as info:  # the artifact proxy answers plain HTTP
        as_reader.log_artifact(run_id, str(tmp_path / "f.txt"))
    assert info.value.response.status_code == 403
    _denied(as_reader.delete_experiment, owned["experiment_id"])


def test_reader_cannot_register_into_the_model(owned, as_reader):
    source = f"runs:/{owned['run_id']}/model"
    _denied(as_reader.create_model_version, owned["model"], source, owned["run_id"])
    _denied(as_reader.set_registered_model_alias, owned["model"], "champion", "1")
    _denied(as_reader.update_registered_model, owned["model"], description="mine now")
    _denied(as_reader.delete_registered_model, owned["model"])


def test_reader_is_not_an_admin(stack, reader):
    resp = requests.post(f"{stack.cfg.tracking_uri}/api/2.0/mlflow/users/create",
                         json={"username": "mallory", "password": "p" * 16}, auth=reader,
                         timeout=30)
    assert resp.status_code == 403
    resp = requests.post(f"{stack.cfg.tracking_uri}/api/3.0/mlflow/users/permissions/grant",
                         json={"username": reader[0], "resource_type": "experiment",
                               "resource_id": "0", "permission": "MANAGE"},
                         auth=reader, timeout=30)
    assert resp.status_code == 403


def test_granted_edit_allows_logging(owned, admin, as_reader, reader):
    """The same calls succeed once the owner grants EDIT: the 403s above are authorization."""
    admin.grant(reader[0], "experiment", owned["experiment_id"], "EDIT")
    try:
        run = as_reader.create_run(owned["experiment_id"])
        as_reader.log_metric(run.info.run_id, "loss", 0.3, step=0)
        as_reader.set_terminated(run.info.run_id)
    finally:
        admin.grant(reader[0], "experiment", owned["experiment_id"], "READ")
    _denied(as_reader.create_run, owned["experiment_id"])


@pytest.mark.last
def test_no_secret_leaks_anywhere(stack, trained, reader, tmp_path):
    """No password or key in the store, the artifacts, the logs or any command line.

    Runs last, after the training run, the fault tests and the restarts, so that everything
    the session did is in what is searched.
    """
    secrets = {"admin password": stack.secrets.admin_password,
               "flask secret key": stack.secrets.flask_secret_key,
               "database password": stack.secrets.db_password,
               "S3 secret key": stack.secrets.s3_secret_key,
               "reader password": reader[1]}
    haystacks: dict[str, bytes] = {}
    for db in ("mlflow", "mlflow_auth"):
        dump = stack.postgres.dump(tmp_path / f"{db}.sql", db)
        haystacks[f"pg_dump {db}"] = dump.read_bytes()
    s3 = stack.s3.client()
    n_objects = 0
    for bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                haystacks[f"s3://{bucket}/{obj['Key']}"] = body
                n_objects += 1
    for log in stack.log_paths():
        haystacks[f"log {log.name}"] = log.read_bytes()
    # -ww: full command lines (without it ps cuts them at $COLUMNS when not on a terminal).
    haystacks["ps -eo args"] = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True,
                                              check=True).stdout
    haystacks["training stdout/stderr"] = (trained["stdout"] + trained["stderr"]).encode()

    # The search must have had something real to search.
    assert trained["run_id"].encode() in haystacks["pg_dump mlflow"]
    assert n_objects >= 3 and any(k.endswith("confusion_matrix.png") for k in haystacks)
    server_argv = [line for line in haystacks["ps -eo args"].splitlines()
                   if b"mlflow server" in line and b"--app-name basic-auth" in line]
    assert server_argv and server_argv[0].endswith(b"--app-name basic-auth"), server_argv
    leaks = [f"{what} found in {where}" for where, hay in haystacks.items()
             for what, secret in secrets.items() if secret.encode() in hay]
    assert not leaks, leaks


def test_cli_adds_a_user_and_grants_read(stack, owned):
    """`fowlflow server user add` (password on stdin) and `grant`, then the user is a reader."""
    import secrets as _secrets

    password = _secrets.token_urlsafe(16)
    state = ["--state-dir", str(stack.cfg.state_dir)]
    proc = subprocess.run([str(BIN / "fowlflow"), "server", "user", "add", *state, "carol"],
                          input=password + "\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert password not in proc.stdout + proc.stderr
    fowlflow("server", "grant", *state, "carol", "experiment", owned["experiment_id"], "READ")
    url = f"{stack.cfg.tracking_uri}{API}"
    got = requests.get(f"{url}/experiments/get", params={"experiment_id": owned["experiment_id"]},
                       auth=("carol", password), timeout=30)
    assert got.status_code == 200
    denied = requests.post(f"{url}/runs/create", json={"experiment_id": owned["experiment_id"]},
                           auth=("carol", password), timeout=30)
    assert denied.status_code == 403


def test_command_lines_carry_no_secret(stack):
    """The argv the stack builds for its servers (what `ps` shows) has no password or key."""
    from fowlflow.server.mlflow_server import server_argv
    from fowlflow.server.seaweedfs import weed_argv

    weed = weed_argv(stack.cfg, stack.s3.data_dir, stack.s3.tls_dir)
    for argv in (server_argv(stack.cfg), weed):
        joined = " ".join(argv)
        assert not any(secret in joined for secret in stack.secrets.values())
    assert "@" in stack.cfg.db_uri() and ":" not in stack.cfg.db_uri().split("//")[1].split("@")[0]


# -- the artifact store, as another local user ---------------------------------------------
@pytest.fixture(scope="module")
def local_user():
    """A real unprivileged account on this machine (created here; we run as root)."""
    return ensure_local_user()


def _curl(*args: str, user: str | None = None) -> str:
    """HTTP status from curl (``000``: no HTTP answer: refused, TLS handshake failed)."""
    argv = ["curl", "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", *args]
    if user:
        argv = as_user(user, argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip()


@pytest.fixture(scope="module")
def artifact(stack, tmp_path_factory):
    """An artifact logged through the mlflow server with the stack's keys: its S3 key."""
    f = tmp_path_factory.mktemp("art") / "secret-weights.txt"
    f.write_text("only for logged-in users")
    with admin_login(stack) as client:
        run = client.create_run(client.create_experiment("security-artifacts"))
        client.log_artifact(run.info.run_id, str(f))
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [f.name]
    keys = [o["Key"] for o in stack.s3.client().list_objects_v2(
        Bucket=stack.cfg.bucket, Prefix="artifacts/")["Contents"] if o["Key"].endswith(f.name)]
    assert len(keys) == 1, keys
    return keys[0]


def test_storage_ports_refuse_a_local_user(stack, local_user, artifact):
    """Every port of SeaweedFS but S3 refuses another local user: list, read, upload, delete.

    Checked on every TCP port and Unix socket the ``weed`` process listens on, in plain HTTP
    and in TLS without the stack's client certificate. The same filer requests with the
    certificate (as the stack itself) do work, so the refusals are the authentication.
    """
    import psutil

    weed = stack.record("s3").process()
    tcp = sorted({c.laddr.port for c in weed.net_connections(kind="tcp")
                  if c.status == psutil.CONN_LISTEN})
    unix = sorted({c.laddr for c in weed.net_connections(kind="unix") if c.laddr})
    internal = [p for p in tcp if p != stack.cfg.ports["s3"]]
    assert stack.cfg.ports["filer"] in internal and len(internal) >= 8, tcp
    folder = f"/buckets/{stack.cfg.bucket}/artifacts/"
    requests_ = {"list": ["-X", "GET"], "read": ["-X", "GET"],
                 "upload": ["-X", "POST", "-F", "file=@/etc/hostname"],
                 "delete": ["-X", "DELETE"]}
    paths = {"list": folder, "read": f"/buckets/{stack.cfg.bucket}/{artifact}",
             "upload": folder + "evil.txt", "delete": folder + "?recursive=true"}
    answered = []
    for port in internal:
        for scheme in ("http", "https"):
            for what, args in requests_.items():
                for path in (paths[what], "/dir/assign", "/cluster/status"):
                    code = _curl("-k", *args, f"{scheme}://127.0.0.1:{port}{path}",
                                 user=local_user)
                    if code.startswith(("2", "3")):
                        answered.append((port, scheme, what, path, code))
    for sock in unix:
        for what, args in requests_.items():
            code = _curl("--unix-socket", sock, *args, f"http://localhost{paths[what]}",
                         user=local_user)
            if code.startswith(("2", "3")):
                answered.append((sock, what, code))
    assert not answered, answered

    # The stack itself, with its certificate, lists the artifact through the same filer port.
    tls = stack.s3.tls_dir
    own = ["--cert", str(tls / "tls.crt"), "--key", str(tls / "tls.key"),
           "--cacert", str(tls / "ca.crt"), "-H", "Accept: application/json"]
    listing = subprocess.run(["curl", "-s", "-m", "10", *own,
                              f"https://127.0.0.1:{stack.cfg.ports['filer']}/buckets/"
                              f"{stack.cfg.bucket}/{artifact}"],
                             capture_output=True, text=True, timeout=30).stdout
    assert listing == "only for logged-in users"
    # Nothing was uploaded or deleted by the attempts above.
    s3 = stack.s3.client()
    assert s3.get_object(Bucket=stack.cfg.bucket, Key=artifact)["Body"].read() == \
        b"only for logged-in users"
    assert "Contents" not in s3.list_objects_v2(Bucket=stack.cfg.bucket,
                                                 Prefix="artifacts/evil")


def test_s3_without_keys_refuses_a_local_user(stack, local_user, artifact):
    s3 = stack.cfg.s3_endpoint
    bucket = stack.cfg.bucket
    codes = {"list": _curl(f"{s3}/{bucket}?list-type=2", user=local_user),
             "read": _curl(f"{s3}/{bucket}/{artifact}", user=local_user),
             "upload": _curl("-X", "PUT", "--data-binary", "x", f"{s3}/{bucket}/artifacts/evil",
                             user=local_user),
             "delete": _curl("-X", "DELETE", f"{s3}/{bucket}/{artifact}", user=local_user),
             "buckets": _curl(f"{s3}/", user=local_user)}
    assert all(code == "403" for code in codes.values()), codes
    # With the keys (the mlflow server's), the same object reads back.
    body = stack.s3.client().get_object(Bucket=bucket, Key=artifact)["Body"].read()
    assert body == b"only for logged-in users"


def test_storage_tls_material_is_private(stack):
    import stat

    tls = stack.s3.tls_dir
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700
    assert sorted(p.name for p in tls.iterdir()) == ["ca.crt", "security.toml", "tls.crt",
                                                       "tls.key"]  # no CA key: nobody can sign
    for p in tls.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
