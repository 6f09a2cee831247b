"""The memory budget arithmetic with plain numbers: contexts, containers, CUDA vs NVML, DDP, memory outside the
allocator."""

from __future__ import annotations

import pytest
from fakes import GIB

from yolo_batch.core.nvml import GpuMemory, ProcessMemory
from yolo_batch.training.budget import (
    CONTEXT_FALLBACK_BYTES,
    NCCL_RESERVE_BYTES,
    OwnUsage,
    ddp_reserve_bytes,
    outside_allocator_bytes,
    own_usage,
    plan_budgets,
    reconcile_free,
)
from yolo_batch.training.decision import ProbeSample

MIB = 1 << 20
ME = 100


def gpu(index=0, used=0, total=10, processes=()) -> GpuMemory:
    return GpuMemory(index=index, name="GPU", uuid=f"GPU-{index}", total_bytes=total * GIB, used_bytes=int(used * GIB),
                     free_bytes=int((total - used) * GIB),
                     processes=tuple(ProcessMemory(pid, int(b * GIB), "?") for pid, b in processes))


@pytest.mark.parametrize(
    ("before", "after", "reserved", "context", "pid", "how"),
    [
        # NVML shows our PID: its figure, less our cache
        (gpu(used=2, processes=[(7, 2)]), gpu(used=3.5, processes=[(7, 2), (ME, 1.5)]), GIB // 2, GIB, ME,
         "per-process"),
        # a container: we appear as host PID 4242, new since the first reading
        (gpu(used=2, processes=[(7, 2)]), gpu(used=3.5, processes=[(7, 2), (4242, 1.5)]), GIB // 2, GIB, 4242,
         "PID 4242 (host PIDs: a container)"),
        # per-process figures hidden altogether: the device's used memory before and after
        (gpu(used=2), gpu(used=3.5), GIB // 2, GIB, None, "hides per-process memory"),
        # another process freed memory in between: not measurable, the usual size assumed
        (gpu(used=4), gpu(used=3), 0, CONTEXT_FALLBACK_BYTES, None, "not measurable"),
    ],
)
def test_own_usage(before, after, reserved, context, pid, how):
    own = own_usage(before, after, reserved, pid=ME)
    assert (own.context_bytes, own.pid) == (context, pid)
    assert how in own.how


@pytest.mark.parametrize(
    ("nvml_used", "cuda_free", "cuda_total", "free", "says"),
    [
        (2, 8 * GIB, 10 * GIB, 8 * GIB, None),
        (2, 8 * GIB - 100 * MIB, 10 * GIB, 8 * GIB, None),  # within 2 %: read a moment apart
        (2, 5 * GIB, 10 * GIB, 5 * GIB, "the smaller is used"),  # a co-tenant NVML does not show, or a wrong GPU
        (2, 9 * GIB, 10 * GIB, 8 * GIB, "the smaller is used"),
        (2, 15 * GIB, 20 * GIB, 15 * GIB, "disagree on GPU 0's size"),  # NVML read the whole GPU, CUDA an instance
    ],
)
def test_reconcile_free(nvml_used, cuda_free, cuda_total, free, says):
    use, why = reconcile_free(gpu(used=nvml_used), cuda_free, cuda_total)
    assert use == free
    assert (why is None) if says is None else (says in why)


def test_ddp_reserve_is_a_gradient_copy_and_nccl_on_multi_gpu_only():
    assert ddp_reserve_bytes(2_600_000, 1) == 0
    assert ddp_reserve_bytes(2_600_000, 2) == 4 * 2_600_000 + NCCL_RESERVE_BYTES


@pytest.mark.parametrize(
    ("used", "reserved", "outside"),
    [
        ((1000, 1500), (0, 400), 100),  # 500 more in use, 400 of it the allocator's: 100 outside
        ((1000, 1400), (0, 400), 0),
        ((1000, 1200), (500, 400), 300),  # the cache shrank by 100 while 200 more was used: 300 outside
        ((1000, 900), (0, 0), 0),  # never negative
    ],
)
def test_outside_allocator_bytes(used, reserved, outside):
    assert outside_allocator_bytes(used[0], used[1], reserved[0], reserved[1]) == outside


def test_a_sample_peak_is_device_level():
    sample = ProbeSample(batch=8, train_peak_bytes=3 * GIB, val_peak_bytes=2 * GIB, outside_bytes=GIB // 4)
    assert sample.peak_bytes == 3 * GIB + GIB // 4
    assert ProbeSample(batch=8, train_peak_bytes=3 * GIB).peak_bytes == 3 * GIB
    assert ProbeSample(batch=8, oom=True, outside_bytes=GIB).peak_bytes is None


def test_single_gpu_budget_reuses_our_cache():
    plan = plan_budgets([gpu(used=3, processes=[(ME, 1)])], 0.5, reserved=GIB, world_size=1,
                        own=OwnUsage(0, ME, "x"), pid=ME)
    assert plan.probe_index == 0 and plan.gpus[0].budget_bytes == 4 * GIB  # (7 free + 1 cached) x 0.5


def test_multi_gpu_budget_counts_worker_contexts_ddp_and_the_probing_context():
    gpus = [gpu(0, used=1, processes=[(ME, 1)]), gpu(1, used=4, processes=[(7, 4)]), gpu(2, used=3.5)]
    own = OwnUsage(GIB, ME, "x")
    plan = plan_budgets(gpus, 1.0, reserved=0, world_size=3, own=own, pid=ME, ddp_reserve=GIB // 2)
    # GPU 1: 6 free - worker 1 - DDP 0.5 = 4.5; GPU 2: 6.5 - 1.5 = 5; probing on GPU 1 costs it our context too
    assert plan.probe_index == 1
    assert [b.budget_bytes for b in plan.gpus] == [int(7.5 * GIB), int(3.5 * GIB), 5 * GIB]
    assert [b.others_bytes for b in plan.gpus] == [0, 4 * GIB, 0]


def test_the_probe_goes_where_its_own_context_still_leaves_the_least():
    """GPU 0 (our context already there) is 0.7 GiB tighter than GPU 1 before our probing context counts, and
    0.3 GiB looser after: GPU 1 is the one to size by."""
    gpus = [gpu(0, used=2.3), gpu(1, used=1.6)]
    plan = plan_budgets(gpus, 1.0, reserved=0, world_size=2, own=OwnUsage(GIB, None, "x"), pid=ME)
    assert plan.probe_index == 1
    assert plan.gpus[1].budget_bytes < plan.gpus[0].budget_bytes
