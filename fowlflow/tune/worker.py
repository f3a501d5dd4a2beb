"""``fowlflow tune worker``: another machine joins a sweep's study and runs some of its trials.

    export PGPASSWORD=...        # or a line in ~/.pgpass; never in --storage
    export MLFLOW_TRACKING_URI=http://mlflow.example.com   # the sweep's tracking server
    fowlflow tune worker --study NAME --storage postgresql://user@host:5432/optuna

The sweep (``mlflow run . -e tune``) stored in the study what a trial needs (the user attribute
:data:`~fowlflow.tune.study.SWEEP_ATTR`: search space, fixed trainer settings, pruner, sampler,
``n_trials`` and its parent run). The worker runs trials of that study, as the sweep does (one
process each, one child run of the sweep's parent run each), until the study has ``n_trials``
complete and pruned trials across all its processes. Optuna's storage hands each trial to one
process; the sweep waits for the workers' running trials before its summary.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fowlflow import stopping
from fowlflow.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("worker", help="run trials of a sweep's study on this machine",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="the study's name (the sweep prints it)")
    p.add_argument("--storage", required=True,
                   help="the study's storage URL, without a password (PGPASSWORD, ~/.pgpass)")
    p.add_argument("--parallel", type=int, default=1, help="trials running at once here")
    p.add_argument("--output_dir", default=None,
                   help="checkpoints under OUTPUT_DIR/<study>/trial-N (default: the sweep's)")
    p.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    return stopping.run_until_stopped(_run, args, what="worker stopped")


def _run(args: argparse.Namespace) -> int:
    import mlflow
    import optuna
    from mlflow.exceptions import MlflowException

    from fowlflow.data.sources import resolve_data
    from fowlflow.trainer.config import TrainConfig, checked
    from fowlflow.tune import space as spaces
    from fowlflow.tune.pruners import PrunerSpec, make_pruner
    from fowlflow.tune.study import (SWEEP_ATTR, has_password, load_study, make_sampler,
                                     masked, open_storage)
    from fowlflow.tune.sweep import Sweep, finished_trials

    if has_password(args.storage):
        raise ConfigError(f"--storage {masked(args.storage)}: don't put the password on the "
                          "command line (every user of this machine sees it, the shell keeps "
                          "it); give it in PGPASSWORD or ~/.pgpass, which libpq reads.")
    if args.parallel < 1:
        raise ConfigError(f"--parallel {args.parallel} is invalid: it must be at least 1.")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(args.storage, heartbeat=True)
    study = load_study(storage, args.study)
    attrs = study.user_attrs[SWEEP_ATTR]
    space = spaces.parse_space(json.dumps(attrs["space"]))
    config = checked(TrainConfig(**{**attrs["config"], **({"output_dir": args.output_dir}
                                                           if args.output_dir else {})}))
    pruner = PrunerSpec(**attrs["pruner"])
    study.sampler = make_sampler(attrs["sampler"], {d.name: d.grid() for d in space}
                                 if attrs["sampler"] == "grid" else None)
    study.pruner = make_pruner(pruner)
    client = mlflow.MlflowClient()
    try:
        client.get_run(attrs["parent_run_id"])
    except MlflowException:
        raise ConfigError(f"The sweep's parent run {attrs['parent_run_id']} is not in the "
                          f"tracking server {masked(mlflow.get_tracking_uri())}; set "
                          f"MLFLOW_TRACKING_URI to the sweep's ({attrs['tracking_uri']}).") from None
    resolve_data(config.data)  # once here, not in every trial
    print(f"fowlflow: worker on study {study.study_name} in {masked(storage.url)}; parent run "
          f"{attrs['parent_run_id']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fowlflow-tune-worker-") as work:
        Sweep(study, space, config, storage.url, pruner, attrs["parent_run_id"], client,
              Path(work), metric=attrs.get("metric", "best_val_acc")).run(attrs["n_trials"], min(args.parallel, attrs["n_trials"]))
    print(f"fowlflow: worker done: study {study.study_name} has {finished_trials(study)} "
          f"finished trials (n_trials={attrs['n_trials']})", flush=True)
    return 0

