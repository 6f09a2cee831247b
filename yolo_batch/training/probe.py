"""Real training steps at a given batch, measuring peak device memory (the GPU side of AutoBatch).

A probe step is what the trainer does, not a ``sum().backward()`` stand-in: forward, Ultralytics'
detection loss on worst-case targets, backward and optimizer step under the trainer's own settings
(:mod:`yolo_batch.training.settings`: precision after Ultralytics' AMP check, channels_last, frozen layers,
deterministic algorithms with the trainer's ``CUBLAS_WORKSPACE_CONFIG``, the largest multi-scale size), with an
EMA copy of the model resident as in training; then a validation forward and loss at the validation batch (twice
the training batch in Ultralytics), with the training state still held.

Peaks are device-level: the caching allocator's peak plus what this process gained outside it (cuBLAS/cuDNN
handles and workspaces, lazily loaded kernels), measured against the device's own figures.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from yolo_batch import ultralytics_adapter
from yolo_batch.core.cuda import mem_get_info
from yolo_batch.core.oom import is_oom_error
from yolo_batch.training.budget import outside_allocator_bytes
from yolo_batch.training.decision import ProbeSample

log = logging.getLogger(__name__)

TRAIN_STEPS = 2  # the optimizer allocates its state on the first step; the second shows the steady peak
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ProbeSetup:
    """What the probe trains with: the resolved trainer settings plus the data's worst case."""

    imgsz: int
    targets_per_image: int
    nc: int
    precision: str = "fp32"  # "fp16" | "bf16" | "fp32"
    amp_check: bool = False  # fp16: Ultralytics' AMP check decides on the GPU whether fp16 stays on
    channels_last: bool = False
    deterministic: bool = False
    seed: int = 0
    freeze: tuple[str, ...] = ()  # parameter name fragments frozen as the trainer freezes them
    optimizer: str = "SGD"
    val_images: int | None = None  # caps the validation batch at what the val split can fill


