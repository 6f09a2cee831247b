"""Batch-size science: sweep (real runs, resume, bad input), advise (JSON, model untouched), the per-epoch log."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from yolo_batch import ultralytics_adapter
from yolo_batch.cli import main
from yolo_batch.errors import InputError
from yolo_batch.training.advise import recommend
from yolo_batch.training.config import LrScaling, SizingConfig, TrainConfig
from yolo_batch.training.decision import AutoBatchDecision
from yolo_batch.training.noise_scale import NoiseScale
from yolo_batch.training.sweep import SweepConfig, auto_batches, parse_batches, run_sweep
from yolo_batch.training.sweep_plots import PLOTS
from yolo_batch.training.sweep_report import EpochRow, SweepRun, gap_trend
from yolo_batch.training.sweep_report import recommend as recommend_run
from yolo_batch.ultralytics_adapter.gradients import measure_norms

TINY_SIZING = {"imgsz": 64, "epochs": 1, "device": "cpu"}
TINY_EXTRA = {"plots": False, "workers": 0}


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


class CountingTrain:
    """The sweep's train function, counting the batches it trained (the real training underneath)."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.fail = fail

    def __call__(self, config, **kwargs):
        self.batches.append(config.sizing.batch.fixed)
        if self.fail:
            raise AssertionError(f"batch {config.sizing.batch.fixed} trained again")
        from yolo_batch.training.run import train

        return train(config, **kwargs)


@pytest.mark.slow
def test_sweep_trains_each_batch_unaccumulated_records_epochs_and_resumes(shapes_yaml, tmp_path):
    out = tmp_path / "sweep"
    config = SweepConfig(TrainConfig(sizing=SizingConfig(data=shapes_yaml, **TINY_SIZING), extra=TINY_EXTRA),
                         batches=(2, 4), out=out)
    counting = CountingTrain()
    report = run_sweep(config, train_fn=counting)
    assert counting.batches == [2, 4]
    summary = json.loads((out / "sweep.json").read_text())
    assert {"recommended_batch", "recommendation", "gap_widening", "gap_note", "runs"} <= set(summary)
    assert summary["recommended_batch"] in (2, 4)
    assert summary["recommendation"].startswith(str(report.recommended_batch))
    for run, batch in zip(summary["runs"], (2, 4)):
        args = yaml.safe_load((tmp_path / "sweep" / "runs" / f"batch{batch}" / "args.yaml").read_text())
        record = json.loads((out / "runs" / f"batch{batch}" / "autobatch.json").read_text())
        assert args["batch"] == batch and record["trainer_accumulate"] == 1  # effective batch = the swept batch
        assert run["effective_batch"] == batch
        # AdamW (Ultralytics' own choice, pinned) under the sqrt rule, scaled from the nominal batch 64
        assert args["optimizer"] == "AdamW"
        assert args["lr0"] == pytest.approx(record["lr0_before"] * math.sqrt(batch / 64))
        epoch = run["epochs"][0]
        assert epoch["epoch"] == 1 and epoch["val_loss"] > 0 and epoch["train_loss"] > 0
        assert epoch["images_per_s"] > 0 and epoch["map50_95"] is not None
        assert epoch["peak_memory_bytes"] is None  # CPU: no allocator peak to read
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("batch,epoch,train_loss,val_loss,gap") and len(lines) == 3
    assert all((out / name).stat().st_size > 0 for name in PLOTS)

    # a rerun skips both finished runs: nothing trains
    again = run_sweep(config, train_fn=CountingTrain(fail=True))
    assert [r.batch for r in again.runs] == [2, 4]
    # a run whose record is gone trains again, alone
    (out / "runs" / "batch4.json").unlink()
    counting = CountingTrain()
    run_sweep(config, train_fn=counting)
    assert counting.batches == [4]


