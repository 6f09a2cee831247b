"""``yolo-batch infer`` end to end on CPU: outputs, exit codes, bad files, resume after kill -9, usage errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from inference_fixtures import detector, image_folder, kill_when_written, write_bad_files  # noqa: F401 (fixtures)

from yolo_batch.cli import main

TORCH = ["--backend", "torch", "--precision", "fp32"]  # what these tests compare and time: the PyTorch path
FAST = ["--imgsz", "160", "--conf", "0.15", "--device", "cpu", *TORCH]


def infer(*args: str):
    return CliRunner().invoke(main, ["infer", *args], catch_exceptions=False)


def journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_bad_files_are_error_lines_and_exit_code_is_3(detector, image_folder, tmp_path):
    expected = write_bad_files(image_folder)
    out = tmp_path / "out"
    result = infer(str(image_folder), "--model", str(detector), *FAST, "--out", str(out), "--batch", "4",
                   "--format", "csv", "--format", "yolo-txt", "--save-annotated", "--json")
    assert result.exit_code == 3, result.output
    summary = json.loads(result.stdout)
    assert summary["processed"] == 8 and summary["failed"] == len(expected) and summary["exit_code"] == 3
    assert summary["detections"] > 0 and set(summary["stage_s"]) >= {"decode", "inference", "write"}
    errors = {Path(e["path"]).name: e["kind"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert errors == expected
    records = journal(out)
    assert len(records) == 8 and all({"path", "width", "height", "detections", "timing_ms"} <= set(r) for r in records)
    first = next(r for r in records if r["detections"])
    assert set(first["detections"][0]) == {"class_id", "name", "confidence", "box"}
    assert 0 <= first["detections"][0]["box"][2] <= first["width"]
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + summary["detections"]
    assert len(list((out / "labels").rglob("*.txt"))) == 8
    assert len(list((out / "annotated").rglob("*.jpg"))) == 8
    assert json.loads((out / "summary.json").read_text())["processed"] == 8

    again = infer(str(image_folder), "--model", str(detector), *FAST, "--out", str(out), "--batch", "4",
                  "--format", "csv", "--json")
    assert again.exit_code == 3  # the bad files are retried, and fail again
    resumed = json.loads(again.stdout)
    assert resumed["processed"] == 0 and resumed["done_before"] == 8 and resumed["failed"] == len(expected)
    assert len(journal(out)) == 8 and len((out / "errors.jsonl").read_text().splitlines()) == len(expected)

    for name in expected:
        (image_folder / name).unlink()
    fresh = infer(str(image_folder), "--model", str(detector), *FAST, "--out", str(out), "--overwrite", "--quiet")
    assert fresh.exit_code == 0 and fresh.output == ""
    assert len(journal(out)) == 8 and not (out / "errors.jsonl").read_text()
    assert not (out / "annotated").exists()


def test_table_and_plain_progress_when_not_a_terminal(detector, image_folder, tmp_path):
    result = infer(str(image_folder), "--model", str(detector), *FAST, "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "images done" in result.stdout and "img/s" in result.stdout and "inference" in result.stdout
    assert "infer: 8 image(s) to process" in result.stderr and "infer: 8/8 (0 failed)" in result.stderr


def test_annotated_copies_inside_the_source_are_not_read_back(detector, image_folder):
    out = image_folder / "out"
    args = [str(image_folder), "--model", str(detector), *FAST, "--out", str(out), "--save-annotated", "--json"]
    assert json.loads(infer(*args).stdout)["processed"] == 8
    again = json.loads(infer(*args).stdout)
    assert again["images_total"] == 8 and again["processed"] == 0 and again["done_before"] == 8


def test_other_settings_in_the_same_folder_are_refused(detector, image_folder, tmp_path):
    out = str(tmp_path / "o")
    assert infer(str(image_folder), "--model", str(detector), *FAST, "--out", out, "--quiet").exit_code == 0
    result = infer(str(image_folder), "--model", str(detector), *FAST, "--out", out, "--conf", "0.5")
    assert result.exit_code == 2
    assert "other settings (conf 0.15 -> 0.5)" in result.stderr and "--overwrite" in result.stderr


def test_auto_batch_on_cpu_prints_the_measured_table(detector, image_folder, tmp_path):
    result = infer(str(image_folder), "--model", str(detector), "--imgsz", "64", "--device", "cpu", *TORCH,
                   "--batch", "auto", "--max-latency-ms", "2000", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "Inference batch (auto)" in result.stdout and "chosen" in result.stdout
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    choice = summary["batch_choice"]
    assert choice["batch"] == summary["batch"] and len(choice["samples"]) >= 2
    assert all(s["latency_ms"] > 0 for s in choice["samples"] if not s["oom"])


@pytest.mark.parametrize("args, message", [
    ([], "Missing argument"),
    (["{src}", "--batch", "x"], "batch must be 'auto'"),
    (["{src}", "--imgsz", "100"], "multiple of 32"),
    (["{src}", "--conf", "2"], "conf must be in"),
    (["nowhere/at/all"], "source not found"),
    (["{src}", "--max-latency-ms", "10"], "--batch auto only"),
    (["{src}", "--classes", "a"], "not a class id"),
    (["{src}", "--model", "nope.pt"], "model file not found"),
    (["{src}", "--model", "resnet"], "unknown model"),
    (["{src}", "--device", "7"], "unknown device"),
    (["{src}", "--workers", "0"], "workers must be"),
    (["{src}", "--format", "xml"], "Invalid value"),
])
def test_usage_errors_exit_2_with_one_line(image_folder, tmp_path, args, message):
    result = infer(*[a.format(src=image_folder) for a in args], "--out", str(tmp_path / "o"))
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_resume_after_kill_9_gives_every_image_exactly_once(detector, tmp_path):
    """A real process killed mid-run with SIGKILL, plus a torn last line, then the same command again."""
    folder = tmp_path / "many"
    folder.mkdir()
    base = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    for i in range(200):
        cv2.imwrite(str(folder / f"{i:03d}.jpg"), np.roll(base, i, axis=1))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "yolo_batch.cli", "infer", str(folder), "--model", str(detector), "--imgsz",
               "160", "--batch", "2", "--device", "cpu", "--conf", "0.5", "--out", str(out), *TORCH, "--quiet",
               "--format", "csv"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    results = out / "results.jsonl"
    process = kill_when_written(command, results, 10, 120, env)
    assert process.returncode == -signal.SIGKILL
    before = results.read_text().count("\n")
    assert 10 <= before < 200, "the run should have been killed mid-way"
    with open(results, "a") as handle:  # what a kill during a write leaves: half a line
        handle.write('{"path": "' + str(folder / "199.jpg") + '", "width": 3')

    done = subprocess.run([*command[:-3], "--json", "--format", "csv"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["done_before"] == before and summary["processed"] == 200 - before
    assert summary["journal_dropped_lines"] == 1
    paths = [r["path"] for r in journal(out)]
    assert Counter(paths) == Counter(str(p) for p in sorted(folder.iterdir()))  # each image exactly once
    csv_paths = {row.split(",")[0] for row in (out / "results.csv").read_text().splitlines()[1:]}
    assert csv_paths <= set(paths)
    with_boxes = {r["path"] for r in journal(out) if r["detections"]}
    assert csv_paths == with_boxes


def test_bench_infer_requires_a_fixed_batch(image_folder):
    result = CliRunner().invoke(main, ["bench", "infer", str(image_folder), "--batch", "auto"])
    assert result.exit_code == 2 and "fixed --batch" in result.stderr


def test_bench_infer_measures_all_three(detector, image_folder):
    result = CliRunner().invoke(main, ["bench", "infer", str(image_folder), "--model", str(detector), "--imgsz",
                                       "64", "--batch", "4", "--device", "cpu", *TORCH, "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 8
    assert {"ultralytics predict", "yolo-batch infer", "forward only (ceiling)"} <= set(report["images_per_s"])
    assert {"ours_over_predict", "ours_over_ceiling"} <= set(report["ratios"])
    assert all(r["images"] == 8 for r in report["runs"])


def test_console_script_is_installed():
    script = shutil.which("yolo-batch", path=str(Path(sys.executable).parent))
    assert script is not None
    out = subprocess.run([script, "infer", "--help"], capture_output=True, text=True, check=True)
    assert "--max-latency-ms" in out.stdout and "resumable" in out.stdout


def test_bench_infer_times_a_lower_precision_against_fp32_of_the_same_runtime(detector, image_folder):
    from yolo_batch.inference.runtimes.host import cpu_flags

    if not (cpu_flags() or frozenset()) & {"avx512_bf16", "amx_bf16"}:
        pytest.skip("this CPU has no bf16 instructions")
    result = CliRunner().invoke(main, ["bench", "infer", str(image_folder), "--model", str(detector), "--imgsz",
                                       "64", "--batch", "4", "--device", "cpu", "--backend", "torch", "--precision",
                                       "bf16", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["precision"] == "bf16" and "yolo-batch infer (same runtime, fp32)" in report["images_per_s"]
    fp32 = [r for r in report["runs"] if r["method"] == "yolo-batch infer (same runtime, fp32)"]
    assert len(fp32) == 1 and fp32[0]["images"] == 8 and report["ratios"]["ours_over_ours_fp32"] > 0
