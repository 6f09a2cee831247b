"""Which devices a run uses: parsed once from ``--device`` into a typed selection."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from yolo_batch.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceSelection:
    """CPU, or one or more CUDA devices by index."""

    cuda: tuple[int, ...]  # empty means CPU

    @property
    def is_cpu(self) -> bool:
        return not self.cuda

    @property
    def world_size(self) -> int:
        """Processes Ultralytics will train with (DDP when above 1)."""
        return max(len(self.cuda), 1)

    def as_ultralytics(self) -> str:
        """The ``device=`` value Ultralytics expects: ``cpu`` or ``0,1``."""
        return "cpu" if self.is_cpu else ",".join(str(i) for i in self.cuda)

    def __str__(self) -> str:
        return self.as_ultralytics()


def parse_device(text: str | None, cuda_count: int) -> DeviceSelection:
    """Parse ``--device`` (``cpu``, ``0``, ``0,1``, ``cuda:0``; None picks GPU 0 when present, else CPU).

    Args:
        text: the user's value.
        cuda_count: CUDA devices this process can see (``torch.cuda.device_count()``).

    Raises:
        InputError: unknown device names and indices that do not exist here.
    """
    if text is None or text.strip() == "":
        return DeviceSelection(cuda=(0,) if cuda_count > 0 else ())
    value = text.strip().lower()
    if value == "cpu":
        return DeviceSelection(cuda=())
    value = value.replace("cuda:", "")
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise InputError(f"unknown device '{text}': use 'cpu', a CUDA index such as '0', or a list such as '0,1'")
    indices = tuple(int(p) for p in parts)
    if len(set(indices)) != len(indices):
        raise InputError(f"device '{text}' lists a GPU twice")
    missing = [i for i in indices if i >= cuda_count]
    if missing:
        seen = f"{cuda_count} CUDA device(s)" if cuda_count else "no CUDA device"
        raise InputError(f"unknown device '{text}': this machine has {seen}")
    return DeviceSelection(cuda=indices)


DEFAULT_MEMORY_FRACTION = 0.90  # of the memory free to us: training budgets and inference limits alike


def inference_device(text: str | None, half: bool | None) -> tuple[Any, bool]:
    """``--device`` and ``--half`` for inference, resolved once: one ``torch.device`` and whether FP16 applies.

    ``half`` None means FP16 on a GPU; on a CPU FP16 never applies (PyTorch CPU inference runs in FP32), and an
    explicit ``--half`` there is ignored with a warning.

    Raises:
        InputError: unknown device, or more than one GPU (inference runs on one device).
    """
    import torch

    selection = parse_device(text, torch.cuda.device_count())
    if selection.world_size > 1:
        raise InputError(f"inference runs on one device; got '{text}' (start one run per GPU)")
    device = torch.device("cpu") if selection.is_cpu else torch.device("cuda", selection.cuda[0])
    if device.type == "cpu":
        if half:
            log.warning("--half ignored on CPU: PyTorch CPU inference runs in FP32")
        return device, False
    return device, True if half is None else bool(half)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block (None: leave it) and restore it after, also on error.

    The count is process-wide in torch, so it is scoped to the call that needs it.
    """
    import torch

    if count is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def available_host_bytes() -> int:
    """Host memory a new allocation can get without swapping: ``MemAvailable`` (free plus reclaimable cache),
    else free pages where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return 8 << 30  # unknown: assume a small machine
