"""The sweep's SQLite study storage under parallel trials (the default storage)."""

from __future__ import annotations

import threading
import time

import optuna

from fowlflow.tune.study import open_storage


def test_parallel_threads_pop_each_enqueued_trial_once(tmp_path):
    """Optuna pops a waiting trial with ``SELECT ... FOR UPDATE``, which SQLite ignores: two
    threads of ``study.optimize(n_jobs=2)`` could both take trial 1 and leave trial 2 waiting
    (seen in CI). :func:`open_storage` makes each SQLite transaction lock at ``BEGIN``."""
    for attempt in range(5):
        storage = open_storage(f"sqlite:///{tmp_path / f'study{attempt}.db'}")
        study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
        study.enqueue_trial({"x": 1.0})
        study.enqueue_trial({"x": 2.0})
        seen, lock = [], threading.Lock()

        def objective(trial):
            with lock:
                seen.append((trial.number, trial.suggest_float("x", 0, 3)))
            time.sleep(0.2)  # both threads hold a trial at once
            return 1.0

        study.optimize(objective, n_trials=2, n_jobs=2)
        assert sorted(seen) == [(0, 1.0), (1, 2.0)], f"attempt {attempt}: {seen}"
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]


def test_a_trial_ending_while_the_sweep_counts_is_counted_once(tmp_path):
    """The sweep stops asking for trials once finished + running reach ``n_trials``. Counted
    with two reads (running, then finished), a trial another thread completed between them was
    counted twice: an ec2 sweep of 3 trials whose first two ended 0.1 s apart stopped after 2
    (seen in CI). Here the other thread's ``tell`` lands just after the study's first read,
    every time; :func:`taken_trials` must count 2, not 3."""
    from fowlflow.tune.sweep import taken_trials

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    first, second = study.ask(), study.ask()
    study.tell(second, 1.0)  # this thread's trial ended; `first` still runs elsewhere
    read = study.get_trials
    reads = []

    def get_trials(*args, **kwargs):
        trials = read(*args, **kwargs)
        reads.append(len(trials))
        if len(reads) == 1:
            study.tell(first, 1.0)  # the other thread ends its trial now
        return trials

    study.get_trials = get_trials
    assert taken_trials(study) == 2, reads
    assert taken_trials(study, before=0) == 2  # both finished: counted whatever their number
