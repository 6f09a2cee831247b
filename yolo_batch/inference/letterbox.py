"""Letterboxing as Ultralytics' predictor does it, split into a pure plan and its application.

Each image is resized to fit ``imgsz`` and padded only up to the next stride multiple (Ultralytics'
``auto=True``, which its predictor uses when a batch holds one shape). The plan's rounding copies
``ultralytics.data.augment.LetterBox`` so that boxes match ``predict`` to float precision;
``tests/test_inference_adapter.py`` compares the two pixel for pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

PAD_VALUE = 114


@dataclass(frozen=True)
class Letterbox:
    """Where an image of ``source`` (h, w) lands in an ``out`` (h, w) canvas."""

    source: tuple[int, int]
    resized: tuple[int, int]
    out: tuple[int, int]
    top: int
    left: int

    @property
    def content_pixels(self) -> int:
        return self.resized[0] * self.resized[1]

    @property
    def out_pixels(self) -> int:
        return self.out[0] * self.out[1]


def plan_letterbox(height: int, width: int, imgsz: int, stride: int = 32, auto: bool = True) -> Letterbox:
    """The resize and padding for one image (``auto``: pad to a stride multiple, else to imgsz x imgsz)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ratio = min(imgsz / height, imgsz / width)
    new_w, new_h = max(round(width * ratio), 1), max(round(height * ratio), 1)
    dw, dh = imgsz - new_w, imgsz - new_h
    if auto:
        dw, dh = dw % stride, dh % stride
    half_w, half_h = dw / 2, dh / 2
    top, bottom = round(half_h - 0.1), round(half_h + 0.1)
    left, right = round(half_w - 0.1), round(half_w + 0.1)
    return Letterbox(source=(height, width), resized=(new_h, new_w), out=(new_h + top + bottom, new_w + left + right),
                     top=top, left=left)


@dataclass(frozen=True)
class Letterboxer:
    """Letterboxing alone, for a model of ``stride`` at ``imgsz``: what :class:`~.stages.PrepareStep` needs of a
    model. The engine letterboxes through it, and so do the cluster path's CPU tasks, which never load a model."""

    imgsz: int
    stride: int = 32

    def prepare(self, pixels: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """Letterbox one BGR uint8 image: (pixels on the canvas, the plan)."""
        plan = plan_letterbox(pixels.shape[0], pixels.shape[1], self.imgsz, self.stride, auto=True)
        return apply_letterbox(pixels, plan), plan


def apply_letterbox(image: np.ndarray, plan: Letterbox, pad_value: int = PAD_VALUE) -> np.ndarray:
    """Resize (bilinear) and pad ``image`` (h, w, 3 uint8) as ``plan`` says."""
    new_h, new_w = plan.resized
    if image.shape[:2] != (new_h, new_w):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out_h, out_w = plan.out
    bottom, right = out_h - new_h - plan.top, out_w - new_w - plan.left
    if plan.top == bottom == plan.left == right == 0:
        return np.ascontiguousarray(image)
    return cv2.copyMakeBorder(image, plan.top, bottom, plan.left, right, cv2.BORDER_CONSTANT,
                              value=(pad_value,) * 3)


def boxes_to_source(boxes: np.ndarray, plan: Letterbox) -> np.ndarray:
    """Map (n, 4) xyxy boxes from the canvas back to source pixels, clipped to the image (a new array).

    Same arithmetic as ``ultralytics.utils.ops.scale_boxes``: remove the padding, divide by the per-axis
    resize ratio that rounding actually produced.
    """
    out = np.asarray(boxes, dtype=np.float32).copy()
    src_h, src_w = plan.source
    gain_y, gain_x = plan.resized[0] / src_h, plan.resized[1] / src_w
    out[:, [0, 2]] = (out[:, [0, 2]] - plan.left) / gain_x
    out[:, [1, 3]] = (out[:, [1, 3]] - plan.top) / gain_y
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, src_w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, src_h)
    return out
