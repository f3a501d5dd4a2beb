"""Turn the ``data`` parameter (a URI) into a local ImageFolder directory.

    root = resolve_data("s3://bucket/fowl")          # -> Path with train/ and val/
    root = resolve_data("https://host/fowl_data.zip") # downloaded once, cached
    root = resolve_data("synthetic")                 # a generated two-class set

Sources: a local ImageFolder directory, a local ``.zip``, an ``http(s)://`` ``.zip``
(:mod:`fowlflow.trainer.downloads`), an ``s3://bucket/prefix`` (a folder of images or one
``.zip`` object; boto3 with the standard AWS variables and ``MLFLOW_S3_ENDPOINT_URL``), or
``synthetic``. A relative local path is relative to the folder the command was typed in
(:mod:`fowlflow.local_paths`; :func:`data_location` gives the absolute one). Archives are
unpacked into ``$FOWLFLOW_CACHE_DIR/extracted``, keyed by their content hash, under a temporary
name renamed only when complete, so a half-written extraction is never used. Archive members
that would land outside the target (zip-slip) or are links make the whole archive refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from fowlflow.errors import DataError
from fowlflow.local_paths import find_local
from fowlflow.trainer.downloads import (ZIP_ERRORS, cache_dir, clear_hint, cleanup_on_sigterm,
                                        download, key, locked, zip_problem)

log = logging.getLogger(__name__)

FIX = "Pass another source with -P data=<ImageFolder dir | .zip | http(s) .zip URL | s3://bucket/prefix | synthetic>."
ZIP_LAYOUT = ("Re-create the zip from inside the folder that holds train/ and val/ "
              "(cd <that folder> && zip -r ../data.zip train val), or unzip it and pass "
              "that folder with -P data=<folder>.")


class DamagedArchive(DataError):
    """A zip whose members can't be read back (bad CRC, cut-short data)."""


def resolve_data(uri: str) -> Path:
    """Return a local ImageFolder root (a folder with ``train/`` and ``val/``) for ``uri``.

    Raises:
        DataError: the source can't be reached, downloaded or unpacked; the message says why.
    """
    location = data_location(uri)
    # A SIGTERM while downloading or unpacking leaves no temporary file behind.
    with cleanup_on_sigterm():
        return _resolve(location)


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


def _resolve(uri: str) -> Path:
    if uri == "synthetic":
        from fowlflow.trainer.synthetic import ensure_synthetic

        return ensure_synthetic(cache_dir() / "synthetic-v1")
    if uri.startswith(("http://", "https://")):
        archive = download(uri)
        return zip_root(_extract_cached(archive, uri), uri)
    if uri.startswith("s3://"):
        return download_s3(uri)
    path = Path(uri)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(f"{str(path)!r} is a file but not a .zip archive. {FIX}")
        return zip_root(extract_zip(path, str(path)), str(path))
    return find_imagefolder_root(path)


def find_imagefolder_root(path: Path) -> Path:
    """The folder holding ``train/`` and ``val/``: ``path`` itself or its only sub-folder."""
    if (path / "train").is_dir() or (path / "val").is_dir():
        return path
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    if len(subdirs) == 1 and ((subdirs[0] / "train").is_dir() or (subdirs[0] / "val").is_dir()):
        return subdirs[0]
    # Let the layout check produce the precise message (missing train/ or val/).
    return path


def zip_root(extracted: Path, label: str) -> Path:
    """The ImageFolder inside an unpacked zip; errors name the zip (``label``), not the cache."""
    root = find_imagefolder_root(extracted)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    top = sorted(p.name for p in extracted.iterdir() if not p.name.startswith("__MACOSX"))[:10]
    deeper = sorted(p.parent for p in extracted.rglob("train") if (p.parent / "val").is_dir())
    where = (f"; train/ and val/ are in {deeper[0].relative_to(extracted).as_posix()}/ inside "
             "it, deeper than fowlflow looks") if deeper else ""
    raise DataError(f"{label} has no train/ and val/ folders at its top or inside its single top "
                    f"folder (its top holds {top}{where}). {ZIP_LAYOUT}")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_zip_members(zf: zipfile.ZipFile, label: str) -> None:
    """Refuse archives whose members are absolute, escape the target, or are links."""
    for info in zf.infolist():
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]) or is_link:
            kind = "is a symbolic link" if is_link else "would be written outside the target folder"
            raise DataError(f"Refusing to unpack {label}: member {name!r} {kind} "
                            "(a 'zip-slip' archive). Nothing was extracted; use a trusted archive.")


