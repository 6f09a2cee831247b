"""Training through Ultralytics: ``model.train`` with our callbacks, offline, and with 16-bit images read right.

One more reach past the public API (see :mod:`.names`): ``ultralytics.data.base.imread``, the name through which
``BaseDataset.load_image`` (and its RAM/disk caches) reads every training and validation image. Ultralytics keeps
the high byte of 16-bit images; :class:`DeepImageReader` scales them (and float TIFFs) with
:func:`yolo_batch.core.images.to_uint8`. It is installed for the duration of the training call.

Multi-GPU runs train in DDP worker processes that Ultralytics starts and hands the model's callbacks to
(pickled). :class:`WorkerSetup` is such a callback: unpickling it in a worker applies the offline guards and the
reader there, for the worker's whole life (a worker only trains).
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yolo_batch.errors import YoloBatchError
from yolo_batch.ultralytics_adapter.session import (
    hold_offline_for_process,
    offline,
    quiet,
)

if TYPE_CHECKING:  # imported when training starts: trainer_control imports training/, which imports this module
    from yolo_batch.ultralytics_adapter.trainer_control import BatchControl

Window = tuple[float, float]
TrainerCallback = tuple[str, Callable[[Any], None]]  # (Ultralytics event name, callback(trainer))
# An event of our own, run in every training process before the model is moved, compiled and wrapped in DDP
# (:class:`BeforeWrapHook`); registering a callback for it makes :func:`train` use a trainer that runs it.
BEFORE_DDP_WRAP = "yolo_batch_before_ddp_wrap"

_DEEP_SUFFIXES = (".png", ".tif", ".tiff")  # the formats that carry more than 8 bits per sample in practice


class WorkersFailed(YoloBatchError):
    """The worker processes of a multi-GPU run exited with an error (their output is above it)."""

    def __init__(self, save_dir: Path, returncode: int) -> None:
        super().__init__(f"multi-GPU training failed (worker exit code {returncode}); its output is above")
        self.save_dir = save_dir
        self.returncode = returncode


def train(model: Any, overrides: Mapping[str, Any], *, callbacks: Sequence[TrainerCallback] = (),
          image_window: Window | None = None, control: BatchControl | None = None) -> Any:
    """Run ``model.train(**overrides)`` with ``callbacks`` registered, offline, reading 16-bit images by their range
    (or ``image_window``); with ``control``, on a trainer whose batch can change during training
    (:mod:`.trainer_control`: OOM recovery, batch schedules).

    Returns:
        The trainer, whose ``save_dir`` holds the run.

    Raises:
        WorkersFailed: a multi-GPU run's workers failed (what they recorded is in the run folder).
    """
    from yolo_batch.ultralytics_adapter.controlled_trainer import install

    setup = WorkerSetup(image_window)
    model.add_callback(setup.event, setup)
    trainer_class = install(model, control) if control is not None else None
    for event, callback in callbacks:
        model.add_callback(event, callback)
    try:
        with offline(), deep_image_reader(image_window):
            if any(event == BEFORE_DDP_WRAP for event, _ in callbacks):
                trainer_class = before_wrap_trainer(trainer_class or model.task_map[model.task]["trainer"])
            model.train(trainer=trainer_class, **dict(overrides))
    except subprocess.CalledProcessError as exc:  # Ultralytics' DDP launcher: the workers failed
        raise WorkersFailed(Path(model.trainer.save_dir), exc.returncode) from None
    return model.trainer


class BeforeWrapHook:
    """Mixed in over the task's trainer (:func:`before_wrap_trainer`): runs the ``BEFORE_DDP_WRAP`` callbacks in every
    process once ``setup_model`` has the model, the first step of ``_setup_train``, before the model is moved to the
    device, compiled and wrapped in DistributedDataParallel. PyTorch requires SyncBatchNorm to be in place before
    DDP wraps the model, and Ultralytics has no callback there."""

    def setup_model(self) -> Any:
        checkpoint = super().setup_model()  # type: ignore[misc]
        self.run_callbacks(BEFORE_DDP_WRAP)  # type: ignore[attr-defined]
        return checkpoint


@functools.cache
def before_wrap_trainer(base: type) -> type:
    """``base`` (the task's trainer class) with :class:`BeforeWrapHook`. Made at run time because Ultralytics is
    imported lazily; multi-GPU runs pickle it by value (cloudpickle) into the workers, where the hook runs too."""
    return type(f"BeforeWrap{base.__name__}", (BeforeWrapHook, base), {})
# Ultralytics' names for a detection run's validation metrics -> ours.
_METRIC_NAMES = {"metrics/precision(B)": "precision", "metrics/recall(B)": "recall", "metrics/mAP50(B)": "map50",
                 "metrics/mAP50-95(B)": "map50_95"}


def final_metrics(trainer: Any) -> dict[str, float]:
    """The run's last validation (after training: Ultralytics' final validation of best.pt) as
    ``precision``, ``recall``, ``map50`` and ``map50_95``; empty when none ran in this process (DDP)."""
    metrics = trainer.metrics if isinstance(getattr(trainer, "metrics", None), dict) else {}
    return {ours: float(metrics[theirs]) for theirs, ours in _METRIC_NAMES.items() if theirs in metrics}


class DeepImageReader:
    """Ultralytics' ``imread``, except that PNG and TIFF images deeper than 8 bits are scaled to 8 bits by their own
    range (or ``window``) instead of keeping the high byte. 8-bit images go to Ultralytics' reader untouched."""

    def __init__(self, original: Callable[..., Any], window: Window | None = None) -> None:
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
def deep_image_reader(window: Window | None = None) -> Iterator[DeepImageReader]:
    """Read training images through :class:`DeepImageReader` inside the block; Ultralytics' reader is restored after.

    Active before ``model.train`` starts: dataloader workers fork when the loader is built and keep what they saw.
    """
    with offline():
        from ultralytics.data import base

        original = base.imread
        reader = DeepImageReader(getattr(original, "original", original), window)
        base.imread = reader
        try:
            yield reader
        finally:
            base.imread = original


