"""Tests for the built-in synthetic datasets (yolo_batch_datasets)."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from yolo_batch_datasets import (
    BUILTIN_SETS,
    SyntheticSpec,
    cached_dataset,
    default_dataset,
    list_builtin,
    make_dataset,
    render_sample,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each built-in set generated once with seed 0, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("built")
    return {name: make_dataset(name, root / name).parent for name in BUILTIN_SETS}


def _labels(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("labels/*/*.txt"))}


def test_builtin_specs() -> None:
    specs = list_builtin()
    assert [s.name for s in specs] == ["shapes", "defects", "big-shapes"]
    assert all(isinstance(s, SyntheticSpec) for s in specs)
    shapes, defects, big = BUILTIN_SETS["shapes"], BUILTIN_SETS["defects"], BUILTIN_SETS["big-shapes"]
    assert (shapes.n_train, shapes.n_val, shapes.imgsz, shapes.max_objects) == (64, 16, 256, 8)
    assert (defects.n_train, defects.n_val, defects.imgsz, defects.max_objects) == (64, 16, 320, 6)
    assert defects.class_names == ("scratch", "dent", "crack") and defects.grey
    assert (big.n_train, big.n_val, big.imgsz, big.max_objects) == (256, 32, 128, 4)
    assert big.class_names == shapes.class_names and big.painter == "shapes" and big.object_scale == 2.0
    with pytest.raises(TypeError):
        BUILTIN_SETS["mine"] = shapes  # type: ignore[index]


@pytest.mark.parametrize("name", ["shapes", "defects", "big-shapes"])
def test_layout_and_labels(built: dict[str, Path], name: str) -> None:
    spec, root = BUILTIN_SETS[name], built[name]
    data = yaml.safe_load((root / "data.yaml").read_text())
    assert "path" not in data
    assert data["train"] == "images/train" and data["val"] == "images/val"
    assert data["nc"] == len(data["names"]) == len(spec.class_names)
    assert data["names"] == dict(enumerate(spec.class_names))
    assert "seed 0" in (root / "data.yaml").read_text().splitlines()[0]
    assert (root / "README.txt").is_file()

    n_objects, n_empty, seen = 0, 0, set()
    for split, n in (("train", spec.n_train), ("val", spec.n_val)):
        images = sorted((root / "images" / split).glob("*.jpg"))
        labels = sorted((root / "labels" / split).glob("*.txt"))
        assert len(images) == len(labels) == n
        assert [p.stem for p in images] == [p.stem for p in labels]
        image = cv2.imread(str(images[0]))
        assert image.shape == (spec.imgsz, spec.imgsz, 3)
        for label in labels:
            lines = label.read_text().splitlines()
            n_empty += not lines
            for line in lines:
                fields = line.split()
                assert len(fields) == 5, line
                cls, cx, cy, w, h = int(fields[0]), *map(float, fields[1:])
                assert 0 <= cls < data["nc"]
                assert all(len(f.split(".")[1]) == 6 for f in fields[1:])
                assert cx - w / 2 + 1e-6 >= 0 and cx + w / 2 - 1e-6 <= 1
                assert cy - h / 2 + 1e-6 >= 0 and cy + h / 2 - 1e-6 <= 1
                assert w * spec.imgsz > 2 and h * spec.imgsz > 2
                seen.add(cls)
                n_objects += 1
    assert seen == set(range(data["nc"]))  # every class actually occurs
    assert n_objects > 2 * (spec.n_train + spec.n_val)
    assert 1 <= n_empty <= 0.15 * (spec.n_train + spec.n_val)  # a few background images, not many


def test_same_seed_is_identical_and_other_seed_differs(built: dict[str, Path], tmp_path: Path) -> None:
    again = make_dataset("shapes", tmp_path / "again", seed=0).parent
    assert _labels(again) == _labels(built["shapes"])
    for first in sorted(built["shapes"].glob("images/val/*.jpg"))[:4]:
        second = again / first.relative_to(built["shapes"])
        np.testing.assert_array_equal(cv2.imread(str(first)), cv2.imread(str(second)))
    other = make_dataset("shapes", tmp_path / "other", seed=1).parent
    assert _labels(other) != _labels(built["shapes"])


@pytest.mark.parametrize("name", ["shapes", "defects", "big-shapes"])
def test_boxes_are_tight_around_drawn_content(built: dict[str, Path], name: str) -> None:
    size = BUILTIN_SETS[name].imgsz
    checked = 0
    for index in range(10):
        sample = render_sample(name, split="val", index=index)
        changed = (sample.image != sample.background).any(axis=2)
        covered = np.zeros_like(changed)
        for x0, y0, x1, y1 in sample.boxes.astype(int):
            covered[y0:y1, x0:x1] = True
            inside = changed[y0:y1, x0:x1]
            # tight: each edge row/column of the box holds drawn pixels
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            checked += 1
        assert not (changed & ~covered).any(), "drawn pixels outside every box"
        # what is written to disk is exactly this sample
        label = built[name] / "labels" / "val" / f"val_{index:04d}.txt"
        rows = np.array([line.split() for line in label.read_text().splitlines()], float).reshape(-1, 5)
        np.testing.assert_array_equal(rows[:, 0], sample.class_ids)
        xyxy = np.c_[rows[:, 1:3] - rows[:, 3:5] / 2, rows[:, 1:3] + rows[:, 3:5] / 2] * size
        np.testing.assert_allclose(xyxy, sample.boxes, atol=1e-3)
    assert checked > 10


def test_big_shapes_are_larger_and_fewer_than_shapes() -> None:
    # the demo's set is easier on purpose: objects about twice the size (relative to the image), at most four
    def relative_sides(name: str) -> tuple[float, int]:
        spec, sides, most = BUILTIN_SETS[name], [], 0
        for index in range(spec.n_val):
            sample = render_sample(name, split="val", index=index)
            sides += list(np.sqrt((sample.boxes[:, 2] - sample.boxes[:, 0]) * (sample.boxes[:, 3] - sample.boxes[:, 1]))
                          / spec.imgsz)
            most = max(most, len(sample.boxes))
        return float(np.median(sides)), most

    (small, many), (big, few) = relative_sides("shapes"), relative_sides("big-shapes")
    assert 1.6 < big / small < 2.4
    assert few <= 4 < many


def test_objects_stand_out_from_background_on_disk(built: dict[str, Path]) -> None:
    # after JPEG, pixels inside boxes still differ from the clean background far more than outside
    sample = render_sample("defects", split="val", index=0)
    assert len(sample.boxes)
    on_disk = cv2.imread(str(built["defects"] / "images" / "val" / "val_0000.jpg")).astype(int)
    diff = np.abs(on_disk - sample.background.astype(int)).max(axis=2)
    inside = np.zeros(diff.shape, bool)
    for x0, y0, x1, y1 in sample.boxes.astype(int):
        inside[y0:y1, x0:x1] = True
    assert diff[inside].mean() > 3 * diff[~inside].mean()


def test_unknown_name_lists_builtin_sets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'x'; built-in sets: big-shapes, defects, shapes"):
        make_dataset("x", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="seed"):
        make_dataset("shapes", tmp_path / "out", seed=-1)


def test_non_empty_out_dir_is_refused_unless_overwrite(tmp_path: Path) -> None:
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me")
    with pytest.raises(FileExistsError) as info:
        make_dataset("shapes", tmp_path)
    assert "\n" not in str(info.value)
    assert mine.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]

    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "train" / "stale.jpg").write_bytes(b"old")
    data_yaml = make_dataset("shapes", tmp_path, overwrite=True)
    assert data_yaml == tmp_path / "data.yaml" and data_yaml.is_file()
    assert not (tmp_path / "images" / "train" / "stale.jpg").exists()
    assert mine.read_text() == "keep me"  # overwrite replaces the dataset, not unrelated files


def test_default_dataset_is_cached(tmp_path: Path) -> None:
    data_yaml = default_dataset(tmp_path / "cache")
    assert data_yaml == tmp_path / "cache" / "shapes-v1" / "data.yaml"
    before = data_yaml.stat().st_mtime_ns
    first_image = sorted(data_yaml.parent.glob("images/train/*.jpg"))[0]
    first_mtime = first_image.stat().st_mtime_ns
    assert default_dataset(tmp_path / "cache") == data_yaml
    assert data_yaml.stat().st_mtime_ns == before and first_image.stat().st_mtime_ns == first_mtime
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["shapes-v1"]  # no temp folders left


def test_cached_dataset_names_the_set_and_seed(tmp_path: Path, built: dict[str, Path]) -> None:
    data_yaml = cached_dataset("big-shapes", tmp_path)
    assert data_yaml == tmp_path / "big-shapes-v1" / "data.yaml"
    assert _labels(data_yaml.parent) == _labels(built["big-shapes"])
    other = cached_dataset("big-shapes", tmp_path, seed=3)
    assert other == tmp_path / "big-shapes-v1-seed3" / "data.yaml"
    assert _labels(other.parent) != _labels(built["big-shapes"])
    assert cached_dataset("shapes", tmp_path) == default_dataset(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        cached_dataset("nope", tmp_path)


def test_default_dataset_recovers_from_interrupted_runs(tmp_path: Path, built: dict[str, Path]) -> None:
    # a temp folder left by a killed run, and a final folder missing files, must both be survivable
    leftover = tmp_path / ".shapes-v1.tmp-12345-deadbeef" / "images" / "train"
    leftover.mkdir(parents=True)
    (leftover / "train_0000.jpg").write_bytes(b"half")
    broken = tmp_path / "shapes-v1"
    shutil.copytree(built["shapes"], broken)
    (broken / "labels" / "val" / "val_0003.txt").unlink()

    data_yaml = default_dataset(tmp_path)
    assert data_yaml == broken / "data.yaml"
    assert _labels(broken) == _labels(built["shapes"])
    assert len(list(broken.glob("images/*/*.jpg"))) == 80


def test_ultralytics_reads_the_set(built: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YOLO_OFFLINE", "1")  # before the import: no network checks
    from ultralytics.data.utils import check_det_dataset

    copy = tmp_path / "moved" / "shapes"
    shutil.copytree(built["shapes"], copy)  # a copy: the set must not depend on where it was generated
    data = check_det_dataset(str(copy / "data.yaml"))
    assert data["nc"] == 4 and list(data["names"].values()) == list(BUILTIN_SETS["shapes"].class_names)
    for split in ("train", "val"):
        assert Path(data[split]) == (copy / "images" / split).resolve() and Path(data[split]).is_dir()
