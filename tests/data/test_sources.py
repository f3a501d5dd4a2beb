"""Data sources: local folders and zips, http(s) downloads (a real local http.server), bad input."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

from fowlflow.data.sources import DataSource, resolve_data
from fowlflow.errors import DataError
from tests.conftest import BIN, ROOT, TINY_PARAMS, make_imagefolder
from tests.net import free_port


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("FOWLFLOW_CACHE_DIR", str(d))
    return d


def zip_folder(folder: Path, archive: Path, top: str = "fowl_data") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, f"{top}/{p.relative_to(folder)}")
    return archive


@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP server (stdlib http.server) serving a folder on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_local_folder_is_used_in_place(tmp_path):
    folder = make_imagefolder(tmp_path / "imgs")
    assert resolve_data(str(folder)).root == folder


def test_the_record_names_root_uri_kind_and_name(tmp_path, http_dir, monkeypatch):
    """What tracking and the registry use instead of parsing the value again."""
    folder = make_imagefolder(tmp_path / "my photos")
    monkeypatch.chdir(tmp_path)
    assert resolve_data("my photos/") == DataSource(root=folder, uri=str(folder), kind="folder",
                                                    name="my photos")
    archive = zip_folder(folder, tmp_path / "fowl.zip")
    local = resolve_data("fowl.zip")
    assert (local.uri, local.kind, local.name, local.root.name) == (
        str(archive), "zip", "fowl", "fowl_data")
    www, base = http_dir
    zip_folder(folder, www / "fowl_data.zip")
    remote = resolve_data(f"{base}/fowl_data.zip")
    assert (remote.uri, remote.kind, remote.name, remote.is_remote) == (
        f"{base}/fowl_data.zip", "http", "fowl_data", True)
    synthetic = resolve_data("synthetic")
    assert (synthetic.uri, synthetic.kind, synthetic.name) == ("synthetic", "synthetic",
                                                               "synthetic")
    assert not local.is_remote and synthetic.is_remote


def test_local_zip_with_a_top_folder_is_unpacked_once(tmp_path, cache):
    archive = zip_folder(make_imagefolder(tmp_path / "imgs"), tmp_path / "fowl.zip")
    root = resolve_data(str(archive)).root
    assert root.name == "fowl_data" and (root / "train" / "ants").is_dir()
    assert resolve_data(str(archive)).root == root  # keyed by content hash: no second extraction
    assert len(list((cache / "extracted").iterdir())) == 1


@pytest.mark.parametrize("member", ["../escape.txt", "/abs/escape.txt", "a/../../escape.txt"])
def test_zip_slip_archive_is_refused_and_nothing_written(tmp_path, cache, member):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fowl_data/train/a/ok.txt", "fine")
        zf.writestr(member, "pwned")
    with pytest.raises(DataError, match="zip-slip"):
        resolve_data(str(archive))
    assert not list((cache / "extracted").iterdir())  # no half-extracted folder left
    assert not (tmp_path / "escape.txt").exists() and not (cache / "escape.txt").exists()


def test_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("fowl_data/train/a/link.jpg")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="symbolic link"):
        resolve_data(str(archive))


def test_http_zip_is_downloaded_once_then_served_from_cache(tmp_path, http_dir, cache):
    www, base = http_dir
    zip_folder(make_imagefolder(tmp_path / "imgs"), www / "fowl_data.zip")
    root = resolve_data(f"{base}/fowl_data.zip").root
    assert (root / "val" / "bees").is_dir()
    (www / "fowl_data.zip").unlink()  # the server can no longer provide it
    assert resolve_data(f"{base}/fowl_data.zip").root == root
    assert not list(cache.rglob("*.part*"))


class _Truncating(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"PK" + b"x" * 1000)  # then the connection closes early

    def log_message(self, *args):
        pass


def test_truncated_download_is_never_used(cache):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Truncating)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DataError) as info:
            resolve_data(f"http://127.0.0.1:{server.server_address[1]}/fowl_data.zip")
    finally:
        server.shutdown()
        server.server_close()
    assert "fowl_data.zip" in str(info.value)
    downloads = list((cache / "downloads").rglob("*")) if (cache / "downloads").exists() else []
    assert not [p for p in downloads if p.is_file()]  # no partial file kept under any name


def test_unreachable_url_names_it_and_the_fix():
    url = f"http://127.0.0.1:{free_port()}/fowl_data.zip"  # nothing listens there
    with pytest.raises(DataError) as info:
        resolve_data(url)
    assert url in str(info.value) and "-P data=" in str(info.value)


def test_http_404_is_a_clear_error(http_dir):
    _, base = http_dir
    with pytest.raises(DataError, match="HTTP 404"):
        resolve_data(f"{base}/missing.zip")


@pytest.mark.parametrize("uri,message", [
    ("/no/such/folder", "does not exist"),
    ("ftp://host/x.zip", "Unsupported data URI scheme"),
    ("", "empty"),
])
def test_bad_uris(uri, message):
    with pytest.raises(DataError, match=message):
        resolve_data(uri)


def test_a_file_that_is_not_a_zip(tmp_path):
    f = tmp_path / "data.tar"
    f.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a .zip"):
        resolve_data(str(f))


def test_synthetic_set_is_generated_once(cache):
    root = resolve_data("synthetic").root
    files = sorted(p for p in root.rglob("*.png"))
    assert len(files) == 144 and {p.parent.name for p in files} == {"circles", "squares"}
    mtime = files[0].stat().st_mtime
    assert resolve_data("synthetic").root == root and files[0].stat().st_mtime == mtime


def test_copying_hymenoptera_is_not_needed():
    """The shared set is read in place (and has the original's quirks)."""
    from tests.conftest import HYMENOPTERA

    assert resolve_data(str(HYMENOPTERA)).root == HYMENOPTERA
    assert (HYMENOPTERA / "train" / "ants" / "imageNotFound.gif").exists()


def stored_zip(folder: Path, archive: Path, top: str) -> Path:
    """Zip ``folder`` under ``top``/ without compression, so a flipped byte fails only a CRC."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(folder.rglob("*.jpg")):
            zf.write(p, f"{top}/{p.relative_to(folder)}")
    return archive


def test_zip_with_a_damaged_member_is_a_clear_error(tmp_path, cache):
    archive = stored_zip(make_imagefolder(tmp_path / "imgs"), tmp_path / "fowl.zip", "fowl_data")
    data = bytearray(archive.read_bytes())
    data[200] ^= 0xFF  # inside the first member's data
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        resolve_data(str(archive))
    message = str(info.value)
    assert message.startswith(f"{archive} is damaged: member 'fowl_data/train/ants/ants_0.jpg'")
    assert "CRC" in message and "Nothing was unpacked" in message
    assert not list((cache / "extracted").iterdir())  # no half-unpacked folder


def test_zip_with_train_two_levels_down_names_the_zip(tmp_path, cache):
    archive = stored_zip(make_imagefolder(tmp_path / "imgs"), tmp_path / "photos.zip", "a/b")
    with pytest.raises(DataError) as info:
        resolve_data(str(archive))
    message = str(info.value)
    assert message.startswith(f"{archive} has no train/ and val/ folders")
    assert "its top holds ['a']" in message and "are in a/b/ inside it" in message
    assert str(cache) not in message and "zip -r" in message


def test_relative_paths_prefer_the_callers_folder(tmp_path, caplog):
    from fowlflow.local_paths import local_path

    user, project = tmp_path / "user", tmp_path / "project"
    for base in (user, project):
        (base / "imgs").mkdir(parents=True)
    (project / "only_here").mkdir()
    assert local_path("imgs", project, user) == user / "imgs"
    assert local_path("imgs", project, None) == project / "imgs"  # not under mlflow run
    assert local_path("only_here", project, user) == project / "only_here"
    assert f"is not in {user}" in caplog.text
    with pytest.raises(DataError) as info:
        local_path("missing/dir", project, user, "Data path", DataError)
    assert f"{user}/missing/dir nor {project}/missing/dir" in str(info.value)


def test_the_callers_folder_comes_from_the_torchrun_backends_variable(tmp_path):
    """A process with no `mlflow run` above it (under -b torchrun's supervisor) reads the
    folder from FOWLFLOW_CALLER_DIR; without it, its own folder is the user's."""
    from fowlflow.local_paths import CALLER_DIR_ENV

    user = tmp_path / "user"
    make_imagefolder(user / "rel" / "imgs")
    code = ("from fowlflow.data.sources import data_location; "
            "print(data_location('rel/imgs'))")
    env = {**os.environ, CALLER_DIR_ENV: str(user)}
    out = subprocess.run([str(BIN / "python"), "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.stdout.strip() == str(user / "rel" / "imgs"), out.stderr[-2000:]
    env.pop(CALLER_DIR_ENV)
    out = subprocess.run([str(BIN / "python"), "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert f"not found as {ROOT}/rel/imgs." in out.stderr


def run_mlflow_from(cwd: Path, params: dict) -> subprocess.CompletedProcess:
    """The real ``mlflow run <this project> --env-manager local`` typed in ``cwd``."""
    cmd = [str(BIN / "mlflow"), "run", str(ROOT), "--env-manager", "local",
           "--experiment-name", "rel"]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PWD": str(cwd)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_mlflow_run_reads_a_relative_data_path_from_where_it_was_typed(tracking_uri, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    user = tmp_path / "user"
    make_imagefolder(user / "rel" / "imgs")
    proc = run_mlflow_from(user, {**TINY_PARAMS, "data": "rel/imgs",
                                  "output_dir": tmp_path / "out"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rel").experiment_id])
    assert run.data.tags["data_root"] == str(user / "rel" / "imgs")
    # the model records where its data is, so `register` finds it from any folder
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
    assert info.metadata["data_uri"] == str(user / "rel" / "imgs")

    proc = run_mlflow_from(user, {**TINY_PARAMS, "data": "no/such/dir",
                                  "output_dir": tmp_path / "out"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (f"fowlflow: error: Data path 'no/such/dir' does not exist: not found as "
            f"{user}/no/such/dir nor {ROOT}/no/such/dir") in proc.stderr
