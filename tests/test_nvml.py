"""The NVML adapter against a fake pynvml: no driver, no device, N devices, errors mid-query."""

from __future__ import annotations

import pytest
from fakes import GIB, FakeDevice, fake_pynvml

from yolo_batch.core.nvml import NvmlUnavailable, read_gpus


def test_reads_memory_and_processes_of_each_chosen_gpu():
    nvml = fake_pynvml([
        FakeDevice(used=10 * GIB, processes=[(111, 6 * GIB), (222, 3 * GIB)]),
        FakeDevice(name="NVIDIA A100", total=40 * GIB, used=2 * GIB),
    ])
    gpus = read_gpus([0, 1], nvml=nvml)
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA A100"]
    assert gpus[0].free_bytes == 70 * GIB and gpus[1].free_bytes == 38 * GIB
    assert gpus[0].uuid == "GPU-fake-0"
    assert gpus[0].others_bytes(pid=111) == 3 * GIB
    assert gpus[0].own_bytes(pid=111) == 6 * GIB
    assert nvml.calls[-1] == "nvmlShutdown"


def test_only_the_chosen_gpu_is_read():
    nvml = fake_pynvml([FakeDevice(), FakeDevice(used=50 * GIB)])
    (gpu,) = read_gpus([1], nvml=nvml)
    assert gpu.index == 1 and gpu.used_bytes == 50 * GIB


def test_hidden_per_process_memory_is_none_not_a_crash():
    nvml = fake_pynvml([FakeDevice(processes=[(5, None)])])
    (gpu,) = read_gpus([0], nvml=nvml)
    assert gpu.processes[0].used_bytes is None
    assert gpu.others_bytes(pid=1) == 0


@pytest.mark.parametrize(
    ("nvml", "message"),
    [
        (fake_pynvml([], init_error=True), "NVML could not start (Driver Not Loaded)"),
        (fake_pynvml([]), "GPU 0 not found: NVML sees 0 device(s)"),
        (fake_pynvml([FakeDevice()], count_error=True), "NVML query failed: Unknown Error"),
        (fake_pynvml([FakeDevice(fail_on="nvmlDeviceGetMemoryInfo")]), "NVML query failed: nvmlDeviceGetMemoryInfo"),
    ],
)
def test_failures_become_one_line_reasons(nvml, message):
    with pytest.raises(NvmlUnavailable) as info:
        read_gpus([0], nvml=nvml)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_unsupported_process_query_keeps_the_totals():
    nvml = fake_pynvml([FakeDevice(fail_on="nvmlDeviceGetComputeRunningProcesses")])
    (gpu,) = read_gpus([0], nvml=nvml)
    assert gpu.processes == () and gpu.total_bytes == 80 * GIB


def test_missing_bindings_are_reported(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(NvmlUnavailable, match="nvidia-ml-py"):
        read_gpus([0])


def test_cuda_visible_devices_maps_to_physical_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    nvml = fake_pynvml([FakeDevice(), FakeDevice(), FakeDevice(used=7 * GIB), FakeDevice()])
    (gpu,) = read_gpus([0], nvml=nvml)
    assert gpu.index == 0 and gpu.used_bytes == 7 * GIB


def test_real_nvml_on_this_machine_never_crashes():
    try:
        gpus = read_gpus([0])
    except NvmlUnavailable as exc:
        assert str(exc)  # a GPU-less machine gets a reason
    else:
        assert gpus[0].total_bytes > 0
