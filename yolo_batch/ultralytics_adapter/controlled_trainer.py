"""The task's trainer with the overrides that let its batch change during training (see :mod:`.trainer_control`).

Each override wraps Ultralytics' own method:

* ``_do_train``: when the loop ends with a device OOM or a :class:`~.trainer_control.BatchChangeRequired`, leave the
  ``except`` block (its traceback holds the failed step's frames and tensors), free memory, apply the change, and
  run the loop again from that epoch. Re-entry recomputes the loop's locals from the new loader: warmup continues
  where it was (it is measured in epochs) and accumulation ramps to its new value.
* ``_setup_train`` / ``_setup_ddp``: on re-entry only set the epoch to start from; the model, optimizer, EMA,
  scheduler, scaler and process group are kept.
* ``run_callbacks``: on re-entry ``on_train_start`` does not run a second time, and the run's start epoch and start
  time are put back once the loop has read them (epoch counts, NaN recovery and ``time=`` stay right).
* ``validate`` / ``final_eval``: an OOM there halves the validation batch (only it) and validates again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from yolo_batch.ultralytics_adapter.trainer_control import BatchControl


@dataclass(frozen=True)
class _ReEntry:
    epoch: int  # where the loop starts again
    start_epoch: int  # the run's own, put back once the loop has read the new one
    train_time_start: float


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
