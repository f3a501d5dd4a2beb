"""Fixtures shared by every test: an isolated MLflow store, tiny image sets, the real CLI.

Tests mirror the package: tests/data, tests/trainer, tests/tracking, tests/registry,
tests/projects, tests/server, tests/tune. Area fixtures that start real servers (SeaweedFS, PostgreSQL, sshd, mlflow
server) live in the area's own conftest.py.

The CI budget (issue 10): the slow end-to-end tests are listed in one place, :data:`SLOW`
below, and get the ``slow`` marker from it. Every run orders the fast tests first and, if one
of them failed, stops before the slow ones (fail fast: a broken fast test fails CI in minutes,
not after half an hour); ``make test`` still runs the whole suite and prints the 15 slowest
tests. ``pytest -m "not slow"`` is the quick loop while working.

MLflow state: tests name their store explicitly. The ``tracking_uri`` fixture sets
``MLFLOW_TRACKING_URI`` (read by subprocesses and by in-process fluent calls) and the
``client`` fixture is ``MlflowClient(tracking_uri)``; nothing here sets MLflow's module-level
tracking URI, which would leak into later tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera_data"
TURKEY = SHARED / "datasets" / "fowl_sample" / "turkey.jpg"
BIN = Path(sys.executable).parent

# One OpenMP thread per process in tests (subprocesses inherit it; the sshd test hosts set it
# too, tests/projects/conftest.py start_sshd). Two xdist workers, each with trainers, servers
# and multi-node runs, share two cores: torch's default of one thread per core oversubscribes
# them and OpenMP's spinning threads then wait on each other. Measured: two copies of
# registry/test_e2e.py side by side, 95 s -> 69 s of wall time. A value set outside wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The tests press Ctrl-C as a terminal does. A non-interactive shell starts its background jobs
# (`make test &` in a script) with SIGINT ignored, every child inherits that, and `mlflow run`
# would then never see the Ctrl-C: give SIGINT its normal action, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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


# ---------------------------------------------------------------------------------------------
# The slow end-to-end tests: real `mlflow run` CLIs, real server stacks, sshd hosts, training
# runs. One entry per test file or test; the reason says what makes it slow (measured with
# `pytest --durations=0` on the 2-core CI machine, docs/benchmarks.md "Test suite").
#
# An entry is a test file's name, or the name with the folders above it when the name alone is
# ambiguous ("registry/test_docs_commands.py"), optionally "::test_name" (every
# parametrization of it, in whichever of the files so named defines it). Entries match by
# name, wherever the file lives under tests/, so a file moved to another folder stays slow; a
# file renamed or removed, a test renamed, or a name that matches two files fails the
# collection until this list is updated (check_slow_list).
# The `slow` markers written in test files (pytestmark / @pytest.mark.slow) also count; this
# list is the one that makes the order.

SLOW: dict[str, str] = {
    # Whole files.
    "test_docs_python.py": "the registry docs' Python snippets, each a fresh interpreter",
    "test_e2e.py": "train, register, promote, predict, evaluate through mlflow run (~2 min)",
    "test_mlflow_run.py": "training runs through the real mlflow run CLI and the trainer's CLI",
    "test_ssh.py": "sshd hosts in network namespaces, mlflow run -b ssh, two-node DDP",
    "test_torchrun.py": "mlflow run -b torchrun: gloo process groups, 60-100 s per run",
    "test_supervised_run.py": "real supervisor and node processes, a node failing (~20 s)",
    "test_outage.py::test_eight_clients_ride_out_an_outage":
        "eight clients logging through a 90 s server outage",
    "test_faults.py": "team stack components killed and restarted mid-logging (~3 min)",
    "test_ec2_hosts.py": "mlflow run -b ec2 on sshd hosts booted at moto's addresses: two "
                         "nodes, a kept cluster, a failing trainer, a spot interruption on one "
                         "node and on two",
    "test_ui.py": "mlflow run through the team stack, then Chromium on the UI",
    # Single tests.
    "registry/test_docs_commands.py::test_registry_md_commands_run_as_written":
        "docs/registry.md's 9 mlflow run commands, a download, mlflow models serve (~2-5 min)",
    "test_docs_commands.py::test_make_train_offline_with_shipped_imagenet_weights":
        "make train: efficientnet_lite0 at 224 px, ONNX registration",
    "test_docs_commands.py::test_make_train_from_a_zip_from_scratch": "make train, 5 epochs",
    "test_docs_commands.py::test_make_ui_serves_the_runs_of_make_train": "make ui, a real server",
    "test_docs_commands.py::test_torchrun_backend_cpu_smoke_test": "mlflow run -b torchrun",
    "test_docs_commands.py::test_fowlflow_status_logs_attach_cancel":
        "a detached torchrun run, then status/logs/attach/cancel",
    "test_docs_commands.py::test_onnx_benchmark_quick_form": "bench/onnx_vs_torch.py --quick",
    "test_docs_commands.py::test_load_benchmark_one_client":
        "bench/load_server.py: its own team stack (PostgreSQL, SeaweedFS, mlflow server)",
    "test_docs_commands.py::test_team_server_commands":
        "a fresh team stack started, stopped and restarted as the docs do (~2.5 min)",
    "test_lifecycle.py::test_resume_refuses_a_checkpoint_that_would_run_code": "mlflow run",
    "test_lifecycle.py::test_sigterm_to_mlflow_run_stops_its_trainer_and_ends_the_run":
        "SIGTERM to a real mlflow run",
    "test_lifecycle.py::test_stop_signal_to_the_trainer_ends_the_run_killed":
        "SIGTERM/SIGHUP to a real mlflow run's trainer",
    "test_lifecycle.py::test_class_names_mlflow_refuses_in_metric_keys": "mlflow run",
    "test_sources.py::test_mlflow_run_reads_a_relative_data_path_from_where_it_was_typed":
        "mlflow run typed in another folder (~30 s)",
    "test_predict_evaluate.py::test_mlflow_run_typed_elsewhere_reads_relative_paths_from_there":
        "mlflow run -e predict / evaluate (~30 s)",
    "test_params.py::test_evaluate_with_a_trailing_slash_under_mlflow_run": "mlflow run",
    "test_params.py::test_register_without_val_dir_under_mlflow_run": "mlflow run",
    "test_register.py::test_downloaded_onnx_model_is_self_contained_and_torch_free":
        "a fresh interpreter serving the downloaded model (~20 s)",
    "test_run_tracker.py::test_failed_artifact_upload_says_where_to_look":
        "an mlflow server with a dead S3 (~50 s with its setup)",
    "test_users.py::test_runs_record_the_authenticated_user_and_experiments_the_training_kind":
        "mlflow run through the team stack",
    "test_users.py::test_start_renews_an_older_auth_ini_and_keeps_the_throttle_settings":
        "the team stack stopped and started again (~45 s)",
    "test_stack.py::test_stop_then_start_keeps_runs_artifacts_and_ports":
        "the team stack stopped and started again (~45 s)",
    "test_ec2_commands.py::test_gc_finds_planted_orphans_dry_run_first":
        "three fowlflow CLI starts against moto (~30 s)",
    "test_sweep.py::test_a_bad_learning_rate_is_pruned_and_its_run_says_so":
        "a real sweep: trials train through python -m fowlflow.tune (~55 s)",
    "test_trainer_hook.py::test_on_epoch_sees_each_epoch_and_can_stop_training":
        "real training epochs (~35 s)",
    "test_live_metrics.py::test_a_step_metric_is_in_the_store_before_the_first_epoch_ends":
        "an in-process training run into a SQLite store, model logged (~15-40 s)",
    "test_checkpoint_artifact.py::test_checkpoint_artifact_is_kept_and_resumed_from_exactly":
        "three in-process training runs, each logging a model (~45-80 s)",
    "test_worker.py::test_a_sweep_and_a_worker_share_the_study_without_duplicates":
        "a sweep and a tune worker on a real PostgreSQL cluster (~50-110 s)",
    "test_objective.py::test_a_sweep_minimizes_the_validation_loss": "a real sweep (~45 s)",
    "test_objective.py::test_the_metrics_a_sweep_can_optimize_are_those_the_trainer_reports":
        "real training epochs (~15 s)",
    "test_backends.py::test_torchrun_trials_are_nested_child_runs_and_the_best_is_registered":
        "the module's mlflow run -e tune -P backend=torchrun sweep: 2 trials, ONNX registration",
    "test_backends.py::test_a_pruned_torchrun_trial_is_cancelled_and_marked_as_local_ones":
        "shares that sweep (runs it when selected alone)",
    "test_backends.py::test_a_stopped_sweep_cancels_its_running_torchrun_trials":
        "a torchrun trial stopped by SIGTERM (~45-85 s)",
    "test_backends.py::test_a_failed_torchrun_trial_shows_the_trainers_cause":
        "a torchrun trial whose trainer fails on its data (~20 s)",
    "tune/test_backends_ssh.py": "two sshd hosts, an mlflow server, 2 ssh trials at once",
    "tune/test_docs.py": "docs/tune.md's sweep through mlflow run: 2 trials, ONNX registration",
    "test_sweep.py::test_a_stopped_sweep_resumes_without_repeating_finished_trials":
        "a real sweep stopped by SIGTERM mid-trial, then resumed (~60-100 s)",
    "tune/test_backends_ec2.py": "moto + sshd instances in network namespaces, mlflow servers: "
                                 "ec2 sweeps of 2 and 3 trials, 2 at once, and a refused launch",
    "test_worker.py::test_a_worker_launches_its_trials_through_the_sweeps_torchrun_backend":
        "a -P backend=torchrun sweep and a tune worker, 2 trials (~85 s)",
    "test_resumed_run_metrics.py::test_a_run_resumed_from_an_older_checkpoint_logs_each_epoch_once":
        "two in-process training runs into a SQLite store, a model logged twice",
    "test_ec2_commands.py::test_ls_shows_idle_time_from_the_last_run":
        "a fowlflow CLI start against moto (~50 s under load)",
    "test_data_paths.py": "real training runs on photos: cached vs streamed, streamed resume, "
                          "shard sets (local, S3 + registration), two gloo ranks (~7-10 min)",
    "test_shards_train.py": "a 1-trial sweep on a shard set, its model registered (~60 s)",
    "test_shards.py::test_documented_pack_of_hymenoptera":
        "packs all of hymenoptera through the CLI and runs the docs' Python on it (13-52 s)",
    "test_shards_s3.py::test_documented_pack_of_hymenoptera_to_s3":
        "packs all of hymenoptera to SeaweedFS through the CLI (7-31 s)",
}


# About how long each slow file takes, in seconds (its tests' setup + call + teardown in the
# slow pass, 2-3 workers on the 2-core CI machine; estimated from the CI rehearsals' slowest
# tests up to commit 52ada8f and the per-file times in docs/benchmarks.md). Used only to order
# the slow pass, longest first: xdist hands the files to whichever worker is free next, in
# collection order (--no-loadscope-reorder), so a long file started last would leave the other
# worker idle at the end. A file not listed counts as 30 s; a stale number only costs time.
# Names match as in SLOW.
SLOW_SECONDS: dict[str, int] = {
    "tests/test_docs_commands.py": 450,
    "test_data_paths.py": 420,
    "test_ssh.py": 350,
    "test_torchrun.py": 350,
    "test_ec2_hosts.py": 330,
    "test_faults.py": 200,
    "tune/test_backends.py": 200,
    "tune/test_backends_ec2.py": 180,
    "test_mlflow_run.py": 150,
    "test_lifecycle.py": 150,
    "registry/test_docs_commands.py": 125,
    "test_worker.py": 120,
    "test_outage.py": 100,
    "test_objective.py": 100,
    "test_ui.py": 90,
    "test_run_folders.py": 75,
    "test_sweep.py": 70,
    "test_e2e.py": 65,
    "tune/test_docs.py": 60,
    "tune/test_backends_ssh.py": 60,
    "test_shards_train.py": 50,
}


def slow_seconds(path: Path) -> int:
    return next((seconds for entry, seconds in SLOW_SECONDS.items() if _names(entry, path)), 30)


def _names(entry: str, path: Path) -> bool:
    """Whether an entry's file part names ``path`` (matched on trailing parts)."""
    parts = tuple(entry.split("::", 1)[0].split("/"))
    return path.parts[-len(parts):] == parts


