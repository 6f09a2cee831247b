"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"), pure.

``B_simple = tr(Sigma) / |G|^2``: the per-sample gradient covariance's trace over the squared true gradient. Batches
well below it are dominated by noise (doubling the batch nearly halves the steps needed); batches well above it
give diminishing returns per sample. Neither quantity is observed directly. A gradient averaged over ``B`` samples
has ``E |G_B|^2 = |G|^2 + tr(Sigma) / B``, so squared norms measured at two batch sizes ``b < B`` give the unbiased
estimators of Appendix A::

    |G|^2     ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

A *step* here draws ``B = k b`` samples, splits them into ``k`` chunks of ``b``: ``|G_b|^2`` is the chunks' mean
squared norm and ``|G_B|^2`` the squared norm of their mean (:func:`step_norms`), so one batch gives both. Each
estimator is averaged over the steps before the ratio is taken (the ratio of averages, as the paper does); the 95 %
interval comes from resampling the steps (bootstrap percentiles). Numbers in, a record out; nothing here touches a
model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from yolo_batch.core.checks import check_count
from yolo_batch.errors import InputError

RESAMPLES = 2000  # bootstrap draws: the 2.5 % and 97.5 % percentiles settle to a few per mille


@dataclass(frozen=True)
class NoiseSettings:
    """How the noise scale is measured: ``steps`` steps of ``chunks`` gradients at batch ``small`` each."""

    small_batch: int = 4
    chunks: int = 8
    steps: int = 30
    workers: int = 0

    def __post_init__(self) -> None:
        check_count(self.small_batch, "small batch")
        check_count(self.chunks, "chunks", minimum=2)
        check_count(self.steps, "steps", minimum=2)
        check_count(self.workers, "workers", minimum=0)

    @property
    def big_batch(self) -> int:
        return self.small_batch * self.chunks


@dataclass(frozen=True)
class NoiseScale:
    """The measured noise scale and what it was measured from.

    ``b_simple`` is None when the gradient's signal could not be told from its noise (the |G|^2 estimate is not
    positive): larger batches than this measurement can resolve still pay. ``ci95[1]`` is None when the interval
    is unbounded above for the same reason.
    """

    b_simple: float | None
    ci95: tuple[float | None, float | None]
    gradient_sq: float  # |G|^2 estimate (mean over steps)
    trace_sigma: float  # tr(Sigma) estimate (mean over steps)
    small_batch: int
    big_batch: int
    steps: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci95"] = list(self.ci95)
        return out


def step_norms(chunks: Sequence[Any]) -> tuple[float, float]:
    """(|G_b|^2, |G_B|^2) for one step from the ``k`` chunk gradients (NumPy arrays or torch tensors, one each).

    Each chunk's gradient is the mean over its ``b`` samples; their mean is the gradient over all ``B = k b``.
    """
    if len(chunks) < 2:
        raise ValueError("a step needs at least two chunks to give two batch sizes")
    small = sum(float((c * c).sum()) for c in chunks) / len(chunks)
    mean = sum(chunks[1:], chunks[0]) / len(chunks)
    return small, float((mean * mean).sum())


def unbiased_estimates(small_sq: float, big_sq: float, small_batch: int, big_batch: int) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) from one pair of squared norms at ``small_batch`` and ``big_batch`` (Appendix A)."""
    gradient_sq = (big_batch * big_sq - small_batch * small_sq) / (big_batch - small_batch)
    trace = (small_sq - big_sq) / (1.0 / small_batch - 1.0 / big_batch)
    return gradient_sq, trace


def estimate_noise_scale(small_sq: Sequence[float], big_sq: Sequence[float], small_batch: int, big_batch: int,
                         *, resamples: int = RESAMPLES, seed: int = 0) -> NoiseScale:
    """``B_simple`` with a bootstrap 95 % interval from per-step squared norms at two batch sizes.

    Raises:
        InputError: mismatched or too few steps, or batch sizes that are not ``1 <= small < big``.
    """
    if len(small_sq) != len(big_sq) or len(small_sq) < 2:
        raise InputError(f"the noise scale needs at least 2 steps with both norms, got {len(small_sq)} and "
                         f"{len(big_sq)}")
    if not 1 <= small_batch < big_batch:
        raise InputError(f"the noise scale needs two batch sizes 1 <= small < big, got {small_batch} and {big_batch}")
    pairs = [unbiased_estimates(s, b, small_batch, big_batch) for s, b in zip(small_sq, big_sq)]
    gradient_sq = sum(g for g, _ in pairs) / len(pairs)
    trace = sum(t for _, t in pairs) / len(pairs)
    rng = random.Random(seed)
    draws = sorted(_ratio([pairs[rng.randrange(len(pairs))] for _ in pairs]) for _ in range(resamples))
    low, high = _percentile(draws, 0.025), _percentile(draws, 0.975)
    b_simple = _ratio(pairs)
    common: dict[str, Any] = {"gradient_sq": gradient_sq, "trace_sigma": trace, "small_batch": small_batch,
                              "big_batch": big_batch, "steps": len(pairs)}
    if not math.isfinite(b_simple):
        reason = (f"the |G|^2 estimate is not positive over {len(pairs)} steps: the gradient's signal is below its "
                  f"noise at batch {big_batch}, so batches larger than that still pay; measure more steps or a "
                  "larger big batch to resolve it")
        return NoiseScale(None, (_finite(low), None), reason=reason, **common)
    reason = (f"B_simple = tr(Sigma) / |G|^2 = {trace:.4g} / {gradient_sq:.4g} = {b_simple:.1f} from {len(pairs)} "
              f"steps at batches {small_batch} and {big_batch}; 95 % interval by bootstrap over the steps")
    return NoiseScale(b_simple, (_finite(low), _finite(high)), reason=reason, **common)


def _ratio(pairs: Sequence[tuple[float, float]]) -> float:
    """tr(Sigma) / |G|^2 of the averaged estimates; infinite when |G|^2 is not positive (signal below noise)."""
    gradient_sq = sum(g for g, _ in pairs)
    trace = sum(t for _, t in pairs)
    if gradient_sq <= 0:
        return math.inf
    return max(trace, 0.0) / gradient_sq


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (NumPy's default), infinities kept."""
    position = q * (len(sorted_values) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    a, b = sorted_values[lower], sorted_values[upper]
    if not (math.isfinite(a) and math.isfinite(b)):
        return b if position > lower else a
    return a + (b - a) * (position - lower)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
