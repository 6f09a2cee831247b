"""The BatchNorm policy: the pure rule, the callbacks, the Ultralytics behaviour they rely on, and real runs."""

from __future__ import annotations

import inspect
import json
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import copy_subset
from torch import nn
from trainer_spy import TrainerSpy

from yolo_batch import ultralytics_adapter as ua
from yolo_batch.cli import main
from yolo_batch.training.batchnorm import (
    ConvertToSyncBatchNorm,
    FreezeBatchNorm,
    PlainBatchNormInEma,
    callbacks_for,
    choose_bn_policy,
    convert_to_sync,
    starts_from_weights,
)
from yolo_batch.training.config import BatchRequest, BnPolicy, SizingConfig, TrainConfig

F, T, S = BnPolicy.FREEZE, BnPolicy.TRAIN, BnPolicy.SYNC


@pytest.mark.parametrize(
    ("requested", "batch", "world", "weights", "policy", "says", "warns"),
    [
        ("auto", 16, 1, True, T, ">= 8", False),
        ("auto", 8, 1, False, T, "reliable", False),
        ("auto", 2, 1, True, F, "training starts from weights", False),
        ("auto", 7, 4, True, F, "training starts from weights", False),  # weights first, then sync
        ("auto", 2, 4, False, S, "global batch of 8", False),
        ("auto", 1, 1, False, T, "noisy", True),  # from scratch, one device: nothing helps; says so
        ("freeze", 32, 1, True, F, "as requested", False),
        ("freeze", 2, 1, False, F, "initial 0/1", True),
        ("train", 2, 1, True, T, "noisy", False),
        ("train", 16, 2, False, T, "as requested", False),
        ("sync", 4, 2, False, S, "global batch of 8 on 2 GPUs", False),
        ("sync", 4, 1, True, T, "one device", False),
        (BnPolicy.AUTO, 4, 1, True, F, "per-device batch 4 < 8", False),
    ],
)
def test_choose_bn_policy(requested, batch, world, weights, policy, says, warns):
    decision = choose_bn_policy(requested, batch, world, weights)
    assert decision.policy is policy
    assert says in decision.reason
    assert (decision.warning is not None) == warns
    if warns and requested == "auto":
        assert "BatchNorm trains" in decision.warning  # the warning says what it chose


@pytest.mark.parametrize(
    ("requested", "batch", "world", "error"),
    [("frozen", 2, 1, "frozen"), ("auto", 0, 1, "per-device batch"), ("auto", 2, 0, "world size")],
)
def test_choose_bn_policy_rejects_bad_input(requested, batch, world, error):
    with pytest.raises(ValueError, match=error):
        choose_bn_policy(requested, batch, world, True)


@pytest.mark.parametrize(
    ("model", "pretrained", "expected"),
    [
        ("yolo11n.yaml", True, False),  # a yaml with pretrained=True loads nothing
        ("runs/best.pt", True, True),
        ("runs/best.pt", False, False),
        ("runs/best.pt", "false", False),
        ("yolo11n.yaml", "weights/last.pt", True),
    ],
)
def test_starts_from_weights(model, pretrained, expected):
    assert starts_from_weights(model, pretrained) is expected


def test_sizing_infers_weights_from_the_model_and_pass_through():
    from yolo_batch.training.run import split_train_args

    assert SizingConfig(model="a.pt").starts_from_weights and not SizingConfig().starts_from_weights
    sizing, rest = split_train_args(SizingConfig(model="a.pt"), {"pretrained": False})
    assert sizing.starts_from_weights is False and rest == {"pretrained": False}  # still passed to Ultralytics


