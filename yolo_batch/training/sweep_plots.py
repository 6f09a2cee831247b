"""A sweep's pictures (pure: a report in, figures out; saved through :mod:`yolo_batch.core.figures`).

* ``sweep_losses.png``: training (solid) and validation (dashed) loss per epoch, one colour per batch;
* ``sweep_map_time.png``: mAP50-95 against wall-clock time, one line per batch (what each batch buys per second);
* ``sweep_gap.png``: the generalisation gap (validation minus training loss) against the training loss for each
  batch, with each run's gap at the training loss every run reached (:func:`equal_loss_gaps`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from yolo_batch.core.figures import new_figure, save_figure
from yolo_batch.training.sweep_report import SweepReport, equal_loss_gaps

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTS = ("sweep_losses.png", "sweep_map_time.png", "sweep_gap.png")


def _colour(index: int) -> str:
    return f"C{index % 10}"


def losses_figure(report: SweepReport) -> Figure:
    """Training and validation loss per epoch for each batch."""
    figure = new_figure(7.0, 4.2)
    axis = figure.add_subplot()
    for i, run in enumerate(report.runs):
        epochs = [e.epoch for e in run.epochs]
        axis.plot(epochs, [e.train_loss for e in run.epochs], "-o", color=_colour(i), label=f"batch {run.batch} train")
        val = [(e.epoch, e.val_loss) for e in run.epochs if e.val_loss is not None]
        if val:
            axis.plot(*zip(*val), "--s", color=_colour(i), label=f"batch {run.batch} val")
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss (box + cls + dfl)")
    axis.set_title("Training (solid) and validation (dashed) loss per batch", fontsize=10)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def map_time_figure(report: SweepReport) -> Figure:
    """mAP50-95 after each epoch against the wall-clock time it was reached at."""
    figure = new_figure(7.0, 4.2)
    axis = figure.add_subplot()
    for i, run in enumerate(report.runs):
        points = [(e.wall_s, e.map50_95) for e in run.epochs if e.map50_95 is not None]
        if points:
            axis.plot(*zip(*points), "-o", color=_colour(i), label=f"batch {run.batch}")
    axis.set_xlabel("wall-clock time since training started (s)")
    axis.set_ylabel("mAP50-95 (validation)")
    axis.set_title(f"mAP50-95 against time; recommended: {report.recommended_batch}", fontsize=10)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def gap_figure(report: SweepReport) -> Figure:
    """Validation minus training loss against the training loss (training proceeds to the right), one line per
    batch, with the level every run reached: runs are compared at equal training loss, not at equal epochs."""
    figure = new_figure(7.0, 4.2)
    axis = figure.add_subplot()
    for i, run in enumerate(report.runs):
        points = [(e.train_loss, e.gap) for e in run.epochs if e.gap is not None]
        if points:
            axis.plot(*zip(*points), "-o", color=_colour(i), markersize=3, label=f"batch {run.batch}")
    level, gaps = equal_loss_gaps(report.runs)
    if level is not None:
        axis.axvline(level, color="gray", linestyle=":", label=f"equal training loss {level:.2f}")
        for batch, _, gap, _ in gaps:
            index = next(i for i, r in enumerate(report.runs) if r.batch == batch)
            axis.plot([level], [gap], "D", color=_colour(index), markersize=7)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.invert_xaxis()
    axis.set_xlabel("training loss (box + cls + dfl): training proceeds to the right")
    axis.set_ylabel("val loss - train loss")
    title = "Generalisation gap per batch" + (" (widening with the batch)" if report.gap_widening else "")
    axis.set_title(title, fontsize=10)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def save_sweep_plots(report: SweepReport, out: str | Path) -> list[Path]:
    """Write the three figures into ``out``; returns their paths."""
    builders = (losses_figure, map_time_figure, gap_figure)
    return [save_figure(build(report), Path(out) / name) for name, build in zip(PLOTS, builders)]
