"""Mirror an ``s3://bucket/prefix`` data source into the cache: a folder of images, or one ``.zip``.

    root = download_s3("s3://bucket/fowl")   # the ImageFolder root inside the cache
    bucket, prefix = split_s3_uri("s3://bucket/fowl")
    with s3_errors("s3://bucket/fowl", "write"):   # boto3 errors -> DataError with the fix
        s3_client().upload_file("a.tar", bucket, f"{prefix}/a.tar")

boto3 reads the standard AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``) and ``MLFLOW_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, which boto3 reads itself) for a non-AWS server.
Objects are downloaded again only when their ETag changed; a folder mirror is rebuilt in a
temporary folder and swapped in whole, and a ``.zip`` object is checked before it is cached.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from fowlflow.data.archives import FIX, extract_cached, find_imagefolder_root, zip_root
from fowlflow.data.downloads import cache_dir, key, zip_problem
from fowlflow.errors import DataError


# The variables an S3 client depends on: a client is reused while they and the process stay.
_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
               "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS", "MLFLOW_S3_ENDPOINT_URL",
               "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def s3_client():
    """A boto3 S3 client: ``MLFLOW_S3_ENDPOINT_URL`` as its endpoint if set, else boto3's own
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` handling. One per process and set of AWS
    variables (making one takes ~0.5 s; a forked DataLoader worker makes its own)."""
    return _client(os.getpid(), tuple(os.environ.get(k) for k in _CLIENT_ENV))


@functools.lru_cache(maxsize=8)
def _client(pid: int, env: tuple):
    import boto3

    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    # A new session, not boto3's default one, which keeps the first credentials it saw.
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``.

    Raises:
        DataError: the URI names no bucket.
    """
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise DataError(f"{uri!r} names no bucket; expected s3://bucket/prefix. {FIX}")
    return bucket, prefix.strip("/")


@contextmanager
def s3_errors(uri: str, action: str = "read") -> Iterator[None]:
    """Turn boto3's errors inside the block into a :class:`DataError` that names the cause
    (no or refused credentials, no bucket, S3 unreachable) and the fix; ``action`` is
    ``read`` or ``write``."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError as exc:
        raise DataError(f"No AWS credentials to {action} {uri}. Set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE).") from exc
    except ClientError as exc:
        raise _client_error(exc, uri, split_s3_uri(uri)[0], action) from exc
    except BotoCoreError as exc:
        raise DataError(f"Could not reach S3 to {action} {uri} ({exc}). Check "
                        f"MLFLOW_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and the network. "
                        f"{FIX}") from exc


def download_s3(uri: str) -> Path:
    """Mirror ``s3://bucket/prefix`` (a folder, or one .zip object) into the cache; return
    the ImageFolder root in it.

    Raises:
        DataError: no bucket, nothing under the prefix, no or refused credentials, S3
            unreachable, or an unusable ``.zip`` object; the message says which.
    """
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    split_s3_uri(uri)  # names no bucket: refused
    target = cache_dir() / "s3" / key(uri)
    with s3_errors(uri):
        s3 = s3_client()
        objects = list_objects(s3, bucket, prefix)
        if not objects:
            raise DataError(f"No objects under {uri}. Check the bucket and prefix. {FIX}")
        if len(objects) == 1 and objects[0]["Key"].endswith(".zip"):
            return _mirror_zip(s3, bucket, objects[0], target, uri)
        return _mirror_folder(s3, bucket, prefix, objects, target, uri)


def list_objects(s3, bucket: str, prefix: str) -> list[dict]:
    """Every object (not folder marker) under ``prefix``."""
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects += [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    return objects


def _mirror_zip(s3, bucket: str, obj: dict, target: Path, uri: str) -> Path:
    """One ``.zip`` object: cached under its ETag once it reads as a sound zip, then unpacked."""
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
    return zip_root(extract_cached(zpath, uri), uri)


def _mirror_folder(s3, bucket: str, prefix: str, objects: list[dict], target: Path,
                   uri: str) -> Path:
    """A folder of objects: downloaded again, into a new mirror, only when an ETag changed."""
    manifest = target / "manifest.txt"
    wanted = "\n".join(f"{o['Key']} {o['ETag']}" for o in sorted(objects, key=lambda o: o["Key"]))
    mirror = target / "files"
    if mirror.is_dir() and manifest.is_file() and manifest.read_text() == wanted:
        return find_imagefolder_root(mirror)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".s3-", dir=target))
    try:
        base = PurePosixPath(prefix or ".")
        for obj in tqdm(objects, desc=f"download {uri}", unit="file"):
            key_path = PurePosixPath(obj["Key"])
            rel = key_path.relative_to(base) if prefix else key_path
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


def _client_error(exc, uri: str, bucket: str, action: str) -> DataError:
    """The DataError for an S3 ``ClientError``: refused credentials, no bucket, or other."""
    code = exc.response.get("Error", {}).get("Code", "")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                "InvalidToken", "ExpiredToken"):
        return DataError(f"S3 refused the credentials for {uri} ({code}). Check "
                         "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and "
                         "MLFLOW_S3_ENDPOINT_URL for a non-AWS server).")
    if code in ("NoSuchBucket", "404"):
        return DataError(f"S3 bucket {bucket!r} does not exist ({uri}). {FIX}")
    return DataError(f"S3 error ({action}) at {uri}: {code or exc}. {FIX}")
