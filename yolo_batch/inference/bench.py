"""``bench infer``: Ultralytics ``predict`` vs our runner vs the runtime's forward-only ceiling, in one run.

All see the same images, model, image size and device. ``predict`` reads a text file listing the images (a
Python list would make Ultralytics run them as one batch) with ``stream=True, batch=B``; ours is
:func:`run_inference` into a scratch folder; the ceiling is the runtime alone on tensors already letterboxed,
normalised and in the runtime's own input format. Each is warmed up first, and rounds are interleaved so that
background load hits all alike.

With an exported runtime (``--backend openvino`` ...) the run also times Ultralytics ``predict`` on the same
export (the peer a user would pick: the same file, Ultralytics' own pipeline), and the ceiling is that runtime's
forward pass (for OpenVINO the exported IR compiled with our settings, fed float NCHW tensors). A yaml model is
saved once into the scratch folder so that every method runs the same random weights.

Each method's runtime is alive only while that method is timed: the peer's export and the ceiling's runtime are
loaded, warmed up, timed and dropped within their round, as ours is within :func:`run_inference` (the ceiling's
letterboxed inputs are built once). A live ONNX Runtime
session slowed every other ONNX Runtime session in the process by about a fifth even while idle (measured:
19-21 img/s for ours alone, 15 with Ultralytics' session kept alive, 19 again once it was freed), so keeping the
peer's loaded across rounds had timed ours in a slower process than the peer.

Ultralytics sets torch's CPU threads to ``cores - 1`` (at most 8) when its predictor starts; ours runs
one single-threaded inference stream per core. So on CPU predict is also measured with torch using
every core, and the ceiling runs with ours' streams x threads, so that each ratio compares like with like.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from rich.table import Table

from yolo_batch import ultralytics_adapter
from yolo_batch.core.devices import inference_device
from yolo_batch.inference.bench_ceiling import Ceiling
from yolo_batch.inference.config import InferConfig
from yolo_batch.inference.runner import run_inference
from yolo_batch.inference.runtimes.choice import EXTRAS
from yolo_batch.inference.sources import discover

log = logging.getLogger(__name__)

PREDICT = "ultralytics predict"
PREDICT_ALL_CORES = "ultralytics predict (all cores)"
PREDICT_EXPORT = "ultralytics predict (same export)"
OURS = "yolo-batch infer"
OURS_FP32 = "yolo-batch infer (same runtime, fp32)"
CEILING = "forward only (ceiling)"
METHODS = (PREDICT, PREDICT_ALL_CORES, PREDICT_EXPORT, OURS, OURS_FP32, CEILING)
_RATIOS = {  # key -> (denominator method, label)
    "ours_over_predict": (PREDICT, "ours / predict (.pt)"),
    "ours_over_predict_all_cores": (PREDICT_ALL_CORES, "ours / predict (.pt, all cores)"),
    "ours_over_ceiling": (CEILING, "ours / ceiling"),
    "ours_over_ours_fp32": (OURS_FP32, "ours / ours at fp32 (what the lower precision gains)"),
}


Timed = TypeVar("Timed", bound="HasRate")


class HasRate(Protocol):
    @property
    def method(self) -> str: ...

    @property
    def images_per_s(self) -> float: ...


def best_rounds(runs: Sequence[Timed]) -> dict[str, Timed]:
    """Each method's fastest round: with a shared, noisy machine the best round is the least disturbed one."""
    out: dict[str, Timed] = {}
    for run in runs:
        if run.method not in out or run.images_per_s > out[run.method].images_per_s:
            out[run.method] = run
    return out


