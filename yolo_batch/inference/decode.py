"""Read one image file into an 8-bit, 3-channel BGR array, or say in one line why it cannot be read.

Conversions, decided once here:

* 16-bit (and float) images are scaled to 8 bits by **the image's own min-max range**, so a 12-bit
  sensor image that uses 0..4095 keeps its contrast instead of turning black (Ultralytics keeps the high
  byte, which does that). A flat image becomes its value's high byte.
* Grey images are repeated into 3 channels; an alpha channel is dropped.
* Memory: a decode first takes its estimated bytes from the reader's :class:`DecodeMemory` budget (shared
  by the decode threads), so large images decode one or a few at a time; a deep image is converted to 8 bits
  in strips (:func:`yolo_batch.core.images.to_uint8`), never as a float copy of the whole image.
* Only regular files are read: a FIFO, socket or device is a ``not-a-file`` failure (opening a FIFO would
  block until a writer came, forever in a folder of images).
* JPEGs use the faster of OpenCV and simplejpeg (both libjpeg-turbo, identical pixels in accurate mode);
  a JPEG with EXIF goes to OpenCV, which applies the EXIF rotation as Ultralytics' reader does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import cv2
import numpy as np

from yolo_batch.core.checks import Window
from yolo_batch.core.files import NotRegularFile, open_regular
from yolo_batch.core.images import to_uint8
from yolo_batch.inference.decode_memory import DecodeMemory, decode_bytes_needed
from yolo_batch.inference.headers import (
    has_exif,
    image_size,
    jpeg_complete,
    sniff_format,
)

log = logging.getLogger(__name__)


class FailureKind(str, Enum):
    """Why a file produced no result (the ``kind`` field of errors.jsonl)."""

    MISSING = "missing"  # gone before or while the run read it
    UNREADABLE = "unreadable"  # permissions, a folder, an I/O error
    NOT_A_FILE = "not-a-file"  # a FIFO, socket or device: never read
    EMPTY = "empty"
    TOO_LARGE = "too-large"
    NOT_AN_IMAGE = "not-an-image"
    CORRUPT = "corrupt"  # truncated or undecodable
    DEVICE_MEMORY = "device-memory"  # out of memory even alone in a batch


class DecodeError(Exception):
    """A file that cannot become an image; ``kind`` and the message go to errors.jsonl."""

    def __init__(self, kind: FailureKind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class DecodeLimits:
    max_file_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class DecodedImage:
    """An image as the model will see it before letterboxing: uint8 BGR, (height, width, 3)."""

    path: str
    pixels: np.ndarray
    decode_s: float
    source_depth: int = 8  # bits per channel in the file (16-bit files were rescaled)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


JpegDecode = Callable[[bytes], np.ndarray]


def opencv_jpeg(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise DecodeError(FailureKind.CORRUPT, "corrupt JPEG: OpenCV could not decode it")
    return image


def simplejpeg_decoder() -> JpegDecode | None:
    """simplejpeg's decoder, or None where the package is not installed."""
    try:
        import simplejpeg
    except ImportError:
        return None

    def decode(data: bytes) -> np.ndarray:
        try:
            return simplejpeg.decode_jpeg(data, colorspace="BGR")
        except ValueError:  # CMYK and other layouts it does not take: OpenCV does
            return opencv_jpeg(data)

    return decode


@dataclass(frozen=True)
class DecoderChoice:
    """Which JPEG decoder a run uses, with the per-image times that chose it."""

    name: str
    ms_per_image: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ms_per_image": dict(self.ms_per_image)}


def pick_decoder(ms_per_image: dict[str, float], prefer: str = "opencv") -> str:
    """The fastest decoder; ``prefer`` unless another is at least 5 % faster (timing noise is not a reason)."""
    if not ms_per_image:
        return prefer
    best = min(ms_per_image, key=ms_per_image.__getitem__)
    if prefer in ms_per_image and ms_per_image[best] > 0.95 * ms_per_image[prefer]:
        return prefer
    return best


def choose_jpeg_decoder(samples: Sequence[bytes], rounds: int = 3) -> tuple[DecoderChoice, JpegDecode]:
    """Time OpenCV and simplejpeg on ``samples`` (a few of the run's own JPEGs) and return the faster."""
    candidates: dict[str, JpegDecode] = {"opencv": opencv_jpeg}
    fast = simplejpeg_decoder()
    if fast is not None:
        candidates["simplejpeg"] = fast
    samples = [s for s in samples if not has_exif(s)]
    if len(candidates) == 1 or not samples:
        return DecoderChoice(name="opencv", ms_per_image={}), opencv_jpeg
    timings: dict[str, float] = {}
    for name, decode in candidates.items():
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            try:
                for data in samples:
                    decode(data)
            except DecodeError:  # a broken sample says nothing about speed
                return DecoderChoice(name="opencv", ms_per_image={}), opencv_jpeg
            best = min(best, time.perf_counter() - start)
        timings[name] = best / len(samples) * 1e3
    name = pick_decoder(timings)
    return DecoderChoice(name=name, ms_per_image=timings), candidates[name]


