"""Shared ``__main__`` plumbing of the registry entry points (register, promote, predict, evaluate).

    if __name__ == "__main__":
        run_main(main)     # logging set up; a FowlflowError → its message on stderr, exit 2
    given(args.val_dir)    # "" and "none" → None
    log_params(vars(args)) # to the active run, leaving `mlflow run`'s own values alone
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

from fowlflow.errors import FowlflowError


def run_main(main: Callable[[list[str] | None], int]) -> None:
    """Run an entry point's ``main`` and exit with its status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = int(main(None) or 0)
    except FowlflowError as exc:
        print(f"fowlflow: error: {exc.message}", file=sys.stderr)
        code = 2
    sys.exit(code)


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
