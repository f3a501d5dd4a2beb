"""``python -m fowlflow.tune.trial SPEC.json``: one trial of a sweep, in its own process.

The sweep (:mod:`fowlflow.tune.sweep`) writes ``SPEC.json`` (the study's storage and name, the
trial's id, the pruner, the trainer config with this trial's values) and sets
``MLFLOW_RUN_ID`` to the child run it created. This process trains with the trainer, reporting
the spec's ``metric`` (default ``best_val_acc``) to the Optuna trial after each epoch; when the pruner says so it stops the
trainer (:class:`fowlflow.trainer.train.StopTraining`). It writes what happened to
``SPEC.json``'s ``result`` file: ``{"value": ..., "pruned": ..., "epochs": ...}``.

Exit codes as ``python -m fowlflow.train``: 0; 2 for a :class:`FowlflowError`; 128 + N when
stopped by signal N. A trial also stops (SIGTERM to itself) when its sweep process is gone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from fowlflow import stopping
from fowlflow.tune import METRIC


def main(argv: list[str] | None = None) -> int:
    return stopping.run_until_stopped(_main, sys.argv[1:] if argv is None else argv,
                                      what="trial stopped")


def _stop_when_orphaned() -> None:
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="fowlflow-sweep-watch", daemon=True).start()


def _main(argv: list[str]) -> int:
    _stop_when_orphaned()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import optuna

    from fowlflow.trainer.config import TrainConfig, checked
    from fowlflow.trainer.train import StopTraining, run
    from fowlflow.tune.pruners import PrunerSpec, make_pruner
    from fowlflow.tune.study import open_storage

    spec = json.loads(Path(argv[0]).read_text())
    cfg = checked(TrainConfig(**spec["config"]))
    pruner = PrunerSpec(**spec["pruner"])
    study = optuna.load_study(study_name=spec["study_name"], storage=open_storage(spec["storage"]),
                              pruner=make_pruner(pruner))
    trial = optuna.trial.Trial(study, spec["trial_id"])
    metric, last = spec.get("metric", METRIC), {}

    def report(epoch: int, metrics: dict[str, float]) -> None:
        last["value"] = metrics[metric]
        trial.report(metrics[metric], epoch)
        if trial.should_prune():
            raise StopTraining(f"pruned by the {pruner.name} pruner ({metric} "
                               f"{metrics[metric]:.4g} at epoch {epoch})")

    summary = run(cfg, params={"study_name": spec["study_name"],
                               "trial_number": spec["trial_number"]}, on_epoch=report)
    stopped = summary["stopped_at_epoch"]
    Path(spec["result"]).write_text(json.dumps({
        "value": last.get("value", summary.get(metric)), "pruned": stopped is not None,
        "epochs": stopped or cfg.num_epochs, "run_id": summary["run_id"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
