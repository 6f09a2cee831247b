"""``bench accuracy``: each runtime and precision through ``infer`` itself, scored against labels and torch fp32.

Every runtime runs the same images through :func:`run_inference` once, at conf 0.001 and max_det 300 (what
Ultralytics' ``val`` scores mAP at). The contract's comparisons at conf 0.25 and 0.1 are taken from that same
output: NMS is per class and a lower-scored box never suppresses a higher-scored one, so the boxes above 0.25 of
a run at 0.001 are those of a run at 0.25 (unless max_det cut them, which 300 boxes per image does not for the
sets this is meant for). The pure scoring is :mod:`yolo_batch.inference.accuracy`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yolo_batch import ultralytics_adapter
from yolo_batch.core.checks import check_imgsz
from yolo_batch.core.devices import inference_device
from yolo_batch.errors import InputError
from yolo_batch.inference.accuracy import AccuracyReport, AccuracyRow, accuracy_row, correct_at_thresholds
from yolo_batch.inference.config import BatchSetting, InferConfig
from yolo_batch.inference.runner import run_inference
from yolo_batch.inference.runtimes.choice import BACKENDS, PRECISIONS, HostFacts, precisions, unavailable
from yolo_batch.inference.runtimes.host import host_facts
from yolo_batch.inference.writers import journal_records

REFERENCE = ("torch", "fp32")
MAP_CONF = 0.001
MAP_MAX_DET = 300


def parse_runtime(text: str) -> tuple[str, str]:
    """``backend:precision`` (``openvino:bf16``) -> the pair; a name that is not concrete is one line.

    Raises:
        InputError: not of that form, or ``auto`` in either half.
    """
    backend, sep, precision = text.partition(":")
    concrete_backends = [b for b in BACKENDS if b != "auto"]
    concrete_precisions = [p for p in PRECISIONS if p != "auto"]
    if not sep or backend not in concrete_backends or precision not in concrete_precisions:
        raise InputError(f"runtime '{text}' is not BACKEND:PRECISION with BACKEND one of "
                         f"{', '.join(concrete_backends)} and PRECISION one of {', '.join(concrete_precisions)}")
    return backend, precision


def host_runtimes(facts: HostFacts) -> list[tuple[str, str]]:
    """Every backend and precision that runs on this host, torch fp32 first."""
    found = [REFERENCE]
    for backend in (b for b in BACKENDS if b != "auto"):
        if unavailable(backend, facts) is None:
            found += [(backend, p) for p, why in precisions(backend, facts).items() if why is None]
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class AccuracyBenchConfig:
    """One ``bench accuracy`` run. ``images``: a folder of a YOLO-layout split (labels by Ultralytics' rule)."""

    images: str
    model: str
    runtimes: tuple[tuple[str, str], ...] = ()  # empty: every one this host runs
    imgsz: int = 640
    device: str | None = None
    batch: int = 16

    def __post_init__(self) -> None:
        check_imgsz(self.imgsz)
        BatchSetting(self.batch)
        if not str(self.model).endswith(".pt"):
            raise InputError(f"bench accuracy needs trained weights (a .pt file), got '{self.model}'")
        if not Path(self.images).is_dir():
            raise InputError(f"{self.images} is not a folder: give a split's images folder (images/val) whose "
                             "labels are in the matching labels/ folder")


def read_labels(label_file: Path, width: int, height: int) -> np.ndarray:
    """A YOLO label file -> (m, 5) ``x1 y1 x2 y2 class`` in pixels; polygon rows become their bounding box."""
    rows = []
    text = label_file.read_text() if label_file.is_file() else ""
    for number, line in enumerate(text.splitlines(), 1):
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            raise InputError(f"{label_file}:{number}: not a label row (class x y w h): {line.strip()!r}") from None
        if len(values) < 5:
            continue
        cls, coords = values[0], np.array(values[1:])
        if len(coords) == 4:
            cx, cy, w, h = coords
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        else:
            xs, ys = coords[0::2], coords[1::2]
            box = [xs.min(), ys.min(), xs.max(), ys.max()]
        rows.append([box[0] * width, box[1] * height, box[2] * width, box[3] * height, cls])
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def _detections(out: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    found, sizes = {}, {}
    for record in journal_records(out):
        found[record["path"]] = np.array([[*d["box"], d["confidence"], d["class_id"]] for d in record["detections"]],
                                         dtype=np.float64).reshape(-1, 6)
        sizes[record["path"]] = (int(record["width"]), int(record["height"]))
    return found, sizes


def _mean_ap(found: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> tuple[float, float]:
    names = sorted(labels)
    empty = np.zeros((0, 6))
    correct = [correct_at_thresholds(found.get(n, empty), labels[n]) for n in names]
    return ultralytics_adapter.mean_average_precision(
        correct, [found.get(n, empty)[:, 4] for n in names], [found.get(n, empty)[:, 5] for n in names],
        [labels[n][:, 4] for n in names])


def run_accuracy_bench(config: AccuracyBenchConfig,
                       on_runtime: Callable[[AccuracyRow], None] | None = None) -> AccuracyReport:
    """Run every runtime of ``config`` and score it (torch fp32 first: the reference).

    Raises:
        InputError: bad images folder, model, device, a runtime that cannot run here, or no labels found.
    """
    device, _ = inference_device(config.device, None)
    wanted: Sequence[tuple[str, str]] = config.runtimes or host_runtimes(host_facts(device))
    runtimes = [REFERENCE, *(r for r in wanted if r != REFERENCE)]
    rows: list[AccuracyRow] = []
    with tempfile.TemporaryDirectory(prefix="yolo-batch-accuracy-") as scratch:
        reference: dict[str, np.ndarray] = {}
        labels: dict[str, np.ndarray] = {}
        for backend, precision in runtimes:
            out = Path(scratch) / f"{backend}-{precision}"
            run_inference(InferConfig(sources=(config.images,), model=config.model, out=out, imgsz=config.imgsz,
                                      conf=MAP_CONF, max_det=MAP_MAX_DET, batch=BatchSetting(config.batch),
                                      device=config.device, backend=backend, precision=precision, overwrite=True))
            found, sizes = _detections(out)
            if not labels:
                label_files = ultralytics_adapter.label_paths(sorted(sizes))
                if not any(f.is_file() for f in label_files):
                    raise InputError(f"no labels found for the images in {config.images}: bench accuracy needs a "
                                     "YOLO-layout split (images/<split> beside labels/<split>)")
                labels = {p: read_labels(f, *sizes[p]) for p, f in zip(sorted(sizes), label_files)}
                reference = found
            row = accuracy_row(backend, precision, found, reference, _mean_ap(found, labels))
            rows.append(row)
            if on_runtime is not None:
                on_runtime(row)
    return AccuracyReport(model=str(config.model), images=len(labels), labels=sum(len(v) for v in labels.values()),
                          imgsz=config.imgsz, device=str(device), rows=tuple(rows))