def jpeg_decoder(name: str) -> JpegDecode:
    """The decoder a :class:`DecoderChoice` names, rebuilt where it runs (a cluster worker): OpenCV where
    simplejpeg is not installed there (identical pixels, so the results do not change)."""
    if name == "simplejpeg":
        return simplejpeg_decoder() or opencv_jpeg
    if name != "opencv":
        raise ValueError(f"no JPEG decoder named '{name}'")
    return opencv_jpeg


class ImageReader:
    """Reads files into :class:`DecodedImage` (thread-safe: it holds no mutable state)."""

    def __init__(self, limits: DecodeLimits, jpeg: JpegDecode = opencv_jpeg, window: Window | None = None,
                 decode_memory_bytes: int | None = None, budget: DecodeMemory | None = None) -> None:
        self.limits = limits
        self.jpeg = jpeg
        self.window = window  # 16-bit/float intensity window; None: each image's own min..max
        # shared by every thread that decodes with this reader; None: half the host memory available now
        self.budget = budget or DecodeMemory(decode_memory_bytes)

    def read(self, path: str) -> DecodedImage:
        """Decode ``path``.

        Raises:
            DecodeError: missing, unreadable, empty, too large, not an image, truncated or corrupt.
        """
        start = time.perf_counter()
        return self.read_bytes(self._read_bytes(path), path, start)

    def read_bytes(self, data: bytes, path: str, start: float | None = None) -> DecodedImage:
        """Decode an image held in memory (the service's request bodies), with the same limits and errors.

        Args:
            path: the name the image goes by in results and errors.
            start: ``time.perf_counter()`` when reading began (decode time counts from it); default now.

        Raises:
            DecodeError: empty, too large, not an image, truncated or corrupt.
        """
        start = time.perf_counter() if start is None else start
        if not data:
            raise DecodeError(FailureKind.EMPTY, "empty image (0 bytes)")
        if len(data) > self.limits.max_file_bytes:
            raise DecodeError(FailureKind.TOO_LARGE, f"image too large: {len(data)} bytes "
                                                     f"(limit {self.limits.max_file_bytes})")
        try:
            image, depth = self._decode(data)
        except cv2.error as exc:  # OpenCV's own limits and codec failures
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise DecodeError(FailureKind.CORRUPT, f"OpenCV could not decode it: {message}") from None
        except MemoryError:
            raise DecodeError(FailureKind.TOO_LARGE, "not enough host memory to decode it") from None
        self._check_pixels(image.shape[1], image.shape[0])
        return DecodedImage(path=path, pixels=image, decode_s=time.perf_counter() - start, source_depth=depth)

    def _decode(self, data: bytes) -> tuple[np.ndarray, int]:
        fmt = sniff_format(data)
        if fmt is None:
            raise DecodeError(FailureKind.NOT_AN_IMAGE, "not an image: unrecognised file signature")
        size = image_size(data, fmt)
        if size is not None:
            self._check_pixels(*size)
        with self.budget.hold(decode_bytes_needed(data, fmt, size)):
            return self._decode_format(data, fmt)

    def _decode_format(self, data: bytes, fmt: str) -> tuple[np.ndarray, int]:
        if fmt == "jpeg":
            if not jpeg_complete(data):
                raise DecodeError(FailureKind.CORRUPT, "truncated JPEG: no end-of-image marker")
            image = opencv_jpeg(data) if has_exif(data) else self.jpeg(data)
            depth = 8
        else:
            # ANYDEPTH keeps 16 bits for our own scaling; ANYCOLOR keeps grey as grey; EXIF rotation still applies.
            raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
            if raw is None:
                raise DecodeError(FailureKind.CORRUPT,
                                  f"corrupt or truncated {fmt.upper()}: OpenCV could not decode it")
            depth = raw.dtype.itemsize * 8
            image = to_uint8(raw, self.window)
        return image, depth

    def _read_bytes(self, path: str) -> bytes:
        try:
            with open_regular(path) as handle:
                size = handle.seek(0, 2)
                if size == 0:
                    raise DecodeError(FailureKind.EMPTY, "empty file (0 bytes)")
                if size > self.limits.max_file_bytes:
                    raise DecodeError(FailureKind.TOO_LARGE, f"file too large: {size} bytes "
                                                             f"(limit {self.limits.max_file_bytes})")
                handle.seek(0)
                return handle.read()
        except FileNotFoundError:
            raise DecodeError(FailureKind.MISSING, "file not found (deleted or moved during the run?)") from None
        except PermissionError:
            raise DecodeError(FailureKind.UNREADABLE, "permission denied") from None
        except IsADirectoryError:
            raise DecodeError(FailureKind.UNREADABLE, "is a folder, not a file") from None
        except NotRegularFile as exc:
            raise DecodeError(FailureKind.NOT_A_FILE, f"{exc}: never read (it could block or never end)") from None
        except OSError as exc:
            raise DecodeError(FailureKind.UNREADABLE, f"cannot read: {exc.strerror or exc}") from None

    def _check_pixels(self, width: int, height: int) -> None:
        if width < 1 or height < 1:
            raise DecodeError(FailureKind.CORRUPT, f"invalid image size {width}x{height}")
        if width * height > self.limits.max_pixels:
            raise DecodeError(FailureKind.TOO_LARGE, f"image too large: {width}x{height} pixels "
                                                     f"(limit {self.limits.max_pixels})")
