"""What a batch size implies for training: accumulation, effective batch, learning rate.

Mirrors Ultralytics' own arithmetic (``accumulate = max(round(nbs / batch), 1)``, its
``optimizer=auto`` rule) so the record says exactly what the trainer will do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from yolo_batch.training.config import LrScaling

ADAM_FAMILY = frozenset({"adam", "adamw", "adamax", "nadam", "radam"})
SGD_FAMILY = frozenset({"sgd", "musgd", "rmsprop"})


@dataclass(frozen=True)
class TrainingScale:
    """Accumulation and learning rate for a chosen batch."""

    total_batch: int
    accumulate: int
    effective_batch: int
    optimizer: str
    lr0_before: float
    lr0_after: float
    lr_rule: str
    lr_factor: float
    pinned: dict[str, Any] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()


def accumulate_for(total_batch: int, nominal_batch: int, n_train: int | None = None, epochs: int = 1,
                   world_size: int = 1) -> int:
    """Ultralytics' accumulation: round(nominal / batch), at least 1, at most the run's iterations."""
    accumulate = max(round(nominal_batch / total_batch), 1)
    if n_train:
        per_rank = max(total_batch // world_size, 1)
        accumulate = min(accumulate, math.ceil(n_train / per_rank) * epochs)
    return accumulate


def auto_optimizer(n_train: int, total_batch: int, nominal_batch: int, epochs: int,
                   nc: int) -> tuple[str, float, float]:
    """(name, lr0, momentum) that Ultralytics' ``optimizer=auto`` picks for this run."""
    iterations = math.ceil(n_train / max(total_batch, nominal_batch)) * epochs
    if iterations > 10000:
        return "MuSGD", 0.01, 0.9
    return "AdamW", round(0.002 * 5 / (4 + nc), 6), 0.9


def lr_rule_for(optimizer: str, requested: LrScaling) -> LrScaling:
    """Resolve ``auto``: linear for SGD-family optimizers, square root for Adam-family."""
    if requested is not LrScaling.AUTO:
        return requested
    return LrScaling.SQRT if optimizer.lower() in ADAM_FAMILY else LrScaling.LINEAR


def lr_factor(rule: LrScaling, effective_batch: int, nominal_batch: int) -> float:
    ratio = effective_batch / nominal_batch
    if rule is LrScaling.LINEAR:
        return ratio
    if rule is LrScaling.SQRT:
        return math.sqrt(ratio)
    return 1.0


def plan_scaling(
    *,
    batch: int,
    world_size: int,
    nominal_batch: int,
    optimizer: str,
    lr0: float,
    momentum: float,
    rule: LrScaling,
    n_train: int | None,
    epochs: int,
    nc: int,
    accumulate_to: int | None = None,
) -> TrainingScale:
    """Derive accumulation, effective batch and lr0 for a per-device ``batch``.

    Gradients accumulate to ``accumulate_to`` (default: the nominal batch); lr0 is scaled relative to the
    nominal batch either way. When lr0 must change and the optimizer is ``auto``, the optimizer Ultralytics
    would pick is pinned (with its lr0 and momentum), because ``optimizer=auto`` ignores lr0.
    """
    total = batch * world_size
    accumulate = accumulate_for(total, accumulate_to or nominal_batch, n_train, epochs, world_size)
    effective = total * accumulate
    name, base_lr, base_momentum = optimizer, lr0, momentum
    auto = optimizer.lower() == "auto"
    if auto:
        name, base_lr, base_momentum = auto_optimizer(n_train or total, total, nominal_batch, epochs, nc)
    resolved = lr_rule_for(name, rule)
    factor = lr_factor(resolved, effective, nominal_batch)
    reasons: list[str] = []
    pinned: dict[str, Any] = {}
    if math.isclose(factor, 1.0):
        factor = 1.0
        if resolved is not LrScaling.NONE and effective != nominal_batch:
            reasons.append(f"effective batch {effective} vs nominal {nominal_batch}: lr0 unchanged")
        lr_after = base_lr
        shown = optimizer if auto else name
    else:
        lr_after = base_lr * factor
        reasons.append(
            f"effective batch {effective} != nominal {nominal_batch}: lr0 x{factor:.3g} ({resolved.value} rule)"
        )
        pinned = {"optimizer": name, "lr0": lr_after}
        if auto:
            pinned.update(momentum=base_momentum, warmup_bias_lr=0.0)
            reasons.append(f"optimizer=auto ignores lr0: pinned {name} (Ultralytics' own choice for this run)")
        shown = name
    return TrainingScale(
        total_batch=total,
        accumulate=accumulate,
        effective_batch=effective,
        optimizer=shown,
        lr0_before=base_lr,
        lr0_after=lr_after,
        lr_rule=resolved.value,
        lr_factor=factor,
        pinned=pinned,
        reasons=tuple(reasons),
    )
