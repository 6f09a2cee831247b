"""Changing the batch of a live Ultralytics trainer: OOM recovery and batch schedules, one mechanism.

The plans are pure (:mod:`yolo_batch.training.batch_change`); three modules carry them out on Ultralytics 8.4's
``BaseTrainer``, whose ``_do_train`` is one long loop keeping the step's state in local variables (batches per epoch,
warmup length, the accumulation warmup ramps to, the last optimizer step). Changing ``train_loader`` under it would
leave those stale, so a change leaves the loop and runs it again from the same epoch:

* :mod:`.controlled_trainer`: the task's own trainer with a few methods wrapped, passed the documented way
  (``model.train(trainer=...)``): it leaves and re-enters the loop, and retries validation.
* this module: :class:`BatchControl`, whose callbacks count steps, start schedule phases at epoch boundaries, fire
  drills (:mod:`yolo_batch.training.drills`) and keep Ultralytics' own first-epoch OOM halving from acting (it halves
  the batch but keeps the lr0 pinned for the old effective batch): ``_oom_retries`` is set above its limit before
  every step, so its handler re-raises and yolo-batch is the only one that recovers. :class:`GatedScaler` wraps the
  trainer's gradient scaler: ``scaler.scale(loss)`` is the one call between the forward pass and backward; drills
  raise there and the processes of a multi-GPU run vote there (:mod:`yolo_batch.training.rank_vote`).
* :mod:`.trainer_edits`: the edits a plan makes to the trainer (loaders, accumulation, lr, weight decay, BatchNorm).

An OOM mid-epoch redoes that epoch at the smaller batch rather than continuing from the failed step: the rebuilt
loader has another number of batches and a new shuffle, so "the same step" does not exist in it. The optimizer steps
already taken are kept (their updates are valid), the images of the partial epoch are seen once more, and the
scheduler is put back so the epoch trains at the same learning rate. Its first optimizer step comes after one batch
(Ultralytics' loop restarts its accumulation count, as its own OOM retry does).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from yolo_batch.core.oom import is_oom_error
from yolo_batch.training.batch_change import (
    BatchChange,
    BatchEvent,
    BatchState,
    NothingSmaller,
    ScalingRules,
    TrainingOutOfMemory,
    event_for,
    plan_oom,
    plan_phase,
    plan_val_oom,
)
from yolo_batch.training.drills import InjectionPoint
from yolo_batch.training.rank_vote import Gathered, LocalVote, RankVote, vote_for
from yolo_batch.training.schedule import BatchSchedule
from yolo_batch.ultralytics_adapter.trainer_edits import apply_change, free_device_bytes, free_memory, set_weight_decay

log = logging.getLogger(__name__)

NEVER_RETRY = 1 << 30  # above Ultralytics' first-epoch OOM retry limit (3): its handler then always re-raises


class BatchChangeRequired(Exception):
    """Leave the training loop: a schedule phase starts, or another process of the run ran out of memory."""

    def __init__(self, kind: str, phase: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.phase = phase


@dataclass(frozen=True)
class Failure:
    """What is known about a failure once its handler is left: plain values, no exception, no traceback."""

    kind: str  # "oom" | "schedule"
    phase: str  # "train" | "val"
    epoch: int
    step: int | None
    local: bool  # this process ran out of memory (not told by another, not a schedule boundary)
    agreed: bool  # the processes have voted already
    in_backward: bool = False  # past the step's vote: other processes may be inside the gradient all-reduce


class GatedScaler:
    """The trainer's gradient scaler with ``gate()`` run before every ``scale(loss)``, i.e. just before backward."""

    def __init__(self, inner: Any, gate: Callable[[], None]) -> None:
        self.inner = inner
        self.gate = gate

    def scale(self, outputs: Any) -> Any:
        self.gate()
        return self.inner.scale(outputs)

    def __getattr__(self, name: str) -> Any:  # unscale_, step, update, state_dict, ...
        if name in ("inner", "gate"):  # not set yet (a copy being built): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.inner, name)


