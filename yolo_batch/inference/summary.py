"""What an inference run did: :class:`InferenceSummary`, printed as tables and saved as summary.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table

from yolo_batch.inference.buckets import NO_PADDING, PaddingStats
from yolo_batch.inference.decode import DecoderChoice
from yolo_batch.inference.oom_split import OomEvent
from yolo_batch.inference.throughput import ThroughputChoice

_STAGES = ("decode", "letterbox", "collate", "inference", "write")


@dataclass(frozen=True)
class InferenceSummary:
    """What a run did; ``exit_code`` is 0 when every image has a result, 3 when some files failed."""

    out_dir: str
    images_total: int
    done_before: int
    processed: int
    failed: int
    detections: int
    wall_s: float
    images_per_s: float
    stage_s: dict[str, float]
    batch: int
    device: str
    precision: str
    workers: int
    threads: int
    streams: int
    decoder: DecoderChoice
    padding: PaddingStats = NO_PADDING
    batch_choice: ThroughputChoice | None = None
    oom_events: tuple[OomEvent, ...] = ()
    journal_dropped_lines: int = 0
    pipeline: dict[str, Any] = field(default_factory=dict)
    throughput_plot: str | None = None  # --batch auto: the measurements as a picture
    backend: str = "torch"
    runtime: dict[str, Any] = field(default_factory=dict)  # the RuntimeChoice: what was asked, chosen, and why
    export: dict[str, Any] | None = None  # the ExportRecord of an exported runtime
    cluster: dict[str, Any] | None = None  # --cluster: the cluster, the actor plan and each actor's throughput

    @property
    def exit_code(self) -> int:
        return 3 if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir, "images_total": self.images_total, "done_before": self.done_before,
            "processed": self.processed, "failed": self.failed, "detections": self.detections,
            "wall_s": round(self.wall_s, 3), "images_per_s": round(self.images_per_s, 2),
            "stage_s": {k: round(v, 3) for k, v in self.stage_s.items()}, "batch": self.batch,
            "device": self.device, "precision": self.precision, "backend": self.backend, "runtime": self.runtime,
            "export": self.export, "workers": self.workers, "threads": self.threads,
            "streams": self.streams,
            "decoder": self.decoder.to_dict(), "padding": self.padding.to_dict(),
            "batch_choice": self.batch_choice.to_dict() if self.batch_choice else None,
            "oom_events": [e.to_dict() for e in self.oom_events],
            "journal_dropped_lines": self.journal_dropped_lines, "pipeline": self.pipeline,
            "throughput_plot": self.throughput_plot, "exit_code": self.exit_code,
            **({"cluster": self.cluster} if self.cluster is not None else {}),
        }

    def _batch_text(self) -> str:
        if self.batch_choice is None:
            return str(self.batch)
        plotted = f", plotted in {self.throughput_plot}" if self.throughput_plot else ""
        return f"{self.batch} (auto{plotted})"

    def table(self) -> Group:
        """The final table: totals, throughput and per-stage time."""
        main = Table(title=f"yolo-batch infer -> {self.out_dir}", title_justify="left", show_header=False)
        main.add_column("field", style="bold")
        main.add_column("value")
        rows = [
            ("images done", f"{self.processed} this run, {self.done_before} before (of {self.images_total})"),
            ("failed", f"{self.failed}" + (" (see errors.jsonl)" if self.failed else "")),
            ("detections", str(self.detections)),
            ("wall time", f"{self.wall_s:.2f} s"),
            ("throughput", f"{self.images_per_s:.1f} img/s"),
            ("batch", self._batch_text()),
            ("device", f"{self.device}, {self.precision}"),
            ("runtime", f"{self.backend} {self.runtime.get('version', '')}, {self.precision}"
                        + (f" ({self.runtime['reason']})" if self.runtime.get("reason") else "")),
            ("threads", f"{self.workers} decode, {self.streams} inference stream(s) x {self.threads} torch thread(s)"),
            ("decoder", self.decoder.name),
            ("padding", f"{self.padding.padding_fraction:.1%} of model input (square imgsz would be "
                        f"{self.padding.square_padding_fraction:.1%})"),
        ]
        rows += [("out of memory", f"batch {e.batch} -> {e.new_batch}") for e in self.oom_events]
        if self.export:
            rows.append(("export", _describe_export(self.export)))
        if self.cluster is not None:
            rows += _cluster_rows(self.cluster)
        for name, value in rows:
            main.add_row(name, value)
        stages = Table(title="Per-stage time (threads summed)", title_justify="left")
        for column in ("stage", "seconds", "ms/image"):
            stages.add_column(column, justify="right")
        for stage in _STAGES:
            seconds = self.stage_s.get(stage, 0.0)
            per = seconds * 1e3 / self.processed if self.processed else 0.0
            stages.add_row(stage, f"{seconds:.2f}", f"{per:.1f}")
        return Group(main, stages)


def _describe_export(export: dict[str, Any]) -> str:
    if export["hit"]:
        return f"cached: {export['location']}"
    where = export["location"] if export["cached"] else export["note"]
    return f"exported in {export['seconds']:.1f} s: {where}"


def _cluster_rows(cluster: dict[str, Any]) -> list[tuple[str, str]]:
    """The --cluster rows: the cluster, the actor pool and each actor's own throughput."""
    size = cluster["resources"]
    rows = [("cluster", f"{cluster['engine']} {cluster['version']}: {size['nodes']} node(s), {size['cpus']:g} CPU, "
                        f"{size['gpus']:g} GPU"),
            ("actors", f"{cluster['plan']['actors']} x ({cluster['plan']['cpus_per_actor']:g} CPU, "
                       f"{cluster['plan']['gpus_per_actor']:g} GPU): {cluster['plan']['reason']}")]
    for actor in cluster["per_actor"]:
        rows.append((f"  actor {actor['actor']}", f"{actor['images']} images, {actor['images_per_s']:.1f} img/s "
                                                  f"while busy, batch {actor['batch']}"))
    return rows
