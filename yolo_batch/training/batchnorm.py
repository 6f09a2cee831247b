"""The BatchNorm policy: decided by a pure rule, applied through Ultralytics callbacks.

BatchNorm estimates each channel's mean and variance from the batch. Below about 8 images per device
those estimates are noisy, training drifts from what inference sees, and the running statistics the
checkpoint keeps are poor. Three remedies, chosen by :func:`choose_bn_policy`:

* ``freeze``: BatchNorm layers stay in eval mode during training, so they normalise with (and keep)
  the running statistics of the weights training started from, while their affine weight and bias
  still learn. Ultralytics calls ``model.train()`` at the start of every epoch (after the
  ``on_train_epoch_start`` callbacks), so the layers are put back into eval mode in
  ``on_train_batch_start``, which runs after it and before every forward pass. The trainer's EMA copy
  averages the running statistics of the live model, which stay fixed, so the saved checkpoints keep
  them too.
* ``sync``: SyncBatchNorm, statistics from the global batch of a multi-GPU run. Ultralytics trains
  multi-GPU runs in DDP worker processes, which receive the model's callbacks (pickled). PyTorch requires
  SyncBatchNorm to be in place before DistributedDataParallel wraps the model, and Ultralytics has no
  callback there, so the adapter's trainer runs an event of its own (``BEFORE_DDP_WRAP``) once each worker
  has its model and before it is moved, compiled and wrapped: the BatchNorm layers are converted then,
  keeping every parameter and buffer object. The EMA copy (made from the converted model) is put back to
  plain BatchNorm in ``on_pretrain_routine_end``, so the checkpoints keep plain BatchNorm.
* ``train``: Ultralytics' own behaviour.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from yolo_batch.training.config import BnPolicy
from yolo_batch.ultralytics_adapter.training import BEFORE_DDP_WRAP

log = logging.getLogger(__name__)

MIN_RELIABLE_BATCH = 8  # per device; below it BatchNorm statistics are noisy


@dataclass(frozen=True)
class BnDecision:
    """The policy applied (never ``auto``), why, and a warning for the user when there is one."""

    policy: BnPolicy
    reason: str
    warning: str | None = None


def choose_bn_policy(requested: BnPolicy | str, per_device_batch: int, world_size: int,
                     from_weights: bool) -> BnDecision:
    """Resolve ``--bn`` for a run.

    ``auto``: freeze when the per-device batch is below 8 and training starts from weights (their
    statistics are better than any a tiny batch gives); otherwise sync when several GPUs are used and
    the per-device batch is below 8; otherwise train, with a warning when the batch is tiny and nothing
    can help (one device, no weights).

    Raises:
        ValueError: an unknown policy, a batch or world size below 1.
    """
    policy = BnPolicy(requested)
    if per_device_batch < 1:
        raise ValueError(f"per-device batch must be >= 1, got {per_device_batch}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    tiny = per_device_batch < MIN_RELIABLE_BATCH
    batch = f"per-device batch {per_device_batch}"
    if policy is BnPolicy.FREEZE:
        reason = "BatchNorm frozen as requested: running statistics kept, affine weights learn"
        if not from_weights:
            return BnDecision(policy, reason + " (from scratch: the statistics stay at their initial 0/1)",
                              "--bn freeze without starting weights keeps BatchNorm's initial statistics "
                              "(mean 0, variance 1); train once first and fine-tune from that .pt")
        return BnDecision(policy, reason)
    if policy is BnPolicy.SYNC:
        if world_size > 1:
            return BnDecision(policy, f"SyncBatchNorm as requested: statistics from the global batch of "
                                      f"{per_device_batch * world_size} on {world_size} GPUs")
        return BnDecision(BnPolicy.TRAIN, "sync requested but the run uses one device: nothing to sync with, "
                                          "BatchNorm trains as usual")
    if policy is BnPolicy.TRAIN:
        note = f" ({batch} is below {MIN_RELIABLE_BATCH}: statistics will be noisy)" if tiny else ""
        return BnDecision(policy, "BatchNorm trains as requested" + note)
    if not tiny:
        return BnDecision(BnPolicy.TRAIN, f"auto: {batch} >= {MIN_RELIABLE_BATCH}, BatchNorm statistics are "
                                          "reliable; BatchNorm trains")
    if from_weights:
        return BnDecision(BnPolicy.FREEZE, f"auto: {batch} < {MIN_RELIABLE_BATCH} and training starts from "
                                           "weights: BatchNorm frozen (their running statistics kept, "
                                           "affine weights learn)")
    if world_size > 1:
        return BnDecision(BnPolicy.SYNC, f"auto: {batch} < {MIN_RELIABLE_BATCH} on {world_size} GPUs: "
                                         f"SyncBatchNorm, statistics from the global batch of "
                                         f"{per_device_batch * world_size}")
    reason = (f"auto: {batch} < {MIN_RELIABLE_BATCH} from scratch on one device: BatchNorm trains "
              "(no weights to freeze, no GPU to sync with); its statistics will be noisy")
    return BnDecision(BnPolicy.TRAIN, reason, f"{reason}. A larger batch, or a first run and then fine-tuning "
                                              "from its .pt with --bn freeze, avoids this")


def starts_from_weights(model: str, pretrained: Any = True) -> bool:
    """Whether Ultralytics will load trained weights: a .pt model (unless ``pretrained=False``), or
    ``pretrained`` given as a weights path (a yaml model with ``pretrained=True`` loads nothing)."""
    if isinstance(pretrained, str) and pretrained.strip() and pretrained.strip().lower() not in {"true", "false"}:
        return True
    return model.endswith(".pt") and pretrained not in (False, "False", "false")


def _batchnorm_types() -> tuple[type[Any], ...]:
    from torch import nn

    return nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm


class FreezeBatchNorm:
    """``on_train_batch_start`` callback: every BatchNorm layer of the live model back into eval mode.

    A class (not a closure) so DDP can pickle it into its worker processes.
    """

    event = "on_train_batch_start"

    def __call__(self, trainer: Any) -> None:
        types = _batchnorm_types()
        for module in trainer.model.modules():
            if isinstance(module, types) and module.training:
                module.eval()


class ConvertToSyncBatchNorm:
    """``BEFORE_DDP_WRAP`` callback: BatchNorm layers become SyncBatchNorm in each DDP worker, before the model is
    wrapped (as PyTorch requires)."""

    event = BEFORE_DDP_WRAP

    def __call__(self, trainer: Any) -> None:
        import torch

        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            log.warning("--bn sync: no process group in this process (not a DDP worker); BatchNorm trains as usual")
            return
        if hasattr(trainer.model, "module"):  # already wrapped: too late for what PyTorch documents
            raise RuntimeError("--bn sync: the model is already wrapped in DistributedDataParallel")
        converted = convert_to_sync(trainer.model)
        log.info("--bn sync: %d BatchNorm layers now synchronise across %d processes", converted,
                 torch.distributed.get_world_size())


class PlainBatchNormInEma:
    """``on_pretrain_routine_end`` callback: the EMA copy (made from the converted model) back to plain BatchNorm,
    so checkpoints, validation and exports never hold SyncBatchNorm."""

    event = "on_pretrain_routine_end"

    def __call__(self, trainer: Any) -> None:
        ema = getattr(trainer, "ema", None)
        if ema is not None:
            revert_sync(ema.ema)


def revert_sync(root: Any) -> int:
    """Replace every SyncBatchNorm layer under ``root`` with BatchNorm2d, in place, keeping the same parameter and
    buffer tensors (YOLO's normalisation layers are all 2-D). Returns how many were replaced."""
    from torch import nn

    reverted = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.SyncBatchNorm):
                plain = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                plain.running_mean, plain.running_var = child.running_mean, child.running_var
                plain.num_batches_tracked = child.num_batches_tracked
                plain.train(child.training)
                setattr(parent, name, plain)
                reverted += 1
    return reverted


def convert_to_sync(root: Any) -> int:
    """Replace every BatchNorm layer under ``root`` (not ``root`` itself) with SyncBatchNorm, in place,
    keeping the same parameter and buffer tensors. Returns how many were converted."""
    from torch import nn

    converted = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                converted += 1
    return converted


def callbacks_for(policy: BnPolicy) -> list[FreezeBatchNorm | ConvertToSyncBatchNorm | PlainBatchNormInEma]:
    """The Ultralytics callbacks that apply ``policy`` (none for ``train``)."""
    if policy is BnPolicy.AUTO:
        raise ValueError("resolve 'auto' with choose_bn_policy first")
    if policy is BnPolicy.FREEZE:
        return [FreezeBatchNorm()]
    if policy is BnPolicy.SYNC:
        return [ConvertToSyncBatchNorm(), PlainBatchNormInEma()]
    return []

