"""--bn sync in real worker processes: two processes in a gloo process group on CPU run the DDP launch file
Ultralytics writes, with our trainer and callbacks, up to the point where training would start.

PyTorch documents converting to SyncBatchNorm before DistributedDataParallel wraps the model; this checks that on
every rank the layers are SyncBatchNorm when the wrap happens. CPU cannot run the wrap itself (DDP refuses
SyncBatchNorm on CPU modules, and Ultralytics' DDP setup selects CUDA devices), so in the workers three things
stand in for CUDA: the world size of a two-GPU run, the process group the test starts (gloo), and a recorder in
place of DistributedDataParallel that notes what it was handed. Everything else is Ultralytics' own setup.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from ddp_helpers import RecordSetup

from yolo_batch import ultralytics_adapter as ua
from yolo_batch.training.batchnorm import callbacks_for
from yolo_batch.training.config import BnPolicy

WORLD = 2

WORKER = r"""
import json, os, runpy, sys
import torch, torch.distributed as dist

launch, out = sys.argv[1], os.environ["YOLO_BATCH_TEST_OUT"]
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))

from ultralytics.engine import trainer as engine
from ddp_helpers import StopAfterSetup

wrapped = {}

class RecordWrap(torch.nn.Module):  # where DistributedDataParallel would wrap the model
    def __init__(self, module, **kwargs):
        super().__init__()
        self.module = module
        wrapped["sync_layers"] = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules())
        wrapped["plain_layers"] = sum(type(m) is torch.nn.BatchNorm2d for m in module.modules())

torch.nn.parallel.DistributedDataParallel = RecordWrap
built = engine.BaseTrainer.__init__

def two_gpu_run(self, *args, **kwargs):
    built(self, *args, **kwargs)
    self.world_size = int(os.environ["WORLD_SIZE"])  # what device=0,1 gives; the device stays the CPU

engine.BaseTrainer.__init__ = two_gpu_run
engine.BaseTrainer._setup_ddp = lambda self: None  # the gloo group above stands in for NCCL on the GPUs
sys.argv = [launch]
try:
    runpy.run_path(launch, run_name="__main__")
except StopAfterSetup:
    pass
with open(out + f".{dist.get_rank()}.wrap.json", "w") as f:
    json.dump(wrapped, f)
dist.destroy_process_group()
# Stopped right after setup, the trainer's loaders and gloo's threads are still up; interpreter teardown racing
# them aborted now and then ("terminate called without an active exception", exit -6) after the record was
# written. Leave without teardown: what the test checks is in the file.
sys.stdout.flush()
os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sync_batchnorm_is_in_place_on_every_rank_before_ddp_wraps(shapes_yaml, tmp_path):
    ua.import_ultralytics()
    from ultralytics.models.yolo.detect import DetectionTrainer

    with ua.quiet():
        trainer = ua.before_wrap_trainer(DetectionTrainer)(overrides={
            "model": "yolo11n.yaml", "data": str(shapes_yaml), "imgsz": 64, "epochs": 1, "batch": 8, "device": "cpu",
            "project": str(tmp_path), "name": "sync", "plots": False, "val": False})
        trainer.model = trainer.get_model(cfg="yolo11n.yaml", verbose=False)
    for callback in [ua.WorkerSetup(), *callbacks_for(BnPolicy.SYNC), RecordSetup()]:
        trainer.add_callback(callback.event, callback)

    out = tmp_path / "rank"
    with ua.ddp_launch_file(trainer) as launch:
        port = free_port()
        workers = [subprocess.Popen(
            [sys.executable, "-c", WORKER, str(launch)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "YOLO_OFFLINE": "1",
                 "CUDA_VISIBLE_DEVICES": "", "YOLO_BATCH_TEST_OUT": str(out),
                 "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])},
        ) for rank in range(WORLD)]
        logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * WORLD, "\n".join(log[-3000:] for log in logs)

    layers = sum(1 for m in trainer.model.modules() if type(m).__name__ == "BatchNorm2d")
    for rank in range(WORLD):
        wrap = json.loads((tmp_path / f"rank.{rank}.wrap.json").read_text())
        assert wrap == {"sync_layers": layers, "plain_layers": 0}, rank  # converted before the wrap, every layer
        seen = json.loads((tmp_path / f"rank.{rank}.json").read_text())
        assert seen["rank"] == rank and len(seen["all"]) == WORLD
        for state in seen["all"]:  # every rank, as gathered through the process group
            assert state["wrapper"] == "RecordWrap" and state["world_size"] == WORLD
            assert (state["sync_layers"], state["plain_layers"]) == (layers, 0)
            assert (state["ema_sync_layers"], state["ema_plain_layers"]) == (0, layers)  # checkpoints: plain
            assert state["optimizer_holds_live_parameters"]
        assert len({state["first_weight_sum"] for state in seen["all"]}) == 1  # same model on every rank
