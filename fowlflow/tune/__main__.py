"""``python -m fowlflow.tune``: the MLproject's ``tune`` entry point (``mlflow run . -e tune``).

    python -m fowlflow.tune --data synthetic --n_trials 8 --parallel 4 --num_epochs 3

Its flags: the trainer's (each passed to every trial; tuned ones are set per trial) and the
sweep's (:func:`build_parser`). Everything is checked before the first trial: the search space,
sampler and pruner, ``parallel`` <= ``n_trials``, the data and the study storage. The MLflow run
this process runs under (``mlflow run``'s, or a new one) is the sweep's parent run. Exit codes
as ``python -m fowlflow.train``: 0; 2 for a :class:`FowlflowError`; 128 + N when stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from fowlflow import stopping
from fowlflow.errors import ConfigError
from fowlflow.tune import DIRECTIONS, METRIC

DEFAULT_MODEL_NAME = "fowl-classifier"
TUNE_FLAGS = ("n_trials", "parallel", "search_space", "sampler", "pruner", "slack_factor",
              "evaluation_interval", "delay_evaluation", "storage", "study_name",
              "registered_model_name", "metric", "direction", "backend", "backend_config")


def main(argv: list[str] | None = None) -> int:
    return stopping.run_until_stopped(_main, argv, what="sweep stopped")


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags (defaults for every trial) plus the sweep's."""
    from fowlflow.trainer.config import build_parser as trainer_parser, optional
    from fowlflow.tune.pruners import PRUNERS, PrunerSpec
    from fowlflow.tune.study import SAMPLERS

    p = trainer_parser()
    p.prog = "python -m fowlflow.tune"
    p.description = ("Tune the trainer's hyperparameters with Optuna: one parent MLflow run, "
                     "one child run per trial (docs/tune.md).")
    d = PrunerSpec()
    p.add_argument("--n_trials", type=int, default=8,
                   help="the study's total of complete and pruned trials")
    p.add_argument("--parallel", type=int, default=4, help="trials running at once")
    p.add_argument("--search_space", default="none",
                   help="inline JSON or a .json file; none: the sample's learning_rate, momentum")
    p.add_argument("--sampler", default="random", choices=SAMPLERS)
    p.add_argument("--pruner", default=d.name, choices=PRUNERS)
    p.add_argument("--slack_factor", type=float, default=d.slack_factor, help="bandit")
    p.add_argument("--evaluation_interval", type=int, default=d.evaluation_interval,
                   help="bandit, median: evaluate every N epochs")
    p.add_argument("--delay_evaluation", type=int, default=d.delay_evaluation,
                   help="bandit, median: first evaluation at this epoch; hyperband: min epochs")
    p.add_argument("--storage", default="none", help="Optuna storage URL; none: ./optuna.db")
    p.add_argument("--study_name", default="", type=optional,
                   help="none: fowlflow-<hash of the space and the fixed settings>")
    p.add_argument("--metric", default=METRIC, help="the per-epoch metric trials optimize")
    p.add_argument("--direction", default="maximize", choices=DIRECTIONS)
    p.add_argument("--backend", default="none",
                   help="run each trial through this fowlflow backend: torchrun, ssh or ec2 "
                        "(none: a process on this machine)")
    p.add_argument("--backend_config", default="none",
                   help="the backend's config: inline JSON or a .json file (as mlflow run -c)")
    p.add_argument("--registered_model_name", default=DEFAULT_MODEL_NAME, type=optional,
                   help="register the best trial's model under this name (none: don't)")
    return p


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import mlflow

    from fowlflow.tracking.run_tracker import log_new_params
    from fowlflow.tune import space as spaces
    from fowlflow.tune.study import SWEEP_ATTR, masked
    from fowlflow.tune.summary import log_summary
    from fowlflow.tune.sweep import Sweep

    values = vars(build_parser().parse_args(argv))
    opts = argparse.Namespace(**{k: values.pop(k) for k in TUNE_FLAGS})
    plan = _prepare(opts, values)
    study, url = plan.study, plan.storage.url
    client = mlflow.MlflowClient()
    with mlflow.start_run() as parent, tempfile.TemporaryDirectory(prefix="fowlflow-tune-") as work:
        run_id = parent.info.run_id
        log_new_params(run_id, {"optuna_study": study.study_name, "optuna_storage": masked(url),
                                "data": plan.config.data})
        client.log_dict(run_id, spaces.as_json(plan.space), "tune/search_space.json")
        mlflow.set_tags({"fowlflow.kind": "tune", "fowlflow.study": study.study_name})
        study.set_user_attr(SWEEP_ATTR, {  # what `fowlflow tune worker` runs its trials with
            "space": spaces.as_json(plan.space), "config": asdict(plan.config),
            "pruner": plan.pruner.as_dict(), "sampler": opts.sampler, "n_trials": opts.n_trials,
            "metric": opts.metric, "direction": opts.direction,
            "parent_run_id": run_id, "tracking_uri": masked(mlflow.get_tracking_uri()),
            "backend": plan.backend.name, "backend_config": plan.backend.config})
        print(f"fowlflow: study {study.study_name} in {masked(url)}; parent run {run_id}",
              flush=True)
        sweep = Sweep(study, plan.space, plan.config, url, plan.pruner, run_id, client, Path(work),
                      metric=opts.metric, backend=plan.backend)
        try:
            sweep.run(opts.n_trials, opts.parallel)
            sweep.wait_for_others()
        except (KeyboardInterrupt, stopping.Terminated) as exc:
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}")
            mlflow.end_run("KILLED")
            raise
        log_summary(study, client, run_id, opts.metric)
        _register_best(study, opts.metric, opts.registered_model_name, plan.source)
    return 0


