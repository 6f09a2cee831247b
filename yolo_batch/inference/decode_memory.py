"""How many images may be decoding at once: a budget of host bytes shared by the decode threads.

A compressed file says little about its decoded size: a 3.9 MB 16-bit PNG of 9,990^2 pixels decodes to 600 MB
of 16-bit samples before it becomes 300 MB of 8-bit ones. Fifteen decode threads (a 16-core GPU box) each
opening such a file would need 13 GB at once. So each decode first takes its estimated bytes from
:class:`DecodeMemory` (from the header: pixels, channels, bits per sample) and waits while the others hold
too much; small images never wait in practice. A decode larger than the whole budget waits until it can run
alone (the pixel limit already refused anything that cannot fit at all).
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Iterator

from yolo_batch.core.devices import available_host_bytes

HOST_SHARE = 0.5  # of the memory available when the reader is made: the model and the queues need the rest
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # colour type -> channels OpenCV decodes (palette as BGR)
_UNKNOWN_BYTES_PER_PIXEL = 8  # TIFF, WebP, BMP: up to 4 channels of 16 bits, or grey float32 and more
_EIGHT_BIT_OUT = 3  # the uint8 BGR result, held beside the decode while it is converted


def default_capacity() -> int:
    """:data:`HOST_SHARE` of the host memory available now."""
    return int(available_host_bytes() * HOST_SHARE)


def decode_bytes_needed(data: bytes, fmt: str | None, size: tuple[int, int] | None) -> int:
    """Peak bytes to decode ``data`` (format ``fmt``, ``size`` = (width, height) from its header, when known)
    and convert it to 8-bit BGR: the decoded samples plus the 8-bit copy."""
    if size is None:  # no header size: the compressed size is all we know (a lower bound)
        return len(data)
    width, height = size
    if fmt == "jpeg":
        per_pixel = 3  # libjpeg decodes to 8-bit BGR directly: no separate 8-bit copy
        return width * height * per_pixel
    per_pixel = _UNKNOWN_BYTES_PER_PIXEL
    if fmt == "png" and len(data) >= 26:
        depth, colour = struct.unpack(">BB", data[24:26])
        per_pixel = _PNG_CHANNELS.get(colour, 4) * (2 if depth == 16 else 1)
    return width * height * (per_pixel + _EIGHT_BIT_OUT)


class DecodeMemory:
    """A counting budget of bytes (thread-safe)."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = max(1, capacity if capacity is not None else default_capacity())
        self.in_use = 0
        self._changed = threading.Condition()

    def try_acquire(self, wanted: int) -> bool:
        """Take ``wanted`` bytes (at most the capacity) if they are free now."""
        amount = min(max(wanted, 0), self.capacity)
        with self._changed:
            if self.in_use + amount > self.capacity:
                return False
            self.in_use += amount
            return True

    def acquire(self, wanted: int) -> int:
        """Take ``wanted`` bytes (at most the capacity), waiting until they are free; returns what was taken."""
        amount = min(max(wanted, 0), self.capacity)
        with self._changed:
            self._changed.wait_for(lambda: self.in_use + amount <= self.capacity)
            self.in_use += amount
        return amount

    def release(self, amount: int) -> None:
        with self._changed:
            self.in_use -= amount
            self._changed.notify_all()

    @contextlib.contextmanager
    def hold(self, wanted: int) -> Iterator[None]:
        """Hold ``wanted`` bytes for the block (given back on error too)."""
        taken = self.acquire(wanted)
        try:
            yield
        finally:
            self.release(taken)
