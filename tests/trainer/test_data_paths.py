"""The two data paths (issue 14): the decoded cache when this process's part of the set fits the
memory budget, else streaming; and one part of the set per DDP rank, on both paths.

Real photos (a subset of the shared hymenoptera set), real training runs into a SQLite store,
real gloo process groups (two processes started with torch.multiprocessing, and torchrun)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from fowlflow.errors import ConfigError, DataError
from tests.conftest import BIN, HYMENOPTERA, ROOT


def hymenoptera_subset(root, train: int = 12, val: int = 6):
    """The first ``train``/``val`` photos per class of the shared set, linked into ``root``."""
    for split, n in (("train", train), ("val", val)):
        for cls in ("ants", "bees"):
            (root / split / cls).mkdir(parents=True)
            for photo in sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[:n]:
                (root / split / cls / photo.name).symlink_to(photo)
    return root


def _args(data, out, **extra) -> list[str]:
    values = {"data": data, "weights": "none", "image_size": 32, "batch_size": 4, "workers": 0,
              "num_epochs": 1, "output_dir": out, **extra}
    return [part for k, v in values.items() for part in (f"--{k}", str(v))]


# ---------------------------------------------------------------------------------------------
# The choice


def test_the_choice_follows_the_budget_and_says_why():
    from fowlflow.trainer.data_path import agree, choose_data_path

    cpu = torch.device("cpu")
    # 1000 training images at resize 37 px (4107 B) + 500 validation at 32 px (3072 B).
    small = choose_data_path("auto", 1000, 500, 32, cpu, budget_gb=0.01, local_processes=1)
    assert small.path == "cache" and small.need_bytes == 1000 * 4107 + 500 * 3072
    assert small.reason.startswith("auto: this process's 1000 training + 500 validation images "
                                   "take 5.4 MiB decoded; the budget is 10.2 MiB "
                                   "(-P memory_budget_gb=0.01): it fits")
    big = choose_data_path("auto", 1000, 500, 32, cpu, budget_gb=0.001, local_processes=1)
    assert big.path == "stream" and "it does not fit, decoded every epoch" in big.reason
    auto = choose_data_path("auto", 10, 5, 32, cpu, budget_gb=0, local_processes=2)
    assert auto.path == "cache" and "host's" in auto.reason and "over 2 processes" in auto.reason
    forced = choose_data_path("stream", 10, 5, 32, cpu, budget_gb=0, local_processes=1)
    assert forced.path == "stream" and forced.reason.startswith("-P data_path=stream: ")
    # The ranks agree: one rank that streams makes every rank stream.
    assert agree([small, big], 0).path == "stream"
    assert "another rank's part does not fit" in agree([small, big], 0).reason
    assert agree([small, small], 1) == small
    # A forced cache that does not fit is refused, naming the fixes.
    too_big = choose_data_path("cache", 1000, 500, 32, cpu, budget_gb=0.001, local_processes=1)
    with pytest.raises(DataError, match="-P data_path=cache, but the cache does not fit .*"
                                        "-P memory_budget_gb"):
        agree([small, too_big], 0)


def test_bad_data_path_values_are_refused():
    from fowlflow.trainer.config import parse_args

    with pytest.raises(ConfigError, match="-P memory_budget_gb=-1.0 is invalid"):
        parse_args(["--memory_budget_gb", "-1"])
    with pytest.raises(SystemExit):
        parse_args(["--data_path", "disk"])
    assert parse_args(["--data_path", " Stream "]).data_path == "stream"


def test_the_sharded_rows_of_the_ranks_are_disjoint_and_complete():
    from fowlflow.trainer import sharding

    for n, world in ((245, 2), (153, 3), (8, 8)):
        parts = [sharding.train_rows(n, 42, r, world) for r in range(world)]
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        vals = [sharding.val_rows(n, r, world) for r in range(world)]
        assert sorted(torch.cat(vals).tolist()) == list(range(n))
    assert sharding.train_rows(10, 42, 0, 1).tolist() == list(range(10))
    assert not torch.equal(sharding.train_rows(100, 1, 0, 2), sharding.train_rows(100, 2, 0, 2))


# ---------------------------------------------------------------------------------------------
# A small budget streams, and trains as the cache does


def test_a_small_budget_streams_and_trains_as_the_cache_does(tracking_uri, tmp_path):
    """The same photos, once cached and once through the streaming path (a budget of ~1 KiB):
    same classes, digests and (the same pixels in the same order) the same weights and
    accuracy; each run says which path it took and why."""
    from fowlflow.trainer.config import parse_args
    from fowlflow.trainer.train import run

    data = hymenoptera_subset(tmp_path / "photos")
    cached = run(parse_args(_args(data, tmp_path / "a")))
    streamed = run(parse_args(_args(data, tmp_path / "b", memory_budget_gb=1e-6, workers=2)))
    client = MlflowClient(tracking_uri)
    a, b = (client.get_run(r["run_id"]).data for r in (cached, streamed))
    assert a.tags["data_path"] == "cache" and "it fits" in a.tags["data_path_reason"]
    assert b.tags["data_path"] == "stream"
    assert b.tags["data_path_reason"].startswith("auto: this process's 24 training + 12 "
                                                 "validation images take 0.1 MiB decoded; the "
                                                 "budget is 0.0 MiB (-P memory_budget_gb=1e-06)"
                                                 ": it does not fit, decoded every epoch")
    assert b.params["data_path"] == "auto" and b.params["memory_budget_gb"] == "1e-06"
    for key in ("data_digest", "train_images", "val_images", "num_classes"):
        assert a.params[key] == b.params[key], key
    assert a.tags["class_names"] == b.tags["class_names"] == "ants, bees"
    assert json.loads(b.tags["data_per_rank"]) == {"train": [24], "val": [12]}
    assert 0.0 <= b.metrics["val_acc"] <= 1.0
    assert abs(a.metrics["val_acc"] - b.metrics["val_acc"]) < 1e-6
    assert abs(a.metrics["train_loss"] - b.metrics["train_loss"]) < 1e-5
    wa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    for key, value in wa.items():
        assert torch.allclose(value.float(), wb[key].float(), atol=1e-6), key
    artifacts = {f.path for f in client.list_artifacts(streamed["run_id"])}
    assert {"confusion_matrix.png", "misclassified_val_images.png"} <= artifacts


def test_a_streamed_run_resumes_exactly(tmp_path):
    """Two streamed epochs straight == one, then a resume for the second (the order and the
    augmentation come from (seed, epoch) alone)."""
    from fowlflow.trainer.config import parse_args
    from fowlflow.trainer.train import run

    data = hymenoptera_subset(tmp_path / "photos", train=6, val=3)
    common = {"data_path": "stream", "step_size": 1, "gamma": 0.5}
    run(parse_args(_args(data, tmp_path / "a", num_epochs=2, **common)), tracking=False)
    run(parse_args(_args(data, tmp_path / "b", **common)), tracking=False)
    run(parse_args(_args(data, tmp_path / "b", num_epochs=2, resume=tmp_path / "b" /
                         "checkpoint.pt", **common)), tracking=False)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-6), key


# ---------------------------------------------------------------------------------------------
# One part per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_key(image: torch.Tensor) -> str:
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


def _rank_main(rank: int, world: int, port: int, data: str, data_path: str, out: str) -> None:
    """One gloo rank: load the data as the trainer does, then take two epochs' batches."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    from fowlflow.trainer.config import parse_args
    from fowlflow.trainer.distributed import DistContext
    from fowlflow.trainer.loop import LoopSetup
    from fowlflow.trainer.train import _load_data

    ctx = DistContext.from_env()
    ctx.init()
    try:
        cfg = parse_args(_args(data, out, data_path=data_path))
        loaded = _load_data(cfg, ctx, torch.device("cpu"))
        train = loaded.train
        held = [str(p) for p in (train.kept if data_path == "cache" else train.sources)]
        # What each held image decodes to, to recognise the images the epochs hand out.
        decoded = (train.images if data_path == "cache"
                   else [train.dataset[i][1] for i in range(len(train))])
        keys = {_image_key(image): path for image, path in zip(decoded, held)}
        assert len(keys) == len(held)
        setup = LoopSetup(torch.device("cpu"), ctx, 4, 32, 2, cfg.seed, False, progress=False)
        epochs = {}
        for epoch in (1, 2):
            _, batches = train.train_batches(setup, epoch)
            epochs[epoch] = [keys[_image_key(img)] for images, _, _ in batches for img in images]
        val = [int(r) for rows, _, _ in loaded.val.eval_batches(8) for r in rows]
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"held": held, "epochs": epochs, "val": val,
                       "per_rank": loaded.per_rank, "train_images": len(loaded.layout.train.paths)}, f)
    finally:
        ctx.shutdown()


