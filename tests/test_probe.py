"""The probe's real training steps, run on CPU (peak memory needs CUDA; the steps do not)."""

from __future__ import annotations

import pytest
import torch

from yolo_batch import ultralytics_adapter as ua
from yolo_batch.training.probe import ProbeSetup, TrainingProbe, synthetic_batch


@pytest.fixture(scope="module")
def model():
    return ua.detection_model(ua.load_model("yolo11n.yaml"), nc=3, hyp={})


def setup(**kw) -> ProbeSetup:
    return ProbeSetup(**{"imgsz": 64, "targets_per_image": 12, "nc": 3, "optimizer": "SGD", **kw})


def test_synthetic_batch_carries_worst_case_targets():
    batch = synthetic_batch(3, setup(), torch.device("cpu"))
    assert batch["img"].shape == (3, 3, 64, 64)
    assert batch["bboxes"].shape == (36, 4) and batch["cls"].shape == (36, 1)
    assert torch.bincount(batch["batch_idx"].long()).tolist() == [12, 12, 12]
    assert batch["cls"].max() < 3 and batch["bboxes"].min() > 0 and batch["bboxes"].max() < 1


def test_train_steps_use_the_real_loss_and_update_weights(model):
    probe = TrainingProbe(model, setup(), torch.device("cpu"))
    before = [p.detach().clone() for p in probe.model.parameters()]
    loss = probe.train_steps(2)
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    changed = sum(not torch.equal(a, b) for a, b in zip(before, probe.model.parameters()))
    assert changed > len(before) // 2
    assert len(probe.optimizer.state) > 0  # optimizer state exists, as in training
    probe.close()


def test_measure_on_cpu_runs_train_and_val_without_peaks(model):
    probe = TrainingProbe(model, setup(val_images=3), torch.device("cpu"))
    sample = probe.measure(2)
    assert sample.batch == 2 and sample.val_batch == 3  # 2x train batch, capped by the val split
    assert not sample.oom and sample.peak_bytes is None and sample.seconds > 0
    probe.close()


def test_oom_is_reported_in_the_sample_and_the_probe_recovers(model, monkeypatch):
    probe = TrainingProbe(model, setup(), torch.device("cpu"))
    real = probe.train_steps
    calls = []

    def flaky(batch, steps=2):
        calls.append(batch)
        if batch >= 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(batch, steps)

    monkeypatch.setattr(probe, "train_steps", flaky)
    assert probe.measure(4).oom
    assert not probe.measure(2).oom
    assert calls == [4, 2]


@pytest.mark.parametrize("message", [
    "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
    "GET was unable to find an engine to execute this computation",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
])
def test_cudnn_and_cublas_memory_pressure_is_an_oom_sample_not_a_traceback(model, monkeypatch, message):
    probe = TrainingProbe(model, setup(), torch.device("cpu"))

    def pressure(batch, steps=2):
        raise RuntimeError(message)

    monkeypatch.setattr(probe, "train_steps", pressure)
    sample = probe.measure(8)
    assert sample.oom and sample.batch == 8 and sample.peak_bytes is None
    probe.close()


def test_the_trainers_determinism_is_on_before_the_first_cuda_work_and_undone_after(model, monkeypatch):
    """Ultralytics sets CUBLAS_WORKSPACE_CONFIG when it builds the trainer (deterministic=True, its default); cuBLAS
    reads it once per process, so the probe, which runs first, must start cuBLAS with the same setting."""
    import os

    seen = []

    def record(where):
        seen.append((where, os.environ.get("CUBLAS_WORKSPACE_CONFIG"), torch.are_deterministic_algorithms_enabled()))

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(ua, "amp_check", lambda module: record("amp check") or True)
    probe = TrainingProbe(model, setup(deterministic=True, precision="fp16", amp_check=True), torch.device("cpu"))
    real = probe.train_steps
    monkeypatch.setattr(probe, "train_steps", lambda b, steps=2: record("train") or real(b, steps))
    assert not probe.measure(1).oom
    probe.close()
    assert seen == [("amp check", ":4096:8", True), ("train", ":4096:8", True)]
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and not torch.are_deterministic_algorithms_enabled()


def test_not_deterministic_leaves_cublas_alone(model, monkeypatch):
    import os

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    probe = TrainingProbe(model, setup(deterministic=False), torch.device("cpu"))
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and not torch.are_deterministic_algorithms_enabled()
    probe.close()


def test_a_failed_amp_check_makes_the_probe_train_in_fp32(model, monkeypatch):
    monkeypatch.setattr(ua, "amp_check", lambda module: False)
    probe = TrainingProbe(model, setup(precision="fp16", amp_check=True), torch.device("cpu"))
    assert probe.precision == "fp32" and not probe.scaler.is_enabled()
    probe.close()
    bf16 = TrainingProbe(model, setup(precision="bf16"), torch.device("cpu"))
    assert bf16.precision == "bf16"  # no AMP check and no gradient scaler for bfloat16, as in the trainer
    bf16.close()


def test_frozen_layers_and_channels_last_as_the_trainer_sets_them(model):
    fresh = ua.detection_model(ua.load_model("yolo11n.yaml"), nc=3, hyp={})
    probe = TrainingProbe(fresh, setup(freeze=("model.0.", ".dfl"), channels_last=True), torch.device("cpu"))
    frozen = {n for n, p in probe.model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("model.0.") or ".dfl" in n for n in frozen)
    assert any(n.startswith("model.0.") for n in frozen) and any(".dfl" in n for n in frozen)
    conv = next(m for m in probe.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    probe.train_steps(2, steps=1)
    assert all(id(p) not in {id(q) for g in probe.optimizer.param_groups for q in g["params"]}
               for n, p in probe.model.named_parameters() if n in frozen)  # no optimizer state for frozen layers
    probe.close()


def test_other_errors_propagate(model, monkeypatch):
    probe = TrainingProbe(model, setup(), torch.device("cpu"))
    monkeypatch.setattr(probe, "train_steps", lambda b, steps=2: (_ for _ in ()).throw(RuntimeError("shape bug")))
    with pytest.raises(RuntimeError, match="shape bug"):
        probe.measure(2)
