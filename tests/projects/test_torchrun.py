"""``mlflow run -b torchrun`` for real: CPU processes with gloo, the real ``mlflow`` CLI.

The first test trains the real trainer (tiny settings) with 2 DDP processes; the others use the
stand-in entry point in ``standin/`` (deterministic length) to test failure, Ctrl-C, detached
runs, attach, cancel and a supervisor that died.
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from fowlflow.errors import ConfigError
from fowlflow.projects.torchrun import TorchrunBackend
from tests.conftest import ROOT, TINY_PARAMS
from tests.net import free_port, wait_until
from tests.projects.helpers import STANDIN, finish, fowlflow, marked_processes, mlflow_cli

pytestmark = pytest.mark.slow


def _cfg(tmp_path, **extra) -> dict:
    return {"run_dir": str(tmp_path / "runs"), **extra}


def test_bad_config_is_rejected_before_a_run_exists(local_store, tmp_path):
    config = {"ENV_MANAGER": "local", "SYNCHRONOUS": False, "DOCKER_ARGS": {},
              "STORAGE_DIR": None, "build_image": False, "docker_auth": None,
              "proces_count_per_node": 2}
    with pytest.raises(ConfigError, match="valid keys are: .*process_count_per_node"):
        TorchrunBackend().run(str(STANDIN), "main", {}, None, config, local_store.uri, "0")
    with pytest.raises(ConfigError, match="--env-manager local"):
        TorchrunBackend().run(str(STANDIN), "main", {}, None, {"ENV_MANAGER": "conda"},
                              local_store.uri, "0")
    assert not local_store.runs()


def test_a_tracking_server_that_is_down_fails_at_once(tmp_path):
    """Nothing listens at the tracking URI: a clear message within seconds, not MLflow's
    minutes of retries before the first word."""
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    code, _, err = finish(mlflow_cli(STANDIN, "torchrun", _cfg(tmp_path),
                                     env={"MLFLOW_TRACKING_URI": uri}), timeout=120)
    assert code == 1 and f"the tracking server {uri} does not answer" in err, err[-3000:]
    assert "fix: start it" in err and "Traceback" not in err
    assert time.monotonic() - started < 60
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_trainer_runs_ddp_on_cpu_with_gloo(local_store, tmp_path):
    params = {**TINY_PARAMS, "data": "synthetic", "output_dir": str(tmp_path / "out")}
    code, out, err = finish(mlflow_cli(ROOT, "torchrun", _cfg(tmp_path,
                                                              process_count_per_node=2),
                                       params), timeout=400)
    assert code == 0, err[-4000:]
    assert "Epoch 1/1" in out  # streamed to the terminal while it ran
    run = local_store.only_run()
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["fowlflow.backend"] == tags["mlflow.project.backend"] == "torchrun"
    assert tags["fowlflow.process_count_per_node"] == "2"
    assert tags["fowlflow.gpus"] == "none (CPU, gloo)"
    assert "--nproc-per-node 2" in tags["fowlflow.command"]
    assert os.path.exists(tags["fowlflow.log_path"])
    assert "Epoch 1/1" in local_store.artifact_text(run.info.run_id, "fowlflow-logs/node0.log")
    assert run.data.metrics, "rank 0 logged no metrics"
    assert not marked_processes(run.info.run_id)


def test_relative_data_is_found_where_mlflow_run_was_typed(local_store, tmp_path):
    """The trainer runs under a detached supervisor, with no `mlflow run` above it to ask."""
    import mlflow

    from tests.conftest import make_imagefolder

    user = tmp_path / "user"
    make_imagefolder(user / "rel" / "imgs")
    params = {**TINY_PARAMS, "data": "rel/imgs", "output_dir": str(tmp_path / "out")}
    code, out, err = finish(mlflow_cli(ROOT, "torchrun", _cfg(tmp_path,
                                                              process_count_per_node=1),
                                       params, cwd=user), timeout=400)
    assert code == 0, err[-4000:]
    run = local_store.only_run()
    assert run.data.tags["data_root"] == str(user / "rel" / "imgs")
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
    assert info.metadata["data_uri"] == str(user / "rel" / "imgs")


def test_failed_run_exits_nonzero_keeps_output_and_ends_failed(local_store, tmp_path):
    code, out, err = finish(mlflow_cli(STANDIN, "torchrun",
                                       _cfg(tmp_path, process_count_per_node=1),
                                       {"steps": 5, "sleep": 0.1, "fail_at": 1}))
    assert code == 1
    assert "failing on purpose" in out
    assert "ended FAILED" in err
    run = local_store.only_run()
    assert run.info.status == "FAILED"
    log = local_store.artifact_text(run.info.run_id, "fowlflow-logs/node0.log")
    assert "failing on purpose at step 1" in log and "exited with code" in log


def test_failure_summary_shows_the_cause_first_then_whole_lines(local_store, tmp_path):
    """``-P data=/nonexistent`` with 2 processes: torchrun's ChildFailedError page ends the
    output; the message starts with the trainer's recorded error, and the output tail that
    follows starts at a line boundary."""
    params = {**TINY_PARAMS, "data": str(tmp_path / "nonexistent"),
              "output_dir": str(tmp_path / "out")}
    code, out, err = finish(mlflow_cli(ROOT, "torchrun", _cfg(tmp_path,
                                                              process_count_per_node=2),
                                       params), timeout=400)
    assert code == 1
    run = local_store.only_run()
    assert run.info.status == "FAILED"
    cause = run.data.tags["error"]
    assert "nonexistent" in cause
    message = err[err.index(f"run {run.info.run_id} ended FAILED"):]
    head, _, tail = message.partition("'s output (all of it is in the artifact "
                                      "fowlflow-logs/):\n")
    assert f"cause: {cause.splitlines()[0]}" in head, message[:3000]
    assert "(node0) " in head and "fowlflow: error: " in head, message[:3000]
    assert tail, message[:3000]
    log = local_store.artifact_text(run.info.run_id, "fowlflow-logs/node0.log")
    first_line = tail.splitlines()[0]
    assert f"\n{first_line}\n" in log, first_line  # a whole line of the log, not a piece


def test_ctrl_c_cancels_every_process_and_ends_killed(local_store, tmp_path):
    proc = mlflow_cli(STANDIN, "torchrun", _cfg(tmp_path, process_count_per_node=2),
                      {"steps": 400, "sleep": 0.3})
    run = local_store.wait_for_run(proc)
    local_store.wait_for_metric(run.info.run_id, "allreduce_sum", 2)
    pids = [p.pid for p in marked_processes(run.info.run_id)]
    assert len(pids) >= 3  # torchrun + 2 workers (each in its own session)
    supervisor = int(run.data.tags["fowlflow.pid"])
    # What Ctrl-C sends: SIGINT to the terminal's foreground process group, i.e. `mlflow run`
    # (its own group here: start_new_session) and its children (the log follower); the
    # supervised processes have sessions of their own.
    os.killpg(proc.pid, signal.SIGINT)
    code, _, err = finish(proc, timeout=240)  # the workers alone would run 120 s more
    assert code != 0, err[-3000:]
    assert not marked_processes(run.info.run_id)
    for pid in [*pids, supervisor]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", pid
    assert local_store.only_run().info.status == "KILLED"
    assert "cancelled" in local_store.artifact_text(run.info.run_id, "fowlflow-logs/node0.log")


def test_detached_run_status_attach_and_logs(local_store, tmp_path):
    started = time.monotonic()
    code, _, err = finish(mlflow_cli(STANDIN, "torchrun",
                                     _cfg(tmp_path, process_count_per_node=1, wait=False),
                                     {"steps": 40, "sleep": 0.5}))  # 20 s: still on for ls
    assert code == 0, err[-3000:]
    run_id = local_store.only_run().info.run_id
    assert local_store.only_run().info.status == "RUNNING"
    assert f"fowlflow attach {run_id}" in err
    status = fowlflow("status", run_id)
    assert status.returncode == 0 and "node0: RUNNING" in status.stdout
    listed = [line.split() for line in fowlflow("ls", "--state", "RUNNING").stdout.splitlines()]
    assert [run_id, "Default", "torchrun"] == listed[1][:3] and listed[1][-1] == run_id
    attach = fowlflow("attach", run_id, timeout=180)  # streams to the end
    assert attach.returncode == 0, attach.stderr
    assert "rank 0 done" in attach.stdout
    assert local_store.only_run().info.status == "FINISHED"
    logs = fowlflow("logs", run_id, "--tail", "1")
    assert logs.stdout.strip() == "rank 0 done"
    assert time.monotonic() - started < 200


def test_attach_to_a_run_that_fails_says_why_first(local_store, tmp_path):
    """``fowlflow attach`` of a detached run that fails ends as the attached ``mlflow run``
    does: exit 1, the run's end and the end of its output (issue 11.4), not only "FAILED"."""
    code, _, err = finish(mlflow_cli(STANDIN, "torchrun",
                                     _cfg(tmp_path, process_count_per_node=1, wait=False),
                                     {"steps": 12, "sleep": 0.5, "fail_at": 4}))
    assert code == 0, err[-3000:]
    run_id = local_store.only_run().info.run_id
    attach = fowlflow("attach", run_id, timeout=180)
    assert attach.returncode == 1, attach.stderr
    summary = attach.stderr[attach.stderr.index(f"run {run_id} ended FAILED"):]
    head, _, tail = summary.partition("end of node0's output")
    assert "cause: failing on purpose at step 4" in head, summary
    assert "(node0) fowlflow: error: failing on purpose at step 4" in head, summary
    assert tail, summary
    assert local_store.only_run().info.status == "FAILED"


