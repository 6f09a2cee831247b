"""The batch controller around the live trainer: who writes autobatch.json, what the launching process learns, and
what travels into DDP workers."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from yolo_batch import BatchRequest, SizingConfig, TrainConfig
from yolo_batch.training import run as run_module
from yolo_batch.training.batch_change import BatchEvent, ScalingRules, TrainingOutOfMemory
from yolo_batch.training.run_record import DECISION_FILE, RecordWriter, RunRecord
from yolo_batch.ultralytics_adapter import controlled_trainer
from yolo_batch.ultralytics_adapter.trainer_control import BatchControl, GatedScaler


def fake_trainer(save_dir: Path, world_size: int = 1) -> SimpleNamespace:
    """The attributes BatchControl.setup reads, under Ultralytics' names."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return SimpleNamespace(world_size=world_size, device=torch.device("cpu"), batch_size=16 * world_size,
                           test_loader=SimpleNamespace(batch_size=32), accumulate=4, optimizer=optimizer,
                           scaler=SimpleNamespace(scale=lambda loss: loss), save_dir=save_dir,
                           args=SimpleNamespace(weight_decay=0.0005, nbs=64),
                           validator=SimpleNamespace(gather_stats=lambda: None))


def control(writer=None, **kwargs) -> BatchControl:
    return BatchControl(ScalingRules(nominal_batch=64, lr_rule="linear", base_lr0=0.01), accumulate=4, lr0=0.01,
                        bn_policy="train", record=writer, **kwargs)


@pytest.mark.parametrize(("rank", "writes"), [(-1, 1), (0, 1), (1, 0), (3, 0)])
def test_only_rank_zero_writes_the_record(tmp_path, monkeypatch, rank, writes):
    import ultralytics.utils

    calls = []
    monkeypatch.setattr(ultralytics.utils, "RANK", rank)
    trainer = fake_trainer(tmp_path)
    ours = control(lambda save_dir, **changes: calls.append((save_dir, changes)))
    ours.setup(trainer)
    assert len(calls) == writes
    if writes:
        assert calls == [(tmp_path, {"trainer_accumulate": 4})]
    assert isinstance(trainer.scaler, GatedScaler)
    ours.release(trainer)
    assert not isinstance(trainer.scaler, GatedScaler)  # the gate goes when training ends


def test_the_first_phase_of_a_schedule_sets_accumulation_and_weight_decay(tmp_path, monkeypatch):
    # Ultralytics accumulates a batch of 16 to the nominal 64 (4); a schedule phase of 16 does not accumulate.
    import ultralytics.utils

    monkeypatch.setattr(ultralytics.utils, "RANK", -1)
    trainer = fake_trainer(tmp_path)
    for group in trainer.optimizer.param_groups:
        group["param_group"] = "weight"
    phase = BatchControl(ScalingRules(nominal_batch=64, lr_rule="linear", base_lr0=0.01), accumulate=1,
                         lr0=0.0025, bn_policy="train")
    phase.setup(trainer)
    assert trainer.accumulate == 1
    assert trainer.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.0005 * 16 / 64)


def test_the_controller_and_the_trainer_class_travel_into_ddp_workers(shapes_yaml):
    """Ultralytics pickles the trainer class and the model's callbacks (with cloudpickle) for its DDP workers."""
    cloudpickle = pytest.importorskip("cloudpickle")
    from ultralytics.models.yolo.detect import DetectionTrainer

    from yolo_batch import estimate_batch
    from yolo_batch.training.config import Rounding
    from yolo_batch.training.drills import parse_injection
    from yolo_batch.training.schedule import ScheduleRequest, resolve_schedule

    decision = estimate_batch(SizingConfig(data=shapes_yaml, imgsz=64, device="cpu", batch=BatchRequest(fixed=8)))
    schedule = resolve_schedule(ScheduleRequest.parse("8@0,16@1"), epochs=2, world_size=2, limit=8,
                                rounding=Rounding.POW2)
    ours = control(RecordWriter(RunRecord(decision, schedule=schedule.phases)), schedule=schedule,
                   drills=parse_injection("train:epoch=1,rank=1"))
    callbacks = {event: [callback] for event, callback in ours.callbacks()}
    copy = cloudpickle.loads(cloudpickle.dumps(callbacks))
    restored = copy["on_train_epoch_start"][0].__self__
    assert isinstance(restored, BatchControl)
    assert (restored.schedule, restored.drills, restored.record.record) == (schedule, ours.drills, ours.record.record)
    assert all(hooks[0].__self__ is restored for hooks in copy.values())  # one controller per process
    cls = controlled_trainer.controlled_trainer(DetectionTrainer)
    again = cloudpickle.loads(cloudpickle.dumps(cls))
    assert issubclass(again, DetectionTrainer)
    assert again._do_train.__qualname__ == "BatchControlledTrainer._do_train"


