"""Group letterboxed images by shape so a batch needs no padding beyond each image's own stride padding.

Ultralytics pads a batch of mixed shapes to imgsz x imgsz; here a batch only ever holds one shape, so
its tensor is exactly its images. Pending images are bounded: when more than ``max_pending`` wait, the
fullest bucket leaves early as a partial batch (memory stays flat whatever the shape mix).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
Shape = tuple[int, int]


class ShapeBuckets(Generic[T]):
    """Pure batching by shape (not thread-safe: one stage owns it).

    Args:
        batch_size: a callable giving the current batch size (it can shrink after an out-of-memory split).
        max_pending: most items held across all buckets before the fullest one is released.
    """

    def __init__(self, batch_size: Callable[[], int], max_pending: int) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._batch_size = batch_size
        self.max_pending = max_pending
        self._buckets: dict[Shape, list[T]] = {}
        self.pending = 0
        self.high_water = 0

    def add(self, shape: Shape, item: T) -> list[list[T]]:
        """Add one item; return the batches that are ready (full, or released to bound memory)."""
        self._buckets.setdefault(shape, []).append(item)
        self.pending += 1
        self.high_water = max(self.high_water, self.pending)
        ready: list[list[T]] = []
        size = max(1, self._batch_size())
        bucket = self._buckets[shape]
        while len(bucket) >= size:
            ready.append(self._take(shape, size))
            bucket = self._buckets.get(shape, [])
        while self.pending > self.max_pending:
            fullest = max(self._buckets, key=lambda s: len(self._buckets[s]))
            ready.append(self._take(fullest, size))
        return ready

    def drain(self) -> list[list[T]]:
        """Everything still pending, largest buckets first, split at the current batch size."""
        size = max(1, self._batch_size())
        out: list[list[T]] = []
        for shape in sorted(self._buckets, key=lambda s: -len(self._buckets[s])):
            while shape in self._buckets:
                out.append(self._take(shape, size))
        return out

    def _take(self, shape: Shape, size: int) -> list[T]:
        bucket = self._buckets[shape]
        batch, rest = bucket[:size], bucket[size:]
        if rest:
            self._buckets[shape] = rest
        else:
            del self._buckets[shape]
        self.pending -= len(batch)
        return batch


@dataclass(frozen=True)
class PaddingStats:
    """Pixels fed to the model vs pixels of image content, against padding every image to imgsz x imgsz."""

    images: int
    content_pixels: int
    tensor_pixels: int
    square_pixels: int

    @property
    def padding_fraction(self) -> float:
        return 1 - self.content_pixels / self.tensor_pixels if self.tensor_pixels else 0.0

    @property
    def square_padding_fraction(self) -> float:
        return 1 - self.content_pixels / self.square_pixels if self.square_pixels else 0.0

    def __add__(self, other: PaddingStats) -> PaddingStats:
        return PaddingStats(self.images + other.images, self.content_pixels + other.content_pixels,
                            self.tensor_pixels + other.tensor_pixels, self.square_pixels + other.square_pixels)

    def to_dict(self) -> dict[str, float | int]:
        return {"images": self.images, "content_pixels": self.content_pixels, "tensor_pixels": self.tensor_pixels,
                "square_pixels": self.square_pixels, "padding_fraction": round(self.padding_fraction, 4),
                "square_padding_fraction": round(self.square_padding_fraction, 4)}


def batch_padding(out_shape: Shape, content_pixels: Iterable[int], imgsz: int) -> PaddingStats:
    """Padding of one batch whose tensor is ``out_shape`` per image."""
    contents = list(content_pixels)
    n = len(contents)
    return PaddingStats(images=n, content_pixels=sum(contents), tensor_pixels=n * out_shape[0] * out_shape[1],
                        square_pixels=n * imgsz * imgsz)


NO_PADDING = PaddingStats(0, 0, 0, 0)
