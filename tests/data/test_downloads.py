"""http(s) downloads against real local http servers that misbehave on purpose: HTML instead of
a zip, a zip cut short, a damaged cache, a trickle, SIGTERM/SIGKILL mid-download, two processes."""

from __future__ import annotations

import collections
import http.server
import io
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from fowlflow.errors import DataError
from fowlflow.data.sources import resolve_data
from tests.conftest import make_imagefolder

HTML = b"<!DOCTYPE html><html><body>Please sign in</body></html>"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("FOWLFLOW_CACHE_DIR", str(d))
    return d


@pytest.fixture(scope="module")
def zip_bytes(tmp_path_factory) -> bytes:
    """A small ImageFolder zip, stored uncompressed so a flipped byte fails only its CRC."""
    folder = make_imagefolder(tmp_path_factory.mktemp("src") / "imgs")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, f"fowl_data/{p.relative_to(folder)}")
    return buf.getvalue()


class Server:
    """A real ThreadingHTTPServer on 127.0.0.1; ``serve(path, fn)`` sets what ``fn(handler)``
    answers at ``path``; ``hits[path]`` counts the requests."""

    def __init__(self):
        routes, hits = {}, collections.Counter()
        self.routes, self.hits = routes, hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                hits[self.path] += 1
                routes[self.path](self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def serve(self, path: str, fn) -> str:
        self.routes[path] = fn
        return self.url(path)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def body(data: bytes, content_type: str = "application/zip", length: bool = True):
    """A handler answering ``data`` (without Content-Length: ended by closing, as HTTP/1.0)."""
    def answer(h):
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        if length:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return answer


def trickle(first: bytes, every: float, stop: threading.Event, then: bytes = b"x"):
    """Headers (a large Content-Length), ``first``, then one byte of ``then`` every ``every`` s
    until ``stop`` is set."""
    def answer(h):
        h.send_response(200)
        h.send_header("Content-Length", "10000000")
        h.end_headers()
        h.wfile.write(first)
        h.wfile.flush()
        while not stop.wait(every):
            h.wfile.write(then)
            h.wfile.flush()
    return answer


def downloads(cache: Path) -> list[Path]:
    folder = cache / "downloads"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_html_page_is_not_cached_and_the_next_run_asks_again(server, cache, zip_bytes):
    url = server.serve("/fowl_data.zip", body(HTML, "text/html"))
    with pytest.raises(DataError) as info:
        resolve_data(url)
    assert "HTML page" in str(info.value) and "Nothing was cached" in str(info.value)
    assert downloads(cache) == []
    server.serve("/fowl_data.zip", body(zip_bytes))  # the link is fixed on the server side
    assert (resolve_data(url).root / "train" / "ants").is_dir()
    assert server.hits["/fowl_data.zip"] == 2


def test_zip_cut_short_without_content_length_is_not_cached(server, cache, zip_bytes):
    url = server.serve("/fowl_data.zip", body(zip_bytes[: len(zip_bytes) // 2], length=False))
    with pytest.raises(DataError, match="not a complete .zip") as info:
        resolve_data(url)
    assert url in str(info.value)
    assert downloads(cache) == []
    server.serve("/fowl_data.zip", body(zip_bytes))
    assert (resolve_data(url).root / "val" / "bees").is_dir()
    assert server.hits["/fowl_data.zip"] == 2


def test_a_cached_file_that_is_no_zip_is_fetched_again(server, cache, zip_bytes, caplog):
    url = server.serve("/fowl_data.zip", body(zip_bytes))
    root = resolve_data(url).root
    (cached,) = downloads(cache)
    cached.write_bytes(HTML)  # e.g. cached by an older fowlflow, before downloads were checked
    assert resolve_data(url).root == root
    assert server.hits["/fowl_data.zip"] == 2
    assert cached.read_bytes() == zip_bytes
    assert f"The cached download {cached} is unusable" in caplog.text


def test_a_cached_zip_with_a_damaged_member_is_removed_and_named(server, cache, zip_bytes):
    url = server.serve("/fowl_data.zip", body(zip_bytes))
    resolve_data(url)
    (cached,) = downloads(cache)
    damaged = bytearray(zip_bytes)
    damaged[200] ^= 0xFF  # inside the first member's (stored) data: only its CRC notices
    cached.write_bytes(bytes(damaged))
    with pytest.raises(DataError) as info:
        resolve_data(url)
    message = str(info.value)
    assert "damaged" in message and "CRC" in message and url in message
    assert f"The cached copy {cached} was removed" in message
    assert not cached.exists()
    assert not [p for p in (cache / "extracted").iterdir() if p.name.startswith(".extract")]
    assert (resolve_data(url).root / "train").is_dir()  # the next run downloads it afresh
    assert server.hits["/fowl_data.zip"] == 2


def test_a_trickling_server_is_given_up_on(server, cache, monkeypatch):
    monkeypatch.setenv("FOWLFLOW_DOWNLOAD_TIMEOUT", "1")
    monkeypatch.setenv("FOWLFLOW_DOWNLOAD_MIN_RATE", "100")
    stop = threading.Event()
    url = server.serve("/fowl_data.zip", trickle(b"PK", 0.2, stop))
    start = time.monotonic()
    try:
        with pytest.raises(DataError, match="too slow") as info:
            resolve_data(url)
    finally:
        stop.set()
    # 5 bytes/s, each read well within the 1 s per-read timeout: only the rate check stops it.
    assert time.monotonic() - start < 6
    assert "FOWLFLOW_DOWNLOAD_MIN_RATE=100" in str(info.value)
    assert downloads(cache) == []


def test_a_stalled_server_times_out(server, cache, monkeypatch):
    monkeypatch.setenv("FOWLFLOW_DOWNLOAD_TIMEOUT", "1")
    stop = threading.Event()
    url = server.serve("/fowl_data.zip", trickle(b"PK", 30, stop))
    try:
        with pytest.raises(DataError, match="stalled: nothing arrived for 1 s after 2 bytes"):
            resolve_data(url)
    finally:
        stop.set()
    assert downloads(cache) == []


@pytest.mark.parametrize("value", ["abc", "-1", "0"])
def test_bad_timeout_setting_is_named(server, monkeypatch, value):
    from fowlflow.errors import ConfigError

    monkeypatch.setenv("FOWLFLOW_DOWNLOAD_TIMEOUT", value)
    with pytest.raises(ConfigError, match=f"FOWLFLOW_DOWNLOAD_TIMEOUT='{value}'"):
        resolve_data(server.url("/fowl_data.zip"))


def start_download(url: str, cache: Path, trainer: bool = False) -> subprocess.Popen:
    """A process resolving ``url``: plain (SIGTERM has its default action) or the trainer
    (which turns SIGTERM into an exception that ends its MLflow run)."""
    code = ("import logging, sys; from fowlflow.data.sources import resolve_data; "
            "logging.basicConfig(level=logging.INFO); print(resolve_data(sys.argv[1]).root)")
    argv = (["-m", "fowlflow.train", "--data", url, "--weights", "none",
             "--registered_model_name", ""] if trainer else ["-c", code, url])
    env = {**os.environ, "FOWLFLOW_CACHE_DIR": str(cache),
           "MLFLOW_TRACKING_URI": f"sqlite:///{cache.parent / 'mlflow.db'}"}
    return subprocess.Popen([sys.executable, *argv], cwd=cache.parent, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_part(cache: Path, proc: subprocess.Popen) -> Path:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        parts = [p for p in downloads(cache) if ".part" in p.name]
        if parts:
            return parts[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the download never started")


@pytest.mark.parametrize("trainer", [False, True], ids=["plain", "trainer"])
def test_sigterm_during_a_download_leaves_no_partial_file(server, cache, trainer):
    stop = threading.Event()
    url = server.serve("/fowl_data.zip", trickle(b"PK" * 5000, 0.1, stop))
    proc = start_download(url, cache, trainer)
    try:
        wait_for_part(cache, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        stop.set()
        proc.kill()
    # Still ends as stopped by SIGTERM: killed by it, or the trainer's exit code for it.
    assert proc.returncode == (128 + signal.SIGTERM if trainer else -signal.SIGTERM), err[-2000:]
    assert downloads(cache) == []


def test_a_part_file_left_by_a_killed_process_does_not_break_the_next_run(server, cache,
                                                                          zip_bytes):
    stop = threading.Event()
    url = server.serve("/fowl_data.zip", trickle(b"PK" * 5000, 0.1, stop))
    proc = start_download(url, cache)
    try:
        part = wait_for_part(cache, proc)
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait(timeout=30)
    finally:
        stop.set()
    assert part.exists()
    server.serve("/fowl_data.zip", body(zip_bytes))
    assert (resolve_data(url).root / "train").is_dir()
    assert [p.name for p in downloads(cache)] == ["fowl_data.zip"]


def test_two_processes_downloading_the_same_url_share_one_download(server, cache, zip_bytes):
    stderr = ["", ""]
    waiting = threading.Event()

    def half_then_wait(h):  # holds the download open until the other process waits for it
        h.send_response(200)
        h.send_header("Content-Length", str(len(zip_bytes)))
        h.end_headers()
        h.wfile.write(zip_bytes[:1000])
        h.wfile.flush()
        waiting.wait(timeout=60)
        h.wfile.write(zip_bytes[1000:])

    def read(i, proc):
        for line in proc.stderr:
            stderr[i] += line
            if "Waiting for another process's download" in line:
                waiting.set()

    url = server.serve("/fowl_data.zip", half_then_wait)
    procs = [start_download(url, cache) for _ in range(2)]
    readers = [threading.Thread(target=read, args=(i, p)) for i, p in enumerate(procs)]
    for t in readers:
        t.start()
    outs = [p.stdout.read() for p in procs]
    for p, t in zip(procs, readers):
        p.wait(timeout=120)
        t.join()
    assert [p.returncode for p in procs] == [0, 0], stderr
    assert waiting.is_set(), stderr  # they did overlap, and the second one waited
    roots = {out.strip().splitlines()[-1] for out in outs}
    assert len(roots) == 1 and (Path(roots.pop()) / "train" / "ants").is_dir()
    assert server.hits["/fowl_data.zip"] == 1
    assert [p.name for p in downloads(cache)] == ["fowl_data.zip"]


def test_a_zip_url_with_train_too_deep_is_named(server, cache, tmp_path):
    folder = make_imagefolder(tmp_path / "imgs")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.rglob("*.jpg")):
            zf.write(p, f"outer/inner/{p.relative_to(folder)}")
    url = server.serve("/nested.zip", body(buf.getvalue()))
    with pytest.raises(DataError) as info:
        resolve_data(url)
    message = str(info.value)
    assert message.startswith(f"{url} has no train/ and val/")
    assert "outer/inner/" in message and str(cache) not in message
