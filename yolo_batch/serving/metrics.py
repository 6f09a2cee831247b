"""The service's Prometheus metrics, in a registry of its own (no process-wide state).

Counters: requests by route and status, images by source and outcome, errors by kind, out-of-memory
splits. Histograms: batch size, request latency, queue wait, batch duration. Gauges: queue depth, images
in flight, readiness, and an info gauge with the model and version.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "yolo_batch"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """Every metric the service exposes; thread-safe (prometheus_client locks each value)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds", "Time from request arrival to answer",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter(f"{PREFIX}_images", "Images answered, by source (http, watch) and outcome (ok, error)",
                              ["source", "outcome"], registry=r)
        self.errors = Counter(f"{PREFIX}_errors", "Errors by kind (the 'error' field of error answers)", ["kind"],
                              registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Images per dispatched batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "How long a batch's oldest image queued",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_duration = Histogram(f"{PREFIX}_batch_duration_seconds", "Forward pass and NMS of one batch",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.oom = Counter(f"{PREFIX}_oom_splits", "Batches split after running out of device memory", registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Images waiting for a batch", registry=r)
        self.in_flight = Gauge(f"{PREFIX}_images_in_flight", "Images accepted and not yet answered (HTTP)",
                               registry=r)
        self.ready = Gauge(f"{PREFIX}_ready", "1 once the model is loaded and warmed up", registry=r)
        self.info = Gauge(f"{PREFIX}_build_info", "Version, model and device (value 1)",
                          ["version", "model", "device"], registry=r)

    def track_queue(self, depth: Callable[[], int]) -> None:
        """Read the queue depth from ``depth`` at every scrape."""
        self.queue_depth.set_function(depth)

    def observe_batch(self, size: int, oldest_wait_s: float, duration_s: float) -> None:
        self.batch_size.observe(size)
        self.queue_wait.observe(oldest_wait_s)
        self.batch_duration.observe(duration_s)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
