"""Deep and grey images as the 8-bit, 3-channel arrays YOLO trains and predicts on, without silent truncation.

Ultralytics' reader keeps the high byte of a 16-bit image (``>> 8``), so a 12-bit scan stored in 16 bits
(values 0..4095) becomes 0..15: almost black. Here an image deeper than 8 bits is scaled to 0..255 by

* **a window** ``(low, high)`` in the image's own units when one is given (a profile's ``image_window``):
  values at or below ``low`` become 0, at or above ``high`` 255, linear in between; or
* **the image's own range** (min..max over all channels together, so colours keep their balance). A flat
  image has no range: it becomes its value's high byte (uint16) or its value clipped to 0..255.

8-bit images are never rescaled. Grey images are repeated into 3 channels (BGR), an alpha channel is
dropped. The same function serves training (installed into Ultralytics' loader by
:func:`yolo_batch.ultralytics_adapter.deep_image_reader`) and inference.
"""

from __future__ import annotations

import cv2
import numpy as np

from yolo_batch.core.checks import Window, check_window

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def to_uint8(image: np.ndarray, window: Window | None = None, channels: int | None = 3) -> np.ndarray:
    """An image of any depth as uint8, with ``channels`` channels.

    Args:
        image: an OpenCV decode: (H, W) or (H, W, C) with C in 1..4; uint8, uint16, signed ints or floats.
        window: ``(low, high)`` for images deeper than 8 bits; None scales by the image's own min..max.
        channels: 3 for BGR (grey repeated, alpha dropped), 1 for grey as (H, W), None to keep the channels.

    Raises:
        ValueError: a window with ``low >= high`` or non-finite ends, a shape that is not an image, or
            ``channels`` other than 1, 3 or None.
        TypeError: an array that is neither numbers nor booleans.
    """
    if image.ndim not in (2, 3) or (image.ndim == 3 and not 1 <= image.shape[2] <= 4):
        raise ValueError(f"expected an (H, W) or (H, W, 1..4) image, got shape {image.shape}")
    if channels not in (1, 3, None):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    if image.dtype.kind not in "uifb":
        raise TypeError(f"expected a numeric image, got dtype {image.dtype}")
    if image.dtype != np.uint8:
        image = _scale(image, window)
    return _channels(image, channels)


STRIP_VALUES = 1 << 18  # values converted at a time: 1 MiB of float32, whatever the image's size


def _scale(image: np.ndarray, window: Window | None) -> np.ndarray:
    """Into a new uint8 array, one strip at a time: a 12,000^2 16-bit RGB image would otherwise make several
    float32 copies of itself (1.7 GB each), where this needs the 8-bit result and one strip."""
    flat = image.reshape(-1)  # a view of a decoded (contiguous) image, a copy of a strided one
    floats = image.dtype.kind == "f"
    if window is not None:
        low, high = check_window(window)
    else:
        low, high = _range(flat, floats)
        if high <= low:  # flat: there is no range to stretch
            value = int(low) >> 8 if image.dtype == np.uint16 else int(np.clip(low, 0, 255))
            return np.full(image.shape, value, np.uint8)
    out = np.empty(flat.shape, np.uint8)
    gain = 255.0 / (high - low)
    for start in range(0, flat.size, STRIP_VALUES):
        strip = _finite(flat[start:start + STRIP_VALUES], floats).astype(np.float32)
        strip -= low
        strip *= gain
        strip += 0.5
        np.clip(strip, 0, 255, out=strip)
        out[start:start + STRIP_VALUES] = strip  # float -> uint8 truncates, so +0.5 rounds half up
    return out.reshape(image.shape)


def _finite(values: np.ndarray, floats: bool) -> np.ndarray:
    # NaN and infinities count as 0, as they did when the whole image was cleaned at once
    return np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0) if floats else values


def _range(flat: np.ndarray, floats: bool) -> tuple[float, float]:
    if not floats:
        return float(flat.min()), float(flat.max())
    low, high = np.inf, -np.inf
    for start in range(0, flat.size, STRIP_VALUES):
        strip = _finite(flat[start:start + STRIP_VALUES], floats)
        low, high = min(low, float(strip.min())), max(high, float(strip.max()))
    return low, high


def _channels(image: np.ndarray, channels: int | None) -> np.ndarray:
    if channels is None:
        return image
    grey = image if image.ndim == 2 else image[..., 0] if image.shape[2] <= 2 else None
    if channels == 1:
        if grey is not None:
            return np.ascontiguousarray(grey)
        return cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_BGR2GRAY)
    if grey is not None:
        return cv2.cvtColor(np.ascontiguousarray(grey), cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(image[..., :3])


def png_bit_depth(header: bytes) -> int | None:
    """Bits per sample of a PNG from its first 26 bytes (None when ``header`` is not a PNG)."""
    if len(header) < 26 or not header.startswith(PNG_SIGNATURE) or header[12:16] != b"IHDR":
        return None
    return header[24]
