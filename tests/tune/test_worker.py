"""``fowlflow tune worker`` on a real PostgreSQL: a sweep and a worker share one study.

A throwaway PostgreSQL cluster (:class:`fowlflow.server.postgres.PostgresServer`, the team
stack's own, alone) holds the Optuna study; its password reaches the processes only through
the 0600 ``PGPASSFILE`` libpq reads, never a command line. Tracking: this test's SQLite store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import optuna
import pytest

from tests.conftest import BIN
from tests.net import free_port, stack_parts
from tests.test_docs_commands import documented
from tests.tune.test_sweep import TINY

DOC_STUDY, DOC_STORAGE = "fowlflow-1a2b3c4d5e", "postgresql://mlflow@db.example.com:5432/optuna"


@pytest.fixture(scope="module")
def postgres():
    with stack_parts("fftune-pg-", "postgres") as stack:
        with stack.postgres.connect("postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE optuna")
        yield stack.postgres


@pytest.fixture
def storage(postgres, monkeypatch) -> str:
    """The study storage as users write it (no password), libpq reading the password file."""
    monkeypatch.setenv("PGPASSFILE", str(postgres.pgpass))
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return f"postgresql://mlflow@{postgres.cfg.host}:{postgres.port}/optuna"


def _collect(proc: subprocess.Popen, lines: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    thread.start()
    return thread


def test_a_sweep_and_a_worker_share_the_study_without_duplicates(postgres, storage, client,
                                                                 tmp_path):
    sweep = subprocess.Popen(
        [sys.executable, "-m", "fowlflow.tune", *TINY, "--num_epochs", "1", "--n_trials", "4",
         "--parallel", "1", "--pruner", "none", "--storage", storage, "--study_name", "shared",
         "--registered_model_name", "none", "--output_dir", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sweep_out: list[str] = []
    for line in sweep.stdout:  # the study exists, with the sweep's settings, once this is shown
        sweep_out.append(line)
        if "parent run" in line:
            break
    assert "parent run" in "".join(sweep_out), "".join(sweep_out)[-3000:]
    sweep_reader = _collect(sweep, sweep_out)
    command = documented("fowlflow tune worker --study fowlflow-1a2b3c4d5e "
                         "--storage postgresql://mlflow@db.example.com:5432/optuna")
    assert DOC_STUDY in command and DOC_STORAGE in command
    command = command.replace(DOC_STUDY, "shared").replace(DOC_STORAGE, storage)
    worker = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=600)
    assert sweep.wait(timeout=600) == 0, "".join(sweep_out)[-4000:]
    sweep_reader.join(timeout=10)
    sweep_text, worker_text = "".join(sweep_out), worker.stdout + worker.stderr
    assert worker.returncode == 0, worker_text[-4000:]

    trials = optuna.load_study(study_name="shared",
                               storage=storage.replace("postgresql://", "postgresql+psycopg://"))
    complete = [t for t in trials.trials if t.state.name == "COMPLETE"]
    assert sorted(t.number for t in complete) == sorted({t.number for t in complete})
    assert len(complete) == 4, [(t.number, t.state.name) for t in trials.trials]
    (parent,) = client.search_runs(["0"], "tags.`fowlflow.kind` = 'tune'")
    children = client.search_runs(["0"], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_number = {}
    for child in children:
        by_number.setdefault(int(child.data.tags["fowlflow.trial_number"]), []).append(child)
    assert {n: len(runs) for n, runs in by_number.items()} == {t.number: 1 for t in complete}
    for t in complete:
        assert by_number[t.number][0].info.run_id == t.user_attrs["mlflow_run_id"]
    ran_here = {t.number for t in complete if f"trial {t.number} started" in worker_text}
    ran_there = {t.number for t in complete if f"trial {t.number} started" in sweep_text}
    assert ran_here and ran_there and not ran_here & ran_there, (sweep_text, worker_text)
    assert parent.data.metrics["trials_complete"] == 4  # the sweep waited for the worker
    assert "finished trials (n_trials=4)" in worker_text
    assert postgres.secrets.db_password not in sweep_text + worker_text


def test_a_worker_refuses_an_unknown_study_an_unreachable_storage_and_a_password(storage,
                                                                              tracking_uri):
    def worker(study: str, url: str) -> str:
        proc = subprocess.run([str(BIN / "fowlflow"), "tune", "worker", "--study", study,
                               "--storage", url], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        return proc.stderr

    optuna.create_study(study_name="plain",
                        storage=storage.replace("postgresql://", "postgresql+psycopg://"),
                        load_if_exists=True)
    message = worker("nope", storage)
    assert "There is no study 'nope'" in message and "plain" in message
    assert "was not made by `mlflow run . -e tune`" in worker("plain", storage)
    down = f"postgresql://mlflow@127.0.0.1:{free_port()}/optuna"
    message = worker("nope", down)
    assert "can't be used as the Optuna study storage" in message and "OperationalError" in message
    message = worker("nope", storage.replace("mlflow@", "mlflow:s3cret@"))
    assert "don't put the password on the command line" in message and "s3cret" not in message


# --- a worker's trials through the sweep's backend ---------------------------------------------

def test_a_worker_uses_the_sweeps_backend_but_not_its_hosts_or_kept_cluster(monkeypatch):
    from fowlflow.errors import ConfigError
    from fowlflow.tune.worker import worker_backend

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    torchrun = {"backend": "torchrun", "backend_config": {"process_count_per_node": 1}}
    spec = worker_backend(torchrun, None, None, parallel=2)
    assert spec.name == "torchrun" and spec.slots[0]["process_count_per_node"] == 1
    assert not worker_backend(torchrun, "none", None, parallel=1).remote  # a process here
    assert not worker_backend({}, None, None, parallel=1).remote  # an older sweep's study
    ssh = {"backend": "ssh", "backend_config": {"hosts": ["gpu-a", "gpu-b"]}}
    with pytest.raises(ConfigError, match="on its hosts; give this worker its own with "
                                          "--backend_config"):
        worker_backend(ssh, None, None, parallel=1)
    own = worker_backend(ssh, None, '{"hosts": ["gpu-c"]}', parallel=1)
    assert own.slots == ({"hosts": ["gpu-c"]},)
    kept = {"backend": "ec2", "backend_config": {"cluster_name": "sweep"}}
    with pytest.raises(ConfigError, match="on its ec2 cluster_name 'sweep'"):
        worker_backend(kept, None, None, parallel=1)
    fresh = worker_backend({"backend": "ec2", "backend_config": {"spot": True}}, None, None, 1)
    assert fresh.slots == ({"spot": True},)
    with pytest.raises(ConfigError, match="the torchrun backend refuses it: unknown"):
        worker_backend(torchrun, None, '{"gpu": [0]}', parallel=1)


def test_a_worker_launches_its_trials_through_the_sweeps_torchrun_backend(tracking_uri, client,
                                                                          tmp_path):
    """A sweep with ``--backend torchrun`` (CPU processes, SQLite study) and a worker that
    joins it: the worker's trials are torchrun runs too, without the worker naming a backend.

    3 trials, the sweep one at a time: the worker, started once the sweep's trial 0 runs, has
    two trials' time to take one (with 2 trials, a worker slower to start than trial 0 was to
    run found none left, on a loaded machine). When the sweep and the worker ask for the last
    trial at once, one of them gets a trial that is not needed: it is recorded FAIL, not run.
    """
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    run_dir = tmp_path / "runs"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "fowlflow.tune", *TINY, "--num_epochs", "1", "--n_trials", "3",
         "--parallel", "1", "--pruner", "none", "--storage", storage, "--study_name", "shared",
         "--registered_model_name", "none", "--output_dir", str(tmp_path / "out"),
         "--backend", "torchrun",
         "--backend_config", f'{{"process_count_per_node": 1, "run_dir": "{run_dir}"}}'],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sweep_out: list[str] = []
    for line in sweep.stdout:
        sweep_out.append(line)
        if "trial 0 started" in line:
            break
    sweep_reader = _collect(sweep, sweep_out)
    worker = subprocess.run([str(BIN / "fowlflow"), "tune", "worker", "--study", "shared",
                             "--storage", storage], capture_output=True, text=True, timeout=600)
    assert sweep.wait(timeout=600) == 0, "".join(sweep_out)[-4000:]
    sweep_reader.join(timeout=10)
    worker_text = worker.stdout + worker.stderr
    assert worker.returncode == 0, worker_text[-4000:]
    assert "trials through torchrun" in worker_text
    study = optuna.load_study(study_name="shared", storage=storage)
    shown = (f"{[(t.state.name, t.user_attrs) for t in study.trials]}\nworker:\n"
             f"{worker_text[-3000:]}\nsweep:\n{''.join(sweep_out)[-3000:]}")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3, shown
    assert all(t.state.name == "FAIL" and t.user_attrs["error"].startswith("not run")
               for t in study.trials if t not in complete), shown
    mine = [t for t in complete if f"trial {t.number} started through torchrun" in worker_text]
    assert mine, shown
    (parent,) = client.search_runs(["0"], "tags.`fowlflow.kind` = 'tune'")
    for trial in mine:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["fowlflow.backend"] == "torchrun"  # launched by the backend
        assert run.data.params["backend"] == "torchrun" and run.info.status == "FINISHED"
        assert (run_dir / run.info.run_id / "node0.log").is_file()  # the sweep's run_dir
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.metrics["trials_complete"] == 3
