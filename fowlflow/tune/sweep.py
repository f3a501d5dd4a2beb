"""The sweep process: Optuna asks, each trial runs as its own process under a child MLflow run.

    result = Sweep(study, space, config, storage_url, pruner, parent_run_id, client,
                   workdir).run(n_trials=8, parallel=4)

For each trial: the sampler's values (:func:`fowlflow.tune.space.suggest`), a child run of the
parent (``mlflow.parentRunId``, name ``trial-<number>``), then ``python -m fowlflow.tune.trial``
with ``MLFLOW_RUN_ID`` set to that child run; its output goes to the child run's artifact
``trial.log``. ``parallel`` trials run at once (Optuna's threads, each waiting on its
process); with GPUs, slot *k* gets GPU *k* mod the GPU count (unless ``CUDA_VISIBLE_DEVICES``
is set). With ``backend`` (``-P backend=torchrun|ssh``) a trial is instead launched through
that backend on the hosts or GPUs of its slot and watched from here
(:mod:`fowlflow.tune.backends`). A stop (SIGTERM, Ctrl-C) stops the running trial processes
and cancels the launched runs (their runs end KILLED, their trials FAIL) and starts no new
trial. A trial ends with the child run tagged ``fowlflow.trial_state`` ``COMPLETE``,
``PRUNED`` (run status KILLED: it was stopped before its last epoch) or ``FAIL``.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import optuna
from optuna.trial import TrialState
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from fowlflow.errors import ConfigError
from fowlflow.projects.supervise import end_run_if_running
from fowlflow.trainer.config import TrainConfig
from fowlflow.tune import METRIC
from fowlflow.tune.backends import BackendSpec
from fowlflow.tune.pruners import PrunerSpec
from fowlflow.tune.space import Dimension, suggest

STATE_TAG = "fowlflow.trial_state"
RUN_ID_ATTR = "mlflow_run_id"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what n_trials counts


class TrialFailed(Exception):
    """A trial's process failed; the sweep goes on (Optuna records the trial as FAIL)."""


