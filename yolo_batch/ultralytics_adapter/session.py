"""Calls into Ultralytics happen inside :func:`offline`: its guards apply for the call and are restored after.

Ultralytics reaches the network in three places a yolo-batch run can hit, and all three are switched off only
while a call into Ultralytics is in progress:

* ``YOLO_OFFLINE=1`` in the environment, read when Ultralytics is first imported (no DNS probe, no update check
  or telemetry) and inherited by the DDP worker processes it starts. A value the user set is left as it is; one
  we set is removed again when the last call ends.
* ``check_font`` (in ``ultralytics.utils.checks`` and where it is imported by name: ``utils.plotting``,
  ``data.utils``) would download Arial.ttf: the user's copy or matplotlib's DejaVu Sans is handed back instead.
* ``ultralytics.engine.trainer.check_amp`` would download yolo26n.pt: the AMP check compares an fp32 and an
  autocast forward pass of the model being trained instead (:func:`amp_forward_matches`).

One more replacement is not about the network: while a call runs, ``ultralytics.utils.SETTINGS`` is a copy
with ``raytune`` off, because with Ray installed (yolo-batch's ``ray`` extra) Ultralytics would import Ray
Tune into every training run to report to a tuning session yolo-batch never starts. The user's settings file
is not touched (Ultralytics' SETTINGS writes itself to disk on every change).

Calls may nest and run on several threads (the service loads its model while requests are answered), so the
guards are counted: the first call in applies them, the last one out restores Ultralytics' own functions.
Importing Ultralytics has side effects of its own (OpenCV's thread count, print options, a settings file under
``~/.config/Ultralytics``); those are Ultralytics', made once at its first import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from yolo_batch.ultralytics_adapter.names import check_dependencies

log = logging.getLogger(__name__)

OFFLINE_ENV = "YOLO_OFFLINE"
_FONT_MODULES = ("ultralytics.utils.checks", "ultralytics.utils.plotting", "ultralytics.data.utils")
_AMP_MODULE = "ultralytics.engine.trainer"
# Ultralytics' own list of GPUs whose AMP gives NaN losses (ultralytics.utils.checks.check_amp).
_AMP_BROKEN_GPUS = re.compile(
    r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)", re.IGNORECASE
)


class _Guards:
    """The offline guards, applied while at least one call is inside :func:`offline`."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._restore: list[Callable[[], None]] = []

    @property
    def active(self) -> bool:
        with self._lock:
            return self._depth > 0

    def enter(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._apply()
            self._depth += 1

    def exit(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                restore, self._restore = self._restore, []
                for undo in reversed(restore):
                    undo()

    def _apply(self) -> None:
        if OFFLINE_ENV not in os.environ:
            os.environ[OFFLINE_ENV] = "1"
            self._restore.append(_unset_offline_env)
        import importlib

        import ultralytics  # noqa: F401  (first import: reads YOLO_OFFLINE)

        check_dependencies()
        for name in _FONT_MODULES:
            self._replace(importlib.import_module(name), "check_font", local_font)
        trainer = importlib.import_module(_AMP_MODULE)
        self._replace(trainer, "check_amp", _offline_check_amp(trainer.check_amp))
        utils = importlib.import_module("ultralytics.utils")
        self._replace(utils, "SETTINGS", {**utils.SETTINGS, "raytune": False})

    def _replace(self, module: ModuleType, name: str, replacement: Any) -> None:
        original = getattr(module, name)
        setattr(module, name, replacement)
        self._restore.append(lambda: setattr(module, name, original))


def _unset_offline_env() -> None:
    os.environ.pop(OFFLINE_ENV, None)


_GUARDS = _Guards()


@contextlib.contextmanager
def offline() -> Iterator[ModuleType]:
    """Ultralytics, imported offline, with the download guards applied for the duration of the block."""
    _GUARDS.enter()
    try:
        import ultralytics

        yield ultralytics
    finally:
        _GUARDS.exit()


def guards_active() -> bool:
    """Whether a call is inside :func:`offline` right now (tests)."""
    return _GUARDS.active


def hold_offline_for_process() -> None:
    """Apply the guards for the rest of this process: for DDP worker processes, which only train."""
    _GUARDS.enter()


def import_ultralytics() -> ModuleType:
    """Ultralytics, imported offline (its first import reads ``YOLO_OFFLINE``); no guard stays applied."""
    with offline() as ultralytics:
        return ultralytics


def local_font(font: str = "Arial.ttf") -> Path:
    """A font that is already on disk: the user's copy if present, else matplotlib's DejaVu Sans."""
    from matplotlib import font_manager
    from ultralytics.utils import USER_CONFIG_DIR

    own = Path(USER_CONFIG_DIR) / Path(font).name
    if own.exists():
        return own
    return Path(font_manager.findfont("DejaVu Sans", fallback_to_default=True))


def _offline_check_amp(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def check_amp(model: Any) -> bool:
        import torch
        from ultralytics.utils import WEIGHTS_DIR

        device = next(model.parameters()).device
        if device.type != "cuda" or (Path(WEIGHTS_DIR) / "yolo26n.pt").is_file():
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
    key check prints the whole CLI help before raising); its level is restored after."""
    with offline():  # importing configures the logger, which would undo a level set before it
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
