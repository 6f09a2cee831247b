"""16-bit, float and grey images: scaled by their own range (or a window), never truncated, in training too."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from trainer_spy import TrainerSpy

from yolo_batch import ultralytics_adapter as ua
from yolo_batch.core.checks import check_window
from yolo_batch.core.images import png_bit_depth, to_uint8


def ramp(low: int, high: int, dtype=np.uint16, shape=(16, 24)) -> np.ndarray:
    return np.linspace(low, high, shape[0] * shape[1]).reshape(shape).astype(dtype)


@pytest.mark.parametrize(
    ("image", "window", "expected_min", "expected_max"),
    [
        (ramp(0, 4095), None, 0, 255),  # 12 bits in 16: the full range, not 0..15
        (ramp(1000, 1200), None, 0, 255),  # a narrow range is stretched
        (ramp(0, 65535), None, 0, 255),
        (ramp(0, 4095), (0, 8191), 0, 127),  # a window wider than the data: about half
        (ramp(0, 4095), (1000, 2000), 0, 255),  # clipped outside the window
        (ramp(-1024, 3071, np.int16), None, 0, 255),  # CT-like signed values
        (ramp(0, 1, np.float32), None, 0, 255),
        (np.full((4, 4), 4095, np.uint16), None, 15, 15),  # flat: no range, its high byte
        (np.full((4, 4), 0.5, np.float32), None, 0, 0),
        (ramp(0, 255, np.uint8), (100, 200), 0, 255),  # 8-bit is never rescaled, window or not
    ],
)
def test_to_uint8_uses_the_full_range(image, window, expected_min, expected_max):
    out = to_uint8(image, window)
    assert out.dtype == np.uint8 and out.shape == (*image.shape, 3)
    assert (int(out.min()), int(out.max())) == (expected_min, expected_max)
    assert np.array_equal(out[..., 0], out[..., 2])  # grey repeated into BGR


def test_to_uint8_window_maps_linearly():
    out = to_uint8(np.array([[0, 1000, 1500, 2000, 4000]], np.uint16), window=(1000, 2000), channels=1)
    assert out.tolist() == [[0, 0, 128, 255, 255]]


def test_nan_and_inf_do_not_poison_the_range():
    image = ramp(0, 1, np.float32)
    image[0, 0], image[0, 1] = np.nan, np.inf
    out = to_uint8(image, channels=1)
    assert out.max() == 255 and out[0, 0] == 0


@pytest.mark.parametrize(
    ("shape", "channels", "expected"),
    [
        ((8, 8), 3, (8, 8, 3)),
        ((8, 8, 1), 3, (8, 8, 3)),
        ((8, 8, 2), 3, (8, 8, 3)),  # grey + alpha
        ((8, 8, 4), 3, (8, 8, 3)),  # alpha dropped
        ((8, 8, 3), 1, (8, 8)),
        ((8, 8, 1), 1, (8, 8)),
        ((8, 8, 4), None, (8, 8, 4)),
    ],
)
def test_channels(shape, channels, expected):
    assert to_uint8(np.zeros(shape, np.uint16), channels=channels).shape == expected


def test_colour_channels_share_one_range():
    image = np.stack([ramp(0, 1000), ramp(0, 2000), ramp(0, 4000)], axis=2)
    out = to_uint8(image)
    assert [int(out[..., c].max()) for c in range(3)] == [64, 128, 255]


@pytest.mark.parametrize(
    ("image", "kwargs", "error", "message"),
    [
        (np.zeros((2, 2, 5)), {}, ValueError, "shape"),
        (np.zeros(4), {}, ValueError, "shape"),
        (np.zeros((2, 2)), {"channels": 2}, ValueError, "channels"),
        (np.zeros((2, 2), np.uint16), {"window": (10, 5)}, ValueError, "low < high"),
        (np.zeros((2, 2), np.uint16), {"window": (0, float("inf"))}, ValueError, "finite"),
        (np.zeros((2, 2), np.uint16), {"window": (1, 2, 3)}, ValueError, "two numbers"),
        (np.array([["a"]]), {}, TypeError, "numeric"),
    ],
)
def test_bad_input(image, kwargs, error, message):
    with pytest.raises(error, match=message):
        to_uint8(image, **kwargs)


def test_helpers():
    assert check_window([0, 4095]) == (0.0, 4095.0)
    _, png16 = cv2.imencode(".png", ramp(0, 4095))
    _, png8 = cv2.imencode(".png", ramp(0, 255, np.uint8))
    assert png_bit_depth(png16.tobytes()[:26]) == 16 and png_bit_depth(png8.tobytes()[:26]) == 8
    assert png_bit_depth(b"\xff\xd8\xff" + bytes(30)) is None


# --- Training: Ultralytics' loader reads through our reader ----------------------------------------------------------


@pytest.fixture
def deep_files(tmp_path) -> dict[str, Path]:
    grey16 = ramp(0, 4095, shape=(48, 64))
    colour16 = np.stack([ramp(0, 1000, shape=(48, 64)), ramp(0, 2000, shape=(48, 64)),
                         ramp(0, 4000, shape=(48, 64))], axis=2)
    files = {
        "grey16.png": grey16, "colour16.png": colour16, "grey16.tif": grey16,
        "float.tiff": ramp(0, 1, np.float32, shape=(48, 64)),
        "grey8.png": ramp(0, 255, np.uint8, shape=(48, 64)), "colour8.jpg": np.dstack([ramp(0, 255, np.uint8)] * 3),
    }
    for name, image in files.items():
        assert cv2.imwrite(str(tmp_path / name), image)
    return {name: tmp_path / name for name in files}


def test_ultralytics_truncates_16_bit_images_and_reads_them_where_we_patch():
    """If this fails, Ultralytics' loader moved or changed: re-check ultralytics_adapter.deep_image_reader."""
    ua.import_ultralytics()
    from ultralytics.data import base
    from ultralytics.utils import patches

    assert base.imread is patches.imread  # imported by name into the module whose global we replace
    assert "imread(f, flags=self.cv2_flag)" in inspect.getsource(base.BaseDataset.load_image)
    assert "(im >> 8).astype(np.uint8)" in inspect.getsource(patches.imread)


