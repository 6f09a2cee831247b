"""``yolo-batch serve``: a dynamic-batching HTTP detection service, a hot folder, and ``bench serve``.

Public API::

    from yolo_batch.serving import ServeConfig, create_app, resolve, serve

    serve(resolve({"model": "best.pt", "max_batch": "16"}))   # blocks until SIGTERM; returns the exit code

Modules, one concept each: :mod:`.config` (settings and the environment), :mod:`.batcher` (the dynamic
batcher, no HTTP or torch), :mod:`.backend` (the infer engine behind it), :mod:`.bodies` (images out of
requests), :mod:`.errors` (the error answers), :mod:`.metrics` (Prometheus), :mod:`.state` (start and stop
order), :mod:`.app` (routes), :mod:`.hotfolder` (watched folder with a crash-safe journal),
:mod:`.server` (uvicorn and SIGTERM), :mod:`.bench` (``bench serve``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from yolo_batch.core.lazy import lazy_exports

if TYPE_CHECKING:
    from yolo_batch.serving.app import create_app
    from yolo_batch.serving.batcher import (
        BatchInfo,
        DeadlineExceeded,
        DynamicBatcher,
        QueueFull,
        ShuttingDown,
    )
    from yolo_batch.serving.config import SETTINGS, ServeConfig, from_env, resolve
    from yolo_batch.serving.server import serve

__all__ = [
    "SETTINGS",
    "BatchInfo",
    "DeadlineExceeded",
    "DynamicBatcher",
    "QueueFull",
    "ServeConfig",
    "ShuttingDown",
    "create_app",
    "from_env",
    "resolve",
    "serve",
]

__getattr__, __dir__ = lazy_exports(__name__)
