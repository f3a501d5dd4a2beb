"""Logging a model whose pip requirements are this environment's own installed versions.

    with installed_requirements():
        mlflow.pytorch.log_model(model, name="model",
                                 pip_requirements=mlflow.pytorch.get_default_pip_requirements())

When MLflow logs a model it checks each of its pip requirements against the installed packages
(``mlflow.utils.environment.warn_dependency_requirement_mismatches``), and to do that it first
maps every installed distribution to its modules (``importlib.metadata.packages_distributions``,
which reads the file list of every installed package: 0.6-0.9 s of a ResNet18 run's model
logging on a 2-core machine with ~170 packages). fowlflow's models list the installed versions
themselves (``torch==<installed version>``, ...), so the check can't find a mismatch. MLflow
3.17 has no switch for it, so it is skipped inside this block; a test checks that the skip
still takes effect with the pinned MLflow.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def installed_requirements() -> Iterator[None]:
    """Within the block, MLflow does not check model requirements against the installed
    packages (they are the installed packages' own versions)."""
    import mlflow.utils.environment as environment

    original = getattr(environment, "warn_dependency_requirement_mismatches", None)
    if original is None:  # another MLflow: its check, if any, runs as it likes
        yield
        return
    environment.warn_dependency_requirement_mismatches = lambda requirements: None
    try:
        yield
    finally:
        environment.warn_dependency_requirement_mismatches = original
