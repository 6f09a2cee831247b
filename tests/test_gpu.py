"""Real-GPU checks (``pytest -m gpu``): the probe's verified peak stays inside the budget, and training
plus validation at the chosen batch does not run out of memory. Skipped with a reason on GPU-less machines."""

from __future__ import annotations

import pytest
import torch

from yolo_batch import SizingConfig, estimate_batch
from yolo_batch.core.nvml import read_gpus

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]


@pytest.fixture
def bccd(copy_shared):
    return copy_shared("bccd")


def test_real_probe_stays_inside_the_budget(bccd):
    decision = estimate_batch(SizingConfig(data=bccd, imgsz=320, device="0", epochs=1, use_cache=False))
    assert decision.source == "autobatch", decision.reasons
    assert decision.verified_peak_bytes <= decision.budget_bytes
    assert decision.probes and all(p.train_peak_bytes for p in decision.probes if not p.oom)
    gpu = read_gpus([0])[0]
    assert decision.budget_bytes <= gpu.total_bytes


def test_training_at_the_chosen_batch_does_not_run_out_of_memory(bccd, tmp_path):
    from yolo_batch import TrainConfig, train

    def reset_after_probing(decision):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(0)  # measure training and validation only, not the probes

    result = train(TrainConfig(
        sizing=SizingConfig(data=bccd, imgsz=320, device="0", epochs=1, use_cache=False),
        project=str(tmp_path), name="gpu", extra={"plots": False},
    ), on_decision=reset_after_probing)
    peak = torch.cuda.max_memory_reserved(0)
    assert result.weights is not None
    assert result.accumulate == result.decision.accumulate
    assert peak <= result.decision.budget_bytes * 1.05, (peak, result.decision.budget_bytes)
