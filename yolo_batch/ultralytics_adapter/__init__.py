"""Everything that touches Ultralytics lives here.

Public API first (``YOLO``, ``model.train``, ``add_callback``, ``get_cfg``, ``check_det_dataset``).
Two internals are patched, both only to keep runs offline, both checked by
``tests/test_ultralytics_adapter.py`` so an Ultralytics upgrade that moves them fails loudly:

* ``check_font`` (in ``ultralytics.utils.checks`` and where it is imported by name: ``utils.plotting``,
  ``data.utils``): would fetch Arial.ttf; we hand it the user's copy or matplotlib's DejaVu Sans.
* ``ultralytics.engine.trainer.check_amp``: would download yolo26n.pt; we check AMP without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from yolo_batch.errors import InputError

log = logging.getLogger(__name__)

# Ultralytics' own list of GPUs whose AMP gives NaN losses (ultralytics.utils.checks.check_amp).
_AMP_BROKEN_GPUS = re.compile(
    r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)", re.IGNORECASE
)
_GUARD_MARK = "_yolo_batch_offline"


def import_ultralytics() -> ModuleType:
    """Import Ultralytics in offline mode with the offline guards installed."""
    # Must be set before the first import: Ultralytics probes DNS and reads settings at import time.
    os.environ["YOLO_OFFLINE"] = "1"
    import ultralytics

    install_offline_guards()
    return ultralytics


def install_offline_guards() -> None:
    """Replace the two Ultralytics helpers that download at run time (idempotent)."""
    from ultralytics.data import utils as data_utils
    from ultralytics.engine import trainer
    from ultralytics.utils import checks, plotting

    for module in (checks, plotting, data_utils):
        if not getattr(module.check_font, _GUARD_MARK, False):
            module.check_font = _mark(_local_font)
    if not getattr(trainer.check_amp, _GUARD_MARK, False):
        trainer.check_amp = _mark(_offline_check_amp(trainer.check_amp))


def _mark(fn: Callable[..., Any]) -> Callable[..., Any]:
    setattr(fn, _GUARD_MARK, True)
    return fn


def _local_font(font: str = "Arial.ttf") -> Path:
    """A font that is already on disk: the user's copy if present, else matplotlib's DejaVu Sans."""
    from matplotlib import font_manager
    from ultralytics.utils import USER_CONFIG_DIR

    own = USER_CONFIG_DIR / Path(font).name
    if own.exists():
        return own
    return Path(font_manager.findfont("DejaVu Sans", fallback_to_default=True))


def _offline_check_amp(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def check_amp(model: Any) -> bool:
        import torch
        from ultralytics.utils import WEIGHTS_DIR

        device = next(model.parameters()).device
        if device.type != "cuda" or (WEIGHTS_DIR / "yolo26n.pt").is_file():
            return original(model)  # no download happens on these paths
        if _AMP_BROKEN_GPUS.search(torch.cuda.get_device_name(device)):
            log.warning("AMP disabled: %s is known to give NaN losses under AMP", torch.cuda.get_device_name(device))
            return False
        return amp_forward_matches(model)

    return check_amp


def amp_forward_matches(model: Any, imgsz: int = 256) -> bool:
    """Compare an fp32 and an autocast forward of ``model`` itself (no reference weights needed)."""
    import torch

    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(0)
    image = torch.rand(2, 3, imgsz, imgsz, generator=generator).to(device)
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            full = _first_tensor(model(image)).float()
            with torch.autocast(device_type=device.type, enabled=True):
                mixed = _first_tensor(model(image)).float()
    finally:
        model.train(was_training)
    if not torch.isfinite(mixed).all():
        return False
    scale = full.abs().max().clamp(min=1.0)
    return bool(((full - mixed).abs().max() / scale) < 0.05)


def _first_tensor(output: Any) -> Any:
    while isinstance(output, (list, tuple)):
        output = output[0]
    return output


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Ultralytics' logger, which writes to stdout (``--json`` output must stay clean, and its
    key check prints the whole CLI help before raising)."""
    import_ultralytics()  # importing configures the logger, which would undo a level set before it
    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def one_line(exc: BaseException) -> str:
    """An Ultralytics error message as one clean line (no emojis, no trailing help)."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return re.sub(r"[^\x00-\x7F]+", "", text).strip() or type(exc).__name__


def load_model(spec: str) -> Any:
    """Load a detection model from an Ultralytics yaml name or a local ``.pt``, never downloading.

    Raises:
        InputError: unknown yaml, missing or unreadable .pt, or a model that is not a detector.
    """
    ultralytics = import_ultralytics()
    path = Path(spec)
    if path.suffix == ".pt":
        if not path.is_file():
            raise InputError(f"model file not found: {spec} (weights are never downloaded; pass a local .pt)")
    elif path.suffix not in {".yaml", ".yml"}:
        raise InputError(f"unknown model '{spec}': use an Ultralytics yaml name such as yolo11n.yaml or a local .pt")
    try:
        model = ultralytics.YOLO(str(spec))
    except FileNotFoundError:
        raise InputError(f"unknown model '{spec}': no such Ultralytics yaml or file") from None
    except (RuntimeError, KeyError, TypeError, ValueError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise InputError(f"cannot load model '{spec}': {one_line(exc)}") from None
    if model.task != "detect":
        raise InputError(f"model '{spec}' is a {model.task} model; yolo-batch trains detection models")
    return model


def check_dataset(data: str | Path) -> dict[str, Any]:
    """Validate a local data yaml the way Ultralytics will read it (never downloading).

    Raises:
        InputError: missing file, malformed yaml, missing keys or image folders.
    """
    path = Path(data)
    if not path.is_file():
        raise InputError(f"data yaml not found: {data}")
    try:
        content = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"malformed data yaml {data}: {one_line(exc)}") from None
    if not isinstance(content, dict):
        raise InputError(f"malformed data yaml {data}: expected a mapping with train, val and names")
    import_ultralytics()
    from ultralytics.data.utils import check_det_dataset

    try:
        with quiet():
            return check_det_dataset(str(path.resolve()), autodownload=False)
    except (SyntaxError, TypeError, ValueError, FileNotFoundError, AssertionError, KeyError) as exc:
        raise InputError(f"invalid data yaml {data}: {one_line(exc)}") from None


def validate_train_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Check pass-through training arguments with Ultralytics' own rules; its message becomes one line.

    Raises:
        InputError: an unknown key or a value of the wrong type or range.
    """
    import_ultralytics()
    from ultralytics.cfg import check_dict_alignment, get_cfg
    from ultralytics.utils import DEFAULT_CFG_DICT

    values = dict(args)
    try:
        with quiet():
            check_dict_alignment(DEFAULT_CFG_DICT, values)
            get_cfg(overrides=values)
    except (SyntaxError, TypeError, ValueError) as exc:
        raise InputError(one_line(exc)) from None
    return values


