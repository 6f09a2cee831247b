"""yolo-batch: batch size as a solved problem for Ultralytics YOLO.

Public API::

    from yolo_batch import BatchRequest, SizingConfig, TrainConfig, estimate_batch, train
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from yolo_batch.core.lazy import lazy_exports

if TYPE_CHECKING:
    from yolo_batch.errors import InputError, YoloBatchError
    from yolo_batch.training.autobatch import estimate_batch
    from yolo_batch.training.config import (
        BatchRequest,
        Rounding,
        SizingConfig,
        TrainConfig,
    )
    from yolo_batch.training.decision import AutoBatchDecision
    from yolo_batch.training.run import TrainResult, train

__all__ = [
    "AutoBatchDecision",
    "BatchRequest",
    "InputError",
    "Rounding",
    "SizingConfig",
    "TrainConfig",
    "TrainResult",
    "YoloBatchError",
    "__version__",
    "estimate_batch",
    "train",
]

__getattr__, __dir__ = lazy_exports(__name__)
