"""Results handed to the caller as a generator: bounded, stopped cleanly, the same as ``infer`` writes."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from inference_fixtures import build_detector
from test_inference_pipeline import FakeBackend, pipeline_threads, synthetic_read

import yolo_batch
from yolo_batch.errors import InputError
from yolo_batch.inference.oom_split import BatchSize
from yolo_batch.inference.pipeline import Pipeline
from yolo_batch.inference.stream import Handoff, HandoffSink, stream_pipeline

NAMES = {0: "thing"}


def stream_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("infer-")]


def fake_stream(paths, read=synthetic_read, backend=None, handoff_size=4, workers=2):
    handoff = Handoff(handoff_size)
    reads = []

    def counting_read(path):
        reads.append(path)
        return read(path)

    pipeline = Pipeline(backend or FakeBackend(), counting_read, HandoffSink(handoff, NAMES), BatchSize(4),
                        workers=workers, imgsz=256)
    return stream_pipeline(pipeline, paths, handoff), pipeline, handoff, reads


def test_yields_one_value_per_image_then_ends_with_no_thread_left():
    paths = [f"img-{i}" for i in range(50)]
    stream, *_ = fake_stream(paths)
    got = list(stream)
    assert sorted(d.path for d in got) == sorted(paths)
    assert all(isinstance(d, yolo_batch.Detections) and d.ok and d.names == NAMES for d in got)
    assert not stream_threads()


def test_a_slow_consumer_holds_the_pipeline_within_its_bounds_and_close_stops_it():
    paths = [f"img-{i}" for i in range(5000)]
    stream, pipeline, handoff, reads = fake_stream(paths)
    first = [next(stream) for _ in range(3)]
    assert handoff.waited.wait(30), "the writer never had to wait for the consumer"
    stream.close()  # as `break` does once the generator is dropped
    assert not stream_threads() and not pipeline_threads()
    # everything read was either consumed, queued for the consumer, or inside the pipeline's own bounds
    assert len(reads) <= len(first) + handoff.maxsize + pipeline.in_flight_bound() < 200
    with pytest.raises(StopIteration):
        next(stream)


def test_break_out_of_a_for_loop_stops_the_threads():
    paths = [f"img-{i}" for i in range(5000)]
    stream, *_ = fake_stream(paths)
    with contextlib.closing(stream):
        for count, _ in enumerate(stream, 1):
            if count == 10:
                break
    assert not stream_threads()


def test_a_stage_error_reaches_the_consumer_after_the_results_before_it():
    backend = FakeBackend(fail_on_batch=3, error=ValueError("bug in a stage"))
    stream, *_ = fake_stream([f"img-{4 * i}" for i in range(40)], backend=backend, workers=1)
    got = []
    with pytest.raises(ValueError, match="bug in a stage"):
        for item in stream:
            got.append(item)
    assert len(got) == 8  # the two batches before the failing one
    assert not stream_threads()


def test_unreadable_files_yield_a_value_with_the_error():
    def read(path):
        if path == "img-7":
            from yolo_batch.inference.decode import DecodeError, FailureKind

            raise DecodeError(FailureKind.CORRUPT, "truncated")
        return synthetic_read(path)

    stream, *_ = fake_stream([f"img-{i}" for i in range(10)], read=read)
    got = {d.path: d for d in stream}
    assert len(got) == 10
    assert got["img-7"].error == "corrupt: truncated" and len(got["img-7"]) == 0
    assert all(d.ok for p, d in got.items() if p != "img-7")


# --- the real pipeline, model and files ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def shape_images(tmp_path_factory) -> Path:
    from yolo_batch_datasets import make_dataset

    root = make_dataset("big-shapes", tmp_path_factory.mktemp("big") / "big")
    return root.parent / "images" / "val"


@pytest.fixture(scope="module")
def shape_detector(tmp_path_factory, shape_images) -> Path:
    """A .pt that finds boxes on these images without training (see inference_fixtures)."""
    return build_detector(tmp_path_factory.mktemp("det") / "det.pt", sorted(shape_images.glob("*.jpg"))[:16],
                          imgsz=128)


SETTINGS = {"imgsz": 128, "conf": 0.15, "device": "cpu", "workers": 1, "streams": 1, "batch": 4}


def test_iter_detections_matches_infer_results_jsonl(shape_images, shape_detector, tmp_path):
    summary = yolo_batch.infer(shape_images, model=shape_detector, out=tmp_path / "out", **SETTINGS)
    assert summary.failed == 0 and summary.processed == 32
    written = {r["path"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    before = set(Path(tmp_path).rglob("*"))
    streamed = {d.path: d for d in yolo_batch.iter_detections(shape_images, model=shape_detector, **SETTINGS)}
    assert set(Path(tmp_path).rglob("*")) == before  # nothing written without out=
    assert set(streamed) == set(written)
    boxes = 0
    for path, record in written.items():
        ours = streamed[path].to_dict()
        assert ours["detections"] == record["detections"], path
        assert (ours["width"], ours["height"]) == (record["width"], record["height"]) == (128, 128)
        boxes += len(record["detections"])
    assert boxes > 50, "the detector should give enough boxes to compare"


def test_iter_detections_with_out_writes_what_infer_writes_and_resumes(shape_images, shape_detector, tmp_path):
    out = tmp_path / "out"
    stream = yolo_batch.iter_detections(shape_images, model=shape_detector, out=out, save_annotated=True, **SETTINGS)
    with contextlib.closing(stream):
        first = [next(stream) for _ in range(5)]
    journal = [json.loads(line)["path"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert {d.path for d in first} <= set(journal)  # what was handed over is on disk
    assert len(list((out / "annotated").glob("*.jpg"))) == len(journal)
    rest = list(yolo_batch.iter_detections(shape_images, model=shape_detector, out=out, save_annotated=True,
                                           **SETTINGS))
    assert len(rest) == 32 - len(journal)  # resumed: the journal's images are skipped
    assert len((out / "results.jsonl").read_text().splitlines()) == 32
    assert not stream_threads()


def test_settings_are_checked_at_the_call():
    with pytest.raises(InputError, match="unknown inference setting"):
        yolo_batch.iter_detections("x", confidence=0.5)
    with pytest.raises(InputError, match="give out="):
        yolo_batch.iter_detections("x", save_annotated=True)
    with pytest.raises(InputError, match="imgsz"):
        yolo_batch.iter_detections("x", imgsz=100)
    stream = yolo_batch.iter_detections("/nonexistent/folder")
    with pytest.raises(InputError, match="source not found"):
        next(stream)


def test_a_real_run_stopped_early_leaves_no_thread(shape_images, shape_detector):
    stream = yolo_batch.iter_detections(shape_images, model=shape_detector, **{**SETTINGS, "batch": 2})
    for count, detections in enumerate(stream, 1):
        assert detections.to_supervision().xyxy.shape == (len(detections), 4)
        if count == 3:
            break
    del stream  # the last reference: the generator is closed, its finally stops the pipeline
    assert not stream_threads()


def test_stream_images_are_decoded_like_infer(tmp_path):
    # a grey 16-bit PNG goes through the same reader as infer (scaled, three channels)
    image = (np.arange(64 * 96, dtype=np.uint16).reshape(64, 96) * 10)
    cv2.imwrite(str(tmp_path / "deep.png"), image)
    got = list(yolo_batch.iter_detections(tmp_path, imgsz=64, device="cpu"))
    assert len(got) == 1 and got[0].ok and (got[0].width, got[0].height) == (96, 64)
