"""Callbacks for the multi-process tests, importable by name in DDP workers (the launch state pickles them by
reference; the launch file puts this folder on the worker's sys.path)."""

from __future__ import annotations

import json
import os
from typing import Any


class StopAfterSetup(Exception):
    """Raised once the trainer is set up: the test needs no training step."""


class RecordSetup:
    """``on_pretrain_routine_end``: what every rank holds once Ultralytics has set the trainer up, gathered on all
    ranks and written by each to ``$YOLO_BATCH_TEST_OUT.<rank>.json``; then training stops."""

    event = "on_pretrain_routine_end"

    def __call__(self, trainer: Any) -> None:
        import torch
        import torch.distributed as dist
        from torch import nn

        live = getattr(trainer.model, "module", trainer.model)
        optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        mine = {
            "wrapper": type(trainer.model).__name__,
            "sync_layers": sum(isinstance(m, nn.SyncBatchNorm) for m in live.modules()),
            "plain_layers": sum(type(m) is nn.BatchNorm2d for m in live.modules()),
            "ema_sync_layers": sum(isinstance(m, nn.SyncBatchNorm) for m in trainer.ema.ema.modules()),
            "ema_plain_layers": sum(type(m) is nn.BatchNorm2d for m in trainer.ema.ema.modules()),
            "optimizer_holds_live_parameters": optimised <= {id(p) for p in live.parameters()},
            "world_size": dist.get_world_size(),
            "first_weight_sum": float(next(live.parameters()).detach().sum()),
        }
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        with open(f"{os.environ['YOLO_BATCH_TEST_OUT']}.{dist.get_rank()}.json", "w") as f:
            json.dump({"rank": dist.get_rank(), "all": everyone, "torch": torch.__version__}, f)
        raise StopAfterSetup
