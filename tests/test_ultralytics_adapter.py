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


def test_every_ultralytics_name_we_depend_on_exists():
    from yolo_batch.ultralytics_adapter.names import check_dependencies, resolve

    check_dependencies()
    missing = []
    for dependency in ua.DEPENDS_ON:
        try:
            resolve(dependency.name)
        except (AttributeError, ImportError):
            missing.append(dependency.name)
    assert missing == []


def test_a_moved_name_is_one_line_naming_it_and_the_supported_versions(monkeypatch):
    from yolo_batch.ultralytics_adapter import names

    moved = names.Dependency("ultralytics.utils.checks.check_font_renamed", "fonts")
    monkeypatch.setattr(names, "DEPENDS_ON", (*names.DEPENDS_ON, moved))
    names.check_dependencies.cache_clear()
    try:
        with pytest.raises(ua.UltralyticsMismatch) as info:
            names.check_dependencies()
    finally:
        names.check_dependencies.cache_clear()
    message = str(info.value)
    assert "ultralytics.utils.checks.check_font_renamed" in message and "8.4.x" in message and "\n" not in message


def test_the_object_attributes_we_read_are_still_where_ultralytics_sets_them():
    ua.import_ultralytics()
    import inspect

    from ultralytics.engine.trainer import BaseTrainer

    setup = inspect.getsource(BaseTrainer)
    for attribute in ("self.accumulate =", "self.save_dir =", "self.model =", "self.metrics = self.validator("):
        assert attribute in setup, attribute
    model = ua.load_model("yolo11n.yaml")
    assert isinstance(model.model.yaml, dict)
    net = model.model
    for attribute in ("loss", "fuse", "stride", "names", "end2end"):
        assert hasattr(net, attribute), attribute


def test_ultralytics_first_epoch_oom_halving_is_still_gated_by_the_counter_we_set():
    """trainer_control keeps Ultralytics' own OOM halving from acting by setting ``_oom_retries`` above this limit
    before each step; if Ultralytics changes the condition, recovery could run twice."""
    ua.import_ultralytics()
    import inspect

    from ultralytics.engine.trainer import BaseTrainer

    from yolo_batch.ultralytics_adapter.trainer_control import NEVER_RETRY

    source = inspect.getsource(BaseTrainer._do_train)
    assert "if epoch > self.start_epoch or self._oom_retries >= 3 or RANK != -1:\n" in source
    assert "raise  # only auto-reduce" in source and NEVER_RETRY >= 3
    assert "if self._oom_retries and not self.stop:" in source  # reset to 0 when an epoch completes
    assert "self.scaler.scale(self.loss).backward()" in source  # the gate sits in scale()


def _patched_state():
    from ultralytics.data import utils as data_utils
    from ultralytics.engine import trainer
    from ultralytics.utils import checks, plotting

    return [m.check_font for m in (checks, plotting, data_utils)] + [trainer.check_amp]


def test_guards_apply_inside_a_call_only_and_are_restored_after_an_error():
    import inspect

    ua.import_ultralytics()
    from ultralytics.data import utils as data_utils
    from ultralytics.engine import trainer
    from ultralytics.utils import plotting

    before = _patched_state()
    with pytest.raises(RuntimeError, match="boom"), ua.offline():
        inside = _patched_state()
        assert ua.guards_active()
        raise RuntimeError("boom")
    assert not ua.guards_active()
    assert _patched_state() == before  # Ultralytics' own functions again
    assert [f.__name__ for f in inside] == ["local_font"] * 3 + ["check_amp"]
    assert all(a is not b for a, b in zip(inside, before))
    # Ultralytics calls them by these names from where it uses them: that is where they are replaced.
    assert "check_font(" in inspect.getsource(plotting.Annotator.__init__)
    assert "check_font(" in inspect.getsource(data_utils.check_det_dataset)
    assert "check_amp(" in inspect.getsource(trainer.BaseTrainer._setup_train)


def test_nested_and_concurrent_calls_keep_the_guards_until_the_last_one_ends():
    import threading

    ua.import_ultralytics()
    before = _patched_state()
    entered, release = threading.Event(), threading.Event()

    def other_call():
        with ua.offline():
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=other_call)
    with ua.offline():
        thread.start()
        assert entered.wait(10)
        with ua.offline():
            pass
    assert ua.guards_active() and _patched_state() != before  # the other thread is still inside
    release.set()
    thread.join(10)
    assert not ua.guards_active() and _patched_state() == before


