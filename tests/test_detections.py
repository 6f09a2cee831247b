"""The per-image result value: column arrays, filtering, results.jsonl and supervision round trips."""

from __future__ import annotations

import numpy as np
import pytest
import supervision as sv

from yolo_batch import Detections
from yolo_batch.inference.engine import Detection
from yolo_batch.inference.writers import FailureRecord, ImageRecord

NAMES = {0: "circle", 1: "rectangle", 2: "triangle"}


def sample() -> Detections:
    boxes = (Detection(1, "rectangle", 0.9, (10.0, 20.0, 50.0, 60.0)),
             Detection(0, "circle", 0.4, (5.5, 6.25, 15.0, 16.0)),
             Detection(2, "triangle", 0.75, (70.0, 10.0, 90.0, 40.0)))
    record = ImageRecord("/data/a.jpg", 120, 80, boxes, {"decode": 1.5, "inference": 3.25, "batch": 4.0})
    return Detections.from_record(record, NAMES)


def test_columns_have_the_documented_shapes_and_types():
    d = sample()
    assert len(d) == 3 and d.ok
    assert d.xyxy.shape == (3, 4) and d.xyxy.dtype == np.float32
    assert d.confidence.shape == (3,) and d.confidence.dtype == np.float32
    assert d.class_id.shape == (3,) and d.class_id.dtype == np.int64
    assert list(d.class_name) == ["rectangle", "circle", "triangle"]
    assert (d.path, d.width, d.height) == ("/data/a.jpg", 120, 80)
    assert dict(d.names) == NAMES  # every class the model knows, not only those found
    with pytest.raises(ValueError):
        d.xyxy[0, 0] = 1.0  # a value: columns are read-only


def test_a_mask_filters_every_column_together():
    d = sample()
    keep = d[d.confidence > 0.5]
    assert len(keep) == 2 and list(keep.class_id) == [1, 2]
    np.testing.assert_array_equal(keep.xyxy, d.xyxy[[0, 2]])
    assert keep.path == d.path and keep.names == d.names
    assert len(d[d.class_id == 7]) == 0 and d[d.class_id == 7].xyxy.shape == (0, 4)


def test_mismatched_columns_are_refused():
    with pytest.raises(ValueError, match="column lengths differ"):
        Detections("x.jpg", 1, 1, np.zeros((2, 4)), np.zeros(1), np.zeros(2))


def test_results_jsonl_round_trip():
    d = sample()
    line = d.to_dict()
    assert line["detections"][1] == {"class_id": 0, "name": "circle", "confidence": 0.4, "box": [5.5, 6.25, 15.0, 16.0]}
    assert line["timing_ms"] == {"decode": 1.5, "inference": 3.25, "batch": 4.0}
    back = Detections.from_dict(line, NAMES)
    assert back.to_dict() == line
    assert dict(Detections.from_dict(line).names) == {1: "rectangle", 0: "circle", 2: "triangle"}


def test_failure_has_an_error_and_no_boxes():
    d = Detections.from_failure(FailureRecord("/data/bad.jpg", "corrupt", "truncated JPEG"), NAMES)
    assert not d.ok and d.error == "corrupt: truncated JPEG" and len(d) == 0
    assert len(d.to_supervision()) == 0


def test_supervision_round_trip_and_annotators():
    d = sample()
    converted = d.to_supervision()
    assert isinstance(converted, sv.Detections) and len(converted) == 3
    np.testing.assert_array_equal(converted.xyxy, d.xyxy)
    np.testing.assert_array_equal(converted.confidence, d.confidence)
    np.testing.assert_array_equal(converted.class_id, d.class_id)
    assert list(converted.data["class_name"]) == ["rectangle", "circle", "triangle"]
    assert converted.metadata["path"] == "/data/a.jpg"

    # supervision's own filtering, then back: the image fields travel in metadata
    back = Detections.from_supervision(converted[converted.confidence > 0.5])
    assert (back.path, back.width, back.height, dict(back.names)) == ("/data/a.jpg", 120, 80, NAMES)
    assert back.to_dict()["detections"] == [x for x in d.to_dict()["detections"] if x["confidence"] > 0.5]

    image = np.zeros((80, 120, 3), np.uint8)
    boxed = sv.BoxAnnotator().annotate(image.copy(), converted)
    labelled = sv.LabelAnnotator().annotate(boxed.copy(), converted)
    assert boxed[20, 10:50].any() and not image.any()  # the rectangle's top edge was drawn
    assert (labelled != boxed).any()  # labels read data["class_name"]

    zone = sv.PolygonZone(polygon=np.array([[0, 0], [60, 0], [60, 80], [0, 80]]))
    inside = zone.trigger(converted)
    assert list(inside) == [True, True, False] and zone.current_count == 2
