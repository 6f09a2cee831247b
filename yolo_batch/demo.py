"""``yolo-batch demo`` (``make demo``): the first ten minutes, from nothing to a detector and pictures of it.

1. Generate the built-in ``big-shapes`` set (cached; about two seconds): four classes of shapes at 128x128.
2. ``train``: the same AutoBatch decision and Ultralytics training as any run, from ``yolo11n.yaml`` (random
   weights: nothing is downloaded), under the :data:`DEMO_PROFILE`.
3. ``infer --batch auto --save-annotated`` with the trained weights on the validation images.

Why these settings (so the demo learns in minutes on a 2-core CPU and on a GPU alike): a model trained from
scratch needs optimizer steps, not epochs. ``big-shapes`` has 256 training images, so batch 16 gives 16 steps
per epoch; the profile sets the nominal batch to 16 (no gradient accumulation: with the default nominal 64 the
optimizer would step once per 4 batches) and caps AutoBatch at 16 per device, so a GPU, which measures instead
of falling back, keeps the same number of steps instead of taking all 256 images in one batch. Objects are
large (about a quarter of the image) and at most four per image, so 128 px is enough to see them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolo_batch.core.models import DEFAULT_MODEL
from yolo_batch.core.progress import ProgressReporter, Reporter
from yolo_batch.inference.summary import InferenceSummary
from yolo_batch.inference.throughput import ThroughputChoice
from yolo_batch.profiles import BUILTIN, Profile
from yolo_batch.training.decision import AutoBatchDecision
from yolo_batch.training.run import TrainResult

DEMO_DATASET = "big-shapes"
DEMO_PROFILE: Profile = dataclasses.replace(
    BUILTIN["default"], name="demo",
    description="the demo's: nominal batch 16 and AutoBatch capped at 16 per device, so 256 training images "
                "give 16 optimizer steps per epoch on a CPU and on a GPU",
    imgsz=128, nominal_batch=16, max_batch=16,
)


@dataclass(frozen=True)
class DemoConfig:
    """What ``yolo-batch demo`` runs; the defaults are the measured ones (README: wall time on a 2-core CPU)."""

    dataset: str = DEMO_DATASET
    model: str = DEFAULT_MODEL
    epochs: int = 12
    imgsz: int = 128
    device: str | None = None
    project: str = "runs/demo"
    name: str = "train"
    extra: Mapping[str, Any] = field(default_factory=dict)  # more Ultralytics train arguments (--set)


@dataclass(frozen=True)
class DemoResult:
    """Where everything went."""

    data: Path
    train: TrainResult
    infer: InferenceSummary
    wall_s: float

    @property
    def annotated(self) -> Path:
        return Path(self.infer.out_dir) / "annotated"

    def lines(self) -> list[str]:
        """What to look at, one line each, ending with the final mAP."""
        from yolo_batch.render import train_result_lines

        infer_dir = Path(self.infer.out_dir)
        lines = [f"demo: done in {self.wall_s:.0f} s (data: {self.data})"]
        lines += train_result_lines(self.train)[:-1]
        curves = self.train.save_dir / "results.png"
        if curves.exists():
            lines.append(f"curves:     {curves}")
        lines.append(f"detections: {infer_dir / 'results.jsonl'} ({self.infer.detections} boxes on "
                     f"{self.infer.processed} validation images)")
        lines.append(f"annotated:  {self.annotated}/")
        if self.infer.throughput_plot:
            lines.append(f"throughput: {self.infer.throughput_plot} (inference batch {self.infer.batch}, chosen by "
                         "measurement)")
        lines.append(self.train.metrics_line())
        return lines


def run_demo(config: DemoConfig | None = None, *, on_decision: Callable[[AutoBatchDecision], None] | None = None,
             progress: Reporter | None = None, infer_progress: ProgressReporter | None = None,
             on_batch_choice: Callable[[ThroughputChoice], None] | None = None) -> DemoResult:
    """Generate the data, train, then infer on the validation images with annotated copies.

    Raises:
        InputError: a bad device or model.
    """
    from yolo_batch_datasets import cached_dataset

    from yolo_batch.inference.config import BatchSetting, InferConfig
    from yolo_batch.inference.runner import run_inference
    from yolo_batch.profiles import train_config
    from yolo_batch.training.config import BatchRequest
    from yolo_batch.training.data import cache_dir
    from yolo_batch.training.run import train

    config = config or DemoConfig()
    start = time.perf_counter()
    data = cached_dataset(config.dataset, cache_dir() / "datasets")
    training = train_config(DEMO_PROFILE, model=config.model, data=data, batch=BatchRequest(), epochs=config.epochs,
                            device=config.device, imgsz=config.imgsz, project=str(Path(config.project).resolve()),
                            name=config.name, extra=config.extra)
    result = train(training, on_decision=on_decision, progress=progress)
    if result.weights is None:  # only a multi-GPU run keeps its weights in worker processes' reach
        raise RuntimeError(f"training left no weights in {result.save_dir}")
    inference = InferConfig(sources=(str(data.parent / "images" / "val"),), model=str(result.weights),
                            out=result.save_dir / "infer", batch=BatchSetting(None), imgsz=config.imgsz,
                            device=config.device, save_annotated=True, overwrite=True)
    summary = run_inference(inference, progress=infer_progress, on_batch_choice=on_batch_choice)
    return DemoResult(data=data, train=result, infer=summary, wall_s=time.perf_counter() - start)
