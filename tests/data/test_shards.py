"""``fowlflow data pack`` to a local folder and the reading contract (open_shards, iter_split)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fowlflow.data.imagefolder import scan_imagefolder
from fowlflow.data.pack import pack
from fowlflow.data.shards import INDEX_NAME, iter_split, open_shards, rank_shards
from fowlflow.data.sources import resolve_data
from fowlflow.errors import DataError
from fowlflow.tracking.run_tracker import _dataset_source
from tests.conftest import BIN, HYMENOPTERA, ROOT, make_imagefolder
from tests.docs_commands import python_blocks
from tests.test_docs_commands import documented


@pytest.fixture
def src(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "src", per_class=(6, 4))  # 12 train, 8 val


def files_of(root: Path, split: str) -> dict[str, tuple[bytes, int]]:
    """``{relative path: (bytes, label)}`` of an ImageFolder split (classes sorted)."""
    classes = sorted(p.name for p in (root / split).iterdir())
    return {p.relative_to(root).as_posix(): (p.read_bytes(), classes.index(p.parent.name))
            for p in sorted((root / split).rglob("*.jpg"))}


def test_pack_then_read_back_gives_the_files_bytes_labels_and_digest(src, tmp_path):
    index = pack(str(src), str(tmp_path / "shards"), shard_size=3, progress=False)
    again = open_shards(str(tmp_path / "shards"))
    assert again == index
    one = pack(str(src), str(tmp_path / "one-worker"), shard_size=3, workers=1, progress=False)
    assert one.shards == index.shards  # the same bytes (sha256) whatever the thread count
    assert index.classes == ["ants", "bees"]
    assert index.counts == {"train": 12, "val": 8}
    assert [len(index.shards[s]) for s in ("train", "val")] == [4, 3]
    layout = scan_imagefolder(src)  # the digests a run on the folder logs
    assert index.digest == layout.digest
    assert index.split_digests == {"train": layout.train_digest, "val": layout.val_digest}
    for split in ("train", "val"):
        got = {key: (data, label) for key, data, label in iter_split(index, split)}
        assert got == files_of(src, split)
    assert sorted(p.relative_to(tmp_path / "shards").as_posix()
                  for p in (tmp_path / "shards").rglob("*")
                  if p.is_file()) == sorted([INDEX_NAME] + [s.path for v in index.shards.values()
                                                             for s in v])


def test_ranks_get_disjoint_parts_whose_union_is_the_split_reshuffled_per_epoch(src, tmp_path):
    index = pack(str(src), str(tmp_path / "shards"), shard_size=2, progress=False)  # 6 shards
    everything = set(files_of(src, "train"))
    for world in (2, 3):
        for epoch in (0, 1):
            parts = [[k for k, _, _ in iter_split(index, "train", rank=r, world_size=world,
                                                  epoch=epoch)] for r in range(world)]
            keys = [k for part in parts for k in part]
            assert len(keys) == len(set(keys)) == 12 and set(keys) == everything
            assert sum(s.count for r in range(world)
                       for s in rank_shards(index, "train", rank=r, world_size=world,
                                            epoch=epoch)) == 12
    order = lambda **kw: [k for k, _, _ in iter_split(index, "train", **kw)]  # noqa: E731
    assert order(seed=0, epoch=1) == order(seed=0, epoch=1)
    assert order(seed=0, epoch=1) != order(seed=0, epoch=2)
    assert order(seed=1, epoch=1) != order(seed=0, epoch=1)
    with pytest.raises(DataError, match="fewer than the 7 readers"):
        next(iter_split(index, "train", rank=0, world_size=7))


def test_an_unreadable_image_is_reported_and_left_out(src, tmp_path, capsys):
    (src / "train" / "bees" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    index = pack(str(src), str(tmp_path / "shards"), shard_size=5, progress=False)
    assert index.counts["train"] == 12
    assert [s["path"] for s in index.skipped] == ["train/bees/broken.jpg"]
    assert index.skipped[0]["reason"].startswith("cannot decode")
    assert "train/bees/broken.jpg" not in {k for k, _, _ in iter_split(index, "train")}


def test_a_destination_with_shards_is_refused_unless_overwrite(src, tmp_path, monkeypatch):
    dest = tmp_path / "shards"
    pack(str(src), str(dest), shard_size=3, progress=False)
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    monkeypatch.chdir(tmp_path)
    refused = subprocess.run([str(BIN / "fowlflow"), "data", "pack", "src", "shards"],
                             capture_output=True, text=True)
    assert refused.returncode == 2
    assert "already holds shards" in refused.stderr and "--overwrite" in refused.stderr
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    index = pack(str(src), str(dest), shard_size=100, overwrite=True, progress=False)
    assert [len(v) for v in index.shards.values()] == [1, 1]
    assert sorted(p.name for p in (dest / "train").iterdir()) == ["shard-000000.tar"]


def test_a_failed_pack_leaves_nothing(src, tmp_path):
    for p in (src / "val" / "ants").iterdir():  # a class with no readable val image: refused
        p.write_bytes(b"garbage")
    dest = tmp_path / "new" / "shards"
    with pytest.raises(DataError, match="no readable image for class"):
        pack(str(src), str(dest), shard_size=3, progress=False)
    assert not (tmp_path / "new").exists()  # train shards were written, then removed
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        pack(str(src), str(tmp_path / "file"), progress=False)


def edit_index(dest: Path, change) -> None:
    doc = json.loads((dest / INDEX_NAME).read_text())
    change(doc)
    (dest / INDEX_NAME).write_text(json.dumps(doc))


@pytest.mark.parametrize("path", ["../../outside.tar", "/etc/passwd", "train/../val/x.tar",
                                  "val/shard-000000.tar"])
def test_an_index_with_paths_outside_its_split_is_refused(src, tmp_path, path):
    dest = tmp_path / "shards"
    pack(str(src), str(dest), shard_size=3, progress=False)
    edit_index(dest, lambda doc: doc["splits"]["train"]["shards"][0].update(path=path))
    with pytest.raises(DataError, match="only 'train/shard-NNNNNN.tar' inside"):
        open_shards(str(dest))


def test_a_shard_that_does_not_match_its_digest_is_refused_before_any_sample(src, tmp_path):
    dest = tmp_path / "shards"
    index = pack(str(src), str(dest), shard_size=100, progress=False)
    edit_index(dest, lambda doc: doc["splits"]["train"]["shards"][0].update(sha256="0" * 64))
    with pytest.raises(DataError, match="does not match its index"):
        next(iter_split(open_shards(str(dest)), "train"))
    shard = dest / index.shards["val"][0].path  # same size, one byte changed
    data = bytearray(shard.read_bytes())
    data[600] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="changed or damaged after packing"):
        next(iter_split(index, "val"))


def test_a_shard_linked_to_outside_the_folder_is_refused(src, tmp_path):
    dest = tmp_path / "shards"
    index = pack(str(src), str(dest), shard_size=100, progress=False)
    shard = dest / index.shards["train"][0].path
    outside = tmp_path / "outside.tar"
    os.replace(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(DataError, match="outside"):
        next(iter_split(index, "train"))


def test_data_param_recognizes_a_shard_folder(src, tmp_path):
    dest = tmp_path / "shards"
    pack(str(src), str(dest), shard_size=3, progress=False)
    with pytest.raises(DataError, match=f"holds shards written by 'fowlflow data pack'.*"
                                        f"packed from \\({src}\\)"):
        resolve_data(str(dest))  # a command that can't stream shards says so
    source = resolve_data(str(dest), allow_shards=True)
    assert (source.kind, source.root, source.uri, source.name) == ("shards", dest, str(dest),
                                                                   "shards")
    assert not source.is_remote
    assert _dataset_source(source).to_dict() == {"uri": str(dest)}  # what tracking logs
    assert resolve_data(str(src), allow_shards=True).kind == "folder"  # no index: as before


def test_documented_pack_of_hymenoptera(tmp_path):
    """docs/data.md's commands on a copy of the shared hymenoptera set, run in a folder that
    holds it as ``hymenoptera_data``."""
    (tmp_path / "hymenoptera_data").symlink_to(HYMENOPTERA)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    run = lambda cmd: subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env,  # noqa: E731
                                     capture_output=True, text=True)
    done = run(documented("fowlflow data pack hymenoptera_data hymenoptera-shards "
                          "--shard-size 100"))
    assert done.returncode == 0, done.stderr
    assert "Packed 244 train and 153 val images (3 + 2 shards" in done.stdout
    assert "1 file(s) left out" in done.stdout  # the set's one .gif
    index = open_shards(str(tmp_path / "hymenoptera-shards"))
    assert index.digest == scan_imagefolder(HYMENOPTERA).digest
    helped = run(documented("fowlflow data pack --help"))
    assert helped.returncode == 0 and "--shard-size N" in helped.stdout
    snippet = {b.heading: b.commands[0].text for b in python_blocks(ROOT / "docs" / "data.md")}
    read = subprocess.run([str(BIN / "python"), "-c", snippet["Reading shards"]], cwd=tmp_path,
                          capture_output=True, text=True)  # the docs' Python, as written
    assert read.returncode == 0, read.stderr
    assert read.stdout.startswith("['ants', 'bees'] {'train': 244, 'val': 153} ")


def test_sigterm_while_packing_leaves_nothing(tmp_path):
    """A pack stopped by SIGTERM once its first shard is in place removes it on the way out."""
    (tmp_path / "hymenoptera_data").symlink_to(HYMENOPTERA)
    dest = tmp_path / "out" / "shards"
    proc = subprocess.Popen([str(BIN / "fowlflow"), "data", "pack", "hymenoptera_data",
                             str(dest), "--shard-size", "10", "--workers", "1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (dest / "train" / "shard-000001.tar").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.communicate()
    assert not (tmp_path / "out").exists()


def test_a_destination_inside_the_source_is_refused(src):
    with pytest.raises(DataError, match="inside the source ImageFolder"):
        pack(str(src), str(src / "shards"), progress=False)
    assert not (src / "shards").exists()


def test_the_registry_checks_a_model_trained_on_shards_on_their_val_split(src, tmp_path):
    """``-e register`` without ``val_dir`` (and a sweep's best trial) for a model whose
    ``data_uri`` is a shard set: the val split written out, the same bytes per class, removed
    after."""
    from fowlflow.registry.register import training_val_dir

    dest = tmp_path / "shards"
    pack(str(src), str(dest), shard_size=3, progress=False)
    with training_val_dir({"data_uri": str(dest)}, "runs:/x/model") as val:
        written = {(p.parent.name, p.read_bytes()) for p in val.rglob("*") if p.is_file()}
        assert val.is_dir() and val != dest / "val"
    assert written == {(Path(key).parent.name, data)
                       for key, (data, _label) in files_of(src, "val").items()}
    assert not val.exists()  # a temporary folder, gone after the check
