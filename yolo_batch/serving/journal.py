"""The hot folder's journal: ``results.jsonl`` and ``errors.jsonl`` in OUT_DIR, appended and fsynced line by line,
torn last lines cut at open, and read back at a restart to find files already journaled (see :mod:`.hotfolder`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from yolo_batch.core.files import append_lines, truncate_torn_tail

DONE = "done"
FAILED = "failed"
RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"


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
