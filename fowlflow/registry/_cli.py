"""Shared ``__main__`` plumbing of the registry entry points (register, promote, predict, evaluate).

    if __name__ == "__main__":
        run_main(main)     # logging set up; a FowlflowError → its message on stderr, exit 2
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


def log_params(params: dict) -> None:
    """Log an entry point's params to the active run, unless `mlflow run` already has.

    `mlflow run` logs the MLproject parameters itself (as given), and MLflow refuses to log a
    param twice with another value (e.g. ``0.0`` vs ``0``), so only plain ``python -m`` calls
    log them here.
    """
    import os

    import mlflow

    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
