"""Exports through Ultralytics' public ``YOLO.export``, and Ultralytics' own predictor on an export (the benchmark's
peer), never touching the network.

Ultralytics' exporter and its runtime backends call ``check_requirements``, which pip-installs a missing package
(onnx, onnxslim, openvino, tensorrt ...). :func:`no_installs` replaces it, for the duration of a call, with a check
that never installs: a missing package becomes :class:`MissingRequirement` (exit code 2) naming it and the extra
that brings it. Two more names are reached past the public API (see :mod:`.names`): ``check_requirements`` /
``check_tensorrt`` (replaced during calls) and ``BaseBackend.read_metadata`` (what Ultralytics wrote into an export:
names, stride, end2end).
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from yolo_batch.core.telemetry import import_openvino
from yolo_batch.errors import InputError
from yolo_batch.ultralytics_adapter.models import load_model
from yolo_batch.ultralytics_adapter.session import offline, one_line, quiet

# Our runtime name -> Ultralytics' export format.
FORMATS = {"openvino": "openvino", "onnxruntime": "onnx", "tensorrt": "engine"}
# Modules that bind check_requirements / check_tensorrt by name; imported before the guard so none binds it late.
_CHECKING_MODULES = (
    "ultralytics.utils.checks",
    "ultralytics.engine.exporter",
    "ultralytics.utils.export.engine",
    "ultralytics.nn.backends.openvino",
    "ultralytics.nn.backends.onnx",
    "ultralytics.nn.backends.tensorrt",
)


class MissingRequirement(InputError):
    """Ultralytics asked for a package that is not installed (it is never installed at run time)."""


@dataclass(frozen=True)
class Exported:
    """An export on disk and what Ultralytics recorded about it."""

    path: Path  # the artefact: a file (.onnx, .engine) or a folder (OpenVINO IR)
    names: dict[int, str]
    stride: int
    end2end: bool  # NMS-free outputs: rows of (x1, y1, x2, y2, score, class)


@contextlib.contextmanager
def no_installs(extra: str | None = None) -> Iterator[None]:
    """Ultralytics' requirement checks that never install anything, inside the block (restored after, also on error).

    OpenVINO, when it is the runtime, is imported first with its telemetry off (:mod:`yolo_batch.core.telemetry`):
    Ultralytics' exporter and its OpenVINO backend then find it imported.

    Args:
        extra: the yolo-batch extra to name in the message (``openvino``, ``onnx``, ``tensorrt``).
    """
    if extra == "openvino":
        with contextlib.suppress(ImportError):  # not installed: Ultralytics' own check names the extra
            import_openvino()
    with offline():
        for name in _CHECKING_MODULES:
            importlib.import_module(name)
        checks = sys.modules["ultralytics.utils.checks"]
        originals = {"check_requirements": checks.check_requirements, "check_tensorrt": checks.check_tensorrt}
        hint = f"pip install 'yolo-batch[{extra}]'" if extra else "install it with pip"
        replacements = {"check_requirements": _checking_only(originals["check_requirements"], hint),
                        "check_tensorrt": _no_tensorrt_install(hint)}
        patched: list[tuple[ModuleType, str, Any]] = []
        try:
            for module in [m for n, m in list(sys.modules.items()) if n.startswith("ultralytics") and m is not None]:
                for name, original in originals.items():
                    if getattr(module, name, None) is original:
                        setattr(module, name, replacements[name])
                        patched.append((module, name, original))
            yield
        finally:
            for module, name, original in reversed(patched):
                setattr(module, name, original)


def _checking_only(original: Callable[..., bool], hint: str) -> Callable[..., bool]:
    def check_requirements(requirements: Any = (), exclude: Any = (), install: bool = True, cmds: str = "",
                           constrain: Any = ()) -> bool:
        if original(requirements, exclude, install=False, cmds=cmds):
            return True
        wanted = [r if isinstance(r, str) else " or ".join(r) for r in
                  ([requirements] if isinstance(requirements, str) else list(requirements))]
        raise MissingRequirement(f"Ultralytics needs {', '.join(wanted)}, which is not installed (yolo-batch never "
                                 f"installs packages at run time): {hint}")

    return check_requirements


def _no_tensorrt_install(hint: str) -> Callable[..., None]:
    def check_tensorrt(*args: Any, **kwargs: Any) -> None:
        raise MissingRequirement(f"TensorRT is not installed (yolo-batch never installs packages at run time): {hint}")

    return check_tensorrt


def export_model(model: str, runtime: str, folder: Path, imgsz: int, batch: int, half: bool, device: str,
                 extra: str | None = None) -> Exported:
    """Export ``model`` for ``runtime`` into ``folder`` (which the caller owns) with Ultralytics' ``YOLO.export``.

    The weights are copied (a yaml model: saved) into ``folder`` first, so Ultralytics writes its artefacts there
    and nowhere else. Shapes are dynamic: any batch and image size for OpenVINO and ONNX; for TensorRT an
    optimisation profile from (1, 3, 32, 32) to (``batch``, 3, 2 x ``imgsz``, 2 x ``imgsz``) with ``batch`` at
    ``imgsz`` as its optimum, which covers every shape bucket at ``imgsz`` and every batch up to ``batch``.

    Args:
        model: a local .pt or an Ultralytics yaml name (random weights).
        runtime: ``openvino``, ``onnxruntime`` or ``tensorrt``.
        folder: an empty folder.
        imgsz: the long side the model will run at.
        batch: the largest batch (TensorRT's profile; the others trace at batch 1 with a dynamic batch axis).
        half: FP16 weights (``quantize=16``): TensorRT and ONNX on a GPU.
        device: ``cpu`` or a CUDA index.
        extra: the yolo-batch extra to name when a package is missing.

    Raises:
        InputError: unknown model; MissingRequirement: a package the export needs is not installed.
    """
    if runtime not in FORMATS:
        raise ValueError(f"no export format for runtime '{runtime}'")
    source = Path(model)
    local = folder / "model.pt"
    if source.suffix == ".pt":
        load_model(model)  # the same checks and messages as every other load
        shutil.copy(source, local)
    else:
        load_model(model).save(str(local))
    fmt = FORMATS[runtime]
    args: dict[str, Any] = {"format": fmt, "imgsz": imgsz, "dynamic": True, "device": device, "verbose": False,
                            "batch": max(1, batch) if fmt == "engine" else 1,
                            "quantize": 16 if half else None}
    if fmt in {"onnx", "engine"}:
        args["simplify"] = fmt == "onnx"  # TensorRT optimises the graph itself; onnxslim helps ONNX Runtime
    with quiet(), no_installs(extra), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notes, ONNX exporter chatter
        yolo = load_model(str(local))
        try:
            artefact = Path(yolo.export(**args))
        except (RuntimeError, ValueError, AssertionError, TypeError, OSError) as exc:
            raise InputError(f"export to {runtime} failed: {one_line(exc)}") from None
        metadata = _read_metadata(artefact)
    local.unlink(missing_ok=True)  # the export is what the runtime loads; the weights' copy is not needed
    artefact = artefact if artefact.is_absolute() else (Path.cwd() / artefact)
    return Exported(path=artefact, names={int(k): str(v) for k, v in dict(metadata.get("names") or yolo.names).items()},
                    stride=max(int(metadata.get("stride", 32)), 32), end2end=bool(metadata.get("end2end", False)))


def _read_metadata(artefact: Path) -> dict[str, Any]:
    """What Ultralytics wrote into ``artefact`` (names, stride, end2end), with its own type conversions."""
    import ast

    from ultralytics.nn.backends.base import BaseBackend

    metadata = dict(BaseBackend.read_metadata(artefact))
    for key in ("names", "end2end", "args"):
        if isinstance(metadata.get(key), str):
            metadata[key] = ast.literal_eval(metadata[key])
    if isinstance(metadata.get("args"), dict) and metadata["args"].get("nms"):
        metadata["end2end"] = True
    return metadata


def engine_offset(path: Path) -> int:
    """Where the serialized TensorRT engine starts in an Ultralytics ``.engine`` file (after its metadata header)."""
    with offline():
        from ultralytics.nn.backends.base import BaseBackend

        return int(BaseBackend.engine_header(path)[0])


def load_export(path: Path, extra: str | None = None) -> Any:
    """A YOLO object on an export, for Ultralytics' own ``predict`` (the benchmark's peer)."""
    with quiet(), no_installs(extra):
        return importlib.import_module("ultralytics").YOLO(str(path), task="detect")


def predict_stream(yolo: Any, source: str, extra: str | None = None, **args: Any) -> Iterator[Any]:
    """``yolo.predict(source, stream=True, **args)`` with the network and installs guarded for the whole stream."""
    with no_installs(extra):
        yield from yolo.predict(source, stream=True, **args)
