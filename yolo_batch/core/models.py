"""Which model a run uses: the default, and a model's identity by content (not by the path that names it)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from yolo_batch.core.files import sha256_file

DEFAULT_MODEL = "yolo11n.yaml"  # Ultralytics builds it from its yaml (random weights): nothing is downloaded

def model_fingerprint(spec: str) -> str:
    """A local .pt or yaml file by content hash; an Ultralytics yaml name by name (its content ships with
    Ultralytics, whose version callers key on separately). The same file by two path strings is one model;
    new content at the same path is another."""
    path = Path(spec)
    if path.is_file():
        kind = "pt" if path.suffix == ".pt" else "yaml"
        return f"{kind}:{content_sha256(path)[:16]}"
    return f"name:{spec}"


def content_sha256(path: Path) -> str:
    """sha256 of a file, cached while its inode, size and modification time stay the same.

    A run asks more than once (resume check, manifest, export key), and hashing a large .pt takes a noticeable
    fraction of a second each time. A replaced file (a retrained best.pt written over the old one, or renamed
    onto it) changes the inode, size or mtime, so it is hashed again.
    """
    stat = os.stat(path)
    return _sha256_of(os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, inode: int, size: int, mtime_ns: int) -> str:
    return sha256_file(path)
