"""Benchmark: fowlflow's training loop vs the Azure ML sample's, tracking overhead, accuracy.

    python bench/train_speed.py speed    --data ../shared/datasets/hymenoptera_data
    python bench/train_speed.py bare     --data ../shared/datasets/hymenoptera_data
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


def bare_step_speed(batch_size: int, steps: int = 8) -> tuple[float, float]:
    """The bare ResNet18 training step on random tensors, as the trainer runs it on this
    machine (channels-last, bf16 autocast where the trainer turns it on): the ceiling.
    Returns (images per wall second, images per CPU second of this process)."""
    import torch
    import torch.nn.functional as F
    import torchvision

    from fowlflow.trainer.train import use_bf16

    device = torch.device("cpu")
    model = torchvision.models.resnet18(num_classes=2).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    x = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch_size,))
    amp = use_bf16("auto", device)
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            start, cpu = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    images = steps * batch_size
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu)


def fowlflow_loop_speed(data: str, epochs: int, batch_size: int) -> tuple[float, float]:
    """fowlflow's training epochs (tracking on: live step metrics), epoch 1 left out:
    (images per wall second, images per CPU second of this process)."""
    import fowlflow.trainer.train as trainer

    epoch_speeds, real_train_epoch = [], trainer.train_epoch

    def timed_epoch(*args, **kwargs):
        cpu = time.process_time()
        stats = real_train_epoch(*args, **kwargs)
        epoch_speeds.append((stats.images_per_sec, stats.images / (time.process_time() - cpu)))
        return stats

    trainer.train_epoch = timed_epoch
    try:
        run(parse_args(["--data", data, "--num_epochs", str(epochs), "--weights", "none",
                        "--batch_size", str(batch_size),
                        "--output_dir", tempfile.mkdtemp(prefix="ffbench-")]))
    finally:
        trainer.train_epoch = real_train_epoch
    kept = epoch_speeds[1:] or epoch_speeds
    return (statistics.median(w for w, _ in kept), statistics.median(c for _, c in kept))


def bare(args) -> dict:
    """fowlflow's loop (tracking on, a fresh SQLite store) against the bare step, interleaved
    ``repeats`` times. Images per CPU second are the steadier figure on a shared machine."""
    store = tempfile.mkdtemp(prefix="ffbench-mlflow-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    ceiling, loop = [], []
    for _ in range(args.repeats):
        ceiling.append(bare_step_speed(args.batch_size))
        loop.append(fowlflow_loop_speed(args.data, args.epochs, args.batch_size))
    return {"bare_step_images_per_sec_wall_cpu": ceiling, "fowlflow_loop_images_per_sec_wall_cpu": loop,
            "loop_over_bare_wall": statistics.median(w for w, _ in loop) / statistics.median(w for w, _ in ceiling),
            "loop_over_bare_cpu": statistics.median(c for _, c in loop) / statistics.median(c for _, c in ceiling)}


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
    p.add_argument("what", choices=["speed", "bare", "overhead", "accuracy"])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera_data"))
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    args = p.parse_args()
    args.data = str(Path(args.data).resolve())  # the runs start in folders of their own
    args.epochs = args.epochs or {"speed": 2, "bare": 3, "overhead": 3,
                                   "accuracy": 10}[args.what]
    result = {"benchmark": args.what, **globals()[args.what](args),
              "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.processor() or ''}".strip(),
              "command": " ".join(["python"] + sys.argv)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
