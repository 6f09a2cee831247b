"""The hot folder, driven step by step with a fake ``submit_file``: stable-size detection, journal then move,
and every crash point of that order (a torn line, a line without its move, a journal write that fails)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

import pytest

from yolo_batch.inference.decode import DecodeError, FailureKind
from yolo_batch.serving.batcher import QueueFull
from yolo_batch.serving.hotfolder import (
    DONE,
    ERRORS,
    FAILED,
    RESULTS,
    HotFolder,
)


class FakeSubmit:
    """Answers at once: ``b"bad"`` fails as corrupt, ``b"busy"`` as queue-full once, anything else succeeds."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.busy_once: set[str] = set()

    def __call__(self, data: bytes, name: str) -> Future:
        self.calls.append(Path(name).name)
        future: Future = Future()
        if data == b"bad":
            future.set_exception(DecodeError(FailureKind.CORRUPT, "corrupt JPEG: fake"))
        elif data == b"busy" and name not in self.busy_once:
            self.busy_once.add(name)
            future.set_exception(QueueFull("queue full"))
        else:
            future.set_result({"path": name, "width": 2, "height": 1, "detections": [], "timing_ms": {}})
        return future


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "in").mkdir()
    return tmp_path / "in", tmp_path / "out"


def make(folders, submit=None) -> HotFolder:
    hot = HotFolder(folders[0], folders[1], submit or FakeSubmit(), poll_s=0.01, window=8, max_bytes=1000,
                    retry_s=0.0, corrupt_retry_s=0.0)
    hot.open()
    return hot


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_file_is_taken_once_unchanged_between_two_passes(folders):
    inbox, out = folders
    submit = FakeSubmit()
    hot = make(folders, submit)
    (inbox / "a.jpg").write_bytes(b"12")
    hot.step()
    assert submit.calls == []  # first seen: maybe still being written
    (inbox / "a.jpg").write_bytes(b"1234")  # it grew
    hot.step()
    assert submit.calls == []
    hot.step()  # unchanged since the last pass
    assert submit.calls == ["a.jpg"]
    assert not (inbox / "a.jpg").exists() and (inbox / DONE / "a.jpg").read_bytes() == b"1234"
    [line] = lines(out / RESULTS)
    assert line["file"] == "a.jpg" and line["sha256"] == sha(b"1234") and line["moved_to"] == "a.jpg"
    assert {"path", "width", "height", "detections", "timing_ms"} <= set(line)  # infer's schema, and more
    hot.join(0)


def test_failures_go_to_errors_and_failed(folders):
    inbox, out = folders
    hot = make(folders)
    (inbox / "bad.jpg").write_bytes(b"bad")
    (inbox / "huge.jpg").write_bytes(b"x" * 2000)  # over max_bytes: never read
    hot.step()
    hot.step()
    hot.step()  # bad.jpg did not decode: taken once more (corrupt_retry_s 0) before it fails
    assert sorted(p.name for p in (inbox / FAILED).iterdir()) == ["bad.jpg", "huge.jpg"]
    kinds = {x["file"]: x["kind"] for x in lines(out / ERRORS)}
    assert kinds == {"bad.jpg": "corrupt", "huge.jpg": "too-large"}
    assert lines(out / RESULTS) == []
    hot.join(0)


def test_temporary_hidden_and_nested_names_are_ignored(folders):
    inbox, _ = folders
    submit = FakeSubmit()
    hot = make(folders, submit)
    for name in (".hidden.jpg", "x.jpg.tmp", "y.part", "z.crdownload"):
        (inbox / name).write_bytes(b"1")
    (inbox / "sub").mkdir()
    (inbox / "sub" / "n.jpg").write_bytes(b"1")
    hot.step()
    hot.step()
    assert submit.calls == []
    hot.join(0)


def test_a_busy_service_leaves_the_file_for_later(folders):
    inbox, out = folders
    submit = FakeSubmit()
    hot = make(folders, submit)
    (inbox / "a.jpg").write_bytes(b"busy")
    hot.step()
    hot.step()
    assert (inbox / "a.jpg").exists() and lines(out / RESULTS) == []  # QueueFull: not failed, not journaled
    hot.step()  # retry_s 0: taken again at once
    assert submit.calls == ["a.jpg", "a.jpg"] and [x["file"] for x in lines(out / RESULTS)] == ["a.jpg"]
    hot.join(0)


