"""The search space: which trainer parameters a sweep tunes, and over what.

    space = parse_space('{"learning_rate": {"type": "float", "low": 1e-4, "high": 0.1, "log": true}}')
    values = suggest(space, optuna_trial)        # {"learning_rate": 0.0031}

A space is a JSON object (inline, or a ``.json`` file) mapping a trainer parameter name (a
flag of ``python -m fowlflow.train``) to one of::

    {"type": "float", "low": 0.0005, "high": 0.005}          # uniform; "log": true, "step": 0.001
    {"type": "int", "low": 8, "high": 32, "step": 8}         # "log": true
    {"type": "categorical", "choices": ["resnet18", "efficientnet_lite0"]}

The trainer's own parser and range checks (:mod:`fowlflow.trainer.config`) judge every bound and
choice, so the trainer's flags stay the one list of parameters.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fowlflow.errors import ConfigError
from fowlflow.trainer.config import TrainConfig, build_parser, checked

# The sample's HyperDrive space.
DEFAULT_SPACE = {
    "learning_rate": {"type": "float", "low": 0.0005, "high": 0.005},
    "momentum": {"type": "float", "low": 0.9, "high": 0.99},
}
# Trainer parameters a sweep sets itself, per trial or for all of them.
NOT_TUNABLE = {
    "data": "every trial trains on the same data (-P data=...)",
    "output_dir": "each trial gets its own folder under -P output_dir",
    "resume": "trials start fresh",
}
KINDS = ("float", "int", "categorical")


@dataclass(frozen=True)
class Dimension:
    """One tuned parameter."""

    name: str
    kind: str  # float, int or categorical
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple = ()

    def grid(self) -> list:
        """Every value this dimension takes on a grid (the ``grid`` sampler's list).

        Raises:
            ConfigError: a float without a ``step``.
        """
        if self.kind == "categorical":
            return list(self.choices)
        if self.step is None and self.kind == "float":
            raise ConfigError(f"The grid sampler needs a finite list for {self.name}: give it a "
                              '"step" or make it {"type": "categorical", "choices": [...]}.')
        step = self.step or 1
        n = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        return [self.low + i * step if self.kind == "float" else int(self.low + i * step)
                for i in range(n)]


def parse_space(text: str) -> list[Dimension]:
    """The search space from inline JSON, a JSON file, or ``none``/``""`` (the sample's space).

    Raises:
        ConfigError: not JSON, a file that doesn't exist, an unknown or untunable parameter, a
            malformed entry, or a bound or choice the trainer refuses.
    """
    text = (text or "").strip()
    if text.lower() in ("", "none"):
        raw: Any = DEFAULT_SPACE
    else:
        raw, _ = read_json_option(
            text, "-P search_space", "Search space file",
            '{"learning_rate": {"type": "float", "low": 0.0005, "high": 0.005}}')
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("The search space must be a non-empty JSON object of "
                          '"<trainer parameter>": {"type": ..., ...}.')
    return [_dimension(name, spec) for name, spec in raw.items()]


def read_json_option(text: str, option: str, what: str, example: str) -> tuple[Any, str]:
    """An option's JSON, given inline (it starts with ``{``) or as a file found by
    :func:`fowlflow.local_paths.find_local`; returns ``(value, source)`` (the option or the
    file's path, for messages).

    Raises:
        ConfigError: a file that doesn't exist, or text that is not JSON.
    """
    source = option
    if not text.startswith("{"):
        from fowlflow.local_paths import find_local

        path = find_local(text, what, ConfigError,
                          f"give a JSON file or inline JSON such as {example}.")
        text, source = Path(path).read_text(), str(path)
    try:
        return json.loads(text), source
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source} is not valid JSON ({exc}); expected an object such as "
                          f"{example}.") from None


def _dimension(name: str, spec: Any) -> Dimension:
    actions = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    if name in NOT_TUNABLE:
        raise ConfigError(f"Search space: {name} can't be tuned: {NOT_TUNABLE[name]}.")
    if name not in actions:
        raise ConfigError(f"Search space: unknown parameter {name!r}; tunable trainer "
                          f"parameters: {', '.join(sorted(set(actions) - set(NOT_TUNABLE)))}.")
    where = f"Search space {name}"
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise ConfigError(f"{where}: expected {{\"type\": one of {', '.join(KINDS)}, ...}}, "
                          f"got {json.dumps(spec)}.")
    kind = spec["type"]
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
    extra = set(spec) - allowed
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {sorted(extra)} for type {kind}; allowed: "
                          f"{sorted(allowed)}.")
    action = actions[name]
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f'{where}: "choices" must be a non-empty list.')
        values = tuple(_trainer_value(action, c, where) for c in choices)
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}: the choices {choices} repeat a value.")
        return Dimension(name, kind, choices=values)
    want = float if kind == "float" else int
    if action.type is not want:
        raise ConfigError(f"{where}: {name} is not a{'n' if want is int else ''} {kind} "
                          f"parameter; use {{\"type\": \"categorical\", \"choices\": [...]}}.")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f'{where}: type {kind} needs "low" and "high".')
    low, high = (_number(spec[k], want, f"{where} {k}") for k in ("low", "high"))
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be less than high ({high}).")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f'{where}: "log" must be true or false.')
    step = spec.get("step")
    if step is not None:
        step = _number(step, want, f"{where} step")
        if step <= 0 or log:
            raise ConfigError(f'{where}: "step" must be greater than 0 and can\'t go with "log".')
    if log and low <= 0:
        raise ConfigError(f'{where}: a "log" range needs low > 0 (got {low}).')
    for value in (low, high):
        _trainer_value(action, value, where)
    return Dimension(name, kind, low, high, log, step)


def _number(value: Any, want: type, where: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (want is int and not float(value).is_integer()):
        raise ConfigError(f"{where}: expected a{'n integer' if want is int else ' number'}, "
                          f"got {json.dumps(value)}.")
    return want(value)


def _trainer_value(action: argparse.Action, value: Any, where: str):
    """``value`` as the trainer's flag parses it, once the trainer's range checks accept it."""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        parsed = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {value!r} is not a valid --{action.dest} ({exc}).") from None
    if action.choices and parsed not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not one of --{action.dest}'s choices "
                          f"{list(action.choices)}.")
    try:
        checked(replace(TrainConfig(), **{action.dest: parsed}))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {value!r} is refused by the trainer: {exc.message}") from None
    return parsed


def suggest(space: list[Dimension], trial) -> dict[str, Any]:
    """One value per dimension, from Optuna's ``trial`` (its sampler decides)."""
    values = {}
    for d in space:
        if d.kind == "categorical":
            values[d.name] = trial.suggest_categorical(d.name, list(d.choices))
        elif d.kind == "float":
            values[d.name] = trial.suggest_float(d.name, d.low, d.high, log=d.log, step=d.step)
        else:
            values[d.name] = trial.suggest_int(d.name, d.low, d.high, log=d.log, step=d.step or 1)
    return values


def as_json(space: list[Dimension]) -> dict[str, dict]:
    """The space as the JSON format above (what the parent run logs)."""
    out = {}
    for d in space:
        if d.kind == "categorical":
            out[d.name] = {"type": d.kind, "choices": list(d.choices)}
        else:
            out[d.name] = {"type": d.kind, "low": d.low, "high": d.high, "log": d.log}
            if d.step is not None:
                out[d.name]["step"] = d.step
    return out
