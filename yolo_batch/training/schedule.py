"""Batch schedules: the batch grows during training (``train --batch-schedule``), as pure data.

A schedule is a list of phases, ``batch@epoch``: from epoch ``epoch`` (counted from 0, as Ultralytics' trainer and its
checkpoints count) the run trains at ``batch`` (the total over all devices, like ``--batch``). The batch of a phase is
its *effective* batch: yolo-batch does not accumulate gradients up to the nominal batch in a schedule (every phase
would then train at the same effective batch and the schedule would change nothing but speed); accumulation only
makes up a phase's batch where memory forces a smaller per-device batch. The learning rate follows ``--lr-scaling``
relative to the nominal batch at each change (:mod:`yolo_batch.training.batch_change`).

``auto`` starts at a quarter of the AutoBatch limit and doubles at 25 % and at 50 % of the epochs
(:data:`AUTO_STEPS`). Why these fractions:

* Small batches first: early in training the gradient noise scale, which sets the largest batch that still pays per
  sample, is small, and grows as the loss falls (McCandlish et al. 2018), and the noise of small batches helps
  generalisation most early on.
* Doubling instead of a learning-rate step: increasing the batch has the effect of decaying the learning rate by the
  same factor (Smith et al. 2018, "Don't decay the learning rate, increase the batch size"); two doublings cover
  the range of two such steps.
* The limit from the middle on: the second half of the epochs, usually most of the wall-clock time, runs at the batch
  that fills the memory.
* At least 8 images per device (or the limit, if smaller): below 8 BatchNorm statistics are unreliable
  (:data:`yolo_batch.training.batchnorm.MIN_RELIABLE_BATCH`).

The seam for a trigger other than epochs: the trainer asks a :class:`BatchSchedule` for ``batch_at(epoch)`` at every
epoch boundary and changes the batch when the answer differs from the phase it trains at. :class:`NoiseSchedule`
(``auto`` with ``--log-noise-scale``: grow when the measured B_simple passes the current batch) is another
implementation of that protocol, answering from the estimate of the epoch that ended; nothing else changes.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Protocol

from yolo_batch.errors import InputError
from yolo_batch.training.batchnorm import MIN_RELIABLE_BATCH
from yolo_batch.training.config import Rounding
from yolo_batch.training.search import round_batch

AUTO = "auto"
# (fraction of the epochs where a phase starts, divisor of the AutoBatch limit): see the module docstring.
AUTO_STEPS: tuple[tuple[float, int], ...] = ((0.0, 4), (0.25, 2), (0.5, 1))
_PHASE = re.compile(r"^\s*(\d+)\s*@\s*(\d+)\s*$")
_EXAMPLE = "e.g. '16@0,32@10,64@20' (batch@epoch) or 'auto'"


class BatchSchedule(Protocol):
    """What the trainer asks at each epoch boundary: the batch (total over devices) to train at from ``epoch``."""

    def batch_at(self, epoch: int) -> int: ...


@dataclass(frozen=True)
class Phase:
    """From ``epoch`` (0-based) on, train at ``batch`` (total over all devices, the phase's effective batch)."""

    batch: int
    epoch: int

    def __str__(self) -> str:
        return f"{self.batch}@{self.epoch}"


@dataclass(frozen=True)
class ScheduleRequest:
    """What the user asked for: explicit phases, or ``auto`` (no phases: derived from the AutoBatch limit)."""

    phases: tuple[Phase, ...] = ()

    @property
    def is_auto(self) -> bool:
        return not self.phases

    @classmethod
    def parse(cls, text: str) -> ScheduleRequest:
        """Parse ``"16@0,32@10,64@20"`` or ``"auto"``.

        Raises:
            InputError: one line naming what is wrong (empty, malformed phase, batch < 1, not starting at epoch 0,
                epochs not increasing).
        """
        spec = str(text).strip()
        if spec.lower() == AUTO:
            return cls()
        if not spec:
            raise InputError(f"--batch-schedule is empty: {_EXAMPLE}")
        phases = []
        for item in spec.split(","):
            match = _PHASE.match(item)
            if match is None:
                raise InputError(f"--batch-schedule: '{item.strip()}' is not batch@epoch ({_EXAMPLE})")
            batch, epoch = int(match.group(1)), int(match.group(2))
            if batch < 1:
                raise InputError(f"--batch-schedule: batch must be >= 1, got '{item.strip()}'")
            phases.append(Phase(batch, epoch))
        if phases[0].epoch != 0:
            raise InputError(f"--batch-schedule must start at epoch 0 (the batch the run starts with), got "
                             f"'{phases[0]}'")
        for before, after in itertools.pairwise(phases):
            if after.epoch <= before.epoch:
                raise InputError(f"--batch-schedule: epochs must increase, '{after}' follows '{before}'")
        return cls(tuple(phases))

    def __str__(self) -> str:
        return AUTO if self.is_auto else ",".join(map(str, self.phases))


@dataclass(frozen=True)
class EpochSchedule:
    """A schedule resolved for a run: phases checked against its epochs and devices."""

    phases: tuple[Phase, ...]
    reason: str

    def batch_at(self, epoch: int) -> int:
        """The batch of the last phase that started at or before ``epoch``."""
        return [p for p in self.phases if p.epoch <= epoch][-1].batch

    def __str__(self) -> str:
        return ",".join(map(str, self.phases))


def resolve_schedule(request: ScheduleRequest, *, epochs: int, world_size: int, limit: int,
                     rounding: Rounding) -> EpochSchedule:
    """Check ``request`` against the run, or derive the ``auto`` phases from ``limit`` (per device).

    Raises:
        InputError: a phase starting at or after the last epoch, or a batch that the devices do not divide.
    """
    if request.is_auto:
        return auto_schedule(limit, epochs=epochs, world_size=world_size, rounding=rounding)
    for phase in request.phases:
        if phase.epoch >= epochs:
            raise InputError(f"--batch-schedule: phase '{phase}' starts after the last epoch (epochs={epochs}, "
                             f"counted from 0): it would never run")
        if phase.batch % world_size:
            raise InputError(f"--batch-schedule: batch {phase.batch} of '{phase}' must be a multiple of the "
                             f"{world_size} devices")
    return EpochSchedule(request.phases, f"batch schedule {request} as given")


def auto_schedule(limit: int, *, epochs: int, world_size: int, rounding: Rounding) -> EpochSchedule:
    """A quarter of ``limit`` (per device), doubled at 25 % and 50 % of ``epochs`` (see :data:`AUTO_STEPS`)."""
    if limit < 1 or epochs < 1 or world_size < 1:
        raise ValueError(f"limit, epochs and world size must be >= 1, got {limit}, {epochs}, {world_size}")
    floor = min(MIN_RELIABLE_BATCH, limit)
    phases: list[Phase] = []
    for fraction, divisor in AUTO_STEPS:
        batch = max(round_batch(limit // divisor, rounding), floor) * world_size
        epoch = int(fraction * epochs)
        if phases and phases[-1].epoch == epoch:
            phases[-1] = Phase(batch, epoch)  # too few epochs to give each step its own: the later one wins
        elif not phases or phases[-1].batch != batch:
            phases.append(Phase(batch, epoch))
    steps = "/".join(str(limit // d) for _, d in AUTO_STEPS)
    reason = (f"batch schedule auto: {','.join(map(str, phases))} (AutoBatch limit {limit} per device: {steps} per "
              f"device from 0/25/50 % of {epochs} epochs, at least {floor})")
    return EpochSchedule(tuple(phases), reason)


class NoiseSchedule:
    """``--batch-schedule auto`` with ``--log-noise-scale``: start at the auto schedule's first batch and double (up to
    the AutoBatch limit) at the first epoch boundary after the measured noise scale passed the batch the run trains
    at, instead of at fixed fractions of the epochs.

    The noise-scale log tells it each epoch's estimate (:meth:`observe`, after the epoch's validation); the trainer
    asks :meth:`batch_at` at the next epoch's start. An estimate of ``None`` (the gradient's signal below its noise
    at the measured batch: the noise scale is larger than the measurement resolves) counts as passed. Single-process
    runs only: the estimate is measured in one process, and the processes of a multi-GPU run must agree on the batch.
    """

    def __init__(self, start: int, limit: int) -> None:
        if not 1 <= start <= limit:
            raise ValueError(f"start and limit must satisfy 1 <= start <= limit, got {start} and {limit}")
        self.limit = limit
        self._phases = [Phase(start, 0)]
        self._estimates: dict[int, float | None] = {}
        self.reason = (f"batch schedule auto, noise-triggered: {start} from epoch 0, doubled up to the AutoBatch limit "
                       f"{limit} at the epoch after the measured gradient noise scale passes the batch")

    @property
    def phases(self) -> tuple[Phase, ...]:
        """The phases decided so far (the first one before training starts)."""
        return tuple(self._phases)

    def observe(self, epoch: int, b_simple: float | None) -> None:
        """The noise scale measured after ``epoch`` (0-based) ended."""
        self._estimates[epoch] = b_simple

    def batch_at(self, epoch: int) -> int:
        current = self._phases[-1]
        if epoch > current.epoch and current.batch < self.limit and (epoch - 1) in self._estimates:
            noise = self._estimates[epoch - 1]
            if noise is None or noise > current.batch:
                self._phases.append(Phase(min(current.batch * 2, self.limit), epoch))
        return [p for p in self._phases if p.epoch <= epoch][-1].batch
