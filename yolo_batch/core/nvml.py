"""NVML adapter: what each chosen GPU holds, including memory used by other processes.

Everything that talks to the driver is here; callers get plain records or a
:class:`NvmlUnavailable` carrying a one-line reason. No NVML error escapes as anything else.

CUDA and NVML number GPUs differently: CUDA renumbers what ``CUDA_VISIBLE_DEVICES`` leaves visible (entries may be
indices, ``GPU-`` UUIDs or ``MIG-`` UUIDs) and orders GPUs fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``;
NVML ignores ``CUDA_VISIBLE_DEVICES``, orders by PCI bus, inside a container sees only that container's GPUs, and
numbers a GPU split into MIG instances as one device. So a GPU is matched by the UUID CUDA reports for it
(:class:`CudaDevice`, read by :mod:`yolo_batch.core.cuda`); an index is used only where it cannot be wrong, and
otherwise the reason it might be is raised for the caller to fall back on.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

_MIG_ENABLED = 1  # NVML_DEVICE_MIG_ENABLE


class NvmlUnavailable(Exception):
    """NVML cannot answer (library missing, no driver, no such device, query failed, GPU not identified)."""


@dataclass(frozen=True)
class CudaDevice:
    """A device as CUDA names it in this process: its index, and its UUID where CUDA reports one."""

    index: int
    uuid: str | None = None  # 'GPU-…', 'MIG-…' or bare hex: compared without the prefix


@dataclass(frozen=True)
class ProcessMemory:
    """One process holding memory on a GPU."""

    pid: int
    used_bytes: int | None  # None where the driver hides it (containers, some MIG setups)
    name: str


@dataclass(frozen=True)
class GpuMemory:
    """Memory of one GPU (or one MIG instance) as NVML reports it at one moment."""

    index: int  # the CUDA index the user gave
    name: str
    uuid: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    processes: tuple[ProcessMemory, ...]
    mig: bool = False  # a MIG instance: the memory is the instance's own, not the whole GPU's
    matched_by: str = "index"  # how the CUDA device was found among NVML's: "uuid", "index", ...
    driver: str | None = None

    def own_bytes(self, pid: int) -> int:
        """Bytes NVML attributes to process ``pid`` (0 if it holds none or NVML hides it)."""
        return sum(p.used_bytes or 0 for p in self.processes if p.pid == pid)

    def others_bytes(self, pid: int) -> int:
        """Bytes held by processes other than ``pid``, as far as NVML reports them."""
        return sum(p.used_bytes or 0 for p in self.processes if p.pid != pid)


@dataclass(frozen=True)
class _Device:
    """One entry of NVML's inventory: a whole GPU, or a MIG instance of one."""

    handle: Any
    uuid: str
    name: str
    physical: int  # NVML index of the GPU (the parent's, for a MIG instance)
    mig: bool
    mig_enabled: bool  # a whole GPU split into MIG instances: its own memory figures describe no one device
    parent: Any = None


def bare_uuid(uuid: str) -> str:
    """A UUID without its ``GPU-``/``MIG-`` prefix, lower case: how CUDA and NVML spellings compare."""
    text = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


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


def _processes(nvml: ModuleType, device: _Device) -> tuple[ProcessMemory, ...]:
    """Processes on ``device``; for a MIG instance, those of its GPU that run in that instance."""
    found: dict[int, ProcessMemory] = {}
    handle, instance = device.handle, None
    if device.mig:
        handle = device.parent
        instance = _mig_instance_id(nvml, device.handle)
    for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        getter = getattr(nvml, query, None)
        if getter is None:
            continue
        try:
            entries = getter(handle)
        except nvml.NVMLError as exc:  # not supported on this GPU/driver: the totals still hold
            log.debug("%s failed: %s", query, exc)
            continue
        for entry in entries:
            if instance is not None and getattr(entry, "gpuInstanceId", instance) != instance:
                continue
            used = getattr(entry, "usedGpuMemory", None)
            pid = int(entry.pid)
            if pid not in found:
                found[pid] = ProcessMemory(pid=pid, used_bytes=int(used) if used is not None else None,
                                           name=_process_name(pid))
    return tuple(found.values())


def _mig_instance_id(nvml: ModuleType, handle: Any) -> int | None:
    getter = getattr(nvml, "nvmlDeviceGetGpuInstanceId", None)
    if getter is None:
        return None
    try:
        return int(getter(handle))
    except nvml.NVMLError as exc:
        log.debug("nvmlDeviceGetGpuInstanceId failed: %s", exc)
        return None


def _mig_enabled(nvml: ModuleType, handle: Any) -> bool:
    getter = getattr(nvml, "nvmlDeviceGetMigMode", None)
    if getter is None:
        return False
    try:
        current, _pending = getter(handle)
    except nvml.NVMLError:  # not a MIG-capable GPU
        return False
    return int(current) == _MIG_ENABLED


def _inventory(nvml: ModuleType) -> list[_Device]:
    """Every GPU NVML sees, and every MIG instance of those split into instances."""
    devices = []
    for physical in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(physical)
        split = _mig_enabled(nvml, handle)
        devices.append(_Device(handle=handle, uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                               name=_text(nvml.nvmlDeviceGetName(handle)), physical=physical, mig=False,
                               mig_enabled=split))
        if not split:
            continue
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                instance = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError:  # an empty slot
                continue
            devices.append(_Device(handle=instance, uuid=_text(nvml.nvmlDeviceGetUUID(instance)),
                                   name=_text(nvml.nvmlDeviceGetName(instance)), physical=physical, mig=True,
                                   mig_enabled=False, parent=handle))
    return devices