def test_crash_after_the_line_before_the_move_only_moves_on_restart(folders):
    inbox, out = folders
    out.mkdir()
    (inbox / "a.jpg").write_bytes(b"one")
    (inbox / "b.jpg").write_bytes(b"bad")
    (out / RESULTS).write_text(json.dumps({"file": "a.jpg", "sha256": sha(b"one"), "moved_to": "a.jpg",
                                           "detections": []}) + "\n")
    (out / ERRORS).write_text(json.dumps({"file": "b.jpg", "sha256": sha(b"bad"), "moved_to": "b.jpg",
                                          "kind": "corrupt"}) + "\n")
    submit = FakeSubmit()
    hot = make(folders, submit)
    hot.step()  # recovery first
    hot.step()
    assert submit.calls == []
    assert (inbox / DONE / "a.jpg").exists() and (inbox / FAILED / "b.jpg").exists()
    assert len(lines(out / RESULTS)) == 1 and len(lines(out / ERRORS)) == 1
    hot.join(0)


def test_crash_during_the_line_reprocesses_the_file_once(folders):
    inbox, out = folders
    out.mkdir()
    (inbox / DONE).mkdir()
    (inbox / DONE / "a.jpg").write_bytes(b"one")
    (inbox / "b.jpg").write_bytes(b"two")
    done_line = json.dumps({"file": "a.jpg", "sha256": sha(b"one"), "moved_to": "a.jpg", "detections": []})
    (out / RESULTS).write_text(done_line + "\n" + '{"file": "b.jpg", "sha2')  # torn by kill -9
    hot = make(folders)  # open() cuts the torn line
    assert (out / RESULTS).read_text() == done_line + "\n"
    hot.step()
    hot.step()
    assert Counter(x["file"] for x in lines(out / RESULTS)) == Counter({"a.jpg": 1, "b.jpg": 1})
    assert sorted(p.name for p in (inbox / DONE).iterdir()) == ["a.jpg", "b.jpg"]
    hot.join(0)


def test_a_reused_name_with_new_content_is_processed_and_kept_apart(folders):
    inbox, out = folders
    hot = make(folders)
    (inbox / "cam.jpg").write_bytes(b"first")
    hot.step()
    hot.step()
    (inbox / "cam.jpg").write_bytes(b"second")  # the camera reuses the name
    hot.step()
    hot.step()
    moved = {x["sha256"]: x["moved_to"] for x in lines(out / RESULTS)}
    assert moved == {sha(b"first"): "cam.jpg", sha(b"second"): f"cam.{sha(b'second')[:12]}.jpg"}
    assert (inbox / DONE / "cam.jpg").read_bytes() == b"first"
    assert (inbox / DONE / moved[sha(b"second")]).read_bytes() == b"second"
    hot.join(0)


def test_a_failed_journal_write_moves_nothing_and_recovery_avoids_duplicates(folders, monkeypatch):
    inbox, out = folders
    hot = make(folders)
    real_append = hot.journal.append
    failures = [True]

    def append(results, errors):
        real_append(results, errors)  # the lines reach the file, then the disk reports an error
        if failures and failures.pop():
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(hot.journal, "append", append)
    (inbox / "a.jpg").write_bytes(b"one")
    hot.step()
    hot.step()
    assert (inbox / "a.jpg").exists()  # not moved: the write was not confirmed
    hot.step()  # recovery: the line is there, so the file is only moved
    hot.step()
    hot.step()
    assert [x["file"] for x in lines(out / RESULTS)] == ["a.jpg"]
    assert (inbox / DONE / "a.jpg").exists() and not (inbox / "a.jpg").exists()
    hot.join(0)


# --- a file still being written: settle time, then a longer wait for one that does not decode ------------------


