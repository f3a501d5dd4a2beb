"""The streaming data path: every epoch decodes this rank's images again, in DataLoader workers.

    train = StreamedSplit(paths, labels, rows, "train", image_size=224, workers=4,
                          device=torch.device("cpu"), per_rank=200)
    sizes, batches = train.train_batches(setup, epoch)   # as ImageCache.train_batches
    for rows, images, labels in val.eval_batches(64): ...

Chosen by :mod:`fowlflow.trainer.data_path` when this rank's part of the set does not fit
the memory budget. Each item is a source (a local path, or the encoded bytes of one image)
and its label; ``-P workers`` processes decode them with the cached path's own
:func:`~fowlflow.trainer.image_cache.train_transform` /
:func:`~fowlflow.trainer.image_cache.eval_transform` into the same uint8 squashed images (and
aspect ratios) the cache holds, and the loop applies the same batched augmentation to them,
in the order :mod:`fowlflow.trainer.sharding` draws from ``(seed, epoch)``: the two paths
train on the same pixels in the same order, so they give the same weights. Memory held: the
batches in flight (``workers x 2`` batches), not the set. A file that fails to decode is
left out of its batch and reported once (the cached path finds such files before training).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fowlflow.data.images import max_image_pixels
from fowlflow.trainer.image_cache import DecodeImages, Source, resize_size

log = logging.getLogger(__name__)


class _Collate:
    """A batch of decoded items -> ``(positions, uint8 images, aspect, failures)``, put
    together in the worker (only whole tensors cross to the training process)."""

    def __init__(self, side: int):
        self.side = side

    def __call__(self, items):
        ok = [it for it in items if it[3] is None]
        failures = [(it[0], it[3]) for it in items if it[3] is not None]
        positions = torch.tensor([it[0] for it in ok], dtype=torch.int64)
        images = (torch.stack([it[1] for it in ok]) if ok
                  else torch.empty((0, 3, self.side, self.side), dtype=torch.uint8))
        aspect = torch.tensor([it[2] for it in ok], dtype=torch.float32)
        return positions, images, aspect, failures


class _Batches(torch.utils.data.Sampler):
    """The batch sampler: the batches set for this pass (iterated in the training process)."""

    def __init__(self):
        super().__init__()
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamedSplit:
    """This rank's part of one split, decoded again at every pass; the loop's data, like
    :class:`~fowlflow.trainer.image_cache.ImageCache`.

    Args:
        sources: what to decode (paths or encoded bytes), this rank's part, in split order.
        labels: their class indices.
        rows: their indices in the whole split (the validation figures use them).
        mode: ``train`` (squashed + aspect, augmented per batch) or ``val`` (centre crop).
        per_rank: images each rank trains on per epoch (0: all of these).
    """

    def __init__(self, sources: list[Source], labels: list[int], rows: list[int], mode: str,
                 image_size: int, workers: int, device: torch.device, per_rank: int = 0):
        self.sources, self.rows, self.mode, self.device = sources, rows, mode, device
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.per_rank = per_rank
        self.dataset = DecodeImages(sources, mode, image_size, max_image_pixels())
        self._sampler = _Batches()
        side = resize_size(image_size) if mode == "train" else image_size
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self._sampler, num_workers=workers,
            collate_fn=_Collate(side), pin_memory=device.type == "cuda",
            persistent_workers=workers > 0)
        self.failed: dict[int, str] = {}  # position -> why it could not be decoded

    def __len__(self) -> int:
        return len(self.sources)

    def _stream(self, batches: list[list[int]]):
        self._sampler.batches = batches
        for positions, images, aspect, failures in self.loader:
            self._report(failures)
            yield (positions, images.to(self.device, non_blocking=True),
                   aspect.to(self.device, non_blocking=True),
                   self.labels[positions].to(self.device, non_blocking=True))

    def _report(self, failures: list[tuple[int, str]]) -> None:
        for pos, reason in failures:
            if pos not in self.failed:
                self.failed[pos] = reason
                source = self.sources[pos]
                name = str(source) if isinstance(source, Path) else f"row {self.rows[pos]}"
                log.warning("Skipped %s (training goes on without it): %s", name, reason)

    def train_batches(self, setup, epoch: int):
        """This epoch's batch sizes and its ``(uint8 images, aspect, labels)`` batches (a
        batch is smaller by the files that failed to decode)."""
        from fowlflow.trainer.sharding import epoch_batches

        batches = epoch_batches(len(self), self.per_rank or len(self), setup.batch_size,
                                setup.seed, epoch)
        stream = self._stream([b.tolist() for b in batches])
        return [len(b) for b in batches], (batch[1:] for batch in stream)

    def eval_batches(self, batch_size: int):
        """``(split rows, uint8 images, labels)`` batches over this rank's part, in order."""
        rows = torch.tensor(self.rows, dtype=torch.int64)
        batches = [b.tolist() for b in torch.arange(len(self)).split(batch_size)]
        for positions, images, _, labels in self._stream(batches):
            yield rows[positions], images, labels

    def example(self, k: int) -> torch.Tensor:
        """The first ``k`` images that decode (the logged model's input example)."""
        images = []
        for i in range(len(self)):
            _, image, _, error = self.dataset[i]
            if error is None:
                images.append(image)
            if len(images) == k:
                break
        return torch.stack(images).to(self.device)


