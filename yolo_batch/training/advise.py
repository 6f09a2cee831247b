"""``yolo-batch advise``: what batch to train with, from the gradient noise scale and the memory limit together.

Memory (AutoBatch, :func:`estimate_batch`) says what fits; the noise scale (:mod:`.noise_scale`) says what pays:
batches well beyond ``B_simple`` give diminishing returns per sample. The recommendation is the smaller of the two
(see :func:`recommend`, which is pure), with lr0 by the one scaling rule (:func:`.scaling.plan_scaling`);
:func:`advise` measures.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from yolo_batch.core.progress import Reporter, tracked
from yolo_batch.errors import InputError
from yolo_batch.training.config import BatchRequest, SizingConfig
from yolo_batch.training.decision import AutoBatchDecision
from yolo_batch.training.noise_scale import NoiseScale, NoiseSettings, estimate_noise_scale
from yolo_batch.training.scaling import plan_scaling
from yolo_batch.training.search import round_batch

MEASURED_SOURCES = frozenset({"autobatch", "cache"})  # decisions whose batch came from measured device memory


@dataclass(frozen=True)
class Advice:
    """The recommendation and what it rests on."""

    noise_scale: NoiseScale
    memory_limit_batch: int | None  # total batch device memory allows; None where it could not be measured
    memory_reason: str
    recommended_batch: int  # total batch per step (what Ultralytics gets as batch)
    accumulate: int
    effective_batch: int
    lr0: float
    lr0_before: float
    lr_rule: str
    optimizer: str
    nominal_batch: int
    device: str
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["noise_scale"] = self.noise_scale.to_dict()
        return out

    def summary(self) -> str:
        """One sentence: the recommendation."""
        return (f"recommended: batch {self.recommended_batch} with accumulation {self.accumulate} (effective "
                f"{self.effective_batch}), {self.optimizer} lr0 {self.lr0:.4g}")

    def rows(self) -> list[tuple[str, str]]:
        ns = self.noise_scale
        low, high = (f"{v:.1f}" if v is not None else "unbounded" for v in ns.ci95)
        simple = f"{ns.b_simple:.1f}" if ns.b_simple is not None else "above what was measured"
        return [
            ("noise scale B_simple", f"{simple} (95 % interval {low} .. {high})"),
            ("measured from", f"{ns.steps} steps, batches {ns.small_batch} and {ns.big_batch}, on {self.device}"),
            ("memory limit", str(self.memory_limit_batch) if self.memory_limit_batch else "not measured"),
            ("recommended batch", str(self.recommended_batch)),
            ("accumulate / effective", f"{self.accumulate} / {self.effective_batch} (nominal {self.nominal_batch})"),
            ("lr0", f"{self.lr0_before:g} -> {self.lr0:g} ({self.optimizer}, {self.lr_rule} rule)"),
            *(("reason", r) for r in self.reasons),
        ]


def recommend(noise: NoiseScale, memory: AutoBatchDecision, sizing: SizingConfig, *, n_train: int,
              nc: int) -> Advice:
    """Combine the noise scale with the memory decision into one batch, accumulation and lr0 (pure).

    The batch is the noise scale's (rounded down by the run's rounding) where memory allows it, else what memory
    allows (on CPU the default batch), never more than the training images. Accumulation stays 1: accumulated
    batches run one after another, so they add no speed, and in McCandlish et al.'s model the images a run needs grow
    as ``1 + B / B_noise``; a larger effective batch beyond what one step holds only spends more images per step.
    """
    world = memory.world_size
    measured = memory.source in MEASURED_SOURCES
    limit = memory.total_batch if measured else None
    memory_reason = (f"memory allows batch {limit} ({memory.source}, {memory.device})" if measured else
                     "memory limit not measured: " + "; ".join(memory.reasons))
    holds = "memory allows" if measured else "the default batch is"
    cap = min(limit if limit is not None else memory.total_batch, round_batch(n_train, sizing.rounding))
    if noise.b_simple is None:
        target, why = cap, (f"the noise scale is above what {noise.steps} steps at batch {noise.big_batch} resolve: "
                            f"batches up to what {holds} ({cap}) still pay per image")
    else:
        wanted = round_batch(max(math.floor(noise.b_simple), 1), sizing.rounding)
        target = min(wanted, cap)
        why = (f"the noise scale says batches beyond about {noise.b_simple:.0f} give diminishing returns per image "
               f"({wanted} after {sizing.rounding.value} rounding)")
    per_step = max(target // world * world, world)
    scale = plan_scaling(batch=per_step // world, world_size=world, nominal_batch=sizing.nominal_batch,
                         optimizer=sizing.optimizer, lr0=sizing.lr0, momentum=sizing.momentum,
                         rule=sizing.lr_scaling, n_train=n_train, epochs=sizing.epochs, nc=nc, accumulate_to=per_step)
    reasons = [memory_reason, why]
    if noise.b_simple is None or noise.b_simple >= cap:
        capped = " (capped at the training images)" if cap < (limit or memory.total_batch) else ""
        reasons.append(f"batch {per_step}: what {holds}{capped}; accumulation 1: accumulated batches run one after "
                       "another and add no speed, and a larger effective batch would spend more images for the same "
                       "progress")
    else:
        reasons.append(f"batch {per_step}: the noise scale's; {holds} {limit or memory.total_batch}, but the images "
                       f"beyond {per_step} per step would buy little; accumulation 1")
    reasons.extend(scale.reasons)
    reasons.append("measured at the model's current weights; it changes as training goes on (McCandlish et al. saw "
                   "it grow as the loss falls; train --log-noise-scale follows it per epoch)")
    return Advice(noise_scale=noise, memory_limit_batch=limit, memory_reason=memory_reason,
                  recommended_batch=per_step, accumulate=scale.accumulate, effective_batch=scale.effective_batch,
                  lr0=scale.lr0_after, lr0_before=scale.lr0_before, lr_rule=scale.lr_rule,
                  optimizer=scale.lr_optimizer, nominal_batch=sizing.nominal_batch, device=memory.device,
                  reasons=tuple(reasons))


def advise(sizing: SizingConfig, noise: NoiseSettings | None = None, *,
           progress: Reporter | None = None) -> Advice:
    """Measure the noise scale of ``sizing.model`` on ``sizing.data`` and the memory limit; recommend a batch.

    The model is loaded once and only read: gradients are taken on a copy of its network.

    Raises:
        InputError: bad model, data, device or settings, a fixed ``--batch``, or too few training images.
    """
    from yolo_batch import ultralytics_adapter
    from yolo_batch.training.autobatch import estimate_batch
    from yolo_batch.training.data import inspect_dataset, resolve_data
    from yolo_batch.ultralytics_adapter.gradients import measure_norms

    noise = noise or NoiseSettings()
    if sizing.batch.fixed is not None:
        raise InputError(f"advise decides the batch: give --batch -1 or a memory fraction, not {sizing.batch.fixed}")
    data = resolve_data(sizing.data)
    info = inspect_dataset(data, progress=progress)
    model = ultralytics_adapter.load_model(sizing.model)
    sizing = dataclasses.replace(sizing, data=data, batch=BatchRequest(fraction=sizing.batch.fraction))
    memory = estimate_batch(sizing, model=model, dataset=info, progress=progress)
    device = "cpu" if memory.device == "cpu" else f"cuda:{memory.device.split(',')[0]}"
    checked = ultralytics_adapter.check_dataset(data)
    with tracked(progress, "noise scale", total=noise.steps, unit="step") as task:
        small_sq, big_sq = measure_norms(model, checked, imgsz=sizing.imgsz, device=device, small=noise.small_batch,
                                         chunks=noise.chunks, steps=noise.steps, workers=noise.workers,
                                         on_step=task.update)
    measured = estimate_noise_scale(small_sq, big_sq, noise.small_batch, noise.big_batch)
    return recommend(measured, memory, sizing, n_train=info.train_images, nc=info.nc)
