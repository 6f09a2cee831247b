"""Real training steps at a given batch, measuring peak device memory (the GPU side of AutoBatch).

A probe step is what the trainer does, not a ``sum().backward()`` stand-in: forward, Ultralytics'
detection loss on worst-case targets, backward and optimizer step under the run's AMP setting,
with an EMA copy of the model resident as in training; then a validation forward and loss at
the validation batch (twice the training batch in Ultralytics), with the training state still held.
"""

from __future__ import annotations

import copy
import gc
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from yolo_batch.core.oom import is_oom_error
from yolo_batch.training.decision import ProbeSample

log = logging.getLogger(__name__)

TRAIN_STEPS = 2  # the optimizer allocates its state on the first step; the second shows the steady peak


@dataclass(frozen=True)
class ProbeSetup:
    imgsz: int
    amp: bool
    targets_per_image: int
    nc: int
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


class TrainingProbe:
    """Runs probe steps on one device. ``measure(batch)`` returns a :class:`ProbeSample`.

    Peak memory is read from torch's caching allocator (``max_memory_reserved``), which is what
    the device actually gives the process; on CPU the steps run but peaks are ``None``.
    """

    def __init__(self, model: torch.nn.Module, setup: ProbeSetup, device: torch.device) -> None:
        self.setup = setup
        self.device = device
        self.model: torch.nn.Module = model.to(device).train()
        self.ema: Any = copy.deepcopy(self.model).eval()  # a DetectionModel; the trainer keeps an EMA copy resident
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.optimizer = _optimizer(self.model, setup.optimizer)
        self.scaler = torch.amp.GradScaler(device.type, enabled=setup.amp and device.type == "cuda")

    def val_batch_for(self, batch: int) -> int:
        val = 2 * batch
        return min(val, self.setup.val_images) if self.setup.val_images else val

    def measure(self, batch: int) -> ProbeSample:
        """Train and validate at ``batch``; OOM is reported in the sample, other errors propagate."""
        start = time.perf_counter()
        val_batch = self.val_batch_for(batch)
        train_peak = val_peak = None
        try:
            self._reset_peak()
            self.train_steps(batch)
            train_peak = self._peak()
            self._reset_peak()
            self.val_step(val_batch)
            val_peak = self._peak()
            oom = False
        except (RuntimeError, MemoryError) as exc:
            if not is_oom_error(exc):
                raise
            log.info("probe at batch %d ran out of memory", batch)
            oom = True
            # An OOM between backward and update leaves the scaler mid-step; start it afresh.
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self._autocast())
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self._release()
        return ProbeSample(batch=batch, train_peak_bytes=train_peak, val_batch=val_batch,
                           val_peak_bytes=val_peak, oom=oom, seconds=time.perf_counter() - start)

    def train_steps(self, batch: int, steps: int = TRAIN_STEPS) -> float:
        """Forward, real loss, backward and optimizer step, ``steps`` times; returns the last loss."""
        data = synthetic_batch(batch, self.setup, self.device)
        loss_value = float("nan")
        self.model.train()
        for _ in range(steps):
            with torch.autocast(device_type=self.device.type, enabled=self._autocast()):
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
        with torch.inference_mode(), torch.autocast(device_type=self.device.type, enabled=self._autocast()):
            preds = self.ema(data["img"])
            self.ema.loss(data, preds)

    def close(self) -> None:
        """Free the probe's model, EMA and optimizer state so training starts from a clean device."""
        self.model = self.ema = self.optimizer = None  # type: ignore[assignment]
        self._release()

    def _autocast(self) -> bool:
        return self.setup.amp and self.device.type == "cuda"

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_reserved(self.device))

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


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_for(index: int) -> torch.device:
    return torch.device("cuda", index)

