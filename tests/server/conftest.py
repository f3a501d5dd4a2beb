"""One real team stack (PostgreSQL + SeaweedFS S3 + mlflow basic-auth) for the whole session.

It is started with the documented command, ``fowlflow server start --state-dir D``, and stopped
with ``fowlflow server stop`` (with an in-process fallback that stops the recorded pids, so a
failed test never leaves servers behind). Its logs are copied to ``test-output/server-logs/``.

Fixtures:
    stack          the running :class:`~fowlflow.server.Stack`
    admin_client   an ``MlflowClient(tracking_uri)`` acting as the admin for one test
    admin          an :class:`~fowlflow.server.users.AuthAdmin`
    reader         (username, password) of a user created for the session
    trained        a real ``mlflow run`` of the trainer on an ``s3://`` dataset of the stack's
                   S3, registered as a model with two versions and aliases
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT, TINY_PARAMS, make_imagefolder, mlflow_run
from tests.net import on_free_ports

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
    try:  # free ports, recorded in ports.json for the CLI
        on_free_ports(state, lambda: fowlflow("server", "start", "--state-dir", str(state)))
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
def admin_client(stack, monkeypatch):
    """An explicit ``MlflowClient`` of the stack, logged in as the admin for this test only.

    MLflow clients read the login from ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` only, so those
    are set with ``monkeypatch`` (undone after the test); no module-level MLflow state is set.
    """
    from mlflow import MlflowClient

    for k, v in client_env(stack).items():
        monkeypatch.setenv(k, v)
    return MlflowClient(stack.cfg.tracking_uri)


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
    imgs = make_imagefolder(tmp_path_factory.mktemp("s3data") / "imgs")
    s3 = stack.s3.client()
    s3.create_bucket(Bucket=DATASET_BUCKET)
    for f in sorted(imgs.rglob("*.jpg")):
        s3.upload_file(str(f), DATASET_BUCKET, f"imgs/{f.relative_to(imgs)}")

    env = {**client_env(stack), **_s3_env(stack),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7",
           "FOWLFLOW_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    out = tmp_path_factory.mktemp("train-out")
    params = {**TINY_PARAMS, "num_epochs": "2", "data": f"s3://{DATASET_BUCKET}/imgs",
              "registered_model_name": UI_MODEL, "output_dir": str(out)}
    proc = mlflow_run("--experiment-name", UI_EXPERIMENT, params=params, env=env, timeout=900)

    with admin_login(stack) as client:
        exp = client.get_experiment_by_name(UI_EXPERIMENT)
        run = client.search_runs([exp.experiment_id], order_by=["start_time DESC"],
                                 max_results=1)[0]
        assert run.info.status == "FINISHED"
        # The registry, unchanged, registered version 1 through the server and aliased it.
        assert client.get_model_version_by_alias(UI_MODEL, "candidate").version == "1"
        # A second version of the run's logged model "model" (what mlflow.register_model of
        # runs:/<run>/model sends), then the aliases a promotion would leave.
        (model_id,) = [m.model_id for m in client.search_logged_models(
            [exp.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
            if m.name == "model"]
        client.create_model_version(UI_MODEL, f"models:/{model_id}", run_id=run.info.run_id,
                                    model_id=model_id)
        versions = sorted(client.search_model_versions(f"name='{UI_MODEL}'"),
                          key=lambda v: int(v.version))
        client.set_registered_model_alias(UI_MODEL, "champion", versions[0].version)
        client.set_registered_model_alias(UI_MODEL, "candidate", versions[-1].version)
    return {"run_id": run.info.run_id, "experiment_id": exp.experiment_id,
            "model_name": UI_MODEL, "versions": [v.version for v in versions],
            "stdout": proc.stdout, "stderr": proc.stderr}


@contextlib.contextmanager
def admin_login(stack):
    """An ``MlflowClient(tracking_uri)`` acting as the admin inside the block (for fixtures wider
    than one test). The login goes through the environment (MLflow reads it nowhere else) and is
    taken back when the block ends."""
    from mlflow import MlflowClient

    with pytest.MonkeyPatch.context() as mp:
        for k, v in stack.client_env().items():
            mp.setenv(k, v)
        yield MlflowClient(stack.cfg.tracking_uri)
