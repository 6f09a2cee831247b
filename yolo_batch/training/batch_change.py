"""A batch change during training, planned from plain numbers: after an out-of-memory error, or at a schedule phase.

Both kinds go through one plan (:class:`BatchChange`, from one :class:`BatchState` to the next) that the Ultralytics
adapter applies to the live trainer (``ultralytics_adapter/trainer_control.py``) and records as a
:class:`BatchEvent` in ``autobatch.json``.

* **Out of memory in training** (:func:`plan_oom`): the per-device batch steps down and accumulation rises so that
  the effective batch (per-device batch x devices x accumulation), and with it the learning rate and weight decay,
  stay exactly what they were. The next batch is one rounding step down (the next power of two for ``pow2``; the
  next multiple of 8, then 4, 2, 1 for ``mult8``; one less for ``none``), or, where that does not divide the
  effective batch per device, the largest size below it that does. At batch 1 there is nothing smaller
  (:class:`NothingSmaller`).
* **Out of memory in validation** (:func:`plan_val_oom`): only the validation batch changes, halved onto the grid.
* **A schedule phase** (:func:`plan_phase`): the effective batch becomes the phase's; the per-device batch is the
  phase's share of it unless an earlier OOM showed that it does not fit, in which case accumulation makes up the
  difference; lr0 follows the scaling rule relative to the nominal batch (warmup is the trainer's, kept).

Every change re-checks the BatchNorm policy (:func:`yolo_batch.training.batchnorm.choose_bn_policy`) for the new
per-device batch. Switching between ``train`` and ``freeze`` applies at the next epoch; SyncBatchNorm is set up
before training starts, so a change into or out of ``sync`` is not made mid-run (the reason says so).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from yolo_batch.errors import YoloBatchError
from yolo_batch.training.batchnorm import choose_bn_policy
from yolo_batch.training.config import BnPolicy, LrScaling, Rounding
from yolo_batch.training.scaling import lr0_factor


class NothingSmaller(Exception):
    """Out of memory at batch 1: there is no smaller batch to step down to."""


class TrainingOutOfMemory(YoloBatchError):
    """Training stopped on an out-of-memory error it could not (or was told not to) recover from."""


@dataclass(frozen=True)
class BatchState:
    """The batch a run trains at right now."""

    batch: int  # per device
    world_size: int
    accumulate: int
    val_batch: int  # per device
    lr0: float  # the lr0 in effect (scaled)
    bn_policy: str  # the policy applied: "train", "freeze" or "sync"
    max_batch: int | None = None  # per device: a rounding step below the last batch that ran out of memory

    def __post_init__(self) -> None:
        if min(self.batch, self.world_size, self.accumulate, self.val_batch) < 1:
            raise ValueError(f"batch, world size, accumulation and validation batch must be >= 1: {self}")

    @property
    def total_batch(self) -> int:
        return self.batch * self.world_size

    @property
    def effective_batch(self) -> int:
        return self.batch * self.world_size * self.accumulate


@dataclass(frozen=True)
class ScalingRules:
    """What the run's decision fixed that every change follows."""

    nominal_batch: int
    lr_rule: str  # "linear", "sqrt" or "none" (resolved, never "auto")
    base_lr0: float  # lr0 before scaling (for the nominal batch)
    optimizer: str = "SGD"  # the optimizer the rule applies to (a summed loss already scales SGD's step)
    rounding: Rounding = Rounding.POW2
    bn_requested: BnPolicy = BnPolicy.AUTO
    from_weights: bool = False

    def lr0_for(self, effective_batch: int) -> float:
        return self.base_lr0 * lr0_factor(self.optimizer, LrScaling(self.lr_rule), effective_batch, self.nominal_batch)


