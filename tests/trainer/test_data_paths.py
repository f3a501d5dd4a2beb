"""The two data paths (issue 14): the decoded cache when this process's part of the set fits the
memory budget, else streaming; one part of the set per DDP rank, on both paths; shard sets
written by `fowlflow data pack` (local and on SeaweedFS S3), cached or streamed.

Real photos (a subset of the shared hymenoptera set), real training runs into a SQLite store,
real gloo process groups (two processes started with torch.multiprocessing, and torchrun).
The choice itself, without training: test_data_path_choice.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import BIN, HYMENOPTERA, ROOT
from tests.data.conftest import s3, s3_env  # noqa: F401  (SeaweedFS: the data tests' S3)
from tests.net import free_port


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


def _image_key(image: torch.Tensor) -> str:
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


def _in_gloo_rank(rank: int, world: int, port: int, body, out: str, *args) -> None:
    """One real gloo rank (``mp.spawn``'s entry): ``body(out, *args)``'s result goes to
    ``out/rank<rank>.json``."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    from fowlflow.trainer.distributed import DistContext

    ctx = DistContext.from_env()
    ctx.init()
    try:
        result = body(ctx, out, *args)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        ctx.shutdown()


def _two_epochs_of_photos(ctx, out: str, data: str, data_path: str) -> dict:
    """Load the data as the trainer does, then take two epochs' batches: the photos held,
    each epoch's photos in order, the validation rows."""
    from fowlflow.trainer.config import parse_args
    from fowlflow.trainer.loop import LoopSetup
    from fowlflow.trainer.train import _load_data

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
    return {"held": held, "epochs": epochs, "val": val, "per_rank": loaded.per_rank}


@pytest.mark.parametrize("data_path", ["cache", "stream"])
def test_two_gloo_ranks_each_hold_half_and_no_image_twice(tmp_path, data_path):
    """Two real gloo ranks load the data as the trainer does: each holds half the photos, the
    halves are disjoint and together the whole set, and in each epoch no photo comes twice
    (and each rank's come from its own half)."""
    import torch.multiprocessing as mp

    data = hymenoptera_subset(tmp_path / "photos", train=11, val=5)  # 22 and 10 photos
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_in_gloo_rank, args=(2, free_port(), _two_epochs_of_photos, str(out),
                              str(data), data_path), nprocs=2)
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


# ---------------------------------------------------------------------------------------------
# Shards written by `fowlflow data pack`


def test_a_shard_set_trains_cached_and_streamed_as_its_folder_does(tracking_uri, tmp_path):
    """A folder of photos packed into shards: -P data=<shards> trains on both paths with the
    folder's classes, digests and counts, and an accuracy in the band of the folder's run."""
    from fowlflow.data.pack import pack
    from fowlflow.trainer.config import parse_args
    from fowlflow.trainer.train import run

    data = hymenoptera_subset(tmp_path / "photos")
    pack(str(data), str(tmp_path / "shards"), shard_size=5, progress=False)
    folder = run(parse_args(_args(data, tmp_path / "a")))
    cached = run(parse_args(_args(tmp_path / "shards", tmp_path / "b")))
    streamed = run(parse_args(_args(tmp_path / "shards", tmp_path / "c", data_path="stream",
                                    workers=2)))
    client = MlflowClient(tracking_uri)
    runs = [client.get_run(r["run_id"]).data for r in (folder, cached, streamed)]
    assert [r.tags["data_path"] for r in runs] == ["cache", "cache", "stream"]
    assert f"shards at {tmp_path / 'shards'}" in runs[2].tags["data_path_reason"]
    for key in ("data_digest", "train_images", "val_images", "num_classes"):
        assert runs[0].params[key] == runs[1].params[key] == runs[2].params[key], key
    assert runs[0].params["train_images"] == "24" and runs[0].params["val_images"] == "12"
    assert runs[0].tags["class_names"] == runs[2].tags["class_names"] == "ants, bees"
    accs = [r.metrics["val_acc"] for r in runs]
    assert max(accs) - min(accs) <= 0.35, accs
    assert {"confusion_matrix.png", "misclassified_val_images.png"} <= {
        f.path for f in client.list_artifacts(streamed["run_id"])}