def _entry_files(entry: str, test_files: list[Path]) -> list[Path]:
    """The test files under tests/ an entry's file part names."""
    return [f for f in test_files if _names(entry, f)]


def check_slow_list(slow: dict[str, object], tests_dir: Path) -> list[str]:
    """What is wrong with ``slow``: entries whose file is not under ``tests_dir``, that name
    several files, or whose test is not defined in the file (empty: all good)."""
    import ast

    def defines(path: Path, name: str) -> bool:
        tree = ast.parse(path.read_text(), str(path))
        return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name
                   for n in ast.walk(tree))

    test_files = sorted(tests_dir.rglob("test_*.py"))
    problems = []
    for entry in slow:
        files = _entry_files(entry, test_files)
        names = ", ".join(str(f.relative_to(tests_dir)) for f in files)
        if not files:
            problems.append(f"{entry}: no such test file under {tests_dir} (moved or renamed? "
                            "update SLOW in tests/conftest.py)")
        elif "::" not in entry and len(files) > 1:
            problems.append(f"{entry}: names {len(files)} files ({names}): add the folder "
                            "above it")
        elif "::" in entry:
            name = entry.split("::", 1)[1]
            if not any(defines(f, name) for f in files):
                problems.append(f"{entry}: no test {name} in {names} (renamed? update SLOW "
                                "in tests/conftest.py)")
    return problems