def _prepare(opts: argparse.Namespace, values: dict) -> argparse.Namespace:
    """Everything checked before the parent run starts: counts, search space, trainer settings,
    pruner, sampler, storage, data; then the study (opened or created)."""
    import optuna

    from fowlflow.data.sources import data_location, resolve_data
    from fowlflow.trainer.config import TrainConfig, checked
    from fowlflow.tune import space as spaces
    from fowlflow.tune.backends import parse_backend
    from fowlflow.tune.pruners import PrunerSpec, make_pruner
    from fowlflow.tune.study import (check_objective, default_study_name, make_sampler,
                                     open_storage, open_study)

    if opts.n_trials < 1:
        raise ConfigError(f"-P n_trials={opts.n_trials} is invalid: it must be at least 1.")
    if not 1 <= opts.parallel <= opts.n_trials:
        raise ConfigError(f"-P parallel={opts.parallel} is invalid: it must be between 1 and "
                          f"n_trials ({opts.n_trials}).")
    check_objective(opts.metric, opts.direction)
    space = spaces.parse_space(opts.search_space)
    config = checked(TrainConfig(**values))
    pruner = PrunerSpec(opts.pruner, opts.slack_factor, opts.evaluation_interval,
                        opts.delay_evaluation)
    sampler = make_sampler(opts.sampler, {d.name: d.grid() for d in space}
                           if opts.sampler == "grid" else None)
    backend = parse_backend(opts.backend, opts.backend_config, opts.parallel)
    for note in backend.notes:
        print(f"fowlflow: note: {note}", flush=True)
    storage = open_storage(opts.storage, heartbeat=True)
    config = replace(config, data=data_location(config.data))
    source = resolve_data(config.data, allow_shards=True)  # once, not in every trial at once
    study_name = opts.study_name or default_study_name(spaces.as_json(space), asdict(config))
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # fowlflow prints each trial's outcome
    study = open_study(storage, study_name, sampler, make_pruner(pruner), opts.metric,
                       opts.direction)
    return argparse.Namespace(space=space, config=config, pruner=pruner, storage=storage,
                              source=source, study=study, backend=backend)


def _register_best(study, metric: str, model_name: str | None, source) -> None:
    """Print the best trial; register its model under ``model_name`` (None: don't)."""
    import mlflow

    from fowlflow.tune.summary import best_trial

    best = best_trial(study)
    print(f"fowlflow: best trial {best.number}: {metric} {best.value:.4g} "
          f"{best.params}", flush=True)
    if model_name:
        from fowlflow.registry import register_trained_model

        with source.val_folder() as val:
            reg = register_trained_model(run_id=best.user_attrs["mlflow_run_id"],
                                         name=model_name, val_dir=val)
        mlflow.set_tags({"registered_model": f"{reg.name} version {reg.version}"})


if __name__ == "__main__":
    sys.exit(main())
