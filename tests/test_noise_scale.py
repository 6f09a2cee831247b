"""The noise-scale estimator against a problem whose answer is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from yolo_batch.errors import InputError
from yolo_batch.training.noise_scale import estimate_noise_scale, step_norms, unbiased_estimates


def linear_regression_norms(delta: np.ndarray, sigma: float, small: int, chunks: int, steps: int, seed: int):
    """Per-step squared gradient norms of 0.5 (x.w - y)^2 at w = w* + delta, x ~ N(0, I), y = x.w* + N(0, sigma^2).

    The per-sample gradient is x (x.delta - eps), so G = delta and, by Isserlis' theorem,
    Sigma = delta delta^T + (|delta|^2 + sigma^2) I: tr(Sigma) = |delta|^2 + d (|delta|^2 + sigma^2).
    """
    rng = np.random.default_rng(seed)
    d = delta.size
    small_sq, big_sq = [], []
    for _ in range(steps):
        x = rng.standard_normal((chunks * small, d))
        residual = x @ delta - sigma * rng.standard_normal(chunks * small)
        per_sample = x * residual[:, None]
        chunk_means = [c.mean(axis=0) for c in np.split(per_sample, chunks)]
        s, b = step_norms(chunk_means)
        small_sq.append(s)
        big_sq.append(b)
    return small_sq, big_sq


@pytest.mark.parametrize(("d", "sigma", "norm"), [(10, 1.0, 1.0), (20, 2.0, 0.5), (5, 0.5, 2.0)])
def test_b_simple_matches_the_closed_form_within_10_percent(d, sigma, norm):
    rng = np.random.default_rng(d)
    delta = rng.standard_normal(d)
    delta *= norm / np.linalg.norm(delta)
    g2 = norm**2
    trace = g2 + d * (g2 + sigma**2)
    small_sq, big_sq = linear_regression_norms(delta, sigma, small=4, chunks=8, steps=3000, seed=d + 1)
    measured = estimate_noise_scale(small_sq, big_sq, 4, 32, resamples=300)
    assert measured.gradient_sq == pytest.approx(g2, rel=0.10)
    assert measured.trace_sigma == pytest.approx(trace, rel=0.10)
    assert measured.b_simple == pytest.approx(trace / g2, rel=0.10)
    low, high = measured.ci95
    assert low < measured.b_simple < high
    assert low <= trace / g2 * 1.1 and high >= trace / g2 * 0.9  # the interval is near the truth, not elsewhere


def test_the_estimators_are_exact_on_expected_norms():
    # E|G_B|^2 = |G|^2 + tr(Sigma)/B: feeding the expectations back recovers both exactly.
    g2, trace = 3.0, 120.0
    assert unbiased_estimates(g2 + trace / 4, g2 + trace / 32, 4, 32) == (pytest.approx(g2), pytest.approx(trace))


def test_signal_below_noise_is_unbounded_with_its_reason():
    # |G_B|^2 above what |G_b|^2 implies: the |G|^2 estimate is negative on every step.
    measured = estimate_noise_scale([1.0, 1.1, 0.9], [0.2, 0.22, 0.18], 4, 8, resamples=50)
    assert measured.b_simple is None and measured.ci95[1] is None
    assert "below its noise" in measured.reason
    assert measured.to_dict()["ci95"] == [measured.ci95[0], None]


@pytest.mark.parametrize(("small", "big", "small_batch", "big_batch", "message"), [
    ([1.0], [1.0], 4, 8, "at least 2 steps"),
    ([1.0, 2.0], [1.0], 4, 8, "at least 2 steps"),
    ([1.0, 2.0], [1.0, 2.0], 8, 8, "small < big"),
    ([1.0, 2.0], [1.0, 2.0], 0, 8, "small < big"),
])
def test_bad_measurements_are_input_errors(small, big, small_batch, big_batch, message):
    with pytest.raises(InputError, match=message):
        estimate_noise_scale(small, big, small_batch, big_batch)


def test_step_norms_needs_two_chunks():
    with pytest.raises(ValueError):
        step_norms([np.ones(3)])
    small, big = step_norms([np.array([1.0, 0.0]), np.array([0.0, 1.0])])
    assert (small, big) == (1.0, 0.5)
    assert math.isclose(small, 1.0)
