"""Figures for decisions: matplotlib's object API on the Agg canvas, saved atomically.

No ``pyplot``: it keeps global figure state and may pick an interactive backend; a :class:`Figure` made here
renders with Agg whatever ``MPLBACKEND`` says, needs no display, and uses matplotlib's bundled DejaVu Sans, so
nothing is downloaded. The figure builders in ``training/plots.py`` and ``inference/plots.py`` are pure (a
decision in, a figure out): tests read their artists instead of pixels.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from yolo_batch.core.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GIB = float(1 << 30)
DPI = 110


def new_figure(width: float = 8.0, height: float = 5.0) -> Figure:
    """An empty figure bound to the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Render ``figure`` as PNG and replace ``path`` with it atomically (a crash never leaves half a picture)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write(path, buffer.getvalue())
