"""The service's model side, made of the infer pipeline's steps: decode,
:class:`~yolo_batch.inference.stages.PrepareStep`, shape groups and :class:`~yolo_batch.inference.stages.InferStep`
(engine, NMS, OOM split).

:meth:`DetectorBackend.prepare` runs in decode threads (bytes -> letterboxed image); :meth:`DetectorBackend.process`
is the batcher's ``process``: it groups a batch by letterboxed shape (as infer's buckets do), runs each group
through the same step local ``infer`` runs, and returns one result per item, or an :class:`OutOfMemoryAlone` for an
image that does not fit even alone. So a request's detections equal ``yolo-batch infer``'s on the same file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from yolo_batch import ultralytics_adapter
from yolo_batch.core.devices import inference_device
from yolo_batch.inference.config import requested_precision
from yolo_batch.inference.decode import (
    DecodeLimits,
    DecoderChoice,
    ImageReader,
    choose_jpeg_decoder,
)
from yolo_batch.inference.engine import Detection, Engine, NmsSettings
from yolo_batch.inference.oom_split import BatchSize, OutOfMemoryAlone
from yolo_batch.inference.runner import THROUGHPUT_PLOT, cpu_parallelism
from yolo_batch.inference.runtimes.loader import resolve_runtime
from yolo_batch.inference.stages import InferStep, Prepared, PrepareStep
from yolo_batch.inference.throughput import (
    AUTO_MAX_BATCH,
    ThroughputChoice,
    measure_engine,
)
from yolo_batch.serving.config import ServeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemResult:
    """One image's detections and the forward pass that produced them."""

    detections: tuple[Detection, ...]
    batch: int  # images of its shape in the dispatched batch (run together unless an OOM split them)
    inference_ms: float  # that forward pass + NMS, per image


