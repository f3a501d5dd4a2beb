"""One training epoch and one evaluation pass over this rank's images, cached or streamed.

    stats = train_epoch(model, optimizer, train_data, setup, epoch, on_steps=report)
    result = evaluate(model, val_data, setup)

The data is an :class:`~fowlflow.trainer.image_cache.ImageCache` or a
:class:`~fowlflow.trainer.streaming.StreamedSplit` (both hand out uint8 batches in the order
:mod:`fowlflow.trainer.sharding` draws); the augmentation and everything after it are the same.

Host syncs are kept out of the step: losses and hit counts accumulate on the device. The step
losses are read back only at report points (the epoch's first step, then at most every
``setup.report_seconds``, and the epoch's end), one host sync each, and handed to
``on_steps(first_global_step, losses, images_per_sec)``: that is how they reach MLflow while
the epoch runs.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fowlflow.stopping import raise_if_stopping
from fowlflow.trainer.augment import eval_batch, train_batch
from fowlflow.trainer.distributed import DistContext


# Every random stream is seeded from (seed, epoch, rank), so a resumed run repeats an
# uninterrupted one exactly. The multipliers are primes that keep the streams of different
# seeds, epochs and ranks apart (seed 1 epoch 2 is not seed 2 epoch 1). The epoch's order of
# images is fowlflow.trainer.sharding's.
AUGMENT_SEED_STRIDE = 1_000_003   # this rank's augmentation and dropout: seed * this
AUGMENT_EPOCH_STRIDE = 1_009      #   + epoch * this + rank
REPORT_SECONDS = 10.0  # step losses are read back and reported at most this often (and at
                       # each epoch's first and last step)

# on_steps(first_global_step, losses, images_per_sec): the losses of consecutive steps and the
# images/s of all ranks over them.
StepCallback = Callable[[int, list, float], None]
FIGURE_IMAGES = 16  # misclassified validation images kept for the run's figure


@dataclass(frozen=True)
class LoopSetup:
    device: torch.device
    ctx: DistContext
    batch_size: int
    image_size: int
    num_classes: int
    seed: int
    amp: bool  # bf16 autocast
    progress: bool
    report_seconds: float = REPORT_SECONDS

    def autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


@dataclass
class EpochStats:
    loss: float
    acc: float
    images: int
    seconds: float

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Predictions:
    """The whole validation split's labels and predictions (all ranks'), in split order, and
    the images of its first misclassified rows: what the run's figures need."""

    true: np.ndarray  # int64 (N,)
    pred: np.ndarray  # int64 (N,)
    images: dict[int, np.ndarray]  # position in ``true`` -> uint8 (3, H, W)


@dataclass
class EvalResult:
    loss: float
    acc: float
    confusion: torch.Tensor  # int64 (C, C), rows = true class
    predictions: Predictions | None  # None when not asked for (keep_images=0)


def _seed_epoch(setup: LoopSetup, epoch: int) -> torch.Generator:
    seed = setup.seed * AUGMENT_SEED_STRIDE + epoch * AUGMENT_EPOCH_STRIDE + setup.ctx.rank
    torch.manual_seed(seed)  # dropout etc.
    return torch.Generator(device=setup.device).manual_seed(seed)


class _StepReporter:
    """Reads the epoch's step losses back at report points (one host sync each) and hands them
    to ``on_steps`` and the progress bar; does nothing when neither wants them."""

    def __init__(self, losses: torch.Tensor, sizes: list[int], setup: LoopSetup, step0: int,
                 on_steps: StepCallback | None, bar):
        self.losses, self.sizes, self.step0 = losses, sizes, step0
        self.on_steps, self.bar, self.every = on_steps, bar, setup.report_seconds
        self.world = setup.ctx.world_size
        self.active = on_steps is not None or setup.progress
        self.done = 0  # steps of this epoch reported so far
        self.last = time.perf_counter()

    def after(self, step: int, end: bool = False) -> None:
        """Called after ``step``: report the steps not yet reported if a report point is due."""
        if not self.active or step < self.done:
            return
        if not end and self.done > 0 and time.perf_counter() - self.last < self.every:
            return
        values = self.losses[self.done:step + 1].tolist()  # the host sync
        now = time.perf_counter()
        images = sum(self.sizes[self.done:step + 1]) * self.world
        if self.on_steps is not None:
            self.on_steps(self.step0 + self.done, values, images / max(now - self.last, 1e-9))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values[-1]:.3f}")
        self.done, self.last = step + 1, now


_NO_BATCH = (None, None, ())  # a step without images


