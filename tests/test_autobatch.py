"""estimate_batch end to end with fake GPUs (memory curves) and a fake NVML: real data, real model files."""

from __future__ import annotations

import json

import pytest
from fakes import GIB, CurveGpu, FakeBackend, FakeDevice, fake_pynvml, linear

from yolo_batch import ultralytics_adapter
from yolo_batch.errors import InputError
from yolo_batch.training.autobatch import BudgetTooSmall, estimate_batch
from yolo_batch.training.budget import ddp_reserve_bytes
from yolo_batch.training.config import BatchRequest, Rounding, SizingConfig
from yolo_batch.training.run import split_train_args, ultralytics_overrides


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
    nvml = fake_pynvml([FakeDevice(total=10 * GIB, used=0), FakeDevice(total=10 * GIB, used=5 * GIB)])
    decision = estimate_batch(config(shapes_yaml, device="0,1", rounding=Rounding.POW2), backend=backend, nvml=nvml)
    assert backend.probed_on == [1]  # probed where memory is tightest
    assert decision.world_size == 2
    # 5 GiB less two contexts (a worker's and ours: not measurable here, 0.5 GiB assumed) and DDP's share,
    # x 0.9 = 3.6 GiB -> 30 images -> pow2 16
    assert decision.batch == 16
    assert any("not measurable" in r for r in decision.reasons)
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


def ddp_reserve() -> int:
    return ddp_reserve_bytes(ultralytics_adapter.parameter_count(ultralytics_adapter.load_model("yolo11n.yaml")), 2)


def test_ddp_budget_counts_every_context_that_will_exist(shapes_yaml):
    """Two GPUs, the second the tighter: each DDP worker brings a context to its GPU, and this process keeps its
    own context on GPU 0 (already in NVML's figures) and on GPU 1, where it probes (created after NVML was read)."""
    devices = [FakeDevice(total=10 * GIB, used=0), FakeDevice(total=10 * GIB, used=5 * GIB)]
    backend = FakeBackend(CurveGpu(linear(0.1, 0.01)), count=2, devices=devices, context=1 * GIB)
    decision = estimate_batch(config(shapes_yaml, device="0,1", batch=BatchRequest(fraction=1.0)), backend=backend,
                              nvml=fake_pynvml(devices))
    assert backend.probed_on == [1]
    # GPU 0: 9 GiB free after our context, less a worker's context and DDP's buckets and NCCL buffers
    # GPU 1: 5 GiB free, less a worker's context, ours (probing), and DDP's share
    assert [g.budget_bytes for g in decision.gpus] == [8 * GIB - ddp_reserve(), 3 * GIB - ddp_reserve()]
    assert decision.gpus[0].own_bytes == 1 * GIB and decision.gpus[0].others_bytes == 0
    assert any("keeps a CUDA context on GPU 1" in r for r in decision.reasons)
    assert any("each worker's CUDA context (1.00 GiB, from NVML's per-process figure)" in r for r in decision.reasons)