def test_a_sweep_folder_from_other_settings_is_refused(shapes_yaml, tmp_path):
    out = tmp_path / "sweep"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "batch2.json").write_text(json.dumps({"settings": {"imgsz": 640}, "run": {}}))
    config = SweepConfig(TrainConfig(sizing=SizingConfig(data=shapes_yaml, **TINY_SIZING)), batches=(2, 4), out=out)
    with pytest.raises(InputError, match=r"other settings .*imgsz"):
        run_sweep(config, train_fn=CountingTrain(fail=True))


@pytest.mark.parametrize("batches", ["8,x", "8", "8,8", "0,8", "-1,8", "eight"])
def test_a_bad_batch_list_is_one_line_and_exit_2(batches, tmp_path):
    result = run_cli("sweep", "--batches", batches, "--out", str(tmp_path))
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "batch" in result.output
    assert not (tmp_path / "runs").exists()


def test_an_unknown_sweep_option_is_exit_2():
    assert run_cli("sweep", "--batchez", "8,16").exit_code == 2


@pytest.mark.parametrize(("text", "expected"), [("auto", None), (" 32,8,16 ", (8, 16, 32)), ("1,2", (1, 2))])
def test_batch_lists_parse_in_order(text, expected):
    assert parse_batches(text) == expected


@pytest.mark.parametrize(("limit", "expected"), [(None, (8, 16, 32)), (256, (16, 64, 256)), (8, (1, 2, 8))])
def test_auto_batches_are_small_middle_and_the_limit(limit, expected):
    assert auto_batches(limit)[0] == expected


def _run(batch: int, maps: list[float], speed: float, train: list[float], val: list[float]) -> SweepRun:
    epochs = tuple(EpochRow(epoch=i + 1, train_loss=t, val_loss=v, map50=m, map50_95=m, images_per_s=speed,
                            train_s=10.0, wall_s=12.0 * (i + 1)) for i, (m, t, v) in enumerate(zip(maps, train, val)))
    return SweepRun(batch=batch, effective_batch=batch, accumulate=1, lr0=0.01, lr_rule="linear", optimizer="SGD",
                    save_dir="", epochs=epochs)


def test_the_recommendation_is_the_fastest_run_within_half_a_map_point():
    runs = [_run(8, [0.30, 0.402], 10.0, [2, 1], [2, 1.5]), _run(32, [0.30, 0.399], 21.0, [2, 1], [2, 1.6]),
            _run(128, [0.2, 0.35], 40.0, [2, 1], [2, 1.9])]
    batch, sentence = recommend_run(runs)
    assert batch == 32
    assert sentence == "32: within 0.3 mAP points of the best (8, 0.402) at 2.1x the speed of 8"


def test_the_slowest_run_is_recommended_when_every_faster_one_loses_map():
    runs = [_run(8, [0.404], 21.8, [3.9], [3.3]), _run(16, [0.363], 24.2, [4.0], [3.6]),
            _run(32, [0.320], 36.4, [4.4], [4.2])]
    assert recommend_run(runs) == (8, "8: the best mAP50-95 (0.404) and every faster batch loses more than 0.5 mAP "
                                      "points (16: -4.1, 32: -8.4)")


def test_gaps_are_compared_at_equal_training_loss_not_at_the_last_epoch():
    # batch 32 took fewer steps: at the last epoch its gap is larger, but at the training loss both reached (1.5)
    # the two gaps are the same
    runs = [_run(8, [0.1, 0.2], 10.0, [1.5, 1.0], [2.0, 1.2]), _run(32, [0.1, 0.2], 20.0, [2.0, 1.5], [2.8, 2.0])]
    widening, note = gap_trend(runs)
    assert not widening
    assert "at equal training loss 1.500: 8: +0.500 (epoch 1), 32: +0.500 (epoch 2)" in note
    assert "at the last epoch: 8: +0.200, 32: +0.500" in note


