"""A sweep's records and what they say: per-epoch rows, per-run summaries, the recommendation and the gap (pure).

The recommendation: among the runs whose best mAP50-95 is within :data:`MAP_TOLERANCE` of the best run's, the one
that trains fastest (images/s over the training phases); one sentence says why. The generalisation gap is the
validation loss minus the training loss (Ultralytics' training loss is measured on augmented images, so it can
sit above the validation loss). Runs are compared at equal training loss, not at the last epoch: with the same
epochs a larger batch takes fewer steps and ends at an earlier stage of training, where the validation loss still
lags (:func:`equal_loss_gaps`). The gap is flagged as widening when, so compared, it grows with the batch from the
smallest batch to the largest by more than :data:`GAP_WIDENING` of the smallest batch's validation loss.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAP_TOLERANCE = 0.005  # half a mAP point (mAP50-95 on a 0-1 scale): "as good" for the recommendation
GAP_WIDENING = 0.10  # growth of the gap across batches, relative to the smallest batch's validation loss
CSV_COLUMNS = ("batch", "epoch", "train_loss", "val_loss", "gap", "map50", "map50_95", "images_per_s", "train_s",
               "wall_s", "peak_memory_bytes", "lr")


@dataclass(frozen=True)
class EpochRow:
    """One epoch of one run, as :class:`~yolo_batch.ultralytics_adapter.epoch_meter.EpochMeter` measured it."""

    epoch: int
    train_loss: float
    val_loss: float | None
    map50: float | None
    map50_95: float | None
    images_per_s: float | None
    train_s: float
    wall_s: float
    peak_memory_bytes: int | None = None
    lr: float | None = None
    train_losses: Mapping[str, float] = field(default_factory=dict)
    val_losses: Mapping[str, float] = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        return self.val_loss - self.train_loss if self.val_loss is not None else None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EpochRow:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class SweepRun:
    """One finished run of the sweep."""

    batch: int
    effective_batch: int
    accumulate: int
    lr0: float
    lr_rule: str
    optimizer: str
    save_dir: str
    epochs: tuple[EpochRow, ...]
    reasons: tuple[str, ...] = ()

    @property
    def best_map50_95(self) -> float | None:
        values = [e.map50_95 for e in self.epochs if e.map50_95 is not None]
        return max(values) if values else None

    @property
    def images_per_s(self) -> float | None:
        """Training images per second over all epochs' training phases (validation left out)."""
        seconds = sum(e.train_s for e in self.epochs)
        images = sum((e.images_per_s or 0.0) * e.train_s for e in self.epochs)
        return images / seconds if seconds > 0 and images > 0 else None

    @property
    def wall_s(self) -> float:
        return self.epochs[-1].wall_s if self.epochs else 0.0

    @property
    def final_gap(self) -> float | None:
        return self.epochs[-1].gap if self.epochs else None

    def line(self) -> str:
        best = f"{self.best_map50_95:.3f}" if self.best_map50_95 is not None else "-"
        speed = f"{self.images_per_s:.1f} img/s" if self.images_per_s else "- img/s"
        return (f"sweep: batch {self.batch} done: mAP50-95 {best}, {speed}, {self.wall_s:.0f} s, "
                f"{self.optimizer} lr0 {self.lr0:.4g} ({self.lr_rule})")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["epochs"] = [{**dataclasses.asdict(e), "gap": e.gap} for e in self.epochs]
        out.update(best_map50_95=self.best_map50_95, images_per_s=self.images_per_s, wall_s=self.wall_s,
                   final_gap=self.final_gap)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepRun:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["epochs"] = tuple(EpochRow.from_dict(e) for e in data.get("epochs", ()))
        values["reasons"] = tuple(data.get("reasons", ()))
        return cls(**values)


@dataclass(frozen=True)
class SweepReport:
    """Every run, the recommendation and its reason, and the gap flag."""

    runs: tuple[SweepRun, ...]
    batches_reason: str
    recommended_batch: int | None
    recommendation: str
    gap_widening: bool
    gap_note: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"recommended_batch": self.recommended_batch, "recommendation": self.recommendation,
                "gap_widening": self.gap_widening, "gap_note": self.gap_note, "batches_reason": self.batches_reason,
                "settings": dict(self.settings), "runs": [r.to_dict() for r in self.runs]}

    def csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for run in self.runs:
            for e in run.epochs:
                values = {"batch": run.batch, **dataclasses.asdict(e), "gap": e.gap}
                writer.writerow(["" if values[c] is None else _cell(values[c]) for c in CSV_COLUMNS])
        return buffer.getvalue()

    def rows(self) -> list[tuple[str, ...]]:
        """One row per run: batch, lr0, best mAP50-95, img/s, wall s, final gap, peak memory."""
        out: list[tuple[str, ...]] = []
        for run in self.runs:
            peaks = [e.peak_memory_bytes for e in run.epochs if e.peak_memory_bytes is not None]
            out.append((str(run.batch), f"{run.optimizer} {run.lr0:.4g}", _fmt(run.best_map50_95, ".3f"),
                        _fmt(run.images_per_s, ".1f"), f"{run.wall_s:.0f}", _fmt(run.final_gap, "+.3f"),
                        f"{max(peaks) / (1 << 30):.2f} GiB" if peaks else "-"))
        return out


