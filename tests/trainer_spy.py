"""A spy on the live Ultralytics trainer: what the run really did, batch by batch."""

from __future__ import annotations

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

    def install(self, monkeypatch: pytest.MonkeyPatch) -> TrainerSpy:
        from yolo_batch import ultralytics_adapter

        original = ultralytics_adapter.train

        def train(model: Any, overrides: Any, *, callbacks: Any = (), **kwargs: Any) -> Any:
            spies = [("on_pretrain_routine_end", self._setup), ("on_train_start", self._start),
                     ("on_train_batch_end", self._batch), ("on_train_epoch_end", self._epoch)]
            return original(model, overrides, callbacks=[*callbacks, *spies], **kwargs)

        monkeypatch.setattr(ultralytics_adapter, "train", train)
        return self

    def _setup(self, trainer: Any) -> None:
        self.accumulate = trainer.accumulate
        self.initial_lr = {g.get("param_group", str(i)): g["initial_lr"]
                           for i, g in enumerate(trainer.optimizer.param_groups)}
        self.first_image = trainer.train_loader.dataset.load_image(0)[0]

    def _start(self, trainer: Any) -> None:
        from torch import nn

        self.bn_names = [n for n, m in trainer.model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        self.start = _snapshot(trainer.model)

    def _batch(self, trainer: Any) -> None:
        from torch import nn

        self.lrs.append({g.get("param_group", str(i)): g["lr"] for i, g in enumerate(trainer.optimizer.param_groups)})
        self.bn_training.append(any(m.training for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d)))

    def _epoch(self, trainer: Any) -> None:
        self.end = _snapshot(trainer.model)


def _snapshot(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
