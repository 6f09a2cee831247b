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


class DevicePeak:
    """The peak device-level use of GPU ``index`` (total minus CUDA's free: every process's, this one's context and
    what sits outside torch's allocator included), sampled on a thread every ``every_s`` while the block runs."""

    def __init__(self, index: int, every_s: float = 0.02) -> None:
        import threading

        self.index = index
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="device-peak", daemon=True)

    def _sample(self) -> None:
        while True:
            free, total = mem_get_info(self.index)
            self.peak = max(self.peak, total - free)
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> DevicePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
