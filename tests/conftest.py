"""Fixtures shared by every test: an isolated MLflow store, tiny image sets, the real CLI.

Tests mirror the package: tests/trainer, tests/tracking, tests/registry, tests/projects. Area
fixtures that start real servers (SeaweedFS, PostgreSQL, sshd, mlflow server) live in the
area's own conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera_data"
TURKEY = SHARED / "datasets" / "fowl_sample" / "turkey.jpg"
BIN = Path(sys.executable).parent

# Tiny, fast settings for real end-to-end runs on a 2-core CPU.
TINY_PARAMS = {
    "arch": "resnet18",
    "weights": "none",
    "image_size": "32",
    "batch_size": "8",
    "num_epochs": "1",
    "workers": "0",
    "registered_model_name": "none",  # registration has its own tests; it adds an ONNX export
}


@pytest.fixture(autouse=True)
def _isolate_mlflow_experiment(monkeypatch):
    """No test sees an experiment chosen by an earlier one (``mlflow.set_experiment`` writes
    MLFLOW_EXPERIMENT_ID into the environment and a module global)."""
    import mlflow

    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.setenv(name, "x")  # recorded, so the original state comes back afterwards
        monkeypatch.delenv(name)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)


@pytest.fixture(scope="session", autouse=True)
def _no_mlflow_files_in_the_repository():
    """Fail the session if a test left MLflow files in the repository (``./mlflow.db``, runs or
    models under ``./mlruns``): every test keeps its store and artifacts in its own tmp folder."""
    before = repository_mlflow_files()
    yield
    new = sorted(repository_mlflow_files() - before)
    assert not new, f"the tests wrote MLflow files into {ROOT}: {new[:20]}"


def repository_mlflow_files() -> set[str]:
    """``mlflow.db`` (with its modification time) and the experiments, runs and models under
    ``mlruns/`` in the repository."""
    found = set()
    db = ROOT / "mlflow.db"
    if db.exists():
        found.add(f"mlflow.db modified {db.stat().st_mtime_ns}")
    mlruns = ROOT / "mlruns"
    if mlruns.is_dir():
        found.add("mlruns")
        for pattern in ("*", "*/*", "*/models/*"):
            found |= {str(p.relative_to(ROOT)) for p in mlruns.glob(pattern)}
    return found


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store in tmp_path, set for this test, which runs in tmp_path.

    MLflow puts the artifacts of an experiment created without an ``artifact_location`` in
    ``./mlruns`` of the process that creates it: for a SQLite store, the Default experiment
    (id 0) is created with the tables. So the tables are created here, from tmp_path, and the
    test runs in tmp_path, as do the processes it starts without a ``cwd``. A process started in
    another folder that creates an experiment (``mlflow run --experiment-name``,
    ``MLFLOW_EXPERIMENT_NAME``) puts its artifacts under that folder: start those in tmp_path.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    default = mlflow.MlflowClient().get_experiment("0")  # creates the tables
    assert default.artifact_location == str(tmp_path / "mlruns" / "0")
    yield uri
    mlflow.set_tracking_uri(None)


def make_imagefolder(root: Path, classes=("ants", "bees"), per_class=(6, 4), size=40) -> Path:
    """Write a small learnable ImageFolder (class i is tinted by colour i) and return it."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 40, 200), (40, 200, 40), (200, 200, 40)]
    for split, n in zip(("train", "val"), per_class):
        for ci, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.integers(0, 60, (size, size + 8, 3))
                arr = np.clip(np.array(colours[ci % 4]) + noise - 30, 0, 255).astype("uint8")
                Image.fromarray(arr).save(d / f"{name}_{i}.jpg", quality=90)
    return root


@pytest.fixture
def imagefolder(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "imgs")


def mlflow_run(*args: str, params: dict | None = None, env: dict | None = None,
               cwd: Path = ROOT, timeout: int = 600, check: bool = True,
               project: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real ``mlflow run`` CLI, typed in ``cwd``, on ``project`` (default: ``cwd``,
    i.e. ``mlflow run .``); returns the completed process."""
    cmd = [str(BIN / "mlflow"), "run", str(project or cwd), "--env-manager", "local", *args]
    for k, v in (params or {}).items():
        cmd += ["-P", f"{k}={v}"]
    # `mlflow run --env-manager local` runs the entry point with whatever `python` is on PATH.
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
