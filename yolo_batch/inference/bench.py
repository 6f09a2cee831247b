"""``bench infer``: Ultralytics ``predict`` vs our runner vs the forward-only ceiling, in one run.

All three see the same images, model, image size, precision and device. ``predict`` reads a text file
listing the images (a Python list would make Ultralytics run them as one batch) with
``stream=True, batch=B``; ours is :func:`run_inference` into a scratch folder; the ceiling is the fused
network alone on tensors already letterboxed, normalised and on the device. Each is warmed up first,
and rounds are interleaved so that background load hits all three alike.

Ultralytics sets torch's CPU threads to ``cores - 1`` (at most 8) when its predictor starts; ours runs
one single-threaded inference stream per core. So on CPU predict is also measured with torch using
every core, and the ceiling runs with ours' streams x threads, so that each ratio compares like with like.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from yolo_batch import ultralytics_adapter
from yolo_batch.core.devices import inference_device
from yolo_batch.inference.config import InferConfig
from yolo_batch.inference.engine import Engine, NmsSettings
from yolo_batch.inference.runner import run_inference
from yolo_batch.inference.sources import discover

log = logging.getLogger(__name__)

PREDICT = "ultralytics predict"
PREDICT_ALL_CORES = "ultralytics predict (all cores)"
OURS = "yolo-batch infer"
CEILING = "forward only (ceiling)"


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

    def best(self) -> dict[str, BenchRun]:
        out: dict[str, BenchRun] = {}
        for run in self.runs:
            if run.method not in out or run.images_per_s > out[run.method].images_per_s:
                out[run.method] = run
        return out

    def ratios(self) -> dict[str, float]:
        best = self.best()
        ours = best.get(OURS)
        out: dict[str, float] = {}
        if ours is None:
            return out
        for method, key in ((PREDICT, "ours_over_predict"), (PREDICT_ALL_CORES, "ours_over_predict_all_cores"),
                            (CEILING, "ours_over_ceiling")):
            if method in best and best[method].images_per_s > 0:
                out[key] = ours.images_per_s / best[method].images_per_s
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "model": self.model, "imgsz": self.imgsz, "batch": self.batch,
                "precision": self.precision, "images": self.images,
                "images_per_s": {m: round(r.images_per_s, 2) for m, r in self.best().items()},
                "threads": {m: r.threads for m, r in self.best().items()},
                "ratios": {k: round(v, 3) for k, v in self.ratios().items()},
                "runs": [{**dataclasses.asdict(r), "images_per_s": round(r.images_per_s, 2)} for r in self.runs]}

    def table(self) -> Table:
        table = Table(title=f"bench infer: {self.model}, {self.images} images, imgsz {self.imgsz}, batch {self.batch}, "
                            f"{self.precision}, {self.device}", title_justify="left")
        for column in ("method", "img/s (best)", "seconds", "streams x threads", "rounds (img/s)"):
            table.add_column(column, justify="right")
        best = self.best()
        for method in (PREDICT, PREDICT_ALL_CORES, OURS, CEILING):
            if method not in best:
                continue
            rounds = ", ".join(f"{r.images_per_s:.1f}" for r in self.runs if r.method == method)
            table.add_row(method, f"{best[method].images_per_s:.2f}", f"{best[method].seconds:.2f}",
                          f"{best[method].streams} x {best[method].threads}", rounds)
        labels = {"ours_over_predict": "ours / predict", "ours_over_predict_all_cores": "ours / predict (all cores)",
                  "ours_over_ceiling": "ours / ceiling"}
        for name, value in self.ratios().items():
            table.add_row(labels[name], f"{value:.2f}x", "", "", "")
        return table


def run_infer_bench(config: InferConfig, repeats: int = 1) -> InferBenchReport:
    """Measure the three methods ``repeats`` times each, interleaved.

    Raises:
        InputError: bad sources, model or device; ``--batch auto`` (the benchmark needs one fixed batch).
    """
    import torch

    from yolo_batch.errors import InputError

    if config.batch.is_auto or config.batch.fixed is None:
        raise InputError("bench infer needs a fixed --batch N")
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    batch = config.batch.fixed
    paths = list(discover(config.sources).paths)
    device, half = inference_device(config.device, config.half)
    saved_threads = torch.get_num_threads()
    runs: list[BenchRun] = []
    try:
        with tempfile.TemporaryDirectory(prefix="yolo-batch-bench-") as scratch:
            listing = Path(scratch) / "images.txt"
            listing.write_text("".join(p + "\n" for p in paths))
            warm = Path(scratch) / "warmup.txt"
            warm.write_text("".join(p + "\n" for p in paths[:batch]))
            yolo = ultralytics_adapter.load_model(config.model)
            predict_args = {"imgsz": config.imgsz, "conf": config.conf, "iou": config.iou, "max_det": config.max_det,
                            "classes": list(config.classes) if config.classes else None, "batch": batch,
                            "device": "cpu" if device.type == "cpu" else str(device.index), "verbose": False,
                            "save": False, "stream": True, "quantize": 16 if half else None}
            for _ in yolo.predict(str(warm), **predict_args):  # sets up the predictor (and its thread count)
                pass
            predict_threads = torch.get_num_threads()
            ceiling = _Ceiling(config, device, half, paths, batch)
            ours_config = dataclasses.replace(config, out=Path(scratch) / "ours", overwrite=True)
            first = run_inference(dataclasses.replace(ours_config, sources=tuple(paths[:batch])))
            threads, streams = first.threads, first.streams
            cores = os.cpu_count() or 1
            for round_ in range(repeats):
                torch.set_num_threads(predict_threads)
                runs.append(_time_predict(yolo, listing, predict_args, PREDICT, round_, len(paths)))
                if device.type == "cpu" and predict_threads != cores:
                    torch.set_num_threads(cores)
                    runs.append(_time_predict(yolo, listing, predict_args, PREDICT_ALL_CORES, round_, len(paths)))
                summary = run_inference(ours_config)
                runs.append(BenchRun(OURS, round_, summary.processed, summary.processed / summary.images_per_s
                                     if summary.images_per_s else 0.0, summary.threads, summary.streams))
                torch.set_num_threads(threads)
                runs.append(BenchRun(CEILING, round_, ceiling.images, ceiling.time(streams), threads, streams))
    finally:
        torch.set_num_threads(saved_threads)
    return InferBenchReport(device=_device_name(device), model=config.model, imgsz=config.imgsz, batch=batch,
                            precision="fp16" if half else "fp32", images=len(paths), runs=tuple(runs))


def _time_predict(yolo: Any, listing: Path, args: dict[str, Any], method: str, round_: int, expected: int) -> BenchRun:
    import torch

    threads = torch.get_num_threads()
    start = time.perf_counter()
    count = sum(1 for _ in yolo.predict(str(listing), **args))
    seconds = time.perf_counter() - start
    if count != expected:
        log.warning("predict returned %d results for %d images", count, expected)
    return BenchRun(method, round_, count, seconds, threads)


class _Ceiling:
    """The fused network on pre-built device tensors: the most any pipeline could reach."""

    def __init__(self, config: InferConfig, device: Any, half: bool, paths: Sequence[str], batch: int) -> None:
        import cv2
        import torch

        self.engine = Engine.load(config.model, device, half, config.imgsz, NmsSettings())
        groups: dict[tuple[int, int], list[Any]] = {}
        for path in paths:
            image = cv2.imread(path, cv2.IMREAD_COLOR)
            if image is None:
                continue
            pixels, plan = self.engine.prepare(image)
            groups.setdefault(plan.out, []).append(pixels)
        self.batches = []
        net = self.engine.network
        for images in groups.values():
            for start in range(0, len(images), batch):
                host = self.engine.collate(images[start:start + batch])
                x = host.to(device).permute(0, 3, 1, 2).flip(1)
                x = (x.half() if net.half else x.float()).div_(255)
                self.batches.append(x.contiguous(
                    memory_format=torch.channels_last if net.channels_last else torch.contiguous_format))
        self.images = sum(int(x.shape[0]) for x in self.batches)
        with torch.inference_mode():
            net.module(self.batches[0])  # warm-up

    def time(self, streams: int = 1) -> float:
        """Seconds for every batch, spread over ``streams`` threads as our pipeline spreads them."""
        import torch

        module, device = self.engine.network.module, self.engine.device

        def work(batches: Sequence[Any]) -> None:
            with torch.inference_mode():
                for x in batches:
                    module(x)

        shares = [self.batches[i::streams] for i in range(streams)]
        workers = [threading.Thread(target=work, args=(share,), name=f"bench-ceiling-{i}")
                   for i, share in enumerate(shares[1:], 1)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        try:
            work(shares[0])
        finally:
            for worker in workers:
                worker.join()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start


def _device_name(device: Any) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
