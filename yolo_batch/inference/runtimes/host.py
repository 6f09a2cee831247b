"""The host's facts for :func:`~yolo_batch.inference.runtimes.choice.choose_runtime`: installed runtimes, CPU
instructions, the GPU. An adapter: it reads package metadata, ``/proc/cpuinfo`` and torch; the choice itself is
pure."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import platform
from pathlib import Path
from typing import Any

from yolo_batch.inference.runtimes.choice import NEEDS, HostFacts

log = logging.getLogger(__name__)

# Distribution names that provide each importable package (the first installed one counts).
_DISTRIBUTIONS = {
    "openvino": ("openvino",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "onnx": ("onnx",),
    "onnxslim": ("onnxslim",),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"),
}
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16"})


def installed_packages() -> dict[str, str]:
    """Importable package -> version, for torch and every package an exported runtime needs."""
    import torch

    found = {"torch": torch.__version__.split("+")[0]}
    for package in sorted({p for needs in NEEDS.values() for p in needs}):
        if importlib.util.find_spec(package) is None:
            continue
        for distribution in _DISTRIBUTIONS.get(package, (package,)):
            try:
                found[package] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            found[package] = "unknown"
    return found


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's instruction flags from ``/proc/cpuinfo`` (None where there is no such file)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in {"flags", "Features"}:
            return frozenset(value.split())
    return frozenset()


def _torch_cpu_bf16() -> bool:
    """torch's own answer where ``/proc/cpuinfo`` is missing (macOS, Windows)."""
    import torch

    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def host_facts(device: Any) -> HostFacts:
    """:class:`HostFacts` for a ``torch.device``."""
    import torch

    installed = installed_packages()
    flags = cpu_flags()
    if flags is not None:
        cpu_bf16, cpu_fp16, source = bool(flags & BF16_FLAGS), bool(flags & FP16_FLAGS), "/proc/cpuinfo"
    else:
        cpu_bf16, cpu_fp16, source = _torch_cpu_bf16(), False, "torch"
    gpu_name, nvidia, gpu_bf16 = None, False, False
    if device.type == "cuda":
        gpu_name = torch.cuda.get_device_name(device)
        nvidia = torch.version.cuda is not None and getattr(torch.version, "hip", None) is None
        gpu_bf16 = torch.cuda.get_device_capability(device)[0] >= 8
    providers: tuple[str, ...] = ()
    if "onnxruntime" in installed and device.type == "cuda":
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    return HostFacts(device_type=device.type, machine=platform.machine(), installed=installed, cpu_bf16=cpu_bf16,
                     cpu_fp16=cpu_fp16, gpu_name=gpu_name, gpu_nvidia=nvidia, gpu_bf16=gpu_bf16,
                     onnxruntime_providers=providers, cpu_flags_source=source)
