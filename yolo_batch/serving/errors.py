"""Every error the service answers with: one JSON shape, ``{"error": kind, "detail": ...}``, and its status.

:func:`service_error` maps the library's exceptions (decode failures, a full queue, deadlines, shutdown,
out-of-memory) to that shape, so the routes and the hot folder name failures the same way.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import ClientDisconnect

from yolo_batch.inference.decode import DecodeError, FailureKind
from yolo_batch.inference.oom_split import OutOfMemoryAlone
from yolo_batch.serving.batcher import DeadlineExceeded, QueueFull, ShuttingDown


class ServiceError(Exception):
    """An answer other than 200: status code, kind (the ``error`` field), detail and extra headers."""

    def __init__(self, status: int, kind: str, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {kind}: {detail}")
        self.status = status
        self.kind = kind
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.kind, "detail": self.detail}


_DECODE_STATUS = {
    FailureKind.TOO_LARGE: 413,
    FailureKind.EMPTY: 400,
    FailureKind.NOT_AN_IMAGE: 400,
    FailureKind.CORRUPT: 400,
}


def decode_error(exc: DecodeError, index: int, name: str) -> ServiceError:
    """A request image that cannot be decoded: 413 when over a size limit, else 400."""
    return ServiceError(_DECODE_STATUS.get(exc.kind, 400), exc.kind.value,
                        {"image": index, "name": name, "reason": exc.reason})


def service_error(exc: BaseException, retry_after_s: int = 1) -> ServiceError:
    """The answer for an exception raised while a request's images were queued or processed."""
    if isinstance(exc, ServiceError):
        return exc
    retry = {"Retry-After": str(max(1, int(retry_after_s)))}
    if isinstance(exc, QueueFull):
        return ServiceError(429, "queue-full", str(exc), retry)
    if isinstance(exc, DeadlineExceeded):
        return ServiceError(504, "timeout", str(exc))
    if isinstance(exc, ShuttingDown):
        return ServiceError(503, "shutting-down", str(exc), retry)
    if isinstance(exc, ClientDisconnect):  # 499, as nginx counts it: the client is gone, no answer reaches it
        return ServiceError(499, "client-disconnect", "the client went away before its answer")
    if isinstance(exc, OutOfMemoryAlone):
        return ServiceError(503, "device-memory", str(exc).splitlines()[0], retry)
    return ServiceError(500, "internal", f"{type(exc).__name__}: {exc}".splitlines()[0])
