"""A closed-loop HTTP load on ``yolo-batch serve``: client threads with keep-alive connections on loopback.

Each client sends its next request when its answer arrives. Every answered request keeps the client's
latency and the service's own ``timing_ms`` for its image, so a latency can be split into queueing, its
batch, and the time outside the queue. Used by ``bench serve``.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolo_batch.errors import InputError, YoloBatchError

_READY_S = 300.0


@dataclass(frozen=True)
class RequestTiming:
    """One answered request: the client's latency and the service's ``timing_ms`` for its image."""

    latency_ms: float  # client: request sent to answer read
    wait_ms: float  # service: joined the queue to its batch's results
    batch_ms: float  # service: its own batch (forward pass + NMS of its shape group)
    batch: int  # images in that batch

    @property
    def queued_ms(self) -> float:
        """Waiting for a batch to form and for a free inference stream."""
        return max(self.wait_ms - self.batch_ms, 0.0)

    @property
    def outside_ms(self) -> float:
        """Outside the queue: HTTP both ways, decode and letterbox, the answer's JSON, the client."""
        return max(self.latency_ms - self.wait_ms, 0.0)


def free_port() -> int:
    """A port nothing listens on, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Client:
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
        """Poll /readyz until the service ``process`` (logging to ``log_path``) is ready.

        Raises:
            InputError: the service refused its settings (exit 2: bad model, device...); its one line.
            YoloBatchError: it exited otherwise, or was not ready within the time limit.
        """
        deadline = time.monotonic() + _READY_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log = log_path.read_text(errors="replace")
                if process.returncode == 2 and log.strip():  # the CLI's usage error, as one "Error: ..." line
                    raise InputError(log.strip().splitlines()[-1].removeprefix("Error: "))
                raise YoloBatchError(f"the service exited with {process.returncode}: " + log[-2000:])
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.2)
        raise YoloBatchError(f"the service was not ready within {_READY_S:.0f} s")

    def info(self) -> dict[str, Any]:
        status, body = self.get("/v1/info")
        if status != 200:
            raise YoloBatchError(f"/v1/info answered {status}")
        return dict(json.loads(body))

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


def run_load(client: Client, bodies: list[bytes], requests: int, concurrency: int
             ) -> tuple[float, list[RequestTiming], dict[str, int]]:
    """``requests`` POSTs from ``concurrency`` threads; returns wall seconds, timings of 200s, failures."""
    lock = threading.Lock()
    counter = iter(range(requests))
    timings: list[RequestTiming] = []
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
                timing = _timing(elapsed, payload) if status == "200" else None
                with lock:
                    if timing is not None:
                        timings.append(timing)
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
    return time.perf_counter() - start, timings, failed


def _timing(latency_ms: float, payload: bytes) -> RequestTiming | None:
    """The request's timing from its answer, or None for an answer without one image's result."""
    try:
        results = json.loads(payload)["results"]
        timing = results[0]["timing_ms"]
        batch = int(timing["batch"])
        return RequestTiming(latency_ms=latency_ms, wait_ms=float(timing["wait"]),
                             batch_ms=float(timing["inference"]) * batch, batch=batch)
    except (ValueError, KeyError, IndexError, TypeError):
        return None
