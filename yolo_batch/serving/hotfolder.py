"""Hot folder: files that appear in IN_DIR are detected, journaled in OUT_DIR, and moved to done/ or failed/.

Layout: ``IN_DIR/name.jpg`` -> ``IN_DIR/done/name.jpg`` (or ``IN_DIR/failed/``), with one line per file in
``OUT_DIR/results.jsonl`` (infer's schema plus ``file``, ``sha256`` and ``moved_to``) or
``OUT_DIR/errors.jsonl``. done/ and failed/ sit inside IN_DIR so that the move is one ``rename`` on one
filesystem (a move across volumes is a copy and a delete, which a crash can leave half-done).

A file is taken once its size and modification time held for one scan (``poll_s``). Hidden files and
``*.tmp``/``*.part``/``*.partial``/``*.crdownload``/``*.filepart`` are ignored, so writers that write under a temporary
name and rename are picked up once complete. Only regular files directly in IN_DIR are watched.

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
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from yolo_batch.core.files import append_lines, sha256_file, truncate_torn_tail
from yolo_batch.inference.oom_split import OutOfMemoryAlone
from yolo_batch.serving.batcher import QueueFull, ShuttingDown

log = logging.getLogger(__name__)

DONE = "done"
FAILED = "failed"
RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart")
RETRYABLE = (QueueFull, ShuttingDown)  # the file stays in IN_DIR and is taken again later

SubmitFile = Callable[[bytes, str], "Future[dict[str, Any]]"]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Known:
    """A journaled file: where it was (to be) moved."""

    outcome: str  # DONE or FAILED
    moved_to: str  # name inside the outcome folder


class Journal:
    """``results.jsonl`` and ``errors.jsonl`` in OUT_DIR; appended by one thread, fsynced per group of lines."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.results_path = out_dir / RESULTS
        self.errors_path = out_dir / ERRORS
        self._results: IO[str] | None = None
        self._errors: IO[str] | None = None

    def open(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.repair()
        # Open for the service's life, appended batch by batch; close() ends them.
        self._results = open(self.results_path, "a", encoding="utf-8")  # noqa: SIM115
        self._errors = open(self.errors_path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        for handle in (self._results, self._errors):
            if handle is not None:
                handle.close()
        self._results = self._errors = None

    def repair(self) -> int:
        """Cut torn last lines from both files."""
        return truncate_torn_tail(self.results_path) + truncate_torn_tail(self.errors_path)

    def append(self, results: Iterable[dict[str, Any]], errors: Iterable[dict[str, Any]]) -> None:
        """Write, flush and fsync: when this returns, the lines survive a crash or a power cut."""
        if self._results is None or self._errors is None:
            raise RuntimeError("journal used before open()")
        append_lines(self._errors, errors)
        append_lines(self._results, results)

    def known(self, names: set[str]) -> dict[str, dict[str, Known]]:
        """name -> {sha256: Known} for the journaled files among ``names`` (memory stays bounded by them)."""
        found: dict[str, dict[str, Known]] = {}
        if not names:
            return found
        for path, outcome in ((self.results_path, DONE), (self.errors_path, FAILED)):
            if not path.exists():
                continue
            with open(path, "rb") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except (ValueError, UnicodeDecodeError):
                        continue  # a garbled line names no file: that file is processed again
                    if isinstance(record, dict) and record.get("file") in names and record.get("sha256"):
                        found.setdefault(record["file"], {})[record["sha256"]] = Known(
                            outcome, str(record.get("moved_to") or record["file"]))
        return found


@dataclass
class _Pending:
    name: str
    sha256: str
    future: Future[dict[str, Any]]


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
    """

    def __init__(self, in_dir: Path, out_dir: Path, submit_file: SubmitFile, poll_s: float = 0.25,
                 window: int = 32, max_bytes: int = 32 << 20, on_file: Callable[[str], None] | None = None,
                 retry_s: float = 1.0) -> None:
        self.in_dir = Path(in_dir)
        self.out_dir = Path(out_dir)
        self.journal = Journal(self.out_dir)
        self.submit_file = submit_file
        self.poll_s = poll_s
        self.window = max(1, window)
        self.max_bytes = max_bytes
        self.on_file = on_file
        self.retry_s = retry_s
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[str, _Pending] = {}
        self._seen: dict[str, tuple[int, int]] = {}
        self._retry_after: dict[str, float] = {}
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
        now = time.monotonic()
        current: dict[str, tuple[int, int]] = {}
        for entry in sorted(self._scan(), key=lambda e: e.name):
            try:
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            current[entry.name] = (stat.st_size, stat.st_mtime_ns)
        stable = [name for name, sig in current.items() if self._seen.get(name) == sig
                  and name not in self._pending and self._retry_after.get(name, 0.0) <= now]
        self._seen = current
        for name in stable:
            if len(self._pending) >= self.window:
                break
            self._take(name, current[name][0])

    def _take(self, name: str, size: int) -> None:
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
        pending = _Pending(name=name, sha256=sha256_of(data) if data else _sha256_or_empty(path), future=future)
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
                self._retry_after[pending.name] = time.monotonic() + self.retry_s
                continue
            self._retry_after.pop(pending.name, None)
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