def _two_epochs_of_shards(ctx, out: str, data: str) -> dict:
    """Stream a shard set as the trainer does: the images of two epochs, as hashes."""
    from fowlflow.trainer.config import parse_args
    from fowlflow.trainer.loop import LoopSetup
    from fowlflow.trainer.train import _load_data

    cfg = parse_args(_args(data, out, data_path="stream", workers=2))
    loaded = _load_data(cfg, ctx, torch.device("cpu"))
    setup = LoopSetup(torch.device("cpu"), ctx, 4, 32, 2, cfg.seed, False, progress=False)
    epochs = {}
    for epoch in (1, 2):
        sizes, batches = loaded.train.train_batches(setup, epoch)
        epochs[epoch] = [_image_key(img) for images, _, _ in batches for img in images]
        assert len(epochs[epoch]) == sum(sizes)
    return {"epochs": epochs, "per_rank": loaded.per_rank}


def test_two_gloo_ranks_stream_disjoint_shards(tmp_path):
    """Two gloo ranks, two DataLoader workers each, stream a shard set: in each epoch the
    ranks' images are different photos, none twice, as many on each rank."""
    import torch.multiprocessing as mp
    from PIL import Image

    from fowlflow.data.pack import pack
    from fowlflow.data.shards import iter_split, open_shards
    from fowlflow.trainer.image_cache import train_transform

    data = hymenoptera_subset(tmp_path / "photos", train=10, val=4)
    pack(str(data), str(tmp_path / "shards"), shard_size=2, progress=False)  # 10 train shards
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_in_gloo_rank, args=(2, free_port(), _two_epochs_of_shards, str(out),
                                  str(tmp_path / "shards")), nprocs=2)
    import io

    photos = {}
    for key, blob, _ in iter_split(open_shards(str(tmp_path / "shards")), "train"):
        with Image.open(io.BytesIO(blob)) as img:
            photos[_image_key(torch.from_numpy(train_transform(img, 32)[0].copy())
                              .permute(2, 0, 1))] = key
    assert len(photos) == 20
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["per_rank"]["val"] == [4, 4]  # 2 validation shards of 2 photos per rank
    for epoch in ("1", "2"):
        seen = [[photos[h] for h in r["epochs"][epoch]] for r in ranks]
        assert len(seen[0]) == len(seen[1]) >= 8, [len(s) for s in seen]
        assert len(set(seen[0] + seen[1])) == len(seen[0]) + len(seen[1])  # none twice
    assert ranks[0]["epochs"]["1"] != ranks[0]["epochs"]["2"]


def test_pack_to_s3_then_train_and_register_from_the_shards(tracking_uri, s3_env, tmp_path):
    """fowlflow data pack to SeaweedFS S3, then a streamed run from s3://, its model
    registered (the registry's check reads the validation samples out of the shards)."""
    from fowlflow.data.pack import pack
    from fowlflow.train import registration
    from fowlflow.trainer.config import parse_args
    from fowlflow.trainer.train import run

    data = hymenoptera_subset(tmp_path / "photos", train=8, val=4)
    pack(str(data), "s3://data/hym-shards", shard_size=4, progress=False)
    summary = run(parse_args(_args("s3://data/hym-shards", tmp_path / "out",
                                   memory_budget_gb=1e-6)), after=registration("hym-shards"))
    client = MlflowClient(tracking_uri)
    run_data = client.get_run(summary["run_id"]).data
    assert run_data.tags["data_path"] == "stream"
    assert run_data.tags["data_path_reason"].endswith("shards at s3://data/hym-shards")
    assert run_data.params["train_images"] == "16" and run_data.params["val_images"] == "8"
    versions = client.search_model_versions("name='hym-shards'")
    assert [v.run_id for v in versions] == [summary["run_id"]]