def detection_model(model: Any, nc: int, hyp: Mapping[str, Any]) -> Any:
    """A fresh DetectionModel with ``nc`` classes and the run's loss gains, as the trainer builds it."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    with quiet():
        built = DetectionModel(model.model.yaml, nc=nc, verbose=False)
    built.args = get_cfg(overrides=dict(hyp))
    return built


def train(model: Any, overrides: Mapping[str, Any], on_start: Callable[[Any], None] | None = None) -> Any:
    """Run ``model.train(**overrides)``; ``on_start(trainer)`` fires before the first epoch.

    Returns:
        The trainer, whose ``save_dir`` holds the run.
    """
    if on_start is not None:
        model.add_callback("on_pretrain_routine_end", on_start)
    model.train(**dict(overrides))
    return model.trainer


def versions() -> dict[str, str]:
    """Library versions that change memory behaviour (cache key, benchmark records)."""
    import torch

    ultralytics = import_ultralytics()
    return {"ultralytics": ultralytics.__version__, "torch": torch.__version__}


# --- Inference (yolo_batch.inference) ------------------------------------------------------------------------------
# Three more reaches past the public API, checked by tests/test_inference_adapter.py: ``YOLO.model`` (the
# DetectionModel with ``fuse``, ``stride``, ``names``, ``end2end``), ``ultralytics.utils.nms.non_max_suppression``
# (what DetectionPredictor.postprocess calls) and ``ultralytics.data.augment.LetterBox`` (only to check our copy).


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
    import copy
    import platform

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


def non_max_suppression(raw: Any, conf: float, iou: float, classes: Sequence[int] | None, max_det: int,
                        end2end: bool) -> list[Any]:
    """Ultralytics' own NMS with DetectionPredictor's arguments: per image an (n, 6) tensor (xyxy, score, class)."""
    from ultralytics.utils.nms import non_max_suppression as nms

    # A generous time limit: Ultralytics silently truncates NMS after 2 s + 0.05 s/image, which a loaded CPU can hit.
    return nms(raw, conf, iou, list(classes) if classes else None, False, max_det=max_det, nc=0,
               end2end=end2end, max_time_img=0.5)


def reference_letterbox(image: Any, imgsz: int, stride: int, auto: bool) -> Any:
    """Ultralytics' LetterBox as the predictor builds it (for checking our copy in tests)."""
    import_ultralytics()
    from ultralytics.data.augment import LetterBox

    return LetterBox(imgsz, auto=auto, stride=stride)(image=image)