@pytest.mark.parametrize(("name", "flag", "shape"), [
    ("grey16.png", cv2.IMREAD_COLOR, (48, 64, 3)),
    ("grey16.png", cv2.IMREAD_GRAYSCALE, (48, 64, 1)),
    ("colour16.png", cv2.IMREAD_COLOR, (48, 64, 3)),
    ("grey16.tif", cv2.IMREAD_COLOR, (48, 64, 3)),
    ("float.tiff", cv2.IMREAD_COLOR, (48, 64, 3)),
])
def test_deep_images_use_the_full_range_while_installed(deep_files, name, flag, shape):
    ua.import_ultralytics()
    from ultralytics.data import base

    original = base.imread
    truncated = original(deep_files[name], flags=flag)
    with ua.deep_image_reader() as reader:
        assert base.imread is reader
        image = base.imread(deep_files[name], flags=flag)
    assert base.imread is original  # restored
    assert image.dtype == np.uint8 and image.shape == shape
    assert (int(image.min()), int(image.max())) == (0, 255)
    if name.endswith(".png") and "grey" in name:
        assert truncated.max() == 15  # what Ultralytics alone gives a 12-bit scan


def test_window_reaches_the_reader(deep_files):
    from ultralytics.data import base

    with ua.deep_image_reader(window=(0, 8191)):
        image = base.imread(deep_files["grey16.png"], flags=cv2.IMREAD_COLOR)
    assert int(image.max()) == 127  # 4095 of 0..8191


@pytest.mark.parametrize("name", ["grey8.png", "colour8.jpg"])
def test_8_bit_images_are_left_to_ultralytics(deep_files, name):
    from ultralytics.data import base

    expected = base.imread(deep_files[name], flags=cv2.IMREAD_COLOR)
    with ua.deep_image_reader():
        image = base.imread(deep_files[name], flags=cv2.IMREAD_COLOR)
    assert np.array_equal(image, expected) and image.shape[2] == 3
    assert base.imread(deep_files[name].with_name("missing.png")) is None


def test_the_reader_and_offline_guards_reach_ddp_workers_when_callbacks_are_unpickled():
    hook = pickle.dumps(ua.WorkerSetup((0.0, 4095.0)))
    script = (
        "import os, pickle, sys\n"
        "hook = pickle.loads(sys.stdin.buffer.read())\n"
        "from ultralytics.data import base\n"
        "from ultralytics.utils import checks\n"
        "print(type(base.imread).__name__, base.imread.window, type(hook).__name__, os.environ.get('YOLO_OFFLINE'),\n"
        "      checks.check_font.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "YOLO_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", script], input=hook, capture_output=True, check=True, env=env)
    assert out.stdout.decode().splitlines()[-1] == "DeepImageReader (0.0, 4095.0) WorkerSetup 1 local_font"


@pytest.mark.slow
def test_training_loads_16_bit_grey_scans_with_their_full_range(tmp_path, monkeypatch):
    """A real run on 12-bit grey PNGs: the training loader sees 0..255, not Ultralytics' 0..15."""
    from yolo_batch import BatchRequest, SizingConfig, TrainConfig, train

    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for i in range(count):
            scan = rng.integers(200, 900, (64, 64)).astype(np.uint16)
            scan[16:40, 20:44] = 3800  # a bright lesion near the top of 12 bits
            cv2.imwrite(str(tmp_path / "images" / split / f"{i}.png"), scan)
            (tmp_path / "labels" / split / f"{i}.txt").write_text("0 0.5 0.4375 0.375 0.375\n")
    data = tmp_path / "data.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: {{0: lesion}}\n")
    spy = TrainerSpy().install(monkeypatch)
    result = train(TrainConfig(sizing=SizingConfig(data=data, imgsz=64, epochs=1, device="cpu",
                                                   batch=BatchRequest(fixed=4)),
                               project=str(tmp_path / "runs"), name="scan", extra={"plots": False, "workers": 0}))
    assert json.loads(result.decision_path.read_text())["batch"] == 4
    assert spy.first_image.shape[2] == 3 and (int(spy.first_image.min()), int(spy.first_image.max())) == (0, 255)
    from ultralytics.data import base
    from ultralytics.utils import patches

    assert base.imread is patches.imread  # Ultralytics' reader is back after the run


def test_infer_reader_applies_the_profile_window_to_16_bit_files(tmp_path):
    from yolo_batch.inference.decode import DecodeLimits, ImageReader

    scan = np.array([[0, 1024, 4095, 65535]] * 4, np.uint16)  # a 12-bit scan in 16 bits, one hot pixel
    path = tmp_path / "scan.png"
    cv2.imwrite(str(path), scan)
    own_range = ImageReader(DecodeLimits(1 << 30, 1 << 30)).read(str(path)).pixels[0, :, 0]
    windowed = ImageReader(DecodeLimits(1 << 30, 1 << 30), window=(0, 4095)).read(str(path)).pixels[0, :, 0]
    assert own_range.tolist() == [0, 4, 16, 255]  # the hot pixel stretches the range
    assert windowed.tolist() == [0, 64, 255, 255]  # the window shows the scan's own range
