"""What each epoch of a run measured, read from the live trainer by callbacks: the sweep's per-epoch rows.

At ``on_fit_epoch_end`` Ultralytics has just validated: ``trainer.tloss`` holds the epoch's mean training loss
items and ``trainer.metrics`` the validation losses and mAP (what it also writes to ``results.csv``). The meter adds
what the CSV lacks: the training phase's own seconds (so images/s leaves validation out), the wall time since
training started, and the device's peak memory during the epoch (CUDA only; None on CPU, where no allocator
reports a peak). One JSON line per epoch goes into ``epochs.jsonl`` in the run folder (rank 0), so a multi-GPU
run's workers record it too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from yolo_batch.core.files import append_lines

EPOCHS_FILE = "epochs.jsonl"
# Ultralytics' validation metric names -> ours
_METRICS = {"metrics/mAP50(B)": "map50", "metrics/mAP50-95(B)": "map50_95", "metrics/precision(B)": "precision",
            "metrics/recall(B)": "recall"}


class EpochMeter:
    """Trainer callbacks that append one row per epoch to ``epochs.jsonl``; ``on_epoch(row)`` is told in-process."""

    def __init__(self, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.on_epoch = on_epoch
        self._start = 0.0
        self._epoch_start = 0.0
        self._train_s = 0.0

    def __getstate__(self) -> dict[str, Any]:  # DDP workers get the meter without the caller's progress
        return {**self.__dict__, "on_epoch": None}

    def callbacks(self) -> list[tuple[str, Callable[[Any], None]]]:
        return [("on_train_start", self.train_start), ("on_train_epoch_start", self.epoch_start),
                ("on_train_epoch_end", self.epoch_end), ("on_fit_epoch_end", self.fit_epoch_end)]

    def train_start(self, trainer: Any) -> None:
        self._start = time.perf_counter()

    def epoch_start(self, trainer: Any) -> None:
        self._epoch_start = time.perf_counter()
        if trainer.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(trainer.device)

    def epoch_end(self, trainer: Any) -> None:
        self._train_s = time.perf_counter() - self._epoch_start

    def fit_epoch_end(self, trainer: Any) -> None:
        from ultralytics.utils import RANK

        if RANK not in (-1, 0) or int(trainer.epoch) >= int(trainer.epochs):
            return  # another process, or the final validation of best.pt (Ultralytics calls it epoch + 1)
        row = self.row(trainer)
        with open(Path(trainer.save_dir) / EPOCHS_FILE, "a", encoding="utf-8") as handle:
            append_lines(handle, [row])
        if self.on_epoch is not None:
            self.on_epoch(row)

    def row(self, trainer: Any) -> dict[str, Any]:
        train = {k.split("/", 1)[1]: float(v) for k, v in trainer.label_loss_items(trainer.tloss, "train").items()}
        metrics = dict(trainer.metrics)
        val = {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("val/")}
        images = len(trainer.train_loader.dataset)
        peak = None
        if trainer.device.type == "cuda":
            import torch

            peak = int(torch.cuda.max_memory_reserved(trainer.device))
        return {
            "epoch": int(trainer.epoch) + 1,
            "train_loss": sum(train.values()), "val_loss": sum(val.values()) if val else None,
            "train_losses": train, "val_losses": val,
            **{ours: float(metrics[theirs]) for theirs, ours in _METRICS.items() if theirs in metrics},
            "train_s": self._train_s, "images": images,
            "images_per_s": images / self._train_s if self._train_s > 0 else None,
            "wall_s": time.perf_counter() - self._start, "peak_memory_bytes": peak,
            "lr": float(next(iter(trainer.lr.values()))) if getattr(trainer, "lr", None) else None,
        }


def read_epochs(save_dir: str | Path) -> list[dict[str, Any]]:
    """The rows a meter wrote into ``save_dir`` (a re-entered epoch after a batch change: the last row wins)."""
    path = Path(save_dir) / EPOCHS_FILE
    if not path.exists():
        return []
    rows: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["epoch"])] = row
    return [rows[k] for k in sorted(rows)]
