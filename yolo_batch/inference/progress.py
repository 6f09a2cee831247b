"""Progress of an inference run: the reporters of :mod:`yolo_batch.core.progress` (kept here for old imports)."""

from __future__ import annotations

from yolo_batch.core.progress import (
    NullProgress,
    PlainProgress,
    ProgressReporter,
    RichProgress,
)

__all__ = ["NullProgress", "PlainProgress", "ProgressReporter", "RichProgress"]
