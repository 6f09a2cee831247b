"""The search on synthetic memory curves: which batches are tried, what is chosen, why."""

from __future__ import annotations

import pytest
from fakes import GIB, CurveGpu, convex, linear

from yolo_batch.training.config import Rounding
from yolo_batch.training.decision import ProbeSample
from yolo_batch.training.memory_curve import fit_memory_curve
from yolo_batch.training.search import NoBatchFits, round_batch, search_batch


@pytest.mark.parametrize(
    ("batch", "rounding", "expected"),
    [
        (1, Rounding.POW2, 1), (3, Rounding.POW2, 2), (64, Rounding.POW2, 64), (127, Rounding.POW2, 64),
        (5, Rounding.MULT8, 5), (8, Rounding.MULT8, 8), (23, Rounding.MULT8, 16), (100, Rounding.MULT8, 96),
        (37, Rounding.NONE, 37), (0, Rounding.POW2, 1),
    ],
)
def test_round_batch_rounds_down(batch, rounding, expected):
    assert round_batch(batch, rounding) == expected


def test_linear_curve_exact_sequence_and_pow2_choice():
    # 2 GiB fixed + 0.25 GiB per image, budget 20 GiB: 72 images fit, pow2 gives 64.
    gpu = CurveGpu(linear(2, 0.25))
    result = search_batch(gpu.measure, 20 * GIB, cap=10_000, rounding=Rounding.POW2)
    assert gpu.tried == [1, 2, 4, 8, 16, 32, 64]  # stops when 128 is predicted over budget; 64 needs no re-run
    assert result.batch == 64
    assert result.verified.peak_bytes <= 20 * GIB
    assert result.reasons == ()


@pytest.mark.parametrize(("rounding", "expected"), [(Rounding.NONE, 72), (Rounding.MULT8, 72), (Rounding.POW2, 64)])
def test_every_rounding_mode_stays_inside_budget(rounding, expected):
    gpu = CurveGpu(linear(2, 0.25))
    result = search_batch(gpu.measure, 20 * GIB, cap=10_000, rounding=rounding)
    assert result.batch == expected
    assert result.verified.peak_bytes <= 20 * GIB
    if rounding is not Rounding.POW2:
        assert gpu.tried[-1] == expected  # verified with a real run at the chosen size
        assert result.verified.peak_bytes >= 0.98 * 20 * GIB  # fills the budget


def test_noisy_curve_never_exceeds_budget():
    for seed in range(20):
        gpu = CurveGpu(linear(1.5, 0.1), noise=0.03, seed=seed)
        result = search_batch(gpu.measure, 30 * GIB, cap=10_000, rounding=Rounding.NONE)
        assert result.verified.peak_bytes <= 30 * GIB
        assert result.verified.peak_bytes >= 0.85 * 30 * GIB


def test_convex_curve_steps_down_after_failed_verification():
    # Memory grows faster than linearly: the extrapolation from the probes undershoots.
    gpu = CurveGpu(convex(1, 0.05, 0.002))
    budget = 20 * GIB
    result = search_batch(gpu.measure, budget, cap=10_000, rounding=Rounding.NONE)
    true_best = max(b for b in range(1, 200) if convex(1, 0.05, 0.002)(b) <= budget)
    assert result.verified.peak_bytes <= budget
    assert result.batch <= true_best
    assert result.batch >= 0.9 * true_best
    if len(gpu.tried) > len(set(gpu.tried)) or any("stepping down" in r for r in result.reasons):
        assert any("stepping down" in r for r in result.reasons)


def test_oom_bounds_the_search_and_is_explained():
    # The curve says 72 fit, but the GPU fails at 40 (fragmentation, another process...).
    gpu = CurveGpu(linear(2, 0.25), oom_at=40)
    result = search_batch(gpu.measure, 20 * GIB, cap=10_000, rounding=Rounding.NONE)
    # 64 OOMs: bisect between 32 (verified) and 64, down through the OOMs and back up to the edge.
    assert gpu.tried == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 39]
    assert result.batch == 39
    assert any("64 ran out of memory" in r for r in result.reasons)


def test_oom_at_verification_steps_down_to_a_working_size():
    gpu = CurveGpu(linear(2, 0.25), oom_at=70)
    result = search_batch(gpu.measure, 20 * GIB, cap=10_000, rounding=Rounding.NONE)
    assert gpu.tried == [1, 2, 4, 8, 16, 32, 64, 72, 68, 70, 69]
    assert result.batch == 69
    assert any("verification at batch 72 ran out of memory" in r for r in result.reasons)


def test_other_processes_shrink_the_budget_and_the_batch():
    alone = search_batch(CurveGpu(linear(2, 0.25)).measure, 20 * GIB, cap=10_000, rounding=Rounding.NONE)
    shared = search_batch(CurveGpu(linear(2, 0.25)).measure, 10 * GIB, cap=10_000, rounding=Rounding.NONE)
    assert alone.batch == 72
    assert shared.batch == 32


def test_dataset_smaller_than_the_batch_caps_it():
    gpu = CurveGpu(linear(2, 0.25))
    result = search_batch(gpu.measure, 20 * GIB, cap=24, rounding=Rounding.NONE)
    assert gpu.tried == [1, 2, 4, 8, 16, 24]
    assert result.batch == 24
    pow2 = search_batch(CurveGpu(linear(2, 0.25)).measure, 20 * GIB, cap=24, rounding=Rounding.POW2)
    assert pow2.batch == 16


def test_pow2_after_oom_needs_no_extra_runs():
    gpu = CurveGpu(linear(2, 0.25), oom_at=70)
    result = search_batch(gpu.measure, 20 * GIB, cap=10_000, rounding=Rounding.POW2)
    assert gpu.tried == [1, 2, 4, 8, 16, 32, 64]
    assert result.batch == 64


def test_dataset_of_one_image():
    gpu = CurveGpu(linear(2, 0.25))
    result = search_batch(gpu.measure, 20 * GIB, cap=1, rounding=Rounding.POW2)
    assert gpu.tried == [1]
    assert result.batch == 1


@pytest.mark.parametrize("gpu", [CurveGpu(linear(30, 1)), CurveGpu(linear(2, 0.25), oom_at=1)])
def test_batch_one_not_fitting_raises(gpu):
    with pytest.raises(NoBatchFits, match="batch 1"):
        search_batch(gpu.measure, 20 * GIB, cap=100, rounding=Rounding.POW2)


def test_validation_peak_decides_when_larger():
    def measure(batch: int) -> ProbeSample:
        return ProbeSample(batch=batch, train_peak_bytes=int((1 + 0.1 * batch) * GIB), val_batch=2 * batch,
                           val_peak_bytes=int((1 + 0.2 * batch) * GIB))

    result = search_batch(measure, 11 * GIB, cap=1000, rounding=Rounding.NONE)
    assert result.batch == 50  # 1 + 0.2 * 50 = 11 GiB: the validation pass is the limit


def test_curve_is_monotone_and_extrapolates_with_the_steeper_slope():
    samples = [ProbeSample(batch=b, train_peak_bytes=p) for b, p in [(1, 100), (2, 90), (4, 200), (8, 500)]]
    curve = fit_memory_curve(samples)
    assert curve.peaks == (100, 100, 200, 500)
    assert curve.predict(16) == pytest.approx(500 + 75 * 8)  # last segment (75/img) is steeper than the fit
    assert curve.largest_within(1100, cap=1000) == 16
