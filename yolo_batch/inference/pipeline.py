"""Stages joined by bounded queues: feed -> decode+letterbox (N threads) -> bucket+collate -> infer -> write.

Every queue has a ``maxsize`` and the shape buckets a ``max_pending``, so the number of images alive at
once has a fixed bound (:meth:`Pipeline.in_flight_bound`) however long the stream. Inference runs in the
calling thread (plus ``streams - 1`` more threads); the others are worker threads that poll a stop
event, so an exception in any stage, or Ctrl-C, stops them all and ``run`` joins them in ``finally``.
Results already computed when a run is stopped are still written (they are valid), then the first
error is re-raised.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from yolo_batch.inference.buckets import (
    NO_PADDING,
    PaddingStats,
    ShapeBuckets,
    batch_padding,
)
from yolo_batch.inference.decode import DecodedImage, DecodeError, FailureKind
from yolo_batch.inference.engine import Detection
from yolo_batch.inference.letterbox import Letterbox
from yolo_batch.inference.oom_split import (
    BatchSize,
    OomEvent,
    OutOfMemoryAlone,
    run_with_split,
)
from yolo_batch.inference.writers import FailureRecord, ImageRecord

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often a blocked stage looks at the stop event
_JOIN_S = 30.0


class Backend(Protocol):
    """What the pipeline needs from an engine (:class:`yolo_batch.inference.engine.Engine` is one)."""

    def prepare(self, pixels: np.ndarray) -> tuple[np.ndarray, Letterbox]: ...

    def collate(self, images: Sequence[np.ndarray]) -> Any: ...

    def run(self, host: Any, plans: Sequence[Letterbox]) -> list[list[Detection]]: ...

    def release(self) -> None: ...


class Sink(Protocol):
    """Where results go (:class:`yolo_batch.inference.writers.ResultWriter` is one)."""

    def write_batch(self, records: Sequence[ImageRecord], images: dict[str, np.ndarray] | None = None) -> None: ...

    def write_failure(self, failure: FailureRecord) -> None: ...


@dataclass
class _Prepared:
    path: str
    pixels: np.ndarray
    plan: Letterbox
    original: np.ndarray | None
    decode_s: float
    letterbox_s: float


@dataclass
class _Batch:
    items: list[_Prepared]
    host: Any


@dataclass
class _Written:
    records: list[ImageRecord]
    failures: list[FailureRecord]
    originals: dict[str, np.ndarray] | None


class _Stopped(Exception):
    """Raised inside a stage when the run is being stopped."""


_END = object()


class TrackedQueue(queue.Queue):
    """A bounded queue that remembers the most items it ever held."""

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self.high_water = 0

    def _put(self, item: Any) -> None:
        super()._put(item)
        self.high_water = max(self.high_water, len(self.queue))


@dataclass(frozen=True)
class PipelineStats:
    """What one pipeline run did."""

    images: int
    failed: int
    detections: int
    batches: int
    wall_s: float
    stage_s: dict[str, float]
    queue_high_water: dict[str, int]
    queue_bounds: dict[str, int]
    max_in_flight: int
    in_flight_bound: int
    padding: PaddingStats
    oom_events: tuple[OomEvent, ...]
    final_batch: int

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "failed": self.failed, "detections": self.detections, "batches": self.batches,
                "wall_s": round(self.wall_s, 3), "stage_s": {k: round(v, 3) for k, v in self.stage_s.items()},
                "queue_high_water": dict(self.queue_high_water), "queue_bounds": dict(self.queue_bounds),
                "max_in_flight": self.max_in_flight, "in_flight_bound": self.in_flight_bound,
                "padding": self.padding.to_dict(), "oom_events": [e.to_dict() for e in self.oom_events],
                "final_batch": self.final_batch}


@dataclass
class _Counters:
    lock: threading.Lock = field(default_factory=threading.Lock)
    stage_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("decode", "letterbox", "collate", "inference", "write"), 0.0))
    in_flight: int = 0
    max_in_flight: int = 0
    images: int = 0
    failed: int = 0
    detections: int = 0
    batches: int = 0
    padding: PaddingStats = NO_PADDING

    def add_time(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.stage_s[stage] += seconds

    def enter(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self, n: int) -> None:
        with self.lock:
            self.in_flight -= n


class Pipeline:
    """One pass over a list of paths.

    Args:
        backend: letterbox, collate and run batches.
        read: path -> :class:`DecodedImage`, raising :class:`DecodeError` for a bad file.
        sink: writes results and failures (called from the writer thread only).
        batch_size: shared, shrinks after out-of-memory splits.
        workers: decode threads.
        imgsz: for padding accounting against the square baseline.
        keep_originals: carry decoded images to the sink (annotated copies).
        on_progress: ``(images_done, failed)`` after each write, from the writer thread.
        streams: inference loops running side by side (the calling thread is one of them); on CPU each
            runs its own forward passes on its own core.
    """

    def __init__(self, backend: Backend, read: Callable[[str], DecodedImage], sink: Sink, batch_size: BatchSize,
                 workers: int, imgsz: int, keep_originals: bool = False,
                 on_progress: Callable[[int, int], None] | None = None, streams: int = 1) -> None:
        if workers < 1 or streams < 1:
            raise ValueError(f"workers and streams must be >= 1, got {workers} and {streams}")
        self.backend = backend
        self.read = read
        self.sink = sink
        self.batch_size = batch_size
        self.workers = workers
        self.imgsz = imgsz
        self.keep_originals = keep_originals
        self.on_progress = on_progress
        self.streams = streams
        batch = batch_size()
        self.max_pending = 2 * batch
        self.bounds = {"paths": 2 * workers, "prepared": 2 * workers + batch, "batches": 2 * streams,
                       "written": 2 * streams}

    def in_flight_bound(self) -> int:
        """Most decoded images alive at once: in decode, queued, in buckets, in batches, being written."""
        batch = self.batch_size()
        return (self.workers + self.bounds["prepared"] + self.max_pending
                + (self.bounds["batches"] + 1 + self.streams + self.bounds["written"] + 1) * batch)

    def run(self, paths: Sequence[str]) -> PipelineStats:
        """Process ``paths``; re-raises the first stage error (or KeyboardInterrupt) after cleanup."""
        start = time.perf_counter()
        stop = threading.Event()  # upstream stages: stop producing
        writer_stop = threading.Event()  # the writer: stop without draining (its own failure)
        counters = _Counters()
        errors: list[BaseException] = []
        q_paths = TrackedQueue(self.bounds["paths"])
        q_prepared = TrackedQueue(self.bounds["prepared"])
        q_batches = TrackedQueue(self.bounds["batches"])
        q_written = TrackedQueue(self.bounds["written"])

        def guard(body: Callable[[], None], on_error: threading.Event) -> Callable[[], None]:
            def target() -> None:
                try:
                    body()
                except _Stopped:
                    pass
                except BaseException as exc:  # handed to the calling thread, which re-raises it
                    errors.append(exc)
                    on_error.set()
                    stop.set()
            return target

        def feed() -> None:
            for path in paths:
                _put(q_paths, path, stop)
            for _ in range(self.workers):
                _put(q_paths, _END, stop)

        def decode() -> None:
            while (path := _get(q_paths, stop)) is not _END:
                _put(q_prepared, self._prepare(path, counters), stop)
            _put(q_prepared, _END, stop)

        def collate() -> None:
            buckets: ShapeBuckets[_Prepared] = ShapeBuckets(self.batch_size, self.max_pending)
            finished = 0
            while finished < self.workers:
                item = _get(q_prepared, stop)
                if item is _END:
                    finished += 1
                elif isinstance(item, FailureRecord):
                    _put(q_batches, item, stop)
                else:
                    for batch in buckets.add(item.plan.out, item):
                        _put(q_batches, self._collate(batch, counters), stop)
            for batch in buckets.drain():
                _put(q_batches, self._collate(batch, counters), stop)
            for _ in range(self.streams):
                _put(q_batches, _END, stop)

        def infer() -> None:
            while (item := _get(q_batches, stop)) is not _END:
                written = self._infer(item, counters) if isinstance(item, _Batch) else _Written([], [item], None)
                _put(q_written, written, writer_stop)

        def write() -> None:
            while (item := _get(q_written, writer_stop)) is not _END:
                t0 = time.perf_counter()
                for failure in item.failures:
                    self.sink.write_failure(failure)
                if item.records:
                    self.sink.write_batch(item.records, item.originals)
                counters.add_time("write", time.perf_counter() - t0)
                counters.leave(len(item.records) + len(item.failures))
                with counters.lock:
                    counters.images += len(item.records)
                    counters.failed += len(item.failures)
                    counters.detections += sum(len(r.detections) for r in item.records)
                    done, failed = counters.images, counters.failed
                if self.on_progress is not None:
                    self.on_progress(done, failed)

        threads = [threading.Thread(target=guard(feed, stop), name="infer-feed", daemon=True)]
        threads += [threading.Thread(target=guard(decode, stop), name=f"infer-decode-{i}", daemon=True)
                    for i in range(self.workers)]
        threads.append(threading.Thread(target=guard(collate, stop), name="infer-collate", daemon=True))
        threads += [threading.Thread(target=guard(infer, stop), name=f"infer-stream-{i}", daemon=True)
                    for i in range(1, self.streams)]
        writer = threading.Thread(target=guard(write, writer_stop), name="infer-write", daemon=True)
        for thread in (*threads, writer):
            thread.start()
        try:
            try:
                infer()  # stream 0 runs here, so Ctrl-C lands in an inference loop
                for thread in threads:  # the other streams finish the batches they hold
                    thread.join()
            except _Stopped:
                pass  # a stage failed: its error is raised below, after cleanup
        finally:
            stop.set()
            for thread in threads:
                thread.join(_JOIN_S)
            if writer.is_alive():
                try:  # let the writer finish what was computed, then end
                    _put(q_written, _END, writer_stop)
                except _Stopped:
                    pass
                writer.join(_JOIN_S)
            for thread in (*threads, writer):
                if thread.is_alive():  # only a stage stuck in a blocking call can get here
                    log.error("pipeline thread %s did not stop within %.0f s", thread.name, _JOIN_S)
        if errors:
            raise errors[0]
        return PipelineStats(
            images=counters.images, failed=counters.failed, detections=counters.detections,
            batches=counters.batches, wall_s=time.perf_counter() - start, stage_s=dict(counters.stage_s),
            queue_high_water={"paths": q_paths.high_water, "prepared": q_prepared.high_water,
                              "batches": q_batches.high_water, "written": q_written.high_water},
            queue_bounds=dict(self.bounds), max_in_flight=counters.max_in_flight,
            in_flight_bound=self.in_flight_bound(), padding=counters.padding,
            oom_events=tuple(self.batch_size.events), final_batch=self.batch_size())

    def _prepare(self, path: str, counters: _Counters) -> _Prepared | FailureRecord:
        try:
            decoded = self.read(path)
        except DecodeError as exc:
            counters.enter()
            return FailureRecord(path=path, kind=exc.kind.value, reason=exc.reason)
        t0 = time.perf_counter()
        pixels, plan = self.backend.prepare(decoded.pixels)
        letterbox_s = time.perf_counter() - t0
        counters.add_time("decode", decoded.decode_s)
        counters.add_time("letterbox", letterbox_s)
        counters.enter()
        return _Prepared(path=path, pixels=pixels, plan=plan, original=decoded.pixels if self.keep_originals else None,
                         decode_s=decoded.decode_s, letterbox_s=letterbox_s)

    def _collate(self, items: list[_Prepared], counters: _Counters) -> _Batch:
        t0 = time.perf_counter()
        host = self.backend.collate([i.pixels for i in items])
        counters.add_time("collate", time.perf_counter() - t0)
        return _Batch(items=items, host=host)

    def _infer(self, batch: _Batch, counters: _Counters) -> _Written:
        t0 = time.perf_counter()
        whole = len(batch.items)

        def run(chunk: Sequence[_Prepared]) -> list[list[Detection]]:
            host = batch.host if len(chunk) == whole else self.backend.collate([i.pixels for i in chunk])
            return self.backend.run(host, [i.plan for i in chunk])

        outcomes = run_with_split(batch.items, run, self.batch_size, on_oom=self.backend.release)
        seconds = time.perf_counter() - t0
        counters.add_time("inference", seconds)
        records: list[ImageRecord] = []
        failures: list[FailureRecord] = []
        per_image_ms = seconds * 1e3 / whole
        for item, outcome in zip(batch.items, outcomes):
            if isinstance(outcome, OutOfMemoryAlone):
                failures.append(FailureRecord(item.path, FailureKind.DEVICE_MEMORY.value, str(outcome)))
                continue
            height, width = item.plan.source
            records.append(ImageRecord(path=item.path, width=width, height=height, detections=tuple(outcome),
                                       timing_ms={"decode": item.decode_s * 1e3, "letterbox": item.letterbox_s * 1e3,
                                                  "inference": per_image_ms, "batch": float(whole)}))
        with counters.lock:
            counters.batches += 1
            counters.padding = counters.padding + batch_padding(
                batch.items[0].plan.out, (i.plan.content_pixels for i in batch.items), self.imgsz)
        originals = {i.path: i.original for i in batch.items if i.original is not None} if self.keep_originals else None
        return _Written(records=records, failures=failures, originals=originals)


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            q.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while True:
        if stop.is_set():  # before taking more work: a failed run should not start another batch
            raise _Stopped
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            if stop.is_set():
                raise _Stopped from None
