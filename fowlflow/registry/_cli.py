"""What the registry entry points (register, promote, predict, evaluate) share besides
:func:`fowlflow.errors.exit_code`, which runs each ``main``:

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    given(args.val_dir)    # "" and "none" → None
    log_params(vars(args)) # to the active run, leaving `mlflow run`'s own values alone
"""

from __future__ import annotations

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def given(value: str | None) -> str | None:
    """An optional entry-point value: ``""`` and ``none`` (MLproject's default) mean not given."""
    text = (value or "").strip()
    return None if text.lower() in ("", "none") else text


def log_params(params: dict) -> None:
    """Log an entry point's params to the active run by fowlflow's one rule (see
    :func:`fowlflow.tracking.run_tracker.log_new_params`): ``mlflow run``'s own values stay."""
    import mlflow

    from fowlflow.tracking.run_tracker import log_new_params

    log_new_params(mlflow.active_run().info.run_id, params)
