"""CUDA as torch sees it: which devices, by what UUID, and how much memory the device itself has free.

The torch side of device identity (NVML's side is :mod:`yolo_batch.core.nvml`, which stays free of torch). Reading
properties does not create a CUDA context; :func:`mem_get_info` does (on that device), as any allocation would.
"""

from __future__ import annotations

from collections.abc import Sequence

from yolo_batch.core.nvml import CudaDevice


def device_count() -> int:
    """CUDA devices this process can see (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def identify(indices: Sequence[int]) -> list[CudaDevice]:
    """The UUID CUDA reports for each device (None where this torch build does not report one)."""
    import torch

    devices = []
    for index in indices:
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        devices.append(CudaDevice(index=index, uuid=str(uuid) if uuid is not None else None))
    return devices


def mem_get_info(index: int) -> tuple[int, int]:
    """(free, total) bytes of device ``index`` as the CUDA driver reports them: for a MIG instance, the instance's.

    ``free`` counts what every process holds, including this one's context and its allocator's cache.
    """
    import torch

    free, total = torch.cuda.mem_get_info(index)
    return int(free), int(total)
