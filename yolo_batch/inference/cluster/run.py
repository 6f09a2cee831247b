"""``infer --cluster``: the driver. Same sources, checks, journal, writers and summary as local ``infer``.

    discover -> model as a .pt (yaml: saved once) -> connect -> plan the actor pool -> runtime choice on a worker
      -> the output folder checked, cleared, its journal read (only images without a result go to the cluster)
      -> Ray Data: decode tasks -> inference actors -> blocks back to the driver, written as they complete

The driver is the only writer: each block's records go through :class:`~yolo_batch.inference.writers.ResultWriter`
(CSV rows, label files and annotated copies first, the journal line last), so a killed driver leaves a journal
that a rerun of the same command completes, and a result that reaches the driver twice (a block run again after
an actor was lost) is dropped, not written twice: every image appears exactly once.

:func:`iter_cluster_inference` is the same run handing each block's results to the caller as
:class:`~yolo_batch.inference.detections.Detections` (``iter_detections(cluster=...)``), with or without files.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from yolo_batch import ultralytics_adapter
from yolo_batch.core.checks import check_class_ids_known
from yolo_batch.core.files import write_json
from yolo_batch.core.models import content_sha256, model_fingerprint
from yolo_batch.core.progress import PLAIN_EVERY_S, NullProgress, ProgressReporter
from yolo_batch.inference.buckets import NO_PADDING, PaddingStats
from yolo_batch.inference.cluster.plan import (
    ClusterConfig,
    ClusterPlan,
    ClusterResources,
    check_cluster_settings,
    plan_cluster,
)
from yolo_batch.inference.cluster.work import ActorReport, Block, WorkSpec
from yolo_batch.inference.config import InferConfig
from yolo_batch.inference.decode import DecodeLimits, DecoderChoice, choose_jpeg_decoder
from yolo_batch.inference.detections import Detections
from yolo_batch.inference.engine import NmsSettings
from yolo_batch.inference.oom_split import OomEvent
from yolo_batch.inference.output import check_output, write_manifest
from yolo_batch.inference.pipeline import Sink
from yolo_batch.inference.runner import jpeg_samples, start_journal
from yolo_batch.inference.runtimes.choice import RuntimeChoice
from yolo_batch.inference.sources import discover, relative_names
from yolo_batch.inference.summary import InferenceSummary
from yolo_batch.inference.throughput import AUTO_MAX_BATCH, ThroughputChoice
from yolo_batch.inference.writers import FailureRecord, ImageRecord, JournalState, OutputFile, ResultWriter

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

    def write(self, block: Block, writer: Sink) -> None:
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
        self.stage_s["collate"] += report.collate_s
        self.padding = self.padding + report.padding
        self.oom_events += report.oom_events
        if self.choice is None and report.choice is not None:
            self.choice = report.choice
        if self.export is None and report.export is not None:
            self.export = report.export

    def busy(self, now: float) -> int:
        return sum(1 for a in self.actors.values() if now - a.last_seen <= BUSY_WINDOW_S)


@dataclass
class ClusterRun:
    """A cluster run ready to start: connected, planned, the runtime chosen, the journal read (resume)."""

    session: Any  # ray_backend.RaySession
    cluster: ClusterConfig
    resources: ClusterResources
    plan: ClusterPlan
    runtime: RuntimeChoice
    spec: WorkSpec
    model: bytes
    names: dict[int, str]
    paths: list[str]
    pending: list[str]
    journal: JournalState
    decoder: DecoderChoice
    skipped: int = 0  # folders discovery could not list (errors.jsonl lines, failures, as in local infer)

    def blocks(self) -> Iterator[Block]:
        blocks: Iterator[Block] = self.session.blocks(self.pending, self.spec, self.plan, self.model)
        return blocks

    def info(self, tally: DriverTally, stream_s: float) -> dict[str, Any]:
        """The summary's ``cluster`` section."""
        return {"engine": self.cluster.engine, "version": self.session.version, "address": self.session.address,
                "requested": self.cluster.to_dict(), "resources": self.resources.to_dict(),
                "plan": self.plan.to_dict(), "per_actor": [a.to_dict(n) for n, a in sorted(tally.actors.items())],
                "duplicates_dropped": tally.duplicates, "stream_s": round(stream_s, 3)}