class Backend(Protocol):
    """What the service needs from a model (tests may pass a fake to :func:`~yolo_batch.serving.app.create_app`)."""

    streams: int  # batches run side by side
    on_oom: Callable[[], None] | None  # set by the service (metrics)

    @property
    def batch_size(self) -> Callable[[], int]:
        """The current max batch (it may shrink after an out-of-memory split)."""
        ...

    def warm_up(self) -> None: ...

    def prepare(self, data: bytes, name: str) -> Prepared: ...

    def process(self, items: Sequence[Prepared]) -> list[ItemResult | BaseException]: ...

    def info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class DetectorBackend:
    """A loaded :class:`Engine` with the service's reader, batch size and CPU parallelism.

    Args:
        engine: the loaded model.
        config: the service's settings.
        on_oom: called after each out-of-memory error (metrics), after the device cache is released.
    """

    def __init__(self, engine: Engine, config: ServeConfig, on_oom: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.config = config
        self.on_oom = on_oom
        on_gpu = engine.device.type == "cuda"
        self.threads, self.streams = cpu_parallelism(config, on_gpu)  # type: ignore[arg-type]  # reads threads, streams
        self.reader = ImageReader(DecodeLimits(config.max_image_bytes, config.max_pixels), window=config.image_window)
        self.batch_size = BatchSize(config.max_batch.fixed or 1)
        self.prepare_step = PrepareStep(engine)
        self.infer_step = InferStep(engine, self.batch_size, config.imgsz, on_oom=self._count_oom)
        self.decoder = DecoderChoice(name="opencv", ms_per_image={})
        self.batch_choice: ThroughputChoice | None = None
        self.throughput_plot: Path | None = None
        self.warmup_s = 0.0
        self._saved_threads: int | None = None

    @classmethod
    def load(cls, config: ServeConfig) -> DetectorBackend:
        """Resolve the device and the runtime (the same choice as ``infer``), load the model (never downloading;
        exported and cached first for an exported runtime); torch threads are set for the service.

        Raises:
            InputError: unknown or unreadable model, unknown device, a runtime or precision that cannot run here.
        """
        import torch

        ultralytics_adapter.check_model_spec(config.model)  # refused before the runtime choice is logged
        device, _ = inference_device(config.device, None)  # the precision is the runtime choice's
        choice = resolve_runtime(config.backend, requested_precision(config.precision, config.half), device)
        threads, streams = cpu_parallelism(config, device.type == "cuda")  # type: ignore[arg-type]
        max_batch = config.max_batch.fixed or AUTO_MAX_BATCH.get(device.type, AUTO_MAX_BATCH["cpu"])
        engine = Engine.open(config.model, device, choice, config.imgsz,
                             NmsSettings(config.conf, config.iou, config.max_det, config.classes), max_batch=max_batch,
                             streams=streams, threads=threads, use_cache=config.cache, on_export=log.warning)
        if engine.export is not None:
            log.info("export: %s", engine.export.describe())
        backend = cls(engine, config)
        if device.type == "cpu" or config.threads is not None:
            backend._saved_threads = torch.get_num_threads()
            torch.set_num_threads(backend.threads)  # process-wide: restored by close()
        return backend

    def warm_up(self) -> None:
        """Choose the JPEG decoder, run one untimed forward pass, and measure ``max_batch auto``."""
        start = time.perf_counter()
        square = np.full((self.config.imgsz, self.config.imgsz, 3), 114, np.uint8)
        sample = _sample_jpeg(self.config.imgsz)
        self.decoder, jpeg = choose_jpeg_decoder([sample])
        self.reader = ImageReader(self.reader.limits, jpeg, self.reader.window)
        pixels, plan = self.engine.prepare(square)
        self.engine.warmup(plan.out)
        if self.config.max_batch.is_auto:
            cap = AUTO_MAX_BATCH.get(self.engine.device.type, AUTO_MAX_BATCH["cpu"])
            self.batch_choice = measure_engine(self.engine, [pixels], [plan], cap, self.config.max_latency_ms)
            self.batch_size = self.infer_step.batch_size = BatchSize(self.batch_choice.batch)
            log.info("max batch (auto): %d - %s", self.batch_choice.batch, self.batch_choice.reason)
            self.throughput_plot = self._plot(self.batch_choice)
        self.warmup_s = time.perf_counter() - start

    def _plot(self, choice: ThroughputChoice) -> Path | None:
        """``throughput.png`` beside the hot folder's results (``--out``); without ``--out`` the service writes no
        files, so the measurements stay in the log and ``GET /v1/info`` (``batch_choice``)."""
        if self.config.out is None:
            log.info("max batch (auto): no --out, so no throughput.png; GET /v1/info has the measurements")
            return None
        from yolo_batch.inference.plots import save_throughput_plot

        self.config.out.mkdir(parents=True, exist_ok=True)
        path = save_throughput_plot(choice, self.config.out / THROUGHPUT_PLOT)
        log.info("max batch (auto): measurements plotted in %s", path)
        return path

    def prepare(self, data: bytes, name: str) -> Prepared:
        """Decode and letterbox one image (thread-safe).

        Raises:
            DecodeError: empty, too large, not an image, truncated or corrupt.
        """
        return self.prepare_step(self.reader.read_bytes(data, name))

    def process(self, items: Sequence[Prepared]) -> list[ItemResult | BaseException]:
        """The batcher's ``process``: detections per item, in order (see the module docstring)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.plan.out, []).append(i)
        out: list[ItemResult | BaseException] = [RuntimeError("not run")] * len(items)
        for indices in groups.values():
            group = [items[i] for i in indices]
            outcomes, seconds = self.infer_step.outcomes(self.infer_step.collate(group))
            per_image_ms = seconds * 1e3 / len(group)
            for i, outcome in zip(indices, outcomes):
                out[i] = outcome if isinstance(outcome, OutOfMemoryAlone) else ItemResult(
                    detections=tuple(outcome), batch=len(group), inference_ms=per_image_ms)
        return out

    def _count_oom(self) -> None:
        if self.on_oom is not None:
            self.on_oom()

    def info(self) -> dict[str, Any]:
        """Model, device and batch settings for /v1/info."""
        return {
            "device": str(self.engine.device), "precision": self.engine.precision, "backend": self.engine.backend,
            "runtime": self.engine.choice.to_dict() if self.engine.choice else None,
            "export": self.engine.export.to_dict() if self.engine.export else None, "imgsz": self.engine.imgsz,
            "classes": {int(k): v for k, v in self.engine.names.items()}, "max_batch": self.batch_size(),
            "max_batch_setting": str(self.config.max_batch),
            "batch_choice": self.batch_choice.to_dict() if self.batch_choice else None,
            "throughput_plot": str(self.throughput_plot) if self.throughput_plot else None,
            "oom_events": [e.to_dict() for e in self.batch_size.events], "streams": self.streams,
            "threads": self.threads, "decoder": self.decoder.name, "warmup_s": round(self.warmup_s, 3),
        }

    def close(self) -> None:
        """Give cached device memory back and restore torch's thread count."""
        try:
            self.engine.release()
        finally:
            if self._saved_threads is not None:
                import torch

                torch.set_num_threads(self._saved_threads)
                self._saved_threads = None


def _sample_jpeg(size: int) -> bytes:
    """A textured JPEG to time the decoders on (the service has no files of its own to sample)."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), (5, 5), 0)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("OpenCV could not encode the decoder sample")
    return encoded.tobytes()
