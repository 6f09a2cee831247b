"""The AutoBatch decision as a record: printable as a table, saved as JSON, and explained.

Every fallback and step-down is a line in ``reasons``; nothing about a decision is only logged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from yolo_batch.core.files import atomic_write

GIB = 1 << 30


@dataclass(frozen=True)
class ProbeSample:
    """Peak memory of real training steps at ``batch`` (and validation at ``val_batch``).

    ``train_peak_bytes``/``val_peak_bytes`` are the caching allocator's peaks; ``outside_bytes`` is what the process
    gained outside the allocator (cuBLAS/cuDNN workspaces, lazily loaded kernels), measured at device level.
    """

    batch: int
    train_peak_bytes: int | None = None
    val_batch: int | None = None
    val_peak_bytes: int | None = None
    oom: bool = False
    seconds: float = 0.0
    outside_bytes: int | None = None

    @property
    def peak_bytes(self) -> int | None:
        """The device-level peak that decides: the larger allocator peak plus the memory outside the allocator."""
        peaks = [p for p in (self.train_peak_bytes, self.val_peak_bytes) if p is not None]
        return max(peaks) + (self.outside_bytes or 0) if peaks else None


@dataclass(frozen=True)
class GpuBudget:
    """One GPU's memory at decision time and the part of it we may use."""

    index: int
    name: str
    uuid: str
    total_bytes: int
    free_bytes: int
    own_bytes: int  # already held by this process (its CUDA context and cache)
    others_bytes: int  # held by other processes, as NVML reports them
    other_pids: tuple[int, ...]
    budget_bytes: int
    matched_by: str | None = None  # how NVML's device was matched to CUDA's ("uuid", ...)
    mig: bool = False  # a MIG instance: its own memory, not the whole GPU's


@dataclass(frozen=True)
class AutoBatchDecision:
    """What batch to train at, why, and what follows from it."""

    source: str  # "autobatch" | "cache" | "fixed" | "fallback"
    batch: int  # per device
    world_size: int
    total_batch: int  # what Ultralytics receives as ``batch``
    accumulate: int
    effective_batch: int
    nominal_batch: int
    optimizer: str
    lr0_before: float
    lr0_after: float
    lr_rule: str
    lr_factor: float
    device: str
    model: str
    imgsz: int
    amp: bool
    rounding: str
    fraction: float | None = None
    step_factor: float | None = None  # how much an optimizer step grows: lr_factor times what the summed loss does
    lr_optimizer: str | None = None  # the optimizer the lr rule was resolved for (Ultralytics' choice under auto)
    profile: str | None = None  # None in records written before profiles existed
    bn_policy: str | None = None  # "train" | "freeze" | "sync" (never "auto": the policy applied)
    bn_reason: str | None = None
    dataset_size: int | None = None
    max_objects: int | None = None
    gpus: tuple[GpuBudget, ...] = ()
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    verified_peak_bytes: int | None = None
    probes: tuple[ProbeSample, ...] = ()
    seconds: float = 0.0
    cache_hit: bool = False
    pinned: dict[str, Any] = field(default_factory=dict)  # optimizer args pinned so the scaled lr0 applies
    reasons: tuple[str, ...] = ()
    precision: str | None = None  # what the probe trained with after the AMP check: "fp16" | "bf16" | "fp32"
    probe_settings: dict[str, Any] = field(default_factory=dict)  # the trainer settings the probe ran under

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write the decision as JSON, atomically (a crash never leaves half a file)."""
        return atomic_write(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoBatchDecision:
        values = dict(data)
        values["gpus"] = tuple(GpuBudget(**{**g, "other_pids": tuple(g["other_pids"])}) for g in data.get("gpus", ()))
        values["probes"] = tuple(ProbeSample(**p) for p in data.get("probes", ()))
        values["reasons"] = tuple(data.get("reasons", ()))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def utilisation(self) -> float | None:
        """Verified peak as a share of the budget."""
        if self.verified_peak_bytes is None or not self.budget_bytes:
            return None
        return self.verified_peak_bytes / self.budget_bytes

    def summary_rows(self) -> list[tuple[str, str]]:
        """(field, value) rows for a two-column table."""
        rows = [
            ("batch (per device)", str(self.batch)),
            ("source", self.source + (" (cache hit)" if self.cache_hit else "")),
            ("devices", f"{self.device} (world size {self.world_size})"),
            ("total batch", str(self.total_batch)),
            ("accumulate", str(self.accumulate)),
            ("effective batch", f"{self.effective_batch} (nominal {self.nominal_batch})"),
            ("optimizer", self.optimizer),
            ("lr0", f"{self.lr0_before:g} -> {self.lr0_after:g} ({self.lr_rule}, x{self.lr_factor:.3g}"
                    + (f"; step x{self.step_factor:.3g}" if self.step_factor is not None else "") + ")"),
            ("model / imgsz / amp", f"{self.model} / {self.imgsz} / {self.amp}"
                                    + (f" ({self.precision})" if self.precision else "")),
            ("rounding", self.rounding),
        ]
        if self.profile is not None:
            rows.append(("profile", self.profile))
        if self.bn_policy is not None:
            rows.append(("BatchNorm", f"{self.bn_policy}: {self.bn_reason}"))
        if self.dataset_size is not None:
            rows.append(("train images / max objects", f"{self.dataset_size} / {self.max_objects}"))
        for gpu in self.gpus:
            rows.append((
                f"GPU {gpu.index}",
                f"{gpu.name}: {gib(gpu.total_bytes)} total, {gib(gpu.free_bytes)} free, "
                f"{gib(gpu.others_bytes)} other processes, budget {gib(gpu.budget_bytes)}",
            ))
        if self.budget_bytes is not None:
            rows.append(("budget (per device)", f"{gib(self.budget_bytes)} ({self.fraction:.0%} of free)"))
        if self.predicted_peak_bytes is not None:
            rows.append(("predicted peak", gib(self.predicted_peak_bytes)))
        if self.verified_peak_bytes is not None:
            share = f" ({self.utilisation:.0%} of budget)" if self.utilisation is not None else ""
            outside = next((p.outside_bytes for p in reversed(self.probes) if p.outside_bytes is not None), None)
            beyond = f", {gib(outside)} of it outside the allocator" if outside else ""
            rows.append(("verified peak (device)", gib(self.verified_peak_bytes) + share + beyond))
        rows.append(("time spent", f"{self.seconds:.2f} s"))
        rows.extend(("reason", r) for r in self.reasons)
        return rows

    def probe_rows(self) -> list[tuple[str, ...]]:
        """One row per probe: batch, train peak, val batch, val peak, outcome, seconds."""
        return [
            (
                str(p.batch),
                gib(p.train_peak_bytes),
                str(p.val_batch or "-"),
                gib(p.val_peak_bytes),
                "OOM" if p.oom else "ok",
                f"{p.seconds:.2f}",
            )
            for p in self.probes
        ]


def gib(value: int | None) -> str:
    """Bytes as GiB with two decimals, '-' when unknown."""
    return "-" if value is None else f"{value / GIB:.2f} GiB"
