"""Read the shards ``fowlflow data pack`` writes: WebDataset tars plus one JSON index, streamed
from a local folder or an ``s3://bucket/prefix``.

    index = open_shards("s3://data/fowl-shards")         # or a local folder
    index.classes, index.counts["train"], index.digest   # digest: as a run on the folder logs it
    for key, data, label in iter_split(index, "train", rank=0, world_size=2, seed=0, epoch=3):
        ...  # key "train/ants/0013035.jpg"; data: that file's bytes, exactly as packed

A shard location holds::

    fowlflow-shards.json         the index, written last: no index, no shard set
    train/shard-000000.tar ...   WebDataset tars; per sample <n>.<ext> (the image file's bytes),
    val/shard-000000.tar ...     <n>.cls (the class index) and <n>.json ({"path": <its key>})

Each rank of a split gets whole shards: the split's shard list is shuffled from
``(seed, epoch)`` and shard ``i`` goes to rank ``i % world_size``; the rank's samples then pass
through a shuffle buffer seeded from ``(seed, epoch, rank)``. So the ranks' parts are disjoint,
their union is the split, and the same ``(seed, epoch)`` gives the same order. DataLoader
workers are more ranks: ``rank=rank * workers + worker, world_size=world_size * workers``.
Every shard is checked against the sha256 the index records before any of its samples is
yielded (an S3 shard is streamed into a temporary file first), so a changed or damaged shard
stops the read with a :class:`DataError` instead of training on it. S3 is reached as
:mod:`fowlflow.data.s3` does (``MLFLOW_S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from fowlflow.errors import DataError

INDEX_NAME = "fowlflow-shards.json"
FORMAT = "fowlflow-shards"
VERSION = 1
SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"^(train|val)/shard-\d{6}\.tar$")
REPACK = "Pack the data again: fowlflow data pack SRC DEST --overwrite."


@dataclass(frozen=True)
class Shard:
    """One tar of a split: its path relative to the location, samples, bytes and sha256."""

    path: str
    count: int
    size: int
    sha256: str


@dataclass(frozen=True)
class ShardIndex:
    """A shard set's index (``fowlflow-shards.json``), checked.

    Attributes:
        location: the folder or ``s3://bucket/prefix`` holding it (a local path absolute).
        classes: class names; a sample's label indexes this list.
        counts: samples per split, ``{"train": n, "val": m}``.
        shards: the shards per split, in packing order.
        digest: the data digest a run on the packed ImageFolder logs (``data_digest``:
            :attr:`fowlflow.data.imagefolder.Layout.digest` of the source).
        split_digests: ``{"train": ..., "val": ...}``, the layout's per-split digests.
        skipped: ``{"path", "reason"}`` of the source files that were not packed.
        source: the packed source, as given to ``fowlflow data pack``.
    """

    location: str
    classes: list[str]
    counts: dict[str, int]
    shards: dict[str, list[Shard]]
    digest: str
    split_digests: dict[str, str] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    source: str = ""


def open_shards(location: str) -> ShardIndex:
    """Read and check the index of the shard set at ``location`` (a folder or ``s3://``).

    Raises:
        DataError: no index there, S3 unreachable or refusing, or an index that is not valid
            (unknown version, paths outside the location, counts that don't add up).
    """
    location = _normalize(location)
    text = read_index_text(location)
    if text is None:
        raise DataError(f"{location} holds no {INDEX_NAME}, so it is not a shard set. Write one "
                        f"with: fowlflow data pack SRC {location}")
    return parse_index(text, location)


def read_index_text(location: str) -> str | None:
    """The index's text at ``location``, or None when there is none (not a shard set).

    Raises:
        DataError: S3 can't be reached, the bucket is missing or the credentials are refused.
    """
    if location.startswith("s3://"):
        from fowlflow.data.s3 import s3_client, s3_errors, split_s3_uri

        bucket, prefix = split_s3_uri(location)
        with s3_errors(location):
            s3 = s3_client()
            try:
                body = s3.get_object(Bucket=bucket, Key=_join(prefix, INDEX_NAME))["Body"]
            except s3.exceptions.NoSuchKey:
                return None
            return body.read().decode("utf-8", errors="replace")
    path = Path(location) / INDEX_NAME
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None


def parse_index(text: str, location: str) -> ShardIndex:
    """Check the index ``text`` of ``location`` and build its :class:`ShardIndex`.

    Raises:
        DataError: the index is not JSON, is of another format or version, or lists a shard
            path that is not ``<split>/shard-NNNNNN.tar`` (no ``..``, no absolute path).
    """
    where = f"{location}/{INDEX_NAME}"
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not valid JSON ({exc}). {REPACK}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"{where} is not a fowlflow shard index (no \"format\": \"{FORMAT}\"). "
                        f"{REPACK}")
    if doc.get("version") != VERSION:
        raise DataError(f"{where} has version {doc.get('version')!r}; this fowlflow reads "
                        f"version {VERSION}. Upgrade fowlflow, or pack the data again with "
                        "this one.")
    classes = doc.get("classes")
    if (not isinstance(classes, list) or len(classes) < 2 or len(set(classes)) != len(classes)
            or not all(isinstance(c, str) and c for c in classes)):
        raise DataError(f"{where}: \"classes\" must list at least 2 distinct names; got "
                        f"{str(classes)[:200]}. {REPACK}")
    splits = doc.get("splits")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        raise DataError(f"{where}: \"splits\" must hold exactly {list(SPLITS)}. {REPACK}")
    shards = {name: [_shard(entry, name, where) for entry in _list(splits[name], where, name)]
              for name in SPLITS}
    counts = {name: sum(s.count for s in shards[name]) for name in SPLITS}
    for name in SPLITS:
        if splits[name].get("count") != counts[name]:
            raise DataError(f"{where}: split {name!r} says {splits[name].get('count')!r} samples "
                            f"but its shards hold {counts[name]}. {REPACK}")
        paths = [s.path for s in shards[name]]
        if len(set(paths)) != len(paths):
            raise DataError(f"{where}: split {name!r} lists a shard twice. {REPACK}")
    digests = doc.get("split_digests") or {}
    return ShardIndex(location=location, classes=list(classes), counts=counts, shards=shards,
                      digest=str(doc.get("digest", "")),
                      split_digests={k: str(v) for k, v in digests.items() if k in SPLITS},
                      skipped=[s for s in doc.get("skipped") or [] if isinstance(s, dict)],
                      source=str(doc.get("source", "")))


def rank_shards(index: ShardIndex, split: str, *, rank: int = 0, world_size: int = 1,
                seed: int = 0, epoch: int = 0) -> list[Shard]:
    """The shards of ``split`` that ``rank`` reads in ``epoch``, in reading order.

    Raises:
        DataError: an unknown split, a rank outside ``[0, world_size)``, or fewer shards than
            ranks (some rank would get nothing).
    """
    if split not in index.shards:
        raise DataError(f"No split {split!r} in {index.location}; splits: {list(SPLITS)}.")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}.")
    shards = list(index.shards[split])
    if len(shards) < world_size:
        raise DataError(
            f"{index.location} has {len(shards)} {split} shard(s), fewer than the {world_size} "
            f"readers (ranks x workers) that share them, so some would get no data. Pack again "
            f"with a smaller --shard-size (at most {max(1, index.counts[split] // world_size)} "
            "for this split), or use fewer ranks or workers.")
    random.Random(f"shards/{split}/{seed}/{epoch}").shuffle(shards)
    return shards[rank::world_size]


def iter_split(index: ShardIndex, split: str, *, rank: int = 0, world_size: int = 1,
               seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1000
               ) -> Iterator[tuple[str, bytes, int]]:
    """``(key, data, label)`` for this rank's part of ``split`` in ``epoch``'s order.

    ``key`` is the image's path in the packed ImageFolder (``train/ants/x.jpg``), ``data`` its
    encoded bytes as they were packed, ``label`` an index into ``index.classes``. At most
    ``shuffle_buffer`` samples are held at once (0 or 1: shard order only).

    Raises:
        DataError: see :func:`rank_shards`; a shard that can't be read or does not match its
            sha256 or count in the index.
    """
    shards = rank_shards(index, split, rank=rank, world_size=world_size, seed=seed, epoch=epoch)
    rng = random.Random(f"samples/{split}/{seed}/{epoch}/{rank}/{world_size}")
    samples = (sample for shard in shards for sample in _read_shard(index, shard))
    yield from _shuffled(samples, rng, shuffle_buffer)


def _shuffled(items: Iterator, rng: random.Random, size: int) -> Iterator:
    """A shuffle buffer of ``size`` items over ``items`` (deterministic for ``rng``)."""
    buffer: list = []
    for item in items:
        if len(buffer) < max(size, 1):
            buffer.append(item)
            continue
        j = rng.randrange(len(buffer))
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def _read_shard(index: ShardIndex, shard: Shard) -> Iterator[tuple[str, bytes, int]]:
    """The samples of one verified shard, in stored order."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    where = f"{index.location}/{shard.path}"
    with _verified(index, shard) as stream:
        files = ({**f, "__url__": where} for f in tar_file_iterator(stream))
        n = 0
        try:
            for sample in group_by_keys(files):
                yield _sample(sample, index, where)
                n += 1
        except (ValueError, OSError, tarfile.TarError) as exc:
            raise DataError(f"{where} is not a readable WebDataset tar ({exc}). {REPACK}") from None
    if n != shard.count:
        raise DataError(f"{where} holds {n} samples; the index says {shard.count}. {REPACK}")


def _sample(sample: dict, index: ShardIndex, where: str) -> tuple[str, bytes, int]:
    try:
        meta = json.loads(sample["json"])
        label = int(sample["cls"])
        images = [k for k in sample if not k.startswith("__") and k not in ("json", "cls")]
        key = meta["path"]
        if len(images) != 1 or not isinstance(key, str) or not 0 <= label < len(index.classes):
            raise ValueError("expected one image, a label in range and a path")
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{where}: sample {sample.get('__key__')!r} is not a fowlflow sample "
                        f"({exc}). {REPACK}") from None
    return key, sample[images[0]], label


class _verified:
    """A context manager: the shard's bytes as a file, checked against its size and sha256."""

    def __init__(self, index: ShardIndex, shard: Shard):
        self.index, self.shard = index, shard
        self.where = f"{index.location}/{shard.path}"
        self.file: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        if self.index.location.startswith("s3://"):
            self.file = tempfile.TemporaryFile(prefix="fowlflow-shard-")
            self._download(self.file)
        else:
            path = _inside(Path(self.index.location), self.shard.path, self.where)
            try:
                self.file = path.open("rb")
            except OSError as exc:
                raise DataError(f"Can't read the shard {self.where} ({exc.strerror}). "
                                f"{REPACK}") from None
        digest, size = _sha256(self.file)
        if size != self.shard.size or digest != self.shard.sha256:
            self.file.close()
            raise DataError(
                f"The shard {self.where} does not match its index ({size} bytes, sha256 "
                f"{digest[:16]}...; the index says {self.shard.size} bytes, "
                f"{self.shard.sha256[:16]}...): it was changed or damaged after packing. "
                f"{REPACK}")
        self.file.seek(0)
        return self.file

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()

    def _download(self, file: IO[bytes]) -> None:
        from fowlflow.data.s3 import s3_client, s3_errors, split_s3_uri

        bucket, prefix = split_s3_uri(self.index.location)
        with s3_errors(self.where):
            body = s3_client().get_object(Bucket=bucket, Key=_join(prefix, self.shard.path))["Body"]
            shutil.copyfileobj(body, file, 1 << 20)


def _sha256(file: IO[bytes]) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    file.seek(0)
    while chunk := file.read(1 << 20):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _list(split: object, where: str, name: str) -> list:
    shards = split.get("shards") if isinstance(split, dict) else None
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{where}: split {name!r} lists no shards. {REPACK}")
    return shards


def _shard(entry: object, split: str, where: str) -> Shard:
    """One checked index entry: its path must be ``<split>/shard-NNNNNN.tar``."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: a {split} shard entry is not an object. {REPACK}")
    path = entry.get("path")
    if not isinstance(path, str) or not SHARD_NAME.match(path) or not path.startswith(split + "/"):
        raise DataError(f"{where} lists the shard path {str(path)[:200]!r} for split {split!r}; "
                        f"only '{split}/shard-NNNNNN.tar' inside the shard folder is allowed "
                        f"(the index may have been edited). {REPACK}")
    count, size, digest = entry.get("count"), entry.get("size"), entry.get("sha256")
    if (not isinstance(count, int) or count < 1 or not isinstance(size, int) or size < 0
            or not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise DataError(f"{where}: shard {path!r} needs a positive \"count\", a \"size\" and a "
                        f"64-hex \"sha256\". {REPACK}")
    return Shard(path=path, count=count, size=size, sha256=digest)


@contextmanager
def split_folder(location: str, split: str = "val") -> Iterator[Path]:
    """A temporary folder of ``split``'s images, one folder per class, as packed, while the
    ``with`` block runs (files named by sample number, not by their key: the key is data).

        with split_folder("s3://data/fowl-shards", "val") as val:
            list(val.iterdir())   # [val/ants, val/bees]
    """
    from fowlflow.data.images import IMAGE_EXTENSIONS

    index = open_shards(location)
    with tempfile.TemporaryDirectory(prefix=f"fowlflow-{split}-") as tmp:
        for i, (key, data, label) in enumerate(iter_split(index, split, shuffle_buffer=0)):
            suffix = PurePosixPath(key).suffix.lower()
            folder = Path(tmp) / index.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:07d}{suffix if suffix in IMAGE_EXTENSIONS else ''}").write_bytes(data)
        yield Path(tmp)


def _inside(root: Path, relative: str, where: str) -> Path:
    """``root / relative``, refused if it resolves outside ``root`` (a symlink out)."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise DataError(f"The shard {where} resolves to {path}, outside {root}; refusing it. "
                        f"{REPACK}")
    return path


def _normalize(location: str) -> str:
    """An ``s3://`` location without its trailing slash; a local one absolute."""
    location = location.strip()
    if location.startswith("s3://"):
        return location.rstrip("/")
    from fowlflow.local_paths import find_local

    return str(find_local(location.removeprefix("file://"), "Shard folder", DataError,
                          "Give a folder written by fowlflow data pack, or s3://bucket/prefix."))


def _join(prefix: str, name: str) -> str:
    return str(PurePosixPath(prefix) / name) if prefix else name
