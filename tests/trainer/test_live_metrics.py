"""Step losses reach MLflow while an epoch runs (issue 14), read back at report points only."""

from __future__ import annotations

import math
import time

import mlflow
import torch
from mlflow import MlflowClient

from fowlflow.trainer import loop
from fowlflow.trainer.distributed import DistContext
from fowlflow.trainer.image_cache import ImageCache
from tests.conftest import TINY_PARAMS


def _tiny_epoch(report_seconds: float, epoch: int, on_steps=None) -> loop.EpochStats:
    """One epoch of a linear model on 10 random 16 px images, batch 2: 5 steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    cache = ImageCache(torch.randint(0, 255, (10, 3, 18, 18), dtype=torch.uint8),
                       torch.arange(10) % 2, torch.ones(10), [])
    setup = loop.LoopSetup(torch.device("cpu"), DistContext.from_env(), 2, 16, 2, 0, False,
                           progress=False, report_seconds=report_seconds)
    return loop.train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), cache, setup,
                            epoch, on_steps=on_steps)


def _epoch_reports(report_seconds: float, epoch: int) -> tuple[list, int]:
    """The on_steps calls of one tiny epoch, and its step count."""
    calls = []
    stats = _tiny_epoch(report_seconds, epoch, on_steps=lambda *call: calls.append(call))
    assert stats.images == 10
    return calls, 5


def test_every_step_is_reported_once_with_its_global_step():
    calls, steps = _epoch_reports(report_seconds=0.0, epoch=2)
    assert [first for first, _, _ in calls] == [steps + i for i in range(steps)]  # epoch 2
    assert all(len(losses) == 1 and math.isfinite(losses[0]) for _, losses, _ in calls)
    assert all(ips > 0 for _, _, ips in calls)


def test_reports_are_the_first_step_then_the_rest_at_the_end_when_the_interval_is_long():
    calls, steps = _epoch_reports(report_seconds=3600.0, epoch=1)
    assert [(first, len(losses)) for first, losses, _ in calls] == [(0, 1), (1, steps - 1)]


def test_a_step_metric_is_in_the_store_before_the_first_epoch_ends(tracking_uri, tmp_path,
                                                                  monkeypatch):
    """The run's third training step waits for the store to show a ``train_loss_step`` (the
    first step's, reported at once); before issue 14 they arrived when the epoch ended, and the
    wait below ran out."""
    from fowlflow.trainer.config import parse_args
    from fowlflow.trainer.train import run

    seen: dict[str, list] = {}
    batches = {"n": 0}
    real_train_batch = loop.train_batch

    def train_batch_that_polls_at_step_3(*args, **kwargs):
        batches["n"] += 1
        if batches["n"] == 3:
            run_id = mlflow.active_run().info.run_id
            client = MlflowClient(tracking_uri)
            deadline = time.monotonic() + 60
            while not seen.get("steps") and time.monotonic() < deadline:
                seen["steps"] = client.get_metric_history(run_id, "train_loss_step")
                time.sleep(0.2)
            seen["epoch_metrics"] = client.get_metric_history(run_id, "train_loss")
        return real_train_batch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_batch", train_batch_that_polls_at_step_3)
    monkeypatch.setenv("FOWLFLOW_CACHE_DIR", str(tmp_path / "cache"))
    args = {**TINY_PARAMS, "data": "synthetic", "output_dir": tmp_path / "out"}
    args.pop("registered_model_name")
    summary = run(parse_args([part for k, v in args.items() for part in (f"--{k}", str(v))]))
    assert batches["n"] > 3, "the epoch had fewer than 4 steps: the check saw nothing"
    assert seen["steps"], "no step loss in the store during epoch 1"
    assert {m.step for m in seen["steps"]} <= {0, 1}  # steps run before the third
    assert seen["epoch_metrics"] == []  # the epoch had indeed not ended
    history = MlflowClient(tracking_uri).get_metric_history(summary["run_id"], "train_loss_step")
    assert sorted(m.step for m in history) == list(range(batches["n"]))  # all, each once
    speeds = MlflowClient(tracking_uri).get_metric_history(summary["run_id"],
                                                           "train_images_per_sec_step")
    assert speeds and all(m.value > 0 for m in speeds)


def test_no_read_back_without_a_listener_or_progress_bar(monkeypatch):
    """Without a listener and a progress bar the losses are read once, at the epoch's end."""
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist",
                        lambda self: reads.append(tuple(self.shape)) or real_tolist(self))
    _tiny_epoch(report_seconds=0.0, epoch=1)
    assert reads == [(3,)]  # the epoch's totals only
