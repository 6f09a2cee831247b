"""``yolo-batch sweep``: the same training at several batch sizes, measured per epoch, compared, recommended.

Every run trains the same data, model, seed, epochs and augmentation. Its effective batch is the swept batch
(gradients accumulate to the batch itself, never to the nominal one: otherwise every run would train at the same
effective batch) and lr0 follows the run's scaling rule from the nominal batch (:func:`.scaling.plan_scaling`
through the AutoBatch decision, stated per run in its ``autobatch.json``). Runs train through :func:`.run.train`,
so OOM recovery, the BatchNorm policy and the record are those of ``yolo-batch train``.

Resumable: each finished run is recorded atomically as ``runs/batchN.json`` (with the settings it ran under); a
rerun with the same ``--out`` skips those and trains only what is missing; an unfinished run starts over.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolo_batch.core.files import write_json
from yolo_batch.core.progress import Reporter, tracked
from yolo_batch.errors import InputError
from yolo_batch.training.config import BatchRequest, Rounding, SizingConfig, TrainConfig
from yolo_batch.training.search import round_batch
from yolo_batch.training.sweep_report import EpochRow, SweepReport, SweepRun, build_report

log = logging.getLogger(__name__)

CPU_BATCHES = (8, 16, 32)  # auto where memory cannot be measured
RUNS_DIR = "runs"
TrainFn = Callable[..., Any]  # run.train's signature: (config, *, callbacks=..., progress=...) -> TrainResult


def parse_batches(text: str) -> tuple[int, ...] | None:
    """``auto`` (None) or a comma-separated list of distinct batches >= 1, returned in increasing order.

    Raises:
        InputError: anything else, in one line.
    """
    cleaned = text.strip().lower()
    if cleaned == "auto":
        return None
    parts = [p.strip() for p in cleaned.split(",")]
    if len(parts) < 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise InputError(f"--batches takes 'auto' or at least two batches >= 1 such as 8,32,128, got '{text}'")
    batches = sorted({int(p) for p in parts})
    if len(batches) != len(parts):
        raise InputError(f"--batches lists a batch twice: '{text}'")
    return tuple(batches)


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: the training every run shares (``base``: a ``train`` config, its batch unset), the batches (None:
    auto) and where results go."""

    base: TrainConfig
    batches: tuple[int, ...] | None = None
    out: Path = Path("runs/sweep")
    seed: int = 0

    def __post_init__(self) -> None:
        if self.base.sizing.batch.fixed is not None:
            raise InputError("a sweep sets the batch of each run: give --batches, not --batch")
        if self.base.batch_schedule is not None:
            raise InputError("a sweep trains each run at one batch: drop --batch-schedule")

    @property
    def sizing(self) -> SizingConfig:
        return self.base.sizing

    def settings(self, data: Path) -> dict[str, Any]:
        """What must match for a recorded run to count as part of this sweep."""
        s, base = self.sizing, self.base
        return {"model": s.model, "data": str(data), "imgsz": s.imgsz, "epochs": s.epochs, "device": s.device,
                "seed": self.seed, "nominal_batch": s.nominal_batch, "lr_scaling": s.lr_scaling.value,
                "optimizer": s.optimizer, "lr0": s.lr0, "extra": dict(base.extra), "rect": base.rect,
                "image_window": list(base.image_window) if base.image_window else None}


