"""The training run, end to end: data -> caches -> model -> epochs -> figures -> logged model.

    summary = run(parse_args([...]), tracking=False)               # from Python (benchmarks)
    run(cfg, after=register)     # register(TrainedRun) on rank 0, while the MLflow run is open
    run(cfg, on_epoch=report)    # report(epoch, metrics) after each epoch; may raise StopTraining

``python -m fowlflow.train`` (what ``mlflow run .`` calls) wraps this with the stop handling
and, after training, the registry. Works as one process or under ``torchrun`` (DDP; rank 0
alone talks to MLflow).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fowlflow.data.imagefolder import Layout, Split, check_nonempty, scan_imagefolder
from fowlflow.data.sources import DataSource, data_location, resolve_data
from fowlflow.errors import ConfigError, DataError
from fowlflow.stopping import Terminated
from fowlflow.tracking import RunTracker, start_node_system_metrics
from fowlflow.tracking import figures
from fowlflow.tracking.checkpoints import CheckpointUploader, download_checkpoint, is_artifact_uri
from fowlflow.tracking.lineage import lineage_tags
from fowlflow.tracking.run_tracker import metric_names
from fowlflow.trainer.augment import IMAGENET_MEAN, IMAGENET_STD, eval_batch
from fowlflow.trainer.checkpoint import (check_classes, check_output_dir, load_checkpoint,
                                         save_checkpoint)
from fowlflow.trainer.config import TrainConfig
from fowlflow.trainer.distributed import DistContext
from fowlflow.trainer import sharding, streaming
from fowlflow.trainer.data_path import DataPlan, agree, choose_data_path
from fowlflow.trainer.image_cache import decode_split, resize_size
from fowlflow.trainer.loop import FIGURE_IMAGES, EvalResult, LoopSetup, evaluate, train_epoch
from fowlflow.trainer.model import build_model

log = logging.getLogger("fowlflow.trainer")


def use_bf16(amp: str, device: torch.device) -> bool:
    """bf16 autocast: 'auto' turns it on for CUDA and for CPUs with native bf16 (AVX512-BF16/AMX)."""
    if amp == "off":
        return False
    if amp == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class StopTraining(Exception):
    """Raised by an ``on_epoch`` callback to end training after this epoch (e.g. a tuning
    trial pruned): the best weights so far are evaluated and logged as after the last epoch,
    the run ends FINISHED, the summary's ``stopped_at_epoch`` says when and the run's tag
    ``fowlflow.stopped_early`` why."""


@dataclass(frozen=True)
class TrainedRun:
    """What :func:`run` hands its ``after`` callable on rank 0, the MLflow run still open."""

    run_id: str
    data: DataSource  # what the model was trained on; ``data.val_folder()`` its validation set


@dataclass
class _Data:
    """What :func:`_load_data` hands the run: the layout (less the files found unreadable),
    this rank's training and validation data, where they came from and how they are held."""

    layout: Any
    train: Any  # ImageCache or StreamedSplit
    val: Any
    source: DataSource
    plan: DataPlan
    per_rank: dict[str, list[int]]  # images each rank holds, per split
    counts: dict[str, int]  # readable images per split, all ranks together


def _load_data(cfg: TrainConfig, ctx: DistContext, device: torch.device) -> _Data:
    """Resolve and scan the data, choose the data path, and load this rank's part of it."""
    location = data_location(cfg.data)
    if ctx.local_rank == 0:
        source = resolve_data(location, allow_shards=True)
    ctx.barrier()  # the other local ranks then find the download in the cache
    if ctx.local_rank != 0:
        source = resolve_data(location, allow_shards=True)
    if source.kind == "shards":
        return _load_shards(cfg, ctx, device, source)
    layout = scan_imagefolder(source.root)
    rows = {"train": sharding.train_rows(len(layout.train.paths), cfg.seed, ctx.rank,
                                         ctx.world_size).tolist(),
            "val": sharding.val_rows(len(layout.val.paths), ctx.rank, ctx.world_size).tolist()}
    plan = choose_data_path(cfg.data_path, len(rows["train"]), len(rows["val"]), cfg.image_size,
                            device, cfg.memory_budget_gb, ctx.local_world_size)
    plan = agree(ctx.all_gather_object(plan), ctx.rank)
    if ctx.is_main:
        print(f"Data path: {plan.path} ({plan.reason})", flush=True)
    if plan.path == "cache":
        train, val = _decode(cfg, ctx, layout, rows)
    else:
        # Every rank trains on as many images per epoch as the smallest part holds.
        per_rank = len(layout.train.paths) // ctx.world_size
        train, val = (streaming.StreamedSplit(
            [getattr(layout, name).paths[r] for r in rows[name]],
            [getattr(layout, name).labels[r] for r in rows[name]], rows[name], name,
            cfg.image_size, cfg.workers, device, per_rank=per_rank if name == "train" else 0)
            for name in ("train", "val"))
    check_nonempty(layout)
    if layout.skipped and ctx.is_main:
        log.warning("Skipped %d unreadable file(s) (training goes on without them):\n  %s",
                    len(layout.skipped),
                    "\n  ".join(f"{s['path']}: {s['reason']}" for s in layout.skipped))
    return _loaded(ctx, layout, train, val, source, plan,
                   {"train": len(layout.train.paths), "val": len(layout.val.paths)})


