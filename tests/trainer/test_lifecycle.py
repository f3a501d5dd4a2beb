"""The trainer's lifecycle (issue 8), each through the real CLI and a real MLflow store:
a checkpoint that would run code, stop signals and a killed ``mlflow run``, class names MLflow
refuses in metric keys, an unusable output_dir."""

from __future__ import annotations

import json
import os
import pwd
import shlex
import signal
import subprocess
import textwrap
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from mlflow import MlflowClient

from fowlflow.errors import FowlflowError
from fowlflow.tracking import RunTracker
from tests.conftest import BIN, HYMENOPTERA, ROOT, TINY_PARAMS, make_imagefolder, mlflow_run
from tests.local_user import as_user, ensure_local_user

def env(**extra: str) -> dict:
    """This test's environment (MLFLOW_TRACKING_URI is set by the fixture), venv first on PATH."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def trainer(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fowlflow.train", *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def tiny_args(data: Path, **extra) -> list[str]:
    args = []
    for key, value in {**TINY_PARAMS, "data": data, **extra}.items():
        args += [f"--{key}", str(value)]
    return args


def store() -> MlflowClient:
    """A client on this test's store, named explicitly (the ``tracking_uri`` fixture's)."""
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def only_run(experiment: str):
    client = store()
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


# -- 2. a checkpoint is loaded with weights_only=True ------------------------------------------

class PlantFile:
    """Unpickling this creates a file: what a hostile checkpoint could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_a_checkpoint_that_would_run_code(tracking_uri, tmp_path):
    planted = tmp_path / "planted-by-checkpoint"
    hostile = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1, "config": {}, "payload": PlantFile(str(planted))}, hostile)
    proc = mlflow_run("--experiment-name", "hostile", cwd=tmp_path, project=ROOT, check=False,
                      params={**TINY_PARAMS, "data": make_imagefolder(tmp_path / "d"),
                              "resume": hostile, "output_dir": tmp_path / "out"})
    assert not planted.exists(), "loading the checkpoint ran code"
    assert proc.returncode != 0
    assert f"fowlflow: error: -P resume='{hostile}' was not loaded" in proc.stderr
    assert "could run code" in proc.stderr and "leave -P resume= empty" in proc.stderr
    assert "weights_only=False" not in proc.stderr  # torch's advice to load it anyway
    assert "Traceback" not in proc.stderr
    run = only_run("hostile")
    assert run.info.status == "FAILED" and "was not loaded" in run.data.tags["error"]
    assert not (tmp_path / "out").exists()  # stopped before anything was written


