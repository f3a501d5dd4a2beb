"""Benchmark: an 8-trial sweep on hymenoptera_data with pruning (bandit) and without (none).

    .venv/bin/python bench/tune_sweep.py --data ../shared/datasets/hymenoptera_data

Each sweep is the real ``mlflow run <project> -e tune`` (efficientnet_lite0 with its shipped
ImageNet weights, frozen backbone, CPU-sized settings: SETTINGS below) with the grid sampler
over LEARNING_RATES, so both sweeps try the same 8 trials (in the grid sampler's random
order). Each gets a fresh SQLite tracking store and Optuna study in a temporary folder (removed
afterwards; the data is read in place). It prints a JSON line per sweep and a markdown table:
wall time, trial-epochs run, trials pruned, the best ``best_val_acc`` and its learning rate.
Not a test: results go to docs/benchmarks.md by hand, with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEARNING_RATES = [0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.06]
SETTINGS = {"arch": "efficientnet_lite0", "weights": "imagenet", "freeze_backbone": "true",
            "image_size": "224", "batch_size": "16", "workers": "1", "num_epochs": "6",
            "n_trials": "8", "parallel": "1", "sampler": "grid",
            "delay_evaluation": "1", "evaluation_interval": "1", "slack_factor": "0.15"}


def sweep(data: str, pruner: str, epochs: int, keep: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"fowlflow-bench-tune-{pruner}-"))
    space = {"learning_rate": {"type": "categorical", "choices": LEARNING_RATES}}
    params = {**SETTINGS, "num_epochs": str(epochs), "data": str(Path(data).resolve()),
              "pruner": pruner, "search_space": json.dumps(space),
              "storage": f"sqlite:///{work / 'optuna.db'}", "study_name": f"bench-{pruner}",
              "output_dir": str(work / "outputs")}
    argv = [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e", "tune",
            "--env-manager", "local", *[a for k, v in params.items() for a in ("-P", f"{k}={v}")]]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # its python
    start = time.perf_counter()
    with open(work / "sweep.log", "w") as log:
        rc = subprocess.run(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"the {pruner} sweep failed (exit {rc}); its log: {work / 'sweep.log'}")
    return {"pruner": pruner, "wall_seconds": round(wall, 1), **_study_numbers(work, pruner),
            **({"folder": str(work)} if keep else _removed(work))}


def _study_numbers(work: Path, pruner: str) -> dict:
    import optuna

    study = optuna.load_study(study_name=f"bench-{pruner}", storage=f"sqlite:///{work / 'optuna.db'}")
    trials = study.trials
    return {"trial_epochs": sum(t.last_step or 0 for t in trials),
            "trials": [(t.params["learning_rate"], t.state.name, t.last_step,
                        round(t.value if t.value is not None
                              else t.intermediate_values.get(t.last_step, 0), 4))
                       for t in trials],
            "pruned": sum(t.state.name == "PRUNED" for t in trials),
            "best_val_acc": round(study.best_value, 4),
            "best_learning_rate": study.best_params["learning_rate"]}


def _removed(work: Path) -> dict:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="hymenoptera_data (train/ and val/)")
    p.add_argument("--epochs", type=int, default=int(SETTINGS["num_epochs"]))
    p.add_argument("--pruners", default="bandit,none")
    p.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = p.parse_args()
    results = []
    for pruner in args.pruners.split(","):
        results.append(sweep(args.data, pruner, args.epochs, args.keep))
        print(json.dumps(results[-1]), flush=True)
    print("\n| pruner | wall time | trial-epochs | pruned | best best_val_acc (lr) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['pruner']} | {r['wall_seconds'] / 60:.1f} min | {r['trial_epochs']} | "
              f"{r['pruned']} | {r['best_val_acc']} ({r['best_learning_rate']}) |")
    if len(results) == 2:
        saved = 1 - results[0]["trial_epochs"] / results[1]["trial_epochs"]
        print(f"\npruning saved {saved:.0%} of trial-epochs and "
              f"{1 - results[0]['wall_seconds'] / results[1]['wall_seconds']:.0%} of wall time")


if __name__ == "__main__":
    main()
