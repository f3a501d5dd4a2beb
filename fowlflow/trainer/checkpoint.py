"""Per-epoch checkpoints that a later run resumes from (``-P resume=outputs/checkpoint.pt``,
or ``-P resume=runs:/<run_id>/checkpoints/checkpoint.pt`` when the run kept it in its artifacts
with ``-P checkpoint_artifact``, see :mod:`fowlflow.tracking.checkpoints`).

    check_output_dir(cfg.output_dir)        # before training: can checkpoints be written there?
    save_checkpoint(path, state)            # atomic: written to a temporary file, then renamed
    state = load_checkpoint(path, cfg)      # tensors and plain values only (weights_only=True)
    check_classes(state, path, classes)

A checkpoint holds only tensors and plain Python values, and is loaded with
``torch.load(weights_only=True)``: a file that would run code or build other objects when
unpickled is refused, not executed. Randomness is re-seeded from (seed, rank, epoch) at each
epoch start, so a resumed run continues exactly as an uninterrupted one would, without saving
generator states.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from fowlflow.errors import ConfigError

# Config fields that must match for a checkpoint to be resumable.
MUST_MATCH = ("arch", "image_size", "freeze_backbone")
# What every fowlflow checkpoint holds, and the type of each entry.
FIELDS = {"epoch": int, "model": dict, "optimizer": dict, "scheduler": dict,
          "best_acc": float, "best_state": dict, "config": dict, "classes": list}
FIX = ("resume from a <output_dir>/checkpoint.pt written by a fowlflow run, or leave -P resume= "
       "empty to start afresh")


def check_output_dir(output_dir: str) -> None:
    """Fail now, not after an epoch, if checkpoints can't be written under ``output_dir``.

    Raises:
        ConfigError: it (or a folder above it) is a file, or it is not writable.
    """
    path = Path(output_dir)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is below the file {existing}"
        raise ConfigError(f"-P output_dir={output_dir!r} {where}, so checkpoints can't be written "
                          "there; choose a folder (it is created if missing) or move the file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"-P output_dir={output_dir!r} is not writable ({existing} does not "
                          "let this user create files); choose a writable folder or fix its "
                          "permissions.")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str, config: dict[str, Any], label: str | None = None) -> dict[str, Any]:
    """Load a checkpoint (tensors and plain values only) and check it fits this model.

    ``label``: what the user gave as ``-P resume`` when ``path`` is a download of it.

    Raises:
        ConfigError: the file is missing, corrupt, not a fowlflow checkpoint, would run code
            when loaded, or was made for another architecture or image size.
    """
    shown = label or path
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"-P resume={shown!r}: no such checkpoint file (checkpoints are "
                          "written to <output_dir>/checkpoint.pt).")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        hostile = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if hostile:
            raise ConfigError(f"-P resume={shown!r} was not loaded: besides tensors and plain "
                              f"values it holds {hostile[1]}, and loading that could run code; "
                              f"{FIX}.") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = detail[1] if detail else text.split(". ")[0]
        raise ConfigError(f"-P resume={shown!r} is not a readable PyTorch file (corrupt, or "
                          f"another format: {reason.strip()[:300]}); {FIX}.") from None
    if isinstance(state, dict):
        wrong = [key for key, kind in FIELDS.items() if not isinstance(state.get(key), kind)]
    else:
        wrong = list(FIELDS)
    if wrong:
        raise ConfigError(f"-P resume={shown!r} is a PyTorch file but not a fowlflow checkpoint "
                          f"(missing or wrong: {', '.join(wrong)}); {FIX}.")
    old = state["config"]
    for key in MUST_MATCH:
        if old.get(key) != config.get(key):
            raise ConfigError(f"-P resume={shown!r} was made with {key}={old.get(key)!r}, this "
                              f"run has {key}={config.get(key)!r}; use the same value to resume.")
    return state


def check_classes(state: dict[str, Any], path: str, classes: list[str]) -> None:
    """Raises ConfigError when the checkpoint was trained on other classes than the data has."""
    if state["classes"] != classes:
        raise ConfigError(f"-P resume={path!r} was trained on classes {state['classes']}, "
                          f"the data has {classes}; resume with the same data.")

