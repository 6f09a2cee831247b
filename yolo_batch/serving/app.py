"""The HTTP service: :func:`create_app` builds a FastAPI app around one :class:`ServiceState`.

Routes: ``POST /v1/detect`` (images in, infer's results.jsonl records out), ``GET /healthz`` (alive),
``GET /readyz`` (loaded and warmed up), ``GET /metrics`` (Prometheus), ``GET /v1/info``, and the OpenAPI
schema at ``GET /openapi.json``. With a token configured every route but /healthz needs
``Authorization: Bearer <token>`` (401 otherwise). Every error is ``{"error": kind, "detail": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import Executor
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from yolo_batch import __version__
from yolo_batch.inference.decode import DecodeError
from yolo_batch.inference.stages import Prepared
from yolo_batch.serving.backend import Backend, DetectorBackend, ItemResult
from yolo_batch.serving.batcher import QueueFull, ShuttingDown
from yolo_batch.serving.bodies import read_images
from yolo_batch.serving.config import ServeConfig
from yolo_batch.serving.errors import ServiceError, decode_error, service_error
from yolo_batch.serving.metrics import CONTENT_TYPE, ServiceMetrics
from yolo_batch.serving.state import BackendFactory, ServiceState, record

log = logging.getLogger(__name__)

ROUTES = ("/v1/detect", "/healthz", "/readyz", "/metrics", "/v1/info", "/openapi.json")


# --- the OpenAPI schema of the answers (answers are built as dicts; these only document them) --------------------


class DetectionOut(BaseModel):
    class_id: int
    name: str
    confidence: float
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in the image's pixels")


class ImageOut(BaseModel):
    path: str = Field(description="the file name of a multipart part, or the 'name' query parameter")
    width: int
    height: int
    detections: list[DetectionOut]
    timing_ms: dict[str, float]


class DetectOut(BaseModel):
    results: list[ImageOut] = Field(description="one per image, in the request's order")


class ErrorOut(BaseModel):
    error: str = Field(description="the kind: queue-full, timeout, corrupt, too-large, unauthorized, ...")
    detail: Any = None


class StatusOut(BaseModel):
    status: str


_IMAGE = {"schema": {"type": "string", "format": "binary"}}
_DETECT_BODY = {
    "required": True,
    "description": "One image as the raw body, or several as multipart file parts (any field name).",
    "content": {
        "image/jpeg": _IMAGE, "image/png": _IMAGE, "application/octet-stream": _IMAGE,
        "multipart/form-data": {"schema": {"type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    },
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorOut} for code in codes}


# --- the app -----------------------------------------------------------------------------------------------------


def create_app(config: ServeConfig, backend_factory: BackendFactory = DetectorBackend.load,
               metrics: ServiceMetrics | None = None) -> FastAPI:
    """The service for ``config``; the model is loaded in the background when the app starts (lifespan).

    Args:
        backend_factory: builds the model side from the config (a fake in tests).
        metrics: a registry to record into (a fresh one by default).
    """
    state = ServiceState(config, backend_factory, metrics or ServiceMetrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.close)

    app = FastAPI(title="yolo-batch serve", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None, description="Dynamic-batching object detection (Ultralytics YOLO).")
    app.state.service = state
    auth = [Depends(_bearer(config.token))] if config.token is not None else []
    unauthorized = (401,) if config.token is not None else ()

    @app.get("/healthz", response_model=StatusOut, summary="The process is alive (no authentication)")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", response_model=StatusOut, dependencies=auth, responses=_errors(503, *unauthorized),
             summary="The model is loaded and warmed up, and the service is not shutting down")
    async def readyz() -> dict[str, str]:
        reason = state.not_ready_reason()
        if reason is not None:
            raise ServiceError(503, "not-ready", reason, {"Retry-After": "5"})
        return {"status": "ready"}

    @app.get("/metrics", dependencies=auth, response_class=Response, summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **_errors(*unauthorized)})
    async def metrics_route() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/info", dependencies=auth, responses=_errors(*unauthorized),
             summary="Model, device, batch settings and version")
    async def info() -> dict[str, Any]:
        from yolo_batch.ultralytics_adapter import versions

        body: dict[str, Any] = {"version": __version__, "model": config.model, "ready": state.ready.is_set(),
                                "settings": config.to_dict(), "versions": versions()}
        if state.backend is not None and state.ready.is_set():
            body.update(state.backend.info())
        return body

    @app.post("/v1/detect", dependencies=auth, response_model=DetectOut, openapi_extra={"requestBody": _DETECT_BODY},
              responses=_errors(400, 413, 415, 429, 500, 503, 504, *unauthorized),
              summary="Detect objects in one or more images (batched with other requests)")
    async def detect(request: Request, name: str | None = Query(
            None, max_length=255, description="name for a raw-body image in the answer's 'path'")) -> JSONResponse:
        return JSONResponse(await _detect(state, request, name))

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    _install_error_handlers(app, state)
    app.add_middleware(_Meter, metrics=state.metrics)
    return app


def _bearer(token: str | None) -> Callable[..., Awaitable[None]]:
    scheme = HTTPBearer(auto_error=False, description="the service token (YOLO_BATCH_TOKEN or --token-file)")
    expected = (token or "").encode()

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not (given and hmac.compare_digest(given, expected)):
            raise ServiceError(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    return check


async def _detect(state: ServiceState, request: Request, name: str | None) -> dict[str, Any]:
    """Read, decode, queue, wait: the answer's body, or a :class:`ServiceError`."""
    config = state.config
    arrived = time.monotonic()
    deadline = arrived + config.timeout_ms / 1e3
    if state.draining.is_set():
        raise ServiceError(503, "shutting-down", "the service is shutting down", {"Retry-After": "5"})
    backend, batcher, executor = state.backend, state.batcher, state.executor
    if not state.ready.is_set() or backend is None or batcher is None or executor is None:
        raise ServiceError(503, "not-ready", state.not_ready_reason() or "not ready", {"Retry-After": "5"})
    images = await read_images(request, config.max_body_bytes, config.max_images, name, config.read_timeout_s)
    count = len(images)
    if state.draining.is_set():  # the signal came while the body was read
        raise ServiceError(503, "shutting-down", "the service is shutting down", {"Retry-After": "5"})
    if state.admitted + count > config.queue_size:
        raise ServiceError(429, "queue-full", f"{state.admitted} of {config.queue_size} images in flight",
                           {"Retry-After": str(state.retry_after_s())})
    state.admitted += count
    state.metrics.in_flight.inc(count)
    try:
        with state.decoding(count):  # accepted: a drain waits for these to reach the queue
            ready = await _decode(backend, executor, images, deadline, config.timeout_ms)
            queued = time.monotonic()
            try:
                futures = batcher.submit_many(ready, deadline=deadline)
            except (QueueFull, ShuttingDown) as exc:
                raise service_error(exc, state.retry_after_s()) from None
        waiting = asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
        try:
            outcomes = await asyncio.wait_for(waiting, max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            for future in futures:
                future.cancel()  # still queued: never run; already running: its result is dropped
            raise ServiceError(504, "timeout", f"no answer within {config.timeout_ms:g} ms") from None
        for answer in outcomes:
            if isinstance(answer, BaseException):
                raise service_error(answer, state.retry_after_s())
        wait_ms = (time.monotonic() - queued) * 1e3
        results = [record(p, r, wait_ms) for p, r in zip(ready, outcomes) if isinstance(r, ItemResult)]
    finally:
        state.admitted -= count
        state.metrics.in_flight.dec(count)
    state.metrics.images.labels("http", "ok").inc(count)
    return {"results": results}


async def _decode(backend: Backend, executor: Executor, images: list[tuple[str, bytes]], deadline: float,
                  timeout_ms: float) -> list[Prepared]:
    """Decode and letterbox a request's images in the decode pool; the first bad image is the answer."""
    loop = asyncio.get_running_loop()
    decoding = asyncio.gather(*(loop.run_in_executor(executor, backend.prepare, data, image_name)
                                for image_name, data in images), return_exceptions=True)
    try:
        prepared = await asyncio.wait_for(decoding, max(deadline - time.monotonic(), 0.0))
    except asyncio.TimeoutError:
        raise ServiceError(504, "timeout", f"not decoded within {timeout_ms:g} ms") from None
    for index, (outcome, (image_name, _)) in enumerate(zip(prepared, images)):
        if isinstance(outcome, DecodeError):
            raise decode_error(outcome, index, image_name)
        if isinstance(outcome, BaseException):
            raise service_error(outcome)
    return [p for p in prepared if isinstance(p, Prepared)]


def _install_error_handlers(app: FastAPI, state: ServiceState) -> None:
    def answer(error: ServiceError) -> JSONResponse:
        state.metrics.errors.labels(error.kind).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500 and exc.kind == "internal":
            log.error("%s %s: %s", request.method, request.url.path, exc.detail)
        return answer(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, f"http-{exc.status_code}")
        return answer(ServiceError(exc.status_code, kind, exc.detail, dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:  # logged with its traceback by Starlette
        return answer(service_error(exc))

    @app.exception_handler(RequestValidationError)
    async def on_bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return answer(ServiceError(400, "bad-request", detail))


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _Meter:
    """ASGI middleware: requests by route and status, and latency, for every HTTP request."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("path") if scope.get("path") in ROUTES else "other"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
