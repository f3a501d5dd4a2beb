"""The run tracker: the only object in the trainer that calls MLflow (see the package doc)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fowlflow.data.sources import DataSource
from fowlflow.errors import FowlflowError, ServerError
from fowlflow.tracking.requirements import installed_requirements

log = logging.getLogger(__name__)

DEFAULT_SAMPLING_INTERVAL = 5  # seconds between system-metric samples


def _sampling_interval() -> int:
    return int(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", DEFAULT_SAMPLING_INTERVAL))


def start_node_system_metrics(run_id: str, node_id: str):
    """Log this node's system metrics into ``run_id`` (for nodes other than rank 0's)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=_sampling_interval(),
                                   node_id=node_id, resume_logging=True)
    monitor.start()
    return monitor


DATASET_ATTEMPTS = 3
# What a database says when a row's unique key is taken (SQLite, PostgreSQL, MySQL).
_UNIQUE_VIOLATIONS = ("UNIQUE constraint failed", "UniqueViolation", "Duplicate entry")


def lost_insert_race(exc: MlflowException) -> bool:
    """Whether MLflow refused a write because another client inserted the same row first.

    MLflow's SQL store logs a dataset input by looking the dataset (experiment, name, digest)
    up and inserting it when missing, in one transaction. Two runs of one experiment on the
    same data (the trials of a sweep, two users) can both miss it and both insert: the second
    breaks the unique key, its whole transaction is rolled back, and the same call made again
    finds the dataset and only links it to the run.
    """
    return any(text in str(exc) for text in _UNIQUE_VIOLATIONS)


UNSET = "none"  # how an empty param is spelled: MLproject defaults and logged params alike


def log_new_params(run_id: str, params: dict[str, Any]) -> dict[str, str]:
    """Log params to a run by fowlflow's one rule; returns what was logged.

    * A key the run already has is left alone: ``mlflow run`` logs every ``-P`` value itself
      (shell-quoted, e.g. ``'a b'``), and MLflow refuses a second, differently spelled value.
    * A value is logged as given (no path normalisation), except that an empty value is
      spelled ``none``, the word MLproject's defaults use, never ``''`` or nothing.
    """
    existing = MlflowClient().get_run(run_id).data.params
    new = {k: (str(v) if v is not None and str(v) != "" else UNSET)[:6000]
           for k, v in params.items() if k not in existing}
    if new:
        MlflowClient().log_batch(run_id, params=[Param(k, v) for k, v in new.items()])
    return new


