"""The one seam to Ultralytics: no other module of yolo-batch imports ``ultralytics`` (a test enforces it).

* :mod:`.names` lists every Ultralytics name yolo-batch depends on, public and private, checked once at the
  first import with a one-line message naming what moved and the supported versions.
* :mod:`.session` runs calls offline: ``YOLO_OFFLINE``, and replacements for the font lookup and the AMP check
  (both download), applied for the duration of a call and restored after, also on error.
* :mod:`.models` loads models (never downloading), builds the probe's DetectionModel and the inference network,
  and wraps Ultralytics' NMS.
* :mod:`.data` checks data yamls and train arguments by Ultralytics' own rules.
* :mod:`.settings` asks Ultralytics what the trainer will do (defaults, stride, determinism, the AMP check) so the
  AutoBatch probe trains under the same settings.
* :mod:`.metrics` is Ultralytics' average precision for ``bench accuracy``.
* :mod:`.export` exports through ``YOLO.export`` (never pip-installing what Ultralytics asks for), reads what the
  export recorded, and runs Ultralytics' predict on an export (the benchmark's peer).
* :mod:`.training` runs ``model.train`` with our callbacks and the 16-bit image reader, writes the DDP launch file
  (for checking it offline), and runs Ultralytics' own AutoBatch (the benchmark's peer).
* :mod:`.trainer_control` (with :mod:`.controlled_trainer`, :mod:`.trainer_edits`) changes the batch of the
  live trainer: OOM recovery and batch schedules.
"""

from __future__ import annotations

from yolo_batch.ultralytics_adapter.data import (
    check_dataset,
    image_formats,
    label_paths,
    validate_train_args,
)
from yolo_batch.ultralytics_adapter.export import (
    Exported,
    MissingRequirement,
    engine_offset,
    export_model,
    load_export,
    no_installs,
    predict_stream,
)
from yolo_batch.ultralytics_adapter.metrics import mean_average_precision
from yolo_batch.ultralytics_adapter.mixed_precision import keep_ends_fp32
from yolo_batch.ultralytics_adapter.models import (
    InferenceNetwork,
    PortableModel,
    check_model_spec,
    detection_model,
    inference_network,
    load_model,
    non_max_suppression,
    parameter_count,
    portable_model,
    reference_letterbox,
    versions,
)
from yolo_batch.ultralytics_adapter.names import (
    DEPENDS_ON,
    SUPPORTED,
    UltralyticsMismatch,
)
from yolo_batch.ultralytics_adapter.session import (
    amp_forward_matches,
    guards_active,
    import_ultralytics,
    offline,
    one_line,
    quiet,
)
from yolo_batch.ultralytics_adapter.settings import (
    amp_check,
    default_train_args,
    determinism,
    model_stride,
)
from yolo_batch.ultralytics_adapter.training import (
    BEFORE_DDP_WRAP,
    DeepImageReader,
    TrainerCallback,
    WorkerSetup,
    WorkersFailed,
    before_wrap_trainer,
    ddp_launch_file,
    deep_image_reader,
    final_metrics,
    train,
    ultralytics_batch_size,
)

__all__ = [
    "BEFORE_DDP_WRAP",
    "DEPENDS_ON",
    "SUPPORTED",
    "DeepImageReader",
    "Exported",
    "InferenceNetwork",
    "MissingRequirement",
    "PortableModel",
    "TrainerCallback",
    "UltralyticsMismatch",
    "WorkerSetup",
    "WorkersFailed",
    "amp_check",
    "amp_forward_matches",
    "before_wrap_trainer",
    "check_dataset",
    "check_model_spec",
    "ddp_launch_file",
    "deep_image_reader",
    "default_train_args",
    "detection_model",
    "determinism",
    "engine_offset",
    "export_model",
    "final_metrics",
    "guards_active",
    "image_formats",
    "import_ultralytics",
    "inference_network",
    "keep_ends_fp32",
    "label_paths",
    "load_export",
    "load_model",
    "mean_average_precision",
    "model_stride",
    "no_installs",
    "non_max_suppression",
    "offline",
    "one_line",
    "parameter_count",
    "portable_model",
    "predict_stream",
    "quiet",
    "reference_letterbox",
    "train",
    "ultralytics_batch_size",
    "validate_train_args",
    "versions",
]
