"""Changing the batch of a live Ultralytics trainer: OOM recovery and batch schedules, one mechanism.

The plans are pure (:mod:`yolo_batch.training.batch_change`); this module carries them out on Ultralytics 8.4's
``BaseTrainer``, whose ``_do_train`` is one long loop keeping the step's state in local variables (batches per epoch,
warmup length, the accumulation warmup ramps to, the last optimizer step). Changing ``train_loader`` under it would
leave those stale, so a change leaves the loop and runs it again from the same epoch:

* :func:`controlled_trainer` subclasses the task's own trainer, passed the documented way
  (``model.train(trainer=...)``). Each override wraps the original:

  - ``_do_train``: when the loop ends with a device OOM or a :class:`BatchChangeRequired`, leave the ``except``
    block (its traceback holds the failed step's frames and tensors), free memory, apply the change, and run the
    loop again from that epoch. Re-entry recomputes the locals from the new loader: warmup continues where it was
    (it is measured in epochs) and accumulation ramps to its new value.
  - ``_setup_train`` / ``_setup_ddp``: on re-entry only set the epoch to start from; the model, optimizer, EMA,
    scheduler, scaler and process group are kept.
  - ``run_callbacks``: on re-entry ``on_train_start`` does not run a second time, and the run's start epoch and
    start time are put back once the loop has read them (epoch counts, NaN recovery and ``time=`` stay right).
  - ``validate`` / ``final_eval``: an OOM there halves the validation batch (only it) and validates again.
* :class:`BatchControl`'s callbacks count steps, start schedule phases at epoch boundaries, fire drills
  (:mod:`yolo_batch.training.drills`) and keep Ultralytics' own first-epoch OOM halving from acting (it halves the
  batch but keeps the lr0 pinned for the old effective batch): ``_oom_retries`` is set above its limit before every
  step, so its handler re-raises and this module is the only one that recovers.
* :class:`GatedScaler` wraps the trainer's gradient scaler: ``scaler.scale(loss)`` is the one call between the
  forward pass and backward. Drills raise there; the processes of a multi-GPU run vote there
  (:mod:`yolo_batch.training.rank_vote`).

An OOM mid-epoch redoes that epoch at the smaller batch rather than continuing from the failed step: the rebuilt
loader has another number of batches and a new shuffle, so "the same step" does not exist in it. The optimizer steps
already taken are kept (their updates are valid), the images of the partial epoch are seen once more, and the
scheduler is put back so the epoch trains at the same learning rate. Its first optimizer step comes after one batch
(Ultralytics' loop restarts its accumulation count, as its own OOM retry does).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
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
from yolo_batch.training.batchnorm import FreezeBatchNorm
from yolo_batch.training.drills import InjectionPoint
from yolo_batch.training.rank_vote import Gathered, LocalVote, RankVote, vote_for
from yolo_batch.training.schedule import BatchSchedule

log = logging.getLogger(__name__)

NEVER_RETRY = 1 << 30  # above Ultralytics' first-epoch OOM retry limit (3): its handler then always re-raises
_DECAYED_GROUPS = frozenset({"weight", "muon"})  # the parameter groups Ultralytics applies weight decay to


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


@dataclass(frozen=True)
class _ReEntry:
    epoch: int  # where the loop starts again
    start_epoch: int  # the run's own, put back once the loop has read the new one
    train_time_start: float


class GatedScaler:
    """The trainer's gradient scaler with ``gate()`` run before every ``scale(loss)``, i.e. just before backward."""

    def __init__(self, inner: Any, gate: Callable[[], None]) -> None:
        self.inner = inner
        self.gate = gate

    def scale(self, outputs: Any) -> Any:
        self.gate()
        return self.inner.scale(outputs)

    def __getattr__(self, name: str) -> Any:  # unscale_, step, update, state_dict, ...
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
        self.start = {"accumulate": accumulate, "lr0": lr0, "bn_policy": bn_policy}
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
                                accumulate=self.start["accumulate"], val_batch=trainer.test_loader.batch_size,
                                lr0=self.start["lr0"], bn_policy=self.start["bn_policy"])
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


# --- applying a plan to the live trainer ------------------------------------------------------------------------------


def apply_change(trainer: Any, change: BatchChange) -> None:
    """Rebuild the loaders whose batch changed and set accumulation, lr, weight decay and BatchNorm to ``change.new``.

    The optimizer, its state, the scheduler, the EMA and the scaler are the same objects before and after.
    """
    from ultralytics.utils import LOCAL_RANK

    old, new = change.old, change.new
    if new.batch != old.batch:
        _close(trainer.train_loader)
        trainer.batch_size = trainer.args.batch = new.total_batch
        trainer.train_loader = trainer.get_dataloader(trainer.data["train"], batch_size=new.batch, rank=LOCAL_RANK,
                                                      mode="train")
    if new.val_batch != old.val_batch:
        _close(trainer.test_loader)
        trainer.test_loader = trainer.get_dataloader(trainer.data[trainer.args.split], batch_size=new.val_batch,
                                                     rank=LOCAL_RANK, mode="val")
        trainer.validator.dataloader = trainer.test_loader
    trainer.accumulate = new.accumulate
    if new.lr0 != old.lr0:
        scale_lr(trainer, new.lr0 / old.lr0)
    if new.effective_batch != old.effective_batch:
        set_weight_decay(trainer, new.effective_batch)
    if new.bn_policy != old.bn_policy:
        set_bn_policy(trainer, new.bn_policy)


