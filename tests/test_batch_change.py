"""Batch changes during training, planned from plain numbers: OOM step-downs, validation, schedule phases."""

from __future__ import annotations

import dataclasses

import pytest

from yolo_batch.training.batch_change import (
    BatchEvent,
    BatchState,
    NothingSmaller,
    ScalingRules,
    event_for,
    next_bn_policy,
    plan_oom,
    plan_phase,
    plan_val_oom,
    smaller_batch,
)
from yolo_batch.training.config import BnPolicy, Rounding


def state(batch=16, accumulate=4, world_size=1, val_batch=32, lr0=0.01, bn="train", max_batch=None) -> BatchState:
    return BatchState(batch=batch, world_size=world_size, accumulate=accumulate, val_batch=val_batch, lr0=lr0,
                      bn_policy=bn, max_batch=max_batch)


def rules(rounding=Rounding.POW2, rule="linear", base=0.01, nominal=64, bn=BnPolicy.AUTO, weights=False,
          optimizer="SGD"):
    return ScalingRules(nominal_batch=nominal, lr_rule=rule, base_lr0=base, rounding=rounding, bn_requested=bn,
                        from_weights=weights, optimizer=optimizer)


@pytest.mark.parametrize(("batch", "per_device", "rounding", "expected"), [
    (16, 64, Rounding.POW2, 8),
    (8, 8, Rounding.POW2, 4),
    (2, 2, Rounding.POW2, 1),
    (3, 3, Rounding.POW2, 1),
    (9, 9, Rounding.POW2, 3),  # a step down is 8, which does not divide 9
    (24, 72, Rounding.POW2, 12),  # 16 would make the effective batch 64, not 72
    (48, 48, Rounding.MULT8, 24),  # 40 does not divide 48
    (48, 192, Rounding.MULT8, 32),
    (8, 8, Rounding.MULT8, 4),  # below 8, mult8 steps through powers of two
    (12, 24, Rounding.MULT8, 8),
    (64, 64, Rounding.NONE, 32),
    (24, 72, Rounding.NONE, 18),
    (5, 5, Rounding.POW2, 1),
])
def test_smaller_batch_is_a_rounding_step_down_that_keeps_the_effective_batch(batch, per_device, rounding,
                                                                               expected):
    assert smaller_batch(batch, per_device, rounding) == expected


def test_nothing_smaller_than_batch_one():
    with pytest.raises(NothingSmaller):
        smaller_batch(1, 4, Rounding.POW2)


def test_oom_step_down_keeps_effective_batch_and_lr():
    before = state(batch=16, accumulate=4, lr0=0.005)
    change = plan_oom(before, rules())
    after = change.new
    assert (after.batch, after.accumulate, after.effective_batch) == (8, 8, 64)
    assert after.lr0 == before.lr0 and after.val_batch == before.val_batch
    assert after.max_batch == 8  # a schedule never goes back up to what ran out of memory
    assert (change.kind, change.phase) == ("oom", "train")


def test_oom_step_down_says_why_it_went_below_one_rounding_step():
    change = plan_oom(state(batch=48, accumulate=1, val_batch=96), rules(rounding=Rounding.MULT8))
    assert (change.new.batch, change.new.accumulate) == (24, 2)
    assert any("one mult8 step down is 40, which does not divide 48" in r for r in change.reasons)


def test_oom_step_down_on_several_devices_keeps_the_global_effective_batch():
    change = plan_oom(state(batch=32, accumulate=1, world_size=4), rules())
    assert (change.new.batch, change.new.accumulate, change.new.effective_batch) == (16, 2, 128)


def test_oom_at_batch_one_has_nothing_smaller():
    with pytest.raises(NothingSmaller):
        plan_oom(state(batch=1, accumulate=64), rules())


@pytest.mark.parametrize(("val_batch", "rounding", "expected"), [
    (32, Rounding.POW2, 16), (12, Rounding.POW2, 4), (48, Rounding.MULT8, 24), (10, Rounding.NONE, 5),
    (2, Rounding.POW2, 1), (3, Rounding.NONE, 1),
])
def test_validation_oom_halves_the_validation_batch_only(val_batch, rounding, expected):
    before = state(val_batch=val_batch)
    change = plan_val_oom(before, rules(rounding=rounding))
    assert change.new == dataclasses.replace(before, val_batch=expected)
    assert change.phase == "val"


