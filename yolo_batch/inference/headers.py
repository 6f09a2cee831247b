"""Image format and size from the first bytes of a file, read before any pixel is decoded.

This is what lets a gigantic image be refused without allocating it. Formats whose size is not
cheap to find (TIFF) answer ``None``; the decoder checks those after decoding.
"""

from __future__ import annotations

import struct

_PNG = b"\x89PNG\r\n\x1a\n"


def sniff_format(data: bytes) -> str | None:
    """``jpeg``, ``png``, ``bmp``, ``tiff``, ``webp`` or None from the magic bytes."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == _PNG:
        return "png"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def image_size(data: bytes, fmt: str | None) -> tuple[int, int] | None:
    """(width, height) from the header, or None where unknown or unreadable."""
    try:
        if fmt == "png" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if fmt == "bmp":
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if fmt == "webp":
            return _webp_size(data)
        if fmt == "jpeg":
            return _jpeg_size(data)
    except struct.error:  # a header cut short: the decoder reports the file as truncated
        return None
    return None


def jpeg_complete(data: bytes) -> bool:
    """True when a JPEG ends with its end-of-image marker (trailing padding bytes allowed).

    libjpeg decodes a truncated file without an error and fills the missing rows with grey, so the
    marker is the only sign that the file was cut short.
    """
    tail = data[-1024:].rstrip(b"\x00\r\n ")
    return tail.endswith(b"\xff\xd9")


def has_exif(data: bytes) -> bool:
    """True when a JPEG carries an EXIF block (which may ask for a rotation only OpenCV applies)."""
    return b"Exif\x00\x00" in data[:65536]


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    end = len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + length
    return None
