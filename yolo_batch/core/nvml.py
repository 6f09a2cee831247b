"""NVML adapter: what each chosen GPU holds, including memory used by other processes.

Everything that talks to the driver is here; callers get plain records or a
:class:`NvmlUnavailable` carrying a one-line reason. No NVML error escapes as anything else.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)


class NvmlUnavailable(Exception):
    """NVML cannot answer (library missing, no driver, no such device, query failed)."""


@dataclass(frozen=True)
class ProcessMemory:
    """One process holding memory on a GPU."""

    pid: int
    used_bytes: int | None  # None where the driver hides it (containers, some MIG setups)
    name: str


@dataclass(frozen=True)
class GpuMemory:
    """Memory of one GPU as NVML reports it at one moment."""

    index: int
    name: str
    uuid: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    processes: tuple[ProcessMemory, ...]

    def own_bytes(self, pid: int) -> int:
        """Bytes NVML attributes to process ``pid`` (0 if it holds none or NVML hides it)."""
        return sum(p.used_bytes or 0 for p in self.processes if p.pid == pid)

    def others_bytes(self, pid: int) -> int:
        """Bytes held by processes other than ``pid``, as far as NVML reports them."""
        return sum(p.used_bytes or 0 for p in self.processes if p.pid != pid)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:  # another container's PID, or not Linux
        return "?"


def _load(module: ModuleType | None) -> ModuleType:
    if module is not None:
        return module
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise NvmlUnavailable("NVML Python bindings missing (pip install nvidia-ml-py)") from exc


def _processes(nvml: ModuleType, handle: object) -> tuple[ProcessMemory, ...]:
    found: dict[int, ProcessMemory] = {}
    queries = ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses")
    for query in queries:
        getter = getattr(nvml, query, None)
        if getter is None:
            continue
        try:
            entries = getter(handle)
        except nvml.NVMLError as exc:  # not supported on this GPU/driver: the totals still hold
            log.debug("%s failed: %s", query, exc)
            continue
        for entry in entries:
            used = getattr(entry, "usedGpuMemory", None)
            pid = int(entry.pid)
            if pid not in found:
                found[pid] = ProcessMemory(pid=pid, used_bytes=int(used) if used is not None else None,
                                           name=_process_name(pid))
    return tuple(found.values())


def _visible_to_physical(indices: Sequence[int]) -> list[int]:
    """Map CUDA-visible indices to NVML indices: CUDA_VISIBLE_DEVICES renumbers devices, NVML does not."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return list(indices)
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(v.isdigit() for v in entries):  # UUID lists: keep CUDA's numbering, the best we can do
        return list(indices)
    physical = [int(v) for v in entries]
    out = []
    for i in indices:
        if i >= len(physical):
            raise NvmlUnavailable(f"device {i} is not among CUDA_VISIBLE_DEVICES={visible}")
        out.append(physical[i])
    return out


def read_gpus(indices: Sequence[int], *, nvml: ModuleType | None = None) -> list[GpuMemory]:
    """Read name, UUID, memory and processes of the GPUs at CUDA ``indices``.

    Args:
        indices: CUDA device indices as the user gave them (``--device 0,1``).
        nvml: a ``pynvml``-compatible module; the real one is imported when omitted.

    Raises:
        NvmlUnavailable: with a one-line reason, for any NVML failure.
    """
    module = _load(nvml)
    nvml_error = getattr(module, "NVMLError", OSError)
    try:
        module.nvmlInit()
    except (nvml_error, OSError) as exc:  # library missing, driver absent or mismatched
        raise NvmlUnavailable(f"NVML could not start ({_text(exc) or type(exc).__name__}): no NVIDIA driver?") from exc
    try:
        count = module.nvmlDeviceGetCount()
        gpus = []
        for index, physical in zip(indices, _visible_to_physical(indices)):
            if physical >= count:
                raise NvmlUnavailable(f"GPU {index} not found: NVML sees {count} device(s)")
            handle = module.nvmlDeviceGetHandleByIndex(physical)
            memory = module.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GpuMemory(
                index=index,
                name=_text(module.nvmlDeviceGetName(handle)),
                uuid=_text(module.nvmlDeviceGetUUID(handle)),
                total_bytes=int(memory.total),
                used_bytes=int(memory.used),
                free_bytes=int(memory.free),
                processes=_processes(module, handle),
            ))
        return gpus
    except NvmlUnavailable:
        raise
    except (nvml_error, OSError) as exc:  # a query failing mid-way (GPU lost, driver reset)
        raise NvmlUnavailable(f"NVML query failed: {_text(exc) or type(exc).__name__}") from exc
    finally:
        try:
            module.nvmlShutdown()
        except (nvml_error, OSError) as exc:  # shutdown failing changes nothing we report
            log.debug("nvmlShutdown failed: %s", exc)
