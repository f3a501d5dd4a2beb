"""Unpack a data ``.zip`` once into the cache, safely, and find the ImageFolder inside it.

    folder = extract_zip(Path("fowl_data.zip"), "fowl_data.zip")  # cache_dir()/extracted/<hash>
    root = zip_root(folder, "fowl_data.zip")                       # the folder with train/, val/

Archives are unpacked into ``$FOWLFLOW_CACHE_DIR/extracted``, keyed by their content hash, under
a temporary name renamed only when complete, so a half-written extraction is never used.
Archive members that would land outside the target (zip-slip) or are links make the whole
archive refused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from fowlflow.data.downloads import ZIP_ERRORS, cache_dir, clear_hint, locked
from fowlflow.errors import DataError

FIX = ("Pass another source with -P data=<ImageFolder dir | .zip | http(s) .zip URL | "
       "s3://bucket/prefix | synthetic>.")
ZIP_LAYOUT = ("Re-create the zip from inside the folder that holds train/ and val/ "
              "(cd <that folder> && zip -r ../data.zip train val), or unzip it and pass "
              "that folder with -P data=<folder>.")


class DamagedArchive(DataError):
    """A zip whose members can't be read back (bad CRC, cut-short data)."""


def find_imagefolder_root(path: Path) -> Path:
    """The folder holding ``train/`` and ``val/``: ``path`` itself or its only sub-folder."""
    if (path / "train").is_dir() or (path / "val").is_dir():
        return path
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    if len(subdirs) == 1 and ((subdirs[0] / "train").is_dir() or (subdirs[0] / "val").is_dir()):
        return subdirs[0]
    # Let the layout check produce the precise message (missing train/ or val/).
    return path


def zip_root(extracted: Path, label: str) -> Path:
    """The ImageFolder inside an unpacked zip; errors name the zip (``label``), not the cache."""
    root = find_imagefolder_root(extracted)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    top = sorted(p.name for p in extracted.iterdir() if not p.name.startswith("__MACOSX"))[:10]
    deeper = sorted(p.parent for p in extracted.rglob("train") if (p.parent / "val").is_dir())
    where = (f"; train/ and val/ are in {deeper[0].relative_to(extracted).as_posix()}/ inside "
             "it, deeper than fowlflow looks") if deeper else ""
    raise DataError(f"{label} has no train/ and val/ folders at its top or inside its single top "
                    f"folder (its top holds {top}{where}). {ZIP_LAYOUT}")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_zip_members(zf: zipfile.ZipFile, label: str) -> None:
    """Refuse archives whose members are absolute, escape the target, or are links."""
    for info in zf.infolist():
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]) or is_link:
            kind = "is a symbolic link" if is_link else "would be written outside the target folder"
            raise DataError(f"Refusing to unpack {label}: member {name!r} {kind} "
                            "(a 'zip-slip' archive). Nothing was extracted; use a trusted archive.")


def extract_zip(archive: Path, label: str) -> Path:
    """Unpack ``archive`` once into a folder keyed by its content hash and return it.

    ``label`` is what the user gave (path, URL, s3 URI); messages name it.

    Raises:
        DamagedArchive: a member can't be read back (bad CRC, cut short); nothing is kept.
        DataError: not a zip, a zip-slip member, or no room to unpack.
    """
    digest = _file_sha256(archive)[:16]
    parent = cache_dir() / "extracted"
    target = parent / digest
    parent.mkdir(parents=True, exist_ok=True)
    with locked(f"extract-{digest}", f"unpacking of {label}"):
        if target.is_dir():
            return target
        for stale in parent.glob(f".extract-{digest}-*"):  # left by a killed process
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".extract-{digest}-", dir=parent))
        try:
            _unpack(archive, label, tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _unpack(archive: Path, label: str, dest: Path) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{label} is not a valid .zip archive ({exc}). {FIX}") from exc
    with zf:
        check_zip_members(zf, label)
        members = [m for m in zf.infolist() if not m.filename.startswith("__MACOSX/")]
        member = None
        try:
            for member in tqdm(members, desc=f"unpack {archive.name}", unit="file"):
                zf.extract(member, dest)
        except ZIP_ERRORS as exc:
            raise DamagedArchive(f"{label} is damaged: member {member.filename!r} can't be read "
                                 f"back ({exc}). Nothing was unpacked.") from exc
        except OSError as exc:
            raise DataError(f"Could not unpack {label} into {dest.parent}: {exc}. Free some "
                            "space there or set FOWLFLOW_CACHE_DIR to a folder on a larger "
                            "disk.") from exc


def extract_cached(archive: Path, label: str) -> Path:
    """:func:`extract_zip` for an archive in the download cache: a damaged one is removed, so
    the next run fetches it again."""
    try:
        return extract_zip(archive, label)
    except DamagedArchive as exc:
        try:
            archive.unlink()
            done = f"The cached copy {archive} was removed; run again to download it afresh."
        except OSError:
            done = f"The cached copy is {archive}. {clear_hint(archive)}"
        raise DataError(f"{exc.message} {done}") from exc
