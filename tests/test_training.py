"""Library-level training: what the decision promises is what Ultralytics' trainer does."""

from __future__ import annotations

import pytest
import yaml

from yolo_batch import BatchRequest, SizingConfig, TrainConfig, train
from yolo_batch.errors import InputError
from yolo_batch.training.run import split_train_args, ultralytics_overrides


def tiny(data, **sizing) -> TrainConfig:
    return TrainConfig(
        sizing=SizingConfig(data=data, imgsz=64, epochs=1, device="cpu", **sizing),
        extra={"plots": False, "workers": 0},
    )


def test_trainer_uses_the_decided_accumulation_and_pinned_lr(shapes_yaml, tmp_path):
    # 24 does not divide 64: accumulate round(64/24)=3, effective 72, so lr0 must be rescaled.
    config = tiny(shapes_yaml, batch=BatchRequest(fixed=24))
    seen = []
    result = train(TrainConfig(sizing=config.sizing, project=str(tmp_path), name="pinned", extra=config.extra),
                   on_decision=seen.append)
    decision = result.decision
    assert seen == [decision]
    assert (decision.accumulate, decision.effective_batch) == (3, 72)
    assert result.accumulate == decision.accumulate  # Ultralytics computed the same accumulation
    args = yaml.safe_load((result.save_dir / "args.yaml").read_text())
    assert args["optimizer"] == decision.optimizer == "AdamW"  # auto pinned to Ultralytics' own choice
    assert args["lr0"] == pytest.approx(decision.lr0_after)
    assert decision.lr0_after == pytest.approx(decision.lr0_before * (72 / 64) ** 0.5, rel=1e-6)
    assert args["warmup_epochs"] == 3.0  # warmup kept
    assert result.decision_path.is_file() and result.weights.is_file()


def test_pass_through_sizing_keys_are_lifted(shapes_yaml):
    sizing, rest = split_train_args(SizingConfig(data=shapes_yaml),
                                    {"optimizer": "SGD", "lr0": 0.02, "amp": False, "mosaic": 0.5})
    assert (sizing.optimizer, sizing.lr0, sizing.amp) == ("SGD", 0.02, False)
    assert rest == {"mosaic": 0.5}


def test_amp_strings_stay_for_ultralytics(shapes_yaml):
    sizing, rest = split_train_args(SizingConfig(data=shapes_yaml), {"amp": "fp32"})
    assert sizing.amp is False and rest == {"amp": "fp32"}


def test_overrides_map_the_decision(shapes_yaml):
    from yolo_batch import estimate_batch

    config = tiny(shapes_yaml, batch=BatchRequest(fixed=128))
    decision = estimate_batch(config.sizing)
    overrides = ultralytics_overrides(config, decision, shapes_yaml)
    assert overrides["batch"] == 128  # a fixed batch is the user's to choose
    assert overrides["nbs"] == 64 and overrides["device"] == "cpu"
    assert overrides["plots"] is False and overrides["data"] == str(shapes_yaml)
    assert (overrides["optimizer"], overrides["lr0"]) == ("AdamW", decision.lr0_after)  # pinned wins


def test_unknown_pass_through_key_fails_before_anything_runs(shapes_yaml, tmp_path):
    config = TrainConfig(sizing=SizingConfig(data=shapes_yaml, imgsz=64), project=str(tmp_path / "p"),
                         extra={"mosiac": 0.5})
    with pytest.raises(InputError, match="'mosiac' is not a valid YOLO argument"):
        train(config)
    assert not (tmp_path / "p").exists()