def _loaded(ctx: DistContext, layout, train, val, source: DataSource, plan: DataPlan,
            counts: dict[str, int]) -> _Data:
    held = ctx.all_gather_object((len(train), len(val)))
    per_rank = {"train": [c[0] for c in held], "val": [c[1] for c in held]}
    print(f"Rank {ctx.rank}/{ctx.world_size} holds {len(train)} of {counts['train']} "
          f"training and {len(val)} of {counts['val']} validation images "
          f"({plan.path})", flush=True)
    return _Data(layout, train, val, source, plan, per_rank, counts)


def _load_shards(cfg: TrainConfig, ctx: DistContext, device: torch.device,
                 source: DataSource) -> _Data:
    """A shard set (``fowlflow data pack``): cached when this rank's shards fit the budget
    (read once, the shards dealt to the ranks as in epoch 0; the epochs then reshuffle within
    the cache, no S3 read after the first), else streamed from the shards every epoch."""
    from fowlflow.data.shards import iter_split, open_shards

    index = open_shards(source.uri)
    layout = Layout(source.root, list(index.classes), Split(), Split(),
                    [dict(s) for s in index.skipped], index.split_digests.get("train", ""),
                    index.split_digests.get("val", ""))
    counts = dict(index.counts)
    readers = streaming.shard_readers(cfg.workers)
    mine = {name: streaming.shard_count(index, name, ctx.rank, ctx.world_size, readers,
                                        cfg.seed if name == "train" else 0,
                                        1 if name == "train" else 0)
            for name in ("train", "val")}
    plan = choose_data_path(cfg.data_path, mine["train"], mine["val"], cfg.image_size, device,
                            cfg.memory_budget_gb, ctx.local_world_size)
    plan = agree(ctx.all_gather_object(plan), ctx.rank)
    plan = replace(plan, reason=f"{plan.reason}; shards at {source.uri}")
    if ctx.is_main:
        print(f"Data path: {plan.path} ({plan.reason})", flush=True)
    if plan.path == "stream":
        train, val = (streaming.ShardStream(index, name, cfg.image_size, cfg.workers, device,
                                            ctx.rank, ctx.world_size, cfg.seed)
                      for name in ("train", "val"))
        return _loaded(ctx, layout, train, val, source, plan, counts)
    caches = {}
    for name in ("train", "val"):
        samples = list(iter_split(index, name, rank=ctx.rank, world_size=ctx.world_size,
                                  seed=cfg.seed if name == "train" else 0, epoch=0,
                                  shuffle_buffer=0))
        cache, failures = decode_split(
            [data for _, data, _ in samples], [label for _, _, label in samples], name,
            cfg.image_size, cfg.workers, ctx.is_main, desc=f"decode {name}",
            rows=[(ctx.rank << 32) + i for i in range(len(samples))],
            names=[key for key, _, _ in samples])
        del samples
        caches[name] = cache
        failed = [f for part in ctx.all_gather_object(failures) for f in part]
        layout.skipped += [{"path": key, "reason": reason} for key, reason in failed]
        counts[name] -= len(failed)
    caches["train"].per_rank = min(ctx.all_gather_object(len(caches["train"])))
    return _loaded(ctx, layout, caches["train"], caches["val"], source, plan, counts)