def is_listed_slow(path: Path, test_name: str, slow: dict[str, str] = SLOW) -> bool:
    for entry in slow:
        name = entry.partition("::")[2]
        if _names(entry, path) and (not name or name == test_name):
            return True
    return False


# The suite's servers need room: SeaweedFS turns every volume read-only (PutObject answers
# "InternalError") once its disk has under 1 % free, and each test keeps its stores in /tmp.
MIN_FREE_GIB = 5


def pytest_sessionstart(session):
    """Refuse to start on a nearly full disk, naming it, instead of failing an hour later in
    SeaweedFS with an InternalError."""
    import shutil
    import tempfile

    where = tempfile.gettempdir()
    free = shutil.disk_usage(where).free / 2**30
    if free < MIN_FREE_GIB:
        raise pytest.UsageError(
            f"only {free:.1f} GiB free in {where}; the tests need {MIN_FREE_GIB} GiB (their "
            "stores, SeaweedFS volumes and checkpoints go there). Free some space, or point "
            "TMPDIR at a disk with room.")


_FIRST_SLOW = pytest.StashKey[object]()
_FAST_FAILED = [0]  # fast tests failed in this process (pytest_runtest_logreport)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(session, config, items):
    """Mark the SLOW tests, then order the run: fast tests first in collection order, slow ones
    after, the longest files first (SLOW_SECONDS); a file's tests stay together, so its module
    fixtures are built once."""
    problems = check_slow_list(SLOW, ROOT / "tests") + check_slow_list(SLOW_SECONDS, ROOT / "tests")
    if problems:
        raise pytest.UsageError("tests/conftest.py SLOW or SLOW_SECONDS is out of date:\n  "
                                + "\n  ".join(problems))
    slow_mark = pytest.mark.slow(reason="listed in tests/conftest.py SLOW")
    for item in items:
        name = getattr(item, "originalname", item.name)
        if is_listed_slow(Path(item.path), name) and not item.get_closest_marker("slow"):
            item.add_marker(slow_mark)
    fast = [i for i in items if not i.get_closest_marker("slow")]
    slow = [i for i in items if i.get_closest_marker("slow")]
    slow.sort(key=lambda i: -slow_seconds(Path(i.path)))  # stable: a file's tests stay together
    items[:] = fast + slow
    config.stash[_FIRST_SLOW] = slow[0] if slow and fast else None


