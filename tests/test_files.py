"""Durable files: atomic replacement under concurrent writers, fsynced appends, torn-line repair."""

from __future__ import annotations

import json
import threading

import pytest

from yolo_batch.core.files import (
    append_lines,
    atomic_write,
    sha256_file,
    truncate_torn_tail,
    write_json,
)


@pytest.mark.parametrize("content, expected", [
    (b"", b""),
    (b'{"a": 1}\n', b'{"a": 1}\n'),
    (b'{"a": 1}\n{"b"', b'{"a": 1}\n'),
    (b'{"b"', b""),
    (b'{"a": 1}\n' + b"x" * 200_000, b'{"a": 1}\n'),  # longer than one read block
])
def test_truncate_torn_tail(tmp_path, content, expected):
    path = tmp_path / "j.jsonl"
    path.write_bytes(content)
    assert truncate_torn_tail(path) == len(content) - len(expected)
    assert path.read_bytes() == expected


def test_concurrent_atomic_writes_never_fail_and_leave_one_whole_file(tmp_path):
    """Two threads saving the same file 300 times each (as DDP ranks once did): no error, no temporary left over."""
    target = tmp_path / "autobatch.json"
    errors = []

    def save(tag):
        for i in range(300):
            try:
                write_json(target, {"writer": tag, "i": i, "pad": "x" * 2000})
            except OSError as exc:  # pragma: no cover - what the shared temporary name used to cause
                errors.append(exc)

    threads = [threading.Thread(target=save, args=(tag,)) for tag in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(target.read_text())["i"] == 299
    assert [p.name for p in tmp_path.iterdir()] == ["autobatch.json"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write(target, "old\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_append_lines_writes_one_json_line_per_record(tmp_path):
    path = tmp_path / "j.jsonl"
    with open(path, "a", encoding="utf-8") as handle:
        assert append_lines(handle, [{"a": 1}, {"b": 2}]) == 2
        assert append_lines(handle, []) == 0
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'


def test_sha256_file_reads_in_chunks(tmp_path):
    import hashlib

    data = b"abc" * 700_000
    (tmp_path / "w.pt").write_bytes(data)
    assert sha256_file(tmp_path / "w.pt") == hashlib.sha256(data).hexdigest()
