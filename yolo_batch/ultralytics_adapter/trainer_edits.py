"""The edits a batch change makes to a live Ultralytics trainer (see :mod:`.trainer_control`)."""

from __future__ import annotations

import gc
import logging
from typing import Any

from yolo_batch.training.batch_change import BatchChange
from yolo_batch.training.batchnorm import FreezeBatchNorm

log = logging.getLogger(__name__)

_DECAYED_GROUPS = frozenset({"weight", "muon"})  # the parameter groups Ultralytics applies weight decay to


def apply_change(trainer: Any, change: BatchChange) -> None:
    """Rebuild the loaders whose batch changed and set accumulation, lr, weight decay and BatchNorm to ``change.new``.

    The optimizer, its state, the scheduler, the EMA and the scaler are the same objects before and after.
    """
    from ultralytics.utils import LOCAL_RANK

    old, new = change.old, change.new
    if new.batch != old.batch:
        _close(trainer.train_loader)
        trainer.batch_size = trainer.args.batch = new.total_batch
        trainer.train_loader = trainer.get_dataloader(trainer.data["train"], batch_size=new.batch, rank=LOCAL_RANK,
                                                      mode="train")
    if new.val_batch != old.val_batch:
        _close(trainer.test_loader)
        trainer.test_loader = trainer.get_dataloader(trainer.data[trainer.args.split], batch_size=new.val_batch,
                                                     rank=LOCAL_RANK, mode="val")
        trainer.validator.dataloader = trainer.test_loader
    trainer.accumulate = new.accumulate
    if new.lr0 != old.lr0:
        scale_lr(trainer, new.lr0 / old.lr0)
    if new.effective_batch != old.effective_batch:
        set_weight_decay(trainer, new.effective_batch)
    if new.bn_policy != old.bn_policy:
        set_bn_policy(trainer, new.bn_policy)


def scale_lr(trainer: Any, factor: float) -> None:
    """Multiply every parameter group's lr0 (what warmup ramps to and the scheduler scales) by ``factor``."""
    for group in trainer.optimizer.param_groups:
        group["initial_lr"] *= factor
    trainer.scheduler.base_lrs = [lr * factor for lr in trainer.scheduler.base_lrs]


def set_weight_decay(trainer: Any, effective_batch: int) -> None:
    """Ultralytics' rule: weight decay scales with the effective batch over the nominal one (its loss is summed)."""
    decay = trainer.args.weight_decay * effective_batch / trainer.args.nbs
    for group in trainer.optimizer.param_groups:
        if group.get("param_group") in _DECAYED_GROUPS:
            group["weight_decay"] = decay


def set_bn_policy(trainer: Any, policy: str) -> None:
    """Switch between ``freeze`` and ``train`` for the next epoch (``sync`` is never switched mid-run)."""
    hooks = trainer.callbacks["on_train_batch_start"]
    hooks[:] = [h for h in hooks if not isinstance(h, FreezeBatchNorm)]
    if policy == "freeze":
        hooks.append(FreezeBatchNorm())


def free_memory(trainer: Any, phase: str) -> None:
    """Drop what the failed step left on the trainer, collect garbage and return cached device memory."""
    if phase == "train":
        trainer.loss = trainer.loss_items = trainer.tloss = None
        trainer.optimizer.zero_grad()
    gc.collect()
    if trainer.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def free_device_bytes(trainer: Any) -> int | None:
    """NVML's free memory on this process's GPU now; None on CPU or where NVML cannot answer."""
    if trainer.device.type != "cuda":
        return None
    from yolo_batch.core.nvml import NvmlUnavailable, read_gpus

    try:
        return read_gpus([trainer.device.index or 0])[0].free_bytes
    except NvmlUnavailable as exc:
        log.debug("no NVML reading for the batch-change record: %s", exc)
        return None


def _close(loader: Any) -> None:
    if hasattr(loader, "close"):
        loader.close()  # its workers and prefetched batches
