"""``infer --cluster``: the driver. Same sources, checks, journal, writers and summary as local ``infer``.

    discover -> model as a .pt (yaml: saved once) -> connect -> plan the actor pool -> runtime choice on a worker
      -> the output folder checked, cleared, its journal read (only images without a result go to the cluster)
      -> Ray Data: decode tasks -> inference actors -> blocks back to the driver, written as they complete

The driver is the only writer: each block's records go through :class:`~yolo_batch.inference.writers.ResultWriter`
(CSV rows, label files and annotated copies first, the journal line last), so a killed driver leaves a journal
that a rerun of the same command completes, and a result that reaches the driver twice (a block run again after
an actor was lost) is dropped, not written twice: every image appears exactly once.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolo_batch import ultralytics_adapter
from yolo_batch.core.files import sha256_file, write_json
from yolo_batch.core.progress import PLAIN_EVERY_S, NullProgress, ProgressReporter
from yolo_batch.inference.buckets import NO_PADDING, PaddingStats
from yolo_batch.inference.cluster.plan import ClusterConfig, ClusterPlan, check_cluster_device, plan_cluster
from yolo_batch.inference.cluster.work import ActorReport, Block, WorkSpec
from yolo_batch.inference.config import InferConfig
from yolo_batch.inference.decode import DecodeLimits, choose_jpeg_decoder
from yolo_batch.inference.engine import NmsSettings
from yolo_batch.inference.oom_split import OomEvent
from yolo_batch.inference.runner import check_output, clear_output, jpeg_samples, resume_journal, write_manifest
from yolo_batch.inference.sources import discover, relative_names
from yolo_batch.inference.summary import InferenceSummary
from yolo_batch.inference.throughput import AUTO_MAX_BATCH, ThroughputChoice
from yolo_batch.inference.writers import FailureRecord, ImageRecord, OutputFile, ResultWriter

Note = Callable[[str], None]
BUSY_WINDOW_S = PLAIN_EVERY_S  # an actor that returned a block within this many seconds counts as busy


@dataclass
class ActorTally:
    """One actor's blocks, summed."""

    images: int = 0
    failed: int = 0
    seconds: float = 0.0
    batch: int = 0
    last_seen: float = 0.0

    def to_dict(self, actor: str) -> dict[str, Any]:
        return {"actor": actor, "images": self.images, "failed": self.failed, "busy_s": round(self.seconds, 3),
                "images_per_s": round(self.images / self.seconds, 2) if self.seconds else 0.0, "batch": self.batch}


@dataclass
class DriverTally:
    """What the driver wrote, and what the actors reported (single-threaded: the driver's loop)."""

    seen: set[str] = field(default_factory=set)
    images: int = 0
    failed: int = 0
    detections: int = 0
    duplicates: int = 0  # results that reached the driver a second time (a block run again): dropped
    stage_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("decode", "letterbox", "collate", "inference", "write"), 0.0))
    padding: PaddingStats = NO_PADDING
    oom_events: list[OomEvent] = field(default_factory=list)
    choice: ThroughputChoice | None = None
    export: dict[str, Any] | None = None
    actors: dict[str, ActorTally] = field(default_factory=dict)

    def write(self, block: Block, writer: ResultWriter) -> None:
        """Write a block's new results (failures, then records with the journal line last); count them."""
        start = time.perf_counter()
        records: list[ImageRecord] = []
        originals: dict[str, Any] = {}
        for result, original in zip(block["result"], block["original"]):
            if result.path in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(result.path)
            if isinstance(result, FailureRecord):
                writer.write_failure(result)
                self.failed += 1
                continue
            records.append(result)
            if original is not None:
                originals[result.path] = original
        if records:
            writer.write_batch(records, originals or None)
        self.stage_s["write"] += time.perf_counter() - start
        self.images += len(records)
        self.detections += sum(len(r.detections) for r in records)
        for record in records:
            self.stage_s["decode"] += record.timing_ms.get("decode", 0.0) / 1e3
            self.stage_s["letterbox"] += record.timing_ms.get("letterbox", 0.0) / 1e3
        for report in block["report"]:
            if report is not None:
                self.add_report(report)

    def add_report(self, report: ActorReport) -> None:
        actor = self.actors.setdefault(report.actor, ActorTally())
        actor.images += report.images
        actor.failed += report.failed
        actor.seconds += report.seconds
        actor.batch = report.batch
        actor.last_seen = time.monotonic()
        self.stage_s["inference"] += report.seconds
        self.padding = self.padding + report.padding
        self.oom_events += report.oom_events
        if self.choice is None and report.choice is not None:
            self.choice = report.choice
        if self.export is None and report.export is not None:
            self.export = report.export

    def busy(self, now: float) -> int:
        return sum(1 for a in self.actors.values() if now - a.last_seen <= BUSY_WINDOW_S)


