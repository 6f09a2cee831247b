"""Progress of a run: a rich bar with img/s and ETA on a terminal, plain periodic lines elsewhere."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressReporter(Protocol):
    """Told about a run's progress; ``update`` is called from the writer thread."""

    def start(self, total: int, done_before: int) -> None: ...

    def update(self, done: int, failed: int) -> None: ...

    def stop(self) -> None: ...


class NullProgress:
    def start(self, total: int, done_before: int) -> None:
        pass

    def update(self, done: int, failed: int) -> None:
        pass

    def stop(self) -> None:
        pass


class RichProgress:
    """A live bar (on ``console``, stderr by default so ``--json`` keeps stdout clean)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._start = 0.0

    def start(self, total: int, done_before: int) -> None:
        self._progress = Progress(
            TextColumn("[bold]infer"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self._task = self._progress.add_task("infer", total=total, rate="- img/s", failed=0)
        self._start = time.perf_counter()
        self._progress.start()

    def update(self, done: int, failed: int) -> None:
        if self._progress is None or self._task is None:
            return
        elapsed = time.perf_counter() - self._start
        rate = f"{done / elapsed:.1f} img/s" if elapsed > 0 else "- img/s"
        self._progress.update(self._task, completed=done + failed, rate=rate, failed=failed)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class PlainProgress:
    """One line every ``every_s`` seconds (and a last one): for logs and pipes, where a bar would be noise."""

    def __init__(self, stream: TextIO, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.every_s = every_s
        self.clock = clock
        self._lock = threading.Lock()
        self._total = 0
        self._start = 0.0
        self._last = 0.0
        self._state = (0, 0)

    def start(self, total: int, done_before: int) -> None:
        self._total, self._start = total, self.clock()
        self._last = self._start
        resumed = f" ({done_before} already done)" if done_before else ""
        self._write(f"infer: {total} image(s) to process{resumed}")

    def update(self, done: int, failed: int) -> None:
        with self._lock:
            self._state = (done, failed)
            now = self.clock()
            if now - self._last < self.every_s:
                return
            self._last = now
        self._line(done, failed, now)

    def stop(self) -> None:
        done, failed = self._state
        if self._total:
            self._line(done, failed, self.clock())

    def _line(self, done: int, failed: int, now: float) -> None:
        elapsed = now - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        left = self._total - done - failed
        eta = f"{left / rate:.0f} s" if rate > 0 else "-"
        self._write(f"infer: {done + failed}/{self._total} ({failed} failed) {rate:.1f} img/s, ETA {eta}")

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