@dataclass(frozen=True)
class BenchRun:
    """One timed pass of one method."""

    method: str
    round: int
    images: int
    seconds: float
    threads: int
    streams: int = 1

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class InferBenchReport:
    device: str
    model: str
    imgsz: int
    batch: int
    precision: str
    images: int
    runs: tuple[BenchRun, ...]
    backend: str = "torch"
    runtime: str = ""  # the runtime and why it was chosen

    def best(self) -> dict[str, BenchRun]:
        return best_rounds(self.runs)

    def ratios(self) -> dict[str, float]:
        """Ours over each peer (best rounds). ``ours_over_predict_same_backend`` is predict on the same export for
        an exported runtime (on the .pt for torch); ``ours_over_backend_ceiling`` is over that runtime's own
        forward pass."""
        best = self.best()
        ours = best.get(OURS)
        out: dict[str, float] = {}
        if ours is None:
            return out
        same = PREDICT_EXPORT if self.backend != "torch" else PREDICT
        peers = {**{k: m for k, (m, _) in _RATIOS.items()}, "ours_over_predict_same_backend": same,
                 "ours_over_backend_ceiling": CEILING}
        for key, method in peers.items():
            if method in best and best[method].images_per_s > 0:
                out[key] = ours.images_per_s / best[method].images_per_s
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "model": self.model, "imgsz": self.imgsz, "batch": self.batch,
                "precision": self.precision, "backend": self.backend, "runtime": self.runtime, "images": self.images,
                "images_per_s": {m: round(r.images_per_s, 2) for m, r in self.best().items()},
                "threads": {m: r.threads for m, r in self.best().items()},
                "ratios": {k: round(v, 3) for k, v in self.ratios().items()},
                "runs": [{**dataclasses.asdict(r), "images_per_s": round(r.images_per_s, 2)} for r in self.runs]}

    def table(self) -> Table:
        table = Table(title=f"bench infer: {self.model}, {self.images} images, imgsz {self.imgsz}, batch {self.batch}, "
                            f"{self.backend} {self.precision}, {self.device}", title_justify="left")
        for column in ("method", "img/s (best)", "seconds", "streams x threads", "rounds (img/s)"):
            table.add_column(column, justify="right")
        best = self.best()
        for method in METHODS:
            if method not in best:
                continue
            rounds = ", ".join(f"{r.images_per_s:.1f}" for r in self.runs if r.method == method)
            table.add_row(method, f"{best[method].images_per_s:.2f}", f"{best[method].seconds:.2f}",
                          f"{best[method].streams} x {best[method].threads}", rounds)
        labels = {k: label for k, (_, label) in _RATIOS.items()}
        labels["ours_over_predict_same_backend"] = ("ours / predict (same export)" if self.backend != "torch"
                                                    else "ours / predict (same backend)")
        labels["ours_over_backend_ceiling"] = f"ours / {self.backend} forward only"
        for name, value in self.ratios().items():
            if self.backend == "torch" and name in {"ours_over_predict_same_backend", "ours_over_backend_ceiling"}:
                continue  # the same figures as the rows above
            table.add_row(labels[name], f"{value:.2f}x", "", "", "")
        return table


def run_infer_bench(config: InferConfig, repeats: int = 1) -> InferBenchReport:
    """Measure every method ``repeats`` times each, interleaved.

    Raises:
        InputError: bad sources, model or device; ``--batch auto`` (the benchmark needs one fixed batch); a
            runtime or precision that cannot run here.
    """
    import torch

    from yolo_batch.errors import InputError

    if config.batch.is_auto or config.batch.fixed is None:
        raise InputError("bench infer needs a fixed --batch N")
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    batch = config.batch.fixed
    paths = list(discover(config.sources).paths)
    device, _ = inference_device(config.device, None)  # the precision is the runtime choice's
    saved_threads = torch.get_num_threads()
    runs: list[BenchRun] = []
    try:
        with tempfile.TemporaryDirectory(prefix="yolo-batch-bench-") as scratch:
            config = _same_weights(config, Path(scratch))
            warm = run_inference(dataclasses.replace(config, sources=tuple(paths[:batch]),
                                                     out=Path(scratch) / "warm", overwrite=True))
            threads, streams = warm.threads, warm.streams
            ours_config = dataclasses.replace(config, out=Path(scratch) / "ours", overwrite=True)
            peers = _Peers(config, device, warm, paths, batch, Path(scratch))
            ceiling = Ceiling(config, device, warm, paths, batch, streams, threads)
            # A lower precision is also timed against the same runtime at fp32 (the precision target's peer).
            fp32_config = None if warm.precision == "fp32" else dataclasses.replace(
                ours_config, out=Path(scratch) / "ours-fp32", backend=warm.backend, precision="fp32")
            for round_ in range(repeats):
                runs += peers.time(round_)
                runs.append(_timed(OURS, round_, run_inference(ours_config)))
                if fp32_config is not None:
                    runs.append(_timed(OURS_FP32, round_, run_inference(fp32_config)))
                torch.set_num_threads(threads)
                runs.append(BenchRun(CEILING, round_, ceiling.images, ceiling.time(), threads, streams))
    finally:
        torch.set_num_threads(saved_threads)
    return InferBenchReport(device=_device_name(device), model=config.model, imgsz=config.imgsz, batch=batch,
                            precision=warm.precision, images=len(paths), runs=tuple(runs), backend=warm.backend,
                            runtime=f"{warm.backend} {warm.runtime.get('version', '')}: "
                                    f"{warm.runtime.get('reason', '')}")


