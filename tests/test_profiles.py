"""Profiles: built-ins, the merge under explicit options, user files, AutoBatch caps and real runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from click.testing import CliRunner
from fakes import GIB, CurveGpu, FakeBackend, FakeDevice, fake_pynvml, linear
from trainer_spy import TrainerSpy

from yolo_batch import estimate_batch
from yolo_batch.cli import main
from yolo_batch.errors import InputError
from yolo_batch.profiles import (
    BUILTIN,
    InferSettings,
    load_profile,
    profile_from_dict,
    profile_to_yaml,
    train_config,
)
from yolo_batch.training.config import (
    BatchRequest,
    BnPolicy,
    LrScaling,
    Rounding,
    SizingConfig,
)


def merged(profile: str, data=None, **explicit):
    return train_config(load_profile(profile), model="yolo11n.yaml", data=data, batch=BatchRequest(),
                        epochs=explicit.pop("epochs", 100), **explicit)


def test_default_profile_is_todays_defaults():
    config = merged("default")
    assert config.sizing == SizingConfig()  # imgsz 640, pow2, nominal 64, fallback 16, no cap, bn auto
    assert dict(config.extra) == {} and config.image_window is None


def test_medical_and_inspection_settings():
    medical, inspection = BUILTIN["medical"], BUILTIN["inspection"]
    assert (medical.imgsz, medical.fallback_batch, medical.max_batch, medical.nominal_batch) == (1024, 2, 2, 64)
    assert medical.bn is BnPolicy.AUTO and medical.rect is None and medical.infer == InferSettings(batch=1)
    assert {medical.train_args[k] for k in ("hsv_h", "hsv_s", "hsv_v")} == {0.0}
    assert inspection.lr_scaling is LrScaling.LINEAR and inspection.max_batch is None
    assert inspection.rounding is Rounding.MULT8 and inspection.train_args["warmup_epochs"] > 0
    assert inspection.infer == InferSettings(batch="auto", half=True)


def test_explicit_options_override_the_profile(shapes_yaml):
    config = merged("medical", shapes_yaml, imgsz=64, rounding="none", nominal_batch=32, lr_scaling="sqrt", bn="train",
                    extra={"mosaic": 0.5, "rect": True})
    sizing = config.sizing
    assert (sizing.imgsz, sizing.rounding, sizing.nominal_batch) == (64, Rounding.NONE, 32)
    assert (sizing.lr_scaling, sizing.bn) == (LrScaling.SQRT, BnPolicy.TRAIN)
    assert (sizing.fallback_batch, sizing.max_batch, sizing.profile) == (2, 2, "medical")  # no option: the profile's
    assert config.extra["mosaic"] == 0.5 and config.extra["hsv_v"] == 0.0 and config.extra["rect"] is True
    untouched = merged("medical", shapes_yaml).sizing
    assert (untouched.imgsz, untouched.rounding, untouched.nominal_batch) == (1024, Rounding.POW2, 64)


def test_rect_auto_follows_the_images(shapes_yaml, copy_shared):
    from yolo_batch.training.data import inspect_dataset
    from yolo_batch.training.run import rect_batches

    medical, default = merged("medical", shapes_yaml), merged("default", shapes_yaml)
    assert (medical.rect, default.rect) == (None, False)  # decided when training starts, from the images
    shapes = inspect_dataset(shapes_yaml)
    bccd = inspect_dataset(copy_shared("bccd", n_train=4, n_val=2))
    assert shapes.square_images and not bccd.square_images  # 256x256 shapes; 640x480 smears
    assert rect_batches(None, {}, shapes) == ({}, None)
    assert rect_batches(None, {}, bccd) == ({"rect": True}, "rectangular batches: the training images are not "
                                                            "square (rect: auto)")
    assert rect_batches(False, {}, bccd) == ({}, None)
    assert rect_batches(None, {"rect": False}, bccd) == ({}, None)  # --set rect=... wins
    assert rect_batches(True, {}, shapes)[0] == {"rect": True}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtins_round_trip_through_yaml(tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(profile_to_yaml(BUILTIN[name]))
    assert load_profile(path) == BUILTIN[name]
    assert profile_to_yaml(load_profile(path)) == profile_to_yaml(BUILTIN[name])


def test_left_out_settings_take_the_default_profile():
    profile = profile_from_dict({"train": {"max_batch": 4}}, default_name="mine")
    assert profile == dataclasses.replace(BUILTIN["default"], name="mine", description="", max_batch=4)


# --- AutoBatch under a profile (fake GPUs) -------------------------------------------------------------------------


def test_medical_caps_autobatch_at_two_per_device(shapes_yaml):
    gpu = CurveGpu(linear(0.5, 0.1))  # 45 images would fit
    sizing = merged("medical", shapes_yaml, imgsz=64).sizing
    decision = estimate_batch(sizing, backend=FakeBackend(gpu), nvml=fake_pynvml([FakeDevice(total=10 * GIB, used=0)]))
    assert (decision.source, decision.batch, decision.accumulate, decision.effective_batch) == ("autobatch", 2, 32, 64)
    assert max(gpu.tried) == 2  # never probed past the cap
    assert "capped at 2 per device by the medical profile" in decision.reasons
    assert decision.lr_factor == 1.0 and decision.profile == "medical"


def test_medical_chooses_inside_the_cap(shapes_yaml):
    gpu = CurveGpu(linear(0.5, 0.5))  # budget 1.35 GiB: batch 1 (1.0 GiB) fits, batch 2 (1.5 GiB) does not
    decision = estimate_batch(merged("medical", shapes_yaml, imgsz=64).sizing, backend=FakeBackend(gpu),
                              nvml=fake_pynvml([FakeDevice(total=int(1.5 * GIB), used=0)]))
    assert (decision.batch, decision.accumulate, decision.effective_batch) == (1, 64, 64)


def test_an_explicit_batch_is_not_capped(shapes_yaml):
    sizing = dataclasses.replace(merged("medical", shapes_yaml, imgsz=64).sizing, batch=BatchRequest(fixed=8))
    decision = estimate_batch(sizing, backend=FakeBackend(CurveGpu(linear(0.5, 0.1))))
    assert decision.batch == 8 and not any("capped" in r for r in decision.reasons)


def test_inspection_takes_the_largest_batch_and_scales_lr_linearly(copy_shared):
    data = copy_shared("bccd")  # 291 training images
    gpu = CurveGpu(linear(0.5, 0.01))  # 850 would fit; the data caps at 291, mult8 rounds to 288
    decision = estimate_batch(merged("inspection", data, imgsz=64).sizing, backend=FakeBackend(gpu),
                              nvml=fake_pynvml([FakeDevice(total=10 * GIB, used=0)]))
    assert (decision.batch, decision.accumulate, decision.effective_batch) == (288, 1, 288)
    assert decision.lr_rule == "linear"  # the profile's rule, although auto would take sqrt for AdamW
    assert decision.lr_factor == pytest.approx(288 / 64)
    assert decision.lr0_after == pytest.approx(decision.lr0_before * 4.5)
    assert decision.pinned["lr0"] == pytest.approx(decision.lr0_after)


# --- The command line ----------------------------------------------------------------------------------------------


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_profiles_lists_every_setting_of_every_builtin():
    result = run("profiles")
    assert result.exit_code == 0, result.output
    for profile in BUILTIN.values():
        assert profile.name in result.output
        for key in profile.settings():
            assert key in result.output
    row = next(line for line in result.output.splitlines() if "train.max_batch" in line)
    assert row.split("│")[2:5] == [" null    ", " 2       ", " null       "]


def test_show_prints_yaml_that_loads_back():
    result = run("profiles", "show", "medical")
    assert result.exit_code == 0
    assert profile_from_dict(yaml.safe_load(result.output)) == BUILTIN["medical"]


def test_user_profile_show_edit_pass_back(tmp_path, shapes_yaml):
    shown = yaml.safe_load(run("profiles", "show", "medical").output)
    shown["name"] = "my-scans"
    shown["train"].update(imgsz=96, bn="freeze", image_window=[0, 4095])
    shown["train"]["args"]["fliplr"] = 0.0
    path = tmp_path / "my-scans.yaml"
    path.write_text(yaml.safe_dump(shown))
    assert run("profiles", "show", str(path)).output == profile_to_yaml(load_profile(path))
    result = CliRunner().invoke(main, ["autobatch", "--profile", str(path), "--data", str(shapes_yaml), "--json"])
    assert result.exit_code == 0, result.output
    decision = json.loads(result.stdout)
    assert (decision["imgsz"], decision["batch"], decision["profile"], decision["bn_policy"]) == (96, 2, "my-scans",
                                                                                                  "freeze")
    assert "capped at 2 per device by the my-scans profile" in decision["reasons"]
    config = train_config(load_profile(path), model="yolo11n.yaml", data=shapes_yaml, batch=BatchRequest(), epochs=1)
    assert config.image_window == (0.0, 4095.0) and config.extra["fliplr"] == 0.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("train: [unclosed", "malformed profile {path} at line 1: expected"),
        ("- a\n- b\n", "expected a mapping"),
        ("", "expected a mapping"),
        ("nmae: x\n", "unknown key 'nmae'"),
        ("train: 5\n", "train and infer must be mappings"),
        ("train:\n  imgs: 640\n", "unknown key 'train.imgs'"),
        ("train:\n  imgsz: big\n", "train.imgsz must be a positive multiple of 32, got 'big'"),
        ("train:\n  imgsz: true\n", "train.imgsz must be a positive multiple of 32, got True"),
        ("train:\n  imgsz: 100\n", "train.imgsz must be a positive multiple of 32, got 100"),
        ("train:\n  max_batch: 0\n", "train.max_batch must be an integer >= 1, got 0"),
        ("train:\n  rounding: pow3\n", "train.rounding must be one of pow2, mult8, none, got 'pow3'"),
        ("train:\n  bn: frozen\n", "train.bn must be one of auto, train, freeze, sync, got 'frozen'"),
        ("train:\n  rect: maybe\n", "train.rect must be true, false or auto"),
        ("train:\n  image_window: [5, 1]\n", "train.image_window: a window needs finite low < high"),
        ("train:\n  image_window: 5\n", "train.image_window must be null or [low, high]"),
        ("train:\n  args: [1]\n", "train.args must be a mapping"),
        ("train:\n  args:\n    batch: 8\n", "train.args may not set batch"),
        ("train:\n  args:\n    hsv_x: 0\n", "'hsv_x' is not a valid YOLO argument"),
        ("train:\n  args:\n    mosaic: 2.0\n", "'mosaic=2.0' is an invalid value"),
        ("infer:\n  batch: lots\n", "infer.batch must be 'auto' or an integer >= 1, got 'lots'"),
        ("infer:\n  batch: 4\n  max_latency_ms: 50\n", "infer.max_latency_ms applies to infer.batch auto only"),
        ("infer:\n  bacth: 4\n", "unknown key 'infer.bacth'"),
        (None, "profile file not found"),
    ],
)
def test_malformed_profile_is_one_line_exit_2(tmp_path, shapes_yaml, content, message):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (["autobatch", "--profile", str(path), "--data", str(shapes_yaml)],
                 ["train", "--profile", str(path), "--data", str(shapes_yaml), "--project", str(tmp_path / "runs")],
                 ["profiles", "show", str(path)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
        assert message.format(path=path) in lines[0]
        assert str(path) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_unknown_profile_name():
    result = CliRunner().invoke(main, ["autobatch", "--profile", "dental"])
    assert result.exit_code == 2
    assert result.output.strip() == ("Error: unknown profile 'dental': built-in profiles are default, inspection, "
                                     "medical, or pass a profile .yaml file")
    with pytest.raises(InputError, match="unknown profile"):
        load_profile("dental")


@pytest.mark.slow
def test_inspection_run_scales_lr0_and_keeps_warmup(tmp_path, monkeypatch, copy_shared):
    data = copy_shared("bccd", n_train=64, n_val=8)
    spy = TrainerSpy().install(monkeypatch)
    result = run("train", "--profile", "inspection", "--data", str(data), "--imgsz", "64", "--epochs", "2",
                 "--batch", "32", "--nominal-batch", "16", "--set", "optimizer=AdamW", "--set", "lr0=0.001",
                 "--set", "plots=False", "--set", "workers=0", "--project", str(tmp_path), "--name", "insp")
    assert result.exit_code == 0, result.output
    decision = json.loads((tmp_path / "insp" / "autobatch.json").read_text())
    run_args = yaml.safe_load((tmp_path / "insp" / "args.yaml").read_text())
    assert (decision["effective_batch"], decision["lr_rule"], decision["lr0_after"]) == (32, "linear",
                                                                                         pytest.approx(0.002))
    assert run_args["lr0"] == pytest.approx(0.002) and spy.initial_lr["weight"] == pytest.approx(0.002)
    assert run_args["warmup_epochs"] == 3.0
    # 2 batches per epoch, 2 epochs: Ultralytics warms up over min(3, epochs - 1) = 1 epoch, from 0 to lr0.
    weights = [lrs["weight"] for lrs in spy.lrs]
    assert weights[0] == 0.0 and weights[1] == pytest.approx(0.001)
    assert len(weights) == 4 and max(weights) == pytest.approx(0.002 * spy_lf(epoch=1, epochs=2))


def spy_lf(epoch: int, epochs: int, lrf: float = 0.01) -> float:
    """Ultralytics' linear schedule factor (BaseTrainer._setup_scheduler, cos_lr=False)."""
    return max(1 - epoch / epochs, 0) * (1.0 - lrf) + lrf


def test_infer_takes_the_profile_batch_unless_given():
    from yolo_batch.cli.infer import build_infer_config
    from yolo_batch.profiles import infer_settings, load_profile

    medical, inspection = load_profile("medical"), load_profile("inspection")
    assert infer_settings(medical, batch=None, half=None, max_latency_ms=None)["batch"] == "1"
    assert infer_settings(inspection, batch=None, half=None, max_latency_ms=None) == {
        "batch": "auto", "half": True, "max_latency_ms": None}
    assert infer_settings(inspection, batch="32", half=False, max_latency_ms=None)["batch"] == "32"
    opts = dict(profile="medical", model="yolo11n.yaml", batch=None, imgsz=64, device="cpu", half=None, conf=0.25,
                iou=0.7, max_det=300, classes=None, workers=None, threads=None, streams=None, backend="auto",
                precision="auto", no_cache=False)
    assert build_infer_config(("x",), opts).batch.fixed == 1
    assert build_infer_config(("x",), {**opts, "batch": "4"}).batch.fixed == 4
    assert build_infer_config(("x",), {**opts, "profile": "inspection"}).batch.is_auto
