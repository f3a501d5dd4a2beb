"""Two runs of one experiment log the same dataset at the same moment (a sweep's parallel
trials; two users on one data set), on a real SQLite and a real PostgreSQL store.

MLflow's SQL store looks the dataset up, then inserts it when missing. Seen in a CI-like run:
trial 0's trainer died with ``BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed:
datasets.experiment_id, datasets.name, datasets.digest`` because trial 1 had inserted the
dataset between its lookup and its insert. These tests replay that interleaving every time:
at the tracker's flush of the new dataset row (after the lookup), another run's log of the same
dataset is committed first. The tracker must then link the dataset instead of failing.
"""

from __future__ import annotations

import os

import pytest
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.store.tracking.dbmodels.models import SqlDataset
from sqlalchemy import event
from sqlalchemy.orm import Session

from fowlflow.data.sources import resolve_data
from fowlflow.tracking import RunTracker
from fowlflow.tracking.run_tracker import _dataset_source
from tests.net import stack_parts


@pytest.fixture(scope="module")
def postgres_uri():
    """An MLflow store database on a real PostgreSQL (the team stack's)."""
    with stack_parts("ffrace-pg-", "postgres") as stack:
        pg = stack.postgres
        with pg.connect("postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE race")
        os.environ["PGPASSFILE"] = str(pg.pgpass)
        try:
            yield f"postgresql://mlflow@{pg.cfg.host}:{pg.port}/race"
        finally:
            os.environ.pop("PGPASSFILE", None)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_uri(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlflow.db'}"
    return request.getfixturevalue("postgres_uri")


def _other_run_commits_first(client: MlflowClient, other_run_id: str, dataset):
    """From now on, at the first flush that inserts a dataset row, log ``dataset`` to
    ``other_run_id`` and commit it (another connection), as the faster run did. Returns what
    happened (a list) and the function that removes the hook."""
    happened: list[str] = []

    def before_flush(session, _context, _instances):
        if happened or not any(isinstance(o, SqlDataset) for o in session.new):
            return
        happened.append("the other run inserted the dataset first")
        client.log_inputs(other_run_id, [DatasetInput(
            dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "training")])])

    event.listen(Session, "before_flush", before_flush)
    return happened, lambda: event.remove(Session, "before_flush", before_flush)


def test_a_dataset_logged_by_another_run_in_between_is_linked(store_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    client = MlflowClient(store_uri)
    experiment_id = client.create_experiment(f"race-{os.getpid()}-{id(monkeypatch)}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    other = client.create_run(experiment_id, run_name="the-faster-trial")
    source = resolve_data("synthetic")
    dataset = MetaDataset(source=_dataset_source(source), name=f"{source.name}/train",
                          digest="3f36197e31766452")
    happened, remove = _other_run_commits_first(client, other.info.run_id, dataset)
    tracker = RunTracker()
    run_id = tracker.start(run_name="the-slower-trial")
    try:
        tracker.log_dataset(source, "train", "3f36197e31766452", "training")
    finally:
        remove()
        tracker.finish("FINISHED")
    assert happened == ["the other run inserted the dataset first"]  # the race was replayed
    for rid in (run_id, other.info.run_id):
        (linked,) = client.get_run(rid).inputs.dataset_inputs
        assert (linked.dataset.name, linked.dataset.digest) == ("synthetic/train",
                                                                "3f36197e31766452")
    assert client.get_run(run_id).info.status == "FINISHED"


def test_the_race_is_told_from_other_refusals_as_the_server_reports_them():
    """Through ``mlflow server`` the store's refusal arrives as a RestException (the message
    of the CI failure); a missing run or a foreign key failure is not a lost race."""
    from mlflow.exceptions import RestException

    from fowlflow.tracking.run_tracker import lost_insert_race

    def rest(message: str) -> RestException:
        return RestException({"error_code": "BAD_REQUEST", "message": message})

    assert lost_insert_race(rest(
        "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
        "datasets.name, datasets.digest"))
    assert lost_insert_race(rest('(psycopg.errors.UniqueViolation) duplicate key value violates '
                                 'unique constraint "dataset_pk"'))
    assert not lost_insert_race(rest("(sqlite3.IntegrityError) FOREIGN KEY constraint failed"))
    assert not lost_insert_race(rest("Run with id=abc not found"))
