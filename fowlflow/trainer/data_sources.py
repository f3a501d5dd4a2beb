"""Turn the ``data`` parameter (a URI) into a local ImageFolder directory.

    root = resolve_data("s3://bucket/fowl")          # -> Path with train/ and val/
    root = resolve_data("https://host/fowl_data.zip") # downloaded once, cached
    root = resolve_data("synthetic")                 # a generated two-class set

Sources: a local ImageFolder directory, a local ``.zip``, an ``http(s)://`` ``.zip``, an
``s3://bucket/prefix`` (a folder of images or one ``.zip`` object; boto3 with the standard AWS
variables and ``MLFLOW_S3_ENDPOINT_URL``), or ``synthetic``. Downloads go to
``$FOWLFLOW_CACHE_DIR`` (default ``~/.cache/fowlflow``), keyed by URL, and archives are unpacked
into a folder keyed by their content hash; both are written under a temporary name and renamed
only when complete, so a half-written download or extraction is never used. Archive members
that would land outside the target (zip-slip) or are links make the whole archive refused.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from fowlflow.errors import DataError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
FIX = "Pass another source with -P data=<ImageFolder dir | .zip | http(s) .zip URL | s3://bucket/prefix | synthetic>."


def cache_dir() -> Path:
    """Where downloads and extracted archives are kept."""
    root = Path(os.environ.get("FOWLFLOW_CACHE_DIR", Path.home() / ".cache" / "fowlflow"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve_data(uri: str) -> Path:
    """Return a local ImageFolder root (a folder with ``train/`` and ``val/``) for ``uri``.

    Raises:
        DataError: the source can't be reached, downloaded or unpacked; the message says why.
    """
    uri = uri.strip()
    if not uri:
        raise DataError(f"-P data is empty. {FIX}")
    if uri == "synthetic":
        from fowlflow.trainer.synthetic import ensure_synthetic

        return ensure_synthetic(cache_dir() / "synthetic-v1")
    if uri.startswith(("http://", "https://")):
        return find_imagefolder_root(extract_zip(download_http(uri)))
    if uri.startswith("s3://"):
        return find_imagefolder_root(download_s3(uri))
    if "://" in uri and not uri.startswith("file://"):
        raise DataError(f"Unsupported data URI scheme in {uri!r}. {FIX}")
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.exists():
        raise DataError(f"Data path {str(path)!r} does not exist. {FIX}")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(f"{str(path)!r} is a file but not a .zip archive. {FIX}")
        return find_imagefolder_root(extract_zip(path))
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


def download_http(url: str) -> Path:
    """Download ``url`` once into the cache (with a progress bar) and return the file."""
    name = PurePosixPath(urllib.parse.urlparse(url).path).name or "download"
    target = cache_dir() / "downloads" / _key(url) / name
    if target.is_file():
        log.info("Using cached download of %s: %s", url, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}") as bar:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        if total is not None and part.stat().st_size != total:
            raise DataError(f"Download of {url} stopped after {part.stat().st_size} of {total} "
                            "bytes. Try again, or download it yourself and pass -P data=<file>.")
        os.replace(part, target)
    except urllib.error.HTTPError as exc:
        raise DataError(f"Could not download {url}: HTTP {exc.code} {exc.reason}. {FIX}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        if isinstance(exc, DataError):
            raise
        reason = getattr(exc, "reason", exc)
        raise DataError(f"Could not reach {url} ({reason}). Without network access, pass a "
                        f"local copy. {FIX}") from exc
    finally:
        part.unlink(missing_ok=True)
    return target


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_zip_members(zf: zipfile.ZipFile, archive: Path) -> None:
    """Refuse archives whose members are absolute, escape the target, or are links."""
    for info in zf.infolist():
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]) or is_link:
            kind = "is a symbolic link" if is_link else "would be written outside the target folder"
            raise DataError(f"Refusing to unpack {archive}: member {name!r} {kind} "
                            "(a 'zip-slip' archive). Nothing was extracted; use a trusted archive.")


def extract_zip(archive: Path) -> Path:
    """Unpack ``archive`` once into a folder keyed by its content hash and return it."""
    target = cache_dir() / "extracted" / _file_sha256(archive)[:16]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        try:
            zf = zipfile.ZipFile(archive)
        except zipfile.BadZipFile as exc:
            raise DataError(f"{archive} is not a valid .zip archive ({exc}). {FIX}") from exc
        with zf:
            check_zip_members(zf, archive)
            members = [m for m in zf.infolist() if not m.filename.startswith("__MACOSX/")]
            for m in tqdm(members, desc=f"unpack {archive.name}", unit="file"):
                zf.extract(m, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same extraction first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _s3_client():
    import boto3

    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    # A fresh session each time: boto3's default session caches the first credentials it saw.
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None)


def download_s3(uri: str) -> Path:
    """Mirror ``s3://bucket/prefix`` (a folder, or one .zip object) into the cache.

    Objects are re-downloaded only when their ETag changed. The mirror is rebuilt in a
    temporary folder and swapped in whole.
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise DataError(f"{uri!r} names no bucket; expected s3://bucket/prefix. {FIX}")
    target = cache_dir() / "s3" / _key(uri)
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
                part = zpath.with_suffix(f".part{os.getpid()}")
                try:
                    s3.download_file(bucket, obj["Key"], str(part))
                    os.replace(part, zpath)
                finally:
                    part.unlink(missing_ok=True)
            return extract_zip(zpath)
        manifest = target / "manifest.txt"
        wanted = "\n".join(f"{o['Key']} {o['ETag']}" for o in sorted(objects, key=lambda o: o["Key"]))
        mirror = target / "files"
        if mirror.is_dir() and manifest.is_file() and manifest.read_text() == wanted:
            return mirror
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
        return mirror
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
