"""Fetch an http(s) ``.zip`` into the download cache, whole and checked, or not at all.

    path = download("https://host/fowl_data.zip")   # cache_dir()/downloads/<url key>/fowl_data.zip

Only a file that arrived whole (``Content-Length`` matched when sent) and reads as a sound zip
(every member's CRC checked) is renamed into the cache; a cached file that no longer reads as
a zip is removed and fetched again. One process at a time downloads a URL (a lock in the
cache's ``locks/``); the others wait and then use its result. Partial files have unique names
and are removed on errors, on SIGTERM (:func:`fowlflow.stopping.sigterm_unwinds`), and, when
left by a killed process, by the next download.

Stalls are bounded by two environment variables: ``FOWLFLOW_DOWNLOAD_TIMEOUT`` (seconds,
default 30: to connect, and with no byte received) and ``FOWLFLOW_DOWNLOAD_MIN_RATE`` (bytes/s,
default 10000, ``0`` turns it off: a download slower than this over any such period stops).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import filelock
from tqdm import tqdm

from fowlflow.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# What reading a damaged archive can raise besides BadZipFile (bad deflate data, cut short,
# unsupported compression, encrypted).
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)


def cache_dir() -> Path:
    """Where downloads and unpacked archives are kept: $FOWLFLOW_CACHE_DIR or ~/.cache/fowlflow."""
    root = Path(os.environ.get("FOWLFLOW_CACHE_DIR", Path.home() / ".cache" / "fowlflow"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"Can't create the cache folder {root} ({exc}). Set FOWLFLOW_CACHE_DIR "
                        "to a writable folder.") from exc
    return root


def key(text: str) -> str:
    """A short stable folder name for ``text`` (a URL, a URI)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def clear_hint(path: Path) -> str:
    """How to get rid of a cached item, for error messages."""
    return (f"To clear it: rm -r '{path}' (or set FOWLFLOW_CACHE_DIR to another folder; "
            f"the cache is {cache_dir()}).")


def _setting(name: str, default: float, minimum: float) -> float:
    text = os.environ.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        value = minimum - 1
    if not value >= minimum:  # also catches nan
        raise ConfigError(f"{name}={text!r} is not a number >= {minimum:g}; unset it for the "
                          f"default ({default:g}) or set e.g. {name}={default:g}.")
    return value


@contextlib.contextmanager
def locked(name: str, what: str):
    """Hold the inter-process lock ``name`` (a file in the cache's ``locks/``) for the block;
    says so if it has to wait."""
    folder = cache_dir() / "locks"
    folder.mkdir(exist_ok=True)
    lock = filelock.FileLock(folder / f"{name}.lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("Waiting for another process's %s (lock %s)", what, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def zip_problem(path: Path, thorough: bool = True) -> str | None:
    """Why ``path`` is not a sound zip (None if it is). ``thorough`` checks every member's CRC."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not zipfile.is_zipfile(path):
        if b"<html" in head.lower() or head.lstrip().lower().startswith(b"<!doctype"):
            return ("it is an HTML page, not a .zip (the URL leads to a web or sign-in page; "
                    "use the file's direct download link)")
        return (f"it is not a complete .zip archive ({path.stat().st_size} bytes starting "
                f"{head[:12]!r}; a zip cut short loses the directory at its end)")
    if thorough:
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except ZIP_ERRORS as exc:
            return f"the archive is damaged ({exc})"
        if bad is not None:
            return f"member {bad!r} is damaged (its CRC check fails)"
    return None


def download(url: str) -> Path:
    """Download ``url`` once into the cache (with a progress bar) and return the cached file.

    Raises:
        DataError: unreachable, HTTP error, cut short, stalled or too slow, or not a sound zip;
            nothing is cached then.
        ConfigError: a bad FOWLFLOW_DOWNLOAD_* value.
    """
    timeout = _setting("FOWLFLOW_DOWNLOAD_TIMEOUT", 30.0, 0.001)
    min_rate = _setting("FOWLFLOW_DOWNLOAD_MIN_RATE", 10_000.0, 0.0)
    name = PurePosixPath(urllib.parse.urlparse(url).path).name or "download"
    folder = cache_dir() / "downloads" / key(url)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    with locked(f"download-{key(url)}", f"download of {url}"):
        if target.is_file():
            problem = zip_problem(target, thorough=False)  # fully checked before it was cached
            if problem is None:
                log.info("Using cached download of %s: %s", url, target)
                return target
            log.warning("The cached download %s is unusable: %s. Removing it and downloading "
                        "%s again.", target, problem, url)
            try:
                target.unlink()
            except OSError as exc:
                raise DataError(f"The cached download {target} of {url} is unusable ({problem}) "
                                f"and can't be removed ({exc}). {clear_hint(target)}") from exc
        # Holding the lock, anything else here was left by a killed process.
        for stale in folder.iterdir():
            if stale != target:
                stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
        part = Path(tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                _fetch(url, out, name, timeout, min_rate)
            problem = zip_problem(part)
            if problem is not None:
                raise DataError(f"The download of {url} is unusable: {problem}. Nothing was "
                                "cached; fix the URL or pass a local copy with -P data=<file>.")
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
    return target


def _fetch(url: str, out, name: str, timeout: float, min_rate: float) -> None:
    """Stream ``url`` into ``out``; raise DataError if it fails, stalls, is slow or cut short."""
    retry = "Try again, or download it yourself and pass -P data=<file>."
    try:
        resp = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise DataError(f"Could not download {url}: HTTP {exc.code} {exc.reason}. Check the URL "
                        "or pass another source with -P data=<dir | .zip | URL | s3://...>."
                        ) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"Could not reach {url} ({reason}). Without network access, pass a "
                        "local copy with -P data=<dir | .zip>.") from exc
    got = 0
    with resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        try:
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}") as bar:
                window_start, window_bytes = time.monotonic(), 0
                # read1 returns what has arrived, so a trickling server can't hold one read
                # open for ever (read() waits for the whole chunk).
                while chunk := resp.read1(CHUNK):
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                    window_bytes += len(chunk)
                    elapsed = time.monotonic() - window_start
                    if elapsed >= timeout:
                        if window_bytes < min_rate * elapsed:
                            raise DataError(
                                f"The download of {url} is too slow: {window_bytes / elapsed:.0f} "
                                f"bytes/s over the last {elapsed:.0f} s, under "
                                f"FOWLFLOW_DOWNLOAD_MIN_RATE={min_rate:g} bytes/s "
                                f"(FOWLFLOW_DOWNLOAD_TIMEOUT={timeout:g} s). {retry} Or lower "
                                "FOWLFLOW_DOWNLOAD_MIN_RATE (0 turns the check off).")
                        window_start, window_bytes = time.monotonic(), 0
        except TimeoutError as exc:
            raise DataError(f"The download of {url} stalled: nothing arrived for {timeout:g} s "
                            f"after {got} bytes (FOWLFLOW_DOWNLOAD_TIMEOUT). {retry}") from exc
        except (http.client.HTTPException, OSError) as exc:
            raise DataError(f"The download of {url} broke off after {got} bytes ({exc!r}). "
                            f"{retry}") from exc
    if total is not None and got != total:
        raise DataError(f"The download of {url} stopped after {got} of {total} bytes. {retry}")
