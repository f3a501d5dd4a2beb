"""``fowlflow tune ...``: the tuning sub-commands of the ``fowlflow`` CLI.

    fowlflow tune worker --study NAME --storage postgresql://user@host/db   (fowlflow.tune.worker)
"""

from __future__ import annotations


def register(sub) -> None:
    from fowlflow.tune import worker

    tune = sub.add_parser("tune", help="hyperparameter tuning (docs/tune.md)",
                          description="Hyperparameter tuning; the sweep itself is "
                                      "`mlflow run . -e tune` (docs/tune.md).")
    worker.add_parser(tune.add_subparsers(dest="tune_command", required=True))
