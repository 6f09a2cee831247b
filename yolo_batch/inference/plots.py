"""``throughput.png``: what ``--batch auto`` (infer) and ``--max-batch auto`` (serve) measured and chose.

Images per second and one batch's latency against the batch size, the tolerance band the choice comes from,
the latency limit when one was set, and the chosen batch marked. Pure: a :class:`ThroughputChoice` in, a
figure out (:func:`throughput_figure`); :func:`save_throughput_plot` writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from yolo_batch.core.figures import new_figure, save_figure
from yolo_batch.inference.throughput import ThroughputChoice

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RATE_COLOUR = "tab:blue"
LATENCY_COLOUR = "tab:orange"
CHOSEN_COLOUR = "tab:green"


def throughput_figure(choice: ThroughputChoice) -> Figure:
    """img/s (left axis) and batch latency (right axis) against batch, the chosen batch marked."""
    figure = new_figure()
    rate_axis = figure.add_subplot()
    latency_axis = rate_axis.twinx()
    measured = [s for s in choice.samples if not s.oom]
    batches = [s.batch for s in measured]
    rate_axis.plot(batches, [s.images_per_s for s in measured], "o-", color=RATE_COLOUR, label="img/s")
    latency_axis.plot(batches, [s.latency_ms for s in measured], "s--", color=LATENCY_COLOUR,
                      label="batch latency (ms)")
    if choice.best_images_per_s:
        rate_axis.axhline((1 - choice.tolerance) * choice.best_images_per_s, color=RATE_COLOUR, linestyle=":",
                          linewidth=1, label=f"within {choice.tolerance:.0%} of the best")
    if choice.max_latency_ms is not None:
        latency_axis.axhline(choice.max_latency_ms, color=LATENCY_COLOUR, linestyle=":", linewidth=1,
                             label=f"latency limit {choice.max_latency_ms:g} ms")
    for sample in choice.samples:
        if sample.oom:
            rate_axis.axvline(sample.batch, color="tab:red", linestyle="--", linewidth=1,
                              label=f"out of memory at {sample.batch}")
    rate_axis.axvline(choice.batch, color=CHOSEN_COLOUR, linewidth=2, alpha=0.6, label=f"chosen: batch {choice.batch}")
    rate_axis.set_xscale("log", base=2)
    all_batches = [s.batch for s in choice.samples] or [choice.batch]
    rate_axis.set_xticks(all_batches, [str(b) for b in all_batches])
    rate_axis.set_xlabel("batch (images per forward pass)")
    rate_axis.set_ylabel("images per second", color=RATE_COLOUR)
    latency_axis.set_ylabel("latency per batch (ms)", color=LATENCY_COLOUR)
    rate_axis.set_ylim(bottom=0)
    latency_axis.set_ylim(bottom=0)
    rate_axis.grid(True, alpha=0.3)
    rate_axis.set_title(f"Inference batch (auto): {choice.batch}\n{choice.reason}", fontsize=10)
    handles = rate_axis.get_legend_handles_labels()
    more = latency_axis.get_legend_handles_labels()
    rate_axis.legend(handles[0] + more[0], handles[1] + more[1], loc="lower right", fontsize=8)
    return figure


def save_throughput_plot(choice: ThroughputChoice, path: str | Path) -> Path:
    """Write :func:`throughput_figure` to ``path`` (PNG); returns the path."""
    return save_figure(throughput_figure(choice), path)
