"""The export cache: one folder per (weights, imgsz, precision, batch range, runtime and version, device).

An entry is built in a private temporary folder beside the cache and renamed into place in one step, with its
``entry.json`` written last inside it, so a reader sees a whole entry or none; when two processes export the same
key at once, the first rename wins and the other process uses the winner's entry and removes its own copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolo_batch.core.files import fsync_folder, write_json

log = logging.getLogger(__name__)

ENTRY = "entry.json"
FORMAT = 1  # bump when an entry's layout changes


def export_key(*, weights_sha256: str, imgsz: int, precision: str, batch: str, runtime: str, runtime_version: str,
               device: str, ultralytics: str) -> dict[str, Any]:
    """The settings an export depends on, as a plain mapping (written into the entry, hashed into its name)."""
    return {"format": FORMAT, "weights_sha256": weights_sha256, "imgsz": imgsz, "precision": precision,
            "batch": batch, "runtime": runtime, "runtime_version": runtime_version, "device": device,
            "ultralytics": ultralytics}


def entry_name(key: Mapping[str, Any]) -> str:
    """A readable, unique folder name for ``key``: ``openvino-fp32-640-<hash>``."""
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:20]
    return f"{key['runtime']}-{key['precision']}-{key['imgsz']}-{digest}"


@dataclass(frozen=True)
class CacheEntry:
    """A complete export in the cache."""

    folder: Path
    artefact: Path  # the file or folder the runtime loads
    meta: dict[str, Any]  # what the exporter recorded (names, stride, end2end) and the key
    hit: bool  # found, not built by this call
    seconds: float  # to build it (0 for a hit)

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "artefact": str(self.artefact), "hit": self.hit,
                "seconds": round(self.seconds, 2)}


class ExportCache:
    """Exports under ``root`` (``<yolo-batch cache>/exports``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def lookup(self, key: Mapping[str, Any]) -> CacheEntry | None:
        """The complete entry for ``key``, or None."""
        folder = self.root / entry_name(key)
        try:
            meta = json.loads((folder / ENTRY).read_text())
        except (OSError, ValueError):
            return None
        if meta.get("key") != dict(key) or not (folder / meta.get("artefact", "\0")).exists():
            return None
        return CacheEntry(folder=folder, artefact=folder / meta["artefact"], meta=meta, hit=True, seconds=0.0)

    def get_or_build(self, key: Mapping[str, Any], build: Callable[[Path], tuple[Path, dict[str, Any]]],
                     rebuild: bool = False) -> CacheEntry:
        """The entry for ``key``, built with ``build(folder) -> (artefact inside folder, meta)`` when missing (or
        when ``rebuild``: the old entry is replaced only once the new one is complete)."""
        if not rebuild:
            found = self.lookup(key)
            if found is not None:
                return found
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / entry_name(key)
        work = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{final.name}.", suffix=".tmp")).resolve()
        start = time.perf_counter()
        try:
            artefact, meta = build(work)
            relative = artefact.resolve().relative_to(work)
            write_json(work / ENTRY, {**meta, "key": dict(key), "artefact": str(relative),
                                      "built_s": round(time.perf_counter() - start, 2)})
            seconds = time.perf_counter() - start
            if rebuild and final.exists():
                self._retire(final)
            try:
                os.rename(work, final)
            except OSError:  # another process finished the same export first: use its entry
                found = self.lookup(key)
                if found is None:
                    raise
                log.info("another process exported %s first; using its entry", final.name)
                return found
            fsync_folder(self.root)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # gone after a successful rename; else a failed or lost build
        built = self.lookup(key)
        if built is None:  # pragma: no cover - only if someone removed it in between
            raise RuntimeError(f"export cache entry {final} vanished right after it was written")
        return CacheEntry(folder=final, artefact=built.artefact, meta=built.meta, hit=False, seconds=seconds)

    def _retire(self, folder: Path) -> None:
        """Move an entry aside in one step, then delete it (a process still reading it keeps its open files)."""
        aside = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{folder.name}.", suffix=".old"))
        with contextlib.suppress(FileNotFoundError):  # another process retired it first
            os.rename(folder, aside / "entry")
        shutil.rmtree(aside, ignore_errors=True)
