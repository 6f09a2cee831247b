"""``bench serve``: a bounded load on ``yolo-batch serve`` over loopback, against offline ``infer`` on the same images.

In one run: a ``yolo-batch serve`` subprocess fed a fixed number of requests (one image each, cycling over
SOURCE) by ``concurrency`` client threads with keep-alive connections, then offline
:func:`~yolo_batch.inference.run_inference` on SOURCE (best of ``offline_rounds``) with the same model, image
size, device and the batch the service ran (``--max-batch auto`` included). Reported: images/s, latency
percentiles and where each request's time went (from the ``timing_ms`` of its answer: queued before its
batch, its own batch, and outside the queue: HTTP, decode, answer), the mean batch size and batch time,
the ratio to offline throughput, and the latency bound of the issue's target (max delay + 2 batch times).

"Batch time" is read per request: the mean, over requests, of the batch each one ran in. Per batch and per
request agree when a batch's time does not depend on its size (a GPU below saturation); on a CPU it grows
with the size, so larger batches carry more requests and the per-batch mean understates what requests wait
for. Both bounds are reported. A closed loop of C clients on a service that runs ``streams`` batches of at
most ``max_batch`` side by side keeps ``C / (streams * max_batch)`` batch cycles of work in the system: past
two, Little's law puts even the median above 2 batch times, whatever the batcher does.

The client runs on the same machine and takes its share of the CPU; on a GPU box it is a small share.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from yolo_batch.errors import InputError, YoloBatchError
from yolo_batch.inference.config import BatchSetting, InferConfig
from yolo_batch.inference.runner import run_inference
from yolo_batch.inference.runtimes.choice import check_names
from yolo_batch.inference.sources import discover
from yolo_batch.serving.load import Client, RequestTiming, free_port, run_load

log = logging.getLogger(__name__)

TARGET_RATIO = 0.8
_STOP_S = 60.0


@dataclass(frozen=True)
class ServeBenchConfig:
    """What to measure. Validated on construction."""

    source: str
    model: str
    imgsz: int = 640
    device: str | None = None
    max_batch: BatchSetting = field(default_factory=BatchSetting)  # an int or "auto" is parsed
    max_delay_ms: float = 5.0
    requests: int = 400
    concurrency: int = 16
    warmup_requests: int = 32
    offline_rounds: int = 2
    workers: int | None = None
    threads: int | None = None
    streams: int | None = None
    backend: str = "auto"  # both sides run the same runtime choice
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_names(self.backend, self.precision)
        if not isinstance(self.max_batch, BatchSetting):
            object.__setattr__(self, "max_batch", BatchSetting.parse(self.max_batch))
        for name in ("requests", "concurrency", "offline_rounds"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup_requests < 0 or self.max_delay_ms < 0:
            raise InputError("warmup requests and max delay must be >= 0")


@dataclass(frozen=True)
class ServeBenchReport:
    """The measured figures; ``to_dict`` for --json, ``table`` for the terminal."""

    config: ServeBenchConfig
    images: int  # distinct images in SOURCE
    failed: dict[str, int]
    wall_s: float
    timings: tuple[RequestTiming, ...] = field(repr=False)
    max_batch: int  # the service's (its choice under --max-batch auto)
    streams: int  # the service's inference streams
    mean_batch: float  # per batch, from the service's /metrics
    batch_ms_per_batch: float  # mean per batch, from the service's /metrics
    offline_images_per_s: float
    device: str

    @property
    def answered(self) -> int:
        return len(self.timings)

    @property
    def images_per_s(self) -> float:
        return self.answered / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, q: float, part: str = "latency_ms") -> float:
        values = [getattr(t, part) for t in self.timings]
        return float(np.percentile(values, q)) if values else 0.0

    @property
    def batch_ms_per_request(self) -> float:
        """The mean over requests of the batch each ran in (see the module docstring)."""
        return float(np.mean([t.batch_ms for t in self.timings])) if self.timings else 0.0

    @property
    def ratio(self) -> float:
        return self.images_per_s / self.offline_images_per_s if self.offline_images_per_s else 0.0

    @property
    def latency_bound_ms(self) -> float:
        return self.config.max_delay_ms + 2 * self.batch_ms_per_request

    @property
    def latency_bound_per_batch_ms(self) -> float:
        return self.config.max_delay_ms + 2 * self.batch_ms_per_batch

    @property
    def batch_cycles(self) -> float:
        """Clients per batch slot: past 2, the closed loop alone keeps requests longer than 2 batch times."""
        return self.config.concurrency / (self.streams * self.max_batch) if self.streams and self.max_batch else 0.0

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        p99 = self.percentile(99)
        parts = {part: {"p50": round(self.percentile(50, f"{part}_ms"), 2),
                        "p99": round(self.percentile(99, f"{part}_ms"), 2)} for part in ("queued", "batch", "outside")}
        return {
            "source": c.source, "model": c.model, "imgsz": c.imgsz, "device": self.device,
            "max_batch": self.max_batch, "max_batch_setting": str(c.max_batch), "streams": self.streams,
            "max_delay_ms": c.max_delay_ms, "requests": c.requests, "concurrency": c.concurrency,
            "batch_cycles": round(self.batch_cycles, 2),
            "images": self.images, "answered": self.answered, "failed": dict(self.failed),
            "wall_s": round(self.wall_s, 3), "images_per_s": round(self.images_per_s, 2),
            "latency_ms": {"p50": round(self.percentile(50), 2), "p95": round(self.percentile(95), 2),
                           "p99": round(p99, 2), "max": round(self.percentile(100), 2)},
            "latency_parts_ms": parts,
            "mean_batch": round(self.mean_batch, 2),
            "batch_ms": {"per_request": round(self.batch_ms_per_request, 2),
                         "per_batch": round(self.batch_ms_per_batch, 2)},
            "offline_images_per_s": round(self.offline_images_per_s, 2), "ratio_to_offline": round(self.ratio, 3),
            "target": {"ratio": TARGET_RATIO, "ratio_met": self.ratio >= TARGET_RATIO,
                       "p99_bound_ms": round(self.latency_bound_ms, 2), "p99_met": p99 <= self.latency_bound_ms,
                       "p99_bound_per_batch_ms": round(self.latency_bound_per_batch_ms, 2),
                       "p99_met_per_batch": p99 <= self.latency_bound_per_batch_ms},
        }

    def table(self) -> Table:
        d = self.to_dict()
        table = Table(title=f"bench serve: {d['requests']} requests x 1 image, concurrency {d['concurrency']}, "
                            f"{d['device']}, imgsz {d['imgsz']}", title_justify="left", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        latency, parts, target = d["latency_ms"], d["latency_parts_ms"], d["target"]

        def verdict(met: bool) -> str:
            return "met" if met else "NOT met"

        rows = [
            ("served", f"{d['images_per_s']:.1f} img/s ({d['answered']} answered in {d['wall_s']:.2f} s"
                       + (f", failed {d['failed']}" if d["failed"] else "") + ")"),
            ("latency", f"p50 {latency['p50']:.1f} ms, p95 {latency['p95']:.1f} ms, p99 {latency['p99']:.1f} ms, "
                        f"max {latency['max']:.1f} ms"),
            ("where (p50/p99)", "  ".join(f"{name} {parts[key]['p50']:.1f}/{parts[key]['p99']:.1f} ms" for name, key in
                                          (("queued", "queued"), ("own batch", "batch"), ("outside", "outside")))),
            ("batches", f"mean size {d['mean_batch']:.2f} (max {d['max_batch']}, {d['max_batch_setting']}), "
                        f"{d['streams']} stream(s); batch time {d['batch_ms']['per_request']:.1f} ms per request, "
                        f"{d['batch_ms']['per_batch']:.1f} ms per batch; max delay {d['max_delay_ms']:g} ms"),
            ("load", f"{d['concurrency']} clients / ({d['streams']} x {d['max_batch']}) = {d['batch_cycles']:.2f} "
                     "batch cycles" + (" (over 2: the median alone exceeds 2 batch times)"
                                       if d["batch_cycles"] > 2 else "")),
            ("offline infer", f"{d['offline_images_per_s']:.1f} img/s (same images, model, batch, device)"),
            ("ratio", f"{d['ratio_to_offline']:.2f}x offline "
                      f"(target >= {TARGET_RATIO}x: {verdict(target['ratio_met'])})"),
            ("p99 bound", f"max delay + 2 batch times = {target['p99_bound_ms']:.1f} ms per request "
                          f"({verdict(target['p99_met'])}), {target['p99_bound_per_batch_ms']:.1f} ms per batch "
                          f"({verdict(target['p99_met_per_batch'])})"),
        ]
        for name, value in rows:
            table.add_row(name, value)
        return table


def run_serve_bench(config: ServeBenchConfig, on_stage: Callable[[str], None] | None = None) -> ServeBenchReport:
    """The service under load, then offline infer; see the module docstring.

    Raises:
        InputError: bad source, or a model or device the service refused (its one-line reason).
        YoloBatchError: the service did not start or did not stop.
    """
    say = on_stage or (lambda text: None)
    paths = discover((config.source,)).paths
    bodies = [Path(p).read_bytes() for p in paths]
    with tempfile.TemporaryDirectory(prefix="yolo-batch-bench-serve-") as tmp:
        port = free_port()
        log_path = Path(tmp) / "serve.log"
        say(f"starting the service on {len(paths)} image(s), max batch {config.max_batch}")
        process = _start_server(config, port, log_path)
        try:
            client = Client("127.0.0.1", port)
            client.wait_ready(process, log_path)
            info = client.info()
            say(f"service ready on port {port} (max batch {info['max_batch']}, {info['streams']} stream(s)); "
                f"{config.warmup_requests} warm-up request(s)")
            run_load(client, bodies, config.warmup_requests, config.concurrency)
            before = client.batch_totals()
            say(f"load: {config.requests} request(s) at concurrency {config.concurrency}")
            wall, timings, failed = run_load(client, bodies, config.requests, config.concurrency)
            after = client.batch_totals()
        finally:
            _stop(process)
    # After the service has stopped, so the two never share the machine; at the batch the service ran.
    say(f"offline infer at batch {info['max_batch']}, best of {config.offline_rounds}")
    offline, device = _offline(config, int(info["max_batch"]))
    batches = after[1] - before[1]
    return ServeBenchReport(
        config=config, images=len(paths), failed=failed, wall_s=wall, timings=tuple(timings),
        max_batch=int(info["max_batch"]), streams=int(info["streams"]),
        mean_batch=(after[0] - before[0]) / batches if batches else 0.0,
        batch_ms_per_batch=(after[2] - before[2]) / batches * 1e3 if batches else 0.0,
        offline_images_per_s=offline, device=device)


def _offline(config: ServeBenchConfig, batch: int) -> tuple[float, str]:
    best, device = 0.0, "cpu"
    for _ in range(config.offline_rounds):
        with tempfile.TemporaryDirectory(prefix="yolo-batch-bench-offline-") as out:
            summary = run_inference(InferConfig(
                sources=(config.source,), model=config.model, out=Path(out), batch=BatchSetting(batch),
                imgsz=config.imgsz, device=config.device, workers=config.workers, threads=config.threads,
                streams=config.streams, backend=config.backend, precision=config.precision))
        best, device = max(best, summary.images_per_s), summary.device
    return best, device


def _start_server(config: ServeBenchConfig, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "yolo_batch.cli", "serve", "--model", config.model, "--host", "127.0.0.1",
               "--port", str(port), "--imgsz", str(config.imgsz), "--max-batch", str(config.max_batch),
               "--max-delay-ms", str(config.max_delay_ms), "--timeout-ms", "120000",
               "--queue-size", str(max(1024, 4 * config.concurrency)), "--log-level", "warning",
               "--backend", config.backend, "--precision", config.precision]
    for option, value in (("--device", config.device), ("--workers", config.workers), ("--threads", config.threads),
                          ("--streams", config.streams)):
        if value is not None:
            command += [option, str(value)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_BATCH_TOKEN")}  # the bench sends none
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise YoloBatchError(f"the service did not stop within {_STOP_S:.0f} s of SIGTERM") from None
