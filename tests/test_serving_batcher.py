"""The dynamic batcher with a fake ``process``: exact batch compositions, error routing, queue bound, deadlines,
stop with drain. Synchronisation is by events and futures with timeouts, never by sleeping."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import wait

import pytest

from yolo_batch.serving.batcher import (
    BatchInfo,
    BatchMismatch,
    DeadlineExceeded,
    DynamicBatcher,
    QueueFull,
    ShuttingDown,
)

LONG = 3600.0  # a max delay that never fires within a test: batches form by size or by stop()
T = 10.0  # how long a test waits for something that should happen at once


class Recorder:
    """``process`` that records each batch; optionally holds each call until released."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.entered.release()
        assert self.release.wait(T), "the test never released the batch"
        return [x * 10 for x in items]

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=T), "no batch started"


def until(condition, timeout: float = T) -> None:
    """Poll ``condition`` until true, failing after ``timeout`` (a condition, not a fixed wait)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def make(process, max_batch=4, max_delay_s=LONG, queue_size=100, concurrency=1, **kw) -> DynamicBatcher:
    batcher = DynamicBatcher(process, max_batch=max_batch, max_delay_s=max_delay_s, queue_size=queue_size,
                             concurrency=concurrency, **kw)
    batcher.start()
    return batcher


def test_a_full_batch_is_dispatched_at_once_with_exactly_its_items():
    rec = Recorder()
    batcher = make(rec, max_batch=3)
    try:
        futures = batcher.submit_many([1, 2, 3])
        assert [f.result(T) for f in futures] == [10, 20, 30]
        assert rec.batches == [[1, 2, 3]]
    finally:
        batcher.stop()


def test_items_beyond_max_batch_go_to_the_next_batch_in_order():
    rec = Recorder(hold=True)
    batcher = make(rec, max_batch=2)
    try:
        first = batcher.submit_many([1, 2])
        rec.wait_entered()  # batch [1, 2] is running; 3, 4, 5 queue behind it
        rest = batcher.submit_many([3, 4, 5])
        rec.release.set()
        assert [f.result(T) for f in first + rest[:2]] == [10, 20, 30, 40]
        assert batcher.stop(grace_s=T) == 0  # 5 alone never fills a batch: the drain dispatches it
        assert rest[2].result(T) == 50
        assert rec.batches == [[1, 2], [3, 4], [5]]
    finally:
        batcher.stop()


class SteppedClock:
    """A clock that moves only when the test says so, and tells the test when the batcher has read it."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.reads = 0
        self._cond = threading.Condition()

    def __call__(self) -> float:
        with self._cond:
            self.reads += 1
            self._cond.notify_all()
            return self.now

    def wait_reads(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.reads >= count, T), "the batcher stopped looking at the clock"


def test_a_lone_item_waits_for_its_delay_and_is_dispatched_once_it_has_passed():
    clock = SteppedClock(100.0)
    rec = Recorder()
    batcher = make(rec, max_batch=8, max_delay_s=0.02, clock=clock)
    try:
        future = batcher.submit(7)
        reads = clock.reads
        clock.wait_reads(reads + 3)  # the batch thread woke up three times and found the item not yet due
        assert rec.batches == [] and not future.done()
        clock.now = 100.02  # the oldest item has now waited max_delay
        assert future.result(T) == 70
        assert rec.batches == [[7]]
    finally:
        batcher.stop()


def test_a_per_item_exception_reaches_that_item_only():
    def process(items):
        return [ValueError(f"bad {x}") if x == 2 else x for x in items]

    batcher = make(process, max_batch=3)
    try:
        a, b, c = batcher.submit_many([1, 2, 3])
        assert a.result(T) == 1 and c.result(T) == 3
        with pytest.raises(ValueError, match="bad 2"):
            b.result(T)
    finally:
        batcher.stop()


def test_a_failing_batch_fails_exactly_its_items_and_the_batcher_goes_on():
    calls: list[list[int]] = []

    def process(items):
        calls.append(list(items))
        if 2 in items:
            raise RuntimeError("device error")
        return list(items)

    batcher = make(process, max_batch=2)
    try:
        first = batcher.submit_many([1, 2])
        for future in first:
            with pytest.raises(RuntimeError, match="device error"):
                future.result(T)
        later = batcher.submit_many([3, 4])
        assert [f.result(T) for f in later] == [3, 4]
        assert calls == [[1, 2], [3, 4]]
    finally:
        batcher.stop()


@pytest.mark.parametrize("returned", [[1], [1, 2, 3]])
def test_a_wrong_number_of_results_fails_the_batch(returned):
    batcher = make(lambda items: returned, max_batch=2)
    try:
        for future in batcher.submit_many([1, 2]):
            with pytest.raises(BatchMismatch, match=f"{len(returned)} results for a batch of 2"):
                future.result(T)
    finally:
        batcher.stop()


def test_queue_full_adds_nothing():
    rec = Recorder(hold=True)
    batcher = make(rec, max_batch=1, queue_size=2)
    try:
        running = batcher.submit(1)
        rec.wait_entered()
        queued = batcher.submit_many([2, 3])  # the queue holds 2
        with pytest.raises(QueueFull):
            batcher.submit(4)
        assert batcher.depth == 2
        rec.release.set()
        assert [f.result(T) for f in [running, *queued]] == [10, 20, 30]
        assert batcher.submit(4).result(T) == 40
    finally:
        batcher.stop()


