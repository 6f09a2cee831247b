"""The model side of inference: letterboxed images in, detections in original pixels out.

One :class:`Engine` serves the batch runner and the HTTP service. It does what Ultralytics'
``DetectionPredictor`` does (same letterbox, same normalisation, same network, same NMS, same box scaling) but
on batches of one shape, from pinned host memory, with NMS on the device. The network itself runs on a runtime
(:mod:`yolo_batch.inference.runtimes`: PyTorch, OpenVINO, ONNX Runtime, TensorRT) behind one small hook.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from yolo_batch import ultralytics_adapter
from yolo_batch.inference.letterbox import (
    Letterbox,
    Letterboxer,
    boxes_to_source,
    plan_letterbox,
)

if TYPE_CHECKING:
    from yolo_batch.inference.runtimes.base import ModelInfo, Runtime
    from yolo_batch.inference.runtimes.choice import RuntimeChoice
    from yolo_batch.inference.runtimes.loader import ExportRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detection:
    """One box in original image pixels."""

    class_id: int
    name: str
    confidence: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2

    def to_dict(self) -> dict[str, Any]:
        return {"class_id": self.class_id, "name": self.name, "confidence": round(self.confidence, 6),
                "box": [round(v, 2) for v in self.box]}


@dataclass(frozen=True)
class NmsSettings:
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    classes: tuple[int, ...] | None = None


class Engine:
    """A loaded detector on one device: the shared steps around one runtime.

    Letterbox, collate, NMS (Ultralytics' own, through the adapter) and box scaling are the same for every
    runtime; the :class:`~yolo_batch.inference.runtimes.base.Runtime` only turns a uint8 batch into the raw
    network output.

    Args:
        runtime: the runtime's hook object.
        info: class names, stride and head type.
        imgsz: the long side images are letterboxed to.
        nms: thresholds and filters applied to every batch.
        choice: which runtime and precision, and why (None for an engine built directly).
        export: where an exported runtime's model came from.
    """

    def __init__(self, runtime: Runtime, info: ModelInfo, imgsz: int, nms: NmsSettings,
                 choice: RuntimeChoice | None = None, export: ExportRecord | None = None) -> None:
        self.runtime = runtime
        self.info = info
        self.imgsz = imgsz
        self.nms = nms
        self.choice = choice
        self.export = export

    @classmethod
    def load(cls, model: str, device: Any, half: bool, imgsz: int, nms: NmsSettings,
             channels_last: bool | None = None) -> Engine:
        """PyTorch, fp16 or fp32: load ``model`` (yaml name or local .pt) through the adapter (never downloading).

        Raises:
            InputError: unknown or unreadable model.
        """
        from yolo_batch.inference.runtimes.torch import TorchRuntime

        precision = "fp16" if half and device.type != "cpu" else "fp32"
        runtime, info = TorchRuntime.load(model, device, precision, channels_last)
        return cls(runtime, info, imgsz, nms)

    @classmethod
    def open(cls, model: str, device: Any, choice: RuntimeChoice, imgsz: int, nms: NmsSettings, max_batch: int,
             streams: int = 1, threads: int = 1, use_cache: bool = True,
             on_export: Callable[[str], None] | None = None, cache: Path | None = None) -> Engine:
        """``model`` on the runtime ``choice`` names (exported and cached first where it needs an export).

        Raises:
            InputError: unknown model, a missing package, a failed export.
        """
        from yolo_batch.inference.runtimes.loader import open_runtime

        opened = open_runtime(model, device, choice, imgsz, max_batch, streams, threads, use_cache, on_export,
                              cache)
        return cls(opened.runtime, opened.info, imgsz, nms, choice, opened.export)

    @property
    def stride(self) -> int:
        return self.info.stride

    @property
    def names(self) -> Mapping[int, str]:
        return self.info.names

    @property
    def device(self) -> Any:
        return self.runtime.device

    @property
    def precision(self) -> str:
        return self.runtime.precision

    @property
    def backend(self) -> str:
        return self.runtime.name

    def plan(self, height: int, width: int) -> Letterbox:
        return plan_letterbox(height, width, self.imgsz, self.stride, auto=True)

    def prepare(self, pixels: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """Letterbox one BGR uint8 image (runs in the decode threads)."""
        return Letterboxer(self.imgsz, self.stride).prepare(pixels)

    def collate(self, images: Sequence[np.ndarray]) -> Any:
        """Stack same-shape letterboxed images into one uint8 NHWC host tensor, pinned when bound for CUDA."""
        import torch

        if not images:
            raise ValueError("cannot collate an empty batch")
        shape = images[0].shape
        if any(im.shape != shape for im in images):
            raise ValueError("a batch must hold one shape: bucket images by letterboxed shape first")
        pinned = self.runtime.pin_memory
        host = torch.empty((len(images), *shape), dtype=torch.uint8, pin_memory=pinned)
        view = host.numpy()
        for i, image in enumerate(images):
            view[i] = image
        return host

    def run(self, host: Any, plans: Sequence[Letterbox]) -> list[list[Detection]]:
        """Forward pass on the runtime, then NMS, boxes scaled back to each image's pixels."""
        raw = self.runtime(host)
        return self.postprocess(raw, plans, (int(host.shape[1]), int(host.shape[2])))

    def postprocess(self, raw: Any, plans: Sequence[Letterbox], shape: tuple[int, int]) -> list[list[Detection]]:
        import torch

        nms = self.nms
        with torch.inference_mode():
            kept = ultralytics_adapter.non_max_suppression(raw, nms.conf, nms.iou, nms.classes, nms.max_det,
                                                           self.info.end2end)
            counts = [int(k.shape[0]) for k in kept]
            rows = torch.cat([k[:, :6].float() for k in kept]).cpu().numpy() if sum(counts) else np.zeros((0, 6))
        if len(kept) != len(plans):
            raise RuntimeError(f"NMS returned {len(kept)} results for a batch of {len(plans)}")
        out: list[list[Detection]] = []
        offset = 0
        for count, plan in zip(counts, plans):
            if plan.out != shape:
                raise ValueError(f"image planned for {plan.out} ran in a {shape} batch")
            block = rows[offset:offset + count]
            offset += count
            boxes = boxes_to_source(block[:, :4], plan)
            out.append([
                Detection(class_id=int(c), name=self.names.get(int(c), str(int(c))), confidence=float(s),
                          box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])))
                for b, s, c in zip(boxes, block[:, 4], block[:, 5])
            ])
        return out

    def predict(self, images: Sequence[np.ndarray], max_batch: int = 16) -> list[list[Detection]]:
        """Detections for decoded BGR uint8 images of any shapes, in input order (the service entry point).

        Images are grouped by letterboxed shape and run ``max_batch`` at a time.
        """
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        prepared = [self.prepare(im) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, plan) in enumerate(prepared):
            groups.setdefault(plan.out, []).append(i)
        results: list[list[Detection]] = [[] for _ in images]
        for indices in groups.values():
            for start in range(0, len(indices), max_batch):
                chunk = indices[start:start + max_batch]
                found = self.run(self.collate([prepared[i][0] for i in chunk]), [prepared[i][1] for i in chunk])
                for i, detections in zip(chunk, found):
                    results[i] = detections
        return results

    def warmup(self, shape: tuple[int, int] | None = None, batch: int = 1) -> None:
        """One forward pass so that lazy initialisation (cuDNN plans, oneDNN kernels) is not timed."""
        h, w = shape or (self.imgsz, self.imgsz)
        self.run(self.collate([np.full((h, w, 3), 114, np.uint8)] * batch), [plan_letterbox(h, w, max(h, w),
                                                                                           self.stride)] * batch)

    def release(self) -> None:
        """Give cached device memory back (after an out-of-memory error, and at the end of a run)."""
        self.runtime.release()