class RunTracker:
    """Rank-0 MLflow logging; every method is a no-op when ``enabled`` is false.

    A metric is logged at most once per step. When :meth:`start` attaches to a run that already
    has metrics (the ssh/ec2 backends start the entry point again in the same run after a lost
    node, resuming from the last checkpoint that reached the artifact store), it reads once, per
    key, the highest step already stored; a value at that step or below is not logged again.
    The checkpoint is uploaded after its epoch's metrics are logged, so a replacement can resume
    from an epoch before the last logged one; resume is exact, so the values it recomputes for
    those epochs (and their ``train_loss_step``) are the ones already stored.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.run_id: str | None = None
        self._client: MlflowClient | None = None
        self._queued: list[tuple[list[str], Any]] = []  # (keys, RunOperations) since log_epoch
        self._landed: list[tuple[list[str], Any]] = []  # those queued before the last log_epoch
        self._stored: dict[str, int] = {}  # key -> highest step the run had when attached

    def start(self, node_id: str | None = None, run_name: str | None = None) -> str | None:
        if not self.enabled:
            return None
        mlflow.set_system_metrics_sampling_interval(_sampling_interval())
        if node_id:
            mlflow.set_system_metrics_node_id(node_id)
        run = mlflow.start_run(run_name=run_name, log_system_metrics=True)
        self.run_id = run.info.run_id
        self._client = MlflowClient()
        log.info("MLflow run %s (tracking URI %s)", self.run_id, mlflow.get_tracking_uri())
        self._stored = stored_steps(self._client, self.run_id)
        if self._stored:
            log.info("Run %s already has metrics (a run started again); values at steps it "
                     "has are not logged twice: %s", self.run_id,
                     ", ".join(f"{k} <= {v}" for k, v in sorted(self._stored.items()))[:2000])
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params by the one rule of :func:`log_new_params`."""
        if self.enabled:
            log_new_params(self.run_id, params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_dataset(self, source: DataSource, split: str, digest: str, context: str) -> None:
        """One split of ``source`` as an MLflow dataset input, named ``<source name>/<split>``
        (no data copied: where it came from and a content digest)."""
        if not self.enabled:
            return
        from mlflow.data.meta_dataset import MetaDataset

        dataset = MetaDataset(source=_dataset_source(source), name=f"{source.name}/{split}",
                              digest=digest)
        for attempt in range(1, DATASET_ATTEMPTS + 1):
            try:
                mlflow.log_input(dataset, context=context)
                return
            except MlflowException as exc:
                if attempt == DATASET_ATTEMPTS or not lost_insert_race(exc):
                    raise
                log.info("dataset %s: another run logged it at the same moment; linking it "
                         "(attempt %d)", dataset.name, attempt + 1)
                time.sleep(0.2 * attempt)

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        """Queue one batch (async). Raises FowlflowError if an earlier epoch's batch failed."""
        if not self.enabled:
            return
        self._check(self._landed)  # queued an epoch ago: long written (no wait in practice)
        now = int(time.time() * 1000)
        batch = self._unstored([Metric(k, float(v), now, epoch) for k, v in metrics.items()])
        if batch:
            self._log_async(batch)
        self._landed, self._queued = self._queued, []

    def log_steps(self, first_step: int, losses: list[float], images_per_sec: float) -> None:
        """Queue (async) the losses of the global steps ``first_step, first_step + 1, ...`` as
        ``train_loss_step`` and, at the last of them, ``train_images_per_sec_step`` (the images/s
        of all ranks since the previous report): called while an epoch runs."""
        if not self.enabled or not losses:
            return
        now = int(time.time() * 1000)
        batch = [Metric("train_loss_step", float(v), now, first_step + i)
                 for i, v in enumerate(losses)]
        batch.append(Metric("train_images_per_sec_step", float(images_per_sec), now,
                            first_step + len(losses) - 1))
        batch = self._unstored(batch)
        for i in range(0, len(batch), 1000):  # MLflow's log_batch limit
            self._log_async(batch[i:i + 1000])

    def _unstored(self, batch: list[Metric]) -> list[Metric]:
        """``batch`` less the values at steps the run had when the tracker attached."""
        if not self._stored:
            return batch
        return [m for m in batch if m.step > self._stored.get(m.key, -1)]

    def _log_async(self, batch: list[Metric]) -> None:
        ops = self._client.log_batch(self.run_id, metrics=batch, synchronous=False)
        self._queued.append((sorted({m.key for m in batch}), ops))

    def _check(self, queued: list[tuple[list[str], Any]]) -> None:
        """Wait for queued batches; a refused one fails the run (MLflow only logs an ERROR)."""
        while queued:
            keys, ops = queued.pop(0)
            try:
                ops.wait()
            except MlflowException as exc:
                self._queued.clear()
                self._landed.clear()
                raise FowlflowError(
                    f"MLflow did not store the metrics {', '.join(keys)[:500]} of run "
                    f"{self.run_id} ({mlflow.get_tracking_uri()}): {str(exc)[:600]}. The run is "
                    "marked FAILED rather than left with metrics missing; check the tracking "
                    "server and its log, then run again (-P resume=<output_dir>/checkpoint.pt "
                    "skips the finished epochs).") from exc

    def log_figure(self, figure, artifact_file: str) -> None:
        if self.enabled:
            with artifact_upload(artifact_file):
                mlflow.log_figure(figure, artifact_file)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        if self.enabled:
            with artifact_upload(artifact_file):
                mlflow.log_table(data=data, artifact_file=artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        if self.enabled:
            with artifact_upload(artifact_file):
                mlflow.log_dict(data, artifact_file)

    def log_model(self, model, input_example, metadata: dict[str, Any]) -> str | None:
        """Log the PyTorch model (pt2, dynamic batch) with signature and input example.

        Three things MLflow does by default are skipped, ~11 s on a 2-core CPU:
        inferring the pip requirements (a second Python process that loads the model and
        watches its imports; a pt2 model needs torch, and MLflow's defaults say so), checking
        those requirements against the installed packages (they are the installed versions:
        :mod:`fowlflow.tracking.requirements`) and loading the saved model back to predict the
        input example (a failure there is only logged as a warning, never raised).
        """
        if not self.enabled:
            return None
        import numpy as np
        import mlflow.pytorch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        example = np.asarray(input_example, dtype=np.float32)
        c, h, w = example.shape[1:]
        n_cls = len(metadata["class_names"])
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, w))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_cls))]))
        with artifact_upload("model"), installed_requirements():
            info = mlflow.pytorch.log_model(
                model, name="model", serialization_format="pt2", signature=signature,
                input_example=example, metadata=metadata,
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                validate_serving_input=False)
        return info.model_uri

    def flush(self) -> None:
        """Wait until every queued batch is written. Raises FowlflowError if MLflow refused one.

        Waits on the batches themselves: ``mlflow.flush_async_logging`` would also stop and
        restart MLflow's logging thread, which polls its queue once a second (~1 s each).
        """
        if self.enabled:
            self._check(self._landed)
            self._check(self._queued)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (``mlflow.end_run`` writes what is still queued first)."""
        if self.enabled and self.run_id is not None:
            mlflow.end_run(status)


def stored_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The highest step of each metric ``run_id`` has (MLflow's latest value of a key is the one
    at its highest step), system metrics (``system/...``, MLflow's own monitor) left out."""
    metrics = client.get_run(run_id).data.to_proto().metrics
    return {m.key: m.step for m in metrics if not m.key.startswith("system/")}


