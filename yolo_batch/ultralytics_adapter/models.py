"""Models: loading them (never downloading), the probe's DetectionModel, and the network prepared for inference.

Inference reaches three names past the public API (see :mod:`.names`): ``YOLO.model`` (the DetectionModel with
``fuse``, ``stride``, ``names``, ``end2end``), ``ultralytics.utils.nms.non_max_suppression`` (what
``DetectionPredictor.postprocess`` calls) and ``ultralytics.data.augment.LetterBox`` (to test our copy).
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import platform
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from yolo_batch.errors import InputError
from yolo_batch.ultralytics_adapter.session import offline, one_line, quiet


def load_model(spec: str) -> Any:
    """Load a detection model from an Ultralytics yaml name or a local ``.pt``, never downloading.

    Raises:
        InputError: unknown yaml, missing or unreadable .pt, or a model that is not a detector.
    """
    check_model_spec(spec)
    with offline() as ultralytics:
        try:
            model = ultralytics.YOLO(str(spec))
        except FileNotFoundError:
            raise InputError(f"unknown model '{spec}': no such Ultralytics yaml or file") from None
        except (RuntimeError, KeyError, TypeError, ValueError, OSError, EOFError, pickle.UnpicklingError) as exc:
            raise InputError(f"cannot load model '{spec}': {without_download_advice(one_line(exc))}") from None
    if model.task != "detect":
        raise InputError(f"model '{spec}' is a {model.task} model; yolo-batch trains detection models")
    return model


def check_model_spec(spec: str) -> None:
    """The checks a model name passes before anything is loaded: a local .pt that exists, or a yaml name.

    Raises:
        InputError: a missing .pt, or a name that is neither.
    """
    path = Path(spec)
    if path.suffix == ".pt":
        if not path.is_file():
            raise InputError(f"model file not found: {spec} (weights are never downloaded; pass a local .pt)")
        check_weights_file(path)
    elif path.suffix not in {".yaml", ".yml"}:
        raise InputError(f"unknown model '{spec}': use an Ultralytics yaml name such as yolo11n.yaml or a local .pt")


_TORCH_SAVE_STARTS = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; the older pickle format


def check_weights_file(path: Path) -> None:
    """A .pt must look like what ``torch.save`` writes before anything loads or exports it: Ultralytics'
    own error for a text file or a truncated archive recommends a command that downloads weights.

    Raises:
        InputError: a file that is not a PyTorch checkpoint, or a zip archive that is cut short.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise InputError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if not head.startswith(_TORCH_SAVE_STARTS):
        raise InputError(f"{path} is not a PyTorch weights file (torch.save writes a zip archive; this file "
                         f"starts with {head!r}): pass a .pt saved by Ultralytics")
    if head.startswith(b"PK"):
        try:
            zipfile.ZipFile(path).close()  # reads the central directory at the end: a cut-short file fails here
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputError(f"{path} is a damaged weights file (truncated or corrupt archive: {exc})") from None


def without_download_advice(message: str) -> str:
    """An Ultralytics load error without its advice to download weights (nothing is downloaded here)."""
    return re.split(r"\s*Recommended fixes", message)[0].strip() or message


def detection_model(model: Any, nc: int, hyp: Mapping[str, Any]) -> Any:
    """A fresh DetectionModel with ``nc`` classes and the run's loss gains, as the trainer builds it: with the
    weights of a model loaded from a .pt transferred (``get_model(weights=...)``), so the AMP check sees them too."""
    with quiet():
        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel

        built = DetectionModel(model.model.yaml, nc=nc, verbose=False)
        if model.ckpt:
            built.load(model.model)
        setattr(built, "args", get_cfg(overrides=dict(hyp)))  # noqa: B010  (nn.Module types its attributes)
    return built


def parameter_count(model: Any) -> int:
    """Parameters of a loaded YOLO model's network (DDP keeps a gradient copy of each in its buckets)."""
    return sum(p.numel() for p in model.model.parameters())


