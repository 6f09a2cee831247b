"""Result files, and the journal that makes a run resumable.

``results.jsonl`` is the journal: one complete line per image, appended and flushed once per batch,
after that batch's CSV rows, label files and annotated copies. So a line there means the image is
fully written, and on a rerun :func:`read_journal` gives the images to skip. A ``kill -9`` can leave
a torn last line (or, from a crash elsewhere, a garbled one); it is dropped and the file rewritten,
and the image is simply processed again. CSV rows whose image has no journal line are dropped too.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from yolo_batch.core.files import atomic_write, truncate_torn_tail
from yolo_batch.inference.config import OutputFormat
from yolo_batch.inference.engine import Detection
from yolo_batch.inference.failures import FailureRecord

log = logging.getLogger(__name__)


class OutputFile(str, Enum):
    RESULTS = "results.jsonl"
    ERRORS = "errors.jsonl"
    CSV = "results.csv"
    LABELS = "labels"
    ANNOTATED = "annotated"
    SUMMARY = "summary.json"
    MANIFEST = "run.json"


CSV_HEADER = ("path", "width", "height", "class_id", "name", "confidence", "x1", "y1", "x2", "y2")


@dataclass(frozen=True)
class ImageRecord:
    """One image's result line."""

    path: str
    width: int
    height: int
    detections: tuple[Detection, ...]
    timing_ms: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "width": self.width, "height": self.height,
                "detections": [d.to_dict() for d in self.detections],
                "timing_ms": {k: round(v, 3) for k, v in self.timing_ms.items()}}


@dataclass(frozen=True)
class JournalState:
    """What an earlier run of the same output folder already finished."""

    done: frozenset[str]
    detections: int
    dropped_lines: int  # torn, garbled or duplicate lines removed from the file


def journal_records(out_dir: Path) -> list[dict[str, Any]]:
    """Every record of ``out_dir``'s results.jsonl as written (for comparing runs; resume uses read_journal)."""
    return [json.loads(line) for line in (out_dir / OutputFile.RESULTS.value).read_text().splitlines()]


def read_journal(path: Path) -> JournalState:
    """Read ``results.jsonl``, repairing it in place when lines must be dropped."""
    if not path.exists():
        return JournalState(done=frozenset(), detections=0, dropped_lines=0)
    torn = 1 if truncate_torn_tail(path) else 0  # the line being written when the run died
    kept: list[bytes] = []
    done: set[str] = set()
    detections = 0
    bad = 0
    for line in path.read_bytes().split(b"\n")[:-1]:
        record = _parse(line)
        if record is None or record["path"] in done:
            bad += 1 if line.strip() else 0
            continue
        done.add(record["path"])
        detections += len(record["detections"])
        kept.append(line)
    if bad:
        log.warning("%s: dropped %d garbled or duplicate line(s); those images run again", path, bad)
        atomic_write(path, b"".join(line + b"\n" for line in kept))
    return JournalState(done=frozenset(done), detections=detections, dropped_lines=torn + bad)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        return None
    if not isinstance(record.get("detections"), list):
        return None
    return record


def repair_csv(path: Path, done: frozenset[str]) -> int:
    """Keep the header and the rows of journaled images; returns the number of rows dropped."""
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8", errors="replace")
    rows = list(csv.reader(io.StringIO(text)))
    kept = [r for r in rows[1:] if len(r) == len(CSV_HEADER) and r[0] in done]
    complete = text.endswith("\n") or not text
    dropped = len(rows) - 1 - len(kept) if rows else 0
    if dropped or not complete or (rows and tuple(rows[0]) != CSV_HEADER):
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        writer.writerows(kept)
        atomic_write(path, buffer.getvalue())
    return max(dropped, 0)


