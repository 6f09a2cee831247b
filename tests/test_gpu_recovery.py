"""OOM recovery on a real GPU (``pytest -m gpu``): a drill on CUDA, and a real OOM from memory taken mid-run.

Skipped with a reason on GPU-less machines; the CPU tests (test_oom_recovery.py) cover the mechanism.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from trainer_spy import TrainerSpy

from yolo_batch import BatchRequest, SizingConfig, TrainConfig, train
from yolo_batch.training.drills import ENV

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]


def gpu_run(data: Any, tmp_path: Any, batch: int, epochs: int = 2) -> TrainConfig:
    return TrainConfig(sizing=SizingConfig(data=data, imgsz=320, device="0", epochs=epochs,
                                           batch=BatchRequest(fixed=batch)),
                       project=str(tmp_path), name="gpu", extra={"plots": False, "warmup_epochs": 0})


def test_a_drill_on_the_gpu_records_nvml_free_memory(shapes_yaml, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "train:epoch=1,step=1")
    spy = TrainerSpy().install(monkeypatch)
    result = train(gpu_run(shapes_yaml, tmp_path, batch=16))
    (event,) = result.events
    assert (event.old_batch, event.new_batch, event.effective_batch) == (16, 8, result.decision.effective_batch)
    assert event.free_bytes is not None and 0 < event.free_bytes <= torch.cuda.get_device_properties(0).total_memory
    assert [e["batch"] for e in spy.epochs] == [16, 8]
    assert result.weights is not None


def test_memory_taken_mid_run_is_recovered_from(shapes_yaml, tmp_path, monkeypatch):
    """After epoch 0 this process takes most of what epoch 0 showed a step needs (as a co-tenant would): epoch 1
    runs out of memory for real, steps down, and finishes at the same effective batch."""
    from yolo_batch import ultralytics_adapter

    hog: list[torch.Tensor] = []
    original = ultralytics_adapter.train

    def take_memory(trainer: Any) -> None:
        if trainer.epoch != 0:
            return
        peak = torch.cuda.max_memory_reserved(0)
        torch.cuda.empty_cache()
        held = torch.cuda.memory_reserved(0)  # model, optimizer, EMA
        free, _ = torch.cuda.mem_get_info(0)
        leave = int(0.6 * max(peak - held, 0))  # 60 % of what a step at this batch needed
        hog.append(torch.empty(max(free - leave, 0), dtype=torch.uint8, device="cuda:0"))

    def train_with_hog(model: Any, overrides: Any, *, callbacks: Any = (), **kwargs: Any) -> Any:
        return original(model, overrides, callbacks=[*callbacks, ("on_train_epoch_end", take_memory)], **kwargs)

    monkeypatch.setattr(ultralytics_adapter, "train", train_with_hog)
    spy = TrainerSpy().install(monkeypatch)
    torch.cuda.reset_peak_memory_stats(0)
    try:
        result = train(gpu_run(shapes_yaml, tmp_path, batch=64, epochs=3))
    finally:
        hog.clear()
        torch.cuda.empty_cache()
    train_events = [e for e in result.events if e.phase == "train"]
    assert train_events and all(e.kind == "oom" and e.free_bytes is not None for e in train_events)
    assert [e["epoch"] for e in spy.epochs] == [0, 1, 2]
    assert {e["batch"] * e["accumulate"] for e in spy.epochs} == {result.decision.effective_batch}
    assert spy.epochs[-1]["batch"] < 64 and result.weights is not None
