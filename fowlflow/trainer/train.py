"""The training run, end to end: data -> caches -> model -> epochs -> figures -> model -> registry.

    python -m fowlflow.trainer --data synthetic --num_epochs 2     # what `mlflow run .` calls
    summary = run(parse_args([...]), tracking=False)               # from Python (benchmarks)

Works as one process or under ``torchrun`` (DDP; rank 0 alone talks to MLflow).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from fowlflow.errors import DataError
from fowlflow.tracking import RunTracker, start_node_system_metrics
from fowlflow.tracking import figures
from fowlflow.tracking.lineage import lineage_tags
from fowlflow.tracking.run_tracker import metric_names
from fowlflow.trainer.augment import IMAGENET_MEAN, IMAGENET_STD, eval_batch
from fowlflow.trainer.checkpoint import (check_classes, check_output_dir, load_checkpoint,
                                         save_checkpoint)
from fowlflow.trainer.config import TrainConfig
from fowlflow.trainer.data_sources import data_location, resolve_data
from fowlflow.trainer.distributed import DistContext
from fowlflow.trainer.image_cache import decode_split, resize_size
from fowlflow.trainer.imagefolder import Split, check_nonempty, scan_imagefolder
from fowlflow.trainer.lifecycle import Terminated
from fowlflow.trainer.loop import LoopSetup, evaluate, train_epoch
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


def _load_data(cfg: TrainConfig, ctx: DistContext):
    """The layout, both image caches, and the data's location (a local path made absolute)."""
    location = data_location(cfg.data)
    if ctx.local_rank == 0:
        root = resolve_data(location)
    ctx.barrier()  # the other local ranks then find the download in the cache
    if ctx.local_rank != 0:
        root = resolve_data(location)
    layout = scan_imagefolder(root)
    progress = ctx.is_main
    caches = {}
    for name, split in (("train", layout.train), ("val", layout.val)):
        cache, failures = decode_split(split.paths, split.labels, name, cfg.image_size,
                                       cfg.workers, progress, desc=f"decode {name}")
        layout.skipped += [{"path": str(p.relative_to(layout.root)), "reason": r} for p, r in failures]
        setattr(layout, name, Split(cache.kept, cache.labels.tolist()))
        caches[name] = cache
    check_nonempty(layout)
    if layout.skipped and ctx.is_main:
        log.warning("Skipped %d unreadable file(s) (training goes on without them):\n  %s",
                    len(layout.skipped),
                    "\n  ".join(f"{s['path']}: {s['reason']}" for s in layout.skipped))
    return layout, caches["train"], caches["val"], location


def _log_inputs(tracker: RunTracker, cfg: TrainConfig, layout, ctx, device, bf16: bool) -> None:
    tracker.log_params({**cfg.as_params(), "data_digest": layout.digest,
                        "num_classes": len(layout.classes), "train_images": len(layout.train.paths),
                        "val_images": len(layout.val.paths), "world_size": ctx.world_size,
                        "bf16": bf16})
    tracker.set_tags({**lineage_tags(device), "class_names": ", ".join(layout.classes),
                      "data_digest": layout.digest, "data_root": str(layout.root)})
    name = Path(cfg.data.rstrip("/")).stem if cfg.data != "synthetic" else "synthetic"
    source = cfg.data if "://" in cfg.data or cfg.data == "synthetic" else str(layout.root)
    tracker.log_dataset(f"{name}/train", source, layout.train_digest, "training")
    tracker.log_dataset(f"{name}/val", source, layout.val_digest, "validation")
    tracker.log_epoch({"skipped_files": len(layout.skipped)}, 0)
    if layout.skipped:
        tracker.log_dict(layout.skipped, "data/skipped_files.json")


def _log_results(tracker, model, val_cache, setup, layout, cfg, best_acc, location) -> None:
    """Final evaluation of the best weights: figures, per-class table, the model."""
    result = evaluate(model, val_cache, setup, shard=False)
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
    fig = figures.misclassified_grid(val_cache.images.cpu().numpy(),
                                     val_cache.labels.cpu().numpy(), result.predictions.numpy(),
                                     layout.classes)
    tracker.log_figure(fig, "misclassified_val_images.png")
    figures.close(fig)
    example = eval_batch(val_cache.images[:2]).cpu().numpy()
    metadata = {"class_names": layout.classes, "image_size": cfg.image_size,
                "resize_size": resize_size(cfg.image_size), "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD), "arch": cfg.arch, "data_uri": location,
                "data_digest": layout.digest, "best_val_acc": best_acc}
    cpu_model = copy.deepcopy(model).float().to("cpu", memory_format=torch.contiguous_format).eval()
    tracker.log_model(cpu_model, example, metadata)