def _decode(cfg: TrainConfig, ctx: DistContext, layout, rows: dict[str, list[int]]):
    """The cached path: decode this rank's rows of both splits; the files any rank could not
    decode are taken out of the layout (and listed in ``layout.skipped``) on every rank."""
    caches, failed = {}, []
    for name in ("train", "val"):
        split = getattr(layout, name)
        cache, failures = decode_split([split.paths[r] for r in rows[name]],
                                       [split.labels[r] for r in rows[name]], name,
                                       cfg.image_size, cfg.workers, ctx.is_main,
                                       desc=f"decode {name}", rows=rows[name])
        caches[name] = cache
        failed += [(name, str(p), reason) for p, reason in failures]
    failed = [f for part in ctx.all_gather_object(failed) for f in part]
    if failed:
        gone = {path for _, path, _ in failed}
        for name in ("train", "val"):
            split = getattr(layout, name)
            keep = [i for i, p in enumerate(split.paths) if str(p) not in gone]
            setattr(layout, name, Split([split.paths[i] for i in keep],
                                        [split.labels[i] for i in keep]))
        layout.skipped += [{"path": str(Path(p).relative_to(layout.root)), "reason": r}
                           for _, p, r in failed]
    # Every rank trains on as many images per epoch as the smallest part holds.
    caches["train"].per_rank = min(ctx.all_gather_object(len(caches["train"])))
    return caches["train"], caches["val"]


def _log_inputs(tracker: RunTracker, cfg: TrainConfig, data: _Data, ctx, device,
                bf16: bool, params: dict[str, Any]) -> None:
    layout, source = data.layout, data.source
    tracker.log_params({**cfg.as_params(), **params, "data_digest": layout.digest,
                        "num_classes": len(layout.classes), "train_images": data.counts["train"],
                        "val_images": data.counts["val"], "world_size": ctx.world_size,
                        "bf16": bf16})
    tracker.set_tags({**lineage_tags(device), "class_names": ", ".join(layout.classes),
                      "data_digest": layout.digest, "data_root": str(layout.root),
                      "data_path": data.plan.path, "data_path_reason": data.plan.reason,
                      "data_per_rank": json.dumps(data.per_rank)})
    tracker.log_dataset(source, "train", layout.train_digest, "training")
    tracker.log_dataset(source, "val", layout.val_digest, "validation")
    tracker.log_epoch({"skipped_files": len(layout.skipped)}, 0)
    if layout.skipped:
        tracker.log_dict(layout.skipped, "data/skipped_files.json")


def _log_results(tracker, model, val, layout, cfg, best_acc, data_uri,
                 result: EvalResult) -> None:
    """The best weights' evaluation (``result``, with the whole split's predictions): figures,
    per-class table, the model."""
    cm = result.confusion.numpy()
    fig = figures.confusion_matrix_figure(cm, layout.classes)
    tracker.log_figure(fig, "confusion_matrix.png")
    figures.close(fig)
    table = figures.per_class_table(cm, layout.classes)
    names = metric_names(layout.classes)  # MLflow refuses e.g. "(" and "+" in metric keys
    table["metric_name"] = [names[c] for c in layout.classes]  # val_recall_<metric_name>
    tracker.log_table(table, "per_class_metrics.json")
    tracker.log_epoch({f"val_recall_{names[c]}": r for c, r in zip(table["class"], table["recall"])}
                      | {f"val_precision_{names[c]}": p
                         for c, p in zip(table["class"], table["precision"])}, cfg.num_epochs)
    # Only the images the grid shows came back from the ranks that hold them.
    predictions = result.predictions
    fig = figures.misclassified_grid(predictions.images, predictions.true, predictions.pred,
                                     layout.classes, max_images=FIGURE_IMAGES)
    tracker.log_figure(fig, "misclassified_val_images.png")
    figures.close(fig)
    example = eval_batch(val.example(2)).cpu().numpy()
    metadata = {"class_names": layout.classes, "image_size": cfg.image_size,
                "resize_size": resize_size(cfg.image_size), "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD), "arch": cfg.arch, "data_uri": data_uri,
                "data_digest": layout.digest, "best_val_acc": best_acc}
    cpu_model = copy.deepcopy(model).float().to("cpu", memory_format=torch.contiguous_format).eval()
    tracker.log_model(cpu_model, example, metadata)


