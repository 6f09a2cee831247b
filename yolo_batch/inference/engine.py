"""The model side of inference: letterboxed images in, detections in original pixels out.

One :class:`Engine` serves the batch runner and, later, the HTTP service. It does what Ultralytics'
``DetectionPredictor`` does (same letterbox, same normalisation, same fused network, same NMS, same box
scaling) but on batches of one shape, from pinned host memory, with NMS on the device.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from yolo_batch import ultralytics_adapter
from yolo_batch.inference.letterbox import (
    Letterbox,
    apply_letterbox,
    boxes_to_source,
    plan_letterbox,
)

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
    """A loaded detector on one device.

    Args:
        network: from :func:`yolo_batch.ultralytics_adapter.inference_network`.
        imgsz: the long side images are letterboxed to.
        nms: thresholds and filters applied to every batch.
    """

    def __init__(self, network: ultralytics_adapter.InferenceNetwork, imgsz: int, nms: NmsSettings) -> None:
        self.network = network
        self.imgsz = imgsz
        self.nms = nms
        self._local = threading.local()
        self._owner: threading.Thread | None = None  # the thread running network.module itself
        self._template: Any = None  # a copy never run, so never caught mid-update: other threads copy it
        self._copy_lock = threading.Lock()

    @classmethod
    def load(cls, model: str, device: Any, half: bool, imgsz: int, nms: NmsSettings,
             channels_last: bool | None = None) -> Engine:
        """Load ``model`` (yaml name or local .pt) through the adapter (never downloading).

        Raises:
            InputError: unknown or unreadable model.
        """
        yolo = ultralytics_adapter.load_model(model)
        return cls(ultralytics_adapter.inference_network(yolo, device, half, channels_last), imgsz, nms)

    @property
    def stride(self) -> int:
        return self.network.stride

    @property
    def names(self) -> Mapping[int, str]:
        return self.network.names

    @property
    def device(self) -> Any:
        return self.network.device

    @property
    def precision(self) -> str:
        return "fp16" if self.network.half else "fp32"

    def plan(self, height: int, width: int) -> Letterbox:
        return plan_letterbox(height, width, self.imgsz, self.stride, auto=True)

    def prepare(self, pixels: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """Letterbox one BGR uint8 image (runs in the decode threads)."""
        plan = self.plan(pixels.shape[0], pixels.shape[1])
        return apply_letterbox(pixels, plan), plan

    def collate(self, images: Sequence[np.ndarray]) -> Any:
        """Stack same-shape letterboxed images into one uint8 NHWC host tensor, pinned when bound for CUDA."""
        import torch

        if not images:
            raise ValueError("cannot collate an empty batch")
        shape = images[0].shape
        if any(im.shape != shape for im in images):
            raise ValueError("a batch must hold one shape: bucket images by letterboxed shape first")
        pinned = self.device.type == "cuda"
        host = torch.empty((len(images), *shape), dtype=torch.uint8, pin_memory=pinned)
        view = host.numpy()
        for i, image in enumerate(images):
            view[i] = image
        return host

    def run(self, host: Any, plans: Sequence[Letterbox]) -> list[list[Detection]]:
        """Forward + NMS on the device, boxes scaled back to each image's pixels."""
        raw, shape = self.forward(host)
        return self.postprocess(raw, plans, shape)

    def forward(self, host: Any) -> tuple[Any, tuple[int, int]]:
        """Copy (non-blocking), normalise on the device, run the network. Returns raw output and canvas (h, w)."""
        import torch

        net = self.network
        with torch.inference_mode():
            x = host.to(net.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).flip(1)  # NHWC BGR -> NCHW RGB, on the device
            x = (x.half() if net.half else x.float()).div_(255)
            x = x.contiguous(memory_format=torch.channels_last if net.channels_last else torch.contiguous_format)
            return self.thread_module()(x), (int(x.shape[2]), int(x.shape[3]))

    def thread_module(self) -> Any:
        """The network for the calling thread.

        Ultralytics' Detect head caches the anchors of the last input shape in module attributes
        (``Detect.shape``, ``anchors``, ``strides``), so two threads running one module on different shapes
        can decode boxes with each other's anchors. One thread runs the loaded module; every other thread
        alive at the same time gets its own copy, made from a template copied before the first forward pass
        (weights are small next to a batch's activations).
        """
        module = getattr(self._local, "module", None)
        if module is None:
            with self._copy_lock:
                if self._template is None:
                    self._template = copy.deepcopy(self.network.module)
                if self._owner is None or not self._owner.is_alive():
                    self._owner = threading.current_thread()
                    module = self.network.module
                else:
                    module = copy.deepcopy(self._template)
            self._local.module = module
        return module

    def postprocess(self, raw: Any, plans: Sequence[Letterbox], shape: tuple[int, int]) -> list[list[Detection]]:
        import torch

        nms = self.nms
        with torch.inference_mode():
            kept = ultralytics_adapter.non_max_suppression(raw, nms.conf, nms.iou, nms.classes, nms.max_det,
                                                           self.network.end2end)
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
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
