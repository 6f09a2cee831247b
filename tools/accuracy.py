"""Accuracy of each runtime and precision through ``yolo-batch infer`` itself (the numbers in docs/benchmarks.md).

For every ``backend:precision`` given, on a YOLO-layout validation split:

* mAP50 and mAP50-95 of the run's ``results.jsonl`` (conf 0.001, as Ultralytics ``val``), scored with Ultralytics'
  own ``ap_per_class`` and its matching rule (IoU thresholds 0.50:0.95, one prediction per label);
* agreement with PyTorch fp32 at conf 0.25: the share of detections above 0.25 that have a same-class box with
  IoU >= 0.9 on the other side (the other side at conf 0.1), both ways; and for fp32 runtimes the share within
  1 px.

    python tools/accuracy.py --model bccd.pt --data ../shared/datasets/bccd --imgsz 320 \
        torch:fp32 torch:bf16 openvino:fp32 openvino:bf16 onnxruntime:fp32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("YOLO_OFFLINE", "1")


def run(model: str, images: Path, out: Path, imgsz: int, backend: str, precision: str, conf: float) -> dict:
    from yolo_batch.inference import BatchSetting, InferConfig, run_inference

    summary = run_inference(InferConfig(sources=(str(images),), model=model, out=out, imgsz=imgsz, conf=conf,
                                        batch=BatchSetting(16), device="cpu", backend=backend, precision=precision,
                                        overwrite=True, max_det=300))
    assert summary.failed == 0 and summary.backend == backend and summary.precision == precision, summary
    rows = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        rows[Path(record["path"]).name] = np.array(
            [[*d["box"], d["confidence"], d["class_id"]] for d in record["detections"]], dtype=np.float64
        ).reshape(-1, 6)
    return rows


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def labels(data: Path, split: str, name: str, width: int, height: int) -> np.ndarray:
    path = data / "labels" / split / (Path(name).stem + ".txt")
    rows = np.loadtxt(path, ndmin=2) if path.exists() and path.stat().st_size else np.zeros((0, 5))
    cls, cx, cy, w, h = rows.T if len(rows) else (np.zeros(0),) * 5
    return np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height,
                     cls], 1) if len(rows) else np.zeros((0, 5))


def mean_ap(predictions: dict, data: Path, split: str) -> tuple[float, float]:
    """Ultralytics' matching (``DetectionValidator.match_predictions``) and ``ap_per_class``."""
    import cv2
    from ultralytics.utils.metrics import ap_per_class

    thresholds = np.linspace(0.5, 0.95, 10)
    tps, confs, pred_cls, target_cls = [], [], [], []
    for name, pred in predictions.items():
        height, width = cv2.imread(str(data / "images" / split / name)).shape[:2]
        truth = labels(data, split, name, width, height)
        target_cls.append(truth[:, 4])
        correct = np.zeros((len(pred), len(thresholds)), bool)
        if len(pred) and len(truth):
            iou = iou_matrix(truth[:, :4], pred[:, :4]) * (truth[:, 4:5] == pred[None, :, 5])
            for k, t in enumerate(thresholds):
                matches = np.array(np.nonzero(iou >= t)).T
                if len(matches):
                    matches = matches[iou[matches[:, 0], matches[:, 1]].argsort()[::-1]]
                    matches = matches[np.unique(matches[:, 1], return_index=True)[1]]
                    matches = matches[np.unique(matches[:, 0], return_index=True)[1]]
                    correct[matches[:, 1].astype(int), k] = True
        tps.append(correct)
        confs.append(pred[:, 4])
        pred_cls.append(pred[:, 5])
    result = ap_per_class(np.concatenate(tps), np.concatenate(confs), np.concatenate(pred_cls),
                          np.concatenate(target_cls))
    ap = result[5]  # (classes, 10)
    return float(ap[:, 0].mean()), float(ap.mean())


def agreement(ours: dict, theirs_low: dict, conf: float = 0.25) -> float:
    hits = total = 0
    for name, rows in ours.items():
        for row in rows[rows[:, 4] >= conf]:
            total += 1
            same = theirs_low[name][theirs_low[name][:, 5] == row[5]]
            hits += bool(len(same) and iou_matrix(row[None, :4], same[:, :4]).max() >= 0.9)
    return hits / max(total, 1)


def within_1px(ours: dict, reference: dict) -> float:
    hits = total = 0
    for name, rows in reference.items():
        for row in rows:
            total += 1
            other = ours[name][ours[name][:, 5] == row[5]]
            hits += bool(len(other) and np.abs(other[:, :4] - row[:4]).max(1).min() <= 1.0)
    return hits / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder with images/<split> and labels/<split>")
    parser.add_argument("--split", default="val")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("runtimes", nargs="+", help="backend:precision, e.g. openvino:bf16")
    args = parser.parse_args()
    images = args.data / "images" / args.split
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        reference = {conf: run(args.model, images, out / f"ref{conf}", args.imgsz, "torch", "fp32", conf)
                     for conf in (0.25, 0.1)}
        print(f"{'runtime':<20} {'mAP50':>7} {'mAP50-95':>9} {'>=0.25 matched':>15} {'ref matched':>12} {'1 px':>6}")
        for spec in args.runtimes:
            backend, precision = spec.split(":")
            low = run(args.model, images, out / f"{spec}-map", args.imgsz, backend, precision, 0.001)
            m50, m = mean_ap(low, args.data, args.split)
            high = run(args.model, images, out / f"{spec}-high", args.imgsz, backend, precision, 0.25)
            mid = run(args.model, images, out / f"{spec}-mid", args.imgsz, backend, precision, 0.1)
            share, back = agreement(high, reference[0.1]), agreement(reference[0.25], mid)
            px = within_1px(high, reference[0.25])
            print(f"{spec:<20} {m50:7.4f} {m:9.4f} {share:15.3f} {back:12.3f} {px:6.3f}", flush=True)


if __name__ == "__main__":
    main()
