"""``autobatch.png``: the memory side of an AutoBatch decision, for the GPU that decided it.

Each probe's training peak (and its validation peak, measured at the validation batch Ultralytics will use),
the monotone curve fitted through them (:mod:`.memory_curve`, the same fit the search used), the budget, the
memory other processes hold on that GPU, the chosen batch and its verified peak. Pure: a decision in, a figure
out (:func:`autobatch_figure`); ``None`` when no GPU memory was measured (a CPU run, a fixed batch, a fallback).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from yolo_batch.core.figures import GIB, new_figure, save_figure
from yolo_batch.training.decision import AutoBatchDecision, GpuBudget
from yolo_batch.training.memory_curve import fit_memory_curve

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TRAIN_COLOUR = "tab:blue"
VAL_COLOUR = "tab:purple"
CURVE_COLOUR = "tab:gray"
BUDGET_COLOUR = "tab:red"
OTHERS_COLOUR = "tab:orange"
CHOSEN_COLOUR = "tab:green"


def measured(decision: AutoBatchDecision) -> bool:
    """Whether the decision holds GPU memory measurements worth a picture."""
    return any(p.peak_bytes is not None for p in decision.probes)


def autobatch_figure(decision: AutoBatchDecision) -> Figure | None:
    """Peak memory (GiB) against batch: probes, fitted curve, budget, other processes, chosen and verified batch."""
    if not measured(decision):
        return None
    figure = new_figure()
    axis = figure.add_subplot()
    probes = sorted(decision.probes, key=lambda p: p.batch)
    train = [(p.batch, p.train_peak_bytes / GIB) for p in probes if not p.oom and p.train_peak_bytes is not None]
    val = [(p.batch, p.val_peak_bytes / GIB) for p in probes if not p.oom and p.val_peak_bytes is not None]
    if train:
        axis.plot(*zip(*train), "o", color=TRAIN_COLOUR, label="training peak (probe)")
    if val:
        axis.plot(*zip(*val), "^", color=VAL_COLOUR, label="validation peak (at the validation batch)")
    top = max([p.batch for p in probes] + [decision.batch])
    curve = fit_memory_curve(probes)
    xs = sorted({*range(1, 2 * top + 1, max(1, top // 64))} | {b for b, _ in train + val})
    ys = [curve.predict(x) / GIB for x in xs]
    axis.plot(xs, [y if math.isfinite(y) else float("nan") for y in ys], "-", color=CURVE_COLOUR, linewidth=1,
              label="fitted curve")
    gpu = _deciding_gpu(decision)
    if decision.budget_bytes is not None:
        share = f" ({decision.fraction:.0%} of free)" if decision.fraction else ""
        axis.axhline(decision.budget_bytes / GIB, color=BUDGET_COLOUR, linestyle="--",
                     label=f"budget {decision.budget_bytes / GIB:.2f} GiB{share}")
    if gpu is not None:
        total = gpu.total_bytes / GIB
        axis.axhline(total, color="black", linewidth=1, label=f"GPU {gpu.index} total {total:.1f} GiB")
        if gpu.others_bytes:
            axis.axhspan(total - gpu.others_bytes / GIB, total, color=OTHERS_COLOUR, alpha=0.3,
                         label=f"other processes {gpu.others_bytes / GIB:.2f} GiB")
    for p in probes:
        if p.oom:
            axis.axvline(p.batch, color=BUDGET_COLOUR, linestyle=":", linewidth=1, label=f"out of memory at {p.batch}")
    axis.axvline(decision.batch, color=CHOSEN_COLOUR, linewidth=2, alpha=0.6, label=f"chosen: batch {decision.batch}")
    if decision.verified_peak_bytes is not None:
        axis.plot([decision.batch], [decision.verified_peak_bytes / GIB], "*", markersize=14, color=CHOSEN_COLOUR,
                  label=f"verified peak {decision.verified_peak_bytes / GIB:.2f} GiB")
    axis.set_xscale("log", base=2)
    ticks = sorted({p.batch for p in probes} | {decision.batch})
    axis.set_xticks(ticks, [str(t) for t in ticks])
    axis.set_xlim(0.8, 2.2 * top)
    axis.set_ylim(bottom=0)
    axis.set_xlabel("batch per device")
    axis.set_ylabel("peak GPU memory (GiB)")
    axis.grid(True, alpha=0.3)
    where = f" on GPU {gpu.index} ({gpu.name})" if gpu is not None else ""
    axis.set_title(f"AutoBatch: batch {decision.batch}{where}", fontsize=10)
    axis.legend(loc="upper left", fontsize=8)
    return figure


def save_autobatch_plot(decision: AutoBatchDecision, path: str | Path) -> Path | None:
    """Write :func:`autobatch_figure` to ``path`` (PNG); ``None`` (nothing written) when nothing was measured."""
    figure = autobatch_figure(decision)
    return save_figure(figure, path) if figure is not None else None


def _deciding_gpu(decision: AutoBatchDecision) -> GpuBudget | None:
    """The GPU whose budget decided (the tightest one)."""
    return min(decision.gpus, key=lambda g: g.budget_bytes, default=None)
