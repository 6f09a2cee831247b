"""Out-of-memory drills: ``YOLO_BATCH_INJECT_OOM`` raises a device OOM at chosen points of a training run.

For tests, and for users who want to see recovery work on their own box before a long run needs it::

    YOLO_BATCH_INJECT_OOM="train:epoch=2,step=3"            # training, epoch 2, its 4th batch
    YOLO_BATCH_INJECT_OOM="val:epoch=1"                     # validation after epoch 1, its first batch
    YOLO_BATCH_INJECT_OOM="train:epoch=0,step=1,rank=1;val:epoch=1"   # several, separated by ';'

Epochs and steps count from 0 (Ultralytics' ``trainer.epoch``; its progress bar shows epoch + 1); ``step`` is the
batch's index within the epoch (default 0); ``rank`` the process of a multi-GPU run (default 0, the only one of a
single-device run). Each point fires once, where a real OOM would surface: after the forward pass, before backward
(training), or at the start of a validation batch. Inert unless set; parsed once, before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from yolo_batch.errors import InputError

ENV = "YOLO_BATCH_INJECT_OOM"
PHASES = ("train", "val")
_KEYS = ("epoch", "step", "rank")
_EXAMPLE = "e.g. 'train:epoch=2,step=3' or 'val:epoch=1', several separated by ';'"


@dataclass(frozen=True)
class InjectionPoint:
    """Raise a device OOM in ``phase`` at ``epoch``/``step`` on process ``rank``."""

    phase: str
    epoch: int
    step: int = 0
    rank: int = 0

    def __str__(self) -> str:
        return f"{self.phase}:epoch={self.epoch},step={self.step},rank={self.rank}"

    def message(self) -> str:
        """The error text: what PyTorch says on a real OOM, and where this one came from."""
        return f"CUDA out of memory (injected by {ENV} at {self})"


def parse_injection(text: str) -> tuple[InjectionPoint, ...]:
    """Parse the drill setting; an empty string means none.

    Raises:
        InputError: one line naming the part that is wrong.
    """
    points = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        phase, sep, rest = part.partition(":")
        phase = phase.strip().lower()
        if phase not in PHASES or not sep:
            raise InputError(f"{ENV}: '{part}' must start with 'train:' or 'val:' ({_EXAMPLE})")
        values: dict[str, int] = {}
        for item in (i.strip() for i in rest.split(",")):
            key, eq, value = (s.strip() for s in item.partition("="))
            if key not in _KEYS or not eq:
                raise InputError(f"{ENV}: '{item}' in '{part}' is not one of {', '.join(k + '=N' for k in _KEYS)}")
            if key in values:
                raise InputError(f"{ENV}: '{key}' given twice in '{part}'")
            if not value.isdigit():
                raise InputError(f"{ENV}: {key} must be a whole number >= 0, got '{value}' in '{part}'")
            values[key] = int(value)
        if "epoch" not in values:
            raise InputError(f"{ENV}: '{part}' needs epoch=N ({_EXAMPLE})")
        points.append(InjectionPoint(phase, **values))
    return tuple(points)


def injection_from_environment(environ: Mapping[str, str] | None = None) -> tuple[InjectionPoint, ...]:
    """The drills ``YOLO_BATCH_INJECT_OOM`` asks for (none when unset or empty).

    Raises:
        InputError: a malformed setting.
    """
    return parse_injection((os.environ if environ is None else environ).get(ENV, ""))