@dataclass(frozen=True)
class BatchChange:
    """A planned change: the state before and after, and why."""

    kind: str  # "oom" | "schedule"
    phase: str  # "train" | "val"
    old: BatchState
    new: BatchState
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchEvent:
    """One change as ``autobatch.json`` records it (``events``) and the console shows it (:meth:`line`)."""

    kind: str  # "oom" | "schedule"
    phase: str  # "train" | "val": whose loader changed
    epoch: int  # 0-based, as Ultralytics' trainer.epoch
    step: int | None  # the batch index in the epoch (or in the validation pass) that failed; None at a boundary
    old_batch: int  # per device, of the phase's loader
    new_batch: int
    accumulate: int  # training accumulation after the change
    effective_batch: int  # after the change
    lr0: float  # after the change
    world_size: int = 1
    bn_policy: str | None = None
    free_bytes: int | None = None  # NVML free memory at that moment (least over the devices); None on CPU
    ranks: tuple[int, ...] = ()  # the processes that ran out of memory
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def line(self) -> str:
        """One console line."""
        where = f"epoch {self.epoch}" + (f", step {self.step}" if self.step is not None else "")
        free = f"; {self.free_bytes / 2**30:.2f} GiB free" if self.free_bytes is not None else ""
        what = "validation batch" if self.phase == "val" else "batch"
        head = "out of memory in " + ("validation" if self.phase == "val" else "training") if self.kind == "oom" \
            else "batch schedule"
        return (f"yolo-batch: {head} at {where}: {what} {self.old_batch} -> {self.new_batch} per device, "
                f"accumulate {self.accumulate}, effective batch {self.effective_batch}, lr0 {self.lr0:.6g}{free}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchEvent:
        values = {**data, "ranks": tuple(data.get("ranks", ())), "reasons": tuple(data.get("reasons", ()))}
        return cls(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cls)}})


def on_grid(batch: int, rounding: Rounding) -> bool:
    """Whether ``batch`` is a size the rounding rule produces (below 8, ``mult8`` keeps powers of two)."""
    if rounding is Rounding.NONE:
        return True
    if rounding is Rounding.MULT8 and batch >= 8:
        return batch % 8 == 0
    return batch & (batch - 1) == 0


def step_below(batch: int, rounding: Rounding) -> int:
    """The next size below ``batch`` on the rounding grid (``batch`` >= 2)."""
    return next(b for b in range(batch - 1, 0, -1) if on_grid(b, rounding))


def largest_divisor(number: int, at_most: int) -> int:
    """The largest divisor of ``number`` that is at most ``at_most`` (>= 1)."""
    return next(d for d in range(min(at_most, number), 0, -1) if number % d == 0)


def smaller_batch(batch: int, per_device_effective: int, rounding: Rounding) -> int:
    """One rounding step below ``batch``, or the largest size below that step dividing ``per_device_effective``.

    Raises:
        NothingSmaller: ``batch`` is 1.
    """
    if batch <= 1:
        raise NothingSmaller("batch 1 per device")
    return largest_divisor(per_device_effective, step_below(batch, rounding))


