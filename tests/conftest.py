"""Shared fixtures: offline Ultralytics, a private cache, real datasets, fake GPUs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ["YOLO_OFFLINE"] = "1"  # before anything imports Ultralytics

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own decision cache; generated datasets are shared across the session."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("YOLO_BATCH_CACHE_DIR", str(folder))
    shared_data = tmp_path_factory.getbasetemp() / "datasets-cache"
    shared_data.mkdir(exist_ok=True)
    (folder / "datasets").symlink_to(shared_data, target_is_directory=True)
    return folder


def shared_dataset(name: str) -> Path:
    """A ../shared/datasets set; skipped with a reason where absent, a failure under CI=true."""
    path = SHARED / name
    if not (path / "data.yaml").is_file():
        message = f"{path} not found: the real datasets live beside the project root"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (required under CI)")
        pytest.skip(message)
    return path


def copy_subset(name: str, folder: Path, n_train: int | None = None, n_val: int | None = None) -> Path:
    """Copy (part of) a shared set into ``folder``/``name``; returns its data.yaml.

    Ultralytics writes label caches beside the labels, so tests never train on the shared folder itself.
    """
    source = shared_dataset(name)
    target = folder / name
    for split, limit in (("train", n_train), ("val", n_val)):
        (target / "images" / split).mkdir(parents=True, exist_ok=True)
        (target / "labels" / split).mkdir(parents=True, exist_ok=True)
        for image in sorted((source / "images" / split).iterdir())[:limit]:
            shutil.copy(image, target / "images" / split / image.name)
            label = source / "labels" / split / (image.stem + ".txt")
            if label.exists():
                shutil.copy(label, target / "labels" / split / label.name)
    shutil.copy(source / "data.yaml", target / "data.yaml")
    return target / "data.yaml"


@pytest.fixture
def copy_shared(tmp_path: Path) -> Callable[..., Path]:
    """``copy_shared(name, n_train, n_val)``: a private copy of (part of) a shared set."""

    def copy(name: str, n_train: int | None = None, n_val: int | None = None) -> Path:
        return copy_subset(name, tmp_path, n_train, n_val)

    return copy


@pytest.fixture(scope="session")
def shapes_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in synthetic set, generated once per session."""
    from yolo_batch_datasets import make_dataset

    return make_dataset("shapes", tmp_path_factory.mktemp("shapes") / "shapes")
