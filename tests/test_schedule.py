"""Batch schedules and OOM drills: parsed once at the edge, bad input is one line and exit 2."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from yolo_batch.cli import main
from yolo_batch.errors import InputError
from yolo_batch.training.config import Rounding
from yolo_batch.training.drills import ENV, InjectionPoint, injection_from_environment, parse_injection
from yolo_batch.training.schedule import Phase, ScheduleRequest, auto_schedule, resolve_schedule

BAD_SCHEDULES = [
    ("", "is empty"),
    ("16", "'16' is not batch@epoch"),
    ("16@", "'16@' is not batch@epoch"),
    ("@0", "'@0' is not batch@epoch"),
    ("a@0", "'a@0' is not batch@epoch"),
    ("16@-1", "'16@-1' is not batch@epoch"),
    ("1.5@0", "'1.5@0' is not batch@epoch"),
    ("16@0.5", "'16@0.5' is not batch@epoch"),
    ("16@0;32@2", "'16@0;32@2' is not batch@epoch"),
    ("16@0,,32@2", "'' is not batch@epoch"),
    ("16@0,32@1x", "'32@1x' is not batch@epoch"),
    ("0@0", "batch must be >= 1"),
    ("16@5", "must start at epoch 0"),
    ("16@0,8@0", "epochs must increase, '8@0' follows '16@0'"),
    ("16@0,32@3,64@2", "epochs must increase, '64@2' follows '32@3'"),
    ("autoo", "'autoo' is not batch@epoch"),
]


def test_schedules_parse():
    assert ScheduleRequest.parse("16@0,32@10,64@20").phases == (Phase(16, 0), Phase(32, 10), Phase(64, 20))
    assert ScheduleRequest.parse(" 16 @ 0 , 8@3 ").phases == (Phase(16, 0), Phase(8, 3))  # shrinking is allowed
    assert ScheduleRequest.parse("AUTO").is_auto
    assert str(ScheduleRequest.parse("16@0,32@10")) == "16@0,32@10"


@pytest.mark.parametrize(("text", "message"), BAD_SCHEDULES)
def test_bad_schedules_are_one_line(text, message):
    with pytest.raises(InputError) as info:
        ScheduleRequest.parse(text)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("text", "message"), BAD_SCHEDULES[:6] + BAD_SCHEDULES[-4:])
def test_bad_schedules_exit_2_before_anything_runs(tmp_path, text, message):
    result = CliRunner().invoke(main, ["train", "--batch-schedule", text, "--project", str(tmp_path / "p")])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_schedule_and_batch_disagree(tmp_path):
    result = CliRunner().invoke(main, ["train", "--batch-schedule", "8@0", "--batch", "16"])
    assert result.exit_code == 2 and "--batch-schedule sets the batch: drop --batch 16" in result.output


def test_a_schedule_is_checked_against_the_run():
    request = ScheduleRequest.parse("16@0,32@10")
    with pytest.raises(InputError, match="'32@10' starts after the last epoch"):
        resolve_schedule(request, epochs=10, world_size=1, limit=16, rounding=Rounding.POW2)
    with pytest.raises(InputError, match="batch 16 of '16@0' must be a multiple of the 3 devices"):
        resolve_schedule(ScheduleRequest.parse("16@0"), epochs=10, world_size=3, limit=16, rounding=Rounding.POW2)
    schedule = resolve_schedule(request, epochs=11, world_size=2, limit=16, rounding=Rounding.POW2)
    assert [schedule.batch_at(e) for e in (0, 9, 10, 11)] == [16, 16, 32, 32]


@pytest.mark.parametrize(("limit", "epochs", "world", "rounding", "expected"), [
    (32, 8, 1, Rounding.POW2, "8@0,16@2,32@4"),
    (64, 100, 1, Rounding.POW2, "16@0,32@25,64@50"),
    (16, 8, 1, Rounding.POW2, "8@0,16@4"),  # a quarter (4) is below 8: BatchNorm's floor
    (4, 10, 1, Rounding.POW2, "4@0"),  # the limit itself is below 8
    (32, 1, 1, Rounding.POW2, "32@0"),  # one epoch: the last step wins
    (32, 2, 1, Rounding.POW2, "16@0,32@1"),
    (32, 8, 2, Rounding.POW2, "16@0,32@2,64@4"),  # totals over both devices
    (40, 8, 1, Rounding.MULT8, "8@0,16@2,40@4"),  # 10 and 20 round down to multiples of 8
])
def test_auto_schedule_grows_toward_the_limit_at_fixed_fractions(limit, epochs, world, rounding, expected):
    schedule = auto_schedule(limit, epochs=epochs, world_size=world, rounding=rounding)
    assert str(schedule) == expected
    assert "batch schedule auto" in schedule.reason and f"limit {limit}" in schedule.reason


# --- drills --------------------------------------------------------------------------------------------------------


def test_drills_parse():
    assert parse_injection("train:epoch=2,step=3") == (InjectionPoint("train", 2, 3, 0),)
    assert parse_injection(" val:epoch=1 ; TRAIN:epoch=0,step=1,rank=1; ") == (
        InjectionPoint("val", 1, 0, 0), InjectionPoint("train", 0, 1, 1))
    assert parse_injection("") == () and injection_from_environment({}) == ()
    assert injection_from_environment({ENV: "val:epoch=0"}) == (InjectionPoint("val", 0),)


@pytest.mark.parametrize(("text", "message"), [
    ("train", "'train' must start with 'train:' or 'val:'"),
    ("fit:epoch=1", "'fit:epoch=1' must start with"),
    ("train:", "'' in 'train:' is not one of epoch=N, step=N, rank=N"),
    ("train:step=1", "'train:step=1' needs epoch=N"),
    ("train:epoch=x", "epoch must be a whole number >= 0, got 'x'"),
    ("train:epoch=-1", "epoch must be a whole number >= 0, got '-1'"),
    ("train:epoch=1,epoch=2", "'epoch' given twice"),
    ("train:epoch=1,batch=2", "'batch=2' in 'train:epoch=1,batch=2' is not one of"),
    ("train:epoch=1;val", "'val' must start with"),
])
def test_bad_drills_are_one_line(text, message):
    with pytest.raises(InputError) as info:
        parse_injection(text)
    assert message in str(info.value) and ENV in str(info.value) and "\n" not in str(info.value)


def test_a_bad_drill_exits_2_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "train:epoch=two")
    result = CliRunner().invoke(main, ["train", "--project", str(tmp_path / "p"), "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"Error: {ENV}: epoch must be a whole number >= 0, got 'two' in 'train:epoch=two'"]
    assert not (tmp_path / "p").exists()


def test_train_options_reach_the_library(monkeypatch, tmp_path):
    from yolo_batch.training import run

    seen = []

    def fake_train(config, on_decision=None, progress=None):
        seen.append(config)
        raise InputError("stop here")

    monkeypatch.setattr(run, "train", fake_train)
    result = CliRunner().invoke(main, ["train", "--batch-schedule", "8@0,16@2", "--no-oom-recovery"])
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen[0].batch_schedule == ScheduleRequest.parse("8@0,16@2") and seen[0].oom_recovery is False
    CliRunner().invoke(main, ["train"])
    assert seen[1].batch_schedule is None and seen[1].oom_recovery is True
