"""Which runtime and precision a run uses: a pure function from the request and the host's facts to a record.

:func:`choose_runtime` takes plain values (what was asked, what the device is, which runtimes are installed,
what the CPU can do: :class:`HostFacts`, gathered by :mod:`.host`) and returns a :class:`RuntimeChoice` that
says what was chosen and why. Asked for explicitly, a runtime or precision that cannot run here is an
:class:`~yolo_batch.errors.InputError` (one line, exit code 2); under ``auto`` the choice falls back and the
reason says so.

* ``--backend auto``: TensorRT on an NVIDIA GPU when installed, else PyTorch; on an x86 CPU OpenVINO when
  installed, else PyTorch.
* ``--precision auto``: fp16 on a GPU; on a CPU bf16 where the CPU has it (OpenVINO's own default there), else
  fp32; then the first of those the chosen runtime runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from yolo_batch.errors import InputError


class BackendName(str, Enum):
    AUTO = "auto"
    TORCH = "torch"
    OPENVINO = "openvino"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Precision(str, Enum):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


BACKENDS = tuple(b.value for b in BackendName)
PRECISIONS = tuple(p.value for p in Precision)

# The pip extra that brings each runtime (and what exporting to it needs).
EXTRAS = {"openvino": "openvino", "onnxruntime": "onnx", "tensorrt": "tensorrt"}
# Python packages each exported runtime needs: to run it, and to export to it through Ultralytics.
NEEDS = {
    "openvino": ("openvino",),
    "onnxruntime": ("onnxruntime", "onnx", "onnxslim"),
    "tensorrt": ("tensorrt", "onnx"),
}
_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}


@dataclass(frozen=True)
class HostFacts:
    """What the machine offers, as plain values (see :func:`yolo_batch.inference.runtimes.host.host_facts`).

    Attributes:
        device_type: ``cpu`` or ``cuda`` (the run's ``--device``).
        machine: ``platform.machine()``.
        installed: Python package -> version, for the packages of :data:`NEEDS` that are installed.
        cpu_bf16: the CPU has bf16 instructions (AVX512-BF16 or AMX-BF16).
        cpu_fp16: the CPU has fp16 arithmetic (AVX512-FP16 or AMX-FP16).
        gpu_name: the CUDA device's name (None on CPU).
        gpu_nvidia: the CUDA device is an NVIDIA GPU (TensorRT needs one; ROCm builds also say ``cuda``).
        gpu_bf16: the GPU computes in bf16 (compute capability 8.0+).
        onnxruntime_providers: ONNX Runtime's execution providers (``CUDAExecutionProvider`` for a GPU).
        cpu_flags_source: where the CPU flags came from (for the record).
    """

    device_type: str
    machine: str = "x86_64"
    installed: Mapping[str, str] = field(default_factory=dict)
    cpu_bf16: bool = False
    cpu_fp16: bool = False
    gpu_name: str | None = None
    gpu_nvidia: bool = False
    gpu_bf16: bool = False
    onnxruntime_providers: tuple[str, ...] = ()
    cpu_flags_source: str = "/proc/cpuinfo"

    @property
    def on_gpu(self) -> bool:
        return self.device_type == "cuda"

    @property
    def x86(self) -> bool:
        return self.machine.lower() in _X86

    def to_dict(self) -> dict[str, Any]:
        return {"device_type": self.device_type, "machine": self.machine, "installed": dict(self.installed),
                "cpu_bf16": self.cpu_bf16, "cpu_fp16": self.cpu_fp16, "gpu_name": self.gpu_name,
                "gpu_bf16": self.gpu_bf16, "onnxruntime_providers": list(self.onnxruntime_providers)}


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime and precision a run uses, what was asked, and why."""

    backend: str
    precision: str
    requested_backend: str
    requested_precision: str
    reason: str
    version: str  # the runtime's own version (torch's for the torch backend)

    @property
    def exported(self) -> bool:
        """Whether the model runs from an export (every runtime but torch)."""
        return self.backend != BackendName.TORCH.value

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision, "requested_backend": self.requested_backend,
                "requested_precision": self.requested_precision, "reason": self.reason, "version": self.version}

    def describe(self) -> str:
        return f"{self.backend} {self.version}, {self.precision} ({self.reason})"


