"""Every validation rule that more than one part of yolo-batch applies, written once.

Each check raises :class:`~yolo_batch.errors.InputError` with one line naming the setting as the user wrote
it (``name``), so ``--imgsz``, ``YOLO_BATCH_IMGSZ`` and a profile's ``train.imgsz`` read alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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
