"""Which label files Ultralytics will drop, and why: checked by yolo-batch's dataset scan before any run starts.

The rules are Ultralytics' own (``verify_image_label``): a row is ``class x y w h`` (or a polygon ``class x1 y1 x2 y2
...``), numbers only, the class an integer below ``nc``, coordinates within [0, 1] with its 1 % tolerance, sizes not
negative; one bad row drops the whole image. Pure: no Ultralytics, no images read.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from yolo_batch.errors import InputError

TOLERANCE = 0.01  # Ultralytics accepts coordinates within [-0.01, 1.01]
BOX_COLUMNS = 5


@dataclass(frozen=True)
class LabelProblem:
    """The first bad row of one label file: ``kind`` counts it, ``detail`` explains it."""

    path: Path
    line: int
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.detail}"


def check_row(tokens: list[str], nc: int | None) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong with one label row, or None when Ultralytics will accept it (``nc`` None:
    ``single_cls``, where Ultralytics takes any class id as class 0)."""
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        return "not numbers", f"not numbers: {' '.join(tokens)!r}"
    if not all(math.isfinite(v) for v in values):
        return "not numbers", f"not numbers: {' '.join(tokens)!r}"
    if len(values) < BOX_COLUMNS or len(values) == BOX_COLUMNS + 1 or (len(values) > BOX_COLUMNS + 1
                                                                         and len(values) % 2 == 0):
        return "wrong column count", f"{len(values)} values: expected 5 numbers (class x y w h) or a polygon"
    cls, coords = values[0], values[1:]
    if cls % 1 or cls < 0:
        return "bad class id", f"class id {tokens[0]} is not a whole number >= 0"
    if nc is not None and cls >= nc:
        return f"class id >= nc {nc}", f"class id {int(cls)} >= nc {nc} (classes are 0-{nc - 1})"
    if len(values) == BOX_COLUMNS and min(coords[2:]) < 0:
        return "negative size", f"negative size: width {tokens[3]}, height {tokens[4]}"
    if min(coords) < -TOLERANCE or max(coords) > 1 + TOLERANCE:
        return "coordinates outside [0, 1]", f"coordinates outside [0, 1]: {' '.join(tokens[1:])}"
    return None


def check_label_file(path: Path, nc: int | None) -> tuple[LabelProblem | None, int]:
    """The file's first problem (None: Ultralytics keeps it) and its number of rows.

    Raises:
        FileNotFoundError: no label file (Ultralytics reads the image as background).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return LabelProblem(path, 1, "not numbers", "not UTF-8 text"), 0
    except IsADirectoryError:
        return LabelProblem(path, 1, "not a file", "a folder, not a label file"), 0
    rows = 0
    polygon = box = False
    for number, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        rows += 1
        wrong = check_row(tokens, nc)
        if wrong is not None:
            return LabelProblem(path, number, *wrong), rows
        polygon, box = polygon or len(tokens) > BOX_COLUMNS, box or len(tokens) == BOX_COLUMNS
        if polygon and box:  # Ultralytics refuses a file that mixes the two
            return LabelProblem(path, number, "mixes boxes and polygons", "mixes box and polygon rows"), rows
    return None, rows


@dataclass
class SplitScan:
    """What the scan found in one split's label files."""

    split: str
    images: int
    usable: int = 0  # images with a label file Ultralytics keeps
    missing: int = 0  # images without a label file (background)
    max_objects: int = 0
    problems: list[LabelProblem] = field(default_factory=list)

    def add(self, path: Path, nc: int | None) -> None:
        try:
            problem, rows = check_label_file(path, nc)
        except FileNotFoundError:
            self.missing += 1
            return
        if problem is not None:
            self.problems.append(problem)
            return
        self.usable += 1
        self.max_objects = max(self.max_objects, rows)

    def verdict(self, data: str | Path, folder: Path) -> str | None:
        """The warning when some images are dropped (None: none are).

        Raises:
            InputError: nothing usable remains: no label files at all, or every one is bad (the first one named).
        """
        if self.usable == 0 and self.images:
            if self.problems:
                raise InputError(f"no usable {self.split} labels in {data}: every label file is bad; first: "
                                 f"{self.problems[0]}")
            raise InputError(f"no label files for the {self.images} {self.split} images of {data} (expected one .txt "
                             f"per image in {folder})")
        if not self.problems:
            return None
        return (f"{len(self.problems)} of {self.images} {self.split} images skipped for bad labels "
                f"({summarise(p.kind for p in self.problems)}); first: {self.problems[0]}")


def summarise(kinds: Iterable[str]) -> str:
    """``2 class id >= nc 4, 1 negative size``: each kind with its count, most frequent first."""
    return ", ".join(f"{count} {kind}" for kind, count in Counter(kinds).most_common())
