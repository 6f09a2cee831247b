"""Progress that tells the truth: plain lines off a terminal, notes for probes, silence with --quiet."""

from __future__ import annotations

import io
import threading

import pytest
from click.testing import CliRunner
from fakes import GIB, CurveGpu, FakeBackend, FakeDevice, fake_pynvml, linear

from yolo_batch.cli import main
from yolo_batch.core.progress import (
    ConsoleReporter,
    NullReporter,
    PlainProgress,
    RichProgress,
    reporter_for,
    tracked,
)
from yolo_batch.training import data as training_data
from yolo_batch.training.autobatch import estimate_batch, reported
from yolo_batch.training.config import BatchRequest, Rounding, SizingConfig
from yolo_batch.training.decision import ProbeSample


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_task_lines_name_the_step_and_its_unit():
    clock, stream = Clock(), io.StringIO()
    task = PlainProgress(stream, every_s=5, clock=clock, label="scan labels", unit="label file", rate_unit="file",
                         failures=False)
    task.start(1000)
    for done in range(0, 1001, 100):
        clock.now = done / 100
        task.update(done)
    task.stop()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "scan labels: 1000 label file(s) to process"
    assert lines[1] == "scan labels: 500/1000 100.0 file/s, ETA 5 s"
    assert lines[-1] == "scan labels: 1000/1000 100.0 file/s, ETA 0 s"
    assert len(lines) == 4  # start, every 5 s, stop: not a line per update


def test_a_step_without_a_total_is_silent_when_short_and_ticks_when_long():
    stream = io.StringIO()
    task = PlainProgress(stream, every_s=60, label="autobatch: probing batch 8", failures=False)
    task.start(None)
    task.stop()
    assert stream.getvalue() == ""
    ticked = threading.Event()

    class Stream(io.StringIO):
        def write(self, text: str) -> int:
            ticked.set()
            return super().write(text)

    stream = Stream()
    task = PlainProgress(stream, every_s=0.01, label="autobatch: probing batch 8", failures=False)
    task.start(None)
    assert ticked.wait(10)
    task.stop()
    assert stream.getvalue().splitlines()[0].startswith("autobatch: probing batch 8: 0 s so far")


def test_console_reporter_is_plain_off_a_terminal_and_rich_on_one():
    plain = ConsoleReporter(io.StringIO())
    assert isinstance(plain.task("infer"), PlainProgress)
    live = ConsoleReporter(io.StringIO(), live=True)
    assert isinstance(live.task("infer"), RichProgress)
    assert isinstance(reporter_for(quiet=True), NullReporter)
    stream = io.StringIO()
    ConsoleReporter(stream).note("autobatch: batch 8: out of memory (0.4 s)")
    assert stream.getvalue() == "autobatch: batch 8: out of memory (0.4 s)\n"


def test_tracked_stops_the_task_on_error():
    stream = io.StringIO()
    with pytest.raises(RuntimeError), tracked(ConsoleReporter(stream), "scan", total=10, unit="file") as task:
        task.update(3)
        raise RuntimeError("disk gone")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0] == "scan: 10 file(s) to process" and lines[1].startswith("scan: 3/10 ")


def test_each_probe_is_announced_with_its_batch_time_and_peak():
    stream = io.StringIO()
    samples = {2: ProbeSample(2, int(1.5 * GIB), 4, int(0.75 * GIB), seconds=1.25),
               4: ProbeSample(4, oom=True, seconds=0.5)}
    measure = reported(samples.__getitem__, ConsoleReporter(stream))
    assert measure(2) is samples[2] and measure(4) is samples[4]
    assert stream.getvalue().splitlines() == [
        "autobatch: batch 2: training peak 1.50 GiB, validation at 4 0.75 GiB (1.2 s)",
        "autobatch: batch 4: out of memory (0.5 s)",
    ]


def test_autobatch_on_a_fake_gpu_reports_every_probe(shapes_yaml):
    stream = io.StringIO()
    nvml = fake_pynvml([FakeDevice(total=16 * GIB, used=1 * GIB)])
    gpu = CurveGpu(linear(0.5, 0.1))
    config = SizingConfig(data=shapes_yaml, imgsz=64, batch=BatchRequest(fraction=0.5), rounding=Rounding.NONE)
    decision = estimate_batch(config, backend=FakeBackend(gpu), nvml=nvml, progress=ConsoleReporter(stream))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("autobatch: probing GPU 0 (NVIDIA H100 80GB HBM3) with real training steps, budget")
    probed = [int(line.split()[2].rstrip(":")) for line in lines[1:]]
    assert probed == gpu.tried and decision.batch in probed


def test_the_label_scan_reports_on_large_datasets(shapes_yaml, monkeypatch):
    monkeypatch.setattr(training_data, "SCAN_REPORT_MIN", 10)
    stream = io.StringIO()
    info = training_data.inspect_dataset(shapes_yaml, progress=ConsoleReporter(stream))
    lines = stream.getvalue().splitlines()
    assert lines[0] == f"scan labels: {info.train_images} label file(s) to process"
    assert lines[-1].startswith(f"scan labels: {info.train_images}/{info.train_images} ")
    monkeypatch.setattr(training_data, "SCAN_REPORT_MIN", 10_000)
    stream = io.StringIO()
    training_data.inspect_dataset(shapes_yaml, progress=ConsoleReporter(stream))
    assert stream.getvalue() == ""  # a small set is scanned in well under a second: no noise


def test_infer_prints_plain_lines_to_a_pipe_and_nothing_when_quiet(tmp_path, shapes_yaml):
    images = shapes_yaml.parent / "images" / "val"
    args = ["infer", str(images), "--imgsz", "32", "--batch", "8", "--device", "cpu", "--out"]
    result = CliRunner().invoke(main, [*args, str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == "infer: 16 image(s) to process"
    assert lines[1].startswith("infer: 16/16 (0 failed) ")
    quiet = CliRunner().invoke(main, [*args, str(tmp_path / "b"), "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_autobatch_quiet_prints_nothing(shapes_yaml):
    result = CliRunner().invoke(main, ["autobatch", "--data", str(shapes_yaml), "--imgsz", "64", "--quiet"])
    assert result.exit_code == 0 and result.output == ""