def test_a_gap_growing_with_the_batch_is_flagged():
    runs = [_run(8, [0.3], 10.0, [1.0], [1.2]), _run(32, [0.3], 20.0, [1.0], [1.5]),
            _run(128, [0.3], 40.0, [1.0], [1.9])]
    widening, note = gap_trend(runs)
    assert widening and note.startswith("WARNING") and "128: +0.900" in note
    flat = [_run(8, [0.3], 10.0, [1.0], [1.2]), _run(32, [0.3], 20.0, [1.0], [1.21])]
    assert gap_trend(flat)[0] is False


def _decision(source: str, total: int, device: str = "cpu") -> AutoBatchDecision:
    return AutoBatchDecision(source=source, batch=total, world_size=1, total_batch=total, accumulate=1,
                             effective_batch=total, nominal_batch=64, optimizer="SGD", lr0_before=0.01,
                             lr0_after=0.01, lr_rule="linear", lr_factor=1.0, device=device, model="yolo11n.yaml",
                             imgsz=640, amp=True, rounding="pow2", reasons=("device is CPU: ...",))


def _noise(b_simple: float | None) -> NoiseScale:
    return NoiseScale(b_simple=b_simple, ci95=(20.0, 60.0), gradient_sq=1.0, trace_sigma=40.0, small_batch=4,
                      big_batch=32, steps=30, reason="")


@pytest.mark.parametrize(("noise", "memory", "n_train", "batch"), [
    (40.0, _decision("fallback", 16), 1000, 16),  # CPU: the default batch (memory not measured)
    (40.0, _decision("autobatch", 128, "0"), 1000, 32),  # memory allows more than pays: the noise scale's 32
    (300.0, _decision("autobatch", 64, "0"), 1000, 64),  # the noise scale allows more than fits: memory's 64
    (None, _decision("autobatch", 64, "0"), 1000, 64),  # noise above what was measured: what memory allows
    (3000.0, _decision("autobatch", 512, "0"), 100, 64),  # never more than the training images (rounded down)
])
def test_advice_combines_noise_and_memory(noise, memory, n_train, batch):
    sizing = SizingConfig(optimizer="SGD", lr0=0.01, lr_scaling=LrScaling.LINEAR, nominal_batch=64)
    advice = recommend(_noise(noise), memory, sizing, n_train=n_train, nc=3)
    assert (advice.recommended_batch, advice.accumulate, advice.effective_batch) == (batch, 1, batch)
    assert advice.lr0 == pytest.approx(0.01)  # SGD, linear: Ultralytics' summed loss already scales the step
    assert (advice.memory_limit_batch is None) == (memory.source == "fallback")
    assert any("not measured" in r for r in advice.reasons) == (memory.source == "fallback")


def test_advice_scales_an_adam_lr0_from_the_nominal_batch():
    sizing = SizingConfig(optimizer="AdamW", lr0=0.001, lr_scaling=LrScaling.AUTO, nominal_batch=64)
    advice = recommend(_noise(20.0), _decision("autobatch", 128, "0"), sizing, n_train=1000, nc=3)
    assert advice.recommended_batch == 16 and advice.lr_rule == "sqrt"
    assert advice.lr0 == pytest.approx(0.001 * math.sqrt(16 / 64))


def test_advise_measures_on_a_copy_and_leaves_the_model_untouched(shapes_yaml):
    model = ultralytics_adapter.load_model("yolo11n.yaml")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    flags = [p.requires_grad for p in model.model.parameters()]
    training = model.model.training
    small, big = measure_norms(model, ultralytics_adapter.check_dataset(shapes_yaml), imgsz=64, device="cpu",
                               small=2, chunks=2, steps=2)
    assert len(small) == len(big) == 2 and all(s > 0 for s in small + big)
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert [p.requires_grad for p in model.model.parameters()] == flags and model.model.training == training
    assert all(p.grad is None for p in model.model.parameters())


