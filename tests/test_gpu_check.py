"""``make gpu-check`` without a GPU: the one-line exit, the budget, and the report assembled from recorded outputs
(tests/data/gpu_check, see its README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from yolo_batch import gpu_check
from yolo_batch.gpu_check import (
    BUDGET_S,
    NO_GPU,
    Step,
    StepResult,
    assemble_report,
    default_steps,
    junit_counts,
    run_steps,
    summary_text,
    verdict,
)
from yolo_batch.training.bench import BenchReport, BenchRow

RECORDED = Path(__file__).parent / "data" / "gpu_check"
MACHINE = {"host": "gpu-box", "gpu": "NVIDIA H200", "gpus": 1, "driver": "570.86.10", "yolo_batch": "0.1.0",
           "commit": "abc1234", "ultralytics": "8.4.190", "torch": "2.14.1"}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here: the check would run")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    done = subprocess.run([sys.executable, "-m", "yolo_batch.gpu_check", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, NO_GPU + "\n", "")
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


def test_the_make_target_runs_the_check():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "gpu-check:" in makefile and "-m yolo_batch.gpu_check" in makefile


def test_the_steps_fit_the_eight_minute_budget(tmp_path):
    steps = default_steps(tmp_path, tmp_path / "data.yaml", tmp_path / "images")
    assert sum(s.timeout_s for s in steps) <= BUDGET_S == 480
    assert [s.name for s in steps] == ["pytest -m gpu", "bench autobatch", "bench autobatch --shared-gpu",
                                       "bench infer", "bench serve"]
    assert all("--json" in s.argv for s in steps if s.kind == "json")
    assert any(a.startswith("--junitxml=") for a in steps[0].argv) and "gpu" in steps[0].argv


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def recorded(name: str) -> str:
    return (RECORDED / name).read_text()


def test_run_steps_keeps_to_the_budget_and_reads_each_output(tmp_path):
    clock = FakeClock()
    junit = tmp_path / "pytest.xml"
    junit.write_text(recorded("pytest_one_failure.xml"))
    outputs = {"pytest": ("2 failed", 1, 200), "infer": (recorded("bench_infer_cpu.json"), 0, 100),
               "hang": (None, None, 150)}
    calls = []

    def runner(argv, *, timeout, **kwargs):
        key = argv[0]
        calls.append((key, timeout))
        stdout, code, seconds = outputs[key]
        clock.now += min(seconds, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(argv, timeout, output=b"still going", stderr=b"")
        return subprocess.CompletedProcess(argv, code, stdout, "")

    steps = [Step("pytest -m gpu", ("pytest", f"--junitxml={junit}"), 240, kind="pytest"),
             Step("bench infer", ("infer",), 120), Step("slow", ("hang",), 150),
             Step("bench serve", ("serve",), 40, min_s=40)]
    results = run_steps(steps, budget_s=480, runner=runner, clock=clock)
    assert calls == [("pytest", 240), ("infer", 120), ("hang", 150)]
    assert [r.returncode for r in results] == [1, 0, None, None]
    assert results[0].data["failed"][0]["test"].endswith("test_predicted_peak_matches_the_trainers_device_peak")
    assert results[1].data["ratios"]["ours_over_predict"] == pytest.approx(0.215)
    assert results[2].timed_out and results[2].output_tail == "still going"
    assert results[3].skipped == "30 s left of the 480 s budget, needs 40"  # could not finish: not started


def result(name: str, stdout_file: str | None = None, code: int = 0, **kw) -> StepResult:
    data = json.loads(recorded(stdout_file)) if stdout_file else kw.pop("data", None)
    return StepResult(name=name, command=f"yolo-batch {name}", returncode=code, seconds=12.0, data=data, **kw)


def test_verdicts_from_recorded_outputs(tmp_path):
    junit = tmp_path / "p.xml"
    junit.write_text(recorded("pytest_gpu_on_cpu.xml"))
    assert verdict(result("pytest -m gpu", data=junit_counts(junit))) == "0 passed, 0 failed, 2 skipped"
    junit.write_text(recorded("pytest_one_failure.xml"))
    line = verdict(result("pytest -m gpu", code=1, data=junit_counts(junit)))
    assert line.startswith("1 passed, 1 failed, 1 skipped; FAILED tests.test_gpu::test_predicted_peak_matches")
    assert "15 % apart" in line
    assert verdict(result("bench infer", "bench_infer_cpu.json")).startswith("img/s {'ultralytics predict': 39.6")
    assert verdict(result("bench serve", "bench_serve_cpu.json")) == (
        "14.2 img/s at max batch 16, 0.885 of offline infer, p99 169.3 ms")
    assert verdict(result("bench autobatch", "bench_autobatch_cpu.json")).startswith("no CUDA GPU on this machine")
    assert verdict(result("bench autobatch --shared-gpu", "bench_stress_cpu.json")).startswith("no CUDA GPU")
    assert verdict(result("bench serve", code=2, output_tail="Error: no such folder: x\n")) == (
        "exit 2: Error: no such folder: x")
    assert verdict(StepResult("slow", "x", None, 80.0, timed_out=True)) == "timed out after 80 s"


def test_an_autobatch_report_gives_both_batches_and_the_ratios():
    report = BenchReport(device="NVIDIA H200 (cuda:0)", model="yolo11n.yaml", imgsz=320, budget_bytes=100 << 30,
                         rows=(BenchRow("yolo-batch", 256, 20.0, 80 << 30, False),
                               BenchRow("ultralytics", 512, 5.0, 120 << 30, True)))
    line = verdict(result("bench autobatch", data=json.loads(json.dumps(report.to_dict()))))
    assert line == "yolo-batch batch 256; ultralytics batch 512 OOM; time_ours_over_ultralytics 4, peak_over_budget 0.8"


def test_the_report_is_json_and_a_readable_summary(tmp_path):
    results = [result("bench infer", "bench_infer_cpu.json"), result("bench serve", code=1, output_tail="boom"),
               StepResult("bench autobatch", "x", None, 0.0, skipped="10 s left of the 480 s budget, needs 30")]
    report = assemble_report(results, MACHINE, "2026-12-02T07:00:00+00:00")
    assert json.loads(json.dumps(report)) == report
    assert [s["ok"] for s in report["steps"]] == [True, False, False] and report["ok"] is False
    text = summary_text(report)
    assert "NVIDIA H200 (driver 570.86.10)" in text and "NOT all steps passed" in text
    assert "| bench serve | FAIL: exit 1: boom |" in text
    assert "| bench autobatch | not run: not run: 10 s left" not in text  # one "not run", not two
    assert "| bench autobatch | not run: 10 s left of the 480 s budget, needs 30 |" in text


def test_main_writes_both_files_on_a_gpu_box(tmp_path, monkeypatch):
    """The whole path with the GPU parts stood in: what a GPU box runs after the check (files, exit code)."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "prepare_data", lambda out: (tmp_path / "data.yaml", tmp_path / "images"))
    monkeypatch.setattr(gpu_check, "machine_info", lambda: MACHINE)
    monkeypatch.setattr(gpu_check, "run_steps", lambda steps: [result("bench infer", "bench_infer_cpu.json")])
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ok"] and report["steps"][0]["verdict"].startswith("img/s")
    assert (tmp_path / "out" / "report.md").read_text().startswith("# make gpu-check, ")
