"""Labelled validation sets: a CSV manifest or a folder per category."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from moderation.errors import ModerationError

__all__ = ["LabelError", "LabelledImage", "load_labels", "NONE_LABEL"]

NONE_LABEL = "none"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".mpo"}


class LabelError(ModerationError, ValueError):
    """A labelled set that cannot be used: unreadable, malformed, or naming unknown categories."""


@dataclass(frozen=True)
class LabelledImage:
    """An image and the categories it belongs to (empty: it belongs to none)."""

    path: Path
    labels: frozenset[str]


def _from_manifest(path: Path, categories: set[str]) -> list[LabelledImage]:
    """``path,labels`` rows; labels separated by ``;`` or ``|``, or ``none``. A header row
    whose first cell is ``path`` is skipped; image paths are relative to the CSV."""
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(f"{path}: cannot read the label manifest: {e}") from e
    faults: list[str] = []
    items: list[LabelledImage] = []
    for number, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip() or row[0].startswith("#"):
            continue
        if number == 1 and row[0].strip().lower() == "path":
            continue
        if len(row) < 2:
            faults.append(f"line {number}: expected 'path,labels', got {','.join(row)!r}")
            continue
        image = (path.parent / row[0].strip()).resolve()
        raw = {x.strip() for cell in row[1:] for x in cell.replace("|", ";").split(";")}
        raw.discard("")
        if not raw:
            faults.append(f"line {number}: no label for {row[0]!r} (use '{NONE_LABEL}')")
            continue
        if NONE_LABEL in raw and len(raw) > 1:
            faults.append(f"line {number}: '{NONE_LABEL}' cannot be combined with {sorted(raw)}")
            continue
        unknown = raw - categories - {NONE_LABEL}
        if unknown:
            faults.append(
                f"line {number}: unknown categories {sorted(unknown)}; the policy has "
                f"{sorted(categories)} (or '{NONE_LABEL}')"
            )
            continue
        items.append(LabelledImage(image, frozenset(raw - {NONE_LABEL})))
    if faults:
        raise LabelError(
            f"{path}: {len(faults)} bad rows:\n" + "\n".join(f"  - {f}" for f in faults)
        )
    return items


def _from_folders(root: Path, categories: set[str]) -> list[LabelledImage]:
    """``root/<category>/…`` and ``root/none/…``; an image in several folders (same bytes)
    gets every one of their labels."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in categories | {NONE_LABEL}]
    if unknown:
        raise LabelError(
            f"{root}: folders {unknown} are not categories of the policy "
            f"({sorted(categories)}) nor '{NONE_LABEL}'"
        )
    by_content: dict[str, tuple[Path, set[str]]] = {}
    for folder in folders:
        for image in sorted(folder.rglob("*")):
            if image.is_file() and image.suffix.lower() in _IMAGE_SUFFIXES:
                digest = hashlib.sha256(image.read_bytes()).hexdigest()
                first, labels = by_content.setdefault(digest, (image.resolve(), set()))
                if folder.name != NONE_LABEL:
                    labels.add(folder.name)
    return [LabelledImage(path, frozenset(labels)) for path, labels in by_content.values()]


def load_labels(source: str | Path, categories: set[str]) -> list[LabelledImage]:
    """Read a CSV manifest (a file) or a folder per category (a directory)."""
    source = Path(source)
    if source.is_dir():
        items = _from_folders(source, categories)
    elif source.is_file():
        items = _from_manifest(source, categories)
    else:
        raise LabelError(f"{source}: no such file or folder of labelled images")
    if not items:
        raise LabelError(f"{source}: no labelled images found")
    return items


def fingerprint(items: list[LabelledImage]) -> str:
    """A hash of the images' bytes and labels, independent of their order and location."""
    rows = sorted(
        f"{hashlib.sha256(item.path.read_bytes()).hexdigest()}:{','.join(sorted(item.labels))}"
        for item in items
    )
    return "sha256:" + hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]
