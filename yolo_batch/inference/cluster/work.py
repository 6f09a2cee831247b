"""What runs on the cluster's workers, with no Ray in it: a decode task and the inference actor's callable.

Both are the local path's steps (:mod:`yolo_batch.inference.stages`), applied to the blocks Ray Data hands them
(``{column: numpy array}``):

* :func:`prepare_block`: ``path`` -> ``item`` (a :class:`~.stages.Prepared`, or the file's
  :class:`~.writers.FailureRecord`), through :class:`~.stages.PrepareStep` with a model-free
  :class:`~yolo_batch.inference.letterbox.Letterboxer`: decode tasks never load the model.
* :class:`InferWorker`: one engine per actor, opened from the run's :class:`WorkSpec` exactly as local ``infer``
  opens it (the runtime choice made once for the run travels in the spec), ``--batch auto`` measured on the
  actor's own device with its first images, then :class:`~.stages.InferStep` (NMS, out-of-memory split) on each
  same-shape group of a block. Out: ``result`` per image (record or failure), ``original`` (annotated copies),
  and on a block's first row the actor's :class:`ActorReport` for that block.

Everything here is plain Python, so it is tested without a cluster; :mod:`.ray_backend` wires it into Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from yolo_batch.core.files import atomic_write
from yolo_batch.inference.buckets import NO_PADDING, PaddingStats
from yolo_batch.inference.decode import DecodeLimits, ImageReader, jpeg_decoder
from yolo_batch.inference.engine import Engine, NmsSettings
from yolo_batch.inference.letterbox import Letterboxer
from yolo_batch.inference.oom_split import BatchSize, OomEvent
from yolo_batch.inference.runtimes.choice import RuntimeChoice
from yolo_batch.inference.stages import InferStep, Prepared, PrepareStep
from yolo_batch.inference.throughput import AUTO_SAMPLES, ThroughputChoice, measure_prepared
from yolo_batch.inference.writers import FailureRecord, ImageRecord

log = logging.getLogger(__name__)

Block = dict[str, np.ndarray]


@dataclass(frozen=True)
class WorkSpec:
    """Everything a worker needs to do what local ``infer`` does, decided once on the driver (picklable)."""

    imgsz: int
    stride: int  # the model's letterbox stride (decode tasks letterbox without loading the model)
    limits: DecodeLimits
    window: tuple[float, float] | None
    jpeg: str  # the JPEG decoder the driver chose ("opencv" or "simplejpeg")
    keep_originals: bool  # --save-annotated: decoded images travel to the driver, which draws them
    runtime: RuntimeChoice  # backend and precision, resolved once on a worker like the actors
    nms: NmsSettings
    batch: int | None  # None: --batch auto, measured by each actor on its own device
    max_batch: int  # the largest batch the engine is opened for (a TensorRT profile; --batch auto's ceiling)
    max_latency_ms: float | None
    threads: int  # torch threads per CPU actor
    device: str  # "cpu", or "0": the GPU Ray assigned the actor
    use_cache: bool = True
    model_sha256: str = ""  # names the model file on each node


def prepare_block(block: Block, spec: WorkSpec) -> Block:
    """Decode and letterbox each ``path`` of a block (a Ray Data task on a CPU)."""
    reader = ImageReader(spec.limits, jpeg_decoder(spec.jpeg), spec.window)
    step = PrepareStep(Letterboxer(spec.imgsz, spec.stride), spec.keep_originals)
    items = [step.from_file(reader.read, str(path)) for path in block["path"]]
    return {"path": block["path"], "item": _objects(items)}


def resolve_runtime_here(backend: str, precision: str, device: str) -> RuntimeChoice:
    """The runtime choice on a worker with the actors' resources (the installed runtimes and the device are the
    worker's, not the driver's)."""
    from yolo_batch.core.devices import inference_device
    from yolo_batch.inference.runtimes.loader import resolve_runtime

    torch_device, _ = inference_device(device, None)
    return resolve_runtime(backend, precision, torch_device)


def model_file(data: bytes, sha256: str) -> Path:
    """The model's bytes as a .pt on this node (written once, atomically; every actor on the node shares it)."""
    path = Path(tempfile.gettempdir()) / "yolo-batch-models" / f"{sha256 or 'model'}.pt"
    if not path.is_file() or path.stat().st_size != len(data):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    return path


