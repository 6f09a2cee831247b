"""Multi-GPU OOM recovery without deadlock: two CPU processes (gloo), an injected OOM on one of them.

The processes run the real controlled-trainer overrides and BatchControl over a DDP model (tests/ddp_fake_trainer.py:
Ultralytics itself trains multi-GPU runs on CUDA only). A deadlock shows as a process still alive at the timeout.
"""

from __future__ import annotations

import json
import multiprocessing
import socket

import pytest
from ddp_fake_trainer import IMAGES, run

from yolo_batch.training.rank_vote import LocalVote


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCENARIOS = [
    # Rank 1 fails in training (epoch 0, its 3rd step); rank 0 fails in validation after epoch 1.
    {"name": "recover", "drills": "train:epoch=0,step=2,rank=1;val:epoch=1,rank=0"},
    # Last: it leaves rank 0's gradient all-reduce to time out after 5 s.
    {"name": "backward", "drills": "", "oom_in_backward": "1:0:1", "gradient_timeout": 5},
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, list[dict]]:
    """Both scenarios in one pair of processes (starting them, which imports torch twice, is the slow part)."""
    folder = tmp_path_factory.mktemp("ddp")
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=run, args=(rank, 2, port, str(folder), SCENARIOS)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(240)
    alive = [p.pid for p in processes if p.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
    assert not alive, f"processes {alive} still running after 240 s: deadlock"
    return {s["name"]: [json.loads((folder / f"{s['name']}.rank{r}.json").read_text()) for r in range(2)]
            for s in SCENARIOS}


@pytest.mark.slow
def test_one_process_runs_out_of_memory_and_both_step_down_together(outcomes):
    ranks = outcomes["recover"]
    events = [
        {"phase": "train", "epoch": 0, "step": 2, "old": 8, "new": 4, "accumulate": 2, "effective": 16, "ranks": [1]},
        {"phase": "val", "epoch": 1, "step": 0, "old": 16, "new": 8, "accumulate": 2, "effective": 16, "ranks": [0]},
    ]
    for outcome in ranks:
        assert "stopped" not in outcome and "error" not in outcome
        assert outcome["events"] == events
        # Epoch 0 was run again at 4 per process; every step that finished used the agreed batch.
        assert outcome["steps"] == [[0, 8]] * 2 + [[0, 4]] * (IMAGES // 4) + [[1, 4]] * (IMAGES // 4)
        assert outcome["accumulate"] == 2
    # Validation: epoch 0 at 16; epoch 1 at 16 (rank 0 failed at its first batch) then 8; the final pass at 8.
    assert ranks[1]["val_batches"] == [16, 16, 8, 8, 8, 8]
    assert ranks[0]["val_batches"] == [16, 8, 8, 8, 8]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas identical through the recovery


@pytest.mark.slow
def test_an_oom_inside_backward_stops_that_process_with_one_line(outcomes):
    # Past the step's vote the other process is inside the gradient all-reduce: no in-process recovery is
    # possible. The failing process says so and exits; the other is released by the collective's timeout (the
    # launcher, torchrun, stops it at once in a real run) instead of waiting forever.
    ranks = outcomes["backward"]
    assert ranks[1]["stopped"].startswith("out of memory in training at epoch 0, step 1 inside backward, where "
                                          "the other processes are already exchanging gradients")
    assert ranks[1]["stopped"].endswith("no epoch finished, so there is no checkpoint")
    assert "error" in ranks[0] and "stopped" not in ranks[0]


def test_a_single_process_votes_alone():
    vote = LocalVote()
    assert vote.any_failed(True) and not vote.any_failed(False)
    assert vote.gather(True, 5, 3) == ((0,), 5, 3) and vote.gather(False, None, None) == ((), None, None)