def test_callbacks_for_each_policy():
    assert [type(c) for c in callbacks_for(F)] == [FreezeBatchNorm]
    assert [type(c) for c in callbacks_for(S)] == [ConvertToSyncBatchNorm, PlainBatchNormInEma]
    assert callbacks_for(T) == []
    with pytest.raises(ValueError, match="resolve 'auto'"):
        callbacks_for(BnPolicy.AUTO)
    assert [c.event for c in callbacks_for(F)] == ["on_train_batch_start"]  # after Ultralytics' model.train()
    # converted before DDP wraps the model (our trainer's event), the EMA copy made plain again after
    assert [c.event for c in callbacks_for(S)] == [ua.BEFORE_DDP_WRAP, "on_pretrain_routine_end"]


def detection_model():
    return ua.load_model("yolo11n.yaml").model


def test_freeze_puts_every_batchnorm_in_eval_and_nothing_else():
    model = detection_model()
    model.train()  # what Ultralytics' trainer does at every epoch start
    FreezeBatchNorm()(SimpleNamespace(model=model))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) > 50 and not any(m.training for m in norms)
    assert all(m.training for m in model.modules() if isinstance(m, nn.Conv2d))


def test_frozen_batchnorm_keeps_statistics_in_forward_and_in_ultralytics_ema():
    from ultralytics.utils.torch_utils import ModelEMA

    torch.manual_seed(0)
    model = detection_model()
    ema = ModelEMA(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    FreezeBatchNorm()(SimpleNamespace(model=model))
    for _ in range(3):
        model(torch.rand(2, 3, 64, 64))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        ema.update(model)
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 100
    for k in stats:
        assert torch.equal(model.state_dict()[k], before[k]), k
        assert torch.equal(ema.ema.state_dict()[k], before[k]), k  # EMA of a constant stays exactly that constant
    weight = next(k for k in before if k.endswith("conv.weight"))
    assert not torch.equal(ema.ema.state_dict()[weight], before[weight])


def test_convert_to_sync_keeps_every_parameter_and_buffer_object():
    model = detection_model()
    count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    params, buffers = [id(p) for p in model.parameters()], [id(b) for b in model.buffers()]
    assert convert_to_sync(model) == count
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == count
    assert [id(p) for p in model.parameters()] == params  # what DDP's reducer and the optimizer hold
    assert [id(b) for b in model.buffers()] == buffers


def test_sync_outside_ddp_warns_and_changes_nothing(caplog):
    model = detection_model()
    with caplog.at_level(logging.WARNING, logger="yolo_batch.training.batchnorm"):
        ConvertToSyncBatchNorm()(SimpleNamespace(model=model))
    assert "not a DDP worker" in caplog.text
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def test_callbacks_pickle_for_ddp_workers():
    for callback in (FreezeBatchNorm(), ConvertToSyncBatchNorm()):
        assert type(pickle.loads(pickle.dumps(callback))) is type(callback)


def test_ultralytics_calls_model_train_before_the_batch_callbacks():
    """The freeze callback runs in on_train_batch_start because Ultralytics resets modes after epoch start."""
    ua.import_ultralytics()
    from ultralytics.engine.trainer import BaseTrainer

    loop = inspect.getsource(BaseTrainer._do_train)
    order = [loop.index('run_callbacks("on_train_epoch_start")'), loop.index("self._model_train()"),
             loop.index('run_callbacks("on_train_batch_start")'), loop.index("self.model(batch")]
    assert order == sorted(order)
    assert loop.count("self._model_train()") == 1
    assert "self.model.train()" in inspect.getsource(BaseTrainer._model_train)
    setup = inspect.getsource(BaseTrainer._setup_train)
    # sync: converted in setup_model (the model exists, unwrapped), before it is moved, compiled and wrapped
    order = [setup.index("self.setup_model()"), setup.index("self.model.to(self.device)"),
             setup.index("attempt_compile("), setup.index("DistributedDataParallel("), setup.index("ModelEMA("),
             setup.index('run_callbacks("on_pretrain_routine_end")')]
    assert order == sorted(order)


def test_our_trainer_runs_the_before_wrap_callbacks_once_its_model_is_set_up(shapes_yaml, tmp_path):
    ua.import_ultralytics()
    from ultralytics.models.yolo.detect import DetectionTrainer

    seen = []
    trainer_class = ua.before_wrap_trainer(DetectionTrainer)
    with ua.quiet():
        trainer = trainer_class(overrides={"model": "yolo11n.yaml", "data": str(shapes_yaml), "imgsz": 64,
                                           "device": "cpu", "project": str(tmp_path), "plots": False})
    trainer.model = detection_model()
    trainer.add_callback(ua.BEFORE_DDP_WRAP, lambda t: seen.append(type(t.model).__name__))
    assert isinstance(trainer, DetectionTrainer) and ua.before_wrap_trainer(DetectionTrainer) is trainer_class
    assert trainer.setup_model() is None and seen == ["DetectionModel"]


def test_the_ema_copy_goes_back_to_plain_batchnorm_with_its_own_tensors():
    from ultralytics.utils.torch_utils import ModelEMA

    model = detection_model()
    count = convert_to_sync(model)
    ema = ModelEMA(model)
    tensors = [t.data_ptr() for t in ema.ema.state_dict().values()]
    PlainBatchNormInEma()(SimpleNamespace(ema=ema))
    assert sum(type(m) is nn.BatchNorm2d for m in ema.ema.modules()) == count
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in ema.ema.modules())
    assert [t.data_ptr() for t in ema.ema.state_dict().values()] == tensors
    ema.update(model)  # same keys on both sides: the EMA keeps averaging the converted model