@dataclass(frozen=True)
class ActorReport:
    """What one actor did with one block (the driver sums them into per-actor throughput)."""

    actor: str  # host:pid
    batch: int  # the actor's batch size after the block
    images: int
    failed: int
    seconds: float  # forward passes and NMS
    collate_s: float = 0.0  # stacking the batches
    padding: PaddingStats = NO_PADDING
    choice: ThroughputChoice | None = None  # --batch auto: on the actor's first block only
    export: dict[str, Any] | None = None  # an exported runtime's ExportRecord: on the actor's first block only
    oom_events: tuple[OomEvent, ...] = field(default_factory=tuple)


class InferWorker:
    """An inference actor: one engine on its device, called with blocks of prepared images.

    Args:
        spec: the run's settings.
        model: the model file on this node (see :func:`model_file`).
    """

    def __init__(self, spec: WorkSpec, model: Path | str) -> None:
        import torch

        from yolo_batch.core.devices import inference_device

        self.spec = spec
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        device, _ = inference_device(spec.device, None)
        if device.type == "cpu":
            torch.set_num_threads(spec.threads)  # the actor's own process: its CPUs are the ones Ray gave it
        self.engine = Engine.open(str(model), device, spec.runtime, spec.imgsz, spec.nms, max_batch=spec.max_batch,
                                  streams=1, threads=spec.threads, use_cache=spec.use_cache, on_export=log.warning)
        # Until the first images arrive (--batch auto measures on them), a block of failures alone needs no size.
        self.step = InferStep(self.engine, BatchSize(spec.batch or 1), spec.imgsz)
        self.started = False

    def __call__(self, block: Block) -> Block:
        items = list(block["item"])
        prepared = [item for item in items if isinstance(item, Prepared)]
        first = not self.started and bool(prepared)
        choice = self._start(prepared) if first else None
        step = self.step
        events_before = len(step.batch_size.events)
        results: list[ImageRecord | FailureRecord] = [item for item in items if isinstance(item, FailureRecord)]
        originals: dict[str, np.ndarray] = {}
        seconds, collate_s, padding, failed = 0.0, 0.0, NO_PADDING, len(results)
        for group in _shape_groups(prepared):
            while group:  # the size is read per chunk: an out-of-memory split shrinks it for the next
                chunk, group = group[:step.batch_size()], group[step.batch_size():]
                collate_start = time.perf_counter()
                batch = step.collate(chunk)
                collate_s += time.perf_counter() - collate_start
                written = step(batch)
                results += [*written.records, *written.failures]
                originals.update(written.originals or {})
                seconds += written.seconds
                padding += written.padding
                failed += len(written.failures)
        export = self.engine.export.to_dict() if first and self.engine.export else None
        report = ActorReport(actor=self.identity, batch=step.batch_size(), images=len(results) - failed,
                             failed=failed, seconds=seconds, collate_s=collate_s, padding=padding, choice=choice,
                             export=export,
                             oom_events=tuple(step.batch_size.events[events_before:]))
        return {"path": _objects([r.path for r in results]), "result": _objects(results),
                "original": _objects([originals.get(r.path) for r in results]),
                "report": _objects([report, *([None] * (len(results) - 1))])}

    def _start(self, prepared: Sequence[Prepared]) -> ThroughputChoice | None:
        """Warm up on the first shape; with ``--batch auto`` measure on this actor's device and first images."""
        self.started = True
        self.engine.warmup(prepared[0].plan.out)
        if self.spec.batch is not None:
            return None
        samples = [(item.pixels, item.plan) for item in prepared[:AUTO_SAMPLES]]
        choice = measure_prepared(self.engine, samples, self.spec.max_batch, self.spec.max_latency_ms)
        log.info("actor %s: batch %d (%s)", self.identity, choice.batch, choice.reason)
        self.step = InferStep(self.engine, BatchSize(choice.batch), self.spec.imgsz)
        return choice


def _shape_groups(items: Sequence[Prepared]) -> list[list[Prepared]]:
    """Same-shape groups in first-seen order: a batch holds one letterboxed shape."""
    groups: dict[tuple[int, int], list[Prepared]] = {}
    for item in items:
        groups.setdefault(item.plan.out, []).append(item)
    return list(groups.values())


def _objects(values: Sequence[Any]) -> np.ndarray:
    """A 1-d object array (``np.array`` would try to stack records or images into one array)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out
