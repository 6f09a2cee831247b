"""The Ultralytics seam. These tests fail if Ultralytics moves what the adapter relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from yolo_batch import ultralytics_adapter as ua
from yolo_batch.errors import InputError


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test."""
    import socket

    import requests

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(requests, "head", refuse)
    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_the_patched_internals_still_exist_where_we_patch_them():
    ua.import_ultralytics()
    import inspect

    from ultralytics.data import utils as data_utils
    from ultralytics.engine import trainer
    from ultralytics.utils import checks, plotting

    # Ultralytics imports these by name into the modules that use them; that is where we replace them.
    for module in (checks, plotting, data_utils):
        assert getattr(module.check_font, "_yolo_batch_offline", False), module.__name__
    assert getattr(trainer.check_amp, "_yolo_batch_offline", False)
    assert "check_font(" in inspect.getsource(plotting.Annotator.__init__)
    assert "check_font(" in inspect.getsource(data_utils.check_det_dataset)
    assert "check_amp(" in inspect.getsource(trainer.BaseTrainer._setup_train)


def test_fonts_come_from_disk_not_the_network(no_network):
    ua.import_ultralytics()
    from ultralytics.utils import plotting

    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        path = Path(plotting.check_font(name))
        assert path.is_file() and path.suffix == ".ttf"
    annotator = plotting.Annotator(__import__("numpy").zeros((64, 64, 3), "uint8"), pil=True)
    annotator.box_label([2, 2, 40, 40], "défaut")  # non-ASCII label takes the Unicode font path
    assert annotator.result().shape == (64, 64, 3)


def test_dataset_check_does_not_fetch_fonts(no_network, shapes_yaml):
    assert ua.check_dataset(shapes_yaml)["nc"] == 4


def test_amp_check_never_downloads_reference_weights(no_network):
    ua.import_ultralytics()
    from ultralytics.engine import trainer

    model = ua.load_model("yolo11n.yaml").model
    assert trainer.check_amp(model) is False  # CPU: AMP off, decided without yolo26n.pt


def test_amp_forward_comparison_runs_on_the_model_itself():
    model = ua.load_model("yolo11n.yaml").model
    assert ua.amp_forward_matches(model, imgsz=64) in (True, False)
    assert model.training  # mode restored


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope.yaml", "unknown model 'nope.yaml'"),
        ("missing.pt", "model file not found: missing.pt"),
        ("yolo11n-cls.yaml", "is a classify model"),
        ("model.onnx", "unknown model 'model.onnx'"),
    ],
)
def test_load_model_rejects_bad_models(spec, message):
    with pytest.raises(InputError, match=message):
        ua.load_model(spec)


def test_load_model_rejects_a_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot load model"):
        ua.load_model(str(bad))


def test_load_model_reads_a_local_checkpoint(tmp_path):
    model = ua.load_model("yolo11n.yaml")
    path = tmp_path / "local.pt"
    model.save(path)
    assert ua.load_model(str(path)).task == "detect"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "data yaml not found"),
        ("train: [unclosed", "malformed data yaml"),
        ("- just\n- a list\n", "expected a mapping"),
        ("train: images/train\nnames: {0: a}\n", "'val:' key missing"),
        ("train: images/train\nval: images/val\nnames: {0: a}\n", "images not found"),
        ("train: images/train\nval: images/val\nnc: 2\nnames: {0: a}\n", "must match"),
    ],
)
def test_check_dataset_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "data.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        ua.check_dataset(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"lrr0": 0.1}, "'lrr0' is not a valid YOLO argument. Similar arguments are i.e. ['lr0=0.01']"),
        ({"lr0": "abc"}, "'lr0=abc' is of invalid type str"),
        ({"mosaic": 2.0}, "'mosaic=2.0' is an invalid value"),
    ],
)
def test_train_args_are_checked_by_ultralytics_rules(args, message, capsys):
    with pytest.raises(InputError) as info:
        ua.validate_train_args(args)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    assert "yolo TASK MODE ARGS" not in capsys.readouterr().out  # Ultralytics' CLI help is not dumped


def test_valid_train_args_pass():
    assert ua.validate_train_args({"mosaic": 0.5, "optimizer": "SGD"}) == {"mosaic": 0.5, "optimizer": "SGD"}


def test_detection_model_has_the_dataset_classes_and_loss_gains():
    model = ua.detection_model(ua.load_model("yolo11n.yaml"), nc=3, hyp={"box": 5.0})
    assert model.model[-1].nc == 3
    assert model.args.box == 5.0 and model.args.cls == 0.5
    assert isinstance(next(model.parameters()), torch.nn.Parameter)
