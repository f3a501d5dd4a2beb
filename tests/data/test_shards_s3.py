"""``fowlflow data pack`` to S3 and streaming the shards back, against a real SeaweedFS S3 server
(the ``s3`` fixture of tests/data/conftest.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fowlflow.data.imagefolder import scan_imagefolder
from fowlflow.data.pack import pack
from fowlflow.data.shards import INDEX_NAME, iter_split, open_shards
from fowlflow.data.sources import resolve_data
from fowlflow.errors import DataError
from fowlflow.tracking.run_tracker import _dataset_source
from tests.conftest import BIN, HYMENOPTERA, make_imagefolder
from tests.data.test_shards import files_of
from tests.test_docs_commands import documented


def keys_under(s3, prefix: str) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket="data", Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


@pytest.fixture
def src(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "src", per_class=(6, 4))  # 12 train, 8 val


def test_pack_to_s3_then_stream_each_rank_its_part(s3, s3_env, src):
    index = pack(str(src), "s3://data/sets/fowl/", shard_size=3, progress=False)
    assert index.location == "s3://data/sets/fowl"
    assert keys_under(s3, "sets/fowl/") == sorted(
        [f"sets/fowl/{INDEX_NAME}"] + [f"sets/fowl/{s.path}" for v in index.shards.values()
                                       for s in v])
    assert open_shards("s3://data/sets/fowl") == index
    assert index.digest == scan_imagefolder(src).digest
    for split in ("train", "val"):
        got = {k: (data, label) for k, data, label in iter_split(index, split)}
        assert got == files_of(src, split)
    parts = [{k for k, _, _ in iter_split(index, "train", rank=r, world_size=2, epoch=4)}
             for r in (0, 1)]
    assert not parts[0] & parts[1] and parts[0] | parts[1] == set(files_of(src, "train"))
    with pytest.raises(DataError, match="holds shards written by 'fowlflow data pack'"):
        resolve_data("s3://data/sets/fowl")
    source = resolve_data("s3://data/sets/fowl", allow_shards=True)
    assert (source.kind, source.uri, source.is_remote) == ("shards", "s3://data/sets/fowl", True)
    assert (source.root / INDEX_NAME).is_file() and source.root.is_relative_to(s3_env)
    assert _dataset_source(source).to_dict() == {"uri": "s3://data/sets/fowl"}  # tracking's


def test_a_changed_s3_shard_is_refused(s3, s3_env, src, tmp_path):
    index = pack(str(src), "s3://data/sets/changed", shard_size=100, progress=False)
    other = make_imagefolder(tmp_path / "other", per_class=(7, 4))
    pack(str(other), "s3://data/sets/other", shard_size=100, progress=False)
    s3.client().copy_object(Bucket="data", Key="sets/changed/train/shard-000000.tar",
                            CopySource={"Bucket": "data",
                                        "Key": "sets/other/train/shard-000000.tar"})
    with pytest.raises(DataError, match="does not match its index"):
        next(iter_split(index, "train"))


def test_a_destination_with_shards_is_refused_unless_overwrite(s3, s3_env, src):
    pack(str(src), "s3://data/sets/twice", shard_size=3, progress=False)
    before = keys_under(s3, "sets/twice/")
    with pytest.raises(DataError, match="already holds shards"):
        pack(str(src), "s3://data/sets/twice", shard_size=100, progress=False)
    assert keys_under(s3, "sets/twice/") == before
    pack(str(src), "s3://data/sets/twice", shard_size=100, overwrite=True, progress=False)
    assert keys_under(s3, "sets/twice/") == [f"sets/twice/{INDEX_NAME}",
                                             "sets/twice/train/shard-000000.tar",
                                             "sets/twice/val/shard-000000.tar"]


def test_a_failure_after_uploads_removes_them(s3, s3_env, src):
    for p in (src / "val" / "bees").iterdir():  # refused once the train shards are uploaded
        p.write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable image for class"):
        pack(str(src), "s3://data/sets/failed", shard_size=3, progress=False)
    assert keys_under(s3, "sets/failed") == []


@pytest.mark.parametrize("env, bucket, error", [
    ({"AWS_SECRET_ACCESS_KEY": "wrong-secret"}, "data",
     "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"),
    ({"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
      "AWS_MAX_ATTEMPTS": "1"}, "data", "Could not reach S3"),
    ({}, "no-such-bucket", "bucket 'no-such-bucket' does not exist"),
])
def test_a_bad_destination_is_named_and_left_empty(s3, s3_env, src, monkeypatch, env, bucket,
                                                   error):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DataError, match=error):
        pack(str(src), f"s3://{bucket}/sets/bad", progress=False)
    assert keys_under(s3, "sets/bad") == []


def test_documented_pack_of_hymenoptera_to_s3(s3, s3_env, tmp_path):
    """docs/data.md's S3 command, with the test server's credentials and endpoint in the
    environment as a reader would have them."""
    (tmp_path / "hymenoptera_data").symlink_to(HYMENOPTERA)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", documented(
        "fowlflow data pack hymenoptera_data s3://data/hymenoptera-shards")], cwd=tmp_path,
        env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Packed 244 train and 153 val images (1 + 1 shards" in done.stdout
    index = open_shards("s3://data/hymenoptera-shards")
    assert sum(1 for _ in iter_split(index, "val")) == 153


def test_pack_reads_an_s3_imagefolder_and_an_s3_zip(s3, s3_env, tmp_path):
    """The fixture's bucket holds the same 20 images as a folder (fowl/) and as one .zip."""
    from_folder = pack("s3://data/fowl", "s3://data/sets/from-folder", progress=False)
    from_zip = pack("s3://data/zipped/fowl_data.zip", str(tmp_path / "from-zip"), progress=False)
    assert from_folder.counts == from_zip.counts == {"train": 12, "val": 8}
    assert from_folder.digest == from_zip.digest  # same relative paths and bytes
    assert from_folder.source == "s3://data/fowl"
    assert ({k: d for k, d, _ in iter_split(from_folder, "val")}
            == {k: d for k, d, _ in iter_split(from_zip, "val")})
