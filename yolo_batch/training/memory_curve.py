"""Peak memory as a function of batch size, fitted from probe samples. Pure numbers, no torch.

The fit is deliberately conservative: peaks are made monotone (a noisy dip never lowers the
curve), inside the probed range it interpolates between neighbours, and beyond it extrapolates
from the largest sample with the steeper of the least-squares slope and the last segment's
slope, so a convex curve is not underestimated by an early flat stretch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from yolo_batch.training.decision import ProbeSample


@dataclass(frozen=True)
class MemoryCurve:
    """Monotone piecewise-linear peak memory over batch, with a linear tail."""

    batches: tuple[int, ...]
    peaks: tuple[float, ...]  # bytes, monotone non-decreasing
    slope: float  # bytes per extra image beyond the largest sample
    ceiling: int | None = None  # smallest batch known to run out of memory

    def predict(self, batch: int) -> float:
        """Predicted peak bytes at ``batch``."""
        if batch <= self.batches[0]:
            return self.peaks[0] if len(self.batches) == 1 else self._segment(0, batch)
        for i in range(len(self.batches) - 1):
            if batch <= self.batches[i + 1]:
                return self._segment(i, batch)
        return self.peaks[-1] + self.slope * (batch - self.batches[-1])

    def _segment(self, i: int, batch: int) -> float:
        b0, b1 = self.batches[i], self.batches[i + 1]
        p0, p1 = self.peaks[i], self.peaks[i + 1]
        return p0 + (p1 - p0) * (batch - b0) / (b1 - b0)

    def largest_within(self, budget: float, cap: int) -> int:
        """Largest batch in [1, cap] (and below any known OOM) whose predicted peak fits ``budget``; 0 if none."""
        upper = cap if self.ceiling is None else min(cap, self.ceiling - 1)
        if upper < 1 or self.predict(1) > budget:
            return 0
        lo, hi = 1, upper
        while lo < hi:  # predict is monotone, so bisection finds the boundary exactly
            mid = (lo + hi + 1) // 2
            if self.predict(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


def fit_memory_curve(samples: Sequence[ProbeSample]) -> MemoryCurve:
    """Fit a :class:`MemoryCurve` to measured samples (OOM samples only set the ceiling).

    Raises:
        ValueError: when no sample has a measured peak.
    """
    ooms = [s.batch for s in samples if s.oom]
    ceiling = min(ooms) if ooms else None
    measured = sorted({s.batch: s.peak_bytes for s in samples if not s.oom and s.peak_bytes is not None}.items())
    if not measured:
        raise ValueError("no probe sample has a measured peak")
    batches = tuple(batch for batch, _ in measured)
    peaks: list[float] = []
    for _, peak in measured:
        peaks.append(max(float(peak), peaks[-1] if peaks else 0.0))
    return MemoryCurve(batches=batches, peaks=tuple(peaks), slope=_tail_slope(batches, peaks), ceiling=ceiling)


def _tail_slope(batches: Sequence[int], peaks: Sequence[float]) -> float:
    if len(batches) < 2:
        return math.inf  # one point says nothing about growth: never extrapolate from it
    n = len(batches)
    mean_b = sum(batches) / n
    mean_p = sum(peaks) / n
    var = sum((b - mean_b) ** 2 for b in batches)
    least_squares = sum((b - mean_b) * (p - mean_p) for b, p in zip(batches, peaks)) / var
    last = (peaks[-1] - peaks[-2]) / (batches[-1] - batches[-2])
    return max(least_squares, last, 1.0)  # memory never shrinks as the batch grows
