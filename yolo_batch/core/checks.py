"""Every validation rule that more than one part of yolo-batch applies, written once.

Each check raises :class:`~yolo_batch.errors.InputError` with one line naming the setting as the user wrote
it (``name``), so ``--imgsz``, ``YOLO_BATCH_IMGSZ`` and a profile's ``train.imgsz`` read alike.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from yolo_batch.errors import InputError

Window = tuple[float, float]  # (low, high) intensities that map to 0 and 255
STRIDE = 32  # YOLO's largest stride: image sizes are multiples of it


def check_imgsz(value: Any, name: str = "imgsz") -> int:
    """A positive multiple of 32."""
    if isinstance(value, bool) or not isinstance(value, int) or value < STRIDE or value % STRIDE:
        raise InputError(f"{name} must be a positive multiple of {STRIDE}, got {value!r}")
    return value


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (booleans are not counts)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_optional_count(value: Any, name: str, minimum: int = 1) -> int | None:
    """None (not given), or an integer >= ``minimum``."""
    return None if value is None else check_count(value, name, minimum)


def check_number(value: Any, name: str, *, minimum: float | None = None, positive: bool = False) -> float:
    """A finite number; ``positive``: > 0; ``minimum``: >= it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise InputError(f"{name} must be > 0, got {value:g}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum:g}, got {value:g}")
    return float(value)


def check_unit_interval(value: Any, name: str) -> float:
    """A number in [0, 1] (confidence and IoU thresholds)."""
    number = check_number(value, name)
    if not 0.0 <= number <= 1.0:
        raise InputError(f"{name} must be in [0, 1], got {number:g}")
    return number


def check_memory_fraction(value: Any, name: str = "memory fraction") -> float:
    """A share of free memory in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:  # NaN fails too
        raise InputError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def check_class_ids(values: Any, name: str = "classes") -> tuple[int, ...] | None:
    """None (all classes), or class ids >= 0."""
    if values is None:
        return None
    ids = tuple(values)
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in ids):
        raise InputError(f"{name} must be class ids >= 0, got {list(ids)}")
    return ids


def check_latency_limit(latency_ms: Any, batch_is_auto: bool, name: str = "max-latency-ms",
                        batch_name: str = "--batch") -> float | None:
    """A per-batch latency limit: a positive number, and only where the batch is chosen automatically."""
    if latency_ms is None:
        return None
    value = check_number(latency_ms, name, positive=True)
    if not batch_is_auto:
        raise InputError(f"{name} applies to {batch_name} auto only")
    return value


def parse_class_ids(text: str) -> tuple[int, ...]:
    """``"0,2"`` -> ``(0, 2)`` (the form ``--classes`` and ``YOLO_BATCH_CLASSES`` take).

    Raises:
        InputError: a part that is not a class id (an integer >= 0).
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    for part in parts:
        if not part.isdigit():
            raise InputError(f"'{part}' is not a class id: expected class ids such as 0,2 (integers >= 0)")
    return tuple(int(p) for p in parts)


def check_window(window: Iterable[float]) -> Window:
    """``(low, high)`` as two finite floats with ``low < high``.

    Raises:
        ValueError: anything else.
    """
    values = tuple(window)
    if len(values) != 2:
        raise ValueError(f"a window is two numbers [low, high], got {list(values)}")
    low, high = (float(v) for v in values)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"a window needs finite low < high, got [{low:g}, {high:g}]")
    return low, high


PER_CORE = 4  # decode threads wait on files and torch threads on memory: beyond 4 per core a run only slows down
MAX_IMGSZ = 8192  # beyond it one image's activations need tens of GB even for the smallest YOLO


def parallelism_cap(cpu_count: int | None = None) -> int:
    """The most workers, threads or streams a run may ask for: :data:`PER_CORE` per core (at least 8)."""
    cores = cpu_count or os.cpu_count() or 1
    return max(8, PER_CORE * cores)


def check_parallelism(value: Any, name: str, cpu_count: int | None = None) -> int | None:
    """None (not given), or a count from 1 to :func:`parallelism_cap` (``--workers 100000`` made runs 50-100
    times slower, never faster)."""
    if check_optional_count(value, name) is None:
        return None
    cores = cpu_count or os.cpu_count() or 1
    cap = parallelism_cap(cores)
    if value > cap:
        raise InputError(f"{name} must be at most {cap} ({PER_CORE} per core, {cores} cores here), got {value}")
    return int(value)


def check_imgsz_bound(value: int, name: str = "imgsz") -> int:
    """At most :data:`MAX_IMGSZ` (a bound any machine needs; :func:`check_imgsz_fits` adds this machine's)."""
    if value > MAX_IMGSZ:
        raise InputError(f"{name} must be at most {MAX_IMGSZ}, got {value}")
    return value


def check_imgsz_fits(imgsz: int, bytes_per_image: int, available: int, where: str, name: str = "imgsz") -> int:
    """One image at ``imgsz`` (``bytes_per_image``, an estimate) must fit in the memory ``available`` on the
    device ``where``; the message states the largest size that does."""
    if bytes_per_image <= available:
        return imgsz
    per_pixel = bytes_per_image / (imgsz * imgsz)
    largest = int(math.sqrt(available / per_pixel)) // STRIDE * STRIDE
    raise InputError(f"{name} {imgsz} needs about {bytes_per_image / 2**30:.1f} GiB of {where} memory for one image, "
                     f"{available / 2**30:.1f} GiB available: the bound here is {name} <= {max(largest, 0)}")


def check_class_ids_known(values: Iterable[int] | None, class_count: int, name: str = "classes") -> None:
    """Class ids the model has (an id beyond them would silently keep nothing)."""
    unknown = sorted({c for c in values or () if c >= class_count})
    if unknown:
        raise InputError(f"{name} {','.join(map(str, unknown))}: the model has {class_count} classes "
                         f"(ids 0-{class_count - 1})")


def check_writable_folder(folder: Path, name: str = "--out") -> None:
    """A folder that exists and is writable, or that can be made: its nearest existing parent is a writable
    folder. Checked before any work, so a run never dies with a traceback at its first write."""
    existing = nearest_existing(folder)
    if existing == folder and not folder.is_dir():
        raise InputError(f"{name} {folder} is a file, not a folder")
    if not existing.is_dir():
        raise InputError(f"cannot create {name} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f" (in {existing})"
        raise InputError(f"cannot write to {name} {folder}{where}: {_denied(existing)}")


def check_writable_entries(folder: Path, files: Iterable[str], folders: Iterable[str] = ()) -> None:
    """The named files (and sub-folders) of ``folder`` that exist must be of their kind and writable."""
    for entry, want_dir in [*((f, False) for f in files), *((d, True) for d in folders)]:
        path = folder / entry
        if not path.exists():
            continue
        if path.is_dir() != want_dir:
            kind = "a folder, not a file" if path.is_dir() else "a file, not a folder"
            raise InputError(f"{path} is {kind}: move it away or use another output folder")
        if not os.access(path, os.W_OK | (os.X_OK if want_dir else 0)):
            raise InputError(f"cannot write {path}: {_denied(path)}")


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists: where a folder that is still to be made would be created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def on_read_only_file_system(path: Path) -> bool:
    """Whether ``path`` is on a read-only mount (where no change of owner or mode helps)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _denied(path: Path) -> str:
    return "read-only file system" if on_read_only_file_system(path) else "permission denied"
