"""Hyperparameter tuning: ``mlflow run . -e tune``, the sample's HyperDrive sweep on Optuna.

    mlflow run . -e tune -P data=... -P n_trials=8 -P parallel=4

Modules: :mod:`.space` (the search space, checked against the trainer's flags), :mod:`.pruners`
(``bandit``, ``median``, ``hyperband``, ``none``), :mod:`.study` (samplers, the Optuna
storage, the study), :mod:`.sweep` (the parent process: one child MLflow run and one trial
process per trial), :mod:`.trial` (the trial process: the trainer with a reporting hook),
:mod:`.summary` (the parent run's summary and the best trial's registration). See docs/tune.md.
"""

METRIC = "best_val_acc"  # the sample's primary metric, maximized; logged by the trainer each epoch
