"""Hot folder: files that appear in IN_DIR are detected, journaled in OUT_DIR, and moved to done/ or failed/.

Layout: ``IN_DIR/name.jpg`` -> ``IN_DIR/done/name.jpg`` (or ``IN_DIR/failed/``), with one line per file in
``OUT_DIR/results.jsonl`` (infer's schema plus ``file``, ``sha256`` and ``moved_to``) or
``OUT_DIR/errors.jsonl``. done/ and failed/ sit inside IN_DIR so that the move is one ``rename`` on one
filesystem (a move across volumes is a copy and a delete, which a crash can leave half-done).

A file is taken once its size and modification time held still for the settle time (``settle_s``, at least one
scan of ``poll_s``). One that then does not decode as an image (truncated, or still empty) may be a writer that
paused longer than that: it stays in IN_DIR and is taken once more after ``corrupt_retry_s``; it fails only when it
still does not decode and has not changed meanwhile. Hidden files and
``*.tmp``/``*.part``/``*.partial``/``*.crdownload``/``*.filepart`` are ignored, so writers that write under a temporary
name and rename into IN_DIR (one ``rename`` on the same filesystem) are picked up complete, with no wait at all
beyond the settle time: the convention to follow. Only regular files directly in IN_DIR are watched.

Crash safety: the journal line is written and fsynced **before** the file is moved, and every restart
first runs :meth:`HotFolder.recover`. So at any crash point:

* before the line is complete: no line (a torn last line is cut off by :meth:`Journal.repair`), the file
  is still in IN_DIR and is processed once after the restart;
* after the line, before the move: the restart finds the file's name and content hash (sha256) in the
  journal and only moves it; no second line;
* after the move: nothing left to do.

A later file that reuses a name has another hash, so it is processed; a byte-identical copy of an
already journaled file under the same name is taken for the same file and only moved.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolo_batch.core.files import sha256_file
from yolo_batch.inference.decode import FailureKind
from yolo_batch.inference.oom_split import OutOfMemoryAlone
from yolo_batch.serving.batcher import QueueFull, ShuttingDown
from yolo_batch.serving.journal import DONE, ERRORS, FAILED, RESULTS, Journal, Known

__all__ = ["DONE", "ERRORS", "FAILED", "RESULTS", "HotFolder", "Journal", "Known"]  # the layout's names too

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart")
RETRYABLE = (QueueFull, ShuttingDown)  # the file stays in IN_DIR and is taken again later
# what a file still being written decodes as: taken once more after corrupt_retry_s before it fails
MAYBE_INCOMPLETE = (FailureKind.CORRUPT, FailureKind.EMPTY)

SubmitFile = Callable[[bytes, str], "Future[dict[str, Any]]"]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


Signature = tuple[int, int]  # size and modification time (ns): a file still being written changes them


@dataclass
class _Pending:
    name: str
    sha256: str
    future: Future[dict[str, Any]]
    signature: Signature = (0, 0)


@dataclass(frozen=True)
class _Sighting:
    signature: Signature
    since: float  # when a scan first saw the file with this signature


class HotFolder:
    """Watches ``in_dir`` in a thread of its own; see the module docstring.

    Args:
        submit_file: ``(bytes, name) -> Future`` of the result fields (width, height, detections, timing_ms);
            the future raises for a file that cannot be processed (a ``kind`` attribute names why).
        poll_s: scan interval; a file is taken when unchanged since the previous scan.
        window: most files in flight at once.
        max_bytes: larger files fail as too-large without being read.
        on_file: ``(outcome)`` after each file is journaled (``ok`` or ``error``), for metrics.
        retry_s: how long a file the service was too busy for waits before it is taken again.
        settle_s: how long a file's size and modification time must hold still before it is taken (0: one scan).
        corrupt_retry_s: how long a file that did not decode (truncated, empty) waits before it is taken once more;
            failing again unchanged, it goes to failed/.
        clock: monotonic seconds (tests move their own).
    """

    def __init__(self, in_dir: Path, out_dir: Path, submit_file: SubmitFile, poll_s: float = 0.25,
                 window: int = 32, max_bytes: int = 32 << 20, on_file: Callable[[str], None] | None = None,
                 retry_s: float = 1.0, settle_s: float = 0.0, corrupt_retry_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.in_dir = Path(in_dir)
        self.out_dir = Path(out_dir)
        self.journal = Journal(self.out_dir)
        self.submit_file = submit_file
        self.poll_s = poll_s
        self.window = max(1, window)
        self.max_bytes = max_bytes
        self.on_file = on_file
        self.retry_s = retry_s
        self.settle_s = settle_s
        self.corrupt_retry_s = corrupt_retry_s
        self.clock = clock
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[str, _Pending] = {}
        self._seen: dict[str, _Sighting] = {}
        self._retry_after: dict[str, float] = {}
        self._undecoded: dict[str, Signature] = {}  # files that did not decode once, at this signature
        self._needs_recovery = True

    # --- lifecycle -------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the folders and open (and repair) the journal; :meth:`start` does it, tests may call it alone."""
        if not self.in_dir.is_dir():
            raise FileNotFoundError(f"hot folder {self.in_dir} is not a folder")
        for folder in (self.in_dir / DONE, self.in_dir / FAILED):
            folder.mkdir(exist_ok=True)
        self.journal.open()

    def start(self) -> None:
        """:meth:`open`, then watch in a thread (recovery runs first there)."""
        self.open()
        log.info("hot folder: watching %s (done/, failed/ inside it); results in %s", self.in_dir, self.out_dir)
        self._thread = threading.Thread(target=self._run, name="hot-folder", daemon=True)
        self._thread.start()

    def stop_intake(self) -> None:
        """Take no new files; files in flight are still journaled and moved."""
        self._stopping.set()
        self._wake.set()

    def join(self, timeout: float) -> bool:
        """Wait for the files in flight (their futures resolve once the batcher drains); True when stopped."""
        self.stop_intake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("hot folder: %d file(s) still in flight after %.0f s; they stay in %s",
                          len(self._pending), timeout, self.in_dir)
                return False
        self.journal.close()
        return True

    # --- the loop --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                self.step()
                if self._stopping.is_set() and not self._pending:
                    return
                self._wake.wait(self.poll_s)
        except Exception as exc:  # recorded for /readyz; the files stay in IN_DIR for the next start
            self.error = exc
            log.exception("hot folder stopped")

    def step(self) -> None:
        """One pass: recover if needed, take files unchanged since the last pass, journal and move finished ones.

        The watching thread calls it every ``poll_s`` (and when a file finishes); tests call it directly.
        """
        if self._needs_recovery:
            self.recover()
            self._needs_recovery = False
        if not self._stopping.is_set():
            self._submit_stable()
        self._finish_done()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def recover(self) -> int:
        """Move files the journal already holds (a crash came between the line and the move); returns their count."""
        names = {entry.name for entry in self._scan()}
        known = self.journal.known(names)
        moved = 0
        for name in sorted(known):
            try:
                digest = sha256_file(self.in_dir / name)
            except FileNotFoundError:
                continue
            entry = known[name].get(digest)
            if entry is not None:
                self._move(name, entry.outcome, entry.moved_to)
                moved += 1
        if moved:
            log.info("hot folder: moved %d file(s) journaled before a restart (not processed again)", moved)
        return moved

    def _scan(self) -> list[os.DirEntry[str]]:
        try:
            entries = list(os.scandir(self.in_dir))
        except FileNotFoundError:
            return []
        return [e for e in entries if not e.name.startswith(".") and not e.name.lower().endswith(IGNORED_SUFFIXES)
                and e.is_file(follow_symlinks=False)]

    def _submit_stable(self) -> None:
        now = self.clock()
        current: dict[str, _Sighting] = {}
        for entry in sorted(self._scan(), key=lambda e: e.name):
            try:
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            seen = self._seen.get(entry.name)
            current[entry.name] = seen if seen is not None and seen.signature == signature else _Sighting(
                signature, now)
            if entry.name in self._undecoded and self._undecoded[entry.name] != signature:
                self._retry_after.pop(entry.name, None)  # its writer is back: the settle time is wait enough
        # held still since an earlier scan, for the settle time; and not waiting for a retry
        stable = [name for name, sighting in current.items() if self._seen.get(name) == sighting
                  and now - sighting.since >= self.settle_s and name not in self._pending
                  and self._retry_after.get(name, 0.0) <= now]
        self._seen = current
        self._undecoded = {name: sig for name, sig in self._undecoded.items() if name in current}
        self._retry_after = {name: when for name, when in self._retry_after.items() if name in current}
        for name in stable:
            if len(self._pending) >= self.window:
                break
            self._take(name, current[name].signature)

    def _take(self, name: str, signature: Signature) -> None:
        size = signature[0]
        path = self.in_dir / name
        future: Future[dict[str, Any]]
        if size > self.max_bytes:
            data = b""
            future = Future()
            future.set_exception(_TooLarge(f"file too large: {size} bytes (limit {self.max_bytes})"))
        else:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return
            except OSError as exc:
                future = Future()
                future.set_exception(_Unreadable(f"cannot read: {exc.strerror or exc}"))
                data = b""
            else:
                future = self.submit_file(data, str(path))
        pending = _Pending(name=name, sha256=sha256_of(data) if data else _sha256_or_empty(path), future=future,
                           signature=signature)
        self._pending[name] = pending
        future.add_done_callback(lambda _: self._wake.set())

    def _finish_done(self) -> None:
        done = [p for p in self._pending.values() if p.future.done()]
        if not done:
            return
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        moves: list[tuple[str, str, str]] = []
        planned: set[tuple[str, str]] = set()
        for pending in done:
            del self._pending[pending.name]
            exc = pending.future.exception()
            if isinstance(exc, RETRYABLE):  # busy or stopping: the file stays and is taken again later
                self._retry_after[pending.name] = self.clock() + self.retry_s
                continue
            if self._maybe_incomplete(pending, exc):  # stays in IN_DIR: its writer may not be done
                self._retry_after[pending.name] = self.clock() + self.corrupt_retry_s
                continue
            self._retry_after.pop(pending.name, None)
            self._undecoded.pop(pending.name, None)
            outcome = DONE if exc is None else FAILED
            target = self._target(outcome, pending.name, pending.sha256, planned)
            planned.add((outcome, target))
            base = {"path": str(self.in_dir / pending.name), "file": pending.name, "sha256": pending.sha256,
                    "moved_to": target}
            if exc is None:
                results.append({**base, **pending.future.result()})
            else:
                kind = getattr(exc, "kind", None)
                errors.append({**base, "kind": getattr(kind, "value", kind) or _kind_of(exc),
                               "reason": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
            moves.append((pending.name, outcome, target))
        try:
            self.journal.append(results, errors)
        except OSError as exc:  # disk full, I/O error: nothing moves; recovery sorts out what got written
            log.error("hot folder: cannot write the journal in %s: %s; retrying", self.out_dir, exc)
            self.journal.repair()
            self._needs_recovery = True
            return
        for name, outcome, target in moves:
            self._move(name, outcome, target)
            if self.on_file is not None:
                self.on_file("ok" if outcome == DONE else "error")

    def _maybe_incomplete(self, pending: _Pending, exc: BaseException | None) -> bool:
        """True the first time a file fails to decode at its size and time; then it waits for ``corrupt_retry_s``.
        Failing again unchanged after that wait, it is taken for what it is (False)."""
        if getattr(exc, "kind", None) not in MAYBE_INCOMPLETE:
            return False
        if self._undecoded.get(pending.name) == pending.signature:
            return False
        self._undecoded[pending.name] = pending.signature
        log.info("hot folder: %s does not decode yet (%s); taken again in %g s", pending.name, exc,
                 self.corrupt_retry_s)
        return True

    def _target(self, outcome: str, name: str, sha256: str, planned: set[tuple[str, str]]) -> str:
        """A name free in the outcome folder: the file's own, else with its hash (a reused name)."""
        folder = self.in_dir / outcome
        stem, suffix = os.path.splitext(name)
        candidates = [name, f"{stem}.{sha256[:12]}{suffix}"]
        candidates += [f"{stem}.{sha256[:12]}.{i}{suffix}" for i in range(1, 1000)]
        for candidate in candidates:
            if (outcome, candidate) not in planned and not (folder / candidate).exists():
                return candidate
        raise FileExistsError(f"no free name for {name} in {folder}")

    def _move(self, name: str, outcome: str, target: str) -> None:
        destination = self.in_dir / outcome / target
        if destination.exists():  # the planned name was taken meanwhile (by hand): never overwrite, pick another
            destination = self.in_dir / outcome / self._target(outcome, name, _sha256_or_empty(self.in_dir / name),
                                                              set())
        try:
            os.rename(self.in_dir / name, destination)
        except FileNotFoundError:
            log.warning("hot folder: %s disappeared before it could be moved to %s/", name, outcome)


class _TooLarge(Exception):
    kind = "too-large"


class _Unreadable(Exception):
    kind = "unreadable"


def _kind_of(exc: BaseException) -> str:
    if isinstance(exc, OutOfMemoryAlone):
        return "device-memory"
    return "error"


def _sha256_or_empty(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError:
        return sha256_of(b"")