class ResultWriter:
    """Appends results per batch in journal-safe order. Used by one thread (the writer stage).

    Args:
        out_dir: the run's output folder (exists).
        formats: extra formats besides the journal.
        save_annotated: write a copy of each image with its boxes drawn.
        relative: path -> name under labels/ and annotated/ (see :func:`sources.relative_names`).
    """

    def __init__(self, out_dir: Path, formats: Iterable[OutputFormat], save_annotated: bool,
                 relative: Mapping[str, str]) -> None:
        self.out_dir = out_dir
        self.formats = frozenset(formats)
        self.save_annotated = save_annotated
        self.relative = relative
        self.labels = label_names(relative)
        self._results: IO[str] | None = None
        self._errors: IO[str] | None = None
        self._csv: IO[str] | None = None
        self._csv_writer: Any = None

    def __enter__(self) -> ResultWriter:
        self._results = open(self.out_dir / OutputFile.RESULTS.value, "a", encoding="utf-8")
        self._errors = open(self.out_dir / OutputFile.ERRORS.value, "a", encoding="utf-8")
        if OutputFormat.CSV in self.formats:
            csv_path = self.out_dir / OutputFile.CSV.value
            fresh = not csv_path.exists() or csv_path.stat().st_size == 0
            self._csv = open(csv_path, "a", encoding="utf-8", newline="")
            self._csv_writer = csv.writer(self._csv, lineterminator="\n")
            if fresh:
                self._csv_writer.writerow(CSV_HEADER)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in (self._csv, self._errors, self._results):
            if handle is not None:
                handle.close()
        self._results = self._errors = self._csv = None

    def write_batch(self, records: Sequence[ImageRecord], images: Mapping[str, np.ndarray] | None = None) -> None:
        """Everything for one batch; the journal lines go last, so they only exist for complete images."""
        if self._results is None:
            raise RuntimeError("ResultWriter used outside its 'with' block")
        if self._csv is not None:
            for record in records:
                self._csv_writer.writerows(_csv_rows(record))
            self._csv.flush()
        if OutputFormat.YOLO_TXT in self.formats:
            for record in records:
                self._write_label(record)
        if self.save_annotated and images:
            for record in records:
                if record.path in images:
                    self._write_annotated(record, images[record.path])
        self._results.write("".join(json.dumps(r.to_dict()) + "\n" for r in records))
        self._results.flush()

    def write_failure(self, failure: FailureRecord) -> None:
        if self._errors is None:
            raise RuntimeError("ResultWriter used outside its 'with' block")
        self._errors.write(json.dumps(failure.to_dict()) + "\n")
        self._errors.flush()

    def _target(self, folder: OutputFile, name: str) -> Path:
        target = self.out_dir / folder.value / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def _write_label(self, record: ImageRecord) -> None:
        lines = []
        for d in record.detections:
            x1, y1, x2, y2 = d.box
            cx, cy = (x1 + x2) / 2 / record.width, (y1 + y2) / 2 / record.height
            w, h = (x2 - x1) / record.width, (y2 - y1) / record.height
            lines.append(f"{d.class_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f} {d.confidence:.6f}\n")
        name = self.labels.get(record.path) or label_names({record.path: os.path.basename(record.path)})[record.path]
        self._target(OutputFile.LABELS, name).write_text("".join(lines))

    def _write_annotated(self, record: ImageRecord, image: np.ndarray) -> None:
        target = self._target(OutputFile.ANNOTATED, self.relative.get(record.path, os.path.basename(record.path)))
        drawn = draw_detections(image, record.detections)
        if not cv2.imwrite(str(target), drawn):
            # a format OpenCV cannot write: PNG under the full name, so x.webp never replaces a source's own x.png
            cv2.imwrite(str(target.with_name(target.name + ".png")), drawn)


def label_names(relative: Mapping[str, str]) -> dict[str, str]:
    """Each image's name under labels/: its relative name with ``.txt`` for its extension (YOLO's layout), or,
    where images in one folder share a stem (``x.jpg`` and ``x.png``), the full name plus ``.txt``
    (``x.jpg.txt``, ``x.png.txt``) for each of them, so no label file replaces another. Names are compared
    without case: on a case-insensitive disk ``X.txt`` and ``x.txt`` are one file."""
    full = {path: name + ".txt" for path, name in relative.items()}  # unique, as the relative names are
    names = {path: str(Path(name).with_suffix(".txt")) for path, name in relative.items()}
    while True:  # each round moves at least one clashing name to its full form, which cannot clash again
        count = collections.Counter(n.casefold() for n in names.values())
        clashing = [p for p, n in names.items() if count[n.casefold()] > 1 and n != full[p]]
        if not clashing:
            return names
        names.update({p: full[p] for p in clashing})


def _csv_rows(record: ImageRecord) -> list[list[Any]]:
    return [[record.path, record.width, record.height, d.class_id, d.name, f"{d.confidence:.6f}",
             *(f"{v:.2f}" for v in d.box)] for d in record.detections]


def draw_detections(image: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
    """A copy of ``image`` with boxes and ``name score`` labels."""
    out = image.copy()
    thickness = max(1, round(sum(out.shape[:2]) / 600))
    for d in detections:
        color = _color(d.class_id)
        x1, y1, x2, y2 = (int(round(v)) for v in d.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
        label = f"{d.name} {d.confidence:.2f}"
        scale = thickness / 3
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, max(thickness - 1, 1))
        top = max(y1 - th - 4, 0)
        cv2.rectangle(out, (x1, top), (x1 + tw + 2, top + th + 4), color, -1)
        cv2.putText(out, label, (x1 + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    max(thickness - 1, 1), cv2.LINE_AA)
    return out


def _color(class_id: int) -> tuple[int, int, int]:
    # golden-ratio hue steps: neighbouring class ids get clearly different colours
    hue = int((class_id * 0.618033988749895 % 1.0) * 180)
    hsv = np.array([[[hue, 200, 230]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)