@pytest.mark.parametrize("data_path", ["cache", "stream"])
def test_two_gloo_ranks_each_hold_half_and_no_image_twice(tmp_path, data_path):
    """Two real gloo ranks load the data as the trainer does: each holds half the photos, the
    halves are disjoint and together the whole set, and in each epoch no photo comes twice
    (and each rank's come from its own half)."""
    import torch.multiprocessing as mp

    data = hymenoptera_subset(tmp_path / "photos", train=11, val=5)  # 22 and 10 photos
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_rank_main, args=(2, _free_port(), str(data), data_path, str(out)), nprocs=2)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    held = [set(r["held"]) for r in ranks]
    assert [len(r["held"]) for r in ranks] == [11, 11] and not held[0] & held[1]
    assert held[0] | held[1] == {str(p) for p in (data / "train").rglob("*.jpg")}
    assert ranks[0]["per_rank"] == ranks[1]["per_rank"] == {"train": [11, 11], "val": [5, 5]}
    for epoch in ("1", "2"):
        seen = [r["epochs"][epoch] for r in ranks]
        assert [len(s) for s in seen] == [11, 11]  # batches of 4, 4 and 3
        assert all(set(s) <= h for s, h in zip(seen, held))
        assert len(set(seen[0] + seen[1])) == 22  # no photo twice in the epoch
    assert ranks[0]["epochs"]["1"] != ranks[0]["epochs"]["2"]  # reshuffled each epoch
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == list(range(10))