def run(cfg: TrainConfig, tracking: bool = True) -> dict:
    """Train as configured; returns a summary (best_val_acc, throughput, run_id).

    Raises:
        FowlflowError: bad data, model or config (the run, if any, is marked FAILED).
    """
    ctx = DistContext.from_env()
    ctx.init()
    tracker = RunTracker(enabled=tracking and ctx.is_main)
    node_monitor = None
    try:
        tracker.start(node_id=f"node{ctx.node_rank}" if ctx.distributed else None)
        if tracking and not ctx.is_main and ctx.local_rank == 0 and os.environ.get("MLFLOW_RUN_ID"):
            node_monitor = start_node_system_metrics(os.environ["MLFLOW_RUN_ID"], f"node{ctx.node_rank}")
        summary = _train(cfg, ctx, tracker)
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


def _train(cfg: TrainConfig, ctx: DistContext, tracker: RunTracker) -> dict:
    if ctx.is_main:
        check_output_dir(cfg.output_dir)
    state = load_checkpoint(cfg.resume, _ckpt_config(cfg)) if cfg.resume else None
    device = ctx.device()
    bf16 = use_bf16(cfg.amp, device)
    layout, train_cache, val_cache, location = _load_data(cfg, ctx)
    if state is not None:
        check_classes(state, cfg.resume, layout.classes)
    if len(train_cache) < 2 * ctx.world_size:
        raise DataError(f"Only {len(train_cache)} readable training images for "
                        f"{ctx.world_size} process(es); add images.")
    _log_inputs(tracker, cfg, layout, ctx, device, bf16)
    train_cache, val_cache = train_cache.to(device), val_cache.to(device)

    torch.manual_seed(cfg.seed)  # the new head's initialisation
    model = build_model(cfg.arch, len(layout.classes), cfg.weights, cfg.freeze_backbone)
    model = model.to(device, memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    start_epoch, best_acc, best_state = 1, -1.0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_acc, best_state = state["epoch"] + 1, state["best_acc"], state["best_state"]
        tracker.set_tags({"resumed_from": os.path.abspath(cfg.resume)})
        if ctx.is_main:
            log.info("Resuming from %s at epoch %d", cfg.resume, start_epoch)
    train_model = model
    if ctx.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    setup = LoopSetup(device, ctx, cfg.batch_size, cfg.image_size, len(layout.classes),
                      cfg.seed, bf16, progress=ctx.is_main)
    ckpt_path = Path(cfg.output_dir) / "checkpoint.pt"
    speeds = []
    loop_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.num_epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        stats, step_losses = train_epoch(train_model, optimizer, train_cache, setup, epoch)
        scheduler.step()  # after the optimizer steps (the sample stepped it first)
        val = evaluate(model, val_cache, setup)
        if val.acc > best_acc:
            best_acc, best_state = val.acc, copy.deepcopy(model.state_dict())
        speeds.append(stats.images_per_sec)
        steps_per_epoch = len(step_losses)
        tracker.log_step_losses(step_losses, first_step=(epoch - 1) * steps_per_epoch)
        tracker.log_epoch({"train_loss": stats.loss, "train_acc": stats.acc, "val_loss": val.loss,
                           "val_acc": val.acc, "lr": lr, "momentum": cfg.momentum,
                           "best_val_acc": best_acc, "train_images_per_sec": stats.images_per_sec,
                           "epoch_seconds": stats.seconds}, epoch)
        if ctx.is_main:
            print(f"Epoch {epoch}/{cfg.num_epochs}  train loss {stats.loss:.4f} acc {stats.acc:.4f}"
                  f"  val loss {val.loss:.4f} acc {val.acc:.4f}  best {best_acc:.4f}"
                  f"  lr {lr:.2g}  {stats.images_per_sec:.1f} img/s", flush=True)
            save_checkpoint(ckpt_path, {
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "best_acc": best_acc, "best_state": best_state,
                "config": _ckpt_config(cfg), "classes": layout.classes, "data_digest": layout.digest})

    summary = {"best_val_acc": best_acc, "train_images_per_sec": float(np.median(speeds)) if speeds else 0.0,
               "loop_seconds": time.perf_counter() - loop_start, "run_id": tracker.run_id,
               "classes": layout.classes}
    if not ctx.is_main:
        return summary
    finish_start = time.perf_counter()
    model.load_state_dict(best_state)
    _log_results(tracker, model, val_cache, setup, layout, cfg, best_acc, location)
    if cfg.registered_model_name and tracker.run_id:
        from fowlflow.registry import register_trained_model

        tracker.flush()
        register_trained_model(run_id=tracker.run_id, name=cfg.registered_model_name,
                               val_dir=layout.root / "val")
    summary["finish_seconds"] = time.perf_counter() - finish_start
    return summary


def _ckpt_config(cfg: TrainConfig) -> dict:
    return {"arch": cfg.arch, "image_size": cfg.image_size, "freeze_backbone": cfg.freeze_backbone}
