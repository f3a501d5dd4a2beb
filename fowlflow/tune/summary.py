"""What the sweep's parent run holds once the trials are done, and the best model's registration.

* params ``best_<name>`` (the best trial's values), metrics ``best_val_acc`` and
  ``trials_complete|pruned|failed``, tags ``best_trial_number`` and ``best_trial_run_id``;
* ``tune/trials.json`` and ``tune/trials.csv``: one row per trial of the study (number, state,
  value, epochs, params, run id), those of an earlier, interrupted sweep of the study too;
* figures (Optuna's matplotlib plots): ``tune/optimization_history.png``,
  ``tune/parallel_coordinate.png`` and, with 2 or more complete trials,
  ``tune/param_importances.png``.
"""

from __future__ import annotations

import csv
import io
import logging
import warnings

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from fowlflow.errors import RemoteError
from fowlflow.tracking.run_tracker import log_new_params
from fowlflow.tune import METRIC
from fowlflow.tune.sweep import RUN_ID_ATTR

log = logging.getLogger("fowlflow.tune")


def trial_rows(study: optuna.Study) -> list[dict]:
    """The trial table: one row per trial, in order."""
    return [{"number": t.number, "state": t.state.name, "value": t.value,
             "epochs": t.last_step, "params": t.params,
             "run_id": t.user_attrs.get(RUN_ID_ATTR)} for t in study.get_trials(deepcopy=False)]


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The best complete trial.

    Raises:
        RemoteError: no trial completed (the message shows the first failed trial's log end).
    """
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        trials = study.get_trials(deepcopy=False)
        failed = [t for t in trials if t.state == TrialState.FAIL]
        pruned = sum(t.state == TrialState.PRUNED for t in trials)
        detail = (f"; trial {failed[0].number}: {failed[0].user_attrs['error']}"
                  if failed and failed[0].user_attrs.get("error") else "")
        raise RemoteError(f"No trial of study {study.study_name} completed ({len(failed)} failed, "
                          f"{pruned} pruned); see each child run's log (its artifact trial.log, "
                          f"or fowlflow-logs/ for a trial run through a backend){detail}")
    return study.best_trial


def log_summary(study: optuna.Study, client: MlflowClient, parent_run_id: str,
                metric: str = METRIC) -> None:
    """Log the summary above to the parent run."""
    rows = trial_rows(study)
    counts = {state: sum(r["state"] == state for r in rows) for state in ("COMPLETE", "PRUNED", "FAIL")}
    client.log_dict(parent_run_id, rows, "tune/trials.json")
    client.log_text(parent_run_id, _csv(rows), "tune/trials.csv")
    metrics = {"trials_complete": counts["COMPLETE"], "trials_pruned": counts["PRUNED"],
               "trials_failed": counts["FAIL"]}
    best = best_trial(study) if counts["COMPLETE"] else None
    if best is not None:
        metrics[metric] = best.value
        log_new_params(parent_run_id, {f"best_{k}": v for k, v in best.params.items()})
        client.set_tag(parent_run_id, "best_trial_number", str(best.number))
        client.set_tag(parent_run_id, "best_trial_run_id", best.user_attrs.get(RUN_ID_ATTR, ""))
    for key, value in metrics.items():
        client.log_metric(parent_run_id, key, value)
    _log_figures(study, client, parent_run_id, counts["COMPLETE"])


def _csv(rows: list[dict]) -> str:
    names = sorted({k for r in rows for k in r["params"]})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["number", "state", "value", "epochs", *names, "run_id"])
    for r in rows:
        writer.writerow([r["number"], r["state"], r["value"], r["epochs"],
                         *(r["params"].get(n, "") for n in names), r["run_id"]])
    return out.getvalue()


def _log_figures(study: optuna.Study, client: MlflowClient, run_id: str, complete: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    wanted = [("optimization_history", plots.plot_optimization_history),
              ("parallel_coordinate", plots.plot_parallel_coordinate)]
    if complete >= 2 and len(study.best_trial.params) >= 1:
        wanted.append(("param_importances", plots.plot_param_importances))
    for name, plot in wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning
                axes = plot(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            client.log_figure(run_id, figure, f"tune/{name}.png")
            plt.close(figure)
        except Exception as exc:  # noqa: BLE001 (a figure is not worth failing the sweep)
            log.warning("The %s figure was not drawn: %s: %s", name, type(exc).__name__, exc)
