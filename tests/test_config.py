from __future__ import annotations

import pytest

from yolo_batch.core.devices import parse_device
from yolo_batch.errors import InputError
from yolo_batch.training.config import BatchRequest, SizingConfig


@pytest.mark.parametrize(
    ("text", "fixed", "fraction", "error"),
    [
        ("-1", None, 0.9, None),
        ("16", 16, 0.9, None),
        ("1", 1, 0.9, None),
        ("0.7", None, 0.7, None),
        ("1.0", None, 1.0, None),
        ("0", None, None, "integer >= 1"),
        ("-2", None, None, "integer >= 1"),
        ("1.5", None, None, r"\(0, 1\]"),
        ("0.0", None, None, r"\(0, 1\]"),
        ("-0.5", None, None, r"\(0, 1\]"),
        ("abc", None, None, "got 'abc'"),
        ("nan", None, None, r"\(0, 1\]"),
    ],
)
def test_batch_request_parses_ultralytics_convention(text, fixed, fraction, error):
    if error:
        with pytest.raises(InputError, match=error):
            BatchRequest.parse(text)
        return
    request = BatchRequest.parse(text)
    assert request.fixed == fixed
    assert request.is_auto == (fixed is None)
    assert request.fraction == pytest.approx(fraction)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"imgsz": 100}, "multiple of 32"),
        ({"imgsz": 0}, "multiple of 32"),
        ({"imgsz": -64}, "multiple of 32"),
        ({"nominal_batch": 0}, "nominal"),
        ({"epochs": 0}, "epochs"),
        ({"lr0": 0.0}, "lr0"),
    ],
)
def test_sizing_config_rejects_bad_values(kwargs, error):
    with pytest.raises(InputError, match=error):
        SizingConfig(**kwargs)


@pytest.mark.parametrize(
    ("text", "count", "cuda", "error"),
    [
        (None, 0, (), None),
        (None, 2, (0,), None),
        ("cpu", 2, (), None),
        ("CPU", 0, (), None),
        ("0", 1, (0,), None),
        ("0,1", 2, (0, 1), None),
        ("cuda:1", 2, (1,), None),
        ("0", 0, None, "no CUDA device"),
        ("0,3", 2, None, "2 CUDA device"),
        ("mps", 0, None, "unknown device 'mps'"),
        ("gpu", 1, None, "unknown device"),
        ("0,0", 1, None, "twice"),
    ],
)
def test_parse_device(text, count, cuda, error):
    if error:
        with pytest.raises(InputError, match=error):
            parse_device(text, count)
        return
    selection = parse_device(text, count)
    assert selection.cuda == cuda
    assert selection.world_size == max(len(cuda), 1)
    assert selection.as_ultralytics() == ("cpu" if not cuda else ",".join(map(str, cuda)))
