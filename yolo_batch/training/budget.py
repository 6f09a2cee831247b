"""The memory budget on each chosen GPU, and what besides the training step counts against it. Pure numbers.

Free to a run is what NVML reports free, plus this process's own allocator cache (ours to reuse), less what the run
will add that the probe does not see:

* multi-GPU (DDP): each worker process creates a CUDA context on its GPU; this process keeps its own context on the
  first GPU (already in NVML's figures) and on the GPU it probes (created after NVML was read), for the whole run;
  DDP keeps a second copy of the gradients in its buckets, and NCCL allocates its buffers outside torch's allocator;
* memory outside the caching allocator (cuBLAS/cuDNN handles and workspaces, lazily loaded kernels) is measured by
  the probe at device level (:func:`outside_allocator_bytes`) and added to every sample's peak.

In a container NVML lists processes under host PIDs, so this process is not found under its own PID: its entry is
the one that appeared when its context was created, and its context size comes from NVML's used memory before and
after.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from yolo_batch.core.nvml import GpuMemory
from yolo_batch.training.decision import GpuBudget

MIB = 1 << 20
GIB = 1 << 30
# NCCL's communicator buffers (NCCL_BUFFSIZE 4 MiB per channel and peer, send and receive) and its own structures,
# all allocated outside torch's allocator. A documented allowance, not a measurement (see docs/benchmarks.md).
NCCL_RESERVE_BYTES = 512 * MIB
CONTEXT_FALLBACK_BYTES = 512 * MIB  # a CUDA context's usual size, for when it cannot be measured
# NVML and CUDA may read free memory a moment apart; a co-tenant allocating in between is not a disagreement.
FREE_TOLERANCE = 0.02


@dataclass(frozen=True)
class OwnUsage:
    """This process's memory on the first GPU, as NVML shows it, and how that was found."""

    context_bytes: int  # the CUDA context (and runtime) outside our allocator's cache
    pid: int | None  # the PID NVML lists this process under (a host PID in containers), None if not found
    how: str


def own_usage(before: GpuMemory, after: GpuMemory, reserved: int, pid: int) -> OwnUsage:
    """Measure this process's CUDA context on a GPU from NVML readings before and after it was created.

    Args:
        before, after: the GPU read just before and just after the context (and ``reserved`` bytes of cache).
        reserved: what torch's allocator holds there.
        pid: this process's PID as it sees itself.
    """
    by_pid = after.own_bytes(pid)
    if by_pid > 0:
        return OwnUsage(max(by_pid - reserved, 0), pid, "NVML's per-process figure")
    new = [p for p in after.processes if p.pid not in {q.pid for q in before.processes}]
    delta = after.used_bytes - before.used_bytes
    host_pid = new[0].pid if len(new) == 1 else None
    if delta > 0:
        found = (f"; NVML lists it as PID {host_pid} (host PIDs: a container)" if host_pid is not None else
                 "; NVML hides per-process memory here")
        return OwnUsage(max(delta - reserved, 0), host_pid, "NVML's used memory before and after our context" + found)
    return OwnUsage(CONTEXT_FALLBACK_BYTES, host_pid,
                    f"not measurable (other processes freed memory meanwhile): {CONTEXT_FALLBACK_BYTES // MIB} MiB "
                    "assumed")


def reconcile_free(gpu: GpuMemory, cuda_free: int, cuda_total: int) -> tuple[int, str | None]:
    """Cross-check NVML's free memory with CUDA's (``torch.cuda.mem_get_info``) on the same device.

    Returns:
        The free bytes to use and, where the two disagree, why.
    """
    if abs(cuda_total - gpu.total_bytes) > FREE_TOLERANCE * gpu.total_bytes:
        return cuda_free, (f"NVML and CUDA disagree on GPU {gpu.index}'s size ({gpu.total_bytes / GIB:.1f} vs "
                           f"{cuda_total / GIB:.1f} GiB): CUDA's figures are used (a MIG instance or a different GPU)")
    if abs(cuda_free - gpu.free_bytes) > FREE_TOLERANCE * gpu.total_bytes:
        use = min(cuda_free, gpu.free_bytes)
        return use, (f"NVML reports {gpu.free_bytes / GIB:.2f} GiB free on GPU {gpu.index}, CUDA "
                     f"{cuda_free / GIB:.2f} GiB: the smaller is used")
    return gpu.free_bytes, None


