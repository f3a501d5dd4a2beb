"""Early termination: ``-P pruner=bandit|median|hyperband|none``.

    pruner = make_pruner(PrunerSpec("bandit", slack_factor=0.15, evaluation_interval=1,
                                    delay_evaluation=10))

Each trial reports ``best_val_acc`` after every epoch (its step); the pruner decides whether it
goes on. ``bandit`` is the sample's HyperDrive ``BanditPolicy``; ``median`` and ``hyperband``
are Optuna's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import TrialState

from fowlflow.errors import ConfigError

PRUNERS = ("bandit", "median", "hyperband", "none")


@dataclass(frozen=True)
class PrunerSpec:
    """The ``pruner`` parameter and its options (what a trial process rebuilds it from)."""

    name: str = "bandit"
    slack_factor: float = 0.15
    evaluation_interval: int = 1
    delay_evaluation: int = 10

    def as_dict(self) -> dict:
        return asdict(self)


class BanditPruner(BasePruner):
    """HyperDrive's ``BanditPolicy``: at each evaluation point (every ``evaluation_interval``
    steps from step ``delay_evaluation`` on, and from step 1 when it is 0), a trial whose value
    is worse than the best value any other trial reported at that step by more than the slack
    is stopped: below ``best / (1 + slack_factor)`` when maximizing, above
    ``best * (1 + slack_factor)`` when minimizing."""

    def __init__(self, slack_factor: float = 0.15, evaluation_interval: int = 1,
                 delay_evaluation: int = 10):
        self.slack_factor = slack_factor
        self.evaluation_interval = evaluation_interval
        self.delay_evaluation = delay_evaluation

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < max(self.delay_evaluation, 1) \
                or step % self.evaluation_interval:
            return False
        value = trial.intermediate_values[step]
        others = [t.intermediate_values[step] for t in study.get_trials(
                      deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                              TrialState.RUNNING))
                  if t.number != trial.number and step in t.intermediate_values]
        if not others:
            return False
        if study.direction == StudyDirection.MAXIMIZE:
            return value < max(others) / (1 + self.slack_factor)
        return value > min(others) * (1 + self.slack_factor)


def make_pruner(spec: PrunerSpec) -> BasePruner:
    """The Optuna pruner ``spec`` names.

    Raises:
        ConfigError: an unknown pruner name or an option out of range.
    """
    if spec.name not in PRUNERS:
        raise ConfigError(f"-P pruner={spec.name} is unknown; use one of {', '.join(PRUNERS)}.")
    if spec.slack_factor <= 0:
        raise ConfigError(f"-P slack_factor={spec.slack_factor} must be greater than 0.")
    if spec.evaluation_interval < 1:
        raise ConfigError(f"-P evaluation_interval={spec.evaluation_interval} must be at least 1.")
    if spec.delay_evaluation < 0:
        raise ConfigError(f"-P delay_evaluation={spec.delay_evaluation} must be 0 or more.")
    if spec.name == "bandit":
        return BanditPruner(spec.slack_factor, spec.evaluation_interval, spec.delay_evaluation)
    if spec.name == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=spec.delay_evaluation,
                                           interval_steps=spec.evaluation_interval)
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(spec.delay_evaluation, 1))
    return optuna.pruners.NopPruner()
