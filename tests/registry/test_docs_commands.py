"""The registry commands of README.md and docs/registry.md, run exactly as written (issue 8).

The commands are read from the docs' ```bash blocks (tests/docs_commands.py); only the
placeholders ``<run_id>`` and ``<version>`` are filled in. They run in a project directory
holding the MLproject and the files the docs name (``turkey.jpg``, ``photos/``, ``a.jpg``,
``b.jpg``, ``data/val``), against a real SQLite registry, in a private network namespace so
that the documented ``-p 5000`` is free. ``mlflow models serve`` is started in the background
and the following commands run once it answers, as a reader would in a second terminal. The
test's own checks name the store: ``MlflowClient(project.uri)``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import BIN, HYMENOPTERA, ROOT, TURKEY
from tests.docs_commands import Command, bash_blocks, block_under, fill, private_network
from tests.net import wait_until
from tests.registry.conftest import hymenoptera_images, log_contract_model

NAME = "fowl-classifier"  # the docs' (and the MLproject's default) model name


@dataclass
class DocsProject:
    dir: Path
    env: dict
    prefix: list  # runs a command in the private network namespace
    uri: str  # the project's tracking and registry store (MLFLOW_TRACKING_URI of its commands)
    outputs: dict = field(default_factory=dict)  # command line number -> stdout

    def run(self, cmd: Command, **placeholders) -> str:
        text = fill(cmd.text, **placeholders)
        if text.startswith("mlflow models serve"):
            self._serve(text)
            return ""
        proc = subprocess.run([*self.prefix, "bash", "-o", "pipefail", "-c", text], cwd=self.dir,
                              env=self.env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (f"line {cmd.line} failed ({proc.returncode}): {text}\n"
                                      f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        self.outputs[cmd.line] = proc.stdout
        return proc.stdout

    def _serve(self, text: str) -> None:
        port = re.search(r"-p (\d+)", text).group(1)
        log = open(self.dir / "serve.log", "w")
        self.server = subprocess.Popen([*self.prefix, "bash", "-c", text], cwd=self.dir,
                                       env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        # curl in the namespace, where the server listens
        wait_until(lambda: subprocess.run([*self.prefix, "curl", "-sf", f"localhost:{port}/ping"],
                                          capture_output=True).returncode == 0,
                   what=f"mlflow models serve answering /ping on port {port}", timeout=120,
                   interval=0.5, proc=self.server, log=self.dir / "serve.log")

    def stop(self) -> None:
        server = getattr(self, "server", None)
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the group we started: bash and the server
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project directory with the docs' files and its own SQLite registry, named by
    ``MLFLOW_TRACKING_URI`` (for the commands and for this test's in-process logging and
    registering); the test's checks use ``MlflowClient(project.uri)``."""
    from mlflow.tracking._tracking_service import utils

    d = tmp_path / "project"
    d.mkdir()
    for name in ("MLproject", "conda.yaml"):
        shutil.copy(ROOT / name, d / name)
    (d / "turkey.jpg").symlink_to(TURKEY)
    (d / "photos").mkdir()
    for photo in hymenoptera_images(1):
        (d / "photos" / photo.name).symlink_to(photo)
    a, b = hymenoptera_images(1)
    (d / "a.jpg").symlink_to(a)
    (d / "b.jpg").symlink_to(b)
    (d / "data").mkdir()
    (d / "data" / "val").symlink_to(HYMENOPTERA / "val")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    monkeypatch.chdir(d)  # the store's artifact root (./mlruns) is created here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow's module-level URI would win over the variable: none, whatever an earlier test set
    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.setenv("FOWLFLOW_CACHE_DIR", str(tmp_path / "cache"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    with private_network() as prefix:
        p = DocsProject(d, env, prefix, uri)
        try:
            yield p
        finally:
            p.stop()


def _register(val_acc: float, seed: int) -> str:
    from fowlflow.registry import register_trained_model

    run_id = log_contract_model(val_acc=val_acc, seed=seed)
    return register_trained_model(run_id=run_id, name=NAME, val_dir=HYMENOPTERA / "val",
                                  max_images=8).version


def _aliases(client, name: str = NAME) -> dict:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def _no_empty_quotes_in_params(client) -> dict:
    """Every run's params; none may be the two characters '' (issue 8.9)."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    bad = {(r.info.run_id, k): v for r in runs for k, v in r.data.params.items() if v == "''"}
    assert not bad, f"params logged as '': {bad}"
    return {r.info.run_id: r for r in runs}


def _prediction(stdout: str) -> list:
    preds = json.loads(stdout)["predictions"]
    assert all(p["label"] in {"ants", "bees"} and p["error"] is None for p in preds), preds
    return preds


def _words(cmd) -> list[str]:
    """A command's words as bash reads them: trailing comments and line breaks don't count."""
    return shlex.split(cmd.text.replace("\\\n", " "), comments=True)


def test_readme_model_registry_block_is_registry_md_commands():
    """Each command of README.md's "Model registry" block is, word for word, a command of
    docs/registry.md, which the next test runs as written (issue 8.9: register without
    val_dir; 8.10: curl with the README's own 1.7 MB photo). The README block once ran again
    on its own: 50-190 s of CI for the same commands."""
    block = block_under(ROOT / "README.md", "Model registry")
    assert [c.placeholders for c in block.commands if c.placeholders] == [{"run_id"}]
    run = {tuple(_words(c)) for b in bash_blocks(ROOT / "docs" / "registry.md")
           for c in b.commands}
    missing = [f"README.md line {c.line}: {c.text}" for c in block.commands
               if tuple(_words(c)) not in run]
    assert not missing, "not in docs/registry.md (so no test runs it):\n" + "\n".join(missing)
    assert len(block.commands) == 7


def test_registry_md_commands_run_as_written(project):
    """Every bash command of docs/registry.md, in order (promotion, predict, evaluate with a
    trailing slash, register twice, download, serve, both request forms)."""
    import mlflow

    client = mlflow.MlflowClient(project.uri)
    commands = [c for b in bash_blocks(ROOT / "docs" / "registry.md") for c in b.commands]
    assert _register(val_acc=0.95, seed=0) == "1"
    assert _register(val_acc=0.90, seed=1) == "2"  # @candidate
    later = log_contract_model(val_acc=0.7, seed=2)
    # The promote block: candidate (2) -> champion; version 1 (better); min_accuracy 0.9 takes
    # the candidate again; then the manual roll back to version 1. Evaluate also uses 1.
    for cmd in commands:
        project.run(cmd, run_id=later, version="1")
    assert _aliases(client) == {"champion": "1", "previous_champion": "2", "candidate": "3"}
    assert _aliases(client, NAME + "-onnx")["champion"] == "1"
    out = project.outputs
    registers = [out[c.line] for c in commands if "-e register" in c.text]
    assert "registered fowl-classifier version 3 and fowl-classifier-onnx version 3" in registers[0]
    assert ("already registered: runs:/" + later + "/model is fowl-classifier version 3 and "
            "fowl-classifier-onnx version 3; nothing new registered") in registers[1]
    curls = [out[c.line] for c in commands if "curl" in c.text]
    assert [len(_prediction(o)) for o in curls] == [1, 2]
    assert "turkey.jpg" in (project.dir / "preds.csv").read_text()
    assert (project.dir / "model" / "model.onnx").is_file()
    runs = _no_empty_quotes_in_params(client)
    val_dirs = [r.data.params.get("val_dir") for r in runs.values()
                if r.data.params.get("model_uri") == f"runs:/{later}/model"]
    assert "none" in val_dirs, val_dirs  # the register without -P val_dir (issue 8.9)
    evaluated = sorted(r.data.params["data_dir"] for r in runs.values()
                       if "data_dir" in r.data.params)
    assert evaluated == ["data/val", "data/val/"]  # logged as given, no conflict
    assert client.get_model_version(NAME, "1").tags["promotion"].startswith(
        "manual")