def versions() -> dict[str, str]:
    """Library versions that change memory behaviour (cache key, benchmark records)."""
    import torch

    with offline() as ultralytics:
        return {"ultralytics": ultralytics.__version__, "torch": torch.__version__}


@dataclasses.dataclass(frozen=True)
class InferenceNetwork:
    """A detection network prepared for inference the way Ultralytics' predictor prepares it."""

    module: Any  # fused, eval mode, gradients off, on its device
    stride: int
    names: Mapping[int, str]
    end2end: bool  # NMS-free head: outputs are already (x1, y1, x2, y2, score, class) rows
    device: Any
    half: bool
    channels_last: bool


def inference_network(model: Any, device: Any, half: bool, channels_last: bool | None = None) -> InferenceNetwork:
    """Fuse Conv+BN of a copy of ``model.model``, move it to ``device`` and set its precision and memory format.

    Args:
        model: a YOLO object from :func:`load_model`.
        device: a ``torch.device``.
        half: FP16 weights (ignored on CPU, where Ultralytics also stays FP32).
        channels_last: None follows Ultralytics: on for CUDA and for x86 CPUs with oneDNN.
    """
    import torch

    network = copy.deepcopy(model.model)
    with quiet():
        network = network.fuse(verbose=False) if hasattr(network, "fuse") else network
    half = bool(half) and device.type != "cpu"
    if channels_last is None:
        channels_last = device.type == "cuda" or (
            device.type == "cpu" and platform.machine() in {"AMD64", "x86_64"} and torch.backends.mkldnn.is_available()
        )
    network = network.to(device)
    network = network.half() if half else network.float()
    network = network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for parameter in network.parameters():
        parameter.requires_grad = False
    network.eval()
    stride = max(int(network.stride.max()), 32) if hasattr(network, "stride") else 32
    names = {int(k): str(v) for k, v in dict(getattr(network, "names", {}) or {}).items()}
    return InferenceNetwork(module=network, stride=stride, names=names,
                            end2end=bool(getattr(network, "end2end", False)), device=device, half=half,
                            channels_last=bool(channels_last))


@dataclasses.dataclass(frozen=True)
class PortableModel:
    """A model as a .pt file that every process loads to the same weights, with its letterbox stride."""

    path: Path
    stride: int
    names: dict[int, str]


def portable_model(spec: str, folder: Path) -> PortableModel:
    """``spec`` as a .pt other processes (cluster actors) load identically; a .pt is used as it is.

    A yaml name has random weights: it is built once here and saved into ``folder``, so that every actor runs the
    same random weights instead of drawing its own.

    Raises:
        InputError: unknown or unreadable model.
    """
    from yolo_batch.ultralytics_adapter.settings import model_stride

    model = load_model(spec)
    stride, names = model_stride(model), {int(k): str(v) for k, v in dict(model.names).items()}
    if Path(spec).suffix == ".pt":
        return PortableModel(Path(spec), stride, names)
    target = Path(folder) / (Path(spec).stem + ".pt")
    with offline():
        model.save(str(target))
    return PortableModel(target, stride, names)


def non_max_suppression(raw: Any, conf: float, iou: float, classes: Sequence[int] | None, max_det: int,
                        end2end: bool) -> list[Any]:
    """Ultralytics' own NMS with DetectionPredictor's arguments: per image an (n, 6) tensor (xyxy, score, class)."""
    from ultralytics.utils.nms import non_max_suppression as nms

    # A generous time limit: Ultralytics silently truncates NMS after 2 s + 0.05 s/image, which a loaded CPU can hit.
    return nms(raw, conf, iou, list(classes) if classes else None, False, max_det=max_det, nc=0,
               end2end=end2end, max_time_img=0.5)


def reference_letterbox(image: Any, imgsz: int, stride: int, auto: bool) -> Any:
    """Ultralytics' LetterBox as the predictor builds it (for checking our copy in tests)."""
    with offline():
        from ultralytics.data.augment import LetterBox

        return LetterBox(imgsz, auto=auto, stride=stride)(image=image)
