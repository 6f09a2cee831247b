"""Ultralytics' detection trainer with one more callback event: ``BEFORE_DDP_WRAP``, run in every process right
after the trainer has its model and before it moves it to the device, compiles it and wraps it in
DistributedDataParallel. PyTorch requires SyncBatchNorm to be in place before DDP wraps the model; Ultralytics has
no callback there, so this subclass adds one through ``setup_model``, the step ``_setup_train`` runs first.

This module imports Ultralytics when it is imported: :func:`.training.train` imports it inside ``offline()``, and
a DDP worker imports it when it unpickles the launch state (which names this class), after the launch file has
imported Ultralytics.
"""

from __future__ import annotations

from typing import Any

from ultralytics.models.yolo.detect import DetectionTrainer

from yolo_batch.ultralytics_adapter.training import BEFORE_DDP_WRAP


class HookedDetectionTrainer(DetectionTrainer):
    """``DetectionTrainer`` that runs the ``BEFORE_DDP_WRAP`` callbacks once its model is set up."""

    def setup_model(self) -> Any:
        checkpoint = super().setup_model()
        self.run_callbacks(BEFORE_DDP_WRAP)
        return checkpoint
