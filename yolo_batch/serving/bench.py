"""``bench serve``: a bounded load on ``yolo-batch serve`` over loopback, against offline ``infer`` on the same images.

In one run: offline :func:`~yolo_batch.inference.run_inference` on SOURCE (best of ``offline_rounds``), then a
``yolo-batch serve`` subprocess with the same model, image size, device and batch, fed a fixed number of
requests (one image each, cycling over SOURCE) by ``concurrency`` client threads with keep-alive
connections. Reported: images/s, latency percentiles, the mean batch size and batch time (from the
service's own /metrics, warm-up excluded), the ratio to offline throughput, and the latency bound of the
issue's target (max delay + 2 batch times). The client runs on the same machine and takes its share of
the CPU; on a GPU box it is a small share.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from yolo_batch.errors import InputError, YoloBatchError
from yolo_batch.inference.config import BatchSetting, InferConfig
from yolo_batch.inference.runner import run_inference
from yolo_batch.inference.sources import discover

log = logging.getLogger(__name__)

TARGET_RATIO = 0.8
_READY_S = 300.0
_STOP_S = 60.0


@dataclass(frozen=True)
class ServeBenchConfig:
    """What to measure. Validated on construction."""

    source: str
    model: str
    imgsz: int = 640
    device: str | None = None
    max_batch: int = 16
    max_delay_ms: float = 5.0
    requests: int = 400
    concurrency: int = 16
    warmup_requests: int = 32
    offline_rounds: int = 2
    workers: int | None = None
    threads: int | None = None
    streams: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch", "requests", "concurrency", "offline_rounds"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup_requests < 0 or self.max_delay_ms < 0:
            raise InputError("warmup requests and max delay must be >= 0")


@dataclass(frozen=True)
class ServeBenchReport:
    """The measured figures; ``to_dict`` for --json, ``table`` for the terminal."""

    config: ServeBenchConfig
    images: int  # distinct images in SOURCE
    answered: int
    failed: dict[str, int]
    wall_s: float
    latencies_ms: tuple[float, ...] = field(repr=False)
    mean_batch: float
    batch_ms: float
    offline_images_per_s: float
    device: str

    @property
    def images_per_s(self) -> float:
        return self.answered / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else 0.0

    @property
    def ratio(self) -> float:
        return self.images_per_s / self.offline_images_per_s if self.offline_images_per_s else 0.0

    @property
    def latency_bound_ms(self) -> float:
        return self.config.max_delay_ms + 2 * self.batch_ms

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "source": c.source, "model": c.model, "imgsz": c.imgsz, "device": self.device, "max_batch": c.max_batch,
            "max_delay_ms": c.max_delay_ms, "requests": c.requests, "concurrency": c.concurrency,
            "images": self.images, "answered": self.answered, "failed": dict(self.failed),
            "wall_s": round(self.wall_s, 3), "images_per_s": round(self.images_per_s, 2),
            "latency_ms": {"p50": round(self.percentile(50), 2), "p95": round(self.percentile(95), 2),
                           "p99": round(self.percentile(99), 2), "max": round(max(self.latencies_ms, default=0.0), 2)},
            "mean_batch": round(self.mean_batch, 2), "batch_ms": round(self.batch_ms, 2),
            "offline_images_per_s": round(self.offline_images_per_s, 2), "ratio_to_offline": round(self.ratio, 3),
            "target": {"ratio": TARGET_RATIO, "ratio_met": self.ratio >= TARGET_RATIO,
                       "p99_bound_ms": round(self.latency_bound_ms, 2),
                       "p99_met": self.percentile(99) <= self.latency_bound_ms},
        }

    def table(self) -> Table:
        d = self.to_dict()
        table = Table(title=f"bench serve: {d['requests']} requests x 1 image, concurrency {d['concurrency']}, "
                            f"{d['device']}, imgsz {d['imgsz']}", title_justify="left", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        latency = d["latency_ms"]
        rows = [
            ("served", f"{d['images_per_s']:.1f} img/s ({d['answered']} answered in {d['wall_s']:.2f} s"
                       + (f", failed {d['failed']}" if d["failed"] else "") + ")"),
            ("latency", f"p50 {latency['p50']:.1f} ms, p95 {latency['p95']:.1f} ms, p99 {latency['p99']:.1f} ms, "
                        f"max {latency['max']:.1f} ms"),
            ("batches", f"mean size {d['mean_batch']:.2f} (max {d['max_batch']}), mean batch time "
                        f"{d['batch_ms']:.1f} ms, max delay {d['max_delay_ms']:g} ms"),
            ("offline infer", f"{d['offline_images_per_s']:.1f} img/s (same images, model, batch, device)"),
            ("ratio", f"{d['ratio_to_offline']:.2f}x offline (target >= {TARGET_RATIO}x: "
                      f"{'met' if d['target']['ratio_met'] else 'NOT met'})"),
            ("p99 bound", f"max delay + 2 batch times = {d['target']['p99_bound_ms']:.1f} ms "
                          f"({'met' if d['target']['p99_met'] else 'NOT met'})"),
        ]
        for name, value in rows:
            table.add_row(name, value)
        return table


def run_serve_bench(config: ServeBenchConfig, on_stage: Callable[[str], None] | None = None) -> ServeBenchReport:
    """Offline infer, then the service under load; see the module docstring.

    Raises:
        InputError: bad source or model (the offline run checks them first).
        YoloBatchError: the service did not start or did not stop.
    """
    say = on_stage or (lambda text: None)
    paths = discover((config.source,)).paths
    bodies = [Path(p).read_bytes() for p in paths]
    say(f"offline infer on {len(paths)} image(s), best of {config.offline_rounds}")
    offline, device = _offline(config)
    say(f"offline: {offline:.1f} img/s; starting the service")
    with tempfile.TemporaryDirectory(prefix="yolo-batch-bench-serve-") as tmp:
        port = _free_port()
        log_path = Path(tmp) / "serve.log"
        process = _start_server(config, port, log_path)
        try:
            client = _Client("127.0.0.1", port)
            client.wait_ready(process, log_path)
            say(f"service ready on port {port}; {config.warmup_requests} warm-up request(s)")
            _load(client, bodies, config.warmup_requests, config.concurrency)
            before = client.batch_totals()
            say(f"load: {config.requests} request(s) at concurrency {config.concurrency}")
            wall, latencies, failed = _load(client, bodies, config.requests, config.concurrency)
            after = client.batch_totals()
        finally:
            _stop(process)
    batches = after[1] - before[1]
    return ServeBenchReport(
        config=config, images=len(paths), answered=len(latencies), failed=failed, wall_s=wall,
        latencies_ms=tuple(latencies), mean_batch=(after[0] - before[0]) / batches if batches else 0.0,
        batch_ms=(after[2] - before[2]) / batches * 1e3 if batches else 0.0, offline_images_per_s=offline,
        device=device)


def _offline(config: ServeBenchConfig) -> tuple[float, str]:
    best, device = 0.0, "cpu"
    for _ in range(config.offline_rounds):
        with tempfile.TemporaryDirectory(prefix="yolo-batch-bench-offline-") as out:
            summary = run_inference(InferConfig(
                sources=(config.source,), model=config.model, out=Path(out), batch=BatchSetting(config.max_batch),
                imgsz=config.imgsz, device=config.device, workers=config.workers, threads=config.threads,
                streams=config.streams))
        best, device = max(best, summary.images_per_s), summary.device
    return best, device


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_server(config: ServeBenchConfig, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "yolo_batch.cli", "serve", "--model", config.model, "--host", "127.0.0.1",
               "--port", str(port), "--imgsz", str(config.imgsz), "--max-batch", str(config.max_batch),
               "--max-delay-ms", str(config.max_delay_ms), "--timeout-ms", "120000",
               "--queue-size", str(max(1024, 4 * config.concurrency)), "--log-level", "warning"]
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


class _Client:
    """A few plain HTTP calls on loopback (one connection per thread, kept alive)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=120)

    def get(self, path: str) -> tuple[int, bytes]:
        conn = self.connection()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def wait_ready(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        deadline = time.monotonic() + _READY_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise YoloBatchError(f"the service exited with {process.returncode}: "
                                     + log_path.read_text(errors="replace")[-2000:])
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.2)
        raise YoloBatchError(f"the service was not ready within {_READY_S:.0f} s")

    def batch_totals(self) -> tuple[float, float, float]:
        """(sum of batch sizes, number of batches, sum of batch seconds) from /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.get("/metrics")
        if status != 200:
            raise YoloBatchError(f"/metrics answered {status}")
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                values[sample.name] = sample.value
        return (values.get("yolo_batch_batch_size_sum", 0.0), values.get("yolo_batch_batch_size_count", 0.0),
                values.get("yolo_batch_batch_duration_seconds_sum", 0.0))


def _load(client: _Client, bodies: list[bytes], requests: int, concurrency: int
          ) -> tuple[float, list[float], dict[str, int]]:
    """``requests`` POSTs from ``concurrency`` threads; returns wall seconds, latencies (ms) of 200s, failures."""
    lock = threading.Lock()
    counter = iter(range(requests))
    latencies: list[float] = []
    failed: dict[str, int] = {}

    def worker() -> None:
        conn = client.connection()
        try:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                body = bodies[index % len(bodies)]
                start = time.perf_counter()
                try:
                    conn.request("POST", "/v1/detect", body=body, headers={"Content-Type": "application/octet-stream"})
                    response = conn.getresponse()
                    payload = response.read()
                    status = str(response.status)
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    conn = client.connection()
                    status, payload = type(exc).__name__, b""
                elapsed = (time.perf_counter() - start) * 1e3
                with lock:
                    if status == "200" and json.loads(payload).get("results"):
                        latencies.append(elapsed)
                    else:
                        failed[status] = failed.get(status, 0) + 1
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, name=f"bench-client-{i}", daemon=True) for i in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies, failed