@contextlib.contextmanager
def open_cluster_run(config: InferConfig, cluster: ClusterConfig, write_files: bool = True,
                     note: Note | None = None) -> Iterator[ClusterRun]:
    """Check, connect, plan and choose; with ``write_files`` the output folder is checked, cleared (``overwrite``),
    its journal read and its manifest written, as local ``infer`` does. Disconnects on exit (a cluster this call
    started is stopped).

    Raises:
        InputError: Ray not installed, bad sources, model or settings, a cluster that cannot be reached or cannot
            hold the pool, or an output folder holding another configuration's results.
    """
    from yolo_batch.inference.cluster import ray_backend

    ray_backend.import_ray()  # one line naming the extra, before any work
    check_cluster_settings(config.device, config.workers, config.streams)
    discovery = discover(config.sources)
    with tempfile.TemporaryDirectory(prefix="yolo-batch-cluster-") as scratch:
        model = ultralytics_adapter.portable_model(config.model, Path(scratch))
        check_class_ids_known(config.classes, len(model.names))
        weights = model_fingerprint(config.model)  # what local infer records, so either may resume the other
        with ray_backend.connect(cluster) as session:
            resources = session.resources()
            plan = plan_cluster(resources, cluster, config.device, config.threads, config.batch.fixed, AUTO_MAX_BATCH)
            runtime = session.resolve_runtime(plan, config.backend, config.precision_request())
            if write_files:
                check_output(config, runtime, weights)
            journal, paths, pending = start_journal(config, discovery, write_files)
            if write_files:
                write_manifest(config, runtime, weights)
            decoder, _ = choose_jpeg_decoder(jpeg_samples(pending))
            if note is not None:
                note(f"ray {session.version}: {resources.nodes} node(s), {resources.cpus:g} CPU, "
                     f"{resources.gpus:g} GPU; {plan.actors} actor(s): {plan.reason}; {runtime.describe()}")
            yield ClusterRun(session=session, cluster=cluster, resources=resources, plan=plan, runtime=runtime,
                             spec=_spec(config, plan, runtime, model, decoder.name), model=model.path.read_bytes(),
                             names=model.names, paths=paths, pending=pending, journal=journal, decoder=decoder,
                             skipped=len(discovery.problems))


def run_cluster_inference(config: InferConfig, cluster: ClusterConfig, progress: ProgressReporter | None = None,
                          on_note: Note | None = None) -> InferenceSummary:
    """Run (or resume) ``config`` on a Ray cluster; the output folder is the same as local ``infer``'s.

    Args:
        progress: images done and failed, as the blocks are written.
        on_note: one-line notes: the actor plan, then images, img/s and actors busy every 10 s.

    Raises:
        InputError: as :func:`open_cluster_run`.
    """
    start = time.perf_counter()
    note = on_note or (lambda _: None)
    with open_cluster_run(config, cluster, write_files=True, note=note) as run:
        tally, stream_s = _stream(run, config, progress or NullProgress(), note)
    plan, resources, runtime = run.plan, run.resources, run.runtime
    summary = InferenceSummary(
        out_dir=str(config.out), images_total=len(run.paths), done_before=len(run.paths) - len(run.pending),
        processed=tally.images, failed=tally.failed + run.skipped, detections=tally.detections,
        wall_s=time.perf_counter() - start, images_per_s=tally.images / stream_s if stream_s else 0.0,
        stage_s=dict(tally.stage_s), batch=tally.choice.batch if tally.choice else config.batch.fixed or 1,
        device=f"{plan.actors} actor(s) on {'GPU' if plan.gpus_per_actor else 'CPU'}", precision=runtime.precision,
        backend=runtime.backend, runtime=runtime.to_dict(), export=tally.export,
        workers=max(int(resources.cpus - plan.actors * plan.cpus_per_actor), 0), threads=int(plan.cpus_per_actor),
        streams=plan.actors, decoder=run.decoder, padding=tally.padding, batch_choice=tally.choice,
        oom_events=tuple(tally.oom_events), journal_dropped_lines=run.journal.dropped_lines,
        cluster=run.info(tally, stream_s))
    write_json(config.out / OutputFile.SUMMARY.value, summary.to_dict())
    return summary