def check_names(backend: str, precision: str) -> None:
    """``--backend`` and ``--precision`` are names we know (whether they run here is :func:`choose_runtime`'s call).

    Raises:
        InputError: an unknown name.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")


def unavailable(backend: str, facts: HostFacts) -> str | None:
    """Why ``backend`` cannot run here, or None when it can."""
    if backend == BackendName.TORCH.value:
        return None
    missing = [p for p in NEEDS[backend] if p not in facts.installed]
    if missing:
        return (f"{backend} is not installed (missing {', '.join(missing)}): "
                f"pip install 'yolo-batch[{EXTRAS[backend]}]'")
    if backend == BackendName.OPENVINO.value and facts.on_gpu:
        return "openvino runs on the CPU here: use --device cpu"
    if backend == BackendName.TENSORRT.value and not (facts.on_gpu and facts.gpu_nvidia):
        return "tensorrt needs an NVIDIA GPU (--device 0)" + ("" if facts.on_gpu else "; this run is on the CPU")
    if (backend == BackendName.ONNXRUNTIME.value and facts.on_gpu
            and "CUDAExecutionProvider" not in facts.onnxruntime_providers):
        return "onnxruntime has no CUDA provider here: pip install onnxruntime-gpu, or use --device cpu"
    return None


def precisions(backend: str, facts: HostFacts) -> dict[str, str | None]:
    """Each concrete precision -> None when ``backend`` runs it here, else why not."""
    no_bf16_cpu = "bf16 needs a CPU with AVX512-BF16 or AMX (this one has neither)"
    no_fp16_cpu = "fp16 on a CPU needs AVX512-FP16 or AMX-FP16 (this one has neither)"
    if facts.on_gpu:
        gpu_bf16 = None if facts.gpu_bf16 else "bf16 needs a GPU of compute capability 8.0 or newer"
        table: dict[str, dict[str, str | None]] = {
            "torch": {"fp32": None, "fp16": None, "bf16": gpu_bf16},
            "onnxruntime": {"fp32": None, "fp16": None, "bf16": "onnxruntime exports run fp32 or fp16"},
            "tensorrt": {"fp32": None, "fp16": None, "bf16": "TensorRT engines are built fp32 or fp16 here"},
            "openvino": {"fp32": None, "fp16": None, "bf16": None},
        }
    else:
        bf16 = None if facts.cpu_bf16 else no_bf16_cpu
        table = {
            "torch": {"fp32": None, "fp16": "torch runs fp32 or bf16 on a CPU (fp16 kernels are slow there)",
                      "bf16": bf16},
            "openvino": {"fp32": None, "fp16": None if facts.cpu_fp16 else no_fp16_cpu, "bf16": bf16},
            "onnxruntime": {"fp32": None, "fp16": "onnxruntime runs fp32 on a CPU",
                            "bf16": "onnxruntime runs fp32 on a CPU"},
            "tensorrt": {"fp32": None, "fp16": None, "bf16": None},
        }
    return table[backend]


def _auto_order(facts: HostFacts) -> list[str]:
    if facts.on_gpu:
        return ["tensorrt", "torch"]
    return ["openvino", "torch"] if facts.x86 else ["torch"]


def _preferred_precisions(facts: HostFacts) -> list[str]:
    if facts.on_gpu:
        return ["fp16", "fp32"]
    return ["bf16", "fp32"] if facts.cpu_bf16 else ["fp32"]


def choose_runtime(backend: str, precision: str, facts: HostFacts) -> RuntimeChoice:
    """The runtime and precision for a run (see the module docstring).

    Args:
        backend: one of :data:`BACKENDS`.
        precision: one of :data:`PRECISIONS`.
        facts: the host, as plain values.

    Raises:
        InputError: an unknown name, or an explicit backend or precision that cannot run here.
    """
    check_names(backend, precision)
    notes: list[str] = []
    if backend != BackendName.AUTO.value:
        why = unavailable(backend, facts)
        if why is not None:
            raise InputError(f"--backend {backend}: {why}")
        chosen = backend
        notes.append("as requested")
    else:
        chosen = ""
        for candidate in _auto_order(facts):
            why = unavailable(candidate, facts)
            if why is None and precision != "auto" and precisions(candidate, facts)[precision] is not None:
                why = precisions(candidate, facts)[precision]
            if why is None:
                chosen = candidate
                break
            notes.append(f"not {candidate}: {why}")
        if not chosen:  # only an explicit precision nothing here runs can get here (torch is always installed)
            raise InputError(f"--precision {precision}: {precisions('torch', facts)[precision]}")
        notes.append(f"auto: {chosen} is the fastest runtime installed for a {'GPU' if facts.on_gpu else 'CPU'}")
    table = precisions(chosen, facts)
    if precision != Precision.AUTO.value:
        if table[precision] is not None:
            raise InputError(f"--precision {precision} with {chosen}: {table[precision]}")
        final = precision
    else:
        final = next(p for p in [*_preferred_precisions(facts), "fp32"] if table[p] is None)
        if final == "bf16":
            notes.append("precision auto: bf16, this CPU has bf16 instructions")
        elif final == "fp16":
            notes.append("precision auto: fp16 on a GPU")
        else:
            skipped = [p for p in _preferred_precisions(facts) if p != "fp32"]
            notes.append("precision auto: fp32" + (f" ({chosen} does not run {skipped[0]} here)" if skipped else ""))
    version = facts.installed.get(chosen, facts.installed.get("torch", "?"))
    return RuntimeChoice(backend=chosen, precision=final, requested_backend=backend, requested_precision=precision,
                         reason="; ".join(notes), version=version)
