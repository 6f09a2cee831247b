"""``--batch auto`` for inference: the smallest batch within 5 % of the best measured throughput.

Not a memory fill: beyond the point where the device is busy a bigger batch only adds latency and
memory. :func:`choose_throughput_batch` is pure (tested with plain numbers); :func:`measure_throughput` times a
``run_batch`` callable at growing sizes; :func:`measure_engine` binds that to a real engine and device.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from rich.table import Table

from yolo_batch.core.devices import DEFAULT_MEMORY_FRACTION
from yolo_batch.core.oom import is_oom_error

log = logging.getLogger(__name__)

TOLERANCE = 0.05
# Largest batch --batch auto explores, by device type: GPUs often keep gaining past 64 (inspection).
AUTO_MAX_BATCH = MappingProxyType({"cuda": 256, "cpu": 32})
AUTO_SAMPLES = 8  # a run's first images that --batch auto measures on (local infer, and each cluster actor)


@dataclass(frozen=True)
class ThroughputSample:
    """One batch size, measured."""

    batch: int
    images_per_s: float = 0.0
    latency_ms: float = 0.0  # one batch, end to end on the device
    peak_bytes: int | None = None
    oom: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "images_per_s": round(self.images_per_s, 2),
                "latency_ms": round(self.latency_ms, 2), "peak_bytes": self.peak_bytes, "oom": self.oom}


@dataclass(frozen=True)
class ThroughputChoice:
    """The chosen batch with the measurements and limits behind it."""

    batch: int
    samples: tuple[ThroughputSample, ...]
    best_images_per_s: float
    tolerance: float
    max_latency_ms: float | None
    memory_budget_bytes: int | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "samples": [s.to_dict() for s in self.samples],
                "best_images_per_s": round(self.best_images_per_s, 2), "tolerance": self.tolerance,
                "max_latency_ms": self.max_latency_ms, "memory_budget_bytes": self.memory_budget_bytes,
                "reason": self.reason}

    def table(self) -> Table:
        table = Table(title=f"Inference batch (auto): {self.batch} - {self.reason}", title_justify="left")
        for column in ("batch", "img/s", "of best", "latency ms", "peak MiB", "note"):
            table.add_column(column, justify="right")
        for s in self.samples:
            share = f"{s.images_per_s / self.best_images_per_s:.0%}" if self.best_images_per_s and not s.oom else "-"
            peak = f"{s.peak_bytes / 2**20:.0f}" if s.peak_bytes is not None else "-"
            note = "OOM" if s.oom else _limits_note(s, self.max_latency_ms, self.memory_budget_bytes)
            table.add_row(str(s.batch), f"{s.images_per_s:.1f}" if not s.oom else "-", share,
                          f"{s.latency_ms:.1f}" if not s.oom else "-", peak, ("chosen " if s.batch == self.batch
                                                                              else "") + note)
        return table


def _limits_note(s: ThroughputSample, max_latency_ms: float | None, budget: int | None) -> str:
    notes = []
    if max_latency_ms is not None and s.latency_ms > max_latency_ms:
        notes.append("over latency")
    if budget is not None and s.peak_bytes is not None and s.peak_bytes > budget:
        notes.append("over memory")
    return ", ".join(notes)


def choose_throughput_batch(samples: Sequence[ThroughputSample], tolerance: float = TOLERANCE,
                 max_latency_ms: float | None = None, memory_budget_bytes: int | None = None) -> ThroughputChoice:
    """The smallest batch whose throughput is within ``tolerance`` of the best batch that fits the limits.

    Raises:
        ValueError: no samples, or a tolerance outside [0, 1).
    """
    if not samples:
        raise ValueError("no throughput samples to choose from")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    fits = [s for s in samples if not s.oom and s.images_per_s > 0
            and (max_latency_ms is None or s.latency_ms <= max_latency_ms)
            and (memory_budget_bytes is None or s.peak_bytes is None or s.peak_bytes <= memory_budget_bytes)]
    ordered = tuple(sorted(samples, key=lambda s: s.batch))
    if not fits:
        smallest = min(s.batch for s in samples)
        return ThroughputChoice(batch=smallest, samples=ordered, best_images_per_s=0.0, tolerance=tolerance,
                               max_latency_ms=max_latency_ms, memory_budget_bytes=memory_budget_bytes,
                               reason=f"no measured batch fits the limits: using the smallest, {smallest}")
    best = max(fits, key=lambda s: s.images_per_s)
    chosen = min((s for s in fits if s.images_per_s >= (1 - tolerance) * best.images_per_s), key=lambda s: s.batch)
    if chosen.batch == best.batch:
        reason = f"best throughput {best.images_per_s:.1f} img/s"
    else:
        reason = (f"{chosen.images_per_s:.1f} img/s, within {tolerance:.0%} of the best "
                  f"({best.images_per_s:.1f} at batch {best.batch})")
    if max_latency_ms is not None:
        reason += f"; latency {chosen.latency_ms:.0f} <= {max_latency_ms:.0f} ms"
    return ThroughputChoice(batch=chosen.batch, samples=ordered, best_images_per_s=best.images_per_s,
                           tolerance=tolerance, max_latency_ms=max_latency_ms,
                           memory_budget_bytes=memory_budget_bytes, reason=reason)


def candidate_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch``."""
    sizes, b = [], 1
    while b <= max_batch:
        sizes.append(b)
        b *= 2
    return sizes