def plan_oom(state: BatchState, rules: ScalingRules) -> BatchChange:
    """One step down after a training OOM, with the effective batch (and lr0) unchanged.

    Raises:
        NothingSmaller: already at batch 1 per device.
    """
    per_device = state.batch * state.accumulate
    batch = smaller_batch(state.batch, per_device, rules.rounding)
    reasons = [f"out of memory at batch {state.batch} per device: {batch} x accumulate {per_device // batch} keeps "
               f"the effective batch {state.effective_batch}"]
    step = step_below(state.batch, rules.rounding)
    if batch != step:
        reasons.append(f"one {rules.rounding.value} step down is {step}, which does not divide {per_device} (the "
                       f"effective batch per device): {batch}")
    new = dataclasses.replace(state, batch=batch, accumulate=per_device // batch, max_batch=step)
    return _with_bn(BatchChange("oom", "train", state, new, tuple(reasons)), rules)


def plan_val_oom(state: BatchState, rules: ScalingRules) -> BatchChange:
    """Halve the validation batch (onto the rounding grid) after a validation OOM; training is untouched.

    Raises:
        NothingSmaller: the validation batch is already 1.
    """
    if state.val_batch <= 1:
        raise NothingSmaller("validation batch 1 per device")
    batch = next(b for b in range(state.val_batch // 2, 0, -1) if on_grid(b, rules.rounding))
    reason = f"out of memory in validation at batch {state.val_batch} per device: validation batch {batch}"
    return BatchChange("oom", "val", state, dataclasses.replace(state, val_batch=batch), (reason,))


def plan_phase(state: BatchState, rules: ScalingRules, total_batch: int) -> BatchChange:
    """Train at ``total_batch`` (effective, over all devices) from the next epoch: a schedule phase.

    Raises:
        ValueError: ``total_batch`` is not a positive multiple of the world size.
    """
    if total_batch < 1 or total_batch % state.world_size:
        raise ValueError(f"batch {total_batch} must be a positive multiple of the {state.world_size} devices")
    share = total_batch // state.world_size
    reasons = [f"schedule: effective batch {state.effective_batch} -> {total_batch}"]
    batch = share
    if state.max_batch is not None and share > state.max_batch:
        batch = largest_divisor(share, state.max_batch)
        reasons.append(f"{share} per device ran out of memory earlier (at most {state.max_batch}): {batch} x "
                       f"accumulate {share // batch}")
    lr0 = rules.lr0_for(total_batch)
    if lr0 != state.lr0:
        reasons.append(f"lr0 {state.lr0:.6g} -> {lr0:.6g} ({rules.lr_rule} rule, nominal batch {rules.nominal_batch})")
    new = dataclasses.replace(state, batch=batch, accumulate=share // batch, lr0=lr0)
    return _with_bn(BatchChange("schedule", "train", state, new, tuple(reasons)), rules)


def next_bn_policy(current: str, decided: BnPolicy) -> tuple[str, str | None]:
    """The policy to apply mid-run given the one :func:`choose_bn_policy` decided, and why it differs (or None)."""
    if decided.value == current:
        return current, None
    if current == BnPolicy.SYNC.value:
        return current, f"BatchNorm stays sync (the layers were converted before training; {decided.value} " \
                        "would apply to a new run)"
    if decided is BnPolicy.SYNC:
        return current, (f"BatchNorm would be sync at this batch, but SyncBatchNorm is set up before training "
                         f"starts: {current} kept")
    return decided.value, None


def _with_bn(change: BatchChange, rules: ScalingRules) -> BatchChange:
    new = change.new
    decision = choose_bn_policy(rules.bn_requested, new.batch, new.world_size, rules.from_weights)
    policy, note = next_bn_policy(change.old.bn_policy, decision.policy)
    reasons = list(change.reasons)
    if policy != change.old.bn_policy:
        reasons.append(f"BatchNorm {change.old.bn_policy} -> {policy}: {decision.reason}")
    if note is not None:
        reasons.append(note)
    return dataclasses.replace(change, new=dataclasses.replace(new, bn_policy=policy), reasons=tuple(reasons))


def event_for(change: BatchChange, *, epoch: int, step: int | None, free_bytes: int | None = None,
              ranks: tuple[int, ...] = ()) -> BatchEvent:
    """The record of ``change`` as it happened."""
    val = change.phase == "val"
    old, new = change.old, change.new
    return BatchEvent(
        kind=change.kind, phase=change.phase, epoch=epoch, step=step,
        old_batch=old.val_batch if val else old.batch, new_batch=new.val_batch if val else new.batch,
        accumulate=new.accumulate, effective_batch=new.effective_batch, lr0=new.lr0, world_size=new.world_size,
        bn_policy=new.bn_policy, free_bytes=free_bytes, ranks=ranks, reasons=change.reasons,
    )
