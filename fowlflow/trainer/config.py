"""The trainer's configuration: one argparse flag per MLproject parameter, same names.

    cfg = parse_args(["--data", "synthetic", "--num_epochs", "2"])
    cfg.learning_rate  # 0.001

The resolved config is logged once as MLflow params (see ``fowlflow.tracking``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass

from fowlflow.errors import ConfigError

SAMPLE_DATA_URL = "https://azuremlexamples.blob.core.windows.net/datasets/fowl_data.zip"
AMP_CHOICES = ("auto", "bf16", "off")
CHECKPOINT_ARTIFACT_CHOICES = ("auto", "true", "false")
DATA_PATH_CHOICES = ("auto", "cache", "stream")  # fowlflow.trainer.data_path
# Set (to the backend's name) by the ssh backend, and backends built on it, in the environment
# of the command it starts on a host: there the run's folder is removed by `fowlflow gc`, so
# checkpoint_artifact=auto keeps the checkpoint in the run's artifacts.
LAUNCHED_BY_VAR = "FOWLFLOW_LAUNCHED_BY"


@dataclass(frozen=True)
class TrainConfig:
    """Everything the training run depends on, as the user gave it (after defaults)."""

    data: str = SAMPLE_DATA_URL
    num_epochs: int = 25
    learning_rate: float = 0.001
    momentum: float = 0.9
    step_size: int = 7
    gamma: float = 0.1
    batch_size: int = 32
    image_size: int = 224
    arch: str = "resnet18"
    weights: str = "imagenet"
    freeze_backbone: bool = False
    amp: str = "auto"
    workers: int = 2
    data_path: str = "auto"
    memory_budget_gb: float = 0.0
    seed: int = 42
    output_dir: str = "outputs"
    resume: str = ""
    checkpoint_artifact: str = "auto"

    @property
    def checkpoint_to_artifacts(self) -> bool:
        """Whether each epoch's checkpoint is also kept as the run artifact
        ``checkpoints/checkpoint.pt``: ``true``, or ``auto`` in a run the ssh backend launched
        on a host."""
        if self.checkpoint_artifact == "auto":
            return bool(os.environ.get(LAUNCHED_BY_VAR))
        return self.checkpoint_artifact == "true"

    def as_params(self) -> dict[str, str]:
        """The config as MLflow params (strings)."""
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in asdict(self).items()}


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def optional(text: str) -> str:
    """``none`` (MLproject's default for an unset value) and ``""`` both mean unset: ``""``."""
    return "" if text.strip().lower() in ("", "none") else text


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags; their names equal the MLproject ``main`` parameter names (the entry
    point, ``python -m fowlflow.train``, adds ``--registered_model_name``)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m fowlflow.train",
        description="Transfer-learn an image classifier on an ImageFolder, tracked in MLflow.",
    )
    p.add_argument("--data", default=d.data,
                   help="ImageFolder dir, .zip, http(s) .zip URL, s3://bucket/prefix or 'synthetic'")
    p.add_argument("--num_epochs", type=int, default=d.num_epochs)
    p.add_argument("--learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--step_size", type=int, default=d.step_size, help="StepLR period in epochs")
    p.add_argument("--gamma", type=float, default=d.gamma, help="StepLR decay factor")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--image_size", type=int, default=d.image_size)
    p.add_argument("--arch", default=d.arch,
                   help="a torchvision classification model name, or efficientnet_lite0")
    p.add_argument("--weights", default=d.weights,
                   help="'imagenet', 'none', or a path/URI of a state dict")
    p.add_argument("--freeze_backbone", type=_bool, default=d.freeze_backbone,
                   help="train only the new classification head")
    p.add_argument("--amp", default=d.amp, choices=AMP_CHOICES,
                   help="bf16 autocast: auto (on CUDA and CPUs with native bf16), bf16, off")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="image decoding processes (once on the cached path, every epoch when "
                        "streaming)")
    p.add_argument("--data_path", default=d.data_path, type=lambda text: text.strip().lower(),
                   choices=DATA_PATH_CHOICES,
                   help="auto: decode the set once into memory when this process's part fits "
                        "-P memory_budget_gb, else stream it (decode every epoch); cache; stream")
    p.add_argument("--memory_budget_gb", type=float, default=d.memory_budget_gb,
                   help="memory (GiB, per process) the decoded images may take on the cached "
                        "path; 0: 60%% of the host's available memory (50%% of the GPU's free "
                        "memory on CUDA)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output_dir", default=d.output_dir, help="checkpoints and local outputs")
    p.add_argument("--resume", default=d.resume, type=optional,
                   help="a checkpoint to continue from: a file (e.g. outputs/checkpoint.pt) or "
                        "runs:/<run_id>/checkpoints/checkpoint.pt; none: don't")
    p.add_argument("--checkpoint_artifact", default=d.checkpoint_artifact,
                   type=lambda text: text.strip().lower(), choices=CHECKPOINT_ARTIFACT_CHOICES,
                   help="also keep each epoch's checkpoint in the run's artifacts "
                        "(checkpoints/checkpoint.pt): auto (in runs the ssh backend "
                        "launched), true, false")
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse and validate the command line into a :class:`TrainConfig`.

    Raises:
        ConfigError: a value is out of range (the message names it and the valid range).
    """
    return checked(TrainConfig(**vars(build_parser().parse_args(argv))))


def checked(cfg: TrainConfig) -> TrainConfig:
    """``cfg``, once every value is in range.

    Raises:
        ConfigError: a value is out of range (the message names it and the valid range).
    """
    checks = [
        (cfg.num_epochs >= 1, "num_epochs", cfg.num_epochs, "at least 1"),
        (cfg.learning_rate > 0, "learning_rate", cfg.learning_rate, "greater than 0"),
        (0 <= cfg.momentum < 1, "momentum", cfg.momentum, "in [0, 1)"),
        (cfg.step_size >= 1, "step_size", cfg.step_size, "at least 1"),
        (0 < cfg.gamma <= 1, "gamma", cfg.gamma, "in (0, 1]"),
        (cfg.batch_size >= 1, "batch_size", cfg.batch_size, "at least 1"),
        (cfg.image_size >= 16, "image_size", cfg.image_size, "at least 16"),
        (cfg.workers >= 0, "workers", cfg.workers, "0 or more"),
        (cfg.memory_budget_gb >= 0, "memory_budget_gb", cfg.memory_budget_gb,
         "0 (automatic) or more"),
    ]
    for ok, name, value, want in checks:
        if not ok:
            raise ConfigError(f"-P {name}={value} is invalid: it must be {want}.")
    return cfg
