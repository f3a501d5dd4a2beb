"""Scan and check an ImageFolder (``train/<class>/*``, ``val/<class>/*``) before any decoding.

    layout = scan_imagefolder(root)
    layout.classes, layout.train, layout.val, layout.skipped, layout.digest

Files torchvision's ImageFolder would not read (e.g. a ``.gif``) are listed in ``skipped`` with
the reason; files that fail to decode are added there later by the image cache. Layout errors
(no ``train/`` or ``val/``, different class sets, an empty class) raise :class:`DataError`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

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


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_split(split_dir: Path, classes: list[str], skipped: list[dict], root: Path) -> Split:
    split = Split()
    for label, name in enumerate(classes):
        for path in sorted((split_dir / name).rglob("*")):
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
    """A content digest of ``paths``: sha256 over each relative path and file hash."""
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path.relative_to(root)).encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
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
    classes = _class_dirs(root / "train")
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders ({LAYOUT}).")
    val_classes = _class_dirs(root / "val")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise DataError(f"train/ and val/ have different classes in {root}: only in train: "
                        f"{only_train}, only in val: {only_val}. Give both splits the same "
                        "class folders.")
    if len(classes) < 2:
        raise DataError(f"{root} has only one class ({classes}); a classifier needs at least 2.")
    skipped: list[dict] = []
    layout = Layout(root, classes, _scan_split(root / "train", classes, skipped, root),
                    _scan_split(root / "val", classes, skipped, root), skipped)
    check_nonempty(layout)
    layout.train_digest = digest_files(layout.train.paths, root)
    layout.val_digest = digest_files(layout.val.paths, root)
    return layout


def check_nonempty(layout: Layout) -> None:
    """Raise :class:`DataError` if any class has no image left in a split."""
    for split_name, split in (("train", layout.train), ("val", layout.val)):
        counts = [0] * len(layout.classes)
        for label in split.labels:
            counts[label] += 1
        empty = [layout.classes[i] for i, c in enumerate(counts) if c == 0]
        if empty:
            raise DataError(f"{split_name}/ has no readable image for class(es) {empty} in "
                            f"{layout.root}. Add images there or remove the class folder "
                            "from both splits.")
