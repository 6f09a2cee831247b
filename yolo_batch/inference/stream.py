"""Results handed to the caller as they come: the ``infer`` pipeline behind a generator.

The pipeline of :mod:`.pipeline` runs unchanged in a background thread; its writer stage writes into a
:class:`HandoffSink`, which (after the output files, when there are any) puts one :class:`Detections` per image
on a bounded :class:`Handoff` queue that the generator reads. Every queue is bounded, so a slow consumer stops
the pipeline instead of piling results up. When the consumer stops early (``break``, ``close()``, an exception,
garbage collection), the generator's ``finally`` closes the handoff and stops the pipeline, which ends its
threads the way it does on an error: no new batch starts, what was computed is still written to any output
files, and every thread is joined before the generator returns.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

import numpy as np

from yolo_batch.core.progress import ProgressReporter
from yolo_batch.inference.config import InferConfig
from yolo_batch.inference.detections import Detections
from yolo_batch.inference.pipeline import Pipeline, Sink
from yolo_batch.inference.sources import relative_names
from yolo_batch.inference.throughput import ThroughputChoice
from yolo_batch.inference.writers import FailureRecord, ImageRecord, ResultWriter

log = logging.getLogger(__name__)

_POLL_S = 0.05
_JOIN_S = 60.0
_END = object()


class Handoff:
    """A bounded queue from the pipeline's writer thread to the consumer; ``close`` releases a blocked writer."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self.closed = threading.Event()
        self.waited = threading.Event()  # set once a put had to wait for the consumer (the bound held)

    def put(self, item: Any) -> bool:
        """Block until there is room; False (the item dropped) once the consumer is gone."""
        while not self.closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                self.waited.set()
        return False

    def get(self) -> Any:
        return self._queue.get()

    def close(self) -> None:
        self.closed.set()


class HandoffSink:
    """The pipeline's sink for a consumer: optional output files first, then one :class:`Detections` per image."""

    def __init__(self, handoff: Handoff, names: Mapping[int, str], files: Sink | None = None) -> None:
        self.handoff = handoff
        self.names = dict(names)
        self.files = files

    def write_batch(self, records: Sequence[ImageRecord], images: dict[str, np.ndarray] | None = None) -> None:
        if self.files is not None:
            self.files.write_batch(records, images)
        for record in records:
            if not self.handoff.put(Detections.from_record(record, self.names)):
                return

    def write_failure(self, failure: FailureRecord) -> None:
        if self.files is not None:
            self.files.write_failure(failure)
        self.handoff.put(Detections.from_failure(failure, self.names))


def stream_pipeline(pipeline: Pipeline, paths: Sequence[str], handoff: Handoff) -> Generator[Detections, None, None]:
    """Run ``pipeline`` over ``paths`` in a background thread, yielding what its sink puts on ``handoff``.

    The pipeline's sink must put onto ``handoff`` (a :class:`HandoffSink`). A stage error reaches the consumer
    after the results computed before it.
    """
    stop = threading.Event()
    outcome: dict[str, BaseException] = {}

    def produce() -> None:
        try:
            pipeline.run(paths, stop=stop)
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer, which re-raises it)
            outcome["error"] = exc
        finally:
            handoff.put(_END)

    thread = threading.Thread(target=produce, name="infer-stream", daemon=True)

    def shut_down() -> None:
        stop.set()
        handoff.close()
        thread.join(_JOIN_S)
        if thread.is_alive():  # only a stage stuck in a blocking call (a hung device) can get here
            log.error("inference thread did not stop within %.0f s", _JOIN_S)

    # A generator left open (a `break` with the generator still referenced) is closed when it is collected; at
    # interpreter exit that may come after daemon threads were frozen mid-forward-pass, so stop them first.
    atexit.register(shut_down)
    thread.start()
    try:
        while (item := handoff.get()) is not _END:
            yield item
    finally:
        atexit.unregister(shut_down)
        shut_down()
    if "error" in outcome:
        raise outcome["error"]


def iter_inference(config: InferConfig, *, write_files: bool = False, progress: ProgressReporter | None = None,
                   on_batch_choice: Callable[[ThroughputChoice], None] | None = None
                   ) -> Generator[Detections, None, None]:
    """One :class:`Detections` per image of ``config.sources``, in completion order, from ``infer``'s pipeline.

    Args:
        config: the same settings as ``infer`` (buckets, batch or ``auto``, OOM split, decode limits).
        write_files: also write ``config.out`` as ``infer`` does (journal, formats, annotated copies); then images
            already in its journal are skipped (resume). Without it nothing is written.
        progress: told the count as results are handed over.
        on_batch_choice: told the measured batch when ``config.batch`` is ``auto``.

    Raises:
        InputError: bad sources, model or device (at the first ``next()``).
    """
    from yolo_batch.inference.runner import open_run

    with open_run(config, write_files=write_files, on_batch_choice=on_batch_choice) as run:
        if not run.pending:
            return
        handoff = Handoff(max(2 * run.batch_size(), 4))
        names = run.engine.names
        on_progress = progress.update if progress is not None else None
        if progress is not None:
            progress.start(len(run.pending), len(run.paths) - len(run.pending))
        try:
            if write_files:
                with ResultWriter(config.out, config.formats, config.save_annotated,
                                  relative_names(run.paths)) as writer:
                    yield from stream_pipeline(run.pipeline(HandoffSink(handoff, names, writer), on_progress),
                                               run.pending, handoff)
            else:
                pipeline = run.pipeline(HandoffSink(handoff, names), on_progress, keep_originals=False)
                yield from stream_pipeline(pipeline, run.pending, handoff)
        finally:
            if progress is not None:
                progress.stop()
