"""A spy on the live Ultralytics trainer: what the run really did, batch by batch."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class TrainerSpy:
    """Wraps ``ultralytics_adapter.train`` so every run in the test registers these callbacks after ours."""

    accumulate: int | None = None  # the trainer's accumulation before warmup ramps it
    initial_lr: dict[str, float] = field(default_factory=dict)  # per parameter group: the lr0 it was built with
    lrs: list[dict[str, float]] = field(default_factory=list)  # per batch: lr of each parameter group
    bn_training: list[bool] = field(default_factory=list)  # per batch: any BatchNorm layer in training mode
    start: dict[str, Any] | None = None  # live model state when training starts (weights loaded)
    end: dict[str, Any] | None = None  # live model state after the last epoch
    bn_names: list[str] = field(default_factory=list)
    first_image: Any = None  # the training loader's first image, as Ultralytics loaded it
    epochs: list[dict[str, Any]] = field(default_factory=list)  # per finished epoch: what the trainer trained with
    val_batches: list[int] = field(default_factory=list)  # per validation pass: its loader's batch size
    losses: list[Any] = field(default_factory=list)  # weakrefs to every training forward pass's loss tensor
    missing: list[str] | None = None  # names.OBJECT_ATTRIBUTES "BaseTrainer.*" absent from the live trainer
    _steps: int = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> TrainerSpy:
        from yolo_batch import ultralytics_adapter

        original = ultralytics_adapter.train

        def train(model: Any, overrides: Any, *, callbacks: Any = (), **kwargs: Any) -> Any:
            spies = [("on_pretrain_routine_end", self._setup), ("on_train_start", self._start),
                     ("on_train_batch_end", self._batch), ("on_train_epoch_end", self._epoch),
                     ("on_train_epoch_start", self._epoch_start), ("on_val_start", self._val_start)]
            return original(model, overrides, callbacks=[*callbacks, *spies], **kwargs)

        monkeypatch.setattr(ultralytics_adapter, "train", train)
        return self

    def _setup(self, trainer: Any) -> None:
        self.accumulate = trainer.accumulate
        self.initial_lr = {g.get("param_group", str(i)): g["initial_lr"]
                           for i, g in enumerate(trainer.optimizer.param_groups)}
        self.first_image = trainer.train_loader.dataset.load_image(0)[0]
        trainer.model.register_forward_hook(self._forward)

    def _start(self, trainer: Any) -> None:
        from torch import nn

        self.bn_names = [n for n, m in trainer.model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        self.start = _snapshot(trainer.model)

    def _forward(self, module: Any, inputs: Any, output: Any) -> None:
        if module.training and isinstance(output, tuple):  # a training step: (loss, loss items)
            self.losses.append(weakref.ref(output[0]))

    def _epoch_start(self, trainer: Any) -> None:
        self._steps = 0

    def _val_start(self, validator: Any) -> None:
        self.val_batches.append(validator.dataloader.batch_size)

    def _batch(self, trainer: Any) -> None:
        from torch import nn

        self._steps += 1
        self.lrs.append({g.get("param_group", str(i)): g["lr"] for i, g in enumerate(trainer.optimizer.param_groups)})
        self.bn_training.append(any(m.training for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d)))

    def _epoch(self, trainer: Any) -> None:
        from yolo_batch.ultralytics_adapter.names import OBJECT_ATTRIBUTES

        self.end = _snapshot(trainer.model)
        if self.missing is None:
            names = [d.name.split(".")[1:] for d in OBJECT_ATTRIBUTES if d.name.startswith("BaseTrainer.")]
            self.missing = [".".join(path) for path in names if not _has(trainer, path)]
        self.epochs.append({
            "epoch": trainer.epoch, "batch": trainer.train_loader.batch_size, "steps": self._steps,
            "images": len(trainer.train_loader.dataset), "accumulate": trainer.accumulate,
            "initial_lr": {g.get("param_group", str(i)): g["initial_lr"]
                           for i, g in enumerate(trainer.optimizer.param_groups)},
            "weight_decay": {g.get("param_group", str(i)): g["weight_decay"]
                             for i, g in enumerate(trainer.optimizer.param_groups)},
            "optimizer": id(trainer.optimizer), "ema": id(trainer.ema), "ema_updates": trainer.ema.updates,
            "scheduler": id(trainer.scheduler), "bn_freeze": any(
                type(h).__name__ == "FreezeBatchNorm" for h in trainer.callbacks["on_train_batch_start"]),
        })


def _has(obj: Any, path: list[str]) -> bool:
    for name in path:
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def _snapshot(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
