"""Per-epoch checkpoints that a later run resumes from (``-P resume=outputs/checkpoint.pt``).

    save_checkpoint(path, state)      # atomic: written to a temporary file, then renamed
    state = load_checkpoint(path, cfg, classes)

Randomness is re-seeded from (seed, rank, epoch) at each epoch start, so a resumed run continues
exactly as an uninterrupted one would, without saving generator states.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fowlflow.errors import ConfigError

# Config fields that must match for a checkpoint to be resumable.
MUST_MATCH = ("arch", "image_size", "freeze_backbone")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str, config: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """Load a checkpoint and check it belongs to this model and data.

    Raises:
        ConfigError: the file is missing or unreadable, or was made for another
            architecture, image size or class list.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"-P resume={path!r}: no such checkpoint file (checkpoints are "
                          "written to <output_dir>/checkpoint.pt).")
    try:
        state = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ConfigError(f"-P resume={path!r} is not a readable checkpoint: {exc}") from exc
    old = state.get("config", {})
    for key in MUST_MATCH:
        if old.get(key) != config.get(key):
            raise ConfigError(f"-P resume={path!r} was made with {key}={old.get(key)!r}, this "
                              f"run has {key}={config.get(key)!r}; use the same value to resume.")
    if state.get("classes") != classes:
        raise ConfigError(f"-P resume={path!r} was trained on classes {state.get('classes')}, "
                          f"the data has {classes}; resume with the same data.")
    return state