def _event(**values) -> BatchEvent:
    base = dict(kind="oom", phase="train", epoch=1, step=2, old_batch=16, new_batch=8, accumulate=8,
                effective_batch=64, lr0=0.01, ranks=(1,))
    return BatchEvent(**{**base, **values})


def worker_training(events: tuple[BatchEvent, ...], stopped: str | None = None):
    """Stands in for ultralytics_adapter.train on a multi-GPU run: the control travels pickled into a "worker",
    whose rank 0 writes the record; the launching process never runs the callbacks."""

    def train(model, overrides, *, callbacks=(), image_window=None, control=None):
        worker = pickle.loads(pickle.dumps(control))
        save_dir = Path(overrides["project"]) / overrides["name"]
        save_dir.mkdir(parents=True)
        worker.record(save_dir, trainer_accumulate=4)
        worker.record(save_dir, events=events, stopped=stopped)
        if stopped is not None:
            from yolo_batch.ultralytics_adapter import WorkersFailed

            raise WorkersFailed(save_dir, 1)
        return SimpleNamespace(save_dir=save_dir)

    return train


def tiny(shapes_yaml, tmp_path) -> TrainConfig:
    return TrainConfig(sizing=SizingConfig(data=shapes_yaml, imgsz=64, epochs=2, device="cpu",
                                           batch=BatchRequest(fixed=16)),
                       project=str(tmp_path), name="run", extra={"plots": False})


def test_the_launching_process_learns_what_the_workers_did(shapes_yaml, tmp_path, monkeypatch):
    events = (_event(),)
    monkeypatch.setattr(run_module.ultralytics_adapter, "train", worker_training(events))
    result = run_module.train(tiny(shapes_yaml, tmp_path))
    assert result.events == events and result.accumulate == 4
    saved = RunRecord.load(tmp_path / "run" / DECISION_FILE)
    assert saved.events == events and saved.final_batch == 8 and saved.final_accumulate == 8
    assert saved.decision == result.decision


def test_a_worker_that_gave_up_is_one_line_in_the_launching_process(shapes_yaml, tmp_path, monkeypatch):
    line = "out of memory in training at epoch 1, step 0 at batch 1 per device: nothing smaller to try"
    monkeypatch.setattr(run_module.ultralytics_adapter, "train", worker_training((_event(),), stopped=line))
    with pytest.raises(TrainingOutOfMemory) as info:
        run_module.train(tiny(shapes_yaml, tmp_path))
    assert str(info.value) == line


def test_free_memory_for_the_record_comes_from_nvml_on_the_process_gpu(monkeypatch):
    from yolo_batch.core import nvml
    from yolo_batch.ultralytics_adapter.trainer_edits import free_device_bytes

    asked = []

    def read_gpus(indices):
        asked.append(list(indices))
        if indices == [3]:
            raise nvml.NvmlUnavailable("NVML could not start")
        return [SimpleNamespace(free_bytes=5 << 30)]

    monkeypatch.setattr(nvml, "read_gpus", read_gpus)
    assert free_device_bytes(SimpleNamespace(device=torch.device("cuda", 1))) == 5 << 30
    assert free_device_bytes(SimpleNamespace(device=torch.device("cuda", 3))) is None  # where NVML cannot answer
    assert free_device_bytes(SimpleNamespace(device=torch.device("cpu"))) is None
    assert asked == [[1], [3]]


def test_the_gated_scaler_is_the_scaler_with_a_gate_before_scale():
    import copy

    calls = []
    inner = torch.amp.GradScaler("cpu", enabled=False)
    scaler = GatedScaler(inner, lambda: calls.append("gate"))
    loss = torch.tensor(2.0)
    assert torch.equal(scaler.scale(loss), inner.scale(loss))
    assert calls == ["gate"] and scaler.state_dict() == inner.state_dict()
    assert isinstance(copy.copy(scaler), GatedScaler)  # copying does not recurse through __getattr__


def test_the_controlled_trainer_composes_with_the_before_wrap_hook():
    """--bn sync on several GPUs needs the before-DDP-wrap trainer too: both sets of overrides apply."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    from yolo_batch.ultralytics_adapter.training import BeforeWrapHook, before_wrap_trainer

    both = before_wrap_trainer(controlled_trainer.controlled_trainer(DetectionTrainer))
    assert both.setup_model is BeforeWrapHook.setup_model
    assert both._do_train is controlled_trainer.BatchControlledTrainer._do_train
    assert both.validate is controlled_trainer.BatchControlledTrainer.validate
    assert issubclass(both, DetectionTrainer)


@pytest.mark.parametrize("module", [
    "yolo_batch.training.batchnorm", "yolo_batch.training.batch_change", "yolo_batch.training.run",
    "yolo_batch.ultralytics_adapter.trainer_control", "yolo_batch.ultralytics_adapter.controlled_trainer",
])
def test_each_module_imports_first_without_a_cycle(module):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
