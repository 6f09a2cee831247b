"""The public Python API: a stable ``__all__``, typed entry points that build the same configs as the CLI."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import yolo_batch
from yolo_batch import api
from yolo_batch.cli.infer import build_infer_config as cli_infer_config
from yolo_batch.cli.train import build_train_config as cli_train_config
from yolo_batch.errors import InputError
from yolo_batch.training.config import BatchRequest

PUBLIC = ["AutoBatchDecision", "BatchRequest", "Detections", "InferConfig", "InferenceSummary", "InputError",
          "Rounding", "SizingConfig", "TrainConfig", "TrainResult", "YoloBatchError", "__version__", "advise",
          "autobatch", "estimate_batch", "infer", "iter_detections", "save_autobatch_plot", "save_throughput_plot",
          "sweep", "train"]


def test_all_is_stable_and_every_name_resolves():
    assert yolo_batch.__all__ == PUBLIC  # adding or removing a public name is a decision: change this list too
    for name in PUBLIC:
        assert getattr(yolo_batch, name) is not None
    assert set(PUBLIC) <= set(dir(yolo_batch))


def test_every_public_function_is_typed():
    for name in PUBLIC:
        value = getattr(yolo_batch, name)
        if not inspect.isfunction(value):
            continue
        signature = inspect.signature(value)  # annotations stay strings (postponed): present is what counts
        missing = [p.name for p in signature.parameters.values() if p.annotation is inspect.Parameter.empty]
        assert not missing and signature.return_annotation is not inspect.Signature.empty, (name, missing)


def test_entries_document_themselves_with_an_example():
    for entry in (yolo_batch.train, yolo_batch.autobatch, yolo_batch.infer, yolo_batch.iter_detections,
                  yolo_batch.sweep, yolo_batch.advise):
        assert "Example::" in (entry.__doc__ or ""), entry.__name__


def test_importing_the_package_loads_no_framework():
    code = ("import sys, yolo_batch; yolo_batch.train; yolo_batch.iter_detections; yolo_batch.Detections; "
            "print(sorted(m for m in ('torch', 'ultralytics', 'cv2', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def options(**given):
    base = {"model": "yolo11n.yaml", "data": None, "profile": None, "imgsz": None, "device": None, "batch": None,
            "auto": False, "rounding": None, "nominal_batch": None, "lr_scaling": None, "bn": None, "epochs": 100,
            "no_cache": False, "extra": {}}
    return {**base, **given}


@pytest.mark.parametrize("cli, python", [
    ({}, {}),
    ({"batch": "0.7", "imgsz": 320, "epochs": 5}, {"batch": 0.7, "imgsz": 320, "epochs": 5}),
    ({"batch": "32", "profile": "inspection", "no_cache": True},
     {"batch": 32, "profile": "inspection", "cache": False}),
    ({"profile": "medical", "bn": "freeze", "extra": {"mosaic": 0.0}},
     {"profile": "medical", "bn": "freeze", "extra": {"mosaic": 0.0}}),
])
def test_train_keywords_build_what_the_command_builds(shapes_yaml, cli, python):
    from_cli = cli_train_config(options(data=shapes_yaml, **cli), project="p", name="n")
    from_python = api.build_train_config(data=shapes_yaml, project="p", name="n", **python)
    assert from_python == from_cli


@pytest.mark.parametrize("batch, expected", [
    (None, BatchRequest()), ("auto", BatchRequest()), (-1, BatchRequest()), ("-1", BatchRequest()),
    (0.5, BatchRequest(fraction=0.5)), (16, BatchRequest(fixed=16)), ("8", BatchRequest(fixed=8)),
    (0, InputError), (True, InputError), ("many", InputError), (1.5, InputError),
])
def test_batch_is_parsed_once_at_the_edge(batch, expected):
    if expected is InputError:
        with pytest.raises(InputError):
            api.build_train_config(batch=batch)
    else:
        assert api.build_train_config(batch=batch).sizing.batch == expected


def test_infer_keywords_build_what_the_command_builds(tmp_path):
    opts = {"model": "m.pt", "profile": "inspection", "batch": None, "half": None, "imgsz": 320, "device": "cpu",
            "conf": 0.3, "iou": 0.6, "max_det": 50, "classes": (0, 2), "workers": 2, "threads": None,
            "streams": None, "backend": "auto", "precision": "auto", "no_cache": False}
    from_cli = cli_infer_config(("images/",), opts, out=tmp_path, save_annotated=True)
    from_python = api.build_infer_config("images/", model="m.pt", profile="inspection", imgsz=320, device="cpu",
                                         conf=0.3, iou=0.6, max_det=50, classes=(0, 2), workers=2, out=tmp_path,
                                         save_annotated=True)
    assert from_python == from_cli
    assert str(from_python.batch) == "auto" and from_python.half is True  # the inspection profile's


def test_unknown_or_bad_inference_settings_are_one_clear_error():
    with pytest.raises(InputError, match=r"unknown inference setting\(s\) confidence .*known: .*conf"):
        api.build_infer_config("x", confidence=0.5)
    with pytest.raises(InputError, match="conf must be in"):
        yolo_batch.infer("x", conf=2.0)
    with pytest.raises(InputError, match="batch must be"):
        yolo_batch.infer("x", batch="lots")


def test_autobatch_entry_on_cpu_falls_back_with_its_reason(shapes_yaml):
    decision = yolo_batch.autobatch(data=shapes_yaml, imgsz=64, nominal_batch=32)
    assert decision.source == "fallback" and decision.batch == 16 and decision.accumulate == 2
    assert any("no CUDA GPU found" in r for r in decision.reasons)
    assert yolo_batch.autobatch(api.build_train_config(data=shapes_yaml, imgsz=64, batch=8)).batch == 8