def _empty_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                setup: LoopSetup) -> None:
    """This rank's part of a DDP step for which it has no images (all failed to decode, or
    its stream ran short): the other ranks' backward waits for this rank's gradients, so it
    sends zeros (the gradient of ``0 * output`` for one blank image), and takes the optimizer
    step with the averaged gradients like every rank, keeping the replicas equal. Skipping the
    step would leave the other ranks waiting forever. The blank image goes through the model
    in eval mode: no BatchNorm statistics change."""
    side = setup.image_size
    x = torch.zeros(1, 3, side, side, device=setup.device).contiguous(
        memory_format=torch.channels_last)
    model.eval()
    try:
        with setup.autocast():
            loss = model(x).float().sum() * 0.0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    finally:
        model.train()


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data,
                setup: LoopSetup, epoch: int, on_steps: StepCallback | None = None) -> EpochStats:
    """Train one epoch on ``data`` (an ImageCache or a StreamedSplit); ``on_steps`` gets its
    step losses while it runs (see the module doc). Global steps count from 0 at epoch 1's
    first step."""
    model.train()
    gen = _seed_epoch(setup, epoch)
    sizes, batches = data.train_batches(setup, epoch)
    losses = torch.zeros(len(sizes), device=setup.device)
    hits = torch.zeros((), dtype=torch.int64, device=setup.device)
    start = time.perf_counter()
    bar = tqdm(total=len(sizes), desc=f"epoch {epoch} train", unit="batch",
               disable=not setup.progress, leave=False, mininterval=1.0)
    reporter = _StepReporter(losses, sizes, setup, (epoch - 1) * len(sizes), on_steps,
                             bar if setup.progress else None)
    batches = iter(batches)
    for step in range(len(sizes)):
        raise_if_stopping()
        bar.update(1)
        # Fewer images when streamed files failed to decode; none when all of a batch failed
        # or the stream ran short (a shard set's unreadable samples).
        images, aspect, y = next(batches, _NO_BATCH)
        sizes[step] = len(y)
        if sizes[step] == 0:
            if setup.ctx.distributed:
                _empty_step(model, optimizer, setup)
            continue
        x = train_batch(images, aspect, setup.image_size, gen)
        x = x.contiguous(memory_format=torch.channels_last)
        with setup.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
        hits += (logits.argmax(1) == y).sum()
        reporter.after(step)
    reporter.after(len(sizes) - 1, end=True)
    bar.close()
    sizes_t = torch.tensor(sizes, dtype=torch.float32, device=setup.device)
    totals = torch.stack([(losses * sizes_t).sum(), hits.float(), sizes_t.sum()])
    setup.ctx.all_reduce_sum(totals)
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
    seconds = time.perf_counter() - start
    loss_sum, hit_sum, n = totals.tolist()
    return EpochStats(loss_sum / max(n, 1), hit_sum / max(n, 1), int(n), seconds)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data, setup: LoopSetup,
             keep_images: int = FIGURE_IMAGES) -> EvalResult:
    """Loss, accuracy and confusion matrix on ``data`` (each rank evaluates the part it holds;
    the sums are reduced over ranks). With ``keep_images``, also the whole split's
    :class:`Predictions` (gathered from every rank) with that many misclassified images."""
    model.eval()
    ctx = setup.ctx
    c = setup.num_classes
    confusion = torch.zeros(c * c, dtype=torch.int64, device=setup.device)
    loss_sum = torch.zeros((), device=setup.device)
    rows, trues, preds, wrong = [], [], [], {}
    # At the training batch size: validation (no gradients) never needs more memory than training.
    for row, images, y in data.eval_batches(setup.batch_size):
        raise_if_stopping()
        if len(y) == 0:
            continue
        x = eval_batch(images).contiguous(memory_format=torch.channels_last)
        with setup.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        pred = logits.argmax(1)
        confusion += torch.bincount(y * c + pred, minlength=c * c)
        if keep_images:
            rows.append(row)
            trues.append(y.cpu())
            preds.append(pred.cpu())
            for i in (pred != y).nonzero().flatten().tolist()[:keep_images - len(wrong)]:
                wrong[int(row[i])] = images[i].cpu().numpy()
    totals = torch.cat([confusion.float(), loss_sum.view(1)])
    ctx.all_reduce_sum(totals)
    confusion, loss_sum = totals[:-1].round().long(), totals[-1]
    confusion = confusion.view(c, c).cpu()
    n = int(confusion.sum())
    predictions = None
    if keep_images:
        empty = torch.zeros(0, dtype=torch.int64)
        mine = (torch.cat(rows) if rows else empty, torch.cat(trues) if trues else empty,
                torch.cat(preds) if preds else empty, wrong)
        parts = ctx.all_gather_object(mine)
        all_rows = torch.cat([p[0] for p in parts])
        order = all_rows.argsort()
        sorted_rows = all_rows[order]  # a file that failed to decode leaves a gap in the rows
        images = {int(torch.searchsorted(sorted_rows, row)): image
                  for part in parts for row, image in part[3].items()}
        predictions = Predictions(torch.cat([p[1] for p in parts])[order].numpy(),
                                  torch.cat([p[2] for p in parts])[order].numpy(), images)
    return EvalResult(float(loss_sum) / max(n, 1), float(confusion.trace()) / max(n, 1),
                      confusion, predictions)
