"""Pipelined batch inference: ``yolo-batch infer`` and the engine a later HTTP service reuses.

Public API::

    from yolo_batch.inference import InferConfig, run_inference, Engine

    summary = run_inference(InferConfig(sources=("images/",), model="best.pt", out=Path("out")))

Stages: discover (:mod:`.sources`) -> decode (:mod:`.decode`, thread pool) -> letterbox (:mod:`.letterbox`)
-> shape buckets (:mod:`.buckets`) -> pinned host batch -> forward + NMS on the device (:mod:`.engine`)
-> writer thread (:mod:`.writers`), joined by bounded queues (:mod:`.pipeline`). ``results.jsonl`` is the
resume journal. ``--batch auto`` is :mod:`.throughput`; out-of-memory splitting is :mod:`.oom_split`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from yolo_batch.core.lazy import lazy_exports

if TYPE_CHECKING:
    from yolo_batch.inference.buckets import PaddingStats, ShapeBuckets
    from yolo_batch.inference.config import (
        BatchSetting,
        InferConfig,
        OutputFormat,
        default_workers,
    )
    from yolo_batch.inference.decode import (
        DecodedImage,
        DecodeError,
        FailureKind,
        ImageReader,
    )
    from yolo_batch.inference.detections import Detections
    from yolo_batch.inference.engine import Detection, Engine, NmsSettings
    from yolo_batch.inference.letterbox import Letterbox, plan_letterbox
    from yolo_batch.inference.pipeline import Pipeline, PipelineStats
    from yolo_batch.inference.plots import save_throughput_plot, throughput_figure
    from yolo_batch.inference.runner import run_inference
    from yolo_batch.inference.sources import discover
    from yolo_batch.inference.stream import iter_inference
    from yolo_batch.inference.summary import InferenceSummary
    from yolo_batch.inference.throughput import (
        ThroughputChoice,
        ThroughputSample,
        choose_throughput_batch,
    )

    # The names these had before ``auto_batch`` became ``throughput``; users' code may still import them.
    from yolo_batch.inference.throughput import ThroughputChoice as AutoBatchChoice
    from yolo_batch.inference.throughput import choose_throughput_batch as choose_batch


__all__ = [
    "AutoBatchChoice",
    "BatchSetting",
    "DecodeError",
    "DecodedImage",
    "Detection",
    "Detections",
    "Engine",
    "FailureKind",
    "ImageReader",
    "InferConfig",
    "InferenceSummary",
    "Letterbox",
    "NmsSettings",
    "OutputFormat",
    "PaddingStats",
    "Pipeline",
    "PipelineStats",
    "ShapeBuckets",
    "ThroughputChoice",
    "ThroughputSample",
    "choose_batch",
    "choose_throughput_batch",
    "default_workers",
    "discover",
    "iter_inference",
    "plan_letterbox",
    "run_inference",
    "save_throughput_plot",
    "throughput_figure",
]

__getattr__, __dir__ = lazy_exports(__name__)