class WorkerSetup:
    """A do-nothing trainer callback that carries the offline guards and the reader into DDP workers.

    Unpickling it (in a DDP worker) applies both for the worker process; in the process that called
    ``model.train`` it does nothing, because :func:`train` applies them for the call.
    """

    event = "on_pretrain_routine_start"

    def __init__(self, window: Window | None = None) -> None:
        self.window = window

    def __call__(self, trainer: Any) -> None:
        pass

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return _set_up_worker, (self.window,)


def _set_up_worker(window: Window | None) -> WorkerSetup:
    hold_offline_for_process()
    from ultralytics.data import base

    if not isinstance(base.imread, DeepImageReader):
        base.imread = DeepImageReader(base.imread, window)
    return WorkerSetup(window)


@contextlib.contextmanager
def ddp_launch_file(trainer: Any) -> Iterator[Path]:
    """The launch file Ultralytics writes for its DDP workers (``generate_ddp_file``), written offline for the block
    and removed after as Ultralytics removes it (``ddp_cleanup``). Multi-GPU runs write it inside ``model.train``;
    this is the same call, for checking that a worker can load it without installing anything.
    """
    with offline():
        from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

        path = generate_ddp_file(trainer)
        try:
            yield Path(path)
        finally:
            ddp_cleanup(trainer, path)


def ultralytics_batch_size(model: Any, imgsz: int, amp: bool, max_num_obj: int, dataset_size: int) -> int:
    """Ultralytics' own AutoBatch (``check_train_batch_size``) for ``model`` on its device: the benchmark's peer."""
    import torch

    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # Ultralytics' AutoBatch refuses to run with it on
    try:
        with quiet():
            from ultralytics.utils.autobatch import check_train_batch_size

            return int(check_train_batch_size(model, imgsz=imgsz, amp=amp, batch=-1, max_num_obj=max_num_obj,
                                              dataset_size=dataset_size))
    finally:
        torch.backends.cudnn.benchmark = saved