def _reaper(run_id: str) -> psutil.Process:
    """The supervisor's ``reap`` process for node0 of ``run_id``."""
    found = [p for p in psutil.process_iter(["cmdline"])
             if "reap" in (p.info["cmdline"] or [])[2:3] and run_id in (p.info["cmdline"] or [])]
    assert len(found) == 1, found
    return found[0]


def test_killed_supervisor_takes_its_processes_and_the_run_ends_failed_everywhere(
        local_store, tmp_path):
    """``kill -9`` of the supervisor alone: its reaper kills torchrun and the workers (which
    would otherwise train on and end the run FINISHED later) and records FAILED; status,
    the node and MLflow say the same, and stay so."""
    finish(mlflow_cli(STANDIN, "torchrun", _cfg(tmp_path, process_count_per_node=2,
                                                wait=False), {"steps": 400, "sleep": 0.3}))
    run = local_store.only_run()
    run_id = run.info.run_id
    local_store.wait_for_metric(run_id, "allreduce_sum", 1)
    assert len(marked_processes(run_id)) >= 3  # torchrun + 2 workers
    psutil.Process(int(run.data.tags["fowlflow.pid"])).kill()
    wait_until(lambda: not marked_processes(run_id), what="no process of the run left",
               timeout=60)
    wait_until(lambda: local_store.only_run().info.status != "RUNNING",
               what="the run to end", timeout=60)
    status = fowlflow("status", run_id)
    assert "node0: FAILED" in status.stdout, status.stdout + status.stderr
    assert f"run {run_id}: FAILED; MLflow status FAILED" in status.stdout, status.stdout
    logged = len(local_store.client.get_metric_history(run_id, "allreduce_sum"))
    time.sleep(3)  # nothing is left to log a step or end the run otherwise
    assert local_store.only_run().info.status == "FAILED"
    assert len(local_store.client.get_metric_history(run_id, "allreduce_sum")) == logged
    assert "was killed" in local_store.artifact_text(run_id, "fowlflow-logs/node0.log")


def test_run_whose_supervisor_died_unrecorded_is_ended_by_status(local_store, tmp_path):
    """Supervisor and reaper both killed (nothing records an end): ``fowlflow status`` kills
    the processes still marked with the run before it ends the run FAILED."""
    finish(mlflow_cli(STANDIN, "torchrun", _cfg(tmp_path, process_count_per_node=1,
                                                wait=False), {"steps": 400, "sleep": 0.3}))
    run = local_store.only_run()
    run_id = run.info.run_id
    local_store.wait_for_metric(run_id, "allreduce_sum", 1)
    victims = [psutil.Process(int(run.data.tags["fowlflow.pid"])), _reaper(run_id)]
    for p in victims:  # a crash: nothing gets to record how the run ended
        p.kill()
    psutil.wait_procs(victims, timeout=30)
    assert marked_processes(run_id)  # the trainer trains on, on its own
    status = fowlflow("status", run_id)
    assert "node0: LOST" in status.stdout, status.stdout + status.stderr
    assert "MLflow status FAILED" in status.stdout
    assert not marked_processes(run_id)
    assert local_store.only_run().info.status == "FAILED"
    record = json.loads(local_store.only_run().data.tags["fowlflow.launch"])
    assert record["backend"] == "torchrun"
