"""The inference path's steps, each a small named object shared by ``infer``, ``serve`` and the cluster path.

A step is what happens to one item (an image) or one batch, with no threads or queues of its own:

* :class:`PrepareStep`: a decoded image -> :class:`Prepared` (letterboxed, timed), or a :class:`FailureRecord`.
* :class:`InferStep`: a batch of same-shape :class:`Prepared` -> :class:`Written` (records and failures), the
  forward pass split in halves on out-of-memory so no image is lost (:func:`.oom_split.run_with_split`).

:mod:`.pipeline` runs them as threaded stages joined by bounded queues (local ``infer``); the service's backend
calls :class:`InferStep` from its dynamic batcher; a cluster actor calls it on the blocks it receives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from yolo_batch.inference.buckets import NO_PADDING, PaddingStats, batch_padding
from yolo_batch.inference.decode import DecodedImage, DecodeError, FailureKind
from yolo_batch.inference.engine import Detection
from yolo_batch.inference.letterbox import Letterbox
from yolo_batch.inference.oom_split import BatchSize, OutOfMemoryAlone, run_with_split
from yolo_batch.inference.writers import FailureRecord, ImageRecord


class Preparer(Protocol):
    """What :class:`PrepareStep` needs: letterboxing (an :class:`Engine`, or a model-free
    :class:`~yolo_batch.inference.letterbox.Letterboxer` in the cluster path's CPU tasks)."""

    def prepare(self, pixels: np.ndarray) -> tuple[np.ndarray, Letterbox]: ...


class Backend(Protocol):
    """What the steps need from a model (:class:`yolo_batch.inference.engine.Engine` is one)."""

    def prepare(self, pixels: np.ndarray) -> tuple[np.ndarray, Letterbox]: ...

    def collate(self, images: Sequence[np.ndarray]) -> Any: ...

    def run(self, host: Any, plans: Sequence[Letterbox]) -> list[list[Detection]]: ...

    def release(self) -> None: ...


@dataclass
class Prepared:
    """One image decoded and letterboxed, waiting for a batch."""

    path: str  # the file's path, or the name a request gave the image
    pixels: np.ndarray  # letterboxed, uint8 BGR
    plan: Letterbox
    decode_s: float
    letterbox_s: float
    original: np.ndarray | None = None  # the decoded image, kept only for annotated copies

    @property
    def height(self) -> int:
        return self.plan.source[0]

    @property
    def width(self) -> int:
        return self.plan.source[1]


@dataclass
class Batch:
    """Same-shape prepared images and their host tensor (collated once, reused unless an OOM splits it)."""

    items: list[Prepared]
    host: Any


@dataclass
class Written:
    """What one batch produced, for the writer: one record per image, or a failure."""

    records: list[ImageRecord]
    failures: list[FailureRecord]
    originals: dict[str, np.ndarray] | None = None
    padding: PaddingStats = NO_PADDING
    seconds: float = 0.0  # forward passes and NMS


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over threads (thread-safe)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("decode", "letterbox", "collate", "inference", "write"), 0.0))

    def add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.seconds[stage] += seconds


class PrepareStep:
    """Decoded image -> letterboxed :class:`Prepared` (runs in decode threads; thread-safe)."""

    def __init__(self, backend: Preparer, keep_originals: bool = False) -> None:
        self.backend = backend
        self.keep_originals = keep_originals

    def __call__(self, decoded: DecodedImage) -> Prepared:
        t0 = time.perf_counter()
        pixels, plan = self.backend.prepare(decoded.pixels)
        return Prepared(path=decoded.path, pixels=pixels, plan=plan, decode_s=decoded.decode_s,
                        letterbox_s=time.perf_counter() - t0,
                        original=decoded.pixels if self.keep_originals else None)

    def from_file(self, read: Callable[[str], DecodedImage], path: str) -> Prepared | FailureRecord:
        """Read and prepare ``path``; a file that cannot be read becomes its failure record."""
        try:
            decoded = read(path)
        except DecodeError as exc:
            return FailureRecord(path=path, kind=exc.kind.value, reason=exc.reason)
        return self(decoded)


class InferStep:
    """A batch of same-shape images -> :class:`Written`, splitting on out-of-memory (thread-safe).

    Args:
        backend: collates and runs batches.
        batch_size: shared and shrinking: after an out-of-memory split the smaller size is kept.
        imgsz: the square size padding is compared against.
        on_oom: called after each out-of-memory error, once the device cache is released (metrics).
    """

    def __init__(self, backend: Backend, batch_size: BatchSize, imgsz: int,
                 on_oom: Callable[[], None] | None = None) -> None:
        self.backend = backend
        self.batch_size = batch_size
        self.imgsz = imgsz
        self.on_oom = on_oom

    def collate(self, items: Sequence[Prepared]) -> Batch:
        return Batch(items=list(items), host=self.backend.collate([i.pixels for i in items]))

    def outcomes(self, batch: Batch) -> tuple[list[list[Detection] | OutOfMemoryAlone], float]:
        """Detections per image in order (an :class:`OutOfMemoryAlone` for one that fits not even alone), and
        the seconds the forward passes took."""
        t0 = time.perf_counter()
        whole = len(batch.items)

        def run(chunk: Sequence[Prepared]) -> list[list[Detection]]:
            host = batch.host if len(chunk) == whole else self.backend.collate([i.pixels for i in chunk])
            return self.backend.run(host, [i.plan for i in chunk])

        outcomes = run_with_split(batch.items, run, self.batch_size, on_oom=self._after_oom)
        return outcomes, time.perf_counter() - t0

    def _after_oom(self) -> None:
        self.backend.release()
        if self.on_oom is not None:
            self.on_oom()

    def __call__(self, batch: Batch) -> Written:
        outcomes, seconds = self.outcomes(batch)
        whole = len(batch.items)
        per_image_ms = seconds * 1e3 / whole
        records: list[ImageRecord] = []
        failures: list[FailureRecord] = []
        for item, outcome in zip(batch.items, outcomes):
            if isinstance(outcome, OutOfMemoryAlone):
                failures.append(FailureRecord(item.path, FailureKind.DEVICE_MEMORY.value, str(outcome)))
                continue
            records.append(ImageRecord(path=item.path, width=item.width, height=item.height,
                                       detections=tuple(outcome),
                                       timing_ms={"decode": item.decode_s * 1e3, "letterbox": item.letterbox_s * 1e3,
                                                  "inference": per_image_ms, "batch": float(whole)}))
        originals = {i.path: i.original for i in batch.items if i.original is not None}
        padding = batch_padding(batch.items[0].plan.out, (i.plan.content_pixels for i in batch.items), self.imgsz)
        return Written(records=records, failures=failures, originals=originals or None, padding=padding,
                       seconds=seconds)
