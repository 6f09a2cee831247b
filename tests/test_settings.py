"""The trainer's memory-relevant settings, resolved by Ultralytics' rules (pure, plain values)."""

from __future__ import annotations

import pytest

from yolo_batch import ultralytics_adapter as ua
from yolo_batch.training.settings import MEMORY_ARGS, freeze_fragments, resolve_trainer_settings

DEFAULTS = {"amp": True, "channels_last": None, "deterministic": True, "seed": 0, "multi_scale": 0.0, "freeze": None,
            "compile": False}


def resolve(args=None, **kw):
    options = {"imgsz": 640, "amp": True, "optimizer": "SGD", "device_type": "cuda", "system": "Linux", **kw}
    return resolve_trainer_settings(args or {}, DEFAULTS, **options)


def test_our_defaults_are_ultralytics_defaults():
    assert ua.default_train_args(MEMORY_ARGS) == DEFAULTS


@pytest.mark.parametrize(
    ("args", "kw", "field", "value"),
    [
        ({}, {}, "precision", "fp16"),
        ({}, {}, "amp_check", True),  # fp16 stays on only if Ultralytics' AMP check passes on the GPU
        ({"amp": "bf16"}, {}, "precision", "bf16"),
        ({"amp": "bf16"}, {}, "amp_check", False),  # Ultralytics runs no AMP check for bf16
        ({}, {"amp": False}, "precision", "fp32"),
        ({}, {}, "channels_last", True),  # None: on for CUDA ...
        ({}, {"system": "Windows"}, "channels_last", False),  # ... except on Windows
        ({"channels_last": True}, {"system": "Windows"}, "channels_last", True),
        ({"channels_last": False}, {}, "channels_last", False),
        ({"channels_last": True}, {"device_type": "cpu"}, "channels_last", False),  # CUDA-only in the trainer
        ({}, {}, "deterministic", True),
        ({"deterministic": False}, {}, "deterministic", False),
        ({}, {}, "imgsz", 640),
        ({"multi_scale": 0.5}, {}, "imgsz", 960),
        ({"multi_scale": 0.25}, {"imgsz": 320}, "imgsz", 416),  # 400 rounded up to the stride
        ({"multi_scale": 0.25}, {"imgsz": 320, "stride": 64}, "imgsz", 448),
        ({"compile": True}, {}, "compile", "default"),
        ({"compile": "max-autotune-no-cudagraphs"}, {}, "compile", "max-autotune-no-cudagraphs"),
        ({}, {}, "compile", None),
        ({"freeze": 2}, {}, "freeze", ("model.0.", "model.1.", ".dfl")),
        ({"freeze": [4, "23.cv2"]}, {}, "freeze", ("model.4.", "model.23.cv2.", ".dfl")),
        ({}, {}, "freeze", (".dfl",)),
        ({}, {"optimizer": "auto", "n_train": 64, "epochs": 1}, "optimizer", "AdamW"),
        # 640k images x 10 epochs: MuSGD at any batch up to the cap
        ({}, {"optimizer": "auto", "n_train": 640_000, "epochs": 10, "max_total_batch": 64}, "optimizer", "MuSGD"),
        # ... but a large enough batch cuts the iterations below Ultralytics' 10k threshold: AdamW, the heavier
        ({}, {"optimizer": "auto", "n_train": 100_000, "epochs": 10, "max_total_batch": 512}, "optimizer", "AdamW"),
    ],
)
def test_resolve_trainer_settings(args, kw, field, value):
    assert getattr(resolve(args, **kw), field) == value


def test_every_departure_from_plain_training_is_explained():
    settings = resolve({"multi_scale": 0.5, "compile": True}, optimizer="auto", n_train=100_000, epochs=10,
                       max_total_batch=512)
    assert settings.reasons == (
        "multi_scale=0.5: probed at imgsz 960, the largest size a batch reaches",
        "compile=default: probed eagerly (compiled graphs usually need less activation memory)",
        "optimizer=auto: probed with AdamW, Ultralytics' choice for this run at some batch sizes (the heavier of "
        "the two)",
    )
    assert "reasons" not in settings.key() and settings.key()["freeze"] == [".dfl"]


def test_freeze_rejects_what_ultralytics_would_not_read():
    with pytest.raises(ValueError, match="freeze must be an int or a list"):
        freeze_fragments("3")


def test_the_determinism_switch_is_ultralytics_and_leaves_nothing_behind(monkeypatch):
    import os
    import random

    import numpy as np
    import torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with ua.determinism(True, seed=7):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # what the trainer sets when it is built
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and "PYTHONHASHSEED" not in os.environ
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    after = (random.random(), np.random.rand(), torch.rand(1))
    assert after[:2] == expected[:2] and torch.equal(after[2], expected[2])  # the caller's random streams go on
