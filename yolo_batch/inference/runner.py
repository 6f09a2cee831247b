"""``run_inference``: discover, resume, load, choose decoder and batch, run the pipeline, summarise."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yolo_batch.core.checks import check_class_ids_known, check_imgsz_fits
from yolo_batch.core.devices import available_host_bytes, inference_device, torch_threads
from yolo_batch.core.files import append_lines, open_regular, write_json
from yolo_batch.core.models import model_fingerprint
from yolo_batch.core.progress import NullProgress, ProgressReporter
from yolo_batch.errors import InputError
from yolo_batch.inference.buckets import NO_PADDING
from yolo_batch.inference.config import InferConfig, OutputFormat, default_workers
from yolo_batch.inference.decode import (
    DecodeError,
    DecodeLimits,
    DecoderChoice,
    ImageReader,
    choose_jpeg_decoder,
)
from yolo_batch.inference.engine import Engine, NmsSettings
from yolo_batch.inference.headers import sniff_format
from yolo_batch.inference.letterbox import Letterbox
from yolo_batch.inference.oom_split import BatchSize
from yolo_batch.inference.output import check_output, clear_output, write_manifest
from yolo_batch.inference.pipeline import Pipeline, Sink
from yolo_batch.inference.runtimes.choice import RuntimeChoice
from yolo_batch.inference.runtimes.loader import resolve_runtime
from yolo_batch.inference.sources import Discovery, discover, relative_names
from yolo_batch.inference.summary import InferenceSummary
from yolo_batch.inference.throughput import (
    AUTO_MAX_BATCH,
    AUTO_SAMPLES,
    ThroughputChoice,
    measure_prepared,
)
from yolo_batch.inference.writers import (
    JournalState,
    OutputFile,
    ResultWriter,
    read_journal,
    repair_csv,
)

log = logging.getLogger(__name__)

_DECODER_SAMPLES = 8
THROUGHPUT_PLOT = "throughput.png"  # --batch auto: the measurements, beside summary.json
# Host or device bytes one image needs in yolo11n's forward pass, per input pixel (imgsz^2), measured on CPU
# (peak RSS over the loaded model, batch 1, fp32: see docs/benchmarks.md). Larger models need more, so
# the bound it gives is the least a run needs: enough to refuse --imgsz 99968 before it exhausts memory.
FORWARD_BYTES_PER_PIXEL = 100


@dataclass
class OpenRun:
    """A run ready to start: sources found, model loaded and warmed up, decoder and batch chosen.

    Made by :func:`open_run` for :func:`run_inference` (files) and :func:`yolo_batch.inference.stream.iter_inference`
    (results handed to the caller), so both run the same set-up and the same pipeline.
    """

    config: InferConfig
    engine: Engine
    reader: ImageReader
    device: Any
    paths: list[str]  # every image of the sources (our own annotated copies excluded)
    pending: list[str]  # those without a result in the output folder's journal
    journal: JournalState
    workers: int
    threads: int
    streams: int
    decoder: DecoderChoice
    batch_size: BatchSize
    choice: ThroughputChoice | None
    throughput_plot: Path | None
    runtime: RuntimeChoice
    skipped: int = 0  # folders that could not be listed (errors.jsonl lines written before the run)

    def pipeline(self, sink: Sink, on_progress: Callable[[int, int], None] | None = None,
                 keep_originals: bool | None = None) -> Pipeline:
        """The pipeline over this run's engine, reader and batch, writing into ``sink`` (decoded images carried
        along for annotated copies when ``keep_originals``, by default when the config saves them)."""
        keep = self.config.save_annotated if keep_originals is None else keep_originals
        return Pipeline(self.engine, self.reader.read, sink, self.batch_size, self.workers, self.config.imgsz,
                        keep_originals=keep, on_progress=on_progress, streams=self.streams)


@contextlib.contextmanager
def open_run(config: InferConfig, write_files: bool = True,
             on_batch_choice: Callable[[ThroughputChoice], None] | None = None) -> Iterator[OpenRun]:
    """Discover, load, warm up and choose; the engine's memory and torch's thread count are restored on exit.

    With ``write_files`` the output folder is checked, cleared (``overwrite``), its journal read (resume) and its
    manifest written; with ``--batch auto`` the measurements are plotted there as ``throughput.png``. Without,
    nothing is written and every image is pending.

    Raises:
        InputError: bad sources, model, device, or an output folder holding another configuration's results.
    """
    from yolo_batch.ultralytics_adapter import check_model_spec

    discovery = discover(config.sources)  # before touching --out: bad sources must not create folders
    check_model_spec(config.model)
    device, _ = inference_device(config.device, None)  # the precision is the runtime choice's
    check_memory_for_imgsz(config.imgsz, device)
    runtime = resolve_runtime(config.backend, config.precision_request(), device)
    weights = model_fingerprint(config.model)
    if write_files:
        check_output(config, runtime, weights)
    on_gpu = device.type == "cuda"
    threads, streams = cpu_parallelism(config, on_gpu)
    engine = _open_engine(config, device, runtime, threads, streams)
    try:
        check_class_ids_known(config.classes, len(engine.names))
    except InputError:
        engine.release()
        raise
    journal, paths, pending = start_journal(config, discovery, write_files)
    try:
        with torch_threads(threads if not on_gpu or config.threads is not None else None):
            decoder, jpeg = choose_jpeg_decoder(jpeg_samples(pending))
            reader = ImageReader(DecodeLimits(config.max_file_bytes, config.max_pixels), jpeg, config.image_window)
            if pending:
                _warmup(engine, reader, pending[0])
            choice = _auto_batch(engine, reader, pending, config, device) if config.batch.is_auto else None
            plot = _plot(choice, config.out / THROUGHPUT_PLOT) if choice is not None and write_files else None
            if choice is not None and on_batch_choice is not None:
                on_batch_choice(choice)
            if write_files:
                write_manifest(config, runtime, weights)
            yield OpenRun(config=config, engine=engine, reader=reader, device=device, paths=paths, pending=pending,
                          journal=journal, workers=config.workers or default_workers(on_gpu=on_gpu),
                          threads=threads, streams=streams, decoder=decoder,
                          batch_size=BatchSize(choice.batch if choice else config.batch.fixed or 1), choice=choice,
                          throughput_plot=plot, runtime=runtime, skipped=len(discovery.problems))
    finally:
        engine.release()


def run_inference(config: InferConfig, progress: ProgressReporter | None = None,
                  on_batch_choice: Callable[[ThroughputChoice], None] | None = None) -> InferenceSummary:
    """Run (or resume) ``config``; see the module docstring of :mod:`yolo_batch.inference`.

    With ``--batch auto`` the measurements are plotted as ``throughput.png`` in the output folder.

    Raises:
        InputError: bad sources, model, device, or an output folder holding another configuration's results.
    """
    start = time.perf_counter()
    progress = progress or NullProgress()
    with open_run(config, write_files=True, on_batch_choice=on_batch_choice) as run:
        stats = None
        if run.pending:
            progress.start(len(run.pending), len(run.paths) - len(run.pending))
            try:
                with ResultWriter(config.out, config.formats, config.save_annotated,
                                  relative_names(run.paths)) as writer:
                    stats = run.pipeline(writer, on_progress=progress.update).run(run.pending)
            finally:
                progress.stop()
    paths, pending, batch_size = run.paths, run.pending, run.batch_size
    summary = InferenceSummary(
        out_dir=str(config.out), images_total=len(paths), done_before=len(paths) - len(pending),
        processed=stats.images if stats else 0, failed=(stats.failed if stats else 0) + run.skipped,
        detections=stats.detections if stats else 0, wall_s=time.perf_counter() - start,
        images_per_s=stats.images / stats.wall_s if stats and stats.wall_s else 0.0,
        stage_s=dict(stats.stage_s) if stats else {}, batch=batch_size(), device=str(run.device),
        precision=run.engine.precision, backend=run.engine.backend, runtime=run.runtime.to_dict(),
        export=run.engine.export.to_dict() if run.engine.export else None,
        workers=run.workers, threads=run.threads, streams=run.streams,
        decoder=run.decoder, padding=stats.padding if stats else NO_PADDING, batch_choice=run.choice,
        oom_events=tuple(batch_size.events), journal_dropped_lines=run.journal.dropped_lines,
        pipeline=stats.to_dict() if stats else {},
        throughput_plot=str(run.throughput_plot) if run.throughput_plot else None,
    )
    write_json(config.out / OutputFile.SUMMARY.value, summary.to_dict())
    return summary


def _plot(choice: ThroughputChoice, path: Path) -> Path:
    from yolo_batch.inference.plots import save_throughput_plot

    return save_throughput_plot(choice, path)


def _open_engine(config: InferConfig, device: Any, choice: RuntimeChoice, threads: int, streams: int) -> Engine:
    """The model on the chosen runtime (exported and cached first where the runtime needs it)."""
    max_batch = config.batch.fixed or AUTO_MAX_BATCH.get(device.type, AUTO_MAX_BATCH["cpu"])
    return Engine.open(config.model, device, choice, config.imgsz,
                       NmsSettings(config.conf, config.iou, config.max_det, config.classes), max_batch=max_batch,
                       streams=streams, threads=threads, use_cache=config.use_cache, on_export=log.warning,
                       cache=config.export_cache)


def start_journal(config: InferConfig, discovery: Discovery, write_files: bool
                  ) -> tuple[JournalState, list[str], list[str]]:
    """(journal, every path, paths still to do) for a run whose sources, model and folder are known to be good.

    With ``write_files`` the folder is created (cleared on ``--overwrite``) and its journal resumed; without, every
    image is pending and the folders discovery could not list are logged (there is no errors.jsonl to hold them).
    """
    if write_files:
        clear_output(config)
        return resume_journal(config, discovery)
    for problem in discovery.problems:
        log.warning("%s: %s, its images are not in this run", problem.path, problem.reason)
    return JournalState(done=frozenset(), detections=0, dropped_lines=0), list(discovery.paths), list(discovery.paths)


def resume_journal(config: InferConfig, discovery: Discovery) -> tuple[JournalState, list[str], list[str]]:
    """Read (and repair) what an earlier run of this folder finished: (journal, every path, paths still to do).

    errors.jsonl starts afresh (earlier failures are retried) with the folders discovery could not list.
    """
    out = config.out
    journal = read_journal(out / OutputFile.RESULTS.value)
    if OutputFormat.CSV in config.formats:
        repair_csv(out / OutputFile.CSV.value, journal.done)
    (out / OutputFile.ERRORS.value).unlink(missing_ok=True)
    if discovery.problems:
        with open(out / OutputFile.ERRORS.value, "a", encoding="utf-8") as handle:
            append_lines(handle, (p.to_dict() for p in discovery.problems))
    own = os.path.abspath(out) + os.sep  # never read our own annotated copies back as inputs
    paths = [p for p in discovery.paths if not p.startswith(own)]
    return journal, paths, [p for p in paths if p not in journal.done]


def check_memory_for_imgsz(imgsz: int, device: Any) -> None:
    """Refuse an --imgsz whose single-image forward pass cannot fit in the device's (or host's) memory now."""
    if device.type == "cuda":
        import torch

        available, where = torch.cuda.mem_get_info(device)[0], f"GPU {device.index or 0}"
    else:
        available, where = available_host_bytes(), "host"
    check_imgsz_fits(imgsz, imgsz * imgsz * FORWARD_BYTES_PER_PIXEL, available, where)


def cpu_parallelism(config: InferConfig, on_gpu: bool) -> tuple[int, int]:
    """(torch threads, inference streams).

    On CPU the default is one single-threaded stream per core: independent forward passes scale better
    than one pass split across cores (yolo11n, 640x480, batch 16 on the 2-core box: 22 vs 20 img/s idle,
    20 vs 11-16 while another process used a core), because a core taken by another process slows one
    stream instead of stalling every parallel region. On a GPU one stream feeds the device.
    """
    import torch

    if on_gpu:
        return config.threads or torch.get_num_threads(), config.streams or 1
    threads = config.threads or 1
    return threads, config.streams or max(1, (os.cpu_count() or 1) // threads)


def _warmup(engine: Engine, reader: ImageReader, path: str) -> None:
    """One untimed forward pass in the first image's shape (cuDNN/oneDNN set-up is not the pipeline's cost)."""
    try:
        shape = engine.prepare(reader.read(path).pixels)[1].out
    except DecodeError:  # the pipeline reports the file; warm up on the square shape instead
        shape = (engine.imgsz, engine.imgsz)
    engine.warmup(shape)


def jpeg_samples(paths: Sequence[str]) -> list[bytes]:
    samples: list[bytes] = []
    for path in paths:
        if len(samples) >= _DECODER_SAMPLES:
            break
        try:
            with open_regular(path) as handle:  # a FIFO would block open() itself
                data = handle.read(64 << 20)
        except OSError:  # the pipeline reports it properly
            continue
        if sniff_format(data) == "jpeg":
            samples.append(data)
    return samples


def _auto_batch(engine: Engine, reader: ImageReader, paths: Sequence[str], config: InferConfig,
                device: Any) -> ThroughputChoice:
    """Measure on the run's own first images, in their most common letterboxed shape."""
    prepared: list[tuple[np.ndarray, Letterbox]] = []
    for path in paths:
        if len(prepared) >= AUTO_SAMPLES:
            break
        try:
            prepared.append(engine.prepare(reader.read(path).pixels))
        except DecodeError:
            continue
    max_batch = AUTO_MAX_BATCH.get(device.type, AUTO_MAX_BATCH["cpu"])
    return measure_prepared(engine, prepared, max_batch, config.max_latency_ms)
