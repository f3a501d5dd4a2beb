"""The one exception family of fowlflow.

Every error a user can cause subclasses :class:`FowlflowError`, which is an MLflow
``ExecutionException`` so that ``mlflow run`` shows its message instead of a traceback
soup. Each message names what failed, the offending value and the fix::

    raise DataError(f"{path} has no 'train/' folder; expected an ImageFolder with "
                    "train/<class>/*.jpg and val/<class>/*.jpg")
"""

from mlflow.exceptions import ExecutionException


class FowlflowError(ExecutionException):
    """Base class of every error fowlflow raises on purpose."""


class ConfigError(FowlflowError):
    """A parameter or backend config value is invalid."""


class DataError(FowlflowError):
    """The data source can't be fetched, unpacked or read as an ImageFolder."""


class ModelError(FowlflowError):
    """A model can't be built or its weights can't be loaded."""


class RegistryError(FowlflowError):
    """Registering, exporting, parity-checking or promoting a model failed."""


class RemoteError(FowlflowError):
    """A command on a remote host or a launched process failed; carries the stderr tail."""


class ServerError(FowlflowError):
    """The team tracking server stack could not start, stop or be reached."""


def exit_code(main, *args) -> int:
    """Call ``main(*args)`` the way every fowlflow command line does: its return value is the
    exit code (``None`` is 0); a :class:`FowlflowError` prints ``fowlflow: error: <message>``
    on stderr and gives 2; Ctrl-C gives 130. One rule for ``fowlflow``, ``python -m`` entry
    points and the MLproject's commands::

        if __name__ == "__main__":
            sys.exit(exit_code(main))
    """
    import sys

    try:
        return int(main(*args) or 0)
    except FowlflowError as exc:
        print(f"fowlflow: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fowlflow: interrupted", file=sys.stderr)
        return 130
