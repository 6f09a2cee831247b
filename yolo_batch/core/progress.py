"""Progress of long steps: a rich bar on a terminal, plain periodic lines elsewhere, nothing with ``--quiet``.

Every long step (a dataset scan, an AutoBatch probe, an inference run, and later exports and sweeps) reports
through one :class:`Reporter`, chosen once by the command (:func:`reporter_for`) and handed to the library:

* a *task* counts something: ``with tracked(reporter, "scan", total=len(files), unit="label") as task:
  task.update(i)``; ``total=None`` for a step whose size is unknown (a spinner on a terminal; a line every
  ``every_s`` seconds elsewhere, only if it runs that long);
* a *note* is one line saying what just finished ("autobatch: batch 8 fits, 2.10 GiB peak, 1.4 s").

The library never decides where output goes: it only talks to the reporter it was given (``None``: silent).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PLAIN_EVERY_S = 10.0  # a log line every 10 s: enough to see a job is alive, few enough to read


class ProgressReporter(Protocol):
    """One counted task; ``update`` may be called from any one thread at a time."""

    def start(self, total: int | None, done_before: int = 0) -> None: ...

    def update(self, done: int, failed: int = 0) -> None: ...

    def stop(self) -> None: ...


class Reporter(Protocol):
    """Where long steps report: counted tasks and one-line notes (the seam exports and sweeps call too)."""

    def task(self, label: str, unit: str = "image", rate_unit: str = "img", failures: bool = False
             ) -> ProgressReporter: ...

    def note(self, text: str) -> None: ...


class NullProgress:
    """A task nobody watches."""

    def start(self, total: int | None, done_before: int = 0) -> None:
        pass

    def update(self, done: int, failed: int = 0) -> None:
        pass

    def stop(self) -> None:
        pass


class RichProgress:
    """A live bar (on ``console``, stderr by default so ``--json`` keeps stdout clean); a spinner without a total."""

    def __init__(self, console: Console | None = None, label: str = "infer", rate_unit: str = "img",
                 failures: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.label = label
        self.rate_unit = rate_unit
        self.failures = failures
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._start = 0.0

    def start(self, total: int | None, done_before: int = 0) -> None:
        if total is None:
            columns = [SpinnerColumn(), TextColumn(f"[bold]{self.label}"), TimeElapsedColumn()]
        else:
            columns = [TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[rate]}")]
            if self.failures:
                columns.append(TextColumn("failed {task.fields[failed]}"))
            columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        self._progress = Progress(*columns, console=self.console, transient=total is None)
        self._task = self._progress.add_task(self.label, total=total, rate=f"- {self.rate_unit}/s", failed=0)
        self._start = time.perf_counter()
        self._progress.start()

    def update(self, done: int, failed: int = 0) -> None:
        if self._progress is None or self._task is None:
            return
        elapsed = time.perf_counter() - self._start
        rate = f"{done / elapsed:.1f} {self.rate_unit}/s" if elapsed > 0 else f"- {self.rate_unit}/s"
        self._progress.update(self._task, completed=done + failed, rate=rate, failed=failed)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class PlainProgress:
    """One line every ``every_s`` seconds (and a last one): for logs and pipes, where a bar would be noise.

    Without a total only the periodic lines are written (a step shorter than ``every_s`` stays silent; its
    outcome is the caller's note).
    """

    def __init__(self, stream: TextIO, every_s: float = PLAIN_EVERY_S, clock: Callable[[], float] = time.monotonic,
                 label: str = "infer", unit: str = "image", rate_unit: str = "img", failures: bool = True) -> None:
        self.stream = stream
        self.every_s = every_s
        self.clock = clock
        self.label = label
        self.unit = unit
        self.rate_unit = rate_unit
        self.failures = failures
        self._lock = threading.Lock()
        self._total: int | None = 0
        self._start = 0.0
        self._last = 0.0
        self._state = (0, 0)
        self._timer: threading.Timer | None = None

    def start(self, total: int | None, done_before: int = 0) -> None:
        self._total, self._start = total, self.clock()
        self._last = self._start
        self._state = (0, 0)
        if total is None:
            self._arm()
            return
        resumed = f" ({done_before} already done)" if done_before else ""
        self._write(f"{self.label}: {total} {self.unit}(s) to process{resumed}")

    def update(self, done: int, failed: int = 0) -> None:
        with self._lock:
            self._state = (done, failed)
            now = self.clock()
            if now - self._last < self.every_s:
                return
            self._last = now
        self._line(done, failed, now)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        done, failed = self._state
        if self._total:
            self._line(done, failed, self.clock())

    def _arm(self) -> None:
        # a step without counts still says it is alive: a line each every_s from a timer thread
        self._timer = threading.Timer(self.every_s, self._tick)
        self._timer.daemon = True
        self._timer.start()

    def _tick(self) -> None:
        if self._timer is None:
            return
        self._line(*self._state, self.clock())
        self._arm()

    def _line(self, done: int, failed: int, now: float) -> None:
        elapsed = now - self._start
        if self._total is None:
            counted = f", {done} {self.unit}(s)" if done else ""
            self._write(f"{self.label}: {elapsed:.0f} s so far{counted}")
            return
        rate = done / elapsed if elapsed > 0 else 0.0
        left = self._total - done - failed
        eta = f"{left / rate:.0f} s" if rate > 0 else "-"
        failed_text = f" ({failed} failed)" if self.failures else ""
        self._write(f"{self.label}: {done + failed}/{self._total}{failed_text} {rate:.1f} {self.rate_unit}/s, "
                    f"ETA {eta}")

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


class NullReporter:
    """Reports nothing (``--quiet``, and the library's default)."""

    def task(self, label: str, unit: str = "image", rate_unit: str = "img", failures: bool = False
             ) -> ProgressReporter:
        return NullProgress()

    def note(self, text: str) -> None:
        pass


class ConsoleReporter:
    """Rich bars and printed notes on a terminal; plain periodic lines and notes on a pipe or a log.

    Args:
        stream: where everything goes (stderr by default, so stdout stays for results and JSON).
        live: bars and spinners; ``None``: when ``stream`` is a terminal.
        every_s: seconds between plain lines.
    """

    def __init__(self, stream: TextIO | None = None, live: bool | None = None,
                 every_s: float = PLAIN_EVERY_S) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.every_s = every_s
        self.console = Console(file=self.stream, highlight=False) if self.live else None

    def task(self, label: str, unit: str = "image", rate_unit: str = "img", failures: bool = False
             ) -> ProgressReporter:
        if self.console is not None:
            return RichProgress(self.console, label, rate_unit, failures)
        return PlainProgress(self.stream, self.every_s, label=label, unit=unit, rate_unit=rate_unit,
                             failures=failures)

    def note(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, markup=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()


def reporter_for(quiet: bool, stream: TextIO | None = None) -> Reporter:
    """The reporter a command hands the library: silent with ``--quiet``, else :class:`ConsoleReporter`."""
    return NullReporter() if quiet else ConsoleReporter(stream)


@contextlib.contextmanager
def tracked(reporter: Reporter | None, label: str, total: int | None, unit: str = "item", rate_unit: str = "",
            failures: bool = False) -> Iterator[ProgressReporter]:
    """A started task, stopped on the way out (also on error); a :class:`NullProgress` when ``reporter`` is None."""
    task = reporter.task(label, unit, rate_unit or unit, failures) if reporter is not None else NullProgress()
    task.start(total)
    try:
        yield task
    finally:
        task.stop()
