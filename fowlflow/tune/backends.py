"""Trials through a fowlflow backend: ``-P backend=torchrun|ssh|ec2 -P backend_config=...``.

    spec = parse_backend("ssh", '{"hosts": ["gpu-a", "gpu-b"]}', parallel=2)   # before any trial
    outcome = RemoteTrial(spec, slot=0, ...).run(trial, run_id, config)

Each trial is ``mlflow.projects.run(<project>, "main", backend=..., synchronous=False)`` on the
child run the sweep created (MLflow's ``_mlflow_local_backend_run_id`` key: the backends
create no run of their own then), launched detached (``"wait": false``). The sweep then reads
the trial's per-epoch metric from the tracking store, reports each new epoch to the Optuna
trial and, when the pruner says so, cancels the launched run with ``fowlflow cancel RUN_ID``
(the public CLI, as a user would). ``parallel`` trials at once each get their own hosts
(``ssh``: the ``hosts`` list cut into ``parallel`` equal groups), GPUs (``torchrun``: ``gpus``,
or this machine's GPUs, cut the same way; on a CPU-only machine every trial runs its CPU
processes here) or instances (``ec2``: ``cluster_name`` NAME becomes one cluster per slot,
NAME-0, NAME-1, ...; without one every trial gets fresh instances, which the sweep removes
with ``fowlflow ec2 down`` when the trial ends). The whole config and each slot's are checked
by the backend's own parser (:data:`PARSERS`, what ``mlflow run -b NAME -c`` runs) before the
sweep creates its parent run or any trial; what only the launch can find out (an ec2 instance
type the region lacks) is a :class:`ConfigError` at the first launch, which stops the sweep.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from urllib.parse import urlparse
from dataclasses import dataclass, field
from pathlib import Path

from fowlflow.errors import ConfigError
from fowlflow.projects.config import parse_ssh_config, parse_torchrun_config
from fowlflow.projects.ec2_config import parse_ec2_config
from fowlflow.tune.space import read_json_option

# Each backend's own config parser (what `mlflow run -b NAME -c` runs), run on the whole config
# and on each slot's before any run or trial exists.
PARSERS = {"torchrun": parse_torchrun_config, "ssh": parse_ssh_config, "ec2": parse_ec2_config}
BACKENDS = ("local", *PARSERS)
# Keys the sweep sets itself in each trial's backend config (ssh: node_count follows the hosts
# cut for each slot).
SWEEP_KEYS = {"torchrun": ("wait", "stream"), "ssh": ("wait", "stream", "node_count"),
              "ec2": ("wait", "stream")}
TERMINAL = ("FINISHED", "FAILED", "KILLED")
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the fowlflow project (its MLproject)


@dataclass(frozen=True)
class BackendSpec:
    """The backend trials run through, and one backend config per parallel slot."""

    name: str = "local"  # local: a trial process on this machine, no backend
    slots: tuple[dict, ...] = ()
    notes: tuple[str, ...] = field(default=())
    config: dict = field(default_factory=dict)  # the user's config, as given

    @property
    def remote(self) -> bool:
        return self.name != "local"

    def down_after_trial(self, slot: int) -> bool:
        """ec2: whether the slot's instances go when its trial ends (no ``cluster_name``, or
        ``"down": true``); a detached run can't remove them itself."""
        return self.name == "ec2" and parse_ec2_config(self.slots[slot]).terminate_at_end


def parse_backend(name: str, config_text: str, parallel: int, gpu_count: int | None = None
                  ) -> BackendSpec:
    """Check ``-P backend`` and ``-P backend_config`` (inline JSON or a ``.json`` file) with the
    backend's own config parser (:data:`PARSERS`), and give each of the ``parallel`` trial
    slots its hosts, GPUs or ec2 cluster.

    Raises:
        ConfigError: an unknown backend, a config the backend refuses, keys a sweep sets itself,
            too few hosts or GPUs for ``parallel`` trials, a tracking store the hosts can't reach.
    """
    name = (name or "").strip().lower()
    name = "local" if name in ("", "none") else name
    if name not in BACKENDS:
        raise ConfigError(f"-P backend={name} is unknown; use one of {', '.join(BACKENDS)} "
                          "(local, or none: trial processes on this machine).")
    user = _read_config(config_text)
    if name == "local":
        if user:
            raise ConfigError("-P backend_config is given but -P backend is local; add "
                              "-P backend=torchrun, ssh or ec2.")
        return BackendSpec()
    given = sorted(k for k in SWEEP_KEYS[name] if k in user)
    if given:
        raise ConfigError(f"-P backend_config: the sweep sets {', '.join(given)} for each trial "
                          "itself (trials are launched detached and watched); remove them.")
    cfg = _parsed(name, user)
    if name == "ssh":
        _check_remote_tracking(name, "hosts", cfg.tunnel)
        slots, notes = _ssh_slots(user, parallel)
    elif name == "ec2":
        _check_remote_tracking(name, "instances", cfg.ssh.tunnel)
        slots, notes = _ec2_slots(user, cfg, parallel)
    else:
        slots, notes = _torchrun_slots(user, cfg, parallel, gpu_count)
    for k, slot in enumerate(slots):
        _parsed(name, slot, f" (as trial slot {k} gets it: {json.dumps(slot)})")
    return BackendSpec(name, slots, notes, user)


