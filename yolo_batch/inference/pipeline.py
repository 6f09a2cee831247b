"""Local ``infer``: named stages joined by bounded queues.

    feed --paths--> decode (N threads) --prepared--> batch --batches--> infer (S streams) --written--> write

Each stage is a small object with one loop (:class:`Feed`, :class:`Decode`, :class:`Batcher`, :class:`Infer`,
:class:`Write`); the per-item work is the shared steps of :mod:`.stages`. Every queue has a ``maxsize`` and the
shape buckets a ``max_pending``, so the images alive at once have a fixed bound (:meth:`Pipeline.in_flight_bound`)
however long the stream. Inference stream 0 runs in the calling thread (so Ctrl-C lands in an inference loop);
the other stages are threads that poll a stop event, so an error in any stage, or Ctrl-C, stops them all and
:meth:`Pipeline.run` joins them in ``finally``. Results already computed when a run is stopped are still
written (they are valid), then the first error is re-raised.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from yolo_batch.inference.buckets import NO_PADDING, PaddingStats, ShapeBuckets
from yolo_batch.inference.decode import DecodedImage
from yolo_batch.inference.oom_split import BatchSize, OomEvent
from yolo_batch.inference.stages import (
    Backend,
    Batch,
    InferStep,
    Prepared,
    PrepareStep,
    StageTimes,
    Written,
)
from yolo_batch.inference.writers import FailureRecord, ImageRecord

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often a blocked stage looks at its stop event
_JOIN_S = 30.0
_END = object()  # end of stream, one per consumer thread


class Sink(Protocol):
    """Where results go (:class:`yolo_batch.inference.writers.ResultWriter` is one)."""

    def write_batch(self, records: Sequence[ImageRecord], images: dict[str, np.ndarray] | None = None) -> None: ...

    def write_failure(self, failure: FailureRecord) -> None: ...


class Stopped(Exception):
    """Raised inside a stage when the run is being stopped."""


class Link:
    """A bounded queue between two stages; blocking calls give up when ``stop`` is set."""

    def __init__(self, name: str, maxsize: int, stop: threading.Event) -> None:
        self.name = name
        self.maxsize = maxsize
        self.stop = stop
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self.high_water = 0

    def put(self, item: Any) -> None:
        while True:
            if self.stop.is_set():
                raise Stopped
            try:
                self._queue.put(item, timeout=_POLL_S)
            except queue.Full:
                continue
            self.high_water = max(self.high_water, self._queue.qsize())
            return

    def get(self) -> Any:
        while True:
            if self.stop.is_set():  # before taking more work: a failed run should not start another batch
                raise Stopped
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue


@dataclass
class Tally:
    """What the run did so far, and the images alive in it (thread-safe)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    times: StageTimes = field(default_factory=StageTimes)
    in_flight: int = 0
    max_in_flight: int = 0
    images: int = 0
    failed: int = 0
    detections: int = 0
    batches: int = 0
    padding: PaddingStats = NO_PADDING

    def enter(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def written(self, written: Written) -> tuple[int, int]:
        """Count a written batch; returns (images done, failed) so far."""
        with self.lock:
            self.in_flight -= len(written.records) + len(written.failures)
            self.images += len(written.records)
            self.failed += len(written.failures)
            self.detections += sum(len(r.detections) for r in written.records)
            if written.padding.images:  # a batch ran (failures from decoding come without one)
                self.batches += 1
                self.padding = self.padding + written.padding
            return self.images, self.failed


class Feed:
    """Puts every path on ``out``, then one end marker per decode thread."""

    name = "feed"

    def __init__(self, paths: Sequence[str], out: Link, consumers: int) -> None:
        self.paths, self.out, self.consumers = paths, out, consumers

    def loop(self) -> None:
        for path in self.paths:
            self.out.put(path)
        for _ in range(self.consumers):
            self.out.put(_END)


class Decode:
    """Path -> :class:`Prepared` (or its failure record); one loop per decode thread."""

    name = "decode"

    def __init__(self, read: Callable[[str], DecodedImage], step: PrepareStep, inbox: Link, out: Link,
                 tally: Tally) -> None:
        self.read, self.step, self.inbox, self.out, self.tally = read, step, inbox, out, tally

    def loop(self) -> None:
        while (path := self.inbox.get()) is not _END:
            item = self.step.from_file(self.read, path)
            if isinstance(item, Prepared):
                self.tally.times.add("decode", item.decode_s)
                self.tally.times.add("letterbox", item.letterbox_s)
            self.tally.enter()
            self.out.put(item)
        self.out.put(_END)


class Batcher:
    """Prepared images -> same-shape :class:`Batch` es (shape buckets); failures pass straight through."""

    name = "batch"

    def __init__(self, step: InferStep, max_pending: int, producers: int, consumers: int, inbox: Link,
                 out: Link, tally: Tally) -> None:
        self.step, self.max_pending, self.producers, self.consumers = step, max_pending, producers, consumers
        self.inbox, self.out, self.tally = inbox, out, tally

    def loop(self) -> None:
        buckets: ShapeBuckets[Prepared] = ShapeBuckets(self.step.batch_size, self.max_pending)
        finished = 0
        while finished < self.producers:
            item = self.inbox.get()
            if item is _END:
                finished += 1
            elif isinstance(item, FailureRecord):
                self.out.put(item)
            else:
                for ready in buckets.add(item.plan.out, item):
                    self.out.put(self._collate(ready))
        for ready in buckets.drain():
            self.out.put(self._collate(ready))
        for _ in range(self.consumers):
            self.out.put(_END)

    def _collate(self, items: list[Prepared]) -> Batch:
        t0 = time.perf_counter()
        batch = self.step.collate(items)
        self.tally.times.add("collate", time.perf_counter() - t0)
        return batch


class Infer:
    """Batches -> :class:`Written` through the shared :class:`InferStep`; one loop per inference stream."""

    name = "infer"

    def __init__(self, step: InferStep, inbox: Link, out: Link, tally: Tally) -> None:
        self.step, self.inbox, self.out, self.tally = step, inbox, out, tally

    def loop(self) -> None:
        while (item := self.inbox.get()) is not _END:
            if isinstance(item, Batch):
                written = self.step(item)
                self.tally.times.add("inference", written.seconds)
            else:
                written = Written(records=[], failures=[item])
            self.out.put(written)


class Write:
    """Written batches -> the sink, in arrival order; reports progress."""

    name = "write"

    def __init__(self, sink: Sink, inbox: Link, tally: Tally,
                 on_progress: Callable[[int, int], None] | None) -> None:
        self.sink, self.inbox, self.tally, self.on_progress = sink, inbox, tally, on_progress

    def loop(self) -> None:
        while (item := self.inbox.get()) is not _END:
            t0 = time.perf_counter()
            for failure in item.failures:
                self.sink.write_failure(failure)
            if item.records:
                self.sink.write_batch(item.records, item.originals)
            self.tally.times.add("write", time.perf_counter() - t0)
            done, failed = self.tally.written(item)
            if self.on_progress is not None:
                self.on_progress(done, failed)


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
        self.read = read
        self.sink = sink
        self.batch_size = batch_size
        self.workers = workers
        self.streams = streams
        self.on_progress = on_progress
        self.prepare_step = PrepareStep(backend, keep_originals)
        self.infer_step = InferStep(backend, batch_size, imgsz)
        batch = batch_size()
        self.max_pending = 2 * batch
        self.bounds = {"paths": 2 * workers, "prepared": 2 * workers + batch, "batches": 2 * streams,
                       "written": 2 * streams}

    def in_flight_bound(self) -> int:
        """Most decoded images alive at once: in decode, queued, in buckets, in batches, being written."""
        batch = self.batch_size()
        return (self.workers + self.bounds["prepared"] + self.max_pending
                + (self.bounds["batches"] + 1 + self.streams + self.bounds["written"] + 1) * batch)

    def run(self, paths: Sequence[str], stop: threading.Event | None = None) -> PipelineStats:
        """Process ``paths``; re-raises the first stage error (or KeyboardInterrupt) after cleanup.

        Args:
            stop: set it (from any thread) to end the run early, as an error would: no new batch starts, what
                was computed is still written, and the stats count what was done. The run sets it when it ends.
        """
        start = time.perf_counter()
        stop = stop if stop is not None else threading.Event()  # upstream stages: stop producing
        writer_stop = threading.Event()  # the writer: stop without draining (its own failure)
        tally = Tally()
        links = {name: Link(name, size, writer_stop if name == "written" else stop)
                 for name, size in self.bounds.items()}
        feed = Feed(paths, links["paths"], self.workers)
        decode = Decode(self.read, self.prepare_step, links["paths"], links["prepared"], tally)
        batcher = Batcher(self.infer_step, self.max_pending, self.workers, self.streams, links["prepared"],
                          links["batches"], tally)
        infer = Infer(self.infer_step, links["batches"], links["written"], tally)
        write = Write(self.sink, links["written"], tally, self.on_progress)
        runner = _Threads(stop)
        upstream = [runner.start(feed, stop), *(runner.start(decode, stop, i) for i in range(self.workers)),
                    runner.start(batcher, stop), *(runner.start(infer, stop, i) for i in range(1, self.streams))]
        writer = runner.start(write, writer_stop)
        try:
            try:
                infer.loop()  # stream 0
                for thread in upstream:  # the other streams finish the batches they hold
                    thread.join()
            except Stopped:
                pass  # a stage failed: its error is raised below, after cleanup
        finally:
            stop.set()
            runner.join(upstream)
            if writer.is_alive():
                with contextlib.suppress(Stopped):  # let the writer finish what was computed, then end
                    links["written"].put(_END)
                runner.join([writer])
        runner.raise_first()
        return PipelineStats(
            images=tally.images, failed=tally.failed, detections=tally.detections, batches=tally.batches,
            wall_s=time.perf_counter() - start, stage_s=dict(tally.times.seconds),
            queue_high_water={name: link.high_water for name, link in links.items()},
            queue_bounds=dict(self.bounds), max_in_flight=tally.max_in_flight,
            in_flight_bound=self.in_flight_bound(), padding=tally.padding,
            oom_events=tuple(self.batch_size.events), final_batch=self.batch_size())


class _Threads:
    """Starts stage loops in threads; the first error stops the run and is re-raised by the caller."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def start(self, stage: Any, on_error: threading.Event, index: int | None = None) -> threading.Thread:
        def target() -> None:
            try:
                stage.loop()
            except Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001  (handed to the calling thread, which re-raises it)
                self.errors.append(exc)
                on_error.set()
                self.stop.set()

        name = f"infer-{stage.name}" + (f"-{index}" if index is not None else "")
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def join(self, threads: Sequence[threading.Thread]) -> None:
        for thread in threads:
            thread.join(_JOIN_S)
            if thread.is_alive():  # only a stage stuck in a blocking call can get here
                log.error("pipeline thread %s did not stop within %.0f s", thread.name, _JOIN_S)

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]
