"""What one running service holds and the order things start and stop in (no HTTP here).

Start (:meth:`ServiceState.start`, from the app's lifespan): a loader thread builds the backend, warms it
up (and measures ``max_batch auto``), then starts the decode pool, the batcher and the hot folder, and
only then marks the service ready. ``/healthz`` answers throughout; ``/readyz`` once ready.

Stop (:meth:`ServiceState.begin_shutdown` on SIGTERM, then :meth:`ServiceState.close`): new requests get
503 at once; the hot folder takes no new files; requests already accepted finish decoding and join the
queue; the batcher dispatches what is queued within the grace period and fails the rest with 503; then the
hot folder journals what finished, and the pool and the backend are released, in that order, each in
``finally``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from yolo_batch import __version__
from yolo_batch.inference.config import default_workers
from yolo_batch.inference.stages import Prepared
from yolo_batch.inference.writers import ImageRecord
from yolo_batch.serving.backend import Backend, ItemResult
from yolo_batch.serving.batcher import BatchInfo, DynamicBatcher, ShuttingDown
from yolo_batch.serving.config import ServeConfig
from yolo_batch.serving.hotfolder import HotFolder
from yolo_batch.serving.metrics import ServiceMetrics

log = logging.getLogger(__name__)

BackendFactory = Callable[[ServeConfig], Backend]
_CLOSE_SLACK_S = 60.0


def record(prepared: Prepared, result: ItemResult, wait_ms: float | None = None) -> dict[str, Any]:
    """One image's answer in infer's results.jsonl schema (path, width, height, detections, timing_ms).

    ``timing_ms`` holds infer's decode, letterbox, inference (per image) and batch, plus ``wait``: from
    joining the queue to the batch's results (queueing, batching delay and the batch itself).
    """
    timing = {"decode": prepared.decode_s * 1e3, "letterbox": prepared.letterbox_s * 1e3,
              "inference": result.inference_ms, "batch": float(result.batch)}
    if wait_ms is not None:
        timing["wait"] = wait_ms
    return ImageRecord(path=prepared.path, width=prepared.width, height=prepared.height,
                       detections=result.detections, timing_ms=timing).to_dict()


class ServiceState:
    """The service's moving parts, created by the loader thread and stopped in order.

    Args:
        config: the settings.
        backend_factory: builds the model side (called in the loader thread).
        metrics: where counts and timings go.
    """

    def __init__(self, config: ServeConfig, backend_factory: BackendFactory, metrics: ServiceMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.backend_factory = backend_factory
        self.backend: Backend | None = None
        self.batcher: DynamicBatcher[Prepared, ItemResult] | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.hotfolder: HotFolder | None = None
        self.ready = threading.Event()
        self.draining = threading.Event()
        self.load_error: str | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None  # the server exits on a failed start
        self.admitted = 0  # images accepted over HTTP and not yet answered (touched by the event loop only)
        self._decoding = 0  # of those, not yet queued (a drain waits for them); guarded by _decode_cond
        self.batch_s = 0.0  # recent batch duration (moving average), for Retry-After
        self._decode_cond = threading.Condition()
        self._loader: threading.Thread | None = None
        self._drainer: threading.Thread | None = None
        self._lock = threading.Lock()
        metrics.track_queue(lambda: self.batcher.depth if self.batcher is not None else 0)

    # --- start -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load and warm up in a thread of its own; :attr:`ready` is set when done."""
        self._loader = threading.Thread(target=self._load, name="serve-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            started = time.perf_counter()
            backend = self.backend_factory(self.config)
            self.backend = backend
            backend.on_oom = self.metrics.oom.inc
            backend.warm_up()
            with self._lock:
                if self.draining.is_set():
                    return
                self.executor = ThreadPoolExecutor(max_workers=self._workers(backend),
                                                   thread_name_prefix="serve-decode")
                self.batcher = DynamicBatcher(backend.process, max_batch=lambda: backend.batch_size(),
                                              max_delay_s=self.config.max_delay_ms / 1e3,
                                              queue_size=self.config.queue_size, concurrency=backend.streams,
                                              on_batch=self._on_batch, name="serve-batch")
                self.batcher.start()
                if self.config.watch is not None and self.config.out is not None:
                    window = max(2 * backend.batch_size() * backend.streams, 4)
                    self.hotfolder = HotFolder(self.config.watch, self.config.out, self.submit_file,
                                               poll_s=self.config.poll_ms / 1e3,
                                               window=min(window, self.config.queue_size),
                                               max_bytes=self.config.max_image_bytes, on_file=self._on_file,
                                               settle_s=self.config.settle_ms / 1e3,
                                               corrupt_retry_s=self.config.corrupt_retry_s)
                    self.hotfolder.start()
                info = backend.info()
                self.metrics.info.labels(__version__, self.config.model, str(info.get("device"))).set(1)
                self.metrics.ready.set(1)
                self.ready.set()
            log.info("ready (warmed up in %.1f s): %s on %s, max batch %s, %d stream(s), max delay %g ms",
                     time.perf_counter() - started, self.config.model, info.get("device"), info.get("max_batch"),
                     backend.streams, self.config.max_delay_ms)
        except Exception as exc:  # noqa: BLE001  (reported by /readyz and, under the server, ends the process)
            self.load_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.error("the service could not start: %s", self.load_error)
            if self.on_fatal is not None:
                self.on_fatal(exc)

    def _workers(self, backend: Backend) -> int:
        return self.config.workers or default_workers(on_gpu=str(backend.info().get("device", "cpu")) != "cpu")

    def _on_batch(self, info: BatchInfo) -> None:
        self.metrics.observe_batch(info.size, info.oldest_wait_s, info.duration_s)
        self.batch_s = info.duration_s if self.batch_s == 0 else 0.8 * self.batch_s + 0.2 * info.duration_s

    def _on_file(self, outcome: str) -> None:
        self.metrics.images.labels("watch", outcome).inc()

    def not_ready_reason(self) -> str | None:
        """Why /readyz says no (None: ready)."""
        if self.draining.is_set():
            return "shutting down"
        if self.load_error is not None:
            return f"start failed: {self.load_error}"
        if not self.ready.is_set():
            return "loading and warming up the model"
        if self.hotfolder is not None and self.hotfolder.error is not None:
            return f"hot folder stopped: {self.hotfolder.error}"
        return None

    def retry_after_s(self) -> int:
        """A client's fair wait: the queued batches at the recent batch duration, at least 1 s."""
        depth = self.batcher.depth if self.batcher is not None else 0
        size = max(1, self.backend.batch_size()) if self.backend is not None else 1
        streams = max(1, getattr(self.backend, "streams", 1))
        return max(1, int(depth / size / streams * self.batch_s + 0.999))

    @contextlib.contextmanager
    def decoding(self, count: int) -> Iterator[None]:
        """Marks ``count`` accepted images as on their way to the queue (decoding): a drain lets them in."""
        with self._decode_cond:
            self._decoding += count
        try:
            yield
        finally:
            with self._decode_cond:
                self._decoding -= count
                self._decode_cond.notify_all()

    # --- the hot folder's way in -----------------------------------------------------------------------------

    def submit_file(self, data: bytes, name: str) -> Future[dict[str, Any]]:
        """Decode in the pool, queue without a deadline; the future holds the file's result fields."""
        outer: Future[dict[str, Any]] = Future()
        backend, batcher, executor = self.backend, self.batcher, self.executor
        if backend is None or batcher is None or executor is None:
            outer.set_exception(ShuttingDown("the service is not running"))
            return outer

        def chain(prepared: Prepared, inner: Future[ItemResult]) -> None:
            error = inner.exception()
            if error is not None:
                outer.set_exception(error)
            else:
                outer.set_result(record(prepared, inner.result()))

        def work() -> None:
            try:
                prepared = backend.prepare(data, name)
                inner = batcher.submit(prepared)
            except Exception as exc:  # noqa: BLE001  (decode failures, a full queue, shutdown: the hot folder sorts them)
                outer.set_exception(exc)
                return
            inner.add_done_callback(lambda f: chain(prepared, f))

        try:
            executor.submit(work)
        except RuntimeError:  # the pool is shut down
            outer.set_exception(ShuttingDown("the service is shutting down"))
        return outer

    # --- stop ------------------------------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Refuse new work at once and drain the batcher in the background (safe from a signal handler)."""
        with self._lock:
            if self.draining.is_set():
                return
            self.draining.set()
            self.metrics.ready.set(0)
            self._drainer = threading.Thread(target=self._drain, name="serve-drain", daemon=True)
            self._drainer.start()
        log.info("shutting down: no new work; queued images get up to %.0f s", self.config.grace_s)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.config.grace_s
        if self.hotfolder is not None:
            self.hotfolder.stop_intake()
        with self._decode_cond:  # requests accepted before the signal still reach the queue
            self._decode_cond.wait_for(lambda: self._decoding == 0, timeout=self.config.grace_s)
        if self.batcher is not None:
            rejected = self.batcher.stop(max(deadline - time.monotonic(), 0.0))
            if rejected:
                log.warning("%d queued image(s) not reached within the grace period: answered 503", rejected)

    def close(self) -> None:
        """Stop everything in order (idempotent); each step runs even if an earlier one failed."""
        self.begin_shutdown()
        budget = self.config.grace_s + _CLOSE_SLACK_S
        try:
            if self._drainer is not None:
                self._drainer.join(budget)
            if self._loader is not None:
                self._loader.join(budget)  # a model still loading cannot be interrupted
        finally:
            try:
                if self.hotfolder is not None:
                    self.hotfolder.join(budget)
            finally:
                try:
                    if self.executor is not None:
                        self.executor.shutdown(wait=True, cancel_futures=True)
                finally:
                    if self.backend is not None:
                        self.backend.close()
