"""Gradients of Ultralytics' detection loss at two batch sizes: what the gradient noise scale is measured from.

A step draws ``chunks x small`` training images through Ultralytics' own training pipeline (its dataset with the
run's augmentation, its collate), splits them into ``chunks`` groups of ``small``, and computes one gradient of the
per-image mean detection loss per group (Ultralytics' loss is summed over a batch, so each is divided by the group
size). :func:`yolo_batch.training.noise_scale.step_norms` turns those into the two squared norms.

Everything runs on a copy of the network (``copy.deepcopy``): the user's model, its weights, its BatchNorm
statistics and its ``requires_grad`` flags are never touched. The copy trains as the trainer trains it (train mode,
BatchNorm on batch statistics, Ultralytics' frozen ``.dfl`` layer left out).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

from yolo_batch.errors import InputError
from yolo_batch.training.noise_scale import step_norms
from yolo_batch.ultralytics_adapter.models import detection_model
from yolo_batch.ultralytics_adapter.session import offline, quiet

log = logging.getLogger(__name__)

Norms = tuple[list[float], list[float]]  # per step: (|G_small|^2, |G_big|^2)
_FROZEN = (".dfl",)  # Ultralytics always freezes the DFL layer's fixed weights


def measure_norms(model: Any, data: dict[str, Any], *, imgsz: int, device: str, small: int, chunks: int, steps: int,
                  workers: int = 0, on_step: Callable[[int], None] | None = None) -> Norms:
    """Squared gradient norms at batches ``small`` and ``small * chunks`` over ``steps`` steps, for a loaded YOLO
    ``model`` (only read) on the training split of ``data`` (a checked data dict, :func:`.check_dataset`).

    Raises:
        InputError: the training split holds fewer images than one step draws.
    """
    import torch

    network = network_copy(model, int(data["nc"]), imgsz)
    try:
        target = torch.device(device)
        network.to(target)
        with offline(), quiet():
            loader = training_loader(network, data, imgsz=imgsz, batch=small * chunks, workers=workers)
        return sample_norms(network, batches_of(loader), device=target, small=small, chunks=chunks, steps=steps,
                            on_step=on_step)
    finally:
        del network
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def network_copy(model: Any, nc: int, imgsz: int) -> Any:
    """The network to differentiate for a loaded YOLO ``model``: a copy of its network (a fresh one with the model's
    weights where the data has another number of classes)."""
    if int(getattr(model.model, "nc", nc)) == nc:
        return trainable_copy(model.model, imgsz)
    return trainable_copy(detection_model(model, nc, {"imgsz": imgsz}), imgsz)


def trainable_copy(module: Any, imgsz: int) -> Any:
    """A deep copy of a DetectionModel with the trainer's loss settings, trainable parameters, in train mode."""
    with quiet():
        from ultralytics.cfg import get_cfg

        network = copy.deepcopy(module)
        network.args = get_cfg(overrides={"imgsz": imgsz})
    network.criterion = None  # built again from these args on the first loss
    network.float()
    for name, parameter in network.named_parameters():
        parameter.requires_grad = not any(part in name for part in _FROZEN)
    network.train()
    return network


def training_loader(network: Any, data: dict[str, Any], *, imgsz: int, batch: int, workers: int) -> Any:
    """Ultralytics' training dataset and loader (augmentation as in training), full batches only.

    Raises:
        InputError: fewer training images than ``batch``.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset

    cfg: Any = get_cfg(overrides={"imgsz": imgsz, "workers": workers})
    stride = max(int(network.stride.max()), 32)
    return loader_over(build_yolo_dataset(cfg, data["train"], batch, data, mode="train", stride=stride), batch,
                       workers)


def loader_over(dataset: Any, batch: int, workers: int = 0) -> Any:
    """A shuffled loader of full ``batch``-image batches over a training dataset.

    Raises:
        InputError: fewer training images than ``batch``.
    """
    from ultralytics.data import build_dataloader

    if len(dataset) < batch:
        raise InputError(f"the noise scale draws {batch} training images per step but the training split holds "
                         f"{len(dataset)}: lower --small-batch or --chunks")
    return build_dataloader(dataset, batch, workers, shuffle=True, drop_last=True, pin_memory=False)


def sample_norms(network: Any, batches: Iterator[dict[str, Any]], *, device: Any, small: int, chunks: int,
                 steps: int, on_step: Callable[[int], None] | None = None) -> Norms:
    """Per step, the chunk gradients of the next batch of ``batches`` reduced to (|G_small|^2, |G_big|^2)."""
    small_sq: list[float] = []
    big_sq: list[float] = []
    for step in range(steps):
        batch = next(batches)
        if int(batch["img"].shape[0]) < small * chunks:  # the loader's last, short batch: draw another
            batch = next(batches)
        grads = [chunk_gradient(network, _chunk(batch, i * small, (i + 1) * small), device) for i in range(chunks)]
        s, b = step_norms(grads)
        small_sq.append(s)
        big_sq.append(b)
        if on_step is not None:
            on_step(step + 1)
    return small_sq, big_sq


def chunk_gradient(network: Any, batch: dict[str, Any], device: Any) -> Any:
    """The gradient of the per-image mean detection loss over ``batch``, flattened into one vector."""
    import torch

    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch["img"] = batch["img"].float() / 255  # what the trainer's preprocess_batch does
    params = [p for p in network.parameters() if p.requires_grad]
    network.zero_grad(set_to_none=True)
    loss, _ = network.loss(batch)
    (loss.sum() / batch["img"].shape[0]).backward()  # Ultralytics' loss is summed over the batch
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    network.zero_grad(set_to_none=True)
    return flat.detach()


def _chunk(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Images ``start:stop`` of a collated batch with their targets (``batch_idx`` renumbered from 0)."""
    keep = (batch["batch_idx"] >= start) & (batch["batch_idx"] < stop)
    return {"img": batch["img"][start:stop], "batch_idx": batch["batch_idx"][keep] - start,
            "cls": batch["cls"][keep], "bboxes": batch["bboxes"][keep]}


def batches_of(loader: Any) -> Iterator[dict[str, Any]]:
    while True:
        yield from loader

