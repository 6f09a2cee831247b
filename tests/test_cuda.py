"""The torch side of device identity and the device-level peak sampler, with torch's CUDA calls stood in."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from yolo_batch.core import cuda


def test_identify_reports_the_uuid_cuda_gives(monkeypatch):
    props = {0: SimpleNamespace(uuid="5f2a0c11-aaaa"), 1: SimpleNamespace()}  # a build without uuid: None
    monkeypatch.setattr("torch.cuda.get_device_properties", lambda i: props[i])
    assert [(d.index, d.uuid) for d in cuda.identify([0, 1])] == [(0, "5f2a0c11-aaaa"), (1, None)]


def test_the_device_peak_is_the_highest_use_seen_while_the_block_ran(monkeypatch):
    total = 100
    readings = iter([90, 60, 20, 35, 70])  # free memory over time: use 10, 40, 80, 65, 30
    seen = threading.Event()
    last = [90]

    def mem_get_info(index):
        try:
            last[0] = next(readings)
        except StopIteration:
            seen.set()
        return last[0], total

    monkeypatch.setattr(cuda, "mem_get_info", mem_get_info)
    with cuda.DevicePeak(0, every_s=0.001) as device:
        assert seen.wait(10)
    assert device.peak == 80


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.gpu
def test_mem_get_info_on_a_real_gpu():
    free, total = cuda.mem_get_info(0)
    assert 0 < free <= total