def build_report(runs: Sequence[SweepRun], batches_reason: str, settings: Mapping[str, Any]) -> SweepReport:
    """Recommendation and gap flag from the finished runs (in batch order)."""
    batch, sentence = recommend(runs)
    widening, note = gap_trend(runs)
    return SweepReport(runs=tuple(runs), batches_reason=batches_reason, recommended_batch=batch,
                       recommendation=sentence, gap_widening=widening, gap_note=note, settings=settings)


def recommend(runs: Sequence[SweepRun]) -> tuple[int | None, str]:
    """The fastest run within half a mAP point of the best, and why, in one sentence."""
    scored = [r for r in runs if r.best_map50_95 is not None and r.images_per_s]
    if not scored:
        return None, "no recommendation: no run has both a validation mAP and a measured speed"
    best = max(scored, key=lambda r: (r.best_map50_95 or 0.0, r.images_per_s or 0.0))  # a tie: the faster
    top = best.best_map50_95 or 0.0
    close = [r for r in scored if (r.best_map50_95 or 0.0) >= top - MAP_TOLERANCE]
    chosen = max(close, key=lambda r: r.images_per_s or 0.0)
    slowest = min(scored, key=lambda r: r.images_per_s or 0.0)
    speed = (chosen.images_per_s or 0.0) / (slowest.images_per_s or 1.0)
    faster = [r for r in scored if (r.images_per_s or 0.0) > (chosen.images_per_s or 0.0)]
    if chosen is not slowest:
        pace = f"at {speed:.1f}x the speed of {slowest.batch}"
    elif faster:
        losses = ", ".join(f"{r.batch}: -{(top - (r.best_map50_95 or 0.0)) * 100:.1f}" for r in faster)
        pace = f"and every faster batch loses more than {MAP_TOLERANCE * 100:.1f} mAP points ({losses})"
    else:
        pace = "and the fastest"
    if chosen is best:
        return chosen.batch, f"{chosen.batch}: the best mAP50-95 ({top:.3f}) {pace}"
    behind = (top - (chosen.best_map50_95 or 0.0)) * 100
    return chosen.batch, f"{chosen.batch}: within {behind:.1f} mAP points of the best ({best.batch}, {top:.3f}) {pace}"


def equal_loss_gaps(runs: Sequence[SweepRun]) -> tuple[float | None, list[tuple[int, int, float, float | None]]]:
    """Each run's gap at the first epoch its training loss reached the level every run reached (the least-trained
    run's final training loss): (level, [(batch, epoch, gap, val loss)]).

    At a fixed number of epochs a larger batch takes fewer steps, so at the last epoch it is at an earlier stage of
    training, where the validation loss still lags; comparing at equal training loss takes that out.
    """
    done = [r for r in runs if r.epochs and any(e.gap is not None for e in r.epochs)]
    if not done:
        return None, []
    level = max(r.epochs[-1].train_loss for r in done)
    out = []
    for run in done:
        epoch = next(e for e in run.epochs if e.train_loss <= level or e is run.epochs[-1])
        if epoch.gap is not None:
            out.append((run.batch, epoch.epoch, epoch.gap, epoch.val_loss))
    return level, out


def gap_trend(runs: Sequence[SweepRun]) -> tuple[bool, str]:
    """Whether the generalisation gap, compared at equal training loss, widens with the batch; a sentence on it."""
    level, gaps = equal_loss_gaps(runs)
    final = ", ".join(f"{r.batch}: {r.final_gap:+.3f}" for r in runs if r.final_gap is not None)
    if level is None or len(gaps) < 2:
        return False, "gap: too few runs with a validation loss to compare"
    listing = ", ".join(f"{b}: {g:+.3f} (epoch {e})" for b, e, g, _ in gaps)
    first, last = gaps[0][2], gaps[-1][2]
    rising = all(b[2] >= a[2] for a, b in itertools.pairwise(gaps))
    threshold = GAP_WIDENING * abs(gaps[0][3] or 1.0)
    measured = f"gap (val - train loss) at equal training loss {level:.3f}: {listing}; at the last epoch: {final}"
    if rising and last - first > threshold:
        return True, (f"WARNING: the generalisation gap widens with the batch: the large batches fit the training "
                      f"data better than they generalise; {measured}")
    return False, f"the generalisation gap does not widen with the batch; {measured}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cell(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value