def scale_lr(trainer: Any, factor: float) -> None:
    """Multiply every parameter group's lr0 (what warmup ramps to and the scheduler scales) by ``factor``."""
    for group in trainer.optimizer.param_groups:
        group["initial_lr"] *= factor
    trainer.scheduler.base_lrs = [lr * factor for lr in trainer.scheduler.base_lrs]


def set_weight_decay(trainer: Any, effective_batch: int) -> None:
    """Ultralytics' rule: weight decay scales with the effective batch over the nominal one (its loss is summed)."""
    decay = trainer.args.weight_decay * effective_batch / trainer.args.nbs
    for group in trainer.optimizer.param_groups:
        if group.get("param_group") in _DECAYED_GROUPS:
            group["weight_decay"] = decay


def set_bn_policy(trainer: Any, policy: str) -> None:
    """Switch between ``freeze`` and ``train`` for the next epoch (``sync`` is never switched mid-run)."""
    hooks = trainer.callbacks["on_train_batch_start"]
    hooks[:] = [h for h in hooks if not isinstance(h, FreezeBatchNorm)]
    if policy == "freeze":
        hooks.append(FreezeBatchNorm())


def free_memory(trainer: Any, phase: str) -> None:
    """Drop what the failed step left on the trainer, collect garbage and return cached device memory."""
    if phase == "train":
        trainer.loss = trainer.loss_items = trainer.tloss = None
        trainer.optimizer.zero_grad()
    gc.collect()
    if trainer.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def free_device_bytes(trainer: Any) -> int | None:
    """NVML's free memory on this process's GPU now; None on CPU or where NVML cannot answer."""
    if trainer.device.type != "cuda":
        return None
    from yolo_batch.core.nvml import NvmlUnavailable, read_gpus

    try:
        return read_gpus([trainer.device.index or 0])[0].free_bytes
    except NvmlUnavailable as exc:
        log.debug("no NVML reading for the batch-change record: %s", exc)
        return None


def _close(loader: Any) -> None:
    if hasattr(loader, "close"):
        loader.close()  # its workers and prefetched batches


# --- the controlled trainer -------------------------------------------------------------------------------------------

_TrainerBase: Any = object  # the task's trainer is mixed in by controlled_trainer()


class BatchControlledTrainer(_TrainerBase):
    """Overrides mixed in over the task's trainer (see the module docstring). Finds its :class:`BatchControl` among
    the trainer's callbacks."""

    _batch_reentry: _ReEntry | None = None

    def _do_train(self) -> None:
        control = control_of(self)
        try:
            while True:
                try:
                    super()._do_train()
                    return
                except BaseException as exc:  # classified here, re-raised unless it is a batch change
                    failure = control.classify(exc, "train")
                    if failure is None:
                        raise
                # Out of the handler: the failed step's frames, and the tensors they held, are gone.
                epoch = control.recover(self, failure)
                previous = self._batch_reentry
                self._batch_reentry = _ReEntry(epoch, previous.start_epoch, previous.train_time_start) \
                    if previous is not None else _ReEntry(epoch, self.start_epoch, self.train_time_start)
        finally:
            control.release(self)

    def _setup_train(self) -> None:
        if self._batch_reentry is None:
            super()._setup_train()
            return
        self.start_epoch = self._batch_reentry.epoch
        self.scheduler.last_epoch = self._batch_reentry.epoch - 1  # the epoch's own lr at its first scheduler step

    def _setup_ddp(self) -> None:
        if self._batch_reentry is None:
            super()._setup_ddp()

    def run_callbacks(self, event: str) -> None:
        reentry = self._batch_reentry
        if reentry is not None:
            if event == "on_train_start":
                return  # the run started once
            if event == "on_train_epoch_start":
                self.start_epoch, self.train_time_start = reentry.start_epoch, reentry.train_time_start
                self._batch_reentry = None
        super().run_callbacks(event)

    def validate(self) -> Any:
        return self._validating(super().validate)

    def final_eval(self) -> Any:
        return self._validating(super().final_eval)

    def _validating(self, run: Callable[[], Any]) -> Any:
        control = control_of(self)
        while True:
            try:
                return run()
            except BaseException as exc:  # classified here, re-raised unless it is a validation OOM
                failure = control.classify(exc, "val")
                if failure is None:
                    raise
            control.recover(self, failure)


def control_of(trainer: Any) -> BatchControl:
    """The :class:`BatchControl` registered among ``trainer``'s callbacks."""
    for hooks in trainer.callbacks.values():
        for hook in hooks:
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, BatchControl):
                return owner
    raise RuntimeError("a batch-controlled trainer needs its BatchControl's callbacks")


@functools.cache
def controlled_trainer(base: type) -> type:
    """``base`` (the task's trainer class) with the :class:`BatchControlledTrainer` overrides.

    Made at run time because Ultralytics is imported lazily; multi-GPU runs pickle it by value (cloudpickle) into
    the workers, where the same overrides apply.
    """
    return type(f"BatchControlled{base.__name__}", (BatchControlledTrainer, base), {})


def install(model: Any, control: BatchControl) -> type:
    """Register ``control``'s callbacks on ``model``; returns the trainer class to pass to ``model.train``."""
    for event, callback in control.callbacks():
        model.add_callback(event, callback)
    return controlled_trainer(model.task_map[model.task]["trainer"])


__all__ = ["BatchChangeRequired", "BatchControl", "GatedScaler", "apply_change", "controlled_trainer", "install"]