class BatchControl:
    """The run's batch controller: Ultralytics callbacks, and what the controlled trainer asks when a change comes.

    Built before training from the decision; picklable until training starts (DDP workers receive it with the
    model's callbacks, each process then runs its own copy).
    """

    def __init__(self, rules: ScalingRules, *, accumulate: int, lr0: float, bn_policy: str, recovery: bool = True,
                 schedule: BatchSchedule | None = None, drills: tuple[InjectionPoint, ...] = (),
                 record: Callable[..., Any] | None = None) -> None:
        self.rules = rules
        self.start_accumulate, self.start_lr0, self.start_bn = accumulate, lr0, bn_policy  # the decision's
        self.recovery = recovery
        self.schedule = schedule
        self.drills = drills
        self.record = record  # RecordWriter: record(save_dir, **changes), called on rank 0 only
        self.fired: set[int] = set()
        self.state: BatchState | None = None
        self.events: list[BatchEvent] = []
        self.epoch = 0
        self.step = -1
        self.val_step = -1
        self.in_backward = False
        self.rank = 0
        self.vote: LocalVote | RankVote = LocalVote()

    def callbacks(self) -> list[tuple[str, Callable[[Any], None]]]:
        return [("on_pretrain_routine_end", self.setup), ("on_train_epoch_start", self.epoch_start),
                ("on_train_batch_start", self.batch_start), ("on_train_batch_end", self.batch_end),
                ("on_val_start", self.val_start), ("on_val_batch_start", self.val_batch_start)]

    # --- callbacks -------------------------------------------------------------------------------------------------

    def setup(self, trainer: Any) -> None:
        """After Ultralytics set the trainer up: take its batch as the state, apply the decision's accumulation
        (a schedule's first phase does not accumulate to the nominal batch), install the gates, write the record."""
        from ultralytics.utils import RANK

        world = max(int(trainer.world_size), 1)
        self.rank = max(RANK, 0)
        self.vote = vote_for(world, trainer.device)
        self.state = BatchState(batch=max(trainer.batch_size // world, 1), world_size=world,
                                accumulate=self.start_accumulate, val_batch=trainer.test_loader.batch_size,
                                lr0=self.start_lr0, bn_policy=self.start_bn)
        if trainer.accumulate != self.state.accumulate:
            trainer.accumulate = self.state.accumulate
            set_weight_decay(trainer, self.state.effective_batch)
        trainer.scaler = GatedScaler(trainer.scaler, functools.partial(self.before_backward, trainer))
        if world > 1:
            gather = trainer.validator.gather_stats

            def gather_stats() -> Any:
                self.before_val_gather()
                return gather()

            trainer.validator.gather_stats = gather_stats
        self._write(trainer, trainer_accumulate=trainer.accumulate)

    def epoch_start(self, trainer: Any) -> None:
        self.epoch, self.step = int(trainer.epoch), -1
        if self.schedule is None or self.state is None:
            return
        target = self.schedule.batch_at(self.epoch)
        if target != self.state.effective_batch:
            raise BatchChangeRequired("schedule", "train", f"batch schedule: {target} from epoch {self.epoch}")

    def batch_start(self, trainer: Any) -> None:
        self.step += 1
        self.in_backward = False
        trainer._oom_retries = NEVER_RETRY  # Ultralytics' own OOM halving never acts: recovery is ours (or off)

    def batch_end(self, trainer: Any) -> None:
        self.in_backward = False

    def before_backward(self, trainer: Any) -> None:
        """The step's gate, after the forward pass: a drill due here raises; the processes vote."""
        point = self._due("train", self.step)
        if point is not None:
            raise _injected(point)
        if self.vote.any_failed(False):
            raise BatchChangeRequired("oom", "train", "another process ran out of memory in this step")
        self.in_backward = True

    def val_start(self, validator: Any) -> None:
        self.val_step = -1

    def val_batch_start(self, validator: Any) -> None:
        self.val_step += 1
        point = self._due("val", self.val_step)
        if point is not None:
            raise _injected(point)

    def before_val_gather(self) -> None:
        if self.vote.any_failed(False):
            raise BatchChangeRequired("oom", "val", "another process ran out of memory in validation")

    # --- what the controlled trainer asks ---------------------------------------------------------------------------

    def classify(self, exc: BaseException, phase: str) -> Failure | None:
        """Inside the handler: the failure as plain values, or None when ``exc`` is not ours to handle."""
        if self.state is None:
            return None
        if isinstance(exc, BatchChangeRequired):
            step = None if exc.kind == "schedule" else self._step(exc.phase)
            return Failure(exc.kind, exc.phase, self.epoch, step, local=False, agreed=True)
        if is_oom_error(exc):
            return Failure("oom", phase, self.epoch, self._step(phase), local=True, agreed=False,
                           in_backward=phase == "train" and self.in_backward)
        return None

    def recover(self, trainer: Any, failure: Failure) -> int:
        """Outside the handler: free memory, agree, plan, apply, record. Returns the epoch to train from.

        Raises:
            TrainingOutOfMemory: nothing smaller to try, recovery off, or an OOM past the vote of a multi-GPU step.
        """
        assert self.state is not None  # classify() returns None before setup
        free_memory(trainer, failure.phase)
        if failure.kind == "schedule":
            assert self.schedule is not None
            change = plan_phase(self.state, self.rules, self.schedule.batch_at(failure.epoch))
            seen = Gathered((), None, None)
        else:
            if failure.in_backward and self.vote.world_size > 1:
                self._stop(trainer, failure, "inside backward, where the other processes are already exchanging "
                                             "gradients and cannot be told to stop")
            if not failure.agreed:
                self.vote.any_failed(True)
            seen = self.vote.gather(failure.local, free_device_bytes(trainer), failure.step)
            failure = dataclasses.replace(failure, step=seen.step)
            change = self._plan_oom(trainer, failure)
        apply_change(trainer, change)
        self.state = change.new
        event = event_for(change, epoch=failure.epoch, step=failure.step, free_bytes=seen.free_bytes,
                          ranks=seen.ranks)
        self.events.append(event)
        if self.rank == 0:
            _console(event.line(), warning=event.kind == "oom")
        self._write(trainer, events=tuple(self.events))
        return failure.epoch

    def release(self, trainer: Any) -> None:
        """Take the gates out again (training has ended, one way or another)."""
        if isinstance(getattr(trainer, "scaler", None), GatedScaler):
            trainer.scaler = trainer.scaler.inner
        validator = getattr(trainer, "validator", None)
        if validator is not None:
            vars(validator).pop("gather_stats", None)

    # --- internals --------------------------------------------------------------------------------------------------

    def _plan_oom(self, trainer: Any, failure: Failure) -> BatchChange:
        assert self.state is not None
        val = failure.phase == "val"
        batch = self.state.val_batch if val else self.state.batch
        if not self.recovery:
            self._stop(trainer, failure, f"at {'validation ' if val else ''}batch {batch} per device; OOM recovery "
                                         "is off (--no-oom-recovery)")
        try:
            return plan_val_oom(self.state, self.rules) if val else plan_oom(self.state, self.rules)
        except NothingSmaller:
            pass
        self._stop(trainer, failure, f"at {'validation ' if val else ''}batch 1 per device: nothing smaller to try; "
                                     "free GPU memory, lower --imgsz or use a smaller model")

    def _stop(self, trainer: Any, failure: Failure, why: str) -> NoReturn:
        where = f"{'validation' if failure.phase == 'val' else 'training'} at epoch {failure.epoch}" + (
            f", step {failure.step}" if failure.step is not None else "")
        last = trainer.last
        kept = f"the last good checkpoint is {last}" if last.exists() else \
            "no epoch finished, so there is no checkpoint"
        line = f"out of memory in {where} {why}; {kept}"
        self._write(trainer, events=tuple(self.events), stopped=line)
        raise TrainingOutOfMemory(line)

    def _due(self, phase: str, step: int) -> InjectionPoint | None:
        for index, point in enumerate(self.drills):
            if index not in self.fired and (point.phase, point.epoch, point.step, point.rank) == (
                    phase, self.epoch, step, self.rank):
                self.fired.add(index)
                return point
        return None

    def _step(self, phase: str) -> int:
        return self.val_step if phase == "val" else self.step

    def _write(self, trainer: Any, **changes: Any) -> None:
        if self.record is not None and self.rank == 0:
            self.record(trainer.save_dir, **changes)


def _injected(point: InjectionPoint) -> BaseException:
    import torch

    return torch.cuda.OutOfMemoryError(point.message())


def _console(line: str, warning: bool) -> None:
    """One line in the trainer's own output (Ultralytics' logger; quiet when it is)."""
    from ultralytics.utils import LOGGER

    (LOGGER.warning if warning else LOGGER.info)(line)
