"""Decisions as rich tables for a terminal."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table

from yolo_batch.decision import AutoBatchDecision


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
