"""Training with a decided batch: AutoBatch, then Ultralytics ``model.train`` with what it implies."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from yolo_batch import ultralytics_adapter
from yolo_batch.core.progress import Reporter
from yolo_batch.errors import InputError
from yolo_batch.training import batchnorm
from yolo_batch.training.autobatch import FIXED_REASON, GpuBackend, estimate_batch
from yolo_batch.training.batch_change import BatchEvent, ScalingRules, TrainingOutOfMemory
from yolo_batch.training.config import (
    RESERVED_TRAIN_ARGS,
    BatchRequest,
    BnPolicy,
    SizingConfig,
    TrainConfig,
)
from yolo_batch.training.data import DatasetInfo, inspect_dataset, resolve_data
from yolo_batch.training.decision import AutoBatchDecision
from yolo_batch.training.drills import injection_from_environment
from yolo_batch.training.run_record import DECISION_FILE, RecordWriter, RunRecord
from yolo_batch.training.schedule import EpochSchedule, NoiseSchedule, resolve_schedule
from yolo_batch.training.settings import MEMORY_ARGS
from yolo_batch.ultralytics_adapter.trainer_control import BatchControl

log = logging.getLogger(__name__)

DECISION_PLOT = "autobatch.png"  # beside autobatch.json, when GPU memory was measured
# Pass-through keys that decide the batch and its consequences: lifted into the typed sizing config.
_LIFTED = {"optimizer": str, "lr0": float, "momentum": float}


@dataclass(frozen=True)
class TrainResult:
    save_dir: Path
    decision: AutoBatchDecision
    decision_path: Path
    weights: Path | None
    accumulate: int | None  # what the trainer set up before epoch 1, for checking against the decision
    events: tuple[BatchEvent, ...] = ()  # batch changes during training (read back from autobatch.json)
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)  # final validation: map50, map50_95, ...
    decision_plot: Path | None = None  # autobatch.png, when GPU memory was measured

    @property
    def map50(self) -> float | None:
        """Validation mAP at IoU 0.5 of the final weights (None when no validation ran in this process)."""
        return self.metrics.get("map50")

    @property
    def map50_95(self) -> float | None:
        return self.metrics.get("map50_95")

    def metrics_line(self) -> str:
        """One line with the final validation metrics, as the CLI and the demo print it."""
        if not self.metrics:
            return "final mAP: not measured in this process"
        parts = [f"{name} {self.metrics[key]:.3f}" for key, name in
                 (("map50", "mAP50"), ("map50_95", "mAP50-95"), ("precision", "precision"), ("recall", "recall"))
                 if key in self.metrics]
        return "final mAP (validation, best.pt): " + ", ".join(parts)


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
    if config.project is not None:  # Ultralytics puts a relative project under its global runs_dir, not the cwd
        overrides["project"] = str(Path(config.project).absolute())
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
    progress: Reporter | None = None,
) -> TrainResult:
    """Decide the batch, then train; ``autobatch.json`` is written into the run folder before epoch 1 and after
    every batch change (OOM recovery, schedule phase); ``autobatch.png`` beside it when GPU memory was measured.
    ``progress``: told about the label scan and each AutoBatch probe.

    ``callbacks``: more Ultralytics callbacks, registered after ours (a benchmark's co-tenant, a user's own).

    Raises:
        InputError: bad model, data, device, batch, schedule, drill or pass-through argument (nothing is written).
        TrainingOutOfMemory: an OOM training could not recover from (the run folder keeps the last checkpoint).
    """
    drills = injection_from_environment()  # parsed once, before anything runs
    sizing, extra = split_train_args(config.sizing, config.extra)
    data = resolve_data(sizing.data)
    info = inspect_dataset(data, progress=progress, single_cls=bool(extra.get("single_cls")))
    rect, rect_reason = rect_batches(config.rect, extra, info)
    config = dataclasses.replace(config, sizing=sizing, extra={**extra, **rect})
    model = ultralytics_adapter.load_model(sizing.model)
    decision, schedule, limit = _start(config, data, info, model, backend, nvml, progress)
    if rect_reason is not None:
        decision = dataclasses.replace(decision, reasons=(*decision.reasons, rect_reason))
    if on_decision is not None:
        on_decision(decision)
    writer = RecordWriter(RunRecord(decision, schedule=schedule.phases if schedule else (), autobatch_limit=limit))
    control = BatchControl(
        rules_for(decision, config.sizing), accumulate=decision.accumulate, lr0=decision.lr0_after,
        bn_policy=decision.bn_policy or BnPolicy.TRAIN.value, recovery=config.oom_recovery, schedule=schedule,
        drills=drills, record=writer)
    ours = _our_callbacks(config, decision, schedule)
    try:
        trainer = ultralytics_adapter.train(model, ultralytics_overrides(config, decision, info.training_yaml or data),
                                            callbacks=[*ours, *callbacks], image_window=config.image_window,
                                            control=control)
    except ultralytics_adapter.WorkersFailed as failed:  # what the workers recorded says why
        path = failed.save_dir / DECISION_FILE
        stopped = RunRecord.load(path).stopped if path.exists() else None
        if stopped is not None:
            raise TrainingOutOfMemory(stopped) from None
        raise
    save_dir = Path(trainer.save_dir)
    decision_path = save_dir / DECISION_FILE
    if not decision_path.exists():  # training ended before its setup finished: the decision still goes on record
        writer(save_dir)
    record = RunRecord.load(decision_path)  # rank 0 wrote it, in this process or in a DDP worker
    best = save_dir / "weights" / "best.pt"
    plot = save_dir / DECISION_PLOT
    return TrainResult(save_dir=save_dir, decision=decision, decision_path=decision_path,
                       weights=best if best.exists() else None, accumulate=record.trainer_accumulate,
                       events=record.events, metrics=ultralytics_adapter.final_metrics(trainer),
                       decision_plot=plot if plot.exists() else None)


def _our_callbacks(config: TrainConfig, decision: AutoBatchDecision,
                   schedule: EpochSchedule | NoiseSchedule | None) -> list[ultralytics_adapter.TrainerCallback]:
    """The plot before epoch 1, the BatchNorm policy's callbacks and the noise-scale log (which feeds a
    noise-triggered schedule)."""
    ours: list[ultralytics_adapter.TrainerCallback] = [("on_pretrain_routine_end", DecisionPlot(decision))]
    if decision.bn_policy is not None:
        ours += [(c.event, c) for c in batchnorm.callbacks_for(BnPolicy(decision.bn_policy))]
    if config.log_noise_scale is not None:
        from yolo_batch.ultralytics_adapter.noise_log import NoiseScaleLog

        observe = schedule.observe if isinstance(schedule, NoiseSchedule) else None
        log_noise = NoiseScaleLog(config.log_noise_scale, on_estimate=observe)
        ours.append((log_noise.event, log_noise))
    return ours


class DecisionPlot:
    """A trainer callback (before epoch 1) that draws ``autobatch.png`` into the run folder when GPU memory was
    measured (:mod:`.plots`)."""

    def __init__(self, decision: AutoBatchDecision) -> None:
        self.decision = decision

    def __call__(self, trainer: Any) -> None:
        from yolo_batch.training.plots import save_autobatch_plot

        save_autobatch_plot(self.decision, Path(trainer.save_dir) / DECISION_PLOT)


def _start(config: TrainConfig, data: Path, info: DatasetInfo, model: Any, backend: GpuBackend | None,
           nvml: ModuleType | None, progress: Reporter | None = None
           ) -> tuple[AutoBatchDecision, EpochSchedule | NoiseSchedule | None, AutoBatchDecision | None]:
    """The decision training starts with, the resolved schedule, and (``--batch-schedule auto``) the AutoBatch
    decision whose limit the schedule grows toward; with ``--log-noise-scale`` too, the auto schedule grows when the
    measured noise scale passes the batch (:class:`NoiseSchedule`) instead of at fixed fractions."""
    sizing = dataclasses.replace(config.sizing, data=data)
    estimate = functools.partial(estimate_batch, backend=backend, nvml=nvml, model=model, dataset=info,
                                 progress=progress)
    request = config.batch_schedule
    if request is None:
        return estimate(sizing), None, None
    limit = estimate(sizing) if request.is_auto else None
    schedule = None
    if limit is not None:
        schedule = resolve_schedule(request, epochs=sizing.epochs, world_size=limit.world_size, limit=limit.batch,
                                    rounding=sizing.rounding)
    first = schedule.phases[0].batch if schedule is not None else request.phases[0].batch
    start = estimate(dataclasses.replace(sizing, batch=BatchRequest(fixed=first), accumulate_to=first))
    if schedule is None:
        schedule = resolve_schedule(request, epochs=sizing.epochs, world_size=start.world_size, limit=start.batch,
                                    rounding=sizing.rounding)
    chosen: EpochSchedule | NoiseSchedule = schedule
    if limit is not None and config.log_noise_scale is not None:
        if limit.world_size > 1:
            raise InputError("--batch-schedule auto with --log-noise-scale runs on one device: the noise scale is "
                             "measured in one process, and every process must agree on the batch")
        chosen = NoiseSchedule(start=first, limit=max(limit.total_batch, first))
    reasons = tuple(chosen.reason if r == FIXED_REASON else r for r in start.reasons)
    return dataclasses.replace(start, source="schedule", reasons=reasons), chosen, limit


def rules_for(decision: AutoBatchDecision, sizing: SizingConfig) -> ScalingRules:
    """What every batch change of this run follows: the decision's nominal batch, lr rule and base lr0."""
    return ScalingRules(nominal_batch=decision.nominal_batch, lr_rule=decision.lr_rule, base_lr0=decision.lr0_before,
                        optimizer=decision.lr_optimizer or decision.optimizer,
                        rounding=sizing.rounding, bn_requested=sizing.bn, from_weights=sizing.starts_from_weights)