@pytest.mark.parametrize("user_value", [None, "0", "1"])
def test_yolo_offline_is_set_for_a_call_and_a_user_value_is_respected(monkeypatch, user_value):
    import os

    if user_value is None:
        monkeypatch.delenv("YOLO_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("YOLO_OFFLINE", user_value)
    with ua.offline():
        assert os.environ.get("YOLO_OFFLINE") == (user_value or "1")  # DDP workers inherit it
    assert os.environ.get("YOLO_OFFLINE") == user_value  # ours is not left behind


def test_importing_the_package_and_the_cli_changes_nothing_and_loads_no_framework():
    import subprocess
    import sys

    script = (
        "import os, sys\n"
        "import yolo_batch, yolo_batch.cli, yolo_batch.inference, yolo_batch.serving, yolo_batch.serving.batcher\n"
        "heavy = sorted(m for m in ('ultralytics', 'torch', 'fastapi', 'uvicorn', 'cv2') if m in sys.modules)\n"
        "print(heavy, 'YOLO_OFFLINE' in os.environ)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "YOLO_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[] False"


def test_only_the_adapter_imports_ultralytics():
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*root.joinpath("yolo_batch").rglob("*.py"), *root.joinpath("datasets").rglob("*.py")]:
        if "ultralytics_adapter" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "ultralytics" or n.startswith("ultralytics.") for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


def test_fonts_come_from_disk_not_the_network(no_network):
    with ua.offline():
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
    with ua.offline():
        from ultralytics.engine import trainer

        model = ua.load_model("yolo11n.yaml").model
        assert trainer.check_amp(model) is False  # CPU: AMP off, decided without yolo26n.pt


class _AutocastBreaks(torch.nn.Module):
    """A model whose output under autocast is garbage: the comparison must catch it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        out = self.conv(x)
        return out * 3 + 1 if torch.is_autocast_enabled(x.device.type) else out


def test_amp_forward_comparison_runs_on_the_model_itself():
    model = ua.load_model("yolo11n.yaml").model
    assert ua.amp_forward_matches(model, imgsz=64) is True  # bf16 autocast on CPU stays close for a sound model
    assert model.training  # mode restored
    assert ua.amp_forward_matches(_AutocastBreaks(), imgsz=64) is False


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
    with pytest.raises(InputError, match="not a PyTorch weights file"):
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


def test_training_calls_do_not_pull_in_ray_tune_and_leave_the_settings_file_alone():
    ua.import_ultralytics()
    from ultralytics.utils import SETTINGS, callbacks

    before = dict(SETTINGS)
    settings_file = Path(SETTINGS.file).read_text()

    class FakeTrainer:  # add_integration_callbacks adds the training integrations to any "...Trainer"
        def __init__(self):
            self.callbacks = callbacks.get_default_callbacks()

    with ua.offline():
        from ultralytics import utils

        assert utils.SETTINGS["raytune"] is False
        trainer = FakeTrainer()
        callbacks.add_integration_callbacks(trainer)
    assert not any("raytune" in getattr(f, "__module__", "") for fs in trainer.callbacks.values() for f in fs)
    assert dict(utils.SETTINGS) == before and Path(SETTINGS.file).read_text() == settings_file


@pytest.mark.slow
def test_a_before_wrap_callback_runs_through_model_train(shapes_yaml, tmp_path):
    """``train`` switches to our trainer when a ``BEFORE_DDP_WRAP`` callback is registered; Ultralytics builds it
    through ``model.train(trainer=...)`` and it runs the callback once, with the model not yet moved or wrapped."""
    seen = []
    trainer = ua.train(ua.load_model("yolo11n.yaml"), {
        "data": str(shapes_yaml), "epochs": 1, "imgsz": 32, "batch": 16, "device": "cpu", "project": str(tmp_path),
        "name": "hooked", "plots": False, "val": False, "fraction": 0.25, "workers": 0,
    }, callbacks=[(ua.BEFORE_DDP_WRAP, lambda t: seen.append((type(t).__name__, type(t.model).__name__)))])
    assert seen == [("BeforeWrapDetectionTrainer", "DetectionModel")]
    assert (trainer.save_dir / "weights" / "last.pt").is_file()
