"""Discover the images of a run: folders (recursive), globs and text files that list paths.

The order is stable (sorted within a folder or glob, as written within a list file) and every path is
absolute, so a rerun of the same command names each image the same way and resume can match them.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from yolo_batch.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Discovery:
    """The images found, and how many files were passed over for their extension."""

    paths: tuple[str, ...]
    skipped_other: int = 0


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def discover(sources: Sequence[str | Path]) -> Discovery:
    """Expand ``sources`` into image paths, first occurrence kept where two sources overlap.

    Folders and globs keep files with an image extension only; a list file's entries are taken as written
    (relative ones against the list's folder), so a listed file that is not an image becomes an error line
    later rather than vanishing. A single image path is taken as is.

    Raises:
        InputError: a source that does not exist, a glob that matches nothing, or no images at all.
    """
    found: dict[str, None] = {}
    skipped = 0
    for source in sources:
        text = str(source)
        path = Path(text).expanduser()
        if path.is_dir():
            paths, other = _walk(path)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            paths, other = _read_list(path), 0
        elif path.is_file():
            paths, other = [_absolute(path)], 0
        elif _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise InputError(f"glob '{text}' matches no file")
            files = [m for m in matches if os.path.isfile(m)]
            paths = [_absolute(Path(m)) for m in files if is_image_name(m)]
            other = len(files) - len(paths)
        else:
            raise InputError(f"source not found: {text} (expected a folder, a glob or a text file listing images)")
        skipped += other
        found.update(dict.fromkeys(paths))
    if not found:
        raise InputError(f"no images found in {', '.join(str(s) for s in sources)} "
                         f"(extensions: {', '.join(sorted(IMAGE_SUFFIXES))})")
    if skipped:
        log.info("passed over %d file(s) without an image extension", skipped)
    return Discovery(paths=tuple(found), skipped_other=skipped)


def _absolute(path: Path) -> str:
    # abspath, not resolve: a symlinked image keeps the name the user gave it
    return os.path.abspath(path)


def _walk(folder: Path) -> tuple[list[str], int]:
    images: list[str] = []
    other = 0
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            if is_image_name(name):
                images.append(_absolute(Path(root) / name))
            else:
                other += 1
    images.sort()
    return images, other


def _read_list(list_file: Path) -> list[str]:
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read list file {list_file}: {exc}") from None
    base = list_file.parent
    return [_absolute(base / Path(line).expanduser()) for line in _entries(lines)]


def _entries(lines: Iterable[str]) -> Iterable[str]:
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            yield entry


def relative_names(paths: Sequence[str]) -> dict[str, str]:
    """Each path relative to the deepest folder holding them all: names for label and annotated copies
    that cannot collide where two folders hold the same file name."""
    if not paths:
        return {}
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return {p: os.path.relpath(p, root) for p in paths}
