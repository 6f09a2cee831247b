"""The trainer's settings that decide memory, resolved by Ultralytics' own rules before the probe runs. Pure.

The probe must train the way the trainer will, or it sizes the batch for a different workload:

* precision: ``amp=True``/``'fp16'`` is float16 autocast with a gradient scaler, but only if Ultralytics' AMP check
  passes on the GPU (it switches AMP off otherwise: about twice the activations); ``'bf16'`` is bfloat16 autocast
  without the check or a scaler; ``False``/``'fp32'`` is full precision;
* ``channels_last``: on for CUDA unless set False (Ultralytics: ``None`` means on, except on Windows);
* ``deterministic`` (default on): Ultralytics sets ``CUBLAS_WORKSPACE_CONFIG`` and deterministic cuDNN when the trainer
  is built; cuBLAS reads that variable once per process, so the probe sets it the same way before its first step;
* ``multi_scale``: batches reach ``imgsz * (1 + multi_scale)`` rounded up to the stride; Ultralytics' own AutoBatch
  sizes for that, and so does the probe;
* ``freeze``: frozen layers keep no gradients or optimizer state;
* ``compile``: the probe runs eagerly (compiling every probe size would take minutes); recorded as a reason;
* ``optimizer=auto``: the optimizer Ultralytics will pick, the heavier one where the batch could tip the choice.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from yolo_batch.training.scaling import auto_optimizer

# Pass-through train arguments that change memory: lifted into the sizing config, still passed to Ultralytics.
MEMORY_ARGS = ("amp", "channels_last", "deterministic", "seed", "multi_scale", "freeze", "compile")


@dataclass(frozen=True)
class TrainerSettings:
    """What the probe trains with (and what the decision cache is keyed on)."""

    imgsz: int  # the size the probe trains at: the largest a batch can have
    precision: str  # "fp16" | "bf16" | "fp32", before the AMP check
    amp_check: bool  # fp16 only: Ultralytics' AMP check decides, on the GPU, whether fp16 stays on
    channels_last: bool
    deterministic: bool
    seed: int
    multi_scale: float
    freeze: tuple[str, ...]  # parameter name fragments Ultralytics freezes ('.dfl' always)
    compile: str | None  # the torch.compile mode the trainer will use; the probe runs eagerly
    optimizer: str  # resolved (never "auto")
    reasons: tuple[str, ...] = ()

    def key(self) -> dict[str, Any]:
        """The fields that decide peak memory (for the decision cache)."""
        out = asdict(self)
        out.pop("reasons")
        out["freeze"] = list(self.freeze)  # as JSON reads it back
        return out


def resolve_trainer_settings(args: Mapping[str, Any], defaults: Mapping[str, Any], *, imgsz: int, amp: bool,
                             optimizer: str, device_type: str, stride: int = 32, n_train: int = 1,
                             nominal_batch: int = 64, epochs: int = 1, nc: int = 80,
                             max_total_batch: int = 1, system: str | None = None) -> TrainerSettings:
    """Resolve the memory-relevant settings as Ultralytics' trainer will.

    Args:
        args: the run's pass-through train arguments (only :data:`MEMORY_ARGS` are read).
        defaults: Ultralytics' defaults for them (``DEFAULT_CFG_DICT``).
        amp: the run's AMP switch (``--set amp=...`` parsed); ``args['amp'] == 'bf16'`` selects bfloat16.
        max_total_batch: the largest total batch the search may choose (for ``optimizer=auto``).
        system: ``platform.system()`` (Windows leaves channels_last off).
    """
    value = {k: args.get(k, defaults.get(k)) for k in MEMORY_ARGS}
    reasons = []
    precision = "bf16" if str(value["amp"]).lower() == "bf16" else ("fp16" if amp else "fp32")
    windows = (system or platform.system()) == "Windows"
    channels_last = device_type == "cuda" and (
        value["channels_last"] is True or (value["channels_last"] is None and not windows))
    multi_scale = float(value["multi_scale"] or 0.0)
    probe_imgsz = imgsz
    if multi_scale > 0:
        probe_imgsz = math.ceil(imgsz * (1 + multi_scale) / stride) * stride
        reasons.append(f"multi_scale={multi_scale:g}: probed at imgsz {probe_imgsz}, the largest size a batch reaches")
    compile_mode = _compile_mode(value["compile"])
    if compile_mode is not None:
        reasons.append(f"compile={compile_mode}: probed eagerly (compiled graphs usually need less activation memory)")
    resolved = optimizer
    if optimizer.lower() == "auto":
        small, _, _ = auto_optimizer(n_train, nominal_batch, nominal_batch, epochs, nc)
        large, _, _ = auto_optimizer(n_train, max(max_total_batch, nominal_batch), nominal_batch, epochs, nc)
        resolved = small if small == large else "AdamW"  # the heavier one where the batch decides
        reasons.append(f"optimizer=auto: probed with {resolved}, Ultralytics' choice for this run"
                       + ("" if small == large else " at some batch sizes (the heavier of the two)"))
    return TrainerSettings(
        imgsz=probe_imgsz, precision=precision, amp_check=precision == "fp16", channels_last=channels_last,
        deterministic=bool(value["deterministic"]), seed=int(value["seed"] or 0), multi_scale=multi_scale,
        freeze=freeze_fragments(value["freeze"]), compile=compile_mode, optimizer=resolved, reasons=tuple(reasons),
    )


def freeze_fragments(freeze: Any) -> tuple[str, ...]:
    """Ultralytics' ``freeze``: an int N freezes layers 0..N-1, a list names layer indices or module names."""
    if isinstance(freeze, bool) or freeze is None:
        layers: list[Any] = []
    elif isinstance(freeze, int):
        layers = list(range(freeze))
    elif isinstance(freeze, (list, tuple)):
        layers = list(freeze)
    else:
        raise ValueError(f"freeze must be an int or a list, got {freeze!r}")
    return (*(f"model.{x}." for x in layers), ".dfl")


def _compile_mode(value: Any) -> str | None:
    if value in (None, False) or str(value).lower() in {"false", "none", ""}:
        return None
    return "default" if value is True or str(value).lower() == "true" else str(value)
