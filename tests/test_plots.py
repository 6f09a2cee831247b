"""Plots of decisions, from recorded numbers: the PNG is written, and the figure holds what it should."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from fakes import GIB, CurveGpu, FakeBackend, FakeDevice, convex, fake_pynvml

from yolo_batch import estimate_batch, save_autobatch_plot, save_throughput_plot
from yolo_batch.inference.plots import throughput_figure
from yolo_batch.inference.throughput import ThroughputSample, choose_throughput_batch
from yolo_batch.training.config import BatchRequest, Rounding, SizingConfig
from yolo_batch.training.decision import AutoBatchDecision, GpuBudget, ProbeSample
from yolo_batch.training.plots import autobatch_figure
from yolo_batch.training.run import DECISION_PLOT, DecisionPlot

PNG = b"\x89PNG\r\n\x1a\n"


def recorded_decision() -> AutoBatchDecision:
    """A decision as autobatch.json records it: probes 1..16, an OOM at 64, verified at 32, another process."""
    probes = (
        ProbeSample(1, int(1.1 * GIB), 2, int(0.9 * GIB), seconds=1.2),
        ProbeSample(2, int(1.3 * GIB), 4, int(1.0 * GIB), seconds=1.1),
        ProbeSample(4, int(1.8 * GIB), 8, int(1.2 * GIB), seconds=1.3),
        ProbeSample(8, int(2.9 * GIB), 16, int(1.7 * GIB), seconds=1.6),
        ProbeSample(16, int(5.0 * GIB), 32, int(2.6 * GIB), seconds=2.2),
        ProbeSample(64, oom=True, seconds=0.4),
        ProbeSample(32, int(9.4 * GIB), 64, int(4.5 * GIB), seconds=3.1),
    )
    gpu = GpuBudget(index=0, name="NVIDIA L4", uuid="GPU-x", total_bytes=24 * GIB, free_bytes=18 * GIB,
                    own_bytes=int(0.5 * GIB), others_bytes=int(5.5 * GIB), other_pids=(4242,),
                    budget_bytes=int(16.2 * GIB))
    return AutoBatchDecision(
        source="autobatch", batch=32, world_size=1, total_batch=32, accumulate=2, effective_batch=64,
        nominal_batch=64, optimizer="auto", lr0_before=0.01, lr0_after=0.01, lr_rule="sqrt", lr_factor=1.0,
        device="0", model="yolo11s.yaml", imgsz=640, amp=True, rounding="pow2", fraction=0.9, gpus=(gpu,),
        budget_bytes=gpu.budget_bytes, predicted_peak_bytes=int(9.0 * GIB), verified_peak_bytes=int(9.4 * GIB),
        probes=probes)


def labels(axis) -> list[str]:
    return [artist.get_label() for artist in axis.get_lines()]


def line(axis, label):
    return next(artist for artist in axis.get_lines() if artist.get_label() == label)


def test_autobatch_figure_shows_probes_curve_budget_others_and_choice():
    decision = recorded_decision()
    figure = autobatch_figure(decision)
    axis = figure.axes[0]
    train = line(axis, "training peak (probe)")
    assert list(train.get_xdata()) == [1, 2, 4, 8, 16, 32]  # the OOM probe has no peak
    assert train.get_ydata()[-1] == pytest.approx(9.4, abs=0.01)
    val = line(axis, "validation peak (at the validation batch)")
    assert list(val.get_ydata()) == pytest.approx([0.9, 1.0, 1.2, 1.7, 2.6, 4.5], abs=0.01)
    curve = line(axis, "fitted curve")
    xs, ys = list(curve.get_xdata()), list(curve.get_ydata())
    assert ys[xs.index(16)] == pytest.approx(5.0, abs=0.01) and ys == sorted(ys)  # through the peaks, monotone
    budget = line(axis, "budget 16.20 GiB (90% of free)")
    assert list(budget.get_ydata()) == pytest.approx([16.2, 16.2], abs=0.01)
    assert "GPU 0 total 24.0 GiB" in labels(axis)
    others = [p for p in axis.patches if p.get_label() == "other processes 5.50 GiB"]
    assert len(others) == 1
    chosen = line(axis, "chosen: batch 32")
    assert set(chosen.get_xdata()) == {32}
    assert list(line(axis, "verified peak 9.40 GiB").get_xdata()) == [32]
    assert set(line(axis, "out of memory at 64").get_xdata()) == {64}
    assert "batch 32" in axis.get_title() and "NVIDIA L4" in axis.get_title()
    assert {t.get_text() for t in axis.get_legend().get_texts()} >= {"fitted curve", "chosen: batch 32"}


@pytest.mark.parametrize("change", [
    {"probes": (), "gpus": (), "budget_bytes": None, "source": "fallback"},  # CPU: nothing measured
    {"probes": (ProbeSample(1, oom=True),)},  # only an OOM: no memory measured either
])
def test_no_plot_without_measured_memory(tmp_path, change):
    decision = dataclasses.replace(recorded_decision(), **change)
    assert autobatch_figure(decision) is None
    assert save_autobatch_plot(decision, tmp_path / "autobatch.png") is None
    assert not (tmp_path / "autobatch.png").exists()


def test_the_run_folder_gets_the_plot_before_epoch_1(tmp_path):
    # the callback train() registers for on_pretrain_routine_end, given a trainer's run folder
    trainer = SimpleNamespace(save_dir=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    DecisionPlot(recorded_decision())(trainer)
    png = (tmp_path / "run" / DECISION_PLOT).read_bytes()
    assert png.startswith(PNG) and len(png) > 10_000
    cpu = SimpleNamespace(save_dir=str(tmp_path / "cpu"))
    (tmp_path / "cpu").mkdir()
    DecisionPlot(dataclasses.replace(recorded_decision(), probes=(), gpus=(), source="fallback"))(cpu)
    assert list((tmp_path / "cpu").iterdir()) == []


def test_a_decision_measured_on_a_fake_gpu_plots(shapes_yaml, tmp_path):
    nvml = fake_pynvml([FakeDevice(total=24 * GIB, used=6 * GIB, processes=[(4242, 5 * GIB)])])
    gpu = CurveGpu(convex(0.8, 0.25, 0.004))
    config = SizingConfig(data=shapes_yaml, imgsz=64, batch=BatchRequest(fraction=0.5), rounding=Rounding.NONE)
    decision = estimate_batch(config, backend=FakeBackend(gpu), nvml=nvml)
    path = save_autobatch_plot(decision, tmp_path / "autobatch.png")
    assert path is not None and path.read_bytes().startswith(PNG)
    axis = autobatch_figure(decision).axes[0]
    assert list(line(axis, "training peak (probe)").get_xdata()) == sorted({p.batch for p in decision.probes})
    assert set(line(axis, f"chosen: batch {decision.batch}").get_xdata()) == {decision.batch}
    assert [p.get_label() for p in axis.patches] == ["other processes 5.00 GiB"]


def throughput_choice(max_latency_ms=None):
    samples = [ThroughputSample(1, 20.0, 50.0), ThroughputSample(2, 36.0, 55.0), ThroughputSample(4, 61.0, 65.0),
               ThroughputSample(8, 64.0, 125.0), ThroughputSample(16, 65.0, 246.0), ThroughputSample(32, oom=True)]
    return choose_throughput_batch(samples, max_latency_ms=max_latency_ms)


def test_throughput_figure_marks_the_chosen_batch_and_the_limits(tmp_path):
    choice = throughput_choice(max_latency_ms=200.0)
    assert choice.batch == 4
    figure = throughput_figure(choice)
    rate_axis, latency_axis = figure.axes
    rate = line(rate_axis, "img/s")
    assert list(rate.get_xdata()) == [1, 2, 4, 8, 16] and list(rate.get_ydata()) == [20, 36, 61, 64, 65]
    assert list(line(latency_axis, "batch latency (ms)").get_ydata()) == [50, 55, 65, 125, 246]
    assert set(line(rate_axis, "chosen: batch 4").get_xdata()) == {4}
    # the best within the latency limit is batch 8 (64 img/s): batch 16 takes 246 ms
    assert list(line(rate_axis, "within 5% of the best").get_ydata()) == pytest.approx([0.95 * 64] * 2)
    assert set(line(latency_axis, "latency limit 200 ms").get_ydata()) == {200}
    assert set(line(rate_axis, "out of memory at 32").get_xdata()) == {32}
    assert "Inference batch (auto): 4" in rate_axis.get_title()
    path = save_throughput_plot(choice, tmp_path / "throughput.png")
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000


def test_matplotlib_backend_setting_does_not_matter(monkeypatch, tmp_path):
    # a user's MPLBACKEND (or a headless box with none) must not change how the file is made
    monkeypatch.setenv("MPLBACKEND", "TkAgg")
    path = save_throughput_plot(throughput_choice(), tmp_path / "t.png")
    assert path.read_bytes().startswith(PNG)
