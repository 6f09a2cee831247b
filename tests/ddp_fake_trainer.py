"""A two-process stand-in for Ultralytics' DDP training on CPU (gloo), for the OOM-recovery vote.

Ultralytics trains multi-GPU runs only on CUDA devices. This trainer keeps the parts of ``BaseTrainer`` that the
recovery touches, with the same names and order of events: a DistributedDataParallel model, ``_do_train`` calling
``_setup_ddp``/``_setup_train``, the epoch and batch callbacks, ``scaler.scale(loss).backward()``, a validator that
gathers its results with a collective at the end, ``validate``/``final_eval``. The real
:func:`~yolo_batch.ultralytics_adapter.controlled_trainer.controlled_trainer` overrides are mixed into it.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

IMAGES = 32  # per process and epoch
VAL_IMAGES = 16


class Loader:
    def __init__(self, batch_size: int, images: int) -> None:
        self.batch_size = batch_size
        self.images = images

    def __len__(self) -> int:
        return -(-self.images // self.batch_size)

    def __iter__(self) -> Any:
        import torch

        for start in range(0, self.images, self.batch_size):
            yield torch.randn(min(self.batch_size, self.images - start), 4)


class Validator:
    def __init__(self, trainer: Any, dataloader: Loader) -> None:
        self.trainer = trainer
        self.dataloader = dataloader
        self.batches: list[int] = []

    def run_callbacks(self, event: str) -> None:
        for callback in self.trainer.callbacks.get(event, []):
            callback(self)

    def __call__(self) -> dict[str, float]:
        import torch
        import torch.distributed as dist

        self.run_callbacks("on_val_start")
        seen = 0
        for batch in self.dataloader:
            self.run_callbacks("on_val_batch_start")
            with torch.no_grad():
                self.trainer.model.module(batch)
            seen += len(batch)
            self.batches.append(len(batch))
        self.gather_stats()
        total = torch.tensor([seen])
        dist.all_reduce(total)
        return {"images": float(total.item())}

    def gather_stats(self) -> None:
        import torch.distributed as dist

        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, len(self.batches))


class FakeDDPTrainer:
    """What the recovery reads and writes on a trainer, under Ultralytics' names."""

    def __init__(self, callbacks: dict[str, list[Any]], save_dir: Path, epochs: int, batch: int,
                 oom_in_backward: str = "", gradient_timeout: float | None = None) -> None:
        import torch

        self.oom_in_backward = oom_in_backward  # "rank:epoch:step"
        self.gradient_timeout = gradient_timeout  # seconds; None: the default process group
        self.callbacks = callbacks
        self.save_dir = save_dir
        self.last = save_dir / "weights" / "last.pt"
        self.epochs = epochs
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.device = torch.device("cpu")
        self.batch_size = batch * self.world_size
        self.args = SimpleNamespace(batch=self.batch_size, split="val", weight_decay=0.0005, nbs=64)
        self.data = {"train": "train", "val": "val"}
        self.start_epoch = 0
        self.epoch = 0
        self.steps: list[tuple[int, int]] = []  # (epoch, batch) of every step that finished
        self.loss = self.loss_items = self.tloss = None

    def run_callbacks(self, event: str) -> None:
        for callback in self.callbacks.get(event, []):
            callback(self)

    def get_dataloader(self, dataset_path: str, batch_size: int, rank: int = 0, mode: str = "train") -> Loader:
        return Loader(batch_size, IMAGES if mode == "train" else VAL_IMAGES)

    def _setup_ddp(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():  # the processes run several trainings one after another
            dist.init_process_group("gloo", timeout=timedelta(seconds=120))

    def _setup_train(self) -> None:
        import torch
        import torch.distributed as dist
        from torch import nn

        torch.manual_seed(0)
        group = None if self.gradient_timeout is None else dist.new_group(
            timeout=timedelta(seconds=self.gradient_timeout))
        self.model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                                                         find_unused_parameters=True, process_group=group)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: 1.0)
        self.scaler = SimpleNamespace(scale=lambda loss: loss)
        self.train_loader = self.get_dataloader("train", self.batch_size // self.world_size)
        self.test_loader = self.get_dataloader("val", 2 * self.batch_size // self.world_size, mode="val")
        self.validator = Validator(self, self.test_loader)
        self.accumulate = 1
        self.run_callbacks("on_pretrain_routine_end")

    def _do_train(self) -> None:
        import torch

        self._setup_ddp()
        self._setup_train()
        self.train_time_start = time.time()
        self.run_callbacks("on_train_start")
        epoch = self.start_epoch
        torch.manual_seed(int(os.environ["RANK"]))
        while epoch < self.epochs:
            self.epoch = epoch
            self.run_callbacks("on_train_epoch_start")
            for batch in self.train_loader:
                self.run_callbacks("on_train_batch_start")
                out = self.model(batch)
                if self.oom_in_backward == f"{os.environ['RANK']}:{epoch}:{len(self.steps)}":
                    out.register_hook(_out_of_memory)
                self.scaler.scale(out.sum()).backward()
                self.optimizer.step()
                self.optimizer.zero_grad()
                self.steps.append((epoch, len(batch)))
                self.run_callbacks("on_train_batch_end")
            self.validate()
            epoch += 1
        self.final_eval()

    def validate(self) -> Any:
        return self.validator()

    def final_eval(self) -> Any:
        return self.validator()


def _out_of_memory(grad: Any) -> Any:
    import torch

    raise torch.cuda.OutOfMemoryError("CUDA out of memory (raised inside backward)")


def run(rank: int, world: int, port: int, folder: str, scenarios: list[dict[str, Any]]) -> None:
    """One process: each scenario is a training run (``drills``, ``epochs``, ``batch``, optional ``oom_in_backward``
    and ``gradient_timeout``); what each did goes to ``folder/<name>.rank<N>.json``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), YOLO_OFFLINE="1")
    for scenario in scenarios:
        outcome = train_once(rank, Path(folder), **scenario)
        (Path(folder) / f"{scenario['name']}.rank{rank}.json").write_text(json.dumps(outcome))


def train_once(rank: int, folder: Path, name: str, drills: str, epochs: int = 2, batch: int = 8,
               oom_in_backward: str = "", gradient_timeout: float | None = None) -> dict[str, Any]:
    from yolo_batch.training.batch_change import ScalingRules, TrainingOutOfMemory
    from yolo_batch.training.drills import parse_injection
    from yolo_batch.ultralytics_adapter.controlled_trainer import controlled_trainer
    from yolo_batch.ultralytics_adapter.trainer_control import BatchControl

    control = BatchControl(ScalingRules(nominal_batch=64, lr_rule="linear", base_lr0=0.01), accumulate=1, lr0=0.01,
                           bn_policy="train", drills=parse_injection(drills))
    callbacks: dict[str, list[Any]] = {}
    for event, callback in control.callbacks():
        callbacks.setdefault(event, []).append(callback)
    callbacks.setdefault("on_train_batch_start", [])
    trainer = controlled_trainer(FakeDDPTrainer)(callbacks, folder / name, epochs, batch, oom_in_backward,
                                                 gradient_timeout)
    outcome: dict[str, Any] = {"rank": rank}
    try:
        trainer._do_train()
    except TrainingOutOfMemory as exc:
        outcome["stopped"] = str(exc)
    except RuntimeError as exc:  # the other process stopped: the collective times out instead of waiting forever
        outcome["error"] = type(exc).__name__
    outcome.update(
        steps=trainer.steps, val_batches=trainer.validator.batches, accumulate=trainer.accumulate,
        events=[{"phase": e.phase, "epoch": e.epoch, "step": e.step, "old": e.old_batch, "new": e.new_batch,
                 "accumulate": e.accumulate, "effective": e.effective_batch, "ranks": list(e.ranks)}
                for e in control.events],
        weights=[round(float(p.detach().sum()), 6) for p in trainer.model.parameters()],
    )
    return outcome
