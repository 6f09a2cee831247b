"""Helpers for the serving tests: a real uvicorn server on 127.0.0.1 in a thread, a fake backend, metrics parsing."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from yolo_batch.inference.decode import DecodeError, FailureKind
from yolo_batch.inference.letterbox import plan_letterbox
from yolo_batch.inference.oom_split import BatchSize
from yolo_batch.inference.stages import Prepared
from yolo_batch.serving.app import create_app
from yolo_batch.serving.backend import ItemResult
from yolo_batch.serving.config import ServeConfig
from yolo_batch.serving.load import free_port  # noqa: F401 (re-exported for the tests)
from yolo_batch.serving.server import bind, uvicorn_config

WAIT_S = 60.0


def until(condition: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:.0f} s"
        time.sleep(0.01)


def wait_for_status(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200; fail at once with the server's log if the process died."""

    def answered() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(url, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    until(answered, timeout=timeout, what=f"{url} 200")


class LiveServer:
    """``create_app(config, factory)`` served by uvicorn on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, config: ServeConfig, backend_factory: Callable[[ServeConfig], Any] | None = None) -> None:
        import uvicorn

        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        kwargs = {} if backend_factory is None else {"backend_factory": backend_factory}
        self.app = create_app(config, **kwargs)
        self.state = self.app.state.service
        self.server = uvicorn.Server(uvicorn_config(self.app, config))  # as serve() runs it
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        until(lambda: self.server.started or not self.thread.is_alive(), what="server start")
        assert self.server.started, "uvicorn did not start"
        return self

    def wait_ready(self, headers: dict[str, str] | None = None) -> LiveServer:
        with self.client(headers) as client:
            until(lambda: client.get("/readyz").status_code == 200, what="/readyz 200")
        return self

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers or {}, timeout=WAIT_S)

    def metrics(self, headers: dict[str, str] | None = None) -> dict[str, float]:
        with self.client(headers) as client:
            return parse_metrics(client.get("/metrics").text)

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{label="v",...}': value} (and plain names for unlabelled samples)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


class FakeBackend:
    """A backend without a model: ``prepare`` accepts any bytes but ``b"bad"``; ``process`` (and warm-up) can be
    held until the test releases them, and records each batch's image names."""

    def __init__(self, config: ServeConfig, max_batch: int = 4, hold: bool = False, hold_warmup: bool = False,
                 streams: int = 1) -> None:
        self.config = config
        self.batch_size = BatchSize(max_batch)
        self.streams = streams
        self.on_oom: Callable[[], None] | None = None
        self.batches: list[list[str]] = []
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.warmup_release = threading.Event()
        self.closed = False
        if not hold:
            self.release.set()
        if not hold_warmup:
            self.warmup_release.set()

    def warm_up(self) -> None:
        assert self.warmup_release.wait(WAIT_S), "warm-up never released"

    def prepare(self, data: bytes, name: str) -> Prepared:
        if data == b"bad":
            raise DecodeError(FailureKind.CORRUPT, "corrupt JPEG: fake")
        plan = plan_letterbox(32, 32, 32)
        return Prepared(path=name, pixels=np.zeros((32, 32, 3), np.uint8), plan=plan, decode_s=0.0, letterbox_s=0.0)

    def process(self, items: Sequence[Prepared]) -> list[ItemResult | BaseException]:
        self.batches.append([p.path for p in items])
        self.entered.release()
        assert self.release.wait(WAIT_S), "the test never released the batch"
        return [ItemResult(detections=(), batch=len(items), inference_ms=0.0) for _ in items]

    def info(self) -> dict[str, Any]:
        return {"device": "fake", "max_batch": self.batch_size()}

    def close(self) -> None:
        self.closed = True


def fake_config(**overrides: Any) -> ServeConfig:
    return ServeConfig(**{"model": "fake.pt", "max_delay_ms": 0.0, "port": 0, **overrides})
