"""A co-tenant: another process on the same GPU that takes most of its free memory mid-run, as a colleague's job
on a shared box does. Used by ``bench autobatch --shared-gpu`` and the GPU tests.

The co-tenant is a child process (``python -m yolo_batch.training.cotenant``) driven over its stdin/stdout, one
line per command, so it holds memory in its own CUDA context exactly as another user's process would:

* ``take``: allocate ``share`` of the device's free memory at that moment (in chunks, as much as it can get);
  answers ``took <bytes>``;
* ``release``: free it; answers ``released``;
* ``quit``: exit.

``--device cpu`` allocates host memory against a given ``--free-bytes``: the same protocol and bookkeeping, testable
on a machine without a GPU. :class:`TakeMemoryAt` is the trainer callback that sends ``take`` at an epoch's start.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

CHUNK_BYTES = 256 << 20  # allocate in pieces so a fragmented device still gives most of what it has


class CoTenantError(RuntimeError):
    """The co-tenant process did not answer as expected (it died, or timed out)."""


@dataclass(frozen=True)
class CoTenantEvent:
    """One thing the co-tenant did, ``seconds`` after it started."""

    seconds: float
    what: str  # "ready" | "took" | "released" | "stopped"
    bytes: int | None = None


def plan_take(free_bytes: int, share: float, chunk: int = CHUNK_BYTES) -> list[int]:
    """The allocations that take ``share`` of ``free_bytes``: whole chunks, then the rest.

    Raises:
        ValueError: ``share`` outside (0, 1], negative free memory or a chunk below 1.
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    if free_bytes < 0 or chunk < 1:
        raise ValueError(f"free bytes must be >= 0 and chunk >= 1, got {free_bytes}, {chunk}")
    target = int(free_bytes * share)
    pieces = [chunk] * (target // chunk)
    if target % chunk:
        pieces.append(target % chunk)
    return pieces


@dataclass
class CoTenant:
    """Drives the co-tenant process. Use as a context manager: it starts on entry and always stops on exit."""

    device: str  # "cuda:0" or "cpu"
    share: float = 0.9
    free_bytes: int | None = None  # cpu only: the "free memory" to take a share of
    timeout_s: float = 120.0
    events: list[CoTenantEvent] = field(default_factory=list)
    _process: subprocess.Popen[str] | None = field(default=None, repr=False)
    _start: float = field(default=0.0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def taken_bytes(self) -> int:
        """What it holds now (0 before ``take`` and after ``release``)."""
        held = 0
        for event in self.events:
            if event.what == "took":
                held = event.bytes or 0
            elif event.what in {"released", "stopped"}:
                held = 0
        return held

    def start(self) -> None:
        command = [sys.executable, "-m", "yolo_batch.training.cotenant", "--device", self.device,
                   "--share", str(self.share)]
        if self.free_bytes is not None:
            command += ["--free-bytes", str(self.free_bytes)]
        self._start = time.monotonic()
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         bufsize=1)
        self._expect("ready")

    def take(self) -> int:
        """Take the share of free memory; returns the bytes taken."""
        return self._command("take", "took") or 0

    def release(self) -> None:
        self._command("release", "released")

    def stop(self) -> None:
        """End the process (its memory goes with it). Safe to call twice, and after the process died."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.poll() is None and process.stdin is not None:
                process.stdin.write("quit\n")
                process.stdin.flush()
            process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        finally:
            self.events.append(CoTenantEvent(self._elapsed(), "stopped"))

    def __enter__(self) -> CoTenant:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _command(self, command: str, answer: str) -> int | None:
        with self._lock:
            if self._process is None or self._process.stdin is None:
                raise CoTenantError("the co-tenant is not running")
            self._process.stdin.write(command + "\n")
            self._process.stdin.flush()
            return self._expect(answer)

    def _expect(self, answer: str) -> int | None:
        if self._process is None or self._process.stdout is None:
            raise CoTenantError("the co-tenant is not running")
        line = _read_line(self._process.stdout, self.timeout_s)
        if line is None or not line.startswith(answer):
            raise CoTenantError(f"co-tenant answered {line!r}, expected {answer!r}")
        words = line.split()
        value = int(words[1]) if len(words) > 1 else None
        self.events.append(CoTenantEvent(self._elapsed(), answer, value))
        return value

    def _elapsed(self) -> float:
        return time.monotonic() - self._start


def _read_line(stream: IO[str], timeout_s: float) -> str | None:
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return got[0].strip() if got and got[0] else None


class TakeMemoryAt:
    """``on_train_epoch_start`` callback: the co-tenant takes its share at the start of ``epoch`` (1-based), once.
    Ultralytics empties its cache after each validation when it holds over half the GPU, so that memory is up for
    grabs, as it would be on a shared box."""

    event = "on_train_epoch_start"

    def __init__(self, cotenant: CoTenant, epoch: int) -> None:
        if epoch < 1:
            raise ValueError(f"epoch is 1-based, got {epoch}")
        self.cotenant = cotenant
        self.epoch = epoch
        self.taken: int | None = None

    def __call__(self, trainer: Any) -> None:
        if self.taken is None and trainer.epoch + 1 == self.epoch:
            self.taken = self.cotenant.take()


def _serve(device: str, share: float, free_bytes: int | None) -> None:
    """The child: answer commands on stdin until ``quit`` or end of input."""
    import torch

    held: list[Any] = []
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "take":
            if device == "cpu":
                free = free_bytes or 0
            else:
                free, _ = torch.cuda.mem_get_info(torch.device(device))
            taken = 0
            for piece in plan_take(free, share):
                try:
                    held.append(torch.empty(piece, dtype=torch.uint8, device=device))
                except torch.cuda.OutOfMemoryError:
                    break  # others got there first: keep what we have
                taken += piece
            print(f"took {taken}", flush=True)
        elif command == "release":
            held.clear()
            if device != "cpu":
                torch.cuda.empty_cache()
            print("released", flush=True)
        elif command == "quit":
            return


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True)
    parser.add_argument("--share", type=float, default=0.9)
    parser.add_argument("--free-bytes", type=int, default=None)
    args = parser.parse_args(argv)
    _serve(args.device, args.share, args.free_bytes)


if __name__ == "__main__":
    main()
