"""From a :class:`~yolo_batch.inference.runtimes.choice.RuntimeChoice` to a loaded runtime: the export (cached),
then the runtime's hook class."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolo_batch.core.models import content_sha256
from yolo_batch.inference.runtimes.base import ModelInfo, Runtime
from yolo_batch.inference.runtimes.cache import CacheEntry, ExportCache, export_key
from yolo_batch.inference.runtimes.choice import EXTRAS, RuntimeChoice, choose_runtime
from yolo_batch.inference.runtimes.host import host_facts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportRecord:
    """Where a run's export came from (printed in the summary)."""

    location: str  # the cache entry (or a temporary folder for a yaml model)
    artefact: str  # the file or folder the runtime loaded
    cached: bool  # kept in the cache for the next run
    hit: bool  # found there, not exported by this run
    seconds: float  # to export (0 for a hit)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"location": self.location, "artefact": self.artefact, "cached": self.cached, "hit": self.hit,
                "seconds": round(self.seconds, 2),
                "note": self.note}

    def describe(self) -> str:
        if self.hit:
            return f"cached export {self.location}"
        what = f"exported in {self.seconds:.1f} s"
        return f"{what} -> {self.location}" if self.cached else f"{what} ({self.note})"


@dataclass(frozen=True)
class OpenedRuntime:
    runtime: Runtime
    info: ModelInfo
    export: ExportRecord | None


def resolve_runtime(backend: str, precision: str, device: Any) -> RuntimeChoice:
    """:func:`choose_runtime` with this host's facts.

    Raises:
        InputError: an explicit backend or precision that cannot run here.
    """
    choice = choose_runtime(backend, precision, host_facts(device))
    log.info("runtime: %s", choice.describe())
    return choice


def cache_root() -> Path:
    from yolo_batch.training.data import cache_dir

    return cache_dir() / "exports"


def open_runtime(model: str, device: Any, choice: RuntimeChoice, imgsz: int, max_batch: int, streams: int = 1,
                 threads: int = 1, use_cache: bool = True,
                 on_export: Callable[[str], None] | None = None, cache: Path | None = None) -> OpenedRuntime:
    """Load ``model`` on ``choice``'s runtime: torch directly, the others from an export (cached for a .pt).

    Args:
        max_batch: the largest batch the run may use (a TensorRT engine's profile is built for it).
        streams, threads: inference streams calling the runtime at once, and threads for each.
        use_cache: False rebuilds the export (``--no-cache``).
        on_export: told before an export starts (it can take a minute).
        cache: the export cache's folder (None: :func:`cache_root`).

    Raises:
        InputError: unknown model, a missing package, a failed export.
    """
    if choice.backend == "torch":
        from yolo_batch.inference.runtimes.torch import TorchRuntime

        runtime, info = TorchRuntime.load(model, device, choice.precision)
        return OpenedRuntime(runtime, info, None)
    from yolo_batch import ultralytics_adapter

    ultralytics_adapter.check_model_spec(model)  # a missing .pt is one line, before it is hashed
    half = choice.precision == "fp16" and choice.backend != "openvino"  # OpenVINO picks its precision when compiling
    key = export_key(
        weights_sha256=content_sha256(Path(model)) if Path(model).suffix == ".pt" else "",
        imgsz=imgsz, precision="fp16" if half else "fp32",
        batch=f"1-{max_batch}" if choice.backend == "tensorrt" else "dynamic", runtime=choice.backend,
        runtime_version=choice.version, device=_device_key(device, choice.backend), ultralytics=_ultralytics_version())
    device_arg = "cpu" if device.type == "cpu" else str(device.index or 0)
    extra = EXTRAS[choice.backend]

    def build(folder: Path) -> tuple[Path, dict[str, Any]]:
        if on_export is not None:
            on_export(f"exporting {model} to {choice.backend} (imgsz {imgsz}) ...")
        exported = ultralytics_adapter.export_model(model, choice.backend, folder, imgsz, max_batch, half, device_arg,
                                                    extra=extra)
        return exported.path, {"names": {str(k): v for k, v in exported.names.items()}, "stride": exported.stride,
                               "end2end": exported.end2end}

    if key["weights_sha256"]:
        entry = ExportCache(cache or cache_root()).get_or_build(key, build, rebuild=not use_cache)
        record = ExportRecord(location=str(entry.folder), artefact=str(entry.artefact), cached=True, hit=entry.hit,
                              seconds=entry.seconds)
        return OpenedRuntime(_load(choice, entry.artefact, device, streams, threads), _info(entry), record)
    with tempfile.TemporaryDirectory(prefix="yolo-batch-export-") as scratch:
        entry = ExportCache(Path(scratch)).get_or_build(key, build)
        record = ExportRecord(location=str(entry.folder), artefact=str(entry.artefact), cached=False, hit=False,
                              seconds=entry.seconds,
                              note="a yaml model has random weights: exported for this run only, not cached")
        return OpenedRuntime(_load(choice, entry.artefact, device, streams, threads), _info(entry), record)


def _info(entry: CacheEntry) -> ModelInfo:
    meta = entry.meta
    return ModelInfo(names={int(k): str(v) for k, v in meta["names"].items()}, stride=int(meta["stride"]),
                     end2end=bool(meta["end2end"]))


def _load(choice: RuntimeChoice, artefact: Path, device: Any, streams: int, threads: int) -> Runtime:
    if choice.backend == "openvino":
        from yolo_batch.inference.runtimes.openvino import OpenVinoRuntime

        return OpenVinoRuntime(artefact, choice.precision, streams, threads)
    if choice.backend == "onnxruntime":
        from yolo_batch.inference.runtimes.onnxruntime import OnnxRuntime

        return OnnxRuntime(artefact, choice.precision, device, threads)
    if choice.backend == "tensorrt":
        from yolo_batch.inference.runtimes.tensorrt import TensorRtRuntime

        return TensorRtRuntime(artefact, choice.precision, device)
    raise ValueError(f"no runtime named '{choice.backend}'")


def _device_key(device: Any, backend: str) -> str:
    """What an export depends on of the device: nothing for CPU IR and ONNX; the GPU for TensorRT engines."""
    if device.type != "cuda":
        return "cpu"
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm{major}{minor}"


def _ultralytics_version() -> str:
    from yolo_batch import ultralytics_adapter

    return ultralytics_adapter.versions()["ultralytics"]
