"""bench serve's arithmetic on plain numbers: where a request's time went, the two batch times, the bound."""

from __future__ import annotations

import json

import pytest

from yolo_batch.errors import InputError
from yolo_batch.serving.bench import ServeBenchConfig, ServeBenchReport
from yolo_batch.serving.load import RequestTiming, _timing


def report(timings: list[RequestTiming], *, concurrency: int = 8, streams: int = 2, max_batch: int = 4,
           batch_ms_per_batch: float = 30.0) -> ServeBenchReport:
    config = ServeBenchConfig(source="images", model="m.pt", max_batch=max_batch, max_delay_ms=5.0,
                              requests=len(timings), concurrency=concurrency)
    return ServeBenchReport(config=config, images=10, failed={}, wall_s=1.0, timings=tuple(timings),
                            max_batch=max_batch, streams=streams, mean_batch=2.0,
                            batch_ms_per_batch=batch_ms_per_batch, offline_images_per_s=10.0, device="cpu")


def test_a_request_splits_into_queued_its_batch_and_outside():
    timing = RequestTiming(latency_ms=100.0, wait_ms=90.0, batch_ms=60.0, batch=3)
    assert timing.queued_ms == 30.0 and timing.outside_ms == 10.0


def test_clock_jitter_never_gives_negative_parts():
    timing = RequestTiming(latency_ms=50.0, wait_ms=51.0, batch_ms=52.0, batch=1)
    assert timing.queued_ms == 0.0 and timing.outside_ms == 0.0


def test_batch_time_per_request_weighs_each_batch_by_the_requests_it_carried():
    # One batch of 1 image (20 ms) and one of 3 images (60 ms): per batch 40 ms, per request 50 ms.
    timings = [RequestTiming(30.0, 25.0, 20.0, 1)] + [RequestTiming(90.0, 70.0, 60.0, 3)] * 3
    r = report(timings, batch_ms_per_batch=40.0)
    assert r.batch_ms_per_request == pytest.approx(50.0)
    assert r.latency_bound_ms == pytest.approx(5.0 + 2 * 50.0)
    assert r.latency_bound_per_batch_ms == pytest.approx(5.0 + 2 * 40.0)
    d = r.to_dict()
    # p99 of (30, 90, 90, 90) is 90: inside the per-request bound (105), outside the per-batch one (85).
    assert d["target"]["p99_met"] is True and d["target"]["p99_met_per_batch"] is False
    assert d["latency_parts_ms"]["batch"] == {"p50": 60.0, "p99": 60.0}
    assert d["answered"] == 4 and d["images_per_s"] == 4.0 and d["ratio_to_offline"] == 0.4
    json.dumps(d)


@pytest.mark.parametrize(("concurrency", "streams", "max_batch", "cycles", "flagged"), [
    (8, 2, 4, 1.0, False), (16, 2, 4, 2.0, False), (32, 2, 4, 4.0, True), (16, 1, 16, 1.0, False)])
def test_load_is_stated_in_batch_cycles_and_flagged_past_two(concurrency, streams, max_batch, cycles, flagged):
    r = report([RequestTiming(10.0, 8.0, 5.0, 1)], concurrency=concurrency, streams=streams, max_batch=max_batch)
    assert r.batch_cycles == cycles
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(r.table())
    assert ("the median alone exceeds 2 batch times" in console.export_text()) is flagged


def test_timing_is_read_from_the_answer_and_a_malformed_answer_counts_as_failed():
    answer = {"results": [{"timing_ms": {"wait": 40.0, "inference": 10.0, "batch": 3.0, "decode": 1.0}}]}
    assert _timing(55.0, json.dumps(answer).encode()) == RequestTiming(55.0, 40.0, 30.0, 3)
    for bad in (b"", b"{}", b'{"results": []}', b'{"results": [{"timing_ms": {}}]}', b"not json"):
        assert _timing(55.0, bad) is None


@pytest.mark.parametrize(("field", "value"), [("max_batch", "zero"), ("max_batch", 0), ("requests", 0),
                                              ("concurrency", 0), ("max_delay_ms", -1.0)])
def test_bad_settings_are_input_errors(field, value):
    with pytest.raises(InputError):
        ServeBenchConfig(source="images", model="m.pt", **{field: value})


def test_auto_is_accepted_as_the_max_batch():
    assert str(ServeBenchConfig(source="images", model="m.pt", max_batch="auto").max_batch) == "auto"
