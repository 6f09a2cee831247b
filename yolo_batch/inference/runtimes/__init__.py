"""Runtimes behind the inference engine: PyTorch, OpenVINO, ONNX Runtime, TensorRT.

* :mod:`.choice`: which runtime and precision (pure: request + host facts -> :class:`RuntimeChoice` with a reason).
* :mod:`.host`: the host's facts (installed packages, CPU bf16/fp16 instructions, the GPU).
* :mod:`.cache`: exports cached by weights, imgsz, precision, batch range, runtime and version, device.
* :mod:`.loader`: choice -> export (through the Ultralytics adapter) -> the runtime's hook class.
* :mod:`.base` (the hook: one uint8 batch in, raw network output out), :mod:`.torch`, :mod:`.openvino`,
  :mod:`.onnxruntime`, :mod:`.tensorrt`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from yolo_batch.core.lazy import lazy_exports

if TYPE_CHECKING:
    from yolo_batch.inference.runtimes.base import ModelInfo, Runtime
    from yolo_batch.inference.runtimes.cache import CacheEntry, ExportCache, export_key
    from yolo_batch.inference.runtimes.choice import (
        BACKENDS,
        PRECISIONS,
        BackendName,
        HostFacts,
        Precision,
        RuntimeChoice,
        choose_runtime,
    )
    from yolo_batch.inference.runtimes.host import host_facts
    from yolo_batch.inference.runtimes.loader import (
        ExportRecord,
        OpenedRuntime,
        open_runtime,
        resolve_runtime,
    )

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "BackendName",
    "CacheEntry",
    "ExportCache",
    "ExportRecord",
    "HostFacts",
    "ModelInfo",
    "OpenedRuntime",
    "Precision",
    "Runtime",
    "RuntimeChoice",
    "choose_runtime",
    "export_key",
    "host_facts",
    "open_runtime",
    "resolve_runtime",
]

__getattr__, __dir__ = lazy_exports(__name__)
