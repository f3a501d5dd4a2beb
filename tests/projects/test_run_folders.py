"""``fowlflow gc`` on real runs: a torchrun run (this machine) and an ssh run (the loopback
sshd), both logged to the real tracking server; the real ``fowlflow`` CLI removes their run
folders, newest kept with ``--keep-last``, environments untouched, a dry run first."""

from __future__ import annotations

import pytest

from tests.projects.conftest import ssh_config
from tests.projects.helpers import STANDIN, finish, fowlflow, mlflow_cli
from tests.test_docs_commands import bash, clean_env, documented, optional_forms, substitute

pytestmark = pytest.mark.slow


def test_gc_removes_ended_runs_folders_and_keeps_environments(server_store, loopback_sshd,
                                                              keys, tmp_path):
    local_runs = tmp_path / "runs"
    code, _, err = finish(mlflow_cli(STANDIN, "torchrun", {"run_dir": str(local_runs),
                                                           "process_count_per_node": 1},
                                     {"steps": 1, "sleep": 0}))
    assert code == 0, err[-3000:]
    remote = tmp_path / "remote"
    (remote / "envs" / "virtualenv-abc").mkdir(parents=True)  # a shared environment
    (remote / "envs" / "virtualenv-abc" / "python").write_bytes(b"\0" * 65536)
    code, _, err = finish(mlflow_cli(STANDIN, "ssh", ssh_config(
        keys, loopback_sshd, remote_dir=str(remote), process_count_per_node=1),
        {"steps": 1, "sleep": 0}))
    assert code == 0, err[-3000:]
    newest, oldest = [r.info.run_id for r in server_store.runs()]
    folders = {oldest: local_runs / oldest, newest: remote / "runs" / newest}
    assert all(f.is_dir() for f in folders.values())
    name = server_store.client.get_experiment(server_store.experiment_id).name
    gc = ["gc", "--experiment", name]

    # docs/backends.md's forms as written: the bare one is a dry run over every experiment
    bare, full = optional_forms(documented(
        "fowlflow gc [--experiment NAME] [--older-than DAYS] [--keep-last N] [--yes]"))
    env = clean_env(MLFLOW_TRACKING_URI=server_store.uri)
    recent = bash(bare, tmp_path, env)  # ended less than 7 days ago: nothing to do
    assert "add --yes" in recent.stdout and not any(r in recent.stdout for r in folders)
    dry = fowlflow(*gc, "--older-than", "0")
    assert dry.returncode == 0, dry.stderr
    assert all(f"would remove {'local' if k == oldest else 'root@' + loopback_sshd.address}:"
               in dry.stdout and str(f) in dry.stdout for k, f in folders.items()), dry.stdout
    assert "add --yes" in dry.stdout and all(f.is_dir() for f in folders.values())

    bash(substitute(full, {"NAME": name, "DAYS": "0", "--keep-last N": "--keep-last 1"}),
         tmp_path, env)
    assert not folders[oldest].exists() and folders[newest].is_dir()
    every = fowlflow(*gc, "--older-than", "0", "--yes")
    assert every.returncode == 0 and f"removed root@{loopback_sshd.address}:" in every.stdout
    assert not folders[newest].exists()
    assert (remote / "envs" / "virtualenv-abc").is_dir()
    # the host's disk use is back to the environment cache: no file outside envs/ is left
    assert _bytes(remote) == _bytes(remote / "envs") == 65536
    assert all("fowlflow.run_folders_removed" in r.data.tags for r in server_store.runs())
    again = fowlflow(*gc, "--older-than", "0")
    assert "would remove" not in again.stdout


def _bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
