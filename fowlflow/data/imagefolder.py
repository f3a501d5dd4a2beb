"""Scan and check an ImageFolder (``train/<class>/*``, ``val/<class>/*``) before any decoding.

    layout = scan_imagefolder(root)
    layout.classes, layout.train, layout.val, layout.skipped, layout.digest

Files torchvision's ImageFolder would not read (e.g. a ``.gif``) are listed in ``skipped`` with
the reason; files that fail to decode are added there later by the image cache. Class names are
the folder names in Unicode NFC, so ``café`` written as NFC in ``train/`` and as NFD in ``val/``
(as macOS may store it) is one class. Layout errors (no ``train/`` or ``val/``, different class
sets, two folders with the same NFC name, an empty class) raise :class:`DataError`.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from fowlflow.errors import DataError

# torchvision.datasets.folder.IMG_EXTENSIONS, without importing torchvision here.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = "expected <data>/train/<class>/<image> and <data>/val/<class>/<image>"


@dataclass
class Split:
    """One split: parallel lists of image paths and class indices."""

    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


@dataclass
class Layout:
    root: Path
    classes: list[str]
    train: Split
    val: Split
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    train_digest: str = ""
    val_digest: str = ""

    @property
    def digest(self) -> str:
        return hashlib.sha256((self.train_digest + self.val_digest).encode()).hexdigest()[:16]


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _class_dirs(split_dir: Path) -> dict[str, str]:
    """``{class name (NFC): folder name}`` of one split."""
    folders: dict[str, str] = {}
    for p in sorted(split_dir.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            other = folders.setdefault(_nfc(p.name), p.name)
            if other != p.name:
                raise DataError(
                    f"{split_dir} has two class folders whose names differ only in Unicode form: "
                    f"{ascii(other)} and {ascii(p.name)} (both {_nfc(p.name)!r} in NFC). Move "
                    "the images of one into the other and delete the empty folder.")
    return folders


def _scan_split(split_dir: Path, folders: dict[str, str], classes: list[str],
                skipped: list[dict], root: Path) -> Split:
    split = Split()
    for label, name in enumerate(classes):
        for path in sorted((split_dir / folders[name]).rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() in IMG_EXTENSIONS:
                split.paths.append(path)
                split.labels.append(label)
            else:
                skipped.append({"path": str(path.relative_to(root)),
                                "reason": f"not a supported image type ({path.suffix or 'no extension'})"})
    return split


def digest_files(paths: list[Path], root: Path) -> str:
    """A content digest of ``paths``: sha256 over each relative path (NFC) and file hash.

    Files are hashed in 1 MiB chunks, so memory stays flat whatever their size.
    """
    h = hashlib.sha256()
    for path in paths:
        h.update(_nfc(str(path.relative_to(root))).encode())
        file_hash = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                file_hash.update(chunk)
        h.update(file_hash.digest())
    return h.hexdigest()[:16]


def scan_imagefolder(root: Path) -> Layout:
    """Check the layout of ``root`` and list its images.

    Raises:
        DataError: ``train/`` or ``val/`` missing, no classes, class sets differ, or a class
            has no readable image.
    """
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            found = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else []
            raise DataError(f"{root} has no '{split}/' folder ({LAYOUT}); found: {found}.")
    train_folders, val_folders = _class_dirs(root / "train"), _class_dirs(root / "val")
    classes, val_classes = sorted(train_folders), sorted(val_folders)
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders ({LAYOUT}).")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise DataError(f"train/ and val/ have different classes in {root}: only in train: "
                        f"{only_train}, only in val: {only_val}. Give both splits the same "
                        "class folders.")
    if len(classes) < 2:
        raise DataError(f"{root} has only one class ({classes}); a classifier needs at least 2.")
    skipped: list[dict] = []
    train = _scan_split(root / "train", train_folders, classes, skipped, root)
    val = _scan_split(root / "val", val_folders, classes, skipped, root)
    layout = Layout(root, classes, train, val, skipped)
    check_nonempty(layout)
    layout.train_digest = digest_files(layout.train.paths, root)
    layout.val_digest = digest_files(layout.val.paths, root)
    return layout


def check_nonempty(layout: Layout) -> None:
    """Raise :class:`DataError` if any class has no image left in a split.

    The message lists that class's skipped files with the reason each was skipped.
    """
    for split_name, split in (("train", layout.train), ("val", layout.val)):
        counts = [0] * len(layout.classes)
        for label in split.labels:
            counts[label] += 1
        empty = [layout.classes[i] for i, c in enumerate(counts) if c == 0]
        if empty:
            skipped = [f"  {s['path']}: {s['reason']}" for s in layout.skipped
                       if _nfc_parts(s["path"])[:2] in [(split_name, c) for c in empty]]
            fix = "Add images there or remove the class folder from both splits."
            if skipped:
                more = [f"  ... and {len(skipped) - 20} more"] if len(skipped) > 20 else []
                fix = ("Every file there was skipped:\n" + "\n".join(skipped[:20] + more)
                       + "\nReplace those files with readable images, add images, or remove "
                       "the class folder from both splits.")
            raise DataError(f"{split_name}/ has no readable image for class(es) {empty} in "
                            f"{layout.root}. {fix}")


def _nfc_parts(relative_path: str) -> tuple[str, ...]:
    return tuple(_nfc(part) for part in PurePath(relative_path).parts)
