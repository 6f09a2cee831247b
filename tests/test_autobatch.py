"""estimate_batch end to end with fake GPUs (memory curves) and a fake NVML: real data, real model files."""

from __future__ import annotations

import json
import os

import pytest
from fakes import GIB, CurveGpu, FakeBackend, FakeDevice, fake_pynvml, linear

from yolo_batch.core.nvml import read_gpus
from yolo_batch.errors import InputError
from yolo_batch.training.autobatch import BudgetTooSmall, estimate_batch, gpu_budgets
from yolo_batch.training.config import BatchRequest, Rounding, SizingConfig


def config(data, **kw) -> SizingConfig:
    return SizingConfig(data=data, imgsz=64, **{"epochs": 1, **kw})


def test_autobatch_fills_the_budget_and_records_everything(shapes_yaml):
    gpu = CurveGpu(linear(0.5, 0.1))  # 0.5 GiB fixed + 0.1 GiB per image
    nvml = fake_pynvml([FakeDevice(total=10 * GIB, used=0)])
    decision = estimate_batch(config(shapes_yaml, batch=BatchRequest(fraction=0.5), rounding=Rounding.NONE),
                              backend=FakeBackend(gpu), nvml=nvml)
    # budget 5 GiB -> (5 - 0.5) / 0.1 = 45 images; the set has 64 training images
    assert decision.source == "autobatch"
    assert decision.batch == 45
    assert decision.budget_bytes == 5 * GIB
    assert decision.verified_peak_bytes <= decision.budget_bytes
    assert decision.utilisation >= 0.85
    assert [p.batch for p in decision.probes] == gpu.tried
    assert decision.dataset_size == 64
    assert decision.gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert decision.accumulate == 1 and decision.effective_batch == 45
    assert decision.lr0_after != decision.lr0_before  # effective 45 vs nominal 64 rescales lr0
    assert decision.pinned["optimizer"] == "AdamW"  # optimizer=auto pinned so lr0 applies


def test_memory_held_by_other_processes_lowers_the_batch(shapes_yaml):
    backend = FakeBackend(CurveGpu(linear(0.5, 0.12)))
    busy = fake_pynvml([FakeDevice(total=10 * GIB, used=6 * GIB, processes=[(999_999, 6 * GIB)])])
    decision = estimate_batch(config(shapes_yaml, rounding=Rounding.NONE, use_cache=False), backend=backend,
                              nvml=busy)
    assert decision.gpus[0].others_bytes == 6 * GIB
    assert decision.gpus[0].other_pids == (999_999,)
    assert decision.budget_bytes == int(4 * GIB * 0.9)
    assert decision.batch == 25  # (3.6 - 0.5) / 0.12 = 25.8


def test_two_gpus_are_sized_by_the_tightest(shapes_yaml):
    backend = FakeBackend(CurveGpu(linear(0.5, 0.1)), count=2)
    nvml = fake_pynvml([FakeDevice(total=10 * GIB, used=0), FakeDevice(total=10 * GIB, used=7 * GIB)])
    decision = estimate_batch(config(shapes_yaml, device="0,1", rounding=Rounding.POW2), backend=backend, nvml=nvml)
    assert backend.probed_on == [1]  # probed where memory is tightest
    assert decision.world_size == 2
    assert decision.batch == 16  # 3 GiB * 0.9 = 2.7 GiB -> 22 images -> pow2 16
    assert decision.total_batch == 32
    assert decision.accumulate == 2
    assert any("tightest GPU (1" in r for r in decision.reasons)


def test_second_run_hits_the_cache_in_under_a_second(shapes_yaml):
    nvml = fake_pynvml([FakeDevice(total=10 * GIB, used=0)])
    first_gpu = CurveGpu(linear(0.5, 0.1))
    first = estimate_batch(config(shapes_yaml), backend=FakeBackend(first_gpu), nvml=nvml)
    second_gpu = CurveGpu(linear(0.5, 0.1))
    second = estimate_batch(config(shapes_yaml), backend=FakeBackend(second_gpu), nvml=nvml)
    assert second.cache_hit and not first.cache_hit
    assert second_gpu.tried == []  # nothing re-measured
    assert second.batch == first.batch and second.verified_peak_bytes == first.verified_peak_bytes
    assert second.seconds < 1.0