def test_ultralytics_ships_callbacks_to_ddp_workers():
    ua.import_ultralytics()
    from ultralytics.utils.dist import generate_ddp_file

    source = inspect.getsource(generate_ddp_file)
    assert '"callbacks": trainer.callbacks' in source and '_callbacks=state["callbacks"]' in source


def test_tiny_batch_from_scratch_is_recorded_with_a_warning(copy_shared, caplog):
    from yolo_batch import estimate_batch

    data = copy_shared("coco8")  # 4 training images: batch 4 on CPU
    with caplog.at_level(logging.WARNING, logger="yolo_batch.training.autobatch"):
        decision = estimate_batch(SizingConfig(data=data, imgsz=64, epochs=1, device="cpu"))
    assert (decision.batch, decision.bn_policy) == (4, "train")
    assert "from scratch on one device" in decision.bn_reason
    assert any("avoids this" in r for r in decision.reasons)
    assert "BatchNorm trains" in caplog.text


# --- Real runs on BCCD: a short-trained checkpoint, then fine-tuning at batch 2 ---------------------------------

TINY = ["--imgsz", "64", "--set", "plots=False", "--set", "workers=0"]


@pytest.fixture(scope="module")
def bccd(tmp_path_factory) -> Path:
    """64 training and 8 validation images of BCCD (640x480 blood smears)."""
    return copy_subset("bccd", tmp_path_factory.mktemp("bccd"), n_train=64, n_val=8)


@pytest.fixture(scope="module")
def checkpoint(bccd, tmp_path_factory) -> Path:
    """A 1-epoch checkpoint on the same classes, so every layer (and its BatchNorm statistics) transfers."""
    from yolo_batch import train

    folder = tmp_path_factory.mktemp("pretrain")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("YOLO_BATCH_CACHE_DIR", str(folder / "cache"))
        result = train(TrainConfig(
            sizing=SizingConfig(data=bccd, imgsz=64, epochs=1, device="cpu", batch=BatchRequest(fixed=16)),
            project=str(folder), name="pre", extra={"plots": False, "workers": 0}))
    return result.save_dir / "weights" / "last.pt"


def bn_stats(spy: TrainerSpy) -> list[str]:
    return [f"{n}.{s}" for n in spy.bn_names for s in ("running_mean", "running_var")]


