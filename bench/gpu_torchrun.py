"""Images/s of the trainer launched through ``mlflow run -b torchrun`` on 1 GPU (not a test).

Prepared for a machine with an NVIDIA GPU; compares against a plain-PyTorch ceiling (a bare
ResNet18 training step on random tensors already on the GPU, batch 256, 224 px, bf16 +
channels_last: 13,075 img/s measured on one H200; see docs/benchmarks.md) and against the same
trainer started directly (no backend), so the backend's own cost shows::

    .venv/bin/python bench/gpu_torchrun.py [--data DIR] [--epochs 30] [--batch-size 256]

The image set is decoded once into the trainer's GPU cache, so after the first epoch the
loop measures training, not JPEG decoding. Writes ``$OUT/gpu_torchrun.json`` (or
``bench/results/gpu_torchrun.json``) and prints one line per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CEILING = 13_075  # img/s: bare ResNet18 step, batch 256, bf16 + channels_last, one H200
BIN = Path(sys.executable).parent


def params(args, out_dir: Path) -> list[str]:
    p = {"data": args.data, "arch": "resnet18", "weights": "none", "image_size": "224",
         "batch_size": str(args.batch_size), "num_epochs": str(args.epochs), "workers": "0",
         "amp": "auto", "output_dir": str(out_dir)}
    return [x for k, v in p.items() for x in ("-P", f"{k}={v}")]


def speeds(tracking_uri: str) -> tuple[str, list[float]]:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    run = mlflow.search_runs(search_all_experiments=True, output_format="list",
                             order_by=["start_time DESC"])[0]
    hist = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_images_per_sec")
    return run.info.run_id, [m.value for m in sorted(hist, key=lambda m: m.step)]


def run_variant(name: str, argv_tail: list[str], args, tmp: Path) -> dict:
    uri = f"sqlite:///{tmp / (name + '.db')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    started = time.perf_counter()
    proc = subprocess.run([str(BIN / "mlflow"), "run", str(ROOT), "--env-manager", "local",
                           *argv_tail, *params(args, tmp / name)], env=env, cwd=tmp,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    run_id, values = speeds(uri)
    steady = values[1:] or values  # epoch 1 includes decoding and cuDNN autotuning
    img_s = statistics.median(steady)
    return {"variant": name, "run_id": run_id, "images_per_sec": round(img_s, 1),
            "per_epoch": [round(v, 1) for v in values], "wall_s": round(wall, 1),
            "of_ceiling": round(img_s / CEILING, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_data = ROOT.parent / "shared" / "datasets" / "hymenoptera_data"
    parser.add_argument("--data", default=str(default_data) if default_data.exists()
                        else "synthetic")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True)
    if smi.returncode != 0:
        raise SystemExit("no NVIDIA GPU here (nvidia-smi failed); run this on a GPU machine")
    results = {"gpu": smi.stdout.strip().splitlines()[0], "ceiling_images_per_sec": CEILING,
               "data": args.data, "epochs": args.epochs, "batch_size": args.batch_size,
               "variants": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = json.dumps({"gpus": [0], "process_count_per_node": 1,
                          "run_dir": str(tmp / "runs")})
        for name, tail in (("direct", []), ("torchrun_backend", ["-b", "torchrun", "-c", cfg])):
            res = run_variant(name, tail, args, tmp)
            results["variants"].append(res)
            print(f"{name:18s} {res['images_per_sec']:9.1f} img/s  "
                  f"{100 * res['of_ceiling']:5.1f} % of {CEILING}  (wall {res['wall_s']} s)",
                  flush=True)
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_torchrun.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