# --- Deep images for training (yolo_batch.core.images) ------------------------------------------------------------------
# One more reach past the public API, checked by tests/test_images.py: ``ultralytics.data.base.imread``, the name
# through which BaseDataset.load_image (and its RAM/disk caches) reads every training and validation image.
# Ultralytics keeps the high byte of 16-bit images; ours scales them (and float TIFFs) with images.to_uint8.

_DEEP_SUFFIXES = (".png", ".tif", ".tiff")  # the formats that carry more than 8 bits per sample in practice


class DeepImageReader:
    """Ultralytics' ``imread``, except that PNG and TIFF images deeper than 8 bits are scaled to 8 bits by their own
    range (or ``window``) instead of keeping the high byte. 8-bit images go to Ultralytics' reader untouched."""

    def __init__(self, original: Callable[..., Any], window: tuple[float, float] | None = None) -> None:
        self.original = original
        self.window = window

    def __call__(self, filename: str | Path, flags: int | None = None) -> Any:
        import cv2
        import numpy as np

        from yolo_batch.core.images import png_bit_depth, to_uint8

        flags = cv2.IMREAD_COLOR if flags is None else flags
        name = str(filename)
        if not name.lower().endswith(_DEEP_SUFFIXES):
            return self.original(filename, flags=flags)
        try:
            with open(name, "rb") as f:
                header = f.read(26)
                if name.lower().endswith(".png") and (png_bit_depth(header) or 8) <= 8:
                    return self.original(filename, flags=flags)  # the common case: one header read, one decode
                data = np.frombuffer(header + f.read(), np.uint8)
        except OSError:
            return self.original(filename, flags=flags)  # missing or unreadable: Ultralytics reports it its own way
        raw = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None  # first page of a TIFF
        if raw is None or raw.dtype == np.uint8:
            return self.original(filename, flags=flags)
        channels = {cv2.IMREAD_GRAYSCALE: 1, cv2.IMREAD_COLOR: 3}.get(flags)
        image = to_uint8(raw, self.window, channels)
        return image[..., None] if image.ndim == 2 else image  # Ultralytics' reader always returns 3 dimensions


@contextlib.contextmanager
def deep_image_reader(window: tuple[float, float] | None = None) -> Iterator[DeepImageReader]:
    """Read training images through :class:`DeepImageReader` inside the block; Ultralytics' reader is restored after.

    Install it before ``model.train``: dataloader workers fork when the loader is built and keep what they saw.
    """
    import_ultralytics()
    from ultralytics.data import base

    original = base.imread
    reader = DeepImageReader(getattr(original, "original", original), window)
    base.imread = reader
    try:
        yield reader
    finally:
        base.imread = original


class DeepImagesInWorkers:
    """A do-nothing trainer callback that carries the reader into DDP workers.

    Ultralytics pickles the model's callbacks into each DDP worker process; unpickling this object installs
    :class:`DeepImageReader` there (for the whole worker process, which only trains), before the worker builds
    its datasets. In the process that called ``model.train`` it does nothing: :func:`deep_image_reader` is active.
    """

    event = "on_pretrain_routine_start"

    def __init__(self, window: tuple[float, float] | None = None) -> None:
        self.window = window

    def __call__(self, trainer: Any) -> None:
        pass

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return _install_in_worker, (self.window,)


def _install_in_worker(window: tuple[float, float] | None) -> DeepImagesInWorkers:
    import_ultralytics()
    from ultralytics.data import base

    if not isinstance(base.imread, DeepImageReader):
        base.imread = DeepImageReader(base.imread, window)
    return DeepImagesInWorkers(window)
