"""``train --log-noise-scale``: the gradient noise scale after every epoch, into ``noise_scale.json`` in the run folder.

At ``on_fit_epoch_end`` the callback copies the network being trained (never the trainer's own module: its weights,
BatchNorm statistics and gradients stay as they are), draws batches from the run's own training dataset (this
epoch's augmentation) and measures as ``yolo-batch advise`` does (:mod:`.gradients`). The random generators the
trainer's augmentation and shuffling draw from are put back afterwards, so the run trains as it would without the
log. Rank 0 measures in a multi-GPU run. The file is rewritten atomically after each epoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from yolo_batch.core.files import write_json
from yolo_batch.training.noise_scale import NoiseSettings, estimate_noise_scale

NOISE_FILE = "noise_scale.json"


class NoiseScaleLog:
    """A trainer callback (``on_fit_epoch_end``) appending each epoch's noise scale to ``noise_scale.json``."""

    event = "on_fit_epoch_end"

    def __init__(self, settings: NoiseSettings,
                 on_estimate: Callable[[int, float | None], None] | None = None) -> None:
        self.settings = settings
        self.on_estimate = on_estimate  # (epoch, B_simple): a noise-triggered batch schedule listens
        self.epochs: list[dict[str, Any]] = []

    def __call__(self, trainer: Any) -> None:
        from ultralytics.utils import RANK

        if RANK not in (-1, 0) or int(trainer.epoch) >= int(trainer.epochs):
            return  # another process, or the final validation of best.pt (Ultralytics calls it epoch + 1)
        with kept_random_state(trainer.device):
            small_sq, big_sq = self.measure(trainer)
        s = self.settings
        scale = estimate_noise_scale(small_sq, big_sq, s.small_batch, s.big_batch)
        loss = trainer.label_loss_items(trainer.tloss, "train")
        self.epochs = [e for e in self.epochs if e["epoch"] != int(trainer.epoch) + 1]  # a re-entered epoch
        self.epochs.append({"epoch": int(trainer.epoch) + 1, "train_loss": float(sum(loss.values())),
                            **scale.to_dict()})
        write_json(Path(trainer.save_dir) / NOISE_FILE,
                   {"small_batch": s.small_batch, "big_batch": s.big_batch, "steps": s.steps, "epochs": self.epochs})
        if self.on_estimate is not None:
            self.on_estimate(int(trainer.epoch), scale.b_simple)

    def measure(self, trainer: Any) -> tuple[list[float], list[float]]:
        from ultralytics.utils.torch_utils import unwrap_model

        from yolo_batch.ultralytics_adapter.gradients import batches_of, loader_over, sample_norms, trainable_copy

        s = self.settings
        network = trainable_copy(unwrap_model(trainer.model), int(trainer.args.imgsz))
        try:
            loader = loader_over(trainer.train_loader.dataset, s.big_batch, s.workers)
            return sample_norms(network, batches_of(loader), device=trainer.device, small=s.small_batch,
                                chunks=s.chunks, steps=s.steps)
        finally:
            del network
            if trainer.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()


@contextlib.contextmanager
def kept_random_state(device: Any) -> Iterator[None]:
    """Put Python's, NumPy's and torch's generators back as they were after the block."""
    import random

    import numpy
    import torch

    saved = (random.getstate(), numpy.random.get_state(), torch.random.get_rng_state(),
             torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    try:
        yield
    finally:
        random.setstate(saved[0])
        numpy.random.set_state(saved[1])
        torch.random.set_rng_state(saved[2])
        if saved[3] is not None:
            torch.cuda.set_rng_state(saved[3], device)
