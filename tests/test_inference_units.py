"""Pure parts of the inference runner: config, sources, headers, decode, letterbox, buckets, auto batch,
OOM split, journal repair, progress lines. No model, no threads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from inference_fixtures import write_bad_files

from yolo_batch.core.images import to_uint8
from yolo_batch.errors import InputError
from yolo_batch.inference.buckets import ShapeBuckets, batch_padding
from yolo_batch.inference.config import (
    BatchSetting,
    InferConfig,
    OutputFormat,
    default_workers,
)
from yolo_batch.inference.decode import (
    DecodeError,
    DecodeLimits,
    ImageReader,
    pick_decoder,
)
from yolo_batch.inference.headers import image_size, jpeg_complete, sniff_format
from yolo_batch.inference.letterbox import (
    apply_letterbox,
    boxes_to_source,
    plan_letterbox,
)
from yolo_batch.inference.oom_split import (
    Attempt,
    BatchSize,
    OutOfMemoryAlone,
    run_with_split,
)
from yolo_batch.inference.progress import PlainProgress
from yolo_batch.inference.sources import discover, relative_names
from yolo_batch.inference.throughput import (
    ThroughputSample,
    candidate_sizes,
    choose_throughput_batch,
    measure_throughput,
)
from yolo_batch.inference.writers import CSV_HEADER, read_journal, repair_csv

# --- config -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"sources": ()}, "no SOURCE"),
    ({"imgsz": 100}, "multiple of 32"),
    ({"conf": 1.5}, "conf must be in"),
    ({"iou": -0.1}, "iou must be in"),
    ({"max_det": 0}, "max-det"),
    ({"classes": (-1,)}, "class ids"),
    ({"workers": 0}, "workers must be"),
    ({"max_latency_ms": 50.0}, "--batch auto only"),
    ({"batch": BatchSetting(None), "max_latency_ms": -1.0}, "max-latency-ms must be > 0"),
    ({"formats": ("xml",)}, None),
])
def test_config_rejects_bad_values(kwargs, message):
    base = {"sources": ("x",)}
    if message is None:
        with pytest.raises(ValueError):
            InferConfig(**{**base, **kwargs})
        return
    with pytest.raises(InputError, match=message):
        InferConfig(**{**base, **kwargs})


@pytest.mark.parametrize("text, fixed, error", [
    ("auto", None, False), ("16", 16, False), ("AUTO", None, False), ("0", None, True), ("-1", None, True),
    ("1.5", None, True), ("x", None, True),
])
def test_batch_setting_parse(text, fixed, error):
    if error:
        with pytest.raises(InputError):
            BatchSetting.parse(text)
    else:
        assert BatchSetting.parse(text).fixed == fixed


def test_cpu_runs_one_single_threaded_stream_per_core(monkeypatch):
    from yolo_batch.inference.runner import cpu_parallelism

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert cpu_parallelism(InferConfig(sources=("x",)), on_gpu=False) == (1, 8)
    assert cpu_parallelism(InferConfig(sources=("x",), threads=4), on_gpu=False) == (4, 2)
    assert cpu_parallelism(InferConfig(sources=("x",), threads=2, streams=1), on_gpu=False) == (2, 1)
    assert cpu_parallelism(InferConfig(sources=("x",)), on_gpu=True)[1] == 1


def test_config_normalises_formats_and_workers_default():
    config = InferConfig(sources=["a"], formats=("csv", "jsonl", "csv"))
    assert config.formats == (OutputFormat.CSV, OutputFormat.JSONL)
    assert default_workers(2) == 1 and default_workers(16) == 4 and default_workers(16, on_gpu=True) == 15


# --- sources ------------------------------------------------------------------------------------------------------


def test_discover_folder_glob_and_list(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for name in ("a/2.jpg", "a/1.PNG", "a/sub/3.webp", "a/notes.txt", "b.tif"):
        (tmp_path / name).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nb.tif\n\na/2.jpg\nmissing.bmp\n")
    found = discover([str(tmp_path / "a"), str(listing), str(tmp_path / "*.tif")])
    names = [str(Path(p).relative_to(tmp_path)) for p in found.paths]
    assert names == ["a/1.PNG", "a/2.jpg", "a/sub/3.webp", "b.tif", "missing.bmp"]  # stable, deduplicated
    assert found.skipped_other == 1
    assert all(Path(p).is_absolute() for p in found.paths)
    assert relative_names(found.paths)[found.paths[2]] == "a/sub/3.webp"


@pytest.mark.parametrize("source, message", [("nowhere", "source not found"), ("*.nothing", "matches no file")])
def test_discover_errors(tmp_path, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=message):
        discover([source])


def test_discover_empty_folder(tmp_path):
    with pytest.raises(InputError, match="no images found"):
        discover([str(tmp_path)])


# --- headers and decode -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".webp", ".tif"])
def test_header_size_matches_the_image(ext):
    data = cv2.imencode(ext, np.zeros((37, 53, 3), np.uint8))[1].tobytes()
    fmt = sniff_format(data)
    assert fmt is not None
    size = image_size(data, fmt)
    assert size in ((53, 37), None) and (size is not None or fmt == "tiff")


def test_truncated_jpeg_is_detected():
    data = cv2.imencode(".jpg", np.zeros((40, 40, 3), np.uint8))[1].tobytes()
    assert jpeg_complete(data) and jpeg_complete(data + b"\x00\x00")
    assert not jpeg_complete(data[:-10])


def test_every_bad_file_kind_is_a_decode_error(tmp_path):
    expected = write_bad_files(tmp_path)
    (tmp_path / "folder.jpg").mkdir()
    expected["folder.jpg"] = "unreadable"
    expected["vanished.jpg"] = "missing"
    reader = ImageReader(DecodeLimits(max_file_bytes=1 << 20, max_pixels=10_000_000))
    for name, kind in expected.items():
        with pytest.raises(DecodeError) as info:
            reader.read(str(tmp_path / name))
        assert info.value.kind.value == kind, (name, info.value.reason)


def test_unreadable_file(tmp_path, monkeypatch):
    from yolo_batch.inference import decode

    path = tmp_path / "locked.jpg"
    path.write_bytes(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())

    def refuse(*args, **kwargs):  # chmod 0 means nothing to root, which runs these tests in CI
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(decode, "open_regular", refuse)
    with pytest.raises(DecodeError, match="permission denied") as info:
        ImageReader(DecodeLimits(1 << 20, 1 << 20)).read(str(path))
    assert info.value.kind.value == "unreadable"


def test_file_size_limit(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(cv2.imencode(".jpg", np.zeros((64, 64, 3), np.uint8))[1].tobytes())
    with pytest.raises(DecodeError, match="file too large"):
        ImageReader(DecodeLimits(max_file_bytes=100, max_pixels=1 << 20)).read(str(path))


def test_sixteen_bit_grey_and_alpha_images_become_bgr8(tmp_path):
    grey16 = np.linspace(1000, 5000, 40 * 30).reshape(30, 40).astype(np.uint16)  # a 12-bit sensor range
    cv2.imwrite(str(tmp_path / "g16.png"), grey16)
    cv2.imwrite(str(tmp_path / "g8.bmp"), np.full((10, 12), 77, np.uint8))
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([np.full((5, 6, 3), 9, np.uint8), np.zeros((5, 6), np.uint8)]))
    cv2.imwrite(str(tmp_path / "c16.tif"), np.full((4, 4, 3), 30000, np.uint16))
    reader = ImageReader(DecodeLimits(1 << 20, 1 << 20))
    g16 = reader.read(str(tmp_path / "g16.png"))
    assert g16.pixels.shape == (30, 40, 3) and g16.pixels.dtype == np.uint8 and g16.source_depth == 16
    assert g16.pixels.min() == 0 and g16.pixels.max() == 255  # the image's own range, not the high byte
    assert reader.read(str(tmp_path / "g8.bmp")).pixels.shape == (10, 12, 3)
    assert reader.read(str(tmp_path / "rgba.png")).pixels.shape == (5, 6, 3)
    flat = reader.read(str(tmp_path / "c16.tif")).pixels
    assert flat.shape == (4, 4, 3) and (flat == 30000 >> 8).all()


def test_scale_and_channel_helpers():
    assert to_uint8(np.array([[0.0, 0.5, 1.0]], np.float32), channels=None).tolist() == [[0, 128, 255]]
    assert to_uint8(np.zeros((3, 3, 2), np.uint8)).shape == (3, 3, 3)
    assert to_uint8(np.zeros((3, 3, 1), np.uint8)).shape == (3, 3, 3)


def test_jpeg_decoder_falls_back_to_opencv_without_simplejpeg(monkeypatch):
    import sys

    from yolo_batch.inference.decode import choose_jpeg_decoder

    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # import fails as if not installed
    sample = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes()
    choice, decode = choose_jpeg_decoder([sample])
    assert choice.name == "opencv" and decode(sample).shape == (16, 16, 3)


def test_jpeg_decoders_agree_pixel_for_pixel():
    from yolo_batch.inference.decode import opencv_jpeg, simplejpeg_decoder

    fast = simplejpeg_decoder()
    if fast is None:
        pytest.skip("simplejpeg is not installed (optional)")
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", image)[1].tobytes()
    assert np.array_equal(fast(data), opencv_jpeg(data))


@pytest.mark.parametrize("timings, expected", [
    ({"opencv": 1.0, "simplejpeg": 0.8}, "simplejpeg"),
    ({"opencv": 1.0, "simplejpeg": 0.97}, "opencv"),  # within noise: keep the default
    ({"opencv": 1.0}, "opencv"),
    ({}, "opencv"),
])
def test_pick_decoder(timings, expected):
    assert pick_decoder(timings) == expected


# --- letterbox and buckets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w, out", [(480, 640, (480, 640)), (500, 381, (640, 512)), (640, 640, (640, 640)),
                                       (10, 2000, (32, 640)), (1, 1, (640, 640))])
def test_letterbox_plan_pads_to_stride(h, w, out):
    plan = plan_letterbox(h, w, 640, 32)
    assert plan.out == out and plan.out[0] % 32 == 0 and plan.out[1] % 32 == 0
    image = apply_letterbox(np.zeros((h, w, 3), np.uint8), plan)
    assert image.shape[:2] == plan.out


def test_boxes_map_back_to_source_pixels():
    plan = plan_letterbox(500, 381, 640, 32)
    gx, gy = plan.resized[1] / 381, plan.resized[0] / 500  # rounding makes the two axes differ slightly
    box = np.array([[plan.left + 10 * gx, plan.top + 20 * gy, plan.left + 100 * gx, plan.top + 400 * gy]])
    np.testing.assert_allclose(boxes_to_source(box, plan), [[10, 20, 100, 400]], atol=0.01)
    clipped = boxes_to_source(np.array([[-50.0, -50, 9999, 9999]]), plan)
    assert clipped.tolist() == [[0, 0, 381, 500]]


def test_buckets_group_by_shape_and_bound_pending():
    size = BatchSize(3)
    buckets: ShapeBuckets[int] = ShapeBuckets(size, max_pending=5)
    ready = []
    shapes = [(1, 1), (2, 2), (1, 1), (2, 2), (3, 3), (1, 1), (2, 2)]
    for i, shape in enumerate(shapes):
        ready += buckets.add(shape, i)
        assert buckets.pending <= 5
    assert ready == [[0, 2, 5], [1, 3, 6]]
    assert buckets.drain() == [[4]]
    buckets.add((9, 9), 100)
    buckets.add((9, 9), 101)
    for i in range(4):  # six pending, room for five: the fullest bucket leaves early, partly filled
        ready = buckets.add((10 + i, 1), i)
    assert ready == [[100, 101]] and buckets.pending == 4 and buckets.high_water == 6


def test_buckets_follow_a_shrinking_batch():
    size = BatchSize(4)
    buckets: ShapeBuckets[int] = ShapeBuckets(size, max_pending=100)
    buckets.add((1, 1), 0)
    size.shrink_after_oom(4)  # now 2
    assert buckets.add((1, 1), 1) == [[0, 1]]


def test_bucketing_pads_less_than_the_square_baseline():
    plans = [plan_letterbox(h, w, 640, 32) for h, w in [(480, 640), (426, 640), (640, 481), (500, 381), (1080, 1920)]]
    total = None
    for plan in plans:
        stats = batch_padding(plan.out, [plan.content_pixels], 640)
        total = stats if total is None else total + stats
    assert total.padding_fraction < 0.1 < total.square_padding_fraction
    assert total.tensor_pixels < total.square_pixels


# --- auto batch ---------------------------------------------------------------------------------------------------


def samples(*rows):
    return [ThroughputSample(batch=b, images_per_s=r, latency_ms=b / r * 1e3 if r else 0.0, peak_bytes=p, oom=o)
            for b, r, p, o in rows]


@pytest.mark.parametrize("rows, latency, budget, expected", [
    ([(1, 10, None, False), (2, 18, None, False), (4, 30, None, False), (8, 31, None, False)], None, None, 4),
    ([(1, 10, None, False), (2, 18, None, False), (4, 30, None, False), (8, 40, None, False)], None, None, 8),
    ([(1, 10, None, False), (2, 18, None, False), (4, 30, None, False), (8, 40, None, False)], 150.0, None, 4),
    ([(1, 10, 100, False), (2, 19, 200, False), (4, 30, 400, False)], None, 300, 2),
    ([(1, 10, None, False), (2, 19, None, False), (4, 0, None, True)], None, None, 2),
    ([(1, 10, None, False), (2, 19, None, False)], 10.0, None, 1),  # nothing fits: the smallest
])
def test_choose_batch(rows, latency, budget, expected):
    choice = choose_throughput_batch(samples(*rows), max_latency_ms=latency, memory_budget_bytes=budget)
    assert choice.batch == expected
    assert choice.table().row_count == len(rows)
    assert json.dumps(choice.to_dict())


def test_choose_batch_rejects_nothing_to_choose():
    with pytest.raises(ValueError):
        choose_throughput_batch([])


def test_measure_throughput_stops_on_plateau_and_oom():
    clock_now = [0.0]
    cost = {1: 0.1, 2: 0.12, 4: 0.2, 8: 0.4, 16: 0.8, 32: 1.6}  # flat from 4 on: 20 img/s

    def run(batch):
        clock_now[0] += cost[batch]

    got = measure_throughput(run, candidate_sizes(32), clock=lambda: clock_now[0])
    assert [s.batch for s in got] == [1, 2, 4, 8, 16]
    assert choose_throughput_batch(got).batch == 4

    def run_oom(batch):
        if batch >= 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate")
        clock_now[0] += 0.1

    got = measure_throughput(run_oom, candidate_sizes(32), clock=lambda: clock_now[0])
    assert [(s.batch, s.oom) for s in got] == [(1, False), (2, False), (4, True)]


def test_throughput_releases_memory_after_leaving_the_oom_handler():
    import gc
    import weakref

    import torch

    held: list[weakref.ref] = []
    alive_at_release: list[bool] = []

    def run_batch(batch):
        activations = torch.zeros(batch, 64)
        if batch >= 4:
            held.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return None

    def release():
        gc.collect()
        alive_at_release.append(held[-1]() is not None)

    got = measure_throughput(run_batch, candidate_sizes(8), on_oom=release)
    assert [(s.batch, s.oom) for s in got] == [(1, False), (2, False), (4, True)]
    assert alive_at_release == [False]  # the cache is emptied once the failed batch's tensors can go


# --- OOM split ----------------------------------------------------------------------------------------------------


def fake_run(limit):
    def run(chunk):
        if len(chunk) > limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in chunk]
    return run


def test_oom_split_retries_smaller_and_keeps_the_size():
    size = BatchSize(8)
    attempts: list[Attempt] = []
    released = []
    out = run_with_split(list(range(8)), fake_run(3), size, on_oom=lambda: released.append(1), attempts=attempts)
    assert out == [x * 10 for x in range(8)]
    assert [(a.size, a.oom) for a in attempts] == [(8, True), (4, True), (2, False), (2, False), (2, False),
                                                   (2, False)]
    assert size() == 2 and [(e.batch, e.new_batch) for e in size.events] == [(8, 4), (4, 2)]
    assert len(released) == 2


def test_failed_attempts_are_freed_before_the_smaller_batches_run():
    """The split retries outside the ``except`` block: a traceback still held would keep the failed forward pass's
    tensors (its activations) alive while the halves run, which on a GPU cascades down to batch 1."""
    import gc
    import weakref

    import torch

    failed: list[weakref.ref] = []
    alive_at_start: list[int] = []  # for each attempt: failed attempts' activations still alive when it starts

    def run(chunk):
        gc.collect()  # only references, not uncollected cycles, may keep them alive
        alive_at_start.append(sum(ref() is not None for ref in failed))
        activations = torch.zeros(len(chunk), 64)  # what a forward pass holds when the allocation fails
        if len(chunk) > 1:
            failed.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(chunk)} GiB")
        return [x for x in chunk]

    size = BatchSize(8)
    attempts: list[Attempt] = []
    assert run_with_split(list(range(8)), run, size, attempts=attempts) == list(range(8))
    assert [(a.size, a.oom) for a in attempts] == [(8, True), (4, True), (2, True)] + [(1, False)] * 8
    assert len(failed) == 3
    assert alive_at_start == [0] * 11  # each retry starts with every failed attempt's tensors freed


def test_oom_alone_is_reported_per_image_and_other_errors_propagate():
    size = BatchSize(2)
    out = run_with_split([1, 2], fake_run(0), size)
    assert all(isinstance(o, OutOfMemoryAlone) for o in out)

    def broken(chunk):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_split([1, 2], broken, BatchSize(2))


# --- journal ------------------------------------------------------------------------------------------------------


def line(path, n=1):
    return json.dumps({"path": path, "width": 1, "height": 1, "detections": [{}] * n}) + "\n"


def test_journal_drops_a_torn_last_line_and_duplicates(tmp_path):
    journal = tmp_path / "results.jsonl"
    journal.write_text(line("a") + line("b", 2) + "garbage\n" + line("a") + line("c")[:20])
    state = read_journal(journal)
    assert state.done == {"a", "b"} and state.detections == 3 and state.dropped_lines == 3
    assert journal.read_text() == line("a") + line("b", 2)  # repaired in place
    assert read_journal(journal).dropped_lines == 0
    assert read_journal(tmp_path / "none.jsonl").done == frozenset()


def test_csv_keeps_only_journaled_images(tmp_path):
    path = tmp_path / "results.csv"
    header = ",".join(CSV_HEADER)
    path.write_text(f"{header}\na,1,1,0,x,0.5,1,2,3,4\nb,1,1,0,x,0.5,1,2,3,4\nc,1,1,0,x,0.5,1,")
    assert repair_csv(path, frozenset({"a"})) == 2
    assert path.read_text() == f"{header}\na,1,1,0,x,0.5,1,2,3,4\n"


# --- progress -----------------------------------------------------------------------------------------------------


def test_plain_progress_prints_periodically():
    now = [0.0]
    stream = io.StringIO()
    progress = PlainProgress(stream, every_s=10, clock=lambda: now[0])
    progress.start(100, done_before=5)
    for done in range(1, 30):
        now[0] = done
        progress.update(done, 0)
    progress.stop()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "infer: 100 image(s) to process (5 already done)"
    assert len(lines) == 4 and lines[-1].startswith("infer: 29/100 (0 failed) 1.0 img/s")
