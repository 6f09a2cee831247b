"""Same boxes as Ultralytics ``predict`` on the same weights and images: within 1 px, same class, score
within 1e-3. Our batches hold one letterboxed shape, so the reference is what ``predict`` computes for
that shape: image by image for mixed shapes (a mixed ``predict`` batch is padded to a square, which
changes the network's input), and in batches for same-shape images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from inference_fixtures import bccd_images, detector, image_folder  # noqa: F401 (fixtures)

from yolo_batch.inference import (
    BatchSetting,
    Engine,
    InferConfig,
    NmsSettings,
    run_inference,
)
from yolo_batch.ultralytics_adapter import load_model, quiet

IMGSZ = 160
CONF = 0.15
BOX_PX = 1.0
SCORE = 1e-3


def rows_from_results(result) -> np.ndarray:
    b = result.boxes
    return np.concatenate([b.xyxy.numpy(), b.conf.numpy()[:, None], b.cls.numpy()[:, None]], 1).reshape(-1, 6)


def rows_from_ours(record: dict) -> np.ndarray:
    return np.array([[*d["box"], d["confidence"], d["class_id"]] for d in record["detections"]],
                    dtype=np.float64).reshape(-1, 6)


def unmatched(theirs: np.ndarray, ours: np.ndarray) -> tuple[list, list]:
    """Greedy one-to-one matching; returns the rows of each side that found no partner."""
    free = list(range(len(ours)))
    lost = []
    for row in theirs[np.argsort(-theirs[:, 4])]:
        hit = next((j for j in free if ours[j, 5] == row[5] and np.abs(ours[j, :4] - row[:4]).max() <= BOX_PX
                    and abs(ours[j, 4] - row[4]) <= SCORE), None)
        if hit is None:
            lost.append(row)
        else:
            free.remove(hit)
    return lost, [ours[j] for j in free]


def assert_parity(reference: dict[str, np.ndarray], ours: dict[str, np.ndarray]) -> int:
    assert set(reference) == set(ours)
    total = 0
    for path, theirs in reference.items():
        lost, extra = unmatched(theirs, ours[path])
        # A box whose score sits within float noise of conf may fall either side of it; nothing else may differ.
        borderline = [r for r in lost + extra if r[4] < CONF + SCORE]
        assert len(borderline) == len(lost) + len(extra), (path, lost[:3], extra[:3])
        total += len(theirs)
    return total


def run_ours(sources: list[str], model: Path, out: Path, batch: int) -> dict[str, np.ndarray]:
    config = InferConfig(sources=tuple(sources), model=str(model), out=out, imgsz=IMGSZ, conf=CONF,
                         batch=BatchSetting(batch), device="cpu", backend="torch", precision="fp32")
    summary = run_inference(config)
    assert summary.failed == 0
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == len({x["path"] for x in lines}) == summary.processed
    return {x["path"]: rows_from_ours(x) for x in lines}


def test_matches_predict_image_by_image_on_mixed_shapes(detector, image_folder, tmp_path):
    ours = run_ours([str(image_folder)], detector, tmp_path / "out", batch=4)
    model = load_model(str(detector))
    with quiet():
        reference = {p: rows_from_results(model.predict(p, imgsz=IMGSZ, conf=CONF, device="cpu", verbose=False)[0])
                     for p in ours}
    boxes = assert_parity(reference, ours)
    assert boxes > 50, "the detector should give enough boxes to compare"


def test_matches_batched_predict_on_same_shape_images(detector, tmp_path):
    images = [str(p) for p in bccd_images(8)]
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(images) + "\n")
    ours = run_ours([str(listing)], detector, tmp_path / "out", batch=4)
    model = load_model(str(detector))
    with quiet():
        reference = {r.path: rows_from_results(r) for r in
                     model.predict(str(listing), imgsz=IMGSZ, conf=CONF, device="cpu", batch=4, stream=True,
                                   verbose=False)}
    assert_parity(reference, ours)


def test_engine_predict_is_order_preserving_and_batch_independent(detector, image_folder):
    import cv2
    import torch

    engine = Engine.load(str(detector), torch.device("cpu"), False, IMGSZ, NmsSettings(conf=CONF))
    images = [cv2.imread(str(p)) for p in sorted(image_folder.iterdir())]
    one_by_one = [engine.predict([im])[0] for im in images]
    together = engine.predict(images, max_batch=3)
    assert len(together) == len(images)
    def rows(detections):
        return np.array([[*d.box, d.confidence, d.class_id] for d in detections]).reshape(-1, 6)

    for a, b in zip(one_by_one, together):
        assert unmatched(rows(a), rows(b)) == ([], [])
    with pytest.raises(ValueError):
        engine.predict(images, max_batch=0)
