"""Benchmark: the cached data path against the streaming one, side by side (not a test).

    .venv/bin/python bench/data_paths.py --quick
    .venv/bin/python bench/data_paths.py --data ../shared/datasets/hymenoptera_data --epochs 3

Each variant trains in a fresh process (tracking off, ResNet18 from scratch, ``-P workers``
decoding processes), cached and streamed alternately, ``--repeats`` times: the training
images/s of its epochs (median; the cached path's decode is before its first epoch, the
streaming path decodes in every epoch), the process's wall time and its peak RSS (the cache
holds the decoded set; streaming holds the batches in flight). Also the streaming loader
alone (decode + collate, no training): the most the streaming path can feed on this machine.
Prints a markdown section (the command, the machine, its load) for docs/benchmarks.md.

``--quick``: 64 px, 2 epochs, one repeat (~2-4 min on 2 loaded cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera_data"


def one(args) -> dict:
    """One training run on one data path, in this process; a JSON-able summary."""
    from fowlflow.trainer import train as trainer
    from fowlflow.trainer.config import parse_args

    speeds, real = [], trainer.train_epoch

    def timed(*a, **k):  # each epoch's images/s as the trainer measures it
        stats = real(*a, **k)
        speeds.append(stats.images_per_sec)
        return stats
    trainer.train_epoch = timed
    out = tempfile.mkdtemp(prefix="ffbench-paths-")
    cfg = parse_args(["--data", str(args.data), "--num_epochs", str(args.epochs),
                      "--weights", "none", "--image_size", str(args.image_size),
                      "--batch_size", str(args.batch_size), "--workers", str(args.workers),
                      "--data_path", args.one, "--amp", "off", "--output_dir", out])
    start = time.perf_counter()
    trainer.run(cfg, tracking=False)
    wall = time.perf_counter() - start
    return {"path": args.one, "epoch_images_per_sec": speeds, "wall_seconds": wall,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def loader_only(args) -> float:
    """Images/s of the streaming loader alone over the training split (one pass)."""
    import torch

    from fowlflow.data.imagefolder import scan_imagefolder
    from fowlflow.trainer.distributed import DistContext
    from fowlflow.trainer.loop import LoopSetup
    from fowlflow.trainer.streaming import StreamedSplit

    layout = scan_imagefolder(Path(args.data))
    split = StreamedSplit(layout.train.paths, layout.train.labels,
                          list(range(len(layout.train.paths))), "train", args.image_size,
                          args.workers, torch.device("cpu"))
    setup = LoopSetup(torch.device("cpu"), DistContext(), args.batch_size, args.image_size, 2,
                      42, False, progress=False)
    start = time.perf_counter()
    sizes, batches = split.train_batches(setup, 1)
    n = sum(len(labels) for _, _, labels in batches)
    return n / (time.perf_counter() - start)


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an ImageFolder")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="64 px, 2 epochs, one repeat")
    p.add_argument("--one", choices=("cache", "stream"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.epochs, args.repeats = 64, 2, 1
    if not (args.data / "train").is_dir():
        p.error(f"--data {args.data}: no train/ folder there; give an ImageFolder "
                "(<dir>/train/<class>/*, <dir>/val/<class>/*)")
    if args.one:
        print(json.dumps(one(args)))
        return 0
    command = " ".join([".venv/bin/python", "bench/data_paths.py", *(argv or sys.argv[1:])])
    load = os.getloadavg()
    results: dict[str, list[dict]] = {"cache": [], "stream": []}
    for _ in range(args.repeats):
        for path in ("cache", "stream"):
            proc = subprocess.run(
                [sys.executable, __file__, "--one", path, "--data", str(args.data),
                 "--epochs", str(args.epochs), "--image-size", str(args.image_size),
                 "--batch-size", str(args.batch_size), "--workers", str(args.workers)],
                capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            results[path].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    feed = loader_only(args)
    rows = []
    for path, runs in results.items():
        later = [s for r in runs for s in r["epoch_images_per_sec"][1:]] or \
            [s for r in runs for s in r["epoch_images_per_sec"]]
        rows.append((path, statistics.median(s for r in runs for s in r["epoch_images_per_sec"]),
                     statistics.median(later), statistics.median(r["wall_seconds"] for r in runs),
                     max(r["peak_rss_mib"] for r in runs)))
    print(f"### Data paths: cached vs streaming ({args.data.name}, {args.image_size} px)\n")
    print(f"`{command}`; {machine()}; load average before: {load[0]:.1f}, {load[1]:.1f}, "
          f"{load[2]:.1f}; ResNet18 from scratch, fp32, batch {args.batch_size}, "
          f"{args.epochs} epochs, workers {args.workers}, {args.repeats} run(s) per path, "
          "interleaved, each in a fresh process.\n")
    print("| data path | train img/s (median epoch) | epochs 2+ | process wall s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for path, ips, ips_later, wall, rss in rows:
        print(f"| {path} | {ips:.1f} | {ips_later:.1f} | {wall:.1f} | {rss:.0f} |")
    print(f"\nThe streaming loader alone (decode + collate in {args.workers} workers, no "
          f"training): {feed:.0f} img/s.")
    print(json.dumps({"results": results, "loader_only_images_per_sec": feed}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