class Clock:
    """The hot folder's clock, moved by the test (no sleeps)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class DecodingSubmit(FakeSubmit):
    """Decodes with the real reader (a truncated JPEG fails as corrupt), answers at once."""

    def __call__(self, data: bytes, name: str) -> Future:
        from yolo_batch.inference.decode import DecodeLimits, ImageReader

        self.calls.append(Path(name).name)
        future: Future = Future()
        try:
            image = ImageReader(DecodeLimits(max_file_bytes=1 << 20, max_pixels=1 << 20)).read_bytes(data, name)
        except DecodeError as exc:
            future.set_exception(exc)
        else:
            height, width = image.pixels.shape[:2]
            future.set_result({"path": name, "width": width, "height": height, "detections": [], "timing_ms": {}})
        return future


def jpeg_bytes() -> bytes:
    import cv2
    import numpy as np

    ok, encoded = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert ok
    return encoded.tobytes()


def slow_writer_folder(folders, clock, submit, settle_s=1.0, corrupt_retry_s=5.0) -> HotFolder:
    hot = HotFolder(folders[0], folders[1], submit, poll_s=0.01, window=8, max_bytes=1 << 20, retry_s=0.0,
                    settle_s=settle_s, corrupt_retry_s=corrupt_retry_s, clock=clock)
    hot.open()
    return hot


def test_a_file_is_taken_only_once_it_held_still_for_the_settle_time(folders):
    inbox, out = folders
    clock, submit = Clock(), DecodingSubmit()
    hot = slow_writer_folder(folders, clock, submit, settle_s=1.0)
    (inbox / "a.jpg").write_bytes(jpeg_bytes())
    hot.step()
    clock.now += 0.6
    hot.step()
    assert submit.calls == []  # unchanged for 0.6 s of the 1 s settle time
    clock.now += 0.6
    hot.step()
    assert submit.calls == ["a.jpg"] and [x["file"] for x in lines(out / RESULTS)] == ["a.jpg"]
    hot.join(0)


def test_a_half_written_image_waits_and_is_processed_once_its_writer_finishes(folders):
    inbox, out = folders
    clock, submit = Clock(), DecodingSubmit()
    hot = slow_writer_folder(folders, clock, submit)
    data = jpeg_bytes()
    (inbox / "a.jpg").write_bytes(data[: len(data) // 2])  # the writer paused longer than the settle time
    for _ in range(3):
        hot.step()
        clock.now += 1.5
    assert submit.calls == ["a.jpg"]  # it did not decode: taken again only after the longer wait
    assert (inbox / "a.jpg").exists() and lines(out / ERRORS) == [] and not list((inbox / FAILED).iterdir())
    (inbox / "a.jpg").write_bytes(data)  # the writer finishes
    for _ in range(4):
        hot.step()
        clock.now += 1.5
    assert [x["file"] for x in lines(out / RESULTS)] == ["a.jpg"] and lines(out / ERRORS) == []
    assert (inbox / DONE / "a.jpg").read_bytes() == data
    hot.join(0)


def test_a_truncated_image_that_stays_truncated_fails_after_the_wait(folders):
    inbox, out = folders
    clock, submit = Clock(), DecodingSubmit()
    hot = slow_writer_folder(folders, clock, submit, corrupt_retry_s=5.0)
    data = jpeg_bytes()
    (inbox / "a.jpg").write_bytes(data[: len(data) // 2])
    hot.step()
    clock.now += 1.0
    hot.step()  # taken: truncated
    clock.now += 4.9
    hot.step()
    assert submit.calls == ["a.jpg"] and lines(out / ERRORS) == []
    clock.now += 0.2
    hot.step()  # 5 s later, still the same size and time: it fails
    assert submit.calls == ["a.jpg", "a.jpg"]
    [error] = lines(out / ERRORS)
    assert error["file"] == "a.jpg" and error["kind"] == "corrupt" and "truncated" in error["reason"]
    assert (inbox / FAILED / "a.jpg").exists() and not (inbox / "a.jpg").exists()
    hot.join(0)


def test_the_settle_time_and_the_wait_for_undecodable_files_are_settings():
    from yolo_batch.serving.config import resolve

    config = resolve({"model": "m.pt", "settle_ms": 2500.0}, environ={"YOLO_BATCH_CORRUPT_RETRY_S": "12"})
    assert (config.settle_ms, config.corrupt_retry_s) == (2500.0, 12.0)
    defaults = resolve({"model": "m.pt"}, environ={})
    assert defaults.corrupt_retry_s >= 5.0 and defaults.settle_ms >= defaults.poll_ms
