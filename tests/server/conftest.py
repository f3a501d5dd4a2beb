"""One real team stack (PostgreSQL + SeaweedFS S3 + mlflow basic-auth) for the whole session.

It is started with the documented command, ``fowlflow server start --state-dir D``, and stopped
with ``fowlflow server stop`` (with an in-process fallback that stops the recorded pids, so a
failed test never leaves servers behind). Its logs are copied to ``test-output/server-logs/``.

Fixtures:
    stack          the running :class:`~fowlflow.server.Stack`
    admin_env      MLFLOW_TRACKING_* of the admin, set for one test (in-process client)
    admin          an :class:`~fowlflow.server.users.AuthAdmin`
    reader         (username, password) of a user created for the session
    trained        a real ``mlflow run`` of the trainer on an ``s3://`` dataset of the stack's
                   S3, registered as a model with two versions and aliases
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT, TINY_PARAMS, make_imagefolder, mlflow_run

OUTPUT = ROOT / "test-output"
UI_MODEL = "fowlflow-ui-model"
UI_EXPERIMENT = "fowlflow-ui"
DATASET_BUCKET = "datasets"


def pytest_configure(config):
    config.addinivalue_line("markers", "last: run after every other test of the server stack")


def pytest_collection_modifyitems(session, config, items):
    """Move ``@pytest.mark.last`` tests of this folder to the end of the session."""
    here = Path(__file__).parent
    last = [i for i in items if i.get_closest_marker("last") and here in Path(i.path).parents]
    for item in last:
        items.remove(item)
    items.extend(last)


def fowlflow(*args: str, check: bool = True, timeout: int = 300,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real ``fowlflow`` CLI."""
    proc = subprocess.run([str(BIN / "fowlflow"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"fowlflow {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def client_env(stack, username: str | None = None, password: str | None = None) -> dict:
    """Environment of a client process: the login, quick retries, the venv's python first."""
    return {**stack.client_env(username, password),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # Fail fast in tests that expect an error; fault tests set their own.
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


@pytest.fixture(scope="session")
def stack():
    from fowlflow.server import Stack, StackConfig

    # Under /tmp, not pytest's 0700 tmp root: the postgres user must reach the data dir.
    state = Path(tempfile.mkdtemp(prefix="ffstack-", dir="/tmp"))
    os.chmod(state, 0o711)
    StackConfig.load(state, pick_free=True).save()  # free ports, recorded for the CLI
    try:
        fowlflow("server", "start", "--state-dir", str(state))
        yield Stack(StackConfig.load(state))
    finally:
        stop = fowlflow("server", "stop", "--state-dir", str(state), check=False)
        Stack(StackConfig.load(state)).stop()  # no-op unless the CLI failed
        logs = OUTPUT / "server-logs"
        logs.mkdir(parents=True, exist_ok=True)
        for log in (state / "logs").glob("*.log*"):
            if log.exists():
                shutil.copy(log, logs / log.name)
        (logs / "stop.txt").write_text(stop.stdout + stop.stderr)
        shutil.rmtree(state, ignore_errors=True)
        assert stop.returncode == 0, stop.stderr


@pytest.fixture
def admin_env(stack, monkeypatch):
    """The admin's login for in-process MLflow calls in this test."""
    import mlflow

    for k, v in client_env(stack).items():
        monkeypatch.setenv(k, v)
    mlflow.set_tracking_uri(stack.cfg.tracking_uri)
    yield stack.client_env()
    mlflow.set_tracking_uri(None)
    # mlflow.set_experiment() exports MLFLOW_EXPERIMENT_ID; don't let it reach later tests.
    _drop_experiment_env()


def _drop_experiment_env() -> None:
    for k in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(k, None)


@pytest.fixture(scope="session")
def admin(stack):
    from fowlflow.server.users import AuthAdmin

    return AuthAdmin(stack.cfg.tracking_uri, stack.secrets.admin_username,
                     stack.secrets.admin_password)


@pytest.fixture(scope="session")
def reader(admin):
    password = secrets.token_urlsafe(16)
    admin.create_user("reader", password)
    return "reader", password


def _s3_env(stack) -> dict:
    """What `fowlflow server env --s3` exports: S3 endpoint and keys, for s3:// datasets."""
    out = fowlflow("server", "env", "--s3", "--state-dir", str(stack.cfg.state_dir)).stdout
    env = dict(os.environ)
    proc = subprocess.run(["bash", "-c", out + "\nenv -0"], capture_output=True, env=env,
                          check=True)
    pairs = (item.split("=", 1) for item in proc.stdout.decode().split("\0") if "=" in item)
    exported = dict(pairs)
    return {k: exported[k] for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                                     "AWS_SECRET_ACCESS_KEY")}


@pytest.fixture(scope="session")
def trained(stack, tmp_path_factory):
    """A real training run on the team server, reading its data from the stack's S3.

    ``mlflow run`` of this project (tiny settings) with ``-P data=s3://datasets/imgs`` and
    ``-P registered_model_name``; then a second version of the model is registered from the
    same run and the aliases ``champion`` (v1) and ``candidate`` (latest) are set, as a
    promotion would.
    """
    import mlflow
    from mlflow import MlflowClient

    imgs = make_imagefolder(tmp_path_factory.mktemp("s3data") / "imgs")
    s3 = stack.s3.client()
    s3.create_bucket(Bucket=DATASET_BUCKET)
    for f in sorted(imgs.rglob("*.jpg")):
        s3.upload_file(str(f), DATASET_BUCKET, f"imgs/{f.relative_to(imgs)}")

    env = {**client_env(stack), **_s3_env(stack),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7",
           "FOWLFLOW_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    _drop_experiment_env()  # an in-process set_experiment elsewhere must not pick the experiment
    out = tmp_path_factory.mktemp("train-out")
    params = {**TINY_PARAMS, "num_epochs": "2", "data": f"s3://{DATASET_BUCKET}/imgs",
              "registered_model_name": UI_MODEL, "output_dir": str(out)}
    proc = mlflow_run("--experiment-name", UI_EXPERIMENT, params=params, env=env, timeout=900)

    client = MlflowClient(stack.cfg.tracking_uri)
    with _login(stack):
        exp = client.get_experiment_by_name(UI_EXPERIMENT)
        run = client.search_runs([exp.experiment_id], order_by=["start_time DESC"],
                                 max_results=1)[0]
        assert run.info.status == "FINISHED"
        # The registry, unchanged, registered version 1 through the server and aliased it.
        assert client.get_model_version_by_alias(UI_MODEL, "candidate").version == "1"
        # A second version from the same run, then the aliases a promotion would leave.
        mlflow.set_tracking_uri(stack.cfg.tracking_uri)
        try:
            mlflow.register_model(f"runs:/{run.info.run_id}/model", UI_MODEL)
        finally:
            mlflow.set_tracking_uri(None)
        versions = sorted(client.search_model_versions(f"name='{UI_MODEL}'"),
                          key=lambda v: int(v.version))
        client.set_registered_model_alias(UI_MODEL, "champion", versions[0].version)
        client.set_registered_model_alias(UI_MODEL, "candidate", versions[-1].version)
    return {"run_id": run.info.run_id, "experiment_id": exp.experiment_id,
            "model_name": UI_MODEL, "versions": [v.version for v in versions],
            "stdout": proc.stdout, "stderr": proc.stderr}


class _login:
    """Temporarily act as the admin in this process (restores the environment after)."""

    def __init__(self, stack):
        self.env = stack.client_env()

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