def metric_names(names: list[str]) -> dict[str, str]:
    """A metric-key-safe spelling of each name (class folder names), deterministic and unique.

    MLflow keys may hold only letters, digits, ``_ - . /``, spaces and (not on Windows) ``:``;
    here every character but letters, digits, ``_ - .`` and spaces becomes ``_``. A changed name
    that then equals another name's spelling gets 8 hex digits of its SHA-256:
    ``turkey+poult`` -> ``turkey_poult`` or, next to a class really called ``turkey_poult``,
    ``turkey_poult-d65a7f4d``.
    """
    safe = {n: re.sub(r"[^\w.\- ]", "_", n) for n in names}
    taken = list(safe.values())
    out = {}
    for name, key in safe.items():
        if key != name and taken.count(key) > 1:
            key = f"{key}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        out[name] = key
    return out


@contextmanager
def artifact_upload(name: str):
    """Turn a failed artifact upload into an error that says where to look and what to do.

    With a team server (proxied artifacts), an unreachable artifact store reaches the client
    only as HTTP 500s; the cause is in the server's log.
    """
    try:
        yield
    except MlflowException as exc:
        text = str(exc)
        if not any(sign in text
                   for sign in ("500", "503", "Max retries", "Connection", "timed out")):
            raise  # not a transport failure (e.g. the model could not be exported)
        raise ServerError(
            f"Uploading the artifact {name!r} to {mlflow.get_tracking_uri()} failed: "
            f"{str(exc).splitlines()[0][:300]}. The tracking server could not store it: check "
            "its artifact store (S3) and the server log, then run again (the run is marked "
            "FAILED; -P resume=<output_dir>/checkpoint.pt skips the finished epochs).") from exc


def _dataset_source(source: DataSource):
    """An MLflow dataset source: the URL of an http or s3 source, the local ImageFolder of a
    folder or zip, code for ``synthetic``."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if source.kind == "synthetic":
        from mlflow.data.code_dataset_source import CodeDatasetSource

        return CodeDatasetSource(tags={"generator": "fowlflow.data.synthetic"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" for local paths
        uri = source.uri if source.is_remote else str(Path(source.root).resolve())
        return resolve_dataset_source(uri)

