"""What a dataset holds that sizing needs: class count, image counts, most objects in one image."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from yolo_batch import ultralytics_adapter
from yolo_batch.core.files import atomic_write
from yolo_batch.core.progress import Reporter, tracked
from yolo_batch.errors import InputError
from yolo_batch.training.labels import SplitScan

log = logging.getLogger(__name__)

SCAN_REPORT_MIN = 2000  # label files: below this the scan takes well under a second, and is not reported
MOSAIC_FACTOR = 4  # mosaic stitches four images, so one training image can carry four images' objects
SIZE_SAMPLE = 64  # training images whose sizes decide whether the set is square (rect: auto)


@dataclass(frozen=True)
class DatasetInfo:
    yaml_path: Path
    nc: int
    names: tuple[str, ...]
    train_images: int
    val_images: int
    max_objects: int  # in one source image
    square_images: bool = True  # every sampled training image is square
    training_yaml: Path | None = None  # what Ultralytics is handed: the yaml, or its copy with path: made absolute
    notes: tuple[str, ...] = ()  # for the decision record: how path: was resolved, label files Ultralytics drops

    @property
    def worst_case_targets(self) -> int:
        """Targets per training image under mosaic, what the loss must be sized for."""
        return max(self.max_objects, 1) * MOSAIC_FACTOR


def cache_dir() -> Path:
    """Where generated data and cached decisions live (``YOLO_BATCH_CACHE_DIR`` overrides)."""
    if os.environ.get("YOLO_BATCH_CACHE_DIR"):
        return Path(os.environ["YOLO_BATCH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "yolo-batch"


def resolve_data(data: str | Path | None) -> Path:
    """The data yaml to use: the given one, or the embedded synthetic set generated on first use."""
    if data is not None:
        return Path(data)
    from yolo_batch_datasets import default_dataset

    return default_dataset(cache_dir() / "datasets")


def inspect_dataset(data: str | Path, progress: Reporter | None = None, single_cls: bool = False) -> DatasetInfo:
    """Validate ``data`` with Ultralytics' rules and count what sizing needs (``progress``: the label scan).

    Label files are checked by Ultralytics' rules too (:mod:`.labels`): where some images would be dropped, one
    warning counts them and why; where none would remain, nothing runs. ``single_cls`` (the train argument): any
    class id is taken, as Ultralytics takes it.

    Raises:
        InputError: the yaml or its folders are missing or malformed, the train split is empty, or no split has a
            usable label file (the first bad file and line named).
    """
    handed, path_note = training_yaml(Path(data))
    resolved = ultralytics_adapter.check_dataset(handed, shown=data)
    formats = ultralytics_adapter.image_formats()
    train = image_files(resolved["train"], formats)
    val = image_files(resolved["val"], formats)
    if not train:
        raise InputError(f"no training images found for {data} (looked in {resolved['train']})")
    nc = int(resolved["nc"])
    limit = None if single_cls else nc
    scans = [_scan_labels(train, "training", limit, progress), _scan_labels(val, "validation", limit, None)]
    notes = [] if path_note is None else [path_note]
    for scan, files in zip(scans, (train, val)):
        folder = ultralytics_adapter.label_paths(files[:1])[0].parent if files else Path()
        warning = scan.verdict(data, folder)
        if warning is not None:
            log.warning(warning)
            notes.append(warning)
    names = resolved["names"]
    return DatasetInfo(
        yaml_path=Path(data).resolve(),
        nc=nc,
        names=tuple(names.values()) if isinstance(names, dict) else tuple(names),
        train_images=len(train),
        val_images=len(val),
        max_objects=scans[0].max_objects,
        square_images=all(width == height for width, height in _sample_sizes(train)),
        training_yaml=handed,
        notes=tuple(notes),
    )


def _scan_labels(images: list[Path], split: str, nc: int | None, progress: Reporter | None) -> SplitScan:
    """Every label file of one split, checked; ``progress`` is told when there are many."""
    labels = ultralytics_adapter.label_paths(images)
    scan = SplitScan(split, images=len(images))
    reporter = progress if len(labels) >= SCAN_REPORT_MIN else None
    with tracked(reporter, "scan labels", total=len(labels), unit="label file", rate_unit="file") as bar:
        for done, label in enumerate(labels, 1):
            scan.add(label, nc)
            bar.update(done)
    return scan


def training_yaml(data: Path) -> tuple[Path, str | None]:
    """The data yaml to hand Ultralytics, and a note when it is not ``data`` itself.

    Ultralytics resolves a relative ``path:`` against the current directory, then against its global datasets
    folder, so the same command would read different data from different folders. yolo-batch resolves it against
    the yaml's own folder, as the yaml's author meant, and hands Ultralytics a copy (in the cache) with that
    folder written out. A yaml that cannot be read is handed on as it is, for :func:`check_dataset` to explain.
    """
    try:
        content = yaml.safe_load(data.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return data, None
    if not isinstance(content, dict) or not isinstance(content.get("path"), str):
        return data, None
    relative = content["path"]
    if Path(relative).is_absolute():
        return data, None
    root = (data.resolve().parent / relative).resolve()
    content["path"] = str(root)
    text = yaml.safe_dump(content, sort_keys=False)
    digest = hashlib.sha256(f"{data.resolve()}\n{text}".encode()).hexdigest()[:16]
    folder = cache_dir() / "data-yamls" / digest
    folder.mkdir(parents=True, exist_ok=True)
    copy = atomic_write(folder / data.name, text)
    return copy, f"data yaml {data}: path '{relative}' resolved against the yaml's folder: {root}"


def _sample_sizes(files: list[Path]) -> list[tuple[int, int]]:
    """(width, height) of up to :data:`SIZE_SAMPLE` images spread over ``files``, read from their headers."""
    from PIL import Image

    step = max(len(files) // SIZE_SAMPLE, 1)
    sizes = []
    for path in files[::step][:SIZE_SAMPLE]:
        try:
            with Image.open(path) as image:  # reads the header only
                sizes.append(image.size)
        except OSError:
            continue  # Ultralytics reports unreadable images itself
    return sizes


def image_files(entry: Any, formats: set[str] | frozenset[str]) -> list[Path]:
    """Images named by a data-yaml split: a folder (recursive), a .txt list, or a list of those."""
    entries = entry if isinstance(entry, (list, tuple)) else [entry]
    files: list[Path] = []
    for item in entries:
        path = Path(item)
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.suffix[1:].lower() in formats)
        elif path.is_file() and path.suffix == ".txt":
            parent = path.parent
            for line in path.read_text().splitlines():
                line = line.strip()
                if line:
                    candidate = Path(line) if Path(line).is_absolute() else (parent / line)
                    files.append(candidate)
    return files
