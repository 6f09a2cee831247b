"""Discover the images of a run: folders (recursive), globs and text files that list paths.

The order is stable (sorted within a folder or glob, as written within a list file) and every path is
absolute, so a rerun of the same command names each image the same way and resume can match them.

Nothing is skipped without a word. Symlinked folders are followed (a dataset assembled from links is
common), each real folder once: a link back to a folder already on the way (a loop) or a second route to one
already walked is passed over with a log line, since its images are found through the first route. A
subfolder that cannot be listed is a :class:`~yolo_batch.inference.failures.FailureRecord`, which the run writes
to errors.jsonl (its images are lost to the run, so it counts as a failure); a source folder that cannot be
listed is refused.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from yolo_batch.errors import InputError
from yolo_batch.inference.failures import FailureRecord

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Discovery:
    """The images found, folders that could not be listed, and how many files were passed over for their
    extension."""

    paths: tuple[str, ...]
    skipped_other: int = 0
    problems: tuple[FailureRecord, ...] = ()
    repeats: tuple[str, ...] = ()  # symlinked folders not walked again (loops, second routes)


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
    walks: list[_Walk] = []
    for source in sources:
        text = str(source)
        path = Path(text).expanduser()
        if path.is_dir():
            walks.append(_walk(path))
            paths, other = walks[-1].images, walks[-1].other
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
    problems = tuple(p for w in walks for p in w.problems)
    repeats = tuple(r for w in walks for r in w.repeats)
    if repeats:
        log.warning("followed symlinked folders once each: passed over %d link(s) to a folder already walked "
                    "(%s)", len(repeats), ", ".join(repeats[:3]) + (", ..." if len(repeats) > 3 else ""))
    return Discovery(paths=tuple(found), skipped_other=skipped, problems=problems, repeats=repeats)


def _absolute(path: Path) -> str:
    # abspath, not resolve: a symlinked image keeps the name the user gave it
    return os.path.abspath(path)


@dataclass
class _Walk:
    images: list[str]
    other: int
    problems: list[FailureRecord]
    repeats: list[str]


def _walk(folder: Path) -> _Walk:
    """Every image under ``folder``, following symlinked folders, each real folder once."""
    walk = _Walk(images=[], other=0, problems=[], repeats=[])
    top = os.path.abspath(folder)

    def unlisted(exc: OSError) -> None:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        if os.path.abspath(exc.filename or top) == top:
            raise InputError(f"cannot read folder {folder}: {reason}")
        walk.problems.append(FailureRecord(os.path.abspath(exc.filename), "unreadable",
                                           f"cannot list folder: {reason}"))

    walked = {os.path.realpath(top)}
    for root, dirs, files in os.walk(top, onerror=unlisted, followlinks=True):
        dirs.sort()
        for name in list(dirs):
            real = os.path.realpath(os.path.join(root, name))
            if real in walked:  # a loop, or a second route to a folder: its images come through the first
                dirs.remove(name)
                walk.repeats.append(os.path.join(root, name))
            walked.add(real)
        for name in sorted(files):
            if is_image_name(name):
                walk.images.append(os.path.join(root, name))  # abspath already: top is absolute
            else:
                walk.other += 1
    walk.images.sort()
    return walk


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
