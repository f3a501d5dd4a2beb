"""``fowlflow ls``: the runs fowlflow's backends launched, from the tracking store alone.

A launched run carries the tags ``fowlflow.backend`` and ``fowlflow.hosts`` (see
:mod:`.ssh_launch`, :mod:`.torchrun`), so the list needs no host::

    fowlflow ls                                  # every experiment, newest first
    fowlflow ls --experiment birds --state RUNNING

    RUN_ID                            EXPERIMENT  BACKEND  HOSTS              STATE    AGE  ATTACH
    6a51c0...                         birds       ssh      gpu-a,gpu-b        RUNNING  12m  fowlflow attach 6a51c0...

STATE is the MLflow run status; ``fowlflow status RUN_ID`` asks the hosts.
"""

from __future__ import annotations

import json
import time

from fowlflow.errors import ConfigError

STATES = ("RUNNING", "FINISHED", "FAILED", "KILLED")
LAUNCHED = "tags.`fowlflow.backend` LIKE '%'"  # every run a fowlflow backend launched
COLUMNS = ("RUN_ID", "EXPERIMENT", "BACKEND", "HOSTS", "STATE", "AGE", "ATTACH")


def age(start_ms: int | None, now: float | None = None) -> str:
    """``42s``, ``12m``, ``3h``, ``5d`` since ``start_ms`` (MLflow's milliseconds)."""
    if not start_ms:
        return "-"
    seconds = max(0, int((now if now is not None else time.time()) - start_ms / 1000))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _hosts(tags: dict) -> str:
    try:
        return ",".join(json.loads(tags.get("fowlflow.hosts", "[]"))) or "-"
    except (ValueError, TypeError):
        return tags.get("fowlflow.hosts", "-")


def experiments(client, name: str | None) -> dict[str, str]:
    """``{id: name}`` of the experiment called ``name``, or of every active one.

    Raises:
        ConfigError: no experiment has that name.
    """
    if name is None:
        return {e.experiment_id: e.name for e in client.search_experiments()}
    found = client.get_experiment_by_name(name)
    if found is None:
        raise ConfigError(f"no experiment named {name!r} in the tracking store; "
                          "`mlflow experiments search` lists them")
    return {found.experiment_id: found.name}


def launched_runs(client, experiment: str | None = None, state: str | None = None,
                  limit: int = 50) -> list[dict]:
    """The launched runs (newest first), one dict per run with the :data:`COLUMNS`.

    Raises:
        ConfigError: no experiment named ``experiment``, or an unknown ``state``.
    """
    if state is not None and state not in STATES:
        raise ConfigError(f"--state must be one of {', '.join(STATES)}, got {state!r}")
    names = experiments(client, experiment)
    if not names:
        return []
    where = LAUNCHED + (f" and attributes.status = '{state}'" if state else "")
    runs = client.search_runs(list(names), where, order_by=["attributes.start_time DESC"],
                              max_results=limit)
    return [{"RUN_ID": r.info.run_id, "EXPERIMENT": names.get(r.info.experiment_id, "?"),
             "BACKEND": r.data.tags.get("fowlflow.backend", "-"), "HOSTS": _hosts(r.data.tags),
             "STATE": r.info.status, "AGE": age(r.info.start_time),
             "ATTACH": f"fowlflow attach {r.info.run_id}"} for r in runs]


def table(rows: list[dict]) -> str:
    """Aligned columns with a header line."""
    widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in COLUMNS}
    lines = ["  ".join(str(row[c]).ljust(widths[c]) for c in COLUMNS).rstrip()
             for row in [dict(zip(COLUMNS, COLUMNS)), *rows]]
    return "\n".join(lines)