def test_an_item_past_its_deadline_is_not_run():
    clock = [100.0]
    rec = Recorder(hold=True)
    batcher = make(rec, max_batch=1, clock=lambda: clock[0])
    try:
        busy = batcher.submit(1)
        rec.wait_entered()
        late = batcher.submit(2, deadline=105.0)
        on_time = batcher.submit(3, deadline=1000.0)
        clock[0] = 110.0  # item 2's deadline passes while item 1 runs
        rec.release.set()
        with pytest.raises(DeadlineExceeded):
            late.result(T)
        assert busy.result(T) == 10 and on_time.result(T) == 30
        assert rec.batches == [[1], [3]]
    finally:
        batcher.stop()


def test_a_cancelled_item_is_skipped():
    rec = Recorder(hold=True)
    batcher = make(rec, max_batch=1)
    try:
        busy = batcher.submit(1)
        rec.wait_entered()
        given_up = batcher.submit(2)
        kept = batcher.submit(3)
        assert given_up.cancel()
        rec.release.set()
        assert busy.result(T) == 10 and kept.result(T) == 30
        assert rec.batches == [[1], [3]]
    finally:
        batcher.stop()


def test_stop_drains_within_grace_then_rejects_the_rest():
    rec = Recorder(hold=True)
    batcher = make(rec, max_batch=1)
    busy = batcher.submit(1)
    rec.wait_entered()
    queued = batcher.submit_many([2, 3])
    results: list[int] = []
    stopper = threading.Thread(target=lambda: results.append(batcher.stop(grace_s=0.0)))
    stopper.start()
    until(lambda: not batcher.accepting)  # stop() closes intake first, then waits for the running batch
    with pytest.raises(ShuttingDown):
        batcher.submit(9)
    rec.release.set()
    stopper.join(T)
    assert busy.result(T) == 10  # the running batch finishes
    for future in queued:  # grace 0: nothing more is dispatched
        with pytest.raises(ShuttingDown):
            future.result(T)
    assert results == [2]
    assert rec.batches == [[1]]


def test_stop_with_grace_dispatches_queued_items_without_waiting_for_a_full_batch():
    rec = Recorder()
    batcher = make(rec, max_batch=8)
    queued = batcher.submit_many([1, 2, 3])
    assert batcher.stop(grace_s=T) == 0
    assert [f.result(T) for f in queued] == [10, 20, 30]
    assert rec.batches == [[1, 2, 3]]
    with pytest.raises(ShuttingDown):
        batcher.submit(4)


def test_concurrent_streams_each_take_whole_batches():
    rec = Recorder(hold=True)
    batcher = make(rec, max_batch=2, concurrency=2)
    try:
        futures = batcher.submit_many([1, 2, 3, 4])
        rec.wait_entered()
        rec.wait_entered()  # both streams hold a batch at once
        rec.release.set()
        wait(futures, T)
        assert sorted(map(sorted, rec.batches)) == [[1, 2], [3, 4]]
    finally:
        batcher.stop()


def test_a_due_batch_is_shared_among_idle_streams():
    rec = Recorder(hold=True)
    batcher = make(rec, max_batch=8, max_delay_s=0.0, concurrency=2)
    try:
        until(lambda: batcher.idle_threads == 2)
        futures = batcher.submit_many([1, 2, 3, 4])
        rec.wait_entered()
        rec.wait_entered()
        rec.release.set()
        assert [f.result(T) for f in futures] == [10, 20, 30, 40]
        assert sorted(map(sorted, rec.batches)) == [[1, 2], [3, 4]]  # not [1, 2, 3, 4] on one, nothing on the other
    finally:
        batcher.stop()


def test_a_full_batch_shared_among_idle_streams_dispatches_every_share():
    """A max delay that never fires: the second share must go because the batch was due, not wait for more."""
    rec = Recorder(hold=True)
    batcher = make(rec, max_batch=4, max_delay_s=LONG, concurrency=2)
    try:
        until(lambda: batcher.idle_threads == 2)
        futures = batcher.submit_many([1, 2, 3, 4, 5])
        rec.wait_entered()
        rec.wait_entered()
        rec.release.set()
        assert [f.result(T) for f in futures] == [10, 20, 30, 40, 50]
        assert sorted(map(sorted, rec.batches)) == [[1, 2, 3], [4, 5]]  # all of it, spread over both
    finally:
        batcher.stop()


def test_max_batch_is_read_at_every_batch_and_on_batch_reports_each():
    size = [2]
    infos: list[BatchInfo] = []
    rec = Recorder(hold=True)
    batcher = make(rec, max_batch=lambda: size[0], on_batch=infos.append)
    try:
        first = batcher.submit_many([1, 2])
        rec.wait_entered()
        size[0] = 1  # shrunk (as after an out-of-memory split) while the first batch runs
        rest = batcher.submit_many([3, 4])
        rec.release.set()
        wait(first + rest, T)
        assert rec.batches == [[1, 2], [3], [4]]
        batcher.stop()
        assert [i.size for i in infos] == [2, 1, 1] and not any(i.failed for i in infos)
    finally:
        batcher.stop()


@pytest.mark.parametrize("kwargs, error", [
    ({"max_batch": 0}, ValueError),
    ({"queue_size": 0}, ValueError),
    ({"concurrency": 0}, ValueError),
    ({"max_delay_s": -1}, ValueError),
])
def test_bad_settings_are_refused(kwargs, error):
    settings = {"max_batch": 1, "max_delay_s": 0.0, "queue_size": 1, "concurrency": 1, **kwargs}
    with pytest.raises(error):
        DynamicBatcher(lambda items: items, **settings)


def test_submit_before_start_is_refused():
    batcher = DynamicBatcher(lambda items: items, max_batch=1, max_delay_s=0, queue_size=1)
    with pytest.raises(ShuttingDown, match="not running"):
        batcher.submit(1)