def test_validation_oom_at_batch_one_has_nothing_smaller():
    with pytest.raises(NothingSmaller):
        plan_val_oom(state(val_batch=1), rules())


@pytest.mark.parametrize(("optimizer", "rule", "factor"), [
    ("AdamW", "linear", 0.5), ("AdamW", "sqrt", 0.5 ** 0.5), ("AdamW", "none", 1.0),
    # SGD: Ultralytics' summed loss already halves the step at effective 32 vs nominal 64
    ("SGD", "linear", 1.0), ("SGD", "sqrt", 2 ** 0.5), ("SGD", "none", 2.0),
])
def test_schedule_phase_trains_at_the_phase_batch_with_lr_by_the_rule(optimizer, rule, factor):
    before = state(batch=16, accumulate=1, lr0=0.01 * 16 / 64)
    change = plan_phase(before, rules(rule=rule, optimizer=optimizer), 32)
    assert (change.new.batch, change.new.accumulate, change.new.effective_batch) == (32, 1, 32)
    assert change.new.lr0 == pytest.approx(0.01 * factor)
    assert change.kind == "schedule"


def test_schedule_phase_after_an_oom_accumulates_instead_of_going_back_up():
    before = state(batch=8, accumulate=2, max_batch=8)  # 16 ran out of memory; effective 16
    change = plan_phase(before, rules(), 64)
    assert (change.new.batch, change.new.accumulate, change.new.effective_batch) == (8, 8, 64)
    assert any("at most 8" in r for r in change.reasons)


def test_schedule_phase_shares_the_batch_between_devices():
    change = plan_phase(state(batch=8, accumulate=1, world_size=2), rules(), 64)
    assert (change.new.batch, change.new.total_batch, change.new.accumulate) == (32, 64, 1)
    with pytest.raises(ValueError, match="multiple of the 2 devices"):
        plan_phase(state(world_size=2), rules(), 33)


def test_batchnorm_policy_is_rechecked_at_every_change():
    from_weights = rules(weights=True)
    tiny = plan_oom(state(batch=8, accumulate=8), from_weights)
    assert (tiny.new.batch, tiny.new.bn_policy) == (4, "freeze")
    assert any("BatchNorm train -> freeze" in r for r in tiny.reasons)
    grown = plan_phase(tiny.new, from_weights, 64)
    assert grown.new.bn_policy == "freeze"  # capped at 4 per device by the OOM: still tiny
    back = plan_phase(state(batch=4, accumulate=1, bn="freeze"), from_weights, 16)
    assert back.new.bn_policy == "train"


@pytest.mark.parametrize(("current", "decided", "expected", "note"), [
    ("train", BnPolicy.FREEZE, "freeze", None),
    ("freeze", BnPolicy.TRAIN, "train", None),
    ("train", BnPolicy.SYNC, "train", "SyncBatchNorm is set up before training starts"),
    ("sync", BnPolicy.TRAIN, "sync", "BatchNorm stays sync"),
    ("sync", BnPolicy.SYNC, "sync", None),
])
def test_sync_batchnorm_is_never_switched_mid_run(current, decided, expected, note):
    policy, reason = next_bn_policy(current, decided)
    assert policy == expected
    assert (reason is None) if note is None else (note in reason)


def test_events_record_what_changed_and_print_as_one_line():
    change = plan_oom(state(batch=16, accumulate=4), rules())
    event = event_for(change, epoch=2, step=3, free_bytes=3 << 30, ranks=(1,))
    assert (event.phase, event.epoch, event.step, event.old_batch, event.new_batch) == ("train", 2, 3, 16, 8)
    assert (event.accumulate, event.effective_batch, event.free_bytes, event.ranks) == (8, 64, 3 << 30, (1,))
    line = event.line()
    assert "\n" not in line
    assert "out of memory in training at epoch 2, step 3: batch 16 -> 8 per device, accumulate 8, effective " \
           "batch 64" in line and "3.00 GiB free" in line
    val = event_for(plan_val_oom(state(), rules()), epoch=1, step=0)
    assert (val.old_batch, val.new_batch, val.accumulate) == (32, 16, 4)
    assert "validation batch 32 -> 16" in val.line()
    assert BatchEvent.from_dict(dataclasses.asdict(event)) == event


def test_state_rejects_impossible_numbers():
    with pytest.raises(ValueError):
        state(batch=0)
