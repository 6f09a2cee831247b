"""Every Ultralytics name yolo-batch depends on, in one list, checked once when Ultralytics is first imported.

Public API comes first; the private names (marked) are reached only because Ultralytics offers no public way
to do what yolo-batch needs. When an upgrade moves any of them, the first call into the adapter fails with one
line naming the missing name and the supported versions, instead of an ``AttributeError`` deep in a run.

Attributes read from objects Ultralytics hands back (a trainer, a model) cannot be checked without building
those objects; they are listed in :data:`OBJECT_ATTRIBUTES` and checked by ``tests/test_ultralytics_adapter.py``.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

from yolo_batch.errors import YoloBatchError

SUPPORTED = "8.4.x"  # pyproject.toml pins ultralytics>=8.4,<8.5


@dataclass(frozen=True)
class Dependency:
    """One dotted name (``module.attribute``) and why yolo-batch needs it."""

    name: str
    why: str
    private: bool = False


DEPENDS_ON: tuple[Dependency, ...] = (
    Dependency("ultralytics.YOLO", "loading yaml and .pt models, training, predict and export"),
    Dependency("ultralytics.cfg.get_cfg", "checking pass-through train arguments"),
    Dependency("ultralytics.cfg.check_dict_alignment", "naming an unknown train argument", private=True),
    Dependency("ultralytics.utils.DEFAULT_CFG_DICT", "the known train argument names", private=True),
    Dependency("ultralytics.utils.USER_CONFIG_DIR", "a font the user placed there"),
    Dependency("ultralytics.utils.SETTINGS", "replaced by a copy during calls: Ray Tune reporting off", private=True),
    Dependency("ultralytics.utils.WEIGHTS_DIR", "whether the AMP check's reference weights are on disk"),
    Dependency("ultralytics.data.utils.check_det_dataset", "reading a data yaml (autodownload off)"),
    Dependency("ultralytics.data.utils.IMG_FORMATS", "which files of a split are images"),
    Dependency("ultralytics.data.utils.img2label_paths", "where an image's label file is", private=True),
    Dependency("ultralytics.utils.checks.check_font", "replaced during calls: it downloads fonts", private=True),
    Dependency("ultralytics.utils.plotting.check_font", "replaced during calls (imported by name)", private=True),
    Dependency("ultralytics.data.utils.check_font", "replaced during calls (imported by name)", private=True),
    Dependency("ultralytics.engine.trainer.check_amp", "replaced during training: it downloads yolo26n.pt; asked "
                                                       "before the probe whether fp16 stays on", private=True),
    Dependency("ultralytics.data.base.imread", "replaced during training: 16-bit images are scaled, not truncated",
               private=True),
    Dependency("ultralytics.models.yolo.detect.DetectionTrainer.setup_model", "extended to convert to SyncBatchNorm "
                                                                             "before DDP wraps the model: the first "
                                                                             "step of _setup_train"),
    Dependency("ultralytics.nn.tasks.DetectionModel", "the model the AutoBatch probe trains", private=True),
    Dependency("ultralytics.nn.modules.head.Detect", "caches the anchors of the last input shape on the module, "
                                                     "so inference threads each run their own copy", private=True),
    Dependency("ultralytics.utils.nms.non_max_suppression", "inference NMS with DetectionPredictor's arguments "
                                                            "(agnostic is positional)", private=True),
    Dependency("ultralytics.utils.metrics.ap_per_class", "bench accuracy's mAP, as Ultralytics' val computes it"),
    Dependency("ultralytics.data.augment.LetterBox", "the reference our letterbox is tested against"),
    Dependency("ultralytics.utils.autobatch.check_train_batch_size", "bench autobatch's baseline"),
    Dependency("ultralytics.utils.torch_utils.init_seeds",
               "the trainer's determinism switch (CUBLAS_WORKSPACE_CONFIG), applied around the AutoBatch probe",
               private=True),
    Dependency("ultralytics.utils.callbacks.default_callbacks", "restored after the AMP check resets them, as the "
                                                                "trainer does", private=True),
    Dependency("ultralytics.utils.dist.generate_ddp_file",
               "the DDP launch file (cloudpickle), checked offline by tests", private=True),
    Dependency("ultralytics.utils.dist.ddp_cleanup", "removing that launch file after the check", private=True),
    Dependency("ultralytics.utils.RANK", "which process of a multi-GPU run records batch changes and fires drills",
               private=True),
    Dependency("ultralytics.utils.LOCAL_RANK", "rebuilding a loader for a DDP worker's share of the data",
               private=True),
    Dependency("ultralytics.utils.LOGGER", "one line per batch change in the trainer's own output"),
    # The controlled trainer (trainer_control.py) wraps these methods of the task's trainer.
    Dependency("ultralytics.engine.trainer.BaseTrainer._do_train", "leaving and re-entering the training loop at "
               "a batch change", private=True),
    Dependency("ultralytics.engine.trainer.BaseTrainer._setup_train", "skipped on re-entry", private=True),
    Dependency("ultralytics.engine.trainer.BaseTrainer._setup_ddp", "skipped on re-entry", private=True),
    Dependency("ultralytics.engine.trainer.BaseTrainer.run_callbacks", "on_train_start once; start epoch put back"),
    Dependency("ultralytics.engine.trainer.BaseTrainer.validate", "validation OOMs shrink the validation batch"),
    Dependency("ultralytics.engine.trainer.BaseTrainer.final_eval", "validation OOMs in the final evaluation"),
    Dependency("ultralytics.models.yolo.detect.DetectionTrainer.get_dataloader", "rebuilding a loader at a new "
               "batch"),
    Dependency("ultralytics.utils.checks.check_requirements", "replaced during exports and predict on an export: "
                                                              "it pip-installs missing packages", private=True),
    Dependency("ultralytics.utils.checks.check_tensorrt", "replaced during exports: it pip-installs TensorRT",
               private=True),
    Dependency("ultralytics.engine.exporter.check_requirements", "replaced during exports (imported by name)",
               private=True),
    Dependency("ultralytics.utils.export.engine.check_requirements", "replaced during TensorRT exports (imported by "
                                                                     "name)", private=True),
    Dependency("ultralytics.nn.backends.openvino.check_requirements", "replaced during predict on an OpenVINO "
                                                                      "export (imported by name)", private=True),
    Dependency("ultralytics.nn.backends.base.BaseBackend.read_metadata", "names, stride and end2end an export "
                                                                         "recorded", private=True),
    # Batch-size science (gradients.py, noise_log.py, epoch_meter.py).
    Dependency("ultralytics.data.build_yolo_dataset", "the training dataset the noise scale draws from (advise)"),
    Dependency("ultralytics.data.build_dataloader", "full batches for the noise scale's steps"),
    Dependency("ultralytics.utils.torch_utils.unwrap_model", "the network a run trains, copied for "
                                                             "--log-noise-scale"),
    Dependency("ultralytics.nn.backends.base.BaseBackend.engine_header", "where a TensorRT engine starts after "
                                                                         "Ultralytics' metadata header", private=True),
)

# Attributes of objects Ultralytics returns, read by yolo-batch (checked by tests that build the objects).
OBJECT_ATTRIBUTES: tuple[Dependency, ...] = (
    Dependency("BaseTrainer.save_dir", "where autobatch.json goes"),
    Dependency("BaseTrainer.accumulate", "what the trainer accumulated, checked against the decision", private=True),
    Dependency("BaseTrainer.model", "BatchNorm layers the freeze and sync policies reach", private=True),
    Dependency("BaseTrainer.metrics", "the final validation's mAP that train reports (metrics/mAP50(B), ...)"),
    Dependency("YOLO.model.yaml", "rebuilding a DetectionModel for the probe", private=True),
    Dependency("YOLO.ckpt", "whether the model came from a .pt (its weights go into the probe's model)",
               private=True),
    Dependency("YOLO.model.stride", "the grid multi_scale sizes are rounded to"),
    Dependency("YOLO.save", "a yaml model saved once as .pt, so every cluster actor runs the same weights"),
    Dependency("YOLO.names", "class names of a model the driver does not run (infer --cluster)"),
    Dependency("YOLO.task_map", "the task's trainer class, extended for the before-DDP-wrap hook and the "
                                "controlled trainer"),
    # Read or set when the batch changes during training (trainer_control.py); checked on a live trainer by
    # tests/test_oom_recovery.py. Each "BaseTrainer.X" is one attribute (dotted: an attribute of it).
    Dependency("BaseTrainer.batch_size", "the total batch, set at a change", private=True),
    Dependency("BaseTrainer.args.batch", "the total batch in checkpoints, set at a change"),
    Dependency("BaseTrainer.args.nbs", "the nominal batch of Ultralytics' weight-decay rule"),
    Dependency("BaseTrainer.args.weight_decay", "weight decay before scaling"),
    Dependency("BaseTrainer.args.split", "the split the validation loader reads"),
    Dependency("BaseTrainer.data", "the dataset paths a rebuilt loader reads", private=True),
    Dependency("BaseTrainer.train_loader", "rebuilt at a new batch", private=True),
    Dependency("BaseTrainer.test_loader", "rebuilt at a new validation batch", private=True),
    Dependency("BaseTrainer.validator.dataloader", "the validation loader the validator reads", private=True),
    Dependency("BaseTrainer.validator.gather_stats", "a multi-GPU vote before validation results are gathered",
               private=True),
    Dependency("BaseTrainer.optimizer.param_groups", "initial_lr, weight_decay and the param_group name",
               private=True),
    Dependency("BaseTrainer.scheduler.base_lrs", "lr0 scaled at a schedule phase", private=True),
    Dependency("BaseTrainer.scheduler.last_epoch", "the epoch a re-entered loop starts from", private=True),
    Dependency("BaseTrainer.scaler", "wrapped: scale(loss) is the gate between forward and backward", private=True),
    Dependency("BaseTrainer.start_epoch", "the epoch a re-entered loop starts from", private=True),
    Dependency("BaseTrainer.train_time_start", "kept across a re-entry (time= runs)", private=True),
    Dependency("BaseTrainer.epoch", "where a batch change happened"),
    Dependency("BaseTrainer.world_size", "processes of the run"),
    Dependency("BaseTrainer.device", "where memory is freed and measured"),
    Dependency("BaseTrainer.loss", "dropped after a failed step (with loss_items and tloss)", private=True),
    Dependency("BaseTrainer.ema", "kept across a change", private=True),
    Dependency("BaseTrainer.callbacks", "the BatchNorm freeze callback switched at a change", private=True),
    Dependency("BaseTrainer.last", "the checkpoint named when training gives up"),
    Dependency("BaseTrainer._oom_retries", "set above Ultralytics' limit before each step so its own first-epoch "
               "OOM halving never acts", private=True),
    Dependency("DetectionModel.loss", "the probe's real detection loss; the noise scale's gradients"),
    Dependency("DetectionModel.criterion", "reset on the noise scale's copy so the loss is built from its args",
               private=True),
    # Read per epoch by the sweep's meter and the noise-scale log (checked on a live trainer like those above).
    Dependency("BaseTrainer.tloss", "the epoch's mean training loss items", private=True),
    Dependency("BaseTrainer.label_loss_items", "the loss items by name (train/box_loss, ...)"),
    Dependency("BaseTrainer.lr", "the learning rate of the epoch"),
    Dependency("BaseTrainer.epochs", "which on_fit_epoch_end is the final validation of best.pt"),
    Dependency("BaseTrainer.args.imgsz", "the image size of the noise scale's copy"),
    Dependency("DetectionModel.fuse", "Conv+BN fusion for inference, as the predictor does"),
    Dependency("DetectionModel.stride / names / end2end", "letterbox stride, class names, NMS-free heads"),
)


class UltralyticsMismatch(YoloBatchError):
    """The installed Ultralytics lacks a name yolo-batch depends on."""


def resolve(dotted: str) -> object:
    """The object a dotted ``module.attribute`` name refers to (the longest importable module prefix, then
    attributes).

    Raises:
        AttributeError, ImportError: the name does not exist.
    """
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            if cut == 1:
                raise
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ImportError(dotted)  # pragma: no cover - the loop always returns or raises


@functools.cache
def check_dependencies() -> None:
    """Resolve every name of :data:`DEPENDS_ON` once.

    Raises:
        UltralyticsMismatch: the first missing name, with the installed and the supported versions.
    """
    import ultralytics

    for dependency in DEPENDS_ON:
        try:
            resolve(dependency.name)
        except (AttributeError, ImportError):
            raise UltralyticsMismatch(
                f"Ultralytics {ultralytics.__version__} has no {dependency.name}, which yolo-batch uses for "
                f"{dependency.why}; yolo-batch supports Ultralytics {SUPPORTED}") from None
