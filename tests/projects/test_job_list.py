"""``fowlflow ls`` against a real SQLite store, through the real ``fowlflow`` CLI.

The runs carry the tags a backend sets (``fowlflow.backend``, ``fowlflow.hosts``); a run
without them (a plain ``mlflow run``) is not listed. A launch by the real backend is listed in
tests/projects/test_torchrun.py (``test_detached_run_status_attach_and_logs``).
"""

from __future__ import annotations

import json

import pytest

from fowlflow.projects.job_list import age
from tests.projects.helpers import fowlflow
from tests.test_docs_commands import bash, clean_env, documented, optional_forms, substitute


def _launched(client, experiment_id: str, backend: str, hosts: list[str]) -> str:
    run_id = client.create_run(experiment_id).info.run_id
    client.set_tag(run_id, "fowlflow.backend", backend)
    client.set_tag(run_id, "fowlflow.hosts", json.dumps(hosts))
    return run_id


@pytest.mark.slow  # ~10-20 s: eight fowlflow CLI start-ups
def test_ls_lists_launched_runs_filtered_by_experiment_and_state(local_store, tmp_path):
    client = local_store.client
    birds = client.create_experiment("birds")
    other = client.create_experiment("other")
    running = _launched(client, birds, "ssh", ["gpu-a", "gpu-b"])
    failed = _launched(client, birds, "torchrun", ["box"])
    client.set_terminated(failed, "FAILED")
    elsewhere = _launched(client, other, "ssh", ["gpu-c"])
    plain = client.create_run(birds).info.run_id  # not launched by a fowlflow backend

    every = fowlflow("ls")
    assert every.returncode == 0, every.stderr
    lines = every.stdout.splitlines()
    assert lines[0].split() == ["RUN_ID", "EXPERIMENT", "BACKEND", "HOSTS", "STATE", "AGE",
                                "ATTACH"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {running, failed, elsewhere} and plain not in every.stdout
    assert rows[running][1:5] == ["birds", "ssh", "gpu-a,gpu-b", "RUNNING"]
    assert rows[running][-3:] == ["fowlflow", "attach", running]
    assert rows[failed][1:5] == ["birds", "torchrun", "box", "FAILED"]
    assert list(rows)[0] == elsewhere  # newest first

    only = fowlflow("ls", "--experiment", "birds", "--state", "RUNNING")
    assert [line.split()[0] for line in only.stdout.splitlines()[1:]] == [running]
    # docs/backends.md's forms, as written
    env = clean_env(MLFLOW_TRACKING_URI=local_store.uri)
    bare, full = optional_forms(documented(
        "fowlflow ls [--experiment NAME] [--state STATE] [--limit N]"))
    out = bash(bare, tmp_path, env).stdout
    assert [line.split()[0] for line in out.splitlines()[1:]] == list(rows)
    full = substitute(full, {"NAME": "birds", "STATE": "FAILED", "--limit N": "--limit 5"})
    out = bash(full, tmp_path, env).stdout
    assert [line.split()[0] for line in out.splitlines()[1:]] == [failed]
    out = bash(documented("fowlflow ls --state RUNNING"), tmp_path,
               env).stdout
    assert {line.split()[0] for line in out.splitlines()[1:]} == {running, elsewhere}
    none = fowlflow("ls", "--experiment", "other", "--state", "FAILED")
    assert none.returncode == 0 and "no runs launched" in none.stdout
    missing = fowlflow("ls", "--experiment", "nope")
    assert missing.returncode == 2 and "no experiment named 'nope'" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad_state = fowlflow("ls", "--state", "DONE")
    assert bad_state.returncode == 2 and "invalid choice" in bad_state.stderr


def test_age_reads_like_a_job_list():
    now = 1_000_000.0
    assert age(int((now - 42) * 1000), now) == "42s"
    assert age(int((now - 600) * 1000), now) == "10m"
    assert age(int((now - 3 * 3600) * 1000), now) == "3h"
    assert age(int((now - 5 * 86400) * 1000), now) == "5d"
    assert age(None, now) == "-"


def test_gc_leaves_out_ec2_runs_whose_folders_went_with_their_instances(local_store):
    """``fowlflow gc`` asks each host of an ended run over ssh; an ec2 run's instances are
    terminated (or their cluster is kept until ``fowlflow ec2 down``): only its other runs are
    candidates, so gc does not time out on every terminated instance and exit non-zero."""
    from fowlflow.projects.run_folders import ended_runs

    client = local_store.client
    birds = client.create_experiment("gc-birds")
    on_ssh = _launched(client, birds, "ssh", ["gpu-a"])
    on_ec2 = _launched(client, birds, "ec2", ["10.0.0.5"])
    for run_id in (on_ssh, on_ec2):
        client.set_terminated(run_id, "FINISHED")
    assert [r.info.run_id for r in ended_runs(client, [birds], 0, 0)] == [on_ssh]
