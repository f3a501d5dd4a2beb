"""One rule for the relative local paths a user types: relative to where the command was typed.

    path = find_local("rel/imgs", "Data path", DataError)   # -> an absolute Path that exists

It applies to ``-P data=`` (the trainer), ``images=`` (predict), ``data_dir=`` (evaluate) and
``val_dir=`` (register). ``mlflow run /path/to/fowlflow`` runs the entry point in the project
folder, so the process's own folder is not the user's. The user's folder (:func:`caller_dir`)
is, in this order:

1. the working folder of the ``mlflow run`` process that started this one (directly or
   through a ``bash -c``), asked of the OS (:func:`fowlflow.stopping.find_mlflow_run`);
2. ``$FOWLFLOW_CALLER_DIR``, which the ``torchrun`` backend sets to the folder ``mlflow run -b
   torchrun`` was typed in: its processes run under a detached supervisor, with no ``mlflow
   run`` above them. The ssh backend does not set it, as that folder is on another machine:
   relative paths of an ssh run are relative to the project copy on the host;
3. none: the process's own folder is the user's (``python -m fowlflow.train`` by hand).

A relative path is looked up in the user's folder first; if it is only in the process's folder
(the project folder under ``mlflow run``), that one is used with a warning; if it is in
neither, the error names both absolute paths. Absolute and ``~/`` paths are used as they are.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import psutil

from fowlflow.errors import ConfigError, FowlflowError
from fowlflow.stopping import find_mlflow_run

log = logging.getLogger(__name__)

CALLER_DIR_ENV = "FOWLFLOW_CALLER_DIR"


def caller_dir() -> Path | None:
    """The folder the user typed the command in, when it is not this process's; else None."""
    launcher = find_mlflow_run()
    if launcher is not None:
        try:
            return Path(launcher.cwd())
        except psutil.Error:  # gone, or not ours to inspect
            pass
    value = os.environ.get(CALLER_DIR_ENV, "")
    return Path(value) if os.path.isabs(value) else None


def find_local(text: str, what: str, error: type[FowlflowError] = ConfigError,
               fix: str = "") -> Path:
    """Where the local path ``text`` points, as an absolute path, by the rule above.

    ``what`` names the value in messages (``"Data path"``); ``fix`` ends the error message.

    Raises:
        error: the path exists in none of the places; the message names each.
    """
    return local_path(text, Path.cwd(), caller_dir(), what, error, fix)


def local_path(text: str, here: Path, caller: Path | None, what: str = "Path",
               error: type[FowlflowError] = ConfigError, fix: str = "") -> Path:
    """:func:`find_local` with the two folders given: ``here`` (this process's) and ``caller``
    (the user's, None when it is ``here``)."""
    path = Path(text).expanduser()
    tail = f" {fix}" if fix else ""
    if path.is_absolute():
        if not path.exists():
            raise error(f"{what} {text!r} does not exist.{tail}")
        return path
    places = [caller, here] if caller is not None and caller != here else [here]
    for i, base in enumerate(places):
        found = Path(os.path.abspath(base / path))
        if found.exists():
            if i:
                log.warning("%s %r is not in %s (where the command was typed); using the "
                            "project folder's %s.", what, text, caller, found)
            return found
    looked = " nor ".join(f"{os.path.abspath(b / path)}" for b in places)
    where = (" (relative paths are relative to the folder you typed the command in, then to "
             "the project folder)") if len(places) > 1 else ""
    raise error(f"{what} {text!r} does not exist: not found as {looked}{where}. "
                f"Check the path, or give an absolute one.{tail}")
