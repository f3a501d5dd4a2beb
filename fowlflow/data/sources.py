"""Turn the ``data`` parameter (a URI) into a local ImageFolder directory.

    source = resolve_data("s3://bucket/fowl")           # source.root: a Path with train/, val/
    source = resolve_data("https://host/fowl_data.zip") # downloaded once, cached
    source = resolve_data("synthetic")                  # a generated two-class set
    source = resolve_data("s3://bucket/fowl-shards", allow_shards=True)  # kind "shards"
    source.uri, source.kind, source.name                # what tracking records about it

Sources: a local ImageFolder directory, a local ``.zip``, an ``http(s)://`` ``.zip``
(:mod:`fowlflow.data.downloads`), an ``s3://bucket/prefix`` (a folder of images or one
``.zip`` object; :mod:`fowlflow.data.s3`), or ``synthetic`` (:mod:`fowlflow.data.synthetic`).
A folder or ``s3://`` prefix holding a shard index (written by ``fowlflow data pack``,
:mod:`fowlflow.data.shards`) is a ``shards`` source: nothing is downloaded, its ``root`` is a
folder with the index only, and callers read it with :func:`fowlflow.data.shards.open_shards`
(``uri``). Only a caller that streams shards passes ``allow_shards=True``; any other gets a
:class:`DataError` saying so, rather than an ImageFolder error about the index's folder.
This module is the one place a data URI is parsed: the trainer, tracking and the registry use
the :class:`DataSource` it returns. A relative local path is relative to the folder the
command was typed in (:mod:`fowlflow.local_paths`; :func:`data_location` gives the absolute
one). Archives are unpacked into the cache by :mod:`fowlflow.data.archives`.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fowlflow.data.archives import FIX, extract_cached, extract_zip, find_imagefolder_root, zip_root
from fowlflow.data.downloads import cache_dir, download, key
from fowlflow.errors import DataError
from fowlflow.local_paths import find_local
from fowlflow.stopping import sigterm_unwinds


@dataclass(frozen=True)
class DataSource:
    """A resolved ``data`` value: where its ImageFolder is and what to record about it.

    Attributes:
        root: the local ImageFolder (a folder with ``train/`` and ``val/``); for ``shards``
            the folder that holds the index (the shard folder, or the index's copy in the cache
            for ``s3://``).
        uri: the value with a local path made absolute (:func:`data_location`): what a model
            records as its ``data_uri``.
        kind: ``folder``, ``zip`` (a local archive), ``http``, ``s3``, ``synthetic`` or
            ``shards``.
        name: a short name for the data set: the last part of the path or URL, less ``.zip``.
    """

    root: Path
    uri: str
    kind: str
    name: str

    @property
    def is_remote(self) -> bool:
        """Fetched from a URL (or generated): ``uri`` names it; else ``root`` is the data."""
        return self.kind in ("http", "s3", "synthetic") or self.uri.startswith("s3://")

    def val_folder(self) -> AbstractContextManager[Path]:
        """A context giving the folder of validation images (``root / "val"``, one folder per
        class): for a shard set, its ``val`` split written into a temporary folder while the
        context runs. What the registry checks an exported model on.

            with source.val_folder() as val:
                register_trained_model(run_id=..., name=..., val_dir=val)
        """
        if self.kind != "shards":
            return nullcontext(self.root / "val")
        from fowlflow.data.shards import split_folder

        return split_folder(self.uri, "val")


def resolve_data(uri: str, *, allow_shards: bool = False) -> DataSource:
    """Fetch or find the data ``uri`` names; its ``root`` is a local ImageFolder, or the
    index's folder of a shard set when ``allow_shards``.

    Raises:
        DataError: the source can't be reached, downloaded or unpacked, or is a shard set and
            ``allow_shards`` is false; the message says why.
    """
    location = data_location(uri)
    kind = _kind(location)
    if kind in ("s3", "folder"):
        shards_root = _shards_root(location, allow_shards)
        if shards_root is not None:
            return DataSource(root=shards_root, uri=location, kind="shards",
                              name=PurePosixPath(location.rstrip("/")).name)
    # A SIGTERM while downloading or unpacking leaves no temporary file behind.
    with sigterm_unwinds():
        root = _resolve(location, kind)
    name = "synthetic" if kind == "synthetic" else PurePosixPath(location.rstrip("/")).stem
    return DataSource(root=root, uri=location, kind=kind, name=name)


def data_location(uri: str) -> str:
    """``uri`` with a local path made absolute (relative to where the command was typed, see
    :mod:`fowlflow.local_paths`); URLs, ``s3://`` and ``synthetic`` unchanged. What a model
    records as its ``data_uri``, so ``register`` finds the same data from any folder.

    Raises:
        DataError: empty, an unsupported scheme, or a local path that does not exist.
    """
    uri = uri.strip()
    if not uri:
        raise DataError(f"-P data is empty. {FIX}")
    if uri == "synthetic" or uri.startswith(("http://", "https://", "s3://")):
        return uri
    if "://" in uri and not uri.startswith("file://"):
        raise DataError(f"Unsupported data URI scheme in {uri!r}. {FIX}")
    return str(find_local(uri.removeprefix("file://"), "Data path", DataError, FIX))


def _kind(location: str) -> str:
    if location == "synthetic":
        return "synthetic"
    if location.startswith(("http://", "https://")):
        return "http"
    if location.startswith("s3://"):
        return "s3"
    return "zip" if Path(location).is_file() else "folder"


def _shards_root(location: str, allow_shards: bool) -> Path | None:
    """The local folder holding the shard index of ``location``, or None if it has none.

    Raises:
        DataError: ``location`` holds shards and the caller can't read them.
    """
    from fowlflow.data.shards import INDEX_NAME, parse_index, read_index_text

    text = read_index_text(location)
    if text is None:
        return None
    index = parse_index(text, location.rstrip("/"))
    if not allow_shards:
        packed = f" ({index.source})" if index.source else ""
        raise DataError(
            f"{location} holds shards written by 'fowlflow data pack' ({INDEX_NAME}), which "
            f"this command does not read yet. Give it the ImageFolder they were packed "
            f"from{packed}, or a folder, .zip or s3:// folder of images.")
    if not location.startswith("s3://"):
        return Path(location)
    root = cache_dir() / "shards" / key(location)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".index-")  # other local ranks may read it
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, root / INDEX_NAME)
    return root


def _resolve(uri: str, kind: str) -> Path:
    if kind == "synthetic":
        from fowlflow.data.synthetic import ensure_synthetic

        return ensure_synthetic(cache_dir() / "synthetic-v1")
    if kind == "http":
        archive = download(uri)
        return zip_root(extract_cached(archive, uri), uri)
    if kind == "s3":
        from fowlflow.data.s3 import download_s3

        return download_s3(uri)
    path = Path(uri)
    if kind == "zip":
        if not zipfile.is_zipfile(path):
            raise DataError(f"{str(path)!r} is a file but not a .zip archive. {FIX}")
        return zip_root(extract_zip(path, str(path)), str(path))
    return find_imagefolder_root(path)