@dataclass
class Sweep:
    study: optuna.Study
    space: list[Dimension]
    config: TrainConfig  # every trial's settings before its own values
    storage_url: str
    pruner: PrunerSpec
    parent_run_id: str
    client: MlflowClient
    workdir: Path  # trial specs, results and logs
    stopping: bool = False  # set on a stop: no new trial process starts
    n_trials: int = 0  # the study's total of finished trials, in all its processes
    metric: str = METRIC  # what each trial reports after each epoch, and its value
    backend: BackendSpec = field(default_factory=BackendSpec)  # local processes, or a backend

    def run(self, n_trials: int, parallel: int) -> None:
        """Run trials until the study holds ``n_trials`` complete or pruned ones, ``parallel``
        at a time; on a stop (SIGTERM, Ctrl-C) the running trials are stopped first."""
        self.n_trials = n_trials
        done = finished_trials(self.study)
        remaining = n_trials - done
        if remaining <= 0:
            print(f"fowlflow: study {self.study.study_name} already has {done} finished trials "
                  f"(n_trials={n_trials}); none to run.", flush=True)
            return
        if done:
            print(f"fowlflow: resuming study {self.study.study_name}: {done} finished trials, "
                  f"{remaining} to run.", flush=True)
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(parallel):
            self._slots.put(slot)
        self._gpus = _gpu_count()
        errors: list[BaseException] = []

        def optimize():
            try:
                self.study.optimize(self.objective, n_trials=remaining,
                                    n_jobs=min(parallel, remaining), catch=(TrialFailed,),
                                    callbacks=[self._stop_when_stopping], gc_after_trial=False)
            except BaseException as exc:  # noqa: BLE001 (re-raised in the main thread)
                errors.append(exc)

        worker = threading.Thread(target=optimize, name="fowlflow-sweep")
        worker.start()
        try:
            while worker.is_alive():  # the main thread stays free to receive a stop signal
                time.sleep(0.2)  # (not in threading's join, where fowlflow.stopping defers it)
        except BaseException:
            self.stopping = True
            with self._lock:
                for proc in self._procs:
                    proc.terminate()
            worker.join()
            raise
        if errors:
            raise errors[0]

    def _stop_when_stopping(self, study: optuna.Study, trial) -> None:
        if self.stopping or taken_trials(self.study) >= self.n_trials:
            study.stop()  # no new trials; the stopped ones are recorded as failed

    def wait_for_others(self, poll_s: float = 2.0) -> None:
        """Wait until no trial of the study runs (a worker's), failing those whose worker died
        (Optuna's heartbeat), so that the summary sees every trial."""
        shown = False
        while running := self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not shown:
                print(f"fowlflow: waiting for {len(running)} trial(s) of other workers: "
                      f"{', '.join(str(t.number) for t in running)}", flush=True)
                shown = True
            optuna.storages.fail_stale_trials(self.study)
            time.sleep(poll_s)

    def objective(self, trial: optuna.Trial) -> float:
        if self.stopping:
            raise TrialFailed("the sweep is stopping")
        if taken_trials(self.study, before=trial.number) >= self.n_trials:  # others were faster
            trial.set_user_attr("error", f"not run: the study had its {self.n_trials} trials")
            self.study.stop()
            raise TrialFailed(f"trial {trial.number} not needed")
        values = suggest(self.space, trial)
        run_id, config = self._child_run(trial, values)
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in values.items())
        where = f" through {self.backend.name}" if self.backend.remote else ""
        print(f"fowlflow: trial {trial.number} started{where} (run {run_id}): {shown}",
              flush=True)
        outcome = (self._run_remote if self.backend.remote else self._run_local)(
            trial, run_id, config)
        if outcome["pruned"]:
            self.client.set_tag(run_id, STATE_TAG, "PRUNED")
            self.client.set_terminated(run_id, "KILLED")
            print(f"fowlflow: trial {trial.number} pruned after epoch {outcome['epochs']} "
                  f"({self.metric} {outcome['value']:.4g})", flush=True)
            raise optuna.TrialPruned()
        self.client.set_tag(run_id, STATE_TAG, "COMPLETE")
        print(f"fowlflow: trial {trial.number} complete: {self.metric} {outcome['value']:.4g}",
              flush=True)
        return float(outcome["value"])

    def _child_run(self, trial: optuna.Trial, values: dict) -> tuple[str, TrainConfig]:
        """The trial's child run of the parent run, and its trainer settings."""
        number = trial.number
        parent = self.client.get_run(self.parent_run_id)
        child = self.client.create_run(parent.info.experiment_id, run_name=f"trial-{number}", tags={
            MLFLOW_PARENT_RUN_ID: self.parent_run_id, MLFLOW_RUN_NAME: f"trial-{number}",
            "fowlflow.study": self.study.study_name, "fowlflow.trial_number": str(number),
            STATE_TAG: "RUNNING"})
        trial.set_user_attr(RUN_ID_ATTR, child.info.run_id)
        config = replace(self.config, **values,
                         output_dir=str(Path(self.config.output_dir) / self.study.study_name
                                        / f"trial-{number}"))
        return child.info.run_id, config

    def _fail(self, trial: optuna.Trial, run_id: str, why: str, tail: str,
              error: type[Exception] = TrialFailed) -> None:
        """End the trial's run (KILLED when the sweep stops, else FAILED) and raise ``error``
        (:class:`TrialFailed`: the sweep goes on; another: it stops)."""
        end_run_if_running(self.client, run_id, "KILLED" if self.stopping else "FAILED")
        self.client.set_tag(run_id, STATE_TAG, "FAIL")
        print(f"fowlflow: trial {trial.number} failed ({why}); {tail}", file=sys.stderr,
              flush=True)
        trial.set_user_attr("error", tail[-500:])
        if error is TrialFailed:
            raise TrialFailed(f"trial {trial.number} failed: {why}")
        raise error(f"-P backend_config: the {self.backend.name} backend refused it when trial "
                    f"{trial.number} was launched: {tail}")

    def _run_local(self, trial: optuna.Trial, run_id: str, config: TrainConfig) -> dict:
        """The trial as a process here (``python -m fowlflow.tune.trial``); its outcome."""
        folder = self.workdir / f"trial-{trial.number}"
        folder.mkdir()
        spec, result, log_path = (folder / name for name in ("spec.json", "result.json", "trial.log"))
        spec.write_text(json.dumps({
            "storage": self.storage_url, "study_name": self.study.study_name,
            "trial_id": trial._trial_id, "trial_number": trial.number,
            "pruner": self.pruner.as_dict(), "metric": self.metric,
            "config": asdict(config), "result": str(result)}))
        spec.chmod(0o600)  # the storage URL may hold a password
        rc = self._run_process(spec, log_path, run_id)
        try:
            self.client.log_artifact(run_id, str(log_path))
        except Exception as exc:  # noqa: BLE001 (the trial's outcome matters more)
            print(f"fowlflow: trial {trial.number}: its log was not uploaded: {exc}",
                  file=sys.stderr)
        if rc != 0 or not result.is_file():
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            self._fail(trial, run_id, f"exit {rc}", f"the end of its log:\n{tail}")
        return json.loads(result.read_text())

    def _run_remote(self, trial: optuna.Trial, run_id: str, config: TrainConfig) -> dict:
        """The trial through the backend, on the hosts or GPUs of a free slot; its outcome."""
        from fowlflow.tune.backends import RemoteTrial

        slot = self._slots.get()
        try:
            if self.stopping:
                self._fail(trial, run_id, "the sweep is stopping", "not launched")
            from fowlflow.tracking.run_tracker import log_new_params

            log_new_params(run_id, {"study_name": self.study.study_name,
                                    "trial_number": trial.number,
                                    "backend": self.backend.name})
            outcome = RemoteTrial(self.backend, slot, self.metric, self.client,
                                  lambda: self.stopping).run(
                trial, run_id, config, self.client.get_run(run_id).info.experiment_id)
        except (TrialFailed, optuna.TrialPruned):
            raise
        except ConfigError as exc:  # the backend's own config checks: every trial would fail
            self._fail(trial, run_id, "launch: ConfigError", str(exc), error=ConfigError)
        except Exception as exc:  # noqa: BLE001 (a launch error fails this trial only)
            self._fail(trial, run_id, f"launch: {type(exc).__name__}",
                       f"{exc}"[-2000:])
        finally:
            self._slots.put(slot)
        if outcome["pruned"] or (outcome["state"] == "FINISHED"
                                 and outcome["value"] is not None):
            return outcome
        tags = self.client.get_run(run_id).data.tags  # the trainer's cause, else the launch's
        cause = tags.get("error") or tags.get("fowlflow.error", "-")
        self._fail(trial, run_id, f"its run ended {outcome['state']}",
                   f"error: {_shorten(cause, 300)}; see `fowlflow logs {run_id}` or the run's "
                   "fowlflow-logs/node0.log")

    def _run_process(self, spec: Path, log_path: Path, run_id: str) -> int:
        slot = self._slots.get()
        try:
            env = {**os.environ, "MLFLOW_RUN_ID": run_id}
            if self._gpus and "CUDA_VISIBLE_DEVICES" not in os.environ:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % self._gpus)
            with open(log_path, "wb") as log:
                with self._lock:
                    if self.stopping:
                        return 143
                    proc = subprocess.Popen([sys.executable, "-m", "fowlflow.tune.trial", str(spec)],
                                            stdout=log, stderr=subprocess.STDOUT, env=env)
                    self._procs.add(proc)
                try:
                    return proc.wait()
                finally:
                    with self._lock:
                        self._procs.discard(proc)
        finally:
            self._slots.put(slot)


def _shorten(text: str, limit: int) -> str:
    """``text``'s start (a cause's first lines say the most), at most ``limit`` characters."""
    return text if len(text) <= limit else text[:limit - 4].rstrip() + " ..."


def taken_trials(study: optuna.Study, before: int | None = None) -> int:
    """The study's finished trials plus its running ones (numbered below ``before``), in every
    process that works on it (this sweep, ``fowlflow tune worker``s).

    Both counts come from one read of the study. Read one after the other, a trial that
    another thread completes in between is counted twice (running in the first read,
    finished in the second), and a sweep of 3 trials whose first two end together stopped
    after 2.
    """
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum(t.state in FINISHED or before is None or t.number < before for t in trials)


def finished_trials(study: optuna.Study) -> int:
    """How many of the study's trials are complete or pruned (what ``n_trials`` counts)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 (no CUDA: trials run on the CPU)
        return 0