def test_a_container_listing_host_pids_does_not_count_us_as_another_process(shapes_yaml):
    """NVML in a container lists host PIDs: our context appears under PID 4242, not under os.getpid()."""
    devices = [FakeDevice(total=10 * GIB, used=2 * GIB, processes=[(999, 2 * GIB)]), FakeDevice(total=10 * GIB, used=0)]
    backend = FakeBackend(CurveGpu(linear(0.1, 0.01)), count=2, devices=devices, context=1 * GIB,
                          reserved=GIB // 2, host_pid=4242)
    decision = estimate_batch(config(shapes_yaml, device="0,1", batch=BatchRequest(fraction=1.0)), backend=backend,
                              nvml=fake_pynvml(devices))
    first = decision.gpus[0]
    assert first.others_bytes == 2 * GIB and first.other_pids == (999,)
    assert first.own_bytes == 1 * GIB + GIB // 2
    # the worker context measured from NVML's used memory before and after ours: 1.5 GiB - 0.5 GiB of cache
    assert first.budget_bytes == 10 * GIB - int(3.5 * GIB) + GIB // 2 - 1 * GIB - ddp_reserve()
    assert any("NVML lists this process as PID 4242" in r for r in decision.reasons)


def test_cuda_free_memory_below_nvmls_lowers_the_budget_with_a_reason(shapes_yaml):
    devices = [FakeDevice(total=10 * GIB, used=0)]
    backend = FakeBackend(CurveGpu(linear(0.5, 0.1)), devices=devices, cuda_free={0: (6 * GIB, 10 * GIB)})
    decision = estimate_batch(config(shapes_yaml, batch=BatchRequest(fraction=1.0), rounding=Rounding.NONE),
                              backend=backend, nvml=fake_pynvml(devices))
    assert decision.budget_bytes == 6 * GIB
    assert any("NVML reports 10.00 GiB free on GPU 0, CUDA 6.00 GiB: the smaller is used" in r
               for r in decision.reasons)


def test_a_gpu_nvml_cannot_match_to_cuda_falls_back_with_the_reason(shapes_yaml):
    devices = [FakeDevice(), FakeDevice()]
    backend = FakeBackend(CurveGpu(linear(0.5, 0.1)), devices=devices, uuids=["GPU-somewhere-else"])
    decision = estimate_batch(config(shapes_yaml), backend=backend, nvml=fake_pynvml(devices))
    assert decision.source == "fallback" and backend.probed_on == []
    assert any("CUDA device 0 (UUID GPU-somewhere-else) is not among the 2 GPU(s) NVML sees" in r
               for r in decision.reasons)


def test_the_probe_runs_under_the_trainers_default_settings(shapes_yaml):
    backend = FakeBackend(CurveGpu(linear(0.5, 0.1)))
    decision = estimate_batch(config(shapes_yaml), backend=backend, nvml=fake_pynvml([FakeDevice()]))
    (setup,) = backend.setups
    assert (setup.imgsz, setup.precision, setup.amp_check, setup.channels_last, setup.deterministic) == (
        64, "fp16", True, True, True)
    assert setup.freeze == (".dfl",) and setup.optimizer == "AdamW"  # optimizer=auto on 64 images: AdamW
    assert decision.precision == "fp16" and decision.amp is True
    assert decision.probe_settings["deterministic"] is True


def test_the_probe_runs_under_the_settings_passed_through_to_ultralytics(shapes_yaml):
    sizing, extra = split_train_args(config(shapes_yaml), {
        "multi_scale": 0.5, "channels_last": False, "deterministic": False, "freeze": 3, "amp": "bf16",
        "optimizer": "SGD", "compile": True})
    assert extra["multi_scale"] == 0.5 and extra["amp"] == "bf16"  # still passed on to Ultralytics
    backend = FakeBackend(CurveGpu(linear(0.5, 0.1)))
    decision = estimate_batch(sizing, backend=backend, nvml=fake_pynvml([FakeDevice()]))
    (setup,) = backend.setups
    assert setup.imgsz == 96  # 64 x 1.5 rounded up to the stride, as Ultralytics' own AutoBatch sizes
    assert (setup.precision, setup.amp_check, setup.channels_last, setup.deterministic) == ("bf16", False, False,
                                                                                            False)
    assert setup.freeze == ("model.0.", "model.1.", "model.2.", ".dfl") and setup.optimizer == "SGD"
    assert any("multi_scale=0.5: probed at imgsz 96" in r for r in decision.reasons)
    assert any("compile=default: probed eagerly" in r for r in decision.reasons)


def test_an_amp_check_that_fails_sizes_and_trains_in_fp32(shapes_yaml):
    backend = FakeBackend(CurveGpu(linear(0.5, 0.1), precision="fp32"))
    decision = estimate_batch(config(shapes_yaml), backend=backend, nvml=fake_pynvml([FakeDevice()]))
    assert decision.precision == "fp32" and decision.amp is False
    assert any("AMP check fails on this GPU" in r for r in decision.reasons)
    from yolo_batch.training.config import TrainConfig

    assert ultralytics_overrides(TrainConfig(sizing=config(shapes_yaml)), decision, shapes_yaml)["amp"] is False


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({}, {"multi_scale": 0.5}),
        ({}, {"freeze": 10}),
        ({}, {"compile": True}),
        ({}, {"channels_last": False}),
        ({}, {"deterministic": False}),
        ({"amp": "bf16"}, {}),
    ],
)
def test_the_cache_is_keyed_on_the_trainer_settings(shapes_yaml, first, second):
    nvml = fake_pynvml([FakeDevice(total=10 * GIB, used=0)])
    for args, expect_hit in ((first, False), (first, True), (second, False)):
        sizing, _ = split_train_args(config(shapes_yaml), args)
        decision = estimate_batch(sizing, backend=FakeBackend(CurveGpu(linear(0.5, 0.1))), nvml=nvml)
        assert decision.cache_hit is expect_hit, (args, expect_hit)


def test_the_cache_is_keyed_on_the_driver_version(shapes_yaml):
    devices = [FakeDevice(total=10 * GIB, used=0)]
    first = estimate_batch(config(shapes_yaml), backend=FakeBackend(CurveGpu(linear(0.5, 0.1))),
                           nvml=fake_pynvml(devices, driver="550.54.15"))
    same = estimate_batch(config(shapes_yaml), backend=FakeBackend(CurveGpu(linear(0.5, 0.1))),
                          nvml=fake_pynvml(devices, driver="550.54.15"))
    upgraded = estimate_batch(config(shapes_yaml), backend=FakeBackend(CurveGpu(linear(0.5, 0.1))),
                              nvml=fake_pynvml(devices, driver="570.86.10"))
    assert (first.cache_hit, same.cache_hit, upgraded.cache_hit) == (False, True, False)
