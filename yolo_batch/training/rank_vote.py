"""How the processes of a multi-GPU run agree that one of them ran out of memory, without deadlocking.

Collectives pair up by order: every process must call the same ones in the same sequence. A process that fails in
its forward pass leaves the training step early; the others go on to their backward pass, whose gradient all-reduce
waits for it forever. So each training step has one vote (an all-reduce of a 0/1 flag, MAX) at a fixed point every
process reaches, after the forward pass and before backward starts any gradient exchange:

* a process that is fine votes 0 there (:meth:`RankVote.any_failed`) and learns whether any other failed;
* a process that failed before that point leaves the step, and casts its vote of 1 from the recovery path, where it
  pairs with the others' vote of the same step.

After the vote every process takes the recovery path, where one more collective (:meth:`RankVote.gather`) tells
all of them which ranks failed, where, and the least free memory, so each computes the same next batch from the
same numbers and records the same event. An OOM *inside* backward cannot be recovered this way: the other
processes are already inside the gradient all-reduce, which cannot be cancelled; that process stops with one line
instead (the launcher then stops the rest).
Validation has no collectives until its results are gathered; its vote sits just before that gather.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Gathered(NamedTuple):
    """What every process learns after a failure."""

    ranks: tuple[int, ...]  # the processes that failed
    free_bytes: int | None  # the least free memory measured (None: none could measure)
    step: int | None  # the step at which the first of them failed


class LocalVote:
    """A single-process run: nothing to agree with."""

    world_size = 1

    def any_failed(self, failed: bool) -> bool:
        return failed

    def gather(self, failed: bool, free_bytes: int | None, step: int | None) -> Gathered:
        return Gathered((0,) if failed else (), free_bytes, step)


class RankVote:
    """The processes of an initialised ``torch.distributed`` group.

    ``device``: where collective tensors live (a CUDA device for NCCL, the CPU for gloo).
    """

    def __init__(self, device: Any = None) -> None:
        import torch
        import torch.distributed as dist

        self.world_size = dist.get_world_size()
        self.device = torch.device("cpu") if device is None else device

    def any_failed(self, failed: bool) -> bool:
        """All-reduce (MAX) this process's flag: whether any process failed."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(failed)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def gather(self, failed: bool, free_bytes: int | None, step: int | None) -> Gathered:
        """Which ranks failed, the least free memory any process measured, and the step of the first that failed."""
        import torch
        import torch.distributed as dist

        mine = torch.tensor([int(failed), _or_minus_one(free_bytes), _or_minus_one(step)], dtype=torch.int64,
                            device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        rows = [[int(v) for v in t.tolist()] for t in every]
        ranks = tuple(rank for rank, row in enumerate(rows) if row[0])
        frees = [row[1] for row in rows if row[1] >= 0]
        first = rows[ranks[0]][2] if ranks else _or_minus_one(step)
        return Gathered(ranks, min(frees) if frees else None, first if first >= 0 else None)


def _or_minus_one(value: int | None) -> int:
    return -1 if value is None else value


def vote_for(world_size: int, device: Any = None) -> LocalVote | RankVote:
    """A :class:`RankVote` when a process group of several processes is initialised, else a :class:`LocalVote`."""
    if world_size <= 1:
        return LocalVote()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return LocalVote()
    return RankVote(device if dist.get_backend() == "nccl" else None)