def ddp_reserve_bytes(parameters: int, world_size: int) -> int:
    """Per GPU, what DDP adds outside the probe's view: a gradient copy in its buckets (fp32) and NCCL's buffers."""
    if world_size <= 1:
        return 0
    return 4 * parameters + NCCL_RESERVE_BYTES


def outside_allocator_bytes(used_before: int, used_after: int, reserved_before: int, reserved_after: int) -> int:
    """Device memory this process gained outside torch's caching allocator between two readings.

    ``used_*``: the process's device-level use (NVML per process, or total minus ``mem_get_info`` free);
    ``reserved_*``: ``torch.cuda.memory_reserved`` at the same moments.
    """
    return max((used_after - used_before) - (reserved_after - reserved_before), 0)


@dataclass(frozen=True)
class BudgetPlan:
    gpus: tuple[GpuBudget, ...]
    probe_index: int  # the CUDA index to probe on: the tightest GPU, counting the context probing leaves there
    notes: tuple[str, ...]


def plan_budgets(gpus: Sequence[GpuMemory], fraction: float, *, reserved: int, world_size: int, own: OwnUsage,
                 pid: int, ddp_reserve: int = 0, free_override: dict[int, int] | None = None) -> BudgetPlan:
    """Per-GPU budgets (``fraction`` of what the run may use) and the GPU to probe on.

    Args:
        gpus: the chosen GPUs, read after this process's context exists on the first of them.
        reserved: our allocator's cache on the first GPU (freed before training starts: ours to reuse).
        own: this process's context, measured by :func:`own_usage`.
        ddp_reserve: per GPU, from :func:`ddp_reserve_bytes`.
        free_override: free bytes to use instead of NVML's, by CUDA index (after :func:`reconcile_free`).
    """
    notes: list[str] = []
    first = gpus[0].index
    available = {}
    for gpu in gpus:
        free = (free_override or {}).get(gpu.index, gpu.free_bytes)
        available[gpu.index] = free + (reserved if gpu.index == first else 0)
    if world_size > 1:
        notes.append(f"DDP: each worker's CUDA context ({own.context_bytes / GIB:.2f} GiB, from {own.how}) and "
                     f"{ddp_reserve / GIB:.2f} GiB for gradient buckets and NCCL taken off every GPU")
        for index in available:
            available[index] -= own.context_bytes + ddp_reserve
    # Probing elsewhere than the first GPU leaves this process's context there for the whole run.
    extra = {i: own.context_bytes if world_size > 1 and i != first else 0 for i in available}
    probe_index = min(available, key=lambda i: (available[i] - extra[i], i))
    if extra[probe_index]:
        available[probe_index] -= extra[probe_index]
        notes.append(f"this process keeps a CUDA context on GPU {probe_index}, which it probes, for the whole run")
    budgets = tuple(GpuBudget(
        index=gpu.index, name=gpu.name, uuid=gpu.uuid, total_bytes=gpu.total_bytes,
        free_bytes=(free_override or {}).get(gpu.index, gpu.free_bytes), own_bytes=_own(gpu, pid, own),
        others_bytes=sum(p.used_bytes or 0 for p in gpu.processes if p.pid not in {pid, own.pid}),
        other_pids=tuple(p.pid for p in gpu.processes if p.pid not in {pid, own.pid}),
        budget_bytes=int(max(available[gpu.index], 0) * fraction), matched_by=gpu.matched_by, mig=gpu.mig,
    ) for gpu in gpus)
    if len(budgets) > 1:
        tight = next(b for b in budgets if b.index == probe_index)
        notes.append(f"per-GPU batch sized by the tightest GPU ({tight.index}, {tight.budget_bytes / GIB:.2f} GiB)")
    return BudgetPlan(gpus=budgets, probe_index=probe_index, notes=tuple(notes))


def _own(gpu: GpuMemory, pid: int, own: OwnUsage) -> int:
    return sum(p.used_bytes or 0 for p in gpu.processes if p.pid in {pid, own.pid})
