"""Fixtures for the inference tests: a detector that finds boxes without training, images, bad files.

No weights can be downloaded, and a model trained for one epoch from scratch scores everything near
zero. So :func:`build_detector` builds yolo11n from its yaml, sets every BatchNorm's running statistics
from real images (train-mode forward passes, cumulative average) so activations carry signal in eval
mode, and sets the class bias so that a few tens of boxes per image pass conf ~0.15. The result is
saved in Ultralytics' checkpoint format (``YOLO.save``) and loads with ``YOLO(path)``: a real .pt whose
outputs depend on the image, which is what parity with ``predict`` needs.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

CLASS_BIAS = -3.0


def build_detector(target: Path, images: list[Path], imgsz: int = 160) -> Path:
    import cv2
    import torch

    from yolo_batch.ultralytics_adapter import load_model

    torch.manual_seed(0)
    yolo = load_model("yolo11n.yaml")
    net = yolo.model
    batch = []
    for path in images:
        image = cv2.resize(cv2.imread(str(path)), (imgsz, imgsz))[:, :, ::-1].copy()
        batch.append(torch.from_numpy(image).permute(2, 0, 1))
    x = torch.stack(batch).float() / 255
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass sets the statistics exactly
    was_training = net.training
    try:
        net.train()
        with torch.no_grad():
            net(x)
    finally:
        net.train(was_training)
    with torch.no_grad():
        for branch in net.model[-1].cv3:
            branch[-1].bias.fill_(CLASS_BIAS)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.03
    yolo.save(str(target))
    return target


def coco8_images() -> list[Path]:
    from conftest import shared_dataset

    root = shared_dataset("coco8")
    return sorted((root / "images").rglob("*.jpg"))


def bccd_images(n: int) -> list[Path]:
    from conftest import shared_dataset

    root = shared_dataset("bccd")
    return sorted((root / "images" / "val").glob("*.jpg"))[:n]


@pytest.fixture(scope="session")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .pt that yields tens of boxes per image at conf 0.15 (see the module docstring)."""
    images = coco8_images() + bccd_images(8)
    return build_detector(tmp_path_factory.mktemp("detector") / "detector.pt", images)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """The 8 coco8 images (mixed shapes) copied into tmp/images."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in coco8_images():
        shutil.copy(path, folder / path.name)
    return folder


def write_bad_files(folder: Path) -> dict[str, str]:
    """One file of each bad kind; returns name -> expected errors.jsonl kind."""
    import cv2

    good = cv2.imencode(".jpg", np.full((64, 96, 3), 200, np.uint8))[1].tobytes()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "text.png").write_text("not an image at all\n")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"\x00\x00\x01\x00" * 2
                                         + b"garbage" * 10)
    (folder / "bomb.png").write_bytes(_png_header(200_000, 200_000))
    return {"zero.jpg": "empty", "truncated.jpg": "corrupt", "text.png": "not-an-image", "corrupt.png": "corrupt",
            "bomb.png": "too-large"}


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims a gigantic size (40 G pixels): refused from its header, never allocated."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + b"\x00" * 64)


def kill_when_written(command: Sequence[str], results: Path, lines: int, timeout_s: float,
                      env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start ``command`` and SIGKILL it once ``results`` holds ``lines`` lines (a condition, not a time); returns
    the process, ended."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while not (results.exists() and results.read_text().count("\n") >= lines):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"no results after {timeout_s:g} s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    return process
