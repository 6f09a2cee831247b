"""Training with a decided batch: AutoBatch, then Ultralytics ``model.train`` with what it implies."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from yolo_batch import ultralytics_adapter
from yolo_batch.errors import InputError
from yolo_batch.training import batchnorm
from yolo_batch.training.autobatch import GpuBackend, estimate_batch
from yolo_batch.training.config import (
    RESERVED_TRAIN_ARGS,
    BnPolicy,
    SizingConfig,
    TrainConfig,
)
from yolo_batch.training.data import DatasetInfo, inspect_dataset, resolve_data
from yolo_batch.training.decision import AutoBatchDecision
from yolo_batch.training.settings import MEMORY_ARGS

log = logging.getLogger(__name__)

DECISION_FILE = "autobatch.json"
# Pass-through keys that decide the batch and its consequences: lifted into the typed sizing config.
_LIFTED = {"optimizer": str, "lr0": float, "momentum": float}


@dataclass(frozen=True)
class TrainResult:
    save_dir: Path
    decision: AutoBatchDecision
    decision_path: Path
    weights: Path | None
    accumulate: int | None  # what the trainer actually used, for checking against the decision


def split_train_args(sizing: SizingConfig, extra: Mapping[str, Any]) -> tuple[SizingConfig, dict[str, Any]]:
    """Validate pass-through arguments with Ultralytics and lift the sizing ones into ``sizing``.

    Raises:
        InputError: unknown keys, bad values, or keys that have an option of their own.
    """
    for key in extra:
        if key in RESERVED_TRAIN_ARGS:
            raise InputError(f"'{key}' is set by yolo-batch: use {RESERVED_TRAIN_ARGS[key]} instead of --set {key}=...")
    values = ultralytics_adapter.validate_train_args(extra)
    lifted: dict[str, Any] = {"trainer_args": {k: values[k] for k in MEMORY_ARGS if k in values}}  # also passed on
    lifted.update({k: _LIFTED[k](values.pop(k)) for k in list(values) if k in _LIFTED})
    if "amp" in values:
        # Ultralytics also takes amp="fp32" / "bf16"; a string stays in the pass-through for it to read.
        amp = values["amp"] if isinstance(values["amp"], bool) else str(values["amp"]).lower() != "fp32"
        if isinstance(values["amp"], bool):
            values.pop("amp")
        lifted["amp"] = amp
    if "pretrained" in values:  # stays in the pass-through; the BatchNorm policy needs to know
        lifted["from_weights"] = batchnorm.starts_from_weights(sizing.model, values["pretrained"])
    return dataclasses.replace(sizing, **lifted), values


def rect_batches(rect: bool | None, extra: Mapping[str, Any], info: DatasetInfo) -> tuple[dict[str, Any], str | None]:
    """The ``rect`` train argument a run's profile asks for, and why (None: nothing to add).

    A ``rect`` given explicitly (``--set rect=...``) wins; ``None`` (a profile's ``rect: auto``) turns rectangular
    batches on where the training images are not square, so letterboxing them to a square does not waste pixels.
    """
    if "rect" in extra or rect is False:
        return {}, None
    if rect is None and info.square_images:
        return {}, None
    why = "the profile asks for it" if rect else "the training images are not square (rect: auto)"
    return {"rect": True}, f"rectangular batches: {why}"


def ultralytics_overrides(config: TrainConfig, decision: AutoBatchDecision, data: Path) -> dict[str, Any]:
    """The one mapping from our config and decision to Ultralytics ``train`` arguments."""
    sizing = config.sizing
    overrides: dict[str, Any] = {
        "data": str(data),
        "epochs": sizing.epochs,
        "imgsz": sizing.imgsz,
        "device": decision.device,
        "batch": decision.total_batch,
        "nbs": sizing.nominal_batch,
        "amp": decision.amp,  # off where the probe's AMP check failed: the trainer runs the same check
        "optimizer": sizing.optimizer,
        "lr0": sizing.lr0,
        "momentum": sizing.momentum,
        **config.extra,
        **decision.pinned,
    }
    if config.project is not None:
        overrides["project"] = config.project
    if config.name is not None:
        overrides["name"] = config.name
    return overrides


def train(
    config: TrainConfig,
    *,
    on_decision: Callable[[AutoBatchDecision], None] | None = None,
    backend: GpuBackend | None = None,
    nvml: ModuleType | None = None,
    callbacks: Sequence[ultralytics_adapter.TrainerCallback] = (),
) -> TrainResult:
    """Decide the batch, then train; ``autobatch.json`` is written into the run folder before epoch 1.

    ``callbacks``: more Ultralytics callbacks, registered after ours (a benchmark's co-tenant, a user's own).

    Raises:
        InputError: bad model, data, device, batch or pass-through argument (nothing is written).
    """
    sizing, extra = split_train_args(config.sizing, config.extra)
    data = resolve_data(sizing.data)
    info = inspect_dataset(data)
    rect, rect_reason = rect_batches(config.rect, extra, info)
    config = dataclasses.replace(config, sizing=sizing, extra={**extra, **rect})
    model = ultralytics_adapter.load_model(sizing.model)
    decision = estimate_batch(dataclasses.replace(sizing, data=data), backend=backend, nvml=nvml, model=model,
                              dataset=info)
    if rect_reason is not None:
        decision = dataclasses.replace(decision, reasons=(*decision.reasons, rect_reason))
    if on_decision is not None:
        on_decision(decision)
    seen: dict[str, Any] = {}

    def write_decision(trainer: Any) -> None:
        seen["accumulate"] = trainer.accumulate
        decision.save(Path(trainer.save_dir) / DECISION_FILE)

    ours: list[ultralytics_adapter.TrainerCallback] = [("on_pretrain_routine_end", write_decision)]
    if decision.bn_policy is not None:
        ours += [(c.event, c) for c in batchnorm.callbacks_for(BnPolicy(decision.bn_policy))]
    trainer = ultralytics_adapter.train(model, ultralytics_overrides(config, decision, data),
                                        callbacks=[*ours, *callbacks], image_window=config.image_window)
    save_dir = Path(trainer.save_dir)
    decision_path = save_dir / DECISION_FILE
    if not decision_path.exists():  # DDP runs its callbacks in the worker processes
        decision.save(decision_path)
    best = save_dir / "weights" / "best.pt"
    return TrainResult(save_dir=save_dir, decision=decision, decision_path=decision_path,
                       weights=best if best.exists() else None, accumulate=seen.get("accumulate"))