def measure_throughput(run_batch: Callable[[int], int | None], sizes: Sequence[int], repeats: int = 2,
                       max_latency_ms: float | None = None, memory_budget_bytes: int | None = None,
                       tolerance: float = TOLERANCE, clock: Callable[[], float] = time.perf_counter,
                       on_oom: Callable[[], None] | None = None) -> list[ThroughputSample]:
    """Time ``run_batch(b)`` (which returns the peak device bytes, or None) at growing sizes.

    Each size runs once untimed, then ``repeats`` times (the fastest counts). Growth stops at an OOM,
    at a size over the latency or memory limit, or when two sizes in a row gain less than ``tolerance``.
    """
    samples: list[ThroughputSample] = []
    best, flat = 0.0, 0
    for size in sizes:
        seconds, peak, oom = float("inf"), None, False
        try:
            run_batch(size)  # warm-up: allocator, kernels for this shape
            for _ in range(repeats):
                start = clock()
                peak = run_batch(size)
                seconds = min(seconds, clock() - start)
        except (RuntimeError, MemoryError) as exc:
            if not is_oom_error(exc):
                raise
            oom = True
        if oom:  # released outside the handler: its traceback would keep the failed batch's tensors alive
            if on_oom is not None:
                on_oom()
            samples.append(ThroughputSample(batch=size, oom=True))
            break
        sample = ThroughputSample(batch=size, images_per_s=size / seconds if seconds > 0 else float("inf"),
                                  latency_ms=seconds * 1e3, peak_bytes=peak)
        samples.append(sample)
        log.info("auto batch: %d -> %.1f img/s, %.1f ms", size, sample.images_per_s, sample.latency_ms)
        if max_latency_ms is not None and sample.latency_ms > max_latency_ms:
            break
        if memory_budget_bytes is not None and peak is not None and peak > memory_budget_bytes:
            break
        flat = flat + 1 if sample.images_per_s < (1 + tolerance) * best else 0
        best = max(best, sample.images_per_s)
        if flat >= 2:
            break
    return samples


def measure_engine(engine: Any, letterboxed: Sequence[np.ndarray], plans: Sequence[Any], max_batch: int,
                   max_latency_ms: float | None) -> ThroughputChoice:
    """Measure ``engine`` on real letterboxed images of one shape (repeated to fill a batch), then choose."""
    import torch

    device = engine.device
    budget = _memory_budget(device)

    def run_batch(size: int) -> int | None:
        images = [letterboxed[i % len(letterboxed)] for i in range(size)]
        batch_plans = [plans[i % len(plans)] for i in range(size)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        engine.run(engine.collate(images), batch_plans)  # ends on a copy to the host: synchronised
        return int(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None

    samples = measure_throughput(run_batch, candidate_sizes(max_batch), max_latency_ms=max_latency_ms,
                                 memory_budget_bytes=budget, on_oom=engine.release)
    return choose_throughput_batch(samples, max_latency_ms=max_latency_ms, memory_budget_bytes=budget)


def measure_prepared(engine: Any, prepared: Sequence[tuple[np.ndarray, Any]], max_batch: int,
                     max_latency_ms: float | None) -> ThroughputChoice:
    """``--batch auto`` on a run's own first images (letterboxed, with their plans), in their most common shape; on
    a grey square of the engine's size when none could be read. Local ``infer`` and each cluster actor call it."""
    if not prepared:
        prepared = [engine.prepare(np.full((engine.imgsz, engine.imgsz, 3), 114, np.uint8))]
    shape = collections.Counter(plan.out for _, plan in prepared).most_common(1)[0][0]
    same = [(image, plan) for image, plan in prepared if plan.out == shape]
    return measure_engine(engine, [image for image, _ in same], [plan for _, plan in same], max_batch,
                          max_latency_ms)


def _memory_budget(device: Any) -> int | None:
    """Bytes this process may use on ``device``: a fraction of what NVML says is free plus what we hold."""
    if device.type != "cuda":
        return None
    import torch

    from yolo_batch.core.nvml import NvmlUnavailable, read_gpus

    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        gpu = read_gpus([index])[0]
    except NvmlUnavailable as exc:
        log.warning("memory budget from torch instead of NVML: %s", exc)
        free, _ = torch.cuda.mem_get_info(device)
        return int(DEFAULT_MEMORY_FRACTION * (free + torch.cuda.memory_reserved(device)))
    return int(DEFAULT_MEMORY_FRACTION * (gpu.free_bytes + torch.cuda.memory_reserved(device)))
