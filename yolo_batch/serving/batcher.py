"""The dynamic batcher: single items in, batches to a ``process`` function, one future per item out.

A batch is dispatched when it holds ``max_batch`` items or when its oldest item has waited ``max_delay``
(Triton's dynamic batcher and Ray Serve's ``_BatchQueue`` follow the same policy); with several batch threads
(``concurrency``, one per CPU core on a CPU), a due batch is shared among the idle ones. Knows nothing of HTTP
or torch: ``process(items) -> results`` is any callable, so tests drive it with a fake.

* Each item has its own :class:`concurrent.futures.Future`; a per-item exception in the results reaches
  that item only, an exception from ``process`` reaches exactly the items of that batch, and a result
  count that differs from the batch size fails that batch's items with :class:`BatchMismatch`.
* The queue is bounded: :meth:`DynamicBatcher.submit_many` raises :class:`QueueFull` and adds nothing.
* An item whose deadline has passed when its batch forms gets :class:`DeadlineExceeded` and is not run;
  a cancelled future (its caller gave up) is skipped.
* :meth:`DynamicBatcher.stop` stops intake (:class:`ShuttingDown` for new items), dispatches what is queued
  without waiting for batches to fill until the grace period ends, then fails the rest with
  :class:`ShuttingDown`, and joins its threads.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_JOIN_SLACK_S = 60.0  # a batch already on the device when the grace period ends is waited for this long


class QueueFull(Exception):
    """The queue holds ``queue_size`` items: nothing was added (HTTP 429)."""


class DeadlineExceeded(Exception):
    """The item's deadline passed before its batch formed (HTTP 504)."""


class ShuttingDown(Exception):
    """The batcher is stopping: not accepted, or not reached within the grace period (HTTP 503)."""


class BatchMismatch(RuntimeError):
    """``process`` returned a different number of results than the batch held."""


@dataclass(frozen=True)
class BatchInfo:
    """One dispatched batch, for metrics."""

    size: int
    oldest_wait_s: float  # how long its oldest item queued
    duration_s: float  # the ``process`` call
    failed: bool  # ``process`` raised, or returned the wrong number of results


@dataclass
class _Entry(Generic[T, R]):
    item: T
    future: Future[R]
    enqueued: float
    deadline: float | None