def _visible_entries(environ: Mapping[str, str]) -> list[str] | None:
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None or not value.strip():
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _match(index: int, cuda: CudaDevice | None, inventory: Sequence[_Device],
           environ: Mapping[str, str]) -> tuple[_Device, str]:
    """The NVML device that is CUDA device ``index``, and how it was found.

    Raises:
        NvmlUnavailable: the device cannot be identified for certain (the reason says why).
    """
    if cuda is not None and cuda.uuid:
        wanted = bare_uuid(cuda.uuid)
        hits = [d for d in inventory if bare_uuid(d.uuid) == wanted]
        if not hits:
            whole = sum(not d.mig for d in inventory)
            raise NvmlUnavailable(f"CUDA device {index} (UUID {cuda.uuid}) is not among the {whole} GPU(s) NVML sees")
        return hits[0], "uuid"
    visible = _visible_entries(environ)
    if visible is not None and index >= len(visible):
        raise NvmlUnavailable(f"device {index} is not among CUDA_VISIBLE_DEVICES={','.join(visible)}")
    if visible is not None and visible[0].upper().startswith(("GPU-", "MIG-")):
        entry = bare_uuid(visible[index])  # CUDA accepts unique UUID prefixes
        hits = [d for d in inventory if bare_uuid(d.uuid).startswith(entry)]
        if len(hits) != 1:
            seen = "matches no GPU" if not hits else "is ambiguous"
            raise NvmlUnavailable(f"CUDA_VISIBLE_DEVICES entry {visible[index]} {seen} among those NVML sees")
        return hits[0], "CUDA_VISIBLE_DEVICES UUID"
    return _match_index(index, visible, [d for d in inventory if not d.mig], environ)


def _match_index(index: int, visible: list[str] | None, whole: Sequence[_Device],
                 environ: Mapping[str, str]) -> tuple[_Device, str]:
    """By index: only where CUDA's numbering is NVML's (PCI bus order, or GPUs all alike) and no GPU is split."""
    if visible is not None:
        if not all(v.isdigit() for v in visible):
            raise NvmlUnavailable(f"CUDA_VISIBLE_DEVICES={','.join(visible)} is neither indices nor UUIDs")
        physical = int(visible[index])
        if physical >= len(whole):
            raise NvmlUnavailable(
                f"CUDA_VISIBLE_DEVICES={','.join(visible)} names GPU {physical} but NVML sees {len(whole)} "
                f"device(s) (a container showing NVML only its own GPUs?): cannot tell which GPU is CUDA device "
                f"{index} without its UUID")
    else:
        physical = index
        if physical >= len(whole):
            raise NvmlUnavailable(f"GPU {index} not found: NVML sees {len(whole)} device(s)")
    ordered = environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST").upper() == "PCI_BUS_ID"
    if not ordered and len({d.name for d in whole}) > 1:
        raise NvmlUnavailable(
            "CUDA orders GPUs fastest first and NVML by PCI bus, and these GPUs differ: NVML's GPU "
            f"{physical} may not be CUDA device {index} (set CUDA_DEVICE_ORDER=PCI_BUS_ID)")
    device = whole[physical]
    if device.mig_enabled:
        raise NvmlUnavailable(f"GPU {physical} is split into MIG instances: its own memory figures describe the "
                              f"whole GPU, and which instance CUDA device {index} is needs its UUID")
    return device, "index" if visible is None else "CUDA_VISIBLE_DEVICES index"


def read_gpus(indices: Sequence[int], *, nvml: ModuleType | None = None, cuda: Sequence[CudaDevice] = (),
              environ: Mapping[str, str] | None = None) -> list[GpuMemory]:
    """Read name, UUID, memory and processes of the GPUs at CUDA ``indices``.

    Args:
        indices: CUDA device indices as the user gave them (``--device 0,1``).
        nvml: a ``pynvml``-compatible module; the real one is imported when omitted.
        cuda: what CUDA reports for those devices (their UUIDs); without it, ``CUDA_VISIBLE_DEVICES`` and
            ``CUDA_DEVICE_ORDER`` decide, where they can.
        environ: the environment to read those two from (``os.environ`` when omitted).

    Raises:
        NvmlUnavailable: with a one-line reason, for any NVML failure or a GPU that cannot be identified.
    """
    module = _load(nvml)
    environ = os.environ if environ is None else environ
    by_index = {c.index: c for c in cuda}
    nvml_error = getattr(module, "NVMLError", OSError)
    try:
        module.nvmlInit()
    except (nvml_error, OSError) as exc:  # library missing, driver absent or mismatched
        raise NvmlUnavailable(f"NVML could not start ({_text(exc) or type(exc).__name__}): no NVIDIA driver?") from exc
    try:
        inventory = _inventory(module)
        driver = _driver(module)
        gpus = []
        for index in indices:
            device, matched_by = _match(index, by_index.get(index), inventory, environ)
            memory = module.nvmlDeviceGetMemoryInfo(device.handle)  # a MIG instance's handle: its own memory
            gpus.append(GpuMemory(
                index=index, name=device.name, uuid=device.uuid, total_bytes=int(memory.total),
                used_bytes=int(memory.used), free_bytes=int(memory.free), processes=_processes(module, device),
                mig=device.mig, matched_by=matched_by, driver=driver,
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


def _driver(nvml: ModuleType) -> str | None:
    getter = getattr(nvml, "nvmlSystemGetDriverVersion", None)
    if getter is None:
        return None
    try:
        return _text(getter())
    except nvml.NVMLError as exc:
        log.debug("nvmlSystemGetDriverVersion failed: %s", exc)
        return None