def test_advise_json_from_a_pt_file(shapes_yaml, tmp_path):
    weights = tmp_path / "model.pt"
    ultralytics_adapter.load_model("yolo11n.yaml").save(str(weights))
    before = weights.read_bytes()
    result = run_cli("advise", "--data", str(shapes_yaml), "--model", str(weights), "--imgsz", "64", "--device", "cpu",
                     "--small-batch", "2", "--chunks", "2", "--steps", "3", "--json")
    assert result.exit_code == 0, result.output
    advice = json.loads(result.stdout)
    assert set(advice["noise_scale"]) >= {"b_simple", "ci95"} and len(advice["noise_scale"]["ci95"]) == 2
    assert advice["memory_limit_batch"] is None  # CPU: not measurable, and the reasons say why
    assert any("device is CPU" in r for r in advice["reasons"])
    assert advice["recommended_batch"] >= 1 and advice["accumulate"] >= 1
    assert weights.read_bytes() == before


def test_advise_refuses_more_images_per_step_than_the_data_holds(shapes_yaml):
    result = run_cli("advise", "--data", str(shapes_yaml), "--imgsz", "64", "--device", "cpu", "--small-batch", "64",
                     "--chunks", "4", "--steps", "2")
    assert result.exit_code == 2 and "training split holds" in result.output


@pytest.mark.slow
def test_train_log_noise_scale_writes_one_value_per_epoch(shapes_yaml, tmp_path):
    result = run_cli("train", "--data", str(shapes_yaml), "--batch", "8", "--epochs", "2", "--imgsz", "64",
                     "--device", "cpu", "--set", "plots=False", "--set", "workers=0", "--project", str(tmp_path),
                     "--name", "logged", "--log-noise-scale", "--quiet")
    assert result.exit_code == 0, result.output
    log = json.loads((tmp_path / "logged" / "noise_scale.json").read_text())
    assert (log["small_batch"], log["big_batch"], log["steps"]) == (4, 32, 10)
    assert [e["epoch"] for e in log["epochs"]] == [1, 2]
    for entry in log["epochs"]:
        assert len(entry["ci95"]) == 2 and entry["train_loss"] > 0 and entry["trace_sigma"] > 0
        assert entry["b_simple"] is None or entry["b_simple"] > 0


@pytest.mark.slow
def test_auto_schedule_grows_when_the_measured_noise_scale_passes_the_batch(shapes_yaml, tmp_path, monkeypatch):
    from trainer_spy import TrainerSpy

    from yolo_batch import train
    from yolo_batch.training.noise_scale import NoiseSettings
    from yolo_batch.training.schedule import ScheduleRequest

    spy = TrainerSpy().install(monkeypatch)
    config = TrainConfig(sizing=SizingConfig(data=shapes_yaml, imgsz=64, epochs=3, device="cpu"),
                         project=str(tmp_path), name="grown", extra={**TINY_EXTRA, "warmup_epochs": 0},
                         batch_schedule=ScheduleRequest.parse("auto"),
                         log_noise_scale=NoiseSettings(small_batch=2, chunks=4, steps=4))
    result = train(config)
    log = json.loads((result.save_dir / "noise_scale.json").read_text())["epochs"]
    # CPU: the AutoBatch limit is the default 16, the auto schedule starts at 8; the batch doubles at the epoch after
    # an estimate passes it (None: above what was measured, which counts as passed), never beyond the limit.
    expected, batch = [8], 8
    for entry in log[:-1]:
        if batch < 16 and (entry["b_simple"] is None or entry["b_simple"] > batch):
            batch *= 2
        expected.append(batch)
    assert [e["batch"] for e in spy.epochs] == expected  # what the trainer's loader really used
    record = json.loads(result.decision_path.read_text())
    assert [(e["epoch"], e["new_batch"]) for e in record["events"]] == [
        (i, b) for i, b in enumerate(expected) if i and b != expected[i - 1]]
    assert "noise-triggered" in " ".join(record["reasons"])


