"""Out of device memory during a batch: split it in halves and retry, so no image is lost.

The split is a pure recursion over a ``run`` callable; :func:`yolo_batch.core.oom.is_oom_error` decides what
counts as out-of-memory and every other error is re-raised. A retry never runs inside the ``except`` block: the
handler returns a plain value, so the failed attempt's traceback (and the activations its frames hold) is gone
before the cache is released and the smaller batches run. :class:`BatchSize` is the shared, shrinking
batch size the batching stage reads, so the size that worked is kept for the rest of the run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from yolo_batch.core.oom import is_oom_error

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class OomEvent:
    """A batch of ``batch`` images ran out of memory; the run goes on at ``new_batch``."""

    batch: int
    new_batch: int

    def to_dict(self) -> dict[str, int]:
        return {"batch": self.batch, "new_batch": self.new_batch}


class OutOfMemoryAlone(Exception):
    """One image does not fit on the device even in a batch of its own."""


class BatchSize:
    """The run's current batch size: read by the batching thread, shrunk by the inference thread."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        self._size = size
        self._lock = threading.Lock()
        self.events: list[OomEvent] = []

    def __call__(self) -> int:
        with self._lock:
            return self._size

    def shrink_after_oom(self, failed: int) -> OomEvent:
        """Record that ``failed`` images did not fit; the size becomes at most half of it."""
        with self._lock:
            self._size = max(1, min(self._size, failed // 2))
            event = OomEvent(batch=failed, new_batch=self._size)
            self.events.append(event)
        log.warning("out of device memory at batch %d: split and retried; batch size is now %d",
                    failed, event.new_batch)
        return event


@dataclass(frozen=True)
class Attempt(Generic[T]):
    """One call of ``run`` (for tests and reports: the exact sequence of sizes tried)."""

    size: int
    oom: bool


def run_with_split(items: Sequence[T], run: Callable[[Sequence[T]], Sequence[R]], size: BatchSize,
                   on_oom: Callable[[], None] | None = None,
                   attempts: list[Attempt[T]] | None = None) -> list[R | OutOfMemoryAlone]:
    """``run(items)``; on out-of-memory, shrink the batch size (at most half) and retry in chunks of it.

    Items beyond the current size are run in chunks of it from the start. Results stay aligned with ``items``.

    Args:
        run: returns one result per item, in order.
        size: shrunk at every out-of-memory error.
        on_oom: called after each out-of-memory error (release cached device memory there).
        attempts: if given, every call is appended to it.

    Returns:
        One result per item; an :class:`OutOfMemoryAlone` for an item that failed on its own.
    """
    if not items:
        return []
    if len(items) > size():  # formed before an earlier split shrank the size: do not retry the known-bad size
        out: list[R | OutOfMemoryAlone] = []
        start = 0
        while start < len(items):
            step = size()  # read once per chunk: a split inside the chunk may shrink it again
            out.extend(run_with_split(items[start:start + step], run, size, on_oom, attempts))
            start += step
        return out
    outcome = _attempt(items, run)
    if isinstance(outcome, _OutOfMemory):  # the handler is left: the failed attempt's tensors are unreachable now
        if attempts is not None:
            attempts.append(Attempt(size=len(items), oom=True))
        if on_oom is not None:
            on_oom()
        if len(items) == 1:
            return [OutOfMemoryAlone(f"out of device memory even alone in a batch: {outcome.message}")]
        size.shrink_after_oom(len(items))  # now at most half of len(items): the recursion below chunks and ends
        return run_with_split(items, run, size, on_oom, attempts)
    if attempts is not None:
        attempts.append(Attempt(size=len(items), oom=False))
    results: list[R | OutOfMemoryAlone] = list(outcome)
    if len(results) != len(items):
        raise RuntimeError(f"inference returned {len(results)} results for {len(items)} images")
    return results


@dataclass(frozen=True)
class _OutOfMemory:
    """An attempt ran out of memory. Only the first line of the message is kept: the exception's traceback would
    hold the failed forward pass's frames, and with them its activations, alive."""

    message: str


def _attempt(items: Sequence[T], run: Callable[[Sequence[T]], Sequence[R]]) -> list[R] | _OutOfMemory:
    """``run(items)``, or the out-of-memory error as a plain value; every other error propagates."""
    try:
        return list(run(items))
    except (RuntimeError, MemoryError) as exc:
        if not is_oom_error(exc):
            raise
        return _OutOfMemory(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
