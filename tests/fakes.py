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
    precision: str | None = None  # what the probe reports it trained with (an AMP check that failed: "fp32")

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
    """A GPU as NVML sees it; ``mig`` splits it into instances (each a FakeDevice with its own memory)."""

    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * GIB
    used: int = 1 * GIB
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, bytes)
    fail_on: str | None = None  # an NVML call name that raises for this device
    uuid: str | None = None  # default: GPU-fake-<index>
    mig: list[FakeDevice] | None = None  # MIG instances (uuid 'MIG-…'); the GPU's own figures are the whole GPU's
    instance_id: int = 0  # a MIG instance's GPU instance id; processes of the parent carry it


def fake_pynvml(devices: list[FakeDevice], *, init_error: bool = False, count_error: bool = False,
                driver: str = "550.54.15") -> SimpleNamespace:
    """A module with pynvml's names, backed by ``devices``. Handles are ``(gpu, None)`` for a GPU and
    ``(gpu, slot)`` for one of its MIG instances."""
    calls: list[str] = []

    def device(h: tuple[int, int | None]) -> FakeDevice:
        gpu, slot = h
        return devices[gpu] if slot is None else (devices[gpu].mig or [])[slot]

    def call(name: str, h: tuple[int, int | None] | None = None) -> None:
        calls.append(name)
        if h is not None and device(h).fail_on == name:
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

    def handle(i: int) -> tuple[int, None]:
        call("nvmlDeviceGetHandleByIndex", (i, None))
        return (i, None)

    def memory(h: tuple[int, int | None]) -> SimpleNamespace:
        call("nvmlDeviceGetMemoryInfo", h)
        d = device(h)
        return SimpleNamespace(total=d.total, used=d.used, free=d.total - d.used)

    def name(h: tuple[int, int | None]) -> bytes:
        call("nvmlDeviceGetName", h)
        return device(h).name.encode()

    def uuid(h: tuple[int, int | None]) -> str:
        call("nvmlDeviceGetUUID", h)
        gpu, slot = h
        default = f"GPU-fake-{gpu}" if slot is None else f"MIG-fake-{gpu}-{slot}"
        return device(h).uuid or default

    def procs(h: tuple[int, int | None]) -> list[SimpleNamespace]:
        call("nvmlDeviceGetComputeRunningProcesses", h)
        d = device(h)
        entries = [SimpleNamespace(pid=p, usedGpuMemory=b, gpuInstanceId=0xFFFFFFFF) for p, b in d.processes]
        for instance in d.mig or []:
            entries += [SimpleNamespace(pid=p, usedGpuMemory=b, gpuInstanceId=instance.instance_id)
                        for p, b in instance.processes]
        return entries

    def mig_mode(h: tuple[int, int | None]) -> list[int]:
        call("nvmlDeviceGetMigMode", h)
        if device(h).mig is None:
            raise NVMLError("Not Supported")
        return [1, 1]

    def mig_count(h: tuple[int, int | None]) -> int:
        return 7

    def mig_handle(h: tuple[int, int | None], slot: int) -> tuple[int, int]:
        if slot >= len(device(h).mig or []):
            raise NVMLError("Not Found")
        return (h[0], slot)

    def instance_id(h: tuple[int, int | None]) -> int:
        return device(h).instance_id

    return SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=init, nvmlShutdown=lambda: calls.append("nvmlShutdown"),
        nvmlDeviceGetCount=count, nvmlDeviceGetHandleByIndex=handle, nvmlDeviceGetMemoryInfo=memory,
        nvmlDeviceGetName=name, nvmlDeviceGetUUID=uuid, nvmlDeviceGetComputeRunningProcesses=procs,
        nvmlDeviceGetMigMode=mig_mode, nvmlDeviceGetMaxMigDeviceCount=mig_count,
        nvmlDeviceGetMigDeviceHandleByIndex=mig_handle, nvmlDeviceGetGpuInstanceId=instance_id,
        nvmlSystemGetDriverVersion=lambda: driver, calls=calls,
    )


@dataclass
class FakeBackend:
    """GPUs that answer with memory curves instead of CUDA.

    With ``devices`` (the list behind a :func:`fake_pynvml`), creating a context shows up in NVML as a real one
    does: ``context`` plus the allocator's ``reserved`` bytes on that GPU, listed under this process's PID, or
    under ``host_pid`` (a container, where NVML lists host PIDs).
    """

    gpu: CurveGpu
    count: int = 1
    reserved: int = 0
    probed_on: list[int] = field(default_factory=list)
    devices: list[FakeDevice] | None = None
    context: int = 0
    host_pid: int | None = None
    uuids: list[str | None] | None = None  # what CUDA reports per index; default: GPU-fake-<index>
    cuda_free: dict[int, tuple[int, int]] = field(default_factory=dict)  # mem_get_info answers, by index
    setups: list[object] = field(default_factory=list)  # what each probe was configured with

    def device_count(self) -> int:
        return self.count

    def identify(self, indices):
        from yolo_batch.core.nvml import CudaDevice

        return [CudaDevice(i, self.uuids[i] if self.uuids is not None else f"GPU-fake-{i}") for i in indices]

    def _hold_context(self, index: int, extra: int) -> None:
        if self.devices is None:
            return
        import os

        device = self.devices[index]
        device.used += self.context + extra
        device.processes.append((self.host_pid or os.getpid(), self.context + extra))

    def init_context(self, index: int) -> int:
        self._hold_context(index, self.reserved)
        return self.reserved

    def mem_get_info(self, index: int) -> tuple[int, int] | None:
        return self.cuda_free.get(index)

    def make_probe(self, model: object, nc: int, setup: object, index: int) -> CurveGpu:
        self.probed_on.append(index)
        self.setups.append(setup)
        return self.gpu
