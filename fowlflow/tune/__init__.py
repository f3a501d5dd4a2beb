"""Hyperparameter tuning: ``mlflow run . -e tune``, the sample's HyperDrive sweep on Optuna.

    mlflow run . -e tune -P data=... -P n_trials=8 -P parallel=4

Modules: :mod:`.space` (the search space, checked against the trainer's flags), :mod:`.pruners`
(``bandit``, ``median``, ``hyperband``, ``none``), :mod:`.study` (samplers, the Optuna
storage, the study), :mod:`.sweep` (the parent process: one child MLflow run and one trial
process per trial), :mod:`.trial` (the trial process: the trainer with a reporting hook),
:mod:`.backends` (trials through ``-P backend=torchrun|ssh|ec2``, watched from the sweep),
:mod:`.summary` (the parent run's summary and the best trial's registration). See docs/tune.md.
"""

METRIC = "best_val_acc"  # the sample's primary metric, maximized; logged by the trainer each epoch
DIRECTIONS = ("maximize", "minimize")
# What the trainer logs each epoch and passes its per-epoch hook: the metrics a sweep can optimize.
EPOCH_METRICS = ("best_val_acc", "val_acc", "val_loss", "train_acc", "train_loss", "lr", "momentum",
                 "train_images_per_sec", "epoch_seconds")