def run(cfg: TrainConfig, tracking: bool = True, *, params: dict[str, Any] | None = None,
        after: Callable[[TrainedRun], None] | None = None,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> dict:
    """Train as configured; returns a summary (best_val_acc, throughput, run_id).

    Args:
        params: more MLflow params to log with the config (the entry point's own flags).
        after: called on global rank 0 once the model is logged, before the MLflow run ends
            (the entry point registers the model there); what it raises fails the run.
        on_epoch: called after each epoch (logged and checkpointed) with the epoch and its
            metrics (``val_acc``, ``best_val_acc``, ...); it may raise :class:`StopTraining` to
            end training early. Single-process runs only.

    Raises:
        FowlflowError: bad data, model or config (the run, if any, is marked FAILED).
    """
    ctx = DistContext.from_env()
    if on_epoch is not None and ctx.distributed:
        raise ConfigError("on_epoch (early stopping) works in single-process runs only; "
                          "run without torchrun.")
    ctx.init()
    tracker = RunTracker(enabled=tracking and ctx.is_main)
    node_monitor = None
    try:
        # System metrics: node 0 (global rank 0's) under MLflow's own names, system/<name>,
        # whatever the backend; nodes 1, 2, ... under system/node<k>/<name>.
        tracker.start()
        if tracking and not ctx.is_main and ctx.local_rank == 0 and os.environ.get("MLFLOW_RUN_ID"):
            node_monitor = start_node_system_metrics(os.environ["MLFLOW_RUN_ID"], f"node{ctx.node_rank}")
        summary = _train(cfg, ctx, tracker, params or {}, after, on_epoch)
        tracker.flush()  # raises if MLflow refused a metric batch
        tracker.finish("FINISHED")
        return summary
    except BaseException as exc:
        if tracker.run_id:
            tracker.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        tracker.finish("KILLED" if isinstance(exc, (KeyboardInterrupt, Terminated)) else "FAILED")
        raise
    finally:
        if node_monitor is not None:
            node_monitor.finish()
        ctx.shutdown()


def _train(cfg: TrainConfig, ctx: DistContext, tracker: RunTracker, params: dict[str, Any],
           after: Callable[[TrainedRun], None] | None,
           on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> dict:
    if ctx.is_main:
        check_output_dir(cfg.output_dir)
    state = _load_resume(cfg)
    device = ctx.device()
    bf16 = use_bf16(cfg.amp, device)
    data = _load_data(cfg, ctx, device)
    layout, source = data.layout, data.source
    if state is not None:
        check_classes(state, cfg.resume, layout.classes)
    if data.counts["train"] < 2 * ctx.world_size:
        raise DataError(f"Only {data.counts['train']} readable training images for "
                        f"{ctx.world_size} process(es); add images.")
    _log_inputs(tracker, cfg, data, ctx, device, bf16, params)
    train_data, val_data = data.train, data.val
    if data.plan.path == "cache":
        train_data, val_data = train_data.to(device), val_data.to(device)
    t = _Training.build(cfg, ctx, device, len(layout.classes), state, tracker)
    setup = LoopSetup(device, ctx, cfg.batch_size, cfg.image_size, len(layout.classes),
                      cfg.seed, bf16, progress=ctx.is_main)
    loop_start = time.perf_counter()
    uploader = None
    if ctx.is_main and tracker.run_id and cfg.checkpoint_to_artifacts:
        uploader = CheckpointUploader(tracker.run_id)
        log.info("Each epoch's checkpoint is also kept as runs:/%s/checkpoints/checkpoint.pt",
                 tracker.run_id)
    try:
        speeds = _epochs(t, cfg, ctx, tracker, setup, train_data, val_data, layout, on_epoch,
                         uploader)
    except BaseException:
        if uploader is not None:
            uploader.close(raise_errors=False)  # the last finished epoch's, for a resume
        raise
    if uploader is not None:
        uploader.close()
    summary = {"best_val_acc": t.best_acc, "stopped_at_epoch": t.stopped_at,
               "train_images_per_sec": float(np.median(speeds)) if speeds else 0.0,
               "loop_seconds": time.perf_counter() - loop_start, "run_id": tracker.run_id,
               "classes": layout.classes}
    finish_start = time.perf_counter()
    t.model.load_state_dict(t.best_state)
    result = t.best_result
    if result is None:  # the best epoch was before a resume: every rank evaluates its part
        result = evaluate(t.model, val_data, setup)
    if not ctx.is_main:
        return summary
    _log_results(tracker, t.model, val_data, layout, cfg, t.best_acc, source.uri, result)
    if after is not None and tracker.run_id:
        tracker.flush()
        after(TrainedRun(tracker.run_id, source))
    summary["finish_seconds"] = time.perf_counter() - finish_start
    return summary


@dataclass
class _Training:
    """The model and its optimizer state, fresh or resumed, and the best epoch so far."""

    model: torch.nn.Module
    train_model: torch.nn.Module  # ``model``, wrapped in DDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    start_epoch: int = 1
    best_acc: float = -1.0
    best_state: dict | None = None
    best_result: EvalResult | None = None  # the best epoch's validation, when in this run
    stopped_at: int | None = None  # the epoch an on_epoch callback stopped training after

    @classmethod
    def build(cls, cfg: TrainConfig, ctx: DistContext, device: torch.device, num_classes: int,
              state: dict | None, tracker: RunTracker) -> "_Training":
        torch.manual_seed(cfg.seed)  # the new head's initialisation
        model = build_model(cfg.arch, num_classes, cfg.weights, cfg.freeze_backbone)
        model = model.to(device, memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size,
                                                    gamma=cfg.gamma)
        train_model = model
        if ctx.distributed:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        t = cls(model, train_model, optimizer, scheduler)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            t.start_epoch, t.best_acc = state["epoch"] + 1, state["best_acc"]
            t.best_state = state["best_state"]
            tracker.set_tags({"resumed_from": cfg.resume if is_artifact_uri(cfg.resume)
                              else os.path.abspath(cfg.resume)})
            if ctx.is_main:
                log.info("Resuming from %s at epoch %d", cfg.resume, t.start_epoch)
        return t


def _epochs(t: _Training, cfg: TrainConfig, ctx: DistContext, tracker: RunTracker,
            setup: LoopSetup, train_data, val_data, layout,
            on_epoch: Callable[[int, dict[str, float]], None] | None = None,
            uploader: CheckpointUploader | None = None) -> list[float]:
    """Train the remaining epochs, logging and checkpointing each; returns images/s per epoch."""
    ckpt_path = Path(cfg.output_dir) / "checkpoint.pt"
    speeds = []
    for epoch in range(t.start_epoch, cfg.num_epochs + 1):
        lr = t.optimizer.param_groups[0]["lr"]
        stats = train_epoch(t.train_model, t.optimizer, train_data, setup, epoch,
                            on_steps=tracker.log_steps if tracker.enabled else None)
        t.scheduler.step()  # after the optimizer steps (the sample stepped it first)
        val = evaluate(t.model, val_data, setup)
        improved = val.acc > t.best_acc
        if improved:
            t.best_acc, t.best_state = val.acc, copy.deepcopy(t.model.state_dict())
            t.best_result = val  # the final figures need no second pass over the same weights
        speeds.append(stats.images_per_sec)
        metrics = {"train_loss": stats.loss, "train_acc": stats.acc, "val_loss": val.loss,
                   "val_acc": val.acc, "lr": lr, "momentum": cfg.momentum,
                   "best_val_acc": t.best_acc, "train_images_per_sec": stats.images_per_sec,
                   "epoch_seconds": stats.seconds}
        tracker.log_epoch(metrics, epoch)
        if ctx.is_main:
            print(f"Epoch {epoch}/{cfg.num_epochs}  train loss {stats.loss:.4f} acc {stats.acc:.4f}"
                  f"  val loss {val.loss:.4f} acc {val.acc:.4f}  best {t.best_acc:.4f}"
                  f"  lr {lr:.2g}  {stats.images_per_sec:.1f} img/s", flush=True)
            weights = t.model.state_dict()
            save_checkpoint(ckpt_path, {
                "epoch": epoch, "model": weights, "optimizer": t.optimizer.state_dict(),
                "scheduler": t.scheduler.state_dict(), "best_acc": t.best_acc,
                # this epoch's own tensors when it is the best: torch.save writes them once
                "best_state": weights if improved else t.best_state,
                "config": _ckpt_config(cfg), "classes": layout.classes,
                "data_digest": layout.digest})
            if uploader is not None:
                uploader.submit(ckpt_path)
        if on_epoch is not None:
            try:
                on_epoch(epoch, dict(metrics))
            except StopTraining as stop:
                t.stopped_at = epoch
                tracker.set_tags({"fowlflow.stopped_early": f"after epoch {epoch}: {stop}"[:5000]})
                print(f"Stopped after epoch {epoch}/{cfg.num_epochs}: {stop}", flush=True)
                break
    return speeds


def _load_resume(cfg: TrainConfig) -> dict | None:
    """The checkpoint ``-P resume`` names (a file, or a run artifact downloaded through MLflow)."""
    if not cfg.resume:
        return None
    if not is_artifact_uri(cfg.resume):
        return load_checkpoint(cfg.resume, _ckpt_config(cfg))
    with tempfile.TemporaryDirectory(prefix="fowlflow-resume-") as tmp:
        local = download_checkpoint(cfg.resume, Path(tmp))
        return load_checkpoint(str(local), _ckpt_config(cfg), label=cfg.resume)


def _ckpt_config(cfg: TrainConfig) -> dict:
    return {"arch": cfg.arch, "image_size": cfg.image_size, "freeze_backbone": cfg.freeze_backbone}