def test_cache_is_bypassed_with_no_cache_and_ignored_when_memory_shrank(shapes_yaml):
    free = fake_pynvml([FakeDevice(total=10 * GIB, used=0)])
    estimate_batch(config(shapes_yaml), backend=FakeBackend(CurveGpu(linear(0.5, 0.1))), nvml=free)
    bypass = CurveGpu(linear(0.5, 0.1))
    estimate_batch(config(shapes_yaml, use_cache=False), backend=FakeBackend(bypass), nvml=free)
    assert bypass.tried  # measured again
    busy = fake_pynvml([FakeDevice(total=10 * GIB, used=8 * GIB, processes=[(999_998, 8 * GIB)])])
    again = CurveGpu(linear(0.5, 0.1))
    decision = estimate_batch(config(shapes_yaml), backend=FakeBackend(again), nvml=busy)
    assert again.tried and not decision.cache_hit
    assert any("no longer fits" in r for r in decision.reasons)
    assert decision.batch < 16


@pytest.mark.parametrize(
    ("nvml", "reason"),
    [
        (fake_pynvml([], init_error=True), "NVML could not start"),
        (fake_pynvml([FakeDevice(fail_on="nvmlDeviceGetMemoryInfo")]), "NVML query failed"),
    ],
)
def test_nvml_failure_falls_back_with_its_reason(shapes_yaml, nvml, reason):
    decision = estimate_batch(config(shapes_yaml), backend=FakeBackend(CurveGpu(linear(0.5, 0.1))), nvml=nvml)
    assert decision.source == "fallback"
    assert decision.batch == 16
    assert any(reason in r and "default batch 16" in r for r in decision.reasons)


def test_cpu_falls_back_to_the_default_capped_by_the_dataset(copy_shared):
    data = copy_shared("coco8")  # 4 training images
    backend = FakeBackend(CurveGpu(linear(0.5, 0.1)), count=0)
    decision = estimate_batch(config(data, device="cpu", epochs=100), backend=backend)
    assert decision.source == "fallback"
    assert decision.batch == 4
    assert decision.accumulate == 16  # 64 / 4
    assert decision.effective_batch == 64 and decision.lr_factor == 1.0
    short = estimate_batch(config(data, device="cpu", epochs=1), backend=backend)
    assert short.accumulate == 1  # one epoch of one batch: Ultralytics caps accumulation at the steps that exist
    assert any("device is CPU" in r and "4 training images" in r for r in decision.reasons)


def test_fixed_batch_is_kept_and_split_across_gpus(shapes_yaml):
    backend = FakeBackend(CurveGpu(linear(0.5, 0.1)), count=2)
    decision = estimate_batch(config(shapes_yaml, device="0,1", batch=BatchRequest(fixed=32)), backend=backend)
    assert (decision.source, decision.batch, decision.total_batch) == ("fixed", 16, 32)
    assert backend.gpu.tried == []
    with pytest.raises(InputError, match="multiple of the 2 GPUs"):
        estimate_batch(config(shapes_yaml, device="0,1", batch=BatchRequest(fixed=33)), backend=backend)


def test_no_batch_fits_is_a_clear_error(shapes_yaml):
    nvml = fake_pynvml([FakeDevice(total=10 * GIB, used=9 * GIB)])
    with pytest.raises(BudgetTooSmall, match=r"batch 1 peaks at .* budget is 0\.90 GiB"):
        estimate_batch(config(shapes_yaml), backend=FakeBackend(CurveGpu(linear(2, 0.1))), nvml=nvml)


def test_decision_round_trips_through_json(shapes_yaml, tmp_path):
    from yolo_batch.training.decision import AutoBatchDecision

    decision = estimate_batch(config(shapes_yaml), backend=FakeBackend(CurveGpu(linear(0.5, 0.1))),
                              nvml=fake_pynvml([FakeDevice(total=10 * GIB, used=0)]))
    path = decision.save(tmp_path / "autobatch.json")
    loaded = AutoBatchDecision.from_dict(json.loads(path.read_text()))
    assert loaded == decision


def test_ddp_budget_accounts_for_worker_contexts():
    pid = os.getpid()
    nvml = fake_pynvml([FakeDevice(total=10 * GIB, used=1 * GIB, processes=[(pid, 1 * GIB)]),
                        FakeDevice(total=10 * GIB, used=0)])
    gpus = read_gpus([0, 1], nvml=nvml)
    budgets, _ = gpu_budgets(gpus, 1.0, reserved=0, world_size=2, pid=pid)
    # our 1 GiB context stays on GPU 0, and each DDP worker will need one of its own
    assert [b.budget_bytes for b in budgets] == [8 * GIB, 9 * GIB]
