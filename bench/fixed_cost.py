"""Benchmark: where a training run's seconds go outside its epochs, and its peak memory.

    python bench/fixed_cost.py --data ../shared/datasets/hymenoptera_data --epochs 3
    python bench/fixed_cost.py --sample          # the sample's loop, same epochs: its peak memory

Runs ``python -m fowlflow.train`` (``--registered_model_name none``, ``--weights none``, a fresh
SQLite store) in a fresh interpreter, with timers wrapped around the trainer's phases, and
prints one JSON line: the process wall time, the epochs' time (train + validation), the
difference (the fixed cost) and its breakdown per phase, the first metric's delay after the
process started, and the peak RSS of the trainer process and of its decode workers. Not a
test: results go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(argv: list[str], out: str) -> None:
    """In the trainer process: wrap the phases, run the entry point, write the timings."""
    import psutil

    born = psutil.Process().create_time()
    sys.path.insert(0, str(ROOT))
    import fowlflow.train as entry
    import fowlflow.trainer.train as tt
    from fowlflow.tracking.run_tracker import RunTracker

    phases: dict[str, float] = defaultdict(float)
    peaks: list[tuple[str, float]] = []  # (phase, peak RSS in MB after it) where the peak rose
    phases["imports (interpreter start to trainer imported)"] = time.time() - born
    state = {"in_epochs": False}

    def timed(owner, name: str, label):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                name = label(a) if callable(label) else label
                phases[name] += time.perf_counter() - start
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                if not peaks or peak > peaks[-1][1] + 20:
                    peaks.append((name, round(peak)))
        setattr(owner, name, wrapper)

    def epochs(*a, **k):
        state["in_epochs"] = True
        try:
            return original_epochs(*a, **k)
        finally:
            state["in_epochs"] = False
    original_epochs, tt._epochs = tt._epochs, epochs
    timed(tt, "train_epoch", "epochs: train")
    timed(tt, "evaluate", lambda a: "epochs: validation" if state["in_epochs"]
          else "final evaluation")
    timed(tt, "_load_data", "data: resolve + decode")
    timed(tt._Training, "build", "model build")
    timed(tt, "_log_inputs", "log params/tags/datasets")
    timed(tt, "save_checkpoint", "checkpoints")
    timed(RunTracker, "start", "mlflow run start")
    timed(RunTracker, "log_figure", "figures: log")
    for fn in ("confusion_matrix_figure", "misclassified_grid"):
        timed(tt.figures, fn, "figures: draw")
    timed(RunTracker, "log_table", "figures: log")
    timed(RunTracker, "log_model", "model: pt2 export + log")
    timed(RunTracker, "flush", "flush + end run")
    timed(RunTracker, "finish", "flush + end run")
    start = time.time()
    code = entry.main(argv)
    phases["in process total"] = time.time() - born
    Path(out).write_text(json.dumps({"phases": phases, "born": born, "code": code,
                                     "peak_rss_mb_rose_in": peaks,
                                     "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                     "main_seconds": time.time() - start}))
    getattr(entry, "exit_now", sys.exit)(code)  # as `python -m fowlflow.train` ends


def _first_metric_delays(uri: str, born: float) -> dict[str, float | None]:
    """Seconds from the process start to the first metric, and to the first step loss."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs(["0"])
    times = {key: min(m.timestamp for m in client.get_metric_history(run.info.run_id, key))
             for key in run.data.metrics if not key.startswith("system/")}
    step = times.get("train_loss_step")
    return {"first_metric_after_start_seconds": min(times.values()) / 1000 - born if times else None,
            "first_train_loss_step_after_start_seconds": step / 1000 - born if step else None}


def fowlflow(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="ffbench-fixed-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    subprocess.run([sys.executable, "-c", "import mlflow; mlflow.MlflowClient().get_experiment('0')"],
                   cwd=tmp, env=env, check=True)  # the store exists, as after a first run
    argv = ["--data", args.data, "--num_epochs", str(args.epochs), "--weights", "none",
            "--registered_model_name", "none", "--output_dir", str(tmp / "out"), *args.extra]
    start = time.time()
    subprocess.run([sys.executable, __file__, "--child", str(tmp / "t.json"), "--", *argv],
                   cwd=tmp, env=env, check=True)
    wall = time.time() - start
    child = json.loads((tmp / "t.json").read_text())
    phases = child["phases"]
    epochs = phases["epochs: train"] + phases["epochs: validation"]
    named = sum(v for k, v in phases.items() if k != "in process total" and k != "imports (interpreter start to trainer imported)")
    phases["exit (process end after main)"] = wall - (child["born"] - start) - phases["in process total"]
    phases["other (unaccounted in process)"] = phases["in process total"] - named - phases["imports (interpreter start to trainer imported)"]
    result = {"wall_seconds": wall, "epoch_seconds": epochs, "fixed_seconds": wall - epochs,
              "phases": {k: round(v, 2) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
              **_first_metric_delays(uri, child["born"]),
              "peak_rss_trainer_mb": child["maxrss_mb"],
              "peak_rss_mb_rose_in": child["peak_rss_mb_rose_in"],
              "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return result


def sample(args) -> dict:
    """The sample's loop in a fresh interpreter: wall time and peak RSS."""
    code = ("import sys, resource, json; sys.path.insert(0, %r)\n"
            "from bench.sample_loop import train_epochs\n"
            "rows = train_epochs(%r, %d)\n"
            "print(json.dumps({'epoch_seconds': sum(r['epoch_seconds'] for r in rows),"
            " 'maxrss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))"
            % (str(ROOT), args.data, args.epochs))
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_seconds": time.time() - start, "epoch_seconds": row["epoch_seconds"],
            "peak_rss_trainer_mb": row["maxrss_mb"],
            "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(sys.argv[sys.argv.index("--") + 1:], sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "hymenoptera_data"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--sample", action="store_true", help="measure the sample's loop instead")
    p.add_argument("extra", nargs="*", help="more trainer flags, after --")
    args = p.parse_args()
    args.data = str(Path(args.data).resolve())  # the runs start in folders of their own
    result = sample(args) if args.sample else fowlflow(args)
    print(json.dumps({"benchmark": "sample" if args.sample else "fowlflow", **result,
                      "command": " ".join(["python"] + sys.argv)}))


if __name__ == "__main__":
    main()
