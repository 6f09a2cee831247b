"""Multi-GPU runs start offline: the launch file Ultralytics writes for its DDP workers is generated and loaded
without any package being installed (Ultralytics pip-installs cloudpickle on first use unless it is present).

No GPU is needed: the file is written in this process and loaded by a fresh interpreter exactly as a worker loads
it, with the worker's ``trainer.train()`` replaced by a report of what it received.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from yolo_batch import ultralytics_adapter as ua
from yolo_batch.training.batchnorm import ConvertToSyncBatchNorm

# What a worker runs, minus training: any attempt to start pip (or uv) fails the worker instead of installing.
WORKER = r"""
import json, runpy, subprocess, sys

attempts = []
real_popen_init = subprocess.Popen.__init__

def no_installs(self, args, *a, **k):
    text = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
    if "pip" in text or text.startswith("uv"):
        attempts.append(text)
        raise AssertionError("the DDP worker tried to install a package: " + text)
    return real_popen_init(self, args, *a, **k)

subprocess.Popen.__init__ = no_installs

from ultralytics.models.yolo.detect import DetectionTrainer

launch, out = sys.argv[1], sys.argv[2]

def report(trainer):
    callbacks = sorted({type(c).__name__ for cbs in trainer.callbacks.values() for c in cbs
                        if type(c).__module__.startswith("yolo_batch")})
    json.dump({"trainer": type(trainer).__qualname__, "model": type(trainer.model).__name__,
               "imgsz": trainer.args.imgsz, "callbacks": callbacks, "attempts": attempts,
               "cloudpickle": "cloudpickle" in sys.modules}, open(out, "w"))

DetectionTrainer.train = report
sys.argv = [launch]
runpy.run_path(launch, run_name="__main__")
"""


@pytest.fixture
def trainer(shapes_yaml, tmp_path):
    """An Ultralytics detection trainer as ``model.train`` builds it in the launching process, with our callbacks."""
    ua.import_ultralytics()
    from ultralytics.models.yolo.detect import DetectionTrainer

    with ua.quiet():
        built = DetectionTrainer(overrides={"model": "yolo11n.yaml", "data": str(shapes_yaml), "imgsz": 64,
                                            "epochs": 1, "device": "cpu", "project": str(tmp_path), "name": "ddp",
                                            "plots": False})
        built.model = built.get_model(cfg="yolo11n.yaml", verbose=False)
    built.add_callback(ua.WorkerSetup.event, ua.WorkerSetup())
    sync = ConvertToSyncBatchNorm()
    built.add_callback(sync.event, sync)
    return built


def test_the_ddp_launch_file_is_written_and_loaded_offline_without_installing_anything(trainer, tmp_path,
                                                                                          monkeypatch):
    from ultralytics.utils import checks

    asked: list[tuple[object, bool]] = []
    real_check = checks.check_requirements

    def spy(requirements, *args, **kwargs):
        result = real_check(requirements, *args, **kwargs)
        asked.append((requirements, result))
        return result

    monkeypatch.setattr(checks, "check_requirements", spy)

    def refuse_install(*args, **kwargs):
        raise AssertionError(f"tried to install a package: {args[:1]}")

    monkeypatch.setattr(checks.subprocess, "check_output", refuse_install)

    with ua.ddp_launch_file(trainer) as launch:
        assert launch.suffix == ".py" and launch.with_suffix(".pt").is_file()
        out = tmp_path / "worker.json"
        env = {**os.environ, "YOLO_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run([sys.executable, "-c", WORKER, str(launch), str(out)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert not launch.exists() and not launch.with_suffix(".pt").exists()  # cleaned up as Ultralytics does
    assert all(result is True for _, result in asked), asked  # every requirement already satisfied: no AutoUpdate
    worker = json.loads(out.read_text())
    assert worker["attempts"] == [] and worker["cloudpickle"]
    assert worker["model"] == "DetectionModel" and worker["imgsz"] == 64
    assert worker["callbacks"] == ["ConvertToSyncBatchNorm", "WorkerSetup"]  # our callbacks reach the worker


def test_cloudpickle_is_a_declared_dependency():
    import tomllib

    pyproject = tomllib.loads(Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text())
    declared = [d for d in pyproject["project"]["dependencies"] if d.startswith("cloudpickle")]
    assert declared == ["cloudpickle>=3.1.1"]  # Ultralytics' own floor: an older copy would be "upgraded" online
