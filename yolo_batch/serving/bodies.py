"""Images out of a request body: raw bytes (``image/*``, ``application/octet-stream``) or multipart files.

Limits are enforced while reading: the whole body (``Content-Length`` first, then the bytes as they
arrive), the number of images and the time the body takes to arrive (408, so a stalled upload does not hold
its connection). Per-image byte and pixel limits are the decoder's
(:class:`~yolo_batch.inference.decode.DecodeLimits`). A client that goes away mid-upload is a
``client-disconnect`` (status 499, as nginx counts it: no answer reaches that client), not a failure of ours.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from yolo_batch.serving.errors import ServiceError

RAW_TYPES = ("application/octet-stream",)
_FIELD_BYTES = 64 << 10  # a non-file multipart field (ignored) may be this large


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise ServiceError(413, "body-too-large", f"request body over {limit} bytes")
        yield chunk


async def read_images(request: Request, max_body_bytes: int, max_images: int, name: str | None = None,
                      timeout_s: float | None = None) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` for each image in the body, in order, read within ``timeout_s`` (None: no limit).

    Raises:
        ServiceError: 413 body or image count over a limit, 415 a content type we do not take, 400 a
            malformed multipart body or one without files, or an empty body; 408 the body did not arrive in
            time (the connection is closed after the answer); 499 the client went away mid-upload.
    """
    try:
        return await asyncio.wait_for(_read(request, max_body_bytes, max_images, name), timeout_s)
    except asyncio.TimeoutError:
        raise ServiceError(408, "read-timeout", f"the request body did not arrive within {timeout_s:g} s",
                           {"Connection": "close"}) from None
    except ClientDisconnect:
        raise ServiceError(499, "client-disconnect", "the client went away before its request body arrived") from None


async def _read(request: Request, max_body_bytes: int, max_images: int, name: str | None) -> list[tuple[str, bytes]]:
    content_type = request.headers.get("content-type", RAW_TYPES[0])
    media = content_type.split(";", 1)[0].strip().lower()
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body_bytes:
        raise ServiceError(413, "body-too-large", f"request body of {length} bytes over {max_body_bytes}")
    stream = _limited(request.stream(), max_body_bytes)
    if media == "multipart/form-data":
        return await _multipart(request, stream, max_images)
    if media.startswith("image/") or media in RAW_TYPES:
        data = b"".join([chunk async for chunk in stream])
        if not data:
            raise ServiceError(400, "empty", "empty body: send an image (raw bytes or multipart files)")
        return [(name or "image", data)]
    raise ServiceError(415, "unsupported-media-type",
                       f"content type '{media}': send image/*, application/octet-stream or multipart/form-data")


async def _multipart(request: Request, stream: AsyncGenerator[bytes, None],
                     max_images: int) -> list[tuple[str, bytes]]:
    parser = MultiPartParser(request.headers, stream, max_files=max_images, max_fields=max_images + 16,
                             max_part_size=_FIELD_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if str(exc).startswith("Too many files"):
            raise ServiceError(413, "too-many-images", f"more than {max_images} images in one request") from None
        raise ServiceError(400, "malformed-body", f"malformed multipart body: {exc}") from None
    try:
        files = [(value.filename or key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise ServiceError(400, "no-image", "the multipart body holds no file: send images as file parts")
        return [(file_name, await upload.read()) for file_name, upload in files]
    finally:
        await form.close()
