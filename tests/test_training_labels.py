"""Bad labels and relative paths in training: checked by yolo-batch's own dataset scan, before any run folder."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from yolo_batch import SizingConfig, TrainConfig, train
from yolo_batch.cli import main
from yolo_batch.errors import InputError
from yolo_batch.training.data import inspect_dataset
from yolo_batch.training.run import ultralytics_overrides

TINY = ["--epochs", "1", "--imgsz", "64", "--device", "cpu", "--batch", "4", "--set", "plots=False",
        "--set", "workers=0"]


@pytest.fixture
def small_set(shapes_yaml: Path, tmp_path: Path) -> Path:
    """8 training and 4 validation images of the synthetic set, copied so their labels can be broken."""
    source, root = shapes_yaml.parent, tmp_path / "set"
    for split, count in (("train", 8), ("val", 4)):
        for kind in ("images", "labels"):
            (root / kind / split).mkdir(parents=True)
        for image in sorted((source / "images" / split).glob("*.jpg"))[:count]:
            shutil.copy(image, root / "images" / split / image.name)
            shutil.copy(source / "labels" / split / f"{image.stem}.txt", root / "labels" / split / f"{image.stem}.txt")
    shutil.copy(shapes_yaml, root / "data.yaml")  # nc 4, no path: key
    return root / "data.yaml"


def label_files(data: Path, split: str = "train") -> list[Path]:
    return sorted((data.parent / "labels" / split).glob("*.txt"))


BAD_LINES = {  # what a broken label line holds -> what the one line must say
    "class id beyond nc": ("7 0.5 0.5 0.2 0.2", "class id 7"),
    "coordinates outside [0, 1]": ("0 1.7 0.5 0.2 0.2", "outside [0, 1]"),
    "negative size": ("0 0.5 0.5 -0.2 0.2", "negative"),
    "text that is not numbers": ("0 x y w h", "not numbers"),
    "too few numbers": ("0 0.5 0.5", "5 numbers"),
}


def break_all(data: Path, line: str) -> Path:
    """Append ``line`` as line 2 of every label file (training and validation); returns the first training one."""
    for split in ("train", "val"):
        for label in label_files(data, split):
            label.write_text("0 0.5 0.5 0.1 0.1\n" + line + "\n")
    return label_files(data)[0]


@pytest.mark.parametrize("line, expected", BAD_LINES.values(), ids=BAD_LINES)
def test_nothing_usable_names_the_first_bad_file_and_line(small_set, line, expected):
    first = break_all(small_set, line)
    with pytest.raises(InputError, match=re.escape(expected)) as raised:
        inspect_dataset(small_set)
    message = str(raised.value)
    assert f"{first}:2" in message and "\n" not in message


def test_a_missing_labels_folder_is_refused(small_set):
    shutil.rmtree(small_set.parent / "labels")
    with pytest.raises(InputError, match="no label files") as raised:
        inspect_dataset(small_set)
    assert str(small_set.parent / "labels" / "train") in str(raised.value)


def test_train_with_unusable_labels_is_one_line_exit_2_and_no_run_folder(small_set, tmp_path):
    first = break_all(small_set, "3 0.5 0.5 0.2 0.2 0.9")  # six numbers: neither a box nor a polygon
    result = CliRunner().invoke(main, ["train", "--data", str(small_set), *TINY, "--project", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert f"{first}:2" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_some_bad_labels_give_one_warning_that_counts_them(small_set, caplog):
    files = label_files(small_set)
    files[0].write_text("9 0.5 0.5 0.2 0.2\n")
    files[1].write_text("0 0.5 0.5 0.2 1.5\n")
    files[2].write_text("1 0.5 0.5 0.2 0.2\n0 nan? 0.1 0.1 0.1\n")
    with caplog.at_level(logging.WARNING, logger="yolo_batch"):
        info = inspect_dataset(small_set)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "3 of 8 training images skipped" in warnings[0]
    assert "1 class id >= nc 4" in warnings[0] and "1 coordinates outside [0, 1]" in warnings[0]
    assert "1 not numbers" in warnings[0]
    assert warnings[0] in info.notes  # the decision record carries it too
    assert info.train_images == 8  # what Ultralytics is given is unchanged: it drops the same three


def moved_yaml(data: Path, tmp_path: Path) -> Path:
    """A data yaml in another folder whose relative ``path:`` points back at the set."""
    config = tmp_path / "configs" / "nested"
    config.mkdir(parents=True)
    content = yaml.safe_load(data.read_text())
    content["path"] = "../../set"
    target = config / "data.yaml"
    target.write_text(yaml.safe_dump(content))
    return target


def test_a_relative_path_key_resolves_against_the_yaml_folder(small_set, tmp_path, monkeypatch):
    data = moved_yaml(small_set, tmp_path)
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    info = inspect_dataset(data)
    assert (info.train_images, info.val_images) == (8, 4)
    assert any(f"'../../set' resolved against the yaml's folder: {small_set.parent}" in n for n in info.notes)
    handed = yaml.safe_load(info.training_yaml.read_text())  # what Ultralytics' trainer reads
    assert handed["path"] == str(small_set.parent)


def test_a_relative_path_key_never_picks_a_same_named_folder_under_the_cwd(small_set, tmp_path, monkeypatch):
    data = moved_yaml(small_set, tmp_path)
    decoy = tmp_path / "cwd" / "a" / "b"
    (decoy.parent.parent / "set" / "images" / "train").mkdir(parents=True)  # ../../set from the cwd: empty
    (decoy.parent.parent / "set" / "images" / "val").mkdir(parents=True)
    decoy.mkdir(parents=True)
    monkeypatch.chdir(decoy)
    assert inspect_dataset(data).train_images == 8


def test_a_relative_project_resolves_against_the_cwd(shapes_yaml, tmp_path, monkeypatch):
    from yolo_batch import estimate_batch

    monkeypatch.chdir(tmp_path)
    config = TrainConfig(sizing=SizingConfig(data=shapes_yaml, imgsz=64, device="cpu"), project="runs/mine")
    overrides = ultralytics_overrides(config, estimate_batch(config.sizing), shapes_yaml)
    assert overrides["project"] == str(tmp_path / "runs" / "mine")


@pytest.mark.slow
def test_training_from_another_folder_with_some_bad_labels(small_set, tmp_path, monkeypatch):
    """End to end: a moved yaml with a relative path:, a relative --project, two bad label files."""
    files = label_files(small_set)
    files[0].write_text("9 0.5 0.5 0.2 0.2\n")
    files[1].write_text("0 0.5 0.5 -0.2 0.2\n")
    data = moved_yaml(small_set, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = train(TrainConfig(sizing=SizingConfig(data=data, imgsz=64, epochs=1, device="cpu"),
                               project="runs", name="moved", extra={"plots": False, "workers": 0}))
    assert result.save_dir == work / "runs" / "moved"
    assert any("2 of 8 training images skipped" in r for r in result.decision.reasons)
    assert any("resolved against the yaml's folder" in r for r in result.decision.reasons)
    assert result.weights is not None and result.weights.is_file()


def test_single_cls_takes_any_class_id_as_ultralytics_does(small_set):
    break_all(small_set, "7 0.5 0.5 0.2 0.2")
    assert inspect_dataset(small_set, single_cls=True).notes == ()