def test_the_noise_schedule_doubles_after_an_estimate_passes_the_batch():
    from yolo_batch.training.schedule import NoiseSchedule, Phase

    schedule = NoiseSchedule(start=8, limit=32)
    assert schedule.batch_at(0) == 8
    schedule.observe(0, 5.0)  # below the batch: stay
    assert schedule.batch_at(1) == 8
    schedule.observe(1, 12.0)
    assert schedule.batch_at(2) == 16 and schedule.batch_at(2) == 16  # asked again on re-entry: the same
    schedule.observe(2, None)  # above what was measured
    assert schedule.batch_at(3) == 32
    schedule.observe(3, 1000.0)
    assert schedule.batch_at(4) == 32  # the limit
    assert schedule.phases == (Phase(8, 0), Phase(16, 2), Phase(32, 3))
    assert schedule.batch_at(1) == 8


def test_sweep_figures_draw_each_batch_from_the_report():
    from yolo_batch.training.sweep_plots import gap_figure, losses_figure, map_time_figure
    from yolo_batch.training.sweep_report import build_report

    report = build_report([_run(8, [0.1, 0.2], 10.0, [2.0, 1.0], [2.5, 1.4]),
                           _run(32, [0.1, 0.3], 20.0, [2.0, 1.2], [2.4, 1.3])], "batches given", {})
    losses = losses_figure(report).axes[0]
    assert [line.get_label() for line in losses.get_lines()] == ["batch 8 train", "batch 8 val", "batch 32 train",
                                                                  "batch 32 val"]
    timed = map_time_figure(report).axes[0].get_lines()
    assert list(timed[1].get_xdata()) == [12.0, 24.0] and list(timed[1].get_ydata()) == [0.1, 0.3]
    gaps = [line for line in gap_figure(report).axes[0].get_lines() if line.get_label().startswith("batch")]
    assert list(gaps[0].get_xdata()) == [2.0, 1.0] and list(gaps[0].get_ydata()) == pytest.approx([0.5, 0.4])


class RecordedTrain:
    """A train function that writes what the epoch meter would (one row per epoch) without training: for the
    sweep's own plumbing (auto batches, report), not for what training measures."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, config, **kwargs):
        from types import SimpleNamespace

        batch = config.sizing.batch.fixed
        self.batches.append(batch)
        save_dir = Path(config.project) / config.name
        save_dir.mkdir(parents=True)
        rows = [{"epoch": 1, "train_loss": 2.0, "val_loss": 2.5, "map50": 0.5, "map50_95": 0.3 - batch / 100_000,
                 "images_per_s": 10.0 * batch ** 0.5, "train_s": 5.0, "wall_s": 6.0}]
        (save_dir / "epochs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        decision = SimpleNamespace(effective_batch=batch, accumulate=1, lr0_after=0.01, lr_rule="linear",
                                   lr_optimizer="SGD", optimizer="SGD", reasons=())
        return SimpleNamespace(decision=decision, save_dir=save_dir)


def test_auto_sweeps_a_small_a_middle_and_the_memory_limit(tmp_path, shapes_yaml):
    recorded = RecordedTrain()
    config = SweepConfig(TrainConfig(sizing=SizingConfig(data=shapes_yaml, **TINY_SIZING)), out=tmp_path / "s")
    report = run_sweep(config, train_fn=recorded, limit_fn=lambda sizing: 128)
    assert recorded.batches == [8, 32, 128]
    assert report.batches_reason == "auto: small 8, middle 32 and the AutoBatch limit 128"
    assert report.recommended_batch == 128  # within half a point of the best, and the fastest
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["recommended_batch"] == 128


def test_on_cpu_memory_gives_no_limit_so_auto_is_8_16_32(shapes_yaml):
    from yolo_batch.training.sweep import memory_limit

    assert memory_limit(SizingConfig(data=shapes_yaml, imgsz=64, device="cpu")) is None


def test_advise_refuses_a_fixed_batch_before_measuring():
    result = run_cli("advise", "--batch", "16", "--device", "cpu")
    assert result.exit_code == 2 and "advise decides the batch" in result.output