def _parsed(name: str, user: dict, where: str = ""):
    """The backend's own parse of ``user`` as each trial is launched (detached)."""
    try:
        return PARSERS[name]({**user, "wait": False})
    except ConfigError as exc:
        raise ConfigError(f"-P backend_config: the {name} backend refuses it{where}: "
                          f"{exc}") from None


def _read_config(text: str) -> dict:
    text = (text or "").strip()
    if text.lower() in ("", "none"):
        return {}
    user, source = read_json_option(text, "-P backend_config", "Backend config file",
                                    '{"hosts": ["gpu-a", "gpu-b"]}')
    if not isinstance(user, dict):
        raise ConfigError(f"{source} must be a JSON object, got {user!r}.")
    return user


def _check_remote_tracking(name: str, machines: str, tunnel: bool) -> None:
    """Trials on other machines (``machines``: "hosts", "instances") log to the tracking server
    themselves: it must be an http(s) server they reach, and no tunnel (a tunnel lives as long
    as an attached client, and the sweep launches its trials detached)."""
    import mlflow

    if tunnel:
        raise ConfigError('-P backend_config: "tunnel" needs a client attached to each run, and '
                          "a sweep launches its trials detached; serve the tracking server on "
                          f"an address the {machines} reach (mlflow server --host 0.0.0.0).")
    uri = mlflow.get_tracking_uri()
    if urlparse(uri).scheme not in ("http", "https"):
        raise ConfigError(f"-P backend={name}: the {machines} log to the tracking server, but "
                          f"MLFLOW_TRACKING_URI is {uri!r} (a store on this machine); start an "
                          f"http(s) tracking server the {machines} reach (mlflow server --host "
                          "0.0.0.0) and set MLFLOW_TRACKING_URI to it.")


def _ssh_slots(user: dict, parallel: int) -> tuple[tuple[dict, ...], tuple[str, ...]]:
    hosts = user["hosts"] if isinstance(user["hosts"], list) else [user["hosts"]]
    if len(hosts) < parallel:
        raise ConfigError(f"-P parallel={parallel} needs at least {parallel} hosts in "
                          f"-P backend_config (each trial runs on hosts of its own); it lists "
                          f"{len(hosts)}: lower parallel or add hosts.")
    size = len(hosts) // parallel
    slots = tuple({**user, "hosts": hosts[k * size:(k + 1) * size]} for k in range(parallel))
    spare = hosts[parallel * size:]
    notes = (f"hosts {spare} are not used: {len(hosts)} hosts do not split evenly into "
             f"{parallel} trials at once",) if spare else ()
    return slots, notes


def _ec2_slots(user: dict, cfg, parallel: int) -> tuple[tuple[dict, ...], tuple[str, ...]]:
    """Each slot its own instances: ``cluster_name`` NAME becomes NAME-0, NAME-1, ... (one
    cluster per slot, kept between its trials unless ``"down": true``); without one, each
    trial gets fresh instances, removed when it ends."""
    if cfg.cluster_name is None:
        return tuple(dict(user) for _ in range(parallel)), ()
    slots = tuple({**user, "cluster_name": f"{cfg.cluster_name}-{k}"} for k in range(parallel))
    names = ", ".join(s["cluster_name"] for s in slots)
    if cfg.terminate_at_end:
        return slots, (f"ec2 clusters {names}: one per trial slot, removed after each trial "
                       '("down": true)',)
    return slots, (f"ec2 clusters {names}: one per trial slot, reused by its next trial and "
                   f"kept after the sweep (they stop themselves after {cfg.idle_minutes} idle "
                   "minutes; `fowlflow ec2 down NAME` removes one)",)


def _torchrun_slots(user: dict, cfg, parallel: int, gpu_count: int | None
                    ) -> tuple[tuple[dict, ...], tuple[str, ...]]:
    if cfg.free_gpus is not None and parallel > 1:
        raise ConfigError('-P backend_config: "free_gpus" with -P parallel > 1 would let trials '
                          'started at once take the same idle GPUs; list them instead, e.g. '
                          '"gpus": [0, 1, 2, 3] (each trial gets its own share).')
    if cfg.gpus is None and gpu_count is None:
        from fowlflow.tune.sweep import _gpu_count

        gpu_count = _gpu_count()
    gpus = list(cfg.gpus) if cfg.gpus is not None else list(range(gpu_count))
    if not gpus or cfg.free_gpus is not None:  # CPU processes (gloo), or free_gpus
        return tuple(dict(user) for _ in range(parallel)), ()
    if len(gpus) < parallel:
        raise ConfigError(f"-P parallel={parallel} needs at least {parallel} GPUs (each trial "
                          f"runs on GPUs of its own); there are {len(gpus)}: {gpus}.")
    size = len(gpus) // parallel
    return tuple({**user, "gpus": gpus[k * size:(k + 1) * size]} for k in range(parallel)), ()