# ---------------------------------------------------------------------------------------------
# Shards written by `fowlflow data pack` (fowlflow.data.shards): read and decoded as they stream


def shard_readers(workers: int) -> int:
    """Readers per rank of a shard set: each DataLoader worker reads its own shards."""
    return max(workers, 1)


def shard_count(index, split: str, rank: int, world_size: int, readers: int, seed: int,
                epoch: int) -> int:
    """The samples rank ``rank`` reads of ``split`` in ``epoch`` (its readers' shards)."""
    from fowlflow.data.shards import rank_shards

    return sum(s.count for r in range(rank * readers, (rank + 1) * readers)
               for s in rank_shards(index, split, rank=r, world_size=world_size * readers,
                                    seed=seed, epoch=epoch))


class _ShardItems(torch.utils.data.IterableDataset):
    """This reader's samples of one split and epoch, decoded: ``(row, uint8 CHW tensor or
    None, aspect, label, key, error or None)``; ``row`` is unique over all readers."""

    def __init__(self, index, split: str, mode: str, image_size: int, rank: int,
                 world_size: int, readers: int, seed: int, epoch: int, shuffle: bool):
        super().__init__()
        self.index, self.split, self.rank, self.world_size = index, split, rank, world_size
        self.readers, self.seed, self.epoch, self.shuffle = readers, seed, epoch, shuffle
        self.decoder = DecodeImages([], mode, image_size, max_image_pixels())

    def __iter__(self):
        from fowlflow.data.shards import iter_split

        info = torch.utils.data.get_worker_info()
        reader = self.rank * self.readers + (info.id if info is not None else 0)
        samples = iter_split(self.index, self.split, rank=reader,
                             world_size=self.world_size * self.readers, seed=self.seed,
                             epoch=self.epoch, **({} if self.shuffle else {"shuffle_buffer": 0}))
        for i, (key, data, label) in enumerate(samples):
            yield ((reader << 32) + i, *self.decoder.decode(data), label, key)


def _collate_samples(items):
    ok = [it for it in items if it[3] is None]
    return (torch.tensor([it[0] for it in ok], dtype=torch.int64),
            torch.stack([it[1] for it in ok]) if ok else None,
            torch.tensor([it[2] for it in ok], dtype=torch.float32),
            torch.tensor([it[4] for it in ok], dtype=torch.int64),
            [(it[5], it[3]) for it in items if it[3] is not None])