def _timed(method: str, round_: int, summary: Any) -> BenchRun:
    seconds = summary.processed / summary.images_per_s if summary.images_per_s else 0.0
    return BenchRun(method, round_, summary.processed, seconds, summary.threads, summary.streams)


def _same_weights(config: InferConfig, scratch: Path) -> InferConfig:
    """A yaml model saved once as a .pt (every method then runs the same random weights), its exports kept in
    ``scratch`` instead of the user's cache."""
    if Path(config.model).suffix == ".pt":
        return config
    saved = scratch / (Path(config.model).stem + ".pt")
    ultralytics_adapter.load_model(config.model).save(str(saved))
    return dataclasses.replace(config, model=str(saved), export_cache=scratch / "exports")


class _Peers:
    """Ultralytics predict on the .pt (torch) and, for an exported runtime, on the same export."""

    def __init__(self, config: InferConfig, device: Any, warm: Any, paths: Sequence[str], batch: int,
                 scratch: Path) -> None:
        import torch

        self.device, self.expected = device, len(paths)
        self.listing = scratch / "images.txt"
        self.listing.write_text("".join(p + "\n" for p in paths))
        self.warmup = scratch / "warmup.txt"
        self.warmup.write_text("".join(p + "\n" for p in paths[:batch]))
        half = warm.precision == "fp16"
        self.args = {"imgsz": config.imgsz, "conf": config.conf, "iou": config.iou, "max_det": config.max_det,
                     "classes": list(config.classes) if config.classes else None, "batch": batch,
                     "device": "cpu" if device.type == "cpu" else str(device.index or 0), "verbose": False,
                     "save": False, "quantize": 16 if half else None}
        self.extra = EXTRAS.get(warm.backend)
        self.pt = ultralytics_adapter.load_model(config.model)
        self._run(self.pt, self.warmup)  # sets up the predictor (and its thread count)
        self.threads = torch.get_num_threads()
        self.export = Path(warm.export["artefact"]) if warm.export is not None else None

    def _run(self, yolo: Any, listing: Path) -> int:
        return sum(1 for _ in ultralytics_adapter.predict_stream(yolo, str(listing), self.extra, **self.args))

    def time(self, round_: int) -> list[BenchRun]:
        cores = os.cpu_count() or 1
        out = [self._timed(PREDICT, self.pt, self.threads, round_)]
        if self.device.type == "cpu" and self.threads != cores:
            out.append(self._timed(PREDICT_ALL_CORES, self.pt, cores, round_))
        if self.export is not None:
            export = ultralytics_adapter.load_export(self.export, self.extra)
            self._run(export, self.warmup)  # its session and predictor, set up outside the timing
            out.append(self._timed(PREDICT_EXPORT, export, self.threads, round_))
            del export  # its runtime must not outlive its timing (module docstring)
            gc.collect()
        return out

    def _timed(self, method: str, yolo: Any, threads: int, round_: int) -> BenchRun:
        import torch

        torch.set_num_threads(threads)
        start = time.perf_counter()
        count = self._run(yolo, self.listing)
        seconds = time.perf_counter() - start
        if count != self.expected:
            log.warning("%s returned %d results for %d images", method, count, self.expected)
        return BenchRun(method, round_, count, seconds, threads)


def _device_name(device: Any) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