def pytest_runtest_logreport(report):
    """Count the failed fast tests (a slow test's failure does not stop the others)."""
    if report.failed and "slow" not in report.keywords:
        _FAST_FAILED[0] += 1


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Fail fast: when the first slow test is next and a fast test has failed, stop here (exit
    status 1, the failures reported as usual) instead of running the slow tests."""
    if item is item.config.stash.get(_FIRST_SLOW, None) and _FAST_FAILED[0]:
        item.session.shouldfail = (f"{_FAST_FAILED[0]} fast test(s) failed: the slow tests "
                                   "(tests/conftest.py SLOW) were not run")
        return True
    return None


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
    """``mlflow.db`` and ``optuna.db`` (the sweeps' default study store), each with its
    modification time, and the experiments, runs and models under ``mlruns/`` in the
    repository."""
    found = set()
    for name in ("mlflow.db", "optuna.db"):
        db = ROOT / name
        if db.exists():
            found.add(f"{name} modified {db.stat().st_mtime_ns}")
    mlruns = ROOT / "mlruns"
    if mlruns.is_dir():
        found.add("mlruns")
        for pattern in ("*", "*/*", "*/models/*"):
            found |= {str(p.relative_to(ROOT)) for p in mlruns.glob(pattern)}
    return found


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store in tmp_path, named by ``MLFLOW_TRACKING_URI`` for this test
    (its subprocesses and its in-process fluent calls read it), which runs in tmp_path.

    MLflow puts the artifacts of an experiment created without an ``artifact_location`` in
    ``./mlruns`` of the process that creates it: for a SQLite store, the Default experiment
    (id 0) is created with the tables. So the tables are created here, from tmp_path, and the
    test runs in tmp_path, as do the processes it starts without a ``cwd``. A process started in
    another folder that creates an experiment (``mlflow run --experiment-name``,
    ``MLFLOW_EXPERIMENT_NAME``) puts its artifacts under that folder: start those in tmp_path.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow's module-level URI wins over the variable: one left by another area's fixture
    # (mlflow.set_tracking_uri) must not point this test's fluent calls at its store.
    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.chdir(tmp_path)
    default = mlflow.MlflowClient(uri).get_experiment("0")  # creates the tables
    assert default.artifact_location == str(tmp_path / "mlruns" / "0")
    assert mlflow.get_tracking_uri() == uri
    return uri


@pytest.fixture
def client(tracking_uri):
    """``MlflowClient`` on this test's store (``tracking_uri``), named explicitly."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri)


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
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if "--experiment-name" in args or "--experiment-id" in args:
        # The command names its experiment: an ambient one (MLFLOW_EXPERIMENT_ID/NAME, e.g. left
        # in os.environ by a package fixture's mlflow.set_experiment) would make mlflow run
        # refuse ("Specify only one of 'experiment-name' or 'experiment-id'").
        for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            full_env.pop(name, None)
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
