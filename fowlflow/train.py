"""``python -m fowlflow.train --data ... --num_epochs ...``: the MLproject's ``main`` entry point.

    python -m fowlflow.train --data ../hymenoptera_data --num_epochs 5
    python -m fowlflow.train --data synthetic --registered_model_name none   # train only

It composes the two halves: the trainer (:mod:`fowlflow.trainer`) trains and logs the model;
then, on global rank 0 and when ``--registered_model_name`` is given (the MLproject's default
is ``fowl-classifier``), the registry (:mod:`fowlflow.registry`) registers it, exports ONNX and
checks parity, under the same MLflow run. A failed registration fails that run.

The stop handling (:mod:`fowlflow.stopping`) is installed first, before the slow imports:
``mlflow run`` may be stopped at any moment. Exit codes: 0; 2 for a :class:`FowlflowError`
(its message on stderr); 128 + N when stopped by signal N; 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import sys
import threading
from typing import NoReturn

from fowlflow import stopping

DEFAULT_MODEL_NAME = "fowl-classifier"


def main(argv: list[str] | None = None) -> int:
    return stopping.run_until_stopped(_main, argv)


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags plus ``--registered_model_name``: one per MLproject ``main`` parameter."""
    from fowlflow.trainer.config import build_parser as trainer_parser, optional

    p = trainer_parser()
    p.add_argument("--registered_model_name", default=DEFAULT_MODEL_NAME, type=optional,
                   help="register the trained model under this name (none: don't register)")
    return p


def parse_args(argv: list[str] | None = None):
    """``(TrainConfig, registered model name or "")`` from the command line.

    Raises:
        ConfigError: a trainer value is out of range.
    """
    from fowlflow.trainer.config import TrainConfig, checked

    values = vars(build_parser().parse_args(argv))
    name = values.pop("registered_model_name")
    return checked(TrainConfig(**values)), name


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fowlflow.trainer.train import run

    cfg, name = parse_args(argv)
    run(cfg, params={"registered_model_name": name},
        after=registration(name) if name else None)
    return 0


def registration(name: str):
    """What runs after training when a model name is given: the registry's registration of
    the run's model as ``name`` (and ``<name>-onnx``), on the training data's validation images."""
    def register(trained) -> None:
        from fowlflow.registry import register_trained_model

        with trained.data.val_folder() as val:  # a shard set's val split: written out
            register_trained_model(run_id=trained.run_id, name=name, val_dir=val)
    return register


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` without the interpreter's teardown.

    Everything the run needs is written by then (the MLflow run ended, its queue drained, the
    checkpoint replaced atomically). The teardown would garbage-collect every object torch,
    torch.export and MLflow left behind: 3-10 s on a 2-core CPU (issue 14). The atexit
    handlers (MLflow's temporary folders, logging) still run and other threads are joined
    first, as ``sys.exit`` would.
    """
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to keep
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
