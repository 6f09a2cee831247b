"""The demo's pieces at tiny size: its profile and decision on CPU and on a (fake) GPU, and the whole wiring
(data, train, infer with annotated copies, where to look). The full demo is timed in the README, not here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from fakes import GIB, CurveGpu, FakeBackend, FakeDevice, fake_pynvml, linear

from yolo_batch.cli import main
from yolo_batch.demo import DEMO_DATASET, DEMO_PROFILE, DemoConfig, run_demo
from yolo_batch.profiles import train_config
from yolo_batch.training.autobatch import estimate_batch
from yolo_batch.training.config import BatchRequest


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from yolo_batch_datasets import make_dataset

    return make_dataset(DEMO_DATASET, tmp_path_factory.mktemp("demo") / DEMO_DATASET)


def demo_sizing(data: Path):
    return train_config(DEMO_PROFILE, model="yolo11n.yaml", data=data, batch=BatchRequest(), epochs=12).sizing


def test_on_cpu_the_demo_trains_at_16_with_an_optimizer_step_per_batch(demo_data):
    decision = estimate_batch(demo_sizing(demo_data))
    assert (decision.source, decision.batch, decision.accumulate, decision.effective_batch) == ("fallback", 16, 1, 16)
    assert decision.dataset_size // decision.batch == 16  # optimizer steps per epoch
    assert decision.profile == "demo" and decision.imgsz == 128
    assert any("no CUDA GPU found" in r for r in decision.reasons)


def test_on_a_gpu_the_demo_measures_and_keeps_the_steps_per_epoch(demo_data):
    # a large GPU would take all 256 images in one batch (one step per epoch, nothing learnt); the cap keeps 16
    nvml = fake_pynvml([FakeDevice(total=80 * GIB, used=1 * GIB)])
    gpu = CurveGpu(linear(0.5, 0.01))
    decision = estimate_batch(demo_sizing(demo_data), backend=FakeBackend(gpu), nvml=nvml)
    assert decision.source == "autobatch" and decision.probes  # measured, not a fallback
    assert decision.batch == 16 and decision.accumulate == 1 and max(gpu.tried) == 16
    assert "capped at 16 per device by the demo profile" in decision.reasons


@pytest.mark.slow
def test_the_demo_wiring_end_to_end_at_tiny_size(tmp_path):
    config = DemoConfig(dataset="shapes", epochs=1, imgsz=32, device="cpu", project=str(tmp_path / "runs"),
                        extra={"plots": False, "workers": 0})
    result = run_demo(config)
    run = tmp_path / "runs" / "train"
    assert result.train.save_dir == run
    assert json.loads((run / "autobatch.json").read_text())["profile"] == "demo"
    assert result.train.weights == run / "weights" / "best.pt" and result.train.weights.is_file()
    assert set(result.train.metrics) == {"precision", "recall", "map50", "map50_95"}
    infer = run / "infer"
    assert result.infer.processed == 16 and result.infer.failed == 0  # shapes' validation images
    assert len(list((infer / "annotated").glob("*.jpg"))) == 16
    assert (infer / "throughput.png").read_bytes().startswith(b"\x89PNG")
    assert result.infer.batch_choice is not None
    lines = result.lines()
    assert lines[-1].startswith("final mAP (validation, best.pt): mAP50 ")
    for label, path in (("run folder:", run), ("decision:", run / "autobatch.json"),
                        ("weights:", run / "weights" / "best.pt"), ("annotated:", infer / "annotated"),
                        ("throughput:", infer / "throughput.png")):
        assert any(line.startswith(label) and str(path) in line for line in lines), label


def test_demo_command_help_and_bad_device():
    result = CliRunner().invoke(main, ["demo", "--help"])
    assert result.exit_code == 0 and "big-shapes" in result.output
    bad = CliRunner().invoke(main, ["demo", "--device", "7", "--quiet"])
    assert bad.exit_code == 2 and "device" in bad.output.lower()
