"""Typed, validated requests: what the user asked for, parsed once at the edge.

Ultralytics overloads ``batch`` (-1 auto, 0-1 memory fraction, >=1 fixed); :class:`BatchRequest`
parses that once so nothing deeper has to know the convention.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from yolo_batch.core.checks import (
    check_count,
    check_imgsz,
    check_memory_fraction,
    check_number,
    check_optional_count,
    check_window,
)
from yolo_batch.core.devices import DEFAULT_MEMORY_FRACTION
from yolo_batch.core.models import DEFAULT_MODEL
from yolo_batch.errors import InputError

if TYPE_CHECKING:
    from yolo_batch.training.noise_scale import NoiseSettings
    from yolo_batch.training.schedule import ScheduleRequest

# Ultralytics train arguments yolo-batch sets itself, and where the user sets them instead of passing them through.
RESERVED_TRAIN_ARGS: Mapping[str, str] = MappingProxyType({
    "batch": "--batch/--auto", "nbs": "--nominal-batch", "imgsz": "--imgsz", "epochs": "--epochs",
    "device": "--device", "data": "--data", "model": "--model", "project": "--project", "name": "--name",
    "mode": "the command (train)", "task": "the model (detection)", "resume": "a run of its own",
})


class Rounding(str, Enum):
    """How a memory-derived batch is rounded down."""

    POW2 = "pow2"
    MULT8 = "mult8"
    NONE = "none"


class LrScaling(str, Enum):
    """How lr0 follows the effective batch: linear for SGD, square root for Adam-family."""

    AUTO = "auto"
    LINEAR = "linear"
    SQRT = "sqrt"
    NONE = "none"


class BnPolicy(str, Enum):
    """What BatchNorm does during training (``--bn``); see :mod:`yolo_batch.training.batchnorm`."""

    AUTO = "auto"  # decided from the per-device batch, the GPU count and whether training starts from weights
    TRAIN = "train"  # Ultralytics' behaviour: batch statistics, running statistics updated
    FREEZE = "freeze"  # running statistics kept (eval mode); affine weights still learn
    SYNC = "sync"  # SyncBatchNorm across the GPUs of a multi-GPU run


@dataclass(frozen=True)
class BatchRequest:
    """Either a fixed batch or an AutoBatch request with a memory fraction."""

    fixed: int | None = None
    fraction: float = DEFAULT_MEMORY_FRACTION

    def __post_init__(self) -> None:
        if self.fixed is not None and (isinstance(self.fixed, bool) or self.fixed < 1):
            raise InputError(f"batch must be -1 (auto), a fraction in (0, 1] or an integer >= 1, got {self.fixed}")
        check_memory_fraction(self.fraction)

    @property
    def is_auto(self) -> bool:
        return self.fixed is None

    @classmethod
    def parse(cls, value: str | int | float) -> BatchRequest:
        """Parse Ultralytics' convention: ``-1`` auto, ``0.7`` auto at 70 % memory, ``16`` fixed."""
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            raise InputError(f"batch must be -1, a fraction in (0, 1] or an integer >= 1, got '{value}'") from None
        if text.lstrip("+-").isdigit():
            whole = int(text)
            if whole == -1:
                return cls()
            if whole < 1:
                raise InputError(f"batch must be -1 (auto), a fraction in (0, 1] or an integer >= 1, got {whole}")
            return cls(fixed=whole)
        return cls(fraction=check_memory_fraction(number))

    def __str__(self) -> str:
        return str(self.fixed) if self.fixed is not None else f"auto ({self.fraction:.0%} of free memory)"


@dataclass(frozen=True)
class SizingConfig:
    """Everything that decides a training batch and what follows from it."""

    model: str = DEFAULT_MODEL
    data: Path | None = None  # None: the embedded synthetic set
    imgsz: int = 640
    device: str | None = None
    batch: BatchRequest = field(default_factory=BatchRequest)
    rounding: Rounding = Rounding.POW2
    nominal_batch: int = 64
    lr_scaling: LrScaling = LrScaling.AUTO
    optimizer: str = "auto"
    lr0: float = 0.01
    momentum: float = 0.937
    amp: bool = True
    epochs: int = 100
    fallback_batch: int = 16  # used where memory cannot be measured (CPU, no NVML)
    use_cache: bool = True
    max_batch: int | None = None  # AutoBatch (and the fallback) never go above this per device; None: no cap
    bn: BnPolicy = BnPolicy.AUTO
    from_weights: bool | None = None  # training starts from weights; None: when the model is a .pt
    profile: str = "default"  # the profile these settings came from (named in the decision's reasons)
    # Pass-through train arguments that change memory (multi_scale, freeze, compile, channels_last, deterministic,
    # seed, amp='bf16'): the probe trains under them and the cache is keyed on them. Ultralytics still gets them.
    trainer_args: Mapping[str, Any] = field(default_factory=dict)
    accumulate_to: int | None = None  # the effective batch gradients accumulate to; None: the nominal batch

    def __post_init__(self) -> None:
        object.__setattr__(self, "trainer_args", MappingProxyType(dict(self.trainer_args)))
        check_imgsz(self.imgsz)
        check_count(self.nominal_batch, "nominal batch")
        check_count(self.epochs, "epochs")
        check_count(self.fallback_batch, "fallback batch")
        check_number(self.lr0, "lr0", positive=True)
        check_optional_count(self.max_batch, "max batch")
        check_optional_count(self.accumulate_to, "the batch to accumulate to")

    @property
    def starts_from_weights(self) -> bool:
        """Whether training starts from trained weights (a .pt model, unless told otherwise)."""
        return self.from_weights if self.from_weights is not None else Path(self.model).suffix == ".pt"


@dataclass(frozen=True)
class TrainConfig:
    """A training run: the sizing part plus Ultralytics arguments passed through untouched."""

    sizing: SizingConfig = field(default_factory=SizingConfig)
    project: str | None = None
    name: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    image_window: tuple[float, float] | None = None  # 16-bit/float intensity window; None: each image's min-max
    rect: bool | None = False  # rectangular batches; None: where the training images are not square (rect: auto)
    batch_schedule: ScheduleRequest | None = None  # --batch-schedule; None: one batch for the whole run
    oom_recovery: bool = True  # step the batch down on a device OOM during training (--no-oom-recovery: stop)
    log_noise_scale: NoiseSettings | None = None  # --log-noise-scale: measured after every epoch (noise_scale.json)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))
        if self.batch_schedule is not None and self.sizing.batch.fixed is not None:
            raise InputError(f"--batch-schedule sets the batch: drop --batch {self.sizing.batch.fixed}")
        if self.batch_schedule is not None and not self.batch_schedule.is_auto \
                and self.sizing.batch.fraction != DEFAULT_MEMORY_FRACTION:
            raise InputError("a memory fraction (--batch 0.x) applies to --batch-schedule auto only")
        if self.image_window is not None:
            try:
                object.__setattr__(self, "image_window", check_window(self.image_window))
            except ValueError as exc:
                raise InputError(f"image window: {exc}") from None