def test_torchrun_two_ranks_stream_one_half_each(tracking_uri, tmp_path):
    """torchrun, 2 gloo processes, a budget that streams: one run, its tags say each rank
    held half the photos, and the figures (gathered from both ranks) are logged."""
    data = hymenoptera_subset(tmp_path / "photos", train=10, val=4)
    mlflow.set_experiment("ddp-stream")  # created here: its artifacts go under tmp_path
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "fowlflow.train",
         *_args(data, tmp_path / "out", memory_budget_gb=1e-6, workers=1),
         "--registered_model_name", ""],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
        env={**os.environ, "MLFLOW_EXPERIMENT_NAME": "ddp-stream"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Rank 1/2 holds 10 of 20 training and 4 of 8 validation images (stream)" in proc.stdout
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddp-stream").experiment_id])
    assert run.data.tags["data_path"] == "stream"
    assert "another rank" not in run.data.tags["data_path_reason"]
    assert json.loads(run.data.tags["data_per_rank"]) == {"train": [10, 10], "val": [4, 4]}
    assert run.data.params["val_images"] == "8"
    local = mlflow.artifacts.download_artifacts(
        f"runs:/{run.info.run_id}/per_class_metrics.json", dst_path=str(tmp_path / "dl"))
    table = json.loads(Path(local).read_text())
    support = table["columns"].index("support")
    assert sum(row[support] for row in table["data"]) == 8  # both ranks' validation photos