class ShardStream:
    """This rank's part of one split of a shard set, read and decoded again at every pass;
    the loop's data, like :class:`StreamedSplit`.

    Training: each epoch the ranks get whole shards from ``(seed, epoch)``
    (:func:`fowlflow.data.shards.iter_split`; each DataLoader worker is a reader of its own)
    and every rank trains on as many images as the rank with the fewest holds that epoch, so
    all take the same number of steps. Validation: the shards are dealt once (epoch 0), in
    stored order.
    """

    def __init__(self, index, split: str, image_size: int, workers: int, device: torch.device,
                 rank: int, world_size: int, seed: int):
        self.index, self.split, self.image_size, self.workers = index, split, image_size, workers
        self.device, self.rank, self.world_size, self.seed = device, rank, world_size, seed
        self.readers = shard_readers(workers)
        self.failed: set[str] = set()

    def count(self, rank: int, epoch: int) -> int:
        return shard_count(self.index, self.split, rank, self.world_size, self.readers,
                           self.seed if self.split == "train" else 0,
                           epoch if self.split == "train" else 0)

    def __len__(self) -> int:
        """The images this rank reads (in the first epoch, for training)."""
        return self.count(self.rank, 1 if self.split == "train" else 0)

    def _samples(self, epoch: int, batch_size: int):
        """``(rows, images, aspect, labels)`` batches as the readers hand them out."""
        train = self.split == "train"
        items = _ShardItems(self.index, self.split, self.split, self.image_size, self.rank,
                            self.world_size, self.readers, self.seed if train else 0,
                            epoch if train else 0, shuffle=train)
        loader = torch.utils.data.DataLoader(
            items, batch_size=batch_size, num_workers=self.workers,
            collate_fn=_collate_samples, pin_memory=self.device.type == "cuda")
        for rows, images, aspect, labels, failures in loader:
            for key, reason in failures:
                if key not in self.failed:
                    self.failed.add(key)
                    log.warning("Skipped %s (training goes on without it): %s", key, reason)
            if images is not None:
                yield rows, images, aspect, labels

    def _rebatched(self, batches, sizes: list[int]):
        """The batches cut again to ``sizes`` (the readers' batches end at shard ends)."""
        buffer: list = []
        held = 0
        sizes = iter(sizes)
        want = next(sizes, None)
        for batch in batches:
            buffer.append(batch)
            held += len(batch[0])
            while want is not None and held >= want:
                parts = [torch.cat(t) for t in zip(*buffer)]
                yield [p[:want] for p in parts]
                rest = [p[want:] for p in parts]
                buffer, held = ([rest] if len(rest[0]) else []), len(rest[0])
                want = next(sizes, None)
            if want is None:
                return
        if buffer and held:  # files that failed to decode left the stream short
            yield [torch.cat(t) for t in zip(*buffer)]

    def train_batches(self, setup, epoch: int):
        """This epoch's batch sizes and its ``(uint8 images, aspect, labels)`` batches."""
        per_rank = min(self.count(r, epoch) for r in range(self.world_size))
        batches = list(torch.arange(per_rank).split(setup.batch_size))
        if batches and len(batches[-1]) < 2 and len(batches) > 1:
            batches.pop()  # BatchNorm can't train on one image
        sizes = [len(b) for b in batches]

        def gen():
            for _, images, aspect, labels in self._rebatched(
                    self._samples(epoch, setup.batch_size), sizes):
                yield (images.to(self.device, non_blocking=True),
                       aspect.to(self.device, non_blocking=True),
                       labels.to(self.device, non_blocking=True))
        return sizes, gen()

    def eval_batches(self, batch_size: int):
        """``(rows, uint8 images, labels)`` batches over this rank's validation shards."""
        for rows, images, _, labels in self._samples(0, batch_size):
            yield (rows, images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))

    def example(self, k: int) -> torch.Tensor:
        """The first ``k`` validation images this rank reads (the logged model's example)."""
        images = []
        for _, batch, _, _ in self._samples(0, k):
            images.append(batch)
            if sum(len(b) for b in images) >= k:
                break
        return torch.cat(images)[:k].to(self.device)
