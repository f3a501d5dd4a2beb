"""The small ``fowlflow`` CLI: what MLflow's own CLI can't do.

    fowlflow server start|stop|status      the team tracking stack (PostgreSQL + S3 + mlflow)
    fowlflow logs|attach|status|cancel ID  a run launched by a fowlflow backend
    fowlflow ec2 ls|down NAME|gc           the clusters the ec2 backend launched
    fowlflow tune worker --study NAME      another machine joins a sweep's Optuna study
    fowlflow data pack SRC DEST            an ImageFolder as WebDataset shards (docs/data.md)

Each area adds its sub-commands through a ``register(subparsers)`` function in its own module,
so this file stays a dispatcher. Sub-command handlers return an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fowlflow.errors import exit_code

# Modules that provide ``register(subparsers)``; each sets ``func`` on its parsers.
COMMAND_MODULES = (
    "fowlflow.server.commands",
    "fowlflow.projects.commands",
    "fowlflow.projects.ec2_commands",
    "fowlflow.tune.commands",
    "fowlflow.data.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fowlflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Skipped: a command module (or its package) that is not there. Any other missing
            # module is a real import error inside an existing command module.
            if not (exc.name == name or name.startswith(f"{exc.name}.")):
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command; its return value is the exit code
    (:func:`fowlflow.errors.exit_code`: a FowlflowError prints ``fowlflow: error: ...`` and gives
    2, Ctrl-C gives 130)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return exit_code(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