class DynamicBatcher(Generic[T, R]):
    """Groups submitted items into batches for ``process``; see the module docstring.

    Args:
        process: items -> one result (or exception instance) per item, in order.
        max_batch: the most items in a batch; a callable is read at every batch (it may shrink after an
            out-of-memory split).
        max_delay_s: the longest the oldest queued item waits for its batch to fill.
        queue_size: the most items waiting for a batch.
        concurrency: batches processed side by side (one thread each).
        on_batch: called after every batch (from a batch thread).
        clock: monotonic seconds (deadlines use the same clock).
    """

    def __init__(self, process: Callable[[Sequence[T]], Sequence[R | BaseException]],
                 max_batch: int | Callable[[], int], max_delay_s: float, queue_size: int, concurrency: int = 1,
                 on_batch: Callable[[BatchInfo], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, name: str = "batcher") -> None:
        if isinstance(max_batch, int) and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay_s < 0 or queue_size < 1 or concurrency < 1:
            raise ValueError("max_delay_s must be >= 0, queue_size and concurrency >= 1")
        self._process = process
        self._max_batch: Callable[[], int] = (lambda: max_batch) if isinstance(max_batch, int) else max_batch
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self.concurrency = concurrency
        self._on_batch = on_batch
        self._clock = clock
        self._name = name
        self._queue: collections.deque[_Entry[T, R]] = collections.deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._accepting = False
        self._stopping = False
        self._drain_until = 0.0
        self._stopped = threading.Event()
        self._idle = 0  # batch threads waiting for a batch (guarded by _cond)
        self._due = 0  # queued items already due (the rest of a shared batch): dispatched without waiting

    # --- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the batch threads (once)."""
        with self._cond:
            if self._threads:
                raise RuntimeError("batcher already started")
            self._accepting = True
            self._threads = [threading.Thread(target=self._loop, name=f"{self._name}-{i}", daemon=True)
                             for i in range(self.concurrency)]
        for thread in self._threads:
            thread.start()

    def stop(self, grace_s: float = 0.0) -> int:
        """Stop intake, dispatch what is queued for up to ``grace_s``, fail the rest, join the threads.

        Safe to call more than once and from several threads (later calls wait for the first to finish).

        Returns:
            The number of queued items failed with :class:`ShuttingDown`.
        """
        with self._cond:
            first = not self._stopping
            if first:
                self._accepting = False
                self._stopping = True
                self._drain_until = self._clock() + max(grace_s, 0.0)
                self._cond.notify_all()
        if not first:
            self._stopped.wait(grace_s + _JOIN_SLACK_S)
            return 0
        try:
            for thread in self._threads:
                thread.join(max(grace_s, 0.0) + _JOIN_SLACK_S)
                if thread.is_alive():  # only a process() call that never returns gets here
                    log.error("batch thread %s still running after the grace period", thread.name)
        finally:
            rejected = self._fail_all(ShuttingDown("the service is shutting down"))
            self._stopped.set()
        return rejected

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        with self._cond:
            return len(self._queue)

    @property
    def idle_threads(self) -> int:
        """Batch threads waiting for a batch."""
        with self._cond:
            return self._idle

    @property
    def accepting(self) -> bool:
        with self._cond:
            return self._accepting

    # --- intake ----------------------------------------------------------------------------------------------

    def submit(self, item: T, deadline: float | None = None) -> Future[R]:
        """Queue one item; see :meth:`submit_many`."""
        return self.submit_many([item], deadline)[0]

    def submit_many(self, items: Sequence[T], deadline: float | None = None) -> list[Future[R]]:
        """Queue ``items`` (all or none), each with its own future.

        Args:
            deadline: on :attr:`clock`'s scale; items still queued then get :class:`DeadlineExceeded`.

        Raises:
            QueueFull: fewer than ``len(items)`` free places.
            ShuttingDown: not started, or stopping.
        """
        now = self._clock()
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the service is shutting down" if self._stopping else "the batcher is not running")
            if len(self._queue) + len(items) > self.queue_size:
                self._prune_cancelled()
                if len(self._queue) + len(items) > self.queue_size:
                    raise QueueFull(f"queue full: {len(self._queue)} of {self.queue_size} places taken")
            entries: list[_Entry[T, R]] = [_Entry(item, Future(), now, deadline) for item in items]
            self._queue.extend(entries)
            self._cond.notify_all()
        return [e.future for e in entries]

    # --- batching --------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[_Entry[T, R]] | None:
        """Block until a batch is due (full, or its oldest item waited max_delay); None once stopped.

        With several batch threads idle, a due batch takes only its share of the queue (the others take
        the rest at once), so idle threads are not left waiting while one of them runs everything.
        """
        with self._cond:
            self._idle += 1
            try:
                while True:
                    now = self._clock()
                    if self._stopping and (not self._queue or now >= self._drain_until):
                        return None
                    if self._queue:
                        limit = max(1, self._max_batch())
                        wait = self._queue[0].enqueued + self.max_delay_s - now
                        triggered = len(self._queue) >= limit or wait <= 0 or self._stopping
                        if triggered or self._due > 0:
                            # Due now: up to a batch per idle thread (or what an earlier share left), spread evenly.
                            due = max(min(len(self._queue), limit * self._idle) if triggered else 0,
                                      min(self._due, len(self._queue)))
                            share = min(limit, -(-due // self._idle))
                            batch = self._take(share, now)
                            self._due = max(due - share, 0)
                            if self._due:
                                self._cond.notify_all()
                            if batch:
                                return batch
                            continue  # all taken items were cancelled or expired: look again
                        self._cond.wait(wait)
                    else:
                        self._due = 0
                        self._cond.wait(None if not self._stopping else max(self._drain_until - now, 0.0))
            finally:
                self._idle -= 1

    def _take(self, limit: int, now: float) -> list[_Entry[T, R]]:
        """Pop up to ``limit`` live items; expired ones get DeadlineExceeded, cancelled ones are dropped."""
        batch: list[_Entry[T, R]] = []
        while self._queue and len(batch) < limit:
            entry = self._queue.popleft()
            if entry.deadline is not None and now >= entry.deadline:
                if entry.future.set_running_or_notify_cancel():
                    entry.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            if entry.future.set_running_or_notify_cancel():
                batch.append(entry)
        return batch

    def _run(self, batch: list[_Entry[T, R]]) -> None:
        start = self._clock()
        oldest_wait = start - min(e.enqueued for e in batch)
        failed = False
        try:
            results = self._process([e.item for e in batch])
        except Exception as exc:  # the whole batch failed: exactly its items get the error
            log.exception("batch of %d failed", len(batch))
            failed = True
            for entry in batch:
                entry.future.set_exception(exc)
        else:
            if len(results) != len(batch):
                failed = True
                error = BatchMismatch(f"process returned {len(results)} results for a batch of {len(batch)}")
                log.error("%s", error)
                for entry in batch:
                    entry.future.set_exception(error)
            else:
                for entry, result in zip(batch, results):
                    if isinstance(result, BaseException):
                        entry.future.set_exception(result)
                    else:
                        entry.future.set_result(result)
        if self._on_batch is not None:
            self._on_batch(BatchInfo(size=len(batch), oldest_wait_s=oldest_wait,
                                     duration_s=self._clock() - start, failed=failed))

    def _prune_cancelled(self) -> None:
        self._queue = collections.deque(e for e in self._queue if not e.future.cancelled())

    def _fail_all(self, error: BaseException) -> int:
        with self._cond:
            entries = list(self._queue)
            self._queue.clear()
        failed = 0
        for entry in entries:
            if entry.future.set_running_or_notify_cancel():
                entry.future.set_exception(error)
                failed += 1
        return failed
