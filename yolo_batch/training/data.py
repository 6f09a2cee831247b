"""What a dataset holds that sizing needs: class count, image counts, most objects in one image."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolo_batch import ultralytics_adapter
from yolo_batch.core.progress import Reporter, tracked
from yolo_batch.errors import InputError

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


def inspect_dataset(data: str | Path, progress: Reporter | None = None) -> DatasetInfo:
    """Validate ``data`` with Ultralytics' rules and count what sizing needs (``progress``: the label scan).

    Raises:
        InputError: the yaml or its folders are missing or malformed, or the train split is empty.
    """
    resolved = ultralytics_adapter.check_dataset(data)
    formats = ultralytics_adapter.image_formats()
    train = image_files(resolved["train"], formats)
    val = image_files(resolved["val"], formats)
    if not train:
        raise InputError(f"no training images found for {data} (looked in {resolved['train']})")
    max_objects = 0
    labels = ultralytics_adapter.label_paths(train)
    reporter = progress if len(labels) >= SCAN_REPORT_MIN else None
    with tracked(reporter, "scan labels", total=len(labels), unit="label file", rate_unit="file") as scan:
        for done, label in enumerate(labels, 1):
            try:
                with open(label) as f:
                    max_objects = max(max_objects, sum(1 for line in f if line.strip()))
            except FileNotFoundError:  # an image without labels is a background image
                pass
            scan.update(done)
    names = resolved["names"]
    return DatasetInfo(
        yaml_path=Path(data).resolve(),
        nc=int(resolved["nc"]),
        names=tuple(names.values()) if isinstance(names, dict) else tuple(names),
        train_images=len(train),
        val_images=len(val),
        max_objects=max_objects,
        square_images=all(width == height for width, height in _sample_sizes(train)),
    )


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