def run_cluster_inference(config: InferConfig, cluster: ClusterConfig, progress: ProgressReporter | None = None,
                          on_note: Note | None = None) -> InferenceSummary:
    """Run (or resume) ``config`` on a Ray cluster; the output folder is the same as local ``infer``'s.

    Args:
        progress: images done and failed, as the blocks are written.
        on_note: one-line notes: the actor plan, then images, img/s and actors busy every 10 s.

    Raises:
        InputError: Ray not installed, bad sources, model or settings, a cluster that cannot be reached or cannot
            hold the pool, or an output folder holding another configuration's results.
    """
    from yolo_batch.inference.cluster import ray_backend

    start = time.perf_counter()
    ray_backend.import_ray()  # one line naming the extra, before any work
    check_cluster_device(config.device)
    discovery = discover(config.sources)
    note = on_note or (lambda _: None)
    with tempfile.TemporaryDirectory(prefix="yolo-batch-cluster-") as scratch:
        model = ultralytics_adapter.portable_model(config.model, Path(scratch))
        with ray_backend.connect(cluster) as session:
            resources = session.resources()
            plan = plan_cluster(resources, cluster, config.device, config.threads, config.batch.fixed, AUTO_MAX_BATCH)
            runtime = session.resolve_runtime(plan, config.backend, config.precision_request())
            check_output(config, runtime)
            clear_output(config)
            journal, paths, pending = resume_journal(config, discovery.paths)
            decoder, _ = choose_jpeg_decoder(jpeg_samples(pending))
            spec = _spec(config, plan, runtime, model, decoder.name)
            write_manifest(config, runtime)
            note(f"ray {session.version}: {resources.nodes} node(s), {resources.cpus:g} CPU, "
                 f"{resources.gpus:g} GPU; {plan.actors} actor(s): {plan.reason}; {runtime.describe()}")
            tally, stream_s = _stream(session, pending, paths, spec, plan, model.path.read_bytes(), config,
                                      progress or NullProgress(), note)
    cluster_info = {"engine": cluster.engine, "version": session.version, "address": session.address,
                    "requested": cluster.to_dict(), "resources": resources.to_dict(), "plan": plan.to_dict(),
                    "per_actor": [a.to_dict(name) for name, a in sorted(tally.actors.items())],
                    "duplicates_dropped": tally.duplicates, "stream_s": round(stream_s, 3)}
    summary = InferenceSummary(
        out_dir=str(config.out), images_total=len(paths), done_before=len(paths) - len(pending),
        processed=tally.images, failed=tally.failed, detections=tally.detections,
        wall_s=time.perf_counter() - start, images_per_s=tally.images / stream_s if stream_s else 0.0,
        stage_s=dict(tally.stage_s), batch=tally.choice.batch if tally.choice else config.batch.fixed or 1,
        device=f"{plan.actors} actor(s) on {'GPU' if plan.gpus_per_actor else 'CPU'}", precision=runtime.precision,
        backend=runtime.backend, runtime=runtime.to_dict(), export=tally.export,
        workers=max(int(resources.cpus - plan.actors * plan.cpus_per_actor), 0), threads=int(plan.cpus_per_actor),
        streams=plan.actors, decoder=decoder, padding=tally.padding, batch_choice=tally.choice,
        oom_events=tuple(tally.oom_events), journal_dropped_lines=journal.dropped_lines, cluster=cluster_info)
    write_json(config.out / OutputFile.SUMMARY.value, summary.to_dict())
    return summary


def _spec(config: InferConfig, plan: ClusterPlan, runtime: Any, model: Any, jpeg: str) -> WorkSpec:
    return WorkSpec(
        imgsz=config.imgsz, stride=model.stride, limits=DecodeLimits(config.max_file_bytes, config.max_pixels),
        window=config.image_window, jpeg=jpeg, keep_originals=config.save_annotated, runtime=runtime,
        nms=NmsSettings(config.conf, config.iou, config.max_det, config.classes), batch=config.batch.fixed,
        max_batch=plan.rows_per_call, max_latency_ms=config.max_latency_ms, threads=config.threads or 1,
        device=plan.device, use_cache=config.use_cache, model_sha256=sha256_file(model.path))


def _stream(session: Any, pending: Sequence[str], paths: Sequence[str], spec: WorkSpec, plan: ClusterPlan, model: bytes,
            config: InferConfig, progress: ProgressReporter, note: Note) -> tuple[DriverTally, float]:
    """Write the cluster's blocks as they complete; returns the tally and the seconds from submission to the end."""
    tally = DriverTally()
    if not pending:
        return tally, 0.0
    start = time.perf_counter()
    last_note = time.monotonic()
    progress.start(len(pending), len(paths) - len(pending))
    try:
        with ResultWriter(config.out, config.formats, config.save_annotated, relative_names(paths)) as writer:
            for block in session.blocks(pending, spec, plan, model):
                tally.write(block, writer)
                progress.update(tally.images, tally.failed)
                now = time.monotonic()
                if now - last_note >= PLAIN_EVERY_S:
                    last_note = now
                    elapsed = time.perf_counter() - start
                    note(f"ray: {tally.images + tally.failed}/{len(pending)} images, "
                         f"{tally.images / elapsed:.1f} img/s, actors busy {tally.busy(now)}/{plan.actors}")
    finally:
        progress.stop()
    return tally, time.perf_counter() - start
