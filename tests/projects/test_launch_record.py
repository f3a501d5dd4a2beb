"""The launch record and the node_details tag against a real SQLite store: what is saved is
read back whole, and every tag is valid JSON however many (or long) the hosts."""

from __future__ import annotations

import json

import pytest

from fowlflow.errors import ConfigError
from fowlflow.projects.config import HostSpec, SshAccess
from fowlflow.projects.launch_record import (DETAILS_NOTE_TAG, DETAILS_TAG, LAUNCH_TAG,
                                             MAX_TAG_CHARS, LaunchRecord, NodeRecord)
from fowlflow.projects.runners import LocalRunner, SshRunner


def _record(n: int, name_len: int = 10) -> tuple[LaunchRecord, list[dict]]:
    nodes, details = [], []
    for k in range(n):
        host = HostSpec(f"gpu-{k}-" + "x" * name_len + ".example.com", user="alice", port=2222,
                        identity_file="/home/alice/.ssh/id_ed25519")
        run_dir = f"/home/alice/.fowlflow/runs/{'r' * 32}"
        nodes.append(NodeRecord(host, run_dir, f"node{k}", "/opt/venv/bin/python",
                                f"{run_dir}/fowlflow-supervise.py"))
        details.append({"host": host.__dict__, "address": f"10.0.{k // 250}.{k % 250}",
                        "hostname": host.host, "run_dir": run_dir, "pid": 1000 + k,
                        "gpus": ["NVIDIA H200"] * 8, "log_path": f"{run_dir}/node{k}.log"})
    access = SshAccess(known_hosts_file="/k", connect_timeout=5,
                       ssh_options=("-o", "Compression=yes"))
    return LaunchRecord("ssh", tuple(nodes), ssh=access), details


def test_a_small_record_is_read_back_from_its_tags(local_store):
    client = local_store.client
    run_id = client.create_run("0").info.run_id
    record, details = _record(2)
    record.save(client, run_id, details)
    tags = client.get_run(run_id).data.tags
    assert json.loads(tags[DETAILS_TAG]) == details and DETAILS_NOTE_TAG not in tags
    assert "artifact" not in json.loads(tags[LAUNCH_TAG])
    assert not client.list_artifacts(run_id)
    assert LaunchRecord.load(client, run_id) == record
    nodes = LaunchRecord.load(client, run_id).nodes_for()
    assert isinstance(nodes[1].runner, SshRunner) and nodes[1].runner.access == record.ssh
    assert nodes[1].supervisor.endswith("fowlflow-supervise.py")


def test_many_long_hosts_keep_every_tag_valid_json_and_the_record_whole(local_store):
    client = local_store.client
    run_id = client.create_run("0").info.run_id
    record, details = _record(300, name_len=120)
    record.save(client, run_id, details)
    tags = client.get_run(run_id).data.tags
    for key in (LAUNCH_TAG, DETAILS_TAG):
        assert len(tags[key]) <= MAX_TAG_CHARS
        json.loads(tags[key])  # valid, never cut mid-value
    shown = json.loads(tags[DETAILS_TAG])
    assert 0 < len(shown) < 300 and shown == details[:len(shown)]
    assert f"first {len(shown)} of 300" in tags[DETAILS_NOTE_TAG]
    assert "artifact" in json.loads(tags[LAUNCH_TAG])
    assert LaunchRecord.load(client, run_id) == record  # from the artifact
    full = json.loads(local_store.artifact_text(run_id, "fowlflow/launch.json"))
    assert full["node_details"] == details


def test_a_local_record_and_a_run_without_one(local_store):
    client = local_store.client
    run_id = client.create_run("0").info.run_id
    with pytest.raises(ConfigError, match="no fowlflow.launch tag"):
        LaunchRecord.load(client, run_id)
    with pytest.raises(ConfigError, match="not found"):
        LaunchRecord.load(client, "0" * 32)
    LaunchRecord("torchrun", (NodeRecord(None, "/r", "node0", "python", "/s.py"),)
                 ).save(client, run_id)
    loaded = LaunchRecord.load(client, run_id)
    assert loaded.ssh is None and isinstance(loaded.nodes_for()[0].runner, LocalRunner)
    assert DETAILS_TAG not in client.get_run(run_id).data.tags