def auto_batches(limit: int | None) -> tuple[tuple[int, ...], str]:
    """A small batch, a middle one and the memory limit (CPU, or no limit: 8, 16, 32), and why (pure)."""
    if limit is None:
        return CPU_BATCHES, "memory cannot be measured here, so auto sweeps 8, 16 and 32"
    small = round_batch(max(limit // 16, 1), Rounding.POW2)
    middle = round_batch(max(int((small * limit) ** 0.5), 1), Rounding.POW2)
    batches = tuple(sorted({small, middle, limit}))
    return batches, f"auto: small {small}, middle {middle} and the AutoBatch limit {limit}"


def run_sweep(config: SweepConfig, *, train_fn: TrainFn | None = None, progress: Reporter | None = None,
              limit_fn: Callable[[SizingConfig], int | None] | None = None) -> SweepReport:
    """Train one run per batch (skipping those ``config.out`` has finished), then write ``sweep.json``,
    ``sweep.csv`` and the plots into ``config.out``.

    ``train_fn``: what trains one run (default :func:`.run.train`); ``limit_fn``: the AutoBatch limit for ``auto``
    (default: :func:`.autobatch.estimate_batch`, None where memory was not measured).

    Raises:
        InputError: bad settings, or an ``out`` holding runs made under other settings.
    """
    from yolo_batch.training.data import resolve_data
    from yolo_batch.training.sweep_plots import save_sweep_plots

    data = resolve_data(config.sizing.data)
    config = dataclasses.replace(config, base=dataclasses.replace(
        config.base, sizing=dataclasses.replace(config.sizing, data=data)))
    settings = config.settings(data)
    batches, why = (config.batches, "batches given") if config.batches else auto_batches(
        (limit_fn or memory_limit)(config.sizing))
    runs_dir = config.out / RUNS_DIR
    runs_dir.mkdir(parents=True, exist_ok=True)
    done = {b: r for b in batches if (r := load_run(runs_dir, b, settings)) is not None}
    if progress is not None and done:
        progress.note(f"sweep: {len(done)} run(s) already finished in {config.out}: batch "
                      f"{', '.join(map(str, sorted(done)))}")
    runs = dict(done)
    todo = [b for b in batches if b not in done]
    with tracked(progress, "sweep", total=len(todo) * config.sizing.epochs, unit="epoch") as task:
        for index, batch in enumerate(todo):
            finished = index * config.sizing.epochs
            runs[batch] = train_one(config, batch, runs_dir, settings, train_fn, task, finished, progress)
            report = build_report(tuple(runs[b] for b in sorted(runs)), why, settings)
            write_outputs(report, config.out)  # partial results are readable while the sweep goes on
    report = build_report(tuple(runs[b] for b in sorted(runs)), why, settings)
    write_outputs(report, config.out)
    save_sweep_plots(report, config.out)
    return report


def train_one(config: SweepConfig, batch: int, runs_dir: Path, settings: Mapping[str, Any], train_fn: TrainFn | None,
              task: Any, finished: int, progress: Reporter | None) -> SweepRun:
    """Train the run at ``batch`` from scratch and record it atomically once it has finished."""
    from yolo_batch.ultralytics_adapter.epoch_meter import EpochMeter, read_epochs

    if train_fn is None:
        from yolo_batch.training.run import train as default_train

        train_fn = default_train
    name = f"batch{batch}"
    shutil.rmtree(runs_dir / name, ignore_errors=True)  # an unfinished earlier attempt starts over
    sizing = dataclasses.replace(config.sizing, batch=BatchRequest(fixed=batch), accumulate_to=batch)
    extra = {"seed": config.seed, "exist_ok": True, **config.base.extra}
    run_config = dataclasses.replace(config.base, sizing=sizing, project=str(runs_dir.resolve()), name=name,
                                     extra=extra)
    meter = EpochMeter(on_epoch=lambda row: task.update(finished + int(row["epoch"])))
    result = train_fn(run_config, callbacks=meter.callbacks(), progress=progress)
    decision = result.decision
    run = SweepRun(batch=batch, effective_batch=decision.effective_batch, accumulate=decision.accumulate,
                   lr0=decision.lr0_after, lr_rule=decision.lr_rule, optimizer=decision.lr_optimizer or
                   decision.optimizer, save_dir=str(result.save_dir),
                   epochs=tuple(EpochRow.from_dict(r) for r in read_epochs(result.save_dir)),
                   reasons=decision.reasons)
    write_json(runs_dir / f"{name}.json", {"settings": dict(settings), "run": run.to_dict()})
    if progress is not None:
        progress.note(run.line())
    return run


def load_run(runs_dir: Path, batch: int, settings: Mapping[str, Any]) -> SweepRun | None:
    """The finished run at ``batch`` recorded in ``runs_dir``; None when there is none.

    Raises:
        InputError: it was made under other settings (another sweep's folder).
    """
    import json

    path = runs_dir / f"batch{batch}.json"
    if not path.exists():
        return None
    recorded = json.loads(path.read_text(encoding="utf-8"))
    if recorded.get("settings") != dict(settings):
        theirs = recorded.get("settings") or {}
        differ = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
        raise InputError(f"{runs_dir.parent} holds a sweep made with other settings ({', '.join(differ)}): "
                         "use another --out")
    return SweepRun.from_dict(recorded["run"])


def memory_limit(sizing: SizingConfig) -> int | None:
    """The AutoBatch limit (total batch) for ``auto``; None where memory was not measured (CPU, no NVML)."""
    from yolo_batch.training.advise import MEASURED_SOURCES
    from yolo_batch.training.autobatch import estimate_batch

    decision = estimate_batch(dataclasses.replace(sizing, batch=BatchRequest(fraction=sizing.batch.fraction)))
    return decision.total_batch if decision.source in MEASURED_SOURCES else None


def write_outputs(report: SweepReport, out: Path) -> None:
    """``sweep.json`` and ``sweep.csv`` (one row per run and epoch), atomically."""
    from yolo_batch.core.files import atomic_write

    write_json(out / "sweep.json", report.to_dict())
    atomic_write(out / "sweep.csv", report.csv())