def saved_state(path: Path) -> dict:
    from ultralytics.nn.tasks import load_checkpoint

    model, _ = load_checkpoint(path)  # Ultralytics saves its EMA model (in FP16) as the checkpoint's model
    return {k: v.float() for k, v in model.state_dict().items() if v.dtype.is_floating_point}


def finetune(tmp_path, monkeypatch, checkpoint, bccd, *args) -> tuple[TrainerSpy, dict, dict, Path]:
    spy = TrainerSpy().install(monkeypatch)
    result = CliRunner().invoke(main, ["train", "--profile", "medical", "--model", str(checkpoint), "--data", str(bccd),
                                       *TINY, *args, "--project", str(tmp_path), "--name", "ft"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "ft"
    decision = json.loads((folder / "autobatch.json").read_text())
    run_args = yaml.safe_load((folder / "args.yaml").read_text())
    return spy, decision, run_args, folder


@pytest.mark.slow
def test_medical_profile_freezes_batchnorm_when_fine_tuning(tmp_path, monkeypatch, checkpoint, bccd):
    spy, decision, run_args, folder = finetune(tmp_path, monkeypatch, checkpoint, bccd, "--epochs", "2")
    # What the profile promises: batch 2, accumulation to the nominal 64, lr0 for the effective batch 64.
    assert (decision["batch"], decision["accumulate"], decision["effective_batch"]) == (2, 32, 64)
    assert run_args["batch"] == 2 and run_args["nbs"] == 64
    assert spy.accumulate == 32
    assert decision["lr_factor"] == 1.0 and spy.initial_lr["weight"] == pytest.approx(decision["lr0_after"])
    assert any("capped at 2 per device by the medical profile" in r for r in decision["reasons"])
    assert (run_args["hsv_h"], run_args["hsv_s"], run_args["hsv_v"], run_args["mosaic"]) == (0, 0, 0, 0)
    assert run_args["rect"] is True  # BCCD images are 640x480
    assert decision["bn_policy"] == "freeze" and "training starts from weights" in decision["bn_reason"]

    # Frozen for every batch of both epochs, although Ultralytics calls model.train() at each epoch start.
    assert len(spy.bn_training) == 2 * 32 and not any(spy.bn_training)
    stats = bn_stats(spy)
    assert len(stats) == 2 * 81
    assert all(torch.equal(spy.start[k], spy.end[k]) for k in stats)
    assert not all(spy.start[k].abs().max() == 0 for k in stats if k.endswith("mean"))  # real statistics, not 0/1
    learned = [n for n in spy.bn_names if not torch.equal(spy.start[f"{n}.weight"], spy.end[f"{n}.weight"])]
    assert len(learned) > 0.9 * len(spy.bn_names)  # affine weights still learn
    convs = [k for k in spy.start if k.endswith("conv.weight") and "dfl" not in k]
    assert all(not torch.equal(spy.start[k], spy.end[k]) for k in convs)
    # The checkpoint the user gets (the EMA, in FP16) keeps them too.
    saved = saved_state(folder / "weights" / "last.pt")
    assert all(torch.equal(saved[k], spy.start[k].half().float()) for k in stats)
    assert sum(not torch.equal(saved[k], spy.start[k].half().float()) for k in convs) > 0.9 * len(convs)


@pytest.mark.slow
def test_bn_train_updates_the_statistics(tmp_path, monkeypatch, checkpoint, bccd):
    spy, decision, _, folder = finetune(tmp_path, monkeypatch, checkpoint, bccd, "--epochs", "1", "--bn", "train")
    assert decision["bn_policy"] == "train" and "as requested" in decision["bn_reason"]
    assert all(spy.bn_training)
    stats = bn_stats(spy)
    changed = [k for k in stats if not torch.equal(spy.start[k], spy.end[k])]
    assert len(changed) == len(stats)
    saved = saved_state(folder / "weights" / "last.pt")
    assert sum(not torch.equal(saved[k], spy.start[k].half().float()) for k in stats) > 0.9 * len(stats)
