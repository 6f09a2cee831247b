"""``bench autobatch --shared-gpu``: runs finished / runs started on a GPU another process grabs mid-run.

Each run trains for ``at_epoch + 1`` epochs with the batch chosen at the same memory fraction, by yolo-batch
(``train --batch FRACTION``: AutoBatch, then OOM recovery if the memory goes) and by Ultralytics' own AutoBatch
(``batch=FRACTION``). At the start of epoch ``at_epoch`` a co-tenant process (:mod:`.cotenant`) takes ``share`` of
the GPU's free memory and holds it to the end of the run. The methods alternate run by run, so drift on the box
hits both alike. A run that raises counts as not finished, with its first line kept in the report.
"""

from __future__ import annotations

import dataclasses
import gc
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from yolo_batch import ultralytics_adapter
from yolo_batch.core.checks import check_count, check_memory_fraction
from yolo_batch.core.oom import is_oom_error
from yolo_batch.errors import YoloBatchError
from yolo_batch.training.config import SizingConfig, TrainConfig
from yolo_batch.training.cotenant import CoTenant, TakeMemoryAt
from yolo_batch.training.data import resolve_data
from yolo_batch.training.decision import gib

METHODS = ("yolo-batch", "ultralytics")


@dataclass(frozen=True)
class StressRun:
    """One training run under the co-tenant."""

    method: str
    run: int
    finished: bool
    seconds: float
    cotenant_bytes: int | None = None  # what the co-tenant managed to take (None: it never got to)
    error: str | None = None  # the first line of what stopped the run
    oom: bool = False  # what stopped it was the device running out of memory


@dataclass(frozen=True)
class StressReport:
    device: str
    model: str
    imgsz: int
    fraction: float
    share: float
    at_epoch: int
    runs: tuple[StressRun, ...] = ()
    skipped: str | None = None

    def tally(self) -> dict[str, dict[str, int]]:
        """Per method: runs started and runs finished."""
        return {m: {"started": sum(r.method == m for r in self.runs),
                    "finished": sum(r.method == m and r.finished for r in self.runs)} for m in METHODS}

    def ratios(self) -> dict[str, float]:
        """Runs finished / runs started, per method that ran."""
        return {f"{m}_finished_over_started": t["finished"] / t["started"]
                for m, t in self.tally().items() if t["started"]}

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tally": self.tally(), "ratios": self.ratios()}

    def table(self) -> Table:
        table = Table(title=f"Shared-GPU stress: {self.model} imgsz={self.imgsz} on {self.device}, batch at "
                            f"{self.fraction:.0%} of free memory, a co-tenant takes {self.share:.0%} of what is free "
                            f"at epoch {self.at_epoch}", title_justify="left")
        for column in ("method", "runs started", "runs finished", "finished / started", "what stopped the others"):
            table.add_column(column, justify="right")
        for method, counts in self.tally().items():
            stops = sorted({r.error or "" for r in self.runs if r.method == method and not r.finished})
            share = f"{counts['finished'] / counts['started']:.2f}" if counts["started"] else "-"
            table.add_row(method, str(counts["started"]), str(counts["finished"]), share, "; ".join(stops) or "-")
        taken = [r.cotenant_bytes for r in self.runs if r.cotenant_bytes]
        if taken:
            table.caption = f"co-tenant took {gib(min(taken))} to {gib(max(taken))}"
        return table


def run_stress_bench(config: SizingConfig, runs: int = 3, share: float = 0.9, at_epoch: int = 2) -> StressReport:
    """Train ``runs`` times with each method under a co-tenant; says so and stops on a GPU-less machine.

    Raises:
        InputError: fewer than one run, a share outside (0, 1], or a co-tenant epoch below 2 (it must land mid-run,
            after a first epoch).
    """
    import torch

    check_count(runs, "runs")
    check_memory_fraction(share, "co-tenant share")
    check_count(at_epoch, "co-tenant epoch", minimum=2)
    report = StressReport(device="cpu", model=config.model, imgsz=config.imgsz, fraction=config.batch.fraction,
                          share=share, at_epoch=at_epoch)
    if not torch.cuda.is_available():
        return dataclasses.replace(report, skipped="no CUDA GPU on this machine: the shared-GPU stress benchmark "
                                                   "needs one (nothing measured)")
    index = int((config.device or "0").split(",")[0].replace("cuda:", ""))
    config = dataclasses.replace(config, data=resolve_data(config.data), epochs=at_epoch + 1, use_cache=False,
                                 device=str(index))
    done = [_one_run(method, run, config, index, share, at_epoch) for run in range(runs) for method in METHODS]
    return dataclasses.replace(report, device=f"{torch.cuda.get_device_name(index)} (cuda:{index})",
                               runs=tuple(done))


def _one_run(method: str, run: int, config: SizingConfig, index: int, share: float, at_epoch: int) -> StressRun:
    start = time.perf_counter()
    error, oom = None, False
    with tempfile.TemporaryDirectory() as project, CoTenant(f"cuda:{index}", share) as cotenant:
        trigger = TakeMemoryAt(cotenant, at_epoch)
        try:
            _TRAINERS[method](config, project, trigger)
        except (RuntimeError, MemoryError, YoloBatchError) as exc:  # the run did not finish: counted, not hidden
            error, oom = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200], is_oom_error(exc)
        finally:
            _release_device()
    return StressRun(method=method, run=run, finished=error is None, seconds=time.perf_counter() - start,
                     cotenant_bytes=trigger.taken, error=error, oom=oom)


def _train_ours(config: SizingConfig, project: str, trigger: TakeMemoryAt) -> None:
    from yolo_batch.training.run import train

    with ultralytics_adapter.quiet():
        train(TrainConfig(sizing=config, project=project, name="yolo-batch", extra={"plots": False}),
              callbacks=[(trigger.event, trigger)])


def _train_theirs(config: SizingConfig, project: str, trigger: TakeMemoryAt) -> None:
    model = ultralytics_adapter.load_model(config.model)
    with ultralytics_adapter.quiet():
        ultralytics_adapter.train(model, {
            "data": str(config.data), "epochs": config.epochs, "imgsz": config.imgsz, "batch": config.batch.fraction,
            "device": config.device, "project": project, "name": "ultralytics", "plots": False,
        }, callbacks=[(trigger.event, trigger)])


_TRAINERS: dict[str, Callable[[SizingConfig, str, TakeMemoryAt], None]] = {
    "yolo-batch": _train_ours, "ultralytics": _train_theirs}


def _release_device() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
