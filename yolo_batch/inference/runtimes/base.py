"""The hook every runtime implements: load once, then one batch tensor in, the raw network output out.

Everything around a runtime is shared (:class:`~yolo_batch.inference.engine.Engine`: letterbox, collate, NMS,
box scaling; the pipeline, shape buckets, writers, resume, OOM split, ``--batch auto``). A runtime sees a batch
as the engine collates it: one uint8 tensor of shape (N, H, W, 3), BGR, letterboxed to a multiple of the stride,
on the host (pinned when bound for a GPU). It returns what Ultralytics' NMS takes: a tensor (N, 4 + classes,
anchors) of boxes and class scores, or (N, max_det, 6) rows for NMS-free models.

Runtimes are called from several inference streams at once: each is thread-safe (each thread gets its own
request / execution context / module copy), and an output stays valid until the same thread's next call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ModelInfo:
    """What the shared steps need to know of a model besides its runtime."""

    names: Mapping[int, str]
    stride: int
    end2end: bool  # NMS-free head: outputs are already (x1, y1, x2, y2, score, class) rows


class Runtime(Protocol):
    """A loaded model on one device (see the module docstring)."""

    name: str  # torch, openvino, onnxruntime, tensorrt
    precision: str  # fp32, fp16, bf16
    device: Any  # the torch.device its outputs are on (NMS runs there)
    pin_memory: bool  # whether host batches should be pinned (bound for a GPU)

    def __call__(self, host: Any) -> Any:
        """Raw network output for one uint8 NHWC BGR batch."""
        ...

    def release(self) -> None:
        """Give cached device memory back (after an out-of-memory error, and at the end of a run)."""
        ...


def normalised(host: Any, device: Any, dtype: Any, channels_last: bool = False) -> Any:
    """uint8 NHWC BGR on the host -> float NCHW RGB in [0, 1] on ``device`` (copied non-blocking, converted there).

    Ultralytics' predictor does the same (BGR -> RGB, HWC -> CHW, / 255), on the device.
    """
    import torch

    x = host.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).flip(1)  # NHWC BGR -> NCHW RGB, on the device
    x = x.to(dtype).div_(255)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def first_output(raw: Any) -> Any:
    """The detection tensor of a network's output (Ultralytics' modules return (y, features) in eval mode)."""
    while isinstance(raw, (list, tuple)):
        raw = raw[0]
    return raw
