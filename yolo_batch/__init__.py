"""yolo-batch: batch size as a solved problem for Ultralytics YOLO.

One function per command, keyword arguments named as its options::

    import yolo_batch

    result = yolo_batch.train(data="bccd/data.yaml", epochs=50)          # AutoBatch, then Ultralytics training
    decision = yolo_batch.autobatch(data="bccd/data.yaml", batch=0.8)    # the batch decision only
    summary = yolo_batch.infer("images/", model=result.weights, out="out", batch="auto")
    report = yolo_batch.sweep(data="bccd/data.yaml", batches="8,16,32", epochs=3)   # batch sizes compared
    advice = yolo_batch.advise(data="bccd/data.yaml")                               # the gradient noise scale
    for detections in yolo_batch.iter_detections("images/", model=result.weights):
        print(detections.path, detections.xyxy, detections.confidence, detections.class_id)

Nothing heavy is imported until a name is used (``import yolo_batch`` loads no torch, Ultralytics or OpenCV).
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from yolo_batch.core.lazy import lazy_exports

if TYPE_CHECKING:
    from yolo_batch.api import advise, autobatch, infer, iter_detections, sweep, train
    from yolo_batch.errors import InputError, YoloBatchError
    from yolo_batch.inference.config import InferConfig
    from yolo_batch.inference.detections import Detections
    from yolo_batch.inference.plots import save_throughput_plot
    from yolo_batch.inference.summary import InferenceSummary
    from yolo_batch.training.autobatch import estimate_batch
    from yolo_batch.training.config import (
        BatchRequest,
        Rounding,
        SizingConfig,
        TrainConfig,
    )
    from yolo_batch.training.decision import AutoBatchDecision
    from yolo_batch.training.plots import save_autobatch_plot
    from yolo_batch.training.run import TrainResult

__all__ = [
    "AutoBatchDecision",
    "BatchRequest",
    "Detections",
    "InferConfig",
    "InferenceSummary",
    "InputError",
    "Rounding",
    "SizingConfig",
    "TrainConfig",
    "TrainResult",
    "YoloBatchError",
    "__version__",
    "advise",
    "autobatch",
    "estimate_batch",
    "infer",
    "iter_detections",
    "save_autobatch_plot",
    "save_throughput_plot",
    "sweep",
    "train",
]

__getattr__, __dir__ = lazy_exports(__name__)