def synthetic_batch(batch: int, setup: ProbeSetup, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch in the trainer's format with ``targets_per_image`` boxes in every image."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    n = batch * setup.targets_per_image
    centres = torch.rand(n, 2, generator=generator) * 0.8 + 0.1
    sizes = torch.rand(n, 2, generator=generator) * 0.15 + 0.02
    return {
        "img": torch.rand(batch, 3, setup.imgsz, setup.imgsz, generator=generator).to(device),
        "batch_idx": torch.arange(batch).repeat_interleave(setup.targets_per_image).float().to(device),
        "cls": torch.randint(0, setup.nc, (n, 1), generator=generator).float().to(device),
        "bboxes": torch.cat([centres, sizes], dim=1).to(device),
    }


def _optimizer(model: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name.lower() in {"adam", "adamw", "adamax", "nadam", "radam", "auto"}:
        # Adam-family keeps two state tensors per weight; 'auto' may pick AdamW, so size for it.
        return torch.optim.AdamW(params, lr=1e-6)
    return torch.optim.SGD(params, lr=1e-6, momentum=0.9, nesterov=True)


class DeviceMeter:
    """This process's device-level memory since the meter was made: the allocator's peak plus what it gained
    outside the allocator. ``read_used`` returns the process's device use now (NVML's per-process figure where it
    is visible, else total minus ``mem_get_info`` free)."""

    def __init__(self, device: torch.device, read_used: Callable[[], int] | None = None) -> None:
        self.device = device
        self.read_used = read_used or (lambda: _device_used(device))
        torch.cuda.synchronize(device)
        self.base_used, self.base_reserved = self.read_used(), int(torch.cuda.memory_reserved(device))

    def outside(self) -> int:
        """Bytes gained outside the caching allocator since the meter was made."""
        torch.cuda.synchronize(self.device)
        return outside_allocator_bytes(self.base_used, self.read_used(), self.base_reserved,
                                       int(torch.cuda.memory_reserved(self.device)))


def _device_used(device: torch.device) -> int:
    free, total = mem_get_info(device.index if device.index is not None else torch.cuda.current_device())
    return total - free


class TrainingProbe:
    """Runs probe steps on one device. ``measure(batch)`` returns a :class:`ProbeSample`.

    The trainer's determinism switch is applied from construction to :meth:`close` (before any step, so cuBLAS
    starts with the trainer's workspace setting). ``precision`` is what the steps ran with, after the AMP check.
    On CPU the steps run but peaks are ``None``.
    """

    def __init__(self, model: torch.nn.Module, setup: ProbeSetup, device: torch.device,
                 read_used: Callable[[], int] | None = None) -> None:
        self.setup = setup
        self.device = device
        self._scope = contextlib.ExitStack()
        self._scope.enter_context(ultralytics_adapter.determinism(setup.deterministic, setup.seed))
        try:
            self.meter = DeviceMeter(device, read_used) if device.type == "cuda" else None
            self.model: torch.nn.Module = model.to(device).train()
            if setup.channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
            for name, parameter in self.model.named_parameters():
                if any(fragment in name for fragment in setup.freeze):
                    parameter.requires_grad_(False)
            self.precision = self._precision_after_check()
            self.ema: Any = copy.deepcopy(self.model).eval()  # a DetectionModel; the trainer keeps an EMA copy resident
            for p in self.ema.parameters():
                p.requires_grad_(False)
            self.optimizer = _optimizer(self.model, setup.optimizer)
            self.scaler = self._new_scaler()
        except BaseException:
            self._scope.close()
            raise

    def _precision_after_check(self) -> str:
        if self.setup.precision == "fp16" and self.setup.amp_check and not ultralytics_adapter.amp_check(self.model):
            log.warning("AMP check failed on %s: the trainer will train in fp32, and so does the probe", self.device)
            return "fp32"
        return self.setup.precision

    def _new_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16" and self.device.type == "cuda")

    def val_batch_for(self, batch: int) -> int:
        val = 2 * batch
        return min(val, self.setup.val_images) if self.setup.val_images else val

    def measure(self, batch: int) -> ProbeSample:
        """Train and validate at ``batch``; OOM is reported in the sample, other errors propagate."""
        start = time.perf_counter()
        val_batch = self.val_batch_for(batch)
        train_peak = val_peak = outside = None
        oom = False
        try:
            self._reset_peak()
            self.train_steps(batch)
            train_peak, outside = self._peak(), self._outside()
            self._reset_peak()
            self.val_step(val_batch)
            val_peak = self._peak()
            if outside is not None:  # what sits outside the allocator stays: the later reading is the larger
                outside = max(outside, self._outside() or 0)
        except (RuntimeError, MemoryError) as exc:
            if not is_oom_error(exc):
                raise
            log.info("probe at batch %d ran out of memory", batch)
            oom = True
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        if oom:  # outside the handler: its traceback held the failed step's tensors
            self.scaler = self._new_scaler()  # an OOM between backward and update leaves the scaler mid-step
        self._release()
        return ProbeSample(batch=batch, train_peak_bytes=train_peak, val_batch=val_batch,
                           val_peak_bytes=val_peak, oom=oom, seconds=time.perf_counter() - start,
                           outside_bytes=outside)

    def train_steps(self, batch: int, steps: int = TRAIN_STEPS) -> float:
        """Forward, real loss, backward and optimizer step, ``steps`` times; returns the last loss."""
        data = synthetic_batch(batch, self.setup, self.device)
        loss_value = float("nan")
        self.model.train()
        for _ in range(steps):
            with self._autocast():
                loss, _ = self.model(data)
                loss = loss.sum()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
            del loss
        return loss_value

    def val_step(self, batch: int) -> None:
        """A validation forward and loss on the EMA copy, as training-time validation does."""
        data = synthetic_batch(batch, self.setup, self.device, seed=1)
        with torch.inference_mode(), self._autocast():
            preds = self.ema(data["img"])
            self.ema.loss(data, preds)

    def close(self) -> None:
        """Free the probe's model, EMA and optimizer state so training starts from a clean device; undo the
        determinism switch (the trainer applies its own)."""
        self.model = self.ema = self.optimizer = None  # type: ignore[assignment]
        try:
            self._release()
        finally:
            self._scope.close()

    def _autocast(self) -> torch.autocast:
        dtype = _AUTOCAST.get(self.precision)
        enabled = dtype is not None and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=enabled)

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_reserved(self.device))

    def _outside(self) -> int | None:
        return self.meter.outside() if self.meter is not None else None

    def _release(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def cuda_context_bytes(device: torch.device) -> int:
    """Initialise the CUDA context on ``device`` and return what torch itself has reserved there."""
    torch.cuda.init()
    torch.zeros(1, device=device)
    torch.cuda.empty_cache()
    return int(torch.cuda.memory_reserved(device))


def device_for(index: int) -> torch.device:
    return torch.device("cuda", index)

