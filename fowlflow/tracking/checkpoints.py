"""Checkpoints kept in the MLflow run's artifacts, so that they outlive the host that trained.

    uploader = CheckpointUploader(run_id)      # global rank 0 only
    uploader.submit(Path("outputs/checkpoint.pt"))   # after each epoch's save: returns at once
    uploader.close()                           # waits for the last one; raises if it failed
    path = download_checkpoint("runs:/<id>/checkpoints/checkpoint.pt", into)   # for resume

The artifact ``checkpoints/checkpoint.pt`` is replaced each epoch. Uploads run on one
background thread; an epoch's checkpoint that arrives while the previous one is still being
uploaded waits, and is dropped for a newer one if that arrives first, so a slow artifact store
never holds up training and never receives a checkpoint that is already out of date.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

from fowlflow.errors import ConfigError, ServerError

ARTIFACT_DIR = "checkpoints"
ARTIFACT_NAME = "checkpoint.pt"


def is_artifact_uri(text: str) -> bool:
    return text.startswith("runs:/")


class CheckpointUploader:
    """Uploads the newest checkpoint file to ``checkpoints/checkpoint.pt`` of ``run_id``."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._cond = threading.Condition()
        self._pending: Path | None = None  # a snapshot waiting for the thread
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self._snapshots: Path | None = None  # beside the checkpoint, so a hard link works
        self._count = 0
        self._thread = threading.Thread(target=self._work, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, path: Path) -> None:
        """Queue ``path`` (a hard link to it, so the next save, which replaces the file, can't
        change what is sent).

        Raises:
            ServerError: an earlier upload failed.
        """
        self._raise_error()
        if self._snapshots is None:
            self._snapshots = Path(tempfile.mkdtemp(prefix=".checkpoint-upload-", dir=path.parent))
        self._count += 1
        snap = self._snapshots / str(self._count) / ARTIFACT_NAME
        snap.parent.mkdir()
        try:
            os.link(path, snap)
        except OSError:
            shutil.copyfile(path, snap)
        with self._cond:
            dropped, self._pending = self._pending, snap
            self._cond.notify_all()
        if dropped is not None:
            shutil.rmtree(dropped.parent, ignore_errors=True)

    def close(self, raise_errors: bool = True) -> None:
        """Wait until the last submitted checkpoint is uploaded, then stop the thread.

        Raises:
            ServerError: an upload failed (only when ``raise_errors``).
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self._snapshots is not None:
            shutil.rmtree(self._snapshots, ignore_errors=True)
        if raise_errors:
            self._raise_error()

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                snap, self._pending = self._pending, None
                if snap is None:
                    return
            try:
                if self._error is None:
                    self._upload(snap)
            except BaseException as exc:  # reported by the next submit() or close()
                self._error = exc
            finally:
                shutil.rmtree(snap.parent, ignore_errors=True)

    def _upload(self, snap: Path) -> None:
        from mlflow.tracking import MlflowClient

        MlflowClient().log_artifact(self.run_id, str(snap), ARTIFACT_DIR)

    def _raise_error(self) -> None:
        if self._error is not None:
            import mlflow

            exc = self._error
            raise ServerError(
                f"Uploading the checkpoint to {ARTIFACT_DIR}/{ARTIFACT_NAME} of run {self.run_id} "
                f"({mlflow.get_tracking_uri()}) failed: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}. "
                "Check the tracking server's artifact store and its log, or run with "
                "-P checkpoint_artifact=false to keep checkpoints in <output_dir> only.") from exc


def download_checkpoint(uri: str, into: Path) -> Path:
    """Download the checkpoint artifact ``uri`` (``runs:/<run_id>/<path>``) into ``into``.

    Raises:
        ConfigError: the run or the artifact does not exist, or the URI names a folder.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    fix = (f"give -P resume=runs:/<run_id>/{ARTIFACT_DIR}/{ARTIFACT_NAME} of a run trained "
           "with -P checkpoint_artifact=true (or auto under the ssh backend), or a local file")
    parts = uri[len("runs:/"):].strip("/").split("/", 1)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"-P resume={uri!r} is not a checkpoint artifact URI; {fix}.")
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
    except (MlflowException, OSError) as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ConfigError(f"-P resume={uri!r} could not be downloaded from "
                          f"{mlflow.get_tracking_uri()} ({first}); {fix}.") from None
    if not local.is_file():
        raise ConfigError(f"-P resume={uri!r} is a folder of artifacts, not one checkpoint "
                          f"file; {fix}.")
    return local
