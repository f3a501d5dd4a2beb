"""Write an ImageFolder as WebDataset shards plus an index: what ``fowlflow data pack`` does.

    index = pack("hymenoptera_data", "s3://data/hymenoptera-shards", shard_size=1000)
    index.counts, index.digest           # a fowlflow.data.shards.ShardIndex, read back

The source is anything ``-P data=`` takes (a folder, a ``.zip``, an ``s3://`` folder, a URL),
resolved by :func:`fowlflow.data.sources.resolve_data`; the destination a local folder or an
``s3://bucket/prefix``. Each split's images are shuffled once (seed 0, so shards mix the
classes) and cut into shards of at most ``shard_size`` images, of near-equal size. Every image
is decoded once as the trainer decodes it (:func:`fowlflow.data.images.to_rgb`); one that does
not decode is reported and left out, and listed in the index's ``skipped``. The index
(:data:`fowlflow.data.shards.INDEX_NAME`) is written last, after every shard is in place: if
anything fails, the shards written so far are removed and there is no index, so a destination
never holds half a shard set. A destination that already holds a shard set is refused unless
``overwrite``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from multiprocessing.pool import ThreadPool
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm

from fowlflow.data.imagefolder import Layout, Split, check_nonempty, scan_imagefolder
from fowlflow.data.shards import (FORMAT, INDEX_NAME, SPLITS, VERSION, ShardIndex, parse_index,
                                  read_index_text)
from fowlflow.errors import DataError
from fowlflow.stopping import sigterm_unwinds

log = logging.getLogger(__name__)
DEFAULT_SHARD_SIZE = 1000
PACK_SEED = 0


def pack(src: str, dest: str, *, shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
         workers: int | None = None, progress: bool = True) -> ShardIndex:
    """Pack the ImageFolder ``src`` names into shards at ``dest``; return the written index.

    ``workers`` threads read and decode-check the images (default: one per CPU; PIL decodes
    without the GIL); the shards are written in order by the calling thread.

    Raises:
        DataError: the source can't be resolved or has no usable layout, ``dest`` already holds
            shards (without ``overwrite``), or ``dest`` can't be written (the message names
            the cause; nothing is left behind).
    """
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1 image; got {shard_size}.")
    target = _destination(dest)
    with sigterm_unwinds():  # a SIGTERM removes what was written, as a failure does
        return _pack(src, target, shard_size, overwrite, workers, progress)


def _pack(src: str, target, shard_size: int, overwrite: bool, workers: int | None,
          progress: bool) -> ShardIndex:
    from fowlflow.data.sources import data_location, resolve_data

    written: list[str] = []  # shard paths in place at the destination, removed on failure
    try:
        target.check(overwrite)
        source = resolve_data(src)
        target.refuse_inside(source.root)
        layout = scan_imagefolder(source.root)
        if overwrite:
            target.clear()
        with ThreadPool(workers or os.cpu_count() or 1) as pool:
            splits = {name: _write_split(layout, name, target, shard_size, written, pool,
                                         progress) for name in SPLITS}
        check_nonempty(layout)
        doc = {"format": FORMAT, "version": VERSION, "library": "webdataset",
               "source": _public(data_location(src)), "classes": layout.classes,
               "digest": layout.digest,
               "split_digests": {"train": layout.train_digest, "val": layout.val_digest},
               "shard_size": shard_size, "splits": splits, "skipped": layout.skipped}
        text = json.dumps(doc, indent=1, ensure_ascii=False)
        index = parse_index(text, target.location)  # what readers will see, checked first
        target.put_bytes(INDEX_NAME, text.encode())
    except BaseException:
        target.remove(written)
        raise
    if layout.skipped:
        log.warning("Left out %d file(s) that can't be read:\n  %s", len(layout.skipped),
                    "\n  ".join(f"{s['path']}: {s['reason']}" for s in layout.skipped))
    return index


def _write_split(layout: Layout, name: str, target, shard_size: int, written: list[str],
                 pool: ThreadPool, progress: bool) -> dict:
    """Write one split's shards; drop its unreadable images from ``layout``; its index entry."""
    from webdataset import TarWriter

    split: Split = getattr(layout, name)
    order = list(range(len(split.paths)))
    random.Random(PACK_SEED).shuffle(order)
    n_shards = max(1, math.ceil(len(order) / shard_size))
    bounds = [round(i * len(order) / n_shards) for i in range(n_shards + 1)]
    kept = set(range(len(split.paths)))
    shards = []
    bar = tqdm(total=len(order), desc=f"pack {name}", unit="img", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="fowlflow-pack-") as tmp:
        for s in range(n_shards):
            part = Path(tmp) / f"shard-{s:06d}.tar"
            count, members = 0, order[bounds[s]:bounds[s + 1]]
            # One shard's images at a time: memory stays bounded while a shard uploads.
            checked = pool.imap(_read_checked, [split.paths[i] for i in members], chunksize=4)
            with part.open("wb") as f, TarWriter(f, encoder=False, mtime=0) as sink:
                for i, (data, problem) in zip(members, checked):
                    path = split.paths[i]
                    key = PurePosixPath(path.relative_to(layout.root)).as_posix()
                    bar.update()
                    if problem:
                        layout.skipped.append({"path": key, "reason": problem})
                        kept.discard(i)
                        continue
                    sink.write({"__key__": f"{count:06d}", "cls": str(split.labels[i]).encode(),
                                "json": json.dumps({"path": key}).encode(),
                                _extension(path): data})
                    count += 1
            if count == 0:
                continue  # every image of this shard was unreadable
            digest, size = _sha256(part)
            rel = f"{name}/shard-{len(shards):06d}.tar"
            written.append(rel)
            target.put_file(rel, part)
            part.unlink()
            shards.append({"path": rel, "count": count, "size": size, "sha256": digest})
    bar.close()
    keep = sorted(kept)
    setattr(layout, name, Split([split.paths[i] for i in keep], [split.labels[i] for i in keep]))
    return {"count": sum(s["count"] for s in shards), "shards": shards}


