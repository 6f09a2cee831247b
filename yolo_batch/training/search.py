"""Search strategies for the largest batch inside a memory budget, as small pure functions.

``measure(batch)`` is injected: the real one runs training steps on a GPU, tests pass a curve.
It returns a :class:`ProbeSample` and reports running out of memory as ``oom=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from yolo_batch.training.config import Rounding
from yolo_batch.training.decision import ProbeSample, gib
from yolo_batch.training.memory_curve import fit_memory_curve

Measure = Callable[[int], ProbeSample]

MAX_PROBES = 12  # 1..2048 by doubling
MAX_STEP_DOWNS = 6  # extra verification runs after probing


class NoBatchFits(Exception):
    """Not even the smallest batch fits the budget."""


@dataclass(frozen=True)
class SearchResult:
    batch: int
    predicted_peak: float | None
    verified: ProbeSample | None
    samples: tuple[ProbeSample, ...]
    reasons: tuple[str, ...]


def round_batch(batch: int, rounding: Rounding) -> int:
    """Round ``batch`` down: to a power of two, a multiple of 8 (below 8 unchanged), or not at all."""
    if batch < 1:
        return 1
    if rounding is Rounding.POW2:
        return 1 << (batch.bit_length() - 1)
    if rounding is Rounding.MULT8:
        return batch if batch < 8 else batch - batch % 8
    return batch


def probe_doubling(measure: Measure, budget: float, cap: int) -> list[ProbeSample]:
    """Probe 1, 2, 4, ... while the fitted curve predicts the next size still fits ``budget``.

    Stops at the first OOM, at ``cap`` or when a measured peak already exceeds the budget,
    so no probe is sent far past the budget on a shared GPU.
    """
    samples: list[ProbeSample] = []
    batch = 1
    while batch <= cap and len(samples) < MAX_PROBES:
        sample = measure(batch)
        samples.append(sample)
        if sample.oom or sample.peak_bytes is None or sample.peak_bytes > budget:
            break
        if batch >= cap:
            break
        nxt = min(batch * 2, cap)
        if len(samples) >= 2 and fit_memory_curve(samples).predict(nxt) > budget:
            break
        batch = nxt
    return samples


def search_batch(measure: Measure, budget: float, cap: int, rounding: Rounding) -> SearchResult:
    """Probe, fit, choose, round, then verify with real steps, stepping down on OOM or over budget.

    A verification that peaks over budget is added to the curve, whose interpolation then lands
    inside it. An OOM says nothing about memory, so below an OOM the search bisects between the
    largest verified batch and the OOM, upwards too, until the gap closes or the steps run out.

    Raises:
        NoBatchFits: when batch 1 runs out of memory or peaks above ``budget``.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    samples = probe_doubling(measure, budget, cap)
    reasons: list[str] = []
    first = samples[0]
    if first.oom or first.peak_bytes is None or first.peak_bytes > budget:
        need = "runs out of memory" if first.oom else f"peaks at {gib(first.peak_bytes)}"
        raise NoBatchFits(f"batch 1 {need}, budget is {gib(int(budget))}")
    if samples[-1].oom:
        reasons.append(f"probe at batch {samples[-1].batch} ran out of memory; it bounds the search")

    def fits(s: ProbeSample) -> bool:
        return not s.oom and s.peak_bytes is not None and s.peak_bytes <= budget

    best = max((s for s in samples if fits(s) and round_batch(s.batch, rounding) == s.batch), key=lambda s: s.batch)
    curve = fit_memory_curve(samples)
    for _ in range(MAX_STEP_DOWNS + 1):
        failed = [s.batch for s in samples if not fits(s)]
        upper = min(failed, default=cap + 1) - 1
        target = curve.largest_within(budget, min(cap, upper))
        if curve.ceiling is not None:
            target = min(target, (best.batch + curve.ceiling) // 2)
        batch = round_batch(target, rounding)
        if batch <= best.batch:
            break
        sample = measure(batch)
        samples.append(sample)
        curve = fit_memory_curve(samples)
        if fits(sample):
            best = sample
            if curve.ceiling is None:
                break  # the curve's own answer held: done
            continue
        what = "ran out of memory" if sample.oom else f"peaked at {gib(sample.peak_bytes)}"
        reasons.append(f"verification at batch {batch} {what} (budget {gib(int(budget))}); stepping down")
    return SearchResult(best.batch, curve.predict(best.batch), best, tuple(samples), tuple(reasons))