@pytest.mark.parametrize("kind", ["corrupt", "json", "tensor"])
def test_resume_refuses_corrupt_or_unrelated_files(tracking_uri, tmp_path, kind):
    path = tmp_path / "checkpoint.pt"
    if kind == "corrupt":
        path.write_bytes(b"PK\x03\x04" + os.urandom(300))
    elif kind == "json":
        path.write_text(json.dumps({"epoch": 1}))
    else:
        torch.save(torch.zeros(3), path)
    proc = trainer(*tiny_args(tmp_path / "no-data-needed", resume=path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    want = "not a fowlflow checkpoint" if kind == "tensor" else "not a readable PyTorch file"
    assert f"fowlflow: error: -P resume='{path}' " in proc.stderr and want in proc.stderr
    assert "Traceback" not in proc.stderr


# -- 3. stop signals, and a killed `mlflow run` --------------------------------------------

def start_long_run(tmp_path: Path, experiment: str, shell: bool = False) -> subprocess.Popen:
    """`mlflow run` on hymenoptera for many epochs; returns once the trainer is training.

    ``shell``: a project whose command keeps ``bash -c`` alive between `mlflow run` and the
    trainer (bash execs a lone command, not one followed by another, as in an env activation).
    """
    params = {**TINY_PARAMS, "data": HYMENOPTERA, "num_epochs": 500, "output_dir": tmp_path / "out"}
    project = ROOT
    if shell:
        project = tmp_path / "shell-project"
        project.mkdir()
        args = tiny_args(HYMENOPTERA, num_epochs=500, output_dir=tmp_path / "out")
        line = " ".join(["python -m fowlflow.train", *map(shlex.quote, args), "; exit $?"])
        (project / "MLproject").write_text(
            f"name: shell\nentry_points:\n  main:\n    command: {json.dumps(line)}\n")
        params = {}
    cmd = [str(BIN / "mlflow"), "run", str(project), "--env-manager", "local",
           "--experiment-name", experiment]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    store().search_experiments()  # create the store's tables now, not in two processes
    log = open(tmp_path / "mlflow-run.log", "w")
    # Typed in tmp_path: the experiment it creates keeps its artifacts in tmp_path/mlruns.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_training(proc, experiment, tmp_path / "mlflow-run.log")
    except BaseException:
        if proc.poll() is None:
            launched = psutil.Process(proc.pid)
            kill_leftovers(launched.children(recursive=True) + [launched])
        raise
    return proc


def wait_training(proc: subprocess.Popen, experiment: str, log: Path, timeout: float = 300):
    """Until the run is RUNNING and its trainer has loaded the data (params logged)."""
    client = store()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and runs[0].info.status == "RUNNING" and "data_digest" in runs[0].data.params:
            return
        time.sleep(0.5)
    raise AssertionError(f"the trainer did not start training:\n{log.read_text()[-3000:]}")


def trainer_procs(root_pid: int) -> list[psutil.Process]:
    """The trainer processes below ``root_pid`` (not a ``bash -c`` that names it)."""
    found = [p for p in psutil.Process(root_pid).children(recursive=True)
             if p.cmdline()[1:3] == ["-m", "fowlflow.train"]]
    assert found, "no trainer process under the launcher"
    return found


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(procs)


def kill_leftovers(procs: list[psutil.Process]) -> None:
    for p in alive(procs):  # only processes this test started
        p.kill()


@pytest.mark.parametrize("shell", [False, True], ids=["exec", "bash-c"])
def test_sigterm_to_mlflow_run_stops_its_trainer_and_ends_the_run(tracking_uri, tmp_path, shell):
    proc = start_long_run(tmp_path, "term-launcher", shell=shell)
    everything = psutil.Process(proc.pid).children(recursive=True)
    try:
        (trainer,) = trainer_procs(proc.pid)
        parent = trainer.parent()  # the process tree under test
        if shell:
            assert parent.name() == "bash" and parent.ppid() == proc.pid
        else:
            assert parent.pid == proc.pid
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        left = wait_gone(everything, timeout=60)
        assert not left, f"{[p.cmdline()[:3] for p in left]} went on after `mlflow run` died"
        took = time.monotonic() - start
    finally:
        kill_leftovers(everything)
    run = only_run("term-launcher")
    assert run.info.status == "KILLED"
    assert "Terminated: the `mlflow run` that started it" in run.data.tags["error"]
    log = (tmp_path / "mlflow-run.log").read_text()
    assert "fowlflow: stopped (the `mlflow run` that started it" in log
    print(f"trainer gone {took:.1f}s after SIGTERM to mlflow run")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signal_to_the_trainer_ends_the_run_killed(tracking_uri, tmp_path, sig):
    """The trainer started without `mlflow run` (by hand, torchrun): no one else ends its run."""
    log = tmp_path / "trainer.log"
    args = tiny_args(HYMENOPTERA, num_epochs=500, output_dir=tmp_path / "out")
    store().search_experiments()  # create the store's tables now, not in two processes
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fowlflow.train", *args], cwd=tmp_path,
                                env=env(MLFLOW_EXPERIMENT_NAME="term-trainer"),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_training(proc, "term-trainer", log)
        start = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        print(f"trainer exited {time.monotonic() - start:.1f}s after {sig.name}")
    finally:
        kill_leftovers([psutil.Process(proc.pid)] if proc.poll() is None else [])
    assert code == 128 + sig, log.read_text()[-3000:]
    assert f"fowlflow: stopped (received {sig.name})" in log.read_text()
    run = only_run("term-trainer")
    assert run.info.status == "KILLED"
    assert run.data.tags["error"] == f"Terminated: received {sig.name}"


# -- 4. class names MLflow refuses in metric keys ---------------------------------------------

def test_class_names_mlflow_refuses_in_metric_keys(tracking_uri, tmp_path):
    classes = ("hen (adult)", "turkey+poult")
    data = make_imagefolder(tmp_path / "d", classes=classes)
    proc = mlflow_run("--experiment-name", "odd-names", cwd=tmp_path, project=ROOT,
                      params={**TINY_PARAMS, "data": data, "output_dir": tmp_path / "out"})
    assert "ERROR" not in proc.stderr
    run = only_run("odd-names")
    assert run.info.status == "FINISHED"
    for key in ("val_precision_hen _adult_", "val_recall_hen _adult_",
                "val_precision_turkey_poult", "val_recall_turkey_poult"):
        assert key in run.data.metrics, (key, sorted(run.data.metrics))
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                artifact_path="per_class_metrics.json",
                                                dst_path=str(tmp_path / "a"))
    table = json.load(open(local))
    columns = table["columns"]
    rows = {row[columns.index("class")]: row[columns.index("metric_name")] for row in table["data"]}
    assert rows == {"hen (adult)": "hen _adult_", "turkey+poult": "turkey_poult"}


def test_metric_names_are_safe_deterministic_and_unique():
    from mlflow.utils.validation import _validate_metric_name

    from fowlflow.tracking.run_tracker import metric_names

    names = ["turkey+poult", "turkey_poult", "turkey(poult", "a:b", "poulet fermière", "ants"]
    mapped = metric_names(names)
    assert mapped == metric_names(list(names))
    assert len(set(mapped.values())) == len(names)
    assert mapped["turkey_poult"] == "turkey_poult" and mapped["ants"] == "ants"
    assert mapped["turkey+poult"].startswith("turkey_poult-") and mapped["a:b"] == "a_b"
    for key in mapped.values():
        _validate_metric_name(f"val_recall_{key}")  # raises if MLflow would refuse it


def test_a_refused_metric_batch_fails_loudly(tracking_uri):
    mlflow.set_experiment("refused")
    tracker = RunTracker()
    tracker.start()
    try:
        tracker.log_epoch({"val_acc": 0.5, "val_recall_hen (adult)": 1.0}, 1)
        with pytest.raises(FowlflowError, match=r"did not store the metrics val_acc, "
                                                r"val_recall_hen \(adult\)"):
            tracker.flush()
    finally:
        tracker.finish("FAILED")


# -- 6. output_dir that can't hold checkpoints ------------------------------------------------

@pytest.mark.parametrize("where", ["file", "below-file"])
def test_output_dir_that_is_a_file_fails_before_training(tracking_uri, tmp_path, where):
    blocker = tmp_path / "outputs"
    blocker.write_text("not a folder")
    out = blocker if where == "file" else blocker / "run1"
    start = time.monotonic()
    proc = trainer(*tiny_args(HYMENOPTERA, output_dir=out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"fowlflow: error: -P output_dir='{out}' " in proc.stderr
    assert "choose a folder" in proc.stderr and "Epoch 1" not in proc.stdout
    assert blocker.read_text() == "not a folder"
    print(f"refused after {time.monotonic() - start:.1f}s")


def test_output_dir_not_writable_fails_before_training(tmp_path):
    """As an unprivileged user (root may write anywhere): the trainer refuses a folder that user
    can't write, before loading any data, and marks its run FAILED."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    home = tmp_path / "home"  # the user's HOME, cwd and store: it must write those
    home.mkdir()
    prefix = []
    if os.geteuid() == 0:
        user = pwd.getpwnam(ensure_local_user())
        os.chown(home, user.pw_uid, user.pw_gid)
        prefix = as_user(user.pw_name, [], read_all=True)  # reads the venv, repo and data
    uri = f"sqlite:///{home / 'mlflow.db'}"
    user_env = env(HOME=str(home), MLFLOW_TRACKING_URI=uri)

    def run_as_user(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *argv], cwd=home, env=user_env, capture_output=True,
                              text=True, timeout=300)

    probe = run_as_user(sys.executable, "-c", f"open({str(locked / 'probe')!r}, 'w')")
    assert "PermissionError" in probe.stderr, probe.stderr  # the setting is real
    proc = run_as_user(sys.executable, "-m", "fowlflow.train",
                       *tiny_args(HYMENOPTERA, output_dir=locked / "out"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"fowlflow: error: -P output_dir='{locked / 'out'}' is not writable ({locked} does "
            "not let this user create files)") in proc.stderr
    assert "Epoch 1" not in proc.stdout and list(locked.iterdir()) == []
    (run,) = MlflowClient(uri).search_runs(["0"])
    assert run.info.status == "FAILED" and "is not writable" in run.data.tags["error"]


def test_a_stop_whose_exception_was_lost_is_raised_again_at_the_next_batch():
    """A stop signal's exception can be cleared by C code that calls back into Python (seen
    in CI: the trainer trained on until the 30 s grace ran out, in torch's backward). The loops
    ask `raise_if_stopping()` every batch, so the stop still ends the run at once."""
    code = textwrap.dedent("""
        import os, signal
        from fowlflow import stopping
        stopping.install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100000):
                pass  # the handler runs here and raises Terminated
        except BaseException:
            pass  # what C code that clears the error does
        stopping.raise_if_stopping()  # nothing is raised unless a stop was asked for
        print("not raised")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode != 0 and "not raised" not in out.stdout, out.stdout + out.stderr
    assert "Terminated: received SIGTERM" in out.stderr, out.stderr
    quiet = subprocess.run([sys.executable, "-c", "from fowlflow import stopping; "
                            "stopping.install(); stopping.raise_if_stopping(); print('ok')"],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert quiet.stdout.strip() == "ok", quiet.stderr
