"""The Optuna side of a sweep: the storage, the sampler and the study.

    storage = open_storage("none")             # sqlite:///<folder mlflow run was typed in>/optuna.db
    study = open_study(storage, "my-sweep", make_sampler("random", space), make_pruner(spec))

The study lives in an Optuna RDB storage, so a trial process (and a sweep resumed later)
opens the same study by name. Passwords in a storage URL never reach a log, a param or a tag:
:func:`masked` is what is shown.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import optuna

from fowlflow.errors import ConfigError

SAMPLERS = ("random", "tpe", "grid")
DEFAULT_DB = "optuna.db"
# Trials whose sweep died stop counting as running once their heartbeat is this old.
HEARTBEAT_S, GRACE_S = 10, 60
# The study's user attribute holding what a worker needs to run its trials (set by the sweep):
# space, config, pruner, sampler, n_trials, parent_run_id, tracking_uri (masked).
SWEEP_ATTR = "fowlflow_sweep"


def default_storage() -> str:
    """``sqlite:///<folder>/optuna.db``, the folder being where ``mlflow run`` was typed (as
    for ``mlflow.db``, the embedded tracking store), else this process's folder."""
    from fowlflow.local_paths import caller_dir

    return f"sqlite:///{(caller_dir() or Path.cwd()).resolve() / DEFAULT_DB}"


def masked(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def open_storage(url: str, *, heartbeat: bool = False) -> optuna.storages.RDBStorage:
    """The RDB storage at ``url`` (``none``/``""``: :func:`default_storage`), reached now.

    Raises:
        ConfigError: a URL Optuna can't use, or a database that can't be reached.
    """
    url = url.strip() if url and url.strip().lower() != "none" else default_storage()
    url = driver_url(url)
    kwargs = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}  # trial processes write at the same time
        path = url.split(":///", 1)[-1]
        if path and not Path(path).parent.is_dir():
            raise ConfigError(f"-P storage={url}: the folder {Path(path).parent} does not exist; "
                              "create it or choose another file.")
    extra = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S} if heartbeat else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **extra)
    except Exception as exc:  # SQLAlchemy's URL, driver and connection errors alike
        message = str(exc).replace(url, masked(url)).splitlines()[0]
        password = re.search(r"//[^/@:]*:([^/@]*)@", url)
        if password and password.group(1):
            message = message.replace(password.group(1), "***")
        raise ConfigError(f"-P storage={masked(url)} can't be used as the Optuna study storage: "
                          f"{type(exc).__name__}: {message}. Give a reachable database URL "
                          "(sqlite:///path/optuna.db, postgresql://user@host/db with the "
                          "password in PGPASSWORD) or none for the default.") from None
    if url.startswith("sqlite"):
        _lock_on_begin(storage.engine)
    return storage


def _lock_on_begin(engine) -> None:
    """Make each SQLite transaction take the write lock when it begins (``BEGIN IMMEDIATE``).

    Optuna pops a waiting (enqueued) trial by reading it, then writing RUNNING under ``SELECT
    ... FOR UPDATE``, which SQLite ignores: two threads of a ``-P parallel`` sweep (or two
    processes) could both pop the same trial and run it twice, leaving another waiting. With
    the lock taken at ``BEGIN`` the read and the write are one step (SQLAlchemy's pysqlite
    recipe); the 60 s ``timeout`` above is how long a transaction waits for it.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # pysqlite's own BEGIN is off; ours is below

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners are closed


def driver_url(url: str) -> str:
    """``postgresql://...`` (libpq's form, what users write) as SQLAlchemy's
    ``postgresql+psycopg://...``: fowlflow installs psycopg 3, not SQLAlchemy's default psycopg2."""
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)


def has_password(url: str) -> bool:
    """Whether ``url`` holds a password (``scheme://user:password@host``)."""
    return bool(re.search(r"//[^/@:]*:[^/@]+@", url))


def load_study(storage, name: str) -> optuna.Study:
    """The existing study ``name`` in ``storage``, made by ``fowlflow tune`` (its settings in
    the user attribute :data:`SWEEP_ATTR`).

    Raises:
        ConfigError: no such study (the message lists the storage's studies), or a study that
            no ``fowlflow tune`` sweep made.
    """
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in storage.get_all_studies())
        raise ConfigError(f"There is no study {name!r} in {masked(storage.url)}; its studies: "
                          f"{', '.join(names) or 'none'}. Start the sweep first "
                          "(mlflow run . -e tune -P storage=... -P study_name=...).") from None
    if SWEEP_ATTR not in study.user_attrs:
        raise ConfigError(f"Study {name!r} in {masked(storage.url)} was not made by "
                          "`mlflow run . -e tune` (it has no fowlflow settings to run trials "
                          "with).")
    return study


def make_sampler(name: str, grid: dict[str, list] | None = None) -> optuna.samplers.BaseSampler:
    """Optuna's sampler ``name``; ``grid`` (a list of values per parameter) for ``grid``.

    Raises:
        ConfigError: an unknown sampler name.
    """
    if name == "random":
        return optuna.samplers.RandomSampler()
    if name == "tpe":
        return optuna.samplers.TPESampler()
    if name == "grid":
        return optuna.samplers.GridSampler(grid or {})
    raise ConfigError(f"-P sampler={name} is unknown; use one of {', '.join(SAMPLERS)}.")


def default_study_name(space: dict, config: dict) -> str:
    """``fowlflow-<hash>`` of the search space and the fixed trainer settings: the same sweep
    typed again resumes its study; a different one starts its own."""
    fixed = {k: v for k, v in config.items() if k not in space and k != "output_dir"}
    blob = json.dumps({"space": space, "config": fixed}, sort_keys=True, default=str)
    return "fowlflow-" + hashlib.sha1(blob.encode()).hexdigest()[:10]


def check_objective(metric: str, direction: str) -> None:
    """Refuse a metric the trainer does not log each epoch, or an unknown direction.

    Raises:
        ConfigError: naming the metrics it logs, or the directions.
    """
    from fowlflow.tune import DIRECTIONS, EPOCH_METRICS

    if metric not in EPOCH_METRICS:
        raise ConfigError(f"-P metric={metric}: the trainer does not log that metric each epoch; "
                          f"choose one it logs: {', '.join(EPOCH_METRICS)}.")
    if direction not in DIRECTIONS:
        raise ConfigError(f"-P direction={direction} is unknown; use {' or '.join(DIRECTIONS)}.")


def open_study(storage, name: str, sampler=None, pruner=None, metric: str = "best_val_acc",
               direction: str = "maximize") -> optuna.Study:
    """The study ``name`` in ``storage`` (created if new), optimizing ``metric`` in ``direction``.

    Raises:
        ConfigError: an existing study that optimizes another metric or direction.
    """
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                direction=direction, load_if_exists=True)
    attrs = study.user_attrs.get(SWEEP_ATTR)  # none yet: a new study (or an older sweep's)
    had_metric = (attrs or {}).get("metric", "best_val_acc" if attrs or study.trials else metric)
    had = (had_metric, study.direction.name.lower())
    if had != (metric, direction):
        raise ConfigError(f"Study {name} optimizes {had[0]} ({had[1]}), not {metric} "
                          f"({direction}); give those, or another -P study_name.")
    return study
