"""The threaded pipeline with a fake engine: bounded memory, OOM splits, errors, Ctrl-C, vanishing files.

No sleeps: the tests act from the pipeline's own callbacks (progress, sink, backend) at exact counts.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolo_batch.inference.decode import DecodedImage, DecodeLimits, ImageReader
from yolo_batch.inference.letterbox import apply_letterbox, plan_letterbox
from yolo_batch.inference.oom_split import BatchSize
from yolo_batch.inference.pipeline import Pipeline

SHAPES = [(256, 256), (192, 256), (256, 160), (96, 256)]


class FakeBackend:
    """Letterboxes for real, 'infers' by counting; can fail on demand."""

    def __init__(self, imgsz=256, oom_above=None, fail_on_batch=None, error=None):
        self.imgsz = imgsz
        self.oom_above = oom_above
        self.fail_on_batch = fail_on_batch
        self.error = error
        self.sizes: list[int] = []
        self.released = 0

    def prepare(self, pixels):
        plan = plan_letterbox(pixels.shape[0], pixels.shape[1], self.imgsz, 32)
        return apply_letterbox(pixels, plan), plan

    def collate(self, images):
        return np.stack(images)

    def run(self, host, plans):
        self.sizes.append(len(plans))
        if self.fail_on_batch is not None and len(self.sizes) == self.fail_on_batch:
            raise self.error
        if self.oom_above is not None and len(plans) > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        assert host.shape[0] == len(plans) and all(p.out == host.shape[1:3] for p in plans)
        return [[] for _ in plans]

    def release(self):
        self.released += 1


class ListSink:
    def __init__(self, on_batch=None):
        self.records = []
        self.failures = []
        self.on_batch = on_batch

    def write_batch(self, records, images=None):
        self.records.extend(records)
        if self.on_batch is not None:
            self.on_batch(self)

    def write_failure(self, failure):
        self.failures.append(failure)


def synthetic_read(path: str) -> DecodedImage:
    h, w = SHAPES[int(path.rsplit("-", 1)[1]) % len(SHAPES)]
    return DecodedImage(path=path, pixels=np.full((h, w, 3), 7, np.uint8), decode_s=0.0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("infer-")]


@pytest.mark.parametrize("streams", [1, 2])
def test_memory_stays_bounded_on_a_long_stream(streams):
    paths = [f"img-{i}" for i in range(2000)]
    rss = {}

    def sample(done, failed):
        if done >= 300 and "early" not in rss:
            rss["early"] = rss_bytes()
        rss["late"] = rss_bytes()

    sink = ListSink()
    pipeline = Pipeline(FakeBackend(), synthetic_read, sink, BatchSize(8), workers=2, imgsz=256, on_progress=sample,
                        streams=streams)
    stats = pipeline.run(paths)
    assert stats.images == 2000 and stats.failed == 0
    assert Counter(r.path for r in sink.records) == Counter(paths)  # each exactly once
    for name, bound in stats.queue_bounds.items():
        assert stats.queue_high_water[name] <= bound, name
    assert stats.max_in_flight <= stats.in_flight_bound <= 16 * 8  # a few batches, whatever the stream length
    # 2000 images of ~200 KB: ~400 MB if any stage kept them; a flat pipeline grows by allocator noise only
    assert rss["late"] - rss["early"] < 40 * 2**20
    assert stats.padding.padding_fraction < stats.padding.square_padding_fraction
    assert not pipeline_threads()


def test_out_of_memory_splits_and_keeps_the_smaller_batch():
    backend = FakeBackend(oom_above=2)
    sink = ListSink()
    size = BatchSize(8)
    paths = [f"img-{4 * i}" for i in range(24)]  # one shape: full batches of 8
    stats = Pipeline(backend, synthetic_read, sink, size, workers=1, imgsz=256).run(paths)
    assert sorted(r.path for r in sink.records) == sorted(paths) and not sink.failures
    assert backend.sizes[:5] == [8, 4, 2, 2, 2]  # 8 fails, 4 fails, then 2s
    assert set(backend.sizes[5:]) == {2}  # later batches come at the kept size
    assert [(e.batch, e.new_batch) for e in stats.oom_events] == [(8, 4), (4, 2)]
    assert stats.final_batch == 2 and backend.released == 2


def test_an_image_too_big_even_alone_is_an_error_line():
    sink = ListSink()
    stats = Pipeline(FakeBackend(oom_above=0), synthetic_read, sink, BatchSize(2), workers=1, imgsz=256).run(
        ["img-0", "img-4"])
    assert stats.images == 0 and stats.failed == 2
    assert {f.kind for f in sink.failures} == {"device-memory"}


@pytest.mark.parametrize("error", [ValueError("bug in a stage"), KeyboardInterrupt()])
def test_errors_and_ctrl_c_stop_every_thread_and_keep_finished_results(error):
    # one stream: KeyboardInterrupt arrives in the main thread, as Ctrl-C does
    backend = FakeBackend(fail_on_batch=3, error=error)
    sink = ListSink()
    paths = [f"img-{4 * i}" for i in range(40)]
    with pytest.raises(type(error)):
        Pipeline(backend, synthetic_read, sink, BatchSize(4), workers=2, imgsz=256).run(paths)
    assert len(sink.records) == 8  # the two batches before the failure were written
    assert not pipeline_threads()


def test_a_failing_decoder_or_writer_stops_the_run():
    def broken_read(path):
        if path == "img-9":
            raise ZeroDivisionError("decoder bug")
        return synthetic_read(path)

    with pytest.raises(ZeroDivisionError):
        Pipeline(FakeBackend(), broken_read, ListSink(), BatchSize(2), workers=2, imgsz=256).run(
            [f"img-{i}" for i in range(30)])
    assert not pipeline_threads()

    def full_disk(sink):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        Pipeline(FakeBackend(), synthetic_read, ListSink(on_batch=full_disk), BatchSize(2), workers=1,
                 imgsz=256).run([f"img-{i}" for i in range(30)])
    assert not pipeline_threads()


def test_a_file_that_vanishes_mid_run_is_an_error_line(tmp_path):
    paths = []
    for i in range(40):
        path = tmp_path / f"{i:02d}.png"
        cv2.imwrite(str(path), np.full((32, 32, 3), i, np.uint8))
        paths.append(str(path))
    victim = Path(paths[-1])

    def delete_once(sink):
        victim.unlink(missing_ok=True)

    sink = ListSink(on_batch=delete_once)
    reader = ImageReader(DecodeLimits(1 << 20, 1 << 20))
    stats = Pipeline(FakeBackend(imgsz=64), reader.read, sink, BatchSize(1), workers=1, imgsz=64).run(paths)
    assert stats.images == 39 and stats.failed == 1
    assert sink.failures[0].path == str(victim) and sink.failures[0].kind == "missing"


def test_a_failing_second_stream_stops_the_run():
    backend = FakeBackend(fail_on_batch=4, error=ValueError("stream bug"))
    with pytest.raises(ValueError, match="stream bug"):
        Pipeline(backend, synthetic_read, ListSink(), BatchSize(2), workers=1, imgsz=256, streams=3).run(
            [f"img-{4 * i}" for i in range(60)])
    assert not pipeline_threads()
