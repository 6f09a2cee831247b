from __future__ import annotations

import math

import pytest

from yolo_batch.training.config import LrScaling
from yolo_batch.training.scaling import accumulate_for, auto_optimizer, plan_scaling


@pytest.mark.parametrize(
    ("total", "nominal", "expected"),
    [(1, 64, 64), (2, 64, 32), (16, 64, 4), (24, 64, 3), (40, 64, 2), (64, 64, 1), (128, 64, 1), (96, 64, 1)],
)
def test_accumulate_matches_ultralytics_formula(total, nominal, expected):
    assert accumulate_for(total, nominal) == expected


def test_accumulate_is_capped_by_the_iterations_of_a_short_run():
    assert accumulate_for(2, 64, n_train=8, epochs=1) == 4  # only 4 batches exist


def plan(**kw):
    defaults = dict(batch=16, world_size=1, nominal_batch=64, optimizer="SGD", lr0=0.01, momentum=0.937,
                    rule=LrScaling.AUTO, n_train=10_000, epochs=100, nc=3)
    return plan_scaling(**{**defaults, **kw})


def test_pow2_batches_below_nominal_keep_lr0():
    scale = plan(batch=16)
    assert (scale.accumulate, scale.effective_batch, scale.lr_factor, scale.lr0_after) == (4, 64, 1.0, 0.01)
    assert scale.pinned == {}


def test_large_batch_scales_sgd_linearly_through_ultralytics_summed_loss():
    """Ultralytics sums the loss over the effective batch: SGD's step already grows x4 at 256 vs 64, so the linear
    rule is met with lr0 unchanged (multiplying lr0 too would grow the step x16)."""
    scale = plan(batch=256)
    assert (scale.accumulate, scale.effective_batch, scale.lr_rule) == (1, 256, "linear")
    assert (scale.lr_factor, scale.step_factor, scale.lr0_after) == (1.0, pytest.approx(4.0), 0.01)
    assert scale.pinned == {}
    assert "Ultralytics' summed loss already grows SGD's step x4" in scale.reasons[0]


def test_adam_family_scales_by_square_root():
    scale = plan(batch=256, optimizer="AdamW", lr0=0.001)
    assert scale.lr_rule == "sqrt"
    assert scale.lr0_after == pytest.approx(0.002)  # Adam normalises the summed gradient: all of it is explicit
    assert scale.step_factor == pytest.approx(2.0)


@pytest.mark.parametrize(("optimizer", "rule", "effective", "lr0_factor", "step_factor"), [
    ("SGD", LrScaling.LINEAR, 256, 1.0, 4.0),
    ("SGD", LrScaling.SQRT, 256, 0.5, 2.0),  # the summed loss gives x4; sqrt wants x2
    ("SGD", LrScaling.LINEAR, 16, 1.0, 0.25),  # below nominal: the step shrinks with the sum
    ("MuSGD", LrScaling.LINEAR, 256, 1.0, 4.0),
    ("AdamW", LrScaling.LINEAR, 256, 4.0, 4.0),
    ("AdamW", LrScaling.SQRT, 16, 0.5, 0.5),
    ("RMSprop", LrScaling.SQRT, 256, 2.0, 2.0),  # adaptive, like Adam
    ("SGD", LrScaling.NONE, 256, 0.25, 1.0),  # none: the step stays as at the nominal batch
    ("AdamW", LrScaling.NONE, 256, 1.0, 1.0),
])
def test_lr0_is_scaled_by_what_the_rule_asks_beyond_the_summed_loss(optimizer, rule, effective, lr0_factor,
                                                                     step_factor):
    scale = plan(batch=effective, optimizer=optimizer, rule=rule, accumulate_to=effective)  # no accumulation
    assert scale.effective_batch == effective
    assert (scale.lr_factor, scale.step_factor) == (pytest.approx(lr0_factor), pytest.approx(step_factor))


def test_explicit_rule_wins_and_none_keeps_the_step():
    assert plan(batch=256, optimizer="AdamW", rule=LrScaling.LINEAR).lr_factor == pytest.approx(4.0)
    adam = plan(batch=256, optimizer="AdamW", lr0=0.001, rule=LrScaling.NONE)
    assert adam.lr_factor == 1.0 and adam.lr0_after == 0.001 and adam.pinned == {}
    sgd = plan(batch=256, rule=LrScaling.NONE)  # the sum would grow SGD's step x4: lr0 takes it back
    assert sgd.lr0_after == pytest.approx(0.0025) and sgd.pinned == {"optimizer": "SGD", "lr0": pytest.approx(0.0025)}


def test_non_pow2_batch_rounds_accumulation():
    scale = plan(batch=24)  # accumulate round(64/24) = 3 -> effective 72: the sum grows SGD's step x72/64
    assert scale.effective_batch == 72
    assert scale.lr0_after == 0.01 and scale.step_factor == pytest.approx(72 / 64)


def test_auto_optimizer_is_pinned_to_ultralytics_choice_when_lr_changes():
    scale = plan(batch=128, optimizer="auto", n_train=500, epochs=10, nc=3)
    name, lr, _ = auto_optimizer(500, 128, 64, 10, 3)
    assert name == "AdamW"  # few iterations: Ultralytics picks AdamW with its fitted lr
    assert lr == round(0.002 * 5 / 7, 6)
    assert scale.pinned == {"optimizer": "AdamW", "lr0": pytest.approx(lr * math.sqrt(2)), "momentum": 0.9,
                            "warmup_bias_lr": 0.0}
    assert any("optimizer=auto ignores lr0" in r for r in scale.reasons)


def test_auto_optimizer_untouched_when_lr_does_not_change():
    scale = plan(batch=16, optimizer="auto")
    assert scale.optimizer == "auto" and scale.pinned == {}


def test_many_iterations_pick_musgd_linear():
    name, lr, _ = auto_optimizer(1_000_000, 16, 64, 100, 80)
    assert (name, lr) == ("MuSGD", 0.01)
    assert plan(batch=256, optimizer="auto", n_train=1_000_000).lr_rule == "linear"


def test_multi_gpu_total_batch_drives_accumulation():
    scale = plan(batch=16, world_size=2)
    assert (scale.total_batch, scale.accumulate, scale.effective_batch) == (32, 2, 64)
