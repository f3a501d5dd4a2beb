"""A training-like MLflow client for the fault tests (run as a separate process).

    python metric_logger.py EXPERIMENT STEPS [--interval S] [--artifacts DIR] [--wait-before-upload]

Starts a run, logs ``loss`` and ``acc`` for every step with one ``log_batch`` per step, then
optionally uploads the files of DIR one by one, and ends the run. It prints ``RUN <id>``,
``STEP <n>``, ``UPLOADED <name>`` lines so that a test can act at a known moment; with
``--wait-before-upload`` it prints ``READY`` and reads one line of stdin before each upload
after the first. Any error ends the run as FAILED (``with start_run``) and exits 1 with the
error on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment")
    ap.add_argument("steps", type=int)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--artifacts", type=Path)
    ap.add_argument("--wait-before-upload", action="store_true")
    args = ap.parse_args()

    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    mlflow.set_experiment(args.experiment)
    client = MlflowClient()
    try:
        with mlflow.start_run() as run:
            print(f"RUN {run.info.run_id}", flush=True)
            for step in range(args.steps):
                now = int(time.time() * 1000)
                client.log_batch(run.info.run_id, metrics=[
                    Metric("loss", 1.0 / (step + 1), now, step),
                    Metric("acc", step / args.steps, now, step)])
                print(f"STEP {step}", flush=True)
                time.sleep(args.interval)
            if args.artifacts:
                for i, f in enumerate(sorted(args.artifacts.iterdir())):
                    if args.wait_before_upload and i > 0:
                        print("READY", flush=True)
                        sys.stdin.readline()
                    mlflow.log_artifact(str(f), "outputs")
                    print(f"UPLOADED {f.name}", flush=True)
    except Exception as exc:  # the run is already marked FAILED by start_run's __exit__
        print(f"ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
