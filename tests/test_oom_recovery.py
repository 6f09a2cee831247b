"""OOM recovery and batch schedules on a live Ultralytics trainer (CPU, injected OOMs via YOLO_BATCH_INJECT_OOM).

What the trainer really used is read from the trainer and its loaders by a spy callback (tests/trainer_spy.py), and
what the run recorded from autobatch.json; never from the log.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from trainer_spy import TrainerSpy

from yolo_batch import BatchRequest, SizingConfig, TrainConfig, train
from yolo_batch.cli import main
from yolo_batch.training.batch_change import TrainingOutOfMemory
from yolo_batch.training.drills import ENV
from yolo_batch.training.schedule import ScheduleRequest

pytestmark = pytest.mark.slow
TINY = {"plots": False, "workers": 0, "fraction": 0.5}  # 32 of the 64 synthetic training images


def config(data: Path, tmp_path: Path, *, batch: int | None = 16, epochs: int = 2, nominal: int = 64, **more):
    extra = {**TINY, **more.pop("extra", {})}
    sizing = SizingConfig(data=data, imgsz=64, epochs=epochs, device="cpu", nominal_batch=nominal,
                          batch=BatchRequest(fixed=batch) if batch is not None else BatchRequest(), **more.pop(
                              "sizing", {}))
    return TrainConfig(sizing=sizing, project=str(tmp_path), name="run", extra=extra, **more)


def record(result) -> dict:
    return json.loads(result.decision_path.read_text())


def test_oom_in_training_and_validation_steps_down_and_finishes_every_epoch(shapes_yaml, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "val:epoch=0;train:epoch=1,step=1")
    spy = TrainerSpy().install(monkeypatch)
    alive: list[int] = []
    monkeypatch.setattr(TrainerSpy, "_epoch_start", lambda self, trainer: (
        alive.append(sum(r() is not None for r in self.losses)), setattr(self, "_steps", 0)))
    result = train(config(shapes_yaml, tmp_path, epochs=3, nominal=32, extra={"warmup_epochs": 0}))

    decision = result.decision
    assert spy.missing == []  # every trainer attribute names.py lists exists on the live trainer
    assert (decision.batch, decision.accumulate, decision.effective_batch) == (16, 2, 32)
    # What the trainer trained with, epoch by epoch: every epoch finished, the effective batch and lr0 unchanged.
    assert [e["epoch"] for e in spy.epochs] == [0, 1, 2]
    assert [(e["batch"], e["steps"], e["accumulate"]) for e in spy.epochs] == [(16, 2, 2), (8, 4, 4), (8, 4, 4)]
    assert {e["batch"] * e["accumulate"] for e in spy.epochs} == {32}
    assert all(e["initial_lr"] == spy.initial_lr for e in spy.epochs)
    assert all(lr == pytest.approx(decision.lr0_after) for lr in spy.initial_lr.values())
    assert len({str(e["weight_decay"]) for e in spy.epochs}) == 1
    # The same optimizer, scheduler and EMA throughout; the EMA kept counting its optimizer steps across the change
    # (one per epoch here: 2 batches of 16 x accumulate 2, then 4 of 8 x accumulate 4).
    assert len({(e["optimizer"], e["scheduler"], e["ema"]) for e in spy.epochs}) == 1
    assert [e["ema_updates"] for e in spy.epochs] == [1, 2, 3]
    # Validation: 16 images, first at 16 (2 x 16, capped by the set), then at 8 after its OOM; training untouched.
    assert spy.val_batches == [16, 8, 8, 8, 8]
    # The failed step's tensors were released before the epoch was run again (recovery left the except block).
    # At an ordinary epoch start the loop still holds its last step's loss; after the recovery nothing is held.
    assert alive[:3] == [0, 1, 0]  # epoch starts: 0, 1 (fails at step 1), 1 again

    events = record(result)["events"]
    assert [(e["kind"], e["phase"], e["epoch"], e["step"], e["old_batch"], e["new_batch"], e["accumulate"],
             e["effective_batch"]) for e in events] == [
        ("oom", "val", 0, 0, 16, 8, 2, 32), ("oom", "train", 1, 1, 16, 8, 4, 32)]
    assert all(e["lr0"] == pytest.approx(decision.lr0_after) and e["free_bytes"] is None for e in events)
    assert result.events and result.events[-1].new_batch == 8
    assert result.weights is not None and result.weights.is_file()
    assert (result.save_dir / "weights" / "last.pt").is_file()


def test_only_yolo_batch_recovers_a_first_epoch_oom(shapes_yaml, tmp_path, monkeypatch):
    # Ultralytics 8.4.13+ halves the batch after a first-epoch OOM and keeps the lr0 pinned for the old effective
    # batch: 32 -> 16 with accumulate round(16 / 16) = 1 would train at effective 16 with lr0 for 32.
    monkeypatch.setenv(ENV, "train:epoch=0,step=0")
    spy = TrainerSpy().install(monkeypatch)
    with ultralytics_log() as lines:
        result = train(config(shapes_yaml, tmp_path, batch=32, nominal=16, epochs=1))
    assert (result.decision.accumulate, result.decision.effective_batch) == (1, 32)
    assert [(e["batch"], e["accumulate"]) for e in spy.epochs] == [(16, 2)]
    assert len(result.events) == 1 and result.events[0].effective_batch == 32
    # (Ultralytics' own handler may already have prefixed "WARNING" to the record.)
    ours = [line[line.index("yolo-batch"):] for line in lines if "yolo-batch: out of memory" in line]
    assert ours == ["yolo-batch: out of memory in training at epoch 0, step 0: batch 32 -> 16 per device, "
                    f"accumulate 2, effective batch 32, lr0 {result.decision.lr0_after:.6g}"]
    assert not any("Reducing to batch" in line for line in lines)  # Ultralytics' own line when it halves


@contextlib.contextmanager
def ultralytics_log() -> Iterator[list[str]]:
    """Every line Ultralytics' logger prints inside the block."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("ultralytics"), Collect()
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def test_without_recovery_an_oom_stops_with_one_line_and_nobody_halves(shapes_yaml, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "train:epoch=0,step=1")
    spy = TrainerSpy().install(monkeypatch)
    with pytest.raises(TrainingOutOfMemory) as info:
        train(config(shapes_yaml, tmp_path, batch=16, epochs=1, oom_recovery=False))
    line = str(info.value)
    assert line == ("out of memory in training at epoch 0, step 1 at batch 16 per device; OOM recovery is off "
                    "(--no-oom-recovery); no epoch finished, so there is no checkpoint")
    assert spy.epochs == []  # Ultralytics' own halving did not retry the epoch either
    saved = json.loads((tmp_path / "run" / "autobatch.json").read_text())
    assert saved["stopped"] == line and saved["events"] == []