def _read_checked(path: Path) -> tuple[bytes, str | None]:
    """The file's bytes, and why it can't be used (decoded as the trainer does), or None."""
    from PIL import Image

    from fowlflow.data.images import ImageDecodeError, to_rgb

    try:
        data = path.read_bytes()
    except OSError as exc:
        return b"", f"cannot read: {exc.strerror}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            to_rgb(img, fit=(256, 256))
    except ImageDecodeError as exc:
        return data, f"too large: {exc.message}"
    except Exception as exc:  # any decoder failure is this file's problem, reported
        return data, f"cannot decode: {type(exc).__name__}: {exc}"
    return data, None


def _extension(path: Path) -> str:
    """The tar member suffix for an image: its lowercase extension without the dot."""
    return path.suffix.lower().lstrip(".") or "img"


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest(), path.stat().st_size


def _public(uri: str) -> str:
    """``uri`` without a ``user:password@`` part: the index must not hold secrets."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return uri


def _destination(dest: str):
    dest = dest.strip()
    if not dest:
        raise DataError("The destination is empty; give a folder or s3://bucket/prefix.")
    if dest.startswith("s3://"):
        return _S3Destination(dest.rstrip("/"))
    if "://" in dest and not dest.startswith("file://"):
        raise DataError(f"Unsupported destination {dest!r}; give a local folder or "
                        "s3://bucket/prefix.")
    return _FolderDestination(Path(dest.removeprefix("file://")).expanduser().absolute())


class _FolderDestination:
    """A local folder: files are copied into place, removed again on failure."""

    def __init__(self, root: Path):
        self.root, self.location = root, str(root)
        # The folders mkdir will create (deepest first), removed again on failure.
        self.created = [p for p in [root, *root.parents] if not p.exists()]

    def check(self, overwrite: bool) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise DataError(f"The destination {self.root} is a file; give a folder.")
        _refuse_existing(self.location, self._existing(), overwrite)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root, prefix=".fowlflow-probe-")
            probe.close()
        except OSError as exc:
            raise DataError(f"Can't write to {self.root} ({exc.strerror}); give a writable "
                            "folder.") from None

    def refuse_inside(self, source: Path) -> None:
        source = Path(source).resolve()
        if self.root.resolve().is_relative_to(source):
            raise DataError(f"The destination {self.root} is inside the source ImageFolder "
                            f"{source}; give a folder outside it.")

    def _existing(self) -> list[str]:
        found = [INDEX_NAME] if (self.root / INDEX_NAME).is_file() else []
        return found + [f"{s}/{p.name}" for s in SPLITS
                        for p in sorted((self.root / s).glob("shard-*.tar"))]

    def clear(self) -> None:
        (self.root / INDEX_NAME).unlink(missing_ok=True)  # first: no index, no shard set
        for rel in self._existing():
            (self.root / rel).unlink(missing_ok=True)

    def put_file(self, rel: str, local: Path) -> None:
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dest)

    def put_bytes(self, rel: str, data: bytes) -> None:
        tmp = self.root / f".{rel}.part"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / rel)

    def remove(self, written: list[str]) -> None:
        for rel in written:
            (self.root / rel).unlink(missing_ok=True)
        for folder in [self.root / s for s in SPLITS] + self.created:
            try:
                folder.rmdir()  # only if empty: never someone else's files
            except OSError:
                pass


class _S3Destination:
    """An ``s3://bucket/prefix``: each shard uploaded when written, deleted again on failure."""

    def __init__(self, location: str):
        from fowlflow.data.s3 import split_s3_uri

        self.location = location
        self.bucket, self.prefix = split_s3_uri(location)

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _call(self, fn: Callable, action: str = "write"):
        from fowlflow.data.s3 import s3_client, s3_errors

        with s3_errors(self.location, action):
            return fn(s3_client())

    def check(self, overwrite: bool) -> None:
        from fowlflow.data.s3 import list_objects

        if read_index_text(self.location) is not None:  # also: reachable, bucket, credentials
            existing = [INDEX_NAME]
        else:
            existing = []
        for split in SPLITS:
            objects = self._call(lambda s3: list_objects(s3, self.bucket, self._key(split) + "/"),
                                 "read")
            existing += [o["Key"].removeprefix(self.prefix + "/") for o in objects
                         if o["Key"].endswith(".tar")]
        self.existing = existing
        _refuse_existing(self.location, existing, overwrite)
        # A write probe: refused credentials or a read-only key fail here, before any decoding.
        probe = self._key(f".fowlflow-probe-{os.getpid()}")
        self._call(lambda s3: s3.put_object(Bucket=self.bucket, Key=probe, Body=b""))
        self._call(lambda s3: s3.delete_object(Bucket=self.bucket, Key=probe))

    def refuse_inside(self, source: Path) -> None:
        pass  # a local source can't contain an s3:// destination

    def clear(self) -> None:
        for rel in [INDEX_NAME] + [r for r in self.existing if r != INDEX_NAME]:
            self._call(lambda s3: s3.delete_object(Bucket=self.bucket, Key=self._key(rel)))

    def put_file(self, rel: str, local: Path) -> None:
        self._call(lambda s3: s3.upload_file(str(local), self.bucket, self._key(rel)))

    def put_bytes(self, rel: str, data: bytes) -> None:
        self._call(lambda s3: s3.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data))

    def remove(self, written: list[str]) -> None:
        left = []
        for rel in written:
            try:
                self._call(lambda s3: s3.delete_object(Bucket=self.bucket, Key=self._key(rel)))
            except DataError:
                left.append(rel)
        if left:
            log.error("Could not remove %d shard(s) written before the failure from %s: %s; "
                      "delete them by hand (there is no index, so no reader uses them).",
                      len(left), self.location, ", ".join(left))


def _refuse_existing(location: str, existing: list[str], overwrite: bool) -> None:
    if existing and not overwrite:
        raise DataError(f"{location} already holds shards ({', '.join(existing[:3])}"
                        f"{', ...' if len(existing) > 3 else ''}). Pass --overwrite to replace "
                        "them, or give another destination.")
