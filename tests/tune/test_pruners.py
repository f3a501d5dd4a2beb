"""The bandit pruner (HyperDrive's BanditPolicy semantics) and the pruner names."""

from __future__ import annotations

import optuna
import pytest

from fowlflow.errors import ConfigError
from fowlflow.tune.pruners import BanditPruner, PrunerSpec, make_pruner


def _study(pruner) -> optuna.Study:
    study = optuna.create_study(direction="maximize", pruner=pruner)
    study.add_trial(optuna.trial.create_trial(
        value=0.9, intermediate_values={1: 0.6, 2: 0.8, 3: 0.9},
        distributions={}, params={}))
    return study


def _pruned_at(study: optuna.Study, values: list[float]) -> int | None:
    trial = study.ask()
    for step, value in enumerate(values, start=1):
        trial.report(value, step)
        if trial.should_prune():
            return step
    return None


def test_a_trial_below_the_best_over_one_plus_slack_is_stopped_after_the_delay():
    # best at step 2: 0.8; 0.8 / 1.15 = 0.696: 0.69 is outside the slack, 0.70 inside
    assert _pruned_at(_study(BanditPruner(0.15, 1, 2)), [0.1, 0.69, 0.95]) == 2
    assert _pruned_at(_study(BanditPruner(0.15, 1, 2)), [0.1, 0.70, 0.80]) is None  # 0.8 >= 0.7826
    assert _pruned_at(_study(BanditPruner(0.15, 1, 2)), [0.1, 0.70, 0.78]) == 3  # 0.78 < 0.9 / 1.15 = 0.7826


def test_no_evaluation_before_the_delay_nor_between_intervals():
    assert _pruned_at(_study(BanditPruner(0.15, 1, 10)), [0.0, 0.0, 0.0]) is None
    assert _pruned_at(_study(BanditPruner(0.15, 2, 1)), [0.0, 0.8, 0.0]) is None  # step 2 only
    assert _pruned_at(_study(BanditPruner(0.15, 2, 1)), [0.0, 0.1, 0.0]) == 2


def test_the_first_trial_is_never_pruned():
    study = optuna.create_study(direction="maximize", pruner=BanditPruner(0.15, 1, 1))
    assert _pruned_at(study, [0.0, 0.0]) is None


@pytest.mark.parametrize("name, kind", [("bandit", BanditPruner),
                                        ("median", optuna.pruners.MedianPruner),
                                        ("hyperband", optuna.pruners.HyperbandPruner),
                                        ("none", optuna.pruners.NopPruner)])
def test_pruner_names(name, kind):
    assert isinstance(make_pruner(PrunerSpec(name)), kind)


def test_bad_pruner_options_are_refused():
    with pytest.raises(ConfigError, match="unknown"):
        make_pruner(PrunerSpec("asha"))
    with pytest.raises(ConfigError, match="evaluation_interval=0"):
        make_pruner(PrunerSpec("bandit", evaluation_interval=0))