def trial_params(config) -> dict[str, str]:
    """The ``main`` entry point's parameters for one trial: every trainer setting, as
    ``mlflow run -P`` takes them; trials register nothing (the sweep registers the best)."""
    params = {k: ("none" if v == "" else v) for k, v in config.as_params().items()}
    params["registered_model_name"] = "none"
    return params


def project_uri() -> str:
    """The fowlflow project whose ``main`` entry point trials run."""
    if not (PROJECT_ROOT / "MLproject").is_file():
        raise ConfigError(f"-P backend needs the fowlflow project (its MLproject) next to the "
                          f"package; {PROJECT_ROOT} has none: run the sweep from a checkout.")
    return str(PROJECT_ROOT)


@dataclass
class RemoteTrial:
    """One trial launched through a backend and watched until it ends."""

    backend: BackendSpec
    slot: int
    metric: str
    client: object  # MlflowClient
    stopping: callable  # () -> bool: the sweep is stopping
    poll_s: float = 2.0
    check_nodes_s: float = 30.0  # how often the supervisors are asked (a run whose host died)
    reported: dict = field(default_factory=dict)  # epoch -> value

    def run(self, trial, run_id: str, config, experiment_id: str) -> dict:
        """Launch, report each epoch, prune or stop; ``{"value", "pruned", "epochs", "state"}``
        where ``state`` is the run's end status."""
        import mlflow.projects

        mlflow.projects.run(project_uri(), "main", parameters=trial_params(config),
                            experiment_id=experiment_id, backend=self.backend.name,
                            backend_config={**self.backend.slots[self.slot], "wait": False,
                                            "_mlflow_local_backend_run_id": run_id},
                            synchronous=False)
        try:
            return self._watch(trial, run_id)
        finally:
            if self.backend.down_after_trial(self.slot):
                self._down(run_id)

    def _down(self, run_id: str) -> None:
        """``fowlflow ec2 down`` the trial's cluster (named in its run's tags)."""
        tags = self.client.get_run(run_id).data.tags
        cluster, region = tags.get("fowlflow.ec2.cluster"), tags.get("fowlflow.ec2.region")
        if cluster:
            _fowlflow("ec2", "down", cluster, *(["--region", region] if region else []))

    def _watch(self, trial, run_id: str) -> dict:
        last_check = time.monotonic()
        while True:
            status = self.client.get_run(run_id).info.status
            # after the status: no epoch missed; a run that ended is not pruned
            reason = self._report(trial, run_id, ask=status not in TERMINAL)
            if reason or self.stopping():
                _fowlflow("cancel", run_id)
                if reason:
                    self.client.set_tag(run_id, "fowlflow.stopped_early", reason)
                return self._outcome(status="KILLED", pruned=bool(reason))
            if status in TERMINAL:
                return self._outcome(status=status, pruned=False)
            if time.monotonic() - last_check > self.check_nodes_s:
                # a run whose processes all died (a host rebooted) is ended by `fowlflow status`
                _fowlflow("status", run_id)
                last_check = time.monotonic()
            time.sleep(self.poll_s)

    def _report(self, trial, run_id: str, ask: bool = True) -> str | None:
        """Report the epochs logged since the last call; the pruner's reason to stop, if any."""
        history = sorted(self.client.get_metric_history(run_id, self.metric), key=lambda m: m.step)
        for m in history:
            if m.step in self.reported:
                continue
            self.reported[m.step] = m.value
            trial.report(m.value, m.step)
            if ask and trial.should_prune():
                name = type(trial.study.pruner).__name__
                return f"pruned by the sweep ({name}: {self.metric} {m.value:.4g} at epoch {m.step})"
        return None

    def _outcome(self, status: str, pruned: bool) -> dict:
        last = max(self.reported) if self.reported else None
        return {"value": self.reported.get(last), "pruned": pruned, "epochs": last or 0,
                "state": status}


def _fowlflow(*args: str) -> None:
    """``fowlflow cancel|status RUN_ID`` (the launched run's supervisors, from its launch
    record), ``fowlflow ec2 down NAME``; a failure is shown, not raised: the watch goes on and
    asks the store again (a cluster left behind is named, and ``fowlflow ec2 gc`` finds it)."""
    proc = subprocess.run([sys.executable, "-m", "fowlflow.cli", *args],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        print(f"fowlflow: `fowlflow {' '.join(args)}` failed (exit {proc.returncode}): "
              f"{proc.stderr.strip()[-1000:]}", file=sys.stderr, flush=True)
