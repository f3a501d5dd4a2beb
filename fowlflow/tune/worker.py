"""``fowlflow tune worker``: another machine joins a sweep's study and runs some of its trials.

    export PGPASSWORD=...        # or a line in ~/.pgpass; never in --storage
    export MLFLOW_TRACKING_URI=http://mlflow.example.com   # the sweep's tracking server
    fowlflow tune worker --study NAME --storage postgresql://user@host:5432/optuna

The sweep (``mlflow run . -e tune``) stored in the study what a trial needs (the user attribute
:data:`~fowlflow.tune.study.SWEEP_ATTR`: search space, fixed trainer settings, pruner, sampler,
``n_trials``, its parent run, its ``-P backend`` and ``-P backend_config``). The worker runs
trials of that study, as the sweep does (one child run of the sweep's parent run each, a
process here or a run through the sweep's backend), until the study has ``n_trials`` complete
and pruned trials across all its processes. Optuna's storage hands each trial to one process;
the sweep waits for the workers' running trials before its summary. A backend config that
names hosts (``ssh``) or a kept ec2 cluster (``cluster_name``) is the sweep's own: the worker
needs ``--backend_config`` with hosts or a cluster name of its own then::

    fowlflow tune worker --study NAME --storage URL --backend_config my-hosts.json
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
    p.add_argument("--backend", default=None,
                   help="run trials through this backend: none, torchrun, ssh or ec2 "
                        "(default: the sweep's -P backend)")
    p.add_argument("--backend_config", default=None,
                   help="the backend's config, inline JSON or a .json file (default: the "
                        "sweep's, except ssh hosts and an ec2 cluster_name, which are its own)")
    p.set_defaults(func=run_worker)


def worker_backend(attrs: dict, name: str | None, config_text: str | None, parallel: int):
    """The backend this worker's trials run through: the sweep's (``attrs``, the study's
    :data:`~fowlflow.tune.study.SWEEP_ATTR`) unless ``--backend``/``--backend_config`` say
    otherwise; checked as the sweep checks it (:func:`fowlflow.tune.backends.parse_backend`).

    Raises:
        ConfigError: the sweep's ssh hosts or ec2 cluster (the sweep's trials use them), or a
            config the backend refuses.
    """
    from fowlflow.tune.backends import parse_backend

    swept = attrs.get("backend", "local")
    name = swept if name is None else name
    if config_text is None:
        config = attrs.get("backend_config", {}) if name == swept else {}
        if name == swept and (name == "ssh" or config.get("cluster_name")):
            what = "hosts" if name == "ssh" else f"ec2 cluster_name {config['cluster_name']!r}"
            raise ConfigError(f"The sweep runs its trials through -P backend={name} on its "
                              f"{what}; give this worker its own with --backend_config (e.g. "
                              f"a .json file with other hosts, or another cluster_name).")
        config_text = json.dumps(config) if config else "none"
    return parse_backend(name, config_text, parallel)


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
    parallel = min(args.parallel, attrs["n_trials"])
    backend = worker_backend(attrs, args.backend, args.backend_config, parallel)
    for note in backend.notes:
        print(f"fowlflow: note: {note}", flush=True)
    resolve_data(config.data, allow_shards=True)  # once here, not in every trial
    where = f"; trials through {backend.name}" if backend.remote else ""
    print(f"fowlflow: worker on study {study.study_name} in {masked(storage.url)}; parent run "
          f"{attrs['parent_run_id']}{where}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fowlflow-tune-worker-") as work:
        Sweep(study, space, config, storage.url, pruner, attrs["parent_run_id"], client,
              Path(work), metric=attrs.get("metric", "best_val_acc"), backend=backend
              ).run(attrs["n_trials"], parallel)
    print(f"fowlflow: worker done: study {study.study_name} has {finished_trials(study)} "
          f"finished trials (n_trials={attrs['n_trials']})", flush=True)
    return 0

