"""``bench autobatch``: our estimator vs Ultralytics' ``check_train_batch_size``, in one run.

Both pick a batch for the same model, data, imgsz and GPU; then each batch is used for real
(one epoch of training plus validation) while the device's peak is recorded, so the report
shows the chosen batch, the time spent choosing, the real peak against our budget, and OOMs.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from yolo_batch import ultralytics_adapter
from yolo_batch.core.oom import is_oom_error
from yolo_batch.training.autobatch import estimate_batch
from yolo_batch.training.config import SizingConfig
from yolo_batch.training.data import DatasetInfo, inspect_dataset, resolve_data
from yolo_batch.training.decision import gib


@dataclass(frozen=True)
class BenchRow:
    method: str
    batch: int
    seconds: float
    train_peak_bytes: int | None  # the caching allocator's peak
    oom: bool
    device_peak_bytes: int | None = None  # the device's: the process's use above what it held before training


@dataclass(frozen=True)
class BenchReport:
    device: str
    model: str
    imgsz: int
    budget_bytes: int | None = None
    rows: tuple[BenchRow, ...] = ()
    skipped: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratios": self.ratios()}

    def ratios(self) -> dict[str, float]:
        """Ours relative to Ultralytics (time) and to our budget (peak)."""
        by = {r.method: r for r in self.rows}
        out: dict[str, float] = {}
        ours, theirs = by.get("yolo-batch"), by.get("ultralytics")
        if ours and theirs and theirs.seconds > 0:
            out["time_ours_over_ultralytics"] = ours.seconds / theirs.seconds
        if ours and ours.train_peak_bytes and self.budget_bytes:
            out["peak_over_budget"] = ours.train_peak_bytes / self.budget_bytes
        if ours and ours.device_peak_bytes and self.budget_bytes:
            out["device_peak_over_budget"] = ours.device_peak_bytes / self.budget_bytes
        return out

    def table(self) -> Table:
        table = Table(title=f"AutoBatch benchmark: {self.model} imgsz={self.imgsz} on {self.device}",
                      title_justify="left")
        for column in ("method", "batch", "seconds", "peak training+val", "device peak", "device peak / our budget",
                       "OOM"):
            table.add_column(column, justify="right")
        for r in self.rows:
            peak = r.device_peak_bytes
            share = f"{peak / self.budget_bytes:.0%}" if peak and self.budget_bytes else "-"
            table.add_row(r.method, str(r.batch), f"{r.seconds:.2f}", gib(r.train_peak_bytes), gib(peak), share,
                          "yes" if r.oom else "no")
        for name, value in self.ratios().items():
            table.add_row(name, f"{value:.2f}", "", "", "", "", "")
        return table


def run_autobatch_bench(config: SizingConfig) -> BenchReport:
    """Measure both estimators on the first GPU of ``config.device``; says so and stops on a GPU-less machine."""
    import torch

    if not torch.cuda.is_available():
        return BenchReport(device="cpu", model=config.model, imgsz=config.imgsz,
                           skipped="no CUDA GPU on this machine: the AutoBatch benchmark needs one (nothing measured)")
    data = resolve_data(config.data)
    info = inspect_dataset(data)
    config = dataclasses.replace(config, data=info.training_yaml or data, use_cache=False)
    model = ultralytics_adapter.load_model(config.model)  # once: each use below takes a copy
    ours = estimate_batch(config, model=model, dataset=info)
    device = torch.device("cuda", int(ours.device.split(",")[0]))
    their_batch, their_seconds = _ultralytics_choice(config, model, info, device)
    rows = []
    for method, batch, seconds in (("yolo-batch", ours.total_batch, ours.seconds),
                                   ("ultralytics", their_batch, their_seconds)):
        peak, device_peak, oom = _train_peak(config, copy.deepcopy(model), batch, device)
        rows.append(BenchRow(method=method, batch=batch, seconds=seconds, train_peak_bytes=peak, oom=oom,
                             device_peak_bytes=device_peak))
    return BenchReport(device=f"{torch.cuda.get_device_name(device)} (cuda:{device.index})", model=config.model,
                       imgsz=config.imgsz, budget_bytes=ours.budget_bytes, rows=tuple(rows), notes=ours.reasons)


def _ultralytics_choice(config: SizingConfig, model: Any, info: DatasetInfo, device: Any) -> tuple[int, float]:
    import torch

    network = ultralytics_adapter.detection_model(model, info.nc, {}).to(device)
    start = time.perf_counter()
    batch = ultralytics_adapter.ultralytics_batch_size(network, config.imgsz, config.amp, info.worst_case_targets,
                                                       info.train_images)
    seconds = time.perf_counter() - start
    del network
    torch.cuda.empty_cache()
    return int(batch), seconds


def _train_peak(config: SizingConfig, model: Any, batch: int, device: Any) -> tuple[int | None, int | None, bool]:
    """One epoch of training plus validation at ``batch``: the allocator's peak, the device-level peak above what the
    process held before (memory outside the allocator included), and whether it ran out of memory."""
    import torch

    from yolo_batch.core.cuda import DevicePeak, mem_get_info

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    free, total = mem_get_info(device.index)
    oom = False
    with tempfile.TemporaryDirectory() as project, DevicePeak(device.index) as sampled:
        try:
            with ultralytics_adapter.quiet():
                ultralytics_adapter.train(model, {
                    "data": str(config.data), "epochs": 1, "imgsz": config.imgsz, "batch": batch,
                    "device": str(device.index), "amp": config.amp, "project": project, "name": "bench",
                    "plots": False, "workers": 4,
                })
        except (RuntimeError, MemoryError) as exc:
            if not is_oom_error(exc):
                raise
            oom = True
    return int(torch.cuda.max_memory_reserved(device)), sampled.peak - (total - free), oom