def test_gives_up_at_batch_one_with_one_line_keeping_the_last_checkpoint(shapes_yaml, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "train:epoch=1,step=0;train:epoch=1,step=0")  # fires at 2, then again at 1
    result = CliRunner().invoke(main, [
        "train", "--data", str(shapes_yaml), "--imgsz", "64", "--epochs", "2", "--device", "cpu", "--batch", "2",
        "--nominal-batch", "2", "--set", "plots=False", "--set", "workers=0", "--set", "fraction=0.25",
        "--project", str(tmp_path), "--name", "run"])
    assert result.exit_code == 1
    last = tmp_path / "run" / "weights" / "last.pt"
    assert result.output.strip().splitlines()[-1] == (
        f"Error: out of memory in training at epoch 1, step 0 at batch 1 per device: nothing smaller to try; free "
        f"GPU memory, lower --imgsz or use a smaller model; the last good checkpoint is {last}")
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["epoch"] == 0  # the epoch that finished
    saved = json.loads((tmp_path / "run" / "autobatch.json").read_text())
    assert [(e["old_batch"], e["new_batch"], e["accumulate"]) for e in saved["events"]] == [(2, 1, 2)]
    assert saved["stopped"] in result.output


def test_batch_schedule_changes_batch_lr_and_batchnorm_at_epoch_boundaries(shapes_yaml, tmp_path, monkeypatch):
    from yolo_batch import ultralytics_adapter

    weights = tmp_path / "start.pt"
    ultralytics_adapter.load_model("yolo11n.yaml").save(str(weights))  # "from weights": BatchNorm auto may freeze
    monkeypatch.setenv(ENV, "train:epoch=2,step=0")  # and the last phase runs out of memory
    spy = TrainerSpy().install(monkeypatch)
    run = config(shapes_yaml, tmp_path, batch=None, epochs=3, batch_schedule=ScheduleRequest.parse("4@0,16@1,32@2"),
                 sizing={"model": str(weights), "optimizer": "AdamW", "lr0": 0.001},
                 extra={"fraction": 1.0})
    result = train(run)

    decision = result.decision
    assert (decision.source, decision.batch, decision.accumulate, decision.effective_batch) == ("schedule", 4, 1, 4)
    # AdamW: the square-root rule, all of it in lr0 (Adam normalises the summed gradient's magnitude away)
    assert decision.lr0_after == pytest.approx(0.001 * (4 / 64) ** 0.5) and decision.bn_policy == "freeze"
    assert [(e["epoch"], e["batch"], e["steps"], e["accumulate"]) for e in spy.epochs] == [
        (0, 4, 16, 1), (1, 16, 4, 1), (2, 16, 4, 2)]  # the 32 phase ran out of memory: 16 x 2
    for epoch, effective in zip(spy.epochs, (4, 16, 32)):
        assert epoch["initial_lr"]["weight"] == pytest.approx(0.001 * (effective / 64) ** 0.5)  # sqrt rule (AdamW)
        assert epoch["weight_decay"]["weight"] == pytest.approx(0.0005 * effective / 64)  # Ultralytics' rule
    assert [e["bn_freeze"] for e in spy.epochs] == [True, False, False]
    frozen, trained = spy.bn_training[:16], spy.bn_training[16:]
    assert not any(frozen) and all(trained)

    saved = record(result)
    assert saved["schedule"] == [{"batch": 4, "epoch": 0}, {"batch": 16, "epoch": 1}, {"batch": 32, "epoch": 2}]
    assert [(e["kind"], e["epoch"], e["old_batch"], e["new_batch"], e["accumulate"], e["effective_batch"],
             e["bn_policy"]) for e in saved["events"]] == [
        ("schedule", 1, 4, 16, 1, 16, "train"), ("schedule", 2, 16, 32, 1, 32, "train"),
        ("oom", 2, 32, 16, 2, 32, "train")]
    assert saved["events"][0]["step"] is None and saved["events"][2]["step"] == 0
    assert any("BatchNorm freeze -> train" in r for r in saved["events"][0]["reasons"])


def test_auto_schedule_grows_toward_the_autobatch_limit(shapes_yaml, tmp_path, monkeypatch):
    spy = TrainerSpy().install(monkeypatch)
    result = train(config(shapes_yaml, tmp_path, batch=None, epochs=2, batch_schedule=ScheduleRequest.parse("auto")))
    saved = record(result)
    assert saved["autobatch_limit"]["batch"] == 16  # the CPU fallback stands in for the memory limit
    assert saved["schedule"] == [{"batch": 8, "epoch": 0}, {"batch": 16, "epoch": 1}]
    assert [(e["batch"], e["accumulate"]) for e in spy.epochs] == [(8, 1), (16, 1)]
    assert any(r.startswith("batch schedule auto: 8@0,16@1") for r in saved["reasons"])
