"""The launch record: where a run's supervised nodes are, written and read only here.

A backend saves one after the launch; ``fowlflow status|logs|attach|cancel`` load it to find
the nodes again from any terminal::

    record = LaunchRecord("ssh", (NodeRecord(HostSpec("gpu-box"), run_dir, "node0", "python3",
                                             f"{run_dir}/fowlflow-supervise.py"),),
                          ssh=SshAccess(known_hosts_file="/k"))
    record.save(client, run_id, details=[{"address": "10.0.0.5", "pid": 4242, ...}])
    record = LaunchRecord.load(client, run_id)       # ConfigError if the run has none
    nodes = record.nodes_for(shared)                 # Node objects with their runners

Tags: ``fowlflow.launch`` holds the record as compact JSON, and ``fowlflow.node_details`` what
people look at per node (address, hostname, pid, GPUs, ...). A tag value holds at most 8,000
characters, and every tag is always valid JSON: a record that does not fit goes to the run
artifact ``fowlflow/launch.json`` (the tag then says so), and ``node_details`` keeps the
nodes that fit, with ``fowlflow.node_details_note`` saying that the full list is in the same
artifact.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fowlflow.errors import ConfigError
from fowlflow.projects.config import HostSpec, SshAccess
from fowlflow.projects.nodes import Node
from fowlflow.projects.runners import LocalRunner, SshRunner
from fowlflow.projects.ssh_connections import SharedConnections

LAUNCH_TAG = "fowlflow.launch"
DETAILS_TAG = "fowlflow.node_details"
DETAILS_NOTE_TAG = "fowlflow.node_details_note"
ARTIFACT_DIR, ARTIFACT_NAME = "fowlflow", "launch.json"
MAX_TAG_CHARS = 8000  # MLflow's limit on a tag value (mlflow.utils.validation)


def _compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


@dataclass(frozen=True)
class NodeRecord:
    """One node: its host (None: this machine), run folder, name and supervisor."""

    host: HostSpec | None
    run_dir: str
    name: str
    python: str
    supervisor: str


@dataclass(frozen=True)
class LaunchRecord:
    """Everything ``fowlflow attach|cancel`` needs to reach a run's supervisors."""

    backend: str
    nodes: tuple[NodeRecord, ...]
    ssh: SshAccess | None = None
    rdzv_endpoint: str | None = None  # "host:port" of a multi-node run's rendezvous

    def to_dict(self) -> dict:
        out = {"backend": self.backend,
               "nodes": [{**dataclasses.asdict(n),
                          "host": dataclasses.asdict(n.host) if n.host else None}
                         for n in self.nodes]}
        if self.ssh is not None:
            out["ssh"] = {**dataclasses.asdict(self.ssh),
                          "ssh_options": list(self.ssh.ssh_options)}
        if self.rdzv_endpoint is not None:
            out["rdzv_endpoint"] = self.rdzv_endpoint
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LaunchRecord:
        nodes = tuple(NodeRecord(**{**n, "host": HostSpec(**n["host"]) if n["host"] else None})
                      for n in data["nodes"])
        ssh = data.get("ssh")
        access = SshAccess(**{**ssh, "ssh_options": tuple(ssh.get("ssh_options", ()))}) \
            if ssh is not None else None
        return cls(data["backend"], nodes, access, data.get("rdzv_endpoint"))

    def nodes_for(self, shared: SharedConnections | None = None) -> list[Node]:
        """The nodes with their runners (ssh ones share ``shared``'s connections)."""
        out = []
        for n in self.nodes:
            runner = LocalRunner() if n.host is None else \
                SshRunner(n.host, self.ssh or SshAccess(), shared=shared)
            out.append(Node(runner, n.run_dir, n.name, n.python, n.supervisor))
        return out

    def save(self, client, run_id: str, details: list[dict] | None = None) -> None:
        """Set the tags (and the artifact when a tag would not hold it all)."""
        record = _compact(self.to_dict())
        tags = {LAUNCH_TAG: record}
        if len(record) > MAX_TAG_CHARS:
            tags[LAUNCH_TAG] = _compact({"backend": self.backend,
                                         "artifact": f"{ARTIFACT_DIR}/{ARTIFACT_NAME}"})
        if details is not None:
            shown = _fitting_prefix(details)
            tags[DETAILS_TAG] = _compact(details[:shown])
            if shown < len(details):
                tags[DETAILS_NOTE_TAG] = (f"the first {shown} of {len(details)} nodes; all of "
                                          f"them are in the artifact {ARTIFACT_DIR}/"
                                          f"{ARTIFACT_NAME}")
        if len(record) > MAX_TAG_CHARS or DETAILS_NOTE_TAG in tags:
            with tempfile.TemporaryDirectory() as tmp:  # before the tags that point at it
                path = Path(tmp) / ARTIFACT_NAME
                path.write_text(json.dumps({"record": self.to_dict(),
                                            "node_details": details}, indent=1))
                client.log_artifact(run_id, str(path), ARTIFACT_DIR)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)

    @classmethod
    def load(cls, client, run_id: str) -> LaunchRecord:
        """The record of a launched run.

        Raises:
            ConfigError: the run does not exist or was not launched by a fowlflow backend.
        """
        from mlflow.exceptions import MlflowException

        try:
            tag = client.get_run(run_id).data.tags.get(LAUNCH_TAG)
        except MlflowException as exc:
            raise ConfigError(f"run {run_id!r} not found in the tracking store "
                              f"({exc.message.splitlines()[0]}); check MLFLOW_TRACKING_URI"
                              ) from exc
        if tag is None:
            raise ConfigError(f"run {run_id} has no {LAUNCH_TAG} tag: it was not launched with "
                              "`mlflow run -b torchrun|ssh`, so there is nothing to attach to")
        data = json.loads(tag)
        if "artifact" in data:
            with tempfile.TemporaryDirectory() as tmp:
                local = client.download_artifacts(run_id, data["artifact"], tmp)
                data = json.loads(Path(local).read_text())["record"]
        return cls.from_dict(data)


def _fitting_prefix(details: list[dict]) -> int:
    """How many leading entries fit in one tag as a compact JSON list."""
    size, count = 2, 0  # "[]"
    for entry in details:
        size += len(_compact(entry)) + (1 if count else 0)
        if size > MAX_TAG_CHARS:
            break
        count += 1
    return count