def iter_cluster_inference(config: InferConfig, cluster: ClusterConfig, *, write_files: bool = False,
                           progress: ProgressReporter | None = None) -> Generator[Detections, None, None]:
    """One :class:`Detections` per image, in completion order, from the cluster (``iter_detections(cluster=)``).

    With ``write_files`` the output folder is written as ``infer --cluster`` writes it and images already in its
    journal are skipped (resume). The driver holds one block at a time; stopping early (``break``, ``close()``)
    stops the dataset and disconnects.

    Raises:
        InputError: as :func:`open_cluster_run` (at the first ``next()``).
    """
    with open_cluster_run(config, cluster, write_files=write_files) as run:
        if not run.pending:
            return
        tally = DriverTally()
        if progress is not None:
            progress.start(len(run.pending), len(run.paths) - len(run.pending))
        try:
            with contextlib.ExitStack() as stack:
                files = stack.enter_context(ResultWriter(config.out, config.formats, config.save_annotated,
                                                         relative_names(run.paths))) if write_files else None
                for block in run.blocks():
                    collected = CollectSink(run.names, files)
                    tally.write(block, collected)
                    if progress is not None:
                        progress.update(tally.images, tally.failed)
                    yield from collected.values
        finally:
            if progress is not None:
                progress.stop()


class CollectSink:
    """A block's results as :class:`Detections` values, after the output files when there are any."""

    def __init__(self, names: dict[int, str], files: Sink | None = None) -> None:
        self.names = names
        self.files = files
        self.values: list[Detections] = []

    def write_batch(self, records: Sequence[ImageRecord], images: dict[str, np.ndarray] | None = None) -> None:
        if self.files is not None:
            self.files.write_batch(records, images)
        self.values += [Detections.from_record(record, self.names) for record in records]

    def write_failure(self, failure: FailureRecord) -> None:
        if self.files is not None:
            self.files.write_failure(failure)
        self.values.append(Detections.from_failure(failure, self.names))


def _spec(config: InferConfig, plan: ClusterPlan, runtime: Any, model: Any, jpeg: str) -> WorkSpec:
    return WorkSpec(
        imgsz=config.imgsz, stride=model.stride, limits=DecodeLimits(config.max_file_bytes, config.max_pixels),
        window=config.image_window, jpeg=jpeg, keep_originals=config.save_annotated, runtime=runtime,
        nms=NmsSettings(config.conf, config.iou, config.max_det, config.classes), batch=config.batch.fixed,
        max_batch=plan.rows_per_call, max_latency_ms=config.max_latency_ms, threads=config.threads or 1,
        device=plan.device, use_cache=config.use_cache, model_sha256=content_sha256(model.path))


def _stream(run: ClusterRun, config: InferConfig, progress: ProgressReporter, note: Note
            ) -> tuple[DriverTally, float]:
    """Write the cluster's blocks as they complete; returns the tally and the seconds from submission to the end."""
    tally = DriverTally()
    if not run.pending:
        return tally, 0.0
    start = time.perf_counter()
    last_note = time.monotonic()
    progress.start(len(run.pending), len(run.paths) - len(run.pending))
    try:
        with ResultWriter(config.out, config.formats, config.save_annotated, relative_names(run.paths)) as writer:
            for block in run.blocks():
                tally.write(block, writer)
                progress.update(tally.images, tally.failed)
                now = time.monotonic()
                if now - last_note >= PLAIN_EVERY_S:
                    last_note = now
                    elapsed = time.perf_counter() - start
                    note(f"ray: {tally.images + tally.failed}/{len(run.pending)} images, "
                         f"{tally.images / elapsed:.1f} img/s, actors busy {tally.busy(now)}/{run.plan.actors}")
    finally:
        progress.stop()
    return tally, time.perf_counter() - start
