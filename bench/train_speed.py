"""Benchmark: fowlflow's training loop vs the Azure ML sample's, tracking overhead, accuracy.

    python bench/train_speed.py speed    --data ../shared/datasets/hymenoptera_data
    python bench/train_speed.py overhead --data ../shared/datasets/hymenoptera_data
    python bench/train_speed.py accuracy --data ../shared/datasets/hymenoptera_data

Not a test: run it on a quiet machine; results go to docs/benchmarks.md by hand, with the
command and the machine. Each sub-command prints a JSON line and a small markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fowlflow.train import DEFAULT_MODEL_NAME, registration  # noqa: E402
from fowlflow.trainer.config import parse_args  # noqa: E402
from fowlflow.trainer.train import run  # noqa: E402


def fowlflow_run(data: str, epochs: int, tracking: bool, extra: list[str] = ()) -> dict:
    out = tempfile.mkdtemp(prefix="ffbench-")
    cfg = parse_args(["--data", data, "--num_epochs", str(epochs), "--weights", "none",
                      "--output_dir", out, *extra])
    start = time.perf_counter()
    # With tracking, as `mlflow run .` does: the model is registered too (finish_seconds).
    summary = run(cfg, tracking=tracking,
                  after=registration(DEFAULT_MODEL_NAME) if tracking else None)
    summary["wall_seconds"] = time.perf_counter() - start
    return summary


def speed(args) -> dict:
    from bench.sample_loop import train_epochs

    sample = train_epochs(args.data, args.epochs)
    ours = fowlflow_run(args.data, args.epochs, tracking=False, extra=["--batch_size", str(args.batch_size)])
    sample_ips = statistics.median(r["train_images_per_sec"] for r in sample)
    return {"sample_train_images_per_sec": sample_ips,
            "sample_epoch_seconds": statistics.median(r["epoch_seconds"] for r in sample),
            "fowlflow_train_images_per_sec": ours["train_images_per_sec"],
            "fowlflow_wall_seconds_incl_decode": ours["wall_seconds"],
            "speedup": ours["train_images_per_sec"] / sample_ips}


def overhead(args) -> dict:
    """Same config twice, tracking off then on (a fresh SQLite store), interleaved."""
    store = tempfile.mkdtemp(prefix="ffbench-mlflow-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    results = {"off": [], "on": []}
    for i in range(args.repeats):
        for mode in ("off", "on"):
            results[mode].append(fowlflow_run(args.data, args.epochs, tracking=mode == "on",
                                              extra=["--batch_size", str(args.batch_size)]))
    off = statistics.median(r["loop_seconds"] for r in results["off"])
    on = statistics.median(r["loop_seconds"] for r in results["on"])
    return {"loop_seconds_tracking_off": off, "loop_seconds_tracking_on": on,
            "overhead_percent": 100 * (on - off) / off,
            "train_images_per_sec_off": statistics.median(r["train_images_per_sec"] for r in results["off"]),
            "train_images_per_sec_on": statistics.median(r["train_images_per_sec"] for r in results["on"]),
            "end_of_run_logging_seconds": statistics.median(r["finish_seconds"] for r in results["on"])}


def accuracy(args) -> dict:
    out = tempfile.mkdtemp(prefix="ffbench-")
    cfg = parse_args(["--data", args.data, "--arch", "efficientnet_lite0", "--weights", "imagenet",
                      "--num_epochs", str(args.epochs), "--learning_rate", str(args.lr),
                      "--batch_size", str(args.batch_size), "--output_dir", out])
    summary = run(cfg, tracking=False)
    return {"arch": "efficientnet_lite0", "epochs": args.epochs, "learning_rate": args.lr,
            "best_val_acc": summary["best_val_acc"],
            "train_images_per_sec": summary["train_images_per_sec"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["speed", "overhead", "accuracy"])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera_data"))
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    args = p.parse_args()
    args.epochs = args.epochs or {"speed": 2, "overhead": 3, "accuracy": 10}[args.what]
    result = {"benchmark": args.what, **globals()[args.what](args),
              "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.processor() or ''}".strip(),
              "command": " ".join(["python"] + sys.argv)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
