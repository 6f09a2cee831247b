"""Fake GPUs for decision-logic tests: memory curves, a fake pynvml module, a fake backend."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

from yolo_batch.training.decision import ProbeSample

GIB = 1 << 30


@dataclass
class CurveGpu:
    """Peak bytes as ``curve(batch)``; batches at or above ``oom_at`` run out of memory."""

    curve: Callable[[int], float]
    oom_at: int | None = None
    noise: float = 0.0  # relative, uniform
    seed: int = 0
    tried: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def measure(self, batch: int) -> ProbeSample:
        self.tried.append(batch)
        if self.oom_at is not None and batch >= self.oom_at:
            return ProbeSample(batch=batch, oom=True)
        peak = self.curve(batch) * (1 + self._rng.uniform(-self.noise, self.noise))
        return ProbeSample(batch=batch, train_peak_bytes=int(peak), val_batch=2 * batch,
                           val_peak_bytes=int(peak * 0.5))

    def close(self) -> None:
        pass


def linear(base_gib: float, per_image_gib: float) -> Callable[[int], float]:
    return lambda b: (base_gib + per_image_gib * b) * GIB


def convex(base_gib: float, per_image_gib: float, quad_gib: float) -> Callable[[int], float]:
    return lambda b: (base_gib + per_image_gib * b + quad_gib * b * b) * GIB


class NVMLError(Exception):
    pass


@dataclass
class FakeDevice:
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * GIB
    used: int = 1 * GIB
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, bytes)
    fail_on: str | None = None  # an NVML call name that raises for this device


def fake_pynvml(devices: list[FakeDevice], *, init_error: bool = False, count_error: bool = False) -> SimpleNamespace:
    """A module with pynvml's names, backed by ``devices``."""
    calls: list[str] = []

    def call(name: str, index: int | None = None) -> None:
        calls.append(name)
        if index is not None and devices[index].fail_on == name:
            raise NVMLError(f"{name} failed: GPU is lost")

    def init() -> None:
        calls.append("nvmlInit")
        if init_error:
            raise NVMLError("Driver Not Loaded")

    def count() -> int:
        call("nvmlDeviceGetCount")
        if count_error:
            raise NVMLError("Unknown Error")
        return len(devices)

    def handle(i: int) -> int:
        call("nvmlDeviceGetHandleByIndex", i)
        return i

    def memory(h: int) -> SimpleNamespace:
        call("nvmlDeviceGetMemoryInfo", h)
        d = devices[h]
        return SimpleNamespace(total=d.total, used=d.used, free=d.total - d.used)

    def name(h: int) -> bytes:
        call("nvmlDeviceGetName", h)
        return devices[h].name.encode()

    def uuid(h: int) -> str:
        call("nvmlDeviceGetUUID", h)
        return f"GPU-fake-{h}"

    def procs(h: int) -> list[SimpleNamespace]:
        call("nvmlDeviceGetComputeRunningProcesses", h)
        return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in devices[h].processes]

    return SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=init, nvmlShutdown=lambda: calls.append("nvmlShutdown"),
        nvmlDeviceGetCount=count, nvmlDeviceGetHandleByIndex=handle, nvmlDeviceGetMemoryInfo=memory,
        nvmlDeviceGetName=name, nvmlDeviceGetUUID=uuid, nvmlDeviceGetComputeRunningProcesses=procs, calls=calls,
    )


@dataclass
class FakeBackend:
    """GPUs that answer with memory curves instead of CUDA."""

    gpu: CurveGpu
    count: int = 1
    reserved: int = 0
    probed_on: list[int] = field(default_factory=list)

    def device_count(self) -> int:
        return self.count

    def init_context(self, index: int) -> int:
        return self.reserved

    def make_probe(self, model: object, nc: int, setup: object, index: int) -> CurveGpu:
        self.probed_on.append(index)
        return self.gpu
