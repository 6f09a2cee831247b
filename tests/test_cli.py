"""The command line end to end on CPU: real training, real files, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from yolo_batch.cli import main

TINY = ["--epochs", "1", "--imgsz", "64", "--set", "plots=False", "--set", "workers=0"]


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def trained_run(folder: Path) -> tuple[dict, dict]:
    decision = json.loads((folder / "autobatch.json").read_text())
    args = yaml.safe_load((folder / "args.yaml").read_text())
    assert (folder / "weights" / "best.pt").is_file()
    return decision, args


def test_train_auto_on_the_embedded_synthetic_set(tmp_path):
    result = run("train", "--auto", *TINY, "--project", str(tmp_path), "--name", "synthetic")
    assert result.exit_code == 0, result.output
    assert "AutoBatch decision" in result.output and "run folder:" in result.output
    decision, args = trained_run(tmp_path / "synthetic")
    assert decision["source"] == "fallback"  # no GPU here, and the record says so
    assert any("no CUDA GPU found" in r for r in decision["reasons"])
    assert args["batch"] == decision["total_batch"] == 16
    assert args["nbs"] == decision["nominal_batch"] == 64
    assert decision["dataset_size"] == 64


def test_train_auto_on_real_blood_cell_data(tmp_path, copy_shared):
    data = copy_shared("bccd")
    result = run("train", "--auto", "--data", str(data), *TINY, "--project", str(tmp_path / "runs"), "--name", "bccd")
    assert result.exit_code == 0, result.output
    decision, args = trained_run(tmp_path / "runs" / "bccd")
    labels = sorted((data.parent / "labels" / "train").glob("*.txt"))
    assert decision["dataset_size"] == 291
    assert decision["max_objects"] == max(len(p.read_text().split("\n")) - 1 for p in labels if p.read_text())
    assert args["batch"] == decision["batch"]
    assert Path(args["data"]) == data.resolve()


def test_autobatch_json_is_clean_json(copy_shared):
    data = copy_shared("coco8")
    result = CliRunner().invoke(main, ["autobatch", "--data", str(data), "--imgsz", "64", "--json"])
    assert result.exit_code == 0, result.output
    decision = json.loads(result.stdout)  # nothing but JSON on stdout
    assert decision["batch"] == 4 and decision["dataset_size"] == 4
    assert decision["accumulate"] == 16
    assert decision["reasons"]


def test_autobatch_table(shapes_yaml):
    result = run("autobatch", "--data", str(shapes_yaml), "--imgsz", "64", "--batch", "8")
    assert result.exit_code == 0
    assert "batch (per device)" in result.output and "batch set by the user" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "missing.yaml"], "data yaml not found: missing.yaml"),
        (["--data", "{malformed}"], "malformed data yaml"),
        (["--model", "yolo99z.yaml"], "unknown model 'yolo99z.yaml'"),
        (["--model", "missing.pt"], "model file not found: missing.pt"),
        (["--batch", "0"], "batch must be -1"),
        (["--batch", "-4"], "batch must be -1"),
        (["--batch", "1.5"], "memory fraction must be in (0, 1]"),
        (["--batch", "0.0"], "memory fraction must be in (0, 1]"),
        (["--auto", "--batch", "8"], "--auto and --batch 8 disagree"),
        (["--imgsz", "100"], "imgsz must be a positive multiple of 32, got 100"),
        (["--imgsz", "-32"], "imgsz must be a positive multiple of 32"),
        (["--device", "7"], "unknown device '7'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--set", "lrr0=0.1"], "'lrr0' is not a valid YOLO argument"),
        (["--set", "batch=8"], "use --batch/--auto instead"),
    ],
)
@pytest.mark.parametrize("command", ["train", "autobatch"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, shapes_yaml, command, args, message):
    monkeypatch.chdir(tmp_path)
    if "{malformed}" in args:
        bad = tmp_path / "bad.yaml"
        bad.write_text("train: [images\nval: :")
        args = [a.replace("{malformed}", str(bad)) for a in args]
    if "--data" not in args:
        args = [*args, "--data", str(shapes_yaml)]
    extra = ["--project", str(tmp_path / "runs")] if command == "train" else []
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, [command, *args, "--imgsz", "64", *extra] if "--imgsz" not in args
                                else [command, *args, *extra])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, nothing else


def test_datasets_list_and_make(tmp_path):
    listing = run("datasets")
    assert listing.exit_code == 0 and "shapes" in listing.output and "defects" in listing.output
    made = run("datasets", "make", "defects", str(tmp_path / "d"))
    assert made.exit_code == 0
    data = yaml.safe_load(Path(made.output.strip()).read_text())
    assert data["nc"] == len(data["names"]) == 3


def test_datasets_make_never_overwrites_without_being_asked(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    refused = CliRunner().invoke(main, ["datasets", "make", "shapes", str(target)])
    assert refused.exit_code == 2 and refused.output.startswith("Error: ")
    assert (target / "keep.txt").read_text() == "precious"
    unknown = CliRunner().invoke(main, ["datasets", "make", "cats", str(tmp_path / "x")])
    assert unknown.exit_code == 2 and "built-in sets: big-shapes, defects, shapes" in unknown.output


def test_bench_autobatch_without_gpu_says_so_and_exits_0():
    result = CliRunner().invoke(main, ["bench", "autobatch", "--imgsz", "64"])
    assert result.exit_code == 0
    assert "no CUDA GPU on this machine" in result.output


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "yolo-batch"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "yolo-batch, version 0.1.0"
