"""Which images each rank holds, and in which order it trains on them each epoch.

    held = train_rows(len(layout.train.paths), seed=42, rank=1, world_size=2)  # sorted rows
    val = val_rows(len(layout.val.paths), rank=1, world_size=2)               # rows 1, 3, 5, ...
    for idx in epoch_batches(len(held), per_rank, batch_size=32, seed=42, epoch=3):
        ...  # positions into ``held``

Under DDP each rank decodes (and, on the cached path, keeps) only its own part of the set:
the training rows are dealt out once from a permutation seeded by ``seed`` (so the parts are
balanced across classes and fixed for the run: a cache never needs refilling), the validation
rows round-robin. The parts of all ranks are disjoint and together the whole set. Each epoch a
rank shuffles its own part from ``(seed, epoch)`` and trains on ``per_rank`` of them (the
smallest part's size, so every rank takes the same number of steps); so a resumed run repeats
an uninterrupted one exactly. With one process the order is the one the trainer always had:
a shuffle of the whole set from ``(seed, epoch)``.
"""

from __future__ import annotations

import torch

# The epoch's shuffle: seed * this + epoch (a prime; seed 1 epoch 2 is not seed 2 epoch 1).
SHUFFLE_SEED_STRIDE = 100_003
PARTITION_SEED_OFFSET = 7_919  # the one-off deal of training rows to ranks: seed * stride + this


def train_rows(n: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    """The training rows (indices into the split's lists) rank ``rank`` holds, sorted."""
    if world_size == 1:
        return torch.arange(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(
        seed * SHUFFLE_SEED_STRIDE + PARTITION_SEED_OFFSET))
    return perm[rank::world_size].sort().values


def val_rows(n: int, rank: int, world_size: int) -> torch.Tensor:
    """The validation rows rank ``rank`` evaluates: every ``world_size``-th from ``rank``."""
    return torch.arange(n)[rank::world_size]


def epoch_batches(held: int, per_rank: int, batch_size: int, seed: int, epoch: int
                  ) -> list[torch.Tensor]:
    """This epoch's batches, as positions into this rank's ``held`` rows: ``per_rank`` of them
    in an order drawn from ``(seed, epoch)``. A last batch of one image is dropped when there
    are others (BatchNorm can't train on one image)."""
    perm = torch.randperm(held, generator=torch.Generator().manual_seed(
        seed * SHUFFLE_SEED_STRIDE + epoch))
    batches = list(perm[:per_rank].split(batch_size))
    if batches and len(batches[-1]) < 2 and len(batches) > 1:
        batches.pop()
    return batches