def extract_zip(archive: Path, label: str) -> Path:
    """Unpack ``archive`` once into a folder keyed by its content hash and return it.

    ``label`` is what the user gave (path, URL, s3 URI); messages name it.

    Raises:
        DamagedArchive: a member can't be read back (bad CRC, cut short); nothing is kept.
        DataError: not a zip, a zip-slip member, or no room to unpack.
    """
    digest = _file_sha256(archive)[:16]
    parent = cache_dir() / "extracted"
    target = parent / digest
    parent.mkdir(parents=True, exist_ok=True)
    with locked(f"extract-{digest}", f"unpacking of {label}"):
        if target.is_dir():
            return target
        for stale in parent.glob(f".extract-{digest}-*"):  # left by a killed process
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".extract-{digest}-", dir=parent))
        try:
            _unpack(archive, label, tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _unpack(archive: Path, label: str, dest: Path) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{label} is not a valid .zip archive ({exc}). {FIX}") from exc
    with zf:
        check_zip_members(zf, label)
        members = [m for m in zf.infolist() if not m.filename.startswith("__MACOSX/")]
        member = None
        try:
            for member in tqdm(members, desc=f"unpack {archive.name}", unit="file"):
                zf.extract(member, dest)
        except ZIP_ERRORS as exc:
            raise DamagedArchive(f"{label} is damaged: member {member.filename!r} can't be read "
                                 f"back ({exc}). Nothing was unpacked.") from exc
        except OSError as exc:
            raise DataError(f"Could not unpack {label} into {dest.parent}: {exc}. Free some "
                            "space there or set FOWLFLOW_CACHE_DIR to a folder on a larger "
                            "disk.") from exc


def _extract_cached(archive: Path, label: str) -> Path:
    """:func:`extract_zip` for an archive in the download cache: a damaged one is removed, so
    the next run fetches it again."""
    try:
        return extract_zip(archive, label)
    except DamagedArchive as exc:
        try:
            archive.unlink()
            done = f"The cached copy {archive} was removed; run again to download it afresh."
        except OSError:
            done = f"The cached copy is {archive}. {clear_hint(archive)}"
        raise DataError(f"{exc.message} {done}") from exc

def _s3_client():
    import boto3

    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    # A fresh session each time: boto3's default session caches the first credentials it saw.
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None)


def download_s3(uri: str) -> Path:
    """Mirror ``s3://bucket/prefix`` (a folder, or one .zip object) into the cache; return
    the ImageFolder root in it.

    Objects are re-downloaded only when their ETag changed. The mirror is rebuilt in a
    temporary folder and swapped in whole.
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise DataError(f"{uri!r} names no bucket; expected s3://bucket/prefix. {FIX}")
    target = cache_dir() / "s3" / key(uri)
    try:
        s3 = _s3_client()
        objects = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects += [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if not objects:
            raise DataError(f"No objects under {uri}. Check the bucket and prefix. {FIX}")
        if len(objects) == 1 and objects[0]["Key"].endswith(".zip"):
            obj = objects[0]
            zpath = target / "archive" / f"{obj['ETag'].strip(chr(34))}.zip"
            if not zpath.is_file():
                zpath.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=zpath.parent, prefix=".", suffix=".part")
                os.close(fd)
                part = Path(tmp)
                try:
                    s3.download_file(bucket, obj["Key"], str(part))
                    problem = zip_problem(part)
                    if problem is not None:
                        raise DataError(f"{uri} is unusable: {problem}. Nothing was cached; "
                                        f"replace the object. {FIX}")
                    os.replace(part, zpath)
                finally:
                    part.unlink(missing_ok=True)
            return zip_root(_extract_cached(zpath, uri), uri)
        manifest = target / "manifest.txt"
        wanted = "\n".join(f"{o['Key']} {o['ETag']}" for o in sorted(objects, key=lambda o: o["Key"]))
        mirror = target / "files"
        if mirror.is_dir() and manifest.is_file() and manifest.read_text() == wanted:
            return find_imagefolder_root(mirror)
        target.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".s3-", dir=target))
        try:
            base = PurePosixPath(prefix) if prefix and not prefix.endswith("/") else PurePosixPath(prefix or ".")
            for obj in tqdm(objects, desc=f"download {uri}", unit="file"):
                rel = PurePosixPath(obj["Key"]).relative_to(base) if prefix else PurePosixPath(obj["Key"])
                if ".." in rel.parts:
                    raise DataError(f"S3 key {obj['Key']!r} escapes {uri}; refusing it.")
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(dest))
            shutil.rmtree(mirror, ignore_errors=True)
            os.rename(tmp, mirror)
            manifest.write_text(wanted)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return find_imagefolder_root(mirror)
    except NoCredentialsError as exc:
        raise DataError(f"No AWS credentials to read {uri}. Set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE).") from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                    "InvalidToken", "ExpiredToken"):
            raise DataError(f"S3 refused the credentials for {uri} ({code}). Check "
                            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and "
                            "MLFLOW_S3_ENDPOINT_URL for a non-AWS server).") from exc
        if code in ("NoSuchBucket", "404"):
            raise DataError(f"S3 bucket {bucket!r} does not exist ({uri}). {FIX}") from exc
        raise DataError(f"S3 error reading {uri}: {code or exc}. {FIX}") from exc
    except BotoCoreError as exc:
        raise DataError(f"Could not reach S3 for {uri} ({exc}). Check MLFLOW_S3_ENDPOINT_URL "
                        f"and the network. {FIX}") from exc
