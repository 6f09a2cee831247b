"""Files that survive a crash: atomic replacement, fsynced appends, torn-line repair, content hashes.

Every file yolo-batch writes for a user (decisions, journals, summaries) goes through here, so the rules are
written once: a replaced file is either the old or the new one, never half of either; an appended line is on
disk when the call returns; a line a crash left half-written is cut off on the next start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` atomically and durably.

    The data goes to a uniquely named temporary file in the same folder (so concurrent writers never share
    one), is fsynced, and is renamed over ``path``; the folder is fsynced so the rename survives a power cut.
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def write_json(path: str | Path, value: Any) -> Path:
    """``value`` as indented JSON, atomically (see :func:`atomic_write`)."""
    return atomic_write(path, json.dumps(value, indent=2) + "\n")


def fsync_folder(folder: str | Path) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename itself has happened
        pass
    finally:
        os.close(fd)


def append_lines(handle: Any, records: Iterable[Any]) -> int:
    """Append one JSON line per record to an open text file, flush and fsync; returns lines written."""
    lines = [json.dumps(r) + "\n" for r in records]
    if lines:
        handle.write("".join(lines))
        handle.flush()
        os.fsync(handle.fileno())
    return len(lines)


def truncate_torn_tail(path: str | Path) -> int:
    """Cut whatever follows the last newline of ``path`` (a line a crash left half-written); returns bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        keep, end = 0, size
        while end > 0:
            start = max(0, end - (1 << 16))
            handle.seek(start)
            found = handle.read(end - start).rfind(b"\n")
            if found >= 0:
                keep = start + found + 1
                break
            end = start
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    log.warning("%s: removed a torn last line (%d bytes) left by a crash", path, size - keep)
    return size - keep


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class NotRegularFile(OSError):
    """A FIFO, socket or device where a file was expected (reading one can block forever or never end)."""


def open_regular(path: str | Path) -> Any:
    """Open a regular file for reading in binary mode; anything else raises before a byte is read.

    A FIFO among the images would block ``open()`` itself until a writer appears, so the file is opened
    non-blocking and its type checked on the open descriptor (no race with a swap between check and open).

    Raises:
        NotRegularFile: a FIFO, socket or device. IsADirectoryError: a folder. OSError: as ``open`` would.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "is a folder, not a file", str(path))
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
            raise NotRegularFile(f"{kind}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
