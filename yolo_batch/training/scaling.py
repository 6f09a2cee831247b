"""What a batch size implies for training: accumulation, effective batch, learning rate.

Mirrors Ultralytics' own arithmetic (``accumulate = max(round(nbs / batch), 1)``, its
``optimizer=auto`` rule) so the record says exactly what the trainer will do.

The learning-rate rules (linear for SGD, square root for Adam-family) are about the size of one optimizer
step as the effective batch grows. Ultralytics *sums* the detection loss over the images of a batch (its loss
returns the mean times the batch size, times the world size under DDP) and accumulation adds batches, so a
step's gradient is the sum over the effective batch. A step of SGD, which follows the gradient's magnitude,
therefore already grows linearly with the effective batch; adaptive optimizers (Adam family, RMSprop)
normalise that magnitude away. So lr0 is multiplied only by what the rule asks for beyond what the summed
loss already does: nothing for SGD under the linear rule, the full factor for Adam-family. ``none`` keeps the
step as it is at the nominal batch (for SGD that divides lr0 by what the sum adds), which is what a growing
batch schedule needs to anneal the gradient noise. MuSGD (Muon mixed with SGD) is counted with SGD: its SGD
part follows the gradient's magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from yolo_batch.training.config import LrScaling

ADAM_FAMILY = frozenset({"adam", "adamw", "adamax", "nadam", "radam"})
SCALE_INVARIANT = ADAM_FAMILY | {"rmsprop"}  # adaptive: a step's size does not follow the gradient's magnitude


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
    lr_factor: float  # what lr0 is multiplied by
    step_factor: float = 1.0  # what the rule asks a step to grow by: lr_factor times what the summed loss does
    lr_optimizer: str = "SGD"  # the optimizer the rule was resolved for (Ultralytics' choice under auto)
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
    """How much the rule asks an optimizer step to grow at ``effective_batch`` against the nominal batch."""
    ratio = effective_batch / nominal_batch
    if rule is LrScaling.LINEAR:
        return ratio
    if rule is LrScaling.SQRT:
        return math.sqrt(ratio)
    return 1.0


def implicit_step_factor(optimizer: str, effective_batch: int, nominal_batch: int) -> float:
    """How much a step already grows with the effective batch in Ultralytics, whose loss is summed over it."""
    return 1.0 if optimizer.lower() in SCALE_INVARIANT else effective_batch / nominal_batch


def lr0_factor(optimizer: str, rule: LrScaling, effective_batch: int, nominal_batch: int) -> float:
    """What lr0 is multiplied by so a step grows as ``rule`` says (``none``: not at all)."""
    wanted = lr_factor(rule, effective_batch, nominal_batch)
    return wanted / implicit_step_factor(optimizer, effective_batch, nominal_batch)


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
    factor = lr0_factor(name, resolved, effective, nominal_batch)
    implicit = implicit_step_factor(name, effective, nominal_batch)
    reasons = [_lr_reason(name, resolved, effective, nominal_batch, factor, implicit)] if effective != nominal_batch \
        else []
    pinned: dict[str, Any] = {}
    if math.isclose(factor, 1.0):
        factor = 1.0
        lr_after = base_lr
        shown = optimizer if auto else name
    else:
        lr_after = base_lr * factor
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
        step_factor=factor * implicit,
        lr_optimizer=name,
        pinned=pinned,
        reasons=tuple(reasons),
    )


def _lr_reason(optimizer: str, rule: LrScaling, effective: int, nominal: int, factor: float, implicit: float) -> str:
    batches = f"effective batch {effective} vs nominal {nominal}"
    summed = (f"; Ultralytics' summed loss already grows {optimizer}'s step x{implicit:.3g}"
              if not math.isclose(implicit, 1.0) else "")
    lr0 = "lr0 unchanged" if math.isclose(factor, 1.0) else f"lr0 x{factor:.3g}"
    return f"{batches}: {lr0} ({rule.value} rule: step x{factor * implicit:.3g}){summed}"
