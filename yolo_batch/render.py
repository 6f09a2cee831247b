"""Decisions as rich tables for a terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.table import Table

from yolo_batch.training.decision import AutoBatchDecision

if TYPE_CHECKING:
    from yolo_batch.profiles import Profile
    from yolo_batch.training.advise import Advice
    from yolo_batch.training.run import TrainResult
    from yolo_batch.training.sweep_report import SweepReport


def decision_table(decision: AutoBatchDecision) -> Group:
    """The decision summary, followed by the probe table when probes ran."""
    summary = Table(title="AutoBatch decision", show_header=False, title_justify="left")
    summary.add_column("field", style="bold")
    summary.add_column("value", overflow="fold")
    for name, value in decision.summary_rows():
        summary.add_row(name, value)
    parts: list[Table] = [summary]
    if decision.probes:
        probes = Table(title="Probes (real training steps)", title_justify="left")
        for column in ("batch", "train peak", "val batch", "val peak", "outcome", "seconds"):
            probes.add_column(column, justify="right")
        for row in decision.probe_rows():
            probes.add_row(*row)
        parts.append(probes)
    return Group(*parts)


def print_decision(decision: AutoBatchDecision, console: Console | None = None) -> None:
    (console or Console()).print(decision_table(decision))


def profiles_table(profiles: Sequence[Profile]) -> Group:
    """Every setting of every profile side by side (blank: Ultralytics' own default), then what each is for."""
    table = Table(title="Profiles (yolo-batch profiles show NAME prints one as YAML)", title_justify="left")
    table.add_column("setting", style="bold")
    for profile in profiles:
        table.add_column(profile.name)
    settings = [p.settings() for p in profiles]
    keys = list(dict.fromkeys(key for rows in settings for key in rows))
    keys.sort(key=lambda k: (k.startswith("infer."), k.startswith("train.args.")))  # stable: sections in order
    for key in keys:
        table.add_row(key, *(rows.get(key, "") for rows in settings))
    about = Table(show_header=False, box=None, padding=(0, 1))
    about.add_column("name", style="bold")
    about.add_column("description", overflow="fold")
    for profile in profiles:
        about.add_row(profile.name, profile.description)
    return Group(table, about)


def train_result_lines(result: TrainResult) -> list[str]:
    """Where a training run put things, and its final mAP: the lines ``train`` (and the demo) end with."""
    lines = [f"run folder: {result.save_dir}", f"decision:   {result.decision_path}"]
    if result.decision_plot is not None:
        lines.append(f"plot:       {result.decision_plot}")
    if result.weights is not None:
        lines.append(f"weights:    {result.weights}")
    lines.append(result.metrics_line())
    return lines


def print_train_result(result: TrainResult, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    for line in train_result_lines(result):
        console.print(line, markup=False, soft_wrap=True)


def print_sweep(report: SweepReport, console: Console | None = None) -> None:
    """One row per run of a sweep (stderr keeps stdout for the closing lines)."""
    table = Table(title=f"Sweep ({report.batches_reason})", title_justify="left")
    for column in ("batch", "optimizer lr0", "best mAP50-95", "img/s", "wall s", "gap (last)", "peak memory"):
        table.add_column(column, justify="right")
    for row in report.rows():
        table.add_row(*row)
    (console or Console(stderr=True)).print(table)


def print_advice(advice: Advice, console: Console | None = None) -> None:
    table = Table(title="Batch advice", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in advice.rows():
        table.add_row(name, value)
    (console or Console(stderr=True)).print(table)
